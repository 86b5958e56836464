//! PROTOCOL.md "Delivery guarantees" and the stop contract: crashes, restarts and
//! SIGTERM lose nothing that was acknowledged, and resends become duplicates.

mod common;
use common::*;
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Per sensor, the seqs stored, asserting none is stored twice.
fn stored_seqs(dir: &std::path::Path) -> BTreeMap<String, Vec<u64>> {
    let mut by_sensor: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in stored_records(dir) {
        by_sensor
            .entry(r["sensor"].as_str().unwrap().to_owned())
            .or_default()
            .push(r["seq"].as_u64().unwrap());
    }
    for (sensor, seqs) in &by_sensor {
        let unique: HashSet<_> = seqs.iter().collect();
        assert_eq!(unique.len(), seqs.len(), "{sensor}: a seq is stored twice");
    }
    by_sensor
}

#[test]
fn acknowledged_readings_survive_kill_9_and_resends_become_duplicates() {
    let dir = temp_dir("kill9");
    let server = Server::start(&dir, &[]); // --fsync always, the default
    let mut c = server.connect();
    let mut lines = String::new();
    for seq in 1..=2000 {
        lines.push_str(&reading("k9", "temperature", 21.0, seq));
    }
    c.send(&lines);
    for seq in 1..=2000 {
        assert_eq!(c.reply(), format!(r#"{{"seq":{seq},"status":"ok"}}"#));
    }
    server.crash();
    assert_eq!(stored_seqs(&dir)["k9"], (1..=2000).collect::<Vec<_>>());

    let server = Server::start(&dir, &[]);
    assert_eq!(server.sensors()["k9"]["count"], 2000);
    assert_eq!(server.sensors()["k9"]["last_seq"], 2000);
    let mut c = server.connect();
    c.send(&lines);
    for seq in 1..=2000 {
        assert_eq!(
            c.reply(),
            format!(r#"{{"seq":{seq},"status":"duplicate"}}"#)
        );
    }
    c.send(reading("k9", "temperature", 21.0, 2001));
    assert_eq!(c.reply(), r#"{"seq":2001,"status":"ok"}"#);
    assert_eq!(stored_seqs(&dir)["k9"].len(), 2001);
}

#[test]
fn a_graceful_stop_checkpoints_so_restart_replays_nothing() {
    let dir = temp_dir("checkpoint");
    let mut server = Server::start(&dir, &[]);
    let mut c = server.connect();
    for seq in 1..=300 {
        c.send(reading(
            &format!("cp{}", seq % 3),
            "humidity",
            (seq % 100) as f64,
            seq,
        ));
    }
    for _ in 1..=300 {
        c.reply();
    }
    let before = server.sensors();
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(dir.join("checkpoint.json").exists());

    let server = Server::start(&dir, &[]);
    assert_eq!(
        server.sensors(),
        before,
        "statistics survive a restart exactly"
    );
    let log = std::fs::read_to_string(dir.with_extension("server.log")).unwrap();
    assert!(
        log.contains("replayed 0 bytes"),
        "start-up replayed data the checkpoint covers:\n{log}"
    );
    let mut c = server.connect();
    c.send(reading("cp0", "humidity", 1.0, 300)); // seq 300 went to cp0
    assert_eq!(c.reply(), r#"{"seq":300,"status":"duplicate"}"#);
}

#[test]
fn a_torn_write_is_cut_at_restart_and_the_rest_is_kept() {
    let dir = temp_dir("torn");
    let server = Server::start(&dir, &["--fsync", "never"]);
    let mut c = server.connect();
    c.send(reading("t", "k", 1.0, 1));
    c.reply();
    server.crash();
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap();
    f.write_all(b"not a record\n{\"sensor\":\"t\",\"ki")
        .unwrap();
    drop(f);
    let server = Server::start(&dir, &[]);
    assert_eq!(server.sensors()["t"]["count"], 1);
    let text = std::fs::read_to_string(&segment).unwrap();
    assert!(
        text.ends_with("not a record\n"),
        "corrupt line kept, torn tail cut: {text:?}"
    );
    let mut c = server.connect();
    c.send(reading("t", "k", 1.0, 2));
    assert_eq!(c.reply(), r#"{"seq":2,"status":"ok"}"#);
}

#[test]
fn sigterm_while_a_client_pipelines_answers_what_was_read_and_exits_0() {
    let dir = temp_dir("sigterm");
    let mut server = Server::start(&dir, &[]);
    let c = server.connect();
    let mut writer = c.stream.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    // Keep sending until the server stops reading (bounded in count and time).
    let sender = std::thread::spawn(move || {
        let started = Instant::now();
        for seq in 1..=2_000_000u64 {
            if started.elapsed() > Duration::from_secs(15)
                || writer
                    .write_all(reading("term", "k", 1.0, seq).as_bytes())
                    .is_err()
            {
                return seq;
            }
        }
        0
    });
    let mut reader = BufReader::new(c.stream.try_clone().unwrap());
    let mut acked = Vec::new();
    let mut line = String::new();
    while acked.len() < 500 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        acked.push(line.clone());
    }
    server.signal("TERM");
    let stopped = Instant::now();
    // Read every remaining reply until the server shuts its write side.
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.ends_with('\n') => acked.push(line.clone()),
            Ok(_) => panic!("partial reply {line:?}"),
        }
    }
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    eprintln!(
        "stopped in {:?} after {} replies",
        stopped.elapsed(),
        acked.len()
    );
    drop(c);
    let _ = sender.join();
    for (i, reply) in acked.iter().enumerate() {
        assert_eq!(reply, &format!("{{\"seq\":{},\"status\":\"ok\"}}\n", i + 1));
    }
    // Every line read was answered: what is stored is exactly what was acknowledged.
    assert_eq!(
        stored_seqs(&dir)["term"],
        (1..=acked.len() as u64).collect::<Vec<_>>()
    );
}

fn run_client(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(CLIENT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sensor-client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn recorded(path: &std::path::Path) -> Vec<(String, u64, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            (
                f.next().unwrap().to_owned(),
                f.next().unwrap().parse().unwrap(),
                f.next().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_client_reconnects_across_a_server_restart_and_each_seq_is_stored_once() {
    let dir = temp_dir("reconnect");
    let record = dir.with_extension("record");
    let _ = std::fs::remove_file(&record);
    let server = Server::start(&dir, &[]);
    let addr = server.addr;
    let mut client = Command::new(CLIENT)
        .args([
            "--server",
            &addr.to_string(),
            "--sensor",
            "rc-1",
            "--kind",
            "humidity",
        ])
        .args(["--interval-ms", "5", "--count", "600", "--record"])
        .arg(&record)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the first readings to be stored", || {
        server
            .sensors()
            .get("rc-1")
            .is_some_and(|s| s["count"].as_u64() > Some(100))
    });
    server.crash();
    let server = Server::start_on(addr, &dir, &[]);
    let deadline = Instant::now() + PATIENCE * 2;
    let status = loop {
        if let Some(s) = client.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "client did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut summary = String::new();
    std::io::Read::read_to_string(client.stdout.as_mut().unwrap(), &mut summary).unwrap();
    assert!(status.success(), "client failed: {summary}");
    assert!(!summary.contains("reconnects 0 "), "{summary}");
    let answers = recorded(&record);
    assert_eq!(answers.len(), 600);
    assert!(
        answers
            .iter()
            .all(|(_, _, s)| s == "ok" || s == "duplicate")
    );
    let mut sent: Vec<u64> = answers.iter().map(|(_, seq, _)| *seq).collect();
    sent.sort();
    assert_eq!(
        stored_seqs(&dir)["rc-1"],
        sent,
        "every seq the client had answered is stored, once"
    );
    assert_eq!(server.sensors()["rc-1"]["count"], 600);
}

#[test]
fn a_restarted_client_never_reuses_a_seq() {
    let dir = temp_dir("clientrestart");
    let server = Server::start(&dir, &["--fsync", "never"]);
    let record = dir.with_extension("record");
    let _ = std::fs::remove_file(&record);
    let addr = server.addr.to_string();
    for _ in 0..3 {
        let (ok, out, err) = run_client(&[
            "--server",
            &addr,
            "--sensor",
            "restart-1",
            "--interval-ms",
            "1",
            "--count",
            "50",
            "--window",
            "8",
            "--record",
            record.to_str().unwrap(),
        ]);
        assert!(ok, "{out}{err}");
        assert!(out.contains("ok 50 duplicate 0"), "{out}");
    }
    let answers = recorded(&record);
    assert_eq!(answers.len(), 150);
    assert!(
        answers.windows(2).all(|w| w[0].1 < w[1].1),
        "seqs increase across runs"
    );
    assert_eq!(server.sensors()["restart-1"]["count"], 150);
}

#[test]
fn the_client_exits_non_zero_when_readings_are_rejected_or_the_server_is_gone() {
    let dir = temp_dir("clientfail");
    let server = Server::start(&dir, &["--fsync", "never"]);
    let addr = server.addr.to_string();
    let mut c = server.connect();
    c.send(reading("fixed", "humidity", 50.0, 1));
    c.reply();
    let (ok, out, err) = run_client(&[
        "--server",
        &addr,
        "--sensor",
        "fixed",
        "--kind",
        "temperature",
        "--count",
        "3",
        "--interval-ms",
        "1",
    ]);
    assert!(!ok);
    assert!(out.contains("rejected 3"), "{out}");
    assert!(err.contains("rejected"), "{err}");
    drop(c);
    server.crash();
    let started = Instant::now();
    let (ok, _, err) = run_client(&[
        "--server",
        &addr,
        "--sensor",
        "x",
        "--count",
        "1",
        "--give-up-after",
        "2",
    ]);
    assert!(!ok);
    assert!(err.contains("unreachable"), "{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "retried for the whole period"
    );
}

#[test]
fn a_second_server_on_the_same_directory_is_refused_even_with_lock_files_deleted() {
    let dir = temp_dir("dirlock");
    let first = Server::start(&dir, &[]);
    let mut c = first.connect();
    c.send(reading("lock", "temperature", 1.0, 1));
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);
    // Whatever a user deletes besides the data, the directory stays locked.
    for entry in std::fs::read_dir(&dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "jsonl") {
            let _ = std::fs::remove_file(path);
        }
    }
    let mut second = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn second server");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = second.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the second server is running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success());
    assert!(
        stderr.contains("in use by another sensor-server"),
        "{stderr}"
    );
    // The first one is unaffected.
    c.send(reading("lock", "temperature", 1.0, 2));
    assert_eq!(c.reply(), r#"{"seq":2,"status":"ok"}"#);
}
