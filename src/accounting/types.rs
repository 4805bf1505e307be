//! Vocabulary types shared by every accounting layer: ids, resources, severities, limits,
//! statistics and errors. Plain data; no state.

use core::fmt;

/// The largest value a bound, a charge or a count can take: `i64::MAX as u64`.
///
/// Counters are signed (`i64`) so that add-then-check-then-rollback charging can never wrap;
/// every bound is therefore at most `i64::MAX`.
///
/// # Examples
/// ```
/// use beancounter::{Limits, MAX};
/// assert_eq!(MAX, i64::MAX as u64);
/// assert!(Limits::new(MAX, MAX).is_ok());
/// assert!(Limits::new(0, MAX + 1).is_err());
/// ```
pub const MAX: u64 = i64::MAX as u64;

/// How many custom resources [`register_resource`](crate::register_resource) can name.
///
/// # Examples
/// ```
/// use beancounter::{BcError, MAX_CUSTOM_RESOURCES};
/// for i in 0..MAX_CUSTOM_RESOURCES {
///     let name: &'static str = Box::leak(format!("resource{i}").into_boxed_str());
///     beancounter::register_resource(name).unwrap();
/// }
/// assert_eq!(beancounter::register_resource("one_more"), Err(BcError::TooManyResources));
/// ```
#[cfg(not(beancounter_loom))]
pub const MAX_CUSTOM_RESOURCES: usize = 16;
/// Under loom, a tiny configuration: every counter a slot creation resets is a branch the
/// model checker explores.
#[cfg(beancounter_loom)]
pub const MAX_CUSTOM_RESOURCES: usize = 1;

/// How deep beancounters nest: a top-level beancounter is depth 1, its child depth 2.
///
/// Bounds the parent walk every charge makes; eight levels cover host → user → tenant →
/// query → operator with room to spare.
///
/// # Examples
/// ```
/// use beancounter::{BcError, BcId, MAX_DEPTH};
/// let mut bc = beancounter::find_or_create(BcId(8001)).unwrap(); // depth 1
/// for depth in 2..=MAX_DEPTH as u32 {
///     bc = bc.new_child(BcId(8000 + depth)).unwrap(); // a child keeps its parent alive
/// }
/// assert_eq!(bc.new_child(BcId(8100)).unwrap_err(), BcError::TooDeep);
/// ```
pub const MAX_DEPTH: usize = 8;

/// Built-in resources plus the custom ones: the number of counters each beancounter has.
pub(crate) const NUM_RESOURCES: usize = 3 + MAX_CUSTOM_RESOURCES;

/// The id of a beancounter, chosen by the host (a tenant number). Id 0 is the root.
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// assert_eq!(BcId::ROOT, BcId(0));
/// assert_eq!(BcId(42).to_string(), "42");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct BcId(pub u32);

impl BcId {
    /// The root beancounter: unlimited by default, charged for host work.
    ///
    /// # Examples
    /// ```
    /// use beancounter::BcId;
    /// assert_eq!(beancounter::current_id(), BcId::ROOT); // where every thread starts
    /// assert_eq!(beancounter::find_or_create(BcId::ROOT).unwrap(), beancounter::root());
    /// ```
    pub const ROOT: BcId = BcId(0);
}

impl fmt::Display for BcId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// What a beancounter counts.
///
/// `Memory` (bytes) and `Allocations` (live objects) are charged by the allocator, `Threads`
/// by [`thread::spawn`](crate::thread::spawn); `Custom(n)` are host-named counts (sockets,
/// files, connections) obtained from [`register_resource`](crate::register_resource).
///
/// # Examples
/// ```
/// use beancounter::{BcId, Resource, Severity};
/// let sockets = beancounter::register_resource("sockets").unwrap();
/// assert_eq!(sockets, Resource::Custom(0)); // the first one registered
/// let t = beancounter::find_or_create(BcId(80)).unwrap();
/// let _c = t.charge(sockets, 2, Severity::Limit).unwrap();
/// assert_eq!(t.stat(sockets).held, 2);
/// assert_eq!(t.stat(Resource::Memory).held, 0); // each resource is counted apart
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Resource {
    /// Heap bytes, as the allocator really occupies them.
    Memory,
    /// Live heap objects.
    Allocations,
    /// Threads started by the crate's spawn wrappers and still running.
    Threads,
    /// A host-defined count, numbered in registration order from 0.
    Custom(u8),
}

impl Resource {
    /// The resources every beancounter has without registration.
    ///
    /// # Examples
    /// ```
    /// use beancounter::Resource;
    /// let names = Resource::BUILTIN.map(|r| r.name().unwrap());
    /// assert_eq!(names, ["memory", "allocations", "threads"]);
    /// let snap = beancounter::report::snapshot(); // every beancounter counts them
    /// assert!(snap[0].resources.iter().map(|r| r.resource).eq(Resource::BUILTIN));
    /// ```
    pub const BUILTIN: [Resource; 3] = [Resource::Memory, Resource::Allocations, Resource::Threads];

    /// The resource of counter index `i` (`i < NUM_RESOURCES`).
    pub(crate) fn from_index(i: usize) -> Resource {
        match i {
            0 => Resource::Memory,
            1 => Resource::Allocations,
            2 => Resource::Threads,
            n => Resource::Custom((n - 3) as u8),
        }
    }

    /// The counter index of this resource, if it can exist at all.
    #[inline]
    pub(crate) fn index(self) -> Option<usize> {
        match self {
            Resource::Memory => Some(0),
            Resource::Allocations => Some(1),
            Resource::Threads => Some(2),
            Resource::Custom(n) if (n as usize) < MAX_CUSTOM_RESOURCES => Some(3 + n as usize),
            Resource::Custom(_) => None,
        }
    }
}

/// What a charge is checked against.
///
/// # Examples
/// ```
/// use beancounter::{BcId, Limits, Resource::Threads, Severity};
/// let t = beancounter::find_or_create(BcId(81)).unwrap();
/// t.set_limits(Threads, Limits::new(1, 2).unwrap()).unwrap();
/// let _a = t.charge(Threads, 1, Severity::Barrier).unwrap();
/// assert!(t.charge(Threads, 1, Severity::Barrier).is_err()); // 2 > barrier
/// let _b = t.charge(Threads, 1, Severity::Limit).unwrap(); // 2 <= limit
/// assert!(t.charge(Threads, 1, Severity::Limit).is_err()); // 3 > limit
/// let _c = t.charge(Threads, 1, Severity::Force).unwrap(); // never refused
/// assert_eq!(t.stat(Threads).held, 3);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Severity {
    /// The soft bound: for requests that can fail gracefully.
    Barrier,
    /// The hard bound: no charge checked against it ever makes `held` exceed it.
    Limit,
    /// Never refused (except when `held` would overflow [`MAX`]), still counted.
    Force,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Barrier => "barrier",
            Severity::Limit => "limit",
            Severity::Force => "force",
        })
    }
}

/// The two bounds of one resource of one beancounter: `barrier <= limit <= MAX`.
///
/// # Examples
/// ```
/// use beancounter::{Limits, MAX};
/// let l = Limits::new(64 << 20, 80 << 20).unwrap();
/// assert_eq!(l.barrier, 64 << 20);
/// assert!(Limits::new(2, 1).is_err());
/// assert_eq!(Limits::UNLIMITED, Limits { barrier: MAX, limit: MAX });
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Limits {
    /// Soft bound: fallible requests fail above it, the tenant is flagged over it.
    pub barrier: u64,
    /// Hard bound: never exceeded by a checked charge.
    pub limit: u64,
}

impl Limits {
    /// No bound at all: both at [`MAX`].
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Limits, Resource};
    /// assert_eq!(Limits::default(), Limits::UNLIMITED);
    /// let t = beancounter::find_or_create(BcId(82)).unwrap(); // the default limits, unless set
    /// let s = t.stat(Resource::Memory);
    /// assert_eq!(Limits { barrier: s.barrier, limit: s.limit }, Limits::UNLIMITED);
    /// ```
    pub const UNLIMITED: Limits = Limits {
        barrier: MAX,
        limit: MAX,
    };

    /// Checked constructor.
    ///
    /// # Errors
    /// [`BcError::InvalidLimits`] unless `barrier <= limit <= MAX`.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcError, Limits};
    /// let l = Limits::new(1 << 20, 2 << 20).unwrap();
    /// assert_eq!((l.barrier, l.limit), (1 << 20, 2 << 20));
    /// assert_eq!(Limits::new(2, 1), Err(BcError::InvalidLimits { barrier: 2, limit: 1 }));
    /// // `const`, so limits can be checked at compile time:
    /// const TENANT: Limits = match Limits::new(64 << 20, 80 << 20) {
    ///     Ok(l) => l,
    ///     Err(_) => panic!("bad limits"),
    /// };
    /// assert_eq!(TENANT.limit, 80 << 20);
    /// ```
    pub const fn new(barrier: u64, limit: u64) -> Result<Limits, BcError> {
        let l = Limits { barrier, limit };
        match l.validate() {
            Ok(()) => Ok(l),
            Err(e) => Err(e),
        }
    }

    /// Checks `barrier <= limit <= MAX`.
    ///
    /// # Errors
    /// [`BcError::InvalidLimits`] when the order or range is wrong.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcError, Limits, MAX};
    /// assert_eq!(Limits { barrier: 5, limit: 5 }.validate(), Ok(()));
    /// // The fields are public, so a `Limits` built by hand may be out of order or range:
    /// let bad = Limits { barrier: 0, limit: MAX + 1 };
    /// assert_eq!(bad.validate(), Err(BcError::InvalidLimits { barrier: 0, limit: MAX + 1 }));
    /// ```
    pub const fn validate(&self) -> Result<(), BcError> {
        if self.barrier <= self.limit && self.limit <= MAX {
            Ok(())
        } else {
            Err(BcError::InvalidLimits {
                barrier: self.barrier,
                limit: self.limit,
            })
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::UNLIMITED
    }
}

/// One resource of one beancounter, read at one moment.
///
/// # Examples
/// ```
/// use beancounter::{BcId, Limits, Resource::Threads, ResourceStat, Severity};
/// let t = beancounter::find_or_create(BcId(83)).unwrap();
/// t.set_limits(Threads, Limits::new(2, 4).unwrap()).unwrap();
/// let c = t.charge(Threads, 3, Severity::Limit).unwrap();
/// assert!(t.charge(Threads, 2, Severity::Limit).is_err());
/// drop(c);
/// let want = ResourceStat { held: 0, maxheld: 3, minheld: 0, barrier: 2, limit: 4, failcnt: 1 };
/// assert_eq!(t.stat(Threads), want);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct ResourceStat {
    /// What the beancounter holds now.
    pub held: u64,
    /// The highest `held` since the window was last reset.
    pub maxheld: u64,
    /// The lowest `held` since the window was last reset.
    pub minheld: u64,
    /// The soft bound.
    pub barrier: u64,
    /// The hard bound.
    pub limit: u64,
    /// How many charges were refused.
    pub failcnt: u64,
}

/// A refused charge: which beancounter refused (the charged one or an ancestor), on what
/// resource, at which severity, and the numbers that decided it.
///
/// # Examples
/// ```
/// use beancounter::{BcError, BcId, Limits, Resource, Severity};
/// let user = beancounter::find_or_create(BcId(84)).unwrap();
/// let query = user.new_child(BcId(85)).unwrap();
/// user.set_limits(Resource::Threads, Limits::new(2, 2).unwrap()).unwrap();
/// let r = query.charge(Resource::Threads, 3, Severity::Limit);
/// let Err(BcError::Exceeded(e)) = r else { panic!("not refused") };
/// assert_eq!((e.id, e.requested, e.held, e.bound), (BcId(84), 3, 0, 2)); // the parent refused
/// assert_eq!(e.to_string(), "beancounter 84 refused 3 threads: held 0 + 3 > limit 2");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Exceeded {
    /// The beancounter whose bound refused the charge.
    pub id: BcId,
    /// The resource charged.
    pub resource: Resource,
    /// The severity the charge was checked with.
    pub severity: Severity,
    /// The amount requested.
    pub requested: u64,
    /// What the refusing beancounter held just before the charge.
    pub held: u64,
    /// The bound it was checked against.
    pub bound: u64,
}

/// Why a beancounter call failed. Every error leaves the state as it was.
///
/// # Examples
/// ```
/// use beancounter::{BcError, BcId, Resource};
/// let missing = beancounter::stat(BcId(86), Resource::Memory);
/// assert_eq!(missing, Err(BcError::NotFound(BcId(86))));
/// let e = beancounter::register_resource("two words").unwrap_err();
/// assert_eq!(e, BcError::InvalidName("two words"));
/// let e: Box<dyn std::error::Error> = e.into(); // a std error, with a message
/// assert!(e.to_string().contains("invalid resource name"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum BcError {
    /// No live beancounter has this id.
    NotFound(BcId),
    /// The limits break `barrier <= limit <= MAX`.
    InvalidLimits {
        /// The barrier given.
        barrier: u64,
        /// The limit given.
        limit: u64,
    },
    /// A charge was refused.
    Exceeded(Exceeded),
    /// Every slot of the beancounter table is in use.
    TableFull,
    /// A `Custom` resource that [`register_resource`](crate::register_resource) never returned.
    UnknownResource(Resource),
    /// All [`MAX_CUSTOM_RESOURCES`] custom resources are registered.
    TooManyResources,
    /// A resource name must be 1 to 32 printable ASCII characters without spaces.
    InvalidName(&'static str),
    /// The id exists with another parent than the one asked for.
    AlreadyExists {
        /// The id asked for.
        id: BcId,
        /// Its existing parent (`None` for a top-level beancounter).
        parent: Option<BcId>,
    },
    /// The id cannot be used here (the root's id 0 as a child).
    InvalidId(BcId),
    /// A child would be nested deeper than [`MAX_DEPTH`] levels.
    TooDeep,
    /// The OS refused memory for the beancounter table.
    OutOfMemory,
    /// The beancounter was retired ([`Beancounter::retire`](crate::Beancounter::retire)):
    /// it cannot be retired again, get children, or change its limits.
    Retired(BcId),
    /// A heap profile's mean distance between samples must be at least one byte
    /// (`profile::start`).
    InvalidSampleBytes(u64),
}

impl From<Exceeded> for BcError {
    fn from(e: Exceeded) -> Self {
        BcError::Exceeded(e)
    }
}
