//! `Db`: the one lock every worker shares over the ledger (`ledger.rs`) and the store
//! (`segments.rs`), and where a decided batch's replies go next.
//!
//! Workers validate lines in parallel, then take the lock once per group of batches
//! (whatever queued up for that worker): for each valid reading the ledger decides `ok`
//! / `duplicate` / kind-mismatch, updates statistics and encodes the record; the group's
//! records then go to the store in one `write` before the lock is released. Writing
//! under the lock keeps the file in ledger order, which is what lets a checkpoint pair
//! statistics with file lengths.
//!
//! With `--fsync never` the replies go straight back to the event loop: the records are
//! in the page cache, which is all that mode promises. With `--fsync always` they wait in
//! the locked state; the committer thread (`committer.rs`) repeatedly takes every waiting reply, runs one
//! `fdatasync` on the active segment, and only then releases them. Whatever arrives
//! during an fsync shares the next one, so batching grows with load.
//!
//! A reply queued after a record was written is released only after an fsync that began
//! later, so it refers to durable data. That is what makes `duplicate` safe: the reading
//! it refers to was written earlier, hence is on disk when the `duplicate` leaves.

use crate::server::config::Fsync;
use crate::server::ingest::completion::{Completion, Notifier};
use crate::server::store::ledger::Ledger;
use crate::server::store::segments::{Sensors, Store, StoreMetrics};
use log::{error, info};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The shared state behind the lock.
pub(super) struct State {
    pub(super) sensors: Sensors,
    pub(super) store: Store,
    /// Encoding buffer for one batch's records, reused.
    records: Vec<u8>,
    /// Replies waiting for the next fsync (`--fsync always` only).
    pub(super) waiting: Vec<Completion>,
    pub(super) closing: bool,
    /// When a write last failed; while the store is unavailable, writes are retried
    /// at most every `RETRY_WRITES`.
    failed_at: Option<Instant>,
}

/// Shared by the workers, the committer and the event loop (for `/sensors`).
pub(crate) struct Db {
    state: Mutex<State>,
    pub(super) commit_needed: Condvar,
    /// Signalled when writes work again (or the server stops), for workers waiting.
    writable: Condvar,
    /// Set at shutdown: workers give up batches the store cannot take.
    abandon: AtomicBool,
    /// Set once the store can no longer be trusted (`break_down`): why.
    broken: OnceLock<String>,
    pub(super) notifier: Notifier,
    fsync: Fsync,
    pub(super) store_metrics: Arc<StoreMetrics>,
}

/// How often a store that failed a write is tried again.
const RETRY_WRITES: Duration = Duration::from_secs(1);

/// The store cannot take writes now; the batch was not stored (nothing of it was
/// acknowledged) and may be offered again.
#[derive(Debug)]
pub(crate) struct Unwritable;
impl Db {
    /// With `Fsync::Always` replies wait until an fsync covers them.
    pub(crate) fn new(sensors: Sensors, store: Store, notifier: Notifier, fsync: Fsync) -> Db {
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
            broken: OnceLock::new(),
            notifier,
            fsync,
            store_metrics,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
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
    pub(crate) fn decide<F: FnOnce(&mut Ledger) -> Vec<Completion>>(
        &self,
        decide: F,
    ) -> Result<(), Unwritable> {
        let mut guard = self.lock();
        if !self.takes_writes(&guard) {
            return Err(Unwritable);
        }
        let state = &mut *guard;
        let mut ledger = Ledger {
            sensors: &mut state.sensors,
            records: &mut state.records,
            stored: 0,
        };
        let completions = decide(&mut ledger);
        let stored = ledger.stored;
        if let Err(e) = self.append(state, stored) {
            // Undone: the segment cut back, the ledger as the files have it.
            match state.store.reload() {
                Ok(sensors) => state.sensors = sensors,
                Err(reload) => {
                    drop(guard);
                    self.break_down(format!(
                        "store write failed ({e}) and the ledger cannot be rebuilt: {reload}"
                    ));
                    return Err(Unwritable);
                }
            }
            self.mark_unwritable(state, &e);
            return Err(Unwritable);
        }
        self.route(guard, completions);
        Ok(())
    }

    /// False while a batch would be refused: the store broke down, its statistics are
    /// incomplete (they would accept retired segments' seqs again; `/healthz` names the
    /// reason), or a write failed less than `RETRY_WRITES` ago.
    fn takes_writes(&self, state: &State) -> bool {
        self.broken().is_none()
            && state.store.incomplete().is_none()
            && state
                .failed_at
                .is_none_or(|at| at.elapsed() >= RETRY_WRITES)
    }

    /// Writes the records the ledger encoded (one `write`); a store that was unwritable
    /// is writable again once this succeeds.
    fn append(&self, state: &mut State, stored: u64) -> std::io::Result<()> {
        if !state.records.is_empty() {
            let written = state.store.append(&state.records, stored);
            state.records.clear();
            written?;
        }
        if state.failed_at.take().is_some() {
            info!("store writes work again; resuming");
            self.store_metrics.set_unavailable(None);
            self.writable.notify_all();
        }
        Ok(())
    }

    fn mark_unwritable(&self, state: &mut State, e: &std::io::Error) {
        self.store_metrics.write_failures.fetch_add(1, Relaxed);
        if state.failed_at.is_none() {
            error!("store write failed: {e}; acknowledging nothing until writes work again");
        }
        state.failed_at = Some(Instant::now());
        self.store_metrics
            .set_unavailable(Some(format!("store cannot write: {e}")));
    }

    /// Sends a stored batch's replies on: to the committer, to leave after the next
    /// fsync (`--fsync always`), or to the loop at once.
    fn route(&self, mut state: MutexGuard<'_, State>, mut completions: Vec<Completion>) {
        if self.fsync == Fsync::Always {
            state.waiting.append(&mut completions);
            drop(state);
            self.commit_needed.notify_one();
        } else {
            let sealed = state.store.sync_pending();
            drop(state);
            self.notifier.send_all(&mut completions);
            if sealed {
                // A segment was sealed: the committer syncs it, so the archive may ship it.
                self.commit_needed.notify_one();
            }
        }
    }

    /// Waits until a batch refused by `decide` is worth offering again; false once the
    /// server is stopping and the batch should be given up (it was never acknowledged,
    /// so its sensors send it again).
    pub(crate) fn wait_writable(&self) -> bool {
        let guard = self.lock();
        let _ = self
            .writable
            .wait_timeout(guard, RETRY_WRITES)
            .unwrap_or_else(PoisonError::into_inner);
        !self.abandon.load(SeqCst) && self.broken().is_none()
    }

    /// The store can no longer be trusted to hold what the ledger counts: after a failed
    /// fsync the kernel may have dropped written pages, after a failed undo the ledger
    /// counts what the files may not hold. Nothing more is acknowledged (replies waiting
    /// for an fsync are dropped by the committer, workers give up their batches), the
    /// event loop stops, and `sensor-server` exits 1; a restart rebuilds the ledger from
    /// what really is on disk and sensors resend the rest. (PostgreSQL takes the same
    /// stance on a failed fsync.)
    pub(crate) fn break_down(&self, why: String) {
        error!("{why}; acknowledging nothing more and stopping");
        let _ = self.broken.set(why);
        self.writable.notify_all();
        self.commit_needed.notify_one();
        self.notifier.wake();
    }

    /// Why the store broke down, once it has.
    pub(crate) fn broken(&self) -> Option<&str> {
        self.broken.get().map(String::as_str)
    }

    /// At shutdown: batches the store cannot take are given up instead of retried.
    pub(crate) fn abandon_unwritable(&self) {
        self.abandon.store(true, SeqCst);
        self.writable.notify_all();
    }

    /// Calls `f` with every sensor's statistics (for `/sensors` and `/metrics`).
    pub(crate) fn with_sensors<T>(&self, f: impl FnOnce(&Sensors) -> T) -> T {
        f(&self.lock().sensors)
    }

    /// Has the committer look for work now (segments were shipped, which retention may
    /// delete). Under the lock, so a committer about to wait does not miss it.
    pub(crate) fn wake_committer(&self) {
        let _state = self.lock();
        self.commit_needed.notify_one();
    }

    /// Asks the committer to release what waits, checkpoint and return.
    pub(crate) fn close(&self) {
        self.lock().closing = true;
        self.commit_needed.notify_one();
    }
}
