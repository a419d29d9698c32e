//! Attaching to a running process the engine did not start: a userfaultfd created *inside* it
//! with ptrace, copied out with `pidfd_getfd`, closed in it again.
//!
//! A uffd acts on the address space of the process that created it, so a checkpointer needs one
//! made by its target. [`Uffd::attach`] stops one thread of the target (`PTRACE_SEIZE` +
//! `PTRACE_INTERRUPT`: no signal is sent), has it execute `userfaultfd(O_CLOEXEC | O_NONBLOCK |
//! UFFD_USER_MODE_ONLY)` at a `syscall` instruction found in its vDSO (or, failing that, in its
//! executable text), copies the new fd out with `pidfd_getfd`, has it `close` the fd, and
//! detaches. The target's other threads never stop. Its registers, signal mask and pending
//! signals come back exactly as they were, a blocking system call it was in is restarted, and
//! no fd is left behind; this holds on every error path too (see `precopy_sys::ptrace`), and a
//! `SIGINT`/`SIGTERM` to the engine during the few milliseconds of the injection is held back
//! until the target is restored.
//!
//! # Errors a user meets
//! No such process; no permission (not root and not the same user, Yama's `ptrace_scope`, or
//! another tracer such as a debugger already attached); a seccomp filter in the target that
//! refuses `userfaultfd` (container runtimes do this by default); a kernel without async
//! write-protect. Each is one [`AttachError`] variant whose message says what to do. A target in
//! seccomp *strict* mode is refused before anything is injected (the call would kill it); a
//! seccomp filter whose action for `userfaultfd` is "kill" cannot be detected from outside
//! without `CAP_SYS_ADMIN` and would kill the target.

use crate::{Error as TrackerError, Uffd};
use precopy_sys::ptrace::{PtraceError, SYSCALL_INSN, Tracee};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// Why attaching to a process failed. The target is left as it was in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// No such process.
    #[error("no process with PID {pid}")]
    NoSuchProcess {
        /// The PID.
        pid: i32,
    },
    /// The PID is this process, or one of its threads: a process cannot ptrace itself, and
    /// tracking its own memory needs no attach (`Uffd::new`).
    #[error("process {pid} is this process: track its memory with Uffd::new instead of attaching")]
    OwnProcess {
        /// The PID.
        pid: i32,
    },
    /// The ID names a thread that is not its process's main thread.
    #[error(
        "{tid} is a thread of process {tgid}, not a process ID: give --pid {tgid} (its thread-group ID)"
    )]
    NotProcessId {
        /// The thread ID given.
        tid: i32,
        /// Its process's ID (thread-group ID).
        tgid: i32,
    },
    /// A kernel thread: it has no user memory to track.
    #[error("process {pid} ({name}) is a kernel thread: it has no user memory to track")]
    KernelThread {
        /// The PID.
        pid: i32,
        /// Its name (`comm`).
        name: String,
    },
    /// The process has exited and waits for its parent to reap it (state `Z`).
    #[error(
        "process {pid} ({name}) has exited (a zombie waiting for its parent to reap it): it has no memory left"
    )]
    Zombie {
        /// The PID.
        pid: i32,
        /// Its name (`comm`).
        name: String,
    },
    /// Another tracer (a debugger, strace, another precopy) is attached.
    #[error("process {pid} is already traced by process {tracer}: detach that tracer first")]
    AlreadyTraced {
        /// The PID.
        pid: i32,
        /// The tracer's PID (`TracerPid:` in `/proc/PID/status`).
        tracer: i32,
    },
    /// ptrace access was refused.
    #[error(
        "not allowed to ptrace process {pid} ({hint}): run as root or as its user with ptrace allowed"
    )]
    PermissionDenied {
        /// The PID.
        pid: i32,
        /// What likely refused it.
        hint: String,
    },
    /// The target runs in seccomp strict mode: any `userfaultfd` call would kill it.
    #[error("process {pid} runs in seccomp strict mode; injecting a system call would kill it")]
    SeccompStrict {
        /// The PID.
        pid: i32,
    },
    /// `userfaultfd` failed inside the target.
    #[error("userfaultfd() failed inside process {pid}: {reason}")]
    Refused {
        /// The PID.
        pid: i32,
        /// What the errno most likely means there.
        reason: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// No `syscall` instruction was found in the target's vDSO or executable mappings.
    #[error("no syscall instruction found in the executable memory of process {pid}")]
    NoSyscallInstruction {
        /// The PID.
        pid: i32,
    },
    /// The target exited while being attached.
    #[error("process {pid} exited while being attached")]
    Exited {
        /// The PID.
        pid: i32,
    },
    /// A ptrace step failed.
    #[error("ptrace on process {pid} failed while {step}")]
    Ptrace {
        /// The PID.
        pid: i32,
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: PtraceError,
    },
    /// Copying the fd out or closing it in the target failed.
    #[error("moving the userfaultfd out of process {pid} failed while {step}")]
    Handoff {
        /// The PID.
        pid: i32,
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading the target's `/proc` files failed.
    #[error("cannot read /proc/{pid}")]
    Proc {
        /// The PID.
        pid: i32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel cannot track (checked before touching the target), or the adopted fd was
    /// refused.
    #[error(transparent)]
    Tracker(#[from] TrackerError),
}

/// How long the steps of [`Uffd::attach`] took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachTimes {
    /// The thread the calls ran in.
    pub tid: i32,
    /// From `PTRACE_SEIZE` until the thread was stopped, its state saved.
    pub stop: Duration,
    /// Running `userfaultfd`, `pidfd_getfd` and `close` in it.
    pub inject: Duration,
    /// Restoring registers and signal mask and detaching.
    pub detach: Duration,
    /// The whole time the target thread was stopped.
    pub stopped: Duration,
    /// The whole call, checks included.
    pub total: Duration,
}

fn io_err(e: procfs::ProcError) -> std::io::Error {
    match e {
        procfs::ProcError::Io(e, _) => e,
        procfs::ProcError::NotFound(_) => std::io::Error::from_raw_os_error(libc::ENOENT),
        procfs::ProcError::PermissionDenied(_) => std::io::Error::from_raw_os_error(libc::EACCES),
        other => std::io::Error::other(other.to_string()),
    }
}

fn process(pid: i32) -> Result<procfs::process::Process, AttachError> {
    procfs::process::Process::new(pid).map_err(|e| proc_err(pid, e))
}

/// A failed read of `/proc/PID/...`: gone, not ours to read (with the hint), or other.
fn proc_err(pid: i32, e: procfs::ProcError) -> AttachError {
    match e {
        procfs::ProcError::NotFound(_) => AttachError::NoSuchProcess { pid },
        procfs::ProcError::PermissionDenied(_) => AttachError::PermissionDenied {
            pid,
            hint: yama_hint(),
        },
        procfs::ProcError::Io(e, _) if e.raw_os_error() == Some(libc::EACCES) => {
            AttachError::PermissionDenied {
                pid,
                hint: yama_hint(),
            }
        }
        e => AttachError::Proc {
            pid,
            source: io_err(e),
        },
    }
}

/// Linux's `PF_KTHREAD` task flag (`include/linux/sched.h`), in `/proc/PID/stat`'s flags.
const PF_KTHREAD: u32 = 0x0020_0000;

/// Refuses, with the reason, an ID that names no attachable process: this process itself, a
/// thread that is not its process's main thread, a kernel thread, a zombie. Returns the thread
/// to inject into ([`pick_thread`]).
fn check_target(pid: i32, p: &procfs::process::Process) -> Result<i32, AttachError> {
    if pid == std::process::id() as i32 {
        return Err(AttachError::OwnProcess { pid });
    }
    let status = p.status().map_err(|e| proc_err(pid, e))?;
    // A thread of this process is this process: say so before calling it a thread ID.
    if status.tgid == std::process::id() as i32 {
        return Err(AttachError::OwnProcess { pid });
    }
    if status.tgid != pid {
        return Err(AttachError::NotProcessId {
            tid: pid,
            tgid: status.tgid,
        });
    }
    let stat = p.stat().map_err(|e| proc_err(pid, e))?;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(AttachError::KernelThread {
            pid,
            name: stat.comm,
        });
    }
    let tid = pick_thread(p);
    if tid == pid && matches!(stat.state, 'Z' | 'X') {
        // No live thread left: the whole process has exited.
        return Err(AttachError::Zombie {
            pid,
            name: stat.comm,
        });
    }
    Ok(tid)
}

fn yama_hint() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        Ok(v) if v.trim() != "0" => format!(
            "kernel.yama.ptrace_scope is {}: set it to 0, or run as root",
            v.trim()
        ),
        _ => "not the same user, or no CAP_SYS_PTRACE".to_string(),
    }
}

/// Finds the address of a `syscall` instruction in process `pid`: in its vDSO first, then in
/// its executable file mappings.
pub fn find_syscall_instruction(pid: i32) -> Result<u64, AttachError> {
    find_syscall_in(pid, pid)
}

/// [`find_syscall_instruction`] through thread `tid` of process `pid`.
fn find_syscall_in(pid: i32, tid: i32) -> Result<u64, AttachError> {
    use procfs::process::{MMPermissions, MMapPath};
    let maps = process(tid)?.maps().map_err(|e| proc_err(pid, e))?;
    let mut candidates: Vec<(u64, u64)> = Vec::new();
    for m in maps.iter() {
        if m.pathname == MMapPath::Vdso {
            candidates.insert(0, m.address);
        } else if m.perms.contains(MMPermissions::EXECUTE)
            && matches!(m.pathname, MMapPath::Path(_))
        {
            candidates.push(m.address);
        }
    }
    const MAX_SEARCH: u64 = 16 << 20;
    for (start, end) in candidates {
        let len = (end - start).min(MAX_SEARCH) as usize;
        let Ok(text) = precopy_sys::process::read_proc_mem(tid, start, len) else {
            continue;
        };
        if let Some(at) = text.windows(2).position(|w| w == SYSCALL_INSN) {
            return Ok(start + at as u64);
        }
    }
    Err(AttachError::NoSyscallInstruction { pid })
}

/// The thread to inject into: the thread-group leader unless it is a zombie (it called
/// `pthread_exit` while other threads run), else the first live thread.
fn pick_thread(p: &procfs::process::Process) -> i32 {
    use procfs::process::ProcState;
    let alive = |t: &procfs::process::Task| {
        t.stat()
            .ok()
            .and_then(|s| s.state().ok())
            .is_some_and(|s| !matches!(s, ProcState::Zombie | ProcState::Dead))
    };
    if let Ok(tasks) = p.tasks() {
        let tasks: Vec<_> = tasks.flatten().collect();
        if let Some(t) = tasks.iter().find(|t| t.tid == p.pid && alive(t)) {
            return t.tid;
        }
        if let Some(t) = tasks.iter().find(|t| alive(t)) {
            return t.tid;
        }
    }
    p.pid
}

impl Uffd {
    /// Attaches to running process `pid`, creates a userfaultfd inside it and adopts it (see
    /// the module docs): the result tracks `pid`'s memory, and `pid` is left exactly as it was,
    /// not traced, with no new fd. Checks that this kernel can track before touching the target.
    pub fn attach(pid: i32) -> Result<(Uffd, AttachTimes), AttachError> {
        let started = Instant::now();
        if pid <= 0 {
            return Err(AttachError::NoSuchProcess { pid });
        }
        if pid == std::process::id() as i32 {
            return Err(AttachError::OwnProcess { pid });
        }
        crate::uffd::required_features()?;
        let p = process(pid)?;
        let tid = check_target(pid, &p)?;
        let status = p.status().map_err(|e| proc_err(pid, e))?;
        if status.tracerpid != 0 {
            return Err(AttachError::AlreadyTraced {
                pid,
                tracer: status.tracerpid,
            });
        }
        if status.seccomp == Some(1) {
            return Err(AttachError::SeccompStrict { pid });
        }
        let seccomp_filter = status.seccomp == Some(2);
        // A main thread that exited (`pthread_exit`) has no memory map of its own: search
        // the memory through the live thread that runs the call.
        let insn = find_syscall_in(pid, tid)?;
        // A process pidfd reaches no files once the main thread has exited: then take the
        // injecting thread's (Linux 6.9+).
        let pidfd = if tid == pid {
            precopy_sys::process::pidfd_open(pid)
        } else {
            precopy_sys::process::pidfd_open_thread(tid)
        }
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) => AttachError::NoSuchProcess { pid },
            _ => AttachError::Handoff {
                pid,
                step: "opening a pidfd",
                source,
            },
        })?;

        // A Ctrl-C from here on is delivered once the target is restored.
        let _block = precopy_sys::ptrace::block_termination_signals().map_err(|source| {
            AttachError::Handoff {
                pid,
                step: "blocking termination signals",
                source,
            }
        })?;
        let ptrace_err = |step| {
            move |source: PtraceError| match (&source, source.errno()) {
                (PtraceError::Exited { .. }, _) | (_, Some(libc::ESRCH)) => {
                    AttachError::Exited { pid }
                }
                (_, Some(libc::EPERM)) => match traced_by(pid) {
                    Some(tracer) => AttachError::AlreadyTraced { pid, tracer },
                    None => AttachError::PermissionDenied {
                        pid,
                        hint: yama_hint(),
                    },
                },
                _ => AttachError::Ptrace { pid, step, source },
            }
        };
        let seize_at = Instant::now();
        let mut tracee = Tracee::seize(tid).map_err(ptrace_err("stopping the target"))?;
        let stop = seize_at.elapsed();
        let inject_at = Instant::now();
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64
            | precopy_sys::abi::UFFD_USER_MODE_ONLY as u64;
        let created = tracee
            .syscall(insn, libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])
            .map_err(ptrace_err("injecting userfaultfd()"))?;
        if created < 0 {
            let errno = (-created) as i32;
            let reason = match errno {
                libc::EPERM | libc::ENOSYS | libc::EACCES if seccomp_filter => {
                    "a seccomp filter in the target forbids it (containers do this by default; \
                     allow userfaultfd in the target's seccomp profile)"
                        .to_string()
                }
                libc::EPERM => "denied by the kernel (vm.unprivileged_userfaultfd = 0 and the \
                                target lacks CAP_SYS_PTRACE)"
                    .to_string(),
                libc::ENOSYS => "the kernel has no userfaultfd".to_string(),
                libc::EMFILE | libc::ENFILE => "the target has no free file descriptor".to_string(),
                _ => "unexpected error".to_string(),
            };
            drop(tracee.detach());
            return Err(AttachError::Refused {
                pid,
                reason,
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        let got = precopy_sys::process::pidfd_getfd(pidfd.as_fd(), created as i32);
        // Close it in the target whatever happened to the copy.
        let closed = tracee
            .syscall(insn, libc::SYS_close, [created as u64, 0, 0, 0, 0, 0])
            .map_err(ptrace_err("injecting close()"));
        let inject = inject_at.elapsed();
        let detach_at = Instant::now();
        let detached = tracee.detach().map_err(ptrace_err("detaching"));
        let detach = detach_at.elapsed();
        let stopped = seize_at.elapsed();
        drop(_block);

        let fd: OwnedFd = got.map_err(|source| AttachError::Handoff {
            pid,
            step: "copying the fd with pidfd_getfd",
            source,
        })?;
        let closed = closed?;
        if closed < 0 {
            return Err(AttachError::Handoff {
                pid,
                step: "closing the fd in the target",
                source: std::io::Error::from_raw_os_error((-closed) as i32),
            });
        }
        detached?;
        // Through the injecting thread: the same memory, and its `/proc/TID/maps` is there
        // also when the main thread has exited.
        let uffd = Uffd::adopt(fd, tid)?;
        Ok((
            uffd,
            AttachTimes {
                tid,
                stop,
                inject,
                detach,
                stopped,
                total: started.elapsed(),
            },
        ))
    }
}

/// The tracer of `pid`, if one is attached.
fn traced_by(pid: i32) -> Option<i32> {
    let s = procfs::process::Process::new(pid).ok()?.status().ok()?;
    (s.tracerpid != 0).then_some(s.tracerpid)
}
