//! The archive: every sealed store segment shipped to S3, exactly once, in order.
//!
//! One shipper thread per server. It takes the oldest sealed segment not yet confirmed,
//! gzips its exact bytes (deterministically: the same segment always gives the same
//! object), and uploads it as
//! `PREFIX/readings/dt=YYYY-MM-DD/host=HOST/segment-NNNNNNNNNN-STOREID.jsonl.gz`. `dt`
//! is the UTC day of the segment's first record (the store seals at midnight, so that
//! is the day of every record in it); the store id in the name keeps two stores that
//! ship under one host id from writing the same key.
//!
//! An upload counts only once S3 confirms those bytes: the put carries their SHA-256
//! (S3 refuses a body that does not match) and `If-None-Match: *` (S3 never replaces an
//! object), and then `head-object --checksum-mode ENABLED` must show the object with
//! exactly that length and SHA-256. Only then is the segment recorded in `archive.json`
//! (`Confirmed`), and only a recorded segment whose file still has the recorded length
//! and CRC-32 may be deleted by retention (`store/committer.rs`). A segment whose file is
//! missing is never passed over: it is retried (and reported) until it is back. A crash
//! between S3's confirmation and the record makes the next start upload the same bytes
//! to the same key again: S3 refuses to replace it, and the check finds it whole.
//!
//! The S3 client is the AWS CLI (`aws s3api`), which Amazon Linux ships and nixpkgs
//! packages: it brings the whole credential chain (environment, profiles, the instance
//! profile through IMDSv2), SigV4, retries and endpoint overrides, with no async runtime
//! or TLS stack in this binary (the official Rust SDK would add both, and a C toolchain
//! for the static aarch64 build). It is not trusted: see `aws_cli.rs`.

use crate::server::archive::aws_cli::{self, Alarm, CliOutput};
use crate::server::archive::bucket::{ArchiveConfig, Bucket, cli_command, object_key};
use crate::server::archive::confirmed::Confirmed;
use crate::server::archive::error::ArchiveError;
use crate::server::store::files::{ARCHIVE_STATE, ShippedSegment, segment_name, sha256_hex};
use crate::server::store::segments::{SealedCrcs, unix_millis};
use crate::server::store::watermarks::Watermarks;
use crate::wire::record::decode_record;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use flate2::Compression;
use flate2::write::GzEncoder;
use log::{info, warn};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Compressed copies older versions wrote into the data directory before uploading.
const UPLOAD_SUFFIX: &str = ".gz.upload";
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long the confirming `head-object` may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What `/metrics` shows of the archive.
#[derive(Debug, Default)]
pub(crate) struct ArchiveMetrics {
    pub shipped_segments: AtomicU64,
    /// Segment bytes shipped (before compression).
    pub shipped_bytes: AtomicU64,
    /// Bytes uploaded (gzip).
    pub uploaded_bytes: AtomicU64,
    /// Failed tries: uploads, confirmations, a missing segment, an unreachable bucket
    /// at start.
    pub failures: AtomicU64,
    pub pending_segments: AtomicU64,
    pub pending_bytes: AtomicU64,
    /// When the oldest pending sealed segment was last written (sealed), Unix ms; 0 when
    /// nothing is pending.
    pub oldest_pending_ms: AtomicU64,
}

impl ArchiveMetrics {
    /// Seconds since the oldest unshipped sealed segment was sealed: the archive lag an
    /// alarm watches (0 when everything is shipped).
    pub(crate) fn lag_seconds(&self) -> f64 {
        match self.oldest_pending_ms.load(Relaxed) {
            0 => 0.0,
            at => unix_millis().saturating_sub(at) as f64 / 1000.0,
        }
    }
}

/// Set when the server stops: ship what is pending until then.
#[derive(Default)]
struct Stop {
    deadline: Mutex<Option<Instant>>,
    /// Set with the deadline, readable without its lock.
    requested: AtomicBool,
    /// Rung with the deadline: a backoff or a running CLI looks at it again.
    alarm: Alarm,
}

impl Stop {
    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps up to `wait`, less if the stop deadline comes first; a stop wakes it.
    fn sleep(&self, wait: Duration) {
        // Counted before the deadline is read: a stop in between rings after `seen`.
        let seen = self.alarm.rung();
        let until = Instant::now() + wait;
        self.alarm
            .wait(seen, self.deadline().map_or(until, |d| d.min(until)));
    }
}

/// The store the shipper ships from.
pub(crate) struct Source {
    pub dir: PathBuf,
    pub store_id: String,
    /// The `sealed` mark the shipper waits on, and the `shipped` mark it advances.
    pub watermarks: Arc<Watermarks>,
    /// What each sealed segment held when it was stored.
    pub sealed: Arc<SealedCrcs>,
    /// Segments up to this were retired (or never existed): nothing to ship there.
    pub retired_through: u64,
}

/// The running shipper.
pub(crate) struct Archive {
    pub metrics: Arc<ArchiveMetrics>,
    stop: Arc<Stop>,
    watermarks: Arc<Watermarks>,
    stop_timeout: Duration,
    thread: JoinHandle<()>,
}

impl Archive {
    /// Starts shipping what the store seals, after what `confirmed` records. A bucket
    /// the start-up check found silent counts as a failure, so `/metrics` shows it.
    pub(crate) fn start(
        config: ArchiveConfig,
        source: Source,
        confirmed: Arc<Confirmed>,
        bucket: Bucket,
    ) -> io::Result<Archive> {
        remove_upload_leftovers(&source.dir)?;
        let metrics = Arc::new(ArchiveMetrics::default());
        if bucket == Bucket::Silent {
            metrics.failures.fetch_add(1, Relaxed);
        }
        let stop = Arc::new(Stop::default());
        let shipped_through = confirmed.through().max(source.retired_through);
        info!(
            "archive: shipping sealed segments of store {} to s3://{}/{} as host {} \
             (confirmed through segment {shipped_through})",
            source.store_id, config.bucket, config.prefix, config.host
        );
        let stop_timeout = config.stop_timeout;
        let watermarks = source.watermarks.clone();
        watermarks.ship_through(shipped_through);
        let shipper = Shipper {
            config,
            source,
            shipped_through,
            pending: BTreeMap::new(),
            confirmed,
            metrics: metrics.clone(),
            stop: stop.clone(),
            unconditional: false,
        };
        let thread = std::thread::Builder::new()
            .name("archive".into())
            .spawn(move || shipper.run())?;
        Ok(Archive {
            metrics,
            stop,
            watermarks,
            stop_timeout,
            thread,
        })
    }

    /// Ships what is pending (the store has sealed its last segment by now) for up to
    /// the stop timeout, then says what it left; returns how many segments that is.
    pub(crate) fn finish(self) -> u64 {
        *self
            .stop
            .deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + self.stop_timeout);
        self.stop.requested.store(true, SeqCst);
        self.stop.alarm.ring();
        // The shipper may be waiting for a seal: it looks at `requested` again.
        self.watermarks.wake();
        let _ = self.thread.join();
        let (segments, bytes) = (
            self.metrics.pending_segments.load(Relaxed),
            self.metrics.pending_bytes.load(Relaxed),
        );
        if segments == 0 {
            info!("archive: every sealed segment is shipped");
        } else {
            warn!(
                "archive: stopped after {}s with {segments} sealed segments ({bytes} bytes) \
                 unshipped; they stay on disk and ship at the next start",
                self.stop_timeout.as_secs()
            );
        }
        segments
    }
}

struct Shipper {
    config: ArchiveConfig,
    source: Source,
    /// Every segment up to this is in S3 (or retired, or never existed).
    shipped_through: u64,
    /// Sealed segments not yet shipped: number -> (bytes, when sealed in Unix ms).
    pending: BTreeMap<u64, (u64, u64)>,
    confirmed: Arc<Confirmed>,
    metrics: Arc<ArchiveMetrics>,
    stop: Arc<Stop>,
    /// The CLI rejected `--if-none-match` (one from before S3's conditional writes,
    /// August 2024): uploads go without it.
    unconditional: bool,
}

/// The base64 SHA-256 S3 reports, and the length, of one object.
#[derive(Deserialize)]
struct ObjectInfo {
    #[serde(default, rename = "ChecksumSHA256")]
    checksum_sha256: Option<String>,
    #[serde(default, rename = "ContentLength")]
    content_length: Option<u64>,
}

impl Shipper {
    fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let sealed = self.source.watermarks.get().sealed;
            self.refresh_pending(sealed);
            let deadline = self.stop.deadline();
            if self.shipped_through >= sealed {
                if deadline.is_some() {
                    break;
                }
                // Woken by the committer's next seal, or by the stop.
                let stop = &self.stop.requested;
                self.source.watermarks.wait_sealed_past(
                    self.shipped_through,
                    || stop.load(SeqCst),
                    None,
                );
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let next = self.shipped_through + 1;
            match self.ship(next) {
                Ok(()) => {
                    self.shipped_through = next;
                    self.source.watermarks.ship_through(next);
                    backoff = MIN_BACKOFF;
                }
                Err(e) => {
                    self.metrics.failures.fetch_add(1, Relaxed);
                    warn!(
                        "archive: {} not shipped ({e}); retrying in {:.1}s",
                        segment_name(next),
                        backoff.as_secs_f64()
                    );
                    self.stop.sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let sealed = self.source.watermarks.get().sealed;
        self.refresh_pending(sealed);
        if let Err(e) = self.confirmed.save() {
            warn!("archive: cannot save {ARCHIVE_STATE} ({e}); the next start checks S3 again");
        }
    }

    /// Uploads segment `number`, checks that S3 holds exactly its bytes, and records it.
    fn ship(&mut self, number: u64) -> Result<(), ArchiveError> {
        let name = segment_name(number);
        let path = self.source.dir.join(&name);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.confirmed.holds(number) => {
                // Gone from the middle and restored from S3 by `sensor-server rebuild`.
                info!("archive: {name} is gone from the store and recorded as in S3");
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Never passed over: its readings were acknowledged, and retention must
                // not take the watermark past it for a file put back later.
                return Err(ArchiveError::Missing(path));
            }
            Err(e) => {
                return Err(ArchiveError::local(format!(
                    "cannot read {}",
                    path.display()
                ))(e));
            }
        };
        let crc32 = crc32fast::hash(&bytes);
        if let Some(stored) = self.source.sealed.get(number)
            && stored != crc32
        {
            return Err(ArchiveError::Corrupt {
                path,
                found: crc32,
                stored,
            });
        }
        let first_ms = first_recv_ms(&bytes).unwrap_or_else(|| modified_ms(&path));
        let key = object_key(&self.config, &self.source.store_id, number, first_ms);
        let body = gzip(&bytes).map_err(ArchiveError::local("gzip"))?;
        let checksum = BASE64.encode(Sha256::digest(&body));
        self.put_object(&key, &body, &checksum)?;
        self.check_object(&key, body.len() as u64, &checksum)?;
        let record = ShippedSegment {
            bytes: bytes.len() as u64,
            crc32,
            sha256: sha256_hex(&bytes),
            key: key.clone(),
        };
        if let Err(e) = self.confirmed.record(number, record) {
            // Recorded in memory: shipping and retention go on; the save is retried.
            warn!("archive: shipped {name}, but cannot save {ARCHIVE_STATE} yet ({e})");
        }
        self.metrics.shipped_segments.fetch_add(1, Relaxed);
        self.metrics
            .shipped_bytes
            .fetch_add(bytes.len() as u64, Relaxed);
        self.metrics
            .uploaded_bytes
            .fetch_add(body.len() as u64, Relaxed);
        info!(
            "archive: shipped {name} ({} bytes, {} gzipped) to s3://{}/{key}",
            bytes.len(),
            body.len(),
            self.config.bucket
        );
        Ok(())
    }

    /// `put-object` with the body's SHA-256 and `If-None-Match: *`. An object already
    /// under the key (an upload a crash interrupted after S3 stored it) is fine here:
    /// `check_object` then decides whether it is these bytes.
    fn put_object(&mut self, key: &str, body: &[u8], checksum: &str) -> Result<(), ArchiveError> {
        let stdin = body_file(body).map_err(ArchiveError::local("cannot stage the upload"))?;
        let mut command = cli_command(&self.config);
        command
            .args(["s3api", "put-object", "--bucket", &self.config.bucket])
            .args(["--key", key])
            // The body comes from memory (or an unlinked temporary file): a full data
            // disk must not stop the upload that lets retention make room.
            .args(["--body", "/dev/stdin"])
            .args(["--content-type", "application/gzip"])
            .args(["--checksum-algorithm", "SHA256"])
            .args(["--checksum-sha256", checksum]);
        if !self.unconditional {
            command.args(["--if-none-match", "*"]);
        }
        let out = self.run_cli(command, Stdio::from(stdin), self.config.upload_timeout)?;
        if out.status.success() {
            return match serde_json::from_slice::<ObjectInfo>(&out.stdout) {
                Ok(ObjectInfo {
                    checksum_sha256: Some(got),
                    ..
                }) if got != checksum => Err(ArchiveError::S3(format!(
                    "S3 answered SHA-256 {got} for the upload, not {checksum}"
                ))),
                _ => Ok(()),
            };
        }
        let why = out.error_line();
        if why.contains("PreconditionFailed") || why.contains("(412)") {
            info!(
                "archive: s3://{}/{key} exists already; checking it holds these bytes",
                self.config.bucket
            );
            return Ok(());
        }
        if !self.unconditional && why.contains("Unknown options") && why.contains("if-none-match") {
            warn!(
                "archive: the AWS CLI {} is too old for S3's conditional writes \
                 (--if-none-match); uploading without them: the store id in every key and \
                 the head-object check still keep other objects from being taken for ours. \
                 Update it to keep S3 from ever replacing an object.",
                self.config.cli.display()
            );
            self.unconditional = true;
            return self.put_object(key, body, checksum);
        }
        Err(ArchiveError::S3(format!(
            "AWS CLI put-object {}: {why}",
            out.status
        )))
    }

    /// Ok only when S3 holds `key` with exactly `len` bytes whose SHA-256 is `checksum`.
    fn check_object(&mut self, key: &str, len: u64, checksum: &str) -> Result<(), ArchiveError> {
        let mut command = cli_command(&self.config);
        command
            .args(["s3api", "head-object", "--bucket", &self.config.bucket])
            .args(["--key", key, "--checksum-mode", "ENABLED"]);
        let out = self.run_cli(command, Stdio::null(), HEAD_TIMEOUT)?;
        if !out.status.success() {
            return Err(ArchiveError::S3(format!(
                "the upload looked fine, but S3 does not show the object \
                 (head-object {}: {})",
                out.status,
                out.error_line()
            )));
        }
        let info: ObjectInfo = serde_json::from_slice(&out.stdout).map_err(|e| {
            ArchiveError::S3(format!("head-object answered something unreadable ({e})"))
        })?;
        match (info.content_length, info.checksum_sha256.as_deref()) {
            (Some(have), Some(sum)) if have == len && sum == checksum => Ok(()),
            (have, sum) => Err(ArchiveError::S3(format!(
                "s3://{}/{key} is not these bytes: S3 has {} bytes with SHA-256 {}, \
                 the segment is {len} bytes with {checksum}; it is not overwritten \
                 (another store or a failed upload put it there: look at it)",
                self.config.bucket,
                have.map_or_else(|| "?".into(), |n| n.to_string()),
                sum.unwrap_or("(none)"),
            ))),
        }
    }

    /// Runs the CLI for at most `timeout`, less if the stop deadline comes first.
    fn run_cli(
        &mut self,
        command: Command,
        stdin: Stdio,
        timeout: Duration,
    ) -> Result<CliOutput, ArchiveError> {
        let own = Instant::now() + timeout;
        // A stop that comes while the CLI runs brings its deadline forward.
        let deadline = || self.stop.deadline().map_or(own, |stop| stop.min(own));
        aws_cli::run(command, stdin, deadline, &self.stop.alarm)
            .map_err(|e| ArchiveError::of_cli(&self.config.cli, e))
    }

    /// Recounts the sealed segments still to ship, for `/metrics`. Each segment is
    /// looked at once while it is there (sealed segments never change); a missing one
    /// counts too, from when it was first missed.
    fn refresh_pending(&mut self, sealed: u64) {
        let shipped = self.shipped_through;
        self.pending.retain(|&number, _| number > shipped);
        for number in shipped + 1..=sealed {
            let seen = self.pending.get(&number).is_some_and(|&(len, _)| len > 0);
            if seen {
                continue;
            }
            let path = self.source.dir.join(segment_name(number));
            let entry = match fs::metadata(&path) {
                Ok(meta) => (meta.len(), modified_ms(&path).max(1)),
                Err(_) => (
                    0,
                    self.pending
                        .get(&number)
                        .map_or_else(unix_millis, |&(_, at)| at),
                ),
            };
            self.pending.insert(number, entry);
        }
        let bytes = self.pending.values().map(|(len, _)| len).sum();
        let oldest = self.pending.values().map(|&(_, at)| at).min().unwrap_or(0);
        self.metrics
            .pending_segments
            .store(self.pending.len() as u64, Relaxed);
        self.metrics.pending_bytes.store(bytes, Relaxed);
        self.metrics.oldest_pending_ms.store(oldest, Relaxed);
    }
}

/// `body` in a file the CLI reads as its stdin: in memory (`memfd`), or else an
/// unlinked temporary file outside the data directory.
fn body_file(body: &[u8]) -> io::Result<File> {
    let mut file =
        match rustix::fs::memfd_create("sensorhub-upload", rustix::fs::MemfdFlags::CLOEXEC) {
            Ok(fd) => File::from(fd),
            Err(_) => {
                let path = std::env::temp_dir().join(format!(
                    "sensorhub-upload-{}-{:x}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)?;
                fs::remove_file(&path)?;
                file
            }
        };
    file.write_all(body)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Compressed copies left by an upload a crash interrupted (versions before uploads
/// were staged outside the data directory).
fn remove_upload_leftovers(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(UPLOAD_SUFFIX))
        {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// gzip with a fixed header (no name, mtime 0), so one segment always gives one object.
fn gzip(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(bytes.len() / 4), Compression::default());
    encoder.write_all(bytes)?;
    encoder.finish()
}

/// The `recv` of the segment's first line, if it is a record.
fn first_recv_ms(segment: &[u8]) -> Option<u64> {
    let end = memchr::memchr(b'\n', segment)?;
    decode_record(&segment[..end]).ok().map(|r| r.recv)
}

fn modified_ms(path: &Path) -> u64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(unix_millis, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::io::Read;

    #[test]
    fn the_object_is_the_exact_segment_gzipped_the_same_way_every_time() {
        let segment =
            b"{\"sensor\":\"a\",\"kind\":\"k\",\"value\":1,\"seq\":1,\"recv\":5}\n".repeat(100);
        let (one, two) = (gzip(&segment).unwrap(), gzip(&segment).unwrap());
        assert_eq!(one, two, "deterministic");
        let mut back = Vec::new();
        GzDecoder::new(&one[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, segment);
        assert_eq!(first_recv_ms(&segment), Some(5));
        assert_eq!(first_recv_ms(b"garbage\n"), None);
    }
}
