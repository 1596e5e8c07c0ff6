//! Downstream connections: serving one, closing it once idle, and draining on shutdown,
//! without a timer per request.
//!
//! Each connection has a [`ConnState`] that requests update with two atomic additions (one
//! when a request starts, one when its response ends, [`InFlight`]), and a small watchdog
//! task that wakes four times per idle timeout. A watchdog that sees no request start or end
//! and none in flight across four consecutive ticks asks the connection to close gracefully:
//! an HTTP/1.1 connection closes, an HTTP/2 one sends GOAWAY. A connection is thus closed
//! after between one and one and a quarter idle timeouts without a request. The same rule
//! bounds a request head that never completes (slow-header clients), since no request starts
//! until its head has arrived: such a connection, still idle one tick after the graceful
//! close (which waits for the head), is dropped.
//!
//! The watchdog also relays the drain signal. Per-request timers (hyper's header read timeout,
//! for instance) would cost a timer registration, a clock read and an allocation on every
//! request; on the proxy's hot path that was 1.3% of its CPU.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Added when a request starts: one more in flight (low half), one more event (high half).
const STARTED: u64 = 1 + (1 << 32);
/// Added when a response ends: one fewer in flight, one more event.
const ENDED: u64 = (1 << 32) - 1;
const IN_FLIGHT_MASK: u64 = (1 << 32) - 1;

const OPEN: u8 = 0;
const CLOSE: u8 = 1;
const ABORT: u8 = 2;

/// What a downstream connection's requests, its serving task and its watchdog share.
#[derive(Default)]
pub(crate) struct ConnState {
    /// Requests in flight (low 32 bits) and requests started plus ended (high 32 bits, wrapping).
    activity: AtomicU64,
    /// [`OPEN`], [`CLOSE`] (gracefully: idle, or draining) or [`ABORT`] (drop it now).
    close: AtomicU8,
    /// Wakes the serving task when `close` is set.
    waker: Mutex<Option<Waker>>,
    /// Notified when the serving task has finished.
    ended: Notify,
}

impl ConnState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Marks a request as started; dropping the guard marks its response as ended.
    pub(crate) fn start_request(self: &Arc<Self>) -> InFlight {
        self.activity.fetch_add(STARTED, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn request_close(&self, how: u8) {
        self.close.fetch_max(how, Ordering::SeqCst);
        // Left in place: the serving task registers again only when its waker changes.
        if let Some(w) = &*self.waker.lock().unwrap_or_else(|p| p.into_inner()) {
            w.wake_by_ref();
        }
    }
}

/// A request in flight on a downstream connection; dropped when its response has ended (or
/// was abandoned).
pub(crate) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.fetch_add(ENDED, Ordering::Relaxed);
    }
}

/// A connection that can be asked to finish its in-flight work and close.
pub(crate) trait GracefulConn: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulConn for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::conn::auto::Connection::graceful_shutdown(self)
    }
}

impl<I, S, E, B> GracefulConn for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown(self)
    }
}

pin_project_lite::pin_project! {
    /// Serves a connection, starting its graceful shutdown when its [`ConnState`] says so;
    /// ends with `None` when told to abort it.
    pub(crate) struct Guarded<C> {
        #[pin]
        conn: C,
        state: Arc<ConnState>,
        registered: Option<Waker>,
        closing: bool,
    }
}

impl<C> Guarded<C> {
    pub(crate) fn new(conn: C, state: Arc<ConnState>) -> Self {
        Guarded { conn, state, registered: None, closing: false }
    }
}

impl<C: GracefulConn> Future for Guarded<C> {
    type Output = Option<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<C::Output>> {
        let mut this = self.project();
        // The task's waker rarely changes: take the lock only when it does.
        if this.registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
            *this.state.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            *this.registered = Some(cx.waker().clone());
        }
        match this.state.close.load(Ordering::SeqCst) {
            OPEN => {}
            CLOSE if !*this.closing => {
                *this.closing = true;
                this.conn.as_mut().graceful_shutdown();
            }
            CLOSE => {}
            _ => return Poll::Ready(None),
        }
        this.conn.poll(cx).map(Some)
    }
}

/// Serves `conn` to its end, then lets its watchdog go. `None` if it was aborted.
pub(crate) async fn serve<C: GracefulConn>(conn: C, state: Arc<ConnState>) -> Option<C::Output> {
    let out = Guarded::new(conn, state.clone()).await;
    state.ended.notify_one();
    out
}

/// Watches one connection: asks it to close once idle for `idle_timeout` (if any), or when
/// `drain` turns true. Holds `drain` until the connection has ended, so the drain can wait
/// for every connection by waiting for the receivers to go.
pub(crate) async fn watchdog(state: Arc<ConnState>, mut drain: watch::Receiver<bool>, idle_timeout: Option<Duration>) {
    let tick = idle_timeout.map(|t| t / 4);
    let mut seen = state.activity.load(Ordering::Relaxed);
    let mut idle_ticks = 0u32;
    let mut watching_drain = !*drain.borrow_and_update();
    if !watching_drain {
        state.request_close(CLOSE);
    }
    loop {
        tokio::select! {
            biased;
            () = state.ended.notified() => return,
            changed = drain.changed(), if watching_drain => {
                watching_drain = false;
                if changed.is_ok() && *drain.borrow() {
                    state.request_close(CLOSE);
                }
            }
            () = sleep_or_forever(tick) => {
                let now = state.activity.load(Ordering::Relaxed);
                if now == seen && now & IN_FLIGHT_MASK == 0 {
                    idle_ticks += 1;
                    if idle_ticks == 4 {
                        tracing::debug!("closing an idle downstream connection");
                        state.request_close(CLOSE);
                    } else if idle_ticks == 5 {
                        // Still open and idle: stuck in a request head. Drop it.
                        tracing::debug!("dropping a downstream connection that sent no complete request head");
                        state.request_close(ABORT);
                    }
                } else {
                    idle_ticks = 0;
                    seen = now;
                }
            }
        }
    }
}

async fn sleep_or_forever(period: Option<Duration>) {
    match period {
        Some(p) => tokio::time::sleep(p).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Probe {
        shut: bool,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.shut { Poll::Ready(()) } else { Poll::Pending }
        }
    }

    impl GracefulConn for Probe {
        fn graceful_shutdown(mut self: Pin<&mut Self>) {
            self.shut = true;
        }
    }

    async fn closes_after(activity: impl FnOnce(&Arc<ConnState>) -> Option<InFlight>) -> Option<Duration> {
        let state = ConnState::new();
        let (_tx, rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let held = activity(&state);
        tokio::spawn(watchdog(state.clone(), rx, Some(Duration::from_secs(60))));
        let served = tokio::time::timeout(Duration::from_secs(600), serve(Probe { shut: false }, state)).await;
        drop(held);
        served.ok().map(|out| {
            assert_eq!(out, Some(()), "closed gracefully");
            start.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_one_to_one_and_a_quarter_timeouts() {
        let after = closes_after(|_| None).await.expect("closed");
        assert!(after >= Duration::from_secs(60) && after <= Duration::from_secs(75), "{after:?}");
    }

    struct Stuck;

    impl Future for Stuck {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            Poll::Pending
        }
    }

    impl GracefulConn for Stuck {
        // Like an HTTP/1.1 connection in the middle of a request head: waits for it.
        fn graceful_shutdown(self: Pin<&mut Self>) {}
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_stuck_in_a_request_head_is_dropped_one_tick_later() {
        let state = ConnState::new();
        let (_tx, rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        tokio::spawn(watchdog(state.clone(), rx, Some(Duration::from_secs(60))));
        let out = tokio::time::timeout(Duration::from_secs(600), serve(Stuck, state)).await.expect("dropped");
        assert_eq!(out, None);
        let after = start.elapsed();
        assert!(after >= Duration::from_secs(75) && after <= Duration::from_secs(90), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_a_request_in_flight_stays_open() {
        assert_eq!(closes_after(|s| Some(s.start_request())).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_closes_every_connection_and_waits_for_them() {
        let (tx, rx) = watch::channel(false);
        let mut served = Vec::new();
        for _ in 0..3 {
            let state = ConnState::new();
            tokio::spawn(watchdog(state.clone(), rx.clone(), None));
            served.push(tokio::spawn(serve(Probe { shut: false }, state)));
        }
        drop(rx);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(served.iter().all(|s| !s.is_finished()), "no idle timeout configured");
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), tx.closed()).await.expect("all watchdogs let go");
        for s in served {
            assert_eq!(s.await.unwrap(), Some(()));
        }
    }
}
