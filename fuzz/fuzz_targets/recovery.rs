//! Start-up recovery against data directories made of fuzzer bytes: segments with torn
//! tails and garbage, checkpoints that lie or half-parse. Start-up never panics, never
//! counts a record that is not a valid one, agrees with `sensor-server verify`, leaves
//! no torn line behind, and gives the same statistics when run twice.
//!
//! And it never deletes a segment that `archive.json` does not confirm byte for byte
//! (length and CRC-32 of what the file held): what the archive's S3 holds (an
//! `archive.json` of version 1, which had only a watermark, is trusted to it).
//!
//! Input: parts separated by `SEPARATOR`; the first is `checkpoint.json` (absent when
//! empty), each further one a segment (`segment-0000000001.jsonl`, ...), except a part
//! starting `archive.json:`, whose rest is `archive.json`. Plain bytes, so the corpus can
//! hold real stores (fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorhub::server::{Store, StoreOptions, read_archive_state, verify};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SEPARATOR: &[u8] = b"\n--8<--\n";
const ARCHIVE_PART: &[u8] = b"archive.json:";

static RUN: AtomicU64 = AtomicU64::new(0);

fn scratch() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!(
        "sensorhub-fuzz-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ))
}

fn split(mut input: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    while let Some(at) = input.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        parts.push(&input[..at]);
        input = &input[at + SEPARATOR.len()..];
    }
    parts.push(input);
    parts
}

fuzz_target!(|input: &[u8]| {
    let mut parts = split(input);
    let archive = parts
        .iter()
        .position(|p| p.starts_with(ARCHIVE_PART))
        .map(|at| &parts.remove(at)[ARCHIVE_PART.len()..]);
    let Some((checkpoint, segments)) = parts.split_first() else {
        return; // only an archive.json: no store
    };
    // An empty directory is not a store (`verify` refuses it); more than four
    // segments adds nothing.
    if segments.len() > 4 || (segments.is_empty() && checkpoint.is_empty()) {
        return;
    }
    let dir = scratch();
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for (i, bytes) in segments.iter().enumerate() {
        std::fs::write(dir.join(format!("segment-{:010}.jsonl", i + 1)), bytes).expect("write");
    }
    let has_checkpoint = !checkpoint.is_empty();
    if has_checkpoint {
        std::fs::write(dir.join("checkpoint.json"), checkpoint).expect("write");
    }
    if let Some(archive) = archive {
        std::fs::write(dir.join("archive.json"), archive).expect("write");
    }
    // What S3 holds, as archive.json says, read before start-up may set it aside.
    let confirmed = read_archive_state(&dir).ok().flatten();
    let options = StoreOptions {
        dir: dir.clone(),
        segment_bytes: 1 << 20,
        max_age: Duration::from_secs(3600),
    };

    let before = verify(&dir, &mut std::io::sink()).expect("verify");
    let first = Store::open(options.clone()).map(|(_, sensors)| sensors);
    let mut deleted = false;
    for (i, bytes) in segments.iter().enumerate() {
        let number = i as u64 + 1;
        if !dir.join(format!("segment-{number:010}.jsonl")).exists() {
            deleted = true;
            // Version 1 (no store id) recorded only a watermark, and is trusted to it.
            // Start-up cuts a torn tail first: what it checked is the part before it.
            let whole = bytes
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(&bytes[..0], |end| &bytes[..=end]);
            let held = confirmed.as_ref().is_some_and(|a| {
                a.confirms(number, whole.len() as u64, crc32fast::hash(whole))
                    || (a.store_id.is_empty() && number <= a.shipped_through)
            });
            assert!(
                held,
                "start-up deleted segment {number}, which S3 does not hold"
            );
        }
    }
    let after = verify(&dir, &mut std::io::sink()).expect("verify");
    if let Ok(sensors) = &first {
        if !has_checkpoint {
            // Nothing to trust but the lines: exactly the valid records count.
            let counted: u64 = sensors.values().map(|s| s.count).sum();
            assert_eq!(counted, before.records, "start-up and verify disagree");
            assert_eq!(sensors, &before.sensors);
        }
        // Torn tails were cut; complete lines were left alone (unless retired segments
        // a crash left behind were deleted, which the loop above checked).
        if !deleted {
            assert_eq!(after.records, before.records);
        }
        let second = Store::open(options)
            .map(|(_, s)| s)
            .expect("second start-up");
        assert_eq!(&second, sensors, "recovery is not repeatable");
    }
    let _ = std::fs::remove_dir_all(&dir);
});
