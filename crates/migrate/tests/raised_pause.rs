//! `ProcessControl`'s raised pause (its module docs, "Raised pause"): called from a real-time
//! thread, the signal pause raises the target's time-sharing threads so that they stop at
//! once, and every thread comes out of it with exactly the policy it had (policy,
//! reset-on-fork flag, real-time priority and nice value), whether the pause succeeded or
//! failed; threads already real-time are never touched; threads that appear and exit meanwhile
//! are never left raised.
//!
//! The caller must be able to use `SCHED_FIFO` (root, `CAP_SYS_NICE` or an `RLIMIT_RTPRIO`):
//! where it cannot, the tests print SKIP.

mod common;

use common::{Killed, VforkWait, fixture, sigstop_pending, spawn_announced, state, wait_until};
use precopy_migrate::{
    PauseMethod, PriorityReport, ProcessControl, ProcessError, ThrottleMethod, Workload,
    all_stopped,
};
use precopy_sys::sched::{self, Raised, ThreadPolicy, Tid};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Raises the calling (test) thread to `SCHED_FIFO` 1, as the driver's final phase is; `None`
/// (after printing SKIP) where this process may not.
fn realtime_caller(test: &str) -> Option<Raised> {
    match sched::raise_threads(&[sched::gettid()], sched::SCHED_FIFO, 1) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!(
                "SKIP {test}: this process cannot use SCHED_FIFO ({e}; needs root, CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1)"
            );
            None
        }
    }
}

/// What a thread's scheduling is: its policy (reset-on-fork flag included) and real-time
/// priority, and its nice value (field 19 of `/proc/PID/task/TID/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scheduling {
    policy: ThreadPolicy,
    nice: i64,
}

/// Every live thread of `pid` and its scheduling (threads that exit while read are left out).
fn scheduling(pid: i32) -> BTreeMap<Tid, Scheduling> {
    let mut all = BTreeMap::new();
    for tid in sched::process_threads(pid).unwrap_or_default() {
        let Ok(policy) = sched::thread_policy(tid) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        // Fields from 3 (state) on: nice is field 19.
        let nice = after.split_whitespace().nth(16).unwrap().parse().unwrap();
        all.insert(tid, Scheduling { policy, nice });
    }
    all
}

/// Every thread of `pid` has the scheduling it had in `before`, and a thread that did not
/// exist then (one the fixture created since) is time-sharing (`SCHED_OTHER`).
fn assert_as_before(pid: i32, before: &BTreeMap<Tid, Scheduling>, when: &str) {
    for (tid, now) in scheduling(pid) {
        match before.get(&tid) {
            Some(b) => assert_eq!(&now, b, "{when}: thread {tid} changed"),
            None => assert_eq!(
                now.policy.base(),
                sched::SCHED_OTHER,
                "{when}: new thread {tid} is {now:?}"
            ),
        }
    }
}

/// Pause `i` from a real-time caller: the target is stopped and the pause was raised (or had
/// nothing to raise); its report.
fn raised_pause(control: &mut ProcessControl, pid: i32, i: u32) -> PriorityReport {
    control.pause().unwrap();
    assert!(
        all_stopped(pid),
        "pause {i} returned with the target running"
    );
    let report = control.pause_priority().expect("a signal pause reports");
    assert_eq!(report.not_raised, None, "pause {i}: {report:?}");
    report
}

#[test]
fn raised_pauses_leave_every_thread_with_its_own_policy() {
    let mut command = Command::new(fixture("policies"));
    command.stdin(Stdio::piped());
    let (mut target, line) = spawn_announced(command);
    let pid = target.0.id() as i32;
    assert!(line.starts_with("ready"), "fixture said {line:?}");
    let before = scheduling(pid);
    let kinds: Vec<i32> = before.values().map(|s| s.policy.base()).collect();
    for kind in [sched::SCHED_BATCH, sched::SCHED_IDLE] {
        assert!(
            kinds.contains(&kind),
            "no thread of policy {kind}: {before:?}"
        );
    }
    let realtime = before.values().filter(|s| s.policy.is_realtime()).count();
    if line.contains("rt-denied") {
        eprintln!("note: the fixture's real-time threads could not get their policy");
    } else {
        assert_eq!(realtime, 2, "{before:?}");
    }
    assert!(
        before.values().any(|s| s.nice == 5),
        "no thread at nice 5: {before:?}"
    );

    let mut control = ProcessControl::new(pid, PauseMethod::Signal, ThrottleMethod::None).unwrap();
    // From a normal thread: never raised, and the report says why.
    control.pause().unwrap();
    let report = control.pause_priority().expect("a signal pause reports");
    assert_eq!(report.threads, 0, "{report:?}");
    assert!(
        report
            .not_raised
            .as_deref()
            .is_some_and(|w| w.contains("not real-time")),
        "{report:?}"
    );
    assert_as_before(pid, &before, "paused from a normal thread");
    control.resume().unwrap();

    let Some(caller) = realtime_caller("raised_pauses_leave_every_thread_with_its_own_policy")
    else {
        return;
    };
    let mut raised_in = 0;
    for i in 0..20 {
        let report = raised_pause(&mut control, pid, i);
        assert_eq!(report.restore_error, None, "pause {i}: {report:?}");
        assert_eq!((report.policy, report.priority), ("fifo", 1), "{report:?}");
        // The main thread, the four spinners and the churner at least (the real-time ones
        // never); a thread that had stopped before its turn is not raised.
        assert!(
            report.threads <= before.len() as u32 + 1,
            "pause {i}: {report:?}"
        );
        raised_in += u32::from(report.threads > 0);
        assert_as_before(pid, &before, &format!("pause {i}, stopped"));
        control.resume().unwrap();
        assert_as_before(pid, &before, &format!("pause {i}, resumed"));
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(caller);
    // A spinner that had the CPU stops before the raise reaches it, but the sleeping main
    // thread and the time-sharing threads waiting for a CPU are raised.
    assert!(raised_in > 0, "no pause raised a thread");
    target.0.stdin.take().unwrap().write_all(b"bye\n").unwrap();
}

/// A pause that fails (the process never stops: its thread waits in `vfork`, an
/// uninterruptible sleep, so the `SIGSTOP` stays pending past the pause's 5 s bound) leaves
/// the thread it raised as it was, and the process continued: it runs on once it can.
#[test]
fn a_pause_that_fails_leaves_the_threads_as_they_were() {
    let target = VforkWait::start(false, true);
    let pid = target.pid();
    let before = scheduling(pid);
    let Some(caller) = realtime_caller("a_pause_that_fails_leaves_the_threads_as_they_were") else {
        return;
    };
    let mut control = ProcessControl::new(pid, PauseMethod::Signal, ThrottleMethod::None).unwrap();
    let err = control.pause().unwrap_err();
    assert!(matches!(err, ProcessError::StopTimeout { .. }), "{err:?}");
    drop(caller);
    let report = control.pause_priority().expect("a signal pause reports");
    assert_eq!(
        report.threads, 1,
        "the waiting thread was raised: {report:?}"
    );
    assert_eq!(report.restore_error, None, "{report:?}");
    assert_as_before(pid, &before, "after the failed pause");
    // The failed pause continued it, which discarded the SIGSTOP still pending on its thread
    // (one left pending would stop it as it leaves its vfork, with nothing to continue it).
    assert!(!sigstop_pending(pid), "SIGSTOP left pending");
    assert_eq!(state(pid), 'D', "the target left its vfork early");
    // Let it out of vfork: it runs on (spins), still as it was. Its state is looked at once it
    // has reaped its child (or has stopped): before, `R` may be followed by `S` in its
    // `waitpid` (until 2026-12-01 this test took that `S` for a stop).
    target.release();
    wait_until("the target to leave its vfork and reap its child", || {
        matches!(state(pid), 'T' | 't') || (target.child_waited() && state(pid) == 'R')
    });
    assert_eq!(
        state(pid),
        'R',
        "the target left its vfork stopped, not running (SIGSTOP pending: {})",
        sigstop_pending(pid)
    );
    assert!(!all_stopped(pid), "stopped after the vfork");
    assert_as_before(pid, &before, "running after the vfork");
}

/// A process the cgroup quota throttles can still be raised for its pause: the throttle's
/// `cpu` group gives real-time time to its threads (a new group has none, and a thread in it
/// could not be made real-time: the pause of a throttled writer waited for a CPU, up to 85 ms
/// under load). Needs a writable cgroup v1 `cpu` hierarchy with real-time group scheduling.
#[test]
fn a_throttled_process_is_raised_for_its_pause() {
    const TEST: &str = "a_throttled_process_is_raised_for_its_pause";
    if !std::path::Path::new("/sys/fs/cgroup/cpu/cpu.rt_runtime_us").exists() {
        eprintln!(
            "SKIP {TEST}: no cgroup v1 cpu hierarchy with real-time group scheduling at /sys/fs/cgroup/cpu"
        );
        return;
    }
    let target = Killed(
        Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap(),
    );
    let pid = target.0.id() as i32;
    let mut control =
        ProcessControl::new(pid, PauseMethod::Signal, ThrottleMethod::CgroupCpu).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    if let Err(e) = control.set_throttle(0.9) {
        eprintln!("SKIP {TEST}: cannot throttle with a cgroup cpu quota here ({e})");
        return;
    }
    let Some(caller) = realtime_caller(TEST) else {
        return;
    };
    // What the raised pause does to each thread it finds running.
    let raised = sched::raise_threads(&[pid], sched::SCHED_FIFO, 1);
    assert!(
        raised.is_ok(),
        "the throttled process could not be made real-time: {raised:?}"
    );
    drop(raised);
    for i in 0..5 {
        raised_pause(&mut control, pid, i);
        control.resume().unwrap();
    }
    drop(caller);
    control.set_throttle(0.0).unwrap();
}
