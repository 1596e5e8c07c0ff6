//! Per-request cost of mesh-core's compiled matchers, next to the obvious hand-written
//! alternatives: a `regex::Regex` on the header's `&str` and a `split(';')` cookie scan.
//!
//! Run with `cargo bench -p mesh-benches --bench matchers`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request};
use mesh_core::matching::{CookieMatch, HeaderMatch, HttpMatch, HttpMatchRequest, StringMatch};

const COOKIE: &str = "session=4f1c2a9e; theme=dark; lang=en-GB; user=jason; consent=1";

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("cookie", HeaderValue::from_static(COOKIE));
    h.insert("end-user", HeaderValue::from_static("jason"));
    h.insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    h
}

fn cookie(c: &mut Criterion) {
    let h = headers();
    let mut g = c.benchmark_group("cookie user=jason");
    let istio = HeaderMatch::new("cookie", &StringMatch::Regex(r"^(.*?;\s*)?(user=jason)(;.*)?$".into())).unwrap();
    g.bench_function("mesh HeaderMatch regex (Istio idiom)", |b| b.iter(|| black_box(&istio).matches(black_box(&h))));
    let by_name = CookieMatch::new("user", &StringMatch::Exact("jason".into())).unwrap();
    g.bench_function("mesh CookieMatch by name", |b| b.iter(|| black_box(&by_name).matches(black_box(&h))));
    let re = regex::Regex::new(r"^(.*?;\s*)?(user=jason)(;.*)?$").unwrap();
    g.bench_function("regex::Regex on header &str", |b| {
        b.iter(|| black_box(&h).get("cookie").and_then(|v| v.to_str().ok()).is_some_and(|v| re.is_match(v)))
    });
    g.bench_function("hand-written split(';') scan", |b| {
        b.iter(|| {
            black_box(&h).get("cookie").and_then(|v| v.to_str().ok()).is_some_and(|v| {
                v.split(';').filter_map(|p| p.trim().split_once('=')).any(|(k, v)| k == "user" && v == "jason")
            })
        })
    });
    g.finish();
}

fn block(c: &mut Criterion) {
    let mut config = HttpMatchRequest::default();
    config.uri = Some(StringMatch::Prefix("/api/".into()));
    config.method = Some(StringMatch::Exact("GET".into()));
    config.headers.insert("end-user".into(), StringMatch::Exact("jason".into()));
    config.without_headers.insert("x-debug".into(), StringMatch::Present);
    let compiled = HttpMatch::new(&config).unwrap();
    let mut req = Request::get("/api/v1/reviews?page=2").body(()).unwrap();
    *req.headers_mut() = headers();
    c.bench_function("HttpMatch block (uri prefix, method, header, withoutHeaders)", |b| {
        b.iter(|| black_box(&compiled).matches_request(black_box(&req)))
    });
}

criterion_group!(benches, cookie, block);
criterion_main!(benches);
