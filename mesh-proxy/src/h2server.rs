//! The h2c server side, on the `h2` crate directly.
//!
//! hyper's HTTP/2 server spawns a task per stream and hands every frame across tasks. Here a
//! connection's streams are futures polled by the connection's own task (a
//! [`FuturesUnordered`]): accepting a stream, forwarding it and writing its response cost no
//! task spawn and no cross-task wake-up, and the frames of all the streams that became ready
//! together go out in one write.
//!
//! Per stream: the request is forwarded ([`Forward::call`]) while the client may still reset
//! it (a reset cancels the upstream request); the response head goes out, then its body within
//! the client's flow-control window ([`SendBody`]).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::ext::Protocol;
use h2::server::{Connection, SendResponse};
use h2::{Reason, RecvStream};
use http::{Method, Request, Response};
use http_body::{Body, Frame};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use crate::body::{ProxyBody, RequestBody};
use crate::downstream::{GracefulConn, InFlight};
use crate::h2body::{H2Recv, SendBody};
use crate::proxy::{Forward, UpstreamTunnel};
use crate::sniff::ClientIo;
use crate::tunnel::{Counted, idle};
use crate::upstream::BoxError;

/// Streams a client may open at once (hyper's default too).
const MAX_CONCURRENT_STREAMS: u32 = 200;
/// Flow-control windows offered to clients: 1 MiB per stream and per connection.
const WINDOW: u32 = 1 << 20;
/// At most this much of a response body waits per stream for the client's window.
const SEND_BUFFER: usize = 400 << 10;
/// The largest request head accepted (HPACK-decoded): 60 KiB, as on HTTP/1.1.
const MAX_HEADER_LIST: u32 = crate::config::MAX_HEAD_BYTES as u32;

/// Reads the client's connection preface and returns the connection to serve.
pub(crate) async fn handshake(io: ClientIo) -> Result<Connection<ClientIo, Bytes>, h2::Error> {
    h2::server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_connect_protocol()
        .handshake(io)
        .await
}

pin_project_lite::pin_project! {
    /// Serves one h2c connection: accepts streams and drives them, until the client closes
    /// the connection or, after [`GracefulConn::graceful_shutdown`] (GOAWAY), until the
    /// streams already open have finished.
    pub(crate) struct H2Server<F, Fut> {
        conn: Connection<ClientIo, Bytes>,
        streams: FuturesUnordered<Fut>,
        start: F,
        accepting: bool,
        resets: Arc<ResetBudget>,
        calmed: bool,
    }
}

/// Premature resets of one client connection: streams the client cancelled before their
/// response was sent. Past the budget, once they are also more than half of the
/// connection's streams, the connection gets GOAWAY `ENHANCE_YOUR_CALM` and its remaining
/// streams are cancelled (Envoy's and nginx's answer to CVE-2023-44487, here for streams
/// cancelled after they were accepted).
#[derive(Debug)]
pub(crate) struct ResetBudget {
    max: Option<u64>,
    streams: AtomicU64,
    premature: AtomicU64,
    exceeded: std::sync::atomic::AtomicBool,
}

/// GOAWAYs sent for premature resets, process-wide (for `/stats`).
pub(crate) static PREMATURE_RESET_GOAWAYS: AtomicU64 = AtomicU64::new(0);

impl ResetBudget {
    pub(crate) fn new(max: Option<u64>) -> Self {
        Self { max, streams: AtomicU64::new(0), premature: AtomicU64::new(0), exceeded: false.into() }
    }

    fn stream(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a premature reset; true once the budget is spent.
    fn premature_reset(&self) -> bool {
        let premature = self.premature.fetch_add(1, Ordering::Relaxed) + 1;
        let over = self.max.is_some_and(|max| premature > max && premature * 2 > self.streams.load(Ordering::Relaxed));
        if over {
            self.exceeded.store(true, Ordering::Release);
        }
        over
    }

    fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Acquire)
    }
}

impl<F, Fut> H2Server<F, Fut>
where
    F: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> Fut,
    Fut: Future<Output = ()>,
{
    /// `start` makes the future that serves one stream.
    pub(crate) fn new(conn: Connection<ClientIo, Bytes>, resets: Arc<ResetBudget>, start: F) -> Self {
        Self { conn, streams: FuturesUnordered::new(), start, accepting: true, resets, calmed: false }
    }
}

impl<F, Fut> Future for H2Server<F, Fut>
where
    F: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> Fut,
    Fut: Future<Output = ()>,
{
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Accepting also drives the connection: reads frames, writes what the streams queued.
        while *this.accepting {
            match this.conn.poll_accept(cx) {
                // After ENHANCE_YOUR_CALM nothing more is served.
                Poll::Ready(Some(Ok(_))) if *this.calmed => {}
                Poll::Ready(Some(Ok((req, respond)))) => this.streams.push((this.start)(req, respond)),
                // A connection error: the open streams cannot finish either.
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => *this.accepting = false,
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
        if !*this.calmed && this.resets.exceeded() {
            // Too many streams cancelled before their answers: no more work for this client.
            *this.calmed = true;
            PREMATURE_RESET_GOAWAYS.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("h2c client cancelled too many streams early; GOAWAY ENHANCE_YOUR_CALM");
            this.conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
            // Dropping the streams cancels their upstream requests.
            this.streams.clear();
            // Drive the connection on: the GOAWAY goes out, then it closes.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if !*this.accepting && this.streams.is_empty() {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl<F, Fut> GracefulConn for H2Server<F, Fut>
where
    F: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> Fut,
    Fut: Future<Output = ()>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.project().conn.graceful_shutdown();
    }
}

/// Serves one stream: forwards the request and sends the response back.
pub(crate) async fn serve_stream(
    forward: Forward,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    in_flight: InFlight,
    resets: Arc<ResetBudget>,
) {
    resets.stream();
    if req.method() == Method::CONNECT {
        // Boxed: tunnels are rare, and their state would otherwise make every stream's future
        // (moved into the connection's set of streams) larger.
        return Box::pin(connect(forward, req, respond, in_flight)).await;
    }
    let head = req.method() == Method::HEAD;
    // The client may give up (RST_STREAM) while the upstream has not answered yet: then stop,
    // which cancels the upstream request too. The call is scoped so that its state and the
    // response's do not both take room in this future.
    let answered = {
        let mut call = pin!(forward.call(req.map(|body| RequestBody::h2(H2Recv::new(body))), in_flight));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(Ok(res)) = call.as_mut().poll(cx) {
                return Poll::Ready(Some(res));
            }
            match respond.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    };
    let Some(res) = answered else {
        // The client cancelled before the answer: the upstream did the work for nothing.
        resets.premature_reset();
        return;
    };
    if !respond_with(respond, res, head).await {
        resets.premature_reset();
    }
}

/// Sends `res` on the stream: its head, then its body within the client's window. The
/// answer to a HEAD request ends with its head: any body (the proxy's own replies have one)
/// is not sent (RFC 9110 section 9.3.2).
/// Whether the whole response went out (false: the client reset the stream first).
async fn respond_with(mut respond: SendResponse<Bytes>, res: Response<ProxyBody>, head: bool) -> bool {
    let (parts, body) = res.into_parts();
    let end = head || body.is_end_stream();
    let send = match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(error = %e, "could not send the response head to the h2c client");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return false;
        }
    };
    if !end && let Err(e) = SendBody::new(body, send).await {
        tracing::debug!(error = %e, "response body to the h2c client ended early");
        return false;
    }
    true
}

/// An extended CONNECT (RFC 8441) becomes a tunnel to an upgraded upstream connection; a
/// plain CONNECT is refused.
async fn connect(forward: Forward, req: Request<RecvStream>, respond: SendResponse<Bytes>, in_flight: InFlight) {
    if req.extensions().get::<Protocol>().is_none() {
        respond_with(respond, crate::reply::connect_refused(), false).await;
        return;
    }
    // The request goes through the stack like any other (routed, its failures answered); the
    // client's stream stays here, to be joined to the upstream connection the stack opens.
    let (parts, recv) = req.into_parts();
    let mut res = match forward.clone().call(Request::from_parts(parts, RequestBody::empty()), in_flight).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let in_flight = res.body_mut().in_flight.take();
    let Some(upstream) = res.extensions().get::<UpstreamTunnel>().and_then(UpstreamTunnel::take) else {
        // A 2xx tells the client its tunnel is open (RFC 9113 section 8.5): an answer without
        // one (a route's direct response, say) cannot be one.
        if res.status().is_success() {
            let error: crate::error::BoxError =
                "the route answered an extended CONNECT without opening a tunnel".into();
            respond_with(respond, crate::reply::local_reply(&*error, false), false).await;
            return;
        }
        respond_with(respond, res, false).await;
        return;
    };
    let (mut head, _) = res.into_parts();
    head.extensions.remove::<UpstreamTunnel>();
    let mut respond = respond;
    let send = match respond.send_response(Response::from_parts(head, ()), false) {
        Ok(send) => send,
        Err(e) => return tracing::debug!(error = %e, "could not answer an extended CONNECT"),
    };
    // Progress: reads and writes on the upstream connection, and data frames from the client
    // (see `crate::tunnel`).
    let moved = Arc::new(AtomicU64::new(0));
    let idle_limit = forward.tunnel_idle_limit();
    let upstream = Counted::new(TokioIo::new(upstream), moved.clone());
    let (from_upstream, mut to_upstream) = tokio::io::split(upstream);
    let up = async {
        let mut recv = recv;
        while let Some(data) = recv.data().await {
            let data = data?;
            moved.fetch_add(1, Ordering::Relaxed);
            to_upstream.write_all(&data).await?;
            // Written on: the client may send as much again.
            let _ = recv.flow_control().release_capacity(data.len());
        }
        to_upstream.shutdown().await?;
        Ok::<_, BoxError>(())
    };
    let down = SendBody::new(ReadBody::new(from_upstream), send);
    // Either direction failing (a reset stream, a broken connection) ends both; so does
    // idleness, which resets the stream (CANCEL, when `send` is dropped unfinished).
    tokio::select! {
        copied = async { tokio::try_join!(up, down) } => match copied {
            Ok(_) => tracing::debug!("extended CONNECT tunnel closed"),
            Err(e) => tracing::debug!(error = %e, "extended CONNECT tunnel failed"),
        },
        () = idle(&moved, idle_limit) => tracing::debug!("extended CONNECT tunnel idle for the stream idle timeout: closed"),
    }
    drop(in_flight);
}

pin_project_lite::pin_project! {
    /// What a reader yields, as a body of data frames (up to 16 KiB each).
    struct ReadBody<R> {
        #[pin]
        reader: R,
        buf: BytesMut,
        done: bool,
    }
}

impl<R> ReadBody<R> {
    fn new(reader: R) -> Self {
        Self { reader, buf: BytesMut::new(), done: false }
    }
}

impl<R: AsyncRead> Body for ReadBody<R> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        this.buf.reserve(READ_CHUNK);
        match ready!(poll_read_chunk(this.reader, cx, this.buf)) {
            Ok(0) => {
                *this.done = true;
                Poll::Ready(None)
            }
            Ok(_) => Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze())))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

const READ_CHUNK: usize = 16 << 10;

/// Reads into the spare capacity of `buf` (at most [`READ_CHUNK`] bytes).
fn poll_read_chunk<R: AsyncRead>(
    reader: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let mut read = ReadBuf::new(&mut buf[start..]);
    let result = reader.poll_read(cx, &mut read);
    let n = read.filled().len();
    buf.truncate(start + n);
    match result {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    /// The size of the future an `async fn` returns, from the function item alone.
    fn future_size<F, A, B, C, D, E, R>(_: &F) -> usize
    where
        F: Fn(A, B, C, D, E) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every HTTP/2 stream's future is built, then moved into the connection's set of streams,
    /// and polled there: its size is copied twice per request. It was 8.8 kB before the tunnel
    /// path was boxed and the timeout stopped holding the exchange twice (3.0 kB after; the
    /// bound leaves room for compiler and dependency changes).
    #[test]
    fn stream_future_stays_small() {
        let size = future_size(&super::serve_stream);
        assert!(size <= 4096, "serve_stream's future is {size} bytes");
    }
}
