//! `sensor-client` against misbehaving servers (PROTOCOL.md v1.1): a server that goes
//! silent mid-stream is left after `--reply-timeout` and its readings are resent
//! elsewhere; a reply that answers another seq is a protocol violation, never an ack;
//! `--give-up-after` ends a run whose connections stay stalled.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the fake server treats the `n`th connection (0-based): given each line's seq
/// and its position on the connection, the reply to write, or `None` to stay silent.
type Script = fn(conn: usize, line: usize, seq: u64) -> Option<String>;

/// A fake sensor-server on 127.0.0.1 following `script`; records every seq it read.
struct FakeServer {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<(usize, u64)>>>,
}

impl FakeServer {
    fn start(script: Script) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (conn, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let log = log.clone();
                std::thread::spawn(move || serve(conn, stream, script, &log));
            }
        });
        FakeServer { addr, seen }
    }

    fn seqs_on(&self, conn: usize) -> Vec<u64> {
        let seen = self.seen.lock().expect("lock");
        seen.iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, s)| *s)
            .collect()
    }
}

fn serve(conn: usize, stream: TcpStream, script: Script, log: &Mutex<Vec<(usize, u64)>>) {
    let mut writer = stream.try_clone().expect("clone");
    for (line, text) in BufReader::new(stream).lines().enumerate() {
        let Ok(text) = text else { return };
        let reading: serde_json::Value = serde_json::from_str(&text).expect("client sends JSON");
        let seq = reading["seq"].as_u64().expect("seq");
        log.lock().expect("lock").push((conn, seq));
        if let Some(reply) = script(conn, line, seq)
            && writer.write_all(format!("{reply}\n").as_bytes()).is_err()
        {
            return;
        }
    }
}

fn ok(seq: u64) -> Option<String> {
    Some(format!(r#"{{"seq":{seq},"status":"ok"}}"#))
}

/// Runs the client (bounded by `limit`) and returns its output and how long it took.
fn run_client(addr: std::net::SocketAddr, args: &[&str], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(CLIENT)
        .args([
            "--server",
            &addr.to_string(),
            "--sensor",
            "fake-1",
            "--interval-ms",
            "10",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("client still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().expect("output"), started.elapsed())
}

/// Per seq, the statuses the --record file holds.
fn recorded(path: &std::path::Path) -> BTreeMap<u64, Vec<String>> {
    let mut by_seq: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).expect("record").lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        by_seq
            .entry(parts[1].parse().expect("seq"))
            .or_default()
            .push(parts[2].to_owned());
    }
    by_seq
}

#[test]
fn a_server_that_goes_silent_mid_stream_is_left_and_its_readings_resent() {
    // First connection: five answers, then silence (a SIGSTOPped or half-open server).
    let fake = FakeServer::start(|conn, line, seq| match conn {
        0 if line >= 5 => None,
        _ => ok(seq),
    });
    let dir = temp_dir("client-silent");
    let record = dir.join("answers");
    let record_arg = record.to_str().expect("path");
    let (out, took) = run_client(
        fake.addr,
        &[
            "--count",
            "20",
            "--reply-timeout",
            "1",
            "--record",
            record_arg,
        ],
        Duration::from_secs(20),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("stalled-connections 1"), "{stdout}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let answers = recorded(&record);
    assert_eq!(answers.len(), 20);
    assert!(
        answers.values().all(|s| s == &["ok"]),
        "each seq answered once: {answers:?}"
    );
    // Everything the silent connection left unanswered was resent on the next one.
    let silent: Vec<u64> = fake.seqs_on(0).into_iter().skip(5).collect();
    assert!(!silent.is_empty());
    let second = fake.seqs_on(1);
    assert!(
        silent.iter().all(|s| second.contains(s)),
        "{silent:?} resent in {second:?}"
    );
}

#[test]
fn a_reply_for_another_seq_is_a_protocol_violation_never_an_ack() {
    // First connection answers "seq 1 ok" to everything.
    let fake = FakeServer::start(|conn, _, seq| match conn {
        0 => ok(1),
        _ => ok(seq),
    });
    let dir = temp_dir("client-mismatch");
    let record = dir.join("answers");
    let record_arg = record.to_str().expect("path");
    let (out, _) = run_client(
        fake.addr,
        &["--count", "10", "--record", record_arg],
        Duration::from_secs(20),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("protocol-violations 1"), "{stdout}");
    assert!(stderr.contains("protocol violation"), "{stderr}");
    let answers = recorded(&record);
    assert_eq!(answers.len(), 10, "{answers:?}");
    assert!(answers.values().all(|s| s == &["ok"]));
    assert!(!answers.contains_key(&1), "the bogus seq is never recorded");
    let first = fake.seqs_on(0)[0];
    assert!(
        fake.seqs_on(1).contains(&first),
        "the violated reading is resent"
    );
}

#[test]
fn give_up_after_ends_a_run_whose_server_never_answers() {
    let fake = FakeServer::start(|_, _, _| None);
    let (out, took) = run_client(
        fake.addr,
        &[
            "--count",
            "5",
            "--reply-timeout",
            "1",
            "--give-up-after",
            "3",
        ],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("giving up"), "{stderr}");
    assert!(took < Duration::from_secs(8), "gave up after {took:?}");
    assert!(
        !fake.seqs_on(1).is_empty(),
        "it reconnected and resent before giving up"
    );
}

#[test]
fn a_closed_port_is_not_counted_as_a_reconnect() {
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (out, _) = run_client(port, &["--count", "1", "--give-up-after", "1"], PATIENCE);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stdout.contains("reconnects 0"), "{stdout}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(
        !stderr.contains("lost"),
        "no connection existed to lose: {stderr}"
    );
}

/// Whether this environment can give a program a pseudo-terminal (build sandboxes may
/// not).
/// Runs the client on a pseudo-terminal (util-linux `script`), as a person would, and
/// returns everything it printed.
fn on_a_terminal(server: &Server, extra: &str) -> String {
    let command = format!(
        "{CLIENT} --server {} --sensor tty-1 --interval-ms 50 --count 50 {extra}",
        server.addr
    );
    let out = Command::new("timeout")
        .args(["30", "script", "-qec", &command, "/dev/null"])
        .output()
        .expect("run script");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs a pseudo-terminal (util-linux script), which the Nix sandbox lacks; .ci/run runs it"]
fn on_a_terminal_the_client_reports_progress_unless_quiet() {
    let server = Server::start(&temp_dir("client-tty"), &["--fsync", "never"]);
    let shown = on_a_terminal(&server, "");
    assert!(
        shown.contains("tty-1: ") && shown.contains(" stored ("),
        "{shown}"
    );
    assert!(shown.contains("in flight, 0 reconnects"), "{shown}");
    let quiet = on_a_terminal(&server, "--quiet");
    assert!(!quiet.contains(" stored ("), "{quiet}");
    assert!(
        quiet.contains("sent 50"),
        "the summary still ends the run: {quiet}"
    );
}
