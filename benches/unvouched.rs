//! What the switch-over re-check of memory the write-protect bit cannot vouch for costs.
//!
//! Over 1 GiB of populated memfd memory (tracked, armed, sent once into an in-memory sink), with
//! 0 % and 1 % (one page at a random offset in every block of 100) of the pages written before
//! each measurement, it times:
//! - a round without the mechanism: `Scanner::round()`;
//! - a final round with it: the same round plus `Transfer::changed_since_sent` over all of the
//!   memfd (re-read, CRC per page, compare with the CRCs of the copies sent).
//!
//! Both run in the same process on the same memory, alternately; it prints the medians of 7
//! and the with/without ratio. The pass re-reads the memory, so its cost grows with the memory
//! size, not with what was written; it is paid once per migration, while the source is paused.
//!
//! Run: `cargo bench -p precopy --bench unvouched`. Needs userfaultfd async write-protect and
//! `PAGEMAP_SCAN` (Linux 6.7+); without them it prints SKIP and exits.

use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::mem::{Backing, Mapping, Thp};
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{Layout, MemorySink, ProcessMemory, Transfer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ops::Range;
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 30;
const PAGE: u64 = 4096;
const RUNS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let uffd = match Uffd::new() {
        Ok(u) => u,
        Err(e) => {
            println!("SKIP unvouched bench: {e}");
            return;
        }
    };
    let mem = Mapping::new(Backing::Memfd, SIZE, 0, Thp::Default).expect("memfd");
    let pages = SIZE / PAGE;
    for p in 0..pages {
        mem.write_u64(p * PAGE, p | 0x5a00_0000_0000_0000).unwrap();
    }
    let mut tracker = Tracker::new(uffd);
    let r = tracker.register(mem.range()).expect("register").clone();
    assert!(r.verify, "memfd memory is unvouched");
    let layout = Layout::single(PAGE, mem.addr(), SIZE).unwrap();
    let sink = MemorySink::new(layout.clone()).unwrap();
    let mut tx = Transfer::new(ProcessMemory::current(), sink, layout, 64).unwrap();
    tracker.arm().unwrap();
    tx.send_round(&[mem.range()]).unwrap();
    let mut scanner = Scanner::new(ScanOptions::default()).expect("scanner");
    let verify = tracker.verify_ranges();
    let mut rng = StdRng::seed_from_u64(0x14);
    let mut seq = 0u64;

    println!("1 GiB memfd, medians of {RUNS}:");
    println!(
        "{:>8} {:>16} {:>16} {:>16} {:>8}",
        "written", "round (ms)", "verify pass (ms)", "round+pass (ms)", "ratio"
    );
    for (label, every) in [("0%", None), ("1%", Some(100u64))] {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            if let Some(block) = every {
                for b in 0..pages / block {
                    seq += 1;
                    let p = b * block + rng.random_range(0..block);
                    mem.write_u64(p * PAGE + 8, seq).unwrap();
                }
            }
            let t = Instant::now();
            let round = scanner.round(&tracker).unwrap();
            let round_time = t.elapsed();
            let mut dirty: Vec<Range<u64>> = round.dirty().to_vec();
            let t = Instant::now();
            let changed = tx.changed_since_sent(&verify).unwrap();
            let pass_time = t.elapsed();
            without.push(round_time);
            with.push(round_time + pass_time);
            // Keep the sent copies current, untimed.
            dirty.extend(changed);
            tx.send_round(&dirty).unwrap();
        }
        let (a, b) = (median(without), median(with));
        println!(
            "{label:>8} {:>16.2} {:>16.1} {:>16.1} {:>7.0}x",
            ms(a),
            ms(b) - ms(a),
            ms(b),
            ms(b) / ms(a)
        );
    }
}
