//! The public API of one beancounter: what a [`Beancounter`] handle can do (limits,
//! statistics, children, explicit charges, retirement), and RAII [`Charge`]s. Above A1-A3:
//! it reads true usage through the stocks (A3).

use super::api::{create, over_barrier, true_stat};
use super::beancounter::Events;
pub(crate) use super::reference::Beancounter;
use super::registry::{registry, ROOT};
use super::stock_table;
use super::types::{BcError, BcId, Exceeded, Limits, Resource, ResourceStat, Severity};
use core::fmt;

impl Beancounter {
    /// The parent, for a beancounter made with [`new_child`](Self::new_child); `None` for
    /// top-level beancounters and the root. If the parent was [retired](Self::retire), its
    /// nearest live ancestor (where the charges go now), or `None` if there is none.
    ///
    /// # Examples
    /// ```
    /// use beancounter::BcId;
    /// let user = beancounter::find_or_create(BcId(111)).unwrap();
    /// let query = user.new_child(BcId(112)).unwrap();
    /// assert_eq!(query.parent(), Some(user.clone()));
    /// assert_eq!(user.parent(), None); // top level
    /// assert_eq!(beancounter::root().parent(), None);
    /// ```
    pub fn parent(&self) -> Option<Beancounter> {
        // A child holds a reference on its parent, and the parent on its own, so every
        // ancestor is referenced. A retired parent is skipped: its charges go past it.
        let reg = registry();
        let parent = reg.charge_target(reg.parent_of(self.index())?);
        (parent != ROOT).then(|| Beancounter::from_borrowed_index(parent))
    }

    /// Finds or creates the beancounter `id` as a child of this one. Every charge to the
    /// child is also charged to this beancounter and its ancestors, each against its own
    /// bounds. The root's children are top-level beancounters (the root is the host's
    /// context, not an ancestor that is charged).
    ///
    /// # Errors
    /// [`BcError::AlreadyExists`] if `id` lives under another parent,
    /// [`BcError::InvalidId`] for id 0, [`BcError::TooDeep`] past [`MAX_DEPTH`](crate::MAX_DEPTH),
    /// [`BcError::TableFull`], [`BcError::OutOfMemory`].
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Resource, Severity};
    /// let user = beancounter::find_or_create(BcId(100)).unwrap();
    /// let query = user.new_child(BcId(101)).unwrap();
    /// let _c = query.charge(Resource::Threads, 2, Severity::Limit).unwrap();
    /// assert_eq!(user.stat(Resource::Threads).held, 2);
    /// assert_eq!(query.parent().unwrap().id(), BcId(100));
    /// ```
    pub fn new_child(&self, id: BcId) -> Result<Beancounter, BcError> {
        create(id, Some(self.index())).map(Beancounter::from_owned_index)
    }

    /// Sets the barrier and limit of one resource.
    ///
    /// # Errors
    /// [`BcError::InvalidLimits`] unless `barrier <= limit <= MAX`;
    /// [`BcError::UnknownResource`] for an unregistered custom resource.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcError, BcId, Limits, Resource};
    /// let t = beancounter::find_or_create(BcId(113)).unwrap();
    /// t.set_limits(Resource::Threads, Limits::new(2, 3).unwrap()).unwrap();
    /// let bad = Limits { barrier: 4, limit: 3 };
    /// assert!(matches!(t.set_limits(Resource::Threads, bad), Err(BcError::InvalidLimits { .. })));
    /// let s = t.stat(Resource::Threads); // the error changed nothing
    /// assert_eq!((s.barrier, s.limit), (2, 3));
    /// ```
    pub fn set_limits(&self, r: Resource, l: Limits) -> Result<(), BcError> {
        let reg = registry();
        reg.set_limits(self.index(), reg.resource_index(r)?, l)?;
        // Stocks were sized for the old headroom: take them back.
        stock_table::reclaim_all(self.index());
        Ok(())
    }

    /// Reads one resource. An unregistered custom resource reads as all zeros (use
    /// [`stat`](crate::stat) to get an error instead).
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Resource, ResourceStat, Severity};
    /// let t = beancounter::find_or_create(BcId(114)).unwrap();
    /// let _c = t.charge(Resource::Threads, 2, Severity::Limit).unwrap();
    /// let s = t.stat(Resource::Threads);
    /// assert_eq!((s.held, s.maxheld, s.failcnt), (2, 2, 0));
    /// // A custom resource nobody registered:
    /// assert_eq!(t.stat(Resource::Custom(15)), ResourceStat::default());
    /// ```
    pub fn stat(&self, r: Resource) -> ResourceStat {
        let reg = registry();
        match reg.resource_index(r) {
            Ok(ri) => true_stat(self.index(), ri),
            Err(_) => ResourceStat::default(),
        }
    }

    /// `Err` while this beancounter, or an ancestor, holds more than its barrier of some
    /// resource; see [`checkpoint`](crate::checkpoint).
    ///
    /// # Errors
    /// As [`checkpoint`](crate::checkpoint).
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Limits, Resource, Severity};
    /// let user = beancounter::find_or_create(BcId(115)).unwrap();
    /// let query = user.new_child(BcId(116)).unwrap();
    /// user.set_limits(Resource::Threads, Limits::new(1, 5).unwrap()).unwrap();
    /// assert!(query.check_barrier().is_ok());
    /// let _c = query.charge(Resource::Threads, 2, Severity::Limit).unwrap();
    /// // The child is within its own bounds, but its parent is over its barrier:
    /// let e = query.check_barrier().unwrap_err();
    /// assert_eq!((e.id, e.held, e.bound), (BcId(115), 2, 1));
    /// ```
    pub fn check_barrier(&self) -> Result<(), Exceeded> {
        over_barrier(self.index())
    }

    /// Starts a new observation window on every resource: `maxheld = minheld = held`.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Resource, Severity};
    /// let t = beancounter::find_or_create(BcId(117)).unwrap();
    /// let _a = t.charge(Resource::Threads, 2, Severity::Limit).unwrap();
    /// drop(t.charge(Resource::Threads, 5, Severity::Limit).unwrap());
    /// assert_eq!(t.stat(Resource::Threads).maxheld, 7);
    /// t.reset_window();
    /// let s = t.stat(Resource::Threads);
    /// assert_eq!((s.held, s.maxheld, s.minheld), (2, 2, 2));
    /// ```
    pub fn reset_window(&self) {
        let reg = registry();
        for ri in 0..super::types::NUM_RESOURCES {
            reg.with_counter(self.index(), ri, |c| c.reset_window());
        }
    }

    /// How many uncharges of `r` gave back more than was held (a bug in the caller; the
    /// counter was clamped at zero).
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Resource, Severity};
    /// let t = beancounter::find_or_create(BcId(118)).unwrap();
    /// drop(t.charge(Resource::Threads, 4, Severity::Limit).unwrap());
    /// // A `Charge` gives back exactly what it took: nothing to warn about.
    /// assert_eq!(t.uncharge_warnings(Resource::Threads), 0);
    /// assert_eq!(t.stat(Resource::Threads).held, 0);
    /// ```
    pub fn uncharge_warnings(&self, r: Resource) -> u64 {
        self.events(r).uncharge_warnings
    }

    /// The event counts of `r`: barrier crossings, refusals at the barrier and at the limit,
    /// forced charges past the limit, uncharge warnings. An unregistered custom resource
    /// reads as all zeros.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Limits, Resource, Severity};
    /// let t = beancounter::find_or_create(BcId(40)).unwrap();
    /// t.set_limits(Resource::Threads, Limits::new(1, 2).unwrap()).unwrap();
    /// let a = t.charge(Resource::Threads, 2, Severity::Limit).unwrap();
    /// assert!(t.charge(Resource::Threads, 1, Severity::Limit).is_err());
    /// let e = t.events(Resource::Threads);
    /// assert_eq!((e.barrier_crossings, e.refused_at_limit), (1, 1));
    /// ```
    pub fn events(&self, r: Resource) -> Events {
        let reg = registry();
        reg.resource_index(r)
            .ok()
            .and_then(|ri| reg.with_counter(self.index(), ri, |c| c.events()))
            .unwrap_or_default()
    }

    /// Charges `n` units of `r` to this beancounter and its ancestors, checked with
    /// `severity`. The returned [`Charge`] uncharges them when dropped.
    ///
    /// # Errors
    /// [`BcError::Exceeded`] if a level refused (nothing is left charged; `failcnt` of the
    /// refusing level grew by one); [`BcError::UnknownResource`] for an unregistered custom
    /// resource.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcError, BcId, Limits, Resource, Severity};
    /// let sockets = beancounter::register_resource("sockets").unwrap();
    /// let t = beancounter::find_or_create(BcId(8)).unwrap();
    /// t.set_limits(sockets, Limits::new(1, 2).unwrap()).unwrap();
    /// let a = t.charge(sockets, 1, Severity::Barrier).unwrap();
    /// // Over the barrier: refused for a graceful request, allowed up to the limit.
    /// assert!(matches!(t.charge(sockets, 1, Severity::Barrier), Err(BcError::Exceeded(_))));
    /// let b = t.charge(sockets, 1, Severity::Limit).unwrap();
    /// assert_eq!(t.stat(sockets).failcnt, 1);
    /// ```
    pub fn charge(&self, r: Resource, n: u64, severity: Severity) -> Result<Charge, BcError> {
        let reg = registry();
        let ri = reg.resource_index(r)?;
        // A retired beancounter's charges go to its heir (see `retire`).
        let to = Beancounter::from_borrowed_index(reg.charge_target(self.index()));
        reg.charge(to.index(), r, ri, n, severity)?;
        Ok(Charge {
            bc: to,
            resource: r,
            ri,
            amount: n,
        })
    }

    /// Retires this tenant, as a memory cgroup is removed: it leaves [`lookup`](crate::lookup),
    /// the id map and every report at once, so its id can be created again, fresh (held 0,
    /// failcnt 0, default limits), right away. What it still holds (blocks that outlive it
    /// in shared caches, a channel's buffer, what threads keep in their stocks) stays charged
    /// to its parent chain: no `held` changes anywhere at the moment of retirement, and
    /// when a leftover block is freed later, the parent chain is uncharged exactly once and
    /// the fresh tenant with the same id is never credited. For a top-level tenant the
    /// parent is the root, which is not charged for tenants: its leftovers stay charged to
    /// no one, and freeing them uncharges no one.
    ///
    /// Handles, threads and futures still inside a retired tenant keep working and charge
    /// its *heir*: the nearest live ancestor, or the root for a top-level tenant. Through a
    /// retired handle, [`stat`](Self::stat) reads all zeros, [`set_limits`](Self::set_limits),
    /// [`new_child`](Self::new_child) and `retire` are [`BcError::Retired`]. Children of a
    /// retired tenant stay alive and are charged, from then on, to the grandparent.
    ///
    /// A retired tenant keeps one 64-byte record, not a slot of the table, until nothing is
    /// charged through it and no handle or thread names it: retiring a million short-lived
    /// tenants that each leave a block behind never fills the table
    /// ([`retired_count`](crate::retired_count) counts those records).
    ///
    /// # Errors
    /// [`BcError::InvalidId`] for the root; [`BcError::Retired`] for a tenant already retired
    /// (through another handle). Nothing changes then.
    ///
    /// # Examples
    /// ```
    /// #[global_allocator]
    /// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
    /// # fn main() {
    /// use beancounter::{BcId, Resource};
    /// let customer = beancounter::find_or_create(BcId(160)).unwrap();
    /// let request = customer.new_child(BcId(161)).unwrap();
    /// let cached = {
    ///     let _g = request.enter();
    ///     Box::new([7u8; 4000]) // outlives the request, in a shared cache
    /// };
    /// let before = customer.stat(Resource::Memory).held;
    /// request.retire().unwrap(); // the request is over
    /// assert!(beancounter::lookup(BcId(161)).is_none()); // gone, and its id free at once
    /// assert_eq!(customer.stat(Resource::Memory).held, before); // nothing moved
    /// let again = customer.new_child(BcId(161)).unwrap();
    /// assert_eq!(again.stat(Resource::Memory).held, 0); // fresh
    /// drop(cached); // the leftover is uncharged from the customer
    /// assert_eq!(customer.stat(Resource::Memory).held, before - 4096);
    /// assert_eq!(again.stat(Resource::Memory).held, 0); // never the new tenant
    /// # }
    /// ```
    pub fn retire(self) -> Result<(), BcError> {
        let this = core::mem::ManuallyDrop::new(self);
        // The registry takes over this handle's reference.
        registry().retire(this.index())
    }
}

/// An explicit charge, uncharged when dropped. This is how a host counts sockets, files or
/// connections per tenant (see [`Beancounter::charge`]).
///
/// # Examples
/// ```
/// use beancounter::{BcId, Resource, Severity};
/// let t = beancounter::find_or_create(BcId(119)).unwrap();
/// let c = t.charge(Resource::Threads, 1, Severity::Limit).unwrap();
/// drop(t); // the charge keeps the beancounter alive...
/// assert_eq!(beancounter::stat(BcId(119), Resource::Threads).unwrap().held, 1);
/// drop(c); // ...until it is given back
/// assert!(beancounter::lookup(BcId(119)).is_none());
/// ```
#[must_use = "dropping a Charge uncharges it at once"]
pub struct Charge {
    bc: Beancounter,
    resource: Resource,
    ri: usize,
    amount: u64,
}

impl Charge {
    /// The beancounter charged.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Resource, Severity};
    /// let user = beancounter::find_or_create(BcId(120)).unwrap();
    /// let query = user.new_child(BcId(121)).unwrap();
    /// let c = query.charge(Resource::Threads, 1, Severity::Limit).unwrap();
    /// assert_eq!(c.beancounter(), &query); // the one charged, not its ancestors
    /// assert_eq!(user.stat(Resource::Threads).held, 1); // though they are charged too
    /// ```
    pub fn beancounter(&self) -> &Beancounter {
        &self.bc
    }

    /// The resource charged.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Severity};
    /// let files = beancounter::register_resource("files").unwrap();
    /// let t = beancounter::find_or_create(BcId(122)).unwrap();
    /// let c = t.charge(files, 1, Severity::Limit).unwrap();
    /// assert_eq!(c.resource(), files);
    /// ```
    pub fn resource(&self) -> Resource {
        self.resource
    }

    /// The amount charged.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Resource, Severity};
    /// let t = beancounter::find_or_create(BcId(123)).unwrap();
    /// let c = t.charge(Resource::Threads, 3, Severity::Limit).unwrap();
    /// assert_eq!(c.amount(), 3);
    /// assert_eq!(t.stat(Resource::Threads).held, c.amount());
    /// ```
    pub fn amount(&self) -> u64 {
        self.amount
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        registry().uncharge(self.bc.index(), self.ri, self.amount);
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Charge")
            .field("id", &self.bc.id())
            .field("resource", &self.resource)
            .field("amount", &self.amount)
            .finish()
    }
}
