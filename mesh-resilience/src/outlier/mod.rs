//! Outlier detection with Envoy's algorithm (SEMANTICS.md 2.4), as Istio's DestinationRule
//! `outlierDetection` configures it.
//!
//! An [`OutlierDetector`] watches the endpoints of one cluster. Each response (or failure)
//! of an endpoint is recorded on that endpoint's [`HostMonitor`] with atomics only: it counts
//! consecutive 5xx and consecutive gateway errors (502, 503, 504), and, when local-origin
//! errors are split out, consecutive connect failures and timeouts. A counter reaching its
//! threshold (the test is equality, so 0 never fires) ejects the endpoint, when
//!
//! * the ejection keeps `100 × (ejected + 1) / endpoints` within `maxEjectionPercent` (as
//!   current Envoy computes it: a cluster of fewer than ten endpoints can eject nothing at
//!   Istio's default of 10 %, unless [`OutlierConfig::always_eject_one`] is set);
//! * and the endpoint is not ejected already.
//!
//! An ejection lasts `baseEjectionTime × k` for the k-th ejection in a row, capped at
//! `maxEjectionTime` (300 s, or the base if longer); endpoints come back only on the
//! `interval` tick, so the time out is rounded up to the next tick. After an endpoint comes
//! back, each later tick it stays in decrements `k` by one (the back-off decays).
//!
//! Every tick also closes the interval's success-rate buckets and, when configured (Istio
//! cannot, a library user can), ejects by success rate (below `mean − factor × stdev` of the
//! endpoints with enough volume) and by failure percentage.
//!
//! The detector is the balancer's health view (mesh-routing implements its `HealthView` for
//! [`OutlierDetector`]): an ejected endpoint gets no traffic, unless fewer than
//! `minHealthPercent` of the endpoints are in, when the balancer spreads over all of them
//! (Envoy's panic mode; 0, Istio's default, never panics, and with every endpoint ejected a
//! request gets 503 `UH`).
//!
//! Ejections and returns are published as [`OutlierEvent`]s ([`OutlierDetector::subscribe`]).
//! The state is shared by clones; the tick runs on a task of its own, started with the first
//! recording, that never holds a lock a request needs.
//!
//! ```
//! use http::StatusCode;
//! use mesh_resilience::outlier::{OutlierConfig, OutlierDetector};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let mut config = OutlierConfig::default();
//! config.consecutive_5xx = 3;
//! config.max_ejection_percent = 50;
//! let detector = OutlierDetector::new(config).unwrap();
//! detector.set_hosts(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"].map(Into::into));
//! let bad = detector.monitor("10.0.0.2:80").unwrap();
//! for _ in 0..3 {
//!     bad.record_status(StatusCode::SERVICE_UNAVAILABLE);
//! }
//! assert!(!detector.is_available("10.0.0.2:80"));
//! assert!(detector.is_available("10.0.0.1:80"));
//! # }
//! ```

mod monitor;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;
use mesh_core::classify::{Failure, GrpcCode, Outcome};
use tokio::time::Instant;

pub use monitor::{MonitorBody, MonitorLayer, MonitorService};

/// A configuration the detector refuses: the field and why.
pub type InvalidOutlier = crate::InvalidConfig;

// === config ===

/// What the detector ejects on and for how long: Envoy's `outlier_detection` as Istio sets it
/// (the defaults are Envoy's with Istio's choices: success-rate and failure-percentage
/// ejection off). See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct OutlierConfig {
    /// Consecutive 5xx (and, unless split, local-origin failures) that eject; 0 never does.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and, unless split, local-origin failures) that eject; 0
    /// (the default) never does.
    pub consecutive_gateway: u32,
    /// Counts connect failures, resets and timeouts apart from responses (Envoy's
    /// `split_external_local_origin_errors`).
    pub split_local_origin: bool,
    /// With `split_local_origin`, consecutive local-origin failures that eject.
    pub consecutive_local_origin: u32,
    /// Statuses that count as errors instead of 5xx (Istio's
    /// `outlierDetectionHttpErrorCodes`); empty: 500–599.
    pub error_codes: Vec<u16>,
    /// How often ejections end and rates are analysed.
    pub interval: Duration,
    /// The first ejection's length; the k-th in a row lasts k times as long.
    pub base_ejection_time: Duration,
    /// The longest ejection; `None`: 300 s, or the base when that is longer.
    pub max_ejection_time: Option<Duration>,
    /// The most endpoints ejected at once, as a percentage of them.
    pub max_ejection_percent: u32,
    /// Allow one ejection whatever `max_ejection_percent` says (Envoy's
    /// `always_eject_one_host`), so that small clusters can eject.
    pub always_eject_one: bool,
    /// Below this percentage of endpoints in, the balancer ignores ejections (panic mode); 0
    /// never panics.
    pub min_health_percent: u32,
    /// Success-rate ejection (off by default; Istio cannot turn it on).
    pub success_rate: Option<SuccessRate>,
    /// Failure-percentage ejection (off by default; Istio cannot turn it on).
    pub failure_percentage: Option<FailurePercentage>,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            split_local_origin: false,
            consecutive_local_origin: 5,
            error_codes: Vec::new(),
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: None,
            max_ejection_percent: 10,
            always_eject_one: false,
            min_health_percent: 0,
            success_rate: None,
            failure_percentage: None,
        }
    }
}

/// Success-rate ejection: endpoints whose success rate over the last interval is below
/// `mean − stdev_factor / 1000 × stdev` of the endpoints with enough requests.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SuccessRate {
    /// Endpoints with enough requests needed for the analysis (Envoy: 5).
    pub minimum_hosts: usize,
    /// Requests in the interval an endpoint needs to take part (Envoy: 100).
    pub request_volume: u64,
    /// The stdev factor, in thousandths (Envoy: 1900).
    pub stdev_factor: u32,
}

impl Default for SuccessRate {
    fn default() -> Self {
        Self { minimum_hosts: 5, request_volume: 100, stdev_factor: 1900 }
    }
}

/// Failure-percentage ejection: endpoints whose failures over the last interval are at
/// least `threshold` percent.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FailurePercentage {
    /// The failure percentage that ejects (Envoy: 85).
    pub threshold: u32,
    /// Endpoints with enough requests needed for the analysis (Envoy: 5).
    pub minimum_hosts: usize,
    /// Requests in the interval an endpoint needs to take part (Envoy: 50).
    pub request_volume: u64,
}

impl Default for FailurePercentage {
    fn default() -> Self {
        Self { threshold: 85, minimum_hosts: 5, request_volume: 50 }
    }
}

impl OutlierConfig {
    fn validate(&self) -> Result<(), InvalidOutlier> {
        if self.interval.is_zero() {
            return Err(InvalidOutlier::new("interval", "must be more than 0"));
        }
        if self.base_ejection_time.is_zero() {
            return Err(InvalidOutlier::new("baseEjectionTime", "must be more than 0"));
        }
        if self.max_ejection_time.is_some_and(|max| max < self.base_ejection_time) {
            return Err(InvalidOutlier::new("maxEjectionTime", "must not be below baseEjectionTime"));
        }
        if self.max_ejection_percent > 100 {
            return Err(InvalidOutlier::new("maxEjectionPercent", "must be from 0 to 100"));
        }
        if self.min_health_percent > 100 {
            return Err(InvalidOutlier::new("minHealthPercent", "must be from 0 to 100"));
        }
        if let Some(code) = self.error_codes.iter().find(|c| !(100..=599).contains(*c)) {
            return Err(InvalidOutlier::new("outlierDetectionHttpErrorCodes", format!("{code} is not a status")));
        }
        if self.failure_percentage.as_ref().is_some_and(|f| f.threshold > 100) {
            return Err(InvalidOutlier::new("failurePercentage.threshold", "must be from 0 to 100"));
        }
        Ok(())
    }

    fn max_ejection(&self) -> Duration {
        self.max_ejection_time.unwrap_or_else(|| self.base_ejection_time.max(Duration::from_secs(300)))
    }
}

// === events ===

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EjectionReason {
    /// Consecutive 5xx.
    Consecutive5xx,
    /// Consecutive gateway errors (502, 503, 504).
    ConsecutiveGateway,
    /// Consecutive local-origin failures (connect failures, resets, timeouts).
    ConsecutiveLocalOrigin,
    /// A success rate far below the others'.
    SuccessRate,
    /// A failure percentage at or above the threshold.
    FailurePercentage,
}

/// An ejection or a return, for metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutlierEvent {
    /// An endpoint was ejected for `duration` (rounded up to the next tick).
    Ejected {
        /// The endpoint's address.
        address: Arc<str>,
        /// Why.
        reason: EjectionReason,
        /// How many times it has been ejected.
        times: u32,
        /// For how long.
        duration: Duration,
    },
    /// An ejection was due but `maxEjectionPercent` did not allow it (Envoy's
    /// `ejections_overflow`).
    Overflow {
        /// The endpoint's address.
        address: Arc<str>,
        /// Why it would have been ejected.
        reason: EjectionReason,
    },
    /// An endpoint's ejection ended.
    Returned {
        /// The endpoint's address.
        address: Arc<str>,
    },
}

/// One endpoint's state, for admin pages.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HostStatus {
    /// The endpoint's address.
    pub address: Arc<str>,
    /// Whether it is ejected now.
    pub ejected: bool,
    /// How many times it has been ejected.
    pub times_ejected: u32,
    /// Its success rate over the last complete interval (`None` without requests).
    pub success_rate: Option<f64>,
}

// === detector ===

/// Outlier detection over one cluster's endpoints. See the [module docs](self).
#[derive(Clone)]
pub struct OutlierDetector {
    inner: Arc<Inner>,
}

struct Inner {
    config: OutlierConfig,
    error_codes: Option<Box<[u64; 10]>>,
    hosts: ArcSwap<HashMap<Arc<str>, Arc<Host>>>,
    /// Ejected endpoints now.
    active: AtomicUsize,
    /// Serializes ejections, returns and host-set changes (never taken by a request that
    /// ejects nothing).
    ejecting: Mutex<()>,
    started: AtomicBool,
    events: tokio::sync::broadcast::Sender<OutlierEvent>,
}

/// One endpoint's counters and ejection state.
struct Host {
    address: Arc<str>,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    ejected: AtomicBool,
    /// This interval's requests and successes (responses), packed: requests in the high 32
    /// bits.
    bucket: AtomicU64,
    state: Mutex<HostState>,
}

#[derive(Default)]
struct HostState {
    backoff: u32,
    times_ejected: u32,
    last_ejection: Option<Instant>,
    last_return: Option<Instant>,
    /// The last complete interval's (successes, requests).
    previous: (u64, u64),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl fmt::Debug for OutlierDetector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutlierDetector")
            .field("hosts", &self.inner.hosts.load().len())
            .field("ejected", &self.inner.active.load(Ordering::Relaxed))
            .finish()
    }
}

impl OutlierDetector {
    /// A detector with `config`, watching no endpoint yet ([`set_hosts`](Self::set_hosts)).
    pub fn new(config: OutlierConfig) -> Result<Self, InvalidOutlier> {
        config.validate()?;
        let error_codes = (!config.error_codes.is_empty()).then(|| {
            let mut bits = [0u64; 10];
            for &code in &config.error_codes {
                let i = usize::from(code - 100);
                bits[i / 64] |= 1 << (i % 64);
            }
            Box::new(bits)
        });
        let (events, _) = tokio::sync::broadcast::channel(256);
        let inner = Inner {
            config,
            error_codes,
            hosts: ArcSwap::from_pointee(HashMap::new()),
            active: AtomicUsize::new(0),
            ejecting: Mutex::new(()),
            started: AtomicBool::new(false),
            events,
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The configuration.
    pub fn config(&self) -> &OutlierConfig {
        &self.inner.config
    }

    /// Watches `addresses`: endpoints that stay keep their state, new ones start fresh,
    /// departed ones are forgotten (an ejected one stops counting as ejected).
    pub fn set_hosts(&self, addresses: impl IntoIterator<Item = Arc<str>>) {
        let _ejecting = lock(&self.inner.ejecting);
        let current = self.inner.hosts.load_full();
        let next: HashMap<Arc<str>, Arc<Host>> = addresses
            .into_iter()
            .map(|a| {
                let host = current.get(&a).cloned().unwrap_or_else(|| Arc::new(Host::new(a.clone())));
                (a, host)
            })
            .collect();
        let active = next.values().filter(|h| h.ejected.load(Ordering::Acquire)).count();
        self.inner.active.store(active, Ordering::Release);
        self.inner.hosts.store(Arc::new(next));
    }

    /// The recorder of the endpoint at `address`, `None` when it is not watched. Keep it
    /// with the endpoint's service: recording through it takes no lookup.
    pub fn monitor(&self, address: &str) -> Option<HostMonitor> {
        let host = self.inner.hosts.load().get(address)?.clone();
        Some(HostMonitor { host, detector: self.clone() })
    }

    /// Whether the endpoint at `address` may take traffic: it is not ejected, or the
    /// cluster is in panic mode. Costs two atomic loads while nothing is ejected.
    pub fn is_available(&self, address: &str) -> bool {
        let active = self.inner.active.load(Ordering::Relaxed);
        if active == 0 || self.in_panic(active) {
            return true;
        }
        self.inner.hosts.load().get(address).is_none_or(|h| !h.ejected.load(Ordering::Relaxed))
    }

    /// Whether fewer than `minHealthPercent` of the endpoints are in (the balancer then
    /// ignores ejections).
    pub fn in_panic(&self, active: usize) -> bool {
        let threshold = self.inner.config.min_health_percent;
        if threshold == 0 {
            return false;
        }
        let total = self.inner.hosts.load().len();
        total > 0 && 100 * (total - active.min(total)) < threshold as usize * total
    }

    /// Ejected endpoints now.
    pub fn ejected(&self) -> usize {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// Every watched endpoint's state.
    pub fn status(&self) -> Vec<HostStatus> {
        let mut hosts: Vec<HostStatus> = self
            .inner
            .hosts
            .load()
            .values()
            .map(|h| {
                let state = lock(&h.state);
                let (success, total) = state.previous;
                HostStatus {
                    address: h.address.clone(),
                    ejected: h.ejected.load(Ordering::Relaxed),
                    times_ejected: state.times_ejected,
                    success_rate: (total > 0).then(|| success as f64 / total as f64),
                }
            })
            .collect();
        hosts.sort_by(|a, b| a.address.cmp(&b.address));
        hosts
    }

    /// Ejections and returns from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<OutlierEvent> {
        self.inner.events.subscribe()
    }

    /// Starts the interval tick on the current tokio runtime, if it is not running yet
    /// (recording starts it too). It stops when the last clone of the detector is dropped.
    pub fn start(&self) {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.started.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.config.interval;
        runtime.spawn(tick_task(weak, interval));
    }

    /// One interval sweep at `now`: ends ejections that are over, closes the success-rate
    /// buckets, ejects by rate, decays back-offs. The tick task calls it every `interval`.
    pub fn tick(&self, now: Instant) {
        let inner = &self.inner;
        let config = &inner.config;
        // The host set is read under the lock that `set_hosts` takes, so a host it removed is
        // not returned (and counted out) a second time.
        let _ejecting = lock(&inner.ejecting);
        let hosts = inner.hosts.load_full();
        let mut rates = Vec::new();
        for host in hosts.values() {
            let mut state = lock(&host.state);
            if host.ejected.load(Ordering::Acquire) {
                let length = config.base_ejection_time.saturating_mul(state.backoff).min(config.max_ejection());
                if state.last_ejection.is_some_and(|at| now.duration_since(at) >= length) {
                    host.ejected.store(false, Ordering::Release);
                    inner.active.fetch_sub(1, Ordering::AcqRel);
                    host.reset_counters();
                    state.last_return = Some(now);
                    let _ = inner.events.send(OutlierEvent::Returned { address: host.address.clone() });
                }
            }
            let bucket = host.bucket.swap(0, Ordering::AcqRel);
            state.previous = (bucket & 0xffff_ffff, bucket >> 32);
            if !host.ejected.load(Ordering::Acquire) && state.previous.1 > 0 {
                rates.push((host.clone(), state.previous));
            }
        }
        self.analyse_rates(&rates, hosts.len(), now);
        for host in hosts.values() {
            let mut state = lock(&host.state);
            let decays = !host.ejected.load(Ordering::Acquire)
                && state.backoff > 0
                && state.last_return.is_some_and(|at| now.duration_since(at) >= config.interval);
            if decays {
                state.backoff -= 1;
            }
        }
    }

    /// Success-rate and failure-percentage ejection over the last interval's buckets.
    fn analyse_rates(&self, rates: &[(Arc<Host>, (u64, u64))], total: usize, now: Instant) {
        let config = &self.inner.config;
        if let Some(sr) = &config.success_rate {
            let set: Vec<_> = rates.iter().filter(|(_, (_, n))| *n >= sr.request_volume).collect();
            if set.len() >= sr.minimum_hosts && total >= sr.minimum_hosts {
                let rate = |(s, n): (u64, u64)| 100.0 * s as f64 / n as f64;
                let mean = set.iter().map(|(_, b)| rate(*b)).sum::<f64>() / set.len() as f64;
                let variance = set.iter().map(|(_, b)| (rate(*b) - mean).powi(2)).sum::<f64>() / set.len() as f64;
                let threshold = mean - f64::from(sr.stdev_factor) / 1000.0 * variance.sqrt();
                for (host, bucket) in &set {
                    if rate(*bucket) < threshold {
                        self.eject_locked(host, EjectionReason::SuccessRate, now);
                    }
                }
            }
        }
        if let Some(fp) = &config.failure_percentage {
            let set: Vec<_> = rates.iter().filter(|(_, (_, n))| *n >= fp.request_volume).collect();
            if set.len() >= fp.minimum_hosts && total >= fp.minimum_hosts {
                for (host, (s, n)) in set {
                    if 100 * (n - s) >= u64::from(fp.threshold) * n {
                        self.eject_locked(host, EjectionReason::FailurePercentage, now);
                    }
                }
            }
        }
    }

    /// Ejects `host` if the limits allow (the caller holds `ejecting`).
    fn eject_locked(&self, host: &Arc<Host>, reason: EjectionReason, now: Instant) {
        let inner = &self.inner;
        let config = &inner.config;
        if host.ejected.load(Ordering::Acquire) {
            return;
        }
        // A host that left the set meanwhile is not ejected.
        let hosts = inner.hosts.load();
        if !hosts.get(&host.address).is_some_and(|h| Arc::ptr_eq(h, host)) {
            return;
        }
        let total = hosts.len();
        let active = inner.active.load(Ordering::Acquire);
        let allowed = 100 * (active + 1) <= config.max_ejection_percent.min(100) as usize * total
            || config.always_eject_one && active == 0;
        if !allowed {
            let _ = inner.events.send(OutlierEvent::Overflow { address: host.address.clone(), reason });
            return;
        }
        let mut state = lock(&host.state);
        host.ejected.store(true, Ordering::Release);
        inner.active.fetch_add(1, Ordering::AcqRel);
        state.times_ejected += 1;
        state.last_ejection = Some(now);
        let base = config.base_ejection_time;
        if base.saturating_mul(state.backoff) < config.max_ejection() + base {
            state.backoff += 1;
        }
        let duration = base.saturating_mul(state.backoff).min(config.max_ejection());
        let _ = inner.events.send(OutlierEvent::Ejected {
            address: host.address.clone(),
            reason,
            times: state.times_ejected,
            duration,
        });
        tracing::info!(endpoint = %host.address, ?reason, times = state.times_ejected, ?duration, "outlier ejected");
    }

    fn eject(&self, host: &Arc<Host>, reason: EjectionReason) {
        let _ejecting = lock(&self.inner.ejecting);
        if host.ejected.load(Ordering::Acquire) {
            return;
        }
        self.eject_locked(host, reason, Instant::now());
        // The counter that fired starts again, whether or not the ejection was allowed (as
        // Envoy resets it).
        match reason {
            EjectionReason::Consecutive5xx => host.consecutive_5xx.store(0, Ordering::Relaxed),
            EjectionReason::ConsecutiveGateway => host.consecutive_gateway.store(0, Ordering::Relaxed),
            EjectionReason::ConsecutiveLocalOrigin => host.consecutive_local.store(0, Ordering::Relaxed),
            _ => {}
        }
    }

    fn is_error(&self, status: StatusCode) -> bool {
        match &self.inner.error_codes {
            None => status.is_server_error(),
            Some(bits) => {
                let i = usize::from(status.as_u16().saturating_sub(100));
                status.as_u16() >= 100 && i < 640 && bits[i / 64] & (1 << (i % 64)) != 0
            }
        }
    }
}

async fn tick_task(detector: Weak<Inner>, interval: Duration) {
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = ticks.tick().await;
        let Some(inner) = detector.upgrade() else { return };
        OutlierDetector { inner }.tick(now);
    }
}

impl Host {
    fn new(address: Arc<str>) -> Self {
        Self {
            address,
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            bucket: AtomicU64::new(0),
            state: Mutex::new(HostState::default()),
        }
    }

    fn reset_counters(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }
}

/// Zeroes `counter` unless it is zero already (no write to a shared line on the common path).
fn clear(counter: &AtomicU32) {
    if counter.load(Ordering::Relaxed) != 0 {
        counter.store(0, Ordering::Relaxed);
    }
}

// === HostMonitor ===

/// Records one endpoint's outcomes for its [`OutlierDetector`]. Cheap to clone.
#[derive(Clone)]
pub struct HostMonitor {
    host: Arc<Host>,
    detector: OutlierDetector,
}

impl fmt::Debug for HostMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostMonitor").field("address", &self.host.address).finish()
    }
}

impl HostMonitor {
    /// The endpoint's address.
    pub fn address(&self) -> &Arc<str> {
        &self.host.address
    }

    /// Whether the endpoint is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.host.ejected.load(Ordering::Relaxed)
    }

    /// Records a response with `status` (for a gRPC call, the HTTP status its `grpc-status`
    /// maps to). Envoy's `putHttpResponseCode`.
    pub fn record_status(&self, status: StatusCode) {
        let detector = &self.detector;
        let config = &detector.inner.config;
        if !detector.inner.started.load(Ordering::Relaxed) {
            detector.start();
        }
        let host = &self.host;
        let success = !detector.is_error(status);
        host.bucket.fetch_add((1 << 32) | u64::from(success), Ordering::Relaxed);
        if config.split_local_origin {
            // The connection worked: the local-origin run is over.
            clear(&host.consecutive_local);
        }
        if success {
            clear(&host.consecutive_5xx);
            clear(&host.consecutive_gateway);
            return;
        }
        if matches!(status.as_u16(), 502..=504) {
            let n = host.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
            if n == config.consecutive_gateway {
                detector.eject(host, EjectionReason::ConsecutiveGateway);
            }
        } else {
            clear(&host.consecutive_gateway);
        }
        let n = host.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if n == config.consecutive_5xx {
            detector.eject(host, EjectionReason::Consecutive5xx);
        }
    }

    /// Records a failure with no response: with local-origin errors split out, it counts
    /// toward `consecutive_local_origin`; otherwise a timeout counts as 504 and any other
    /// upstream failure as 503 (Envoy's mapping). A failure that is not the upstream's
    /// ([`Failure::Other`]: no healthy host, an overflow, a bad request) is not recorded.
    pub fn record_failure(&self, failure: Failure) {
        let detector = &self.detector;
        let config = &detector.inner.config;
        if failure == Failure::Other {
            return;
        }
        if !config.split_local_origin {
            let status =
                if failure == Failure::Timeout { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::SERVICE_UNAVAILABLE };
            return self.record_status(status);
        }
        if !detector.inner.started.load(Ordering::Relaxed) {
            detector.start();
        }
        let n = self.host.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
        if n == config.consecutive_local_origin {
            detector.eject(&self.host, EjectionReason::ConsecutiveLocalOrigin);
        }
    }

    /// Records a response head: its status, or for a gRPC call (`grpc`) the HTTP status its
    /// head `grpc-status` maps to. Returns true when a gRPC call's status is still to come,
    /// in the trailers: record it then with [`record_trailers`](Self::record_trailers).
    pub fn record_head(&self, status: StatusCode, headers: &http::HeaderMap, grpc: bool) -> bool {
        match (grpc, headers.get("grpc-status").and_then(GrpcCode::from_header)) {
            (true, Some(code)) => self.record_status(code.to_http_status()),
            (true, None) if status == StatusCode::OK => return true,
            _ => self.record_status(status),
        }
        false
    }

    /// Records the end of a gRPC call whose status comes in the trailers: their
    /// `grpc-status`, or 503 for a call the upstream ended without one (`None`: no trailers,
    /// or a broken body). A body the client dropped should record nothing.
    pub fn record_trailers(&self, trailers: Option<&http::HeaderMap>) {
        let status = trailers
            .and_then(|t| t.get("grpc-status"))
            .and_then(GrpcCode::from_header)
            .map_or(StatusCode::SERVICE_UNAVAILABLE, GrpcCode::to_http_status);
        self.record_status(status);
    }

    /// Records an outcome classified by mesh-core: a response's status (for a gRPC request,
    /// its head `grpc-status` mapped to HTTP when there is one), or a failure.
    pub fn record(&self, outcome: &Outcome, grpc_request: bool) {
        match outcome.failure() {
            Some(failure) => self.record_failure(failure),
            None => {
                if let Some(status) = outcome.outlier_status(grpc_request) {
                    self.record_status(status);
                }
            }
        }
    }
}
