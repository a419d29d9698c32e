//! Regression test for writes that tracker + scanner once failed to report (found while
//! building the demo): memory with two writer threads, five scanner rounds copying what each
//! reports into a shadow, a pause, a final round; the shadow must then equal the memory.
//!
//! The cause: within one `PAGEMAP_SCAN` call the kernel can return a region *below* one it
//! returned earlier (its internal walk restarts), and the scanner merged such a region into the
//! previous one, dropping its pages. The scanner now sorts and merges instead (`round.rs`).
//! `SIZE_MIB` sets the memory size (default 128; the loss showed at 256 and above, most runs).

mod common;

use common::{Guest, Pattern, differing_pages, supported};
use precopy_migrate::Workload;
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::{Tracker, Uffd};
use std::ops::Range;

#[test]
fn every_write_is_reported_under_concurrent_writers() {
    if !supported("every_write_is_reported_under_concurrent_writers") {
        return;
    }
    let size = std::env::var("SIZE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128u64)
        << 20;
    let guest = Guest::start(size, 2, Pattern::HotSet, 8192.0);
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    tracker.register(guest.mem.range()).unwrap();
    // NO_VERIFY=1 skips the scanner's kernel self-test (a diagnostic knob).
    let mut scanner = Scanner::new(ScanOptions {
        verify_kernel: std::env::var("NO_VERIFY").is_err(),
        ..ScanOptions::default()
    })
    .unwrap();
    let base = guest.mem.addr();
    let mut shadow = vec![0u8; size as usize];
    let copy = |shadow: &mut Vec<u8>, ranges: &[Range<u64>]| {
        for r in ranges {
            let off = (r.start - base) as usize;
            let len = (r.end - r.start) as usize;
            guest
                .mem
                .read(off as u64, &mut shadow[off..off + len])
                .unwrap();
        }
    };
    tracker.arm().unwrap();
    // Read after arming: anything written later is reported by a later round.
    guest.mem.read(0, &mut shadow).unwrap();
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let dirty = scanner.round(&tracker).unwrap().dirty().to_vec();
        copy(&mut shadow, &dirty);
    }
    guest.callbacks().pause().unwrap();
    let dirty = scanner.round(&tracker).unwrap().dirty().to_vec();
    copy(&mut shadow, &dirty);
    let now = guest.snapshot();
    let lost = differing_pages(&now, &shadow);
    assert!(
        lost.is_empty(),
        "{} written pages never reported, e.g. page indexes {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}
