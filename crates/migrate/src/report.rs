//! The migration report, in the spirit of QEMU's `query-migrate`: totals, downtime, the
//! per-round table, throttle. Serializes to JSON and prints as a human table.
//!
//! Units in the JSON: durations in milliseconds (fields ending in `_ms`), sizes in bytes,
//! page counts in [`MigrationReport::page_size`] pages. Fields whose names carry no unit
//! keep their names (scripts parse them); each field's doc gives its unit: `bandwidth`,
//! `throughput`, `dirty_rate` and the estimate's rates are bytes per second, the workload's
//! `*_rate` operations per second, `throttle` a fraction of the workload's time (0 to 0.99),
//! `resend_ratio` and `margin` plain ratios.

use serde::{Serialize, Serializer};
use std::fmt;
use std::time::Duration;

fn ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn ms_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1e3)),
        None => s.serialize_none(),
    }
}

fn ms_vec<S: Serializer>(d: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(d.iter().map(|d| d.as_secs_f64() * 1e3))
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Not started.
    Setup,
    /// Iterating.
    Active,
    /// In the final round, workload paused.
    Completing,
    /// The receiver acknowledged the final checksum.
    Completed,
    /// Stopped by a limit under the abort policy.
    Aborted,
    /// A step failed or ran out of time.
    Failed,
    /// Cancelled through a [`CancelHandle`](crate::CancelHandle).
    Cancelled,
}

/// Which rule ended the iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchReason {
    /// Expected downtime fell within the limit.
    Converged,
    /// The round limit, under the switch-over policy.
    MaxRounds,
    /// The timeout, under the switch-over policy.
    Timeout,
    /// The limit is out of reach and more rounds cannot help: nothing was written for the
    /// last [`QUIET_ROUNDS`](crate::QUIET_ROUNDS) rounds, whose scans covered at least
    /// [`QUIET_TIME`](crate::QUIET_TIME) (no pages pending, none expected until the pause), and the final phase's fixed costs alone (pause, scans, finish, re-reads:
    /// [`DowntimeEstimate::fixed_bound`]) exceed the limit. The limit is not met; the report's
    /// `downtime_note` names the parts and the largest.
    OutOfReach,
}

/// What a round was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoundKind {
    /// Round 0: all memory.
    Full,
    /// A round with the workload running.
    Iterative,
    /// A round sent inside a pause probe, with the workload paused and the threads at the
    /// final phase's priority: a sample of the next round's pages, spread over them, timed
    /// to expect the final round's send (see the crate docs, "Switch-over rule").
    Rehearsal,
    /// The round with the workload paused.
    Final,
}

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// Round number, from 0.
    pub round: u64,
    /// Full, iterative or final.
    pub kind: RoundKind,
    /// Bytes the round was asked to send (all memory for round 0, else what the scans found).
    pub dirty_bytes: u64,
    /// Time the scan before this round took (zero for round 0).
    #[serde(serialize_with = "ms", rename = "scan_ms")]
    pub scan: Duration,
    /// CPU time the scanning thread spent in that scan (`CLOCK_THREAD_CPUTIME_ID`): the work
    /// itself, without the waits for a CPU that `scan` includes. `None` for round 0 and
    /// where the clock cannot be read.
    #[serde(serialize_with = "ms_opt", rename = "scan_cpu_ms")]
    pub scan_cpu: Option<Duration>,
    /// The pause probe's scan right after that scan, with the workload paused (a rehearsal of
    /// the final scan; see the crate docs, "Switch-over rule"), if one ran: wall time. Its
    /// pages are in this round; the workload was paused for it (and for the pause and resume
    /// around it).
    #[serde(serialize_with = "ms_opt", rename = "probe_scan_ms")]
    pub probe_scan: Option<Duration>,
    /// That scan's CPU time.
    #[serde(serialize_with = "ms_opt", rename = "probe_scan_cpu_ms")]
    pub probe_scan_cpu: Option<Duration>,
    /// The pause probe's rehearsal of one pause check scan ([`PauseCheck`]), taken after its
    /// send with the workload still paused, if one ran: wall time. Its pages (none unless the
    /// workload ran) are in this round.
    #[serde(serialize_with = "ms_opt", rename = "probe_check_ms")]
    pub probe_check: Option<Duration>,
    /// That pause probe's pause (from the `SIGSTOP` or the embedder's pause until the workload
    /// is stopped, its threads raised before), if one ran: a sample of the expected pause.
    #[serde(serialize_with = "ms_opt", rename = "probe_pause_ms")]
    pub probe_pause: Option<Duration>,
    /// That pause probe's finish probes (digests and the acknowledgement round trip, the
    /// workload paused; two per pause probe), if it ran: samples of the expected finish.
    #[serde(serialize_with = "ms_vec", rename = "probe_finish_ms")]
    pub probe_finish: Vec<Duration>,
    /// Whether the round failed part-way (a broken connection, a refusal, a timeout): then
    /// `pages` and `zero_pages` are what was handed to the transport before the failure
    /// (not known to have arrived;
    /// [`Transport::sent_before_failure`](crate::Transport::sent_before_failure)),
    /// `bytes` what the transport knew it wrote (0 when it could not tell) and `duration`
    /// the time until the failure. Its ranges went into a later round or
    /// [`Migration::unsent`](crate::Migration::unsent).
    pub failed: bool,
    /// Cut short by the total timeout under the switch-over policy
    /// ([`MigrationConfig::timeout`](crate::MigrationConfig::timeout)): the round ended with
    /// what it had sent (`pages`, `zero_pages`, `bytes` count that), and the pages it had not
    /// sent went in the next round (the final round, which started at once). Not learned
    /// from for the estimate.
    pub interrupted: bool,
    /// Pages sent with contents.
    pub pages: u64,
    /// Pages sent as zeros.
    pub zero_pages: u64,
    /// Bytes the transport wrote.
    pub bytes: u64,
    /// Send time.
    #[serde(serialize_with = "ms", rename = "duration_ms")]
    pub duration: Duration,
    /// Bytes per second the transport wrote during the round (the wire's rate).
    pub bandwidth: f64,
    /// Memory bytes delivered per second during the round (see the crate docs).
    pub throughput: f64,
    /// Bytes written per second by the workload, as of the scan before this round (0 for
    /// round 0): the bytes the latest scans found ÷ the time they cover, over at least the
    /// last 100 ms of scans (all scans under the current throttle while they cover less). It
    /// reads 0 only when no scan in that window found a page; a single scan right after a
    /// small round covers well under a millisecond and may find nothing while the workload
    /// writes on. For the final round, the last rate measured with the workload running.
    pub dirty_rate: f64,
    /// Expected downtime computed before this round.
    #[serde(serialize_with = "ms_opt", rename = "expected_downtime_ms")]
    pub expected_downtime: Option<Duration>,
    /// Throttle in force while this round was sent: the fraction of the workload's time it
    /// was held back, 0 (none) to 0.99.
    pub throttle: f64,
    /// Pages the dirty log reported written in the scan before this round
    /// ([`CollectStats::pages`](crate::CollectStats)): 0 for round 0; for the final round, the
    /// last scan with the workload running plus the final scan (the final round sends both).
    /// Counted in [`MigrationReport::page_size`] units (the base page, 4 KiB on x86-64),
    /// whatever the memory's own page size: a written 2 MiB hugetlb page counts 512.
    /// A count of pages found written, not of faults: with the engine's log (async
    /// write-protect) each such base page cost the workload one write-protect fault resolved
    /// in the kernel (the first write to a re-protected page faults once, about 1.3 µs here;
    /// later writes to it are free; a hugetlb page faults once for all its 512), except pages
    /// that read as written without a store (anonymous `MADV_DONTNEED`) and ranges an
    /// embedder marked ([`crate::ExternalDirty`]).
    pub dirty_pages: u64,
    /// The workload's operations per second over the same interval as `dirty_rate`, if it
    /// counts them ([`crate::Workload::counters`]). `None` for round 0 and for the final
    /// round, which runs with the workload paused (the table shows "paused").
    pub workload_rate: Option<f64>,
    /// The workload's mean time per operation over that interval, in nanoseconds.
    pub workload_ns_per_op: Option<f64>,
    /// How long the workload was paused for the collection whose pages this round sent, for a
    /// dirty log whose read and reset are two steps ([`crate::DirtyLog::needs_pause`]:
    /// soft-dirty); `None` when it was not paused for it.
    #[serde(serialize_with = "ms_opt", rename = "collect_pause_ms")]
    pub collect_pause: Option<Duration>,
}

impl RoundReport {
    /// Whether the round sent every page it was asked to (`dirty_bytes`), counted in
    /// `page_size` pages: a round the timeout cut after its last page left nothing over.
    pub fn sent_all(&self, page_size: u64) -> bool {
        (self.pages.saturating_add(self.zero_pages)).saturating_mul(page_size) >= self.dirty_bytes
    }
}

/// What the source suffered: the workload's own throughput before and while it was tracked
/// (from [`crate::Workload::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct WorkloadCost {
    /// Operations per second before tracking started (over
    /// [`crate::Migration::measure_workload_before`]), if measured.
    pub before_rate: Option<f64>,
    /// Mean nanoseconds per operation before tracking started.
    pub before_ns_per_op: Option<f64>,
    /// Operations per second from the start of tracking to the pause (or to the failure).
    pub during_rate: f64,
    /// Mean nanoseconds per operation over the same time.
    pub during_ns_per_op: Option<f64>,
    /// Pages the dirty log reported written over all scans, the final one included (see
    /// [`RoundReport::dirty_pages`]).
    pub dirty_pages: u64,
}

/// The switch-over check of memory the dirty log cannot vouch for (shared memory, hugetlb,
/// file mappings, ranges written by devices): re-read with the workload paused and compared,
/// page by page, with the hash of the copy last sent.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct VerifyPass {
    /// Bytes of memory the dirty log cannot vouch for.
    pub checked_bytes: u64,
    /// Of those, bytes re-read: the rest was in the final round's dirty set, read and sent
    /// anyway.
    pub reread_bytes: u64,
    /// Bytes found different from what was sent, which the dirty log had not reported:
    /// changes only this pass caught (sent in the final round).
    pub changed_bytes: u64,
    /// Time it took, part of the downtime.
    #[serde(serialize_with = "ms", rename = "duration_ms")]
    pub duration: Duration,
}

/// The check that the workload stayed paused through the final round (see the crate docs,
/// "The pause check"): the dirty log scanned again after the final round's pages were sent,
/// before the state, and once more after the acknowledgement, right before the commit. With a
/// workload that stayed paused both scans find nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PauseCheck {
    /// Scans run (2 when nothing was found; more when pages found before the state were sent
    /// and the scan repeated).
    pub scans: u32,
    /// Pages the scans found written after the final scan: the workload ran while it should
    /// have been paused (a process resumed from outside, e.g. by `SIGCONT`).
    pub pages: u64,
    /// Of those, pages sent in the final round (each send is one more round on the wire,
    /// counted in the final round's report); the rest failed the migration.
    pub sent_pages: u64,
    /// Time the check took, scans, re-pauses and sends included: part of the downtime.
    #[serde(serialize_with = "ms", rename = "duration_ms")]
    pub duration: Duration,
}

/// The final round's timeline: downtime = pause + scan + verify + send + check + state +
/// finish.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FinalPhase {
    /// Time for the workload to stop.
    #[serde(serialize_with = "ms", rename = "pause_ms")]
    pub pause: Duration,
    /// The last scan.
    #[serde(serialize_with = "ms", rename = "scan_ms")]
    pub scan: Duration,
    /// CPU time the scanning thread spent in it (see [`RoundReport::scan_cpu`]).
    #[serde(serialize_with = "ms_opt", rename = "scan_cpu_ms")]
    pub scan_cpu: Option<Duration>,
    /// Re-checking the memory the dirty log cannot vouch for ([`VerifyPass`]; zero if none).
    #[serde(serialize_with = "ms", rename = "verify_ms")]
    pub verify: Duration,
    /// Sending the last round.
    #[serde(serialize_with = "ms", rename = "send_ms")]
    pub send: Duration,
    /// The pause check's scans (and what they found and sent): [`PauseCheck::duration`].
    #[serde(serialize_with = "ms", rename = "check_ms")]
    pub check: Duration,
    /// Saving and sending the workload's state blob.
    #[serde(serialize_with = "ms", rename = "state_ms")]
    pub state: Duration,
    /// Computing the source checksum.
    #[serde(serialize_with = "ms", rename = "checksum_ms")]
    pub checksum: Duration,
    /// From the end of the send to the receiver's acknowledgement, checksum included.
    #[serde(serialize_with = "ms", rename = "finish_ms")]
    pub finish: Duration,
}

/// The scheduling priority of the final phase's threads (see
/// [`FinalPriority`](crate::FinalPriority)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriorityReport {
    /// The policy asked for: `normal` (left as it was) or `fifo` (`SCHED_FIFO`).
    pub policy: &'static str,
    /// The real-time priority asked for (0 for `normal`).
    pub priority: u8,
    /// Threads raised from the pause to the acknowledgement (the driver's, the transport's
    /// writers and watchers, and any the embedder added): 0 when none was.
    pub threads: u32,
    /// Why they were not raised: `normal` was asked for, or, asked to be, the kernel's answer
    /// (`EPERM` without `CAP_SYS_NICE`). Not an error: the final phase then ran at the threads'
    /// own priority.
    pub not_raised: Option<String>,
    /// Why putting a thread back to its own policy failed, if it did.
    pub restore_error: Option<String>,
}

impl PriorityReport {
    /// The priority in words, as the text reports print it after `final priority: `: raised
    /// (to what, for how many threads), or not raised and why (`normal` asked for, or the
    /// kernel's refusal).
    pub fn describe(&self) -> Option<String> {
        match self {
            PriorityReport {
                not_raised: Some(why),
                ..
            } => Some(format!("not raised: {why}")),
            p if p.threads > 0 => Some(format!(
                "SCHED_FIFO {} for {} thread(s) from the pause to the acknowledgement{}",
                p.priority,
                p.threads,
                match &p.restore_error {
                    Some(e) => format!(" (restoring one FAILED: {e})"),
                    None => String::new(),
                }
            )),
            _ => None,
        }
    }

    /// A pause's raise in words ([`MigrationReport::pause_priority`]), as the text reports
    /// print it after `pause priority: `.
    pub fn describe_pause(&self) -> String {
        match self {
            PriorityReport {
                not_raised: Some(why),
                ..
            } => format!("not raised: {why}"),
            p if p.threads > 0 => format!(
                "the process's {} thread(s) at SCHED_{} {} from the SIGSTOP until each had stopped{}",
                p.threads,
                p.policy.to_uppercase(),
                p.priority,
                match &p.restore_error {
                    Some(e) => format!(" (restoring one FAILED: {e})"),
                    None => String::new(),
                }
            ),
            _ => "none raised (every thread was stopped already, or not time-sharing)".into(),
        }
    }
}

/// The final phase as the driver estimated it when it decided to switch over (see the
/// crate docs, "Switch-over rule"). Compare with [`FinalPhase`].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct DowntimeEstimate {
    /// Bytes the last scan left to send.
    pub pending_bytes: u64,
    /// Bytes the workload is expected to write from the last scan until it is stopped (its
    /// dirty rate times the expected scan and pause), sent in the final round too.
    pub meanwhile_bytes: u64,
    /// The dirty rate behind `meanwhile_bytes`, bytes per second: the last scan's, or while a
    /// throttle is on at least the last one's before the throttle (pausing lifts it, and a
    /// scan while the throttle had the writers stopped finds little or nothing).
    pub meanwhile_rate: f64,
    /// Bytes the verify pass would re-read: memory the dirty log cannot vouch for
    /// ([`crate::DirtyLog::unvouched`]) that the final round would not send anyway.
    pub verify_bytes: u64,
    /// Of those, bytes expected to differ from what was sent (the share the re-read samples
    /// found changed), added to the final send.
    pub verify_changed_bytes: u64,
    /// The verify pass: `verify_bytes` at the re-read samples' time per byte (the upper
    /// median); zero without such memory.
    #[serde(serialize_with = "ms", rename = "verify_ms")]
    pub verify: Duration,
    /// At the slowest sample's time per byte, which the decision counts instead of `verify`.
    #[serde(serialize_with = "ms", rename = "verify_worst_ms")]
    pub verify_worst: Duration,
    /// Bytes the final check re-reads on each end (all memory with a full check, else 0;
    /// [`Transport::finish_reread_bytes`](crate::Transport::finish_reread_bytes)).
    pub full_check_bytes: u64,
    /// The full check's passes (source, then destination) at the samples' time per byte;
    /// part of the measured [`FinalPhase::finish`].
    #[serde(serialize_with = "ms", rename = "full_check_ms")]
    pub full_check: Duration,
    /// At the slowest sample's time per byte, which the decision counts instead.
    #[serde(serialize_with = "ms", rename = "full_check_worst_ms")]
    pub full_check_worst: Duration,
    /// Pausing the workload: the median of the probes (after round 0 and the next rounds;
    /// zero without them).
    #[serde(serialize_with = "ms", rename = "pause_ms")]
    pub pause: Duration,
    /// The slowest pause probe, which the switch-over decision counts instead of `pause`.
    #[serde(serialize_with = "ms", rename = "pause_worst_ms")]
    pub pause_worst: Duration,
    /// The final scan, which runs with the workload stopped: the upper median of the pause
    /// probes' scans (each run with the workload paused right after a scan with it running,
    /// as the final scan is); without probes, the fastest of the last three scans.
    #[serde(serialize_with = "ms", rename = "scan_ms")]
    pub scan: Duration,
    /// The slowest of the last three scans beside the running workload and of the probes'
    /// scans, which the switch-over decision counts instead of `scan`.
    #[serde(serialize_with = "ms", rename = "scan_worst_ms")]
    pub scan_worst: Duration,
    /// Sending the pending bytes: at the rehearsal rounds' time per byte (lower median) when
    /// there were rehearsals (`send_from` = `rehearsals`), else at the throughput of the last
    /// iterative round (`rounds`).
    #[serde(serialize_with = "ms", rename = "send_ms")]
    pub send: Duration,
    /// The bound on sending them, which the decision counts instead of `send`: at the slowest
    /// rehearsal's time per byte; without rehearsals `fixed + pending / bandwidth`, never
    /// faster than the slowest recent round.
    #[serde(serialize_with = "ms", rename = "send_worst_ms")]
    pub send_worst: Duration,
    /// Where `send` and `send_worst` came from: `rehearsals` (rounds sent inside the pause
    /// probes, workload paused, threads at the final phase's priority) or `rounds` (the
    /// iterative rounds, workload running).
    pub send_from: &'static str,
    /// The rehearsals' throughput behind `send` (memory bytes per second; 0 without them).
    pub rehearsed_throughput: f64,
    /// The slowest rehearsal's throughput behind `send_worst` (memory bytes per second; 0
    /// without rehearsals): with rehearsals, the bound's send comes from it, not from
    /// `bandwidth` and `fixed`, which are the iterative rounds' (round 0's before there are
    /// two).
    pub rehearsed_worst_throughput: f64,
    /// The transport's pacing rate (`--bandwidth`), bytes per second on the wire, below which
    /// `send` and `send_worst` were not allowed to go (what its token bucket held was counted
    /// as sent at once); 0: not paced.
    pub paced_rate: f64,
    /// The pause check's two scans of memory the workload should not have written
    /// ([`PauseCheck`]): each at the lower median of the scans the pause probes took after
    /// their send to rehearse it (`rounds[].probe_check_ms`), else at the final scan's
    /// expected cost (`scan`); its bound counts `scan_worst` for each.
    #[serde(serialize_with = "ms", rename = "check_ms")]
    pub check: Duration,
    /// Memory digests and the acknowledgement round trip: the upper median of the probes
    /// ([`Transport::probe_finish`](crate::Transport::probe_finish)) the pause probes took
    /// with the workload paused, else of the transport's recent probes between rounds; zero
    /// for a transport that cannot probe.
    #[serde(serialize_with = "ms", rename = "finish_ms")]
    pub finish: Duration,
    /// The slowest of all finish probes (paused, and the last five between rounds), which the
    /// switch-over decision counts instead of `finish` ([`DowntimeEstimate::bound`]).
    #[serde(serialize_with = "ms", rename = "finish_worst_ms")]
    pub finish_worst: Duration,
    /// Per-round fixed cost of the fitted line through the recent iterative rounds.
    #[serde(serialize_with = "ms", rename = "fixed_ms")]
    pub fixed: Duration,
    /// Memory bytes per second of the fitted line (or of the slowest recent round; round 0's
    /// before any iterative round was big enough). Behind `send_worst` only with `send_from`
    /// = `rounds`.
    pub bandwidth: f64,
    /// Safety factor the decision applied: the largest recent ratio of a round's actual to
    /// estimated send time, at least 1.
    pub margin: f64,
}

/// Everything a migration measured.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// Outcome.
    pub status: Status,
    /// Why iteration ended, once it has.
    pub switch_reason: Option<SwitchReason>,
    /// The error, when failed or aborted (with its causes).
    pub error: Option<String>,
    /// Bytes of memory migrated.
    pub memory_bytes: u64,
    /// Bytes per page: the unit of every page count in the report (`pages`, `zero_pages`,
    /// each round's `pages`, `zero_pages` and `dirty_pages`), the dirty log's base page (4 KiB
    /// on x86-64), also for memory backed by larger pages (a 2 MiB hugetlb page is 512).
    pub page_size: u64,
    /// Starting the dirty log (arming).
    #[serde(serialize_with = "ms", rename = "setup_ms")]
    pub setup: Duration,
    /// From start to the end (acknowledgement, or failure).
    #[serde(serialize_with = "ms", rename = "total_time_ms")]
    pub total_time: Duration,
    /// From pause to acknowledgement; for a migration that failed after the pause, from pause
    /// to the workload's resumption (the downtime actually suffered). The last switch-over
    /// attempt's: after a failed attempt see [`MigrationReport::switchover_pauses`].
    #[serde(serialize_with = "ms_opt", rename = "downtime_ms")]
    pub downtime: Option<Duration>,
    /// The pause of every switch-over attempt, in order (milliseconds in the JSON): a failed
    /// attempt's from its pause to the workload's resumption, the last one's as `downtime`.
    /// The pause probes' short pauses are not in it.
    #[serde(serialize_with = "ms_vec", rename = "switchover_pauses_ms")]
    pub switchover_pauses: Vec<Duration>,
    /// The workload's time paused for switch-overs, all attempts: the sum of
    /// `switchover_pauses` (equal to `downtime` after a single attempt).
    #[serde(serialize_with = "ms", rename = "paused_total_ms")]
    pub paused_total: Duration,
    /// The expected downtime when the driver decided to switch over.
    #[serde(serialize_with = "ms_opt", rename = "expected_downtime_ms")]
    pub expected_downtime: Option<Duration>,
    /// What the decision counted at the switch-over: each part's bound, times the margin
    /// ([`DowntimeEstimate::bound`]). A converged migration switched over because this fitted
    /// the limit.
    #[serde(serialize_with = "ms_opt", rename = "downtime_bound_ms")]
    pub downtime_bound: Option<Duration>,
    /// Its parts, as estimated at the switch-over.
    pub downtime_estimate: Option<DowntimeEstimate>,
    /// Why the limit could not be met (or was exceeded), when that happened.
    pub downtime_note: Option<String>,
    /// The limit.
    #[serde(serialize_with = "ms", rename = "max_downtime_ms")]
    pub max_downtime: Duration,
    /// Final round timeline.
    pub final_phase: Option<FinalPhase>,
    /// The scheduling priority the final phase's threads ran at (the last final phase's),
    /// and why they were not raised when they were not.
    pub final_priority: Option<PriorityReport>,
    /// How the final round's pause raised the workload's threads so that they stop at once
    /// ([`Workload::pause_priority`](crate::Workload::pause_priority): another process's
    /// threads, [`ProcessControl`](crate::ProcessControl)), or why it did not; `None` when the
    /// workload does not raise or there was no final round.
    pub pause_priority: Option<PriorityReport>,
    /// The switch-over check of memory the dirty log cannot vouch for, if there was any.
    pub verify: Option<VerifyPass>,
    /// The check that the workload stayed paused through the final round, once it ran.
    pub pause_check: Option<PauseCheck>,
    /// Every round.
    pub rounds: Vec<RoundReport>,
    /// Bytes the transport wrote, all rounds.
    pub transferred_bytes: u64,
    /// Pages sent with contents, all rounds (a page sent twice counts twice).
    pub pages: u64,
    /// Pages sent as zeros, all rounds.
    pub zero_pages: u64,
    /// (pages + zero pages) × page size ÷ memory size: 1.0 means every page went exactly once.
    pub resend_ratio: f64,
    /// Bytes per second on the wire: transport bytes ÷ total send time.
    pub bandwidth: f64,
    /// Bytes per second the workload wrote, as of the last scan with it running (measured
    /// over at least the last 100 ms of scans: see [`RoundReport::dirty_rate`]).
    pub dirty_rate: f64,
    /// Highest throttle applied: the fraction of the workload's time held back, 0 (none) to
    /// 0.99.
    pub throttle: f64,
    /// Whether the configuration let the driver throttle at all
    /// ([`ThrottleConfig::enabled`](crate::ThrottleConfig)); when not, `throttle` stays 0.
    pub throttle_allowed: bool,
    /// What the workload suffered, if it counts its work.
    pub workload: Option<WorkloadCost>,
    /// How the throttle was applied.
    pub throttle_method: &'static str,
    /// The memory checksum the receiver acknowledged.
    pub checksum: Option<u64>,
    /// Bytes of the workload's state blob sent after the last round.
    pub state_bytes: Option<u64>,
    /// The hard bound on the final round that was in force (see
    /// [`MigrationConfig::final_round_timeout`](crate::MigrationConfig)).
    #[serde(serialize_with = "ms_opt", rename = "final_round_bound_ms")]
    pub final_round_bound: Option<Duration>,
    /// Times the transport reconnected after a failed round.
    pub reconnects: u32,
    /// Switch-overs tried: 1 for a migration whose first final phase completed; each final
    /// phase whose connection broke before the commit (the workload resumed, the transport
    /// reconnected, the rounds went on) adds one
    /// ([`MigrationConfig::switchover_attempts`](crate::MigrationConfig)).
    pub switchover_attempts: u32,
    /// What the final rounds of failed switch-over attempts handed to the transport (not
    /// known to have arrived; sent again by later rounds as needed): counted in `pages`,
    /// `zero_pages` and `transferred_bytes` too, and each such round is in `rounds` with
    /// `failed` set.
    pub failed_final: FailedFinal,
}

/// What the final rounds of failed switch-over attempts sent ([`MigrationReport::failed_final`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FailedFinal {
    /// Final rounds that failed.
    pub rounds: u32,
    /// Pages sent with contents.
    pub pages: u64,
    /// Pages sent as zeros.
    pub zero_pages: u64,
    /// Bytes the transport wrote for them, where it could tell: a round cut by a broken
    /// connection never ends in the sink, which alone counts what it wrote, so its bytes are
    /// not known and count 0 here and in `transferred_bytes` (its pages are counted).
    pub bytes: u64,
}

impl MigrationReport {
    pub(crate) fn new(max_downtime: Duration) -> MigrationReport {
        MigrationReport {
            status: Status::Setup,
            switch_reason: None,
            error: None,
            memory_bytes: 0,
            page_size: 0,
            setup: Duration::ZERO,
            total_time: Duration::ZERO,
            downtime: None,
            expected_downtime: None,
            downtime_bound: None,
            downtime_estimate: None,
            downtime_note: None,
            max_downtime,
            final_phase: None,
            final_priority: None,
            pause_priority: None,
            verify: None,
            pause_check: None,
            rounds: Vec::new(),
            transferred_bytes: 0,
            pages: 0,
            zero_pages: 0,
            resend_ratio: 0.0,
            bandwidth: 0.0,
            dirty_rate: 0.0,
            throttle: 0.0,
            throttle_allowed: true,
            workload: None,
            throttle_method: "none",
            checksum: None,
            state_bytes: None,
            final_round_bound: None,
            reconnects: 0,
            switchover_attempts: 0,
            switchover_pauses: Vec::new(),
            paused_total: Duration::ZERO,
            failed_final: FailedFinal::default(),
        }
    }

    /// Records the pause of the current switch-over attempt, `paused` long (a later record for
    /// the same attempt, a failure after its commit, replaces it): `downtime`,
    /// `switchover_pauses` and `paused_total`.
    pub(crate) fn record_pause(&mut self, paused: Duration) {
        self.downtime = Some(paused);
        let attempt = self.switchover_attempts.max(1) as usize - 1;
        match self.switchover_pauses.get_mut(attempt) {
            Some(p) => *p = paused,
            None => self.switchover_pauses.push(paused),
        }
        self.paused_total = self.switchover_pauses.iter().sum();
    }

    pub(crate) fn add_round(&mut self, r: RoundReport) {
        self.transferred_bytes += r.bytes;
        self.pages += r.pages;
        self.zero_pages += r.zero_pages;
        if self.memory_bytes > 0 {
            self.resend_ratio =
                ((self.pages + self.zero_pages) * self.page_size) as f64 / self.memory_bytes as f64;
        }
        let send: f64 = self
            .rounds
            .iter()
            .map(|r| r.duration.as_secs_f64())
            .sum::<f64>()
            + r.duration.as_secs_f64();
        if send > 0.0 {
            self.bandwidth = self.transferred_bytes as f64 / send;
        }
        self.rounds.push(r);
    }
}

/// A page size for the text report: `4 KiB`, `2 MiB`, or bytes.
fn page_unit(page_size: u64) -> String {
    match page_size {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// Bytes with a binary unit, e.g. `1.50 GiB`.
pub(crate) fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

/// The total time and the setup within it, in one unit (seconds from a second up, else
/// milliseconds), so that rounding never shows the setup longer than the whole (it read
/// "total time 0.02 s (setup 24.6 ms)").
fn total_and_setup(total: Duration, setup: Duration) -> (String, String) {
    if total >= Duration::from_secs(1) {
        let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        (s(total), s(setup))
    } else {
        (msf(total), msf(setup))
    }
}

fn msf(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

impl Status {
    /// The status in words, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Status::Setup => "not started",
            Status::Active => "in progress",
            Status::Completing => "completing (workload paused)",
            Status::Completed => {
                "completed: the receiver acknowledged the final checksum in time and was told to commit"
            }
            Status::Aborted => "ABORTED by a limit; the workload was resumed",
            Status::Failed => "FAILED; the workload was resumed",
            Status::Cancelled => "CANCELLED; the workload was resumed",
        }
    }
}

impl MigrationReport {
    /// Memory bytes delivered per second over all rounds (pages and zero pages, whatever
    /// the wire carried for them).
    pub fn memory_rate(&self) -> f64 {
        let send: f64 = self.rounds.iter().map(|r| r.duration.as_secs_f64()).sum();
        let bytes = (self.pages + self.zero_pages) * self.page_size;
        if send > 0.0 { bytes as f64 / send } else { 0.0 }
    }

    /// The switch-over attempts in words, when there was more than one or a final round
    /// failed: each attempt's pause and their total (the time the workload was paused for
    /// switch-overs), and what the failed final rounds sent; `None` after a single attempt
    /// whose final round did not fail.
    pub fn switchover_summary(&self) -> Option<String> {
        let failed = self.failed_final;
        if self.switchover_attempts <= 1 && failed.rounds == 0 {
            return None;
        }
        let pauses: Vec<String> = self.switchover_pauses.iter().map(|p| msf(*p)).collect();
        let mut s = format!(
            "{} attempt(s); the workload was paused {}{} in all",
            self.switchover_attempts,
            if pauses.len() > 1 {
                format!("{} = ", pauses.join(" + "))
            } else {
                String::new()
            },
            msf(self.paused_total)
        );
        if failed.rounds > 0 {
            // A round cut by a broken connection never ended in the sink, which alone counts
            // the bytes it wrote: those are not known (and not in `transferred_bytes`).
            let wire = if failed.bytes == 0 && failed.pages > 0 {
                "wire bytes not known: the connection broke before the round ended".to_owned()
            } else {
                format!("{} on the wire", bytes(failed.bytes as f64))
            };
            s.push_str(&format!(
                "; {} failed final round(s) sent {} pages + {} zero pages ({wire}), counted in \"sent\" but not known to have arrived",
                failed.rounds, failed.pages, failed.zero_pages,
            ));
        }
        Some(s)
    }

    /// Rounds sent with the workload running and not failed (round 0 included): what
    /// [`MigrationConfig::max_rounds`](crate::MigrationConfig::max_rounds) counts.
    pub fn live_rounds(&self) -> usize {
        let live = |r: &&RoundReport| {
            !r.failed && matches!(r.kind, RoundKind::Full | RoundKind::Iterative)
        };
        self.rounds.iter().filter(live).count()
    }

    /// The rounds by kind, in words: those the round limit counts first, then the final
    /// round, the rehearsals (sent inside the pause probes with the workload paused, which
    /// the limit does not count: with `max_rounds` 30, a report of 34 rounds held 30 live
    /// ones, 3 rehearsals and the final one, and said only "34"), the failed ones and the
    /// interrupted ones. E.g. `34 round(s): 30 with the workload running (what the round
    /// limit counts), 1 final, 3 rehearsal(s) inside the pause probes (rounds 2, 4, 6; not
    /// counted by the limit)`.
    pub fn rounds_in_words(&self) -> String {
        let of = |kind: RoundKind| {
            let ok = |r: &&RoundReport| !r.failed && r.kind == kind;
            self.rounds.iter().filter(ok).count()
        };
        let mut s = format!(
            "{} round(s): {} with the workload running (what the round limit counts)",
            self.rounds.len(),
            self.live_rounds()
        );
        let finals = of(RoundKind::Final);
        if finals > 0 {
            s.push_str(&format!(", {finals} final"));
        }
        // The rounds `pick` takes: how many, and "round N" or "rounds N, M".
        let numbered = |pick: &dyn Fn(&RoundReport) -> bool| {
            let n: Vec<String> = (self.rounds.iter().filter(|r| pick(r)))
                .map(|r| r.round.to_string())
                .collect();
            let plural = if n.len() > 1 { "s" } else { "" };
            (!n.is_empty()).then(|| (n.len(), format!("round{plural} {}", n.join(", "))))
        };
        if let Some((n, which)) = numbered(&|r| !r.failed && r.kind == RoundKind::Rehearsal) {
            s.push_str(&format!(
                ", {n} rehearsal(s) inside the pause probes ({which}; not counted by the limit)"
            ));
        }
        let failed = self.rounds.iter().filter(|r| r.failed).count();
        if failed > 0 {
            s.push_str(&format!(", {failed} failed part-way"));
        }
        let all = |r: &RoundReport| r.sent_all(self.page_size);
        if let Some((n, which)) = numbered(&|r| r.interrupted && !all(r)) {
            s.push_str(&format!(
                ", {n} cut short by the timeout ({which}: what it had not sent went in the next round)"
            ));
        }
        if let Some((n, which)) = numbered(&|r| r.interrupted && all(r)) {
            s.push_str(&format!(
                ", {n} cut by the timeout after sending all its pages ({which})"
            ));
        }
        s
    }

    /// Whether the measured downtime exceeded the limit.
    pub fn downtime_exceeded(&self) -> bool {
        self.downtime.is_some_and(|d| d > self.max_downtime)
    }

    /// Whether the measured downtime was above the estimate's bound ("at most",
    /// [`MigrationReport::downtime_bound`]) for the switch-over that completed: the bound
    /// did not hold (on a loaded machine, a final phase that waited for a CPU).
    pub fn downtime_above_bound(&self) -> bool {
        matches!((self.downtime, self.downtime_bound), (Some(d), Some(b)) if d > b)
    }
}

impl fmt::Display for MigrationReport {
    /// The report for people: plain words, rates of memory and of the wire apart, and any
    /// limit that was exceeded or that forced the switch-over said outright.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |d: Option<Duration>| d.map_or_else(|| "-".to_string(), msf);
        writeln!(f, "result:        {}", self.status.describe())?;
        if let Some(e) = &self.error {
            writeln!(f, "error:         {e}")?;
        }
        let expected = opt(self.expected_downtime);
        let decided = match (self.expected_downtime, self.downtime_bound) {
            (Some(e), Some(b)) => format!("{} (at most {})", msf(e), msf(b)),
            (e, _) => opt(e),
        };
        let limit = msf(self.max_downtime);
        match self.switch_reason {
            Some(SwitchReason::Converged) => writeln!(
                f,
                "switch-over:   converged: expected downtime {decided}, within the {limit} limit"
            )?,
            Some(SwitchReason::MaxRounds) => writeln!(
                f,
                "switch-over:   FORCED by the round limit after {} round(s) with the workload running, before converging: expected downtime {decided}, limit {limit}",
                self.live_rounds()
            )?,
            Some(SwitchReason::Timeout) => writeln!(
                f,
                "switch-over:   FORCED by the timeout before converging: expected downtime {decided}, limit {limit}"
            )?,
            Some(SwitchReason::OutOfReach) => writeln!(
                f,
                "switch-over:   the limit is OUT OF REACH (nothing is written, the fixed costs alone exceed it): switched over without converging: expected downtime {decided}, limit {limit}"
            )?,
            None => {}
        }
        let last = if self.switchover_pauses.len() > 1 {
            " (the last switch-over's; all of them: see switch-overs)"
        } else {
            ""
        };
        let above = match self.downtime_bound {
            Some(b) if self.downtime_above_bound() => {
                format!("; ABOVE the estimate's bound, at most {}", msf(b))
            }
            _ => String::new(),
        };
        match self.downtime {
            Some(d) if self.downtime_exceeded() => writeln!(
                f,
                "downtime:      {}{last} EXCEEDED the {limit} limit by {} (expected {expected}{above})",
                msf(d),
                msf(d - self.max_downtime)
            )?,
            Some(d) => writeln!(
                f,
                "downtime:      {}{last}, within the {limit} limit (expected {expected}{above})",
                msf(d)
            )?,
            None => writeln!(f, "downtime:      none (no final round)")?,
        }
        if let Some(e) = self.downtime_estimate {
            // The re-reads while paused, only where there is such memory or such a check.
            let rereads = |verify: Duration, full: Duration| {
                let mut s = String::new();
                if e.verify_bytes > 0 {
                    s.push_str(&format!(
                        " + verify pass {} ({})",
                        msf(verify),
                        bytes(e.verify_bytes as f64)
                    ));
                }
                if e.full_check_bytes > 0 {
                    s.push_str(&format!(" + full check {}", msf(full)));
                }
                s
            };
            writeln!(
                f,
                "               expected: pause {} + scan {}{} + send {} ({} pending + {} written until paused, at {}) + pause check {} + checksum and acknowledgement {}",
                msf(e.pause),
                msf(e.scan),
                rereads(e.verify, e.full_check),
                msf(e.send),
                bytes(e.pending_bytes as f64),
                bytes(e.meanwhile_bytes as f64),
                {
                    let from = if e.send_from == "rehearsals" {
                        format!("the rehearsals' {}/s", bytes(e.rehearsed_throughput))
                    } else {
                        "the last round's throughput".to_string()
                    };
                    if e.paced_rate > 0.0 {
                        format!("{from}, paced at {}/s", bytes(e.paced_rate))
                    } else {
                        from
                    }
                },
                msf(e.check),
                msf(e.finish),
            )?;
            // The send's bound with the figures it was computed from: the slowest
            // rehearsal's, or the iterative rounds' line (round 0's rate stood beside a bound
            // taken from the rehearsals).
            let worst_from = if e.send_from == "rehearsals" {
                format!(
                    "at the slowest rehearsal's {}/s",
                    bytes(e.rehearsed_worst_throughput)
                )
            } else {
                format!(
                    "at the rounds' {}/s + {} per round",
                    bytes(e.bandwidth),
                    msf(e.fixed)
                )
            };
            let paced = if e.paced_rate > 0.0 {
                format!(", paced at {}/s", bytes(e.paced_rate))
            } else {
                String::new()
            };
            writeln!(
                f,
                "               at most:  pause {} + scan {}{} + send {} ({worst_from}{paced}) + pause check {} + checksum and acknowledgement {}, margin x{:.2} = {}",
                msf(e.pause.max(e.pause_worst)),
                msf(e.scan.max(e.scan_worst)),
                rereads(
                    e.verify.max(e.verify_worst),
                    e.full_check.max(e.full_check_worst)
                ),
                msf(e.send.max(e.send_worst)),
                msf(e.check_bound()),
                msf(e.finish.max(e.finish_worst)),
                e.margin,
                msf(e.bound()),
            )?;
        }
        // The last switch-over's parts as measured, under the downtime they add up to (and
        // its expected parts), not under the lines after it.
        if let Some(p) = self.final_phase {
            writeln!(
                f,
                "               measured: pause {} + final scan {} + verify pass {} + final send {} + pause check {} + state {} + checksum and acknowledgement {}",
                msf(p.pause),
                msf(p.scan),
                msf(p.verify),
                msf(p.send),
                msf(p.check),
                msf(p.state),
                msf(p.finish),
            )?;
        }
        if let Some(n) = &self.downtime_note {
            writeln!(f, "               note: {n}")?;
        }
        if let Some(b) = self.final_round_bound {
            writeln!(f, "final-round bound: {}", msf(b))?;
        }
        if self.reconnects > 0 {
            writeln!(f, "reconnects:    {}", self.reconnects)?;
        }
        if let Some(s) = self.switchover_summary() {
            writeln!(f, "switch-overs:  {s}")?;
        }
        if let Some(p) = self
            .final_priority
            .as_ref()
            .and_then(PriorityReport::describe)
        {
            writeln!(f, "final priority: {p}")?;
        }
        if let Some(p) = self
            .pause_priority
            .as_ref()
            .map(PriorityReport::describe_pause)
        {
            writeln!(f, "pause priority: {p}")?;
        }
        if let Some(c) = self.pause_check.filter(|c| c.pages > 0) {
            writeln!(
                f,
                "pause check:   the source RAN during the final round: {} page(s) written after the final scan found by {} check scan(s), {} of them sent",
                c.pages, c.scans, c.sent_pages
            )?;
        }
        if let Some(v) = self.verify {
            writeln!(
                f,
                "verify pass:   {} the dirty log cannot vouch for, {} of it re-read in {}: {} changed unreported by the log",
                bytes(v.checked_bytes as f64),
                bytes(v.reread_bytes as f64),
                msf(v.duration),
                bytes(v.changed_bytes as f64)
            )?;
        }
        let (total, setup) = total_and_setup(self.total_time, self.setup);
        writeln!(
            f,
            "memory:        {} in {}; total time {total} (setup {setup})",
            bytes(self.memory_bytes as f64),
            self.rounds_in_words(),
        )?;
        writeln!(
            f,
            "sent:          {} pages with data + {} zero pages of {} = {:.2}x memory, at {}/s of memory",
            self.pages,
            self.zero_pages,
            page_unit(self.page_size),
            self.resend_ratio,
            bytes(self.memory_rate())
        )?;
        let failed: Vec<&RoundReport> = self.rounds.iter().filter(|r| r.failed).collect();
        if !failed.is_empty() {
            writeln!(
                f,
                "               of which {} pages + {} zero pages in {} round(s) that failed part-way (marked * below): handed to the transport, not known to have arrived",
                failed.iter().map(|r| r.pages).sum::<u64>(),
                failed.iter().map(|r| r.zero_pages).sum::<u64>(),
                failed.len()
            )?;
        }
        let sent_bytes = (self.pages + self.zero_pages) * self.page_size;
        let ratio = if sent_bytes > 0 {
            self.transferred_bytes as f64 / sent_bytes as f64
        } else {
            0.0
        };
        writeln!(
            f,
            "wire:          {} at {}/s, {ratio:.2} wire bytes per memory byte (zero pages and compression shrink it)",
            bytes(self.transferred_bytes as f64),
            bytes(self.bandwidth)
        )?;
        writeln!(
            f,
            "dirty rate:    {}/s (last scan with the workload running)",
            bytes(self.dirty_rate)
        )?;
        if !self.throttle_allowed {
            writeln!(f, "throttle:      off (not allowed by the settings)")?;
        } else if self.throttle > 0.0 && self.throttle_method == "none" {
            writeln!(
                f,
                "throttle:      asked for up to {:.0}%, not applied (this workload has no throttle)",
                self.throttle * 100.0
            )?;
        } else if self.throttle > 0.0 {
            writeln!(
                f,
                "throttle:      up to {:.0}% ({})",
                self.throttle * 100.0,
                self.throttle_method
            )?;
        } else {
            writeln!(f, "throttle:      not needed")?;
        }
        if let Some(w) = self.workload {
            let ns =
                |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0} ns/op"));
            let rate =
                |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0} ops/s"));
            writeln!(
                f,
                "workload:      {} before tracking ({}), {} tracked ({}), {} pages of {} ({}) found written over all scans",
                rate(w.before_rate),
                ns(w.before_ns_per_op),
                rate(Some(w.during_rate)),
                ns(w.during_ns_per_op),
                w.dirty_pages,
                page_unit(self.page_size),
                bytes((w.dirty_pages * self.page_size) as f64)
            )?;
        }
        let pauses: Vec<Duration> = self.rounds.iter().filter_map(|r| r.collect_pause).collect();
        if let Some(max) = pauses.iter().max() {
            writeln!(
                f,
                "collections:   the dirty log needs the workload paused to collect: {} pause(s), {} in all, longest {}",
                pauses.len(),
                msf(pauses.iter().sum()),
                msf(*max)
            )?;
        }
        if let Some(c) = self.checksum {
            writeln!(f, "checksum:      {c:#018x}, acknowledged by the receiver")?;
        }
        if self.rounds.is_empty() {
            return Ok(());
        }
        writeln!(f)?;
        writeln!(
            f,
            "rounds (pages, zero and dirty pg count pages of {}):",
            page_unit(self.page_size)
        )?;
        writeln!(
            f,
            "{:>5} {:<9} {:>11} {:>8} {:>7} {:>11} {:>9} {:>12} {:>12} {:>12} {:>9} {:>5} {:>8} {:>9}",
            "round",
            "kind",
            "to send",
            "pages",
            "zero",
            "wire",
            "time",
            "memory/s",
            "wire/s",
            "dirty/s",
            "exp. down",
            "thr.",
            "dirty pg",
            "ops/s"
        )?;
        for r in &self.rounds {
            // `*`: failed part-way; `cut`: cut short by the timeout.
            let kind = match (r.kind, r.failed, r.interrupted) {
                (RoundKind::Full, false, false) => "full",
                (RoundKind::Full, true, _) => "full*",
                (RoundKind::Full, false, true) => "full cut",
                (RoundKind::Iterative, false, false) => "iterative",
                (RoundKind::Iterative, true, _) => "iterat.*",
                (RoundKind::Iterative, false, true) => "iter. cut",
                (RoundKind::Rehearsal, false, false) => "rehearsal",
                (RoundKind::Rehearsal, true, _) => "rehears.*",
                (RoundKind::Rehearsal, false, true) => "rehe. cut",
                (RoundKind::Final, false, _) => "final",
                (RoundKind::Final, true, _) => "final*",
            };
            writeln!(
                f,
                "{:>5} {:<9} {:>11} {:>8} {:>7} {:>11} {:>9} {:>12} {:>12} {:>12} {:>9} {:>4.0}% {:>8} {:>9}",
                r.round,
                kind,
                bytes(r.dirty_bytes as f64),
                r.pages,
                r.zero_pages,
                bytes(r.bytes as f64),
                msf(r.duration),
                format!("{}/s", bytes(r.throughput)),
                format!("{}/s", bytes(r.bandwidth)),
                format!("{}/s", bytes(r.dirty_rate)),
                r.expected_downtime.map_or_else(|| "-".to_string(), msf),
                r.throttle * 100.0,
                r.dirty_pages,
                match (r.kind, r.workload_rate) {
                    (RoundKind::Final, _) => "paused".to_string(),
                    (_, None) => "-".to_string(),
                    (_, Some(v)) => format!("{v:.0}"),
                }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setup_never_reads_longer_than_the_total_time() {
        let ms = Duration::from_micros;
        for (total, setup, want) in [
            (ms(24_900), ms(24_600), ("24.9 ms", "24.6 ms")),
            (ms(999_940), ms(3_000), ("999.9 ms", "3.0 ms")),
            (ms(1_004_000), ms(1_002_000), ("1.00 s", "1.00 s")),
            (ms(12_346_000), ms(874_400), ("12.35 s", "0.87 s")),
        ] {
            let (t, s) = total_and_setup(total, setup);
            assert_eq!((t.as_str(), s.as_str()), want);
        }
    }

    #[test]
    fn a_downtime_above_the_estimates_bound_is_said() {
        let ms = Duration::from_micros;
        let mut r = MigrationReport::new(Duration::from_millis(50));
        r.downtime = Some(ms(3270));
        r.downtime_bound = Some(ms(3200));
        assert!(r.downtime_above_bound());
        let text = r.to_string();
        assert!(
            text.contains("within the 50.0 ms limit")
                && text.contains("ABOVE the estimate's bound, at most 3.2 ms"),
            "{text}"
        );
        r.downtime_bound = Some(ms(3300));
        assert!(!r.downtime_above_bound());
        assert!(!r.to_string().contains("ABOVE"), "{r}");
    }

    #[test]
    fn page_units_are_named_in_the_largest_whole_unit() {
        assert_eq!(page_unit(4096), "4 KiB");
        assert_eq!(page_unit(16 << 10), "16 KiB");
        assert_eq!(page_unit(2 << 20), "2 MiB");
        assert_eq!(page_unit(1000), "1000 B");
    }
}
