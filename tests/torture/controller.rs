//! The controller thread: moves tenants' `Memory` limits while everything runs (a random
//! range, below what the tenant holds, generous, none; barriers only in the soft zone),
//! through both `Beancounter::set_limits` and `beancounter::set_limits`, now and then retires
//! a leaf and creates it again (`lifecycle.rs`), and samples every tenant against the bound
//! of its window after each change.

use crate::common::Rng;
use crate::model::{fail, Count, Shared, CAP};
use beancounter::{Resource, ResourceStat};
use std::sync::atomic::fence;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// One round of the controller in this many retires a leaf and creates it again (a round
/// takes 25 to 55 ms in a debug build on two cores: 150 to 350 retirements in a default run).
const RETIRE_EVERY: u64 = 4;

pub fn controller(sh: Arc<Shared>, seed: u64) {
    let mut rng = Rng::new(seed);
    let controlled: Vec<usize> = (0..sh.tree.len())
        .filter(|&t| sh.tree.controlled(t))
        .collect();
    let leaves: Vec<usize> = (0..sh.tree.len()).filter(|&t| sh.tree.is_leaf(t)).collect();
    while !sh.stop.load(Relaxed) {
        sh.gate.poll(|_| {});
        std::thread::sleep(Duration::from_millis(1 + rng.below(6)));
        if rng.below(RETIRE_EVERY) == 0 {
            let t = leaves[rng.below(leaves.len() as u64) as usize];
            sh.retire_and_recreate(t, &mut rng);
        } else {
            let t = controlled[rng.below(controlled.len() as u64) as usize];
            change(&sh, &mut rng, t);
        }
        sample(&sh);
    }
}

fn change(sh: &Shared, rng: &mut Rng, t: usize) {
    let node = &sh.tree.nodes[t];
    let bc = node.bc();
    let held = bc.stat(Resource::Memory).held;
    let l = sh.tree.random_limits(t, rng, held);
    // The window's bound takes the new limit before any charge can be checked against it.
    {
        let mut w = sh.windows.lock().unwrap();
        w[t].max_limit = w[t].max_limit.max(l.limit);
    }
    if l.limit < held {
        sh.tally.add(Count::LimitsBelowHeld, 1);
    }
    let set = if rng.below(2) == 0 {
        bc.set_limits(Resource::Memory, l)
    } else {
        beancounter::set_limits(node.id, Resource::Memory, l)
    };
    set.unwrap_or_else(|e| fail!("set_limits({}, {l:?}): {e}", node.id));
    sh.tally.add(Count::LimitsSet, 1);
}

/// Reads every tenant's `Memory` and `Threads` while the workers run: neither `held` nor
/// `maxheld` may pass the window's bound (the larger of the limits in force during the
/// window and what was held when it began), except where a forced charge reached the tenant;
/// the capped top never passes [`CAP`]; `Threads` never pass their (fixed) limits.
pub fn sample(sh: &Shared) {
    let stats: Vec<(ResourceStat, ResourceStat)> = sh
        .tree
        .nodes
        .iter()
        .map(|n| {
            let bc = n.bc();
            (bc.stat(Resource::Memory), bc.stat(Resource::Threads))
        })
        .collect();
    // Pairs with `Shared::mark_forced`: a forced charge these reads saw has its flag set.
    fence(SeqCst);
    let windows = sh.windows.lock().unwrap().clone();
    let capped = sh.tree.capped_top();
    for (t, (mem, threads)) in stats.iter().enumerate() {
        let id = sh.tree.nodes[t].id;
        if threads.held > threads.limit {
            fail!(
                "tenant {id} runs {} threads over its limit {}",
                threads.held,
                threads.limit
            );
        }
        let bound = if t == capped {
            CAP
        } else if sh.forced[t].load(SeqCst) {
            continue;
        } else {
            windows[t].base.max(windows[t].max_limit)
        };
        if mem.held > bound || mem.maxheld > bound {
            fail!(
                "tenant {id} went past every limit it had this window ({bound}): {mem:?}, \
                 window {:?}",
                windows[t]
            );
        }
    }
    sh.tally.add(Count::Samples, 1);
}
