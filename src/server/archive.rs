//! The archive: every sealed store segment shipped to S3, exactly once, in order.
//!
//! One shipper thread per server. It takes the oldest sealed segment not yet confirmed,
//! gzips its exact bytes (deterministically: the same segment always gives the same
//! object), and uploads it as
//! `PREFIX/readings/dt=YYYY-MM-DD/host=HOST/segment-NNNNNNNNNN.jsonl.gz` with its SHA-256,
//! which S3 checks against what it received before storing anything. `dt` is the UTC
//! day of the segment's first record (the store seals at midnight, so that is the day
//! of every record in it). Only an upload S3 confirmed moves the watermark in
//! `archive.json` (written atomically), and only then may retention delete the segment
//! (`db::Retention`). Failures retry with exponential backoff, across restarts too: the
//! watermark is the only state. A crash between S3's confirmation and the watermark
//! write makes the next start upload the same bytes to the same key again, which
//! changes nothing in the bucket.
//!
//! The S3 client is the AWS CLI (`aws s3api put-object`), which Amazon Linux ships and
//! nixpkgs packages: it brings the whole credential chain (environment, profiles, the
//! instance profile through IMDSv2), SigV4, retries and endpoint overrides, with no
//! async runtime or TLS stack in this binary (the official Rust SDK would add both, and
//! a C toolchain for the static aarch64 build).

use crate::server::files::{
    ARCHIVE_STATE, archive_watermark, save_archive_watermark, segment_name,
};
use crate::server::store::{StoreMetrics, unix_millis};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use flate2::Compression;
use flate2::write::GzEncoder;
use log::{info, warn};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

const UPLOAD_SUFFIX: &str = ".gz.upload";
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often an idle shipper looks for newly sealed segments.
const POLL: Duration = Duration::from_millis(500);

/// Where and how sealed segments are shipped (`--archive` and friends).
#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; may be empty.
    pub prefix: String,
    /// S3 endpoint override (a local S3 such as moto or MinIO); `None` for AWS.
    pub endpoint: Option<String>,
    /// The server's stable id in object keys (`host=HOST`).
    pub host: String,
    /// The AWS CLI to run.
    pub cli: PathBuf,
    /// One upload taking longer than this is killed and retried.
    pub upload_timeout: Duration,
    /// How long a graceful stop keeps shipping what is pending.
    pub stop_timeout: Duration,
}

/// Parses `s3://BUCKET[/PREFIX]` into bucket and prefix.
pub fn parse_s3_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("archive {url:?} must look like s3://BUCKET/PREFIX"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !valid_bucket {
        return Err(format!(
            "archive bucket {bucket:?} is not a valid S3 bucket name (3 to 63 of a-z 0-9 . -)"
        ));
    }
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

/// Checks a host id for use in keys and partition values: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn check_host_id(host: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&host.len())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host id {host:?} must be 1 to 64 of A-Z a-z 0-9 . _ - (it names the archive partition)"
        ))
    }
}

/// The machine's hostname, the default host id.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The object key of segment `number` whose first record was received at `first_ms`.
pub fn object_key(config: &ArchiveConfig, number: u64, first_ms: u64) -> String {
    let (y, m, d) = civil_date(first_ms);
    let path = format!(
        "readings/dt={y:04}-{m:02}-{d:02}/host={}/{}.gz",
        config.host,
        segment_name(number)
    );
    if config.prefix.is_empty() {
        path
    } else {
        format!("{}/{path}", config.prefix)
    }
}

/// What `/metrics` shows of the archive.
#[derive(Debug, Default)]
pub struct ArchiveMetrics {
    pub shipped_segments: AtomicU64,
    /// Segment bytes shipped (before compression).
    pub shipped_bytes: AtomicU64,
    /// Bytes uploaded (gzip).
    pub uploaded_bytes: AtomicU64,
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
    pub fn lag_seconds(&self) -> f64 {
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
    changed: Condvar,
}

impl Stop {
    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps up to `wait`, less if the stop deadline comes first; a stop wakes it.
    fn sleep(&self, wait: Duration) {
        let guard = self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = match *guard {
            Some(deadline) => wait.min(deadline.saturating_duration_since(Instant::now())),
            None => wait,
        };
        let _ = self
            .changed
            .wait_timeout(guard, wait)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// The running shipper.
pub struct Archive {
    /// Read by retention: segments up to this may be deleted.
    pub shipped_through: Arc<AtomicU64>,
    pub metrics: Arc<ArchiveMetrics>,
    stop: Arc<Stop>,
    stop_timeout: Duration,
    thread: JoinHandle<()>,
}

impl Archive {
    /// Loads the watermark from `dir` and starts shipping what `store` seals.
    pub fn start(
        config: ArchiveConfig,
        dir: &Path,
        store: Arc<StoreMetrics>,
    ) -> io::Result<Archive> {
        let shipped = archive_watermark(dir)?;
        remove_upload_leftovers(dir)?;
        let shipped_through = Arc::new(AtomicU64::new(shipped));
        let metrics = Arc::new(ArchiveMetrics::default());
        let stop = Arc::new(Stop::default());
        info!(
            "archive: shipping sealed segments to s3://{}/{} as host {} (confirmed through segment {shipped})",
            config.bucket, config.prefix, config.host
        );
        let stop_timeout = config.stop_timeout;
        let shipper = Shipper {
            config,
            dir: dir.to_owned(),
            pending: Mutex::new(BTreeMap::new()),
            store,
            shipped_through: shipped_through.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("archive".into())
            .spawn(move || shipper.run())?;
        Ok(Archive {
            shipped_through,
            metrics,
            stop,
            stop_timeout,
            thread,
        })
    }

    /// Ships what is pending (the store has sealed its last segment by now) for up to
    /// the stop timeout, then says what it left; returns how many segments that is.
    pub fn finish(self) -> u64 {
        *self
            .stop
            .deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + self.stop_timeout);
        self.stop.changed.notify_all();
        let _ = self.thread.join();
        let (segments, bytes) = (
            self.metrics.pending_segments.load(Relaxed),
            self.metrics.pending_bytes.load(Relaxed),
        );
        if segments == 0 {
            info!("archive: every sealed segment is shipped");
        } else {
            warn!(
                "archive: stop timeout ({}s) reached with {segments} sealed segments \
                 ({bytes} bytes) unshipped; they stay on disk and ship at the next start",
                self.stop_timeout.as_secs()
            );
        }
        segments
    }
}

struct Shipper {
    config: ArchiveConfig,
    dir: PathBuf,
    /// Sealed segments not yet shipped: number -> (bytes, when sealed in Unix ms).
    pending: Mutex<BTreeMap<u64, (u64, u64)>>,
    store: Arc<StoreMetrics>,
    shipped_through: Arc<AtomicU64>,
    metrics: Arc<ArchiveMetrics>,
    stop: Arc<Stop>,
}

impl Shipper {
    fn run(self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let shipped = self.shipped_through.load(Relaxed);
            let sealed = self.store.sealed_through.load(Relaxed);
            self.refresh_pending(shipped, sealed);
            let deadline = self.stop.deadline();
            if shipped >= sealed {
                if deadline.is_some() {
                    return;
                }
                self.stop.sleep(POLL);
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return;
            }
            let next = shipped + 1;
            match self.ship(next, deadline) {
                Ok(()) => backoff = MIN_BACKOFF,
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
    }

    /// Uploads segment `number` and, once S3 confirmed it, moves the watermark.
    fn ship(&self, number: u64, stop_deadline: Option<Instant>) -> Result<(), String> {
        let name = segment_name(number);
        let path = self.dir.join(&name);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warn!("archive: {name} is missing from the store; nothing to ship for it");
                return self.confirm(number, 0, 0);
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        if bytes.is_empty() {
            return self.confirm(number, 0, 0);
        }
        let first_ms = first_recv_ms(&bytes).unwrap_or_else(|| modified_ms(&path));
        let key = object_key(&self.config, number, first_ms);
        let body = gzip(&bytes).map_err(|e| format!("gzip: {e}"))?;
        let checksum = BASE64.encode(Sha256::digest(&body));
        let upload = self.dir.join(format!("{name}{UPLOAD_SUFFIX}"));
        fs::write(&upload, &body).map_err(|e| format!("cannot write {}: {e}", upload.display()))?;
        let result = self.put_object(&key, &upload, &checksum, stop_deadline);
        let _ = fs::remove_file(&upload);
        result?;
        self.confirm(number, bytes.len() as u64, body.len() as u64)?;
        info!(
            "archive: shipped {name} ({} bytes, {} gzipped) to s3://{}/{key}",
            bytes.len(),
            body.len(),
            self.config.bucket
        );
        Ok(())
    }

    /// Runs `aws s3api put-object`; Ok only when it exited 0 (S3 stored the object
    /// after checking the SHA-256).
    fn put_object(
        &self,
        key: &str,
        body: &Path,
        checksum: &str,
        stop_deadline: Option<Instant>,
    ) -> Result<(), String> {
        let mut child = self
            .put_object_command(key, body, checksum)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.config.cli.display()))?;
        let mut deadline = Instant::now() + self.config.upload_timeout;
        if let Some(stop) = stop_deadline {
            deadline = deadline.min(stop);
        }
        let mut refreshed = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("upload timed out; killed the AWS CLI".into());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for the AWS CLI: {e}")),
            }
            // A slow upload must not freeze the backlog `/metrics` shows.
            if refreshed.elapsed() >= POLL {
                refreshed = Instant::now();
                self.refresh_pending(
                    self.shipped_through.load(Relaxed),
                    self.store.sealed_through.load(Relaxed),
                );
            }
        };
        if status.success() {
            return Ok(());
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        let reason = stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        Err(format!("AWS CLI {status}: {}", reason.trim()))
    }

    fn put_object_command(&self, key: &str, body: &Path, checksum: &str) -> Command {
        let mut command = Command::new(&self.config.cli);
        if let Some(endpoint) = &self.config.endpoint {
            command.args(["--endpoint-url", endpoint]);
        }
        // The shipper retries with its own backoff; the CLI's own retries (5 attempts,
        // each up to the connect timeout) would hide an outage for a minute.
        if std::env::var_os("AWS_MAX_ATTEMPTS").is_none() {
            command.env("AWS_MAX_ATTEMPTS", "2");
        }
        command
            .args(["--cli-connect-timeout", "5", "--output", "json"])
            .args(["s3api", "put-object", "--bucket", &self.config.bucket])
            .args(["--key", key])
            .arg("--body")
            .arg(body)
            .args(["--content-type", "application/gzip"])
            .args(["--checksum-algorithm", "SHA256"])
            .args(["--checksum-sha256", checksum])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    fn confirm(&self, number: u64, bytes: u64, uploaded: u64) -> Result<(), String> {
        save_archive_watermark(&self.dir, number)
            .map_err(|e| format!("uploaded, but cannot record it in {ARCHIVE_STATE}: {e}"))?;
        self.shipped_through.store(number, Relaxed);
        self.metrics.shipped_segments.fetch_add(1, Relaxed);
        self.metrics.shipped_bytes.fetch_add(bytes, Relaxed);
        self.metrics.uploaded_bytes.fetch_add(uploaded, Relaxed);
        Ok(())
    }

    /// Recounts the sealed segments still to ship, for `/metrics`. Each segment is
    /// looked at once (sealed segments never change), so a long backlog costs nothing
    /// per round.
    fn refresh_pending(&self, shipped: u64, sealed: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.retain(|&number, _| number > shipped);
        let first_new = pending
            .keys()
            .next_back()
            .map_or(shipped, |&n| n.max(shipped))
            + 1;
        for number in first_new..=sealed {
            let path = self.dir.join(segment_name(number));
            if let Ok(meta) = fs::metadata(&path) {
                pending.insert(number, (meta.len(), modified_ms(&path).max(1)));
            }
        }
        let bytes = pending.values().map(|(len, _)| len).sum();
        let oldest = pending.values().next().map_or(0, |&(_, at)| at);
        self.metrics
            .pending_segments
            .store(pending.len() as u64, Relaxed);
        self.metrics.pending_bytes.store(bytes, Relaxed);
        self.metrics.oldest_pending_ms.store(oldest, Relaxed);
    }
}

/// Compressed copies left by an upload a crash interrupted.
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
    #[derive(Deserialize)]
    struct Recv {
        recv: u64,
    }
    let end = memchr::memchr(b'\n', segment)?;
    serde_json::from_slice::<Recv>(&segment[..end])
        .ok()
        .map(|r| r.recv)
}

fn modified_ms(path: &Path) -> u64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(unix_millis, |d| d.as_millis() as u64)
}

/// (year, month, day) of a Unix time in ms, UTC (Howard Hinnant's `civil_from_days`).
fn civil_date(unix_ms: u64) -> (i64, u32, u32) {
    let z = (unix_ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    fn config(prefix: &str) -> ArchiveConfig {
        ArchiveConfig {
            bucket: "b".into(),
            prefix: prefix.into(),
            endpoint: None,
            host: "server-a".into(),
            cli: "aws".into(),
            upload_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn keys_are_hive_partitioned_by_the_first_records_day_and_the_host() {
        // 2026-11-30T23:59:59.999Z and one millisecond later.
        assert_eq!(
            object_key(&config("fleet/archive"), 7, 1_796_083_199_999),
            "fleet/archive/readings/dt=2026-11-30/host=server-a/segment-0000000007.jsonl.gz"
        );
        assert_eq!(
            object_key(&config(""), 12, 1_796_083_200_000),
            "readings/dt=2026-12-01/host=server-a/segment-0000000012.jsonl.gz"
        );
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(951_782_400_000), (2000, 2, 29));
        assert_eq!(civil_date(4_107_542_400_000), (2100, 3, 1));
    }

    #[test]
    fn s3_urls_and_host_ids_are_checked() {
        assert_eq!(
            parse_s3_url("s3://my-bucket/fleet/a/").unwrap(),
            ("my-bucket".into(), "fleet/a".into())
        );
        assert_eq!(
            parse_s3_url("s3://my.bucket").unwrap(),
            ("my.bucket".into(), "".into())
        );
        assert!(parse_s3_url("my-bucket/x").is_err());
        assert!(parse_s3_url("s3://My_Bucket/x").is_err());
        assert!(parse_s3_url("s3://ab").is_err());
        assert!(check_host_id("ip-10-0-1-23.ec2.internal").is_ok());
        assert!(check_host_id("").is_err());
        assert!(check_host_id("a/b").is_err());
        assert!(check_host_id("a=b").is_err());
    }

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
