//! The tenant server's dashboard (`examples/tenant_server/dashboard.rs`) in a real browser.
//!
//! Three tenants with distinct barriers and limits hold known amounts (3, 7 and 12 MiB of
//! 1 MiB documents, built in three steps a sample apart, so that the history shows them
//! grow); `medium` holds more than its barrier, and a fallible request of `small` is refused.
//! The dashboard is served on loopback; the checks read `/api/tenants` and the profiles over
//! HTTP, then load the page in headless Chromium and compare the rows and bars it rendered
//! with each tenant's `stat()` (which stays put while the test holds the documents), and
//! save screenshots of the page and of a tenant's flamegraph as `dashboard.png` and
//! `flamegraph.png` in the target directory (`docs/` has copies for the README).
//!
//! Needs Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it): without it
//! the browser checks fail and say so. `CHROMIUM=/path/to/chrome` picks another binary.

mod common;
#[path = "../examples/tenant_server/dashboard.rs"]
mod dashboard;

use beancounter::{profile, BcId, BeanAlloc, Beancounter, Limits, Resource, ResourceStat};
use common::Runner;
use dashboard::{Dashboard, Listed};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

/// One document: 1 MiB, a page run of its own, so charged exactly.
const DOC: usize = 1 << 20;

/// A tenant of the test: bounds and what it ends up holding, in MiB.
struct Spec {
    id: u32,
    name: &'static str,
    barrier: u64,
    limit: u64,
    hold: u64,
}

const SPECS: [Spec; 3] = [
    Spec {
        id: 801,
        name: "small",
        barrier: 8,
        limit: 16,
        hold: 3,
    },
    Spec {
        id: 802,
        name: "medium",
        barrier: 6,
        limit: 24,
        hold: 7,
    },
    Spec {
        id: 803,
        name: "large",
        barrier: 16,
        limit: 32,
        hold: 12,
    },
];

/// The tenant whose flamegraph is checked and screenshotted.
const PROFILED: usize = 2;

/// Steps the documents are built in, one sample apart.
const STEPS: u64 = 3;

/// The served dashboard and the tenants it shows, holding their documents.
struct World {
    addr: SocketAddr,
    tenants: Vec<Beancounter>,
    _docs: Vec<Vec<Vec<u8>>>,
    _rt: tokio::runtime::Runtime,
}

/// Builds `mib` documents in the current tenant. Never inlined, so that the tenant's
/// flamegraph names it.
#[inline(never)]
fn hold_documents(mib: u64) -> Vec<Vec<u8>> {
    (0..mib).map(|i| vec![i as u8; DOC]).collect()
}

fn client() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build();
    ureq::Agent::new_with_config(config)
}

/// `GET path`: status, `Content-Type`, body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let mut answer = client()
        .get(format!("http://{addr}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let content_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = answer.body_mut().read_to_vec().expect("body");
    (answer.status().as_u16(), content_type, body)
}

/// `/api/tenants`, parsed.
fn api(addr: SocketAddr) -> serde_json::Value {
    let (status, content_type, body) = get(addr, "/api/tenants");
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    serde_json::from_slice(&body).expect("/api/tenants is JSON")
}

/// The entry of tenant `id` in `/api/tenants`.
fn api_tenant(json: &serde_json::Value, id: BcId) -> &serde_json::Value {
    let tenants = json["tenants"].as_array().expect("tenants");
    tenants.iter().find(|t| t["id"] == id.0).expect("listed")
}

/// Waits until the last `samples` one-second samples of every tenant show what it holds now.
fn wait_sampled(addr: SocketAddr, tenants: &[Beancounter], samples: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let json = api(addr);
        let sampled = tenants.iter().all(|t| {
            let held = t.stat(Resource::Memory).held;
            let history = api_tenant(&json, t.id())["history"].as_array().unwrap();
            history.len() >= samples
                && history[history.len() - samples..]
                    .iter()
                    .all(|s| s[1].as_u64() == Some(held))
        });
        if sampled {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no sample of what the tenants hold"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates the tenants, serves their dashboard, and has them build their documents.
fn world() -> World {
    profile::start(profile::DEFAULT_SAMPLE_BYTES).expect("profile::start");
    let tenants: Vec<Beancounter> = SPECS
        .iter()
        .map(|s| {
            let t = common::tenant(s.id);
            let limits = Limits::new(s.barrier << 20, s.limit << 20).unwrap();
            t.set_limits(Resource::Memory, limits).unwrap();
            t
        })
        .collect();
    let dash = {
        let listed: Vec<Listed> = SPECS
            .iter()
            .zip(&tenants)
            .map(|(s, bc)| Listed {
                name: s.name.to_string(),
                bc: bc.clone(),
            })
            .collect();
        Dashboard::new(move || listed.clone())
    };
    let rt = common::tasks::runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = dash.router();
    rt.spawn(async move { axum::serve(listener, app).await });
    rt.spawn(dash.keep_sampling());

    let mut docs = Vec::with_capacity(SPECS.len() * STEPS as usize);
    for step in 0..STEPS {
        for (s, t) in SPECS.iter().zip(&tenants) {
            let mib = s.hold * (step + 1) / STEPS - s.hold * step / STEPS;
            let _in = t.enter();
            docs.push(hold_documents(mib));
        }
        wait_sampled(addr, &tenants, 1);
    }
    // `small` asks for more than its barrier: refused, counted in its failcnt.
    {
        let _in = tenants[0].enter();
        let mut big: Vec<u8> = Vec::new();
        let over = (SPECS[0].barrier as usize + 1) << 20;
        let refused = beancounter::fallible(|| big.try_reserve_exact(over));
        assert!(refused.is_err(), "small's barrier refuses");
    }
    wait_sampled(addr, &tenants, 2);
    World {
        addr,
        tenants,
        _docs: docs,
        _rt: rt,
    }
}

/// `/api/tenants` shows each tenant's `stat()`, a history that ends with two samples of what
/// it holds now, and its events.
fn api_tenants_agree_with_stat(w: &World) {
    let json = api(w.addr);
    assert_eq!(json["sample_every_ms"], 1000);
    let ids: Vec<u64> = json["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        SPECS.map(|s| u64::from(s.id)),
        "the lister's tenants, in order"
    );
    for (s, t) in SPECS.iter().zip(&w.tenants) {
        let st = t.stat(Resource::Memory);
        let shown = api_tenant(&json, t.id());
        let fields = [
            ("held", st.held),
            ("maxheld", st.maxheld),
            ("barrier", st.barrier),
            ("limit", st.limit),
            ("failcnt", st.failcnt),
        ];
        for (field, want) in fields {
            assert_eq!(shown[field].as_u64(), Some(want), "{}: {field}", s.name);
        }
        assert_eq!(shown["name"], s.name);
        assert!(st.held >= s.hold << 20 && st.held < (s.hold << 20) + (64 << 10));
        let history = shown["history"].as_array().unwrap();
        assert!(history.len() > STEPS as usize, "{}: {history:?}", s.name);
        let times: Vec<u64> = history.iter().map(|h| h[0].as_u64().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    }
    let events = |i: usize, what: &str| -> u64 {
        let shown = api_tenant(&json, w.tenants[i].id());
        let events = shown["events"].as_array().unwrap();
        events
            .iter()
            .filter_map(|e| e["counts"][what].as_u64())
            .sum()
    };
    assert_eq!(events(0, "refused_at_barrier"), 1, "small's refusal");
    assert_eq!(
        events(1, "barrier_crossings"),
        1,
        "medium went over its barrier"
    );
    assert_eq!(
        events(2, "barrier_crossings"),
        0,
        "large stays under its barrier"
    );
}

/// The flamegraph and pprof routes answer for listed tenants only.
fn profiles_are_served(w: &World) {
    let id = w.tenants[PROFILED].id();
    let (status, content_type, svg) = get(w.addr, &format!("/t/{id}/heap.svg"));
    assert_eq!((status, content_type.as_str()), (200, "image/svg+xml"));
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("large (tenant 803): live heap"), "titled");
    let (status, content_type, pb) = get(w.addr, &format!("/t/{id}/heap.pb.gz"));
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/octet-stream")
    );
    assert!(pb.starts_with(&[0x1f, 0x8b]), "gzip");
    for path in ["/t/999/heap.svg", "/t/root/heap.svg", "/t/0/heap.pb.gz"] {
        assert_eq!(get(w.addr, path).0, 404, "{path}");
    }
}

/// The profiled tenant's flamegraph shows the function that allocated its documents (it
/// holds 12 MiB in 1 MiB blocks, each sampled with probability `1 - e^-2` at the default
/// rate).
fn flamegraph_names_the_allocating_function(w: &World) {
    let id = w.tenants[PROFILED].id();
    let svg = String::from_utf8(get(w.addr, &format!("/t/{id}/heap.svg")).2).unwrap();
    assert!(
        svg.contains("hold_documents"),
        "the flamegraph of {id} does not name hold_documents:\n{svg:.2000}"
    );
}

// ---- the browser ---------------------------------------------------------------------------

/// The Chromium binary: `$CHROMIUM`, else `chromium` (Debian) or `chromium-browser` on the
/// `PATH`.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromium not found: this test loads the dashboard in headless Chromium; install it \
             (`apt-get install chromium` on Debian, as .ci/run does) or set CHROMIUM to a \
             Chromium or Chrome binary"
        )
    })
}

/// Runs headless Chromium on `url` with `args` (and up to 10 s of the page's timers run on
/// virtual time), in a profile directory of its own; returns what it printed on stdout.
fn run_chromium(url: &str, args: &[&str]) -> String {
    let bin = chromium();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let profile_dir = tmp.join(format!("chromium-profile-{}", std::process::id()));
    let (out_path, err_path) = (
        tmp.join(format!("chromium-{}.out", std::process::id())),
        tmp.join(format!("chromium-{}.err", std::process::id())),
    );
    let mut child = Command::new(&bin)
        .args([
            "--headless=new",
            // Root in a container has no sandbox to give the renderer.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium ran for 120 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    let _ = std::fs::remove_dir_all(&profile_dir);
    let tail: Vec<&str> = err.lines().rev().take(20).collect();
    assert!(status.success(), "chromium {status}:\n{}", tail.join("\n"));
    out
}

/// A start tag of the rendered DOM.
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: BTreeMap<String, String>,
    /// Where it starts in the DOM text.
    at: usize,
}

impl Tag {
    fn attr(&self, name: &str) -> &str {
        self.attrs.get(name).map_or("", String::as_str)
    }

    fn num(&self, name: &str) -> f64 {
        let v = self.attr(name);
        v.parse()
            .unwrap_or_else(|_| panic!("<{} {name}={v:?}>", self.name))
    }

    fn has_class(&self, class: &str) -> bool {
        self.attr("class").split_whitespace().any(|c| c == class)
    }
}

/// The start tags of serialized HTML (as `--dump-dom` prints it: attribute values quoted),
/// skipping what scripts and styles contain.
fn start_tags(html: &str) -> Vec<Tag> {
    let mut tags = Vec::new();
    let mut i = 0;
    while let Some(off) = html[i..].find('<') {
        let at = i + off;
        i = at + 1;
        let rest = &html[i..];
        let name_len = rest
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '-')
            .unwrap_or(rest.len());
        if name_len == 0 || !rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue;
        }
        let name = rest[..name_len].to_ascii_lowercase();
        let (attrs, len) = attributes(&rest[name_len..]);
        i += name_len + len;
        if name == "script" || name == "style" {
            let close = format!("</{name}");
            i += html[i..].find(&close).unwrap_or(html.len() - i);
        }
        tags.push(Tag { name, attrs, at });
    }
    tags
}

/// The attributes of a start tag, from after its name; and the length up to its `>`.
fn attributes(s: &str) -> (BTreeMap<String, String>, usize) {
    let b = s.as_bytes();
    let mut attrs = BTreeMap::new();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'/') {
            i += 1;
        }
        if i >= b.len() || b[i] == b'>' {
            return (attrs, (i + 1).min(b.len()));
        }
        let start = i;
        while i < b.len() && !b"=> \t\n/".contains(&b[i]) {
            i += 1;
        }
        let name = s[start..i].to_ascii_lowercase();
        let mut value = String::new();
        if b.get(i) == Some(&b'=') {
            i += 1;
            let quote = b.get(i).copied().filter(|q| *q == b'"' || *q == b'\'');
            let from = i + usize::from(quote.is_some());
            let end = match quote {
                Some(q) => s[from..].find(q as char).map_or(s.len(), |e| from + e),
                None => s[from..]
                    .find(|c: char| c.is_ascii_whitespace() || c == '>')
                    .map_or(s.len(), |e| from + e),
            };
            value = unescape(&s[from..end]);
            i = end + usize::from(quote.is_some());
        }
        attrs.insert(name, value);
    }
}

/// Character references the serializer writes in attribute values.
fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The percentage of a `width: N%` style.
fn style_width(style: &str) -> f64 {
    let w = style.split("width:").nth(1).expect("a width");
    w.trim()
        .split('%')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("style {style:?}"))
}

/// Headless Chromium renders one row per tenant with its `stat()` and a bar of `held` as a
/// share of the limit, a barrier mark, a history of at least two samples and its events.
fn dashboard_renders_in_chromium(w: &World) {
    let before: Vec<ResourceStat> = w.tenants.iter().map(|t| t.stat(Resource::Memory)).collect();
    let dom = run_chromium(&format!("http://{}/", w.addr), &["--dump-dom"]);
    let after: Vec<ResourceStat> = w.tenants.iter().map(|t| t.stat(Resource::Memory)).collect();
    assert_eq!(before, after, "held moved while the browser read it");
    let tags = start_tags(&dom);
    let body = tags.iter().find(|t| t.name == "body").expect("a body");
    assert_eq!(
        body.attr("data-state"),
        "ready",
        "the page read /api/tenants:\n{dom:.3000}"
    );
    let rows: Vec<&Tag> = tags
        .iter()
        .filter(|t| t.name == "tr" && t.attrs.contains_key("data-tenant"))
        .collect();
    let ids: Vec<&str> = rows.iter().map(|r| r.attr("data-tenant")).collect();
    let want: Vec<String> = SPECS.iter().map(|s| s.id.to_string()).collect();
    assert_eq!(ids, want, "one row per tenant, in order");
    for (i, ((row, s), st)) in rows.iter().zip(&SPECS).zip(&after).enumerate() {
        assert_eq!(row.attr("data-name"), s.name);
        let fields = [
            ("data-held", st.held),
            ("data-maxheld", st.maxheld),
            ("data-barrier", st.barrier),
            ("data-limit", st.limit),
            ("data-failcnt", st.failcnt),
        ];
        for (attr, want) in fields {
            assert_eq!(row.attr(attr), want.to_string(), "{}: {attr}", s.name);
        }
        let end = rows.get(i + 1).map_or(dom.len(), |next| next.at);
        let inside = |t: &&Tag| t.at > row.at && t.at < end;
        let in_row: Vec<&Tag> = tags.iter().filter(inside).collect();
        let find = |what: &str, f: &dyn Fn(&Tag) -> bool| -> &Tag {
            let found = in_row.iter().find(|t| f(t));
            found.unwrap_or_else(|| panic!("{}: no {what} in its row", s.name))
        };
        let fill = find("bar", &|t| t.has_class("fill"));
        let share = (st.held as f64 / st.limit as f64).min(1.0);
        let fraction = fill.num("data-fraction");
        assert!(
            (fraction - share).abs() < 1e-6,
            "{}: bar {fraction} for {share}",
            s.name
        );
        let width = style_width(fill.attr("style"));
        assert!(
            (width - 100.0 * share).abs() < 1e-3,
            "{}: width {width}%",
            s.name
        );
        assert_eq!(
            fill.has_class("over"),
            st.held > st.barrier,
            "{}: colour",
            s.name
        );
        let mark = find("barrier mark", &|t| t.has_class("mark"));
        let at = st.barrier as f64 / st.limit as f64;
        assert!(
            (mark.num("data-fraction") - at).abs() < 1e-6,
            "{}: barrier mark",
            s.name
        );
        let spark = find("history", &|t| t.name == "svg" && t.has_class("spark"));
        assert!(spark.num("data-samples") >= 2.0, "{}: history", s.name);
        assert!(
            in_row.iter().any(|t| t.name == "polyline"),
            "{}: a line",
            s.name
        );
        let events = find("events", &|t| t.name == "ul" && t.has_class("events"));
        let want_events = [1.0, 1.0, 0.0][i];
        assert_eq!(events.num("data-events"), want_events, "{}: events", s.name);
        let flamegraph = find("flamegraph link", &|t| {
            t.name == "a" && t.attrs.contains_key("data-flamegraph")
        });
        assert_eq!(flamegraph.attr("href"), format!("/t/{}/heap.svg", s.id));
    }
}

/// The size of a PNG, from its `IHDR` chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "a PNG"
    );
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

/// Screenshots of the page and of the profiled tenant's flamegraph, 1280 x 900, saved in the
/// target directory.
fn screenshots_of_the_page_and_a_flamegraph(w: &World) {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let id = w.tenants[PROFILED].id();
    let shots = [
        ("dashboard.png", String::new(), 40_000),
        ("flamegraph.png", format!("t/{id}/heap.svg"), 8_000),
    ];
    for (file, path, least) in shots {
        let out = target.join(file);
        let _ = std::fs::remove_file(&out);
        let shot = format!("--screenshot={}", out.display());
        let url = format!("http://{}/{path}", w.addr);
        run_chromium(
            &url,
            &[&shot, "--window-size=1280,900", "--hide-scrollbars"],
        );
        let png = std::fs::read(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        assert_eq!(png_size(&png), (1280, 900), "{file}");
        assert!(
            png.len() >= least,
            "{file}: {} bytes, a blank page?",
            png.len()
        );
        println!("    saved {} ({} bytes)", out.display(), png.len());
    }
}

fn main() {
    let mut r = Runner::new();
    let w = world();
    r.check("api_tenants_agree_with_stat", || {
        api_tenants_agree_with_stat(&w)
    });
    r.check("profiles_are_served", || profiles_are_served(&w));
    r.check("flamegraph_names_the_allocating_function", || {
        flamegraph_names_the_allocating_function(&w)
    });
    r.check("dashboard_renders_in_chromium", || {
        dashboard_renders_in_chromium(&w)
    });
    r.check("screenshots_of_the_page_and_a_flamegraph", || {
        screenshots_of_the_page_and_a_flamegraph(&w)
    });
    r.finish();
}
