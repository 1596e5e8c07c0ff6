//! SEMANTICS.md section 1 through [`RouteTable`]: Appendix A vectors 1–7, virtual host
//! selection, config-time filters, weighted and sticky splits, and the route actions
//! (rewrite, header operations, redirect, direct response, timeout, mirroring).
//!
//! Routes are written in YAML, as a VirtualService author writes them, and deserialized into
//! the model. Everything random is seeded, so every run sees the same draws.

#![cfg(feature = "serde")]

use std::time::Duration;

use http::header::{HOST, LOCATION};
use http::{HeaderMap, HeaderName, Request, StatusCode, Version};
use mesh_routing::model::{HttpRoute, VirtualServiceSpec};
use mesh_routing::random::Random;
use mesh_routing::{
    Action, InvalidRoute, ORIGINAL_PATH, Route, RouteContext, RouteTable, Split, SplitKey, VirtualHostConfig,
};

// === helpers ===

/// `http` routes written as a YAML list.
fn routes(yaml: &str) -> Vec<HttpRoute> {
    yaml_serde::from_str(yaml).unwrap_or_else(|e| panic!("valid routes YAML: {e}\n{yaml}"))
}

/// A one-host table answering every authority.
fn compile(yaml: &str) -> RouteTable {
    RouteTable::from_routes(&routes(yaml)).unwrap_or_else(|e| panic!("routes compile: {e}\n{yaml}"))
}

/// The error compiling `yaml` gives.
fn invalid(yaml: &str) -> InvalidRoute {
    match RouteTable::from_routes(&routes(yaml)) {
        Ok(_) => panic!("compiled, but must be rejected:\n{yaml}"),
        Err(e) => e,
    }
}

fn request(path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::get(path);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(()).unwrap()
}

fn get(path: &str) -> Request<()> {
    request(path, &[])
}

/// The name (`<route>.<match>`) of the block `req` matches, `None` for "no route" (404 NR).
fn matched(table: &RouteTable, req: &Request<()>) -> Option<String> {
    table.find(req).map(|(route, block)| route.block_name(block).to_string())
}

/// Whether one route with this single match block (YAML mapping) matches `req`.
fn block_matches(block: &str, req: &Request<()>) -> bool {
    let indented = block.trim().replace('\n', "\n    ");
    let yaml = format!("- name: r\n  match:\n  - {indented}\n  route:\n  - destination: {{host: a}}\n");
    matched(&compile(&yaml), req).is_some()
}

/// The first route of the first virtual host.
fn first_route(table: &RouteTable) -> &Route {
    let (_, _, routes) = table.virtual_hosts().next().expect("a virtual host");
    &routes[0]
}

fn split(table: &RouteTable) -> &Split {
    match first_route(table).action() {
        Action::Forward(split) => split,
        other => panic!("a forwarding route, not {other:?}"),
    }
}

/// The subset (or host) of the destination `split` picks for draw `r`.
fn pick(split: &Split, r: u64) -> String {
    let key = split.pick(r).key();
    key.subset.as_deref().unwrap_or(&key.host).to_owned()
}

/// Applies the route's request rewrites for the destination chosen for `req`.
fn prepared(table: &RouteTable, mut req: Request<()>) -> Request<()> {
    let (route, block) = table.find(&req).expect("a route matches");
    let (_, target) = table.decide(&req).expect("a forwarding route");
    route.prepare_request(block, Some(target), &mut req);
    req
}

fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
}

/// Asserts that `count` successes of `n` trials are within 4.5 standard deviations of the
/// binomial mean `n·p`, sd = sqrt(n·p·(1−p)): for 10,000 draws at p = 0.1 that is 1,000 ± 135
/// (sd = sqrt(10,000 · 0.1 · 0.9) = 30). A correct split leaves that band with probability
/// under 1e-5, and the draws are seeded, so the result is the same on every run.
fn assert_binomial(count: u64, n: u64, p: f64, what: &str) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    let tolerance = 4.5 * sd;
    assert!(
        (count as f64 - mean).abs() <= tolerance,
        "{what}: {count} of {n}, expected {mean} ± {tolerance:.0} (4.5 sd, sd = {sd:.1})"
    );
}

// === vector 1: uri prefix / exact / regex, with query strings ===

#[test]
fn v1_uri_prefix_compares_path_and_query() {
    let prefix = "uri: {prefix: /api}";
    for path in ["/api", "/apix", "/api/v1?x=1", "/api?x=1"] {
        assert!(block_matches(prefix, &get(path)), "{path}");
    }
    for path in ["/ap", "/v1/api", "/API"] {
        assert!(!block_matches(prefix, &get(path)), "{path}");
    }
    // The prefix reaches into the query string.
    assert!(block_matches("uri: {prefix: '/api?x=1'}", &get("/api?x=1&y=2")));
    assert!(!block_matches("uri: {prefix: '/api?x=1'}", &get("/api?y=2")));
}

#[test]
fn v1_uri_exact_and_regex_compare_the_path_only() {
    let exact = "uri: {exact: /api}";
    assert!(block_matches(exact, &get("/api")));
    assert!(block_matches(exact, &get("/api?x=1")));
    assert!(!block_matches(exact, &get("/api/")));
    assert!(!block_matches(exact, &get("/apix")));
    // The query is not part of what `exact` sees.
    assert!(!block_matches("uri: {exact: '/api?x=1'}", &get("/api?x=1")));

    let regex = r#"uri: {regex: "/api/[0-9]+"}"#;
    assert!(block_matches(regex, &get("/api/12?q")));
    assert!(block_matches(regex, &get("/api/12")));
    // A full match, not a search.
    assert!(!block_matches(regex, &get("/api/12/x")));
    assert!(!block_matches(regex, &get("/v1/api/12")));
    assert!(!block_matches(regex, &get("/api/")));
}

// === vector 2: ignoreUriCase ===

#[test]
fn v2_ignore_uri_case_applies_to_exact_and_prefix_not_regex() {
    assert!(block_matches("{uri: {exact: /Foo}, ignoreUriCase: true}", &get("/fOO")));
    assert!(block_matches("{uri: {exact: /Foo}, ignoreUriCase: true}", &get("/foo?Q=1")));
    assert!(block_matches("{uri: {prefix: /Foo}, ignoreUriCase: true}", &get("/fOO/bar")));
    assert!(!block_matches("{uri: {exact: /Foo}}", &get("/fOO")));
    assert!(!block_matches("{uri: {regex: /Foo}, ignoreUriCase: true}", &get("/fOO")));
    assert!(block_matches("{uri: {regex: /Foo}, ignoreUriCase: true}", &get("/Foo")));
    assert!(block_matches("{uri: {regex: '(?i)/Foo'}}", &get("/fOO")));
}

// === vector 3: cookies ===

const COOKIE_IDIOM: &str = r#"headers: {cookie: {regex: "^(.*?;)?(user=jason)(;.*)?$"}}"#;
const COOKIE_BY_NAME: &str = "cookies: {user: {exact: jason}}";

#[test]
fn v3_cookie_regex_idiom() {
    let with_cookie = |c: &str| request("/", &[("cookie", c)]);
    assert!(block_matches(COOKIE_IDIOM, &with_cookie("user=jason")));
    assert!(block_matches(COOKIE_IDIOM, &with_cookie("a=b;user=jason")));
    // Browsers write "; ": the idiom cannot see `user=jason` after the space.
    assert!(!block_matches(COOKIE_IDIOM, &with_cookie("a=b; user=jason")));
    assert!(block_matches(COOKIE_IDIOM, &with_cookie("user=jason; a=b")));
    assert!(!block_matches(COOKIE_IDIOM, &with_cookie("user=jasonx")));
    assert!(!block_matches(COOKIE_IDIOM, &get("/")));
}

#[test]
fn v3_cookie_by_name_is_a_mesh_extension_that_handles_spaces() {
    let with_cookie = |c: &str| request("/", &[("cookie", c)]);
    for c in ["user=jason", "a=b;user=jason", "a=b; user=jason", "user=jason; a=b", "a=b;  user=jason ;c=d"] {
        assert!(block_matches(COOKIE_BY_NAME, &with_cookie(c)), "{c}");
    }
    for c in ["user=jasonx", "xuser=jason", "a=user=jason", "user="] {
        assert!(!block_matches(COOKIE_BY_NAME, &with_cookie(c)), "{c}");
    }
    assert!(!block_matches(COOKIE_BY_NAME, &get("/")));
    // Several HTTP/1.1 `cookie` lines are parsed line by line.
    let two_lines = Request::get("/").header("cookie", "a=b").header("cookie", "user=jason").body(()).unwrap();
    assert!(block_matches(COOKIE_BY_NAME, &two_lines));
}

#[test]
fn v3_http2_cookie_crumbs_are_joined_with_semicolon_space() {
    let crumbs = |version: Version, first: &str, second: &str| {
        Request::get("/").version(version).header("cookie", first).header("cookie", second).body(()).unwrap()
    };
    // HTTP/2 crumbs are seen as one header joined with "; " (as Envoy's codec joins them) ...
    let h2 = crumbs(Version::HTTP_2, "a=b", "user=jason");
    assert!(block_matches(r#"headers: {cookie: {exact: "a=b; user=jason"}}"#, &h2));
    // ... so the idiom fails on them unless the pair comes first ...
    assert!(!block_matches(COOKIE_IDIOM, &h2));
    assert!(block_matches(COOKIE_IDIOM, &crumbs(Version::HTTP_2, "user=jason", "a=b")));
    // ... while HTTP/1.1 repeated lines are joined with "," like any other header.
    let h1 = crumbs(Version::HTTP_11, "a=b", "user=jason");
    assert!(block_matches(r#"headers: {cookie: {exact: "a=b,user=jason"}}"#, &h1));
    assert!(!block_matches(r#"headers: {cookie: {exact: "a=b; user=jason"}}"#, &h1));
    // The by-name match finds the cookie either way.
    assert!(block_matches(COOKIE_BY_NAME, &h2));
    assert!(block_matches(COOKIE_BY_NAME, &h1));
}

// === vector 4: OR across blocks, AND within one, first route wins, 404 ===

#[test]
fn v4_blocks_are_ored_and_conditions_anded() {
    let spec: VirtualServiceSpec = yaml_serde::from_str(
        r#"
hosts: [reviews]
http:
- name: either
  match:
  - name: path
    uri: {prefix: /a}
  - name: header
    headers: {x: {exact: "1"}}
  route:
  - destination: {host: reviews, subset: v1}
- name: both
  match:
  - uri: {prefix: /c}
    headers: {x: {exact: "1"}}
  route:
  - destination: {host: reviews, subset: v2}
"#,
    )
    .unwrap();
    let table = RouteTable::new(
        &[VirtualHostConfig::new("default/reviews", spec.hosts.clone(), spec.http.clone())],
        &RouteContext::default(),
    )
    .unwrap();
    let req = |path: &str, x: Option<&str>| {
        let mut r = request(path, &[("host", "reviews")]);
        if let Some(x) = x {
            r.headers_mut().insert("x", x.parse().unwrap());
        }
        r
    };
    assert_eq!(matched(&table, &req("/a", None)).as_deref(), Some("either.path"));
    assert_eq!(matched(&table, &req("/b", Some("1"))).as_deref(), Some("either.header"));
    assert_eq!(matched(&table, &req("/b", None)), None, "nothing matches: 404 NR");
    assert_eq!(matched(&table, &req("/c", Some("1"))).as_deref(), Some("either.header"), "first route wins");
    assert_eq!(matched(&table, &req("/c", None)), None, "one block needs both conditions");
    assert_eq!(matched(&table, &req("/c", Some("2"))), None);
    assert!(table.decide(&req("/b", None)).is_none());
    assert!(table.notes().is_empty());
}

#[test]
fn v4_first_matching_route_wins_over_later_ones() {
    let table = compile(
        r#"
- name: specific
  match: [{uri: {exact: /a/b}}]
  route: [{destination: {host: s}}]
- name: general
  match: [{uri: {prefix: /a}}]
  route: [{destination: {host: g}}]
- name: shadowed
  match: [{uri: {exact: /a/b}}]
  route: [{destination: {host: never}}]
"#,
    );
    assert_eq!(matched(&table, &get("/a/b")).as_deref(), Some("specific"));
    assert_eq!(matched(&table, &get("/a/c")).as_deref(), Some("general"));
    assert_eq!(matched(&table, &get("/b")), None);
}

// === vector 5: repeated header lines ===

#[test]
fn v5_repeated_header_lines_are_seen_joined_with_commas() {
    let req = Request::get("/").header("x", "1").header("x", "2").body(()).unwrap();
    assert!(!block_matches(r#"headers: {x: {exact: "1"}}"#, &req));
    assert!(block_matches(r#"headers: {x: {regex: "1,2"}}"#, &req));
    assert!(block_matches(r#"headers: {x: {exact: "1,2"}}"#, &req));
    assert!(block_matches(r#"headers: {x: {prefix: "1,"}}"#, &req));
}

// === vector 6: headers and withoutHeaders (SEMANTICS.md 1.6) ===

#[test]
fn v6_without_headers_table() {
    // (block, [header absent, x: foo, x: bar])
    let cases: [(&str, [bool; 3]); 5] = [
        ("headers: {x: {exact: foo}}", [false, true, false]),
        ("headers: {x: {}}", [false, true, true]),
        ("withoutHeaders: {x: {exact: foo}}", [true, false, true]),
        ("withoutHeaders: {x: {}}", [true, false, false]),
        (r#"withoutHeaders: {x: {regex: "*"}}"#, [true, false, false]),
    ];
    for (block, expected) in cases {
        let got = [
            block_matches(block, &get("/")),
            block_matches(block, &request("/", &[("x", "foo")])),
            block_matches(block, &request("/", &[("x", "bar")])),
        ];
        assert_eq!(got, expected, "{block}");
    }
    // `regex: "*"` is only a presence check under withoutHeaders; under headers it is invalid.
    let e = invalid("- match: [{headers: {x: {regex: '*'}}}]\n  route: [{destination: {host: a}}]\n");
    assert_eq!(e.field(), "http[0].match[0]");
}

// === vector 7: weights ===

#[test]
fn v7_weights_25_75_pick_the_first_iff_r_mod_100_below_25() {
    let table = compile(
        r#"
- route:
  - {destination: {host: r, subset: a}, weight: 25}
  - {destination: {host: r, subset: b}, weight: 75}
"#,
    );
    let split = split(&table);
    assert_eq!(split.total_weight(), 100);
    for r in 0..200 {
        let expected = if r % 100 < 25 { "a" } else { "b" };
        assert_eq!(pick(split, r), expected, "r = {r}");
    }
    assert_eq!(pick(split, u64::MAX), if u64::MAX % 100 < 25 { "a" } else { "b" });
}

#[test]
fn v7_zero_weight_is_dropped_and_weights_need_not_sum_to_100() {
    let zero_five =
        compile("- route:\n  - {destination: {host: a}, weight: 0}\n  - {destination: {host: b}, weight: 5}\n");
    assert_eq!(split(&zero_five).targets().len(), 1);
    assert!((0..200).all(|r| pick(split(&zero_five), r) == "b"));

    let thirds = compile(
        r#"
- route:
  - {destination: {host: a}, weight: 1}
  - {destination: {host: b}, weight: 1}
  - {destination: {host: c}, weight: 1}
"#,
    );
    assert_eq!(split(&thirds).total_weight(), 3);
    for r in 0..30 {
        assert_eq!(pick(split(&thirds), r), ["a", "b", "c"][(r % 3) as usize]);
    }

    let one_three =
        compile("- route:\n  - {destination: {host: a}, weight: 1}\n  - {destination: {host: b}, weight: 3}\n");
    assert!((0..40).all(|r| (pick(split(&one_three), r) == "a") == (r % 4 == 0)));
}

#[test]
fn v7_omitted_weight_is_zero_with_several_destinations() {
    let t = compile("- route:\n  - destination: {host: a}\n  - {destination: {host: b}, weight: 100}\n");
    assert_eq!(split(&t).targets().len(), 1);
    assert!((0..100).all(|r| pick(split(&t), r) == "b"));
}

#[test]
fn v7_invalid_weights_name_the_field() {
    let all_zero =
        invalid("- route:\n  - {destination: {host: a}, weight: 0}\n  - {destination: {host: b}, weight: 0}\n");
    assert_eq!(all_zero.field(), "http[0].route");
    let all_omitted = invalid("- route:\n  - destination: {host: a}\n  - destination: {host: b}\n");
    assert_eq!(all_omitted.field(), "http[0].route");
    let negative =
        invalid("- route:\n  - {destination: {host: a}, weight: 10}\n  - {destination: {host: b}, weight: -1}\n");
    assert_eq!(negative.field(), "http[0].route[1].weight");
    assert!(negative.to_string().starts_with("http[0].route[1].weight: "), "{negative}");
    // The index is the route's position.
    let second = invalid(
        r#"
- route: [{destination: {host: a}}]
- route:
  - {destination: {host: a}, weight: 0}
  - {destination: {host: b}, weight: 0}
"#,
    );
    assert_eq!(second.field(), "http[1].route");
}

#[test]
fn v7_one_destination_ignores_its_weight() {
    for weight in ["30", "0", "100"] {
        let t = compile(&format!("- route:\n  - {{destination: {{host: only}}, weight: {weight}}}\n"));
        assert_eq!(split(&t).targets().len(), 1, "weight {weight}");
        assert!((0..100).all(|r| pick(split(&t), r) == "only"), "weight {weight}");
    }
}

// === statistical bars ===

const NINETY_TEN: &str = r#"
- name: split
  route:
  - {destination: {host: reviews, subset: v1}, weight: 90}
  - {destination: {host: reviews, subset: v2}, weight: 10}
"#;

fn subset_for(table: &RouteTable, req: &Request<()>) -> String {
    let (_, target) = table.decide(req).expect("a forwarding route");
    target.key().subset.as_deref().unwrap().to_owned()
}

#[test]
fn split_90_10_over_10000_requests_is_within_binomial_tolerance() {
    let table = compile(NINETY_TEN).with_random(Random::seeded(0x5eed));
    let n = 10_000;
    let v2 = (0..n).filter(|_| subset_for(&table, &get("/")) == "v2").count() as u64;
    // sd = sqrt(n p (1 - p)) = sqrt(10,000 · 0.1 · 0.9) = 30; 4.5 sd = 135.
    assert_binomial(v2, n, 0.1, "v2 share");
    assert!((865..=1135).contains(&v2), "{v2}");
}

/// 1,000 users, 10 requests each: every user stays on one subset, and the share of users on
/// v2 is binomial(1,000, 0.1): 100 ± 43 (sd = sqrt(1,000 · 0.1 · 0.9) ≈ 9.5).
fn assert_sticky(table: &RouteTable, user_request: impl Fn(usize) -> Request<()>) {
    let users = 1_000;
    let mut on_v2 = 0;
    for user in 0..users {
        let first = subset_for(table, &user_request(user));
        for _ in 1..10 {
            assert_eq!(subset_for(table, &user_request(user)), first, "user {user} moved");
        }
        on_v2 += u64::from(first == "v2");
    }
    assert_binomial(on_v2, users as u64, 0.1, "users on v2");
}

#[test]
fn sticky_split_by_header_keeps_each_user_on_one_destination() {
    let table = compile(NINETY_TEN)
        .with_random(Random::seeded(1))
        .with_split_key(SplitKey::Header(HeaderName::from_static("x-user")));
    assert_sticky(&table, |user| request("/", &[("x-user", format!("user-{user}").as_str())]));
    // Without the header each request is drawn afresh: both subsets show up.
    let subsets: std::collections::BTreeSet<String> = (0..1_000).map(|_| subset_for(&table, &get("/"))).collect();
    assert_eq!(subsets.len(), 2);
}

#[test]
fn sticky_split_by_cookie_keeps_each_user_on_one_destination() {
    let table = compile(NINETY_TEN).with_random(Random::seeded(2)).with_split_key(SplitKey::Cookie("session".into()));
    assert_sticky(&table, |user| request("/", &[("cookie", format!("theme=dark; session=s{user}; lang=en").as_str())]));
    // Only the named cookie counts: other cookies do not move the user.
    let a = subset_for(&table, &request("/", &[("cookie", "session=s42")]));
    let b = subset_for(&table, &request("/", &[("cookie", "x=1; session=s42; y=2")]));
    assert_eq!(a, b);
}

// === virtual hosts ===

fn host_table(extra_any: bool) -> RouteTable {
    let to = |name: &str| routes(&format!("- name: {name}\n  route: [{{destination: {{host: {name}}}}}]\n"));
    let mut hosts = vec![
        VirtualHostConfig::new("exact", vec!["reviews.example.com".into()], to("exact")),
        VirtualHostConfig::new("short", vec!["*.example.com".into()], to("short")),
        VirtualHostConfig::new("long", vec!["*.api.example.com".into(), "Mixed.Example.ORG".into()], to("long")),
    ];
    if extra_any {
        hosts.push(VirtualHostConfig::new("any", vec!["*".into()], to("any")));
    }
    RouteTable::new(&hosts, &RouteContext::default()).unwrap()
}

#[test]
fn virtual_host_by_authority() {
    let table = host_table(true);
    let host = |h: &str| matched(&table, &request("/", &[("host", h)]));
    assert_eq!(host("reviews.example.com").as_deref(), Some("exact"));
    assert_eq!(host("Reviews.EXAMPLE.com:8080").as_deref(), Some("exact"), "port stripped, case ignored");
    assert_eq!(host("reviews.example.com.").as_deref(), Some("exact"), "trailing dot");
    assert_eq!(host("mixed.example.org").as_deref(), Some("long"), "configured domains are case-insensitive");
    assert_eq!(host("v1.api.example.com").as_deref(), Some("long"), "longest suffix first");
    assert_eq!(host("ratings.example.com:443").as_deref(), Some("short"));
    assert_eq!(host("example.com").as_deref(), Some("any"), "a wildcard needs something before its suffix");
    assert_eq!(host("elsewhere.org").as_deref(), Some("any"));
    // HTTP/2 (and absolute-form) requests carry the authority in the URI; it wins over `Host`.
    let h2 = Request::get("https://V1.Api.Example.com:443/p")
        .version(Version::HTTP_2)
        .header("host", "reviews.example.com")
        .body(())
        .unwrap();
    assert_eq!(matched(&table, &h2).as_deref(), Some("long"));
    let h2_exact = Request::get("http://reviews.example.com/").version(Version::HTTP_2).body(()).unwrap();
    assert_eq!(matched(&table, &h2_exact).as_deref(), Some("exact"));
}

#[test]
fn unknown_authority_without_a_catch_all_host_is_404() {
    let table = host_table(false);
    assert_eq!(matched(&table, &request("/", &[("host", "elsewhere.org")])), None);
    assert_eq!(matched(&table, &get("/")), None, "no authority at all");
    assert_eq!(matched(&table, &request("/", &[("host", "reviews.example.com")])).as_deref(), Some("exact"));
}

#[test]
fn request_without_authority_goes_to_the_catch_all_host() {
    // `*` answers every authority, the missing one included, however many other hosts exist.
    let table = host_table(true);
    assert_eq!(matched(&table, &get("/")).as_deref(), Some("any"));
}

// === catch-alls, config-time filters, names ===

#[test]
fn catch_all_makes_later_routes_unreachable_and_says_so() {
    let table = RouteTable::new(
        &[VirtualHostConfig::new(
            "default/reviews",
            vec!["*".into()],
            routes(
                r#"
- name: canary
  match: [{headers: {x-canary: {exact: "true"}}}]
  route: [{destination: {host: reviews, subset: v2}}]
- name: everything
  match: [{uri: {prefix: /}}]
  route: [{destination: {host: reviews, subset: v1}}]
- name: too-late
  match: [{uri: {prefix: /late}}]
  route: [{destination: {host: reviews, subset: v3}}]
- name: also-too-late
  route: [{destination: {host: reviews, subset: v3}}]
"#,
            ),
        )],
        &RouteContext::default(),
    )
    .unwrap();
    assert_eq!(matched(&table, &request("/late", &[("x-canary", "true")])).as_deref(), Some("canary"));
    assert_eq!(matched(&table, &get("/late")).as_deref(), Some("everything"));
    let notes = table.notes().join("\n");
    assert!(notes.contains("http[2]") && notes.contains("http[3]"), "{notes}");
    assert!(notes.contains("default/reviews") && notes.contains("unreachable"), "{notes}");
    assert!(!notes.contains("http[1]"), "{notes}");
    // The dropped routes' destinations are not reachable either.
    assert!(table.destinations().iter().all(|k| k.subset.as_deref() != Some("v3")));
    // `regex: ".*"` and an empty block are catch-alls too; a header condition is not.
    for block in [r#"{uri: {regex: ".*"}}"#, "{}"] {
        let t = compile(&format!(
            "- match: [{block}]\n  route: [{{destination: {{host: a}}}}]\n- route: [{{destination: {{host: b}}}}]\n"
        ));
        assert_eq!(t.notes().len(), 1, "{block}");
    }
    let t = compile(
        r#"
- match: [{uri: {prefix: /}, headers: {x: {}}}]
  route: [{destination: {host: a}}]
- route: [{destination: {host: b}}]
"#,
    );
    assert!(t.notes().is_empty());
}

const FILTERED: &str = r#"
- name: filtered
  match:
  - name: m
    FIELD
  route: [{destination: {host: a}}]
- name: fallback
  route: [{destination: {host: b}}]
"#;

fn filtered_with(field: &str, context: &RouteContext) -> String {
    let routes = routes(&FILTERED.replace("FIELD", field));
    let table = RouteTable::new(&[VirtualHostConfig::new("vh", vec!["*".into()], routes)], context).unwrap();
    matched(&table, &get("/")).unwrap()
}

#[test]
fn port_filter_is_config_time() {
    let mut on = RouteContext::default();
    on.listener_port = Some(8080);
    let mut off = RouteContext::default();
    off.listener_port = Some(9090);
    assert_eq!(filtered_with("port: 8080", &on), "filtered.m");
    assert_eq!(filtered_with("port: 8080", &off), "fallback");
}

#[test]
fn source_labels_and_namespace_filters_are_config_time() {
    let mut web = RouteContext::default();
    web.labels.insert("app".into(), "web".into());
    web.labels.insert("version".into(), "v1".into());
    web.namespace = Some("prod".into());
    let mut api = RouteContext::default();
    api.labels.insert("app".into(), "api".into());
    api.namespace = Some("dev".into());

    assert_eq!(filtered_with("sourceLabels: {app: web}", &web), "filtered.m", "labels are a superset");
    assert_eq!(filtered_with("sourceLabels: {app: web, version: v1}", &web), "filtered.m");
    assert_eq!(filtered_with("sourceLabels: {app: web, version: v2}", &web), "fallback");
    assert_eq!(filtered_with("sourceLabels: {app: web}", &api), "fallback");
    assert_eq!(filtered_with("sourceLabels: {app: web}", &RouteContext::default()), "fallback");

    assert_eq!(filtered_with("sourceNamespace: prod", &web), "filtered.m");
    assert_eq!(filtered_with("sourceNamespace: prod", &api), "fallback");
    assert_eq!(filtered_with("sourceNamespace: prod", &RouteContext::default()), "fallback");
}

#[test]
fn gateways_filter_is_config_time() {
    let sidecar = RouteContext::default();
    assert_eq!(filtered_with("gateways: [istio-system/ingress]", &sidecar), "fallback");
    assert_eq!(filtered_with("gateways: [mesh]", &sidecar), "filtered.m");
    assert_eq!(filtered_with("gateways: [ingress, mesh]", &sidecar), "filtered.m");
    // With `gateways` set, `sourceLabels` is not consulted.
    assert_eq!(filtered_with("gateways: [mesh]\n    sourceLabels: {app: nobody}", &sidecar), "filtered.m");
}

#[test]
fn route_names_are_route_dot_match() {
    let table = compile(
        r#"
- name: reviews
  match:
  - name: canary
    headers: {x-canary: {exact: "true"}}
  - uri: {prefix: /beta}
  route: [{destination: {host: reviews, subset: v2, port: {number: 9080}}}]
- name: default
  route: [{destination: {host: reviews, subset: v1}}]
"#,
    );
    let canary = request("/", &[("x-canary", "true")]);
    assert_eq!(matched(&table, &canary).as_deref(), Some("reviews.canary"));
    assert_eq!(matched(&table, &get("/beta")).as_deref(), Some("reviews"));
    assert_eq!(matched(&table, &get("/")).as_deref(), Some("default"));
    let (route, block) = table.find(&canary).unwrap();
    let (_, target) = table.decide(&canary).unwrap();
    let decision = route.decision(block, target);
    assert_eq!(&*decision.route_name, "reviews.canary");
    assert_eq!(&*decision.destination_host, "reviews");
    assert_eq!(decision.subset.as_deref(), Some("v2"));
    assert_eq!(decision.port, Some(9080));
    assert_eq!(target.key().to_string(), "outbound|9080|v2|reviews");
}

// === rewrite ===

#[test]
fn rewrite_uri_replaces_the_matched_prefix_and_keeps_the_query() {
    let table = compile(
        r#"
- match: [{uri: {prefix: /api/v1}}]
  rewrite: {uri: /v2}
  route: [{destination: {host: a}}]
- match: [{uri: {exact: /login}}]
  rewrite: {uri: /auth/login}
  route: [{destination: {host: a}}]
- match: [{uri: {regex: "/users/[0-9]+"}}]
  rewrite: {uri: /user}
  route: [{destination: {host: a}}]
- match: [{uri: {prefix: /CASE}, ignoreUriCase: true}]
  rewrite: {uri: /case}
  route: [{destination: {host: a}}]
- match: [{headers: {x-no-uri: {}}}]
  rewrite: {uri: /base/}
  route: [{destination: {host: a}}]
"#,
    );
    let path = |req: Request<()>| {
        let req = prepared(&table, req);
        let original = req.headers().get(ORIGINAL_PATH).map(|v| v.to_str().unwrap().to_owned());
        (req.uri().path_and_query().unwrap().as_str().to_owned(), original)
    };
    // Prefix: the matched prefix is swapped; Envoy keeps the pre-rewrite `:path` (query
    // included) in x-envoy-original-path.
    assert_eq!(path(get("/api/v1/items?q=1")), ("/v2/items?q=1".into(), Some("/api/v1/items?q=1".into())));
    assert_eq!(path(get("/api/v1")), ("/v2".into(), Some("/api/v1".into())));
    // Exact and regex: the whole path is replaced, the query kept.
    assert_eq!(path(get("/login?next=/home")), ("/auth/login?next=/home".into(), Some("/login?next=/home".into())));
    assert_eq!(path(get("/users/42?x")).0, "/user?x");
    assert_eq!(path(get("/Case/Path")).0, "/case/Path");
    // No uri match is Envoy's `prefix: /`.
    assert_eq!(path(request("/foo/bar?x=1", &[("x-no-uri", "")])).0, "/base/foo/bar?x=1");
}

#[test]
fn rewrite_uri_regex_with_references() {
    let table = compile(
        r#"
- rewrite:
    uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: '\2/instance/\1'}
  route: [{destination: {host: a}}]
"#,
    );
    let req = prepared(&table, get("/service/foo/v1/api?x=1"));
    assert_eq!(req.uri().path_and_query().unwrap().as_str(), "/v1/api/instance/foo?x=1");
    assert_eq!(req.headers()[ORIGINAL_PATH], "/service/foo/v1/api?x=1");
    // No match: the path is left as it is.
    let req = prepared(&table, get("/other?x=1"));
    assert_eq!(req.uri().path_and_query().unwrap().as_str(), "/other?x=1");

    // Every non-overlapping match is replaced; `$` in the rewrite is a literal.
    let all =
        compile("- rewrite:\n    uriRegexRewrite: {match: 'a+', rewrite: '$-'}\n  route: [{destination: {host: a}}]\n");
    assert_eq!(prepared(&all, get("/aXaaY")).uri().path(), "/$-X$-Y");
}

#[test]
fn rewrite_authority_sets_host_and_the_http2_uri_authority() {
    let table = compile("- rewrite: {authority: 'reviews.internal:9080'}\n  route: [{destination: {host: a}}]\n");
    let h1 = prepared(&table, request("/p", &[("host", "reviews")]));
    assert_eq!(h1.headers()[HOST], "reviews.internal:9080");
    assert_eq!(h1.uri().authority(), None);
    let h2 = prepared(&table, Request::get("http://reviews/p?q").version(Version::HTTP_2).body(()).unwrap());
    assert_eq!(h2.uri().authority().unwrap().as_str(), "reviews.internal:9080");
    assert_eq!(h2.uri().path_and_query().unwrap().as_str(), "/p?q");
    assert_eq!(h2.headers()[HOST], "reviews.internal:9080");

    let e = invalid("- rewrite: {authority: 'not a host'}\n  route: [{destination: {host: a}}]\n");
    assert_eq!(e.field(), "http[0].rewrite.authority");
    let e = invalid("- rewrite: {}\n  route: [{destination: {host: a}}]\n");
    assert_eq!(e.field(), "http[0].rewrite");
    let e =
        invalid("- rewrite: {uri: /a, uriRegexRewrite: {match: x, rewrite: y}}\n  route: [{destination: {host: a}}]\n");
    assert_eq!(e.field(), "http[0].rewrite");
}

// === header operations ===

const HEADER_OPS: &str = r#"
- name: ops
  headers:
    request:
      set: {x-route: r}
      add: {x-multi: route}
      remove: [x-drop]
    response:
      set: {x-resp-route: r}
      remove: [server]
  route:
  - destination: {host: a}
    headers:
      request:
        set: {x-dest: d}
        add: {x-multi: dest}
      response:
        add: {x-resp-dest: d}
"#;

#[test]
fn header_operations_on_requests_at_route_and_destination_level() {
    let table = compile(HEADER_OPS);
    let req = prepared(&table, request("/", &[("x-drop", "1"), ("x-multi", "client"), ("x-route", "old")]));
    let headers = req.headers();
    assert!(!headers.contains_key("x-drop"));
    assert_eq!(values(headers, "x-route"), ["r"]);
    assert_eq!(values(headers, "x-dest"), ["d"]);
    // The destination's operations come first, then the route's.
    assert_eq!(values(headers, "x-multi"), ["client", "dest", "route"]);
}

#[test]
fn header_operations_on_responses_at_route_and_destination_level() {
    let table = compile(HEADER_OPS);
    let req = get("/");
    let (route, _) = table.find(&req).unwrap();
    let (_, target) = table.decide(&req).unwrap();
    assert!(route.has_response_ops(Some(target)));
    let mut headers = HeaderMap::new();
    headers.insert("server", "upstream".parse().unwrap());
    headers.insert("x-resp-dest", "upstream".parse().unwrap());
    route.prepare_response(Some(target), &mut headers);
    assert!(!headers.contains_key("server"));
    assert_eq!(values(&headers, "x-resp-route"), ["r"]);
    assert_eq!(values(&headers, "x-resp-dest"), ["upstream", "d"]);
}

#[test]
fn header_operations_run_remove_then_set_then_add() {
    let table = compile(
        r#"
- headers: {request: {set: {x-a: '1'}, add: {x-a: '2'}, remove: [x-a]}}
  route: [{destination: {host: a}}]
"#,
    );
    let req = prepared(&table, request("/", &[("x-a", "0")]));
    assert_eq!(values(req.headers(), "x-a"), ["1", "2"]);
}

#[test]
fn host_in_request_headers_becomes_the_authority() {
    let table = compile("- headers: {request: {set: {host: internal.example}}}\n  route: [{destination: {host: a}}]\n");
    let req = prepared(&table, request("/", &[("host", "public.example")]));
    assert_eq!(values(req.headers(), "host"), ["internal.example"]);
    let h2 = prepared(&table, Request::get("http://public.example/").version(Version::HTTP_2).body(()).unwrap());
    assert_eq!(h2.uri().authority().unwrap().as_str(), "internal.example");

    // `set` wins over `add`; the destination may rewrite it too.
    let both = compile(
        "- headers: {request: {set: {host: by-set}, add: {Host: by-add}}}\n  route: [{destination: {host: a}}]\n",
    );
    assert_eq!(prepared(&both, get("/")).headers()[HOST], "by-set");
    let dest =
        compile("- route:\n  - destination: {host: a}\n    headers: {request: {set: {':authority': per-dest}}}\n");
    assert_eq!(prepared(&dest, get("/")).headers()[HOST], "per-dest");

    // Rewriting the authority in two places is an error.
    let e = invalid(
        "- rewrite: {authority: x}\n  headers: {request: {set: {host: y}}}\n  route: [{destination: {host: a}}]\n",
    );
    assert_eq!(e.field(), "http[0].headers.request");
    // Pseudo-headers cannot be set; response authority cannot be rewritten.
    let e = invalid("- headers: {request: {set: {':path': /x}}}\n  route: [{destination: {host: a}}]\n");
    assert!(e.field().starts_with("http[0].headers.request.set"), "{e}");
    let e = invalid("- headers: {response: {set: {host: y}}}\n  route: [{destination: {host: a}}]\n");
    assert!(e.field().starts_with("http[0].headers.response.set"), "{e}");
}

// === redirect ===

fn redirect(yaml_redirect: &str, req: &Request<()>) -> (StatusCode, String) {
    let table = compile(&format!("- redirect: {yaml_redirect}\n"));
    let (route, _) = table.find(req).unwrap();
    let Action::Redirect(r) = route.action() else { panic!("a redirect") };
    assert!(table.decide(req).is_none(), "a redirect has no destination");
    let res = r.respond(req);
    assert!(res.body().is_empty());
    (res.status(), res.headers()[LOCATION].to_str().unwrap().to_owned())
}

#[test]
fn redirect_uri_defaults_to_301_and_keeps_the_query() {
    let req = request("/old?x=1", &[("host", "example.com:8080")]);
    assert_eq!(
        redirect("{uri: /new}", &req),
        (StatusCode::MOVED_PERMANENTLY, "http://example.com:8080/new?x=1".into())
    );
    // A query in `uri` replaces the request's.
    assert_eq!(redirect("{uri: '/new?y=2'}", &req).1, "http://example.com:8080/new?y=2");
    assert_eq!(redirect("{authority: new.example.com}", &req).1, "http://new.example.com/old?x=1");
    assert_eq!(redirect("{authority: 'new.example.com:9000'}", &req).1, "http://new.example.com:9000/old?x=1");
}

#[test]
fn redirect_codes() {
    let req = request("/", &[("host", "example.com")]);
    for (code, status) in [
        (301, StatusCode::MOVED_PERMANENTLY),
        (302, StatusCode::FOUND),
        (303, StatusCode::SEE_OTHER),
        (307, StatusCode::TEMPORARY_REDIRECT),
        (308, StatusCode::PERMANENT_REDIRECT),
    ] {
        assert_eq!(redirect(&format!("{{uri: /x, redirectCode: {code}}}"), &req).0, status);
    }
    for code in [300, 304, 200] {
        let e = invalid(&format!("- redirect: {{uri: /x, redirectCode: {code}}}\n"));
        assert_eq!(e.field(), "http[0].redirect.redirectCode");
    }
}

#[test]
fn redirect_scheme_and_ports() {
    // Changing the scheme drops the old scheme's default port.
    let req80 = request("/p?q=1", &[("host", "example.com:80")]);
    assert_eq!(redirect("{scheme: https}", &req80).1, "https://example.com/p?q=1");
    let req = request("/p?q=1", &[("host", "example.com:8443")]);
    assert_eq!(redirect("{scheme: https, derivePort: FROM_REQUEST_PORT}", &req).1, "https://example.com:8443/p?q=1");
    assert_eq!(redirect("{scheme: https, port: 9443}", &req).1, "https://example.com:9443/p?q=1");
    assert_eq!(redirect("{derivePort: FROM_PROTOCOL_DEFAULT}", &req).1, "http://example.com/p?q=1");
    // The protocol's default port is never written.
    assert_eq!(redirect("{scheme: https, port: 443}", &req).1, "https://example.com/p?q=1");
    assert_eq!(redirect("{port: 80}", &req).1, "http://example.com/p?q=1");
    // HTTP/2: scheme and authority come from the URI.
    let h2 = Request::get("https://example.com:8443/p").version(Version::HTTP_2).body(()).unwrap();
    assert_eq!(redirect("{uri: /q}", &h2).1, "https://example.com:8443/q");

    assert_eq!(invalid("- redirect: {scheme: ftp}\n").field(), "http[0].redirect.scheme");
    assert_eq!(invalid("- redirect: {port: 0}\n").field(), "http[0].redirect.port");
    assert_eq!(invalid("- redirect: {port: 1, derivePort: FROM_REQUEST_PORT}\n").field(), "http[0].redirect");
    assert_eq!(invalid("- redirect: {derivePort: SOMETIMES}\n").field(), "http[0].redirect.derivePort");
    assert_eq!(invalid("- redirect: {}\n").field(), "http[0].redirect");
}

// === direct response ===

fn direct(yaml: &str) -> (StatusCode, Vec<u8>) {
    let table = compile(&format!("- directResponse: {yaml}\n"));
    let Action::Direct(d) = first_route(&table).action() else { panic!("a direct response") };
    let res = d.respond();
    (res.status(), res.body().to_vec())
}

#[test]
fn direct_response_status_and_body() {
    assert_eq!(
        direct("{status: 503, body: {string: maintenance}}"),
        (StatusCode::SERVICE_UNAVAILABLE, b"maintenance".to_vec())
    );
    assert_eq!(direct("{status: 200, body: {bytes: aGVsbG8gd29ybGQ=}}"), (StatusCode::OK, b"hello world".to_vec()));
    assert_eq!(direct("{status: 204}"), (StatusCode::NO_CONTENT, Vec::new()));
    assert_eq!(direct("{status: 600}").0.as_u16(), 600);
    for status in [199, 601, 0, 70000] {
        let e = invalid(&format!("- directResponse: {{status: {status}}}\n"));
        assert_eq!(e.field(), "http[0].directResponse.status", "{status}");
    }
    assert_eq!(
        invalid("- directResponse: {status: 200, body: {bytes: '!!'}}\n").field(),
        "http[0].directResponse.body.bytes"
    );
    assert_eq!(
        invalid("- directResponse: {status: 200, body: {string: a, bytes: YQ==}}\n").field(),
        "http[0].directResponse.body"
    );
}

// === exclusive actions, timeout ===

#[test]
fn mutually_exclusive_actions_are_rejected_with_the_field_path() {
    let ok = "- route: [{destination: {host: a}}]\n";
    let cases = [
        "- route: [{destination: {host: a}}]\n  redirect: {uri: /x}\n",
        "- route: [{destination: {host: a}}]\n  directResponse: {status: 200}\n",
        "- redirect: {uri: /x}\n  directResponse: {status: 200}\n",
        "- name: nothing\n",
        "- redirect: {uri: /x}\n  rewrite: {uri: /y}\n",
        "- route: [{destination: {host: a}}]\n  mirror: {host: m}\n  mirrors: [{destination: {host: n}}]\n",
    ];
    for case in cases {
        // As the second route, so the index in the path is checked too.
        let e = invalid(&format!("{ok}{case}"));
        assert_eq!(e.field(), "http[1]", "{case}");
        assert!(!e.reason().is_empty());
    }
    assert_eq!(invalid("- route: [{destination: {host: ''}}]\n").field(), "http[0].route[0].destination.host");
    assert_eq!(
        invalid("- route: [{destination: {host: a, port: {number: 70000}}}]\n").field(),
        "http[0].route[0].destination.port.number"
    );
}

#[test]
fn timeouts_below_one_millisecond_are_rejected() {
    for t in ["500us", "0s", "999999ns"] {
        assert_eq!(
            invalid(&format!("- timeout: {t}\n  route: [{{destination: {{host: a}}}}]\n")).field(),
            "http[0].timeout",
            "{t}"
        );
    }
    let t = compile("- timeout: 1ms\n  route: [{destination: {host: a}}]\n");
    assert_eq!(first_route(&t).timeout(), Some(Duration::from_millis(1)));
    let t = compile("- timeout: 1.5s\n  route: [{destination: {host: a}}]\n");
    assert_eq!(first_route(&t).timeout(), Some(Duration::from_millis(1500)));
    let t = compile("- route: [{destination: {host: a}}]\n");
    assert_eq!(first_route(&t).timeout(), None, "unset is no timeout (Istio's default)");
}

// === mirroring ===

fn mirrored(yaml: &str, n: u64, seed: u64) -> u64 {
    let table = compile(yaml);
    let random = Random::seeded(seed);
    (0..n).map(|_| first_route(&table).mirrors_for(&random).count() as u64).sum()
}

#[test]
fn mirror_percentage_0_never_100_always_50_about_half() {
    let with = |pct: &str| format!("- route: [{{destination: {{host: a}}}}]\n  mirror: {{host: shadow}}\n{pct}");
    let n = 10_000;
    assert_eq!(mirrored(&with("  mirrorPercentage: {value: 0}\n"), n, 1), 0);
    assert_eq!(mirrored(&with("  mirrorPercentage: {value: 100}\n"), n, 2), n);
    assert_eq!(mirrored(&with(""), n, 3), n, "unset is 100 %");
    // sd = sqrt(10,000 · 0.5 · 0.5) = 50; 4.5 sd = 225.
    assert_binomial(mirrored(&with("  mirrorPercentage: {value: 50}\n"), n, 4), n, 0.5, "mirrored at 50 %");
    assert_binomial(mirrored(&with("  mirrorPercentage: {value: 0.5}\n"), n, 5), n, 0.005, "mirrored at 0.5 %");

    // Several mirrors, each with its own percentage.
    let table = compile(
        r#"
- route: [{destination: {host: a}}]
  mirrors:
  - {destination: {host: always}, percentage: {value: 100}}
  - {destination: {host: never}, percentage: {value: 0}}
"#,
    );
    let random = Random::seeded(6);
    for _ in 0..1_000 {
        let hosts: Vec<&str> = first_route(&table).mirrors_for(&random).map(|k| &*k.host).collect();
        assert_eq!(hosts, ["always"]);
    }
    let all: Vec<String> = table.destinations().iter().map(|k| k.host.to_string()).collect();
    assert_eq!(all, ["a", "always", "never"]);
}

#[test]
fn port_matches_the_request_port_when_no_listener_port_is_given() {
    // One outbound listener for every service port (mesh-proxy's): a block's `port` is the
    // port the request was sent to, from its authority (or the scheme's default).
    let spec: VirtualServiceSpec = yaml_serde::from_str(
        r#"
hosts: [reviews]
http:
- match: [{port: 9080}]
  route: [{destination: {host: reviews, subset: v1}}]
- match: [{port: 9090}]
  route: [{destination: {host: reviews, subset: v2}}]
"#,
    )
    .unwrap();
    let table = RouteTable::from_routes(&spec.http).unwrap();
    assert!(table.notes().is_empty(), "a block with a port is not a catch-all: {:?}", table.notes());
    let subset = |host: &str| {
        let req = http::Request::get("/").header("host", host).body(()).unwrap();
        table.decide(&req).and_then(|(_, t)| t.key().subset.as_deref().map(str::to_owned))
    };
    assert_eq!(subset("reviews:9080").as_deref(), Some("v1"));
    assert_eq!(subset("reviews:9090").as_deref(), Some("v2"));
    assert_eq!(subset("reviews"), None, "port 80 matches neither");
    let h2 = http::Request::get("http://reviews:9090/").version(http::Version::HTTP_2).body(()).unwrap();
    assert_eq!(table.decide(&h2).and_then(|(_, t)| t.key().subset.clone()).as_deref(), Some("v2"));
}
