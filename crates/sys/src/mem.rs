//! Owned memory mappings with the raw operations the engine's users, tests and benchmarks need:
//! partial unmap, `MAP_FIXED` replacement, mremap, madvise and mprotect.
//!
//! This is the one place outside the kernel calls that holds raw pointers to mapped memory. The
//! memory may be written by other threads (or the kernel) at any time, the way guest RAM is, so it
//! is never exposed as a Rust slice (except one page at a time to a hash, `live::LivePages::for_each_page`): reads and writes copy through raw pointers, like `vm-memory`'s
//! volatile accessors, and a concurrent writer can at worst make a read see a mix of old and new
//! bytes of that write. All offsets are checked; a bad one is an error, never a wild access.

use crate::cvt;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;

/// What backs a [`Mapping`].
#[derive(Debug)]
pub enum Backing {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`.
    AnonPrivate,
    /// `MAP_SHARED` of a fresh memfd (shmem) of the mapping's length.
    Memfd,
    /// `MAP_SHARED` of this file, grown to the mapping's length if shorter.
    File(File),
    /// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB` with the default huge page size; needs a pool
    /// (`/proc/sys/vm/nr_hugepages`).
    Hugetlb,
    /// `MAP_SHARED | MAP_ANONYMOUS` (shmem with no fd).
    AnonShared,
    /// `MAP_SHARED` of a fresh `MFD_HUGETLB` memfd (default huge page size; needs a pool).
    MemfdHugetlb,
    /// `MAP_PRIVATE` of this file (copy-on-write), grown to the mapping's length if shorter.
    PrivateFile(File),
}

/// Transparent huge page advice applied right after mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Thp {
    /// Leave the system default.
    #[default]
    Default,
    /// `MADV_HUGEPAGE`.
    Huge,
    /// `MADV_NOHUGEPAGE`.
    NoHuge,
}

/// `madvise` advice the engine's users need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages (anonymous memory then reads as zero).
    DontNeed,
    /// `MADV_REMOVE`: punch a hole in shared memory.
    Remove,
    /// `MADV_FREE`: private anonymous pages may be reclaimed lazily (then read as zero).
    Free,
    /// `MADV_PAGEOUT`: reclaim the pages now (Linux 5.4+).
    PageOut,
    /// `MADV_HUGEPAGE`.
    HugePage,
    /// `MADV_NOHUGEPAGE`.
    NoHugePage,
    /// `MADV_GUARD_INSTALL` (Linux 6.15+): turn the pages into guard regions, which fault on
    /// any access (contents dropped); `EINVAL` on older kernels.
    GuardInstall,
}

impl Advice {
    fn raw(self) -> libc::c_int {
        match self {
            Advice::DontNeed => libc::MADV_DONTNEED,
            Advice::Remove => libc::MADV_REMOVE,
            Advice::Free => libc::MADV_FREE,
            Advice::PageOut => libc::MADV_PAGEOUT,
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
            Advice::GuardInstall => linux_raw_sys::general::MADV_GUARD_INSTALL as libc::c_int,
        }
    }
}

/// Page protection for [`Mapping::protect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// `PROT_NONE`.
    None,
    /// `PROT_READ`.
    Read,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

/// An owned mapping, unmapped on drop (except the parts handed away or unmapped earlier).
#[derive(Debug)]
pub struct Mapping {
    addr: u64,
    len: u64,
    /// Sub-ranges (absolute addresses) no longer owned: unmapped or moved away.
    released: Vec<Range<u64>>,
    _fd: Option<OwnedFd>,
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// `mmap` returning an address, or the error.
///
/// # Safety
/// Same contract as `mmap(2)`; with `MAP_FIXED`, `addr..addr+len` must be memory the caller owns.
unsafe fn mmap_raw(
    addr: u64,
    len: u64,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
) -> io::Result<u64> {
    // SAFETY: forwarded to the caller's contract.
    let p = unsafe { libc::mmap(addr as *mut _, len as usize, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p as u64)
    }
}

impl Mapping {
    /// Maps `len` bytes (a multiple of the page size, or of the huge page size for hugetlb),
    /// aligned to `align` (a power of two; at least the page size), with the given THP advice.
    pub fn new(backing: Backing, len: u64, align: u64, thp: Thp) -> io::Result<Mapping> {
        let page = crate::page_size();
        let align = align.max(page);
        if len == 0 || !len.is_multiple_of(page) {
            return Err(invalid(
                "mapping length must be a non-zero multiple of the page size",
            ));
        }
        if !align.is_power_of_two() {
            return Err(invalid("alignment must be a power of two"));
        }
        if len.checked_add(align).is_none_or(|n| n > isize::MAX as u64) {
            return Err(invalid(
                "mapping length plus alignment exceeds the address space",
            ));
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let (flags, fd) = match backing {
            Backing::AnonPrivate => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None),
            Backing::Hugetlb => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                None,
            ),
            Backing::AnonShared => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, None),
            Backing::Memfd | Backing::MemfdHugetlb => {
                let huge = matches!(backing, Backing::MemfdHugetlb);
                let name = CString::new("precopy").map_err(|_| invalid("name"))?;
                let flags = libc::MFD_CLOEXEC | if huge { libc::MFD_HUGETLB } else { 0 };
                // SAFETY: `name` is a valid NUL-terminated string; memfd_create returns a new fd.
                let raw = cvt(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
                // SAFETY: `raw` is a fresh fd nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                File::from(fd.try_clone()?).set_len(len)?;
                let map = libc::MAP_SHARED | if huge { libc::MAP_HUGETLB } else { 0 };
                (map, Some(fd))
            }
            Backing::File(file) => {
                if file.metadata()?.len() < len {
                    file.set_len(len)?;
                }
                (libc::MAP_SHARED, Some(OwnedFd::from(file)))
            }
            Backing::PrivateFile(file) => {
                if file.metadata()?.len() < len {
                    file.set_len(len)?;
                }
                (libc::MAP_PRIVATE, Some(OwnedFd::from(file)))
            }
        };
        let raw_fd = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        let addr = if align > page && flags & libc::MAP_HUGETLB == 0 {
            // Reserve len + align of address space, then map the aligned part over it.
            // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks.
            let base = unsafe {
                mmap_raw(
                    0,
                    len + align,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                )
            }?;
            let aligned = (base + align - 1) & !(align - 1);
            // SAFETY: `aligned..aligned+len` lies inside the reservation this function owns.
            let mapped = unsafe { mmap_raw(aligned, len, prot, flags | libc::MAP_FIXED, raw_fd) };
            let tail = aligned + len;
            for (start, end) in [(base, aligned), (tail, base + len + align)] {
                if end > start {
                    // SAFETY: this part of the reservation lies outside the mapping and is owned
                    // by nobody else.
                    unsafe { libc::munmap(start as *mut _, (end - start) as usize) };
                }
            }
            mapped?
        } else {
            // SAFETY: a fresh mapping at an address the kernel picks.
            unsafe { mmap_raw(0, len, prot, flags, raw_fd) }?
        };
        let mapping = Mapping {
            addr,
            len,
            released: Vec::new(),
            _fd: fd,
        };
        match thp {
            Thp::Default => {}
            Thp::Huge => mapping.advise(0, len, Advice::HugePage)?,
            Thp::NoHuge => mapping.advise(0, len, Advice::NoHugePage)?,
        }
        Ok(mapping)
    }

    /// Private anonymous memory of `len` bytes: the common case.
    pub fn anonymous(len: u64) -> io::Result<Mapping> {
        Mapping::new(Backing::AnonPrivate, len, 0, Thp::Default)
    }

    /// The file or memfd behind the mapping, if any (for `fallocate`, `ftruncate`, `pwrite`, or a
    /// second mapping of the same memory).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self._fd.as_ref().map(|f| f.as_fd())
    }

    /// First address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `addr()..addr() + len()`.
    pub fn range(&self) -> Range<u64> {
        self.addr..self.addr + self.len
    }

    pub(crate) fn check(&self, offset: u64, len: u64) -> io::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(invalid("offset/length outside the mapping")),
        }
        let abs = self.addr + offset;
        if self
            .released
            .iter()
            .any(|r| r.start < abs + len && abs < r.end)
        {
            return Err(invalid("range was unmapped or moved away"));
        }
        Ok(abs)
    }

    fn check_aligned(&self, offset: u64, len: u64) -> io::Result<u64> {
        let page = crate::page_size();
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) || len == 0 {
            return Err(invalid("offset and length must be non-zero page multiples"));
        }
        self.check(offset, len)
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let abs = self.check(offset, data.len() as u64)?;
        // SAFETY: the destination lies inside this live mapping (checked above) and is writable
        // unless the caller protected it (then the write faults, as a guest write would). Other
        // threads may write the same bytes concurrently; the mapping is shared memory by design.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), abs as *mut u8, data.len()) };
        Ok(())
    }

    /// Writes one `u64` at `offset` (aligned to 8) with a volatile store.
    pub fn write_u64(&self, offset: u64, value: u64) -> io::Result<()> {
        if !offset.is_multiple_of(8) {
            return Err(invalid("offset must be 8-byte aligned"));
        }
        let abs = self.check(offset, 8)?;
        // SAFETY: aligned, inside the live mapping (checked above).
        unsafe { ptr::write_volatile(abs as *mut u64, value) };
        Ok(())
    }

    /// Reads one `u64` at `offset` (aligned to 8) with a volatile load.
    pub fn read_u64(&self, offset: u64) -> io::Result<u64> {
        if !offset.is_multiple_of(8) {
            return Err(invalid("offset must be 8-byte aligned"));
        }
        let abs = self.check(offset, 8)?;
        // SAFETY: aligned, inside the live mapping (checked above).
        Ok(unsafe { ptr::read_volatile(abs as *const u64) })
    }

    /// Copies bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let abs = self.check(offset, buf.len() as u64)?;
        // SAFETY: the source lies inside this live mapping (checked above); see `write` on
        // concurrent writers.
        unsafe { ptr::copy_nonoverlapping(abs as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// `read(2)` from `fd` straight into the mapping at `offset`, up to `len` bytes: the kernel
    /// copies into the memory itself, the way a VMM reads a disk block into guest RAM. Returns
    /// the bytes read. A page the kernel cannot write (protected, or registered with a
    /// userfaultfd that does not handle kernel faults) fails the call with `EFAULT`.
    pub fn read_from_fd(&self, offset: u64, len: u64, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let abs = self.check(offset, len)?;
        // SAFETY: the destination lies inside this live mapping (checked above); the kernel
        // writes at most `len` bytes there and reports a fault as EFAULT instead of faulting.
        let n = unsafe { libc::read(fd.as_raw_fd(), abs as *mut libc::c_void, len as usize) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> io::Result<()> {
        let abs = self.check(offset, len)?;
        // SAFETY: inside the live mapping (checked above).
        unsafe { ptr::write_bytes(abs as *mut u8, byte, len as usize) };
        Ok(())
    }

    /// `madvise` on a page-aligned part.
    pub fn advise(&self, offset: u64, len: u64, advice: Advice) -> io::Result<()> {
        let abs = self.check_aligned(offset, len)?;
        // SAFETY: the range is page-aligned and owned by this mapping; the advice kinds offered
        // either only drop contents (which reads then see as zero), change policy, or make
        // accesses fault (guard regions), which the accessors' raw copies meet as a fault
        // exactly as with `protect(Protection::None)`.
        cvt(unsafe { libc::madvise(abs as *mut _, len as usize, advice.raw()) })?;
        Ok(())
    }

    /// `mprotect` on a page-aligned part.
    pub fn protect(&self, offset: u64, len: u64, prot: Protection) -> io::Result<()> {
        let abs = self.check_aligned(offset, len)?;
        let raw = match prot {
            Protection::None => libc::PROT_NONE,
            Protection::Read => libc::PROT_READ,
            Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: the range is page-aligned and owned by this mapping. Accessors above only touch
        // it through checked raw pointers, so a protection change cannot invalidate a reference.
        cvt(unsafe { libc::mprotect(abs as *mut _, len as usize, raw) })?;
        Ok(())
    }

    /// Unmaps a page-aligned part; later accesses to it are refused.
    pub fn unmap(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let abs = self.check_aligned(offset, len)?;
        // SAFETY: the range is owned by this mapping and is not referenced by any Rust value.
        cvt(unsafe { libc::munmap(abs as *mut _, len as usize) })?;
        self.released.push(abs..abs + len);
        Ok(())
    }

    /// Maps fresh zeroed anonymous memory over a page-aligned part with `MAP_FIXED`, the way a
    /// VMM replaces a memory slot: the old contents and any tracking of them are gone.
    pub fn replace_anonymous(&self, offset: u64, len: u64) -> io::Result<()> {
        let abs = self.check_aligned(offset, len)?;
        // SAFETY: the range is owned by this mapping; MAP_FIXED replaces exactly that range.
        unsafe {
            mmap_raw(
                abs,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
            )
        }?;
        Ok(())
    }

    /// Moves a page-aligned part elsewhere with `mremap`; it becomes a hole here and the returned
    /// mapping owns the moved pages.
    pub fn move_out(&mut self, offset: u64, len: u64) -> io::Result<Mapping> {
        let abs = self.check_aligned(offset, len)?;
        // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks.
        let dest = unsafe {
            mmap_raw(
                0,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
            )
        }?;
        // SAFETY: the source is owned by this mapping; the destination is the reservation made
        // above, which MREMAP_FIXED replaces.
        let p = unsafe {
            libc::mremap(
                abs as *mut _,
                len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dest as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: the reservation is still ours and unused.
            unsafe { libc::munmap(dest as *mut _, len as usize) };
            return Err(err);
        }
        self.released.push(abs..abs + len);
        Ok(Mapping {
            addr: p as u64,
            len,
            released: Vec::new(),
            _fd: None,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let mut released = std::mem::take(&mut self.released);
        released.sort_by_key(|r| r.start);
        let mut cursor = self.addr;
        let end = self.addr + self.len;
        for r in released.iter().chain(std::iter::once(&(end..end))) {
            if r.start > cursor {
                // SAFETY: `cursor..r.start` is still owned by this mapping.
                unsafe { libc::munmap(cursor as *mut _, (r.start - cursor) as usize) };
            }
            cursor = cursor.max(r.end);
        }
    }
}

// SAFETY: a Mapping is an address range plus bookkeeping; every access goes through checked raw
// pointer copies that tolerate concurrent use, like shared guest memory.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` methods never create references into the mapped memory.
unsafe impl Sync for Mapping {}

/// Turns transparent huge pages on (`MADV_HUGEPAGE`) or off (`MADV_NOHUGEPAGE`) for a
/// page-aligned range of the calling process. Only the VMA's policy changes, never contents, so
/// any address range is sound to pass; the kernel rejects ranges that are not mapped.
pub fn set_thp(start: u64, len: u64, enabled: bool) -> io::Result<()> {
    let advice = if enabled {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: these two advice values change VMA flags only; they never drop or move contents.
    cvt(unsafe { libc::madvise(start as *mut _, len as usize, advice) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused<T: std::fmt::Debug>(r: io::Result<T>) -> io::Error {
        let e = r.expect_err("must be refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        e
    }

    #[test]
    fn new_refuses_zero_unaligned_and_overflowing_sizes() {
        let page = crate::page_size();
        refused(Mapping::new(Backing::AnonPrivate, 0, 0, Thp::Default));
        refused(Mapping::new(
            Backing::AnonPrivate,
            page + 1,
            0,
            Thp::Default,
        ));
        refused(Mapping::new(
            Backing::AnonPrivate,
            page,
            3 * page,
            Thp::Default,
        ));
        refused(Mapping::new(
            Backing::AnonPrivate,
            u64::MAX - page + 1,
            1 << 21,
            Thp::Default,
        ));
        refused(Mapping::new(
            Backing::AnonPrivate,
            page,
            1 << 63,
            Thp::Default,
        ));
    }

    #[test]
    fn accessors_refuse_offsets_outside_or_overflowing() {
        let page = crate::page_size();
        let mut m = Mapping::anonymous(2 * page).unwrap();
        let mut buf = [0u8; 16];
        refused(m.read(2 * page - 8, &mut buf));
        refused(m.read(u64::MAX - 4, &mut buf));
        refused(m.write(u64::MAX, &buf));
        refused(m.fill(page, u64::MAX, 0));
        refused(m.read_u64(3));
        refused(m.write_u64(2 * page, 1));
        refused(m.advise(1, page, Advice::DontNeed));
        refused(m.advise(0, 0, Advice::DontNeed));
        refused(m.protect(0, 3 * page, Protection::Read));
        refused(m.unmap(page, u64::MAX - page + 1));
        refused(m.replace_anonymous(2 * page, page));
        refused(m.move_out(0, page + 1));
        refused(m.read_from_fd(u64::MAX, 1, std::io::stdin().as_fd()));
        m.unmap(page, page).unwrap();
        let e = refused(m.read(page, &mut buf));
        assert!(e.to_string().contains("unmapped"), "{e}");
    }

    #[test]
    fn read_from_fd_reads_into_the_mapping() {
        use std::io::Write;
        let page = crate::page_size();
        let m = Mapping::anonymous(page).unwrap();
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        tx.write_all(b"guest block").unwrap();
        assert_eq!(m.read_from_fd(100, 11, rx.as_fd()).unwrap(), 11);
        let mut back = [0u8; 11];
        m.read(100, &mut back).unwrap();
        assert_eq!(&back, b"guest block");
    }

    #[test]
    fn read_proc_mem_refuses_a_range_past_u64_max() {
        let e =
            crate::process::read_proc_mem(std::process::id() as i32, u64::MAX - 4, 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }
}
