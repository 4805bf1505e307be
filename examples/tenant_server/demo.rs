//! The demo (`--demo`): starts the server, drives it with well-behaved and noisy clients,
//! reloads its config, reads the dashboard and the noisy tenant's heap profile, and checks
//! every figure against the server's own accounting. See the crate's docs in `main.rs`.

use super::*;

/// How hard the demo drives the server.
pub(crate) struct DemoSize {
    /// Requests per well-behaved tenant in each phase.
    requests: u64,
    /// Client threads of the noisy tenant.
    noisy_clients: usize,
}

impl DemoSize {
    pub(crate) const FULL: DemoSize = DemoSize {
        requests: 1500,
        noisy_clients: 2,
    };
    #[cfg(test)]
    pub(crate) const SHORT: DemoSize = DemoSize {
        requests: 150,
        noisy_clients: 2,
    };
}

/// An HTTP client for the server on loopback: answers of every status are answers (not
/// errors), and no proxy from the environment is ever used.
fn client() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build();
    ureq::Agent::new_with_config(config)
}

/// One answer: status, `Content-Type`, body.
type Answer = (u16, String, String);

/// `GET path` from the server at `addr`.
fn fetch(agent: &ureq::Agent, addr: SocketAddr, path: &str) -> Result<Answer, ureq::Error> {
    let (status, content_type, body) = fetch_bytes(agent, addr, path)?;
    Ok((
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// `GET path` from the server at `addr`, the body as bytes.
fn fetch_bytes(
    agent: &ureq::Agent,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String, Vec<u8>), ureq::Error> {
    let mut response = agent.get(format!("http://{addr}{path}")).call()?;
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = response.body_mut().read_to_vec()?;
    Ok((response.status().as_u16(), content_type, body))
}

/// Answers and latencies the clients of one phase saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    refused: u64,
    /// Requests that asked for more than the tenant's barrier.
    oversized: u64,
    /// Any answer but 200 and 507, and client errors.
    other: Vec<String>,
    latencies: Vec<Duration>,
}

impl Tally {
    /// Sends one work request and records how it went.
    fn request(&mut self, agent: &ureq::Agent, addr: SocketAddr, tenant: &TenantConf, kib: u64) {
        self.oversized += u64::from(kib << 10 > tenant.limits.barrier);
        let started = Instant::now();
        let answer = fetch(agent, addr, &format!("/t/{}/work?kib={kib}", tenant.name));
        self.latencies.push(started.elapsed());
        match answer {
            Ok((200, ..)) => self.ok += 1,
            Ok((507, ..)) => self.refused += 1,
            Ok((status, _, body)) => self.other.push(format!("{status}: {}", body.trim())),
            Err(e) => self.other.push(e.to_string()),
        }
    }

    fn merge(mut self, other: Tally) -> Tally {
        self.ok += other.ok;
        self.refused += other.refused;
        self.oversized += other.oversized;
        self.other.extend(other.other);
        self.latencies.extend(other.latencies);
        self
    }

    /// (p50, p99) in microseconds.
    fn percentiles(&mut self) -> (u128, u128) {
        self.latencies.sort_unstable();
        let n = self.latencies.len();
        let at = |q: usize| self.latencies.get((n * q / 100).min(n.saturating_sub(1)));
        let us = |d: Option<&Duration>| d.map_or(0, Duration::as_micros);
        (us(at(50)), us(at(99)))
    }
}

/// Runs one client thread per tenant, each with its own HTTP client (one keep-alive
/// connection), sending work requests of the sizes `sizes(i)` for `i = 0, 1, ...` until
/// `go_on(i)` is false; returns what they all saw.
fn clients(
    addr: SocketAddr,
    tenants: &[TenantConf],
    sizes: impl Fn(&TenantConf, u64) -> u64 + Clone + Send + 'static,
    go_on: impl Fn(u64) -> bool + Clone + Send + 'static,
) -> JoinHandle<Tally> {
    let handles: Vec<JoinHandle<Tally>> = tenants
        .iter()
        .cloned()
        .map(|t| {
            let (sizes, go_on) = (sizes.clone(), go_on.clone());
            std::thread::spawn(move || {
                let (agent, mut tally) = (client(), Tally::default());
                let mut i = 0;
                while go_on(i) {
                    tally.request(&agent, addr, &t, sizes(&t, i));
                    i += 1;
                }
                tally
            })
        })
        .collect();
    std::thread::spawn(move || {
        handles.into_iter().fold(Tally::default(), |all, h| {
            all.merge(h.join().unwrap_or_default())
        })
    })
}

/// A `/proc/self/status` field in bytes (`VmRSS:`, `VmHWM:`).
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()
    });
    kib.unwrap_or(0) << 10
}

/// The `failcnt` of beancounter `id`'s memory in a `/proc/user_beancounters` table.
fn table_failcnt(table: &str, id: BcId) -> Option<u64> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.nth(1)?.split_whitespace().collect();
    let columns = [
        "uid", "resource", "held", "maxheld", "barrier", "limit", "failcnt",
    ];
    if !table.starts_with("Version: 2.5\n") || header != columns {
        return None;
    }
    let row = lines.find(|l| l.trim_start().starts_with(&format!("{id}: memory ")))?;
    row.split_whitespace().last()?.parse().ok()
}

/// The `failcnt` of beancounter `id`'s memory in Prometheus text.
fn metrics_failcnt(text: &str, id: BcId) -> Option<u64> {
    let key = format!("beancounter_failcnt_total{{id=\"{id}\",resource=\"memory\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key)?.parse().ok())
}

/// The function whose documents make the noisy tenant's heap: its flamegraph must name it.
const BUILDER: &str = "build_document";

/// What the demo saw of the noisy tenant's heap profile while it was loud.
struct HeapSeen {
    /// The last `/t/<id>/heap.svg` (status, `Content-Type`, body): the first that named
    /// [`BUILDER`], if any did.
    svg: Answer,
    /// `/t/<id>/heap.pb.gz`: status, `Content-Type`, body.
    pprof: (u16, String, Vec<u8>),
}

/// How long the demo reads the noisy tenant's flamegraph, waiting for it to name
/// [`BUILDER`]: with the sampler working, the first read does, unless it caught the tenant
/// between documents; the first read of a debug build spends about a second on debug info.
const HEAP_LOOK: Duration = Duration::from_secs(10);

/// Reads tenant `id`'s flamegraph, as an operator would from the dashboard, every 50 ms
/// until it names [`BUILDER`] or [`HEAP_LOOK`] has passed; then its pprof profile; then
/// sets `done` (the noisy clients keep going until then, so that what is read is a loud
/// tenant's heap).
fn look_at_heap(addr: SocketAddr, id: BcId, done: Arc<AtomicBool>) -> JoinHandle<HeapSeen> {
    std::thread::spawn(move || {
        let (agent, started) = (client(), Instant::now());
        let failed = |e: ureq::Error| (0, String::new(), e.to_string());
        let svg_path = format!("/t/{id}/heap.svg");
        let mut svg = fetch(&agent, addr, &svg_path).unwrap_or_else(failed);
        while !svg.2.contains(BUILDER) && started.elapsed() < HEAP_LOOK {
            std::thread::sleep(Duration::from_millis(50));
            svg = fetch(&agent, addr, &svg_path).unwrap_or_else(failed);
        }
        let pprof = fetch_bytes(&agent, addr, &format!("/t/{id}/heap.pb.gz"))
            .unwrap_or_else(|e| (0, e.to_string(), Vec::new()));
        done.store(true, Ordering::Relaxed);
        HeapSeen { svg, pprof }
    })
}

/// What the demo measured, and the server's reports once every request was over.
struct Measured {
    quiet: Tally,
    loud: Tally,
    noisy: Tally,
    elapsed: Duration,
    sampled_rss: u64,
    beancounters: Answer,
    metrics: Answer,
    /// The noisy tenant's heap profile, read while it was loud.
    heap: HeapSeen,
    /// `/api/tenants` and `/` once every request was over.
    api: Answer,
    page: Answer,
    /// Per tenant: name, then `stat()` of memory and allocations once idle.
    settled: Vec<(String, ResourceStat, ResourceStat)>,
    /// The checks of the reload (`demo_reload`).
    reload: Vec<(bool, String)>,
}

/// Runs the server and the two phases: the well-behaved tenants alone, then with the noisy
/// one asking for an 8th and 3/8 of its barrier (granted) and 16 times its barrier
/// (refused), in turn, on `noisy_clients` connections at a time.
fn drive(conf: &[TenantConf], noisy: &TenantConf, size: &DemoSize) -> Result<Measured, String> {
    let tenants = Tenants::from_config(conf).map_err(|e| e.to_string())?;
    let tenants: SharedTenants = Arc::new(RwLock::new(tenants));
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    // The config a SIGHUP will load, written just before the demo sends it.
    let reload_path =
        std::env::temp_dir().join(format!("tenant_server-{}.conf", std::process::id()));
    let (told, reloads) = std::sync::mpsc::channel();
    let from = ReloadFrom {
        path: reload_path.clone(),
        told: Some(told),
    };
    let server = Server::start(listener, tenants.clone(), Some(from)).map_err(|e| e.to_string())?;
    let addr = server.addr;
    println!(
        "tenant_server on {addr}, {WORKERS} workers, {} tenants",
        conf.len()
    );

    let running = Arc::new(AtomicBool::new(true));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (running, peak_rss) = (running.clone(), peak_rss.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                peak_rss.fetch_max(proc_status_bytes("VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let calm: Vec<TenantConf> = conf.iter().filter(|t| t.id != noisy.id).cloned().collect();
    // Documents of a 32nd to an 8th of the barrier: never near it.
    let calm_sizes = |t: &TenantConf, i: u64| ((t.limits.barrier >> 15) * (1 + i % 4)).max(1);
    let requests = size.requests;
    let started = Instant::now();
    let quiet = clients(addr, &calm, calm_sizes, move |i| i < requests).join();

    let noisy_sizes =
        |t: &TenantConf, i: u64| [1, 3, 128][i as usize % 3] * (t.limits.barrier >> 13);
    // Each noisy client sends at least one oversized request, however slow the machine, and
    // goes on until the well-behaved clients are done and its heap has been read.
    let heap_read = Arc::new(AtomicBool::new(false));
    let go_on = {
        let (running, heap_read) = (running.clone(), heap_read.clone());
        move |i| i < 3 || running.load(Ordering::Relaxed) || !heap_read.load(Ordering::Relaxed)
    };
    let loud_noisy = vec![noisy.clone(); size.noisy_clients];
    let noisy_tally = clients(addr, &loud_noisy, noisy_sizes, go_on);
    let heap = look_at_heap(addr, noisy.id, heap_read);
    let loud = clients(addr, &calm, calm_sizes, move |i| i < requests).join();
    running.store(false, Ordering::Relaxed);
    let noisy_tally = noisy_tally.join();
    let heap = heap.join().map_err(|_| "the heap reader panicked")?;
    let elapsed = started.elapsed();
    let _ = sampler.join();

    // Every request is answered: what does the server report?
    let agent = client();
    let beancounters = fetch(&agent, addr, "/beancounters").map_err(|e| e.to_string())?;
    let metrics = fetch(&agent, addr, "/metrics").map_err(|e| e.to_string())?;
    let api = fetch(&agent, addr, "/api/tenants").map_err(|e| e.to_string())?;
    let page = fetch(&agent, addr, "/").map_err(|e| e.to_string())?;
    let reload = demo_reload(&agent, addr, conf, &reload_path, &reloads);
    let _ = std::fs::remove_file(&reload_path);
    drop(agent);
    // Once every connection is closed (the server waits for them) and its workers are gone,
    // what does each tenant still hold?
    server
        .shutdown()
        .map_err(|e| format!("the server failed: {e}"))?;
    let settled = read(&tenants)
        .all()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.bc.stat(Resource::Memory),
                t.bc.stat(Resource::Allocations),
            )
        })
        .collect();
    let joined =
        |t: std::thread::Result<Tally>| t.map_err(|_| "a client thread panicked".to_string());
    Ok(Measured {
        quiet: joined(quiet)?,
        loud: joined(loud)?,
        noisy: joined(noisy_tally)?,
        elapsed,
        sampled_rss: peak_rss.load(Ordering::Relaxed),
        beancounters,
        metrics,
        heap,
        api,
        page,
        settled,
        reload: reload?,
    })
}

/// The config as text, one `tenant` line each.
fn config_text(conf: &[TenantConf]) -> String {
    conf.iter()
        .map(|t| {
            let (b, l) = (t.limits.barrier, t.limits.limit);
            format!("tenant {} {} {b} {l}\n", t.name, t.id.0)
        })
        .collect()
}

/// An operator's reload, as the demo's last step: the first tenant's barrier doubles, the
/// third is removed, `dave` is added; the new config is written to `path` and the process
/// sends itself `SIGHUP`. Returns what was checked, as `(ok, what)`.
fn demo_reload(
    agent: &ureq::Agent,
    addr: SocketAddr,
    conf: &[TenantConf],
    path: &std::path::Path,
    reloads: &std::sync::mpsc::Receiver<Result<Reloaded, String>>,
) -> Result<Vec<(bool, String)>, String> {
    let [first, _, removed, ..] = conf else {
        return Err("the demo's reload needs at least three tenants".into());
    };
    let mut next: Vec<TenantConf> = conf
        .iter()
        .filter(|t| t.id != removed.id)
        .cloned()
        .collect();
    let b = first.limits.barrier * 2;
    next[0].limits = Limits::new(b, b + (first.limits.limit - first.limits.barrier))
        .map_err(|e| e.to_string())?;
    let free_id = (1..)
        .map(BcId)
        .find(|id| conf.iter().all(|t| t.id != *id))
        .unwrap();
    next.push(TenantConf {
        name: "dave".into(),
        id: free_id,
        limits: first.limits,
    });
    std::fs::write(path, config_text(&next)).map_err(|e| e.to_string())?;
    // SAFETY: raise only delivers a signal; the server's handler takes SIGHUP.
    unsafe { libc::raise(libc::SIGHUP) };
    let done = reloads
        .recv_timeout(Duration::from_secs(10))
        .map_err(|e| format!("no reload after SIGHUP: {e}"))?;
    let want = Reloaded {
        created: vec!["dave".into()],
        changed: vec![first.name.clone()],
        retired: vec![removed.name.clone()],
    };
    println!(
        "SIGHUP reload: {}",
        done.as_ref().map_or_else(|e| e.clone(), |r| r.to_string())
    );
    let status = |path: &str| fetch(agent, addr, path).map_or(0, |a| a.0);
    let gone = status(&format!("/t/{}/work?kib=1", removed.name));
    let added = status("/t/dave/work?kib=64");
    let table = fetch(agent, addr, "/beancounters")
        .map_err(|e| e.to_string())?
        .2;
    let listed = |id: BcId| table_failcnt(&table, id).is_some();
    let barrier = beancounter::lookup(first.id).map(|t| t.stat(Resource::Memory).barrier);
    Ok(vec![
        (
            done.as_ref() == Ok(&want),
            format!("SIGHUP reload {done:?} == {want:?}"),
        ),
        (
            gone == 404 && beancounter::lookup(removed.id).is_none() && !listed(removed.id),
            format!(
                "retired `{}`: 404 ({gone}), gone from lookup and /beancounters",
                removed.name
            ),
        ),
        (
            added == 200 && listed(free_id),
            format!("new `dave`: 200 ({added}), listed in /beancounters"),
        ),
        (
            barrier == Some(b),
            format!("`{}`'s barrier is now {b} ({barrier:?})", first.name),
        ),
    ])
}

/// The host draws flamegraphs by resolving sampled addresses to names; the first time, the
/// symbolizer reads the executable's symbol table and debug info into memory: host memory,
/// nothing a tenant allocated (about 40 MiB for this example's release build, which
/// carries std's debug info, and more for an unoptimised build). Loads it
/// now, before any tenant runs, and returns the resident bytes it took, which the RSS bound
/// then states on its own line.
fn warm_symbolizer() -> u64 {
    let before = proc_status_bytes("VmRSS:");
    // A reservation this large is sampled (one byte in 512 Ki is a sample point) without
    // touching its pages; its stack is then resolved like any flamegraph's.
    let reserved: Vec<u8> = Vec::with_capacity(64 << 20);
    let resolved = profile::heap(BcId::ROOT).map(|p| p.samples());
    drop(reserved);
    let after = proc_status_bytes("VmRSS:");
    println!(
        "symbolizer loaded ({resolved:?} root samples resolved): {} KiB resident",
        after.saturating_sub(before) >> 10
    );
    after.saturating_sub(before)
}

/// Runs the demo, prints what it measured and checked; `Ok` holds the failed checks.
pub(crate) fn run_demo(conf: &[TenantConf], size: &DemoSize) -> Result<Vec<String>, String> {
    let noisy = conf
        .iter()
        .find(|t| t.name == "noisy")
        .ok_or("the demo needs a tenant named `noisy`")?;
    profile::start(profile::DEFAULT_SAMPLE_BYTES).map_err(|e| format!("profile::start: {e}"))?;
    let symbols = warm_symbolizer();
    let mut m = drive(conf, noisy, size)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let (q50, q99) = m.quiet.percentiles();
    let (l50, l99) = m.loud.percentiles();
    let (n50, n99) = m.noisy.percentiles();
    let total = m.quiet.latencies.len() + m.loud.latencies.len() + m.noisy.latencies.len();
    println!("{total} requests in {:.2} s", m.elapsed.as_secs_f64());
    println!(
        "well-behaved tenants, {} requests per phase:",
        m.quiet.latencies.len()
    );
    println!(
        "  without noisy: p50 {q50:>6} us  p99 {q99:>6} us  refused {}",
        m.quiet.refused
    );
    println!(
        "  with noisy:    p50 {l50:>6} us  p99 {l99:>6} us  refused {}",
        m.loud.refused
    );
    let (ok, refused, oversized) = (m.noisy.ok, m.noisy.refused, m.noisy.oversized);
    let noisy_stat = m
        .settled
        .iter()
        .find(|s| s.0 == noisy.name)
        .map(|s| s.1)
        .unwrap_or_default();
    println!(
        "noisy: {} requests, {ok} served, {refused} refused with 507 ({oversized} asked for 16 x \
         its barrier of {:.0} MiB); failcnt {}, maxheld {:.1} MiB; p50 {n50} us  p99 {n99} us",
        m.noisy.latencies.len(),
        mib(noisy.limits.barrier),
        noisy_stat.failcnt,
        mib(noisy_stat.maxheld)
    );
    let limits: u64 = conf.iter().map(|t| t.limits.limit).sum();
    let (bound, hwm) = (limits + RSS_OVERHEAD + symbols, proc_status_bytes("VmHWM:"));
    println!(
        "RSS: peak {:.1} MiB (VmHWM; sampled VmRSS peak {:.1} MiB, now {:.1} MiB); bound {:.0} MiB \
         = limits {:.0} MiB + overhead {:.0} MiB \
         (up to 64 MiB of freed pages the allocator keeps for a second; binary, stacks, \
         allocator metadata, the beancounter table, the host's heap) \
         + the symbolizer's tables {:.1} MiB (measured)",
        mib(hwm),
        mib(m.sampled_rss),
        mib(proc_status_bytes("VmRSS:")),
        mib(bound),
        mib(limits),
        mib(RSS_OVERHEAD),
        mib(symbols),
    );
    for (name, mem, objs) in &m.settled {
        println!(
            "idle: {name:<8} holds {:>6} bytes in {} allocations",
            mem.held, objs.held
        );
    }
    let ((svg_status, _, svg), (pb_status, _, pb)) = (&m.heap.svg, &m.heap.pprof);
    println!(
        "noisy heap while loud: flamegraph {svg_status}, {} bytes, names {BUILDER}: {}; \
         pprof {pb_status}, {} bytes",
        svg.len(),
        svg.contains(BUILDER),
        pb.len()
    );

    let failcnt = noisy_stat.failcnt;
    let calm_failcnt: u64 = m
        .settled
        .iter()
        .filter(|s| s.0 != noisy.name)
        .map(|s| s.1.failcnt)
        .sum();
    let others: Vec<&String> = m
        .quiet
        .other
        .iter()
        .chain(&m.loud.other)
        .chain(&m.noisy.other)
        .collect();
    let (status, _, table) = &m.beancounters;
    let table_fc = table_failcnt(table, noisy.id).filter(|_| *status == 200);
    let (status, content_type, text) = &m.metrics;
    let metrics_fc = metrics_failcnt(text, noisy.id)
        .filter(|_| *status == 200 && content_type == "text/plain; version=0.0.4");
    let checks = [
        (refused > 0, format!("noisy refused {refused} > 0")),
        (
            refused == failcnt && refused == oversized,
            format!(
                "noisy refused {refused} == failcnt {failcnt} == oversized requests {oversized}"
            ),
        ),
        (
            m.quiet.refused + m.loud.refused == 0 && calm_failcnt == 0,
            format!(
                "well-behaved refused {}, failcnt {calm_failcnt}",
                m.quiet.refused + m.loud.refused
            ),
        ),
        (
            others.is_empty(),
            format!("no other answers or client errors {others:?}"),
        ),
        // Under AddressSanitizer (.ci/asan sets BEANCOUNTER_SANITIZER) RSS also counts the
        // sanitizer's shadow memory and quarantine, which this process cannot bound.
        match std::env::var_os("BEANCOUNTER_SANITIZER") {
            None => (hwm <= bound, format!("peak RSS {hwm} <= bound {bound}")),
            Some(_) => (
                true,
                format!("peak RSS {hwm} (bound {bound}) not checked under a sanitizer"),
            ),
        },
        (
            m.settled.iter().all(|s| s.1.held <= SETTLED_SLACK),
            format!("every tenant holds <= {SETTLED_SLACK} bytes when idle"),
        ),
        (
            table_fc == Some(failcnt),
            format!("GET /beancounters parses, noisy failcnt {table_fc:?}"),
        ),
        (
            metrics_fc == Some(failcnt),
            format!("GET /metrics parses, noisy failcnt {metrics_fc:?}"),
        ),
    ];
    let dashboard = dashboard_checks(&m, conf, noisy, failcnt);
    println!("checks:");
    let mut failed = Vec::new();
    for (ok, what) in checks
        .into_iter()
        .chain(dashboard)
        .chain(m.reload.drain(..))
    {
        println!("  [{}] {what}", if ok { "ok" } else { "FAIL" });
        if !ok {
            failed.push(what);
        }
    }
    Ok(failed)
}

/// The dashboard's checks: the noisy tenant's flamegraph and pprof profile as read while it
/// was loud, then `/api/tenants` and `/` once every request was over.
fn dashboard_checks(
    m: &Measured,
    conf: &[TenantConf],
    noisy: &TenantConf,
    failcnt: u64,
) -> Vec<(bool, String)> {
    let id = noisy.id;
    let (status, content_type, svg) = &m.heap.svg;
    let named = *status == 200 && content_type == "image/svg+xml" && svg.contains(BUILDER);
    let (pb_status, pb_type, pb) = &m.heap.pprof;
    let gzip =
        *pb_status == 200 && pb_type == "application/octet-stream" && pb.starts_with(&[0x1f, 0x8b]);
    let api = api_agrees(&m.api, conf, noisy, failcnt);
    let (status, content_type, page) = &m.page;
    let elsewhere: Vec<&str> = ["<link", "src=", "url(", "@import"]
        .into_iter()
        .filter(|w| page.contains(w))
        .collect();
    let page_ok = *status == 200
        && content_type.starts_with("text/html")
        && page.contains("/api/tenants")
        && elsewhere.is_empty();
    vec![
        (
            named,
            format!("noisy flamegraph (GET /t/{id}/heap.svg while loud) names {BUILDER}"),
        ),
        (
            gzip,
            format!("GET /t/{id}/heap.pb.gz is gzip ({pb_status} {pb_type})"),
        ),
        (
            api.is_ok(),
            format!(
                "GET /api/tenants lists every tenant's bounds and history, noisy's failcnt and \
                 refusals {api:?}"
            ),
        ),
        (
            page_ok,
            format!("GET / is the dashboard and loads nothing else {elsewhere:?}"),
        ),
    ]
}

/// Does `/api/tenants` list every tenant of `conf` with its name and bounds and a history,
/// and the noisy tenant with its `failcnt` and some refusal among its events?
fn api_agrees(
    api: &Answer,
    conf: &[TenantConf],
    noisy: &TenantConf,
    failcnt: u64,
) -> Result<(), String> {
    let (status, content_type, body) = api;
    if (*status, content_type.as_str()) != (200, "application/json") {
        return Err(format!("{status} {content_type}"));
    }
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let tenants = json["tenants"].as_array().ok_or("no `tenants` array")?;
    if tenants.len() != conf.len() {
        return Err(format!("{} tenants, not {}", tenants.len(), conf.len()));
    }
    let find = |id: BcId| tenants.iter().find(|t| t["id"] == id.0);
    for c in conf {
        let t = find(c.id).ok_or_else(|| format!("no tenant {}", c.id))?;
        let shown = (
            t["name"].as_str(),
            t["barrier"].as_u64(),
            t["limit"].as_u64(),
        );
        let (b, l) = (c.limits.barrier, c.limits.limit);
        if shown != (Some(c.name.as_str()), Some(b), Some(l)) {
            return Err(format!("{} ({b}, {l}) shown as {shown:?}", c.name));
        }
        if t["history"].as_array().is_none_or(|h| h.is_empty()) {
            return Err(format!("{}: no history", c.name));
        }
    }
    let n = find(noisy.id).ok_or("no noisy tenant")?;
    if n["failcnt"].as_u64() != Some(failcnt) {
        return Err(format!("noisy failcnt {} != {failcnt}", n["failcnt"]));
    }
    let events = n["events"].as_array().map_or(&[][..], Vec::as_slice);
    let refused: u64 = events
        .iter()
        .filter_map(|e| e["counts"]["refused_at_barrier"].as_u64())
        .sum();
    if refused == 0 {
        return Err(format!("no refusal among noisy's events {events:?}"));
    }
    Ok(())
}
