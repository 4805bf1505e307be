//! The one switch between std and loom primitives.
//!
//! Nothing else in the crate names `std::sync::atomic` or `loom`. The main crate compiles
//! this file with std's atomics; `loom-tests/` compiles the same file (and the accounting
//! source that uses it) with `cfg(beancounter_loom)` set, so the models explore the real
//! code, not a copy.
//!
//! The lock here is a small spin-then-yield mutex rather than `std::sync::Mutex`: it never
//! allocates, never parks through `std::thread` (which may allocate a thread handle), and can
//! be released by a `fork()` child whose locking thread no longer exists.

#[cfg(not(beancounter_loom))]
pub(crate) use std::sync::atomic::compiler_fence;
#[cfg(not(beancounter_loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

#[cfg(beancounter_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// Declares a `const fn` in the std build and a plain `fn` under loom, whose atomics cannot
/// be built in a constant.
macro_rules! const_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        #[cfg(not(beancounter_loom))]
        $(#[$m])* $vis const fn $name($($arg: $ty),*) -> $ret $body
        #[cfg(beancounter_loom)]
        $(#[$m])* $vis fn $name($($arg: $ty),*) -> $ret $body
    };
}
pub(crate) use const_fn;

#[cfg(not(beancounter_loom))]
mod mutex {
    use super::{AtomicBool, Ordering};
    use core::cell::UnsafeCell;
    use core::ops::{Deref, DerefMut};

    /// A spin-then-yield mutex for cold paths (registry changes), never for the hot path.
    pub(crate) struct Mutex<T> {
        locked: AtomicBool,
        value: UnsafeCell<T>,
    }

    // SAFETY: the lock gives one thread at a time access to `value`, like `std::sync::Mutex`.
    unsafe impl<T: Send> Sync for Mutex<T> {}
    // SAFETY: moving the mutex moves the value; `T: Send` allows that.
    unsafe impl<T: Send> Send for Mutex<T> {}

    pub(crate) struct MutexGuard<'a, T> {
        mutex: &'a Mutex<T>,
    }

    impl<T> Mutex<T> {
        pub(crate) const fn new(value: T) -> Self {
            Mutex {
                locked: AtomicBool::new(false),
                value: UnsafeCell::new(value),
            }
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            let mut spins = 0;
            while self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                while self.locked.load(Ordering::Relaxed) {
                    // 64 pause instructions cover a short critical section on another
                    // core; after that the holder was probably descheduled: give it the core.
                    if spins < 64 {
                        spins += 1;
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
            MutexGuard { mutex: self }
        }

        /// The lock if it is free now, without waiting: for work that can as well be left
        /// to whoever holds it.
        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
                // `then`, not `then_some`: the guard must exist only if the lock was taken.
                // An eager guard would be dropped on failure and unlock the holder's lock.
                .then(|| MutexGuard { mutex: self })
        }

        /// The protected value, for the `fork()` protocol, which holds the lock without a
        /// guard; dereferencing it is up to the caller.
        pub(crate) fn data_ptr(&self) -> *mut T {
            self.value.get()
        }

        /// Releases the lock without a guard: for the `fork()` protocol, which takes the
        /// lock in the prepare handler and releases it in the parent and child handlers.
        ///
        /// # Safety
        /// The lock must be held, by a guard that was forgotten for this purpose.
        pub(crate) unsafe fn force_unlock(&self) {
            self.locked.store(false, Ordering::Release);
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: this guard exists only while `locked` is held by this thread.
            unsafe { &*self.mutex.value.get() }
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: this guard exists only while `locked` is held by this thread, and
            // `&mut self` makes this the only reference made through it.
            unsafe { &mut *self.mutex.value.get() }
        }
    }

    impl<T> Drop for MutexGuard<'_, T> {
        fn drop(&mut self) {
            self.mutex.locked.store(false, Ordering::Release);
        }
    }
}

#[cfg(beancounter_loom)]
mod mutex {
    /// Under loom, loom's own mutex, so the model checker sees every acquisition.
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            // A loom mutex is poisoned only if a model thread panicked, which already fails
            // the model.
            self.0.lock().unwrap()
        }

        pub(crate) fn get_mut(&mut self) -> &mut T {
            // As in `lock`: poisoned only if the model already failed.
            self.0.get_mut().unwrap()
        }
    }
}

pub(crate) use mutex::Mutex;

#[cfg(all(test, not(beancounter_loom)))]
mod tests {
    use super::Mutex;

    #[test]
    fn a_failed_try_lock_leaves_the_lock_to_its_holder() {
        let m = Mutex::new(0u32);
        let held = m.lock();
        assert!(m.try_lock().is_none());
        // A failed `try_lock` must not have released the holder's lock.
        assert!(
            m.try_lock().is_none(),
            "a failed try_lock unlocked the mutex"
        );
        drop(held);
        assert!(m.try_lock().is_some());
    }
}
