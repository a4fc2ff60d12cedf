//! Which piece to fetch next.
//!
//! Today's policy is in-order among the pieces a source has announced, which is what a
//! consumer streaming the content wants and what a single seed serves best; the swarm issue
//! adds rarest-first with an in-order window near the read position.

use d7q_wire::Bitmap;

/// The state of a download's pieces.
#[derive(Debug)]
pub struct PiecePicker {
    available: Bitmap,
    in_flight: Bitmap,
    done: Bitmap,
    /// Lowest index that may still be pickable: everything below is done or in flight.
    cursor: u32,
}

impl PiecePicker {
    /// A picker for `count` pieces, none available yet.
    pub fn new(count: u32) -> Self {
        Self {
            available: Bitmap::new(count),
            in_flight: Bitmap::new(count),
            done: Bitmap::new(count),
            cursor: 0,
        }
    }

    /// A source announced piece `i`.
    pub fn handle_available(&mut self, i: u32) {
        if self.available.set(i) && i < self.cursor {
            self.cursor = i;
        }
    }

    /// Piece `i` arrived and was verified.
    pub fn handle_done(&mut self, i: u32) {
        self.in_flight.clear(i);
        self.done.set(i);
    }

    /// Fetching piece `i` failed; it may be picked again.
    pub fn handle_failed(&mut self, i: u32) {
        self.in_flight.clear(i);
        self.cursor = self.cursor.min(i);
    }

    /// The next piece to request, marked in flight.
    pub fn poll_next(&mut self) -> Option<u32> {
        let n = self.available.len();
        while self.cursor < n {
            let i = self.cursor;
            if self.done.test(i) || self.in_flight.test(i) {
                self.cursor += 1;
                continue;
            }
            if !self.available.test(i) {
                break;
            }
            self.in_flight.set(i);
            self.cursor += 1;
            return Some(i);
        }
        // Past a gap: look further for announced pieces (sources may announce out of order).
        let pick = (self.cursor..n)
            .find(|&i| self.available.test(i) && !self.done.test(i) && !self.in_flight.test(i))?;
        self.in_flight.set(pick);
        Some(pick)
    }

    /// Whether every piece is done.
    pub fn is_complete(&self) -> bool {
        self.done.is_full()
    }

    /// Pieces done.
    pub fn done_count(&self) -> u32 {
        self.done.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_announced_pieces_in_order_and_retries_failures() {
        let mut p = PiecePicker::new(4);
        assert_eq!(p.poll_next(), None);
        p.handle_available(1);
        assert_eq!(p.poll_next(), Some(1));
        p.handle_available(0);
        p.handle_available(2);
        assert_eq!(p.poll_next(), Some(0));
        assert_eq!(p.poll_next(), Some(2));
        assert_eq!(p.poll_next(), None);
        p.handle_failed(1);
        assert_eq!(p.poll_next(), Some(1));
        for i in 0..3 {
            p.handle_done(i);
        }
        assert!(!p.is_complete());
        p.handle_available(3);
        assert_eq!(p.poll_next(), Some(3));
        p.handle_done(3);
        assert!(p.is_complete());
        assert_eq!(p.poll_next(), None);
    }
}
