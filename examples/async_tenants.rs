//! Tenants' futures on one tokio multi-thread runtime: each future is charged to its tenant
//! whichever worker polls it, and a guarded tenant that grows past its barrier has its
//! futures stopped with `Err(Exceeded)` while the other tenants' futures complete.
//!
//! ```sh
//! cargo run --release --example async_tenants
//! ```
//!
//! - `reports` runs unguarded tasks (`FutureExt::in_beancounter`): word counts that hop
//!   between the workers at every `yield_now`, charged to `reports` throughout.
//! - `search` runs guarded tasks (`FutureExt::guarded`) that stay under their barrier: they
//!   end with `Ok`.
//! - `scraper` runs guarded tasks that cache pages without end. Its ordinary allocations
//!   are checked against the limit, set far above the barrier (so they are never refused
//!   and nothing aborts); crossing the barrier flags the tenant, and each of its futures
//!   resolves to `Err(Exceeded)` at its next poll, dropping its cache.
//!
//! It prints each tenant's outcome and the `/proc/user_beancounters` table
//! (`report::user_beancounters()`), then asserts the outcome. `cargo test` runs it too.

use beancounter::{report, BcId, BeanAlloc, Beancounter, Exceeded, FutureExt, Limits, Resource};
use std::collections::{BTreeMap, HashSet};
use std::thread::ThreadId;
use std::time::Duration;

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const REPORTS: BcId = BcId(21);
const SEARCH: BcId = BcId(22);
const SCRAPER: BcId = BcId(23);

/// Every tenant's barrier; limits are 32 times higher.
const BARRIER: u64 = 4 << 20;
/// The pages the scraper caches, and how many it would like: 8 MiB per task, twice the
/// barrier (and three tasks together still well under the limit).
const PAGE: usize = 64 << 10;
const PAGES_WANTED: usize = 128;

/// Counts the words of `docs` generated documents, yielding to the runtime after each, and
/// notes every worker thread it resumed on (checking it still runs as `tenant`).
async fn word_count(tenant: BcId, docs: u32) -> (u64, HashSet<ThreadId>) {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut threads = HashSet::new();
    for d in 0..docs {
        let doc: Vec<String> = (0..200).map(|w| format!("w{}", (w * 7 + d) % 97)).collect();
        for word in doc {
            *counts.entry(word).or_default() += 1;
        }
        tokio::task::yield_now().await;
        assert_eq!(
            beancounter::current_id(),
            tenant,
            "a poll outside the tenant"
        );
        threads.insert(std::thread::current().id());
    }
    (counts.values().sum(), threads)
}

/// Answers `queries` small queries, each after a millisecond's wait.
async fn search(queries: usize) -> usize {
    let mut answers: Vec<String> = Vec::new();
    for q in 0..queries {
        tokio::time::sleep(Duration::from_millis(1)).await;
        answers.push(format!("result {q}: {}", "x".repeat(256)));
    }
    answers.len()
}

/// Caches up to `PAGES_WANTED` pages of 64 KiB, one per millisecond.
async fn scrape() -> usize {
    let mut cache: Vec<Vec<u8>> = Vec::new();
    while cache.len() < PAGES_WANTED {
        cache.push(vec![cache.len() as u8; PAGE]);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cache.len()
}

fn tenant(id: BcId) -> Beancounter {
    let t = beancounter::find_or_create(id).expect("a tenant");
    let limits = Limits::new(BARRIER, 32 * BARRIER).expect("barrier <= limit");
    t.set_limits(Resource::Memory, limits).expect("limits");
    t
}

/// What each tenant's futures returned.
struct Outcome {
    reports: Vec<(u64, HashSet<ThreadId>)>,
    search: Vec<Result<usize, Exceeded>>,
    scraper: Vec<Result<usize, Exceeded>>,
}

/// Runs every tenant's futures on a two-worker runtime, and shuts the runtime down.
fn run_tenants(reports: &Beancounter, search_bc: &Beancounter, scraper: &Beancounter) -> Outcome {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let outcome = rt.block_on(async {
        let r: Vec<_> = (0..4)
            .map(|_| tokio::spawn(word_count(REPORTS, 50).in_beancounter(reports)))
            .collect();
        let s: Vec<_> = (0..4)
            .map(|_| tokio::spawn(search(20).guarded(search_bc)))
            .collect();
        let x: Vec<_> = (0..3)
            .map(|_| tokio::spawn(scrape().guarded(scraper)))
            .collect();
        let mut outcome = Outcome {
            reports: Vec::new(),
            search: Vec::new(),
            scraper: Vec::new(),
        };
        for h in r {
            outcome.reports.push(h.await.expect("a reports task"));
        }
        for h in s {
            outcome.search.push(h.await.expect("a search task"));
        }
        for h in x {
            outcome.scraper.push(h.await.expect("a scraper task"));
        }
        outcome
    });
    // The workers exit: their stocks go back to the tenants.
    drop(rt);
    outcome
}

fn run() {
    let (reports, search_bc, scraper) = (tenant(REPORTS), tenant(SEARCH), tenant(SCRAPER));
    let outcome = run_tenants(&reports, &search_bc, &scraper);

    let words: u64 = outcome.reports.iter().map(|r| r.0).sum();
    let threads: HashSet<ThreadId> = outcome.reports.iter().flat_map(|r| r.1.clone()).collect();
    let tasks = outcome.reports.len();
    // The sets the tasks returned were allocated by them, so they stay charged to `reports`
    // until freed, wherever that happens.
    drop(outcome.reports);
    println!(
        "reports  in_beancounter  {} tasks: {words} words counted, resumed on {} worker threads",
        tasks,
        threads.len()
    );
    let served: Vec<String> = outcome.search.iter().map(|r| format!("{r:?}")).collect();
    println!(
        "search   guarded         {} tasks: {}",
        outcome.search.len(),
        served.join(", ")
    );
    for r in &outcome.scraper {
        match r {
            Ok(pages) => println!("scraper  guarded         cached {pages} pages"),
            Err(e) => println!("scraper  guarded         stopped: {e}"),
        }
    }
    let crossings = scraper.events(Resource::Memory).barrier_crossings;
    println!("scraper barrier crossings: {crossings}");
    println!();
    print!("{}", report::user_beancounters());

    assert_eq!(words, 4 * 50 * 200, "every reports task counted every word");
    assert!(threads.len() >= 2, "reports tasks resumed on both workers");
    assert!(
        outcome.search.iter().all(|r| *r == Ok(20)),
        "search tasks finish"
    );
    for r in &outcome.scraper {
        let e = r.expect_err("every scraper task is stopped at the barrier");
        assert_eq!(
            (e.id, e.resource, e.bound),
            (SCRAPER, Resource::Memory, BARRIER)
        );
        assert!(e.held > BARRIER && e.held < (PAGES_WANTED * PAGE) as u64);
    }
    assert!(crossings >= 1, "the scraper crossed its barrier");
    for (bc, name) in [
        (&reports, "reports"),
        (&search_bc, "search"),
        (&scraper, "scraper"),
    ] {
        let s = bc.stat(Resource::Memory);
        // Ordinary allocations are checked against the limit: the barrier refuses nothing.
        assert_eq!(s.failcnt, 0, "{name}: no allocation was refused");
        assert_eq!(
            s.held, 0,
            "{name}: every future's memory was freed and uncharged"
        );
        assert_eq!(
            bc.stat(Resource::Allocations).held,
            0,
            "{name}: no object left"
        );
    }
    // The work was charged to its tenants, not to the host.
    let at_least = |bc: &Beancounter, bytes: u64| bc.stat(Resource::Memory).maxheld >= bytes;
    assert!(at_least(&scraper, BARRIER) && at_least(&search_bc, 20 * 256));
    assert!(at_least(&reports, 4 * 97 * 16));
    assert_eq!(beancounter::current_id(), BcId::ROOT);
    println!("\nok: scraper stopped at its barrier, reports and search completed");
}

fn main() {
    run();
}

#[cfg(test)]
mod tests {
    #[test]
    fn scraper_stopped_others_complete() {
        super::run();
    }
}
