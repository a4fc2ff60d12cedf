//! What a link does to packets, written down: [`LinkConfig`], its compact text form and its JSON.
//!
//! For: command lines, scenario files and tests describing a link in one string such as
//! `delay=40ms,jitter=5ms,loss=1%,burst=0.01:0.3,reorder=1%,dup=0.1%,rate=100mbit,queue=256kb,mtu=1500,partition=5s+10s`.
//! Not for: applying it — that is [`super::Link`].
//!
//! Text form, items separated by commas, every item optional:
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `delay` | duration (`ns`, `us`, `ms`, `s`, `min`; decimals allowed) | one-way propagation delay |
//! | `jitter` | duration | delay varies uniformly within ±jitter (order is kept) |
//! | `loss` | probability (`1%` or `0.01`) | independent random loss |
//! | `burst` | `p:r[:loss_bad[:loss_good]]` | Gilbert–Elliott bursty loss, in `tc netem gemodel` order |
//! | `reorder` | probability | a packet is held back so later ones overtake it |
//! | `dup` (or `duplicate`) | probability | a packet is delivered twice |
//! | `rate` | `bit`, `kbit`, `mbit`, `gbit` (powers of 1000) | bottleneck rate |
//! | `queue` | bytes: `b`, `kb`/`k`, `mb`/`m`, `gb`/`g` (powers of 1024, as `tc`) | queue in front of the bottleneck |
//! | `mtu` | bytes | larger packets are dropped |
//! | `partition` | `START+DURATION`, repeatable, or several joined by `;` | everything dropped in the window |
//!
//! `none` (or the empty string) is a perfect link. Partition starts count from the link's start.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest delay or jitter accepted; anything longer is a typo, and it bounds how long a relay
/// holds a packet (and so its memory).
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Largest queue accepted: keeps the relay's memory bounded and the rate arithmetic far from
/// overflow.
pub const MAX_QUEUE_BYTES: u64 = 1 << 30;
/// Queue in front of the bottleneck when a rate is set but no queue is: about one bandwidth-delay
/// product of a 100 Mbit/s, 80 ms path, so the default does not itself cause loss.
pub const DEFAULT_QUEUE_BYTES: u64 = 1 << 20;
/// Most partitions one link keeps in its schedule (configured plus added at runtime).
pub const MAX_PARTITIONS: usize = 1024;
/// Largest MTU accepted: the largest UDP payload.
pub const MAX_MTU: usize = 65_535;

/// Everything a link does to packets. `Default` is a perfect link.
///
/// Fields are public so tests and scenario code can build one directly; [`LinkConfig::validate`]
/// (called by [`super::Link::new`]) rejects impossible values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkConfig {
    /// One-way propagation delay.
    #[serde(with = "duration_text")]
    pub delay: Duration,
    /// Delay varies uniformly within ±`jitter` (clamped at zero); packet order is kept, as on a
    /// real path where jitter comes from queues, not from packets passing each other.
    #[serde(with = "duration_text")]
    pub jitter: Duration,
    /// Probability that a packet is lost, independently of every other.
    pub loss: f64,
    /// Bursty loss, applied in addition to `loss`.
    pub burst: Option<GilbertElliott>,
    /// Probability that a packet is held back so that later packets overtake it.
    pub reorder: f64,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Bottleneck rate in bits per second; `None` is unlimited (and then there is no queue).
    pub rate_bps: Option<u64>,
    /// Bytes that may wait for the bottleneck; a packet that does not fit is tail-dropped.
    pub queue_bytes: u64,
    /// Packets longer than this are dropped (no fragmentation).
    pub mtu: Option<usize>,
    /// Windows, counted from the link's start, during which everything is dropped.
    pub partitions: Vec<Partition>,
}

/// Gilbert–Elliott two-state loss: a good and a bad state, each with its own loss probability,
/// and a Markov transition per packet. The mean burst length is `1 / p_bad_to_good` packets and
/// the stationary loss is `(r·loss_in_good + p·loss_in_bad) / (p + r)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GilbertElliott {
    /// Probability of moving from good to bad, per packet (`p`).
    pub p_good_to_bad: f64,
    /// Probability of moving from bad to good, per packet (`r`).
    pub p_bad_to_good: f64,
    /// Loss probability in the bad state (`1 - h`); defaults to 1.
    #[serde(default = "one")]
    pub loss_in_bad: f64,
    /// Loss probability in the good state (`1 - k`); defaults to 0.
    #[serde(default)]
    pub loss_in_good: f64,
}

/// A window during which the link drops everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Offset from the link's start.
    #[serde(with = "duration_text")]
    pub start: Duration,
    /// How long it lasts.
    #[serde(with = "duration_text")]
    pub duration: Duration,
}

/// Why a link configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An item's key is not one of the known keys.
    #[error("unknown link setting `{0}`")]
    UnknownKey(String),
    /// An item has no `=value`.
    #[error("link setting `{0}` needs a value (`{0}=…`)")]
    MissingValue(String),
    /// A value could not be read.
    #[error("link setting `{key}`: cannot read `{value}`: {reason}")]
    BadValue {
        /// The item's key.
        key: String,
        /// The text that could not be read.
        value: String,
        /// What was expected.
        reason: &'static str,
    },
    /// A value was read but is outside what a link can do.
    #[error("link setting `{key}` is out of range: {reason}")]
    OutOfRange {
        /// The field.
        key: &'static str,
        /// The allowed range.
        reason: &'static str,
    },
    /// More partitions than [`MAX_PARTITIONS`].
    #[error("more than {MAX_PARTITIONS} partitions")]
    TooManyPartitions,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: None,
            reorder: 0.0,
            duplicate: 0.0,
            rate_bps: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            mtu: None,
            partitions: Vec::new(),
        }
    }
}

impl LinkConfig {
    /// Checks every field against what a link can do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |key, reason| ConfigError::OutOfRange { key, reason };
        if self.delay > MAX_DELAY {
            return Err(range("delay", "at most 60s"));
        }
        if self.jitter > MAX_DELAY {
            return Err(range("jitter", "at most 60s"));
        }
        check_probability("loss", self.loss)?;
        check_probability("reorder", self.reorder)?;
        check_probability("duplicate", self.duplicate)?;
        if let Some(ge) = &self.burst {
            check_probability("burst p_good_to_bad", ge.p_good_to_bad)?;
            check_probability("burst p_bad_to_good", ge.p_bad_to_good)?;
            check_probability("burst loss_in_bad", ge.loss_in_bad)?;
            check_probability("burst loss_in_good", ge.loss_in_good)?;
        }
        if self.rate_bps == Some(0) {
            return Err(range("rate", "above 0 (use a partition to stop traffic)"));
        }
        if self.queue_bytes > MAX_QUEUE_BYTES {
            return Err(range("queue", "at most 1gb"));
        }
        if let Some(mtu) = self.mtu {
            if mtu == 0 || mtu > MAX_MTU {
                return Err(range("mtu", "1 to 65535 bytes"));
            }
        }
        if self.partitions.len() > MAX_PARTITIONS {
            return Err(ConfigError::TooManyPartitions);
        }
        Ok(())
    }

    /// True when the link changes nothing: the relay's fast path and the text form's `none`.
    pub fn is_perfect(&self) -> bool {
        *self == Self::default()
    }
}

impl FromStr for LinkConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let mut config = LinkConfig::default();
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("none") {
            return Ok(config);
        }
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| ConfigError::MissingValue(item.to_owned()))?;
            let bad = |reason| ConfigError::BadValue {
                key: key.to_owned(),
                value: value.to_owned(),
                reason,
            };
            match key.to_ascii_lowercase().as_str() {
                "delay" => config.delay = parse_duration(value).ok_or_else(|| bad(DURATION))?,
                "jitter" => config.jitter = parse_duration(value).ok_or_else(|| bad(DURATION))?,
                "loss" => config.loss = parse_probability(value).ok_or_else(|| bad(PROB))?,
                "reorder" => config.reorder = parse_probability(value).ok_or_else(|| bad(PROB))?,
                "dup" | "duplicate" => {
                    config.duplicate = parse_probability(value).ok_or_else(|| bad(PROB))?
                }
                "burst" => config.burst = Some(parse_burst(value).ok_or_else(|| bad(BURST))?),
                "rate" => config.rate_bps = Some(parse_rate(value).ok_or_else(|| bad(RATE))?),
                "queue" => config.queue_bytes = parse_bytes(value).ok_or_else(|| bad(BYTES))?,
                "mtu" => {
                    let mtu = parse_bytes(value).ok_or_else(|| bad(BYTES))?;
                    // Too large for usize is as out of range as too large for UDP.
                    config.mtu = Some(usize::try_from(mtu).unwrap_or(usize::MAX));
                }
                "partition" => {
                    for window in value.split(';').map(str::trim).filter(|w| !w.is_empty()) {
                        config
                            .partitions
                            .push(parse_partition(window).ok_or_else(|| bad(PARTITION))?);
                    }
                }
                _ => return Err(ConfigError::UnknownKey(key.to_owned())),
            }
        }
        config.validate()?;
        Ok(config)
    }
}

/// The compact text form; parsing it back gives an equal config.
impl fmt::Display for LinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = Vec::new();
        if !self.delay.is_zero() {
            items.push(format!("delay={}", DurationText(self.delay)));
        }
        if !self.jitter.is_zero() {
            items.push(format!("jitter={}", DurationText(self.jitter)));
        }
        if self.loss != 0.0 {
            items.push(format!("loss={}", self.loss));
        }
        if let Some(ge) = &self.burst {
            if ge.loss_in_bad == 1.0 && ge.loss_in_good == 0.0 {
                items.push(format!("burst={}:{}", ge.p_good_to_bad, ge.p_bad_to_good));
            } else {
                items.push(format!(
                    "burst={}:{}:{}:{}",
                    ge.p_good_to_bad, ge.p_bad_to_good, ge.loss_in_bad, ge.loss_in_good
                ));
            }
        }
        if self.reorder != 0.0 {
            items.push(format!("reorder={}", self.reorder));
        }
        if self.duplicate != 0.0 {
            items.push(format!("dup={}", self.duplicate));
        }
        if let Some(rate) = self.rate_bps {
            items.push(format!("rate={}", RateText(rate)));
        }
        if self.queue_bytes != DEFAULT_QUEUE_BYTES {
            items.push(format!("queue={}", BytesText(self.queue_bytes)));
        }
        if let Some(mtu) = self.mtu {
            items.push(format!("mtu={mtu}"));
        }
        for p in &self.partitions {
            items.push(format!(
                "partition={}+{}",
                DurationText(p.start),
                DurationText(p.duration)
            ));
        }
        if items.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&items.join(","))
        }
    }
}

const DURATION: &str = "a duration such as 40ms, 1.5s, 250us";
const PROB: &str = "a probability such as 1% or 0.01, between 0 and 1";
const BURST: &str = "p:r[:loss_bad[:loss_good]], each a probability";
const RATE: &str = "a rate such as 100mbit, 512kbit, 1gbit";
const BYTES: &str = "a size such as 1500, 256kb, 4mb";
const PARTITION: &str = "START+DURATION such as 5s+10s";

fn one() -> f64 {
    1.0
}

fn check_probability(key: &'static str, p: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        // NaN lands here too, since it is in no range.
        Err(ConfigError::OutOfRange {
            key,
            reason: "a probability between 0 and 1",
        })
    }
}

/// Splits `40ms` into `(40, "ms")`: the number is the leading run of digits and dots.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    (&text[..end], text[end..].trim())
}

/// `number × scale`, exact for integers, rounded for decimals; `None` on overflow or garbage.
fn scaled(number: &str, scale: u64) -> Option<u64> {
    if number.is_empty() {
        return None;
    }
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(scale);
    }
    let x = number.parse::<f64>().ok()?;
    let v = (x * scale as f64).round();
    // Beyond 2^64 the cast would saturate silently; refuse instead.
    (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = split_number(text.trim());
    let scale = match unit.to_ascii_lowercase().as_str() {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "min" => 60_000_000_000,
        // A bare 0 needs no unit; any other bare number is ambiguous.
        "" if number.parse::<f64>().ok() == Some(0.0) => 1,
        _ => return None,
    };
    scaled(number, scale).map(Duration::from_nanos)
}

fn parse_probability(text: &str) -> Option<f64> {
    let text = text.trim();
    let p = match text.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().ok()? / 100.0,
        None => text.parse::<f64>().ok()?,
    };
    (0.0..=1.0).contains(&p).then_some(p)
}

fn parse_burst(text: &str) -> Option<GilbertElliott> {
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=4).contains(&parts.len()) {
        return None;
    }
    Some(GilbertElliott {
        p_good_to_bad: parse_probability(parts[0])?,
        p_bad_to_good: parse_probability(parts[1])?,
        loss_in_bad: match parts.get(2) {
            Some(v) => parse_probability(v)?,
            None => 1.0,
        },
        loss_in_good: match parts.get(3) {
            Some(v) => parse_probability(v)?,
            None => 0.0,
        },
    })
}

fn parse_rate(text: &str) -> Option<u64> {
    let (number, unit) = split_number(text.trim());
    // Only bit units: `mbps` means megabits to some and megabytes to `tc`, so it is refused.
    let scale = match unit.to_ascii_lowercase().as_str() {
        "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        _ => return None,
    };
    scaled(number, scale)
}

fn parse_bytes(text: &str) -> Option<u64> {
    let (number, unit) = split_number(text.trim());
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    scaled(number, scale)
}

fn parse_partition(text: &str) -> Option<Partition> {
    let (start, duration) = text.split_once('+')?;
    Some(Partition {
        start: parse_duration(start)?,
        duration: parse_duration(duration)?,
    })
}

/// Shows a duration in the largest unit that keeps it exact, so it parses back unchanged.
struct DurationText(Duration);

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        for (scale, unit) in [(1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "us")] {
            if ns % scale == 0 {
                return write!(f, "{}{unit}", ns / scale);
            }
        }
        write!(f, "{ns}ns")
    }
}

struct RateText(u64);

impl fmt::Display for RateText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (scale, unit) in [
            (1_000_000_000, "gbit"),
            (1_000_000, "mbit"),
            (1_000, "kbit"),
        ] {
            if self.0 % scale == 0 {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}bit", self.0)
    }
}

struct BytesText(u64);

impl fmt::Display for BytesText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (scale, unit) in [(1 << 30, "gb"), (1 << 20, "mb"), (1 << 10, "kb")] {
            if self.0 != 0 && self.0 % scale == 0 {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}b", self.0)
    }
}

/// Durations in JSON as the same text the compact form uses (`"40ms"`), not serde's
/// `{secs, nanos}`, so config files stay readable.
mod duration_text {
    use std::time::Duration;

    use serde::{de, Deserialize, Deserializer, Serializer};

    use super::{parse_duration, DurationText, DURATION};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&DurationText(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .ok_or_else(|| de::Error::custom(format!("cannot read `{text}` as {DURATION}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "delay=40ms,jitter=5ms,loss=1%,burst=0.01:0.3,reorder=1%,dup=0.1%,rate=100mbit,queue=256kb,mtu=1500,partition=5s+10s";

    #[test]
    fn parses_the_documented_example() {
        let c: LinkConfig = EXAMPLE.parse().unwrap();
        assert_eq!(c.delay, Duration::from_millis(40));
        assert_eq!(c.jitter, Duration::from_millis(5));
        assert_eq!(c.loss, 0.01);
        assert_eq!(
            c.burst,
            Some(GilbertElliott {
                p_good_to_bad: 0.01,
                p_bad_to_good: 0.3,
                loss_in_bad: 1.0,
                loss_in_good: 0.0
            })
        );
        assert_eq!(c.reorder, 0.01);
        assert_eq!(c.duplicate, 0.001);
        assert_eq!(c.rate_bps, Some(100_000_000));
        assert_eq!(c.queue_bytes, 256 * 1024);
        assert_eq!(c.mtu, Some(1500));
        assert_eq!(
            c.partitions,
            vec![Partition {
                start: Duration::from_secs(5),
                duration: Duration::from_secs(10)
            }]
        );
    }

    #[test]
    fn text_and_json_round_trip() {
        let c: LinkConfig = format!("{EXAMPLE},partition=1.5s+250us;1min+0")
            .parse()
            .unwrap();
        assert_eq!(c.partitions.len(), 3);
        assert_eq!(c.to_string().parse::<LinkConfig>().unwrap(), c);
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"delay\":\"40ms\""), "{json}");
        assert_eq!(serde_json::from_str::<LinkConfig>(&json).unwrap(), c);
    }

    #[test]
    fn json_fields_default() {
        let c: LinkConfig = serde_json::from_str(
            r#"{"delay":"10ms","burst":{"p_good_to_bad":0.1,"p_bad_to_good":0.5}}"#,
        )
        .unwrap();
        assert_eq!(c.delay, Duration::from_millis(10));
        assert_eq!(c.burst.unwrap().loss_in_bad, 1.0);
        assert_eq!(c.queue_bytes, DEFAULT_QUEUE_BYTES);
        assert!(serde_json::from_str::<LinkConfig>(r#"{"dealy":"10ms"}"#).is_err());
        assert!(serde_json::from_str::<LinkConfig>(r#"{"delay":"10 parsecs"}"#).is_err());
    }

    #[test]
    fn none_is_perfect() {
        for text in ["", "none", " NONE ", ","] {
            let c: LinkConfig = text.parse().unwrap();
            assert!(c.is_perfect(), "{text:?}");
        }
        assert_eq!(LinkConfig::default().to_string(), "none");
    }

    #[test]
    fn rejects_bad_input_with_the_right_error() {
        let err = |t: &str| t.parse::<LinkConfig>().unwrap_err();
        assert_eq!(err("colour=red"), ConfigError::UnknownKey("colour".into()));
        assert_eq!(err("delay"), ConfigError::MissingValue("delay".into()));
        assert!(matches!(err("delay=40"), ConfigError::BadValue { .. }));
        assert!(matches!(err("loss=150%"), ConfigError::BadValue { .. }));
        assert!(matches!(err("loss=-1"), ConfigError::BadValue { .. }));
        assert!(matches!(err("loss=NaN"), ConfigError::BadValue { .. }));
        assert!(matches!(err("rate=100mbps"), ConfigError::BadValue { .. }));
        assert!(matches!(err("burst=0.1"), ConfigError::BadValue { .. }));
        assert!(matches!(err("partition=5s"), ConfigError::BadValue { .. }));
        assert!(matches!(
            err("delay=99999999999999999999s"),
            ConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("delay=61s"),
            ConfigError::OutOfRange { key: "delay", .. }
        ));
        assert!(matches!(
            err("rate=0bit"),
            ConfigError::OutOfRange { key: "rate", .. }
        ));
        assert!(matches!(
            err("mtu=0"),
            ConfigError::OutOfRange { key: "mtu", .. }
        ));
        assert!(matches!(
            err("queue=2gb"),
            ConfigError::OutOfRange { key: "queue", .. }
        ));
    }

    #[test]
    fn units() {
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_rate("1.5mbit"), Some(1_500_000));
        assert_eq!(parse_rate("8000bit"), Some(8000));
        assert_eq!(parse_bytes("4MB"), Some(4 << 20));
        assert_eq!(parse_bytes("1500"), Some(1500));
        assert_eq!(RateText(1_500_000).to_string(), "1500kbit");
        assert_eq!(BytesText(1500).to_string(), "1500b");
    }
}
