//! A2: the per-thread context: which beancounter this thread charges (*exec*) and which one
//! threads it spawns start in (*fork*), the scoped guards that switch them, and the
//! thread-exit hook that gives their references back.
//!
//! Glossary: a *tenant* is the host's customer; its *beancounter* is the accounting object;
//! the *context* is the thread's pair of references to beancounters.
//!
//! Ownership: `exec`, `fork`, and every live guard's saved values each own one reference
//! on their beancounter (the root needs none), unless they are *lent*:
//! - the futures' adapters and [`Beancounter::in_scope`] enter their tenant with
//!   [`Beancounter::enter_lent`], which takes no reference (their own handle outlives the
//!   guard), so a switch per poll or per call costs no atomic operation;
//! - a guard from [`Beancounter::enter`] or [`Beancounter::enter_exec`] may outlive its
//!   handle, so it keeps its tenant alive with a *hazard* instead: it publishes the index in
//!   the thread's hazard slot at its depth, and the registry frees no record a hazard names
//!   (`registry/hazard.rs`). Entering is a store and leaving one atomic swap, both on a line
//!   of this thread's own, where two references were two atomic operations on the tenant's
//!   line, which every thread entering it shares. Guards nested deeper than
//!   [`HAZARD_DEPTH`], and threads that find every hazard slot taken, take references.
//!
//! A lent value is marked as such in the context and in the guard that saves it, and is
//! never released. A guard swaps references in and out, so the count stays right whatever
//! order guards are dropped in; an out-of-order drop is still a bug and panics (the outer
//! guard clears the hazards of the guards inside it, whose tenants the context no longer
//! names).
//!
//! The context is a `const`-initialised thread-local of `Cell`s with no destructor, so the
//! allocator can read `exec` on every allocation, at any point of thread teardown, without
//! registering anything. The destructor lives in a separate thread-local, armed only when the
//! thread first holds a tenant.

use super::reference::Beancounter;
use super::registry::{registry, Registry};
use super::registry::{HAZARD_DEPTH, ROOT};
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
    /// [`Beancounter::enter_lent`], whose caller's handle holds the reference for them, or
    /// by a guard that published a hazard on them (see [`switch`]).
    lent: Cell<u8>,
    /// This thread's hazard slot in the registry ([`UNCLAIMED`], [`NO_HAZARDS`], or the
    /// slot).
    hazards: Cell<u32>,
}

/// `Context::hazards` before the thread's first guard.
const UNCLAIMED: u32 = u32::MAX;
/// `Context::hazards` of a thread whose guards take references: every slot was taken, or
/// the thread is exiting.
const NO_HAZARDS: u32 = u32::MAX - 1;

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
            hazards: Cell::new(UNCLAIMED),
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
            // The slot goes back for another thread, unless a guard is still alive (kept
            // in another thread-local, dropped later): then its hazards stay, and so does
            // the slot, for good.
            let slot = c.hazards.get();
            if c.depth.get() == 0 || slot == UNCLAIMED {
                c.hazards.set(NO_HAZARDS);
                if slot < NO_HAZARDS {
                    reg.release_hazards(slot);
                }
            }
        });
    }
}

/// Makes sure the context's references are released at thread exit; false during
/// teardown, after this thread's hook already ran: there is nothing left to arm, and a
/// beancounter adopted from a later thread-local destructor keeps one reference until the
/// process ends.
fn arm_exit_hook() -> bool {
    EXIT.try_with(|_| {}).is_ok()
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
    /// Whether this guard published a hazard at its depth instead of taking references.
    hazard: bool,
    depth: u32,
    _not_send: PhantomData<*const ()>,
}

impl Drop for ExecGuard {
    #[inline]
    fn drop(&mut self) {
        self.leave_in_place();
    }
}

impl ExecGuard {
    /// Leaves the scope where the guard's owner knows it ends (`in_scope` after its
    /// closure returns): the same as dropping it, but inline in the caller, where a drop
    /// that unwinding may also run is an out-of-line call.
    #[inline(always)]
    fn leave(mut self) {
        self.leave_in_place();
        core::mem::forget(self);
    }

    #[inline(always)]
    fn leave_in_place(&mut self) {
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
                if self.hazard {
                    // After the context stopped naming it.
                    registry().leave_hazard(c.hazards.get(), self.depth as usize - 1);
                }
                return;
            }
        }
        self.restore();
    }

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
                // This guard's hazard, and those of the guards inside it, which are stale
                // now: the context names none of what they entered.
                let slot = c.hazards.get();
                if slot < NO_HAZARDS {
                    let inner = (depth as usize).min(HAZARD_DEPTH);
                    for level in self.depth as usize - 1..inner {
                        reg.clear_hazard(slot, level);
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

/// Enters slot `index` as exec (and fork, if `with_fork`). A lent switch takes no
/// reference. Any other publishes a hazard on `index` in the thread's hazard slot, at its
/// depth (a store to a line of this thread's own), and the context treats exec and fork as
/// lent; failing that (no slot, or nested deeper than [`HAZARD_DEPTH`]), exec and fork each
/// take a reference, both in one atomic operation.
#[inline(always)]
fn switch(index: u32, with_fork: bool, lent: bool) -> ExecGuard {
    let c = context();
    let depth = c.depth.get() + 1;
    // The root is never freed: it needs neither a reference nor a hazard.
    let hazard = !lent && index != ROOT && publish_hazard(c, depth, index);
    let lent = lent || hazard;
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
    c.depth.set(depth);
    ExecGuard {
        prev_exec,
        prev_fork,
        prev_lent,
        hazard,
        depth,
        _not_send: PhantomData,
    }
}

/// Publishes a hazard on `index` for a guard at `depth` (1 for the outermost), claiming
/// the thread's slot at its first guard; false if the guard must take references instead.
#[inline]
fn publish_hazard(c: &Context, depth: u32, index: u32) -> bool {
    if depth as usize > HAZARD_DEPTH {
        return false;
    }
    let mut slot = c.hazards.get();
    if slot == UNCLAIMED {
        slot = claim_hazards(c);
    }
    if slot == NO_HAZARDS {
        return false;
    }
    registry().set_hazard(slot, depth as usize - 1, index);
    true
}

/// The thread's first guard: claims a hazard slot, given back at thread exit.
#[cold]
#[inline(never)]
fn claim_hazards(c: &Context) -> u32 {
    let slot = if arm_exit_hook() {
        registry().claim_hazards().unwrap_or(NO_HAZARDS)
    } else {
        NO_HAZARDS
    };
    c.hazards.set(slot);
    slot
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
    #[inline]
    pub fn enter(&self) -> ExecGuard {
        switch(self.index(), true, false)
    }

    /// Runs `f` with this as the exec and fork beancounter of the current thread, as a
    /// guard from [`enter`](Self::enter) held through `f` would, and restores both after
    /// `f` returns or unwinds.
    ///
    /// A little cheaper than a guard where a thread switches tenant often (a request
    /// handler, one tenant per request): the handle this is called on outlives the call, so
    /// the thread borrows its reference, and entering and leaving are a few thread-local
    /// stores. A guard from `enter` may outlive the handle it came from, so it also publishes
    /// a hazard that keeps the tenant alive (a store, and an atomic swap when it drops, on a
    /// line of the thread's own). Inside `f`, guards, `adopt`, spawns and futures work as
    /// they do inside a guard.
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
    #[inline]
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let scope = self.enter_lent();
        let r = f();
        scope.leave();
        r
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
    #[inline]
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
/// take `held` past [`MAX`](crate::MAX) is refused, as for [`Severity::Force`]): for host code that must not fail, such as
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
                assert_eq!(
                    reg.refs_of(u.index()),
                    u0,
                    "a guard publishes a hazard instead"
                );
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

    fn hazard_slot() -> u32 {
        context().hazards.get()
    }

    /// A guard from `enter` takes no reference: it publishes its tenant at its depth, and
    /// that keeps the tenant alive after its last handle is gone, until the guard drops.
    #[test]
    fn a_guard_keeps_its_tenant_alive_without_a_reference() {
        let reg = registry();
        let t = tenant(9108);
        let index = t.index();
        let t0 = reg.refs_of(index);
        let g = t.enter();
        assert_eq!(reg.refs_of(index), t0, "entering took a reference");
        assert_eq!(reg.hazard_at(hazard_slot(), 0), index);
        drop(t); // the last handle
        assert_eq!(reg.refs_of(index), 0);
        assert_eq!(current_id(), BcId(9108), "freed under the guard");
        let again = crate::lookup(BcId(9108)).expect("the id was unmapped under the guard");
        assert_eq!(again.index(), index);
        drop(again);
        drop(g);
        assert_eq!(reg.hazard_at(hazard_slot(), 0), 0, "the hazard stayed");
        assert!(
            crate::lookup(BcId(9108)).is_none(),
            "the tenant outlived its last guard and handle"
        );
    }

    /// Guards nested deeper than the hazard slot has depths take references, and give them
    /// back; the shallower ones publish hazards.
    #[test]
    fn guards_past_the_hazard_depth_take_references() {
        let reg = registry();
        let t = tenant(9109);
        let t0 = reg.refs_of(t.index());
        let mut guards = Vec::new();
        for depth in 1..=HAZARD_DEPTH + 2 {
            guards.push(t.enter());
            let extra = 2 * depth.saturating_sub(HAZARD_DEPTH) as u64;
            assert_eq!(reg.refs_of(t.index()), t0 + extra, "at depth {depth}");
        }
        while let Some(g) = guards.pop() {
            drop(g);
        }
        assert_eq!(reg.refs_of(t.index()), t0);
        for level in 0..HAZARD_DEPTH {
            assert_eq!(reg.hazard_at(hazard_slot(), level), 0);
        }
    }

    /// Dropping an outer guard first clears the hazards of the guards inside it, which
    /// name nothing the context uses any more; a stale guard, dropped later, leaves the
    /// hazard of a newer guard alone.
    #[test]
    fn an_out_of_order_drop_clears_stale_hazards() {
        let reg = registry();
        let (t, u, v) = (tenant(9110), tenant(9111), tenant(9112));
        let drop_reported = |g: ExecGuard| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(g))).is_err()
        };
        let outer = t.enter();
        let inner = u.enter();
        assert_eq!(reg.hazard_at(hazard_slot(), 1), u.index());
        assert!(drop_reported(outer));
        assert_eq!(exec_index(), ROOT);
        assert_eq!(reg.hazard_at(hazard_slot(), 0), 0);
        assert_eq!(reg.hazard_at(hazard_slot(), 1), 0, "a stale hazard stayed");
        let a = v.enter();
        assert!(drop_reported(inner));
        assert_eq!(
            reg.hazard_at(hazard_slot(), 0),
            v.index(),
            "a newer hazard was cleared"
        );
        assert_eq!(exec_index(), v.index());
        drop(a);
        assert_eq!(exec_index(), ROOT);
        assert_eq!(reg.hazard_at(hazard_slot(), 0), 0);
    }

    /// More threads in guards at once than there are hazard slots: the threads past them
    /// take references, and every thread gives its slot or its references back when it
    /// exits.
    #[test]
    fn threads_past_the_hazard_slots_take_references() {
        use crate::accounting::registry::HAZARD_THREADS;
        let reg = registry();
        let t = tenant(9113);
        let t0 = reg.refs_of(t.index());
        let threads = HAZARD_THREADS + 40;
        let inside = std::sync::Barrier::new(threads + 1);
        let leave = std::sync::Barrier::new(threads + 1);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let _g = t.enter();
                    assert_eq!(exec_index(), t.index());
                    inside.wait();
                    leave.wait();
                });
            }
            inside.wait();
            // At least the threads past the slots took two references each (other tests'
            // threads may hold slots too).
            assert!(reg.refs_of(t.index()) >= t0 + 2 * 40);
            leave.wait();
        });
        assert_eq!(reg.refs_of(t.index()), t0);
        // Every slot came back: this many threads can claim one again.
        let claimed: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..HAZARD_THREADS / 2)
                .map(|_| s.spawn(|| reg.claim_hazards()))
                .collect();
            hs.into_iter().filter_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(claimed.len(), HAZARD_THREADS / 2);
        for slot in claimed {
            reg.release_hazards(slot);
        }
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
