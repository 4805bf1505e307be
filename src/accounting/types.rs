//! Vocabulary types shared by every accounting layer: ids, resources, severities, limits,
//! statistics and errors. Plain data; no state.

use core::fmt;

/// The largest value a bound, a charge or a count can take: `i64::MAX as u64`.
///
/// Counters are signed (`i64`) so that add-then-check-then-rollback charging can never wrap;
/// every bound is therefore at most `i64::MAX`.
pub const MAX: u64 = i64::MAX as u64;

/// How many custom resources [`register_resource`](crate::register_resource) can name.
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
    pub const UNLIMITED: Limits = Limits {
        barrier: MAX,
        limit: MAX,
    };

    /// Checked constructor.
    ///
    /// # Errors
    /// [`BcError::InvalidLimits`] unless `barrier <= limit <= MAX`.
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
    /// A child would be nested deeper than [`MAX_DEPTH`](MAX_DEPTH) levels.
    TooDeep,
    /// The OS refused memory for the beancounter table.
    OutOfMemory,
}

impl From<Exceeded> for BcError {
    fn from(e: Exceeded) -> Self {
        BcError::Exceeded(e)
    }
}
