//! Deciding logic, sans-IO: plain structs that take events (and, where time matters, a `now`)
//! and return decisions. No tokio, quinn or hyper in here — the async shell drives them, and
//! the scale simulator in `tools/` can drive the very same code.

pub mod download;
pub mod parents;
pub mod picker;
pub mod ratelimit;
pub mod seed;

/// Pieces a daemon sends at once, to all its children together; a request past them is
/// answered `Saturated` and its requester asks elsewhere or again after a pause. Copies that
/// share an upload all arrive late, and a piece passes on only once it has arrived: few at a
/// time keep the swarm's pieces moving (see [`seed::SEED_SLOTS`] for the seed's own).
pub const UPLOAD_SLOTS: usize = 8;
