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

/// Runs `binary` with `args` (bounded in time by the client's own flags) and returns its
/// exit status and stderr.
fn run(binary: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(binary).args(args).output().expect("run");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn help(binary: &str) -> String {
    let out = Command::new(binary).arg("--help").output().expect("run");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn each_binary_says_what_it_is_and_the_server_names_its_other_commands() {
    let (server, client) = (help(SERVER), help(CLIENT));
    assert!(server.starts_with("Ingests sensor readings"), "{server}");
    assert!(client.starts_with("Simulates sensors"), "{client}");
    for command in [
        "sensor-server verify",
        "sensor-server ship",
        "sensor-server rebuild",
    ] {
        assert!(
            server.contains(command),
            "{command} missing from:\n{server}"
        );
    }
}

#[test]
fn mistyped_flags_say_what_would_be_right() {
    let (status, err) = run(SERVER, &["--workers", "0"]);
    assert!(!status.success());
    assert!(err.contains("must be at least 1"), "{err}");
    for binary in [SERVER, CLIENT] {
        let (status, err) = run(binary, &["--log-level", "loud"]);
        assert!(!status.success());
        assert!(
            err.contains("use one of off, error, warn, info, debug, trace"),
            "{err}"
        );
    }
    let (status, err) = run(
        CLIENT,
        &["--server", "127.0.0.1", "--sensor", "s", "--duration", "1"],
    );
    assert!(!status.success());
    assert!(err.contains("give HOST:PORT, the port is missing"), "{err}");
}

#[test]
fn a_server_that_cannot_listen_leaves_no_data_directory_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = temp_dir("cli-taken-port").join("data");
    let data_dir = dir.to_string_lossy().into_owned();
    let (status, err) = run(SERVER, &["--listen", &addr, "--data-dir", &data_dir]);
    assert!(!status.success());
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(!dir.exists(), "{} was created", dir.display());
}

#[test]
fn a_client_pointed_at_the_http_port_is_told_so() {
    let dir = temp_dir("cli-http-port");
    let server = Server::start(&dir, &[]);
    let (status, err) = run(
        CLIENT,
        &[
            "--server",
            &server.http.to_string(),
            "--sensor",
            "cli-http",
            "--duration",
            "1",
            "--give-up-after",
            "5",
        ],
    );
    assert!(!status.success());
    assert!(err.contains("this is not a sensorhub sensor port"), "{err}");
}

#[test]
fn the_documents_cite_no_issue_numbers_a_reader_cannot_open() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for doc in [
        "README.md",
        "BENCHMARKS.md",
        "docs/architecture.md",
        "docs/protocol.md",
    ] {
        let text = std::fs::read_to_string(root.join(doc)).expect("read");
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            let cites = lower.match_indices("issue ").any(|(at, _)| {
                lower[at + 6..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            });
            assert!(!cites, "{doc}:{}: {line}", n + 1);
        }
    }
}
