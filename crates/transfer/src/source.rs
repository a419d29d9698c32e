//! Where page contents come from: the [`PageSource`] trait, the
//! `process_vm_readv` reader used for any process (including this one), a
//! slice-backed source for tests, and [`memory_checksum`], the memory digest
//! read from a source (what [`FinalCheck::Full`](crate::FinalCheck::Full)
//! compares with the page hashes recorded while sending).
//!
//! A source never invents data: a page it cannot read is a
//! [`SourceError::Unmapped`] (nothing mapped) or [`SourceError::NotReadable`]
//! (mapped, but not readable, and why), never zeros.

use std::io::IoSliceMut;
use std::ops::Range;

use nix::errno::Errno;
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use crate::error::{SourceError, Unreadable};
use crate::layout::Layout;

/// Reads the current contents of source memory.
pub trait PageSource {
    /// Reads the bytes at each of `ranges` (source addresses) into `buf`, one
    /// after the other. `buf.len()` must equal the sum of the range lengths.
    fn read_ranges(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError>;

    /// The pages at `range` (source addresses, inside one mapping) lent
    /// without a copy, when they are this process's own memory (see
    /// [`crate::live`]); `None` (the default): read them with
    /// [`PageSource::read_ranges`].
    fn lend(&mut self, range: Range<u64>) -> Option<precopy_sys::live::LivePages> {
        let _ = range;
        None
    }
}

impl<T: PageSource + ?Sized> PageSource for &mut T {
    fn read_ranges(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).read_ranges(ranges, buf)
    }
    fn lend(&mut self, range: Range<u64>) -> Option<precopy_sys::live::LivePages> {
        (**self).lend(range)
    }
}

impl<T: PageSource + ?Sized> PageSource for Box<T> {
    fn read_ranges(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).read_ranges(ranges, buf)
    }
    fn lend(&mut self, range: Range<u64>) -> Option<precopy_sys::live::LivePages> {
        (**self).lend(range)
    }
}

/// The summed length of `ranges` (`None` if it overflows), or the first
/// inverted range as an error.
fn total_len(ranges: &[Range<u64>]) -> Result<Option<u64>, SourceError> {
    let mut sum: Option<u64> = Some(0);
    for r in ranges {
        if r.end < r.start {
            return Err(SourceError::InvertedRange {
                start: r.start,
                end: r.end,
            });
        }
        sum = sum.and_then(|s| s.checked_add(r.end - r.start));
    }
    Ok(sum)
}

/// Checks `ranges` against `buf` before anything is read.
fn check_request(ranges: &[Range<u64>], buf: &[u8]) -> Result<(), SourceError> {
    let want = total_len(ranges)?;
    if want != Some(buf.len() as u64) {
        return Err(SourceError::BufferSize {
            buf: buf.len(),
            ranges: want.unwrap_or(u64::MAX),
        });
    }
    Ok(())
}

/// Why `addr` of process `pid` could not be read, from its memory map:
/// `None` when nothing is mapped there.
fn why_unreadable(pid: i32, addr: u64) -> Option<Unreadable> {
    use procfs::process::{MMPermissions, Process};
    let Ok(maps) = Process::new(pid).and_then(|p| p.maps()) else {
        return Some(Unreadable::Unknown);
    };
    let m = maps
        .iter()
        .find(|m| m.address.0 <= addr && addr < m.address.1)?;
    let perms = m.perms.as_str();
    if !m.perms.contains(MMPermissions::READ) {
        return Some(Unreadable::NoReadPermission {
            start: m.address.0,
            end: m.address.1,
            perms,
        });
    }
    if is_guard_region(pid, addr) {
        return Some(Unreadable::GuardRegion);
    }
    Some(Unreadable::Refused { perms })
}

/// Whether the page at `addr` of process `pid` is a guard region
/// (`PAGEMAP_SCAN` category `PAGE_IS_GUARD`, Linux 6.15+; `false` where the
/// kernel does not know the category).
fn is_guard_region(pid: i32, addr: u64) -> bool {
    use precopy_sys::abi::category::GUARD;
    use precopy_sys::pagemap::{EMPTY_REGION, query_arg, scan};
    use std::os::fd::AsFd;
    let Ok(pagemap) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else {
        return false;
    };
    let page = precopy_sys::page_size();
    let start = addr & !(page - 1);
    let mut arg = query_arg(start, start.saturating_add(page), GUARD);
    let mut out = [EMPTY_REGION; 1];
    matches!(scan(pagemap.as_fd(), &mut arg, &mut out), Ok(n) if n > 0)
}

/// Reads another process's memory — or this process's — with
/// `process_vm_readv`, many ranges per system call.
///
/// Used for this process too: an unmapped page then comes back as `EFAULT`
/// (a typed error) instead of a crash.
#[derive(Debug, Clone)]
pub struct ProcessMemory {
    pid: Pid,
    iovecs: Vec<RemoteIoVec>,
}

/// Most remote iovecs per `process_vm_readv` call (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

impl ProcessMemory {
    /// A reader of process `pid`'s memory.
    pub fn new(pid: i32) -> ProcessMemory {
        ProcessMemory {
            pid: Pid::from_raw(pid),
            iovecs: Vec::new(),
        }
    }

    /// A reader of this process's memory.
    pub fn current() -> ProcessMemory {
        ProcessMemory::new(nix::unistd::getpid().as_raw())
    }

    /// The process read.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    fn map_errno(&self, errno: Errno, addr: u64, len: u64) -> SourceError {
        let pid = self.pid.as_raw();
        match errno {
            // EFAULT says "not readable" without saying why: the memory map does.
            Errno::EFAULT => match why_unreadable(pid, addr) {
                None => SourceError::Unmapped { addr, len },
                Some(reason) => SourceError::NotReadable { addr, len, reason },
            },
            Errno::ESRCH => SourceError::ProcessGone { pid },
            Errno::EPERM => SourceError::PermissionDenied { pid },
            source => SourceError::Read {
                pid,
                addr,
                len,
                source,
            },
        }
    }
}

impl PageSource for ProcessMemory {
    fn read_ranges(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError> {
        check_request(ranges, buf)?;
        // Remaining work: ranges[i] from byte `skip` on, into buf[done..].
        let mut i = 0;
        let mut skip: u64 = 0;
        let mut done = 0usize;
        while i < ranges.len() {
            self.iovecs.clear();
            let mut batch_len = 0usize;
            for (k, r) in ranges[i..].iter().take(IOV_MAX).enumerate() {
                let start = r.start + if k == 0 { skip } else { 0 };
                let len = (r.end - start) as usize;
                if len == 0 {
                    continue;
                }
                self.iovecs.push(RemoteIoVec {
                    base: start as usize,
                    len,
                });
                batch_len += len;
            }
            if batch_len == 0 {
                i += IOV_MAX.min(ranges.len() - i);
                skip = 0;
                continue;
            }
            let first = ranges[i].start + skip;
            let mut local = [IoSliceMut::new(&mut buf[done..done + batch_len])];
            let n = match process_vm_readv(self.pid, &mut local, &self.iovecs) {
                Ok(0) => return Err(self.map_errno(Errno::EFAULT, first, batch_len as u64)),
                Ok(n) => n,
                Err(e) => return Err(self.map_errno(e, first, batch_len as u64)),
            };
            // Advance over the bytes read; a short read stops at the first
            // unreadable byte, which the next call reports as EFAULT.
            done += n;
            let mut left = n as u64;
            while left > 0 {
                let r = &ranges[i];
                let avail = r.end - r.start - skip;
                if left >= avail {
                    left -= avail;
                    i += 1;
                    skip = 0;
                } else {
                    skip += left;
                    left = 0;
                }
            }
            while i < ranges.len() && ranges[i].start + skip >= ranges[i].end {
                i += 1;
                skip = 0;
            }
        }
        Ok(())
    }
}

/// Source memory held in a buffer that pretends to live at `base`.
///
/// For tests and for replaying saved memory; addresses outside
/// `base..base + len` are [`SourceError::Unmapped`].
#[derive(Debug, Clone)]
pub struct SliceSource<B> {
    base: u64,
    data: B,
}

impl<B: AsRef<[u8]>> SliceSource<B> {
    /// Memory `data` at source address `base`.
    pub fn new(base: u64, data: B) -> SliceSource<B> {
        SliceSource { base, data }
    }

    /// The source address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The memory.
    pub fn data(&self) -> &[u8] {
        self.data.as_ref()
    }

    /// The memory, for changing it between rounds.
    pub fn data_mut(&mut self) -> &mut B {
        &mut self.data
    }
}

impl<B: AsRef<[u8]>> PageSource for SliceSource<B> {
    fn read_ranges(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError> {
        check_request(ranges, buf)?;
        let data = self.data.as_ref();
        let mut at = 0usize;
        for r in ranges {
            let len = r.end.saturating_sub(r.start);
            let off = r.start.checked_sub(self.base);
            let ok =
                off.is_some_and(|o| o.checked_add(len).is_some_and(|e| e <= data.len() as u64));
            let Some(off) = off.filter(|_| ok) else {
                return Err(SourceError::Unmapped { addr: r.start, len });
            };
            let off = off as usize;
            let len = len as usize;
            buf[at..at + len].copy_from_slice(&data[off..off + len]);
            at += len;
        }
        Ok(())
    }
}

/// Bytes read per step when checksumming a whole layout.
const CHECKSUM_CHUNK: u64 = 1 << 20;

/// The memory digest of `layout` read from `source` now (see
/// [`crate::digest`]): the XXH3-64 of the page hashes of every page,
/// regions in id order. Regions without a host address are skipped (a
/// sender's layout has one for every region).
///
/// [`FinalCheck::Full`](crate::FinalCheck::Full) computes it from the stopped
/// source after the final round and requires it to equal what was sent; a
/// receiver computes it over its destination.
pub fn memory_checksum(source: &mut dyn PageSource, layout: &Layout) -> Result<u64, SourceError> {
    let mut digest = crate::digest::MemoryDigest::new();
    let ps = layout.page_size();
    let chunk_len = CHECKSUM_CHUNK.max(ps) / ps * ps;
    let mut buf = vec![0u8; chunk_len as usize];
    for range in layout.host_ranges() {
        let (mut at, end) = (range.start, range.end);
        while at < end {
            let n = (end - at).min(chunk_len);
            let chunk = &mut buf[..n as usize];
            source.read_ranges(&[at..at + n], chunk)?;
            digest.push_whole_pages(chunk, ps as usize);
            at += n;
        }
    }
    Ok(digest.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_memory_reads_self_in_batches() {
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        let base = data.as_ptr() as u64;
        let mut src = ProcessMemory::current();
        let ranges = [
            base + 4096..base + 8192,
            base..base + 100,
            base + 9000..base + 12288,
        ];
        let mut buf = vec![0u8; 4096 + 100 + (12288 - 9000)];
        src.read_ranges(&ranges, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &data[4096..8192]);
        assert_eq!(&buf[4096..4196], &data[..100]);
        assert_eq!(&buf[4196..], &data[9000..12288]);
    }

    #[test]
    fn process_memory_unmapped_is_typed_error() {
        let mut src = ProcessMemory::current();
        let mut buf = vec![0u8; 4096];
        // Page zero is never mapped.
        let err = src.read_ranges(&[0..4096], &mut buf).unwrap_err();
        assert!(
            matches!(err, SourceError::Unmapped { addr: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn process_memory_short_read_reports_the_hole() {
        let data = vec![7u8; 4096];
        let base = data.as_ptr() as u64;
        let mut src = ProcessMemory::current();
        let mut buf = vec![0u8; 8192];
        let err = src
            .read_ranges(&[base..base + 4096, 0..4096], &mut buf)
            .unwrap_err();
        assert!(
            matches!(err, SourceError::Unmapped { addr: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn process_memory_missing_process() {
        // PIDs above pid_max (at most 2^22) never exist.
        let mut src = ProcessMemory::new(i32::MAX - 1);
        let data = [0u8; 16];
        let mut buf = [0u8; 16];
        let addr = data.as_ptr() as u64;
        let err = src.read_ranges(&[addr..addr + 16], &mut buf).unwrap_err();
        assert!(matches!(err, SourceError::ProcessGone { .. }), "{err:?}");
    }

    #[test]
    fn slice_source_bounds() {
        let mut src = SliceSource::new(0x1000, vec![1u8; 0x2000]);
        let mut buf = vec![0u8; 0x1000];
        src.read_ranges(&[0x2000..0x3000], &mut buf).unwrap();
        assert!(src.read_ranges(&[0x2800..0x3800], &mut buf).is_err());
        assert!(src.read_ranges(&[0..0x1000], &mut buf).is_err());
    }

    #[test]
    fn checksum_is_digest_of_page_hashes_in_layout_order() {
        let data: Vec<u8> = (0..0x4000u32).map(|i| i as u8).collect();
        let mut src = SliceSource::new(0x10000, data.clone());
        // Layout order is id order: region 0 (at 0x10000) first.
        let layout = Layout::new(vec![
            crate::MemoryRegion::new(1, 0x2000, 4096).host(0x12000),
            crate::MemoryRegion::new(0, 0x1000, 4096).host(0x10000),
        ])
        .unwrap();
        let mut hashes = Vec::new();
        for page in [
            &data[..0x1000],
            &data[0x2000..0x3000],
            &data[0x3000..0x4000],
        ] {
            hashes.extend_from_slice(&crate::digest::page_hash(page).to_le_bytes());
        }
        assert_eq!(
            memory_checksum(&mut src, &layout).unwrap(),
            crate::digest::page_hash(&hashes)
        );
    }

    // The input sweep and "not readable, and why".

    #[test]
    fn inverted_range_is_a_typed_error_for_every_source() {
        let data = vec![1u8; 4096];
        let base = data.as_ptr() as u64;
        let mut buf = vec![0u8; 4096];
        let bad = [base + 4096..base];
        let err = ProcessMemory::current()
            .read_ranges(&bad, &mut buf)
            .unwrap_err();
        assert!(matches!(err, SourceError::InvertedRange { .. }), "{err:?}");
        let err = SliceSource::new(base, &data[..])
            .read_ranges(&bad, &mut buf)
            .unwrap_err();
        assert!(matches!(err, SourceError::InvertedRange { .. }), "{err:?}");
    }

    #[test]
    fn ranges_summing_past_u64_max_are_a_buffer_size_error() {
        let mut buf = vec![0u8; 16];
        let ranges = [0..u64::MAX, 0..16];
        let err = ProcessMemory::current()
            .read_ranges(&ranges, &mut buf)
            .unwrap_err();
        assert!(
            matches!(
                err,
                SourceError::BufferSize {
                    buf: 16,
                    ranges: u64::MAX
                }
            ),
            "{err:?}"
        );
        let err = SliceSource::new(0, vec![0u8; 16])
            .read_ranges(&ranges, &mut buf)
            .unwrap_err();
        assert!(matches!(err, SourceError::BufferSize { .. }), "{err:?}");
    }

    #[test]
    fn slice_source_near_u64_max_is_unmapped_not_a_panic() {
        let mut src = SliceSource::new(u64::MAX - 0xfff, vec![0u8; 0x1000]);
        let mut buf = vec![0u8; 0x1000];
        src.read_ranges(&[u64::MAX - 0xfff..u64::MAX], &mut buf[..0xfff])
            .unwrap();
        // Starts inside, runs past the top: the end cannot even be represented.
        let err = src
            .read_ranges(&[u64::MAX - 0x7ff..u64::MAX], &mut buf[..0x7ff])
            .and_then(|()| src.read_ranges(&[u64::MAX - 0x7ff..u64::MAX], &mut buf[..0x800]))
            .unwrap_err();
        assert!(matches!(err, SourceError::BufferSize { .. }), "{err:?}");
        let err = src.read_ranges(&[0..0x1000], &mut buf).unwrap_err();
        assert!(
            matches!(err, SourceError::Unmapped { addr: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_prot_none_page_is_not_readable_and_says_why() {
        use precopy_sys::mem::{Mapping, Protection};
        let page = precopy_sys::page_size();
        let mem = Mapping::anonymous(3 * page).unwrap();
        mem.fill(0, 3 * page, 9).unwrap();
        mem.protect(page, page, Protection::None).unwrap();
        let b = mem.addr();
        let mut buf = vec![0u8; (3 * page) as usize];
        let err = ProcessMemory::current()
            .read_ranges(&[b..b + 3 * page], &mut buf)
            .unwrap_err();
        match &err {
            SourceError::NotReadable {
                addr,
                reason: Unreadable::NoReadPermission { start, end, perms },
                ..
            } => {
                assert_eq!(*addr, b + page);
                assert_eq!((*start, *end), (b + page, b + 2 * page));
                assert_eq!(perms, "---p");
            }
            other => panic!("expected NotReadable/NoReadPermission, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("is not readable") && msg.contains("PROT_NONE"),
            "{msg}"
        );
        assert!(!msg.contains("not mapped"), "{msg}");
    }

    #[test]
    fn a_guard_region_is_not_readable_and_says_why() {
        use precopy_sys::mem::{Advice, Mapping};
        let page = precopy_sys::page_size();
        let mem = Mapping::anonymous(3 * page).unwrap();
        if let Err(e) = mem.advise(page, page, Advice::GuardInstall) {
            eprintln!("SKIP a_guard_region_is_not_readable_and_says_why: MADV_GUARD_INSTALL: {e}");
            return;
        }
        let b = mem.addr();
        let mut buf = vec![0u8; page as usize];
        let err = ProcessMemory::current()
            .read_ranges(&[b + page..b + 2 * page], &mut buf)
            .unwrap_err();
        assert!(
            matches!(
                err,
                SourceError::NotReadable {
                    reason: Unreadable::GuardRegion,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("guard region"), "{err}");
    }

    #[test]
    fn an_unmapped_page_says_nothing_is_mapped_there() {
        let mut src = ProcessMemory::current();
        let mut buf = vec![0u8; 4096];
        let err = src.read_ranges(&[0..4096], &mut buf).unwrap_err();
        assert!(
            err.to_string()
                .contains("not readable: nothing is mapped there"),
            "{err}"
        );
    }
}
