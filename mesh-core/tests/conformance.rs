//! SEMANTICS.md Appendix A, vectors 1–6 (matching) and 31 (identity).

use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use mesh_core::SpiffeId;
use mesh_core::identity::{InvalidSpiffeId, InvalidSvid, LeafSvid};
use mesh_core::matching::{HeaderMatch, HttpMatch, HttpMatchRequest, StringMatch, StringMatcher, UriMatch};

fn uri_match(m: StringMatch, ignore_case: bool) -> UriMatch {
    UriMatch::new(&m, ignore_case).expect("valid uri match")
}

fn hits(m: &UriMatch, path: &str) -> bool {
    m.matches(&path.parse::<Uri>().expect("valid uri"))
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    map
}

fn block(f: impl FnOnce(&mut HttpMatchRequest)) -> HttpMatch {
    let mut config = HttpMatchRequest::default();
    f(&mut config);
    HttpMatch::new(&config).expect("valid block")
}

fn request(path: &str, pairs: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::get(path);
    for (k, v) in pairs {
        builder = builder.header(*k, *v);
    }
    builder.body(()).unwrap()
}

// === vector 1: uri prefix / exact / regex ===

#[test]
fn v1_uri_prefix_includes_query() {
    let m = uri_match(StringMatch::Prefix("/api".into()), false);
    assert!(hits(&m, "/api"));
    assert!(hits(&m, "/apix"));
    assert!(hits(&m, "/api/v1?x=1"));
    assert!(!hits(&m, "/ap"));
    assert!(!hits(&m, "/v1/api"));
}

#[test]
fn v1_uri_exact_ignores_query() {
    let m = uri_match(StringMatch::Exact("/api".into()), false);
    assert!(hits(&m, "/api?x=1"));
    assert!(hits(&m, "/api"));
    assert!(!hits(&m, "/api/"));
}

#[test]
fn v1_uri_regex_is_full_match_on_path() {
    let m = uri_match(StringMatch::Regex("/api/[0-9]+".into()), false);
    assert!(hits(&m, "/api/12?q"));
    assert!(!hits(&m, "/api/12/x"));
    assert!(!hits(&m, "/x/api/12"));
}

#[test]
fn v1_prefix_on_query_string_boundary() {
    // The prefix is compared against the path *with* its query.
    let m = uri_match(StringMatch::Prefix("/api?x".into()), false);
    assert!(hits(&m, "/api?x=1"));
    assert!(!hits(&m, "/api"));
}

// === vector 2: ignoreUriCase ===

#[test]
fn v2_ignore_uri_case_affects_exact_and_prefix_not_regex() {
    assert!(hits(&uri_match(StringMatch::Exact("/Foo".into()), true), "/fOO"));
    assert!(hits(&uri_match(StringMatch::Prefix("/Foo".into()), true), "/fOO/bar"));
    assert!(!hits(&uri_match(StringMatch::Exact("/Foo".into()), false), "/fOO"));
    assert!(!hits(&uri_match(StringMatch::Regex("/Foo".into()), true), "/fOO"));
    assert!(hits(&uri_match(StringMatch::Regex("(?i)/Foo".into()), false), "/fOO"));
}

// === vector 3: Istio's cookie idiom ===

#[test]
fn v3_cookie_regex_idiom() {
    let m = HeaderMatch::new("cookie", &StringMatch::Regex("^(.*?;)?(user=jason)(;.*)?$".into())).unwrap();
    let check = |cookie: &str| m.matches(&headers(&[("cookie", cookie)]));
    assert!(check("user=jason"));
    assert!(check("a=b;user=jason"));
    assert!(!check("a=b; user=jason"));
    assert!(check("user=jason; a=b"));
    assert!(!check("user=jasonx"));
    assert!(!m.matches(&HeaderMap::new()));
}

#[test]
fn v3_robust_cookie_pattern_and_structured_cookie_match() {
    let robust = HeaderMatch::new("cookie", &StringMatch::Regex(r"^(.*?;\s*)?(user=jason)(;.*)?$".into())).unwrap();
    assert!(robust.matches(&headers(&[("cookie", "a=b; user=jason")])));

    let by_name = mesh_core::matching::CookieMatch::new("user", &StringMatch::Exact("jason".into())).unwrap();
    for (cookie, expected) in [
        ("user=jason", true),
        ("a=b;user=jason", true),
        ("a=b; user=jason", true),
        ("user=jason; a=b", true),
        ("user=jasonx", false),
        ("xuser=jason", false),
    ] {
        assert_eq!(by_name.matches(&headers(&[("cookie", cookie)])), expected, "{cookie}");
    }
    // HTTP/2 crumbs: one cookie per header line.
    assert!(by_name.matches(&headers(&[("cookie", "a=b"), ("cookie", "user=jason")])));
    assert!(!by_name.matches(&HeaderMap::new()));
    assert!(by_name.clone().inverted().matches(&HeaderMap::new()));
    // The first cookie with the name counts.
    assert!(!by_name.matches(&headers(&[("cookie", "user=bob; user=jason")])));
}

/// HTTP/2 cookie crumbs reach Istio's cookie regex joined with `"; "`, as Envoy's HTTP/2 codec
/// joins them (SEMANTICS.md 1.7, RFC 9113 section 8.2.3); an HTTP/1.1 request's repeated
/// `cookie` lines are an ordinary repeated header, joined with `,` (1.6).
#[test]
fn v3_http2_cookie_crumbs_are_joined_with_semicolons() {
    let jason = block(|b| {
        b.headers.insert("cookie".into(), StringMatch::Regex(r"^(.*?;\s*)?(user=jason)(;.*)?$".into()));
    });
    let crumbs = |version| {
        let mut req = request("/", &[("cookie", "a=b"), ("cookie", "user=jason")]);
        *req.version_mut() = version;
        req
    };
    assert!(jason.matches_request(&crumbs(http::Version::HTTP_2)));
    assert!(!jason.matches_request(&crumbs(http::Version::HTTP_11)), "a=b,user=jason has no `;`");
    // One cookie header, or one crumb, is left as it is.
    assert!(jason.matches_request(&request("/", &[("cookie", "a=b; user=jason")])));
    let mut single = request("/", &[("cookie", "user=jason")]);
    *single.version_mut() = http::Version::HTTP_2;
    assert!(jason.matches_request(&single));
}

// === vector 4: OR across blocks, AND inside one ===

#[test]
fn v4_blocks_or_and() {
    let blocks = [
        block(|c| c.uri = Some(StringMatch::Prefix("/a".into()))),
        block(|c| {
            c.headers.insert("x".into(), StringMatch::Exact("1".into()));
        }),
    ];
    let any = |req: &Request<()>| blocks.iter().any(|b| b.matches_request(req));
    assert!(any(&request("/a", &[])));
    assert!(any(&request("/b", &[("x", "1")])));
    assert!(!any(&request("/b", &[])));

    let both = block(|c| {
        c.uri = Some(StringMatch::Prefix("/a".into()));
        c.headers.insert("x".into(), StringMatch::Exact("1".into()));
    });
    assert!(both.matches_request(&request("/a", &[("x", "1")])));
    assert!(!both.matches_request(&request("/a", &[])));
    assert!(!both.matches_request(&request("/b", &[("x", "1")])));
}

// === vector 5: multi-value headers joined with "," ===

#[test]
fn v5_multi_value_headers_are_joined() {
    let h = headers(&[("x", "1"), ("x", "2")]);
    assert!(!HeaderMatch::new("x", &StringMatch::Exact("1".into())).unwrap().matches(&h));
    assert!(HeaderMatch::new("x", &StringMatch::Regex("1,2".into())).unwrap().matches(&h));
    assert!(HeaderMatch::new("x", &StringMatch::Exact("1,2".into())).unwrap().matches(&h));
}

// === vector 6: the withoutHeaders table of section 1.6 ===

#[test]
fn v6_absent_header_and_without_headers_table() {
    let absent = HeaderMap::new();
    let foo = headers(&[("x", "foo")]);
    let bar = headers(&[("x", "bar")]);
    let exact = StringMatch::Exact("foo".into());
    // (matcher, absent, foo, bar)
    let rows = [
        (HeaderMatch::new("x", &exact).unwrap(), false, true, false),
        (HeaderMatch::new("x", &StringMatch::Present).unwrap(), false, true, true),
        (HeaderMatch::without("x", &exact).unwrap(), true, false, true),
        (HeaderMatch::without("x", &StringMatch::Present).unwrap(), true, false, false),
        (HeaderMatch::without("x", &StringMatch::Regex("*".into())).unwrap(), true, false, false),
    ];
    for (i, (m, a, f, b)) in rows.iter().enumerate() {
        assert_eq!(m.matches(&absent), *a, "row {i}, absent");
        assert_eq!(m.matches(&foo), *f, "row {i}, foo");
        assert_eq!(m.matches(&bar), *b, "row {i}, bar");
    }
    // `regex: "*"` is only a presence check under withoutHeaders; under headers it is invalid.
    assert!(HeaderMatch::new("x", &StringMatch::Regex("*".into())).is_err());
    // An absent header never matches `headers`, even a regex that accepts "".
    assert!(!HeaderMatch::new("x", &StringMatch::Regex(".*".into())).unwrap().matches(&absent));
    // Under withoutHeaders, an absent header is "", so a match on "" fails the block.
    assert!(!HeaderMatch::without("x", &StringMatch::Regex(".*".into())).unwrap().matches(&absent));
}

// === the regex dialect is RE2's (SEMANTICS 1.4) ===

fn re(pattern: &str) -> StringMatcher {
    StringMatcher::new("f", &StringMatch::Regex(pattern.into())).unwrap()
}

#[test]
fn re2_perl_classes_and_word_boundaries_are_ascii() {
    // Unicode digits, letters and spaces are not `\d`, `\w`, `\s` in RE2.
    assert!(re(r"\d+").matches(b"123"));
    assert!(!re(r"\d+").matches("١٢٣".as_bytes()), "ARABIC-INDIC digits");
    assert!(re(r"\D+").matches("١٢٣".as_bytes()));
    assert!(re(r"\w+").matches(b"user_42"));
    assert!(!re(r"\w+").matches("José".as_bytes()));
    assert!(!re(r"a\sb").matches("a\u{a0}b".as_bytes()), "NO-BREAK SPACE");
    assert!(!re(r"a\sb").matches(b"a\x0Bb"), "RE2's \\s has no vertical tab");
    assert!(re(r"a\sb").matches(b"a\tb"));
    assert!(re(r"a\Sb").matches("a\u{a0}b".as_bytes()));
    // Inside brackets too, plain and negated.
    assert!(re(r"[\d.]+").matches(b"10.0.0.1"));
    assert!(!re(r"[\d.]+").matches("١.٢".as_bytes()));
    assert!(re(r"[^\d]+").matches("١٢".as_bytes()));
    assert!(re(r"[\D]+").matches("١٢".as_bytes()));
    assert!(!re(r"[\D]+").matches(b"12"));
    assert!(re(r"[\w-]+").matches(b"my-host_1"));
    assert!(!re(r"[\w-]+").matches("hôte".as_bytes()));
    // `\b` is an ASCII word boundary: `é` is not a word character, so `foo` stands alone.
    assert!(re(r".*\bfoo\b.*").matches("éfooé".as_bytes()));
    assert!(!re(r".*\bfoo\b.*").matches(b"xfoox"));
    assert!(re(r".*\Bfoo\B.*").matches(b"xfoox"));
    // An escaped backslash is not the start of a class.
    assert!(re(r"a\\d").matches(b"a\\d"));
    assert!(!re(r"a\\d").matches(b"a\\1"));
}

#[test]
fn re2_brackets_do_not_nest_or_combine() {
    // `[` inside brackets is a literal in RE2; the `regex` crate would start a nested class.
    assert!(re(r"[[]+").matches(b"[["));
    assert!(re(r"[a[]+").matches(b"a[a"));
    // No set operations: `&&`, `~~` are literal characters.
    assert!(re(r"[a&&b]+").matches(b"a&b"));
    assert!(re(r"[x~~y]+").matches(b"x~y"));
    // A `]` first in the class is a member; POSIX classes still work.
    assert!(re(r"[]a]+").matches(b"]a]"));
    assert!(re(r"[^]a]+").matches(b"bc"));
    assert!(re(r"[[:alpha:]]+").matches(b"abc"));
    assert!(!re(r"[[:alpha:]]+").matches(b"ab1"));
    assert!(re(r"[[:^alpha:][:digit:]]+").matches(b"1-2"));
    // Unicode classes by name are RE2 too.
    assert!(re(r"\p{Greek}+").matches("αβγ".as_bytes()));
}

/// From a review of the first rewrite: RE2 patterns whose meaning the `regex` crate's
/// syntax would change.
#[test]
fn re2_escapes_ranges_and_flags() {
    // An escaped punctuation character is itself (the `regex` crate reads `\<` `\>` as word
    // boundaries).
    assert!(re(r#"\<https://api\.x/.*\>; rel="next""#).matches(br#"<https://api.x/p>; rel="next""#));
    assert!(re(r"[\<>]+").matches(b"<>"));
    // `-` after a Perl class is a member, not a range operator.
    assert!(re(r"[\s-x]+").matches(b" -x"));
    assert!(!re(r"[\s-x]+").matches(b"DROP"));
    assert!(re(r"[\w-~]+").matches(b"a-~"));
    assert!(!re(r"[\w-~]+").matches(b"a|b"));
    assert!(re(r"[\w-.]+").matches(b"a-b.c"));
    // `--` is a range, never a set difference.
    assert!(re(r"[0-9--/]+").matches(b"2024-01/01"));
    assert!(re(r"[--/]+").matches(b"-./"));
    assert!(re(r"[a-z--]+").matches(b"a-b"));
    // `[:` without its `:]` is a `[` and a `:`; the rest of the pattern is not swallowed.
    assert!(re(r"[[:a][\d]]").matches(b"a7]"));
    assert!(!re(r"[[:a][\d]]").matches("a٣]".as_bytes()));
    // RE2-only forms.
    assert!(re(r"\101\012").matches(b"A\n"), "octal");
    assert!(re(r"\Qa.b*\E+").matches(b"a.b**"));
    assert!(!re(r"\Qa.b\E").matches(b"axb"));
    assert!(re(r"\p{^Greek}+").matches(b"abc"));
    assert!(!re(r"\p{^Greek}+").matches("αβ".as_bytes()));
    assert!(re(r"a{,2}").matches(b"a{,2}"), "not a repetition: literal");
    assert!(re(r"a{2}").matches(b"aa"));
    assert!(re(r"(?i)ab(?U:c+)(?P<n>d)").matches(b"ABccD"));
    // After `\b` a `{` is a repetition or a literal, as anywhere else in RE2 (the `regex`
    // crate would read `\b{start}` as one assertion of its own).
    assert!(re(r"a\b{2}").matches(b"a"));
    assert!(re(r"a\b{start}").matches(b"a{start}"));
    assert!(!re(r"a\b{start}").matches(b"a"));
    assert!(re(r"a\B{1,}b").matches(b"ab"));
    // Refused as RE2 refuses them, with the field named. RE2 knows `\E` only as the end of
    // a `\Q` quote.
    for bad in [r"(?x)a b", r"a\1", r"[[:foo:]]", r"[a", r"a\", r"a\E"] {
        let err = StringMatcher::new("headers.x", &StringMatch::Regex(bad.into())).unwrap_err().to_string();
        assert!(err.starts_with("headers.x: invalid regex"), "{bad}: {err}");
    }
}

// === other match fields ===

#[test]
fn query_params_first_value_no_decoding() {
    let b = block(|c| {
        c.query_params.insert("debug".into(), StringMatch::Exact("".into()));
        c.query_params.insert("v".into(), StringMatch::Exact("a%20b".into()));
    });
    assert!(b.matches_request(&request("/?debug&v=a%20b", &[])));
    assert!(b.matches_request(&request("/?v=a%20b&debug=", &[])));
    assert!(!b.matches_request(&request("/?debug&v=x&v=a%20b", &[])), "only the first value counts");
    assert!(!b.matches_request(&request("/?v=a%20b", &[])), "absent key never matches");
}

#[test]
fn method_authority_scheme() {
    let b = block(|c| {
        c.method = Some(StringMatch::Exact("POST".into()));
        c.authority = Some(StringMatch::Suffix(".svc.cluster.local".into()));
        c.scheme = Some(StringMatch::Exact("http".into()));
    });
    let mut req = Request::post("/").header("host", "reviews.default.svc.cluster.local").body(()).unwrap();
    assert!(b.matches_request(&req));
    *req.method_mut() = Method::GET;
    assert!(!b.matches_request(&req));
    // HTTP/2-style absolute URI: the authority comes from the URI.
    let req = Request::post("https://ratings.default.svc.cluster.local/x").body(()).unwrap();
    assert!(!b.matches_request(&req), "scheme is https");
}

#[test]
fn invalid_config_names_the_field() {
    let mut config = HttpMatchRequest::default();
    config.headers.insert("x-user".into(), StringMatch::Regex("(".into()));
    let err = HttpMatch::new(&config).unwrap_err().to_string();
    assert!(err.starts_with("headers.x-user: invalid regex"), "{err}");

    let mut config = HttpMatchRequest::default();
    config.headers.insert("X-User".into(), StringMatch::Present);
    assert!(HttpMatch::new(&config).unwrap_err().to_string().contains("lowercase"));

    let mut config = HttpMatchRequest::default();
    config.headers.insert("x".into(), StringMatch::Prefix("".into()));
    assert!(HttpMatch::new(&config).unwrap_err().to_string().contains("empty prefix"));
    // ...but an empty uri prefix is fine.
    let b = block(|c| c.uri = Some(StringMatch::Prefix("".into())));
    assert!(b.matches_request(&request("/anything", &[])));

    let long = "a".repeat(1025);
    assert!(UriMatch::new(&StringMatch::Regex(long), false).unwrap_err().to_string().contains("1025 characters"));
    assert!(UriMatch::new(&StringMatch::Regex(String::new()), false).is_err());
}

#[test]
fn jwt_claim_keys_are_refused_by_name() {
    for section in ["headers", "withoutHeaders"] {
        for key in ["@request.auth.claims.groups", "@request.auth.claims[nested][key]"] {
            let mut config = HttpMatchRequest::default();
            let map = if section == "headers" { &mut config.headers } else { &mut config.without_headers };
            map.insert(key.into(), StringMatch::Exact("admin".into()));
            let err = HttpMatch::new(&config).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("{section}.{key}: matching JWT claims needs RequestAuthentication, which is not supported yet")
            );
        }
    }
}

/// `headers` keys naming a pseudo-header's field match a header of that literal name, as
/// Istio's translation does (its documentation calls them ignored); dropping them would make
/// a block with nothing else a catch-all. A loader can list them to warn.
#[test]
fn pseudo_header_keys_under_headers_match_literal_headers() {
    let mut config = HttpMatchRequest::default();
    config.headers.insert("authority".into(), StringMatch::Exact("admin".into()));
    let b = HttpMatch::new(&config).unwrap();
    assert!(!b.is_catch_all());
    assert!(!b.matches_request(&request("/", &[("host", "admin")])));
    assert!(b.matches_request(&request("/", &[("authority", "admin")])));
    config.headers.insert("uri".into(), StringMatch::Present);
    config.headers.insert("x-team".into(), StringMatch::Present);
    assert_eq!(config.pseudo_header_keys().collect::<Vec<_>>(), ["authority", "uri"]);
}

/// SEMANTICS 1.5: a catch-all is a path match of `prefix: "/"` or `regex: ".*"` (or none) with
/// no header or query-parameter conditions.
#[test]
fn catch_all_blocks() {
    let catch_all = |f: fn(&mut HttpMatchRequest)| block(f).is_catch_all();
    assert!(catch_all(|_| {}));
    assert!(catch_all(|c| c.uri = Some(StringMatch::Prefix("/".into()))));
    assert!(catch_all(|c| c.uri = Some(StringMatch::Regex(".*".into()))));
    assert!(catch_all(|c| {
        c.uri = Some(StringMatch::Prefix("/".into()));
        c.ignore_uri_case = true;
    }));
    assert!(!catch_all(|c| c.uri = Some(StringMatch::Prefix("/api".into()))));
    assert!(!catch_all(|c| c.uri = Some(StringMatch::Exact("/".into()))));
    assert!(!catch_all(|c| {
        c.uri = Some(StringMatch::Prefix("/".into()));
        c.headers.insert("x".into(), StringMatch::Present);
    }));
    assert!(!catch_all(|c| c.method = Some(StringMatch::Exact("GET".into()))));
    assert!(!catch_all(|c| {
        c.query_params.insert("q".into(), StringMatch::Present);
    }));
    assert!(HttpMatch::any().is_catch_all());
}

#[test]
fn deserializes_istio_yaml_shapes_from_json() {
    let config: HttpMatchRequest = serde_json::from_str(
        r#"{"uri": {"prefix": "/api"}, "headers": {"end-user": {"exact": "jason"}, "x-present": {}},
            "withoutHeaders": {"x-debug": {"regex": "*"}}, "ignoreUriCase": true, "port": 9080}"#,
    )
    .unwrap();
    assert_eq!(config.uri, Some(StringMatch::Prefix("/api".into())));
    assert_eq!(config.headers["x-present"], StringMatch::Present);
    assert_eq!(config.port, Some(9080));
    let b = HttpMatch::new(&config).unwrap();
    assert!(b.matches_request(&request("/API/x", &[("end-user", "jason"), ("x-present", "")])));
    assert!(!b.matches_request(&request("/API/x", &[("end-user", "jason"), ("x-present", ""), ("x-debug", "1")])));

    let both: Result<StringMatch, _> = serde_json::from_str(r#"{"exact": "a", "prefix": "b"}"#);
    assert!(both.unwrap_err().to_string().contains("only one of"));
    let unknown: Result<StringMatch, _> = serde_json::from_str(r#"{"exactly": "a"}"#);
    assert!(unknown.is_err());
}

// === vector 31: SPIFFE IDs and leaf SVIDs ===

#[test]
fn v31_spiffe_ids() {
    use InvalidSpiffeId::*;
    let cases: &[(&str, Result<(), InvalidSpiffeId>)] = &[
        ("spiffe://Example.org/a", Err(UppercaseTrustDomain('E'))),
        ("spiffe://example.org/", Err(EmptySegment)),
        ("spiffe://example.org/a//b", Err(EmptySegment)),
        ("spiffe://example.org/a/./b", Err(DotSegment)),
        ("spiffe://example.org/a/../b", Err(DotSegment)),
        ("spiffe://example.org:8080/a", Err(Port)),
        ("spiffe://example.org/a%20b", Err(PercentEncoded)),
        ("spiffe://user@example.org/a", Err(Userinfo)),
        ("spiffe://example.org/a?x=1", Err(Query)),
        ("spiffe://example.org/a#f", Err(Fragment)),
        ("spiffe:///a", Err(EmptyTrustDomain)),
        ("https://example.org/a", Err(Scheme)),
        ("spiffe://example.org/a b", Err(PathChar(' '))),
        ("spiffe://example.org/ns/x/sa/y", Ok(())),
        ("spiffe://example.org", Ok(())),
        ("spiffe://1.2.3.4/a", Ok(())),
        ("spiffe://my_td-1.example/Path.With-Mixed_Case", Ok(())),
    ];
    for (input, expected) in cases {
        assert_eq!(SpiffeId::parse(input).map(|_| ()), *expected, "{input}");
    }
    let max = format!("spiffe://example.org/{}", "a".repeat(2048 - "spiffe://example.org/".len()));
    assert!(SpiffeId::parse(&max).is_ok());
    assert_eq!(SpiffeId::parse(&format!("{max}a")).unwrap_err(), TooLong);
}

#[test]
fn v31_istio_principals() {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/foo").unwrap();
    assert_eq!(id.principal(), "cluster.local/ns/default/sa/foo");
    assert_eq!(SpiffeId::from_principal("cluster.local/ns/default/sa/foo").unwrap(), id);
    assert_eq!(id.namespace(), Some("default"));
    let istio = id.istio().unwrap();
    assert_eq!((istio.trust_domain, istio.namespace, istio.service_account), ("cluster.local", "default", "foo"));
    assert!(SpiffeId::parse("spiffe://cluster.local/ns/default/sa/foo/extra").unwrap().istio().is_none());
    let td = "cluster.local".parse().unwrap();
    assert_eq!(SpiffeId::for_service_account(&td, "default", "foo").unwrap(), id);
}

#[test]
fn v31_leaf_svids() {
    let leaf = |uris: &[&str], is_ca: bool| {
        let uris: Vec<&str> = uris.to_vec();
        LeafSvid { uri_sans: &uris, is_ca, key_cert_sign: false, crl_sign: false }.validate()
    };
    assert_eq!(leaf(&["spiffe://example.org/ns/x/sa/y"], false).unwrap().as_str(), "spiffe://example.org/ns/x/sa/y");
    assert_eq!(
        leaf(&["spiffe://example.org/a", "spiffe://example.org/b"], false).unwrap_err(),
        InvalidSvid::SeveralUriSans(2)
    );
    assert_eq!(leaf(&["spiffe://example.org/a"], true).unwrap_err(), InvalidSvid::Ca);
    assert_eq!(leaf(&["spiffe://example.org"], false).unwrap_err(), InvalidSvid::RootId);
    assert_eq!(leaf(&[], false).unwrap_err(), InvalidSvid::NoUriSan);
    let uris = ["spiffe://example.org/a"];
    let signing = LeafSvid { uri_sans: &uris, is_ca: false, key_cert_sign: true, crl_sign: false };
    assert_eq!(signing.validate().unwrap_err(), InvalidSvid::SigningKeyUsage);
}

#[test]
fn percent_shapes() {
    use mesh_core::config::Percent;
    let read = |json: &str| serde_json::from_str::<Percent>(json).map(Percent::value).map_err(|e| e.to_string());
    assert_eq!(read("12.5"), Ok(12.5));
    assert_eq!(read("100"), Ok(100.0));
    assert_eq!(read(r#"{"value": 0.1}"#), Ok(0.1));
    assert_eq!(read("{}"), Ok(0.0), "an unset proto3 value is 0");
    assert!(read(r#"{"value": 100.5}"#).is_err());
    assert!(read("-1").is_err());
    assert!(read(r#""12""#).is_err());
    let typo = read(r#"{"valeu": 5}"#).unwrap_err();
    assert!(typo.contains("unknown field `valeu`"), "{typo}");
    let json = serde_json::to_string(&Percent::new(12.5).unwrap()).unwrap();
    assert_eq!(json, r#"{"value":12.5}"#);
}
