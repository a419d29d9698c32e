//! A process paused with the cgroup freezer stays stopped when its `ProcessControl` is dropped:
//! leaving the freezer cgroup thaws it, and the hand-over to `SIGSTOP` must stop every thread
//! before any runs its own code again.
//!
//! The target's writers sleep 20 µs between writes, so each is frozen in its sleep: thawed, it
//! goes back to that sleep and, when the sleep ends, returns to its code unless a signal is
//! pending on it. With only a `SIGSTOP` to the process (flagged on one thread, which starts
//! the group stop only once it runs) writers wrote after the drop in 4 of 10 freezes at load
//! 7 (demo: "the source did not stay frozen after the commit"). Each of 40 freezes here
//! compares the writers' records read while frozen with the records once every thread is
//! seen stopped after the drop: they must be equal. Needs root and the cgroup v1 freezer
//! (what `PauseMethod::Freezer` uses); SKIPs loudly otherwise.

mod common;

use common::{fixture, freezer_unavailable, spawn_announced, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use precopy_migrate::{PauseMethod, ProcessControl, ThrottleMethod, Workload, all_stopped};
use std::process::Command;

const FREEZES: usize = 40;

#[test]
fn a_process_frozen_then_released_stays_stopped_without_writing() {
    if let Some(why) = freezer_unavailable() {
        eprintln!("SKIP a_process_frozen_then_released_stays_stopped_without_writing: {why}");
        return;
    }
    let (target, line) = spawn_announced(Command::new(fixture("sleeping_writers")));
    let pid = target.0.id() as i32;
    let mut words = line.split_whitespace();
    let addr = u64::from_str_radix(words.next().unwrap(), 16).unwrap();
    let len = words.next().unwrap().parse::<usize>().unwrap() * 8;
    let records = || precopy_sys::process::read_proc_mem(pid, addr, len).unwrap();

    let mut wrote_after_release = 0;
    for _ in 0..FREEZES {
        // Running: the writers make progress.
        let before = records();
        wait_until("the writers to write", || records() != before);

        let mut control = ProcessControl::new(pid, PauseMethod::Freezer, ThrottleMethod::None)
            .expect("a freezer cgroup for the target");
        control.pause().expect("freezing the target");
        let frozen = records();
        drop(control);
        wait_until("every thread to be stopped after the drop", || {
            all_stopped(pid)
        });
        if records() != frozen {
            wrote_after_release += 1;
        }
        kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
    }
    assert_eq!(
        wrote_after_release, 0,
        "the writers wrote after the control let go of the frozen process in \
         {wrote_after_release} of {FREEZES} freezes"
    );
}
