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

use crate::args::{invalid, parse_count, parse_pid};
use crate::interrupt::Interrupts;
use crate::output;
use crate::output::outln;
use anyhow::{Context, Result};
use precopy_migrate::{DirtyLog, TargetLog};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::Uffd;
use serde::Serialize;
use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `precopy rate`.
#[derive(Debug, clap::Args)]
pub struct RateArgs {
    /// The process to measure: a process ID (thread-group ID), not a thread's ID.
    #[arg(long, value_parser = parse_pid, allow_hyphen_values = true)]
    pid: i32,
    /// Milliseconds between rounds (the shortest interval reported), 1 to 3600000.
    #[arg(long, default_value = "100", value_name = "MS", value_parser = parse_count, allow_hyphen_values = true)]
    interval: u64,
    /// Rounds to run, 1 to 100000.
    #[arg(long, default_value = "10", value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
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

/// Longest `--interval`, one hour in milliseconds.
const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Most `--count` (the page sets of every interval are kept for the windows).
const MAX_COUNT: u64 = 100_000;

fn check_rate(args: &RateArgs) -> Result<()> {
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
    let (uffd, times) = {
        let _attaching = interrupts.state().attaching();
        Uffd::attach(args.pid)
            .with_context(|| format!("attaching to process {}", args.pid))
            .map_err(|e| fail(&report, e))?
    };
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
    let armed = Instant::now();
    let mut last = armed;
    let mut sets: Vec<Vec<u64>> = Vec::new();
    let mut intervals = Vec::new();
    let mut dirty = Vec::new();
    let mut added_bytes = 0u64;
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
            if intervals.is_empty() || !crate::send::process_gone(args.pid) {
                return Err(fail(&report, e.context(format!("round {i}"))));
            }
            ended = Some(e.context(format!(
                "process {} exited after {} of {} intervals: the figures cover those",
                args.pid,
                intervals.len(),
                args.count
            )));
            break;
        }
        let now = Instant::now();
        // Whole new mappings are in `dirty` too: not writes.
        let added = &log.last_changes().added;
        added_bytes += added.iter().map(|r| r.end - r.start).sum::<u64>();
        let mut written = pages_of(&dirty, page);
        if !added.is_empty() {
            let new = pages_of(added, page);
            written.retain(|p| new.binary_search(p).is_err());
        }
        let secs = now.duration_since(last).as_secs_f64();
        let n = written.len() as u64;
        intervals.push(Interval {
            end_ms: now.duration_since(armed).as_secs_f64() * 1e3,
            duration_ms: secs * 1e3,
            pages: n,
            pages_per_sec: n as f64 / secs,
            bytes_per_sec: (n * page) as f64 / secs,
        });
        sets.push(written);
        last = now;
    }
    let measured = intervals.len() as u64;
    let mut windows = Vec::new();
    for k in [1u64, 2, 5, 10, 20, 50, 100, 200, 500, 1000] {
        if k > measured {
            break;
        }
        let mut rates = Vec::new();
        for w in 0..measured / k {
            let (a, b) = ((w * k) as usize, ((w + 1) * k) as usize);
            let secs: f64 = intervals[a..b].iter().map(|i| i.duration_ms).sum::<f64>() / 1e3;
            rates.push(union_len(&sets[a..b]) as f64 / secs);
        }
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        windows.push(Window {
            intervals: k,
            window_ms: k * args.interval,
            windows: rates.len() as u64,
            mean_pages_per_sec: mean,
            max_pages_per_sec: rates.iter().copied().fold(0.0, f64::max),
            mean_bytes_per_sec: mean * page as f64,
        });
    }
    let working_set = union_len(&sets);
    let total_pages: u64 = intervals.iter().map(|i| i.pages).sum();
    report["page_size"] = json!(page);
    report["tracked_bytes"] = json!(log.tracker().tracked_bytes());
    report["new_mapping_bytes"] = json!(added_bytes);
    report["intervals"] = serde_json::to_value(&intervals)?;
    report["windows"] = serde_json::to_value(&windows)?;
    report["working_set_pages"] = json!(working_set);
    report["working_set_bytes"] = json!(working_set * page);
    report["sum_of_interval_pages"] = json!(total_pages);
    report["intervals_measured"] = json!(measured);
    if args.json {
        if let Some(e) = ended {
            return Err(fail(&report, e));
        }
        output::print_json(report, None);
    } else {
        let mib = |b: f64| b / (1024.0 * 1024.0);
        outln!(
            "precopy rate: process {}, {:.1} MiB tracked, {} intervals of {} ms (attach stopped one thread {:.0} µs)",
            args.pid,
            mib(log.tracker().tracked_bytes() as f64),
            measured,
            args.interval,
            times.stopped.as_secs_f64() * 1e6
        );
        outln!("  window      mean pages/s    max pages/s    mean MiB/s");
        for w in &windows {
            outln!(
                "  {:>6} ms  {:>14.0} {:>14.0} {:>13.1}",
                w.window_ms,
                w.mean_pages_per_sec,
                w.max_pages_per_sec,
                mib(w.mean_bytes_per_sec)
            );
        }
        outln!(
            "  working set: {} pages ({:.1} MiB) over {:.1} s",
            working_set,
            mib((working_set * page) as f64),
            last.duration_since(armed).as_secs_f64()
        );
        if let Some(e) = ended {
            return Err(fail(&report, e));
        }
    }
    Ok(ExitCode::SUCCESS)
}
