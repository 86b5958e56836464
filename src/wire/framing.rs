//! Line framing: which bytes of a connection's input form complete lines, and when a line
//! has become over-long.
//!
//! The event loop owns the bytes; this module only measures them, so that the loop can
//! hand whole lines to a worker without copying them twice and can stop at an over-long
//! line *before* anything after it is stored.

/// The result of scanning a connection's unprocessed input.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan {
    /// Bytes `[..end]` are complete lines (each with its `\n`), ready for a worker.
    pub end: usize,
    /// How many lines `[..end]` holds.
    pub lines: usize,
    /// The line starting at `end` is over-long: nothing at or after `end` may be
    /// processed, and the connection is to be answered and closed.
    pub overlong: bool,
}

/// Scans `buf` for at most `max_lines` complete lines.
///
/// A line's length excludes its terminator (`\n` or `\r\n`); a line longer than
/// `max_line_bytes` is over-long. An unterminated tail is over-long once it holds more
/// than `max_line_bytes + 1` bytes (room for a `\r` whose `\n` has not arrived yet), so a
/// client cannot make the server buffer more than that for one line.
pub fn scan(buf: &[u8], max_line_bytes: usize, max_lines: usize) -> Scan {
    let mut start = 0;
    let mut lines = 0;
    for newline in memchr::memchr_iter(b'\n', buf) {
        if lines == max_lines {
            return Scan {
                end: start,
                lines,
                overlong: false,
            };
        }
        let mut len = newline - start;
        if len > 0 && buf[newline - 1] == b'\r' {
            len -= 1;
        }
        if len > max_line_bytes {
            return Scan {
                end: start,
                lines,
                overlong: true,
            };
        }
        lines += 1;
        start = newline + 1;
    }
    Scan {
        end: start,
        lines,
        overlong: buf.len() - start > max_line_bytes + 1,
    }
}

/// Splits a block of complete lines into lines without their terminators; a final line
/// without `\n` is a line too. memchr finds each newline a word at a time (a byte loop
/// here was half of a worker's own time).
pub fn lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = block;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_lines_are_found_and_the_tail_is_kept() {
        let s = scan(b"a\nbb\r\nccc", 10, 100);
        assert_eq!(
            s,
            Scan {
                end: 6,
                lines: 2,
                overlong: false
            }
        );
        let got: Vec<&[u8]> = lines(&b"a\nbb\r\nccc"[..s.end]).collect();
        let tail: Vec<&[u8]> = lines(b"x\n\nlast\r").collect();
        assert_eq!(tail, [&b"x"[..], b"", b"last"]);
        assert_eq!(got, vec![&b"a"[..], b"bb"]);
    }

    #[test]
    fn a_line_split_anywhere_frames_the_same() {
        let input = b"{\"x\":1}\r\n\n{\"y\":22}\n";
        for cut in 0..input.len() {
            // The first part never contains a line the whole input lacks.
            let first = scan(&input[..cut], 100, 100);
            let whole = scan(input, 100, 100);
            assert!(first.end <= whole.end);
            assert!(!first.overlong);
            let rest = scan(&input[first.end..], 100, 100);
            assert_eq!(first.lines + rest.lines, 3, "cut at {cut}");
            assert_eq!(first.end + rest.end, input.len());
        }
    }

    #[test]
    fn the_terminator_does_not_count_toward_the_length() {
        assert!(!scan(b"12345\n", 5, 10).overlong);
        assert!(!scan(b"12345\r\n", 5, 10).overlong);
        let s = scan(b"ok\n123456\nnext\n", 5, 10);
        assert_eq!(
            s,
            Scan {
                end: 3,
                lines: 1,
                overlong: true
            }
        );
    }

    #[test]
    fn an_unterminated_tail_is_overlong_past_max_plus_one() {
        assert!(!scan(b"12345", 5, 10).overlong);
        assert!(!scan(b"12345\r", 5, 10).overlong);
        assert!(scan(b"1234567", 5, 10).overlong);
        assert!(scan(b"a\n1234567", 5, 10).overlong);
    }

    #[test]
    fn at_most_max_lines_are_taken() {
        let s = scan(b"a\nb\nc\nd", 5, 2);
        assert_eq!(
            s,
            Scan {
                end: 4,
                lines: 2,
                overlong: false
            }
        );
    }
}
