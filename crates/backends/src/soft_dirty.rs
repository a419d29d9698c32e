//! Soft-dirty: write "4" to `/proc/self/clear_refs`, then read which pages became soft-dirty —
//! with `PAGEMAP_SCAN` and `PAGE_IS_SOFT_DIRTY` where the kernel has it (6.7+), else bit 55 of
//! each 8-byte `/proc/self/pagemap` entry.
//!
//! The baseline the engine is measured against, and its fallback on kernels before 6.7 that are
//! built with `CONFIG_MEM_SOFT_DIRTY`. On a kernel built without it, writing `clear_refs`
//! succeeds and the bit simply never sets: a naive tracker would report "nothing written"
//! forever. [`SoftDirty::new`] therefore proves the bit works first and refuses otherwise.
//!
//! Works on this process ([`SoftDirty::new`]) or another one ([`SoftDirty::for_process`]: its
//! `/proc/PID/clear_refs` and `/proc/PID/pagemap`, as CRIU's pre-dumps do).
//!
//! Limits: the read and the clear are two steps over the whole process, so a write between them
//! is lost (writers must be paused around a collection: [`DirtyLog::needs_pause`]); `clear_refs` resets every mapping of the
//! process, not only the tracked ranges; a written transparent huge page reports all its 512
//! pages; a new or changed VMA reports as wholly soft-dirty until the next clear.

use crate::{BackendKind, CollectStats, DirtyLog, Error, Result, Unavailable};
use precopy_sys::abi::category;
use precopy_sys::mem::{Backing, Mapping, Thp};
use precopy_sys::pagemap::{self, EMPTY_REGION};
use precopy_sys::ranges::push_merged;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

/// Bit 55 of a `/proc/PID/pagemap` entry: the page is soft-dirty.
const PM_SOFT_DIRTY: u64 = 1 << 55;
/// Pagemap entries read per `pread` on the bit-55 path.
const ENTRIES_PER_READ: usize = 8192;

/// How the soft-dirty bits are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// `PAGEMAP_SCAN` with category and return mask `PAGE_IS_SOFT_DIRTY`.
    Scan,
    /// `pread` of 8-byte pagemap entries, bit 55.
    Bit55,
}

/// Soft-dirty tracking of ranges of a process's memory.
#[derive(Debug)]
pub struct SoftDirty {
    pid: i32,
    clear_refs: File,
    pagemap: File,
    reader: Reader,
    memory: Vec<Range<u64>>,
    started: bool,
    unvouched: Vec<Range<u64>>,
    page: u64,
    entries: Vec<u8>,
    regions: Vec<precopy_sys::abi::PageRegion>,
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable(Unavailable {
        kind: BackendKind::SoftDirty,
        reason,
    })
}

/// Whether `PAGEMAP_SCAN` accepts `PAGE_IS_SOFT_DIRTY` here.
fn scan_has_soft_dirty(pagemap: &File, page: u64) -> bool {
    let Ok(mem) = Mapping::new(Backing::AnonPrivate, page, 0, Thp::NoHuge) else {
        return false;
    };
    let mut arg = pagemap::query_arg(mem.addr(), mem.addr() + page, category::SOFT_DIRTY);
    let mut out = [EMPTY_REGION; 1];
    pagemap::scan(pagemap.as_fd(), &mut arg, &mut out).is_ok()
}

impl SoftDirty {
    /// Soft-dirty tracking of `ranges` (page-aligned, disjoint) of this process; see
    /// [`SoftDirty::for_process`].
    pub fn new(ranges: &[Range<u64>]) -> Result<SoftDirty> {
        SoftDirty::for_process(std::process::id() as i32, ranges)
    }

    /// Soft-dirty tracking of `ranges` (page-aligned, disjoint) of process `pid` (needs ptrace
    /// access to it). Proves that soft-dirty works on this kernel first (a page written after a
    /// clear must show the bit, a cleared one must not) and opens the process's `/proc` files.
    /// Refuses with [`Error::Unavailable`] otherwise, e.g. on kernels built without
    /// `CONFIG_MEM_SOFT_DIRTY`.
    pub fn for_process(pid: i32, ranges: &[Range<u64>]) -> Result<SoftDirty> {
        let page = precopy_sys::page_size();
        let memory = crate::sorted_ranges(BackendKind::SoftDirty, ranges, page)?;
        let (works, detail) = precopy_scanner::kernel::soft_dirty_works();
        if !works {
            return Err(unavailable(format!(
                "soft-dirty bits do not work on this kernel (built without \
                 CONFIG_MEM_SOFT_DIRTY?): {detail}"
            )));
        }
        let open_err =
            |what: &str, e: std::io::Error| unavailable(format!("cannot open {what}: {e}"));
        let (clear_path, pagemap_path) = (
            format!("/proc/{pid}/clear_refs"),
            format!("/proc/{pid}/pagemap"),
        );
        let clear_refs = OpenOptions::new()
            .write(true)
            .open(&clear_path)
            .map_err(|e| open_err(&clear_path, e))?;
        let pagemap = File::open(&pagemap_path).map_err(|e| open_err(&pagemap_path, e))?;
        let reader = if scan_has_soft_dirty(&pagemap, page) {
            Reader::Scan
        } else {
            Reader::Bit55
        };
        Ok(SoftDirty {
            pid,
            clear_refs,
            pagemap,
            reader,
            memory,
            started: false,
            unvouched: Vec::new(),
            page,
            entries: Vec::new(),
            regions: Vec::new(),
        })
    }

    fn clear(&mut self) -> Result<()> {
        self.clear_refs.write_all(b"4").map_err(|source| Error::Io {
            backend: BackendKind::SoftDirty,
            what: "write \"4\" to /proc/PID/clear_refs",
            source,
        })
    }

    fn read_scan(&mut self, r: &Range<u64>, out: &mut Vec<Range<u64>>) -> Result<u64> {
        if self.regions.is_empty() {
            self.regions = vec![EMPTY_REGION; 4096];
        }
        let first = out.len();
        let mut calls = 0;
        let mut cursor = r.start;
        while cursor < r.end {
            let mut arg = pagemap::query_arg(cursor, r.end, category::SOFT_DIRTY);
            let n = pagemap::scan(self.pagemap.as_fd(), &mut arg, &mut self.regions).map_err(
                |source| Error::Range {
                    backend: BackendKind::SoftDirty,
                    what: "PAGEMAP_SCAN for PAGE_IS_SOFT_DIRTY over",
                    start: cursor,
                    end: r.end,
                    source,
                },
            )?;
            calls += 1;
            for reg in &self.regions[..n] {
                push_merged(out, first, reg.start..reg.end);
            }
            if arg.walk_end <= cursor {
                return Err(Error::Range {
                    backend: BackendKind::SoftDirty,
                    what: "PAGEMAP_SCAN made no progress over",
                    start: cursor,
                    end: r.end,
                    source: std::io::Error::other("walk_end did not advance"),
                });
            }
            cursor = arg.walk_end;
        }
        Ok(calls)
    }

    fn read_bit55(&mut self, r: &Range<u64>, out: &mut Vec<Range<u64>>) -> Result<u64> {
        let page = self.page;
        let first = out.len();
        let mut calls = 0;
        let total = ((r.end - r.start) / page) as usize;
        let mut done = 0usize;
        while done < total {
            let n = (total - done).min(ENTRIES_PER_READ);
            self.entries.resize(n * 8, 0);
            let vpn = r.start / page + done as u64;
            self.pagemap
                .read_exact_at(&mut self.entries, vpn * 8)
                .map_err(|source| Error::Range {
                    backend: BackendKind::SoftDirty,
                    what: "read /proc/PID/pagemap over",
                    start: r.start,
                    end: r.end,
                    source,
                })?;
            calls += 1;
            for (i, e) in self.entries.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(e);
                if u64::from_ne_bytes(b) & PM_SOFT_DIRTY != 0 {
                    let at = (vpn + i as u64) * page;
                    push_merged(out, first, at..at + page);
                }
            }
            done += n;
        }
        Ok(calls)
    }
}

impl DirtyLog for SoftDirty {
    type Error = Error;

    fn memory(&self) -> Vec<Range<u64>> {
        self.memory.clone()
    }

    fn page_size(&self) -> u64 {
        self.page
    }

    fn unvouched(&self) -> Vec<Range<u64>> {
        self.unvouched.clone()
    }

    fn method(&self) -> String {
        match self.reader {
            Reader::Scan => "clear_refs \"4\" + PAGEMAP_SCAN with PAGE_IS_SOFT_DIRTY".into(),
            Reader::Bit55 => "clear_refs \"4\" + pagemap bit 55".into(),
        }
    }

    fn needs_pause(&self) -> bool {
        true
    }

    fn start(&mut self) -> Result<()> {
        self.unvouched = crate::unvouched_parts(self.pid, &self.memory);
        self.clear()?;
        self.started = true;
        Ok(())
    }

    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats> {
        if !self.started {
            return Err(Error::NotStarted {
                backend: BackendKind::SoftDirty,
            });
        }
        let first = out.len();
        let mut calls = 0;
        let ranges = std::mem::take(&mut self.memory);
        let result: Result<()> = ranges.iter().try_for_each(|r| {
            calls += match self.reader {
                Reader::Scan => self.read_scan(r, out)?,
                Reader::Bit55 => self.read_bit55(r, out)?,
            };
            Ok(())
        });
        self.memory = ranges;
        result?;
        self.clear()?;
        let mut stats = CollectStats::count(&out[first..], self.page);
        stats.syscalls = calls + 1;
        Ok(stats)
    }

    fn stop(&mut self) -> Result<()> {
        self.started = false;
        Ok(())
    }

    /// Nothing to prepare: the kernel's copy into a page whose soft-dirty bit was cleared takes
    /// the same write fault a store does and sets the bit.
    fn prepare_kernel_write(&self, range: Range<u64>) -> Result<()> {
        if !self.started {
            return Err(Error::NotStarted {
                backend: BackendKind::SoftDirty,
            });
        }
        crate::check_inside(BackendKind::SoftDirty, &self.memory, &range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_where_soft_dirty_does_not_work_and_is_exact_where_it_does() {
        let (works, detail) = precopy_scanner::kernel::soft_dirty_works();
        if !works {
            // This machine's kernel (soft-dirty compiled out) must be refused, never trusted.
            match SoftDirty::new(&[]) {
                Err(Error::Unavailable(u)) => {
                    assert_eq!(u.kind, BackendKind::SoftDirty);
                    assert!(u.reason.contains("soft-dirty"), "{}", u.reason);
                }
                other => panic!("soft-dirty does not work ({detail}) but got {other:?}"),
            }
            assert!(crate::check(BackendKind::SoftDirty).is_err());
            assert!(crate::open(BackendKind::SoftDirty, &[]).is_err());
            eprintln!(
                "SKIP (accuracy part): soft-dirty does not work on this kernel ({detail}); \
                 verified that the backend refuses"
            );
            return;
        }
        crate::check(BackendKind::SoftDirty).expect("soft-dirty self-test");
        let page = precopy_sys::page_size();
        let n = 256u64;
        let mem = Mapping::new(Backing::AnonPrivate, n * page, 0, Thp::NoHuge).unwrap();
        mem.fill(0, n * page, 1).unwrap();
        let mut sd = SoftDirty::new(&[mem.range()]).unwrap();
        sd.start().unwrap();
        let mut out = Vec::new();
        sd.collect(&mut out).unwrap();
        assert!(out.is_empty(), "clean start reported {out:?}");
        let written: Vec<u64> = (0..n).filter(|p| p % 7 == 3 || p % 11 == 0).collect();
        for p in &written {
            mem.write_u64(p * page + 16, *p).unwrap();
        }
        sd.collect(&mut out).unwrap();
        let reported: Vec<u64> = out
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(page as usize))
            .map(|a| (a - mem.addr()) / page)
            .collect();
        assert_eq!(reported, written, "soft-dirty via {}", sd.method());
        out.clear();
        sd.collect(&mut out).unwrap();
        assert!(out.is_empty());
    }
}
