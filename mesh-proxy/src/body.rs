//! The bodies of the forwarding path: [`RequestBody`] (what a client sends, or any body a
//! layer substitutes) and [`ProxyBody`] (the upstream's response, or a local reply).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::downstream::{BodyInFlight, ConnState, InFlight};
use crate::error::{BoxError, ClientBodyError};
use crate::h2body::H2Recv;
use crate::upstream::Checkout;

// === RequestBody ===

pin_project_lite::pin_project! {
    /// The body of a request being forwarded: from an HTTP/1.1 client (through hyper) or
    /// from an h2c client (through the `h2` crate).
    #[project = RequestBodyProj]
    pub(crate) enum RequestBody {
        Http1 { #[pin] body: Incoming, reading: Option<BodyInFlight> },
        H2 { body: H2Recv },
        Boxed { #[pin] body: http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> },
        Empty,
    }
}

impl RequestBody {
    /// An HTTP/1.x request's body, in flight on its connection (`conn`) until it has ended.
    pub(crate) fn http1(body: Incoming, conn: &Arc<ConnState>) -> Self {
        let reading = conn.body_in_flight(body.is_end_stream());
        RequestBody::Http1 { body, reading }
    }

    pub(crate) fn h2(body: H2Recv) -> Self {
        RequestBody::H2 { body }
    }

    pub(crate) fn empty() -> Self {
        RequestBody::Empty
    }

    /// Any other body (a layer's replay buffer, a test's body).
    pub(crate) fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        RequestBody::Boxed {
            body: http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(body, Into::into)),
        }
    }
}

#[expect(clippy::derivable_impls, reason = "pin-project-lite's enum takes no #[default]")]
impl Default for RequestBody {
    fn default() -> Self {
        RequestBody::Empty
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        fn client(e: impl Into<BoxError>) -> BoxError {
            Box::new(ClientBodyError(e.into()))
        }
        match self.project() {
            RequestBodyProj::Http1 { body, reading } => {
                let frame = ready!(body.poll_frame(cx));
                if frame.is_none() {
                    reading.take();
                }
                Poll::Ready(frame.map(|f| f.map_err(client)))
            }
            RequestBodyProj::H2 { body } => body.poll_frame(cx).map(|f| f.map(|f| f.map_err(client))),
            RequestBodyProj::Boxed { body } => body.poll_frame(cx),
            RequestBodyProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Http1 { body, .. } => body.is_end_stream(),
            RequestBody::H2 { body } => body.is_end_stream(),
            RequestBody::Boxed { body } => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Http1 { body, .. } => body.size_hint(),
            RequestBody::H2 { .. } => SizeHint::default(),
            RequestBody::Boxed { body } => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

// === ProxyBody ===

pin_project_lite::pin_project! {
    /// The body of a proxied response: the upstream's, streamed frame by frame, or a short
    /// local reply.
    pub struct ProxyBody {
        #[pin]
        inner: Inner,
        pub(crate) in_flight: Option<InFlight>,
        // The route timeout's deadline, when the response must be complete by then.
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        // Told how the body ended: with its trailers, or without (ended, failed or dropped),
        // and how many body bytes went out.
        on_end: Option<OnEnd>,
        // Body bytes sent so far (counted only while someone listens for the end).
        sent: u64,
    }

    impl PinnedDrop for ProxyBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(on_end) = this.on_end.take() {
                on_end(BodyEnd::Dropped, *this.sent);
            }
        }
    }
}

/// How a body ended, as [`ProxyBody::on_end`] is told.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BodyEnd<'a> {
    /// With these trailers.
    Trailers(&'a http::HeaderMap),
    /// Without trailers.
    Ended,
    /// With an error (the upstream's, or the route's deadline).
    Failed,
    /// Dropped unfinished (the client went away, or a layer let go of the response).
    Dropped,
}

/// What [`ProxyBody::on_end`] calls.
pub(crate) type OnEnd = Box<dyn FnOnce(BodyEnd<'_>, u64) + Send + Sync>;

pin_project_lite::pin_project! {
    #[project = InnerProj]
    enum Inner {
        // Streams the upstream's body; returns its HTTP/1.1 connection to the pool at the end.
        Upstream {
            #[pin]
            body: Incoming,
            checkout: Option<Checkout>,
        },
        // Streams an h2c upstream's response body.
        H2 { body: H2Recv },
        Local { data: Option<Bytes> },
    }
}

impl ProxyBody {
    pub(crate) fn upstream(body: Incoming, mut checkout: Option<Checkout>) -> Self {
        if body.is_end_stream() {
            // hyper will not poll an empty body: the connection is free now.
            if let Some(c) = checkout.take() {
                c.release();
            }
        }
        ProxyBody { inner: Inner::Upstream { body, checkout }, in_flight: None, deadline: None, on_end: None, sent: 0 }
    }

    pub(crate) fn h2(body: H2Recv) -> Self {
        ProxyBody { inner: Inner::H2 { body }, in_flight: None, deadline: None, on_end: None, sent: 0 }
    }

    /// A local reply's text, if this is one.
    pub(crate) fn local_text(&self) -> Option<String> {
        match &self.inner {
            Inner::Local { data } => data.as_ref().map(|d| String::from_utf8_lossy(d).into_owned()),
            _ => None,
        }
    }

    pub(crate) fn local(data: Bytes) -> Self {
        ProxyBody { inner: Inner::Local { data: Some(data) }, in_flight: None, deadline: None, on_end: None, sent: 0 }
    }

    pub(crate) fn empty() -> Self {
        ProxyBody { inner: Inner::Local { data: None }, in_flight: None, deadline: None, on_end: None, sent: 0 }
    }
}

impl ProxyBody {
    /// Ends the body with a timeout error if it is not complete by `deadline` (Envoy's route
    /// timeout covers the whole response; a client then sees its stream reset).
    pub(crate) fn set_deadline(&mut self, deadline: tokio::time::Instant) {
        if !self.is_end_stream() {
            self.deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
        }
    }

    /// Calls `f` once the body has ended, saying how. Several calls chain.
    pub(crate) fn on_end(&mut self, f: OnEnd) {
        if self.is_end_stream() {
            return f(BodyEnd::Ended, self.sent);
        }
        self.on_end = Some(match self.on_end.take() {
            None => f,
            Some(before) => Box::new(move |trailers, sent| {
                before(trailers, sent);
                f(trailers, sent);
            }),
        });
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(self.as_mut().poll_inner(cx));
        if self.on_end.is_some() {
            let ended = self.is_end_stream();
            let this = self.as_mut().project();
            if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                *this.sent += data.map_or(0, |d| d.len() as u64);
            }
            let sent = *this.sent;
            match &frame {
                Some(Ok(f)) if f.is_trailers() => {
                    if let (Some(on_end), Some(trailers)) = (this.on_end.take(), f.trailers_ref()) {
                        on_end(BodyEnd::Trailers(trailers), sent);
                    }
                }
                Some(Ok(_)) if !ended => {}
                Some(Err(_)) => {
                    if let Some(on_end) = this.on_end.take() {
                        on_end(BodyEnd::Failed, sent);
                    }
                }
                _ => {
                    if let Some(on_end) = this.on_end.take() {
                        on_end(BodyEnd::Ended, sent);
                    }
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.is_inner_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body, .. } => body.size_hint(),
            Inner::H2 { .. } => SizeHint::default(),
            Inner::Local { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl ProxyBody {
    fn poll_inner(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(deadline) = this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            *this.deadline = None;
            return Poll::Ready(Some(Err(Box::new(mesh_core::classify::TimeoutError::new()))));
        }
        match this.inner.project() {
            InnerProj::Upstream { mut body, checkout } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                match &frame {
                    Some(Ok(_)) if !body.is_end_stream() => {}
                    // A broken body leaves its connection in an unknown state: close it.
                    Some(Err(_)) => *checkout = None,
                    _ => {
                        if let Some(c) = checkout.take() {
                            c.release();
                        }
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            InnerProj::H2 { body } => body.poll_frame(cx).map(|f| f.map(|f| f.map_err(Into::into))),
            InnerProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_inner_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream { body, .. } => body.is_end_stream(),
            Inner::H2 { body } => body.is_end_stream(),
            Inner::Local { data } => data.is_none(),
        }
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Upstream { .. } | Inner::H2 { .. } => f.write_str("ProxyBody::Upstream"),
            Inner::Local { data } => {
                f.debug_struct("ProxyBody::Local").field("len", &data.as_ref().map(Bytes::len)).finish()
            }
        }
    }
}
