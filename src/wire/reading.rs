//! The sensorhub wire protocol: turning one line into a verdict, and verdicts into replies.
//!
//! Everything here is pure (no I/O, no shared state) so that the validation table of
//! `PROTOCOL.md` can be tested line by line. The order of checks is part of the contract:
//! UTF-8, JSON, object, member types (`error`), rules (`rejected`); duplicates are decided
//! later against the store's state (see `server/db.rs`), because they depend on what is durable.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Largest `seq` a sensor may use: 2^53 - 1, the largest integer every JSON consumer can
/// represent exactly.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// The reply the server sends when it refuses a connection past `--max-connections`.
pub const BUSY_REPLY: &[u8] = b"{\"seq\":null,\"status\":\"error\",\"error\":\"server busy\"}\n";

/// The reply to a line longer than `--max-line-bytes`; the connection closes after it.
pub const OVERLONG_REPLY: &[u8] =
    b"{\"seq\":null,\"status\":\"error\",\"error\":\"line too long\"}\n";

/// A reading that passed every type and rule check; only the store's state can still turn
/// it into a `duplicate` or a kind-mismatch `rejected`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading<'a> {
    pub sensor: Cow<'a, str>,
    pub kind: Cow<'a, str>,
    pub value: f64,
    /// The value exactly as the sensor wrote it (a JSON number), which the store keeps.
    pub value_text: Cow<'a, str>,
    pub seq: u64,
    pub ts: Option<u64>,
}

/// What one non-blank line amounts to before the store is consulted.
#[derive(Debug, PartialEq)]
pub enum Verdict<'a> {
    /// Not a reading (`error`). `seq` is the raw text of the line's `seq` member when the
    /// line is one JSON object whose `seq` is a JSON number.
    Error {
        seq: Option<&'a str>,
        message: Cow<'static, str>,
    },
    /// A well-formed reading that breaks a rule (`rejected`); `seq` is its raw text.
    Rejected { seq: &'a str, message: String },
    /// Passed every check; `seq_text` is what the reply echoes.
    Valid {
        reading: Reading<'a>,
        seq_text: &'a str,
    },
}

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

/// True for lines that get no reply: empty, or only JSON whitespace (space, tab, CR).
/// `\n` never occurs inside a line; JSON also calls it whitespace, so it is accepted.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Checks one line (without its terminator) against the contract.
pub fn parse_line(line: &[u8]) -> Verdict<'_> {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(_) => return error(None, "line is not valid UTF-8"),
    };
    let members = match parse_members(text) {
        Ok(m) => m,
        Err(message) => return error(None, message),
    };
    // From here the line is exactly one JSON object: `seq` may be echoed.
    let seq_echo = match (members.seq, members.duplicated_seq) {
        (Some(raw), false) if is_number(raw) => Some(raw.get()),
        _ => None,
    };
    if let Some(key) = members.duplicate_key {
        return error(seq_echo, format!("duplicate key \"{key}\""));
    }
    match check_types(&members) {
        Ok(typed) => check_rules(typed),
        Err(message) => error(seq_echo, message),
    }
}

fn error<'a>(seq: Option<&'a str>, message: impl Into<Cow<'static, str>>) -> Verdict<'a> {
    Verdict::Error {
        seq,
        message: message.into(),
    }
}

/// The members of the object that matter, as raw JSON text, in one pass that also notices
/// duplicated keys (serde_json's own maps silently keep the last one).
#[derive(Default)]
struct Members<'a> {
    sensor: Option<&'a RawValue>,
    kind: Option<&'a RawValue>,
    value: Option<&'a RawValue>,
    seq: Option<&'a RawValue>,
    ts: Option<&'a RawValue>,
    duplicated_seq: bool,
    duplicate_key: Option<String>,
}

fn parse_members(text: &str) -> Result<Members<'_>, Cow<'static, str>> {
    let starts_object = text
        .trim_start_matches([' ', '\t', '\r', '\n'])
        .starts_with('{');
    if !starts_object {
        return Err(match serde_json::from_str::<de::IgnoredAny>(text) {
            Ok(_) => "a reading must be a JSON object".into(),
            Err(e) => format!("invalid JSON: {e}").into(),
        });
    }
    serde_json::from_str::<Members>(text).map_err(|e| format!("invalid JSON: {e}").into())
}

impl<'de> de::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MembersVisitor)
    }
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
        let mut members = Members::default();
        let mut seen = SeenKeys::default();
        while let Some(JsonStr(key)) = map.next_key()? {
            let raw: &'de RawValue = map.next_value()?;
            if !seen.insert(key.clone()) {
                if key == "seq" {
                    members.duplicated_seq = true;
                }
                members.duplicate_key.get_or_insert_with(|| key.to_string());
                continue;
            }
            let slot = match key.as_ref() {
                "sensor" => &mut members.sensor,
                "kind" => &mut members.kind,
                "value" => &mut members.value,
                "seq" => &mut members.seq,
                "ts" => &mut members.ts,
                _ => continue,
            };
            *slot = Some(raw);
        }
        Ok(members)
    }
}

/// The keys of one object so far. Readings have about six keys, so a short list beats
/// hashing; a hostile line with thousands of keys moves to a hash set, which keeps the
/// check linear.
#[derive(Default)]
struct SeenKeys<'a> {
    few: Vec<Cow<'a, str>>,
    many: Option<std::collections::HashSet<Cow<'a, str>>>,
}

impl<'a> SeenKeys<'a> {
    /// False when `key` was seen before.
    fn insert(&mut self, key: Cow<'a, str>) -> bool {
        if let Some(many) = &mut self.many {
            return many.insert(key);
        }
        if self.few.contains(&key) {
            return false;
        }
        self.few.push(key);
        if self.few.len() > 16 {
            self.many = Some(self.few.drain(..).collect());
        }
        true
    }
}

/// A JSON string that borrows from the line when it has no escapes (serde's own
/// `Cow<str>` always allocates).
struct JsonStr<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for JsonStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<JsonStr<'de>, E> {
                Ok(JsonStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<JsonStr<'de>, E> {
                Ok(JsonStr(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(V)
    }
}

fn is_number(raw: &RawValue) -> bool {
    matches!(raw.get().as_bytes().first(), Some(b'-' | b'0'..=b'9'))
}

fn is_string(raw: &RawValue) -> bool {
    raw.get().starts_with('"')
}

/// Members that have the right JSON types; numbers are still raw text.
struct Typed<'a> {
    sensor: Cow<'a, str>,
    kind: Cow<'a, str>,
    value: &'a str,
    seq: &'a str,
    ts: Option<&'a str>,
}

fn check_types<'a>(m: &Members<'a>) -> Result<Typed<'a>, String> {
    fn string<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<Cow<'a, str>, String> {
        let raw = raw.ok_or_else(|| format!("missing field \"{name}\""))?;
        if !is_string(raw) {
            return Err(format!("field \"{name}\" must be a string"));
        }
        serde_json::from_str::<JsonStr>(raw.get())
            .map(|s| s.0)
            .map_err(|e| format!("field \"{name}\": {e}"))
    }
    fn number<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<&'a str, String> {
        let raw = raw.ok_or_else(|| format!("missing field \"{name}\""))?;
        if !is_number(raw) {
            return Err(format!("field \"{name}\" must be a number"));
        }
        Ok(raw.get())
    }
    Ok(Typed {
        sensor: string(m.sensor, "sensor")?,
        kind: string(m.kind, "kind")?,
        value: number(m.value, "value")?,
        seq: number(m.seq, "seq")?,
        ts: match m.ts {
            None => None,
            Some(_) => Some(number(m.ts, "ts")?),
        },
    })
}

fn check_rules(t: Typed<'_>) -> Verdict<'_> {
    let seq_text = t.seq;
    let reject = |message: String| Verdict::Rejected {
        seq: seq_text,
        message,
    };
    if !valid_sensor(&t.sensor) {
        return reject("sensor must be 1 to 64 characters of A-Z a-z 0-9 . _ : -".into());
    }
    if !valid_kind(&t.kind) {
        return reject("kind must be 1 to 32 characters of a-z 0-9 _".into());
    }
    let seq = match parse_integer(t.seq).filter(|&s| s <= MAX_SEQ) {
        Some(s) => s,
        None => return reject("seq must be an integer from 0 to 9007199254740991".into()),
    };
    let ts = match t.ts {
        None => None,
        Some(raw) => match parse_integer(raw) {
            Some(ts) => Some(ts),
            None => return reject("ts must be an integer of Unix milliseconds >= 0".into()),
        },
    };
    // Rust's float grammar accepts every JSON number; 1e400 parses to infinity.
    let value = match t.value.parse::<f64>() {
        Ok(v) if v.is_finite() => v,
        _ => return reject("value must be a finite number".into()),
    };
    if let Some((low, high, unit)) = kind_range(&t.kind)
        && !(low..=high).contains(&value)
    {
        return reject(format!(
            "{} must lie in [{low}, {high}] {unit}",
            t.kind.as_ref()
        ));
    }
    Verdict::Valid {
        reading: Reading {
            sensor: t.sensor,
            kind: t.kind,
            value,
            value_text: Cow::Borrowed(t.value),
            seq,
            ts,
        },
        seq_text,
    }
}

/// A sensor id: 1 to 64 bytes of `[A-Za-z0-9._:-]` (so it never needs JSON escaping).
pub fn valid_sensor(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A kind: 1 to 32 bytes of `[a-z0-9_]`.
pub fn valid_kind(kind: &str) -> bool {
    (1..=32).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The physical range of the kinds the protocol knows; other kinds take any finite value.
pub fn kind_range(kind: &str) -> Option<(f64, f64, &'static str)> {
    match kind {
        "temperature" => Some((-273.15, 1000.0, "degrees Celsius")),
        "humidity" => Some((0.0, 100.0, "percent RH")),
        _ => None,
    }
}

/// A JSON number written as a plain integer (no fraction, no exponent) that fits `u64`
/// and is not negative; `-0` is zero.
fn parse_integer(raw: &str) -> Option<u64> {
    let (negative, digits) = match raw.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, raw),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    if negative && n != 0 { None } else { Some(n) }
}

/// Appends the reply line for `status` to `out`. `seq` is raw JSON number text or `None`
/// for `null`; `message` is required for `rejected` and `error`.
pub fn write_reply(out: &mut Vec<u8>, seq: Option<&str>, status: Status, message: Option<&str>) {
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.unwrap_or("null").as_bytes());
    out.extend_from_slice(b",\"status\":\"");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b'"');
    if let Some(message) = message {
        out.extend_from_slice(b",\"error\":");
        // Serializing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, message);
    }
    out.extend_from_slice(b"}\n");
}

/// A reply as the client sees it; used by `sensor-client` and the tests.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Reply {
    pub seq: Option<serde_json::Number>,
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(line: &str) -> Verdict<'_> {
        parse_line(line.as_bytes())
    }

    fn assert_error(line: &str, seq: Option<&str>, needle: &str) {
        match verdict(line) {
            Verdict::Error { seq: s, message } => {
                assert_eq!(s, seq, "seq echo for {line}");
                assert!(message.contains(needle), "{line}: {message}");
            }
            other => panic!("{line}: expected error, got {other:?}"),
        }
    }

    fn assert_rejected(line: &str, seq: &str, needle: &str) {
        match verdict(line) {
            Verdict::Rejected { seq: s, message } => {
                assert_eq!(s, seq, "seq echo for {line}");
                assert!(message.contains(needle), "{line}: {message}");
            }
            other => panic!("{line}: expected rejected, got {other:?}"),
        }
    }

    #[test]
    fn a_complete_reading_is_valid() {
        let line = r#"{"sensor":"client1-temperature","kind":"temperature","value":23.4,"seq":17,"ts":1764230400123}"#;
        let Verdict::Valid { reading, seq_text } = verdict(line) else {
            panic!("not valid")
        };
        assert_eq!(seq_text, "17");
        assert_eq!(reading.sensor, "client1-temperature");
        assert_eq!(reading.kind, "temperature");
        assert_eq!(reading.value, 23.4);
        assert_eq!(reading.seq, 17);
        assert_eq!(reading.ts, Some(1764230400123));
    }

    #[test]
    fn ts_is_optional_and_unknown_fields_are_ignored() {
        let line = r#"{"extra":[1,{"a":null}],"sensor":"s","kind":"k","value":-1e3,"seq":0}"#;
        let Verdict::Valid { reading, .. } = verdict(line) else {
            panic!("not valid")
        };
        assert_eq!(reading.ts, None);
        assert_eq!(reading.value, -1000.0);
    }

    #[test]
    fn escaped_strings_are_decoded_before_rules() {
        let line = r#"{"sensor":"\u0061b","kind":"k","value":1,"seq":1}"#;
        let Verdict::Valid { reading, .. } = verdict(line) else {
            panic!("not valid")
        };
        assert_eq!(reading.sensor, "ab");
    }

    #[test]
    fn not_utf8_not_json_not_object_are_errors_without_seq() {
        assert!(matches!(
            parse_line(b"{\"seq\":1,\xff}"),
            Verdict::Error { seq: None, .. }
        ));
        assert_error("hello", None, "invalid JSON");
        assert_error(r#"{"seq":1"#, None, "invalid JSON");
        assert_error(r#"[{"seq":1}]"#, None, "JSON object");
        assert_error("42", None, "JSON object");
        assert_error(r#"{"seq":1} {"seq":2}"#, None, "invalid JSON");
    }

    #[test]
    fn wrong_types_and_missing_fields_are_errors_echoing_numeric_seq() {
        assert_error(
            r#"{"kind":"k","value":1,"seq":5}"#,
            Some("5"),
            "missing field \"sensor\"",
        );
        assert_error(
            r#"{"sensor":1,"kind":"k","value":1,"seq":5}"#,
            Some("5"),
            "\"sensor\" must be a string",
        );
        assert_error(
            r#"{"sensor":"s","kind":"k","value":"1","seq":5}"#,
            Some("5"),
            "\"value\" must be a number",
        );
        assert_error(
            r#"{"sensor":"s","kind":"k","value":1,"seq":"5"}"#,
            None,
            "\"seq\" must be a number",
        );
        assert_error(
            r#"{"sensor":"s","kind":"k","value":1,"seq":5,"ts":null}"#,
            Some("5"),
            "\"ts\" must be a number",
        );
        assert_error(
            r#"{"sensor":"s","kind":"k","value":true,"seq":1.5e0}"#,
            Some("1.5e0"),
            "\"value\"",
        );
        assert_error(r#"{"sensor":"s","kind":"k","value":1}"#, None, "\"seq\"");
    }

    #[test]
    fn duplicated_keys_are_errors() {
        assert_error(
            r#"{"sensor":"s","kind":"k","value":1,"value":2,"seq":5}"#,
            Some("5"),
            "duplicate key \"value\"",
        );
        assert_error(
            r#"{"sensor":"s","kind":"k","value":1,"seq":5,"seq":6}"#,
            None,
            "duplicate key \"seq\"",
        );
        assert_error(
            r#"{"sensor":"s","kind":"k","value":1,"seq":5,"x":1,"x":1}"#,
            Some("5"),
            "duplicate key \"x\"",
        );
        // Past sixteen keys the check switches to a hash set; it still finds repeats.
        let many: String = (0..40).map(|i| format!("\"k{i}\":1,")).collect();
        assert_error(
            &format!(r#"{{{many}"sensor":"s","kind":"k","value":1,"seq":5,"k39":2}}"#),
            Some("5"),
            "duplicate key \"k39\"",
        );
        assert!(matches!(
            verdict(&format!(
                r#"{{{many}"sensor":"s","kind":"k","value":1,"seq":5}}"#
            )),
            Verdict::Valid { .. }
        ));
    }

    #[test]
    fn seq_and_ts_must_be_plain_integers_in_range() {
        let base = |seq: &str, ts: &str| {
            format!(r#"{{"sensor":"s","kind":"k","value":1,"seq":{seq}{ts}}}"#)
        };
        for bad in [
            "1.5",
            "17.0",
            "1e2",
            "-1",
            "9007199254740992",
            "99999999999999999999",
        ] {
            assert_rejected(&base(bad, ""), bad, "seq must be");
        }
        assert!(matches!(
            verdict(&base("9007199254740991", "")),
            Verdict::Valid { .. }
        ));
        assert!(matches!(verdict(&base("-0", "")), Verdict::Valid { .. }));
        for bad in [",\"ts\":-5", ",\"ts\":1.0", ",\"ts\":1e3"] {
            assert_rejected(&base("3", bad), "3", "ts must be");
        }
    }

    #[test]
    fn values_must_be_finite_and_within_the_kind_range() {
        let line = |kind: &str, value: &str| {
            format!(r#"{{"sensor":"s","kind":"{kind}","value":{value},"seq":9}}"#)
        };
        assert_rejected(&line("other", "1e400"), "9", "finite");
        assert_rejected(&line("temperature", "-273.16"), "9", "temperature must lie");
        assert_rejected(
            &line("temperature", "1000.001"),
            "9",
            "temperature must lie",
        );
        assert_rejected(&line("humidity", "-0.1"), "9", "humidity must lie");
        assert_rejected(&line("humidity", "100.5"), "9", "humidity must lie");
        for ok in [
            line("temperature", "-273.15"),
            line("temperature", "1000"),
            line("humidity", "0"),
            line("humidity", "100"),
            line("pressure", "-1e300"),
        ] {
            assert!(matches!(verdict(&ok), Verdict::Valid { .. }), "{ok}");
        }
    }

    #[test]
    fn names_follow_their_character_rules() {
        let line = |sensor: &str, kind: &str| {
            format!(r#"{{"sensor":"{sensor}","kind":"{kind}","value":1,"seq":2}}"#)
        };
        let long = "a".repeat(65);
        for bad in ["", "has space", "ümlaut", long.as_str(), "a/b"] {
            assert_rejected(&line(bad, "k"), "2", "sensor must be");
        }
        assert!(matches!(
            verdict(&line(&"a".repeat(64), "k")),
            Verdict::Valid { .. }
        ));
        assert!(matches!(
            verdict(&line("A.z_0:9-", "k")),
            Verdict::Valid { .. }
        ));
        for bad in ["", "Temperature", "a-b", &"k".repeat(33)] {
            assert_rejected(&line("s", bad), "2", "kind must be");
        }
    }

    #[test]
    fn types_are_checked_before_rules() {
        // Bad name (a rule) and a wrong type: the type error wins.
        assert_error(
            r#"{"sensor":"bad name","kind":"k","value":null,"seq":1}"#,
            Some("1"),
            "\"value\"",
        );
    }

    #[test]
    fn blank_lines_are_recognised() {
        assert!(is_blank(b""));
        assert!(is_blank(b" \t\r"));
        assert!(!is_blank(b" x "));
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
        let busy: Reply = serde_json::from_slice(BUSY_REPLY).unwrap();
        assert_eq!(busy.error.as_deref(), Some("server busy"));
    }
}
