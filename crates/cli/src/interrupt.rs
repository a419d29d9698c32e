//! Ctrl-C and `SIGTERM` while `send`/`rate` work on another process: the target comes out as it
//! went in.
//!
//! [`Interrupts::install`] blocks `SIGINT`, `SIGTERM` and `SIGHUP` in the calling thread before
//! any other thread exists (so every thread inherits the block) and waits for them on a thread
//! of its own. When one arrives, that thread:
//! 1. takes the attach lock, so an injection in progress (ptrace) finishes and the target's
//!    registers are back before the process exits;
//! 2. sends `SIGCONT` to the target if this command stopped it (the final round, or the
//!    throttle's duty cycle) and was not asked to leave it stopped;
//! 3. exits with 128 + the signal number. The userfaultfd closes with the process, which ends
//!    the tracking in the kernel; the target holds no fd of ours.

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
use nix::unistd::Pid;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shared between the command and its signal thread.
#[derive(Debug, Default)]
pub struct TargetState {
    /// Held while ptrace is attached to the target.
    attach: Mutex<()>,
    /// This command may have the target stopped (paused or throttled).
    stopped_by_us: AtomicBool,
    /// Leave the target stopped whatever happens (`--then stop` succeeded).
    keep_stopped: AtomicBool,
    /// The target was already stopped when this command started: never continue it.
    was_stopped: AtomicBool,
}

impl TargetState {
    /// Hold while attaching.
    pub fn attaching(&self) -> MutexGuard<'_, ()> {
        self.attach.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Record that the target may be stopped by this command from now on (or not any more).
    pub fn set_stopped_by_us(&self, v: bool) {
        self.stopped_by_us.store(v, Ordering::SeqCst);
    }
    /// The target was stopped (state `T`) before this command: it stays stopped.
    pub fn set_was_stopped(&self) {
        self.was_stopped.store(true, Ordering::SeqCst);
    }
    /// The target is to stay stopped.
    pub fn keep_stopped(&self) {
        self.keep_stopped.store(true, Ordering::SeqCst);
    }
}

/// The installed handler (see the module docs).
#[derive(Debug, Clone)]
pub struct Interrupts {
    state: Arc<TargetState>,
}

impl Interrupts {
    /// Blocks the termination signals and starts the thread that handles them for target
    /// `pid`. Call before starting any other thread.
    pub fn install(pid: i32) -> anyhow::Result<Interrupts> {
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        let state = Arc::new(TargetState::default());
        let s = state.clone();
        std::thread::Builder::new()
            .name("precopy-signals".into())
            .spawn(move || {
                let Ok(sig) = set.wait() else { return };
                let _attach = s.attaching();
                let stopped = s.stopped_by_us.load(Ordering::SeqCst);
                let was = s.was_stopped.load(Ordering::SeqCst);
                let keep = was || s.keep_stopped.load(Ordering::SeqCst);
                if stopped && !keep {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                }
                eprintln!(
                    "precopy: interrupted by {sig}: process {pid} left {}",
                    if was || (stopped && keep) {
                        "stopped"
                    } else {
                        "running"
                    }
                );
                std::process::exit(128 + sig as i32);
            })?;
        Ok(Interrupts { state })
    }

    /// The state the command updates.
    pub fn state(&self) -> &Arc<TargetState> {
        &self.state
    }
}
