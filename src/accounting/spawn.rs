//! A2: thread spawn wrappers that carry the fork beancounter into the new thread and count
//! it in `Threads`.

use super::context;
use super::types::{Resource, Severity};
use std::io;
use std::thread::JoinHandle;

/// Spawns a thread that starts in the current thread's fork beancounter, like
/// [`std::thread::spawn`].
///
/// The thread is charged one `Threads` to that beancounter (checked against its limit) for
/// as long as it runs, panics included.
///
/// # Errors
/// An [`io::Error`] of kind [`io::ErrorKind::QuotaExceeded`] wrapping the
/// [`BcError`](crate::BcError) if the `Threads` charge is refused, or the OS error if the
/// thread cannot be created (the charge is then given back).
///
/// # Examples
/// ```
/// use beancounter::{BcId, Resource};
/// let t = beancounter::find_or_create(BcId(30)).unwrap();
/// let _g = t.enter();
/// let h = beancounter::thread::spawn(|| beancounter::current_id()).unwrap();
/// assert_eq!(h.join().unwrap(), BcId(30));
/// ```
pub fn spawn<F, T>(f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    Builder::new().spawn(f)
}

/// Thread factory mirroring [`std::thread::Builder`], whose threads start in the spawning
/// thread's fork beancounter.
#[derive(Debug)]
pub struct Builder {
    inner: std::thread::Builder,
}

impl Builder {
    /// A builder with std's defaults.
    pub fn new() -> Builder {
        Builder {
            inner: std::thread::Builder::new(),
        }
    }

    /// Names the thread.
    pub fn name(self, name: String) -> Builder {
        Builder {
            inner: self.inner.name(name),
        }
    }

    /// Sets the stack size in bytes.
    pub fn stack_size(self, size: usize) -> Builder {
        Builder {
            inner: self.inner.stack_size(size),
        }
    }

    /// Spawns the thread; see [`spawn`].
    ///
    /// # Errors
    /// As [`spawn`].
    pub fn spawn<F, T>(self, f: F) -> io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let fork = context::fork();
        let charge = fork
            .charge(Resource::Threads, 1, Severity::Limit)
            .map_err(|e| io::Error::new(io::ErrorKind::QuotaExceeded, e))?;
        // If the OS refuses the thread, the closure is dropped here and with it the charge.
        self.inner.spawn(move || {
            fork.adopt();
            drop(fork);
            // Dropped when `f` returns or unwinds: the thread is uncharged either way.
            let _running = charge;
            f()
        })
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}
