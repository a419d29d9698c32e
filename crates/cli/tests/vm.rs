//! `precopy demo --vm` and `precopy bench --kvm` end to end. The flag checks run anywhere; the
//! runs need /dev/kvm and print a loud SKIP without it.

mod common;

use common::{one_json, precopy};
use serde_json::Value;

fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("\n*** SKIP {test}: /dev/kvm is absent or not read/writable ***\n");
    }
    ok
}

/// No value anywhere in `v` is a raw `Duration` (`{"secs": .., "nanos": ..}`).
fn no_raw_durations(v: &Value, path: &str) {
    match v {
        Value::Object(m) => {
            assert!(
                !(m.contains_key("secs") && m.contains_key("nanos")),
                "{path} is a raw Duration: {v}"
            );
            for (k, x) in m {
                no_raw_durations(x, &format!("{path}.{k}"));
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                no_raw_durations(x, &format!("{path}[{i}]"));
            }
        }
        _ => {}
    }
}

/// `precopy demo --vm ARGS --guest-seconds SECONDS`, for a demo that must switch over while
/// its guest still runs; returns its output and the guest seconds of that run. The guest's
/// time is the test's one timing assumption: the migration must reach its switch-over within
/// it. A loaded machine can take seconds to get there (an idle 16 MiB guest beside two CPU
/// hogs at load 12: 1.8 s once in six runs, and once over 4.7 s), and the demo then rightly
/// fails with "the guest finished before the switch-over". Such a run shows nothing about the
/// migration: it is run again, once, with five times the guest's time.
fn demo_vm_live(args: &[&str], seconds: u32) -> (std::process::Output, u32) {
    let run = |seconds: u32| {
        let seconds = seconds.to_string();
        let mut all = vec!["demo", "--vm"];
        all.extend_from_slice(args);
        all.extend(["--guest-seconds", &seconds]);
        precopy(&all)
    };
    let out = run(seconds);
    let finished_first =
        String::from_utf8_lossy(&out.stderr).contains("the guest finished before the switch-over");
    if out.status.success() || !finished_first {
        return (out, seconds);
    }
    eprintln!(
        "the guest finished before the switch-over in {seconds} s (a loaded machine): again with {} s",
        seconds * 5
    );
    (run(seconds * 5), seconds * 5)
}

/// A refused flag: exit status 2, one line on stderr in the `FLAG VALUE: PROBLEM; FIX` shape
/// (naming `flag` and `value`), and with `--json` one object with `ok: false`.
fn refused(args: &[&str], flag: &str, value: &str, problem: &str) {
    let out = precopy(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    let line = format!("precopy: error: {flag} {value}: ");
    assert!(
        stderr.contains(&line),
        "{args:?}: expected {line:?} in {stderr}"
    );
    assert!(
        stderr.contains(problem),
        "{args:?}: expected {problem:?} in {stderr}"
    );
    assert!(stderr.contains("; "), "{args:?}: no fix in {stderr}");
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = precopy(&with_json);
    assert_eq!(out.status.code(), Some(2));
    let v = one_json(&out);
    assert_eq!(v["ok"], false, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.starts_with(&format!("{flag} {value}: ")), "{v}");
}

/// A usage error from clap (conflicting flags): exit 2, both flags named on stderr with the fix
/// (leave one out), and with `--json` one object with `ok: false` holding clap's whole message.
fn conflict(args: &[&str], a: &str, b: &str) {
    let out = precopy(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
    assert!(
        stderr.contains("cannot be used with") && stderr.contains(a) && stderr.contains(b),
        "{args:?}: {stderr}"
    );
    let fix = format!("tip: leave out {a} or {b}");
    let fix_swapped = format!("tip: leave out {b} or {a}");
    assert!(
        stderr.contains(&fix) || stderr.contains(&fix_swapped),
        "{args:?}: no fix naming {a} and {b} in {stderr}"
    );
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let v = one_json(&precopy(&with_json));
    assert_eq!(v["ok"], false, "{v}");
    // clap's whole message: the conflict, the fix and the usage line.
    let message = v["error"]["message"].as_str().unwrap();
    for part in ["cannot be used with", "tip: leave out", "usage:"] {
        assert!(message.contains(part), "{part:?} missing from {v}");
    }
}

#[test]
fn vm_and_kvm_refuse_flags_they_do_not_use() {
    conflict(&["demo", "--vm", "--threads", "4"], "--vm", "--threads");
    conflict(
        &["demo", "--vm", "--pattern", "uniform"],
        "--vm",
        "--pattern",
    );
    conflict(&["demo", "--vm", "--memory", "memfd"], "--vm", "--memory");
    conflict(&["demo", "--vm", "--to", "file:/tmp/x"], "--vm", "--to");
    conflict(&["demo", "--vm", "--streams", "2"], "--vm", "--streams");
    conflict(
        &["demo", "--vm", "--lockstep", "--no-kvm-check"],
        "--lockstep",
        "--no-kvm-check",
    );
    conflict(
        &["bench", "--kvm", "--backends", "soft-dirty"],
        "--kvm",
        "--backends",
    );
    conflict(&["bench", "--kvm", "--threads", "2"], "--kvm", "--threads");
    conflict(&["bench", "--kvm", "--full"], "--kvm", "--full");
}

#[test]
fn demo_vm_and_bench_kvm_refuse_bad_values_up_front() {
    const DEMO: &[&str] = &["demo", "--vm"];
    const BENCH: &[&str] = &["bench", "--kvm"];
    // (command, extra flags, flag refused, value as typed, words its problem or fix holds)
    type Row = (
        &'static [&'static str],
        &'static [&'static str],
        &'static str,
        &'static str,
        &'static str,
    );
    let table: &[Row] = &[
        (DEMO, &["--vcpus", "0"], "--vcpus", "0", "1 to 64 vCPUs"),
        (DEMO, &["--vcpus", "65"], "--vcpus", "65", "1 to 64 vCPUs"),
        (DEMO, &["--vcpus", "-1"], "--vcpus", "-1", "1 to 64 vCPUs"),
        (
            DEMO,
            &["--working-set", "0"],
            "--working-set",
            "0",
            "one 4 KiB page for each",
        ),
        // Two vCPUs write equal shares of whole pages: 12K would be cut to 8K.
        (
            DEMO,
            &["--vcpus", "2", "--working-set", "12K"],
            "--working-set",
            "12K",
            "not a whole number of 4 KiB pages for each of the 2 vCPUs",
        ),
        (
            DEMO,
            &["--vcpus", "2", "--working-set", "12K"],
            "--working-set",
            "12K",
            "use --working-set 8K or 16K",
        ),
        (
            DEMO,
            &["--size", "64M", "--working-set", "64M"],
            "--working-set",
            "64M",
            "above the first 1 MiB",
        ),
        (
            DEMO,
            &["--guest-seconds", "0"],
            "--guest-seconds",
            "0",
            "more than 0 and at most 3600",
        ),
        (
            DEMO,
            &["--guest-seconds", "3601"],
            "--guest-seconds",
            "3601",
            "at most 3600",
        ),
        (
            DEMO,
            &["--guest-seconds", "2", "--warmup", "2"],
            "--warmup",
            "2",
            "less than --guest-seconds",
        ),
        (DEMO, &["--size", "8G"], "--size", "8G", "2 MiB to 4 GiB"),
        (
            DEMO,
            &["--size", "1M"],
            "--size",
            "1M",
            "use --size 2M or more",
        ),
        (
            DEMO,
            &["--size", "2050K"],
            "--size",
            "2050K",
            "whole 4 KiB pages",
        ),
        (
            DEMO,
            &["--dirty-rate", "1T", "--guest-seconds", "3600"],
            "--dirty-rate",
            "1T",
            "pages",
        ),
        (
            DEMO,
            &["--max-rounds", "0"],
            "--max-rounds",
            "0",
            "at least 1",
        ),
        (
            DEMO,
            &["--max-rounds", "1000001"],
            "--max-rounds",
            "1000001",
            "more than 1000000",
        ),
        (
            DEMO,
            &["--max-downtime", "0"],
            "--max-downtime",
            "0",
            "0 ms",
        ),
        (
            DEMO,
            &["--max-downtime", "3600001"],
            "--max-downtime",
            "3600001",
            "more than an hour",
        ),
        (BENCH, &["--rounds", "0"], "--rounds", "0", "1 to 1000"),
        (
            BENCH,
            &["--rounds", "1001"],
            "--rounds",
            "1001",
            "1 to 1000",
        ),
        (BENCH, &["--sizes", "1M"], "--sizes", "1M", "2 MiB to 4 GiB"),
        (
            BENCH,
            &["--sizes", "5G"],
            "--sizes",
            "5G",
            "use --sizes 4G or less",
        ),
    ];
    for (command, extra, flag, value, problem) in table {
        refused(&[*command, *extra].concat(), flag, value, problem);
    }
}

#[test]
fn demo_vm_migrates_a_guest_and_matches_the_unmigrated_checksum() {
    if !kvm_usable("demo_vm_migrates_a_guest_and_matches_the_unmigrated_checksum") {
        return;
    }
    let (out, _) = demo_vm_live(
        &[
            "--size",
            "32M",
            "--working-set",
            "4M",
            "--dirty-rate",
            "16M",
            "--warmup",
            "0.3",
            "--vcpus",
            "2",
            "--json",
        ],
        3,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo --vm failed: {stderr}");
    let report = one_json(&out);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["error"], Value::Null, "{report}");
    no_raw_durations(&report, "report");
    assert_eq!(report["checksums_match"], true, "{report}");
    assert_eq!(
        report["destination"]["checksum"],
        report["unmigrated"]["checksum"]
    );
    assert_eq!(report["source"]["finished_before_switch_over"], false);
    // Durations are milliseconds, as in the rest of the CLI's JSON.
    for ms in [
        &report["source"]["migration"]["downtime_ms"],
        &report["destination"]["guest_pause_ms"],
        &report["destination"]["run_after_resume_ms"],
        &report["unmigrated"]["run_time_ms"],
    ] {
        assert!(ms.as_f64().is_some_and(|v| v >= 0.0), "{ms} in {report}");
    }
    // The vCPU state went through the state hook: sent and received, same size.
    let sent = report["source"]["migration"]["state_bytes"]
        .as_u64()
        .unwrap();
    assert!(sent > 0);
    assert_eq!(report["destination"]["state_bytes"].as_u64(), Some(sent));
    let rounds = report["source"]["cross_check"].as_array().unwrap();
    assert!(!rounds.is_empty());
    assert_eq!(report["guest"]["vcpus"], 2);
    assert!(report["kvm"]["module"].is_string(), "{report}");
    assert!(report["kvm"]["note"].is_string(), "{report}");
    // No progress lines with --json.
    assert!(!stderr.contains("round 0"), "{stderr}");
}

#[test]
fn demo_vm_idle_guest_idles_for_guest_seconds_and_migrates() {
    if !kvm_usable("demo_vm_idle_guest_idles_for_guest_seconds_and_migrates") {
        return;
    }
    let (out, seconds) = demo_vm_live(
        &[
            "--size",
            "16M",
            "--dirty-rate",
            "0",
            "--warmup",
            "0.3",
            "--vcpus",
            "2",
            "--json",
        ],
        2,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo --vm --dirty-rate 0 failed: {stderr}"
    );
    let report = one_json(&out);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["checksums_match"], true, "{report}");
    // Still idling when the migration switched over: migrated live.
    assert_eq!(
        report["source"]["finished_before_switch_over"], false,
        "{report}"
    );
    // An idle guest: no pass, --guest-seconds of idle ticks, and not one page written.
    assert_eq!(report["guest"]["passes"], 0, "{report}");
    assert_eq!(
        report["guest"]["idle_seconds"].as_f64(),
        Some(f64::from(seconds)),
        "{report}"
    );
    assert_eq!(
        report["guest"]["dirty_rate_bytes_per_s"],
        Value::Null,
        "{report}"
    );
    assert_eq!(
        report["source"]["guest_write_rate"].as_f64(),
        Some(0.0),
        "{report}"
    );
    for round in report["source"]["cross_check"].as_array().unwrap() {
        assert_eq!(
            round["kvm_pages"], 0,
            "KVM saw an idle guest write: {report}"
        );
    }
}

#[test]
fn demo_vm_failure_prints_exactly_one_json_object() {
    if !kvm_usable("demo_vm_failure_prints_exactly_one_json_object") {
        return;
    }
    // One round allowed, abort at the limit, and a downtime no final round of a guest writing
    // 16 MiB/s meets: the migration is refused after round 0.
    let out = precopy(&[
        "demo",
        "--vm",
        "--size",
        "32M",
        "--working-set",
        "8M",
        "--dirty-rate",
        "16M",
        "--guest-seconds",
        "4",
        "--warmup",
        "0.3",
        "--max-rounds",
        "1",
        "--on-max-rounds",
        "abort",
        "--max-downtime",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let v = one_json(&out);
    assert_eq!(v["ok"], false, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("migrating the guest failed"), "{v}");
    assert!(!message.contains("1 rounds"), "{v}");
    assert_eq!(v["guest"]["vcpus"], 2, "{v}");
    // The error went to stderr once.
    assert_eq!(stderr.matches("precopy: error:").count(), 1, "{stderr}");
}

#[test]
fn demo_vm_text_output_names_the_kvm_it_ran_on() {
    if !kvm_usable("demo_vm_text_output_names_the_kvm_it_ran_on") {
        return;
    }
    let (out, _) = demo_vm_live(
        &[
            "--size",
            "16M",
            "--working-set",
            "2M",
            "--dirty-rate",
            "16M",
            "--warmup",
            "0.2",
            "--vcpus",
            "1",
        ],
        2,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let host = precopy_vmm::KvmHost::detect();
    assert!(stdout.contains(&host.note()), "{stdout}");
    assert!(stdout.contains("MATCH"), "{stdout}");
    assert!(
        stdout.contains("VM state through the state hook"),
        "{stdout}"
    );
    // Plain words: the backing by name, no Debug output, and the reference run said unpaced.
    assert!(stderr.contains("of RAM (anonymous)"), "{stderr}");
    assert!(!stdout.contains("Anonymous") && !stderr.contains("Anonymous"));
    assert!(stdout.contains("reference run, unpaced"), "{stdout}");
    // The host note is printed last on stdout: nothing points "above" to it.
    assert!(!stdout.contains("note above"), "{stdout}");
    // One cross-check row per scan: one per round after round 0, plus the final round's scan
    // with the guest paused, marked so.
    let rows: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("scan"))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(rows.len() >= 2, "{stdout}");
    assert!(rows.last().unwrap().contains("final"), "{stdout}");
    assert_eq!(
        rows.iter().filter(|r| r.contains("final")).count(),
        1,
        "{stdout}"
    );
}

#[test]
fn bench_kvm_reports_both_mechanisms() {
    if !kvm_usable("bench_kvm_reports_both_mechanisms") {
        return;
    }
    let out = precopy(&[
        "bench",
        "--kvm",
        "--sizes",
        "8M",
        "--fractions",
        "1%,1",
        "--rounds",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench --kvm failed: {stderr}");
    let v = one_json(&out);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["kvm"]["module"].is_string(), "{v}");
    let rows = v["kvm_bench"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "{v}");
    for r in rows
        .iter()
        .filter(|r| r["fraction"] == 1.0 && r["mechanism"] != "none")
    {
        // Every page the guest wrote (plus its parameter page) is reported by both.
        assert!(
            r["pages_reported"].as_u64().unwrap() >= r["pages_written"].as_u64().unwrap(),
            "{r}"
        );
    }
}
