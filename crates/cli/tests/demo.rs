//! `precopy demo` end to end at small sizes: three real processes, verified byte for byte.

mod common;

use common::target::engine_usable;
use common::{one_json, precopy};

fn demo(args: &[&str]) -> (bool, serde_json::Value) {
    let out = small_demo(&[&["--json"], args].concat());
    (out.status.success(), one_json(&out))
}

/// A demo of 32 MiB written at 8 MiB/s, with `args`.
fn small_demo(args: &[&str]) -> std::process::Output {
    let mut all = vec!["demo", "--size", "32M", "--dirty-rate", "8M"];
    all.extend_from_slice(args);
    precopy(&all)
}

#[test]
fn each_pattern_and_transport_verifies() {
    if !engine_usable() {
        return;
    }
    for (pattern, transport) in [
        ("uniform", "tcp"),
        ("hot-set", "unix"),
        ("sequential", "tcp"),
    ] {
        let (ok, v) = demo(&["--pattern", pattern, "--transport", transport]);
        assert!(ok, "{pattern}/{transport}: {v}");
        assert_eq!(v["verified"], true);
        assert_eq!(v["migration"]["status"], "completed");
    }
}

#[test]
fn destination_killed_mid_migration_fails_clearly() {
    if !engine_usable() {
        return;
    }
    let (ok, v) = demo(&["--kill-dest-at-round", "1", "--bandwidth", "16M"]);
    assert!(!ok, "must exit non-zero: {v}");
    assert_eq!(v["verified"], false);
    assert_eq!(v["migration"]["status"], "failed");
    assert!(v["migration"]["checksum"].is_null());
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|e| e.contains("migration failed")),
        "{v}"
    );
}

/// The source's connections are cut (the sockets, not a process) as round 1 is about to be
/// sent: the source reconnects, the destination resumes with what it received, and the copy
/// verifies byte for byte. (`--max-downtime 1` keeps the migration iterating past the cut.)
#[test]
fn connection_cut_mid_migration_reconnects_and_verifies() {
    if !engine_usable() {
        return;
    }
    for transport in ["tcp", "unix"] {
        let (ok, v) = demo(&[
            "--cut-at-round",
            "1",
            "--transport",
            transport,
            "--max-downtime",
            "1",
            "--max-rounds",
            "4",
        ]);
        assert!(ok, "{transport}: {v}");
        assert_eq!(v["verified"], true, "{transport}: {v}");
        assert_eq!(v["migration"]["status"], "completed", "{transport}: {v}");
        assert_eq!(v["migration"]["reconnects"], 1, "{transport}: {v}");
    }
}

/// The source's connections cut as the first final round is about to be sent: that
/// switch-over fails before the commit, the source runs again, reconnects and switches over
/// a second time, and the copy verifies. The progress lines say once that the final round did
/// not complete and never again that its source is paused (a pause probe after it pauses the
/// source briefly, but that round is over); the text report's `measured:` line stands under
/// the downtime it breaks down, not under `switch-overs:`.
#[test]
fn a_final_round_cut_and_retried_is_said_once_and_measured_under_its_downtime() {
    if !engine_usable() {
        return;
    }
    let out = small_demo(&["--progress", "lines", "--cut-in-final-round"]);
    let (text, err) = (common::stdout(&out), common::stderr(&out));
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("switch-overs:  2 attempt(s)"), "{text}");
    let lines: Vec<&str> = err.lines().collect();
    let failed: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("did not complete"))
        .collect();
    assert_eq!(failed.len(), 1, "said once:\n{err}");
    let round = lines[failed[0]]
        .split("final round ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("{}", lines[failed[0]]));
    let paused = format!("final round {round} (source paused)");
    assert!(
        !lines[failed[0]..].iter().any(|l| l.contains(&paused)),
        "no longer paused after it:\n{err}"
    );
    // The breakdown follows the downtime's expected parts; the switch-overs line is no
    // longer above it.
    let report: Vec<&str> = text.lines().collect();
    let measured = report
        .iter()
        .position(|l| l.trim_start().starts_with("measured:"))
        .unwrap_or_else(|| panic!("no measured line:\n{text}"));
    assert!(
        report[measured - 1].trim_start().starts_with("at most:"),
        "{text}"
    );
    let switchovers = report
        .iter()
        .position(|l| l.starts_with("switch-overs:"))
        .unwrap();
    assert!(switchovers > measured, "{text}");
    assert!(
        text.contains("verified: the destination process equals"),
        "{text}"
    );
}

/// The same cut with `--reconnect-attempts 0`: the migration fails, saying so.
#[test]
fn connection_cut_without_reconnect_attempts_fails_clearly() {
    if !engine_usable() {
        return;
    }
    let (ok, v) = demo(&[
        "--cut-at-round",
        "1",
        "--reconnect-attempts",
        "0",
        "--max-downtime",
        "1",
        "--max-rounds",
        "4",
    ]);
    assert!(!ok, "must exit non-zero: {v}");
    assert_eq!(v["migration"]["status"], "failed", "{v}");
    assert_eq!(v["migration"]["reconnects"], 0, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|e| e.contains("migration failed")),
        "{v}"
    );
}

/// The destination stops (SIGSTOP) as round 0 (32 MiB, more than the socket buffers hold)
/// starts: the source's writes stall, the I/O timeout ends the migration with an error naming
/// the stall, and the destination, let run again, does not report a copy.
#[test]
fn destination_stopped_mid_run_fails_on_the_io_timeout() {
    if !engine_usable() {
        return;
    }
    let (ok, v) = demo(&["--stop-dest-at-round", "0", "--io-timeout", "1"]);
    assert!(!ok, "must exit non-zero: {v}");
    assert_eq!(v["migration"]["status"], "failed", "{v}");
    assert!(v["migration"]["checksum"].is_null());
    let err = v["error"]["message"].as_str().unwrap_or_default();
    assert!(err.contains("no progress"), "{err}");
    let dest = v["destination_outcome"].as_str().unwrap_or_default();
    assert!(!dest.starts_with("RECEIVED"), "{v}");
}

/// The destination stops as the final round starts: past the final-round bound the source is
/// resumed and the migration reported failed with the downtime it suffered; the destination,
/// let run again, acknowledges into a closed connection and never gets COMMIT: it never
/// reports a copy. (Run resumable, it then waits for the source to come back, since a final
/// phase cut before COMMIT may be retried; this source, interrupted by its bound, does not.)
/// The progress display's last word on the final round is that the source runs again, not
/// "source paused".
#[test]
fn destination_stopped_in_the_final_round_resumes_the_source_and_fails() {
    if !engine_usable() {
        return;
    }
    let out = small_demo(&[
        "--json",
        "--progress",
        "lines",
        "--stop-dest-in-final-round",
        "--final-round-timeout",
        "500",
        "--io-timeout",
        "30",
    ]);
    let (ok, v) = (out.status.success(), one_json(&out));
    let err = common::stderr(&out);
    let last_final = err
        .lines()
        .rev()
        .find(|l| l.starts_with('[') && l.contains("] final round"))
        .unwrap_or_default();
    assert!(
        last_final.contains("the source was resumed and runs"),
        "the last progress line about the final round: {last_final:?}\n{err}"
    );
    // The bound that fired is said once: in the error, not in a warning before it too.
    assert_eq!(
        err.lines().filter(|l| l.contains("500ms")).count(),
        1,
        "the error once, no warning before it:\n{err}"
    );
    assert!(!ok, "must exit non-zero: {v}");
    let m = &v["migration"];
    assert_eq!(m["status"], "failed", "{v}");
    assert!(m["checksum"].is_null());
    assert_eq!(m["final_round_bound_ms"].as_f64(), Some(500.0), "{v}");
    let downtime = m["downtime_ms"].as_f64().expect("downtime reported");
    assert!(downtime >= 500.0, "resumed before the bound? {downtime}");
    let err = v["error"]["message"].as_str().unwrap_or_default();
    assert!(err.contains("did not finish within 500ms"), "{err}");
    assert!(err.contains("acknowledgement"), "{err}");
    let dest = v["destination_outcome"].as_str().unwrap_or_default();
    assert!(!dest.starts_with("RECEIVED"), "{v}");
    assert!(
        dest.contains("did not commit") || dest.contains("waiting for a sender to resume"),
        "{v}"
    );
}

/// The destination stops once the migration completed, while the demo waits for its report
/// and then for it to exit: the demo ends within the I/O timeout either way (it used to wait
/// for ever): failing and naming the silent destination if the report had not come, else with
/// the verified copy and a warning that the destination was killed.
#[test]
fn destination_stopped_before_its_report_does_not_hold_the_demo() {
    if !engine_usable() {
        return;
    }
    let out = common::precopy_within(
        &[
            "demo",
            "--size",
            "32M",
            "--dirty-rate",
            "8M",
            "--json",
            "--stop-dest-before-report",
            "--io-timeout",
            "1",
        ],
        std::time::Duration::from_secs(60),
    );
    let v = one_json(&out);
    assert_eq!(v["migration"]["status"], "completed", "{v}");
    let err = v["error"]["message"].as_str().unwrap_or_default();
    if out.status.success() {
        assert_eq!(v["verified"], true, "{v}");
        let stderr = common::stderr(&out);
        assert!(stderr.contains("did not exit within 1s"), "{stderr}");
        let outcome = v["destination_outcome"].as_str().unwrap_or_default();
        assert!(outcome.contains("did not exit within 1s"), "{v}");
    } else {
        assert!(
            err.contains("destination process said nothing within 1s"),
            "{err}"
        );
    }
}

/// The destination dies once the migration completed, before the demo compared the copy:
/// the run fails, says the copy could not be compared, and still reports the completed
/// migration (it used to print only the error).
#[test]
fn destination_killed_after_the_commit_fails_with_the_report() {
    if !engine_usable() {
        return;
    }
    let (ok, v) = demo(&["--kill-dest-before-report"]);
    assert!(!ok, "must exit non-zero: {v}");
    assert_eq!(v["migration"]["status"], "completed", "{v}");
    assert!(
        v["migration"]["rounds"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{v}"
    );
    assert_eq!(v["verified"], false, "{v}");
    let err = v["error"]["message"].as_str().unwrap_or_default();
    assert!(err.contains("its copy could not be compared"), "{err}");
    assert!(!err.contains("source process"), "{err}");
}

/// Someone continues the source (`SIGCONT`) once the migration committed, before the demo
/// compares the memories: the comparison is void and the demo says so, blaming the source, not
/// the copy, and still fails (it could not verify). Into a destination and into an image.
#[test]
fn a_source_continued_after_the_commit_voids_the_comparison_and_says_why() {
    if !engine_usable() {
        return;
    }
    let image =
        std::env::temp_dir().join(format!("precopy-demo-continued-{}.img", std::process::id()));
    let to = format!("file:{}", image.display());
    for extra in [&[][..], &["--to", to.as_str()][..]] {
        let mut args = vec!["--continue-source-after-commit"];
        args.extend_from_slice(extra);
        let (ok, v) = demo(&args);
        let _ = std::fs::remove_file(&image);
        assert!(!ok, "{extra:?}: must exit non-zero: {v}");
        assert_eq!(v["migration"]["status"], "completed", "{v}");
        assert_eq!(v["verified"], false, "{v}");
        assert!(v["verification"]["source_not_frozen"].is_string(), "{v}");
        let chain = v["error"]["chain"].as_array().expect("an error chain");
        assert_eq!(chain[0], "the copy could not be verified", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("did not stay frozen after the commit"),
            "{msg}"
        );
        assert!(!msg.contains("differ"), "{msg}");
    }
}

/// A demo child that fails to start is one error chain, on stderr once and in the JSON, whose
/// cause is the child's own message. (It was printed as two errors, the JSON holding only
/// "exited before saying LISTENING".) The child made to fail: the destination run by `ip netns
/// exec` in a "namespace" that is a plain file under /run/netns (the demo takes the name, which
/// exists; `setns` refuses the file). A port in use or a namespace that does not exist is
/// refused before any child starts (`cli.rs`: status 2).
#[test]
fn a_child_that_fails_to_start_is_one_error_with_its_cause() {
    let root = nix::unistd::geteuid().is_root();
    if !root || std::process::Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIP: needs root and the `ip` command (a file in /run/netns)");
        return;
    }
    let name = format!("precopy-test-not-a-netns-{}", std::process::id());
    let bogus = std::path::Path::new("/run/netns").join(&name);
    std::fs::create_dir_all("/run/netns").expect("creating /run/netns");
    std::fs::write(&bogus, b"").expect("a plain file in /run/netns");
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(bogus);
    let out = precopy(&["demo", "--size", "32M", "--json", "--dest-netns", &name]);
    let v = one_json(&out);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let chain = v["error"]["chain"].as_array().expect("an error chain");
    assert_eq!(chain.len(), 2, "{v}");
    assert_eq!(
        chain[0], "destination process exited before saying LISTENING",
        "{v}"
    );
    assert!(chain[1].as_str().is_some_and(|c| c.contains(&name)), "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {stderr}");
    assert!(lines[0].starts_with("precopy: error: "), "{stderr}");
    assert!(lines[0].contains(&name), "{stderr}");
}

/// The report's settings name the flags that shape the run, as typed, defaults resolved.
#[test]
fn settings_name_the_flags_that_shape_the_run() {
    if !engine_usable() {
        return;
    }
    let (ok, v) = demo(&[
        "--timeout",
        "30",
        "--io-timeout",
        "5",
        "--final-round-timeout",
        "4000",
        "--on-max-rounds",
        "abort",
    ]);
    assert!(ok, "{v}");
    let s = &v["settings"];
    assert_eq!(s["timeout_s"], 30.0, "{s}");
    assert_eq!(s["on_timeout"], "abort", "{s}");
    assert_eq!(s["on_max_rounds"], "abort", "{s}");
    assert_eq!(s["io_timeout_s"], 5.0, "{s}");
    assert_eq!(s["final_round_timeout_ms"], 4000, "{s}");
    assert_eq!(s["pause"], "signal", "{s}");
    assert_eq!(s["throttle"], "auto", "{s}");
    assert_eq!(s["no_throttle"], false, "{s}");
}

/// As many streams as the destination accepts (64): all of them get through the handshake,
/// though it runs at most 16 at once (the rest wait in the listen backlog), over TCP and Unix
/// sockets. They used to be refused past 16, failing the demo or ending it with status 0
/// and no report.
#[test]
fn the_most_streams_the_destination_accepts_all_connect() {
    if !engine_usable() {
        return;
    }
    for transport in ["tcp", "unix"] {
        for _ in 0..3 {
            let (ok, v) = demo(&["--streams", "64", "--transport", transport]);
            assert!(ok, "{transport}: {v}");
            assert_eq!(v["verified"], true, "{transport}: {v}");
            assert_eq!(v["settings"]["streams"], 64, "{transport}: {v}");
        }
    }
}

/// `--timeout` under the abort policy is a hard bound, not only a check between rounds: the
/// destination stops as round 0 starts (the I/O timeout, 10 s, is far off), and the total
/// timeout ends the migration with an error naming the step and the peer.
#[test]
fn total_timeout_interrupts_a_stalled_round() {
    if !engine_usable() {
        return;
    }
    let (ok, v) = demo(&[
        "--stop-dest-at-round",
        "0",
        "--bandwidth",
        "8M",
        "--timeout",
        "2",
        "--on-timeout",
        "abort",
    ]);
    assert!(!ok, "must exit non-zero: {v}");
    assert_eq!(v["migration"]["status"], "failed", "{v}");
    let err = v["error"]["message"].as_str().unwrap_or_default();
    assert!(err.contains("sending round 0"), "{err}");
    assert!(err.contains("127.0.0.1:"), "names the peer: {err}");
    assert!(err.contains("did not finish within 2s"), "{err}");
    assert!(v["migration"]["downtime_ms"].is_null(), "never paused: {v}");
}

/// The demo's state blob is its writers' records (writes completed, offset of the last one),
/// read from the stopped source; the destination checks each against the memory it received.
#[test]
fn the_writers_records_travel_as_state_and_match_the_destination_memory() {
    if !engine_usable() {
        return;
    }
    for to in [None, Some("image")] {
        let path = std::env::temp_dir().join(format!("precopy-state-{}.img", std::process::id()));
        let image = format!("file:{}", path.display());
        let mut args = vec!["--threads", "3"];
        if to.is_some() {
            args.extend(["--to", image.as_str()]);
        }
        let (ok, v) = demo(&args);
        assert!(ok, "{to:?}: {v}");
        let state = &v["state"];
        assert_eq!(state["check"], "ok", "{to:?}: {state}");
        assert_eq!(state["bytes"], 3 * 16, "{state}");
        assert_eq!(v["migration"]["state_bytes"], 3 * 16, "{v}");
        let writers = state["writers"].as_array().expect("writers");
        assert_eq!(writers.len(), 3);
        for w in writers {
            assert!(
                w["writes"].as_u64().unwrap() > 0,
                "every writer wrote: {state}"
            );
            assert!(w["last_offset"].as_u64().unwrap() < 32 << 20, "{state}");
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// `--backend soft-dirty`: the same driver on soft-dirty bits, the source paused around each
/// collection and each pause reported. Where soft-dirty does not work (built without
/// `CONFIG_MEM_SOFT_DIRTY`, as on the project's machines) the demo must refuse it clearly
/// rather than migrate with a log that reports nothing; `scripts/vm/run.sh` runs the real thing
/// in Debian's 6.1 and 6.12 guests.
#[test]
fn soft_dirty_drives_the_demo_where_it_works() {
    let probe = one_json(&precopy(&["probe", "--json"]));
    let soft_dirty = probe["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|v| v["name"] == "soft-dirty"))
        .cloned()
        .unwrap_or_default();
    let (ok, v) = demo(&["--backend", "soft-dirty"]);
    if soft_dirty["available"] != true {
        eprintln!(
            "SKIP soft_dirty_drives_the_demo_where_it_works (migration part): soft-dirty does not \
             work on this kernel ({}); checked that the demo refuses it",
            soft_dirty["reason"]
        );
        assert!(
            !ok,
            "a demo on a soft-dirty that does not work must fail: {v}"
        );
        let msg = v["error"]["chain"].to_string() + &v["error"]["message"].to_string();
        assert!(msg.contains("soft-dirty"), "{v}");
        // Refused before anything starts, as a value this machine cannot take (status 2,
        // once, naming the flag and what to use), by `demo` and by `bench` alike: it was a
        // failure of the started source, status 1.
        for args in [
            &["demo", "--size", "32M", "--backend", "soft-dirty"][..],
            &["bench", "--sizes", "4M", "--backends", "soft-dirty"][..],
        ] {
            let out = precopy(args);
            let err = common::stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert_eq!(err.matches("error:").count(), 1, "{args:?}: {err}");
            let line = err
                .lines()
                .find(|l| l.contains("error:"))
                .unwrap_or_default();
            assert!(line.contains(" soft-dirty: "), "{args:?}: {line}");
            assert!(
                line.contains("on this machine") || line.contains("this machine's kernel"),
                "{args:?}: {line}"
            );
            assert!(
                !err.contains("filling"),
                "{args:?}: the demo started: {err}"
            );
        }
        return;
    }
    assert!(ok, "{v}");
    assert_eq!(v["verified"], true);
    assert_eq!(v["dirty_log"], "soft-dirty");
    let rounds = v["migration"]["rounds"].as_array().expect("rounds");
    assert!(rounds.len() >= 2);
    for r in &rounds[1..] {
        assert!(r["collect_pause_ms"].as_f64().is_some(), "{r}");
    }
}

/// The demo's source children (`__demo-source`) of process `parent`.
fn demo_sources(parent: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("__demo-source"))
        })
        .collect()
}

/// Someone continues the source (`SIGCONT`, as Ctrl-Z then `fg` would) again and again
/// during the final round, while its slow send runs: the source writes after the final scan.
/// The pause check must catch it: the run either completes with a copy equal to the source
/// (pages found were sent) or fails without committing; never "completed" with a copy that
/// differs. (Before the check, every such run completed with thousands of pages differing.)
#[test]
fn a_source_continued_from_outside_in_the_final_round_never_completes_with_a_differing_copy() {
    use std::io::BufRead;
    if !engine_usable() {
        return;
    }
    {
        // The default final check, which trusts the tracker (`--final-check full` re-reads
        // memory).
        let final_check = "recorded";
        let mut child = std::process::Command::new(common::PRECOPY)
            .args([
                "demo",
                "--size",
                "16M",
                "--dirty-rate",
                "64M",
                "--pattern",
                "uniform",
                "--bandwidth",
                "16M",
                "--max-downtime",
                "20000",
                "--final-check",
                final_check,
                "--json",
                "--progress",
                "lines",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running precopy demo");
        let demo = child.id();
        let stderr = child.stderr.take().expect("stderr");
        let in_final = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = in_final.clone();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("final round") {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                lines.push(line);
            }
            lines
        });
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let continues = std::thread::spawn(move || {
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if in_final.load(std::sync::atomic::Ordering::SeqCst) {
                    for pid in demo_sources(demo) {
                        let pid = nix::unistd::Pid::from_raw(pid);
                        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).is_ok() {
                            sent += 1;
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            sent
        });
        let out = child.wait_with_output().expect("waiting for the demo");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let sent = continues.join().unwrap();
        let lines = reader.join().unwrap();
        let v = one_json(&out);
        assert!(sent > 0, "no SIGCONT reached the source: {lines:?}");
        let m = &v["migration"];
        if out.status.success() {
            assert_eq!(m["status"], "completed", "{v}");
            assert_eq!(
                v["verified"], true,
                "completed with a copy that differs: {v}"
            );
        } else {
            assert_ne!(m["status"], "completed", "{v}");
            assert_eq!(v["verified"], false, "{v}");
        }
        eprintln!(
            "--final-check {final_check}: {} SIGCONT(s), status {}, pause check {}, error {}",
            sent, m["status"], m["pause_check"], v["error"]["message"]
        );
    }
}

/// The state letter of process `pid` (`/proc/PID/stat`), or `None` once it is gone (a zombie
/// counts as gone).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat[stat.rfind(')')? + 1..].trim_start().chars().next()?;
    (state != 'Z' && state != 'X').then_some(state)
}

/// `SIGKILL` to the demo while its source is stopped for the final round: nothing is left to
/// continue the source, so before `PR_SET_PDEATHSIG` it stayed stopped (state `T`) for good,
/// holding its memory. Now the kernel kills it with the demo.
#[test]
fn a_demo_killed_in_the_final_round_leaves_no_stopped_source_nor_destination() {
    use std::io::BufRead;
    if !engine_usable() {
        return;
    }
    let mut child = std::process::Command::new(common::PRECOPY)
        .args([
            "demo",
            "--size",
            "16M",
            "--dirty-rate",
            "16M",
            "--bandwidth",
            "2M",
            "--max-downtime",
            "60000",
            "--json",
            "--progress",
            "lines",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running precopy demo");
    let demo = child.id();
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let source = loop {
        let line = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("the demo ended before its final round: {seen:?}"));
        let final_round = line.contains("final round");
        seen.push(line);
        if final_round {
            let sources = demo_sources(demo);
            assert_eq!(sources.len(), 1, "{sources:?}");
            break sources[0];
        }
    };
    // The final round's send takes seconds at 2 MiB/s: the source is stopped by now.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while process_state(source) != Some('T') && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        process_state(source),
        Some('T'),
        "source not stopped: {seen:?}"
    );
    let dests: Vec<i32> = std::fs::read_dir(format!("/proc/{demo}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|p| *p != source)
        .collect();
    child.kill().expect("SIGKILL to the demo");
    child.wait().expect("reaping the demo");
    // Killed, a process passes through R (woken to die) and Z (until reaped) on its way out;
    // the destination would otherwise hold its memory for the resume wait (tens of seconds).
    let alive = |pid: i32| process_state(pid).filter(|s| *s != 'Z').map(|s| (pid, s));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let all: Vec<i32> = dests.iter().copied().chain([source]).collect();
    while all.iter().any(|p| alive(*p).is_some()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let left = alive(source).map(|(_, s)| s);
    let dests_left: Vec<(i32, char)> = dests.iter().filter_map(|d| alive(*d)).collect();
    // Clean up whatever is left of this demo before asserting.
    for &pid in &all {
        if process_state(pid).is_some() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    assert_eq!(
        left, None,
        "the source outlived the killed demo in state {left:?}"
    );
    assert!(
        dests_left.is_empty(),
        "the destination outlived the killed demo: {dests_left:?}"
    );
}

/// A demo killed with `SIGKILL` cannot remove its Unix socket: the next demo removes what
/// demos that are gone left in the temporary directory (their private directories, and the
/// `.sock`/`.key` files of older versions), and runs.
#[test]
fn what_a_demo_killed_with_sigkill_leaves_is_removed_by_the_next_run() {
    if !engine_usable() {
        return;
    }
    let tmp = common::scratch_dir("demo-tmpdir");
    // Leftovers of demos long gone (no process can have these PIDs: above pid_max's limit).
    std::fs::create_dir(tmp.join("precopy-demo-999999999")).unwrap();
    std::fs::write(tmp.join("precopy-demo-999999999/dest.sock"), b"").unwrap();
    std::fs::write(tmp.join("precopy-demo-999999998.key"), b"").unwrap();
    let mut child = std::process::Command::new(common::PRECOPY)
        .args([
            "demo",
            "--size",
            "16M",
            "--bandwidth",
            "2M",
            "--transport",
            "unix",
            "--json",
        ])
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running precopy demo");
    let demo = child.id();
    let sockets = [
        tmp.join(format!("precopy-demo-{demo}/dest.sock")),
        // Where versions before the private directory put it.
        std::path::PathBuf::from(format!("/tmp/precopy-demo-{demo}.sock")),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sockets.iter().any(|s| s.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the demo's destination never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL to the demo");
    child.wait().expect("reaping the demo");
    assert!(
        sockets.iter().any(|s| s.exists()),
        "a demo killed with SIGKILL cannot remove its socket"
    );

    let out = std::process::Command::new(common::PRECOPY)
        .args(["demo", "--size", "8M", "--transport", "unix", "--json"])
        .env("TMPDIR", &tmp)
        .output()
        .expect("running precopy demo");
    let v = one_json(&out);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["verified"], true, "{v}");
    let left = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.starts_with(&format!("precopy-demo-{demo}"))
                    || (dir == tmp.as_path() && n.starts_with("precopy-demo-"))
            })
            .collect()
    };
    let mut leftovers = left(&tmp);
    leftovers.extend(left(std::path::Path::new("/tmp")));
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let _ = std::fs::remove_dir_all(&tmp);
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// A value of `/proc/meminfo` (a count, or kB).
fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// Free huge pages a new mapping can have (free minus reserved).
fn free_huge_pages() -> u64 {
    meminfo("HugePages_Free:")
        .unwrap_or(0)
        .saturating_sub(meminfo("HugePages_Rsvd:").unwrap_or(0))
}

/// `nr_hugepages` as it was, written back on drop by a test that grew the pool.
struct RestorePool(String);

impl Drop for RestorePool {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_HUGEPAGES, &self.0) {
            eprintln!("could not put {NR_HUGEPAGES} back to {}: {e}", self.0);
        }
    }
}

/// `demo --memory hugetlb` is checked against the hugetlb pool before anything starts (it was
/// checked against MemAvailable, which does not count the pool, and a suggested size then
/// failed with status 1 once the source mapped it): an empty pool is told how to fill it, and
/// a size the pool cannot hold suggests one it can, which the demo then runs and verifies.
/// Growing the pool by 8 pages needs root; it is put back afterwards.
#[test]
fn a_hugetlb_size_is_checked_against_the_pool_and_the_suggestion_runs() {
    if !engine_usable() {
        return;
    }
    if meminfo("Hugepagesize:") != Some(2048) {
        eprintln!("SKIP: no hugetlb here, or its default page size is not 2 MiB");
        return;
    }
    let refused = |size: &str| {
        let out = precopy(&["demo", "--memory", "hugetlb", "--size", size]);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{size}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&format!("--size {size}: ")), "{err}");
        assert!(err.contains("from the hugetlb pool"), "{err}");
        err
    };
    if free_huge_pages() == 0 {
        let err = refused("16M");
        for want in [
            "the pool has none free",
            "fill the pool first",
            NR_HUGEPAGES,
        ] {
            assert!(err.contains(want), "{want:?} missing: {err}");
        }
    }
    let Some(total) = meminfo("HugePages_Total:") else {
        eprintln!("SKIP: /proc/meminfo has no HugePages_Total");
        return;
    };
    let old = std::fs::read_to_string(NR_HUGEPAGES).unwrap_or_default();
    if let Err(e) = std::fs::write(NR_HUGEPAGES, (total + 8).to_string()) {
        eprintln!("SKIP (the suggestion's run): growing the hugetlb pool needs root: {e}");
        return;
    }
    let _restore = RestorePool(old.trim().to_string());
    let free = free_huge_pages();
    if free < 8 {
        eprintln!("SKIP (the suggestion's run): the kernel gave the pool only {free} free pages");
        return;
    }
    let err = refused("1T");
    let suggested = err
        .split("use --size ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no size suggested: {err}"));
    let mib: u64 = suggested
        .strip_suffix('M')
        .and_then(|n| n.parse().ok())
        .or_else(|| Some(suggested.strip_suffix('G')?.parse::<u64>().ok()? << 10))
        .unwrap_or_else(|| panic!("not a size: {suggested}: {err}"));
    assert!(
        mib > 0 && mib <= free * 2,
        "{suggested} for {free} free pages: {err}"
    );
    let out = precopy(&[
        "demo",
        "--memory",
        "hugetlb",
        "--size",
        suggested,
        "--dirty-rate",
        "4M",
        "--json",
    ]);
    let v = one_json(&out);
    assert!(out.status.success(), "--size {suggested}: {v}");
    assert_eq!(v["verified"], true, "{v}");
}
