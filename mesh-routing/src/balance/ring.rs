//! The ring of [`LbPolicy::RingHash`](super::LbPolicy::RingHash).

use std::fmt::Write as _;

use xxhash_rust::xxh64::xxh64;

use super::Endpoint;

/// Envoy's `maximum_ring_size` (default and limit): the most entries a ring holds.
pub(super) const MAXIMUM_RING_SIZE: u64 = 8_388_608;

/// A hash ring: entry `k` is the point `hashes[k]` owned by endpoint `hosts[k]`, sorted by
/// point. Two parallel arrays keep the binary search on a dense `u64` slice.
pub(super) struct Ring {
    hashes: Box<[u64]>,
    hosts: Box<[u32]>,
}

impl Ring {
    /// Builds the ring for `endpoints` (non-empty, weights non-zero).
    ///
    /// Endpoint `i` gets `ceil(w_i · c / w_min)` entries, the points `xxh64("address_j", 0)` for
    /// `j` in `0..entries`, where `c` is the least power of two that makes the ring hold at
    /// least `minimum_ring_size` entries. Envoy scales `c` exactly instead of to a power of
    /// two; the rounding means an endpoint's entries depend only on its own weight, the least
    /// weight and the power of two, so adding or removing an endpoint usually leaves the
    /// others' points where they were and only the keys of that endpoint move. When the ring
    /// would pass [`MAXIMUM_RING_SIZE`], entries are scaled down to fit (as in Envoy, a very
    /// light endpoint may then get none).
    pub(super) fn new(endpoints: &[Endpoint], minimum_ring_size: u64) -> Self {
        let entries = entries(endpoints.iter().map(Endpoint::weight), minimum_ring_size);

        // Ties (two equal points) break by address, so the ring does not depend on the order
        // of the endpoint list: points sort as (hash, rank of the address).
        let mut by_address: Vec<u32> = (0..endpoints.len() as u32).collect();
        by_address.sort_unstable_by_key(|&i| endpoints[i as usize].address());
        let mut rank = vec![0u32; endpoints.len()];
        for (r, &i) in by_address.iter().enumerate() {
            rank[i as usize] = r as u32;
        }

        let mut points: Vec<(u64, u32)> = Vec::with_capacity(entries.iter().sum::<u64>() as usize);
        let mut name = String::new();
        for ((endpoint, &n), &r) in endpoints.iter().zip(&entries).zip(&rank) {
            name.clear();
            name.push_str(endpoint.address());
            name.push('_');
            let prefix = name.len();
            for j in 0..n {
                name.truncate(prefix);
                let _ = write!(name, "{j}");
                points.push((xxh64(name.as_bytes(), 0), r));
            }
        }
        points.sort_unstable();
        let hashes = points.iter().map(|&(hash, _)| hash).collect();
        let hosts = points.iter().map(|&(_, r)| by_address[r as usize]).collect();
        Self { hashes, hosts }
    }

    /// The number of entries.
    pub(super) fn len(&self) -> usize {
        self.hashes.len()
    }

    /// The entry of `hash`: the first point clockwise from it (wrapping past the largest).
    pub(super) fn position(&self, hash: u64) -> usize {
        let p = self.hashes.partition_point(|&point| point < hash);
        if p == self.hashes.len() { 0 } else { p }
    }

    /// The endpoint owning entry `position`.
    pub(super) fn host(&self, position: usize) -> usize {
        self.hosts[position] as usize
    }
}

/// The number of points of each endpoint of weight `weights[i]` (see [`Ring::new`]).
pub(super) fn entries(weights: impl Iterator<Item = u32> + Clone, minimum_ring_size: u64) -> Vec<u64> {
    let weights = || weights.clone().map(u128::from);
    let total: u128 = weights().sum();
    let least = weights().min().unwrap_or(1);
    let size = |c: u128| -> u128 { weights().map(|w| (w * c).div_ceil(least)).sum() };
    let mut c = (least * u128::from(minimum_ring_size)).div_ceil(total).max(1).next_power_of_two();
    while c > 1 && size(c) > u128::from(MAXIMUM_RING_SIZE) {
        c /= 2;
    }
    if size(c) <= u128::from(MAXIMUM_RING_SIZE) {
        weights().map(|w| (w * c).div_ceil(least) as u64).collect()
    } else {
        weights().map(|w| (w * u128::from(MAXIMUM_RING_SIZE) / total) as u64).collect()
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("entries", &self.hashes.len()).finish()
    }
}
