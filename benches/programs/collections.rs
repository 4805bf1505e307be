//! Collection workloads: an ordered map of strings, a hash map under churn, and a parallel
//! sort on rayon.

use crate::child::{enter_first, measure, mix, push_word, Iteration, Measured, Mode, Rng};
use beancounter::BcId;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::time::Instant;

/// Writes the key of index `k` into `out`: 4..=47 characters, the same every time.
fn key(out: &mut String, k: u64) {
    out.clear();
    let h = mix(k);
    push_word(out, h >> 8, 4 + (h % 44) as usize);
}

/// `BTreeMap<String, String>`: random inserts (replacing values), removes and lookups over
/// a key space of 200 000 keys (600 000 operations: half of them inserts, a quarter removes);
/// then dropped.
pub fn btree_strings(mode: &Mode) -> Measured {
    let keys = mode.size(200_000) as u64;
    let ops = mode.size(600_000);
    let tenants = mode.make_tenants(1, 1);
    let _in_tenant = enter_first(&tenants);
    measure(&tenants, |_| {
        let t0 = Instant::now();
        let mut rng = Rng::new(0x5EED_0003);
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        let mut buf = String::new();
        let (mut found, mut removed) = (0usize, 0usize);
        for _ in 0..ops {
            let r = rng.next();
            key(&mut buf, (r >> 8) % keys);
            match r % 8 {
                0..=3 => {
                    let mut value = String::new();
                    push_word(&mut value, rng.next(), rng.range(8, 120));
                    map.insert(buf.clone(), value);
                }
                4 | 5 => removed += usize::from(map.remove(buf.as_str()).is_some()),
                _ => found += map.get(buf.as_str()).map_or(0, String::len),
            }
        }
        black_box((map.len(), found, removed));
        drop(map);
        Iteration::program(t0.elapsed())
    })
}

/// `HashMap<String, Vec<u8>>`: each step toggles a random key of 600 000 (removes it if
/// present, else inserts it with 8..=256 written bytes), so the map holds ~300 000 entries
/// and frees land at random across the whole heap; then dropped.
pub fn hashmap_churn(mode: &Mode) -> Measured {
    let keys = mode.size(600_000) as u64;
    let steps = mode.size(1_200_000);
    let tenants = mode.make_tenants(1, 1);
    let _in_tenant = enter_first(&tenants);
    measure(&tenants, |_| {
        let t0 = Instant::now();
        let mut rng = Rng::new(0x5EED_0004);
        let mut map: HashMap<String, Vec<u8>> = HashMap::new();
        let mut buf = String::new();
        let mut freed = 0usize;
        // Fill to about the steady size first, then churn.
        for step in 0..keys as usize / 2 + steps {
            let r = rng.next();
            let k = (r >> 8) % keys;
            buf.clear();
            // Short keys: "u" + 3..=18 characters.
            buf.push('u');
            push_word(&mut buf, mix(k), 3 + (k % 16) as usize);
            match map.remove(buf.as_str()) {
                Some(v) if step >= keys as usize / 2 => freed += v.len(),
                Some(_) => {}
                None => {
                    let n = rng.range(8, 256);
                    let mut v = Vec::with_capacity(n);
                    v.resize(n, r as u8);
                    map.insert(buf.clone(), v);
                }
            }
        }
        black_box((map.len(), freed));
        drop(map);
        Iteration::program(t0.elapsed())
    })
}

/// One record of the sort: a hex prefix that orders it, and a word.
fn record(i: u64) -> String {
    let h = mix(i);
    let mut s = format!("{:012x}:{i}:", h >> 16);
    push_word(&mut s, h, 8 + (h % 40) as usize);
    s
}

/// rayon on a pool of 2 threads (each in a tenant of its own): builds 700 000 strings with
/// `par_iter().map().collect()`, `par_sort`s them, maps them to new strings in parallel,
/// and drops both vectors on the main thread (frees of the pool threads' blocks).
pub fn parallel_sort(mode: &Mode) -> Measured {
    let n = mode.size(700_000) as u64;
    // Tenant 1 for the main thread, 2 and 3 for the pool's threads.
    let tenants = mode.make_tenants(1, 3);
    let _in_tenant = enter_first(&tenants);
    let in_tenants = mode.tenants();
    // The pool lives for the whole child: threads that exit leave blocks in
    // crossbeam-epoch's deferred garbage, which would show up in the accounting check.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .start_handler(move |i| {
            if in_tenants {
                let bc = beancounter::find_or_create(BcId(2 + i as u32)).expect("a tenant");
                bc.adopt();
            }
        })
        .build()
        .expect("build the pool");
    measure(&tenants, |_| {
        let t0 = Instant::now();
        let mut records: Vec<String> =
            pool.install(|| (0..n).into_par_iter().map(record).collect());
        pool.install(|| records.par_sort());
        let upper: Vec<String> = pool.install(|| {
            records
                .par_iter()
                .map(|r| {
                    let (prefix, rest) = r.split_at(13);
                    let mut s = String::with_capacity(r.len() + 4);
                    s.push_str(&rest.to_ascii_uppercase());
                    s.push('@');
                    s.push_str(prefix);
                    s
                })
                .collect()
        });
        assert!(records.windows(2).all(|w| w[0] <= w[1]));
        black_box((&records, &upper));
        drop(records);
        drop(upper);
        Iteration::program(t0.elapsed())
    })
}
