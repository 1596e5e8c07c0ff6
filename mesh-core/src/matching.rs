//! Request matchers: Istio `StringMatch` and what is built from it.
//!
//! Matchers are compiled once, when configuration is loaded, and evaluated per request without
//! allocating (except to join a header that arrives on several lines). The semantics are
//! Envoy's, as Istio configures it:
//!
//! * `regex` is a **full match** against the whole value, in RE2 syntax: `\d+` matches `123`
//!   but not `a123`. Use `(?i)` for case-insensitivity. Patterns run on the `regex` crate;
//!   where its dialect differs from RE2's they are rewritten to mean what RE2 means: `\d`,
//!   `\w`, `\s`, `\b` are ASCII (so `\d` does not match `٣`), and brackets do not nest or
//!   combine (`[[]` is the class of `[`).
//! * A header that arrives on several lines is seen as its values joined with `,`, except an
//!   HTTP/2 request's cookie crumbs, which [`HttpMatch::matches_request`] sees joined with
//!   `"; "` into one `cookie` header, as Envoy's HTTP/2 codec joins them.
//! * An absent header never matches `headers`, not even a regex that accepts the empty string;
//!   under `withoutHeaders` an absent header is compared as the empty string, so
//!   `withoutHeaders: {x: {exact: foo}}` matches a request without `x`.
//! * `uri.prefix` is compared against the path **including** the query string; `uri.exact` and
//!   `uri.regex` against the path without it. `ignoreUriCase` affects `exact` and `prefix`
//!   only.
//! * Query parameters are compared without URL-decoding; only the first value of a repeated
//!   key counts; `?key` has the empty value.
//!
//! Beyond Istio, [`CookieMatch`] matches one cookie by name, parsed from every `cookie` header
//! line (so browsers' `"; "` separators and HTTP/2 cookie crumbs need no regex tricks). Istio's
//! own idiom, a regex on the `cookie` header, is an ordinary [`HeaderMatch`].
//!
//! # Example
//!
//! ```
//! use http::HeaderMap;
//! use mesh_core::matching::{CookieMatch, HeaderMatch, StringMatch};
//!
//! // Istio's idiom: a full-match regex on the whole `cookie` header.
//! let istio = HeaderMatch::new("cookie", &StringMatch::Regex("^(.*?;)?(user=jason)(;.*)?$".into()))?;
//! // The structured form: one cookie, by name.
//! let by_name = CookieMatch::new("user", &StringMatch::Exact("jason".into()))?;
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("cookie", "a=b; user=jason".parse().unwrap());
//! assert!(!istio.matches(&headers)); // the space after `;` defeats the idiom
//! assert!(by_name.matches(&headers));
//! # Ok::<(), mesh_core::matching::InvalidMatch>(())
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use http::header::{COOKIE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use regex::bytes::{Regex, RegexBuilder};

/// `headers` keys that name a pseudo-header's field (`uri`, `scheme`, `method`, `authority`).
/// Istio documents them as ignored, but translates them to Envoy header matchers on a header
/// of that literal name, and so do we: dropping them would turn a block that has nothing else
/// into a catch-all.
const PSEUDO_HEADER_KEYS: [&str; 4] = ["uri", "scheme", "method", "authority"];

/// `headers` / `withoutHeaders` keys that match a JWT claim (`@request.auth.claims.groups`,
/// `@request.auth.claims[a][b]`) rather than a header.
const JWT_CLAIM_KEY: &str = "@request.auth.claims";

/// The longest regex Istio accepts, in characters.
pub const MAX_REGEX_LEN: usize = 1024;

/// Compiled-program size limit for one regex (bytes of the compiled form). Envoy, as Istio
/// configures it, refuses RE2 programs above 32768 instructions; the `regex` crate measures in
/// bytes, so this is a generous equivalent that still refuses pathological patterns.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

// === StringMatch ===

/// How one string is matched: Istio's `StringMatch`, plus Envoy's `suffix` and an explicit
/// presence check.
///
/// In YAML it is written as Istio writes it: `{exact: v}`, `{prefix: v}`, `{regex: v}`,
/// `{suffix: v}`, or `{}` for "present with any value".
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(try_from = "RawStringMatch", into = "RawStringMatch")
)]
pub enum StringMatch {
    /// The whole value equals this string.
    Exact(String),
    /// The value starts with this string.
    Prefix(String),
    /// The value ends with this string.
    Suffix(String),
    /// The whole value matches this RE2-syntax regex (full match, not a search).
    Regex(String),
    /// The value is present, whatever it is (`{}` in YAML).
    Present,
}

/// The YAML shape of a [`StringMatch`]: at most one field set.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

#[cfg(feature = "serde")]
impl TryFrom<RawStringMatch> for StringMatch {
    type Error = String;

    fn try_from(raw: RawStringMatch) -> Result<Self, String> {
        let set = [&raw.exact, &raw.prefix, &raw.suffix, &raw.regex].iter().filter(|f| f.is_some()).count();
        if set > 1 {
            return Err("a string match takes only one of `exact`, `prefix`, `suffix`, `regex`".into());
        }
        Ok(match raw {
            RawStringMatch { exact: Some(v), .. } => StringMatch::Exact(v),
            RawStringMatch { prefix: Some(v), .. } => StringMatch::Prefix(v),
            RawStringMatch { suffix: Some(v), .. } => StringMatch::Suffix(v),
            RawStringMatch { regex: Some(v), .. } => StringMatch::Regex(v),
            _ => StringMatch::Present,
        })
    }
}

#[cfg(feature = "serde")]
impl From<StringMatch> for RawStringMatch {
    fn from(m: StringMatch) -> Self {
        let mut raw = RawStringMatch::default();
        match m {
            StringMatch::Exact(v) => raw.exact = Some(v),
            StringMatch::Prefix(v) => raw.prefix = Some(v),
            StringMatch::Suffix(v) => raw.suffix = Some(v),
            StringMatch::Regex(v) => raw.regex = Some(v),
            StringMatch::Present => {}
        }
        raw
    }
}

/// A match configuration that cannot be compiled. The `field` names where it sits in the
/// config (`headers.x-user`, `uri`, …) so the loader can point at it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMatch {
    /// `regex: ""`.
    #[error("{field}: the regex is empty")]
    EmptyRegex {
        /// Where the match sits.
        field: String,
    },
    /// A regex longer than [`MAX_REGEX_LEN`].
    #[error("{field}: the regex is {len} characters long; at most {MAX_REGEX_LEN} are allowed")]
    RegexTooLong {
        /// Where the match sits.
        field: String,
        /// Its length in characters.
        len: usize,
    },
    /// A regex that does not compile.
    #[error("{field}: invalid regex: {source}")]
    Regex {
        /// Where the match sits.
        field: String,
        /// What the regex compiler said.
        #[source]
        source: regex::Error,
    },
    /// A regex that RE2 would not accept, in a way the `regex` crate would not notice (a flag
    /// RE2 lacks, a backreference, an unclosed class).
    #[error("{field}: invalid regex: {why}")]
    NotRe2 {
        /// Where the match sits.
        field: String,
        /// What is wrong with it.
        why: String,
    },
    /// `prefix: ""` anywhere but `uri`.
    #[error("{field}: an empty prefix is only allowed for `uri`")]
    EmptyPrefix {
        /// Where the match sits.
        field: String,
    },
    /// Something Istio accepts that this crate does not implement yet. The message says what.
    #[error("{field}: {what}")]
    Unsupported {
        /// Where the match sits.
        field: String,
        /// What is not supported, and why.
        what: &'static str,
    },
    /// A header or cookie name that is not a valid lowercase token.
    #[error("{field}: `{name}` is not a valid lowercase header name")]
    InvalidName {
        /// Where the match sits.
        field: String,
        /// The offending name.
        name: String,
    },
}

/// A compiled [`StringMatch`]. See the module docs for its semantics.
#[derive(Clone)]
pub struct StringMatcher {
    kind: Kind,
    ignore_case: bool,
}

#[derive(Clone)]
enum Kind {
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Suffix(Box<[u8]>),
    Regex(Regex),
    Present,
}

impl StringMatcher {
    /// Compiles `m`. `field` names the match in errors. Empty prefixes are accepted here; the
    /// header, query and cookie matchers refuse them as Istio does.
    pub fn new(field: &str, m: &StringMatch) -> Result<Self, InvalidMatch> {
        let kind = match m {
            StringMatch::Exact(v) => Kind::Exact(v.as_bytes().into()),
            StringMatch::Prefix(v) => Kind::Prefix(v.as_bytes().into()),
            StringMatch::Suffix(v) => Kind::Suffix(v.as_bytes().into()),
            StringMatch::Regex(pattern) => Kind::Regex(compile_full_match(field, pattern)?),
            StringMatch::Present => Kind::Present,
        };
        Ok(Self { kind, ignore_case: false })
    }

    /// Makes `exact`, `prefix` and `suffix` compare ASCII case-insensitively (Envoy's
    /// `case_sensitive: false`). Regexes are unaffected: use `(?i)` in the pattern.
    pub fn ignoring_case(mut self) -> Self {
        self.ignore_case = true;
        self
    }

    /// The value an `exact` match compares with, when it is case-sensitive (for indexes that
    /// look values up instead of comparing them one by one).
    pub fn exact_value(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Exact(v) if !self.ignore_case => Some(v),
            _ => None,
        }
    }

    /// The compiled, anchored pattern of a `regex` match (`^(?:…)$`, in the `regex` crate's
    /// syntax), for building a `RegexSet` that tells several matchers apart in one pass.
    pub fn regex_source(&self) -> Option<&str> {
        match &self.kind {
            Kind::Regex(re) => Some(re.as_str()),
            _ => None,
        }
    }

    /// Whether this is a presence check.
    pub fn is_presence(&self) -> bool {
        matches!(self.kind, Kind::Present)
    }

    /// Matches one value.
    pub fn matches(&self, value: &[u8]) -> bool {
        let eq = |a: &[u8], b: &[u8]| {
            if self.ignore_case { a.eq_ignore_ascii_case(b) } else { a == b }
        };
        match &self.kind {
            Kind::Exact(v) => eq(value, v),
            Kind::Prefix(p) => value.len() >= p.len() && eq(&value[..p.len()], p),
            Kind::Suffix(s) => value.len() >= s.len() && eq(&value[value.len() - s.len()..], s),
            Kind::Regex(re) => re.is_match(value),
            Kind::Present => true,
        }
    }

    fn refuse_empty_prefix(&self, field: &str) -> Result<(), InvalidMatch> {
        match &self.kind {
            Kind::Prefix(p) if p.is_empty() => Err(InvalidMatch::EmptyPrefix { field: field.into() }),
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for StringMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut d = f.debug_struct("StringMatcher");
        match &self.kind {
            Kind::Exact(v) => d.field("exact", &lossy(v)),
            Kind::Prefix(v) => d.field("prefix", &lossy(v)),
            Kind::Suffix(v) => d.field("suffix", &lossy(v)),
            Kind::Regex(re) => d.field("regex", &re.as_str()),
            Kind::Present => d.field("present", &true),
        };
        d.field("ignore_case", &self.ignore_case).finish()
    }
}

fn compile_full_match(field: &str, pattern: &str) -> Result<Regex, InvalidMatch> {
    if pattern.is_empty() {
        return Err(InvalidMatch::EmptyRegex { field: field.into() });
    }
    let len = pattern.chars().count();
    if len > MAX_REGEX_LEN {
        return Err(InvalidMatch::RegexTooLong { field: field.into(), len });
    }
    // Compile the pattern alone first so that an error points at the user's text (when the
    // translation fails, the original pattern is what to report), then anchor it: RE2
    // full-match semantics.
    let build = |p: &str| RegexBuilder::new(p).size_limit(REGEX_SIZE_LIMIT).build();
    let translated = re2_to_rust(pattern).map_err(|why| InvalidMatch::NotRe2 { field: field.into(), why })?;
    if let Err(source) = build(&translated) {
        let source = build(pattern).err().unwrap_or(source);
        return Err(InvalidMatch::Regex { field: field.into(), source });
    }
    build(&format!("^(?:{translated})$")).map_err(|source| InvalidMatch::Regex { field: field.into(), source })
}

/// Rewrites an RE2 pattern into the `regex` crate's syntax, with RE2's meaning:
///
/// * `\d`, `\w`, `\s` and their negations are ASCII in RE2 (`[0-9]`, `[0-9A-Za-z_]`,
///   `[\t\n\f\r ]`) and Unicode-aware in the `regex` crate, which would let `\d` match `٣`
///   (ARABIC-INDIC DIGIT THREE) or `\s` a no-break space. `\b` and `\B` are ASCII too.
/// * An escaped punctuation character is that character (`\<` is `<`, not a word start).
/// * Bracket classes are parsed as RE2 parses them, and every literal in them written out
///   escaped: they do not nest (`[[]` is the class of `[`), have no set operators (`&&`,
///   `--`, `~~` are characters and ranges), a `]` first is a member, `-` is a range only
///   between two characters, and POSIX classes need their closing `:]`.
/// * RE2-only forms are rewritten: octal escapes, `\Q…\E`, `\C`, `\p{^Name}`, and a `{` that
///   does not start a repetition (a literal in RE2).
/// * Flags other than RE2's `i`, `m`, `s`, `U` (such as `x`) are refused.
///
/// Anything else is passed through for the `regex` crate to compile or refuse.
fn re2_to_rust(pattern: &str) -> Result<Cow<'_, str>, String> {
    if !pattern.contains(['\\', '[', '{', '(']) {
        return Ok(Cow::Borrowed(pattern));
    }
    let p: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => escape_outside_class(&p, &mut i, &mut out)?,
            '[' => class(&p, &mut i, &mut out)?,
            '{' => {
                let end = repetition_end(&p, i);
                match end {
                    Some(end) => out.extend(&p[i..=end]),
                    None => out.push_str("\\{"),
                }
                i = end.map_or(i + 1, |end| end + 1);
            }
            '(' if p.get(i + 1) == Some(&'?') => {
                let flags: String = p[i + 2..].iter().take_while(|c| !matches!(c, ')' | ':')).collect();
                let named = flags.starts_with("P<")
                    || (flags.starts_with('<') && !flags.starts_with("<=") && !flags.starts_with("<!"));
                if !named && let Some(bad) = flags.chars().find(|c| !matches!(c, 'i' | 'm' | 's' | 'U' | '-')) {
                    return Err(format!("`(?{flags}`: RE2 has only the flags i, m, s and U, not `{bad}`"));
                }
                out.push_str("(?");
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(Cow::Owned(out))
}

/// If `p[at]` (a `{`) starts a repetition (`{n}`, `{n,}`, `{n,m}`), the index of its `}`.
fn repetition_end(p: &[char], at: usize) -> Option<usize> {
    let mut i = at + 1;
    let digits = |i: &mut usize| {
        let start = *i;
        while p.get(*i).is_some_and(char::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return None;
    }
    if p.get(i) == Some(&',') {
        i += 1;
        digits(&mut i);
    }
    (p.get(i) == Some(&'}')).then_some(i)
}

/// The ASCII sets of RE2's Perl classes, for `d`, `w`, `s` (either case).
fn perl_class(e: char) -> Option<&'static str> {
    match e.to_ascii_lowercase() {
        'd' => Some("0-9"),
        'w' => Some("0-9A-Za-z_"),
        's' => Some(r"\t\n\x0C\r "),
        _ => None,
    }
}

/// If `e` names a Perl class (`\d`, `\W`, …), writes it as a bracket class of its own (nested,
/// when inside brackets) and returns `true`.
fn push_perl_class(e: char, out: &mut String) -> bool {
    let Some(set) = perl_class(e) else { return false };
    out.push_str(if e.is_ascii_uppercase() { "[^" } else { "[" });
    out.push_str(set);
    out.push(']');
    true
}

/// Copies `\p{Name}` / `\pN` at `p[*i]` (the `\`), turning RE2's `\p{^Name}` into `\P{Name}`.
fn unicode_class(p: &[char], i: &mut usize, out: &mut String) {
    let mut kind = p[*i + 1];
    *i += 2;
    if p.get(*i) == Some(&'{') {
        let end = p[*i..].iter().position(|&c| c == '}').map_or(p.len(), |n| *i + n);
        let mut name: String = p[*i + 1..end].iter().collect();
        if let Some(negated) = name.strip_prefix('^') {
            kind = if kind == 'p' { 'P' } else { 'p' };
            name = negated.to_string();
        }
        out.push('\\');
        out.push(kind);
        out.push('{');
        out.push_str(&name);
        out.push('}');
        *i = (end + 1).min(p.len());
    } else {
        out.push('\\');
        out.push(kind);
        if let Some(&c) = p.get(*i) {
            out.push(c);
            *i += 1;
        }
    }
}

/// Translates the escape at `p[*i]` (a `\`) outside brackets.
fn escape_outside_class(p: &[char], i: &mut usize, out: &mut String) -> Result<(), String> {
    let Some(&e) = p.get(*i + 1) else {
        return Err("the pattern ends with a lone `\\`".into());
    };
    if push_perl_class(e, out) {
        *i += 2;
        return Ok(());
    }
    match e {
        'b' | 'B' => {
            out.push_str("(?-u:\\");
            out.push(e);
            out.push(')');
            *i += 2;
        }
        'A' | 'z' => {
            out.push('\\');
            out.push(e);
            *i += 2;
        }
        'p' | 'P' => unicode_class(p, i, out),
        'C' => {
            out.push_str("(?s-u:.)");
            *i += 2;
        }
        'Q' => {
            *i += 2;
            while *i < p.len() && !(p[*i] == '\\' && p.get(*i + 1) == Some(&'E')) {
                out.push_str(&regex::escape(p[*i].encode_utf8(&mut [0; 4])));
                *i += 1;
            }
            *i = (*i + 2).min(p.len());
        }
        _ => {
            let c = escaped_char(p, i)?;
            out.push_str(&regex::escape(c.encode_utf8(&mut [0; 4])));
        }
    }
    Ok(())
}

/// The character an escape at `p[*i]` (a `\`) stands for: `\x41`, `\x{41}`, octal `\101`,
/// `\n` and the other C escapes, or escaped punctuation. Advances past it.
fn escaped_char(p: &[char], i: &mut usize) -> Result<char, String> {
    let e = p[*i + 1];
    *i += 2;
    let from = |digits: &[char], radix| -> Option<char> {
        let s: String = digits.iter().collect();
        u32::from_str_radix(&s, radix).ok().and_then(char::from_u32)
    };
    let bad = || format!("`\\{e}` is not an RE2 escape here");
    match e {
        'x' if p.get(*i) == Some(&'{') => {
            let end = p[*i..].iter().position(|&c| c == '}').map(|n| *i + n).ok_or_else(bad)?;
            let c = from(&p[*i + 1..end], 16).ok_or_else(bad)?;
            *i = end + 1;
            Ok(c)
        }
        'x' => {
            let c = p.get(*i..*i + 2).and_then(|d| from(d, 16)).ok_or_else(bad)?;
            *i += 2;
            Ok(c)
        }
        // Octal: `\0` and up to two more digits, or `\1`–`\7` followed by at least one (a
        // lone `\1` would be a backreference, which RE2 does not have).
        '0'..='7' => {
            let start = *i - 1;
            while *i < start + 3 && p.get(*i).is_some_and(|c| ('0'..='7').contains(c)) {
                *i += 1;
            }
            if e != '0' && *i == start + 1 {
                return Err(format!("`\\{e}`: RE2 has no backreferences"));
            }
            from(&p[start..*i], 8).ok_or_else(bad)
        }
        'a' => Ok('\x07'),
        'f' => Ok('\x0C'),
        'n' => Ok('\n'),
        'r' => Ok('\r'),
        't' => Ok('\t'),
        'v' => Ok('\x0B'),
        c if c.is_ascii() && !c.is_ascii_alphanumeric() => Ok(c),
        _ => Err(bad()),
    }
}

/// Translates the bracket class at `p[*i]` (its `[`), item by item as RE2 reads it.
fn class(p: &[char], i: &mut usize, out: &mut String) -> Result<(), String> {
    out.push('[');
    *i += 1;
    if p.get(*i) == Some(&'^') {
        out.push('^');
        *i += 1;
    }
    let mut first = true;
    loop {
        let Some(&c) = p.get(*i) else {
            return Err("a character class is missing its `]`".into());
        };
        if c == ']' && !first {
            out.push(']');
            *i += 1;
            return Ok(());
        }
        first = false;
        // A POSIX class, when its `:]` follows; otherwise the `[` is a member.
        if c == '['
            && p.get(*i + 1) == Some(&':')
            && let Some(n) = p[*i + 2..].windows(2).position(|w| w == [':', ']'])
        {
            let end = *i + 2 + n + 2;
            let name: String = p[*i + 2..end - 2].iter().collect();
            if !POSIX_CLASSES.contains(&name.strip_prefix('^').unwrap_or(&name)) {
                return Err(format!("`[:{name}:]` is not a POSIX class"));
            }
            out.extend(&p[*i..end]);
            *i = end;
            continue;
        }
        if c == '\\' {
            match p.get(*i + 1) {
                Some(&e) if push_perl_class(e, out) => {
                    *i += 2;
                    continue;
                }
                Some('p' | 'P') => {
                    unicode_class(p, i, out);
                    continue;
                }
                None => return Err("the pattern ends with a lone `\\`".into()),
                _ => {}
            }
        }
        let lo = class_char(p, i)?;
        push_class_literal(lo, out);
        // `-` makes a range only between two characters: not last, not after a class.
        if p.get(*i) == Some(&'-') && p.get(*i + 1).is_some_and(|&c| c != ']') {
            *i += 1;
            let hi = class_char(p, i)?;
            out.push('-');
            push_class_literal(hi, out);
        }
    }
}

/// The POSIX class names RE2 knows (the `regex` crate knows the same ones, but reads an
/// unknown `[:name:]` as a nested class of its letters).
const POSIX_CLASSES: [&str; 14] = [
    "alnum", "alpha", "ascii", "blank", "cntrl", "digit", "graph", "lower", "print", "punct", "space", "upper", "word",
    "xdigit",
];

/// One character of a class: a literal or an escape.
fn class_char(p: &[char], i: &mut usize) -> Result<char, String> {
    match p.get(*i) {
        Some('\\') if *i + 1 < p.len() => escaped_char(p, i),
        Some(&c) => {
            *i += 1;
            Ok(c)
        }
        None => Err("a character class is missing its `]`".into()),
    }
}

/// Writes a class member so that the `regex` crate cannot read it as syntax.
fn push_class_literal(c: char, out: &mut String) {
    if c.is_ascii_alphanumeric() || !c.is_ascii() {
        out.push(c);
    } else {
        out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
    }
}

// === HeaderMatch ===

/// Matches one request header, with Envoy's absent-header and multi-value rules. See the
/// module docs.
#[derive(Clone, Debug)]
pub struct HeaderMatch {
    name: HeaderName,
    matcher: StringMatcher,
    invert: bool,
    missing_as_empty: bool,
}

impl HeaderMatch {
    /// A `headers:` entry: the header must be present and match.
    pub fn new(name: &str, m: &StringMatch) -> Result<Self, InvalidMatch> {
        let field = format!("headers.{name}");
        let matcher = StringMatcher::new(&field, m)?;
        matcher.refuse_empty_prefix(&field)?;
        Ok(Self { name: header_name(&field, name)?, matcher, invert: false, missing_as_empty: false })
    }

    /// A `withoutHeaders:` entry: the block fails if the header matches. An absent header is
    /// compared as `""` (so it passes unless the match accepts the empty string), except for a
    /// presence check, which an absent header always passes. Istio's `regex: "*"` is accepted
    /// here as a presence check, as Istio translates it.
    pub fn without(name: &str, m: &StringMatch) -> Result<Self, InvalidMatch> {
        let field = format!("withoutHeaders.{name}");
        let m = match m {
            StringMatch::Regex(r) if r == "*" => &StringMatch::Present,
            other => other,
        };
        let matcher = StringMatcher::new(&field, m)?;
        matcher.refuse_empty_prefix(&field)?;
        let missing_as_empty = !matcher.is_presence();
        Ok(Self { name: header_name(&field, name)?, matcher, invert: true, missing_as_empty })
    }

    /// The header this matches.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// Evaluates the match against `headers`.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let Some(value) = header_value(headers, &self.name) else {
            if self.missing_as_empty {
                return self.matcher.matches(b"") != self.invert;
            }
            // Envoy: an absent header satisfies only an inverted presence check.
            return self.matcher.is_presence() && self.invert;
        };
        self.matcher.matches(&value) != self.invert
    }
}

/// A header's value as Envoy's matchers see it: several lines joined with `,`; `None` when
/// absent.
pub fn header_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    Some(match values.next() {
        None => Cow::Borrowed(first.as_bytes()),
        Some(second) => {
            let mut joined = Vec::with_capacity(first.len() + second.len() + 16);
            joined.extend_from_slice(first.as_bytes());
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
            }
            Cow::Owned(joined)
        }
    })
}

fn header_name(field: &str, name: &str) -> Result<HeaderName, InvalidMatch> {
    let invalid = || InvalidMatch::InvalidName { field: field.into(), name: name.into() };
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid());
    }
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())
}

// === QueryParamMatch ===

/// Matches one query parameter: the first occurrence of the key, compared without
/// URL-decoding; `?key` has the empty value; an absent key never matches.
#[derive(Clone, Debug)]
pub struct QueryParamMatch {
    name: Box<str>,
    matcher: StringMatcher,
}

impl QueryParamMatch {
    /// A `queryParams:` entry.
    pub fn new(name: &str, m: &StringMatch) -> Result<Self, InvalidMatch> {
        let field = format!("queryParams.{name}");
        let matcher = StringMatcher::new(&field, m)?;
        matcher.refuse_empty_prefix(&field)?;
        Ok(Self { name: name.into(), matcher })
    }

    /// Evaluates the match against a request's parsed query ([`RequestView`]).
    fn matches_view(&self, view: &RequestView<'_>) -> bool {
        view.query_param(&self.name).is_some_and(|v| self.matcher.matches(v.as_bytes()))
    }

    /// Evaluates the match against a query string (without the `?`), if there is one.
    pub fn matches(&self, query: Option<&str>) -> bool {
        query
            .and_then(|q| first_value(q.split('&'), '=', &self.name))
            .is_some_and(|v| self.matcher.matches(v.as_bytes()))
    }
}

/// The value of the first `key<sep>value` pair named `name`; a bare `key` has the empty value.
fn first_value<'a>(pairs: impl Iterator<Item = &'a str>, sep: char, name: &str) -> Option<&'a str> {
    pairs.map(|pair| pair.split_once(sep).unwrap_or((pair, ""))).find(|(k, _)| *k == name).map(|(_, v)| v)
}

// === CookieMatch ===

/// Matches one cookie by name, parsed from all `cookie` header lines (`name=value` pairs
/// separated by `;` and optional whitespace). The first cookie with that name counts; an
/// absent cookie matches only an inverted match. Istio has no such field; this is the
/// structured alternative to a regex on the whole `cookie` header.
#[derive(Clone, Debug)]
pub struct CookieMatch {
    name: Box<str>,
    matcher: StringMatcher,
    invert: bool,
}

impl CookieMatch {
    /// The named cookie must be present and match.
    pub fn new(name: &str, m: &StringMatch) -> Result<Self, InvalidMatch> {
        let field = format!("cookies.{name}");
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b == b'=' || b == b';' || b >= 0x7f) {
            return Err(InvalidMatch::InvalidName { field, name: name.into() });
        }
        let matcher = StringMatcher::new(&field, m)?;
        matcher.refuse_empty_prefix(&field)?;
        Ok(Self { name: name.into(), matcher, invert: false })
    }

    /// Inverts the match: it passes when the cookie is absent or does not match.
    pub fn inverted(mut self) -> Self {
        self.invert = true;
        self
    }

    /// The cookie's value in `headers`, if any.
    pub fn find<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        headers.get_all(COOKIE).iter().find_map(|line| {
            line.as_bytes().split(|&b| b == b';').find_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|&b| b == b'=')?;
                (pair[..eq].trim_ascii() == self.name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
            })
        })
    }

    /// Evaluates the match against `headers`.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        self.find(headers).is_some_and(|v| self.matcher.matches(v)) != self.invert
    }

    fn matches_view(&self, view: &RequestView<'_>) -> bool {
        view.cookie(&self.name).is_some_and(|v| self.matcher.matches(v)) != self.invert
    }
}

// === RequestView ===

/// A request's parts as match blocks read them, with the cookies and the query parsed once,
/// on first use, however many blocks look at them: a route table evaluating many blocks
/// against one request uses one view ([`HttpMatch::matches_view`]).
///
/// ```
/// use mesh_core::matching::{HttpMatch, HttpMatchRequest, RequestView, StringMatch};
///
/// let mut config = HttpMatchRequest::default();
/// config.cookies.insert("user".into(), StringMatch::Exact("jason".into()));
/// let block = HttpMatch::new(&config).unwrap();
/// let req = http::Request::get("/?a=1").header("cookie", "a=b; user=jason").body(()).unwrap();
/// let view = RequestView::new(req.method(), req.uri(), req.headers());
/// assert!(block.matches_view(&view));
/// ```
#[derive(Debug)]
pub struct RequestView<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    /// `(name, value)` sorted by name, stable (the first of equal names first).
    cookies: std::cell::OnceCell<Vec<(&'a [u8], &'a [u8])>>,
    query: std::cell::OnceCell<Vec<(&'a str, &'a str)>>,
}

impl<'a> RequestView<'a> {
    /// A view of a request's parts.
    pub fn new(method: &'a Method, uri: &'a Uri, headers: &'a HeaderMap) -> Self {
        Self { method, uri, headers, cookies: std::cell::OnceCell::new(), query: std::cell::OnceCell::new() }
    }

    /// The value of the first cookie named `name`.
    pub fn cookie(&self, name: &str) -> Option<&'a [u8]> {
        let cookies = self.cookies.get_or_init(|| {
            let mut pairs: Vec<(&[u8], &[u8])> = self
                .headers
                .get_all(COOKIE)
                .iter()
                .flat_map(|line| line.as_bytes().split(|&b| b == b';'))
                .filter_map(|pair| {
                    let pair = pair.trim_ascii();
                    let eq = pair.iter().position(|&b| b == b'=')?;
                    Some((pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()))
                })
                .collect();
            pairs.sort_by(|a, b| a.0.cmp(b.0));
            pairs
        });
        first_of(cookies, name.as_bytes())
    }

    /// The request.
    pub fn parts(&self) -> (&'a Method, &'a Uri, &'a HeaderMap) {
        (self.method, self.uri, self.headers)
    }

    /// The value of the first query parameter named `name` (`?key` has the empty value).
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        let query = self.query.get_or_init(|| {
            let mut pairs: Vec<(&str, &str)> = self
                .uri
                .query()
                .map(|q| q.split('&').map(|pair| pair.split_once('=').unwrap_or((pair, ""))).collect())
                .unwrap_or_default();
            pairs.sort_by(|a, b| a.0.cmp(b.0));
            pairs
        });
        first_of(query, name)
    }
}

/// The value of the first pair named `name` in pairs sorted stably by name.
fn first_of<'a, K: Ord + ?Sized, V: ?Sized>(pairs: &[(&'a K, &'a V)], name: &K) -> Option<&'a V> {
    let i = pairs.partition_point(|(k, _)| *k < name);
    pairs.get(i).filter(|(k, _)| *k == name).map(|(_, v)| *v)
}

// === UriMatch ===

/// Matches the request path as Envoy's route match does. See the module docs.
#[derive(Clone, Debug)]
pub struct UriMatch {
    matcher: StringMatcher,
    with_query: bool,
    /// `prefix: "/"` or `regex: ".*"`: every path.
    catch_all: bool,
}

impl UriMatch {
    /// A `uri:` match; `ignore_case` is Istio's `ignoreUriCase`. An empty prefix is allowed.
    pub fn new(m: &StringMatch, ignore_case: bool) -> Result<Self, InvalidMatch> {
        let mut matcher = StringMatcher::new("uri", m)?;
        if ignore_case {
            matcher = matcher.ignoring_case();
        }
        let catch_all =
            matches!(m, StringMatch::Prefix(p) if p == "/") || matches!(m, StringMatch::Regex(r) if r == ".*");
        Ok(Self { matcher, with_query: matches!(m, StringMatch::Prefix(_)), catch_all })
    }

    /// Evaluates the match against a request URI.
    pub fn matches(&self, uri: &Uri) -> bool {
        let target =
            if self.with_query { uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()) } else { uri.path() };
        self.matcher.matches(target.as_bytes())
    }
}

// === HttpMatch ===

/// One Istio `HTTPMatchRequest` block, as configured. Field names are Istio's.
///
/// The runtime fields are compiled by [`HttpMatch::new`]; the config-time fields (`port`,
/// `sourceLabels`, `sourceNamespace`, `gateways`) decide whether the block applies to a given
/// listener or proxy at all and are applied by the route-table builder, not per request.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, rename_all = "camelCase"))]
#[non_exhaustive]
pub struct HttpMatchRequest {
    /// Appended to the route name in logs and stats.
    pub name: Option<String>,
    /// Path match.
    pub uri: Option<StringMatch>,
    /// `:scheme` match.
    pub scheme: Option<StringMatch>,
    /// `:method` match.
    pub method: Option<StringMatch>,
    /// `:authority` (HTTP/1 `Host`) match.
    pub authority: Option<StringMatch>,
    /// Headers that must be present and match (keys lowercase). The keys `uri`, `scheme`,
    /// `method` and `authority` match headers of that literal name, as Istio's translation
    /// does, although Istio documents them as ignored (see
    /// [`pseudo_header_keys`](Self::pseudo_header_keys)); `@request.auth.claims…` keys are
    /// refused until RequestAuthentication is supported.
    pub headers: BTreeMap<String, StringMatch>,
    /// Headers that must not match.
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Query parameters that must match.
    pub query_params: BTreeMap<String, StringMatch>,
    /// Cookies, by name, that must be present and match (a mesh extension; Istio has none).
    pub cookies: BTreeMap<String, StringMatch>,
    /// Compare `uri` exact and prefix matches case-insensitively.
    pub ignore_uri_case: bool,
    /// Config-time: the block applies only on the listener with this port.
    pub port: Option<u32>,
    /// Config-time: the block applies only to workloads carrying these labels.
    pub source_labels: BTreeMap<String, String>,
    /// Config-time: the block applies only to workloads in this namespace.
    pub source_namespace: Option<String>,
    /// Config-time: gateways this block applies to, overriding the VirtualService's.
    pub gateways: Vec<String>,
    /// Envoy per-route stats prefix.
    pub stat_prefix: Option<String>,
}

impl HttpMatchRequest {
    /// The `headers` keys `uri`, `scheme`, `method` and `authority`, for a loader to warn
    /// about: they match a header of that literal name (as in Istio), while their author most
    /// likely meant the field of that name, and Istio's documentation calls them ignored.
    pub fn pseudo_header_keys(&self) -> impl Iterator<Item = &str> {
        self.headers.keys().map(String::as_str).filter(|k| PSEUDO_HEADER_KEYS.contains(k))
    }
}

/// A compiled `HTTPMatchRequest` block: every condition in it must hold (AND). Several
/// blocks of one route are OR-ed by the route table.
#[derive(Clone, Debug)]
pub struct HttpMatch {
    uri: Option<UriMatch>,
    scheme: Option<StringMatcher>,
    method: Option<StringMatcher>,
    authority: Option<StringMatcher>,
    headers: Box<[HeaderMatch]>,
    query_params: Box<[QueryParamMatch]>,
    cookies: Box<[CookieMatch]>,
}

impl HttpMatch {
    /// Compiles a block. Errors name the offending field.
    pub fn new(config: &HttpMatchRequest) -> Result<Self, InvalidMatch> {
        let pseudo = |field: &str, m: &Option<StringMatch>| -> Result<_, InvalidMatch> {
            m.as_ref()
                .map(|m| {
                    let matcher = StringMatcher::new(field, m)?;
                    matcher.refuse_empty_prefix(field)?;
                    Ok(matcher)
                })
                .transpose()
        };
        for (section, map) in [("headers", &config.headers), ("withoutHeaders", &config.without_headers)] {
            if let Some(key) = map.keys().find(|k| k.starts_with(JWT_CLAIM_KEY)) {
                return Err(InvalidMatch::Unsupported {
                    field: format!("{section}.{key}"),
                    what: "matching JWT claims needs RequestAuthentication, which is not supported yet",
                });
            }
        }
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| HeaderMatch::new(k, v))
            .chain(config.without_headers.iter().map(|(k, v)| HeaderMatch::without(k, v)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            uri: config.uri.as_ref().map(|m| UriMatch::new(m, config.ignore_uri_case)).transpose()?,
            scheme: pseudo("scheme", &config.scheme)?,
            method: pseudo("method", &config.method)?,
            authority: pseudo("authority", &config.authority)?,
            headers,
            query_params: config
                .query_params
                .iter()
                .map(|(k, v)| QueryParamMatch::new(k, v))
                .collect::<Result<_, _>>()?,
            cookies: config.cookies.iter().map(|(k, v)| CookieMatch::new(k, v)).collect::<Result<_, _>>()?,
        })
    }

    /// A block with no conditions: it matches every request (Istio's catch-all).
    pub fn any() -> Self {
        Self {
            uri: None,
            scheme: None,
            method: None,
            authority: None,
            headers: Box::new([]),
            query_params: Box::new([]),
            cookies: Box::new([]),
        }
    }

    /// Whether the block matches every request, as Envoy's route table sees it: a path match
    /// of `prefix: "/"` or `regex: ".*"` (or none) and no other condition. Routes after a
    /// catch-all are unreachable.
    pub fn is_catch_all(&self) -> bool {
        self.uri.as_ref().is_none_or(|u| u.catch_all)
            && self.scheme.is_none()
            && self.method.is_none()
            && self.authority.is_none()
            && self.headers.is_empty()
            && self.query_params.is_empty()
            && self.cookies.is_empty()
    }

    /// Evaluates the block against a request's parts.
    ///
    /// `:authority` is the URI's authority (HTTP/2, absolute-form HTTP/1) or else the `Host`
    /// header. `:scheme` is the URI's scheme, or `http` when the request line carries none;
    /// a TLS listener sets the scheme on the URI before matching.
    pub fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        let authority = || match uri.authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => headers.get(HOST).map(|h| h.as_bytes()),
        };
        self.uri.as_ref().is_none_or(|m| m.matches(uri))
            && self.method.as_ref().is_none_or(|m| m.matches(method.as_str().as_bytes()))
            && self.scheme.as_ref().is_none_or(|m| m.matches(uri.scheme_str().unwrap_or("http").as_bytes()))
            && self.authority.as_ref().is_none_or(|m| authority().is_some_and(|a| m.matches(a)))
            && self.headers.iter().all(|h| h.matches(headers))
            && self.query_params.iter().all(|q| q.matches(uri.query()))
            && self.cookies.iter().all(|c| c.matches(headers))
    }

    /// Evaluates the block against a [`RequestView`] (whose cookies and query are parsed once
    /// for all the blocks that read them). Same semantics as [`matches`](Self::matches).
    pub fn matches_view(&self, view: &RequestView<'_>) -> bool {
        let (method, uri, headers) = (view.method, view.uri, view.headers);
        let authority = || match uri.authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => headers.get(HOST).map(|h| h.as_bytes()),
        };
        self.uri.as_ref().is_none_or(|m| m.matches(uri))
            && self.method.as_ref().is_none_or(|m| m.matches(method.as_str().as_bytes()))
            && self.scheme.as_ref().is_none_or(|m| m.matches(uri.scheme_str().unwrap_or("http").as_bytes()))
            && self.authority.as_ref().is_none_or(|m| authority().is_some_and(|a| m.matches(a)))
            && self.headers.iter().all(|h| h.matches(headers))
            && self.query_params.iter().all(|q| q.matches_view(view))
            && self.cookies.iter().all(|c| c.matches_view(view))
    }

    /// Evaluates the block against a request. An HTTP/2 (or later) request's cookie crumbs
    /// are seen joined with `"; "`, as one `cookie` header ([`join_cookie_crumbs`]).
    pub fn matches_request<B>(&self, request: &Request<B>) -> bool {
        let headers = request.headers();
        if request.version() >= Version::HTTP_2 && headers.get_all(COOKIE).iter().nth(1).is_some() {
            let mut joined = headers.clone();
            join_cookie_crumbs(&mut joined);
            return self.matches(request.method(), request.uri(), &joined);
        }
        self.matches(request.method(), request.uri(), headers)
    }
}

/// Joins an HTTP/2 request's cookie "crumbs" (the `cookie` header split into several fields,
/// RFC 9113 section 8.2.3) into one field, with `"; "` between them, and returns whether there
/// were several.
///
/// The RFC requires this before an HTTP/2 request goes on over HTTP/1.1, where a request has
/// at most one `cookie` header; Envoy's HTTP/2 codec does it on receipt, so Istio's cookie
/// regexes see one `"; "`-separated value. (Several `cookie` lines of an HTTP/1.1 request are
/// another matter: like any repeated header, they are matched joined with `,`.)
///
/// ```
/// use http::HeaderMap;
/// use mesh_core::matching::join_cookie_crumbs;
///
/// let mut headers = HeaderMap::new();
/// headers.append("cookie", "a=b".parse().unwrap());
/// headers.append("cookie", "user=jason".parse().unwrap());
/// assert!(join_cookie_crumbs(&mut headers));
/// assert_eq!(headers["cookie"], "a=b; user=jason");
/// assert_eq!(headers.get_all("cookie").iter().count(), 1);
/// ```
pub fn join_cookie_crumbs(headers: &mut HeaderMap) -> bool {
    let mut crumbs = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else {
        return false;
    };
    let mut joined = Vec::with_capacity(first.len() * 4);
    let mut sensitive = false;
    for (i, crumb) in headers.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
        sensitive |= crumb.is_sensitive();
    }
    // Valid field values joined by "; " form a valid field value.
    let Ok(mut value) = HeaderValue::from_bytes(&joined) else {
        return false;
    };
    value.set_sensitive(sensitive);
    headers.insert(COOKIE, value);
    true
}
