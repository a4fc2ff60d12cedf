//! Deciding logic, sans-IO: plain structs that take events (and, where time matters, a `now`)
//! and return decisions. No tokio, quinn or hyper in here — the async shell drives them, and
//! the scale simulator in `tools/` can drive the very same code.

pub mod download;
pub mod parents;
pub mod picker;
pub mod ratelimit;
pub mod seed;
