//! The retention schedule in memory: every open window of one policy's routes, and the
//! expiries they yield once their deadline has passed.
//!
//! It must hold millions of windows in little memory and be cheap per copy (a day of CDRs
//! opens one window per route, subscriber and day or hour, and every copy looks its window
//! up). So:
//!
//! - Most windows are a number. An event-time window is its UTC day (its bounds and
//!   deadline follow from the day and the route's rule); an invoice window still waiting
//!   for its settlement is its hour. Those are sorted day or hour numbers per route and
//!   subject, 4 bytes each; event-time windows are armed per deadline, route and day with
//!   the subjects that hold one. Windows with bounds or a deadline of their own (settled
//!   periods, contract windows, windows a right ended) are rare and kept in full.
//! - Windows are grouped by subject first, then route: a record's billing, fraud and
//!   troubleshooting copies name the subscriber the same way, so its three windows are
//!   found with one look-up (the last subject found is remembered).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;

use hashbrown::HashTable;
use smallvec::SmallVec;

use super::{
    Anchors, ENDED_BASE, Expiry, Reason, bucket_of, event_time_deadline, span_of, window_of,
};
use crate::core::control::{Change, ControlEvent};
use crate::core::pseudonym::Keyring;
use crate::core::retention::ScheduleEntry;
use crate::core::treat::Text;
use crate::core::treat::subscriber_ref;
use crate::policy::{Anchor, Policy, Retention};
use crate::vocab::purpose::Purpose;
use crate::vocab::time::{DAY_MS, HOUR_MS, Millis};

/// Why a window kept in full expires: its rule, or the right that ended it early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Rule,
    ConsentWithdrawn,
    Objection,
    Erasure,
}

/// A window kept in full.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// The hour of a settled period's start, a late invoice hour, 0 for a contract
    /// window, or `ENDED_BASE + instant` for a window a right ended.
    bucket: i64,
    /// Start of the first bucket covered.
    from: Millis,
    /// Last instant of the last bucket covered.
    to: Millis,
    deadline: Option<Millis>,
    why: Why,
}

impl Window {
    fn widen(&mut self, from: Millis, to: Millis) {
        self.from = self.from.min(from);
        self.to = self.to.max(to);
    }
}

/// A settled invoice period of one route and subscriber, remembered until its deadline
/// so a record arriving after the settlement gets the settled deadline at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Settlement {
    start: Millis,
    end: Millis,
    deadline: Millis,
}

/// A window's identity, as the schedule topic keys it (`purpose/subject/bucket`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    /// The route.
    pub purpose: Purpose,
    /// The subject as the route's copies name them; empty for anonymised copies.
    pub subject: String,
    /// The day (event-time rules), hour (invoice rules), 0 (contract rules), or the
    /// instant of the right that ended the window, offset far below every other bucket.
    pub bucket: i64,
}

/// A window's whole state: what the schedule topic holds for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowState {
    /// Start of its first bucket.
    pub from: Millis,
    /// Last instant of its last bucket.
    pub to: Millis,
    /// When it must be deleted by; `None` while it waits for its anchor.
    pub deadline: Option<Millis>,
    /// Its rule, or the right that ended it early.
    pub reason: Reason,
}

/// What changed since the journal was last drained: the state to persist for each
/// window and remembered settlement touched (`None`: it is gone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Persist {
    /// A window opened, changed or went.
    Window(WindowKey, Option<WindowState>),
    /// A settled period was remembered, or forgotten.
    Settlement {
        /// The route.
        purpose: Purpose,
        /// The subject.
        subject: String,
        /// The period's start.
        start: Millis,
        /// The period's end and the settlement's deadline, while remembered.
        period: Option<(Millis, Millis)>,
    },
}

/// A touched window or settlement, named by its subject (ids are reused).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Touched {
    Window(Purpose, String, i64),
    Settlement(Purpose, String, Millis),
}

/// What a route holds besides bare day or hour numbers. Rare, so boxed: most routes
/// never need it.
#[derive(Debug, Default)]
struct Rest {
    windows: Vec<Window>,
    settled: Vec<Settlement>,
}

/// One route's windows on one subject.
#[derive(Debug)]
struct Route {
    purpose: Purpose,
    /// Event-time rules: the UTC days of open windows. Invoice rules: the hours of
    /// windows waiting for their settlement. Ascending. Contract rules: the first and
    /// last day of the window waiting for the contract to end (every copy widens it, so
    /// it sits here rather than behind a pointer).
    numbers: SmallVec<[i32; 4]>,
    rest: Option<Box<Rest>>,
}

impl Route {
    fn new(purpose: Purpose) -> Route {
        Route {
            purpose,
            numbers: SmallVec::new(),
            rest: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.numbers.is_empty()
            && self
                .rest
                .as_ref()
                .is_none_or(|r| r.windows.is_empty() && r.settled.is_empty())
    }

    fn windows(&mut self) -> &mut Vec<Window> {
        &mut self.rest.get_or_insert_default().windows
    }

    fn window(&mut self, bucket: i64) -> Option<&mut Window> {
        self.rest
            .as_mut()?
            .windows
            .iter_mut()
            .find(|w| w.bucket == bucket)
    }
}

/// Subjects' names back to back in one buffer: millions of short strings without a heap
/// block (and its overhead) each. A freed name's bytes stay until more than half of the
/// buffer is freed; then it is compacted.
#[derive(Debug, Default)]
struct Names {
    bytes: Vec<u8>,
    freed: usize,
}

/// Where a name sits in [`Names`].
#[derive(Clone, Copy, Debug, Default)]
struct NameRef {
    off: u32,
    len: u32,
}

impl NameRef {
    /// A freed subject's name: no name is 4 GiB long.
    const FREED: NameRef = NameRef {
        off: 0,
        len: u32::MAX,
    };
}

impl Names {
    fn add(&mut self, s: &str) -> NameRef {
        let off = u32::try_from(self.bytes.len()).expect("under 4 GiB of subject names");
        self.bytes.extend_from_slice(s.as_bytes());
        NameRef {
            off,
            len: u32::try_from(s.len()).expect("a subject name under 4 GiB"),
        }
    }

    fn get(&self, r: NameRef) -> &[u8] {
        if r.len == NameRef::FREED.len {
            return &[];
        }
        &self.bytes[r.off as usize..(r.off + r.len) as usize]
    }

    fn text(&self, r: NameRef) -> String {
        // Added from a `&str`, so always UTF-8.
        String::from_utf8_lossy(self.get(r)).into_owned()
    }
}

/// Every route's windows on one subject (as the routes' copies name them; empty for
/// anonymised copies). The routes sit inline: an msisdn names the subscriber on up to
/// three routes (billing, fraud, troubleshooting), found together.
#[derive(Debug)]
struct Subject {
    name: NameRef,
    routes: SmallVec<[Route; 1]>,
}

impl Subject {
    /// False once every window is gone and the slot waits for reuse (its name is then
    /// [`NameRef::FREED`]: a flag of its own would cost 8 bytes a subject, 24 MB at ten
    /// million windows).
    fn live(&self) -> bool {
        self.name.len != NameRef::FREED.len
    }

    fn route(&mut self, p: Purpose) -> Option<&mut Route> {
        self.routes.iter_mut().find(|r| r.purpose == p)
    }
}

/// Day and hour numbers fit an `i32` for every instant a record can carry (years 0 to
/// 9999 are within +-90 million hours of 1970).
fn number(unit: i64, t: Millis) -> i32 {
    i32::try_from(t.0.div_euclid(unit)).unwrap_or(if t.0 < 0 { i32::MIN } else { i32::MAX })
}

fn unit_span(unit: i64, n: i32) -> (Millis, Millis) {
    let start = n as i64 * unit;
    (Millis(start), Millis(start + unit - 1))
}

/// Inserts into an ascending list; false if it was there.
fn insert_sorted(list: &mut SmallVec<[i32; 4]>, n: i32) -> bool {
    // Records come in time order, so the new number is almost always the last.
    match list.last() {
        Some(&l) if l < n => {
            list.push(n);
            true
        }
        None => {
            list.push(n);
            true
        }
        _ => match list.binary_search(&n) {
            Ok(_) => false,
            Err(i) => {
                list.insert(i, n);
                true
            }
        },
    }
}

/// The retention schedule of one policy.
#[derive(Debug)]
pub struct Schedule {
    policy: String,
    /// Each declared purpose's rule.
    rules: [Option<Retention>; Purpose::COUNT],
    /// Subjects by id; a free slot is reused.
    subjects: Vec<Subject>,
    /// Their names.
    names: Names,
    free: Vec<u32>,
    /// Subject ids by name.
    index: HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
    /// The subjects found last: a record's copies name the subscriber the same way on
    /// several routes (and one or two other ways on the others).
    recent: [u32; 4],
    recent_next: usize,
    /// Event-time windows by deadline: for each route and day, the subjects holding one.
    /// A subject that lost the day since (a right ended it) is skipped when it comes up.
    days_due: BTreeMap<(Millis, u8, i32), Vec<u32>>,
    /// Windows kept in full, by deadline, subject, route and bucket. An entry whose
    /// window changed since is skipped when it comes up.
    timed_due: BTreeSet<(Millis, u32, u8, i64)>,
    /// When each route's remembered settlements on a subject may be forgotten.
    forget: BTreeSet<(Millis, u32, u8)>,
    open: usize,
    /// What changed since the last drain, when a caller persists the schedule (Kafka);
    /// `None` in replay, which keeps it in memory only.
    journal: Option<Vec<Touched>>,
    /// Windows taken out as due but not yet handed out (a caller asked for fewer at a
    /// time): handed out first next time. Still in the journal's persisted state until
    /// then, so a restart fires them again rather than losing them.
    carry: std::collections::VecDeque<(Millis, Purpose, String, i64, Millis, Millis, Why)>,
}

impl Schedule {
    /// An empty schedule for a policy's copies.
    pub fn new(policy: &Policy) -> Schedule {
        let mut rules: [Option<Retention>; Purpose::COUNT] = Default::default();
        for r in policy.declared() {
            rules[r.purpose as usize] = Some(r.retention.clone());
        }
        Schedule {
            policy: policy.tag.clone(),
            rules,
            subjects: Vec::new(),
            names: Names::default(),
            free: Vec::new(),
            index: HashTable::new(),
            hasher: Default::default(),
            recent: [u32::MAX; 4],
            recent_next: 0,
            days_due: BTreeMap::new(),
            timed_due: BTreeSet::new(),
            forget: BTreeSet::new(),
            open: 0,
            journal: None,
            carry: std::collections::VecDeque::new(),
        }
    }

    /// Keeps a journal of every window and settlement that changes, for a caller that
    /// persists the schedule; see [`Schedule::drain_changes`].
    pub fn with_journal(mut self) -> Schedule {
        self.journal = Some(Vec::new());
        self
    }

    fn note(&mut self, id: u32, p: Purpose, bucket: i64) {
        if let Some(j) = self.journal.as_mut() {
            j.push(Touched::Window(
                p,
                self.names.text(self.subjects[id as usize].name),
                bucket,
            ));
        }
    }

    fn note_settlement(&mut self, id: u32, p: Purpose, start: Millis) {
        if let Some(j) = self.journal.as_mut() {
            j.push(Touched::Settlement(
                p,
                self.names.text(self.subjects[id as usize].name),
                start,
            ));
        }
    }

    /// Every window and settlement that changed since the last call, with the state to
    /// persist for it (once each, however often it changed).
    pub fn drain_changes(&mut self) -> Vec<Persist> {
        let Some(mut touched) = self.journal.as_mut().map(std::mem::take) else {
            return Vec::new();
        };
        touched.sort_unstable();
        touched.dedup();
        touched
            .into_iter()
            .map(|t| match t {
                Touched::Window(purpose, subject, bucket) => {
                    let state = self.window_state(purpose, &subject, bucket);
                    Persist::Window(
                        WindowKey {
                            purpose,
                            subject,
                            bucket,
                        },
                        state,
                    )
                }
                Touched::Settlement(purpose, subject, start) => {
                    let period = self.settlement(purpose, &subject, start);
                    Persist::Settlement {
                        purpose,
                        subject,
                        start,
                        period,
                    }
                }
            })
            .collect()
    }

    /// Marks a window as changed, so the next drain writes its whole state (a caller that
    /// wrote a partial state of it meanwhile).
    pub fn touch(&mut self, key: &WindowKey) {
        if let Some(j) = self.journal.as_mut() {
            j.push(Touched::Window(
                key.purpose,
                key.subject.clone(),
                key.bucket,
            ));
        }
    }

    /// Whether anything changed since the last drain.
    pub fn has_changes(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| !j.is_empty())
    }

    /// Whether a window is due at `now` (or taken out and waiting to be handed out).
    pub fn has_due(&self, now: Millis) -> bool {
        !self.carry.is_empty()
            || self
                .days_due
                .first_key_value()
                .is_some_and(|(k, _)| k.0 <= now)
            || self.timed_due.first().is_some_and(|k| k.0 <= now)
    }

    /// A subject's id without remembering it (for look-ups that change nothing).
    fn find_ref(&self, name: &str) -> Option<u32> {
        let h = self.hasher.hash_one(name.as_bytes());
        self.index
            .find(h, |&id| {
                self.names.get(self.subjects[id as usize].name) == name.as_bytes()
            })
            .copied()
    }

    /// The state of one window, if it is open.
    pub fn window_state(&self, p: Purpose, subject: &str, bucket: i64) -> Option<WindowState> {
        let id = self.find_ref(subject)?;
        let route = self.subjects[id as usize]
            .routes
            .iter()
            .find(|r| r.purpose == p)?;
        let rule = self.rules[p as usize].as_ref();
        let as_rule = || Reason::Rule(rule.map_or_else(String::new, |r| r.rule_id.clone()));
        if let Some(anchor) = rule.map(|r| r.anchor) {
            let n = i32::try_from(bucket).ok();
            match (anchor, &route.numbers[..]) {
                (Anchor::ContractEnd, [first, last]) if bucket == 0 => {
                    return Some(WindowState {
                        from: unit_span(DAY_MS, *first).0,
                        to: unit_span(DAY_MS, *last).1,
                        deadline: None,
                        reason: as_rule(),
                    });
                }
                (Anchor::EventTime, days) if n.is_some_and(|d| days.binary_search(&d).is_ok()) => {
                    let (from, to) = unit_span(DAY_MS, n.unwrap_or_default());
                    let deadline = rule.map(|r| event_time_deadline(r, from));
                    return Some(WindowState {
                        from,
                        to,
                        deadline,
                        reason: as_rule(),
                    });
                }
                (Anchor::InvoiceSettled, hours)
                    if n.is_some_and(|h| hours.binary_search(&h).is_ok()) =>
                {
                    let (from, to) = unit_span(HOUR_MS, n.unwrap_or_default());
                    return Some(WindowState {
                        from,
                        to,
                        deadline: None,
                        reason: as_rule(),
                    });
                }
                _ => {}
            }
        }
        let w = route
            .rest
            .as_ref()?
            .windows
            .iter()
            .find(|w| w.bucket == bucket)?;
        Some(WindowState {
            from: w.from,
            to: w.to,
            deadline: w.deadline,
            reason: match w.why {
                Why::Rule => as_rule(),
                Why::ConsentWithdrawn => Reason::ConsentWithdrawn,
                Why::Objection => Reason::Objection,
                Why::Erasure => Reason::Erasure,
            },
        })
    }

    /// A remembered settlement's period end and deadline.
    fn settlement(&self, p: Purpose, subject: &str, start: Millis) -> Option<(Millis, Millis)> {
        let id = self.find_ref(subject)?;
        let route = self.subjects[id as usize]
            .routes
            .iter()
            .find(|r| r.purpose == p)?;
        let s = route
            .rest
            .as_ref()?
            .settled
            .iter()
            .find(|s| s.start == start)?;
        Some((s.end, s.deadline))
    }

    /// Removes one window (a tombstone read back from the schedule topic); returns what
    /// it held.
    pub fn remove_window(&mut self, key: &WindowKey) -> Option<WindowState> {
        let state = self.window_state(key.purpose, &key.subject, key.bucket)?;
        let id = self.find_ref(&key.subject)?;
        let anchor = self.rules[key.purpose as usize].as_ref().map(|r| r.anchor);
        let route = self.route(id, key.purpose);
        let n = i32::try_from(key.bucket).ok();
        let in_numbers = match (anchor, n) {
            (Some(Anchor::ContractEnd), _) if key.bucket == 0 && route.numbers.len() == 2 => {
                route.numbers.clear();
                true
            }
            (Some(Anchor::EventTime | Anchor::InvoiceSettled), Some(n)) => {
                match route.numbers.binary_search(&n) {
                    Ok(i) => {
                        route.numbers.remove(i);
                        true
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        if !in_numbers && let Some(r) = route.rest.as_mut() {
            r.windows.retain(|w| w.bucket != key.bucket);
        }
        // Entries for it in the deadline indexes are skipped when they come up.
        self.open -= 1;
        self.release_if_empty(id, key.purpose);
        Some(state)
    }

    /// Puts a window back as the schedule topic holds it. A window already open under the
    /// same key (written again while its partition was being read back, with only the
    /// copies of that moment) is merged: the union of the bounds, the earlier deadline.
    pub fn restore_window(&mut self, key: &WindowKey, state: &WindowState) {
        let mut state = state.clone();
        if let Some(old) = self.remove_window(key) {
            state.from = state.from.min(old.from);
            state.to = state.to.max(old.to);
            state.deadline = match (state.deadline, old.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if matches!(state.reason, Reason::Rule(_)) {
                state.reason = old.reason;
            }
        }
        let p = key.purpose;
        let rule = self.rules[p as usize].clone();
        let id = self.subject(&key.subject);
        let why = match &state.reason {
            Reason::ConsentWithdrawn => Why::ConsentWithdrawn,
            Reason::Objection => Why::Objection,
            Reason::Erasure => Why::Erasure,
            Reason::Rule(_) => Why::Rule,
        };
        let n = i32::try_from(key.bucket).ok();
        let bare = |anchor: Anchor| match (anchor, n) {
            (Anchor::EventTime, Some(d)) => {
                why == Why::Rule
                    && (state.from, state.to) == unit_span(DAY_MS, d)
                    && rule
                        .as_ref()
                        .is_some_and(|r| state.deadline == Some(event_time_deadline(r, state.from)))
            }
            (Anchor::InvoiceSettled, Some(h)) => {
                why == Why::Rule
                    && state.deadline.is_none()
                    && (state.from, state.to) == unit_span(HOUR_MS, h)
            }
            (Anchor::ContractEnd, _) => {
                why == Why::Rule
                    && key.bucket == 0
                    && state.deadline.is_none()
                    && state.from.0.rem_euclid(DAY_MS) == 0
                    && (state.to.0 + 1).rem_euclid(DAY_MS) == 0
            }
            _ => false,
        };
        match rule.as_ref().map(|r| r.anchor) {
            Some(anchor) if bare(anchor) => {
                let route = self.route(id, p);
                match anchor {
                    Anchor::ContractEnd => route
                        .numbers
                        .extend([number(DAY_MS, state.from), number(DAY_MS, state.to)]),
                    _ => {
                        insert_sorted(&mut route.numbers, n.unwrap_or_default());
                    }
                }
                if anchor == Anchor::EventTime
                    && let Some(d) = state.deadline
                {
                    self.days_due
                        .entry((d, p as u8, n.unwrap_or_default()))
                        .or_default()
                        .push(id);
                }
            }
            _ => {
                self.route(id, p).windows().push(Window {
                    bucket: key.bucket,
                    from: state.from,
                    to: state.to,
                    deadline: state.deadline,
                    why,
                });
                if let Some(d) = state.deadline {
                    self.timed_due.insert((d, id, p as u8, key.bucket));
                }
            }
        }
        self.open += 1;
    }

    /// Puts a remembered settlement back as the schedule topic holds it.
    pub fn restore_settlement(
        &mut self,
        p: Purpose,
        subject: &str,
        start: Millis,
        end: Millis,
        deadline: Millis,
    ) {
        let id = self.subject(subject);
        let list = &mut self.route(id, p).rest.get_or_insert_default().settled;
        match list.iter_mut().find(|s| s.start == start) {
            Some(s) => {
                s.end = end;
                s.deadline = s.deadline.min(deadline);
            }
            None => list.push(Settlement {
                start,
                end,
                deadline,
            }),
        }
        self.forget.insert((deadline, id, p as u8));
    }

    /// Forgets a remembered settlement (a tombstone read back).
    pub fn remove_settlement(&mut self, p: Purpose, subject: &str, start: Millis) {
        let Some(id) = self.find_ref(subject) else {
            return;
        };
        if let Some(r) = self.route(id, p).rest.as_mut() {
            r.settled.retain(|s| s.start != start);
        }
        self.release_if_empty(id, p);
    }

    /// Whether it holds nothing: no window, no remembered settlement.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// How many windows are open (for metrics and tests).
    pub fn open_windows(&self) -> usize {
        self.open
    }

    /// The earliest deadline of a window not handed out yet, if any: a caller compares it
    /// with its clock to see how far behind firing is. It may belong to a window a right
    /// has ended since (such entries are skipped only when they come up), so it is never
    /// later than the true earliest deadline.
    pub fn earliest_deadline(&self) -> Option<Millis> {
        // The carry holds the windows of one deadline, taken out before any later one.
        let carried = self.carry.front().map(|c| c.0);
        let days = self.days_due.first_key_value().map(|(k, _)| k.0);
        let timed = self.timed_due.first().map(|k| k.0);
        [carried, days, timed].into_iter().flatten().min()
    }

    fn find(&mut self, name: &str) -> Option<u32> {
        for &id in &self.recent {
            if let Some(s) = self.subjects.get(id as usize)
                && s.live()
                && self.names.get(s.name) == name.as_bytes()
            {
                return Some(id);
            }
        }
        let h = self.hasher.hash_one(name.as_bytes());
        let (subjects, names) = (&self.subjects, &self.names);
        let id = *self.index.find(h, |&id| {
            names.get(subjects[id as usize].name) == name.as_bytes()
        })?;
        self.remember(id);
        Some(id)
    }

    fn remember(&mut self, id: u32) {
        self.recent[self.recent_next] = id;
        self.recent_next = (self.recent_next + 1) % self.recent.len();
    }

    /// The subject of a name, made if there is none.
    fn subject(&mut self, name: &str) -> u32 {
        if let Some(id) = self.find(name) {
            return id;
        }
        let subject = Subject {
            name: self.names.add(name),
            routes: SmallVec::new(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.subjects[id as usize] = subject;
                id
            }
            None => {
                self.subjects.push(subject);
                u32::try_from(self.subjects.len() - 1).expect("fewer than 2^32 subjects")
            }
        };
        let (subjects, names, hasher) = (&self.subjects, &self.names, &self.hasher);
        self.index
            .insert_unique(hasher.hash_one(name.as_bytes()), id, |&i| {
                hasher.hash_one(names.get(subjects[i as usize].name))
            });
        self.remember(id);
        id
    }

    /// A subject's route, made if there is none.
    fn route(&mut self, id: u32, p: Purpose) -> &mut Route {
        let s = &mut self.subjects[id as usize];
        match s.routes.iter().position(|r| r.purpose == p) {
            Some(i) => &mut s.routes[i],
            None => {
                s.routes.push(Route::new(p));
                s.routes.last_mut().expect("just pushed")
            }
        }
    }

    /// Drops a route that holds nothing any more, and a subject left without routes.
    fn release_if_empty(&mut self, id: u32, p: Purpose) {
        let s = &mut self.subjects[id as usize];
        if !s.live() {
            return;
        }
        s.routes.retain(|r| r.purpose != p || !r.is_empty());
        if !s.routes.is_empty() {
            return;
        }
        let h = self.hasher.hash_one(self.names.get(s.name));
        if let Ok(e) = self.index.find_entry(h, |&i| i == id) {
            e.remove();
        }
        let s = &mut self.subjects[id as usize];
        self.names.freed += s.name.len as usize;
        s.name = NameRef::FREED;
        s.routes = SmallVec::new();
        self.free.push(id);
        if self.names.freed > 1 << 20 && self.names.freed * 2 > self.names.bytes.len() {
            self.compact_names();
        }
    }

    /// Copies the live subjects' names into a fresh buffer, leaving the freed ones behind.
    fn compact_names(&mut self) {
        let mut fresh = Names::default();
        for s in self.subjects.iter_mut().filter(|s| s.live()) {
            let name = String::from_utf8_lossy(self.names.get(s.name)).into_owned();
            s.name = fresh.add(&name);
        }
        self.names = fresh;
    }

    /// The bucket and deadline of an invoice-anchored copy at `t`. Inside a remembered
    /// settled period it joins the period's merged window (or opens one) with the settled
    /// deadline. Before a remembered period, its own period was settled earlier and is
    /// already forgotten (settlements come in period order, see the README), so the
    /// earliest later settlement's deadline bounds it. Otherwise `known` decides: the
    /// deadline the subscriber's latest settlement gives a copy it covers (settlements
    /// are remembered only where the subscriber had windows), or none, and it waits.
    fn invoice_window(route: &Route, t: Millis, known: Option<Millis>) -> (i64, Option<Millis>) {
        let hour = bucket_of(Anchor::InvoiceSettled, t);
        let Some(list) = route
            .rest
            .as_ref()
            .map(|r| &r.settled)
            .filter(|l| !l.is_empty())
        else {
            return (hour, known);
        };
        if let Some(s) = list.iter().find(|s| s.start <= t && t < s.end) {
            return (bucket_of(Anchor::InvoiceSettled, s.start), Some(s.deadline));
        }
        let later = list
            .iter()
            .filter(|s| t < s.start)
            .map(|s| s.deadline)
            .min();
        (hour, later.or(known))
    }

    /// Records that a copy exists. `anchors` are what the consent table knows of the
    /// subscriber's contract end and settled invoices, so a late record on a contract- or
    /// invoice-anchored route gets its deadline at once.
    pub fn track(&mut self, e: &ScheduleEntry<'_>, anchors: Anchors) {
        let rule: &Retention = e.rule;
        let p = e.purpose;
        let id = self.subject(e.subscriber.unwrap_or(""));
        match rule.anchor {
            Anchor::EventTime => {
                let day = number(DAY_MS, e.record_time);
                if insert_sorted(&mut self.route(id, p).numbers, day) {
                    self.open += 1;
                    self.note(id, p, i64::from(day));
                    let deadline = event_time_deadline(rule, e.record_time);
                    self.days_due
                        .entry((deadline, p as u8, day))
                        .or_default()
                        .push(id);
                }
            }
            Anchor::InvoiceSettled => {
                let known = window_of(e, anchors).1;
                let (bucket, deadline) =
                    Self::invoice_window(self.route(id, p), e.record_time, known);
                let span = span_of(rule.anchor, e.record_time);
                self.place(id, p, rule.anchor, bucket, span, deadline);
            }
            Anchor::ContractEnd => {
                let (bucket, deadline) = window_of(e, anchors);
                let day = number(DAY_MS, e.record_time);
                let route = self.route(id, p);
                // A window still waiting keeps waiting (an open window keeps its
                // deadline); it only widens.
                if let [first, last] = route.numbers.as_mut_slice() {
                    let widened = day < *first || day > *last;
                    *first = (*first).min(day);
                    *last = (*last).max(day);
                    if widened {
                        self.note(id, p, 0);
                    }
                } else if deadline.is_none() && route.window(bucket).is_none() {
                    route.numbers.extend([day, day]);
                    self.open += 1;
                    self.note(id, p, 0);
                } else {
                    let span = span_of(rule.anchor, e.record_time);
                    self.place(id, p, rule.anchor, bucket, span, deadline);
                }
            }
        }
    }

    /// A copy's window on an invoice or contract route. An open window of its bucket
    /// widens and keeps its deadline: it is never earlier than the copy's own (same
    /// settlement, same contract end). A new invoice window that waits for its settlement
    /// is a bare hour; any other is kept in full.
    fn place(
        &mut self,
        id: u32,
        p: Purpose,
        anchor: Anchor,
        bucket: i64,
        (from, to): (Millis, Millis),
        deadline: Option<Millis>,
    ) {
        let route = self.route(id, p);
        // The common case first: records come in time order, so a copy mostly falls in
        // the hour already waiting last (bucket keys are unique across bare hours and
        // full windows, so no full window can hold it).
        if anchor == Anchor::InvoiceSettled
            && deadline.is_none()
            && route
                .numbers
                .last()
                .is_some_and(|&h| i64::from(h) == bucket)
            && unit_span(HOUR_MS, route.numbers[route.numbers.len() - 1]) == (from, to)
        {
            return;
        }
        if let Some(w) = route.window(bucket) {
            let before = (w.from, w.to);
            w.widen(from, to);
            if (w.from, w.to) != before {
                self.note(id, p, bucket);
            }
            return;
        }
        if anchor == Anchor::InvoiceSettled
            && let Ok(hour) = i32::try_from(bucket)
        {
            let own = unit_span(HOUR_MS, hour) == (from, to);
            if let Ok(i) = route.numbers.binary_search(&hour) {
                // Already waiting. A copy from another hour joining it (only possible
                // after a settlement whose first hour still waits) makes it a full window.
                if !own {
                    route.numbers.remove(i);
                    let (a, z) = unit_span(HOUR_MS, hour);
                    route.windows().push(Window {
                        bucket,
                        from: a.min(from),
                        to: z.max(to),
                        deadline: None,
                        why: Why::Rule,
                    });
                    self.note(id, p, bucket);
                }
                return;
            }
            if own && deadline.is_none() {
                insert_sorted(&mut route.numbers, hour);
                self.open += 1;
                self.note(id, p, bucket);
                return;
            }
        }
        route.windows().push(Window {
            bucket,
            from,
            to,
            deadline,
            why: Why::Rule,
        });
        self.open += 1;
        self.note(id, p, bucket);
        if let Some(d) = deadline {
            self.timed_due.insert((d, id, p as u8, bucket));
        }
    }

    /// Applies a control event: starts anchored clocks, or ends a route's windows early
    /// for a withdrawal, objection or erasure (deadline = the event's time).
    pub fn control(&mut self, policy: &Policy, keys: &Keyring, ev: &ControlEvent) {
        for rule in policy.declared() {
            let p = rule.purpose;
            let ends = match &ev.change {
                Change::Consent {
                    purpose,
                    granted: false,
                } if rule.consent_key == Some(*purpose) => Some(Why::ConsentWithdrawn),
                Change::Objection { purpose } if *purpose == p && rule.objection.stops => {
                    Some(Why::Objection)
                }
                Change::Erasure if rule.erasure.stops => Some(Why::Erasure),
                _ => None,
            };
            let settles = match (&ev.change, rule.retention.anchor) {
                (
                    Change::InvoiceSettled {
                        period_start,
                        period_end,
                    },
                    Anchor::InvoiceSettled,
                ) => Some((*period_start, *period_end)),
                _ => None,
            };
            let contract = matches!(
                (&ev.change, rule.retention.anchor),
                (Change::ContractEnded, Anchor::ContractEnd)
            );
            if ends.is_none() && settles.is_none() && !contract {
                continue;
            }
            // Copies written before a key rotation name the subscriber under the key of
            // their time, so their windows sit under that key's reference: the event
            // reaches every key's. A reference the same under every key (a kept msisdn)
            // is handled once.
            let mut names: Vec<(bool, Text<'_>)> = Vec::new();
            for (i, k) in keys.each_key().enumerate() {
                if let Some(s) = subscriber_ref(rule, k, &ev.msisdn)
                    && !names.iter().any(|(_, t)| t.as_str() == s.as_str())
                {
                    names.push((i == 0, s));
                }
            }
            for (active, name) in &names {
                let existing = self
                    .find(name.as_str())
                    .filter(|&id| self.subjects[id as usize].route(p).is_some());
                if let Some(why) = ends {
                    if let Some(id) = existing {
                        self.end(id, p, why, ev.at);
                    }
                } else if let Some((start, end)) = settles {
                    // Only a subject with windows on the route remembers the period (for
                    // its late records, under the active key: no copy is written under an
                    // older one any more). Late records of a subscriber with none here
                    // get the deadline from the consent table's latest settlement (see
                    // `track`), so a schedule that holds a few of millions of subscribers
                    // does not keep, and write, every settlement.
                    let Some(id) = existing else { continue };
                    let deadline = rule.retention.period.after(ev.at);
                    self.settle(id, p, start, end, deadline, *active);
                } else if let Some(id) = existing {
                    // The contract's clock: every window still waiting gets its deadline.
                    self.start_waiting(id, p, rule.retention.period.after(ev.at));
                }
            }
        }
    }

    /// Gives every window of a route still waiting for its anchor a deadline.
    fn start_waiting(&mut self, id: u32, p: Purpose, deadline: Millis) {
        let mut armed: SmallVec<[i64; 2]> = SmallVec::new();
        let route = self.route(id, p);
        // The waiting contract window becomes a full one, with its deadline.
        if let [first, last] = route.numbers[..] {
            route.numbers.clear();
            route.windows().push(Window {
                bucket: 0,
                from: unit_span(DAY_MS, first).0,
                to: unit_span(DAY_MS, last).1,
                deadline: Some(deadline),
                why: Why::Rule,
            });
            armed.push(0);
        }
        if let Some(r) = route.rest.as_mut() {
            for w in &mut r.windows {
                if w.why == Why::Rule && w.deadline.is_none() {
                    w.deadline = Some(deadline);
                    armed.push(w.bucket);
                }
            }
        }
        for b in armed {
            self.timed_due.insert((deadline, id, p as u8, b));
            self.note(id, p, b);
        }
    }

    /// Ends everything a route holds on a subject in one window, due at `at`. A window
    /// whose own deadline is at or before `at` is left to its rule: it ran out first.
    fn end(&mut self, id: u32, p: Purpose, why: Why, at: Millis) {
        let Some(rule) = self.rules[p as usize].as_ref() else {
            return;
        };
        let mut merged: Option<(Millis, Millis)> = None;
        let mut merge = |from: Millis, to: Millis| {
            merged = Some(merged.map_or((from, to), |(a, z)| (a.min(from), z.max(to))));
        };
        let Some(route) = self.subjects[id as usize].route(p) else {
            return;
        };
        // The buckets of the windows merged away, for the journal.
        let mut gone: Vec<i64> = Vec::new();
        match rule.anchor {
            Anchor::EventTime => route.numbers.retain(|d| {
                let (from, to) = unit_span(DAY_MS, *d);
                let open = event_time_deadline(rule, from) > at;
                if open {
                    merge(from, to);
                    gone.push(i64::from(*d));
                }
                !open
            }),
            // Waiting hours have no deadline yet: every one is open.
            Anchor::InvoiceSettled => {
                for h in route.numbers.drain(..) {
                    let (from, to) = unit_span(HOUR_MS, h);
                    merge(from, to);
                    gone.push(i64::from(h));
                }
            }
            // The waiting contract window (its first and last day) is one window.
            Anchor::ContractEnd => {
                if let [first, last] = route.numbers[..] {
                    route.numbers.clear();
                    merge(unit_span(DAY_MS, first).0, unit_span(DAY_MS, last).1);
                    gone.push(0);
                }
            }
        }
        if let Some(r) = route.rest.as_mut() {
            r.windows.retain(|w| {
                let open = w.why == Why::Rule && w.deadline.is_none_or(|d| d > at);
                if open {
                    merge(w.from, w.to);
                    gone.push(w.bucket);
                }
                !open
            });
        }
        self.open -= gone.len();
        let mut ended = None;
        if let Some((from, to)) = merged {
            let key = ENDED_BASE + at.0;
            ended = Some(key);
            match route.window(key) {
                // Two rights at the same instant end the same copies once.
                Some(w) => w.widen(from, to),
                None => {
                    route.windows().push(Window {
                        bucket: key,
                        from,
                        to,
                        deadline: Some(at),
                        why,
                    });
                    self.open += 1;
                    self.timed_due.insert((at, id, p as u8, key));
                }
            }
        }
        for b in gone.into_iter().chain(ended) {
            self.note(id, p, b);
        }
        self.release_if_empty(id, p);
    }

    /// Settles an invoice period: its hour windows still waiting become one window, due
    /// at `deadline`, and the period is remembered until then for late records if
    /// `remember` (records are written under the active key only).
    fn settle(
        &mut self,
        id: u32,
        p: Purpose,
        start: Millis,
        end: Millis,
        deadline: Millis,
        remember: bool,
    ) {
        let route = self.route(id, p);
        let deadline = if remember {
            let list = &mut route.rest.get_or_insert_default().settled;
            // A repeated settlement of the same period does not restart its clock.
            let deadline = match list.iter_mut().find(|s| s.start == start && s.end == end) {
                Some(s) => {
                    s.deadline = s.deadline.min(deadline);
                    s.deadline
                }
                None => {
                    list.push(Settlement {
                        start,
                        end,
                        deadline,
                    });
                    deadline
                }
            };
            self.forget.insert((deadline, id, p as u8));
            self.note_settlement(id, p, start);
            deadline
        } else {
            deadline
        };
        let route = self.route(id, p);
        // Periods are hour-aligned (control events refuse others), so an hour window is
        // either inside the period or outside it.
        let mut merged: Option<(Millis, Millis)> = None;
        let mut merge = |from: Millis, to: Millis| {
            merged = Some(merged.map_or((from, to), |(a, z)| (a.min(from), z.max(to))));
        };
        // The buckets of the windows merged away, for the journal.
        let mut gone: Vec<i64> = Vec::new();
        route.numbers.retain(|h| {
            let (from, to) = unit_span(HOUR_MS, *h);
            let inside = from >= start && to < end;
            if inside {
                merge(from, to);
                gone.push(i64::from(*h));
            }
            !inside
        });
        if let Some(r) = route.rest.as_mut() {
            r.windows.retain(|w| {
                let inside =
                    w.why == Why::Rule && w.deadline.is_none() && w.from >= start && w.to < end;
                if inside {
                    merge(w.from, w.to);
                    gone.push(w.bucket);
                }
                !inside
            });
        }
        let removed = gone.len();
        let Some((from, to)) = merged else {
            self.open -= removed;
            return;
        };
        let key = bucket_of(Anchor::InvoiceSettled, start);
        let (rearm, added) = match route.window(key) {
            // The period's first hour already holds a window with a deadline (an earlier
            // settlement of the period, or a late record bounded by a later one): the
            // earlier deadline holds for both.
            Some(w) => {
                w.widen(from, to);
                let old = w.deadline;
                w.deadline = Some(old.map_or(deadline, |d| d.min(deadline)));
                ((old != w.deadline).then_some(w.deadline).flatten(), 0)
            }
            None => {
                route.windows().push(Window {
                    bucket: key,
                    from,
                    to,
                    deadline: Some(deadline),
                    why: Why::Rule,
                });
                (Some(deadline), 1)
            }
        };
        self.open = self.open + added - removed;
        if let Some(d) = rearm {
            self.timed_due.insert((d, id, p as u8, key));
        }
        for b in gone.into_iter().chain([key]) {
            self.note(id, p, b);
        }
    }

    /// Removes and returns every window whose deadline is at or before `now`, deadline
    /// first (then route, subject and bucket). Each window yields exactly one expiry.
    /// Settlements whose deadline passed are forgotten: a record of theirs arriving now is
    /// refused by `process`.
    pub fn due(&mut self, now: Millis) -> Vec<Expiry> {
        let mut out = Vec::new();
        let _ = self.due_each(now, |e| {
            out.push(e);
            Ok::<(), std::convert::Infallible>(())
        });
        out
    }

    /// [`Schedule::due`] handing each expiry to `emit` as it is made, so that millions due
    /// at once are never held together; stops at `emit`'s first error.
    pub fn due_each<E>(
        &mut self,
        now: Millis,
        mut emit: impl FnMut(Expiry) -> Result<(), E>,
    ) -> Result<(), E> {
        self.due_keyed(now, usize::MAX, |_, e| emit(e)).map(drop)
    }

    /// [`Schedule::due_each`] for a caller that persists the schedule: each expiry comes
    /// with its window's bucket (with the route and subject, the window's key), and at
    /// most `limit` come at a time, so firing a million windows due at once can be spread
    /// over many transactions. Windows taken out but not handed out yet are handed out
    /// first next time (and stay in the persisted state until then). Returns how many
    /// were handed out.
    pub fn due_keyed<E>(
        &mut self,
        now: Millis,
        limit: usize,
        mut emit: impl FnMut(i64, Expiry) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut handed = 0;
        loop {
            while handed < limit {
                let Some((deadline, purpose, subject, bucket, from, to, why)) =
                    self.carry.pop_front()
                else {
                    break;
                };
                if let Some(j) = self.journal.as_mut() {
                    j.push(Touched::Window(purpose, subject.clone(), bucket));
                }
                let reason = match why {
                    Why::ConsentWithdrawn => Reason::ConsentWithdrawn,
                    Why::Objection => Reason::Objection,
                    Why::Erasure => Reason::Erasure,
                    Why::Rule => Reason::Rule(
                        self.rules[purpose as usize]
                            .as_ref()
                            .map_or_else(String::new, |r| r.rule_id.clone()),
                    ),
                };
                handed += 1;
                emit(
                    bucket,
                    Expiry {
                        kind: "retention_expired",
                        route: purpose.id(),
                        purpose,
                        subscriber: (!subject.is_empty()).then_some(subject),
                        window_start: from,
                        window_end: to,
                        deadline,
                        reason,
                        policy: self.policy.clone(),
                    },
                )?;
            }
            if handed >= limit || !self.take_next_due(now) {
                break;
            }
        }
        self.forget_settled(now);
        Ok(handed)
    }

    /// Takes every window of the earliest deadline at or before `now` out of the schedule
    /// into `carry`, in route, subject and bucket order; false if none is due.
    fn take_next_due(&mut self, now: Millis) -> bool {
        let next = match (
            self.days_due.first_key_value().map(|(k, _)| k.0),
            self.timed_due.first().map(|k| k.0),
        ) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return false,
        };
        if next > now {
            return false;
        }
        let mut batch: Vec<(Purpose, String, i64, Millis, Millis, Why)> = Vec::new();
        while let Some(e) = self.days_due.first_entry() {
            if e.key().0 != next {
                break;
            }
            let ((_, p, day), ids) = e.remove_entry();
            let p = Purpose::ALL[p as usize];
            for id in ids {
                let s = &mut self.subjects[id as usize];
                if !s.live() {
                    continue;
                }
                let name = s.name;
                let Some(route) = s.routes.iter_mut().find(|r| r.purpose == p) else {
                    continue;
                };
                let Ok(i) = route.numbers.binary_search(&day) else {
                    continue;
                };
                route.numbers.remove(i);
                let (from, to) = unit_span(DAY_MS, day);
                batch.push((
                    p,
                    self.names.text(name),
                    i64::from(day),
                    from,
                    to,
                    Why::Rule,
                ));
                self.open -= 1;
                self.release_if_empty(id, p);
            }
        }
        while let Some(&(d, id, p, bucket)) = self.timed_due.first() {
            if d != next {
                break;
            }
            self.timed_due.pop_first();
            let p = Purpose::ALL[p as usize];
            let s = &mut self.subjects[id as usize];
            if !s.live() {
                continue;
            }
            let name = s.name;
            let Some(r) = s
                .routes
                .iter_mut()
                .find(|r| r.purpose == p)
                .and_then(|r| r.rest.as_mut())
            else {
                continue;
            };
            let Some(i) = r
                .windows
                .iter()
                .position(|w| w.bucket == bucket && w.deadline == Some(d))
            else {
                continue;
            };
            let w = r.windows.swap_remove(i);
            batch.push((p, self.names.text(name), w.bucket, w.from, w.to, w.why));
            self.open -= 1;
            self.release_if_empty(id, p);
        }
        batch.sort_unstable_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
        self.carry.extend(
            batch
                .into_iter()
                .map(|(p, subject, bucket, from, to, why)| {
                    (next, p, subject, bucket, from, to, why)
                }),
        );
        true
    }

    /// Forgets the settlements whose deadline passed.
    fn forget_settled(&mut self, now: Millis) {
        while self.forget.first().is_some_and(|f| f.0 <= now) {
            let Some((_, id, p)) = self.forget.pop_first() else {
                break;
            };
            let p = Purpose::ALL[p as usize];
            let s = &mut self.subjects[id as usize];
            if !s.live() {
                continue;
            }
            let mut gone: Vec<Millis> = Vec::new();
            if let Some(r) = s.route(p).and_then(|r| r.rest.as_mut()) {
                r.settled.retain(|s| {
                    let keep = s.deadline > now;
                    if !keep {
                        gone.push(s.start);
                    }
                    keep
                });
            }
            for start in gone {
                self.note_settlement(id, p, start);
            }
            self.release_if_empty(id, p);
        }
    }

    /// Subjects with remembered settlements on a route (for tests).
    #[cfg(test)]
    fn remembered(&self, p: Purpose) -> Vec<&str> {
        self.subjects
            .iter()
            .filter(|s| {
                s.live()
                    && s.routes.iter().any(|r| {
                        r.purpose == p && r.rest.as_ref().is_some_and(|x| !x.settled.is_empty())
                    })
            })
            .map(|s| std::str::from_utf8(self.names.get(s.name)).unwrap_or_default())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pseudonym::MasterKey;

    const M: &str = "+46701234567";
    const OTHER: &str = "+46701112233";

    fn policy(name: &str) -> Policy {
        let text = crate::policy::shipped(name).expect("shipped policy");
        crate::policy::parse_policy(text, name).expect("policy loads")
    }

    fn keys() -> Keyring {
        Keyring::new(&[MasterKey::new("t", &[9u8; 32]).expect("key")]).expect("keyring")
    }

    fn t(s: &str) -> Millis {
        Millis::parse(s).expect("time")
    }

    /// The schedule under test with the policy and keys its control events need, and
    /// the consent table's view of each subscriber (its settlements), kept as a run
    /// keeps it: every control event reaches both.
    struct Fixture {
        policy: Policy,
        keys: Keyring,
        s: Schedule,
        states: std::collections::HashMap<String, crate::core::control::SubscriberState>,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            Fixture::with_policy(policy(name))
        }

        fn with_policy(policy: Policy) -> Fixture {
            let s = Schedule::new(&policy);
            Fixture {
                policy,
                keys: keys(),
                s,
                states: Default::default(),
            }
        }

        /// How the route's copies (and expiries) name `msisdn`.
        fn subject(&self, p: Purpose, msisdn: &str) -> String {
            let rule = self.policy.rule(p).expect("declared");
            subscriber_ref(rule, &self.keys, msisdn)
                .expect("the route names its subscriber")
                .as_str()
                .to_string()
        }

        fn copy(&mut self, p: Purpose, msisdn: &str, at: &str, contract_ended: Option<Millis>) {
            let subject = self.subject(p, msisdn);
            let rule = &self.policy.rule(p).expect("declared").retention;
            let e = ScheduleEntry {
                purpose: p,
                subscriber: Some(&subject),
                record_time: t(at),
                rule,
            };
            let settled = self.states.get(msisdn).and_then(|s| s.settled);
            self.s.track(
                &e,
                Anchors {
                    contract_ended,
                    settled,
                },
            );
        }

        fn control(&mut self, msisdn: &str, at: &str, change: Change) {
            let ev = ControlEvent {
                msisdn: msisdn.into(),
                at: t(at),
                change,
            };
            self.states
                .entry(msisdn.to_string())
                .or_default()
                .apply(&ev.change, ev.at);
            self.s.control(&self.policy, &self.keys, &ev);
        }

        fn settle(&mut self, msisdn: &str, at: &str, start: &str, end: &str) {
            let change = Change::InvoiceSettled {
                period_start: t(start),
                period_end: t(end),
            };
            self.control(msisdn, at, change);
        }

        fn due(&mut self, now: &str) -> Vec<Expiry> {
            self.s.due(t(now))
        }
    }

    /// `(route, window_start, window_end, deadline, reason)` of each expiry, as text.
    fn brief(es: &[Expiry]) -> Vec<(&'static str, String, String, String, String)> {
        es.iter()
            .map(|e| {
                let reason = match &e.reason {
                    Reason::Rule(r) => r.clone(),
                    other => serde_json::to_value(other)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                };
                (
                    e.route,
                    e.window_start.to_string(),
                    e.window_end.to_string(),
                    e.deadline.to_string(),
                    reason,
                )
            })
            .collect()
    }

    fn row(
        route: &'static str,
        from: &str,
        to: &str,
        deadline: &str,
        reason: &str,
    ) -> (&'static str, String, String, String, String) {
        (
            route,
            from.into(),
            to.into(),
            deadline.into(),
            reason.into(),
        )
    }

    #[test]
    fn spans_are_whole_utc_days_or_hours() {
        let (a, b) = span_of(Anchor::EventTime, t("2026-03-02T10:15:30.250Z"));
        assert_eq!(
            (a.to_string(), b.to_string()),
            (
                "2026-03-02T00:00:00.000Z".into(),
                "2026-03-02T23:59:59.999Z".into()
            )
        );
        let (a, b) = span_of(Anchor::InvoiceSettled, t("2026-03-02T10:15:30.250Z"));
        assert_eq!(
            (a.to_string(), b.to_string()),
            (
                "2026-03-02T10:00:00.000Z".into(),
                "2026-03-02T10:59:59.999Z".into()
            )
        );
        // Contract windows are one bucket, but their bounds are still whole days.
        assert_eq!(
            span_of(Anchor::ContractEnd, t("2026-03-02T10:15:30.250Z")),
            span_of(Anchor::EventTime, t("2026-03-02T00:00:00.000Z"))
        );
        // Before the epoch too.
        let (a, _) = span_of(Anchor::EventTime, t("1969-12-31T23:00:00.000Z"));
        assert_eq!(a.to_string(), "1969-12-31T00:00:00.000Z");
    }

    #[test]
    fn expiries_carry_bucket_bounds_never_record_times() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Fraud, M, "2026-03-02T10:15:30.250Z", None);
        f.copy(Purpose::Fraud, M, "2026-03-02T17:42:01.999Z", None);
        f.copy(Purpose::Billing, M, "2026-03-02T10:15:30.250Z", None);
        f.settle(
            M,
            "2026-04-15T08:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        let got = f.due("2027-01-01T00:00:00.000Z");
        assert_eq!(
            brief(&got),
            vec![
                row(
                    "fraud",
                    "2026-03-02T00:00:00.000Z",
                    "2026-03-02T23:59:59.999Z",
                    "2026-09-03T00:00:00.000Z",
                    "excedo.fraud"
                ),
                row(
                    "billing",
                    "2026-03-02T10:00:00.000Z",
                    "2026-03-02T10:59:59.999Z",
                    "2026-10-15T08:00:00.000Z",
                    "excedo.billing"
                ),
            ]
        );
        for e in &got {
            assert_eq!(e.window_start.0 % HOUR_MS, 0, "{e:?}");
            assert_eq!((e.window_end.0 + 1) % HOUR_MS, 0, "{e:?}");
        }
    }

    /// The key file after a rotation: a new key first, the fixture's old key after it.
    fn rotated() -> Keyring {
        Keyring::new(&[
            MasterKey::new("new", &[10u8; 32]).expect("key"),
            MasterKey::new("t", &[9u8; 32]).expect("key"),
        ])
        .expect("keyring")
    }

    /// `(route, subscriber, window_start, deadline, reason)` of each expiry, sorted.
    fn named(es: &[Expiry]) -> Vec<(&'static str, String, String, String, String)> {
        let mut out: Vec<_> = es
            .iter()
            .map(|e| {
                let reason = serde_json::to_value(&e.reason).expect("reason");
                (
                    e.route,
                    e.subscriber
                        .clone()
                        .expect("a route that names its subscriber"),
                    e.window_start.to_string(),
                    e.deadline.to_string(),
                    reason.as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn named_row(
        route: &'static str,
        who: &str,
        from: &str,
        deadline: &str,
        reason: &str,
    ) -> (&'static str, String, String, String, String) {
        (
            route,
            who.into(),
            from.into(),
            deadline.into(),
            reason.into(),
        )
    }

    /// Regression: a right looked for windows only under the active key's reference, so
    /// after a rotation the windows of copies written under the old key (and the copies
    /// downstream) were never ended early.
    #[test]
    fn rights_reach_windows_written_under_an_older_key() {
        let mut f = Fixture::new("excedo");
        let (a, mk, ts) = (
            Purpose::Analytics,
            Purpose::Marketing,
            Purpose::Troubleshooting,
        );
        for p in [a, mk, ts] {
            f.copy(p, M, "2026-03-02T09:00:00.000Z", None);
        }
        let (old_a, old_mk) = (f.subject(a, M), f.subject(mk, M));
        f.keys = rotated();
        for p in [a, mk] {
            f.copy(p, M, "2026-03-03T09:00:00.000Z", None);
        }
        let (new_a, new_mk) = (f.subject(a, M), f.subject(mk, M));
        assert!(new_a != old_a && new_mk != old_mk, "the rotation renames");
        let withdraw = Change::Consent {
            purpose: a,
            granted: false,
        };
        f.control(M, "2026-03-05T12:00:00.000Z", withdraw);
        f.control(M, "2026-03-06T00:00:00.000Z", Change::Erasure);
        let (d2, d3) = ("2026-03-02T00:00:00.000Z", "2026-03-03T00:00:00.000Z");
        let (withdrawn, erased) = ("2026-03-05T12:00:00.000Z", "2026-03-06T00:00:00.000Z");
        let mut want = vec![
            named_row("analytics", &old_a, d2, withdrawn, "consent_withdrawn"),
            named_row("analytics", &new_a, d3, withdrawn, "consent_withdrawn"),
            named_row("marketing", &old_mk, d2, erased, "erasure"),
            named_row("marketing", &new_mk, d3, erased, "erasure"),
            // Troubleshooting keeps the msisdn: the same under both keys, ended once.
            named_row("troubleshooting", M, d2, erased, "erasure"),
        ];
        want.sort();
        assert_eq!(named(&f.due(erased)), want);
        assert_eq!(f.s.open_windows(), 0);
    }

    /// The same for anchored clocks: a contract end or a settlement starts the windows
    /// written under an older key too, or they would wait for ever. The shipped policies
    /// keep the msisdn on their contract and invoice routes, so this one pseudonymises it.
    #[test]
    fn contract_ends_and_settlements_reach_windows_written_under_an_older_key() {
        let text = crate::policy::shipped("excedo").expect("shipped policy");
        let pseudonymised = text
            .replace(
                "msisdn = { treatment = \"keep\", assumption = 'The user who reports the fault.' }",
                "msisdn = { treatment = \"pseudonymise\", assumption = 'Test.' }",
            )
            .replace(
                "msisdn = { treatment = \"keep\", assumption = 'The invoiced user.' }",
                "msisdn = { treatment = \"pseudonymise\", assumption = 'Test.' }",
            );
        assert_ne!(pseudonymised, text);
        let policy = crate::policy::parse_policy(&pseudonymised, "x").expect("policy loads");
        let mut f = Fixture::with_policy(policy);
        let (b, ts) = (Purpose::Billing, Purpose::Troubleshooting);
        f.copy(ts, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(b, M, "2026-03-02T09:00:00.000Z", None);
        let (old_ts, old_b) = (f.subject(ts, M), f.subject(b, M));
        f.keys = rotated();
        f.copy(ts, M, "2026-03-20T09:00:00.000Z", None);
        f.copy(b, M, "2026-03-20T09:00:00.000Z", None);
        let (new_ts, new_b) = (f.subject(ts, M), f.subject(b, M));
        assert!(new_ts != old_ts && new_b != old_b, "the rotation renames");
        f.settle(
            M,
            "2026-04-15T00:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        // The settled period is remembered for late records under the active key only:
        // no record is written under the old key again.
        let remembered: Vec<&str> = f.s.remembered(b);
        assert_eq!(remembered, [new_b.as_str()]);
        f.control(M, "2026-06-30T00:00:00.000Z", Change::ContractEnded);
        let (d2, d20) = ("2026-03-02T00:00:00.000Z", "2026-03-20T00:00:00.000Z");
        let (h2, h20) = ("2026-03-02T09:00:00.000Z", "2026-03-20T09:00:00.000Z");
        let (paid, ended) = ("2026-10-15T00:00:00.000Z", "2027-06-30T00:00:00.000Z");
        let mut want = vec![
            named_row("billing", &old_b, h2, paid, "excedo.billing"),
            named_row("billing", &new_b, h20, paid, "excedo.billing"),
            named_row(
                "troubleshooting",
                &old_ts,
                d2,
                ended,
                "excedo.troubleshooting",
            ),
            named_row(
                "troubleshooting",
                &new_ts,
                d20,
                ended,
                "excedo.troubleshooting",
            ),
        ];
        want.sort();
        assert_eq!(named(&f.due(ended)), want);
        assert_eq!(f.s.open_windows(), 0);
    }

    #[test]
    fn a_right_ends_every_open_window_of_the_route_in_one_expiry_at_the_event() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Analytics, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(Purpose::Analytics, M, "2026-03-04T21:30:00.000Z", None);
        f.copy(Purpose::Analytics, OTHER, "2026-03-02T09:00:00.000Z", None);
        f.copy(Purpose::Fraud, M, "2026-03-02T09:00:00.000Z", None);
        let withdraw = Change::Consent {
            purpose: Purpose::Analytics,
            granted: false,
        };
        f.control(M, "2026-03-05T12:00:00.000Z", withdraw.clone());
        let got = f.due("2026-03-05T12:00:00.000Z");
        assert_eq!(
            brief(&got),
            vec![row(
                "analytics",
                "2026-03-02T00:00:00.000Z",
                "2026-03-04T23:59:59.999Z",
                "2026-03-05T12:00:00.000Z",
                "consent_withdrawn"
            )]
        );
        assert_eq!(
            got[0].subscriber.as_deref(),
            Some(f.subject(Purpose::Analytics, M).as_str())
        );
        // Nothing before the deadline, and each window once.
        assert!(f.due("2026-03-05T12:00:00.000Z").is_empty());
        // The other subscriber's window and the fraud window run on.
        assert_eq!(f.s.open_windows(), 2);
    }

    #[test]
    fn rights_keep_their_own_expiries_and_the_same_instant_merges() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Marketing, M, "2026-03-02T09:00:00.000Z", None);
        // Objection and withdrawal at the same instant: one expiry, not two.
        f.control(
            M,
            "2026-03-03T12:00:00.000Z",
            Change::Objection {
                purpose: Purpose::Marketing,
            },
        );
        f.control(
            M,
            "2026-03-03T12:00:00.000Z",
            Change::Consent {
                purpose: Purpose::Marketing,
                granted: false,
            },
        );
        // A later record (consent given again) and a later erasure: its own expiry; the
        // erasure does not relabel or re-time the objection's window (ENDED_BASE bucket).
        f.copy(Purpose::Marketing, M, "2026-03-06T09:00:00.000Z", None);
        f.control(M, "2026-03-07T00:00:00.000Z", Change::Erasure);
        assert_eq!(
            brief(&f.due("2026-04-01T00:00:00.000Z")),
            vec![
                row(
                    "marketing",
                    "2026-03-02T00:00:00.000Z",
                    "2026-03-02T23:59:59.999Z",
                    "2026-03-03T12:00:00.000Z",
                    "objection"
                ),
                row(
                    "marketing",
                    "2026-03-06T00:00:00.000Z",
                    "2026-03-06T23:59:59.999Z",
                    "2026-03-07T00:00:00.000Z",
                    "erasure"
                ),
            ]
        );
        assert_eq!(f.s.open_windows(), 0);
    }

    #[test]
    fn a_right_leaves_a_window_already_past_its_own_deadline_to_its_rule() {
        let mut f = Fixture::new("excedo");
        // Analytics: 12 months after the day's end, so due 2027-03-03.
        f.copy(Purpose::Analytics, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(Purpose::Analytics, M, "2027-03-10T09:00:00.000Z", None);
        f.control(M, "2027-03-20T00:00:00.000Z", Change::Erasure);
        assert_eq!(
            brief(&f.due("2027-03-20T00:00:00.000Z")),
            vec![
                row(
                    "analytics",
                    "2026-03-02T00:00:00.000Z",
                    "2026-03-02T23:59:59.999Z",
                    "2027-03-03T00:00:00.000Z",
                    "excedo.analytics"
                ),
                row(
                    "analytics",
                    "2027-03-10T00:00:00.000Z",
                    "2027-03-10T23:59:59.999Z",
                    "2027-03-20T00:00:00.000Z",
                    "erasure"
                ),
            ]
        );
    }

    #[test]
    fn erasure_spares_routes_held_by_legal_obligation() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Fraud, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(Purpose::Billing, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-03-02T09:00:00.000Z",
            None,
        );
        f.control(M, "2026-03-03T00:00:00.000Z", Change::Erasure);
        assert_eq!(
            brief(&f.due("2026-03-03T00:00:00.000Z")),
            vec![row(
                "troubleshooting",
                "2026-03-02T00:00:00.000Z",
                "2026-03-02T23:59:59.999Z",
                "2026-03-03T00:00:00.000Z",
                "erasure"
            )]
        );
        assert_eq!(f.s.open_windows(), 2);
    }

    #[test]
    fn settlement_merges_the_periods_hour_windows_into_one_and_nothing_else() {
        let mut f = Fixture::new("excedo");
        for at in [
            "2026-02-28T23:30:00.000Z", // previous period
            "2026-03-02T10:15:00.000Z",
            "2026-03-02T10:45:00.000Z",
            "2026-03-17T23:00:00.000Z",
            "2026-03-31T23:59:59.999Z",
            "2026-04-01T00:00:00.000Z", // next period
        ] {
            f.copy(Purpose::Billing, M, at, None);
        }
        f.copy(Purpose::Billing, OTHER, "2026-03-02T10:20:00.000Z", None);
        assert_eq!(f.s.open_windows(), 6);
        f.settle(
            M,
            "2026-04-15T08:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        // One March window for M; February, April and the other subscriber still wait.
        assert_eq!(f.s.open_windows(), 4);
        assert_eq!(
            brief(&f.due("2030-01-01T00:00:00.000Z")),
            vec![row(
                "billing",
                "2026-03-02T10:00:00.000Z",
                "2026-03-31T23:59:59.999Z",
                "2026-10-15T08:00:00.000Z",
                "excedo.billing"
            )]
        );
    }

    #[test]
    fn a_record_after_its_settlement_gets_the_settled_deadline_at_once() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Billing, M, "2026-03-02T10:15:00.000Z", None);
        f.settle(
            M,
            "2026-04-15T08:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        // Late: joins the period's window, which keeps its deadline.
        f.copy(Purpose::Billing, M, "2026-03-20T08:00:00.000Z", None);
        assert_eq!(f.s.open_windows(), 1);
        // A period settled before any of its copies arrived: the late copy's window is due
        // at that settlement's deadline, not left waiting.
        f.settle(
            OTHER,
            "2026-04-16T00:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        f.copy(Purpose::Billing, OTHER, "2026-03-05T10:00:00.000Z", None);
        assert!(f.due("2026-10-15T07:59:59.999Z").is_empty());
        assert_eq!(
            brief(&f.due("2026-10-16T00:00:00.000Z")),
            vec![
                row(
                    "billing",
                    "2026-03-02T10:00:00.000Z",
                    "2026-03-20T08:59:59.999Z",
                    "2026-10-15T08:00:00.000Z",
                    "excedo.billing"
                ),
                row(
                    "billing",
                    "2026-03-05T10:00:00.000Z",
                    "2026-03-05T10:59:59.999Z",
                    "2026-10-16T00:00:00.000Z",
                    "excedo.billing"
                ),
            ]
        );
        // Past their deadlines the settlements are forgotten: memory stays bounded.
        assert!(Purpose::ALL.iter().all(|p| f.s.remembered(*p).is_empty()));
        assert!(f.s.forget.is_empty(), "nothing left to forget");
    }

    #[test]
    fn a_settlement_is_remembered_where_its_subscriber_has_windows_until_its_deadline() {
        let mut f = Fixture::new("excedo");
        f.s = Schedule::new(&f.policy).with_journal();
        f.copy(Purpose::Billing, M, "2026-03-02T10:15:00.000Z", None);
        for who in [M, OTHER] {
            f.settle(
                who,
                "2026-04-15T08:00:00.000Z",
                "2026-03-01T00:00:00.000Z",
                "2026-04-01T00:00:00.000Z",
            );
        }
        // A partition's schedule sees every subscriber's settlements, but holds windows
        // of few: only those are remembered (and written to the schedule topic).
        assert_eq!(
            f.s.remembered(Purpose::Billing),
            [f.subject(Purpose::Billing, M)]
        );
        let settlements: Vec<String> =
            f.s.drain_changes()
                .into_iter()
                .filter_map(|c| match c {
                    Persist::Settlement { subject, .. } => Some(subject),
                    Persist::Window(..) => None,
                })
                .collect();
        assert_eq!(settlements, [f.subject(Purpose::Billing, M)]);
        // A late record of the other subscriber still gets the settled deadline, from
        // the consent table's view of it.
        f.copy(Purpose::Billing, OTHER, "2026-03-20T10:00:00.000Z", None);
        assert!(f.due("2026-10-15T07:59:59.999Z").is_empty());
        assert_eq!(f.s.remembered(Purpose::Billing).len(), 1);
        assert_eq!(f.due("2026-10-15T08:00:00.000Z").len(), 2);
        assert!(f.s.remembered(Purpose::Billing).is_empty());
    }

    #[test]
    fn a_late_record_before_a_remembered_period_is_bounded_by_it() {
        let mut f = Fixture::new("excedo");
        f.settle(
            M,
            "2026-05-15T08:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
            "2026-05-01T00:00:00.000Z",
        );
        // March was settled before April (in order) and is no longer remembered: April's
        // deadline bounds it, so it never waits for ever.
        f.copy(Purpose::Billing, M, "2026-03-10T10:00:00.000Z", None);
        // After every remembered period: its own settlement is still to come.
        f.copy(Purpose::Billing, M, "2026-05-10T10:00:00.000Z", None);
        assert_eq!(
            brief(&f.due("2030-01-01T00:00:00.000Z")),
            vec![row(
                "billing",
                "2026-03-10T10:00:00.000Z",
                "2026-03-10T10:59:59.999Z",
                "2026-11-15T08:00:00.000Z",
                "excedo.billing"
            )]
        );
        assert_eq!(f.s.open_windows(), 1);
    }

    #[test]
    fn settling_a_period_again_does_not_restart_its_clock() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Billing, M, "2026-03-02T10:15:00.000Z", None);
        let settle = |f: &mut Fixture, at| {
            f.settle(
                M,
                at,
                "2026-03-01T00:00:00.000Z",
                "2026-04-01T00:00:00.000Z",
            )
        };
        settle(&mut f, "2026-04-15T08:00:00.000Z");
        f.copy(Purpose::Billing, M, "2026-03-03T10:15:00.000Z", None);
        settle(&mut f, "2026-05-20T00:00:00.000Z");
        let got = f.due("2030-01-01T00:00:00.000Z");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].deadline, t("2026-10-15T08:00:00.000Z"));
        assert_eq!(got[0].window_end, t("2026-03-03T10:59:59.999Z"));
    }

    #[test]
    fn contract_end_starts_the_waiting_window_and_dates_late_records() {
        let mut f = Fixture::new("excedo");
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-03-02T09:00:00.000Z",
            None,
        );
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-05-20T18:00:00.000Z",
            None,
        );
        // No clock before the contract ends.
        assert!(f.due("2100-01-01T00:00:00.000Z").is_empty());
        f.control(M, "2026-06-30T00:00:00.000Z", Change::ContractEnded);
        // A late record joins the one contract window.
        let ended = Some(t("2026-06-30T00:00:00.000Z"));
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-06-29T23:00:00.000Z",
            ended,
        );
        assert!(f.due("2027-06-29T23:59:59.999Z").is_empty());
        assert_eq!(
            brief(&f.due("2027-06-30T00:00:00.000Z")),
            vec![row(
                "troubleshooting",
                "2026-03-02T00:00:00.000Z",
                "2026-06-29T23:59:59.999Z",
                "2027-06-30T00:00:00.000Z",
                "excedo.troubleshooting"
            )]
        );
        // A record arriving after that expiry opens a new window with the deadline at once.
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-06-29T23:30:00.000Z",
            ended,
        );
        assert_eq!(
            brief(&f.due("2027-07-01T00:00:00.000Z")),
            vec![row(
                "troubleshooting",
                "2026-06-29T00:00:00.000Z",
                "2026-06-29T23:59:59.999Z",
                "2027-06-30T00:00:00.000Z",
                "excedo.troubleshooting"
            )]
        );
    }

    #[test]
    fn due_is_deadline_ordered_never_early_and_emits_each_window_once() {
        let mut f = Fixture::new("hektor-mobil");
        // Troubleshooting: 180 days after the day's end; fraud: 6 months.
        f.copy(Purpose::Fraud, M, "2026-03-05T09:00:00.000Z", None);
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-03-02T09:00:00.000Z",
            None,
        );
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-03-01T09:00:00.000Z",
            None,
        );
        let deadlines = |es: &[Expiry]| es.iter().map(|e| e.deadline).collect::<Vec<_>>();
        // One millisecond before the first deadline: nothing.
        assert!(f.due("2026-08-28T23:59:59.999Z").is_empty());
        let first = f.due("2026-08-29T00:00:00.000Z");
        assert_eq!(deadlines(&first), vec![t("2026-08-29T00:00:00.000Z")]);
        let rest = f.due("2027-01-01T00:00:00.000Z");
        assert_eq!(
            deadlines(&rest),
            vec![t("2026-08-30T00:00:00.000Z"), t("2026-09-06T00:00:00.000Z")]
        );
        assert!(f.due("2030-01-01T00:00:00.000Z").is_empty());
        assert_eq!(f.s.open_windows(), 0);
        for e in first.iter().chain(&rest) {
            assert!(e.window_end < e.deadline, "{e:?}");
        }
    }

    /// What a compacted schedule topic holds after the journal's changes: the latest
    /// state per key, tombstones removing.
    #[derive(Default)]
    struct Topic {
        windows: std::collections::BTreeMap<WindowKey, WindowState>,
        settled: std::collections::BTreeMap<(Purpose, String, Millis), (Millis, Millis)>,
    }

    impl Topic {
        fn write(&mut self, changes: Vec<Persist>) {
            for c in changes {
                match c {
                    Persist::Window(k, Some(st)) => {
                        self.windows.insert(k, st);
                    }
                    Persist::Window(k, None) => {
                        self.windows.remove(&k);
                    }
                    Persist::Settlement {
                        purpose,
                        subject,
                        start,
                        period: Some(p),
                    } => {
                        self.settled.insert((purpose, subject, start), p);
                    }
                    Persist::Settlement {
                        purpose,
                        subject,
                        start,
                        period: None,
                    } => {
                        self.settled.remove(&(purpose, subject, start));
                    }
                }
            }
        }

        /// A schedule read back from the topic, as a new owner of the partition does.
        fn rebuild(&self, policy: &Policy) -> Schedule {
            let mut s = Schedule::new(policy).with_journal();
            for (k, st) in &self.windows {
                s.restore_window(k, st);
            }
            for ((p, subject, start), (end, deadline)) in &self.settled {
                s.restore_settlement(*p, subject, *start, *end, *deadline);
            }
            s
        }
    }

    /// A persisted schedule fires exactly what the live one fires: a run of copies,
    /// rights, settlements and contract ends, with windows fired a few at a time along the
    /// way, journalled into a compacted "topic"; a schedule rebuilt from the topic at any
    /// point holds the same windows and, from then on, yields the same expiries.
    #[test]
    fn a_schedule_rebuilt_from_its_journal_fires_what_the_live_one_fires() {
        let mut f = Fixture::new("excedo");
        f.s = Schedule::new(&f.policy).with_journal();
        let mut topic = Topic::default();
        let subs = [
            "+46701000001",
            "+46701000002",
            "+46701000003",
            "+46701000004",
        ];
        let routes = [
            Purpose::Billing,
            Purpose::Fraud,
            Purpose::Analytics,
            Purpose::Marketing,
            Purpose::Troubleshooting,
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let start = t("2026-01-01T00:00:00.000Z").0;
        let mut now = start;
        let mut fired_live = Vec::new();
        for step in 0..3_000 {
            now += rand(3) as i64 * HOUR_MS + rand(HOUR_MS as u64) as i64;
            let who = subs[rand(subs.len() as u64) as usize];
            let at = Millis(now).to_string();
            match rand(40) {
                0 => f.control(
                    who,
                    &at,
                    Change::Consent {
                        purpose: Purpose::Analytics,
                        granted: false,
                    },
                ),
                1 => f.control(
                    who,
                    &at,
                    Change::Objection {
                        purpose: Purpose::Marketing,
                    },
                ),
                2 => f.control(who, &at, Change::Erasure),
                3 => f.control(who, &at, Change::ContractEnded),
                4 | 5 => {
                    let month = Millis(now).add_months(0).0 / (30 * DAY_MS) * (30 * DAY_MS);
                    let (a, z) = (Millis(month - 30 * DAY_MS), Millis(month));
                    let (a, z) = (
                        Millis(a.0 / HOUR_MS * HOUR_MS),
                        Millis(z.0 / HOUR_MS * HOUR_MS),
                    );
                    f.settle(who, &at, &a.to_string(), &z.to_string());
                }
                _ => {
                    let p = routes[rand(routes.len() as u64) as usize];
                    let late = rand(10) == 0;
                    let when = if late {
                        Millis(now - 5 * DAY_MS)
                    } else {
                        Millis(now)
                    };
                    f.copy(p, who, &when.to_string(), None);
                }
            }
            // Fire a few at a time, as a transaction at a time would.
            if step % 7 == 0 {
                let _ = f.s.due_keyed(Millis(now), 3, |b, e| {
                    fired_live.push((b, e));
                    Ok::<(), ()>(())
                });
            }
            if step % 11 == 0 {
                topic.write(f.s.drain_changes());
            }
        }
        topic.write(f.s.drain_changes());
        // Windows taken out but not yet handed out are still in the topic: the rebuilt
        // schedule hands them out again, the live one from its carry.
        let mut rebuilt = topic.rebuild(&f.policy);
        assert_eq!(
            rebuilt.open_windows(),
            f.s.open_windows() + f.s.carry.len(),
            "the same windows"
        );
        let later = Millis(now + 800 * DAY_MS);
        let mut a: Vec<_> =
            f.s.due(later)
                .into_iter()
                .map(|e| format!("{e:?}"))
                .collect();
        let mut b: Vec<_> = rebuilt
            .due(later)
            .into_iter()
            .map(|e| format!("{e:?}"))
            .collect();
        a.sort();
        b.sort();
        assert!(
            a.len() > 20 && !fired_live.is_empty(),
            "{} {}",
            a.len(),
            fired_live.len()
        );
        assert_eq!(a, b);
    }

    /// A window written again while its partition was read back (with only that moment's
    /// copies) merges with what the topic held: the union of the bounds, the earlier
    /// deadline.
    #[test]
    fn a_window_restored_twice_merges() {
        let policy = policy("excedo");
        let mut s = Schedule::new(&policy);
        let key = WindowKey {
            purpose: Purpose::Troubleshooting,
            subject: M.into(),
            bucket: 0,
        };
        let st = |from: &str, to: &str, deadline: Option<&str>| WindowState {
            from: t(from),
            to: t(to),
            deadline: deadline.map(t),
            reason: Reason::Rule("excedo.troubleshooting".into()),
        };
        s.restore_window(
            &key,
            &st("2026-03-01T00:00:00.000Z", "2026-03-10T23:59:59.999Z", None),
        );
        s.restore_window(
            &key,
            &st(
                "2026-03-12T00:00:00.000Z",
                "2026-03-12T23:59:59.999Z",
                Some("2027-05-01T00:00:00.000Z"),
            ),
        );
        assert_eq!(s.open_windows(), 1);
        assert_eq!(
            s.window_state(Purpose::Troubleshooting, M, 0),
            Some(st(
                "2026-03-01T00:00:00.000Z",
                "2026-03-12T23:59:59.999Z",
                Some("2027-05-01T00:00:00.000Z")
            ))
        );
        assert!(s.remove_window(&key).is_some());
        assert_eq!(s.open_windows(), 0);
    }
}
