//! A0: the fences of the stock protocol and the waits around it, below everything that
//! uses them (stocks, their reclaim, the registry's retirement).
//!
//! A stock's owner uses its entries with plain loads and stores behind a compiler fence
//! ([`owner_fence`]); a reclaimer makes that a full fence wherever the owner runs with one
//! `membarrier(2)` ([`reclaimer_fence`]). See `reclaim.rs` for the handshake.

#[cfg(not(beancounter_loom))]
use crate::sync::compiler_fence;
use crate::sync::{fence, Ordering};

/// Gives the CPU to another thread while waiting for one to leave a short critical section.
pub(crate) fn spin() {
    #[cfg(beancounter_loom)]
    loom::thread::yield_now();
    #[cfg(not(beancounter_loom))]
    std::thread::yield_now();
}

/// The owner's side of the asymmetric fence: a compiler fence, which the reclaimer's
/// membarrier turns into a full one. (Without membarrier there are no stocks at all: every
/// thread charges directly, see `stock_table::claim`.)
#[inline]
pub(crate) fn owner_fence() {
    #[cfg(beancounter_loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(beancounter_loom))]
    compiler_fence(Ordering::SeqCst);
}

/// The reclaimer's side: a full fence on every CPU running this process.
pub(crate) fn reclaimer_fence() {
    #[cfg(beancounter_loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(beancounter_loom))]
    {
        fence(Ordering::SeqCst);
        membarrier::run();
    }
}

#[cfg(beancounter_loom)]
pub(crate) fn cpus() -> u64 {
    1
}

#[cfg(not(beancounter_loom))]
pub(crate) fn cpus() -> u64 {
    use crate::sync::{AtomicU32, Ordering::Relaxed};
    static CPUS: AtomicU32 = AtomicU32::new(0);
    let n = CPUS.load(Relaxed);
    if n != 0 {
        return n as u64;
    }
    // SAFETY: sysconf has no preconditions; it reads the CPU count without allocating.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.clamp(1, 4096) as u32;
    CPUS.store(n, Relaxed);
    n as u64
}

/// `membarrier(2)`: a full fence on every CPU that runs a thread of this process, issued by
/// one thread. Registered on first use; where the kernel refuses, there are no stocks.
#[cfg(not(beancounter_loom))]
pub(crate) mod membarrier {
    use crate::sync::{AtomicU32, Ordering::Relaxed};

    const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    /// 0 = not tried, 1 = registered, 2 = unavailable.
    static STATE: AtomicU32 = AtomicU32::new(0);

    /// Whether reclaimers can fence owners; settled (by `register`) before any stock
    /// exists, and without it no stock is handed out.
    #[inline]
    pub(crate) fn available() -> bool {
        STATE.load(Relaxed) == 1
    }

    /// Registers the process for expedited membarriers; called before the first stock.
    pub(crate) fn register() {
        if STATE.load(Relaxed) != 0 {
            return;
        }
        // SAFETY: membarrier takes no pointers; an unknown command just fails.
        let ok =
            unsafe { libc::syscall(libc::SYS_membarrier, CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) }
                == 0;
        STATE.store(if ok { 1 } else { 2 }, Relaxed);
    }

    pub(super) fn run() {
        if available() {
            // SAFETY: as in `register`; registered, so this command is allowed.
            unsafe { libc::syscall(libc::SYS_membarrier, CMD_PRIVATE_EXPEDITED, 0, 0) };
        }
    }
}
