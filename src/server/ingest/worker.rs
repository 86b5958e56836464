//! The worker pool: validation, the ledger decision and reply formatting, off the event
//! loop's thread.
//!
//! The unit of work is a *batch*: every complete line one connection delivered in one
//! read pass (bounded in lines). Batching amortises the queue hand-off, the ledger lock
//! and the wake-up of the event loop over hundreds of readings; a worker also takes
//! whatever batches queued up meanwhile as one *group*, decided under one lock.

use crate::server::ingest::completion::{BufferPool, Completion, Job, Notifier};
use crate::server::ingest::tls::Grant;
use crate::server::store::db::Db;
use crate::server::store::ledger::Applied;
use crate::wire::framing;
use crate::wire::line::{is_blank, parse_line};
use crate::wire::reading::{Reading, Verdict};
use crate::wire::record::RecvStamp;
use crate::wire::reply::{Status, write_rejected_with_reason, write_reply};
use crossbeam_channel::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Starts one worker per queue; each runs until its queue is closed. A connection's
/// batches all go to one queue (see `connection.rs`), so the ledger sees them in order.
pub(crate) fn spawn_pool(
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
                    let mut worker = Worker::default();
                    while let Ok(first) = jobs.recv() {
                        // Whatever queued up meanwhile is decided together: one lock,
                        // one write and one wake-up for many small batches.
                        worker.group.push(first);
                        worker.group.extend(jobs.try_iter().take(MAX_GROUP - 1));
                        worker.process(&db, &notifier);
                    }
                })
        })
        .collect()
}

/// Batches one worker takes from its queue at once.
const MAX_GROUP: usize = 64;

/// One worker's group of batches and the scratch it reuses from group to group, so that
/// the steady state allocates nothing (musl's allocator returns large blocks to the
/// kernel at once; a fresh vector of a group's verdicts cost page faults every time).
#[derive(Default)]
pub(crate) struct Worker {
    /// The batches to process next.
    pub group: Vec<Job>,
    spare: BufferPool,
    completions: Vec<Completion>,
    direct: Vec<Completion>,
    /// Where each batch's verdicts are in `verdicts`.
    spans: Vec<Span>,
    /// Always empty between groups; only its allocation is kept (see `reuse`).
    verdicts: Vec<Verdict<'static>>,
}

impl Worker {
    /// Validates the group (emptying it), lets the ledger decide its valid readings,
    /// and routes the replies: through the ledger (and the committer) when they depend
    /// on stored data, straight to the loop otherwise. Reply buffers come from the
    /// worker's spares, and the jobs' line buffers go back to them.
    pub(crate) fn process(&mut self, db: &Db, notifier: &Notifier) {
        let Worker {
            group: jobs,
            spare,
            completions,
            direct,
            spans,
            verdicts,
        } = self;
        completions.extend(
            jobs.iter()
                .map(|job| Completion::for_job(job, spare.take())),
        );
        let mut all = reuse(std::mem::take(verdicts));
        spans.clear();
        for job in jobs.iter() {
            let start = all.len();
            let lines = framing::lines(&job.lines).filter(|line| !is_blank(line));
            let grant = job.grant.as_deref();
            all.extend(lines.map(|line| authorize(parse_line(line), grant)));
            let needs_ledger = all[start..]
                .iter()
                .any(|v| matches!(v, Verdict::Valid { .. }));
            spans.push(Span {
                verdicts: start..all.len(),
                needs_ledger,
            });
        }
        let batch = |i: usize| &all[spans[i].verdicts.clone()];
        let needs_ledger = |i: usize| spans[i].needs_ledger;
        for i in (0..jobs.len()).filter(|&i| !needs_ledger(i)) {
            write_replies(batch(i), &mut completions[i], never_asked);
            direct.push(completions[i].take());
        }
        if (0..jobs.len()).any(needs_ledger) {
            // Offered again while the store cannot write: no reply leaves meanwhile, so
            // this worker's queue fills and the loop stops reading its connections.
            loop {
                let decided = db.decide(|ledger| {
                    (0..jobs.len())
                        .filter(|&i| needs_ledger(i))
                        .map(|i| {
                            let mut completion = completions[i].take();
                            let recv = RecvStamp::new(jobs[i].recv_ms);
                            write_replies(batch(i), &mut completion, |r| ledger.apply(r, &recv));
                            completion
                        })
                        .collect()
                });
                if decided.is_ok() || !db.wait_writable() {
                    break;
                }
            }
        }
        *verdicts = reuse(all);
        completions.clear();
        notifier.send_all(direct);
        for job in jobs.drain(..) {
            spare.give(job.lines);
        }
    }
}

/// A valid reading for a sensor `grant` (the connection's certificate) does not name
/// becomes `Forbidden`; without a grant every sensor is allowed.
fn authorize<'a>(verdict: Verdict<'a>, grant: Option<&Grant>) -> Verdict<'a> {
    match (verdict, grant) {
        (Verdict::Valid { reading, seq_text }, Some(grant)) if !grant.covers(&reading.sensor) => {
            Verdict::Forbidden {
                seq: seq_text,
                reason: format!(
                    "this connection's client certificate does not name sensor {}",
                    reading.sensor
                ),
            }
        }
        (verdict, _) => verdict,
    }
}

/// One batch's verdicts in the worker's `verdicts`.
struct Span {
    verdicts: std::ops::Range<usize>,
    /// It holds a valid reading, which only the ledger can answer.
    needs_ledger: bool,
}

/// The ledger's stand-in for batches without a valid reading: `write_replies` asks it
/// only for valid readings, and such a batch has none (`needs_ledger` is computed from
/// the same verdicts).
fn never_asked(reading: &Reading) -> Applied {
    unreachable!(
        "batch without valid readings asked about {}",
        reading.sensor
    )
}

/// An empty vector of verdicts with `v`'s allocation, for lines of another lifetime:
/// `v` is cleared first, so no verdict outlives its line, and std collects a vector
/// into one of the same element layout in place (a performance property; were it ever
/// lost, this would allocate, not misbehave).
fn reuse<'b>(mut v: Vec<Verdict<'_>>) -> Vec<Verdict<'b>> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
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
            Verdict::Forbidden { seq, reason } => {
                write_rejected_with_reason(out, seq, reason);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_verdict_vectors_keep_their_allocation() {
        let line = br#"{"sensor":"s","kind":"k","value":1,"seq":1}"#.to_vec();
        let mut v = Vec::with_capacity(100);
        v.push(parse_line(&line));
        let again = reuse(v);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), 100);
    }
}
