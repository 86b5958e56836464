//! The lines sensorhub writes besides replies: a sensor's reading (what the client
//! sends) and a store record (what the server keeps). Both are written by hand, not by
//! serde: sensor ids and kinds are restricted to characters that need no JSON escaping
//! (`reading::valid_sensor`, `valid_kind`), so the bytes can be copied as they are, and
//! the store keeps the value's number text exactly as the sensor wrote it. Records are
//! read back (start-up, `verify`, the archive's key) only through `decode_record`.

use super::put;
use super::reading::Reading;
use serde::Deserialize;
use std::fmt;

/// Appends one reading line in the wire format.
pub fn encode_reading(
    out: &mut Vec<u8>,
    sensor: &str,
    kind: &str,
    value: f64,
    seq: u64,
    ts_ms: u64,
) {
    let mut int = itoa::Buffer::new();
    let mut float = ryu::Buffer::new();
    put(out, b"{\"sensor\":\"");
    put(out, sensor.as_bytes());
    put(out, b"\",\"kind\":\"");
    put(out, kind.as_bytes());
    put(out, b"\",\"value\":");
    put(out, float.format_finite(value).as_bytes());
    put(out, b",\"seq\":");
    put(out, int.format(seq).as_bytes());
    put(out, b",\"ts\":");
    put(out, int.format(ts_ms).as_bytes());
    put(out, b"}\n");
}

/// Appends `r` as one store line. Sensor ids and kinds are restricted to characters that
/// need no JSON escaping (the protocol's rules), so the line is written directly; the
/// value keeps the sensor's own JSON number text, so nothing is lost to re-formatting.
pub fn encode_record(out: &mut Vec<u8>, r: &Reading, recv: &RecvStamp) {
    let mut int = itoa::Buffer::new();
    put(out, b"{\"sensor\":\"");
    put(out, r.sensor.as_bytes());
    put(out, b"\",\"kind\":\"");
    put(out, r.kind.as_bytes());
    put(out, b"\",\"value\":");
    put(out, r.value_text.as_bytes());
    put(out, b",\"seq\":");
    put(out, int.format(r.seq).as_bytes());
    if let Some(ts) = r.ts {
        put(out, b",\"ts\":");
        put(out, int.format(ts).as_bytes());
    }
    put(out, b",\"recv\":");
    put(out, recv.text());
    put(out, b"}\n");
}

/// A record's receive time, Unix milliseconds, formatted once for a whole batch (every
/// record of a batch has the same).
pub struct RecvStamp {
    digits: [u8; 20],
    len: usize,
}

impl RecvStamp {
    pub fn new(unix_ms: u64) -> RecvStamp {
        let mut int = itoa::Buffer::new();
        let text = int.format(unix_ms).as_bytes();
        let mut digits = [0u8; 20];
        digits[..text.len()].copy_from_slice(text);
        RecvStamp {
            digits,
            len: text.len(),
        }
    }

    fn text(&self) -> &[u8] {
        &self.digits[..self.len]
    }
}

/// One store record as read back from a segment.
#[derive(Debug, PartialEq, Deserialize)]
pub struct Record {
    pub sensor: String,
    pub kind: String,
    pub value: f64,
    pub seq: u64,
    #[serde(default)]
    pub ts: Option<u64>,
    /// When the server received it, Unix milliseconds.
    pub recv: u64,
}

/// A segment line that is not a record: why.
#[derive(Debug, PartialEq)]
pub struct NotARecord(pub String);

impl fmt::Display for NotARecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decodes one store line (its `\n` may be included).
pub fn decode_record(line: &[u8]) -> Result<Record, NotARecord> {
    match serde_json::from_slice::<Record>(line) {
        Ok(r) if r.value.is_finite() => Ok(r),
        Ok(_) => Err(NotARecord("non-finite value".into())),
        Err(e) => Err(NotARecord(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn reading(value_text: &'static str, seq: u64, ts: Option<u64>) -> Reading<'static> {
        Reading {
            sensor: Cow::Borrowed("a"),
            kind: Cow::Borrowed("temperature"),
            value: value_text.parse().expect("a number"),
            value_text: Cow::Borrowed(value_text),
            seq,
            ts,
        }
    }

    #[test]
    fn records_have_exactly_the_stored_fields() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &reading("21.5", 3, Some(30)), &RecvStamp::new(99));
        encode_record(&mut buf, &reading("-1e-7", 4, None), &RecvStamp::new(100));
        assert_eq!(
            String::from_utf8(buf).expect("UTF-8"),
            "{\"sensor\":\"a\",\"kind\":\"temperature\",\"value\":21.5,\"seq\":3,\"ts\":30,\"recv\":99}\n\
             {\"sensor\":\"a\",\"kind\":\"temperature\",\"value\":-1e-7,\"seq\":4,\"recv\":100}\n"
        );
    }

    #[test]
    fn a_record_reads_back_as_it_was_written() {
        for (text, ts) in [("21.5", Some(30)), ("-1e-7", None), ("0", Some(0))] {
            let r = reading(text, 7, ts);
            let mut line = Vec::new();
            encode_record(&mut line, &r, &RecvStamp::new(1_764_230_400_123));
            let decoded = decode_record(&line).expect("a record");
            assert_eq!(
                decoded,
                Record {
                    sensor: "a".into(),
                    kind: "temperature".into(),
                    value: r.value,
                    seq: 7,
                    ts,
                    recv: 1_764_230_400_123,
                }
            );
        }
    }

    #[test]
    fn lines_that_are_not_records_say_why() {
        assert!(decode_record(b"garbage\n").is_err());
        assert!(decode_record(br#"{"sensor":"a","kind":"k","value":1,"seq":1}"#).is_err());
        let huge = br#"{"sensor":"a","kind":"k","value":1e999,"seq":1,"recv":2}"#;
        let why = decode_record(huge).expect_err("not finite").0;
        assert!(why.contains("out of range"), "{why}");
    }
}
