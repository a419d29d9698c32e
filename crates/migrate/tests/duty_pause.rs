//! The pause of a process the duty-cycle throttle (`ThrottleMethod::DutyCycle`) holds stopped
//! must not let it run: the cycle used to end with its own `SIGCONT` and only then the pause
//! sent its stop (or froze it), so the process ran unthrottled in between.
//!
//! The target counts as fast as it can in a word of its memory. At a throttle of 0.9 the cycle
//! stops it for 90 ms of every 100. Each round waits until the count stands still (the cycle's
//! stop took hold), pauses, and compares the count read before the pause with the count once
//! the pause returned: they must be equal. A round counts only if the pause returned within
//! 45 ms of the last time the count was seen moving, so that it began inside the cycle's
//! stopped half, before the cycle's own next `SIGCONT` (90 ms after its `SIGSTOP`, which came
//! after that last move); a round that a loaded machine made slower is run again, and the test
//! says how many counted. After each pause the resume must let it count again, and a control
//! dropped while paused (`--then stop`) must leave it stopped. Both pause methods; the freezer
//! needs root and the cgroup v1 freezer, and is SKIPped loudly without them.

mod common;

use common::{Killed, fixture, freezer_unavailable, spawn_announced, wait_until};
use precopy_migrate::{PauseMethod, ProcessControl, ThrottleMethod, Workload, all_stopped};
use std::process::Command;
use std::time::{Duration, Instant};

/// Rounds that must count.
const PAUSES: usize = 20;
/// Rounds tried at most.
const ATTEMPTS: usize = 200;
/// Half the cycle's stopped half at a throttle of 0.9.
const WITHIN: Duration = Duration::from_millis(45);

struct Spinner {
    target: Killed,
    addr: u64,
}

impl Spinner {
    fn start() -> Spinner {
        let (target, line) = spawn_announced(Command::new(fixture("counting_spinner")));
        Spinner {
            target,
            addr: u64::from_str_radix(line.trim(), 16).unwrap(),
        }
    }

    fn pid(&self) -> i32 {
        self.target.0.id() as i32
    }

    fn count(&self) -> u64 {
        let raw = precopy_sys::process::read_proc_mem(self.pid(), self.addr, 8).unwrap();
        u64::from_ne_bytes(raw.try_into().unwrap())
    }
}

/// Waits until the duty cycle has the spinner stopped; returns the count it stands at and a
/// time before which the cycle's `SIGSTOP` cannot have been sent: the start of the last read
/// after which it still counted (a stop sent to a thread on a CPU takes hold within
/// microseconds; one waiting for a CPU stops it before it counts again).
fn wait_for_the_cycles_stop(s: &Spinner) -> (Instant, u64) {
    let read = || (Instant::now(), s.count());
    let start = Instant::now();
    let mut last = read();
    let mut moved = None;
    loop {
        std::thread::sleep(Duration::from_micros(200));
        let now = read();
        if now.1 != last.1 {
            moved = Some(last.0);
        } else if let Some(moved) = moved
            && all_stopped(s.pid())
            && s.count() == now.1
        {
            return (moved, now.1);
        }
        // A stopped half under way when the wait began is not waited out: the stop's time is
        // known only from a move seen.
        last = now;
        // Bounded only against a hang.
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waiting for the duty cycle to stop the spinner"
        );
    }
}

/// Pauses the duty-cycled spinner within its stopped half until [`PAUSES`] rounds counted;
/// returns how many let it count after the pause began, and how many counted.
fn pauses_that_let_it_run(
    s: &Spinner,
    control: &mut ProcessControl,
    pause: PauseMethod,
) -> (usize, usize) {
    let (mut ran, mut counted) = (0, 0);
    for _ in 0..ATTEMPTS {
        let (moved, before) = wait_for_the_cycles_stop(s);
        control.pause().expect("pausing the duty-cycled spinner");
        let in_time = moved.elapsed() < WITHIN;
        let after = s.count();
        // A frozen thread is not in the stopped state: the freezer's pause returned once
        // `freezer.state` read `FROZEN`.
        assert!(
            pause == PauseMethod::Freezer || all_stopped(s.pid()),
            "the pause returned with it running"
        );
        if in_time {
            counted += 1;
            if after != before {
                ran += 1;
            }
        }
        control.resume().expect("resuming the spinner");
        let resumed = s.count();
        wait_until("the resumed spinner to count", || s.count() != resumed);
        if counted == PAUSES {
            break;
        }
    }
    (ran, counted)
}

fn check(pause: PauseMethod) {
    let s = Spinner::start();
    let mut control =
        ProcessControl::new(s.pid(), pause, ThrottleMethod::DutyCycle).expect("control");
    control.set_throttle(0.9).expect("the duty cycle");
    let (ran, counted) = pauses_that_let_it_run(&s, &mut control, pause);
    eprintln!("{pause:?}: {counted} pauses began inside the duty cycle's stopped half");
    if counted == 0 {
        eprintln!(
            "SKIP {pause:?}: no pause of {ATTEMPTS} returned within {WITHIN:?} of the spinner's \
             last move (the machine too loaded to tell)"
        );
    }
    assert_eq!(
        ran, 0,
        "{pause:?}: the spinner counted after the pause began in {ran} of {counted} pauses"
    );

    // `--then stop`: a control dropped while paused leaves it stopped, not counting.
    wait_for_the_cycles_stop(&s);
    control.pause().unwrap();
    drop(control);
    let before = s.count();
    std::thread::sleep(Duration::from_millis(150));
    assert!(all_stopped(s.pid()), "the dropped control let it run");
    assert_eq!(
        s.count(),
        before,
        "it counted after its control was dropped"
    );
}

#[test]
fn a_duty_cycled_process_does_not_run_after_its_signal_pause_began() {
    check(PauseMethod::Signal);
}

#[test]
fn a_duty_cycled_process_does_not_run_after_its_freezer_pause_began() {
    const TEST: &str = "a_duty_cycled_process_does_not_run_after_its_freezer_pause_began";
    if let Some(why) = freezer_unavailable() {
        eprintln!("SKIP {TEST}: {why}");
        return;
    }
    check(PauseMethod::Freezer);
}
