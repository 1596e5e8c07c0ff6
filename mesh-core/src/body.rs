//! [`LocalOr`]: a layer's response body that is either the inner service's or a short local
//! answer of the layer's own (an abort, a refusal).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The inner service's body, or a layer's local answer.
#[derive(Debug)]
pub struct LocalOr<B> {
    kind: Kind<B>,
}

#[derive(Debug)]
enum Kind<B> {
    Inner(B),
    Local(Option<Bytes>),
}

impl<B> LocalOr<B> {
    /// The inner service's body.
    pub fn inner(body: B) -> Self {
        Self { kind: Kind::Inner(body) }
    }

    /// A local answer's bytes.
    pub fn local(data: Bytes) -> Self {
        Self { kind: Kind::Local((!data.is_empty()).then_some(data)) }
    }

    /// The inner body, or the local answer's bytes (`Err`).
    pub fn into_inner(self) -> Result<B, Bytes> {
        match self.kind {
            Kind::Inner(b) => Ok(b),
            Kind::Local(data) => Err(data.unwrap_or_default()),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for LocalOr<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Inner(b) => Pin::new(b).poll_frame(cx),
            Kind::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner(b) => b.is_end_stream(),
            Kind::Local(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner(b) => b.size_hint(),
            Kind::Local(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
