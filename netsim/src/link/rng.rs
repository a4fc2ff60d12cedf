//! The link's pseudo-random generator: xoshiro256** seeded through SplitMix64.
//!
//! For: reproducible impairment decisions. A run is replayed from its seed, so the sequence must
//! never change under us — which is why this is a dozen lines of our own rather than `rand`'s
//! `StdRng`, whose algorithm the `rand` crate reserves the right to change between releases.
//! Not for: anything cryptographic.

/// Deterministic generator; the same seed always yields the same sequence.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Expands `seed` through SplitMix64, as the xoshiro authors recommend, so that nearby seeds
    /// (0, 1, 2…) still give unrelated streams and the all-zero state cannot occur.
    pub(crate) fn new(seed: u64) -> Self {
        let mut sm = seed;
        Self {
            s: [
                splitmix64(&mut sm),
                splitmix64(&mut sm),
                splitmix64(&mut sm),
                splitmix64(&mut sm),
            ],
        }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), with the 53 bits an f64 mantissa holds.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p`. The certain cases draw nothing, so a knob left at 0 does not
    /// perturb the stream the other knobs see.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            false
        } else if p >= 1.0 {
            true
        } else {
            self.unit() < p
        }
    }

    /// Uniform in [0, n]; `n` inclusive so a jitter of ±j can reach both ends.
    pub(crate) fn up_to(&mut self, n: u64) -> u64 {
        match n.checked_add(1) {
            // Lemire's multiply-shift; the bias is below 2^-64 * n, far under anything a link test
            // can measure, so no rejection loop is needed.
            Some(span) => ((u128::from(self.next_u64()) * u128::from(span)) >> 64) as u64,
            None => self.next_u64(),
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_different_seeds_differ() {
        let a: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(8);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn pinned_first_values_so_replays_survive_refactors() {
        // If this changes, every recorded seed replays differently: change it only on purpose.
        let mut r = Rng::new(0);
        let first = [r.next_u64(), r.next_u64()];
        let mut again = Rng::new(0);
        assert_eq!(first, [again.next_u64(), again.next_u64()]);
        assert_eq!(first, PINNED_SEED0);
    }

    // xoshiro256** after SplitMix64(0), checked against an independent implementation.
    const PINNED_SEED0: [u64; 2] = [11_091_344_671_253_066_420, 13_793_997_310_169_335_082];

    #[test]
    fn up_to_is_inclusive_and_bounded() {
        let mut r = Rng::new(1);
        let mut seen = [false; 4];
        for _ in 0..1000 {
            let v = r.up_to(3);
            assert!(v <= 3);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(r.up_to(0), 0);
    }

    #[test]
    fn unit_is_in_range() {
        let mut r = Rng::new(2);
        for _ in 0..10_000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
