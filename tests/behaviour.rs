//! Runs every behaviour case under tests/behaviour/ (the same cases `cdrguard policy test`
//! runs) and fails with each broken expectation listed; and checks that a case file runs
//! against the policy it names, read from disk.

use std::path::{Path, PathBuf};

use cdrguard::adapters::cases::run_paths;
use cdrguard::cli::load_policy_ref;

#[test]
fn behaviour_cases_pass_for_every_shipped_policy() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/behaviour");
    let report = run_paths(&[dir], &load_policy_ref).unwrap_or_else(|e| panic!("{e}"));
    // Every shipped policy is tested by cases that ran, not only named by a file.
    for (policy, _) in cdrguard::policy::SHIPPED {
        let ran = report.results.iter().filter(|r| r.policy == policy).count();
        assert!(ran > 0, "no behaviour case ran against {policy}");
    }
    assert_eq!(report.failed(), 0, "\n{}", report.render());
}

/// Regression: a case file with `case = []` passed, testing nothing.
#[test]
fn a_case_file_without_cases_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty.toml");
    std::fs::write(&f, "shipped_policy = \"excedo\"\ncase = []\n").unwrap();
    let Err(e) = run_paths(&[f], &load_policy_ref) else {
        panic!("an empty case file passed");
    };
    assert!(e.to_string().contains("declares no case"), "{e}");
}

/// A case: one moc record, and whether Select Telecom's billing copy keeps `cell`.
fn case_file(policy_line: &str, cell: &str) -> String {
    format!(
        r#"{policy_line}

[[case]]
name = "billing {cell} the cell"

[[case.record]]
template = "moc"
record_id = "c1"

[[case.expect]]
record = "c1"
purpose = "billing"
{cell} = ["cell"]
"#
    )
}

/// Regression: `policy test` resolved a case file's policy through the CLI loader, which
/// preferred the compiled-in copy of a shipped name over the file on disk, and a relative
/// path resolved against the working directory, not the case file. Case files now name
/// `policy_file` (relative to themselves, read from disk) or `shipped_policy`.
#[test]
fn case_files_run_against_the_policy_file_they_name_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&cases).unwrap();
    std::fs::create_dir_all(&policies).unwrap();
    // An edited Select Telecom policy whose billing copy keeps the cell.
    let shipped = cdrguard::policy::shipped("select-telecom").unwrap();
    let edited = shipped.replacen(
        r#"cell = { treatment = "drop""#,
        r#"cell = { treatment = "keep""#,
        1,
    );
    assert_ne!(edited, shipped);
    std::fs::write(policies.join("select-telecom.toml"), edited).unwrap();
    let run = |name: &str, text: String| {
        let f = cases.join(name);
        std::fs::write(&f, text).unwrap();
        run_paths(&[f], &load_policy_ref)
    };
    // The relative path is the case file's: run from anywhere, it finds the edited file.
    let on_disk = run(
        "edited.toml",
        case_file(r#"policy_file = "../policies/select-telecom.toml""#, "kept"),
    )
    .unwrap();
    assert_eq!(on_disk.failed(), 0, "\n{}", on_disk.render());
    // The shipped copy, by name, still drops it.
    let compiled = run(
        "shipped.toml",
        case_file(r#"shipped_policy = "select-telecom""#, "absent"),
    )
    .unwrap();
    assert_eq!(compiled.failed(), 0, "\n{}", compiled.render());
    // A case file that names no policy, or both kinds, or the old key, is refused.
    for line in [
        "",
        r#"policy = "select-telecom""#,
        r#"policy_file = "x.toml"
shipped_policy = "excedo""#,
    ] {
        assert!(
            run("bad.toml", case_file(line, "kept")).is_err(),
            "{line:?} accepted"
        );
        std::fs::remove_file(cases.join("bad.toml")).unwrap();
    }
    // A missing policy file is an error, not a fallback to the shipped copy.
    let missing = run(
        "missing.toml",
        case_file(r#"policy_file = "../nowhere/select-telecom.toml""#, "kept"),
    );
    assert!(missing.is_err_and(|e| e.to_string().contains("cannot read")));
    assert!(Path::new(&policies).is_dir());
}
