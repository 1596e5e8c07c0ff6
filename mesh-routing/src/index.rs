//! The route index: which match blocks of a virtual host can possibly hold for a request,
//! found without evaluating each block in turn.
//!
//! Each block gets at most one *guard*: a condition of the block that a lookup can settle for
//! many blocks at once. An exact match of a header, cookie or query parameter becomes an
//! entry in a hash map from value to blocks; a uri prefix, an entry in a map from prefix to
//! blocks (the request's path and query is looked up at each distinct prefix length); a
//! regex on a header or on the path becomes a pattern in a `RegexSet` that says, in one pass,
//! which of them match. A block whose guard
//! fails cannot match (its conditions are AND-ed), so only the blocks whose guard holds, and
//! those without a guard, are evaluated, in their order: first match wins as before, and the
//! full block is always evaluated, so the index never changes a decision. Tables with fewer
//! than [`MIN_BLOCKS`] blocks are not indexed.

use std::borrow::Cow;
use std::collections::HashMap;

use http::HeaderName;
use mesh_core::matching::{HttpMatchRequest, RequestView, StringMatch, StringMatcher, header_value};
use regex::bytes::{RegexSet, RegexSetBuilder};

/// Below this many blocks a linear scan is as fast.
pub(crate) const MIN_BLOCKS: usize = 16;

/// Where a guard's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Source {
    Header(HeaderName),
    Cookie(Box<str>),
    Query(Box<str>),
    Path,
}

impl Source {
    /// The value the block's matcher would see (a repeated header joined with `,`).
    fn value<'a>(&self, view: &RequestView<'a>) -> Option<Cow<'a, [u8]>> {
        let (_, uri, headers) = view.parts();
        match self {
            Source::Header(name) => header_value(headers, name),
            Source::Cookie(name) => view.cookie(name).map(Cow::Borrowed),
            Source::Query(name) => view.query_param(name).map(|v| Cow::Borrowed(v.as_bytes())),
            Source::Path => Some(Cow::Borrowed(uri.path().as_bytes())),
        }
    }
}

enum Guard {
    Exact(Source, Vec<u8>),
    Regex(Source, String),
    /// A case-sensitive uri prefix (compared with the path and query, as Envoy does).
    Prefix(Vec<u8>),
}

/// Blocks guarded by an exact value of one source: value -> blocks.
type ExactGroup = (Source, HashMap<Box<[u8]>, Box<[u32]>>);

/// Blocks guarded by a regex on one source: the set, and each pattern's block.
type RegexGroup = (Source, RegexSet, Box<[u32]>);

/// The index of one virtual host's blocks, numbered in evaluation order.
#[derive(Debug)]
pub(crate) struct Index {
    blocks: usize,
    /// Blocks without a guard (always evaluated).
    always: Box<[u64]>,
    exact: Box<[ExactGroup]>,
    sets: Box<[RegexGroup]>,
    /// Uri prefix guards: prefix -> blocks, and the distinct prefix lengths to try.
    prefixes: HashMap<Box<[u8]>, Box<[u32]>>,
    prefix_lengths: Box<[usize]>,
}

impl Index {
    /// Indexes `blocks` (each block's config, in evaluation order); `None` when there are too
    /// few to be worth it.
    pub(crate) fn new(blocks: &[&HttpMatchRequest]) -> Option<Self> {
        if blocks.len() < MIN_BLOCKS || blocks.len() > u32::MAX as usize {
            return None;
        }
        let mut always = vec![0u64; blocks.len().div_ceil(64)];
        let mut exact: HashMap<Source, HashMap<Box<[u8]>, Vec<u32>>> = HashMap::new();
        let mut regexes: HashMap<Source, (Vec<String>, Vec<u32>)> = HashMap::new();
        let mut prefixes: HashMap<Box<[u8]>, Vec<u32>> = HashMap::new();
        for (i, block) in blocks.iter().enumerate() {
            match guard(block) {
                Some(Guard::Exact(source, value)) => {
                    exact.entry(source).or_default().entry(value.into()).or_default().push(i as u32);
                }
                Some(Guard::Regex(source, pattern)) => {
                    let (patterns, ids) = regexes.entry(source).or_default();
                    patterns.push(pattern);
                    ids.push(i as u32);
                }
                Some(Guard::Prefix(prefix)) => prefixes.entry(prefix.into()).or_default().push(i as u32),
                None => always[i / 64] |= 1 << (i % 64),
            }
        }
        let mut prefix_lengths: Vec<usize> = prefixes.keys().map(|p| p.len()).collect();
        prefix_lengths.sort_unstable();
        prefix_lengths.dedup();
        let prefixes = prefixes.into_iter().map(|(p, ids)| (p, ids.into())).collect();
        let mut sets = Vec::new();
        for (source, (patterns, ids)) in regexes {
            // Each pattern compiled alone already; a set that does not build (size) falls
            // back to evaluating its blocks every time.
            let built = RegexSetBuilder::new(&patterns).size_limit(64 << 20).dfa_size_limit(16 << 20).build();
            match built {
                Ok(set) => sets.push((source, set, ids.into())),
                Err(_) => {
                    for i in ids {
                        always[i as usize / 64] |= 1 << (i % 64);
                    }
                }
            }
        }
        let exact = exact
            .into_iter()
            .map(|(source, map)| (source, map.into_iter().map(|(v, ids)| (v, ids.into())).collect()))
            .collect();
        Some(Self {
            blocks: blocks.len(),
            always: always.into(),
            exact,
            sets: sets.into(),
            prefixes,
            prefix_lengths: prefix_lengths.into(),
        })
    }

    /// Calls `try_block` on each block that may match `view`, in order, until it says yes;
    /// returns that block.
    pub(crate) fn first(&self, view: &RequestView<'_>, mut try_block: impl FnMut(usize) -> bool) -> Option<usize> {
        let mut stack = [0u64; 8];
        let mut heap;
        let words = self.blocks.div_ceil(64);
        let bits: &mut [u64] = if words <= stack.len() {
            &mut stack[..words]
        } else {
            heap = vec![0u64; words];
            &mut heap
        };
        bits.copy_from_slice(&self.always);
        let mut set = |i: u32| bits[i as usize / 64] |= 1 << (i % 64);
        for (source, map) in &self.exact {
            if let Some(value) = source.value(view)
                && let Some(ids) = map.get(&*value)
            {
                ids.iter().copied().for_each(&mut set);
            }
        }
        if !self.prefix_lengths.is_empty() {
            let (_, uri, _) = view.parts();
            let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()).as_bytes();
            for &len in self.prefix_lengths.iter().take_while(|&&len| len <= target.len()) {
                if let Some(ids) = self.prefixes.get(&target[..len]) {
                    ids.iter().copied().for_each(&mut set);
                }
            }
        }
        for (source, regexes, ids) in &self.sets {
            if let Some(value) = source.value(view) {
                for m in regexes.matches(&value).iter() {
                    set(ids[m]);
                }
            }
        }
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let i = w * 64 + word.trailing_zeros() as usize;
                if try_block(i) {
                    return Some(i);
                }
                word &= word - 1;
            }
        }
        None
    }
}

/// The block's most selective guard: an exact header, cookie or query value (looked up), else
/// a regex on a header or the path (one pass of a set), else none.
fn guard(block: &HttpMatchRequest) -> Option<Guard> {
    let exact = |m: &StringMatch| StringMatcher::new("", m).ok()?.exact_value().map(<[u8]>::to_vec);
    let regex = |m: &StringMatch| StringMatcher::new("", m).ok()?.regex_source().map(str::to_owned);
    let header = |k: &str| HeaderName::from_bytes(k.as_bytes()).ok();
    for (k, m) in &block.headers {
        if let (Some(v), Some(name)) = (exact(m), header(k)) {
            return Some(Guard::Exact(Source::Header(name), v));
        }
    }
    for (k, m) in &block.cookies {
        if let Some(v) = exact(m) {
            return Some(Guard::Exact(Source::Cookie(k.as_str().into()), v));
        }
    }
    for (k, m) in &block.query_params {
        if let Some(v) = exact(m) {
            return Some(Guard::Exact(Source::Query(k.as_str().into()), v));
        }
    }
    match &block.uri {
        Some(StringMatch::Prefix(p)) if !block.ignore_uri_case => return Some(Guard::Prefix(p.as_bytes().to_vec())),
        Some(m @ StringMatch::Regex(_)) => {
            if let Some(p) = regex(m) {
                return Some(Guard::Regex(Source::Path, p));
            }
        }
        _ => {}
    }
    for (k, m) in &block.headers {
        if let (Some(p), Some(name)) = (regex(m), header(k)) {
            return Some(Guard::Regex(Source::Header(name), p));
        }
    }
    None
}
