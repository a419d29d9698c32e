//! [`Workload`] for another process: pause with SIGSTOP or the cgroup v1 freezer, throttle with a
//! CFS quota in the cgroup v1 `cpu` hierarchy or with a SIGSTOP/SIGCONT duty cycle.
//!
//! # Throttle
//!
//! A throttle of `f` denies the process `f` of the CPU time it was using. With
//! [`ThrottleMethod::CgroupCpu`] the process is moved into its own `cpu` cgroup
//! (`/sys/fs/cgroup/cpu/precopy-PID`) whose `cpu.cfs_quota_us` is `(1 - f)` × its CPU use
//! measured before the first throttle (from `/proc/PID/task/*/schedstat`) × the 100 ms period:
//! the kernel then simply does not schedule it past that share, as QEMU's auto-converge makes
//! vCPUs sleep. Where no such hierarchy is writable, [`ThrottleMethod::DutyCycle`] stops the
//! process for `f` of every 100 ms with SIGSTOP and lets it run for the rest. cgroup v2 (`cpu.max`)
//! is not used: this project's machines mount v2 without controllers.
//!
//! # Pause
//!
//! [`PauseMethod::Signal`] sends SIGSTOP and waits until every thread is in the stopped state
//! (`/proc/PID/task/*/stat`). It sends it to the process and to each of its threads: the
//! kernel flags a stop sent to a process as pending on one thread it picks, and the others run
//! on, writing, until that one gets a CPU and stops the group (a sleeping main thread of a
//! throttled writer let its writers run up to 12 ms, 6 MiB); a thread told itself acts on the
//! stop as soon as it next runs, before any of its own code. `SIGCONT` clears every thread's
//! pending stops. A `SIGCONT` from someone else that lands before the stop took hold discards the pending `SIGSTOP` (the kernel drops queued stop signals when `SIGCONT` is
//! sent) or continues threads already stopped, and the process would run on: so while it is
//! not all stopped, `SIGSTOP` is sent again after 5 ms, then after doubling waits up to 250 ms
//! (about 25 sends in the 5 s bound; a pending `SIGSTOP` sent twice stops the process once).
//! Past the bound the pause fails naming each thread not stopped and what `/proc` says of it
//! ([`UnstoppedThread`]: a thread in an uninterruptible sleep, such as a `vfork` parent
//! waiting for its child to exec or exit, cannot stop before it wakes).
//! A `SIGCONT` after the stop was seen is not this pause's business: the driver's pause check
//! finds what the process wrote meanwhile. See "Raised pause" for how the wait is kept short on
//! a loaded machine. [`PauseMethod::Freezer`] writes `FROZEN` to a freezer cgroup and
//! waits for the state to read back `FROZEN`. Any CPU quota is lifted while pausing, so a
//! throttled process does not delay its own stop by a quota period, but only once the stop is
//! asked for (`SIGSTOP` sent, `FROZEN` written): a throttled writer is behind its own pace, and
//! a quota lifted first let it run unthrottled until the stop took hold (a writer throttled
//! 99 % wrote 2.6 MiB there where the estimate expected 10 KiB from its throttled scans). With
//! the stop pending, a thread the quota held acts on it as soon as it runs again, before any
//! of its own code. The duty cycle ends without continuing the process: its thread sends
//! each of its signals holding a lock, after looking whether a pause has taken over, so once
//! the pause has taken that lock nothing continues the process (it used to end with its own
//! `SIGCONT`, and a process it had stopped ran unthrottled until the pause's stop held). A
//! process the cycle has stopped stays stopped (a signal pause finds it so; the freezer
//! freezes it as it is, and the resume thaws it and then continues it with `SIGCONT`); one
//! it lets run is stopped like any other.
//!
//! # Raised pause
//!
//! A thread acts on `SIGSTOP` only when it next runs, so on a loaded machine the stop waits
//! until each of the process's threads gets a CPU: 11-18 ms median and up to 99 ms at load 12,
//! against 0.10-0.13 ms when the threads are real-time for that moment (BENCHMARKS.md, "The
//! pause of another process under load"). So when the thread calling [`Workload::pause`] is
//! itself real-time (the driver's final phase and pause probes run at `SCHED_FIFO` where
//! permitted: [`FinalPriority`](crate::FinalPriority)), the signal pause, right after its
//! `SIGSTOP`, raises every thread of the process that is not stopped yet and has a
//! time-sharing policy to the caller's own policy and priority (with `SCHED_RESET_ON_FORK`,
//! so a thread created meanwhile starts time-sharing; threads that appear before the stop
//! took hold are raised too), and puts each back to the policy it had as soon as it is seen
//! stopped. Why the caller's own priority, not one below it: at the lowest real-time priority
//! (1, the driver's default) there is none below, and a `SCHED_FIFO` thread never preempts a
//! running thread of equal priority, so the raised target cannot take the CPU from the caller;
//! and since `SIGSTOP` is pending before any thread is raised, a raised thread's first act on
//! a CPU is to stop, not to run its own code. What is never done is raising it *above* the
//! caller, or raising it when the caller is a normal task: measured, a raised process beside a
//! normal controller starved it for up to a second (real-time throttling let it run).
//!
//! The raise lasts at most until the first re-send of `SIGSTOP` ([`RESTOP_FIRST`], 5 ms): a
//! `SIGCONT` from outside that discarded the pending stop would let raised threads run their
//! own code, so by then every thread still raised is put back and the pause goes on as a plain
//! one. On every way out (stopped, error, timeout, a panic unwinding) each raised thread is put
//! back. A thread that exits meanwhile needs nothing; one the caller may not raise (`EPERM`:
//! neither `CAP_SYS_NICE` nor an `RLIMIT_RTPRIO` of the target's that allows it) makes the
//! pause a plain one, and the report says why ([`ProcessControl::pause_priority`]). What a
//! process that dies meanwhile (`SIGKILL`) cannot do itself, a watchdog can, if told first
//! ([`ProcessControl::with_raise_journal`]: `precopy send`'s `__guard` process), and another
//! thread of this process that continues the target must hold
//! [`ProcessControl::raise_lock`] first (`precopy send`'s Ctrl-C handler), so that it never
//! continues a raised thread.
//!
//! Dropping a `ProcessControl` lifts the throttle and moves the process back to its cgroups; a
//! paused process stays stopped: one paused with the freezer is handed over to `SIGSTOP`
//! before it leaves the freezer cgroup (which thaws it), and the drop waits until every thread
//! is seen stopped (5 s at most).
//!
//! # The hand-over from the freezer to `SIGSTOP`
//!
//! A `SIGSTOP` sent to a frozen process is only flagged pending on the one thread the kernel
//! picks for it; the others learn of the stop only once that thread, thawed and given a CPU,
//! starts the group stop. A thread frozen while it slept (`nanosleep`, a futex) goes back to
//! that sleep when thawed and, once its sleep ends, returns to its own code unless a signal is
//! pending on it: on a loaded machine the picked thread may not have run yet, and such a
//! thread ran and wrote after the commit (the demo's "did not stay frozen after the commit",
//! 5 of 10 runs at load 7.6). So `SIGSTOP` is also sent to every thread itself (`tgkill`):
//! each then has it pending before the thaw and stops before it next returns to user space.
//! Threads cannot appear meanwhile: every thread of a frozen process is frozen.

use crate::control::{Workload, WorkloadCounters};
use crate::report::PriorityReport;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use precopy_sys::sched::{self, Raised, ThreadPolicy, Tid};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a process is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PauseMethod {
    /// SIGSTOP / SIGCONT.
    #[default]
    Signal,
    /// The cgroup v1 freezer (`/sys/fs/cgroup/freezer`).
    Freezer,
}

/// How a process is throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThrottleMethod {
    /// A cgroup v1 `cpu` quota where possible, else a duty cycle.
    #[default]
    Auto,
    /// A cgroup v1 `cpu` quota.
    CgroupCpu,
    /// SIGSTOP for the throttle's fraction of every 100 ms.
    DutyCycle,
    /// Never throttle (the driver still reports what it asked for).
    None,
}

/// Failures controlling a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A process id of zero or below: `kill(2)` would signal a whole process group (0) or
    /// every process the caller may signal (-1).
    #[error("{pid} is not a process id")]
    BadPid {
        /// The value given.
        pid: i32,
    },
    /// Sending a signal failed (the process is gone, or not ours).
    #[error("sending {signal} to process {pid} failed")]
    Signal {
        /// The process.
        pid: i32,
        /// The signal.
        signal: Signal,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// A cgroup file operation failed.
    #[error("cgroup operation on {path} failed")]
    Cgroup {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The process did not reach the stopped state in time. With [`PauseMethod::Signal`],
    /// `SIGSTOP` was sent `sigstops` times meanwhile: something kept continuing it (`SIGCONT`),
    /// or a thread never left an uninterruptible sleep (state `D`, such as a `vfork` parent);
    /// `threads` says which were not stopped and what they were doing. With
    /// [`PauseMethod::Freezer`], `sigstops` is 0 and `threads` empty.
    #[error(
        "process {pid} did not stop within {waited:?} (SIGSTOP sent {sigstops} times{}",
        not_stopped_note(threads)
    )]
    StopTimeout {
        /// The process.
        pid: i32,
        /// How long it was given.
        waited: Duration,
        /// How many times `SIGSTOP` was sent.
        sigstops: u32,
        /// The threads not stopped when the pause gave up, as `/proc` showed them then.
        threads: Vec<UnstoppedThread>,
    },
    /// Reading the process's state region ([`ProcessControl::with_state`]) failed or came
    /// back short.
    #[error("reading {len} bytes of state at {addr:#x} in process {pid} failed")]
    State {
        /// The process.
        pid: i32,
        /// Where the state is, in the process's address space.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// The errno, or `EFAULT` for a short read.
        #[source]
        source: nix::errno::Errno,
    },
}

/// A thread a signal pause found not stopped when it gave up ([`ProcessError::StopTimeout`]),
/// as `/proc/PID/task/TID` showed it then: which thread and why it may not have stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnstoppedThread {
    /// The thread's ID.
    pub tid: Tid,
    /// Its name (`comm`), empty if unreadable.
    pub name: String,
    /// Its state letter (`stat`'s third field: `R` running, `S` sleeping, `D` uninterruptible
    /// sleep, ...), `?` if unreadable (it exited meanwhile).
    pub state: char,
    /// The kernel function it sleeps in (`wchan`), where it sleeps and that can be read.
    pub wchan: Option<String>,
    /// The system call it is in (`syscall`'s first field), where it is blocked in one and that
    /// can be read (it needs ptrace access).
    pub syscall: Option<i64>,
    /// Its children (`children`: a `vfork` parent waits for one to exec or exit).
    pub children: Vec<i32>,
}

impl UnstoppedThread {
    /// What `/proc` says of thread `tid` of process `pid` now.
    pub fn read(pid: i32, tid: Tid) -> UnstoppedThread {
        let dir = format!("/proc/{pid}/task/{tid}");
        let read = |name: &str| fs::read_to_string(format!("{dir}/{name}")).ok();
        let stat = read("stat").unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .unwrap_or('?');
        let name = read("comm")
            .map(|c| c.trim_end().to_string())
            .unwrap_or_default();
        // `0` where it runs, or where the kernel hides the address.
        let wchan = read("wchan")
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty() && w != "0");
        // "running", or the call's number and arguments.
        let syscall = read("syscall")
            .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
            .filter(|&n| n >= 0);
        let children = read("children")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect();
        UnstoppedThread {
            tid,
            name,
            state,
            wchan,
            syscall,
            children,
        }
    }

    /// Whether it waits for a child it started with `vfork` (or `clone` with
    /// `CLONE_VFORK`, as `posix_spawn` does): in an uninterruptible sleep in such a call, or
    /// in the kernel function that waits for it.
    pub fn in_vfork(&self) -> bool {
        let calls = [
            nix::libc::SYS_vfork,
            nix::libc::SYS_clone,
            nix::libc::SYS_clone3,
        ];
        self.state == 'D'
            && (self.syscall.is_some_and(|n| calls.contains(&n))
                || self
                    .wchan
                    .as_deref()
                    .is_some_and(|w| w == "kernel_clone" || w.contains("vfork")))
    }
}

impl std::fmt::Display for UnstoppedThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let meaning = match self.state {
            'R' => "running",
            'S' => "sleeping",
            'D' => "uninterruptible sleep",
            'I' => "idle",
            'T' | 't' => "stopped",
            'Z' | 'X' => "exited",
            '?' => "gone",
            _ => "another state",
        };
        write!(
            f,
            "thread {} ({}), state {} ({meaning})",
            self.tid, self.name, self.state
        )?;
        if self.in_vfork() {
            write!(f, ": a vfork parent, it cannot stop until its child")?;
            match &self.children[..] {
                [] => {}
                [one] => write!(f, " {one}")?,
                many => write!(f, " (one of {many:?})")?,
            }
            write!(f, " calls exec or exits")
        } else if let Some(w) = &self.wchan {
            write!(f, " in {w}")
        } else {
            Ok(())
        }
    }
}

/// How many threads a [`ProcessError::StopTimeout`] message names.
const NAMED_THREADS: usize = 8;

/// The end of [`ProcessError::StopTimeout`]'s message: why, and the threads not stopped.
fn not_stopped_note(threads: &[UnstoppedThread]) -> String {
    if threads.is_empty() {
        return ": something kept continuing it, or a thread stayed in an uninterruptible sleep)"
            .into();
    }
    let named: Vec<String> = threads
        .iter()
        .take(NAMED_THREADS)
        .map(ToString::to_string)
        .collect();
    let more = match threads.len().saturating_sub(NAMED_THREADS) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    // A thread that could take the stop but did not was continued each time (`SIGCONT`).
    let why = if threads.iter().any(|t| t.state == 'D') {
        ""
    } else {
        ": something kept continuing it"
    };
    format!("{why}); not stopped: {}{more}", named.join("; "))
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const PERIOD_US: u64 = 100_000;
/// Real-time time per second the throttle's `cpu` group allows its threads (cgroup v1 with
/// `RT_GROUP_SCHED`; a new group has none, and a thread in a group without any cannot be made
/// real-time: `EPERM`). The raised pause needs it: its threads act on their `SIGSTOP` before
/// anything else, a few microseconds each.
const RT_RUNTIME_US: u64 = 10_000;
const DUTY_PERIOD: Duration = Duration::from_millis(100);
/// How long a pause waits for the process to stop (and a dropped control for a frozen process
/// handed over to `SIGSTOP` to be seen stopped).
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a process may take to stop before `SIGSTOP` is sent again; doubled after each
/// re-send, up to [`RESTOP_MAX`]. Also how long a raised pause keeps the threads raised at
/// most (module docs, "Raised pause").
pub const RESTOP_FIRST: Duration = Duration::from_millis(5);
const RESTOP_MAX: Duration = Duration::from_millis(250);

fn cg_err(path: &Path) -> impl FnOnce(io::Error) -> ProcessError + '_ {
    move |source| ProcessError::Cgroup {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), ProcessError> {
    fs::write(path, value).map_err(cg_err(path))
}

/// A per-process cgroup in one v1 hierarchy; the process goes back where it was on drop.
#[derive(Debug)]
struct Cgroup {
    dir: PathBuf,
    home: PathBuf,
    pid: i32,
}

impl Cgroup {
    /// The process's own group under `controller`, `prepare`d before the process moves in.
    fn create(
        controller: &str,
        pid: i32,
        prepare: impl FnOnce(&Cgroup) -> Result<(), ProcessError>,
    ) -> Result<Cgroup, ProcessError> {
        let root = Path::new(CGROUP_ROOT).join(controller);
        let home = current_cgroup(pid, controller)
            .map(|rel| root.join(rel.trim_start_matches('/')))
            .unwrap_or_else(|| root.clone());
        let dir = root.join(format!("precopy-{pid}"));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(cg_err(&dir)(e)),
        }
        let cg = Cgroup { dir, home, pid };
        prepare(&cg)?;
        write_file(&cg.file("cgroup.procs"), &pid.to_string())?;
        Ok(cg)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The process may have exited: nothing to move then.
        let _ = fs::write(self.home.join("cgroup.procs"), self.pid.to_string());
        if let Err(e) = fs::remove_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing a cgroup failed");
        }
    }
}

/// The throttle's `cpu` group, before the process moves in: the quota's period, and real-time
/// time for the raised pause where the kernel gives groups their own ([`RT_RUNTIME_US`]). A
/// group without it still throttles; its pause is then not raised, and the report says
/// "not permitted".
fn prepare_cpu_group(cg: &Cgroup) -> Result<(), ProcessError> {
    write_file(&cg.file("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
    let rt = cg.file("cpu.rt_runtime_us");
    if rt.exists()
        && let Err(e) = write_file(&rt, &RT_RUNTIME_US.to_string())
    {
        tracing::info!(error = %e, "no real-time time for the throttle's cpu group: its pause is not raised");
    }
    Ok(())
}

/// The process's path in the v1 hierarchy holding `controller`, from `/proc/PID/cgroup`.
fn current_cgroup(pid: i32, controller: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

/// Nanoseconds on CPU of all the process's threads (`/proc/PID/task/*/schedstat`).
fn cpu_time_ns(pid: i32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Whether every thread of `pid` is stopped (state `T` or `t`), or the process is gone.
pub fn all_stopped(pid: i32) -> bool {
    unstopped_threads(pid).is_empty()
}

/// The threads of `pid` not stopped (any state but `T`, `t`, or an exited thread's `Z`/`X`);
/// none when the process is gone.
fn unstopped_threads(pid: i32) -> Vec<Tid> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| {
                    let after = &s[s.rfind(')')? + 1..];
                    after
                        .split_whitespace()
                        .next()
                        // An exited thread (a main thread after `pthread_exit` is a zombie
                        // until the process ends) runs nothing either.
                        .map(|st| !matches!(st, "T" | "t" | "Z" | "X"))
                })
                // A thread that exited meanwhile is not running.
                .unwrap_or(false)
        })
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
}

/// Where a raised pause (module docs, "Raised pause") records the threads it is about to
/// raise, before it raises them, and that it put them back: a journal kept outside this
/// process (`precopy send` writes it to its `__guard` watchdog) lets someone put them back
/// should this process die in between.
pub trait RaiseJournal: Send + Sync + std::fmt::Debug {
    /// `threads` (each with the policy it has now) are about to be set to `to`. Returns
    /// whether this was recorded: if not, nothing is raised.
    fn raising(&self, threads: &[(Tid, ThreadPolicy)], to: ThreadPolicy) -> bool;
    /// Every thread raised since the last call is back to the policy it had.
    fn restored(&self);
}

/// The threads one signal pause raised (module docs, "Raised pause"), from right after the
/// `SIGSTOP` until each is seen stopped or the raise is lifted. Holds the
/// [`ProcessControl::raise_lock`] throughout; dropped on a panic, it still puts every thread
/// back.
struct RaiseWindow<'a> {
    _held: MutexGuard<'a, ()>,
    raised: Raised,
    to: ThreadPolicy,
    /// Threads already looked at (raised, or not time-sharing, or gone).
    seen: Vec<Tid>,
    /// How many threads were raised in all.
    count: u32,
    restore_error: Option<String>,
}

impl RaiseWindow<'_> {
    /// Raises those of `tids` not looked at yet.
    fn raise(&mut self, tids: &[Tid], journal: Option<&dyn RaiseJournal>) -> io::Result<bool> {
        let new: Vec<Tid> = tids
            .iter()
            .copied()
            .filter(|t| !self.seen.contains(t))
            .collect();
        if new.is_empty() {
            return Ok(true);
        }
        self.seen.extend(&new);
        let to = self.to;
        let mut told = true;
        let raised = sched::raise_threads_noted(&new, to.policy, to.priority, |plan| {
            told = journal.is_none_or(|j| j.raising(plan, to));
            told
        })?;
        self.count += raised.len() as u32;
        self.raised.merge(raised);
        Ok(told)
    }

    /// Puts back every raised thread not in `unstopped` (it stopped, or exited).
    fn put_back_stopped(&mut self, unstopped: &[Tid]) {
        let stopped: Vec<Tid> = self
            .raised
            .threads()
            .filter(|t| !unstopped.contains(t))
            .collect();
        for tid in stopped {
            if let Err(e) = self.raised.restore_thread(tid) {
                self.restore_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Puts every thread still raised back and says what the window did.
    fn close(mut self, journal: Option<&dyn RaiseJournal>) -> PriorityReport {
        if let Err(e) = std::mem::take(&mut self.raised).restore() {
            self.restore_error.get_or_insert_with(|| e.to_string());
        }
        if self.count > 0
            && let Some(j) = journal
        {
            j.restored();
        }
        PriorityReport {
            policy: policy_name(self.to),
            priority: u8::try_from(self.to.priority).unwrap_or(u8::MAX),
            threads: self.count,
            not_raised: None,
            restore_error: self.restore_error.take(),
        }
    }
}

/// The report's name of a real-time policy.
fn policy_name(p: ThreadPolicy) -> &'static str {
    match p.base() {
        sched::SCHED_FIFO => "fifo",
        sched::SCHED_RR => "rr",
        _ => "normal",
    }
}

/// What the duty thread is told and what it is doing, under [`DutyCycle`]'s lock. Every
/// signal the thread sends, it sends holding the lock and after looking at `end`: once a pause
/// has set `end`, the thread never signals the process again.
#[derive(Debug)]
struct DutyState {
    fraction: f64,
    end: Option<DutyEnd>,
    /// The thread's last signal was `SIGSTOP` (its stopped half).
    stopped: bool,
}

/// How the duty thread ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DutyEnd {
    /// Continue the process if the cycle has it stopped (the throttle is lifted).
    Continue,
    /// Leave the process as it is, stopped or not: a pause takes over (module docs, "Pause").
    Hold,
}

type DutyShared = Arc<(Mutex<DutyState>, Condvar)>;

/// SIGSTOP/SIGCONT duty cycle on a background thread.
#[derive(Debug)]
struct DutyCycle {
    shared: DutyShared,
    handle: Option<JoinHandle<()>>,
}

impl DutyCycle {
    fn start(pid: i32, fraction: f64) -> Result<DutyCycle, ProcessError> {
        let shared: DutyShared = Arc::new((
            Mutex::new(DutyState {
                fraction,
                end: None,
                stopped: false,
            }),
            Condvar::new(),
        ));
        let theirs = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("precopy-throttle".into())
            .spawn(move || duty_loop(Pid::from_raw(pid), &theirs))
            .map_err(cg_err(Path::new("throttle thread")))?;
        Ok(DutyCycle {
            shared,
            handle: Some(handle),
        })
    }

    fn state(&self) -> MutexGuard<'_, DutyState> {
        self.shared.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, fraction: f64) {
        self.state().fraction = fraction;
        self.shared.1.notify_all();
    }

    /// Ends the cycle, leaving the process running.
    fn stop(&mut self) {
        self.tell_end(DutyEnd::Continue);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }

    /// Ends the cycle for a pause without continuing the process: from the return on, the
    /// thread sends no signal (it is not waited for: it only wakes and returns). Returns
    /// whether the cycle had the process stopped.
    fn hold(mut self) -> bool {
        let stopped = self.tell_end(DutyEnd::Hold);
        self.handle = None;
        stopped
    }

    fn tell_end(&self, end: DutyEnd) -> bool {
        let mut state = self.state();
        state.end.get_or_insert(end);
        let stopped = state.stopped;
        drop(state);
        self.shared.1.notify_all();
        stopped
    }
}

impl Drop for DutyCycle {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.stop();
        }
    }
}

/// Stops the process for `fraction` of every [`DUTY_PERIOD`] and lets it run for the rest,
/// until told to end ([`DutyEnd`]). A new fraction takes effect at once, also in the middle of
/// a stopped half.
fn duty_loop(pid: Pid, shared: &DutyShared) {
    let (lock, cv) = &**shared;
    let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if state.end.is_some() {
            return;
        }
        if state.fraction <= 0.0 {
            state = cv.wait(state).unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        let _ = kill(pid, Signal::SIGSTOP);
        state.stopped = true;
        let since = Instant::now();
        state = wait_for_end(cv, state, |f| {
            (f > 0.0).then(|| since + DUTY_PERIOD.mul_f64(f))
        });
        match state.end {
            Some(DutyEnd::Hold) => return,
            Some(DutyEnd::Continue) | None => {
                let _ = kill(pid, Signal::SIGCONT);
                state.stopped = false;
            }
        }
        let since = Instant::now();
        state = wait_for_end(cv, state, |f| {
            (f > 0.0).then(|| since + DUTY_PERIOD.mul_f64(1.0 - f))
        });
    }
}

/// Waits on `cv` until the deadline the fraction in force gives (`None`: at once) or until an
/// end is asked for.
fn wait_for_end<'a>(
    cv: &Condvar,
    mut state: MutexGuard<'a, DutyState>,
    deadline: impl Fn(f64) -> Option<Instant>,
) -> MutexGuard<'a, DutyState> {
    while state.end.is_none() {
        let Some(left) = deadline(state.fraction)
            .and_then(|d| d.checked_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
        else {
            break;
        };
        state = cv
            .wait_timeout(state, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    state
}

/// Pauses, resumes and throttles another process (see the module docs).
#[derive(Debug)]
pub struct ProcessControl {
    pid: i32,
    pause_method: PauseMethod,
    throttle_method: ThrottleMethod,
    freezer: Option<Cgroup>,
    cpu: Option<Cgroup>,
    duty: Option<DutyCycle>,
    /// CPUs the process used before the first throttle.
    baseline: Option<f64>,
    sample: (Instant, u64),
    fraction: f64,
    paused: bool,
    /// A freezer pause took over a process its duty cycle had stopped: the resume continues
    /// it after the thaw (module docs, "Pause").
    duty_stop_held: bool,
    /// Every thread is stopped by someone else (seen so when control began, or when the
    /// caller last looked: [`ProcessControl::set_stopped_by_others`]): never sent SIGCONT,
    /// never duty-cycled; it is left stopped.
    stopped_by_others: bool,
    /// Address in the process of its [`WorkloadCounters`] as two native-endian u64s
    /// (operations, busy nanoseconds).
    counters: Option<u64>,
    state: Option<(u64, u64)>,
    /// Raise the threads for a signal pause when the caller is real-time (module docs,
    /// "Raised pause").
    raise: bool,
    journal: Option<Box<dyn RaiseJournal>>,
    raise_lock: Arc<Mutex<()>>,
    /// How the last signal pause raised the threads.
    last_raise: Option<PriorityReport>,
}

impl ProcessControl {
    /// Control of process `pid`. With [`PauseMethod::Freezer`] the process moves into a freezer
    /// cgroup now. Its CPU use from now until the first throttle is the throttle's baseline.
    pub fn new(
        pid: i32,
        pause: PauseMethod,
        throttle: ThrottleMethod,
    ) -> Result<ProcessControl, ProcessError> {
        if pid <= 0 {
            return Err(ProcessError::BadPid { pid });
        }
        let freezer = match pause {
            PauseMethod::Freezer => Some(Cgroup::create("freezer", pid, |_| Ok(()))?),
            PauseMethod::Signal => None,
        };
        Ok(ProcessControl {
            pid,
            pause_method: pause,
            throttle_method: throttle,
            freezer,
            cpu: None,
            duty: None,
            baseline: None,
            sample: (Instant::now(), cpu_time_ns(pid)),
            fraction: 0.0,
            paused: false,
            duty_stop_held: false,
            stopped_by_others: pause == PauseMethod::Signal && all_stopped(pid),
            counters: None,
            state: None,
            raise: true,
            journal: None,
            raise_lock: Arc::default(),
            last_raise: None,
        })
    }

    /// Whether a signal pause raises the process's threads when the caller is real-time
    /// (module docs, "Raised pause"); on unless turned off here.
    pub fn raise_to_stop(mut self, on: bool) -> ProcessControl {
        self.raise = on;
        self
    }

    /// Tells `journal` which threads each raised pause is about to raise (before it raises
    /// them) and when every one is back (see [`RaiseJournal`]).
    pub fn with_raise_journal(mut self, journal: impl RaiseJournal + 'static) -> ProcessControl {
        self.journal = Some(Box::new(journal));
        self
    }

    /// The lock a raised pause holds from before it raises the first thread until every one
    /// is back (5 ms at most): another thread of this process that continues the process
    /// (`SIGCONT`) takes it first, so that it never lets a raised thread run. It stays locked
    /// if that thread then ends the process.
    pub fn raise_lock(&self) -> Arc<Mutex<()>> {
        Arc::clone(&self.raise_lock)
    }

    /// How the last signal pause raised the process's threads: the policy and priority (the
    /// caller's), how many threads, or why none was (the caller is not real-time, `EPERM`);
    /// `None` before the first signal pause and with the freezer.
    pub fn pause_priority(&self) -> Option<PriorityReport> {
        self.last_raise.clone()
    }

    /// Opens the raise of a signal pause whose `SIGSTOP` was just sent, if the caller is
    /// real-time; records why not otherwise.
    fn open_raise<'a>(&mut self, lock: &'a Mutex<()>) -> Option<RaiseWindow<'a>> {
        if !self.raise {
            self.last_raise = None;
            return None;
        }
        let not_raised = |why: String| PriorityReport {
            policy: "normal",
            priority: 0,
            threads: 0,
            not_raised: Some(why),
            restore_error: None,
        };
        let me = match sched::thread_policy(sched::gettid()) {
            Ok(p) if p.is_realtime() => p,
            Ok(_) => {
                self.last_raise = Some(not_raised(
                    "the pausing thread is not real-time (a raised process beside a normal \
                     caller can starve it)"
                        .into(),
                ));
                return None;
            }
            Err(e) => {
                self.last_raise = Some(not_raised(format!(
                    "reading the pausing thread's policy: {e}"
                )));
                return None;
            }
        };
        let to = ThreadPolicy::raised(me.base(), me.priority);
        let mut window = RaiseWindow {
            _held: lock.lock().unwrap_or_else(PoisonError::into_inner),
            raised: Raised::default(),
            to,
            seen: Vec::new(),
            count: 0,
            restore_error: None,
        };
        let why = match window.raise(&unstopped_threads(self.pid), self.journal.as_deref()) {
            Ok(true) => return Some(window),
            Ok(false) => "the watchdog could not be told which threads".to_string(),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => format!(
                "not permitted ({e}): needs CAP_SYS_NICE or an RLIMIT_RTPRIO of the process's of at least {}",
                me.priority
            ),
            Err(e) => e.to_string(),
        };
        let mut report = window.close(self.journal.as_deref());
        report.not_raised = Some(why);
        report.threads = 0;
        self.last_raise = Some(report);
        None
    }

    /// Reads the process's own counters at `addr` in its memory: two native-endian `u64`s,
    /// operations then busy nanoseconds (what the demo's source keeps), with
    /// `process_vm_readv`. An unreadable address makes [`Workload::counters`] report none.
    pub fn with_counters(mut self, addr: u64) -> ProcessControl {
        self.counters = Some(addr);
        self
    }

    /// The process's state blob ([`Workload::save_state`]) is the `len` bytes at `addr` in its
    /// address space, read with `process_vm_readv` while it is paused after the last memory
    /// round (a program keeps what the destination needs besides memory there, the way a
    /// VMM's vCPU registers sit beside guest RAM). Without it the state is empty.
    pub fn with_state(mut self, addr: u64, len: u64) -> ProcessControl {
        self.state = Some((addr, len));
        self
    }

    /// Treat the process as stopped on entry (the caller saw it stopped before attaching, which
    /// may have disturbed its state): it is not continued unless
    /// [`ProcessControl::set_stopped_by_others`] says otherwise later.
    pub fn stopped_on_entry_if(mut self, stopped: bool) -> ProcessControl {
        self.stopped_by_others |= stopped;
        self
    }

    /// Whether the process is taken as stopped by someone else: it is never continued nor
    /// duty-cycled, so a pause leaves it stopped. Set when control begins with every thread
    /// stopped; a caller that looks again before it takes hold of the process (a pause of a
    /// process it has not paused, the start of a throttle) says what it found with
    /// [`ProcessControl::set_stopped_by_others`].
    pub fn stopped_by_others(&self) -> bool {
        self.stopped_by_others
    }

    /// The process was found stopped by someone else (`true`: leave it so) or running
    /// (`false`: a pause is ours to undo, someone continued it since it was seen stopped).
    /// Call only while it is neither paused nor throttled by this control: then its stops are
    /// its own, and a stop seen cannot be told from someone else's.
    pub fn set_stopped_by_others(&mut self, stopped: bool) {
        self.stopped_by_others = stopped;
    }

    /// The process's PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The throttle in force.
    pub fn throttle(&self) -> f64 {
        self.fraction
    }

    fn signal(&self, signal: Signal) -> Result<(), ProcessError> {
        kill(Pid::from_raw(self.pid), signal).map_err(|source| ProcessError::Signal {
            pid: self.pid,
            signal,
            source,
        })
    }

    fn baseline_cpus(&mut self) -> f64 {
        *self.baseline.get_or_insert_with(|| {
            let (t0, ns0) = self.sample;
            let wall = t0.elapsed().as_secs_f64();
            let used = cpu_time_ns(self.pid).saturating_sub(ns0) as f64 / 1e9;
            if wall > 0.0 { used / wall } else { 0.0 }
        })
    }

    /// Applies `fraction` with the chosen mechanism (the process is not paused).
    fn apply(&mut self, fraction: f64) -> Result<(), ProcessError> {
        if self.throttle_method == ThrottleMethod::None || self.stopped_by_others {
            return Ok(());
        }
        if self.duty.is_none()
            && matches!(
                self.throttle_method,
                ThrottleMethod::Auto | ThrottleMethod::CgroupCpu
            )
        {
            if self.cpu.is_none() && fraction > 0.0 {
                match Cgroup::create("cpu", self.pid, prepare_cpu_group) {
                    Ok(cg) => self.cpu = Some(cg),
                    Err(e) if self.throttle_method == ThrottleMethod::Auto => {
                        tracing::info!(error = %e, "no cgroup cpu quota; throttling with SIGSTOP/SIGCONT");
                        self.throttle_method = ThrottleMethod::DutyCycle;
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(cg) = &self.cpu {
                let quota = if fraction > 0.0 {
                    let cpus = self.baseline.unwrap_or(1.0);
                    ((1.0 - fraction) * cpus * PERIOD_US as f64).max(1000.0) as i64
                } else {
                    -1
                };
                return write_file(&cg.file("cpu.cfs_quota_us"), &quota.to_string());
            }
        }
        if self.throttle_method == ThrottleMethod::DutyCycle {
            match &self.duty {
                Some(d) => d.set(fraction),
                None if fraction > 0.0 => self.duty = Some(DutyCycle::start(self.pid, fraction)?),
                None => {}
            }
        }
        Ok(())
    }

    /// Lifts the mechanism (not the recorded fraction) so the process can stop at once.
    fn suspend_throttle(&mut self) -> Result<(), ProcessError> {
        if let Some(mut d) = self.duty.take() {
            d.stop();
        }
        self.lift_quota()
    }

    fn lift_quota(&self) -> Result<(), ProcessError> {
        match &self.cpu {
            Some(cg) => write_file(&cg.file("cpu.cfs_quota_us"), "-1"),
            None => Ok(()),
        }
    }

    /// Lifts the CPU quota once the stop is asked for (see "Throttle" in the module docs).
    /// A stop already sent must not be left half-done by an error here: it is logged, and
    /// the stop then takes hold when the quota next refills (within a period).
    fn lift_quota_for_stop(&self) {
        if let Err(e) = self.lift_quota() {
            tracing::warn!(error = %e, "lifting the cpu quota for the pause failed");
        }
    }

    /// Stops the process; a stop that failed half-way (not all stopped within
    /// `STOP_TIMEOUT`, a stop that could not be sent again) is undone before the error is
    /// returned: `SIGSTOP` may be pending on threads not yet stopped, and nothing else would
    /// continue them (`paused` stays false, so neither `resume` nor the drop does).
    /// The duty cycle, if one runs, ended for it ([`DutyCycle::hold`]) and is started again
    /// with the throttle in force.
    fn pause_now(&mut self) -> Result<(), ProcessError> {
        let stopped = self.stop_now();
        if stopped.is_err() {
            if let Err(e) = self.continue_now() {
                tracing::warn!(error = %e, "continuing the process after a failed pause failed");
            }
            let f = self.fraction;
            if let Err(e) = self.apply(f) {
                tracing::warn!(error = %e, "throttling the process again after a failed pause failed");
            }
        }
        stopped
    }

    fn stop_now(&mut self) -> Result<(), ProcessError> {
        // The duty cycle ends without its SIGCONT: a process it has stopped stays stopped
        // until the stop below holds it (module docs, "Pause").
        let duty_had_it_stopped = self.duty.take().is_some_and(DutyCycle::hold);
        let start = Instant::now();
        match &self.freezer {
            Some(cg) => {
                let state = cg.file("freezer.state");
                // Before the first fallible step: a failed freeze is undone by the same
                // continue as a failed resume.
                self.duty_stop_held = duty_had_it_stopped;
                write_file(&state, "FROZEN")?;
                self.lift_quota_for_stop();
                while fs::read_to_string(&state).map_err(cg_err(&state))?.trim() != "FROZEN" {
                    if start.elapsed() > STOP_TIMEOUT {
                        return Err(ProcessError::StopTimeout {
                            pid: self.pid,
                            waited: STOP_TIMEOUT,
                            sigstops: 0,
                            threads: Vec::new(),
                        });
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            None => {
                self.stop_every_thread()?;
                self.lift_quota_for_stop();
                let lock = Arc::clone(&self.raise_lock);
                let mut window = self.open_raise(&lock);
                let mut sigstops = 1;
                let (mut sent, mut wait) = (Instant::now(), RESTOP_FIRST);
                loop {
                    let unstopped = unstopped_threads(self.pid);
                    if let Some(w) = &mut window {
                        w.put_back_stopped(&unstopped);
                        if unstopped.is_empty() || sent.elapsed() >= RESTOP_FIRST {
                            // All stopped, or a stop that takes this long is not waiting
                            // for a CPU: no thread stays raised past the first re-send.
                            if let Some(w) = window.take() {
                                self.last_raise = Some(w.close(self.journal.as_deref()));
                            }
                        } else if let Err(e) = w.raise(&unstopped, self.journal.as_deref()) {
                            // Threads created meanwhile stay as they are.
                            tracing::debug!(error = %e, "raising a new thread for the stop");
                        }
                    }
                    if unstopped.is_empty() {
                        break;
                    }
                    if start.elapsed() > STOP_TIMEOUT {
                        let pid = self.pid;
                        return Err(ProcessError::StopTimeout {
                            pid,
                            waited: STOP_TIMEOUT,
                            sigstops,
                            threads: unstopped
                                .iter()
                                .map(|&tid| UnstoppedThread::read(pid, tid))
                                .collect(),
                        });
                    }
                    if sent.elapsed() >= wait {
                        // Not stopped yet: a SIGCONT from outside may have discarded the
                        // SIGSTOP (see the module docs). Sending it again is harmless if not.
                        self.stop_every_thread()?;
                        sigstops += 1;
                        sent = Instant::now();
                        wait = (wait * 2).min(RESTOP_MAX);
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        self.paused = true;
        Ok(())
    }

    fn resume_now(&mut self) -> Result<(), ProcessError> {
        self.continue_now()?;
        self.paused = false;
        let f = self.fraction;
        self.apply(f)
    }
}

impl ProcessControl {
    /// Lets a stopped or frozen process run: `SIGCONT` (which also clears every thread's
    /// pending stop), or the thaw followed by `SIGCONT` when the pause froze a process its
    /// duty cycle had stopped; nothing for a process stopped by someone else.
    fn continue_now(&mut self) -> Result<(), ProcessError> {
        match &self.freezer {
            Some(cg) => {
                write_file(&cg.file("freezer.state"), "THAWED")?;
                if self.duty_stop_held {
                    self.signal(Signal::SIGCONT)?;
                    self.duty_stop_held = false;
                }
                Ok(())
            }
            None if self.stopped_by_others => Ok(()),
            None => self.signal(Signal::SIGCONT),
        }
    }
}

impl Workload for ProcessControl {
    type Error = ProcessError;

    fn pause(&mut self) -> Result<(), ProcessError> {
        self.pause_now()
    }

    fn resume(&mut self) -> Result<(), ProcessError> {
        self.resume_now()
    }

    fn set_throttle(&mut self, fraction: f64) -> Result<(), ProcessError> {
        if fraction > 0.0 {
            self.baseline_cpus();
        }
        self.fraction = fraction;
        if !self.paused {
            self.apply(fraction)?;
        }
        Ok(())
    }

    fn counters(&mut self) -> Option<WorkloadCounters> {
        let addr = self.counters?;
        let mut raw = [0u8; 16];
        let mut local = [io::IoSliceMut::new(&mut raw)];
        let remote = [nix::sys::uio::RemoteIoVec {
            base: usize::try_from(addr).ok()?,
            len: 16,
        }];
        match nix::sys::uio::process_vm_readv(Pid::from_raw(self.pid), &mut local, &remote) {
            Ok(16) => {}
            _ => return None,
        }
        let (ops, busy) = raw.split_at(8);
        Some(WorkloadCounters {
            operations: u64::from_ne_bytes(ops.try_into().ok()?),
            busy: Duration::from_nanos(u64::from_ne_bytes(busy.try_into().ok()?)),
        })
    }

    fn save_state(&mut self) -> Result<Vec<u8>, ProcessError> {
        let Some((addr, len)) = self.state else {
            return Ok(Vec::new());
        };
        let pid = self.pid;
        let fail = |source| ProcessError::State {
            pid,
            addr,
            len,
            source,
        };
        let (base, size) = match (usize::try_from(addr), usize::try_from(len)) {
            (Ok(b), Ok(l)) => (b, l),
            _ => return Err(fail(nix::errno::Errno::EFAULT)),
        };
        let mut blob = vec![0u8; size];
        let mut local = [io::IoSliceMut::new(&mut blob)];
        let remote = [nix::sys::uio::RemoteIoVec { base, len: size }];
        match nix::sys::uio::process_vm_readv(Pid::from_raw(pid), &mut local, &remote) {
            Ok(n) if n == size => Ok(blob),
            Ok(_) => Err(fail(nix::errno::Errno::EFAULT)),
            Err(e) => Err(fail(e)),
        }
    }

    fn pause_priority(&self) -> Option<PriorityReport> {
        ProcessControl::pause_priority(self)
    }

    fn throttle_method(&self) -> &'static str {
        match self.throttle_method {
            ThrottleMethod::None => "none",
            ThrottleMethod::DutyCycle => "SIGSTOP/SIGCONT duty cycle",
            ThrottleMethod::CgroupCpu => "cgroup v1 cpu quota",
            ThrottleMethod::Auto if self.cpu.is_some() => "cgroup v1 cpu quota",
            ThrottleMethod::Auto => "cgroup v1 cpu quota, else duty cycle",
        }
    }
}

impl ProcessControl {
    /// `SIGSTOP` to the process (a thread created meanwhile stops with the others) and to each
    /// of its threads (see "Pause" in the module docs for why each needs its own; a frozen
    /// process's threads cannot act on it before they are thawed). The error is the
    /// process-wide signal's.
    fn stop_every_thread(&self) -> Result<(), ProcessError> {
        let sent = self.signal(Signal::SIGSTOP);
        for tid in sched::process_threads(self.pid).unwrap_or_default() {
            // A thread that exited meanwhile (`ESRCH`) needs nothing.
            let _ = precopy_sys::process::signal_thread(self.pid, tid, Signal::SIGSTOP as i32);
        }
        sent
    }

    /// Waits, at most [`STOP_TIMEOUT`], until every thread of a process handed over from the
    /// freezer is seen stopped, so that whoever looks after the drop finds it stopped. A thread
    /// thawed back into a long sleep shows as stopped only when that sleep ends (it stops before
    /// its own code runs): past the bound the drop warns and returns.
    fn wait_stopped_after_thaw(&self) {
        let start = Instant::now();
        while !all_stopped(self.pid) {
            if start.elapsed() > STOP_TIMEOUT {
                tracing::warn!(
                    pid = self.pid,
                    "not every thread was seen stopped after leaving the freezer"
                );
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for ProcessControl {
    fn drop(&mut self) {
        let _ = self.suspend_throttle();
        let hand_over = self.paused && self.pause_method == PauseMethod::Freezer;
        if hand_over {
            // Leaving the freezer thaws it: every thread must have the stop pending first
            // (module docs, "The hand-over from the freezer to `SIGSTOP`").
            let _ = self.stop_every_thread();
        }
        if let Some(cg) = &self.freezer
            && !self.paused
        {
            let _ = fs::write(cg.file("freezer.state"), "THAWED");
        }
        self.cpu = None;
        self.freezer = None;
        if hand_over {
            self.wait_stopped_after_thaw();
        }
    }
}

#[cfg(test)]
mod input_tests {
    use super::*;

    #[test]
    fn new_refuses_process_ids_that_kill_would_widen() {
        for pid in [0, -1, i32::MIN] {
            for pause in [PauseMethod::Signal, PauseMethod::Freezer] {
                let err = ProcessControl::new(pid, pause, ThrottleMethod::None).unwrap_err();
                assert!(
                    matches!(err, ProcessError::BadPid { pid: p } if p == pid),
                    "{err:?}"
                );
            }
        }
    }
}

#[cfg(test)]
mod stop_timeout_tests {
    use super::*;

    fn thread(tid: Tid, state: char, wchan: Option<&str>) -> UnstoppedThread {
        UnstoppedThread {
            tid,
            name: "worker".into(),
            state,
            wchan: wchan.map(String::from),
            syscall: None,
            children: Vec::new(),
        }
    }

    fn timeout(threads: Vec<UnstoppedThread>) -> String {
        ProcessError::StopTimeout {
            pid: 10,
            waited: STOP_TIMEOUT,
            sigstops: 25,
            threads,
        }
        .to_string()
    }

    /// The message names each thread not stopped with its state, and says why where the
    /// states tell: a vfork parent and its child, else the kernel function it sleeps in; a
    /// thread that could stop but did not was continued from outside.
    #[test]
    fn a_stop_timeout_names_the_threads_not_stopped() {
        let mut parent = thread(10, 'D', Some("kernel_clone"));
        parent.children = vec![12];
        let read = thread(11, 'D', Some("nfs_wait_on_request"));
        assert_eq!(
            timeout(vec![parent, read]),
            "process 10 did not stop within 5s (SIGSTOP sent 25 times); not stopped: thread 10 \
             (worker), state D (uninterruptible sleep): a vfork parent, it cannot stop until its \
             child 12 calls exec or exits; thread 11 (worker), state D (uninterruptible sleep) \
             in nfs_wait_on_request"
        );
        assert_eq!(
            timeout(vec![thread(11, 'R', None)]),
            "process 10 did not stop within 5s (SIGSTOP sent 25 times: something kept \
             continuing it); not stopped: thread 11 (worker), state R (running)"
        );
        assert_eq!(
            timeout(Vec::new()),
            "process 10 did not stop within 5s (SIGSTOP sent 25 times: something kept \
             continuing it, or a thread stayed in an uninterruptible sleep)"
        );
        let many = (0..10).map(|t| thread(t, 'D', None)).collect();
        assert!(
            timeout(many)
                .ends_with("thread 7 (worker), state D (uninterruptible sleep) and 2 more")
        );
    }
}
