//! Retention: the oldest shipped segments past the local budget retired, in three
//! steps so that the checkpoint's syncs run outside the ledger lock.

use super::*;

impl Store {
    /// Retires the oldest sealed segments, while the shipped segments on disk exceed
    /// `keep_bytes`, stopping at the first that `confirmed(number, bytes, crc32)` does
    /// not say S3 holds exactly: writes a checkpoint that records them as retired (with
    /// `sensors`, the statistics that include them; on a full disk the space reserve
    /// makes room for it), and only then forgets them. Returns the files to delete
    /// (`delete_retired`), which a crash may leave behind without harm. If the
    /// checkpoint cannot be written nothing changes and the next call tries again.
    /// Nothing is retired while the statistics are incomplete.
    ///
    /// The committer does the same in three steps, so that the checkpoint's syncs run
    /// outside the ledger lock: `plan_retirement` (locked), `Retirement::write`
    /// (unlocked), `complete_retirement` (locked).
    #[cfg(test)]
    pub fn retire(
        &mut self,
        confirmed: &dyn Fn(u64, u64, u32) -> bool,
        keep_bytes: u64,
        sensors: &Sensors,
    ) -> io::Result<Vec<PathBuf>> {
        let Some(retirement) = self.plan_retirement(confirmed, keep_bytes, sensors) else {
            return Ok(Vec::new());
        };
        retirement.write()?;
        Ok(self.complete_retirement(retirement))
    }

    /// What retiring would do now (see `retire`), or `None` when nothing is due. Only
    /// reads the store: until `complete_retirement` nothing changes, whatever is
    /// appended or sealed meanwhile.
    pub fn plan_retirement(
        &self,
        confirmed: &dyn Fn(u64, u64, u32) -> bool,
        keep_bytes: u64,
        sensors: &Sensors,
    ) -> Option<Retirement> {
        if self.incomplete.is_some() {
            return None;
        }
        let shipped: Vec<(u64, String, u64)> = self
            .lengths
            .iter()
            .filter_map(|(name, &len)| Some((segment_number(name)?, name, len)))
            .take_while(|&(number, name, len)| {
                number < self.active_number && confirmed(number, len, self.crc32_of(name))
            })
            .map(|(number, name, len)| (number, name.clone(), len))
            .collect();
        let mut on_disk: u64 = shipped.iter().map(|(_, _, len)| len).sum();
        let mut kept = self.lengths.clone();
        let mut retired_through = self.retired_through;
        let mut victims = Vec::new();
        for (number, name, len) in shipped {
            if on_disk <= keep_bytes {
                break;
            }
            on_disk -= len;
            kept.remove(&name);
            retired_through = retired_through.max(number);
            victims.push(name);
        }
        (!victims.is_empty()).then(|| Retirement {
            checkpoint: self.checkpoint_of(&kept, sensors.clone(), retired_through),
            victims,
            retired_through,
        })
    }

    /// Forgets the segments of a retirement whose checkpoint was written; returns their
    /// files, to delete.
    pub fn complete_retirement(&mut self, retirement: Retirement) -> Vec<PathBuf> {
        let Retirement {
            victims,
            retired_through,
            ..
        } = retirement;
        for name in &victims {
            self.crcs.remove(name);
            self.lengths.remove(name);
        }
        self.retired_through = self.retired_through.max(retired_through);
        self.sealed_crcs.lock().retain(|&n, _| n > retired_through);
        self.metrics
            .retired_segments
            .fetch_add(victims.len() as u64, Relaxed);
        self.publish_sizes();
        victims
            .iter()
            .map(|name| self.options.dir.join(name))
            .collect()
    }
}

/// Segments chosen for retirement and the checkpoint that records them as retired,
/// which must be written (`write`, no lock needed) before the store forgets them
/// (`Store::complete_retirement`).
pub struct Retirement {
    checkpoint: Checkpoint,
    victims: Vec<String>,
    retired_through: u64,
}

impl Retirement {
    /// Syncs what the checkpoint covers and writes it (using the space reserve on a full
    /// disk: retention is what frees space).
    pub fn write(&self) -> io::Result<()> {
        self.checkpoint.write_using_reserve()
    }
}
