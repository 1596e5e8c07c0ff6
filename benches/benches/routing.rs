//! Per-request cost of a routing decision (`RouteTable::decide`: find the route, draw the
//! weighted destination) over tables of 1, 10, 100 and 1,000 routes in one virtual host, next
//! to `matchit::Router` path lookup over the same number of paths.
//!
//! Run with `cargo bench -p mesh-benches --bench routing`.
//!
//! The routes cycle through six kinds of match block, so a table holds every kind in equal
//! measure: a uri prefix (`/svc{i}/`), a uri regex (`/svc{i}/v[0-9]+/items/[0-9]+`), an exact
//! header (`x-route: r{i}`), a header regex (`x-tenant: t{i}-[a-z]+`), a cookie by name
//! (`user=u{i}`) and a query parameter (`variant=q{i}`). Each route forwards 90/10 to two
//! subsets, drawn from a seeded [`Random`]. The measured request carries every header, cookie
//! and query parameter those blocks look at, with values keyed to the *last* route, so every
//! earlier route runs its matcher on real data and fails (the worst case for first match wins
//! short of a miss); the miss is the same request keyed to a route that does not exist, so
//! every route is tried and none holds.
//!
//! matchit is the baseline, not a competitor: it routes by path alone (a radix tree, one
//! lookup whatever the number of paths), while the mesh table evaluates Istio's ordered,
//! multi-condition match blocks one after another, as Envoy does. The ratio says what the
//! generality costs.
//!
//! Then 100 virtual hosts of 10 routes each, the request's host chosen by its `Host` header
//! (with a port, as HTTP/1.1 clients send it): the same decision as over 10 routes, plus the
//! authority lookup. The last group prices each kind of block alone (100 routes of one kind,
//! nothing matching: the figure divided by 100 is the cost of one block).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use mesh_core::matching::{HttpMatchRequest, StringMatch};
use mesh_routing::model::{HttpMatchRequestExt, HttpRoute};
use mesh_routing::random::Random;
use mesh_routing::{RouteContext, RouteTable, VirtualHostConfig};

const SIZES: [usize; 4] = [1, 10, 100, 1_000];

/// What route `i`'s match block looks at, by `i % 6`.
const KINDS: [&str; 6] = ["uri prefix", "uri regex", "exact header", "header regex", "cookie by name", "query param"];

/// Route `i`: one match block of kind `i % 6`, forwarding 90/10 to `svc{i}` v1 / v2.
fn route(i: usize) -> HttpRoute {
    let block = HttpMatchRequest::default();
    let block = match i % KINDS.len() {
        0 => block.uri(StringMatch::Prefix(format!("/svc{i}/"))),
        1 => block.uri(StringMatch::Regex(format!("/svc{i}/v[0-9]+/items/[0-9]+"))),
        2 => block.header("x-route", StringMatch::Exact(format!("r{i}"))),
        3 => block.header("x-tenant", StringMatch::Regex(format!("t{i}-[a-z]+"))),
        4 => block.cookie("user", StringMatch::Exact(format!("u{i}"))),
        _ => {
            let mut block = block;
            block.query_params.insert("variant".into(), StringMatch::Exact(format!("q{i}")));
            block
        }
    };
    let host = format!("svc{i}");
    HttpRoute::named(format!("route-{i}")).matching(block).to(host.as_str(), Some("v1"), 90).to(host, Some("v2"), 10)
}

fn routes(n: usize) -> Vec<HttpRoute> {
    (0..n).map(route).collect()
}

/// A request that route `i` matches, whatever its kind, and no route before it does.
fn request(i: usize, host: &str) -> Request<()> {
    Request::get(format!("/svc{i}/v2/items/42?page=2&variant=q{i}"))
        .header("host", host)
        .header("user-agent", "curl/8.5.0")
        .header("accept", "*/*")
        .header("x-route", format!("r{i}"))
        .header("x-tenant", format!("t{i}-blue"))
        .header("cookie", format!("session=4f1c2a9e; theme=dark; user=u{i}; consent=1"))
        .body(())
        .expect("a valid request")
}

/// The name of the route `table` decides `req` goes to, checked before measuring.
fn decided(table: &RouteTable, req: &Request<()>) -> Option<String> {
    table.decide(req).map(|(route, _)| route.name().to_string())
}

fn decide(c: &mut Criterion) {
    for n in SIZES {
        let mut g = c.benchmark_group(format!("decide over {n} routes"));
        let table = RouteTable::from_routes(&routes(n)).expect("valid routes").with_random(Random::seeded(1));
        let last = request(n - 1, "reviews.example.com");
        let miss = request(n, "reviews.example.com");
        assert_eq!(decided(&table, &last), Some(format!("route-{}", n - 1)));
        assert_eq!(decided(&table, &miss), None);
        g.bench_function("mesh RouteTable::decide, last route matches", |b| {
            b.iter(|| black_box(black_box(&table).decide(black_box(&last))))
        });
        g.bench_function("mesh RouteTable::decide, no route matches", |b| {
            b.iter(|| black_box(black_box(&table).decide(black_box(&miss))))
        });

        let mut router = matchit::Router::new();
        for i in 0..n {
            router.insert(format!("/svc{i}/items/{{id}}"), i).expect("distinct paths");
        }
        let (hit, lost) = (format!("/svc{}/items/42", n - 1), format!("/svc{n}/items/42"));
        assert_eq!(router.at(&hit).map(|m| *m.value).ok(), Some(n - 1));
        assert!(router.at(&lost).is_err());
        g.bench_function("matchit Router::at, last path", |b| {
            b.iter(|| black_box(black_box(&router).at(black_box(&hit)).map(|m| *m.value)))
        });
        g.bench_function("matchit Router::at, no path matches", |b| {
            b.iter(|| black_box(black_box(&router).at(black_box(&lost)).map(|m| *m.value)))
        });
        g.finish();
    }
}

fn virtual_hosts(c: &mut Criterion) {
    const HOSTS: usize = 100;
    const ROUTES: usize = 10;
    let hosts: Vec<VirtualHostConfig> = (0..HOSTS)
        .map(|h| {
            let domains = vec![format!("svc{h}.example.com"), format!("svc{h}")];
            VirtualHostConfig::new(format!("default/svc{h}"), domains, routes(ROUTES))
        })
        .collect();
    let table =
        RouteTable::new(&hosts, &RouteContext::default()).expect("valid virtual hosts").with_random(Random::seeded(1));
    let req = request(ROUTES - 1, "svc73.example.com:8080");
    assert_eq!(decided(&table, &req), Some(format!("route-{}", ROUTES - 1)));
    assert_eq!(decided(&table, &request(ROUTES - 1, "elsewhere.example.com")), None);
    let mut g = c.benchmark_group(format!("decide over {HOSTS} virtual hosts of {ROUTES} routes"));
    g.bench_function("mesh RouteTable::decide, by Host, last route matches", |b| {
        b.iter(|| black_box(black_box(&table).decide(black_box(&req))))
    });
    g.finish();
}

/// What each kind of block costs by itself: 100 routes of one kind and a request none of
/// them matches, so the figure over 100 is the per-route cost in ns.
fn kinds(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide over 100 routes of one kind, no route matches");
    for (kind, name) in KINDS.iter().enumerate() {
        let routes: Vec<HttpRoute> = (0..100).map(|j| route(j * KINDS.len() + kind)).collect();
        let table = RouteTable::from_routes(&routes).expect("valid routes").with_random(Random::seeded(1));
        let miss = request(KINDS.len() * 100, "reviews.example.com");
        assert_eq!(decided(&table, &miss), None);
        g.bench_function(format!("mesh RouteTable::decide, {name}"), |b| {
            b.iter(|| black_box(black_box(&table).decide(black_box(&miss))))
        });
    }
    g.finish();
}

criterion_group!(benches, decide, virtual_hosts, kinds);
criterion_main!(benches);
