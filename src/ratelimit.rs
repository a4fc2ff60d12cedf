//! Byte budgets for transfers: one budget for the whole host, across all downloads, plus
//! optional per-download limits.
//!
//! A [`RateLimiter`] is a handle on one shared [`TokenBucket`]; clones share the budget, so the
//! daemon makes one for uploads and one for downloads and hands clones to every task. A
//! transfer charged to several budgets at once (the host's and its own download's) uses
//! [`acquire_all`]. Callers charge bytes before sending or after receiving a chunk; waiting
//! callers are served in the order they asked.
//!
//! Not for: deciding anything — the arithmetic is in [`crate::sched::ratelimit`]; this file
//! only sleeps.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::sched::ratelimit::TokenBucket;

/// A limiter's default burst is this much time at its rate…
pub const BURST_WINDOW: Duration = Duration::from_millis(250);

/// …but at least this many bytes, so that one read buffer of a slow limiter goes through in one
/// piece.
pub const MIN_BURST: u64 = 256 * 1024;

/// A shared byte budget. Cheap to clone; clones share it.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    // A std Mutex, not a tokio one: it is held only for a few arithmetic operations, never
    // across an await.
    bucket: Arc<Mutex<TokenBucket>>,
}

impl RateLimiter {
    /// A budget of `rate_bytes_per_sec` (0 = unlimited) with the default burst.
    pub fn new(rate_bytes_per_sec: u64) -> Self {
        Self::with_burst(rate_bytes_per_sec, default_burst(rate_bytes_per_sec))
    }

    /// A budget of `rate_bytes_per_sec` (0 = unlimited) letting `burst` bytes through at once
    /// after a pause.
    pub fn with_burst(rate_bytes_per_sec: u64, burst: u64) -> Self {
        let now = TokioClock.now();
        Self {
            bucket: Arc::new(Mutex::new(TokenBucket::new(rate_bytes_per_sec, burst, now))),
        }
    }

    /// No limit (until [`set_rate`](Self::set_rate) sets one).
    pub fn unlimited() -> Self {
        Self::new(0)
    }

    /// Changes the rate for every holder of this budget (0 = unlimited). Callers already
    /// waiting keep the wait they were given.
    pub fn set_rate(&self, rate_bytes_per_sec: u64) {
        let now = TokioClock.now();
        self.lock().set_rate(rate_bytes_per_sec, now);
    }

    /// Bytes per second; 0 = unlimited.
    pub fn rate(&self) -> u64 {
        self.lock().rate()
    }

    /// Charges `n` bytes, sleeping until the budget allows them. The bytes are charged when the
    /// call starts: a caller that gives up while waiting still used them up.
    pub async fn acquire(&self, n: u64) {
        acquire_on(&TokioClock, &[self], n).await;
    }

    fn lock(&self) -> MutexGuard<'_, TokenBucket> {
        // The bucket is consistent after every call, so a panic elsewhere leaves it usable.
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Charges `n` bytes to every limiter in `limiters` (the host's budget and a download's own,
/// say) and sleeps until the slowest of them allows them.
pub async fn acquire_all(limiters: &[&RateLimiter], n: u64) {
    acquire_on(&TokioClock, limiters, n).await;
}

fn default_burst(rate: u64) -> u64 {
    let window = u128::from(rate) * BURST_WINDOW.as_millis() / 1000;
    u64::try_from(window).unwrap_or(u64::MAX).max(MIN_BURST)
}

/// Time as the limiters see it: tokio's clock in the product, a simulated one in tests.
trait Clock {
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send;
}

/// Tokio's clock, so that a paused test runtime drives the limiters too.
struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(d)
    }
}

async fn acquire_on<C: Clock + Sync>(clock: &C, limiters: &[&RateLimiter], n: u64) {
    let now = clock.now();
    let wait = limiters
        .iter()
        .map(|l| l.lock().reserve(n, now))
        .max()
        .unwrap_or_default();
    if !wait.is_zero() {
        clock.sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A clock that jumps forward instead of sleeping.
    struct VirtualClock {
        start: Instant,
        elapsed_ns: AtomicU64,
    }

    impl VirtualClock {
        fn new() -> Self {
            Self {
                start: Instant::now(),
                elapsed_ns: AtomicU64::new(0),
            }
        }

        fn elapsed(&self) -> Duration {
            Duration::from_nanos(self.elapsed_ns.load(Ordering::SeqCst))
        }
    }

    impl Clock for VirtualClock {
        fn now(&self) -> Instant {
            self.start + self.elapsed()
        }

        fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send {
            self.elapsed_ns
                .fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
            std::future::ready(())
        }
    }

    /// A limiter whose bucket started on the virtual clock.
    fn limiter(clock: &VirtualClock, rate: u64, burst: u64) -> RateLimiter {
        RateLimiter {
            bucket: Arc::new(Mutex::new(TokenBucket::new(rate, burst, clock.now()))),
        }
    }

    fn assert_close(got: Duration, want: Duration) {
        assert!(
            got.abs_diff(want) < Duration::from_micros(10),
            "{got:?} vs {want:?}"
        );
    }

    #[tokio::test]
    async fn one_megabyte_per_second_on_the_virtual_clock() {
        let clock = VirtualClock::new();
        let l = limiter(&clock, 1_000_000, default_burst(1_000_000));
        assert_eq!(default_burst(1_000_000), MIN_BURST);
        for _ in 0..20 {
            acquire_on(&clock, &[&l], 100_000).await;
        }
        // 2 MB, of which the first MIN_BURST bytes went at once.
        let want = Duration::from_nanos((2_000_000 - MIN_BURST) * 1000);
        assert_close(clock.elapsed(), want);
    }

    #[tokio::test]
    async fn the_slowest_budget_sets_the_pace() {
        let clock = VirtualClock::new();
        let host = limiter(&clock, 1_000_000, 0);
        let download = limiter(&clock, 500_000, 0);
        for _ in 0..10 {
            acquire_on(&clock, &[&host, &download], 100_000).await;
        }
        // 1 MB at 500 kB/s; the first chunk went at once, into debt.
        assert_close(clock.elapsed(), Duration::from_millis(1800));
    }

    #[tokio::test]
    async fn one_host_budget_across_downloads() {
        let clock = VirtualClock::new();
        let host = limiter(&clock, 1_000_000, 0);
        let (a, b) = (
            limiter(&clock, 10_000_000, 0),
            limiter(&clock, 10_000_000, 0),
        );
        let (host_a, host_b) = (host.clone(), host.clone());
        for _ in 0..10 {
            acquire_on(&clock, &[&host_a, &a], 100_000).await;
            acquire_on(&clock, &[&host_b, &b], 100_000).await;
        }
        // 2 MB through the host's 1 MB/s, whatever each download's own limit.
        assert_close(clock.elapsed(), Duration::from_millis(1900));
    }

    #[tokio::test]
    async fn unlimited_never_waits() {
        let clock = VirtualClock::new();
        let l = limiter(&clock, 0, 0);
        for _ in 0..100 {
            acquire_on(&clock, &[&l], u64::MAX).await;
        }
        acquire_on(&clock, &[], 1).await;
        assert_eq!(clock.elapsed(), Duration::ZERO);
        // The real one, on tokio's clock.
        let real = RateLimiter::unlimited();
        real.acquire(u64::MAX).await;
        acquire_all(&[&real, &real.clone()], 1 << 40).await;
        assert_eq!(real.rate(), 0);
        real.set_rate(1000);
        assert_eq!(real.rate(), 1000);
    }

    #[test]
    fn acquiring_can_move_between_threads() {
        fn assert_send<T: Send>(_: &T) {}
        let l = RateLimiter::new(1);
        assert_send(&l.acquire(1));
        assert_send(&acquire_all(&[&l], 1));
    }
}
