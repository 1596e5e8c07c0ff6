//! Tunnels: the byte streams an upgrade (HTTP/1.1 `Upgrade`, HTTP/2 extended CONNECT) turns an
//! exchange into, and the stream idle timeout that bounds them.
//!
//! A tunnel on which no byte has moved either way for the stream idle timeout is closed, as
//! Envoy's `stream_idle_timeout` closes an idle WebSocket: a peer that vanished without
//! closing, or that stopped reading, would otherwise hold both connections for ever.
//!
//! Progress is the count of completed reads and writes. An HTTP/1.1 upgrade counts both of
//! its connections. An HTTP/2 tunnel counts its upstream connection and the data frames
//! received from the client; what it sends the client shows as the next read from the
//! upstream, once the chunk before (16 KiB at most) has gone out. So a client that opens its
//! window by less than 16 KiB per timeout (55 bytes a second at the 5-minute default) counts
//! as idle. A direction stalled on one side stops the reads or writes on the other too, once
//! the copy's buffer is full, so a stall anywhere is seen.
//!
//! Tunnels are rare next to requests, so each has a timer of its own; it samples the count
//! eight times per period, so a tunnel closes between one and one and an eighth periods
//! after its last byte moved.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::upstream::TunnelGuard;

/// How many times per stream idle timeout a tunnel's progress is sampled.
const CHECKS: u32 = 8;

/// Copies bytes both ways between the upgraded downstream and upstream connections of an
/// HTTP/1.1 upgrade, until either side closes or the tunnel has been idle for `idle_limit`.
pub(crate) async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle_limit: Option<Duration>,
    open: TunnelGuard,
) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let moved = Arc::new(AtomicU64::new(0));
    let mut downstream = Counted::new(TokioIo::new(downstream), moved.clone());
    let mut upstream = Counted::new(TokioIo::new(upstream), moved.clone());
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => match copied {
            Ok((up, down)) => tracing::debug!(bytes_up = up, bytes_down = down, "upgraded connection closed"),
            Err(e) => tracing::debug!(error = %e, "upgraded connection failed"),
        },
        () = idle(&moved, idle_limit) => tracing::debug!("upgraded connection idle for the stream idle timeout: closed"),
    }
    drop(open);
}

pin_project_lite::pin_project! {
    /// I/O that counts its reads and writes that completed (an end of stream, a shutdown or
    /// an error counts too; a flush does not), for an idle timeout.
    pub(crate) struct Counted<T> {
        #[pin]
        io: T,
        moved: Arc<AtomicU64>,
    }
}

impl<T> Counted<T> {
    pub(crate) fn new(io: T, moved: Arc<AtomicU64>) -> Self {
        Self { io, moved }
    }
}

/// Passes `result` on, counting it if it completed.
fn counted<R>(moved: &AtomicU64, result: Poll<R>) -> Poll<R> {
    if result.is_ready() {
        moved.fetch_add(1, Ordering::Relaxed);
    }
    result
}

impl<T: AsyncRead> AsyncRead for Counted<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        counted(this.moved, this.io.poll_read(cx, buf))
    }
}

impl<T: AsyncWrite> AsyncWrite for Counted<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        counted(this.moved, this.io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        counted(this.moved, this.io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        counted(this.moved, this.io.poll_shutdown(cx))
    }
}

/// Completes once `moved` has stood still for `limit`: at the first of [`CHECKS`] samples per
/// period that finds it unchanged for a whole period, so between one and one and an eighth
/// periods after it last changed. Never completes without a limit.
pub(crate) async fn idle(moved: &AtomicU64, limit: Option<Duration>) {
    let Some(limit) = limit else { return std::future::pending().await };
    // A millisecond at least: a limit set through the library may be tiny, and a zero period
    // would panic.
    let tick = (limit / CHECKS).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    // After a stall of the runtime, sample at the pace again rather than in a burst (a burst
    // would count the stall as several idle samples).
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = moved.load(Ordering::Relaxed);
    let mut still = 0;
    loop {
        ticks.tick().await;
        let now = moved.load(Ordering::Relaxed);
        if now == last {
            still += 1;
            if still >= CHECKS {
                return;
            }
        } else {
            last = now;
            still = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    /// A tunnel closes between one and one and an eighth stream idle timeouts after its last
    /// byte moved, and one that keeps moving, however slowly, stays open.
    #[tokio::test(start_paused = true)]
    async fn a_tunnel_closes_once_nothing_has_moved_for_the_limit() {
        let limit = Duration::from_secs(300);
        let moved = Arc::new(AtomicU64::new(0));
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = Counted::new(near, moved.clone());
        // One watch throughout, as a tunnel has: its samples fall where they fall relative to
        // the last byte.
        let mut watch = std::pin::pin!(idle(&moved, Some(limit)));

        // A byte each way every 61 s (off the 37.5 s sampling pace), for half an hour: kept.
        let talk = async {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(61)).await;
                far.write_all(b"x").await.unwrap();
                let mut byte = [0; 1];
                near.read_exact(&mut byte).await.unwrap();
                near.write_all(b"y").await.unwrap();
                far.read_exact(&mut byte).await.unwrap();
            }
        };
        let start = Instant::now();
        tokio::select! {
            () = talk => {}
            () = &mut watch => panic!("closed after {:?} although bytes moved", start.elapsed()),
        }

        // Then silence: closed a limit after the last byte, to the sample (37.5 s).
        let last = Instant::now();
        watch.await;
        let after = last.elapsed();
        assert!(after >= limit && after <= limit + limit / CHECKS, "closed {after:?} after the last byte");

        // A direction blocked on a full buffer is not progress: writes that wait do not count.
        let before = moved.load(Ordering::Relaxed);
        let mut waiting = std::pin::pin!(near.write_all(&[0; 1024]));
        let pending = std::future::poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "a 1 KiB write does not fit a 64-byte pipe");
        let counted = moved.load(Ordering::Relaxed) - before;
        assert_eq!(counted, 1, "one write filled the buffer; the one that waits is not counted");
    }

    /// A limit too short to sample eight times is sampled every millisecond (a zero period
    /// would panic).
    #[tokio::test(start_paused = true)]
    async fn a_tiny_limit_does_not_spin_or_panic() {
        let moved = AtomicU64::new(0);
        let start = Instant::now();
        idle(&moved, Some(Duration::from_nanos(3))).await;
        assert_eq!(start.elapsed(), Duration::from_millis(8));
    }

    /// Without a limit a tunnel is never closed for idleness.
    #[tokio::test(start_paused = true)]
    async fn no_limit_never_closes() {
        let moved = AtomicU64::new(0);
        let waited = tokio::time::timeout(Duration::from_secs(365 * 24 * 3600), idle(&moved, None)).await;
        assert!(waited.is_err());
    }
}
