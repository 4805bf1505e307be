//! A process-wide event word: a counter the accounting stack bumps when a beancounter
//! crosses a barrier, refuses a charge, is forced past its limit or is uncharged too much,
//! and that a host thread can sleep on until it changes.
//!
//! The allocator side is one atomic increment and, only while some thread waits, one
//! `FUTEX_WAKE` system call: no lock, no allocation, no user code. The waiting side is a
//! `FUTEX_WAIT` on the word with a timeout.
//!
//! Lost wake-ups cannot happen: the bumper increments `SEQ` and then reads `WAITERS`, the
//! waiter increments `WAITERS` and then reads `SEQ`, all sequentially consistent, so at
//! least one of them sees the other; and `FUTEX_WAIT` itself returns at once if `SEQ` no
//! longer holds the value the waiter saw.

use crate::sync::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// Events so far (wrapping).
static SEQ: AtomicU32 = AtomicU32::new(0);
/// Threads inside [`wait`].
static WAITERS: AtomicU32 = AtomicU32::new(0);

/// Counts one event and wakes the waiters, if any.
#[cold]
pub(crate) fn bump() {
    SEQ.fetch_add(1, SeqCst);
    if WAITERS.load(SeqCst) != 0 {
        // SAFETY: FUTEX_WAKE on the address of a static word only reads the pointer's
        // identity; no memory is written.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                SEQ.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            );
        }
    }
}

/// The number of events so far (wrapping).
pub(crate) fn seq() -> u32 {
    SEQ.load(SeqCst)
}

/// Sleeps until the event count differs from `seen` or `timeout` passed; returns the count.
pub(crate) fn wait(seen: u32, timeout: Duration) -> u32 {
    let deadline = Instant::now().checked_add(timeout);
    WAITERS.fetch_add(1, SeqCst);
    let now = loop {
        let now = SEQ.load(SeqCst);
        if now != seen {
            break now;
        }
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        if left.is_zero() {
            break now;
        }
        let ts = libc::timespec {
            tv_sec: left.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT reads the static word and sleeps while it equals `seen`, for at
        // most the relative timeout `ts`, which lives across the call. EINTR, EAGAIN and
        // ETIMEDOUT all just send us round the loop.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                SEQ.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                &ts as *const libc::timespec,
            );
        }
    };
    WAITERS.fetch_sub(1, SeqCst);
    now
}
