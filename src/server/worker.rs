//! The worker pool: validation, the ledger decision and reply formatting, off the event
//! loop's thread.
//!
//! The unit of work is a *batch*: every complete line one connection delivered in one
//! read pass (bounded in lines). Batching amortises the queue hand-off, the ledger lock
//! and the wake-up of the event loop over hundreds of readings.
//!
//! Results go back through a channel plus the loop's `mio::Waker`; `Notifier` wakes the
//! loop only when it is not already due to drain the channel, so a busy loop is not
//! interrupted once per batch.

use crate::server::connection::ConnId;
use crate::server::db::{Applied, Db};
use crate::wire::framing;
use crate::wire::reading::{Reading, Status, Verdict, is_blank, parse_line, write_reply};
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::Instant;

/// Complete lines from one connection, for one worker.
pub struct Job {
    pub conn: ConnId,
    /// Position of this batch among the connection's batches, for in-order replies.
    pub batch: u64,
    /// Complete lines, each with its terminator.
    pub lines: Vec<u8>,
    /// When the lines were read, for the reply-latency histogram.
    pub arrived: Instant,
    /// The server's receive time stored with each record, Unix milliseconds.
    pub recv_ms: u64,
}

/// The replies to one batch, on their way back to the event loop.
pub struct Completion {
    pub conn: ConnId,
    pub batch: u64,
    pub replies: Vec<u8>,
    /// Replies per status, indexed by `Status as usize`.
    pub counts: [u64; 4],
    pub arrived: Instant,
}

impl Completion {
    /// A completion for the same batch with no replies yet.
    fn empty_copy(&self) -> Completion {
        Completion {
            conn: self.conn,
            batch: self.batch,
            replies: Vec::with_capacity(self.replies.capacity()),
            counts: [0; 4],
            arrived: self.arrived,
        }
    }
}

/// The sending half of the completion channel, shared by workers and the committer.
#[derive(Clone)]
pub struct Notifier {
    tx: Sender<Completion>,
    waker: Arc<mio::Waker>,
    /// Set once a wake-up is on its way; the loop clears it before draining.
    armed: Arc<AtomicBool>,
}

/// The receiving half, owned by the event loop.
pub struct Completions {
    rx: Receiver<Completion>,
    armed: Arc<AtomicBool>,
}

/// A completion channel whose sends wake `waker`.
pub fn completion_channel(waker: Arc<mio::Waker>) -> (Notifier, Completions) {
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
    pub fn send(&self, completion: Completion) {
        if self.tx.send(completion).is_ok() {
            self.wake();
        }
    }

    pub fn send_all(&self, completions: Vec<Completion>) {
        if completions.is_empty() {
            return;
        }
        for c in completions {
            // Fails only once the loop has gone, when nobody needs the replies.
            let _ = self.tx.send(c);
        }
        self.wake();
    }

    fn wake(&self) {
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
    pub fn drain(&self) -> impl Iterator<Item = Completion> + '_ {
        self.armed.store(false, SeqCst);
        self.rx.try_iter()
    }
}

/// Starts one worker per queue; each runs until its queue is closed. A connection's
/// batches all go to one queue (see `connection.rs`), so the ledger sees them in order.
pub fn spawn_pool(
    queues: Vec<Receiver<Job>>,
    db: &Arc<Db>,
    notifier: &Notifier,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    queues
        .into_iter()
        .enumerate()
        .map(|(i, jobs)| {
            let (db, notifier) = (db.clone(), notifier.clone());
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    while let Ok(first) = jobs.recv() {
                        // Whatever queued up meanwhile is decided together: one lock,
                        // one write and one wake-up for many small batches.
                        let mut group = vec![first];
                        group.extend(jobs.try_iter().take(MAX_GROUP - 1));
                        process(group, &db, &notifier);
                    }
                })
        })
        .collect()
}

/// Batches one worker takes from its queue at once.
const MAX_GROUP: usize = 64;

/// Validates batches, lets the ledger decide their valid readings, and routes the
/// replies: through the ledger (and the committer) when they depend on stored data,
/// straight to the loop otherwise.
pub fn process(jobs: Vec<Job>, db: &Db, notifier: &Notifier) {
    let mut needs_ledger = Vec::new();
    let mut direct = Vec::new();
    for job in &jobs {
        let verdicts: Vec<Verdict> = framing::lines(&job.lines)
            .filter(|line| !is_blank(line))
            .map(parse_line)
            .collect();
        let completion = Completion {
            conn: job.conn,
            batch: job.batch,
            replies: Vec::with_capacity(verdicts.len() * 28),
            counts: [0; 4],
            arrived: job.arrived,
        };
        if verdicts.iter().any(|v| matches!(v, Verdict::Valid { .. })) {
            needs_ledger.push((job, verdicts, completion));
        } else {
            direct.push((verdicts, completion));
        }
    }
    let direct = direct
        .into_iter()
        .map(|(verdicts, mut completion)| {
            // No valid reading: `decide` is never called.
            write_replies(&verdicts, &mut completion, |_| Applied::Duplicate);
            completion
        })
        .collect();
    notifier.send_all(direct);
    if needs_ledger.is_empty() {
        return;
    }
    // Offered again while the store cannot write: no reply leaves meanwhile, so this
    // worker's queue fills and the loop stops reading its connections (backpressure).
    loop {
        let decided = db.decide(|ledger| {
            needs_ledger
                .iter()
                .map(|(job, verdicts, template)| {
                    let mut completion = template.empty_copy();
                    write_replies(verdicts, &mut completion, |r| ledger.apply(r, job.recv_ms));
                    completion
                })
                .collect()
        });
        if decided.is_ok() || !db.wait_writable() {
            return;
        }
    }
}

fn write_replies(
    verdicts: &[Verdict],
    completion: &mut Completion,
    mut decide: impl FnMut(&Reading) -> Applied,
) {
    let out = &mut completion.replies;
    for verdict in verdicts {
        let status = match verdict {
            Verdict::Error { seq, message } => {
                write_reply(out, *seq, Status::Error, Some(message));
                Status::Error
            }
            Verdict::Rejected { seq, message } => {
                write_reply(out, Some(seq), Status::Rejected, Some(message));
                Status::Rejected
            }
            Verdict::Valid { reading, seq_text } => match decide(reading) {
                Applied::Stored => {
                    write_reply(out, Some(seq_text), Status::Ok, None);
                    Status::Ok
                }
                Applied::Duplicate => {
                    write_reply(out, Some(seq_text), Status::Duplicate, None);
                    Status::Duplicate
                }
                Applied::KindMismatch(kind) => {
                    let message = format!(
                        "sensor {} has kind {kind}; a sensor's kind cannot change",
                        reading.sensor
                    );
                    write_reply(out, Some(seq_text), Status::Rejected, Some(&message));
                    Status::Rejected
                }
            },
        };
        completion.counts[status as usize] += 1;
    }
}
