//! Spans, exported with OpenTelemetry's SDK: a server span for each request a sidecar (or an
//! embedding service) receives, and a client span for each attempt it sends upstream, so that
//! retries are separate children of the request they retry.
//!
//! The span ids are the ones [`TraceContext`] carries on the wire, so the span a request's
//! next hop names as its parent is the client span exported here. Only sampled spans are
//! recorded; an unsampled request costs no allocation here.
//!
//! A [`Tracer`] hands ended spans to an SDK [`SpanProcessor`]: [`OtlpExport`] builds the
//! usual one, a batch processor running on tokio whose queue drops spans when full rather
//! than block a request, exporting OTLP over gRPC (tonic) or HTTP (hyper).
//! [`Tracer::in_memory`] keeps them for tests. Names and attributes follow OpenTelemetry's
//! HTTP semantic conventions: spans are named by the method, with `http.request.method`,
//! `url.path`, `server.address`, `http.response.status_code`, `http.request.resend_count`
//! for retries, and `network.protocol.version`; a 5xx fails a server span, a 4xx or 5xx (or
//! no response) a client span.
//!
//! ```
//! use mesh_telemetry::propagation::TraceContext;
//! use mesh_telemetry::span::{Kind, Tracer};
//!
//! let (tracer, spans) = Tracer::in_memory("checkout");
//! let request = TraceContext::root(7, 1, true);
//! let mut server = tracer.start(&request, Kind::Server, "GET").expect("sampled");
//! server.set_status_code(200);
//! drop(server); // ended
//! assert_eq!(spans.spans().len(), 1);
//! ```

use std::borrow::Cow;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_core::random::Random;
use opentelemetry::InstrumentationScope;
use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks, SpanProcessor};
use pin_project_lite::pin_project;

use crate::propagation::{Propagator, TraceContext};

pub use opentelemetry::KeyValue;

/// Which side of an exchange a span is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request received.
    Server,
    /// A request (one attempt) sent.
    Client,
}

/// Hands ended spans to a span processor (cheap to clone; clones share it).
#[derive(Clone)]
pub struct Tracer {
    inner: Arc<Inner>,
}

struct Inner {
    processor: Box<dyn SpanProcessor>,
    scope: InstrumentationScope,
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracer").field("processor", &self.inner.processor).finish()
    }
}

impl Tracer {
    /// Spans of the service `service_name` (the `service.name` resource attribute) to
    /// `processor`.
    pub fn new(mut processor: impl SpanProcessor + 'static, service_name: &str) -> Self {
        processor.set_resource(&Resource::builder_empty().with_service_name(service_name.to_owned()).build());
        let scope = InstrumentationScope::builder("mesh").with_version(env!("CARGO_PKG_VERSION")).build();
        Self { inner: Arc::new(Inner { processor: Box::new(processor), scope }) }
    }

    /// Spans kept in memory, each as it ends (for tests).
    pub fn in_memory(service_name: &str) -> (Self, MemorySpans) {
        let spans = MemorySpans::default();
        (Self::new(spans.clone(), service_name), spans)
    }

    /// Starts the span `context` names (its span id; its parent id as the parent), if the
    /// trace is sampled. It ends when dropped or [`Span::end`]ed.
    pub fn start(&self, context: &TraceContext, kind: Kind, name: impl Into<Cow<'static, str>>) -> Option<Span> {
        if !context.sampled() {
            return None;
        }
        let data = SpanData {
            span_context: context.span_context(false),
            parent_span_id: context.parent_id().map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.to_be_bytes())),
            // A server span's parent is the caller's; a client span's is this process's.
            parent_span_is_remote: kind == Kind::Server && context.parent_id().is_some(),
            span_kind: match kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
            },
            name: name.into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::UNIX_EPOCH,
            attributes: Vec::with_capacity(8),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: self.inner.scope.clone(),
        };
        Some(Span { tracer: self.clone(), kind, data: Some(Box::new(data)) })
    }

    /// Exports every span ended so far. It blocks until the exporter answers: call it from
    /// a blocking context (`spawn_blocking`) on a runtime whose other threads can run the
    /// export.
    pub fn force_flush(&self) -> Result<(), opentelemetry_sdk::error::OTelSdkError> {
        self.inner.processor.force_flush()
    }

    /// Flushes and stops the processor (blocking, as [`force_flush`](Self::force_flush)).
    pub fn shutdown(&self, timeout: Duration) -> Result<(), opentelemetry_sdk::error::OTelSdkError> {
        self.inner.processor.shutdown_with_timeout(timeout)
    }
}

/// A started span, recorded when it ends (when dropped, at the latest).
pub struct Span {
    tracer: Tracer,
    kind: Kind,
    data: Option<Box<SpanData>>,
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let data = self.data.as_deref();
        f.debug_struct("Span")
            .field("kind", &self.kind)
            .field("name", &data.map(|d| &d.name))
            .field("span_id", &data.map(|d| d.span_context.span_id()))
            .finish()
    }
}

impl Span {
    /// Adds an attribute.
    pub fn set_attribute(&mut self, attribute: KeyValue) {
        if let Some(data) = &mut self.data {
            data.attributes.push(attribute);
        }
    }

    /// Records the response's status (`http.response.status_code`); a 5xx is an error, and
    /// a 4xx too on a client span.
    pub fn set_status_code(&mut self, code: u16) {
        self.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
        let failed = code >= 500 || (self.kind == Kind::Client && code >= 400);
        if let Some(data) = &mut self.data {
            data.status = if failed { Status::error("") } else { Status::Unset };
        }
    }

    /// Records a failure with no response (`error.type` and the description).
    pub fn set_error(&mut self, description: &dyn fmt::Display) {
        let text = description.to_string();
        self.set_attribute(KeyValue::new("error.type", "transport"));
        if let Some(data) = &mut self.data {
            data.status = Status::error(text);
        }
    }

    /// Adds the request's attributes: method, path, address and protocol version.
    pub fn set_request<B>(&mut self, req: &Request<B>) {
        self.set_attribute(KeyValue::new("http.request.method", req.method().as_str().to_owned()));
        self.set_attribute(KeyValue::new("url.path", req.uri().path().to_owned()));
        let authority =
            req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(http::header::HOST)?.to_str().ok());
        if let Some(authority) = authority {
            self.set_attribute(KeyValue::new("server.address", authority.to_owned()));
        }
        let version = match req.version() {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        self.set_attribute(KeyValue::new("network.protocol.version", version));
        if let Some(resend) = mesh_core::ResendCount::of(req.extensions()) {
            self.set_attribute(KeyValue::new("http.request.resend_count", i64::from(resend)));
        }
    }

    /// Ends the span now.
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(mut data) = self.data.take() {
            data.end_time = SystemTime::now();
            self.tracer.inner.processor.on_end(*data);
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A span processor that keeps every ended span in memory (see [`Tracer::in_memory`]).
#[derive(Clone, Debug, Default)]
pub struct MemorySpans {
    spans: Arc<std::sync::Mutex<Vec<SpanData>>>,
}

impl MemorySpans {
    /// The spans ended so far, in the order they ended.
    pub fn spans(&self) -> Vec<SpanData> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl SpanProcessor for MemorySpans {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).push(span);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

// === Export ===

/// How spans leave the process: OTLP, batched.
#[derive(Debug, Clone)]
pub struct OtlpExport {
    endpoint: String,
    protocol: OtlpProtocol,
    timeout: Duration,
    queue: usize,
    batch: usize,
    delay: Duration,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// gRPC (port 4317 by convention).
    Grpc,
    /// Protobuf over HTTP (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

impl OtlpExport {
    /// OTLP over gRPC to `endpoint` (`http://collector:4317`).
    pub fn grpc(endpoint: impl Into<String>) -> Self {
        Self::new(endpoint.into(), OtlpProtocol::Grpc)
    }

    /// OTLP over HTTP to `endpoint` (`http://collector:4318`; `/v1/traces` is added when the
    /// endpoint has no path).
    pub fn http(endpoint: impl Into<String>) -> Self {
        Self::new(endpoint.into(), OtlpProtocol::HttpProtobuf)
    }

    fn new(endpoint: String, protocol: OtlpProtocol) -> Self {
        Self {
            endpoint,
            protocol,
            timeout: Duration::from_secs(10),
            queue: 2048,
            batch: 512,
            delay: Duration::from_secs(5),
        }
    }

    /// Spans waiting for export beyond which new ones are dropped (default 2048).
    pub fn queue_size(mut self, spans: usize) -> Self {
        self.queue = spans.max(1);
        self
    }

    /// The most spans in one export (default 512).
    pub fn batch_size(mut self, spans: usize) -> Self {
        self.batch = spans.max(1);
        self
    }

    /// How long a span may wait for a batch to fill (default 5 s).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// How long one export may take (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The tracer. Call it within a tokio runtime: the batches are sent from a task on it.
    pub fn build(self, service_name: &str) -> Result<Tracer, opentelemetry_otlp::ExporterBuildError> {
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        let exporter = match self.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(self.endpoint)
                .with_timeout(self.timeout)
                .build()?,
            OtlpProtocol::HttpProtobuf => {
                let endpoint = match self.endpoint.parse::<http::Uri>() {
                    Ok(uri) if uri.path() == "/" || uri.path().is_empty() => {
                        format!("{}/v1/traces", self.endpoint.trim_end_matches('/'))
                    }
                    _ => self.endpoint,
                };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(endpoint)
                    .with_timeout(self.timeout)
                    .with_headers(Default::default())
                    .build()?
            }
        };
        let config = opentelemetry_sdk::trace::BatchConfigBuilder::default()
            .with_max_queue_size(self.queue)
            .with_max_export_batch_size(self.batch.min(self.queue))
            .with_scheduled_delay(self.delay)
            .build();
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_batch_config(config)
        .build();
        Ok(Tracer::new(processor, service_name))
    }
}

// === The client span of each attempt ===

/// Gives each request it sends a client span, a child of the request's [`TraceContext`]
/// extension (the server span a [`TraceLayer`](crate::trace::TraceLayer) made), or else of the
/// application's current OpenTelemetry span; it writes the new span into the request's
/// headers so the next hop names it as its parent. Put it below a retry layer and every
/// attempt is a span of its own. A request with neither is sent as it is.
#[derive(Clone, Debug)]
pub struct ClientSpanLayer {
    tracer: Tracer,
    propagators: Arc<[Propagator]>,
    random: Arc<Random>,
}

impl ClientSpanLayer {
    /// Spans to `tracer`, written as W3C `traceparent` (or as the formats the request
    /// already carries).
    pub fn new(tracer: Tracer) -> Self {
        Self {
            tracer,
            propagators: Arc::from([Propagator::W3c, Propagator::B3]),
            random: Arc::new(Random::from_entropy()),
        }
    }

    /// The formats written (those the request carries, else the first).
    pub fn propagators(mut self, propagators: &[Propagator]) -> Self {
        self.propagators = Arc::from(propagators);
        self
    }

    /// Seeded span ids (for deterministic tests).
    pub fn random(mut self, random: Random) -> Self {
        self.random = Arc::new(random);
        self
    }

    /// Starts `req`'s client span, rewriting its headers and its [`TraceContext`] extension
    /// to name it; `None` when the request has no sampled parent.
    pub fn start<B>(&self, req: &mut Request<B>) -> Option<Span> {
        let parent = match req.extensions().get::<TraceContext>() {
            Some(parent) => parent.clone(),
            None => {
                use opentelemetry::trace::TraceContextExt as _;
                let current = opentelemetry::Context::current();
                TraceContext::from_span_context(current.span().span_context())?
            }
        };
        let context = parent.child(self.random.next_u64());
        context.reinject(req.headers_mut(), &self.propagators);
        let mut span = self.tracer.start(&context, Kind::Client, req.method().as_str().to_owned());
        if let Some(span) = &mut span {
            span.set_request(req);
        }
        req.extensions_mut().insert(context);
        span
    }
}

impl<S> tower::Layer<S> for ClientSpanLayer {
    type Service = ClientSpan<S>;
    fn layer(&self, inner: S) -> ClientSpan<S> {
        ClientSpan { inner, layer: self.clone() }
    }
}

/// The service of [`ClientSpanLayer`].
#[derive(Clone, Debug)]
pub struct ClientSpan<S> {
    inner: S,
    layer: ClientSpanLayer,
}

impl<S, B, RB> tower::Service<Request<B>> for ClientSpan<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Error: fmt::Display,
{
    type Response = Response<SpanBody<RB>>;
    type Error = S::Error;
    type Future = SpanFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let span = self.layer.start(&mut req);
        SpanFuture { fut: self.inner.call(req), span }
    }
}

pin_project! {
    /// A response future whose span ends with the response body (or with the error).
    #[derive(Debug)]
    pub struct SpanFuture<F> {
        #[pin]
        fut: F,
        span: Option<Span>,
    }
}

impl<F> SpanFuture<F> {
    /// The future of `fut`, ending `span` with its response.
    pub fn new(fut: F, span: Option<Span>) -> Self {
        Self { fut, span }
    }
}

impl<F, RB, E> std::future::Future for SpanFuture<F>
where
    F: std::future::Future<Output = Result<Response<RB>, E>>,
    E: fmt::Display,
{
    type Output = Result<Response<SpanBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.fut.poll(cx));
        let mut span = this.span.take();
        Poll::Ready(match result {
            Ok(res) => {
                if let Some(span) = &mut span {
                    span.set_status_code(res.status().as_u16());
                }
                Ok(res.map(|body| SpanBody { body, span }))
            }
            Err(e) => {
                if let Some(span) = &mut span {
                    span.set_error(&e);
                }
                Err(e)
            }
        })
    }
}

pin_project! {
    /// A response body that ends its span when it ends (or is dropped).
    #[derive(Debug)]
    pub struct SpanBody<B> {
        #[pin]
        body: B,
        span: Option<Span>,
    }
}

impl<B: Body> Body for SpanBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(trailers), Some(span)) = (frame.trailers_ref(), this.span.as_mut())
                    && let Some(status) = trailers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
                {
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", status));
                }
            }
            Some(Err(_)) => {
                if let Some(span) = this.span.as_mut() {
                    span.set_error(&"response body failed");
                }
                this.span.take();
            }
            None => {
                this.span.take();
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
