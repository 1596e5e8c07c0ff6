//! Telling HTTP/1.x from h2c (prior knowledge) on one port.
//!
//! The first bytes a client sends are read, not peeked at: a peek cannot wait for *more*
//! bytes than are already there, so a client that sent `P` (PUT? PRI?) and paused could only
//! be re-peeked on a timer. Reading waits on the socket's readiness like any other read, and
//! the bytes read are handed back to whichever protocol takes the connection, through
//! [`Prefixed`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::downstream::ConnState;

/// The HTTP/2 connection preface a prior-knowledge h2c client starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much the first read may take. A typical HTTP/1.1 request head, or an h2c preface with
/// the client's SETTINGS and first HEADERS, arrives whole, so hyper or h2 find it all in
/// their first read.
const FIRST_READ: usize = 4096;

/// Which protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    H2c,
}

/// Reads from `io` until its first bytes show the protocol: `PRI` starts h2c (no HTTP/1.x
/// method does; the h2 handshake checks the rest of the preface), anything else is HTTP/1.x.
/// Returns the protocol and every byte read, or `None` if the client closed first.
pub(crate) async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Option<(Protocol, Bytes)>> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
        let seen = buf.len().min(3);
        if buf[..seen] != PREFACE[..seen] {
            return Ok(Some((Protocol::Http1, buf.freeze())));
        }
        if seen == 3 {
            return Ok(Some((Protocol::H2c, buf.freeze())));
        }
        // `P` or `PR` so far: wait for more (the buffer has room for it).
    }
}

/// A client connection, with the bytes sniffing read put back in front.
pub(crate) type ClientIo = Prefixed<Downstream>;

/// A client connection as accepted: plain TCP (the outbound listener), or as the inbound
/// listener's PeerAuthentication left it: plaintext with the bytes it read replayed, or mTLS.
pub(crate) enum Downstream {
    Tcp(tokio::net::TcpStream),
    Plain(mesh_tls::Rewind<tokio::net::TcpStream>),
    Mtls(Box<mesh_tls::MtlsStream<tokio::net::TcpStream>>),
    /// A gateway's terminated TLS (SIMPLE or MUTUAL).
    Tls(Box<tokio_rustls::server::TlsStream<mesh_tls::Rewind<tokio::net::TcpStream>>>),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Downstream::Tcp($s) => $e,
            Downstream::Plain($s) => $e,
            Downstream::Mtls($s) => $e,
            Downstream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Downstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Downstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Downstream::Tcp(s) => s.is_write_vectored(),
            Downstream::Plain(s) => s.is_write_vectored(),
            Downstream::Mtls(s) => s.is_write_vectored(),
            Downstream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// The answer to a request head that took too long (Envoy answers 408 too).
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n\
    content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n";

pin_project_lite::pin_project! {
    /// An I/O object whose reads first return `prefix` (the bytes sniffing took), then
    /// whatever `io` reads. Writes go straight to `io`.
    ///
    /// Once [`count_io`](Self::count_io) is called, what it reads (the prefix included)
    /// and writes is counted into a connection's state, for the request head and stream idle
    /// timeouts; and a read that
    /// would wait while that state says the head in progress has timed out
    /// ([`ConnState::head_timed_out`]) writes a 408 answer, shuts the write side and reads
    /// the end of the stream instead. The answer is written only when every earlier write
    /// went out whole, so it cannot land in the middle of an earlier response.
    pub(crate) struct Prefixed<T> {
        prefix: Bytes,
        #[pin]
        io: T,
        counter: Option<Arc<ConnState>>,
        // The last write left bytes unwritten (or failed): the writer still holds some.
        unsent: bool,
        // HTTP/2: where the client's frames are, to time header blocks.
        frames: Option<Box<H2Frames>>,
    }
}

impl<T> Prefixed<T> {
    pub(crate) fn new(prefix: Bytes, io: T) -> Self {
        Self { prefix, io, counter: None, unsent: false, frames: None }
    }

    /// Follows the client's HTTP/2 frames (from its connection preface on) and tells the
    /// counted state when a header block is open, for the request head timeout
    /// ([`ConnState::set_h2_head`]).
    pub(crate) fn track_h2_heads(&mut self) {
        if let Some(state) = &self.counter {
            state.mark_h2();
            self.frames = Some(Box::default());
        }
    }

    /// Counts every byte read and written from now on into `state`.
    pub(crate) fn count_io(&mut self, state: Arc<ConnState>) {
        self.counter = Some(state);
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let before = buf.filled().len();
        if this.prefix.is_empty() {
            if this.io.as_mut().poll_read(cx, buf)?.is_pending() {
                match this.counter {
                    Some(state) if !*this.unsent && state.head_timed_out() => {
                        answer_timeout(this.io, cx);
                        return Poll::Ready(Ok(()));
                    }
                    _ => return Poll::Pending,
                }
            }
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Let the first read's buffer go.
                *this.prefix = Bytes::new();
            }
        }
        let n = buf.filled().len() - before;
        if let Some(state) = this.counter
            && n > 0
        {
            if let Some(frames) = this.frames {
                frames.scan(&buf.filled()[before..], state);
            }
            state.note_received(n);
        }
        Poll::Ready(Ok(()))
    }
}

fn note_sent(counter: &Option<Arc<ConnState>>, written: &Poll<io::Result<usize>>) {
    if let (Some(state), Poll::Ready(Ok(n))) = (counter, written) {
        state.note_sent(*n);
    }
}

/// Writes the 408 answer and shuts the write side, as far as the socket takes them now; the
/// connection ends either way.
fn answer_timeout<T: AsyncWrite>(mut io: Pin<&mut T>, cx: &mut Context<'_>) {
    if let Poll::Ready(Ok(n)) = io.as_mut().poll_write(cx, REQUEST_TIMEOUT)
        && n == REQUEST_TIMEOUT.len()
    {
        let _ = io.poll_shutdown(cx);
    }
}

impl<T: AsyncWrite> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.io.poll_write(cx, buf);
        *this.unsent = !matches!(written, Poll::Ready(Ok(n)) if n == buf.len());
        note_sent(this.counter, &written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.io.poll_write_vectored(cx, bufs);
        *this.unsent = !matches!(written, Poll::Ready(Ok(n)) if n == bufs.iter().map(|b| b.len()).sum::<usize>());
        note_sent(this.counter, &written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// Sends `parts` one write at a time, sniffs, and checks that what sniffing kept is the
    /// start of what was sent, long enough to decide.
    async fn sniff_parts(parts: &[&[u8]]) -> Option<Protocol> {
        let (mut client, mut server) = tokio::io::duplex(64);
        let sent: Vec<u8> = parts.concat();
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for part in parts {
                client.write_all(&part).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let sniffed = sniff(&mut server).await.unwrap();
        writer.await.unwrap();
        let (protocol, kept) = sniffed?;
        assert!(sent.starts_with(&kept), "kept {kept:?} of {sent:?}");
        let needed = if sent.starts_with(b"PR") {
            3
        } else if sent.starts_with(b"P") {
            2
        } else {
            1
        };
        assert!(kept.len() >= needed, "kept {kept:?} of {sent:?}");
        Some(protocol)
    }

    #[tokio::test]
    async fn the_first_bytes_decide_and_are_all_kept() {
        assert_eq!(sniff_parts(&[b"GET / HTTP/1.1\r\n"]).await, Some(Protocol::Http1));
        // One byte at a time: `P` and `PR` wait, `PU` is HTTP/1.x (PUT), `PRI` is h2c.
        assert_eq!(sniff_parts(&[b"P", b"U", b"T / HTTP/1.1\r\n"]).await, Some(Protocol::Http1));
        assert_eq!(sniff_parts(&[b"P", b"R", b"I * HTTP/2.0"]).await, Some(Protocol::H2c));
        assert_eq!(sniff_parts(&[b"PROPFIND / HTTP/1.1\r\n"]).await, Some(Protocol::Http1));
        // Closed before deciding, or before sending anything.
        assert_eq!(sniff_parts(&[b"PR"]).await, None);
        assert_eq!(sniff_parts(&[]).await, None);
    }

    /// A timed-out head is answered 408 at the next read that would wait, unless an earlier
    /// write is still incomplete (the answer would land inside it).
    #[tokio::test(start_paused = true)]
    async fn a_timed_out_head_is_answered_unless_a_write_is_incomplete() {
        for incomplete in [false, true] {
            let (mut client, server) = tokio::io::duplex(256);
            let state = ConnState::new();
            let mut io = Prefixed::new(Bytes::new(), server);
            io.count_io(state.clone());
            if incomplete {
                // More than the pipe holds: the writer keeps the rest.
                assert_eq!(io.write(&[b'x'; 300]).await.unwrap(), 256);
            }
            client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
            let mut head = [0u8; 32];
            assert_eq!(io.read(&mut head).await.unwrap(), 18);
            // Not timed out: a read waits for the rest of the head.
            let wait = tokio::time::timeout(Duration::from_millis(20), io.read(&mut head)).await;
            assert!(wait.is_err(), "the read waits");
            state.answer_head_timeout(state.head_mark());
            let read = tokio::time::timeout(Duration::from_millis(20), io.read(&mut head)).await;
            if incomplete {
                assert!(read.is_err(), "no answer behind an incomplete write");
                continue;
            }
            assert_eq!(read.expect("the read ends").unwrap(), 0, "the end of the stream");
            drop(io);
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, REQUEST_TIMEOUT);
        }
    }

    /// A head that completes after it was found too slow, but before the client's I/O could
    /// answer it, is served; the heads that follow are not answered for it.
    #[tokio::test(start_paused = true)]
    async fn a_head_that_completed_meanwhile_leaves_the_next_ones_alone() {
        let (mut client, server) = tokio::io::duplex(256);
        let state = ConnState::new();
        let mut io = Prefixed::new(Bytes::new(), server);
        io.count_io(state.clone());
        let mut buf = [0u8; 64];
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 18);
        state.answer_head_timeout(state.head_mark());
        // The rest arrives before the next read: read, and the exchange runs and ends.
        client.write_all(b"st: x\r\n\r\n").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 9);
        drop(state.start_request());
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        // The next head arrives in two parts: the read between them waits.
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 18);
        let wait = tokio::time::timeout(Duration::from_secs(1), io.read(&mut buf)).await;
        assert!(wait.is_err(), "the next head is not answered");
    }

    #[tokio::test]
    async fn prefixed_reads_return_the_prefix_then_the_stream() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut io = Prefixed::new(Bytes::from_static(b"hello"), server);
        // A small buffer takes the prefix in parts.
        let mut small = [0u8; 3];
        assert_eq!(io.read(&mut small).await.unwrap(), 3);
        assert_eq!(&small, b"hel");
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"lo world");
    }
}

/// Where a client's HTTP/2 byte stream is: the connection preface, then frames (a 9-byte
/// header and a payload each). A header block runs from the header of a HEADERS frame to the
/// end of the frame (that frame or a CONTINUATION) that carries END_HEADERS; RFC 9113 allows
/// no other frame in between.
#[derive(Debug)]
pub(crate) struct H2Frames {
    /// Bytes of the connection preface still to pass.
    preface: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
    /// The current frame belongs to a header block, and ends it.
    ends_block: bool,
    in_block: bool,
}

impl Default for H2Frames {
    fn default() -> Self {
        Self { preface: 24, header: [0; 9], header_len: 0, payload_left: 0, ends_block: false, in_block: false }
    }
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;

impl H2Frames {
    /// Follows `data`, the next bytes from the client.
    pub(crate) fn scan(&mut self, mut data: &[u8], state: &ConnState) {
        while !data.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(data.len());
                self.preface -= n;
                data = &data[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                data = &data[n..];
                if self.payload_left == 0 {
                    self.frame_done(state);
                }
            } else {
                let n = (9 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                self.header_len += n;
                data = &data[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = self.header;
                    let length = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let header_frame = kind == FRAME_HEADERS || (kind == FRAME_CONTINUATION && self.in_block);
                    if header_frame && !self.in_block {
                        self.in_block = true;
                        state.set_h2_head(true);
                    }
                    self.ends_block = header_frame && flags & FLAG_END_HEADERS != 0;
                    self.payload_left = length;
                    if length == 0 {
                        self.frame_done(state);
                    }
                }
            }
        }
    }

    fn frame_done(&mut self, state: &ConnState) {
        if self.ends_block {
            self.ends_block = false;
            self.in_block = false;
            state.set_h2_head(false);
        }
    }
}

#[cfg(test)]
mod h2_frames_tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `parts` in chunks of `chunk` bytes; after each part, whether a block is open.
    fn open_after(parts: &[Vec<u8>], chunk: usize) -> Vec<bool> {
        let state = ConnState::new();
        state.mark_h2();
        let mut frames = H2Frames::default();
        let mut seen = Vec::new();
        for part in parts {
            for c in part.chunks(chunk) {
                frames.scan(c, &state);
            }
            seen.push(state.in_head().0);
        }
        seen
    }

    #[test]
    fn header_blocks_open_at_headers_and_end_with_end_headers_however_the_bytes_are_cut() {
        let parts = [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            frame(0x4, 0, &[0; 6]),       // SETTINGS
            frame(0x1, 0x1, &[0x82; 5]),  // HEADERS, END_STREAM only: the block stays open
            frame(0x9, 0, &[0x86; 3]),    // CONTINUATION
            frame(0x9, 0x4, &[0x84; 2]),  // CONTINUATION, END_HEADERS
            frame(0x0, 0x1, b"body"),     // DATA
            frame(0x1, 0x4 | 0x1, &[]),   // HEADERS with END_HEADERS, empty
            frame(0x1, 0x0, &[0x82; 40]), // HEADERS, left open
        ];
        for chunk in [1, 2, 5, 9, 64] {
            assert_eq!(
                open_after(&parts, chunk),
                [false, false, true, true, false, false, false, true],
                "chunks of {chunk}"
            );
        }
        // Half of the last HEADERS frame's header: not yet a block.
        let half = [parts[0].clone(), parts[7][..5].to_vec()];
        assert_eq!(open_after(&half, 1), [false, false]);
    }
}
