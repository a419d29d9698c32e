//! What kind of KVM this host offers, for reports that must say what their figures mean.
//!
//! The same guest behaves very differently under the three x86 KVM back ends a host may load:
//!
//! * `kvm-intel` / `kvm-amd`: hardware virtualization (VMX/SVM). With EPT (Intel) or NPT (AMD)
//!   the vCPU's stores go through second-level page tables that KVM fills from the VMM's own
//!   page tables; the guest runs natively until it exits.
//! * `kvm-pvm`: a KVM back end without VMX/SVM (it runs on hosts that are themselves guests
//!   and expose no virtualization extensions). It has no second-level paging: guest memory is
//!   mapped through shadow page tables, and a guest that is not a PVM-aware 64-bit kernel — such
//!   as this crate's 32-bit program at privilege level 0 without paging — is executed by KVM's
//!   instruction emulator in batches (the kernel log names it: `kvm-pvm: ... batch emul ...
//!   cpl=0 cr3=0x0`). Each guest store is then a copy by the emulator into the VMM's mapping of
//!   guest RAM: the write-protect bit is still what catches it, but the hardware path (a store
//!   through EPT/NPT) is not exercised, and the guest spends tens of microseconds per page it
//!   visits, where its ~25 instructions take nanoseconds when run natively.
//!
//! Read from `/sys/module` (which KVM module is loaded, its `ept`/`npt` parameter) and the
//! `hypervisor` CPU flag in `/proc/cpuinfo` (this host is itself a virtual machine).

use std::path::Path;

/// The KVM this host offers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KvmHost {
    /// The KVM back end: `kvm-intel`, `kvm-amd`, `kvm-pvm`, or `unknown`.
    pub module: &'static str,
    /// Whether guest memory goes through second-level page tables (EPT/NPT); `None` when the
    /// back end is unknown.
    pub second_level_paging: Option<bool>,
    /// Whether this host is itself a virtual machine (the `hypervisor` CPU flag): KVM here is
    /// nested.
    pub nested: bool,
}

impl KvmHost {
    /// Looks at this host.
    pub fn detect() -> KvmHost {
        KvmHost::detect_in(Path::new("/sys/module"), Path::new("/proc/cpuinfo"))
    }

    /// [`KvmHost::detect`] against other roots (for tests).
    pub fn detect_in(sys_module: &Path, cpuinfo: &Path) -> KvmHost {
        let param = |module: &str, name: &str| {
            std::fs::read_to_string(sys_module.join(module).join("parameters").join(name))
                .ok()
                .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
        };
        let loaded = |module: &str| sys_module.join(module).is_dir();
        let (module, second_level_paging) = if loaded("kvm_intel") {
            ("kvm-intel", param("kvm_intel", "ept"))
        } else if loaded("kvm_amd") {
            ("kvm-amd", param("kvm_amd", "npt"))
        } else if loaded("kvm_pvm") {
            ("kvm-pvm", Some(false))
        } else {
            ("unknown", None)
        };
        let nested = std::fs::read_to_string(cpuinfo).is_ok_and(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
        });
        KvmHost {
            module,
            second_level_paging,
            nested,
        }
    }

    /// Whether this guest's figures come from KVM's instruction emulator rather than from a
    /// vCPU running natively (`kvm-pvm`).
    pub fn emulated(&self) -> bool {
        self.module == "kvm-pvm"
    }

    /// One plain sentence on what this KVM does to the figures, for a report.
    pub fn note(&self) -> String {
        let nested = if self.nested {
            "nested (this host is itself a VM)"
        } else {
            "not nested"
        };
        match (self.module, self.second_level_paging) {
            ("kvm-pvm", _) => format!(
                "/dev/kvm is kvm-pvm, {nested}, without EPT/NPT: the guest's code is executed by \
                 KVM's instruction emulator and its stores reach guest RAM as copies into the \
                 VMM's mapping: the guest spends tens of µs per page it visits (about 25 \
                 instructions, nanoseconds when run natively), so it cannot dirty memory fast, \
                 and the hardware path (vCPU stores through EPT/NPT) is not exercised"
            ),
            (m, Some(true)) => format!(
                "/dev/kvm is {m}, {nested}, with second-level paging (EPT/NPT): vCPU stores go \
                 through the second-level page tables"
            ),
            (m, Some(false)) => format!(
                "/dev/kvm is {m}, {nested}, with second-level paging off: guest memory goes \
                 through shadow page tables"
            ),
            (m, None) => format!("/dev/kvm is {m}, {nested}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(modules: &[(&str, &str, &str)], flags: &str) -> KvmHost {
        let dir = std::env::temp_dir().join(format!(
            "precopy-vmm-host-{}-{}",
            std::process::id(),
            modules.first().map_or("none", |m| m.0)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for (m, p, v) in modules {
            let d = dir.join("sys").join(m).join("parameters");
            std::fs::create_dir_all(&d).unwrap();
            if !p.is_empty() {
                std::fs::write(d.join(p), v).unwrap();
            }
        }
        std::fs::create_dir_all(dir.join("sys")).unwrap();
        std::fs::write(
            dir.join("cpuinfo"),
            format!("processor\t: 0\nflags\t\t: {flags}\n"),
        )
        .unwrap();
        let h = KvmHost::detect_in(&dir.join("sys"), &dir.join("cpuinfo"));
        let _ = std::fs::remove_dir_all(&dir);
        h
    }

    #[test]
    fn tells_the_back_ends_apart() {
        let pvm = host(
            &[("kvm_pvm", "emul_batch", "1024\n")],
            "fpu hypervisor pdpe1gb",
        );
        assert_eq!(pvm.module, "kvm-pvm");
        assert_eq!(pvm.second_level_paging, Some(false));
        assert!(pvm.nested && pvm.emulated());
        assert!(pvm.note().contains("without EPT"), "{}", pvm.note());
        let intel = host(&[("kvm_intel", "ept", "Y\n")], "fpu vmx");
        assert_eq!(
            (intel.module, intel.second_level_paging, intel.nested),
            ("kvm-intel", Some(true), false)
        );
        assert!(!intel.emulated());
        let amd = host(&[("kvm_amd", "npt", "0\n")], "svm");
        assert_eq!(
            (amd.module, amd.second_level_paging),
            ("kvm-amd", Some(false))
        );
        let none = host(&[], "fpu");
        assert_eq!((none.module, none.second_level_paging), ("unknown", None));
    }
}
