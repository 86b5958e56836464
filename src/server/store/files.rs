//! The store's files as they lie on disk: segment names, the store's identity, the
//! checkpoint and its format, the archive's record (`archive.json`), and the space reserve. (Replacing a file atomically and syncing a directory live in
//! `crate::disk`, which the client's spool uses too.)
//! Shared by the running store (`store.rs`), start-up and `verify` (`recovery.rs`) and
//! the shipper (`archive.rs`), so none of them depends on another for these.
//!
//! - `store-id`: 16 hex digits made when the store is created. The checkpoint and
//!   `archive.json` name it, and so does every archived object's key, so neither state
//!   file copied from another store, nor two stores shipping under one host id, can make
//!   this store skip, delete or overwrite anything.
//! - `checkpoint.json` (and `checkpoint.prev.json`, the one it replaced): an envelope
//!   `{"version":3,"crc32":C,"body":{...}}` whose CRC-32 covers the body's bytes, so a
//!   damaged checkpoint is never believed.
//! - `archive.json`: what S3 confirmed, per segment still on disk: its length, CRC-32
//!   and SHA-256 and the object key, and the watermark below which everything is in S3.
//! - `space.reserve`: zeros kept so that, on a full disk, retention can still write the
//!   checkpoint that lets it delete shipped segments.

use crate::server::store::stats::Sensors;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::disk::{sync_dir, write_atomically, write_synced_tmp};

pub(crate) const CHECKPOINT: &str = "checkpoint.json";
/// The checkpoint `checkpoint.json` replaced: used when the newest one is damaged.
pub(crate) const CHECKPOINT_PREV: &str = "checkpoint.prev.json";
/// What S3 confirmed (see the module doc).
pub(crate) const ARCHIVE_STATE: &str = "archive.json";
pub(crate) const STORE_ID: &str = "store-id";
const RESERVE: &str = "space.reserve";
/// The smallest space reserve; it grows to twice the largest checkpoint written.
const MIN_RESERVE: u64 = 256 * 1024;
const SEGMENT_PREFIX: &str = "segment-";

/// How much of one file a checkpoint covers, and the CRC-32 of those bytes, so that
/// start-up notices when covered bytes changed (corruption the lengths alone miss).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
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
    /// The store this checkpoint belongs to (empty: written before stores had ids).
    #[serde(default)]
    pub(crate) store_id: String,
    pub(crate) files: BTreeMap<String, Covered>,
    pub(crate) sensors: Sensors,
    /// Segments numbered up to this were deleted by retention (their readings are in
    /// `sensors`), or were gone before this store's statistics began.
    #[serde(default)]
    pub(crate) retired_through: u64,
    #[serde(skip)]
    dir: PathBuf,
    /// Files whose appends the checkpoint counts and that must be synced before it is
    /// written: sealed segments still waiting for their sync, and the active one.
    #[serde(skip)]
    unsynced: Vec<Arc<File>>,
}

/// What reading one checkpoint file gave.
pub(crate) enum CheckpointRead {
    Absent,
    /// Unreadable, cut, or its CRC-32 does not match its body: the reason.
    Damaged(String),
    Found(Checkpoint),
}

impl Checkpoint {
    /// A checkpoint of `sensors`, covering `files`, to be written into `dir` once the
    /// files in `unsynced` (whose appends it counts) are synced.
    pub fn new(
        store_id: &str,
        files: BTreeMap<String, Covered>,
        sensors: Sensors,
        retired_through: u64,
        dir: PathBuf,
        unsynced: Vec<Arc<File>>,
    ) -> Checkpoint {
        Checkpoint {
            version: 3,
            store_id: store_id.to_owned(),
            files,
            sensors,
            retired_through,
            dir,
            unsynced,
        }
    }

    /// Syncs the data the checkpoint covers, then replaces `checkpoint.json` atomically,
    /// keeping the one it replaces as `checkpoint.prev.json`.
    pub fn write(&self) -> io::Result<()> {
        self.write_with(false)
    }

    /// `write`, but on a full disk the space reserve is given up to make room: for the
    /// checkpoint retention must write before it can delete (and so free space).
    pub fn write_using_reserve(&self) -> io::Result<()> {
        self.write_with(true)
    }

    fn write_with(&self, may_use_reserve: bool) -> io::Result<()> {
        for file in &self.unsynced {
            file.sync_data()?;
        }
        let body = serde_json::to_string(self)?;
        let envelope = format!(
            "{{\"version\":3,\"crc32\":{},\"body\":{body}}}",
            crc32fast::hash(body.as_bytes())
        );
        let replace = |dir: &Path| -> io::Result<()> {
            let tmp = write_synced_tmp(dir, CHECKPOINT, envelope.as_bytes())?;
            if dir.join(CHECKPOINT).exists() {
                fs::rename(dir.join(CHECKPOINT), dir.join(CHECKPOINT_PREV))?;
            }
            fs::rename(tmp, dir.join(CHECKPOINT))?;
            sync_dir(dir)
        };
        match replace(&self.dir) {
            Err(e) if may_use_reserve && is_disk_full(&e) && release_reserve(&self.dir) => {
                replace(&self.dir)
            }
            result => result,
        }?;
        // Room for the next checkpoint of this size, should the disk fill up.
        if may_use_reserve {
            ensure_reserve(&self.dir, 2 * envelope.len() as u64);
        }
        Ok(())
    }
}

/// Reads `name` (`checkpoint.json` or `checkpoint.prev.json`) in `dir`, checking its
/// CRC-32. Checkpoints of older versions (no envelope) are read as they are.
pub(crate) fn read_checkpoint(dir: &Path, name: &str) -> CheckpointRead {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        crc32: u32,
        #[serde(borrow)]
        body: &'a RawValue,
    }
    let text = match fs::read(dir.join(name)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return CheckpointRead::Absent,
        Err(e) => return CheckpointRead::Damaged(format!("cannot read {name}: {e}")),
    };
    let body = match serde_json::from_slice::<Envelope>(&text) {
        Ok(envelope) if crc32fast::hash(envelope.body.get().as_bytes()) != envelope.crc32 => {
            return CheckpointRead::Damaged(format!(
                "{name}: its CRC-32 does not match its body (damaged)"
            ));
        }
        Ok(envelope) => envelope.body.get().as_bytes(),
        // Versions 1 and 2 had no envelope.
        Err(_) => &text[..],
    };
    match serde_json::from_slice::<Checkpoint>(body) {
        Ok(mut c) => {
            c.dir = dir.to_owned();
            CheckpointRead::Found(c)
        }
        Err(e) => CheckpointRead::Damaged(format!("{name} is unreadable ({e})")),
    }
}

pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Makes sure `space.reserve` holds at least `size` bytes (never less than 256 KiB) of
/// zeros; on a full disk it stays as it is and the next call tries again.
pub(crate) fn ensure_reserve(dir: &Path, size: u64) {
    let size = size.max(MIN_RESERVE);
    let path = dir.join(RESERVE);
    let have = fs::metadata(&path).map_or(0, |m| m.len());
    if have >= size {
        return;
    }
    let grown = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| {
            // Written, not `set_len`: a sparse file would reserve nothing.
            file.write_all(&vec![0; (size - have) as usize])?;
            file.sync_all()
        });
    if let Err(e) = grown {
        // Keep what was there; a partial append is cut back by the next check.
        let _ = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(have));
        if !is_disk_full(&e) {
            warn!("store: cannot keep {RESERVE} ({e})");
        }
    }
}

/// Gives up the space reserve; true when there was one to give.
fn release_reserve(dir: &Path) -> bool {
    let released = fs::remove_file(dir.join(RESERVE)).is_ok();
    if released {
        warn!(
            "store: the disk is full; released {RESERVE} to write the checkpoint retention needs"
        );
    }
    released
}

/// Deletes segments that `Store::retire` gave up, once the checkpoint recording that
/// is written.
pub(crate) fn delete_retired(victims: &[PathBuf]) -> io::Result<()> {
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
pub(crate) fn segment_name(number: u64) -> String {
    format!("{SEGMENT_PREFIX}{number:010}.jsonl")
}

/// The number of a segment's file name; `None` for any other file.
pub(crate) fn segment_number(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// The store's id in `dir`, made (16 random hex digits) when there is none yet. A
/// damaged one is an error: the archive's keys name it.
pub(crate) fn store_id(dir: &Path) -> io::Result<String> {
    match read_store_id(dir)? {
        Some(id) => Ok(id),
        None => {
            let id = format!("{:016x}", rand::random::<u64>());
            write_atomically(dir, STORE_ID, format!("{id}\n").as_bytes())?;
            info!("store {}: new store id {id}", dir.display());
            Ok(id)
        }
    }
}

/// The store's id in `dir`, if it has one.
pub(crate) fn read_store_id(dir: &Path) -> io::Result<Option<String>> {
    let text = match fs::read_to_string(dir.join(STORE_ID)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let id = text.trim();
    if id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(Some(id.to_owned()))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is damaged (expected 16 lowercase hex digits): restore it, since the \
                 archive's object keys name it, or remove it to give the store a new id",
                dir.join(STORE_ID).display()
            ),
        ))
    }
}

/// The hex SHA-256 of a segment's bytes, as `archive.json` records it.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What S3 confirmed of one segment: exactly these bytes are stored under `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippedSegment {
    pub bytes: u64,
    pub crc32: u32,
    /// Hex SHA-256 of the segment's bytes (empty for records migrated from version 1).
    pub sha256: String,
    pub key: String,
}

/// `archive.json`: what S3 confirmed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ArchiveState {
    #[serde(default)]
    pub version: u32,
    /// Empty in version 1 (before stores had ids).
    #[serde(default)]
    pub store_id: String,
    /// Every segment up to this number is in S3 (or was never part of the store).
    pub shipped_through: u64,
    /// Shipped segments still on disk, by number (version 2).
    #[serde(default)]
    pub segments: BTreeMap<u64, ShippedSegment>,
}

impl ArchiveState {
    pub fn new(store_id: &str) -> ArchiveState {
        ArchiveState {
            version: 2,
            store_id: store_id.to_owned(),
            ..ArchiveState::default()
        }
    }

    /// True when S3 holds exactly this segment: `bytes` long with this CRC-32. (A record
    /// is only ever made from S3's confirmation; one above the watermark comes from
    /// `sensor-server rebuild`, for a segment gone from the middle of the store.)
    pub fn confirms(&self, number: u64, bytes: u64, crc32: u32) -> bool {
        self.segments
            .get(&number)
            .is_some_and(|s| s.bytes == bytes && s.crc32 == crc32)
    }

    /// Writes it atomically into `dir`.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        write_atomically(dir, ARCHIVE_STATE, &serde_json::to_vec(self)?)
    }
}

/// `archive.json` in `dir` (`None` when there is none); an unreadable one is an error
/// that names the file and what to do.
pub fn read_archive_state(dir: &Path) -> io::Result<Option<ArchiveState>> {
    match fs::read(dir.join(ARCHIVE_STATE)) {
        Ok(text) => serde_json::from_slice::<ArchiveState>(&text)
            .map(Some)
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is unreadable ({e}); fix it, or remove it to ship every \
                         segment on disk again (S3 keeps one copy per key)",
                        dir.join(ARCHIVE_STATE).display()
                    ),
                )
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
