//! A compact piece bitmap: one bit per piece, packed into u64 words.

use serde::{Deserialize, Serialize};

use crate::MAX_PIECE_COUNT;

/// Which pieces of a task a node has. Bits past `len` are always zero.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawBitmap")]
pub struct Bitmap {
    len: u32,
    words: Vec<u64>,
}

/// The wire shape of a bitmap, checked on the way in.
#[derive(Deserialize)]
struct RawBitmap {
    len: u32,
    words: Vec<u64>,
}

impl TryFrom<RawBitmap> for Bitmap {
    type Error = String;

    fn try_from(raw: RawBitmap) -> Result<Self, String> {
        if raw.len > MAX_PIECE_COUNT {
            return Err(format!(
                "bitmap of {} pieces exceeds {MAX_PIECE_COUNT}",
                raw.len
            ));
        }
        if raw.words.len() != words_for(raw.len) {
            return Err(format!(
                "bitmap of {} pieces with {} words",
                raw.len,
                raw.words.len()
            ));
        }
        let tail = raw.len % 64;
        if tail != 0 && raw.words.last().is_some_and(|w| w >> tail != 0) {
            return Err("bitmap has bits set past its length".into());
        }
        Ok(Self {
            len: raw.len,
            words: raw.words,
        })
    }
}

fn words_for(len: u32) -> usize {
    len.div_ceil(64) as usize
}

impl Bitmap {
    /// An empty bitmap of `len` pieces. Panics if `len` exceeds [`MAX_PIECE_COUNT`]; callers
    /// hold lengths that were already checked.
    pub fn new(len: u32) -> Self {
        assert!(len <= MAX_PIECE_COUNT, "bitmap length {len} over the limit");
        Self {
            len,
            words: vec![0; words_for(len)],
        }
    }

    /// A bitmap with every piece set.
    pub fn full(len: u32) -> Self {
        let mut b = Self::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// Number of pieces the bitmap covers.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether it covers no pieces.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets piece `i`; returns whether it was newly set. Out-of-range indices are ignored.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let (w, b) = ((i / 64) as usize, i % 64);
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        !was
    }

    /// Clears piece `i`.
    pub fn clear(&mut self, i: u32) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// Whether piece `i` is set (false out of range).
    pub fn test(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Number of pieces set.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether every piece is set.
    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    /// Indices of the pieces set, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u32 * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_test_count_iterate() {
        let mut b = Bitmap::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(64));
        assert!(b.set(129));
        assert!(!b.set(130));
        assert!(b.test(64) && !b.test(65) && !b.test(1000));
        assert_eq!(b.count(), 3);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 64, 129]);
        b.clear(64);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 129]);
        assert!(Bitmap::full(130).is_full());
        assert!(Bitmap::new(0).is_full());
    }
}
