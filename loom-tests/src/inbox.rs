//! The model of a heap's inbox (`src/alloc/remote.rs`): two threads free objects of one
//! heap, each handing over a batch of two objects and then a batch of one through its own
//! outbox (the batches go to the lanes in turn, so both threads push onto both lanes),
//! while the owner takes the inbox once in the middle and once after. Every object comes
//! back to the owner exactly once: no push is lost to a concurrent push or take, no take
//! hands out a chain twice. (The links are plain writes, which loom does not track: the
//! Release/Acquire pairing that publishes them is argued in `remote.rs`, not modelled.)

use crate::models::model;
use crate::remote::{Block, Inbox, Lanes, Outbox, LANES};
use loom::sync::Arc;
use loom::thread;

/// Objects: three per freeing thread, each a `Block` with a `mark` that tells them apart
/// once they come back; boxed, and reached only through raw pointers.
#[repr(C)]
struct Object {
    block: Block,
    mark: usize,
}

struct Objects(Vec<*mut Object>);

// SAFETY: each thread touches only its own objects until it hands them over through the
// inbox, which is what the model checks.
unsafe impl Send for Objects {}
// SAFETY: as above.
unsafe impl Sync for Objects {}

impl Drop for Objects {
    fn drop(&mut self) {
        for &o in &self.0 {
            // SAFETY: from `Box::into_raw` below, dropped once, after every thread is done.
            drop(unsafe { Box::from_raw(o) });
        }
    }
}

/// Walks every chain `take` handed over, appending the marks found.
fn collect((chains, n): Lanes, marks: &mut Vec<usize>) {
    assert!(n <= LANES);
    for mut at in chains.into_iter().take(n) {
        assert!(!at.is_null(), "a chain handed over is not empty");
        while !at.is_null() {
            // SAFETY: the chain's objects live in the model's `Objects`, which outlive it;
            // the owner's Acquire swap made their links visible.
            let (next, mark) = unsafe { ((*at).next, (*at.cast::<Object>()).mark) };
            marks.push(mark);
            at = next;
        }
    }
}

#[test]
fn remote_frees_reach_the_owner_once() {
    model("remote_frees_reach_the_owner_once", || {
        let inbox = Arc::new(Inbox::new());
        let objects = Arc::new(Objects(
            (0..6)
                .map(|mark| {
                    Box::into_raw(Box::new(Object {
                        block: Block {
                            next: core::ptr::null_mut(),
                        },
                        mark,
                    }))
                })
                .collect(),
        ));
        let freers: Vec<_> = (0..2)
            .map(|t| {
                let (inbox, objects) = (inbox.clone(), objects.clone());
                thread::spawn(move || {
                    let outbox = Outbox::new();
                    let dest: *const Inbox = &*inbox;
                    let object = |i: usize| objects.0[3 * t + i].cast::<Block>();
                    for batch in [&[0, 1][..], &[2][..]] {
                        for &i in batch {
                            // SAFETY: object `3t + i` is this thread's alone, 8-aligned;
                            // the inbox outlives the thread.
                            unsafe { outbox.add(dest, object(i)) };
                        }
                        outbox.flush();
                    }
                })
            })
            .collect();
        let mut marks = Vec::new();
        // Without a yield here loom never schedules the freeing threads before the owner's
        // first take (it found no push in it in any interleaving).
        thread::yield_now();
        collect(inbox.take(), &mut marks);
        for f in freers {
            f.join().unwrap();
        }
        collect(inbox.take(), &mut marks);
        assert_eq!(inbox.take().1, 0, "the inbox is empty after a take");
        marks.sort_unstable();
        assert_eq!(marks, (0..6).collect::<Vec<_>>(), "every object once");
    });
}
