//! The ledger every worker shares, and the group commit that makes it durable.
//!
//! Workers validate lines in parallel, then take the ledger lock once per group of
//! batches (whatever queued up for that worker): for each valid reading they decide `ok`
//! / `duplicate` / kind-mismatch, update statistics and encode the record; the group's
//! records then go to the store in one `write` before the lock is released. Writing under the lock keeps the file in ledger order, which is what
//! lets a checkpoint pair statistics with file lengths.
//!
//! With `--fsync never` the replies go straight back to the event loop: the records are
//! in the page cache, which is all that mode promises. With `--fsync always` they wait in
//! the locked state; the committer thread repeatedly takes every waiting reply, runs one
//! `fdatasync` on the active segment, and only then releases them. Whatever arrives
//! during an fsync shares the next one, so batching grows with load.
//!
//! A reply queued after a record was written is released only after an fsync that began
//! later, so it refers to durable data. That is what makes `duplicate` safe: the reading
//! it refers to was written earlier, hence is on disk when the `duplicate` leaves.

use crate::server::archive::shipper::Confirmed;
use crate::server::ingest::completion::{Completion, Notifier};
use crate::server::store::files::{delete_retired, ensure_reserve};
use crate::server::store::segments::{Sensors, Store, StoreMetrics};
use crate::server::store::stats::{self, Counted};
use crate::wire::reading::Reading;
use crate::wire::record::{RecvStamp, encode_record};
use log::{error, info, warn};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What the ledger made of one valid reading.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Stored,
    Duplicate,
    /// The sensor's kind was fixed by its first stored reading; this is the fixed kind.
    KindMismatch(String),
}

/// The shared state behind the lock.
struct State {
    sensors: Sensors,
    store: Store,
    /// Encoding buffer for one batch's records, reused.
    records: Vec<u8>,
    /// Replies waiting for the next fsync (`--fsync always` only).
    waiting: Vec<Completion>,
    closing: bool,
    /// When a write last failed; while the store is unavailable, writes are retried
    /// at most every `RETRY_WRITES`.
    failed_at: Option<Instant>,
}

/// Shared by the workers, the committer and the event loop (for `/sensors`).
pub struct Db {
    state: Mutex<State>,
    commit_needed: Condvar,
    /// Signalled when writes work again (or the server stops), for workers waiting.
    writable: Condvar,
    /// Set at shutdown: workers give up batches the store cannot take.
    abandon: AtomicBool,
    notifier: Notifier,
    fsync: bool,
    store_metrics: Arc<StoreMetrics>,
}

/// How often a store that failed a write is tried again.
const RETRY_WRITES: Duration = Duration::from_secs(1);

/// The store cannot take writes now; the batch was not stored (nothing of it was
/// acknowledged) and may be offered again.
#[derive(Debug)]
pub struct Unwritable;

/// The locked ledger, handed to a worker for the duration of one batch.
pub struct Ledger<'a> {
    sensors: &'a mut Sensors,
    records: &'a mut Vec<u8>,
    stored: u64,
}

impl Ledger<'_> {
    /// Decides a valid reading against what is stored, and stores it if it is new.
    pub fn apply(&mut self, r: &Reading, recv: &RecvStamp) -> Applied {
        match stats::count(
            self.sensors,
            &r.sensor,
            &r.kind,
            (r.value, r.seq, r.ts),
            true,
        ) {
            Counted::Yes => {}
            Counted::NotNewer => return Applied::Duplicate,
            Counted::OtherKind(kind) => return Applied::KindMismatch(kind),
        }
        encode_record(self.records, r, recv);
        self.stored += 1;
        Applied::Stored
    }
}

impl Db {
    /// `fsync`: hold replies until an fsync covers them (`--fsync always`).
    pub fn new(sensors: Sensors, store: Store, notifier: Notifier, fsync: bool) -> Db {
        let store_metrics = store.metrics();
        Db {
            state: Mutex::new(State {
                sensors,
                store,
                records: Vec::new(),
                waiting: Vec::new(),
                closing: false,
                failed_at: None,
            }),
            commit_needed: Condvar::new(),
            writable: Condvar::new(),
            abandon: AtomicBool::new(false),
            notifier,
            fsync,
            store_metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic aborts the process (release profile), so poisoning only matters in
        // tests; the state stays consistent per reading either way.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `decide` with the ledger locked, writes the records it stored in one
    /// `write`, and sends its completions on once they are as durable as `--fsync`
    /// promises (with one wake-up for all of them).
    ///
    /// When the write fails (disk full, I/O error) the batch is undone: the segment is
    /// cut back and the ledger reloaded from what the files hold, its completions are
    /// dropped, the store is reported unavailable, and `Err` asks the caller to offer
    /// the batch again (`wait_writable`). So nothing is acknowledged that is not stored,
    /// and nothing is stored twice.
    pub fn decide<F: FnOnce(&mut Ledger) -> Vec<Completion>>(
        &self,
        decide: F,
    ) -> Result<(), Unwritable> {
        let mut guard = self.lock();
        let state = &mut *guard;
        // Statistics that miss retired segments would accept their seqs again
        // (`/healthz` names the reason).
        if state.store.incomplete().is_some() {
            return Err(Unwritable);
        }
        if state
            .failed_at
            .is_some_and(|at| at.elapsed() < RETRY_WRITES)
        {
            return Err(Unwritable);
        }
        let mut ledger = Ledger {
            sensors: &mut state.sensors,
            records: &mut state.records,
            stored: 0,
        };
        let mut completions = decide(&mut ledger);
        let stored = ledger.stored;
        if !state.records.is_empty() {
            let written = state.store.append(&state.records, stored);
            state.records.clear();
            if let Err(e) = written {
                self.store_metrics.write_failures.fetch_add(1, Relaxed);
                state.sensors = state.store.reload().unwrap_or_else(|reload| {
                    fail(std::io::Error::other(format!(
                        "store write failed ({e}) and the ledger cannot be rebuilt: {reload}"
                    )))
                });
                if state.failed_at.is_none() {
                    error!(
                        "store write failed: {e}; acknowledging nothing until writes work again"
                    );
                }
                state.failed_at = Some(Instant::now());
                self.store_metrics
                    .set_unavailable(Some(format!("store cannot write: {e}")));
                return Err(Unwritable);
            }
        }
        if state.failed_at.take().is_some() {
            info!("store writes work again; resuming");
            self.store_metrics.set_unavailable(None);
            self.writable.notify_all();
        }
        if self.fsync {
            state.waiting.append(&mut completions);
            drop(guard);
            self.commit_needed.notify_one();
        } else {
            let sealed = state.store.sync_pending();
            drop(guard);
            self.notifier.send_all(&mut completions);
            if sealed {
                // A segment was sealed: the committer syncs it, so the archive may ship it.
                self.commit_needed.notify_one();
            }
        }
        Ok(())
    }

    /// Waits until a batch refused by `decide` is worth offering again; false once the
    /// server is stopping and the batch should be given up (it was never acknowledged,
    /// so its sensors send it again).
    pub fn wait_writable(&self) -> bool {
        let guard = self.lock();
        let _ = self
            .writable
            .wait_timeout(guard, RETRY_WRITES)
            .unwrap_or_else(PoisonError::into_inner);
        !self.abandon.load(SeqCst)
    }

    /// At shutdown: batches the store cannot take are given up instead of retried.
    pub fn abandon_unwritable(&self) {
        self.abandon.store(true, SeqCst);
        self.writable.notify_all();
    }

    /// Calls `f` with every sensor's statistics (for `/sensors` and `/metrics`).
    pub fn with_sensors<T>(&self, f: impl FnOnce(&Sensors) -> T) -> T {
        f(&self.lock().sensors)
    }

    /// Asks the committer to release what waits, checkpoint and return.
    pub fn close(&self) {
        self.lock().closing = true;
        self.commit_needed.notify_one();
    }
}

/// An fsync failed, or a failed write could not be undone. After a failed fsync the
/// kernel may have dropped the written pages: what the ledger counts can no longer be
/// trusted, so the process stops; a restart rebuilds the ledger from what really is on
/// disk and sensors resend the rest. (PostgreSQL takes the same stance on a failed
/// fsync.) A failed write alone does not come here: `decide` undoes it and waits.
fn fail(e: std::io::Error) -> ! {
    error!("store fsync failed, stopping so that no unstored reading is acknowledged: {e}");
    std::process::exit(1);
}

/// Deleting shipped segments beyond a local budget (`--keep-shipped-bytes`).
pub struct Retention {
    /// What S3 confirmed, segment by segment (recorded by the shipper).
    pub confirmed: Arc<Confirmed>,
    /// Shipped segments kept on disk, oldest deleted first past this.
    pub keep_bytes: u64,
}

/// Longest the committer sleeps: segment age and retention are checked this often.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The committer thread's body until `Db::close`: group fsync (with `--fsync always`),
/// a checkpoint every `checkpoint_every` while readings arrive and at the end, sealing
/// by age (and at the end), and retention of shipped segments.
pub fn run_committer(db: &Db, checkpoint_every: Duration, retention: Option<&Retention>) {
    let mut committer = Committer {
        db,
        checkpoint_every,
        retention,
        last_checkpoint: Instant::now(),
        checkpointed_records: db.store_metrics.records.load(Relaxed),
        retained_version: None,
    };
    while committer.round() {}
}

/// What the committer remembers between rounds.
struct Committer<'a> {
    db: &'a Db,
    checkpoint_every: Duration,
    retention: Option<&'a Retention>,
    last_checkpoint: Instant,
    /// Records counted by the last checkpoint (none is written while nothing changed).
    checkpointed_records: u64,
    /// The version of the archive's record retention last acted on.
    retained_version: Option<u64>,
}

impl<'a> Committer<'a> {
    /// One round: what needs the lock under it (sealing, taking the replies and the
    /// syncs, retention, the checkpoint's snapshot), then the slow part without it.
    /// False once the server is closing (the round was the last).
    fn round(&mut self) -> bool {
        let mut state = self.wait_for_work();
        let sealed = if state.closing {
            state.store.seal()
        } else {
            state.store.seal_if_due()
        };
        if let Err(e) = sealed {
            // Nothing is lost: the segment stays active and sealing is tried again.
            warn!("store: cannot seal the active segment yet: {e}");
        }
        let mut completions = std::mem::take(&mut state.waiting);
        let sync = (!completions.is_empty() || state.store.sync_pending())
            .then(|| state.store.take_sync(!completions.is_empty()));
        let closing = state.closing;
        let due = self.checkpoint_due(&state);
        // Retention first: when it retires segments it writes a checkpoint of the
        // store as it is now, which then is the checkpoint of this round (an older one
        // written after it would list the deleted files again).
        let retired = self.retain(&mut state);
        // Taken under the lock, so the statistics match the file lengths exactly.
        let checkpoint = (retired.is_empty() && due)
            .then(|| {
                self.checkpointed_records = self.db.store_metrics.records.load(Relaxed);
                state.store.checkpoint(state.sensors.clone())
            })
            .flatten();
        let retired_through = state.store.retired_through();
        drop(state);

        if let Some(sync) = sync {
            if let Err(e) = sync.run() {
                fail(e);
            }
            self.db.notifier.send_all(&mut completions);
        }
        if let Some(checkpoint) = checkpoint {
            // A checkpoint only shortens the next start-up: if it cannot be written
            // (disk full), the old one stays valid and the next one tries again.
            match checkpoint.write() {
                Ok(()) => self.last_checkpoint = Instant::now(),
                Err(e) => warn!("store: checkpoint not written ({e}); will retry"),
            }
        }
        if !retired.is_empty() {
            match delete_retired(&retired) {
                Ok(()) => {
                    if let Some(r) = self.retention {
                        r.confirmed.forget_through(retired_through);
                    }
                }
                Err(e) => warn!(
                    "store: retention could not delete every file ({e}); start-up finishes it"
                ),
            }
            // The space freed makes room for the reserve a full disk will need again.
            if let Some(dir) = retired[0].parent() {
                ensure_reserve(dir, 0);
            }
        }
        !closing
    }

    fn checkpoint_due(&self, state: &State) -> bool {
        state.closing
            || (self.last_checkpoint.elapsed() >= self.checkpoint_every
                && self.db.store_metrics.records.load(Relaxed) != self.checkpointed_records)
    }

    /// The locked state once there is work: replies waiting for an fsync, a checkpoint
    /// due, or housekeeping time (sealing by age, retention).
    fn wait_for_work(&self) -> MutexGuard<'a, State> {
        let state = self.db.lock();
        if !state.waiting.is_empty() || self.checkpoint_due(&state) {
            return state;
        }
        let wait = self
            .checkpoint_every
            .saturating_sub(self.last_checkpoint.elapsed())
            .min(state.store.seal_wait().unwrap_or(HOUSEKEEPING))
            .clamp(Duration::from_millis(50), HOUSEKEEPING);
        self.db
            .commit_needed
            .wait_timeout(state, wait)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Retires shipped segments past the local budget; returns the files to delete once
    /// the lock is released.
    fn retain(&mut self, state: &mut State) -> Vec<std::path::PathBuf> {
        let Some(r) = self.retention else {
            return Vec::new();
        };
        let version = r.confirmed.version();
        if self.retained_version == Some(version) {
            return Vec::new();
        }
        let State { store, sensors, .. } = state;
        let confirmed = |number, bytes, crc32| r.confirmed.confirms(number, bytes, crc32);
        match store.retire(&confirmed, r.keep_bytes, sensors) {
            Ok(victims) => {
                self.retained_version = Some(version);
                if !victims.is_empty() {
                    self.checkpointed_records = self.db.store_metrics.records.load(Relaxed);
                    self.last_checkpoint = Instant::now();
                }
                victims
            }
            Err(e) => {
                warn!("store: retention postponed (checkpoint: {e})");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn reading(sensor: &str, kind: &'static str, seq: u64) -> Reading<'static> {
        Reading {
            sensor: Cow::Owned(sensor.into()),
            kind: Cow::Borrowed(kind),
            value: 1.0,
            value_text: Cow::Borrowed("1.0"),
            seq,
            ts: None,
        }
    }

    #[test]
    fn the_ledger_stores_new_seqs_and_answers_duplicates_and_kind_changes() {
        let (mut sensors, mut records) = (Sensors::default(), Vec::new());
        let mut ledger = Ledger {
            sensors: &mut sensors,
            records: &mut records,
            stored: 0,
        };
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 5), &RecvStamp::new(0)),
            Applied::Stored
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 5), &RecvStamp::new(0)),
            Applied::Duplicate
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 4), &RecvStamp::new(0)),
            Applied::Duplicate
        );
        assert_eq!(
            ledger.apply(&reading("a", "humidity", 9), &RecvStamp::new(0)),
            Applied::KindMismatch("temperature".into())
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 6), &RecvStamp::new(0)),
            Applied::Stored
        );
        assert_eq!(ledger.stored, 2);
        assert_eq!(sensors["a"].last_seq, 6);
        assert_eq!(records.iter().filter(|&&b| b == b'\n').count(), 2);
    }
}
