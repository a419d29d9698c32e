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
//! no fd is left behind; this holds on every error path too (see `precopy_sys::ptrace`). The
//! tracer is a helper process (`precopy_sys::ptrace::take_fd`) that finishes and puts the
//! thread back even if the engine is killed meanwhile, `SIGKILL` included; where no helper may
//! trace the target (Yama's `ptrace_scope` 1) the engine traces itself, holds back a
//! `SIGINT`/`SIGTERM` until the target is restored, and warns that a `SIGKILL` would not be.
//!
//! # Errors a user meets
//! No such process; no permission (not root and not the same user, Yama's `ptrace_scope`, or
//! another tracer such as a debugger already attached); a seccomp filter in the target that
//! refuses `userfaultfd` (container runtimes do this by default); a kernel without async
//! write-protect; a process whose memory another process shares (a `vfork` child before its
//! `exec`, its parent, `clone(CLONE_VM)`), which no pause of it alone could keep from being
//! written. Each is one [`AttachError`] variant whose message says what to do. A target in
//! seccomp *strict* mode is refused before anything is injected (the call would kill it); a
//! seccomp filter whose action for `userfaultfd` is "kill" cannot be detected from outside
//! without `CAP_SYS_ADMIN` and would kill the target.

use crate::{Error as TrackerError, Uffd};
use precopy_sys::ptrace::{FdCall, PtraceError, SYSCALL_INSN, Tracer, take_fd};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicBool;
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
    /// Another process shares the target's address space (a `vfork` child before its `exec`
    /// and its parent, or processes made with `clone(CLONE_VM)` without `CLONE_THREAD`):
    /// stopping the target's threads cannot stop that process's writes to its memory, so no
    /// final round could be vouched for. Found with `kcmp(KCMP_VM)` ([`memory_sharers`]).
    #[error(
        "process {pid} shares its memory with {}: one is a vfork child that has not called exec yet, or was made with clone(CLONE_VM); stopping process {pid} alone cannot stop the other's writes to that memory",
        sharer_words(sharers)
    )]
    SharedMemory {
        /// The PID.
        pid: i32,
        /// The other processes that have the same memory (at least one).
        sharers: Vec<MemorySharer>,
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
    #[error("not allowed to ptrace process {pid}: {hint}")]
    PermissionDenied {
        /// The PID.
        pid: i32,
        /// What likely refused it, and what to do.
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
    /// The attach was cancelled ([`Uffd::attach_cancellable`]) while it waited for the thread
    /// to stop; the target was left untouched.
    #[error(
        "attaching to process {pid} was cancelled while waiting for thread {tid} to stop; it was left untouched"
    )]
    Cancelled {
        /// The PID.
        pid: i32,
        /// The thread waited for.
        tid: i32,
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

/// A process that shares a target's address space ([`AttachError::SharedMemory`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySharer {
    /// Its process ID.
    pub pid: i32,
    /// Its name (`comm`), empty if it could not be read.
    pub name: String,
    /// How it is related to the target.
    pub relation: Relation,
}

/// How a [`MemorySharer`] is related to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The target's parent (the target is its `vfork` child, say).
    Parent,
    /// The target's child (the target waits in `vfork` for it, say).
    Child,
    /// Neither (a sibling made with `clone(CLONE_VM | CLONE_PARENT)`, say).
    Other,
}

impl std::fmt::Display for MemorySharer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {}", self.pid)?;
        let relation = match self.relation {
            Relation::Parent => ", its parent",
            Relation::Child => ", its child",
            Relation::Other => "",
        };
        match (self.name.is_empty(), relation.is_empty()) {
            (true, true) => Ok(()),
            (true, false) => write!(f, " ({})", &relation[2..]),
            (false, _) => write!(f, " ({}{relation})", self.name),
        }
    }
}

/// The sharers for [`AttachError::SharedMemory`]'s message: the first few, and how many more.
fn sharer_words(sharers: &[MemorySharer]) -> String {
    const NAMED: usize = 4;
    let mut words: Vec<String> = sharers.iter().take(NAMED).map(|s| s.to_string()).collect();
    if sharers.len() > NAMED {
        words.push(format!("{} more", sharers.len() - NAMED));
    }
    match words.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => words.concat(),
    }
}

/// The processes other than `pid` that share its address space (see
/// [`AttachError::SharedMemory`]), through its live thread `via` (a process whose main thread
/// has exited has no address space of its own to compare).
///
/// Every process `/proc` lists is compared with `kcmp(KCMP_VM)`, a system call each: a few
/// milliseconds for thousands of processes. That covers a `vfork` child and its parent, and
/// processes made with `clone(CLONE_VM)`, whatever their relation (siblings, a child whose
/// creator has exited). It does not cover processes this one may not compare (`EPERM`:
/// another user's, without `CAP_SYS_PTRACE`), ones outside this PID namespace, or one whose
/// main thread has exited (`pthread_exit`) while its other threads share the memory. A kernel
/// without `kcmp` (`CONFIG_KCMP`) makes it `None`: nothing could be checked.
pub fn memory_sharers(pid: i32, via: i32) -> Option<Vec<MemorySharer>> {
    let dir = std::fs::read_dir("/proc").ok()?;
    let stat = |p: i32| procfs::process::Process::new(p).and_then(|p| p.stat()).ok();
    let mut sharers = Vec::new();
    for other in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        if other == pid {
            continue;
        }
        match precopy_sys::process::shares_address_space(via, other) {
            Ok(true) => {}
            // Different memory; gone; or not ours to compare (see the docs).
            Ok(false) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return None,
            Err(_) => continue,
        }
        let (theirs, ours) = (stat(other), stat(pid));
        let relation = if ours.as_ref().is_some_and(|s| s.ppid == other) {
            Relation::Parent
        } else if theirs.as_ref().is_some_and(|s| s.ppid == pid) {
            Relation::Child
        } else {
            Relation::Other
        };
        sharers.push(MemorySharer {
            pid: other,
            name: theirs.map(|s| s.comm).unwrap_or_default(),
            relation,
        });
    }
    Some(sharers)
}

/// How long the steps of [`Uffd::attach`] took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachTimes {
    /// The thread the calls ran in: the main thread unless it was in an uninterruptible sleep
    /// or had exited.
    pub tid: i32,
    /// The ID the process's memory is reached through afterwards (the adopted fd's
    /// `/proc/ID/maps`, `process_vm_readv`): its PID, or the thread that ran the calls when
    /// the main thread has exited (`pthread_exit`; a PID then reaches no memory). A thread
    /// picked only because the main thread was asleep is not used for this: it may exit
    /// while the process lives on.
    pub target: i32,
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
    /// Whether a helper process traced the thread (`precopy_sys::ptrace::take_fd`), so that a
    /// `SIGKILL` of this process during the attach could not have left the thread broken;
    /// `false` when this process had to (a warning says why).
    pub traced_by_helper: bool,
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
            hint: permission_hint(pid),
        },
        procfs::ProcError::Io(e, _) if e.raw_os_error() == Some(libc::EACCES) => {
            AttachError::PermissionDenied {
                pid,
                hint: permission_hint(pid),
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
/// thread that is not its process's main thread, a kernel thread, a zombie, a process whose
/// memory another process shares ([`memory_sharers`]). Returns the thread
/// to inject into and the ID to reach the process through ([`pick_thread`]).
fn check_target(pid: i32, p: &procfs::process::Process) -> Result<Picked, AttachError> {
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
    let picked = pick_thread(p);
    if picked.call == pid && matches!(stat.state, 'Z' | 'X') {
        // No live thread left: the whole process has exited.
        return Err(AttachError::Zombie {
            pid,
            name: stat.comm,
        });
    }
    match memory_sharers(pid, picked.via) {
        Some(sharers) if !sharers.is_empty() => {
            return Err(AttachError::SharedMemory { pid, sharers });
        }
        Some(_) => {}
        None => tracing::warn!(
            pid,
            "this kernel has no kcmp (CONFIG_KCMP): not checked whether another process shares \
             the target's memory, which its pause could not stop"
        ),
    }
    Ok(picked)
}

/// Refuses, before anything is touched, an ID that names no process [`Uffd::attach`] could
/// attach to: no process ([`AttachError::NoSuchProcess`]), this process, a thread that is not
/// its process's main thread, a kernel thread, a zombie, or a process whose memory another
/// process shares ([`AttachError::SharedMemory`]), as `attach` itself would. A caller
/// checks its input with it up front; `attach` checks again (the process may exit meanwhile).
pub fn check_attachable(pid: i32) -> Result<(), AttachError> {
    if pid <= 0 {
        return Err(AttachError::NoSuchProcess { pid });
    }
    check_target(pid, &process(pid)?).map(|_| ())
}

/// Linux's `CAP_SYS_PTRACE` (`include/uapi/linux/capability.h`).
const CAP_SYS_PTRACE: u32 = 19;

/// Why ptrace access to `pid` was most likely refused, and what to do: Yama's `ptrace_scope`,
/// a different user without `CAP_SYS_PTRACE`, root without it, or, when this process already
/// holds it, something neither the user nor root can change from here (a security module,
/// the sandbox it runs in).
fn permission_hint(pid: i32) -> String {
    let me = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .ok();
    let target_uid = procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .ok()
        .map(|s| s.euid);
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    permission_words(
        yama,
        me.as_ref()
            .is_some_and(|s| s.capeff & (1 << CAP_SYS_PTRACE) != 0),
        me.as_ref().map(|s| s.euid),
        target_uid,
    )
}

/// [`permission_hint`]'s words for Yama's `ptrace_scope`, whether this process has
/// `CAP_SYS_PTRACE`, its effective user and the target's.
fn permission_words(
    yama: Option<u32>,
    has_cap: bool,
    euid: Option<u32>,
    target_uid: Option<u32>,
) -> String {
    match yama {
        Some(3) => {
            return "kernel.yama.ptrace_scope is 3: no process may attach with ptrace until the next boot".into();
        }
        Some(2) if !has_cap => {
            return "kernel.yama.ptrace_scope is 2: only a process with CAP_SYS_PTRACE may attach: run as root".into();
        }
        Some(1) if !has_cap => {
            return "kernel.yama.ptrace_scope is 1: only a parent may attach: set it to 0 (sysctl kernel.yama.ptrace_scope=0), or run as root".into();
        }
        _ => {}
    }
    if has_cap {
        return "precopy already has CAP_SYS_PTRACE, so running as root or as its user would not help: a security module (Landlock, AppArmor, SELinux, a BPF LSM) or the sandbox precopy runs in refused access to this process, as some systems do for their init or for processes outside a container".into();
    }
    match (euid, target_uid) {
        (Some(0), _) => "precopy runs as root but without CAP_SYS_PTRACE (dropped by its container or capability bounding set), and the target holds capabilities precopy lacks: grant CAP_SYS_PTRACE (e.g. docker run --cap-add SYS_PTRACE)".into(),
        (Some(me), Some(them)) if me == them => format!(
            "it runs as this user ({me}) but is not dumpable (it changed credentials, e.g. setuid, or called prctl(PR_SET_DUMPABLE, 0)): run as root"
        ),
        (Some(me), Some(them)) => format!(
            "it runs as user {them} and precopy as user {me}, without CAP_SYS_PTRACE: run as root or as its user"
        ),
        _ => "not the same user, and no CAP_SYS_PTRACE: run as root or as its user".into(),
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
    // Opening /proc/PID/mem takes ptrace access: refused there, nothing else would work.
    let mut refused = false;
    for (start, end) in candidates {
        let len = (end - start).min(MAX_SEARCH) as usize;
        let text = match precopy_sys::process::read_proc_mem(tid, start, len) {
            Ok(text) => text,
            Err(e) => {
                refused |= matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM));
                continue;
            }
        };
        if let Some(at) = text.windows(2).position(|w| w == SYSCALL_INSN) {
            return Ok(start + at as u64);
        }
    }
    if refused {
        return Err(AttachError::PermissionDenied {
            pid,
            hint: permission_hint(pid),
        });
    }
    Err(AttachError::NoSyscallInstruction { pid })
}

/// The thread [`Uffd::attach`] injects into, and the ID it reaches the process through.
#[derive(Debug, Clone, Copy)]
struct Picked {
    /// The thread that runs the calls.
    call: i32,
    /// The process's ID, or `call` when the main thread has exited ([`AttachTimes::target`]).
    via: i32,
}

/// The thread to inject into: the thread-group leader unless it is a zombie (it called
/// `pthread_exit` while other threads run) or in an uninterruptible sleep (state `D`: a
/// `vfork` parent, a read from a hung file system; it would stop only when that sleep ends,
/// `precopy_sys::ptrace::STOP_TIMEOUT`), else the first live thread not in one, else the first
/// live thread. The process is reached through its PID unless the leader is a zombie.
fn pick_thread(p: &procfs::process::Process) -> Picked {
    use procfs::process::ProcState;
    let state = |t: &procfs::process::Task| t.stat().ok().and_then(|s| s.state().ok());
    let alive = |t: &procfs::process::Task| {
        state(t).is_some_and(|s| !matches!(s, ProcState::Zombie | ProcState::Dead))
    };
    let awake =
        |t: &procfs::process::Task| alive(t) && !matches!(state(t), Some(ProcState::Waiting));
    let fallback = Picked {
        call: p.pid,
        via: p.pid,
    };
    let Ok(tasks) = p.tasks() else {
        return fallback;
    };
    let tasks: Vec<_> = tasks.flatten().collect();
    let leader_alive = tasks.iter().any(|t| t.tid == p.pid && alive(t));
    let leader_first = |ok: &dyn Fn(&procfs::process::Task) -> bool| {
        tasks
            .iter()
            .find(|t| t.tid == p.pid && ok(t))
            .or_else(|| tasks.iter().find(|t| ok(t)))
            .map(|t| t.tid)
    };
    match leader_first(&awake).or_else(|| leader_first(&alive)) {
        Some(call) => Picked {
            call,
            via: if leader_alive { p.pid } else { call },
        },
        None => fallback,
    }
}

impl Uffd {
    /// Attaches to running process `pid`, creates a userfaultfd inside it and adopts it (see
    /// the module docs): the result tracks `pid`'s memory, and `pid` is left exactly as it was,
    /// not traced, with no new fd. Checks that this kernel can track before touching the target.
    pub fn attach(pid: i32) -> Result<(Uffd, AttachTimes), AttachError> {
        Uffd::attach_until(pid, None)
    }

    /// [`Uffd::attach`] that gives up, with [`AttachError::Cancelled`] and the target
    /// untouched, once `cancel` is set while it waits for the target's thread to stop (a
    /// thread in an uninterruptible sleep is waited for up to
    /// `precopy_sys::ptrace::STOP_TIMEOUT`); within a fraction of a millisecond of the flag.
    /// Set once the thread has stopped, the flag changes nothing: the injected calls and the
    /// restore take milliseconds and run to their end.
    pub fn attach_cancellable(
        pid: i32,
        cancel: &AtomicBool,
    ) -> Result<(Uffd, AttachTimes), AttachError> {
        Uffd::attach_until(pid, Some(cancel))
    }

    fn attach_until(
        pid: i32,
        cancel: Option<&AtomicBool>,
    ) -> Result<(Uffd, AttachTimes), AttachError> {
        let started = Instant::now();
        if pid <= 0 {
            return Err(AttachError::NoSuchProcess { pid });
        }
        if pid == std::process::id() as i32 {
            return Err(AttachError::OwnProcess { pid });
        }
        crate::uffd::required_features()?;
        let p = process(pid)?;
        let Picked { call: tid, via } = check_target(pid, &p)?;
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
        // A main thread that exited (`pthread_exit`) has no memory map of its own: then
        // search the memory through the live thread that runs the call.
        let insn = find_syscall_in(pid, via)?;
        // A process pidfd reaches no files once the main thread has exited: then take the
        // injecting thread's (Linux 6.9+).
        let pidfd = if via == pid {
            precopy_sys::process::pidfd_open(pid)
        } else {
            precopy_sys::process::pidfd_open_thread(via)
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
                (PtraceError::Cancelled { tid, .. }, _) => {
                    AttachError::Cancelled { pid, tid: *tid }
                }
                (_, Some(libc::EPERM)) => match traced_by(pid) {
                    Some(tracer) => AttachError::AlreadyTraced { pid, tracer },
                    None => AttachError::PermissionDenied {
                        pid,
                        hint: permission_hint(pid),
                    },
                },
                _ => AttachError::Ptrace { pid, step, source },
            }
        };
        // The calls run from a helper process that outlives this one: a `send` killed with
        // `SIGKILL` here leaves the thread put back, not with injected registers.
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64
            | precopy_sys::abi::UFFD_USER_MODE_ONLY as u64;
        let taken = take_fd(&FdCall {
            tid,
            pidfd: pidfd.as_fd(),
            insn,
            nr: libc::SYS_userfaultfd,
            args: [flags, 0, 0, 0, 0, 0],
            cancel,
        });
        drop(_block);
        if let Tracer::Caller { helper_failed } = taken.tracer
            && taken.seized.is_ok()
        {
            tracing::warn!(
                pid,
                "attach traced from this process, not from a helper ({helper_failed}): a \
                 SIGKILL during it would have left the target thread with injected registers"
            );
        }
        let traced_by_helper = taken.tracer == Tracer::Helper;
        let (stop, inject, detach) = (taken.stop, taken.inject, taken.detach);
        let stopped = stop + inject + detach;
        let seize_step = match &taken.seized {
            Err(PtraceError::HelperDied) => "tracing from the attach's helper process",
            _ => "stopping the target",
        };
        taken.seized.map_err(ptrace_err(seize_step))?;
        let created = taken
            .created
            .unwrap_or(Ok(-i64::from(libc::ENOSYS)))
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
            return Err(AttachError::Refused {
                pid,
                reason,
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        let got = taken
            .fd
            .unwrap_or_else(|| Err(std::io::Error::from_raw_os_error(libc::EBADF)));
        let closed = taken
            .closed
            .unwrap_or(Ok(0))
            .map_err(ptrace_err("injecting close()"));
        let detached = taken.detached.map_err(ptrace_err("detaching"));

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
        // Through the process's ID, or the injecting thread's when the main thread has
        // exited (its `/proc/TID/maps` is there then; the PID's is empty).
        let uffd = Uffd::adopt(fd, via)?;
        Ok((
            uffd,
            AttachTimes {
                tid,
                target: via,
                stop,
                inject,
                detach,
                stopped,
                total: started.elapsed(),
                traced_by_helper,
            },
        ))
    }
}

/// The tracer of `pid`, if one is attached.
fn traced_by(pid: i32) -> Option<i32> {
    let s = procfs::process::Process::new(pid).ok()?.status().ok()?;
    (s.tracerpid != 0).then_some(s.tracerpid)
}

#[cfg(test)]
mod tests {
    use super::{AttachError, MemorySharer, Relation, permission_words};

    /// The refusal of a process whose memory others share names each (up to four, then how
    /// many more), its name and relation, and why.
    #[test]
    fn a_shared_memory_refusal_names_the_other_processes() {
        let sharer = |pid, name: &str, relation| MemorySharer {
            pid,
            name: name.into(),
            relation,
        };
        let e = AttachError::SharedMemory {
            pid: 10,
            sharers: vec![sharer(9, "sh", Relation::Parent)],
        };
        assert_eq!(
            e.to_string(),
            "process 10 shares its memory with process 9 (sh, its parent): one is a vfork child \
             that has not called exec yet, or was made with clone(CLONE_VM); stopping process \
             10 alone cannot stop the other's writes to that memory"
        );
        let many: Vec<_> = [
            sharer(11, "a", Relation::Child),
            sharer(12, "", Relation::Child),
            sharer(13, "", Relation::Other),
            sharer(14, "b", Relation::Other),
            sharer(15, "c", Relation::Other),
            sharer(16, "d", Relation::Other),
        ]
        .into();
        let e = AttachError::SharedMemory {
            pid: 10,
            sharers: many,
        };
        assert!(
            e.to_string().starts_with(
                "process 10 shares its memory with process 11 (a, its child), process 12 (its \
                 child), process 13, process 14 (b) and 2 more: "
            ),
            "{e}"
        );
    }

    #[test]
    fn a_refusal_names_its_real_cause() {
        // Root with CAP_SYS_PTRACE refused: neither "run as root" nor the user is the cause.
        let w = permission_words(None, true, Some(0), Some(0));
        assert!(!w.contains("run as root"), "{w}");
        assert!(w.contains("already has CAP_SYS_PTRACE"), "{w}");
        // Root without it: say so and how to grant it.
        let w = permission_words(None, false, Some(0), Some(0));
        assert!(
            w.contains("without CAP_SYS_PTRACE") && !w.contains("run as root"),
            "{w}"
        );
        // Another user: run as root or as its user.
        let w = permission_words(Some(0), false, Some(1000), Some(0));
        assert!(w.contains("user 0") && w.contains("run as root"), "{w}");
        // Yama decides first, unless the capability overrides it.
        assert!(
            permission_words(Some(1), false, Some(1000), Some(1000)).contains("ptrace_scope is 1")
        );
        assert!(!permission_words(Some(1), true, Some(0), Some(0)).contains("ptrace_scope"));
        assert!(permission_words(Some(3), true, Some(0), Some(0)).contains("ptrace_scope is 3"));
    }
}
