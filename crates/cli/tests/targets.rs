//! `send --pid` and `rate --pid` given an ID that names no process they can attach to: each
//! kind is refused before anything starts as bad input (status 2), with one line that names
//! the flag and says what the ID is and what to give instead, and a process whose main thread
//! has exited is still sent, through a live thread.

mod common;

use common::target::{Lang, Target, engine_usable};
use common::{PRECOPY, scratch};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `(state, ppid, flags)` from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    Some((
        rest[0].chars().next()?,
        rest[1].parse().ok()?,
        rest[6].parse().ok()?,
    ))
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A zombie: a child of `sleep` (which never reaps) that has exited. The holder is killed on
/// drop, and the zombie with it.
struct Zombie {
    holder: std::process::Child,
    pid: i32,
}

impl Zombie {
    fn new() -> Zombie {
        let holder = Command::new("sh")
            .args(["-c", "sleep 0 & exec sleep 60"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let parent = holder.id() as i32;
        // Killed and reaped on drop, also if no zombie shows up.
        let mut z = Zombie { holder, pid: 0 };
        let started = Instant::now();
        while z.pid == 0 {
            match pids()
                .into_iter()
                .find(|&p| stat(p).is_some_and(|(s, pp, _)| pp == parent && s == 'Z'))
            {
                Some(pid) => z.pid = pid,
                None => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "no zombie appeared under {parent}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        z
    }
}

impl Drop for Zombie {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Some kernel thread visible here (`PF_KTHREAD` in its flags), if any.
fn kernel_thread() -> Option<i32> {
    pids()
        .into_iter()
        .find(|&p| stat(p).is_some_and(|(_, _, f)| f & 0x0020_0000 != 0))
}

fn run(args: &[String]) -> Output {
    Command::new(PRECOPY).args(args).output().unwrap()
}

#[test]
fn ids_that_name_no_attachable_process_are_refused_plainly() {
    if !engine_usable() {
        return;
    }
    let target = Target::start(Lang::C, 2, 4, 100);
    let pid = target.pid;
    let tid: i32 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .find(|&t| t != pid)
        .expect("the fixture has writer threads");
    let zombie = Zombie::new();
    let free = (2..4_000_000)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
        .min(32767);
    let img = scratch("refused.img");
    let to = format!("file:{}", img.display());
    // (what, the --pid value, words the message must hold)
    let mut cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "a thread of the target",
            tid.to_string(),
            vec![
                format!("--pid {tid}: is a thread of process {pid}"),
                format!("use --pid {pid}"),
            ],
        ),
        (
            "a zombie",
            zombie.pid.to_string(),
            vec![
                format!("--pid {}: ", zombie.pid),
                "has exited".into(),
                "zombie".into(),
            ],
        ),
    ];
    if !std::path::Path::new(&format!("/proc/{free}")).exists() {
        cases.push((
            "no such process",
            free.to_string(),
            vec![
                format!("--pid {free}: "),
                format!("no process with PID {free}"),
            ],
        ));
    }
    match kernel_thread() {
        Some(k) => cases.push((
            "a kernel thread",
            k.to_string(),
            vec![format!("--pid {k}: "), "kernel thread".into()],
        )),
        None => eprintln!("SKIP (one case): no kernel thread is visible in this PID namespace"),
    }
    for (what, id, words) in &cases {
        for cmd in [
            vec!["send", "--pid", id, "--to", &to],
            vec!["rate", "--pid", id, "--count", "1"],
        ] {
            for json in [false, true] {
                let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
                if json {
                    args.push("--json".into());
                }
                let out = run(&args);
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(2), "{what}: {args:?}: {err}");
                assert_eq!(err.matches("error:").count(), 1, "{what}: {err}");
                assert_eq!(err.lines().count(), 1, "{what}: {err}");
                for w in words {
                    assert!(err.contains(w.as_str()), "{what}: {w:?} missing: {err}");
                }
                assert!(!err.contains("syscall instruction"), "{what}: {err}");
                if json {
                    let v: serde_json::Value =
                        serde_json::from_slice(&out.stdout).expect("one JSON object");
                    assert_eq!(v["ok"], false, "{v}");
                    let msg = v["error"]["message"].as_str().unwrap_or_default();
                    assert!(msg.contains(words[0].as_str()), "{what}: {v}");
                } else {
                    assert!(out.stdout.is_empty(), "{what}: {args:?}");
                }
            }
        }
    }
    assert!(!img.exists(), "an image was written for a refused target");

    // This process itself: `exec` keeps the shell's PID for precopy.
    let out = Command::new("sh")
        .args(["-c", &format!("exec {PRECOPY} send --pid $$ --to {to}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Refused as a usage error, before anything is attached (tests/messages.rs checks the fix).
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is this precopy process itself"), "{err}");
    drop(target);
}

#[test]
fn a_process_whose_main_thread_exited_is_sent_through_a_live_thread() {
    if !engine_usable() {
        return;
    }
    let target = Target::start_with_env(Lang::C, 2, 16, 1000, &[("LEADER_EXITS", "1")]);
    let pid = target.pid;
    // The main thread is a zombie once pthread_exit has run; the writers go on.
    let started = Instant::now();
    while stat(pid).is_none_or(|(s, _, _)| s != 'Z') {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "leader never exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let img = scratch("leader-exited.img");
    let out = run(&[
        "send".into(),
        "--pid".into(),
        pid.to_string(),
        "--to".into(),
        format!("file:{}", img.display()),
        "--json".into(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["ok"], true, "{v}");
    assert_ne!(
        v["attach"]["thread"], pid,
        "injected into the exited main thread: {v}"
    );
    assert!(
        v["tracked_bytes"].as_u64().unwrap_or(0) >= 2 * 16 * 4096,
        "{v}"
    );
    let out = run(&["image".into(), "verify".into(), img.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&img);
}

#[test]
fn permission_refusals_say_what_to_do() {
    if !engine_usable() {
        return;
    }
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(setpriv) = setpriv else {
        eprintln!("SKIP: no setpriv(1) to run precopy as another user (util-linux)");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: not root, so the target cannot belong to another user here");
        return;
    }
    // A target of root's, and precopy as `nobody`.
    let target = Target::start(Lang::C, 1, 4, 100);
    let pid = target.pid.to_string();
    let img = format!("file:/tmp/precopy-perm-test-{}.img", std::process::id());
    for cmd in [
        vec!["send", "--pid", &pid, "--to", &img],
        vec!["rate", "--pid", &pid, "--count", "1"],
    ] {
        let out = Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", PRECOPY])
            .args(&cmd)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Permission denied") && !err.contains("precopy") {
            eprintln!("SKIP: `nobody` cannot run {PRECOPY} here: {err}");
            return;
        }
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        for want in ["not allowed to ptrace", "run as root"] {
            assert!(err.contains(want), "{cmd:?}: {want:?} missing: {err}");
        }
    }
}
