//! Prometheus text exposition (format 0.0.4): a lock-free histogram and the writers for
//! counters, gauges and histograms.
//!
//! A fixed-bucket histogram is a dozen lines; pulling a metrics crate for it would bring
//! a registry and global state the single event loop does not need.

use crate::wire::reply::Status;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Bucket bounds, in seconds, for latencies from tens of microseconds (a reply with
/// `--fsync never`) to seconds (a stalled disk).
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// The reasons a TLS handshake fails for, listed at zero so a dashboard sees them all.
const TLS_FAILURE_REASONS: [&str; 10] = [
    "timeout",
    "not_tls",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "no_certificate",
    "bad_certificate",
    "peer_alert",
    "closed",
    "io",
];

/// Counters the event loop owns (it also serves `/metrics`, so no sharing is needed).
pub(crate) struct LoopStats {
    pub connections_total: u64,
    pub connections_refused: u64,
    pub bytes_received: u64,
    /// Replies sent, indexed by `Status as usize`.
    pub readings: [u64; 4],
    /// TLS handshakes completed on the sensor port.
    pub tls_handshakes: u64,
    /// TLS handshakes that failed, by reason (a handful of fixed names).
    pub tls_failures: Vec<(&'static str, u64)>,
    pub reply_seconds: Histogram,
}

impl Default for LoopStats {
    fn default() -> Self {
        LoopStats {
            connections_total: 0,
            connections_refused: 0,
            bytes_received: 0,
            readings: [0; 4],
            tls_handshakes: 0,
            tls_failures: TLS_FAILURE_REASONS.iter().map(|&r| (r, 0)).collect(),
            reply_seconds: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl LoopStats {
    /// Counts a failed TLS handshake.
    pub(crate) fn tls_failed(&mut self, reason: &'static str) {
        match self.tls_failures.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.tls_failures.push((reason, 1)),
        }
    }

    /// Counts `n` replies of `status` to lines that arrived at `since`.
    pub(crate) fn count_replies(&mut self, status: Status, n: u64, since: Instant) {
        if n == 0 {
            return;
        }
        self.readings[status as usize] += n;
        self.reply_seconds
            .observe_n(since.elapsed().as_secs_f64(), n);
    }
}

/// A cumulative-on-render Prometheus histogram that threads can update without a lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// `counts[i]` counts observations in `(bounds[i-1], bounds[i]]`; the last is +Inf.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records `n` observations of `seconds` at once: a batch of replies written together
    /// shares one latency.
    pub fn observe_n(&self, seconds: f64, n: u64) {
        if n == 0 {
            return;
        }
        let bucket = self.bounds.partition_point(|&b| b < seconds);
        self.counts[bucket].fetch_add(n, Relaxed);
        self.sum_nanos
            .fetch_add((seconds * 1e9) as u64 * n, Relaxed);
    }

    pub fn observe(&self, seconds: f64) {
        self.observe_n(seconds, 1);
    }

    /// Total number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Relaxed);
            match self.bounds.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Builds one exposition document; each metric gets its HELP and TYPE lines.
#[derive(Default)]
pub(crate) struct Exposition {
    out: String,
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub(crate) fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    pub(crate) fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A counter with one label, one sample per `(label value, count)`.
    pub(crate) fn labelled_counter(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: &[(&str, u64)],
    ) {
        self.header(name, "counter", help);
        for (value, count) in samples {
            let _ = writeln!(self.out, "{name}{{{label}=\"{value}\"}} {count}");
        }
    }

    pub(crate) fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.header(name, "histogram", help);
        histogram.render(&mut self.out, name);
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe_n(0.5, 2);
        h.observe(0.1); // a bound is inclusive: le="0.1"
        h.observe(3.0);
        let mut e = Exposition::default();
        e.histogram("x_seconds", "test", &h);
        let text = e.finish();
        assert!(text.contains("x_seconds_bucket{le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"1\"} 4\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("x_seconds_count 5\n"), "{text}");
        assert!(text.contains("x_seconds_sum 4.15"), "{text}");
        assert!(text.starts_with("# HELP x_seconds test\n# TYPE x_seconds histogram\n"));
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn counters_and_labels_render_in_text_format() {
        let mut e = Exposition::default();
        e.labelled_counter("r_total", "help", "status", &[("ok", 3), ("error", 1)]);
        e.gauge("g", "help", 2.0);
        let text = e.finish();
        assert!(text.contains("r_total{status=\"ok\"} 3\nr_total{status=\"error\"} 1\n"));
        assert!(text.contains("# TYPE g gauge\ng 2\n"));
    }
}
