//! TLS on the sensor port (PROTOCOL.md v1.2): certificates made by `sensor-server certs`,
//! a server with `--tls-cert --tls-key --tls-client-ca`, and clients that prove who they
//! are, or fail to: another sensor's certificate, a wrong CA, expired and not-yet-valid
//! certificates, plain TCP, a silent handshake, a flood of them, handshakes paced by
//! `--tls-max-handshakes`, and rotation by SIGHUP.

mod common;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// `sensor-server certs --dir DIR ARGS...`, which must succeed.
fn certs(dir: &Path, args: &[&str]) {
    let out = Command::new(SERVER)
        .arg("certs")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run sensor-server certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and certificates for `pi-1` and `sim-*`.
fn pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    certs(
        &pki,
        &[
            "--server",
            "127.0.0.1",
            "--sensor",
            "pi-1",
            "--sensor",
            "sim-*",
        ],
    );
    pki
}

fn tls_server(dir: &Path, pki: &Path, extra: &[&str]) -> Server {
    let file = |name: &str| pki.join(name).to_string_lossy().into_owned();
    let (cert, key, ca) = (file("server.pem"), file("server.key"), file("ca.pem"));
    let mut args = vec![
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ];
    args.extend_from_slice(extra);
    Server::start(&dir.join("data"), &args)
}

#[allow(deprecated)] // ring: see src/tls.rs
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A blocking TLS client trusting `ca` and presenting `identity` (cert, key PEM).
struct TlsClient {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    fn connect(addr: SocketAddr, ca: &Path, identity: Option<(&[u8], &[u8])>) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("ca") {
            roots.add(cert.expect("ca cert")).expect("add ca");
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert)
                        .collect::<Result<Vec<_>, _>>()
                        .expect("cert"),
                    PrivateKeyDer::from_pem_slice(key).expect("key"),
                )
                .expect("client auth"),
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(PATIENCE)).expect("timeout");
        TlsClient {
            stream: rustls::StreamOwned::new(conn, tcp),
        }
    }

    fn of(addr: SocketAddr, pki: &Path, who: &str) -> TlsClient {
        let read = |ext: &str| std::fs::read(pki.join(format!("{who}.{ext}"))).expect("pem");
        let (cert, key) = (read("pem"), read("key"));
        TlsClient::connect(addr, &pki.join("ca.pem"), Some((&cert, &key)))
    }

    fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(line.as_bytes())?;
        self.stream.flush()
    }

    /// The next reply line, or the error that ended the connection.
    fn reply(&mut self) -> std::io::Result<serde_json::Value> {
        let mut line = String::new();
        let mut reader = BufReader::new(&mut self.stream);
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(serde_json::from_str(&line).expect("a JSON reply"))
    }

    /// The server certificate this connection got (after the handshake).
    fn server_certificate(&mut self) -> Vec<u8> {
        let stream = &mut self.stream;
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .expect("handshake");
        }
        let certs = self.stream.conn.peer_certificates().expect("peer certs");
        certs[0].to_vec()
    }
}

/// A certificate for `ids` from the CA in `pki`, valid from `not_before` to `not_after`.
fn sensor_cert(
    pki: &Path,
    ids: &[&str],
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (Vec<u8>, Vec<u8>) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).expect("key"))
            .expect("ca key");
    let ca_pem = std::fs::read_to_string(pki.join("ca.pem")).expect("ca");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    for id in ids {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName((*id).try_into().expect("ia5")));
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

/// The failures `/metrics` counts for `reason`.
fn failures(server: &Server, reason: &str) -> f64 {
    server.metric(&format!(
        "sensorhub_tls_handshake_failures_total{{reason=\"{reason}\"}}"
    ))
}

/// True when the connection ends (EOF or an error) before any reply arrives.
fn refused(client: &mut TlsClient) -> bool {
    let sent = client.send(&reading("pi-1", "temperature", 20.0, 1));
    sent.is_err() || client.reply().is_err()
}

#[test]
fn a_certificate_writes_for_the_sensors_it_names_and_only_those() {
    let dir = temp_dir("tls-grant");
    let pki = pki(&dir);
    let server = tls_server(&dir, &pki, &[]);
    let mut pi = TlsClient::of(server.addr, &pki, "sensor-pi-1");
    pi.send(&reading("pi-1", "temperature", 20.5, 1))
        .expect("send");
    assert_eq!(pi.reply().expect("reply")["status"], "ok");

    pi.send(&reading("pi-2", "temperature", 21.5, 1))
        .expect("send");
    let refusal = pi.reply().expect("a reply, the connection stays open");
    assert_eq!(refusal["status"], "rejected");
    assert_eq!(refusal["seq"], 1);
    let reason = refusal["reason"].as_str().expect("a reason");
    assert!(
        reason.contains("pi-2"),
        "the reason names the sensor: {reason}"
    );

    pi.send(&reading("pi-1", "temperature", 20.75, 2))
        .expect("send");
    assert_eq!(pi.reply().expect("reply")["status"], "ok", "still open");

    let mut sim = TlsClient::of(server.addr, &pki, "sensor-sim-_all");
    for (i, id) in ["sim-0", "sim-17", "simulated"].iter().enumerate() {
        sim.send(&reading(id, "temperature", 20.0, i as u64 + 1))
            .expect("send");
        let expected = if *id == "simulated" { "rejected" } else { "ok" };
        assert_eq!(sim.reply().expect("reply")["status"], expected, "{id}");
    }
    let stored: Vec<String> = server
        .stored()
        .iter()
        .map(|r| r["sensor"].as_str().expect("sensor").to_string())
        .collect();
    assert_eq!(
        stored,
        ["pi-1", "pi-1", "sim-0", "sim-17"],
        "nothing else stored"
    );
    assert_eq!(server.metric("sensorhub_tls_handshakes_total"), 2.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn certificates_from_another_ca_or_out_of_date_or_none_are_refused() {
    let dir = temp_dir("tls-refused");
    let pki = pki(&dir);
    let other = dir.join("other");
    certs(&other, &["--sensor", "pi-1"]);
    let server = tls_server(&dir, &pki, &[]);

    let read = |p: PathBuf| std::fs::read(p).expect("pem");
    let (cert, key) = (
        read(other.join("sensor-pi-1.pem")),
        read(other.join("sensor-pi-1.key")),
    );
    let mut foreign = TlsClient::connect(server.addr, &pki.join("ca.pem"), Some((&cert, &key)));
    assert!(refused(&mut foreign), "a certificate of another CA");
    wait_until("the unknown CA to be counted", || {
        failures(&server, "unknown_ca") == 1.0
    });

    let day = time::Duration::days(1);
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = sensor_cert(&pki, &["pi-1"], now - 30 * day, now - day);
    let mut expired = TlsClient::connect(server.addr, &pki.join("ca.pem"), Some((&cert, &key)));
    assert!(refused(&mut expired), "an expired certificate");
    wait_until("the expiry to be counted", || {
        failures(&server, "expired") == 1.0
    });

    let (cert, key) = sensor_cert(&pki, &["pi-1"], now + day, now + 30 * day);
    let mut early = TlsClient::connect(server.addr, &pki.join("ca.pem"), Some((&cert, &key)));
    assert!(refused(&mut early), "a certificate not valid yet");
    wait_until("the early one to be counted", || {
        failures(&server, "not_yet_valid") == 1.0
    });

    let mut anonymous = TlsClient::connect(server.addr, &pki.join("ca.pem"), None);
    assert!(refused(&mut anonymous), "no certificate at all");
    wait_until("the missing one to be counted", || {
        failures(&server, "no_certificate") == 1.0
    });

    assert!(server.stored().is_empty(), "none of them stored anything");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_tcp_to_the_tls_port_is_closed_and_stores_nothing() {
    let dir = temp_dir("tls-plain");
    let pki = pki(&dir);
    let server = tls_server(&dir, &pki, &[]);
    let mut plain = TcpStream::connect(server.addr).expect("connect");
    plain.set_read_timeout(Some(PATIENCE)).expect("timeout");
    plain
        .write_all(reading("pi-1", "temperature", 20.0, 1).as_bytes())
        .expect("send");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer); // an alert at most, then the close
    assert!(
        !String::from_utf8_lossy(&answer).contains("\"status\""),
        "no reply"
    );
    wait_until("the plain peer to be counted", || {
        failures(&server, "not_tls") == 1.0
    });
    assert!(server.stored().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_silent_handshake_is_closed_at_its_deadline_and_a_flood_of_them_spares_a_sensor() {
    let dir = temp_dir("tls-silent");
    let pki = pki(&dir);
    let server = tls_server(&dir, &pki, &["--tls-handshake-timeout", "1"]);
    let started = Instant::now();
    let silent: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    let mut pi = TlsClient::of(server.addr, &pki, "sensor-pi-1");
    for seq in 1..=100 {
        pi.send(&reading("pi-1", "temperature", 20.0, seq))
            .expect("send");
        assert_eq!(pi.reply().expect("reply")["status"], "ok");
    }
    for mut peer in silent {
        peer.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let closed = matches!(peer.read(&mut [0u8; 64]), Ok(0) | Err(_));
        assert!(closed, "a silent peer is closed");
    }
    assert!(
        started.elapsed() < PATIENCE,
        "within the deadline's tick, not never"
    );
    wait_until("the timeouts to be counted", || {
        failures(&server, "timeout") == 300.0
    });
    assert_eq!(
        server.metric("sensorhub_connections_open"),
        1.0,
        "the sensor stays"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn handshakes_past_the_limit_wait_in_the_backlog_until_one_finishes() {
    let dir = temp_dir("tls-paced");
    let pki = pki(&dir);
    let server = tls_server(
        &dir,
        &pki,
        &["--tls-max-handshakes", "1", "--tls-handshake-timeout", "60"],
    );
    // A peer that sends its ClientHello and goes quiet holds the one handshake slot
    // (a peer that sends nothing at all would not: silent peers cost no work).
    let mut stalled = TlsClient::of(server.addr, &pki, "sensor-pi-1");
    let stream = &mut stalled.stream;
    stream
        .conn
        .write_tls(&mut stream.sock)
        .expect("send the ClientHello");
    // The server's answer proves it has read the ClientHello: the slot is taken.
    assert!(
        stream
            .conn
            .read_tls(&mut stream.sock)
            .expect("the ServerHello")
            > 0,
        "the server answers the ClientHello"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let (addr, pki_dir) = (server.addr, pki.clone());
    std::thread::spawn(move || {
        let mut sensor = TlsClient::of(addr, &pki_dir, "sensor-pi-1");
        let answer = sensor
            .send(&reading("pi-1", "temperature", 20.0, 1))
            .and_then(|()| sensor.reply());
        let _ = tx.send(answer.map(|reply| reply["status"].clone()));
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(1)).is_err(),
        "the second handshake waits while the first is worked on"
    );
    drop(stalled);
    let status = rx
        .recv_timeout(PATIENCE)
        .expect("served once the slot is free")
        .expect("a reply");
    assert_eq!(status, "ok");
    // Dropped with the server's flight unread: a reset (io) or a FIN (closed).
    assert_eq!(
        failures(&server, "closed") + failures(&server, "io"),
        1.0,
        "the stalled one, ended by its peer"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_rotates_the_server_certificate_without_dropping_connections() {
    let dir = temp_dir("tls-rotate");
    let pki = pki(&dir);
    let server = tls_server(&dir, &pki, &[]);
    let mut before = TlsClient::of(server.addr, &pki, "sensor-pi-1");
    before
        .send(&reading("pi-1", "temperature", 20.0, 1))
        .expect("send");
    assert_eq!(before.reply().expect("reply")["status"], "ok");
    let old_cert = before.server_certificate();

    certs(&pki, &["--server", "127.0.0.1"]); // a new server certificate, same CA
    let new_cert = CertificateDer::pem_file_iter(pki.join("server.pem"))
        .expect("pem")
        .next()
        .expect("a certificate")
        .expect("readable")
        .to_vec();
    assert_ne!(old_cert, new_cert);
    server.signal("HUP");
    wait_until("a new connection to get the new certificate", || {
        TlsClient::of(server.addr, &pki, "sensor-pi-1").server_certificate() == new_cert
    });
    before
        .send(&reading("pi-1", "temperature", 20.5, 2))
        .expect("send");
    assert_eq!(
        before.reply().expect("reply")["status"],
        "ok",
        "the old session goes on"
    );

    // A broken file on SIGHUP: logged, and the certificate in use stays.
    std::fs::write(pki.join("server.key"), b"not a key").expect("break the key");
    server.signal("HUP");
    let log = dir.join("data.server.log");
    wait_until("the failed reload to be logged", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("stay in use"))
    });
    let mut after = TlsClient::of(server.addr, &pki, "sensor-pi-1");
    assert_eq!(after.server_certificate(), new_cert);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sensor_client_speaks_tls_and_says_which_file_is_wrong() {
    let dir = temp_dir("tls-client");
    let pki = pki(&dir);
    let server = tls_server(&dir, &pki, &[]);
    let file = |name: &str| pki.join(name).to_string_lossy().into_owned();
    let client = |extra: &[&str]| {
        Command::new(CLIENT)
            .args(["--server", &server.addr.to_string(), "--sensor", "pi-1"])
            .args([
                "--count",
                "20",
                "--interval-ms",
                "5",
                "--give-up-after",
                "3",
            ])
            .args(extra)
            .output()
            .expect("run sensor-client")
    };
    let (ca, cert, key) = (
        file("ca.pem"),
        file("sensor-pi-1.pem"),
        file("sensor-pi-1.key"),
    );
    let ok = client(&["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(server.stored().len(), 20);

    let missing = client(&["--tls-ca", "/nonexistent/ca.pem"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(stderr.contains("--tls-ca /nonexistent/ca.pem"), "{stderr}");

    let swapped = client(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &file("server.key"),
    ]);
    let stderr = String::from_utf8_lossy(&swapped.stderr);
    assert!(!swapped.status.success());
    assert!(stderr.contains("does not fit --tls-cert"), "{stderr}");

    let wrong_name = client(&[
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-server-name",
        "elsewhere.example",
    ]);
    let stderr = String::from_utf8_lossy(&wrong_name.stderr);
    assert!(
        !wrong_name.status.success(),
        "a server that cannot prove the name"
    );
    assert!(stderr.contains("not valid for name"), "{stderr}");
    assert!(
        stderr.contains("check --tls-ca and --tls-server-name"),
        "a hint: {stderr}"
    );
    assert_eq!(server.stored().len(), 20, "nothing more stored");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_server_with_a_key_that_does_not_fit_its_certificate_does_not_start() {
    let dir = temp_dir("tls-bad-start");
    let pki = pki(&dir);
    let out = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--tls-cert")
        .arg(pki.join("server.pem"))
        .arg("--tls-key")
        .arg(pki.join("sensor-pi-1.key"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--tls-key") && stderr.contains("does not fit"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
