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
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self).map_err(|e| Error::State {
            reason: format!("the state cannot be encoded: {e}"),
        })
    }

    /// Reads a blob written by [`VmState::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::State {
            reason: format!("malformed state blob: {e}"),
        })
    }

    /// Checks that a VM with `ram_len` bytes of guest RAM can resume from this state: the
    /// program is valid, needs exactly that much RAM, and every one of its vCPUs is saved once.
    /// The destination checks it before it acknowledges the migration, so a state it cannot
    /// resume from fails the migration while the source can still resume.
    pub fn check_fits(&self, ram_len: u64) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::State { reason });
        self.program.validate()?;
        if self.program.ram_size != ram_len {
            return bad(format!(
                "the program needs {} bytes of guest RAM, this VM has {ram_len}",
                self.program.ram_size
            ));
        }
        let n = self.program.vcpus as usize;
        let mut seen = vec![false; n];
        for v in &self.vcpus {
            match seen.get_mut(v.cpu as usize) {
                Some(s) if !*s => *s = true,
                Some(_) => return bad(format!("vCPU {} is saved twice", v.cpu)),
                None => {
                    return bad(format!(
                        "vCPU {} does not exist (the program has {n})",
                        v.cpu
                    ));
                }
            }
        }
        if self.vcpus.len() != n {
            return bad(format!(
                "{} vCPUs saved, the program has {n}",
                self.vcpus.len()
            ));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(vcpus: u32, ram: u64) -> VmState {
        let program = GuestProgram::new(vcpus, ram, 1 << 20, 2).unwrap();
        VmState {
            program,
            dirty_rate: None,
            vcpus: (0..vcpus)
                .map(|cpu| VcpuState {
                    cpu,
                    regs: Default::default(),
                    sregs: Default::default(),
                    device: VcpuDevice::default(),
                    stopped_at_ns: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn blob_round_trips() {
        let s = state(2, 8 << 20);
        let back = VmState::from_bytes(&s.to_bytes().unwrap()).unwrap();
        assert_eq!(back.program, s.program);
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vcpus[1].cpu, 1);
    }

    #[test]
    fn a_state_that_does_not_fit_is_refused() {
        let s = state(2, 8 << 20);
        s.check_fits(8 << 20).unwrap();
        let e = s.check_fits(16 << 20).unwrap_err().to_string();
        assert!(e.contains("guest RAM"), "{e}");
        let mut twice = s.clone();
        twice.vcpus[1].cpu = 0;
        assert!(
            twice
                .check_fits(8 << 20)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let mut missing = s.clone();
        missing.vcpus.pop();
        assert!(missing.check_fits(8 << 20).is_err());
        let mut beyond = s.clone();
        beyond.vcpus[1].cpu = 7;
        assert!(
            beyond
                .check_fits(8 << 20)
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
        assert!(VmState::from_bytes(b"{not json").is_err());
    }
}
