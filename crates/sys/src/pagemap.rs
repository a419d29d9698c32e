//! `PAGEMAP_SCAN` and `PROCMAP_QUERY` on `/proc/PID/{pagemap,maps}`.

use crate::abi::{self, PageRegion, PmScanArg, ProcmapQuery};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// An all-zero `page_region`; the scanner keeps unused output slots in this state.
pub const EMPTY_REGION: PageRegion = PageRegion {
    start: 0,
    end: 0,
    categories: 0,
};

/// Runs `PAGEMAP_SCAN` with `arg`, writing regions into `out`.
///
/// `arg.vec` and `arg.vec_len` are set here from `out`; every other field is the caller's. On
/// return `arg.walk_end` holds where the walk stopped. Returns the number of regions filled.
///
/// On error the kernel may still have filled a prefix of `out` (it flushes its bounce buffer
/// before returning `EPERM`); callers that need those entries must detect them themselves.
pub fn scan(fd: BorrowedFd<'_>, arg: &mut PmScanArg, out: &mut [PageRegion]) -> io::Result<usize> {
    arg.size = core::mem::size_of::<PmScanArg>() as u64;
    arg.vec = out.as_mut_ptr() as u64;
    arg.vec_len = out.len() as u64;
    // SAFETY: `arg` is a valid pm_scan_arg; `arg.vec` points to `out`, which is writable for
    // `arg.vec_len` page_region entries and outlives the call.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            abi::PAGEMAP_SCAN as _,
            arg as *mut PmScanArg,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// One VMA as `PROCMAP_QUERY` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `PROCMAP_QUERY_VMA_*` flags.
    pub flags: u64,
    /// Page size of the mapping (the huge page size for hugetlb).
    pub page_size: u64,
    /// Inode of the backing file; 0 for anonymous memory (shared anonymous memory has one: it
    /// is shmem).
    pub inode: u64,
}

/// Returns the VMA covering `addr`, or the next one above it, or `None` past the last VMA.
///
/// `maps` is an open `/proc/PID/maps`. Needs Linux 6.11 (`ENOTTY` before).
pub fn query_vma(maps: BorrowedFd<'_>, addr: u64) -> io::Result<Option<Vma>> {
    // COVERING_OR_NEXT_VMA = 16 in the kernel's enum procmap_query_flags.
    const COVERING_OR_NEXT_VMA: u64 = 16;
    // SAFETY: procmap_query is plain integers; all-zero is a valid value.
    let mut q: ProcmapQuery = unsafe { core::mem::zeroed() };
    q.size = core::mem::size_of::<ProcmapQuery>() as u64;
    q.query_flags = COVERING_OR_NEXT_VMA;
    q.query_addr = addr;
    // SAFETY: `q` is a valid procmap_query with no name or build-id buffers requested
    // (their sizes are zero), writable for the duration of the call.
    let ret = unsafe { libc::ioctl(maps.as_raw_fd(), abi::PROCMAP_QUERY as _, &mut q) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    Ok(Some(Vma {
        start: q.vma_start,
        end: q.vma_end,
        flags: q.vma_flags,
        page_size: q.vma_page_size,
        inode: q.inode,
    }))
}

/// The name `/proc/PID/maps` shows for the VMA covering `addr` (a path, `/memfd:NAME
/// (deleted)`, `/dev/zero (deleted)` for shared anonymous memory, `[heap]`...), or `None` when
/// nothing covers `addr` or the VMA has no name. Needs Linux 6.11 (`ENOTTY` before).
pub fn vma_name(maps: BorrowedFd<'_>, addr: u64) -> io::Result<Option<String>> {
    let mut name = vec![0u8; 4096];
    // SAFETY: procmap_query is plain integers; all-zero is a valid value.
    let mut q: ProcmapQuery = unsafe { core::mem::zeroed() };
    q.size = core::mem::size_of::<ProcmapQuery>() as u64;
    q.query_addr = addr;
    q.vma_name_size = name.len() as u32;
    q.vma_name_addr = name.as_mut_ptr() as u64;
    // SAFETY: `q` is a valid procmap_query whose name buffer is `name`, writable for
    // `vma_name_size` bytes and alive for the duration of the call; no build-id buffer.
    let ret = unsafe { libc::ioctl(maps.as_raw_fd(), abi::PROCMAP_QUERY as _, &mut q) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // The kernel sets vma_name_size to the length including the NUL, or 0 for no name.
    let len = (q.vma_name_size as usize).saturating_sub(1).min(name.len());
    if len == 0 {
        return Ok(None);
    }
    name.truncate(len);
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

/// A `PAGEMAP_SCAN` argument that only reports (no flags): pages of `[start, end)` with any of
/// `mask`'s categories, returning those categories.
pub fn query_arg(start: u64, end: u64, mask: u64) -> PmScanArg {
    PmScanArg {
        size: 0,
        flags: 0,
        start,
        end,
        walk_end: 0,
        vec: 0,
        vec_len: 0,
        max_pages: 0,
        category_inverted: 0,
        category_mask: mask,
        category_anyof_mask: 0,
        return_mask: mask,
    }
}

/// The engine's get-and-reset argument: the kernel's fast path (category and return mask =
/// `WRITTEN`, nothing else) with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`.
pub fn written_and_reprotect_arg(start: u64, end: u64) -> PmScanArg {
    PmScanArg {
        flags: abi::PM_SCAN_WP_MATCHING | abi::PM_SCAN_CHECK_WPASYNC,
        ..query_arg(start, end, abi::category::WRITTEN)
    }
}
