//! `sensor-server certs`: the certificates TLS needs (PROTOCOL.md v1.2), made with rcgen
//! and ring, the crypto the connections use, so no openssl is needed where sensors run:
//! a CA (made once, or the user's own), a server certificate for the names clients dial,
//! and one certificate per sensor naming the sensor ids it may write for (a name ending
//! in `*` covers a prefix).
//!
//! Files in `--dir`: `ca.pem`/`ca.key`, `server.pem`/`server.key`, and
//! `sensor-ID.pem`/`sensor-ID.key` (a `*` in ID is written `_all`). Each is replaced
//! atomically (a server re-reading on SIGHUP never sees half a file); keys are 0600.

use crate::disk::write_atomically_with_mode;
use clap::Parser;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::fs;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Makes a CA (or uses the one in --dir), a server certificate and sensor certificates.
#[derive(Debug, Clone, Parser)]
#[command(name = "sensor-server certs", version = env!("SENSORHUB_VERSION"), about)]
pub struct CertsConfig {
    /// Directory for the files; ca.pem and ca.key there are used when present, else made.
    #[arg(long)]
    pub dir: PathBuf,

    /// A name clients dial (DNS name or IP address) for server.pem; repeat for more.
    #[arg(long = "server", value_name = "NAME")]
    pub server_names: Vec<String>,

    /// A sensor certificate naming these ids, comma-separated (`sim-*` covers every id
    /// starting with `sim-`); repeat for more certificates.
    #[arg(long = "sensor", value_name = "IDS")]
    pub sensors: Vec<String>,

    /// Days the server and sensor certificates are valid (the CA: ten years).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
}

const CA_DAYS: i64 = 3650;

/// Writes what `config` asks for; returns the files written.
pub fn make(config: &CertsConfig) -> Result<Vec<PathBuf>, String> {
    let dir = &config.dir;
    fs::create_dir_all(dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let ca = ca(dir, &mut written)?;
    let days = i64::from(config.days);
    if !config.server_names.is_empty() {
        let names = config.server_names.clone();
        let params = leaf(
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            "sensorhub server",
            days,
        )?;
        issue(dir, "server", params, &ca, &mut written)?;
    }
    for ids in &config.sensors {
        let ids: Vec<String> = ids.split(',').map(|id| id.trim().to_string()).collect();
        if let Some(bad) = ids.iter().find(|id| !valid_grant(id)) {
            return Err(format!(
                "--sensor {bad:?}: a sensor id (1 to 64 of A-Z a-z 0-9 . _ : -), \
                 optionally ending in * for a prefix"
            ));
        }
        let name = format!("sensor-{}", ids[0].replace('*', "_all"));
        let params = sensor_params(&ids, days)?;
        issue(dir, &name, params, &ca, &mut written)?;
    }
    Ok(written)
}

/// What a sensor certificate holds: its ids as DNS names, written as given (a
/// `site:7` or `sim-*` is no valid DNS name; rcgen writes it as IA5 text all the same).
pub(crate) fn sensor_params(ids: &[String], days: i64) -> Result<CertificateParams, String> {
    let mut params = leaf(
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        &ids[0],
        days,
    )?;
    for id in ids {
        let name = id
            .clone()
            .try_into()
            .map_err(|e| format!("sensor id {id:?}: {e}"))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    Ok(params)
}

/// The CA in `dir`, made when absent.
fn ca(dir: &Path, written: &mut Vec<PathBuf>) -> Result<Issuer<'static, KeyPair>, String> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let read =
                |p: &Path| fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
            let key = KeyPair::from_pem(&read(&key_path)?)
                .map_err(|e| format!("{}: not a private key ({e})", key_path.display()))?;
            Issuer::from_ca_cert_pem(&read(&cert_path)?, key)
                .map_err(|e| format!("{}: not a CA certificate ({e})", cert_path.display()))
        }
        (false, false) => {
            let mut params = CertificateParams::default();
            // Named apart from every other sensorhub CA: a certificate from another
            // one is then "unknown issuer", not a bad signature under the same name.
            let id = format!("sensorhub CA {:08x}", rand::random::<u32>());
            params.distinguished_name = name(&id);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
            params.not_after = OffsetDateTime::now_utc() + Duration::days(CA_DAYS);
            let key = KeyPair::generate().map_err(|e| e.to_string())?;
            let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
            write_pair(dir, "ca", &cert.pem(), &key.serialize_pem(), written)?;
            Ok(Issuer::new(params, key))
        }
        _ => Err(format!(
            "{} has one of ca.pem and ca.key but not the other; give both or neither",
            dir.display()
        )),
    }
}

/// Parameters of a leaf certificate valid from an hour ago for `days`.
fn leaf(
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    common_name: &str,
    days: i64,
) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(names).map_err(|e| format!("--server: {e}"))?;
    params.distinguished_name = name(common_name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(days);
    Ok(params)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn issue(
    dir: &Path,
    file: &str,
    params: CertificateParams,
    ca: &Issuer<'static, KeyPair>,
    written: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, ca).map_err(|e| e.to_string())?;
    write_pair(dir, file, &cert.pem(), &key.serialize_pem(), written)
}

/// `NAME.pem` and `NAME.key` (0600), each replaced atomically, key first.
fn write_pair(
    dir: &Path,
    file: &str,
    cert: &str,
    key: &str,
    written: &mut Vec<PathBuf>,
) -> Result<(), String> {
    for (ext, text, mode) in [("key", key, 0o600), ("pem", cert, 0o644)] {
        let name = format!("{file}.{ext}");
        let path = dir.join(&name);
        write_atomically_with_mode(dir, &name, text.as_bytes(), mode)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(())
}

/// A sensor id, or a prefix of ids ending in `*`.
fn valid_grant(id: &str) -> bool {
    use crate::wire::reading::valid_sensor;
    match id.strip_suffix('*') {
        Some(prefix) => prefix.is_empty() || valid_sensor(prefix),
        None => valid_sensor(id),
    }
}
