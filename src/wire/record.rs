//! The lines sensorhub writes besides replies: a sensor's reading (what the client
//! sends) and a store record (what the server keeps). Both are written by hand, not by
//! serde: sensor ids and kinds are restricted to characters that need no JSON escaping
//! (`reading::valid_sensor`, `valid_kind`), so the bytes can be copied as they are, and
//! the store keeps the value's number text exactly as the sensor wrote it.

use super::put;
use super::reading::Reading;

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
