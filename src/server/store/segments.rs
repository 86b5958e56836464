//! The durable store: append-only JSON Lines segments in `--data-dir`, recovery at
//! start-up, and a checkpoint so that restart time does not grow with years of data.
//!
//! Files:
//! - `segment-NNNNNNNNNN.jsonl`: stored readings, one JSON object a line. Only the
//!   highest number (the *active* segment) is appended to; every lower one is *sealed*
//!   and never changes again. The active segment is sealed (synced, and a new one
//!   started) past `segment_bytes`, when its first record is older than `max_age` or
//!   from an earlier UTC day, at a graceful stop, and at start-up when it is not empty
//!   (after a crash, whatever it holds is final). Sealed segments are what the archive
//!   ships (`archive/shipper.rs`). Any other `*.jsonl` file directly in the directory is read
//!   as part of the store too, never written: the files are the user's data.
//! - `checkpoint.json`: per-sensor statistics together with the length of every `*.jsonl`
//!   file they cover, with the CRC-32 of the covered bytes. Start-up checks those, loads
//!   it and replays only the bytes after; covered bytes that changed (corruption) make
//!   it replay everything instead, with a warning.
//!   It is written after the data it covers is synced, by rename, so a crash leaves
//!   either the old or the new one. It also records `retired_through`: segments up to
//!   that number were shipped and are deleted by retention; their readings live on in
//!   the statistics (and in the archive), so start-up neither replays nor misses them.
//!
//! The directory itself is held with an exclusive `flock` so two servers never append to
//! one store; unlike a lock file, a directory cannot be deleted out from under its
//! holder while it holds files.

use crate::disk::sync_dir;
use crate::server::http::metrics::{Histogram, LATENCY_BUCKETS};
use crate::server::store::files::{
    self, ARCHIVE_STATE, ArchiveState, Checkpoint, Covered, ShippedSegment, segment_name,
    segment_number,
};
use crate::server::store::recovery::{self, Recovered, load, probe_writable, recover};
use crate::server::store::replay::replay;
use crate::server::store::watermarks::Watermarks;
use log::{info, warn};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub(crate) use crate::server::store::stats::Sensors;
pub(crate) use retire::Retirement;

mod open;
mod rebuild;
mod retire;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub dir: PathBuf,
    /// Start a new segment once the active one reaches this size.
    pub segment_bytes: u64,
    /// Seal a non-empty active segment once its first record is this old.
    pub max_age: Duration,
}

/// What `/metrics` sees of the store; written by whoever holds the ledger lock (workers
/// appending, the committer sealing and retiring), except `fsync_seconds`, which the
/// syncs update after the lock is released (`SyncSet::run`); read without the lock.
#[derive(Debug)]
pub struct StoreMetrics {
    pub bytes: AtomicU64,
    pub segments: AtomicU64,
    pub records: AtomicU64,
    pub fsync_seconds: Histogram,
    /// Segments deleted by retention since start.
    pub retired_segments: AtomicU64,
    /// Appends that failed (disk full, I/O error); each was undone and is retried.
    pub write_failures: AtomicU64,
    /// Files whose stored bytes changed on disk, found after start-up.
    pub corrupt_files: AtomicU64,
    /// Why the store cannot take writes now (`/healthz` says it); `None` while it can.
    pub unavailable: Mutex<Option<String>>,
}

impl StoreMetrics {
    fn new(unavailable: Option<String>) -> StoreMetrics {
        StoreMetrics {
            bytes: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            records: AtomicU64::new(0),
            fsync_seconds: Histogram::new(LATENCY_BUCKETS),
            retired_segments: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            corrupt_files: AtomicU64::new(0),
            unavailable: Mutex::new(unavailable),
        }
    }

    /// Why the store cannot take writes now, if it cannot.
    pub fn unavailable(&self) -> Option<String> {
        self.unavailable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_unavailable(&self, why: Option<String>) {
        *self
            .unavailable
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = why;
    }
}

/// The CRC-32 of every sealed segment's bytes as they were stored, by number: the
/// shipper ships a segment only while its file still has them (corruption on disk must
/// not reach the archive as if it were the readings).
#[derive(Debug, Default)]
pub struct SealedCrcs(Mutex<BTreeMap<u64, u32>>);

impl SealedCrcs {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u32>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stored CRC-32 of segment `number`, if it is sealed and not retired.
    pub fn get(&self, number: u64) -> Option<u32> {
        self.lock().get(&number).copied()
    }
}

/// The open store: the active segment and the lengths of every store file.
pub struct Store {
    options: StoreOptions,
    /// Shared so the committer can fsync it without holding the ledger lock.
    active: Arc<File>,
    /// Sealed segments whose last appends are not synced yet, and whether the directory
    /// holds a segment name not synced yet. Sealing happens inside `append`, under the
    /// ledger lock, so the fsync of a full segment (tens of milliseconds) is left to the
    /// committer (`take_sync`) instead of stalling every worker.
    unsynced: Vec<Arc<File>>,
    dir_unsynced: bool,
    active_name: String,
    active_number: u64,
    /// When the active segment got its first record (monotonic, and Unix ms for the
    /// day); `None` while it is empty.
    active_since: Option<(Instant, u64)>,
    /// Length of every `*.jsonl` file as of the last append.
    lengths: BTreeMap<String, u64>,
    /// CRC-32 of every file's bytes so far (what a checkpoint records of them).
    crcs: BTreeMap<String, crc32fast::Hasher>,
    retired_through: u64,
    /// Why the statistics are incomplete (readings are refused, no checkpoint is
    /// written, nothing is retired), if they are.
    incomplete: Option<String>,
    /// `archive.json` as checked at start-up, until the shipper takes it.
    archive: Option<ArchiveState>,
    store_id: String,
    sealed_crcs: Arc<SealedCrcs>,
    /// How far segments have come (sealed, shipped), for the stages after this one.
    watermarks: Arc<Watermarks>,
    metrics: Arc<StoreMetrics>,
    /// The data directory, opened and locked for as long as the store is open.
    _lock: File,
}

impl Store {
    fn crc32_of(&self, name: &str) -> u32 {
        self.crcs.get(name).map_or(0, |c| c.clone().finalize())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    /// The stored CRC-32s of the sealed segments, kept current as segments seal and
    /// retire.
    pub fn sealed_crcs(&self) -> Arc<SealedCrcs> {
        self.sealed_crcs.clone()
    }

    /// This store's id (`store-id`).
    pub fn id(&self) -> &str {
        &self.store_id
    }

    /// What S3 confirmed, as checked against the files at start-up; the shipper takes it.
    pub fn take_archive_state(&mut self) -> ArchiveState {
        self.archive
            .take()
            .unwrap_or_else(|| ArchiveState::new(&self.store_id))
    }

    /// Why readings must be refused, when the statistics are incomplete.
    pub fn incomplete(&self) -> Option<&str> {
        self.incomplete.as_deref()
    }

    pub fn metrics(&self) -> Arc<StoreMetrics> {
        self.metrics.clone()
    }

    /// How far segments have come: the shipper waits on it, retention is woken by it.
    pub(crate) fn watermarks(&self) -> Arc<Watermarks> {
        self.watermarks.clone()
    }

    /// Appends complete record lines (one `write`); they reach the disk at the next
    /// `SyncSet::run` of `take_sync`. Starts a new segment past the size limit; the old
    /// one joins the set to sync.
    ///
    /// A failed write is undone (the segment cut back to its length before it), so the
    /// file never holds part of a batch; `Err` then means nothing of `records` is
    /// stored. Past the size limit a new segment is started; if that fails, appending
    /// goes on in this one and the next append tries again.
    pub fn append(&mut self, records: &[u8], count: u64) -> io::Result<()> {
        let len = self.lengths.get(&self.active_name).copied().unwrap_or(0);
        if let Err(e) = (&*self.active).write_all(records) {
            self.active.set_len(len).map_err(|undo| {
                io::Error::other(format!(
                    "{e}, and cutting {} back to {len} bytes failed too: {undo}",
                    self.active_name
                ))
            })?;
            return Err(e);
        }
        if self.active_since.is_none() {
            self.active_since = Some((Instant::now(), unix_millis()));
        }
        let len = len + records.len() as u64;
        // The active segment's entries exist from its opening on: no key to allocate.
        if let Some(known) = self.lengths.get_mut(&self.active_name) {
            *known = len;
        }
        if let Some(crc) = self.crcs.get_mut(&self.active_name) {
            crc.update(records);
        }
        self.metrics.records.fetch_add(count, Relaxed);
        self.metrics.bytes.fetch_add(records.len() as u64, Relaxed);
        if len >= self.options.segment_bytes
            && let Err(e) = self.rotate()
        {
            warn!("store: cannot seal {} yet: {e}", self.active_name);
        }
        Ok(())
    }

    /// The statistics of exactly what the files hold (the checkpoint and the bytes
    /// after it): what the ledger must go back to after a write it counted failed.
    pub fn reload(&self) -> io::Result<Sensors> {
        // The files were checked at start-up and only this process writes them.
        load(&self.options.dir, &self.lengths, self.retired_through)
    }

    /// What must be synced to make every append so far durable (`with_active`) or, at
    /// least, every sealed segment (which the archive may then ship). Taken under the
    /// ledger lock, run outside it.
    pub fn take_sync(&mut self, with_active: bool) -> SyncSet {
        let mut files = std::mem::take(&mut self.unsynced);
        if with_active {
            files.push(self.active.clone());
        }
        SyncSet {
            files,
            dir: std::mem::take(&mut self.dir_unsynced).then(|| self.options.dir.clone()),
            sealed_through: self.active_number - 1,
            watermarks: self.watermarks.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// True when a sealed segment or the directory waits for its sync.
    pub fn sync_pending(&self) -> bool {
        !self.unsynced.is_empty() || self.dir_unsynced
    }

    /// Syncs every append so far, at once.
    #[cfg(test)]
    pub fn sync(&mut self) -> io::Result<()> {
        self.take_sync(true).run()
    }

    /// What a checkpoint of the store as it is now needs; written later, outside the
    /// ledger lock, by `Checkpoint::write`.
    /// `None` while the statistics are incomplete: a checkpoint of them would be
    /// believed at the next start.
    pub fn checkpoint(&self, sensors: Sensors) -> Option<Checkpoint> {
        self.incomplete
            .is_none()
            .then(|| self.checkpoint_of(&self.lengths, sensors, self.retired_through))
    }

    fn checkpoint_of(
        &self,
        lengths: &BTreeMap<String, u64>,
        sensors: Sensors,
        retired_through: u64,
    ) -> Checkpoint {
        Checkpoint::new(
            &self.store_id,
            self.covered(lengths),
            sensors,
            retired_through,
            self.options.dir.clone(),
            self.files_to_sync(),
        )
    }

    fn files_to_sync(&self) -> Vec<Arc<File>> {
        let mut files = self.unsynced.clone();
        files.push(self.active.clone());
        files
    }

    /// Seals the active segment if its first record is older than `max_age` or from an
    /// earlier UTC day (so each segment's records share the day its archive key names).
    pub fn seal_if_due(&mut self) -> io::Result<()> {
        match self.active_since {
            Some((since, first_ms))
                if since.elapsed() >= self.options.max_age
                    || utc_day(first_ms) != utc_day(unix_millis()) =>
            {
                self.rotate()
            }
            _ => Ok(()),
        }
    }

    /// How long until `seal_if_due` may have work; `None` while the segment is empty.
    pub fn seal_wait(&self) -> Option<Duration> {
        let (since, _) = self.active_since?;
        Some(self.options.max_age.saturating_sub(since.elapsed()))
    }

    /// Seals the active segment if it holds anything (a graceful stop).
    pub fn seal(&mut self) -> io::Result<()> {
        if self.active_since.is_some() {
            self.rotate()?;
        }
        Ok(())
    }

    /// Segments up to this number were retired (or were gone before this store's
    /// statistics began).
    pub fn retired_through(&self) -> u64 {
        self.retired_through
    }

    fn rotate(&mut self) -> io::Result<()> {
        let name = segment_name(self.active_number + 1);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.options.dir.join(&name))?;
        let number = self.active_number + 1;
        info!("store: sealed {}, starting {name}", self.active_name);
        let sealed_crc = self.crc32_of(&self.active_name);
        self.sealed_crcs
            .lock()
            .insert(self.active_number, sealed_crc);
        let sealed = std::mem::replace(&mut self.active, Arc::new(file));
        self.unsynced.push(sealed);
        self.dir_unsynced = true;
        self.active_since = None;
        self.lengths.insert(name.clone(), 0);
        self.crcs.insert(name.clone(), crc32fast::Hasher::new());
        self.active_name = name;
        self.active_number = number;
        self.publish_sizes();
        Ok(())
    }

    /// What a checkpoint records of files with these lengths: length and CRC-32.
    fn covered(&self, lengths: &BTreeMap<String, u64>) -> BTreeMap<String, Covered> {
        lengths
            .iter()
            .map(|(name, &len)| {
                let crc32 = self.crcs.get(name).map_or(0, |c| c.clone().finalize());
                (name.clone(), Covered::Checked { len, crc32 })
            })
            .collect()
    }

    fn publish_sizes(&self) {
        self.metrics
            .bytes
            .store(self.lengths.values().sum(), Relaxed);
        self.metrics
            .segments
            .store(self.lengths.len() as u64, Relaxed);
    }
}

/// Replays `path`'s first `len` bytes into `sensors`, logging what is not a record.
fn replay_logged(
    path: &Path,
    len: u64,
    sensors: &mut Sensors,
    crc: &mut crc32fast::Hasher,
) -> io::Result<()> {
    replay(path, 0, len, sensors, crc, &mut |problem| {
        warn!("store: {problem}, skipped")
    })
}

/// Now as Unix milliseconds (a clock before 1970 reads as 0).
pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn utc_day(unix_ms: u64) -> u64 {
    unix_ms / 86_400_000
}

/// fsyncs `file`'s data, recording how long it took.
fn sync_timed(file: &File, metrics: &StoreMetrics) -> io::Result<()> {
    let started = Instant::now();
    file.sync_data()?;
    metrics
        .fsync_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}

/// Syncs taken from the store under the ledger lock (`Store::take_sync`) and run
/// outside it.
#[must_use = "nothing is durable until the set is run"]
pub struct SyncSet {
    files: Vec<Arc<File>>,
    dir: Option<PathBuf>,
    sealed_through: u64,
    watermarks: Arc<Watermarks>,
    metrics: Arc<StoreMetrics>,
}

impl SyncSet {
    /// Syncs the files, then the directory (new segment names); only then are the sealed
    /// segments published to the archive (the `sealed` watermark).
    pub fn run(self) -> io::Result<()> {
        for file in &self.files {
            sync_timed(file, &self.metrics)?;
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        self.watermarks.seal_through(self.sealed_through);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::server::store::files::{CHECKPOINT, CHECKPOINT_PREV, delete_retired};
    use crate::server::store::recovery::store_files;
    use crate::server::store::stats::SensorStats;
    use crate::wire::reading::Reading;
    use crate::wire::record::{RecvStamp, encode_record};
    use std::borrow::Cow;

    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sensorhub-store-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn options(dir: &Path) -> StoreOptions {
        StoreOptions {
            dir: dir.to_owned(),
            segment_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
        }
    }

    fn reading(sensor: &str, value: f64, seq: u64) -> Reading<'static> {
        Reading {
            sensor: Cow::Owned(sensor.into()),
            kind: Cow::Borrowed("temperature"),
            value,
            value_text: Cow::Owned(format!("{value:?}")),
            seq,
            ts: Some(seq * 10),
        }
    }

    fn append(store: &mut Store, readings: &[Reading]) {
        let mut buf = Vec::new();
        for r in readings {
            encode_record(&mut buf, r, &RecvStamp::new(1_700_000_000_000));
        }
        store.append(&buf, readings.len() as u64).unwrap();
        store.sync().unwrap();
    }

    #[test]
    fn statistics_survive_a_restart() {
        let dir = temp_dir("restart");
        {
            let (mut store, sensors) = Store::open(options(&dir)).unwrap();
            assert!(sensors.is_empty());
            append(&mut store, &[reading("a", 1.0, 1), reading("a", 3.0, 2)]);
        }
        let (_store, sensors) = Store::open(options(&dir)).unwrap();
        let a = &sensors["a"];
        assert_eq!((a.count, a.min, a.max, a.last_seq), (2, 1.0, 3.0, 2));
        assert_eq!(a.last_ts, Some(20));
    }

    #[test]
    fn a_torn_last_line_is_cut_and_a_corrupt_line_is_kept_but_skipped() {
        let dir = temp_dir("torn");
        let seg = dir.join(segment_name(1));
        let good = "{\"sensor\":\"a\",\"kind\":\"k\",\"value\":1,\"seq\":1,\"recv\":5}\n";
        let corrupt = "this is not a record\n";
        let torn = "{\"sensor\":\"a\",\"kind\":\"k\",\"val";
        fs::write(&seg, format!("{good}{corrupt}{good}{torn}")).unwrap();
        let (_store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(sensors["a"].count, 2);
        assert_eq!(
            fs::read_to_string(&seg).unwrap(),
            format!("{good}{corrupt}{good}"),
            "the torn tail is cut, the corrupt complete line stays"
        );
    }

    #[test]
    fn other_jsonl_files_are_part_of_the_store_and_left_alone() {
        let dir = temp_dir("other");
        let text = "{\"sensor\":\"b\",\"kind\":\"humidity\",\"value\":40,\"seq\":7,\"recv\":1}\n";
        fs::write(dir.join("imported.jsonl"), text).unwrap();
        let (mut store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(sensors["b"].last_seq, 7);
        append(&mut store, &[reading("a", 1.0, 1)]);
        assert_eq!(
            fs::read_to_string(dir.join("imported.jsonl")).unwrap(),
            text
        );
    }

    #[test]
    fn start_up_replays_only_what_follows_the_checkpoint() {
        let dir = temp_dir("checkpoint");
        {
            let (mut store, mut sensors) = Store::open(options(&dir)).unwrap();
            append(&mut store, &[reading("a", 1.0, 1), reading("a", 2.0, 2)]);
            // The checkpoint claims a count the records alone would not give: if start-up
            // replayed the covered bytes, the count would differ.
            sensors.insert("a".into(), SensorStats::first("temperature", 2.0, 2, None));
            sensors.get_mut("a").unwrap().count = 100;
            store.checkpoint(sensors).unwrap().write().unwrap();
            append(&mut store, &[reading("a", 5.0, 3)]);
        }
        let (_store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(sensors["a"].count, 101);
        assert_eq!(sensors["a"].last_seq, 3);
    }

    #[test]
    fn a_checkpoint_covering_missing_bytes_is_ignored() {
        let dir = temp_dir("stale");
        {
            let (mut store, _) = Store::open(options(&dir)).unwrap();
            append(&mut store, &[reading("a", 1.0, 1), reading("a", 2.0, 2)]);
            let mut sensors = Sensors::default();
            let mut s = SensorStats::first("temperature", 2.0, 2, None);
            s.count = 100;
            sensors.insert("a".into(), s);
            store.checkpoint(sensors).unwrap().write().unwrap();
        }
        // The file loses its last line (say, restored from an older backup).
        let seg = dir.join(segment_name(1));
        let text = fs::read_to_string(&seg).unwrap();
        let first_line_end = text.find('\n').unwrap() + 1;
        fs::write(&seg, &text[..first_line_end]).unwrap();
        let (_store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(
            sensors["a"].count, 1,
            "full replay, not the stale checkpoint"
        );
    }

    #[test]
    fn segments_rotate_at_the_size_limit() {
        let dir = temp_dir("rotate");
        let mut opts = options(&dir);
        opts.segment_bytes = 200;
        let (mut store, _) = Store::open(opts.clone()).unwrap();
        for seq in 1..=10 {
            append(&mut store, &[reading("a", 1.0, seq)]);
        }
        let files = store_files(&dir).unwrap();
        assert!(files.len() >= 3, "{files:?}");
        drop(store);
        let (_store, sensors) = Store::open(opts).unwrap();
        assert_eq!(sensors["a"].count, 10);
    }

    #[test]
    fn a_non_empty_segment_is_sealed_at_start_up_and_an_empty_one_reused() {
        let dir = temp_dir("seal-start");
        {
            let (mut store, _) = Store::open(options(&dir)).unwrap();
            assert_eq!(store.watermarks().get().sealed, 0);
            append(&mut store, &[reading("a", 1.0, 1)]);
        }
        let (store, _) = Store::open(options(&dir)).unwrap();
        assert_eq!(store.active_name, segment_name(2));
        assert_eq!(store.watermarks().get().sealed, 1);
        drop(store);
        let (store, _) = Store::open(options(&dir)).unwrap();
        assert_eq!(store.active_name, segment_name(2), "empty: reused");
    }

    #[test]
    fn segments_seal_by_age_and_on_a_graceful_stop_but_never_empty() {
        let dir = temp_dir("seal-age");
        let mut opts = options(&dir);
        opts.max_age = Duration::ZERO;
        let (mut store, _) = Store::open(opts).unwrap();
        store.seal_if_due().unwrap();
        store.seal().unwrap();
        assert_eq!(store.active_number, 1, "nothing to seal while empty");
        assert_eq!(store.seal_wait(), None);
        append(&mut store, &[reading("a", 1.0, 1)]);
        assert_eq!(store.seal_wait(), Some(Duration::ZERO));
        store.seal_if_due().unwrap();
        assert_eq!(store.active_number, 2);
        append(&mut store, &[reading("a", 1.0, 2)]);
        store.seal().unwrap();
        assert_eq!(
            store.watermarks().get().sealed,
            1,
            "the archive sees a sealed segment only once it is synced"
        );
        assert!(store.sync_pending());
        store.take_sync(false).run().unwrap();
        assert!(!store.sync_pending());
        assert_eq!(store.watermarks().get().sealed, 2);
        assert_eq!(store_files(&dir).unwrap().len(), 3);
    }

    /// One reading of sensor `a` per seq, each sealed in a segment of its own (the
    /// store's `max_age` is zero).
    fn seal_one_reading_each(store: &mut Store, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            append(store, &[reading("a", 1.0, seq)]);
            store.seal_if_due().unwrap();
        }
    }

    /// archive.json recording segments 1..=`through` as S3 holds them now.
    fn shipped(store: &Store, through: u64) -> ArchiveState {
        let mut state = ArchiveState::new(store.id());
        for n in 1..=through {
            let name = segment_name(n);
            if let Some(&bytes) = store.lengths.get(&name) {
                let crc32 = store.crc32_of(&name);
                let (sha256, key) = (String::new(), String::new());
                let segment = ShippedSegment {
                    bytes,
                    crc32,
                    sha256,
                    key,
                };
                state.segments.insert(n, segment);
            }
        }
        state.shipped_through = through;
        state.save(store.dir()).unwrap();
        state
    }

    #[test]
    fn retention_deletes_only_shipped_segments_and_restart_keeps_their_statistics() {
        let dir = temp_dir("retire");
        let mut opts = options(&dir);
        opts.max_age = Duration::ZERO;
        let (mut store, mut sensors) = Store::open(opts.clone()).unwrap();
        for seq in 1..=4 {
            append(&mut store, &[reading("a", seq as f64, seq)]);
            let mut s = sensors.remove("a");
            match &mut s {
                Some(s) => s.add(seq as f64, seq, None),
                None => s = Some(SensorStats::first("temperature", 1.0, 1, None)),
            }
            sensors.insert("a".into(), s.unwrap());
            store.seal_if_due().unwrap();
        }
        // Segments 1..=4 are sealed; 1 and 2 are shipped (archive.json says so, as the
        // shipper writes it); keep nothing shipped.
        let archive = shipped(&store, 2);
        let victims = store
            .retire(&|n, b, c| archive.confirms(n, b, c), 0, &sensors)
            .unwrap();
        assert_eq!(
            victims,
            vec![dir.join(segment_name(1)), dir.join(segment_name(2))]
        );
        // A crash here leaves the victims on disk: start-up must not count them again.
        drop(store);
        let (store, restored) = Store::open(opts.clone()).unwrap();
        assert_eq!(restored["a"].count, 4);
        assert_eq!(restored["a"].last_seq, 4);
        assert!(!dir.join(segment_name(1)).exists(), "retention finished");
        assert!(dir.join(segment_name(3)).exists(), "unshipped: kept");
        assert_eq!(store.active_number, 5);
        drop(store);
        // Everything shipped and deleted: numbering still goes on.
        let (mut store, restored) = Store::open(opts.clone()).unwrap();
        let archive = shipped(&store, 4);
        let confirmed = |n, b, c| archive.confirms(n, b, c);
        let victims = store.retire(&confirmed, 0, &restored).unwrap();
        delete_retired(&victims).unwrap();
        drop(store);
        let (mut store, restored) = Store::open(opts).unwrap();
        assert_eq!(restored["a"].count, 4);
        assert_eq!(store.active_number, 5);
        assert!(store.retire(&confirmed, 0, &restored).unwrap().is_empty());
    }

    #[test]
    fn a_retirement_archive_json_does_not_confirm_deletes_nothing() {
        let dir = temp_dir("retire-unconfirmed");
        let mut opts = options(&dir);
        opts.max_age = Duration::ZERO;
        let (mut store, sensors) = Store::open(opts.clone()).unwrap();
        append(&mut store, &[reading("a", 1.0, 1)]);
        store.seal_if_due().unwrap();
        append(&mut store, &[reading("a", 1.0, 2)]);
        // A checkpoint that claims segment 1 retired (say, a corrupt one), while no
        // archive.json confirms it was ever shipped.
        let mut checkpoint = store.checkpoint(sensors).unwrap();
        checkpoint.retired_through = 1;
        checkpoint.write().unwrap();
        drop(store);
        let (_store, sensors) = Store::open(opts).unwrap();
        assert!(dir.join(segment_name(1)).exists(), "nothing deleted");
        assert_eq!(sensors["a"].count, 2, "both segments replayed");
    }

    #[test]
    fn retention_keeps_the_newest_shipped_segments_within_the_budget() {
        let dir = temp_dir("retire-budget");
        let mut opts = options(&dir);
        opts.max_age = Duration::ZERO;
        let (mut store, _) = Store::open(opts).unwrap();
        seal_one_reading_each(&mut store, 1..=3);
        let one = store.lengths[&segment_name(1)];
        let archive = shipped(&store, 3);
        let confirmed = |n, b, c| archive.confirms(n, b, c);
        let victims = store
            .retire(&confirmed, 2 * one, &Sensors::default())
            .unwrap();
        assert_eq!(victims, vec![dir.join(segment_name(1))]);
    }

    #[test]
    fn retention_stops_at_a_segment_whose_file_is_not_what_s3_confirmed() {
        let dir = temp_dir("retire-mismatch");
        let mut opts = options(&dir);
        opts.max_age = Duration::ZERO;
        let (mut store, _) = Store::open(opts).unwrap();
        seal_one_reading_each(&mut store, 1..=3);
        let mut archive = shipped(&store, 3);
        // S3 holds other bytes as segment 2 (say, archive.json from another copy).
        archive.segments.get_mut(&2).unwrap().crc32 ^= 1;
        let confirmed = |n, b, c| archive.confirms(n, b, c);
        let victims = store.retire(&confirmed, 0, &Sensors::default()).unwrap();
        assert_eq!(
            victims,
            vec![dir.join(segment_name(1))],
            "not 2, nor 3 after it"
        );
    }

    /// Retention with keep 0 over four sealed segments, then a restart: the setting of
    /// the damaged-checkpoint tests. Returns the directory.
    fn retired_store(name: &str) -> PathBuf {
        let dir = temp_dir(name);
        let mut opts = options(&dir);
        opts.max_age = Duration::ZERO;
        let (mut store, _) = Store::open(opts.clone()).unwrap();
        seal_one_reading_each(&mut store, 1..=4);
        drop(store);
        // A restart first, so that checkpoint.prev.json exists when retention writes.
        let (mut store, sensors) = Store::open(opts.clone()).unwrap();
        store.checkpoint(sensors.clone()).unwrap().write().unwrap();
        let archive = shipped(&store, 2);
        let victims = store
            .retire(&|n, b, c| archive.confirms(n, b, c), 0, &sensors)
            .unwrap();
        delete_retired(&victims).unwrap();
        append(&mut store, &[reading("a", 1.0, 5)]);
        store
            .checkpoint(store_sensors(&store))
            .unwrap()
            .write()
            .unwrap();
        dir
    }

    fn store_sensors(store: &Store) -> Sensors {
        store.reload().unwrap()
    }

    fn flip_a_bit(path: &Path) {
        let mut bytes = fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x04;
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_damaged_checkpoint_gives_way_to_the_previous_one() {
        let dir = retired_store("damaged-one");
        flip_a_bit(&dir.join(CHECKPOINT));
        let (store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(store.incomplete(), None);
        assert_eq!(sensors["a"].count, 5, "retired readings still counted");
        assert_eq!(sensors["a"].last_seq, 5, "seqs 1..=5 stay duplicates");
    }

    #[test]
    fn with_both_checkpoints_damaged_after_retention_readings_are_refused() {
        let dir = retired_store("damaged-both");
        flip_a_bit(&dir.join(CHECKPOINT));
        flip_a_bit(&dir.join(CHECKPOINT_PREV));
        let (store, _) = Store::open(options(&dir)).unwrap();
        let why = store.incomplete().expect("incomplete").to_owned();
        assert!(why.contains("segments up to 2 are gone"), "{why}");
        assert_eq!(store.metrics().unavailable(), Some(why));
        assert!(
            store.checkpoint(Sensors::default()).is_none(),
            "no checkpoint of it"
        );
        let mut report = Vec::new();
        let problems = crate::server::store::verify::verify(&dir, &mut report)
            .unwrap()
            .problems;
        let report = String::from_utf8(report).unwrap();
        assert!(problems >= 3, "{report}");
        assert!(report.contains("would refuse readings"), "{report}");
    }

    #[test]
    fn a_checkpoint_whose_body_was_edited_is_not_believed() {
        let dir = retired_store("edited");
        let path = dir.join(CHECKPOINT);
        let text = fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"count\":5", "\"count\":1500", 1);
        assert_ne!(text, edited);
        fs::write(&path, edited).unwrap();
        let (_store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(
            sensors["a"].count, 5,
            "the previous checkpoint, plus replay"
        );
    }

    #[test]
    fn a_segment_missing_from_the_middle_makes_the_store_refuse_readings() {
        let dir = temp_dir("gap");
        let mut opts = options(&dir);
        opts.max_age = Duration::ZERO;
        let (mut store, sensors) = Store::open(opts.clone()).unwrap();
        seal_one_reading_each(&mut store, 1..=3);
        store.checkpoint(sensors).unwrap().write().unwrap();
        drop(store);
        fs::remove_file(dir.join(segment_name(2))).unwrap();
        let (store, _) = Store::open(opts).unwrap();
        let why = store.incomplete().expect("incomplete");
        assert!(why.contains("segments 2 are gone"), "{why}");
    }

    #[test]
    fn covered_bytes_that_changed_are_found_after_start_up_and_never_shipped() {
        let dir = temp_dir("crc");
        {
            let (mut store, mut sensors) = Store::open(options(&dir)).unwrap();
            append(&mut store, &[reading("a", 1.0, 1), reading("a", 2.0, 2)]);
            // A checkpoint claiming more than the records give: start-up uses it
            // without reading the bytes it covers.
            let mut s = SensorStats::first("temperature", 2.0, 2, None);
            s.count = 100;
            sensors.insert("a".into(), s);
            store.checkpoint(sensors).unwrap().write().unwrap();
        }
        let (store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(sensors["a"].count, 100, "intact: the checkpoint is used");
        let stored_crc = store
            .sealed_crcs()
            .get(1)
            .expect("segment 1 sealed at start-up");
        drop(store);
        // Garbage over the first record, same length: the lengths alone still match.
        let seg = dir.join(segment_name(1));
        let mut bytes = fs::read(&seg).unwrap();
        bytes[..10].copy_from_slice(b"##########");
        fs::write(&seg, &bytes).unwrap();
        let (store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(
            sensors["a"].count, 100,
            "the statistics keep what was acknowledged"
        );
        assert_eq!(
            store.sealed_crcs().get(1),
            Some(stored_crc),
            "the shipper compares with it"
        );
        assert_ne!(crc32fast::hash(&bytes), stored_crc);
        let started = Instant::now();
        while store.metrics().corrupt_files.load(Relaxed) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the background check"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut report = Vec::new();
        let problems = crate::server::store::verify::verify(&dir, &mut report)
            .unwrap()
            .problems;
        let report = String::from_utf8(report).unwrap();
        assert_eq!(problems, 2, "{report}");
        assert!(
            report.contains("segment-0000000001.jsonl byte 0: not a valid record"),
            "{report}"
        );
        assert!(
            report.contains("checkpoint.json: it does not match segment-0000000001.jsonl"),
            "{report}"
        );
    }

    #[test]
    fn verify_reports_torn_lines_and_passes_a_clean_store() {
        let dir = temp_dir("verify");
        {
            let (mut store, _) = Store::open(options(&dir)).unwrap();
            append(&mut store, &[reading("a", 1.0, 1)]);
        }
        let mut out = Vec::new();
        assert_eq!(
            crate::server::store::verify::verify(&dir, &mut out)
                .unwrap()
                .problems,
            0
        );
        let seg = dir.join(segment_name(1));
        let len = fs::metadata(&seg).unwrap().len();
        let mut file = OpenOptions::new().append(true).open(&seg).unwrap();
        file.write_all(b"{\"sensor\":\"a\",\"ki").unwrap();
        let mut out = Vec::new();
        assert_eq!(
            crate::server::store::verify::verify(&dir, &mut out)
                .unwrap()
                .problems,
            1
        );
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(&format!(
                "byte {len}: torn last line (17 bytes without a newline)"
            )),
            "{out}"
        );
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            len + 17,
            "verify changes nothing"
        );
    }

    #[test]
    fn a_checkpoint_without_checksums_is_read_and_replaced() {
        let dir = temp_dir("v1");
        {
            let (mut store, _) = Store::open(options(&dir)).unwrap();
            append(&mut store, &[reading("a", 1.0, 1), reading("a", 2.0, 2)]);
        }
        let len = fs::metadata(dir.join(segment_name(1))).unwrap().len();
        let v1 = format!(
            "{{\"version\":1,\"files\":{{\"{}\":{len}}},\"sensors\":{{}}}}",
            segment_name(1)
        );
        fs::write(dir.join(CHECKPOINT), v1).unwrap();
        let (_store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(sensors["a"].count, 2, "no checksums: everything replayed");
    }

    #[test]
    fn a_second_server_cannot_open_the_same_directory() {
        let dir = temp_dir("lock");
        let (_store, _) = Store::open(options(&dir)).unwrap();
        let err = Store::open(options(&dir))
            .err()
            .expect("second open must fail");
        assert!(err.to_string().contains("in use"), "{err}");
        // An old-style LOCK file, deleted or not, changes nothing: the directory is locked.
        let _ = fs::remove_file(dir.join("LOCK"));
        assert!(Store::open(options(&dir)).is_err(), "still locked");
    }
}
