//! `sensor-server verify`: reads every byte of a store and reports what start-up would
//! skip, distrust or refuse, without changing anything. Shares recovery's rules
//! (`recovery.rs`), so the two cannot disagree about a store.

use crate::server::store::files::{
    ARCHIVE_STATE, ArchiveState, CHECKPOINT, CHECKPOINT_PREV, CheckpointRead, STORE_ID,
    read_archive_state, read_checkpoint, read_store_id, segment_name,
};
use crate::server::store::recovery::{
    Distrust, check_covered, gone_description, judge, missing_segments, store_files,
};
use crate::server::store::replay::replay;
use crate::server::store::stats::Sensors;
use crc32fast::Hasher;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// What `verify` found.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// Corrupt or torn lines, and checkpoint mismatches.
    pub problems: usize,
    /// Valid records, and the statistics they give (what a full replay counts).
    pub records: u64,
    pub sensors: Sensors,
}

/// `sensor-server verify`: reads the store in `dir` without changing anything and
/// prints every corrupt or torn line with its file and byte offset, and every way the
/// checkpoint does not match the files.
pub fn verify(dir: &Path, out: &mut dyn std::io::Write) -> io::Result<VerifyReport> {
    check_is_store(dir)?;
    let mut v = Verifier {
        dir,
        out,
        problems: 0,
    };
    let (lengths, crcs, sensors) = v.replay_every_file()?;
    let records = sensors.values().map(|s| s.count).sum::<u64>();
    let store_id = match read_store_id(dir) {
        Ok(id) => id.unwrap_or_default(),
        Err(e) => {
            v.report(e.to_string())?;
            String::new()
        }
    };
    let archive = match read_archive_state(dir) {
        Ok(state) => state.unwrap_or_default(),
        Err(e) => {
            v.report(e.to_string())?;
            ArchiveState::default()
        }
    };
    for problem in archive_problems(&archive, &store_id, &lengths, &crcs) {
        v.report(format!("{}: {problem}", dir.join(ARCHIVE_STATE).display()))?;
    }
    v.check_checkpoints(&lengths, &archive, &store_id)?;
    let problems = v.problems;
    writeln!(
        v.out,
        "{}: {} files, {records} valid records, {} sensors, {problems} problems",
        dir.display(),
        lengths.len(),
        sensors.len()
    )?;
    Ok(VerifyReport {
        problems,
        records,
        sensors,
    })
}

/// Each file's CRC-32 by name.
type FileCrcs = BTreeMap<String, u32>;

/// One `verify` run: where it writes and what it has found so far.
struct Verifier<'a> {
    dir: &'a Path,
    out: &'a mut dyn std::io::Write,
    problems: usize,
}

impl Verifier<'_> {
    fn report(&mut self, problem: String) -> io::Result<()> {
        self.problems += 1;
        writeln!(self.out, "{problem}")
    }

    /// Every store file's length and CRC-32, and the statistics of all of them, with
    /// each line that is not a record reported.
    fn replay_every_file(&mut self) -> io::Result<(BTreeMap<String, u64>, FileCrcs, Sensors)> {
        let (mut lengths, mut crcs, mut sensors) =
            (BTreeMap::new(), FileCrcs::new(), Sensors::default());
        for name in store_files(self.dir)? {
            let path = self.dir.join(&name);
            let len = fs::metadata(&path)?.len();
            let mut crc = Hasher::new();
            let mut write_error = Ok(());
            replay(&path, 0, len, &mut sensors, &mut crc, &mut |problem| {
                if write_error.is_ok() {
                    write_error = self.report(problem.to_string());
                }
            })?;
            write_error?;
            crcs.insert(name.clone(), crc.finalize());
            lengths.insert(name, len);
        }
        Ok((lengths, crcs, sensors))
    }

    /// Each checkpoint judged as start-up judges it, and the covered bytes read: a
    /// store whose gone segments no usable checkpoint counts is a problem.
    fn check_checkpoints(
        &mut self,
        lengths: &BTreeMap<String, u64>,
        archive: &ArchiveState,
        store_id: &str,
    ) -> io::Result<()> {
        let dir = self.dir;
        let (gone_through, gaps) = missing_segments(lengths);
        let mut usable = false;
        for name in [CHECKPOINT, CHECKPOINT_PREV] {
            match read_checkpoint(dir, name) {
                CheckpointRead::Absent => {}
                CheckpointRead::Damaged(why) => self.report(format!("{}: {why}", dir.display()))?,
                CheckpointRead::Found(c) => {
                    let judged = judge(dir, &c, lengths, archive, store_id, gone_through, &gaps)
                        .and_then(|on_disk| check_covered(dir, &on_disk));
                    match judged {
                        Ok(_) => usable = true,
                        Err(Distrust::Io(e)) => return Err(e),
                        // An older checkpoint need not fit what retention did since.
                        Err(Distrust::Corruption(_)) if name == CHECKPOINT_PREV => {}
                        Err(Distrust::Corruption(why)) => {
                            self.report(format!("{}: {why}", dir.join(name).display()))?
                        }
                    }
                }
            }
        }
        if !usable && (gone_through > 0 || !gaps.is_empty()) {
            self.report(format!(
                "{}: {} gone and no usable checkpoint counts them: the server would refuse \
                 readings until they are back or `sensor-server rebuild` fetched them from the archive",
                dir.display(),
                gone_description(gone_through, &gaps)
            ))?;
        }
        Ok(())
    }
}

/// Refuses a path that is not a store: missing, not a directory, or a directory with
/// none of a store's files (a mistyped path must not pass as a clean, empty store).
pub(crate) fn check_is_store(dir: &Path) -> io::Result<()> {
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} {why}", dir.display()),
        ))
    };
    if !dir.exists() {
        return refuse("does not exist");
    }
    if !dir.is_dir() {
        return refuse("is not a directory (a store is a directory of segment files)");
    }
    let is_store = dir.join(STORE_ID).exists()
        || dir.join(CHECKPOINT).exists()
        || !store_files(dir)?.is_empty();
    if !is_store {
        return refuse("holds no sensorhub store (no store-id, checkpoint or *.jsonl files)");
    }
    Ok(())
}

/// Where `archive.json` does not match the store: another store's, or a shipped segment
/// whose file is not what S3 confirmed (the server ships it again, deletes nothing).
pub(crate) fn archive_problems(
    archive: &ArchiveState,
    store_id: &str,
    lengths: &BTreeMap<String, u64>,
    crcs: &BTreeMap<String, u32>,
) -> Vec<String> {
    if !archive.store_id.is_empty() && archive.store_id != store_id {
        return vec![format!(
            "it belongs to store {}, not to this one ({store_id}); the server sets it aside \
             and ships every segment again",
            archive.store_id
        )];
    }
    let mut problems = Vec::new();
    for (&n, shipped) in &archive.segments {
        let name = segment_name(n);
        let (Some(&len), Some(&crc)) = (lengths.get(&name), crcs.get(&name)) else {
            continue;
        };
        if (len, crc) != (shipped.bytes, shipped.crc32) {
            problems.push(format!(
                "segment {n} was shipped as {} bytes with CRC-32 {:08x}, but {name} has {len} \
                 bytes with CRC-32 {crc:08x}; the server ships it again and never deletes it",
                shipped.bytes, shipped.crc32
            ));
        }
    }
    problems
}
