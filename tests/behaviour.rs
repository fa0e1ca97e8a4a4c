//! Runs every behaviour case under tests/behaviour/ (the same cases `cdrguard policy test`
//! runs) and fails with each broken expectation listed.

use std::path::PathBuf;

#[test]
fn behaviour_cases_pass_for_every_shipped_policy() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/behaviour");
    let report =
        cdrguard::adapters::cases::run_paths(&[dir], &|name| cdrguard::cli::load_policy(name))
            .unwrap_or_else(|e| panic!("{e}"));
    let files: std::collections::BTreeSet<&str> = report
        .results
        .iter()
        .map(|r| r.file.rsplit('/').next().unwrap_or(""))
        .collect();
    for policy in [
        "hektor-mobil",
        "excedo",
        "alleato",
        "partnersec",
        "select-telecom",
    ] {
        assert!(
            files.contains(format!("{policy}.toml").as_str()),
            "no behaviour cases for {policy}: {files:?}"
        );
    }
    assert_eq!(report.failed(), 0, "\n{}", report.render());
}
