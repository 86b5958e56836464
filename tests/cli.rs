//! The command lines' own contract: `--version` names the version and the source
//! commit, so a released binary can be traced to what it was built from.

mod common;
use common::*;
use std::process::Command;

/// What `--version` may name as the commit: a 40-hex commit, that commit followed by
/// `-dirty` (a Nix build of a work tree with uncommitted changes: `self.dirtyRev`; the
/// binary is not exactly that commit, and says so), or `unknown` (no git, no Nix).
fn is_commit_label(label: &str) -> bool {
    let sha = label.strip_suffix("-dirty").unwrap_or(label);
    label == "unknown" || (sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[test]
fn a_commit_label_is_a_commit_a_dirty_commit_or_unknown() {
    let sha = "0123456789abcdef0123456789abcdef01234567";
    assert!(is_commit_label(sha));
    assert!(is_commit_label(&format!("{sha}-dirty")));
    assert!(is_commit_label("unknown"));
    assert!(!is_commit_label("0123456-dirty"));
    assert!(!is_commit_label(&format!("{sha}-modified")));
    assert!(!is_commit_label("-dirty"));
}

fn version(binary: &str) -> String {
    let out = Command::new(binary).arg("--version").output().expect("run");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn version_names_the_source_commit() {
    for (binary, name) in [(SERVER, "sensor-server"), (CLIENT, "sensor-client")] {
        let text = version(binary);
        let expected = format!("{name} {} (commit ", env!("CARGO_PKG_VERSION"));
        assert!(text.starts_with(&expected), "{text}");
        let commit = text
            .trim_end()
            .trim_start_matches(&expected)
            .trim_end_matches(')');
        assert!(is_commit_label(commit), "{text}");
        // The Nix build sets SENSORHUB_COMMIT (`self.rev or self.dirtyRev`) for the build
        // and its tests alike: the binary names exactly that.
        if let Some(given) = std::env::var_os("SENSORHUB_COMMIT") {
            assert_eq!(commit, given.to_string_lossy(), "{text}");
        }
    }
    // Built in a git checkout (as here and in CI), it is that checkout's HEAD.
    if let Ok(out) = Command::new("git").args(["rev-parse", "HEAD"]).output()
        && out.status.success()
        && std::env::var_os("SENSORHUB_COMMIT").is_none()
    {
        let head = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(version(SERVER).contains(&head), "built from {head}");
    }
}
