//! Start-up recovery of the store: torn tails cut, the checkpoint checked against the
//! files, the rest replayed into per-sensor statistics; and the probe that refuses a
//! store the server could not write. `store.rs` holds the running store.

use crate::stats::SensorStats;
use crate::store::{CHECKPOINT, Checkpoint, Sensors, delete_retired, segment_number};
use log::warn;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// One stored reading, exactly as written to a segment.
#[derive(Debug, Deserialize)]
struct Record {
    sensor: String,
    kind: String,
    value: f64,
    seq: u64,
    #[serde(default)]
    ts: Option<u64>,
    #[allow(dead_code)] // part of the format; not needed to rebuild statistics
    recv: u64,
}

/// Every `*.jsonl` regular file directly in `dir`, sorted by name.
pub(crate) fn store_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        if let Some(name) = entry.file_name().to_str()
            && name.ends_with(".jsonl")
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Cuts the bytes after the last `\n` (a line torn by a crash) and returns the new length.
fn cut_torn_tail(path: &Path) -> io::Result<u64> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = memchr::memrchr(b'\n', chunk) {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if keep < len {
        warn!(
            "store: {}: cut {} bytes after the last complete line (torn by a crash)",
            path.display(),
            len - keep
        );
        file.set_len(keep)?;
        file.sync_all()?;
    }
    Ok(keep)
}

/// What start-up rebuilt from the files.
pub(crate) struct Recovered {
    /// Length of every `*.jsonl` file.
    pub(crate) lengths: BTreeMap<String, u64>,
    pub(crate) sensors: Sensors,
    pub(crate) retired_through: u64,
    /// Bytes replayed (not covered by the checkpoint).
    pub(crate) replayed: u64,
}

/// Rebuilds statistics: cuts torn tails, loads the checkpoint when it still matches the
/// files, finishes any retention it recorded, and replays what follows it.
pub(crate) fn recover(dir: &Path) -> io::Result<Recovered> {
    let mut lengths = BTreeMap::new();
    for name in store_files(dir)? {
        let len = cut_torn_tail(&dir.join(&name))?;
        lengths.insert(name, len);
    }
    let retired_through = load_checkpoint(dir, &lengths).map_or(0, |c| c.retired_through);
    // Retired segments are in the statistics already; a crash may have left some of
    // them on disk after the checkpoint that retired them was written.
    let leftovers: Vec<PathBuf> = lengths
        .keys()
        .filter(|name| segment_number(name).is_some_and(|n| n <= retired_through))
        .map(|name| dir.join(name))
        .collect();
    lengths.retain(|name, _| segment_number(name).is_none_or(|n| n > retired_through));
    delete_retired(&leftovers)?;
    let (sensors, replayed) = load(dir, &lengths, retired_through)?;
    Ok(Recovered {
        lengths,
        sensors,
        retired_through,
        replayed,
    })
}

/// Statistics of the files with these `lengths`: the checkpoint (when it still matches
/// them) plus a replay of what follows it. Returns them and the bytes replayed.
pub(crate) fn load(
    dir: &Path,
    lengths: &BTreeMap<String, u64>,
    retired_through: u64,
) -> io::Result<(Sensors, u64)> {
    let (covered, mut sensors) = match load_checkpoint(dir, lengths) {
        Some(c) if c.retired_through == retired_through => (c.files, c.sensors),
        _ => (BTreeMap::new(), Sensors::new()),
    };
    let mut replayed = 0;
    for (name, &len) in lengths {
        let from = covered.get(name).copied().unwrap_or(0);
        replayed += len - from;
        replay(&dir.join(name), from, len, &mut sensors)?;
    }
    Ok((sensors, replayed))
}

/// Refuses a data directory the server could not write, naming the path and the
/// operation, before any reading is acknowledged: every file start-up or a checkpoint
/// will replace is opened for writing (nothing is changed), and a temporary file is
/// created and removed. A full disk passes (it takes no bytes): the server starts and
/// reports it once a write fails.
pub(crate) fn probe_writable(dir: &Path) -> io::Result<()> {
    let refuse = |path: &Path, op: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot {op} {} ({e}): the store must be writable",
                path.display()
            ),
        )
    };
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| refuse(&path, "open for writing", e))?;
        }
    }
    let probe = dir.join(".write-probe.tmp");
    File::create(&probe).map_err(|e| refuse(&probe, "create", e))?;
    fs::remove_file(&probe).map_err(|e| refuse(&probe, "remove", e))
}

fn load_checkpoint(dir: &Path, lengths: &BTreeMap<String, u64>) -> Option<Checkpoint> {
    let text = match fs::read(dir.join(CHECKPOINT)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!("store: cannot read {CHECKPOINT} ({e}); replaying every file");
            return None;
        }
    };
    let checkpoint: Checkpoint = match serde_json::from_slice(&text) {
        Ok(c) => c,
        Err(e) => {
            warn!("store: {CHECKPOINT} is unreadable ({e}); replaying every file");
            return None;
        }
    };
    // A checkpoint that covers bytes no longer there (a file removed or cut) would count
    // readings that are gone: fall back to a full replay.
    let stale = checkpoint
        .files
        .iter()
        .find(|(name, len)| lengths.get(*name).is_none_or(|have| have < len));
    if let Some((name, _)) = stale {
        warn!("store: {CHECKPOINT} covers more of {name} than exists; replaying every file");
        return None;
    }
    Some(checkpoint)
}

/// Adds every valid record of `path` between byte `from` and `to`; invalid complete
/// lines are reported and skipped, never removed.
fn replay(path: &Path, from: u64, to: u64, sensors: &mut Sensors) -> io::Result<()> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = BufReader::with_capacity(1 << 20, file.take(to - from));
    let mut line = Vec::new();
    let mut offset = from;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let at = offset;
        offset += n as u64;
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) if r.value.is_finite() => apply_record(sensors, r, path, at),
            Ok(_) => warn!(
                "store: {} byte {at}: non-finite value, skipped",
                path.display()
            ),
            Err(e) => warn!(
                "store: {} byte {at}: not a valid record ({e}), skipped",
                path.display()
            ),
        }
    }
}

fn apply_record(sensors: &mut Sensors, r: Record, path: &Path, at: u64) {
    match sensors.get_mut(&r.sensor) {
        Some(s) if s.kind != r.kind => warn!(
            "store: {} byte {at}: sensor {} has kind {} but this record says {}, skipped",
            path.display(),
            r.sensor,
            s.kind,
            r.kind
        ),
        Some(s) => s.add(r.value, r.seq, r.ts),
        None => {
            let stats = SensorStats::first(&r.kind, r.value, r.seq, r.ts);
            sensors.insert(r.sensor, stats);
        }
    }
}
