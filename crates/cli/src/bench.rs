//! `precopy bench`: every dirty-tracking backend that works on this kernel, side by side on the
//! same memory configurations in the same run.
//!
//! For each configuration (memory size, fraction of pages written per round, write pattern,
//! writer threads, THP on/off) and each backend, the bench maps fresh populated anonymous memory,
//! starts the backend, and runs rounds. In a round the writer threads store one `u64` into each
//! of their pages (timed: "first write" after a reset), store into the same pages again (timed:
//! "steady" writes), and record every page they wrote in an atomic ground-truth bitmap. The
//! writers then stop and the backend collects and resets (timed). Reported pages are compared
//! with the ground truth: *missed* pages (written, not reported) must be zero; *extra* pages
//! (reported, not written) are false positives. The same writers run untracked on the same kind
//! of memory in the same run, so slowdowns are ratios against a baseline measured alongside.
//!
//! The page sets are drawn from a seeded generator per configuration and round, so every
//! backend sees the same writes. Output: a table (stdout, or stderr with `--json`), one JSON
//! object (`--json`, stdout), and files in `--out`: `results.json`, `results.md` and three SVG
//! plots.

mod kvm;

use crate::args::{
    Size, check_fits_memory, count_at_most, count_in, cpus, invalid, parse_count, parse_size,
};
use crate::interrupt::Interrupts;
use crate::output;
use crate::output::out;
use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use precopy_backends::{BackendKind, BoxedDirtyLog, DirtyLog};
use precopy_sys::mem::{Backing, Mapping, Thp};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const HUGE: u64 = 2 * MIB;

/// Where pages are written in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Uniformly random distinct pages, in random order.
    Random,
    /// One contiguous run starting at a random page.
    Sequential,
    /// Every n-th page from a random phase.
    Stride,
}

/// Transparent huge pages for the benchmark memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThpSetting {
    /// `MADV_NOHUGEPAGE`.
    Off,
    /// `MADV_HUGEPAGE` (huge pages form where the system allows).
    On,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the results as one JSON object on stdout (progress and tables go to stderr).
    #[arg(long)]
    json: bool,
    /// Run the whole sweep (long) instead of the quick one.
    #[arg(long)]
    full: bool,
    /// Backends to run, comma-separated: uffd-async, soft-dirty, mprotect, uffd-sync.
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Memory sizes, comma-separated (e.g. 64M,1G).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, allow_hyphen_values = true)]
    sizes: Vec<Size>,
    /// Fractions of pages written per round, comma-separated (0.01 or 1%).
    #[arg(long, value_delimiter = ',', value_parser = parse_fraction, allow_hyphen_values = true)]
    fractions: Vec<f64>,
    /// Write patterns, comma-separated.
    #[arg(long, value_delimiter = ',')]
    patterns: Vec<Pattern>,
    /// Writer thread counts, comma-separated, each 1 to 4 per CPU.
    #[arg(long, value_delimiter = ',', value_parser = parse_count, allow_hyphen_values = true)]
    threads: Vec<u64>,
    /// THP settings, comma-separated (off, on).
    #[arg(long, value_delimiter = ',')]
    thp: Vec<ThpSetting>,
    /// Measured rounds per configuration and backend, 1 to 1000 (default 7; 15 with --full).
    #[arg(long, value_parser = count_in(1, 1000), allow_hyphen_values = true)]
    rounds: Option<u64>,
    /// Unmeasured rounds first, 0 to 100 (accuracy is still checked in them).
    #[arg(long, default_value = "1", value_parser = count_at_most(100), allow_hyphen_values = true)]
    warmup: u64,
    /// Directory for results.json, results.md and the SVG plots [default: out/bench].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write no files.
    #[arg(long)]
    no_files: bool,
    /// Seed of the page-set generator (0 to 2^64-1).
    #[arg(long, default_value = "1", value_parser = parse_count, allow_hyphen_values = true)]
    seed: u64,
    /// Instead of the backends: KVM's dirty log against the engine on a KVM guest's RAM (round
    /// cost and the vCPU's cost per first write; needs /dev/kvm). Uses --sizes (2M to 4G,
    /// default 256M), --fractions (default 0,1%,100%; 0 is only the default's), --rounds (1 to
    /// 1000, default 7) and --json; the backend sweep's other flags are refused with it.
    #[arg(
        long,
        conflicts_with_all = [
            "backends", "threads", "full", "patterns", "thp", "warmup", "out", "no_files", "seed",
        ]
    )]
    kvm: bool,
}

/// Checks every flag against its real limit before anything runs.
fn validate(args: &Args) -> Result<Vec<BackendKind>> {
    for size in &args.sizes {
        if size.bytes < HUGE || size.bytes % HUGE != 0 {
            return Err(invalid(
                "--sizes",
                size,
                format!(
                    "is {} bytes, not a non-zero multiple of 2 MiB (the bench maps 2 MiB-aligned memory)",
                    size.bytes
                ),
                "use e.g. --sizes 64M,1G (K/M/G are binary)",
            ));
        }
        check_fits_memory("--sizes", size, size.bytes, None, |avail| {
            format!("use sizes up to {}M", avail / HUGE * 2)
        })?;
    }
    let max_threads = 4 * cpus();
    for &t in &args.threads {
        if t == 0 || t > max_threads {
            return Err(invalid(
                "--threads",
                t,
                format!(
                    "must be 1 to {max_threads} writer threads here (4 per CPU, {} CPUs)",
                    cpus()
                ),
                format!("use values from 1 to {max_threads}"),
            ));
        }
    }
    if let (true, Some(out)) = (args.no_files, &args.out) {
        return Err(invalid(
            "--out",
            out.display(),
            "names where files go, and --no-files writes none",
            "drop --out or drop --no-files",
        ));
    }
    if args.rounds == Some(0) {
        return Err(invalid(
            "--rounds",
            0,
            "nothing would be measured: at least 1 round",
            "use e.g. --rounds 7",
        ));
    }
    if let Some(r) = args.rounds.filter(|&r| r > 1000) {
        return Err(invalid(
            "--rounds",
            r,
            "must be 1 to 1000 measured rounds",
            "use e.g. --rounds 7",
        ));
    }
    if args.backends.is_empty() {
        return Ok(BackendKind::ALL.to_vec());
    }
    args.backends
        .iter()
        .map(|n| {
            BackendKind::from_name(n.trim()).ok_or_else(|| {
                invalid(
                    "--backends",
                    n,
                    "is not a backend",
                    format!(
                        "choose from {}",
                        BackendKind::ALL.map(|k| k.name()).join(", ")
                    ),
                )
            })
        })
        .collect()
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let f = match s.strip_suffix('%') {
        Some(p) => p.parse::<f64>().map(|v| v / 100.0),
        None => s.parse::<f64>(),
    }
    .map_err(|_| "not a fraction: use e.g. 0.01 or 1%".to_string())?;
    if !(f > 0.0 && f <= 1.0) {
        return Err(
            "a fraction of the pages must be more than 0 and at most 1 (100%), e.g. 0.01 or 1%"
                .into(),
        );
    }
    Ok(f)
}

/// One point of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Config {
    size_bytes: u64,
    fraction: f64,
    pattern: Pattern,
    threads: usize,
    thp: ThpSetting,
}

impl Config {
    fn pages(&self, page: u64) -> u64 {
        self.size_bytes / page
    }
    fn written(&self, page: u64) -> u64 {
        ((self.pages(page) as f64 * self.fraction).round() as u64).clamp(1, self.pages(page))
    }
    fn label(&self) -> String {
        format!(
            "{} {} {} x{} THP {}",
            human_size(self.size_bytes),
            pct(self.fraction),
            format!("{:?}", self.pattern).to_lowercase(),
            self.threads,
            format!("{:?}", self.thp).to_lowercase()
        )
    }
}

fn human_size(b: u64) -> String {
    if b >= GIB && b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else {
        format!("{} MiB", b / MIB)
    }
}

fn pct(f: f64) -> String {
    let p = f * 100.0;
    if p >= 1.0 {
        format!("{p:.0}%")
    } else {
        format!("{p}%")
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
struct RoundSample {
    collect_us: f64,
    first_write_ns: f64,
    steady_write_ns: f64,
    written_pages: u64,
    reported_pages: u64,
    missed_pages: u64,
    extra_pages: u64,
    syscalls: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// The outcome of one backend (or the untracked baseline) on one configuration.
#[derive(Debug, Clone, Serialize)]
struct Measurement {
    backend: String,
    method: String,
    config: Config,
    /// Why this backend was not run on this configuration.
    skipped: Option<String>,
    start_ms: f64,
    collect_us: Spread,
    first_write_ns: Spread,
    steady_write_ns: Spread,
    /// Median first-write time over the untracked writers' in the same run.
    first_write_slowdown: Option<f64>,
    /// Median first-write time minus the untracked writers'.
    first_write_overhead_ns: Option<f64>,
    steady_write_slowdown: Option<f64>,
    written_pages: u64,
    missed_pages: u64,
    extra_pages: u64,
    /// Extra pages per written page.
    extra_ratio: f64,
    syscalls_per_collect: f64,
    rounds: Vec<RoundSample>,
}

impl Measurement {
    fn skipped(backend: &str, config: Config, why: String) -> Measurement {
        Measurement {
            backend: backend.into(),
            method: String::new(),
            config,
            skipped: Some(why),
            start_ms: 0.0,
            collect_us: Spread::default(),
            first_write_ns: Spread::default(),
            steady_write_ns: Spread::default(),
            first_write_slowdown: None,
            first_write_overhead_ns: None,
            steady_write_slowdown: None,
            written_pages: 0,
            missed_pages: 0,
            extra_pages: 0,
            extra_ratio: 0.0,
            syscalls_per_collect: 0.0,
            rounds: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize)]
struct BackendStatus {
    name: &'static str,
    mechanism: &'static str,
    selected: bool,
    available: bool,
    reason: Option<String>,
    /// What `read(2)` into tracked memory does with this backend (`None`: not available).
    kernel_writes: Option<precopy_backends::KernelWrites>,
}

#[derive(Debug, Serialize)]
struct Target {
    name: &'static str,
    goal: String,
    /// `None`: could not be measured here (the reason is in `detail`).
    met: Option<bool>,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Host {
    kernel: String,
    page_size: u64,
    cpus: usize,
    thp_mode: String,
    max_map_count: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    host: Host,
    command: String,
    sweep: &'static str,
    rounds: usize,
    warmup: usize,
    seed: u64,
    backends: Vec<BackendStatus>,
    results: Vec<Measurement>,
    targets: Vec<Target>,
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn host() -> Host {
    let thp_mode = read_trim("/sys/kernel/mm/transparent_hugepage/enabled")
        .and_then(|s| {
            s.split_whitespace()
                .find(|w| w.starts_with('['))
                .map(|w| w.trim_matches(['[', ']']).to_string())
        })
        .unwrap_or_else(|| "unknown (no /sys/kernel/mm/transparent_hugepage)".into());
    Host {
        kernel: read_trim("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
        page_size: precopy_sys::page_size(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        thp_mode,
        max_map_count: max_map_count(),
    }
}

fn max_map_count() -> u64 {
    read_trim("/proc/sys/vm/max_map_count")
        .and_then(|s| s.parse().ok())
        .unwrap_or(65530)
}

fn map_count_now() -> u64 {
    std::fs::read_to_string("/proc/self/maps").map_or(1000, |s| s.lines().count() as u64)
}

/// Which pages of the configuration are written in `round`: the same for every backend.
fn page_set(cfg: &Config, seed: u64, round: usize, page: u64) -> Vec<u64> {
    let n = cfg.pages(page);
    let k = cfg.written(page);
    let mix = seed
        ^ cfg.size_bytes.rotate_left(17)
        ^ cfg.fraction.to_bits().rotate_left(31)
        ^ (cfg.pattern as u64) << 5
        ^ (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut rng = StdRng::seed_from_u64(mix);
    match cfg.pattern {
        Pattern::Random => rand::seq::index::sample(&mut rng, n as usize, k as usize)
            .into_iter()
            .map(|i| i as u64)
            .collect(),
        Pattern::Sequential => {
            let start = rand::Rng::random_range(&mut rng, 0..n);
            (0..k).map(|i| (start + i) % n).collect()
        }
        Pattern::Stride => {
            let stride = (n / k).max(1);
            let phase = rand::Rng::random_range(&mut rng, 0..stride);
            (0..k).map(|i| (phase + i * stride) % n).collect()
        }
    }
}

/// Runs of consecutive pages in `pages` (a VMA each, for mprotect).
fn runs(pages: &[u64]) -> u64 {
    let mut v = pages.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut runs = 0;
    for (i, p) in v.iter().enumerate() {
        if i == 0 || v[i - 1] + 1 != *p {
            runs += 1;
        }
    }
    runs
}

struct Writers<'a> {
    mem: &'a Mapping,
    page: u64,
    truth: &'a [AtomicU64],
}

impl Writers<'_> {
    /// Stores into every page of `pages` from `threads` threads: a timed first pass that also
    /// records ground truth, and a timed second pass. Returns ns per write (first, steady).
    fn round(&self, pages: &[u64], threads: usize, round: usize) -> Result<(f64, f64)> {
        let off = (round as u64 * 8) % self.page;
        let chunk = pages.len().div_ceil(threads).max(1);
        let barrier = Barrier::new(threads.min(pages.len().div_ceil(chunk)));
        let times: Vec<Result<(Duration, Duration)>> = std::thread::scope(|s| {
            let handles: Vec<_> = pages
                .chunks(chunk)
                .map(|part| {
                    let barrier = &barrier;
                    s.spawn(move || -> Result<(Duration, Duration)> {
                        barrier.wait();
                        let t0 = Instant::now();
                        for &p in part {
                            self.mem.write_u64(p * self.page + off, round as u64 ^ p)?;
                            self.truth[(p / 64) as usize]
                                .fetch_or(1 << (p % 64), Ordering::Relaxed);
                        }
                        let t1 = Instant::now();
                        for &p in part {
                            self.mem
                                .write_u64(p * self.page + off, !(round as u64 ^ p))?;
                        }
                        Ok((t1 - t0, t1.elapsed()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("writer thread panicked")))
                .collect()
        });
        let (mut first, mut steady) = (Duration::ZERO, Duration::ZERO);
        for t in times {
            let (a, b) = t?;
            first += a;
            steady += b;
        }
        let n = pages.len().max(1) as f64;
        Ok((first.as_nanos() as f64 / n, steady.as_nanos() as f64 / n))
    }
}

fn fresh_memory(cfg: &Config) -> Result<Mapping> {
    let thp = match cfg.thp {
        ThpSetting::Off => Thp::NoHuge,
        ThpSetting::On => Thp::Huge,
    };
    let mem = Mapping::new(Backing::AnonPrivate, cfg.size_bytes, HUGE, thp)
        .with_context(|| format!("map {}", human_size(cfg.size_bytes)))?;
    mem.fill(0, cfg.size_bytes, 1)
        .context("populate benchmark memory")?;
    Ok(mem)
}

/// Runs one backend (`None`: the untracked baseline) on one configuration.
fn measure(
    cfg: &Config,
    kind: Option<BackendKind>,
    rounds: usize,
    warmup: usize,
    seed: u64,
) -> Result<Measurement> {
    let page = precopy_sys::page_size();
    let name = kind.map_or("untracked", |k| k.name());
    let sets: Vec<Vec<u64>> = (0..warmup + rounds)
        .map(|r| page_set(cfg, seed, r, page))
        .collect();
    if kind == Some(BackendKind::Mprotect) {
        let worst = sets.iter().map(|s| runs(s)).max().unwrap_or(0);
        let need = 2 * worst + 2 + map_count_now();
        let limit = max_map_count();
        if need + 256 > limit {
            return Ok(Measurement::skipped(
                name,
                *cfg,
                format!(
                    "would need about {need} VMAs (one per written run) against vm.max_map_count \
                     = {limit}; the SIGSEGV handler would abort the process"
                ),
            ));
        }
    }
    let mem = fresh_memory(cfg)?;
    let truth: Vec<AtomicU64> = (0..cfg.pages(page).div_ceil(64))
        .map(|_| AtomicU64::new(0))
        .collect();
    let writers = Writers {
        mem: &mem,
        page,
        truth: &truth,
    };
    let mut backend: Option<BoxedDirtyLog> = match kind {
        Some(k) => Some(precopy_backends::open(k, &[mem.range()])?),
        None => None,
    };
    let method = backend.as_ref().map_or_else(
        || "no tracking (same writers, same memory)".to_string(),
        |b| b.method(),
    );
    let t0 = Instant::now();
    if let Some(b) = backend.as_mut() {
        b.start().with_context(|| format!("{name}: start"))?;
    }
    let start_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut reported = vec![0u64; truth.len()];
    let mut samples = Vec::new();
    let (mut missed_total, mut extra_total, mut written_total) = (0, 0, 0);
    for (r, set) in sets.iter().enumerate() {
        let (first_ns, steady_ns) = writers.round(set, cfg.threads, r)?;
        out.clear();
        let t = Instant::now();
        let stats = match backend.as_mut() {
            Some(b) => b
                .collect(&mut out)
                .with_context(|| format!("{name}: collect"))?,
            None => Default::default(),
        };
        let collect_us = t.elapsed().as_secs_f64() * 1e6;
        reported.iter_mut().for_each(|w| *w = 0);
        let base = mem.addr();
        for range in &out {
            let s = range.start.max(base);
            let e = range.end.min(base + cfg.size_bytes);
            let mut a = s;
            while a < e {
                let p = (a - base) / page;
                reported[(p / 64) as usize] |= 1 << (p % 64);
                a += page;
            }
        }
        let (mut written, mut rep, mut missed, mut extra) = (0u64, 0u64, 0u64, 0u64);
        for (t, r) in truth.iter().zip(&reported) {
            let t = t.swap(0, Ordering::Relaxed);
            written += t.count_ones() as u64;
            rep += r.count_ones() as u64;
            if kind.is_some() {
                missed += (t & !r).count_ones() as u64;
                extra += (r & !t).count_ones() as u64;
            }
        }
        missed_total += missed;
        extra_total += extra;
        if r >= warmup {
            written_total += written;
            samples.push(RoundSample {
                collect_us,
                first_write_ns: first_ns,
                steady_write_ns: steady_ns,
                written_pages: written,
                reported_pages: rep,
                missed_pages: missed,
                extra_pages: extra,
                syscalls: stats.syscalls,
            });
        }
    }
    if let Some(b) = backend.as_mut() {
        b.stop().with_context(|| format!("{name}: stop"))?;
    }
    drop(backend);
    Ok(Measurement {
        backend: name.into(),
        method,
        config: *cfg,
        skipped: None,
        start_ms,
        collect_us: Spread::of(samples.iter().map(|s| s.collect_us).collect()),
        first_write_ns: Spread::of(samples.iter().map(|s| s.first_write_ns).collect()),
        steady_write_ns: Spread::of(samples.iter().map(|s| s.steady_write_ns).collect()),
        first_write_slowdown: None,
        first_write_overhead_ns: None,
        steady_write_slowdown: None,
        written_pages: written_total,
        missed_pages: missed_total,
        extra_pages: extra_total,
        extra_ratio: extra_total as f64 / written_total.max(1) as f64,
        syscalls_per_collect: Spread::of(samples.iter().map(|s| s.syscalls as f64).collect())
            .median,
        rounds: samples,
    })
}

struct Sweep {
    name: &'static str,
    configs: Vec<Config>,
    rounds: usize,
}

/// The values given on the command line, else the quick or the full sweep's.
fn pick<T: Clone>(given: &[T], full_sweep: bool, quick: Vec<T>, full: Vec<T>) -> Vec<T> {
    if !given.is_empty() {
        given.to_vec()
    } else if full_sweep {
        full
    } else {
        quick
    }
}

fn sweep(args: &Args) -> Sweep {
    let given: Vec<u64> = args.sizes.iter().map(|s| s.bytes).collect();
    let sizes = pick(&given, args.full, vec![GIB], vec![64 * MIB, 256 * MIB, GIB]);
    let fractions = pick(
        &args.fractions,
        args.full,
        vec![0.001, 0.01, 0.1],
        vec![0.001, 0.01, 0.05, 0.1, 0.25],
    );
    let patterns = pick(
        &args.patterns,
        args.full,
        vec![Pattern::Random, Pattern::Sequential],
        vec![Pattern::Random, Pattern::Sequential, Pattern::Stride],
    );
    let threads = pick(&args.threads, args.full, vec![1], vec![1, 2]);
    let thp = pick(
        &args.thp,
        args.full,
        vec![ThpSetting::Off, ThpSetting::On],
        vec![ThpSetting::Off, ThpSetting::On],
    );
    let mut configs = Vec::new();
    for &size_bytes in &sizes {
        for &thp in &thp {
            for &pattern in &patterns {
                for &threads in &threads {
                    for &fraction in &fractions {
                        configs.push(Config {
                            size_bytes,
                            fraction,
                            pattern,
                            threads: threads.max(1) as usize,
                            thp,
                        });
                    }
                }
            }
        }
    }
    Sweep {
        name: if args.full { "full" } else { "quick" },
        configs,
        rounds: args.rounds.unwrap_or(if args.full { 15 } else { 7 }).max(1) as usize,
    }
}

fn find<'a>(results: &'a [Measurement], backend: &str, cfg: &Config) -> Option<&'a Measurement> {
    results
        .iter()
        .find(|m| m.backend == backend && m.config == *cfg && m.skipped.is_none())
}

/// The configuration the targets are judged at: 1 GiB, 1 %, THP off, random, the fewest
/// threads; or the closest the sweep has (the largest size with 1 %).
fn headline(configs: &[Config]) -> Option<Config> {
    let mut c: Vec<&Config> = configs
        .iter()
        .filter(|c| (c.fraction - 0.01).abs() < 1e-9 && c.thp == ThpSetting::Off)
        .collect();
    c.sort_by_key(|c| {
        (
            c.size_bytes != GIB,
            std::cmp::Reverse(c.size_bytes),
            c.pattern != Pattern::Random,
            c.threads,
        )
    });
    c.first().map(|c| **c)
}

fn targets(results: &[Measurement], configs: &[Config], statuses: &[BackendStatus]) -> Vec<Target> {
    let mut out = Vec::new();
    let why_missing = |name: &str| -> String {
        match statuses.iter().find(|s| s.name == name) {
            Some(s) if !s.available => format!(
                "{name} unavailable here: {}",
                s.reason.as_deref().unwrap_or("?")
            ),
            Some(s) if !s.selected => format!("{name} not selected (--backends)"),
            _ => format!("{name} not measured at this configuration"),
        }
    };
    let h = headline(configs);
    let at = h.map(|c| c.label()).unwrap_or_default();
    let note = match h {
        Some(c) if c.size_bytes == GIB => String::new(),
        Some(c) => format!(" (at {} instead of 1 GiB)", human_size(c.size_bytes)),
        None => String::new(),
    };
    let engine = h.and_then(|c| find(results, "uffd-async", &c));

    let goal = "uffd-async round cost >= 5x cheaper than soft-dirty (1 GiB, 1 % written, THP off)";
    out.push(match (h, engine) {
        (None, _) => Target {
            name: "round-cost-vs-soft-dirty",
            goal: goal.into(),
            met: None,
            detail: "sweep has no 1 %/THP-off configuration (try --fractions 1% --thp off)".into(),
        },
        (Some(c), Some(e)) => match find(results, "soft-dirty", &c) {
            Some(sd) => {
                let ratio = sd.collect_us.median / e.collect_us.median.max(1e-9);
                Target {
                    name: "round-cost-vs-soft-dirty",
                    goal: goal.into(),
                    met: Some(ratio >= 5.0),
                    detail: format!(
                        "{at}{note}: soft-dirty {:.0} us vs uffd-async {:.0} us median = {ratio:.2}x",
                        sd.collect_us.median, e.collect_us.median
                    ),
                }
            }
            None => Target {
                name: "round-cost-vs-soft-dirty",
                goal: goal.into(),
                met: None,
                detail: format!("not measurable here: {}", why_missing("soft-dirty")),
            },
        },
        (Some(_), None) => Target {
            name: "round-cost-vs-soft-dirty",
            goal: goal.into(),
            met: None,
            detail: format!("not measurable here: {}", why_missing("uffd-async")),
        },
    });

    for (name, other) in [
        ("first-write-vs-mprotect", "mprotect"),
        ("first-write-vs-uffd-sync", "uffd-sync"),
    ] {
        let goal = format!(
            "uffd-async writer slowdown per first write >= 10x lower than {other}'s (added ns per \
             first write over untracked writers; 1 GiB, 1 %, THP off)"
        );
        let t = match (h, engine) {
            (Some(c), Some(e)) => match find(results, other, &c) {
                Some(o) => {
                    let eo = e.first_write_overhead_ns.unwrap_or(f64::NAN);
                    let oo = o.first_write_overhead_ns.unwrap_or(f64::NAN);
                    let ratio = oo / eo.max(1e-9);
                    Target {
                        name,
                        goal,
                        met: Some(ratio >= 10.0),
                        detail: format!(
                            "{at}{note}: {other} +{oo:.0} ns vs uffd-async +{eo:.0} ns per first \
                             write = {ratio:.2}x (raw {:.0} vs {:.0} ns)",
                            o.first_write_ns.median, e.first_write_ns.median
                        ),
                    }
                }
                None => Target {
                    name,
                    goal,
                    met: None,
                    detail: format!("not measurable here: {}", why_missing(other)),
                },
            },
            _ => Target {
                name,
                goal,
                met: None,
                detail: "not measurable here: no uffd-async measurement at 1 %/THP off".into(),
            },
        };
        out.push(t);
    }

    let measured: Vec<&Measurement> = results
        .iter()
        .filter(|m| m.skipped.is_none() && m.backend != "untracked")
        .collect();
    let missed: Vec<String> = measured
        .iter()
        .filter(|m| m.missed_pages > 0)
        .map(|m| {
            format!(
                "{} at {}: {} pages",
                m.backend,
                m.config.label(),
                m.missed_pages
            )
        })
        .collect();
    out.push(Target {
        name: "zero-missed-pages",
        goal: "no backend misses a written page, in any configuration".into(),
        met: if measured.is_empty() {
            None
        } else {
            Some(missed.is_empty())
        },
        detail: if missed.is_empty() {
            format!("0 missed pages in {} backend runs", measured.len())
        } else {
            missed.join("; ")
        },
    });
    out
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

/// `text` made safe for a markdown table cell: a raw `|` would end the cell.
fn cell(text: impl std::fmt::Display) -> String {
    text.to_string().replace('|', "\\|")
}

fn markdown(report: &Report) -> String {
    let mut s = String::new();
    let h = &report.host;
    let _ = writeln!(
        s,
        "Kernel {}, {} CPUs, page {} B, THP mode `{}`; {} sweep, {} measured rounds (+{} warm-up), seed {}.\n",
        h.kernel,
        h.cpus,
        h.page_size,
        h.thp_mode,
        report.sweep,
        report.rounds,
        report.warmup,
        report.seed
    );
    let _ = writeln!(
        s,
        "| backend | available | mechanism used | read(2) into tracked memory |\n|---|---|---|---|"
    );
    for b in &report.backends {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            cell(b.name),
            if b.available {
                "yes".to_string()
            } else {
                cell(format!("no: {}", b.reason.as_deref().unwrap_or("?")))
            },
            cell(
                report
                    .results
                    .iter()
                    .find(|m| m.backend == b.name && m.skipped.is_none())
                    .map_or(b.mechanism, |m| m.method.as_str())
            ),
            match b.kernel_writes {
                Some(precopy_backends::KernelWrites::Tracked) => "works, reported",
                Some(precopy_backends::KernelWrites::NeedsPrepare) => {
                    "EFAULT unless prepare_kernel_write first"
                }
                None => "",
            }
        );
    }
    let _ = writeln!(
        s,
        "\n| config | backend | collect+reset median (min–max) | vs uffd-async | first write ns | slowdown | steady ns | missed | extra pages |\n|---|---|---|---|---|---|---|---|---|"
    );
    for m in &report.results {
        let cfg = m.config.label();
        if let Some(why) = &m.skipped {
            let _ = writeln!(
                s,
                "| {} | {} | skipped: {} | | | | | | |",
                cell(&cfg),
                cell(&m.backend),
                cell(why)
            );
            continue;
        }
        let engine = find(&report.results, "uffd-async", &m.config);
        let vs = match engine {
            Some(e) if m.backend != "untracked" => {
                format!(
                    "{:.1}x",
                    m.collect_us.median / e.collect_us.median.max(1e-9)
                )
            }
            _ => String::new(),
        };
        let collect = if m.backend == "untracked" {
            "–".to_string()
        } else {
            format!(
                "{} ({}–{})",
                fmt_us(m.collect_us.median),
                fmt_us(m.collect_us.min),
                fmt_us(m.collect_us.max)
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} | {collect} | {vs} | {:.0} | {} | {:.1} | {} | {} ({:.2}/written) |",
            cell(&cfg),
            cell(&m.backend),
            m.first_write_ns.median,
            m.first_write_slowdown
                .map_or("1x (baseline)".into(), |r| format!("{r:.0}x")),
            m.steady_write_ns.median,
            if m.backend == "untracked" {
                "–".into()
            } else {
                m.missed_pages.to_string()
            },
            m.extra_pages,
            m.extra_ratio
        );
    }
    let _ = writeln!(s, "\n| target | met | detail |\n|---|---|---|");
    for t in &report.targets {
        let met = match t.met {
            Some(true) => "**met**",
            Some(false) => "**not met**",
            None => "not measurable",
        };
        let _ = writeln!(s, "| {} | {met} | {} |", cell(&t.goal), cell(&t.detail));
    }
    s
}

// ------------------------------------------------------------------------------------------
// Plots
// ------------------------------------------------------------------------------------------

const COLORS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x7f, 0x7f, 0x7f),
];

fn color_of(backend: &str) -> RGBColor {
    match backend {
        "uffd-async" => COLORS[0],
        "soft-dirty" => COLORS[3],
        "mprotect" => COLORS[1],
        "uffd-sync" => COLORS[2],
        _ => COLORS[4],
    }
}

/// One line of a plot. `alt` draws it in the second style (darker, thinner, triangles), so two
/// series of one backend (THP off and on) stay apart.
struct Series {
    label: String,
    color: RGBColor,
    alt: bool,
    points: Vec<(f64, f64)>,
}

type Panel<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Share of the plot's height kept free above the data, where the legend goes.
const LEGEND_ROOM: f64 = 0.45;

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e}")
}

/// A line plot of `series` in one file (x: fraction written, in %, log scale; y: log scale, or
/// linear from zero when `log_y` is false).
fn line_plot(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    panel(&root, title, y_label, series, log_y)?;
    root.present().map_err(plot_err)
}

fn panel(
    area: &Panel<'_>,
    title: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    if log_y {
        log_panel(area, title, y_label, series)
    } else {
        linear_panel(area, title, y_label, series)
    }
}

fn x_range(series: &[Series]) -> Option<(f64, f64)> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = xs
        .filter(|&x| x > 0.0)
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    (x0 <= x1).then_some((x0 / 1.5, x1 * 1.5))
}

fn linear_panel(area: &Panel<'_>, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let Some((x0, x1)) = x_range(series) else {
        return Ok(());
    };
    let y1 = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    // Room above the data for the legend; a flat zero line still gets a readable axis.
    let top = if y1 > 0.0 {
        y1 / (1.0 - LEGEND_ROOM)
    } else {
        1.0
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((x0..x1).log_scale(), -top * 0.03..top)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("pages written per round (%)")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| {
            if top >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()
        .map_err(plot_err)?;
    draw_lines(&mut chart, series)
}

fn log_panel(area: &Panel<'_>, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let Some((x0, x1)) = x_range(series) else {
        return Ok(());
    };
    let (y0, y1) = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|&y| y > 0.0)
        .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    if y0 > y1 {
        return Ok(());
    }
    let (y0, y1) = (y0 / 2.0, y1 * 2.0);
    // Room above the data for the legend, on a log axis.
    let top = y0 * (y1 / y0).powf(1.0 / (1.0 - LEGEND_ROOM));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..top).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("pages written per round (%)")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| compact(*y))
        .draw()
        .map_err(plot_err)?;
    draw_lines(&mut chart, series)
}

/// An axis label short enough not to run into the axis title: 1k, 20M, 0.05.
fn compact(y: f64) -> String {
    match y {
        y if y >= 1e9 => format!("{}G", y / 1e9),
        y if y >= 1e6 => format!("{}M", y / 1e6),
        y if y >= 1e3 => format!("{}k", y / 1e3),
        y if y >= 1.0 => format!("{y:.0}"),
        y => format!("{y:.2}"),
    }
}

/// The second style's colour: the same hue, darker.
fn darker(c: RGBColor) -> RGBColor {
    let d = |v: u8| (f64::from(v) * 0.55) as u8;
    RGBColor(d(c.0), d(c.1), d(c.2))
}

/// Draws each series as a line with points, and the legend in the room kept above the data.
/// Points at or below zero are kept on a linear axis and dropped on a log one.
fn draw_lines<'b, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'b, SVGBackend<'b>, Cartesian2d<LogCoord<f64>, Y>>,
    series: &[Series],
) -> Result<()> {
    let log_y = chart.y_range().start > 0.0;
    for s in series {
        let (c, width) = if s.alt {
            (darker(s.color), 1)
        } else {
            (s.color, 2)
        };
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| !log_y || p.1 > 0.0)
            .collect();
        let all_zero = !s.points.is_empty() && s.points.iter().all(|p| p.1 == 0.0);
        let label = if all_zero {
            format!("{} (all 0)", s.label)
        } else {
            s.label.clone()
        };
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(width)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        if s.alt {
            chart
                .draw_series(PointSeries::of_element(pts, 5, c, &|p, sz, st| {
                    TriangleMarker::new(p, sz, st.filled())
                }))
                .map_err(plot_err)?;
        } else {
            chart
                .draw_series(PointSeries::of_element(pts, 3, c, &|p, sz, st| {
                    Circle::new(p, sz, st.filled())
                }))
                .map_err(plot_err)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

fn plots(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    let Some(h) = headline(&report.results.iter().map(|m| m.config).collect::<Vec<_>>()) else {
        return Ok(Vec::new());
    };
    let same_slice = |m: &Measurement, thp: ThpSetting| {
        m.skipped.is_none()
            && m.config.size_bytes == h.size_bytes
            && m.config.pattern == h.pattern
            && m.config.threads == h.threads
            && m.config.thp == thp
    };
    let backends: Vec<&str> = report
        .backends
        .iter()
        .filter(|b| b.available && b.selected)
        .map(|b| b.name)
        .collect();
    let slice = format!(
        "{}, {} writes, {} writer{}",
        human_size(h.size_bytes),
        format!("{:?}", h.pattern).to_lowercase(),
        h.threads,
        if h.threads == 1 { "" } else { "s" }
    );
    let series = |f: &dyn Fn(&Measurement) -> Option<f64>, names: &[&str], thp: ThpSetting| {
        names
            .iter()
            .map(|b| {
                let mut pts: Vec<(f64, f64)> = report
                    .results
                    .iter()
                    .filter(|m| m.backend == *b && same_slice(m, thp))
                    .filter_map(|m| f(m).map(|y| (m.config.fraction * 100.0, y)))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series {
                    label: b.to_string(),
                    color: color_of(b),
                    alt: thp == ThpSetting::On,
                    points: pts,
                }
            })
            .collect::<Vec<Series>>()
    };
    let mut written = Vec::new();
    let p = dir.join("round-cost.svg");
    line_plot(
        &p,
        &format!("Collect + reset per round ({slice}, THP off)"),
        "median time per round (us)",
        &series(&|m| Some(m.collect_us.median), &backends, ThpSetting::Off),
        true,
    )?;
    written.push(p);
    let mut with_base = backends.clone();
    with_base.push("untracked");
    let p = dir.join("writer-slowdown.svg");
    line_plot(
        &p,
        &format!("Writer: ns per first write after reset ({slice}, THP off)"),
        "median ns per first write",
        &series(
            &|m| Some(m.first_write_ns.median),
            &with_base,
            ThpSetting::Off,
        ),
        true,
    )?;
    written.push(p);
    // Accuracy: extra pages (false positives) and missed pages (must be 0) side by side, each
    // backend with THP off (round points) and on (triangles, darker).
    let accuracy = |f: &dyn Fn(&Measurement) -> Option<f64>| {
        let mut all: Vec<Series> = Vec::new();
        for thp in [ThpSetting::Off, ThpSetting::On] {
            for mut s in series(f, &backends, thp) {
                if !s.points.is_empty() {
                    s.label = format!("{} THP {}", s.label, format!("{thp:?}").to_lowercase());
                    all.push(s);
                }
            }
        }
        all
    };
    let p = dir.join("accuracy.svg");
    let root = SVGBackend::new(&p, (1200, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (left, right) = root.split_horizontally(600);
    panel(
        &left,
        &format!("Extra pages per page written ({slice})"),
        "false positives / pages written",
        &accuracy(&|m| Some(m.extra_pages as f64 / m.written_pages.max(1) as f64)),
        false,
    )?;
    panel(
        &right,
        "Missed pages (written, not reported: must be 0)",
        "missed pages per run",
        &accuracy(&|m| Some(m.missed_pages as f64)),
        false,
    )?;
    root.present().map_err(plot_err)?;
    drop((left, right, root));
    written.push(p);
    Ok(written)
}

/// Creates `dir` if needed and checks that a file can be made in it.
fn writable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let probe = dir.join(format!(".precopy-bench-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("creating a file in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn write_files(report: &Report, md: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut files = vec![dir.join("results.json"), dir.join("results.md")];
    std::fs::write(&files[0], serde_json::to_string_pretty(report)?)?;
    std::fs::write(&files[1], md)?;
    files.extend(plots(report, dir)?);
    Ok(files)
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.kvm {
        return kvm::run(&args);
    }
    let selected = validate(&args)?;
    if !args.no_files {
        // Where the results go must take files before the bench runs, not after minutes of it.
        let dir = args.out.as_deref().unwrap_or(Path::new("out/bench"));
        // A directory named with --out is made, not the path to it: a missing parent is
        // most likely a typo, refused like any other path flag's (the default's is made).
        if let Some(out) = &args.out {
            let parent = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !parent.is_dir() {
                return Err(invalid(
                    "--out",
                    out.display(),
                    format!("{} is not an existing directory", parent.display()),
                    format!(
                        "create {} first, or choose a directory in an existing one",
                        parent.display()
                    ),
                ));
            }
        }
        writable_dir(dir).map_err(|e| {
            invalid(
                "--out",
                dir.display(),
                format!("cannot write the results there: {e:#}"),
                "choose another directory, or --no-files",
            )
        })?;
    }
    let sw = sweep(&args);
    // Ctrl-C and SIGTERM end in one report too (with --json, the JSON object so far).
    let interrupts = Interrupts::install(None, args.json)?;
    let state = interrupts.state();
    state.set_report(&serde_json::json!({
        "sweep": sw.name,
        "configurations": sw.configs.len(),
        "configurations_done": 0,
    }));
    let host = host();
    crate::output::errln!(
        "precopy bench: kernel {}, {} CPUs, THP mode {}; {} sweep: {} configurations x {} rounds",
        host.kernel,
        host.cpus,
        host.thp_mode,
        sw.name,
        sw.configs.len(),
        sw.rounds
    );
    let mut statuses = Vec::new();
    let mut runnable = Vec::new();
    // Every backend is checked, selected or not: `available` in the report is always a
    // verdict, never a default.
    // A backend says what kernel writes do once it is built over some memory: one page, never
    // started.
    let probe_page = Mapping::new(
        Backing::AnonPrivate,
        precopy_sys::page_size(),
        0,
        Thp::NoHuge,
    )
    .context("map a page to ask each backend about kernel writes")?;
    for kind in BackendKind::ALL {
        let is_selected = selected.contains(&kind);
        let verdict = precopy_backends::check(kind);
        let kernel_writes = match &verdict {
            Ok(()) if is_selected => precopy_backends::open(kind, &[probe_page.range()])
                .ok()
                .map(|b| b.kernel_writes()),
            _ => None,
        };
        match &verdict {
            Ok(()) if is_selected => {
                match kernel_writes {
                    Some(k @ precopy_backends::KernelWrites::NeedsPrepare) => {
                        crate::output::errln!("  {kind:<11} available; {}", k.describe());
                    }
                    _ => crate::output::errln!("  {kind:<11} available"),
                }
                runnable.push(kind);
            }
            Ok(()) => crate::output::errln!("  {kind:<11} available (not selected)"),
            Err(u) => crate::output::errln!("  {kind:<11} UNAVAILABLE: {}", u.reason),
        }
        statuses.push(BackendStatus {
            name: kind.name(),
            mechanism: kind.mechanism(),
            selected: is_selected,
            available: verdict.is_ok(),
            reason: verdict.err().map(|u| u.reason),
            kernel_writes,
        });
    }
    if runnable.is_empty() {
        // Nothing selected can run: no sweep of the baseline alone.
        let why: Vec<String> = statuses
            .iter()
            .filter(|s| s.selected)
            .map(|s| {
                format!(
                    "{}: {}",
                    s.name,
                    s.reason.as_deref().unwrap_or("unavailable")
                )
            })
            .collect();
        // The machine lacks what was asked for: refused as the value it is (status 2), as
        // `demo --backend` refuses it.
        let e = invalid(
            "--backends",
            args.backends.join(","),
            format!(
                "no selected backend works on this machine ({})",
                why.join("; ")
            ),
            "choose others with --backends (see `precopy probe`), or leave it out for all that work",
        );
        let report = serde_json::json!({ "host": host, "backends": statuses, "results": [] });
        return Err(output::fail(args.json, report, e));
    }
    state.update_report(|r| {
        r["host"] = serde_json::to_value(&host).unwrap_or_default();
        r["backends"] = serde_json::to_value(&statuses).unwrap_or_default();
    });
    let started = Instant::now();
    let mut results = Vec::new();
    for (i, cfg) in sw.configs.iter().enumerate() {
        state.update_report(|r| {
            r["configurations_done"] = i.into();
            r["results"] = serde_json::to_value(&results).unwrap_or_default();
        });
        crate::output::errln!("[{}/{}] {}", i + 1, sw.configs.len(), cfg.label());
        let base = measure(cfg, None, sw.rounds, args.warmup as usize, args.seed)?;
        let mut row = vec![base];
        for &kind in &runnable {
            let m = match measure(cfg, Some(kind), sw.rounds, args.warmup as usize, args.seed) {
                Ok(m) => m,
                Err(e) => Measurement::skipped(kind.name(), *cfg, format!("failed: {e:#}")),
            };
            row.push(m);
        }
        let (b_first, b_steady) = (row[0].first_write_ns.median, row[0].steady_write_ns.median);
        for m in row.iter_mut().skip(1).filter(|m| m.skipped.is_none()) {
            m.first_write_slowdown = Some(m.first_write_ns.median / b_first.max(1e-9));
            m.first_write_overhead_ns = Some(m.first_write_ns.median - b_first);
            m.steady_write_slowdown = Some(m.steady_write_ns.median / b_steady.max(1e-9));
        }
        for m in &row {
            match &m.skipped {
                Some(why) => crate::output::errln!("    {:<11} skipped: {why}", m.backend),
                None => crate::output::errln!(
                    "    {:<11} collect {:>10}  first write {:>7.0} ns  steady {:>5.1} ns  missed {}  extra {}",
                    m.backend,
                    if m.backend == "untracked" {
                        "-".into()
                    } else {
                        fmt_us(m.collect_us.median)
                    },
                    m.first_write_ns.median,
                    m.steady_write_ns.median,
                    m.missed_pages,
                    m.extra_pages
                ),
            }
        }
        results.extend(row);
    }
    let configs: Vec<Config> = sw.configs.clone();
    let targets = targets(&results, &configs, &statuses);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = Report {
        host,
        command,
        sweep: sw.name,
        rounds: sw.rounds,
        warmup: args.warmup as usize,
        seed: args.seed,
        backends: statuses,
        results,
        targets,
    };
    let md = markdown(&report);
    let missed = report
        .results
        .iter()
        .any(|m| m.skipped.is_none() && m.missed_pages > 0);
    if args.json {
        crate::output::err_write(format_args!("{md}"), false);
        if !missed {
            output::print_json(serde_json::to_value(&report)?, None);
        }
    } else {
        out!("{md}");
    }
    if !args.no_files {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("out/bench"));
        match write_files(&report, &md, &out) {
            Ok(files) => {
                for f in files {
                    crate::output::errln!("wrote {}", f.display());
                }
            }
            Err(e) => crate::output::errln!(
                "precopy bench: warning: could not write results files: {e:#}"
            ),
        }
    }
    crate::output::errln!("done in {:.1} s", started.elapsed().as_secs_f64());
    if missed {
        let e = anyhow::anyhow!("a backend MISSED written pages (see the table)");
        return Err(output::fail(args.json, serde_json::to_value(&report)?, e));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_cells_escape_pipes() {
        assert_eq!(cell("A | B"), "A \\| B");
        assert_eq!(cell("plain"), "plain");
        assert_eq!(compact(20_000_000.0), "20M");
        assert_eq!(compact(1000.0), "1k");
        assert_eq!(compact(0.05), "0.05");
    }

    #[test]
    fn parses_counts_and_fractions() {
        assert_eq!(parse_count("7"), Ok(7));
        assert!(parse_count("-1").unwrap_err().contains("negative"));
        assert_eq!(parse_fraction("1%").unwrap(), 0.01);
        assert_eq!(parse_fraction("0.25").unwrap(), 0.25);
        assert!(parse_fraction("0").is_err());
        assert!(parse_fraction("150%").is_err());
    }

    #[test]
    fn page_sets_are_distinct_reproducible_and_sized() {
        let page = 4096;
        for pattern in [Pattern::Random, Pattern::Sequential, Pattern::Stride] {
            let cfg = Config {
                size_bytes: 64 * MIB,
                fraction: 0.01,
                pattern,
                threads: 1,
                thp: ThpSetting::Off,
            };
            let a = page_set(&cfg, 7, 3, page);
            assert_eq!(a, page_set(&cfg, 7, 3, page));
            assert_eq!(a.len() as u64, cfg.written(page));
            let mut d = a.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), a.len(), "{pattern:?} repeats pages");
            assert!(a.iter().all(|p| *p < cfg.pages(page)));
        }
        assert_eq!(runs(&[5, 1, 2, 3, 9, 10]), 3);
    }

    #[test]
    fn tiny_bench_reports_no_missed_pages() {
        let cfg = Config {
            size_bytes: 4 * MIB,
            fraction: 0.05,
            pattern: Pattern::Random,
            threads: 2,
            thp: ThpSetting::Off,
        };
        let base = measure(&cfg, None, 2, 1, 1).unwrap();
        assert_eq!(
            base.written_pages,
            2 * cfg.written(precopy_sys::page_size())
        );
        for kind in BackendKind::ALL {
            if let Err(u) = precopy_backends::check(kind) {
                crate::output::errln!("SKIP {kind}: {}", u.reason);
                continue;
            }
            let m = measure(&cfg, Some(kind), 2, 1, 1).unwrap();
            assert_eq!(m.missed_pages, 0, "{kind}");
            assert_eq!(m.rounds.len(), 2);
        }
    }
}
