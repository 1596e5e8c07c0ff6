//! Cumulative weights: weighted draws and a lock-free weighted round-robin order.

use crate::random::Random;

const GOLDEN_RATIO: f64 = 1.618_033_988_749_895;

/// Prefix sums of the endpoint weights, built when the weights differ.
///
/// Endpoint `i` owns the interval `[cumulative[i-1], cumulative[i])` of `0..total`; an offset
/// maps to its owner by binary search, so a weighted choice costs O(log n) and no lock.
#[derive(Debug)]
pub(super) struct Weights {
    cumulative: Box<[u64]>,
    total: u64,
    /// A step coprime with `total`, close to `total / φ`.
    stride: u64,
}

impl Weights {
    /// `None` when every weight is the same (the balancers then use their unweighted form).
    pub(super) fn new(weights: impl Iterator<Item = u32>) -> Option<Self> {
        let mut total = 0u64;
        let (mut min, mut max) = (u32::MAX, 0);
        let cumulative: Box<[u64]> = weights
            .map(|w| {
                (min, max) = (min.min(w), max.max(w));
                total += u64::from(w);
                total
            })
            .collect();
        if min >= max {
            return None;
        }
        // Weights differ, so there are two endpoints and `total >= 3`.
        let mut stride = ((total as f64) / GOLDEN_RATIO).round() as u64;
        stride = stride.clamp(1, total - 1);
        while gcd(stride, total) != 1 {
            stride = if stride + 1 == total { 1 } else { stride + 1 };
        }
        Some(Self { cumulative, total, stride })
    }

    /// The endpoint owning `offset` (`offset < total`).
    fn owner(&self, offset: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= offset)
    }

    /// An endpoint drawn with probability proportional to its weight.
    pub(super) fn draw(&self, random: &Random) -> usize {
        self.owner(random.below(self.total))
    }

    /// The endpoint for the `turn`-th pick of weighted round robin.
    ///
    /// Turn `t` visits offset `t · stride mod total`. As the stride is coprime with `total`,
    /// every `total` consecutive turns visit each offset once, so each endpoint gets exactly its
    /// weight's share per cycle; as the stride is close to `total / φ` (a Weyl sequence), the
    /// visits of an endpoint are spread evenly over the cycle rather than bunched.
    pub(super) fn round_robin(&self, turn: usize) -> usize {
        let turn = turn as u64 % self.total;
        let offset = (u128::from(turn) * u128::from(self.stride) % u128::from(self.total)) as u64;
        self.owner(offset)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
