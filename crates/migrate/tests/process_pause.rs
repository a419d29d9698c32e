//! `ProcessControl`'s pause against a `SIGCONT` from outside that lands before the stop took
//! hold: the pause must stop the process again, not wait out its bound and fail.
//!
//! The race is made certain rather than hoped for: the target's only thread waits in `vfork(2)`
//! (an uninterruptible sleep), so the pause's `SIGSTOP` stays pending; the test then sends
//! `SIGCONT`, which makes the kernel discard that pending `SIGSTOP`, and only then lets the
//! vfork child exit, so the target runs on as if it had never been asked to stop.
//!
//! The same fixture with a second, spinning thread shows that the pause tells every thread to
//! stop, not only the one the kernel picks for a stop sent to the process.

mod common;

use common::{VforkWait, state, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use precopy_migrate::{
    PauseMethod, ProcessControl, ProcessError, ThrottleMethod, Workload, all_stopped,
};

/// The state letter of thread `tid` of `pid` (`/proc/PID/task/TID/stat`).
fn thread_state(pid: i32, tid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .unwrap_or('?')
}

/// Whether `SIGSTOP` is in the signal set `field` of the status file `path`.
fn sigstop_in(path: &str, field: &str) -> bool {
    let status = std::fs::read_to_string(path).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (Signal::SIGSTOP as i32 - 1)) != 0)
}

/// Whether `SIGSTOP` is pending for the whole process (`ShdPnd` in `/proc/PID/status`).
fn sigstop_pending(pid: i32) -> bool {
    sigstop_in(&format!("/proc/{pid}/status"), "ShdPnd:")
}

#[test]
fn a_sigcont_landing_as_the_pause_stops_the_process_is_followed_by_another_stop() {
    // In vfork, waiting for its child: an uninterruptible sleep.
    let target = VforkWait::start(false, true);
    let pid = target.pid();

    let mut control = ProcessControl::new(pid, PauseMethod::Signal, ThrottleMethod::None).unwrap();
    let pause = std::thread::spawn(move || {
        let r = control.pause();
        (control, r)
    });
    wait_until("the pause's SIGSTOP to be pending", || sigstop_pending(pid));
    // Someone else continues the process: the pending SIGSTOP is discarded.
    kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
    // The vfork child exits (it reads one byte), and the target runs on, spinning.
    target.release();

    let (mut control, result) = pause.join().unwrap();
    if let Err(e) = &result {
        panic!("the pause failed instead of stopping the process again: {e}");
    }
    assert!(
        all_stopped(pid),
        "the pause returned with the process running (state {})",
        state(pid)
    );
    control.resume().unwrap();
    wait_until("the resumed target to run", || !all_stopped(pid));
}

/// The pause tells every thread to stop, not only the one the kernel picks for a stop sent to
/// the process: there the main thread, which waits in `vfork` and cannot act on it, so a
/// spinning writer beside it would run on until the main thread could. The spinner must stop
/// while the main thread still waits; the pause returns once both have stopped.
#[test]
fn the_pause_stops_a_running_thread_while_the_main_thread_cannot_act_on_the_stop() {
    let target = VforkWait::start(true, true);
    let pid = target.pid();
    let spinner = target.spinner();

    let mut control = ProcessControl::new(pid, PauseMethod::Signal, ThrottleMethod::None).unwrap();
    let pause = std::thread::spawn(move || {
        let r = control.pause();
        (control, r)
    });
    // Bounded only against a hang: told only through the process, the spinner never stops
    // while the main thread waits.
    wait_until("the spinning thread to stop", || {
        thread_state(pid, spinner) == 'T'
    });
    assert_eq!(state(pid), 'D', "the main thread left vfork early");
    // The vfork child exits; the main thread acts on its stop.
    target.release();
    let (mut control, result) = pause.join().unwrap();
    if let Err(e) = &result {
        panic!("the pause failed: {e}");
    }
    assert!(all_stopped(pid), "the pause returned with a thread running");
    control.resume().unwrap();
    wait_until("the resumed target to run", || !all_stopped(pid));
}

/// Whether `SIGSTOP` is pending on thread `tid` of `pid` (`SigPnd` in its status).
fn thread_sigstop_pending(pid: i32, tid: i32) -> bool {
    sigstop_in(&format!("/proc/{pid}/task/{tid}/status"), "SigPnd:")
}

/// A pause that cannot stop a thread (the main thread waits in `vfork` while a second one
/// runs) gives up after its bound naming that thread, its state and why (a vfork parent and
/// its child), not the thread that stopped; and it leaves the process as it was: the other
/// thread running again, no `SIGSTOP` pending, the main thread still in `vfork`, running on
/// once its child exits. Before 2026-12-01 the error said only "did not stop ... (SIGSTOP
/// sent 25 times ...)" (the fresh review's `send` of such a process).
#[test]
fn a_pause_that_cannot_stop_a_thread_names_it() {
    let target = VforkWait::start(true, true);
    let pid = target.pid();
    let spinner = target.spinner();
    let child: i32 = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .trim()
        .parse()
        .expect("the vfork child");

    let mut control = ProcessControl::new(pid, PauseMethod::Signal, ThrottleMethod::None).unwrap();
    let err = control.pause().expect_err("a thread in vfork cannot stop");
    let ProcessError::StopTimeout { threads, .. } = &err else {
        panic!("expected StopTimeout, got {err:?}");
    };
    let named: Vec<i32> = threads.iter().map(|t| t.tid).collect();
    assert_eq!(named, [pid], "{err}");
    assert_eq!(threads[0].state, 'D', "{err}");
    assert!(threads[0].name.contains("vfork"), "{err}");
    assert!(threads[0].in_vfork(), "{:?}", threads[0]);
    assert_eq!(threads[0].children, [child], "{err}");
    let message = err.to_string();
    for part in [
        format!(
            "not stopped: thread {pid} ({}), state D (uninterruptible sleep)",
            threads[0].name
        ),
        format!("a vfork parent, it cannot stop until its child {child} calls exec or exits"),
    ] {
        assert!(message.contains(&part), "{part:?} not in: {message}");
    }
    assert!(!message.contains(&format!("thread {spinner}")), "{message}");

    // As it was: the spinner runs, nothing is left pending, the main thread waits on.
    wait_until("the spinner to run again", || {
        thread_state(pid, spinner) != 'T'
    });
    assert!(!sigstop_pending(pid), "SIGSTOP pending on the process");
    for tid in [pid, spinner] {
        assert!(
            !thread_sigstop_pending(pid, tid),
            "SIGSTOP pending on {tid}"
        );
    }
    assert_eq!(state(pid), 'D', "the main thread left vfork early");
    target.release();
    wait_until("the main thread to run after its vfork", || {
        state(pid) == 'R'
    });
    assert!(!all_stopped(pid));
}
