//! The tenant server's live dashboard: one page at `GET /` that shows, per tenant, what it
//! holds against its barrier and limit, `held` over the last five minutes, its `failcnt`
//! and recent events, with links to its heap profile as a flamegraph and as pprof. The page
//! (`dashboard.html`, compiled in with its CSS and script; it loads nothing else) refreshes
//! itself every second from `GET /api/tenants`.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the page, `text/html` |
//! | `GET /api/tenants` | every listed tenant as JSON (below), `application/json` |
//! | `GET /t/<id>/heap.svg` | tenant `<id>`'s live heap as a flamegraph, `image/svg+xml` |
//! | `GET /t/<id>/heap.pb.gz` | the same profile as gzipped pprof protobuf, a download |
//!
//! `<id>` is the tenant's number ([`BcId`]); an id the lister does not list is `404`. A heap
//! profile holds samples only while `beancounter::profile` is on (the tenant server's
//! `--demo` and `--profile` start it); without any, the flamegraph is a small SVG saying so.
//!
//! # Mounting it
//! [`Dashboard::new`] takes a closure listing the tenants to show; [`Dashboard::router`]
//! gives the routes, to merge into a server's router; [`Dashboard::keep_sampling`] is the
//! task that takes a sample every [`SAMPLE_EVERY`], spawned on the server's runtime.
//!
//! # `/api/tenants`
//! ```json
//! {"sample_every_ms": 1000, "now_ms": 1764650000000,
//!  "tenants": [
//!   {"id": 4, "name": "noisy",
//!    "held": 2101248, "maxheld": 8392704, "barrier": 16777216, "limit": 67108864,
//!    "failcnt": 17,
//!    "history": [[1764649998000, 6295552], [1764649999000, 2101248]],
//!    "events": [{"at_ms": 1764649999000, "resource": "memory", "held": 2101248,
//!                "counts": {"refused_at_barrier": 5}}]}]}
//! ```
//! Counters are memory's [`ResourceStat`] now, in bytes (an unlimited bound is
//! `9223372036854775807`, `beancounter::MAX`); times are milliseconds since the Unix epoch.
//! `history` is `[time, held]` at each of the last [`HISTORY`] samples since the tenant was
//! listed, oldest first. `events` are what [`EventWatcher`] saw happen to any of the
//! tenant's resources, the last [`EVENTS_KEPT`], oldest first: `counts` names the nonzero
//! fields of [`Events`](beancounter::Events), and `held` is that resource's `held` then.
//! Tenants come in the lister's order.
//!
//! # Who pays
//! The routes run in the tenant the server's layer picks for them (the tenant server picks
//! none: they run in the host), the sampler in whatever a runtime worker runs in (the root):
//! looking at a tenant charges nothing to it, and a tenant over its barrier can still be
//! looked at.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use beancounter::profile::{self, HeapProfile};
use beancounter::report::EventWatcher;
use beancounter::{BcError, BcId, Beancounter, Resource};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The page, with its CSS and script inline.
const PAGE: &str = include_str!("dashboard.html");

/// How often the sampler records every tenant's `held` (and collects events).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Samples kept: five minutes at one a second.
pub const HISTORY: usize = 300;

/// Events kept per tenant for `/api/tenants` (the page shows the last four): a minute or
/// more of a tenant refused at every sample.
pub const EVENTS_KEPT: usize = 20;

/// A tenant as the dashboard lists it.
#[derive(Clone)]
pub struct Listed {
    /// What the page calls it.
    pub name: String,
    /// Its beancounter (the id is `bc.id()`).
    pub bc: Beancounter,
}

/// The closure that says which tenants to show, in order.
type Lister = dyn Fn() -> Vec<Listed> + Send + Sync;

/// The dashboard's state: who to list, and what the sampler has seen.
pub struct Dashboard {
    list: Box<Lister>,
    seen: Mutex<Seen>,
}

/// What the sampler keeps between requests.
struct Seen {
    /// The last [`HISTORY`] samples, oldest first.
    samples: VecDeque<Sample>,
    /// The last [`EVENTS_KEPT`] events of each listed tenant, oldest first.
    events: HashMap<BcId, VecDeque<Noted>>,
    watcher: EventWatcher,
}

/// Every listed tenant's memory `held` at one moment.
struct Sample {
    at_ms: u64,
    /// `(id, held)`, sorted by id.
    held: Vec<(BcId, u64)>,
}

/// One event as `/api/tenants` shows it.
#[derive(Serialize)]
struct Noted {
    at_ms: u64,
    resource: String,
    held: u64,
    counts: BTreeMap<&'static str, u64>,
}

/// `/api/tenants`.
#[derive(Serialize)]
struct TenantsJson<'a> {
    sample_every_ms: u64,
    now_ms: u64,
    tenants: Vec<TenantJson<'a>>,
}

/// One tenant of `/api/tenants`.
#[derive(Serialize)]
struct TenantJson<'a> {
    id: u32,
    name: &'a str,
    held: u64,
    maxheld: u64,
    barrier: u64,
    limit: u64,
    failcnt: u64,
    history: Vec<[u64; 2]>,
    events: Vec<&'a Noted>,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as u64)
}

impl Dashboard {
    /// A dashboard of the tenants `list` returns, called at every sample and request (from
    /// the runtime's workers: it should only read a table).
    pub fn new(list: impl Fn() -> Vec<Listed> + Send + Sync + 'static) -> Arc<Dashboard> {
        let seen = Seen {
            samples: VecDeque::with_capacity(HISTORY),
            events: HashMap::new(),
            watcher: EventWatcher::new(),
        };
        Arc::new(Dashboard {
            list: Box::new(list),
            seen: Mutex::new(seen),
        })
    }

    /// `GET /`, `GET /api/tenants`, `GET /t/{id}/heap.svg` and `GET /t/{id}/heap.pb.gz`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/api/tenants", get(tenants))
            .route("/t/{id}/heap.svg", get(heap_svg))
            .route("/t/{id}/heap.pb.gz", get(heap_pprof))
            .with_state(self.clone())
    }

    /// Samples every [`SAMPLE_EVERY`], for as long as the runtime runs the task.
    pub async fn keep_sampling(self: Arc<Self>) {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.sample();
        }
    }

    /// Records every listed tenant's `held` now, and the events since the last look.
    fn sample(&self) {
        let listed = (self.list)();
        let at_ms = now_ms();
        let mut held: Vec<(BcId, u64)> = listed
            .iter()
            .map(|t| (t.bc.id(), t.bc.stat(Resource::Memory).held))
            .collect();
        held.sort_unstable_by_key(|&(id, _)| id.0);
        let mut seen = self.seen();
        if seen.samples.len() == HISTORY {
            seen.samples.pop_front();
        }
        seen.samples.push_back(Sample { at_ms, held });
        seen.note_events(at_ms, &listed);
    }

    /// The body of `/api/tenants`. Collects the events since the last sample first, so a
    /// refusal shows at the next refresh.
    fn tenants_json(&self) -> String {
        let listed = (self.list)();
        let now_ms = now_ms();
        let mut seen = self.seen();
        seen.note_events(now_ms, &listed);
        let tenants = listed
            .iter()
            .map(|t| {
                let id = t.bc.id();
                let s = t.bc.stat(Resource::Memory);
                TenantJson {
                    id: id.0,
                    name: &t.name,
                    held: s.held,
                    maxheld: s.maxheld,
                    barrier: s.barrier,
                    limit: s.limit,
                    failcnt: s.failcnt,
                    history: seen.history(id),
                    events: seen
                        .events
                        .get(&id)
                        .map_or(Vec::new(), |e| e.iter().collect()),
                }
            })
            .collect();
        let json = TenantsJson {
            sample_every_ms: SAMPLE_EVERY.as_millis() as u64,
            now_ms,
            tenants,
        };
        // Plain structs of numbers and strings: serializing cannot fail.
        serde_json::to_string(&json).expect("plain data")
    }

    /// The listed tenant with this id (as the path spells it).
    fn find(&self, id: &str) -> Option<Listed> {
        let id = BcId(id.parse().ok()?);
        (self.list)().into_iter().find(|t| t.bc.id() == id)
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        // A panic while sampling leaves at worst a sample or an event short.
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Seen {
    /// `[time, held]` of tenant `id` in every sample that lists it, oldest first.
    fn history(&self, id: BcId) -> Vec<[u64; 2]> {
        self.samples
            .iter()
            .filter_map(|s| {
                let i = s.held.binary_search_by_key(&id.0, |&(id, _)| id.0).ok()?;
                Some([s.at_ms, s.held[i].1])
            })
            .collect()
    }

    /// Keeps the events of listed tenants since the watcher last looked; forgets tenants no
    /// longer listed.
    fn note_events(&mut self, at_ms: u64, listed: &[Listed]) {
        let is_listed = |id: BcId| listed.iter().any(|t| t.bc.id() == id);
        for e in self.watcher.poll() {
            if !is_listed(e.id) {
                continue;
            }
            let d = e.delta;
            let counts: BTreeMap<&'static str, u64> = [
                ("barrier_crossings", d.barrier_crossings),
                ("refused_at_barrier", d.refused_at_barrier),
                ("refused_at_limit", d.refused_at_limit),
                ("forced_past_limit", d.forced_past_limit),
                ("uncharge_warnings", d.uncharge_warnings),
            ]
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .collect();
            let kept = self.events.entry(e.id).or_default();
            if kept.len() == EVENTS_KEPT {
                kept.pop_front();
            }
            kept.push_back(Noted {
                at_ms,
                resource: e.resource.to_string(),
                held: e.stat.held,
                counts,
            });
        }
        self.events.retain(|&id, _| is_listed(id));
    }
}

// ---- routes ----------------------------------------------------------------------------

/// `GET /`.
async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

/// `GET /api/tenants`.
async fn tenants(State(dash): State<Arc<Dashboard>>) -> impl IntoResponse {
    let json = dash.tenants_json();
    ([(header::CONTENT_TYPE, "application/json")], json)
}

/// `GET /t/{id}/heap.svg`.
async fn heap_svg(State(dash): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    with_profile(dash, id, |t, p| {
        let svg = flamegraph(&t.name, t.bc.id(), p);
        ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
    })
    .await
}

/// `GET /t/{id}/heap.pb.gz`.
async fn heap_pprof(State(dash): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    with_profile(dash, id, |t, p| {
        let file: String = t
            .name
            .chars()
            .map(
                |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    true => c,
                    false => '_',
                },
            )
            .collect();
        let disposition = format!("attachment; filename=\"heap-{file}-{}.pb.gz\"", t.bc.id());
        let headers = [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ];
        (headers, p.pprof()).into_response()
    })
    .await
}

/// Reads tenant `id`'s heap profile and answers with `answer(tenant, profile)`, on a
/// blocking thread: naming the sampled addresses may parse the binary's debug info, which
/// takes a while the first time.
async fn with_profile(
    dash: Arc<Dashboard>,
    id: String,
    answer: impl FnOnce(&Listed, &HeapProfile) -> Response + Send + 'static,
) -> Response {
    let read = tokio::task::spawn_blocking(move || {
        let Some(t) = dash.find(&id) else {
            return (StatusCode::NOT_FOUND, format!("no tenant {id}\n")).into_response();
        };
        match profile::heap(t.bc.id()) {
            Ok(p) => answer(&t, &p),
            Err(e @ BcError::NotFound(_)) => {
                (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
            }
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        }
    });
    read.await.unwrap_or_else(|e| {
        let msg = format!("reading the profile failed: {e}\n");
        (StatusCode::INTERNAL_SERVER_ERROR, msg).into_response()
    })
}

// ---- flamegraphs -------------------------------------------------------------------------

/// Tenant `id`'s profile as a flamegraph SVG, titled with its name and estimated live bytes;
/// a profile without samples gives a small SVG saying so.
fn flamegraph(name: &str, id: BcId, p: &HeapProfile) -> Vec<u8> {
    let title = format!(
        "{name} (tenant {id}): live heap, about {:.1} MiB",
        p.estimated_bytes() as f64 / (1 << 20) as f64
    );
    let folded = p.folded();
    let mut opt = inferno::flamegraph::Options::default();
    opt.title = title.clone();
    opt.subtitle = Some(format!(
        "{} samples, a mean of one per {} KiB allocated; widths are estimated live bytes",
        p.samples(),
        p.sample_bytes() >> 10
    ));
    opt.count_name = "bytes".into();
    opt.colors = inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Mem);
    let mut svg = Vec::new();
    // inferno refuses a profile whose counts add up to nothing (no lines, or only sites
    // whose estimate rounds to 0 bytes).
    match inferno::flamegraph::from_lines(&mut opt, folded.lines(), &mut svg) {
        Ok(()) => svg,
        Err(_) => no_samples_svg(&title),
    }
}

/// A flamegraph-sized SVG with the title and a line saying there are no samples.
fn no_samples_svg(title: &str) -> Vec<u8> {
    let font = r#"font-family="Verdana, sans-serif" text-anchor="middle""#;
    format!(
        r##"<?xml version="1.0" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="1200" height="100" viewBox="0 0 1200 100">
<rect x="0" y="0" width="1200" height="100" fill="#eef2ee"/>
<text x="600" y="34" font-size="17" {font}>{}</text>
<text x="600" y="68" font-size="12" {font}>no samples: none of this tenant's live memory was sampled (is beancounter::profile started?)</text>
</svg>
"##,
        xml_escape(title)
    )
    .into_bytes()
}

/// `s` as XML text.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}
