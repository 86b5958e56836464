//! How far the store's segments have come, for the stages after the committer:
//! `sealed` (synced with its directory entry, so the archive may ship it) and `shipped`
//! (S3 holds it, so retention may delete it). Each stage advances its own mark and wakes
//! whoever waits for it: the shipper waits for `sealed`, retention is woken by `shipped`;
//! metrics only read them.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Every segment numbered up to each mark has reached that stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Marks {
    pub(crate) sealed: u64,
    pub(crate) shipped: u64,
}

type Hook = Box<dyn Fn() + Send + Sync>;

pub(crate) struct Watermarks {
    marks: Mutex<Marks>,
    changed: Condvar,
    /// Called when `shipped` advances (retention's wake-up), set once at start.
    on_shipped: Mutex<Option<Hook>>,
}

impl Watermarks {
    pub(crate) fn new(sealed: u64) -> Watermarks {
        Watermarks {
            marks: Mutex::new(Marks { sealed, shipped: 0 }),
            changed: Condvar::new(),
            on_shipped: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn get(&self) -> Marks {
        *self.lock()
    }

    /// Segments through `number` are sealed and synced.
    pub(crate) fn seal_through(&self, number: u64) {
        let mut marks = self.lock();
        if number > marks.sealed {
            marks.sealed = number;
            self.changed.notify_all();
        }
    }

    /// Segments through `number` are in S3 (or were never to be shipped).
    pub(crate) fn ship_through(&self, number: u64) {
        {
            let mut marks = self.lock();
            if number <= marks.shipped {
                return;
            }
            marks.shipped = number;
            self.changed.notify_all();
        }
        if let Some(hook) = &*self
            .on_shipped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            hook();
        }
    }

    /// Calls `hook` whenever `shipped` advances from now on.
    pub(crate) fn on_shipped(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self
            .on_shipped
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(hook));
    }

    /// Waits until a segment past `shipped` is sealed, `stop()` is true, or `until`
    /// passes; returns the marks then. `stop` is read under the marks' lock, so a caller
    /// that sets what it reads and then calls `wake` is never missed.
    pub(crate) fn wait_sealed_past(
        &self,
        shipped: u64,
        stop: impl Fn() -> bool,
        until: Option<Instant>,
    ) -> Marks {
        let mut marks = self.lock();
        while marks.sealed <= shipped && !stop() {
            marks = match until {
                None => self
                    .changed
                    .wait(marks)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.changed
                        .wait_timeout(marks, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        *marks
    }

    /// Wakes every waiter, to look at its `stop` again.
    pub(crate) fn wake(&self) {
        let _marks = self.lock();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::time::Duration;

    fn waiter(marks: &Arc<Watermarks>, stop: &Arc<AtomicBool>) -> std::sync::mpsc::Receiver<Marks> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (marks, stop) = (marks.clone(), stop.clone());
        std::thread::spawn(move || {
            let _ = tx.send(marks.wait_sealed_past(3, || stop.load(SeqCst), None));
        });
        rx
    }

    #[test]
    fn the_shipper_is_woken_by_a_seal_past_what_it_shipped() {
        let marks = Arc::new(Watermarks::new(3));
        let stop = Arc::new(AtomicBool::new(false));
        let woken = waiter(&marks, &stop);
        marks.seal_through(2); // not past 3: no wake-up that returns
        assert!(woken.recv_timeout(Duration::from_millis(200)).is_err());
        marks.seal_through(4);
        let seen = woken.recv_timeout(Duration::from_secs(20)).expect("woken");
        assert_eq!(seen.sealed, 4);
    }

    #[test]
    fn a_stop_wakes_the_shipper_with_nothing_sealed() {
        let marks = Arc::new(Watermarks::new(3));
        let stop = Arc::new(AtomicBool::new(false));
        let woken = waiter(&marks, &stop);
        stop.store(true, SeqCst);
        marks.wake();
        let seen = woken.recv_timeout(Duration::from_secs(20)).expect("woken");
        assert_eq!(seen.sealed, 3);
    }

    #[test]
    fn a_wait_with_a_deadline_returns_at_it() {
        let marks = Watermarks::new(3);
        let seen = marks.wait_sealed_past(3, || false, Some(Instant::now()));
        assert_eq!(
            seen,
            Marks {
                sealed: 3,
                shipped: 0
            }
        );
    }

    #[test]
    fn marks_only_advance_and_shipping_calls_the_hook() {
        let marks = Watermarks::new(5);
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        marks.on_shipped(move || {
            counted.fetch_add(1, SeqCst);
        });
        marks.seal_through(4);
        marks.ship_through(2);
        marks.ship_through(1);
        assert_eq!(
            marks.get(),
            Marks {
                sealed: 5,
                shipped: 2
            }
        );
        assert_eq!(calls.load(SeqCst), 1);
    }
}
