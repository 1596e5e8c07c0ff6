//! [`MonitorLayer`]: wraps one endpoint's service so that its outcomes reach the
//! [`OutlierDetector`](super::OutlierDetector): a balancer's per-endpoint stack.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use super::HostMonitor;
use crate::retry::RetryableError;

/// Layer of [`MonitorService`]: records every outcome of the wrapped endpoint's service on
/// its [`HostMonitor`].
///
/// A response counts by its status; a gRPC call's by its `grpc-status` mapped to HTTP, read
/// from the head when it is there and from the trailers otherwise (then when the body ends:
/// one that failed or ended without trailers counts as 503; one dropped unfinished, by a
/// client that went away, counts for nothing). An error counts as its mesh-core
/// classification says ([`HostMonitor::record_failure`]); a call dropped unanswered counts as
/// a timeout when its [`TryDeadline`](mesh_core::TryDeadline) has passed, and for nothing
/// before it.
#[derive(Clone, Debug)]
pub struct MonitorLayer {
    monitor: HostMonitor,
}

impl MonitorLayer {
    /// Records on `monitor`.
    pub fn new(monitor: HostMonitor) -> Self {
        Self { monitor }
    }
}

impl<S> Layer<S> for MonitorLayer {
    type Service = MonitorService<S>;

    fn layer(&self, inner: S) -> MonitorService<S> {
        MonitorService { inner, monitor: self.monitor.clone() }
    }
}

/// See [`MonitorLayer`].
#[derive(Clone, Debug)]
pub struct MonitorService<S> {
    inner: S,
    monitor: HostMonitor,
}

impl<S, B, RB> Service<Request<B>> for MonitorService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: RetryableError,
{
    type Response = Response<MonitorBody<RB>>;
    type Error = S::Error;
    type Future = MonitorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let deadline = mesh_core::TryDeadline::of(req.extensions());
        MonitorFuture { fut: self.inner.call(req), monitor: Some(self.monitor.clone()), grpc, deadline }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`MonitorService`].
    pub struct MonitorFuture<F> {
        #[pin]
        fut: F,
        monitor: Option<HostMonitor>,
        grpc: bool,
        deadline: Option<mesh_core::TryDeadline>,
    }

    impl<F> PinnedDrop for MonitorFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped unanswered: a timeout if the try's deadline has passed.
            if let (Some(monitor), Some(mesh_core::TryDeadline(deadline))) = (this.monitor.take(), *this.deadline)
                && tokio::time::Instant::now().into_std() >= deadline
            {
                monitor.record_failure(mesh_core::classify::Failure::Timeout);
            }
        }
    }
}

impl<F, RB, E> Future for MonitorFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: RetryableError,
{
    type Output = Result<Response<MonitorBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.fut.poll(cx));
        let monitor = this.monitor.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(res) => {
                // A gRPC status still to come is recorded from the trailers.
                let pending = monitor.record_head(res.status(), res.headers(), *this.grpc).then_some(monitor);
                Ok(res.map(|inner| MonitorBody { inner, pending }))
            }
            Err(e) => {
                if let Some(failure) = e.failure() {
                    monitor.record_failure(failure);
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body whose gRPC status, in its trailers, is still to be recorded.
    pub struct MonitorBody<B> {
        #[pin]
        inner: B,
        pending: Option<HostMonitor>,
    }

}

impl<B> MonitorBody<B> {
    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body<Data = Bytes>> Body for MonitorBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let ended = match &frame {
            Some(Ok(f)) => f.trailers_ref().map(Some),
            // The upstream ended the call without its status, or broke it: a failure.
            Some(Err(_)) | None => Some(None),
        };
        if let Some(trailers) = ended
            && let Some(monitor) = this.pending.take()
        {
            monitor.record_trailers(trailers);
        }
        // A body dropped unfinished records nothing: the client went away.
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
