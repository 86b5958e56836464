//! The fast path: a reading in its usual shape, typed straight from the line's bytes.
//!
//! A sensor's line is almost always one flat JSON object of plain ASCII strings and
//! numbers. This parser reads exactly that, in any key order, without allocating, and
//! gives up (`None`) on everything else: escapes, invalid UTF-8, nested values,
//! `true`/`false`/`null`, a missing or duplicated member, a member of the wrong type,
//! malformed JSON. The serde_json path (`json.rs`) then decides the line, error message
//! and all, so it stays the one definition of the contract; the fuzz target
//! `fuzz/fuzz_targets/parsers.rs` checks that both reach the same verdict on any bytes.

use super::reading::Typed;
use std::borrow::Cow;

/// Unknown members the fast path keeps track of (to notice a duplicated one) before it
/// hands the line to the serde path.
const MAX_OTHER_KEYS: usize = 8;

/// The typed members of `line` if it has the usual shape, else `None`.
pub(super) fn typed(line: &[u8]) -> Option<Typed<'_>> {
    // One UTF-8 check for the whole line (word at a time for ASCII); the members are
    // then slices of `text`, each cut at an ASCII delimiter.
    let text = std::str::from_utf8(line).ok()?;
    let mut p = Cursor {
        text,
        bytes: line,
        at: 0,
    };
    let mut known: [Option<&str>; 5] = [None; 5];
    let mut others = OtherKeys::default();
    p.skip_whitespace();
    p.expect(b'{')?;
    p.skip_whitespace();
    loop {
        let slot = match p.known_key() {
            Some(slot) => slot,
            None => match p.string()? {
                "sensor" => 0,
                "kind" => 1,
                "value" => 2,
                "seq" => 3,
                "ts" => 4,
                other => {
                    others.insert(other)?;
                    5
                }
            },
        };
        p.skip_whitespace();
        p.expect(b':')?;
        p.skip_whitespace();
        if slot == 5 {
            p.scalar()?;
        }
        if slot < 5 {
            if known[slot].is_some() {
                return None;
            }
            known[slot] = Some(if slot < 2 { p.string()? } else { p.number()? });
        }
        p.skip_whitespace();
        match p.next()? {
            b',' => p.skip_whitespace(),
            b'}' => break,
            _ => return None,
        }
    }
    p.skip_whitespace();
    if p.at != line.len() {
        return None;
    }
    let [sensor, kind, value, seq, ts] = known;
    Some(Typed {
        sensor: Cow::Borrowed(sensor?),
        kind: Cow::Borrowed(kind?),
        value: value?,
        seq: seq?,
        ts,
    })
}

/// The keys of members the protocol does not know, to notice a duplicated one.
#[derive(Default)]
struct OtherKeys<'a> {
    keys: [&'a str; MAX_OTHER_KEYS],
    len: usize,
}

impl<'a> OtherKeys<'a> {
    /// `None` for a key seen before, or one too many to track.
    fn insert(&mut self, key: &'a str) -> Option<()> {
        if self.len == MAX_OTHER_KEYS || self.keys[..self.len].contains(&key) {
            return None;
        }
        self.keys[self.len] = key;
        self.len += 1;
        Some(())
    }
}

struct Cursor<'a> {
    text: &'a str,
    /// `text` as bytes.
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// `text[start..end]`; both ends sit next to ASCII bytes, so this never fails.
    fn slice(&self, start: usize, end: usize) -> Option<&'a str> {
        self.text.get(start..end)
    }

    /// One of the five members' keys, quotes included, compared as whole byte strings
    /// (the usual case, without scanning them as strings); its slot in `typed`.
    fn known_key(&mut self) -> Option<usize> {
        const KEYS: [&[u8]; 5] = [
            b"\"sensor\"",
            b"\"kind\"",
            b"\"value\"",
            b"\"seq\"",
            b"\"ts\"",
        ];
        let rest = self.bytes.get(self.at..)?;
        let slot = match rest.get(1)? {
            b's' if rest.get(2) == Some(&b'e') && rest.get(3) == Some(&b'n') => 0,
            b's' => 3,
            b'k' => 1,
            b'v' => 2,
            b't' => 4,
            _ => return None,
        };
        let key = KEYS[slot];
        if !rest.starts_with(key) {
            return None;
        }
        self.at += key.len();
        Some(slot)
    }

    /// A string without escapes (which JSON forbids control characters in); its content.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let end = string_end(self.bytes, start)?;
        if self.bytes.get(end) != Some(&b'"') {
            return None;
        }
        self.at = end + 1;
        self.slice(start, end)
    }

    /// A number as JSON writes it: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`;
    /// its text.
    fn number(&mut self) -> Option<&'a str> {
        let (b, start) = (self.bytes, self.at);
        let mut i = start + usize::from(b.get(start) == Some(&b'-'));
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits_end(b, i + 1),
            _ => return None,
        }
        if b.get(i) == Some(&b'.') {
            i = one_or_more_digits(b, i + 1)?;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            i += usize::from(matches!(b.get(i), Some(b'+' | b'-')));
            i = one_or_more_digits(b, i)?;
        }
        self.at = i;
        self.slice(start, i)
    }

    /// The value of a member the protocol does not know: a plain string or a number.
    fn scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            _ => self.number().map(drop),
        }
    }
}

/// The index of the first `"`, `\\` or control character at or after `i`: eight bytes
/// at a time (SWAR), since scanning strings byte by byte was the fast path's largest
/// cost. In each word, `(x - 0x01..) & !x & 0x80..` flags the bytes of `x` that are
/// zero (for `x = w ^ c`: the bytes equal to `c`) and `(w - 0x20..) & !w & 0x80..` the
/// bytes below 0x20; a flag can be false only above a true one in the same word, so the
/// lowest flag is the first match.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let hits = (zero_bytes(w ^ (ONES * u64::from(b'"')))
            | zero_bytes(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w))
            & HIGH;
        if hits != 0 {
            return Some(i + hits.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    let tail = b.get(i..)?;
    let at = tail
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    Some(i + at)
}

/// Where the run of ASCII digits starting at `i` ends, eight bytes at a time like
/// `string_end`: `(w - 0x30..) & !w` flags bytes below `0`, `(w + 0x46..) | w` bytes
/// above `9` (0x7f - 0x39 = 0x46); carries and borrows start only at a flagged byte, so
/// the lowest flag is the first non-digit.
fn digits_end(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    while let Some(chunk) = b.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let below = w.wrapping_sub(ONES * 0x30) & !w;
        let above = w.wrapping_add(ONES * 0x46) | w;
        let hits = (below | above) & HIGH;
        if hits != 0 {
            return i + hits.trailing_zeros() as usize / 8;
        }
        i += 8;
    }
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    i
}

/// Like `digits_end`, but `None` unless there is at least one digit.
fn one_or_more_digits(b: &[u8], i: usize) -> Option<usize> {
    let end = digits_end(b, i);
    (end > i).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(line: &str) -> Option<(String, String, String, String, Option<String>)> {
        typed(line.as_bytes()).map(|t| {
            (
                t.sensor.into_owned(),
                t.kind.into_owned(),
                t.value.to_owned(),
                t.seq.to_owned(),
                t.ts.map(str::to_owned),
            )
        })
    }

    #[test]
    fn the_usual_shape_is_read_in_any_order_with_any_whitespace() {
        let expected = Some((
            "s-1".into(),
            "temperature".into(),
            "21.5".into(),
            "7".into(),
            Some("1700000000000".into()),
        ));
        assert_eq!(
            fast(
                r#"{"sensor":"s-1","kind":"temperature","value":21.5,"seq":7,"ts":1700000000000}"#
            ),
            expected
        );
        assert_eq!(
            fast(
                " \t{ \"ts\" : 1700000000000 ,\"seq\":7,\"value\" :21.5,\"kind\":\"temperature\",\"sensor\":\"s-1\"}\r "
            ),
            expected
        );
        assert_eq!(
            fast(r#"{"sensor":"a","kind":"k","value":-1.5e-3,"seq":0,"unit":"C","n":2}"#),
            Some(("a".into(), "k".into(), "-1.5e-3".into(), "0".into(), None))
        );
    }

    #[test]
    fn string_ends_are_found_in_every_position_of_a_word() {
        for len in 0..40 {
            for stop in [b'"', b'\\', b'\n', 0x00, 0x1f] {
                let mut b = vec![b'a'; len];
                b.extend_from_slice(&[stop, b'"', b'z']);
                assert_eq!(string_end(&b, 0), Some(len), "len {len}, stop {stop}");
            }
            let mut b = "é~\u{7f}".repeat(len).into_bytes();
            b.push(b'"');
            assert_eq!(
                string_end(&b, 0),
                Some(b.len() - 1),
                "non-ASCII and DEL pass"
            );
            assert_eq!(string_end(&vec![b'a'; len], 0), None);
        }
    }

    #[test]
    fn digit_runs_end_at_the_first_non_digit_in_every_position() {
        for len in 0..40 {
            for stop in [b'/', b':', b'.', b'e', 0x00, 0x7f, 0x80, 0xff] {
                let mut b: Vec<u8> = (0..len).map(|k| b'0' + (k % 10) as u8).collect();
                b.extend_from_slice(&[stop, b'9', b'0']);
                assert_eq!(digits_end(&b, 0), len, "len {len}, stop {stop}");
            }
            let digits = vec![b'7'; len];
            assert_eq!(digits_end(&digits, 0), len);
        }
    }

    #[test]
    fn anything_unusual_is_left_to_the_serde_path() {
        for line in [
            r#"{"sensor":"s\u0031","kind":"k","value":1,"seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,"é":{}}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,"ts":null}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,"x":{}}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,"x":true}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,"seq":2}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,"x":1,"x":2}"#,
            r#"{"sensor":"a","kind":"k","value":"1","seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":01,"seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":1.,"seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":1e,"seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":+1,"seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1}x"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,}"#,
            r#"{"sensor":"a","kind":"k","value":1}"#,
            r#"{"sensor":"a","kind":"k","value":1 2,"seq":1}"#,
            r#"{}"#,
            r#"[1]"#,
            "",
        ] {
            assert_eq!(fast(line), None, "{line}");
        }
    }
}
