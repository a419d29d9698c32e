//! precopy: find the pages a Linux process wrote (userfaultfd async write-protect +
//! `PAGEMAP_SCAN`) and stream them elsewhere.
//!
//! This crate is a facade over the workspace's crates, so an embedder (and the behaviour tests in
//! `tests/`) can depend on one crate:
//!
//! - [`sys`]: the raw kernel ABI and owned mappings ([`sys::mem::Mapping`]).
//! - [`tracker`]: a userfaultfd in async write-protect mode and the ranges registered with it.
//! - [`scanner`]: rounds of get-and-reprotect over the tracked ranges.
//! - [`transfer`]: wire protocol, sender/receiver, checkpoint images.
//! - [`backends`]: the comparison trackers (soft-dirty, mprotect, uffd sync WP) behind one trait.
//! - [`migrate`]: the pre-copy migration driver.
//!
//! The most used names are re-exported at the top level.

pub use precopy_backends as backends;
pub use precopy_migrate as migrate;
pub use precopy_scanner as scanner;
pub use precopy_sys as sys;
pub use precopy_tracker as tracker;
pub use precopy_transfer as transfer;

pub use precopy_scanner::{
    DirtySet, Round, RoundStats, ScanOptions, Scanner, Untracked, UntrackedReason,
};
pub use precopy_tracker::{
    MemoryKind, RegisterOptions, Target, ThpPolicy, TrackedRange, Tracker, Uffd, UnvouchedPolicy,
};
