//! TLS for both binaries (PROTOCOL.md v1.2): a socket that is plain or TLS, read and
//! written with the same non-blocking calls, so the mio loops drive rustls themselves
//! (the shape of rustls' own mio example) with no second runtime; and loading the PEM
//! files the flags name, with errors that say which file and why.
//!
//! `TlsStream` implements `Read` (plaintext out; it pulls records from the socket and
//! sends what the handshake owes as it goes) and `Write` (plaintext in, records out), so
//! `net::read_some` and `net::Outbox` work on it unchanged. Two things differ from a
//! plain socket, and `Transport` says so to its owner:
//! - a short read does not prove the socket drained (a record can hold less than was
//!   asked for), so reads go on until `WouldBlock`;
//! - a read can make writing possible (a handshake finishing releases the plaintext a
//!   client queued), so the owner treats a TLS read event as a writable one too.

use mio::net::TcpStream;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::Arc;

/// The crypto both binaries use: ring (audited, maintained, and built for both musl
/// targets with a C compiler alone; aws-lc-rs would need cmake and a cross toolchain).
/// rustls deprecates it only because ring lacks the post-quantum key exchange
/// (X25519MLKEM768): connections use X25519 instead.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in the PEM file `path` (given as `flag`), leaf first.
pub(crate) fn load_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {shown}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {shown}: not a PEM certificate file ({e})"))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {shown}: holds no certificate (no \"-----BEGIN CERTIFICATE-----\")"
        ));
    }
    Ok(certs)
}

/// The private key in the PEM file `path` (given as `flag`).
pub(crate) fn load_key(flag: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {shown}: {e}"))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!("{flag} {shown}: holds no private key in PEM (PKCS#8, PKCS#1 or SEC1) ({e})")
    })
}

/// The client's TLS configuration (`sensor-client --tls-ca [--tls-cert --tls-key]`): the
/// server's chain must lead to `ca`; `identity` is the client certificate and key.
pub(crate) fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs("--tls-ca", ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("--tls-ca {}: not a usable CA ({e})", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs("--tls-cert", cert)?, load_key("--tls-key", key)?)
            .map_err(|e| {
                format!(
                    "--tls-key {} does not fit --tls-cert {} ({e})",
                    key.display(),
                    cert.display()
                )
            })?,
    };
    Ok(Arc::new(config))
}

/// A connection's socket: plain TCP, or TLS over it.
pub(crate) enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Transport {
    /// The socket, for (de)registering it with the poller.
    pub(crate) fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => &mut tls.tcp,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Still in the TLS handshake (never for plain TCP).
    pub(crate) fn handshaking(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.conn.is_handshaking(),
        }
    }

    /// The peer has sent TLS records (a silent peer has not): from then on its
    /// handshake costs the loop CPU.
    pub(crate) fn peer_spoke(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.peer_spoke,
        }
    }

    /// Encrypted bytes rustls holds that the socket has not taken yet.
    pub(crate) fn has_pending_records(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.conn.wants_write(),
        }
    }

    /// The peer's certificate chain, once the handshake is done.
    pub(crate) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(tls) => tls.conn.peer_certificates(),
        }
    }

    /// Ends our side: a TLS close_notify first (best effort), then the TCP FIN.
    pub(crate) fn shutdown_write(&mut self) {
        if let Transport::Tls(tls) = self {
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
        let _ = self.tcp_mut().shutdown(Shutdown::Write);
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.read(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.write(buf),
            Transport::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(tls) => tls.flush(),
        }
    }
}

/// A rustls connection over a non-blocking socket.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: rustls::Connection,
    peer_spoke: bool,
}

/// Why a TLS connection failed, kept as the source of the `io::Error` a read returns,
/// so the server can count failures by reason.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub(crate) struct TlsFailure(pub rustls::Error);

impl TlsStream {
    pub(crate) fn new(tcp: TcpStream, conn: impl Into<rustls::Connection>) -> TlsStream {
        TlsStream {
            tcp,
            conn: conn.into(),
            peer_spoke: false,
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without a close_notify: for a line protocol that is an
                // EOF like any other (a partial last line is dropped either way).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // No plaintext buffered: take records from the socket (`WouldBlock` is the
            // caller's answer when it has none).
            if self.conn.read_tls(&mut self.tcp)? == 0 {
                return Ok(0);
            }
            self.peer_spoke = true;
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the peer why (an alert), best effort.
                let _ = self.flush();
                return Err(io::Error::new(io::ErrorKind::InvalidData, TlsFailure(e)));
            }
            // The handshake may owe the peer records; a full socket keeps them for the
            // next flush.
            match self.flush() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Earlier records first: their order is the stream's.
        self.flush()?;
        let taken = self.conn.writer().write(buf)?;
        if taken == 0 {
            // rustls' buffer is full (plaintext queued before the handshake is done):
            // wait for the handshake's next step.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(taken),
        }
    }

    /// Writes every record rustls holds, or stops at `WouldBlock`.
    fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.tcp)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }
}

/// The reason a TLS connection failed, for metrics: `None` when `e` is no TLS failure.
pub(crate) fn failure_reason(e: &io::Error) -> Option<&'static str> {
    use rustls::{CertificateError, Error};
    let failure = e.get_ref()?.downcast_ref::<TlsFailure>()?;
    Some(match &failure.0 {
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(CertificateError::NotValidYet)
        | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => "not_yet_valid",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidMessage(_) => "not_tls",
        Error::AlertReceived(_) => "peer_alert",
        _ => "other",
    })
}
