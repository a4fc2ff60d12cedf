//! A token bucket for byte budgets, sans-IO: `now` goes in, "go" or "wait this long" comes out.
//!
//! Tokens are bytes; they accrue at `rate` per second up to `burst`. A request larger than the
//! burst is let through once the bucket is full and leaves the bucket in debt, so big requests
//! are never starved by small ones and the long-run rate still holds. Rate 0 means unlimited.
//!
//! Not for: sleeping or sharing between tasks — [`crate::ratelimit`] wraps this for async code.

use std::time::{Duration, Instant};

/// Tokens are kept in nano-bytes so that refills over short intervals lose nothing to rounding.
const NANOS: i128 = 1_000_000_000;

/// A byte budget refilled at a steady rate.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    burst: u64,
    /// Nano-bytes available; negative while in debt.
    tokens: i128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate_bytes_per_sec` (0 = unlimited) holding up to `burst`.
    pub fn new(rate_bytes_per_sec: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate: rate_bytes_per_sec,
            burst,
            tokens: i128::from(burst) * NANOS,
            last: now,
        }
    }

    /// Takes `n` bytes now (`Ok`) or says how long until they are available (`Err`, nothing
    /// taken). A request over the burst goes through once the bucket is full, into debt.
    pub fn poll_take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.rate == 0 {
            return Ok(());
        }
        match self.wait_for(n) {
            Duration::ZERO => {
                self.tokens -= i128::from(n) * NANOS;
                Ok(())
            }
            wait => Err(wait),
        }
    }

    /// Takes `n` bytes at once, into debt if need be, and returns how long the caller must wait
    /// before sending them: the time [`poll_take`](Self::poll_take) would have made it wait,
    /// counting every earlier reservation. Callers that reserve are served in order, so none is
    /// starved.
    pub fn reserve(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let wait = self.wait_for(n);
        self.tokens -= i128::from(n) * NANOS;
        wait
    }

    /// Changes the rate from `now` on (0 = unlimited). Bytes accrued so far keep the old rate;
    /// leaving unlimited starts from a full bucket.
    pub fn set_rate(&mut self, rate_bytes_per_sec: u64, now: Instant) {
        self.refill(now);
        if self.rate == 0 {
            self.tokens = i128::from(self.burst) * NANOS;
        }
        self.rate = rate_bytes_per_sec;
    }

    /// Bytes per second; 0 = unlimited.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The most bytes that can go at once after a pause.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now: Instant) {
        // A `now` earlier than the last one (callers with several clocks) adds nothing.
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        if self.rate == 0 {
            return;
        }
        let gained = i128::from(self.rate).saturating_mul(elapsed.as_nanos() as i128);
        self.tokens = self
            .tokens
            .saturating_add(gained)
            .min(i128::from(self.burst) * NANOS);
    }

    /// How long until a request of `n` bytes may go (`rate` is not 0).
    fn wait_for(&self, n: u64) -> Duration {
        let need = i128::from(n.min(self.burst)) * NANOS;
        let deficit = need - self.tokens;
        if deficit <= 0 {
            return Duration::ZERO;
        }
        let rate = i128::from(self.rate);
        let nanos = (deficit + rate - 1) / rate;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn takes_within_the_burst_then_waits_for_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 1000, t0);
        assert_eq!(b.poll_take(600, t0), Ok(()));
        assert_eq!(b.poll_take(400, t0), Ok(()));
        assert_eq!(b.poll_take(500, t0), Err(500 * MS));
        // Nothing was taken by the refusal: 250 ms later, 250 ms are left to wait.
        assert_eq!(b.poll_take(500, t0 + 250 * MS), Err(250 * MS));
        assert_eq!(b.poll_take(500, t0 + 500 * MS), Ok(()));
        // Refills stop at the burst.
        assert_eq!(b.poll_take(1000, t0 + 100_000 * MS), Ok(()));
        assert_eq!(b.poll_take(1, t0 + 100_000 * MS), Err(MS));
    }

    #[test]
    fn bytes_over_an_interval_match_the_rate() {
        let t0 = Instant::now();
        let (rate, burst, chunk) = (1_000_000u64, 64 * 1024, 16 * 1024);
        let mut b = TokenBucket::new(rate, burst, t0);
        let mut now = t0;
        let mut sent = 0u64;
        let end = t0 + Duration::from_secs(10);
        while now < end {
            match b.poll_take(chunk, now) {
                Ok(()) => sent += chunk,
                Err(wait) => now += wait,
            }
        }
        // The burst, then exactly the rate (within one chunk).
        let expected = burst + rate * 10;
        assert!(sent.abs_diff(expected) <= chunk, "{sent} vs {expected}");
    }

    #[test]
    fn a_request_over_the_burst_goes_into_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        assert_eq!(b.poll_take(5000, t0), Ok(()));
        // 4900 bytes of debt plus the byte asked for.
        assert_eq!(b.poll_take(1, t0), Err(4901 * MS));
        // A big one waits only for a full bucket, not for all of its bytes.
        let t1 = t0 + 5000 * MS;
        assert_eq!(b.poll_take(5000, t1), Ok(()));
        assert_eq!(b.poll_take(5000, t1), Err(5000 * MS));
    }

    #[test]
    fn reservations_queue_in_order() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 1000, t0);
        let waits: Vec<Duration> = (0..4).map(|_| b.reserve(1000, t0)).collect();
        assert_eq!(waits, vec![Duration::ZERO, 1000 * MS, 2000 * MS, 3000 * MS]);
        // A later poll_take sees the whole queue ahead of it.
        assert_eq!(b.poll_take(1, t0 + 1000 * MS), Err(2001 * MS));
    }

    #[test]
    fn zero_rate_is_unlimited_and_rates_can_change() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 0, t0);
        for _ in 0..1000 {
            assert_eq!(b.poll_take(u64::MAX, t0), Ok(()));
            assert_eq!(b.reserve(u64::MAX, t0), Duration::ZERO);
        }
        b.set_rate(2000, t0);
        assert_eq!(b.rate(), 2000);
        assert_eq!(
            b.poll_take(1, t0),
            Ok(()),
            "debt-only bucket, not yet in debt"
        );
        assert_eq!(
            b.poll_take(1000, t0),
            Err(500_000 * Duration::from_nanos(1))
        );
        b.set_rate(1000, t0);
        assert_eq!(b.poll_take(1000, t0), Err(MS));
        b.set_rate(0, t0);
        assert_eq!(b.poll_take(1_000_000, t0), Ok(()));
    }

    #[test]
    fn a_clock_going_backwards_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1000, 1000, t0);
        assert_eq!(b.poll_take(1000, t0), Ok(()));
        assert_eq!(b.poll_take(1, t0 - Duration::from_secs(5)), Err(MS));
        assert_eq!(b.poll_take(1, t0 + MS), Ok(()));
    }
}
