//! A1: how beancounters come and go: creation and lookup by id, references, freeing,
//! reaping zombies, and retirement (see the registry's module docs for the rules).

use super::super::types::{BcError, BcId, MAX_DEPTH};
use super::table::{generation, pack, refs, Record, LIVE, NO_PARENT, NO_SLOT, REFS, RETIRED};
use super::{Inner, Registry, ROOT};
use crate::sync::{fence, Ordering};

impl Registry {
    /// Returns the index of `id` with one reference taken, creating it if it does not
    /// exist: with `parent == None` as a top-level beancounter, and then an existing id is
    /// returned whatever its parent; with `Some(p)` as a child of `p` (referenced by the
    /// caller), and an existing id must already be `p`'s child. The root's children are the
    /// top-level beancounters: the root is the host's own context, not an ancestor that is
    /// charged.
    pub(crate) fn find_or_create(&self, id: BcId, parent: Option<u32>) -> Result<u32, BcError> {
        if id == BcId::ROOT {
            return if parent.is_none() {
                Ok(ROOT)
            } else {
                Err(BcError::InvalidId(id))
            };
        }
        // The link a new record gets, and the one an existing record must have (if any).
        let link = match parent {
            None | Some(ROOT) => NO_PARENT,
            Some(p) => p,
        };
        let mut inner = self.inner.lock();
        self.ensure_tables(&mut inner)?;
        if link != NO_PARENT && self.is_retired(link) {
            return Err(BcError::Retired(self.id_of(link)));
        }
        if let Some(index) = inner.ids.find(id.0) {
            let rec = self.record(index);
            let existing = rec.link.load(Ordering::Relaxed);
            if parent.is_some() && existing != link {
                let parent = (existing != NO_PARENT).then(|| self.id_of(existing));
                return Err(BcError::AlreadyExists { id, parent });
            }
            // Under the lock, so a release that saw refs fall to zero cannot free it now.
            take_refs(rec, 1);
            return Ok(index);
        }
        if link != NO_PARENT && self.depth(link) >= MAX_DEPTH {
            return Err(BcError::TooDeep);
        }
        let slot = match self.take_slot(&mut inner) {
            Some(slot) => slot,
            None => {
                self.reap_locked(&mut inner);
                self.take_slot(&mut inner).ok_or(BcError::TableFull)?
            }
        };
        let Some(index) = self.take_free_record(&mut inner) else {
            self.free_slot(&mut inner, slot);
            return Err(BcError::OutOfMemory);
        };
        let rec = self.record(index);
        let s = self.slot_at(slot);
        for (counter, limits) in s.counters.iter().zip(inner.defaults.iter()) {
            counter.reset(limits.barrier, limits.limit);
        }
        s.record.store(index, Ordering::Relaxed);
        let gen = generation(rec.state.load(Ordering::Relaxed));
        rec.id.store(id.0, Ordering::Relaxed);
        rec.link.store(link, Ordering::Relaxed);
        rec.slot.store(slot, Ordering::Relaxed);
        rec.children.store(0, Ordering::Relaxed);
        rec.left.store(0, Ordering::Relaxed);
        if link != NO_PARENT {
            let p = self.record(link);
            take_refs(p, 1);
            p.children.fetch_add(1, Ordering::Relaxed);
        }
        rec.state.store(pack(gen, true, 1), Ordering::Release);
        inner.ids.insert(id.0, index);
        inner.live += 1;
        Ok(index)
    }

    /// Returns the index of `id` with one reference taken, if it is live.
    pub(crate) fn lookup(&self, id: BcId) -> Option<u32> {
        if id == BcId::ROOT {
            return Some(ROOT);
        }
        let inner = self.inner.lock();
        let index = inner.ids.find(id.0)?;
        take_refs(self.record(index), 1);
        Some(index)
    }

    /// Takes one more reference on an index the caller already references.
    #[inline]
    pub(crate) fn retain(&self, index: u32) {
        self.retain_n(index, 1);
    }

    /// Takes `n` more references at once (one atomic operation: a guard that sets both
    /// exec and fork takes two).
    #[inline]
    pub(crate) fn retain_n(&self, index: u32, n: u64) {
        if index != ROOT {
            take_refs(self.record(index), n);
        }
    }

    /// References held on `index` now (for tests).
    #[cfg(test)]
    pub(crate) fn refs_of(&self, index: u32) -> u64 {
        refs(self.record(index).state.load(Ordering::SeqCst))
    }

    /// Drops one reference; the last one frees the record unless something is still
    /// charged.
    #[inline]
    pub(crate) fn release(&self, index: u32) {
        self.release_n(index, 1);
    }

    /// Drops `n` references at once.
    #[inline]
    pub(crate) fn release_n(&self, index: u32, n: u64) {
        if index == ROOT {
            return;
        }
        let prev = self.record(index).state.fetch_sub(n, Ordering::SeqCst);
        debug_assert!(refs(prev) >= n && prev & LIVE != 0);
        if refs(prev) == n {
            self.release_slow(index, generation(prev));
        }
    }

    #[cold]
    #[inline(never)]
    fn release_slow(&self, index: u32, gen: u32) {
        // Pairs with the Release decrements of the other holders: their uses of the record
        // happen before it is freed.
        fence(Ordering::SeqCst);
        self.free_if_unused(index, gen);
    }

    /// Frees `index` if its last reference was released (a release that found a hazard on
    /// it left it to the hazard's thread, which calls this when it leaves).
    pub(super) fn free_if_released(&self, index: u32) {
        let state = self.record(index).state.load(Ordering::SeqCst);
        if state & LIVE != 0 && refs(state) == 0 {
            self.free_if_unused(index, generation(state));
        }
    }

    /// Frees `index` (generation `gen`) if nothing refers to it and nothing is charged
    /// through it any more.
    pub(super) fn free_if_unused(&self, index: u32, gen: u32) {
        let mut inner = self.inner.lock();
        self.free_locked(&mut inner, index, gen);
    }

    /// Frees `index` if it is still `(gen, LIVE, 0 refs)` and nothing is charged through it
    /// (its slot holds nothing, or, retired, its `left` is zero), then releases the
    /// reference it held on its parent, freeing up the chain.
    fn free_locked(&self, inner: &mut Inner, mut index: u32, mut gen: u32) {
        loop {
            let rec = self.record(index);
            let state = rec.state.load(Ordering::Acquire);
            if generation(state) != gen || state & LIVE == 0 || refs(state) != 0 {
                // Revived by a lookup, or already freed and reused (the generation moved on).
                return;
            }
            let retired = state & RETIRED != 0;
            if retired {
                if rec.left.load(Ordering::SeqCst) != 0 {
                    return; // leftovers still charged through it
                }
            } else if !self
                .slot_at(rec.slot.load(Ordering::Relaxed))
                .nothing_held()
            {
                return; // a zombie, for `reap`
            }
            if self.hazard_held(index) {
                return; // a guard is still in it; its thread frees it when it leaves
            }
            if retired {
                inner.retired -= 1;
            } else {
                let slot = rec.slot.load(Ordering::Relaxed);
                inner.ids.remove(rec.id.load(Ordering::Relaxed));
                self.free_slot(inner, slot);
                inner.live -= 1;
            }
            let parent = rec.link.load(Ordering::Relaxed);
            rec.slot.store(NO_SLOT, Ordering::Relaxed);
            rec.link.store(inner.record_free, Ordering::Relaxed);
            rec.state
                .store(pack(gen.wrapping_add(1), false, 0), Ordering::Release);
            inner.record_free = index;
            if parent == NO_PARENT {
                return;
            }
            let p = self.record(parent);
            p.children.fetch_sub(1, Ordering::Relaxed);
            let prev = p.state.fetch_sub(1, Ordering::SeqCst);
            if refs(prev) != 1 {
                return;
            }
            fence(Ordering::Acquire);
            index = parent;
            gen = generation(prev);
        }
    }

    /// Frees every zombie whose charges have all been uncharged, and every retired record
    /// nothing is charged through or refers to; returns how many.
    pub(crate) fn reap(&self) -> u32 {
        let mut inner = self.inner.lock();
        self.reap_locked(&mut inner)
    }

    fn reap_locked(&self, inner: &mut Inner) -> u32 {
        let before = inner.live + inner.retired;
        for index in 1..inner.record_hwm {
            let state = self.record(index).state.load(Ordering::Acquire);
            if state & LIVE != 0 && refs(state) == 0 {
                self.free_locked(inner, index, generation(state));
            }
        }
        before - (inner.live + inner.retired)
    }

    /// Retires `index`, whose reference the caller gives up: the id leaves the map at once
    /// (it can be created again, fresh), the slot goes back to the table, and what is still
    /// charged through the record stays charged to its ancestors, exactly, until it is
    /// given back (see the module docs). No `held` changes anywhere.
    ///
    /// # Errors
    /// [`BcError::InvalidId`] for the root; [`BcError::Retired`] if it was retired already
    /// (through another handle), or if its parent was (naming the parent). Either way
    /// nothing changes (the caller's reference is still given up).
    pub(crate) fn retire(&self, index: u32) -> Result<(), BcError> {
        if index == ROOT {
            return Err(BcError::InvalidId(BcId::ROOT));
        }
        let rec = self.record(index);
        let result = {
            let mut inner = self.inner.lock();
            let parent = rec.link.load(Ordering::Relaxed);
            if rec.state.load(Ordering::Acquire) & RETIRED != 0 {
                Err(BcError::Retired(self.id_of(index)))
            } else if parent != NO_PARENT && self.is_retired(parent) {
                // Its charges already go past the retired parent; retire children first.
                Err(BcError::Retired(self.id_of(parent)))
            } else {
                inner.ids.remove(rec.id.load(Ordering::Relaxed));
                inner.live -= 1;
                inner.retired += 1;
                rec.state.fetch_or(RETIRED, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                // Every walk that read the record as live is done with its slot after this.
                while rec.pins.load(Ordering::SeqCst) != 0 {
                    crate::accounting::fence::spin();
                }
                let slot = rec.slot.load(Ordering::Relaxed);
                let s = self.slot_at(slot);
                rec.left.fetch_add(s.total_held(), Ordering::SeqCst);
                for c in &s.counters {
                    c.reset(0, 0);
                }
                self.free_slot(&mut inner, slot);
                rec.slot.store(NO_SLOT, Ordering::Relaxed);
                Ok(())
            }
        };
        self.release(index);
        fence(Ordering::SeqCst);
        if result.is_ok() && rec.left.load(Ordering::SeqCst) == 0 {
            let state = rec.state.load(Ordering::SeqCst);
            if refs(state) == 0 && state & LIVE != 0 {
                self.free_if_unused(index, generation(state));
            }
        }
        result
    }

    /// Takes one reference on every live beancounter besides the root (zombies included,
    /// which this revives until the references are released; retired ones left out) and
    /// pushes their indices, in index order, without growing `out`: nothing allocates
    /// under the lock. Returns how many live beancounters there are; more than were pushed
    /// means `out` was too small.
    #[cfg(not(beancounter_loom))]
    pub(crate) fn retain_live(&self, out: &mut Vec<u32>) -> u32 {
        let inner = self.inner.lock();
        for index in 1..inner.record_hwm {
            let rec = self.record(index);
            let state = rec.state.load(Ordering::Acquire);
            if state & (LIVE | RETIRED) == LIVE && out.len() < out.capacity() {
                // Under the lock, so a release that saw refs fall to zero cannot free it now.
                take_refs(rec, 1);
                out.push(index);
            }
        }
        inner.live
    }

    /// A free record index, mapping a new chunk of records if needed.
    fn take_free_record(&self, inner: &mut Inner) -> Option<u32> {
        if inner.record_free != 0 {
            let index = inner.record_free;
            inner.record_free = self.record(index).link.load(Ordering::Relaxed);
            return Some(index);
        }
        let index = inner.record_hwm;
        if (index as usize) >= super::table::MAX_RECORDS || !self.records.ensure(index as usize) {
            return None;
        }
        inner.record_hwm += 1;
        Some(index)
    }

    /// A free slot: from the free list, or one never used.
    fn take_slot(&self, inner: &mut Inner) -> Option<u32> {
        if inner.slot_free != 0 {
            let slot = inner.slot_free;
            inner.slot_free = self.slot_at(slot).record.load(Ordering::Relaxed);
            return Some(slot);
        }
        if inner.slot_hwm < inner.capacity {
            inner.slot_hwm += 1;
            return Some(inner.slot_hwm - 1);
        }
        None
    }

    /// Puts `slot` (holding nothing) back on the free list.
    fn free_slot(&self, inner: &mut Inner, slot: u32) {
        self.slot_at(slot)
            .record
            .store(inner.slot_free, Ordering::Relaxed);
        inner.slot_free = slot;
    }
}

#[inline]
fn take_refs(rec: &Record, n: u64) {
    let prev = rec.state.fetch_add(n, Ordering::Relaxed);
    debug_assert!(prev & LIVE != 0);
    if refs(prev) >= REFS - n {
        // 2^30 references means references are being leaked; continuing would wrap into
        // the RETIRED bit. Like `Arc`, stop the process rather than corrupt it.
        std::process::abort();
    }
}
