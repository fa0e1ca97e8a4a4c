//! Renders a compiled policy as the GDPR Art. 30 record of processing (Markdown or JSON).

use std::fmt::Write;

use super::{Cite, Policy, Treatment, WithoutConsent};
use crate::core::purpose::{Category, Field};

fn cite_md(c: &Cite) -> String {
    match c {
        Cite::Source(s) => format!("source: {s}"),
        Cite::Assumption(s) => format!("**ASSUMPTION** (source silent): {s}"),
    }
}

/// The record of processing as Markdown: one section per purpose, assumptions flagged.
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
    let assumptions = count_assumptions(p);
    let _ = writeln!(
        o,
        "- Assumptions where the source is silent: {assumptions} (marked **ASSUMPTION** below)"
    );
    let _ = writeln!(o);
    for r in p.declared() {
        let _ = writeln!(o, "## Purpose `{}`: {}", r.purpose.id(), r.description);
        let _ = writeln!(o);
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
            }
            None => {
                let _ = writeln!(o, "- Consent: not required");
            }
        }
        let _ = writeln!(o, "- Fields in the copy:");
        let _ = writeln!(o);
        let _ = writeln!(o, "  | field | category | treatment |");
        let _ = writeln!(o, "  |---|---|---|");
        for f in Field::ALL {
            let _ = writeln!(
                o,
                "  | {} | {} | {} |",
                f.name(),
                f.category().id(),
                treatment_text(r.treatment(f))
            );
        }
        if let Some(anon) = &r.anonymised {
            let kept: Vec<String> = Field::ALL
                .iter()
                .filter(|f| anon[**f as usize].passes_data())
                .map(|f| format!("{} ({})", f.name(), treatment_text(anon[*f as usize])))
                .collect();
            let _ = writeln!(o);
            let _ = writeln!(o, "- Anonymised copy holds only: {}", kept.join(", "));
        }
        let _ = writeln!(o);
        let ret = &r.retention;
        let _ = writeln!(
            o,
            "- Retention (rule `{}`): deleted {} after {}",
            ret.rule_id,
            ret.period.describe(),
            ret.anchor.id().replace('_', " ")
        );
        let _ = writeln!(o, "  - {}", cite_md(&ret.cite));
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
    if !p.notes.is_empty() {
        let _ = writeln!(o, "## Other statements of the source");
        let _ = writeln!(o);
        for n in &p.notes {
            let _ = writeln!(o, "- **{}**: {} ({})", n.topic, n.text, cite_md(&n.cite));
        }
        let _ = writeln!(o);
    }
    o
}

fn treatment_text(t: Treatment) -> String {
    match t {
        Treatment::Mask { first, last } => format!("mask (keep first {first}, last {last})"),
        t => t.id().to_string(),
    }
}

fn count_assumptions(p: &Policy) -> usize {
    p.declared()
        .flat_map(|r| {
            [
                &r.basis_cite,
                &r.retention.cite,
                &r.restriction.cite,
                &r.objection.cite,
                &r.erasure.cite,
            ]
        })
        .chain(p.notes.iter().map(|n| &n.cite))
        .filter(|c| c.is_assumption())
        .count()
}

/// The same record as JSON, for tooling.
pub fn json(p: &Policy) -> serde_json::Value {
    let purposes: Vec<serde_json::Value> = p
        .declared()
        .map(|r| {
            let fields: serde_json::Map<String, serde_json::Value> = Field::ALL
                .iter()
                .map(|f| (f.name().to_string(), serde_json::json!(treatment_text(r.treatment(*f)))))
                .collect();
            serde_json::json!({
                "purpose": r.purpose.id(),
                "description": r.description,
                "legal_basis": {
                    "subscriber": r.bases(Category::Subscriber).iter().map(|b| serde_json::json!({"basis": b.id(), "article": b.article()})).collect::<Vec<_>>(),
                    "traffic": r.bases(Category::Traffic).iter().map(|b| serde_json::json!({"basis": b.id(), "article": b.article()})).collect::<Vec<_>>(),
                    "cite": r.basis_cite,
                },
                "consent_key": r.consent_key.map(|k| k.id()),
                "without_consent": r.consent_key.map(|_| r.without_consent),
                "fields": fields,
                "retention": {
                    "rule": r.retention.rule_id,
                    "anchor": r.retention.anchor,
                    "after": r.retention.period.describe(),
                    "cite": r.retention.cite,
                },
                "restriction": r.restriction,
                "objection": r.objection,
                "erasure": r.erasure,
            })
        })
        .collect();
    serde_json::json!({
        "policy": p.tag,
        "controller": p.controller,
        "data_subjects": p.covers,
        "source": p.source,
        "assumptions": count_assumptions(p),
        "purposes": purposes,
        "notes": p.notes,
    })
}
