//! `sensor-client --stdin [--spool DIR]`: real values from standard input. Each line is
//! a number or `{"value": V, "ts": MS}`; the client adds seq and ts, resends until
//! answered, exits 0 at the end of input once all is answered, and with a spool keeps
//! what it read across a kill -9.

mod common;
use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};

/// Starts `sensor-client --stdin` for sensor `pi-1` sending to `server`, stdin piped.
fn forwarder(server: &str, extra: &[&str]) -> Child {
    Command::new(CLIENT)
        .args(["--server", server, "--stdin", "--sensor", "pi-1"])
        .args(["--kind", "temperature", "--reply-timeout", "1"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sensor-client")
}

/// Closes the client's input and waits (bounded) for it to exit, draining its output
/// meanwhile (a client blocked on a full stderr pipe would look hung).
fn finish(mut child: Child) -> Output {
    drop(child.stdin.take());
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(PATIENCE) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid]).status();
            panic!("sensor-client did not exit at the end of its input");
        }
    }
}

fn write_lines(stdin: &mut ChildStdin, text: &str) {
    stdin
        .write_all(text.as_bytes())
        .expect("write to the client");
    stdin.flush().expect("flush");
}

/// The readings a spool holds (lines after its header).
fn spooled(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("spool"))
        .map(|text| text.lines().skip(1).count())
        .unwrap_or(0)
}

/// The stored values of `pi-1`, sorted, each with its seq.
fn stored_values(server: &Server) -> Vec<(f64, u64)> {
    let mut values: Vec<(f64, u64)> = server
        .stored()
        .iter()
        .filter(|r| r["sensor"] == "pi-1")
        .map(|r| {
            (
                r["value"].as_f64().expect("value"),
                r["seq"].as_u64().expect("seq"),
            )
        })
        .collect();
    values.sort_by(|a, b| a.0.total_cmp(&b.0));
    values
}

#[test]
fn each_line_becomes_a_stored_reading_and_the_end_of_input_ends_the_client() {
    let dir = temp_dir("stdin-values");
    let server = Server::start(&dir.join("data"), &[]);
    let mut client = forwarder(&server.addr.to_string(), &[]);
    let stdin = client.stdin.as_mut().expect("stdin");
    write_lines(
        stdin,
        "21.5\n\n{\"value\": 22, \"ts\": 1764230400123}\n  -3.25\r\n",
    );
    write_lines(stdin, "23"); // the last line needs no newline
    let out = finish(client);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sent 4 ") && stdout.contains("ok 4 "),
        "{stdout}"
    );

    let stored = server.stored();
    let values: Vec<f64> = stored
        .iter()
        .map(|r| r["value"].as_f64().expect("value"))
        .collect();
    assert_eq!(values, [21.5, 22.0, -3.25, 23.0], "in the order read");
    assert_eq!(
        stored[1]["ts"], 1_764_230_400_123u64,
        "the line's own ts is kept"
    );
    for r in &stored {
        assert_eq!(
            (r["sensor"].as_str(), r["kind"].as_str()),
            (Some("pi-1"), Some("temperature"))
        );
        assert!(r["ts"].as_u64().is_some(), "the client adds a ts: {r}");
    }
    let seqs: Vec<u64> = stored
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs increase: {seqs:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_line_that_is_not_a_value_is_named_skipped_and_makes_the_exit_non_zero() {
    let dir = temp_dir("stdin-bad");
    let server = Server::start(&dir.join("data"), &[]);
    let mut client = forwarder(&server.addr.to_string(), &[]);
    let stdin = client.stdin.as_mut().expect("stdin");
    write_lines(stdin, "1\nabc\n{\"value\":2,\"unit\":\"C\"}\n3\n");
    let out = finish(client);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a bad line must not pass unnoticed: {stderr}"
    );
    assert!(
        stderr.contains("stdin line 2: \"abc\" is not a number"),
        "{stderr}"
    );
    assert!(
        stderr.contains("stdin line 3: unknown field `unit`"),
        "{stderr}"
    );
    assert!(stderr.contains("2 input lines were not values"), "{stderr}");
    let values: Vec<f64> = stored_values(&server).iter().map(|v| v.0).collect();
    assert_eq!(values, [1.0, 3.0], "the good lines around them are stored");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn values_read_while_the_server_is_down_survive_a_kill_9_of_the_client() {
    let dir = temp_dir("stdin-spool-down");
    let spool = dir.join("spool");
    let spool_arg = spool.to_str().expect("utf-8 path");
    // A port with nothing listening (yet).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut client = forwarder(&addr.to_string(), &["--spool", spool_arg]);
    let lines: String = (0..500).map(|i| format!("{i}.5\n")).collect();
    write_lines(client.stdin.as_mut().expect("stdin"), &lines);
    wait_until("the client to spool all 500 values", || {
        spooled(&spool) == 500
    });
    client.kill().expect("kill -9");
    let _ = client.wait();

    let server = Server::start_on(addr, &dir.join("data"), &[]);
    let restarted = finish(forwarder(&addr.to_string(), &["--spool", spool_arg]));
    let stderr = String::from_utf8_lossy(&restarted.stderr);
    assert!(restarted.status.success(), "{stderr}");
    assert!(stderr.contains("sending 500 readings again"), "{stderr}");
    let values: Vec<f64> = stored_values(&server).iter().map(|v| v.0).collect();
    let expected: Vec<f64> = (0..500).map(|i| f64::from(i) + 0.5).collect();
    assert_eq!(values, expected, "every value read, stored once");
    assert_eq!(
        spooled(&spool),
        0,
        "a client that ends with all answered empties its spool"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_killed_mid_stream_and_restarted_stores_every_value_exactly_once() {
    let dir = temp_dir("stdin-spool-kill");
    let spool = dir.join("spool");
    let spool_arg = spool.to_str().expect("utf-8 path");
    let server = Server::start(&dir.join("data"), &[]);
    let addr = server.addr.to_string();
    let mut client = forwarder(&addr, &["--spool", spool_arg]);
    // Quarter degrees, so that all 4000 values lie in the temperature range.
    let value = |i: u32| f64::from(i) / 4.0;
    let first: String = (0..3000).map(|i| format!("{}\n", value(i))).collect();
    write_lines(client.stdin.as_mut().expect("stdin"), &first);
    wait_until("the first values to be stored", || {
        !server.stored().is_empty()
    });
    wait_until("all 3000 values to be spooled", || spooled(&spool) >= 3000);
    client.kill().expect("kill -9");
    let _ = client.wait();

    // Started again, it resends what its spool holds (the server answers what it already
    // stored `duplicate`), then goes on with new input.
    let mut client = forwarder(&addr, &["--spool", spool_arg]);
    let rest: String = (3000..4000).map(|i| format!("{}\n", value(i))).collect();
    write_lines(client.stdin.as_mut().expect("stdin"), &rest);
    let out = finish(client);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stored = stored_values(&server);
    let values: Vec<f64> = stored.iter().map(|v| v.0).collect();
    let expected: Vec<f64> = (0..4000).map(value).collect();
    assert_eq!(values, expected, "each value stored exactly once");
    let mut by_seq: Vec<(u64, f64)> = stored.iter().map(|&(v, s)| (s, v)).collect();
    by_seq.sort_by_key(|&(s, _)| s);
    let in_seq_order: Vec<f64> = by_seq.iter().map(|&(_, v)| v).collect();
    assert_eq!(
        in_seq_order, expected,
        "seqs follow the order the values were read"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_spool_of_another_sensor_or_in_use_is_refused_before_anything_is_sent() {
    let dir = temp_dir("stdin-spool-refused");
    let spool = dir.join("spool");
    let spool_arg = spool.to_str().expect("utf-8 path");
    let server = Server::start(&dir.join("data"), &[]);
    let addr = server.addr.to_string();
    let mut holder = forwarder(&addr, &["--spool", spool_arg]);
    write_lines(holder.stdin.as_mut().expect("stdin"), "1\n");
    wait_until("the first client to spool", || spooled(&spool) == 1);

    let second = finish(forwarder(&addr, &["--spool", spool_arg]));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        stderr.contains("is in use by another sensor-client"),
        "{stderr}"
    );
    holder.kill().expect("kill");
    let _ = holder.wait();

    let other = Command::new(CLIENT)
        .args([
            "--server", &addr, "--stdin", "--sensor", "pi-2", "--spool", spool_arg,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(stderr.contains("holds readings of sensor pi-1"), "{stderr}");
    assert!(
        server.stored().iter().all(|r| r["sensor"] != "pi-2"),
        "nothing sent for the refused client"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs root to mount a 1 MiB tmpfs; .ci/run runs it as root"]
fn on_a_full_disk_values_wait_unsent_until_the_spool_can_keep_them() {
    let dir = temp_dir("stdin-spool-full");
    let server = Server::start(&dir.join("data"), &[]);
    let spool = dir.join("spool");
    let _tmpfs = Tmpfs::mount(&spool, "1m");
    let log = dir.join("client.log");
    let mut client = Command::new(CLIENT)
        .args([
            "--server",
            &server.addr.to_string(),
            "--stdin",
            "--sensor",
            "pi-1",
        ])
        .arg("--spool")
        .arg(&spool)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn sensor-client");
    let stdin = client.stdin.as_mut().expect("stdin");
    write_lines(stdin, "0.25\n");
    wait_until("the first value to be stored", || {
        stored_values(&server).len() == 1
    });

    // More than the slack of the spool's last page, which a full disk still takes.
    let filler = fill(&spool);
    let more: String = (2..2000)
        .map(|i| format!("{}\n", f64::from(i) / 4.0))
        .collect();
    write_lines(stdin, &more);
    let log_says = |what: &str| std::fs::read_to_string(&log).is_ok_and(|l| l.contains(what));
    wait_until("the client to report the full spool", || {
        log_says("cannot append")
    });
    let in_spool: Vec<f64> = std::fs::read_to_string(spool.join("spool"))
        .expect("spool")
        .lines()
        .skip(1)
        .map(|line| {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .expect("value")
        })
        .collect();
    assert!(in_spool.len() < 1999, "some values wait for space");
    for (value, _) in stored_values(&server) {
        assert!(
            in_spool.contains(&value),
            "{value} was sent before the spool kept it"
        );
    }

    std::fs::remove_file(filler).expect("free the disk");
    wait_until("the waiting values to be stored", || {
        stored_values(&server).len() == 1999
    });
    let out = finish(client);
    assert!(
        out.status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let values: Vec<f64> = stored_values(&server).iter().map(|v| v.0).collect();
    let expected: Vec<f64> = (1..2000).map(|i| f64::from(i) / 4.0).collect();
    assert_eq!(values, expected, "each value stored once");
    drop(_tmpfs);
    let _ = std::fs::remove_dir_all(&dir);
}
