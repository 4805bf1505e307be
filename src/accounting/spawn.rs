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
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// let t = beancounter::find_or_create(BcId(31)).unwrap();
/// let _g = t.enter();
/// let h = beancounter::thread::Builder::new()
///     .name("worker".to_string())
///     .spawn(beancounter::current_id)
///     .unwrap();
/// assert_eq!(h.thread().name(), Some("worker"));
/// assert_eq!(h.join().unwrap(), BcId(31));
/// ```
#[derive(Debug)]
pub struct Builder {
    inner: std::thread::Builder,
}

impl Builder {
    /// A builder with std's defaults.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{thread::Builder, BcId};
    /// // Outside any tenant, the fork beancounter is the root:
    /// let h = Builder::new().spawn(beancounter::current_id).unwrap();
    /// assert_eq!(h.join().unwrap(), BcId::ROOT);
    /// ```
    pub fn new() -> Builder {
        Builder {
            inner: std::thread::Builder::new(),
        }
    }

    /// Names the thread.
    ///
    /// # Examples
    /// ```
    /// let h = beancounter::thread::Builder::new()
    ///     .name("tenant-7".to_string())
    ///     .spawn(|| std::thread::current().name().map(str::to_owned))
    ///     .unwrap();
    /// assert_eq!(h.join().unwrap().as_deref(), Some("tenant-7"));
    /// ```
    pub fn name(self, name: String) -> Builder {
        Builder {
            inner: self.inner.name(name),
        }
    }

    /// Sets the stack size in bytes.
    ///
    /// # Examples
    /// ```
    /// let h = beancounter::thread::Builder::new()
    ///     .stack_size(256 << 10)
    ///     .spawn(|| [7u8; 16 << 10].iter().map(|&b| b as u32).sum::<u32>()) // 16 KiB on the stack
    ///     .unwrap();
    /// assert_eq!(h.join().unwrap(), 7 * (16 << 10));
    /// ```
    pub fn stack_size(self, size: usize) -> Builder {
        Builder {
            inner: self.inner.stack_size(size),
        }
    }

    /// Spawns the thread; see [`spawn`].
    ///
    /// # Errors
    /// As [`spawn`].
    ///
    /// # Examples
    /// ```
    /// use beancounter::{thread::Builder, BcId, Limits, Resource};
    /// let t = beancounter::find_or_create(BcId(34)).unwrap();
    /// t.set_limits(Resource::Threads, Limits::new(1, 1).unwrap()).unwrap();
    /// let _g = t.enter();
    /// let (tx, rx) = std::sync::mpsc::channel::<()>();
    /// let first = Builder::new().spawn(move || drop(rx.recv())).unwrap();
    /// assert_eq!(t.stat(Resource::Threads).held, 1); // counted while it runs
    /// let second = Builder::new().spawn(|| ()).unwrap_err();
    /// assert_eq!(second.kind(), std::io::ErrorKind::QuotaExceeded);
    /// drop(tx);
    /// first.join().unwrap();
    /// assert_eq!(t.stat(Resource::Threads).held, 0);
    /// ```
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
