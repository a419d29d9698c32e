//! Tracking setup: a userfaultfd in async write-protect mode and the memory ranges registered
//! with it.
//!
//! A [`Uffd`] is one userfaultfd plus the `/proc/PID` files that go with the address space it acts
//! on: the caller's own (a VMM's guest RAM) or, when the fd was created inside another process and
//! adopted, that process's (a checkpointer's target). A [`Tracker`] owns the registered ranges and
//! write-protects ("arms") them so that a clean start reports nothing.
//!
//! This crate decides *what* is tracked; finding what was written is the scanner's job. It never
//! reads page contents.
//!
//! # THP and hugetlb
//! Armed transparent huge pages report at 4 KiB granularity: the first write to an armed THP
//! splits it. A THP that was dirtied *before* arming, and that is then dropped or rewritten as a
//! whole, reports as one 2 MiB run. Ranges registered with [`ThpPolicy::Disable`] get
//! `MADV_NOHUGEPAGE` first (own process only). hugetlb ranges report whole huge pages: one byte
//! written dirties 2 MiB (or 1 GiB), and [`TrackedRange::granule`] says so.

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

#[cfg(target_arch = "x86_64")]
pub mod attach;
mod error;
pub mod handoff;
pub mod target;
mod tracker;
mod uffd;

#[cfg(target_arch = "x86_64")]
pub use attach::{
    AttachError, AttachTimes, MemorySharer, Relation, check_attachable, memory_sharers,
};
pub use error::Error;
pub use precopy_sys::pagemap::Vma;
pub use tracker::{
    MemoryKind, RegisterOptions, ThpPolicy, TrackedRange, Tracker, UnvouchedPolicy, unmapped_parts,
};
pub use uffd::{Features, Target, Uffd, kernel_features as uffd_kernel_features};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
