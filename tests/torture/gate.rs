//! The gate that brings every thread of the run to rest for an audit.
//!
//! Workers, executors and the controller call [`Gate::poll`] between two operations. While the
//! coordinator has the gate closed, `poll` runs the thread's own pre-audit work (checking
//! its blocks' canaries on a deep audit), gives its stock back when asked, and waits until the
//! gate opens. Nothing here allocates: `Mutex` and `Condvar` are futexes.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

pub struct Gate {
    closed: AtomicBool,
    /// Threads give their stock back before resting (so `held` is exact even without
    /// `stat`'s correction, and probes see no stock anywhere).
    drain: AtomicBool,
    /// Threads check every block they hold before resting.
    deep: AtomicBool,
    /// The audit number (bumped when the gate opens) and how many threads rest.
    state: Mutex<(u64, usize)>,
    cv: Condvar,
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            closed: AtomicBool::new(false),
            drain: AtomicBool::new(false),
            deep: AtomicBool::new(false),
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }

    /// Between two operations: if the gate is closed, runs `before(deep)`, drains this
    /// thread's stock if asked, and rests until the gate opens.
    pub fn poll(&self, before: impl FnOnce(bool)) {
        if !self.closed.load(Acquire) {
            return;
        }
        before(self.deep.load(Relaxed));
        if self.drain.load(Relaxed) {
            beancounter::drain_stock();
        }
        let mut s = self.state.lock().unwrap();
        if !self.closed.load(Relaxed) {
            return;
        }
        let audit = s.0;
        s.1 += 1;
        self.cv.notify_all();
        while s.0 == audit {
            s = self.cv.wait(s).unwrap();
        }
        s.1 -= 1;
    }

    /// Asks every thread to rest at its next `poll`.
    pub fn close(&self, drain: bool, deep: bool) {
        let _s = self.state.lock().unwrap();
        self.drain.store(drain, Relaxed);
        self.deep.store(deep, Relaxed);
        self.closed.store(true, Release);
    }

    /// Waits up to `d` for another thread to come to rest; returns how many rest.
    pub fn resting(&self, d: Duration) -> usize {
        let s = self.state.lock().unwrap();
        self.cv.wait_timeout(s, d).unwrap().0 .1
    }

    /// Lets every resting thread go on.
    pub fn open(&self) {
        let mut s = self.state.lock().unwrap();
        self.closed.store(false, Release);
        s.0 += 1;
        self.cv.notify_all();
    }
}
