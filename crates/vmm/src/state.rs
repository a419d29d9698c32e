//! The VM state that moves after the last memory round: each vCPU's registers and the state of
//! the guest's one device (the progress port), as an opaque blob for the transport.
//!
//! The guest program uses only general-purpose registers and flat segments, so `kvm_regs` and
//! `kvm_sregs` are all of a vCPU it needs; a VMM running a real kernel also saves the FPU/XSAVE
//! area, MSRs, the local APIC, pending events and the clock.

use crate::error::Error;
use crate::guest::GuestProgram;
use kvm_bindings::{kvm_regs, kvm_sregs};

/// The progress device of one vCPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuDevice {
    /// Progress reports received (each is `chunk` pages written).
    pub reports: u64,
    /// The running checksum of the last report.
    pub last_checksum: u32,
    /// The final checksum, once the vCPU reported it.
    pub done: Option<u32>,
}

impl VcpuDevice {
    /// Records a progress report.
    pub fn progress(&mut self, checksum: u32) {
        self.reports += 1;
        self.last_checksum = checksum;
    }
}

/// One vCPU.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// Its index.
    pub cpu: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Its progress device.
    pub device: VcpuDevice,
    /// `CLOCK_MONOTONIC` (ns) when it last left `KVM_RUN`: when the guest stopped running.
    pub stopped_at_ns: u64,
}

/// Everything but memory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// The program the guest runs (the destination checks it builds the same VM).
    pub program: GuestProgram,
    /// The guest dirty rate the VMM paces the guest to (bytes/s), if any.
    pub dirty_rate: Option<u64>,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
}

impl VmState {
    /// The opaque blob (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a blob written by [`VmState::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::State {
            reason: format!("malformed state blob: {e}"),
        })
    }

    /// When the guest stopped running (the latest vCPU stop), `CLOCK_MONOTONIC` ns.
    pub fn stopped_at_ns(&self) -> u64 {
        self.vcpus
            .iter()
            .map(|v| v.stopped_at_ns)
            .max()
            .unwrap_or(0)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the host, so a source and
/// a destination VMM on the same host can measure the guest's pause between them.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
