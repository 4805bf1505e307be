//! Reports for operators: a snapshot of every live beancounter, the
//! `/proc/user_beancounters` table, the Prometheus text format, and a way to wait for
//! events (a tenant crossing its barrier, a refused charge) from a host thread.
//!
//! Everything here runs in the calling (host) thread and allocates there; allocation in
//! other threads goes on while a snapshot is taken (the registry lock is held only to take
//! references on the live beancounters, and never by the allocation path). A snapshot is
//! not atomic across beancounters: each counter is read once, as it is at that moment, and
//! `held` is true usage (stocked bytes excluded), exact at quiescence.
//!
//! No user code ever runs inside the allocator to deliver events: the accounting stack
//! only bumps a counter (and wakes sleepers with one futex call while someone waits), and
//! [`EventWatcher`] compares event counts in the host thread.
//!
//! # Examples
//! ```
//! use beancounter::{report, BcId, Limits, Resource, Severity};
//! let t = beancounter::find_or_create(BcId(700)).unwrap();
//! t.set_limits(Resource::Threads, Limits::new(1, 1).unwrap()).unwrap();
//! let _c = t.charge(Resource::Threads, 1, Severity::Limit).unwrap();
//! assert!(t.charge(Resource::Threads, 1, Severity::Limit).is_err());
//!
//! let table = report::user_beancounters();
//! assert!(table.starts_with("Version: 2.5\n"));
//! assert!(table.lines().any(|l| l.trim_start().starts_with("700:")));
//! let text = report::prometheus();
//! assert!(text.contains(r#"beancounter_failcnt_total{id="700",resource="threads"} 1"#));
//! ```

use crate::accounting::api::{live_beancounters, resources};
use crate::{BcId, Events, Resource, ResourceStat};
use core::fmt::Write;
use std::time::Duration;

/// One resource of one beancounter, as read by [`snapshot`].
///
/// # Examples
/// ```
/// use beancounter::{report, BcId, Resource, Severity};
/// let t = beancounter::find_or_create(BcId(704)).unwrap();
/// let _c = t.charge(Resource::Threads, 2, Severity::Limit).unwrap();
/// let snap = report::snapshot();
/// let bc = snap.iter().find(|b| b.id == BcId(704)).unwrap();
/// let threads: &report::ResourceSnapshot = bc.resource(Resource::Threads).unwrap();
/// assert_eq!(threads.stat, t.stat(Resource::Threads));
/// assert_eq!(threads.events, t.events(Resource::Threads));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ResourceSnapshot {
    /// Which resource.
    pub resource: Resource,
    /// Its counters (`held` is true usage).
    pub stat: ResourceStat,
    /// Its event counts since the beancounter was created.
    pub events: Events,
}

/// One beancounter, as read by [`snapshot`].
///
/// # Examples
/// ```
/// use beancounter::{report, BcId, Resource};
/// let user = beancounter::find_or_create(BcId(705)).unwrap();
/// let _query = user.new_child(BcId(706)).unwrap();
/// let snap = report::snapshot();
/// let q = snap.iter().find(|b| b.id == BcId(706)).unwrap();
/// assert_eq!(q.parent, Some(BcId(705)));
/// let counted: Vec<Resource> = q.resources.iter().map(|r| r.resource).collect();
/// assert_eq!(counted, Resource::BUILTIN); // no custom resource registered
/// ```
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BcSnapshot {
    /// Its id.
    pub id: BcId,
    /// Its parent, for a child made with [`Beancounter::new_child`](crate::Beancounter::new_child).
    pub parent: Option<BcId>,
    /// Every resource counted now: the built-in ones, then the registered custom ones.
    pub resources: Vec<ResourceSnapshot>,
}

impl BcSnapshot {
    /// The entry for `r`, if it is counted.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{report, BcId, Resource};
    /// let snap = report::snapshot();
    /// let root = snap.iter().find(|b| b.id == BcId::ROOT).unwrap();
    /// assert!(root.resource(Resource::Memory).is_some());
    /// ```
    pub fn resource(&self, r: Resource) -> Option<&ResourceSnapshot> {
        self.resources.iter().find(|s| s.resource == r)
    }
}

/// Every live beancounter (the root first, then in table order; beancounters whose handles
/// are gone but that still hold charges included), every counted resource, with its
/// [`ResourceStat`] and [`Events`], read without stopping allocation.
///
/// # Examples
/// ```
/// use beancounter::{report, BcId};
/// let t = beancounter::find_or_create(BcId(701)).unwrap();
/// let c = t.new_child(BcId(702)).unwrap();
/// let snap = report::snapshot();
/// assert_eq!(snap[0].id, BcId::ROOT);
/// let child = snap.iter().find(|b| b.id == BcId(702)).unwrap();
/// assert_eq!(child.parent, Some(BcId(701)));
/// # drop(c);
/// ```
pub fn snapshot() -> Vec<BcSnapshot> {
    let resources: Vec<Resource> = resources().collect();
    live_beancounters()
        .into_iter()
        .map(|bc| BcSnapshot {
            id: bc.id(),
            parent: bc.parent().map(|p| p.id()),
            resources: resources
                .iter()
                .map(|&r| ResourceSnapshot {
                    resource: r,
                    stat: bc.stat(r),
                    events: bc.events(r),
                })
                .collect(),
        })
        .collect()
}

/// Widths of the `/proc/user_beancounters` columns: `uid` right-aligned in 10 and followed
/// by `: `, the resource name left-aligned in 12, then five numbers right-aligned in 20.
const UID_WIDTH: usize = 10;
const NAME_WIDTH: usize = 12;
const NUM_WIDTH: usize = 20;

/// The table of every live beancounter in the layout of OpenVZ's `/proc/user_beancounters`
/// (version 2.5): a `Version: 2.5` line, a header line
/// `uid resource held maxheld barrier limit failcnt`, then one line per resource, the id
/// (followed by `:`) only on the first line of each beancounter. Columns are fixed width, so
/// tools written for that file parse this one; unlimited bounds print as
/// [`MAX`](crate::MAX) (`9223372036854775807`), as they do there. Custom resource names
/// longer than 12 characters widen their line.
///
/// # Examples
/// ```
/// let table = beancounter::report::user_beancounters();
/// let mut lines = table.lines();
/// assert_eq!(lines.next(), Some("Version: 2.5"));
/// let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
/// assert_eq!(header, ["uid", "resource", "held", "maxheld", "barrier", "limit", "failcnt"]);
/// assert!(lines.next().unwrap().starts_with("         0: memory"));
/// ```
pub fn user_beancounters() -> String {
    render_user_beancounters(&snapshot())
}

/// [`user_beancounters`] of a snapshot taken earlier.
///
/// # Examples
/// ```
/// use beancounter::{report, BcId};
/// let _t = beancounter::find_or_create(BcId(707)).unwrap();
/// let mut snap = report::snapshot();
/// snap.retain(|b| b.id == BcId(707)); // one tenant's own view
/// let table = report::render_user_beancounters(&snap);
/// assert_eq!(table.lines().count(), 2 + 3); // version, header, three resources
/// assert!(table.lines().nth(2).unwrap().starts_with("       707: memory"));
/// ```
pub fn render_user_beancounters(snapshot: &[BcSnapshot]) -> String {
    let mut out = String::with_capacity(64 + snapshot.len() * 4 * 120);
    out.push_str("Version: 2.5\n");
    let _ = writeln!(
        out,
        "{:>UID_WIDTH$}  {:<NAME_WIDTH$} {:>NUM_WIDTH$} {:>NUM_WIDTH$} {:>NUM_WIDTH$} {:>NUM_WIDTH$} {:>NUM_WIDTH$}",
        "uid", "resource", "held", "maxheld", "barrier", "limit", "failcnt"
    );
    for bc in snapshot {
        for (i, r) in bc.resources.iter().enumerate() {
            if i == 0 {
                let _ = write!(out, "{:>UID_WIDTH$}: ", bc.id.0);
            } else {
                let _ = write!(out, "{:>w$}", "", w = UID_WIDTH + 2);
            }
            let s = &r.stat;
            let _ = writeln!(
                out,
                "{:<NAME_WIDTH$} {:>NUM_WIDTH$} {:>NUM_WIDTH$} {:>NUM_WIDTH$} {:>NUM_WIDTH$} {:>NUM_WIDTH$}",
                r.resource.to_string(),
                s.held,
                s.maxheld,
                s.barrier,
                s.limit,
                s.failcnt
            );
        }
    }
    out
}

/// Every live beancounter in the Prometheus text exposition format (version 0.0.4): one
/// family per counter, each sample labelled `id` and `resource` (and `parent` for
/// children, on `beancounter_held` only). `held`, `maxheld`, `minheld`, `barrier` and
/// `limit` are gauges; `failcnt` and the event counts are counters (`_total`).
///
/// | family | type | meaning |
/// |---|---|---|
/// | `beancounter_held` | gauge | true usage now |
/// | `beancounter_maxheld`, `beancounter_minheld` | gauge | peak and low since the window was reset |
/// | `beancounter_barrier`, `beancounter_limit` | gauge | the bounds |
/// | `beancounter_failcnt_total` | counter | refused charges |
/// | `beancounter_barrier_crossings_total` | counter | charges that went over the barrier |
/// | `beancounter_refused_at_barrier_total` | counter | fallible charges refused |
/// | `beancounter_refused_at_limit_total` | counter | ordinary charges refused |
/// | `beancounter_forced_past_limit_total` | counter | forced charges that passed the limit |
/// | `beancounter_uncharge_warnings_total` | counter | uncharges of more than was held |
///
/// # Examples
/// ```
/// let text = beancounter::report::prometheus();
/// assert!(text.contains("# TYPE beancounter_held gauge\n"));
/// assert!(text.contains("# TYPE beancounter_failcnt_total counter\n"));
/// assert!(text.contains(r#"beancounter_limit{id="0",resource="memory"} 9223372036854775807"#));
/// ```
pub fn prometheus() -> String {
    render_prometheus(&snapshot())
}

/// One Prometheus metric family: name, type, help, and how to read a sample.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&ResourceSnapshot) -> u64,
}

const FAMILIES: [Family; 11] = [
    Family {
        name: "beancounter_held",
        kind: "gauge",
        help: "What the beancounter holds now (true usage, stocks excluded).",
        value: |r| r.stat.held,
    },
    Family {
        name: "beancounter_maxheld",
        kind: "gauge",
        help: "Highest held since the window was last reset.",
        value: |r| r.stat.maxheld,
    },
    Family {
        name: "beancounter_minheld",
        kind: "gauge",
        help: "Lowest held since the window was last reset.",
        value: |r| r.stat.minheld,
    },
    Family {
        name: "beancounter_barrier",
        kind: "gauge",
        help: "Soft bound: fallible requests fail above it.",
        value: |r| r.stat.barrier,
    },
    Family {
        name: "beancounter_limit",
        kind: "gauge",
        help: "Hard bound: no checked charge takes held above it.",
        value: |r| r.stat.limit,
    },
    Family {
        name: "beancounter_failcnt_total",
        kind: "counter",
        help: "Refused charges.",
        value: |r| r.stat.failcnt,
    },
    Family {
        name: "beancounter_barrier_crossings_total",
        kind: "counter",
        help: "Charges that took held over the barrier.",
        value: |r| r.events.barrier_crossings,
    },
    Family {
        name: "beancounter_refused_at_barrier_total",
        kind: "counter",
        help: "Fallible charges (checked against the barrier) refused.",
        value: |r| r.events.refused_at_barrier,
    },
    Family {
        name: "beancounter_refused_at_limit_total",
        kind: "counter",
        help: "Ordinary charges (checked against the limit) refused.",
        value: |r| r.events.refused_at_limit,
    },
    Family {
        name: "beancounter_forced_past_limit_total",
        kind: "counter",
        help: "Forced charges that left held above the limit.",
        value: |r| r.events.forced_past_limit,
    },
    Family {
        name: "beancounter_uncharge_warnings_total",
        kind: "counter",
        help: "Uncharges of more than was held (clamped at zero; a caller bug).",
        value: |r| r.events.uncharge_warnings,
    },
];

/// [`prometheus`] of a snapshot taken earlier.
///
/// # Examples
/// ```
/// use beancounter::{report, BcId, Resource, Severity};
/// let t = beancounter::find_or_create(BcId(708)).unwrap();
/// let c = t.charge(Resource::Threads, 3, Severity::Limit).unwrap();
/// let snap = report::snapshot();
/// drop(c); // the snapshot keeps what it read
/// let sample = r#"beancounter_held{id="708",resource="threads"}"#;
/// assert!(report::render_prometheus(&snap).contains(&format!("{sample} 3\n")));
/// assert!(report::prometheus().contains(&format!("{sample} 0\n")));
/// ```
pub fn render_prometheus(snapshot: &[BcSnapshot]) -> String {
    let mut out = String::with_capacity(2048 + snapshot.len() * 4 * 11 * 64);
    for f in &FAMILIES {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for bc in snapshot {
            for r in &bc.resources {
                let _ = write!(out, "{}{{id=\"{}\",resource=\"", f.name, bc.id.0);
                // Resource names are printable ASCII without spaces; escape what the format
                // reserves inside label values anyway.
                for c in r.resource.to_string().chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '"' => out.push_str("\\\""),
                        c => out.push(c),
                    }
                }
                out.push('"');
                if let (Some(p), "beancounter_held") = (bc.parent, f.name) {
                    let _ = write!(out, ",parent=\"{}\"", p.0);
                }
                let _ = writeln!(out, "}} {}", (f.value)(r));
            }
        }
    }
    out
}

/// Something that happened to one resource of one beancounter since an [`EventWatcher`]
/// last looked.
///
/// # Examples
/// ```
/// use beancounter::{report::EventWatcher, BcId, Limits, Resource, Severity};
/// let t = beancounter::find_or_create(BcId(709)).unwrap();
/// t.set_limits(Resource::Threads, Limits::new(0, 1).unwrap()).unwrap();
/// let mut watcher = EventWatcher::new();
/// let _c = t.charge(Resource::Threads, 1, Severity::Limit).unwrap(); // crosses the barrier
/// assert!(t.charge(Resource::Threads, 1, Severity::Limit).is_err()); // refused at the limit
/// let e = watcher.poll().into_iter().find(|e| e.id == BcId(709)).unwrap();
/// assert_eq!(e.resource, Resource::Threads);
/// assert_eq!((e.delta.barrier_crossings, e.delta.refused_at_limit), (1, 1));
/// assert_eq!(e.stat.held, 1);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Event {
    /// The beancounter.
    pub id: BcId,
    /// The resource.
    pub resource: Resource,
    /// How many of each event happened since the watcher last looked.
    pub delta: Events,
    /// The resource's counters when the watcher looked.
    pub stat: ResourceStat,
}

/// Lets a host thread poll, or sleep until, beancounters cross their barriers, refuse
/// charges, are forced past their limits or are uncharged too much.
///
/// The accounting stack only counts events and, while some watcher sleeps in
/// [`wait`](Self::wait), wakes it with one futex call; the watcher then finds what changed
/// by comparing event counts, in its own thread. Nothing the host writes ever runs inside
/// the allocator. Events of a beancounter that was freed and created again start from zero.
///
/// # Examples
/// ```
/// use beancounter::{report::EventWatcher, BcId, Limits, Resource, Severity};
/// use std::time::Duration;
/// let t = beancounter::find_or_create(BcId(703)).unwrap();
/// t.set_limits(Resource::Threads, Limits::new(1, 10).unwrap()).unwrap();
/// let mut watcher = EventWatcher::new();
/// let c = std::thread::spawn(move || t.charge(Resource::Threads, 2, Severity::Limit).unwrap());
/// let events = watcher.wait(Duration::from_secs(10));
/// let e = events.iter().find(|e| e.id == BcId(703)).unwrap();
/// assert_eq!(e.delta.barrier_crossings, 1);
/// # drop(c.join().unwrap());
/// ```
#[derive(Debug)]
pub struct EventWatcher {
    /// The process-wide event count when the watcher last looked.
    seen: u32,
    /// Event counts per (id, resource) when the watcher last looked, sorted.
    last: Vec<((u32, Resource), Events)>,
}

impl Default for EventWatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl EventWatcher {
    /// A watcher that reports events from now on.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{report::EventWatcher, BcId, Limits, Resource, Severity};
    /// let t = beancounter::find_or_create(BcId(710)).unwrap();
    /// t.set_limits(Resource::Threads, Limits::new(0, 0).unwrap()).unwrap();
    /// assert!(t.charge(Resource::Threads, 1, Severity::Limit).is_err()); // before the watcher
    /// let mut watcher = EventWatcher::new();
    /// assert!(watcher.poll().is_empty()); // only what happens from now on
    /// ```
    pub fn new() -> EventWatcher {
        let mut w = EventWatcher {
            seen: crate::os::event::seq(),
            last: Vec::new(),
        };
        w.last = Self::counts(&snapshot());
        w
    }

    /// The events since the last look, without waiting (empty if none).
    ///
    /// # Examples
    /// ```
    /// use beancounter::{report::EventWatcher, BcId, Limits, Resource, Severity};
    /// let t = beancounter::find_or_create(BcId(711)).unwrap();
    /// t.set_limits(Resource::Threads, Limits::new(0, 0).unwrap()).unwrap();
    /// let mut watcher = EventWatcher::new();
    /// assert!(watcher.poll().is_empty());
    /// assert!(t.charge(Resource::Threads, 1, Severity::Limit).is_err());
    /// assert_eq!(watcher.poll()[0].delta.refused_at_limit, 1);
    /// assert!(watcher.poll().is_empty()); // each event is reported once
    /// ```
    pub fn poll(&mut self) -> Vec<Event> {
        let now = crate::os::event::seq();
        if now == self.seen {
            return Vec::new();
        }
        self.seen = now;
        self.diff()
    }

    /// The events since the last look, sleeping up to `timeout` for the first one (empty if
    /// none came).
    ///
    /// # Examples
    /// ```
    /// use beancounter::{report::EventWatcher, BcId, Limits, Resource, Severity};
    /// use std::time::{Duration, Instant};
    /// let t = beancounter::find_or_create(BcId(712)).unwrap();
    /// t.set_limits(Resource::Threads, Limits::new(0, 0).unwrap()).unwrap();
    /// let mut watcher = EventWatcher::new();
    /// let start = Instant::now();
    /// assert!(watcher.wait(Duration::from_millis(20)).is_empty()); // nothing came
    /// assert!(start.elapsed() >= Duration::from_millis(20));
    /// assert!(t.charge(Resource::Threads, 1, Severity::Limit).is_err());
    /// let events = watcher.wait(Duration::from_secs(10)); // returns at once
    /// assert_eq!(events[0].delta.refused_at_limit, 1);
    /// ```
    pub fn wait(&mut self, timeout: Duration) -> Vec<Event> {
        self.seen = crate::os::event::wait(self.seen, timeout);
        self.diff()
    }

    fn counts(snapshot: &[BcSnapshot]) -> Vec<((u32, Resource), Events)> {
        let mut v: Vec<_> = snapshot
            .iter()
            .flat_map(|bc| {
                bc.resources
                    .iter()
                    .map(|r| ((bc.id.0, r.resource), r.events))
            })
            .collect();
        v.sort_by_key(|&((id, r), _)| (id, r.index()));
        v
    }

    fn diff(&mut self) -> Vec<Event> {
        let snap = snapshot();
        let now = Self::counts(&snap);
        let mut out = Vec::new();
        for bc in &snap {
            for r in &bc.resources {
                let key = (bc.id.0, r.resource);
                let before = self
                    .last
                    .binary_search_by_key(&(key.0, key.1.index()), |&((id, r), _)| (id, r.index()))
                    .map_or(Events::default(), |i| self.last[i].1);
                let delta = r.events.since(&before);
                if delta != Events::default() {
                    out.push(Event {
                        id: bc.id,
                        resource: r.resource,
                        delta,
                        stat: r.stat,
                    });
                }
            }
        }
        self.last = now;
        out
    }
}
