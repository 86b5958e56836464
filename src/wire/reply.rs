//! Replies: the lines the server writes and the client reads back.

use super::put;
use serde::Deserialize;

/// The reply the server sends when it refuses a connection past `--max-connections`.
pub const BUSY_REPLY: &[u8] = b"{\"seq\":null,\"status\":\"error\",\"error\":\"server busy\"}\n";

/// The reply to a line longer than `--max-line-bytes`; the connection closes after it.
pub const OVERLONG_REPLY: &[u8] =
    b"{\"seq\":null,\"status\":\"error\",\"error\":\"line too long\"}\n";

/// Status of one reply, in the order the metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    Duplicate = 1,
    Rejected = 2,
    Error = 3,
}

impl Status {
    /// Every status, for iterating over per-status counters.
    pub const ALL: [Status; 4] = [
        Status::Ok,
        Status::Duplicate,
        Status::Rejected,
        Status::Error,
    ];

    /// The label used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Duplicate => "duplicate",
            Status::Rejected => "rejected",
            Status::Error => "error",
        }
    }
}

/// Appends the reply line for `status` to `out`. `seq` is raw JSON number text or `None`
/// for `null`; `message` is required for `rejected` and `error`.
pub fn write_reply(out: &mut Vec<u8>, seq: Option<&str>, status: Status, message: Option<&str>) {
    put(out, b"{\"seq\":");
    put(out, seq.unwrap_or("null").as_bytes());
    put(out, b",\"status\":\"");
    put(out, status.as_str().as_bytes());
    out.push(b'"');
    if let Some(message) = message {
        put(out, b",\"error\":");
        // Serializing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, message);
    }
    put(out, b"}\n");
}

/// A `rejected` reply that names its `reason` (PROTOCOL.md v1.2: a sensor the
/// connection's certificate does not cover); `error` repeats it for readers of v1.1.
pub fn write_rejected_with_reason(out: &mut Vec<u8>, seq: &str, reason: &str) {
    put(out, b"{\"seq\":");
    put(out, seq.as_bytes());
    put(out, b",\"status\":\"rejected\",\"reason\":");
    let _ = serde_json::to_writer(&mut *out, reason);
    put(out, b",\"error\":");
    let _ = serde_json::to_writer(&mut *out, reason);
    put(out, b"}\n");
}

/// A reply as a sensor reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The seq the reply echoes; `None` for `null` or a seq no `u64` holds.
    pub seq: Option<u64>,
    pub status: Status,
    pub error: Option<String>,
}

/// Reads one reply line (without its terminator). The two common replies, `ok` and
/// `duplicate` with an integer seq, are recognised without a JSON parse; anything else
/// goes through serde_json. A status the protocol does not name reads as `error`: it
/// acknowledges nothing.
pub fn read_reply(line: &[u8]) -> Result<Answer, String> {
    if let Some(answer) = read_common_reply(line) {
        return Ok(answer);
    }
    if line.starts_with(b"HTTP/") {
        return Err(
            "the server answered in HTTP: this is not a sensorhub sensor port \
                    (is it the server's --http-listen port?)"
                .into(),
        );
    }
    let reply: ReplyLine = serde_json::from_slice(line).map_err(|e| format!("bad reply: {e}"))?;
    let status = Status::ALL
        .into_iter()
        .find(|s| s.as_str() == reply.status)
        .unwrap_or(Status::Error);
    Ok(Answer {
        seq: reply.seq.and_then(|n| n.as_u64()),
        status,
        error: reply.error,
    })
}

#[derive(Deserialize)]
struct ReplyLine {
    seq: Option<serde_json::Number>,
    status: String,
    #[serde(default)]
    error: Option<String>,
}

/// `{"seq":N,"status":"ok"}` or `...:"duplicate"}` exactly as `write_reply` writes them.
fn read_common_reply(line: &[u8]) -> Option<Answer> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let status = match &rest[digits..] {
        b",\"status\":\"ok\"}" => Status::Ok,
        b",\"status\":\"duplicate\"}" => Status::Duplicate,
        _ => return None,
    };
    let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some(Answer {
        seq: Some(seq),
        status,
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_by_certificate_names_its_reason_for_v1_2_and_v1_1_readers() {
        let mut out = Vec::new();
        write_rejected_with_reason(&mut out, "17", "not \"pi-2\"");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "{\"seq\":17,\"status\":\"rejected\",\"reason\":\"not \\\"pi-2\\\"\",\"error\":\"not \\\"pi-2\\\"\"}\n"
        );
        let answer = read_reply(text.trim_end().as_bytes()).expect("a reply");
        assert_eq!((answer.seq, answer.status), (Some(17), Status::Rejected));
        assert_eq!(answer.error.as_deref(), Some("not \"pi-2\""));
    }

    #[test]
    fn replies_are_json_lines() {
        let mut out = Vec::new();
        write_reply(&mut out, Some("17"), Status::Ok, None);
        write_reply(&mut out, None, Status::Error, Some("bad \"quote\""));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"seq\":17,\"status\":\"ok\"}\n{\"seq\":null,\"status\":\"error\",\"error\":\"bad \\\"quote\\\"\"}\n"
        );
        let busy = read_reply(BUSY_REPLY.trim_ascii_end()).unwrap();
        assert_eq!(busy.error.as_deref(), Some("server busy"));
        assert_eq!((busy.seq, busy.status), (None, Status::Error));
    }

    #[test]
    fn replies_read_back_as_written() {
        for (seq, status, message) in [
            (Some("17"), Status::Ok, None),
            (Some("18"), Status::Duplicate, None),
            (Some("19"), Status::Rejected, Some("too hot")),
            (None, Status::Error, Some("invalid JSON")),
            (Some("1.5"), Status::Error, Some("bad seq")),
        ] {
            let mut out = Vec::new();
            write_reply(&mut out, seq, status, message);
            let answer = read_reply(out.trim_ascii_end()).unwrap();
            assert_eq!(answer.status, status);
            assert_eq!(answer.seq, seq.and_then(|s| s.parse().ok()));
            assert_eq!(answer.error.as_deref(), message);
        }
        assert!(read_reply(b"{\"seq\":1").is_err());
        let odd = read_reply(br#"{"seq":1,"status":"maybe"}"#).unwrap();
        assert_eq!(
            odd.status,
            Status::Error,
            "an unknown status acknowledges nothing"
        );
    }

    #[test]
    fn fast_path_recognises_only_exact_ok_and_duplicate() {
        assert!(matches!(
            read_common_reply(br#"{"seq":17,"status":"ok"}"#),
            Some(Answer {
                status: Status::Ok,
                seq: Some(17),
                error: None
            })
        ));
        assert!(matches!(
            read_common_reply(br#"{"seq":9007199254740991,"status":"duplicate"}"#),
            Some(Answer {
                status: Status::Duplicate,
                seq: Some(9_007_199_254_740_991),
                error: None
            })
        ));
        assert!(read_common_reply(br#"{"seq":99999999999999999999,"status":"ok"}"#).is_none());
        assert!(read_common_reply(br#"{"seq":null,"status":"error","error":"x"}"#).is_none());
        assert!(read_common_reply(br#"{"seq":1,"status":"rejected","error":"x"}"#).is_none());
        assert!(read_common_reply(br#"{"seq":1,"status":"ok","extra":1}"#).is_none());
    }
}
