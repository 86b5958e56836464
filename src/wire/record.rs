//! The lines sensorhub writes besides replies: a sensor's reading (what the client
//! sends) and a store record (what the server keeps). Both are written by hand, not by
//! serde: sensor ids and kinds are restricted to characters that need no JSON escaping
//! (`reading::valid_sensor`, `valid_kind`), so the bytes can be copied as they are, and
//! the store keeps the value's number text exactly as the sensor wrote it.

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
    out.extend_from_slice(b"{\"sensor\":\"");
    out.extend_from_slice(sensor.as_bytes());
    out.extend_from_slice(b"\",\"kind\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"value\":");
    out.extend_from_slice(float.format_finite(value).as_bytes());
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(int.format(seq).as_bytes());
    out.extend_from_slice(b",\"ts\":");
    out.extend_from_slice(int.format(ts_ms).as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Appends `r` as one store line. Sensor ids and kinds are restricted to characters that
/// need no JSON escaping (the protocol's rules), so the line is written directly; the
/// value keeps the sensor's own JSON number text, so nothing is lost to re-formatting.
pub fn encode_record(out: &mut Vec<u8>, r: &Reading, recv_ms: u64) {
    let mut int = itoa::Buffer::new();
    out.extend_from_slice(b"{\"sensor\":\"");
    out.extend_from_slice(r.sensor.as_bytes());
    out.extend_from_slice(b"\",\"kind\":\"");
    out.extend_from_slice(r.kind.as_bytes());
    out.extend_from_slice(b"\",\"value\":");
    out.extend_from_slice(r.value_text.as_bytes());
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(int.format(r.seq).as_bytes());
    if let Some(ts) = r.ts {
        out.extend_from_slice(b",\"ts\":");
        out.extend_from_slice(int.format(ts).as_bytes());
    }
    out.extend_from_slice(b",\"recv\":");
    out.extend_from_slice(int.format(recv_ms).as_bytes());
    out.extend_from_slice(b"}\n");
}
