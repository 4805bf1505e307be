//! Fragmentation: a heap with holes, then blocks that do not fit them, then nothing; how
//! much of it the allocator keeps at the peak and gives back to the OS a second later.

use crate::child::{enter_first, measure, resident_bytes, Iteration, Measured, Mode, Phase, Rng};
use std::hint::black_box;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// A block of `n` bytes, every byte written (so every page is resident).
fn block(n: usize, byte: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, byte);
    v
}

/// A size from 16 B to 64 KiB, uniform in its logarithm; one time in a thousand a large
/// block of 1..=4 MiB instead (about a quarter of the bytes).
fn size(rng: &mut Rng) -> usize {
    if rng.below(1000) == 0 {
        return rng.range(MIB, 4 * MIB);
    }
    let bits = rng.range(4, 15); // 16 B..32 KiB, then up to twice that
    (1 << bits) + rng.below(1 << bits) as usize
}

/// Allocates ~200 MiB in mixed sizes, frees every other block, allocates again in sizes 1.5
/// to 3 times those freed (which the holes cannot hold), then frees everything. In the timed
/// run the child then sleeps one second, doing nothing else, and reads its resident set.
pub fn fragmentation(mode: &Mode) -> Measured {
    let total = mode.size(200 * MIB);
    let tenants = mode.make_tenants(1, 1);
    let _in_tenant = enter_first(&tenants);
    measure(&tenants, |phase| {
        let t0 = Instant::now();
        let mut rng = Rng::new(0x5EED_0006);
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0;
        while bytes < total {
            let n = size(&mut rng);
            blocks.push(block(n, blocks.len() as u8));
            bytes += n;
        }
        let mut freed = Vec::with_capacity(blocks.len() / 2 + 1);
        for b in blocks.iter_mut().skip(1).step_by(2) {
            freed.push(b.len());
            *b = Vec::new();
        }
        for (b, old) in blocks.iter_mut().skip(1).step_by(2).zip(&freed) {
            *b = block(
                old + old / 2 + rng.below(*old as u64 * 3 / 2 + 1) as usize,
                7,
            );
        }
        black_box(
            blocks
                .iter()
                .map(|b| b[b.len() / 2] as usize)
                .sum::<usize>(),
        );
        drop(freed);
        drop(blocks);
        let wall = t0.elapsed();
        let rss_after_1s = (phase == Phase::Timed).then(|| {
            std::thread::sleep(Duration::from_secs(1));
            resident_bytes()
        });
        Iteration {
            wall,
            units: 1,
            rss_after_1s,
        }
    })
}
