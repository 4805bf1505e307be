//! `beancounter::report`: snapshots agree with `stat()` and `events()`, the
//! `/proc/user_beancounters` table keeps its fixed columns, the Prometheus text parses, and
//! the event watcher sees crossings and refusals, waking a sleeping host thread.
//!
//! Tests run in parallel in one process, so each uses its own ids and looks only at them.

use beancounter::report::{self, BcSnapshot, EventWatcher};
use beancounter::{BcId, Beancounter, Limits, Resource, Severity};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: beancounter::BeanAlloc = beancounter::BeanAlloc::new();

fn tenant(id: u32) -> Beancounter {
    beancounter::find_or_create(BcId(id)).unwrap()
}

fn find(snap: &[BcSnapshot], id: u32) -> &BcSnapshot {
    snap.iter()
        .find(|b| b.id == BcId(id))
        .unwrap_or_else(|| panic!("beancounter {id} missing from the snapshot"))
}

#[test]
fn snapshot_agrees_with_stat_and_events() {
    let files = beancounter::register_resource("report_files").unwrap();
    let parent = tenant(9100);
    let child = parent.new_child(BcId(9101)).unwrap();
    child.set_limits(files, Limits::new(2, 3).unwrap()).unwrap();
    let held = child.charge(files, 3, Severity::Limit).unwrap();
    assert!(child.charge(files, 1, Severity::Limit).is_err());
    let mem = {
        let _g = child.enter();
        vec![7u8; 10_000]
    };

    let snap = report::snapshot();
    assert_eq!(snap[0].id, BcId::ROOT);
    assert_eq!(snap[0].parent, None);
    let ids: Vec<BcId> = snap.iter().map(|b| b.id).collect();
    let mut dedup = ids.clone();
    dedup.sort_by_key(|id| id.0);
    dedup.dedup();
    assert_eq!(dedup.len(), ids.len(), "an id appears twice");

    let c = find(&snap, 9101);
    assert_eq!(c.parent, Some(BcId(9100)));
    assert_eq!(find(&snap, 9100).parent, None);
    // Every counted resource is listed, built-ins first.
    assert_eq!(
        &c.resources[..3]
            .iter()
            .map(|r| r.resource)
            .collect::<Vec<_>>(),
        &[Resource::Memory, Resource::Allocations, Resource::Threads]
    );
    let f = c.resource(files).unwrap();
    assert_eq!(f.stat, child.stat(files));
    assert_eq!(f.events, child.events(files));
    assert_eq!((f.stat.held, f.stat.failcnt), (3, 1));
    assert_eq!(f.events.barrier_crossings, 1);
    assert_eq!(f.events.refused_at_limit, 1);
    // Memory: the vector is charged to the child and to its parent.
    let m = c.resource(Resource::Memory).unwrap();
    assert!(m.stat.held >= 10_000, "child memory {:?}", m.stat);
    assert!(
        find(&snap, 9100)
            .resource(Resource::Memory)
            .unwrap()
            .stat
            .held
            >= 10_000
    );
    drop(mem);
    drop(held);
}

#[test]
fn dropped_beancounters_leave_the_snapshot() {
    let t = tenant(9110);
    assert!(report::snapshot().iter().any(|b| b.id == BcId(9110)));
    drop(t);
    // Snapshots taken by other tests at the same moment hold a reference for a while; once
    // they are done, nothing (our own snapshot's references included) keeps it alive.
    let start = Instant::now();
    while report::snapshot().iter().any(|b| b.id == BcId(9110)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a snapshot kept the beancounter alive"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(beancounter::lookup(BcId(9110)).is_none());
}

/// Splits a `/proc/user_beancounters` line at its fixed columns.
fn columns(line: &str) -> (&str, &str, Vec<u64>) {
    assert!(line.len() >= 12 + 12 + 5 * 21, "short line {line:?}");
    let uid = &line[..12];
    let name = line[12..24].trim_end();
    let nums = (0..5)
        .map(|i| {
            let col = &line[24 + i * 21..24 + (i + 1) * 21];
            assert!(col.starts_with(' '), "column {i} not separated in {line:?}");
            col.trim().parse().unwrap()
        })
        .collect();
    (uid, name, nums)
}

#[test]
fn user_beancounters_has_the_proc_layout() {
    let t = tenant(9120);
    t.set_limits(Resource::Threads, Limits::new(4, 6).unwrap())
        .unwrap();
    let c = t.charge(Resource::Threads, 5, Severity::Limit).unwrap();
    assert!(t.charge(Resource::Threads, 2, Severity::Limit).is_err());

    let table = report::user_beancounters();
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("Version: 2.5"));
    assert_eq!(
        lines.next(),
        Some(
            "       uid  resource                     held              maxheld              barrier                limit              failcnt"
        )
    );
    let mut rows: HashMap<u32, Vec<(String, Vec<u64>)>> = HashMap::new();
    let mut current = None;
    for line in lines {
        let (uid, name, nums) = columns(line);
        if uid.trim().is_empty() {
            assert!(
                current.is_some(),
                "a continuation line comes first: {line:?}"
            );
        } else {
            assert!(uid.ends_with(": "), "uid column {uid:?}");
            let id: u32 = uid[..10].trim().parse().unwrap();
            assert!(!rows.contains_key(&id), "beancounter {id} listed twice");
            current = Some(id);
        }
        rows.entry(current.unwrap())
            .or_default()
            .push((name.to_string(), nums));
    }
    // The root first, unlimited as MAX.
    assert!(table
        .lines()
        .nth(2)
        .unwrap()
        .starts_with("         0: memory"));
    assert_eq!(rows[&0][0].1[3], beancounter::MAX);
    let mine = &rows[&9120];
    assert_eq!(mine[0].0, "memory");
    let threads = mine.iter().find(|(n, _)| n == "threads").unwrap();
    assert_eq!(threads.1, vec![5, 5, 4, 6, 1]);
    drop(c);
}

/// Parses one sample line `name{k="v",...} value`.
fn sample(line: &str) -> (&str, HashMap<&str, &str>, u64) {
    let (head, value) = line.rsplit_once(' ').unwrap();
    let (name, labels) = head.split_once('{').unwrap();
    let labels = labels.strip_suffix('}').unwrap();
    let labels = labels
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k, v.strip_prefix('"').unwrap().strip_suffix('"').unwrap())
        })
        .collect();
    (name, labels, value.parse().unwrap())
}

#[test]
fn prometheus_text_parses_and_counts() {
    let t = tenant(9130);
    let child = t.new_child(BcId(9131)).unwrap();
    child
        .set_limits(Resource::Threads, Limits::new(1, 1).unwrap())
        .unwrap();
    assert!(child
        .charge(Resource::Threads, 2, Severity::Barrier)
        .is_err());
    assert!(child.charge(Resource::Threads, 2, Severity::Limit).is_err());

    let text = report::prometheus();
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut values = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split_once(' ').unwrap().0.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(kind == "gauge" || kind == "counter", "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            typed.insert(name.to_string(), kind.to_string());
        } else {
            let (name, labels, value) = sample(line);
            assert!(typed.contains_key(name), "sample before its TYPE: {line}");
            assert!(helped.contains(name), "sample before its HELP: {line}");
            assert!(labels.contains_key("id") && labels.contains_key("resource"));
            if name == "beancounter_held" && labels["id"] == "9131" {
                assert_eq!(labels.get("parent"), Some(&"9130"));
            }
            values.insert(
                (
                    name.to_string(),
                    labels["id"].to_string(),
                    labels["resource"].to_string(),
                ),
                value,
            );
        }
    }
    assert_eq!(typed.len(), 11);
    let get = |name: &str| values[&(name.to_string(), "9131".to_string(), "threads".to_string())];
    assert_eq!(get("beancounter_failcnt_total"), 2);
    assert_eq!(get("beancounter_refused_at_barrier_total"), 1);
    assert_eq!(get("beancounter_refused_at_limit_total"), 1);
    assert_eq!(get("beancounter_barrier"), 1);
    assert_eq!(get("beancounter_held"), 0);
}

#[test]
fn watcher_polls_and_wakes() {
    let t = tenant(9140);
    t.set_limits(Resource::Threads, Limits::new(1, 2).unwrap())
        .unwrap();
    let mut w = EventWatcher::new();
    // Events of other tenants (other tests) may show up; nothing for this one yet.
    assert!(w.poll().iter().all(|e| e.id != BcId(9140)));

    let c = t.charge(Resource::Threads, 2, Severity::Limit).unwrap();
    assert!(t.charge(Resource::Threads, 1, Severity::Limit).is_err());
    let seen: Vec<_> = w
        .poll()
        .into_iter()
        .filter(|e| e.id == BcId(9140))
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].resource, Resource::Threads);
    assert_eq!(seen[0].delta.barrier_crossings, 1);
    assert_eq!(seen[0].delta.refused_at_limit, 1);
    assert_eq!(seen[0].stat.held, 2);
    // Reported once.
    assert!(w.poll().iter().all(|e| e.id != BcId(9140)));
    drop(c);

    // A sleeping watcher wakes on another thread's event, long before its timeout.
    let t2 = t.clone();
    let start = Instant::now();
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        t2.charge(Resource::Threads, 2, Severity::Limit).unwrap()
    });
    let mut found = false;
    while !found && start.elapsed() < Duration::from_secs(60) {
        found = w
            .wait(Duration::from_secs(60))
            .iter()
            .any(|e| e.id == BcId(9140) && e.delta.barrier_crossings == 1);
    }
    assert!(found);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the watcher slept through the event"
    );
    drop(h.join().unwrap());
}

#[test]
fn watcher_wait_times_out_empty_handed_for_quiet_tenants() {
    let t = tenant(9150);
    let mut w = EventWatcher::new();
    let start = Instant::now();
    let events = w.wait(Duration::from_millis(100));
    assert!(events.iter().all(|e| e.id != BcId(9150)));
    assert!(start.elapsed() < Duration::from_secs(30));
    drop(t);
}

#[test]
fn snapshots_while_other_threads_allocate() {
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(std::sync::Barrier::new(3));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let (stop, running) = (stop.clone(), running.clone());
            let t = tenant(9160 + i);
            std::thread::spawn(move || {
                let _g = t.enter();
                let mut n = 0u64;
                loop {
                    let v: Vec<u64> = (0..(n % 500)).collect();
                    n += v.len() as u64 + 1;
                    // Tenants come and go while snapshots walk the table.
                    let _short = tenant(9170 + (n % 8) as u32);
                    if n == 1 {
                        // Snapshots start once every worker is under way.
                        running.wait();
                    }
                    if stop.load(Ordering::Relaxed) {
                        break n;
                    }
                }
            })
        })
        .collect();
    running.wait();
    for _ in 0..200 {
        let snap = report::snapshot();
        assert_eq!(snap[0].id, BcId::ROOT);
        for bc in &snap {
            for r in &bc.resources {
                assert!(r.stat.barrier <= r.stat.limit, "{bc:?}");
            }
        }
        let _ = report::user_beancounters();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        assert!(w.join().unwrap() > 0);
    }
    beancounter::reap();
    assert!(beancounter::check_invariants().is_ok());
}
