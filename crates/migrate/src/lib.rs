//! Live migration by pre-copy: send all memory while the source keeps running, then keep sending
//! what it wrote meanwhile, round after round, until the rest fits in a short pause.
//!
//! This crate owns the *decisions* of a migration — when to iterate, when to switch over, when
//! and how hard to throttle, and what to report — and nothing about how pages are found or how
//! bytes travel. It talks to three seams, each with its own typed error (a failed migration's
//! [`Error`] carries it as the cause):
//!
//! * a [`DirtyLog`] says which memory exists and which pages were written since the last call
//!   ([`UffdDirtyLog`] adapts `precopy-tracker` + `precopy-scanner`);
//! * a [`Transport`] sends one round of ranges and, at the end, the memory checksum, returning
//!   only once the receiver acknowledged it ([`TransferTransport`] adapts a `precopy-transfer`
//!   [`Transfer`](precopy_transfer::Transfer), over a socket or into memory);
//! * a [`Workload`] pauses, resumes and throttles whatever writes the memory ([`Callbacks`] for an
//!   embedder such as a VMM, [`ProcessControl`] for another process).
//!
//! # The rounds
//!
//! ```text
//!  arm tracking ─► round 0: send all memory ─► scan ─┬─ expected downtime ≤ max ─► final round
//!                                         ▲          ├─ round or time limit ─► policy: final | abort
//!                                         └─ send ◄──┘  (else; maybe raise the throttle)
//!  final round: pause ─► scan ─► send pending + scan ─► check scan ─► state blob ─► checksum ─► receiver's ack ─► check scan ─► commit ─► resume | stay stopped
//! ```
//!
//! Round 0 sends every page of [`DirtyLog::memory`]. Every later round sends the pages the
//! previous scan found. A scan runs *before* the pages it reports are read, so a write that races
//! a round is caught by the next scan, never lost (the tracker's guarantee).
//!
//! # Switch-over rule
//!
//! After each scan the driver knows the bytes still pending (what the scan found) and estimates
//! what the final phase would cost if it paused now, each part twice: what it typically costs
//! (their sum is the **expected downtime**) and what it cost at worst lately (the **bound**).
//! **Pause**: the median of three probes that rehearse the final phase's start after the scans
//! before rounds 1, 2 and 3: pause the workload, scan again, resume it
//! ([`MigrationConfig::probe_pause`]). **Final scan**: the lower median of those probes' scans,
//! which run as the final scan does (workload stopped, right after a scan with it running);
//! a scan beside the running workload costs about twice as much, its CPU time too, so it says
//! little about the final one (of two probes the faster: the first follows the scan that
//! re-protected all of round 0's writes and costs more). Bounded by the slowest of the last
//! three scans and the probes'.
//! **Pause check** (its two scans, see "The pause check"): each at the lower median of the
//! scans the pause probes take after their send, the workload still paused, as the pause check
//! scans after the final send: they find nothing and cost less than the probes' first scans,
//! which find and re-protect what was written since the scan before (without them, each at
//! the final scan's cost); bounded by the slowest scan of all for each.
//! **Send** of the pending bytes: at the time per byte of the **rehearsal rounds**, bounded by
//! the slowest of them. Each pause probe sends a sample of the pending pages (single pages
//! spread over all of them, about 4 MiB, at most a quarter) as a round of its own
//! ([`RoundKind::Rehearsal`], [`MigrationConfig::rehearse_send`]), with the workload paused and
//! the threads at the final phase's priority: the final round's own conditions. The live
//! rounds' throughput does not predict the final round: beside a CPU-bound process on a 2-CPU
//! machine the final round's threads all ran on one CPU at half the live rounds' speed
//! (BENCHMARKS.md), and raised to a real-time priority they take both CPUs and go faster than
//! the live rounds. Without rehearsals: at the last iterative round's throughput, bounded by a
//! line `fixed + bytes / bandwidth` fitted to the last four iterative rounds, never faster than
//! the slowest of them, and before two such rounds exist by the duration of the smallest
//! measured round at least as big. The report says which (`send_from`). A **paced** transport
//! ([`Transport::pacing`]: `--bandwidth`'s token bucket) is never expected faster than its
//! rate lets the bytes past what the bucket holds through, times how much slower than their
//! pacing recent paced rounds went (`paced_rate` in the report): a rehearsal short enough to
//! pass within the bucket measured the socket, not the pacing.
//!
//! **Priority.** From the pause to the acknowledgement (and in the pause probes) the driver's
//! thread, the transport's ([`Transport::threads`]: a socket sender's writers and watchers)
//! and any the embedder adds ([`Migration::raise_also`]) run at `SCHED_FIFO`
//! ([`MigrationConfig::final_priority`], default priority 1) where the process may
//! (`CAP_SYS_NICE`), and are put back before the workload resumes (after a failed final
//! phase, right after it resumed, so that the resume does not wait for a CPU); the report says
//! whether they were raised or why not ([`PriorityReport`]). A real-time thread that wakes is placed on
//! a CPU running only normal tasks and preempts them, so the final round's threads spread over
//! the CPUs at once instead of waiting for the load balancer.
//! The threads are raised before the downtime's clock starts, as in the pause probes: the
//! workload runs on meanwhile.
//! **Finish** (the memory digests and the acknowledgement round trip): the upper median of the
//! [`Transport::probe_finish`] samples (over a socket a PING/PONG on every connection, see
//! `precopy-transfer`'s protocol) that the pause probes take with the workload paused (two
//! each, so that one slow sample of two probes does not decide), as it is for the real
//! acknowledgement; bounded by the slowest of those and of the last five samples
//! taken after each round beside the running workload. **Re-reads** while paused (the verify
//! pass over memory the dirty log cannot vouch for, a full final check's pass over all memory
//! on each end, [`Transport::finish_reread_bytes`]): their bytes at the time per byte of
//! [`Transport::changed`] on a bounded sample (at most 2 MiB) timed inside each pause probe;
//! without a sample there is no estimate, so no switch-over on a guess. **Written meanwhile**:
//! the dirty rate times the expected scan and pause, sent in the final round too; while a
//! throttle is on, at least the last unthrottled scan's rate (pausing lifts the throttle, and a
//! scan that fell in the throttle's stopped share finds little or nothing).
//! The driver switches over when the bound times a **margin** is at most
//! [`MigrationConfig::max_downtime`] ([`DowntimeEstimate::bound`]): a limit is a promise, the
//! expected downtime a prediction. The margin is the largest ratio of actual to estimated send
//! time over the last four rounds (1 to 1.5). This refines QEMU's rule ("pending bytes <
//! bandwidth × downtime limit"). The memory **throughput** used for progress and auto-converge
//! is, as before, memory bytes a round delivered (pages with contents plus zero pages, times the
//! page size) divided by its duration: the last round's when it moved at least 4 MiB, else the
//! average so far.
//!
//! The report gives the estimate's parts ([`DowntimeEstimate`]) beside the measured ones
//! ([`FinalPhase`]), and a note ([`MigrationReport::downtime_note`]) when the limit could not be
//! met (the iteration ended on a limit: is it the fixed costs or the dirty rate?) or was
//! exceeded (which part took longer than estimated). Not estimated: the state blob (saved
//! once, while paused). Every round, the final one included, spreads
//! its batches over all the transport's streams (round robin per run of pages).
//!
//! Two limits bound the iteration, each with a [`LimitPolicy`]:
//!
//! * [`MigrationConfig::max_rounds`] iterative rounds (default 30, policy
//!   [`LimitPolicy::SwitchOver`]: a longer pause is better than no migration);
//! * [`MigrationConfig::timeout`], measured from the start (default none, policy
//!   [`LimitPolicy::Abort`]: a migration that runs too long is usually a sign to retry later).
//!
//! `SwitchOver` goes to the final round at once, whatever the expected downtime (the timeout
//! cuts a round in progress short for it, see "Bounded failures"). `Abort` stops
//! cleanly: the throttle is lifted, the workload keeps running, the transport is dropped without
//! finishing (a receiver then sees a truncated stream and never reports success) and
//! [`Error::Aborted`] is returned. The report says which rule ended the iteration
//! ([`SwitchReason`]).
//!
//! # Auto-converge
//!
//! A workload that writes faster than the link carries never converges. When the dirty rate at a
//! scan (bytes the latest scans found ÷ the time they cover, over at least the last 100 ms of
//! scans under the current throttle: [`RoundReport::dirty_rate`]) is at least
//! [`ThrottleConfig::trigger_ratio`] × the throughput for [`ThrottleConfig::trigger_rounds`]
//! scans in a row, the driver raises the throttle: first to [`ThrottleConfig::initial`], then by
//! [`ThrottleConfig::increment`] each time the condition holds again, up to
//! [`ThrottleConfig::max`] (QEMU's defaults: 20 %, +10 %, 99 %). The default trigger ratio is
//! 0.5, QEMU's `throttle-trigger-threshold`: a round that finds at least half as many bytes
//! dirty as the link carried in the same time is making too little progress. (A ratio of 1.0
//! would never fire once the workload dirties all of a small memory: the dirty bytes per interval
//! are then capped by the memory size.) The throttle is the fraction of
//! its CPU time the workload is denied; [`Workload::set_throttle`] applies it — a vCPU sleep
//! for an embedder, a CFS quota in a cgroup v1 `cpu` hierarchy or a SIGSTOP/SIGCONT duty cycle
//! for a process (see [`ProcessControl`]). It is lifted when the migration ends, however it ends.
//!
//! # The final round and downtime
//!
//! The driver pauses the workload, scans, sends the pages of the last iterative scan together
//! with the new ones as one round, asks the workload for its state blob
//! ([`Workload::save_state`]: vCPU registers, device state) and sends it with its own checksum,
//! sends the final memory checksum, and waits for the receiver to acknowledge it (the destination
//! has the state by then: Cloud Hypervisor's memory, `State`, `Complete`). With [`TransferTransport`] the checksum is built from the page CRCs both ends
//! recorded while sending and applying (no pass over memory while paused), or with
//! `FinalCheck::Full` also from all source and destination memory read anew. **Downtime** is the
//! time from the pause to that acknowledgement; the report splits it into pause, scan, send,
//! the pause check (next section) and state + checksum + ack. Then the workload is resumed or left stopped ([`AfterMigration`]). If
//! anything fails after the pause, the workload is resumed before the error is returned: a failed
//! migration leaves the source running, never stopped and never half-migrated.
//!
//! # The pause check
//!
//! A paused workload can run again without the driver knowing: a process paused with
//! `SIGSTOP` continues on any `SIGCONT` (another tool, a shell's `fg`), and an embedder's
//! pause may miss a writer. Its writes after the final scan would be missing from the copy,
//! which would still verify: the final checksum compares what was sent with what arrived.
//! So after the final round's pages (and the verify pass's) were sent, the driver scans the
//! dirty log again, the same collection the rounds use (it re-protects what it reports). A
//! page found means the workload ran: the driver pauses it again (pausing a paused workload
//! is harmless), sends those pages in the final round and scans again, at most
//! [`PAUSE_CHECK_SENDS`] times; then the state, the checksum and the acknowledgement, and one
//! more scan right before the commit, where nothing more can be sent. A page found by that
//! last scan, or pages still appearing after the sends, fail the migration with
//! [`Error::NotPaused`] as a final round past its bound does: the workload resumed, the
//! destination never told to commit. Every scan runs within the final round's bound.
//!
//! What it proves: the copy holds every page the dirty log reported written up to the last
//! check scan, so, for memory the log vouches for, the destination equals the source as of
//! that scan's instant (right before the commit). What it cannot prove: changes the log
//! cannot see (memory written through another mapping or by another process, the next
//! section): those are compared once, by the verify pass before the final send, and a writer
//! that runs after it is not seen again. The check costs two scans of unchanged memory in the
//! downtime (0.2-0.5 ms per GiB each on the project's machine at low load, less than the
//! final scan, which re-protects what it finds),
//! reported as [`FinalPhase::check`] and in [`PauseCheck`], and estimated as its own part of
//! the switch-over rule ([`DowntimeEstimate::check`]) from one such scan rehearsed in each
//! pause probe ([`RoundReport::probe_check`]). Pages found make it the report's
//! warning: "the source ran during the final round".
//!
//! # Memory the dirty log cannot vouch for
//!
//! A dirty log may miss changes that bypass the pages tables it watches: shared memory written
//! through another mapping or process, a hole punched in a memfd, hugetlb `MADV_DONTNEED`, DMA
//! (ARCHITECTURE.md has the table per memory kind and change path). It lists that memory in
//! [`DirtyLog::unvouched`] ([`UffdDirtyLog`] lists the ranges the tracker marked `verify`: every
//! kind but private anonymous memory, by default). In the final round, after the last scan and
//! with the workload paused, the driver asks [`Transport::changed`] which of those pages differ
//! from what was sent ([`TransferTransport`] re-reads them and compares page hashes) and sends them
//! in the same round. The report's [`VerifyPass`] says what that pass read, what it found, how
//! much of it the log had missed, and how long it took (part of the downtime, which the
//! switch-over rule estimates from samples timed in the pause probes: see "Switch-over rule"). Writes an embedder knows about and no log can see (a device's
//! DMA) go through [`ExternalDirty`] into the next round.
//! # Bounded failures
//!
//! A stuck, failing or slow peer must not hold the workload. Every blocking step has a bound:
//!
//! * **Each send and receive** is bounded by the transport's I/O timeout
//!   (`SenderConfig::io_timeout`, default 10 s of no progress; the receiver's own is 60 s of
//!   silence); connecting and the handshake by the handshake timeout (default 10 s).
//! * **The total timeout** ([`MigrationConfig::timeout`]) under [`LimitPolicy::Abort`] also
//!   interrupts a round in progress, not only the check between rounds. Under
//!   [`LimitPolicy::SwitchOver`] it cuts the round in progress short, breaking nothing
//!   ([`Transport::round_cutter`]), and the final round starts at once with what that round
//!   had not sent ([`RoundReport::interrupted`]); a transport that cannot cut a round ends it
//!   first.
//! * **The final round** has a hard bound, from the pause to the destination's acknowledgement:
//!   [`MigrationConfig::final_round_timeout`], by default `max(10 × max_downtime, 2 × expected
//!   downtime at switch-over, 5 s)`. The floor is there because a loaded host (this project's
//!   2-core CI machine with 7 builds running) misses a 50 ms estimate by seconds, and a
//!   final round that fails there means no migration at all; the expected-downtime term keeps a
//!   forced switch-over with more pending than the limit from failing by design (with no
//!   downtime estimated, as after a round 0 cut short by the timeout, a paced transport's
//!   time for the pending bytes at its rate stands for it). Set it lower
//!   where a long pause costs more than a failed migration. Past it the transport is interrupted, the workload resumed, and
//!   [`Error::Timeout`] returned; the report is `Failed` with the downtime actually suffered.
//!   The destination's copy becomes complete only when the source **commits** after an
//!   acknowledgement that came in time ([`Transport::commit`], the protocol's COMMIT): a
//!   destination that acknowledges late never completes.
//! * **A cancel** from another thread ([`CancelHandle`], from [`Migration::cancel_handle`])
//!   interrupts whatever runs and ends the migration with [`Error::Cancelled`].
//!
//! The driver's deadlines and the cancel reach a blocked transport through
//! [`Transport::interrupter`] (a socket transport shuts its connections down). Errors name the
//! step ([`Step`]) and the peer.
//!
//! **Harvested pages are never dropped.** The dirty log hands each written range out once (see
//! [`DirtyLog`]). A round that fails keeps its ranges: after a reconnect
//! ([`ReconnectConfig`]: bounded attempts with doubling backoff) they go
//! into the next round with whatever the transport reports the destination lacks; when the
//! migration fails they are in [`Migration::unsent`] for a fallback. The report says what
//! happened either way: the rounds that ran, and a round that failed part-way marked
//! `failed` with the pages it had handed to the transport before the failure
//! ([`Transport::sent_before_failure`]; not known to have arrived), counted in the totals.
//!
//! **Resume after a broken connection.** [`TransferTransport`] over a sender made with
//! `precopy_transfer::Sender::dial` reconnects only when a round failed because the connection
//! broke (end of stream, reset, broken pipe) or went silent past the I/O timeout (a path that
//! drops everything without a reset shows only as that), never after a refusal or an
//! interrupt; the receiver, run with `Receiver::run_resumable`, kept what it
//! applied, proves the key again with the sender and answers with a digest per block of 64
//! pages of what it holds, so only the blocks that differ go again with the failed round's
//! ranges. Attempts and backoff are bounded ([`ReconnectConfig`]); when every attempt fails the
//! migration ends with [`Error::Reconnect`], the workload still running. Successful reconnects
//! are counted in the report (`reconnects`). The final page-hash check proves the result as
//! always.

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

mod cancel;
mod control;
mod driver;
mod error;
mod process;
mod report;
mod switchover;
mod target;
mod transfer;
mod uffd;

pub use cancel::CancelHandle;
pub use control::{
    Callbacks, CollectStats, DirtyLog, ExternalDirty, Interrupt, MarkError, Pacing, RoundSent,
    Transport, USER_ADDRESS_LIMIT, Workload, WorkloadCounters,
};
pub use driver::{
    AfterMigration, FinalPriority, LimitPolicy, Migration, MigrationConfig, MigrationError,
    PAUSE_CHECK_SENDS, Phase, Progress, QUIET_ROUNDS, QUIET_TIME, ReconnectConfig, ThrottleConfig,
};
pub use error::{AbortReason, Error, Step};
pub use process::{
    PauseMethod, ProcessControl, ProcessError, RESTOP_FIRST, RaiseJournal, ThrottleMethod,
    UnstoppedThread, all_stopped,
};
pub use report::{
    DowntimeEstimate, FailedFinal, FinalPhase, MigrationReport, PauseCheck, PriorityReport,
    RoundKind, RoundReport, Status, SwitchReason, VerifyPass, WorkloadCost,
};
pub use target::{GROWTH_HEADROOM, MapChanges, TargetError, TargetLog, TargetMemory};
pub use transfer::TransferTransport;
pub use uffd::{TrackingError, UffdDirtyLog, adopt_process_uffd};
