//! `precopy rate --pid PID [--interval MS] [--count N] [--json]`: a running process's exact dirty
//! rate.
//!
//! Like QEMU's `calc-dirty-rate`, but exact instead of sampled: the target is attached
//! (`Uffd::attach`), all its writable memory armed, and every `--interval` one round returns
//! exactly the pages written at least once since the previous one. A dirty rate depends on the
//! interval it is measured over (a page written 100 times in a second counts once per
//! second, but up to 100 times per 10 ms), so the same run is also reported over windows of
//! 2, 5, 10, ... consecutive intervals (the union of their pages, so still exact), together
//! with the working set: every page written at least once during the run.
//!
//! Memory the target maps during the run is tracked from the round that finds it on; its
//! pages are counted as written only when a later round reports them.
//!
//! A stopped target (state `T`: `SIGSTOP`, job control, a debugger) writes nothing: each
//! interval records whether it was stopped when the interval ended, and the report says so
//! (`target_stopped_intervals`, a line in the text) instead of letting 0 pages/s pass for an
//! idle program. Ctrl-C or `SIGTERM` end the run early with the report of the intervals
//! measured so far (and `"interrupted"`), exit status 128 + the signal.

use crate::args::{check_target, count_in, invalid, parse_pid};
use crate::interrupt::Interrupts;
use crate::output;
use crate::output::out;
use anyhow::{Context, Result};
use precopy_migrate::{DirtyLog, TargetLog};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::Uffd;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `precopy rate`.
#[derive(Debug, clap::Args)]
pub struct RateArgs {
    /// The process to measure: a process ID (thread-group ID), not a thread's ID.
    #[arg(long, value_parser = parse_pid, allow_hyphen_values = true)]
    pid: i32,
    /// Milliseconds between rounds (the shortest interval reported), 1 to 3600000.
    #[arg(long, default_value = "100", value_name = "MS", value_parser = count_in(1, MAX_INTERVAL_MS), allow_hyphen_values = true)]
    interval: u64,
    /// Rounds to run, 1 to 100000.
    #[arg(long, default_value = "10", value_name = "N", value_parser = count_in(1, MAX_COUNT), allow_hyphen_values = true)]
    count: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// One interval between two rounds.
#[derive(Debug, Clone, Serialize)]
struct Interval {
    /// End of the interval, from arming, in milliseconds.
    end_ms: f64,
    /// Its length, in milliseconds.
    duration_ms: f64,
    /// Distinct pages written in it.
    pages: u64,
    /// `pages` per second.
    pages_per_sec: f64,
    /// Bytes per second.
    bytes_per_sec: f64,
    /// Whether every thread of the target was stopped (state `T`: SIGSTOP, job control, a
    /// debugger) when the interval ended: a stopped target writes nothing.
    target_stopped: bool,
}

/// The rate over windows of `intervals` consecutive intervals.
#[derive(Debug, Clone, Serialize)]
struct Window {
    /// Intervals per window.
    intervals: u64,
    /// Nominal window length, in milliseconds.
    window_ms: u64,
    /// Whole windows in the run.
    windows: u64,
    /// Mean distinct pages written per window, per second.
    mean_pages_per_sec: f64,
    /// The busiest window's pages per second.
    max_pages_per_sec: f64,
    /// Mean bytes per second.
    mean_bytes_per_sec: f64,
}

/// Sorted, deduplicated page numbers of `ranges`.
fn pages_of(ranges: &[std::ops::Range<u64>], page: u64) -> Vec<u64> {
    let mut v: Vec<u64> = ranges
        .iter()
        .flat_map(|r| (r.start / page)..(r.end / page))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn union_len(sets: &[Vec<u64>]) -> u64 {
    let mut all: Vec<u64> = sets.iter().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    all.len() as u64
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a run measured so far: the whole report is computed from it, at the end or when a
/// signal interrupts the run.
#[derive(Debug, Default)]
struct Measured {
    page: u64,
    interval_ms: u64,
    tracked_bytes: u64,
    added_bytes: u64,
    intervals: Vec<Interval>,
    /// Each interval's written pages, sorted.
    sets: Vec<Vec<u64>>,
    /// Every page written at least once so far.
    working_set: HashSet<u64>,
}

impl Measured {
    /// The rate over windows of 1, 2, 5, ... consecutive intervals.
    fn windows(&self) -> Vec<Window> {
        let measured = self.intervals.len() as u64;
        let mut windows = Vec::new();
        for k in [1u64, 2, 5, 10, 20, 50, 100, 200, 500, 1000] {
            if k > measured {
                break;
            }
            let mut rates = Vec::new();
            for w in 0..measured / k {
                let (a, b) = ((w * k) as usize, ((w + 1) * k) as usize);
                let secs: f64 = self.intervals[a..b]
                    .iter()
                    .map(|i| i.duration_ms)
                    .sum::<f64>()
                    / 1e3;
                rates.push(union_len(&self.sets[a..b]) as f64 / secs);
            }
            let mean = rates.iter().sum::<f64>() / rates.len() as f64;
            windows.push(Window {
                intervals: k,
                window_ms: k * self.interval_ms,
                windows: rates.len() as u64,
                mean_pages_per_sec: mean,
                max_pages_per_sec: rates.iter().copied().fold(0.0, f64::max),
                mean_bytes_per_sec: mean * self.page as f64,
            });
        }
        windows
    }

    fn stopped_intervals(&self) -> u64 {
        self.intervals.iter().filter(|i| i.target_stopped).count() as u64
    }

    /// The report's measured fields (merged into the report object).
    fn summary(&self) -> serde_json::Result<Value> {
        let working_set = self.working_set.len() as u64;
        let stopped = self.stopped_intervals();
        Ok(json!({
            "page_size": self.page,
            "tracked_bytes": self.tracked_bytes,
            "new_mapping_bytes": self.added_bytes,
            "intervals": serde_json::to_value(&self.intervals)?,
            "windows": serde_json::to_value(self.windows())?,
            "working_set_pages": working_set,
            "working_set_bytes": working_set * self.page,
            "sum_of_interval_pages": self.intervals.iter().map(|i| i.pages).sum::<u64>(),
            "intervals_measured": self.intervals.len(),
            "target_stopped_intervals": stopped,
            "target_stopped": self.intervals.last().is_some_and(|i| i.target_stopped),
        }))
    }

    /// The text report.
    fn text(&self, pid: i32, attach_us: f64) -> String {
        use std::fmt::Write;
        let mib = |b: f64| b / (1024.0 * 1024.0);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "precopy rate: process {pid}, {:.1} MiB tracked, {} intervals of {} ms (attach stopped one thread {attach_us:.0} µs)",
            mib(self.tracked_bytes as f64),
            self.intervals.len(),
            self.interval_ms,
        );
        let stopped = self.stopped_intervals();
        if stopped > 0 {
            let n = self.intervals.len();
            let _ = writeln!(
                t,
                "  TARGET STOPPED (state T: SIGSTOP, job control or a debugger) at the end of {stopped} of {n} intervals: a stopped process writes nothing, so its rate there is 0 (`kill -CONT {pid}` resumes it)"
            );
        }
        let _ = writeln!(t, "  window      mean pages/s    max pages/s    mean MiB/s");
        for w in self.windows() {
            let _ = writeln!(
                t,
                "  {:>6} ms  {:>14.0} {:>14.0} {:>13.1}",
                w.window_ms,
                w.mean_pages_per_sec,
                w.max_pages_per_sec,
                mib(w.mean_bytes_per_sec)
            );
        }
        let ws = self.working_set.len() as u64;
        let _ = writeln!(
            t,
            "  working set: {ws} pages ({:.1} MiB) over {:.1} s",
            mib((ws * self.page) as f64),
            self.intervals.last().map_or(0.0, |i| i.end_ms / 1e3)
        );
        t
    }
}

/// Longest `--interval`, one hour in milliseconds.
const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Most `--count` (the page sets of every interval are kept for the windows).
const MAX_COUNT: u64 = 100_000;

fn check_rate(args: &RateArgs) -> Result<()> {
    check_target(args.pid)?;
    if args.interval == 0 || args.interval > MAX_INTERVAL_MS {
        return Err(invalid(
            "--interval",
            args.interval,
            format!("must be 1 to {MAX_INTERVAL_MS} milliseconds"),
            "use e.g. --interval 100",
        ));
    }
    if args.count == 0 || args.count > MAX_COUNT {
        return Err(invalid(
            "--count",
            args.count,
            format!("must be 1 to {MAX_COUNT} rounds"),
            "use e.g. --count 10",
        ));
    }
    Ok(())
}

/// `precopy rate`.
pub fn run(args: RateArgs) -> Result<ExitCode> {
    let mut report = json!({ "pid": args.pid, "interval_ms": args.interval, "count": args.count });
    let fail = |report: &Value, e: anyhow::Error| output::fail(args.json, report.clone(), e);
    check_rate(&args).map_err(|e| fail(&report, e))?;
    let interrupts =
        Interrupts::install(Some(args.pid), args.json).map_err(|e| fail(&report, e))?;
    interrupts.state().set_report(&report);
    let scanner = Scanner::new(ScanOptions::default())
        .context("this kernel cannot track dirty pages (see `precopy probe`)")
        .map_err(|e| fail(&report, e))?;
    // Before attaching: a stopped thread runs the injected call and stops again only after.
    report["target_stopped_at_start"] = json!(precopy_migrate::all_stopped(args.pid));
    // Reported once the lock is free: a signal meanwhile takes it to report instead.
    let attached = {
        let _attaching = interrupts.state().attaching();
        Uffd::attach_cancellable(args.pid, interrupts.state().attach_cancel())
    };
    let (uffd, times) = attached
        .with_context(|| format!("attaching to process {}", args.pid))
        .map_err(|e| fail(&report, e))?;
    report["attach_us"] = json!(times.stopped.as_secs_f64() * 1e6);
    let mut log = TargetLog::new(uffd, scanner)
        .context("tracking the target's memory")
        .map_err(|e| fail(&report, e))?
        .allow_anywhere();
    let page = log.page_size();
    log.start()
        .map_err(|e| anyhow::anyhow!(e))
        .context("arming the target's memory")
        .map_err(|e| fail(&report, e))?;
    let tracked_bytes = log.tracker().tracked_bytes();
    let measured = Arc::new(Mutex::new(Measured {
        page,
        interval_ms: args.interval,
        tracked_bytes,
        ..Measured::default()
    }));
    // Ctrl-C or SIGTERM: the intervals measured so far are still the report (the signal
    // thread computes it, see `interrupt`).
    {
        let m = measured.clone();
        interrupts
            .state()
            .set_partial(move || lock(&m).summary().unwrap_or_default());
        let m = measured.clone();
        let pid = args.pid;
        let attach_us = times.stopped.as_secs_f64() * 1e6;
        interrupts
            .state()
            .set_partial_text(move || lock(&m).text(pid, attach_us));
    }
    interrupts.state().set_report(&report);
    let armed = Instant::now();
    let mut last = armed;
    let mut dirty = Vec::new();
    // Why the run ended before --count rounds (the target exited): what was measured until
    // then is still reported.
    let mut ended = None;
    for i in 1..=args.count {
        let due = armed + Duration::from_millis(args.interval * i);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        dirty.clear();
        if let Err(e) = log.round(&mut dirty) {
            let e = anyhow::anyhow!(e);
            let so_far = lock(&measured).intervals.len();
            if so_far == 0 || !crate::send::process_gone(args.pid) {
                return Err(fail(&report, e.context(format!("round {i}"))));
            }
            ended = Some(e.context(format!(
                "process {} exited after {} of {} intervals: the figures cover those",
                args.pid, so_far, args.count
            )));
            break;
        }
        let now = Instant::now();
        // Sampled at the end of each interval: a stopped target writes nothing, and its
        // 0 pages/s must not read as an idle program.
        let stopped =
            precopy_migrate::all_stopped(args.pid) && !crate::send::process_gone(args.pid);
        // Whole new mappings are in `dirty` too: not writes.
        let added = &log.last_changes().added;
        let added_bytes = added.iter().map(|r| r.end - r.start).sum::<u64>();
        let mut written = pages_of(&dirty, page);
        if !added.is_empty() {
            let new = pages_of(added, page);
            written.retain(|p| new.binary_search(p).is_err());
        }
        let secs = now.duration_since(last).as_secs_f64();
        let n = written.len() as u64;
        let mut m = lock(&measured);
        m.added_bytes += added_bytes;
        m.intervals.push(Interval {
            end_ms: now.duration_since(armed).as_secs_f64() * 1e3,
            duration_ms: secs * 1e3,
            pages: n,
            pages_per_sec: n as f64 / secs,
            bytes_per_sec: (n * page) as f64 / secs,
            target_stopped: stopped,
        });
        m.working_set.extend(written.iter().copied());
        m.sets.push(written);
        drop(m);
        last = now;
    }
    let m = lock(&measured);
    let summary = m.summary()?;
    if let (Some(r), Value::Object(fields)) = (report.as_object_mut(), summary) {
        r.extend(fields);
    }
    if args.json {
        drop(m);
        if let Some(e) = ended {
            return Err(fail(&report, e));
        }
        output::print_json(report, None);
    } else {
        out!("{}", m.text(args.pid, times.stopped.as_secs_f64() * 1e6));
        drop(m);
        if let Some(e) = ended {
            return Err(fail(&report, e));
        }
    }
    Ok(ExitCode::SUCCESS)
}
