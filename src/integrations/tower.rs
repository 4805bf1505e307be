//! A tower middleware that runs each request in the tenant a closure picks from it.
//!
//! [`TenantLayer`] wraps a service in a [`TenantService`]. For each request it calls the
//! *pick* closure; for `Some(tenant)` it calls the inner service inside the tenant and wraps
//! the response future with [`FutureExt::in_beancounter`] (or [`FutureExt::guarded`] when
//! refusing), so that every poll of it, and its drop, run in the tenant whichever worker
//! polls it. For `None` the request runs where it already runs.
//!
//! Refusing: [`TenantLayer::refuse_with`] turns on the guarded behaviour of `DESIGN.md` §3.3.
//! A request whose tenant (or an ancestor) is over its barrier never reaches the inner
//! service, and one whose tenant goes over its barrier while it runs is dropped at its next
//! poll (inside the tenant, so what it frees is uncharged there); either way the closure
//! builds the response from the [`Exceeded`]. The service's error type stays the inner one,
//! so with axum no `HandleErrorLayer` is needed.

use crate::{Beancounter, Exceeded, FutureExt, Guarded, InBeancounter};
use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{ready, Context, Poll};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// The refusal mode of a [`TenantLayer`] made by [`TenantLayer::new`]: requests are never
/// refused, only run in their tenant.
///
/// # Examples
/// ```
/// use beancounter::{tower::{TenantLayer, Unguarded}, Beancounter};
/// let layer = TenantLayer::new(|_: &u32| -> Option<Beancounter> { None });
/// let _: &TenantLayer<_, Unguarded> = &layer; // until `refuse_with` says otherwise
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unguarded;

/// A tower [`Layer`] that runs each request's service future in the tenant `pick` returns for
/// it; see the [module docs](crate::tower).
///
/// It fits axum's `Router::layer` and `Router::route_layer` as it is: the layer and its
/// service are `Clone + Send + Sync` when `pick` (and the refusal closure) are, the service
/// forwards `poll_ready` to the inner service, and its futures are `Send + 'static` when the
/// inner ones are. The crate does not depend on axum, hyper or tower itself: only on the
/// `tower-layer` and `tower-service` traits.
///
/// # Examples
/// An axum router whose requests run in the tenant named by a header:
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use axum::{body::Body, http::Request, routing::get, Router};
/// use beancounter::{tower::TenantLayer, BcId, Beancounter, Resource};
/// use tower::ServiceExt; // oneshot
///
/// fn tenant_of(req: &Request<Body>) -> Option<Beancounter> {
///     let id = req.headers().get("x-tenant")?.to_str().ok()?.parse().ok()?;
///     beancounter::lookup(BcId(id))
/// }
///
/// let tenant = beancounter::find_or_create(BcId(70)).unwrap();
/// let app: Router = Router::new()
///     .route("/", get(|| async { "x".repeat(1 << 20) })) // allocated in the tenant
///     .layer(TenantLayer::new(tenant_of));
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// let req = Request::builder().header("x-tenant", "70").body(Body::empty()).unwrap();
/// let response = rt.block_on(app.oneshot(req)).unwrap();
/// assert!(tenant.stat(Resource::Memory).held >= 1 << 20); // the body, until it is sent
/// drop(response);
/// assert!(tenant.stat(Resource::Memory).held < 1 << 20);
/// # }
/// ```
#[derive(Clone)]
pub struct TenantLayer<P, R = Unguarded> {
    pick: P,
    refuse: R,
}

impl<P> TenantLayer<P> {
    /// A layer that runs each request in `pick(&request)`: `Some(tenant)` runs the inner
    /// service's `call` and every poll of its future (and its drop) inside `tenant`, as exec
    /// and fork beancounter; `None` leaves the request where it already runs. `pick` runs in
    /// the caller's context, once per request.
    ///
    /// Closures taking the request by reference need its type written out
    /// (`|req: &Request<Body>| ..`), or a `fn` item.
    ///
    /// # Examples
    /// Any tower service, here one built with `tower::service_fn`:
    /// ```
    /// use beancounter::{tower::TenantLayer, BcId};
    /// use tower::{service_fn, Layer, ServiceExt};
    ///
    /// let tenant = beancounter::find_or_create(BcId(71)).unwrap();
    /// let layer = TenantLayer::new(move |wanted: &bool| wanted.then(|| tenant.clone()));
    /// let svc = layer.layer(service_fn(|_: bool| async {
    ///     Ok::<_, std::convert::Infallible>(beancounter::current_id())
    /// }));
    /// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// assert_eq!(rt.block_on(svc.clone().oneshot(true)), Ok(BcId(71)));
    /// assert_eq!(rt.block_on(svc.oneshot(false)), Ok(BcId::ROOT)); // `None`: where it runs
    /// ```
    pub fn new(pick: P) -> TenantLayer<P> {
        TenantLayer {
            pick,
            refuse: Unguarded,
        }
    }
}

impl<P, R> TenantLayer<P, R> {
    /// Refuses the requests of a tenant that is over its barrier with the response that
    /// `refuse` builds from the [`Exceeded`] (the guarded behaviour, as
    /// [`FutureExt::guarded`] and [`Beancounter::check_barrier`]):
    /// - checked before the inner service is called: a request whose tenant, or an ancestor
    ///   of it, is over its barrier never reaches the inner service;
    /// - and at every poll of the inner future: once the tenant is over its barrier, the
    ///   inner future is dropped, inside the tenant, and the refusal returned instead.
    ///
    /// `refuse` runs outside the tenant (the host pays for the refusal), and must return the
    /// inner service's response type: with axum, `(StatusCode, ..).into_response()`. The
    /// service's error type is the inner one, so this fits `Router::layer` with no
    /// `HandleErrorLayer`. Requests for which `pick` returns `None` are never refused. A
    /// refusal refuses no charge, so it is not counted in `failcnt`; the charge that took the
    /// tenant over its barrier is counted in
    /// [`Events::barrier_crossings`](crate::Events::barrier_crossings).
    ///
    /// # Examples
    /// ```
    /// use axum::{body::Body, http::{Request, StatusCode}, response::IntoResponse};
    /// use axum::{routing::get, Router};
    /// use beancounter::{tower::TenantLayer, BcId, Exceeded, Limits, Resource, Severity};
    /// use tower::ServiceExt; // oneshot
    ///
    /// let tenant = beancounter::find_or_create(BcId(72)).unwrap();
    /// tenant.set_limits(Resource::Threads, Limits::new(1, 10).unwrap()).unwrap();
    /// let t = tenant.clone();
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "served" }))
    ///     .layer(TenantLayer::new(move |_: &Request<Body>| Some(t.clone())).refuse_with(
    ///         |e: Exceeded| (StatusCode::INSUFFICIENT_STORAGE, e.to_string()).into_response(),
    ///     ));
    /// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// let status = |app: Router| {
    ///     let req = Request::builder().body(Body::empty()).unwrap();
    ///     rt.block_on(app.oneshot(req)).unwrap().status()
    /// };
    /// assert_eq!(status(app.clone()), StatusCode::OK);
    /// // Over the barrier (any resource counts):
    /// let over = tenant.charge(Resource::Threads, 2, Severity::Limit).unwrap();
    /// assert_eq!(status(app.clone()), StatusCode::INSUFFICIENT_STORAGE);
    /// drop(over);
    /// assert_eq!(status(app), StatusCode::OK);
    /// ```
    pub fn refuse_with<R2>(self, refuse: R2) -> TenantLayer<P, R2> {
        TenantLayer {
            pick: self.pick,
            refuse,
        }
    }
}

impl<P, R> fmt::Debug for TenantLayer<P, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantLayer").finish_non_exhaustive()
    }
}

impl<S, P: Clone, R: Clone> Layer<S> for TenantLayer<P, R> {
    type Service = TenantService<S, P, R>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantService {
            inner,
            pick: self.pick.clone(),
            refuse: self.refuse.clone(),
        }
    }
}

/// The service a [`TenantLayer`] makes: runs each request of the inner service in the tenant
/// its pick closure returns.
///
/// # Examples
/// ```
/// use beancounter::{tower::{TenantLayer, TenantService}, BcId};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// let tenant = beancounter::find_or_create(BcId(73)).unwrap();
/// let svc = TenantLayer::new(move |_: &()| Some(tenant.clone())).layer(service_fn(|()| async {
///     Ok::<_, std::convert::Infallible>(beancounter::current_id())
/// }));
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// assert_eq!(rt.block_on(svc.get_ref().clone().oneshot(())), Ok(BcId::ROOT)); // the inner one
/// assert_eq!(rt.block_on(svc.oneshot(())), Ok(BcId(73)));
/// ```
#[derive(Clone)]
pub struct TenantService<S, P, R = Unguarded> {
    inner: S,
    pick: P,
    refuse: R,
}

impl<S, P, R> TenantService<S, P, R> {
    /// The wrapped service.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{tower::TenantLayer, Beancounter};
    /// use tower::Layer;
    /// let svc = TenantLayer::new(|_: &()| -> Option<Beancounter> { None }).layer(7u8);
    /// assert_eq!(*svc.get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, unwrapped.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{tower::TenantLayer, Beancounter};
    /// use tower::Layer;
    /// let svc = TenantLayer::new(|_: &()| -> Option<Beancounter> { None }).layer(7u8);
    /// assert_eq!(svc.into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug, P, R> fmt::Debug for TenantService<S, P, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, P, Req> Service<Req> for TenantService<S, P, Unguarded>
where
    S: Service<Req>,
    P: Fn(&Req) -> Option<Beancounter>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TenantFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let state = match (self.pick)(&req) {
            None => TenantState::Here {
                fut: self.inner.call(req),
            },
            Some(tenant) => {
                let fut = {
                    let _in = tenant.enter_lent();
                    self.inner.call(req)
                };
                TenantState::Inside {
                    fut: fut.in_beancounter(&tenant),
                }
            }
        };
        TenantFuture { state }
    }
}

impl<S, P, R, Req> Service<Req> for TenantService<S, P, R>
where
    S: Service<Req>,
    P: Fn(&Req) -> Option<Beancounter>,
    R: Fn(Exceeded) -> S::Response + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = GuardedTenantFuture<S::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let state = match (self.pick)(&req) {
            None => GuardedState::Here {
                fut: self.inner.call(req),
            },
            Some(tenant) => match tenant.check_barrier() {
                Err(e) => GuardedState::Refused {
                    refusal: Some((e, self.refuse.clone())),
                },
                Ok(()) => {
                    let fut = {
                        let _in = tenant.enter_lent();
                        self.inner.call(req)
                    };
                    GuardedState::Guarded {
                        fut: fut.guarded(&tenant),
                        refuse: self.refuse.clone(),
                    }
                }
            },
        };
        GuardedTenantFuture { state }
    }
}

pin_project! {
    /// The response future of a [`TenantService`] made by [`TenantLayer::new`]: the inner
    /// future, polled inside the request's tenant (or as it is, for `None`).
    ///
    /// # Examples
    /// ```
    /// use beancounter::tower::{TenantFuture, TenantLayer};
    /// use tower::{service_fn, Layer, Service};
    /// let mut svc = TenantLayer::new(|_: &()| None)
    ///     .layer(service_fn(|()| async { Ok::<u8, ()>(1) }));
    /// let fut: TenantFuture<_> = svc.call(());
    /// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// assert_eq!(rt.block_on(fut), Ok(1));
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct TenantFuture<F> {
        #[pin]
        state: TenantState<F>,
    }
}

pin_project! {
    #[project = TenantStateProj]
    enum TenantState<F> {
        Here { #[pin] fut: F },
        Inside { #[pin] fut: InBeancounter<F> },
    }
}

impl<F: Future> Future for TenantFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().state.project() {
            TenantStateProj::Here { fut } => fut.poll(cx),
            TenantStateProj::Inside { fut } => fut.poll(cx),
        }
    }
}

impl<F> fmt::Debug for TenantFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inside = matches!(self.state, TenantState::Inside { .. });
        f.debug_struct("TenantFuture")
            .field("in_tenant", &inside)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The response future of a [`TenantService`] made by [`TenantLayer::refuse_with`]: the
    /// inner future polled inside the request's tenant, or the refusal once the tenant is over
    /// its barrier.
    ///
    /// # Panics
    /// When polled again after it completed.
    ///
    /// # Examples
    /// ```
    /// use beancounter::{tower::{GuardedTenantFuture, TenantLayer}, BcId, Exceeded};
    /// use tower::{service_fn, Layer, Service};
    /// let t = beancounter::find_or_create(BcId(74)).unwrap();
    /// let mut svc = TenantLayer::new(move |_: &()| Some(t.clone()))
    ///     .refuse_with(|e: Exceeded| e.id.0)
    ///     .layer(service_fn(|()| async { Ok::<u32, ()>(0) }));
    /// let fut: GuardedTenantFuture<_, _> = svc.call(());
    /// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// assert_eq!(rt.block_on(fut), Ok(0)); // within its barrier: served
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct GuardedTenantFuture<F, R> {
        #[pin]
        state: GuardedState<F, R>,
    }
}

pin_project! {
    #[project = GuardedStateProj]
    enum GuardedState<F, R> {
        Here { #[pin] fut: F },
        Guarded { #[pin] fut: Guarded<F>, refuse: R },
        Refused { refusal: Option<(Exceeded, R)> },
    }
}

impl<F, R, T, E> Future for GuardedTenantFuture<F, R>
where
    F: Future<Output = Result<T, E>>,
    R: Fn(Exceeded) -> T,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        match self.project().state.project() {
            GuardedStateProj::Here { fut } => fut.poll(cx),
            GuardedStateProj::Guarded { fut, refuse } => match ready!(fut.poll(cx)) {
                Ok(out) => Poll::Ready(out),
                // The inner future was dropped inside the tenant; the refusal is the host's.
                Err(e) => Poll::Ready(Ok(refuse(e))),
            },
            GuardedStateProj::Refused { refusal } => {
                let (e, refuse) = refusal
                    .take()
                    .expect("GuardedTenantFuture polled after completion");
                Poll::Ready(Ok(refuse(e)))
            }
        }
    }
}

impl<F, R> fmt::Debug for GuardedTenantFuture<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            GuardedState::Here { .. } => "here",
            GuardedState::Guarded { .. } => "guarded",
            GuardedState::Refused { .. } => "refused",
        };
        f.debug_struct("GuardedTenantFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}
