//! Every shipped policy compiles, cites a source or an assumption for every rule, and
//! declares what POLICIES.md states.

use std::path::Path;

use cdrguard::core::purpose::Purpose;
use cdrguard::policy::load_file;

const SHIPPED: [&str; 5] = [
    "hektor-mobil",
    "excedo",
    "alleato",
    "partnersec",
    "select-telecom",
];

fn load(name: &str) -> cdrguard::policy::Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("policies/{name}.toml"));
    load_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_shipped_policy_compiles() {
    for name in SHIPPED {
        let p = load(name);
        assert_eq!(p.id, name);
        assert!(p.declared().count() >= 1, "{name} declares nothing");
    }
}

#[test]
fn purposes_match_policies_md() {
    // Rows of POLICIES.md "Purposes and legal bases": billing everywhere; fraud,
    // analytics and marketing for the four that state them; Select Telecom only billing.
    for name in ["hektor-mobil", "excedo", "alleato", "partnersec"] {
        let p = load(name);
        for purpose in [
            Purpose::Billing,
            Purpose::Fraud,
            Purpose::Analytics,
            Purpose::Marketing,
        ] {
            assert!(p.rule(purpose).is_some(), "{name} lacks {}", purpose.id());
        }
    }
    let select = load("select-telecom");
    for purpose in [Purpose::Fraud, Purpose::Analytics, Purpose::Marketing] {
        assert!(
            select.rule(purpose).is_none(),
            "select-telecom must not declare {}",
            purpose.id()
        );
    }
}
