//! Raw kernel ABI: structs, ioctl numbers and flag bits, each checked at compile time.
//!
//! The structs come from `linux-raw-sys` (pure Rust, generated from the kernel's UAPI headers);
//! the ioctl numbers that crate lacks are computed here from the same `_IOWR` formula the kernel
//! uses and asserted against the values measured on Linux 6.18 (see `docs/KERNEL.md`).

use core::mem::size_of;
use linux_raw_sys::general as g;
use linux_raw_sys::ioctl as io;

/// `struct pm_scan_arg`, the argument of `PAGEMAP_SCAN` (Linux 6.7+).
pub type PmScanArg = g::pm_scan_arg;
/// `struct page_region`, one output entry of `PAGEMAP_SCAN`: `[start, end)` plus categories.
pub type PageRegion = g::page_region;
/// `struct uffdio_api`.
pub type UffdioApi = g::uffdio_api;
/// `struct uffdio_register`.
pub type UffdioRegister = g::uffdio_register;
/// `struct uffdio_range`.
pub type UffdioRange = g::uffdio_range;
/// `struct uffdio_writeprotect`.
pub type UffdioWriteprotect = g::uffdio_writeprotect;
/// `struct procmap_query`, the argument of `PROCMAP_QUERY` (Linux 6.11+).
pub type ProcmapQuery = g::procmap_query;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn iowr(ty: u8, nr: u8, size: usize) -> u32 {
    ((IOC_READ | IOC_WRITE) << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`; gated by Linux 6.7.
pub const PAGEMAP_SCAN: u32 = iowr(b'f', 16, size_of::<PmScanArg>());
/// `PROCMAP_QUERY` = `_IOWR('f', 17, struct procmap_query)`; gated by Linux 6.11.
pub const PROCMAP_QUERY: u32 = iowr(b'f', 17, size_of::<ProcmapQuery>());
/// `PIDFD_THREAD` (= `O_EXCL`) for `pidfd_open`: a handle on one thread rather than its
/// process; gated by Linux 6.9.
pub const PIDFD_THREAD: u32 = libc::O_EXCL as u32;
/// `KCMP_VM` (`enum kcmp_type` in `linux/kcmp.h`): `kcmp` compares two processes' address
/// spaces (`mm_struct`); gated by `CONFIG_KCMP` (Linux 3.5+, with `CONFIG_CHECKPOINT_RESTORE`).
pub const KCMP_VM: i32 = 1;
/// `UFFDIO_API`; every userfaultfd kernel.
pub const UFFDIO_API: u32 = io::UFFDIO_API;
/// `UFFDIO_REGISTER`; every userfaultfd kernel (WP mode since 5.7).
pub const UFFDIO_REGISTER: u32 = io::UFFDIO_REGISTER;
/// `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: u32 = io::UFFDIO_UNREGISTER;
/// `UFFDIO_WRITEPROTECT`; Linux 5.7+.
pub const UFFDIO_WRITEPROTECT: u32 = io::UFFDIO_WRITEPROTECT;
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` = `_IO(0xAA, 0)`; Linux 6.1+.
pub const USERFAULTFD_IOC_NEW: u32 = g::USERFAULTFD_IOC << 8;

/// `UFFD_API`, the only API version.
pub const UFFD_API: u64 = g::UFFD_API as u64;
/// `UFFD_USER_MODE_ONLY`: lets an unprivileged process create a uffd.
pub const UFFD_USER_MODE_ONLY: u32 = g::UFFD_USER_MODE_ONLY;
/// Feature: write-protect on hugetlbfs and shmem (5.19+).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
/// Feature: write-protect also unpopulated ptes (6.4+).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = g::UFFD_FEATURE_WP_UNPOPULATED as u64;
/// Feature: asynchronous write-protect faults, resolved by the kernel (6.7+).
pub const UFFD_FEATURE_WP_ASYNC: u64 = g::UFFD_FEATURE_WP_ASYNC as u64;
/// Feature: the owner must read `UFFD_EVENT_FORK` messages (fork blocks until then).
pub const UFFD_FEATURE_EVENT_FORK: u64 = g::UFFD_FEATURE_EVENT_FORK as u64;
/// Feature: the owner must read `UFFD_EVENT_REMAP` messages (mremap blocks until then).
pub const UFFD_FEATURE_EVENT_REMAP: u64 = g::UFFD_FEATURE_EVENT_REMAP as u64;
/// Feature: the owner must read `UFFD_EVENT_REMOVE` messages (madvise DONTNEED/REMOVE blocks
/// until then).
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = g::UFFD_FEATURE_EVENT_REMOVE as u64;
/// Feature: the owner must read `UFFD_EVENT_UNMAP` messages (munmap blocks until then).
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = g::UFFD_FEATURE_EVENT_UNMAP as u64;
/// Kernel-internal bit of a context's features once `UFFDIO_API` was done on it (shown in
/// `/proc/PID/fdinfo/FD`, never in the UAPI).
pub const UFFD_FEATURE_INITIALIZED: u64 = 1 << 31;
/// Register mode: write-protect tracking.
pub const UFFDIO_REGISTER_MODE_WP: u64 = g::UFFDIO_REGISTER_MODE_WP as u64;
/// `UFFDIO_WRITEPROTECT` mode bit: set protection (clear it when absent).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `PAGEMAP_SCAN` flag: write-protect the pages that match (get-and-reset).
pub const PM_SCAN_WP_MATCHING: u64 = g::PM_SCAN_WP_MATCHING as u64;
/// `PAGEMAP_SCAN` flag: fail with `EPERM` on an area not registered for async WP.
pub const PM_SCAN_CHECK_WPASYNC: u64 = g::PM_SCAN_CHECK_WPASYNC as u64;

/// Page categories reported by `PAGEMAP_SCAN`.
pub mod category {
    use linux_raw_sys::general as g;
    /// The VMA is registered for async write-protect.
    pub const WPALLOWED: u64 = g::PAGE_IS_WPALLOWED as u64;
    /// The page is not write-protected ("written").
    pub const WRITTEN: u64 = g::PAGE_IS_WRITTEN as u64;
    /// File-backed page.
    pub const FILE: u64 = g::PAGE_IS_FILE as u64;
    /// Present in memory.
    pub const PRESENT: u64 = g::PAGE_IS_PRESENT as u64;
    /// Swapped, or a uffd-wp marker.
    pub const SWAPPED: u64 = g::PAGE_IS_SWAPPED as u64;
    /// Maps the zero page.
    pub const PFNZERO: u64 = g::PAGE_IS_PFNZERO as u64;
    /// Part of a huge page (THP or hugetlb).
    pub const HUGE: u64 = g::PAGE_IS_HUGE as u64;
    /// Soft-dirty (needs `CONFIG_MEM_SOFT_DIRTY`).
    pub const SOFT_DIRTY: u64 = g::PAGE_IS_SOFT_DIRTY as u64;
    /// Guard region (6.15+).
    pub const GUARD: u64 = g::PAGE_IS_GUARD as u64;
    /// Every category with its name, in bit order, for probes and reports.
    pub const ALL: [(&str, u64); 9] = [
        ("WPALLOWED", WPALLOWED),
        ("WRITTEN", WRITTEN),
        ("FILE", FILE),
        ("PRESENT", PRESENT),
        ("SWAPPED", SWAPPED),
        ("PFNZERO", PFNZERO),
        ("HUGE", HUGE),
        ("SOFT_DIRTY", SOFT_DIRTY),
        ("GUARD", GUARD),
    ];
}

// Layouts and numbers measured on Linux 6.18 x86_64 (docs/KERNEL.md). A mismatch is a build error,
// not a runtime surprise.
const _: () = assert!(size_of::<PmScanArg>() == 96);
const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(size_of::<ProcmapQuery>() == 104);
const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
#[cfg(target_arch = "x86_64")]
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);
#[cfg(target_arch = "x86_64")]
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);
#[cfg(target_arch = "x86_64")]
const _: () = assert!(PROCMAP_QUERY == 0xC068_6611);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xAA00);
const _: () = assert!(PM_SCAN_WP_MATCHING == 1 << 0);
const _: () = assert!(PM_SCAN_CHECK_WPASYNC == 1 << 1);
const _: () = assert!(UFFD_FEATURE_WP_HUGETLBFS_SHMEM == 1 << 12);
const _: () = assert!(UFFD_FEATURE_WP_UNPOPULATED == 1 << 13);
const _: () = assert!(UFFD_FEATURE_WP_ASYNC == 1 << 15);
const _: () = assert!(UFFD_FEATURE_EVENT_FORK == 1 << 1);
const _: () = assert!(UFFD_FEATURE_EVENT_REMAP == 1 << 2);
const _: () = assert!(UFFD_FEATURE_EVENT_REMOVE == 1 << 3);
const _: () = assert!(UFFD_FEATURE_EVENT_UNMAP == 1 << 6);
const _: () = assert!(category::WRITTEN == 1 << 1);
const _: () = assert!(category::GUARD == 1 << 8);
