//! Framing under arbitrary arrival: the input arrives in chunks of any size, and the
//! event loop's use of `scan` (hand out at most `max_lines` complete lines, drop them,
//! scan again) must yield exactly the lines of the whole stream, stop at the first
//! over-long line and flag it, and never buffer an unterminated line past the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorhub::wire::framing::{lines, scan};

/// The stream's lines up to the first over-long one, and whether there is one: split
/// at `\n`, one `\r` before it dropped; an unterminated tail over `max + 1` bytes counts.
fn model(stream: &[u8], max: usize) -> (Vec<Vec<u8>>, bool) {
    let mut out = Vec::new();
    let mut rest = stream;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..i];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > max {
            return (out, true);
        }
        out.push(line.to_vec());
        rest = &rest[i + 1..];
    }
    (out, rest.len() > max + 1)
}

fuzz_target!(|data: &[u8]| {
    let [a, b, c, stream @ ..] = data else {
        return;
    };
    let max = *a as usize % 64 + 1;
    let max_lines = *b as usize % 8 + 1;
    let chunk = *c as usize % 16 + 1;

    let mut input = Vec::new();
    let mut got = Vec::new();
    let mut overlong = false;
    'arrival: for piece in stream.chunks(chunk) {
        input.extend_from_slice(piece);
        loop {
            let s = scan(&input, max, max_lines);
            assert!(s.lines <= max_lines);
            assert!(s.end == 0 || input[s.end - 1] == b'\n');
            let block: Vec<Vec<u8>> = lines(&input[..s.end]).map(<[u8]>::to_vec).collect();
            assert_eq!(block.len(), s.lines);
            got.extend(block);
            input.drain(..s.end);
            if s.lines == 0 {
                if s.overlong {
                    overlong = true;
                    break 'arrival;
                }
                break;
            }
        }
        assert!(
            input.len() <= max + 1,
            "buffered {} bytes of one line",
            input.len()
        );
    }
    assert_eq!((got, overlong), model(stream, max));
});
