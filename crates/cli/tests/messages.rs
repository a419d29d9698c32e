//! What a user reads from `send`, `recv`, `rate` and `image info`: the target's real state and
//! the limits a send did not keep, a rate that says the target is stopped or was interrupted,
//! messages that name the real cause and the fix, and no panic on a closed stdout or stderr.

mod common;

use common::target::{Lang, Target, engine_usable, state};
use common::{PRECOPY, listening_recv, one_json, precopy, scratch, stderr, stdout};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn pid_arg(t: &Target) -> String {
    t.pid.to_string()
}

/// The C fixture with `threads` writers over `pages` pages each at `rate` writes per second
/// (0: flat out), once it has started writing.
fn writing_target(threads: u32, pages: u64, rate: u64) -> Target {
    let mut t = Target::start(Lang::C, threads, pages, rate);
    while t.ops() == 0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    t
}

/// `precopy send --pid` of `t` into the image `img`, with `extra` flags.
fn send_to_file(t: &Target, img: &Path, extra: &[&str]) -> Output {
    Command::new(PRECOPY)
        .args(["send", "--pid", &pid_arg(t), "--to"])
        .arg(format!("file:{}", img.display()))
        .args(extra)
        .output()
        .unwrap()
}

/// Waits until every thread of `pid` is stopped (state T).
fn wait_stopped(pid: i32) {
    let started = Instant::now();
    while !precopy_migrate::all_stopped(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{pid} never stopped"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn cont(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
}

// ---- send: the target's real state, the limits it did not keep ----

#[test]
fn send_says_the_target_is_stopped_when_it_is() {
    if !engine_usable() {
        return;
    }
    let t = writing_target(2, 256, 100);
    let pid = pid_arg(&t);
    // Running before and after: "running".
    let img = scratch("state-running.img");
    let out = precopy(&[
        "send",
        "--pid",
        &pid,
        "--to",
        &format!("file:{}", img.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("target running"), "{text}");
    // Stopped by the user before the send, --then resume: stopped, said so.
    kill(Pid::from_raw(t.pid), Signal::SIGSTOP).unwrap();
    wait_stopped(t.pid);
    let out = precopy(&[
        "send",
        "--pid",
        &pid,
        "--to",
        &format!("file:{}", img.display()),
    ]);
    let text = stdout(&out);
    let still = state(t.pid).stopped;
    let out_json = precopy(&[
        "send",
        "--json",
        "--pid",
        &pid,
        "--to",
        &format!("file:{}", img.display()),
    ]);
    cont(t.pid);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(still, "the send continued a target stopped before it");
    assert!(
        text.contains("target left stopped") && !text.contains("target running"),
        "{text}"
    );
    let v = one_json(&out_json);
    assert_eq!(v["target_state"], "stopped", "{v}");
    let _ = std::fs::remove_file(&img);
}

#[test]
fn a_target_stopped_during_the_send_is_left_stopped_and_said_so() {
    if !engine_usable() {
        return;
    }
    // A target that writes flat out does not converge at 1 ms: the send keeps going until the
    // user's SIGSTOP lands, and then it converges (or the round limit forces it).
    for attempt in 0..5 {
        let t = writing_target(4, 4096, 0);
        let img = scratch(&format!("stopped-during-{attempt}.img"));
        let send = Command::new(PRECOPY)
            .args(["send", "--pid", &pid_arg(&t), "--to"])
            .arg(format!("file:{}", img.display()))
            .args([
                "--max-downtime",
                "1",
                "--max-rounds",
                "40",
                "--throttle",
                "none",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let partial = precopy_transfer::ImageWriter::partial_path(&img);
        while !partial.exists() && !img.exists() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        kill(Pid::from_raw(t.pid), Signal::SIGSTOP).unwrap();
        let out = send.wait_with_output().unwrap();
        let text = stdout(&out);
        if out.status.success() && text.contains("target running") {
            // The send finished before the stop landed: this run shows nothing.
            eprintln!("attempt {attempt}: the send finished before the SIGSTOP; again");
            cont(t.pid);
            continue;
        }
        let still = state(t.pid).stopped;
        cont(t.pid);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            still,
            "the send continued a target the user stopped: {text}"
        );
        assert!(
            text.contains("STOPPED: someone else stopped it during the send"),
            "{text}"
        );
        assert!(text.contains(&format!("kill -CONT {}", t.pid)), "{text}");
        let _ = std::fs::remove_file(&img);
        return;
    }
    panic!("in 5 attempts the send always finished before the target was stopped");
}

#[test]
fn an_exceeded_downtime_limit_is_said_plainly() {
    if !engine_usable() {
        return;
    }
    let t = writing_target(4, 4096, 0);
    let img = scratch("exceeded.img");
    // One round with the target running, then the final round whatever it costs.
    let out = send_to_file(
        &t,
        &img,
        &[
            "--max-downtime",
            "1",
            "--max-rounds",
            "1",
            "--throttle",
            "none",
        ],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("switch-over FORCED by the round limit (--max-rounds 1)"),
        "{text}"
    );
    // The headline's downtime decides whether the limit line must be there.
    let downtime: f64 = text
        .split("downtime ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no downtime in {text}"));
    let exceeded = text.contains("downtime limit EXCEEDED");
    // The headline rounds to 0.1 ms: decide only away from the limit.
    if downtime >= 1.05 {
        assert!(exceeded, "{text}");
    } else if downtime < 0.95 {
        assert!(!exceeded, "{text}");
    }
    if exceeded {
        assert!(
            text.contains(&format!("EXCEEDED: {downtime:.1} ms > 1 ms")),
            "{text}"
        );
    }
    let _ = std::fs::remove_file(&img);
}

/// `send`'s text report says the final phase's priority as its JSON does
/// (`migration.final_priority`): raised to `SCHED_FIFO` for how many threads, or not raised
/// and why, `--final-priority normal` included.
#[test]
fn send_says_the_final_priority_as_its_json_does() {
    if !engine_usable() {
        return;
    }
    let t = writing_target(2, 256, 100);
    let img = scratch("final-priority.img");
    let out = send_to_file(&t, &img, &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let p = one_json(&out)["migration"]["final_priority"].clone();
    let out = send_to_file(&t, &img, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("final priority: "))
        .unwrap_or_else(|| panic!("no final priority line: {text}"));
    if p["not_raised"].is_null() {
        assert!(line.contains("SCHED_FIFO 1 for "), "{p}: {line}");
    } else {
        assert!(line.contains("not raised: "), "{p}: {line}");
    }
    let out = send_to_file(&t, &img, &["--final-priority", "normal"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("final priority: not raised: normal asked for"),
        "{}",
        stdout(&out)
    );
    let out = send_to_file(&t, &img, &["--final-priority", "normal", "--json"]);
    let p = one_json(&out)["migration"]["final_priority"].clone();
    assert_eq!(p["policy"], "normal", "{p}");
    assert!(
        p["not_raised"]
            .as_str()
            .is_some_and(|w| w.contains("normal")),
        "{p}"
    );
    let _ = std::fs::remove_file(&img);
}

/// A second sender to a `recv` that is receiving: it used to wait in the listen backlog and
/// read "Connection reset by peer" when `recv` ended, with nothing logged there. Now `recv`
/// answers that it is busy (and logs it), the sender says so and fails (status 1), and the
/// first transfer completes.
#[test]
fn a_second_sender_to_a_busy_recv_is_told_it_is_busy() {
    use precopy_transfer::FinalCheck;
    if !engine_usable() {
        return;
    }
    let dir = common::scratch_dir("busy-recv");
    let sock = dir.join("recv.sock");
    let recv = listening_recv(&sock, &dir.join("recv.img"), &[]);
    // The first sender: this test, through the library, with its transfer held open.
    let mut first = four_pages_to(&sock);
    // The second: `precopy send` of a running process.
    let t = writing_target(1, 16, 100);
    let out = precopy(&[
        "send",
        "--pid",
        &pid_arg(&t),
        "--to",
        &format!("unix:{}", sock.display()),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(err.contains("is busy with another transfer"), "{err}");
    assert!(!err.contains("reset by peer"), "{err}");
    // The first transfer is not disturbed, and recv said what it refused.
    first.finish(FinalCheck::Full).unwrap();
    let out = recv.output();
    let (text, log) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{log}");
    assert!(log.contains("busy with another transfer"), "{log}");
    assert!(text.contains("1 other connection(s) refused"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A transfer from this test to the receiver at `sock`, through the library: four pages sent
/// in round 0 (no round marked final), not finished yet.
fn four_pages_to(sock: &Path) -> precopy_transfer::Sender<precopy_transfer::SliceSource<Vec<u8>>> {
    use precopy_transfer::{Connection, Layout, Sender, SenderConfig, SliceSource};
    const PS: u64 = 4096;
    const BASE: u64 = 0x40_0000;
    let mut tx = Sender::connect(
        vec![Connection::connect_unix(sock).unwrap()],
        Layout::single(PS, BASE, 4 * PS).unwrap(),
        SliceSource::new(BASE, vec![5u8; 4 * PS as usize]),
        &SenderConfig::default(),
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    // A PING answered: the receiver runs the transfer, past `accept`.
    tx.probe_finish().unwrap();
    tx
}

/// Runs `precopy recv ARGS` into `dir` (see [`listening_recv`]), sends it [`four_pages_to`]
/// and finishes, and returns its output.
fn recv_a_small_transfer(dir: &Path, args: &[&str]) -> Output {
    let sock = dir.join("recv.sock");
    let recv = listening_recv(&sock, &dir.join("recv.img"), args);
    four_pages_to(&sock)
        .finish(precopy_transfer::FinalCheck::Full)
        .unwrap();
    recv.output()
}

/// `recv --final-priority normal` says so as `send` does (`final_priority` an object with
/// `policy` "normal" and why its threads were not raised; it was `null`), and a realtime
/// receiver whose sender marked no round final says that instead of nothing.
#[test]
fn recv_says_its_final_priority_as_send_does() {
    let dir = common::scratch_dir("recv-priority");
    let out = recv_a_small_transfer(&dir, &["--json", "--final-priority", "normal"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let p = one_json(&out)["received"]["final_priority"].clone();
    assert_eq!(p["policy"], "normal", "{p}");
    assert_eq!(p["priority"], 0, "{p}");
    assert_eq!(p["threads"], 0, "{p}");
    assert!(
        p["not_raised"]
            .as_str()
            .is_some_and(|w| w.starts_with("normal asked for")),
        "{p}"
    );
    let out = recv_a_small_transfer(&dir, &["--final-priority", "normal"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("final priority: not raised: normal asked for"),
        "{}",
        stdout(&out)
    );
    let out = recv_a_small_transfer(&dir, &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let p = one_json(&out)["received"]["final_priority"].clone();
    assert_eq!(p["policy"], "fifo", "{p}");
    assert_eq!(p["not_raised"], "no round was marked final", "{p}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `recv --io-timeout` bounds a sender's silence as send's bounds the receiver's: a sender
/// that stops midway (here: one that sent round 0 and then nothing) fails recv after it,
/// naming it, and the image is not published. It was a fixed 60 s with no flag.
#[test]
fn recv_io_timeout_bounds_a_silent_sender() {
    let dir = common::scratch_dir("recv-io-timeout");
    let (sock, img) = (dir.join("recv.sock"), dir.join("recv.img"));
    let recv = listening_recv(&sock, &img, &["--io-timeout", "0.5", "--json"]);
    let silent = four_pages_to(&sock);
    let out = recv.output();
    drop(silent);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let message = one_json(&out)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("no progress for 500ms"),
        "{message}: {err}"
    );
    assert!(
        !img.exists(),
        "an image published without the sender's commit"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- rate: a stopped target, an interrupted run ----

#[test]
fn rate_says_the_target_is_stopped() {
    if !engine_usable() {
        return;
    }
    let t = Target::start(Lang::C, 2, 256, 1000);
    kill(Pid::from_raw(t.pid), Signal::SIGSTOP).unwrap();
    wait_stopped(t.pid);
    let pid = pid_arg(&t);
    let text_out = precopy(&["rate", "--pid", &pid, "--interval", "20", "--count", "3"]);
    let json_out = precopy(&[
        "rate",
        "--json",
        "--pid",
        &pid,
        "--interval",
        "20",
        "--count",
        "3",
    ]);
    cont(t.pid);
    let text = stdout(&text_out);
    assert!(text_out.status.success(), "{}", stderr(&text_out));
    assert!(text.contains("TARGET STOPPED"), "{text}");
    assert!(text.contains(&format!("kill -CONT {pid}")), "{text}");
    let v = one_json(&json_out);
    assert_eq!(v["target_stopped"], true, "{v}");
    assert_eq!(v["target_stopped_at_start"], true, "{v}");
    assert_eq!(v["target_stopped_intervals"], 3, "{v}");
    assert!(
        v["intervals"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["target_stopped"] == true && i["pages"] == 0),
        "{v}"
    );
    // Running: not said.
    let out = precopy(&[
        "rate",
        "--json",
        "--pid",
        &pid,
        "--interval",
        "20",
        "--count",
        "2",
    ]);
    let v = one_json(&out);
    assert_eq!(v["target_stopped_intervals"], 0, "{v}");
}

#[test]
fn an_interrupted_rate_reports_the_intervals_it_measured() {
    if !engine_usable() {
        return;
    }
    let t = Target::start(Lang::C, 2, 1024, 1000);
    for (signal, json) in [(Signal::SIGINT, true), (Signal::SIGTERM, false)] {
        let mut args = vec!["rate", "--pid"];
        let pid = pid_arg(&t);
        args.push(&pid);
        args.extend(["--interval", "20", "--count", "100000"]);
        if json {
            args.push("--json");
        }
        let child = Command::new(PRECOPY)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Long enough for several 20 ms intervals even on a loaded machine.
        std::thread::sleep(Duration::from_secs(2));
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(128 + signal as i32),
            "{}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert!(err.contains("interrupted by"), "{err}");
        if json {
            let v = one_json(&out);
            assert_eq!(v["interrupted"], signal.as_str(), "{v}");
            let n = v["intervals_measured"].as_u64().unwrap();
            assert!(n >= 1, "no interval measured in 2 s: {v}");
            assert_eq!(
                v["intervals"].as_array().map(Vec::len),
                Some(n as usize),
                "{v}"
            );
            assert!(
                v["windows"].as_array().is_some_and(|w| !w.is_empty()),
                "{v}"
            );
            assert!(v["working_set_pages"].is_u64(), "{v}");
        } else {
            let text = stdout(&out);
            assert!(text.contains("precopy rate: process"), "{text}");
            assert!(text.contains("working set"), "{text}");
        }
    }
}

// ---- messages ----

/// `precopy recv` on `unix:sock` into `img`: it, the rest of its stderr, its first line.
fn start_recv(sock: &Path, img: &Path) -> (std::process::Child, impl BufRead, String) {
    let (listen, to) = (
        format!("unix:{}", sock.display()),
        format!("file:{}", img.display()),
    );
    common::recv_started(&["--listen", &listen, "--to", &to])
}

#[test]
fn a_receiver_that_went_away_is_named_with_the_fix() {
    if !engine_usable() {
        return;
    }
    let sock = scratch("dead-recv.sock");
    let img = scratch("dead-recv.img");
    let (mut recv, _err, line) = start_recv(&sock, &img);
    assert!(line.contains("listening on"), "{line}");
    let t = Target::start(Lang::C, 4, 4096, 0);
    let send = Command::new(PRECOPY)
        .args(["send", "--json", "--pid", &pid_arg(&t), "--to"])
        .arg(format!("unix:{}", sock.display()))
        .args([
            "--max-downtime",
            "1",
            "--max-rounds",
            "100000",
            "--throttle",
            "none",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-transfer: the receiver writes its image's header once the handshake is done (it
    // holds the image, empty, from before it listens).
    let partial = precopy_transfer::ImageWriter::partial_path(&img);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    recv.kill().unwrap();
    recv.wait().unwrap();
    let out = send.wait_with_output().unwrap();
    let v = one_json(&out);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("closed the connection"), "{msg}");
    assert!(msg.contains("start it again"), "{msg}");
    assert_eq!(
        stderr(&out).matches("error:").count(),
        1,
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn recv_removes_a_stale_socket_file_and_refuses_one_in_use() {
    let sock = scratch("stale.sock");
    // A socket file nobody is bound to any more (a receiver killed with SIGKILL leaves one).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let img = scratch("stale.img");
    let (mut recv, mut err, first) = start_recv(&sock, &img);
    let mut second = String::new();
    err.read_line(&mut second).unwrap();
    // Listening: a second receiver on the same path is refused, and the file stays. (Its own
    // image: the first one's is held while it waits.)
    let other_img = scratch("stale-other.img");
    let held = precopy(&[
        "recv",
        "--json",
        "--listen",
        &format!("unix:{}", sock.display()),
        "--to",
        &format!("file:{}", other_img.display()),
    ]);
    kill(Pid::from_raw(recv.id() as i32), Signal::SIGTERM).unwrap();
    recv.wait().unwrap();
    assert!(first.contains("listening on"), "{first}");
    assert!(
        second.contains("removed the stale socket file")
            && second.contains(&sock.display().to_string()),
        "{second}"
    );
    assert_eq!(held.status.code(), Some(2), "{}", stderr(&held));
    let v = one_json(&held);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--listen") && msg.contains("in use"), "{msg}");
    // A file that is not a socket is never removed.
    let plain = scratch("not-a-socket");
    std::fs::write(&plain, "keep me").unwrap();
    let out = precopy(&[
        "recv",
        "--listen",
        &format!("unix:{}", plain.display()),
        "--to",
        &format!("file:{}", img.display()),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep me");
    let _ = std::fs::remove_file(&plain);
}

#[test]
fn the_pid_of_precopy_itself_is_refused_with_a_command_line_fix() {
    // `exec` makes the shell's PID precopy's own.
    for cmd in [
        "send --pid $$ --to file:/tmp/precopy-self.img",
        "rate --pid $$",
    ] {
        let out = Command::new("sh")
            .args(["-c", &format!("exec {PRECOPY} {cmd}")])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains("--pid") && err.contains("itself"), "{err}");
        assert!(err.contains("$(pidof NAME)"), "{err}");
        assert!(!err.contains("Uffd::new"), "library advice: {err}");
    }
}

#[test]
fn root_without_cap_sys_ptrace_is_told_so_not_to_run_as_root() {
    if !engine_usable() {
        return;
    }
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("SKIP: no setpriv(1) to drop CAP_SYS_PTRACE (util-linux)");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: not root");
        return;
    }
    let t = Target::start(Lang::C, 1, 4, 100);
    let out = Command::new(setpriv)
        .args(["--bounding-set=-sys_ptrace", PRECOPY, "send", "--pid"])
        .arg(t.pid.to_string())
        .arg(format!("--to=file:{}", scratch("nocap.img").display()))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not allowed to ptrace"), "{err}");
    assert!(err.contains("without CAP_SYS_PTRACE"), "{err}");
    assert!(
        !err.contains("run as root"),
        "root is told to run as root: {err}"
    );
}

#[test]
fn a_file_too_short_to_be_an_image_is_said_to_be_no_image() {
    let six = scratch("six-bytes");
    std::fs::write(&six, b"abcdef").unwrap();
    let out = precopy(&["image", "info", six.to_str().unwrap(), "--json"]);
    let v = one_json(&out);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("is not a precopy image") && msg.contains("6 bytes"),
        "{msg}"
    );
    assert!(!msg.contains("truncated at byte 0"), "{msg}");
    // The first bytes of an image, cut: an incomplete image (a cut one, holding no record),
    // at the byte where it ends.
    let cut = scratch("cut-preamble");
    std::fs::write(&cut, b"PRCPI").unwrap(); // the first 5 bytes of the magic
    let out = precopy(&["image", "info", cut.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("INCOMPLETE (cut in the image preamble, after 5 bytes"),
        "{}",
        stdout(&out)
    );
    let out = precopy(&["image", "verify", cut.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is incomplete: cut in the image preamble, after 5 bytes"),
        "{err}"
    );
    for f in [six, cut] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn image_info_labels_a_process_image_by_what_it_holds() {
    if !engine_usable() {
        return;
    }
    let t = writing_target(2, 256, 100);
    let img = scratch("process.img");
    let out = send_to_file(&t, &img, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let img = img.to_str().unwrap();
    let text = stdout(&precopy(&["image", "info", img]));
    assert!(!text.contains("guest-physical"), "{text}");
    assert!(text.contains("process addresses 0x"), "{text}");
    assert!(
        text.contains(&format!("memory of process {}", t.pid)),
        "{text}"
    );
    let v = one_json(&precopy(&["image", "info", img, "--json"]));
    assert_eq!(v["address_kind"], "process virtual address", "{v}");
    assert_eq!(v["process"]["pid"], t.pid, "{v}");
    let _ = std::fs::remove_file(img);
}

#[test]
fn log_lines_have_no_colour_codes_without_a_terminal() {
    let out = Command::new(PRECOPY)
        .arg("probe")
        .env("PRECOPY_LOG", "debug")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains("DEBUG"), "no log line to look at: {err}");
    assert!(
        !err.contains('\x1b'),
        "ANSI escape codes in a pipe: {err:?}"
    );
}

// ---- closed stdout and stderr ----

/// Runs `precopy args` with stderr (and stdout, if `both`) a pipe whose reader is gone.
fn with_closed(args: &[&str], both: bool) -> Output {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let mut cmd = Command::new(PRECOPY);
    cmd.args(args)
        .stderr(Stdio::from(writer.try_clone().unwrap()));
    if both {
        cmd.stdout(Stdio::from(writer));
    } else {
        cmd.stdout(Stdio::null());
    }
    cmd.output().unwrap()
}

#[test]
fn a_closed_stderr_or_stdout_never_panics_and_keeps_the_exit_status() {
    let six = scratch("closed-six");
    std::fs::write(&six, b"abcdef").unwrap();
    let six = six.to_str().unwrap().to_string();
    let cases: [(Vec<&str>, i32); 6] = [
        (vec!["send", "--bogus"], 2),
        (vec!["send", "--bogus", "--json"], 2),
        (vec!["send", "--pid", "0", "--to", "file:/tmp/x.img"], 2),
        (vec!["rate", "--pid", "1", "--count", "0", "--json"], 2),
        (vec!["image", "info", &six], 1),
        (vec!["image", "info", &six, "--json"], 1),
    ];
    for (args, code) in &cases {
        for both in [false, true] {
            let out = with_closed(args, both);
            assert_eq!(
                out.status.code(),
                Some(*code),
                "{args:?} (stdout closed too: {both})"
            );
        }
        // `2>&-`: no stderr at all.
        let line = format!("exec {PRECOPY} {} 2>&-", args.join(" "));
        let out = Command::new("sh").args(["-c", &line]).output().unwrap();
        assert_eq!(out.status.code(), Some(*code), "{line}");
    }
    let _ = std::fs::remove_file(&six);
}

// ---- one JSON object on success and failure: send, recv, rate ----

#[test]
fn send_recv_and_rate_print_one_json_object_on_success_and_failure() {
    if !engine_usable() {
        return;
    }
    // Failures while running (not usage errors): a process that has exited, a socket path
    // that cannot be bound.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id().to_string();
    gone.wait().unwrap();
    let img = scratch("json-shape.img");
    let img_url = format!("file:{}", img.display());
    for args in [
        vec!["send", "--json", "--pid", &dead, "--to", &img_url],
        vec!["rate", "--json", "--pid", &dead, "--count", "1"],
        vec![
            "recv",
            "--json",
            "--listen",
            "unix:/no-such-dir/x.sock",
            "--to",
            &img_url,
        ],
        vec!["attach-bench", "--json", "--runs", "0"],
    ] {
        let out = precopy(&args);
        assert!(!out.status.success(), "{args:?}");
        one_json(&out);
        assert_eq!(
            stderr(&out).matches("error:").count(),
            1,
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // Success: a send into a receiver, the receiver's report, a rate.
    let t = writing_target(2, 256, 100);
    let sock = scratch("json-shape.sock");
    let recv = listening_recv(&sock, &img, &["--json"]);
    let out = precopy(&[
        "send",
        "--json",
        "--pid",
        &pid_arg(&t),
        "--to",
        &format!("unix:{}", sock.display()),
    ]);
    let v = one_json(&out);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["target_state"], "running", "{v}");
    assert!(v["downtime_exceeded"].is_boolean(), "{v}");
    let v = one_json(&recv.output());
    assert!(v["received"]["pages"].is_u64(), "{v}");
    // The send marked its final round on the wire; this separate receiver raised its own
    // threads for it (or says it was not permitted).
    let p = &v["received"]["final_priority"];
    assert_eq!(p["priority"], 1, "{v}");
    assert!(
        p["threads"].as_u64().unwrap_or(0) > 0 || p["refused"] == true,
        "{v}"
    );
    let v = one_json(&precopy(&[
        "rate",
        "--json",
        "--pid",
        &pid_arg(&t),
        "--count",
        "1",
    ]));
    assert_eq!(v["intervals_measured"], 1, "{v}");
    let _ = std::fs::remove_file(&img);
}
