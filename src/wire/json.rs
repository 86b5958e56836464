//! The serde_json path: any line, decided exactly as the contract says, with the
//! error messages sensors see. Slower than `fast.rs` (it walks the JSON twice and may
//! allocate), but complete: escapes, nested values, duplicated keys, every malformed
//! input. It is the oracle the fast path is fuzzed against.

use super::reading::{Typed, Verdict, check_rules};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Checks one line (without its terminator) against the contract, with serde_json:
/// the definition every other parser must agree with (see the fuzz target `parsers`).
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
