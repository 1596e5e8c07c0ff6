//! The route index never changes a decision: over generated tables (exact, regex, prefix,
//! presence and negated conditions on headers, cookies, query parameters and the path, one or
//! two blocks a route) and generated requests, the table's choice is the first block, in
//! order, that holds when every block is evaluated directly.

use mesh_core::matching::{HttpMatch, HttpMatchRequest, StringMatch};
use mesh_routing::RouteTable;
use mesh_routing::model::HttpRoute;
use proptest::prelude::*;

fn condition() -> impl Strategy<Value = (u8, u8, u8)> {
    (0u8..9, 0u8..3, 0u8..3)
}

/// A match block from up to three generated conditions.
fn block(conditions: &[(u8, u8, u8)]) -> HttpMatchRequest {
    let mut b = HttpMatchRequest::default();
    for &(kind, name, value) in conditions {
        let (name, value) = (format!("k{name}"), format!("v{value}"));
        match kind {
            0 => drop(b.headers.insert(format!("x-{name}"), StringMatch::Exact(value))),
            1 => drop(b.headers.insert(format!("x-{name}"), StringMatch::Regex(format!("{value}[0-9]*")))),
            2 => drop(b.headers.insert(format!("x-{name}"), StringMatch::Present)),
            3 => drop(b.without_headers.insert(format!("x-{name}"), StringMatch::Exact(value))),
            4 => drop(b.cookies.insert(name, StringMatch::Exact(value))),
            5 => drop(b.query_params.insert(name, StringMatch::Exact(value))),
            6 => b.uri = Some(StringMatch::Regex(format!("/{value}/[a-z0-9]+"))),
            7 => b.uri = Some(StringMatch::Prefix(format!("/{value}"))),
            _ => b.uri = Some(StringMatch::Exact(format!("/{value}/x"))),
        }
    }
    b
}

fn request(parts: &[(u8, u8, u8)]) -> http::Request<()> {
    let mut path = "/v0/x".to_owned();
    let mut query = Vec::new();
    let mut cookies = Vec::new();
    let mut req = http::Request::builder();
    for &(kind, name, value) in parts {
        match kind % 4 {
            0 => req = req.header(format!("x-k{name}"), format!("v{value}{}", if kind > 3 { "7" } else { "" })),
            1 => cookies.push(format!("k{name}=v{value}")),
            2 => query.push(format!("k{name}=v{value}")),
            _ => path = format!("/v{value}/{}", if name == 0 { "x" } else { "abc1" }),
        }
    }
    if !cookies.is_empty() {
        req = req.header("cookie", cookies.join("; "));
    }
    let target = if query.is_empty() { path } else { format!("{path}?{}", query.join("&")) };
    req.uri(target).body(()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn indexed_decisions_equal_evaluating_every_block_in_order(
        routes in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(condition(), 1..3), 1..3), 16..48),
        requests in proptest::collection::vec(proptest::collection::vec((0u8..8, 0u8..3, 0u8..3), 0..7), 16),
    ) {
        let configs: Vec<HttpRoute> = routes
            .iter()
            .enumerate()
            .map(|(i, blocks)| blocks.iter().fold(HttpRoute::named(format!("r{i}")), |r, b| r.matching(block(b))).to("svc", None, 1))
            .collect();
        let table = RouteTable::from_routes(&configs).unwrap();
        let compiled: Vec<Vec<HttpMatch>> = configs
            .iter()
            .map(|r| r.matches.iter().map(|m| HttpMatch::new(m).unwrap()).collect())
            .collect();
        for parts in &requests {
            let req = request(parts);
            let expected = compiled.iter().enumerate().find_map(|(r, blocks)| {
                blocks.iter().position(|b| b.matches_request(&req)).map(|b| (format!("r{r}"), b))
            });
            let got = table.find(&req).map(|(route, b)| (route.name().to_string(), b));
            prop_assert_eq!(got, expected, "request {:?}", req);
        }
    }
}
