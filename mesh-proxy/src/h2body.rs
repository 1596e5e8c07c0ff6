//! Message bodies over the `h2` crate's streams, used where the proxy speaks HTTP/2 itself
//! rather than through hyper: reading a [`RecvStream`] frame by frame, and sending any
//! [`Body`] into a [`SendStream`].
//!
//! Flow control is what keeps a streamed body from being buffered: a received frame's
//! window is given back to the peer only once the frame has been handed on (so a slow
//! reader on the far side slows the sender down), and a body is sent no faster than the
//! peer's window allows. The one exception is a body's first chunk when it is small (16 KiB at
//! most): it is handed to `h2` without reserving window first, and `h2` holds it until the
//! window opens. Most responses are one such chunk, and skipping the reservation (two more
//! turns of the connection's lock) saves 1.5 % of the CPU per h2c request; what it can hold
//! back is bounded by that chunk per stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame};

use crate::error::BoxError;

/// A received HTTP/2 stream's body: its data frames, then its trailers if any.
pub(crate) struct H2Recv {
    recv: RecvStream,
    data_done: bool,
    /// An upstream stream's place among its connection's active streams.
    active: Option<crate::upstream::ActiveStream>,
}

impl H2Recv {
    pub(crate) fn new(recv: RecvStream) -> Self {
        // An empty body finds out on its first poll (no lock taken here).
        Self { recv, data_done: false, active: None }
    }

    /// Holds `active` until the body ends or is dropped.
    pub(crate) fn holding(mut self, active: crate::upstream::ActiveStream) -> Self {
        self.active = Some(active);
        self
    }

    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Handed on: the peer may send as much again. An error here means the
                    // stream is already gone, which the next poll reports.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

impl Body for H2Recv {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        H2Recv::poll_frame(self.get_mut(), cx)
    }

    fn is_end_stream(&self) -> bool {
        H2Recv::is_end_stream(self)
    }
}

pin_project_lite::pin_project! {
    /// Sends `body` on `send`: data within the peer's flow-control window, then trailers or
    /// the end of the stream. Stops early, with an error, when the peer resets the stream; a
    /// body that fails resets it with `CANCEL`.
    pub(crate) struct SendBody<B> {
        #[pin]
        body: B,
        send: SendStream<Bytes>,
        // Data read from `body` and not yet sent for want of window.
        pending: Option<Bytes>,
        // Whether any data went out yet.
        started: bool,
    }
}

impl<B> SendBody<B> {
    pub(crate) fn new(body: B, send: SendStream<Bytes>) -> Self {
        Self { body, send, pending: None, started: false }
    }
}

impl<B> Future for SendBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(data) = this.pending {
                let first = !std::mem::replace(this.started, true);
                if first && data.len() <= FIRST_UNRESERVED {
                    let end = this.body.is_end_stream();
                    this.send.send_data(this.pending.take().unwrap_or_default(), end)?;
                    if end {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                this.send.reserve_capacity(data.len());
                match this.send.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(0))) => {} // a spurious wake-up: ask again
                    Poll::Ready(Some(Ok(window))) => {
                        let chunk = if window >= data.len() {
                            this.pending.take().unwrap_or_default()
                        } else {
                            data.split_to(window)
                        };
                        let end = this.pending.is_none() && this.body.is_end_stream();
                        this.send.send_data(chunk, end)?;
                        if end {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                    Poll::Ready(None) => return Poll::Ready(Err("the stream closed while its body was sent".into())),
                    Poll::Pending => return reset_or_pending(this.send, cx),
                }
                continue;
            }
            match this.body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {
                        if this.body.is_end_stream() {
                            this.send.send_data(data, true)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Ok(data) => *this.pending = Some(data),
                    Err(frame) => {
                        if let Ok(mut trailers) = frame.into_trailers() {
                            crate::headers::strip_trailers(&mut trailers);
                            this.send.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    this.send.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Ready(None) => {
                    this.send.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => return reset_or_pending(this.send, cx),
            }
        }
    }
}

/// The largest first chunk sent without reserving window (see the module docs).
const FIRST_UNRESERVED: usize = 16 << 10;

/// While waiting (for the body or for window), a reset from the peer ends the send.
fn reset_or_pending(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => Poll::Ready(Err(h2::Error::from(reason).into())),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
        Poll::Pending => Poll::Pending,
    }
}
