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

/// One health probe with a short deadline of its own, as a load balancer sends it:
/// the status, or `None` when no answer came in time.
fn probe(addr: std::net::SocketAddr) -> Option<u16> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

#[test]
fn a_flood_of_idle_connections_cannot_starve_healthz() {
    let server = Server::start(&temp_dir("http-flood"), &["--fsync", "never"]);
    // Far more than the side port serves at once, none of them sending anything.
    let flood: Vec<std::net::TcpStream> = (0..2000)
        .map(|_| std::net::TcpStream::connect(server.http).expect("connect"))
        .collect();
    let answers: Vec<Option<u16>> = (0..20).map(|_| probe(server.http)).collect();
    let ok = answers.iter().filter(|a| **a == Some(200)).count();
    eprintln!("flood of 2000 idle connections: /healthz answered 200 to {ok} of 20 probes");
    assert!(answers.iter().all(|a| *a == Some(200)), "{answers:?}");
    drop(flood);
    assert_eq!(server.get("/healthz"), (200, "ok".into()));
}

#[test]
fn slowloris_peers_cannot_starve_healthz() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let server = Server::start(&temp_dir("http-slowloris"), &["--fsync", "never"]);
    let addr = server.http;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // 300 peers, each a byte a second of a request head that never ends, each
            // reconnecting as soon as it is closed.
            let open = || {
                let s = std::net::TcpStream::connect(addr).ok()?;
                s.set_nonblocking(true).ok()?;
                Some(s)
            };
            let mut peers: Vec<Option<std::net::TcpStream>> = (0..300).map(|_| open()).collect();
            let deadline = Instant::now() + Duration::from_secs(15);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                for peer in &mut peers {
                    let alive = peer.as_mut().is_some_and(|s| s.write(b"G").is_ok());
                    if !alive {
                        *peer = open();
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3)); // the attack being simulated runs a while
    let started = Instant::now();
    let mut answers = Vec::new();
    while started.elapsed() < Duration::from_secs(6) {
        answers.push(probe(addr));
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    attack.join().expect("attack thread");
    let ok = answers.iter().filter(|a| **a == Some(200)).count();
    eprintln!(
        "300 slowloris peers: /healthz answered 200 to {ok} of {} probes",
        answers.len()
    );
    assert_eq!(
        ok,
        answers.len(),
        "healthz answered {ok} of {} probes: {answers:?}",
        answers.len()
    );
}

#[test]
fn out_of_descriptors_the_http_port_answers_503_instead_of_hanging() {
    let dir = temp_dir("http-emfile");
    let server = Server::start_wrapped(
        &["prlimit", "--nofile=48:48", "--"],
        &dir,
        &["--fsync", "never"],
    );
    // Sensor connections take every descriptor the server has.
    let conns: Vec<Conn> = (0..80).map(|_| server.connect()).collect();
    // It answers (503, from the reserve descriptor) rather than leaving the peer hanging.
    wait_until("a 503 from the HTTP port", || {
        probe(server.http) == Some(503)
    });
    drop(conns);
    wait_until("descriptors released", || probe(server.http) == Some(200));
}

#[test]
fn the_page_is_served_only_when_asked_for_and_loads_nothing_from_elsewhere() {
    let plain = Server::start(&temp_dir("http-no-page"), &[]);
    assert_eq!(
        plain.get("/").0,
        404,
        "the protocol: any other path is a 404"
    );
    let server = Server::start(&temp_dir("http-page"), &["--http-page"]);
    let (status, body) = server.get("/");
    assert_eq!(status, 200);
    assert!(
        body.contains("<canvas") && body.contains("/sensors"),
        "{body}"
    );
    assert!(
        !body.contains("http://") && !body.contains("https://") && !body.contains("//cdn"),
        "the page must not load anything from elsewhere"
    );
}
