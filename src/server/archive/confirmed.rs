//! What S3 confirmed, segment by segment (`archive.json`): recorded by the shipper
//! once `head-object` showed the exact bytes, read by retention before it deletes.

use crate::server::store::files::{ArchiveState, ShippedSegment};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};

/// What S3 confirmed (`archive.json`), shared by the shipper, which records, and
/// retention, which deletes only what it confirms. The record changes in memory first
/// and is then saved: on a full disk the save fails, but retention can still free space
/// for it (a crash before the save only makes the next start check those objects again).
pub(crate) struct Confirmed {
    dir: PathBuf,
    state: Mutex<ArchiveState>,
    /// Bumped by every record, so retention knows when to look again.
    version: AtomicU64,
}

impl Confirmed {
    pub(crate) fn new(dir: &Path, state: ArchiveState) -> Confirmed {
        Confirmed {
            dir: dir.to_owned(),
            state: Mutex::new(state),
            version: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ArchiveState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True when S3 holds exactly segment `number`: `bytes` long with this CRC-32.
    pub(crate) fn confirms(&self, number: u64, bytes: u64, crc32: u32) -> bool {
        self.lock().confirms(number, bytes, crc32)
    }

    /// Changes whenever a segment is recorded.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Relaxed)
    }

    /// True when S3 holds segment `number` (whatever its file holds now).
    pub(super) fn holds(&self, number: u64) -> bool {
        self.lock().segments.contains_key(&number)
    }

    /// Every segment up to this is in S3.
    pub(crate) fn through(&self) -> u64 {
        self.lock().shipped_through
    }

    /// Records that S3 holds `segment` as segment `number` and saves the record.
    pub(super) fn record(&self, number: u64, segment: ShippedSegment) -> io::Result<()> {
        let mut state = self.lock();
        state.shipped_through = state.shipped_through.max(number);
        state.segments.insert(number, segment);
        self.version.fetch_add(1, Relaxed);
        state.save(&self.dir)
    }

    /// Forgets the records of segments retention deleted (up to `number`); saved with
    /// the next record.
    pub(crate) fn forget_through(&self, number: u64) {
        self.lock().segments.retain(|&n, _| n > number);
    }

    /// Saves the record (at the end, in case the last save failed).
    pub(super) fn save(&self) -> io::Result<()> {
        self.lock().save(&self.dir)
    }
}
