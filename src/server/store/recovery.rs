//! Start-up recovery of the store: torn tails cut, the checkpoint checked against the
//! files, the rest replayed into per-sensor statistics; and the probe that refuses a
//! store the server could not write. `segments.rs` holds the running store, `files.rs`
//! the formats on disk, `verify.rs` the offline check that shares these rules.

use crate::server::store::files::{
    ArchiveState, CHECKPOINT, CHECKPOINT_PREV, Checkpoint, CheckpointRead, Covered, delete_retired,
    read_checkpoint, segment_name, segment_number,
};
use crate::server::store::replay::replay;
use crate::server::store::stats::Sensors;
use crc32fast::Hasher;
use log::{error, warn};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Why a checkpoint is not believed, or the I/O error that kept it from being judged.
#[derive(Debug, thiserror::Error)]
pub(super) enum Distrust {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// It does not describe the files as they are (the store falls back to the previous
    /// checkpoint, or replays everything): why.
    #[error("{0}")]
    Corruption(String),
}

const NO_CHECKSUMS: &str = "it was written by an older version and has no checksums";

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
    /// Why the statistics are incomplete, if they are: segments are gone (retention
    /// deleted them) and no usable checkpoint counts their readings. Readings must then
    /// be refused, or seqs already stored would be accepted again.
    pub(crate) incomplete: Option<String>,
    /// What the checkpoint covers of the files, not read at start-up: for
    /// `check_covered_later`.
    pub(crate) unchecked: BTreeMap<String, Covered>,
}

/// Rebuilds statistics: cuts torn tails, picks the newest checkpoint that still matches
/// the files byte for byte and accounts for every segment that is gone, finishes any
/// retention it recorded, and replays what follows it.
pub(crate) fn recover(dir: &Path, store_id: &str, archive: &ArchiveState) -> io::Result<Recovered> {
    let mut lengths = BTreeMap::new();
    for name in store_files(dir)? {
        let len = cut_torn_tail(&dir.join(&name))?;
        lengths.insert(name, len);
    }
    let (gone_through, gaps) = missing_segments(&lengths);
    let choice = choose_checkpoint(dir, &lengths, archive, store_id, (gone_through, &gaps))?;
    let incomplete = choice.incompleteness(gone_through, &gaps);
    match &incomplete {
        Some(why) => error!("store: {why}"),
        // A checkpoint found wrong is never considered again (the bytes a checkpoint
        // covers are not read at start, so one that fits the files later, say once
        // start-up has made a missing segment, would be believed), but kept to look at.
        None => {
            for name in &choice.rejected_files {
                let aside = format!("{name}.rejected");
                warn!("store: {name} moved to {aside}");
                fs::rename(dir.join(name), dir.join(aside))?;
            }
        }
    }
    let (checkpoint, mut crcs, mut unchecked) = match choice.chosen {
        Some((_, c, crcs, on_disk)) => (Some(c), crcs, on_disk),
        None => (None, BTreeMap::new(), BTreeMap::new()),
    };
    let retired_through = checkpoint
        .as_ref()
        .map_or(0, |c| c.retired_through)
        .max(gone_through);
    finish_retirement(dir, &mut lengths, retired_through)?;
    let (covered, mut sensors) = match checkpoint {
        Some(c) => (c.files, c.sensors),
        None => (BTreeMap::new(), Sensors::default()),
    };
    let mut replayed = 0;
    for (name, &len) in &lengths {
        let from = covered.get(name).map_or(0, |c| c.bytes());
        replayed += len - from;
        let mut crc = crcs.remove(name).unwrap_or_default();
        replay(
            &dir.join(name),
            from,
            len,
            &mut sensors,
            &mut crc,
            &mut |problem| warn!("store: {problem}, skipped"),
        )?;
        crcs.insert(name.clone(), crc);
    }
    unchecked.retain(|name, _| lengths.contains_key(name));
    Ok(Recovered {
        lengths,
        crcs,
        sensors,
        retired_through,
        replayed,
        incomplete,
        unchecked,
    })
}

/// A believed checkpoint: its file name, the checkpoint, the CRC-32 states of what it
/// covers (to be continued), and what it covers of the files on disk.
type Believed = (
    &'static str,
    Checkpoint,
    BTreeMap<String, Hasher>,
    BTreeMap<String, Covered>,
);

/// The checkpoint start-up believes, and the ones it does not (with why).
struct Choice {
    chosen: Option<Believed>,
    rejected: Vec<String>,
    rejected_files: Vec<&'static str>,
}

/// The newest checkpoint that describes the files as they are (`judge`).
fn choose_checkpoint(
    dir: &Path,
    lengths: &BTreeMap<String, u64>,
    archive: &ArchiveState,
    store_id: &str,
    (gone_through, gaps): (u64, &[u64]),
) -> io::Result<Choice> {
    let mut choice = Choice {
        chosen: None,
        rejected: Vec::new(),
        rejected_files: Vec::new(),
    };
    for name in [CHECKPOINT, CHECKPOINT_PREV] {
        match read_checkpoint(dir, name) {
            CheckpointRead::Absent => {}
            CheckpointRead::Damaged(why) => {
                choice.rejected.push(why);
                choice.rejected_files.push(name);
            }
            CheckpointRead::Found(c) => {
                let judged = judge(dir, &c, lengths, archive, store_id, gone_through, gaps);
                match judged.and_then(|on_disk| Ok((trust_covered(&on_disk)?, on_disk))) {
                    Ok((crcs, on_disk)) => {
                        choice.chosen = Some((name, c, crcs, on_disk));
                        break;
                    }
                    Err(Distrust::Io(e)) => return Err(e),
                    Err(Distrust::Corruption(why)) => {
                        choice.rejected.push(format!("{name}: {why}"));
                        choice.rejected_files.push(name);
                    }
                }
            }
        }
    }
    Ok(choice)
}

impl Choice {
    /// Why the statistics cannot be complete: segments are gone and no believed
    /// checkpoint counts them. Logs what was not believed.
    fn incompleteness(&self, gone_through: u64, gaps: &[u64]) -> Option<String> {
        let rejected = self.rejected.join("; ");
        match &self.chosen {
            Some((name, ..)) => {
                if !self.rejected.is_empty() {
                    warn!("store: not using {rejected}; using {name}");
                }
                None
            }
            None if gone_through > 0 || !gaps.is_empty() => Some(format!(
                "{} gone and no usable checkpoint counts their readings ({}); refusing \
                 readings so that none stored before is accepted again: run `sensor-server \
                 rebuild` (it fetches them back from the archive), or put the files back",
                gone_description(gone_through, gaps),
                if self.rejected.is_empty() {
                    "there is none"
                } else {
                    &rejected
                }
            )),
            None => {
                if !self.rejected.is_empty() {
                    warn!(
                        "store: {rejected}; replaying every file (corrupt lines are reported with their offsets)"
                    );
                }
                None
            }
        }
    }
}

/// Retired segments are in the statistics already; a crash may have left some of them
/// on disk after the checkpoint that retired them was written (`judge` checked that
/// archive.json confirms them): finish deleting them.
fn finish_retirement(
    dir: &Path,
    lengths: &mut BTreeMap<String, u64>,
    retired_through: u64,
) -> io::Result<()> {
    let leftovers: Vec<PathBuf> = lengths
        .keys()
        .filter(|name| segment_number(name).is_some_and(|n| n <= retired_through))
        .map(|name| dir.join(name))
        .collect();
    lengths.retain(|name, _| segment_number(name).is_none_or(|n| n > retired_through));
    delete_retired(&leftovers)
}

/// The segments that are not on disk: every number below the lowest there (segments
/// are numbered from 1 and retention deletes the oldest first, so some checkpoint must
/// count those), and the gaps between the lowest and the highest (nothing deletes
/// those: a person or a tool did; the first 1000 are listed).
pub(super) fn missing_segments(lengths: &BTreeMap<String, u64>) -> (u64, Vec<u64>) {
    let numbers: Vec<u64> = lengths
        .keys()
        .filter_map(|name| segment_number(name))
        .collect();
    let gone_through = numbers.first().map_or(0, |lowest| lowest - 1);
    let gaps = numbers
        .windows(2)
        .flat_map(|pair| pair[0] + 1..pair[1])
        .take(1000)
        .collect();
    (gone_through, gaps)
}

/// "segments up to 4 are", "segments 7, 9 are", or both.
pub(super) fn gone_description(gone_through: u64, gaps: &[u64]) -> String {
    let mut parts = Vec::new();
    if gone_through > 0 {
        parts.push(format!("segments up to {gone_through}"));
    }
    if !gaps.is_empty() {
        let list: Vec<String> = gaps.iter().map(u64::to_string).collect();
        parts.push(format!("segments {}", list.join(", ")));
    }
    format!("{} are", parts.join(" and "))
}

/// Whether checkpoint `c` may be trusted with these files: it is this store's, covers
/// no more of any file than is there, counts every segment that is gone (up to
/// `gone_through`) in full (so archive.json must confirm those), and every byte it
/// covers still has the CRC-32 it recorded. Returns what it covers of the files on
/// disk, or why not. The covered bytes are not read here (`check_covered` does that).
pub(super) fn judge(
    dir: &Path,
    c: &Checkpoint,
    lengths: &BTreeMap<String, u64>,
    archive: &ArchiveState,
    store_id: &str,
    gone_through: u64,
    gaps: &[u64],
) -> Result<BTreeMap<String, Covered>, Distrust> {
    if !c.store_id.is_empty() && c.store_id != store_id {
        return Err(Distrust::Corruption(format!(
            "it belongs to store {}, not to this one ({store_id})",
            c.store_id
        )));
    }
    let mut on_disk = BTreeMap::new();
    for (name, covered) in &c.files {
        match lengths.get(name) {
            Some(&have) if have < covered.bytes() => {
                return Err(Distrust::Corruption(format!(
                    "it covers {} bytes of {name}, which has {have}",
                    covered.bytes()
                )));
            }
            Some(_) => {
                on_disk.insert(name.clone(), *covered);
            }
            None => {
                let confirmed = match (segment_number(name), covered) {
                    (Some(n), Covered::Checked { len, crc32 }) => archive.confirms(n, *len, *crc32),
                    _ => false,
                };
                if !confirmed {
                    return Err(Distrust::Corruption(format!(
                        "it covers {name}, which is gone without archive.json confirming it shipped"
                    )));
                }
            }
        }
    }
    let uncounted = (c.retired_through + 1..=gone_through)
        .chain(gaps.iter().copied().filter(|&n| n > c.retired_through))
        .find(|&n| !c.files.contains_key(&segment_name(n)));
    if let Some(n) = uncounted {
        return Err(Distrust::Corruption(format!(
            "segment {n} is gone and it does not count that segment's readings"
        )));
    }
    let unconfirmed_leftover = lengths
        .iter()
        .filter_map(|(name, &len)| Some((segment_number(name)?, name, len)))
        .filter(|&(n, _, _)| n <= c.retired_through)
        .find(|&(n, name, len)| !leftover_shipped(dir, archive, n, name, len));
    if let Some((n, _, _)) = unconfirmed_leftover {
        return Err(Distrust::Corruption(format!(
            "it says segments up to {} were retired, but segment {n} is here and archive.json \
             does not confirm S3 holds it",
            c.retired_through
        )));
    }
    Ok(on_disk)
}

/// The CRC-32 state of the covered bytes as the checkpoint recorded it, to be continued
/// by appends, without reading them: start-up time must not grow with the store. The
/// bytes are checked after start (`check_covered_later`) and by `verify`.
fn trust_covered(files: &BTreeMap<String, Covered>) -> Result<BTreeMap<String, Hasher>, Distrust> {
    files
        .iter()
        .map(|(name, covered)| match *covered {
            Covered::Checked { len, crc32 } => {
                Ok((name.clone(), Hasher::new_with_initial_len(crc32, len)))
            }
            Covered::Unchecked(_) => Err(Distrust::Corruption(NO_CHECKSUMS.into())),
        })
        .collect()
}

/// Reads, on a thread of its own, the bytes the start-up checkpoint covers and checks
/// each file's CRC-32. A file whose covered bytes changed (bit rot, a restore gone
/// wrong) is logged as an error and counted (`on_corrupt`): the statistics keep what was
/// acknowledged (replaying the damaged lines would accept their seqs again), the
/// shipper refuses to ship it, and `sensor-server verify` lists its damaged lines.
pub(crate) fn check_covered_later(
    dir: PathBuf,
    files: BTreeMap<String, Covered>,
    on_corrupt: impl Fn() + Send + 'static,
) -> io::Result<()> {
    let check = move || {
        for (name, covered) in files {
            let Covered::Checked { len, crc32 } = covered else {
                continue;
            };
            match crc_of_prefix(&dir.join(&name), len) {
                Ok(crc) if crc.clone().finalize() == crc32 => {}
                Ok(_) => {
                    on_corrupt();
                    error!(
                        "store: {}: its first {len} bytes changed since they were stored \
                         (corruption on disk); the statistics keep what was acknowledged, \
                         it is not shipped; `sensor-server verify` lists the damaged lines",
                        dir.join(&name).display()
                    );
                }
                // Retention may have deleted it since start-up.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!("store: cannot check {name}: {e}"),
            }
        }
    };
    std::thread::Builder::new()
        .name("store-check".into())
        .spawn(check)
        .map(drop)
}

/// Whether segment `n` (`name`, `len` bytes), left behind by a retention a crash
/// interrupted, is in S3 and may be deleted: `archive.json` records exactly these bytes
/// (one from before records, version 1, only had its watermark to say so).
fn leftover_shipped(dir: &Path, archive: &ArchiveState, n: u64, name: &str, len: u64) -> bool {
    if archive.store_id.is_empty() {
        return n <= archive.shipped_through;
    }
    crc_of_prefix(&dir.join(name), len).is_ok_and(|crc| archive.confirms(n, len, crc.finalize()))
}

/// The statistics of the files with these `lengths` as the running store knows them:
/// its newest checkpoint with this `retired_through` that covers no more than the files
/// hold, plus a replay of what follows it (no CRC check: the files were checked at
/// start-up and only this process writes them).
pub(crate) fn load(
    dir: &Path,
    lengths: &BTreeMap<String, u64>,
    retired_through: u64,
) -> io::Result<Sensors> {
    let fits = |c: &Checkpoint| {
        c.retired_through == retired_through
            && c.files.iter().all(|(name, covered)| {
                lengths
                    .get(name)
                    .is_some_and(|&have| have >= covered.bytes())
            })
    };
    let checkpoint =
        [CHECKPOINT, CHECKPOINT_PREV].into_iter().find_map(|name| {
            match read_checkpoint(dir, name) {
                CheckpointRead::Found(c) if fits(&c) => Some(c),
                _ => None,
            }
        });
    let (covered, mut sensors) = match checkpoint {
        Some(c) => (c.files, c.sensors),
        None => (BTreeMap::new(), Sensors::default()),
    };
    for (name, &len) in lengths {
        let from = covered.get(name).map_or(0, |c| c.bytes());
        replay(
            &dir.join(name),
            from,
            len,
            &mut sensors,
            &mut Hasher::new(),
            &mut |problem| warn!("store: {problem}, skipped"),
        )?;
    }
    Ok(sensors)
}

/// Checks that every byte the checkpoint covers is what it was: per file, the CRC-32 of
/// the covered bytes. Returns their hashers (to be continued), or what does not match.
pub(super) fn check_covered(
    dir: &Path,
    files: &BTreeMap<String, Covered>,
) -> Result<BTreeMap<String, Hasher>, Distrust> {
    let mut crcs = BTreeMap::new();
    for (name, covered) in files {
        let Covered::Checked { len, crc32 } = *covered else {
            return Err(Distrust::Corruption(NO_CHECKSUMS.into()));
        };
        let crc = crc_of_prefix(&dir.join(name), len)?;
        if crc.clone().finalize() != crc32 {
            return Err(Distrust::Corruption(format!(
                "it does not match {name}: its first {len} bytes changed since it was written"
            )));
        }
        crcs.insert(name.clone(), crc);
    }
    Ok(crcs)
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
