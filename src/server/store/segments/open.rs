//! Opening a store: the directory locked, recovery run, `archive.json` checked against
//! the files, numbering continued after what the archive holds, the active segment
//! opened (or created).

use super::*;
use std::fs::OpenOptions;

impl Store {
    /// Opens (creating if needed) the store in `options.dir` and rebuilds every sensor's
    /// statistics from it.
    pub fn open(options: StoreOptions) -> io::Result<(Store, Sensors)> {
        let lock = lock_dir(&options.dir)?;
        probe_writable(&options.dir)?;
        let dir = &options.dir;
        let store_id = files::store_id(dir)?;
        let archive = own_archive_state(dir, &store_id)?;
        let started = Instant::now();
        let recovered = recover(dir, &store_id, &archive)?;
        info!(
            "store {} ({store_id}): {} files, {} sensors, replayed {} bytes in {:.3}s",
            dir.display(),
            recovered.lengths.len(),
            recovered.sensors.len(),
            recovered.replayed,
            started.elapsed().as_secs_f64()
        );
        let Recovered {
            mut lengths,
            mut crcs,
            sensors,
            mut retired_through,
            incomplete,
            unchecked,
            ..
        } = recovered;
        let jumped = skip_archived_numbers(&lengths, &archive, &mut retired_through);
        let (active, active_name, active_number) = open_active(dir, &lengths, retired_through)?;
        let active_len = active.metadata()?.len();
        lengths.insert(active_name.clone(), active_len);
        crcs.entry(active_name.clone()).or_default();
        let metrics = Arc::new(StoreMetrics::new(incomplete.clone()));
        let mut store = Store {
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
            incomplete,
            archive: None,
            store_id,
            sealed_crcs: Arc::new(SealedCrcs::default()),
            watermarks: Arc::new(Watermarks::new(active_number - 1)),
            metrics,
            _lock: lock,
        };
        let sealed: BTreeMap<u64, u32> = store
            .lengths
            .keys()
            .filter_map(|name| Some((segment_number(name)?, store.crc32_of(name))))
            .filter(|&(n, _)| n < store.active_number)
            .collect();
        *store.sealed_crcs.lock() = sealed;
        let metrics = store.metrics.clone();
        recovery::check_covered_later(store.options.dir.clone(), unchecked, move || {
            metrics.corrupt_files.fetch_add(1, Relaxed);
        })?;
        store.archive = Some(store.check_archive(archive));
        if jumped && let Some(checkpoint) = store.checkpoint(sensors.clone()) {
            // Without it, the next start would find segments below the first one gone
            // and no checkpoint counting them.
            checkpoint.write()?;
        }
        files::ensure_reserve(&store.options.dir, 0);
        store.publish_sizes();
        Ok((store, sensors))
    }

    /// `archive.json` as this store can trust it: another store's is set aside, one
    /// from before stores had ids is adopted, and the watermark goes back to the first
    /// shipped segment whose file is not what S3 confirmed (or that has no record), so
    /// that segment ships again and is never deleted as shipped.
    fn check_archive(&self, mut archive: ArchiveState) -> ArchiveState {
        if archive.store_id.is_empty() {
            // Version 1 kept only the watermark: the files below it are taken as shipped.
            archive.store_id = self.store_id.clone();
            archive.version = 2;
            for (name, &bytes) in &self.lengths {
                match segment_number(name) {
                    Some(n) if n <= archive.shipped_through && n < self.active_number => {
                        archive.segments.insert(
                            n,
                            ShippedSegment {
                                bytes,
                                crc32: self.crc32_of(name),
                                sha256: String::new(),
                                key: String::new(),
                            },
                        );
                    }
                    _ => {}
                }
            }
        }
        let mismatch = self.lengths.iter().find_map(|(name, &bytes)| {
            let n = segment_number(name)?;
            if n > archive.shipped_through {
                return None;
            }
            match archive.segments.get(&n) {
                Some(s) if (s.bytes, s.crc32) == (bytes, self.crc32_of(name)) => None,
                Some(_) => Some((n, "differs from what S3 confirmed")),
                None => Some((n, "has no record of what was shipped")),
            }
        });
        if let Some((n, why)) = mismatch {
            warn!(
                "store: {ARCHIVE_STATE} says segments up to {} are shipped, but {} {why}; \
                 shipping again from it",
                archive.shipped_through,
                segment_name(n)
            );
            archive.shipped_through = n - 1;
            archive.segments.retain(|&k, _| k < n);
        }
        archive
    }
}

/// Moves `archive.json` of store `foreign` aside as `archive.json.foreign`.
/// `archive.json` unless it is another store's, which is never believed, not even by
/// recovery (it could confirm segments of this store as shipped that are not).
fn own_archive_state(dir: &Path, store_id: &str) -> io::Result<ArchiveState> {
    Ok(match files::read_archive_state(dir)? {
        Some(archive) if !archive.store_id.is_empty() && archive.store_id != store_id => {
            set_foreign_archive_aside(dir, &archive.store_id, store_id);
            ArchiveState::new(store_id)
        }
        Some(archive) => archive,
        None => ArchiveState::new(store_id),
    })
}

/// Numbers the archive holds are never used again, even when their files are gone: a
/// new segment under an old number would be taken for the shipped one. True if
/// numbering jumped past them (with no segment on disk).
fn skip_archived_numbers(
    lengths: &BTreeMap<String, u64>,
    archive: &ArchiveState,
    retired_through: &mut u64,
) -> bool {
    let archived = archive
        .segments
        .keys()
        .next_back()
        .copied()
        .unwrap_or(0)
        .max(archive.shipped_through);
    let no_segments = lengths.keys().all(|name| segment_number(name).is_none());
    let jumped = no_segments && archived > *retired_through;
    if jumped {
        warn!(
            "store: no segment is on disk but {ARCHIVE_STATE} records segments up to {archived} \
             as shipped; numbering goes on after them (their readings are not in the statistics)"
        );
        *retired_through = archived;
    }
    jumped
}

fn set_foreign_archive_aside(dir: &Path, foreign: &str, this: &str) {
    let aside = dir.join(format!("{ARCHIVE_STATE}.foreign"));
    warn!(
        "store: {ARCHIVE_STATE} belongs to store {foreign}, not to this one ({this}); moved it \
         to {} and shipping every segment on disk",
        aside.display()
    );
    if let Err(e) = fs::rename(dir.join(ARCHIVE_STATE), &aside) {
        warn!("store: cannot move {ARCHIVE_STATE} aside ({e}); it is ignored");
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
