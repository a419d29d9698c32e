//! The destination's [`Sink`]: received pages go straight into this VMM's guest RAM, at the
//! memory offset the receiver gives (the layout's one region is guest RAM; the destination's
//! mapping sits at another host address than the source's, which the wire never names).
//!
//! This stands in until the transfer crate receives into caller-provided memory itself.

use precopy_sys::kvm::GuestRam;
use precopy_transfer::{FinalCheck, Layout, MemoryDigest, PageBuf, PageCrcs, Sink, TransferError};
use std::ops::Range;
use std::sync::Arc;

/// Writes received pages into guest RAM and records their CRCs for the final check.
#[derive(Debug)]
pub struct GuestRamSink {
    ram: Arc<GuestRam>,
    layout: Layout,
    crcs: PageCrcs,
    pages: u64,
}

impl GuestRamSink {
    /// A sink for `layout` (which must be exactly as large as guest RAM) into `ram`.
    pub fn new(ram: Arc<GuestRam>, layout: Layout) -> Result<GuestRamSink, TransferError> {
        if layout.total_len() != ram.ram().len() {
            return Err(TransferError::Config {
                reason: "the source's memory is not the size of this VM's guest RAM",
            });
        }
        let crcs = PageCrcs::new(layout.total_pages() as usize, layout.page_size());
        Ok(GuestRamSink {
            ram,
            layout,
            crcs,
            pages: 0,
        })
    }

    /// Pages written so far (a page sent twice counts twice).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn io(source: std::io::Error) -> TransferError {
        TransferError::Io {
            what: "writing guest RAM",
            source,
        }
    }
}

impl Sink for GuestRamSink {
    fn begin_round(&mut self, _round: u64) -> Result<(), TransferError> {
        Ok(())
    }

    fn send_pages(&mut self, off: u64, pages: PageBuf, crcs: &[u32]) -> Result<(), TransferError> {
        let ps = self.layout.page_size();
        let len = pages.len() as u64;
        self.layout.check_span(off, len)?;
        if crcs.len() as u64 != len / ps || !self.crcs.set((off / ps) as usize, crcs) {
            return Err(TransferError::Misuse {
                operation: "send_pages",
                state: "with a CRC count that differs from the page count",
            });
        }
        self.ram.ram().write(off, &pages).map_err(Self::io)?;
        self.pages += len / ps;
        Ok(())
    }

    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        let ps = self.layout.page_size();
        let len = range.end.saturating_sub(range.start);
        let off = range.start;
        self.layout.check_span(off, len)?;
        self.crcs.set_zero((off / ps) as usize, (len / ps) as usize);
        self.ram.ram().fill(off, len, 0).map_err(Self::io)
    }

    fn end_round(&mut self, _round: u64) -> Result<u64, TransferError> {
        Ok(0)
    }

    fn finish(&mut self, memory_checksum: u32, check: FinalCheck) -> Result<(), TransferError> {
        let mismatch = |actual| TransferError::ChecksumMismatch {
            expected: memory_checksum,
            actual,
        };
        let recorded = self.crcs.digest();
        if recorded != memory_checksum {
            return Err(mismatch(recorded));
        }
        if check == FinalCheck::Full {
            let ram = self.ram.ram();
            let mut digest = MemoryDigest::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < ram.len() {
                let n = (ram.len() - off).min(buf.len() as u64) as usize;
                ram.read(off, &mut buf[..n]).map_err(Self::io)?;
                digest.push_pages(&buf[..n], self.layout.page_size() as usize);
                off += n as u64;
            }
            if digest.finish() != memory_checksum {
                return Err(mismatch(digest.finish()));
            }
        }
        Ok(())
    }
}
