//! What this kernel offers, and the self-test of the semantics the engine relies on.
//!
//! [`verify`] runs the self-test once per process (the scanner calls it before its first round);
//! a kernel that fails it is refused with [`Error::Untrusted`]: better no engine than one that
//! reports "clean" for memory that was written. [`probe`] gathers the full report that
//! `precopy probe` prints.

use crate::{Error, Result, ScanOptions, Scanner};
use precopy_sys::abi::category;
use precopy_sys::mem::{Advice, Backing, Mapping, Thp};
use precopy_sys::pagemap::{self, EMPTY_REGION};
use precopy_tracker::{Tracker, Uffd};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// One self-test check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// Whether the kernel behaved as the engine needs.
    pub passed: bool,
    /// What was seen.
    pub detail: String,
}

/// Runs the self-test (cheaply, once per process) and refuses a kernel that fails it.
pub fn verify() -> Result<()> {
    static VERDICT: OnceLock<std::result::Result<(), (&'static str, String)>> = OnceLock::new();
    let verdict = VERDICT.get_or_init(|| match self_test() {
        Ok(checks) => match checks.into_iter().find(|c| !c.passed) {
            None => Ok(()),
            Some(c) => Err((c.name, c.detail)),
        },
        Err(e) => Err(("setup", precopy_sys::error_chain(&e))),
    });
    match verdict {
        Ok(()) => Ok(()),
        Err((check, detail)) => Err(Error::Untrusted {
            check,
            detail: detail.clone(),
        }),
    }
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::SelfTestSetup { what, source }
}

fn ranges_str(r: &[Range<u64>], base: u64, page: u64) -> String {
    let parts: Vec<String> = r
        .iter()
        .map(|r| {
            format!(
                "pages {}..{}",
                (r.start - base) / page,
                (r.end - base) / page
            )
        })
        .collect();
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

/// Runs every check of the self-test on fresh memory and returns the outcome of each.
///
/// Fails (rather than returning failed checks) only when the test cannot be set up at all,
/// e.g. no userfaultfd or no async write-protect on this kernel.
pub fn self_test() -> Result<Vec<Check>> {
    let page = precopy_sys::page_size();
    let mut checks = Vec::new();
    let opts = ScanOptions {
        verify_kernel: false,
        ..ScanOptions::default()
    };

    // 4 KiB semantics on 16 pages, half of them populated before arming.
    let mem = Mapping::new(Backing::AnonPrivate, 16 * page, 0, Thp::NoHuge)
        .map_err(setup("map test memory"))?;
    let base = mem.addr();
    mem.fill(0, 8 * page, 0xa5).map_err(setup("populate"))?;
    let mut tracker = Tracker::new(Uffd::new()?);
    tracker.register(mem.range())?;
    tracker.arm()?;
    let mut scanner = Scanner::new(opts)?;
    let dirty = |s: &mut Scanner, t: &Tracker| -> Result<Vec<Range<u64>>> {
        let round = s.round(t)?;
        let mut d = round.dirty().to_vec();
        d.extend(round.untracked().iter().map(|u| u.range.clone()));
        Ok(d)
    };

    let got = dirty(&mut scanner, &tracker)?;
    checks.push(Check {
        name: "clean-start",
        passed: got.is_empty(),
        detail: format!("armed range reported {}", ranges_str(&got, base, page)),
    });

    mem.write_u64(3 * page + 8, 0x1234)
        .map_err(setup("write"))?;
    mem.write_u64(12 * page, 0x5678).map_err(setup("write"))?;
    let first = dirty(&mut scanner, &tracker)?;
    let second = dirty(&mut scanner, &tracker)?;
    let want = vec![
        base + 3 * page..base + 4 * page,
        base + 12 * page..base + 13 * page,
    ];
    checks.push(Check {
        name: "written-reported-once",
        passed: first == want && second.is_empty(),
        detail: format!(
            "wrote pages 3 and 12; first round reported {}, second {}",
            ranges_str(&first, base, page),
            ranges_str(&second, base, page)
        ),
    });

    let _ = mem.read_u64(5 * page).map_err(setup("read"))?;
    let _ = mem.read_u64(14 * page).map_err(setup("read"))?;
    let got = dirty(&mut scanner, &tracker)?;
    checks.push(Check {
        name: "reads-not-reported",
        passed: got.is_empty(),
        detail: format!(
            "read pages 5 and 14; reported {}",
            ranges_str(&got, base, page)
        ),
    });

    mem.advise(page, page, Advice::DontNeed)
        .map_err(setup("madvise"))?;
    let got = dirty(&mut scanner, &tracker)?;
    checks.push(Check {
        name: "dontneed-reported",
        passed: got == vec![base + page..base + 2 * page],
        detail: format!(
            "MADV_DONTNEED on page 1; reported {}",
            ranges_str(&got, base, page)
        ),
    });
    drop(tracker);

    // A whole THP dirtied before arming, then dropped after arming.
    let huge = 2 << 20;
    let thp = Mapping::new(Backing::AnonPrivate, 2 * huge, huge, Thp::Huge)
        .map_err(setup("map THP memory"))?;
    thp.fill(0, 2 * huge, 1).map_err(setup("populate THP"))?;
    let formed = is_huge(&thp, page)?;
    let mut tracker = Tracker::new(Uffd::new()?);
    tracker.register(thp.range())?;
    tracker.arm()?;
    let clean = dirty(&mut scanner, &tracker)?;
    thp.advise(0, huge, Advice::DontNeed)
        .map_err(setup("madvise THP"))?;
    let got = dirty(&mut scanner, &tracker)?;
    let base = thp.addr();
    checks.push(Check {
        name: "thp-drop-reported",
        passed: clean.is_empty() && got == vec![base..base + huge],
        detail: format!(
            "THP {}; after arming reported {}; after MADV_DONTNEED of the first 2 MiB reported {}",
            if formed {
                "formed"
            } else {
                "did not form (THP off?)"
            },
            ranges_str(&clean, base, page),
            ranges_str(&got, base, page)
        ),
    });
    Ok(checks)
}

/// Whether the first page of `mem` is part of a huge page (`PAGE_IS_HUGE`).
fn is_huge(mem: &Mapping, page: u64) -> Result<bool> {
    let pagemap = File::open("/proc/self/pagemap").map_err(setup("open pagemap"))?;
    let mut arg = pagemap::query_arg(mem.addr(), mem.addr() + page, category::HUGE);
    let mut out = [EMPTY_REGION; 1];
    let n = pagemap::scan(pagemap.as_fd(), &mut arg, &mut out).unwrap_or(0);
    Ok(n > 0)
}

/// Whether soft-dirty tracking works here: a page written after `clear_refs` "4" must show
/// pagemap bit 55, and a cleared one must not. On kernels built without
/// `CONFIG_MEM_SOFT_DIRTY` the write to `clear_refs` succeeds but the bit never sets.
pub fn soft_dirty_works() -> (bool, String) {
    let result = (|| -> std::io::Result<(bool, String)> {
        let page = precopy_sys::page_size();
        let mem = Mapping::new(Backing::AnonPrivate, page, 0, Thp::NoHuge)?;
        mem.write_u64(0, 1)?;
        OpenOptions::new()
            .write(true)
            .open("/proc/self/clear_refs")?
            .write_all(b"4")?;
        let pagemap = File::open("/proc/self/pagemap")?;
        let bit55 = |pm: &File| -> std::io::Result<bool> {
            let mut e = [0u8; 8];
            pm.read_exact_at(&mut e, mem.addr() / page * 8)?;
            Ok(u64::from_ne_bytes(e) >> 55 & 1 == 1)
        };
        let after_clear = bit55(&pagemap)?;
        mem.write_u64(0, 2)?;
        let after_write = bit55(&pagemap)?;
        Ok((
            !after_clear && after_write,
            format!("bit 55 after clear_refs: {after_clear}, after a write: {after_write}"),
        ))
    })();
    result.unwrap_or_else(|e| (false, format!("check failed: {e}")))
}

/// The kernel's hugetlb pool.
#[derive(Debug, Clone, Serialize)]
pub struct HugetlbPool {
    /// Default huge page size in bytes.
    pub page_size: u64,
    /// Pages in the pool.
    pub total: u64,
    /// Pages free.
    pub free: u64,
}

/// Everything `precopy probe` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// `uname -r`.
    pub kernel_release: String,
    /// Base page size.
    pub page_size: u64,
    /// A userfaultfd could be created.
    pub userfaultfd: bool,
    /// Raw `UFFD_FEATURE_*` bits the kernel offers.
    pub uffd_features: u64,
    /// `UFFD_FEATURE_WP_ASYNC` (6.7+).
    pub wp_async: bool,
    /// `UFFD_FEATURE_WP_UNPOPULATED` (6.4+).
    pub wp_unpopulated: bool,
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (5.19+).
    pub wp_hugetlbfs_shmem: bool,
    /// The `PAGEMAP_SCAN` ioctl (6.7+).
    pub pagemap_scan: bool,
    /// The `PROCMAP_QUERY` ioctl (6.11+), used to spot unmapped parts cheaply.
    pub procmap_query: bool,
    /// Each `PAGE_IS_*` category and whether the kernel accepts it.
    pub categories: Vec<(String, bool)>,
    /// Soft-dirty works (checked, not assumed).
    pub soft_dirty: bool,
    /// What the soft-dirty check saw.
    pub soft_dirty_detail: String,
    /// `/sys/kernel/mm/transparent_hugepage/enabled`, the selected mode.
    pub thp_mode: String,
    /// hugetlb pool, if the kernel has hugetlb.
    pub hugetlb: Option<HugetlbPool>,
    /// Self-test checks (empty when they could not run).
    pub self_test: Vec<Check>,
    /// Whether the engine (uffd async WP + PAGEMAP_SCAN) can run here.
    pub engine_usable: bool,
    /// Why not, when it cannot.
    pub reason: Option<String>,
}

fn read_trim(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Probes the kernel and runs the self-test.
pub fn probe() -> Probe {
    let page = precopy_sys::page_size();
    let features = precopy_tracker::uffd_kernel_features();
    let bits = features.as_ref().map(|f| f.bits()).unwrap_or(0);
    let flag = |b: u64| bits & b != 0;
    let (pagemap_scan, categories) = probe_pagemap_scan(page);
    let procmap_query = File::open("/proc/self/maps")
        .ok()
        .map(|f| precopy_sys::pagemap::query_vma(f.as_fd(), 0).is_ok())
        .unwrap_or(false);
    let (soft_dirty, soft_dirty_detail) = soft_dirty_works();
    let thp_mode = read_trim("/sys/kernel/mm/transparent_hugepage/enabled")
        .and_then(|s| {
            let start = s.find('[')?;
            let end = s.find(']')?;
            Some(s[start + 1..end].to_string())
        })
        .unwrap_or_else(|| "unavailable".into());
    let hugetlb = procfs::Current::current()
        .ok()
        .and_then(|m: procfs::Meminfo| {
            Some(HugetlbPool {
                page_size: m.hugepagesize?,
                total: m.hugepages_total?,
                free: m.hugepages_free?,
            })
        });
    let (self_test, mut reason) = match self_test() {
        Ok(checks) => {
            let failed = checks
                .iter()
                .find(|c| !c.passed)
                .map(|c| format!("self-test check {} failed: {}", c.name, c.detail));
            (checks, failed)
        }
        Err(e) => (Vec::new(), Some(precopy_sys::error_chain(&e))),
    };
    if !pagemap_scan && reason.is_none() {
        reason = Some("kernel lacks the PAGEMAP_SCAN ioctl (needs Linux 6.7+)".into());
    }
    Probe {
        kernel_release: read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
        page_size: page,
        userfaultfd: features.is_ok(),
        uffd_features: bits,
        wp_async: flag(precopy_sys::abi::UFFD_FEATURE_WP_ASYNC),
        wp_unpopulated: flag(precopy_sys::abi::UFFD_FEATURE_WP_UNPOPULATED),
        wp_hugetlbfs_shmem: flag(precopy_sys::abi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM),
        pagemap_scan,
        procmap_query,
        categories,
        soft_dirty,
        soft_dirty_detail,
        thp_mode,
        hugetlb,
        self_test,
        engine_usable: reason.is_none(),
        reason,
    }
}

/// Whether `PAGEMAP_SCAN` exists, and which category bits it accepts.
fn probe_pagemap_scan(page: u64) -> (bool, Vec<(String, bool)>) {
    let (Ok(mem), Ok(pm)) = (Mapping::anonymous(page), File::open("/proc/self/pagemap")) else {
        return (false, Vec::new());
    };
    let mut out = [EMPTY_REGION; 1];
    let mut try_mask = |mask| {
        let mut arg = pagemap::query_arg(mem.addr(), mem.addr() + page, mask);
        pagemap::scan(pm.as_fd(), &mut arg, &mut out).is_ok()
    };
    let available = try_mask(category::WRITTEN);
    let cats = category::ALL
        .iter()
        .map(|(name, bit)| (name.to_string(), available && try_mask(*bit)))
        .collect();
    (available, cats)
}
