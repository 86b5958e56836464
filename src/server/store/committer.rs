//! The committer thread: group commit (one `fdatasync` releases every reply waiting
//! for it), syncs of sealed segments, checkpoints, sealing by age and retention of
//! shipped segments. Its slow work runs outside the ledger lock.

use crate::server::archive::confirmed::Confirmed;
use crate::server::store::db::{Db, State};
use crate::server::store::files::{delete_retired, ensure_reserve};
use crate::server::store::segments::Retirement;
use log::warn;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Deleting shipped segments beyond a local budget (`--keep-shipped-bytes`).
pub(crate) struct Retention {
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
pub(crate) fn run_committer(db: &Db, checkpoint_every: Duration, retention: Option<&Retention>) {
    let mut committer = Committer {
        db,
        checkpoint_every,
        retention,
        last_checkpoint: Instant::now(),
        checkpointed_records: db.store_metrics.records.load(Relaxed),
        retained_version: None,
        retention_retry: None,
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
    /// After a retirement failed (its checkpoint could not be written): not before.
    retention_retry: Option<Instant>,
}

impl<'a> Committer<'a> {
    /// One round: what needs the lock under it (sealing, taking the replies and the
    /// syncs, retention, the checkpoint's snapshot), then the slow part without it.
    /// False once the server is closing (the round was the last).
    fn round(&mut self) -> bool {
        let mut state = self.wait_for_work();
        if self.db.broken().is_some() {
            // Nothing of what waits may be acknowledged, nor any checkpoint written.
            state.waiting.clear();
            return false;
        }
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
        // Retention's checkpoint, when it retires segments, is the checkpoint of this
        // round: an older one written after it would list the deleted files again.
        let retirement = self.plan_retirement(&state);
        // Taken under the lock, so the statistics match the file lengths exactly.
        let checkpoint = due
            .then(|| state.store.checkpoint(state.sensors.clone()))
            .flatten();
        let records = self.db.store_metrics.records.load(Relaxed);
        drop(state);

        if let Some(sync) = sync {
            if let Err(e) = sync.run() {
                // A failed write does not come here: `Db::decide` undoes it and waits.
                self.db.break_down(format!("store fsync failed: {e}"));
                return false;
            }
            self.db.notifier.send_all(&mut completions);
        }
        let retired = retirement
            .is_some_and(|(retirement, version)| self.retire(retirement, version, records));
        if let Some(checkpoint) = checkpoint.filter(|_| !retired) {
            // A checkpoint only shortens the next start-up: if it cannot be written
            // (disk full), the old one stays valid and the next one tries again.
            match checkpoint.write() {
                Ok(()) => {
                    self.last_checkpoint = Instant::now();
                    self.checkpointed_records = records;
                }
                Err(e) => warn!("store: checkpoint not written ({e}); will retry"),
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
    /// due, segments shipped since the last retention (the shipper wakes it), or
    /// housekeeping time (sealing by age, retries of what failed).
    fn wait_for_work(&self) -> MutexGuard<'a, State> {
        let state = self.db.lock();
        if !state.waiting.is_empty() || self.checkpoint_due(&state) || self.retention_due() {
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

    /// The archive recorded segments since retention last looked.
    fn retention_due(&self) -> bool {
        self.retention
            .is_some_and(|r| self.retained_version != Some(r.confirmed.version()))
            && self.retention_retry.is_none_or(|at| Instant::now() >= at)
    }

    /// Shipped segments past the local budget, chosen under the lock, with the version
    /// of the archive's record they were chosen by; `None` if the archive confirmed
    /// nothing new since the last retirement, or nothing is due.
    fn plan_retirement(&mut self, state: &State) -> Option<(Retirement, u64)> {
        if !self.retention_due() {
            return None;
        }
        let r = self.retention?;
        let version = r.confirmed.version();
        let confirmed = |number, bytes, crc32| r.confirmed.confirms(number, bytes, crc32);
        match state
            .store
            .plan_retirement(&confirmed, r.keep_bytes, &state.sensors)
        {
            Some(retirement) => Some((retirement, version)),
            None => {
                self.retained_version = Some(version);
                None
            }
        }
    }

    /// Writes the retirement's checkpoint without the lock (its syncs would stall every
    /// worker), then has the store forget the segments and deletes their files. If the
    /// checkpoint cannot be written nothing changes and the next round plans again.
    /// True if the segments were retired (and its checkpoint written).
    fn retire(&mut self, retirement: Retirement, version: u64, records: u64) -> bool {
        if let Err(e) = retirement.write() {
            warn!("store: retention postponed (checkpoint: {e})");
            self.retention_retry = Some(Instant::now() + HOUSEKEEPING);
            return false;
        }
        self.retention_retry = None;
        self.retained_version = Some(version);
        // The checkpoint counts the records of the snapshot it was planned from.
        self.checkpointed_records = records;
        self.last_checkpoint = Instant::now();
        let (retired, retired_through) = {
            let mut state = self.db.lock();
            let retired = state.store.complete_retirement(retirement);
            (retired, state.store.retired_through())
        };
        match delete_retired(&retired) {
            Ok(()) => {
                if let Some(r) = self.retention {
                    r.confirmed.forget_through(retired_through);
                }
            }
            Err(e) => {
                warn!("store: retention could not delete every file ({e}); start-up finishes it")
            }
        }
        // The space freed makes room for the reserve a full disk will need again.
        if let Some(dir) = retired.first().and_then(|file| file.parent()) {
            ensure_reserve(dir, 0);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::config::Fsync;
    use crate::server::ingest::completion::{Completion, Completions, Job, completion_channel};
    use crate::server::ingest::slots::ConnId;
    use crate::server::store::db::Unwritable;
    use crate::server::store::segments::tests::temp_dir;
    use crate::server::store::segments::{Store, StoreOptions};
    use crate::wire::line::parse_line;
    use crate::wire::reading::Verdict;
    use crate::wire::record::RecvStamp;

    /// A `Db` over a fresh store, holding replies for the fsync, and the loop's end of
    /// the completion channel.
    fn db(name: &str) -> (Db, Completions, mio::Poll) {
        let dir = temp_dir(name);
        let (store, sensors) = Store::open(StoreOptions {
            dir,
            segment_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
        })
        .expect("store");
        let poll = mio::Poll::new().expect("poll");
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
        let (notifier, completions) = completion_channel(Arc::new(waker));
        (
            Db::new(sensors, store, notifier, Fsync::Always),
            completions,
            poll,
        )
    }

    fn completion() -> Completion {
        let job = Job {
            conn: ConnId {
                index: 0,
                generation: 1,
            },
            batch: 0,
            lines: Vec::new(),
            arrived: Instant::now(),
            recv_ms: 0,
            grant: None,
        };
        Completion::for_job(&job, Vec::new())
    }

    fn store_one(db: &Db, seq: u64) -> Result<(), Unwritable> {
        let line = format!(r#"{{"sensor":"s","kind":"k","value":1,"seq":{seq}}}"#);
        let Verdict::Valid { reading, .. } = parse_line(line.as_bytes()) else {
            panic!("not valid")
        };
        db.decide(|ledger| {
            ledger.apply(&reading, &RecvStamp::new(0));
            vec![completion()]
        })
    }

    #[test]
    fn a_broken_store_acknowledges_nothing_more_and_its_committer_stops() {
        let (db, completions, _poll) = db("broken");
        store_one(&db, 1).expect("stored");
        db.break_down("store fsync failed: test".into());
        assert_eq!(db.broken(), Some("store fsync failed: test"));
        assert!(store_one(&db, 2).is_err(), "a broken store takes no batch");
        assert!(!db.wait_writable(), "workers give their batches up");
        // The reply of seq 1 waited for an fsync that never came: it must not leave,
        // and the committer stops by itself (nobody calls `close`).
        let db = Arc::new(db);
        let (done, stopped) = std::sync::mpsc::channel();
        let committer = db.clone();
        std::thread::spawn(move || {
            run_committer(&committer, Duration::from_secs(3600), None);
            let _ = done.send(());
        });
        assert!(
            stopped.recv_timeout(Duration::from_secs(20)).is_ok(),
            "the committer of a broken store did not stop"
        );
        assert_eq!(completions.drain().count(), 0);
        assert_eq!(db.with_sensors(|s| s["s"].last_seq), 1);
    }

    #[test]
    fn a_healthy_store_releases_replies_after_the_fsync() {
        let (db, completions, _poll) = db("healthy");
        store_one(&db, 1).expect("stored");
        db.close();
        run_committer(&db, Duration::from_secs(3600), None);
        assert_eq!(completions.drain().count(), 1);
        assert_eq!(db.broken(), None);
    }
}
