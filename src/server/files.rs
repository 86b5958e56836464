//! The store's files as they lie on disk: segment names, the checkpoint and its format,
//! replacing a file atomically, and the directory syncs that make new names durable.
//! Shared by the running store (`store.rs`), start-up and `verify` (`recovery.rs`) and
//! the shipper (`archive.rs`), so none of them depends on another for these.

use crate::server::stats::Sensors;
use log::info;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) const CHECKPOINT: &str = "checkpoint.json";
/// The archive's watermark: every segment up to it is confirmed by S3.
pub const ARCHIVE_STATE: &str = "archive.json";
const SEGMENT_PREFIX: &str = "segment-";

/// How much of one file a checkpoint covers, and the CRC-32 of those bytes, so that
/// start-up notices when covered bytes changed (corruption the lengths alone miss).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Covered {
    Checked {
        len: u64,
        crc32: u32,
    },
    /// Written by a version without checksums: start-up replays everything once.
    Unchecked(u64),
}

impl Covered {
    pub fn bytes(&self) -> u64 {
        match *self {
            Covered::Checked { len, .. } | Covered::Unchecked(len) => len,
        }
    }
}

/// Per-sensor statistics and the part of each `*.jsonl` file they cover.
#[derive(Serialize, Deserialize)]
pub struct Checkpoint {
    version: u32,
    pub(crate) files: BTreeMap<String, Covered>,
    pub(crate) sensors: Sensors,
    /// Segments numbered up to this were deleted by retention (see the module doc).
    #[serde(default)]
    pub(crate) retired_through: u64,
    #[serde(skip)]
    dir: PathBuf,
    /// Files whose appends the checkpoint counts and that must be synced before it is
    /// written: sealed segments still waiting for their sync, and the active one.
    #[serde(skip)]
    unsynced: Vec<Arc<File>>,
}

impl Checkpoint {
    /// A checkpoint of `sensors`, covering `files`, to be written into `dir` once the
    /// files in `unsynced` (whose appends it counts) are synced.
    pub fn new(
        files: BTreeMap<String, Covered>,
        sensors: Sensors,
        retired_through: u64,
        dir: PathBuf,
        unsynced: Vec<Arc<File>>,
    ) -> Checkpoint {
        Checkpoint {
            version: 2,
            files,
            sensors,
            retired_through,
            dir,
            unsynced,
        }
    }
}

impl Checkpoint {
    /// Syncs the data the checkpoint covers, then replaces `checkpoint.json` atomically
    /// (which also syncs the directory).
    pub fn write(&self) -> io::Result<()> {
        for file in &self.unsynced {
            file.sync_data()?;
        }
        write_atomically(&self.dir, CHECKPOINT, &serde_json::to_vec(self)?)
    }
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the new content,
/// never a mix: a synced temporary file renamed over it, then the directory synced.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Deletes segments that `Store::retire` gave up, once the checkpoint recording that
/// is written.
pub fn delete_retired(victims: &[PathBuf]) -> io::Result<()> {
    for path in victims {
        match fs::remove_file(path) {
            Ok(()) => info!("store: retention deleted {} (shipped)", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match victims.first().and_then(|p| p.parent()) {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// The file name of segment `number`.
pub fn segment_name(number: u64) -> String {
    format!("{SEGMENT_PREFIX}{number:010}.jsonl")
}

/// The number of a segment's file name; `None` for any other file.
pub fn segment_number(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The watermark persisted in `archive.json`.
#[derive(Serialize, Deserialize)]
struct ArchiveState {
    version: u32,
    /// Every segment up to this number is confirmed by S3.
    shipped_through: u64,
}

/// Records, atomically, that every segment up to `through` is confirmed by S3.
pub fn save_archive_watermark(dir: &Path, through: u64) -> io::Result<()> {
    let state = ArchiveState {
        version: 1,
        shipped_through: through,
    };
    write_atomically(dir, ARCHIVE_STATE, &serde_json::to_vec(&state)?)
}

/// The archive's watermark in `dir` (0 when there is none); an unreadable one is an
/// error that names the file.
pub fn archive_watermark(dir: &Path) -> io::Result<u64> {
    match fs::read(dir.join(ARCHIVE_STATE)) {
        Ok(text) => serde_json::from_slice::<ArchiveState>(&text)
            .map(|s| s.shipped_through)
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is unreadable ({e}); fix or remove it",
                        dir.join(ARCHIVE_STATE).display()
                    ),
                )
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// What `archive.json` in `dir` confirms as shipped (0 when there is no readable one):
/// start-up deletes a retired segment only when this confirms it too.
pub fn confirmed_through(dir: &Path) -> u64 {
    archive_watermark(dir).unwrap_or(0)
}
