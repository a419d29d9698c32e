//! `send --pid ... --to file:PATH` as a checkpointer meets it: an image that stays bounded
//! however many rounds run (compaction), a full file system refused in one line with the
//! target left running, a file that is not an image never replaced without `--force`, and
//! `--json` runs whose stdout and stderr a script can read cleanly.

mod common;

use common::target::{Lang, Target, engine_usable, state};
use common::{PRECOPY, listening_recv, one_json, precopy, scratch, scratch_dir, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The C fixture with `threads` writers over `pages` pages each at `rate` writes per second
/// per thread, once it has started writing.
fn writing_target(threads: u32, pages: u64, rate: u64) -> Target {
    let mut t = Target::start(Lang::C, threads, pages, rate);
    while t.ops() == 0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    t
}

fn file_url(p: &Path) -> String {
    format!("file:{}", p.display())
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop; `None` (after a loud
/// SKIP) where this process cannot mount one.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(name: &str, size: &str) -> Option<SmallFs> {
        let dir = scratch_dir(name);
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs(dir)),
            other => {
                eprintln!(
                    "SKIP: cannot mount a {size} tmpfs on {} (needs root): {other:?}",
                    dir.display()
                );
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_file_system_fails_the_send_in_one_line_and_the_target_runs_on() {
    if !engine_usable() {
        return;
    }
    let Some(fs) = SmallFs::mount("small-fs", "4m") else {
        return;
    };
    // 2 × 4096 pages (32 MiB), every one written (not zeros): round 0 cannot fit in 4 MiB.
    let mut t = writing_target(2, 4096, 0);
    while t.ops() < 2 * 4096 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = fs.0.join("t.img");
    let out = precopy(&["send", "--pid", &t.pid.to_string(), "--to", &file_url(&img)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(
        lines[0].contains("no space left for the image on the file system of")
            && lines[0].contains("round 0 (at most")
            && lines[0].contains("free")
            && lines[0].contains("it was left running"),
        "{err}"
    );
    // Refused before round 0 wrote anything: the partial image holds its header only, and
    // the file system is far from full.
    let partial = precopy_transfer::ImageWriter::partial_path(&img);
    let held = std::fs::metadata(&partial).map_or(0, |m| m.len());
    assert!(held < 64 << 10, "{held} bytes at {}", partial.display());
    let st = nix::sys::statvfs::statvfs(&fs.0).unwrap();
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    assert!(free > 3 << 20, "only {free} bytes left free");
    // The target runs on, untraced, and the image was never published.
    std::thread::sleep(Duration::from_millis(50));
    let s = state(t.pid);
    assert!(!s.stopped && s.tracer == "0", "{s:?}");
    assert!(t.writes_on(), "the target no longer writes");
    assert!(!img.exists());
    // The same with --json: one object, the same message.
    let out = precopy(&[
        "send",
        "--json",
        "--pid",
        &t.pid.to_string(),
        "--to",
        &file_url(&img),
    ]);
    let v = one_json(&out);
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("no space left for the image"), "{v}");
}

/// A receiver is told the size of each round (ROUND_BEGIN's page count) and refuses one its
/// file system cannot hold before writing it, naming what it needs; the sender fails and the
/// target runs on.
#[test]
fn a_receiver_refuses_a_round_its_file_system_cannot_hold_before_writing_it() {
    if !engine_usable() {
        return;
    }
    let Some(fs) = SmallFs::mount("recv-small-fs", "4m") else {
        return;
    };
    let mut t = writing_target(2, 4096, 0);
    while t.ops() < 2 * 4096 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = fs.0.join("r.img");
    let sock = scratch("recv-small-fs.sock");
    let _ = std::fs::remove_file(&sock);
    let recv = listening_recv(&sock, &img, &["--json"]);
    let sent = precopy(&[
        "send",
        "--pid",
        &t.pid.to_string(),
        "--to",
        &format!("unix:{}", sock.display()),
    ]);
    assert!(!sent.status.success());
    let out = recv.output();
    let v = one_json(&out);
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("no space left for the image") && msg.contains("round 0 (at most"),
        "{v}"
    );
    let partial = precopy_transfer::ImageWriter::partial_path(&img);
    let held = std::fs::metadata(&partial).map_or(0, |m| m.len());
    assert!(held < 64 << 10, "{held} bytes at {}", partial.display());
    std::thread::sleep(Duration::from_millis(50));
    let s = state(t.pid);
    assert!(!s.stopped && s.tracer == "0", "{s:?}");
    assert!(t.writes_on(), "the target no longer writes");
}

#[test]
fn a_file_that_is_not_an_image_is_only_replaced_with_force() {
    let dir = scratch_dir("not-an-image");
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, b"my notes, not an image\n").unwrap();
    // Refused before anything starts (exit 2), by send and by recv, the file untouched.
    for args in [
        vec!["send", "--pid", "1", "--to", &file_url(&notes)],
        vec![
            "recv",
            "--listen",
            "unix:/nonexistent/x.sock",
            "--to",
            &file_url(&notes),
        ],
    ] {
        let out = precopy(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.contains("is not a precopy image") && err.contains("--force"),
            "{args:?}: {err}"
        );
    }
    // Its `.partial` counts too: an image is written there first.
    let other = dir.join("other.img");
    std::fs::write(precopy_transfer::ImageWriter::partial_path(&other), b"x").unwrap();
    let out = precopy(&["send", "--pid", "1", "--to", &file_url(&other)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // And its `.partial.compacting`: a compaction writes there, and a send starting removes
    // one left behind.
    let third = dir.join("third.img");
    let compacting = precopy_transfer::ImageWriter::compacting_path(&third);
    std::fs::write(&compacting, b"x").unwrap();
    let out = precopy(&["send", "--pid", "1", "--to", &file_url(&third)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a precopy image"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&compacting).unwrap(), b"x");
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes, not an image\n");
    if !engine_usable() {
        return;
    }
    let t = writing_target(2, 64, 100);
    let pid = t.pid.to_string();
    // An empty file and an image are replaced without asking; the notes with --force.
    let empty = dir.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    for (path, extra) in [(&empty, None), (&empty, None), (&notes, Some("--force"))] {
        let mut args = vec!["send", "--pid", &pid, "--to"];
        let url = file_url(path);
        args.push(&url);
        args.extend(extra);
        let out = precopy(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let v = one_json(&precopy(&[
            "image",
            "verify",
            "--json",
            path.to_str().unwrap(),
        ]));
        assert_eq!(v["ok"], true, "{v}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A send whose rounds together far exceed the file system, each of which fits, completes
/// because low free space starts a compaction between rounds (the default policy's 64 MiB
/// of slack alone would never start one), and its image verifies.
#[test]
fn a_send_that_fits_only_by_compacting_completes_and_verifies() {
    if !engine_usable() {
        return;
    }
    let Some(fs) = SmallFs::mount("compact-fs", "24m") else {
        return;
    };
    // 2 × 256 pages (2 MiB) written flat out: a round holds all of them when the writers
    // ran since the last one; 200 rounds write far more than a 24 MiB file system holds.
    // (Round 0 holds all tracked memory, about 19 MiB with the two threads' stacks, which
    // the round's check counts as if every page held data.) Not 30 rounds: a round that
    // finds nothing takes ~2 ms, and on a loaded machine the writers got no CPU for 28
    // rounds in a row, leaving 3 rounds with data in all. The 1 ms limit is met only when
    // a scan finds nothing because both writers were off the CPU at once (seen once on a
    // quiet machine, after 10 rounds): then this run is not the one the test needs, and the
    // send runs again, at most three times in all.
    let t = writing_target(2, 256, 0);
    // Since the final phase's fixed costs fell below 1 ms (2026-12-01), a scan that finds
    // nothing converges: on a loaded machine that happened in 3 runs of 3. The writers at
    // nice -15 (root; every thread: Linux keeps nice per thread) rarely miss a round; where
    // `renice` fails they keep their nice value and the attempts below still apply.
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", t.pid)) {
        for tid in tasks.flatten() {
            let _ = Command::new("renice")
                .args(["-n", "-15", "-p"])
                .arg(tid.file_name())
                .output();
        }
    }
    let img = fs.0.join("c.img");
    let mut attempts = 0;
    let v = loop {
        attempts += 1;
        let out = precopy(&[
            "send",
            "--json",
            "--pid",
            &t.pid.to_string(),
            "--to",
            &file_url(&img),
            "--max-downtime",
            "1",
            "--max-rounds",
            "200",
            "--throttle",
            "none",
        ]);
        let v = one_json(&out);
        assert!(out.status.success() && v["ok"] == true, "{v}");
        if v["migration"]["switch_reason"] != "converged" || attempts == 5 {
            break v;
        }
        eprintln!("attempt {attempts} converged (a scan found nothing written): again");
        // Its image fills most of the small file system: the next send needs the room.
        std::fs::remove_file(&img).unwrap();
    };
    let compactions = v["image_compacted"]["compactions"].as_u64().unwrap_or(0);
    assert!(compactions >= 1, "never compacted: {v}");
    let verified = one_json(&precopy(&[
        "image",
        "verify",
        "--json",
        img.to_str().unwrap(),
    ]));
    assert_eq!(verified["ok"], true, "{verified}");
}

#[test]
fn image_info_lists_the_regions_at_their_process_addresses() {
    if !engine_usable() {
        return;
    }
    let t = writing_target(2, 256, 100);
    let img = scratch("regions.img");
    let out = precopy(&[
        "send",
        "--json",
        "--pid",
        &t.pid.to_string(),
        "--to",
        &file_url(&img),
    ]);
    let sent = one_json(&out);
    let layout: Vec<(u64, u64)> = sent["layout"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    let text = stdout(&precopy(&["image", "info", img.to_str().unwrap()]));
    let v = one_json(&precopy(&[
        "image",
        "info",
        "--json",
        img.to_str().unwrap(),
    ]));
    let regions = v["regions"].as_array().unwrap();
    assert_eq!(regions.len(), layout.len(), "{v}");
    for (r, (start, end)) in regions.iter().zip(&layout) {
        assert_eq!(r["address"], *start, "{r}");
        assert_eq!(r["address_end"], *end, "{r}");
        // The text names each range as the process's addresses, start and end.
        let range = format!("process addresses {start:#x}-{end:#x}");
        assert!(text.contains(&range), "{range} missing from {text}");
    }
    let _ = std::fs::remove_file(&img);
}

#[test]
fn send_json_writes_only_the_object_on_stdout_and_no_info_lines_on_stderr() {
    if !engine_usable() {
        return;
    }
    let t = writing_target(2, 256, 100);
    let img = scratch("quiet.img");
    let out = Command::new(PRECOPY)
        .args([
            "send",
            "--json",
            "--pid",
            &t.pid.to_string(),
            "--to",
            &file_url(&img),
        ])
        .env_remove("PRECOPY_LOG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let v = one_json(&out);
    assert_eq!(v["ok"], true, "{v}");
    let err = stderr(&out);
    assert!(
        !err.contains("INFO") && !err.contains("DEBUG") && !err.contains("TRACE"),
        "log lines below warnings on stderr: {err}"
    );
    let _ = std::fs::remove_file(&img);
}
