//! Job-control signals that reach a thread while it is attached (`precopy_sys::ptrace`), and a
//! thread that never stops for the attach.
//!
//! A `SIGSTOP` the traced thread takes during an injection is delivered there and then, so a
//! `SIGCONT` that follows it ends the stop as it would have without the attach (until
//! 2026-12-01 the stop was held back and sent again after the detach, and the target stayed
//! stopped). A thread in an uninterruptible sleep is given up after `STOP_TIMEOUT`, untouched,
//! or sooner when the attach is cancelled (Ctrl-C). A process whose memory another process
//! shares (a `vfork` child before its `exec`, its parent) is refused before anything is done.

mod common;

use common::{Killed, VforkWait, fixture, sigstop_pending, spawn_announced, state, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use precopy_sys::ptrace::{PtraceError, Tracee};
use precopy_tracker::{AttachError, Relation, Uffd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `TracerPid:` of `pid` (0: not traced).
fn tracer(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

/// The names (`comm`) of this process's child processes.
fn helper_names() -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let ppid = rest.split(' ').nth(1)?;
            (ppid == me).then(|| name.to_string())
        })
        .collect()
}

/// Seizes the spinner's only thread, has it take a `SIGSTOP` in the middle of an injected
/// `getpid()`, optionally sends `SIGCONT` while still attached, detaches; returns the target.
fn stop_during_an_injection(then_continue: bool) -> Option<Killed> {
    let (target, _) = spawn_announced(Command::new(fixture("counting_spinner")));
    let pid = target.0.id() as i32;
    let tracee = match Tracee::seize(pid) {
        Ok(t) => t,
        Err(e) if e.errno() == Some(nix::libc::EPERM) => {
            eprintln!("SKIP: no ptrace access to a child here ({e})");
            return None;
        }
        Err(e) => panic!("seize: {e}"),
    };
    let mut tracee = tracee;
    let insn = precopy_tracker::attach::find_syscall_instruction(pid).unwrap();
    // To this thread: it takes the stop itself, during the injected call.
    precopy_sys::process::signal_thread(pid, pid, nix::libc::SIGSTOP).unwrap();
    let got = tracee.syscall(insn, nix::libc::SYS_getpid, [0; 6]).unwrap();
    assert_eq!(got, i64::from(pid), "the injected getpid()");
    if then_continue {
        kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
    }
    tracee.detach().unwrap();
    assert_eq!(tracer(pid), 0, "detached");
    Some(target)
}

#[test]
fn a_stop_and_then_a_continue_during_an_attach_leave_the_target_running() {
    let Some(target) = stop_during_an_injection(true) else {
        return;
    };
    let pid = target.0.id() as i32;
    // Stopped, then continued: nothing is left to stop it. Before the fix the detach sent the
    // stop again (pending here, or already acted on: `T`).
    assert!(
        !sigstop_pending(pid) && state(pid) != 'T',
        "a SIGSTOP followed by a SIGCONT during the attach left the target {}",
        if state(pid) == 'T' {
            "stopped"
        } else {
            "with SIGSTOP pending"
        }
    );
    // And it runs (the spinner is always runnable).
    wait_until("the target to run after SIGSTOP then SIGCONT", || {
        state(pid) == 'R'
    });
}

#[test]
fn a_stop_during_an_attach_stops_the_target() {
    let Some(target) = stop_during_an_injection(false) else {
        return;
    };
    let pid = target.0.id() as i32;
    wait_until("the target to be stopped by its SIGSTOP", || {
        state(pid) == 'T'
    });
    kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
    wait_until("the target to run after SIGCONT", || state(pid) == 'R');
}

#[test]
fn an_attach_gives_up_on_a_thread_that_never_stops_and_leaves_it_untouched() {
    if !common::supported("an_attach_gives_up_on_a_thread_that_never_stops") {
        return;
    }
    // Its only thread waits in vfork for its child (which has a copy of the memory, not the
    // same memory: that would be refused): an uninterruptible sleep.
    let target = VforkWait::start(false, false);
    let pid = target.pid();

    let attach = std::thread::spawn(move || Uffd::attach(pid));
    // Meanwhile its tracer is a helper process of this one, named so that `pkill precopy`
    // meant for the caller spares it.
    wait_until("the attach's helper process", || {
        helper_names().iter().any(|n| n == "uffd-attach")
    });
    let err = attach
        .join()
        .unwrap()
        .expect_err("a thread in vfork cannot stop for the attach");
    assert!(
        matches!(
            err,
            AttachError::Ptrace {
                source: PtraceError::NotStopped { .. },
                ..
            }
        ),
        "expected NotStopped, got {err:?}"
    );
    assert!(err.to_string().contains("stopping the target"), "{err}");
    // The tracer (helper process or thread) has exited: the kernel detached the thread.
    wait_until("the target to be detached", || tracer(pid) == 0);
    assert_eq!(state(pid), 'D', "still in vfork, untouched");
    target.release();
    // The vfork child exits; the parent runs on (spins), not stopped, not traced.
    wait_until("the target to run after its vfork", || state(pid) == 'R');
    assert_eq!(tracer(pid), 0);
}

#[test]
fn an_attach_picks_a_thread_that_can_stop() {
    if !common::supported("an_attach_picks_a_thread_that_can_stop") {
        return;
    }
    let target = VforkWait::start(true, false);
    let pid = target.pid();

    // The main thread cannot stop; the spinning thread can, and runs the call.
    let (uffd, times) = Uffd::attach(pid).unwrap();
    assert_ne!(times.tid, pid, "the attach used the main thread, in vfork");
    // The process is still reached through its PID: the spinner could exit, the process not.
    assert_eq!(times.target, pid);
    assert_eq!(uffd.pid(), pid);
    assert_eq!(tracer(pid), 0);
    target.release();
    wait_until("the main thread to run after its vfork", || {
        state(pid) == 'R'
    });
}

/// An attach cancelled while it waits for a thread that cannot stop (Ctrl-C in `send`) gives
/// up without waiting out `STOP_TIMEOUT`, the thread untouched: detached, still in `vfork`,
/// running on once its child exits. Meanwhile the attach's helper process shares this
/// process's memory (`clone(CLONE_VM)`), and the check for processes that share the target's
/// memory does not take it for one.
#[test]
fn a_cancelled_attach_gives_up_and_leaves_the_thread_untouched() {
    if !common::supported("a_cancelled_attach_gives_up_and_leaves_the_thread_untouched") {
        return;
    }
    let target = VforkWait::start(false, false);
    let pid = target.pid();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let attach = std::thread::spawn(move || Uffd::attach_cancellable(pid, &flag));
    wait_until("the attach's helper process", || {
        helper_names().iter().any(|n| n == "uffd-attach")
    });
    // The helper shares this process's memory, not the target's.
    let me = std::process::id() as i32;
    let ours = precopy_tracker::memory_sharers(me, me).expect("kcmp");
    assert!(ours.iter().any(|s| s.name == "uffd-attach"), "{ours:?}");
    assert_eq!(precopy_tracker::memory_sharers(pid, pid), Some(Vec::new()));
    precopy_tracker::check_attachable(pid).expect("the target shares its memory with no one");

    cancel.store(true, Ordering::Release);
    let err = attach.join().unwrap().expect_err("cancelled");
    assert!(
        matches!(err, AttachError::Cancelled { pid: p, tid } if p == pid && tid == pid),
        "expected Cancelled, got {err:?}"
    );
    assert!(err.to_string().contains("left untouched"), "{err}");
    wait_until("the target to be detached", || tracer(pid) == 0);
    assert_eq!(state(pid), 'D', "still in vfork, untouched");
    assert!(!sigstop_pending(pid));
    target.release();
    wait_until("the target to run after its vfork", || state(pid) == 'R');
    assert_eq!(tracer(pid), 0);
}

/// A process whose memory another process shares is refused before anything is done to it:
/// a `vfork` child before its `exec` (its parent's other threads could write that memory while
/// the child is stopped: every final round failed "the workload kept writing while paused"),
/// and its parent (the child could write it). Both are left as they were.
#[test]
fn an_attach_refuses_a_process_whose_memory_another_shares() {
    if !common::supported("an_attach_refuses_a_process_whose_memory_another_shares") {
        return;
    }
    let target = VforkWait::start(true, true);
    let (parent, child) = (target.pid(), target.child());
    let child_state = state(child);
    for (pid, other, relation) in [
        (child, parent, Relation::Parent),
        (parent, child, Relation::Child),
    ] {
        let err = Uffd::attach(pid).expect_err("shared memory");
        let AttachError::SharedMemory { pid: p, sharers } = &err else {
            panic!("expected SharedMemory, got {err:?}");
        };
        assert_eq!(*p, pid);
        assert_eq!(sharers.len(), 1, "{err}");
        assert_eq!((sharers[0].pid, sharers[0].relation), (other, relation));
        let message = err.to_string();
        assert!(
            message.contains(&format!(
                "process {pid} shares its memory with process {other} ("
            )),
            "{message}"
        );
        assert!(
            message.contains(&format!("stopping process {pid} alone cannot stop")),
            "{message}"
        );
        assert!(matches!(
            precopy_tracker::check_attachable(pid),
            Err(AttachError::SharedMemory { .. })
        ));
        assert_eq!(tracer(pid), 0);
        assert!(!sigstop_pending(pid));
    }
    assert_eq!(state(parent), 'D', "the parent still waits in vfork");
    assert_eq!(
        state(child),
        child_state,
        "the child still waits for its byte"
    );
    target.release();
    wait_until("the parent to run after its vfork", || state(parent) == 'R');
}

/// `SigCgt:` and `SigIgn:` of `pid` (bit `n - 1` is signal `n`).
fn dispositions(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(0)
    };
    (field("SigCgt:"), field("SigIgn:"))
}

/// An attach leaves a target's `SIGTRAP` handler, or its ignoring `SIGTRAP`, in place: a
/// single-stepped injection (until 2026-12-01) made the kernel reset it to the default, and
/// the next `SIGTRAP` killed the process.
#[test]
fn an_attach_leaves_the_targets_sigtrap_disposition() {
    if !common::supported("an_attach_leaves_the_targets_sigtrap_disposition") {
        return;
    }
    let trap = 1u64 << (Signal::SIGTRAP as i32 - 1);
    for mode in ["catch", "ignore"] {
        let mut cmd = Command::new(fixture("trap_disposition"));
        cmd.arg(mode);
        let (mut target, ready) = spawn_announced(cmd);
        assert_eq!(ready.trim(), "ready");
        let pid = target.0.id() as i32;
        let before = dispositions(pid);
        assert_ne!(
            (if mode == "catch" { before.0 } else { before.1 }) & trap,
            0,
            "{mode}: the fixture's SIGTRAP disposition"
        );
        let (_uffd, _) = Uffd::attach(pid).unwrap();
        assert_eq!(
            dispositions(pid),
            before,
            "{mode}: SigCgt/SigIgn changed by the attach"
        );
        kill(Pid::from_raw(pid), Signal::SIGTRAP).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            target.0.try_wait().unwrap().is_none(),
            "{mode}: the target died of a SIGTRAP it was set to {mode}"
        );
    }
}
