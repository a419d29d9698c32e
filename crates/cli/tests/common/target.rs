//! Fixtures for the attach tests: the C target (compiled with `cc` at test time) and the Rust
//! one (`precopy __target`), both writing from several threads, plus a snapshot of what a
//! target must get back after an attach.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The C fixture, compiled once per test binary.
pub fn c_fixture() -> PathBuf {
    precopy_testnet::compile_c(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/target.c"),
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("precopy-target-fixture"),
        &["-pthread"],
    )
}

/// Which fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    C,
    Rust,
}

/// A running fixture; killed on drop.
pub struct Target {
    pub child: Child,
    pub pid: i32,
    /// The churn area's address (C fixture) or 0.
    pub area: u64,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    /// Starts a fixture with `threads` writers of `pages` pages each, at `rate` page writes per
    /// second per thread (0: flat out).
    pub fn start(lang: Lang, threads: u32, pages: u64, rate: u64) -> Target {
        Target::start_with_env(lang, threads, pages, rate, &[])
    }

    /// As [`Target::start`], with extra environment variables.
    pub fn start_with_env(
        lang: Lang,
        threads: u32,
        pages: u64,
        rate: u64,
        env: &[(&str, &str)],
    ) -> Target {
        let mut cmd = match lang {
            Lang::C => Command::new(c_fixture()),
            Lang::Rust => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_precopy"));
                c.arg("__target");
                c
            }
        };
        cmd.envs(env.iter().copied());
        cmd.args([threads.to_string(), pages.to_string(), rate.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("starting the fixture");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let mut it = line.split_whitespace();
        assert_eq!(it.next(), Some("ready"), "fixture said {line:?}");
        let pid: i32 = it.next().unwrap().parse().unwrap();
        let area = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
        Target {
            child,
            pid,
            area,
            stdin,
            stdout,
        }
    }

    /// Sends one command line and returns the answer line.
    pub fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// Page writes so far (the fixture's own count).
    pub fn ops(&mut self) -> u64 {
        let a = self.ask("ops");
        a.strip_prefix("ops ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("fixture answered {a:?}"))
    }

    /// Whether the target writes again: its count grows within 10 s (a liveness bound: on a
    /// loaded machine its writers may wait tens of milliseconds for a CPU).
    pub fn writes_on(&mut self) -> bool {
        let before = self.ops();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(10));
            if self.ops() > before {
                return true;
            }
        }
        false
    }

    /// Whether the process is still running (not exited).
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What must come back unchanged after an attach: per-thread state letter class, signal masks
/// and pending signals, the process's fds, its tracer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub tracer: String,
    pub stopped: bool,
    pub threads: BTreeMap<String, BTreeMap<String, String>>,
    pub shared_pending: String,
    pub fds: Vec<String>,
}

fn status_fields(path: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Snapshot of `pid`.
pub fn state(pid: i32) -> State {
    let st = status_fields(&format!("/proc/{pid}/status"));
    let mut threads = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid = t.file_name().to_string_lossy().to_string();
        let f = status_fields(&format!("/proc/{pid}/task/{tid}/status"));
        let keep: BTreeMap<String, String> = ["SigBlk", "SigPnd", "SigIgn", "SigCgt", "TracerPid"]
            .iter()
            .map(|k| (k.to_string(), f.get(*k).cloned().unwrap_or_default()))
            .collect();
        threads.insert(tid, keep);
    }
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    fds.sort();
    State {
        tracer: st.get("TracerPid").cloned().unwrap_or_default(),
        stopped: st.get("State").is_some_and(|s| s.starts_with('T')),
        threads,
        shared_pending: st.get("ShdPnd").cloned().unwrap_or_default(),
        fds,
    }
}

/// Whether this machine can run the engine at all (else the test prints a loud SKIP).
pub fn engine_usable() -> bool {
    match precopy_tracker::uffd_kernel_features() {
        Ok(f) if f.wp_async() && f.wp_unpopulated() => true,
        other => {
            eprintln!("SKIP: this kernel cannot track with async write-protect: {other:?}");
            false
        }
    }
}
