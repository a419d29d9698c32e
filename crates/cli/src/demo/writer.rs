//! The demo source's writers: threads that dirty pages of a region at a set rate and pattern.
//!
//! Pacing is by wall clock without catching up: a writer that was stopped or throttled skips the
//! writes it missed (beyond a 10 ms burst), so throttling really lowers the dirty rate.

use precopy_sys::mem::Mapping;
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Which pages the writers hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Any page, uniformly at random.
    Uniform,
    /// 90% of writes into a hot set at the start of memory (`--hot-set`), 10% anywhere.
    HotSet,
    /// Each thread sweeps its own slice of memory page after page, wrapping around.
    Sequential,
}

/// One writer's settings.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Pages in the region.
    pub pages: u64,
    /// Pages written per second by this thread (0: none).
    pub pages_per_sec: f64,
    /// Pattern.
    pub pattern: Pattern,
    /// Pages in the hot set.
    pub hot_pages: u64,
    /// This thread's index and the number of threads.
    pub index: u64,
    /// Number of threads.
    pub threads: u64,
}

/// What the writers did, read by the driver from outside with `process_vm_readv` (the layout
/// `ProcessControl::with_counters` expects: operations, then busy nanoseconds).
#[derive(Debug, Default)]
#[repr(C)]
pub struct Counters {
    /// Page writes done.
    pub operations: AtomicU64,
    /// Nanoseconds spent doing them (write-protect faults included), all threads.
    pub busy_ns: AtomicU64,
}

const PAGE: u64 = 4096;
const BURST: f64 = 0.010;

/// Writes forever.
pub fn run(mem: Arc<Mapping>, cfg: WriterConfig, counters: &Counters) {
    if cfg.pages_per_sec <= 0.0 || cfg.pages == 0 {
        return;
    }
    let mut rng = rand::rng();
    let slice = (cfg.pages / cfg.threads).max(1);
    let mut cursor = (cfg.index * slice) % cfg.pages;
    let mut seq: u64 = 0;
    let start = Instant::now();
    let mut done = 0.0f64;
    loop {
        let due = start.elapsed().as_secs_f64() * cfg.pages_per_sec;
        done = done.max(due - BURST * cfg.pages_per_sec);
        let burst = Instant::now();
        let mut ops = 0;
        while done < due {
            let page = match cfg.pattern {
                Pattern::Uniform => rng.random_range(0..cfg.pages),
                Pattern::HotSet if rng.random_ratio(9, 10) => rng.random_range(0..cfg.hot_pages),
                Pattern::HotSet => rng.random_range(0..cfg.pages),
                Pattern::Sequential => {
                    cursor = (cursor + 1) % cfg.pages;
                    cursor
                }
            };
            seq += 1;
            // A fresh value in a different word of the page each time.
            let offset = page * PAGE + (seq % (PAGE / 8)) * 8;
            let value = (cfg.index << 48) | seq;
            if mem.write_u64(offset, value).is_err() {
                return;
            }
            done += 1.0;
            ops += 1;
        }
        if ops > 0 {
            counters.operations.fetch_add(ops, Relaxed);
            counters
                .busy_ns
                .fetch_add(burst.elapsed().as_nanos() as u64, Relaxed);
        }
        // Wake when the next write is due, not every millisecond whatever the rate: many
        // slow writers must not load the CPUs the migration needs.
        let next = (1.0 / cfg.pages_per_sec).clamp(0.001, 0.1);
        std::thread::sleep(Duration::from_secs_f64(next));
    }
}
