//! The ledger every worker shares, and the group commit that makes it durable.
//!
//! Workers validate lines in parallel, then take the ledger lock once per batch to decide
//! `ok` / `duplicate` / kind-mismatch for each valid reading, update statistics and append
//! the records to a pending buffer. Their replies wait in the same locked state. One
//! committer thread repeatedly swaps out everything pending, writes it with one `write`
//! and one `fsync`, and only then releases the waiting replies to the event loop. Whatever
//! arrives while an fsync runs shares the next one: the batching grows with load.
//!
//! Because the committer is a single thread that releases replies in the order they were
//! queued, a reply queued after a record was appended is released only after that record
//! is durable. That is what makes a `duplicate` reply safe to send: the reading it refers
//! to was appended earlier, so it is on disk by the time the `duplicate` leaves.

use crate::protocol::Reading;
use crate::stats::SensorStats;
use crate::store::{Sensors, Store, encode_record};
use crate::worker::{Completion, Notifier};
use log::error;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
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
    /// Encoded records not yet handed to the committer.
    pending: Vec<u8>,
    pending_records: u64,
    /// Replies to release after the next commit.
    waiting: Vec<Completion>,
    closing: bool,
}

/// Shared by the workers, the committer and the event loop (for `/sensors`).
pub struct Db {
    state: Mutex<State>,
    commit_needed: Condvar,
}

/// The locked ledger, handed to a worker for the duration of one batch.
pub struct Ledger<'a> {
    state: MutexGuard<'a, State>,
}

impl Ledger<'_> {
    /// Decides a valid reading against what is stored, and stores it if it is new.
    pub fn apply(&mut self, r: &Reading, recv_ms: u64) -> Applied {
        let state = &mut *self.state;
        match state.sensors.get_mut(r.sensor.as_ref()) {
            Some(s) if s.kind != r.kind => return Applied::KindMismatch(s.kind.clone()),
            Some(s) if r.seq <= s.last_seq => return Applied::Duplicate,
            Some(s) => s.add(r.value, r.seq, r.ts),
            None => {
                let stats = SensorStats::first(&r.kind, r.value, r.seq, r.ts);
                state.sensors.insert(r.sensor.to_string(), stats);
            }
        }
        encode_record(&mut state.pending, r, recv_ms);
        state.pending_records += 1;
        Applied::Stored
    }
}

impl Db {
    pub fn new(sensors: Sensors) -> Db {
        Db {
            state: Mutex::new(State {
                sensors,
                pending: Vec::new(),
                pending_records: 0,
                waiting: Vec::new(),
                closing: false,
            }),
            commit_needed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic aborts the process (release profile), so poisoning only matters in
        // tests; the state stays consistent per reading either way.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `decide` with the ledger locked; its completion is released to the event loop
    /// only after the next commit, so every reply in it refers to durable data.
    pub fn decide<F: FnOnce(&mut Ledger) -> Completion>(&self, decide: F) {
        let mut ledger = Ledger { state: self.lock() };
        let completion = decide(&mut ledger);
        ledger.state.waiting.push(completion);
        drop(ledger);
        self.commit_needed.notify_one();
    }

    /// Calls `f` with every sensor's statistics (for `/sensors` and `/metrics`).
    pub fn with_sensors<T>(&self, f: impl FnOnce(&Sensors) -> T) -> T {
        f(&self.lock().sensors)
    }

    /// Asks the committer to write what is pending, checkpoint and return.
    pub fn close(&self) {
        self.lock().closing = true;
        self.commit_needed.notify_one();
    }
}

/// The committer thread's body: group commit until `Db::close`. An I/O error on the
/// store ends the process: replies that were promised durable cannot be given, and a
/// restart rebuilds the ledger from what really is on disk (the same stance PostgreSQL
/// takes on a failed fsync).
pub fn run_committer(db: &Db, mut store: Store, notifier: &Notifier, checkpoint_every: Duration) {
    if let Err(e) = commit_loop(db, &mut store, notifier, checkpoint_every) {
        error!("store write failed, stopping so that no unstored reading is acknowledged: {e}");
        std::process::exit(1);
    }
}

fn commit_loop(
    db: &Db,
    store: &mut Store,
    notifier: &Notifier,
    checkpoint_every: Duration,
) -> std::io::Result<()> {
    let mut spare = Vec::new();
    let mut last_checkpoint = Instant::now();
    let mut dirty = false;
    loop {
        let mut state = db.lock();
        loop {
            let due = dirty && last_checkpoint.elapsed() >= checkpoint_every;
            if !state.pending.is_empty() || !state.waiting.is_empty() || state.closing || due {
                break;
            }
            let wait = checkpoint_every.saturating_sub(last_checkpoint.elapsed());
            state = db
                .commit_needed
                .wait_timeout(state, wait.max(Duration::from_millis(10)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        std::mem::swap(&mut state.pending, &mut spare);
        let records = std::mem::take(&mut state.pending_records);
        let completions = std::mem::take(&mut state.waiting);
        let closing = state.closing && spare.is_empty() && completions.is_empty();
        let checkpoint_due =
            closing || store.rotated() || (dirty && last_checkpoint.elapsed() >= checkpoint_every);
        // Taken under the same lock as the records, so it describes exactly the store
        // once `spare` is written.
        let snapshot = checkpoint_due.then(|| state.sensors.clone());
        drop(state);

        if !spare.is_empty() {
            store.append(&spare, records)?;
            spare.clear();
            dirty = true;
        }
        notifier.send_all(completions);
        if let Some(sensors) = snapshot {
            store.write_checkpoint(&sensors)?;
            last_checkpoint = Instant::now();
            dirty = false;
        }
        if closing {
            return Ok(());
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
            seq,
            ts: None,
        }
    }

    #[test]
    fn the_ledger_stores_new_seqs_and_answers_duplicates_and_kind_changes() {
        let db = Db::new(Sensors::new());
        let mut ledger = Ledger { state: db.lock() };
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 5), 0),
            Applied::Stored
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 5), 0),
            Applied::Duplicate
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 4), 0),
            Applied::Duplicate
        );
        assert_eq!(
            ledger.apply(&reading("a", "humidity", 9), 0),
            Applied::KindMismatch("temperature".into())
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 6), 0),
            Applied::Stored
        );
        assert_eq!(ledger.state.pending_records, 2);
        assert_eq!(ledger.state.sensors["a"].last_seq, 6);
    }
}
