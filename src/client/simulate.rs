//! What a simulated sensor produces: plausible values (a random walk) and seqs that keep
//! increasing across restarts of the client.
//!
//! ## Seqs from the clock
//! A seq is the reading's Unix time in **microseconds**, raised to last + 1 when the
//! clock has not moved on. A restarted client therefore starts above every seq it used
//! before, without a state file to lose or to share between hosts, as long as (a) the
//! clock does not step back further than the previous run got ahead of it and (b) a
//! sensor sends under a million readings a second on average (beyond that seqs run ahead
//! of the clock; `--bench` warns). Microseconds reach 2^53 - 1 in the year 2255.

use crate::wire::reading::kind_range;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Hands out strictly increasing seqs that follow the clock.
#[derive(Debug, Default)]
pub struct SeqClock {
    last: u64,
}

impl SeqClock {
    pub fn next(&mut self, now_micros: u64) -> u64 {
        self.last = now_micros.max(self.last + 1);
        self.last
    }

    /// How far the last seq is ahead of `now_micros` (0 when it follows the clock).
    pub fn ahead_of(&self, now_micros: u64) -> u64 {
        self.last.saturating_sub(now_micros)
    }
}

/// A bounded random walk around a realistic value for the kind.
#[derive(Debug)]
pub struct RandomWalk {
    value: f64,
    low: f64,
    high: f64,
    step: f64,
    rng: SmallRng,
}

impl RandomWalk {
    /// Temperature starts near 22 °C, humidity near 55 %RH, other kinds near 50.
    /// The walk stays inside the range the protocol gives the kind (`kind_range`).
    pub fn new(kind: &str) -> RandomWalk {
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let (centre, spread, step) = match kind {
            "temperature" => (22.0, 2.0, 0.1),
            "humidity" => (55.0, 5.0, 0.5),
            _ => (50.0, 5.0, 0.5),
        };
        let (low, high) =
            kind_range(kind).map_or((f64::MIN, f64::MAX), |(low, high, _)| (low, high));
        let value = centre + rng.random_range(-spread..=spread);
        RandomWalk {
            value,
            low,
            high,
            step,
            rng,
        }
    }

    /// The next value: one step up or down, clamped to the kind's valid range, rounded to
    /// two decimals like a real sensor's resolution.
    pub fn next_value(&mut self) -> f64 {
        let step = self.rng.random_range(-self.step..=self.step);
        self.value = (self.value + step).clamp(self.low, self.high);
        ((self.value * 100.0).round() / 100.0).clamp(self.low, self.high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::line::parse_line;
    use crate::wire::reading::Verdict;
    use crate::wire::record::encode_reading;

    #[test]
    fn seqs_follow_the_clock_and_never_repeat() {
        let mut clock = SeqClock::default();
        assert_eq!(clock.next(1_000), 1_000);
        assert_eq!(clock.next(1_000), 1_001, "same microsecond");
        assert_eq!(clock.next(900), 1_002, "clock stepped back");
        assert_eq!(clock.ahead_of(900), 102);
        assert_eq!(clock.next(5_000), 5_000);
    }

    #[test]
    fn a_restarted_client_starts_above_its_previous_seqs() {
        let mut first = SeqClock::default();
        let last = (0..1000).map(|_| first.next(unix_micros())).max().unwrap();
        let mut second = SeqClock::default();
        // Without a wait the clock may not have passed the burst's last seq; the
        // contract holds as long as the previous run was not ahead of the clock.
        while unix_micros() <= last {
            std::hint::spin_loop();
        }
        assert!(second.next(unix_micros()) > last);
    }

    #[test]
    fn walks_stay_in_range_and_produce_valid_readings() {
        for kind in ["temperature", "humidity"] {
            let mut walk = RandomWalk::new(kind);
            let mut clock = SeqClock::default();
            for _ in 0..10_000 {
                let value = walk.next_value();
                let mut line = Vec::new();
                encode_reading(&mut line, "s-1", kind, value, clock.next(unix_micros()), 1);
                line.pop();
                assert!(
                    matches!(parse_line(&line), Verdict::Valid { .. }),
                    "{}",
                    String::from_utf8_lossy(&line)
                );
            }
        }
    }

    #[test]
    fn humidity_is_clamped_at_its_bounds() {
        let mut walk = RandomWalk::new("humidity");
        walk.value = 99.9;
        walk.step = 50.0;
        for _ in 0..100 {
            let v = walk.next_value();
            assert!((0.0..=100.0).contains(&v), "{v}");
        }
    }
}
