//! `precopy attach-bench [--runs N] [--json]`: what attaching costs a running process, measured
//! on the Rust fixture (`precopy __target`, writer threads counting their own page writes).
//!
//! - **Attach time**: how long `Uffd::attach` keeps the target's thread stopped (stop, inject
//!   `userfaultfd` + `close`, restore and detach), median and worst of `--runs`, on a target
//!   whose writers run flat out (they compete with the attach for the CPUs) and on a quiet one.
//! - **Slowdown**: the fixture's page writes per second untracked, tracked with a round every
//!   100 ms and every 10 ms, untracked again, one phase after the other in the same run; the
//!   ratio is tracked ÷ the mean of the two untracked phases.
//! - **Rate accuracy**: pages the rounds report written per interval against the page writes
//!   the fixture counted in the same intervals (it writes each page at most once per run, so the
//!   two should agree but for the few stack and library pages it also writes).

use crate::output;
use crate::output::outln;
use anyhow::{Context, Result};
use precopy_migrate::{DirtyLog, TargetLog};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::Uffd;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Most `--runs`.
const MAX_RUNS: u64 = 10_000;

/// `precopy attach-bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Attaches measured per target, 1 to 10000.
    #[arg(long, default_value = "20", value_parser = crate::args::count_in(1, MAX_RUNS), allow_hyphen_values = true)]
    runs: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

struct Fixture {
    child: Child,
    pid: i32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Fixture {
    fn start(threads: u32, pages: u64, rate: u64) -> Result<Fixture> {
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "__target".to_string(),
                threads.to_string(),
                pages.to_string(),
                rate.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fixture")?;
        let stdin = child.stdin.take().context("fixture stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("fixture stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let pid = line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("fixture said {line:?}"))?;
        let mut f = Fixture {
            child,
            pid,
            stdin,
            stdout,
        };
        // Let every writer start.
        let first = f.ops()?;
        while f.ops()? == first {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        Ok(f)
    }

    fn ops(&mut self) -> Result<u64> {
        writeln!(self.stdin, "ops")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .strip_prefix("ops ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("fixture answered {line:?}"))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn attach_times(threads: u32, rate: u64, runs: u32) -> Result<serde_json::Value> {
    let f = Fixture::start(threads, 256, rate)?;
    let (mut stopped, mut stop, mut inject, mut detach, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (uffd, t) = Uffd::attach(f.pid)?;
        drop(uffd);
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        stopped.push(us(t.stopped));
        stop.push(us(t.stop));
        inject.push(us(t.inject));
        detach.push(us(t.detach));
        total.push(us(t.total));
    }
    let worst = stopped.iter().copied().fold(0.0, f64::max);
    Ok(json!({
        "writer_threads": threads,
        "writes_per_sec_per_thread": if rate == 0 { None } else { Some(rate) },
        "runs": runs,
        "stopped_us_median": median(&mut stopped),
        "stopped_us_max": worst,
        "stop_us_median": median(&mut stop),
        "inject_us_median": median(&mut inject),
        "detach_us_median": median(&mut detach),
        "total_us_median": median(&mut total),
    }))
}

/// Page writes per second of `f` over `secs`, with `rounds` every `interval` if given.
fn phase(f: &mut Fixture, log: Option<(&mut TargetLog, Duration)>, secs: f64) -> Result<f64> {
    let start = Instant::now();
    let ops0 = f.ops()?;
    match log {
        None => std::thread::sleep(Duration::from_secs_f64(secs)),
        Some((log, interval)) => {
            let mut out = Vec::new();
            let mut next = start + interval;
            while start.elapsed().as_secs_f64() < secs {
                if let Some(w) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(w);
                }
                next += interval;
                out.clear();
                log.collect(&mut out)?;
            }
        }
    }
    let ops1 = f.ops()?;
    Ok((ops1 - ops0) as f64 / start.elapsed().as_secs_f64())
}

fn slowdown() -> Result<serde_json::Value> {
    // Two writers sweeping 8192 pages each: every round re-arms pages they write again.
    let mut f = Fixture::start(2, 8192, 0)?;
    let before = phase(&mut f, None, 1.0)?;
    let (uffd, _) = Uffd::attach(f.pid)?;
    let mut log = TargetLog::new(uffd, Scanner::new(ScanOptions::default())?)?;
    log.start().map_err(|e| anyhow::anyhow!(e))?;
    let at_100 = phase(&mut f, Some((&mut log, Duration::from_millis(100))), 1.0)?;
    let at_10 = phase(&mut f, Some((&mut log, Duration::from_millis(10))), 1.0)?;
    drop(log);
    let after = phase(&mut f, None, 1.0)?;
    let base = (before + after) / 2.0;
    Ok(json!({
        "writer_threads": 2,
        "pages_per_thread": 8192,
        "untracked_before_ops_per_sec": before,
        "tracked_100ms_rounds_ops_per_sec": at_100,
        "tracked_10ms_rounds_ops_per_sec": at_10,
        "untracked_after_ops_per_sec": after,
        "ratio_100ms": at_100 / base,
        "ratio_10ms": at_10 / base,
    }))
}

fn rate_accuracy() -> Result<serde_json::Value> {
    // 2 × 5000 page writes per second over 2 × 65 536 pages: no page is written twice in the
    // run, so pages written per interval = page writes per interval.
    let mut f = Fixture::start(2, 65536, 5000)?;
    let (uffd, _) = Uffd::attach(f.pid)?;
    let mut log = TargetLog::new(uffd, Scanner::new(ScanOptions::default())?)?;
    log.start().map_err(|e| anyhow::anyhow!(e))?;
    let mut ops = f.ops()?;
    let mut out = Vec::new();
    let (mut reported, mut counted) = (0u64, 0u64);
    let mut per_interval = Vec::new();
    let page = log.page_size();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        out.clear();
        log.collect(&mut out)?;
        let now = f.ops()?;
        let pages: u64 = out.iter().map(|r| (r.end - r.start) / page).sum();
        per_interval.push(json!({"reported_pages": pages, "fixture_writes": now - ops}));
        reported += pages;
        counted += now - ops;
        ops = now;
    }
    Ok(json!({
        "intervals_ms": 100,
        "intervals": per_interval.len(),
        "reported_pages": reported,
        "fixture_page_writes": counted,
        "ratio": reported as f64 / counted.max(1) as f64,
    }))
}

/// `precopy attach-bench`.
pub fn run(args: Args) -> Result<ExitCode> {
    if args.runs == 0 || args.runs > MAX_RUNS {
        return Err(crate::args::invalid(
            "--runs",
            args.runs,
            format!("must be 1 to {MAX_RUNS} attaches per target"),
            "use e.g. --runs 20",
        ));
    }
    let runs = args.runs as u32;
    let busy = attach_times(4, 0, runs)?;
    let quiet = attach_times(4, 1000, runs)?;
    let slow = slowdown()?;
    let rate = rate_accuracy()?;
    let report = json!({
        "attach_busy_target": busy,
        "attach_quiet_target": quiet,
        "slowdown": slow,
        "rate_accuracy": rate,
    });
    if args.json {
        output::print_json(report, None);
        return Ok(ExitCode::SUCCESS);
    }
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    outln!(
        "precopy attach-bench (Rust fixture, {} attaches each)",
        args.runs
    );
    for (name, v) in [
        ("busy (4 writers flat out)", &busy),
        ("quiet (4 × 1000 writes/s)", &quiet),
    ] {
        outln!(
            "  attach, {name}: thread stopped {:.0} µs median, {:.0} µs worst (stop {:.0}, inject {:.0}, detach {:.0}); whole call {:.0} µs",
            f(v, "stopped_us_median"),
            f(v, "stopped_us_max"),
            f(v, "stop_us_median"),
            f(v, "inject_us_median"),
            f(v, "detach_us_median"),
            f(v, "total_us_median"),
        );
    }
    outln!(
        "  slowdown: {:.0} writes/s untracked, {:.0} with 100 ms rounds ({:.2}×), {:.0} with 10 ms rounds ({:.2}×), {:.0} untracked after",
        f(&slow, "untracked_before_ops_per_sec"),
        f(&slow, "tracked_100ms_rounds_ops_per_sec"),
        f(&slow, "ratio_100ms"),
        f(&slow, "tracked_10ms_rounds_ops_per_sec"),
        f(&slow, "ratio_10ms"),
        f(&slow, "untracked_after_ops_per_sec"),
    );
    outln!(
        "  rate: rounds reported {} pages, the fixture counted {} page writes ({:.3}×)",
        rate["reported_pages"],
        rate["fixture_page_writes"],
        f(&rate, "ratio")
    );
    Ok(ExitCode::SUCCESS)
}
