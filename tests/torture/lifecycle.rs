//! Tenant lifecycle during the run (DESIGN §3.6, §6.7): the controller retires leaves of the
//! tree while everything goes on — workers, helpers and tasks still inside the retired
//! tenant, other threads freeing its blocks — and creates the same id again at once, fresh,
//! in the same place of the tree; the run keeps using it.
//!
//! Each tenant has an *incarnation* number, bumped when it is retired and created again.
//! Blocks, tasks, workers' guards and crate-spawned threads remember the incarnation of the
//! handle they were charged through. The ledger follows the crate's rule: what an incarnation
//! holds when it is retired stays charged to its parent. Only leaves are retired and parents
//! never are, so the heir is always the parent, live. At the retirement the leaf's `own` moves
//! to its parent's, and from then on whatever is given back or charged through the old
//! incarnation (a free of a leftover block, an allocation through a handle still held, a
//! thread started in it) is the parent's. The fresh incarnation starts at zero.
//!
//! Requests in a tenant (allocations, reallocations, fallible reservations) hold its
//! lifecycle lock for reading around the request and its ledger entry, and a retirement holds
//! it for writing: no request of the tenant is in flight while it is retired, so what the
//! retired incarnation counted (failcnt, refusals) is final when it is added to the tenant's
//! past, and the audit's refusal checks stay exact. Frees take the lock only for their ledger
//! entry: the block itself is given back whenever it happens, before, during or after the
//! retirement, which is the race the crate must get right.

use crate::common::Rng;
use crate::model::{fail, Count, Node, Shared};
use beancounter::{Beancounter, Resource, MAX};
use std::sync::RwLockReadGuard;

/// The live incarnation of a tenant: its handle and its number.
pub struct Life {
    pub bc: Beancounter,
    pub inc: u64,
}

impl Node {
    /// The live incarnation, locked against retirement while the guard lives.
    pub fn life(&self) -> RwLockReadGuard<'_, Life> {
        self.life.read().unwrap()
    }

    /// A handle on the live incarnation.
    pub fn bc(&self) -> Beancounter {
        self.life().bc.clone()
    }

    /// A handle on the live incarnation, and its number.
    pub fn current(&self) -> (Beancounter, u64) {
        let life = self.life();
        (life.bc.clone(), life.inc)
    }
}

/// What a tenant counted that the audit compares between two audits. Over the run it is
/// what its retired incarnations counted (kept by the harness) plus what the live one counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counted {
    /// `Memory`: refusals, and of them those at the barrier and at the limit.
    pub failcnt: u64,
    pub at_barrier: u64,
    pub at_limit: u64,
    pub objects_failcnt: u64,
    pub threads_failcnt: u64,
}

impl Counted {
    fn of(bc: &Beancounter) -> Counted {
        let e = bc.events(Resource::Memory);
        Counted {
            failcnt: bc.stat(Resource::Memory).failcnt,
            at_barrier: e.refused_at_barrier,
            at_limit: e.refused_at_limit,
            objects_failcnt: bc.stat(Resource::Allocations).failcnt,
            threads_failcnt: bc.stat(Resource::Threads).failcnt,
        }
    }

    fn plus(self, o: Counted) -> Counted {
        Counted {
            failcnt: self.failcnt + o.failcnt,
            at_barrier: self.at_barrier + o.at_barrier,
            at_limit: self.at_limit + o.at_limit,
            objects_failcnt: self.objects_failcnt + o.objects_failcnt,
            threads_failcnt: self.threads_failcnt + o.threads_failcnt,
        }
    }
}

impl Shared {
    /// What tenant `t` counted over the run, every incarnation.
    pub fn counted(&self, t: usize) -> Counted {
        let life = self.tree.nodes[t].life();
        let past = *self.past[t].lock().unwrap();
        past.plus(Counted::of(&life.bc))
    }

    /// The tenant whose ledger a charge through incarnation `inc` of `t` belongs to: `t`
    /// while that incarnation is the live one (`life`), its parent once it was retired.
    pub fn heir(&self, t: usize, inc: u64, life: &Life) -> usize {
        if inc == life.inc {
            return t;
        }
        match self.tree.nodes[t].parent {
            Some(p) => p,
            None => fail!("top-level tenant {} was retired", self.tree.nodes[t].id),
        }
    }

    /// [`heir`](Self::heir), reading the live incarnation.
    pub fn heir_now(&self, t: usize, inc: u64) -> usize {
        self.heir(t, inc, &self.tree.nodes[t].life())
    }

    /// Retires leaf `t` while the run goes on and creates its id again, fresh, under the
    /// same parent, with new limits if the controller moves them. Checks on the way that the
    /// id left `lookup` at once and that the new tenant is fresh.
    pub fn retire_and_recreate(&self, t: usize, rng: &mut Rng) {
        let node = &self.tree.nodes[t];
        let id = node.id;
        let p = match node.parent {
            Some(p) if self.tree.is_leaf(t) => p,
            _ => fail!("tenant {id} is not a leaf with a parent: not retired by the run"),
        };
        let parent = self.tree.nodes[p].bc();
        let mut life = node.life.write().unwrap();
        // No request of `t` is in flight: what this incarnation counted is final.
        for r in [Resource::Memory, Resource::Allocations] {
            if life.bc.uncharge_warnings(r) != 0 {
                fail!("tenant {id}: an uncharge of {r} was clamped");
            }
        }
        {
            let mut past = self.past[t].lock().unwrap();
            *past = past.plus(Counted::of(&life.bc));
        }
        self.bequeath(t, p);
        // The parent's handle stands in until the fresh tenant exists; nobody reads it (the
        // lock is held).
        let old = std::mem::replace(&mut life.bc, parent.clone());
        old.retire()
            .unwrap_or_else(|e| fail!("retiring tenant {id}: {e}"));
        if beancounter::lookup(id).is_some() {
            fail!("tenant {id} can still be looked up after its retirement");
        }
        let fresh = parent
            .new_child(id)
            .unwrap_or_else(|e| fail!("creating tenant {id} again after its retirement: {e}"));
        let s = fresh.stat(Resource::Memory);
        let others = [Resource::Allocations, Resource::Threads].map(|r| fresh.stat(r).held);
        if (s.held, s.maxheld, s.failcnt, s.limit, others) != (0, 0, 0, MAX, [0, 0]) {
            fail!("tenant {id} created again is not fresh: {s:?}, {others:?}");
        }
        if self.tree.controlled(t) {
            let l = self.tree.random_limits(t, rng, 0);
            // The window's bound takes the new limit before any charge can be checked
            // against it (as in `controller::change`).
            {
                let mut w = self.windows.lock().unwrap();
                w[t].max_limit = w[t].max_limit.max(l.limit);
            }
            fresh
                .set_limits(Resource::Memory, l)
                .unwrap_or_else(|e| fail!("set_limits({id}, {l:?}): {e}"));
        }
        life.bc = fresh;
        life.inc += 1;
        self.tally.add(Count::Retired, 1);
    }
}
