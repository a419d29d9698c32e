//! Regression test for writes that tracker + scanner fail to report (found while building the
//! demo; see the report of issue 5). No transfer and no driver are involved: memory with two
//! writer threads, five scanner rounds copying what each reports into a shadow, a pause, a
//! final round; the shadow must then equal the memory. On this machine (Linux 6.18, nested
//! KVM) a few pages out of 64–256 K are lost in most runs at 256 MiB and above, also with every
//! thread pinned to one CPU and with the writers paused while arming. Ignored until the cause
//! is fixed; run with
//! `cargo test --release -p precopy-migrate --test lost_writes -- --ignored --nocapture`
//! (`SIZE_MIB` sets the memory size, default 512).

mod common;

use common::{Guest, PAGE, Pattern, supported};
use precopy_migrate::Workload;
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::{Tracker, Uffd};
use std::ops::Range;

#[test]
#[ignore = "tracker/scanner lose a few concurrent writes at 256 MiB and above; see the doc comment"]
fn every_write_is_reported_under_concurrent_writers() {
    if !supported("every_write_is_reported_under_concurrent_writers") {
        return;
    }
    let size = std::env::var("SIZE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512u64)
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
    let lost: Vec<usize> = now
        .chunks(PAGE as usize)
        .zip(shadow.chunks(PAGE as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert!(
        lost.is_empty(),
        "{} written pages never reported, e.g. page indexes {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// The same check with the scanner taken out: raw `PAGEMAP_SCAN` calls (fast-path masks,
/// `WP_MATCHING | CHECK_WPASYNC`, resume at `walk_end`), to tell a scanner bug from a kernel one.
#[test]
#[ignore = "diagnostic for the lost-writes bug; see the doc comment"]
fn raw_pagemap_scan_reports_every_write() {
    use precopy_sys::abi::{self, PageRegion, PmScanArg, category};
    use precopy_sys::pagemap::{self, EMPTY_REGION};
    if !supported("raw_pagemap_scan_reports_every_write") {
        return;
    }
    let size = std::env::var("SIZE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512u64)
        << 20;
    let guest = Guest::start(size, 2, Pattern::HotSet, 8192.0);
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    tracker.register(guest.mem.range()).unwrap();
    let base = guest.mem.addr();
    let mut buf: Vec<PageRegion> = vec![EMPTY_REGION; 1 << 16];
    let mut scan = |out: &mut Vec<Range<u64>>| {
        let mut addr = base;
        let end = base + size;
        while addr < end {
            let mut arg = PmScanArg {
                size: 0,
                flags: abi::PM_SCAN_WP_MATCHING | abi::PM_SCAN_CHECK_WPASYNC,
                start: addr,
                end,
                walk_end: 0,
                vec: 0,
                vec_len: 0,
                max_pages: 0,
                category_inverted: 0,
                category_mask: category::WRITTEN,
                category_anyof_mask: 0,
                return_mask: category::WRITTEN,
            };
            let n = pagemap::scan(tracker.uffd().pagemap(), &mut arg, &mut buf).unwrap();
            out.extend(buf[..n].iter().map(|r| r.start..r.end));
            addr = arg.walk_end;
        }
        // QUERY=1 adds the scanner's PROCMAP_QUERY after the walk (a diagnostic knob).
        if std::env::var("QUERY").is_ok() {
            tracker.mappings(base..end).unwrap();
        }
    };
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
    guest.mem.read(0, &mut shadow).unwrap();
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut dirty = Vec::new();
        scan(&mut dirty);
        copy(&mut shadow, &dirty);
    }
    guest.callbacks().pause().unwrap();
    let mut dirty = Vec::new();
    scan(&mut dirty);
    copy(&mut shadow, &dirty);
    let now = guest.snapshot();
    let lost = now
        .chunks(PAGE as usize)
        .zip(shadow.chunks(PAGE as usize))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        lost, 0,
        "{lost} written pages never reported by raw PAGEMAP_SCAN"
    );
}
