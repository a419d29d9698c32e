//! Running a system call inside another process with ptrace (x86_64).
//!
//! [`Tracee::seize`] attaches to one thread with `PTRACE_SEIZE` and stops it with
//! `PTRACE_INTERRUPT` (no signal is sent, so the target sees nothing); [`Tracee::syscall`] runs
//! one system call in that thread by pointing its instruction pointer at a `syscall` instruction
//! already present in its text and resuming it with `PTRACE_SYSCALL` to the call's entry and
//! exit stops; [`Tracee::detach`] puts everything back and lets the thread go. Only the seized thread stops: the target's other threads keep
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
//!   and the signal is then delivered normally. A `SIGSTOP` that reaches the thread meanwhile
//!   (it cannot be blocked) is delivered there and then, through ptrace: the process's group
//!   stop begins at once, as it would have untraced, while the traced thread goes on with the
//!   injected calls (a tracee resumed from a group stop runs); on detach the kernel puts it
//!   into the group stop if that is still in effect. A `SIGCONT` that came in between ended
//!   it, and the thread runs on, as it would have untraced. (Until 2026-12-01 the stop was
//!   held back and sent again after detaching, also after a `SIGCONT`: the target stayed
//!   stopped.)
//! - **A thread stopped inside a system call** (a blocking `read`, `futex`, `nanosleep`): the
//!   interrupt stop comes with the call's "restart me" result (`-ERESTARTSYS` and friends) in
//!   `rax` and its number in `orig_rax`. The injected registers carry `orig_rax = -1`, so the
//!   kernel's restart logic leaves the injected call alone; the saved registers, written back at
//!   the end, still carry the original values, so the kernel restarts the interrupted call when
//!   the thread resumes, exactly as after any ptrace stop.
//! - **A stopped target** (`SIGSTOP`, state `T`) stays stopped after detaching: the kernel
//!   re-enters the group stop.
//! - **A thread that does not stop**: the seize waits at most [`STOP_TIMEOUT`] for the
//!   thread's first stop (a thread in an uninterruptible sleep, state `D`, such as a `vfork`
//!   parent or a read from a hung network file system, stops only when that sleep ends), then
//!   fails with [`PtraceError::NotStopped`] having changed nothing in the thread; it stays
//!   seized until the tracing thread exits (the kernel cannot detach a running thread on
//!   request, and does so when its tracer exits). [`take_fd`]'s tracers exit right after.
//!   The wait can be cut short ([`Tracee::seize_cancellable`], [`FdCall::cancel`]): then
//!   [`PtraceError::Cancelled`], the thread likewise untouched. Only this first wait can: once
//!   the thread is stopped, the calls and the restore run to their end (milliseconds).
//!
//! - **Signal dispositions**: nothing is single-stepped. A single-step trap is a `SIGTRAP` the
//!   kernel forces on the thread, and forcing a signal the thread blocks or ignores resets
//!   its disposition to the default for the whole process (`force_sig_info_to_task`): until
//!   2026-12-01 a target's `SIGTRAP` handler (the Go runtime installs one) was lost so. System
//!   call stops are ptrace stops, not signals.
//! - **The way back to user mode**: a ptrace stop at a system call's exit is past the
//!   kernel's restart logic, so the thread is not detached there: with its registers and mask
//!   restored it is interrupted once more (`PTRACE_INTERRUPT`, a stop in the signal path) and
//!   detached from that stop, and an interrupted call it was in restarts as above.
//!
//! What the tracer cannot put back is its own death: a tracer killed with `SIGKILL` while a
//! call is being injected leaves the kernel to detach the thread with the injected registers
//! in place, and it runs on from the wrong place (a `syscall` instruction in its vDSO, with
//! arguments that are not its own), which kills it or worse. [`take_fd`] (what attaching uses) therefore traces from a helper process that
//! outlives its caller; a [`Tracee`] driven directly dies with its caller, which can only
//! block the catchable termination signals meanwhile ([`block_termination_signals`]).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
/// How long [`Tracee::seize`] waits for the thread's first stop (see the module docs, "A
/// thread that does not stop"). A running or sleeping thread stops within microseconds, a
/// thread waiting for a CPU on a loaded machine within a scheduling period or so; seconds mean
/// an uninterruptible sleep.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the wait for the first stop looks again at once (yielding the CPU), before it
/// sleeps between looks.
const STOP_SPIN: Duration = Duration::from_micros(200);
/// The longest pause between two looks at whether the thread has stopped.
const STOP_POLL_MAX: Duration = Duration::from_micros(250);

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
    /// The helper process of [`take_fd`] died (was killed) before it answered: the thread may
    /// be left with injected registers, and a descriptor it copied may be open here.
    HelperDied,
    /// The thread did not stop within [`STOP_TIMEOUT`] (an uninterruptible sleep, most
    /// likely); nothing was changed in it. It stays seized until the tracing thread exits,
    /// and stops (traced) if its sleep ends before that: [`take_fd`]'s tracers exit at once.
    NotStopped {
        /// The thread.
        tid: i32,
        /// How long the seize waited.
        waited: Duration,
    },
    /// The wait for the thread's first stop was cancelled ([`Tracee::seize_cancellable`]);
    /// nothing was changed in it, and it stays seized until the tracing thread exits, as for
    /// [`PtraceError::NotStopped`].
    Cancelled {
        /// The thread.
        tid: i32,
        /// How long the seize had waited.
        waited: Duration,
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
            PtraceError::HelperDied => write!(
                f,
                "the helper process that traced the thread died before it answered (killed?): \
                 the thread may be left with injected registers"
            ),
            PtraceError::NotStopped { tid, waited } => write!(
                f,
                "thread {tid} did not stop within {:.1} s (an uninterruptible sleep, state D, \
                 such as a vfork parent or a hung file system read); it was left untouched",
                waited.as_secs_f64()
            ),
            PtraceError::Cancelled { tid, waited } => write!(
                f,
                "the wait for thread {tid} to stop was cancelled after {:.3} s; it was left \
                 untouched",
                waited.as_secs_f64()
            ),
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
    /// Being stopped for the first time, by this deadline.
    Attach(Instant),
    /// Running an injected call from stop to stop (`PTRACE_SYSCALL`).
    Inject,
}

/// One thread of another process, seized and stopped; detached (with registers and signal
/// mask restored) by [`Tracee::detach`] or on drop.
#[derive(Debug)]
pub struct Tracee {
    tid: Pid,
    saved: libc::user_regs_struct,
    saved_mask: u64,
    /// Whether `saved` and `saved_mask` were read and the mask changed: only then is anything
    /// written back. A seize that failed before changed nothing and writes nothing.
    changed: bool,
    /// Stopped at an injected call's exit (see the module docs, "The way back").
    at_syscall_exit: bool,
    attached: bool,
}

impl Tracee {
    /// Seizes thread `tid` and stops it with `PTRACE_INTERRUPT`; saves its registers and signal
    /// mask and blocks every blockable signal in it.
    ///
    /// Errors: `ESRCH` (no such thread), `EPERM` (no ptrace access: not the same user without
    /// `CAP_SYS_PTRACE`, Yama's `ptrace_scope`, or already traced by someone else);
    /// [`PtraceError::NotStopped`] after [`STOP_TIMEOUT`] (the thread stays seized, untouched,
    /// until the calling thread exits: see the module docs). Nothing allocates.
    pub fn seize(tid: i32) -> Result<Tracee, PtraceError> {
        Tracee::seize_until(tid, None)
    }

    /// [`Tracee::seize`], whose wait for the thread's first stop ends early, with
    /// [`PtraceError::Cancelled`] and the thread untouched, once `cancel` is set (looked at
    /// between looks at the thread: within [`STOP_POLL_MAX`]). Setting it once the thread has
    /// stopped changes nothing.
    pub fn seize_cancellable(tid: i32, cancel: &AtomicBool) -> Result<Tracee, PtraceError> {
        Tracee::seize_until(tid, Some(cancel))
    }

    fn seize_until(tid: i32, cancel: Option<&AtomicBool>) -> Result<Tracee, PtraceError> {
        let pid = Pid::from_raw(tid);
        // TRACESYSGOOD: system call stops are told apart from a real SIGTRAP.
        ptrace::seize(pid, ptrace::Options::PTRACE_O_TRACESYSGOOD).map_err(req("PTRACE_SEIZE"))?;
        let mut t = Tracee {
            tid: pid,
            // SAFETY: user_regs_struct is plain integers; all-zero is a valid value. It is
            // overwritten below before any use, and written back only once it was (`changed`).
            saved: unsafe { std::mem::zeroed() },
            saved_mask: 0,
            changed: false,
            at_syscall_exit: false,
            attached: true,
        };
        // From here on, dropping `t` detaches (once the thread is stopped; see `NotStopped`).
        ptrace::interrupt(pid).map_err(req("PTRACE_INTERRUPT"))?;
        let stop_by = Instant::now() + STOP_TIMEOUT;
        t.wait_stop(Phase::Attach(stop_by), cancel, |status| {
            matches!(status, WaitStatus::PtraceEvent(..))
        })?;
        t.saved = ptrace::getregs(pid).map_err(req("PTRACE_GETREGS"))?;
        t.saved_mask = t.get_sigmask()?;
        t.set_sigmask(!UNBLOCKABLE)?;
        t.changed = true;
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
    /// (`step`) after any other stop. A `SIGSTOP` is delivered by resuming with it (the
    /// process's group stop begins; the traced thread, resumed from its own stop in it, runs
    /// on). In [`Phase::Attach`] another signal (one that arrived before the mask was blocked)
    /// is delivered the same way, then the thread is interrupted again; in [`Phase::Inject`]
    /// it can only come from the injected call itself and is an error. `cancel` as for `wait`.
    fn wait_stop(
        &mut self,
        phase: Phase,
        cancel: Option<&AtomicBool>,
        done: impl Fn(&WaitStatus) -> bool,
    ) -> Result<WaitStatus, PtraceError> {
        loop {
            let status = self.wait(phase, cancel)?;
            match status {
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    self.attached = false;
                    return Err(PtraceError::Exited {
                        tid: self.tid.as_raw(),
                    });
                }
                s if done(&s) => return Ok(s),
                WaitStatus::Stopped(_, Signal::SIGSTOP) => {
                    self.resume(phase, Some(Signal::SIGSTOP))?;
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

    /// The thread's next state change. In [`Phase::Attach`], looked at without blocking,
    /// yielding the CPU in between for the first [`STOP_SPIN`] (a thread that can stop does so
    /// within microseconds, and may need this CPU to do it), then sleeping at growing
    /// intervals up to [`STOP_POLL_MAX`], until its deadline: then [`PtraceError::NotStopped`];
    /// or until `cancel` is set: then [`PtraceError::Cancelled`].
    fn wait(&self, phase: Phase, cancel: Option<&AtomicBool>) -> Result<WaitStatus, PtraceError> {
        let deadline = match phase {
            Phase::Attach(deadline) => deadline,
            Phase::Inject => loop {
                match waitpid(self.tid, Some(WaitPidFlag::__WALL)) {
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(req("waitpid")(e)),
                    Ok(s) => return Ok(s),
                }
            },
        };
        let started = Instant::now();
        let mut nap = Duration::from_micros(10);
        loop {
            match waitpid(self.tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(req("waitpid")(e)),
                Ok(WaitStatus::StillAlive) => {}
                Ok(s) => return Ok(s),
            }
            let now = Instant::now();
            if cancel.is_some_and(|c| c.load(Ordering::Acquire)) {
                return Err(PtraceError::Cancelled {
                    tid: self.tid.as_raw(),
                    waited: now - started,
                });
            }
            if now >= deadline {
                return Err(PtraceError::NotStopped {
                    tid: self.tid.as_raw(),
                    waited: now - started,
                });
            }
            if now - started < STOP_SPIN {
                // SAFETY: sched_yield takes nothing and cannot fail in a way that matters here.
                unsafe { libc::sched_yield() };
                continue;
            }
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(STOP_POLL_MAX);
        }
    }

    fn resume(&self, phase: Phase, sig: Option<Signal>) -> Result<(), PtraceError> {
        match phase {
            Phase::Attach(_) => ptrace::cont(self.tid, sig).map_err(req("PTRACE_CONT")),
            Phase::Inject => ptrace::syscall(self.tid, sig).map_err(req("PTRACE_SYSCALL")),
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
        let syscall_stop = |s: &WaitStatus| matches!(s, WaitStatus::PtraceSyscall(_));
        // To the call's entry stop.
        self.at_syscall_exit = false;
        ptrace::syscall(self.tid, None).map_err(req("PTRACE_SYSCALL"))?;
        self.wait_stop(Phase::Inject, None, syscall_stop)?;
        let expected = insn + SYSCALL_INSN.len() as u64;
        let mut entry = ptrace::getregs(self.tid).map_err(req("PTRACE_GETREGS"))?;
        let unexpected = entry.rip != expected || entry.orig_rax != nr as u64;
        if unexpected {
            // Not the call asked for: have the kernel skip it (-ENOSYS) rather than run it.
            entry.orig_rax = u64::MAX;
            ptrace::setregs(self.tid, entry).map_err(req("PTRACE_SETREGS"))?;
        }
        // To its exit stop.
        ptrace::syscall(self.tid, None).map_err(req("PTRACE_SYSCALL"))?;
        self.wait_stop(Phase::Inject, None, syscall_stop)?;
        self.at_syscall_exit = true;
        if unexpected {
            return Err(PtraceError::UnexpectedStop {
                rip: entry.rip,
                expected,
            });
        }
        let after = ptrace::getregs(self.tid).map_err(req("PTRACE_GETREGS"))?;
        Ok(after.rax as i64)
    }

    /// Writes the saved registers and signal mask back and detaches; the thread resumes where
    /// it was (a stopped process stays stopped: the kernel puts it into the group stop).
    pub fn detach(mut self) -> Result<(), PtraceError> {
        self.restore_and_detach()
    }

    fn restore_and_detach(&mut self) -> Result<(), PtraceError> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        let (mut regs, mut mask, mut back) = (Ok(()), Ok(()), Ok(()));
        if self.changed {
            regs = ptrace::setregs(self.tid, self.saved).map_err(req("PTRACE_SETREGS"));
            mask = self.set_sigmask(self.saved_mask);
        }
        if self.at_syscall_exit {
            // Into the signal path, where the detach lets the kernel's restart logic run
            // (module docs, "The way back"); the stop comes before any signal is taken.
            back = self.back_to_signal_stop();
        }
        // Fails (ESRCH) for a thread that never stopped: it stays seized until this thread
        // exits, registers untouched.
        let detach = ptrace::detach(self.tid, None).map_err(req("PTRACE_DETACH"));
        regs.and(mask).and(back).and(detach)
    }

    /// From an injected call's exit stop to a `PTRACE_INTERRUPT` stop in the signal path.
    fn back_to_signal_stop(&mut self) -> Result<(), PtraceError> {
        self.at_syscall_exit = false;
        ptrace::interrupt(self.tid).map_err(req("PTRACE_INTERRUPT"))?;
        ptrace::cont(self.tid, None).map_err(req("PTRACE_CONT"))?;
        let stop_by = Instant::now() + STOP_TIMEOUT;
        // Not cancellable: the thread's registers are back, it must reach this stop.
        self.wait_stop(Phase::Attach(stop_by), None, |s| {
            matches!(s, WaitStatus::PtraceEvent(..))
        })
        .map(|_| ())
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        // Best effort: the first error is the one the caller already has.
        let _ = self.restore_and_detach();
    }
}

/// A system call that makes a file descriptor (`userfaultfd`, say), to run in a thread of
/// another process and take the descriptor from ([`take_fd`]).
#[derive(Debug, Clone, Copy)]
pub struct FdCall<'a> {
    /// The thread that runs the call (stopped for it; the other threads run on).
    pub tid: i32,
    /// A pidfd of the process (or of the thread, `PIDFD_THREAD`) the new fd is copied through.
    pub pidfd: BorrowedFd<'a>,
    /// Address of a `syscall` instruction (`0f 05`) in the target's executable memory.
    pub insn: u64,
    /// The system call's number.
    pub nr: i64,
    /// Its arguments.
    pub args: [u64; 6],
    /// Set (by another thread of this process, a signal handler's say) to give up waiting for
    /// the thread's first stop: the result is then [`PtraceError::Cancelled`], the thread
    /// untouched (see [`Tracee::seize_cancellable`]). The helper process shares this memory,
    /// so it sees the flag too.
    pub cancel: Option<&'a AtomicBool>,
}

/// Who traced the thread in [`take_fd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracer {
    /// A helper process that outlives the caller (see [`take_fd`]).
    Helper,
    /// A short-lived thread of the calling process: a helper could not be started, or could
    /// not trace the target.
    Caller {
        /// What kept the helper from doing it.
        helper_failed: Errno,
    },
}

/// What [`take_fd`] did, step by step; a step after a failed one did not run (`None`).
#[derive(Debug)]
pub struct FdTaken {
    /// Seizing and stopping the thread (registers and signal mask saved).
    pub seized: Result<(), PtraceError>,
    /// The injected call's raw result (`-errno` on failure, as the kernel returns it).
    pub created: Option<Result<i64, PtraceError>>,
    /// The new fd, copied into this process with `pidfd_getfd` (when the call made one).
    pub fd: Option<io::Result<OwnedFd>>,
    /// The raw result of the `close` injected afterwards (the copy or not, the fd is closed
    /// in the target).
    pub closed: Option<Result<i64, PtraceError>>,
    /// Restoring the registers and signal mask, and detaching.
    pub detached: Result<(), PtraceError>,
    /// From the seize until the thread was stopped.
    pub stop: Duration,
    /// The injected calls and the copy.
    pub inject: Duration,
    /// The restore and detach.
    pub detach: Duration,
    /// Who traced.
    pub tracer: Tracer,
}

impl FdTaken {
    /// Nothing done yet.
    fn nothing(tracer: Tracer) -> FdTaken {
        FdTaken {
            seized: Ok(()),
            created: None,
            fd: None,
            closed: None,
            detached: Ok(()),
            stop: Duration::ZERO,
            inject: Duration::ZERO,
            detach: Duration::ZERO,
            tracer,
        }
    }
}

/// Runs `call` in thread `call.tid`, copies the descriptor it returns into this process,
/// closes it in the target and puts the thread back exactly as it was ([`Tracee`]).
///
/// The tracer is a helper process, not the caller: a child made with
/// `clone(CLONE_VM | CLONE_FILES | CLONE_VFORK)` (it shares this process's memory and file
/// table, so the copied fd lands here; this thread waits until it exits), in a session of
/// its own, with every signal blocked. If the caller is killed meanwhile (`SIGKILL`, a
/// signal to its process group), the helper still finishes the job and puts the thread back.
/// When the tracer itself dies the kernel detaches the thread as it is, with the injected
/// registers, and it runs on from the wrong place: measured (when calls were single-stepped)
/// with `precopy send --pid` killed 2–30 ms after its start, 2 of 20
/// targets died that way with the caller as tracer (2026-11-30).
///
/// What the helper does not cover is its own death during the few milliseconds it traces:
/// `SIGKILL` sent to it by PID, by command line (`pkill -9 -f precopy` matches it: it shares
/// the caller's), to its cgroup, or by name in the microseconds before it renames itself
/// (`uffd-attach`, so that `pkill -9 precopy` meant for the caller spares it), or an OOM
/// kill of the caller (the OOM killer kills every process that shares the victim's memory)
/// leaves the thread as a killed caller did before; the
/// result is then [`PtraceError::HelperDied`], never retried, and a descriptor the helper had
/// copied stays open in this process. A thread that does not stop within [`STOP_TIMEOUT`]
/// (uninterruptible sleep) is [`PtraceError::NotStopped`], untouched; the helper's exit
/// detaches it. Needs glibc 2.25 or later (older `clone` wrappers rewrote the caller thread's
/// cached IDs for such a child): with an older one the caller traces.
///
/// Falls back to tracing from this process (from a short-lived thread of it, whose exit
/// detaches a thread that never stopped; none is traced if no thread can be started;
/// [`FdTaken::tracer`] says so) when no helper can be
/// started (`clone` refused, by a seccomp filter say) or the helper may not trace the target:
/// Yama's `ptrace_scope` 1 lets a process trace only its own descendants, and the helper is
/// the caller's child, not the target's ancestor. A thread another tracer holds is not
/// retried.
///
/// [`FdCall::cancel`] ends the wait for the thread's first stop early (a Ctrl-C should not
/// wait out [`STOP_TIMEOUT`]): the calling thread is suspended in `clone` until the helper
/// exits and cannot be interrupted there, so the helper looks at the flag itself, between its
/// looks at the thread.
///
/// Nothing the helper runs allocates or takes a lock (it shares the heap with threads a
/// `SIGKILL` may have stopped anywhere).
pub fn take_fd(call: &FdCall<'_>) -> FdTaken {
    let helper_failed = match in_helper(call) {
        Helped::Answered(taken) => match &taken.seized {
            // A thread someone else traces refuses every tracer: nothing to retry.
            Err(PtraceError::Request {
                what: "PTRACE_SEIZE",
                errno: Errno::EPERM,
            }) if !traced(call.tid) => Errno::EPERM,
            _ => return taken,
        },
        Helped::NotStarted(errno) => errno,
        // Never retried: the thread may be half-way through an injection.
        Helped::Died => {
            let mut taken = FdTaken::nothing(Tracer::Helper);
            taken.seized = Err(PtraceError::HelperDied);
            return taken;
        }
    };
    let tracer = Tracer::Caller { helper_failed };
    // From a thread of its own, so that its exit detaches a thread that never stopped (traced
    // from this one, such a thread would stop, traced, when its sleep ends, until this thread
    // exits): when none can be started, nothing is traced.
    let ran = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("precopy-attach".into())
            .spawn_scoped(s, || run_fd_call(call, tracer))
            .map(|handle| handle.join())
    });
    match ran {
        Ok(Ok(taken)) => taken,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(e) => {
            let mut taken = FdTaken::nothing(tracer);
            taken.seized = Err(PtraceError::Request {
                what: "starting a thread to trace from",
                errno: e.raw_os_error().map_or(Errno::EAGAIN, Errno::from_raw),
            });
            taken
        }
    }
}

/// Whether thread `tid` has a tracer (`TracerPid:` not 0); `false` when that cannot be read.
fn traced(tid: i32) -> bool {
    status_field(tid, "TracerPid:").is_some_and(|tracer| tracer != 0)
}

/// The steps of [`take_fd`], traced from the calling thread (the helper's or the caller's).
/// Allocates nothing.
fn run_fd_call(call: &FdCall<'_>, tracer: Tracer) -> FdTaken {
    let mut out = FdTaken::nothing(tracer);
    let seize_at = Instant::now();
    let mut tracee = match Tracee::seize_until(call.tid, call.cancel) {
        Ok(t) => t,
        Err(e) => {
            out.seized = Err(e);
            out.stop = seize_at.elapsed();
            return out;
        }
    };
    out.stop = seize_at.elapsed();
    let inject_at = Instant::now();
    let created = tracee.syscall(call.insn, call.nr, call.args);
    if let Ok(fd) = created
        && fd >= 0
    {
        out.fd = Some(crate::process::pidfd_getfd(call.pidfd, fd as RawFd));
        let close = [fd as u64, 0, 0, 0, 0, 0];
        out.closed = Some(tracee.syscall(call.insn, libc::SYS_close, close));
    }
    out.created = Some(created);
    out.inject = inject_at.elapsed();
    let detach_at = Instant::now();
    out.detached = tracee.detach();
    out.detach = detach_at.elapsed();
    out
}

/// The helper's name (`comm`, as `ps -e`, `pkill` and `killall` see it): not the caller's, so
/// that `pkill -9 precopy` meant for the caller does not kill the helper mid-injection (which
/// would leave the target's thread with injected registers). `pkill -f`, which matches the
/// command line the helper shares with the caller, still does.
const HELPER_NAME: &std::ffi::CStr = c"uffd-attach";
/// The helper's stack (it runs [`run_fd_call`]: a few frames and a register set).
const HELPER_STACK: usize = 256 << 10;
/// An inaccessible page below the helper's stack: an overflow faults instead of writing into
/// a neighbouring mapping the caller's threads use.
const STACK_GUARD: usize = 4096;

/// What the caller and the helper of [`take_fd`] share: the call, and the helper's answer.
struct HelperJob<'a> {
    call: FdCall<'a>,
    /// Written by the helper before it sets `done`; read only once `done` is set (a helper
    /// killed half-way through writing it leaves `done` clear).
    out: MaybeUninit<FdTaken>,
    done: AtomicBool,
}

/// How [`in_helper`] ended.
enum Helped {
    /// The helper ran the call and answered.
    Answered(FdTaken),
    /// No helper could be started (the errno of `mmap`, `mprotect` or `clone`), or this C
    /// library's `clone` is too old to use this way.
    NotStarted(Errno),
    /// The helper died before it answered (killed): the thread's state is unknown.
    Died,
}

/// Runs [`run_fd_call`] in a helper process (see [`take_fd`]).
fn in_helper(call: &FdCall<'_>) -> Helped {
    if !clone_wrapper_leaves_caller_ids() {
        return Helped::NotStarted(Errno::ENOSYS);
    }
    let len = STACK_GUARD + HELPER_STACK;
    // SAFETY: a fresh private anonymous mapping with no address hint; the result is checked.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Helped::NotStarted(Errno::last());
    }
    // SAFETY: the first page of the mapping made above, nothing in it yet.
    if unsafe { libc::mprotect(map, STACK_GUARD, libc::PROT_NONE) } != 0 {
        let e = Errno::last();
        // SAFETY: the mapping made above, unused.
        unsafe { libc::munmap(map, len) };
        return Helped::NotStarted(e);
    }
    let mut job = HelperJob {
        call: *call,
        out: MaybeUninit::uninit(),
        done: AtomicBool::new(false),
    };
    // The helper inherits this thread's signal mask: every signal glibc lets a program block
    // is blocked from its first instruction on (it blocks glibc's own two itself, first
    // thing); it must not run this process's handlers.
    let mut old = SigSet::empty();
    if let Err(e) = pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    ) {
        // SAFETY: the mapping made above, unused.
        unsafe { libc::munmap(map, len) };
        return Helped::NotStarted(e);
    }
    // SAFETY: the mapping's end (its top: the stack grows down), inside the same allocation's
    // bounds.
    let top = unsafe { map.cast::<u8>().add(len) };
    // SAFETY: `helper_main` runs on the fresh stack with `arg` pointing at `job`.
    // CLONE_VFORK suspends this thread until the helper exits, so `job`, this frame and the
    // stack stay untouched by this thread meanwhile; CLONE_VM keeps them mapped even if this
    // process dies first. Exit signal 0: nobody else is sent SIGCHLD; it is reaped below
    // with __WALL.
    let child = unsafe {
        libc::clone(
            helper_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_VFORK,
            (&mut job as *mut HelperJob<'_>).cast(),
        )
    };
    let clone_errno = Errno::last();
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    if child > 0 {
        // Reap it (exit signal 0 needs __WALL). Nothing to do if this fails (someone else
        // reaped it): `done` says whether it answered.
        while let Err(Errno::EINTR) = waitpid(Pid::from_raw(child), Some(WaitPidFlag::__WALL)) {}
    }
    // SAFETY: the mapping made above; the helper has released its memory (CLONE_VFORK
    // returned, or clone failed and it never ran).
    unsafe { libc::munmap(map, len) };
    if child < 0 {
        return Helped::NotStarted(clone_errno);
    }
    if job.done.load(Ordering::Acquire) {
        // SAFETY: `done` is set (Release) only after `out` was written whole.
        Helped::Answered(unsafe { job.out.assume_init_read() })
    } else {
        Helped::Died
    }
}

/// Whether this C library's `clone` wrapper leaves the calling thread's cached process and
/// thread IDs alone for a `CLONE_VM` child that is not a thread: glibc before 2.25 wrote the
/// child's into the thread-local cache the child shares with the caller here. Other C
/// libraries (musl) keep no such cache.
fn clone_wrapper_leaves_caller_ids() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: gnu_get_libc_version takes nothing and returns a static string.
        let version = unsafe { libc::gnu_get_libc_version() };
        // SAFETY: that pointer is to a static NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(version) };
        let mut parts = v.to_str().unwrap_or("0.0").split('.');
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor) >= (2, 25)
    }
    #[cfg(not(target_env = "gnu"))]
    {
        true
    }
}

/// The helper of [`take_fd`]: blocks every signal, leaves the caller's session (a signal to
/// the caller's process group does not reach it), runs the call, publishes the answer in the
/// shared job, exits.
extern "C" fn helper_main(arg: *mut libc::c_void) -> libc::c_int {
    let all: u64 = !0;
    // SAFETY: rt_sigprocmask with a valid 8-byte set and no old set; the kernel ignores the
    // unblockable SIGKILL and SIGSTOP. The raw call also blocks glibc's internal signals.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_SIZE,
        )
    };
    // SAFETY: `arg` is the `HelperJob` of `in_helper`, whose thread is suspended until this
    // process exits (CLONE_VFORK) and reads it only then, and only `out` once `done` is set;
    // if that process dies first, the memory (shared, CLONE_VM) lives on with this process.
    let job = unsafe { &mut *arg.cast::<HelperJob<'_>>() };
    // SAFETY: setsid takes no arguments; a new process is never a group leader, so it works.
    unsafe { libc::setsid() };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from the static
    // below; it names this task only (the caller's name is its own).
    unsafe { libc::prctl(libc::PR_SET_NAME, HELPER_NAME.as_ptr()) };
    job.out.write(run_fd_call(&job.call, Tracer::Helper));
    job.done.store(true, Ordering::Release);
    0
}

/// The number after `field` in `/proc/TID/status`, if it can be read.
fn status_field(tid: i32, field: &str) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .parse()
        .ok()
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
