//! Attaching to running processes the engine did not start (`Uffd::attach`): the target comes
//! back exactly as it went in, and the adopted fd tracks its memory.

mod common;

use common::target::{Lang, Target, engine_usable, state};
use precopy_migrate::{DirtyLog, TargetError, TargetLog};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::{AttachError, Tracker, Uffd};
use std::time::Duration;

/// Waits until the writers run and every thread has finished starting (a thread being created
/// briefly has all signals blocked, which a snapshot would otherwise catch).
fn wait_ops(t: &mut Target) {
    let start = t.ops();
    while t.ops() == start {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut last = state(t.pid);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = state(t.pid);
        if now == last {
            return;
        }
        last = now;
    }
}

/// The target's writers still write: its operation count moves within 10 s (a loaded machine
/// may give them no CPU for a while; stopped writers never move it).
fn assert_writers_run(t: &mut Target) {
    let start = t.ops();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.ops() == start {
        assert!(
            std::time::Instant::now() < deadline,
            "the writers stopped: {start} operations, no more in 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn attach_many_times(lang: Lang) {
    if !engine_usable() {
        return;
    }
    let mut t = Target::start(lang, 4, 256, 0);
    wait_ops(&mut t);
    // A blocked signal that stays pending through every attach.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.pid),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let before = state(t.pid);
    assert!(
        before.shared_pending != "0000000000000000",
        "SIGUSR2 should be pending: {before:?}"
    );
    for i in 0..20 {
        let (uffd, times) = Uffd::attach(t.pid).unwrap_or_else(|e| panic!("attach {i}: {e}"));
        assert!(times.stopped > Duration::ZERO);
        let after = state(t.pid);
        if before != after {
            for (tid, f) in &before.threads {
                let g = after.threads.get(tid);
                if g != Some(f) {
                    eprintln!("thread {tid}: {f:?} -> {g:?}");
                }
            }
            eprintln!("fds {:?} -> {:?}", before.fds, after.fds);
            panic!("attach {i} (thread {}) changed the target", times.tid);
        }
        drop(uffd);
        // The main thread was blocked in read(0) during the attach: it must still answer (the
        // C fixture exits with status 3 if the read was not restarted).
        let ops = t.ops();
        assert!(ops > 0);
        assert!(t.running(), "target died after attach {i}");
    }
    assert_writers_run(&mut t);
}

#[test]
fn attach_leaves_a_c_target_exactly_as_it_was() {
    attach_many_times(Lang::C);
}

#[test]
fn attach_leaves_a_rust_target_exactly_as_it_was() {
    attach_many_times(Lang::Rust);
}

/// The variable that makes [`attach_until_killed`] attach to a process (its PID).
const ATTACH_LOOP_PID: &str = "PRECOPY_TEST_ATTACH_UNTIL_KILLED";

/// Not a test on its own: `a_killed_attacher_leaves_the_target_as_it_was` runs it in a
/// process of its own, which it kills. Attaches to the process `ATTACH_LOOP_PID` names over
/// and over, saying once on stdout that it did and whether a helper process traced.
#[test]
#[ignore = "run by a_killed_attacher_leaves_the_target_as_it_was, which kills it"]
fn attach_until_killed() {
    let pid: i32 = std::env::var(ATTACH_LOOP_PID)
        .expect("run by a_killed_attacher_leaves_the_target_as_it_was")
        .parse()
        .unwrap();
    let mut said = false;
    loop {
        let (_uffd, times) = Uffd::attach(pid).unwrap();
        if !said {
            println!("attached, traced by helper: {}", times.traced_by_helper);
            said = true;
        }
    }
}

/// `SIGKILL` cannot be blocked: an attacher killed while the target thread had injected
/// registers left it to the kernel's detach with them (it died of `SIGTRAP`, the single-step
/// flag still set: 2 of 20 `precopy send --pid` killed 2-30 ms after their start). The calls
/// now run from a helper process that finishes and puts the thread back.
#[test]
fn a_killed_attacher_leaves_the_target_as_it_was() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    if !engine_usable() {
        return;
    }
    let mut t = Target::start(Lang::C, 4, 256, 0);
    wait_ops(&mut t);
    let before = state(t.pid);
    for i in 0..40u64 {
        let mut attacher = Command::new(std::env::current_exe().unwrap())
            .args(["attach_until_killed", "--exact", "--ignored", "--nocapture"])
            .env(ATTACH_LOOP_PID, t.pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Past its first attach (and the test harness's own lines), the attacher attaches
        // again and again: a kill a little later lands in one.
        let mut out = BufReader::new(attacher.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("attached") {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("kill {i}: the attacher ended: {:?}", attacher.wait());
            }
        }
        if line.trim_end().ends_with("false") {
            eprintln!(
                "SKIP: the attach here is traced from the attaching process itself (no helper \
                 process could trace the target: Yama's ptrace_scope?), which a SIGKILL can \
                 still break"
            );
            attacher.kill().unwrap();
            attacher.wait().unwrap();
            return;
        }
        std::thread::sleep(Duration::from_micros(100 + (i * 397) % 3000));
        attacher.kill().unwrap();
        attacher.wait().unwrap();
        // A helper that was mid-way finishes on its own. It shares the attacher's file table,
        // so the attacher's stdout reaches its end once the helper is gone too.
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut out, &mut std::io::sink());
            let _ = done.send(());
        });
        ended
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("kill {i}: the attach's helper did not end within 10 s"));
        assert!(
            t.running(),
            "kill {i}: the target died: {:?}",
            t.child.try_wait()
        );
        assert_eq!(
            state(t.pid),
            before,
            "kill {i}: the target was not put back"
        );
    }
    assert_writers_run(&mut t);
}

#[test]
fn a_stopped_target_stays_stopped() {
    if !engine_usable() {
        return;
    }
    let mut t = Target::start(Lang::C, 2, 64, 0);
    wait_ops(&mut t);
    let pid = nix::unistd::Pid::from_raw(t.pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    while !state(t.pid).stopped {
        std::thread::sleep(Duration::from_millis(2));
    }
    let before = state(t.pid);
    let (_uffd, _) = Uffd::attach(t.pid).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let after = state(t.pid);
    assert_eq!(before, after);
    assert!(after.stopped, "the target was stopped and must stay so");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(t.ops() > 0);
}

#[test]
fn attach_errors_are_clear_and_leave_the_target_alone() {
    if !engine_usable() {
        return;
    }
    // No such process: a PID that was just reaped.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id() as i32;
    gone.wait().unwrap();
    match Uffd::attach(gone_pid) {
        Err(AttachError::NoSuchProcess { pid }) => assert_eq!(pid, gone_pid),
        other => panic!("expected NoSuchProcess, got {other:?}"),
    }

    // Another tracer: this test's own thread seizes the target first.
    let mut t = Target::start(Lang::C, 2, 64, 0);
    wait_ops(&mut t);
    let pid = t.pid;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let tracee = precopy_sys::ptrace::Tracee::seize(pid).unwrap();
        ready_tx.send(()).unwrap();
        rx.recv().unwrap();
        tracee.detach().unwrap();
    });
    ready_rx.recv().unwrap();
    let err = Uffd::attach(pid).unwrap_err();
    assert!(
        matches!(err, AttachError::AlreadyTraced { .. }),
        "expected AlreadyTraced, got {err:?}"
    );
    assert!(err.to_string().contains("already traced"), "{err}");
    tx.send(()).unwrap();
    holder.join().unwrap();
    let after = state(pid);
    assert_eq!(after.tracer, "0");
    assert!(!after.stopped);
    assert!(t.ops() > 0);
}

#[test]
fn the_attached_fd_tracks_the_targets_writes() {
    if !engine_usable() {
        return;
    }
    let mut t = Target::start(Lang::C, 3, 128, 0);
    wait_ops(&mut t);
    let (uffd, _) = Uffd::attach(t.pid).unwrap();
    let scanner = Scanner::new(ScanOptions::default()).unwrap();
    let mut log = TargetLog::new(uffd, scanner).unwrap();
    log.start().unwrap();
    let armed_at = t.ops();
    // Once 3 × 128 more writes happened, some writer swept all of its 128 pages.
    while t.ops() < armed_at + 3 * 128 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut dirty = Vec::new();
    log.collect(&mut dirty).unwrap();
    let bytes: u64 = dirty.iter().map(|r| r.end - r.start).sum();
    assert!(bytes >= 128 * 4096, "only {bytes} bytes reported written");
    assert!(t.running());
}

/// A writable mapping created mid-run that another userfaultfd registered before this log's
/// next round saw it (a second `precopy send` attaching meanwhile): the kernel refuses it to
/// this log (`EBUSY`), and the round fails rather than leave that memory untracked.
#[test]
fn a_new_mapping_another_userfaultfd_took_fails_the_round() {
    if !engine_usable() {
        return;
    }
    let mut t = Target::start(Lang::C, 2, 128, 0);
    wait_ops(&mut t);
    let (uffd, _) = Uffd::attach(t.pid).unwrap();
    let scanner = Scanner::new(ScanOptions::default()).unwrap();
    let mut log = TargetLog::new(uffd, scanner).unwrap().allow_anywhere();
    log.start().unwrap();
    let mut dirty = Vec::new();
    log.collect(&mut dirty).unwrap();
    // A new writer thread with a new 128-page buffer, which the log has not seen yet.
    let reply = t.ask("grow");
    let buf = reply
        .strip_prefix("grown ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|b| u64::from_str_radix(b, 16).ok())
        .unwrap_or_else(|| panic!("fixture said {reply:?}"));
    let (other, _) = Uffd::attach(t.pid).unwrap();
    let mut other = Tracker::new(other);
    other
        .register(buf..buf + 128 * 4096)
        .unwrap_or_else(|e| panic!("the second userfaultfd could not take the new buffer: {e}"));
    match log.collect(&mut dirty) {
        Err(TargetError::AlreadyTracked { pid }) => assert_eq!(pid, t.pid),
        other => panic!("the round did not fail on memory it cannot track: {other:?}"),
    }
    assert!(t.running());
}

#[test]
fn a_seccomp_filter_refusing_userfaultfd_is_reported_and_the_target_left_alone() {
    if !engine_usable() {
        return;
    }
    let mut t = Target::start_with_env(Lang::C, 2, 64, 0, &[("DENY_USERFAULTFD", "1")]);
    wait_ops(&mut t);
    let before = state(t.pid);
    let err = Uffd::attach(t.pid).unwrap_err();
    assert!(
        matches!(err, AttachError::Refused { .. }),
        "expected Refused, got {err:?}"
    );
    assert!(err.to_string().contains("seccomp"), "{err}");
    assert_eq!(before, state(t.pid));
    assert!(t.ops() > 0 && t.running());
}

/// `send --pid` and `rate --pid` of a `vfork` child before its `exec` (its parent's memory is
/// its memory: stopping the child cannot stop the parent's other threads writing it, and every
/// final round failed "the workload kept writing while paused") are refused before anything
/// starts, naming the parent and why; so is the parent (the child could write). Both are left
/// as they were: not traced, no signal pending, the child still waiting, the parent still in
/// `vfork`, running on once released.
#[test]
fn send_and_rate_refuse_a_process_whose_memory_another_shares() {
    use precopy_testnet::{VforkWait, thread_state as letter};
    if !engine_usable() {
        return;
    }
    let v = VforkWait::start(false, true);
    let (parent, child) = (v.pid(), v.child());
    let before = (state(parent), state(child), letter(child));
    let img = common::scratch("shared-memory.img");
    let img_url = format!("file:{}", img.display());
    for (pid, other, relation) in [(child, parent, "its parent"), (parent, child, "its child")] {
        let pid_s = pid.to_string();
        for args in [
            vec!["send", "--pid", &pid_s, "--to", &img_url],
            vec!["rate", "--pid", &pid_s, "--count", "1"],
        ] {
            let out = common::precopy(&args);
            let err = common::stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            for part in [
                format!("process {pid} shares its memory with process {other} ("),
                format!("{relation})"),
                format!("stopping process {pid} alone cannot stop"),
            ] {
                assert!(err.contains(&part), "{part:?} not in: {err}");
            }
        }
    }
    let partial = std::path::PathBuf::from(format!("{}.partial", img.display()));
    assert!(!img.exists() && !partial.exists());
    assert_eq!((state(parent), state(child), letter(child)), before);
    assert_eq!(letter(parent), 'D', "the parent left vfork early");
    v.release();
    let started = std::time::Instant::now();
    while letter(parent) != 'R' {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the parent never ran on"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
