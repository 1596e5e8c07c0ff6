//! The proxy's telemetry, from mesh-telemetry: request ids and trace context on every
//! request (Istio's default 1 % sampling for new traces; the `MeshProxy`'s propagators), a
//! server span per sampled request when a collector is configured (the client span of each
//! try is started in the stack's cluster service), Istio's request metrics for both
//! listeners, served on the admin server's `/metrics` with the proxy's own series
//! (`proxy_metrics.rs`), and the JSON access log (`--access-log`).
//!
//! The labels that do not change per request are resolved once per authority (outbound:
//! `destination_service`) or per peer identity (inbound: `source_principal`,
//! `source_workload_namespace`) and cached; at most [`MAX_SERIES_KEYS`] of each, beyond
//! which the value is `unknown`, so that a client cannot grow the series without bound.
//! Per request only the status, gRPC status and flags are added.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use mesh_core::ResponseFlags;
use mesh_telemetry::Registry;
use mesh_telemetry::metrics::{IstioMetrics, PeerMetrics, Peers, Reporter, SeriesByKey};
use tokio::time::Instant;

use crate::body::{BodyEnd, ProxyBody, RequestBody};

/// The most authorities (or peers) given series of their own.
pub(crate) const MAX_SERIES_KEYS: usize = 1024;

/// Telemetry shared by both listeners.
pub(crate) struct Telemetry {
    pub(crate) registry: Mutex<Registry>,
    pub(crate) access_log: Option<mesh_telemetry::access_log::AccessLog>,
    /// The trace rules of the current snapshot (its Telemetry sampling).
    trace: arc_swap::ArcSwap<mesh_telemetry::trace::TraceLayer>,
    /// Where server spans go, if anywhere.
    tracer: Option<mesh_telemetry::span::Tracer>,
    /// The trace context formats (none configured: the layer's default).
    propagators: Box<[mesh_telemetry::propagation::Propagator]>,
    /// The current snapshot's Telemetry `customTags`.
    span_tags: arc_swap::ArcSwap<Vec<crate::snapshot::SpanTag>>,
    /// The current snapshot's Telemetry turned access logging off.
    logging_off: std::sync::atomic::AtomicBool,
    /// Series by destination authority (outbound) and by caller identity (inbound).
    outbound: SeriesByKey,
    inbound: SeriesByKey,
    /// Requests between their head and the end of their response: outbound, inbound.
    pub(crate) in_flight: Arc<[std::sync::atomic::AtomicI64; 2]>,
}

/// The workload this proxy runs beside.
pub(crate) struct Workload {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) app: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) principal: Option<String>,
}

impl Telemetry {
    pub(crate) fn new(
        workload: &Workload,
        access_log: Option<mesh_telemetry::access_log::AccessLog>,
        tracer: Option<mesh_telemetry::span::Tracer>,
        propagators: &[mesh_telemetry::propagation::Propagator],
    ) -> Arc<Self> {
        let mut registry = Registry::default();
        let metrics = IstioMetrics::register(&mut registry);
        let name: Arc<str> = workload.name.as_str().into();
        let ns: Arc<str> = workload.namespace.as_str().into();
        let app: Arc<str> = workload.app.as_deref().unwrap_or("unknown").into();
        let version: Arc<str> = workload.version.as_deref().unwrap_or("unknown").into();
        let principal: Arc<str> = workload.principal.as_deref().unwrap_or("unknown").into();
        let mut out = Peers::unknown(Reporter::Source);
        out.source_workload = name.clone();
        out.source_workload_namespace = ns.clone();
        out.source_app = app.clone();
        out.source_version = version.clone();
        out.source_principal = principal.clone();
        let mut inb = Peers::unknown(Reporter::Destination);
        inb.destination_workload = name;
        inb.destination_workload_namespace = ns;
        inb.destination_app = app;
        inb.destination_version = version;
        inb.destination_principal = principal;
        inb.connection_security_policy = "none".into();
        Arc::new(Self {
            registry: Mutex::new(registry),
            access_log,
            trace: arc_swap::ArcSwap::from_pointee(trace_layer(1.0, tracer.as_ref(), propagators)),
            tracer,
            propagators: propagators.into(),
            span_tags: arc_swap::ArcSwap::from_pointee(Vec::new()),
            logging_off: std::sync::atomic::AtomicBool::new(false),
            outbound: SeriesByKey::new(&metrics, out, MAX_SERIES_KEYS),
            inbound: SeriesByKey::new(&metrics, inb, MAX_SERIES_KEYS),
            in_flight: Arc::default(),
        })
    }

    /// Applies a snapshot's Telemetry: the sampling of new traces (Istio's 1 % when unset)
    /// and the access-log switch.
    pub(crate) fn configure(&self, snapshot: &crate::snapshot::Snapshot) {
        let sampling = snapshot.trace_sampling.unwrap_or(1.0);
        // Telemetry's `disableSpanReporting`: propagate, record nothing.
        let tracer = self.tracer.as_ref().filter(|_| !snapshot.span_reporting_disabled);
        self.trace.store(Arc::new(trace_layer(sampling, tracer, &self.propagators)));
        self.span_tags.store(Arc::new(snapshot.span_tags.clone()));
        self.logging_off.store(snapshot.access_log_disabled, std::sync::atomic::Ordering::Relaxed);
    }

    /// Gives `req` its request id and trace context.
    pub(crate) fn trace(&self, req: &mut Request<RequestBody>) {
        self.trace.load().apply(req);
    }

    /// The span exporter, for the flush at exit.
    pub(crate) fn tracer(&self) -> Option<&mesh_telemetry::span::Tracer> {
        self.tracer.as_ref()
    }

    /// `/metrics`, in the Prometheus text format.
    pub(crate) fn encode(&self) -> String {
        mesh_telemetry::metrics::encode(&self.registry.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// What a request's record needs, read before it goes down the stack.
    pub(crate) fn start(&self, req: &Request<RequestBody>, inbound: bool) -> Started {
        let grpc = crate::reply::is_grpc(req.headers());
        let peers = if inbound {
            match mesh_core::PeerIdentity::of(req.extensions()) {
                Some(peer) => self.inbound.for_caller(peer),
                None => self.inbound.base().clone(),
            }
        } else {
            let host =
                req.uri().host().or_else(|| req.headers().get(http::header::HOST)?.to_str().ok()?.split(':').next());
            match host {
                Some(host) => self.outbound.get(host, |base| {
                    let mut p = base.clone();
                    p.destination_service = host.into();
                    p.destination_service_name = host.split('.').next().unwrap_or(host).into();
                    p
                }),
                None => self.outbound.base().clone(),
            }
        };
        let request_bytes =
            req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        let logging = !self.logging_off.load(std::sync::atomic::Ordering::Relaxed);
        let entry = self.access_log.as_ref().filter(|log| logging && log.sampled()).map(|_| {
            let h = req.headers();
            let text = |name: http::header::HeaderName| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let protocol = match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            };
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let mut e = mesh_telemetry::access_log::Entry::new(req.method().as_str(), path, protocol);
            e.authority = req.uri().authority().map(|a| a.to_string()).or_else(|| text(http::header::HOST));
            e.user_agent = text(http::header::USER_AGENT);
            e.x_forwarded_for = text(http::header::HeaderName::from_static("x-forwarded-for"));
            e.request_id = mesh_telemetry::trace::RequestId::of(req.headers()).map(std::sync::Arc::from);
            e.trace_id = req.extensions().get::<mesh_telemetry::propagation::TraceContext>().map(|t| t.trace_id_hex());
            e.peer_identity = mesh_core::PeerIdentity::of(req.extensions()).map(|p| p.to_string());
            if let Some(c) = mesh_core::ClientConnection::of(req.extensions()) {
                e.downstream_remote_address = Some(c.peer);
                e.downstream_local_address = Some(c.local);
            }
            Box::new(e)
        });
        let mut span = self.trace.load().server_span(req);
        if let Some(span) = &mut span {
            for tag in self.span_tags.load().iter() {
                match tag {
                    crate::snapshot::SpanTag::Literal { name, value } => {
                        span.set_attribute(mesh_telemetry::span::KeyValue::new(name.clone(), value.clone()));
                    }
                    crate::snapshot::SpanTag::Header { name, header, default } => {
                        let value = req.headers().get(header).and_then(|v| v.to_str().ok()).or(default.as_deref());
                        if let Some(value) = value {
                            span.set_attribute(mesh_telemetry::span::KeyValue::new(name.clone(), value.to_owned()));
                        }
                    }
                }
            }
        }
        let in_flight = InFlightGuard::new(self.in_flight.clone(), usize::from(inbound));
        Started { peers, grpc, request_bytes, at: Instant::now(), entry, span, tried: None, _in_flight: in_flight }
    }

    /// Records the request once `res`'s body has ended.
    pub(crate) fn finish(self: &Arc<Self>, started: Started, res: &mut Response<ProxyBody>) {
        let code = res.status().as_u16();
        let grpc_head = res.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok());
        let flags = ResponseFlags::of(res.extensions());
        // The host that answered, or else the last one tried (a request that got no answer).
        let upstream_host = res
            .extensions()
            .get::<mesh_core::UpstreamHost>()
            .map(|h| h.0.clone())
            .or_else(|| started.tried.as_ref().and_then(TriedUpstream::get));
        let telemetry = self.clone();
        res.body_mut().on_end(Box::new(move |end, sent| {
            let grpc_status = match end {
                BodyEnd::Trailers(t) => t.get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok()).or(grpc_head),
                _ => grpc_head,
            };
            let mut flags = flags;
            if matches!(end, BodyEnd::Dropped) {
                flags.insert(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
            }
            let grpc_status = grpc_status.filter(|_| started.grpc);
            let elapsed = started.at.elapsed();
            if let Some(mut span) = started.span {
                span.set_status_code(code);
                if !flags.is_empty() {
                    span.set_attribute(mesh_telemetry::span::KeyValue::new("response_flags", flags.to_string()));
                }
                if let Some(host) = &upstream_host {
                    span.set_attribute(mesh_telemetry::span::KeyValue::new("upstream.address", host.to_string()));
                }
            }
            if let (Some(log), Some(mut e)) = (&telemetry.access_log, started.entry) {
                e.response_code = code;
                e.response_flags = flags;
                e.bytes_received = started.request_bytes;
                e.bytes_sent = sent;
                e.duration = elapsed;
                e.upstream_host = upstream_host;
                log.log(e);
            }
            started.peers.record(started.grpc, code, grpc_status, flags, elapsed, started.request_bytes, sent);
        }));
    }
}

/// A request on its way down the stack.
pub(crate) struct Started {
    peers: Arc<PeerMetrics>,
    grpc: bool,
    request_bytes: u64,
    at: Instant,
    /// The access log's entry, when this request is logged.
    entry: Option<Box<mesh_telemetry::access_log::Entry>>,
    /// The server span, when sampled and exported (ended with the response body).
    span: Option<mesh_telemetry::span::Span>,
    /// The endpoints the stack tries record themselves here (logged requests only).
    tried: Option<TriedUpstream>,
    /// Counted in flight until the record is made, or the request is abandoned (its client
    /// cancelled it before a response): dropped either way.
    _in_flight: InFlightGuard,
}

impl Started {
    /// For a logged request, a record of the endpoint each try picks, put in `req`'s
    /// extensions: a request no endpoint answered (refused, reset, timed out) is logged with
    /// the last endpoint tried, as Envoy logs `upstream_host`.
    pub(crate) fn track_upstream(&mut self, req: &mut Request<RequestBody>) {
        if self.entry.is_some() {
            let tried = TriedUpstream::default();
            req.extensions_mut().insert(tried.clone());
            self.tried = Some(tried);
        }
    }
}

/// The last endpoint a request was sent to (see [`Started::track_upstream`]).
#[derive(Clone, Default)]
pub(crate) struct TriedUpstream(Arc<std::sync::Mutex<Option<Arc<str>>>>);

impl TriedUpstream {
    /// Records `host` as tried.
    pub(crate) fn set(&self, host: &Arc<str>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(host.clone());
    }

    fn get(&self) -> Option<Arc<str>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One request in `mesh_requests_in_flight` while held.
struct InFlightGuard {
    gauge: Arc<[std::sync::atomic::AtomicI64; 2]>,
    direction: usize,
}

impl InFlightGuard {
    fn new(gauge: Arc<[std::sync::atomic::AtomicI64; 2]>, direction: usize) -> Self {
        gauge[direction].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self { gauge, direction }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gauge[self.direction].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn trace_layer(
    sampling: f64,
    tracer: Option<&mesh_telemetry::span::Tracer>,
    propagators: &[mesh_telemetry::propagation::Propagator],
) -> mesh_telemetry::trace::TraceLayer {
    let mut layer = mesh_telemetry::trace::TraceLayer::new().sampling_percentage(sampling);
    if !propagators.is_empty() {
        layer = layer.propagators(propagators);
    }
    match tracer {
        Some(t) => layer.tracer(t.clone()),
        None => layer,
    }
}
