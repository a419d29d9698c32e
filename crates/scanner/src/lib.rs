//! Rounds: the pages written since the previous round, re-protected as they are reported.
//!
//! [`Scanner::round`] runs `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` and
//! the kernel's fast-path masks (category and return mask = `WRITTEN`) over every range of a
//! [`Tracker`]. For each page the kernel reports "written" and write-protects it again under the
//! page-table lock, so a write racing a round lands in this round or the next, never in neither,
//! provided the caller reads page contents **after** the round returns.
//!
//! What a round must never do is report "clean" for memory it cannot vouch for. Parts of a
//! tracked range that stopped being tracked (munmap, `MAP_FIXED`, mremap, unregister by someone
//! else) are returned in [`Round::untracked`]: the caller must treat them as wholly dirty. The
//! kernel's `EPERM` on such a part arrives *after* it re-protected and reported the tracked pages
//! before it, with the count lost; the scanner keeps its output buffer zeroed between calls so it
//! can still recover those entries (see `worker.rs`).
//!
//! # How a walk stops
//! The kernel stops a `PAGEMAP_SCAN` call when the range is done (`walk_end == end`), when the
//! output buffer is full, or when `max_pages` were found; the scanner resumes from `walk_end` in
//! the first two cases and ends the round in the third ([`ScanOptions::max_pages`]), resuming
//! there in the next round.

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

mod dirty_set;
mod error;
pub mod kernel;
mod round;
mod scanner;
mod worker;

pub use dirty_set::DirtySet;
pub use error::Error;
pub use round::{Round, RoundStats, Untracked, UntrackedReason};
pub use scanner::{ScanOptions, Scanner};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use precopy_tracker as tracker;
pub use precopy_tracker::Tracker;
