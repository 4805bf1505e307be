//! A2: futures that carry their tenant across executor threads.
//!
//! Task-local storage does not follow a future from worker to worker, and an executor's
//! threads start in the root. These adapters enter the beancounter around every `poll`
//! and around the inner future's `drop`, so everything the future allocates or frees is
//! charged to its tenant, whichever thread polls it, with any executor.

use super::api::over_barrier;
use super::reference::Beancounter;
use super::types::Exceeded;
use core::future::Future;
use core::mem::ManuallyDrop;
use core::pin::Pin;
use core::task::{Context, Poll};

/// Attaches futures to a beancounter.
///
/// # Examples
/// ```
/// use beancounter::{BcId, FutureExt};
/// use std::future::Future;
/// use std::pin::pin;
/// use std::task::{Context, Poll, Waker};
///
/// let tenant = beancounter::find_or_create(BcId(50)).unwrap();
/// let fut = pin!(async { beancounter::current_id() }.in_beancounter(&tenant));
/// let mut cx = Context::from_waker(Waker::noop());
/// assert_eq!(fut.poll(&mut cx), Poll::Ready(BcId(50)));
/// assert_eq!(beancounter::current_id(), BcId::ROOT);
/// ```
pub trait FutureExt: Future + Sized {
    /// Runs every poll (and the drop) of this future inside `bc`, as exec and fork
    /// beancounter: its allocations are charged to `bc`, and threads it spawns with
    /// [`thread::spawn`](crate::thread::spawn) start in `bc`.
    fn in_beancounter(self, bc: &Beancounter) -> InBeancounter<Self> {
        InBeancounter {
            bc: bc.clone(),
            inner: ManuallyDrop::new(self),
        }
    }

    /// Like [`in_beancounter`](Self::in_beancounter), and resolves to `Err(Exceeded)` at
    /// the first poll that finds `bc` (or an ancestor) over its barrier: the inner future
    /// is dropped then (inside `bc`, so what it frees is uncharged from `bc`) and never
    /// polled again. The runtime drops the offending work; the process and the other
    /// tenants go on.
    fn guarded(self, bc: &Beancounter) -> Guarded<Self> {
        Guarded {
            bc: bc.clone(),
            inner: ManuallyDrop::new(self),
            done: false,
        }
    }
}

impl<F: Future> FutureExt for F {}

/// A future run inside a beancounter; see [`FutureExt::in_beancounter`].
///
/// # Examples
/// ```
/// use beancounter::{BcId, FutureExt};
/// use std::{future::{poll_fn, Future}, pin::pin, task::{Context, Poll, Waker}};
/// let t = beancounter::find_or_create(BcId(51)).unwrap();
/// let mut first = true;
/// let inner = poll_fn(|_| match std::mem::take(&mut first) {
///     true => Poll::Pending,
///     false => Poll::Ready(beancounter::current_id()),
/// });
/// let mut fut = pin!(inner.in_beancounter(&t));
/// let mut cx = Context::from_waker(Waker::noop());
/// assert!(fut.as_mut().poll(&mut cx).is_pending());
/// assert_eq!(beancounter::current_id(), BcId::ROOT); // `t` is entered only during a poll
/// assert_eq!(fut.poll(&mut cx), Poll::Ready(BcId(51))); // every poll, not just the first
/// ```
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct InBeancounter<F> {
    bc: Beancounter,
    inner: ManuallyDrop<F>,
}

impl<F: Future> Future for InBeancounter<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is structurally pinned: it is never moved out of `self` (only
        // dropped in place, in `Drop`), and `InBeancounter` does not implement `Unpin`
        // unless `F` does.
        let this = unsafe { self.get_unchecked_mut() };
        let _g = this.bc.enter_lent();
        // SAFETY: as above, `inner` stays where it is for as long as `self` is pinned.
        unsafe { Pin::new_unchecked(&mut *this.inner) }.poll(cx)
    }
}

impl<F> Drop for InBeancounter<F> {
    fn drop(&mut self) {
        let _g = self.bc.enter_lent();
        // SAFETY: dropped exactly once, here; `inner` is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
    }
}

/// A future that stops when its beancounter goes over its barrier; see
/// [`FutureExt::guarded`].
///
/// # Examples
/// ```
/// use beancounter::{BcId, FutureExt, Limits, Resource, Severity};
/// use std::future::{pending, Future};
/// use std::{pin::pin, task::{Context, Poll, Waker}};
/// let t = beancounter::find_or_create(BcId(52)).unwrap();
/// t.set_limits(Resource::Threads, Limits::new(1, 10).unwrap()).unwrap();
/// let mut fut = pin!(pending::<()>().guarded(&t));
/// let mut cx = Context::from_waker(Waker::noop());
/// assert!(fut.as_mut().poll(&mut cx).is_pending());
/// let _c = t.charge(Resource::Threads, 2, Severity::Limit).unwrap(); // over the barrier
/// let Poll::Ready(Err(e)) = fut.poll(&mut cx) else { panic!("not stopped") };
/// assert_eq!((e.id, e.resource, e.bound), (BcId(52), Resource::Threads, 1));
/// ```
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct Guarded<F> {
    bc: Beancounter,
    inner: ManuallyDrop<F>,
    /// The inner future was dropped (stopped, or finished).
    done: bool,
}

impl<F: Future> Future for Guarded<F> {
    type Output = Result<F::Output, Exceeded>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `inner` is structurally pinned, as in `InBeancounter::poll`, and only
        // dropped in place.
        let this = unsafe { self.get_unchecked_mut() };
        assert!(!this.done, "Guarded polled after completion");
        let _g = this.bc.enter_lent();
        if let Err(e) = over_barrier(this.bc.index()) {
            this.done = true;
            // SAFETY: dropped once, in place; `done` keeps it from being used again.
            unsafe { ManuallyDrop::drop(&mut this.inner) };
            return Poll::Ready(Err(e));
        }
        // SAFETY: not dropped (`done` is false) and pinned in place.
        match unsafe { Pin::new_unchecked(&mut *this.inner) }.poll(cx) {
            Poll::Ready(out) => {
                this.done = true;
                // SAFETY: finished: dropped once, in place, inside the tenant.
                unsafe { ManuallyDrop::drop(&mut this.inner) };
                Poll::Ready(Ok(out))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<F> Drop for Guarded<F> {
    fn drop(&mut self) {
        if !self.done {
            let _g = self.bc.enter_lent();
            // SAFETY: not dropped yet (`done` is false); dropped once, here.
            unsafe { ManuallyDrop::drop(&mut self.inner) };
        }
    }
}
