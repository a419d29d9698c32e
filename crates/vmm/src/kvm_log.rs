//! The cross-check: KVM's own dirty log (`KVM_GET_DIRTY_LOG` on a slot with
//! `KVM_MEM_LOG_DIRTY_PAGES`) read in the same rounds as the engine's userfaultfd rounds, and
//! required to be covered by them.
//!
//! # What must hold
//!
//! KVM marks a page dirty when a vCPU writes it through the second-level page tables (EPT/NPT);
//! the engine sees the same write because KVM resolves the guest page through the VMM's own
//! page tables, whose write-protect bit the engine armed. Each round [`KvmCheckedLog::dirty`]
//! reads (and clears) KVM's log first, then runs the engine's round. The two reads are not one
//! atomic snapshot while vCPUs run: a write landing after KVM's read of round *n − 1* and before
//! the engine's scan of round *n − 1* is reported by the engine in round *n − 1* and by KVM in
//! round *n*. So the rule checked on a running guest is
//!
//! ```text
//! KVM(n) ⊆ ours(n) ∪ ours(n − 1)          (ours(0) = all memory: round 0 sends everything)
//! ```
//!
//! and in **lockstep** mode, where the vCPUs are paused around both reads of every round (and
//! around arming), the strict per-round rule `KVM(n) ⊆ ours(n)`. A page that breaks the rule is
//! a write the engine missed: [`Error::MissedByUffd`], and the migration fails.
//!
//! The engine may report more than KVM (pages the VMM itself wrote through its mapping, which
//! KVM's log never sees): that is allowed, and counted.

use crate::error::Error;
use crate::vm::VmControl;
use precopy_migrate::{CollectStats, DirtyLog, TrackingError};
use precopy_sys::kvm::GuestRam;
use std::ops::Range;
use std::sync::Arc;

/// One round of the cross-check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CrossCheckRound {
    /// The round (1 = the first scan after arming).
    pub round: u64,
    /// Pages in KVM's dirty log.
    pub kvm_pages: u64,
    /// Pages the engine's round reported.
    pub our_pages: u64,
    /// KVM pages not in the engine's same round (reported by its previous one; always 0 in
    /// lockstep).
    pub kvm_only_this_round: u64,
    /// Pages the engine reported and KVM did not.
    pub ours_only: u64,
}

/// A [`DirtyLog`] that runs `inner` (the engine's log over the same guest RAM) and checks each
/// round against KVM's dirty log of the memory slot.
#[derive(Debug)]
pub struct KvmCheckedLog<D> {
    inner: D,
    ram: Arc<GuestRam>,
    lockstep: Option<VmControl>,
    /// The engine's previous round, one bit per page of the slot.
    prev: Vec<u64>,
    rounds: Vec<CrossCheckRound>,
}

impl<D: DirtyLog> KvmCheckedLog<D> {
    /// Checks `inner`, which must track exactly `ram`'s mapping. The slot must log dirty pages.
    pub fn new(inner: D, ram: Arc<GuestRam>) -> Result<Self, Error> {
        if !ram.logs_dirty() {
            return Err(Error::Misuse {
                operation: "a KVM dirty-log cross-check",
                state: "on a memory slot without KVM_MEM_LOG_DIRTY_PAGES",
            });
        }
        let words = (ram.ram().len() / crate::guest::PAGE).div_ceil(64) as usize;
        Ok(KvmCheckedLog {
            inner,
            ram,
            lockstep: None,
            prev: vec![!0; words],
            rounds: Vec::new(),
        })
    }

    /// Pauses the vCPUs (through `control`) around both reads of every round, so the strict
    /// per-round rule applies.
    pub fn lockstep(mut self, control: VmControl) -> Self {
        self.lockstep = Some(control);
        self
    }

    /// The rounds so far.
    pub fn rounds(&self) -> &[CrossCheckRound] {
        &self.rounds
    }

    /// The engine's log back.
    pub fn into_inner(self) -> D {
        self.inner
    }

    fn kvm_log(&self) -> Result<Vec<u64>, Error> {
        self.ram.dirty_log().map_err(|source| Error::Kvm {
            what: "KVM_GET_DIRTY_LOG",
            source,
        })
    }

    /// Runs `f` with the vCPUs paused in lockstep mode (unless they already were).
    fn stepped<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let resume = self.lockstep.as_ref().is_some_and(|c| c.pause_if_running());
        let out = f(self);
        if resume && let Some(c) = &self.lockstep {
            c.resume();
        }
        out
    }
}

fn set_bits(bits: &mut [u64], first: u64, end: u64) {
    for p in first..end {
        if let Some(w) = bits.get_mut((p / 64) as usize) {
            *w |= 1 << (p % 64);
        }
    }
}

fn count(words: impl Iterator<Item = u64>) -> u64 {
    words.map(|w| u64::from(w.count_ones())).sum()
}

impl<D: DirtyLog<Error = TrackingError>> DirtyLog for KvmCheckedLog<D> {
    type Error = Error;

    fn memory(&self) -> Vec<Range<u64>> {
        self.inner.memory()
    }

    fn page_size(&self) -> u64 {
        self.inner.page_size()
    }

    fn unvouched(&self) -> Vec<Range<u64>> {
        self.inner.unvouched()
    }

    fn needs_pause(&self) -> bool {
        self.inner.needs_pause()
    }

    fn start(&mut self) -> Result<(), Error> {
        self.stepped(|s| {
            s.kvm_log()?;
            s.inner.start().map_err(Error::DirtyLog)
        })
    }

    fn stop(&mut self) -> Result<(), Error> {
        self.inner.stop().map_err(Error::DirtyLog)
    }

    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats, Error> {
        let before = out.len();
        let (kvm, collected) = self.stepped(|s| -> Result<_, Error> {
            let kvm = s.kvm_log()?;
            let collected = s.inner.collect(out).map_err(Error::DirtyLog)?;
            Ok((kvm, collected))
        })?;
        let base = self.ram.ram().addr();
        let end = base + self.ram.ram().len();
        let mut ours = vec![0u64; self.prev.len()];
        for r in &out[before..] {
            let (s, e) = (r.start.max(base), r.end.min(end));
            if s < e {
                set_bits(
                    &mut ours,
                    (s - base) / crate::guest::PAGE,
                    (e - base).div_ceil(crate::guest::PAGE),
                );
            }
        }
        let strict = self.lockstep.is_some();
        let round = self.rounds.len() as u64 + 1;
        let zip = || kvm.iter().zip(&ours).zip(&self.prev);
        let missed_words: Vec<u64> = zip()
            .map(|((k, o), p)| if strict { k & !o } else { k & !o & !p })
            .collect();
        let missed = count(missed_words.iter().copied());
        let stats = CrossCheckRound {
            round,
            kvm_pages: count(kvm.iter().copied()),
            our_pages: count(ours.iter().copied()),
            kvm_only_this_round: count(zip().map(|((k, o), _)| k & !o)),
            ours_only: count(zip().map(|((k, o), _)| o & !k)),
        };
        self.rounds.push(stats);
        self.prev = ours;
        if missed > 0 {
            let (w, bits) = missed_words
                .iter()
                .enumerate()
                .find(|(_, w)| **w != 0)
                .map(|(i, w)| (i as u64, *w))
                .unwrap_or((0, 0));
            let first_page = w * 64 + u64::from(bits.trailing_zeros());
            return Err(Error::MissedByUffd {
                round,
                missed,
                first_gpa: self.ram.gpa() + first_page * crate::guest::PAGE,
            });
        }
        Ok(collected)
    }
}
