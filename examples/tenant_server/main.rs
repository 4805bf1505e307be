//! An HTTP/1.1 server on axum whose tenants cannot take each other's memory: every request
//! runs in its tenant's beancounter (through [`beancounter::tower::TenantLayer`]), tenant-sized
//! allocations are checked against the tenant's barrier, and one tenant over its barrier gets
//! `507 Insufficient Storage` while the others are served as before.
//!
//! ```sh
//! cargo run --release --example tenant_server -- --demo   # drive it, measure, check
//! cargo run --release --example tenant_server              # serve on 127.0.0.1:8080
//! cargo run --release --example tenant_server -- --port 9000 --config tenants.conf --profile
//! ```
//!
//! # Requests
//! A tenant's work is named by the path prefix `/t/<tenant>/`, its heap profile by the
//! tenant's number (its [`BcId`]):
//!
//! | request | answer |
//! |---|---|
//! | `GET /t/<tenant>/work?kib=N` | builds an N KiB document in the tenant: `200`, or `507` when the tenant's barrier refuses it |
//! | `GET /beancounters` | [`beancounter::report::user_beancounters`] |
//! | `GET /metrics` | [`beancounter::report::prometheus`], `Content-Type: text/plain; version=0.0.4` |
//! | `GET /` | the live dashboard ([`dashboard`]): per tenant, held against barrier and limit, held over the last five minutes, `failcnt`, recent events |
//! | `GET /api/tenants` | what the dashboard shows, as JSON |
//! | `GET /t/<id>/heap.svg`, `GET /t/<id>/heap.pb.gz` | tenant number `<id>`'s live heap as a flamegraph, and as pprof; sampled only with `--profile` (or `--demo`) |
//!
//! An unknown tenant is `404`, a bad `kib` `400`, a method other than `GET` `405` (axum's
//! answer), a request hyper cannot parse `400` (hyper's). Connections are kept alive.
//!
//! # How a request finds its tenant
//! The router's [`TenantLayer`] picks the tenant from the path of `/t/<tenant>/work`
//! (`tenant_of`): the handler, its extractors and its response run inside the tenant's
//! beancounter at every poll, on whichever of the [`WORKERS`] tokio workers polls them.
//! Everything else (the reports, the dashboard and the profiles it links to, unknown
//! tenants) runs in the host (the root). The layer also refuses, with `507`, every work
//! request of a tenant that is already over its barrier (`refuse_with`), before its handler
//! runs.
//!
//! # Config
//! One tenant per line, `tenant <name> <id> <barrier> <limit>`, sizes in bytes or with a
//! `K`, `M` or `G` suffix (KiB, MiB, GiB); `#` starts a comment. [`DEFAULT_CONFIG`] is used
//! unless `--config FILE` names another. Errors name the line: bad limits are shown as the
//! crate's `BcError::InvalidLimits`. The parser (`parse_config`) only reads text; the
//! server's tenants live in a [`Tenants`] table behind an `Arc<RwLock<..>>` that handlers and
//! the layer read per request, so a reload can swap in a new table while requests run.
//!
//! # Reload
//! With `--config FILE`, `kill -HUP <pid>` reloads the file ([`reload`]): a tenant is its
//! id, so ids new to the file are created, kept ids take the file's limits (a name may
//! change), and ids no longer in it are retired ([`Beancounter::retire`]): they leave the
//! table, `/beancounters` and `/metrics` at once, their requests in flight finish, and what
//! they still hold is charged to the host until freed. A bad file is reported and changes
//! nothing; so does a reload that cannot create a tenant.
//!
//! # How memory is kept in bounds
//! - The document is reserved inside [`beancounter::fallible`] (in [`build_document`]), so
//!   the reservation is checked against the tenant's **barrier**: over it, `try_reserve`
//!   returns `Err` and the request gets `507`. Nothing else a handler allocates is
//!   tenant-sized.
//! - Everything else (strings, the response) is an ordinary allocation, checked against the
//!   **limit**; one that passed the limit would abort the process. The config therefore
//!   requires `limit >= barrier + HANDLER_SLACK`: fallible requests stop at the barrier,
//!   and the handlers' ordinary allocations above it never reach the limit.
//! - A worker keeps, per tenant it served, what it charged ahead of use (its *stock*, up to
//!   two `STOCK_BYTES` batches per tenant): `stat()` and the reports exclude it, and a
//!   request that the barrier would refuse only because of stocks takes them back from
//!   every worker first, so the workers never need to drain anything.
//!
//! # The demo
//! `--demo` starts the server on an ephemeral loopback port and drives it with an HTTP
//! client (`ureq`, one keep-alive connection per client thread): the well-behaved tenants
//! (every tenant but `noisy`) alone, then again while the `noisy` tenant asks for far more
//! than its barrier. It prints the refusals, the noisy tenant's `failcnt`, the others'
//! latency in both phases and the process RSS, and exits non-zero unless: the noisy
//! tenant was refused and its `failcnt` matches, the others were never refused, RSS stayed
//! within the sum of the limits plus [`RSS_OVERHEAD`] plus the symbol tables the host loads to
//! draw flamegraphs (measured before any tenant runs; not checked under a sanitizer, whose
//! own memory RSS counts), every tenant is back to (almost)
//! nothing held once the server has closed its connections, and `/beancounters` and
//! `/metrics` parse and show the `failcnt`. Last, it reloads as an operator would: it writes
//! a new config (one tenant's limits changed, one removed, `dave` added), sends itself
//! `SIGHUP`, and checks that the removed tenant is gone (`404`, not in `lookup` or
//! `/beancounters`), `dave` is served and the new limits hold.
//!
//! The demo also turns heap profiling on ([`beancounter::profile`], at the default mean of
//! one sample per 512 KiB allocated: each granted noisy document, 2 or 6 MiB, is sampled with
//! probability `1 - e^-4` = 98% or more, and while the noisy tenant is loud one is almost
//! always being built: the default rate is enough). While the noisy tenant is loud (its
//! clients go on until this is done) the demo reads its flamegraph, as an operator would from
//! the dashboard, and checks that it names [`build_document`], where the noise comes from;
//! it also checks that the pprof download is gzip, that `/api/tenants` lists every tenant
//! with its bounds, history and the noisy tenant's `failcnt` and refusals, and that `/` is
//! the page, loading nothing from elsewhere.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use beancounter::profile;
use beancounter::tower::TenantLayer;
use beancounter::{
    BcError, BcId, BeanAlloc, Beancounter, Exceeded, Limits, Resource, ResourceStat,
};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod dashboard;
mod demo;
use dashboard::{Dashboard, Listed};
use demo::{run_demo, DemoSize};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

/// The tenants when no `--config` is given.
const DEFAULT_CONFIG: &str = "\
# tenant <name> <id> <barrier> <limit>
tenant alice  1  8M  16M
tenant bob    2  8M  16M
tenant carol  3  8M  16M
# The demo's noisy tenant: its requests stop at the barrier; the limit, far above it,
# is never reached by the handlers' ordinary allocations.
tenant noisy  4  16M 64M
";

/// How far above its barrier a tenant's limit must be: room for the ordinary allocations of
/// its handlers (a page of text and the response: a few KiB per request in flight), which
/// are checked against the limit only and would abort the process if refused.
const HANDLER_SLACK: u64 = 1 << 20;

/// The largest document a request may ask for (`kib`), 4 GiB: past it the request is `400`.
const MAX_KIB: u64 = 4 << 20;

/// Tokio worker threads serving connections (the runtime the router runs on).
const WORKERS: usize = 4;

/// What the process may hold besides the tenants' limits, for the demo's RSS check:
/// - up to 64 MiB of freed pages the allocator keeps resident for about a second before it
///   gives them back (the floor of its bound on free pages, `DIRTY_FLOOR` in
///   `src/alloc/run.rs`: reused within the second, they are not faulted in again), and the
///   1 MiB of empty slabs each thread heap keeps;
/// - the executable and shared libraries, and the touched part of about a dozen thread
///   stacks: a few MiB (more for an unoptimised test build);
/// - the allocator's metadata (segment headers, slab tails, page maps) and the touched
///   slots of the beancounter and stock tables: well under 1 MiB here;
/// - the host's own heap in the root beancounter (request buffers, the clients' latency
///   samples, reports): under 1 MiB.
const RSS_OVERHEAD: u64 = 80 << 20;

/// Bytes a tenant may still hold once every request is over ("about nothing"): room for
/// per-thread state that a worker might create lazily while serving a tenant, which would
/// stay charged to it until the worker exits. The demo measures 0 today.
const SETTLED_SLACK: u64 = 4 << 10;

// ---- config ----------------------------------------------------------------------------

/// One tenant line of the config.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TenantConf {
    name: String,
    id: BcId,
    limits: Limits,
}

/// A config error, with the line it is on.
#[derive(Debug)]
struct ConfigError {
    line: usize,
    msg: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config line {}: {}", self.line, self.msg)
    }
}

/// `8M`, `512K`, `1G` or plain bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_config(text: &str) -> Result<Vec<TenantConf>, ConfigError> {
    let mut tenants: Vec<TenantConf> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |msg: String| ConfigError { line, msg };
        let words: Vec<&str> = raw
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let (name, id, barrier, limit) = match words[..] {
            [] => continue,
            ["tenant", name, id, barrier, limit] => (name, id, barrier, limit),
            ["tenant", ..] => {
                return Err(err("expected `tenant <name> <id> <barrier> <limit>`".into()))
            }
            [word, ..] => return Err(err(format!("unknown directive `{word}`"))),
        };
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err(format!(
                "tenant name `{name}`: use letters, digits, `-`, `_`"
            )));
        }
        let id = match id.parse::<u32>() {
            Ok(0) => return Err(err("id 0 is the root beancounter, not a tenant".into())),
            Ok(n) => BcId(n),
            Err(_) => return Err(err(format!("id `{id}` is not a number"))),
        };
        let size = |s: &str| {
            parse_size(s).ok_or_else(|| err(format!("size `{s}`: use bytes or a K/M/G suffix")))
        };
        let (barrier, limit) = (size(barrier)?, size(limit)?);
        let limits = Limits::new(barrier, limit).map_err(|e: BcError| err(e.to_string()))?;
        if limit < barrier.saturating_add(HANDLER_SLACK) {
            return Err(err(format!(
                "limit {limit} must be at least barrier + {HANDLER_SLACK}: handlers' ordinary \
                 allocations run above the barrier, and one that reached the limit would abort"
            )));
        }
        if let Some(other) = tenants.iter().find(|t| t.name == name || t.id == id) {
            return Err(err(format!(
                "tenant `{name}` ({id}) clashes with `{}` ({})",
                other.name, other.id
            )));
        }
        tenants.push(TenantConf {
            name: name.to_string(),
            id,
            limits,
        });
    }
    if tenants.is_empty() {
        return Err(ConfigError {
            line: 0,
            msg: "no tenants".into(),
        });
    }
    Ok(tenants)
}

// ---- tenants -----------------------------------------------------------------------------

/// A tenant as the server knows it.
struct Tenant {
    name: String,
    bc: Beancounter,
}

/// The tenants the server serves, by name.
#[derive(Default)]
struct Tenants {
    by_name: HashMap<String, Arc<Tenant>>,
}

/// The server's tenant table: read by the layer and the handlers for every request, replaced
/// whole by whoever applies a new config.
type SharedTenants = Arc<RwLock<Tenants>>;

impl Tenants {
    /// Creates (or finds) each tenant's beancounter and sets its memory limits.
    fn from_config(conf: &[TenantConf]) -> Result<Tenants, BcError> {
        let mut by_name = HashMap::new();
        for c in conf {
            let bc = beancounter::find_or_create(c.id)?;
            bc.set_limits(Resource::Memory, c.limits)?;
            let tenant = Tenant {
                name: c.name.clone(),
                bc,
            };
            by_name.insert(c.name.clone(), Arc::new(tenant));
        }
        Ok(Tenants { by_name })
    }

    fn get(&self, name: &str) -> Option<Arc<Tenant>> {
        self.by_name.get(name).cloned()
    }

    /// Every tenant, by name.
    fn all(&self) -> Vec<Arc<Tenant>> {
        let mut all: Vec<Arc<Tenant>> = self.by_name.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// What a reload changed, by tenant name.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reloaded {
    created: Vec<String>,
    changed: Vec<String>,
    retired: Vec<String>,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "created {:?}, limits changed {:?}, retired {:?}",
            self.created, self.changed, self.retired
        )
    }
}

/// Applies a new config to the served table, as an operator's `SIGHUP` asks. A tenant is
/// its id (a line may rename it): ids new to the config are created, kept ids get the
/// config's limits (`set_limits`, the seed's `set_bclimit`; limits below what a tenant
/// holds stop its new requests, nothing is taken away), and ids no longer in the config
/// are retired once the new table is in place, so no new request finds them. What a
/// retired tenant still holds is charged to the host until it is freed; requests of its
/// still in flight finish there.
///
/// All or nothing: if a tenant cannot be created (the table is full), those created so far
/// are retired again and the served table and every limit stay as they were.
fn reload(tenants: &SharedTenants, conf: &[TenantConf]) -> Result<Reloaded, BcError> {
    let mut done = Reloaded::default();
    let old = read(tenants).by_name.clone();
    let kept = |id: BcId| old.values().find(|t| t.bc.id() == id);
    let mut created = Vec::new();
    for c in conf.iter().filter(|c| kept(c.id).is_none()) {
        match beancounter::find_or_create(c.id) {
            Ok(bc) => created.push((c, bc)),
            Err(e) => {
                for (_, bc) in created {
                    // Just created by this reload and never served: nothing refers to it.
                    let _ = bc.retire();
                }
                return Err(e);
            }
        }
    }
    let mut by_name = HashMap::new();
    for c in conf {
        let bc = match kept(c.id) {
            Some(t) => {
                let s = t.bc.stat(Resource::Memory);
                if (s.barrier, s.limit) != (c.limits.barrier, c.limits.limit) {
                    done.changed.push(c.name.clone());
                }
                t.bc.clone()
            }
            None => {
                done.created.push(c.name.clone());
                let at = created.iter().position(|(n, _)| n.id == c.id);
                created.swap_remove(at.expect("created above")).1
            }
        };
        // Limits from a parsed config are valid, and a live tenant takes any valid ones.
        bc.set_limits(Resource::Memory, c.limits)?;
        let tenant = Tenant {
            name: c.name.clone(),
            bc,
        };
        by_name.insert(c.name.clone(), Arc::new(tenant));
    }
    let gone: Vec<Arc<Tenant>> = old
        .into_values()
        .filter(|t| conf.iter().all(|c| c.id != t.bc.id()))
        .collect();
    *tenants.write().unwrap_or_else(|e| e.into_inner()) = Tenants { by_name };
    for t in gone {
        done.retired.push(t.name.clone());
        t.bc.clone().retire()?;
    }
    done.created.sort();
    done.changed.sort();
    done.retired.sort();
    Ok(done)
}

/// The tenant table, for reading.
fn read(tenants: &SharedTenants) -> std::sync::RwLockReadGuard<'_, Tenants> {
    // A panic while the table was written cannot leave it half-built (it is swapped whole).
    tenants.read().unwrap_or_else(|e| e.into_inner())
}

// ---- the server --------------------------------------------------------------------------

/// The layer's pick: `/t/<tenant>/work` runs in that tenant's beancounter; everything else
/// (reports, the dashboard and its profiles, unknown tenants, other paths) in the host.
fn tenant_of(tenants: &SharedTenants, req: &Request<Body>) -> Option<Beancounter> {
    let name = req
        .uri()
        .path()
        .strip_prefix("/t/")?
        .strip_suffix("/work")?;
    read(tenants).get(name).map(|t| t.bc.clone())
}

/// The tenants as the dashboard lists them, by name.
fn listed(tenants: &SharedTenants) -> Vec<Listed> {
    let all = read(tenants).all();
    all.iter()
        .map(|t| Listed {
            name: t.name.clone(),
            bc: t.bc.clone(),
        })
        .collect()
}

/// The layer's answer to a request of a tenant already over its barrier.
fn over_barrier(e: Exceeded) -> Response {
    let body = format!("tenant {} is over its barrier: {e}\n", e.id);
    (StatusCode::INSUFFICIENT_STORAGE, body).into_response()
}

/// The value of `key` in a query string.
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `/t/<tenant>/work?kib=N`: builds an N KiB document for the tenant. The layer runs this
/// inside the tenant's beancounter.
async fn work(
    State(tenants): State<SharedTenants>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> (StatusCode, String) {
    let Some(tenant) = read(&tenants).get(&name) else {
        return (StatusCode::NOT_FOUND, format!("no tenant `{name}`\n"));
    };
    let kib = match query_param(query.as_deref().unwrap_or(""), "kib").map(str::parse::<u64>) {
        Some(Ok(k)) if (1..=MAX_KIB).contains(&k) => k,
        _ => {
            let msg = format!("work needs kib=N with N in 1..={MAX_KIB}\n");
            return (StatusCode::BAD_REQUEST, msg);
        }
    };
    debug_assert_eq!(
        beancounter::current_id(),
        tenant.bc.id(),
        "the layer's tenant"
    );
    let bytes = (kib << 10) as usize;
    let Some(doc) = build_document(&tenant.name, bytes) else {
        let s = tenant.bc.stat(Resource::Memory);
        let msg = format!(
            "tenant {}: {bytes} bytes refused: held {} + {bytes} > barrier {} (failcnt {})\n",
            tenant.name, s.held, s.barrier, s.failcnt
        );
        return (StatusCode::INSUFFICIENT_STORAGE, msg);
    };
    let msg = format!("tenant {} built {} KiB\n", tenant.name, doc.len() >> 10);
    (StatusCode::OK, msg)
}

/// Builds tenant `name`'s document of `bytes` bytes in the current tenant; `None` when its
/// barrier refuses it. Never inlined, so that heap profiles name it: it is where a tenant's
/// documents, and a noisy tenant's noise, come from.
#[inline(never)]
fn build_document(name: &str, bytes: usize) -> Option<Vec<u8>> {
    let mut doc: Vec<u8> = Vec::new();
    // Tenant-sized, so checked against the barrier: refused gracefully, never an abort.
    beancounter::fallible(|| doc.try_reserve_exact(bytes)).ok()?;
    // Fill it (touching every page, as a real document would: RSS shows what was granted).
    let page = format!("{name} says hello\n").repeat(256);
    while doc.len() < bytes {
        let n = page.len().min(bytes - doc.len());
        doc.extend_from_slice(&page.as_bytes()[..n]);
    }
    Some(doc)
}

/// `/beancounters`: the `/proc/user_beancounters` table.
async fn beancounters() -> String {
    beancounter::report::user_beancounters()
}

/// `/metrics`: the Prometheus text format.
async fn metrics() -> impl IntoResponse {
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (content_type, beancounter::report::prometheus())
}

/// Any other path.
async fn not_found() -> (StatusCode, &'static str) {
    let msg = "try /, /t/<tenant>/work?kib=N, /beancounters, /metrics\n";
    (StatusCode::NOT_FOUND, msg)
}

/// The routes, the dashboard's included, with every request run in the tenant
/// [`tenant_of`] picks.
fn app(tenants: SharedTenants, dashboard: &Arc<Dashboard>) -> Router {
    let pick = {
        let tenants = tenants.clone();
        move |req: &Request<Body>| tenant_of(&tenants, req)
    };
    Router::new()
        .route("/t/{tenant}/work", get(work))
        .route("/beancounters", get(beancounters))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(tenants)
        .merge(dashboard.router())
        .layer(TenantLayer::new(pick).refuse_with(over_barrier))
}

/// Where a `SIGHUP` reloads the config from, and who is told what each reload did.
struct ReloadFrom {
    path: std::path::PathBuf,
    told: Option<std::sync::mpsc::Sender<Result<Reloaded, String>>>,
}

/// Reads, checks and applies the config at `path`; a bad file changes nothing.
fn reload_file(tenants: &SharedTenants, path: &std::path::Path) -> Result<Reloaded, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let conf = parse_config(&text).map_err(|e| e.to_string())?;
    reload(tenants, &conf).map_err(|e| e.to_string())
}

/// The server's `SIGHUP` handler: each hangup reloads the config file.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    tenants: SharedTenants,
    from: ReloadFrom,
) {
    while hangups.recv().await.is_some() {
        let done = reload_file(&tenants, &from.path);
        match &done {
            Ok(r) => println!("tenant_server: reloaded {}: {r}", from.path.display()),
            Err(e) => eprintln!(
                "tenant_server: {}: {e}; the tenants stay as they were",
                from.path.display()
            ),
        }
        if let Some(told) = &from.told {
            let _ = told.send(done);
        }
    }
}

/// A running server: axum on a tokio runtime of [`WORKERS`] worker threads, and the
/// dashboard's sampler.
struct Server {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<io::Result<()>>,
}

impl Server {
    /// Serves `tenants` on `listener`, and the dashboard of whatever the table holds; with
    /// `reload`, a `SIGHUP` to the process reloads the config from its file (see [`reload`]).
    fn start(
        listener: TcpListener,
        tenants: SharedTenants,
        reload: Option<ReloadFrom>,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("tenant-server")
            .enable_io()
            .enable_time()
            .build()?;
        let dashboard = {
            let tenants = tenants.clone();
            Dashboard::new(move || listed(&tenants))
        };
        runtime.spawn(dashboard.clone().keep_sampling());
        if let Some(from) = reload {
            let hangups = {
                let _in = runtime.enter();
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?
            };
            runtime.spawn(reload_on_hangup(hangups, tenants.clone(), from));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app(tenants, &dashboard))
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Server {
            addr,
            runtime,
            stop,
            serving,
        })
    }

    /// Serves until the server fails.
    fn wait(self) -> io::Result<()> {
        // Holding `stop`: dropping it would end the server like sending on it.
        let Server {
            runtime,
            stop: _stop,
            serving,
            ..
        } = self;
        runtime.block_on(serving).map_err(io::Error::other)?
    }

    /// Stops accepting, lets the connections finish what they have and close, and joins
    /// every worker.
    fn shutdown(self) -> io::Result<()> {
        let _ = self.stop.send(());
        let served = self.runtime.block_on(self.serving);
        drop(self.runtime);
        served.map_err(io::Error::other)?
    }
}

// ---- main --------------------------------------------------------------------------------

struct Args {
    demo: bool,
    profile: bool,
    port: u16,
    config: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        demo: false,
        profile: false,
        port: 8080,
        config: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--demo" => args.demo = true,
            "--profile" => args.profile = true,
            "--port" => {
                args.port = it
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or("--port needs a port number")?
            }
            "--config" => args.config = Some(it.next().ok_or("--config needs a file")?),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

fn run() -> Result<(), String> {
    let args = parse_args().map_err(|e| {
        format!("{e}\nusage: tenant_server [--demo] [--port N] [--config FILE] [--profile]")
    })?;
    let (source, text) = match &args.config {
        Some(path) => (
            path.as_str(),
            std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        ),
        None => ("default config", DEFAULT_CONFIG.to_string()),
    };
    let conf = parse_config(&text).map_err(|e| format!("{source}: {e}"))?;
    if args.demo {
        let failed = run_demo(&conf, &DemoSize::FULL)?;
        return match failed.is_empty() {
            true => Ok(()),
            false => Err(format!("--demo FAILED: {}", failed.join("; "))),
        };
    }
    if args.profile {
        profile::start(profile::DEFAULT_SAMPLE_BYTES).map_err(|e| format!("--profile: {e}"))?;
    }
    let tenants = Tenants::from_config(&conf).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind(("127.0.0.1", args.port)).map_err(|e| e.to_string())?;
    let reload = args.config.as_ref().map(|path| ReloadFrom {
        path: path.into(),
        told: None,
    });
    let server = Server::start(listener, Arc::new(RwLock::new(tenants)), reload)
        .map_err(|e| e.to_string())?;
    let (a, t) = (server.addr, &conf[0]);
    println!(
        "tenant_server on http://{a}/ with {} tenants (the dashboard; heap profiles {}); try:",
        conf.len(),
        if args.profile { "on" } else { "off: --profile" }
    );
    println!("  curl -i 'http://{a}/t/{}/work?kib=256'", t.name);
    println!(
        "  curl -i 'http://{a}/t/{}/work?kib={}'   # over its barrier: 507",
        t.name,
        (t.limits.barrier >> 10) * 2
    );
    println!("  curl http://{a}/beancounters");
    println!("  curl -i http://{a}/metrics");
    if let Some(path) = &args.config {
        println!(
            "  kill -HUP {}   # reloads {path}: new tenants, new limits, removed ones retired",
            std::process::id()
        );
    }
    server.wait().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenant_server: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short demo, with every check of the full one.
    #[test]
    fn demo() {
        let failed = run_demo(&parse_config(DEFAULT_CONFIG).unwrap(), &DemoSize::SHORT).unwrap();
        assert!(failed.is_empty(), "{failed:#?}");
    }

    /// A reload from a bad file changes nothing; a good one creates, changes and retires by
    /// id. (A reload that cannot create a tenant is not tried here: filling the table in a
    /// test binary would starve the demo running beside it.)
    #[test]
    fn reload_is_all_or_nothing() {
        let conf = parse_config("tenant x 901 1M 2M\ntenant y 902 1M 2M\n").unwrap();
        let tenants: SharedTenants = Arc::new(RwLock::new(Tenants::from_config(&conf).unwrap()));
        let names = |t: &SharedTenants| {
            read(t)
                .all()
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>()
        };
        let path =
            std::env::temp_dir().join(format!("tenant_server-test-{}.conf", std::process::id()));
        assert!(reload_file(&tenants, &path).is_err(), "no such file");
        std::fs::write(&path, "tenant x 901 1M 2M\ntenant z 903 8M 4M\n").unwrap();
        let e = reload_file(&tenants, &path).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert_eq!(names(&tenants), ["x", "y"]);
        assert!(beancounter::lookup(BcId(903)).is_none());
        std::fs::write(&path, "tenant x 901 3M 5M\ntenant z 903 1M 2M\n").unwrap();
        let done = reload_file(&tenants, &path).unwrap();
        assert_eq!(
            done,
            Reloaded {
                created: vec!["z".into()],
                changed: vec!["x".into()],
                retired: vec!["y".into()],
            }
        );
        assert_eq!(names(&tenants), ["x", "z"]);
        assert!(beancounter::lookup(BcId(902)).is_none());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn config_errors_name_the_line() {
        let bad_limits = parse_config("tenant a 1 1M 2M\ntenant b 2 8M 4M\n").unwrap_err();
        assert_eq!(bad_limits.line, 2);
        let shown = BcError::InvalidLimits {
            barrier: 8 << 20,
            limit: 4 << 20,
        }
        .to_string();
        assert!(bad_limits.to_string().ends_with(&shown), "{bad_limits}");
        for (text, line, words) in [
            ("tenant a 1 8M 8M", 1, "abort"),
            ("\n# c\ntenant a 0 1M 2M", 3, "root"),
            ("tenant a 1 1X 2M", 1, "size `1X`"),
            ("tenant a 1 1M 2M\ntenant a 2 1M 2M", 2, "clashes"),
            ("tenants a 1 1M 2M", 1, "unknown directive"),
            ("tenant a 1 1M", 1, "expected"),
            ("# nothing", 0, "no tenants"),
        ] {
            let e = parse_config(text).unwrap_err();
            assert!(e.line == line && e.msg.contains(words), "{text:?}: {e}");
        }
        assert_eq!(parse_size("3K"), Some(3 << 10));
        assert_eq!(parse_config(DEFAULT_CONFIG).unwrap().len(), 4);
    }
}
