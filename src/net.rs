//! Socket plumbing both binaries share: reading a non-blocking socket without a system
//! call wasted per wake-up, and writing queued bytes across short writes.

use std::io::{self, Read, Write};

/// What one read produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    Data(usize),
    Eof,
    WouldBlock,
}

/// Reads once into `buf`, retrying on `Interrupted`; clears `*readable` once the
/// socket's readiness is consumed.
///
/// A short read means the socket's receive queue was empty when the read returned, so
/// the readiness is consumed without another `read` to see `WouldBlock`: data arriving
/// later raises a new edge (tokio makes the same inference). That saves a system call
/// per wake-up when peers send a line at a time. Once the poller has reported the peer's
/// FIN (`hup`), reads go on until they return 0, since no new edge will announce it.
pub(crate) fn read_some(
    mut stream: impl Read,
    buf: &mut [u8],
    readable: &mut bool,
    hup: bool,
) -> io::Result<Fill> {
    loop {
        match stream.read(buf) {
            Ok(0) => {
                *readable = false;
                return Ok(Fill::Eof);
            }
            Ok(n) => {
                if n < buf.len() && !hup {
                    *readable = false;
                }
                return Ok(Fill::Data(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *readable = false;
                return Ok(Fill::WouldBlock);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Bytes queued for a non-blocking socket, of which `written` are sent.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    buf: Vec<u8>,
    written: usize,
}

impl Outbox {
    /// Bytes queued and not yet written.
    pub(crate) fn unsent(&self) -> usize {
        self.buf.len() - self.written
    }

    /// The queue, to append to.
    pub(crate) fn queue(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Queues `bytes`; when nothing is queued the buffer itself becomes the queue (no
    /// copy). Returns a spare buffer: the one given up, empty.
    pub(crate) fn adopt(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        if self.buf.is_empty() {
            std::mem::swap(&mut self.buf, &mut bytes);
        } else {
            self.buf.extend_from_slice(&bytes);
        }
        bytes.clear();
        bytes
    }

    /// Drops everything queued (the connection is gone).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.written = 0;
    }

    /// Writes until everything is sent or the socket is full (clearing `*writable`). A
    /// short write is normal: the rest waits for the next writable edge. Then flushes the
    /// stream (a TLS stream's records; a no-op for a socket). Returns true once
    /// everything is handed over; the emptied buffer stays (see `take_buffer`).
    pub(crate) fn flush(
        &mut self,
        mut stream: impl Write,
        writable: &mut bool,
    ) -> io::Result<bool> {
        while *writable && self.written < self.buf.len() {
            match stream.write(&self.buf[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => *writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if *writable {
            match stream.flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => *writable = false,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        let done = self.written == self.buf.len();
        if done {
            self.clear();
        }
        Ok(done)
    }

    /// The (empty) buffer, for reuse elsewhere; the outbox then holds no memory.
    pub(crate) fn take_buffer(&mut self) -> Vec<u8> {
        self.written = 0;
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `room` bytes, then would block.
    struct Narrow {
        taken: Vec<u8>,
        room: usize,
    }

    impl Write for Narrow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room).min(3);
            self.taken.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_writes_keep_the_rest_for_the_next_edge() {
        let mut out = Outbox::default();
        out.queue().extend_from_slice(b"hello world");
        let mut sock = Narrow {
            taken: Vec::new(),
            room: 5,
        };
        let mut writable = true;
        assert!(!out.flush(&mut sock, &mut writable).unwrap());
        assert!(!writable, "a full socket consumes the readiness");
        assert_eq!((sock.taken.as_slice(), out.unsent()), (&b"hello"[..], 6));
        sock.room = 100;
        writable = true;
        assert!(out.flush(&mut sock, &mut writable).unwrap());
        assert_eq!(sock.taken, b"hello world");
        assert_eq!(out.unsent(), 0);
    }

    #[test]
    fn an_empty_outbox_adopts_a_buffer_without_copying() {
        let mut out = Outbox::default();
        let buf = b"abc".to_vec();
        let ptr = buf.as_ptr();
        let spare = out.adopt(buf);
        assert!(spare.is_empty());
        assert_eq!(out.queue().as_ptr(), ptr);
        let spare = out.adopt(b"def".to_vec());
        assert!(spare.is_empty());
        assert_eq!(out.queue().as_slice(), b"abcdef");
    }

    #[test]
    fn a_short_read_consumes_the_readiness_unless_the_peer_hung_up() {
        let mut buf = [0u8; 8];
        let mut readable = true;
        assert_eq!(
            read_some(&b"abc"[..], &mut buf, &mut readable, false).unwrap(),
            Fill::Data(3)
        );
        assert!(!readable);
        readable = true;
        assert_eq!(
            read_some(&b"abc"[..], &mut buf, &mut readable, true).unwrap(),
            Fill::Data(3)
        );
        assert!(readable, "after a FIN, read on until EOF");
        assert_eq!(
            read_some(&b""[..], &mut buf, &mut readable, true).unwrap(),
            Fill::Eof
        );
        assert!(!readable);
    }
}
