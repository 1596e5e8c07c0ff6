//! Downstream connections: serving one, closing it once idle, timing out its HTTP/1.x
//! requests and stalled exchanges, and draining on shutdown, all without a timer per
//! request.
//!
//! Each connection has a [`ConnState`] that its requests update with a few atomic operations
//! ([`ConnState::start_request`], [`InFlight`], [`HeadersDeadline`]), and a small watchdog task
//! that samples it on a coarse tick:
//!
//! * **Idle timeout.** While the connection is idle the watchdog ticks four times per idle
//!   timeout. Once no request has started or been in flight for an idle timeout, it asks the
//!   connection to close gracefully (an HTTP/1.1 connection closes, an HTTP/2 one sends
//!   GOAWAY): after between one and one and a quarter idle timeouts without a request. The same
//!   rule bounds a request head that never completes (slow-header clients), since no request
//!   starts until its head has arrived: such a connection, still idle one tick after the
//!   graceful close (which waits for the head), is dropped.
//! * **Request timeout (HTTP/1.x).** An HTTP/1.x connection has at most one request waiting
//!   for response headers. While one may be, the watchdog ticks eight times per request
//!   timeout (or faster, for a shorter idle timeout); a request first seen waiting at one tick
//!   and still waiting a request timeout later is failed (504 `UT`): between one and one and
//!   an eighth request timeouts after it started.
//!   HTTP/2 requests, many at once on a connection, each use a timer of their own.
//! * **Request head timeout (HTTP/1.x).** The client's reads are counted
//!   ([`Prefixed::count_io`](crate::sniff::Prefixed::count_io)), and
//!   the end of each exchange (its response and its request body, [`BodyInFlight`]) marks how
//!   many bytes had arrived by then. Bytes beyond that mark, with no request in flight, are a
//!   request head in progress. The first of them wakes a lazy watchdog; a head still in
//!   progress one head timeout after it was first seen (at that wake-up, or at a tick, eight
//!   per head timeout) is answered `408 Request Timeout` and its connection closed, as Envoy
//!   does: the watchdog wakes the connection, and its I/O
//!   ([`Prefixed`](crate::sniff::Prefixed)), asked by hyper for the rest of the head, writes
//!   the answer instead and reports the end of the stream. A connection still open a tick
//!   later (it could not be answered) is dropped: between one and one and a half head
//!   timeouts after the head's first byte. Unlike the idle timeout, this does not close
//!   connections that merely sit idle.
//!
//!   The count cannot tell which of the bytes hyper has read it has also parsed: the start
//!   of a head that arrives before the previous exchange ended (pipelined, even in the same
//!   packet as the previous request) is not timed, nor is the rest of a request body that
//!   hyper discards after a response that did not read it (if the client then sends
//!   nothing, its connection is answered 408 and closed one head timeout after the response,
//!   rather than closed after the idle timeout; a client's next request ends that). The
//!   idle timeout bounds both.
//! * **Stream idle timeout.** The same I/O counts the bytes written too. A connection with
//!   a request in flight on which no byte has moved either way for the stream idle timeout
//!   (a client that stopped reading or vanished, an upstream silent mid-body) is dropped; an
//!   HTTP/1.x request still waiting for response headers is answered 504 instead. Checked at
//!   the quick pace (eight ticks per period at most); a watchdog that was idling notices the
//!   exchange up to a quarter idle timeout late. This times the connection, where Envoy times
//!   each stream: on h2c, one stream kept without window while others move is not caught.
//! * **Drain.** The watchdog relays the drain signal to the connection.
//!
//! Per-request timers (hyper's header read timeout, a `tokio::time::timeout` per request) cost
//! a timer registration and removal, clock reads and an allocation on every request; on the
//! proxy's HTTP/1.1 hot path that was about 2.5% of its CPU.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Added when a request starts: one more in flight (low half), one more started (high half).
const STARTED: u64 = 1 + (1 << 32);
const IN_FLIGHT_MASK: u64 = (1 << 32) - 1;

const OPEN: u8 = 0;
const CLOSE: u8 = 1;
const ABORT: u8 = 2;

/// Ticks per request timeout while a request waits for response headers.
const REQUEST_TICKS: u32 = 8;
/// Ticks per idle timeout while idle.
const IDLE_TICKS: u32 = 4;

/// What a downstream connection's requests, its serving task and its watchdog share.
#[derive(Default)]
pub(crate) struct ConnState {
    /// Requests in flight (low 32 bits) and requests started (high 32 bits, wrapping).
    activity: AtomicU64,
    /// The number (1-based, as counted in `activity`) of the HTTP/1.x request waiting for
    /// response headers; 0 when none is.
    waiting: AtomicU64,
    /// The number of the request the watchdog timed out.
    timed_out: AtomicU64,
    /// Bytes read from the client (counted by its `Prefixed` I/O).
    received: AtomicU64,
    /// Bytes written to the client (the same).
    sent: AtomicU64,
    /// `received` when the last exchange ended: bytes beyond it are the next request head.
    head_mark: AtomicU64,
    /// One more than the mark of the request head that took too long (0: none), set by the
    /// watchdog: the client's I/O answers it 408 and ends the connection
    /// ([`ConnState::head_timed_out`]).
    timed_out_head: AtomicU64,
    /// Set while the watchdog ticks at the idle pace; a request that starts waiting, or the
    /// first bytes of a request head, then wake it with `hurry`.
    lazy: AtomicBool,
    hurry: Notify,
    /// [`OPEN`], [`CLOSE`] (gracefully: idle, or draining) or [`ABORT`] (drop it now).
    close: AtomicU8,
    /// The serving task's waker: wakes it when `close` or `timed_out` is set.
    waker: Mutex<Option<Waker>>,
    /// Notified when the serving task has finished.
    ended: Notify,
    /// HTTP/2: the number of the client's header block in progress (counted from 1, odd
    /// while one is open, even when closed); HTTP/1.x: 0.
    h2_head: AtomicU64,
}

impl ConnState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Marks a request as started; dropping the guard marks its response as ended.
    pub(crate) fn start_request(self: &Arc<Self>) -> InFlight {
        let before = self.activity.fetch_add(STARTED, Ordering::Relaxed);
        // Never 0, which means "none" in `waiting`.
        InFlight { state: self.clone(), number: ((before >> 32).wrapping_add(1) & IN_FLIGHT_MASK).max(1) }
    }

    /// Marks an HTTP/1.x request body as being read: the exchange is in flight until it has
    /// ended, even after the response has. `None` for a body that has already ended.
    pub(crate) fn body_in_flight(self: &Arc<Self>, ended: bool) -> Option<BodyInFlight> {
        if ended {
            return None;
        }
        self.activity.fetch_add(1, Ordering::Relaxed);
        Some(BodyInFlight { state: self.clone() })
    }

    /// One part of an exchange ended (its response, or its request body): what the client
    /// sent so far belongs to it, and the exchange is done with once both have ended.
    fn end_part(&self) {
        // The mark first: whoever sees nothing in flight sees the new mark too. (The two
        // parts may end on different tasks: the mark only grows.)
        self.head_mark.fetch_max(self.received.load(Ordering::Relaxed), Ordering::Relaxed);
        self.activity.fetch_sub(1, Ordering::Release);
    }

    /// Counts `n` bytes read from the client, waking a lazy watchdog: they may start a head.
    pub(crate) fn note_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::SeqCst);
        // Pairs with the watchdog's store of `lazy` and check of `in_head`, as for `waiting`.
        if self.lazy.load(Ordering::SeqCst) {
            self.hurry.notify_one();
        }
    }

    /// Counts `n` bytes written to the client.
    pub(crate) fn note_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes moved either way so far.
    fn moved(&self) -> u64 {
        self.received.load(Ordering::Relaxed).wrapping_add(self.sent.load(Ordering::Relaxed))
    }

    /// The connection speaks HTTP/2: its request heads are its header blocks.
    pub(crate) fn mark_h2(&self) {
        self.h2_head.store(2, Ordering::SeqCst);
    }

    fn is_h2(&self) -> bool {
        self.h2_head.load(Ordering::SeqCst) != 0
    }

    /// HTTP/2: a header block opened (`true`) or ended; an opening wakes a lazy watchdog.
    pub(crate) fn set_h2_head(&self, open: bool) {
        let n = self.h2_head.fetch_add(1, Ordering::SeqCst) + 1;
        debug_assert_eq!(n % 2 == 1, open, "header blocks open and end in turn");
        if open && self.lazy.load(Ordering::SeqCst) {
            self.hurry.notify_one();
        }
    }

    /// Whether a request head is in progress, and the mark that tells it from later ones.
    /// HTTP/1.x: bytes arrived after the last exchange ended, with none in flight. HTTP/2: a
    /// header block is open (streams open only once theirs is complete).
    pub(crate) fn in_head(&self) -> (bool, u64) {
        let h2 = self.h2_head.load(Ordering::SeqCst);
        if h2 != 0 {
            return (h2 % 2 == 1, h2);
        }
        let idle = self.activity.load(Ordering::SeqCst) & IN_FLIGHT_MASK == 0;
        let mark = self.head_mark.load(Ordering::SeqCst);
        (idle && self.received.load(Ordering::SeqCst) != mark, mark)
    }

    /// Whether the request head in progress has taken longer than the head timeout: the
    /// client's I/O then answers it with 408 (Envoy's `request_headers_timeout`) and ends the
    /// connection, instead of letting hyper wait for the rest of it.
    ///
    /// Only that head: one that completed meanwhile, and any that follows, is not answered.
    pub(crate) fn head_timed_out(&self) -> bool {
        let (in_head, mark) = self.in_head();
        in_head && self.timed_out_head.load(Ordering::SeqCst) == mark.wrapping_add(1)
    }

    /// Where the next request head is counted from.
    #[cfg(test)]
    pub(crate) fn head_mark(&self) -> u64 {
        self.head_mark.load(Ordering::SeqCst)
    }

    /// Has the head counted from `mark` answered 408 (by the client's I/O, woken here).
    pub(crate) fn answer_head_timeout(&self, mark: u64) {
        self.timed_out_head.store(mark.wrapping_add(1), Ordering::SeqCst);
        self.wake_server();
    }

    fn wake_server(&self) {
        // Left in place: the serving task registers again only when its waker changes.
        if let Some(w) = &*self.waker.lock().unwrap_or_else(|p| p.into_inner()) {
            w.wake_by_ref();
        }
    }

    fn request_close(&self, how: u8) {
        self.close.fetch_max(how, Ordering::SeqCst);
        self.wake_server();
    }
}

/// A request in flight on a downstream connection; dropped when its response has ended (or
/// was abandoned).
pub(crate) struct InFlight {
    state: Arc<ConnState>,
    number: u64,
}

impl InFlight {
    /// Bounds `fut` (an HTTP/1.x request's wait for response headers, polled by the
    /// connection's own task) by the connection watchdog's request timeout.
    pub(crate) fn headers_deadline<F: Future>(&self, fut: F) -> HeadersDeadline<'_, F> {
        HeadersDeadline { fut, in_flight: self, started: false }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.end_part();
    }
}

/// An HTTP/1.x request body still being read ([`ConnState::body_in_flight`]); dropped when it
/// has ended or was abandoned.
pub(crate) struct BodyInFlight {
    state: Arc<ConnState>,
}

impl Drop for BodyInFlight {
    fn drop(&mut self) {
        self.state.end_part();
    }
}

/// The request timed out waiting for response headers.
#[derive(Debug)]
pub(crate) struct Elapsed;

pin_project_lite::pin_project! {
    /// See [`InFlight::headers_deadline`].
    pub(crate) struct HeadersDeadline<'a, F> {
        #[pin]
        fut: F,
        in_flight: &'a InFlight,
        started: bool,
    }

    impl<'a, F> PinnedDrop for HeadersDeadline<'a, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.started {
                let state = &this.in_flight.state;
                let _ = state.waiting.compare_exchange(this.in_flight.number, 0, Ordering::SeqCst, Ordering::Relaxed);
            }
        }
    }
}

impl<F: Future> Future for HeadersDeadline<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (state, number) = (&this.in_flight.state, this.in_flight.number);
        // Once it is ready (or timed out), dropping it clears `waiting`.
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if !*this.started {
            *this.started = true;
            state.waiting.store(number, Ordering::SeqCst);
            // Pairs with the watchdog's store of `lazy` and load of `waiting`: one of the two
            // sees the other, so a lazy watchdog is always told.
            if state.lazy.load(Ordering::SeqCst) {
                state.hurry.notify_one();
            }
        } else if state.timed_out.load(Ordering::SeqCst) == number {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    }
}

/// A connection that can be asked to finish its in-flight work and close (hyper-util's own
/// `GracefulConnection` trait is sealed).
pub(crate) trait GracefulConn: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConn for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self)
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

/// What a connection's watchdog enforces; `None` disables each.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Closes a connection without a request for this long.
    pub(crate) idle: Option<Duration>,
    /// Fails an HTTP/1.x request waiting this long for response headers.
    pub(crate) request: Option<Duration>,
    /// Drops an HTTP/1.x connection whose request head takes this long.
    pub(crate) headers: Option<Duration>,
    /// Drops a connection with a request in flight on which no byte moved for this long.
    pub(crate) stream_idle: Option<Duration>,
}

/// The shortest tick of a watchdog.
const MIN_TICK: Duration = Duration::from_millis(1);

/// Watches one connection (see the module docs): closes it once idle for `limits.idle`,
/// times out an HTTP/1.x request waiting longer than `limits.request` for response headers,
/// drops it when a request head takes longer than `limits.headers`, and closes it when
/// `drain` turns true. Holds `drain` until the connection has ended, so the drain can wait for
/// every connection by waiting for the receivers to go.
pub(crate) async fn watchdog(state: Arc<ConnState>, mut drain: watch::Receiver<bool>, limits: Limits) {
    let Limits { idle: idle_timeout, request: request_timeout, headers: head_timeout, stream_idle } = limits;
    let idle_tick = idle_timeout.map(|t| t / IDLE_TICKS);
    let request_tick = request_timeout.map(|t| t / REQUEST_TICKS);
    // Eight ticks per head timeout: a head first seen at a tick arrived up to a tick before.
    let head_tick = head_timeout.map(|t| t / REQUEST_TICKS);
    // Quick ticks while a request may be waiting or a head is arriving, lazy ones while idle.
    let stream_tick = stream_idle.map(|t| t / REQUEST_TICKS);
    // Limits set through the library may be tiny: a tick is a millisecond at least, or the
    // watchdog would spin.
    let idle_tick = idle_tick.map(|t| t.max(MIN_TICK));
    let quick = [request_tick, idle_tick, head_tick, stream_tick].into_iter().flatten().min().map(|t| t.max(MIN_TICK));
    let mut watching_drain = !*drain.borrow_and_update();
    if !watching_drain {
        state.request_close(CLOSE);
    }
    let mut last = Instant::now();
    let mut seen = state.activity.load(Ordering::SeqCst);
    let mut idle_since: Option<Instant> = None;
    let mut closed_idle = false;
    let mut closed_head = false;
    // The request seen waiting at the last tick, and the tick it was first seen waiting at.
    let mut waiting = (0u64, last);
    // The request head in progress (the mark its bytes count from) and when it was first seen.
    let mut head: Option<(u64, Instant)> = None;
    // Bytes moved on the connection at the last tick, and since when that count has stood
    // while a request was in flight.
    let mut moved = (state.moved(), last);
    loop {
        let tick = if idle_since.is_none() || head.is_some() { quick } else { idle_tick };
        if tick == idle_tick && tick != quick {
            state.lazy.store(true, Ordering::SeqCst);
            if state.waiting.load(Ordering::SeqCst) != 0 {
                state.lazy.store(false, Ordering::SeqCst);
                idle_since = None;
                continue;
            }
            if head_timeout.is_some()
                && let (true, mark) = state.in_head()
            {
                state.lazy.store(false, Ordering::SeqCst);
                if head.is_none_or(|(seen, _)| seen != mark) {
                    (head, closed_head) = (Some((mark, Instant::now())), false);
                }
                continue;
            }
        }
        tokio::select! {
            biased;
            () = state.ended.notified() => return,
            changed = drain.changed(), if watching_drain => {
                watching_drain = false;
                if changed.is_ok() && *drain.borrow() {
                    state.request_close(CLOSE);
                }
                continue;
            }
            () = state.hurry.notified(), if request_tick.is_some() || head_timeout.is_some() => {
                state.lazy.store(false, Ordering::SeqCst);
                // A request waiting for response headers, or the first bytes of a head (which
                // do not make the connection busy: the idle timeout still counts).
                if state.waiting.load(Ordering::SeqCst) != 0 {
                    idle_since = None;
                } else if head_timeout.is_some()
                    && let (true, mark) = state.in_head()
                    && head.is_none_or(|(seen, _)| seen != mark)
                {
                    (head, closed_head) = (Some((mark, Instant::now())), false);
                }
                continue;
            }
            () = sleep_or_forever(tick) => {}
        }
        state.lazy.store(false, Ordering::SeqCst);
        let now = Instant::now();

        // Request timeout: a request first seen waiting at one tick, and still waiting a
        // request timeout later, has waited at least that long (and at most a tick more).
        let w = state.waiting.load(Ordering::SeqCst);
        if w != waiting.0 {
            waiting = (w, now);
        } else if let Some(limit) = request_timeout
            && w != 0
            && now.duration_since(waiting.1) >= limit
        {
            tracing::debug!(request = w, "request timed out waiting for response headers");
            state.timed_out.store(w, Ordering::SeqCst);
            state.wake_server();
        }

        // Request head timeout: the same head (bytes beyond the same mark) still in progress
        // a head timeout after it was first seen.
        if let Some(limit) = head_timeout {
            match (state.in_head(), head) {
                ((true, mark), Some((seen, since))) if seen == mark => close_or_drop(
                    &state,
                    &mut closed_head,
                    now.duration_since(since) >= limit,
                    "whose request head takes too long",
                    // Not a graceful close: hyper closes at once a connection that has
                    // completed an exchange, without reading further, so the 408 would
                    // never go out. HTTP/2: the connection is dropped (there is no stream
                    // to answer, and the client may send nothing else meanwhile).
                    |state| {
                        if state.is_h2() {
                            state.request_close(ABORT);
                        } else {
                            state.answer_head_timeout(mark);
                        }
                    },
                ),
                // A new head, or none (one asked to close may have completed in time after
                // all): it starts afresh.
                ((true, mark), _) => (head, closed_head) = (Some((mark, now)), false),
                ((false, _), _) => (head, closed_head) = (None, false),
            }
        }

        // Stream idle timeout: a request in flight, and no byte moved for the limit.
        if let Some(limit) = stream_idle {
            let now_moved = state.moved();
            let busy = state.activity.load(Ordering::SeqCst) & IN_FLIGHT_MASK != 0;
            if !busy || now_moved != moved.0 {
                moved = (now_moved, now);
            } else if now.duration_since(moved.1) >= limit {
                let w = state.waiting.load(Ordering::SeqCst);
                if w != 0 {
                    // Still waiting for response headers: answered 504, as by the request
                    // timeout; the answer moves bytes, and the count starts again.
                    tracing::debug!(request = w, "request idle too long waiting for response headers");
                    state.timed_out.store(w, Ordering::SeqCst);
                    state.wake_server();
                    moved.1 = now;
                } else {
                    tracing::debug!("dropping a downstream connection on which nothing moved for too long");
                    state.request_close(ABORT);
                }
            }
        }

        // Idle timeout: idle since the last tick if nothing started and nothing was or is in
        // flight.
        let activity = state.activity.load(Ordering::SeqCst);
        let was_idle = activity == seen && activity & IN_FLIGHT_MASK == 0;
        seen = activity;
        if !was_idle {
            idle_since = None;
            closed_idle = false;
        } else if let (since, Some(limit)) = (*idle_since.get_or_insert(last), idle_timeout) {
            // Still open and idle after the graceful close: stuck in a request head.
            close_or_drop(&state, &mut closed_idle, now.duration_since(since) >= limit, "that is idle", |state| {
                state.request_close(CLOSE)
            });
        }
        last = now;
    }
}

/// Once `due`, asks the connection to close with `ask` (and remembers that in `asked`); if it
/// is still there, in the same state, at a later tick, drops it.
fn close_or_drop(state: &ConnState, asked: &mut bool, due: bool, why: &str, ask: impl FnOnce(&ConnState)) {
    if *asked {
        tracing::debug!("dropping a downstream connection {why}, still open after being asked to close");
        state.request_close(ABORT);
    } else if due {
        tracing::debug!("closing a downstream connection {why}");
        ask(state);
        *asked = true;
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

    /// Limits in whole seconds.
    fn limits(idle: Option<u64>, request: Option<u64>, headers: Option<u64>) -> Limits {
        let secs = |s: Option<u64>| s.map(Duration::from_secs);
        Limits { idle: secs(idle), request: secs(request), headers: secs(headers), stream_idle: None }
    }

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
        tokio::spawn(watchdog(state.clone(), rx, limits(Some(60), Some(15), None)));
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

    /// How long after the start a connection with a request in flight (an exchange whose
    /// response is streaming, none waiting for headers) is dropped by a 300 s stream idle
    /// timeout, when bytes move every `every` seconds until `moving_for`, then stop. The
    /// connection first sits idle for 100 s, and idle and request timeouts are set as well.
    async fn stalled_exchange_dropped_after(every: u64, moving_for: u64) -> Option<Duration> {
        let state = ConnState::new();
        let (_tx, rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let limits = Limits { stream_idle: Some(Duration::from_secs(300)), ..limits(Some(3600), Some(15), Some(10)) };
        tokio::spawn(watchdog(state.clone(), rx, limits));
        let traffic = {
            let state = state.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(100)).await;
                // The request arrives, and its response streams (the head goes out first).
                state.note_received(40);
                let in_flight = state.start_request();
                let mut elapsed = 0;
                while elapsed < moving_for {
                    state.note_sent(1000);
                    tokio::time::sleep(Duration::from_secs(every)).await;
                    elapsed += every;
                }
                std::future::pending::<()>().await;
                drop(in_flight);
            }
        };
        let served = tokio::select! {
            out = tokio::time::timeout(Duration::from_secs(3600), serve(Stuck, state)) => out,
            () = traffic => unreachable!(),
        };
        served.ok().map(|out| {
            assert_eq!(out, None, "dropped");
            start.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_exchange_on_which_nothing_moves_is_dropped_after_the_stream_idle_timeout() {
        let within = |after: Option<Duration>, from: u64, to: u64| {
            let after = after.expect("dropped");
            assert!(after >= Duration::from_secs(from) && after <= Duration::from_secs(to), "{after:?}");
        };
        // Stalled from the start (its only bytes, the request, at 100 s): the watchdog, idling
        // on a quarter idle timeout (900 s) from those bytes, sees the exchange at 1000 s, and
        // drops it a stream idle timeout (300 s) later, to the tick (37.5 s).
        within(stalled_exchange_dropped_after(1, 0).await, 1300, 1338);
        // Moving every 60 s for 30 minutes (the last bytes at 1840 s): kept all that time,
        // then dropped a stream idle timeout after the last bytes.
        within(stalled_exchange_dropped_after(60, 1800).await, 2140, 2178);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_stuck_in_a_request_head_is_dropped_one_tick_later() {
        let state = ConnState::new();
        let (_tx, rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        tokio::spawn(watchdog(state.clone(), rx, limits(Some(60), Some(15), None)));
        let out = tokio::time::timeout(Duration::from_secs(600), serve(Stuck, state)).await.expect("dropped");
        assert_eq!(out, None);
        let after = start.elapsed();
        assert!(after >= Duration::from_secs(75) && after <= Duration::from_secs(90), "{after:?}");
    }

    /// A connection serving one request that waits for `upstream` to answer.
    struct OneRequest(Pin<Box<dyn Future<Output = Result<(), Elapsed>> + Send>>);

    impl Future for OneRequest {
        type Output = Result<(), Elapsed>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.0.as_mut().poll(cx)
        }
    }

    impl GracefulConn for OneRequest {
        fn graceful_shutdown(self: Pin<&mut Self>) {}
    }

    /// Serves one request whose upstream answers after `upstream` (never if `None`), on a
    /// connection that was idle for `idle_first`; returns its outcome and how long it took.
    async fn one_request(idle_first: Duration, upstream: Option<Duration>) -> (Result<(), Elapsed>, Duration) {
        one_request_idle_timeout(Some(Duration::from_secs(3600)), idle_first, upstream).await
    }

    async fn one_request_idle_timeout(
        idle_timeout: Option<Duration>,
        idle_first: Duration,
        upstream: Option<Duration>,
    ) -> (Result<(), Elapsed>, Duration) {
        let state = ConnState::new();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(watchdog(
            state.clone(),
            rx,
            Limits { idle: idle_timeout, request: Some(Duration::from_secs(8)), headers: None, stream_idle: None },
        ));
        tokio::time::sleep(idle_first).await;
        let in_flight = state.start_request();
        let start = Instant::now();
        let request = OneRequest(Box::pin(async move {
            let answer = async {
                match upstream {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            in_flight.headers_deadline(answer).await
        }));
        let out = serve(request, state).await.expect("not aborted");
        (out, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_request_times_out_after_one_to_one_and_an_eighth_timeouts() {
        let (out, after) = one_request(Duration::ZERO, None).await;
        assert!(out.is_err());
        assert!(after >= Duration::from_secs(8) && after <= Duration::from_secs(9), "{after:?}");
        // Also right after a long idle spell, when the watchdog ticks lazily.
        let (out, after) = one_request(Duration::from_secs(1000), None).await;
        assert!(out.is_err());
        assert!(after >= Duration::from_secs(8) && after <= Duration::from_secs(9), "{after:?}");
        // And with an idle timeout shorter than the request timeout (quicker ticks).
        let (out, after) = one_request_idle_timeout(Some(Duration::from_secs(2)), Duration::from_secs(1), None).await;
        assert!(out.is_err());
        assert!(after >= Duration::from_secs(8) && after <= Duration::from_secs(9), "{after:?}");
        // And with no idle timeout at all (the idle watchdog sleeps until a request starts).
        let (out, after) = one_request_idle_timeout(None, Duration::from_secs(1000), None).await;
        assert!(out.is_err());
        assert!(after >= Duration::from_secs(8) && after <= Duration::from_secs(9), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_request_answered_in_time_is_not_timed_out() {
        let (out, after) = one_request(Duration::from_secs(100), Some(Duration::from_millis(7900))).await;
        assert!(out.is_ok());
        assert_eq!(after, Duration::from_millis(7900));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_a_request_in_flight_stays_open() {
        assert_eq!(closes_after(|s| Some(s.start_request())).await, None);
    }

    /// How long after `bytes_at` (when the client's first bytes of a head arrive, after
    /// `requests` complete requests and an idle spell) a connection with a 10 s head timeout
    /// and `idle` is dropped; `None` if it is still open an hour later. `trickle` more bytes
    /// arrive every second meanwhile, as from a slow-header client.
    async fn head_dropped_after(idle: Option<u64>, requests: usize, bytes_at: u64, trickle: bool) -> Option<Duration> {
        let state = ConnState::new();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(watchdog(state.clone(), rx, limits(idle, Some(15), Some(10))));
        for _ in 0..requests {
            // A head arrives, its request runs and its response ends; the keep-alive
            // connection then waits, idle, for the next one.
            state.note_received(80);
            tokio::time::sleep(Duration::from_millis(3)).await;
            drop(state.start_request());
        }
        let serving = tokio::spawn(serve(Stuck, state.clone()));
        tokio::time::sleep(Duration::from_secs(bytes_at)).await;
        let start = Instant::now();
        state.note_received(5);
        let trickler = trickle.then(|| {
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    state.note_received(1);
                }
            })
        });
        let out = tokio::time::timeout(Duration::from_secs(3600), serving).await;
        if let Some(t) = trickler {
            t.abort();
        }
        out.ok().map(|served| {
            assert_eq!(served.unwrap(), None, "dropped, not closed gracefully");
            start.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_head_that_takes_too_long_is_dropped_even_without_an_idle_timeout() {
        let within = |after: Option<Duration>, hi: u64| {
            let after = after.expect("dropped");
            assert!(after >= Duration::from_secs(10) && after <= Duration::from_millis(hi), "{after:?}");
        };
        // No idle timeout: bytes before the watchdog's first tick, and bytes that wake it from
        // its sleep after requests.
        within(head_dropped_after(None, 0, 0, false).await, 15_000);
        within(head_dropped_after(None, 3, 1000, false).await, 15_000);
        // A head trickling in byte by byte is timed from its first byte.
        within(head_dropped_after(None, 3, 1000, true).await, 15_000);
        // With an idle timeout too, while the watchdog ticks lazily or quickly.
        within(head_dropped_after(Some(3600), 3, 1000, true).await, 15_000);
        within(head_dropped_after(Some(20), 1, 2, false).await, 15_000);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_not_a_slow_head() {
        // Complete requests, then nothing: the head timeout does not close it, with no idle
        // timeout it stays open.
        let state = ConnState::new();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(watchdog(state.clone(), rx, limits(None, Some(15), Some(10))));
        for _ in 0..3 {
            state.note_received(80);
            let in_flight = state.start_request();
            // The response takes longer than the head timeout: a request, not a head.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(in_flight);
            tokio::time::sleep(Duration::from_secs(100)).await;
        }
        let served = tokio::time::timeout(Duration::from_secs(3600), serve(Probe { shut: false }, state)).await;
        assert!(served.is_err(), "still open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_still_arriving_after_the_response_is_not_a_head() {
        // The upstream answered before reading the upload: the response ends, the body keeps
        // coming for longer than the head timeout, then ends. Not a head, before or after.
        let state = ConnState::new();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(watchdog(state.clone(), rx, limits(None, Some(15), Some(10))));
        state.note_received(100);
        let in_flight = state.start_request();
        let body = state.body_in_flight(false);
        assert!(state.body_in_flight(true).is_none(), "an ended body is not tracked");
        drop(in_flight);
        let uploading = async {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                state.note_received(16 << 10);
            }
            drop(body);
            tokio::time::sleep(Duration::from_secs(3600)).await;
        };
        tokio::select! {
            () = uploading => {}
            _ = serve(Probe { shut: false }, state.clone()) => panic!("closed"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn drain_closes_every_connection_and_waits_for_them() {
        let (tx, rx) = watch::channel(false);
        let mut served = Vec::new();
        for _ in 0..3 {
            let state = ConnState::new();
            tokio::spawn(watchdog(state.clone(), rx.clone(), limits(None, None, Some(10))));
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
