//! Running a system call inside another process with ptrace (x86_64).
//!
//! [`Tracee::seize`] attaches to one thread with `PTRACE_SEIZE` and stops it with
//! `PTRACE_INTERRUPT` (no signal is sent, so the target sees nothing); [`Tracee::syscall`] runs
//! one system call in that thread by pointing its instruction pointer at a `syscall` instruction
//! already present in its text and single-stepping over it; [`Tracee::detach`] puts everything
//! back and lets the thread go. Only the seized thread stops: the target's other threads keep
//! running throughout.
//!
//! # What is put back
//!
//! - **Registers**: all general-purpose registers (`PTRACE_GETREGS`) are saved at the first stop
//!   and written back exactly before detaching. The injected call changes no other state of the
//!   thread (floating-point and vector registers are untouched by `syscall`).
//! - **Signal mask**: saved with `PTRACE_GETSIGMASK`; while calls are injected every blockable
//!   signal is blocked (`PTRACE_SETSIGMASK`), so a signal arriving meanwhile stays pending instead
//!   of running a handler on injected registers; the original mask is restored before detaching
//!   and the signal is then delivered normally. A `SIGSTOP` that arrives meanwhile (it cannot be
//!   blocked) is sent again after detaching.
//! - **A thread stopped inside a system call** (a blocking `read`, `futex`, `nanosleep`): the
//!   interrupt stop comes with the call's "restart me" result (`-ERESTARTSYS` and friends) in
//!   `rax` and its number in `orig_rax`. The injected registers carry `orig_rax = -1`, so the
//!   kernel's restart logic leaves the injected call alone; the saved registers, written back at
//!   the end, still carry the original values, so the kernel restarts the interrupted call when
//!   the thread resumes, exactly as after any ptrace stop.
//! - **A stopped target** (`SIGSTOP`, state `T`) stays stopped after detaching: the kernel
//!   re-enters the group stop.
//!
//! What cannot be put back: if the engine is killed with `SIGKILL` while a call is being
//! injected, the kernel detaches the thread with the injected registers in place and it will
//! most likely crash. Callers block the catchable termination signals for the few
//! milliseconds an injection takes ([`block_termination_signals`]).

use std::io;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// `PTRACE_GETSIGMASK` (Linux 3.11+); the libc crate has no name for it.
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
/// `PTRACE_SETSIGMASK` (Linux 3.11+).
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
/// Size of the kernel's `sigset_t` on x86_64 (64 signals).
const KERNEL_SIGSET_SIZE: usize = 8;
/// The two bytes of the x86_64 `syscall` instruction.
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
/// Signals that can never be blocked (bits of `SIGKILL` and `SIGSTOP`).
const UNBLOCKABLE: u64 = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));

/// How a ptrace step failed.
#[derive(Debug)]
pub enum PtraceError {
    /// The thread or process exited (or was killed) while attached.
    Exited {
        /// The thread.
        tid: i32,
    },
    /// A ptrace request failed.
    Request {
        /// Which request.
        what: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// The injected call raised a signal (say `SIGSEGV`: the instruction address was wrong);
    /// the signal is discarded, the thread is put back as it was.
    Faulted {
        /// The signal.
        signal: Signal,
    },
    /// The thread stopped somewhere else than after the injected `syscall` instruction.
    UnexpectedStop {
        /// Where it stopped.
        rip: u64,
        /// Where it should have.
        expected: u64,
    },
}

impl std::fmt::Display for PtraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PtraceError::Exited { tid } => write!(f, "thread {tid} exited while attached"),
            PtraceError::Request { what, errno } => write!(f, "{what} failed: {errno}"),
            PtraceError::Faulted { signal } => {
                write!(f, "the injected system call raised {signal}")
            }
            PtraceError::UnexpectedStop { rip, expected } => write!(
                f,
                "the thread stopped at {rip:#x}, not after the injected syscall ({expected:#x})"
            ),
        }
    }
}

impl std::error::Error for PtraceError {}

impl PtraceError {
    /// The errno of a failed request, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            PtraceError::Request { errno, .. } => Some(*errno as i32),
            _ => None,
        }
    }
}

impl From<PtraceError> for io::Error {
    fn from(e: PtraceError) -> io::Error {
        match e {
            PtraceError::Request { errno, .. } => io::Error::from_raw_os_error(errno as i32),
            other => io::Error::other(other),
        }
    }
}

fn req(what: &'static str) -> impl FnOnce(Errno) -> PtraceError {
    move |errno| PtraceError::Request { what, errno }
}

/// What the thread is doing while [`Tracee::wait_stop`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Being stopped for the first time.
    Attach,
    /// Single-stepping an injected call.
    Inject,
}

/// One thread of another process, seized and stopped; detached (with registers and signal
/// mask restored) by [`Tracee::detach`] or on drop.
#[derive(Debug)]
pub struct Tracee {
    tid: Pid,
    saved: libc::user_regs_struct,
    saved_mask: u64,
    /// Signals that could not be blocked and arrived while attached: sent again after detaching.
    deferred: Vec<Signal>,
    attached: bool,
}

impl Tracee {
    /// Seizes thread `tid` and stops it with `PTRACE_INTERRUPT`; saves its registers and signal
    /// mask and blocks every blockable signal in it.
    ///
    /// Errors: `ESRCH` (no such thread), `EPERM` (no ptrace access: not the same user without
    /// `CAP_SYS_PTRACE`, Yama's `ptrace_scope`, or already traced by someone else).
    pub fn seize(tid: i32) -> Result<Tracee, PtraceError> {
        let pid = Pid::from_raw(tid);
        ptrace::seize(pid, ptrace::Options::empty()).map_err(req("PTRACE_SEIZE"))?;
        let mut t = Tracee {
            tid: pid,
            // SAFETY: user_regs_struct is plain integers; all-zero is a valid value. It is
            // overwritten below before any use.
            saved: unsafe { std::mem::zeroed() },
            saved_mask: 0,
            deferred: Vec::new(),
            attached: true,
        };
        // From here on, dropping `t` detaches.
        ptrace::interrupt(pid).map_err(req("PTRACE_INTERRUPT"))?;
        t.wait_stop(Phase::Attach, |status| {
            matches!(status, WaitStatus::PtraceEvent(..))
        })?;
        t.saved = ptrace::getregs(pid).map_err(req("PTRACE_GETREGS"))?;
        t.saved_mask = t.get_sigmask()?;
        t.set_sigmask(!UNBLOCKABLE)?;
        Ok(t)
    }

    /// The thread.
    pub fn tid(&self) -> i32 {
        self.tid.as_raw()
    }

    /// The registers saved at the first stop (what the thread gets back on detach).
    pub fn saved_regs(&self) -> &libc::user_regs_struct {
        &self.saved
    }

    /// The signal mask saved at the first stop (bit `n - 1` is signal `n`).
    pub fn saved_sigmask(&self) -> u64 {
        self.saved_mask
    }

    /// Waits until the thread is in a stop `done` accepts, resuming it the same way
    /// (`step`) after any other stop. A `SIGSTOP` is deferred (sent again after detaching). In
    /// [`Phase::Attach`] another signal (one that arrived before the mask was blocked) is
    /// delivered by resuming with it, then the thread is interrupted again; in
    /// [`Phase::Inject`] it can only come from the injected call itself and is an error.
    fn wait_stop(
        &mut self,
        phase: Phase,
        done: impl Fn(&WaitStatus) -> bool,
    ) -> Result<WaitStatus, PtraceError> {
        loop {
            let status = loop {
                match waitpid(self.tid, Some(WaitPidFlag::__WALL)) {
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(req("waitpid")(e)),
                    Ok(s) => break s,
                }
            };
            match status {
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    self.attached = false;
                    return Err(PtraceError::Exited {
                        tid: self.tid.as_raw(),
                    });
                }
                s if done(&s) => return Ok(s),
                WaitStatus::Stopped(_, Signal::SIGSTOP) => {
                    self.deferred.push(Signal::SIGSTOP);
                    self.resume(phase, None)?;
                }
                WaitStatus::Stopped(_, signal) if phase == Phase::Inject => {
                    return Err(PtraceError::Faulted { signal });
                }
                WaitStatus::Stopped(_, signal) => {
                    self.resume(phase, Some(signal))?;
                    ptrace::interrupt(self.tid).map_err(req("PTRACE_INTERRUPT"))?;
                }
                // A group stop (PTRACE_EVENT_STOP) or another event while waiting for
                // something else: keep going the same way.
                _ => self.resume(phase, None)?,
            }
        }
    }

    fn resume(&self, phase: Phase, sig: Option<Signal>) -> Result<(), PtraceError> {
        match phase {
            Phase::Attach => ptrace::cont(self.tid, sig).map_err(req("PTRACE_CONT")),
            Phase::Inject => ptrace::step(self.tid, sig).map_err(req("PTRACE_SINGLESTEP")),
        }
    }

    fn get_sigmask(&self) -> Result<u64, PtraceError> {
        let mut mask: u64 = 0;
        // SAFETY: PTRACE_GETSIGMASK writes KERNEL_SIGSET_SIZE bytes to the address given in
        // `data`, which points at `mask` (8 bytes, writable, alive for the call).
        let ret = unsafe {
            libc::ptrace(
                PTRACE_GETSIGMASK,
                self.tid.as_raw(),
                KERNEL_SIGSET_SIZE,
                &mut mask as *mut u64,
            )
        };
        if ret < 0 {
            return Err(req("PTRACE_GETSIGMASK")(Errno::last()));
        }
        Ok(mask)
    }

    fn set_sigmask(&self, mask: u64) -> Result<(), PtraceError> {
        // SAFETY: PTRACE_SETSIGMASK reads KERNEL_SIGSET_SIZE bytes from `data`, which points at
        // `mask` (8 bytes, alive for the call).
        let ret = unsafe {
            libc::ptrace(
                PTRACE_SETSIGMASK,
                self.tid.as_raw(),
                KERNEL_SIGSET_SIZE,
                &mask as *const u64,
            )
        };
        if ret < 0 {
            return Err(req("PTRACE_SETSIGMASK")(Errno::last()));
        }
        Ok(())
    }

    /// Runs system call `nr` with `args` in the thread, using the `syscall` instruction at
    /// `insn` (an address in the target's executable memory holding `0f 05`). Returns the raw
    /// result (`-errno` on failure, as the kernel returns it). The thread is stopped again
    /// afterwards, with the injected registers still in place until [`Tracee::detach`].
    pub fn syscall(&mut self, insn: u64, nr: i64, args: [u64; 6]) -> Result<i64, PtraceError> {
        let mut regs = self.saved;
        regs.rip = insn;
        regs.rax = nr as u64;
        // Not "inside a system call": keeps the kernel's restart logic away from this one.
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        ptrace::setregs(self.tid, regs).map_err(req("PTRACE_SETREGS"))?;
        ptrace::step(self.tid, None).map_err(req("PTRACE_SINGLESTEP"))?;
        self.wait_stop(Phase::Inject, |s| {
            matches!(s, WaitStatus::Stopped(_, Signal::SIGTRAP))
        })?;
        let after = ptrace::getregs(self.tid).map_err(req("PTRACE_GETREGS"))?;
        let expected = insn + SYSCALL_INSN.len() as u64;
        if after.rip != expected {
            return Err(PtraceError::UnexpectedStop {
                rip: after.rip,
                expected,
            });
        }
        Ok(after.rax as i64)
    }

    /// Writes the saved registers and signal mask back and detaches; the thread resumes where
    /// it was (a stopped process stays stopped). Deferred `SIGSTOP`s are sent again.
    pub fn detach(mut self) -> Result<(), PtraceError> {
        self.restore_and_detach()
    }

    fn restore_and_detach(&mut self) -> Result<(), PtraceError> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        let regs = ptrace::setregs(self.tid, self.saved).map_err(req("PTRACE_SETREGS"));
        let mask = self.set_sigmask(self.saved_mask);
        let detach = ptrace::detach(self.tid, None).map_err(req("PTRACE_DETACH"));
        for sig in self.deferred.drain(..) {
            // Best effort: the thread may have exited.
            let tid = self.tid.as_raw();
            let _ = crate::process::signal_thread(thread_group(tid), tid, sig as i32);
        }
        regs.and(mask).and(detach)
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        // Best effort: the first error is the one the caller already has.
        let _ = self.restore_and_detach();
    }
}

/// The thread group (process) of thread `tid`, from `/proc/TID/status` (`Tgid:`); `tid` itself
/// when that cannot be read.
fn thread_group(tid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// Blocks `SIGINT`, `SIGTERM`, `SIGHUP` and `SIGQUIT` in the calling thread until the guard is
/// dropped: a Ctrl-C during an injection is then delivered only after the target is restored.
pub fn block_termination_signals() -> io::Result<SignalBlock> {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))?;
    Ok(SignalBlock { old })
}

/// Restores the calling thread's signal mask on drop (see [`block_termination_signals`]).
#[derive(Debug)]
pub struct SignalBlock {
    old: SigSet,
}

impl Drop for SignalBlock {
    fn drop(&mut self) {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }
}
