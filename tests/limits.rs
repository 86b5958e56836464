//! PROTOCOL.md "Limits and refusals" and "Backpressure": what the server does when
//! clients misbehave or are too many, checked against the real server.

mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn past_max_connections_a_client_is_told_busy_and_closed() {
    let server = Server::start(
        &temp_dir("maxconn"),
        &["--fsync", "never", "--max-connections", "3"],
    );
    let mut held: Vec<Conn> = (0..3).map(|_| server.connect()).collect();
    for (i, c) in held.iter_mut().enumerate() {
        c.send(reading(&format!("m{i}"), "k", 1.0, 1));
        assert_eq!(
            c.reply(),
            r#"{"seq":1,"status":"ok"}"#,
            "connection {i} is served"
        );
    }
    let mut refused = server.connect();
    assert_eq!(
        refused.reply(),
        r#"{"seq":null,"status":"error","error":"server busy"}"#
    );
    refused.expect_eof();
    assert_eq!(server.metric("sensorhub_connections_total"), 4.0);
    assert_eq!(server.metric("sensorhub_connections_open"), 3.0);
    assert_eq!(
        server.metric("sensorhub_readings_total{status=\"error\"}"),
        1.0
    );
    assert_eq!(server.metric("sensorhub_reply_seconds_count"), 4.0);
    // A slot freed is a slot available.
    drop(held.pop());
    wait_until("the closed connection to be noticed", || {
        server.metric("sensorhub_connections_open") == 2.0
    });
    let mut again = server.connect();
    again.send(reading("m9", "k", 1.0, 1));
    assert_eq!(again.reply(), r#"{"seq":1,"status":"ok"}"#);
}

#[test]
fn an_idle_connection_is_closed_without_a_reply() {
    let server = Server::start(
        &temp_dir("idle"),
        &["--fsync", "never", "--idle-timeout", "1"],
    );
    let mut c = server.connect();
    c.send(reading("i", "k", 1.0, 1));
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);
    c.expect_eof();
    // --idle-timeout 0 never closes: the connection outlives several ticks of the
    // other server (checked by it still answering).
    let keeper = Server::start(
        &temp_dir("idle0"),
        &["--fsync", "never", "--idle-timeout", "0"],
    );
    let mut k = keeper.connect();
    k.send(reading("i", "k", 1.0, 1));
    assert_eq!(k.reply(), r#"{"seq":1,"status":"ok"}"#);
    std::thread::sleep(Duration::from_millis(2500)); // longer than the other timeout: a duration under test, not a synchronisation
    k.send(reading("i", "k", 1.0, 2));
    assert_eq!(k.reply(), r#"{"seq":2,"status":"ok"}"#);
}

#[test]
fn a_client_that_never_reads_is_paused_and_others_are_still_served() {
    let server = Server::start(&temp_dir("noread"), &["--fsync", "never"]);
    let before = server.rss_kib();
    // Send up to 64 MiB of readings and never read a reply. Once the server pauses this
    // connection, the kernel buffers fill and the write times out: that is the pause.
    let flood = TcpStream::connect(server.addr).unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut chunk = String::new();
    let mut seq = 0;
    while chunk.len() < 1 << 20 {
        seq += 1;
        chunk.push_str(&reading("flood", "temperature", 20.0, seq));
    }
    let mut sent = 0usize;
    let mut writer = &flood;
    let paused = loop {
        if sent >= 64 << 20 {
            break false;
        }
        match writer.write(chunk.as_bytes()) {
            Ok(n) => sent += n,
            Err(_) => break true,
        }
    };
    assert!(
        paused,
        "64 MiB went in without the server pausing the connection"
    );
    let grown = server.rss_kib().saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "server RSS grew by {grown} KiB for one non-reading client"
    );
    let mut other = server.connect();
    other.send(reading("other", "k", 1.0, 1));
    assert_eq!(other.reply(), r#"{"seq":1,"status":"ok"}"#);
    eprintln!("flood: {sent} bytes accepted before pausing; RSS +{grown} KiB");
}

#[test]
fn half_sent_lines_from_many_connections_do_not_stop_a_normal_client() {
    let server = Server::start(&temp_dir("slowloris"), &["--fsync", "never"]);
    let mut loris: Vec<Conn> = (0..500).map(|_| server.connect()).collect();
    for c in &mut loris {
        c.send(r#"{"sensor":"loris","kind":"k","val"#);
    }
    let mut normal = server.connect();
    for seq in 1..=100 {
        normal.send(reading("normal", "k", 1.0, seq));
        assert_eq!(normal.reply(), format!(r#"{{"seq":{seq},"status":"ok"}}"#));
    }
    assert_eq!(server.metric("sensorhub_connections_open"), 501.0);
    assert!(server.sensors().get("loris").is_none());
}

#[test]
fn running_out_of_file_descriptors_refuses_instead_of_spinning() {
    let dir = temp_dir("emfile");
    let server = Server::start_wrapped(
        &["prlimit", "--nofile=48:48", "--"],
        &dir,
        &["--fsync", "never"],
    );
    // Far more connections than descriptors: the excess is refused, not left hanging.
    let mut conns: Vec<Conn> = (0..80).map(|_| server.connect()).collect();
    let mut served = 0;
    let mut busy = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(reading(&format!("e{i}"), "k", 1.0, 1));
        let r = c.reply();
        if r == r#"{"seq":1,"status":"ok"}"# {
            served += 1;
        } else {
            assert_eq!(r, r#"{"seq":null,"status":"error","error":"server busy"}"#);
            busy += 1;
        }
    }
    assert!(served > 10 && busy > 10, "served {served}, busy {busy}");
    drop(conns);
    // The loop is not spinning on the backlog and still serves once descriptors free up.
    wait_until("descriptors to be released", || {
        server.metric("sensorhub_connections_open") == 0.0
    });
    let mut c = server.connect();
    c.send(reading("after", "k", 1.0, 1));
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid())).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let cpu_ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    assert!(
        cpu_ticks < 500,
        "server used {cpu_ticks} ticks of CPU: spinning?"
    );
}
