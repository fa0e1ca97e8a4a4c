//! The run's one clock: what Kafka mode takes as "now" for routing, for the record times it
//! accepts and for firing retention timers. Records' own times never move it.
//!
//! It is the wall clock, unless the configuration gives a start instant: then it starts
//! there and runs a given number of times faster than real time, so a rehearsal or a test
//! sees months of retention run out in seconds without waiting for them.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::config::ClockSetting;
use crate::vocab::time::Millis;

/// The clock.
#[derive(Clone, Debug)]
pub struct Clock {
    scaled: Option<(Millis, Instant, u32)>,
}

impl Clock {
    /// The clock a configuration asks for, starting now.
    pub fn new(setting: ClockSetting) -> Clock {
        Clock {
            scaled: setting
                .start
                .map(|start| (start, Instant::now(), setting.speed.max(1))),
        }
    }

    /// The wall clock.
    pub fn wall() -> Clock {
        Clock { scaled: None }
    }

    /// How many times faster than real time it runs (1 for the wall clock).
    pub fn speed(&self) -> u32 {
        self.scaled.map_or(1, |(_, _, s)| s)
    }

    /// Now.
    pub fn now(&self) -> Millis {
        match self.scaled {
            None => Millis(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64),
            ),
            Some((start, origin, speed)) => {
                let real = origin.elapsed().as_millis() as i64;
                Millis(
                    start
                        .0
                        .saturating_add(real.saturating_mul(i64::from(speed))),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_clock_starts_where_told_and_runs_faster() {
        let start = Millis::parse("2030-01-01T00:00:00.000Z").unwrap();
        let c = Clock::new(ClockSetting {
            start: Some(start),
            speed: 86_400_000,
        });
        let a = c.now();
        assert!(a >= start, "never before its start");
        // A day per real millisecond: any real wait moves it by days, never backwards.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = c.now();
        assert!(b.0 - a.0 >= 86_400_000, "{a} {b}");
        let wall = Clock::wall().now();
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((wall.0 - sys).abs() < 60_000);
    }
}
