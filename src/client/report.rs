//! What the client tells its user: the totals, reply latencies, the `--record` file,
//! the progress line on a terminal and the summary at exit.

use crate::wire::reply::Status;
use hdrhistogram::Histogram;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Totals printed at exit.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub sent: u64,
    pub resent: u64,
    pub ok: u64,
    pub duplicate: u64,
    pub rejected: u64,
    pub error: u64,
    pub reconnects: u64,
    pub generation_waits: u64,
    /// Replies whose seq did not match the reading they answer.
    pub violations: u64,
    /// Connections dropped for exceeding the reply timeout.
    pub stalls: u64,
}

impl Totals {
    pub fn answered(&self) -> u64 {
        self.ok + self.duplicate + self.rejected + self.error
    }

    /// Readings the server has stored (`ok`, or `duplicate` of a stored one).
    pub fn acknowledged(&self) -> u64 {
        self.ok + self.duplicate
    }
}

/// The totals, reply latencies and the record file.
pub(super) struct Report {
    pub totals: Totals,
    /// Microseconds from send to reply.
    latency: Histogram<u64>,
    record: Option<BufWriter<File>>,
}

impl Report {
    /// `record`: append "SENSOR SEQ STATUS" for every answer to this file.
    pub(super) fn new(record: Option<&Path>) -> Result<Report, String> {
        let record = match record {
            Some(path) => Some(BufWriter::new(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
            )),
            None => None,
        };
        Ok(Report {
            totals: Totals::default(),
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?,
            record,
        })
    }

    /// Counts one answer to a reading of `sensor` sent `waited` ago.
    pub(super) fn answer(
        &mut self,
        status: Status,
        sensor: &str,
        seq: u64,
        waited: Duration,
    ) -> io::Result<()> {
        let t = &mut self.totals;
        match status {
            Status::Ok => t.ok += 1,
            Status::Duplicate => t.duplicate += 1,
            Status::Rejected => t.rejected += 1,
            Status::Error => t.error += 1,
        }
        let _ = self.latency.record((waited.as_micros() as u64).max(1));
        if let Some(record) = &mut self.record {
            writeln!(record, "{sensor} {seq} {}", status.as_str())?;
        }
        Ok(())
    }

    /// Flushes the record file.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        match &mut self.record {
            Some(record) => record.flush(),
            None => Ok(()),
        }
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The summary scripts read (`sent ... latency p50 ... ms p99 ... ms`).
    pub(super) fn summary_line(&self) -> String {
        let t = &self.totals;
        let mut line = format!(
            "sent {} resent {} ok {} duplicate {} rejected {} error {} reconnects {} latency p50 {:.3} ms p99 {:.3} ms",
            t.sent,
            t.resent,
            t.ok,
            t.duplicate,
            t.rejected,
            t.error,
            t.reconnects,
            self.ms(0.5),
            self.ms(0.99)
        );
        if t.stalls > 0 || t.violations > 0 {
            line.push_str(&format!(
                " stalled-connections {} protocol-violations {}",
                t.stalls, t.violations
            ));
        }
        line
    }

    /// The benchmark's line: throughput and latency percentiles since `started`.
    pub(super) fn bench_line(&self, started: Instant) -> String {
        let secs = started.elapsed().as_secs_f64();
        let answered = self.totals.answered();
        format!(
            "bench: {answered} readings in {secs:.2} s = {:.0} readings/s; latency p50 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms max {:.3} ms",
            answered as f64 / secs,
            self.ms(0.5),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1000.0
        )
    }

    /// What a person watching the terminal wants: who, how many stored, how fast, how
    /// many waiting for an answer, how often the connection was lost.
    pub(super) fn progress_line(
        &self,
        who: &str,
        (since, acked_then): (Instant, u64),
        now: Instant,
        in_flight: usize,
    ) -> String {
        let t = &self.totals;
        let secs = now.saturating_duration_since(since).as_secs_f64().max(1e-3);
        format!(
            "{who}: {} stored ({:.1}/s), {in_flight} in flight, {} reconnects",
            t.acknowledged(),
            (t.acknowledged() - acked_then) as f64 / secs,
            t.reconnects
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_timed_and_summarised() {
        let mut r = Report::new(None).unwrap();
        r.answer(Status::Ok, "s", 1, Duration::from_millis(2))
            .unwrap();
        r.answer(Status::Duplicate, "s", 1, Duration::from_millis(4))
            .unwrap();
        r.answer(Status::Rejected, "s", 2, Duration::from_millis(4))
            .unwrap();
        assert_eq!((r.totals.answered(), r.totals.acknowledged()), (3, 2));
        let line = r.summary_line();
        assert!(
            line.starts_with("sent 0 resent 0 ok 1 duplicate 1 rejected 1 error 0"),
            "{line}"
        );
        assert!(!line.contains("protocol-violations"), "{line}");
        let start = Instant::now();
        let progress = r.progress_line("s", (start, 0), start + Duration::from_secs(2), 5);
        assert_eq!(progress, "s: 2 stored (1.0/s), 5 in flight, 0 reconnects");
    }
}
