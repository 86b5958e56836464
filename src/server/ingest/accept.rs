//! Accepting under pressure, for both ports: a reserve descriptor so that running out of
//! file descriptors still gets a waiting peer an answer, the short refusal itself, and
//! which `accept` errors concern only one dead connection.

use mio::net::{TcpListener, TcpStream};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;

/// A spare descriptor, given up when `accept` hits EMFILE so the waiting connection can
/// be accepted and told the server is busy instead of spinning on it.
pub(crate) struct Reserve {
    fd: Option<File>,
}

/// What giving up the reserve achieved.
pub(crate) enum Shed {
    /// A waiting peer was answered and closed; it had sent this many bytes.
    Refused(usize),
    BacklogEmpty,
    NoReserve,
}

impl Reserve {
    pub(crate) fn new() -> Reserve {
        Reserve {
            fd: File::open("/dev/null").ok(),
        }
    }

    /// Out of descriptors: frees the reserve to accept one waiting connection on
    /// `listener`, answers it `reply`, and takes the reserve back.
    pub(crate) fn shed(&mut self, listener: &TcpListener, reply: &[u8]) -> Shed {
        if self.fd.take().is_none() {
            return Shed::NoReserve;
        }
        let shed = match listener.accept() {
            Ok((stream, _)) => Shed::Refused(refuse(&stream, reply)),
            Err(_) => Shed::BacklogEmpty,
        };
        self.fd = File::open("/dev/null").ok();
        shed
    }
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve::new()
    }
}

/// Answers a connection that will not be served with `reply` and closes it; returns
/// how many bytes the peer had sent. A fresh socket's send buffer is empty, so the
/// short reply fits at once; what the peer sent is read and discarded so that the close
/// is a FIN, not a reset that could destroy the reply before the peer reads it.
pub(crate) fn refuse(stream: &TcpStream, reply: &[u8]) -> usize {
    let _ = (&*stream).write(reply);
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    (&*stream).read(&mut sink).unwrap_or(0)
}

/// EMFILE (per process) and ENFILE (system-wide).
pub(crate) fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24) | Some(23))
}

/// Errors about one connection that died in the backlog: skip it and keep accepting.
pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(71) | Some(113) | Some(101) | Some(110)
    ) // EPROTO, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT
}
