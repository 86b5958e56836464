//! Start-up recovery of the store: torn tails cut, the checkpoint checked against the
//! files, the rest replayed into per-sensor statistics; and the probe that refuses a
//! store the server could not write. `store.rs` holds the running store, `files.rs` the
//! formats on disk.

use crate::server::files::{
    CHECKPOINT, Checkpoint, Covered, confirmed_through, delete_retired, segment_number,
};
use crate::server::stats::{self, Counted, Sensors};
use crc32fast::Hasher;
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
    /// CRC-32 of every file's bytes so far, continued by appends.
    pub(crate) crcs: BTreeMap<String, Hasher>,
    pub(crate) sensors: Sensors,
    pub(crate) retired_through: u64,
    /// Bytes replayed (not covered by the checkpoint).
    pub(crate) replayed: u64,
}

/// Rebuilds statistics: cuts torn tails, loads the checkpoint when it still matches the
/// files, byte for byte, finishes any retention it recorded, and replays what follows
/// it.
pub(crate) fn recover(dir: &Path) -> io::Result<Recovered> {
    let mut lengths = BTreeMap::new();
    for name in store_files(dir)? {
        let len = cut_torn_tail(&dir.join(&name))?;
        lengths.insert(name, len);
    }
    let checkpoint = read_checkpoint(dir);
    let mut retired_through = checkpoint.as_ref().map_or(0, |c| c.retired_through);
    // Retired segments are in the statistics already; a crash may have left some of
    // them on disk after the checkpoint that retired them was written. They are deleted
    // only if archive.json confirms them shipped as well: a checkpoint alone (corrupt,
    // or from another store) never makes start-up delete data.
    let leftovers: Vec<(u64, PathBuf)> = lengths
        .keys()
        .filter_map(|name| Some((segment_number(name)?, dir.join(name))))
        .filter(|(n, _)| *n <= retired_through)
        .collect();
    let shipped = confirmed_through(dir);
    if let Some((n, _)) = leftovers.iter().find(|(n, _)| *n > shipped) {
        warn!(
            "store: {CHECKPOINT} says segments up to {retired_through} were retired, but segment {n} is here and archive.json confirms shipping only up to {shipped}; not trusting the checkpoint, replaying every file"
        );
        retired_through = 0;
    } else {
        let paths: Vec<PathBuf> = leftovers.into_iter().map(|(_, p)| p).collect();
        lengths.retain(|name, _| segment_number(name).is_none_or(|n| n > retired_through));
        delete_retired(&paths)?;
    }
    let (sensors, replayed, crcs) = load_from(dir, &lengths, retired_through, checkpoint, true)?;
    Ok(Recovered {
        lengths,
        crcs,
        sensors,
        retired_through,
        replayed,
    })
}

/// Statistics of the files with these `lengths`: the checkpoint (when it covers them
/// and, with `verify`, when every covered byte still has the CRC-32 it recorded) plus a
/// replay of what follows it. Returns them, the bytes replayed and (with `verify`)
/// every file's CRC-32 so far.
pub(crate) fn load(
    dir: &Path,
    lengths: &BTreeMap<String, u64>,
    retired_through: u64,
    verify: bool,
) -> io::Result<(Sensors, u64, BTreeMap<String, Hasher>)> {
    load_from(dir, lengths, retired_through, read_checkpoint(dir), verify)
}

/// `load` with the checkpoint already read (start-up reads it once).
fn load_from(
    dir: &Path,
    lengths: &BTreeMap<String, u64>,
    retired_through: u64,
    checkpoint: Option<Checkpoint>,
    verify: bool,
) -> io::Result<(Sensors, u64, BTreeMap<String, Hasher>)> {
    let mut crcs = BTreeMap::new();
    let mut checkpoint = checkpoint
        .and_then(|c| usable_checkpoint(c, lengths))
        .filter(|c| c.retired_through == retired_through);
    if verify && let Some(c) = &checkpoint {
        match check_covered(dir, c)? {
            Ok(prefixes) => crcs = prefixes,
            Err(problem) => {
                warn!(
                    "store: {problem}; ignoring it and replaying every file (corrupt lines are reported with their offsets)"
                );
                checkpoint = None;
            }
        }
    }
    let (covered, mut sensors) = match checkpoint {
        Some(c) => (c.files, c.sensors),
        None => (BTreeMap::new(), Sensors::default()),
    };
    let mut replayed = 0;
    for (name, &len) in lengths {
        let from = covered.get(name).map_or(0, |c| c.bytes());
        replayed += len - from;
        let mut crc = crcs.remove(name).unwrap_or_default();
        let path = dir.join(name);
        replay(&path, from, len, &mut sensors, &mut crc, &mut |problem| {
            warn!("store: {problem}, skipped")
        })?;
        if verify {
            crcs.insert(name.clone(), crc);
        }
    }
    Ok((sensors, replayed, crcs))
}

/// Checks that every byte the checkpoint covers is what it was: per file, the CRC-32 of
/// the covered bytes. Returns their hashers (to be continued), or what does not match.
fn check_covered(
    dir: &Path,
    checkpoint: &Checkpoint,
) -> io::Result<Result<BTreeMap<String, Hasher>, String>> {
    let mut crcs = BTreeMap::new();
    for (name, covered) in &checkpoint.files {
        let Covered::Checked { len, crc32 } = *covered else {
            return Ok(Err(format!(
                "{CHECKPOINT} was written by an older version and has no checksums"
            )));
        };
        let crc = crc_of_prefix(&dir.join(name), len)?;
        if crc.clone().finalize() != crc32 {
            return Ok(Err(format!(
                "{CHECKPOINT} does not match {name}: its first {len} bytes changed since the checkpoint was written"
            )));
        }
        crcs.insert(name.clone(), crc);
    }
    Ok(Ok(crcs))
}

fn crc_of_prefix(path: &Path, len: u64) -> io::Result<Hasher> {
    let mut crc = Hasher::new();
    let mut file = File::open(path)?.take(len);
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            return Ok(crc);
        }
        crc.update(&block[..n]);
    }
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

/// The checkpoint, if there is a readable one.
fn read_checkpoint(dir: &Path) -> Option<Checkpoint> {
    let text = match fs::read(dir.join(CHECKPOINT)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!("store: cannot read {CHECKPOINT} ({e}); replaying every file");
            return None;
        }
    };
    match serde_json::from_slice(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!("store: {CHECKPOINT} is unreadable ({e}); replaying every file");
            None
        }
    }
}

/// The checkpoint, unless it covers bytes no longer there (a file removed or cut): it
/// would count readings that are gone.
fn usable_checkpoint(
    checkpoint: Checkpoint,
    lengths: &BTreeMap<String, u64>,
) -> Option<Checkpoint> {
    let stale = checkpoint
        .files
        .iter()
        .find(|(name, c)| lengths.get(*name).is_none_or(|&have| have < c.bytes()));
    if let Some((name, _)) = stale {
        warn!("store: {CHECKPOINT} covers more of {name} than exists; replaying every file");
        return None;
    }
    Some(checkpoint)
}

/// Something wrong in a store file, with where it is.
#[derive(Debug)]
pub enum Problem<'a> {
    NotARecord {
        path: &'a Path,
        at: u64,
        why: String,
    },
    KindChanged {
        path: &'a Path,
        at: u64,
        sensor: String,
        kind: String,
        had: String,
    },
    Torn {
        path: &'a Path,
        at: u64,
        len: usize,
    },
}

impl std::fmt::Display for Problem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::NotARecord { path, at, why } => {
                write!(
                    f,
                    "{} byte {at}: not a valid record ({why})",
                    path.display()
                )
            }
            Problem::KindChanged {
                path,
                at,
                sensor,
                kind,
                had,
            } => write!(
                f,
                "{} byte {at}: sensor {sensor} has kind {had} but this record says {kind}",
                path.display()
            ),
            Problem::Torn { path, at, len } => write!(
                f,
                "{} byte {at}: torn last line ({len} bytes without a newline)",
                path.display()
            ),
        }
    }
}

/// Adds every valid record of `path` between byte `from` and `to` to `sensors`,
/// continuing `crc` over those bytes; invalid lines go to `report` and are skipped,
/// never removed.
fn replay(
    path: &Path,
    from: u64,
    to: u64,
    sensors: &mut Sensors,
    crc: &mut Hasher,
    report: &mut dyn FnMut(Problem),
) -> io::Result<()> {
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
        crc.update(&line);
        let at = offset;
        offset += n as u64;
        if line.last() != Some(&b'\n') {
            report(Problem::Torn { path, at, len: n });
            continue;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) if r.value.is_finite() => apply_record(sensors, r, path, at, report),
            Ok(_) => report(Problem::NotARecord {
                path,
                at,
                why: "non-finite value".into(),
            }),
            Err(e) => report(Problem::NotARecord {
                path,
                at,
                why: e.to_string(),
            }),
        }
    }
}

fn apply_record(
    sensors: &mut Sensors,
    r: Record,
    path: &Path,
    at: u64,
    report: &mut dyn FnMut(Problem),
) {
    let reading = (r.value, r.seq, r.ts);
    if let Counted::OtherKind(had) = stats::count(sensors, &r.sensor, &r.kind, reading, false) {
        report(Problem::KindChanged {
            path,
            at,
            had,
            sensor: r.sensor,
            kind: r.kind,
        });
    }
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Corrupt or torn lines, and checkpoint mismatches.
    pub problems: usize,
    /// Valid records, and the statistics they give (what a full replay counts).
    pub records: u64,
    pub sensors: Sensors,
}

/// `sensor-server verify`: reads the store in `dir` without changing anything and
/// prints every corrupt or torn line with its file and byte offset, and every way the
/// checkpoint does not match the files.
pub fn verify(dir: &Path, out: &mut dyn std::io::Write) -> io::Result<Report> {
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is not a directory", dir.display()),
        ));
    }
    let mut problems = 0;
    let mut lengths = BTreeMap::new();
    let mut sensors = Sensors::default();
    for name in store_files(dir)? {
        let path = dir.join(&name);
        let len = fs::metadata(&path)?.len();
        let mut crc = Hasher::new();
        let mut write_error = Ok(());
        replay(&path, 0, len, &mut sensors, &mut crc, &mut |problem| {
            problems += 1;
            if write_error.is_ok() {
                write_error = writeln!(out, "{problem}");
            }
        })?;
        write_error?;
        lengths.insert(name, len);
    }
    let records = sensors.values().map(|s| s.count).sum::<u64>();
    if let Some(checkpoint) = read_checkpoint(dir) {
        for (name, covered) in &checkpoint.files {
            let have = lengths.get(name).copied();
            let problem = match (have, covered) {
                (None, _) => Some(format!("{CHECKPOINT} covers {name}, which is missing")),
                (Some(have), c) if have < c.bytes() => Some(format!(
                    "{CHECKPOINT} covers {} bytes of {name}, which has {have}",
                    c.bytes()
                )),
                (Some(_), Covered::Checked { len, crc32 }) => {
                    (crc_of_prefix(&dir.join(name), *len)?.finalize() != *crc32).then(|| {
                        format!("{CHECKPOINT} does not match {name}: its first {len} bytes changed since the checkpoint was written")
                    })
                }
                (Some(_), Covered::Unchecked(_)) => None,
            };
            if let Some(problem) = problem {
                problems += 1;
                writeln!(out, "{}: {problem}", dir.join(CHECKPOINT).display())?;
            }
        }
    }
    writeln!(
        out,
        "{}: {} files, {records} valid records, {} sensors, {problems} problems",
        dir.display(),
        lengths.len(),
        sensors.len()
    )?;
    Ok(Report {
        problems,
        records,
        sensors,
    })
}
