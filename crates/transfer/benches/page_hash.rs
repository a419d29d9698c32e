//! Candidate page hashes on this CPU: the per-page check every page gets at both ends of a
//! transfer. Measured two ways, both as CPU time of the measuring thread (so other processes on
//! a loaded machine do not count):
//!
//! - `cache`: one 4 KiB page hashed over and over (it stays in L1): the hash's own speed;
//! - `memory`: every 4 KiB page of a 256 MiB buffer in turn (far larger than the caches): what a
//!   sender meets reading guest RAM, with and without first copying each page into a
//!   cache-resident scratch page (the "snapshot" the own-memory path took before hashing).
//!
//! Prints a table of GB/s and the ratio to `crc-fast` (the page CRC32C before the switch) at the
//! end. `cargo bench -p precopy-transfer --bench page_hash`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use nix::time::{ClockId, clock_gettime};

const PAGE: usize = 4096;
const MEMORY: usize = 256 << 20;

/// Per configuration: (bytes hashed, thread CPU seconds) of every sample.
static SAMPLES: Mutex<BTreeMap<String, (f64, f64)>> = Mutex::new(BTreeMap::new());

fn thread_cpu() -> Duration {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

type Hash = fn(&[u8]) -> u64;

fn candidates() -> [(&'static str, Hash); 5] {
    [
        ("crc32c", |p| u64::from(crc32c::crc32c(p))),
        ("crc-fast", |p| u64::from(crc_fast::crc32_iscsi(p))),
        ("twox-hash xxh3_64", twox_hash::XxHash3_64::oneshot),
        ("xxhash-rust xxh3_64", xxhash_rust::xxh3::xxh3_64),
        // The engine's page hash: XXH3-64 by AVX-512 where the CPU has it, else twox-hash.
        ("precopy page_hash", precopy_transfer::page_hash),
    ]
}

fn note(name: &str, bytes: u64, cpu: Duration) {
    let mut s = SAMPLES.lock().unwrap();
    let e = s.entry(name.to_owned()).or_default();
    e.0 += bytes as f64;
    e.1 += cpu.as_secs_f64();
}

fn bench(c: &mut Criterion) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut memory = vec![0u8; MEMORY];
    for w in memory.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let page = memory[..PAGE].to_vec();

    let mut g = c.benchmark_group("page_hash_cache");
    g.throughput(Throughput::Bytes(PAGE as u64))
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for (name, hash) in candidates() {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t0 = thread_cpu();
                for _ in 0..iters {
                    black_box(hash(black_box(&page)));
                }
                let cpu = thread_cpu() - t0;
                note(&format!("cache {name}"), iters * PAGE as u64, cpu);
                cpu
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("page_hash_memory");
    g.throughput(Throughput::Bytes(MEMORY as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(300));
    for (name, hash) in candidates() {
        for snapshot in [false, true] {
            let label = if snapshot {
                format!("memory copy+{name}")
            } else {
                format!("memory {name}")
            };
            g.bench_function(label.strip_prefix("memory ").unwrap(), |b| {
                let mut scratch = vec![0u8; PAGE];
                b.iter_custom(|iters| {
                    let t0 = thread_cpu();
                    for _ in 0..iters {
                        for p in memory.chunks_exact(PAGE) {
                            let h = if snapshot {
                                scratch.copy_from_slice(black_box(p));
                                hash(&scratch)
                            } else {
                                hash(black_box(p))
                            };
                            black_box(h);
                        }
                    }
                    let cpu = thread_cpu() - t0;
                    note(&label, iters * MEMORY as u64, cpu);
                    cpu
                })
            });
        }
    }
    g.finish();
}

fn report() {
    let s = SAMPLES.lock().unwrap();
    let rate = |k: &str| s.get(k).map(|(b, t)| b / t / 1e9);
    println!("\npage hash, GB/s of thread CPU time (ratio to crc-fast in the same place):");
    for (k, _) in s.iter() {
        let base = if k.starts_with("cache") {
            "cache crc-fast"
        } else if k.contains("copy+") {
            "memory copy+crc-fast"
        } else {
            "memory crc-fast"
        };
        let (Some(r), Some(b)) = (rate(k), rate(base)) else {
            continue;
        };
        println!("  {k:<36} {r:>7.2} GB/s  {:>5.2}x", r / b);
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    report();
}
