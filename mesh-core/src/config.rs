//! Value types that Istio configuration is written in: durations and percentages.
//!
//! [`Duration`] reads what operators write in Istio YAML: protobuf-JSON durations (`"1.5s"`)
//! and the Go forms Kubernetes users use everywhere (`"250ms"`, `"1m30s"`, `"2h"`). Units are
//! `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`; each number may have a fraction; negative
//! durations and a bare number other than `0` are refused.
//!
//! [`Percent`] is Istio's `Percent`: a number from 0 to 100, written either as a plain number
//! or as `{value: 12.5}`; `{}` is 0 %, as an unset proto3 field is 0.
//!
//! # Example
//!
//! ```
//! use mesh_core::config::{Duration, Percent};
//!
//! let d: Duration = "1.5s".parse()?;
//! assert_eq!(d.get(), std::time::Duration::from_millis(1500));
//! assert_eq!("1m30s".parse::<Duration>()?.get().as_secs(), 90);
//! assert!("-2s".parse::<Duration>().is_err());
//!
//! let p = Percent::new(12.5)?;
//! assert_eq!(p.as_fraction(), 0.125);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

// === Duration ===

/// A non-negative duration parsed from Istio / Go syntax. See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

/// A duration string that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration `{input}`: {reason} (expected forms like \"2s\", \"250ms\", \"1.5s\", \"1m30s\")")]
pub struct InvalidDuration {
    input: String,
    reason: &'static str,
}

impl Duration {
    /// Wraps a `std` duration.
    pub const fn new(d: std::time::Duration) -> Self {
        Duration(d)
    }

    /// The `std` duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// Whether the duration is zero (Istio uses zero for "disabled" in several fields).
    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// Parses a duration. See the module docs for the syntax.
    pub fn parse(s: &str) -> Result<Self, InvalidDuration> {
        let err = |reason| InvalidDuration { input: s.into(), reason };
        let input = s.trim();
        if input.is_empty() {
            return Err(err("it is empty"));
        }
        if input.starts_with('-') {
            return Err(err("durations cannot be negative"));
        }
        let input = input.strip_prefix('+').unwrap_or(input);
        if input == "0" {
            return Ok(Duration::default());
        }
        let mut rest = input;
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
            let (number, tail) = rest.split_at(digits);
            let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let unit_nanos: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "" => return Err(err("a number needs a unit")),
                _ => return Err(err("unknown unit")),
            };
            let (int, frac) = number.split_once('.').unwrap_or((number, ""));
            if int.is_empty() && frac.is_empty() || frac.contains('.') {
                return Err(err("malformed number"));
            }
            // At most 18 fraction digits keep the arithmetic in u128 exact enough (sub-ns).
            let frac = &frac[..frac.len().min(18)];
            let int: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| err("number too large"))? };
            let frac_value: u128 =
                if frac.is_empty() { 0 } else { frac.parse().map_err(|_| err("malformed number"))? };
            let scale = 10u128.pow(frac.len() as u32);
            let part = int
                .checked_mul(unit_nanos)
                .and_then(|n| n.checked_add(frac_value * unit_nanos / scale))
                .ok_or_else(|| err("duration too large"))?;
            total = total.checked_add(part).ok_or_else(|| err("duration too large"))?;
            rest = tail;
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| err("duration too large"))?;
        Ok(Duration(std::time::Duration::new(secs, (total % 1_000_000_000) as u32)))
    }
}

impl FromStr for Duration {
    type Err = InvalidDuration;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Duration::parse(s)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

impl fmt::Display for Duration {
    /// Formats in protobuf-JSON style: seconds with up to nine fraction digits (`"1.5s"`),
    /// or whole milliseconds when exact (`"250ms"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let nanos = d.subsec_nanos();
        if d.as_secs() == 0 && nanos != 0 && nanos.is_multiple_of(1_000_000) {
            return write!(f, "{}ms", nanos / 1_000_000);
        }
        if nanos == 0 {
            return write!(f, "{}s", d.as_secs());
        }
        let frac = format!("{nanos:09}");
        write!(f, "{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// === Percent ===

/// A percentage from 0 to 100 inclusive (Istio `Percent`). See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd)]
pub struct Percent(f64);

/// A percentage outside 0–100 or not a number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid percentage {0}: it must be a number from 0 to 100")]
pub struct InvalidPercent(pub f64);

impl Percent {
    /// 100 %.
    pub const HUNDRED: Percent = Percent(100.0);

    /// Validates `value` (0 to 100).
    pub fn new(value: f64) -> Result<Self, InvalidPercent> {
        if (0.0..=100.0).contains(&value) { Ok(Percent(value)) } else { Err(InvalidPercent(value)) }
    }

    /// The value, 0 to 100.
    pub fn value(self) -> f64 {
        self.0
    }

    /// The value as a fraction, 0 to 1.
    pub fn as_fraction(self) -> f64 {
        self.0 / 100.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PercentVisitor)
    }
}

/// Reads a plain number or Istio's message form, `{value: 12.5}`; as in proto3, an unset
/// `value` is 0, so `{}` is 0 %.
#[cfg(feature = "serde")]
struct PercentVisitor;

#[cfg(feature = "serde")]
impl<'de> serde::de::Visitor<'de> for PercentVisitor {
    type Value = Percent;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a percentage from 0 to 100, as a number or as {value: N}")
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Percent, E> {
        Percent::new(v).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Percent, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Percent, E> {
        self.visit_f64(v as f64)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Percent, A::Error> {
        use serde::de::Error;
        let mut value = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "value" if value.is_some() => return Err(A::Error::duplicate_field("value")),
                "value" => value = Some(map.next_value::<f64>()?),
                other => return Err(A::Error::unknown_field(other, &["value"])),
            }
        }
        Percent::new(value.unwrap_or(0.0)).map_err(A::Error::custom)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Percent", 1)?;
        st.serialize_field("value", &self.0)?;
        st.end()
    }
}
