//! Behaviour cases: declarative files of records, control events and the copies and
//! expiries a policy must produce. Run by `cdrguard policy test` and by `cargo test`.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use super::engine::Engine;
use super::replay::{Bytes, ReplayLimits, Sink, replay_bytes};
use crate::codec::{DeadLetter, Format, json as codec_json};
use crate::core::process::Decision;
use crate::core::pseudonym::{Keyring, MasterKey};
use crate::core::record::Record;
use crate::core::retention::Expiry;
use crate::core::treat::subscriber_ref;
use crate::policy::Policy;
use crate::vocab::purpose::{Field, Purpose};
use crate::vocab::time::Millis;

/// Why a case file could not be run at all (a failing expectation is not an error).
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    /// Unreadable file.
    #[error("{file}: {msg}")]
    File {
        /// The file.
        file: String,
        /// What went wrong.
        msg: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    /// A policy file, relative to the case file's folder.
    #[serde(default)]
    policy_file: Option<PathBuf>,
    /// A policy compiled into the binary, by name.
    #[serde(default)]
    shipped_policy: Option<String>,
    #[serde(rename = "case")]
    cases: Vec<Case>,
}

/// Which policy a case file runs against: a file on disk, or a shipped one by name. A case
/// file says which explicitly, so `policy test` never tests the compiled-in copy of a file
/// that was edited on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyRef<'a> {
    /// A policy file (already resolved against the case file's folder).
    File(&'a Path),
    /// A shipped policy.
    Shipped(&'a str),
}

impl std::fmt::Display for PolicyRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyRef::File(p) => write!(f, "file {}", p.display()),
            PolicyRef::Shipped(n) => write!(f, "shipped policy {n}"),
        }
    }
}

impl CaseFile {
    /// The policy file resolved against `dir` (the case file's folder), or the shipped name.
    fn policy_ref(&self, dir: &Path) -> Result<Result<PathBuf, &str>, String> {
        match (&self.policy_file, &self.shipped_policy) {
            (Some(f), None) => Ok(Ok(dir.join(f))),
            (None, Some(n)) => Ok(Err(n.as_str())),
            _ => Err(
                "name the policy with exactly one of `policy_file = \"<path relative to this file>\"` or `shipped_policy = \"<name>\"`"
                    .into(),
            ),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    now: Option<String>,
    #[serde(default)]
    control: Vec<toml::Value>,
    #[serde(default)]
    record: Vec<toml::Table>,
    #[serde(default)]
    expect: Vec<ExpectCopy>,
    #[serde(default)]
    no_copy: Vec<NoCopy>,
    #[serde(default)]
    expiry: Vec<ExpectExpiry>,
    #[serde(default)]
    dead_letter: Vec<ExpectDead>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectCopy {
    record: String,
    purpose: String,
    #[serde(default)]
    consent: Option<String>,
    #[serde(default)]
    legal_basis: Option<String>,
    #[serde(default)]
    gdpr_article: Option<String>,
    #[serde(default)]
    equal: toml::Table,
    #[serde(default)]
    kept: Vec<String>,
    #[serde(default)]
    absent: Vec<String>,
    #[serde(default)]
    pseudonymised: Vec<String>,
    #[serde(default)]
    tokenised: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoCopy {
    record: String,
    purpose: String,
    outcome: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectExpiry {
    purpose: String,
    /// Raw msisdn; compared with the route's own reference to it. Absent = anonymised.
    #[serde(default)]
    subscriber: Option<String>,
    reason: String,
    #[serde(default)]
    deadline: Option<String>,
    #[serde(default)]
    window_start: Option<String>,
    #[serde(default)]
    window_end: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectDead {
    /// A record, by `record_id`.
    #[serde(default)]
    record: Option<String>,
    /// Or a control event, by its 0-based index in the case.
    #[serde(default)]
    control: Option<usize>,
    reason_contains: String,
}

/// One case's result.
pub struct CaseResult {
    /// File.
    pub file: String,
    /// The id of the policy it ran against.
    pub policy: String,
    /// Case name.
    pub name: String,
    /// Failed expectations (empty = passed).
    pub failures: Vec<String>,
}

/// All results.
#[derive(Default)]
pub struct Report {
    /// Per case.
    pub results: Vec<CaseResult>,
}

impl Report {
    /// Failed cases.
    pub fn failed(&self) -> usize {
        self.results
            .iter()
            .filter(|r| !r.failures.is_empty())
            .count()
    }
    /// Human report, with a closing `N passed, N failed` line.
    pub fn render(&self) -> String {
        let mut o = String::new();
        for r in &self.results {
            if r.failures.is_empty() {
                let _ = writeln!(o, "ok   {} :: {}", r.file, r.name);
            } else {
                let _ = writeln!(o, "FAIL {} :: {}", r.file, r.name);
                for f in &r.failures {
                    let _ = writeln!(o, "       {f}");
                }
            }
        }
        let _ = writeln!(
            o,
            "behaviour cases: {} passed, {} failed",
            self.results.len() - self.failed(),
            self.failed()
        );
        o
    }
}

fn template(kind: &str) -> Option<Value> {
    let mut v = json!({
        "record_id": "r", "kind": kind, "msisdn": "+46701234567", "imsi": "240011234567890",
        "imei": "356938035643809", "start_time": "2026-03-02T10:15:30.250Z",
        "close_cause": "normal",
        "cell": {"mcc": "240", "mnc": "01", "lac_or_tac": 1201, "cell_id": 987654},
        "serving_plmn": "24001", "rat": "lte", "recording_entity": "msc-sto-1", "local_seq_no": 1
    });
    let o = v.as_object_mut()?;
    match kind {
        "moc" | "mtc" => {
            o.insert("other_party".into(), json!("+46709876543"));
            o.insert("duration_s".into(), json!(125));
        }
        "sms_mo" | "sms_mt" => {
            o.insert("other_party".into(), json!("+46709876543"));
            o.insert("service_centre".into(), json!("+46705008999"));
        }
        "data" => {
            o.insert("duration_s".into(), json!(3600));
            o.insert("close_cause".into(), json!("partial"));
            o.insert("apn".into(), json!("internet"));
            o.insert("charging_id".into(), json!(4_000_001));
            o.insert("ue_ip".into(), json!("10.64.1.20"));
            o.insert(
                "usage".into(),
                json!([{"rating_group": 10, "ul_bytes": 120000, "dl_bytes": 3400000}]),
            );
            o.insert("recording_entity".into(), json!("pgw-sto-1"));
        }
        _ => return None,
    }
    Some(v)
}

/// Builds a record's JSON from its kind's template, the case's overrides and `omit`.
fn build_record(t: &toml::Table) -> Result<Vec<u8>, String> {
    let over = serde_json::to_value(t).map_err(|e| e.to_string())?;
    let over = over.as_object().ok_or("record must be a table")?;
    if let Some(raw) = over.get("raw").and_then(Value::as_str) {
        return Ok(raw.as_bytes().to_vec());
    }
    let kind = over
        .get("template")
        .or_else(|| over.get("kind"))
        .and_then(Value::as_str)
        .ok_or("record needs `template` or `kind`")?;
    let mut v = template(kind).ok_or_else(|| format!("no template for kind {kind:?}"))?;
    let o = v.as_object_mut().ok_or("template")?;
    for (k, val) in over {
        match k.as_str() {
            "template" => {}
            "omit" => {
                for f in val
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    o.remove(f);
                }
            }
            _ => {
                o.insert(k.clone(), val.clone());
            }
        }
    }
    serde_json::to_vec(&v).map_err(|e| e.to_string())
}

fn field_of(v: &Value, f: &str) -> Option<Value> {
    v.get("record").and_then(|r| r.get(f)).cloned()
}

/// What a case's replay produced, kept in memory for the checks.
struct Collected {
    /// The policy's envelopes, as the route files encode them.
    envelopes: crate::codec::Envelopes,
    /// Every copy as `cdrguard replay` writes it: record id, purpose, JSON.
    copies: Vec<(String, Purpose, Value)>,
    /// Every purpose's outcome per record.
    outcomes: Vec<(String, Purpose, &'static str)>,
    /// Every decoded record, as JSON.
    inputs: Vec<(String, Value)>,
    /// Expiries due at the case's `now`, as JSON.
    expiries: Vec<Value>,
    /// Refused records and control events.
    dead: Vec<DeadLetter>,
    line: Vec<u8>,
}

impl Sink for Collected {
    fn decision(&mut self, r: &Record<'_>, d: &Decision<'_>) -> std::io::Result<()> {
        let id = r.record_id.to_string();
        self.inputs.push((
            id.clone(),
            serde_json::to_value(r).map_err(std::io::Error::other)?,
        ));
        for c in &d.copies {
            // The same encoder the replay's route files use.
            self.line.clear();
            codec_json::encode_copy(&self.envelopes, c, &mut self.line);
            let v = serde_json::from_slice(&self.line).map_err(std::io::Error::other)?;
            self.copies.push((id.clone(), c.envelope.purpose, v));
        }
        for (p, o) in d.outcomes.iter().enumerate() {
            if let Some(o) = o {
                self.outcomes.push((id.clone(), Purpose::ALL[p], o.id()));
            }
        }
        Ok(())
    }
    fn expiry(&mut self, e: &Expiry) -> std::io::Result<()> {
        self.expiries
            .push(serde_json::to_value(e).map_err(std::io::Error::other)?);
        Ok(())
    }
    fn dead_letter(&mut self, d: &DeadLetter) -> std::io::Result<()> {
        self.dead.push(d.clone());
        Ok(())
    }
}

/// The 0-based line of a dead letter from the named input (`name:line`, 1-based).
fn line_of(position: &str, name: &str) -> Option<usize> {
    let (n, line) = position.rsplit_once(':')?;
    (n == name).then(|| line.parse::<usize>().ok()?.checked_sub(1))?
}

/// Runs one case against a policy with a fresh random key (tests derive every expected
/// pseudonym from the same keyring, so no key is written down anywhere). The case's
/// records and control events go through [`replay_bytes`], the loop of `cdrguard replay`.
/// Failures are listed in the order of the steps: inputs, the replay, then each kind of
/// expectation.
fn run_case(policy: &Policy, keys: &Keyring, case: &Case) -> Vec<String> {
    let mut fails = Vec::new();
    let inputs = case_inputs(case, &mut fails);
    let now = match case.now.as_deref().map(Millis::parse) {
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            fails.push(format!("now: {e}"));
            return fails;
        }
        None => None,
    };
    let got = match replay_case(policy, keys, &inputs, now) {
        Ok(got) => got,
        Err(e) => {
            fails.push(format!("replay failed: {e}"));
            return fails;
        }
    };
    let Collected {
        copies,
        outcomes,
        inputs: decoded,
        expiries,
        dead,
        ..
    } = got;
    let dead = DeadLetters::trace(dead, &inputs.line_ids, &mut fails);
    check_copy_set(case, &copies, &outcomes, &mut fails);
    for e in &case.expect {
        check_copy(policy, keys, e, &copies, &decoded, &mut fails);
    }
    check_no_copies(case, &outcomes, &mut fails);
    check_dead_letters(case, &dead, &mut fails);
    check_expiries(policy, keys, case, now, expiries, &mut fails);
    fails
}

/// A case's records and control events as the input files `cdrguard replay` reads.
struct CaseInputs {
    /// Control events, one JSON line each (`{}` for one that could not be encoded, so
    /// line numbers stay equal to indices).
    control_lines: Vec<u8>,
    /// Records, one JSON line each.
    record_lines: Vec<u8>,
    /// Record ids by input line, so dead letters (which carry positions) find their
    /// record.
    line_ids: Vec<String>,
}

/// Encodes the case's control events and records, noting those it cannot build.
fn case_inputs(case: &Case, fails: &mut Vec<String>) -> CaseInputs {
    let mut control_lines = Vec::new();
    for (i, c) in case.control.iter().enumerate() {
        match serde_json::to_vec(c) {
            Ok(b) => {
                control_lines.extend_from_slice(&b);
                control_lines.push(b'\n');
            }
            Err(e) => {
                fails.push(format!("control[{i}]: {e}"));
                // Keep line numbers equal to indices.
                control_lines.extend_from_slice(b"{}\n");
            }
        }
    }
    let mut record_lines = Vec::new();
    let mut line_ids: Vec<String> = Vec::new();
    for (i, t) in case.record.iter().enumerate() {
        match build_record(t) {
            Ok(b) if b.contains(&b'\n') || b.iter().all(u8::is_ascii_whitespace) => {
                fails.push(format!("record[{i}]: must be one non-blank line"));
            }
            Ok(b) => {
                record_lines.extend_from_slice(&b);
                record_lines.push(b'\n');
                line_ids.push(
                    t.get("record_id")
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string(),
                );
            }
            Err(e) => fails.push(format!("record[{i}]: {e}")),
        }
    }
    CaseInputs {
        control_lines,
        record_lines,
        line_ids,
    }
}

/// Replays the inputs through [`replay_bytes`] with a fresh engine and collects what it
/// produced.
fn replay_case(
    policy: &Policy,
    keys: &Keyring,
    inputs: &CaseInputs,
    now: Option<Millis>,
) -> Result<Collected, String> {
    let mut engine = Engine::new(policy, keys);
    let mut got = Collected {
        envelopes: crate::codec::Envelopes::new(policy),
        copies: Vec::new(),
        outcomes: Vec::new(),
        inputs: Vec::new(),
        expiries: Vec::new(),
        dead: Vec::new(),
        line: Vec::new(),
    };
    replay_bytes(
        Bytes {
            bytes: &inputs.record_lines,
            name: "record",
        },
        Format::Json,
        Some(Bytes {
            bytes: &inputs.control_lines,
            name: "control",
        }),
        // Without `now` the case checks no expiries: none is taken, and record times are
        // not checked against a clock.
        now.unwrap_or(Millis(i64::MIN)),
        &ReplayLimits {
            times: now.and(ReplayLimits::default().times),
            ..ReplayLimits::any_order()
        },
        &mut engine,
        &mut got,
    )
    .map_err(|e| e.to_string())?;
    Ok(got)
}

/// The dead letters of a case, traced back to what the case calls them.
struct DeadLetters {
    /// Refused records by `record_id`, with the reason.
    records: Vec<(String, String)>,
    /// Refused control events by their 0-based index in the case, with the reason.
    controls: Vec<(usize, String)>,
}

impl DeadLetters {
    /// Traces each dead letter to its record or control event by its position; one at a
    /// position the case has no input for is a failure.
    fn trace(dead: Vec<DeadLetter>, line_ids: &[String], fails: &mut Vec<String>) -> Self {
        let mut records: Vec<(String, String)> = Vec::new();
        let mut controls: Vec<(usize, String)> = Vec::new();
        for d in dead {
            if let Some(i) = line_of(&d.position, "control") {
                controls.push((i, d.reason));
            } else if let Some(id) = line_of(&d.position, "record").and_then(|i| line_ids.get(i)) {
                records.push((id.clone(), d.reason));
            } else {
                fails.push(format!("dead letter at unknown position {}", d.position));
            }
        }
        DeadLetters { records, controls }
    }
}

/// The outcome a purpose had for a record, if it was processed.
fn outcome_of(
    outcomes: &[(String, Purpose, &'static str)],
    record: &str,
    purpose: &str,
) -> Option<&'static str> {
    outcomes
        .iter()
        .find(|o| o.0 == record && o.1.id() == purpose)
        .map(|o| o.2)
}

/// Copies: exactly the expected set, each surplus or missing one with the outcome that
/// explains it.
fn check_copy_set(
    case: &Case,
    copies: &[(String, Purpose, Value)],
    outcomes: &[(String, Purpose, &'static str)],
    fails: &mut Vec<String>,
) {
    let made: BTreeSet<(String, &str)> =
        copies.iter().map(|(r, p, _)| (r.clone(), p.id())).collect();
    let wanted: BTreeSet<(String, &str)> = case
        .expect
        .iter()
        .map(|e| (e.record.clone(), e.purpose.as_str()))
        .collect();
    for (r, p) in made.difference(&wanted) {
        let why = outcome_of(outcomes, r, p).unwrap_or("?");
        fails.push(format!("unexpected {p} copy of {r} ({why})"));
    }
    for (r, p) in wanted.difference(&made) {
        let why = outcome_of(outcomes, r, p).unwrap_or("record not processed");
        fails.push(format!("missing {p} copy of {r}: outcome was {why}"));
    }
}

/// One expected copy's envelope and fields, compared with its input record (a missing
/// copy was reported by [`check_copy_set`]).
fn check_copy(
    policy: &Policy,
    keys: &Keyring,
    e: &ExpectCopy,
    copies: &[(String, Purpose, Value)],
    inputs: &[(String, Value)],
    fails: &mut Vec<String>,
) {
    let Some((_, purpose, v)) = copies
        .iter()
        .find(|(r, p, _)| *r == e.record && p.id() == e.purpose)
    else {
        return;
    };
    let input = inputs
        .iter()
        .find(|(r, _)| *r == e.record)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let tag = format!("{} copy of {}", e.purpose, e.record);
    for (key, want) in [
        ("consent", &e.consent),
        ("legal_basis", &e.legal_basis),
        ("gdpr_article", &e.gdpr_article),
    ] {
        if let Some(want) = want {
            let got = v["envelope"][key].as_str().unwrap_or("");
            if got != want {
                fails.push(format!(
                    "{tag}: envelope {key} is {got:?}, expected {want:?}"
                ));
            }
        }
    }
    check_fields(keys, e, *purpose, v, &input, &tag, fails);
    // Whatever the case lists, no copy may carry a raw identifier its policy hides.
    if let Some(rule) = policy.rule(*purpose) {
        for f in Field::ALL.iter().filter(|f| f.is_personal_identifier()) {
            let raw = input.get(f.name()).and_then(Value::as_str);
            let got = field_of(v, f.name());
            if rule.treatment(*f) != crate::vocab::treatment::Treatment::Keep
                && raw.is_some()
                && got.as_ref().and_then(Value::as_str) == raw
            {
                fails.push(format!("{tag}: {} leaks its raw value", f.name()));
            }
        }
    }
}

/// The fields a case lists for a copy: equal to a value, kept, absent, pseudonymised
/// (this purpose's pseudonym under the case's keys) or tokenised (reversible to the
/// input, and not containing its digits).
fn check_fields(
    keys: &Keyring,
    e: &ExpectCopy,
    purpose: Purpose,
    v: &Value,
    input: &Value,
    tag: &str,
    fails: &mut Vec<String>,
) {
    for (f, want) in &e.equal {
        let want = serde_json::to_value(want).unwrap_or_default();
        let got = field_of(v, f);
        if got.as_ref() != Some(&want) {
            fails.push(format!("{tag}: {f} is {got:?}, expected {want}"));
        }
    }
    for f in &e.kept {
        if field_of(v, f) != input.get(f).cloned() {
            fails.push(format!("{tag}: {f} should be kept as in the input"));
        }
    }
    for f in &e.absent {
        if field_of(v, f).is_some() {
            fails.push(format!("{tag}: {f} should be absent"));
        }
    }
    for f in &e.pseudonymised {
        let raw = input.get(f).and_then(Value::as_str).unwrap_or("");
        let want = keys.pseudonym(purpose, f, raw);
        let got = field_of(v, f);
        if got.as_ref().and_then(Value::as_str) != Some(want.as_str()) || raw.is_empty() {
            fails.push(format!(
                "{tag}: {f} should be this purpose's pseudonym of the input, got {got:?}"
            ));
        }
    }
    for f in &e.tokenised {
        let raw = input.get(f).and_then(Value::as_str).unwrap_or("");
        let got = field_of(v, f)
            .and_then(|g| g.as_str().map(str::to_string))
            .unwrap_or_default();
        if got.contains(raw.trim_start_matches('+'))
            || keys.reverse(&got).ok().as_deref() != Some(raw)
        {
            fails.push(format!(
                "{tag}: {f} should be a reversible token of the input, got {got:?}"
            ));
        }
    }
}

/// Purposes that must not copy a record: each with the outcome that says why not.
fn check_no_copies(
    case: &Case,
    outcomes: &[(String, Purpose, &'static str)],
    fails: &mut Vec<String>,
) {
    for n in &case.no_copy {
        let got = outcome_of(outcomes, &n.record, &n.purpose);
        if got != Some(n.outcome.as_str()) {
            fails.push(format!(
                "{} for {}: outcome {got:?}, expected {:?}",
                n.purpose, n.record, n.outcome
            ));
        }
    }
}

/// Dead letters: every expected one refused for the expected reason, and nothing else
/// refused.
fn check_dead_letters(case: &Case, dead: &DeadLetters, fails: &mut Vec<String>) {
    for d in &case.dead_letter {
        let (what, found) = match (&d.record, d.control) {
            (Some(r), None) => (
                format!("record {r}"),
                dead.records
                    .iter()
                    .find(|(id, _)| id == r)
                    .map(|(_, why)| why),
            ),
            (None, Some(i)) => (
                format!("control[{i}]"),
                dead.controls
                    .iter()
                    .find(|(c, _)| *c == i)
                    .map(|(_, why)| why),
            ),
            _ => {
                fails.push("a dead_letter names exactly one of `record` or `control`".into());
                continue;
            }
        };
        match found {
            Some(reason) if reason.contains(&d.reason_contains) => {}
            Some(reason) => fails.push(format!(
                "dead letter {what}: reason {reason:?} lacks {:?}",
                d.reason_contains
            )),
            None => fails.push(format!("{what} should go to the dead letter")),
        }
    }
    for (id, reason) in &dead.records {
        if !case
            .dead_letter
            .iter()
            .any(|d| d.record.as_ref() == Some(id))
        {
            fails.push(format!(
                "record {id} unexpectedly went to the dead letter: {reason}"
            ));
        }
    }
    for (i, reason) in &dead.controls {
        if !case.dead_letter.iter().any(|d| d.control == Some(*i)) {
            fails.push(format!("control[{i}] refused: {reason}"));
        }
    }
}

/// Expiries due at `now`: exactly the expected ones, each matched once. A case without
/// `now` may list none, since nothing would check them.
fn check_expiries(
    policy: &Policy,
    keys: &Keyring,
    case: &Case,
    now: Option<Millis>,
    expiries: Vec<Value>,
    fails: &mut Vec<String>,
) {
    if now.is_none() {
        if !case.expiry.is_empty() {
            fails.push("expiries are listed but the case has no `now` to check them at".into());
        }
        return;
    }
    let mut got = expiries;
    for want in &case.expiry {
        let Some(p) = Purpose::from_id(&want.purpose) else {
            fails.push(format!("expiry: unknown purpose {}", want.purpose));
            continue;
        };
        // The route's own reference to the subscriber: a pseudonym or token where the
        // policy hides the msisdn.
        let subject = match (&want.subscriber, policy.rule(p)) {
            (Some(m), Some(rule)) => subscriber_ref(rule, keys, m).map(|t| t.as_str().to_string()),
            _ => None,
        };
        let pos = got.iter().position(|g| {
            g["purpose"] == want.purpose
                && g["reason"] == want.reason
                && g["subscriber"].as_str().map(str::to_string) == subject
                && want.deadline.as_ref().is_none_or(|d| g["deadline"] == *d)
                && want
                    .window_start
                    .as_ref()
                    .is_none_or(|d| g["window_start"] == *d)
                && want
                    .window_end
                    .as_ref()
                    .is_none_or(|d| g["window_end"] == *d)
        });
        match pos {
            Some(i) => {
                got.remove(i);
            }
            None => fails.push(format!(
                "missing expiry: {} {} for {:?} deadline {:?}",
                want.purpose, want.reason, want.subscriber, want.deadline
            )),
        }
    }
    for g in got {
        fails.push(format!("unexpected expiry: {g}"));
    }
}

fn files_under(p: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            files_under(&e, out)?;
        }
    } else if p.extension().is_some_and(|e| e == "toml") {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// Runs every case file under `paths`; `load` loads the policy a case file names (a file,
/// its path resolved against the case file's folder, or a shipped policy).
pub fn run_paths<E: std::fmt::Display>(
    paths: &[PathBuf],
    load: &dyn Fn(PolicyRef<'_>) -> Result<Policy, E>,
) -> Result<Report, CaseError> {
    let mut files = Vec::new();
    for p in paths {
        files_under(p, &mut files).map_err(|e| CaseError::File {
            file: p.display().to_string(),
            msg: e.to_string(),
        })?;
    }
    if files.is_empty() {
        return Err(CaseError::File {
            file: format!("{paths:?}"),
            msg: "no case files (*.toml) found".into(),
        });
    }
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    // A valid id and a 32-byte secret make a key, one key a keyring: nothing a case file
    // says can fail here (an error would have no file to name).
    let keys = Keyring::new(&[MasterKey::new("case", &secret).expect("a valid id and secret")])
        .expect("one key");
    let mut report = Report::default();
    for f in files {
        let name = f.display().to_string();
        let err = |msg: String| CaseError::File {
            file: name.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&f).map_err(|e| err(e.to_string()))?;
        let cf: CaseFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let dir = f.parent().unwrap_or(Path::new("."));
        let named = cf.policy_ref(dir).map_err(err)?;
        let which = match &named {
            Ok(path) => PolicyRef::File(path),
            Err(name) => PolicyRef::Shipped(name),
        };
        let policy = load(which).map_err(|e| err(format!("{which}: {e}")))?;
        // A file without cases would pass while testing nothing.
        if cf.cases.is_empty() {
            return Err(err(
                "declares no case (`[[case]]`): a case file must test something".into(),
            ));
        }
        for case in &cf.cases {
            report.results.push(CaseResult {
                file: name.clone(),
                policy: policy.id.clone(),
                name: case.name.clone(),
                failures: run_case(&policy, &keys, case),
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Vec<Vec<String>> {
        let policy = crate::policy::parse_policy(
            crate::policy::shipped("excedo").expect("shipped"),
            "excedo.toml",
        )
        .expect("policy loads");
        let keys = Keyring::new(&[MasterKey::new("t", &[7u8; 32]).expect("key")]).expect("keys");
        let cf: CaseFile = toml::from_str(text).expect("case file parses");
        cf.cases
            .iter()
            .map(|c| run_case(&policy, &keys, c))
            .collect()
    }

    const SETTLED: &str = r#"
shipped_policy = "excedo"
[[case]]
name = "one billing window"
now = "2026-10-20T00:00:00.000Z"
[[case.control]]
type = "invoice_settled"
msisdn = "+46701234567"
at = "2026-04-15T08:00:00.000Z"
period_start = "2026-03-01T00:00:00.000Z"
period_end = "2026-04-01T00:00:00.000Z"
[[case.record]]
template = "sms_mo"
record_id = "s1"
start_time = "2026-03-02T10:15:00.000Z"
[[case.expect]]
record = "s1"
purpose = "billing"
[[case.expect]]
record = "s1"
purpose = "fraud"
[[case.expect]]
record = "s1"
purpose = "troubleshooting"
[[case.expiry]]
purpose = "fraud"
subscriber = "+46701234567"
reason = "excedo.fraud"
[[case.expiry]]
purpose = "billing"
subscriber = "+46701234567"
reason = "excedo.billing"
deadline = "2026-10-15T08:00:00.000Z"
window_start = "WINDOW_START"
window_end = "2026-03-02T10:59:59.999Z"
"#;

    #[test]
    fn a_case_passes_only_with_the_replays_exact_expiry() {
        let ok = SETTLED.replace("WINDOW_START", "2026-03-02T10:00:00.000Z");
        assert_eq!(run(&ok), vec![Vec::<String>::new()]);
        // The record's own time is what the expiry must not carry.
        let leaky = SETTLED.replace("WINDOW_START", "2026-03-02T10:15:00.000Z");
        let fails = &run(&leaky)[0];
        assert!(
            fails.iter().any(|f| f.contains("missing expiry: billing")),
            "{fails:?}"
        );
        assert!(
            fails.iter().any(|f| f.contains("unexpected expiry")),
            "{fails:?}"
        );
    }

    #[test]
    fn dead_letters_are_traced_to_their_record_or_control_event() {
        let text = r#"
shipped_policy = "excedo"
[[case]]
name = "bad inputs"
[[case.control]]
type = "invoice_settled"
msisdn = "+46701234567"
at = "2026-04-15T08:00:00.000Z"
period_start = "2026-03-01T00:30:00.000Z"
period_end = "2026-04-01T00:00:00.000Z"
[[case.record]]
template = "moc"
record_id = "bad1"
omit = ["other_party"]
"#;
        let fails = &run(text)[0];
        assert!(
            fails
                .iter()
                .any(|f| f.starts_with("record bad1 unexpectedly went to the dead letter")),
            "{fails:?}"
        );
        assert!(
            fails
                .iter()
                .any(|f| f.starts_with("control[0] refused") && f.contains("whole UTC hours")),
            "{fails:?}"
        );
        let expected = format!(
            "{text}{}",
            r#"
[[case.dead_letter]]
record = "bad1"
reason_contains = "other_party"
[[case.dead_letter]]
control = 0
reason_contains = "whole UTC hours"
"#
        );
        assert_eq!(run(&expected), vec![Vec::<String>::new()]);
    }

    #[test]
    fn expiries_without_now_are_a_failure_not_ignored() {
        let text = SETTLED
            .replace("WINDOW_START", "2026-03-02T10:00:00.000Z")
            .replace("now = \"2026-10-20T00:00:00.000Z\"\n", "");
        let fails = &run(&text)[0];
        assert!(fails.iter().any(|f| f.contains("no `now`")), "{fails:?}");
    }
}
