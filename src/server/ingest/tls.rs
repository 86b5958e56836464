//! The sensor port's TLS identity (PROTOCOL.md v1.2): the server's certificate and key,
//! the CA client certificates must chain to, and what a client certificate lets its
//! connection write (`Grant`). Loaded at start and again on SIGHUP: new connections get
//! the new files, open ones keep their session, and files that fail to load leave the
//! old identity in use.

use crate::tls::{load_certs, load_key, provider};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use std::path::PathBuf;
use std::sync::Arc;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The files `--tls-cert`, `--tls-key` and `--tls-client-ca` name.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// What the files gave: the rustls configuration new connections use.
pub(crate) struct Identity {
    pub config: Arc<rustls::ServerConfig>,
    /// The server certificate's notAfter, Unix seconds (for `/metrics`).
    pub expires_at: i64,
    /// Client certificates are required and name the sensors they may write for.
    pub checks_sensors: bool,
}

impl TlsFiles {
    /// Reads and checks the files; the error names the flag, the file and the reason.
    pub(crate) fn load(&self) -> Result<Identity, String> {
        let certs = load_certs("--tls-cert", &self.cert)?;
        let key = load_key("--tls-key", &self.key)?;
        let expires_at =
            not_after(&certs[0]).map_err(|e| format!("--tls-cert {}: {e}", self.cert.display()))?;
        let verifier = match &self.client_ca {
            None => WebPkiClientVerifier::no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in load_certs("--tls-client-ca", path)? {
                    roots.add(ca).map_err(|e| {
                        format!("--tls-client-ca {}: not a usable CA ({e})", path.display())
                    })?;
                }
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?
            }
        };
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "--tls-key {} does not fit --tls-cert {} ({e})",
                    self.key.display(),
                    self.cert.display()
                )
            })?;
        Ok(Identity {
            config: Arc::new(config),
            expires_at,
            checks_sensors: self.client_ca.is_some(),
        })
    }
}

/// The sensors a connection's client certificate names: its DNS subject alternative
/// names, taken as written (a sensor id such as `site:7` or a prefix such as `sim-*` is
/// no valid DNS name, so they are not read as one).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Grant {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl Grant {
    /// The grant of a verified client certificate (nothing when it names no sensor).
    pub(crate) fn of(cert: &CertificateDer<'_>) -> Grant {
        let mut grant = Grant::default();
        let Ok((_, parsed)) = X509Certificate::from_der(cert) else {
            return grant;
        };
        let Ok(Some(san)) = parsed.subject_alternative_name() else {
            return grant;
        };
        for name in &san.value.general_names {
            if let GeneralName::DNSName(name) = name {
                match name.strip_suffix('*') {
                    Some(prefix) => grant.prefixes.push(prefix.to_string()),
                    None => grant.exact.push(name.to_string()),
                }
            }
        }
        grant
    }

    pub(crate) fn covers(&self, sensor: &str) -> bool {
        self.exact.iter().any(|id| id == sensor)
            || self.prefixes.iter().any(|p| sensor.starts_with(p.as_str()))
    }
}

/// A certificate's notAfter, Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| format!("unreadable certificate ({e})"))?;
    Ok(parsed.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_naming(names: &[&str]) -> CertificateDer<'static> {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        rcgen::generate_simple_self_signed(names)
            .expect("certificate")
            .cert
            .der()
            .clone()
    }

    #[test]
    fn a_certificate_grants_its_names_and_the_prefixes_ending_in_a_star() {
        let grant = Grant::of(&cert_naming(&["greenhouse-1", "site:7", "sim-*"]));
        assert!(grant.covers("greenhouse-1"));
        assert!(
            grant.covers("site:7"),
            "ids that are no DNS names still count"
        );
        assert!(grant.covers("sim-0") && grant.covers("sim-") && grant.covers("sim-99"));
        assert!(!grant.covers("greenhouse-2"));
        assert!(!grant.covers("greenhouse-1x"), "an exact name is no prefix");
        assert!(!grant.covers("si"));
        assert!(!grant.covers("sim"));
    }

    #[test]
    fn a_certificate_naming_nothing_grants_nothing() {
        let grant = Grant::of(&cert_naming(&[]));
        assert_eq!(grant, Grant::default());
        assert!(!grant.covers("anything"));
        assert!(!Grant::of(&CertificateDer::from(vec![1, 2, 3])).covers("x"));
    }
}
