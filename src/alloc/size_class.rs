//! Size ↔ class tables for slab objects.
//!
//! Classes: every 8 bytes up to 64, every 16 up to 128, then four classes per doubling
//! (the spacing jemalloc uses) up to [`SMALL_MAX`] = 32 KiB: 44 classes. The 8-byte steps
//! below 64 are where most of a program's objects are (short strings, small `Vec`s and
//! boxes): a 24-byte string in a 32-byte class would make the heap a third larger and
//! touch a third more cache lines.
//!
//! | sizes | spacing | waste per object |
//! |---|---|---|
//! | 1–64 | 8 | < 8 bytes |
//! | 65–128 | 16 | < 16 bytes |
//! | 129–32 768 | a quarter of the power of two below | < 25 % of the request |
//!
//! Each class has a slab geometry: how many OS pages one slab spans and how many objects it
//! holds. A slab is `[objects][4-byte owner tag per object]`, its metadata in the segment
//! header: no header before objects, and objects start page-aligned. Slabs are sized so that at least eight objects fit (four above 8 KiB) and the
//! tail that fits no object is small; [`CLASSES`] lists them.

use crate::os::PAGE;

/// Largest size served from slabs; larger blocks are page runs.
pub(crate) const SMALL_MAX: usize = 32 * 1024;

/// Number of classes.
pub(crate) const NUM_CLASSES: usize = 44;

/// Bytes of owner tag per object, stored after the objects of a slab.
pub(crate) const TAG_BYTES: usize = 4;

/// One class: object size and slab geometry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Class {
    /// Object size in bytes (what is charged per object).
    pub(crate) size: u32,
    /// Pages per slab.
    pub(crate) pages: u32,
    /// Objects per slab.
    pub(crate) capacity: u32,
    /// `ceil(2^32 / size)`: `offset * magic >> 32 == offset / size` for every offset that
    /// is a multiple of `size` below 2^32 (jemalloc's exact-division trick).
    pub(crate) magic: u64,
}

/// The first class of the four-per-doubling part (sizes above 128).
const FIRST_QUARTER_CLASS: usize = 12;

const fn class_size(c: usize) -> usize {
    if c < 8 {
        (c + 1) * 8
    } else if c < FIRST_QUARTER_CLASS {
        64 + (c - 7) * 16
    } else {
        // Four per doubling above 128.
        let k = (c - FIRST_QUARTER_CLASS) / 4; // doubling number: 128 << k .. 256 << k
        let step = (128 << k) / 4;
        (128 << k) + step * ((c - FIRST_QUARTER_CLASS) % 4 + 1)
    }
}

const fn geometry(size: usize) -> (u32, u32) {
    let min_objects = if size > 8 * 1024 { 4 } else { 8 };
    // At least 16 KiB and `min_objects` objects with their tags.
    let mut base = (min_objects * (size + TAG_BYTES)).div_ceil(PAGE);
    if base < 4 {
        base = 4;
    }
    // Pick the slab length in [base, 2 * base] pages that leaves the least unused tail.
    let mut best_pages = base;
    let mut best_waste = usize::MAX;
    let mut pages = base;
    while pages <= 2 * base {
        let bytes = pages * PAGE;
        let cap = bytes / (size + TAG_BYTES);
        let waste = bytes - cap * (size + TAG_BYTES);
        // Compare waste per byte of slab: waste/bytes < best_waste/best_bytes.
        if best_waste == usize::MAX || waste * best_pages < best_waste * pages {
            best_pages = pages;
            best_waste = waste;
        }
        pages += 1;
    }
    (
        best_pages as u32,
        ((best_pages * PAGE) / (size + TAG_BYTES)) as u32,
    )
}

const fn build() -> [Class; NUM_CLASSES] {
    let mut t = [Class {
        size: 0,
        pages: 0,
        capacity: 0,
        magic: 0,
    }; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        let size = class_size(c);
        let (pages, capacity) = geometry(size);
        t[c] = Class {
            size: size as u32,
            pages,
            capacity,
            magic: (1u64 << 32).div_ceil(size as u64),
        };
        c += 1;
    }
    t
}

/// The class table.
pub(crate) static CLASSES: [Class; NUM_CLASSES] = build();

/// Object size per class, as charged. A `const`, like [`SMALL_LOOKUP`]: the allocation
/// fast path is inlined into the user's crate, where a `const` table is addressed directly
/// and a `static` of this crate through the GOT (one load more per allocation).
const SIZES: [u32; NUM_CLASSES] = {
    let mut t = [0u32; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        t[c] = class_size(c) as u32;
        c += 1;
    }
    t
};

/// Class for sizes up to 1 KiB, indexed by `(size + 7) / 8` (0 for size 0 too).
const SMALL_LOOKUP: [u8; 129] = {
    let mut t = [0u8; 129];
    let mut i = 0;
    let mut c = 0;
    while i < 129 {
        while class_size(c) < i * 8 {
            c += 1;
        }
        t[i] = c as u8;
        i += 1;
    }
    t
};

/// The smallest class whose objects hold `size` bytes, for `size <= SMALL_MAX` (size 0 is
/// served by the first class).
#[inline(always)]
pub(crate) fn class_of(size: usize) -> usize {
    debug_assert!(size <= SMALL_MAX);
    let class = if size <= 1024 {
        SMALL_LOOKUP[(size + 7) >> 3] as usize
    } else {
        // size in (128 << k, 256 << k]: k = floor(log2(size - 1)) - 7.
        let k = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize - 7;
        let step_shift = k + 5; // step = 32 << k
        let quarter = ((size - 1) - (128 << k)) >> step_shift; // 0..=3
        FIRST_QUARTER_CLASS + 4 * k + quarter
    };
    // SAFETY: the lookup table holds classes below NUM_CLASSES (checked by the tests), and
    // for 1024 < size <= SMALL_MAX, k <= 7 and quarter <= 3 give at most 12 + 28 + 3 = 43.
    // Said to the compiler, so that indexing per-class tables with it needs no bounds check
    // on the allocation fast path.
    unsafe { core::hint::assert_unchecked(class < NUM_CLASSES) };
    class
}

/// Bytes an object of `class` occupies (what it is charged).
#[inline(always)]
pub(crate) fn size_of(class: usize) -> u64 {
    SIZES[class] as u64
}

/// The class for a request of `size` bytes aligned to `align`, if a slab can serve it:
/// slab objects sit at multiples of their size from a page-aligned base, so an object is
/// aligned to `align <= PAGE` when its size is a multiple of `align` (every class is a
/// multiple of 8; those from 128 up of 16).
#[inline]
pub(crate) fn class_for(size: usize, align: usize) -> Option<usize> {
    if align <= 8 {
        return (size <= SMALL_MAX).then(|| class_of(size));
    }
    if align > PAGE {
        return None;
    }
    let size = size.max(align).next_multiple_of(align);
    if size > SMALL_MAX {
        return None;
    }
    let mut c = class_of(size);
    while CLASSES[c].size as usize % align != 0 {
        c += 1;
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_increasing_and_ends_at_small_max() {
        for c in 1..NUM_CLASSES {
            assert!(CLASSES[c].size > CLASSES[c - 1].size);
        }
        assert_eq!(CLASSES[NUM_CLASSES - 1].size as usize, SMALL_MAX);
    }

    #[test]
    fn every_size_gets_the_smallest_class_that_fits_within_the_bound() {
        assert_eq!(class_of(0), 0, "size 0 takes the first class");
        for size in 1..=SMALL_MAX {
            let c = class_of(size);
            let cs = CLASSES[c].size as usize;
            assert_eq!(size_of(c), cs as u64);
            assert!(cs >= size, "size {size} class {cs}");
            assert!(
                c == 0 || (CLASSES[c - 1].size as usize) < size,
                "size {size} not smallest"
            );
            let waste = cs - size;
            if size <= 64 {
                assert!(waste < 8, "size {size}");
            } else if size <= 128 {
                assert!(waste < 16, "size {size}");
            } else {
                assert!(waste * 4 < size, "size {size} wastes {waste}");
            }
        }
    }

    #[test]
    fn slabs_hold_enough_objects_and_tags() {
        for (c, k) in CLASSES.iter().enumerate() {
            let bytes = k.pages as usize * PAGE;
            assert!(k.capacity >= 4, "class {c}");
            assert!(k.capacity as usize * (k.size as usize + TAG_BYTES) <= bytes);
            // Tail waste at most an eighth of the slab.
            let waste = bytes - k.capacity as usize * (k.size as usize + TAG_BYTES);
            assert!(
                waste * 8 <= bytes,
                "class {c} ({} B) wastes {waste} of {bytes}",
                k.size
            );
            for i in [0, 1, k.capacity as usize - 1] {
                let off = (i * k.size as usize) as u64;
                assert_eq!(((off * k.magic) >> 32) as usize, i);
            }
        }
    }

    #[test]
    fn aligned_classes_are_multiples_of_the_alignment() {
        for align in [16, 32, 64, 128, 256, 512, 1024, 2048, 4096] {
            for size in [1, align - 1, align, align + 1, 3 * align, SMALL_MAX / 2] {
                if let Some(c) = class_for(size, align) {
                    assert_eq!(CLASSES[c].size as usize % align, 0);
                    assert!(CLASSES[c].size as usize >= size);
                }
            }
        }
        assert_eq!(
            class_for(8, 16),
            Some(1),
            "8 bytes at 16 needs the 16-byte class"
        );
        assert_eq!(
            class_for(24, 16).map(|c| CLASSES[c].size),
            Some(32),
            "24 bytes at 16 skips the 24-byte class"
        );
        assert_eq!(class_for(1, 8192), None);
    }
}
