//! Faults found by probing from outside (issue "Faults found by probing as a hostile
//! user would"): a full disk, a store that cannot be written, a data directory that is
//! not one. PROTOCOL.md v1.1: while the store cannot write, nothing is acknowledged,
//! `/healthz` answers 503 with the reason, and the server resumes by itself.

mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn read_line(c: &mut std::net::TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while c.read(&mut byte).expect("read reply") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("utf-8")
}

#[test]
#[ignore = "needs root to mount a tmpfs; .ci/run runs it as root"]
fn a_full_disk_pauses_acknowledgements_and_the_server_resumes_by_itself() {
    let base = temp_dir("diskfull");
    let data = base.join("data");
    let _mount = Tmpfs::mount(&data, "512k");
    let mut server = Server::start(&data, &[]);
    let mut c = server.connect();
    c.send(reading("full", "temperature", 20.0, 1));
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);

    // More than the segment's last, partly used page holds: the first few may still be
    // stored, then nothing is acknowledged.
    let filler = fill(&data);
    let mut raw = std::net::TcpStream::connect(server.addr).expect("connect");
    let last = 201;
    raw.write_all(readings(2, last).as_bytes()).expect("send");
    wait_until("/healthz to report the full disk", || {
        server.get("/healthz").0 == 503
    });
    let answered = read_until_silent(&mut raw, 1);
    assert!(
        answered < last,
        "nothing is acknowledged once the disk is full"
    );
    let (_, why) = server.get("/healthz");
    assert!(why.contains("No space left on device"), "{why}");
    assert_eq!(server.metric("sensorhub_store_available"), 0.0);
    assert!(server.metric("sensorhub_store_write_failures_total") >= 1.0);

    std::fs::remove_file(&filler).expect("free space");
    for seq in answered + 1..=last {
        assert_eq!(
            read_line(&mut raw),
            format!(r#"{{"seq":{seq},"status":"ok"}}"#)
        );
    }
    assert_eq!(server.get("/healthz"), (200, "ok".into()));
    assert_eq!(server.metric("sensorhub_store_available"), 1.0);
    assert_eq!(
        stored_seqs(&data),
        (1..=last).collect::<Vec<_>>(),
        "each once, in order"
    );

    // Full again: a stop still exits 0 promptly, giving up what it cannot store.
    let filler = fill(&data);
    raw.write_all(readings(last + 1, last + 200).as_bytes())
        .expect("send");
    wait_until("the full disk noticed", || server.get("/healthz").0 == 503);
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(15)).success());

    // A restart while the disk is still full runs (no crash loop) and waits for space;
    // the sensor resends what was not acknowledged.
    let server = Server::start(&data, &[]);
    let stored = server.sensors()["full"]["count"].as_u64().expect("count");
    let mut c = std::net::TcpStream::connect(server.addr).expect("connect");
    c.write_all(readings(stored + 1, last + 200).as_bytes())
        .expect("send");
    wait_until("the restarted server to notice the full disk", || {
        server.get("/healthz").0 == 503
    });
    let answered = read_until_silent(&mut c, stored);
    std::fs::remove_file(&filler).expect("free space");
    for seq in answered + 1..=last + 200 {
        assert_eq!(
            read_line(&mut c),
            format!(r#"{{"seq":{seq},"status":"ok"}}"#)
        );
    }
    assert_eq!(server.sensors()["full"]["count"], last + 200);
    assert_eq!(
        stored_seqs(&data),
        (1..=last + 200).collect::<Vec<_>>(),
        "nothing lost or twice"
    );
}

fn readings(first: u64, last: u64) -> String {
    (first..=last)
        .map(|seq| reading("full", "temperature", 20.0, seq))
        .collect()
}

fn stored_seqs(dir: &Path) -> Vec<u64> {
    stored_records(dir)
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect()
}

/// Reads `ok` replies for the seqs after `answered` until a second passes in silence;
/// returns the last seq answered.
fn read_until_silent(c: &mut std::net::TcpStream, mut answered: u64) -> u64 {
    c.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match c.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => {
                answered += 1;
                let text = String::from_utf8(std::mem::take(&mut line)).expect("utf-8");
                assert_eq!(text, format!(r#"{{"seq":{answered},"status":"ok"}}"#));
            }
            Ok(1) => line.push(byte[0]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            other => panic!("reading replies: {other:?}"),
        }
    }
    assert!(line.is_empty(), "a partial reply");
    c.set_read_timeout(Some(PATIENCE)).expect("timeout");
    answered
}

#[test]
#[ignore = "needs root for chattr +i; .ci/run runs it as root"]
fn an_immutable_store_file_is_refused_at_start_naming_path_and_operation() {
    let dir = temp_dir("immutable");
    let mut server = Server::start(&dir, &[]);
    let mut c = server.connect();
    c.send(reading("imm", "temperature", 20.0, 1));
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);
    server.signal("TERM");
    assert!(server.wait_exit(PATIENCE).success());
    let checkpoint = dir.join("checkpoint.json");
    assert!(checkpoint.exists());
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .arg(&checkpoint)
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        chattr("+i"),
        "chattr +i failed: the temp dir's file system has no immutable attribute"
    );
    let out = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .output()
        .expect("run server");
    chattr("-i");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot open for writing") && stderr.contains("checkpoint.json"),
        "{stderr}"
    );
}

#[test]
fn a_data_dir_that_is_a_file_is_explained() {
    let dir = temp_dir("notadir");
    let file = dir.join("data");
    std::fs::write(&file, "not a directory").expect("file");
    let started = Instant::now();
    let out = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .expect("run server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not a directory"), "{stderr}");
    assert!(started.elapsed() < PATIENCE);
}

/// A store of 100 readings of sensor "c" after a graceful stop: segment 1 (80
/// readings, past the size limit) and segment 2 (20) both sealed.
fn two_segment_store(dir: &Path) {
    let mut server = Server::start(dir, &["--segment-bytes", "4096"]);
    let mut c = server.connect();
    for (first, last) in [(1, 80), (81, 100)] {
        let lines: String = (first..=last)
            .map(|seq| reading("c", "temperature", 20.0, seq))
            .collect();
        c.send(lines);
        for seq in first..=last {
            assert_eq!(c.reply(), format!(r#"{{"seq":{seq},"status":"ok"}}"#));
        }
    }
    server.signal("TERM");
    assert!(server.wait_exit(PATIENCE).success());
}

fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    file.write_all_at(bytes, at).expect("overwrite");
}

fn verify(dir: &Path) -> (bool, String) {
    let out = Command::new(SERVER)
        .args(["verify", "--data-dir"])
        .arg(dir)
        .output()
        .expect("run verify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Start-up does not read what the checkpoint covers (its time must not grow with the
/// store): a background check finds the damage after start. The statistics keep what
/// was acknowledged, so a resent reading the damaged line held stays `duplicate`
/// (replaying only the intact lines would accept its seq again, and store it twice).
#[test]
fn corruption_inside_what_the_checkpoint_covers_is_found_and_never_reopens_seqs() {
    let dir = temp_dir("corrupt");
    two_segment_store(&dir);
    let (clean, report) = verify(&dir);
    assert!(clean, "{report}");
    assert!(
        report.contains("100 valid records, 1 sensors, 0 problems"),
        "{report}"
    );

    // 200 garbage bytes inside the sealed segment, 4096 NULs inside the later one: the
    // lengths the checkpoint recorded still match.
    let sealed = dir.join("segment-0000000001.jsonl");
    overwrite(&sealed, 100, &[b'#'; 200]);
    let later = dir.join("segment-0000000002.jsonl");
    let later_len = std::fs::metadata(&later).expect("segment 2").len();
    overwrite(&later, 0, &vec![0u8; 4096.min(later_len as usize - 1)]);
    let (clean, report) = verify(&dir);
    assert!(!clean);
    assert!(
        report.contains("segment-0000000001.jsonl byte "),
        "{report}"
    );
    assert!(report.contains("not a valid record"), "{report}");
    assert!(
        report.contains("checkpoint.json: it does not match segment-0000000001.jsonl"),
        "{report}"
    );

    let server = Server::start(&dir, &[]);
    assert_eq!(server.sensors()["c"]["count"], 100, "what was acknowledged");
    wait_until("the background check to find both files", || {
        server.metric("sensorhub_store_corrupt_files") == 2.0
    });
    let log = std::fs::read_to_string(dir.with_extension("server.log")).expect("log");
    assert!(log.contains("segment-0000000001.jsonl: its first"), "{log}");
    let mut c = server.connect();
    c.send(reading("c", "temperature", 20.0, 3));
    assert_eq!(c.reply(), r#"{"seq":3,"status":"duplicate"}"#);
}

#[test]
fn verify_refuses_what_is_not_a_store() {
    let dir = temp_dir("verify-missing").join("nope");
    let (clean, _) = verify(&dir);
    assert!(!clean);
}
