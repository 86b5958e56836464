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
//!   ships (`archive.rs`). Any other `*.jsonl` file directly in the directory is read
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

use crate::server::files::{Checkpoint, Covered, segment_name, segment_number, sync_dir};
use crate::server::metrics::{Histogram, LATENCY_BUCKETS};
use crate::server::recovery::{Recovered, load, probe_writable, recover};
use log::{info, warn};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use crate::server::stats::Sensors;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub dir: PathBuf,
    /// Start a new segment once the active one reaches this size.
    pub segment_bytes: u64,
    /// Seal a non-empty active segment once its first record is this old.
    pub max_age: Duration,
}

/// What `/metrics` and the archive shipper see of the store; written by whoever holds
/// the ledger lock (workers appending, the committer sealing and retiring), except
/// `sealed_through` and `fsync_seconds`, which the syncs update after the lock is
/// released (`SyncSet::run`); read without the lock.
#[derive(Debug)]
pub struct StoreMetrics {
    pub bytes: AtomicU64,
    pub segments: AtomicU64,
    pub records: AtomicU64,
    pub fsync_seconds: Histogram,
    /// Every segment numbered up to this one is sealed and synced (never written again):
    /// what the archive may ship.
    pub sealed_through: AtomicU64,
    /// Segments deleted by retention since start.
    pub retired_segments: AtomicU64,
    /// Appends that failed (disk full, I/O error); each was undone and is retried.
    pub write_failures: AtomicU64,
    /// Why the store cannot take writes now (`/healthz` says it); `None` while it can.
    pub unavailable: Mutex<Option<String>>,
}

impl StoreMetrics {
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
    metrics: Arc<StoreMetrics>,
    /// The data directory, opened and locked for as long as the store is open.
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the store in `options.dir` and rebuilds every sensor's
    /// statistics from it.
    pub fn open(options: StoreOptions) -> io::Result<(Store, Sensors)> {
        let lock = lock_dir(&options.dir)?;
        probe_writable(&options.dir)?;
        let started = Instant::now();
        let recovered = recover(&options.dir)?;
        info!(
            "store {}: {} files, {} sensors, replayed {} bytes in {:.3}s",
            options.dir.display(),
            recovered.lengths.len(),
            recovered.sensors.len(),
            recovered.replayed,
            started.elapsed().as_secs_f64()
        );
        let Recovered {
            mut lengths,
            mut crcs,
            sensors,
            retired_through,
            ..
        } = recovered;
        let (active, active_name, active_number) =
            open_active(&options.dir, &lengths, retired_through)?;
        let active_len = active.metadata()?.len();
        lengths.insert(active_name.clone(), active_len);
        crcs.entry(active_name.clone()).or_default();
        let metrics = Arc::new(StoreMetrics {
            bytes: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            records: AtomicU64::new(0),
            fsync_seconds: Histogram::new(LATENCY_BUCKETS),
            sealed_through: AtomicU64::new(active_number - 1),
            retired_segments: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            unavailable: Mutex::new(None),
        });
        let store = Store {
            options,
            active: Arc::new(active),
            unsynced: Vec::new(),
            dir_unsynced: false,
            active_name,
            active_number,
            active_since: (active_len > 0).then(|| (Instant::now(), unix_millis())),
            lengths,
            crcs,
            retired_through,
            metrics,
            _lock: lock,
        };
        store.publish_sizes();
        Ok((store, sensors))
    }

    pub fn metrics(&self) -> Arc<StoreMetrics> {
        self.metrics.clone()
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
        let (sensors, _, _) = load(
            &self.options.dir,
            &self.lengths,
            self.retired_through,
            false,
        )?;
        Ok(sensors)
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
    pub fn checkpoint(&self, sensors: Sensors) -> Checkpoint {
        Checkpoint::new(
            self.covered(&self.lengths),
            sensors,
            self.retired_through,
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

    /// Retires the oldest sealed segments numbered up to `shipped_through` while the
    /// shipped segments on disk exceed `keep_bytes`: writes a checkpoint that records
    /// them as retired (with `sensors`, the statistics that include them), and only
    /// then forgets them. Returns the files to delete (`delete_retired`), which a crash
    /// may leave behind without harm. If the checkpoint cannot be written nothing
    /// changes and the next call tries again.
    pub fn retire(
        &mut self,
        shipped_through: u64,
        keep_bytes: u64,
        sensors: &Sensors,
    ) -> io::Result<Vec<PathBuf>> {
        let shipped: Vec<(u64, String, u64)> = self
            .lengths
            .iter()
            .filter_map(|(name, &len)| {
                let number = segment_number(name)?;
                (number <= shipped_through && number < self.active_number)
                    .then(|| (number, name.clone(), len))
            })
            .collect();
        let mut on_disk: u64 = shipped.iter().map(|(_, _, len)| len).sum();
        let mut kept = self.lengths.clone();
        let mut retired_through = self.retired_through;
        let mut victims = Vec::new();
        for (number, name, len) in shipped {
            if on_disk <= keep_bytes {
                break;
            }
            on_disk -= len;
            kept.remove(&name);
            retired_through = retired_through.max(number);
            victims.push(self.options.dir.join(name));
        }
        if victims.is_empty() {
            return Ok(victims);
        }
        Checkpoint::new(
            self.covered(&kept),
            sensors.clone(),
            retired_through,
            self.options.dir.clone(),
            self.files_to_sync(),
        )
        .write()?;
        self.crcs.retain(|name, _| kept.contains_key(name));
        self.lengths = kept;
        self.retired_through = retired_through;
        self.metrics
            .retired_segments
            .fetch_add(victims.len() as u64, Relaxed);
        self.publish_sizes();
        Ok(victims)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let name = segment_name(self.active_number + 1);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.options.dir.join(&name))?;
        let number = self.active_number + 1;
        info!("store: sealed {}, starting {name}", self.active_name);
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

/// Now as Unix milliseconds (a clock before 1970 reads as 0).
pub fn unix_millis() -> u64 {
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
    metrics: Arc<StoreMetrics>,
}

impl SyncSet {
    /// Syncs the files, then the directory (new segment names); only then are the sealed
    /// segments published to the archive (`sealed_through`).
    pub fn run(self) -> io::Result<()> {
        for file in &self.files {
            sync_timed(file, &self.metrics)?;
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        self.metrics
            .sealed_through
            .fetch_max(self.sealed_through, Relaxed);
        Ok(())
    }
}

/// Creates the data directory if needed and locks it for this process (a second server
/// on the same directory would interleave records), returning the lock's handle.
fn lock_dir(dir: &Path) -> io::Result<File> {
    if dir.exists() && !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!(
                "{} is not a directory (the store is a directory of segment files)",
                dir.display()
            ),
        ));
    }
    fs::create_dir_all(dir)?;
    let lock = File::open(dir)?;
    lock.try_lock().map_err(|_| {
        io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "data directory {} is in use by another sensor-server",
                dir.display()
            ),
        )
    })?;
    Ok(lock)
}

/// Opens the segment to append to at start-up: a new one after the last, which a crash
/// left final (so it is sealed, synced first); the last itself when it is empty, or when
/// a full disk refuses a new file. Numbers never restart, even when retention deleted
/// every segment: the archive knows segments by number.
fn open_active(
    dir: &Path,
    lengths: &BTreeMap<String, u64>,
    retired_through: u64,
) -> io::Result<(File, String, u64)> {
    let last = lengths
        .iter()
        .filter_map(|(name, &len)| Some((segment_number(name)?, len)))
        .max();
    let first_choice = match last {
        Some((number, 0)) => number,
        Some((number, _)) => {
            // Sealed from now on: what it holds must be on disk before it ships.
            File::open(dir.join(segment_name(number)))?.sync_all()?;
            number + 1
        }
        None => 1,
    }
    .max(retired_through + 1);
    match (open_segment(dir, first_choice), last) {
        // A full disk may refuse a new file: go on appending to the last segment (it
        // was not sealed yet) rather than refuse to start.
        (Err(e), Some((number, _))) if number > retired_through => {
            warn!(
                "store: cannot start {} ({e}); appending to {} instead",
                segment_name(first_choice),
                segment_name(number)
            );
            open_segment(dir, number)
        }
        (result, _) => result,
    }
}

fn open_segment(dir: &Path, number: u64) -> io::Result<(File, String, u64)> {
    let name = segment_name(number);
    let path = dir.join(&name);
    let existed = path.exists();
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    if !existed {
        // The new name must survive a crash as well as the data written into it.
        sync_dir(dir)?;
    }
    Ok((file, name, number))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::files::{CHECKPOINT, delete_retired};
    use crate::server::recovery::store_files;
    use crate::server::stats::SensorStats;
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
    fn records_have_exactly_the_stored_fields() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &reading("a", 21.5, 3), &RecvStamp::new(99));
        let mut no_ts = reading("a", -1e-7, 4);
        no_ts.value_text = Cow::Borrowed("-1e-7");
        no_ts.ts = None;
        encode_record(&mut buf, &no_ts, &RecvStamp::new(100));
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"sensor\":\"a\",\"kind\":\"temperature\",\"value\":21.5,\"seq\":3,\"ts\":30,\"recv\":99}\n\
             {\"sensor\":\"a\",\"kind\":\"temperature\",\"value\":-1e-7,\"seq\":4,\"recv\":100}\n"
        );
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
            store.checkpoint(sensors).write().unwrap();
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
            store.checkpoint(sensors).write().unwrap();
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
            assert_eq!(store.metrics().sealed_through.load(Relaxed), 0);
            append(&mut store, &[reading("a", 1.0, 1)]);
        }
        let (store, _) = Store::open(options(&dir)).unwrap();
        assert_eq!(store.active_name, segment_name(2));
        assert_eq!(store.metrics().sealed_through.load(Relaxed), 1);
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
            store.metrics().sealed_through.load(Relaxed),
            1,
            "the archive sees a sealed segment only once it is synced"
        );
        assert!(store.sync_pending());
        store.take_sync(false).run().unwrap();
        assert!(!store.sync_pending());
        assert_eq!(store.metrics().sealed_through.load(Relaxed), 2);
        assert_eq!(store_files(&dir).unwrap().len(), 3);
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
        let shipped = |n: u64| {
            let state = format!("{{\"version\":1,\"shipped_through\":{n}}}");
            fs::write(dir.join("archive.json"), state).unwrap();
        };
        shipped(2);
        let victims = store.retire(2, 0, &sensors).unwrap();
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
        shipped(4);
        let victims = store.retire(4, 0, &restored).unwrap();
        delete_retired(&victims).unwrap();
        drop(store);
        let (mut store, restored) = Store::open(opts).unwrap();
        assert_eq!(restored["a"].count, 4);
        assert_eq!(store.active_number, 5);
        assert!(store.retire(4, 0, &restored).unwrap().is_empty());
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
        let mut checkpoint = store.checkpoint(sensors);
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
        for seq in 1..=3 {
            append(&mut store, &[reading("a", 1.0, seq)]);
            store.seal_if_due().unwrap();
        }
        let one = store.lengths[&segment_name(1)];
        let victims = store.retire(3, 2 * one, &Sensors::default()).unwrap();
        assert_eq!(victims, vec![dir.join(segment_name(1))]);
    }

    #[test]
    fn covered_bytes_that_changed_make_start_up_replay_everything() {
        let dir = temp_dir("crc");
        {
            let (mut store, mut sensors) = Store::open(options(&dir)).unwrap();
            append(&mut store, &[reading("a", 1.0, 1), reading("a", 2.0, 2)]);
            // A checkpoint claiming more than the records give: used only while the
            // bytes it covers are intact.
            let mut s = SensorStats::first("temperature", 2.0, 2, None);
            s.count = 100;
            sensors.insert("a".into(), s);
            store.checkpoint(sensors).write().unwrap();
        }
        let (_store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(sensors["a"].count, 100, "intact: the checkpoint is used");
        drop(_store);
        // Garbage over the first record, same length: the lengths alone still match.
        let seg = dir.join(segment_name(1));
        let mut bytes = fs::read(&seg).unwrap();
        bytes[..10].copy_from_slice(b"##########");
        fs::write(&seg, &bytes).unwrap();
        let (_store, sensors) = Store::open(options(&dir)).unwrap();
        assert_eq!(
            sensors["a"].count, 1,
            "full replay: only the intact record counts"
        );
        let mut report = Vec::new();
        let problems = crate::server::recovery::verify(&dir, &mut report)
            .unwrap()
            .problems;
        let report = String::from_utf8(report).unwrap();
        assert_eq!(problems, 2, "{report}");
        assert!(
            report.contains("segment-0000000001.jsonl byte 0: not a valid record"),
            "{report}"
        );
        assert!(
            report.contains("checkpoint.json does not match segment-0000000001.jsonl"),
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
            crate::server::recovery::verify(&dir, &mut out)
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
            crate::server::recovery::verify(&dir, &mut out)
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
