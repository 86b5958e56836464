//! What travels between the event loop and the workers: a `Job` (one connection's
//! complete lines) one way, a `Completion` (its replies) back. Their buffers circulate
//! (`BufferPool`): a job's line buffer becomes a worker's reply buffer, which the loop
//! then uses for lines again, so the steady state allocates no buffer per batch.
//!
//! Completions come back through a channel plus the loop's `mio::Waker`; `Notifier`
//! wakes the loop only when it is not already due to drain the channel, so a busy loop
//! is not interrupted once per batch.

use crate::server::ingest::slots::ConnId;
use crate::server::ingest::tls::Grant;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Instant;

/// Complete lines from one connection, for one worker.
pub(crate) struct Job {
    pub conn: ConnId,
    /// Position of this batch among the connection's batches, for in-order replies.
    pub batch: u64,
    /// Complete lines, each with its terminator. The worker keeps the buffer for the
    /// replies of later batches, so buffers circulate: loop, worker, loop.
    pub lines: Vec<u8>,
    /// When the lines were read, for the reply-latency histogram.
    pub arrived: Instant,
    /// The server's receive time stored with each record, Unix milliseconds.
    pub recv_ms: u64,
    /// The sensors the connection's client certificate names; `None`: any sensor.
    pub grant: Option<Arc<Grant>>,
}

/// The replies to one batch, on their way back to the event loop.
pub(crate) struct Completion {
    pub conn: ConnId,
    pub batch: u64,
    pub replies: Vec<u8>,
    /// Replies per status, indexed by `Status as usize`.
    pub counts: [u64; 4],
    pub arrived: Instant,
}

impl Completion {
    /// The completion of `job`, its replies to be written into `replies` (empty).
    pub(crate) fn for_job(job: &Job, replies: Vec<u8>) -> Completion {
        Completion {
            conn: job.conn,
            batch: job.batch,
            replies,
            counts: [0; 4],
            arrived: job.arrived,
        }
    }

    /// A completion of the same batch that takes this one's reply buffer.
    pub(crate) fn take(&mut self) -> Completion {
        Completion {
            replies: std::mem::take(&mut self.replies),
            counts: std::mem::take(&mut self.counts),
            ..*self
        }
    }
}

/// Spare buffers (the loop's, and each worker's). Bounded in count and in the size of
/// what it keeps, so one burst does not pin memory for good.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Vec<Vec<u8>>,
}

/// Buffers kept for reuse at most (more than the batches in flight at 64 x 32).
const POOL_BUFFERS: usize = 512;
/// A buffer that grew past this (a burst) is freed rather than kept; so a pool pins at
/// most 16 MiB.
const POOL_BUFFER_BYTES: usize = 32 * 1024;

impl BufferPool {
    /// An empty buffer, recycled if one is free.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_default()
    }

    /// Returns a buffer for reuse.
    pub(crate) fn give(&mut self, mut buffer: Vec<u8>) {
        if buffer.capacity() > 0
            && buffer.capacity() <= POOL_BUFFER_BYTES
            && self.free.len() < POOL_BUFFERS
        {
            buffer.clear();
            self.free.push(buffer);
        }
    }
}

/// The sending half of the completion channel, shared by workers and the committer.
#[derive(Clone)]
pub(crate) struct Notifier {
    tx: Sender<Completion>,
    waker: Arc<mio::Waker>,
    /// Set once a wake-up is on its way; the loop clears it before draining.
    armed: Arc<AtomicBool>,
}

/// The receiving half, owned by the event loop.
pub(crate) struct Completions {
    rx: Receiver<Completion>,
    armed: Arc<AtomicBool>,
}

/// A completion channel whose sends wake `waker`.
pub(crate) fn completion_channel(waker: Arc<mio::Waker>) -> (Notifier, Completions) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let armed = Arc::new(AtomicBool::new(false));
    (
        Notifier {
            tx,
            waker,
            armed: armed.clone(),
        },
        Completions { rx, armed },
    )
}

impl Notifier {
    /// Sends every completion of `completions` (emptying it) with one wake-up.
    pub(crate) fn send_all(&self, completions: &mut Vec<Completion>) {
        if completions.is_empty() {
            return;
        }
        for c in completions.drain(..) {
            // Fails only once the loop has gone, when nobody needs the replies.
            let _ = self.tx.send(c);
        }
        self.wake();
    }

    /// Wakes the loop (once, however many call this before it drains).
    pub(crate) fn wake(&self) {
        if !self.armed.swap(true, SeqCst) {
            // An error here is a full eventfd counter, i.e. a wake-up already pending;
            // the loop also drains on its periodic tick.
            let _ = self.waker.wake();
        }
    }
}

impl Completions {
    /// Everything sent so far. Clearing `armed` first means a send racing with this drain
    /// either is seen by it or wakes the loop again.
    pub(crate) fn drain(&self) -> impl Iterator<Item = Completion> + '_ {
        self.armed.store(false, SeqCst);
        self.rx.try_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_reuses_buffers_but_keeps_neither_huge_nor_too_many() {
        let mut pool = BufferPool::default();
        let mut b = pool.take();
        b.extend_from_slice(b"abc");
        let capacity = b.capacity();
        pool.give(b);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), capacity, "the same buffer, cleared");
        pool.give(Vec::with_capacity(POOL_BUFFER_BYTES + 1));
        assert_eq!(pool.take().capacity(), 0, "a burst's buffer is not kept");
        for _ in 0..POOL_BUFFERS + 10 {
            pool.give(Vec::with_capacity(16));
        }
        assert_eq!(pool.free.len(), POOL_BUFFERS);
    }
}
