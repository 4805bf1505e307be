//! A2: the per-thread context: which beancounter this thread charges (*exec*) and which one
//! threads it spawns start in (*fork*), the scoped guards that switch them, and the
//! thread-exit hook that gives their references back.
//!
//! Glossary: a *tenant* is the host's customer; its *beancounter* is the accounting object;
//! the *context* is the thread's pair of references to beancounters.
//!
//! Ownership: `exec`, `fork`, and every live guard's saved values each own one reference
//! on their beancounter (the root needs none), unless they are *lent*: the futures'
//! adapters enter their tenant around every poll with [`Beancounter::enter_lent`], which
//! takes no reference (their own handle outlives the guard), so a switch per poll costs no
//! atomic operation. A lent value is marked as such in the context and in the guard that
//! saves it, and is never released. A guard swaps references in and out, so the count stays
//! right whatever order guards are dropped in; an out-of-order drop is still a bug and
//! panics.
//!
//! The context is a `const`-initialised thread-local of `Cell`s with no destructor, so the
//! allocator can read `exec` on every allocation, at any point of thread teardown, without
//! registering anything. The destructor lives in a separate thread-local, armed only when the
//! thread first holds a tenant.

use super::reference::Beancounter;
use super::registry::ROOT;
use super::registry::{registry, Registry};
use super::types::{BcId, Severity};
use core::cell::Cell;
use core::marker::PhantomData;

struct Context {
    /// The charge key: the slot index of the beancounter charged now, with what this
    /// thread's allocations are checked against (see [`key`]).
    key: Cell<u32>,
    /// Slot index of the beancounter spawned threads start in.
    fork: Cell<u32>,
    /// Number of live guards, for detecting out-of-order drops.
    depth: Cell<u32>,
    /// Which of exec ([`EXEC`]) and fork ([`FORK`]) are *lent*: set by a guard of
    /// [`Beancounter::enter_lent`], whose caller's handle holds the reference for them.
    lent: Cell<u8>,
}

/// `Context::lent` bits.
const EXEC: u8 = 1;
const FORK: u8 = 2;

/// Bits of a charge key that hold the exec slot index.
const KEY_INDEX: u32 = (1 << 30) - 1;
const _: () = assert!(super::registry::MAX_CAPACITY <= KEY_INDEX);

/// The charge key of slot `index` checked with `severity`: the index in the low 30 bits,
/// and above them 0 for `Limit`, 1 for `Barrier`, 2 for `Force`. Stock entries hold
/// beancounter indices, all below 2^30, so the allocation fast path compares one key with
/// an entry and a thread inside [`fallible`] or [`forced`] simply never matches: the
/// severity costs the fast path nothing, and the slow path splits the key again.
#[inline]
pub(crate) const fn key(index: u32, severity: Severity) -> u32 {
    let bits = match severity {
        Severity::Limit => 0,
        Severity::Barrier => 1,
        Severity::Force => 2,
    };
    index | bits << 30
}

/// The slot index and severity of a charge key.
#[inline]
pub(crate) const fn split(key: u32) -> (u32, Severity) {
    let severity = match key >> 30 {
        0 => Severity::Limit,
        1 => Severity::Barrier,
        _ => Severity::Force,
    };
    (key & KEY_INDEX, severity)
}

impl Context {
    fn exec(&self) -> u32 {
        self.key.get() & KEY_INDEX
    }

    /// Makes `index` the exec beancounter; returns the one it replaces.
    fn replace_exec(&self, index: u32) -> u32 {
        let key = self.key.get();
        self.key.set(index | (key & !KEY_INDEX));
        key & KEY_INDEX
    }

    /// Checks allocations with `severity` from now on; returns what it replaces.
    fn replace_severity(&self, severity: Severity) -> Severity {
        let (index, prev) = split(self.key.get());
        self.key.set(key(index, severity));
        prev
    }
}

thread_local! {
    static CONTEXT: Context = const {
        Context {
            key: Cell::new(key(ROOT, Severity::Limit)),
            fork: Cell::new(ROOT),
            depth: Cell::new(0),
            lent: Cell::new(0),
        }
    };
    static EXIT: ExitHook = const { ExitHook };
}

/// Releases the thread's context references when the thread exits.
struct ExitHook;

impl Drop for ExitHook {
    fn drop(&mut self) {
        let reg = registry();
        let _ = CONTEXT.try_with(|c| {
            let lent = c.lent.replace(0);
            release_owned(reg, c.replace_exec(ROOT), lent & EXEC == 0);
            release_owned(reg, c.fork.replace(ROOT), lent & FORK == 0);
        });
    }
}

/// Makes sure the context's references are released at thread exit. During teardown,
/// after this thread's hook already ran, there is nothing left to arm: a beancounter adopted
/// from a later thread-local destructor keeps one reference until the process ends.
fn arm_exit_hook() {
    let _ = EXIT.try_with(|_| {});
}

/// Releases the reference `index` holds in the context or a guard, unless it was lent.
#[inline]
fn release_owned(reg: &Registry, index: u32, owned: bool) {
    if owned {
        reg.release(index);
    }
}

/// Slot index of this thread's exec beancounter; the root during and after teardown.
#[inline]
pub(crate) fn exec_index() -> u32 {
    CONTEXT.try_with(|c| c.exec()).unwrap_or(ROOT)
}

/// This thread's charge key ([`key`]): exec beancounter and severity in one read; the root
/// and `Limit` during and after teardown.
#[inline]
pub(crate) fn charge_key() -> u32 {
    CONTEXT
        .try_with(|c| c.key.get())
        .unwrap_or(key(ROOT, Severity::Limit))
}

/// This thread's fork beancounter, with a reference.
pub(crate) fn fork() -> Beancounter {
    Beancounter::from_borrowed_index(CONTEXT.try_with(|c| c.fork.get()).unwrap_or(ROOT))
}

/// The beancounter this thread charges now (its exec beancounter).
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// assert_eq!(beancounter::current().id(), BcId::ROOT);
/// let t = beancounter::find_or_create(BcId(21)).unwrap();
/// let _g = t.enter();
/// assert_eq!(beancounter::current(), t);
/// ```
pub fn current() -> Beancounter {
    // The context holds a reference on its exec beancounter.
    Beancounter::from_borrowed_index(exec_index())
}

/// The id of this thread's exec beancounter.
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// assert_eq!(beancounter::current_id(), BcId::ROOT); // every thread starts in the root
/// let t = beancounter::find_or_create(BcId(23)).unwrap();
/// let _g = t.enter();
/// assert_eq!(beancounter::current_id(), t.id());
/// ```
pub fn current_id() -> BcId {
    registry().id_of(exec_index())
}

/// Restores the beancounters it replaced when dropped. Made by [`Beancounter::enter`] and
/// [`Beancounter::enter_exec`].
///
/// A guard belongs to the thread that made it:
/// ```compile_fail,E0277
/// let t = beancounter::find_or_create(beancounter::BcId(1)).unwrap();
/// let g = t.enter();
/// std::thread::spawn(move || drop(g));
/// ```
///
/// # Panics
/// Dropping guards in another order than the reverse of their creation panics (unless the
/// thread is already panicking). The context is still repaired: dropping an outer guard
/// restores what it saved, the guards inside it become stale and restore nothing, so once
/// all are dropped the thread is back where it was before the outermost one, and every
/// reference is given back.
#[must_use = "the tenant is left as soon as the guard is dropped"]
pub struct ExecGuard {
    prev_exec: u32,
    /// `None` for an exec-only guard.
    prev_fork: Option<u32>,
    /// Which of the saved values were lent (`Context::lent` bits).
    prev_lent: u8,
    depth: u32,
    _not_send: PhantomData<*const ()>,
}

impl Drop for ExecGuard {
    #[inline]
    fn drop(&mut self) {
        if let Some(fork) = self.prev_fork {
            let c = context();
            if c.depth.get() == self.depth && c.lent.get() == EXEC | FORK {
                // Leaving a lent switch in order, with nothing owned to give back (nothing
                // adopted inside it): what `in_scope` and the futures' adapters do around
                // every call or poll, inline.
                c.depth.set(self.depth - 1);
                c.replace_exec(self.prev_exec);
                c.fork.set(fork);
                c.lent.set(self.prev_lent);
                return;
            }
        }
        self.restore();
    }
}

impl ExecGuard {
    /// Every other drop: references to give back (a guard from `enter`), or guards dropped
    /// out of order.
    #[inline(never)]
    fn restore(&mut self) {
        let reg = registry();
        let in_order = CONTEXT
            .try_with(|c| {
                let depth = c.depth.get();
                if self.depth > depth {
                    // An outer guard was dropped first and already restored the context
                    // from before this one: only give back the references saved here.
                    release_owned(reg, self.prev_exec, self.prev_lent & EXEC == 0);
                    if let Some(fork) = self.prev_fork {
                        release_owned(reg, fork, self.prev_lent & FORK == 0);
                    }
                    return false;
                }
                // In order, or inner guards are still alive: restore what this guard saved,
                // which leaves the context as it was before it (and the inner ones stale).
                c.depth.set(self.depth - 1);
                let lent = c.lent.get();
                let exec = c.replace_exec(self.prev_exec);
                let owned = (lent & EXEC == 0, lent & FORK == 0);
                match self.prev_fork.map(|fork| c.fork.replace(fork)) {
                    Some(fork) => {
                        c.lent.set(self.prev_lent);
                        match owned {
                            // The usual case, exec and fork in one tenant: one atomic
                            // operation (none if lent).
                            (true, true) if fork == exec => reg.release_n(exec, 2),
                            (exec_owned, fork_owned) => {
                                release_owned(reg, exec, exec_owned);
                                release_owned(reg, fork, fork_owned);
                            }
                        }
                    }
                    None => {
                        c.lent.set(self.prev_lent & EXEC | lent & FORK);
                        release_owned(reg, exec, owned.0);
                    }
                }
                self.depth == depth
            })
            .unwrap_or(true);
        if !in_order && !std::thread::panicking() {
            panic!("beancounter guards dropped out of order: drop the innermost guard first");
        }
    }
}

impl core::fmt::Debug for ExecGuard {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ExecGuard")
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

/// This thread's context. A `const`-initialised thread-local without a destructor is
/// plain TLS memory, there for as long as the thread, so the reference may outlive the
/// closure; taking it with a closure this small lets the compiler inline the access, where
/// a larger one made every switch an indirect call.
#[inline]
fn context() -> &'static Context {
    let c = CONTEXT.with(|c| c as *const Context);
    // SAFETY: see above: the storage lives as long as this thread, and the reference does
    // not leave it (`Context` is not `Sync`, and nothing here hands it to another thread).
    unsafe { &*c }
}

/// Enters slot `index` as exec (and fork, if `with_fork`). Unless `lent`, exec and fork
/// each take a reference, both in one atomic operation; a lent switch takes none.
#[inline]
fn switch(index: u32, with_fork: bool, lent: bool) -> ExecGuard {
    let c = context();
    if !lent {
        // The context will own references: they go back at thread exit, if not before.
        // (A lent switch gives the context none; `adopt` inside it arms the hook itself.)
        arm_exit_hook();
        registry().retain_n(index, 1 + with_fork as u64);
    }
    let prev_exec = c.replace_exec(index);
    let prev_fork = with_fork.then(|| c.fork.replace(index));
    let prev_lent = c.lent.get();
    let now = if with_fork { EXEC | FORK } else { EXEC };
    c.lent.set(if lent {
        prev_lent | now
    } else {
        prev_lent & !now
    });
    let depth = c.depth.get() + 1;
    c.depth.set(depth);
    ExecGuard {
        prev_exec,
        prev_fork,
        prev_lent,
        depth,
        _not_send: PhantomData,
    }
}

impl Beancounter {
    /// Makes this the exec and fork beancounter of the current thread until the guard is
    /// dropped: allocations are charged here, and threads spawned with
    /// [`thread::spawn`](crate::thread::spawn) start here.
    ///
    /// # Examples
    /// ```
    /// use beancounter::BcId;
    /// let t = beancounter::find_or_create(BcId(22)).unwrap();
    /// {
    ///     let _g = t.enter();
    ///     assert_eq!(beancounter::current_id(), BcId(22));
    /// }
    /// assert_eq!(beancounter::current_id(), BcId::ROOT);
    /// ```
    pub fn enter(&self) -> ExecGuard {
        switch(self.index(), true, false)
    }

    /// Runs `f` with this as the exec and fork beancounter of the current thread, as a
    /// guard from [`enter`](Self::enter) held through `f` would, and restores both after
    /// `f` returns or unwinds.
    ///
    /// Cheaper than a guard where a thread switches tenant often (a request handler, one
    /// tenant per request): the handle this is called on outlives the call, so the thread
    /// borrows its reference instead of taking its own, and entering and leaving touch no
    /// counter shared with other threads. A guard from `enter` takes a reference and gives it
    /// back (two atomic read-modify-writes on a cache line every thread entering that tenant
    /// shares), because it may outlive the handle it came from. Inside `f`, guards, `adopt`,
    /// spawns and futures work as they do inside a guard.
    ///
    /// # Examples
    /// ```
    /// use beancounter::BcId;
    /// let t = beancounter::find_or_create(BcId(23)).unwrap();
    /// let len = t.in_scope(|| {
    ///     assert_eq!(beancounter::current_id(), BcId(23));
    ///     vec![0u8; 1000].len() // charged to tenant 23
    /// });
    /// assert_eq!(len, 1000);
    /// assert_eq!(beancounter::current_id(), BcId::ROOT);
    /// ```
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let _scope = self.enter_lent();
        f()
    }

    /// [`enter`](Self::enter) for a caller whose handle outlives the guard (the futures'
    /// adapters, around one poll; [`in_scope`](Self::in_scope)): the context borrows the
    /// handle's reference instead of taking two of its own, so entering and leaving touch no
    /// shared counter.
    #[inline]
    pub(crate) fn enter_lent(&self) -> ExecGuard {
        switch(self.index(), true, true)
    }

    /// Makes this the exec beancounter only: work is charged here, but threads spawned
    /// meanwhile still start in the current fork beancounter.
    ///
    /// # Examples
    /// ```
    /// use beancounter::BcId;
    /// let t = beancounter::find_or_create(BcId(24)).unwrap();
    /// let _g = t.enter_exec();
    /// assert_eq!(beancounter::current_id(), BcId(24));
    /// // A thread spawned now starts in the fork beancounter, still the root:
    /// let child = beancounter::thread::spawn(beancounter::current_id).unwrap();
    /// assert_eq!(child.join().unwrap(), BcId::ROOT);
    /// ```
    pub fn enter_exec(&self) -> ExecGuard {
        switch(self.index(), false, false)
    }

    /// Makes this the exec and fork beancounter of the current thread for good (until the
    /// next `adopt`, or until an enclosing guard is dropped, which restores what it saved).
    ///
    /// # Examples
    /// ```
    /// use beancounter::BcId;
    /// let t = beancounter::find_or_create(BcId(25)).unwrap();
    /// let u = beancounter::find_or_create(BcId(26)).unwrap();
    /// {
    ///     let _g = t.enter();
    ///     u.adopt();
    ///     assert_eq!(beancounter::current_id(), BcId(26));
    /// } // the enclosing guard restores what it replaced
    /// assert_eq!(beancounter::current_id(), BcId::ROOT);
    /// u.adopt(); // with no guard around it: for good
    /// assert_eq!(beancounter::current_id(), BcId(26));
    /// ```
    pub fn adopt(&self) {
        let reg = registry();
        let index = self.index();
        arm_exit_hook();
        CONTEXT.with(|c| {
            reg.retain_n(index, 2);
            let lent = c.lent.replace(0);
            release_owned(reg, c.replace_exec(index), lent & EXEC == 0);
            release_owned(reg, c.fork.replace(index), lent & FORK == 0);
        });
    }
}

/// Restores the severity a scope replaced, also when the scope unwinds.
struct SeverityScope(Severity);

impl Drop for SeverityScope {
    fn drop(&mut self) {
        let _ = CONTEXT.try_with(|c| c.replace_severity(self.0));
    }
}

fn with_severity<R>(severity: Severity, f: impl FnOnce() -> R) -> R {
    let prev = CONTEXT
        .try_with(|c| c.replace_severity(severity))
        .unwrap_or(Severity::Limit);
    let _restore = SeverityScope(prev);
    f()
}

/// Runs `f` with its allocations checked against the **barrier** of the current tenant
/// (and its ancestors) instead of the limit: over the barrier they fail gracefully, so
/// `try_reserve` returns `Err` and `Allocator`-based collections get `AllocError`, and the
/// process keeps running. (An infallible `Box::new` or `Vec::push` that fails still aborts:
/// use this around code that handles allocation failure.)
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::{BcId, Limits, Resource};
/// let t = beancounter::find_or_create(BcId(41)).unwrap();
/// t.set_limits(Resource::Memory, Limits::new(1 << 20, 64 << 20).unwrap()).unwrap();
/// let _g = t.enter();
/// let mut v: Vec<u8> = Vec::new();
/// // 4 MiB fits under the limit, but not under the barrier:
/// assert!(beancounter::fallible(|| v.try_reserve(4 << 20)).is_err());
/// assert!(v.try_reserve(4 << 20).is_ok());
/// # }
/// ```
pub fn fallible<R>(f: impl FnOnce() -> R) -> R {
    with_severity(Severity::Barrier, f)
}

/// Runs `f` with its allocations never refused by a beancounter bound (they are still
/// counted, and each one that leaves `held` above the limit is counted in
/// [`Events::forced_past_limit`](crate::Events::forced_past_limit); only a charge that would
/// take `held` past [`MAX`](crate::MAX) is refused, as for [`Severity::Force`](crate::Severity::Force)): for host code that must not fail, such as
/// cleanup on behalf of a tenant that is over its limit.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::{BcId, Limits, Resource};
/// let t = beancounter::find_or_create(BcId(27)).unwrap();
/// t.set_limits(Resource::Memory, Limits::new(1 << 20, 1 << 20).unwrap()).unwrap();
/// let _g = t.enter();
/// let mut v: Vec<u8> = Vec::new();
/// assert!(v.try_reserve(4 << 20).is_err()); // past the limit: refused
/// beancounter::forced(|| v.reserve(4 << 20)); // never refused, still counted:
/// assert!(t.stat(Resource::Memory).held > 1 << 20);
/// assert_eq!(t.events(Resource::Memory).forced_past_limit, 1);
/// # }
/// ```
pub fn forced<R>(f: impl FnOnce() -> R) -> R {
    with_severity(Severity::Force, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: u32) -> Beancounter {
        crate::find_or_create(BcId(id)).expect("a tenant")
    }

    #[test]
    fn a_lent_guard_takes_no_reference_and_nothing_inside_releases_one() {
        let reg = registry();
        let (t, u) = (tenant(9101), tenant(9102));
        let (t0, u0) = (reg.refs_of(t.index()), reg.refs_of(u.index()));
        {
            let _g = t.enter_lent();
            assert_eq!((exec_index(), context().fork.get()), (t.index(), t.index()));
            assert_eq!(
                reg.refs_of(t.index()),
                t0,
                "entering lent takes no reference"
            );
            {
                let _h = u.enter();
                assert_eq!(reg.refs_of(u.index()), u0 + 2);
            }
            assert_eq!(reg.refs_of(u.index()), u0);
            {
                let _e = u.enter_exec();
                assert_eq!((exec_index(), context().fork.get()), (u.index(), t.index()));
            }
            assert_eq!(exec_index(), t.index());
            // Adopting inside replaces the lent values without releasing them.
            u.adopt();
            assert_eq!(reg.refs_of(t.index()), t0);
            assert_eq!(reg.refs_of(u.index()), u0 + 2);
        }
        // The guard restored what it saved and released what `adopt` took.
        assert_eq!((exec_index(), context().fork.get()), (ROOT, ROOT));
        assert_eq!((reg.refs_of(t.index()), reg.refs_of(u.index())), (t0, u0));
    }

    #[test]
    fn in_scope_takes_no_reference_and_restores_on_unwind() {
        let reg = registry();
        let t = tenant(9105);
        let t0 = reg.refs_of(t.index());
        let inside = t.in_scope(|| (exec_index(), context().fork.get(), reg.refs_of(t.index())));
        assert_eq!(
            inside,
            (t.index(), t.index(), t0),
            "in scope, no reference taken"
        );
        assert_eq!((exec_index(), context().fork.get()), (ROOT, ROOT));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            t.in_scope(|| panic!("a request handler fails"));
        }));
        assert!(unwound.is_err());
        assert_eq!((exec_index(), context().fork.get()), (ROOT, ROOT));
        assert_eq!(reg.refs_of(t.index()), t0);
    }

    /// Leaving `in_scope` (inline, see `ExecGuard::drop`) puts back every part of the
    /// context: exec with its severity, fork, depth, and which values are lent, so that the
    /// guard around it still gives back its own references.
    #[test]
    fn leaving_in_scope_restores_the_whole_context() {
        let reg = registry();
        let (t, u) = (tenant(9106), tenant(9107));
        let u0 = reg.refs_of(u.index());
        let whole = || {
            let c = context();
            (c.key.get(), c.fork.get(), c.depth.get(), c.lent.get())
        };
        let g = u.enter();
        let before = whole();
        fallible(|| {
            let key = context().key.get();
            t.in_scope(|| t.in_scope(|| assert_eq!(exec_index(), t.index())));
            assert_eq!(context().key.get(), key, "exec or severity changed");
        });
        assert_eq!(whole(), before);
        drop(g);
        assert_eq!(
            reg.refs_of(u.index()),
            u0,
            "the guard's references were not given back"
        );
        assert_eq!((exec_index(), context().fork.get()), (ROOT, ROOT));
    }

    #[test]
    fn lent_values_survive_an_out_of_order_drop() {
        let reg = registry();
        let (t, u) = (tenant(9103), tenant(9104));
        let (t0, u0) = (reg.refs_of(t.index()), reg.refs_of(u.index()));
        let drop_reported = |g: ExecGuard| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(g))).is_err()
        };
        let outer = u.enter();
        let inner = t.enter_lent();
        // The outer guard first (reported): it restores the root, releases the `u` it set,
        // and must not release the lent `t`.
        assert!(drop_reported(outer), "an out-of-order drop panics");
        assert_eq!(exec_index(), ROOT);
        assert_eq!(reg.refs_of(t.index()), t0);
        // The stale inner guard gives back what it saved (the outer guard's `u`).
        assert!(drop_reported(inner));
        assert_eq!((exec_index(), context().fork.get()), (ROOT, ROOT));
        assert_eq!((reg.refs_of(t.index()), reg.refs_of(u.index())), (t0, u0));
    }
}
