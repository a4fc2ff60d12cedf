//! The link model: what one direction of a network path does to each packet.
//!
//! For: deciding, per packet, whether it is dropped (and why) or when it arrives — delay,
//! jitter, random and bursty loss, reordering, duplication, a rate-limited bottleneck with a
//! tail-drop queue, an MTU and scheduled partitions — deterministically from a seed.
//! Not for: moving bytes. Like s2n-quic's network simulator and quinn-proto, this is sans-IO:
//! no sockets, no clock (`now` is passed in), no randomness but its seeded generator. The UDP
//! relay ([`crate::relay`]) and, later, the TUN link drive it; a test can drive it with a loop.
//!
//! The stages a packet meets, in order — the order a real path imposes:
//! 1. partition: a packet sent while the link is cut is dropped (one already on the wire when a
//!    cut starts still arrives, as if the cut were at the sender's end);
//! 2. MTU: longer packets are dropped, never fragmented;
//! 3. bottleneck: at `rate`, a packet waits for those before it; if the bytes waiting plus this
//!    one exceed `queue`, it is tail-dropped (an idle link always takes one packet);
//! 4. loss: Gilbert–Elliott, then independent loss — after the bottleneck, because a packet lost
//!    on the wire still used the link's time;
//! 5. delay ± jitter, kept in order; a reordered packet is held back instead so later ones pass;
//! 6. duplication: a second copy arrives with the first.

mod config;
mod rng;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use self::config::{
    ConfigError, GilbertElliott, LinkConfig, Partition, DEFAULT_QUEUE_BYTES, MAX_DELAY, MAX_MTU,
    MAX_PARTITIONS, MAX_QUEUE_BYTES,
};
use self::rng::Rng;

/// Least extra delay of a reordered packet. It is held back by `max(delay, MIN_REORDER_HOLD)`,
/// so on a zero-delay link it is still overtaken by anything sent within this time after it.
pub const MIN_REORDER_HOLD: Duration = Duration::from_millis(5);

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// What the link does with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The packet never arrives.
    Dropped(DropReason),
    /// The packet arrives at `at`; when duplicated, a second copy arrives at `duplicate_at`.
    Delivered {
        /// When the packet arrives.
        at: Instant,
        /// When its duplicate arrives, if it has one.
        duplicate_at: Option<Instant>,
    },
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// Sent during a partition.
    Partition,
    /// Longer than the MTU.
    Mtu,
    /// The bottleneck's queue was full.
    QueueFull,
    /// Independent random loss.
    RandomLoss,
    /// Gilbert–Elliott bursty loss.
    BurstLoss,
}

/// Counters of what a link did; bytes are the lengths passed to [`Link::handle_packet`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Packets offered to the link.
    pub sent_packets: u64,
    /// Bytes offered to the link.
    pub sent_bytes: u64,
    /// Packets that arrive (a duplicated packet counts once).
    pub delivered_packets: u64,
    /// Bytes that arrive (duplicates not counted).
    pub delivered_bytes: u64,
    /// Extra copies delivered.
    pub duplicated_packets: u64,
    /// Packets held back so that later ones overtake them.
    pub reordered_packets: u64,
    /// Packets dropped, for any reason.
    pub dropped_packets: u64,
    /// Bytes dropped, for any reason.
    pub dropped_bytes: u64,
    /// Packets dropped, by reason.
    pub dropped: DropCounts,
    /// The time in the link the model scheduled for each delivered packet (its arrival minus
    /// the `now` it was offered at): queueing, transmission, delay, jitter and any hold-back.
    /// What the emulator decided, so independent of how promptly a relay then acts on it.
    pub scheduled_delay: DurationSummary,
    /// What the bottleneck did; all zero without a rate.
    pub shaper: ShaperStats,
    /// Link time (since the link's start) of every packet dropped by a partition: `min` is the
    /// first such drop and `max` the last, so both can be checked against the windows.
    pub partition_drop_at: DurationSummary,
}

/// Count, sum, least and greatest of a set of durations, in nanoseconds (saturating), so that
/// a summary stays a few integers however many packets it covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurationSummary {
    /// How many durations were recorded.
    pub count: u64,
    /// Their sum.
    pub sum_ns: u64,
    /// The least (0 when none were recorded).
    pub min_ns: u64,
    /// The greatest (0 when none were recorded).
    pub max_ns: u64,
}

/// What the rate-limited bottleneck did with the packets it accepted (those not dropped by a
/// partition, the MTU or a full queue; packets lost after it still took its time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShaperStats {
    /// Packets accepted.
    pub accepted_packets: u64,
    /// Bytes accepted.
    pub accepted_bytes: u64,
    /// Accepted packets that found the bottleneck busy and waited behind others.
    pub queued_packets: u64,
    /// How long each accepted packet waited before its transmission began (zero when idle).
    pub wait: DurationSummary,
    /// Transmission time the bottleneck spent on accepted packets: their bits over the rate.
    pub busy_ns: u64,
    /// Most bytes waiting (the accepted packet included) right after a packet was accepted;
    /// never above the queue size, except for the one packet an idle link always takes.
    pub peak_backlog_bytes: u64,
}

/// Dropped packets by [`DropReason`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounts {
    /// [`DropReason::Partition`].
    pub partition: u64,
    /// [`DropReason::Mtu`].
    pub mtu: u64,
    /// [`DropReason::QueueFull`].
    pub queue_full: u64,
    /// [`DropReason::RandomLoss`].
    pub random_loss: u64,
    /// [`DropReason::BurstLoss`].
    pub burst_loss: u64,
}

/// One direction of a path. Owns its generator and state; give each direction its own `Link`.
#[derive(Debug, Clone)]
pub struct Link {
    config: LinkConfig,
    rng: Rng,
    /// Partition offsets count from here.
    start: Instant,
    /// Gilbert–Elliott state: true while in the bad state.
    burst_bad: bool,
    /// When the bottleneck finishes sending what it has accepted so far.
    busy_until: Instant,
    /// Latest arrival of an in-order packet; later in-order packets never arrive before it.
    last_arrival: Option<Instant>,
    stats: LinkStats,
}

impl Verdict {
    /// Every arrival time: none, one, or two for a duplicated packet.
    pub fn delivery_times(&self) -> impl Iterator<Item = Instant> {
        let (first, second) = match *self {
            Verdict::Dropped(_) => (None, None),
            Verdict::Delivered { at, duplicate_at } => (Some(at), duplicate_at),
        };
        first.into_iter().chain(second)
    }

    /// The drop reason, if dropped.
    pub fn drop_reason(&self) -> Option<DropReason> {
        match self {
            Verdict::Dropped(reason) => Some(*reason),
            Verdict::Delivered { .. } => None,
        }
    }
}

impl DurationSummary {
    /// Adds one duration.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if self.count == 0 {
            (self.min_ns, self.max_ns) = (ns, ns);
        } else {
            self.min_ns = self.min_ns.min(ns);
            self.max_ns = self.max_ns.max(ns);
        }
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Adds every duration another summary holds.
    pub fn merge(&mut self, other: &DurationSummary) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count += other.count;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// The least duration, if any was recorded.
    pub fn min(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.min_ns))
    }

    /// The greatest duration, if any was recorded.
    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.max_ns))
    }

    /// The mean, if any duration was recorded.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.sum_ns / self.count))
    }
}

impl Link {
    /// A link that starts (for its partition schedule) at `start`, drawing from `seed`.
    pub fn new(config: LinkConfig, seed: u64, start: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            rng: Rng::new(seed),
            start,
            burst_bad: false,
            busy_until: start,
            last_arrival: None,
            stats: LinkStats::default(),
        })
    }

    /// Decides the fate of a packet of `len` bytes entering the link at `now`.
    ///
    /// `now` must not go backwards between calls; if it does, it is treated as the latest `now`
    /// seen so far would be for the bottleneck (a packet cannot start before its predecessor).
    pub fn handle_packet(&mut self, now: Instant, len: usize) -> Verdict {
        let bytes = len as u64;
        self.stats.sent_packets += 1;
        self.stats.sent_bytes += bytes;
        let verdict = self.decide(now, len);
        match verdict {
            Verdict::Dropped(reason) => {
                self.stats.dropped_packets += 1;
                self.stats.dropped_bytes += bytes;
                let d = &mut self.stats.dropped;
                match reason {
                    DropReason::Partition => {
                        d.partition += 1;
                        let at = now.saturating_duration_since(self.start);
                        self.stats.partition_drop_at.record(at);
                    }
                    DropReason::Mtu => d.mtu += 1,
                    DropReason::QueueFull => d.queue_full += 1,
                    DropReason::RandomLoss => d.random_loss += 1,
                    DropReason::BurstLoss => d.burst_loss += 1,
                }
            }
            Verdict::Delivered { at, duplicate_at } => {
                self.stats
                    .scheduled_delay
                    .record(at.saturating_duration_since(now));
                self.stats.delivered_packets += 1;
                self.stats.delivered_bytes += bytes;
                if duplicate_at.is_some() {
                    self.stats.duplicated_packets += 1;
                }
            }
        }
        verdict
    }

    /// The configuration in force.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Replaces the configuration, keeping the start, the generator, the queue and the burst
    /// state — as a path whose conditions change, not a new path.
    pub fn set_config(&mut self, config: LinkConfig) -> Result<(), ConfigError> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Cuts the link from `now` for `duration` (raft-rs's `cut`, with its own `recover`).
    pub fn add_partition(&mut self, now: Instant, duration: Duration) -> Result<(), ConfigError> {
        let elapsed = now.saturating_duration_since(self.start);
        if self.config.partitions.len() >= MAX_PARTITIONS {
            // Make room by forgetting windows that are over; they can never matter again.
            self.config
                .partitions
                .retain(|p| p.start.saturating_add(p.duration) > elapsed);
        }
        if self.config.partitions.len() >= MAX_PARTITIONS {
            return Err(ConfigError::TooManyPartitions);
        }
        self.config.partitions.push(Partition {
            start: elapsed,
            duration,
        });
        Ok(())
    }

    /// True while a partition window covers `now`.
    pub fn is_partitioned(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.start);
        self.config
            .partitions
            .iter()
            .any(|p| p.start <= elapsed && elapsed < p.start.saturating_add(p.duration))
    }

    /// What the link has done so far.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// The instant partition offsets count from.
    pub fn start(&self) -> Instant {
        self.start
    }

    fn decide(&mut self, now: Instant, len: usize) -> Verdict {
        if self.is_partitioned(now) {
            return Verdict::Dropped(DropReason::Partition);
        }
        if self.config.mtu.is_some_and(|mtu| len > mtu) {
            return Verdict::Dropped(DropReason::Mtu);
        }
        let sent = match self.config.rate_bps {
            Some(rate) => match self.enqueue(now, len, rate) {
                Some(done) => done,
                None => return Verdict::Dropped(DropReason::QueueFull),
            },
            None => now,
        };
        if let Some(ge) = self.config.burst {
            let p_loss = if self.burst_bad {
                ge.loss_in_bad
            } else {
                ge.loss_in_good
            };
            let lost = self.rng.chance(p_loss);
            let p_flip = if self.burst_bad {
                ge.p_bad_to_good
            } else {
                ge.p_good_to_bad
            };
            if self.rng.chance(p_flip) {
                self.burst_bad = !self.burst_bad;
            }
            if lost {
                return Verdict::Dropped(DropReason::BurstLoss);
            }
        }
        if self.rng.chance(self.config.loss) {
            return Verdict::Dropped(DropReason::RandomLoss);
        }
        let mut at = sent + self.jittered_delay();
        if self.rng.chance(self.config.reorder) {
            // Held back without raising `last_arrival`, so packets behind it are free to pass.
            at += self.config.delay.max(MIN_REORDER_HOLD);
            self.stats.reordered_packets += 1;
        } else {
            if let Some(last) = self.last_arrival {
                at = at.max(last);
            }
            self.last_arrival = Some(at);
        }
        let duplicate_at = self.rng.chance(self.config.duplicate).then_some(at);
        Verdict::Delivered { at, duplicate_at }
    }

    /// Puts `len` bytes through the bottleneck; returns when its last bit leaves, or `None` when
    /// the queue has no room.
    fn enqueue(&mut self, now: Instant, len: usize, rate: u64) -> Option<Instant> {
        let waiting = self.busy_until.saturating_duration_since(now);
        // Bytes not yet sent, from the time the bottleneck still needs; rounded down so that the
        // rounding up of each packet's transmission time below never counts as queued bytes.
        let backlog = waiting.as_nanos() * u128::from(rate) / (8 * NANOS_PER_SEC);
        if backlog > 0 && backlog + len as u128 > u128::from(self.config.queue_bytes) {
            return None;
        }
        let bits = len as u128 * 8;
        let nanos = (bits * NANOS_PER_SEC).div_ceil(u128::from(rate));
        let transmit = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        let done = self.busy_until.max(now) + transmit;
        self.busy_until = done;
        let shaper = &mut self.stats.shaper;
        shaper.accepted_packets += 1;
        shaper.accepted_bytes += len as u64;
        if !waiting.is_zero() {
            shaper.queued_packets += 1;
        }
        shaper.wait.record(waiting);
        shaper.busy_ns = shaper
            .busy_ns
            .saturating_add(u64::try_from(nanos).unwrap_or(u64::MAX));
        let backlog = u64::try_from(backlog).unwrap_or(u64::MAX);
        shaper.peak_backlog_bytes = shaper.peak_backlog_bytes.max(backlog + len as u64);
        Some(done)
    }

    fn jittered_delay(&mut self) -> Duration {
        let jitter = self.config.jitter;
        if jitter.is_zero() {
            return self.config.delay;
        }
        // Both are at most MAX_DELAY (validated), so nanoseconds fit a u64 with room to spare.
        let j = jitter.as_nanos() as u64;
        let offset = self.rng.up_to(2 * j);
        let delay = self.config.delay.as_nanos() as u64;
        Duration::from_nanos((delay + offset).saturating_sub(j))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(text: &str, seed: u64) -> (Link, Instant) {
        let start = Instant::now();
        (
            Link::new(text.parse().unwrap(), seed, start).unwrap(),
            start,
        )
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Offers `n` packets of `len` bytes, one every `gap`, and returns the verdicts.
    fn run(link: &mut Link, start: Instant, n: usize, len: usize, gap: Duration) -> Vec<Verdict> {
        (0..n)
            .map(|i| link.handle_packet(start + gap * i as u32, len))
            .collect()
    }

    const EVERYTHING: &str =
        "delay=40ms,jitter=5ms,loss=1%,burst=0.01:0.3,reorder=1%,dup=1%,rate=100mbit,queue=64kb,mtu=1400";

    #[test]
    fn same_seed_same_verdicts_other_seed_other_verdicts() {
        let (mut a, start) = link(EVERYTHING, 42);
        let mut b = Link::new(EVERYTHING.parse().unwrap(), 42, start).unwrap();
        let mut c = Link::new(EVERYTHING.parse().unwrap(), 43, start).unwrap();
        // Lengths vary so the MTU and queue stages take part too.
        let offer = |l: &mut Link| -> Vec<Verdict> {
            (0..20_000u32)
                .map(|i| {
                    l.handle_packet(
                        start + Duration::from_micros(50) * i,
                        1000 + (i as usize * 7) % 600,
                    )
                })
                .collect()
        };
        let va = offer(&mut a);
        assert_eq!(va, offer(&mut b));
        assert_eq!(a.stats(), b.stats());
        assert_ne!(va, offer(&mut c));
    }

    #[test]
    fn random_loss_matches_configuration() {
        let (mut l, start) = link("loss=1%", 1);
        let n = 100_000;
        let v = run(&mut l, start, n, 1200, Duration::from_micros(10));
        let lost = v
            .iter()
            .filter(|v| v.drop_reason() == Some(DropReason::RandomLoss))
            .count();
        // Binomial(100k, 1%) has a standard deviation of ~31; ±150 is ~5 of them.
        assert!((850..=1150).contains(&lost), "lost {lost} of {n}");
        assert_eq!(l.stats().dropped.random_loss, lost as u64);
        assert_eq!(l.stats().delivered_packets + lost as u64, n as u64);
    }

    #[test]
    fn gilbert_elliott_matches_its_stationary_loss() {
        for (text, p, r, h, k) in [
            ("burst=0.01:0.3", 0.01, 0.3, 1.0, 0.0),
            ("burst=5%:20%:80%:1%", 0.05, 0.2, 0.8, 0.01),
        ] {
            let (mut l, start) = link(text, 9);
            let n = 1_000_000;
            run(&mut l, start, n, 100, Duration::from_micros(1));
            let expected = (r * k + p * h) / (p + r);
            let measured = l.stats().dropped.burst_loss as f64 / n as f64;
            assert!(
                (measured - expected).abs() < expected * 0.1,
                "{text}: measured {measured}, stationary {expected}"
            );
        }
    }

    #[test]
    fn gilbert_elliott_losses_come_in_bursts() {
        // Same average loss as independent loss would give, but runs of losses are much longer.
        let (mut l, start) = link("burst=0.01:0.25", 3);
        let v = run(&mut l, start, 200_000, 100, Duration::from_micros(1));
        let (mut runs, mut lost) = (0, 0);
        for (i, verdict) in v.iter().enumerate() {
            if verdict.drop_reason().is_some() {
                lost += 1;
                if i == 0 || v[i - 1].drop_reason().is_none() {
                    runs += 1;
                }
            }
        }
        let mean_run = lost as f64 / runs as f64;
        // Expected 1/r = 4; independent loss at ~4% would give ~1.04.
        assert!((3.0..5.0).contains(&mean_run), "mean burst {mean_run}");
    }

    #[test]
    fn rate_spaces_a_burst_by_its_transmission_time() {
        // 1000 bytes at 8 Mbit/s take exactly 1 ms.
        let (mut l, start) = link("rate=8mbit,delay=10ms", 0);
        let v = run(&mut l, start, 50, 1000, Duration::ZERO);
        let times: Vec<Instant> = v.iter().flat_map(Verdict::delivery_times).collect();
        assert_eq!(times.len(), 50);
        for (i, t) in times.iter().enumerate() {
            assert_eq!(*t - start, ms(10) + ms(1) * (i as u32 + 1), "packet {i}");
        }
        // The counters say the same: packet i waited i ms, took 1 ms and flew 10 ms.
        let s = l.stats();
        assert_eq!(s.scheduled_delay.count, 50);
        assert_eq!(s.scheduled_delay.min(), Some(ms(11)));
        assert_eq!(s.scheduled_delay.max(), Some(ms(60)));
        assert_eq!(s.scheduled_delay.sum_ns, (11..=60).sum::<u64>() * 1_000_000);
        assert_eq!(s.shaper.accepted_packets, 50);
        assert_eq!(s.shaper.accepted_bytes, 50_000);
        assert_eq!(s.shaper.queued_packets, 49);
        assert_eq!(s.shaper.wait.max(), Some(ms(49)));
        assert_eq!(s.shaper.busy_ns, 50_000_000);
        assert_eq!(s.shaper.peak_backlog_bytes, 50_000);
    }

    #[test]
    fn rate_does_not_delay_packets_on_an_idle_link() {
        let (mut l, start) = link("rate=8mbit", 0);
        let v = run(&mut l, start, 10, 1000, ms(5));
        for (i, verdict) in v.iter().enumerate() {
            let Verdict::Delivered { at, .. } = verdict else {
                panic!("dropped {verdict:?}")
            };
            assert_eq!(*at - start, ms(5) * i as u32 + ms(1));
        }
        let s = l.stats();
        assert_eq!(s.shaper.queued_packets, 0);
        assert_eq!(s.shaper.wait.max(), Some(Duration::ZERO));
        assert_eq!(s.shaper.peak_backlog_bytes, 1000);
        assert_eq!(s.scheduled_delay.min(), Some(ms(1)));
        assert_eq!(s.scheduled_delay.max(), Some(ms(1)));
    }

    #[test]
    fn a_full_queue_tail_drops() {
        // 8000 bit/s drains 1000 bytes a second; a 10 KiB queue holds ten 1000-byte packets.
        let (mut l, start) = link("rate=8000bit,queue=10kb", 0);
        let v = run(&mut l, start, 100, 1000, Duration::ZERO);
        let accepted = v.iter().take_while(|v| v.drop_reason().is_none()).count();
        assert_eq!(accepted, 10);
        assert!(v[10..]
            .iter()
            .all(|v| v.drop_reason() == Some(DropReason::QueueFull)));
        assert_eq!(l.stats().dropped.queue_full, 90);
        assert_eq!(l.stats().shaper.accepted_packets, 10);
        assert_eq!(l.stats().shaper.peak_backlog_bytes, 10_000);
        // Once the queue drains, packets are accepted again.
        let later = l.handle_packet(start + Duration::from_secs(10), 1000);
        assert!(later.drop_reason().is_none());
    }

    #[test]
    fn partition_drops_everything_in_its_window_and_nothing_outside() {
        let (mut l, start) = link("partition=1s+500ms,partition=3s+1ms", 5);
        let v = run(&mut l, start, 5000, 100, ms(1));
        for (i, verdict) in v.iter().enumerate() {
            let t = i as u64;
            let inside = (1000..1500).contains(&t) || t == 3000;
            assert_eq!(
                verdict.drop_reason() == Some(DropReason::Partition),
                inside,
                "packet at {t} ms"
            );
            assert_eq!(verdict.drop_reason().is_some(), inside, "packet at {t} ms");
        }
        assert_eq!(l.stats().dropped.partition, 501);
        let at = l.stats().partition_drop_at;
        assert_eq!(
            (at.count, at.min(), at.max()),
            (501, Some(ms(1000)), Some(ms(3000)))
        );
        // With no delay and no rate, every delivered packet is due the instant it is offered.
        assert_eq!(l.stats().scheduled_delay.max(), Some(Duration::ZERO));
    }

    #[test]
    fn a_partition_added_at_runtime_starts_now() {
        let (mut l, start) = link("none", 0);
        assert!(l.handle_packet(start + ms(100), 10).drop_reason().is_none());
        l.add_partition(start + ms(200), ms(50)).unwrap();
        assert!(!l.is_partitioned(start + ms(199)));
        assert!(l.is_partitioned(start + ms(200)));
        assert_eq!(
            l.handle_packet(start + ms(249), 10).drop_reason(),
            Some(DropReason::Partition)
        );
        assert!(l.handle_packet(start + ms(250), 10).drop_reason().is_none());
    }

    #[test]
    fn mtu_drops_only_larger_packets() {
        let (mut l, start) = link("mtu=1500", 0);
        assert!(l.handle_packet(start, 1500).drop_reason().is_none());
        assert_eq!(
            l.handle_packet(start, 1501).drop_reason(),
            Some(DropReason::Mtu)
        );
        assert_eq!(l.stats().dropped.mtu, 1);
        assert_eq!(l.stats().dropped_bytes, 1501);
    }

    #[test]
    fn jitter_stays_in_bounds_and_keeps_order() {
        let (mut l, start) = link("delay=50ms,jitter=10ms", 11);
        let v = run(&mut l, start, 10_000, 100, ms(1));
        let mut previous = start;
        for (i, verdict) in v.iter().enumerate() {
            let Verdict::Delivered {
                at,
                duplicate_at: None,
            } = *verdict
            else {
                panic!("unexpected {verdict:?}")
            };
            let sent = start + ms(i as u64);
            assert!(at >= previous, "packet {i} overtook");
            // Order is kept, so a packet can wait for a slow predecessor beyond +jitter; with
            // 1 ms spacing it cannot wait beyond the predecessor's bound.
            assert!(
                at - sent >= ms(40) && at - sent <= ms(60),
                "packet {i}: {:?}",
                at - sent
            );
            previous = at;
        }
        let d = l.stats().scheduled_delay;
        assert_eq!(d.count, 10_000);
        assert!(
            d.min().unwrap() >= ms(40) && d.max().unwrap() <= ms(60),
            "{d:?}"
        );
    }

    #[test]
    fn duration_summaries_merge_like_one_summary() {
        let (mut a, mut b, mut all) =
            <(DurationSummary, DurationSummary, DurationSummary)>::default();
        for (i, d) in [7u64, 3, 9, 1, 4].into_iter().enumerate() {
            let d = ms(d);
            let part: &mut DurationSummary = if i % 2 == 0 { &mut a } else { &mut b };
            part.record(d);
            all.record(d);
        }
        let mut merged = DurationSummary::default();
        merged.merge(&a);
        merged.merge(&b);
        merged.merge(&DurationSummary::default());
        assert_eq!(merged, all);
        assert_eq!(
            (all.min(), all.max(), all.count),
            (Some(ms(1)), Some(ms(9)), 5)
        );
        assert_eq!(DurationSummary::default().mean(), None);
    }

    #[test]
    fn reordering_lets_later_packets_overtake() {
        let (mut l, start) = link("delay=20ms,reorder=10%", 4);
        let v = run(&mut l, start, 10_000, 100, ms(1));
        let times: Vec<Instant> = v.iter().flat_map(Verdict::delivery_times).collect();
        let overtaken = times.windows(2).filter(|w| w[1] < w[0]).count();
        let reordered = l.stats().reordered_packets;
        assert!((800..1200).contains(&reordered), "reordered {reordered}");
        // Each held-back packet is passed by the next one unless that one is held back too.
        assert!(
            overtaken as u64 >= reordered * 8 / 10,
            "overtaken {overtaken}"
        );
    }

    #[test]
    fn duplicates_arrive_twice_and_are_counted() {
        let (mut l, start) = link("dup=5%", 8);
        let v = run(&mut l, start, 20_000, 100, ms(1));
        let copies: usize = v.iter().map(|v| v.delivery_times().count()).sum();
        let dups = l.stats().duplicated_packets;
        assert_eq!(copies as u64, 20_000 + dups);
        assert!((800..1200).contains(&dups), "duplicated {dups}");
    }

    #[test]
    fn set_config_keeps_the_schedule_origin() {
        let (mut l, start) = link("none", 0);
        l.set_config("partition=1s+1s".parse().unwrap()).unwrap();
        assert!(l.is_partitioned(start + ms(1500)));
        assert!(!l.is_partitioned(start + ms(500)));
        let bad = LinkConfig {
            loss: 2.0,
            ..LinkConfig::default()
        };
        assert!(l.set_config(bad).is_err());
        assert!(
            l.is_partitioned(start + ms(1500)),
            "a rejected config changes nothing"
        );
    }
}
