//! The worker pool: validation, the ledger decision and reply formatting, off the event
//! loop's thread.
//!
//! The unit of work is a *batch*: every complete line one connection delivered in one
//! read pass (bounded in lines). Batching amortises the queue hand-off, the ledger lock
//! and the wake-up of the event loop over hundreds of readings; a worker also takes
//! whatever batches queued up meanwhile as one *group*, decided under one lock.

use crate::server::completion::{BufferPool, Completion, Job, Notifier};
use crate::server::db::{Applied, Db};
use crate::wire::framing;
use crate::wire::reading::{Reading, Verdict, is_blank, parse_line};
use crate::wire::reply::{Status, write_reply};
use crossbeam_channel::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;

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
                    let mut group = Vec::with_capacity(MAX_GROUP);
                    let mut spare = BufferPool::default();
                    while let Ok(first) = jobs.recv() {
                        // Whatever queued up meanwhile is decided together: one lock,
                        // one write and one wake-up for many small batches.
                        group.push(first);
                        group.extend(jobs.try_iter().take(MAX_GROUP - 1));
                        process(&mut group, &db, &notifier, &mut spare);
                    }
                })
        })
        .collect()
}

/// Batches one worker takes from its queue at once.
const MAX_GROUP: usize = 64;

/// Validates a group of batches (emptying `jobs`), lets the ledger decide their valid
/// readings, and routes the replies: through the ledger (and the committer) when they
/// depend on stored data, straight to the loop otherwise. Reply buffers come from
/// `spare`, and the jobs' line buffers go back to it.
pub fn process(jobs: &mut Vec<Job>, db: &Db, notifier: &Notifier, spare: &mut BufferPool) {
    let mut completions: Vec<Completion> = jobs
        .iter()
        .map(|job| Completion::for_job(job, spare.take()))
        .collect();
    let mut verdicts = Vec::new();
    let mut ends = Vec::with_capacity(jobs.len());
    for job in jobs.iter() {
        let lines = framing::lines(&job.lines).filter(|line| !is_blank(line));
        verdicts.extend(lines.map(parse_line));
        ends.push(verdicts.len());
    }
    let batches = || {
        (0..jobs.len()).map(|i| {
            (
                i,
                &verdicts[i.checked_sub(1).map_or(0, |p| ends[p])..ends[i]],
            )
        })
    };
    let has_valid = |v: &[Verdict]| v.iter().any(|v| matches!(v, Verdict::Valid { .. }));
    for (i, batch) in batches() {
        if !has_valid(batch) {
            // No valid reading: `decide` is never called.
            write_replies(batch, &mut completions[i], |_| Applied::Duplicate);
        }
    }
    if batches().any(|(_, batch)| has_valid(batch)) {
        // Offered again while the store cannot write: no reply leaves meanwhile, so
        // this worker's queue fills and the loop stops reading its connections.
        loop {
            let decided = db.decide(|ledger| {
                batches()
                    .filter(|(_, batch)| has_valid(batch))
                    .map(|(i, batch)| {
                        let mut completion = completions[i].take();
                        let recv_ms = jobs[i].recv_ms;
                        write_replies(batch, &mut completion, |r| ledger.apply(r, recv_ms));
                        completion
                    })
                    .collect()
            });
            if decided.is_ok() || !db.wait_writable() {
                break;
            }
        }
    }
    let mut direct: Vec<Completion> = batches()
        .filter(|(_, batch)| !has_valid(batch))
        .map(|(i, _)| completions[i].take())
        .collect();
    drop(verdicts);
    notifier.send_all(&mut direct);
    for job in jobs.drain(..) {
        spare.give(job.lines);
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
