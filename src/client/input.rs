//! `--stdin`: real sensors instead of simulated ones. Each line of standard input is one
//! value for `--sensor`/`--kind`: a number (`21.5`), or a JSON object with `value` and
//! an optional `ts` (Unix milliseconds) (`{"value":21.5,"ts":1764230400123}`). The
//! client adds the seq (and the ts when the line has none).
//!
//! A thread reads the lines (a blocking read has no place on the loop), gives each a
//! seq, appends the batch to the spool when there is one, and only then hands it to the
//! loop over a bounded channel, ringing the loop's waker. The loop takes readings only
//! while the link's queue has room (`--buffer`), so a server that is down or slow
//! stops the reading thread on the full channel, and the program writing to the pipe
//! on the full pipe: nothing piles up in memory.
//!
//! A line that is not a value is reported with its number and skipped; the client then
//! exits non-zero at the end of input, once everything else is answered.

use crate::client::simulate::{SeqClock, unix_micros};
use crate::client::spool::{Spool, Spooled};
use log::warn;
use mio::Waker;
use serde::Deserialize;
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::time::Duration;

/// Lines handed to the loop at once at most (one spool sync covers them all).
const MAX_BATCH: usize = 1024;
/// Batches waiting for the loop at most.
const CHANNEL_BATCHES: usize = 4;
/// A longer line is not a value (and is not kept whole in memory).
const MAX_LINE_BYTES: usize = 4096;
/// How long the reading thread waits before trying a failed spool append again.
const SPOOL_RETRY: Duration = Duration::from_secs(1);

/// What the reading thread tells the loop.
enum Input {
    Batch(Vec<Spooled>),
    End(Ended),
}

/// How the input ended.
#[derive(Debug, Default)]
pub(super) struct Ended {
    /// Lines that were not values (each reported when read).
    pub bad_lines: u64,
    /// Reading standard input failed (it did not simply end).
    pub error: Option<String>,
    /// Handed back so the loop can empty it once everything is answered.
    pub spool: Option<Spool>,
}

/// The loop's end of the input: readings in the order read, the spool's replay first.
pub(super) struct Feed {
    input: Receiver<Input>,
    backlog: VecDeque<Spooled>,
    ended: Option<Ended>,
    /// The seq of the last reading answered (the spool's compaction keeps what follows).
    answered: Arc<AtomicU64>,
}

impl Feed {
    /// Starts the thread reading `source`; `replay` (the spool's readings) comes first,
    /// and new seqs follow both it and the clock.
    pub(super) fn start(
        source: impl Read + Send + 'static,
        replay: Vec<Spooled>,
        spool: Option<Spool>,
        waker: Waker,
    ) -> io::Result<Feed> {
        let mut clock = SeqClock::default();
        if let Some(last) = replay.iter().map(|r| r.seq).max() {
            clock.next(last);
        }
        let answered = Arc::new(AtomicU64::new(0));
        let (tx, rx) = sync_channel(CHANNEL_BATCHES);
        let reader = Reader {
            source: BufReader::with_capacity(64 * 1024, source),
            clock,
            spool,
            answered: Arc::clone(&answered),
            out: tx,
            waker,
            line_no: 0,
            ended: Ended::default(),
        };
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || reader.run())?;
        Ok(Feed {
            input: rx,
            backlog: replay.into(),
            ended: None,
            answered,
        })
    }

    /// The next reading, if one has been read.
    pub(super) fn next(&mut self) -> Option<Spooled> {
        if self.backlog.is_empty() && self.ended.is_none() {
            match self.input.try_recv() {
                Ok(Input::Batch(batch)) => self.backlog.extend(batch),
                Ok(Input::End(ended)) => self.ended = Some(ended),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    self.ended = Some(Ended {
                        error: Some("the thread reading it stopped".into()),
                        ..Ended::default()
                    });
                }
            }
        }
        self.backlog.pop_front()
    }

    /// The input has ended and every reading of it was taken: how it ended.
    pub(super) fn ended(&mut self) -> Option<&mut Ended> {
        match self.backlog.is_empty() {
            true => self.ended.as_mut(),
            false => None,
        }
    }

    /// The reading with `seq` was answered (readings are answered in the order read).
    pub(super) fn answered(&self, seq: u64) {
        self.answered.store(seq, Ordering::Relaxed);
    }
}

/// The reading thread.
struct Reader<R> {
    source: BufReader<R>,
    clock: SeqClock,
    spool: Option<Spool>,
    answered: Arc<AtomicU64>,
    out: SyncSender<Input>,
    waker: Waker,
    line_no: u64,
    ended: Ended,
}

impl<R: Read> Reader<R> {
    fn run(mut self) {
        let mut line = Vec::with_capacity(128);
        loop {
            let mut batch = Vec::new();
            let mut at_end = false;
            // The first line waits for input; the rest of a batch is what has already
            // arrived, so one spool sync covers a burst.
            loop {
                match read_line(&mut self.source, &mut line) {
                    Ok(Line::Text) => self.take(&line, &mut batch),
                    Ok(Line::TooLong) => {
                        self.line_no += 1;
                        self.bad(&format_args!("longer than {MAX_LINE_BYTES} bytes"));
                    }
                    Ok(Line::End) => at_end = true,
                    Err(e) => {
                        self.ended.error = Some(e.to_string());
                        at_end = true;
                    }
                }
                let more_ready = self.source.buffer().contains(&b'\n');
                if at_end || batch.len() >= MAX_BATCH || !more_ready {
                    break;
                }
            }
            if !batch.is_empty() {
                self.spool(&batch);
                if !self.send(Input::Batch(batch)) {
                    return;
                }
            }
            if at_end {
                self.ended.spool = self.spool.take();
                let ended = std::mem::take(&mut self.ended);
                self.send(Input::End(ended));
                return;
            }
        }
    }

    /// One line of input: a reading appended to `batch`, or reported.
    fn take(&mut self, line: &[u8], batch: &mut Vec<Spooled>) {
        self.line_no += 1;
        match parse_value(line) {
            Ok(Some(value)) => {
                let micros = unix_micros();
                batch.push(Spooled {
                    seq: self.clock.next(micros),
                    ts_ms: value.ts_ms.unwrap_or(micros / 1000),
                    value: value.value,
                });
            }
            Ok(None) => {}
            Err(why) => self.bad(&why),
        }
    }

    fn bad(&mut self, why: &dyn std::fmt::Display) {
        self.ended.bad_lines += 1;
        warn!("stdin line {}: {why}; skipped", self.line_no);
    }

    /// Appends `batch` to the spool, retrying until it is kept (a full disk): a value
    /// read is sent only once a crash can no longer lose it. Meanwhile nothing more is
    /// read, so the writer of the pipe waits.
    fn spool(&mut self, batch: &[Spooled]) {
        let Some(spool) = &mut self.spool else {
            return;
        };
        let mut warned = false;
        while let Err(e) = spool.append(batch) {
            if !warned {
                warn!(
                    "spool {}: cannot append ({e}); reading waits and retries every {} s",
                    spool.dir().display(),
                    SPOOL_RETRY.as_secs()
                );
                warned = true;
            }
            std::thread::sleep(SPOOL_RETRY);
        }
        if let Err(e) = spool.compact_if_grown(self.answered.load(Ordering::Relaxed)) {
            warn!(
                "spool {}: cannot rewrite it smaller ({e}); it keeps growing",
                spool.dir().display()
            );
        }
    }

    /// Hands `input` to the loop, waiting while it is busy; false once the loop is gone.
    fn send(&mut self, input: Input) -> bool {
        if self.out.send(input).is_err() {
            return false;
        }
        // A loop that cannot be woken still finds the input on its next pass.
        let _ = self.waker.wake();
        true
    }
}

enum Line {
    Text,
    TooLong,
    End,
}

/// Reads one line into `line` (without its `\n`), keeping at most `MAX_LINE_BYTES` of
/// it in memory.
fn read_line(source: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Line> {
    line.clear();
    let mut too_long = false;
    loop {
        let limit = (MAX_LINE_BYTES + 1).saturating_sub(line.len()) as u64;
        let read = source.by_ref().take(limit).read_until(b'\n', line)?;
        if line.last() == Some(&b'\n') {
            line.pop();
            break;
        }
        if read == 0 {
            // The end of input, after a last line without its `\n` or after nothing.
            if line.is_empty() && !too_long {
                return Ok(Line::End);
            }
            break;
        }
        if line.len() > MAX_LINE_BYTES {
            too_long = true;
            line.clear();
        }
    }
    Ok(if too_long { Line::TooLong } else { Line::Text })
}

/// A value and its optional ts, as read from one line.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Value {
    value: f64,
    #[serde(rename = "ts")]
    ts_ms: Option<u64>,
}

/// The value on `line`; `None` for a blank line.
fn parse_value(line: &[u8]) -> Result<Option<Value>, String> {
    let text = std::str::from_utf8(line)
        .map_err(|_| "not UTF-8".to_string())?
        .trim();
    if text.is_empty() {
        return Ok(None);
    }
    let value = if text.starts_with('{') {
        serde_json::from_str::<Value>(text).map_err(|e| {
            format!("{e} (give a number, or {{\"value\": NUMBER, \"ts\": UNIX_MS}})")
        })?
    } else {
        let value = text.parse::<f64>().map_err(|_| {
            let shown: String = text.chars().take(40).collect();
            format!("{shown:?} is not a number")
        })?;
        Value { value, ts_ms: None }
    };
    if !value.value.is_finite() {
        return Err(format!("{} is not a finite number", value.value));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(line: &str) -> Result<Option<Value>, String> {
        parse_value(line.as_bytes())
    }

    #[test]
    fn a_line_is_a_number_or_an_object_with_value_and_ts() {
        let v = |value, ts_ms| Ok(Some(Value { value, ts_ms }));
        assert_eq!(value("21.5"), v(21.5, None));
        assert_eq!(value("  -3e2\r"), v(-300.0, None));
        assert_eq!(value(r#"{"value": 21.5}"#), v(21.5, None));
        assert_eq!(
            value(r#"{"value":7,"ts":1764230400123}"#),
            v(7.0, Some(1_764_230_400_123))
        );
        assert_eq!(value(""), Ok(None));
        assert_eq!(value(" \t"), Ok(None));
    }

    #[test]
    fn what_is_not_a_value_says_why() {
        for (line, why) in [
            ("abc", "\"abc\" is not a number"),
            ("NaN", "not a finite number"),
            ("inf", "not a finite number"),
            (r#"{"value":"21"}"#, "invalid type"),
            (r#"{"value":1,"ts":-5}"#, "invalid value"),
            (r#"{"value":1,"unit":"C"}"#, "unknown field `unit`"),
            (r#"{"ts":5}"#, "missing field `value`"),
            (r#"{"value":1e400}"#, "number out of range"),
            ("21,5", "is not a number"),
        ] {
            let e = value(line).expect_err(line);
            assert!(e.contains(why), "{line}: {e}");
        }
        assert!(parse_value(b"\xff\xfe").is_err_and(|e| e.contains("UTF-8")));
    }

    #[test]
    fn lines_are_split_bounded_and_the_last_needs_no_newline() {
        let long = "9".repeat(MAX_LINE_BYTES + 10);
        let input = format!("1\n{long}\n2\n3");
        let mut source = BufReader::with_capacity(64, input.as_bytes());
        let mut line = Vec::new();
        let mut seen = Vec::new();
        loop {
            match read_line(&mut source, &mut line).expect("read") {
                Line::Text => seen.push(String::from_utf8_lossy(&line).into_owned()),
                Line::TooLong => seen.push("too long".into()),
                Line::End => break,
            }
        }
        assert_eq!(seen, ["1", "too long", "2", "3"]);
    }
}
