//! Ctrl-C, `SIGTERM` and `SIGHUP` while a command runs: the target comes out as it went in, and
//! the command still reports once, like any failure.
//!
//! [`Interrupts::install`] blocks `SIGINT`, `SIGTERM` and `SIGHUP` in the calling thread before
//! any other thread exists (so every thread inherits the block) and waits for them on a thread
//! of its own. When one arrives, that thread:
//! 1. cancels an attach that waits for the target's thread to stop (a thread in an
//!    uninterruptible sleep is waited for up to 5 s: `Uffd::attach_cancellable` gives up
//!    within a fraction of a millisecond, the thread untouched) and takes the attach lock, so
//!    an injection in progress (ptrace, milliseconds) finishes and the target's registers are
//!    back before the process exits;
//! 2. sends `SIGCONT` to the target if this command stopped it (the final round, or the
//!    throttle's duty cycle) and was not asked to leave it stopped, once a pause that raised
//!    the target's threads has put them back (it holds [`TargetState::set_raise_lock`]'s lock
//!    for the few milliseconds that takes);
//! 3. kills the child processes the command registered (`demo`'s source and destination,
//!    which may be stopped) and removes the files it registered (`demo`'s private directory, with the
//!    destination's Unix socket);
//! 4. reports the interruption as an error: one line on stderr and, with `--json`, the one
//!    JSON object with `"ok": false`, the error, `"interrupted"` (the signal's name) and the
//!    report as far as it got ([`TargetState::update_report`], [`TargetState::set_partial`];
//!    without `--json`, the text report so far on stdout, [`TargetState::set_partial_text`]);
//!    An image the command writes is withdrawn first ([`TargetState::set_publish_gate`]); if
//!    it was already published, the signal changes nothing and the command reports success.
//! 5. exits with 128 + the signal number. The userfaultfd closes with the process, which ends
//!    the tracking in the kernel; the target holds no fd of ours.
//!
//! The interruption is the command's one report: a failure the command itself meets meanwhile
//! (the cancelled attach's error, say) waits for this thread's decision and is not printed
//! when it reports ([`defer_to_signal`]); a failure the command began to print before the
//! signal came is the one report (its status too): this thread then cleans up without a word,
//! and only a second signal ends the command (at once, silently).
//!
//! Child processes inherit the blocked set across `exec`; `main` unblocks it first thing, so
//! this binary's own children (`__demo-source`, ...) still die of these signals.
//!
//! `SIGINT` and `SIGTERM` end a command even when it was started with them ignored (a script's
//! background job ignores `SIGINT`); `SIGHUP` ignored by `nohup` stays ignored
//! ([`unblock_inherited`]).

use crate::output;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
use nix::unistd::Pid;
use precopy_transfer::PublishGate;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Who says what ended the command: the signal thread or the command's own failure (see the
/// module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reporter {
    /// Nobody yet.
    Nobody,
    /// A signal came; its thread is deciding whether it ends the command (it does not when
    /// the image was published already).
    Deciding,
    /// The signal thread reports and exits the process.
    Signal,
    /// The signal came after the image was published: the command reports as it would have.
    Declined,
    /// The command reports its own failure.
    Command,
}

static REPORTER: Mutex<Reporter> = Mutex::new(Reporter::Nobody);
static DECIDED: Condvar = Condvar::new();
/// The longest a failure waits for the signal thread's decision: that thread's waits (the
/// attach, once cancelled; a raised pause putting threads back) take milliseconds, so this
/// is only a bound against a second error line turning into a hang.
const DECISION_BOUND: Duration = Duration::from_secs(10);

/// Called by a failure before it is printed: returns at once when no signal came (the
/// failure is then the one report, and a signal after it is handled without a word); waits
/// while the signal thread decides; never returns when it reports the signal (it exits the
/// process), so that one error chain is printed, not two.
pub fn defer_to_signal() {
    let mut who = lock(&REPORTER);
    let until = Instant::now() + DECISION_BOUND;
    while *who == Reporter::Deciding {
        let now = Instant::now();
        if now >= until {
            break;
        }
        who = DECIDED
            .wait_timeout(who, until - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    match *who {
        Reporter::Signal => {
            drop(who);
            loop {
                std::thread::park();
            }
        }
        Reporter::Nobody => *who = Reporter::Command,
        _ => {}
    }
}

/// The signal thread's side of [`defer_to_signal`]: `Deciding` when the signal comes, then
/// `Signal` or `Declined`. Returns whether the command had already reported its failure
/// (then nothing changes).
fn signal_reporter(to: Reporter) -> bool {
    let mut who = lock(&REPORTER);
    let command = *who == Reporter::Command;
    if !command {
        *who = to;
        DECIDED.notify_all();
    }
    command
}

/// The signals handled here: `SIGINT`, `SIGTERM`, and `SIGHUP` unless this process was
/// started with it ignored (`nohup`: the user asked that a hang-up not end the command). Read
/// from `SigIgn` in `/proc/self/status` (proc(5)); if that cannot be read, `SIGHUP` is handled.
fn termination_signals() -> SigSet {
    let ignored = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .map(|s| s.sigign)
        .unwrap_or(0);
    let mut set = SigSet::empty();
    for s in TERMINATION {
        // Bit n - 1 of the mask stands for signal n.
        if s != Signal::SIGHUP || ignored & (1u64 << (s as i32 - 1)) == 0 {
            set.add(s);
        }
    }
    set
}

const TERMINATION: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Undoes what a parent passed on (see the module docs): a block of the termination signals
/// (`demo` blocks them for its children), and `SIGINT` or `SIGTERM` ignored. A shell starts a
/// script's background job (`precopy send ... &`) with `SIGINT` ignored; left so, a `kill -INT`
/// that came before [`Interrupts::install`] would be dropped and one after it would end the
/// command: the outcome would depend on timing. So both always end a command (cleanly once the
/// handler runs). `SIGHUP` ignored by `nohup` stays ignored.
pub fn unblock_inherited() {
    for s in [Signal::SIGINT, Signal::SIGTERM] {
        let _ = precopy_sys::process::unignore_signal(s as i32);
    }
    let set = TERMINATION.into_iter().collect::<SigSet>();
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
}

type Partial = Box<dyn Fn() -> Value + Send>;
type PartialText = Box<dyn Fn() -> String + Send>;

/// Shared between the command and its signal thread.
#[derive(Default)]
pub struct TargetState {
    /// Held while ptrace is attached to the target.
    attach: Mutex<()>,
    /// Set when a signal comes: an attach waiting for the target's thread to stop gives up.
    cancel_attach: AtomicBool,
    /// Held by a pause while the target's threads are raised (`ProcessControl::raise_lock`).
    raise: Mutex<Option<Arc<Mutex<()>>>>,
    /// This command may have the target stopped (paused or throttled).
    stopped_by_us: AtomicBool,
    /// Leave the target stopped whatever happens (`--then stop` succeeded).
    keep_stopped: AtomicBool,
    /// The target was stopped by someone else when this command last took hold of it (before
    /// it began, or before a pause): never continue it.
    stopped_by_others: AtomicBool,
    /// The report so far.
    report: Mutex<Value>,
    /// More of the report, computed when a signal comes.
    partial: Mutex<Option<Partial>>,
    /// Without `--json`: the text report so far, printed to stdout when a signal comes.
    partial_text: Mutex<Option<PartialText>>,
    /// Child processes to kill.
    children: Mutex<Vec<i32>>,
    /// Files to remove.
    files: Mutex<Vec<PathBuf>>,
    /// Files to remove if they are empty then (a reserved image not yet started).
    empty_files: Mutex<Vec<PathBuf>>,
    /// The image this command writes: a signal withdraws it unless it was published already.
    gate: Mutex<Option<Arc<PublishGate>>>,
}

impl std::fmt::Debug for TargetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetState").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TargetState {
    /// Hold while attaching.
    pub fn attaching(&self) -> MutexGuard<'_, ()> {
        lock(&self.attach)
    }
    /// The flag to attach with (`Uffd::attach_cancellable`): set when a signal comes.
    pub fn attach_cancel(&self) -> &AtomicBool {
        &self.cancel_attach
    }
    /// The lock a pause holds while the target's threads are raised: the target is
    /// continued only when it is free.
    pub fn set_raise_lock(&self, l: Arc<Mutex<()>>) {
        *lock(&self.raise) = Some(l);
    }
    /// Record that the target may be stopped by this command from now on (or not any more).
    pub fn set_stopped_by_us(&self, v: bool) {
        self.stopped_by_us.store(v, Ordering::SeqCst);
    }
    /// Whether the target is stopped (state `T`) by someone else, as this command last saw
    /// it before taking hold of it: then it stays stopped.
    pub fn set_stopped_by_others(&self, stopped: bool) {
        self.stopped_by_others.store(stopped, Ordering::SeqCst);
    }
    /// The target is to stay stopped.
    pub fn keep_stopped(&self) {
        self.keep_stopped.store(true, Ordering::SeqCst);
    }
    /// Replaces the report an interruption prints.
    pub fn set_report(&self, report: &Value) {
        *lock(&self.report) = report.clone();
    }
    /// Changes the report an interruption prints.
    pub fn update_report(&self, f: impl FnOnce(&mut Value)) {
        f(&mut lock(&self.report));
    }
    /// Fields computed when a signal comes, added to the report (e.g. the progress so far).
    pub fn set_partial(&self, f: impl Fn() -> Value + Send + 'static) {
        *lock(&self.partial) = Some(Box::new(f));
    }
    /// Without `--json`, the text report so far, printed to stdout when a signal comes
    /// (before the error line).
    pub fn set_partial_text(&self, f: impl Fn() -> String + Send + 'static) {
        *lock(&self.partial_text) = Some(Box::new(f));
    }
    /// A child process to kill on a signal.
    pub fn add_child(&self, pid: i32) {
        lock(&self.children).push(pid);
    }
    /// The gate of the image this command writes: a signal that comes after the image was
    /// published (renamed into place) changes nothing, the command ends as it would have;
    /// one before withdraws it, so the earlier file at its path stays.
    pub fn set_publish_gate(&self, gate: Arc<PublishGate>) {
        *lock(&self.gate) = Some(gate);
    }
    /// A file to remove on a signal, or a directory of this command's own, removed with
    /// everything in it.
    pub fn add_file(&self, path: PathBuf) {
        lock(&self.files).push(path);
    }
    /// A file to remove on a signal if it is empty then (and a regular file).
    pub fn add_file_if_empty(&self, path: PathBuf) {
        lock(&self.empty_files).push(path);
    }
}

/// The installed handler (see the module docs).
#[derive(Debug, Clone)]
pub struct Interrupts {
    state: Arc<TargetState>,
}

impl Interrupts {
    /// Blocks the termination signals and starts the thread that handles them for target
    /// `pid` (`None`: a command with no target). Call before starting any other thread.
    pub fn install(pid: Option<i32>, json: bool) -> anyhow::Result<Interrupts> {
        let set = termination_signals();
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        let state = Arc::new(TargetState::default());
        let s = state.clone();
        std::thread::Builder::new()
            .name("precopy-signals".into())
            .spawn(move || {
                let Ok(sig) = set.wait() else { return };
                let quiet = signal_reporter(Reporter::Deciding);
                // An attach waiting for a thread to stop (up to 5 s) gives up; one injecting
                // finishes (milliseconds) before the lock is free.
                s.cancel_attach.store(true, Ordering::Release);
                let _attach = s.attaching();
                // Never continue a raised thread: wait until a pause put them back, and keep
                // the lock until the exit, so that no pause raises again.
                let raise = lock(&s.raise).clone();
                let _raised = raise.as_ref().map(|l| lock(l));
                // The image is published: the command's result is final and it reports it
                // (one report, the one that matches what is on disk).
                if let Some(gate) = lock(&s.gate).clone()
                    && !gate.withdraw()
                {
                    signal_reporter(Reporter::Declined);
                    return;
                }
                signal_reporter(Reporter::Signal);
                let mut what = format!("interrupted by {sig}");
                if let Some(pid) = pid {
                    let stopped = s.stopped_by_us.load(Ordering::SeqCst);
                    let was = s.stopped_by_others.load(Ordering::SeqCst);
                    let keep = was || s.keep_stopped.load(Ordering::SeqCst);
                    if stopped && !keep {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                    }
                    let left = if was || (stopped && keep) {
                        "stopped"
                    } else {
                        "running"
                    };
                    what.push_str(&format!(": process {pid} left {left}"));
                }
                for &child in lock(&s.children).iter() {
                    let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
                }
                for f in lock(&s.empty_files).iter() {
                    if std::fs::symlink_metadata(f).is_ok_and(|m| m.is_file() && m.len() == 0) {
                        let _ = std::fs::remove_file(f);
                    }
                }
                for f in lock(&s.files).iter() {
                    let _ = if f.is_dir() {
                        std::fs::remove_dir_all(f)
                    } else {
                        std::fs::remove_file(f)
                    };
                }
                let e = anyhow::anyhow!("{what}");
                if quiet {
                    // The command reported its failure and is on its way out with its own
                    // status and report; a second signal ends it at once, without a word.
                    drop((_raised, _attach));
                    let _ = set.wait();
                    std::process::exit(128 + sig as i32);
                }
                if !json && let Some(text) = lock(&s.partial_text).as_ref().map(|f| f()) {
                    // Stdout gone: the exit status still says what happened.
                    let _ = output::try_write(format_args!("{text}"), false);
                }
                output::print_error_now(&e);
                if json {
                    let mut report = lock(&s.report).clone();
                    if !report.is_object() {
                        report = json!({});
                    }
                    if let Some(extra) = lock(&s.partial).as_ref().map(|f| f())
                        && let (Some(r), Value::Object(m)) = (report.as_object_mut(), extra)
                    {
                        r.extend(m);
                    }
                    report["interrupted"] = json!(sig.as_str());
                    output::print_json(report, Some(&e));
                }
                std::process::exit(128 + sig as i32);
            })?;
        Ok(Interrupts { state })
    }

    /// The state the command updates.
    pub fn state(&self) -> &Arc<TargetState> {
        &self.state
    }
}
