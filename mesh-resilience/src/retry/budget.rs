//! Retry budgets: retries capped as a share of traffic, shared by every clone of a layer.
//!
//! * [`TokenBudget`] is Linkerd's (and Finagle's) model, `retryBudget {retryRatio,
//!   minRetriesPerSecond, ttl}`: every request deposits `retryRatio` of a token, every retry
//!   withdraws one, deposits expire after `ttl`, and a reserve of `minRetriesPerSecond × ttl`
//!   retries is always there. Over any window of `ttl`, retries stay within
//!   `retryRatio × requests + minRetriesPerSecond × ttl`. Unlike tower's `TpsBudget` it
//!   counts in thousandths of a token exactly (a ratio of 1/7 is not 1/6) and refuses bad
//!   config instead of panicking.
//! * [`ConcurrencyBudget`] is Envoy's (Istio's DestinationRule `retryBudget`): retries in flight
//!   may be at most `budget_percent` of the requests in flight, or `min_retry_concurrency`,
//!   whichever is more.
//!
//! Time comes from `tokio::time`, so tests run on paused time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::InvalidRetry;

/// Something that admits or refuses retries. Clones of a layer share one.
pub trait RetryBudget: Send + Sync + std::fmt::Debug {
    /// An original request starts.
    fn deposit(&self) -> RequestGuard;
    /// A retry asks to go; `None` refuses it.
    fn withdraw(&self) -> Option<RetryGuard>;
    /// Retries refused so far (Envoy's `upstream_rq_retry_overflow`).
    fn refused(&self) -> u64;
}

/// Held while an original request is in flight (the concurrency budget counts them).
#[derive(Debug, Default)]
pub struct RequestGuard(Option<Arc<AtomicUsize>>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Held while a retry is in flight (the concurrency budget counts them).
#[derive(Debug, Default)]
pub struct RetryGuard(Option<Arc<AtomicUsize>>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

// === TokenBudget ===

/// Thousandths of a token.
const UNIT: u64 = 1000;
/// The window is kept in this many slices; a deposit expires with its slice.
const SLICES: usize = 10;

/// The Linkerd / Finagle retry budget. See the module docs.
#[derive(Debug)]
pub struct TokenBudget {
    ratio_milli: u64,
    reserve: u64,
    slice: Duration,
    start: Instant,
    window: Mutex<Window>,
    refused: AtomicU64,
}

#[derive(Debug)]
struct Window {
    /// The slice number the ring's newest entry belongs to.
    newest: u64,
    /// Per slice: (deposits in thousandths, retries in thousandths).
    ring: [(u64, u64); SLICES],
}

impl TokenBudget {
    /// `retry_ratio` retries per request (0 to 1000), `min_per_second` retries a second as a
    /// reserve, deposits kept for `ttl` (1 s to 60 s, as Linkerd allows).
    pub fn new(retry_ratio: f64, min_per_second: u32, ttl: Duration) -> Result<Self, InvalidRetry> {
        if !(0.0..=1000.0).contains(&retry_ratio) || retry_ratio.is_nan() {
            return Err(InvalidRetry::new("retryRatio", "must be a number from 0 to 1000"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(InvalidRetry::new("ttl", "must be from 1s to 60s"));
        }
        let reserve = u64::from(min_per_second) * UNIT * ttl.as_millis() as u64 / 1000;
        Ok(Self {
            ratio_milli: (retry_ratio * UNIT as f64).round() as u64,
            reserve,
            slice: ttl / SLICES as u32,
            start: Instant::now(),
            window: Mutex::new(Window { newest: 0, ring: [(0, 0); SLICES] }),
            refused: AtomicU64::new(0),
        })
    }

    /// Linkerd's default: `retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s`.
    pub fn linkerd_default() -> Self {
        Self::new(0.2, 10, Duration::from_secs(10)).expect("valid")
    }

    fn with_window<T>(&self, f: impl FnOnce(&mut Window) -> T) -> T {
        let now = (Instant::now() - self.start).as_nanos() as u64 / self.slice.as_nanos().max(1) as u64;
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        // Expire the slices that left the window.
        let gone = now.saturating_sub(w.newest).min(SLICES as u64);
        for k in 1..=gone {
            let i = ((w.newest + k) % SLICES as u64) as usize;
            w.ring[i] = (0, 0);
        }
        w.newest = w.newest.max(now);
        f(&mut w)
    }

    /// Retries the budget would admit now.
    pub fn available(&self) -> u64 {
        self.with_window(|w| self.balance(w) / UNIT)
    }

    fn balance(&self, w: &Window) -> u64 {
        let (deposits, retries) = w.ring.iter().fold((0, 0), |(d, r), (sd, sr)| (d + sd, r + sr));
        (self.reserve + deposits).saturating_sub(retries)
    }
}

impl RetryBudget for TokenBudget {
    fn deposit(&self) -> RequestGuard {
        self.with_window(|w| {
            let i = (w.newest % SLICES as u64) as usize;
            w.ring[i].0 += self.ratio_milli;
        });
        RequestGuard(None)
    }

    fn withdraw(&self) -> Option<RetryGuard> {
        let admitted = self.with_window(|w| {
            if self.balance(w) < UNIT {
                return None;
            }
            let i = (w.newest % SLICES as u64) as usize;
            w.ring[i].1 += UNIT;
            Some(RetryGuard(None))
        });
        if admitted.is_none() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

// === ConcurrencyBudget ===

/// Envoy's retry budget (Istio DestinationRule `retryBudget`). See the module docs.
#[derive(Debug)]
pub struct ConcurrencyBudget {
    percent_milli: u64,
    min_concurrency: usize,
    requests: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
    refused: AtomicU64,
}

impl ConcurrencyBudget {
    /// Retries in flight at most `budget_percent` % of requests in flight (Envoy's default
    /// 20), or `min_retry_concurrency` (default 3), whichever is more.
    pub fn new(budget_percent: f64, min_retry_concurrency: usize) -> Result<Self, InvalidRetry> {
        if !(0.0..=100.0).contains(&budget_percent) || budget_percent.is_nan() {
            return Err(InvalidRetry::new("budgetPercent", "must be from 0 to 100"));
        }
        Ok(Self {
            percent_milli: (budget_percent * 1000.0).round() as u64,
            min_concurrency: min_retry_concurrency,
            requests: Arc::default(),
            retries: Arc::default(),
            refused: AtomicU64::new(0),
        })
    }

    /// Requests and retries in flight.
    pub fn in_flight(&self) -> (usize, usize) {
        (self.requests.load(Ordering::Acquire), self.retries.load(Ordering::Acquire))
    }
}

impl RetryBudget for ConcurrencyBudget {
    fn deposit(&self) -> RequestGuard {
        self.requests.fetch_add(1, Ordering::AcqRel);
        RequestGuard(Some(self.requests.clone()))
    }

    fn withdraw(&self) -> Option<RetryGuard> {
        let requests = self.requests.load(Ordering::Acquire) as u64;
        let allowed = ((requests * self.percent_milli) / 100_000).max(self.min_concurrency as u64) as usize;
        let admitted =
            self.retries.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| (r < allowed).then_some(r + 1)).is_ok();
        if !admitted {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(RetryGuard(Some(self.retries.clone())))
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}
