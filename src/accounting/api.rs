//! The public API that works by id or on the whole table: creating, finding and reaping
//! beancounters, default limits, custom resources, true statistics and `checkpoint`, and
//! the text forms of the vocabulary types.

use super::reference::Beancounter;
use super::registry::{registry, ROOT};
use super::stock_table;
use super::types::{BcError, BcId, Exceeded, Limits, Resource, ResourceStat, Severity};
use super::types::{MAX, MAX_CUSTOM_RESOURCES, MAX_DEPTH};
use core::fmt;

/// Returns the beancounter `id`, creating it with the default limits if it does not exist.
/// An existing beancounter is returned whatever its parent; new ones are top level.
///
/// # Errors
/// [`BcError::TableFull`] when every slot is in use, [`BcError::OutOfMemory`] if the OS
/// refuses the table.
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// let a = beancounter::find_or_create(BcId(3)).unwrap();
/// let b = beancounter::find_or_create(BcId(3)).unwrap();
/// assert_eq!(a, b);
/// ```
pub fn find_or_create(id: BcId) -> Result<Beancounter, BcError> {
    create(id, None).map(Beancounter::from_owned_index)
}

/// Creates (or finds) `id` under `parent`. A full table is retried once after taking back
/// the stocks that keep unreferenced beancounters charged, so they can be reaped.
pub(crate) fn create(id: BcId, parent: Option<u32>) -> Result<u32, BcError> {
    let reg = registry();
    match reg.find_or_create(id, parent) {
        Err(BcError::TableFull) if stock_table::reclaim_unreferenced() > 0 => {
            reg.find_or_create(id, parent)
        }
        other => other,
    }
}

/// Returns the live beancounter `id`, if any.
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// assert!(beancounter::lookup(BcId(999_999)).is_none());
/// assert_eq!(beancounter::lookup(BcId::ROOT).unwrap().id(), BcId::ROOT);
/// ```
pub fn lookup(id: BcId) -> Option<Beancounter> {
    registry().lookup(id).map(Beancounter::from_owned_index)
}

/// The root beancounter (id 0): unlimited by default, charged for host work.
///
/// # Examples
/// ```
/// use beancounter::{BcId, Resource, MAX};
/// let root = beancounter::root();
/// assert_eq!(root.id(), BcId::ROOT);
/// assert_eq!(root.stat(Resource::Memory).limit, MAX); // unlimited by default
/// assert_eq!(beancounter::current(), root); // where threads start
/// ```
pub fn root() -> Beancounter {
    Beancounter::from_owned_index(ROOT)
}

/// Sets the barrier and limit of resource `r` of beancounter `id`.
///
/// # Errors
/// [`BcError::NotFound`] for an unknown id, [`BcError::InvalidLimits`] unless
/// `barrier <= limit <= MAX`, [`BcError::UnknownResource`] for an unregistered custom one.
///
/// # Examples
/// ```
/// use beancounter::{BcError, BcId, Limits, Resource};
/// let _t = beancounter::find_or_create(BcId(11)).unwrap();
/// beancounter::set_limits(BcId(11), Resource::Memory, Limits::new(1 << 20, 2 << 20).unwrap()).unwrap();
/// let bad = Limits { barrier: 3, limit: 2 };
/// assert!(matches!(beancounter::set_limits(BcId(11), Resource::Memory, bad), Err(BcError::InvalidLimits { .. })));
/// ```
pub fn set_limits(id: BcId, r: Resource, l: Limits) -> Result<(), BcError> {
    // Validate everything before touching anything.
    l.validate()?;
    let reg = registry();
    let ri = reg.resource_index(r)?;
    let bc = lookup(id).ok_or(BcError::NotFound(id))?;
    reg.set_limits(bc.index(), ri, l)?;
    stock_table::reclaim_all(bc.index());
    Ok(())
}

/// Reads resource `r` of beancounter `id`.
///
/// # Errors
/// [`BcError::NotFound`] for an unknown id, [`BcError::UnknownResource`] for an
/// unregistered custom resource.
///
/// # Examples
/// ```
/// use beancounter::{BcError, BcId, Resource, Severity};
/// let t = beancounter::find_or_create(BcId(124)).unwrap();
/// let _c = t.charge(Resource::Threads, 2, Severity::Limit).unwrap();
/// assert_eq!(beancounter::stat(BcId(124), Resource::Threads).unwrap().held, 2);
/// assert_eq!(beancounter::stat(BcId(125), Resource::Threads), Err(BcError::NotFound(BcId(125))));
/// let unknown = beancounter::stat(BcId(124), Resource::Custom(15));
/// assert_eq!(unknown, Err(BcError::UnknownResource(Resource::Custom(15))));
/// ```
pub fn stat(id: BcId, r: Resource) -> Result<ResourceStat, BcError> {
    let reg = registry();
    let ri = reg.resource_index(r)?;
    let bc = lookup(id).ok_or(BcError::NotFound(id))?;
    Ok(true_stat(bc.index(), ri))
}

/// The counters of `index`, with `held` as true usage: what is charged minus what threads'
/// stocks hold of it (exact when no thread is charging; `maxheld`/`minheld` are recorded on
/// the charged value, stocks included).
pub(crate) fn true_stat(index: u32, ri: usize) -> ResourceStat {
    let mut s = registry().stat(index, ri);
    s.held = s.held.saturating_sub(stock_table::stocked(index, ri));
    s
}

/// `Err` while the current thread's tenant, or one of its ancestors, holds more than its
/// barrier of some resource (true usage: stocks are not counted).
///
/// This is how ordinary code learns that its tenant crossed the barrier: ordinary
/// allocations are checked against the limit only, so crossing the barrier does not fail
/// them, but from then until usage falls back under the barrier, a runtime that calls
/// `checkpoint()` between units of work (or wraps them with
/// [`FutureExt::guarded`](crate::FutureExt::guarded)) can stop the tenant's work instead of
/// the process.
///
/// # Errors
/// The first resource found over its barrier, with `severity == Barrier`, `requested == 0`,
/// `held` the true usage and `bound` the barrier.
///
/// # Examples
/// ```
/// use beancounter::{BcId, Limits, Resource, Severity};
/// let t = beancounter::find_or_create(BcId(42)).unwrap();
/// t.set_limits(Resource::Threads, Limits::new(1, 5).unwrap()).unwrap();
/// let _g = t.enter();
/// let c = t.charge(Resource::Threads, 2, Severity::Limit).unwrap();
/// assert_eq!(beancounter::checkpoint().unwrap_err().bound, 1);
/// drop(c);
/// assert!(beancounter::checkpoint().is_ok());
/// ```
pub fn checkpoint() -> Result<(), Exceeded> {
    over_barrier(super::context::exec_index())
}

/// `Err` if `index` or an ancestor holds more than its barrier of some resource.
pub(crate) fn over_barrier(index: u32) -> Result<(), Exceeded> {
    let reg = registry();
    let mut at = index;
    loop {
        for ri in 0..reg.resource_count() {
            let s = reg.stat(at, ri);
            // Cheap test first: `held` includes stocks, so under it means under for real.
            if s.held > s.barrier {
                let held = s.held.saturating_sub(stock_table::stocked(at, ri));
                if held > s.barrier {
                    return Err(Exceeded {
                        id: reg.id_of(at),
                        resource: Resource::from_index(ri),
                        severity: Severity::Barrier,
                        requested: 0,
                        held,
                        bound: s.barrier,
                    });
                }
            }
        }
        match reg.parent_of(at) {
            Some(p) => at = p,
            None => return Ok(()),
        }
    }
}

/// Sets the limits that beancounters created from now on start with (existing ones keep
/// theirs; the root is not affected).
///
/// # Errors
/// [`BcError::InvalidLimits`], [`BcError::UnknownResource`].
///
/// # Examples
/// ```
/// use beancounter::{BcId, Limits, Resource, MAX};
/// let old = beancounter::find_or_create(BcId(126)).unwrap();
/// beancounter::set_default_limits(Resource::Threads, Limits::new(8, 16).unwrap()).unwrap();
/// let new = beancounter::find_or_create(BcId(127)).unwrap();
/// assert_eq!(new.stat(Resource::Threads).limit, 16);
/// assert_eq!(old.stat(Resource::Threads).limit, MAX); // existing ones keep theirs
/// assert_eq!(beancounter::root().stat(Resource::Threads).limit, MAX);
/// ```
pub fn set_default_limits(r: Resource, l: Limits) -> Result<(), BcError> {
    let reg = registry();
    reg.set_default_limits(reg.resource_index(r)?, l)
}

/// The limits new beancounters start with.
///
/// # Errors
/// [`BcError::UnknownResource`].
///
/// # Examples
/// ```
/// use beancounter::{Limits, Resource};
/// assert_eq!(beancounter::default_limits(Resource::Memory).unwrap(), Limits::UNLIMITED);
/// let small = Limits::new(4 << 20, 8 << 20).unwrap();
/// beancounter::set_default_limits(Resource::Memory, small).unwrap();
/// assert_eq!(beancounter::default_limits(Resource::Memory).unwrap(), small);
/// assert!(beancounter::default_limits(Resource::Custom(15)).is_err()); // not registered
/// ```
pub fn default_limits(r: Resource) -> Result<Limits, BcError> {
    let reg = registry();
    Ok(reg.default_limits(reg.resource_index(r)?))
}

/// Names a custom counted resource and returns it; registering a name again returns the
/// same resource. At most [`MAX_CUSTOM_RESOURCES`].
///
/// # Errors
/// [`BcError::TooManyResources`] when all are taken, [`BcError::InvalidName`] for a name
/// that is empty, longer than 32 bytes, or not printable ASCII without spaces.
///
/// # Examples
/// ```
/// let files = beancounter::register_resource("files").unwrap();
/// assert_eq!(beancounter::register_resource("files").unwrap(), files);
/// assert_eq!(files.name(), Some("files"));
/// ```
pub fn register_resource(name: &'static str) -> Result<Resource, BcError> {
    registry().register_resource(name)
}

/// Frees every beancounter that no handle or context refers to any more and whose charges
/// have all been given back; returns how many. What threads keep in their stocks of such a
/// beancounter is taken back first (it is charged, not in use).
///
/// A beancounter whose last handle is dropped while objects are still charged to it stays
/// (so a later [`find_or_create`] of its id finds the same counters) until this runs, or
/// until a creation finds the table full, which runs it too.
///
/// Retired beancounters are freed without `reap` as soon as nothing is charged through them
/// and no handle refers to them; `reap` frees those whose last leftover went back through a
/// thread's stock, and counts them too.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::BcId;
/// let t = beancounter::find_or_create(BcId(128)).unwrap();
/// let g = t.enter();
/// let block = vec![0u8; 1 << 20]; // charged to tenant 128
/// drop(g);
/// drop(t); // no handle left, but the block is still charged...
/// assert!(beancounter::lookup(BcId(128)).is_some()); // ...so the beancounter stays
/// drop(block);
/// assert_eq!(beancounter::reap(), 1);
/// assert!(beancounter::lookup(BcId(128)).is_none());
/// # }
/// ```
pub fn reap() -> u32 {
    let reg = registry();
    // Giving back the stocks of records nobody refers to may free retired ones already.
    let retired = reg.retired();
    // Stocks threads keep of a beancounter nobody refers to would keep it charged.
    stock_table::reclaim_unreferenced();
    let freed_by_reclaim = retired.saturating_sub(reg.retired());
    freed_by_reclaim + reg.reap()
}

/// Slots in the beancounter table, root included: [`DEFAULT_CAPACITY`](crate::DEFAULT_CAPACITY)
/// unless `BEANCOUNTER_CAPACITY` (read once, when the first tenant is created) says
/// otherwise; 0 until the first tenant is created.
///
/// # Examples
/// ```
/// assert_eq!(beancounter::capacity(), 0); // no table before the first tenant
/// std::env::set_var("BEANCOUNTER_CAPACITY", "1000"); // read when the first one is created
/// let _t = beancounter::find_or_create(beancounter::BcId(129)).unwrap();
/// assert_eq!(beancounter::capacity(), 1000);
/// ```
pub fn capacity() -> u32 {
    registry().capacity()
}

/// Handles to every live beancounter, the root first, then in slot order; beancounters
/// whose last handle is gone but that still hold charges (awaiting [`reap`]) are included.
/// Allocation goes on meanwhile: the registry lock is held only to take the references.
pub(crate) fn live_beancounters() -> Vec<Beancounter> {
    let reg = registry();
    let mut indices: Vec<u32> = Vec::new();
    loop {
        // Room for some growth between the count and the walk; retry if it outgrew that.
        let want = reg.live() as usize + 16;
        indices.reserve(want.saturating_sub(indices.capacity()));
        let live = reg.retain_live(&mut indices);
        if indices.len() >= live as usize || indices.len() < indices.capacity() {
            break;
        }
        for index in indices.drain(..) {
            reg.release(index);
        }
    }
    let mut out = Vec::with_capacity(indices.len() + 1);
    out.push(root());
    out.extend(indices.into_iter().map(Beancounter::from_owned_index));
    out
}

/// The resources counted now: the built-in ones, then the registered custom ones.
pub(crate) fn resources() -> impl Iterator<Item = Resource> {
    (0..registry().resource_count()).map(Resource::from_index)
}

/// Live beancounters besides the root.
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// let before = beancounter::live_count();
/// let t = beancounter::find_or_create(BcId(130)).unwrap();
/// assert_eq!(beancounter::live_count(), before + 1);
/// drop(t); // the last handle, and nothing charged: freed
/// assert_eq!(beancounter::live_count(), before);
/// ```
pub fn live_count() -> u32 {
    registry().live()
}

/// Retired tenants whose records are still held: something is still charged through them
/// (a block that outlived the tenant, a thread's stock) or a handle or thread still names
/// them. Each keeps one 64-byte record and no slot of the table (see
/// [`Beancounter::retire`]).
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::BcId;
/// let t = beancounter::find_or_create(BcId(162)).unwrap();
/// let kept = {
///     let _g = t.enter();
///     vec![0u8; 100 << 10] // a large block, outliving the tenant
/// };
/// let before = beancounter::retired_count();
/// t.retire().unwrap();
/// assert_eq!(beancounter::retired_count(), before + 1); // kept for the leftover
/// drop(kept);
/// beancounter::reap(); // takes back what thread stocks kept of it, too
/// assert_eq!(beancounter::retired_count(), before);
/// # }
/// ```
pub fn retired_count() -> u32 {
    registry().retired()
}

/// Checks every registry invariant (live slots ⇔ mapped ids, free list, parent references,
/// children holding no more than their parent, each counter's own invariants). Meaningful
/// when no charge is in flight; for tests.
///
/// # Errors
/// A description of the first invariant found broken.
///
/// # Examples
/// ```
/// use beancounter::{BcId, Resource, Severity};
/// let user = beancounter::find_or_create(BcId(131)).unwrap();
/// let query = user.new_child(BcId(132)).unwrap();
/// let _c = query.charge(Resource::Threads, 3, Severity::Limit).unwrap();
/// assert_eq!(beancounter::check_invariants(), Ok(()));
/// ```
pub fn check_invariants() -> Result<(), &'static str> {
    registry().check_invariants()
}

impl Resource {
    /// The name: `memory`, `allocations`, `threads`, or a registered custom name (`None`
    /// for an unregistered custom resource).
    ///
    /// # Examples
    /// ```
    /// use beancounter::Resource;
    /// assert_eq!(Resource::Memory.name(), Some("memory"));
    /// let files = beancounter::register_resource("open_files").unwrap();
    /// assert_eq!(files.name(), Some("open_files"));
    /// assert_eq!(Resource::Custom(15).name(), None); // never registered
    /// ```
    pub fn name(self) -> Option<&'static str> {
        registry().resource_name(self)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name(), self) {
            (Some(name), _) => f.write_str(name),
            (None, Resource::Custom(n)) => write!(f, "custom{n}"),
            (None, other) => write!(f, "{other:?}"),
        }
    }
}

impl fmt::Display for Exceeded {
    /// A refused charge reads `beancounter 3 refused 64 memory: held 100 + 64 > limit 128`;
    /// the report of [`checkpoint`] or a guarded future (nothing requested, nothing
    /// refused) reads `beancounter 3 is over its memory barrier: held 200 > barrier 128`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requested == 0 {
            return write!(
                f,
                "beancounter {} is over its {} {}: held {} > {} {}",
                self.id, self.resource, self.severity, self.held, self.severity, self.bound
            );
        }
        write!(
            f,
            "beancounter {} refused {} {}: held {} + {} > {} {}",
            self.id,
            self.requested,
            self.resource,
            self.held,
            self.requested,
            self.severity,
            self.bound
        )
    }
}

impl std::error::Error for Exceeded {}

impl fmt::Display for BcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BcError::NotFound(id) => write!(f, "no beancounter with id {id}"),
            BcError::InvalidLimits { barrier, limit } => write!(
                f,
                "invalid limits: barrier {barrier}, limit {limit} (need barrier <= limit <= {MAX})"
            ),
            BcError::Exceeded(e) => fmt::Display::fmt(e, f),
            BcError::TableFull => f.write_str("the beancounter table is full"),
            BcError::UnknownResource(r) => write!(f, "unknown resource {r:?}"),
            BcError::TooManyResources => {
                write!(
                    f,
                    "all {MAX_CUSTOM_RESOURCES} custom resources are registered"
                )
            }
            BcError::AlreadyExists {
                id,
                parent: Some(p),
            } => {
                write!(f, "beancounter {id} already exists under parent {p}")
            }
            BcError::AlreadyExists { id, parent: None } => {
                write!(f, "beancounter {id} already exists at the top level")
            }
            BcError::InvalidName(name) => write!(
                f,
                "invalid resource name {name:?}: use 1 to 32 printable ASCII characters, no spaces"
            ),
            BcError::InvalidId(id) => write!(f, "beancounter id {id} cannot be used here"),
            BcError::TooDeep => write!(f, "beancounters nest at most {} deep", MAX_DEPTH),
            BcError::OutOfMemory => f.write_str("the OS refused memory for the beancounter table"),
            BcError::Retired(id) => write!(f, "beancounter {id} was retired"),
            BcError::InvalidSampleBytes(n) => {
                write!(
                    f,
                    "invalid heap-profile sample distance {n}: need at least 1 byte"
                )
            }
        }
    }
}

impl std::error::Error for BcError {}
