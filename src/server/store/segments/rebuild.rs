//! `sensor-server rebuild`: an incomplete store made whole from the archive.

use super::*;

impl Store {
    /// Makes an incomplete store whole from the archive (`sensor-server rebuild`):
    /// `fetch(n)` puts the bytes S3 holds of gone segment `n` into a file and returns it
    /// with its object key. Every gone segment and every file on disk is replayed in the
    /// order start-up replays them; the segments gone from the middle are recorded in
    /// `archive.json` as in S3; then a checkpoint that counts everything is written, so
    /// the next start is complete. Fetched files are removed once replayed.
    pub fn rebuild(
        &mut self,
        fetch: &mut dyn FnMut(u64) -> io::Result<(PathBuf, String)>,
    ) -> io::Result<Sensors> {
        if self.incomplete.is_none() {
            return Err(io::Error::other(
                "the store is complete: nothing to rebuild",
            ));
        }
        let on_disk: std::collections::BTreeSet<u64> = self
            .lengths
            .keys()
            .filter_map(|n| segment_number(n))
            .collect();
        let gaps: Vec<u64> = (self.retired_through + 1..self.active_number)
            .filter(|n| !on_disk.contains(n))
            .collect();
        // By name, as start-up replays: what is on disk, and what is gone.
        let mut order: BTreeMap<String, Option<u64>> = self
            .lengths
            .keys()
            .map(|name| (name.clone(), None))
            .collect();
        for n in (1..=self.retired_through).chain(gaps.iter().copied()) {
            order.insert(segment_name(n), Some(n));
        }
        let mut sensors = Sensors::default();
        let mut archive = self
            .archive
            .take()
            .unwrap_or_else(|| ArchiveState::new(&self.store_id));
        let mut covered = self.covered(&self.lengths);
        for (name, gone) in order {
            let Some(n) = gone else {
                let path = self.options.dir.join(&name);
                replay_logged(
                    &path,
                    self.lengths[&name],
                    &mut sensors,
                    &mut Default::default(),
                )?;
                continue;
            };
            let (path, key) = fetch(n)?;
            let bytes = fs::read(&path);
            let len = bytes.as_ref().map_or(0, |b| b.len() as u64);
            let mut crc = crc32fast::Hasher::new();
            let replayed = replay_logged(&path, len, &mut sensors, &mut crc);
            let _ = fs::remove_file(&path);
            let bytes = bytes?;
            replayed?;
            if gaps.contains(&n) {
                let crc32 = crc.finalize();
                let sha256 = files::sha256_hex(&bytes);
                archive.segments.insert(
                    n,
                    ShippedSegment {
                        bytes: len,
                        crc32,
                        sha256,
                        key,
                    },
                );
                covered.insert(name, Covered::Checked { len, crc32 });
            }
        }
        archive.save(&self.options.dir)?;
        Checkpoint::new(
            &self.store_id,
            covered,
            sensors.clone(),
            self.retired_through,
            self.options.dir.clone(),
            self.files_to_sync(),
        )
        .write()?;
        self.archive = Some(archive);
        self.incomplete = None;
        self.metrics.set_unavailable(None);
        Ok(sensors)
    }
}
