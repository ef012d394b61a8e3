//! The policy file exactly as written: serde structs that mirror the TOML.
//!
//! Nothing here judges whether values make sense together; that is
//! [`Policy::from_toml`](super::Policy::from_toml)'s job. Every table denies unknown keys
//! (a typo must not silently fall back to a default), and every value that validation
//! looks at is wrapped in [`Spanned`] so its error can point at `file:line:col`.
//!
//! Value syntaxes accepted:
//! - ratios ([`RatioValue`]): a number in (0, 1] such as `0.85`, or a percentage string
//!   such as `"85%"`;
//! - durations ([`DurationValue`]): humantime strings such as `"10s"`, `"5m"`, `"1h 30m"`;
//! - byte sizes ([`BytesValue`]): an integer number of bytes, or a string with a binary
//!   suffix such as `"512MiB"`, `"2GiB"`.

use crate::knob::TimeoutKnob;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub mode: Spanned<RawMode>,
    pub poll: RawPoll,
    pub levels: RawLevels,
    pub rate_limit: RawRateLimit,
    pub backoff: RawBackoff,
    pub stages: RawStages,
    pub rollback: RawRollback,
    #[serde(default)]
    pub persist: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawMode {
    Enforce,
    DryRun,
    Observe,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoll {
    pub at_rest: Spanned<DurationValue>,
    pub under_pressure: Spanned<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLevels {
    pub warn: RawLevel,
    pub act: RawLevel,
    pub critical: RawLevel,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLevel {
    pub at: Spanned<RatioValue>,
    pub clear_below: Spanned<RatioValue>,
    pub sustain: Spanned<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub max_changes: Spanned<u32>,
    pub window: Spanned<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    pub base: Spanned<DurationValue>,
    pub max: Spanned<DurationValue>,
    pub flap_window: Spanned<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStages {
    pub raise_limits: Spanned<RawRaiseLimits>,
    pub shorten_timeouts: Spanned<RawShortenTimeouts>,
    /// Opt-in stages: an absent table means the stage is off.
    pub notrack_hot_ports: Option<Spanned<RawNotrack>>,
    pub evict: Option<Spanned<RawEvict>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawTrigger {
    Warn,
    Act,
    Critical,
}

// Every stage table starts with `enabled`, `trigger` and `cooldown`. They are spelled out
// in each struct because serde's `flatten` works with neither `deny_unknown_fields` nor
// `Spanned`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRaiseLimits {
    pub enabled: bool,
    pub trigger: RawTrigger,
    pub cooldown: Spanned<DurationValue>,
    pub headroom: Spanned<f64>,
    pub min_step: Spanned<f64>,
    pub ram_share: Option<Spanned<RatioValue>>,
    pub ram_bytes: Option<Spanned<BytesValue>>,
    pub absolute_cap: Option<Spanned<u64>>,
    pub buckets_divisor: Spanned<u64>,
    pub bucket_change_interval: Spanned<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShortenTimeouts {
    pub enabled: bool,
    pub trigger: RawTrigger,
    pub cooldown: Spanned<DurationValue>,
    pub timeouts: BTreeMap<TimeoutKnob, Spanned<RawTimeoutTarget>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeoutTarget {
    pub target: Spanned<DurationValue>,
    pub floor: Spanned<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotrack {
    pub enabled: bool,
    pub trigger: RawTrigger,
    pub cooldown: Spanned<DurationValue>,
    pub min_share: Spanned<RatioValue>,
    pub allow: Option<Spanned<Vec<u16>>>,
    pub deny: Option<Spanned<Vec<u16>>>,
    pub max_ports: Spanned<u32>,
    pub expiry: Spanned<DurationValue>,
    #[serde(default)]
    pub accept_untracked: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvict {
    pub enabled: bool,
    pub trigger: RawTrigger,
    pub cooldown: Spanned<DurationValue>,
    pub states: Spanned<Vec<EvictState>>,
    pub min_age: Spanned<DurationValue>,
    pub batch: Spanned<u32>,
}

/// Conntrack entry states the evict stage may delete. Deleting an entry of an open
/// connection makes its next packet look new (or invalid), so only states whose loss is
/// cheap are offered.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum EvictState {
    /// UDP/other flows that never saw a reply.
    Unreplied,
    SynSent,
    SynRecv,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
}

impl EvictState {
    pub fn name(self) -> &'static str {
        match self {
            EvictState::Unreplied => "unreplied",
            EvictState::SynSent => "syn_sent",
            EvictState::SynRecv => "syn_recv",
            EvictState::FinWait => "fin_wait",
            EvictState::CloseWait => "close_wait",
            EvictState::LastAck => "last_ack",
            EvictState::TimeWait => "time_wait",
            EvictState::Close => "close",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollback {
    pub recover_below: Spanned<RatioValue>,
    pub recover_for: Spanned<DurationValue>,
    pub pause: Spanned<DurationValue>,
    pub rollback_on_exit: bool,
}

/// A ratio: `0.85` or `"85%"`. Range checks happen in validation, where the span is known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioValue(pub f64);

/// A humantime duration string (`"10s"`, `"5m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

/// A byte count: an integer or a string with a unit (`"512MiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BytesValue(pub u64);

const RATIO_EXPECTED: &str = "a ratio like 0.85 or a percentage like \"85%\"";
const DURATION_EXPECTED: &str = "a duration like \"10s\", \"5m\" or \"1h\"";
/// The longest duration a policy may give. The engine adds durations to its clock (`now +
/// cooldown`), so one near `u64::MAX` seconds would overflow; a year is past any sane setting.
const DURATION_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
const BYTES_EXPECTED: &str = "a byte count like 1073741824 or \"512MiB\" / \"2GiB\"";

impl<'de> Deserialize<'de> for RatioValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RatioValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(RATIO_EXPECTED)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RatioValue, E> {
                Ok(RatioValue(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RatioValue, E> {
                Ok(RatioValue(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RatioValue, E> {
                Ok(RatioValue(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RatioValue, E> {
                parse_percent(v)
                    .map(RatioValue)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// `"85%"` → 0.85. Only the percent form is accepted as a string, so `"0.85"` (a quoted
/// number, usually a mistake) is reported rather than guessed at.
fn parse_percent(text: &str) -> Option<f64> {
    let number = text.trim().strip_suffix('%')?.trim_end();
    let value: f64 = number.parse().ok()?;
    value.is_finite().then_some(value / 100.0)
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(DURATION_EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationValue, E> {
                let d = humantime::parse_duration(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))?;
                if d > DURATION_MAX {
                    return Err(E::invalid_value(
                        de::Unexpected::Str(v),
                        &"a duration of at most 365d",
                    ));
                }
                Ok(DurationValue(d))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for BytesValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = BytesValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(BYTES_EXPECTED)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<BytesValue, E> {
                u64::try_from(v)
                    .map(BytesValue)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<BytesValue, E> {
                Ok(BytesValue(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BytesValue, E> {
                parse_bytes(v)
                    .map(BytesValue)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// `"512MiB"` → 536870912. Decimal units (`MB`) are accepted too since operators write both.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_bytes_syntax() {
        assert_eq!(parse_percent("85%"), Some(0.85));
        assert_eq!(parse_percent(" 5 %"), Some(0.05));
        assert_eq!(parse_percent("0.85"), None);
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("7"), Some(7));
        assert_eq!(parse_bytes("7 parsecs"), None);
        assert_eq!(parse_bytes("99999999999999999999TiB"), None);
    }

    #[test]
    fn durations_past_a_year_are_refused() {
        let parse =
            |v: &str| toml::from_str::<BTreeMap<String, DurationValue>>(&format!("d = {v:?}"));
        assert_eq!(parse("365d").unwrap()["d"].0, DURATION_MAX);
        let err = parse("18446744073709551615s").unwrap_err().to_string();
        assert!(err.contains("expected a duration of at most 365d"), "{err}");
    }
}
