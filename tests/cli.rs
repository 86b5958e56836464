//! The command lines' own contract: `--version` names the version and the source
//! commit, so a released binary can be traced to what it was built from.

mod common;
use common::*;
use std::process::Command;

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
        assert!(
            commit == "unknown"
                || (commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{text}"
        );
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
