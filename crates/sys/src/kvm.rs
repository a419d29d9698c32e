//! Guest RAM registered with KVM: the one `unsafe` call a VMM built on `kvm-ioctls` needs
//! (`KVM_SET_USER_MEMORY_REGION`), wrapped so the memory slot can never outlive the mapping.
//!
//! A memory slot tells KVM "guest-physical `gpa..gpa+len` is host virtual memory
//! `addr..addr+len` of this process". KVM then reaches the host pages through this process's
//! page tables (like any user of the memory), so the mapping must stay mapped for as long as the
//! slot exists: were it unmapped and something else mapped at the same address, the guest would
//! read and write that other memory. [`GuestRam`] owns both the VM fd's slot and a reference to
//! the [`Mapping`], and deletes the slot before it lets go of the mapping.

use crate::mem::Mapping;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use std::io;
use std::sync::Arc;

/// One memory slot of a VM backed by a [`Mapping`] this value keeps alive.
#[derive(Debug)]
pub struct GuestRam {
    vm: Arc<VmFd>,
    ram: Arc<Mapping>,
    region: kvm_userspace_memory_region,
}

impl GuestRam {
    /// Registers `ram` as memory slot `slot` at guest-physical address `gpa`, with KVM's dirty
    /// log (`KVM_MEM_LOG_DIRTY_PAGES`) on if `log_dirty`. Fails with the ioctl's errno (`EEXIST`
    /// for an overlap with another slot, `EINVAL` for a misaligned address or size).
    pub fn register(
        vm: Arc<VmFd>,
        slot: u32,
        gpa: u64,
        ram: Arc<Mapping>,
        log_dirty: bool,
    ) -> io::Result<GuestRam> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: gpa,
            memory_size: ram.len(),
            userspace_addr: ram.addr(),
        };
        // SAFETY: `userspace_addr..+memory_size` is exactly the live mapping `ram`, which this
        // value keeps alive (an `Arc`) until `Drop` has deleted the slot again.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(GuestRam { vm, ram, region })
    }

    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.region.slot
    }

    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.region.guest_phys_addr
    }

    /// The host mapping.
    pub fn ram(&self) -> &Arc<Mapping> {
        &self.ram
    }

    /// Whether KVM keeps a dirty log for this slot.
    pub fn logs_dirty(&self) -> bool {
        self.region.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }

    /// `KVM_GET_DIRTY_LOG` for this slot: one bit per page (bit `i` of word `i / 64` is page `i`
    /// of the slot), set for each page a vCPU wrote since the previous call. The call also
    /// clears the log and write-protects those pages again in KVM's page tables (without
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, which this VMM does not enable). `ENOENT` if the
    /// slot has no dirty log.
    pub fn dirty_log(&self) -> io::Result<Vec<u64>> {
        self.vm
            .get_dirty_log(self.region.slot, self.region.memory_size as usize)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: a size of 0 deletes the slot; KVM no longer reaches the mapping afterwards.
        if unsafe { self.vm.set_user_memory_region(gone) }.is_err() {
            // The slot may still point at the mapping: never unmap it while a vCPU can reach it.
            std::mem::forget(self.ram.clone());
        }
    }
}
