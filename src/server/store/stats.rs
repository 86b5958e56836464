//! Per-sensor statistics: what `/sensors` shows and what the duplicate check needs.
//!
//! One `SensorStats` holds everything the server remembers about a sensor; it is rebuilt
//! from the store (or its checkpoint) at start-up, so it must be derivable from stored
//! records alone, in any order.

use crate::wire::reading::Reading;
use crate::wire::record::Record;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Every sensor's statistics, keyed by sensor id. Hit once per reading, so the hasher is
/// foldhash (several times faster than SipHash on short ids); its per-map random seed
/// keeps colliding ids hard to choose from the network, and ids are at most 64 bytes.
pub(crate) type Sensors = HashMap<String, SensorStats, foldhash::fast::RandomState>;

/// What counting one reading did to a sensor's statistics.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Counted {
    /// Counted (the sensor's first reading, or a later one).
    Yes,
    /// Not counted: its seq is not above the sensor's last one (the live ledger's
    /// duplicate check; replay counts every stored record).
    NotNewer,
    /// Not counted: the sensor's kind is fixed to this other one.
    OtherKind(String),
}

/// One reading as the statistics count it.
pub(crate) struct Sample<'a> {
    pub(crate) sensor: &'a str,
    pub(crate) kind: &'a str,
    pub(crate) value: f64,
    pub(crate) seq: u64,
    pub(crate) ts: Option<u64>,
}

impl<'a> From<&'a Reading<'_>> for Sample<'a> {
    fn from(r: &'a Reading<'_>) -> Sample<'a> {
        Sample {
            sensor: &r.sensor,
            kind: &r.kind,
            value: r.value,
            seq: r.seq,
            ts: r.ts,
        }
    }
}

impl<'a> From<&'a Record> for Sample<'a> {
    fn from(r: &'a Record) -> Sample<'a> {
        Sample {
            sensor: &r.sensor,
            kind: &r.kind,
            value: r.value,
            seq: r.seq,
            ts: r.ts,
        }
    }
}

/// Which seqs count.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seqs {
    /// Live readings: a seq at or below the sensor's last is a duplicate.
    OnlyNewer,
    /// Replay of stored records, which were all new when written (order across files
    /// may differ from the order they were written in).
    Any,
}

/// Counts one reading in `sensors`, the one rule the live ledger (`ledger.rs`) and
/// replay (`recovery.rs`) share.
pub(crate) fn count(sensors: &mut Sensors, sample: Sample, seqs: Seqs) -> Counted {
    let Sample {
        sensor,
        kind,
        value,
        seq,
        ts,
    } = sample;
    match sensors.get_mut(sensor) {
        Some(s) if s.kind != kind => Counted::OtherKind(s.kind.clone()),
        Some(s) if seqs == Seqs::OnlyNewer && seq <= s.last_seq => Counted::NotNewer,
        Some(s) => {
            s.add(value, seq, ts);
            Counted::Yes
        }
        None => {
            sensors.insert(sensor.to_owned(), SensorStats::first(kind, value, seq, ts));
            Counted::Yes
        }
    }
}

/// Running statistics of one sensor's stored readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorStats {
    /// Fixed by the sensor's first stored reading.
    pub kind: String,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    /// Kept as a sum so the mean does not depend on the order records are replayed in.
    pub sum: f64,
    /// Value, seq and ts of the stored reading with the highest seq.
    pub last: f64,
    pub last_seq: u64,
    pub last_ts: Option<u64>,
}

impl SensorStats {
    /// Statistics of a sensor with exactly one stored reading.
    pub fn first(kind: &str, value: f64, seq: u64, ts: Option<u64>) -> SensorStats {
        SensorStats {
            kind: kind.to_owned(),
            count: 1,
            min: value,
            max: value,
            sum: value,
            last: value,
            last_seq: seq,
            last_ts: ts,
        }
    }

    /// Adds one stored reading. Replay may visit records out of seq order, so `last*`
    /// follow the highest seq rather than the latest call.
    pub fn add(&mut self, value: f64, seq: u64, ts: Option<u64>) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
        if seq >= self.last_seq {
            self.last = value;
            self.last_seq = seq;
            self.last_ts = ts;
        }
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// The `/sensors` view of one sensor, in the field order the contract shows
/// (`docs/protocol.md`).
#[derive(Serialize)]
pub(crate) struct SensorView<'a> {
    pub kind: &'a str,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub last: f64,
    pub last_seq: u64,
    pub last_ts: Option<u64>,
}

impl<'a> From<&'a SensorStats> for SensorView<'a> {
    fn from(s: &'a SensorStats) -> Self {
        SensorView {
            kind: &s.kind,
            count: s.count,
            min: s.min,
            max: s.max,
            mean: s.mean(),
            last: s.last,
            last_seq: s.last_seq,
            last_ts: s.last_ts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_follow_the_readings() {
        let mut s = SensorStats::first("temperature", 20.0, 1, Some(100));
        s.add(24.0, 2, None);
        s.add(19.0, 3, Some(300));
        assert_eq!(s.count, 3);
        assert_eq!((s.min, s.max), (19.0, 24.0));
        assert_eq!(s.mean(), 21.0);
        assert_eq!((s.last, s.last_seq, s.last_ts), (19.0, 3, Some(300)));
    }

    #[test]
    fn last_comes_from_the_highest_seq_whatever_the_order() {
        let mut s = SensorStats::first("humidity", 50.0, 10, Some(1));
        s.add(40.0, 5, Some(2));
        assert_eq!((s.last, s.last_seq, s.last_ts), (50.0, 10, Some(1)));
        assert_eq!(s.count, 2);
    }

    #[test]
    fn the_view_serialises_as_the_protocol_shows() {
        let s = SensorStats::first("humidity", 50.0, 7, None);
        let json = serde_json::to_string(&SensorView::from(&s)).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"humidity","count":1,"min":50.0,"max":50.0,"mean":50.0,"last":50.0,"last_seq":7,"last_ts":null}"#
        );
    }
}
