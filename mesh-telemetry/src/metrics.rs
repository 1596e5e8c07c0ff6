//! Prometheus metrics with Istio's names and labels (SEMANTICS.md 9.1), registered into the
//! registry the service passes in, so they sit beside its own.
//!
//! [`IstioMetrics`] holds `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes`, with Envoy's default buckets (Istio sets
//! none of its own). [`MetricsLayer`] records every request once its response body has ended
//! (or been dropped): the status (`0` when no response was sent), the gRPC status from the
//! head or the trailers, the response flags other layers recorded, the duration from the
//! request to the end of the response, and the body bytes each way.
//!
//! The labels that do not change per request (reporter, workloads, principals, service) are
//! built once into a [`Peers`] value and shared; per request only the status, gRPC status and
//! flags are added, and the series is looked up in its family.
//!
//! Request and response sizes are the bodies' bytes (`content-length` when the request
//! declares one, else what the request body is known to be), not wire bytes with headers.
//!
//! The choice of crate: `prometheus-client` (the Prometheus organisation's, which
//! linkerd2-proxy uses) over `prometheus` (no release since March 2025, no OpenMetrics); it
//! appends `_total` to counters itself and encodes both the Prometheus text format (what
//! `/metrics` serves) and OpenMetrics.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_core::ResponseFlags;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

/// Envoy's default histogram buckets, which Istio's metrics use (milliseconds and bytes).
pub const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Who reports: the client's proxy (`source`) or the server's (`destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client side.
    Source,
    /// The server side.
    Destination,
}

/// The labels fixed for a workload and route: who calls whom. `unknown` where a value is not
/// known, as Istio writes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peers {
    /// `reporter`.
    pub reporter: Reporter,
    /// `source_workload`.
    pub source_workload: Arc<str>,
    /// `source_workload_namespace`.
    pub source_workload_namespace: Arc<str>,
    /// `source_principal` (a SPIFFE ID).
    pub source_principal: Arc<str>,
    /// `source_app`.
    pub source_app: Arc<str>,
    /// `source_version`.
    pub source_version: Arc<str>,
    /// `destination_workload`.
    pub destination_workload: Arc<str>,
    /// `destination_workload_namespace`.
    pub destination_workload_namespace: Arc<str>,
    /// `destination_principal`.
    pub destination_principal: Arc<str>,
    /// `destination_app`.
    pub destination_app: Arc<str>,
    /// `destination_version`.
    pub destination_version: Arc<str>,
    /// `destination_service` (the FQDN).
    pub destination_service: Arc<str>,
    /// `destination_service_name`.
    pub destination_service_name: Arc<str>,
    /// `destination_service_namespace`.
    pub destination_service_namespace: Arc<str>,
    /// `connection_security_policy`: `mutual_tls`, `none`, or `unknown` (source reporter).
    pub connection_security_policy: Arc<str>,
}

impl Peers {
    /// Every label `unknown`, for `reporter`.
    pub fn unknown(reporter: Reporter) -> Self {
        let u: Arc<str> = Arc::from("unknown");
        Self {
            reporter,
            source_workload: u.clone(),
            source_workload_namespace: u.clone(),
            source_principal: u.clone(),
            source_app: u.clone(),
            source_version: u.clone(),
            destination_workload: u.clone(),
            destination_workload_namespace: u.clone(),
            destination_principal: u.clone(),
            destination_app: u.clone(),
            destination_version: u.clone(),
            destination_service: u.clone(),
            destination_service_name: u.clone(),
            destination_service_namespace: u.clone(),
            connection_security_policy: u,
        }
    }

    /// These labels for a caller an mTLS acceptor identified: its `source_principal`, the
    /// namespace its SPIFFE ID names, and `connection_security_policy="mutual_tls"`.
    pub fn with_mtls_caller(&self, peer: &mesh_core::SpiffeId) -> Self {
        let mut p = self.clone();
        p.source_principal = peer.as_str().into();
        if let Some(ns) = peer.namespace() {
            p.source_workload_namespace = ns.into();
        }
        p.connection_security_policy = "mutual_tls".into();
        p
    }

    /// The labels a service reports about the requests it serves: reporter `destination`,
    /// this `workload` (also its app) in `namespace`, no transport security; the caller
    /// `unknown`.
    pub fn destination(workload: &str, namespace: &str) -> Self {
        let mut p = Self::unknown(Reporter::Destination);
        p.destination_workload = workload.into();
        p.destination_app = workload.into();
        p.destination_workload_namespace = namespace.into();
        p.destination_service_namespace = namespace.into();
        p.connection_security_policy = "none".into();
        p
    }
}

/// One series: the fixed labels and the request's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    /// Who calls whom.
    pub peers: Arc<Peers>,
    /// `request_protocol`: `http` or `grpc`.
    pub grpc: bool,
    /// `response_code` (0: no response was sent).
    pub response_code: u16,
    /// `grpc_response_status` (`""` when absent).
    pub grpc_status: Option<u32>,
    /// `response_flags` (`-` when none).
    pub flags: ResponseFlags,
}

struct Str<'a>(&'a str);

impl EncodeLabelValue for Str<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.0)
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        let p = &self.peers;
        let reporter = match p.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        };
        let code = self.response_code.to_string();
        let grpc = self.grpc_status.map(|g| g.to_string()).unwrap_or_default();
        let flags =
            if self.flags.is_empty() { "-".to_owned() } else { self.flags.names().collect::<Vec<_>>().join(",") };
        let pairs: [(&str, &str); 19] = [
            ("reporter", reporter),
            ("source_workload", &p.source_workload),
            ("source_workload_namespace", &p.source_workload_namespace),
            ("source_principal", &p.source_principal),
            ("source_app", &p.source_app),
            ("source_version", &p.source_version),
            ("destination_workload", &p.destination_workload),
            ("destination_workload_namespace", &p.destination_workload_namespace),
            ("destination_principal", &p.destination_principal),
            ("destination_app", &p.destination_app),
            ("destination_version", &p.destination_version),
            ("destination_service", &p.destination_service),
            ("destination_service_name", &p.destination_service_name),
            ("destination_service_namespace", &p.destination_service_namespace),
            ("request_protocol", if self.grpc { "grpc" } else { "http" }),
            ("response_code", &code),
            ("grpc_response_status", &grpc),
            ("response_flags", &flags),
            ("connection_security_policy", &p.connection_security_policy),
        ];
        for (name, value) in pairs {
            let mut label = encoder.encode_label();
            let mut key = label.encode_label_key()?;
            fmt::Write::write_str(&mut key, name)?;
            let mut v = key.encode_label_value()?;
            Str(value).encode(&mut v)?;
            v.finish()?;
        }
        Ok(())
    }
}

type Hist = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn buckets() -> Histogram {
    Histogram::new(ENVOY_BUCKETS)
}

/// Istio's request metrics. Clones share the series.
#[derive(Clone)]
pub struct IstioMetrics {
    inner: Arc<Families>,
}

struct Families {
    requests: Family<RequestLabels, Counter>,
    duration: Hist,
    request_bytes: Hist,
    response_bytes: Hist,
    /// The four handles of each series, by the identity of its fixed labels and the outcome:
    /// a request hashes a few integers, not twenty label strings four times.
    series: std::sync::Mutex<HashMap<SeriesKey, Arc<Series>>>,
}

/// A series' key: the fixed labels by identity (the `Arc` held keeps the address unique)
/// and the outcome.
#[derive(Clone)]
struct SeriesKey {
    peers: Arc<Peers>,
    grpc: bool,
    code: u16,
    grpc_status: Option<u32>,
    flags: ResponseFlags,
}

impl PartialEq for SeriesKey {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.peers, &o.peers)
            && (self.grpc, self.code, self.grpc_status, self.flags) == (o.grpc, o.code, o.grpc_status, o.flags)
    }
}

impl Eq for SeriesKey {}

impl std::hash::Hash for SeriesKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (Arc::as_ptr(&self.peers) as usize, self.grpc, self.code, self.grpc_status, self.flags).hash(h);
    }
}

struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Series {
    fn observe(&self, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// The series of one set of fixed labels ([`Peers`]), resolved once, when the peer or
/// destination is first seen (see [`IstioMetrics::for_peers`]), rather than per request: a
/// request with the common outcome (200, or gRPC OK, and no flags) records through handles
/// held here, without a lock or a hash; others look their series up.
pub struct PeerMetrics {
    metrics: IstioMetrics,
    peers: Arc<Peers>,
    /// The series of a 200 without flags: HTTP, then gRPC with status 0.
    ok: [std::sync::OnceLock<Arc<Series>>; 2],
}

impl fmt::Debug for PeerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerMetrics").field("peers", &self.peers).finish_non_exhaustive()
    }
}

impl PeerMetrics {
    /// The fixed labels.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Records one request with these labels and its outcome (`grpc_status` only for gRPC).
    #[expect(clippy::too_many_arguments, reason = "one request's record, each a plain value")]
    pub fn record(
        &self,
        grpc: bool,
        code: u16,
        grpc_status: Option<u32>,
        flags: ResponseFlags,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let labels = || RequestLabels { peers: self.peers.clone(), grpc, response_code: code, grpc_status, flags };
        let common = code == 200 && flags.is_empty() && grpc_status == if grpc { Some(0) } else { None };
        if common {
            let series = self.ok[usize::from(grpc)].get_or_init(|| self.metrics.series(&labels()));
            series.observe(duration, request_bytes, response_bytes);
        } else {
            self.metrics.series(&labels()).observe(duration, request_bytes, response_bytes);
        }
    }
}

/// Series handles kept before the cache is cleared (the label space is bounded by the
/// caller; this bounds the memory of distinct `Peers` values made per request).
const MAX_CACHED_SERIES: usize = 16_384;

impl fmt::Debug for IstioMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IstioMetrics").finish_non_exhaustive()
    }
}

impl IstioMetrics {
    /// Makes the metrics and registers them into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Families {
            requests: Family::default(),
            duration: Family::new_with_constructor(buckets as fn() -> Histogram),
            request_bytes: Family::new_with_constructor(buckets as fn() -> Histogram),
            response_bytes: Family::new_with_constructor(buckets as fn() -> Histogram),
            series: std::sync::Mutex::default(),
        };
        registry.register("istio_requests", "Requests, counted when they end", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "From the request to the end of its response, in milliseconds",
            m.duration.clone(),
        );
        registry.register("istio_request_bytes", "Request body sizes, in bytes", m.request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes, in bytes", m.response_bytes.clone());
        Self { inner: Arc::new(m) }
    }

    /// The handles of the series with the fixed labels `peers`: resolve them once per
    /// destination or peer and record through them.
    pub fn for_peers(&self, peers: Arc<Peers>) -> Arc<PeerMetrics> {
        Arc::new(PeerMetrics { metrics: self.clone(), peers, ok: Default::default() })
    }

    /// Records one request.
    pub fn record(&self, labels: &RequestLabels, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.series(labels).observe(duration, request_bytes, response_bytes);
    }

    /// The handles of `labels`' series, from the cache or made.
    fn series(&self, labels: &RequestLabels) -> Arc<Series> {
        let m = &*self.inner;
        let key = SeriesKey {
            peers: labels.peers.clone(),
            grpc: labels.grpc,
            code: labels.response_code,
            grpc_status: labels.grpc_status,
            flags: labels.flags,
        };
        let cached = m.series.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        match cached {
            Some(s) => s,
            None => {
                let s = Arc::new(Series {
                    requests: m.requests.get_or_create_owned(labels),
                    duration: m.duration.get_or_create_owned(labels),
                    request_bytes: m.request_bytes.get_or_create_owned(labels),
                    response_bytes: m.response_bytes.get_or_create_owned(labels),
                });
                let mut map = m.series.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() >= MAX_CACHED_SERIES {
                    map.clear();
                }
                map.insert(key, s.clone());
                s
            }
        }
    }
}

/// Serves `registry` in the Prometheus text format (for a `/metrics` route).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A `/metrics` endpoint as a tower service: every request is answered with the registry's
/// exposition. Mount it with axum's `Router::route_service("/metrics", …)`, or serve it with
/// hyper through hyper-util's `TowerToHyperService`.
#[derive(Clone, Debug)]
pub struct MetricsService {
    registry: Arc<std::sync::Mutex<Registry>>,
}

impl MetricsService {
    /// Serves `registry`, which the service can keep registering into meanwhile.
    pub fn new(registry: Arc<std::sync::Mutex<Registry>>) -> Self {
        Self { registry }
    }
}

impl<B> tower::Service<Request<B>> for MetricsService {
    type Response = Response<String>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Response<String>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        let text = encode(&self.registry.lock().unwrap_or_else(|p| p.into_inner()));
        let mut res = Response::new(text);
        res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(CONTENT_TYPE));
        std::future::ready(Ok(res))
    }
}

// === the layer ===

/// The most keys (peer identities, destinations) a [`SeriesByKey`] gives series of their own.
pub const MAX_PEERS: usize = 1024;

/// Series handles by a key (a caller's identity, a destination's authority), each with labels
/// derived from a base set, bounded: past `max` keys the rest share the base labels, so that
/// callers cannot grow the series without end.
#[derive(Debug)]
pub struct SeriesByKey {
    metrics: IstioMetrics,
    base: Arc<PeerMetrics>,
    map: std::sync::Mutex<HashMap<Box<str>, Arc<PeerMetrics>>>,
    max: usize,
}

impl SeriesByKey {
    /// Keys over `base`, at most `max` of them.
    pub fn new(metrics: &IstioMetrics, base: Peers, max: usize) -> Self {
        let base = metrics.for_peers(Arc::new(base));
        Self { metrics: metrics.clone(), base, map: std::sync::Mutex::default(), max }
    }

    /// The series of the base labels.
    pub fn base(&self) -> &Arc<PeerMetrics> {
        &self.base
    }

    /// The series of `key`, made from the base labels by `make` when first seen.
    pub fn get(&self, key: &str, make: impl FnOnce(&Peers) -> Peers) -> Arc<PeerMetrics> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(key) {
            return s.clone();
        }
        if map.len() >= self.max {
            return self.base.clone();
        }
        let series = self.metrics.for_peers(Arc::new(make(self.base.peers())));
        map.insert(key.into(), series.clone());
        series
    }

    /// The series of a caller an mTLS acceptor identified ([`Peers::with_mtls_caller`]).
    pub fn for_caller(&self, peer: &mesh_core::SpiffeId) -> Arc<PeerMetrics> {
        self.get(peer.as_str(), |base| base.with_mtls_caller(peer))
    }
}

/// Records [`IstioMetrics`] for every request (see the module docs).
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    series: Arc<SeriesByKey>,
    /// Reporter `destination`: each calling identity gets series of its own.
    by_caller: bool,
}

impl MetricsLayer {
    /// Records into `metrics`, with `peers` as the fixed labels (their series resolved now).
    /// With reporter `destination`, a request whose caller an mTLS acceptor identified (the
    /// `PeerIdentity` extension) is reported with its `source_principal`, its namespace and
    /// `connection_security_policy="mutual_tls"`, as Istio's server side does (at most
    /// [`MAX_PEERS`] identities).
    pub fn new(metrics: IstioMetrics, peers: Peers) -> Self {
        let by_caller = peers.reporter == Reporter::Destination;
        Self { series: Arc::new(SeriesByKey::new(&metrics, peers, MAX_PEERS)), by_caller }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics { inner, layer: self.clone() }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct Metrics<S> {
    inner: S,
    layer: MetricsLayer,
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

impl<S, B, RB> tower::Service<Request<B>> for Metrics<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    B: Body,
{
    type Response = Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let request_bytes = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .or_else(|| req.body().size_hint().exact())
            .unwrap_or(0);
        let pending = Pending {
            series: match mesh_core::PeerIdentity::of(req.extensions()).filter(|_| self.layer.by_caller) {
                Some(peer) => self.layer.series.for_caller(peer),
                None => self.layer.series.base().clone(),
            },
            grpc: is_grpc(req.headers()),
            start: Instant::now(),
            request_bytes,
        };
        MeteredFuture { future: self.inner.call(req), pending: Some(pending) }
    }
}

struct Pending {
    series: Arc<PeerMetrics>,
    grpc: bool,
    start: Instant,
    request_bytes: u64,
}

impl Pending {
    fn record(self, code: u16, grpc_status: Option<u32>, flags: ResponseFlags, response_bytes: u64) {
        let grpc_status = grpc_status.filter(|_| self.grpc);
        self.series.record(
            self.grpc,
            code,
            grpc_status,
            flags,
            self.start.elapsed(),
            self.request_bytes,
            response_bytes,
        );
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Metrics`].
    pub struct MeteredFuture<F> {
        #[pin]
        future: F,
        pending: Option<Pending>,
    }

    impl<F> PinnedDrop for MeteredFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before a response: the client went away (Envoy's 0 and DC).
            if let Some(pending) = this.project().pending.take() {
                pending.record(0, None, ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION, 0);
            }
        }
    }
}

impl<F, RB, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<MeteredBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx));
        let pending = this.pending.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(res) => {
                let code = res.status().as_u16();
                let grpc_status = grpc_status(res.headers());
                let flags = res.extensions().get::<ResponseFlags>().copied().unwrap_or_default();
                Ok(res.map(|body| MeteredBody {
                    body,
                    state: Some(BodyState { pending, code, grpc_status, flags, bytes: 0 }),
                }))
            }
            Err(e) => {
                // The inner service failed without a response (the server answers it, not
                // this layer): recorded as no response.
                pending.record(0, None, ResponseFlags::empty(), 0);
                Err(e)
            }
        })
    }
}

struct BodyState {
    pending: Pending,
    code: u16,
    grpc_status: Option<u32>,
    flags: ResponseFlags,
    bytes: u64,
}

impl BodyState {
    fn finish(self) {
        self.pending.record(self.code, self.grpc_status, self.flags, self.bytes);
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its request when it ends or is dropped.
    pub struct MeteredBody<B> {
        #[pin]
        body: B,
        state: Option<BodyState>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(state) = this.project().state.take() {
                state.finish();
            }
        }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.body.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(state) = this.state.as_mut() {
                    if let Some(data) = f.data_ref() {
                        state.bytes += data.remaining() as u64;
                    }
                    if let Some(status) = f.trailers_ref().and_then(grpc_status) {
                        state.grpc_status = Some(status);
                    }
                }
                if this.body.is_end_stream()
                    && let Some(state) = this.state.take()
                {
                    state.finish();
                }
            }
            Some(Err(_)) => {
                if let Some(mut state) = this.state.take() {
                    state.flags.insert(ResponseFlags::UPSTREAM_REMOTE_RESET);
                    state.finish();
                }
            }
            None => {
                if let Some(state) = this.state.take() {
                    state.finish();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
