//! Replaying store files into per-sensor statistics, line by line, with what is wrong
//! in a line reported with its place: what start-up, a failed write's undo and `verify`
//! all do. Records are decoded by `wire/record.rs` alone.

use crate::server::store::stats::{self, Counted, Sensors, Seqs};
use crate::wire::record::{Record, decode_record};
use crc32fast::Hasher;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Something wrong in a store file, with where it is.
#[derive(Debug)]
pub(crate) enum Problem<'a> {
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
pub(crate) fn replay(
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
        match decode_record(&line) {
            Ok(r) => apply_record(sensors, r, path, at, report),
            Err(e) => report(Problem::NotARecord { path, at, why: e.0 }),
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
    if let Counted::OtherKind(had) = stats::count(sensors, (&r).into(), Seqs::Any) {
        report(Problem::KindChanged {
            path,
            at,
            had,
            sensor: r.sensor,
            kind: r.kind,
        });
    }
}
