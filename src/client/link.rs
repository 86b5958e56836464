//! One connection of the client and the readings it carries.
//!
//! A link keeps, in order, every reading it has generated and not yet seen answered.
//! The first `sent` of them are on the wire; up to `--window` may be. Replies arrive in
//! order, so each one answers the oldest sent reading. When the connection is lost,
//! `sent` drops to zero and the whole queue is sent again on the next connection.

use crate::net::{Fill, Outbox, read_some};
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
    Up(TcpStream),
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
    /// what the socket takes.
    pub(super) fn send<'a>(
        &mut self,
        window: usize,
        kind: &str,
        id_of: impl Fn(u32) -> &'a str,
        now: Instant,
    ) -> io::Result<Sent> {
        let mut sent = Sent::default();
        let LinkState::Up(stream) = &mut self.state else {
            return Ok(sent);
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
        self.out.flush(stream, &mut self.writable)?;
        Ok(sent)
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
            match read_some(stream, &mut buf, &mut self.readable, self.hup)? {
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
