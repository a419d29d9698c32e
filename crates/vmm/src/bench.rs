//! KVM's dirty log against the engine's rounds, on the same guest RAM in the same run: what a
//! round costs the VMM and what a first write after a round costs the vCPU.
//!
//! One VM, one vCPU, one guest RAM mapping. For each fraction of guest RAM written per round the
//! guest program is set to visit exactly that many pages once (one pass, then `HLT`), and each
//! mechanism runs the same rounds on the same mapping:
//!
//! * `none`: the slot without a dirty log and the mapping not write-protected: the cost of the
//!   pass itself (the baseline);
//! * `kvm-dirty-log`: the slot with `KVM_MEM_LOG_DIRTY_PAGES`; a round is `KVM_GET_DIRTY_LOG`
//!   (copy the bitmap out, clear it, write-protect the dirty pages again in KVM's page tables);
//! * `uffd-async-wp`: the slot without a dirty log, the mapping armed with userfaultfd async
//!   write-protect; a round is a `PAGEMAP_SCAN` get-and-reprotect.
//!
//! The memory slot is deleted and registered again between mechanisms (with or without the
//! dirty log); the mapping and its pages stay. A round's cost is its wall time; the vCPU's cost
//! per first write is the pass time divided by the pages written, and the overhead is that
//! minus the baseline's.

use crate::error::Error;
use crate::guest::{CODE_GPA, GuestProgram, PAGE, PORT_DONE, PORT_PROGRESS};
use crate::vm::{flat_protected_mode, kvm_err, open_kvm};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::kvm::GuestRam;
use precopy_sys::mem::{Backing, Mapping, Thp};
use precopy_tracker::{Tracker, Uffd};
use std::sync::Arc;
use std::time::Duration;

/// A tracking mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// No tracking (baseline).
    None,
    /// KVM's dirty log.
    KvmDirtyLog,
    /// The engine: userfaultfd async write-protect + `PAGEMAP_SCAN`.
    UffdAsyncWp,
}

impl Mechanism {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::None => "none",
            Mechanism::KvmDirtyLog => "kvm-dirty-log",
            Mechanism::UffdAsyncWp => "uffd-async-wp",
        }
    }
}

/// One mechanism at one fraction: medians over the measured rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// Guest RAM, bytes.
    pub ram: u64,
    /// Fraction of guest RAM written per round.
    pub fraction: f64,
    /// Pages the guest wrote per round.
    pub pages_written: u64,
    /// Median round cost (get + clear + re-protect), µs of CPU; 0 for `none`.
    pub round_us: f64,
    /// Median pages the round reported.
    pub pages_reported: u64,
    /// Median vCPU CPU time per page written (the whole pass ÷ pages), µs; `None` at 0 %.
    pub write_us: Option<f64>,
    /// `write_us` minus the baseline's: what the mechanism adds to a first write, µs.
    pub first_write_overhead_us: Option<f64>,
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Bench {
    vm: Arc<VmFd>,
    vcpu: VcpuFd,
    ram: Arc<Mapping>,
}

impl Bench {
    /// Runs the loaded program once from its entry to `HLT`; returns the wall time.
    fn pass(&mut self) -> Result<Duration, Error> {
        let regs = kvm_regs {
            rip: CODE_GPA,
            rsi: GuestProgram::params_gpa(0),
            rflags: 2,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let t = thread_cpu();
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(PORT_PROGRESS | PORT_DONE, _)) => {}
                Ok(VcpuExit::Hlt) => return Ok(thread_cpu().saturating_sub(t)),
                Ok(other) => {
                    return Err(Error::UnexpectedExit {
                        cpu: 0,
                        exit: format!("{other:?}"),
                    });
                }
                Err(e) => return Err(kvm_err("KVM_RUN")(e)),
            }
        }
    }
}

/// Runs the comparison on `ram_size` bytes of guest RAM for each of `fractions` (0..=1),
/// `rounds` measured rounds each (after one unmeasured).
pub fn run(ram_size: u64, fractions: &[f64], rounds: usize) -> Result<Vec<BenchRow>, Error> {
    let kvm = open_kvm()?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    let ram = Arc::new(
        Mapping::new(Backing::AnonPrivate, ram_size, 0, Thp::NoHuge).map_err(|source| {
            Error::Ram {
                len: ram_size,
                source,
            }
        })?,
    );
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    flat_protected_mode(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut b = Bench { vm, vcpu, ram };
    let mut rows = Vec::new();
    for &fraction in fractions {
        let mut program = GuestProgram::new(1, ram_size, PAGE, 1)?;
        let pages = ((program.region_pages() as f64 * fraction.clamp(0.0, 1.0)) as u32).max(1);
        program.pages_per_vcpu = pages;
        program.stride = if pages > 2 {
            crate::guest::scatter_stride(pages)
        } else {
            1
        };
        program.chunk = pages;
        program.validate()?;
        let write = |gpa: u64, bytes: &[u8]| {
            b.ram.write(gpa, bytes).map_err(|source| Error::Ram {
                len: bytes.len() as u64,
                source,
            })
        };
        write(CODE_GPA, &program.code()?)?;
        write(GuestProgram::params_gpa(0), &program.params(0))?;
        let writes = fraction > 0.0;
        let mut baseline = None;
        for mechanism in [
            Mechanism::None,
            Mechanism::KvmDirtyLog,
            Mechanism::UffdAsyncWp,
        ] {
            let row = b.measure(
                mechanism,
                writes,
                u64::from(pages),
                rounds,
                fraction,
                baseline,
            )?;
            if mechanism == Mechanism::None {
                baseline = row.write_us;
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

impl Bench {
    fn measure(
        &mut self,
        mechanism: Mechanism,
        writes: bool,
        pages: u64,
        rounds: usize,
        fraction: f64,
        baseline: Option<f64>,
    ) -> Result<BenchRow, Error> {
        let slot = GuestRam::register(
            self.vm.clone(),
            0,
            0,
            self.ram.clone(),
            mechanism == Mechanism::KvmDirtyLog,
        )
        .map_err(|source| Error::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
        // Fault every page in first, untracked: the rounds then measure tracking, not
        // population.
        self.pass()?;
        let mut engine = None;
        if mechanism == Mechanism::UffdAsyncWp {
            let mut tracker = Tracker::new(Uffd::new().map_err(Error::Tracker)?);
            tracker.register(self.ram.range()).map_err(Error::Tracker)?;
            tracker.arm().map_err(Error::Tracker)?;
            engine = Some((
                tracker,
                Scanner::new(ScanOptions::default()).map_err(Error::Scanner)?,
            ));
        }
        if mechanism == Mechanism::KvmDirtyLog {
            slot.dirty_log().map_err(|source| Error::Kvm {
                what: "KVM_GET_DIRTY_LOG",
                source,
            })?;
        }
        let (mut round_us, mut write_us, mut reported) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..=rounds {
            let pass = if writes { Some(self.pass()?) } else { None };
            let t = thread_cpu();
            let found = match mechanism {
                Mechanism::None => 0,
                Mechanism::KvmDirtyLog => {
                    let bits = slot.dirty_log().map_err(|source| Error::Kvm {
                        what: "KVM_GET_DIRTY_LOG",
                        source,
                    })?;
                    bits.iter().map(|w| u64::from(w.count_ones())).sum()
                }
                Mechanism::UffdAsyncWp => {
                    let (tracker, scanner) = engine.as_mut().ok_or(Error::Misuse {
                        operation: "an engine round",
                        state: "without a tracker",
                    })?;
                    let round = scanner.round(tracker).map_err(Error::Scanner)?;
                    round.pages().count() as u64
                }
            };
            let took = thread_cpu().saturating_sub(t);
            if r == 0 {
                continue; // unmeasured: the first writes after arming or enabling the log
            }
            round_us.push(took.as_secs_f64() * 1e6);
            reported.push(found as f64);
            if let Some(p) = pass {
                write_us.push(p.as_secs_f64() * 1e6 / pages as f64);
            }
        }
        drop(engine);
        drop(slot);
        let write = (!write_us.is_empty()).then(|| median(&mut write_us));
        Ok(BenchRow {
            mechanism,
            ram: self.ram.len(),
            fraction,
            pages_written: if writes { pages } else { 0 },
            round_us: if mechanism == Mechanism::None {
                0.0
            } else {
                median(&mut round_us)
            },
            pages_reported: median(&mut reported) as u64,
            write_us: write,
            first_write_overhead_us: match (write, baseline) {
                (Some(w), Some(b)) if mechanism != Mechanism::None => Some(w - b),
                _ => None,
            },
        })
    }
}
