//! Drives one allocator workload in a loop, for profilers (`perf record`, `valgrind
//! --tool=callgrind`): `cargo run --release --example profile_loop -- <bean|mimalloc> <lifo|random> [rounds]`.

use std::alloc::{GlobalAlloc, Layout};

static BEAN: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
static MI: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let a: &dyn GlobalAlloc = if args.get(1).map(String::as_str) == Some("mimalloc") {
        &MI
    } else {
        &BEAN
    };
    let random = args.get(2).map(String::as_str) == Some("random");
    let rounds: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(2000);
    let tenant = beancounter::find_or_create(beancounter::BcId(1)).unwrap();
    let _g = tenant.enter();
    let mut slots = vec![(std::ptr::null_mut::<u8>(), Layout::new::<u8>()); 1000];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..rounds {
        for i in 0..1000 {
            let (slot, size) = if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 16) as usize % 1000, 8 + x as usize % 2041)
            } else {
                (i, 16 + (i * 48) % 1009)
            };
            let s = &mut slots[slot];
            if s.0.is_null() {
                let l = Layout::from_size_align(size, 8).unwrap();
                // SAFETY: non-zero size.
                let p = unsafe { a.alloc(l) };
                // SAFETY: a fresh block of at least 8 bytes.
                unsafe { p.write(1) };
                *s = (p, l);
            } else if random {
                // SAFETY: allocated above with `s.1`.
                unsafe { a.dealloc(s.0, s.1) };
                s.0 = std::ptr::null_mut();
            }
        }
        if !random {
            for s in slots.iter_mut().rev() {
                // SAFETY: allocated above with `s.1`.
                unsafe { a.dealloc(s.0, s.1) };
                s.0 = std::ptr::null_mut();
            }
        }
    }
}
