//! `--spool DIR`: the values read from standard input, kept on disk until answered, so a
//! value once read is resent across reconnects *and* restarts (or a kill -9) of the
//! client.
//!
//! ## Format: `DIR/spool`
//! A header line `sensorhub-spool 1 SENSOR KIND`, then one line per reading in the order
//! read, `SEQ TS VALUE` (decimal integers, and the value's shortest text that reads back
//! to the same number). A batch is appended and synced (`fdatasync`) before any of it is
//! sent, so nothing is acknowledged that a crash could take back.
//!
//! What was answered is not written down reading by reading: at start every reading in
//! the spool is sent again, and the server answers those it already stored `duplicate`,
//! which counts as delivered (the protocol's resend rule). So the spool only needs to be
//! a superset of what is unanswered: it is rewritten without the answered readings once
//! it has doubled (and passed 1 MiB), and emptied when a client ends with everything
//! answered.
//!
//! `DIR` is locked (`flock`) while a client uses it: two clients appending to one spool
//! would interleave their seqs.

use crate::disk::write_atomically;
use log::warn;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const FILE: &str = "spool";
const MAGIC: &str = "sensorhub-spool 1";
/// The spool is rewritten without its answered readings once it is this large and twice
/// what the last rewrite left.
const COMPACT_FROM: u64 = 1 << 20;

/// One reading read from standard input: what is sent, and what the spool keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Spooled {
    pub seq: u64,
    pub ts_ms: u64,
    pub value: f64,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SpoolError {
    #[error("spool {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
    #[error("spool {} is in use by another sensor-client", dir.display())]
    InUse { dir: PathBuf },
    #[error(
        "spool {} holds {what}, not of --sensor {sensor} --kind {kind}; \
         give another --spool (or run the client it belongs to until it ends)",
        path.display()
    )]
    Foreign {
        path: PathBuf,
        what: String,
        sensor: String,
        kind: String,
    },
    #[error(
        "spool {} line {line} is not a reading ({text:?}); nothing was sent. Move the \
         file aside to start afresh (its readings would then not be resent)",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// An open, locked spool, appended to by the thread that reads standard input.
#[derive(Debug)]
pub(super) struct Spool {
    dir: PathBuf,
    header: String,
    file: File,
    /// Bytes in the file: where the next batch goes (and what a failed append is cut
    /// back to, so a retry never follows half a line).
    len: u64,
    /// The length after the last rewrite.
    compacted_len: u64,
    /// Held for the lock.
    _lock: File,
}

impl Spool {
    /// Opens (or creates) the spool in `dir` for `sensor` and `kind`, returning it with
    /// the readings it holds, to be sent again first.
    pub(super) fn open(
        dir: &Path,
        sensor: &str,
        kind: &str,
    ) -> Result<(Spool, Vec<Spooled>), SpoolError> {
        let io = |source| SpoolError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(io(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        fs::create_dir_all(dir).map_err(io)?;
        let lock = File::open(dir).map_err(io)?;
        if lock.try_lock().is_err() {
            return Err(SpoolError::InUse {
                dir: dir.to_path_buf(),
            });
        }
        let header = format!("{MAGIC} {sensor} {kind}\n");
        let path = dir.join(FILE);
        let (len, replay) = match fs::read(&path) {
            Ok(bytes) => read_spool(&path, &bytes, &header, sensor, kind)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, Vec::new()),
            Err(e) => return Err(io(e)),
        };
        if len == 0 {
            write_atomically(dir, FILE, header.as_bytes()).map_err(io)?;
        }
        let file = File::options().append(true).open(&path).map_err(io)?;
        let len = len.max(header.len() as u64);
        if file.metadata().map_err(io)?.len() != len {
            // A torn last line (a crash mid-append): cut it, so the next line starts on a
            // line of its own.
            warn!(
                "spool {}: cut a torn last line left by a crash",
                path.display()
            );
            file.set_len(len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
            header,
            file,
            len,
            compacted_len: len,
            _lock: lock,
        };
        Ok((spool, replay))
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `batch` and syncs it: once this returns, a crash keeps the batch.
    pub(super) fn append(&mut self, batch: &[Spooled]) -> io::Result<()> {
        let mut text = String::with_capacity(batch.len() * 40);
        for r in batch {
            let _ = writeln!(text, "{} {} {}", r.seq, r.ts_ms, r.value);
        }
        let written = self
            .file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += text.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Half a batch may be on disk (a full disk): take it back, so that the
                // retry appends whole lines.
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Rewrites the spool without the readings up to seq `answered` once it has grown
    /// enough for that to be worth it.
    pub(super) fn compact_if_grown(&mut self, answered: u64) -> io::Result<()> {
        if self.len < COMPACT_FROM.max(2 * self.compacted_len) {
            return Ok(());
        }
        let path = self.dir.join(FILE);
        let bytes = fs::read(&path)?;
        let mut text = self.header.clone();
        for line in lines(&bytes).skip(1) {
            if parse_record(line).is_some_and(|r| r.seq > answered) {
                text.push_str(line);
                text.push('\n');
            }
        }
        self.rewrite(&text)
    }

    /// Empties the spool: everything in it was answered.
    pub(super) fn clear(&mut self) -> io::Result<()> {
        let header = self.header.clone();
        self.rewrite(&header)
    }

    fn rewrite(&mut self, text: &str) -> io::Result<()> {
        write_atomically(&self.dir, FILE, text.as_bytes())?;
        self.file = File::options().append(true).open(self.dir.join(FILE))?;
        self.len = text.len() as u64;
        self.compacted_len = self.len;
        Ok(())
    }
}

/// The complete lines of `bytes` (those ending in `\n`), as text where they are UTF-8.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &str> {
    bytes[..complete_len(bytes)]
        .split_inclusive(|&b| b == b'\n')
        .map(|line| std::str::from_utf8(&line[..line.len() - 1]).unwrap_or("\u{FFFD}"))
}

/// The length of `bytes` up to and with its last `\n` (what a crash cannot have torn).
fn complete_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

/// The length of `bytes` up to its last complete line, and the readings in them.
fn read_spool(
    path: &Path,
    bytes: &[u8],
    header: &str,
    sensor: &str,
    kind: &str,
) -> Result<(u64, Vec<Spooled>), SpoolError> {
    let complete = complete_len(bytes);
    let mut lines = lines(bytes);
    let Some(first) = lines.next() else {
        // Nothing, or a header a crash tore: a new spool.
        return Ok((0, Vec::new()));
    };
    if format!("{first}\n") != header {
        let owner = first.strip_prefix(MAGIC).map(str::trim);
        let what = match owner.and_then(|owner| owner.split_once(' ')) {
            Some((sensor, kind)) => format!("readings of sensor {sensor} ({kind})"),
            None => "something that is not a sensorhub spool".to_string(),
        };
        return Err(SpoolError::Foreign {
            path: path.to_path_buf(),
            what,
            sensor: sensor.to_string(),
            kind: kind.to_string(),
        });
    }
    let mut replay = Vec::new();
    for (i, line) in lines.enumerate() {
        match parse_record(line) {
            Some(r) => replay.push(r),
            None => {
                return Err(SpoolError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 2,
                    text: line.chars().take(80).collect(),
                });
            }
        }
    }
    Ok((complete as u64, replay))
}

fn parse_record(line: &str) -> Option<Spooled> {
    let mut fields = line.split(' ');
    let seq = fields.next()?.parse().ok()?;
    let ts_ms = fields.next()?.parse().ok()?;
    let value: f64 = fields.next()?.parse().ok()?;
    if fields.next().is_some() || !value.is_finite() {
        return None;
    }
    Some(Spooled { seq, ts_ms, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sensorhub-spool-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn reading(seq: u64) -> Spooled {
        Spooled {
            seq,
            ts_ms: 1_700_000_000_000 + seq,
            value: seq as f64 / 3.0 - 40.0,
        }
    }

    #[test]
    fn what_was_appended_comes_back_exactly_after_a_restart() {
        let dir = dir("roundtrip");
        let (mut spool, replay) = Spool::open(&dir, "s1", "temperature").expect("open");
        assert!(replay.is_empty());
        let batch: Vec<Spooled> = (1..=5).map(reading).collect();
        spool.append(&batch).expect("append");
        drop(spool);
        let (_, replay) = Spool::open(&dir, "s1", "temperature").expect("reopen");
        assert_eq!(replay, batch, "values read back bit for bit");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_next_append_starts_a_line() {
        let dir = dir("torn");
        let (mut spool, _) = Spool::open(&dir, "s1", "temperature").expect("open");
        spool.append(&[reading(1)]).expect("append");
        drop(spool);
        let mut file = File::options()
            .append(true)
            .open(dir.join(FILE))
            .expect("file");
        file.write_all(b"2 17000").expect("torn write");
        drop(file);
        let (mut spool, replay) = Spool::open(&dir, "s1", "temperature").expect("reopen");
        assert_eq!(replay, vec![reading(1)]);
        spool.append(&[reading(3)]).expect("append");
        drop(spool);
        let (_, replay) = Spool::open(&dir, "s1", "temperature").expect("reopen");
        assert_eq!(replay, vec![reading(1), reading(3)]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_client_another_sensor_or_a_damaged_line_is_refused() {
        let dir = dir("refused");
        let (mut spool, _) = Spool::open(&dir, "s1", "temperature").expect("open");
        spool.append(&[reading(1)]).expect("append");
        let busy = Spool::open(&dir, "s1", "temperature").expect_err("locked");
        assert!(matches!(busy, SpoolError::InUse { .. }), "{busy}");
        drop(spool);
        let other = Spool::open(&dir, "s2", "temperature").expect_err("other sensor");
        assert!(
            other
                .to_string()
                .contains("readings of sensor s1 (temperature), not of --sensor s2"),
            "{other}"
        );
        let mut file = File::options()
            .append(true)
            .open(dir.join(FILE))
            .expect("file");
        file.write_all(b"garbage here\n").expect("write");
        drop(file);
        let corrupt = Spool::open(&dir, "s1", "temperature").expect_err("corrupt");
        assert!(
            corrupt.to_string().contains("line 3 is not a reading"),
            "{corrupt}"
        );
        fs::write(dir.join(FILE), b"hello\n").expect("foreign file");
        let foreign = Spool::open(&dir, "s1", "temperature").expect_err("foreign");
        assert!(
            foreign.to_string().contains("not a sensorhub spool"),
            "{foreign}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn compaction_keeps_exactly_the_unanswered_and_clear_keeps_none() {
        let dir = dir("compact");
        let (mut spool, _) = Spool::open(&dir, "s1", "temperature").expect("open");
        let batch: Vec<Spooled> = (1..=40_000).map(reading).collect();
        spool.append(&batch).expect("append");
        assert!(spool.len >= COMPACT_FROM, "enough to compact");
        spool.compact_if_grown(39_990).expect("compact");
        spool.append(&[reading(40_001)]).expect("append after");
        drop(spool);
        let (mut spool, replay) = Spool::open(&dir, "s1", "temperature").expect("reopen");
        let seqs: Vec<u64> = replay.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (39_991..=40_001).collect::<Vec<_>>());
        spool.clear().expect("clear");
        drop(spool);
        let (_, replay) = Spool::open(&dir, "s1", "temperature").expect("reopen");
        assert!(replay.is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
