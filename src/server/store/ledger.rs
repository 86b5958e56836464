//! The ledger: what each sensor has stored (the dedup and kind rules, per-sensor
//! statistics), decided in memory for one batch while `Db` holds its lock. No I/O: the
//! records it encodes are written by `Db` once the batch is decided.

use crate::server::store::stats::{self, Counted, Sensors, Seqs};
use crate::wire::reading::Reading;
use crate::wire::record::{RecvStamp, encode_record};

/// What the ledger made of one valid reading.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    Stored,
    Duplicate,
    /// The sensor's kind was fixed by its first stored reading; this is the fixed kind.
    KindMismatch(String),
}
/// The locked ledger, handed to a worker for the duration of one batch.
pub(crate) struct Ledger<'a> {
    pub(super) sensors: &'a mut Sensors,
    pub(super) records: &'a mut Vec<u8>,
    pub(super) stored: u64,
}

impl Ledger<'_> {
    /// Decides a valid reading against what is stored, and stores it if it is new.
    pub(crate) fn apply(&mut self, r: &Reading, recv: &RecvStamp) -> Applied {
        match stats::count(self.sensors, r.into(), Seqs::OnlyNewer) {
            Counted::Yes => {}
            Counted::NotNewer => return Applied::Duplicate,
            Counted::OtherKind(kind) => return Applied::KindMismatch(kind),
        }
        encode_record(self.records, r, recv);
        self.stored += 1;
        Applied::Stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn reading(sensor: &str, kind: &'static str, seq: u64) -> Reading<'static> {
        Reading {
            sensor: Cow::Owned(sensor.into()),
            kind: Cow::Borrowed(kind),
            value: 1.0,
            value_text: Cow::Borrowed("1.0"),
            seq,
            ts: None,
        }
    }

    #[test]
    fn the_ledger_stores_new_seqs_and_answers_duplicates_and_kind_changes() {
        let (mut sensors, mut records) = (Sensors::default(), Vec::new());
        let mut ledger = Ledger {
            sensors: &mut sensors,
            records: &mut records,
            stored: 0,
        };
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 5), &RecvStamp::new(0)),
            Applied::Stored
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 5), &RecvStamp::new(0)),
            Applied::Duplicate
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 4), &RecvStamp::new(0)),
            Applied::Duplicate
        );
        assert_eq!(
            ledger.apply(&reading("a", "humidity", 9), &RecvStamp::new(0)),
            Applied::KindMismatch("temperature".into())
        );
        assert_eq!(
            ledger.apply(&reading("a", "temperature", 6), &RecvStamp::new(0)),
            Applied::Stored
        );
        assert_eq!(ledger.stored, 2);
        assert_eq!(sensors["a"].last_seq, 6);
        assert_eq!(records.iter().filter(|&&b| b == b'\n').count(), 2);
    }
}
