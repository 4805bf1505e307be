//! Text workloads on real libraries: a JSON round trip with serde_json, and log processing
//! with regex.

use crate::child::{enter_first, measure, mix, push_word, Iteration, Measured, Mode, Rng};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write;
use std::hint::black_box;
use std::time::Instant;

#[derive(Serialize, Deserialize)]
struct Doc {
    generated: String,
    users: Vec<User>,
}

#[derive(Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    active: bool,
    score: f64,
    tags: Vec<String>,
    address: Address,
    orders: Vec<Order>,
}

#[derive(Serialize, Deserialize)]
struct Address {
    street: String,
    city: String,
    zip: String,
    geo: [f64; 2],
}

#[derive(Serialize, Deserialize)]
struct Order {
    id: u64,
    placed: String,
    items: Vec<Item>,
    note: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Item {
    sku: String,
    qty: u32,
    price: f64,
}

fn word(rng: &mut Rng, lo: usize, hi: usize) -> String {
    let len = rng.range(lo, hi);
    let mut s = String::with_capacity(len);
    push_word(&mut s, rng.next(), len);
    s
}

/// Hundredths, so that every number prints and parses back to the same `f64`.
fn cents(rng: &mut Rng, max: u64) -> f64 {
    rng.below(max * 100) as f64 / 100.0
}

fn user(rng: &mut Rng, id: u64) -> Value {
    let tags: Vec<Value> = (0..rng.below(6))
        .map(|_| Value::String(word(rng, 3, 10)))
        .collect();
    let orders: Vec<Value> = (0..rng.below(5))
        .map(|o| {
            let items: Vec<Value> = (0..rng.range(1, 4))
                .map(|_| json!({"sku": word(rng, 8, 8), "qty": rng.below(9) + 1, "price": cents(rng, 500)}))
                .collect();
            let note = if rng.below(3) == 0 {
                Value::String(word(rng, 10, 60))
            } else {
                Value::Null
            };
            json!({
                "id": id * 16 + o,
                "placed": format!("2024-{:02}-{:02}T{:02}:00:00Z", rng.range(1, 12), rng.range(1, 28), rng.below(24)),
                "items": items,
                "note": note,
            })
        })
        .collect();
    let name = word(rng, 4, 20);
    json!({
        "id": id,
        "email": format!("{name}@{}.example", word(rng, 4, 12)),
        "name": name,
        "active": rng.below(2) == 0,
        "score": cents(rng, 1000),
        "tags": tags,
        "address": {
            "street": format!("{} {} street", rng.below(999) + 1, word(rng, 5, 15)),
            "city": word(rng, 4, 14),
            "zip": format!("{:05}", rng.below(100_000)),
            "geo": [cents(rng, 90), cents(rng, 180)],
        },
        "orders": orders,
    })
}

/// serde_json: builds a document as a `Value` tree (~10 MB of JSON), prints it, parses it
/// into a `Value`, prints that, parses it into typed structs, prints those.
pub fn json_roundtrip(mode: &Mode) -> Measured {
    // ~650 bytes of JSON per user.
    let users = mode.size(16_000) as u64;
    let tenants = mode.make_tenants(1, 1);
    let _in_tenant = enter_first(&tenants);
    measure(&tenants, |_| {
        let t0 = Instant::now();
        let mut rng = Rng::new(0x5EED_0001);
        let doc = json!({
            "generated": "2024-05-17T00:00:00Z",
            "users": (0..users).map(|i| user(&mut rng, i)).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string(&doc).expect("print the document");
        drop(doc);
        let parsed: Value = serde_json::from_str(&text).expect("parse into a Value");
        let again = serde_json::to_string(&parsed).expect("print the Value");
        drop(parsed);
        assert_eq!(text, again, "a Value round trip changes nothing");
        let typed: Doc = serde_json::from_str(&again).expect("parse into structs");
        let out = serde_json::to_string(&typed).expect("print the structs");
        // Same fields and numbers, in declaration rather than sorted order.
        assert_eq!(out.len(), text.len());
        black_box((typed.users.len(), typed.generated.len(), &out));
        Iteration::program(t0.elapsed())
    })
}

const PATHS: [&str; 8] = [
    "/api/v1/users/{}",
    "/api/v1/users/{}/orders",
    "/api/v1/orders/{}/items/{}",
    "/api/v2/search",
    "/static/js/app.{}.js",
    "/api/v1/carts/{}/checkout",
    "/health",
    "/api/v1/products/{}/reviews",
];
const LEVELS: [&str; 4] = ["INFO ", "INFO ", "WARN ", "ERROR"];
const METHODS: [&str; 4] = ["GET", "GET", "POST", "DELETE"];

/// ~110-byte lines of an HTTP service log, deterministic.
fn log(lines: usize) -> String {
    let mut rng = Rng::new(0x5EED_0002);
    let mut out = String::with_capacity(lines * 120);
    for i in 0..lines as u64 {
        let ms = i * 37;
        let mut path = String::new();
        let template = PATHS[rng.below(PATHS.len() as u64) as usize];
        for (k, part) in template.split("{}").enumerate() {
            if k > 0 {
                // Ids skewed to small numbers: some paths repeat, most are rare.
                let bits = rng.range(3, 20);
                let id = rng.below(1 << bits);
                write!(path, "{id}").unwrap();
            }
            path.push_str(part);
        }
        if rng.below(4) == 0 {
            write!(path, "?page={}&sort={}", rng.below(50), rng.below(3)).unwrap();
        }
        writeln!(
            out,
            "2024-05-17T{:02}:{:02}:{:02}.{:03}Z {} [worker-{}] {} {} status={} dur={}ms req={:016x}",
            ms / 3_600_000 % 24,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000,
            LEVELS[rng.below(4) as usize],
            rng.below(16),
            METHODS[rng.below(4) as usize],
            path,
            [200, 200, 200, 201, 304, 404, 500][rng.below(7) as usize],
            rng.below(2000),
            mix(i),
        )
        .unwrap();
    }
    out
}

/// regex: generates ~20 MB of log lines, parses each with capture groups, counts requests
/// per path and per endpoint (ids replaced) in `HashMap<String, _>`s, and keeps a redacted
/// copy of every line made by `replace_all`.
pub fn regex_log(mode: &Mode) -> Measured {
    let lines = mode.size(180_000);
    let tenants = mode.make_tenants(1, 1);
    let _in_tenant = enter_first(&tenants);
    measure(&tenants, |_| {
        let t0 = Instant::now();
        let text = log(lines);
        let line_re = Regex::new(
            r"^(\S+)Z (INFO|WARN|ERROR)\s+\[([\w-]+)\] (GET|POST|DELETE) ([^?\s]+)(?:\?(\S+))? status=(\d+) dur=(\d+)ms req=([0-9a-f]+)$",
        )
        .unwrap();
        let id_re = Regex::new(r"/\d+").unwrap();
        let req_re = Regex::new(r"req=[0-9a-f]+").unwrap();
        let mut per_path: HashMap<String, usize> = HashMap::new();
        let mut per_endpoint: HashMap<String, (usize, u64)> = HashMap::new();
        let mut redacted: Vec<String> = Vec::new();
        let (mut errors, mut queries) = (0usize, 0usize);
        for line in text.lines() {
            let caps = line_re.captures(line).expect("every line matches");
            let path = &caps[5];
            match per_path.get_mut(path) {
                Some(n) => *n += 1,
                None => {
                    per_path.insert(path.to_owned(), 1);
                }
            }
            let endpoint = format!("{} {}", &caps[4], id_re.replace_all(path, "/:id"));
            let dur: u64 = caps[8].parse().unwrap();
            let e = per_endpoint.entry(endpoint).or_default();
            e.0 += 1;
            e.1 += dur;
            errors += usize::from(&caps[2] == "ERROR" || caps[7].starts_with('5'));
            queries += usize::from(caps.get(6).is_some());
            redacted.push(req_re.replace_all(line, "req=<redacted>").into_owned());
        }
        assert_eq!(redacted.len(), lines);
        black_box((
            per_path.len(),
            per_endpoint.len(),
            errors,
            queries,
            &redacted,
        ));
        Iteration::program(t0.elapsed())
    })
}
