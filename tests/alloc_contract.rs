//! The `GlobalAlloc` contract of `BeanAlloc` (DESIGN §6.5, §7): every method for sizes from
//! 1 byte to 64 MiB and alignments from 1 byte to 64 KiB, `realloc` keeping contents and
//! alignment, zeroing, no overlap between live blocks; what each route charges; requests that
//! cannot be served returning null without a charge.

mod common;

use beancounter::{BeanAlloc, Resource, ResourceStat};
use common::{
    charged_after_realloc, charged_bytes, class_size, fill, held, tenant, verify, verify_prefix,
    Rng, Runner,
};
use std::alloc::{GlobalAlloc, Layout};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Largest block served from a segment's runs (`run::LARGE_MAX`).
const LARGE_MAX: usize = 2 * MIB;
/// Largest alignment served (`run::MAX_ALIGN`).
const MAX_ALIGN: usize = 2 * MIB;

fn main() {
    let mut r = Runner::new();
    r.check("every_method_every_size_every_alignment", every_method);
    r.check("no_overlap_between_live_blocks", no_overlap);
    r.check(
        "realloc_in_place_within_a_class_keeps_the_pointer",
        realloc_in_place,
    );
    r.check(
        "realloc_under_another_tenant_moves_and_charges_it",
        realloc_across_tenants,
    );
    r.check(
        "a_slab_object_grown_past_4_kib_becomes_a_block_of_pages",
        grown_blocks,
    );
    // In a process of its own: the holes it makes must be the only ones.
    r.isolated(
        "a_block_grown_a_page_at_a_time_moves_rarely_in_a_heap_with_holes",
        60,
        growth_among_holes,
    );
    // In a process of its own: whether a freed huge block stays mapped depends on the free
    // memory the process keeps, which the other checks would change.
    r.isolated(
        "large_and_huge_routes_charge_pages_and_map",
        60,
        large_and_huge,
    );
    r.check(
        "alignment_above_max_align_is_null_without_charge",
        too_aligned,
    );
    r.check("sizes_near_isize_max_are_null_without_charge", too_big);
    r.check("impossible_sizes_leave_maxheld_alone", too_big_maxheld);
    r.check(
        "realloc_to_an_impossible_size_keeps_the_block",
        realloc_too_big,
    );
    r.check(
        "freeing_everything_returns_mapped_bytes",
        mapped_bytes_return,
    );
    r.check("heap_invariants_hold", || {
        beancounter::check_heap().unwrap();
    });
    r.finish();
}

/// 1 byte to 64 MiB: every power of two, its neighbours, and the point halfway to the next.
fn sizes() -> Vec<usize> {
    let mut v = Vec::new();
    for e in 0..=26 {
        let p = 1usize << e;
        v.extend([p - 1, p, p + 1, p + p / 2]);
    }
    v.retain(|&s| (1..=64 * MIB).contains(&s));
    v.sort_unstable();
    v.dedup();
    v
}

fn alignments() -> Vec<usize> {
    (0..=16).map(|e| 1usize << e).collect()
}

fn mem_allocs(t: &beancounter::Beancounter) -> (u64, u64) {
    held(t)
}

/// Allocates through each method, checks alignment, size, the charge, zeroing (also of a
/// block reusing dirty memory), and `realloc` to sizes on other routes.
fn every_method() {
    let t = tenant(1);
    let sizes = sizes();
    let aligns = alignments();
    let mut tag = 0u64;
    let _g = t.enter();
    let base = mem_allocs(&t);
    for &align in &aligns {
        for &size in &sizes {
            let layout = Layout::from_size_align(size, align).unwrap();
            let charge = charged_bytes(layout);
            tag += 1;

            // alloc
            // SAFETY: a non-zero size.
            let p = unsafe { ALLOC.alloc(layout) };
            assert!(!p.is_null(), "alloc({size}, {align}) is null");
            assert_eq!(p as usize % align, 0, "alloc({size}, {align}) misaligned");
            assert_eq!(
                mem_allocs(&t),
                (base.0 + charge, base.1 + 1),
                "charge of alloc({size}, {align})"
            );
            // SAFETY: the block is `size` bytes.
            unsafe {
                fill(p, size, tag);
                assert_eq!(verify(p, size, tag), Ok(()), "alloc({size}, {align})");
                ALLOC.dealloc(p, layout);
            }
            assert_eq!(mem_allocs(&t), base, "dealloc({size}, {align})");

            // alloc_zeroed, twice: the second one likely reuses the dirty block just freed
            // (a huge block is a fresh mapping each time: once is enough).
            let rounds = if size > LARGE_MAX { 1 } else { 2 };
            for round in 0..rounds {
                // SAFETY: a non-zero size.
                let z = unsafe { ALLOC.alloc_zeroed(layout) };
                assert!(!z.is_null(), "alloc_zeroed({size}, {align}) is null");
                assert_eq!(
                    z as usize % align,
                    0,
                    "alloc_zeroed({size}, {align}) misaligned"
                );
                assert_eq!(mem_allocs(&t), (base.0 + charge, base.1 + 1));
                // SAFETY: the block is `size` bytes.
                unsafe {
                    assert!(
                        common::all_zero(z, size),
                        "alloc_zeroed({size}, {align}) round {round} not zero"
                    );
                    if size > LARGE_MAX {
                        fill(z, size, tag);
                    } else {
                        std::ptr::write_bytes(z, 0xA5, size);
                    }
                    ALLOC.dealloc(z, layout);
                }
            }
            assert_eq!(mem_allocs(&t), base);

            // realloc to a size on every route (grow and shrink), keeping the prefix; above
            // 4 MiB to one shrink, one grow and one other route (page faults dominate).
            let routes = [1, 24, 3000, 40 * KIB, 3 * MIB];
            let all = [
                routes[0],
                routes[1],
                routes[2],
                routes[3],
                routes[4],
                size / 3 + 1,
                size * 2,
            ];
            let few = [
                size / 3 + 1,
                size * 2,
                routes[(size + align) % routes.len()],
            ];
            let targets = if size > 4 * MIB { &few[..] } else { &all[..] };
            for &to in targets {
                let to = to.min(64 * MIB);
                // SAFETY: a non-zero size.
                let p = unsafe { ALLOC.alloc(layout) };
                assert!(!p.is_null());
                // SAFETY: the block is `size` bytes; realloc keeps min(size, to) of them, and
                // `to` rounded up to `align` does not overflow isize.
                unsafe {
                    fill(p, size, tag);
                    let q = ALLOC.realloc(p, layout, to);
                    assert!(!q.is_null(), "realloc({size}, {align}) to {to} is null");
                    assert_eq!(q as usize % align, 0, "realloc({size}, {align}) to {to}");
                    let new = Layout::from_size_align(to, align).unwrap();
                    // A slab object shrunk by at most half stays where it is, charged for
                    // the class it occupies; one grown past 4 KiB to a slab size moves to a
                    // block of pages (a grown block), charged its pages; every other realloc
                    // is charged for the new size.
                    let (old_class, new_class) = (class_size(size, align), class_size(to, align));
                    let kept = matches!((old_class, new_class),
                        (Some(o), Some(n)) if n < o && 2 * to >= o);
                    assert_eq!(
                        kept,
                        q == p && new_class < old_class,
                        "realloc({size}, {align}) to {to}"
                    );
                    let charge = charged_after_realloc(layout, charged_bytes(layout), to, q == p);
                    assert_eq!(
                        mem_allocs(&t),
                        (base.0 + charge, base.1 + 1),
                        "charge after realloc({size}, {align}) to {to}"
                    );
                    assert_eq!(
                        verify_prefix(q, size, size.min(to), tag),
                        Ok(()),
                        "realloc({size}, {align}) to {to} lost a byte"
                    );
                    fill(q, to, tag + 1);
                    assert_eq!(verify(q, to, tag + 1), Ok(()));
                    ALLOC.dealloc(q, new);
                }
                assert_eq!(mem_allocs(&t), base);
            }
        }
    }
    drop(_g);
    beancounter::check_heap().unwrap();
}

/// Many live blocks of random sizes and alignments: their ranges are disjoint and each keeps
/// its own pattern while all the others are written.
fn no_overlap() {
    let mut rng = Rng::new(7);
    let mut blocks: Vec<(usize, Layout, u64)> = Vec::with_capacity(4000);
    for i in 0..4000u64 {
        let size = match rng.below(100) {
            0..=79 => 1 + rng.below(512) as usize,
            80..=94 => 1 + rng.below(64 * KIB as u64) as usize,
            95..=98 => 1 + rng.below(LARGE_MAX as u64) as usize,
            _ => LARGE_MAX + rng.below(6 * MIB as u64) as usize,
        };
        let align = 1usize << rng.below(17);
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(layout) };
        assert!(!p.is_null());
        assert_eq!(p as usize % align, 0);
        // SAFETY: the block is `size` bytes.
        unsafe { fill(p, size, i) };
        blocks.push((p as usize, layout, i));
    }
    for &(p, l, tag) in &blocks {
        // SAFETY: a live block of `l.size()` bytes.
        assert_eq!(unsafe { verify(p as *const u8, l.size(), tag) }, Ok(()));
    }
    let mut ranges: Vec<(usize, usize)> =
        blocks.iter().map(|&(p, l, _)| (p, p + l.size())).collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "blocks {:x?} and {:x?} overlap",
            w[0],
            w[1]
        );
    }
    for (p, l, _) in blocks {
        // SAFETY: allocated above with `l`.
        unsafe { ALLOC.dealloc(p as *mut u8, l) };
    }
}

/// Same tenant, same class (or a large/huge block shrinking): the block stays where it is and
/// the charge follows the new size.
fn realloc_in_place() {
    let t = tenant(2);
    let _g = t.enter();
    let base = held(&t);
    // SAFETY: non-zero sizes; every block is used within its size.
    unsafe {
        // A slab object: 100 bytes is in the 112-byte class, and so is 110.
        let l = Layout::from_size_align(100, 8).unwrap();
        let p = ALLOC.alloc(l);
        fill(p, 100, 1);
        let q = ALLOC.realloc(p, l, 110);
        assert_eq!(q, p, "a realloc within the class moved the block");
        assert_eq!(verify(q, 100, 1), Ok(()));
        assert_eq!(held(&t), (base.0 + 112, base.1 + 1));
        let q2 = ALLOC.realloc(q, Layout::from_size_align(110, 8).unwrap(), 97);
        assert_eq!(q2, p, "a shrink within the class moved the block");
        ALLOC.dealloc(q2, Layout::from_size_align(97, 8).unwrap());
        assert_eq!(held(&t), base);

        // Shrinking a slab object to a smaller class: in place while at least half of it
        // stays in use (it keeps the charge of the class it occupies), moved below that.
        let l = Layout::from_size_align(1000, 8).unwrap(); // the 1024-byte class
        let p = ALLOC.alloc(l);
        fill(p, 1000, 4);
        let q = ALLOC.realloc(p, l, 600);
        assert_eq!(q, p, "a shrink to more than half moved the block");
        assert_eq!(held(&t), (base.0 + 1024, base.1 + 1));
        let r = ALLOC.realloc(q, Layout::from_size_align(600, 8).unwrap(), 300);
        assert_ne!(r, p, "a shrink to less than half stayed");
        assert_eq!(verify_prefix(r, 1000, 300, 4), Ok(()));
        assert_eq!(held(&t), (base.0 + 320, base.1 + 1));
        ALLOC.dealloc(r, Layout::from_size_align(300, 8).unwrap());
        assert_eq!(held(&t), base);

        // A large run shrinking: the tail pages are given back in place.
        let l = Layout::from_size_align(100 * KIB, 8).unwrap();
        let p = ALLOC.alloc(l);
        fill(p, 100 * KIB, 2);
        assert_eq!(held(&t), (base.0 + 100 * KIB as u64, base.1 + 1));
        let q = ALLOC.realloc(p, l, 40 * KIB);
        assert_eq!(q, p, "a shrinking large run moved");
        assert_eq!(held(&t), (base.0 + 40 * KIB as u64, base.1 + 1));
        assert_eq!(verify_prefix(q, 100 * KIB, 40 * KIB, 2), Ok(()));
        // Growing it back: in place or not, the contents stay and the charge follows.
        let r = ALLOC.realloc(q, Layout::from_size_align(40 * KIB, 8).unwrap(), 90 * KIB);
        assert!(!r.is_null());
        assert_eq!(verify_prefix(r, 100 * KIB, 40 * KIB, 2), Ok(()));
        assert_eq!(held(&t), (base.0 + 92 * KIB as u64, base.1 + 1));
        ALLOC.dealloc(r, Layout::from_size_align(90 * KIB, 8).unwrap());
        assert_eq!(held(&t), base);

        // Grown a page at a time (in place while the pages after it are free, into the
        // run's reserve without taking pages): charged exactly at every step.
        let mut size = 64 * KIB;
        let mut p = ALLOC.alloc(Layout::from_size_align(size, 8).unwrap());
        fill(p, size, 6);
        while size < MIB {
            p = ALLOC.realloc(p, Layout::from_size_align(size, 8).unwrap(), size + 4096);
            assert!(!p.is_null());
            size += 4096;
            assert_eq!(held(&t), (base.0 + size as u64, base.1 + 1), "{size}");
        }
        assert_eq!(verify_prefix(p, 64 * KIB, 64 * KIB, 6), Ok(()));
        ALLOC.dealloc(p, Layout::from_size_align(size, 8).unwrap());
        assert_eq!(held(&t), base);

        // A huge block shrinking keeps its address (mremap shrinks in place).
        let l = Layout::from_size_align(16 * MIB, 8).unwrap();
        let p = ALLOC.alloc(l);
        fill(p, 16 * MIB, 3);
        let mapped = beancounter::mapped_bytes();
        let q = ALLOC.realloc(p, l, 8 * MIB + 1);
        assert_eq!(q, p, "a shrinking huge block moved");
        assert_eq!(held(&t), (base.0 + 8 * MIB as u64 + 4096, base.1 + 1));
        assert_eq!(beancounter::mapped_bytes(), mapped - 8 * MIB + 4096);
        assert_eq!(verify_prefix(q, 16 * MIB, 8 * MIB + 1, 3), Ok(()));
        // And growing it, in place or moved, keeps the contents.
        let r = ALLOC.realloc(
            q,
            Layout::from_size_align(8 * MIB + 1, 8).unwrap(),
            24 * MIB,
        );
        assert!(!r.is_null());
        assert_eq!(held(&t), (base.0 + 24 * MIB as u64, base.1 + 1));
        assert_eq!(verify_prefix(r, 16 * MIB, 8 * MIB + 1, 3), Ok(()));
        ALLOC.dealloc(r, Layout::from_size_align(24 * MIB, 8).unwrap());
    }
    assert_eq!(held(&t), base);
}

/// A slab object that `realloc` grows past 4 KiB moves to a block of pages (a grown block)
/// charged its pages; it then grows in place, and every route that meets it with its
/// slab-sized layout (free here and on another thread, resize under another tenant, shrink)
/// treats it as the block of pages it is.
fn grown_blocks() {
    let (t, u) = (tenant(5), tenant(6));
    let (t0, u0) = (held(&t), held(&u));
    let l = |size| Layout::from_size_align(size, 8).unwrap();
    let g = t.enter();
    // SAFETY: non-zero sizes; every block is used within its size and freed with its layout.
    unsafe {
        let p = ALLOC.alloc(l(4096));
        fill(p, 4096, 7);
        assert_eq!(held(&t), (t0.0 + 4096, t0.1 + 1));
        let q = ALLOC.realloc(p, l(4096), 5000);
        assert_ne!(
            q, p,
            "a 4 KiB object grown to 5000 bytes stayed in its slab"
        );
        assert_eq!(
            held(&t),
            (t0.0 + 8192, t0.1 + 1),
            "a grown block is charged its pages"
        );
        assert_eq!(
            ALLOC.realloc(q, l(5000), 8192),
            q,
            "growth within its pages moved it"
        );
        assert_eq!(held(&t), (t0.0 + 8192, t0.1 + 1));
        // Grown a page at a time to 32 KiB: charged exactly at every step, contents kept.
        let mut size = 8192;
        let mut p = q;
        while size < 32 * KIB {
            p = ALLOC.realloc(p, l(size), size + 4096);
            assert!(!p.is_null());
            size += 4096;
            assert_eq!(held(&t), (t0.0 + size as u64, t0.1 + 1), "{size}");
        }
        assert_eq!(verify_prefix(p, 4096, 4096, 7), Ok(()));
        // Freed with its slab-sized layout.
        ALLOC.dealloc(p, l(size));
        assert_eq!(held(&t), t0);

        // Shrunk: it moves back to a slab object of the class that fits.
        let p = ALLOC.realloc(ALLOC.alloc(l(100)), l(100), 20_000);
        fill(p, 20_000, 8);
        assert_eq!(held(&t), (t0.0 + 20_480, t0.1 + 1));
        let q = ALLOC.realloc(p, l(20_000), 3000);
        assert_ne!(
            q, p,
            "a grown block shrunk to a slab size stayed a block of pages"
        );
        assert_eq!(
            held(&t),
            (t0.0 + class_size(3000, 8).unwrap() as u64, t0.1 + 1)
        );
        assert_eq!(verify_prefix(q, 20_000, 3000, 8), Ok(()));
        ALLOC.dealloc(q, l(3000));
        assert_eq!(held(&t), t0);

        // Resized while another tenant is current: it moves, and that tenant pays its pages.
        let p = ALLOC.realloc(ALLOC.alloc(l(64)), l(64), 6000);
        fill(p, 6000, 9);
        drop(g);
        let gu = u.enter();
        let q = ALLOC.realloc(p, l(6000), 7000);
        drop(gu);
        assert_ne!(q, p);
        assert_eq!(held(&t), t0, "the old owner still pays for the moved block");
        assert_eq!(held(&u), (u0.0 + 8192, u0.1 + 1));
        assert_eq!(verify(q, 6000, 9), Ok(()));

        // Freed on another thread, with its slab-sized layout: its owner is uncharged.
        let q = q as usize;
        std::thread::spawn(move || ALLOC.dealloc(q as *mut u8, l(7000)))
            .join()
            .unwrap();
        assert_eq!(held(&u), u0);
    }
    beancounter::check_heap().unwrap();
}

/// A heap with holes of 8 KiB and 40-64 KiB between live blocks, then one block grown from
/// 4 KiB to 1 MiB a page per `realloc`: placed by best fit, each move would land it in the
/// next hole just large enough (about 20 moves, each a copy); placed for growth, at the
/// front of a free run four times its size, it moves a few times at most. Charged exactly
/// throughout, contents kept.
fn growth_among_holes() {
    let t = tenant(10);
    let _g = t.enter();
    let base = held(&t);
    let l = |size| Layout::from_size_align(size, 8).unwrap();
    let mut live = Vec::with_capacity(2000);
    for i in 0..2000usize {
        let size = if i % 3 == 0 {
            8192
        } else {
            40_000 + (i % 7) * 4096
        };
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(l(size)) };
        assert!(!p.is_null());
        live.push((p, size));
    }
    for &(p, size) in live.iter().step_by(2) {
        // SAFETY: allocated above with this layout, freed once (the odd ones stay).
        unsafe { ALLOC.dealloc(p, l(size)) };
    }
    let holes = held(&t);
    let mut moves = 0;
    // SAFETY: every block is used within its size and freed with its layout.
    unsafe {
        let mut size = 4096;
        let mut p = ALLOC.alloc(l(size));
        fill(p, size, 11);
        while size < MIB {
            let q = ALLOC.realloc(p, l(size), size + 4096);
            assert!(!q.is_null());
            moves += usize::from(q != p && size > 4096);
            p = q;
            size += 4096;
            assert_eq!(held(&t), (holes.0 + size as u64, holes.1 + 1), "{size}");
        }
        assert_eq!(verify_prefix(p, 4096, 4096, 11), Ok(()));
        ALLOC.dealloc(p, l(size));
        for &(p, size) in live.iter().skip(1).step_by(2) {
            ALLOC.dealloc(p, l(size));
        }
    }
    drop(live);
    assert_eq!(held(&t), base);
    assert!(moves <= 3, "grown to 1 MiB among holes with {moves} moves");
}

/// A block owned by tenant A, reallocated while B is current: it moves, A is uncharged, B is
/// charged, and the contents come along — on every route, even for a size in the same class.
fn realloc_across_tenants() {
    let (a, b) = (tenant(3), tenant(4));
    let (a0, b0) = (held(&a), held(&b));
    for &(size, to) in &[
        (100usize, 110usize),
        (5000, 5000),
        (100 * KIB, 90 * KIB),
        (5 * MIB, 4 * MIB),
        (40, 64 * KIB),
        (3 * MIB, 200),
    ] {
        let l = Layout::from_size_align(size, 16).unwrap();
        let new = Layout::from_size_align(to, 16).unwrap();
        let ga = a.enter();
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(l) };
        assert!(!p.is_null());
        // SAFETY: `size` bytes.
        unsafe { fill(p, size, size as u64) };
        assert_eq!(held(&a), (a0.0 + charged_bytes(l), a0.1 + 1));
        drop(ga);
        let gb = b.enter();
        // SAFETY: `p` is live with layout `l`.
        let q = unsafe { ALLOC.realloc(p, l, to) };
        drop(gb);
        assert!(!q.is_null());
        assert_ne!(
            q, p,
            "realloc under another tenant kept A's block ({size} -> {to})"
        );
        assert_eq!(
            held(&a),
            a0,
            "A still charged after the move ({size} -> {to})"
        );
        assert_eq!(
            held(&b),
            (b0.0 + charged_bytes(new), b0.1 + 1),
            "B not charged for the moved block ({size} -> {to})"
        );
        // SAFETY: `q` holds `to` bytes.
        let kept = unsafe { verify_prefix(q, size, size.min(to), size as u64) };
        assert_eq!(kept, Ok(()), "contents lost moving {size} -> {to}");
        // Freed from the root: B, the owner, is uncharged.
        // SAFETY: `q` is live with layout `new`.
        unsafe { ALLOC.dealloc(q, new) };
        assert_eq!(held(&b), b0);
    }
}

/// 32 KiB < size <= 2 MiB is a page run, larger a mapping of its own: both charge the
/// page-rounded size; a huge block's mapping comes and goes with it.
fn large_and_huge() {
    let t = tenant(5);
    let _g = t.enter();
    let base = held(&t);
    for &(size, align) in &[
        (32 * KIB + 1, 8),
        (64 * KIB, 64 * KIB),
        (LARGE_MAX - 1, 8),
        (LARGE_MAX, 4096),
        (LARGE_MAX, MAX_ALIGN),
        (LARGE_MAX + 1, 8),
        (10 * MIB + 3, 64 * KIB),
        (64 * MIB, MAX_ALIGN),
    ] {
        let l = Layout::from_size_align(size, align).unwrap();
        let rounded = size.next_multiple_of(4096);
        let mapped0 = beancounter::mapped_bytes();
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(l) };
        assert!(!p.is_null(), "({size}, {align})");
        assert_eq!(p as usize % align, 0);
        assert_eq!(
            held(&t),
            (base.0 + rounded as u64, base.1 + 1),
            "({size}, {align})"
        );
        let grew = beancounter::mapped_bytes() - mapped0;
        if size > LARGE_MAX {
            assert!(
                (rounded..=rounded + align.max(4096)).contains(&grew),
                "huge ({size}, {align}) mapped {grew}"
            );
        }
        // SAFETY: the block holds `size` bytes.
        unsafe {
            std::ptr::write_bytes(p, 0x5A, size);
            ALLOC.dealloc(p, l);
        }
        assert_eq!(held(&t), base);
        if size > LARGE_MAX && grew > 32 * MIB {
            // More than half the 64 MiB of free memory always kept: unmapped at once (with
            // the older mappings kept before it).
            assert!(
                beancounter::mapped_bytes() <= mapped0,
                "huge ({size}) not unmapped"
            );
        } else if size > LARGE_MAX {
            // Kept mapped for the next huge block it fits (unmapped a second later), which
            // takes it: nothing new is mapped, and the charge is the same.
            assert_eq!(
                beancounter::mapped_bytes(),
                mapped0 + grew,
                "huge ({size}) unmapped"
            );
            // SAFETY: a non-zero size.
            let again = unsafe { ALLOC.alloc(l) };
            assert!(!again.is_null() && again as usize % align == 0);
            assert_eq!(
                beancounter::mapped_bytes(),
                mapped0 + grew,
                "huge ({size}) reused"
            );
            assert_eq!(held(&t), (base.0 + rounded as u64, base.1 + 1));
            // SAFETY: allocated above with `l`.
            unsafe { ALLOC.dealloc(again, l) };
            assert_eq!(held(&t), base);
        }
    }
}

fn snapshot(t: &beancounter::Beancounter) -> (ResourceStat, ResourceStat) {
    (t.stat(Resource::Memory), t.stat(Resource::Allocations))
}

fn assert_null_no_charge(t: &beancounter::Beancounter, layout: Layout) {
    let before = held(t);
    let _g = t.enter();
    // SAFETY: a non-zero size.
    let (p, z) = unsafe { (ALLOC.alloc(layout), ALLOC.alloc_zeroed(layout)) };
    drop(_g);
    assert!(p.is_null() && z.is_null(), "{layout:?} was served");
    assert_eq!(held(t), before, "{layout:?} left a charge");
}

/// Alignments above 2 MiB cannot be served: null, nothing charged, not even a refusal.
fn too_aligned() {
    let t = tenant(6);
    let before = snapshot(&t);
    for align in [4 * MIB, 8 * MIB, 1 << 30, 1 << 40] {
        for size in [1, 4096, 3 * MIB, align] {
            assert_null_no_charge(&t, Layout::from_size_align(size, align).unwrap());
        }
    }
    assert_eq!(snapshot(&t), before);
    // The largest alignment served still works.
    let _g = t.enter();
    for size in [1, 3 * MIB] {
        let l = Layout::from_size_align(size, MAX_ALIGN).unwrap();
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(l) };
        assert!(!p.is_null());
        assert_eq!(p as usize % MAX_ALIGN, 0);
        // SAFETY: allocated just above.
        unsafe { ALLOC.dealloc(p, l) };
    }
}

fn impossible_layouts() -> Vec<Layout> {
    let mut v = Vec::new();
    for align in [1usize, 8, 4096, 64 * KIB, MAX_ALIGN] {
        for size in [
            isize::MAX as usize - (align - 1),
            isize::MAX as usize - MAX_ALIGN,
            isize::MAX as usize - 8 * MIB,
            1 << 62,
            (1 << 62) + 12345,
            1 << 48,
        ] {
            v.push(Layout::from_size_align(size, align).unwrap());
        }
    }
    v
}

/// Sizes no machine can map: null, and `held` unchanged for the tenant and its counters.
fn too_big() {
    let t = tenant(7);
    let layouts = impossible_layouts();
    for &l in &layouts {
        assert_null_no_charge(&t, l);
    }
    let s = snapshot(&t);
    assert_eq!((s.0.held, s.1.held), (0, 0));
    // The allocator is still usable by the tenant.
    let _g = t.enter();
    let v = vec![1u8; 100_000];
    assert_eq!(held(&t), (100_000u64.next_multiple_of(4096), 1));
    drop(v);
}

/// A request that can never be served should not show up in the tenant's statistics either:
/// `maxheld` of a fresh tenant stays 0 (DESIGN §7: "null, no charge left behind").
fn too_big_maxheld() {
    let t = tenant(8);
    for &l in &impossible_layouts() {
        assert_null_no_charge(&t, l);
        let s = snapshot(&t);
        assert_eq!(
            (s.0.maxheld, s.1.maxheld),
            (0, 0),
            "{l:?} refused, but Memory/Allocations maxheld now say it was held"
        );
    }
}

/// `realloc` to a size that cannot be served returns null and leaves the old block alone:
/// still valid, still charged to its owner.
fn realloc_too_big() {
    let t = tenant(9);
    let _g = t.enter();
    let base = held(&t);
    for &(size, align) in &[(100usize, 8usize), (50 * KIB, 4096), (5 * MIB, 64 * KIB)] {
        let l = Layout::from_size_align(size, align).unwrap();
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(l) };
        assert!(!p.is_null());
        // SAFETY: `size` bytes.
        unsafe { fill(p, size, 11) };
        let charged = held(&t);
        for to in [isize::MAX as usize - (align - 1), 1 << 62] {
            // SAFETY: `p` is live with layout `l`; `to` rounded up to `align` fits isize.
            let q = unsafe { ALLOC.realloc(p, l, to) };
            assert!(q.is_null(), "realloc({size}) to {to} was served");
            assert_eq!(
                held(&t),
                charged,
                "realloc({size}) to {to} changed the charge"
            );
            // SAFETY: still live after a failed realloc.
            assert_eq!(unsafe { verify(p, size, 11) }, Ok(()));
        }
        // SAFETY: still live with layout `l`.
        unsafe { ALLOC.dealloc(p, l) };
        assert_eq!(held(&t), base);
    }
}

/// A thread that allocates 100+ MiB in blocks of every route and frees them all leaves
/// mapped bytes close to where they were: at most the one cached empty segment and the
/// segments the exited thread's heap metadata pins, and RSS within the purge threshold.
fn mapped_bytes_return() {
    let (rss0, _) = common::statm();
    let mapped0 = beancounter::mapped_bytes();
    let peak = std::thread::spawn(|| {
        let mut rng = Rng::new(99);
        let mut live: Vec<(*mut u8, Layout)> = Vec::with_capacity(300_000);
        let mut peak = 0;
        for round in 0..3 {
            for _ in 0..100_000 {
                let size = match rng.below(1000) {
                    0..=989 => 1 + rng.below(2048) as usize,
                    990..=998 => 32 * KIB + 1 + rng.below(512 * KIB as u64) as usize,
                    _ => LARGE_MAX + rng.below(4 * MIB as u64) as usize,
                };
                let l = Layout::from_size_align(size, 8).unwrap();
                // SAFETY: a non-zero size.
                let p = unsafe { ALLOC.alloc(l) };
                assert!(!p.is_null());
                // SAFETY: `size` bytes.
                unsafe { p.write(round as u8) };
                live.push((p, l));
            }
            peak = peak.max(beancounter::mapped_bytes());
            // Free in a scattered order so runs must coalesce.
            for i in 0..live.len() {
                let j = i + rng.below((live.len() - i) as u64) as usize;
                live.swap(i, j);
            }
            for (p, l) in live.drain(..) {
                // SAFETY: allocated above with `l`.
                unsafe { ALLOC.dealloc(p, l) };
            }
        }
        peak
    })
    .join()
    .unwrap();
    let kept = beancounter::mapped_bytes();
    // Free pages stay resident for about a second, within the larger of 64 MiB and half
    // of the recent peak; after that the next slow path (a large block here) gives them back.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let l = Layout::from_size_align(64 * KIB, 8).unwrap();
    // SAFETY: a non-zero size; freed at once with the same layout.
    unsafe { ALLOC.dealloc(ALLOC.alloc(l), l) };
    let mapped = beancounter::mapped_bytes();
    let (rss, _) = common::statm();
    println!(
        "    mapped {} MiB -> peak {} MiB -> {} MiB just freed -> {} MiB a second later; \
         rss {} MiB -> {} MiB",
        mapped0 >> 20,
        peak >> 20,
        kept >> 20,
        mapped >> 20,
        rss0 >> 20,
        rss >> 20
    );
    assert!(peak >= mapped0 + 64 * MIB, "the workload did not map much");
    assert!(
        kept <= mapped0 + peak / 2 + 8 * MIB,
        "mapped bytes {kept} just after freeing everything, {mapped0} before, peak {peak}"
    );
    assert!(
        mapped <= mapped0 + 8 * MIB,
        "mapped bytes {mapped} a second after freeing everything, {mapped0} before"
    );
    assert!(
        rss <= rss0 + 24 * MIB,
        "rss {rss} a second after freeing everything, {rss0} before"
    );
}
