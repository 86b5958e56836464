//! Differential fuzzing of the two reading parsers: the fast path
//! (`wire::line::parse_line`, which falls back to serde_json for anything unusual)
//! and the serde_json path alone (`wire::json::parse_line`, the oracle). On any bytes
//! they must reach the same verdict, hence write the same reply and the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorhub::wire::json;
use sensorhub::wire::line::parse_line;
use sensorhub::wire::reading::Verdict;
use sensorhub::wire::record::{RecvStamp, encode_record};
use sensorhub::wire::reply::{Status, write_rejected_with_reason, write_reply};

/// The bytes a verdict puts on the wire and in the store.
fn output(verdict: &Verdict) -> (Vec<u8>, Vec<u8>) {
    let (mut reply, mut record) = (Vec::new(), Vec::new());
    match verdict {
        Verdict::Error { seq, message } => {
            write_reply(&mut reply, *seq, Status::Error, Some(message))
        }
        Verdict::Rejected { seq, message } => {
            write_reply(&mut reply, Some(seq), Status::Rejected, Some(message))
        }
        // Only the worker's certificate check forbids; the parsers never do, and both
        // would have to agree on it anyway.
        Verdict::Forbidden { seq, reason } => write_rejected_with_reason(&mut reply, seq, reason),
        Verdict::Valid { reading, seq_text } => {
            write_reply(&mut reply, Some(seq_text), Status::Ok, None);
            encode_record(&mut record, reading, &RecvStamp::new(1_764_230_400_123));
        }
    }
    (reply, record)
}

fuzz_target!(|line: &[u8]| {
    let fast = parse_line(line);
    let oracle = json::parse_line(line);
    assert_eq!(
        fast,
        oracle,
        "verdicts differ on {:?}",
        String::from_utf8_lossy(line)
    );
    assert_eq!(output(&fast), output(&oracle));
});
