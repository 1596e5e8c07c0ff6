//! The random numbers routing draws from: lock-free, shared by clones, and seedable.
//!
//! Weighted destination choice, mirroring and the random and least-request balancers each
//! need one number per request. [`Random`] is a SplitMix64 sequence advanced with one atomic
//! add, so every clone of a layer draws from the same sequence without a lock, and a test that
//! seeds it ([`Random::seeded`]) sees the same draws every run.
//!
//! ```
//! use mesh_core::random::Random;
//!
//! let a = Random::seeded(7);
//! let b = Random::seeded(7);
//! assert_eq!(a.next_u64(), b.next_u64());
//! assert!(a.below(10) < 10);
//! ```

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A shared SplitMix64 generator. See the module docs.
#[derive(Debug)]
pub struct Random {
    state: AtomicU64,
}

impl Random {
    /// A generator whose sequence is fixed by `seed`.
    pub fn seeded(seed: u64) -> Self {
        Self { state: AtomicU64::new(seed) }
    }

    /// A generator seeded from the process's hash randomness (different in every process).
    pub fn from_entropy() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        Self::seeded(h.finish())
    }

    /// The next number of the sequence.
    pub fn next_u64(&self) -> u64 {
        let mut z = self.state.fetch_add(GAMMA, Ordering::Relaxed).wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is 0), by Lemire's multiply-shift: unbiased enough for
    /// traffic splits (the bias is below 2^-32 for any `n` under 2^32).
    pub fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

impl Default for Random {
    fn default() -> Self {
        Self::from_entropy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_sequences_repeat_and_spread() {
        let (a, b) = (Random::seeded(1), Random::seeded(1));
        let xs: Vec<u64> = (0..1000).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..1000).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        // Each of 10 buckets gets 1000/10 = 100 draws on average; with sd = sqrt(1000*0.1*0.9) ≈ 9.5,
        // 5 sd either side is a bound a correct generator essentially never breaks.
        let mut buckets = [0u32; 10];
        let r = Random::seeded(42);
        for _ in 0..1000 {
            buckets[r.below(10) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| (53..=147).contains(&n)), "{buckets:?}");
        assert_eq!(Random::seeded(3).below(0), 0);
    }
}
