//! `precopy __target THREADS PAGES RATE`: the Rust fixture the attach tests and benchmarks track
//! (the C one is `tests/fixtures/target.c`; same protocol). Worker threads write their own pages
//! (RATE page writes per second each, 0 = flat out) and count them; the main thread answers
//! `ops` with `ops N` and `exit` by exiting. SIGUSR2 is blocked everywhere.

use precopy_sys::mem::Mapping;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Writer threads.
    threads: u32,
    /// Pages per thread.
    pages: u64,
    /// Page writes per second per thread (0: no pause).
    #[arg(default_value_t = 0)]
    rate: u64,
}

const PAGE: u64 = 4096;

fn writer(map: Mapping, pages: u64, rate: u64, ops: Arc<AtomicU64>) {
    let start = Instant::now();
    let mut done: u64 = 0;
    for generation in 1u64.. {
        for p in 0..pages {
            let slot = (generation * 7) % (PAGE / 8);
            // Cannot fail: the offset is inside the mapping.
            let _ = map.write_u64(p * PAGE + slot * 8, generation * 1_000_003 + p);
            ops.fetch_add(1, Ordering::Relaxed);
            done += 1;
            if rate > 0 {
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
}

/// Runs the fixture until `exit` or end of input.
pub fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let mut block = nix::sys::signal::SigSet::empty();
    block.add(nix::sys::signal::Signal::SIGUSR2);
    nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&block), None)?;
    let ops = Arc::new(AtomicU64::new(0));
    // "ready" only once every writer runs: a thread not yet scheduled still has the
    // all-signals-blocked mask glibc gives it while it is created, which a test comparing the
    // threads' signal state before and after a send would take for a change.
    let started = Arc::new(std::sync::Barrier::new(args.threads as usize + 1));
    for _ in 0..args.threads {
        let map = Mapping::anonymous(args.pages * PAGE)?;
        let (ops, started) = (ops.clone(), started.clone());
        let (pages, rate) = (args.pages, args.rate);
        std::thread::spawn(move || {
            started.wait();
            writer(map, pages, rate, ops)
        });
    }
    started.wait();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {} 0", std::process::id())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "ops" => writeln!(out, "ops {}", ops.load(Ordering::Relaxed))?,
            "exit" => std::process::exit(0),
            other => writeln!(out, "unknown {other}")?,
        }
        out.flush()?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}
