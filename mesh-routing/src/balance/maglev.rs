//! The lookup table of [`LbPolicy::Maglev`](super::LbPolicy::Maglev).

use xxhash_rust::xxh64::xxh64;

use super::Endpoint;

/// Envoy's limit: a Maglev table size must be a prime below this.
pub(super) const TABLE_SIZE_LIMIT: u64 = 5_000_011;

/// A Maglev lookup table: slot `s` holds the endpoint that keys hashing to `s mod size` go to.
pub(super) struct Maglev {
    table: Box<[u32]>,
}

impl Maglev {
    /// Fills a table of `size` slots (a prime) for `endpoints` (non-empty, weights non-zero).
    ///
    /// Each endpoint walks its own permutation of the slots, starting at
    /// `xxh64(address, 0) mod size` and stepping by `xxh64(address, 1) mod (size - 1) + 1`
    /// (a step below a prime size visits every slot), and claims the first slot not yet taken.
    /// Endpoints take turns in rounds: a heaviest endpoint claims a slot every round, an
    /// endpoint of weight `w` whenever its accumulated weight reaches the heaviest weight, so
    /// slots end up proportional to weight. Endpoints take their turns in address order, so the
    /// table does not depend on the order of the endpoint list. Building costs O(size) claims
    /// plus one turn check per endpoint per round.
    pub(super) fn new(endpoints: &[Endpoint], size: u64) -> Self {
        struct Turn {
            host: u32,
            weight: u64,
            credit: u64,
            slot: u64,
            skip: u64,
        }
        let mut turns: Vec<Turn> = endpoints
            .iter()
            .enumerate()
            .map(|(host, e)| {
                let address = e.address().as_bytes();
                Turn {
                    host: host as u32,
                    weight: u64::from(e.weight()),
                    credit: 0,
                    slot: xxh64(address, 0) % size,
                    skip: xxh64(address, 1) % (size - 1) + 1,
                }
            })
            .collect();
        turns.sort_unstable_by(|a, b| endpoints[a.host as usize].address().cmp(endpoints[b.host as usize].address()));
        let heaviest = turns.iter().map(|t| t.weight).max().unwrap_or(1);

        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; size as usize].into_boxed_slice();
        let mut filled = 0u64;
        'rounds: loop {
            for turn in &mut turns {
                turn.credit += turn.weight;
                if turn.credit < heaviest {
                    continue;
                }
                turn.credit -= heaviest;
                while table[turn.slot as usize] != EMPTY {
                    turn.slot = (turn.slot + turn.skip) % size;
                }
                table[turn.slot as usize] = turn.host;
                turn.slot = (turn.slot + turn.skip) % size;
                filled += 1;
                if filled == size {
                    break 'rounds;
                }
            }
        }
        Self { table }
    }

    /// The number of slots.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// The slot of `hash`.
    pub(super) fn position(&self, hash: u64) -> usize {
        (hash % self.table.len() as u64) as usize
    }

    /// The endpoint holding slot `position`.
    pub(super) fn host(&self, position: usize) -> usize {
        self.table[position] as usize
    }
}

impl std::fmt::Debug for Maglev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maglev").field("slots", &self.table.len()).finish()
    }
}

/// Whether `n` is prime (trial division; table sizes are below 5 000 011).
pub(super) fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    (3..).step_by(2).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}
