//! What a reading line must hold: one line in, one verdict out.
//!
//! Everything here is pure (no I/O, no shared state) so that the validation table of
//! `docs/protocol.md` can be tested line by line. The order of checks is part of the
//! contract: UTF-8, JSON, object, member types (`error`), rules (`rejected`); duplicates
//! are decided later against the store's state (see `server/store/ledger.rs`), because they depend
//! on what is durable. Two parsers reach the member types (`fast.rs`, `json.rs`, chosen
//! by `line.rs`); the rules here are one function both go through.

use std::borrow::Cow;

/// Largest `seq` a sensor may use: 2^53 - 1, the largest integer every JSON consumer can
/// represent exactly.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

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
    /// A valid reading for a sensor the connection's client certificate does not name
    /// (PROTOCOL.md v1.2): `rejected`, with the `reason`.
    Forbidden { seq: &'a str, reason: String },
    /// Passed every check; `seq_text` is what the reply echoes.
    Valid {
        reading: Reading<'a>,
        seq_text: &'a str,
    },
}

/// Members that have the right JSON types; numbers are still raw text.
#[derive(Debug, PartialEq)]
pub(super) struct Typed<'a> {
    pub sensor: Cow<'a, str>,
    pub kind: Cow<'a, str>,
    pub value: &'a str,
    pub seq: &'a str,
    pub ts: Option<&'a str>,
}

/// The rules (`rejected`) for members of the right types.
pub(super) fn check_rules(t: Typed<'_>) -> Verdict<'_> {
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
    let value = match parse_value(t.value) {
        Some(v) if v.is_finite() => v,
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
    (1..=64).contains(&id.len()) && id.bytes().all(|b| SENSOR_BYTES[b as usize])
}

/// A kind: 1 to 32 bytes of `[a-z0-9_]`.
pub fn valid_kind(kind: &str) -> bool {
    (1..=32).contains(&kind.len()) && kind.bytes().all(|b| KIND_BYTES[b as usize])
}

/// Lookup tables: one load per byte on the hot path instead of a chain of ranges.
const SENSOR_BYTES: [bool; 256] =
    byte_table(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-");
const KIND_BYTES: [bool; 256] = byte_table(b"abcdefghijklmnopqrstuvwxyz0123456789_");

const fn byte_table(allowed: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < allowed.len() {
        table[allowed[i] as usize] = true;
        i += 1;
    }
    table
}

/// The physical range of the kinds the protocol knows; other kinds take any finite value.
pub fn kind_range(kind: &str) -> Option<(f64, f64, &'static str)> {
    match kind {
        "temperature" => Some((-273.15, 1000.0, "degrees Celsius")),
        "humidity" => Some((0.0, 100.0, "percent RH")),
        _ => None,
    }
}

/// Eight ASCII digits as their value, or `None` if one is not a digit: all eight
/// checked and combined in a handful of word operations (pairs, then quads, then the
/// two halves), since seq and ts are 13 to 16 digits on every reading.
fn eight_digits(chunk: &[u8]) -> Option<u64> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut word = [0u8; 8];
    word.copy_from_slice(chunk);
    let w = u64::from_le_bytes(word);
    let below = w.wrapping_sub(ONES * 0x30) & !w;
    let above = w.wrapping_add(ONES * 0x46) | w;
    if (below | above) & HIGH != 0 {
        return None;
    }
    // The first digit is the lowest byte.
    let d = w - ONES * 0x30;
    let d = (d.wrapping_mul(10) + (d >> 8)) & 0x00ff_00ff_00ff_00ff;
    let d = (d.wrapping_mul(100) + (d >> 16)) & 0x0000_ffff_0000_ffff;
    Some((d.wrapping_mul(10_000) + (d >> 32)) & 0xffff_ffff)
}

/// A JSON number as an `f64`, correctly rounded. A plain decimal of at most 15 digits
/// (what sensors send: `23.4`, `-0.05`) takes Clinger's fast path: its digits as an
/// integer and the power of ten are both exact doubles, so one IEEE division rounds
/// correctly. Anything else goes to `str::parse`, whose grammar accepts every JSON
/// number (1e400 parses to infinity).
fn parse_value(text: &str) -> Option<f64> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mut mantissa, mut digits, mut fraction) = (0u64, 0usize, None);
    for &b in body.as_bytes() {
        match b {
            b'0'..=b'9' if digits < 15 => {
                mantissa = mantissa * 10 + u64::from(b - b'0');
                digits += 1;
                fraction = fraction.map(|f: usize| f + 1);
            }
            b'.' if fraction.is_none() => fraction = Some(0),
            _ => return text.parse().ok(),
        }
    }
    if digits == 0 {
        return text.parse().ok();
    }
    let magnitude = mantissa as f64 / POW10[fraction.unwrap_or(0)];
    Some(if negative { -magnitude } else { magnitude })
}

/// A JSON number written as a plain integer (no fraction, no exponent) that fits `u64`
/// and is not negative; `-0` is zero. One pass: digits are checked as they are added.
fn parse_integer(raw: &str) -> Option<u64> {
    let (negative, digits) = match raw.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, raw),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    if digits.len() <= 19 {
        // 19 digits never overflow a u64 (its maximum has 20): eight at a time, then
        // the rest one by one, without overflow checks.
        let mut chunks = digits.as_bytes().chunks_exact(8);
        for chunk in &mut chunks {
            n = n * 100_000_000 + eight_digits(chunk)?;
        }
        for &b in chunks.remainder() {
            let digit = b.wrapping_sub(b'0');
            if digit > 9 {
                return None;
            }
            n = n * 10 + u64::from(digit);
        }
    } else {
        for &b in digits.as_bytes() {
            let digit = b.wrapping_sub(b'0');
            if digit > 9 {
                return None;
            }
            n = n.checked_mul(10)?.checked_add(u64::from(digit))?;
        }
    }
    if negative && n != 0 { None } else { Some(n) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_exactly_as_the_standard_library_parses_them() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let fixed = [
            "0",
            "-0",
            "-0.0",
            "0.1",
            "23.4",
            "1.00000000000001",
            "999999999999999",
            "9999999999999999",
            "0.00000000000001",
            "1e3",
            "-1.5E-3",
            "1.",
            ".5",
            "-",
            "100000000000000000000",
        ];
        let mut texts: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
        for _ in 0..200_000 {
            let int_digits: u32 = rng.random_range(1..=9);
            let int: u64 = rng.random_range(0..10u64.pow(int_digits));
            let frac_digits: u32 = rng.random_range(0..=8);
            let frac: u64 = rng.random_range(0..10u64.pow(frac_digits));
            let sign = if rng.random_bool(0.5) { "-" } else { "" };
            texts.push(match frac_digits {
                0 => format!("{sign}{int}"),
                d => format!("{sign}{int}.{frac:0d$}", d = d as usize),
            });
        }
        for text in texts {
            let ours = parse_value(&text).map(f64::to_bits);
            let std = text.parse::<f64>().ok().map(f64::to_bits);
            assert_eq!(ours, std, "{text}");
        }
    }

    #[test]
    fn integers_parse_as_the_standard_library_parses_them() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(8);
        let mut texts: Vec<String> = [
            "0",
            "-0",
            "-1",
            "00",
            "18446744073709551615",
            "18446744073709551616",
            "1234567a",
            "12345678/",
            "9999999999999999999",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for _ in 0..100_000 {
            let len = rng.random_range(1..=20);
            let mut t: String = (0..len)
                .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
                .collect();
            if rng.random_bool(0.1) {
                let at = rng.random_range(0..len);
                let bad = [b'/', b':', b'a', b' ', 0x7f][rng.random_range(0..5)];
                t.replace_range(at..at + 1, &char::from(bad).to_string());
            }
            texts.push(t);
        }
        for text in texts {
            let std = match text.strip_prefix('-') {
                Some(d) if !d.starts_with('+') => d.parse::<u64>().ok().filter(|&n| n == 0),
                Some(_) => None,
                None if text.starts_with('+') => None,
                None => text.parse::<u64>().ok(),
            };
            assert_eq!(parse_integer(&text), std, "{text}");
        }
    }
}
