//! Property tests: invariants of the matchers and parsers over generated input.

use http::{HeaderMap, HeaderValue};
use mesh_core::config::Duration;
use mesh_core::matching::{HeaderMatch, StringMatch, StringMatcher};
use mesh_core::{ResponseFlags, SpiffeId};
use proptest::prelude::*;

fn value() -> impl Strategy<Value = String> {
    "[ -~]{0,24}" // visible ASCII and space: valid header values
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// An exact match is a regex full match of the escaped literal, and a prefix match is the
    /// escaped literal followed by anything.
    #[test]
    fn literal_matchers_agree_with_escaped_regexes(pattern in value(), input in value()) {
        let exact = StringMatcher::new("f", &StringMatch::Exact(pattern.clone())).unwrap();
        let as_regex = StringMatcher::new("f", &StringMatch::Regex(regex::escape(&pattern))).map(Some).unwrap_or(None);
        if let Some(re) = as_regex {
            prop_assert_eq!(exact.matches(input.as_bytes()), re.matches(input.as_bytes()));
        }
        let prefix = StringMatcher::new("f", &StringMatch::Prefix(pattern.clone())).unwrap();
        let prefix_re = StringMatcher::new("f", &StringMatch::Regex(format!("{}(?s:.*)", regex::escape(&pattern)))).unwrap();
        prop_assert_eq!(prefix.matches(input.as_bytes()), prefix_re.matches(input.as_bytes()));
        // Every value matches itself exactly, as a prefix and as a suffix.
        prop_assert!(exact.matches(pattern.as_bytes()));
        let suffix = StringMatcher::new("f", &StringMatch::Suffix(pattern.clone())).unwrap();
        let combined = format!("{input}{pattern}");
        prop_assert!(suffix.matches(combined.as_bytes()));
    }

    /// A regex is never a substring search: `re` and `^(?:re)$` behave alike.
    #[test]
    fn regex_is_full_match(input in "[a-c0-9]{0,12}") {
        let m = StringMatcher::new("f", &StringMatch::Regex("[0-9]+".into())).unwrap();
        prop_assert_eq!(m.matches(input.as_bytes()), !input.is_empty() && input.bytes().all(|b| b.is_ascii_digit()));
    }

    /// Perl classes are ASCII, as in RE2, outside and inside brackets, whatever mix of
    /// ASCII and Unicode letters, digits and spaces the value holds.
    #[test]
    fn perl_classes_are_ascii(input in r"[0-9a-zA-Z_ \t\n\x0B\x0C\r.\-\x{A0}\x{2003}\x{660}-\x{669}\x{E9}\x{3A9}]{0,12}") {
        let digit = |c: char| c.is_ascii_digit();
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let space = |c: char| matches!(c, '\t' | '\n' | '\x0C' | '\r' | ' ');
        let cases: [(&str, &dyn Fn(char) -> bool); 10] = [
            (r"\d*", &digit),
            (r"[\d]*", &digit),
            (r"\D*", &|c| !digit(c)),
            (r"[^\d]*", &|c| !digit(c)),
            (r"[\D]*", &|c| !digit(c)),
            (r"\w*", &word),
            (r"[\w.]*", &|c| word(c) || c == '.'),
            (r"\W*", &|c| !word(c)),
            (r"\s*", &space),
            (r"[^\s-]*", &|c| !space(c) && c != '-'),
        ];
        for (pattern, member) in cases {
            let m = StringMatcher::new("f", &StringMatch::Regex(pattern.into())).unwrap();
            prop_assert_eq!(m.matches(input.as_bytes()), input.chars().all(member), "{} on {:?}", pattern, input);
        }
    }

    /// Whatever the pattern, compiling it (through the RE2 rewrite) and matching with it never
    /// panics.
    #[test]
    fn any_pattern_compiles_or_is_refused(pattern in r"[\\\[\]\-^:a-dpPQExu0-9{},()?<>|.*+ \x{E9}]{0,16}", input in value()) {
        if let Ok(m) = StringMatcher::new("f", &StringMatch::Regex(pattern)) {
            let _ = m.matches(input.as_bytes());
        }
    }

    /// withoutHeaders is the negation of headers whenever the header is present, with the
    /// values joined by `,` when it is repeated.
    #[test]
    fn without_negates_with_on_present_headers(pattern in "[a-z,]{0,6}", values in prop::collection::vec("[a-z]{0,4}", 1..4)) {
        let mut headers = HeaderMap::new();
        for v in &values {
            headers.append("x", HeaderValue::from_str(v).unwrap());
        }
        for m in [StringMatch::Exact(pattern.clone()), StringMatch::Suffix(pattern.clone()), StringMatch::Present] {
            let with = HeaderMatch::new("x", &m).unwrap();
            let without = HeaderMatch::without("x", &m).unwrap();
            prop_assert_eq!(with.matches(&headers), !without.matches(&headers));
        }
        let joined = values.join(",");
        let exact = HeaderMatch::new("x", &StringMatch::Exact(joined)).unwrap();
        prop_assert!(exact.matches(&headers));
    }

    /// Whatever the input, the SPIFFE parser never panics, and what it accepts round-trips and
    /// satisfies the stated rules.
    #[test]
    fn spiffe_parse_accepts_only_valid_ids(input in "spiffe://[a-zA-Z0-9._:%@/-]{0,30}") {
        if let Ok(id) = SpiffeId::parse(&input) {
            prop_assert_eq!(id.as_str(), input.as_str());
            let td = id.trust_domain_str();
            prop_assert!(!td.is_empty());
            prop_assert!(td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
            prop_assert!(!id.path().ends_with('/'));
            prop_assert!(!id.path().contains("//"));
            prop_assert!(id.path().split('/').skip(1).all(|s| s != "." && s != ".."));
            prop_assert_eq!(SpiffeId::from_principal(id.principal()).unwrap(), id);
        }
    }

    /// Durations print in a form they parse back from, exactly.
    #[test]
    fn duration_round_trips(secs in 0u64..1_000_000, nanos in 0u32..1_000_000_000) {
        let d = Duration::new(std::time::Duration::new(secs, nanos));
        prop_assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
    }

    /// The duration parser never panics on arbitrary text.
    #[test]
    fn duration_parser_total(input in "[0-9.smhnuµ+-]{0,12}") {
        let _ = input.parse::<Duration>();
    }

    /// Response flags print in a form they parse back from.
    #[test]
    fn flags_round_trip(bits in any::<u32>()) {
        let flags = ResponseFlags::ALL.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).fold(ResponseFlags::empty(), |acc, (_, (f, _))| acc | *f);
        prop_assert_eq!(flags.to_string().parse::<ResponseFlags>().unwrap(), flags);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A block evaluated through a `RequestView` (cookies and query parsed once, sorted, looked
    /// up by binary search) decides exactly as the block evaluated directly: first occurrence
    /// of a repeated name, `?key` as the empty value, cookies across several lines.
    #[test]
    fn request_view_agrees_with_direct_matching(
        names in proptest::collection::vec("[a-d]{1,2}", 1..6),
        values in proptest::collection::vec("[x-z]{0,2}", 6),
        cookie_lines in proptest::collection::vec("[a-d]{1,2}=[x-z]{0,2}(; ?[a-d]{1,2}=[x-z]{0,2}){0,3}", 0..3),
        query in "([a-d]{1,2}(=[x-z]{0,2})?)(&[a-d]{1,2}(=[x-z]{0,2})?){0,4}",
    ) {
        use mesh_core::matching::{HttpMatch, HttpMatchRequest, RequestView};
        let mut config = HttpMatchRequest::default();
        for (i, name) in names.iter().enumerate() {
            let m = StringMatch::Exact(values[i].clone());
            if i % 2 == 0 {
                config.cookies.insert(name.clone(), m);
            } else {
                config.query_params.insert(name.clone(), m);
            }
        }
        let Ok(block) = HttpMatch::new(&config) else { return Ok(()) };
        let mut builder = http::Request::get(format!("/p?{query}"));
        for line in &cookie_lines {
            builder = builder.header("cookie", line.as_str());
        }
        let req = builder.body(()).unwrap();
        let view = RequestView::new(req.method(), req.uri(), req.headers());
        prop_assert_eq!(block.matches_view(&view), block.matches(req.method(), req.uri(), req.headers()));
    }
}
