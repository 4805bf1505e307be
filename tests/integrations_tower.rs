//! `beancounter::tower::TenantLayer` on axum routers and plain tower services, on a
//! two-worker multi-thread runtime: the request's handler, and the tasks it spawns through
//! the crate, run and are charged in the tenant the closure picks (checked with `stat()`);
//! `None` leaves the request where it runs; requests of several tenants in flight at once on
//! both workers are each charged to their own tenant; a tenant over its barrier is refused
//! through the layer, before its handler runs or at the handler's next poll.
//!
//! Every check holds the memory it measures while it reads `stat()` (gates and barriers, no
//! sleeps), so none depends on timing; buffers are 32 KiB multiples (a size class of its own,
//! so charged exactly).

mod common;

use axum::body::Body;
use axum::extract::Path;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use beancounter::tower::TenantLayer;
use beancounter::{BcId, BeanAlloc, Beancounter, Exceeded, Limits, Resource, Severity};
use common::tasks::{hopping_chunks, runtime, CHUNK, CHUNKS, TASK_BYTES};
use common::{memory, Runner};
use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;
use tokio::sync::{Barrier, Notify, RwLock};
use tower::{service_fn, Layer, ServiceExt};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

/// What one request holds at the end: one task's chunks.
const REQUEST_BYTES: u64 = TASK_BYTES;

/// `/t/<id>/...` runs in tenant `<id>`, if it exists; anything else in the host.
fn tenant_of(req: &Request<Body>) -> Option<Beancounter> {
    let id = req
        .uri()
        .path()
        .strip_prefix("/t/")?
        .split('/')
        .next()?
        .parse()
        .ok()?;
    beancounter::lookup(BcId(id))
}

fn get_request(path: &str) -> Request<Body> {
    Request::builder().uri(path).body(Body::empty()).unwrap()
}

async fn body_text(response: Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// An axum handler of tenant 500 allocates, spawns subtasks and a blocking job through the
/// crate, and one plain `tokio::spawn`; it parks everything it got in a stash that outlives
/// the request. Everything but the plain task's memory is charged to tenant 500.
fn handler_and_its_subtasks_charge_the_request_tenant() {
    const T: BcId = BcId(500);
    const SUBTASKS: u64 = 3;
    let tenant = common::tenant(T.0);
    let stash: Arc<Mutex<Vec<Vec<Vec<u8>>>>> = Arc::default();
    let plain_stash: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let handler = {
        let (stash, plain_stash) = (stash.clone(), plain_stash.clone());
        move |Path(id): Path<u32>| {
            let (stash, plain_stash) = (stash.clone(), plain_stash.clone());
            async move {
                let mut got = vec![hopping_chunks(BcId(id)).await];
                let subtasks: Vec<_> = (0..SUBTASKS)
                    .map(|_| beancounter::tokio::spawn(hopping_chunks(BcId(id))))
                    .collect();
                let blocking = beancounter::tokio::spawn_blocking(move || {
                    assert_eq!(beancounter::current_id(), BcId(id));
                    (0..CHUNKS).map(|i| vec![i as u8; CHUNK]).collect()
                });
                // Where the worker runs: the root, not the request's tenant.
                let plain = tokio::spawn(hopping_chunks(BcId::ROOT));
                for s in subtasks {
                    got.push(s.await.unwrap());
                }
                got.push(blocking.await.unwrap());
                let plain = plain.await.unwrap();
                plain_stash.lock().unwrap().extend(plain);
                stash.lock().unwrap().extend(got);
                "done"
            }
        }
    };
    let app: Router = Router::new()
        .route("/t/{id}/work", get(handler))
        .layer(TenantLayer::new(tenant_of));
    let rt = runtime();
    let before = memory(&tenant);
    let status = rt.block_on(async {
        let response = app.oneshot(get_request("/t/500/work")).await.unwrap();
        (response.status(), body_text(response).await)
    });
    assert_eq!(status, (StatusCode::OK, "done".to_string()));
    let tasks = 1 + SUBTASKS + 1;
    let stashed: usize = stash.lock().unwrap().iter().flatten().map(Vec::len).sum();
    assert_eq!(stashed as u64, tasks * REQUEST_BYTES);
    assert_eq!(plain_stash.lock().unwrap().len(), CHUNKS);
    let grew = memory(&tenant) - before;
    assert!(
        grew >= tasks * REQUEST_BYTES,
        "tenant charged {grew} bytes for {tasks} x {REQUEST_BYTES} its request allocated"
    );
    assert!(
        grew < (tasks + 1) * REQUEST_BYTES,
        "tenant charged {grew} bytes: the plain tokio::spawn's {REQUEST_BYTES} too"
    );
    stash.lock().unwrap().clear();
    plain_stash.lock().unwrap().clear();
    drop(rt);
    let after = memory(&tenant);
    assert!(
        after < before + CHUNK as u64,
        "tenant holds {after} bytes (before: {before}) once its request's memory is freed"
    );
}

/// With `None` the service runs where it is called: in the tenant of the caller (here the
/// task's), in the root from the host.
fn layer_with_none_runs_where_it_is_called() {
    const U: BcId = BcId(501);
    let caller = common::tenant(U.0);
    let svc = TenantLayer::new(|_: &u32| None).layer(service_fn(|n: u32| async move {
        let chunks = hopping_chunks(beancounter::current_id()).await;
        Ok::<_, Infallible>((beancounter::current_id(), n, chunks))
    }));
    let rt = runtime();
    let _rt = rt.enter();
    let before = memory(&caller);
    let in_caller = {
        let _g = caller.enter();
        beancounter::tokio::spawn(svc.clone().oneshot(1))
    };
    let (id, n, chunks) = rt.block_on(in_caller).unwrap().unwrap();
    assert_eq!((id, n), (U, 1), "None: the caller's tenant");
    let grew = memory(&caller) - before;
    assert!(grew >= REQUEST_BYTES, "caller charged {grew} bytes");
    drop(chunks);
    let (id, _, _) = rt.block_on(tokio::spawn(svc.oneshot(2))).unwrap().unwrap();
    assert_eq!(id, BcId::ROOT, "None from the host: the root");
}

/// Requests of three tenants, six each, all in flight at once on two workers: each handler
/// hops between workers, runs in its own tenant at every poll, and each tenant is charged
/// exactly its own requests' chunks. Which worker polls what is the scheduler's choice: the
/// scenario is repeated until the handlers were seen on both workers.
fn tenants_interleaved_on_two_workers() {
    let spread = (0..20).any(|_| interleaved_round() >= 2);
    assert!(spread, "in 20 runs, the handlers never ran on both workers");
}

/// One round of [`tenants_interleaved_on_two_workers`]; returns how many workers ran handlers.
fn interleaved_round() -> usize {
    const TENANTS: [u32; 3] = [510, 511, 512];
    const PER_TENANT: usize = 6;
    const REQUESTS: usize = TENANTS.len() * PER_TENANT;
    let tenants: Vec<Beancounter> = TENANTS.iter().map(|&id| common::tenant(id)).collect();
    let threads: Arc<Mutex<HashSet<ThreadId>>> = Arc::default();
    let all_hold = Arc::new(Barrier::new(REQUESTS + 1));
    // Closed until the tenants are measured; handlers wait on it after the barrier.
    let gate = Arc::new(RwLock::new(()));
    let handler = {
        let (threads, all_hold, gate) = (threads.clone(), all_hold.clone(), gate.clone());
        move |Path(id): Path<u32>| {
            let (threads, all_hold, gate) = (threads.clone(), all_hold.clone(), gate.clone());
            async move {
                let mut chunks = Vec::with_capacity(CHUNKS);
                for i in 0..CHUNKS {
                    tokio::task::yield_now().await;
                    assert_eq!(beancounter::current_id(), BcId(id), "poll {i} elsewhere");
                    threads.lock().unwrap().insert(std::thread::current().id());
                    // Keep this worker busy a moment, so the other one steals requests.
                    std::thread::sleep(Duration::from_micros(50));
                    chunks.push(vec![i as u8; CHUNK]);
                }
                all_hold.wait().await;
                drop(gate.read().await);
                assert_eq!(beancounter::current_id(), BcId(id));
                chunks.len().to_string()
            }
        }
    };
    let app: Router = Router::new()
        .route("/t/{id}/work", get(handler))
        .layer(TenantLayer::new(tenant_of));
    let rt = runtime();
    let before: Vec<u64> = tenants.iter().map(memory).collect();
    let during = rt.block_on(async {
        let closed = gate.clone().write_owned().await;
        let mut requests = Vec::new();
        for round in 0..PER_TENANT {
            for id in TENANTS {
                let req = get_request(&format!("/t/{id}/work?round={round}"));
                requests.push(tokio::spawn(app.clone().oneshot(req)));
            }
        }
        // A handler that panicked never arrives: fail instead of waiting for ever.
        let arrived = tokio::time::timeout(Duration::from_secs(60), all_hold.wait()).await;
        assert!(
            arrived.is_ok(),
            "a handler never reached the barrier (see its panic)"
        );
        let during: Vec<u64> = tenants.iter().map(memory).collect();
        drop(closed);
        for r in requests {
            let response = r.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body_text(response).await, CHUNKS.to_string());
        }
        during
    });
    drop(rt);
    for ((t, b), d) in tenants.iter().zip(&before).zip(&during) {
        let grew = d - b;
        let own = PER_TENANT as u64 * REQUEST_BYTES;
        assert!(
            grew >= own && grew < own + REQUEST_BYTES / 2,
            "tenant {} charged {grew} bytes while its {PER_TENANT} requests held {own}",
            t.id()
        );
        assert!(
            memory(t) < b + CHUNK as u64,
            "tenant {} kept memory",
            t.id()
        );
    }
    let workers = threads.lock().unwrap().len();
    workers
}

/// `refuse_with`: a request of a tenant over its barrier is answered by the closure and never
/// reaches the handler; one whose tenant crosses its barrier while the handler waits is
/// refused at the handler's next poll, its future dropped inside the tenant; another tenant
/// is served meanwhile, and the tenant is served again once back under its barrier.
fn over_barrier_refused_through_the_layer() {
    const N: BcId = BcId(520);
    const C: BcId = BcId(521);
    let noisy = common::tenant(N.0);
    let calm = common::tenant(C.0);
    for t in [&noisy, &calm] {
        t.set_limits(Resource::Memory, Limits::new(1 << 20, 64 << 20).unwrap())
            .unwrap();
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Notify::new());
    let go_on = Arc::new(Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let dropped_in: Arc<Mutex<Option<BcId>>> = Arc::default();

    /// Records the tenant its drop runs in.
    struct DropProbe {
        dropped_in: Arc<Mutex<Option<BcId>>>,
        _buf: Vec<u8>,
    }
    impl Drop for DropProbe {
        fn drop(&mut self) {
            *self.dropped_in.lock().unwrap() = Some(beancounter::current_id());
        }
    }

    let work = {
        let handled = handled.clone();
        move || {
            handled.fetch_add(1, Ordering::SeqCst);
            async { "served" }
        }
    };
    let slow = {
        let (started, go_on) = (started.clone(), go_on.clone());
        let (finished, dropped_in) = (finished.clone(), dropped_in.clone());
        move || {
            let (started, go_on) = (started.clone(), go_on.clone());
            let (finished, dropped_in) = (finished.clone(), dropped_in.clone());
            async move {
                let _probe = DropProbe {
                    dropped_in,
                    _buf: vec![1; CHUNK],
                };
                started.notify_one();
                go_on.notified().await;
                // Told after the tenant went over its barrier; the notification may have
                // come within this very poll, so give the layer one more poll to check.
                tokio::task::yield_now().await;
                finished.store(true, Ordering::SeqCst);
                "served"
            }
        }
    };
    let refuse = |e: Exceeded| (StatusCode::INSUFFICIENT_STORAGE, e.to_string()).into_response();
    let app: Router = Router::new()
        .route("/t/{id}/work", get(work))
        .route("/t/{id}/slow", get(slow))
        .layer(TenantLayer::new(tenant_of).refuse_with(refuse));
    let rt = runtime();
    let call = |path: &str| {
        let app = app.clone();
        let req = get_request(path);
        rt.block_on(async move {
            let response = app.oneshot(req).await.unwrap();
            (response.status(), body_text(response).await)
        })
    };

    assert_eq!(call("/t/520/work").0, StatusCode::OK);
    assert_eq!(handled.load(Ordering::SeqCst), 1);

    // Over the barrier (an explicit charge stands for whatever the tenant holds).
    let over = noisy
        .charge(Resource::Memory, 2 << 20, Severity::Limit)
        .unwrap();
    let (status, body) = call("/t/520/work");
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert!(body.contains("beancounter 520"), "{body}");
    assert_eq!(handled.load(Ordering::SeqCst), 1, "a refused request ran");
    assert_eq!(call("/t/521/work").0, StatusCode::OK, "the calm tenant");
    assert_eq!(handled.load(Ordering::SeqCst), 2);
    drop(over);
    assert_eq!(
        call("/t/520/work").0,
        StatusCode::OK,
        "back under the barrier"
    );

    // Crossing the barrier while the handler waits: refused at its next poll.
    let slow_request = {
        let app = app.clone();
        rt.spawn(async move {
            let response = app.oneshot(get_request("/t/520/slow")).await.unwrap();
            (response.status(), body_text(response).await)
        })
    };
    rt.block_on(started.notified());
    let over = noisy
        .charge(Resource::Memory, 2 << 20, Severity::Limit)
        .unwrap();
    go_on.notify_one();
    let (status, body) = rt.block_on(slow_request).unwrap();
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert!(!finished.load(Ordering::SeqCst), "the handler went on");
    assert_eq!(
        *dropped_in.lock().unwrap(),
        Some(N),
        "the handler's future was not dropped inside its tenant"
    );
    drop(over);
    assert_eq!(calm.stat(Resource::Memory).failcnt, 0);

    // Any tower service: over the barrier, its `call` is not even made.
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = {
        let calls = calls.clone();
        let noisy = noisy.clone();
        TenantLayer::new(move |_: &()| Some(noisy.clone()))
            .refuse_with(|e: Exceeded| Err(e.id))
            .layer(service_fn(move |()| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Ok(beancounter::current_id())) }
            }))
    };
    assert_eq!(rt.block_on(svc.clone().oneshot(())), Ok(Ok(N)));
    let over = noisy
        .charge(Resource::Memory, 2 << 20, Severity::Limit)
        .unwrap();
    assert_eq!(rt.block_on(svc.oneshot(())), Ok(Err(N)));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the refused request was called"
    );
    drop(over);
}

fn main() {
    let mut r = Runner::new();
    r.check(
        "handler_and_its_subtasks_charge_the_request_tenant",
        handler_and_its_subtasks_charge_the_request_tenant,
    );
    r.check(
        "layer_with_none_runs_where_it_is_called",
        layer_with_none_runs_where_it_is_called,
    );
    r.check(
        "tenants_interleaved_on_two_workers",
        tenants_interleaved_on_two_workers,
    );
    r.check(
        "over_barrier_refused_through_the_layer",
        over_barrier_refused_through_the_layer,
    );
    r.finish();
}
