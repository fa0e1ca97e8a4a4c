//! The in-memory driver shared by replay, the demo and behaviour cases: subscriber states,
//! the retention schedule and counters around the pure `process`.

use crate::core::control::{ControlEvent, SubscriberState};
use crate::core::process::{Decision, Outcome, process_into};
use crate::core::pseudonym::Keyring;
use crate::core::record::Record;
use crate::core::retention::{Anchors, Expiry, Schedule};
use crate::policy::Policy;
use crate::vocab::purpose::Purpose;
use crate::vocab::time::Millis;

/// Counts per purpose and outcome, dead letters and expiries.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Records processed (valid ones).
    pub records: u64,
    /// Records sent to the dead letter.
    pub dead_letters: u64,
    /// Control events applied.
    pub controls: u64,
    /// Of those, consent and objection events naming a purpose the policy does not
    /// declare (see [`Policy::undeclared`]), per purpose: they change nothing.
    pub undeclared: [u64; Purpose::COUNT],
    /// `[purpose][outcome]` counts.
    pub outcomes: [[u64; Outcome::ALL.len()]; Purpose::COUNT],
    /// Expiries emitted per purpose.
    pub expiries: [u64; Purpose::COUNT],
}

impl Stats {
    /// Copies (plain and anonymised) made for a purpose.
    pub fn copies(&self, p: Purpose) -> u64 {
        self.outcomes[p as usize][Outcome::Copied as usize]
            + self.outcomes[p as usize][Outcome::Anonymised as usize]
    }
    /// The count for one purpose and outcome.
    pub fn count(&self, p: Purpose, o: Outcome) -> u64 {
        self.outcomes[p as usize][o as usize]
    }
}

/// Subscriber states, schedule and counters for one policy.
pub struct Engine<'p> {
    policy: &'p Policy,
    keys: &'p Keyring,
    /// States of subscribers with control events, by msisdn (looked up for every record).
    states: hashbrown::HashMap<Box<str>, SubscriberState>,
    schedule: Schedule,
    /// Counters.
    pub stats: Stats,
}

impl<'p> Engine<'p> {
    /// A fresh engine.
    pub fn new(policy: &'p Policy, keys: &'p Keyring) -> Self {
        Engine {
            policy,
            keys,
            states: hashbrown::HashMap::new(),
            schedule: Schedule::new(policy),
            stats: Stats::default(),
        }
    }

    /// Applies a control event to routing (from the next record on) and to retention.
    pub fn control(&mut self, ev: &ControlEvent) {
        match self.states.get_mut(ev.msisdn.as_str()) {
            Some(s) => s.apply(&ev.change, ev.at),
            None => self
                .states
                .entry(ev.msisdn.as_str().into())
                .or_default()
                .apply(&ev.change, ev.at),
        }
        self.schedule.control(self.policy, self.keys, ev);
        self.stats.controls += 1;
        if let Some(p) = ev.change.undeclared_purpose(self.policy) {
            self.stats.undeclared[p as usize] += 1;
        }
    }

    /// Processes one valid record into `d` (emptied first); the caller writes the copies
    /// out. The caller owns the decision so one can serve every record of a run: a
    /// decision is several kilobytes, too much to return by value per record.
    pub fn record<'r>(&mut self, r: &'r Record<'_>, now: Millis, d: &mut Decision<'r>)
    where
        'p: 'r,
    {
        let state = self
            .states
            .get(r.msisdn.as_ref())
            .copied()
            .unwrap_or_default();
        process_into(r, self.policy, &state, self.keys, now, d);
        for c in &d.copies {
            self.schedule
                .track(&c.schedule_entry(), Anchors::of(&state));
        }
        for (p, o) in d.outcomes.iter().enumerate() {
            if let Some(o) = o {
                self.stats.outcomes[p][*o as usize] += 1;
            }
        }
        self.stats.records += 1;
    }

    /// Every expiry due at `now`, removed from the schedule.
    pub fn due(&mut self, now: Millis) -> Vec<Expiry> {
        let out = self.schedule.due(now);
        for e in &out {
            self.stats.expiries[e.purpose as usize] += 1;
        }
        out
    }

    /// [`Engine::due`] handing each expiry to `emit` as it is made.
    pub fn due_each<E>(
        &mut self,
        now: Millis,
        mut emit: impl FnMut(&Expiry) -> Result<(), E>,
    ) -> Result<(), E> {
        let stats = &mut self.stats;
        self.schedule.due_each(now, |e| {
            stats.expiries[e.purpose as usize] += 1;
            emit(&e)
        })
    }

    /// Windows still waiting for their deadline.
    pub fn open_windows(&self) -> usize {
        self.schedule.open_windows()
    }

    /// The policy driven.
    pub fn policy(&self) -> &'p Policy {
        self.policy
    }

    /// The keys in use.
    pub fn keys(&self) -> &'p Keyring {
        self.keys
    }
}
