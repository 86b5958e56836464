//! PROTOCOL.md "HTTP side port": exact bodies and values after known traffic.

mod common;
use common::*;
use serde_json::json;

#[test]
fn healthz_sensors_metrics_and_404() {
    let server = Server::start(&temp_dir("http"), &["--fsync", "never"]);
    assert_eq!(server.get("/healthz"), (200, "ok".to_string()));
    assert_eq!(server.sensors(), json!({}), "no stored reading, no sensor");

    // Three stored, one duplicate, one rejected, one error.
    let lines = [
        r#"{"sensor":"client1-temperature","kind":"temperature","value":20,"seq":1,"ts":1000}"#,
        r#"{"sensor":"client1-temperature","kind":"temperature","value":26,"seq":2}"#,
        r#"{"sensor":"client1-temperature","kind":"temperature","value":23,"seq":3,"ts":3000}"#,
        r#"{"sensor":"client1-temperature","kind":"temperature","value":99,"seq":2}"#,
        r#"{"sensor":"h","kind":"humidity","value":150,"seq":1}"#,
        "garbage",
    ];
    let mut c = server.connect();
    for line in lines {
        c.send(format!("{line}\n"));
    }
    for _ in 0..6 {
        c.reply();
    }
    assert_eq!(
        server.sensors(),
        json!({"client1-temperature": {"kind":"temperature","count":3,"min":20.0,"max":26.0,
            "mean":23.0,"last":23.0,"last_seq":3,"last_ts":3000}}),
        "only stored readings count; the rejected sensor is absent"
    );
    assert_eq!(server.metric("sensorhub_connections_open"), 1.0);
    assert_eq!(server.metric("sensorhub_connections_total"), 1.0);
    for (status, n) in [
        ("ok", 3.0),
        ("duplicate", 1.0),
        ("rejected", 1.0),
        ("error", 1.0),
    ] {
        assert_eq!(
            server.metric(&format!("sensorhub_readings_total{{status=\"{status}\"}}")),
            n,
            "{status}"
        );
    }
    assert_eq!(server.metric("sensorhub_reply_seconds_count"), 6.0);
    assert_eq!(
        server.metric("sensorhub_reply_seconds_bucket{le=\"+Inf\"}"),
        6.0
    );
    let expected_bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    assert_eq!(
        server.metric("sensorhub_bytes_received_total"),
        expected_bytes as f64
    );

    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "sensorhub_connections_open gauge",
        "sensorhub_connections_total counter",
        "sensorhub_readings_total counter",
        "sensorhub_bytes_received_total counter",
        "sensorhub_reply_seconds histogram",
    ] {
        assert!(body.contains(&format!("# TYPE {name}\n")), "missing {name}");
    }
    // HTTP connections are not sensor connections.
    assert_eq!(server.metric("sensorhub_connections_total"), 1.0);

    assert_eq!(server.get("/").0, 404);
    assert_eq!(server.get("/sensors/x").0, 404);
    assert_eq!(
        http_request(
            server.http,
            "POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        )
        .0,
        404
    );
    assert_eq!(
        http_request(server.http, "DELETE /sensors HTTP/1.1\r\n\r\n").0,
        404
    );
    assert_eq!(
        http_request(server.http, "\x16\x03\x01 tls hello\r\n\r\n").0,
        400
    );
}

#[test]
fn a_slow_http_peer_does_not_block_sensors() {
    let server = Server::start(&temp_dir("httpslow"), &["--fsync", "never"]);
    let _stalled = std::net::TcpStream::connect(server.http).unwrap();
    let mut c = server.connect();
    c.send(reading("s", "k", 1.0, 1));
    assert_eq!(c.reply(), r#"{"seq":1,"status":"ok"}"#);
    assert_eq!(server.get("/healthz").0, 200);
}
