//! One connection of the client and the readings it carries.
//!
//! A link keeps, in order, every reading it has generated and not yet seen answered.
//! The first `sent` of them are on the wire; up to `--window` may be. Replies arrive in
//! order, so each one answers the oldest sent reading. When the connection is lost,
//! `sent` drops to zero and the whole queue is sent again on the next connection.

use crate::net::{Fill, Outbox, read_some};
use crate::tls::Transport;
use crate::wire::record::encode_reading;
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

/// A generated reading, kept until answered (re-encoded on every send).
pub(super) struct Pending {
    pub sensor: u32,
    pub seq: u64,
    pub ts_ms: u64,
    pub value: f64,
    pub sent_at: Instant,
    /// Written at least once before (this send is a resend).
    pub resend: bool,
}

pub(super) enum LinkState {
    /// Waiting for its retry (queued in `Client::retries`).
    Down,
    /// Connecting since the given time.
    Connecting(TcpStream, Instant),
    Up(Transport),
}

/// One connection and the readings it carries.
pub(super) struct Link {
    pub state: LinkState,
    pub queue: VecDeque<Pending>,
    /// `queue[..sent]` are written on the current connection and await replies.
    pub sent: usize,
    out: Outbox,
    /// Reply bytes not yet split into lines.
    input: Vec<u8>,
    /// Consecutive failures, for the backoff and for choosing the next address.
    pub failures: u32,
    pub readable: bool,
    pub writable: bool,
    /// The poller reported the server's FIN: read until EOF.
    pub hup: bool,
    /// The sensors this link carries, and which one's turn it is (bench mode).
    pub sensors: Vec<usize>,
    pub next_sensor: usize,
    /// Listed in `Client::touched`: it has new readings to send or room to refill.
    pub touched: bool,
}

/// What `Link::send` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Sent {
    pub first_time: u64,
    pub again: u64,
}

impl Link {
    pub(super) fn new(sensors: Vec<usize>) -> Link {
        Link {
            state: LinkState::Down,
            queue: VecDeque::new(),
            sent: 0,
            out: Outbox::default(),
            input: Vec::new(),
            failures: 0,
            readable: false,
            writable: false,
            hup: false,
            sensors,
            next_sensor: 0,
            touched: true,
        }
    }

    /// Forgets the connection: nothing is on the wire any more, and everything queued
    /// will be sent again. Returns the delay before reconnecting (exponential in the
    /// failures so far, between `first` and `max`, times `jitter`).
    pub(super) fn reset(&mut self, first: Duration, max: Duration, jitter: f64) -> Duration {
        self.state = LinkState::Down;
        self.sent = 0;
        self.out.clear();
        self.input.clear();
        self.readable = false;
        self.writable = false;
        self.hup = false;
        self.failures = self.failures.saturating_add(1);
        first
            .saturating_mul(1 << self.failures.min(8))
            .min(max)
            .mul_f64(jitter)
    }

    /// Encodes what the window allows (`id_of` names a reading's sensor) and writes
    /// what the socket takes. What was encoded counts as sent even when the write then
    /// fails (the connection is lost): those readings are resends from now on, so a
    /// count dropped here would make the summary answer more than it sent.
    pub(super) fn send<'a>(
        &mut self,
        window: usize,
        kind: &str,
        id_of: impl Fn(u32) -> &'a str,
        now: Instant,
    ) -> (Sent, io::Result<()>) {
        let mut sent = Sent::default();
        let LinkState::Up(stream) = &mut self.state else {
            return (sent, Ok(()));
        };
        while self.sent < self.queue.len() && self.sent < window {
            let p = &mut self.queue[self.sent];
            encode_reading(
                self.out.queue(),
                id_of(p.sensor),
                kind,
                p.value,
                p.seq,
                p.ts_ms,
            );
            if p.resend {
                sent.again += 1;
            } else {
                sent.first_time += 1;
                p.resend = true;
            }
            p.sent_at = now;
            self.sent += 1;
        }
        let flushed = self.out.flush(stream, &mut self.writable).map(drop);
        (sent, flushed)
    }

    /// Reads what has arrived and passes every complete reply line to `answer`, in
    /// order; stops at the first error `answer` returns (the connection is then lost).
    pub(super) fn receive(
        &mut self,
        mut answer: impl FnMut(&mut Link, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        self.readable = true;
        while self.readable {
            let LinkState::Up(stream) = &mut self.state else {
                return Ok(());
            };
            // A short TLS read does not prove the socket drained: read until it blocks.
            let keep_reading = self.hup || stream.is_tls();
            match read_some(stream, &mut buf, &mut self.readable, keep_reading)? {
                Fill::Data(n) => self.input.extend_from_slice(&buf[..n]),
                Fill::Eof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed",
                    ));
                }
                Fill::WouldBlock => break,
            }
            let mut input = std::mem::take(&mut self.input);
            let mut start = 0;
            for end in memchr::memchr_iter(b'\n', &input) {
                answer(self, &input[start..end])?;
                start = end + 1;
            }
            input.drain(..start);
            self.input = input;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A link up on a connection the server end has reset (RST).
    fn link_to_a_reset_peer() -> Link {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(server);
        // The reset has arrived once a read says so (bounded: it is local).
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = (&client).read(&mut [0u8; 1]);
        client.set_nonblocking(true).expect("nonblocking");
        let mut link = Link::new(vec![0]);
        link.state = LinkState::Up(Transport::Plain(TcpStream::from_std(client)));
        link.writable = true;
        link
    }

    #[test]
    fn readings_written_before_a_failed_write_still_count_as_sent() {
        let mut link = link_to_a_reset_peer();
        for seq in 1..=3 {
            link.queue.push_back(Pending {
                sensor: 0,
                seq,
                ts_ms: 0,
                value: 1.0,
                sent_at: Instant::now(),
                resend: false,
            });
        }
        let (sent, flushed) = link.send(32, "temperature", |_| "s", Instant::now());
        assert!(flushed.is_err(), "the write to a reset connection fails");
        assert_eq!(sent.first_time, 3);
        link.reset(Duration::ZERO, Duration::ZERO, 1.0);
        link.state = link_to_a_reset_peer().state;
        link.writable = true;
        let (again, _) = link.send(32, "temperature", |_| "s", Instant::now());
        assert_eq!((again.first_time, again.again), (0, 3));
    }
}
