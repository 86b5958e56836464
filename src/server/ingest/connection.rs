//! One sensor connection: its socket, its unprocessed input, its unsent replies, the
//! readiness it has not consumed yet, and the reorder buffer that keeps replies in line
//! order. The event loop only tells it what happened (`on_readiness`, `deliver`,
//! `stop_input`) and asks it to move on (`service`); the rest is private.
//!
//! With `--tls-cert` the socket is a `Transport::Tls`: the same reads and writes, with
//! rustls in between. A connection in its handshake is closed at its deadline; once the
//! handshake is done, the client certificate's names become the connection's `Grant`,
//! which travels with each batch to the worker that checks every reading against it.
//!
//! ## Servicing
//! A connection is *serviced* whenever something changes for it (readiness, a completed
//! batch, a free worker queue): write what is owed, hand complete lines to the workers
//! while its limits allow, read while they still allow, and close when everything it is
//! owed has been written. Reading stops while a connection has `MAX_IN_FLIGHT` batches
//! out, `OUTPUT_HIGH_WATER` unsent reply bytes, or lines the full worker queue could not
//! take: that is the backpressure that keeps memory bounded whatever clients do.
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

use crate::net::{Fill, Outbox, read_some};
use crate::server::http::metrics::LoopStats;
use crate::server::ingest::completion::{BufferPool, Completion, Job};
pub(crate) use crate::server::ingest::slots::ConnId;
use crate::server::ingest::tls::Grant;
use crate::server::store::segments::unix_millis;
use crate::tls::{Transport, failure_reason};
use crate::wire::framing;
use crate::wire::reply::{OVERLONG_REPLY, Status};
use crossbeam_channel::{Sender, TrySendError};
use mio::event::Event;
use mio::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most this many batches of one connection are with the workers at once.
const MAX_IN_FLIGHT: u64 = 4;
/// Stop reading a connection while this many reply bytes are unsent (backpressure).
const OUTPUT_HIGH_WATER: usize = 64 * 1024;
/// Bytes read from one connection per pass before the others get their turn.
const READ_BUDGET: usize = 256 * 1024;
/// Lines per batch: bounds the replies one batch can produce (a 2-byte line can earn a
/// 60-byte error), hence memory per in-flight batch.
const MAX_BATCH_LINES: usize = 512;
/// How long a closed-for-writing connection is drained before it is dropped.
const LINGER: Duration = Duration::from_secs(2);

/// Releases items in id order, holding those that arrive early.
#[derive(Debug)]
pub(crate) struct Reorder<T> {
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
    pub(crate) fn push(&mut self, id: u64, item: T, mut deliver: impl FnMut(T)) {
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
    pub(crate) fn next(&self) -> u64 {
        self.next
    }
}

/// Everything servicing a connection needs besides the connection itself; owned by the
/// event loop and lent to one connection at a time.
pub(crate) struct Context {
    /// One queue per worker; a connection always uses `jobs[index % len]`.
    pub jobs: Vec<Sender<Job>>,
    pub stats: LoopStats,
    pub max_line_bytes: usize,
    /// Where reads land before they are appended to a connection's input: one buffer
    /// for all, so an idle connection holds no read buffer.
    pub scratch: Vec<u8>,
    pub buffers: BufferPool,
}

/// What the loop should do with a connection after servicing it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Wait,
    /// Its read budget ran out with data left: service it again soon.
    Again,
    /// It cannot hand lines to the full worker queue: service it when workers progress.
    QueueFull,
    Close,
}

/// Where a TLS connection is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// Plain TCP, or the handshake is done.
    Done,
    /// Closed unless done by `until`; `checks_sensors`: the client certificate's names
    /// are what the connection may write (`--tls-client-ca`).
    Pending {
        until: Instant,
        checks_sensors: bool,
    },
}

/// A sensor connection.
pub(crate) struct Connection {
    stream: Transport,
    id: ConnId,
    handshake: Handshake,
    /// The sensors the client certificate names; `None`: any sensor.
    grant: Option<Arc<Grant>>,
    /// Bytes read but not yet handed to a worker: complete lines, then a partial one.
    input: Vec<u8>,
    /// Replies not yet written.
    output: Outbox,
    /// Edge-triggered readiness not yet consumed (we may stop early, e.g. on a budget).
    readable: bool,
    writable: bool,
    /// The poller reported the peer's FIN: a short read no longer means "drained",
    /// since no new edge will announce the EOF behind the data.
    read_hup: bool,
    /// No more input will be processed: the peer half-closed, or the server is stopping.
    input_closed: bool,
    /// The peer sent EOF (read returned 0).
    peer_closed: bool,
    /// When an over-long line arrived; its error reply follows all earlier replies.
    overlong_at: Option<Instant>,
    /// The write side is shut; reads are drained and discarded until EOF or deadline,
    /// so that unread input does not turn our close into a reset that loses replies.
    lingering_until: Option<Instant>,
    /// Batches handed out; their replies come back through `reorder`.
    batches_sent: u64,
    reorder: Reorder<Completion>,
    /// Last time the peer sent bytes (for `--idle-timeout`).
    last_input: Instant,
}

impl Connection {
    pub(crate) fn new(
        stream: Transport,
        id: ConnId,
        now: Instant,
        handshake: Handshake,
    ) -> Connection {
        Connection {
            stream,
            id,
            handshake,
            grant: None,
            input: Vec::new(),
            output: Outbox::default(),
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

    /// The socket, for (de)registering it with the poller.
    pub(crate) fn stream_mut(&mut self) -> &mut TcpStream {
        self.stream.tcp_mut()
    }

    /// Still in its TLS handshake.
    pub(crate) fn in_handshake(&self) -> bool {
        matches!(self.handshake, Handshake::Pending { .. })
    }

    /// In a TLS handshake the peer has started: one that costs the loop CPU (about
    /// half a millisecond in all), unlike a silent peer's, which costs nothing.
    pub(crate) fn handshake_working(&self) -> bool {
        self.in_handshake() && self.stream.peer_spoke()
    }

    /// Records the readiness a poller event reports (kept until consumed).
    pub(crate) fn on_readiness(&mut self, event: &Event) {
        let error = event.is_error();
        if event.is_readable() || event.is_read_closed() || error {
            self.readable = true;
        }
        if event.is_read_closed() || error {
            self.read_hup = true;
        }
        // A TLS read can make room for writes (a handshake step), so it counts as a
        // writable edge too; a write that then blocks just clears it again.
        if event.is_writable() || event.is_write_closed() || error || self.stream.is_tls() {
            self.writable = true;
        }
    }

    /// Queues the replies of a finished batch, in batch order; the spare buffer this
    /// leaves goes back to `ctx.buffers`.
    pub(crate) fn deliver(&mut self, completion: Completion, ctx: &mut Context) {
        let Connection {
            output, reorder, ..
        } = self;
        reorder.push(completion.batch, completion, |c| {
            for status in Status::ALL {
                ctx.stats
                    .count_replies(status, c.counts[status as usize], c.arrived);
            }
            ctx.buffers.give(output.adopt(c.replies));
        });
    }

    /// Stops taking input: complete lines already read are still answered, the partial
    /// line after them is dropped without a reply.
    pub(crate) fn stop_input(&mut self) {
        self.input_closed = true;
        let keep = memchr::memrchr(b'\n', &self.input).map_or(0, |i| i + 1);
        self.input.truncate(keep);
    }

    /// Whether the connection should be closed now for lingering past its deadline or
    /// for sending nothing for `idle_timeout`. A connection with work in progress is not
    /// idle: its clock restarts.
    pub(crate) fn expired(&mut self, now: Instant, idle_timeout: Option<Duration>) -> bool {
        if let Some(until) = self.lingering_until {
            return now >= until;
        }
        if let Handshake::Pending { until, .. } = self.handshake {
            return now >= until;
        }
        if self.in_flight() > 0 || self.unsent() > 0 || has_complete_line(&self.input) {
            self.last_input = now;
            return false;
        }
        idle_timeout.is_some_and(|t| now.saturating_duration_since(self.last_input) >= t)
    }

    /// Moves the connection forward as far as it can go now (see the module doc).
    pub(crate) fn service(&mut self, ctx: &mut Context, now: Instant) -> Next {
        if self.lingering_until.is_some() {
            return self.drain_lingering(ctx);
        }
        if self.flush(&mut ctx.buffers).is_err() {
            return Next::Close;
        }
        let mut budget = READ_BUDGET;
        loop {
            if !self.dispatch(ctx, now) {
                return Next::QueueFull;
            }
            if !self.readable || !self.may_read() {
                break;
            }
            if budget == 0 {
                return Next::Again;
            }
            let filled = self.fill(&mut ctx.scratch);
            if let Err(e) = &filled
                && self.in_handshake()
            {
                ctx.stats.tls_failed(failure_reason(e).unwrap_or("io"));
            }
            self.note_handshake(&mut ctx.stats);
            match filled {
                Ok(Fill::Data(n)) => {
                    ctx.stats.bytes_received += n as u64;
                    budget = budget.saturating_sub(n);
                    self.last_input = now;
                    if self.input.capacity() == 0 {
                        self.input = ctx.buffers.take();
                    }
                    self.input.extend_from_slice(&ctx.scratch[..n]);
                }
                Ok(Fill::Eof) => {
                    if self.in_handshake() {
                        ctx.stats.tls_failed("closed");
                        return Next::Close;
                    }
                    self.peer_closed = true;
                    self.stop_input();
                }
                Ok(Fill::WouldBlock) => break,
                Err(_) => return Next::Close,
            }
        }
        self.finish_pass(ctx, now)
    }

    /// Once the handshake is done: counts it and takes the grant from the client
    /// certificate.
    fn note_handshake(&mut self, stats: &mut LoopStats) {
        let Handshake::Pending { checks_sensors, .. } = self.handshake else {
            return;
        };
        if self.stream.handshaking() {
            return;
        }
        self.handshake = Handshake::Done;
        stats.tls_handshakes += 1;
        if checks_sensors {
            // rustls verified the chain; a certificate naming no sensor grants nothing.
            let grant = match self.stream.peer_certificates().and_then(|c| c.first()) {
                Some(cert) => Grant::of(cert),
                None => Grant::default(),
            };
            self.grant = Some(Arc::new(grant));
        }
    }

    /// After reading: the over-long reply once it is due, a flush, and the end of the
    /// connection once nothing more is owed.
    fn finish_pass(&mut self, ctx: &mut Context, now: Instant) -> Next {
        if let Some(at) = self.overlong_at
            && self.in_flight() == 0
        {
            self.overlong_at = None;
            self.output.queue().extend_from_slice(OVERLONG_REPLY);
            ctx.stats.count_replies(Status::Error, 1, at);
        }
        if self.flush(&mut ctx.buffers).is_err() {
            return Next::Close;
        }
        let owed_nothing = self.input_closed
            && self.overlong_at.is_none()
            && self.in_flight() == 0
            && self.unsent() == 0
            && !has_complete_line(&self.input);
        if !owed_nothing {
            return Next::Wait;
        }
        // Everything owed is written: end our side. A peer that already sent EOF is
        // done; otherwise drain its input until it closes too.
        self.stream.shutdown_write();
        if self.peer_closed {
            return Next::Close;
        }
        self.lingering_until = Some(now + LINGER);
        self.drain_lingering(ctx)
    }

    /// Batches with the workers whose replies have not been queued yet.
    fn in_flight(&self) -> u64 {
        self.batches_sent - self.reorder.next()
    }

    /// Reply bytes not yet on the socket (TLS records rustls holds count as one).
    fn unsent(&self) -> usize {
        self.output.unsent() + usize::from(self.stream.has_pending_records())
    }

    fn may_read(&self) -> bool {
        !self.input_closed
            && self.in_flight() < MAX_IN_FLIGHT
            && self.unsent() < OUTPUT_HIGH_WATER
            && !has_complete_line(&self.input)
    }

    /// Hands complete lines to the workers while the connection's limits allow; false
    /// when the worker queue is full.
    fn dispatch(&mut self, ctx: &mut Context, now: Instant) -> bool {
        while self.in_flight() < MAX_IN_FLIGHT && self.unsent() < OUTPUT_HIGH_WATER {
            let scan = framing::scan(&self.input, ctx.max_line_bytes, MAX_BATCH_LINES);
            if scan.lines == 0 {
                if scan.overlong {
                    // Nothing after an over-long line is processed; its error reply
                    // follows the replies owed to the lines before it.
                    self.overlong_at.get_or_insert(now);
                    self.input = Vec::new();
                    self.input_closed = true;
                }
                return true;
            }
            let lines = if scan.end == self.input.len() {
                // Only complete lines: hand over the buffer itself.
                std::mem::take(&mut self.input)
            } else {
                let mut lines = ctx.buffers.take();
                lines.extend_from_slice(&self.input[..scan.end]);
                lines
            };
            let job = Job {
                conn: self.id,
                batch: self.batches_sent,
                lines,
                arrived: now,
                recv_ms: unix_millis(),
                grant: self.grant.clone(),
            };
            let queue = &ctx.jobs[self.id.index % ctx.jobs.len()];
            match queue.try_send(job) {
                Ok(()) => {
                    self.batches_sent += 1;
                    if !self.input.is_empty() {
                        self.input.drain(..scan.end);
                    }
                }
                Err(TrySendError::Full(job)) => {
                    if self.input.is_empty() {
                        self.input = job.lines;
                    } else {
                        ctx.buffers.give(job.lines);
                    }
                    return false;
                }
                // The workers are gone only after the loop has returned.
                Err(TrySendError::Disconnected(_)) => return true,
            }
        }
        true
    }

    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<Fill> {
        // A short TLS read does not prove the socket drained: read until it blocks.
        let keep_reading = self.read_hup || self.stream.is_tls();
        read_some(&mut self.stream, buf, &mut self.readable, keep_reading)
    }

    /// Writes what the socket takes; once all is written the buffer goes back to
    /// `buffers`, so an idle connection holds none (memory per held connection).
    fn flush(&mut self, buffers: &mut BufferPool) -> std::io::Result<()> {
        if self.output.flush(&mut self.stream, &mut self.writable)? {
            buffers.give(self.output.take_buffer());
        }
        Ok(())
    }

    fn drain_lingering(&mut self, ctx: &mut Context) -> Next {
        loop {
            match self.fill(&mut ctx.scratch) {
                Ok(Fill::Data(n)) => ctx.stats.bytes_received += n as u64,
                Ok(Fill::WouldBlock) => return Next::Wait,
                Ok(Fill::Eof) | Err(_) => return Next::Close,
            }
        }
    }
}

fn has_complete_line(input: &[u8]) -> bool {
    memchr::memchr(b'\n', input).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

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
