//! One sensor connection as the event loop sees it: its socket, its unprocessed input,
//! its unsent replies, the readiness it has not consumed yet, and the reorder buffer that
//! keeps replies in line order.
//!
//! ## Why pinning *and* a reorder buffer
//! A pipelining sensor sends seq 1, 2, 3 … on one connection, and the ledger must see
//! them in that order: were batch 2 decided before batch 1, batch 1's readings would be
//! answered `duplicate` and lost. So every connection is pinned to one worker (its slab
//! index modulo the pool size) whose FIFO queue keeps its batches in order.
//!
//! Pinning alone does not order the *replies*: a batch of readings waits for its fsync
//! in the committer while a later batch of plain errors comes straight back. Each batch
//! therefore carries its position in the connection's stream, and `Reorder` holds early
//! completions until every earlier one has arrived. The window is small
//! (`MAX_IN_FLIGHT` batches), so a `Vec` scan is the right structure.

use mio::Token;
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::time::Instant;

/// At most this many batches of one connection are with the workers at once.
pub const MAX_IN_FLIGHT: u64 = 4;

/// Stop reading a connection while this many reply bytes are unsent (backpressure).
pub const OUTPUT_HIGH_WATER: usize = 64 * 1024;

/// Identifies a connection across slot reuse: the slab index plus a generation that
/// changes every time the slot is filled, so a late completion for a closed connection
/// never reaches its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId {
    pub index: usize,
    pub generation: u32,
}

/// Token layout: bits 0-31 index, bits 32-62 generation, bit 63 set for HTTP
/// connections. Generation 0 is never used by a connection, which leaves tokens with
/// generation 0 for the listeners, the waker and the signal pipe.
const HTTP_BIT: usize = 1 << 63;
const GENERATION_MASK: u32 = 0x7fff_ffff;

impl ConnId {
    pub fn token(self, http: bool) -> Token {
        let t = ((self.generation as usize) << 32) | self.index;
        Token(if http { t | HTTP_BIT } else { t })
    }

    /// Splits a token into its connection id and whether it is an HTTP connection.
    pub fn from_token(token: Token) -> (ConnId, bool) {
        let t = token.0;
        let id = ConnId {
            index: t & 0xffff_ffff,
            generation: ((t & !HTTP_BIT) >> 32) as u32,
        };
        (id, t & HTTP_BIT != 0)
    }

    /// The generation after `g`, skipping 0.
    pub fn next_generation(g: u32) -> u32 {
        match g.wrapping_add(1) & GENERATION_MASK {
            0 => 1,
            n => n,
        }
    }
}

/// Releases items in id order, holding those that arrive early.
#[derive(Debug)]
pub struct Reorder<T> {
    next: u64,
    early: Vec<(u64, T)>,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Reorder {
            next: 0,
            early: Vec::new(),
        }
    }
}

impl<T> Reorder<T> {
    /// Accepts item `id` and passes every item that is now in order to `deliver`.
    pub fn push(&mut self, id: u64, item: T, mut deliver: impl FnMut(T)) {
        if id != self.next {
            self.early.push((id, item));
            return;
        }
        deliver(item);
        self.next += 1;
        while let Some(i) = self.early.iter().position(|(id, _)| *id == self.next) {
            deliver(self.early.swap_remove(i).1);
            self.next += 1;
        }
    }

    /// The id of the next item to deliver.
    pub fn next(&self) -> u64 {
        self.next
    }
}

/// What one read produced.
pub enum Fill {
    Data(usize),
    Eof,
    WouldBlock,
}

/// A sensor connection.
pub struct Connection {
    pub stream: TcpStream,
    pub id: ConnId,
    /// Bytes read but not yet handed to a worker: complete lines, then a partial one.
    pub input: Vec<u8>,
    /// Replies not yet written; `written` bytes of it are already sent.
    pub output: Vec<u8>,
    pub written: usize,
    /// Edge-triggered readiness not yet consumed (we may stop early, e.g. on a budget).
    pub readable: bool,
    pub writable: bool,
    /// The poller reported the peer's FIN: a short read no longer means "drained",
    /// since no new edge will announce the EOF behind the data.
    pub read_hup: bool,
    /// No more input will be processed: the peer half-closed, or the server is stopping.
    pub input_closed: bool,
    /// The peer sent EOF (read returned 0).
    pub peer_closed: bool,
    /// When an over-long line arrived; its error reply follows all earlier replies.
    pub overlong_at: Option<Instant>,
    /// The write side is shut; reads are drained and discarded until EOF or deadline,
    /// so that unread input does not turn our close into a reset that loses replies.
    pub lingering_until: Option<Instant>,
    /// Batches handed out; their replies come back through `reorder`.
    pub batches_sent: u64,
    pub reorder: Reorder<crate::server::worker::Completion>,
    /// Last time the peer sent bytes (for `--idle-timeout`).
    pub last_input: Instant,
}

impl Connection {
    pub fn new(stream: TcpStream, id: ConnId, now: Instant) -> Connection {
        Connection {
            stream,
            id,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            // A new socket may already hold data; the first pass finds out.
            readable: true,
            writable: true,
            read_hup: false,
            input_closed: false,
            peer_closed: false,
            overlong_at: None,
            lingering_until: None,
            batches_sent: 0,
            reorder: Reorder::default(),
            last_input: now,
        }
    }

    /// Batches with the workers whose replies have not been queued yet.
    pub fn in_flight(&self) -> u64 {
        self.batches_sent - self.reorder.next()
    }

    pub fn unsent(&self) -> usize {
        self.output.len() - self.written
    }

    /// Reads once into `buf`, retrying on `Interrupted`.
    ///
    /// A short read means the socket's receive queue was empty when the read returned,
    /// so the readiness is consumed without another `read` to see `WouldBlock`: data
    /// arriving later raises a new edge (tokio makes the same inference). That saves a
    /// system call per wake-up when sensors send a line at a time. Once the poller has
    /// reported the peer's FIN, reads go on until they return 0.
    pub fn fill(&mut self, buf: &mut [u8]) -> io::Result<Fill> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    self.readable = false;
                    return Ok(Fill::Eof);
                }
                Ok(n) => {
                    if n < buf.len() && !self.read_hup {
                        self.readable = false;
                    }
                    return Ok(Fill::Data(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(Fill::WouldBlock);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes unsent replies until done or the socket is full. A short write is normal:
    /// the rest waits for the next writable edge.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.writable && self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
            // An idle connection keeps no large buffer (RSS per idle connection).
            if self.output.capacity() > OUTPUT_HIGH_WATER {
                self.output = Vec::new();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_keep_http_apart() {
        let id = ConnId {
            index: 12345,
            generation: GENERATION_MASK,
        };
        assert_eq!(ConnId::from_token(id.token(false)), (id, false));
        assert_eq!(ConnId::from_token(id.token(true)), (id, true));
        assert_ne!(id.token(false), id.token(true));
        assert_eq!(ConnId::next_generation(GENERATION_MASK), 1);
        assert_eq!(ConnId::next_generation(7), 8);
    }

    #[test]
    fn reorder_releases_in_id_order() {
        let mut r = Reorder::default();
        let mut out = Vec::new();
        r.push(2, "c", |x| out.push(x));
        r.push(1, "b", |x| out.push(x));
        assert!(out.is_empty());
        r.push(0, "a", |x| out.push(x));
        assert_eq!(out, ["a", "b", "c"]);
        r.push(3, "d", |x| out.push(x));
        assert_eq!(out, ["a", "b", "c", "d"]);
        assert_eq!(r.next(), 4);
    }

    #[test]
    fn reorder_handles_every_arrival_order_of_four() {
        let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]];
        for order in orders {
            let mut r = Reorder::default();
            let mut out = Vec::new();
            for id in order {
                r.push(id, id, |x| out.push(x));
            }
            assert_eq!(out, [0, 1, 2, 3], "arrival order {order:?}");
        }
    }
}
