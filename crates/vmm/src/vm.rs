//! The VM: guest RAM this process maps, one memory slot, vCPU threads running the guest
//! program, and the pause/resume/throttle control a migration drives.
//!
//! # vCPU threads and pausing
//!
//! Each vCPU runs `KVM_RUN` in its own thread. The guest leaves `KVM_RUN` every `chunk` pages
//! with an `OUT` to [`PORT_PROGRESS`]; there the thread paces it (to the configured dirty rate),
//! throttles it (auto-converge) and checks for a pause request. Pausing is cooperative: a vCPU
//! parks at its next exit, so the pause takes at most one chunk of guest work.
//!
//! Before parking, a vCPU calls `KVM_RUN` once more with `immediate_exit` set. KVM completes
//! the `OUT` it exited for (an `OUT` is finished only on the next `KVM_RUN`; its instruction
//! pointer still points at it until then) and returns `EINTR` without running guest code. Only
//! then are its registers a state another VMM can resume from: restored before completion, the
//! guest would execute the `OUT` twice. (KVM's API documentation, "immediate_exit".)

use crate::error::Error;
use crate::guest::{CODE_GPA, GuestProgram, IDLE_TICK, PAGE, PORT_DONE, PORT_IDLE, PORT_PROGRESS};
use crate::state::{VcpuDevice, VcpuState, VmState, monotonic_ns};
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use precopy_sys::kvm::GuestRam;
use precopy_sys::mem::{Backing, Mapping, Thp};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum RamBacking {
    /// Private anonymous memory (the default).
    #[default]
    Anonymous,
    /// A memfd (shmem) mapped shared, as VMMs do to share guest RAM with device processes.
    Memfd,
}

impl RamBacking {
    /// [`RamBacking::Memfd`] if `memfd`, else [`RamBacking::Anonymous`] (a command-line flag).
    pub fn memfd_if(memfd: bool) -> RamBacking {
        if memfd {
            RamBacking::Memfd
        } else {
            RamBacking::Anonymous
        }
    }
}

/// How to build a VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// The guest program (and with it the vCPU count and RAM size).
    pub program: GuestProgram,
    /// What backs guest RAM.
    pub backing: RamBacking,
    /// Guest dirty rate to hold, in bytes of first-written pages per second over all vCPUs;
    /// `None` runs the guest as fast as it goes.
    pub dirty_rate: Option<u64>,
    /// Turn on KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES`) for the memory slot.
    pub kvm_dirty_log: bool,
}

/// A VM ready to start: RAM mapped and registered with KVM. Its vCPUs are created when it
/// starts, from the program it was built with or the one a saved state names.
#[derive(Debug)]
pub struct Vm {
    program: Option<GuestProgram>,
    backing: RamBacking,
    dirty_rate: Option<u64>,
    ram: Arc<GuestRam>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
}

pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm {
        what,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

/// Opens `/dev/kvm`; [`Error::NoKvm`] when it is absent or not permitted.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(|e| Error::NoKvm {
        source: io::Error::from_raw_os_error(e.errno()),
    })
}

impl Vm {
    /// Creates the VM with zero-filled guest RAM at guest-physical 0 and its vCPUs. Nothing is
    /// loaded: see [`Vm::load_program`] (a fresh boot) or [`RunningVm`] restored from a
    /// [`VmState`] (a migration's destination).
    pub fn new(config: VmConfig) -> Result<Vm, Error> {
        config.program.validate()?;
        let mut vm = Vm::incoming(
            config.program.ram_size,
            config.backing,
            config.kvm_dirty_log,
        )?;
        vm.program = Some(config.program);
        vm.dirty_rate = config.dirty_rate;
        Ok(vm)
    }

    /// A VM with `ram_size` bytes of zero-filled guest RAM and no program yet: a migration's
    /// destination, which receives memory first and the program with the state.
    pub fn incoming(ram_size: u64, backing: RamBacking, kvm_dirty_log: bool) -> Result<Vm, Error> {
        let kvm = open_kvm()?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        let len = ram_size;
        let backing_kind = backing;
        let backing = match backing {
            RamBacking::Anonymous => Backing::AnonPrivate,
            RamBacking::Memfd => Backing::Memfd,
        };
        // No THP: the engine's rounds are per 4 KiB page either way, and a THP dirtied before
        // arming would report as one 2 MiB run.
        let mapping = Mapping::new(backing, len, 0, Thp::NoHuge)
            .map_err(|source| Error::Ram { len, source })?;
        let ram = GuestRam::register(vm.clone(), 0, 0, Arc::new(mapping), kvm_dirty_log).map_err(
            |source| Error::Kvm {
                what: "KVM_SET_USER_MEMORY_REGION",
                source,
            },
        )?;
        Ok(Vm {
            program: None,
            backing: backing_kind,
            dirty_rate: None,
            ram: Arc::new(ram),
            vm,
            _kvm: kvm,
        })
    }

    /// What backs guest RAM.
    pub fn backing(&self) -> RamBacking {
        self.backing
    }

    /// Guest RAM (its host mapping is what a dirty log tracks and a transfer reads).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Writes the guest program and its parameter blocks into guest RAM.
    pub fn load_program(&self) -> Result<(), Error> {
        let program = self.program.as_ref().ok_or(Error::Misuse {
            operation: "loading the program",
            state: "into a VM built for an incoming migration",
        })?;
        let ram = self.ram.ram();
        let write = |gpa: u64, bytes: &[u8]| {
            ram.write(gpa, bytes).map_err(|source| Error::Ram {
                len: bytes.len() as u64,
                source,
            })
        };
        write(CODE_GPA, &program.code()?)?;
        for cpu in 0..program.vcpus {
            write(GuestProgram::params_gpa(cpu), &program.params(cpu))?;
        }
        Ok(())
    }

    /// Starts the vCPUs: at the program's entry (`state` = `None`, after
    /// [`Vm::load_program`]), or where a saved [`VmState`] left them.
    pub fn start(mut self, state: Option<VmState>) -> Result<RunningVm, Error> {
        let program = match (&self.program, &state) {
            (Some(p), Some(s)) if *p != s.program => {
                return Err(Error::State {
                    reason: "the saved guest program differs from this VM's".into(),
                });
            }
            (_, Some(s)) => s.program.clone(),
            (Some(p), None) => p.clone(),
            (None, None) => {
                return Err(Error::Misuse {
                    operation: "starting a VM",
                    state: "without a program or a saved state",
                });
            }
        };
        program.validate()?;
        if program.ram_size != self.ram.ram().len() {
            return Err(Error::State {
                reason: format!(
                    "the program needs {} bytes of guest RAM, this VM has {}",
                    program.ram_size,
                    self.ram.ram().len()
                ),
            });
        }
        let n = program.vcpus as usize;
        let vcpus = (0..program.vcpus)
            .map(|i| {
                self.vm
                    .create_vcpu(u64::from(i))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(s) = &state {
            self.dirty_rate = s.dirty_rate;
        }
        let states: Vec<VcpuState> = match state {
            Some(s) => {
                if s.vcpus.len() != n {
                    return Err(Error::State {
                        reason: format!("{} vCPUs saved, this VM has {n}", s.vcpus.len()),
                    });
                }
                for vs in &s.vcpus {
                    let fd = vcpus.get(vs.cpu as usize).ok_or_else(|| Error::State {
                        reason: format!("vCPU {} does not exist", vs.cpu),
                    })?;
                    fd.set_sregs(&vs.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                    fd.set_regs(&vs.regs).map_err(kvm_err("KVM_SET_REGS"))?;
                }
                s.vcpus
            }
            None => {
                let mut out = Vec::with_capacity(n);
                for (cpu, fd) in vcpus.iter().enumerate() {
                    let cpu = cpu as u32;
                    let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                    flat_protected_mode(&mut sregs);
                    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                    let regs = kvm_regs {
                        rip: CODE_GPA,
                        rsi: GuestProgram::params_gpa(cpu),
                        rflags: 2,
                        ..Default::default()
                    };
                    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
                    out.push(VcpuState {
                        cpu,
                        regs,
                        sregs,
                        device: VcpuDevice::default(),
                        stopped_at_ns: 0,
                    });
                }
                out
            }
        };
        let shared = Arc::new(Shared {
            pause: AtomicBool::new(false),
            throttle: AtomicU64::new(0f64.to_bits()),
            reports: AtomicU64::new(0),
            ctl: Mutex::new(Ctl {
                pause: false,
                stop: false,
                parked: 0,
                finished: 0,
                saved: states.iter().map(|s| Some(s.clone())).collect(),
                first_run_ns: vec![None; n],
            }),
            cv: Condvar::new(),
            vcpus: n as u32,
            program: program.clone(),
            dirty_rate: self.dirty_rate,
        });
        // Pace per vCPU: one progress exit per `chunk` pages.
        let pace = self.dirty_rate.filter(|&r| r > 0).map(|rate| {
            let per_vcpu = rate as f64 / n as f64;
            Duration::from_secs_f64(f64::from(program.chunk) * PAGE as f64 / per_vcpu)
        });
        let mut threads = Vec::with_capacity(n);
        for (fd, st) in vcpus.into_iter().zip(states) {
            let shared = shared.clone();
            let cpu = st.cpu;
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .spawn(move || {
                    let r = vcpu_loop(fd, &shared, st, pace);
                    if r.is_err() {
                        // Never leave a pause waiting for a vCPU that died.
                        let mut ctl = shared.lock();
                        ctl.finished += 1;
                        shared.cv.notify_all();
                    }
                    r
                })
                .map_err(|source| Error::Kvm {
                    what: "spawning a vCPU thread",
                    source,
                })?;
            threads.push(handle);
        }
        Ok(RunningVm {
            shared,
            threads,
            backing: self.backing,
            ram: self.ram,
            program,
            started: Instant::now(),
            _vm: self.vm,
            _kvm: self._kvm,
        })
    }
}

/// Flat 32-bit protected mode without paging: code and data segments of base 0 and limit 4 GiB.
/// Loaded straight into the segment registers, so the guest needs no GDT of its own as long as
/// it never reloads a segment (this program does not).
pub(crate) fn flat_protected_mode(sregs: &mut kvm_bindings::kvm_sregs) {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 0b1011); // execute/read, accessed
    sregs.ds = seg(0x10, 0b0011); // read/write, accessed
    sregs.es = sregs.ds;
    sregs.fs = sregs.ds;
    sregs.gs = sregs.ds;
    sregs.ss = sregs.ds;
    sregs.cr0 |= 1; // PE
}

struct Shared {
    /// Mirrors `ctl.pause` so a vCPU checks it without the lock at every exit.
    pause: AtomicBool,
    /// Fraction of time the vCPUs are denied (auto-converge), as `f64` bits.
    throttle: AtomicU64,
    /// Progress reports of all vCPUs in this process.
    reports: AtomicU64,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    vcpus: u32,
    /// What the saved state names (the destination checks it builds the same VM).
    program: GuestProgram,
    dirty_rate: Option<u64>,
}

struct Ctl {
    pause: bool,
    stop: bool,
    parked: u32,
    finished: u32,
    /// Each vCPU's state when it last parked or finished.
    saved: Vec<Option<VcpuState>>,
    /// `CLOCK_MONOTONIC` at each vCPU's first `KVM_RUN` in this process.
    first_run_ns: Vec<Option<u64>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("vcpus", &self.vcpus)
            .finish()
    }
}

fn vcpu_loop(
    mut fd: VcpuFd,
    shared: &Shared,
    mut st: VcpuState,
    pace: Option<Duration>,
) -> Result<(), Error> {
    let cpu = st.cpu;
    let mut deadline = Instant::now();
    let mut first = true;
    loop {
        if st.device.done.is_some() {
            // Finished (here or before a migration): nothing more to run.
            let mut ctl = shared.lock();
            ctl.saved[cpu as usize] = Some(st);
            ctl.finished += 1;
            shared.cv.notify_all();
            return Ok(());
        }
        if shared.pause.load(Ordering::Acquire) && park(&mut fd, shared, &mut st)? {
            return Ok(());
        }
        if first {
            shared.lock().first_run_ns[cpu as usize] = Some(monotonic_ns());
            first = false;
        }
        let entered = Instant::now();
        let exit = fd.run();
        st.stopped_at_ns = monotonic_ns();
        match exit {
            Ok(VcpuExit::IoOut(PORT_PROGRESS, data)) => {
                st.device.progress(le_u32(data));
                shared.reports.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::IoOut(PORT_IDLE, _)) => {
                // An idle tick: the guest wrote nothing and waits here.
                sleep_unless_paused(shared, IDLE_TICK);
                continue;
            }
            Ok(VcpuExit::IoOut(PORT_DONE, data)) => {
                st.device.done = Some(le_u32(data));
                // Complete the OUT; the guest's next instruction is HLT.
                match fd.run() {
                    Ok(VcpuExit::Hlt) => {}
                    Ok(other) => {
                        return Err(Error::UnexpectedExit {
                            cpu,
                            exit: format!("{other:?} after the final report"),
                        });
                    }
                    Err(e) => return Err(kvm_err("KVM_RUN")(e)),
                }
                st.regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                st.sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                continue;
            }
            Ok(other) => {
                return Err(Error::UnexpectedExit {
                    cpu,
                    exit: format!("{other:?}"),
                });
            }
            Err(e) if e.errno() == libc_eintr() => continue,
            Err(e) => return Err(kvm_err("KVM_RUN")(e)),
        }
        let throttle = f64::from_bits(shared.throttle.load(Ordering::Relaxed));
        if throttle > 0.0 {
            // Deny `throttle` of the time: sleep t × f / (1 − f) after running t.
            let ran = entered.elapsed().as_secs_f64();
            let f = throttle.min(0.99);
            sleep_unless_paused(shared, Duration::from_secs_f64(ran * f / (1.0 - f)));
        }
        if let Some(interval) = pace {
            let now = Instant::now();
            deadline += interval;
            if deadline < now {
                deadline = now;
            } else {
                sleep_unless_paused(shared, deadline - now);
            }
        }
    }
}

fn libc_eintr() -> i32 {
    nix::errno::Errno::EINTR as i32
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Sleeps `d`, in slices, returning early when a pause is requested.
fn sleep_unless_paused(shared: &Shared, d: Duration) {
    let end = Instant::now() + d;
    loop {
        let now = Instant::now();
        if now >= end || shared.pause.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(1)));
    }
}

/// Completes the pending exit, saves the vCPU's state and waits for resume or stop. Returns
/// whether to stop.
fn park(fd: &mut VcpuFd, shared: &Shared, st: &mut VcpuState) -> Result<bool, Error> {
    fd.set_kvm_immediate_exit(1);
    let completed = match fd.run() {
        Err(e) if e.errno() == libc_eintr() => Ok(()),
        Err(e) => Err(kvm_err("KVM_RUN (immediate exit)")(e)),
        Ok(other) => Err(Error::UnexpectedExit {
            cpu: st.cpu,
            exit: format!("{other:?} with immediate_exit set"),
        }),
    };
    fd.set_kvm_immediate_exit(0);
    completed?;
    st.regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    st.sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let mut ctl = shared.lock();
    ctl.saved[st.cpu as usize] = Some(st.clone());
    ctl.parked += 1;
    shared.cv.notify_all();
    while ctl.pause && !ctl.stop {
        ctl = shared.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
    }
    ctl.parked -= 1;
    Ok(ctl.stop)
}

/// A running VM.
#[derive(Debug)]
pub struct RunningVm {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Result<(), Error>>>,
    backing: RamBacking,
    ram: Arc<GuestRam>,
    program: GuestProgram,
    started: Instant,
    _vm: Arc<VmFd>,
    _kvm: Kvm,
}

/// What a VM run ended with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunOutcome {
    /// Each vCPU's final checksum.
    pub checksums: Vec<u32>,
    /// [`crate::guest::combined_checksum`] of them.
    pub checksum: u32,
    /// Progress reports the vCPUs made (in this process and, if migrated here, before).
    pub progress_reports: u64,
    /// Time from start to the last vCPU finishing, in this process (JSON: milliseconds).
    #[serde(
        serialize_with = "crate::migrate::serialize_ms",
        rename = "run_time_ms"
    )]
    pub run_time: Duration,
    /// `CLOCK_MONOTONIC` (ns) of each vCPU's first `KVM_RUN` in this process.
    pub first_run_ns: Vec<Option<u64>>,
}

impl RunningVm {
    /// What backs guest RAM.
    pub fn backing(&self) -> RamBacking {
        self.backing
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The program the guest runs.
    pub fn program(&self) -> &GuestProgram {
        &self.program
    }

    /// A handle that pauses, resumes and throttles the vCPUs (the migration's workload).
    pub fn control(&self) -> VmControl {
        VmControl {
            shared: self.shared.clone(),
        }
    }

    /// The vCPUs' saved state; every vCPU must be paused or finished.
    pub fn state(&self) -> Result<VmState, Error> {
        self.control().state()
    }

    /// Stops the vCPU threads (paused ones leave, running ones park first) and joins them.
    pub fn stop(self) -> Result<(), Error> {
        {
            let mut ctl = self.shared.lock();
            ctl.pause = true;
            ctl.stop = true;
            self.shared.pause.store(true, Ordering::Release);
            self.shared.cv.notify_all();
        }
        self.join().map(|_| ())
    }

    /// Waits until every vCPU finished its program.
    pub fn wait(self) -> Result<RunOutcome, Error> {
        let (shared, run_time) = self.join()?;
        let ctl = shared.lock();
        let mut checksums = Vec::new();
        let mut reports = 0;
        for s in ctl.saved.iter().flatten() {
            reports += s.device.reports;
            checksums.push(s.device.done.ok_or(Error::Misuse {
                operation: "reading the outcome",
                state: "of a vCPU that was stopped before finishing",
            })?);
        }
        Ok(RunOutcome {
            checksum: crate::guest::combined_checksum(&checksums),
            checksums,
            progress_reports: reports,
            run_time,
            first_run_ns: ctl.first_run_ns.clone(),
        })
    }

    fn join(self) -> Result<(Arc<Shared>, Duration), Error> {
        let mut first_err = None;
        for (cpu, t) in self.threads.into_iter().enumerate() {
            let r = t
                .join()
                .unwrap_or(Err(Error::VcpuPanicked { cpu: cpu as u32 }));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        let run_time = self.started.elapsed();
        match first_err {
            Some(e) => Err(e),
            None => Ok((self.shared, run_time)),
        }
    }
}

/// Pauses, resumes and throttles a [`RunningVm`]'s vCPUs; clone it freely.
#[derive(Debug, Clone)]
pub struct VmControl {
    shared: Arc<Shared>,
}

impl VmControl {
    /// Asks every vCPU to park and waits until all have (or have finished). Each parked vCPU
    /// has completed its last exit and saved its registers.
    pub fn pause(&self) {
        let mut ctl = self.shared.lock();
        ctl.pause = true;
        self.shared.pause.store(true, Ordering::Release);
        while ctl.parked + ctl.finished < self.shared.vcpus {
            ctl = self.shared.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Pauses the vCPUs unless a pause is already in force; returns whether it paused them
    /// (and so whether the caller should resume them).
    pub fn pause_if_running(&self) -> bool {
        if self.shared.lock().pause {
            return false;
        }
        self.pause();
        true
    }

    /// Progress reports of all vCPUs so far in this process (each is `chunk` pages written).
    pub fn progress_reports(&self) -> u64 {
        self.shared.reports.load(Ordering::Relaxed)
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut ctl = self.shared.lock();
        ctl.pause = false;
        self.shared.pause.store(false, Ordering::Release);
        self.shared.cv.notify_all();
        drop(ctl);
    }

    /// Denies the vCPUs `fraction` (0..1) of their time (auto-converge).
    pub fn set_throttle(&self, fraction: f64) {
        self.shared
            .throttle
            .store(fraction.clamp(0.0, 0.99).to_bits(), Ordering::Relaxed);
    }

    /// Whether every vCPU has finished its program.
    pub fn finished(&self) -> bool {
        self.shared.lock().finished == self.shared.vcpus
    }

    /// The VM state (each vCPU's registers and progress device, the program): what a
    /// destination resumes from. Every vCPU must be paused ([`VmControl::pause`]) or finished:
    /// [`Error::Misuse`] otherwise.
    pub fn state(&self) -> Result<VmState, Error> {
        let ctl = self.shared.lock();
        if ctl.parked + ctl.finished < self.shared.vcpus {
            return Err(Error::Misuse {
                operation: "saving VM state",
                state: "while vCPUs run",
            });
        }
        let vcpus = ctl
            .saved
            .iter()
            .map(|s| {
                s.clone().ok_or(Error::Misuse {
                    operation: "saving VM state",
                    state: "before every vCPU saved its state",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            program: self.shared.program.clone(),
            dirty_rate: self.shared.dirty_rate,
            vcpus,
        })
    }
}

impl precopy_migrate::Workload for VmControl {
    type Error = Error;

    fn pause(&mut self) -> Result<(), Error> {
        VmControl::pause(self);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), Error> {
        VmControl::resume(self);
        Ok(())
    }

    fn set_throttle(&mut self, fraction: f64) -> Result<(), Error> {
        VmControl::set_throttle(self, fraction);
        Ok(())
    }

    fn throttle_method(&self) -> &'static str {
        "vCPU sleep after each exit"
    }

    /// The state hook: called by the driver with the vCPUs paused after the last memory round;
    /// the blob ([`VmState::to_bytes`]) travels in the transfer's STATE frame.
    fn save_state(&mut self) -> Result<Vec<u8>, Error> {
        self.state()?.to_bytes()
    }
}
