//! Per-line cost of the two reading parsers, without the network: the fast path
//! (`wire::line::parse_line`) against the serde_json path (`wire::json::parse_line`)
//! on the line shape `sensor-client` sends. Prints nanoseconds per line; run it under
//! `perf stat -e instructions` for figures that do not depend on the machine's noise.
//!
//!   cargo run --release --example parse-bench [-- fast|json]

use sensorhub::wire::json;
use sensorhub::wire::line::parse_line;
use sensorhub::wire::reading::Verdict;
use sensorhub::wire::record::encode_reading;
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let which = std::env::args().nth(1);
    let mut lines = Vec::new();
    for i in 0..1000u64 {
        let mut line = Vec::new();
        let kind = if i % 2 == 0 {
            "temperature"
        } else {
            "humidity"
        };
        let sensor = format!("client{}-{kind}", i % 64);
        encode_reading(
            &mut line,
            &sensor,
            kind,
            20.0 + (i % 100) as f64 / 10.0,
            1_764_230_400_000_000 + i,
            1_764_230_400_123,
        );
        line.pop();
        lines.push(line);
    }
    let rounds = 2_000;
    for (name, parse) in [
        ("fast path", parse_line as fn(&[u8]) -> Verdict<'_>),
        ("serde_json path", json::parse_line),
    ] {
        if which.as_deref().is_some_and(|w| !name.starts_with(w)) {
            continue;
        }
        let started = Instant::now();
        let mut valid = 0u64;
        for _ in 0..rounds {
            for line in &lines {
                if matches!(black_box(parse(black_box(line))), Verdict::Valid { .. }) {
                    valid += 1;
                }
            }
        }
        let n = rounds * lines.len() as u64;
        assert_eq!(valid, n, "every line is a valid reading");
        let ns = started.elapsed().as_nanos() as f64 / n as f64;
        println!("{name:16} {ns:7.1} ns per line ({n} lines)");
    }
}
