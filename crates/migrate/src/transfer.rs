//! [`Transport`] over a `precopy-transfer` [`Transfer`]: a socket sender, an image writer, or an
//! in-memory sink.

use crate::control::{Interrupt, RoundSent, Transport};
use precopy_transfer::{FinalCheck, MemoryRegion, PageSource, Sink, Transfer, TransferError};
use std::ops::Range;

/// Sends rounds with a [`Transfer`]; the final check is the one
/// [`TransferTransport::final_check`] chose ([`FinalCheck::Recorded`] unless told otherwise).
#[derive(Debug)]
pub struct TransferTransport<S, K> {
    transfer: Transfer<S, K>,
    check: FinalCheck,
    /// The last round failed because the connection broke or went silent past the I/O
    /// timeout (not a refusal, a fault or an interrupt): only then is reconnecting worth
    /// trying.
    broke: bool,
    /// With [`TransferTransport::grow_layout`]: the alignment of regions added for ranges
    /// outside the layout.
    grow: Option<u64>,
    /// Regions in the layout before any was added mid-stream.
    first_regions: usize,
    /// What the last round that failed had handed over before it failed.
    failed: Option<RoundSent>,
    /// The source's memory for the next round ([`Transport::set_memory`]).
    memory: Option<Vec<Range<u64>>>,
}

impl<S: PageSource, K: Sink> TransferTransport<S, K> {
    /// Wraps `transfer`, which must not have sent a round yet.
    pub fn new(transfer: Transfer<S, K>) -> Self {
        TransferTransport {
            check: FinalCheck::default(),
            broke: false,
            grow: None,
            first_regions: transfer.layout().regions().len(),
            failed: None,
            memory: None,
            transfer,
        }
    }

    /// Sends ranges outside the layout instead of refusing them: before a round, every part of
    /// its ranges that no region covers becomes a new region (`Transfer::add_regions_for`,
    /// widened to `align` bytes where nothing else is; announced to the destination with the
    /// protocol's REGION, recorded in an image). For a source whose memory grows while it is
    /// sent, such as an attached process mapping new memory anywhere (`TargetLog` with
    /// [`TargetLog::allow_anywhere`](crate::TargetLog::allow_anywhere)). A destination that
    /// cannot grow fails the round with `TransferError::CannotGrow`.
    pub fn grow_layout(mut self, align: u64) -> Self {
        self.grow = Some(align);
        self
    }

    /// The regions added mid-stream so far ([`TransferTransport::grow_layout`]).
    pub fn added_regions(&self) -> &[MemoryRegion] {
        let regions = self.transfer.layout().regions();
        &regions[self.first_regions.min(regions.len())..]
    }

    /// Chooses the final check: [`FinalCheck::Recorded`] compares the page hashes both ends
    /// recorded (no pass over memory while the source is paused); [`FinalCheck::Full`] also
    /// re-reads all source and destination memory, which catches a write the dirty log missed
    /// but adds a pass over memory on each end to the downtime.
    pub fn final_check(mut self, check: FinalCheck) -> Self {
        self.check = check;
        self
    }

    /// The transfer.
    pub fn transfer(&self) -> &Transfer<S, K> {
        &self.transfer
    }

    /// The transfer back.
    pub fn into_inner(self) -> Transfer<S, K> {
        self.transfer
    }
}

impl<S: PageSource, K: Sink> Transport for TransferTransport<S, K> {
    type Error = TransferError;

    fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, TransferError> {
        self.failed = None;
        if let Some(align) = self.grow {
            self.transfer
                .add_regions_for(ranges, align)
                .inspect_err(|e| self.broke = e.is_connection_break())?;
        }
        // After the regions it needs were added, so that the memory named covers them; and
        // only the parts of the round inside it (a range kept pending from before may have
        // been unmapped since: its pages are dropped, not sent as the zeros a read finds).
        let inside;
        let ranges = match self.memory.take() {
            Some(memory) => {
                self.transfer
                    .retain_memory(&memory)
                    .inspect_err(|e| self.broke = e.is_connection_break())?;
                inside = intersect(ranges, &memory);
                &inside[..]
            }
            None => ranges,
        };
        let r = self.transfer.send_round(ranges).inspect_err(|e| {
            self.broke = worth_reconnecting(e);
            self.failed = self.transfer.failed_round().map(round_sent);
        })?;
        Ok(round_sent(r))
    }

    fn sent_before_failure(&self) -> Option<RoundSent> {
        self.failed
    }

    /// Kept for the next [`Transport::send_round`], which hands it to the transfer
    /// (`Transfer::retain_memory`) after adding regions for the round's ranges.
    fn set_memory(&mut self, memory: &[Range<u64>]) {
        self.memory = Some(memory.to_vec());
    }

    fn changed(&mut self, ranges: &[Range<u64>]) -> Result<Vec<Range<u64>>, TransferError> {
        self.transfer.changed_since_sent(ranges)
    }

    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        self.transfer
            .send_state(state)
            .inspect_err(|e| self.broke = worth_reconnecting(e))
    }

    fn finish(&mut self) -> Result<(u64, std::time::Duration), TransferError> {
        let summary = self
            .transfer
            .finish_uncommitted(self.check)
            .inspect_err(|e| self.broke = worth_reconnecting(e))?;
        Ok((summary.checksum, summary.source_check))
    }

    fn commit(&mut self) -> Result<(), TransferError> {
        self.transfer.commit()
    }

    fn probe_finish(&mut self) -> Result<Option<std::time::Duration>, TransferError> {
        self.transfer.probe_finish()
    }

    /// All of the layout's memory with [`FinalCheck::Full`], else none.
    fn finish_reread_bytes(&self) -> u64 {
        match self.check {
            FinalCheck::Full => self.transfer.layout().total_len(),
            _ => 0,
        }
    }

    fn interrupter(&self) -> Option<Interrupt> {
        self.transfer.interrupter()
    }

    /// The transfer's (`Transfer::round_cutter`): a socket sender's, which drops the page
    /// frames not yet written and ends a wait for `--bandwidth`'s bucket.
    fn round_cutter(&self) -> Option<Interrupt> {
        self.transfer.round_cutter()
    }

    fn take_cut(&mut self) -> Option<Vec<Range<u64>>> {
        self.transfer.take_cut()
    }

    fn uncut(&mut self) {
        self.transfer.uncut();
    }

    /// Only after a round failed because the connection broke (end of stream, reset, broken
    /// pipe) or went silent past the I/O timeout (a path that drops everything without a
    /// reset looks exactly like that), and only with a sender that can dial again
    /// (`Sender::dial`): a destination that refused a frame or an interrupted transfer is not
    /// reconnected to. A destination that is merely stopped is reconnected to as well; the
    /// attempts then fail (its listener does not answer) and the migration ends with
    /// `Error::Reconnect`.
    fn can_reconnect(&self) -> bool {
        self.broke && self.transfer.can_resume()
    }

    /// [`Transfer::resume`]: connects to the same transfer again (the key proven again); the
    /// receiver (run with `Receiver::run_resumable`) kept what it applied and tells, per block
    /// of pages, what it holds, so only blocks that differ come back here to be sent again.
    fn reconnect(&mut self) -> Option<Result<Vec<Range<u64>>, TransferError>> {
        let lacking = match self.transfer.resume() {
            Ok(lacking) => lacking,
            Err(e) => return Some(Err(e)),
        };
        self.broke = false;
        Some(Ok(lacking))
    }

    fn peer(&self) -> String {
        self.transfer
            .peer()
            .unwrap_or_else(|| "the destination".into())
    }

    fn finish_work(&self) -> Option<String> {
        self.transfer.finish_work()
    }

    fn threads(&self) -> Vec<precopy_sys::sched::Tid> {
        self.transfer.sink().threads()
    }

    fn pacing(&self) -> Option<crate::Pacing> {
        self.transfer.pacing()
    }

    /// The transfer marks the next round final (`Transfer::expect_final_round`).
    fn expect_final_round(&mut self) {
        self.transfer.expect_final_round();
    }
}

/// The parts of `ranges` inside `memory` (sorted, disjoint), in the order of `ranges`.
fn intersect(ranges: &[Range<u64>], memory: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let first = memory.partition_point(|m| m.end <= r.start);
        for m in memory[first..].iter().take_while(|m| m.start < r.end) {
            let (s, e) = (r.start.max(m.start), r.end.min(m.end));
            if s < e {
                out.push(s..e);
            }
        }
    }
    out
}

/// The driver's view of a round the transfer sent.
fn round_sent(r: precopy_transfer::RoundSent) -> RoundSent {
    RoundSent {
        pages: r.pages,
        zero_pages: r.zero_pages,
        bytes: r.bytes_on_wire,
        duration: r.duration,
    }
}

/// Whether a round that failed with `e` may succeed on a new connection: the connection broke
/// ([`TransferError::is_connection_break`]) or the destination went silent past the I/O
/// timeout ([`TransferError::Stalled`]: a silent drop, with no reset, shows only as that).
fn worth_reconnecting(e: &TransferError) -> bool {
    e.is_connection_break() || matches!(e, TransferError::Stalled { .. })
}
