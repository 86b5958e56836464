//! Start-up recovery against data directories made of fuzzer bytes: segments with torn
//! tails and garbage, checkpoints that lie or half-parse. Start-up never panics, never
//! counts a record that is not a valid one, agrees with `sensor-server verify`, leaves
//! no torn line behind, and gives the same statistics when run twice.
//!
//! Input: parts separated by `SEPARATOR`; the first is `checkpoint.json` (absent when
//! empty), each further one a segment (`segment-0000000001.jsonl`, ...). Plain bytes,
//! so the corpus can hold real stores (fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorhub::server::recovery::verify;
use sensorhub::server::store::{Store, StoreOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SEPARATOR: &[u8] = b"\n--8<--\n";

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
    let parts = split(input);
    let (checkpoint, segments) = parts.split_first().expect("one part at least");
    if segments.len() > 4 {
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
    let options = StoreOptions {
        dir: dir.clone(),
        segment_bytes: 1 << 20,
        max_age: Duration::from_secs(3600),
    };

    let before = verify(&dir, &mut std::io::sink()).expect("verify");
    let first = Store::open(options.clone()).map(|(_, sensors)| sensors);
    let after = verify(&dir, &mut std::io::sink()).expect("verify");
    if let Ok(sensors) = &first {
        if !has_checkpoint {
            // Nothing to trust but the lines: exactly the valid records count.
            let counted: u64 = sensors.values().map(|s| s.count).sum();
            assert_eq!(counted, before.records, "start-up and verify disagree");
            assert_eq!(sensors, &before.sensors);
        }
        // Torn tails were cut; complete lines were left alone.
        assert_eq!(after.records, before.records);
        let second = Store::open(options)
            .map(|(_, s)| s)
            .expect("second start-up");
        assert_eq!(&second, sensors, "recovery is not repeatable");
    }
    let _ = std::fs::remove_dir_all(&dir);
});
