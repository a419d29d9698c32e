//! [`DirtyLog`] over a running process the engine attached to ([`Uffd::attach`]), following its
//! mappings from round to round.
//!
//! Every round first scans (the tracker's get-and-reprotect), then compares the target's
//! `/proc/PID/maps` with the tracked ranges:
//!
//! - **unmapped** (the scan reports the part `Unmapped`, or it is gone from
//!   the maps): dropped from tracking and no longer sent;
//! - **replaced or moved** (something else is mapped there now, which the scan reports
//!   `NotTracked`): forgotten, then registered and armed again if trackable,
//!   and sent whole;
//! - **new** (a trackable mapping no tracked range covers): registered, armed and sent whole.
//!
//! Registering and arming happen *before* [`DirtyLog::collect`] returns, and the caller reads
//! page contents only after that, so a write that lands in the window of a change is either in
//! the contents read or reported by the next round: never lost.
//!
//! New memory must lie inside [`TargetLog::layout`]: the tracked ranges at attach time plus the
//! address space the target had reserved then (private anonymous mappings of any protection,
//! such as `malloc` arenas and the churn of a region that is unmapped and mapped again) and
//! unmapped gaps of up to 16 MiB between those (a hole the target had just unmapped when it was
//! attached, about to be mapped again), plus [`GROWTH_HEADROOM`] at each end of the largest hole
//! in its address space, where a grown `brk` heap and the mappings of threads created after the
//! start land. A mapping outside all that (more than the headroom of new mappings, a
//! `MAP_FIXED` address elsewhere) fails the round with [`TargetError::OutsideLayout`] rather
//! than being silently left out, unless the log was told to track new memory anywhere
//! ([`TargetLog::allow_anywhere`]): `precopy rate`, which sends nothing, and `precopy send`,
//! whose transport adds a region to the transfer's layout for such memory before the round
//! sends it ([`TransferTransport::grow_layout`](crate::TransferTransport::grow_layout): the
//! protocol's REGION frame).

use crate::control::{CollectStats, DirtyLog};
use precopy_scanner::Scanner;
use precopy_sys::ranges::{coalesce, subtract};
use precopy_tracker::target::{SkipReason, TargetMapping, target_mappings};
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{PageSource, ProcessMemory, SourceError};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};

/// Failures following a target's memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// A page size that is zero or not a power of two.
    #[error("page size {page_size} is not a power of two")]
    BadPageSize {
        /// The rejected size.
        page_size: u64,
    },
    /// The target exited.
    #[error("process {pid} exited")]
    Exited {
        /// The process.
        pid: i32,
    },
    /// Its memory is already registered with another userfaultfd (another `precopy send`,
    /// a debugger, a checkpointer): the kernel allows one per range (`EBUSY`).
    #[error(
        "memory of process {pid} is already tracked by another userfaultfd (another precopy send?)"
    )]
    AlreadyTracked {
        /// The process.
        pid: i32,
    },
    /// A writable mapping that must be tracked could not be registered.
    #[error("cannot track memory {start:#x}..{end:#x} of process {pid}")]
    Register {
        /// The process.
        pid: i32,
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
        /// The cause.
        #[source]
        source: precopy_tracker::Error,
    },
    /// No memory of the process could be tracked: there is nothing to send.
    #[error("no memory of process {pid} could be tracked")]
    NothingTracked {
        /// The process.
        pid: i32,
    },
    /// Its maps could not be read.
    #[error("cannot read the mappings of process {pid}")]
    Maps {
        /// The process.
        pid: i32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It mapped memory outside the layout fixed at the start.
    #[error(
        "process {pid} mapped new memory at {start:#x}..{end:#x} outside the transfer's layout \
         (fixed at the start, with 256 MiB of headroom for new threads and heap); a transport \
         that adds regions mid-stream (TransferTransport::grow_layout, with \
         TargetLog::allow_anywhere) sends it"
    )]
    OutsideLayout {
        /// The process.
        pid: i32,
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// A round failed.
    #[error("scanning process {pid} failed")]
    Scan {
        /// The process.
        pid: i32,
        /// The cause.
        #[source]
        source: precopy_scanner::Error,
    },
}

/// Largest reserved (inaccessible) mapping taken into the layout: larger reservations (a
/// runtime's multi-GiB heap reservation, a sanitizer's shadow) would make the image's per-page
/// tables large for memory that mostly never exists.
const MAX_RESERVATION: u64 = 1 << 30;

/// Largest unmapped gap between two ranges of the layout that is taken into it: programs unmap
/// and map memory again among their other mappings (an allocator returning a large block and
/// taking another, the churn of a region unmapped and mapped at the same address), and a
/// transfer attached in the instant such a hole existed must still accept what is mapped
/// there next. Gaps cost the image nothing but region size (never-sent pages read as zeros).
const MAX_LAYOUT_GAP: u64 = 16 << 20;

/// Address space taken into the layout on each side of the largest hole in the target's user
/// address space: on x86-64 that hole lies between the program and its `brk` heap below and the
/// `mmap` area above, and Linux grows the heap up from its lower edge and places new mappings (a
/// new thread's stack, a new `malloc` arena, a large allocation) top-down from its upper edge. A
/// thread created or a heap grown after the transfer started therefore lands here and is sent
/// like any other new mapping. Costs the image region size only (never-mapped pages are never
/// sent and read as zeros).
pub const GROWTH_HEADROOM: u64 = 256 << 20;

/// First address of the kernel half of the address space; mappings there (`[vsyscall]`) are
/// not the target's.
const KERNEL_HALF: u64 = 1 << 63;

/// The two ends of the largest hole between the user mappings `maps`, `headroom` bytes each (or
/// the whole hole, if smaller than twice that), sorted.
fn growth_headroom(maps: &[TargetMapping], headroom: u64) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = maps
        .iter()
        .map(|m| m.range.clone())
        .filter(|r| r.end <= KERNEL_HALF)
        .collect();
    coalesce(&mut ranges);
    let Some(hole) = ranges
        .windows(2)
        .map(|w| w[0].end..w[1].start)
        .max_by_key(|h| h.end - h.start)
    else {
        return Vec::new();
    };
    if hole.end - hole.start <= 2 * headroom {
        return vec![hole];
    }
    vec![
        hole.start..hole.start + headroom,
        hole.end - headroom..hole.end,
    ]
}

/// Joins neighbouring ranges of sorted, coalesced `v` whose gap is at most `max_gap` bytes.
fn bridge_gaps(v: &mut Vec<Range<u64>>, max_gap: u64) {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v.drain(..) {
        match out.last_mut() {
            Some(l) if r.start - l.end <= max_gap => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    *v = out;
}

/// What changed in the target's mappings during one [`TargetLog::dirty`] call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapChanges {
    /// Registered and sent whole: new, replaced or moved memory.
    pub added: Vec<Range<u64>>,
    /// No longer there: dropped.
    pub dropped: Vec<Range<u64>>,
}

/// The dirty log of an attached process (see the module docs).
#[derive(Debug)]
pub struct TargetLog {
    pid: i32,
    pidfd: OwnedFd,
    tracker: Tracker,
    scanner: Scanner,
    layout: Vec<Range<u64>>,
    anywhere: bool,
    skipped: Vec<TargetMapping>,
    last: MapChanges,
    /// Pages written, from scans (not counting whole mappings added).
    written_pages: u64,
    /// Bytes registered and sent whole after the start, and bytes dropped, all rounds.
    added_bytes: u64,
    dropped_bytes: u64,
}

impl TargetLog {
    /// Registers every trackable mapping of the process `uffd` was attached to (not armed yet:
    /// [`DirtyLog::start`] arms).
    pub fn new(uffd: Uffd, scanner: Scanner) -> Result<TargetLog, TargetError> {
        let pid = uffd.pid();
        // `pid` is a thread when the main thread had exited at attach time
        // (`AttachTimes::target`): only a thread pidfd (Linux 6.9+) names it.
        let pidfd = precopy_sys::process::pidfd_open(pid)
            .or_else(|e| match e.raw_os_error() {
                Some(e)
                    if e == nix::errno::Errno::ENOENT as i32
                        || e == nix::errno::Errno::EINVAL as i32 =>
                {
                    precopy_sys::process::pidfd_open_thread(pid)
                }
                _ => Err(e),
            })
            .map_err(|source| {
                if source.raw_os_error() == Some(nix::errno::Errno::ESRCH as i32) {
                    TargetError::Exited { pid }
                } else {
                    TargetError::Maps { pid, source }
                }
            })?;
        let mut log = TargetLog {
            pid,
            pidfd,
            tracker: Tracker::new(uffd),
            scanner,
            layout: Vec::new(),
            anywhere: false,
            skipped: Vec::new(),
            last: MapChanges::default(),
            written_pages: 0,
            added_bytes: 0,
            dropped_bytes: 0,
        };
        let maps = log.maps()?;
        for m in &maps {
            match m.class {
                Ok(_) => log.layout.push(m.range.clone()),
                // Address space the target reserved (PROT_NONE arenas, guard pages): memory
                // that becomes writable there later fits the layout.
                Err(SkipReason::NotWritable)
                    if m.name.is_empty() && m.range.end - m.range.start <= MAX_RESERVATION =>
                {
                    log.layout.push(m.range.clone())
                }
                Err(_) => {}
            }
            if m.class.is_err() {
                log.skipped.push(m.clone());
            }
        }
        log.layout.extend(growth_headroom(&maps, GROWTH_HEADROOM));
        coalesce(&mut log.layout);
        bridge_gaps(&mut log.layout, MAX_LAYOUT_GAP);
        for m in maps.iter().filter(|m| m.class.is_ok()) {
            // Registration can race the target (it unmapped it meanwhile): the next round
            // picks up whatever is there then. Any other failure leaves writable memory
            // untracked, and is an error.
            if let Err(e) = log.tracker.register(m.range.clone()) {
                if !log.alive() {
                    return Err(TargetError::Exited { pid });
                }
                log.register_failed(m.range.clone(), e)?;
            }
        }
        if log.tracker.ranges().is_empty() {
            return Err(TargetError::NothingTracked { pid });
        }
        Ok(log)
    }

    /// Whether a failed registration of `r` may be left to the next round: only when the
    /// mapping changed under it (no longer fully mapped, or the kernel refused it with
    /// `EINVAL`/`ENOMEM` and the maps no longer show `r` as trackable memory, the target having
    /// unmapped or replaced it between our read of the maps and the `UFFDIO_REGISTER`); anything
    /// else (`EBUSY`: another userfaultfd has it) would leave writable memory untracked. A
    /// target that is stopped cannot race: there the refusal stays an error.
    fn register_failed(&self, r: Range<u64>, e: precopy_tracker::Error) -> Result<(), TargetError> {
        match e {
            precopy_tracker::Error::NotMapped { .. } => {
                tracing::debug!(start = r.start, end = r.end, error = %e, "register raced");
                Ok(())
            }
            precopy_tracker::Error::Register { ref source, .. }
                if matches!(source.raw_os_error(), Some(e) if e == nix::errno::Errno::EINVAL as i32 || e == nix::errno::Errno::ENOMEM as i32)
                    && !self.still_trackable(&r)? =>
            {
                tracing::debug!(start = r.start, end = r.end, error = %e, "register raced");
                Ok(())
            }
            precopy_tracker::Error::Busy { .. } => {
                Err(TargetError::AlreadyTracked { pid: self.pid })
            }
            source => Err(TargetError::Register {
                pid: self.pid,
                start: r.start,
                end: r.end,
                source,
            }),
        }
    }

    /// Whether `r` is still wholly covered by trackable mappings, read from the maps now.
    fn still_trackable(&self, r: &Range<u64>) -> Result<bool, TargetError> {
        let mut now: Vec<Range<u64>> = self
            .maps()?
            .into_iter()
            .filter(|m| m.class.is_ok())
            .map(|m| m.range)
            .collect();
        coalesce(&mut now);
        Ok(subtract(r.clone(), &now).is_empty())
    }

    /// Also track (and report as added) new mappings outside the layout; for callers that send
    /// nothing, such as a dirty-rate measurement, and for those whose transport adds a region
    /// for memory outside its layout
    /// ([`TransferTransport::grow_layout`](crate::TransferTransport::grow_layout)).
    pub fn allow_anywhere(mut self) -> Self {
        self.anywhere = true;
        self
    }

    /// The process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The address ranges a transfer of this target must accept: tracked memory and reserved
    /// address space at attach time, sorted and coalesced.
    pub fn layout(&self) -> &[Range<u64>] {
        &self.layout
    }

    /// The tracker (its ranges are what is tracked now).
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Mappings not tracked at attach time, with the reason.
    pub fn skipped(&self) -> &[TargetMapping] {
        &self.skipped
    }

    /// What the last [`DirtyLog::collect`] call changed.
    pub fn last_changes(&self) -> &MapChanges {
        &self.last
    }

    /// Bytes registered and sent whole because they were new, replaced or moved, and bytes
    /// dropped because they were unmapped, over all rounds so far.
    pub fn change_totals(&self) -> (u64, u64) {
        (self.added_bytes, self.dropped_bytes)
    }

    /// Pages the scans reported written so far.
    pub fn written_pages(&self) -> u64 {
        self.written_pages
    }

    fn alive(&self) -> bool {
        !precopy_sys::process::pidfd_exited(self.pidfd.as_fd()).unwrap_or(true)
    }

    fn maps(&self) -> Result<Vec<TargetMapping>, TargetError> {
        target_mappings(self.pid).map_err(|source| {
            if !self.alive() {
                TargetError::Exited { pid: self.pid }
            } else {
                TargetError::Maps {
                    pid: self.pid,
                    source,
                }
            }
        })
    }

    /// Write-protects `r`. If the target changed that memory meanwhile (the kernel refuses a
    /// range that is no longer all mapped and registered), the part not protected simply reads
    /// as written in the next round (sent again: never reported clean), and the next round
    /// deals with the change.
    fn arm_or_leave(&self, r: Range<u64>) {
        if let Err(e) = self.tracker.arm_range(r.clone()) {
            tracing::debug!(start = r.start, end = r.end, error = %e, "arm raced a mapping change");
        }
    }

    /// One round: scan, follow mapping changes, append what must be sent to `out`.
    pub fn round(&mut self, out: &mut Vec<Range<u64>>) -> Result<(), TargetError> {
        if !self.alive() {
            return Err(TargetError::Exited { pid: self.pid });
        }
        let mut changes = MapChanges::default();
        let mut stale: Vec<Range<u64>> = Vec::new();
        loop {
            let round = match self.scanner.round(&self.tracker) {
                Ok(r) => r,
                Err(source) => {
                    if !self.alive() {
                        return Err(TargetError::Exited { pid: self.pid });
                    }
                    return Err(TargetError::Scan {
                        pid: self.pid,
                        source,
                    });
                }
            };
            self.written_pages += round.stats().pages;
            out.extend_from_slice(round.dirty());
            // Unmapped or replaced: forgotten below; what is trackable there now is
            // registered again with the new mappings.
            stale.extend(round.untracked().iter().map(|u| u.range.clone()));
            if round.complete() {
                break;
            }
        }
        for r in &stale {
            // A round's untracked parts are page-aligned and ordered: never refused.
            if let Err(e) = self.tracker.forget(r.clone()) {
                tracing::warn!(start = r.start, end = r.end, error = %e, "forget refused");
            }
        }
        // Whatever is trackable now and not tracked: new, replaced or moved memory.
        let maps = self.maps()?;
        let tracked: Vec<Range<u64>> = self.tracker.ranges().iter().map(|r| r.range()).collect();
        let mut wanted = Vec::new();
        for m in maps.iter().filter(|m| m.class.is_ok()) {
            wanted.extend(subtract(m.range.clone(), &tracked));
        }
        // Tracked ranges that are no longer trackable mappings (unmapped between the scan and
        // the maps read): the next scan reports them; nothing to do here.
        for r in wanted {
            if !self.anywhere && !subtract(r.clone(), &self.layout).is_empty() {
                return Err(TargetError::OutsideLayout {
                    pid: self.pid,
                    start: r.start,
                    end: r.end,
                });
            }
            match self.tracker.register(r.clone()) {
                Ok(_) => {}
                Err(e) => {
                    if !self.alive() {
                        return Err(TargetError::Exited { pid: self.pid });
                    }
                    // The mapping changed again since the maps were read: the next round
                    // sees it as it is then.
                    self.register_failed(r.clone(), e)?;
                    continue;
                }
            }
            self.arm_or_leave(r.clone());
            changes.added.push(r.clone());
            out.push(r);
        }
        // Dropped = was stale and is not tracked again.
        let now: Vec<Range<u64>> = self.tracker.ranges().iter().map(|r| r.range()).collect();
        changes.dropped = stale
            .iter()
            .flat_map(|r| subtract(r.clone(), &now))
            .collect();
        coalesce(&mut changes.dropped);
        let len = |v: &[Range<u64>]| v.iter().map(|r| r.end - r.start).sum::<u64>();
        self.added_bytes += len(&changes.added);
        self.dropped_bytes += len(&changes.dropped);
        self.last = changes;
        Ok(())
    }
}

impl DirtyLog for TargetLog {
    type Error = TargetError;

    fn memory(&self) -> Vec<Range<u64>> {
        self.tracker.ranges().iter().map(|r| r.range()).collect()
    }

    fn page_size(&self) -> u64 {
        self.tracker.page_size()
    }

    fn start(&mut self) -> Result<(), TargetError> {
        if !self.alive() {
            return Err(TargetError::Exited { pid: self.pid });
        }
        let ranges: Vec<Range<u64>> = self.tracker.ranges().iter().map(|r| r.range()).collect();
        for r in ranges {
            self.arm_or_leave(r);
        }
        Ok(())
    }

    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats, TargetError> {
        let first = out.len();
        self.round(out)?;
        Ok(CollectStats::count(&out[first..], self.tracker.page_size()))
    }

    /// Nothing to release early: tracking ends when the log (and with it the userfaultfd) is
    /// dropped.
    fn stop(&mut self) -> Result<(), TargetError> {
        Ok(())
    }

    fn unvouched(&self) -> Vec<Range<u64>> {
        self.tracker.verify_ranges()
    }
}

/// Reads an attached target's memory: `process_vm_readv`, falling back per page to
/// `/proc/PID/mem` (which also reads pages the target made inaccessible with `mprotect`). A page
/// that is no longer mapped at all reads as zeros and is counted in
/// [`TargetMemory::vanished_pages`]: it vanished after the round that reported it, so the next
/// round reports its range unmapped (dropped) or replaced (sent again whole), and the final
/// round, with the target stopped, never meets one.
#[derive(Debug)]
pub struct TargetMemory {
    inner: ProcessMemory,
    page_size: u64,
    vanished: u64,
}

impl TargetMemory {
    /// A reader of process `pid`'s memory, falling back in pages of `page_size` bytes.
    ///
    /// # Errors
    /// [`TargetError::BadPageSize`] unless `page_size` is a power of two.
    pub fn new(pid: i32, page_size: u64) -> Result<TargetMemory, TargetError> {
        if !page_size.is_power_of_two() {
            return Err(TargetError::BadPageSize { page_size });
        }
        Ok(TargetMemory {
            inner: ProcessMemory::new(pid),
            page_size,
            vanished: 0,
        })
    }

    /// Pages that were unmapped when read (see the type docs).
    pub fn vanished_pages(&self) -> u64 {
        self.vanished
    }

    fn read_slow(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError> {
        let ps = self.page_size;
        let pid = self.inner.pid();
        let mut off = 0usize;
        for r in ranges {
            let mut addr = r.start;
            while addr < r.end {
                let end = (addr - addr % ps + ps).min(r.end);
                let len = (end - addr) as usize;
                let dst = &mut buf[off..off + len];
                match self.inner.read_ranges(&[addr..end], dst) {
                    Ok(()) => {}
                    Err(SourceError::Unmapped { .. } | SourceError::NotReadable { .. }) => {
                        match precopy_sys::process::read_proc_mem(pid, addr, len) {
                            Ok(v) if v.len() == len => dst.copy_from_slice(&v),
                            _ => {
                                dst.fill(0);
                                self.vanished += 1;
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
                off += len;
                addr = end;
            }
        }
        Ok(())
    }
}

impl PageSource for TargetMemory {
    fn read_ranges(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError> {
        match self.inner.read_ranges(ranges, buf) {
            Err(SourceError::Unmapped { .. } | SourceError::NotReadable { .. }) => {
                self.read_slow(ranges, buf)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_up_to_the_limit_are_bridged_and_larger_ones_kept() {
        let mut v = vec![0..10, 12..20, 20..30, 40..50, 100..110];
        coalesce(&mut v);
        assert_eq!(v, vec![0..10, 12..30, 40..50, 100..110]);
        bridge_gaps(&mut v, 10);
        assert_eq!(v, vec![0..50, 100..110]);
        bridge_gaps(&mut v, 50);
        assert_eq!(v, vec![0..110]);
    }

    fn mapping(range: Range<u64>) -> TargetMapping {
        TargetMapping {
            range,
            name: String::new(),
            class: Err(SkipReason::NotWritable),
        }
    }

    #[test]
    fn headroom_sits_at_both_ends_of_the_largest_hole() {
        let maps = [
            mapping(0x1000..0x2000),
            mapping(0x10_0000..0x20_0000),     // heap
            mapping(0x7000_0000..0x7100_0000), // mmap area
            mapping(0x7200_0000..0x7300_0000), // stack
            mapping(0xffff_ffff_ff60_0000..0xffff_ffff_ff60_1000), // [vsyscall]
        ];
        assert_eq!(
            growth_headroom(&maps, 0x1000),
            vec![0x20_0000..0x20_1000, 0x6fff_f000..0x7000_0000]
        );
        // A hole smaller than twice the headroom is taken whole.
        assert_eq!(
            growth_headroom(&maps[..2], 0x10_0000),
            vec![0x2000..0x10_0000]
        );
        assert!(growth_headroom(&maps[..1], 0x1000).is_empty());
    }

    #[test]
    fn target_memory_refuses_a_page_size_not_a_power_of_two() {
        for page_size in [0, 3, 4095] {
            let err = TargetMemory::new(std::process::id() as i32, page_size).unwrap_err();
            assert!(
                matches!(err, TargetError::BadPageSize { page_size: p } if p == page_size),
                "{err:?}"
            );
        }
        assert!(TargetMemory::new(std::process::id() as i32, 4096).is_ok());
    }
}
