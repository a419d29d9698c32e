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
//! - [`backends`]: the one dirty-log trait (`DirtyLog`) and the comparison trackers (soft-dirty,
//!   mprotect, uffd sync WP) that implement it.
//! - [`migrate`](mod@migrate): the pre-copy migration driver.
//!
//! # Embedding: a VMM's live migration
//!
//! A VMM states its guest memory once as a [`Layout`] of [`MemoryRegion`]s and makes two calls:
//! [`migrate`](fn@migrate) on the source (with a [`Workload`] that pauses, resumes and saves its vCPUs'
//! state, e.g. [`Callbacks`]) and [`receive`] on the destination (which maps each region itself
//! and gets the state blob before the source is told it completed). [`Source`] is [`migrate`](fn@migrate)
//! in two steps, for a VMM whose device models report their writes through [`ExternalDirty`].
//! Every one of them fails with [`Error<E>`](Error), `E` being the embedder's own error; the
//! errors of the two steps that run no embedder code, [`Layout::new`] ([`LayoutError`]) and
//! [`Source::track`] ([`TrackError`]), convert into it with `?`.
//! `examples/vmm_migration.rs` is the whole of it; the crates below are there for more control
//! (several streams, keys, compression, a dirty log of the VMM's own through
//! [`migrate::DirtyLog`], checkpoint images).
//!
//! The most used names are re-exported at the top level.

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

mod vmm;

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

// The VMM seam: memory described once, the calls, and what they take.
pub use precopy_migrate::{
    Callbacks, ExternalDirty, MarkError, MigrationConfig, MigrationReport, Workload,
};
pub use precopy_sys::mem::Mapping;
pub use precopy_transfer::{
    Backing, Connection, Key, Layout, LayoutError, Listener, MemoryRegion, RegionMemory,
    TransferError,
};
pub use vmm::{Error, Received, Source, TrackError, migrate, receive};
