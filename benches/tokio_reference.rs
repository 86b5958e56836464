//! The reference an outsider compares with: what a competent Rust developer writes
//! first with tokio. A task per connection, `BufReader` lines, serde_json into a
//! struct, the protocol's validation, duplicates in a `Mutex<HashMap>`, and no store.
//! Same wire protocol, so the same `sensor-client --bench` drives it.
//!
//! With `--tls-cert C --tls-key K --tls-client-ca CA` it is the TLS reference: tokio-rustls
//! on ring (the provider sensorhub uses), client certificates required, and each
//! reading checked against the sensor ids the certificate names, as sensorhub does.
//!
//! `cargo run --release --example tokio-reference -- --listen 127.0.0.1:0`

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Deserialize)]
struct Reading {
    sensor: String,
    kind: String,
    value: f64,
    seq: u64,
    #[allow(dead_code)] // validated by its type, not used
    ts: Option<u64>,
}

type Ledger = Arc<Mutex<HashMap<String, (String, u64)>>>;

fn valid_name(name: &str, max: usize, extra: &[u8], lowercase_only: bool) -> bool {
    (1..=max).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_digit()
                || b.is_ascii_lowercase()
                || (!lowercase_only && b.is_ascii_uppercase())
                || extra.contains(&b)
        })
}

fn check(r: &Reading) -> Result<(), String> {
    if !valid_name(&r.sensor, 64, b"._:-", false) {
        return Err("bad sensor id".into());
    }
    if !valid_name(&r.kind, 32, b"_", true) {
        return Err("bad kind".into());
    }
    let range = match r.kind.as_str() {
        "temperature" => -273.15..=1000.0,
        "humidity" => 0.0..=100.0,
        _ => f64::MIN..=f64::MAX,
    };
    if !r.value.is_finite() || !range.contains(&r.value) {
        return Err("value out of range".into());
    }
    if r.seq > (1 << 53) - 1 {
        return Err("seq out of range".into());
    }
    Ok(())
}

/// The sensor ids a client certificate names (exact, or a prefix before a `*`); `None`
/// without TLS.
type Grant = Option<Vec<String>>;

fn allowed(grant: &Grant, sensor: &str) -> bool {
    grant.as_ref().is_none_or(|names| {
        names.iter().any(|n| match n.strip_suffix('*') {
            Some(prefix) => sensor.starts_with(prefix),
            None => n == sensor,
        })
    })
}

fn answer(line: &str, ledger: &Ledger, grant: &Grant) -> String {
    let reading: Reading = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return format!(
                "{{\"seq\":null,\"status\":\"error\",\"error\":{:?}}}\n",
                e.to_string()
            );
        }
    };
    if !allowed(grant, &reading.sensor) {
        return format!(
            "{{\"seq\":{},\"status\":\"rejected\",\"reason\":\"not this certificate's sensor\"}}\n",
            reading.seq
        );
    }
    if let Err(e) = check(&reading) {
        return format!(
            "{{\"seq\":{},\"status\":\"rejected\",\"error\":{e:?}}}\n",
            reading.seq
        );
    }
    let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
    let status = match ledger.get_mut(&reading.sensor) {
        Some((kind, _)) if *kind != reading.kind => "rejected",
        Some((_, last)) if reading.seq <= *last => "duplicate",
        Some((_, last)) => {
            *last = reading.seq;
            "ok"
        }
        None => {
            ledger.insert(reading.sensor, (reading.kind, reading.seq));
            "ok"
        }
    };
    format!("{{\"seq\":{},\"status\":\"{status}\"}}\n", reading.seq)
}

async fn serve(
    read: impl AsyncRead + Unpin,
    write: impl AsyncWrite + Unpin,
    ledger: Ledger,
    grant: Grant,
) -> std::io::Result<()> {
    let mut write = BufWriter::new(write);
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        if !line.trim().is_empty() {
            write
                .write_all(answer(&line, &ledger, &grant).as_bytes())
                .await?;
        }
        // Flush once the lines already read are answered: pipelined readings share a
        // write, and a lone one is not held back.
        if lines.get_ref().buffer().is_empty() {
            write.flush().await?;
        }
    }
    write.flush().await
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

/// `--tls-cert`, `--tls-key`, `--tls-client-ca`: the acceptor, client certificates
/// required.
fn acceptor(args: &[String]) -> Option<TlsAcceptor> {
    let read_certs = |path: &str| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(path)
            .expect("certificate file")
            .collect::<Result<_, _>>()
            .expect("certificates")
    };
    let cert = read_certs(flag(args, "--tls-cert")?);
    let key = PrivateKeyDer::from_pem_file(flag(args, "--tls-key")?).expect("key");
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(flag(args, "--tls-client-ca")?) {
        roots.add(ca).expect("ca");
    }
    #[allow(deprecated)] // ring, as sensorhub
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert, key)
        .expect("server config");
    Some(TlsAcceptor::from(Arc::new(config)))
}

/// The DNS names of a client certificate.
fn grant_of(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = flag(&args, "--listen").unwrap_or("127.0.0.1:5000");
    let tls = acceptor(&args);
    let listener = TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let ledger = Ledger::default();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let ledger = ledger.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = match tls {
                None => {
                    let (read, write) = stream.into_split();
                    serve(read, write, ledger, None).await
                }
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => {
                        let grant = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|c| grant_of(&c[0]));
                        let (read, write) = tokio::io::split(stream);
                        serve(read, write, ledger, grant).await
                    }
                    Err(e) => Err(e),
                },
            };
        });
    }
}
