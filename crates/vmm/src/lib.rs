//! A small KVM VMM whose guest RAM the engine tracks and live-migrates.
//!
//! It proves the claim VMMs care about: the write-protect bit on the VMM's own mapping of guest
//! RAM sees every page a vCPU writes through KVM's second-level page tables, with no help from
//! KVM's dirty log — and it checks that claim in every round against KVM's dirty log itself.
//!
//! * [`guest`]: the guest program (assembled here, a few dozen instructions of 32-bit x86) that
//!   writes its memory in a deterministic pattern and reports a running checksum on an I/O port.
//! * [`host`]: which KVM back end this host offers (hardware with EPT/NPT, or `kvm-pvm`) and
//!   what that does to the figures.
//! * [`vm`]: guest RAM (anonymous or memfd), the memory slot, vCPU threads, pause/resume.
//! * [`kvm_log`]: the per-round cross-check against `KVM_GET_DIRTY_LOG`.
//! * [`migrate`](mod@migrate): source and destination of a live migration between two VMM processes.
//! * [`state`]: vCPU registers and device state: the blob the migration's state hook returns
//!   and the transfer carries in its STATE frame after the last memory round.
//!
//! The one `unsafe` call a VMM on `kvm-ioctls` needs (registering the memory slot) lives in
//! `precopy_sys::kvm`.

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

pub mod bench;
pub mod error;
pub mod guest;
pub mod host;
pub mod kvm_log;
pub mod migrate;
pub mod state;
pub mod vm;

pub use error::Error;
pub use guest::GuestProgram;
pub use host::KvmHost;
pub use kvm_log::{CrossCheckRound, KvmCheckedLog};
pub use migrate::{
    DestinationProcess, DestinationReport, MigrateOptions, SourceReport, VmDemoOptions,
    VmDemoReport, demo, destination_main, guest_ram_layout, migrate, receive, uffd_dirty_log,
};
pub use state::VmState;
pub use vm::{RamBacking, RunOutcome, RunningVm, Vm, VmConfig, VmControl, open_kvm};

/// Whether this process can use KVM; the reason when not (for a test's or command's SKIP).
pub fn kvm_unavailable() -> Option<String> {
    open_kvm().err().map(|e| precopy_sys::error_chain(&e))
}
