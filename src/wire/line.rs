//! One line in, one verdict out: the fast path for the usual shape of a reading
//! (`fast.rs`), serde_json for everything else (`json.rs`); both reach the same types
//! and rules (`reading.rs`). The tests here are the validation table of
//! `docs/protocol.md`, line by line.

use super::reading::{Verdict, check_rules};
use super::{fast, json};

/// True for lines that get no reply: empty, or only JSON whitespace (space, tab, CR).
/// `\n` never occurs inside a line; JSON also calls it whitespace, so it is accepted.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Checks one line (without its terminator) against the contract: the fast path for
/// the usual shape of a reading (`fast.rs`), the serde_json path for everything else.
pub fn parse_line(line: &[u8]) -> Verdict<'_> {
    match fast::typed(line) {
        Some(typed) => check_rules(typed),
        None => json::parse_line(line),
    }
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
    fn the_fast_path_and_the_serde_path_agree() {
        // The fuzz target `parsers` checks this on arbitrary bytes; these are the shapes
        // the fast path takes and the ones it must leave to serde_json.
        for line in [
            r#"{"sensor":"c1-t","kind":"temperature","value":23.4,"seq":17,"ts":1764230400123}"#,
            r#" {"ts":1,"seq":0,"value":-0.0,"kind":"k","sensor":"s","x":"y"} "#,
            r#"{"sensor":"c1","kind":"temperature","value":-273.16,"seq":1}"#,
            r#"{"sensor":"c1","kind":"humidity","value":1e2,"seq":9007199254740992}"#,
            r#"{"sensor":"bad name","kind":"k","value":1,"seq":1.5,"ts":-1}"#,
            r#"{"sensor":"é","kind":"k","value":1,"seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,"seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":01,"seq":1}"#,
            r#"{"sensor":"a","kind":"k","value":1,"seq":1,"ts":null}"#,
            r#"{"sensor":"ab","kind":"k","value":1,"seq":1}"#,
        ] {
            assert_eq!(
                parse_line(line.as_bytes()),
                json::parse_line(line.as_bytes()),
                "{line}"
            );
        }
        assert!(fast::typed(br#"{"sensor":"s","kind":"k","value":1,"seq":1}"#).is_some());
    }

    #[test]
    fn blank_lines_are_recognised() {
        assert!(is_blank(b""));
        assert!(is_blank(b" \t\r"));
        assert!(!is_blank(b" x "));
    }
}
