//! The three seams the driver talks through: where dirty pages come from ([`DirtyLog`]), where
//! they go ([`Transport`]), and what writes them ([`Workload`]).
//!
//! They are small on purpose, in the spirit of Cloud Hypervisor's `Migratable`: an embedder with
//! its own dirty log (KVM's, say) or its own wire implements one of them and reuses the rest.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// Makes a transport's blocked call return promptly with an error; callable from any thread,
/// any number of times (see [`Transport::interrupter`]).
pub type Interrupt = Arc<dyn Fn() + Send + Sync>;

/// Which memory is migrated and which of it was written: the one dirty-log trait (start,
/// collect, stop) that the engine's log ([`UffdDirtyLog`](crate::UffdDirtyLog)), an attached
/// process's ([`TargetLog`](crate::TargetLog)), the comparison backends (soft-dirty, mprotect,
/// uffd sync WP) and an embedder's own (KVM's) all implement; defined in `precopy-backends`.
///
/// # Harvested ranges are the caller's
///
/// Reading the log is destructive: a range [`DirtyLog::collect`] returns is no longer reported
/// by the log (the kernel re-armed its write protection). From then on the caller alone knows
/// the range must be sent. [`Migration`](crate::Migration) keeps every harvested range pending
/// until a round holding it was sent without error: a failed round's ranges go into the next
/// round after a reconnect, and when the migration fails they stay in
/// [`Migration::unsent`](crate::Migration::unsent) for a fallback. An embedder reading the log
/// itself must do the same.
pub use precopy_backends::{CollectStats, DirtyLog};

/// A transport's pacing of its writes to a byte rate ([`Transport::pacing`]): the
/// transfer's token bucket (`--bandwidth`).
pub use precopy_transfer::Pacing;

/// What one round delivered, as the transport counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundSent {
    /// Pages sent with contents.
    pub pages: u64,
    /// Pages sent as "all zeros" markers.
    pub zero_pages: u64,
    /// Bytes the transport wrote (on the wire, compressed, with framing).
    pub bytes: u64,
    /// From the first byte of the round until the transport had written all of it.
    pub duration: Duration,
}

/// Sends rounds of pages to the destination.
pub trait Transport {
    /// What a failure says (the transport's own typed error); the driver wraps it in an
    /// [`Error`](crate::Error) that names the step and the peer.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Reads and sends the pages of `ranges` (page-aligned; any order; overlaps allowed) as one
    /// round.
    fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, Self::Error>;

    /// Right after [`Transport::send_round`] failed: what that round had handed to the
    /// connection (or sink) before it failed, for the report; pages not known to have arrived
    /// (the driver keeps all of the round's ranges pending either way). `bytes` may be 0 when
    /// the transport cannot tell what it wrote. `None` (the default): unknown.
    fn sent_before_failure(&self) -> Option<RoundSent> {
        None
    }
    /// With the source paused and before the last round: which pages of `ranges` now differ
    /// from what this transport last sent of them. The default answers "all of them", which
    /// is always right and costs a resend of `ranges`.
    fn changed(&mut self, ranges: &[Range<u64>]) -> Result<Vec<Range<u64>>, Self::Error> {
        Ok(ranges.to_vec())
    }
    /// After the last round, before [`Transport::finish`]: sends the workload's state blob
    /// (possibly empty) with its own checksum; the destination receives it before it
    /// acknowledges.
    fn send_state(&mut self, state: &[u8]) -> Result<(), Self::Error>;
    /// No more rounds (the source is paused): sends the final memory checksum and returns it
    /// once the receiver has acknowledged that its memory matches. The second value is the part
    /// of the time spent reading source memory for the checksum on this side (zero when the
    /// checksum comes from what was recorded while sending).
    ///
    /// This must not yet make the destination treat its copy as complete: the driver calls
    /// [`Transport::commit`] once it has checked the acknowledgement came within the final
    /// round's bound.
    fn finish(&mut self) -> Result<(u64, Duration), Self::Error>;
    /// After [`Transport::finish`], within the bound: the destination may now consider its copy
    /// complete. The default does nothing (a transport whose destination needs no commit).
    fn commit(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Between rounds: what [`Transport::finish`] would cost now beyond reading memory (one
    /// round trip to the destination and the digests on both ends), measured, for the
    /// switch-over estimate. `None` (the default): the transport cannot tell, and the estimate
    /// leaves that part out.
    fn probe_finish(&mut self) -> Result<Option<Duration>, Self::Error> {
        Ok(None)
    }
    /// Bytes of memory [`Transport::finish`] re-reads on each end before the destination
    /// answers (a full final check: all of memory), for the switch-over estimate, which
    /// times it like [`Transport::changed`]. The default: none.
    fn finish_reread_bytes(&self) -> u64 {
        0
    }
    /// Right before each [`Transport::send_round`]: the source's memory as the dirty log
    /// tracks it now ([`DirtyLog::memory`]). A transport whose destination keeps a copy
    /// drops what lies outside it (memory the source unmapped) before the round: the
    /// transfer's `Transfer::retain_memory` (the protocol's MAPPED; an image records the
    /// mappings). The default ignores it.
    fn set_memory(&mut self, memory: &[Range<u64>]) {
        let _ = memory;
    }
    /// Right before the final round's [`Transport::send_round`] (the workload is paused until
    /// the migration ends): a transport whose destination can raise its own threads for the
    /// final phase tells it so (the transfer's final-round flag). Called again before a final
    /// round retried after a reconnect; never before a pause probe's rehearsal round. The
    /// default does nothing.
    fn expect_final_round(&mut self) {}
    /// A handle that makes a blocked [`Transport::send_round`] or [`Transport::finish`] return
    /// promptly with an error when called from another thread (the driver's deadlines and
    /// [`CancelHandle`](crate::CancelHandle) use it). `None` (the default): the driver can stop
    /// such a transport only between calls.
    fn interrupter(&self) -> Option<Interrupt> {
        None
    }
    /// A handle that cuts a [`Transport::send_round`] in progress short from another thread
    /// without breaking the transport (the driver's total timeout under
    /// [`LimitPolicy::SwitchOver`](crate::LimitPolicy::SwitchOver) uses it): the round ends
    /// soon with what was sent, and [`Transport::take_cut`] names the rest. Every round is
    /// cut so until [`Transport::uncut`]. `None` (the default): rounds always go whole.
    fn round_cutter(&self) -> Option<Interrupt> {
        None
    }
    /// Right after a [`Transport::send_round`] that returned `Ok`: `Some` (the ranges of it
    /// not sent; maybe none) if it was cut short ([`Transport::round_cutter`]), which the
    /// driver sends in a later round; `None` if it went whole. The default: `None`.
    fn take_cut(&mut self) -> Option<Vec<Range<u64>>> {
        None
    }
    /// After a cut ([`Transport::round_cutter`]): later rounds go whole again. The default
    /// does nothing.
    fn uncut(&mut self) {}
    /// Whether [`Transport::reconnect`] may work.
    fn can_reconnect(&self) -> bool {
        false
    }
    /// After a failed [`Transport::send_round`]: connects to the destination again, which kept
    /// what it had applied. Returns ranges the destination lacks beyond those of the failed
    /// round (pages of earlier rounds it never received), which the driver adds to the next
    /// round. `None` (the default): this transport cannot reconnect.
    fn reconnect(&mut self) -> Option<Result<Vec<Range<u64>>, Self::Error>> {
        None
    }
    /// Whether the transport paces its writes to a byte rate, and what it would let through
    /// right now without waiting: the switch-over estimate counts the final round's send as no
    /// faster than the rate allows (a rehearsal short enough to pass within the burst says
    /// nothing about it). `None` (the default): not paced.
    fn pacing(&self) -> Option<Pacing> {
        None
    }
    /// The destination, for messages.
    fn peer(&self) -> String {
        "the destination".into()
    }
    /// What the finish does besides the digests and an acknowledgement, for messages (an
    /// image: its index and `fsync`). `None` (the default): the digests and the
    /// acknowledgement round trip.
    fn finish_work(&self) -> Option<String> {
        None
    }
    /// The IDs of the threads the transport sends and takes acknowledgements on besides the
    /// caller's (a socket sender's writers and watchers): the driver raises their scheduling
    /// priority for the final phase with its own (see [`FinalPriority`](crate::FinalPriority)).
    fn threads(&self) -> Vec<precopy_sys::sched::Tid> {
        Vec::new()
    }
}

/// A workload's own count of its work, for the report's "what the source suffers": how fast
/// the workload runs before and while it is tracked, in its own unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadCounters {
    /// Operations completed so far (the demo's writers count page writes).
    pub operations: u64,
    /// Time spent performing them, summed over the workload's threads (so `busy / operations`
    /// is the mean cost of one operation, write-protect faults included).
    pub busy: Duration,
}

/// Whatever writes the memory: vCPUs, a process.
pub trait Workload {
    /// What a failure says (the workload's own typed error); the driver wraps it in an
    /// [`Error`](crate::Error) that names the action.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Stops every writer. Returns only once no write can happen any more.
    ///
    /// A throttled workload is stopped before its throttle is lifted: a writer held back is
    /// behind its own pace and, let loose first, writes in a burst that the switch-over's
    /// estimate (from the throttled scans) does not expect.
    ///
    /// Pause probes and the final phase call this from a thread raised to `SCHED_FIFO`
    /// where permitted ([`FinalPriority`](crate::FinalPriority)): wait for the writers by
    /// blocking (a condition variable, a futex, a short sleep), never by spinning or
    /// `yield_now`, which keeps time-sharing writers off that CPU; with every CPU so held,
    /// they run only when the kernel's real-time throttling lets them (by default 50 ms of
    /// each second, `sched_rt_runtime_us`; Documentation/scheduler/sched-rt-group.rst).
    fn pause(&mut self) -> Result<(), Self::Error>;
    /// Lets the writers run again after [`Workload::pause`]. After a final phase that failed,
    /// it is called from the final phase's thread still raised to `SCHED_FIFO` where
    /// permitted, as [`Workload::pause`] is: the same rule holds (block, never spin).
    fn resume(&mut self) -> Result<(), Self::Error>;
    /// Denies the writers `fraction` (0.0 to 0.99) of their CPU time; 0.0 lifts the throttle.
    /// The default does nothing (the driver then reports the throttle it asked for). After a
    /// final phase that failed, the lift comes from the final phase's thread still raised, as
    /// [`Workload::resume`] does.
    fn set_throttle(&mut self, fraction: f64) -> Result<(), Self::Error> {
        let _ = fraction;
        Ok(())
    }
    /// How the throttle is applied, for the report.
    fn throttle_method(&self) -> &'static str {
        "none"
    }
    /// The workload's own counters, if it keeps any (the default: none). Read after every
    /// scan; keep it cheap.
    fn counters(&mut self) -> Option<WorkloadCounters> {
        None
    }
    /// Called once, while paused, after the last memory round: the opaque state the destination
    /// needs besides memory (vCPU registers, device state), sent with its own checksum before
    /// the final acknowledgement. The default has none (an empty blob is sent). At most
    /// [`MAX_STATE_LEN`](precopy_transfer::MAX_STATE_LEN) (16 MiB) over a
    /// [`TransferTransport`](crate::TransferTransport): a larger blob fails the migration
    /// (`TransferError::StateTooLarge`) after the pause, and the workload resumes.
    fn save_state(&mut self) -> Result<Vec<u8>, Self::Error> {
        Ok(Vec::new())
    }
    /// How the last [`Workload::pause`] raised the writers' threads' scheduling priority to
    /// make them stop at once, or why it did not, for the report (the driver asks after the
    /// final round's pause: [`MigrationReport::pause_priority`](crate::MigrationReport)).
    /// `None` (the default): the workload does not raise.
    fn pause_priority(&self) -> Option<crate::PriorityReport> {
        None
    }
}

type Hook<E> = Box<dyn FnMut() -> Result<(), E> + Send>;
type ThrottleHook<E> = Box<dyn FnMut(f64) -> Result<(), E> + Send>;
type CountersHook = Box<dyn FnMut() -> WorkloadCounters + Send>;
type StateHook<E> = Box<dyn FnMut() -> Result<Vec<u8>, E> + Send>;

/// A [`Workload`] made of an embedder's closures: pause and resume the vCPUs, optionally
/// throttle them and save their state. `E` is the embedder's own error type, which every
/// closure returns (inferred from them; use [`std::convert::Infallible`] for closures that
/// cannot fail).
pub struct Callbacks<E> {
    pause: Hook<E>,
    resume: Hook<E>,
    throttle: Option<ThrottleHook<E>>,
    counters: Option<CountersHook>,
    state: Option<StateHook<E>>,
}

impl<E> std::fmt::Debug for Callbacks<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks")
            .field("throttle", &self.throttle.is_some())
            .field("state", &self.state.is_some())
            .finish_non_exhaustive()
    }
}

impl<E> Callbacks<E> {
    /// A workload paused and resumed by these closures. `pause` must return only once no writer
    /// can write any more.
    pub fn new(
        pause: impl FnMut() -> Result<(), E> + Send + 'static,
        resume: impl FnMut() -> Result<(), E> + Send + 'static,
    ) -> Callbacks<E> {
        Callbacks {
            pause: Box::new(pause),
            resume: Box::new(resume),
            throttle: None,
            counters: None,
            state: None,
        }
    }

    /// Adds a state hook: called while paused after the last memory round, returns the state
    /// blob (vCPU registers, device state, at most 16 MiB: see [`Workload::save_state`]) the
    /// destination receives. Called again at a later switch-over if the connection broke in
    /// the final phase ([`MigrationConfig::switchover_attempts`](crate::MigrationConfig)).
    pub fn with_state(
        mut self,
        state: impl FnMut() -> Result<Vec<u8>, E> + Send + 'static,
    ) -> Callbacks<E> {
        self.state = Some(Box::new(state));
        self
    }

    /// Adds a throttle callback: called with the fraction of CPU time to deny (0.0 lifts it).
    pub fn with_throttle(
        mut self,
        throttle: impl FnMut(f64) -> Result<(), E> + Send + 'static,
    ) -> Callbacks<E> {
        self.throttle = Some(Box::new(throttle));
        self
    }

    /// Adds the workload's own counters (see [`Workload::counters`]).
    pub fn with_counters(
        mut self,
        counters: impl FnMut() -> WorkloadCounters + Send + 'static,
    ) -> Callbacks<E> {
        self.counters = Some(Box::new(counters));
        self
    }
}

impl<E: std::error::Error + Send + Sync + 'static> Workload for Callbacks<E> {
    type Error = E;
    fn pause(&mut self) -> Result<(), E> {
        (self.pause)()
    }
    fn resume(&mut self) -> Result<(), E> {
        (self.resume)()
    }
    fn set_throttle(&mut self, fraction: f64) -> Result<(), E> {
        match &mut self.throttle {
            Some(t) => t(fraction),
            None => Ok(()),
        }
    }
    fn throttle_method(&self) -> &'static str {
        if self.throttle.is_some() {
            "callback"
        } else {
            "none"
        }
    }
    fn counters(&mut self) -> Option<WorkloadCounters> {
        self.counters.as_mut().map(|f| f())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, E> {
        match &mut self.state {
            Some(s) => s(),
            None => Ok(Vec::new()),
        }
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    type Error = T::Error;
    fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, T::Error> {
        (**self).send_round(ranges)
    }
    fn set_memory(&mut self, memory: &[Range<u64>]) {
        (**self).set_memory(memory)
    }
    fn changed(&mut self, ranges: &[Range<u64>]) -> Result<Vec<Range<u64>>, T::Error> {
        (**self).changed(ranges)
    }
    fn send_state(&mut self, state: &[u8]) -> Result<(), T::Error> {
        (**self).send_state(state)
    }
    fn finish(&mut self) -> Result<(u64, Duration), T::Error> {
        (**self).finish()
    }
    fn commit(&mut self) -> Result<(), T::Error> {
        (**self).commit()
    }
    fn probe_finish(&mut self) -> Result<Option<Duration>, T::Error> {
        (**self).probe_finish()
    }
    fn finish_reread_bytes(&self) -> u64 {
        (**self).finish_reread_bytes()
    }
    fn interrupter(&self) -> Option<Interrupt> {
        (**self).interrupter()
    }
    fn round_cutter(&self) -> Option<Interrupt> {
        (**self).round_cutter()
    }
    fn take_cut(&mut self) -> Option<Vec<Range<u64>>> {
        (**self).take_cut()
    }
    fn uncut(&mut self) {
        (**self).uncut()
    }
    fn can_reconnect(&self) -> bool {
        (**self).can_reconnect()
    }
    fn reconnect(&mut self) -> Option<Result<Vec<Range<u64>>, T::Error>> {
        (**self).reconnect()
    }
    fn peer(&self) -> String {
        (**self).peer()
    }
    fn finish_work(&self) -> Option<String> {
        (**self).finish_work()
    }
    fn threads(&self) -> Vec<precopy_sys::sched::Tid> {
        (**self).threads()
    }
    fn pacing(&self) -> Option<Pacing> {
        (**self).pacing()
    }
    fn expect_final_round(&mut self) {
        (**self).expect_final_round()
    }
}

impl<T: Workload + ?Sized> Workload for &mut T {
    type Error = T::Error;
    fn pause(&mut self) -> Result<(), T::Error> {
        (**self).pause()
    }
    fn resume(&mut self) -> Result<(), T::Error> {
        (**self).resume()
    }
    fn set_throttle(&mut self, fraction: f64) -> Result<(), T::Error> {
        (**self).set_throttle(fraction)
    }
    fn throttle_method(&self) -> &'static str {
        (**self).throttle_method()
    }
    fn counters(&mut self) -> Option<WorkloadCounters> {
        (**self).counters()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, T::Error> {
        (**self).save_state()
    }
    fn pause_priority(&self) -> Option<crate::PriorityReport> {
        (**self).pause_priority()
    }
}

/// Writes the embedder knows about and no dirty log can see — a device's DMA into guest memory
/// (vhost-user, VFIO, io_uring fixed buffers), a helper process writing shared memory — added
/// to the next round, the way QEMU, Firecracker and Cloud Hypervisor OR a device's dirty
/// bitmap into KVM's.
///
/// Cloneable and `Send + Sync`: hand a clone to each device thread. [`ExternalDirty::mark`] a
/// range **after** the write to it has completed (a mark taken before the write could be
/// drained, and the page read, before the write lands). Writers must stop when the workload is
/// paused: marks made before [`Workload::pause`] returned reach the final round; later writes
/// are outside the migration. [`UffdDirtyLog`](crate::UffdDirtyLog) drains its handle on every
/// round; a custom [`DirtyLog`] calls [`ExternalDirty::drain_into`] in its
/// [`DirtyLog::collect`].
///
/// The handle a dirty log hands out ([`UffdDirtyLog::external_dirty`](crate::UffdDirtyLog::external_dirty))
/// knows the memory it tracks and refuses, at the call, a range outside it (a guest-physical
/// address passed where a host address belongs is the usual cause) and any mark once that log
/// is gone (the migration ended): nothing is recorded that a round would fail on later.
#[derive(Debug, Clone, Default)]
pub struct ExternalDirty {
    shared: std::sync::Arc<Marks>,
}

/// What the clones of one [`ExternalDirty`] share.
#[derive(Debug, Default)]
struct Marks {
    ranges: std::sync::Mutex<Vec<Range<u64>>>,
    /// The memory a mark must lie in (coalesced, sorted); `None`: any user memory.
    memory: Option<Vec<Range<u64>>>,
    /// Set when the log draining these marks is gone.
    closed: std::sync::atomic::AtomicBool,
}

/// Highest end of a user-space range [`ExternalDirty::mark`] accepts: 2^56, the top of the
/// largest user address space Linux offers (x86_64 with 5-level page tables, RISC-V Sv57;
/// aarch64 stops at 2^52). Below it, widening a range to whole pages of any power-of-two size up
/// to 2^56 cannot overflow.
pub const USER_ADDRESS_LIMIT: u64 = 1 << 56;

/// A range or page size [`ExternalDirty`] refused. Nothing was recorded or drained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MarkError {
    /// The range ends before it starts.
    #[error("range {start:#x}..{end:#x} ends before it starts")]
    Inverted {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// The range reaches past [`USER_ADDRESS_LIMIT`]: no process memory lies there.
    #[error("range {start:#x}..{end:#x} reaches past the top of user memory ({limit:#x})")]
    OutsideUserMemory {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// [`USER_ADDRESS_LIMIT`].
        limit: u64,
    },
    /// A page size that is zero, not a power of two or above [`USER_ADDRESS_LIMIT`].
    #[error("page size {page_size} is not a power of two up to 2^56")]
    BadPageSize {
        /// The rejected size.
        page_size: u64,
    },
    /// The range is not inside the memory the dirty log tracks (in source host addresses;
    /// a guest-physical address is not one).
    #[error("range {start:#x}..{end:#x} is not inside the tracked memory")]
    OutsideMemory {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// The dirty log these marks were for is gone (the migration ended): nothing takes them.
    #[error("the dirty log this handle marks for is gone (the migration ended)")]
    Closed,
}

impl ExternalDirty {
    /// An empty set that accepts any range of user memory.
    pub fn new() -> ExternalDirty {
        ExternalDirty::default()
    }

    /// An empty set that accepts only ranges inside `memory` (adjacent ranges count as one).
    pub fn for_memory(mut memory: Vec<Range<u64>>) -> ExternalDirty {
        precopy_sys::ranges::coalesce(&mut memory);
        ExternalDirty {
            shared: std::sync::Arc::new(Marks {
                memory: Some(memory),
                ..Marks::default()
            }),
        }
    }

    /// Refuses every later [`mark`](ExternalDirty::mark) with [`MarkError::Closed`] (the log
    /// that drains this set calls it when it goes away).
    pub fn close(&self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Adds `range` (source addresses; widened to whole pages by the log that drains it) to
    /// the next round. An empty range adds nothing.
    ///
    /// # Errors
    /// [`MarkError::Inverted`], [`MarkError::OutsideUserMemory`], [`MarkError::OutsideMemory`]
    /// (a set made [`for_memory`](ExternalDirty::for_memory)) or [`MarkError::Closed`];
    /// nothing is recorded.
    pub fn mark(&self, range: Range<u64>) -> Result<(), MarkError> {
        let Range { start, end } = range;
        if end < start {
            return Err(MarkError::Inverted { start, end });
        }
        if end > USER_ADDRESS_LIMIT {
            return Err(MarkError::OutsideUserMemory {
                start,
                end,
                limit: USER_ADDRESS_LIMIT,
            });
        }
        if self.shared.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(MarkError::Closed);
        }
        let inside = |m: &Vec<Range<u64>>| m.iter().any(|r| r.start <= start && end <= r.end);
        if start < end && self.shared.memory.as_ref().is_some_and(|m| !inside(m)) {
            return Err(MarkError::OutsideMemory { start, end });
        }
        if start < end {
            self.lock().push(start..end);
        }
        Ok(())
    }

    /// Moves every marked range into `out`, widened to whole `page_size` pages.
    ///
    /// # Errors
    /// [`MarkError::BadPageSize`]; the marks stay for the next call.
    pub fn drain_into(&self, page_size: u64, out: &mut Vec<Range<u64>>) -> Result<(), MarkError> {
        if !page_size.is_power_of_two() || page_size > USER_ADDRESS_LIMIT {
            return Err(MarkError::BadPageSize { page_size });
        }
        let ps = page_size;
        // Every mark ends at or below 2^56, so rounding up to `ps` (at most 2^56) cannot wrap.
        out.extend(
            self.lock()
                .drain(..)
                .map(|r| r.start / ps * ps..r.end.div_ceil(ps) * ps),
        );
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Range<u64>>> {
        // A panic while holding the lock cannot leave the vector inconsistent (push or drain).
        self.shared.ranges.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_for_memory_refuses_marks_outside_it_and_after_close() {
        let d = ExternalDirty::for_memory(vec![0x3000..0x4000, 0x1000..0x3000, 0x8000..0x9000]);
        // Inside, also across two adjacent ranges; an empty range anywhere adds nothing.
        d.mark(0x1000..0x1008).unwrap();
        d.mark(0x2ff8..0x3008).unwrap();
        d.mark(0x8000..0x9000).unwrap();
        d.mark(0x10..0x10).unwrap();
        for (start, end) in [
            (0x0, 0x8),
            (0x3ff8, 0x4008),
            (0x4000, 0x8000),
            (0x8fff, 0x9001),
        ] {
            assert_eq!(
                d.mark(start..end),
                Err(MarkError::OutsideMemory { start, end })
            );
        }
        let clone = d.clone();
        d.close();
        assert_eq!(clone.mark(0x1000..0x1008), Err(MarkError::Closed));
        let mut out = Vec::new();
        d.drain_into(0x1000, &mut out).unwrap();
        assert_eq!(out, vec![0x1000..0x2000, 0x2000..0x4000, 0x8000..0x9000]);
    }

    #[test]
    #[allow(clippy::reversed_empty_ranges)] // the inverted range is the point
    fn mark_refuses_an_inverted_range_and_records_nothing() {
        let d = ExternalDirty::new();
        let err = d.mark(0x2000..0x1000).unwrap_err();
        assert_eq!(
            err,
            MarkError::Inverted {
                start: 0x2000,
                end: 0x1000
            }
        );
        let mut out = Vec::new();
        d.drain_into(4096, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn mark_refuses_ranges_near_u64_max() {
        let d = ExternalDirty::new();
        for r in [
            u64::MAX - 8..u64::MAX,
            USER_ADDRESS_LIMIT..USER_ADDRESS_LIMIT + 1,
            0..u64::MAX,
        ] {
            let err = d.mark(r.clone()).unwrap_err();
            assert_eq!(
                err,
                MarkError::OutsideUserMemory {
                    start: r.start,
                    end: r.end,
                    limit: USER_ADDRESS_LIMIT
                }
            );
        }
        // The highest range accepted widens without wrapping, even to 1 GiB pages.
        d.mark(USER_ADDRESS_LIMIT - 1..USER_ADDRESS_LIMIT).unwrap();
        let mut out = Vec::new();
        d.drain_into(1 << 30, &mut out).unwrap();
        assert_eq!(
            out,
            vec![USER_ADDRESS_LIMIT - (1 << 30)..USER_ADDRESS_LIMIT]
        );
    }

    #[test]
    fn mark_of_an_empty_range_records_nothing() {
        let d = ExternalDirty::new();
        d.mark(0x1000..0x1000).unwrap();
        let mut out = Vec::new();
        d.drain_into(4096, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn drain_refuses_a_page_size_not_a_power_of_two_and_keeps_the_marks() {
        let d = ExternalDirty::new();
        d.mark(0x1001..0x1002).unwrap();
        let mut out = Vec::new();
        for page_size in [0, 3, 4095, 1 << 57] {
            let err = d.drain_into(page_size, &mut out).unwrap_err();
            assert_eq!(err, MarkError::BadPageSize { page_size });
            assert!(out.is_empty());
        }
        d.drain_into(4096, &mut out).unwrap();
        assert_eq!(out, vec![0x1000..0x2000]);
    }
}
