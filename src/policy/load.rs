//! Reads a policy file (TOML) into a [`Policy`], reporting every problem with its line.
//!
//! The file is walked as a spanned TOML tree rather than through serde derive, so one
//! pass can report all unknown keys, bad values and rule violations at once.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{
    Anchor, Basis, Cite, Note, Period, Policy, PurposeRule, Retention, RightRule, Treatment,
    WithoutConsent,
};
use crate::core::purpose::{Category, Field, Purpose};

/// One thing wrong with a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file.
    pub line: usize,
    /// Dotted path of the key, e.g. `purposes.analytics.fields.msisdn`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// A refused policy: the file and every problem found in it.
#[derive(Clone, Debug, thiserror::Error)]
pub struct PolicyError {
    /// The file as named by the caller.
    pub file: String,
    /// All problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "policy {} refused: {} problem(s)",
            self.file,
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  {}:{}: {}: {}", self.file, p.line, p.path, p.message)?;
        }
        Ok(())
    }
}

/// Reads and compiles a policy file.
pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: name.clone(),
        problems: vec![Problem {
            line: 0,
            path: String::new(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    parse_policy(&text, &name)
}

/// Compiles policy text; `file` names it in errors and in the compiled policy.
pub fn parse_policy(text: &str, file: &str) -> Result<Policy, PolicyError> {
    let mut cx = Cx {
        lines: LineIndex::new(text),
        problems: Vec::new(),
    };
    let root = match DeTable::parse(text) {
        Ok(t) => t,
        Err(e) => {
            let line = e.span().map(|s| cx.lines.line(s.start)).unwrap_or(0);
            return Err(PolicyError {
                file: file.to_string(),
                problems: vec![Problem {
                    line,
                    path: String::new(),
                    message: format!("not valid TOML: {}", e.message()),
                }],
            });
        }
    };
    let policy = compile(&mut cx, &root, file);
    cx.problems.sort_by_key(|p| p.line);
    match policy {
        Some(p) if cx.problems.is_empty() => Ok(p),
        _ => Err(PolicyError {
            file: file.to_string(),
            problems: cx.problems,
        }),
    }
}

struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut v = vec![0];
        v.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex(v)
    }
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&s| s <= offset)
    }
}

struct Cx {
    lines: LineIndex,
    problems: Vec<Problem>,
}

impl Cx {
    fn err(&mut self, offset: usize, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            line: self.lines.line(offset),
            path: path.to_string(),
            message: message.into(),
        });
    }
}

/// A table being read: remembers which keys were used so the rest can be reported.
struct Tbl<'a, 'i> {
    t: &'a DeTable<'i>,
    path: String,
    at: usize,
    used: Vec<&'a str>,
}

type Val<'a, 'i> = &'a Spanned<DeValue<'i>>;

impl<'a, 'i> Tbl<'a, 'i> {
    fn new(t: &'a DeTable<'i>, path: String, at: usize) -> Self {
        Tbl {
            t,
            path,
            at,
            used: Vec::new(),
        }
    }

    fn sub(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&mut self, key: &str) -> Option<Val<'a, 'i>> {
        let (k, v) = self.t.get_key_value(key)?;
        let k: &'a Spanned<Cow<'i, str>> = k;
        self.used.push(k.get_ref().as_ref());
        Some(v)
    }

    fn str(&mut self, cx: &mut Cx, key: &str, required: bool) -> Option<(String, usize)> {
        match self.get(key) {
            Some(v) => match v.get_ref().as_str() {
                Some(s) if !s.trim().is_empty() => Some((s.to_string(), v.span().start)),
                Some(_) => {
                    cx.err(v.span().start, &self.sub(key), "must not be empty");
                    None
                }
                None => {
                    cx.err(v.span().start, &self.sub(key), "must be a string");
                    None
                }
            },
            None => {
                if required {
                    cx.err(self.at, &self.path, format!("missing key `{key}`"));
                }
                None
            }
        }
    }

    fn table(&mut self, cx: &mut Cx, key: &str, required: bool) -> Option<Tbl<'a, 'i>> {
        let path = self.sub(key);
        match self.get(key) {
            Some(v) => match v.get_ref().as_table() {
                Some(t) => Some(Tbl::new(t, path, v.span().start)),
                None => {
                    cx.err(v.span().start, &path, "must be a table");
                    None
                }
            },
            None => {
                if required {
                    cx.err(self.at, &self.path, format!("missing table `{key}`"));
                }
                None
            }
        }
    }

    /// Reports keys nobody asked for: a typo must not silently fall back to a default.
    fn finish(self, cx: &mut Cx) {
        for (k, _) in self.t.iter() {
            if !self.used.contains(&k.get_ref().as_ref()) {
                let path = self.sub(k.get_ref());
                cx.err(k.span().start, &path, "unknown key");
            }
        }
    }
}

fn compile(cx: &mut Cx, root: &Spanned<DeTable<'_>>, file: &str) -> Option<Policy> {
    let mut top = Tbl::new(root.get_ref(), String::new(), 0);
    let header = top.table(cx, "policy", true);
    let (mut id, mut version, mut controller, mut covers, mut source) =
        (None, None, None, None, None);
    if let Some(mut h) = header {
        id = h.str(cx, "id", true);
        version = h.str(cx, "version", true);
        controller = h.str(cx, "controller", true);
        covers = h.str(cx, "covers", true);
        source = h.str(cx, "source", true);
        if let Some((i, at)) = &id
            && !i
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            cx.err(*at, "policy.id", "use lowercase letters, digits and '-'");
        }
        h.finish(cx);
    }
    let policy_id = id.as_ref().map(|(s, _)| s.clone()).unwrap_or_default();

    let mut purposes: [Option<PurposeRule>; Purpose::COUNT] = Default::default();
    if let Some(mut ps) = top.table(cx, "purposes", true) {
        let keys: Vec<_> = ps.t.iter().map(|(k, _)| k).collect();
        for k in keys {
            let name = k.get_ref().as_ref();
            let Some(purpose) = Purpose::from_id(name) else {
                ps.get(name);
                cx.err(
                    k.span().start,
                    &ps.sub(name),
                    format!(
                        "unknown purpose; purposes are {}",
                        Purpose::ALL.map(|p| p.id()).join(", ")
                    ),
                );
                continue;
            };
            if let Some(mut t) = ps.table(cx, name, true) {
                purposes[purpose as usize] = purpose_rule(cx, &mut t, purpose, &policy_id);
                t.finish(cx);
            }
        }
        if ps.t.is_empty() {
            cx.err(ps.at, "purposes", "declares no purpose");
        }
        ps.finish(cx);
    }

    let mut notes = Vec::new();
    if let Some(v) = top.get("notes") {
        match v.get_ref().as_array() {
            Some(arr) => {
                for (i, item) in arr.iter().enumerate() {
                    let path = format!("notes[{i}]");
                    let Some(t) = item.get_ref().as_table() else {
                        cx.err(item.span().start, &path, "must be a table");
                        continue;
                    };
                    let mut t = Tbl::new(t, path, item.span().start);
                    let topic = t.str(cx, "topic", true);
                    let text = t.str(cx, "text", true);
                    let cite = cite(cx, &mut t);
                    t.finish(cx);
                    if let (Some(topic), Some(text), Some(cite)) = (topic, text, cite) {
                        notes.push(Note {
                            topic: topic.0,
                            text: text.0,
                            cite,
                        });
                    }
                }
            }
            None => cx.err(v.span().start, "notes", "must be an array of tables"),
        }
    }
    top.finish(cx);

    let (id, version) = (id?.0, version?.0);
    Some(Policy {
        tag: format!("{id}@{version}"),
        id,
        version,
        controller: controller?.0,
        covers: covers?.0,
        source: source?.0,
        file: file.to_string(),
        purposes,
        notes,
    })
}

/// Reads `source = "..."` or `assumption = "..."`: exactly one.
fn cite(cx: &mut Cx, t: &mut Tbl<'_, '_>) -> Option<Cite> {
    let s = t.str(cx, "source", false);
    let a = t.str(cx, "assumption", false);
    match (s, a) {
        (Some((s, _)), None) => Some(Cite::Source(s)),
        (None, Some((a, _))) => Some(Cite::Assumption(a)),
        (Some(_), Some((_, at))) => {
            cx.err(
                at,
                &t.path,
                "give either `source` or `assumption`, not both",
            );
            None
        }
        (None, None) => {
            cx.err(
                t.at,
                &t.path,
                "cite the source (`source = \"seed file, section\"`) or mark an explicit `assumption` with its reason",
            );
            None
        }
    }
}

fn purpose_rule(
    cx: &mut Cx,
    t: &mut Tbl<'_, '_>,
    purpose: Purpose,
    policy_id: &str,
) -> Option<PurposeRule> {
    let description = t.str(cx, "description", true);
    let basis = t.table(cx, "basis", true).and_then(|mut b| {
        let r = bases(cx, &mut b);
        b.finish(cx);
        r
    });
    let consent_key = t.str(cx, "consent_key", false).and_then(|(s, at)| {
        let p = Purpose::from_id(&s);
        if p.is_none() {
            cx.err(at, &t.sub("consent_key"), "not a purpose id");
        }
        p.map(|p| (p, at))
    });
    let without = t
        .str(cx, "without_consent", false)
        .and_then(|(s, at)| match s.as_str() {
            "no_copy" => Some((WithoutConsent::NoCopy, at)),
            "anonymised" => Some((WithoutConsent::Anonymised, at)),
            _ => {
                cx.err(
                    at,
                    &t.sub("without_consent"),
                    "must be `no_copy` or `anonymised`",
                );
                None
            }
        });
    let restriction = right(cx, t, "restriction", ("continue", "stop"));
    let objection = right(cx, t, "objection", ("not_applicable", "stop"));
    let erasure = right(cx, t, "erasure", ("retain", "expire"));
    let retention = t.table(cx, "retention", true).and_then(|mut r| {
        let out = retention(cx, &mut r, format!("{policy_id}.{}", purpose.id()));
        r.finish(cx);
        out
    });
    let fields = t.table(cx, "fields", true).map(|mut f| {
        let at = f.at;
        let r = field_map(cx, &mut f);
        f.finish(cx);
        (r, at)
    });
    let anonymised = t.table(cx, "anonymised", false).map(|mut f| {
        let at = f.at;
        let r = field_map(cx, &mut f);
        f.finish(cx);
        (r, at)
    });

    let (basis, basis_cite) = basis?;
    let uses_consent = basis.iter().flatten().any(|b| *b == Basis::Consent);
    let path = t.path.clone();
    let without_consent = match (uses_consent, without) {
        (true, Some((w, _))) => w,
        (true, None) => {
            cx.err(
                t.at,
                &path,
                "a category rests on consent: say what happens without it (`without_consent`)",
            );
            WithoutConsent::NoCopy
        }
        (false, Some((_, at))) => {
            cx.err(
                at,
                &path,
                "`without_consent` given, but no category rests on consent",
            );
            WithoutConsent::NoCopy
        }
        (false, None) => WithoutConsent::NoCopy,
    };
    if let (false, Some((_, at))) = (uses_consent, consent_key) {
        cx.err(
            at,
            &path,
            "`consent_key` given, but no category rests on consent",
        );
    }
    let (fields, _) = fields?;
    // Missing parts were reported already; placeholders let the cross-checks below run so
    // one pass lists everything. A policy with any problem is never returned.
    let placeholder = || RightRule {
        stops: true,
        cite: Cite::Assumption(String::new()),
    };
    let rule = PurposeRule {
        purpose,
        description: description?.0,
        basis,
        basis_cite,
        consent_key: uses_consent.then(|| consent_key.map(|c| c.0).unwrap_or(purpose)),
        without_consent,
        fields,
        anonymised: anonymised.as_ref().map(|a| a.0),
        restriction: restriction.unwrap_or_else(placeholder),
        objection: objection.unwrap_or_else(placeholder),
        erasure: erasure.unwrap_or_else(placeholder),
        retention: retention.unwrap_or(Retention {
            rule_id: String::new(),
            anchor: Anchor::EventTime,
            period: Period::Days(0),
            after: String::new(),
            cite: Cite::Assumption(String::new()),
        }),
        subscriber_field: matches!(
            fields[Field::Msisdn as usize],
            Treatment::Keep | Treatment::Pseudonymise | Treatment::Tokenise
        )
        .then_some(Field::Msisdn),
    };
    check_rule(cx, &rule, &path, t.at, anonymised.map(|a| a.1));
    Some(rule)
}

fn bases(cx: &mut Cx, b: &mut Tbl<'_, '_>) -> Option<([Vec<Basis>; 2], Cite)> {
    let mut out: [Vec<Basis>; 2] = Default::default();
    for c in Category::ALL {
        let Some(v) = b.get(c.id()) else { continue };
        let items: Vec<(&str, usize)> = match v.get_ref() {
            DeValue::String(s) => vec![(s.as_ref(), v.span().start)],
            DeValue::Array(a) => a
                .iter()
                .filter_map(|i| i.get_ref().as_str().map(|s| (s, i.span().start)))
                .collect(),
            _ => {
                cx.err(
                    v.span().start,
                    &b.sub(c.id()),
                    "must be a basis or a list of bases",
                );
                continue;
            }
        };
        for (s, at) in items {
            match Basis::from_id(s) {
                Some(basis) => out[c as usize].push(basis),
                None => cx.err(
                    at,
                    &b.sub(c.id()),
                    format!(
                        "unknown legal basis `{s}`; GDPR Art. 6(1) bases are {}",
                        Basis::ALL.map(|b| b.id()).join(", ")
                    ),
                ),
            }
        }
    }
    if out.iter().all(Vec::is_empty) {
        cx.err(
            b.at,
            &b.path,
            "names no legal basis for `subscriber` or `traffic` data",
        );
    }
    let c = cite(cx, b)?;
    Some((out, c))
}

fn right(
    cx: &mut Cx,
    t: &mut Tbl<'_, '_>,
    key: &str,
    (go, stop): (&str, &str),
) -> Option<RightRule> {
    let mut r = t.table(cx, key, true)?;
    let effect = r.str(cx, "effect", true);
    let c = cite(cx, &mut r);
    r.finish(cx);
    let (effect, at) = effect?;
    let stops = if effect == stop {
        true
    } else if effect == go {
        false
    } else {
        cx.err(
            at,
            &t.sub(key),
            format!("effect must be `{go}` or `{stop}`"),
        );
        return None;
    };
    Some(RightRule { stops, cite: c? })
}

fn retention(cx: &mut Cx, r: &mut Tbl<'_, '_>, rule_id: String) -> Option<Retention> {
    let anchor = r
        .str(cx, "anchor", true)
        .and_then(|(s, at)| match s.as_str() {
            "event_time" => Some(Anchor::EventTime),
            "invoice_settled" => Some(Anchor::InvoiceSettled),
            "contract_end" => Some(Anchor::ContractEnd),
            _ => {
                cx.err(
                    at,
                    &r.sub("anchor"),
                    "must be event_time, invoice_settled or contract_end",
                );
                None
            }
        });
    let period = r.str(cx, "after", true).and_then(|(s, at)| {
        let p = parse_period(&s);
        if p.is_none() {
            cx.err(
                at,
                &r.sub("after"),
                "must be a bounded period like \"6 months\", \"180 days\" or \"2 years\"; \
                 if the source states none, choose one and mark it as an `assumption`",
            );
        }
        p
    });
    let c = cite(cx, r);
    let period = period?;
    Some(Retention {
        rule_id,
        anchor: anchor?,
        after: period.describe(),
        period,
        cite: c?,
    })
}

/// Parses `N days|months|years` (singular too).
pub fn parse_period(s: &str) -> Option<Period> {
    let mut it = s.split_whitespace();
    let n: u32 = it.next()?.parse().ok()?;
    let unit = it.next()?;
    if it.next().is_some() {
        return None;
    }
    match unit.trim_end_matches('s') {
        "day" => Some(Period::Days(n)),
        "month" => Some(Period::Months(n)),
        "year" => Some(Period::Months(n.checked_mul(12)?)),
        _ => None,
    }
}

fn field_map(cx: &mut Cx, f: &mut Tbl<'_, '_>) -> [Treatment; Field::COUNT] {
    let mut out = [Treatment::Drop; Field::COUNT];
    let keys: Vec<_> =
        f.t.iter()
            .map(|(k, v)| (k.get_ref().to_string(), v))
            .collect();
    for (name, v) in keys {
        let path = f.sub(&name);
        let Some(field) = Field::from_name(&name) else {
            f.get(&name);
            cx.err(v.span().start, &path, "not a record field");
            continue;
        };
        f.get(&name);
        let at = v.span().start;
        let Some(s) = v.get_ref().as_str() else {
            cx.err(at, &path, "must be a treatment string");
            continue;
        };
        match parse_treatment(s) {
            Some(t) => {
                if let Err(m) = treatment_fits(field, t) {
                    cx.err(at, &path, m);
                }
                out[field as usize] = t;
            }
            None => cx.err(
                at,
                &path,
                format!(
                    "unknown treatment `{s}`; use keep, drop, generalise, pseudonymise, tokenise or mask:FIRST:LAST"
                ),
            ),
        }
    }
    out
}

/// Parses a treatment: `keep`, `drop`, `generalise`, `pseudonymise`, `tokenise`,
/// `mask:F:L`.
pub fn parse_treatment(s: &str) -> Option<Treatment> {
    Some(match s {
        "keep" => Treatment::Keep,
        "drop" => Treatment::Drop,
        "generalise" => Treatment::Generalise,
        "pseudonymise" => Treatment::Pseudonymise,
        "tokenise" => Treatment::Tokenise,
        _ => {
            let rest = s.strip_prefix("mask:")?;
            let (a, b) = rest.split_once(':')?;
            Treatment::Mask {
                first: a.parse().ok()?,
                last: b.parse().ok()?,
            }
        }
    })
}

/// Which treatments make sense for which field.
fn treatment_fits(f: Field, t: Treatment) -> Result<(), String> {
    use Field as F;
    let text = matches!(
        f,
        F::RecordId
            | F::Msisdn
            | F::Imsi
            | F::Imei
            | F::OtherParty
            | F::ServingPlmn
            | F::ServiceCentre
            | F::Apn
            | F::UeIp
            | F::RecordingEntity
    );
    let ok = match t {
        Treatment::Keep | Treatment::Drop => true,
        Treatment::Generalise => matches!(f, F::StartTime | F::Cell | F::UeIp | F::Imei),
        Treatment::Mask { .. } | Treatment::Pseudonymise => text,
        Treatment::Tokenise => {
            matches!(
                f,
                F::Msisdn | F::Imsi | F::Imei | F::OtherParty | F::ServiceCentre
            )
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not defined for field {}",
            t.id(),
            f.name()
        ))
    }
}

/// The rules that tie fields, bases, consent and rights together.
fn check_rule(cx: &mut Cx, r: &PurposeRule, path: &str, at: usize, anon_at: Option<usize>) {
    let p = r.purpose;
    for f in Field::ALL {
        let t = r.treatment(f);
        if t.passes_data() && r.bases(f.category()).is_empty() {
            cx.err(
                at,
                &format!("{path}.fields.{}", f.name()),
                format!(
                    "routes {} to {} without a legal basis for {} data",
                    f.name(),
                    p.id(),
                    f.category().id()
                ),
            );
        }
        if !f.is_personal_identifier() {
            continue;
        }
        let raw = matches!(t, Treatment::Keep | Treatment::Mask { .. });
        if p == Purpose::Analytics && (raw || t == Treatment::Tokenise) {
            cx.err(
                at,
                &format!("{path}.fields.{}", f.name()),
                "analytics copies never carry a raw or reversible identifier: use drop, generalise or pseudonymise",
            );
        } else if r.consent_key.is_some() && raw {
            cx.err(
                at,
                &format!("{path}.fields.{}", f.name()),
                "a consent-based purpose may not carry a raw identifier",
            );
        }
        if f == Field::Msisdn && matches!(t, Treatment::Mask { .. } | Treatment::Generalise) {
            cx.err(
                at,
                &format!("{path}.fields.msisdn"),
                "a masked msisdn is still personal data but names no one rights can find: keep, pseudonymise, tokenise or drop it",
            );
        }
        if p == Purpose::Marketing && f == Field::Msisdn && t != Treatment::Tokenise {
            cx.err(
                at,
                &format!("{path}.fields.msisdn"),
                "marketing copies carry the subscriber only as a reversible token: use tokenise",
            );
        }
    }
    // Rights (withdrawal, objection, erasure) are keyed by msisdn; a copy that names the
    // subscriber some other way could not be found again when they arrive.
    let names_subscriber = [Field::Imsi, Field::Imei, Field::UeIp]
        .into_iter()
        .any(|f| {
            matches!(
                r.treatment(f),
                Treatment::Keep
                    | Treatment::Pseudonymise
                    | Treatment::Tokenise
                    | Treatment::Mask { .. }
            )
        });
    if names_subscriber && r.subscriber_field.is_none() {
        cx.err(
            at,
            &format!("{path}.fields.msisdn"),
            "copies carry a subscriber identifier, so msisdn must be kept, pseudonymised or tokenised for rights to reach them",
        );
    }
    let li = r
        .basis
        .iter()
        .flatten()
        .any(|b| *b == Basis::LegitimateInterest);
    if (li || p == Purpose::Marketing) && !r.objection.stops {
        cx.err(
            at,
            &format!("{path}.objection"),
            "rests on legitimate interest (or is direct marketing): an objection must stop it (Art. 21)",
        );
    }
    if !r.erasure.stops
        && p != Purpose::Billing
        && !r
            .basis
            .iter()
            .flatten()
            .any(|b| *b == Basis::LegalObligation)
    {
        cx.err(
            at,
            &format!("{path}.erasure"),
            "only a legal obligation (Art. 17(3)(b)) or legal claims (17(3)(e), billing) can hold copies through an erasure",
        );
    }
    match (r.without_consent, r.anonymised, anon_at) {
        (WithoutConsent::Anonymised, None, _) => cx.err(
            at,
            path,
            "`without_consent = \"anonymised\"` needs an `anonymised` field table",
        ),
        (WithoutConsent::NoCopy, Some(_), Some(a)) => cx.err(
            a,
            &format!("{path}.anonymised"),
            "given, but `without_consent` is not `anonymised`",
        ),
        (WithoutConsent::Anonymised, Some(map), Some(a)) => {
            for f in Field::ALL {
                let t = map[f as usize];
                let linkable = f.is_personal_identifier()
                    || matches!(f, Field::RecordId | Field::ChargingId | Field::LocalSeqNo);
                let bad = match f {
                    _ if linkable => t != Treatment::Drop,
                    Field::StartTime | Field::Cell => {
                        !matches!(t, Treatment::Generalise | Treatment::Drop)
                    }
                    _ => matches!(t, Treatment::Pseudonymise | Treatment::Tokenise),
                };
                if bad {
                    cx.err(
                        a,
                        &format!("{path}.anonymised.{}", f.name()),
                        "an anonymised copy must drop identifiers and per-record ids, and generalise or drop time and cell",
                    );
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[policy]
id = "test"
version = "1"
controller = "Test AB"
covers = "testers"
source = "none"

[purposes.billing]
description = "billing"
basis = { traffic = "contract", subscriber = "contract", source = "s1" }
restriction = { effect = "continue", assumption = "legal claims" }
objection = { effect = "not_applicable", source = "s2" }
erasure = { effect = "retain", source = "s3" }
retention = { anchor = "invoice_settled", after = "6 months", source = "s4" }
fields = { msisdn = "keep", start_time = "keep" }
"#;

    #[test]
    fn a_good_policy_compiles() {
        let p = parse_policy(GOOD, "good.toml").unwrap();
        let b = p.rule(Purpose::Billing).unwrap();
        assert_eq!(b.treatment(Field::Msisdn), Treatment::Keep);
        assert_eq!(b.treatment(Field::Imsi), Treatment::Drop);
        assert_eq!(b.retention.period, Period::Months(6));
        assert_eq!(b.subscriber_field, Some(Field::Msisdn));
        assert!(p.rule(Purpose::Marketing).is_none());
    }

    #[test]
    fn every_problem_is_listed_with_its_line() {
        let bad = GOOD
            .replace("after = \"6 months\"", "after = \"forever\"")
            .replace(
                "traffic = \"contract\", subscriber = \"contract\"",
                "traffic = \"contract\"",
            )
            .replace(
                "description = \"billing\"",
                "description = \"billing\"\ncolour = \"red\"",
            );
        let e = parse_policy(&bad, "bad.toml").unwrap_err();
        let msgs: Vec<String> = e
            .problems
            .iter()
            .map(|p| format!("{}:{}", p.line, p.message))
            .collect();
        assert_eq!(e.problems.len(), 3, "{msgs:?}");
        assert!(
            msgs.iter().any(|m| m.starts_with("11:unknown key")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("bounded period")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("without a legal basis for subscriber")),
            "{msgs:?}"
        );
        assert!(e.to_string().contains("bad.toml:11:"));
    }

    #[test]
    fn analytics_may_not_carry_raw_identifiers_and_marketing_must_tokenise() {
        let text = GOOD.to_string()
            + r#"
[purposes.analytics]
description = "stats"
basis = { traffic = "consent", subscriber = "legitimate_interest", source = "s" }
without_consent = "no_copy"
restriction = { effect = "stop", source = "s" }
objection = { effect = "stop", source = "s" }
erasure = { effect = "expire", source = "s" }
retention = { anchor = "event_time", after = "24 months", source = "s" }
fields = { msisdn = "keep", imsi = "mask:0:4" }

[purposes.marketing]
description = "offers"
basis = { traffic = "consent", subscriber = "legitimate_interest", source = "s" }
without_consent = "no_copy"
restriction = { effect = "stop", source = "s" }
objection = { effect = "not_applicable", source = "s" }
erasure = { effect = "expire", source = "s" }
retention = { anchor = "event_time", after = "24 months", source = "s" }
fields = { msisdn = "pseudonymise" }
"#;
        let e = parse_policy(&text, "x.toml").unwrap_err();
        let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
        assert!(
            paths.contains(&"purposes.analytics.fields.msisdn"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"purposes.analytics.fields.imsi"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"purposes.marketing.fields.msisdn"),
            "{paths:?}"
        );
        assert!(paths.contains(&"purposes.marketing.objection"), "{paths:?}");
    }

    #[test]
    fn silence_must_be_an_explicit_assumption() {
        let bad = GOOD.replace(", source = \"s4\"", "");
        let e = parse_policy(&bad, "x.toml").unwrap_err();
        assert!(e.problems[0].message.contains("assumption"), "{e}");
    }
}
