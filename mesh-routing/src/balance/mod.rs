//! Load balancers over an endpoint set that can change while requests flow.
//!
//! A [`Balancer`] holds a policy ([`LbPolicy`], Istio's DestinationRule `loadBalancer`) and
//! the current endpoint set. [`Balancer::pick`] chooses one endpoint for a request; it reads
//! the set with one `arc-swap` load and takes no lock, while [`Balancer::update`] replaces the
//! set (rebuilding a hash ring or Maglev table first, off the request path). Clones share the
//! set, the counters and the tables.
//!
//! # Policies
//!
//! * [`LbPolicy::RoundRobin`] — Istio `ROUND_ROBIN`, Envoy `ROUND_ROBIN`. Endpoints in turn,
//!   from one shared atomic counter. When weights differ, turn `t` goes to the endpoint owning
//!   offset `t · s mod W` of the cumulative weights (`W` their sum, `s` a step coprime with `W`
//!   near `W / φ`): each endpoint gets exactly its weight's share of every `W` turns, spread
//!   evenly over them, much as Envoy's EDF schedule does, at O(log n) per pick without a lock.
//! * [`LbPolicy::LeastRequest`] (the default) — Istio `LEAST_REQUEST` / `LEAST_CONN` and the
//!   unset policy, Envoy `LEAST_REQUEST` with its defaults. Power of two choices: two endpoints
//!   drawn uniformly *with replacement*, the one with fewer active requests wins, a tie goes to
//!   the first draw. A request is active while its [`Picked`] lives. When weights differ,
//!   Envoy runs an EDF schedule over the dynamic weights `w / (active + 1)`; this crate keeps
//!   P2C instead, drawing both candidates with probability proportional to weight and keeping
//!   the one with the lower `active / w`. Idle endpoints then share traffic in proportion to
//!   weight, and under load traffic moves to where `active / w` is lowest — the same balance
//!   point (`active ∝ w`) Envoy's schedule steers to.
//! * [`LbPolicy::Random`] — Istio `RANDOM`, Envoy `RANDOM`: a uniformly random endpoint.
//!   Like Envoy's, it ignores weights.
//! * [`LbPolicy::RingHash`] — Istio `consistentHash` (with `ringHash` or no algorithm), Envoy
//!   `RING_HASH`. Each endpoint is hashed onto a ring (xxHash64 of `"address_i"`) with a
//!   number of points proportional to its weight; a request goes to the first point clockwise
//!   of its hash. Removing an endpoint moves only the keys that were on it.
//! * [`LbPolicy::Maglev`] — Istio `consistentHash.maglev`, Envoy `MAGLEV`. A table of prime
//!   size filled from per-endpoint permutations, slots in proportion to weight; a request goes
//!   to slot `hash mod size`. Lookups are O(1), spread is near perfect, and removing one of
//!   `N` endpoints moves little more than `1/N` of the keys.
//!
//! The hash balancers take the request's hash from a [`HashKey`] (Istio's `httpHeaderName`,
//! `httpCookie`, `useSourceIp`, `httpQueryParameterName`). A request without a hash gets a
//! random one, so it lands on a random endpoint (weighted by table share), as in Envoy.
//!
//! # Health
//!
//! `pick` takes a [`HealthView`] saying which endpoints may take traffic (`()` for all). The
//! rotating and random policies check their candidate and, if it is unavailable, draw again
//! (up to five candidates in all); if every one was unavailable they fall back to a scan of
//! the set: round robin takes the next available endpoint in list order after the last
//! candidate, random and least request draw uniformly (by weight, for weighted least request)
//! among the available endpoints, which costs two passes over the set. The hash balancers walk
//! on from the request's entry — the next ring points clockwise, the next Maglev slots — so a
//! key whose endpoint is available never moves. `pick` returns `None` when the set is empty or
//! no endpoint is available.
//!
//! # As a tower service
//!
//! [`Balance`] sends each request to the endpoint its balancer picks, through a service per
//! endpoint made on first use (a hyper-util client for that address, say): under a
//! [`DispatchLayer`](crate::DispatchLayer), one `Balance` per destination gives a client
//! routing, subsets and load balancing.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//!
//! use mesh_routing::balance::{Balancer, Endpoint, HashKey, LbPolicy};
//! use mesh_routing::random::Random;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let endpoints = vec![Endpoint::new("10.0.0.1:8080"), Endpoint::new("10.0.0.2:8080").with_weight(3)];
//!
//! // Least request (Istio's default); a picked endpoint counts as busy until it is dropped.
//! let balancer = Balancer::new(LbPolicy::default(), endpoints.clone())?.with_random(Arc::new(Random::seeded(7)));
//! let picked = balancer.pick(None, &()).expect("two endpoints");
//! println!("sending to {}", picked.endpoint().address());
//!
//! // Consistent hashing on a header; an endpoint the health view rejects is skipped.
//! let sticky = Balancer::new(LbPolicy::RingHash { minimum_ring_size: 1024 }, endpoints)?;
//! let key = HashKey::Header(http::HeaderName::from_static("x-user"));
//! let request = http::Request::get("/cart").header("x-user", "jason").body(())?;
//! let hash = key.hash(&request, None);
//! let first = sticky.pick(hash, &()).expect("available");
//! let again = sticky.pick(hash, &()).expect("available");
//! assert_eq!(first.endpoint(), again.endpoint());
//!
//! let down = first.endpoint().address().clone();
//! let healthy = move |e: &Endpoint| *e.address() != down;
//! let moved = sticky.pick(hash, &healthy).expect("one endpoint is left");
//! assert_ne!(moved.endpoint(), first.endpoint());
//!
//! // The set changes while requests flow; clones see the new set.
//! sticky.update(vec![Endpoint::new("10.0.0.3:8080")])?;
//! assert_eq!(&**sticky.clone().pick(hash, &()).unwrap().endpoint().address(), "10.0.0.3:8080");
//! # Ok(())
//! # }
//! ```

mod endpoint;
mod hash_key;
mod maglev;
mod ring;
mod service;
#[cfg(test)]
mod tests;
mod weighted;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use mesh_core::TriedEndpoints;

pub use self::endpoint::{Endpoint, HealthView};
pub use self::hash_key::HashKey;
use self::maglev::Maglev;
use self::ring::Ring;
pub use self::service::{Balance, BalanceFuture, MakeEndpoint};
use self::weighted::Weights;
use crate::random::Random;

/// Candidates the rotating and random policies try before scanning the set.
const DRAWS: usize = 5;
/// Ring points or Maglev slots the hash policies walk before checking that any endpoint is
/// available at all (then they walk on to the end).
const WALK: usize = 64;

// === impl LbPolicy ===

/// How a [`Balancer`] chooses endpoints (Istio `loadBalancer`). See the module docs.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum LbPolicy {
    /// Rotation; weighted when endpoint weights differ.
    RoundRobin,
    /// Power of two choices on active requests (Envoy's default `LEAST_REQUEST`).
    LeastRequest,
    /// A uniformly random endpoint.
    Random,
    /// Consistent hashing on a ring of xxHash64 points.
    RingHash {
        /// The least number of points on the ring, `1..=8_388_608`; Envoy's default (and
        /// Istio's) is 1024.
        minimum_ring_size: u64,
    },
    /// Consistent hashing with a Maglev lookup table.
    Maglev {
        /// The number of slots: a prime below 5 000 011; Envoy's default is 65537.
        table_size: u64,
    },
}

impl LbPolicy {
    /// Istio's and Envoy's default `minimum_ring_size`.
    pub const DEFAULT_MINIMUM_RING_SIZE: u64 = 1024;
    /// The largest ring Envoy builds (its `maximum_ring_size` default and limit).
    pub const MAXIMUM_RING_SIZE: u64 = ring::MAXIMUM_RING_SIZE;
    /// Envoy's default Maglev `table_size`.
    pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;
    /// Maglev table sizes must be below this.
    pub const MAGLEV_TABLE_SIZE_LIMIT: u64 = maglev::TABLE_SIZE_LIMIT;

    fn validate(&self) -> Result<(), InvalidBalancer> {
        match *self {
            LbPolicy::RingHash { minimum_ring_size: n } if n == 0 || n > Self::MAXIMUM_RING_SIZE => {
                Err(InvalidBalancer::RingSize(n))
            }
            LbPolicy::Maglev { table_size: n } if n >= Self::MAGLEV_TABLE_SIZE_LIMIT || !maglev::is_prime(n) => {
                Err(InvalidBalancer::MaglevTableSize(n))
            }
            _ => Ok(()),
        }
    }
}

impl Default for LbPolicy {
    /// [`LbPolicy::LeastRequest`], Istio's default.
    fn default() -> Self {
        LbPolicy::LeastRequest
    }
}

/// A configuration [`Balancer::new`] or [`Balancer::update`] rejects.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBalancer {
    /// An endpoint has weight 0.
    #[error("endpoint {address} has weight 0")]
    ZeroWeight {
        /// The endpoint's address.
        address: Arc<str>,
    },
    /// Two endpoints have the same address (active requests are counted per address).
    #[error("endpoint {address} is listed more than once")]
    DuplicateAddress {
        /// The repeated address.
        address: Arc<str>,
    },
    /// `minimum_ring_size` is 0 or above 8 388 608.
    #[error("ring hash minimum_ring_size {0} is not in 1..=8388608")]
    RingSize(u64),
    /// The Maglev `table_size` is not a prime below 5 000 011.
    #[error("maglev table_size {0} is not a prime below 5000011")]
    MaglevTableSize(u64),
    /// More endpoints than a balancer indexes (`u32::MAX - 1`).
    #[error("{0} endpoints are more than a balancer holds")]
    TooManyEndpoints(usize),
}

// === impl Balancer ===

/// A load balancer over an endpoint set that can be replaced while requests flow. See the
/// module docs.
///
/// Clones share everything: the endpoint set, the active-request counters, the round-robin
/// position, the ring or table and the random sequence.
#[derive(Clone, Debug)]
pub struct Balancer {
    shared: Arc<Shared>,
    random: Arc<Random>,
}

#[derive(Debug)]
struct Shared {
    policy: LbPolicy,
    snapshot: ArcSwap<Snapshot>,
    /// The round-robin turn, on its own cache line: every pick of every thread writes it.
    turn: Padded,
    /// Serializes updates so active counters carry over from the set the next one replaces.
    updating: Mutex<()>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicUsize);

/// One endpoint set with everything its policy precomputes.
struct Snapshot {
    endpoints: Arc<[Endpoint]>,
    /// Active requests per endpoint (same order), shared with the next snapshot by address.
    active: Box<[Arc<AtomicUsize>]>,
    /// What a [`Picked`] holds: one reference count per pick, whatever the endpoint carries.
    slots: Box<[Arc<Slot>]>,
    /// Cumulative weights for round robin and least request, when weights differ.
    weights: Option<Weights>,
    table: Table,
}

#[derive(Debug)]
enum Table {
    None,
    Ring(Ring),
    Maglev(Maglev),
}

impl Balancer {
    /// A balancer with `policy` over `endpoints`, drawing from [`Random::from_entropy`].
    ///
    /// Fails on an invalid policy (see [`LbPolicy`]), a zero weight or a repeated address.
    pub fn new(policy: LbPolicy, endpoints: Vec<Endpoint>) -> Result<Self, InvalidBalancer> {
        policy.validate()?;
        let snapshot = Snapshot::new(&policy, endpoints, None)?;
        let shared = Shared {
            policy,
            snapshot: ArcSwap::from_pointee(snapshot),
            turn: Padded::default(),
            updating: Mutex::new(()),
        };
        Ok(Self { shared: Arc::new(shared), random: Arc::new(Random::from_entropy()) })
    }

    /// Draws from `random` instead: seed it ([`Random::seeded`]) for repeatable picks, or share
    /// one generator between balancers. Only this handle and clones made from it afterwards
    /// use it.
    pub fn with_random(mut self, random: Arc<Random>) -> Self {
        self.random = random;
        self
    }

    /// Replaces the endpoint set. The ring or Maglev table is rebuilt here, before the swap;
    /// picks in flight finish on the old set. Endpoints that stay (same address) keep their
    /// active-request counts. On error the current set stays.
    pub fn update(&self, endpoints: Vec<Endpoint>) -> Result<(), InvalidBalancer> {
        let _updating = self.shared.updating.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.shared.snapshot.load_full();
        let next = Snapshot::new(&self.shared.policy, endpoints, Some(&previous))?;
        tracing::debug!(endpoints = next.endpoints.len(), "load balancer endpoint set replaced");
        self.shared.snapshot.store(Arc::new(next));
        Ok(())
    }

    /// The current endpoint set.
    pub fn endpoints(&self) -> Arc<[Endpoint]> {
        self.shared.snapshot.load().endpoints.clone()
    }

    /// The policy.
    pub fn policy(&self) -> &LbPolicy {
        &self.shared.policy
    }

    /// The active requests (live [`Picked`]s) of the endpoint at `address`, `None` when it is
    /// not in the set. Only [`LbPolicy::LeastRequest`] counts; other policies report 0.
    /// Costs a scan of the set.
    pub fn active_requests(&self, address: &str) -> Option<usize> {
        let snapshot = self.shared.snapshot.load();
        let index = snapshot.endpoints.iter().position(|e| &**e.address() == address)?;
        Some(snapshot.active[index].load(Ordering::Relaxed))
    }

    /// Picks an endpoint among those `health` says are available.
    ///
    /// `hash` is the request's consistent-hash key ([`HashKey::hash`]); only
    /// [`LbPolicy::RingHash`] and [`LbPolicy::Maglev`] use it, and they pick at random when it
    /// is `None`. Returns `None` when the set is empty or no endpoint is available. See the
    /// module docs for how unavailable endpoints are skipped.
    pub fn pick(&self, hash: Option<u64>, health: &dyn HealthView) -> Option<Picked> {
        let snapshot = self.shared.snapshot.load();
        let s: &Snapshot = &snapshot;
        if s.endpoints.is_empty() {
            return None;
        }
        let random = &*self.random;
        let index = match &self.shared.policy {
            LbPolicy::RoundRobin => s.round_robin(&self.shared.turn.0, health)?,
            LbPolicy::LeastRequest => s.least_request(random, health)?,
            LbPolicy::Random => s.draw_available(random, health, false)?,
            LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. } => {
                let hash = hash.unwrap_or_else(|| random.next_u64());
                match &s.table {
                    Table::Ring(ring) => s.walk(ring, hash, random, health)?,
                    Table::Maglev(maglev) => s.walk(maglev, hash, random, health)?,
                    Table::None => s.draw_available(random, health, false)?,
                }
            }
        };
        let slot = s.slots[index].clone();
        let counted = matches!(self.shared.policy, LbPolicy::LeastRequest);
        if counted {
            slot.active.fetch_add(1, Ordering::Relaxed);
        }
        Some(Picked { slot, counted })
    }

    /// [`pick`](Self::pick) for one try of a request that retries may repeat: endpoints that
    /// earlier tries went to ([`TriedEndpoints`], which a retry layer puts on the request) are
    /// avoided when another is available, and the endpoint picked is recorded there (Envoy's
    /// `previous_hosts` predicate). A hash policy then walks on from the request's entry, so
    /// a retry goes to the next endpoint clockwise. Without a record this is `pick`.
    pub fn pick_avoiding(
        &self,
        hash: Option<u64>,
        health: &dyn HealthView,
        tried: Option<&TriedEndpoints>,
    ) -> Option<Picked> {
        let Some(tried) = tried else { return self.pick(hash, health) };
        let picked = if tried.is_empty() {
            self.pick(hash, health)
        } else {
            let elsewhere = |e: &Endpoint| health.is_available(e) && !tried.contains(e.address());
            self.pick(hash, &elsewhere).or_else(|| self.pick(hash, health))
        }?;
        tried.record(picked.endpoint().address().clone());
        Some(picked)
    }
}

// === impl Snapshot ===

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("endpoints", &self.endpoints.len())
            .field("weighted", &self.weights.is_some())
            .field("table", &self.table)
            .finish()
    }
}

impl Snapshot {
    fn new(policy: &LbPolicy, endpoints: Vec<Endpoint>, previous: Option<&Snapshot>) -> Result<Self, InvalidBalancer> {
        if endpoints.len() >= u32::MAX as usize {
            return Err(InvalidBalancer::TooManyEndpoints(endpoints.len()));
        }
        let mut seen = HashSet::with_capacity(endpoints.len());
        for e in &endpoints {
            if e.weight() == 0 {
                return Err(InvalidBalancer::ZeroWeight { address: e.address().clone() });
            }
            if !seen.insert(&**e.address()) {
                return Err(InvalidBalancer::DuplicateAddress { address: e.address().clone() });
            }
        }
        let carried: HashMap<&str, &Arc<AtomicUsize>> = previous
            .map(|p| p.endpoints.iter().zip(p.active.iter()).map(|(e, a)| (&**e.address(), a)).collect())
            .unwrap_or_default();
        let active: Box<[Arc<AtomicUsize>]> = endpoints
            .iter()
            .map(|e| carried.get(&**e.address()).map_or_else(Default::default, |&a| a.clone()))
            .collect();
        let slots = endpoints
            .iter()
            .zip(&active)
            .map(|(endpoint, active)| Arc::new(Slot { endpoint: endpoint.clone(), active: active.clone() }))
            .collect();
        let weights = match policy {
            LbPolicy::RoundRobin | LbPolicy::LeastRequest => Weights::new(endpoints.iter().map(Endpoint::weight)),
            _ => None,
        };
        let table = match *policy {
            _ if endpoints.is_empty() => Table::None,
            LbPolicy::RingHash { minimum_ring_size } => Table::Ring(Ring::new(&endpoints, minimum_ring_size)),
            LbPolicy::Maglev { table_size } => Table::Maglev(Maglev::new(&endpoints, table_size)),
            _ => Table::None,
        };
        Ok(Self { endpoints: endpoints.into(), active, slots, weights, table })
    }

    fn available(&self, index: usize, health: &dyn HealthView) -> bool {
        health.is_available(&self.endpoints[index])
    }

    /// Round robin: up to [`DRAWS`] turns, then the next available endpoint in list order.
    fn round_robin(&self, turn: &AtomicUsize, health: &dyn HealthView) -> Option<usize> {
        let n = self.endpoints.len();
        let mut index = 0;
        for _ in 0..DRAWS {
            let t = turn.fetch_add(1, Ordering::Relaxed);
            index = match &self.weights {
                Some(weights) => weights.round_robin(t),
                None => t % n,
            };
            if self.available(index, health) {
                return Some(index);
            }
        }
        (1..n).map(|k| (index + k) % n).find(|&i| self.available(i, health))
    }

    /// One random endpoint, by weight when `weighted` and weights differ.
    fn draw(&self, random: &Random, weighted: bool) -> usize {
        match &self.weights {
            Some(weights) if weighted => weights.draw(random),
            _ => random.below(self.endpoints.len() as u64) as usize,
        }
    }

    /// Up to [`DRAWS`] draws, then a draw among the available endpoints only.
    fn draw_available(&self, random: &Random, health: &dyn HealthView, weighted: bool) -> Option<usize> {
        for _ in 0..DRAWS {
            let index = self.draw(random, weighted);
            if self.available(index, health) {
                return Some(index);
            }
        }
        self.scan_draw(random, health, weighted)
    }

    /// A draw among the available endpoints (by weight when `weighted` and weights differ):
    /// one pass sums them, a second finds the drawn one.
    fn scan_draw(&self, random: &Random, health: &dyn HealthView, weighted: bool) -> Option<usize> {
        let weighted = weighted && self.weights.is_some();
        let weight = |e: &Endpoint| if weighted { u64::from(e.weight()) } else { 1 };
        let total: u64 = self.endpoints.iter().filter(|e| health.is_available(e)).map(weight).sum();
        if total == 0 {
            return None;
        }
        let mut offset = random.below(total);
        let mut last = None;
        for (index, e) in self.endpoints.iter().enumerate() {
            if health.is_available(e) {
                let w = weight(e);
                if offset < w {
                    return Some(index);
                }
                offset -= w;
                last = Some(index);
            }
        }
        // Health changed between the passes.
        last
    }

    /// Power of two choices (weighted: see the module docs).
    fn least_request(&self, random: &Random, health: &dyn HealthView) -> Option<usize> {
        let first = self.draw_available(random, health, true)?;
        if self.endpoints.len() == 1 {
            return Some(first);
        }
        let Some(second) = self.draw_available(random, health, true) else {
            return Some(first);
        };
        let load = |i: usize| self.active[i].load(Ordering::Relaxed) as u128;
        let second_wins = match self.weights {
            None => load(second) < load(first),
            // active / w, compared without division.
            Some(_) => {
                let weight = |i: usize| u128::from(self.endpoints[i].weight());
                load(second) * weight(first) < load(first) * weight(second)
            }
        };
        Some(if second_wins { second } else { first })
    }

    /// A hash policy's pick: the entry of `hash`, walking on past unavailable endpoints.
    fn walk(&self, table: &impl Lookup, hash: u64, random: &Random, health: &dyn HealthView) -> Option<usize> {
        let len = table.len();
        let start = table.position(hash);
        let at = |k: usize| table.host((start + k) % len);
        let bounded = len.min(WALK);
        if let Some(index) = (0..bounded).map(at).find(|&i| self.available(i, health)) {
            return Some(index);
        }
        if !self.endpoints.iter().any(|e| health.is_available(e)) {
            return None;
        }
        if let Some(index) = (bounded..len).map(at).find(|&i| self.available(i, health)) {
            return Some(index);
        }
        // Only endpoints without entries are available (a table smaller than the set, or a
        // ring capped at its maximum size).
        self.scan_draw(random, health, false)
    }
}

/// A consistent-hash table: entries in a cycle, each owned by an endpoint.
trait Lookup {
    fn len(&self) -> usize;
    fn position(&self, hash: u64) -> usize;
    fn host(&self, position: usize) -> usize;
}

impl Lookup for Ring {
    fn len(&self) -> usize {
        Ring::len(self)
    }
    fn position(&self, hash: u64) -> usize {
        Ring::position(self, hash)
    }
    fn host(&self, position: usize) -> usize {
        Ring::host(self, position)
    }
}

impl Lookup for Maglev {
    fn len(&self) -> usize {
        Maglev::len(self)
    }
    fn position(&self, hash: u64) -> usize {
        Maglev::position(self, hash)
    }
    fn host(&self, position: usize) -> usize {
        Maglev::host(self, position)
    }
}

// === impl Picked ===

/// The endpoint [`Balancer::pick`] chose. For [`LbPolicy::LeastRequest`] it counts as one
/// active request on that endpoint until it is dropped: keep it for the life of the request.
#[derive(Debug)]
pub struct Picked {
    slot: Arc<Slot>,
    counted: bool,
}

/// An endpoint of a snapshot with its active-request counter.
#[derive(Debug)]
struct Slot {
    endpoint: Endpoint,
    active: Arc<AtomicUsize>,
}

impl Picked {
    /// The chosen endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.slot.endpoint
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        if self.counted {
            self.slot.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
