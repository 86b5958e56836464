//! PROTOCOL.md, "Transport and framing", "Client to server" and "Server to client",
//! clause by clause, against the real server on loopback.

mod common;
use common::*;
use serde_json::json;

fn server(name: &str) -> Server {
    Server::start(&temp_dir(name), &["--fsync", "never"])
}

#[test]
fn each_reply_kind_is_sent_as_the_protocol_shows() {
    let server = server("kinds");
    let mut c = server.connect();
    c.send(reading("client1-temperature", "temperature", 23.4, 17));
    assert_eq!(c.reply(), r#"{"seq":17,"status":"ok"}"#);
    c.send(reading("client1-temperature", "temperature", 23.5, 17));
    assert_eq!(c.reply(), r#"{"seq":17,"status":"duplicate"}"#);
    c.send(reading("client1-temperature", "temperature", 23.5, 3));
    assert_eq!(c.reply(), r#"{"seq":3,"status":"duplicate"}"#);
    c.send(reading("client1-temperature", "temperature", 1000.5, 18));
    let r = c.reply_json();
    assert_eq!(
        (r["seq"].clone(), r["status"].clone()),
        (json!(18), json!("rejected"))
    );
    assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()));
    c.send("this is not json\n");
    let r = c.reply_json();
    assert_eq!(
        (r["seq"].clone(), r["status"].clone()),
        (json!(null), json!("error"))
    );
    assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()));
    // The connection stays open after rejected and error.
    c.send(reading("client1-temperature", "temperature", 20.0, 19));
    assert_eq!(c.reply(), r#"{"seq":19,"status":"ok"}"#);
}

#[test]
fn errors_echo_seq_only_from_one_json_object_with_a_numeric_seq() {
    let server = server("echo");
    let mut c = server.connect();
    let cases = [
        (
            r#"{"sensor":"s","kind":"k","value":"x","seq":42}"#,
            json!(42),
        ),
        (
            r#"{"sensor":"s","kind":"k","value":1,"seq":"42"}"#,
            json!(null),
        ),
        (
            r#"{"sensor":"s","kind":"k","value":1,"seq":5,"ts":null}"#,
            json!(5),
        ),
        (r#"{"sensor":"s","kind":"k","seq":7}"#, json!(7)),
        (
            r#"{"sensor":"s","kind":"k","value":1,"value":1,"seq":8}"#,
            json!(8),
        ),
        (r#"[{"seq":9}]"#, json!(null)),
        (r#"{"seq":9} trailing"#, json!(null)),
        ("\u{1}{\"seq\":9}", json!(null)),
    ];
    for (line, seq) in cases {
        c.send(format!("{line}\n"));
        let r = c.reply_json();
        assert_eq!(r["status"], "error", "{line}");
        assert_eq!(r["seq"], seq, "{line}");
    }
    c.send(b"{\"seq\":1,\"x\":\"\xff\"}\n");
    assert_eq!(
        c.reply(),
        r#"{"seq":null,"status":"error","error":"line is not valid UTF-8"}"#
    );
}

#[test]
fn rule_breaking_numbers_are_rejected_whatever_their_seq() {
    let server = server("rules");
    let mut c = server.connect();
    c.send(reading("s", "humidity", 50.0, 10));
    assert_eq!(c.reply(), r#"{"seq":10,"status":"ok"}"#);
    for (line, seq) in [
        (
            r#"{"sensor":"s","kind":"humidity","value":50,"seq":1.5}"#,
            "1.5",
        ),
        (
            r#"{"sensor":"s","kind":"humidity","value":50,"seq":17.0}"#,
            "17.0",
        ),
        (
            r#"{"sensor":"s","kind":"humidity","value":50,"seq":1e2}"#,
            "1e2",
        ),
        (
            r#"{"sensor":"s","kind":"humidity","value":50,"seq":-1}"#,
            "-1",
        ),
        (
            r#"{"sensor":"s","kind":"humidity","value":1e400,"seq":11}"#,
            "11",
        ),
        (
            r#"{"sensor":"s","kind":"humidity","value":50,"seq":11,"ts":-1}"#,
            "11",
        ),
        // A rule break beats a duplicate seq.
        (
            r#"{"sensor":"s","kind":"humidity","value":101,"seq":10}"#,
            "10",
        ),
        (
            r#"{"sensor":"bad id","kind":"humidity","value":50,"seq":11}"#,
            "11",
        ),
        // The kind is fixed by the first stored reading.
        (
            r#"{"sensor":"s","kind":"temperature","value":20,"seq":12}"#,
            "12",
        ),
    ] {
        c.send(format!("{line}\n"));
        let reply = c.reply();
        assert!(
            reply.starts_with(&format!(
                "{{\"seq\":{seq},\"status\":\"rejected\",\"error\":\""
            )),
            "{line} -> {reply}"
        );
    }
    let stored = server.stored();
    assert_eq!(
        stored.len(),
        1,
        "only the first reading is stored: {stored:?}"
    );
}

#[test]
fn a_thousand_pipelined_lines_are_answered_in_order() {
    let server = server("pipeline");
    let mut c = server.connect();
    let mut batch = String::new();
    let mut expected = Vec::new();
    for i in 0..3000u64 {
        // Interleave replies that take the commit path with ones that do not.
        match i % 3 {
            0 => {
                batch.push_str(&reading("p", "temperature", 20.0, i + 1));
                expected.push(format!(r#"{{"seq":{},"status":"ok"}}"#, i + 1));
            }
            1 => {
                batch.push_str(&format!("{{\"seq\":{i}}}\n"));
                expected.push(format!("{i}:error"));
            }
            _ => {
                batch.push_str(&reading("p", "temperature", 20.0, 1));
                expected.push(r#"{"seq":1,"status":"duplicate"}"#.to_string());
            }
        }
    }
    c.send(&batch);
    for want in expected {
        let got = c.reply();
        if let Some((seq, _)) = want.split_once(":error") {
            let r: serde_json::Value = serde_json::from_str(&got).unwrap();
            assert_eq!(
                (r["seq"].to_string(), r["status"].as_str()),
                (seq.to_string(), Some("error"))
            );
        } else {
            assert_eq!(got, want);
        }
    }
}

#[test]
fn connections_spread_over_several_workers_each_keep_their_order() {
    // Connections are pinned to workers by slab index; with three workers and fsync
    // always, a connection's replies come back partly through the committer and
    // partly straight from its worker, and must still leave in line order.
    let server = Server::start(
        &temp_dir("workers"),
        &["--fsync", "always", "--workers", "3"],
    );
    let mut conns: Vec<Conn> = (0..6).map(|_| server.connect()).collect();
    for (k, c) in conns.iter_mut().enumerate() {
        let mut batch = String::new();
        for seq in 1..=300u64 {
            if seq % 2 == 0 {
                batch.push_str(&format!("{{\"seq\":{seq}}}\n"));
            } else {
                batch.push_str(&reading(&format!("w{k}"), "humidity", 50.0, seq));
            }
        }
        c.send(&batch);
    }
    for c in &mut conns {
        for seq in 1..=300u64 {
            let r = c.reply_json();
            let status = if seq % 2 == 0 { "error" } else { "ok" };
            assert_eq!(
                (r["seq"].as_u64(), r["status"].as_str()),
                (Some(seq), Some(status))
            );
        }
    }
    let sensors = server.sensors();
    for k in 0..6 {
        assert_eq!(sensors[format!("w{k}")]["count"], 150, "sensor w{k}");
    }
}

#[test]
fn a_line_sent_byte_by_byte_is_one_reading() {
    let server = server("bytes");
    let mut c = server.connect();
    c.stream.set_nodelay(true).unwrap();
    for b in reading("slow", "temperature", 21.0, 5).bytes() {
        c.send([b]);
    }
    assert_eq!(c.reply(), r#"{"seq":5,"status":"ok"}"#);
}

#[test]
fn crlf_and_blank_lines() {
    let server = server("blank");
    let mut c = server.connect();
    let line = reading("c", "temperature", 21.0, 1);
    c.send(format!("\n  \t\r\n\r\n{}\r\n \n", line.trim_end()));
    c.send(reading("c", "temperature", 21.0, 2));
    // Blank lines get no reply: the next two replies are the readings'.
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);
    assert_eq!(c.reply(), r#"{"seq":2,"status":"ok"}"#);
}

#[test]
fn half_close_answers_everything_then_closes_and_drops_the_partial_line() {
    let server = server("halfclose");
    let mut c = server.connect();
    let mut data = String::new();
    for seq in 1..=200 {
        data.push_str(&reading("h", "temperature", 21.0, seq));
    }
    data.push_str(r#"{"sensor":"h","kind":"temperature","value":21,"seq":999"#);
    c.send(&data);
    c.half_close();
    for seq in 1..=200 {
        assert_eq!(c.reply(), format!(r#"{{"seq":{seq},"status":"ok"}}"#));
    }
    c.expect_eof();
    assert_eq!(server.sensors()["h"]["last_seq"], 200);
}

#[test]
fn an_overlong_line_is_answered_after_earlier_lines_then_the_connection_closes() {
    let server = Server::start(
        &temp_dir("overlong"),
        &["--fsync", "never", "--max-line-bytes", "100"],
    );
    let mut c = server.connect();
    let exact = format!(
        r#"{{"sensor":"o","kind":"k","value":1,"seq":1,"pad":"{}"}}"#,
        "x".repeat(48)
    );
    assert_eq!(exact.len(), 100);
    c.send(format!("{exact}\r\n"));
    c.send(reading("o", "k", 1.0, 2));
    c.send("y".repeat(500));
    c.send(reading("o", "k", 1.0, 3));
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);
    assert_eq!(c.reply(), r#"{"seq":2,"status":"ok"}"#);
    let r = c.reply_json();
    assert_eq!(
        (r["seq"].clone(), r["status"].clone()),
        (json!(null), json!("error"))
    );
    c.expect_eof();
    assert_eq!(
        server.sensors()["o"]["count"],
        2,
        "nothing after the long line is stored"
    );
    assert_eq!(
        server.metric("sensorhub_readings_total{status=\"error\"}"),
        1.0
    );
}

#[test]
fn an_overlong_line_is_detected_before_its_newline_arrives() {
    let server = Server::start(
        &temp_dir("overlong2"),
        &["--fsync", "never", "--max-line-bytes", "100"],
    );
    let mut c = server.connect();
    // 102 bytes without a newline: more than max + 1.
    c.send("z".repeat(102));
    let r = c.reply_json();
    assert_eq!(r["status"], "error");
    c.expect_eof();
}

#[test]
fn bytes_after_the_last_newline_get_no_reply_when_the_client_closes() {
    let server = server("tail");
    let mut c = server.connect();
    c.send(reading("t", "k", 1.0, 1));
    c.send("{\"sensor\":\"t\",\"kind\":\"k\",\"value\":1,\"seq\":2}");
    c.half_close();
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);
    c.expect_eof();
    assert_eq!(server.stored().len(), 1);
}

#[test]
fn the_store_holds_exactly_the_documented_fields() {
    let server = server("format");
    let mut c = server.connect();
    c.send(r#"{"sensor":"f","kind":"humidity","value":40.5,"seq":3,"ts":1764230400123,"extra":"dropped"}"#.to_owned() + "\n");
    c.send(r#"{"sensor":"f","kind":"humidity","value":41,"seq":4}"#.to_owned() + "\n");
    c.reply();
    c.reply();
    let stored = server.stored();
    assert_eq!(stored.len(), 2);
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&stored[0]),
        ["kind", "recv", "sensor", "seq", "ts", "value"]
    );
    assert_eq!(keys(&stored[1]), ["kind", "recv", "sensor", "seq", "value"]);
    assert_eq!(stored[0]["ts"], 1764230400123u64);
    assert_eq!(stored[0]["value"], 40.5);
    assert!(
        stored[0]["recv"]
            .as_u64()
            .is_some_and(|r| r > 1_700_000_000_000)
    );
}
