//! Renders a compiled policy as the GDPR Art. 30(1) record of processing (Markdown or
//! JSON): controller, purposes with their routes and bases, categories of data and what
//! each copy holds, recipients, retention (open-ended phases marked), and the security
//! measures. Both formats mark every assumption as such.

use std::fmt::Write;

use serde_json::{Value, json};

use super::{Anchor, Cite, Note, Policy, PurposeRule, WithoutConsent};
use crate::vocab::purpose::{Category, Field};
use crate::vocab::treatment::Treatment;

/// How Markdown marks a rule the source does not state.
pub const ASSUMPTION: &str = "**ASSUMPTION**";
/// How both formats mark a retention phase with no upper bound of its own.
pub const OPEN_ENDED: &str = "OPEN-ENDED";

fn cite_md(c: &Cite) -> String {
    match c {
        Cite::Source(s) => format!("source: {s}"),
        Cite::Assumption(s) => format!("{ASSUMPTION} (source silent): {s}"),
    }
}

fn cite_json(c: &Cite) -> Value {
    match c {
        Cite::Source(s) => json!({"source": s, "assumption": false}),
        Cite::Assumption(s) => json!({"reason": s, "assumption": true}),
    }
}

fn treatment_text(t: Treatment) -> String {
    match t {
        Treatment::Mask { first, last } => format!("mask (keep first {first}, last {last})"),
        t => t.id().to_string(),
    }
}

/// One phase of a retention rule: what holds the copy, and whether that phase has an end
/// of its own.
struct Phase {
    text: String,
    open_ended: bool,
}

/// The retention rule as phases: while the anchor has not happened (open-ended, for
/// settlement and contract end), then the period after it.
fn phases(r: &PurposeRule) -> Vec<Phase> {
    let ret = &r.retention;
    let after = ret.period.describe();
    match ret.anchor {
        Anchor::EventTime => vec![Phase {
            text: format!("deleted {after} after the record's own time"),
            open_ended: false,
        }],
        Anchor::InvoiceSettled => vec![
            Phase {
                text: "kept until the invoice covering the record's period is settled: an unsettled invoice keeps its windows open, with no upper bound".into(),
                open_ended: true,
            },
            Phase {
                text: format!("then deleted {after} after settlement"),
                open_ended: false,
            },
        ],
        Anchor::ContractEnd => vec![
            Phase {
                text: "kept while the subscriber's contract runs, with no upper bound".into(),
                open_ended: true,
            },
            Phase {
                text: format!("then deleted {after} after the contract ends"),
                open_ended: false,
            },
        ],
    }
}

/// The technical measures cdrguard itself applies under this policy (Art. 30(1)(g),
/// Art. 32), derived from the treatments the policy uses; not statements of the source.
fn technical_measures(p: &Policy) -> Vec<String> {
    let uses = |t: fn(Treatment) -> bool| {
        p.declared()
            .any(|r| r.fields.iter().any(|x| t(*x)) || r.anonymised.iter().flatten().any(|x| t(*x)))
    };
    let mut out = Vec::new();
    if uses(|t| t == Treatment::Pseudonymise) {
        out.push("Pseudonyms: keyed BLAKE3 (128 bits) under a key derived per purpose from the master key, so pseudonyms of different purposes cannot be linked; a pseudonym never contains the raw value and cannot be reversed.".to_string());
    }
    if uses(|t| t == Treatment::Tokenise) {
        out.push("Tokens: FF1 format-preserving encryption (NIST SP 800-38G, AES-256) under a per-purpose key; only the holder of the key file can reverse them (`cdrguard keys reverse`).".to_string());
    }
    if uses(|t| matches!(t, Treatment::Pseudonymise | Treatment::Tokenise)) {
        out.push("Key ids: every copy holding a pseudonym or token names its key (`<key id>.<purpose>`) in its envelope and headers. Keys come from a key file (mode 600), never from code, and are never logged; retired keys stay only to reverse old tokens.".to_string());
    }
    if uses(|t| matches!(t, Treatment::Generalise | Treatment::Mask { .. })) {
        out.push("Generalisation: times to the hour, cells to their area, IP addresses to their network, IMEIs to the device model (TAC), durations to a class and volumes to their order of magnitude, where the field tables say so.".to_string());
    }
    if p.declared().any(|r| r.consent_key.is_some()) {
        out.push("Fail-closed consent: a consent-based copy is made only after a consent event granting it has been read (in Kafka mode the control topic is read to its end before any record); unknown or withdrawn consent gives no copy, or the anonymised copy where the policy has one. A withdrawal or objection expires earlier copies.".to_string());
    }
    if p.declared().any(|r| r.anonymised.is_some()) {
        out.push("Anonymised copies: no identifier, no per-record id, no key id, only coarse values (the loader refuses anything else); their legal basis is tagged `anonymous` (recital 26).".to_string());
    }
    out.push("Purpose limitation: a copy is made only for a purpose this policy declares, with only the fields its table lets through; every copy carries its purpose, legal basis, consent state, treatments and retention rule, and downstream stores get a retention-expiry event when it must be deleted.".to_string());
    out
}

fn count_assumptions(p: &Policy) -> usize {
    p.declared()
        .flat_map(|r| {
            [
                Some(&r.basis_cite),
                r.consent_cite.as_ref(),
                Some(&r.fields_cite),
                r.anonymised_cite.as_ref(),
                Some(&r.retention.cite),
                Some(&r.restriction.cite),
                Some(&r.objection.cite),
                Some(&r.erasure.cite),
            ]
            .into_iter()
            .flatten()
            .chain(r.field_notes.iter().flatten())
            .chain(r.anonymised_notes.iter().flatten())
        })
        .chain(
            p.recipients
                .iter()
                .chain(&p.measures)
                .chain(&p.notes)
                .map(|n| &n.cite),
        )
        .filter(|c| c.is_assumption())
        .count()
}

fn field_rows(
    o: &mut String,
    map: &[Treatment; Field::COUNT],
    notes: &[Option<Cite>; Field::COUNT],
) {
    let _ = writeln!(o, "  | field | category | treatment | why |");
    let _ = writeln!(o, "  |---|---|---|---|");
    for f in Field::ALL {
        let t = map[f as usize];
        let why = notes[f as usize]
            .as_ref()
            .map(|c| cite_md(c).replace('|', "\\|"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  | {} | {} | {} | {why} |",
            f.name(),
            f.category().id(),
            treatment_text(t)
        );
    }
}

fn statements_md(o: &mut String, notes: &[Note]) {
    for n in notes {
        let _ = writeln!(o, "- **{}**: {} ({})", n.topic, n.text, cite_md(&n.cite));
    }
}

/// The record of processing as Markdown: one section per purpose, then recipients,
/// security measures and the source's other statements; assumptions flagged.
pub fn markdown(p: &Policy) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Record of processing activities (GDPR Art. 30): {}",
        p.controller
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "- Policy: `{}` (file `{}`)", p.tag, p.file);
    let _ = writeln!(o, "- Controller: {}", p.controller);
    let _ = writeln!(o, "- Data subjects: {}", p.covers);
    let _ = writeln!(o, "- Source document: {}", p.source);
    let _ = writeln!(
        o,
        "- Categories of personal data: subscriber data (msisdn, imsi, imei, ue_ip) and traffic data (other party, times, duration, volumes, networks, cell location, record metadata)"
    );
    let _ = writeln!(
        o,
        "- Assumptions where the source is silent: {} (marked {ASSUMPTION} below)",
        count_assumptions(p)
    );
    let _ = writeln!(o);
    for r in p.declared() {
        let _ = writeln!(o, "## Purpose `{}`: {}", r.purpose.id(), r.description);
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "- Route: `{}` (default topic `{}`)",
            r.purpose.id(),
            r.topic
        );
        for c in Category::ALL {
            let b = r.bases(c);
            let text = if b.is_empty() {
                "not processed".to_string()
            } else {
                b.iter()
                    .map(|b| format!("{} (Art. {})", b.id(), b.article()))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let _ = writeln!(o, "- Legal basis, {} data: {text}", c.id());
        }
        let _ = writeln!(o, "  - {}", cite_md(&r.basis_cite));
        match r.consent_key {
            Some(k) => {
                let w = match r.without_consent {
                    WithoutConsent::NoCopy => "no copy is made",
                    WithoutConsent::Anonymised => "an anonymised copy is made",
                };
                let _ = writeln!(
                    o,
                    "- Consent: required (consent key `{}`); without it {w}",
                    k.id()
                );
                if let Some(c) = &r.consent_cite {
                    let _ = writeln!(o, "  - {}", cite_md(c));
                }
            }
            None => {
                let _ = writeln!(o, "- Consent: not required");
            }
        }
        let _ = writeln!(o, "- Fields in the copy ({})", cite_md(&r.fields_cite));
        let _ = writeln!(o);
        field_rows(&mut o, &r.fields, &r.field_notes);
        if let Some(anon) = &r.anonymised {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "- Anonymised copy (without consent), holds only what is not dropped{}:",
                r.anonymised_cite
                    .as_ref()
                    .map(|c| format!(" ({})", cite_md(c)))
                    .unwrap_or_default()
            );
            let _ = writeln!(o);
            field_rows(&mut o, anon, &r.anonymised_notes);
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "- Retention (rule `{}`):", r.retention.rule_id);
        for ph in phases(r) {
            let mark = if ph.open_ended {
                format!("**{OPEN_ENDED}** ")
            } else {
                String::new()
            };
            let _ = writeln!(o, "  - {mark}{}", ph.text);
        }
        let _ = writeln!(o, "  - {}", cite_md(&r.retention.cite));
        let rights = [
            (
                "Restriction (Art. 18)",
                &r.restriction,
                "processing stops",
                "processing continues",
            ),
            (
                "Objection (Art. 21)",
                &r.objection,
                "processing stops",
                "not applicable",
            ),
            (
                "Erasure (Art. 17)",
                &r.erasure,
                "copies expire at once",
                "copies are held until their own deadline",
            ),
        ];
        for (name, rule, yes, no) in rights {
            let _ = writeln!(
                o,
                "- {name}: {}; {}",
                if rule.stops { yes } else { no },
                cite_md(&rule.cite)
            );
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "## Recipients and categories of recipients (Art. 30(1)(d), third countries (e))"
    );
    let _ = writeln!(o);
    if p.recipients.is_empty() {
        let _ = writeln!(o, "- The source names no recipients.");
    }
    statements_md(&mut o, &p.recipients);
    let _ = writeln!(o);
    let _ = writeln!(o, "## Security measures (Art. 30(1)(g), Art. 32)");
    let _ = writeln!(o);
    let _ = writeln!(o, "Stated by the source:");
    let _ = writeln!(o);
    if p.measures.is_empty() {
        let _ = writeln!(o, "- The source states no security measures.");
    }
    statements_md(&mut o, &p.measures);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Applied by cdrguard to every copy under this policy (technical measures of the processing, not statements of the source):"
    );
    let _ = writeln!(o);
    for m in technical_measures(p) {
        let _ = writeln!(o, "- {m}");
    }
    let _ = writeln!(o);
    if !p.notes.is_empty() {
        let _ = writeln!(o, "## Other statements of the source");
        let _ = writeln!(o);
        statements_md(&mut o, &p.notes);
        let _ = writeln!(o);
    }
    o
}

fn fields_json(map: &[Treatment; Field::COUNT], notes: &[Option<Cite>; Field::COUNT]) -> Value {
    let m: serde_json::Map<String, Value> = Field::ALL
        .iter()
        .map(|f| {
            (
                f.name().to_string(),
                json!({
                    "treatment": treatment_text(map[*f as usize]),
                    "category": f.category().id(),
                    "why": notes[*f as usize].as_ref().map(cite_json),
                }),
            )
        })
        .collect();
    Value::Object(m)
}

fn statements_json(notes: &[Note]) -> Vec<Value> {
    notes
        .iter()
        .map(|n| json!({"topic": n.topic, "text": n.text, "cite": cite_json(&n.cite)}))
        .collect()
}

fn right_json(r: &super::RightRule, stop: &str, go: &str) -> Value {
    json!({"effect": if r.stops { stop } else { go }, "cite": cite_json(&r.cite)})
}

/// The same record as JSON, for tooling. Every cite is `{"source": .., "assumption":
/// false}` or `{"reason": .., "assumption": true}`.
pub fn json(p: &Policy) -> Value {
    let purposes: Vec<Value> = p
        .declared()
        .map(|r| {
            let bases = |c: Category| {
                r.bases(c)
                    .iter()
                    .map(|b| json!({"basis": b.id(), "article": b.article()}))
                    .collect::<Vec<_>>()
            };
            json!({
                "purpose": r.purpose.id(),
                "description": r.description,
                "topic": r.topic,
                "legal_basis": {
                    "subscriber": bases(Category::Subscriber),
                    "traffic": bases(Category::Traffic),
                    "cite": cite_json(&r.basis_cite),
                },
                "consent": r.consent_key.map(|k| json!({
                    "key": k.id(),
                    "without": r.without_consent,
                    "cite": r.consent_cite.as_ref().map(cite_json),
                })),
                "fields": fields_json(&r.fields, &r.field_notes),
                "fields_cite": cite_json(&r.fields_cite),
                "anonymised": r.anonymised.as_ref().map(|a| json!({
                    "fields": fields_json(a, &r.anonymised_notes),
                    "cite": r.anonymised_cite.as_ref().map(cite_json),
                })),
                "retention": {
                    "rule": r.retention.rule_id,
                    "anchor": r.retention.anchor,
                    "after": r.retention.period.describe(),
                    "phases": phases(r).iter().map(|ph| json!({
                        "text": ph.text,
                        "open_ended": ph.open_ended,
                    })).collect::<Vec<_>>(),
                    "cite": cite_json(&r.retention.cite),
                },
                "restriction": right_json(&r.restriction, "stop", "continue"),
                "objection": right_json(&r.objection, "stop", "not_applicable"),
                "erasure": right_json(&r.erasure, "expire", "retain"),
            })
        })
        .collect();
    json!({
        "policy": p.tag,
        "file": p.file,
        "controller": p.controller,
        "data_subjects": p.covers,
        "source": p.source,
        "assumptions": count_assumptions(p),
        "purposes": purposes,
        "recipients": statements_json(&p.recipients),
        "security_measures": {
            "stated": statements_json(&p.measures),
            "technical": technical_measures(p),
        },
        "notes": statements_json(&p.notes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse_policy, shipped};

    fn policy(name: &str) -> Policy {
        parse_policy(shipped(name).unwrap(), name).unwrap()
    }

    #[test]
    fn markdown_has_every_art_30_part_and_marks_assumptions() {
        let md = markdown(&policy("alleato"));
        for want in [
            "## Purpose `billing`",
            "- Route: `analytics` (default topic `cdr.analytics`)",
            "## Recipients and categories of recipients (Art. 30(1)(d)",
            "**authorities**",
            "## Security measures (Art. 30(1)(g)",
            "keyed BLAKE3",
            "FF1",
            "Fail-closed consent",
            "- Anonymised copy (without consent), holds only what is not dropped",
            "| usage | traffic | generalise |",
            "**OPEN-ENDED** kept until the invoice covering the record's period is settled",
            "- Consent: required (consent key `analytics`); without it an anonymised copy is made",
        ] {
            assert!(md.contains(want), "missing {want:?}");
        }
        // The anonymised table, with its reasons.
        let anon = md.split("- Anonymised copy").nth(1).unwrap();
        let anon = anon.split("- Retention").next().unwrap();
        assert!(anon.contains("| msisdn | subscriber | drop |"), "{anon}");
        assert!(
            anon.contains("| duration_s | traffic | generalise | **ASSUMPTION**"),
            "{anon}"
        );
        // Each assumption is marked where it applies, and counted.
        let marked = md.matches(ASSUMPTION).count();
        let counted = count_assumptions(&policy("alleato"));
        assert!(
            marked > counted,
            "{marked} marks, {counted} counted (+ the header)"
        );
        assert!(md.contains(&format!(
            "Assumptions where the source is silent: {counted}"
        )));
    }

    #[test]
    fn json_has_the_same_record_including_the_anonymised_table() {
        let p = policy("alleato");
        let j = json(&p);
        let analytics = j["purposes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["purpose"] == "analytics")
            .unwrap();
        assert_eq!(analytics["topic"], "cdr.analytics");
        assert_eq!(analytics["consent"]["without"], "anonymised");
        assert_eq!(analytics["consent"]["cite"]["assumption"], true);
        let anon = &analytics["anonymised"]["fields"];
        assert_eq!(anon["usage"]["treatment"], "generalise");
        assert_eq!(anon["msisdn"]["treatment"], "drop");
        assert_eq!(anon["usage"]["why"]["assumption"], true);
        let billing = &j["purposes"][0];
        assert_eq!(billing["retention"]["phases"][0]["open_ended"], true);
        assert_eq!(billing["retention"]["phases"][1]["open_ended"], false);
        assert_eq!(billing["retention"]["cite"]["assumption"], false);
        assert!(j["recipients"].as_array().unwrap().len() >= 5);
        assert!(
            j["security_measures"]["technical"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m.as_str().unwrap().starts_with("Key ids"))
        );
        assert_eq!(j["assumptions"], count_assumptions(&p));
    }

    #[test]
    fn retention_phases_follow_the_anchor() {
        let excedo = policy("excedo");
        let trouble = excedo
            .rule(crate::vocab::purpose::Purpose::Troubleshooting)
            .unwrap();
        let ph = phases(trouble);
        assert!(ph[0].open_ended && ph[0].text.contains("while the subscriber's contract runs"));
        assert_eq!(ph[1].text, "then deleted 1 year after the contract ends");
        let fraud = excedo.rule(crate::vocab::purpose::Purpose::Fraud).unwrap();
        let ph = phases(fraud);
        assert_eq!(ph.len(), 1);
        assert!(!ph[0].open_ended && ph[0].text == "deleted 6 months after the record's own time");
    }

    #[test]
    fn missing_recipients_and_measures_are_said_not_left_out() {
        let md = markdown(&policy("excedo"));
        assert!(md.contains("- The source states no security measures."));
        // Select Telecom neither pseudonymises nor tokenises: no such measure is claimed.
        let select = markdown(&policy("select-telecom"));
        assert!(!select.contains("keyed BLAKE3") && !select.contains("FF1"));
        assert!(!select.contains("Fail-closed consent"));
        assert!(select.contains("**confidentiality**"));
    }
}
