//! The round loop: iterate, decide, throttle, pause, finish (see the crate docs for the rules).

use crate::cancel::{CancelHandle, Fired, Watchdog};
use crate::control::{DirtyLog, RoundSent, Transport, Workload, WorkloadCounters};
use crate::error::{AbortReason, Error, Step};
use crate::report::{
    DowntimeEstimate, FinalPhase, MigrationReport, PauseCheck, PriorityReport, RoundKind,
    RoundReport, Status, SwitchReason, VerifyPass, WorkloadCost,
};
use crate::switchover::{Estimator, PAUSE_PROBES, REREAD_SAMPLE};
use precopy_sys::ranges::coalesce;
use precopy_sys::sched::{self, Raised, Tid};
use std::ops::Range;
use std::time::{Duration, Instant};

/// The [`Error`] of a [`Migration`] over dirty log `D`, transport `T` and workload `W`: each
/// seam's own typed error as the cause.
pub type MigrationError<D, T, W> =
    Error<<D as DirtyLog>::Error, <T as Transport>::Error, <W as Workload>::Error>;

/// What to do when a limit on the iteration is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitPolicy {
    /// Go to the final round now, whatever the expected downtime.
    SwitchOver,
    /// Stop cleanly: lift the throttle, keep the workload running, return
    /// [`Error::Aborted`].
    Abort,
}

/// What happens to the workload after the receiver acknowledged the final round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterMigration {
    /// Resume it (a live copy, a checkpoint).
    Resume,
    /// Leave it paused: the destination takes over (a move). The caller disposes of it.
    Stop,
}

/// Auto-converge settings (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleConfig {
    /// Whether the driver may throttle at all.
    pub enabled: bool,
    /// A scan counts as "not converging" when its dirty rate is at least this × the throughput.
    pub trigger_ratio: f64,
    /// Consecutive non-converging scans before each throttle step.
    pub trigger_rounds: u32,
    /// The first throttle (fraction of CPU time denied).
    pub initial: f64,
    /// Added at each later step.
    pub increment: f64,
    /// The most the throttle goes to (at most 0.99).
    pub max: f64,
}

impl Default for ThrottleConfig {
    fn default() -> ThrottleConfig {
        ThrottleConfig {
            enabled: true,
            trigger_ratio: 0.5,
            trigger_rounds: 2,
            initial: 0.2,
            increment: 0.1,
            max: 0.99,
        }
    }
}

/// Reconnecting after a round failed in the iterative phase (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectConfig {
    /// Attempts after each failed round (0: fail at once).
    pub attempts: u32,
    /// Wait before the first attempt; doubled after each failed attempt.
    pub backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> ReconnectConfig {
        ReconnectConfig {
            attempts: 3,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// How a migration decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationConfig {
    /// Switch over once the pending bytes would take no longer than this (QEMU: 300 ms).
    pub max_downtime: Duration,
    /// Most rounds (round 0 included) sent with the workload running.
    pub max_rounds: u64,
    /// What happens when they are used up.
    pub max_rounds_policy: LimitPolicy,
    /// Limit on the whole migration, from the start. Under [`LimitPolicy::Abort`] it is a hard
    /// bound: it interrupts a round in progress and the final round too (whichever of it and
    /// the final round's own bound passes first ends the migration, the workload resumed).
    /// Under [`LimitPolicy::SwitchOver`] it cuts the round in progress short, breaking nothing
    /// ([`Transport::round_cutter`]; a transport that cannot ends the round first), and starts
    /// the final round at once, which sends what the cut round had not and has its own bound
    /// ([`MigrationConfig::final_round_timeout`]).
    pub timeout: Option<Duration>,
    /// What happens when it passes.
    pub timeout_policy: LimitPolicy,
    /// Auto-converge.
    pub throttle: ThrottleConfig,
    /// The workload after success.
    pub after: AfterMigration,
    /// Rehearse the final phase's start after the scans before rounds 1, 2 and 3: pause the
    /// workload, scan again, resume it, to measure what pausing and a scan with the workload
    /// stopped cost (the medians count), for the downtime estimate (see the crate docs,
    /// "Switch-over rule"). Each probe holds the workload paused for one scan (about 1.6 ms per
    /// 2 GiB tracked on a quiet machine), reported as the round's `probe_scan`.
    pub probe_pause: bool,
    /// Hard bound on the final round, from the pause to the destination's acknowledgement. If
    /// it passes, the transport is interrupted, the workload resumed, the destination never
    /// told to commit, and the migration fails with [`Error::Timeout`]. `None`: derived as
    /// `max(10 × max_downtime, 2 × expected downtime at switch-over, 5 s)`; with no downtime
    /// estimated, a paced transport's time for the pending bytes stands for the expected
    /// downtime (see the crate docs).
    pub final_round_timeout: Option<Duration>,
    /// Reconnecting after a failed round in the iterative phase.
    pub reconnect: ReconnectConfig,
    /// Switch-overs to try in all. A final phase whose connection breaks (or goes silent past
    /// the I/O timeout) before the commit resumes the workload, reconnects
    /// ([`MigrationConfig::reconnect`]), goes back to the iterative rounds and switches over
    /// again, up to this many times; then, or when it cannot reconnect, the migration fails.
    /// The final round's bound passing, a cancel or a refused checksum are never retried.
    /// 1: never retry.
    pub switchover_attempts: u32,
    /// The scheduling priority of the final phase's threads, from the pause until the
    /// acknowledgement (and of the pause probes, which rehearse it).
    pub final_priority: FinalPriority,
    /// Inside each pause probe (with [`MigrationConfig::probe_pause`]), send a sample of the
    /// next round's pages as a round of its own, timed ([`RoundKind::Rehearsal`]): about
    /// [`REHEARSAL_BYTES`] of single pages spread over the pending ones, sent with the
    /// workload paused and the threads at the final phase's priority, as the final round's
    /// are. Their time per byte decides the expected final send. Each holds the workload
    /// paused for that send too (a few milliseconds on loopback).
    pub rehearse_send: bool,
}

/// About how many bytes a rehearsal round sends ([`MigrationConfig::rehearse_send`]): the
/// size of a final round that fits a downtime of tens of milliseconds at a few hundred MB/s.
pub const REHEARSAL_BYTES: u64 = 4 << 20;
/// Finish probes each pause probe takes with the workload paused. With one, a migration that
/// converged after two pause probes expected the finish from the slower of two samples (upper
/// median): 6.5 ms expected for 1.6 measured when one of them waited for a CPU (quiet table of
/// edc1df7, run 12). With two per pause probe the majority decides; a probe costs the
/// workload one round trip and two digests of pause (about 1.5 ms at 2 GiB).
pub(crate) const PAUSED_FINISH_PROBES: usize = 2;

/// Pending bytes below which a pause probe sends no rehearsal (too few to time a send).
const REHEARSAL_MIN: u64 = 1 << 20;

/// The scheduling priority of the threads the final phase runs on: the driver's, the
/// transport's ([`Transport::threads`]: a socket sender's writers and watchers) and any the
/// embedder adds ([`Migration::raise_also`]).
///
/// With the workload paused the final round is a short burst of CPU work on those threads
/// (read, hash, write into the socket; at the receiver, read, check, copy). Measured on a
/// 2-CPU machine with a CPU-bound process on one CPU (BENCHMARKS.md): all of them woke on the
/// other CPU and shared it for the whole final round (a few milliseconds, shorter than the
/// load balancer takes to move one), while the live rounds before it had spread over both, so
/// the final round went at half their speed. A real-time thread that wakes is placed on a CPU
/// running only normal tasks, which it preempts: raised, the final phase's threads take both
/// CPUs at once. Restored as soon as the acknowledgement came, before the workload resumes;
/// when the phase fails (an error, a cancel, the final round's bound), only once the workload
/// is resumed, so that the resume does not wait for a CPU (put back first, the driver of a
/// final round cut at its 100 ms bound waited up to 38 ms at load 17-19, BENCHMARKS.md, "The
/// final round's bound: resumed still raised"). The driver's watchdog thread, which enforces
/// the final round's bound ([`MigrationConfig::final_round_timeout`]), runs one priority above them meanwhile (unless
/// they are at 99), so that a busy final phase cannot delay it (it is not counted in
/// [`PriorityReport::threads`](crate::PriorityReport)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalPriority {
    /// Leave the threads' priority as it is.
    Normal,
    /// `SCHED_FIFO` at this priority (1-99) where the process may (`CAP_SYS_NICE` or an
    /// `RLIMIT_RTPRIO` that allows it); where it may not, the threads keep their own and the
    /// report says why ([`PriorityReport::not_raised`](crate::PriorityReport)).
    Realtime(u8),
}

/// Why the final phase's threads were not raised with [`FinalPriority::Normal`]
/// ([`PriorityReport::not_raised`](crate::PriorityReport)).
const NORMAL_ASKED: &str = "normal asked for (the threads kept their own priority)";

impl Default for MigrationConfig {
    fn default() -> MigrationConfig {
        MigrationConfig {
            max_downtime: Duration::from_millis(300),
            max_rounds: 30,
            max_rounds_policy: LimitPolicy::SwitchOver,
            timeout: None,
            timeout_policy: LimitPolicy::Abort,
            throttle: ThrottleConfig::default(),
            after: AfterMigration::Stop,
            probe_pause: true,
            final_round_timeout: None,
            reconnect: ReconnectConfig::default(),
            switchover_attempts: 3,
            final_priority: FinalPriority::Realtime(1),
            rehearse_send: true,
        }
    }
}

impl MigrationConfig {
    fn check<L, T: std::error::Error + 'static, W>(&self) -> Result<(), Error<L, T, W>> {
        let bad = |reason| Err(Error::Config { reason });
        let t = &self.throttle;
        if self.max_downtime.is_zero() {
            return bad("max_downtime must be positive");
        }
        if self.max_rounds == 0 {
            return bad("max_rounds must be at least 1");
        }
        if !(0.0..=0.99).contains(&t.initial)
            || !(0.0..=0.99).contains(&t.max)
            || !(0.0..=0.99).contains(&t.increment)
            || t.initial > t.max
        {
            return bad("throttle fractions must lie in 0..=0.99 with initial <= max");
        }
        if t.trigger_rounds == 0 || t.trigger_ratio.is_nan() || t.trigger_ratio <= 0.0 {
            return bad("throttle trigger needs at least one round and a positive ratio");
        }
        if self.final_round_timeout.is_some_and(|t| t.is_zero()) {
            return bad("final_round_timeout must be positive");
        }
        if self.switchover_attempts == 0 {
            return bad("switchover_attempts must be at least 1");
        }
        if self.reconnect.backoff > self.reconnect.max_backoff {
            return bad("reconnect backoff must not exceed max_backoff");
        }
        if let FinalPriority::Realtime(p) = self.final_priority
            && !(1..=99).contains(&p)
        {
            return bad("a real-time final priority must lie in 1..=99");
        }
        Ok(())
    }

    /// The final round's hard bound given the expected downtime at switch-over.
    pub fn final_round_bound(&self, expected: Option<Duration>) -> Duration {
        self.final_round_timeout.unwrap_or_else(|| {
            let by_limit = self.max_downtime.saturating_mul(10);
            let by_expected = expected.map_or(Duration::ZERO, |e| e.saturating_mul(2));
            by_limit.max(by_expected).max(Duration::from_secs(5))
        })
    }
}

/// Where a migration is, for [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Round 0 is being sent.
    Full,
    /// A scan has just run with the workload running.
    Iterating,
    /// The workload is paused for the final round.
    Final,
}

/// A snapshot handed to the progress callback after each scan and round.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Phase.
    pub phase: Phase,
    /// The round about to be sent.
    pub round: u64,
    /// Bytes still to send.
    pub pending_bytes: u64,
    /// Memory bytes per second the transport delivers.
    pub throughput: f64,
    /// Bytes written per second by the workload.
    pub dirty_rate: f64,
    /// Throttle in force.
    pub throttle: f64,
    /// Expected downtime if switching over now.
    pub expected_downtime: Option<Duration>,
    /// Since the start.
    pub elapsed: Duration,
    /// Bytes of memory migrated.
    pub memory_bytes: u64,
}

type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// How many times the pause check (see the crate docs, "The pause check") sends pages it
/// found written after the final scan and scans again before it gives up and fails the
/// migration with [`Error::NotPaused`].
pub const PAUSE_CHECK_SENDS: u32 = 3;

/// Rounds in a row that found nothing written (and expect nothing until the pause) before the
/// driver gives up on a limit its fixed costs alone exceed ([`SwitchReason::OutOfReach`]): by
/// then the finish probes that bound the finish were all taken with nothing written (as many
/// as the estimate keeps), so more rounds would only wait for a lucky sample.
pub const QUIET_ROUNDS: u32 = crate::switchover::FINISH_WINDOW as u32;

/// The least time those quiet rounds' scans must cover together: a handful of scans a few
/// milliseconds apart that found nothing may only mean the writers got no CPU meanwhile (on
/// a loaded machine, 5 scans over 24 ms found nothing from a process writing flat out). While
/// the fixed costs alone exceed the limit, the driver spaces quiet scans so that they do
/// (rather than use up `--max-rounds` on empty rounds: 31 in 0.13 s before it did).
pub const QUIET_TIME: Duration = Duration::from_secs(1);

/// Rounds of a throughput estimate: a round smaller than this is latency-bound.
const SIGNIFICANT_ROUND: u64 = 4 << 20;

/// One live migration: a [`DirtyLog`], a [`Transport`] and a [`Workload`] driven by a
/// [`MigrationConfig`].
pub struct Migration<D, T, W> {
    log: D,
    transport: T,
    workload: W,
    config: MigrationConfig,
    report: MigrationReport,
    progress: Option<ProgressFn>,
    paused: bool,
    throttle: f64,
    /// Memory bytes and seconds over all rounds, for the throughput estimate.
    sent_bytes: u64,
    sent_secs: f64,
    last_throughput: Option<f64>,
    /// What the final phase would cost: decides the switch-over.
    estimator: Estimator,
    /// The dirty rate of the last scan taken with no throttle on: what the workload writes
    /// once the pause lifts the throttle.
    unthrottled_rate: f64,
    /// The scans the dirty rate is measured over.
    dirty_window: DirtyRate,
    /// How long to measure the workload before tracking starts.
    measure_before: Duration,
    /// The workload's counters when tracking started, and at the last scan.
    tracked_from: Option<(Instant, WorkloadCounters)>,
    last_counters: Option<(Instant, WorkloadCounters)>,
    /// What the last scan observed, for the round it precedes.
    observed: Observed,
    /// Pages the dirty log reported over all scans so far.
    dirty_pages: u64,
    /// What the last failed [`Transport::send_round`] had handed over, until recorded.
    failed_send: Option<RoundSent>,
    /// The final phase under way, for its report if it fails.
    final_attempt: Option<FinalAttempt>,
    started: Option<Instant>,
    cancel: CancelHandle,
    watchdog: Option<Watchdog>,
    paused_at: Option<Instant>,
    /// The final phase's threads raised ([`FinalPriority`]): from the pause until the
    /// acknowledgement or, when the phase fails, until the workload is resumed.
    final_raise: Option<Raised>,
    /// Harvested ranges not yet delivered (see [`Migration::unsent`]).
    unsent: Vec<Range<u64>>,
    /// The last round sent was cut short by the total timeout ([`Transport::take_cut`]):
    /// what it did not send, until the caller carries it into a later round.
    cut: Option<Vec<Range<u64>>>,
    /// The last round sent was cut short, until it is recorded ([`RoundReport::interrupted`]).
    cut_unrecorded: bool,
    /// More threads to raise with the final phase's ([`Migration::raise_also`]).
    raise_also: Option<Box<dyn FnMut() -> Vec<Tid> + Send>>,
}

impl<D, T, W> std::fmt::Debug for Migration<D, T, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("config", &self.config)
            .field("status", &self.report.status)
            .finish_non_exhaustive()
    }
}

/// The parts of `a` not covered by `b` (both sorted and coalesced), sorted.
fn outside(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        while j < b.len() && b[j].end <= r.start {
            j += 1;
        }
        let mut at = r.start;
        let mut k = j;
        while at < r.end {
            match b.get(k) {
                Some(c) if c.start < r.end => {
                    if c.start > at {
                        out.push(at..c.start);
                    }
                    at = at.max(c.end).min(r.end);
                    k += 1;
                }
                _ => {
                    out.push(at..r.end);
                    at = r.end;
                }
            }
        }
    }
    out
}

/// The piece a re-read sample takes at each of its points.
const REREAD_PIECE: u64 = 64 << 10;

/// About `want` bytes of `ranges` (sorted, coalesced, page-aligned), as pieces of at most
/// `piece` bytes (a multiple of `page`) spread evenly over them; all of `ranges` when they
/// hold no more than `want`.
fn spread_sample(ranges: &[Range<u64>], want: u64, piece: u64, page: u64) -> Vec<Range<u64>> {
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    if total <= want {
        return ranges.to_vec();
    }
    let pieces = (want / piece).max(1);
    let stride = total / pieces;
    let mut out = Vec::with_capacity(pieces as usize);
    let (mut i, mut base) = (0, 0);
    for k in 0..pieces {
        let at = k * stride / page * page;
        while at >= base + (ranges[i].end - ranges[i].start) {
            base += ranges[i].end - ranges[i].start;
            i += 1;
        }
        let start = ranges[i].start + (at - base);
        out.push(start..(start + piece).min(ranges[i].end));
    }
    out
}

/// The sample a rehearsal round sends ([`MigrationConfig::rehearse_send`]): whole ranges of
/// `ranges` (as the dirty log reported them, overlaps allowed) spread evenly over them, about
/// `want` bytes and at most a quarter of their bytes, sorted and coalesced; ranges longer than
/// `want / 8` are passed over (a round of a few long runs is not the final round of scattered
/// pages it rehearses). Empty when the ranges hold less than [`REHEARSAL_MIN`].
fn rehearsal_sample(ranges: &[Range<u64>], want: u64) -> Vec<Range<u64>> {
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    if total < REHEARSAL_MIN {
        return Vec::new();
    }
    let want = want.min(total / 4);
    let longest = want / 8;
    let share = want as f64 / total as f64;
    let (mut credit, mut taken) = (0.0, 0u64);
    let mut out = Vec::new();
    for r in ranges {
        let len = r.end - r.start;
        credit += len as f64 * share;
        if len <= longest && credit >= len as f64 {
            credit -= len as f64;
            taken += len;
            out.push(r.clone());
            if taken >= want {
                break;
            }
        }
    }
    coalesce(&mut out);
    out
}

/// What a scan saw of the workload: pages found written and the workload's own rate since the
/// previous scan.
#[derive(Debug, Clone, Copy, Default)]
struct Observed {
    dirty_pages: u64,
    rate: Option<f64>,
    ns_per_op: Option<f64>,
    /// How long the workload was paused for the collection (logs that need it).
    collect_pause: Option<Duration>,
    /// CPU time of the scanning thread in the collection.
    scan_cpu: Option<Duration>,
    /// The pause probe's scan after it, if one ran: wall and CPU time.
    probe_scan: Option<(Duration, Option<Duration>)>,
    /// The pause probe's rehearsal of a pause check scan, if one ran: wall time.
    probe_check: Option<Duration>,
    /// The pause probe's pause and its finish probes, if they ran.
    probe_pause: Option<Duration>,
    probe_finish: [Option<Duration>; PAUSED_FINISH_PROBES],
}

/// A final phase under way: its round's bytes and scan, and what its send delivered.
#[derive(Debug, Clone, Copy)]
struct FinalAttempt {
    bytes: u64,
    scan: Duration,
    sent: Option<RoundSent>,
}

/// A pause probe's rehearsal round: bytes of pending pages it took, bytes of its sample, and
/// what the send delivered (see `Collected::rehearsal`).
type Rehearsed = (u64, u64, RoundSent);

/// What one collection of the dirty log did.
#[derive(Debug, Clone, Copy)]
struct Collected {
    /// Pages the log reported ([`CollectStats::pages`](crate::CollectStats)).
    pages: u64,
    /// How long the workload was paused for it (a log that needs it, a pause probe).
    pause: Option<Duration>,
    /// Its wall time (without the pause and resume around it).
    wall: Duration,
    /// CPU time this thread spent in the log's collect (`None`: the clock could not be read).
    cpu: Option<Duration>,
    /// The rehearsal round a pause probe sent: the bytes of pending pages it took (they
    /// left `out`), the bytes of its sample (more when the timeout cut it short: the rest
    /// stayed in `out`) and what the send delivered.
    rehearsal: Option<Rehearsed>,
    /// A pause probe's rehearsal of one pause check scan, after its send: wall time.
    check: Option<Duration>,
    /// A pause probe's pause (its threads raised before the clock started) and finish probes.
    probe_pause: Option<Duration>,
    finish: [Option<Duration>; PAUSED_FINISH_PROBES],
}

/// CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`), or `None` if the clock cannot be
/// read.
fn thread_cpu_time() -> Option<Duration> {
    nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID
        .now()
        .ok()
        .map(Duration::from)
}

/// Operations per second and mean nanoseconds per operation between two counter samples.
fn workload_rates(
    a: (Instant, WorkloadCounters),
    b: (Instant, WorkloadCounters),
) -> (f64, Option<f64>) {
    let ops = b.1.operations.saturating_sub(a.1.operations);
    let busy = b.1.busy.saturating_sub(a.1.busy);
    let rate = per_sec(ops, b.0.saturating_duration_since(a.0));
    let ns = (ops > 0).then(|| busy.as_nanos() as f64 / ops as f64);
    (rate, ns)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn per_sec(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { bytes as f64 / s } else { 0.0 }
}

/// The least time the dirty rate is measured over ([`DirtyRate`]).
pub(crate) const DIRTY_RATE_WINDOW: Duration = Duration::from_millis(100);

/// The dirty rate the driver reports and decides with: the bytes the latest scans found
/// written ÷ the time those scans cover (each scan covers the time since the one before), back
/// to the first scan that makes them cover at least [`DIRTY_RATE_WINDOW`], or all scans under
/// the current throttle while they cover less. One scan after a small round covers well under
/// a millisecond: alone it is a noisy sample, and one that happened to find nothing would read
/// 0 while the workload writes on. The rate therefore reads 0 only when no scan in its window
/// found a page. A change of the throttle starts a new window (a throttled writer writes less,
/// and the rate before the throttle is kept apart for the estimate). QEMU likewise measures
/// its dirty-page rate over periods of at least a second (`migration_bitmap_sync`).
#[derive(Debug, Default)]
struct DirtyRate {
    /// (bytes found, time covered) per scan, oldest first.
    scans: std::collections::VecDeque<(u64, Duration)>,
    throttle: f64,
}

impl DirtyRate {
    /// Adds a scan that found `bytes` written over `interval` under `throttle`; the rate.
    fn add(&mut self, bytes: u64, interval: Duration, throttle: f64) -> f64 {
        if throttle != self.throttle {
            self.scans.clear();
            self.throttle = throttle;
        }
        self.scans.push_back((bytes, interval));
        // Drop the oldest scans while the others still cover the window.
        while self.scans.len() > 1
            && self.scans.iter().skip(1).map(|s| s.1).sum::<Duration>() >= DIRTY_RATE_WINDOW
        {
            self.scans.pop_front();
        }
        let bytes = self.scans.iter().map(|s| s.0).sum();
        per_sec(bytes, self.scans.iter().map(|s| s.1).sum())
    }
}

impl<D: DirtyLog, T: Transport, W: Workload> Migration<D, T, W> {
    /// A migration, not started.
    pub fn new(log: D, transport: T, workload: W, config: MigrationConfig) -> Migration<D, T, W> {
        Migration {
            log,
            transport,
            workload,
            report: MigrationReport {
                throttle_allowed: config.throttle.enabled,
                ..MigrationReport::new(config.max_downtime)
            },
            config,
            progress: None,
            paused: false,
            throttle: 0.0,
            sent_bytes: 0,
            sent_secs: 0.0,
            last_throughput: None,
            estimator: Estimator::default(),
            unthrottled_rate: 0.0,
            dirty_window: DirtyRate::default(),
            measure_before: Duration::ZERO,
            tracked_from: None,
            last_counters: None,
            observed: Observed::default(),
            dirty_pages: 0,
            failed_send: None,
            final_attempt: None,
            started: None,
            cancel: CancelHandle::default(),
            watchdog: None,
            paused_at: None,
            final_raise: None,
            unsent: Vec::new(),
            cut: None,
            cut_unrecorded: false,
            raise_also: None,
        }
    }

    /// Raises the threads `f` lists (called at each pause probe and final phase) with the
    /// final phase's own ([`MigrationConfig::final_priority`]): e.g. a receiver's threads on
    /// this same host, which the final round keeps as busy as the sender's.
    pub fn raise_also(mut self, f: impl FnMut() -> Vec<Tid> + Send + 'static) -> Self {
        self.raise_also = Some(Box::new(f));
        self
    }

    /// Raises the final phase's threads as configured ([`FinalPriority`]); records what it did
    /// in the report. `None` when nothing was raised.
    fn raise_priority(&mut self) -> Option<Raised> {
        let FinalPriority::Realtime(priority) = self.config.final_priority else {
            self.report.final_priority = Some(PriorityReport {
                policy: "normal",
                priority: 0,
                threads: 0,
                not_raised: Some(NORMAL_ASKED.to_string()),
                restore_error: None,
            });
            return None;
        };
        let mut tids = vec![sched::gettid()];
        tids.extend(self.transport.threads());
        if let Some(f) = &mut self.raise_also {
            tids.extend(f());
        }
        let mut threads = 0;
        let (raised, not_raised) = match sched::raise_threads(
            &tids,
            sched::SCHED_FIFO,
            priority.into(),
        ) {
            Ok(mut r) => {
                threads = r.len() as u32;
                // The thread that enforces the final round's bound runs above the threads it
                // bounds: at their priority, a busy final phase could keep it from firing.
                if let Some(tid) = self.watchdog().and_then(Watchdog::tid)
                    && priority < 99
                {
                    match sched::raise_threads(&[tid], sched::SCHED_FIFO, (priority + 1).into()) {
                        Ok(w) => r.merge(w),
                        Err(e) => tracing::warn!(error = %e, "raising the watchdog failed"),
                    }
                }
                (Some(r), None)
            }
            Err(e) => {
                let why = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    format!(
                        "not permitted ({e}): needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least {priority}"
                    )
                } else {
                    e.to_string()
                };
                (None, Some(why))
            }
        };
        self.report.final_priority = Some(PriorityReport {
            policy: "fifo",
            priority,
            threads,
            not_raised,
            restore_error: None,
        });
        raised
    }

    /// Puts the threads [`Migration::raise_priority`] raised back to their own priority.
    fn restore_priority(&mut self, raised: Option<Raised>) {
        if let Some(r) = raised
            && let Err(e) = r.restore()
        {
            tracing::warn!(error = %e, "restoring the final phase's threads' priority failed");
            if let Some(p) = &mut self.report.final_priority {
                p.restore_error = Some(e.to_string());
            }
        }
    }

    /// A handle to cancel this migration from another thread (take it before
    /// [`Migration::run`]).
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Uses `handle` as this migration's cancel handle (one made with `CancelHandle::default()`
    /// before the migration was built, e.g. handed to a management thread early); a handle
    /// cancelled already makes [`Migration::run`] fail at its first step.
    pub fn with_cancel_handle(mut self, handle: CancelHandle) -> Self {
        self.cancel = handle;
        self
    }

    /// After a failed [`Migration::run`]: the ranges the dirty log handed out that were never
    /// delivered (sorted, merged). They are no longer in the dirty log: a fallback (another
    /// destination, a checkpoint) must send them, plus everything the log reports from now on.
    /// Empty after success.
    pub fn unsent(&self) -> &[Range<u64>] {
        &self.unsent
    }

    /// Calls `f` after every scan and round (from the migrating thread: keep it quick).
    pub fn on_progress(mut self, f: impl FnMut(&Progress) + Send + 'static) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Measures the workload's own throughput for `d` before tracking starts: the baseline of
    /// the report's [`WorkloadCost`] (needs [`Workload::counters`]; default: not measured).
    pub fn measure_workload_before(mut self, d: Duration) -> Self {
        self.measure_before = d;
        self
    }

    /// The workload's rate before tracking, over [`Migration::measure_workload_before`].
    fn measure_baseline(&mut self) {
        if self.measure_before.is_zero() {
            return;
        }
        let Some(a) = self.workload.counters().map(|c| (Instant::now(), c)) else {
            return;
        };
        std::thread::sleep(self.measure_before);
        let Some(b) = self.workload.counters().map(|c| (Instant::now(), c)) else {
            return;
        };
        let (rate, ns) = workload_rates(a, b);
        self.report.workload = Some(WorkloadCost {
            before_rate: Some(rate),
            before_ns_per_op: ns,
            ..WorkloadCost::default()
        });
    }

    /// The workload's cost while tracked, from the start of tracking to the pause.
    fn record_workload(&mut self) {
        let dirty_pages = self.dirty_pages;
        if let (Some(a), Some(b)) = (self.tracked_from, self.last_counters) {
            let (rate, ns) = workload_rates(a, b);
            let w = self
                .report
                .workload
                .get_or_insert_with(WorkloadCost::default);
            w.during_rate = rate;
            w.during_ns_per_op = ns;
            w.dirty_pages = dirty_pages;
        }
    }

    /// Samples the workload's counters after a collection; keeps what it found for the round
    /// that sends it.
    fn observe(&mut self, collected: Collected) {
        let now = self.workload.counters().map(|c| (Instant::now(), c));
        let (rate, ns_per_op) = match (self.last_counters, now) {
            (Some(a), Some(b)) => {
                let (r, n) = workload_rates(a, b);
                (Some(r), n)
            }
            _ => (None, None),
        };
        if now.is_some() {
            self.last_counters = now;
        }
        self.dirty_pages += collected.pages;
        // The final scan is the round's second observation: the pause probe's scan taken
        // after the round's live scan still belongs to the round's report.
        let Observed {
            probe_scan,
            probe_check,
            probe_pause,
            probe_finish,
            ..
        } = self.observed;
        self.observed = Observed {
            dirty_pages: collected.pages,
            rate,
            ns_per_op,
            collect_pause: collected.pause,
            scan_cpu: collected.cpu,
            probe_scan,
            probe_check,
            probe_pause,
            probe_finish,
        };
    }

    /// One collection of the dirty log into `out`. A log whose read and reset are two steps
    /// ([`DirtyLog::needs_pause`]: soft-dirty) gets the workload paused around it, unless it
    /// already is, and the pause it cost is returned. Whatever happens, `out` is what must
    /// still be sent ([`Migration::unsent`]).
    fn collect(
        &mut self,
        round: u64,
        out: &mut Vec<Range<u64>>,
        probe: bool,
    ) -> Result<Collected, MigrationError<D, T, W>> {
        let pause = (self.log.needs_pause() || probe) && !self.paused;
        // A pause probe rehearses the final phase at its priority.
        let raised = if probe && pause {
            self.raise_priority()
        } else {
            None
        };
        let paused_at = Instant::now();
        let mut probe_pause = None;
        if pause {
            self.workload.pause().map_err(|source| Error::Workload {
                action: "pause",
                source,
            })?;
            if probe {
                let took = paused_at.elapsed();
                self.estimator.add_pause(took);
                probe_pause = Some(took);
            }
        }
        let scan_start = Instant::now();
        let cpu_before = thread_cpu_time();
        let collected = self.log.collect(out);
        let cpu = cpu_before.and_then(|b| Some(thread_cpu_time()?.saturating_sub(b)));
        let wall = scan_start.elapsed();
        let mut rehearsal = Ok(None);
        let mut check = None;
        let mut finish = [None; PAUSED_FINISH_PROBES];
        if probe && pause && collected.is_ok() {
            finish = self.rehearse_finish(out);
            rehearsal = self.rehearse_send(out);
            if rehearsal.is_ok() {
                check = Some(self.rehearse_check(out));
            }
        }
        let held = paused_at.elapsed();
        self.restore_priority(raised);
        let resumed = if pause {
            self.workload.resume().map_err(|source| Error::Workload {
                action: "resume",
                source,
            })
        } else {
            Ok(())
        };
        // From here the harvested ranges exist only in `out`.
        self.unsent.clone_from(out);
        let stats = collected.map_err(|e| Error::Tracking { round, source: e })?;
        let check = check
            .transpose()
            .map_err(|e| Error::Tracking { round, source: e })?;
        resumed?;
        Ok(Collected {
            pages: stats.pages + check.map_or(0, |c| c.1),
            pause: pause.then_some(held),
            wall,
            cpu,
            rehearsal: rehearsal?,
            check: check.map(|c| c.0),
            probe_pause,
            finish,
        })
    }

    /// Inside a pause probe, after its send (workload still paused, threads raised): one scan
    /// as the pause check takes it after the final send ([`Migration::check_paused`]), timed
    /// for the estimate. It finds nothing unless the workload ran; what it finds was written
    /// and stays in `out`, to be sent. Returns the wall time and the pages found. The scan
    /// alone is timed: the check's copy of the final round's ranges takes microseconds, a copy
    /// of a first probe's pending ranges (tens of thousands of pages) would not.
    fn rehearse_check(&mut self, out: &mut Vec<Range<u64>>) -> Result<(Duration, u64), D::Error> {
        let start = Instant::now();
        let collected = self.log.collect(out);
        Ok((start.elapsed(), collected?.pages))
    }

    /// Inside a pause probe (workload paused, threads raised as for the final phase): sends a
    /// sample of `out` (single pages spread over all of it, about [`REHEARSAL_BYTES`], at most
    /// a quarter of it) as a
    /// round of its own ([`MigrationConfig::rehearse_send`]) and takes those pages out of
    /// `out`. On a failed send `out` keeps them (the caller records the failed round from
    /// `failed_send` and reconnects as after any failed round); cut short by the timeout, it
    /// keeps those not sent. Returns the bytes sent and the round.
    fn rehearse_send(
        &mut self,
        out: &mut Vec<Range<u64>>,
    ) -> Result<Option<Rehearsed>, MigrationError<D, T, W>> {
        if !self.config.rehearse_send {
            return Ok(None);
        }
        // Sampled from the ranges as the log reported them (runs of written pages, each inside
        // one region, so each can be sent on its own whatever the region's page size).
        let mut sample = rehearsal_sample(out, REHEARSAL_BYTES);
        let bytes = coalesce(&mut sample);
        if bytes == 0 {
            return Ok(None);
        }
        let round = self.next_round();
        let sent = self.send(Step::Round { round }, &sample)?;
        coalesce(out);
        *out = outside(out, &sample);
        match self.take_cut() {
            // Cut short by the timeout: what it did not send stays pending (and is counted
            // there, not as the rehearsal's), and a part of a round says nothing about the
            // final round's send.
            Some(unsent) => {
                out.extend(unsent);
                coalesce(out);
                let sent_bytes = outside(&sample, out).iter().map(|r| r.end - r.start).sum();
                Ok(Some((sent_bytes, bytes, sent)))
            }
            None => {
                self.estimator.add_rehearsal(bytes, sent.duration);
                Ok(Some((bytes, bytes, sent)))
            }
        }
    }

    /// Rounds sent with the workload running (round 0 included; not rehearsals, not failed
    /// ones): what [`MigrationConfig::max_rounds`] counts.
    fn live_rounds(&self) -> u64 {
        self.report.live_rounds() as u64
    }

    /// The number of the next round: rounds that failed part-way are in the report but are
    /// sent again under the same number.
    fn next_round(&self) -> u64 {
        self.report.rounds.iter().filter(|r| !r.failed).count() as u64
    }

    /// The report so far (complete after [`Migration::run`] returns, whatever it returned).
    pub fn report(&self) -> &MigrationReport {
        &self.report
    }

    /// The dirty log, transport and workload back.
    pub fn into_parts(self) -> (D, T, W) {
        (self.log, self.transport, self.workload)
    }

    /// Runs the migration to the end. On success the receiver has acknowledged the final
    /// checksum. On any error the throttle has been lifted and the workload resumed;
    /// [`Migration::report`] says how far it got.
    pub fn run(&mut self) -> Result<MigrationReport, MigrationError<D, T, W>> {
        self.config.check()?;
        if self.started.is_some() {
            return Err(Error::Config {
                reason: "a migration runs only once",
            });
        }
        self.measure_baseline();
        let start = Instant::now();
        self.started = Some(start);
        self.report.throttle_method = self.workload.throttle_method();
        // The total timeout under the switch-over policy cuts the round in progress short.
        let cutter = (self.config.timeout.is_some()
            && self.config.timeout_policy == LimitPolicy::SwitchOver)
            .then(|| self.transport.round_cutter())
            .flatten();
        self.watchdog = Some(Watchdog::start(
            &self.cancel,
            self.transport.interrupter(),
            cutter,
        ));
        let result = self.iterate(start);
        // A failed final phase keeps its raise until the workload is resumed (`recover`), the
        // watchdog's thread in it: put that one back while its ID still names it.
        if let (Some(raised), Some(tid)) = (
            self.final_raise.as_mut(),
            self.watchdog.as_ref().and_then(Watchdog::tid),
        ) && let Err(e) = raised.restore_thread(tid)
        {
            tracing::warn!(error = %e, "putting the watchdog's thread back to its priority failed");
        }
        self.watchdog = None;
        if let Err(e) = &result {
            self.report.error = Some(precopy_sys::error_chain(e));
            // What the workload did and the log found up to the failure (or the pause).
            if self.report.status == Status::Active
                && let Some(c) = self.workload.counters()
            {
                self.last_counters = Some((Instant::now(), c));
            }
            self.record_workload();
            // After the commit the destination owns the state: never resume then.
            if self.report.status != Status::Completed {
                self.report.status = match e {
                    Error::Aborted { .. } => Status::Aborted,
                    Error::Cancelled { .. } => Status::Cancelled,
                    _ => Status::Failed,
                };
                self.recover();
            }
        }
        self.report.throttle_method = self.workload.throttle_method();
        self.report.total_time = start.elapsed();
        result.map(|()| self.report.clone())
    }

    /// After a failure: lift the throttle and resume. Failures here are logged, not returned:
    /// the first error is the one that matters.
    fn recover(&mut self) {
        if self.throttle > 0.0 {
            if let Err(e) = self.workload.set_throttle(0.0) {
                tracing::warn!(error = %e, "lifting the throttle after a failed migration failed");
            }
            self.throttle = 0.0;
        }
        if self.paused {
            match self.workload.resume() {
                Ok(()) => self.paused = false,
                Err(e) => {
                    tracing::error!(error = %e, "resuming the workload after a failed migration failed")
                }
            }
            if let Some(at) = self.paused_at {
                self.report.record_pause(at.elapsed());
            }
        }
        let raised = self.final_raise.take();
        self.restore_priority(raised);
    }

    fn watchdog(&self) -> Option<&Watchdog> {
        self.watchdog.as_ref()
    }

    /// The error for a failed or interrupted step: a cancel or a passed deadline explains the
    /// transport's failure; otherwise `plain` wraps it.
    fn step_error(
        &self,
        step: Step,
        source: Option<T::Error>,
        plain: impl FnOnce(String, T::Error) -> MigrationError<D, T, W>,
    ) -> MigrationError<D, T, W> {
        let peer = self.transport.peer();
        match self.watchdog().and_then(Watchdog::fired) {
            Some(Fired::Cancelled) => Error::Cancelled { step },
            Some(Fired::Deadline(at, limit)) => Error::Timeout {
                step: at,
                peer,
                limit,
                source,
            },
            None => match source {
                Some(source) => plain(peer, source),
                None => Error::Cancelled { step },
            },
        }
    }

    /// Fails if a cancel or a deadline fired before `step` starts. The total timeout seen
    /// between rounds is an abort like the check after a scan.
    fn check_fired(&self, step: Step) -> Result<(), MigrationError<D, T, W>> {
        match self.watchdog().and_then(Watchdog::fired) {
            None => Ok(()),
            Some(Fired::Deadline(Step::Round { .. }, limit)) => Err(Error::Aborted {
                reason: AbortReason::Timeout { limit },
            }),
            Some(_) => Err(self.step_error(step, None, |_, _| Error::Cancelled { step })),
        }
    }

    /// Sends one round as `step`; errors name the step and the peer.
    fn send(
        &mut self,
        step: Step,
        ranges: &[Range<u64>],
    ) -> Result<RoundSent, MigrationError<D, T, W>> {
        self.check_fired(step)?;
        let round = self.next_round();
        // What the source's memory is now: pages of memory it unmapped are dropped.
        self.transport.set_memory(&self.log.memory());
        // The pacing as it stands right before the round, against which the round is
        // measured (`Estimator::add_round`, `add_rehearsal`).
        self.estimator.set_pacing(self.transport.pacing());
        let mut sent = self.transport.send_round(ranges).map_err(|source| {
            self.failed_send = Some(self.transport.sent_before_failure().unwrap_or_default());
            self.step_error(step, Some(source), |peer, source| Error::Send {
                round,
                peer,
                source,
            })
        })?;
        let cut = self.transport.take_cut();
        if let Step::Round { .. } = step {
            // A live round or a rehearsal cut short by the total timeout: the caller
            // carries what it did not send.
            self.cut_unrecorded = cut.is_some();
            self.cut = cut;
        } else if let Some(unsent) = cut.filter(|u| !u.is_empty()) {
            // The final phase lifts the cut before it starts and no cut can come after; were
            // one made, what it left goes now, in a round of its own, never lost.
            tracing::error!(%step, "a round of the final phase was cut short: sending the rest");
            self.transport.uncut();
            let more = self.send(step, &unsent)?;
            sent.pages += more.pages;
            sent.zero_pages += more.zero_pages;
            sent.bytes += more.bytes;
            sent.duration += more.duration;
        }
        Ok(sent)
    }

    /// After a round ended: what it did not send if it was cut short by the total timeout
    /// (the ranges, to carry into a later round; [`Migration::unsent`] holds them until
    /// then), else `None`.
    fn take_cut(&mut self) -> Option<Vec<Range<u64>>> {
        let cut = self.cut.take()?;
        tracing::info!(
            bytes = cut.iter().map(|r| r.end - r.start).sum::<u64>(),
            "a round cut short by the timeout: what it did not send goes in the next one"
        );
        Some(cut)
    }

    /// After a final phase failed: records its round as failed (what was sent, or handed over
    /// before the send failed), if the phase got as far as its scan.
    fn record_failed_final(&mut self) {
        let Some(a) = self.final_attempt.take() else {
            return;
        };
        let part = match (a.sent, self.failed_send.take()) {
            (Some(sent), _) => sent,
            (None, part) => part.unwrap_or_default(),
        };
        let (rate, expected) = (self.report.dirty_rate, self.report.expected_downtime);
        self.record(RoundKind::Final, a.bytes, a.scan, rate, expected, Err(part));
        if let Some(r) = self.report.rounds.last() {
            let f = &mut self.report.failed_final;
            f.rounds += 1;
            f.pages += r.pages;
            f.zero_pages += r.zero_pages;
            f.bytes += r.bytes;
        }
    }

    /// After round `round` failed with `error`: reconnects with backoff if the transport and
    /// the configuration allow. Returns the ranges the destination lacks beyond the failed
    /// round's, or the error that ends the migration.
    fn reconnect(
        &mut self,
        round: u64,
        error: MigrationError<D, T, W>,
    ) -> Result<Vec<Range<u64>>, MigrationError<D, T, W>> {
        let cfg = self.config.reconnect;
        if !matches!(
            error,
            Error::Send { .. } | Error::State { .. } | Error::Finish { .. }
        ) || cfg.attempts == 0
            || !self.transport.can_reconnect()
        {
            return Err(error);
        }
        let step = Step::Reconnect { round };
        let mut backoff = cfg.backoff;
        let mut last_attempt: Option<T::Error> = None;
        for attempt in 1..=cfg.attempts {
            tracing::warn!(round, attempt, ?backoff, error = %precopy_sys::error_chain(&error), "round failed: reconnecting");
            if self.watchdog().and_then(|w| w.sleep(backoff)).is_some() {
                return Err(self.step_error(step, None, |_, _| Error::Cancelled { step }));
            }
            match self.transport.reconnect() {
                // It says it can, yet it cannot: the round's error stands.
                None => return Err(error),
                Some(Ok(lacking)) => {
                    self.report.reconnects += 1;
                    return Ok(lacking);
                }
                Some(Err(e)) => {
                    if self.watchdog().and_then(Watchdog::fired).is_some() {
                        return Err(self.step_error(step, Some(e), |_, _| error));
                    }
                    tracing::warn!(round, attempt, error = %precopy_sys::error_chain(&e), "reconnecting failed");
                    last_attempt = Some(e);
                }
            }
            backoff = (backoff * 2).min(cfg.max_backoff);
        }
        let peer = self.transport.peer();
        match (error, last_attempt) {
            (
                Error::Send { peer, source, .. } | Error::Finish { peer, source },
                Some(last_attempt),
            ) => Err(Error::Reconnect {
                round,
                peer,
                attempts: cfg.attempts,
                last_attempt,
                source,
            }),
            (Error::State { source }, Some(last_attempt)) => Err(Error::Reconnect {
                round,
                peer,
                attempts: cfg.attempts,
                last_attempt,
                source,
            }),
            (error, _) => Err(error),
        }
    }

    fn throughput(&self) -> f64 {
        match self.last_throughput {
            Some(t) => t,
            None if self.sent_secs > 0.0 => self.sent_bytes as f64 / self.sent_secs,
            None => 0.0,
        }
    }

    fn expected(&self, pending: u64) -> Option<Duration> {
        let rate = self.meanwhile_rate();
        self.estimator.estimate(pending, rate).map(|e| e.total())
    }

    /// The dirty rate at which the workload keeps writing until the pause stops it: the last
    /// scan's; while a throttle is on, at least the last one's before it: a scan whose interval
    /// the throttle spent with the writers stopped finds little or nothing. What a workload
    /// writes between lifting its throttle for the pause and stopping is not in the estimate
    /// (a throttled writer is behind its pace and bursts): [`Workload::pause`] asks for the
    /// stop before it lifts the throttle (`ProcessControl` does, with a cgroup quota and with
    /// its duty cycle).
    fn meanwhile_rate(&self) -> f64 {
        if self.throttle > 0.0 {
            self.report.dirty_rate.max(self.unthrottled_rate)
        } else {
            self.report.dirty_rate
        }
    }

    /// Tells the estimate what the final phase would re-read if it started now with `pending`
    /// (sorted, coalesced) to send: memory the dirty log cannot vouch for outside `pending`
    /// (the verify pass) and the transport's full final check. Measures the cost per byte
    /// once, with the workload running, if that is needed and no pause probe measured it.
    fn prepare_rereads(&mut self, pending: &[Range<u64>]) {
        let mut unvouched = self.log.unvouched();
        coalesce(&mut unvouched);
        let verify: u64 = outside(&unvouched, pending)
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        let full = self.transport.finish_reread_bytes();
        self.estimator.set_rereads(verify, full);
        if (verify > 0 || full > 0) && self.estimator.reread_samples() == 0 {
            self.sample_reread(pending);
        }
    }

    /// Inside a pause probe, with the workload paused as in the final phase: what finishing
    /// costs there (the acknowledgement's round trip and digests) and, where the final phase
    /// re-reads memory, what that costs per byte (`pending`: what the final round would send
    /// anyway). Failures are only logged (the next round meets a broken connection and deals
    /// with it). Takes [`PAUSED_FINISH_PROBES`] finish probes and returns their times.
    fn rehearse_finish(
        &mut self,
        pending: &[Range<u64>],
    ) -> [Option<Duration>; PAUSED_FINISH_PROBES] {
        let mut took = [None; PAUSED_FINISH_PROBES];
        for t in &mut took {
            match self.transport.probe_finish() {
                Ok(Some(probe)) => {
                    self.estimator.add_paused_finish(probe);
                    *t = Some(probe);
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "probing the final acknowledgement inside a pause probe failed");
                    break;
                }
            }
        }
        self.sample_reread(pending);
        took
    }

    /// Times [`Transport::changed`] on at most [`REREAD_SAMPLE`] bytes spread over the memory
    /// the final phase re-reads (the unvouched memory outside `pending` (any order), as the
    /// verify pass reads it, else all memory for a full final check), for the estimate's cost
    /// per byte and the share the verify pass finds changed. What it finds is only counted:
    /// the verify pass in the final phase checks all of it again.
    fn sample_reread(&mut self, pending: &[Range<u64>]) {
        let mut memory = self.log.unvouched();
        coalesce(&mut memory);
        if !memory.is_empty() {
            let mut pending = pending.to_vec();
            coalesce(&mut pending);
            memory = outside(&memory, &pending);
        }
        if memory.is_empty() {
            if self.transport.finish_reread_bytes() == 0 {
                return;
            }
            memory = self.log.memory();
            coalesce(&mut memory);
        }
        let page = self.log.page_size().max(1);
        let sample = spread_sample(&memory, REREAD_SAMPLE, REREAD_PIECE.max(page), page);
        let bytes: u64 = sample.iter().map(|r| r.end - r.start).sum();
        let start = Instant::now();
        match self.transport.changed(&sample) {
            Ok(mut changed) => {
                let took = start.elapsed();
                let changed = coalesce(&mut changed);
                self.estimator.add_reread(bytes, took, changed);
            }
            Err(error) => {
                tracing::warn!(%error, "timing a re-read sample for the downtime estimate failed")
            }
        }
    }

    fn emit(&mut self, phase: Phase, pending: u64, dirty_rate: f64) {
        let p = Progress {
            phase,
            round: self.next_round(),
            pending_bytes: pending,
            throughput: self.throughput(),
            dirty_rate,
            throttle: self.throttle,
            expected_downtime: self.expected(pending),
            elapsed: self.started.map_or(Duration::ZERO, |s| s.elapsed()),
            memory_bytes: self.report.memory_bytes,
        };
        if let Some(f) = &mut self.progress {
            f(&p);
        }
    }

    /// Records a round and, for one that was sent (`Ok`), updates the throughput estimate.
    /// `Err`: the round failed part-way, with what was handed to the transport before that
    /// ([`Transport::sent_before_failure`]); nothing is learned from it.
    fn record(
        &mut self,
        kind: RoundKind,
        dirty_bytes: u64,
        scan: Duration,
        dirty_rate: f64,
        expected: Option<Duration>,
        sent: Result<RoundSent, RoundSent>,
    ) {
        let failed = sent.is_err();
        let interrupted = std::mem::take(&mut self.cut_unrecorded) && !failed;
        let sent = sent.unwrap_or_else(|part| part);
        let memory = (sent.pages + sent.zero_pages) * self.report.page_size;
        let throughput = per_sec(memory, sent.duration);
        // A round cut short says nothing about how long a whole one takes.
        if !failed && !interrupted {
            // A rehearsal was given to the estimator as one (`rehearse_send`).
            if matches!(kind, RoundKind::Full | RoundKind::Iterative) {
                self.estimator
                    .add_round(memory, sent.duration, kind == RoundKind::Iterative);
            }
            self.estimator.add_wire(memory, sent.bytes);
            self.sent_bytes += memory;
            self.sent_secs += sent.duration.as_secs_f64();
            if kind != RoundKind::Rehearsal && memory >= SIGNIFICANT_ROUND && throughput > 0.0 {
                self.last_throughput = Some(throughput);
            }
        }
        let seen = match kind {
            RoundKind::Full | RoundKind::Rehearsal => Observed::default(),
            _ => std::mem::take(&mut self.observed),
        };
        let r = RoundReport {
            collect_pause: seen.collect_pause,
            dirty_pages: seen.dirty_pages,
            scan_cpu: seen.scan_cpu,
            probe_scan: seen.probe_scan.map(|p| p.0),
            probe_scan_cpu: seen.probe_scan.and_then(|p| p.1),
            probe_check: seen.probe_check,
            probe_pause: seen.probe_pause,
            probe_finish: seen.probe_finish.iter().flatten().copied().collect(),
            failed,
            interrupted,
            // The final round runs with the workload paused: no rate of its own.
            workload_rate: seen.rate.filter(|_| kind != RoundKind::Final),
            workload_ns_per_op: seen.ns_per_op,
            round: self.next_round(),
            kind,
            dirty_bytes,
            scan,
            pages: sent.pages,
            zero_pages: sent.zero_pages,
            bytes: sent.bytes,
            duration: sent.duration,
            bandwidth: per_sec(sent.bytes, sent.duration),
            throughput,
            dirty_rate,
            expected_downtime: expected,
            throttle: self.throttle,
        };
        self.report.add_round(r);
    }

    fn limit(
        &self,
        policy: LimitPolicy,
        reason: AbortReason,
        switch: SwitchReason,
    ) -> Result<SwitchReason, MigrationError<D, T, W>> {
        match policy {
            LimitPolicy::SwitchOver => Ok(switch),
            LimitPolicy::Abort => Err(Error::Aborted { reason }),
        }
    }

    fn iterate(&mut self, start: Instant) -> Result<(), MigrationError<D, T, W>> {
        let memory = self.log.memory();
        let page = self.log.page_size();
        self.report.page_size = page;
        self.report.memory_bytes = memory.iter().map(|r| r.end - r.start).sum();
        self.report.status = Status::Active;

        self.log.start().map_err(|e| Error::Tracking {
            round: 0,
            source: e,
        })?;
        let mut last_scan = Instant::now();
        // How long the workload was held paused since `last_scan` (a log that needs a pause
        // around its collection, a pause probe): no page is written then, so that time is
        // not part of the interval the next scan's pages were written over.
        let mut held = Duration::ZERO;
        self.tracked_from = self.workload.counters().map(|c| (last_scan, c));
        self.last_counters = self.tracked_from;
        self.report.setup = start.elapsed();

        // The total timeout also ends a round in progress: under the abort policy it
        // interrupts the transport; under the switch-over policy it cuts the round short
        // (what it did not send goes in the final round, which starts at once).
        if let Some(limit) = self.config.timeout
            && let Some(w) = self.watchdog()
        {
            match self.config.timeout_policy {
                LimitPolicy::Abort => w.arm(start + limit, Step::Round { round: 0 }, limit),
                LimitPolicy::SwitchOver => {
                    w.arm_cut(start + limit);
                }
            }
        }

        // Round 0: everything. Ranges of a failed round are carried into the next one.
        let total = self.report.memory_bytes;
        self.emit(Phase::Full, total, 0.0);
        let mut carry: Vec<Range<u64>> = Vec::new();
        // Bytes of `carry` that a round cut short by the timeout left: pages not sent, not
        // written, so the next scan's dirty rate leaves them out.
        let mut cut_carry = 0u64;
        match self.send(Step::Round { round: 0 }, &memory) {
            Ok(sent) => {
                self.record(RoundKind::Full, total, Duration::ZERO, 0.0, None, Ok(sent));
                if let Some(unsent) = self.take_cut() {
                    self.unsent.clone_from(&unsent);
                    cut_carry = unsent.iter().map(|r| r.end - r.start).sum();
                    carry = unsent;
                } else {
                    self.probe_finish();
                }
            }
            Err(e) => {
                self.unsent = memory.clone();
                if let Some(part) = self.failed_send.take() {
                    self.record(RoundKind::Full, total, Duration::ZERO, 0.0, None, Err(part));
                }
                carry = self.reconnect(0, e)?;
                carry.extend(memory.iter().cloned());
            }
        }

        let mut pending: Vec<Range<u64>> = Vec::new();
        let mut high = 0u32;
        // Scans in a row that found nothing written, with nothing expected until the pause,
        // and the start of the time the first of them covered.
        let mut quiet = 0u32;
        let mut quiet_from = last_scan;
        loop {
            let reason = loop {
                let round = self.next_round();
                if let Some(w) = self.watchdog() {
                    w.step(Step::Round { round });
                }
                pending.clear();
                pending.append(&mut carry);
                let scan_start = Instant::now();
                let collected = self.collect(round, &mut pending, false)?;
                let scan = collected.wall;
                let scan_cpu = collected.cpu;
                // After the first scans a pause probe rehearses the final phase: pause, scan
                // (what was written since the scan just done, as the final scan finds), resume.
                // Not once the total timeout passed: the final round starts at once.
                let probe = self.config.probe_pause
                    && self.estimator.pause_probes() < PAUSE_PROBES
                    && !self.report.rounds.is_empty()
                    && self.config.timeout.is_none_or(|t| start.elapsed() < t);
                let probed = if probe {
                    match self.collect(round, &mut pending, true) {
                        Ok(p) => Some(p),
                        // The rehearsal round's send failed: as after any failed round, its
                        // pages (all still in `pending`) go again after a reconnect.
                        Err(e @ Error::Send { .. }) => {
                            self.observe(collected);
                            self.unsent = pending.clone();
                            if let Some(part) = self.failed_send.take() {
                                let kind = RoundKind::Rehearsal;
                                self.record(kind, 0, Duration::ZERO, 0.0, None, Err(part));
                            }
                            carry = self.reconnect(round, e)?;
                            carry.append(&mut pending);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                } else {
                    None
                };
                // The pages were written while the previous round was sent: the interval is at
                // least that round's duration as the transport measured it.
                let sent_for = self
                    .report
                    .rounds
                    .last()
                    .map_or(Duration::ZERO, |r| r.duration);
                let interval = scan_start
                    .duration_since(last_scan)
                    .saturating_sub(held)
                    .max(sent_for);
                let covered_from = last_scan;
                last_scan = scan_start;
                held = collected.pause.unwrap_or_default()
                    + probed.as_ref().and_then(|p| p.pause).unwrap_or_default();
                let pending_bytes = coalesce(&mut pending);
                self.observe(collected);
                // A rehearsal round sent some of the pages this scan found: they count for the
                // dirty rate, and the round is recorded before the one that sends the rest.
                let rehearsal = probed.as_ref().and_then(|p| p.rehearsal);
                let found = (pending_bytes + rehearsal.map_or(0, |r| r.0))
                    .saturating_sub(std::mem::take(&mut cut_carry));
                if let Some(p) = probed {
                    self.dirty_pages += p.pages;
                    self.observed.dirty_pages += p.pages;
                    self.observed.probe_scan = Some((p.wall, p.cpu));
                    self.estimator.add_probe_scan(p.wall, p.cpu);
                    self.observed.probe_check = p.check;
                    self.observed.probe_pause = p.probe_pause;
                    self.observed.probe_finish = p.finish;
                    if let Some(check) = p.check {
                        self.estimator.add_probe_check_scan(check);
                    }
                }
                let dirty_rate = self.dirty_window.add(found, interval, self.throttle);
                // Recorded with its whole sample, so that a cut one shows what it left.
                if let Some((_, sample, sent)) = rehearsal {
                    let kind = RoundKind::Rehearsal;
                    self.record(kind, sample, Duration::ZERO, dirty_rate, None, Ok(sent));
                }
                self.report.dirty_rate = dirty_rate;
                if self.throttle == 0.0 {
                    self.unthrottled_rate = dirty_rate;
                }
                self.estimator.add_scan(scan);
                if let Some(cpu) = scan_cpu {
                    self.estimator.add_scan_share(scan, cpu);
                }
                self.prepare_rereads(&pending);
                self.estimator.set_pacing(self.transport.pacing());
                let estimate = self
                    .estimator
                    .estimate(pending_bytes, self.meanwhile_rate());
                let expected = estimate.map(|e| e.total());
                self.emit(Phase::Iterating, pending_bytes, dirty_rate);

                if estimate.is_some_and(|e| e.bound() <= self.config.max_downtime) {
                    break SwitchReason::Converged;
                }
                quiet = if found == 0 && self.meanwhile_rate() == 0.0 && self.throttle == 0.0 {
                    if quiet == 0 {
                        quiet_from = covered_from;
                    }
                    quiet + 1
                } else {
                    0
                };
                // Nothing is written and the fixed costs alone exceed the limit: every further
                // round is empty and leaves the estimate as it is, so switch over now (the
                // limit is not met; the note says why) instead of at the round limit.
                let probed_all =
                    !self.config.probe_pause || self.estimator.pause_probes() >= PAUSE_PROBES;
                if quiet >= QUIET_ROUNDS
                    && scan_start.duration_since(quiet_from) >= QUIET_TIME
                    && probed_all
                    && estimate.is_some_and(|e| e.fixed_bound() > self.config.max_downtime)
                {
                    break SwitchReason::OutOfReach;
                }
                if self.live_rounds() >= self.config.max_rounds {
                    break self.limit(
                        self.config.max_rounds_policy,
                        AbortReason::MaxRounds {
                            rounds: self.live_rounds(),
                        },
                        SwitchReason::MaxRounds,
                    )?;
                }
                if let Some(limit) = self.config.timeout
                    && start.elapsed() >= limit
                {
                    break self.limit(
                        self.config.timeout_policy,
                        AbortReason::Timeout { limit },
                        SwitchReason::Timeout,
                    )?;
                }
                // A scan that found nothing while the fixed costs alone exceed the limit: the
                // next scan waits, so that the QUIET_ROUNDS it takes to give up cover
                // QUIET_TIME and the dirty rate of the last pages written ages out of its
                // window (a few pages written at the attach kept it above zero for 25 rounds
                // of 4 ms), instead of using up the round limit on empty rounds a few
                // milliseconds apart (`send --pid` of an idle process to an image with a 1 ms
                // limit: 31 rounds in 0.13 s, then `max-rounds`).
                if found == 0
                    && self.throttle == 0.0
                    && estimate.is_some_and(|e| e.fixed_bound() > self.config.max_downtime)
                {
                    let deadline = self.config.timeout.map(|t| start + t);
                    self.space_quiet_scans(scan_start, deadline);
                }
                self.maybe_throttle(dirty_rate, &mut high)?;

                let sent = match self.send(Step::Round { round }, &pending) {
                    Ok(sent) => sent,
                    Err(e) => {
                        self.unsent = pending.clone();
                        if let Some(part) = self.failed_send.take() {
                            let kind = RoundKind::Iterative;
                            self.record(kind, pending_bytes, scan, dirty_rate, expected, Err(part));
                        }
                        carry = self.reconnect(round, e)?;
                        carry.append(&mut pending);
                        continue;
                    }
                };
                self.record(
                    RoundKind::Iterative,
                    pending_bytes,
                    scan,
                    dirty_rate,
                    expected,
                    Ok(sent),
                );
                match self.take_cut() {
                    Some(unsent) => {
                        self.unsent.clone_from(&unsent);
                        cut_carry = unsent.iter().map(|r| r.end - r.start).sum();
                        carry = unsent;
                    }
                    None => self.probe_finish(),
                }
            };
            self.report.switch_reason = Some(reason);
            let p = pending.iter().map(|r| r.end - r.start).sum();
            self.estimator.set_pacing(self.transport.pacing());
            let estimate = self.estimator.estimate(p, self.meanwhile_rate());
            self.report.expected_downtime = estimate.map(|e| e.total());
            self.report.downtime_bound = estimate.map(|e| e.bound());
            self.report.downtime_estimate = estimate;
            if reason != SwitchReason::Converged {
                self.report.downtime_note = Some(self.why_not_converged(reason, estimate));
            }
            // Under the abort policy the total timeout ends the final round too: one expected
            // to outlast the time left would stop the workload for nothing.
            if let (Some(limit), LimitPolicy::Abort, Some(expected)) = (
                self.config.timeout,
                self.config.timeout_policy,
                self.report.expected_downtime,
            ) {
                let left = limit.saturating_sub(start.elapsed());
                if expected > left {
                    let note = format!(
                        "the final round, expected to take {expected:.1?}, cannot end in the {left:.1?} left before the timeout: aborted before pausing the workload"
                    );
                    tracing::warn!("{note}");
                    self.report.downtime_note = Some(note);
                    return Err(Error::Aborted {
                        reason: AbortReason::Timeout { limit },
                    });
                }
            }
            self.report.switchover_attempts += 1;
            match self.final_round(std::mem::take(&mut pending)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.record_failed_final();
                    carry = self.retry_switchover(e)?;
                }
            }
        }
    }

    /// After a final phase that failed with `error`: if its connection broke (or went silent)
    /// before the commit and switch-overs are left, resumes the workload, reconnects and
    /// returns what the next rounds must carry (the final round's ranges and what the
    /// destination lacks); otherwise `error`.
    fn retry_switchover(
        &mut self,
        error: MigrationError<D, T, W>,
    ) -> Result<Vec<Range<u64>>, MigrationError<D, T, W>> {
        let retry = matches!(
            error,
            Error::Send { .. } | Error::State { .. } | Error::Finish { .. }
        ) && self.report.switchover_attempts < self.config.switchover_attempts
            && self.transport.can_reconnect();
        if !retry {
            return Err(error);
        }
        // The final round's bound no longer applies; if it or a cancel fired, that stands.
        if self.watchdog().and_then(Watchdog::disarm).is_some() {
            return Err(error);
        }
        let round = self.next_round();
        tracing::warn!(
            round,
            attempt = self.report.switchover_attempts,
            error = %precopy_sys::error_chain(&error),
            "the final phase failed before the commit: resuming the workload and reconnecting"
        );
        if self.paused {
            self.workload.resume().map_err(|source| Error::Workload {
                action: "resume",
                source,
            })?;
            self.paused = false;
        }
        if let Some(at) = self.paused_at.take() {
            self.report.record_pause(at.elapsed());
        }
        let raised = self.final_raise.take();
        self.restore_priority(raised);
        self.report.status = Status::Active;
        let unsent = self.unsent.clone();
        let mut carry = self.reconnect(round, error)?;
        carry.extend(unsent);
        // The total timeout bounds the rounds again (abort), or cuts them short (switch-over).
        if let (Some(limit), Some(start), Some(w)) =
            (self.config.timeout, self.started, self.watchdog())
        {
            match self.config.timeout_policy {
                LimitPolicy::Abort => w.arm(start + limit, Step::Round { round }, limit),
                LimitPolicy::SwitchOver => {
                    w.arm_cut(start + limit);
                }
            }
        }
        Ok(carry)
    }

    /// Waits until [`QUIET_TIME`] / ([`QUIET_ROUNDS`] - 1) after the scan that started at
    /// `scan` (so the first and the last of QUIET_ROUNDS quiet scans are QUIET_TIME apart),
    /// but not past `deadline` (the total timeout) nor a cancel (which the next step reports).
    fn space_quiet_scans(&self, scan: Instant, deadline: Option<Instant>) {
        let gap = QUIET_TIME / QUIET_ROUNDS.saturating_sub(1).max(1);
        let mut wait = gap.saturating_sub(scan.elapsed());
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(Instant::now()));
        }
        match self.watchdog() {
            Some(w) => {
                w.sleep(wait);
            }
            None => std::thread::sleep(wait),
        }
    }

    /// Asks the transport what finishing would cost now (digests and the acknowledgement round
    /// trip), for the estimate. A failed probe is only logged: the next round meets the same
    /// broken connection and deals with it (reconnect, or the round's error).
    fn probe_finish(&mut self) {
        match self.transport.probe_finish() {
            Ok(Some(took)) => self.estimator.add_finish(took),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "probing the cost of the final acknowledgement failed")
            }
        }
    }

    /// Why the iteration ended without the expected downtime fitting the limit.
    fn why_not_converged(&self, reason: SwitchReason, e: Option<DowntimeEstimate>) -> String {
        let limit = ms(self.config.max_downtime);
        let what = match reason {
            SwitchReason::MaxRounds => {
                format!("the round limit ({}) was reached", self.config.max_rounds)
            }
            SwitchReason::Timeout => {
                let n = self.report.live_rounds();
                let cut = match self.report.rounds.iter().rfind(|r| r.interrupted) {
                    Some(r) if r.sent_all(self.report.page_size) => format!(
                        " (it cut round {} short after that round had sent all its pages)",
                        r.round
                    ),
                    Some(r) => format!(
                        " (it cut round {} short; what that round had not sent goes in the final round)",
                        r.round
                    ),
                    None => String::new(),
                };
                format!(
                    "the timeout forced the switch-over after {n} round(s) with the workload running{cut}"
                )
            }
            SwitchReason::Converged => "it converged".to_string(),
            SwitchReason::OutOfReach => format!(
                "nothing was written for {QUIET_ROUNDS} rounds (at least {} s), so more rounds cannot help: switched over",
                QUIET_TIME.as_secs()
            ),
        };
        let Some(e) = e else {
            if self.estimator.rereads_memory() && self.estimator.reread_samples() == 0 {
                return format!(
                    "{what} before the cost of re-reading memory while paused (verify pass or full final check) could be measured; limit {limit:.1} ms"
                );
            }
            return format!("{what} before any bandwidth was measured; limit {limit:.1} ms");
        };
        let finish = e.finish.max(e.finish_worst);
        let pause = e.pause.max(e.pause_worst);
        let scan = e.scan.max(e.scan_worst);
        let verify = e.verify.max(e.verify_worst);
        let full = e.full_check.max(e.full_check_worst);
        let cause = if ms(e.fixed_bound()) > limit {
            let mut rereads = String::new();
            if e.verify_bytes > 0 {
                rereads.push_str(&format!(
                    " + verify pass over {} the dirty log cannot vouch for {:.1}",
                    crate::report::bytes(e.verify_bytes as f64),
                    ms(verify)
                ));
            }
            if e.full_check_bytes > 0 {
                rereads.push_str(&format!(
                    " + full final check of {} on each end {:.1}",
                    crate::report::bytes(e.full_check_bytes as f64),
                    ms(full)
                ));
            }
            // The largest part, named with what it stands for.
            let parts = [
                (pause, "the pause (stopping the workload)".to_string()),
                (scan, "the final scan".to_string()),
                (e.check_bound(), "the pause check's scans".to_string()),
                (finish, {
                    let peer = self.transport.peer();
                    match self.transport.finish_work() {
                        Some(work) => format!("the finish at {peer} ({work})"),
                        None => format!(
                            "the finish (digests and the acknowledgement round trip to {peer})"
                        ),
                    }
                }),
                (verify, "the verify pass".to_string()),
                (full, "the full final check".to_string()),
            ];
            let largest = parts.iter().max_by_key(|p| p.0);
            // The final round's send can outweigh every fixed part even so: it is named too.
            let send = match largest {
                Some((d, _)) if e.send_worst > *d => format!(
                    "; the final round's send, up to {:.1} ms, is larger still",
                    ms(e.send_worst)
                ),
                _ => String::new(),
            };
            let largest = largest
                .map(|(d, what)| format!("; the largest is {what}, {:.1} ms{send}", ms(*d)))
                .unwrap_or_default();
            format!(
                "the fixed costs alone (pause {:.1} + scan {:.1} + {:.1} ms per round + pause check {:.1} + finish {:.1}{rereads}) exceed it{largest}",
                ms(pause),
                ms(scan),
                ms(e.fixed),
                ms(e.check_bound()),
                ms(finish)
            )
        } else {
            // The estimate's own figures: what it would send, in how long at which rate (the
            // rate those two imply), the bound with what it stands for, and the rate at which
            // it expects pages to be written until the pause.
            let total = e.pending_bytes + e.meanwhile_bytes;
            let rate = match e.send.as_secs_f64() {
                s if s > 0.0 => format!(" at {}/s", crate::report::bytes(total as f64 / s)),
                _ => String::new(),
            };
            let bound = if e.send_from == "rehearsals" {
                format!(
                    "at the slowest rehearsal's {}/s",
                    crate::report::bytes(e.rehearsed_worst_throughput)
                )
            } else {
                "no faster than the slowest recent round, nor shorter than the shortest measured round of as many bytes".to_string()
            };
            // Only more rounds could have shrunk the pending set: a timeout left no time.
            let why = match reason {
                SwitchReason::Timeout => "",
                _ => ": the pending set does not shrink to what fits",
            };
            format!(
                "the final round would send {} ({} pending + {} written until paused at {}/s): {:.1} ms expected{rate}, at most {:.1} ms ({bound}){why}",
                crate::report::bytes(total as f64),
                crate::report::bytes(e.pending_bytes as f64),
                crate::report::bytes(e.meanwhile_bytes as f64),
                crate::report::bytes(e.meanwhile_rate),
                ms(e.send),
                ms(e.send_worst),
            )
        };
        format!(
            "{what} with {:.1} ms expected, {:.1} ms at most (×{:.2} margin), against a limit of {limit:.1} ms: {cause}",
            ms(e.total()),
            ms(e.bound()),
            e.margin
        )
    }

    /// After the final round: which parts of the downtime overshot the limit.
    fn why_over_limit(&self, downtime: Duration, actual: &FinalPhase) -> Option<String> {
        if downtime <= self.config.max_downtime {
            return None;
        }
        let mut parts = Vec::new();
        if let Some(e) = self.report.downtime_estimate {
            let mut over = |name: &str, got: Duration, want: Duration| {
                if got > want {
                    parts.push(format!(
                        "{name} {:.1} ms (expected {:.1})",
                        ms(got),
                        ms(want)
                    ));
                }
            };
            over("pause", actual.pause, e.pause);
            over("scan", actual.scan, e.scan);
            if e.verify_bytes > 0 {
                over("verify pass", actual.verify, e.verify);
            }
            over("send", actual.send, e.send);
            over("pause check", actual.check, e.check);
            if !e.finish.is_zero() || e.full_check_bytes > 0 {
                over("checksum/ack", actual.finish, e.finish + e.full_check);
            }
            if e.verify_bytes == 0 && !actual.verify.is_zero() {
                parts.push(format!(
                    "verify pass {:.1} ms (not estimated)",
                    ms(actual.verify)
                ));
            }
            if e.finish.is_zero() && e.full_check_bytes == 0 {
                parts.push(format!(
                    "checksum/ack {:.1} ms (not estimated)",
                    ms(actual.finish)
                ));
            }
            if actual.state >= Duration::from_millis(1) {
                parts.push(format!("state {:.1} ms (not estimated)", ms(actual.state)));
            }
        }
        let mut note = format!(
            "downtime {:.1} ms exceeded the limit of {:.1} ms",
            ms(downtime),
            ms(self.config.max_downtime)
        );
        if !parts.is_empty() {
            note.push_str(": ");
            note.push_str(&parts.join(", "));
        }
        Some(note)
    }

    fn maybe_throttle(
        &mut self,
        dirty_rate: f64,
        high: &mut u32,
    ) -> Result<(), MigrationError<D, T, W>> {
        let t = self.config.throttle;
        if !t.enabled {
            return Ok(());
        }
        if dirty_rate < t.trigger_ratio * self.throughput() {
            *high = 0;
            return Ok(());
        }
        *high += 1;
        if *high < t.trigger_rounds {
            return Ok(());
        }
        *high = 0;
        let next = if self.throttle == 0.0 {
            t.initial
        } else {
            (self.throttle + t.increment).min(t.max)
        };
        if next > self.throttle {
            self.workload
                .set_throttle(next)
                .map_err(|source| Error::Workload {
                    action: "throttle",
                    source,
                })?;
            tracing::info!(throttle = next, dirty_rate, "raising the throttle");
            self.throttle = next;
            self.report.throttle = self.report.throttle.max(next);
        }
        Ok(())
    }

    /// The pause check (see the crate docs): scans the dirty log again with the workload
    /// supposedly paused. `sent_ranges` is what this final round sent so far (kept in
    /// [`Migration::unsent`] with whatever the scan finds, until the commit). With `may_send`,
    /// pages found are sent in this final round (`sent` adds them up) after pausing the
    /// workload again, and the scan repeats, at most [`PAUSE_CHECK_SENDS`] times; without, any
    /// page found fails. `check` accumulates what it did.
    fn check_paused(
        &mut self,
        round: u64,
        sent_ranges: &mut Vec<Range<u64>>,
        sent: &mut RoundSent,
        check: &mut PauseCheck,
        may_send: bool,
    ) -> Result<(), MigrationError<D, T, W>> {
        let start = Instant::now();
        let result = self.check_paused_loop(round, sent_ranges, sent, check, may_send);
        check.duration += start.elapsed();
        self.report.pause_check = Some(*check);
        result
    }

    fn check_paused_loop(
        &mut self,
        round: u64,
        sent_ranges: &mut Vec<Range<u64>>,
        sent: &mut RoundSent,
        check: &mut PauseCheck,
        may_send: bool,
    ) -> Result<(), MigrationError<D, T, W>> {
        let page = self.log.page_size().max(1);
        loop {
            if let Some(w) = self.watchdog() {
                w.step(Step::PauseCheck);
            }
            self.check_fired(Step::PauseCheck)?;
            // What was sent stays pending with what the scan finds until the commit.
            let mut all = sent_ranges.clone();
            let before = all.len();
            self.collect(round, &mut all, false)?;
            check.scans += 1;
            let mut found = all.split_off(before);
            let found_bytes = coalesce(&mut found);
            if found_bytes == 0 {
                return Ok(());
            }
            let pages = found_bytes / page;
            check.pages += pages;
            self.dirty_pages += pages;
            let can_send = may_send && check.scans <= PAUSE_CHECK_SENDS;
            tracing::warn!(
                pages,
                scans = check.scans,
                "the source ran during the final round: {pages} page(s) written after the final scan {}",
                if can_send {
                    "were found: pausing it again and sending them"
                } else {
                    "were found: the migration fails and the destination is not told to commit"
                }
            );
            if !can_send {
                return Err(Error::NotPaused {
                    pages: check.pages,
                    scans: check.scans,
                    before_commit: !may_send,
                });
            }
            // Pausing a paused workload is harmless; one resumed from outside stops again.
            self.workload.pause().map_err(|source| Error::Workload {
                action: "pause",
                source,
            })?;
            let more = self.send(Step::PauseCheck, &found)?;
            check.sent_pages += pages;
            sent.pages += more.pages;
            sent.zero_pages += more.zero_pages;
            sent.bytes += more.bytes;
            sent.duration += more.duration;
            if let Some(a) = &mut self.final_attempt {
                a.bytes += found_bytes;
                a.sent = Some(*sent);
            }
            sent_ranges.extend(found);
            coalesce(sent_ranges);
        }
    }

    fn final_round(&mut self, mut pending: Vec<Range<u64>>) -> Result<(), MigrationError<D, T, W>> {
        let round = self.next_round();
        // The total timeout no longer applies; a deadline that already passed ends it here.
        // No round of the final phase is cut short: the cut is disarmed, then lifted.
        if let Some(w) = self.watchdog() {
            w.disarm();
            w.disarm_cut();
        }
        self.transport.uncut();
        self.check_fired(Step::FinalRound)?;
        self.report.status = Status::Completing;
        let pending_bytes: u64 = pending.iter().map(|r| r.end - r.start).sum();
        self.emit(Phase::Final, pending_bytes, self.report.dirty_rate);
        // With no downtime estimated (no round measured whole: round 0 was cut short by the
        // timeout), a paced transport's time for the pending bytes stands for it: the
        // default bound of 5 s failed such a final round at 64 KiB/s by design.
        let expected =
            (self.report.expected_downtime).or_else(|| self.estimator.paced_send(pending_bytes));
        let mut bound = self.config.final_round_bound(expected);
        // Raised before the clock starts, as in the pause probes, whose pauses the expected
        // pause comes from: the workload runs on meanwhile, so it is no downtime. The raise
        // lists and raises 6-7 threads (traced: 0.04-0.17 ms, the driver a normal task until
        // its own raise); counted, it made the final pause dearer than every probe's. Restored
        // after the acknowledgement, before the workload resumes; when the phase fails, only
        // once the workload is resumed (`recover`, `retry_switchover`): put back first, the
        // driver waited for a CPU before it could resume it, far past the bound.
        self.final_raise = self.raise_priority();
        let paused_at = Instant::now();
        // Under the abort policy the total timeout bounds the final round too: whichever
        // comes first ends it.
        let mut limit = bound;
        if let (Some(total), LimitPolicy::Abort, Some(start)) = (
            self.config.timeout,
            self.config.timeout_policy,
            self.started,
        ) {
            let left = (start + total).saturating_duration_since(paused_at);
            if left < bound {
                bound = left;
                limit = total;
            }
        }
        self.report.final_round_bound = Some(bound);
        self.paused_at = Some(paused_at);
        if let Some(w) = self.watchdog() {
            w.arm(paused_at + bound, Step::FinalRound, limit);
        }
        self.workload.pause().map_err(|source| Error::Workload {
            action: "pause",
            source,
        })?;
        self.paused = true;
        let pause = paused_at.elapsed();
        self.report.pause_priority = self.workload.pause_priority();

        let collected = self.collect(round, &mut pending, false)?;
        let scan = collected.wall;
        // This round sends the pages of the last iterative scan and of this one: it reports
        // both, and the last iterative collection's pause if it needed one.
        let last_live = self.observed;
        self.observe(collected);
        self.observed.dirty_pages += last_live.dirty_pages;
        self.observed.collect_pause = last_live.collect_pause;
        self.record_workload();
        coalesce(&mut pending);

        // Memory the log cannot vouch for: compare it with what was sent, now that nothing
        // runs, and send what differs in this same round.
        let mut unvouched = self.log.unvouched();
        let verify = if unvouched.is_empty() {
            None
        } else {
            // Pages already pending are read and sent in this round anyway: skip them.
            let checked_bytes: u64 = unvouched.iter().map(|r| r.end - r.start).sum();
            coalesce(&mut unvouched);
            let to_check = outside(&unvouched, &pending);
            let verify_start = Instant::now();
            if let Some(w) = self.watchdog() {
                w.step(Step::Verify);
            }
            let changed = self.transport.changed(&to_check);
            let mut changed = changed.map_err(|source| {
                self.step_error(Step::Verify, Some(source), |_, source| Error::Verify {
                    source,
                })
            })?;
            let changed_bytes = coalesce(&mut changed);
            pending.extend(changed);
            Some(VerifyPass {
                checked_bytes,
                reread_bytes: to_check.iter().map(|r| r.end - r.start).sum(),
                changed_bytes,
                duration: verify_start.elapsed(),
            })
        };
        let bytes = coalesce(&mut pending);
        self.unsent.clone_from(&pending);
        self.final_attempt = Some(FinalAttempt {
            bytes,
            scan,
            sent: None,
        });

        self.transport.expect_final_round();
        let mut sent = self.send(Step::FinalRound, &pending)?;
        let send_time = sent.duration;
        if let Some(a) = &mut self.final_attempt {
            a.sent = Some(sent);
        }
        // Did the workload stay paused? Pages written since the final scan go in this round.
        let mut check = PauseCheck::default();
        self.check_paused(round, &mut pending, &mut sent, &mut check, true)?;
        if let Some(w) = self.watchdog() {
            w.step(Step::State);
        }
        self.check_fired(Step::State)?;
        let state_start = Instant::now();
        let state = self
            .workload
            .save_state()
            .map_err(|source| Error::Workload {
                action: "save the state of",
                source,
            })?;
        self.transport.send_state(&state).map_err(|source| {
            self.step_error(Step::State, Some(source), |_, source| Error::State {
                source,
            })
        })?;
        self.report.state_bytes = Some(state.len() as u64);
        let state_time = state_start.elapsed();
        if let Some(w) = self.watchdog() {
            w.step(Step::Acknowledge);
        }
        let finish_start = Instant::now();
        let (checksum, checksum_time) = self.transport.finish().map_err(|source| {
            self.step_error(Step::Acknowledge, Some(source), |peer, source| {
                Error::Finish { peer, source }
            })
        })?;
        // The last look, right before the commit: a write since the check above (during the
        // state or the acknowledgement) cannot be sent any more, so it fails the migration.
        let look_start = Instant::now();
        self.check_paused(round, &mut pending, &mut sent, &mut check, false)?;
        let look = look_start.elapsed();
        // The acknowledgement counts only if it came within the bound: disarming decides.
        if self.watchdog().and_then(Watchdog::disarm).is_some() {
            return Err(
                self.step_error(Step::Acknowledge, None, |_, _| Error::Cancelled {
                    step: Step::Acknowledge,
                }),
            );
        }
        self.transport.commit().map_err(|source| Error::Finish {
            peer: self.transport.peer(),
            source,
        })?;
        let finish = finish_start.elapsed().saturating_sub(look);
        let downtime = paused_at.elapsed();
        self.unsent.clear();

        let expected = self.report.expected_downtime;
        let dirty_rate = self.report.dirty_rate;
        self.final_attempt = None;
        self.record(
            RoundKind::Final,
            bytes + check.sent_pages * self.report.page_size,
            scan,
            dirty_rate,
            expected,
            Ok(sent),
        );
        self.report.record_pause(downtime);
        self.report.checksum = Some(checksum);
        self.report.verify = verify;
        let phase = FinalPhase {
            pause,
            scan,
            scan_cpu: collected.cpu,
            verify: verify.map_or(Duration::ZERO, |v| v.duration),
            send: send_time,
            check: check.duration,
            state: state_time,
            checksum: checksum_time,
            finish,
        };
        self.report.final_phase = Some(phase);
        if let Some(over) = self.why_over_limit(downtime, &phase) {
            self.report.downtime_note = Some(match self.report.downtime_note.take() {
                Some(before) => format!("{before}; {over}"),
                None => over,
            });
        }
        self.report.status = Status::Completed;
        let raised = self.final_raise.take();
        self.restore_priority(raised);

        if self.throttle > 0.0 {
            if let Err(e) = self.workload.set_throttle(0.0) {
                tracing::warn!(error = %e, "lifting the throttle after the migration failed");
            }
            self.throttle = 0.0;
        }
        if self.config.after == AfterMigration::Resume {
            self.workload.resume().map_err(|source| Error::Workload {
                action: "resume",
                source,
            })?;
            self.paused = false;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // each test changes a few knobs of the default
mod tests {
    use super::*;
    use crate::control::{Callbacks, WorkloadCounters};
    use precopy_backends::CollectStats;
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    const PAGE: u64 = 4096;
    const MEM: u64 = 1024 * PAGE;

    thread_local! {
        /// Whether [`workload`]'s writers are paused (the driver calls it on the test's thread).
        static PAUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// [`workload`]'s pauses so far.
        static PAUSES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// Hands out `scans[i]` on the i-th scan; past the end, the last scan again if `repeat`,
    /// else nothing. A paused [`workload`] writes nothing: a scan after the first one since
    /// the pause (the pause check's) finds nothing and does not count, except
    /// `written_while_paused`, found once by the first such scan (a writer the pause missed).
    struct ScriptLog {
        scans: Vec<Vec<Range<u64>>>,
        repeat: bool,
        calls: usize,
        /// How long each scan takes (slept).
        scan_time: Duration,
        /// The pause ([`PAUSES`]) during which it last scanned.
        scanned_in_pause: Option<u64>,
        written_while_paused: Option<Range<u64>>,
    }

    impl ScriptLog {
        /// `script[i]` pages (from page 0) dirty on the i-th scan; the last value repeats.
        fn pages(script: Vec<u64>) -> ScriptLog {
            let scans = script
                .into_iter()
                .map(|n| if n > 0 { vec![0..n * PAGE] } else { Vec::new() })
                .collect();
            ScriptLog {
                scans,
                repeat: true,
                calls: 0,
                scan_time: Duration::ZERO,
                scanned_in_pause: None,
                written_while_paused: None,
            }
        }

        /// These ranges on successive scans, then nothing.
        fn ranges(scans: Vec<Vec<Range<u64>>>) -> ScriptLog {
            ScriptLog {
                scans,
                repeat: false,
                calls: 0,
                scan_time: Duration::ZERO,
                scanned_in_pause: None,
                written_while_paused: None,
            }
        }
    }

    impl DirtyLog for ScriptLog {
        type Error = std::io::Error;
        fn memory(&self) -> Vec<Range<u64>> {
            vec![0..MEM]
        }
        fn page_size(&self) -> u64 {
            PAGE
        }
        fn unvouched(&self) -> Vec<Range<u64>> {
            Vec::new()
        }
        fn start(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn stop(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn collect(&mut self, out: &mut Vec<Range<u64>>) -> std::io::Result<CollectStats> {
            let first = out.len();
            if PAUSED.get() {
                if self.scanned_in_pause == Some(PAUSES.get()) {
                    out.extend(self.written_while_paused.take());
                    return Ok(CollectStats::count(&out[first..], PAGE));
                }
                self.scanned_in_pause = Some(PAUSES.get());
            }
            let i = if self.repeat {
                self.calls.min(self.scans.len().saturating_sub(1))
            } else {
                self.calls
            };
            if let Some(s) = self.scans.get(i) {
                out.extend(s.iter().cloned());
            }
            self.calls += 1;
            std::thread::sleep(self.scan_time);
            Ok(CollectStats::count(&out[first..], PAGE))
        }
    }

    /// Pretends to move `rate` bytes per second; fails at round `fail_at`.
    struct FakeLink {
        rate: f64,
        /// Added to every round's duration.
        fixed: Duration,
        round: u64,
        fail_at: Option<u64>,
        finished: bool,
        state: Option<Vec<u8>>,
        /// What [`Transport::probe_finish`] answers; the probes taken.
        probe: Option<Duration>,
        probes: u32,
        /// While this flag is set (the workload is paused), probes answer this instead; the
        /// probes taken so.
        probe_paused: Option<(Arc<AtomicBool>, Duration)>,
        paused_probes: u32,
        /// What [`Transport::finish_work`] answers.
        finish_work: Option<&'static str>,
        /// What the first probes answer (paused or not), one each, before the rules above.
        probe_first: Vec<Duration>,
    }

    impl Transport for FakeLink {
        type Error = io::Error;
        fn finish_work(&self) -> Option<String> {
            self.finish_work.map(String::from)
        }
        fn probe_finish(&mut self) -> Result<Option<Duration>, io::Error> {
            self.probes += 1;
            if !self.probe_first.is_empty() {
                return Ok(Some(self.probe_first.remove(0)));
            }
            if let Some((paused, took)) = &self.probe_paused
                && paused.load(Ordering::SeqCst)
            {
                self.paused_probes += 1;
                return Ok(Some(*took));
            }
            Ok(self.probe)
        }
        fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, io::Error> {
            if self.fail_at == Some(self.round) {
                return Err(io::Error::other("peer went away"));
            }
            self.round += 1;
            let bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            Ok(RoundSent {
                pages: bytes / PAGE,
                zero_pages: 0,
                bytes,
                duration: Duration::from_secs_f64(bytes as f64 / self.rate + 1e-3) + self.fixed,
            })
        }
        fn send_state(&mut self, state: &[u8]) -> Result<(), io::Error> {
            self.state = Some(state.to_vec());
            Ok(())
        }
        fn finish(&mut self) -> Result<(u64, Duration), io::Error> {
            self.finished = true;
            Ok((0xabcd, Duration::ZERO))
        }
    }

    fn workload(events: &Arc<Mutex<Vec<String>>>) -> Callbacks<std::convert::Infallible> {
        let (a, b, c) = (events.clone(), events.clone(), events.clone());
        Callbacks::new(
            move || {
                PAUSED.set(true);
                PAUSES.set(PAUSES.get() + 1);
                a.lock().unwrap().push("pause".into());
                Ok(())
            },
            move || {
                PAUSED.set(false);
                b.lock().unwrap().push("resume".into());
                Ok(())
            },
        )
        .with_throttle(move |f| {
            c.lock().unwrap().push(format!("throttle {f:.1}"));
            Ok(())
        })
    }

    fn link(rate: f64) -> FakeLink {
        FakeLink {
            rate,
            fixed: Duration::ZERO,
            round: 0,
            fail_at: None,
            finished: false,
            state: None,
            probe: None,
            probes: 0,
            probe_paused: None,
            paused_probes: 0,
            finish_work: None,
            probe_first: Vec::new(),
        }
    }

    /// A review: an image's first finish probes (the sync of round 0's 1 GiB, the only sync
    /// measured yet: 609 ms) bounded the finish for the rest of the migration, so 30 rounds
    /// of 1-20 ms ran out against a 50 ms limit (downtime 7.3 ms). Now the bound forgets them
    /// once newer probes replace them, and the migration converges.
    #[test]
    fn a_slow_first_finish_probe_followed_by_fast_ones_converges() {
        let link = FakeLink {
            probe: Some(Duration::from_millis(2)),
            // After round 0 and both inside the first pause probe.
            probe_first: vec![Duration::from_millis(609); 3],
            ..link(100.0 * 1024.0 * 1024.0)
        };
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(50);
        cfg.throttle.enabled = false;
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![400, 100, 20, 5, 2]);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(
            report.switch_reason,
            Some(SwitchReason::Converged),
            "{report}"
        );
        assert!(report.downtime_note.is_none(), "{report}");
        let e = report.downtime_estimate.expect("an estimate");
        assert_eq!(e.finish_worst, Duration::from_millis(2));
        assert!(report.downtime_bound.unwrap() <= cfg.max_downtime);
        // It waited for the slow probes to leave the window, no longer.
        let live = report
            .rounds
            .iter()
            .filter(|r| matches!(r.kind, RoundKind::Full | RoundKind::Iterative))
            .count();
        assert!(live < 10, "{live} rounds: {report}");
    }

    /// A workload whose pause and resume set and clear `paused` (and [`PAUSED`], so a
    /// [`ScriptLog`] finds nothing in a pause check).
    fn flagged_workload(paused: &Arc<AtomicBool>) -> Callbacks<std::convert::Infallible> {
        let (a, b) = (paused.clone(), paused.clone());
        Callbacks::new(
            move || {
                PAUSED.set(true);
                PAUSES.set(PAUSES.get() + 1);
                a.store(true, Ordering::SeqCst);
                Ok(())
            },
            move || {
                PAUSED.set(false);
                b.store(false, Ordering::SeqCst);
                Ok(())
            },
        )
    }

    #[test]
    fn the_acknowledgement_is_expected_from_probes_taken_with_the_workload_paused() {
        // Between rounds, beside the running workload, a round trip takes 30 ms; inside the
        // pause probes, with the workload paused as for the real acknowledgement, 2 ms.
        let paused = Arc::new(AtomicBool::new(false));
        let link = FakeLink {
            probe: Some(Duration::from_millis(30)),
            probe_paused: Some((paused.clone(), Duration::from_millis(2))),
            ..link(1024.0 * 1024.0)
        };
        let log = ScriptLog::pages(vec![400, 100, 20, 5, 2]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(100);
        cfg.throttle.enabled = false;
        let mut m = Migration::new(log, link, flagged_workload(&paused), cfg);
        let report = m.run().unwrap();
        let e = report.downtime_estimate.expect("an estimate");
        // The expected part is what the paused probes measured; the bound keeps the slowest
        // probe of all, the ones beside the running workload included.
        assert_eq!(e.finish, Duration::from_millis(2));
        assert_eq!(e.finish_worst, Duration::from_millis(30));
        assert_eq!(report.expected_downtime, Some(e.total()));
        // Two finish probes inside each pause probe, taken while paused, each reported.
        let probed: Vec<_> = report
            .rounds
            .iter()
            .filter(|r| r.probe_scan.is_some())
            .collect();
        assert_eq!(probed.len(), PAUSE_PROBES);
        for r in &probed {
            assert_eq!(r.probe_finish, vec![Duration::from_millis(2); 2]);
            assert!(r.probe_pause.is_some());
        }
        let probes = (probed.len() * PAUSED_FINISH_PROBES) as u32;
        let (_, link, _) = m.into_parts();
        assert_eq!(link.paused_probes, probes);
        // And one between rounds after round 0 and each iterative round, as before.
        let iterative = report
            .rounds
            .iter()
            .filter(|r| r.kind == RoundKind::Iterative)
            .count() as u32;
        assert_eq!(link.probes, probes + 1 + iterative);
        assert!(
            report
                .rounds
                .iter()
                .all(|r| r.probe_scan.is_some() || r.probe_finish.is_empty()),
            "only a pause probe takes finish probes with the workload paused"
        );
    }

    /// A [`FakeLink`] with a thread of its own ([`Transport::threads`]) that notes, for every
    /// round, whether the workload was paused, the sending thread's and its own thread's
    /// scheduling policy, and the ranges.
    struct Watched {
        link: FakeLink,
        paused: Arc<AtomicBool>,
        helper: Tid,
        sends: Vec<(
            bool,
            sched::ThreadPolicy,
            sched::ThreadPolicy,
            Vec<Range<u64>>,
        )>,
        /// Per round: the real-time priorities of this process's watchdog threads (tests run
        /// in parallel, each migration has one).
        watchdogs: Vec<Vec<i32>>,
    }

    /// The real-time priorities of this process's threads named `precopy-watchdog` (0 for a
    /// time-sharing one).
    fn watchdog_priorities() -> Vec<i32> {
        sched::process_threads(std::process::id() as i32)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| {
                std::fs::read_to_string(format!("/proc/self/task/{t}/comm"))
                    // The kernel keeps 15 bytes of a thread's name.
                    .is_ok_and(|c| c.trim_end() == "precopy-watchdo")
            })
            .filter_map(|t| sched::thread_policy(t).ok())
            .map(|p| if p.is_realtime() { p.priority } else { 0 })
            .collect()
    }

    impl Transport for Watched {
        type Error = io::Error;
        fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, io::Error> {
            self.watchdogs.push(watchdog_priorities());
            self.sends.push((
                self.paused.load(Ordering::SeqCst),
                sched::thread_policy(sched::gettid())?,
                sched::thread_policy(self.helper)?,
                ranges.to_vec(),
            ));
            self.link.send_round(ranges)
        }
        fn send_state(&mut self, state: &[u8]) -> Result<(), io::Error> {
            self.link.send_state(state)
        }
        fn finish(&mut self) -> Result<(u64, Duration), io::Error> {
            self.link.finish()
        }
        fn threads(&self) -> Vec<Tid> {
            vec![self.helper]
        }
    }

    /// Runs a migration of 800 scattered pages written every round over a 1 MiB/s link with 50 ms per
    /// round, 4 rounds with the workload running, with `priority`; gives its report and what
    /// the link saw, and the policies of the driver's thread and the link's before the run.
    fn watched_run(
        priority: FinalPriority,
    ) -> (
        MigrationReport,
        Watched,
        (sched::ThreadPolicy, sched::ThreadPolicy),
    ) {
        let paused = Arc::new(AtomicBool::new(false));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let helper = std::thread::spawn(move || {
            tid_tx.send(sched::gettid()).unwrap();
            let _ = stop_rx.recv();
        });
        let helper_tid = tid_rx.recv().unwrap();
        let before = (
            sched::thread_policy(sched::gettid()).unwrap(),
            sched::thread_policy(helper_tid).unwrap(),
        );
        let link = Watched {
            link: FakeLink {
                fixed: Duration::from_millis(50),
                ..link(1024.0 * 1024.0)
            },
            paused: paused.clone(),
            helper: helper_tid,
            sends: Vec::new(),
            watchdogs: Vec::new(),
        };
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(100);
        cfg.max_rounds = 4;
        cfg.throttle.enabled = false;
        cfg.final_priority = priority;
        // Every scan finds pages 0..800 written, each a run of its own (scattered writes).
        let log = ScriptLog {
            repeat: true,
            ..ScriptLog::ranges(vec![(0..800).map(|p| p * PAGE..(p + 1) * PAGE).collect()])
        };
        let mut m = Migration::new(log, link, flagged_workload(&paused), cfg);
        let report = m.run().unwrap();
        let (_, link, _) = m.into_parts();
        // After the run, both threads are as they were.
        assert_eq!(sched::thread_policy(sched::gettid()).unwrap(), before.0);
        assert_eq!(sched::thread_policy(helper_tid).unwrap(), before.1);
        stop_tx.send(()).unwrap();
        helper.join().unwrap();
        (report, link, before)
    }

    #[test]
    fn rehearsals_send_a_spread_sample_paused_and_decide_the_expected_send() {
        let (report, link, _) = watched_run(FinalPriority::Realtime(1));
        let kinds: Vec<RoundKind> = report.rounds.iter().map(|r| r.kind).collect();
        use RoundKind::{Final, Full, Iterative, Rehearsal};
        // A rehearsal inside each of the three pause probes, before rounds 1, 2 and 3; the
        // round limit counts the rounds with the workload running only.
        assert_eq!(
            kinds,
            vec![
                Full, Rehearsal, Iterative, Rehearsal, Iterative, Rehearsal, Iterative, Final
            ]
        );
        assert_eq!(link.sends.len(), kinds.len());
        for (i, (kind, send)) in kinds.iter().zip(&link.sends).enumerate() {
            let paused = matches!(kind, Rehearsal | Final);
            assert_eq!(send.0, paused, "round {i}: sent with the workload paused");
        }
        for i in [1, 3, 5] {
            let sample = &link.sends[i].3;
            // A quarter of the 800 pending pages, whole runs (here single pages) spread evenly
            // over all of them: every fourth.
            assert_eq!(sample.len(), 200);
            for (k, r) in sample.iter().enumerate() {
                let page = 4 * k as u64 + 3;
                assert_eq!(*r, page * PAGE..(page + 1) * PAGE);
            }
            // The round after it sends the rest of the pending pages, and only those.
            let rest = &link.sends[i + 1].3;
            let mut all: Vec<Range<u64>> = rest.iter().chain(sample).cloned().collect();
            let bytes: u64 = rest.iter().map(|r| r.end - r.start).sum();
            assert_eq!(bytes, 600 * PAGE);
            assert_eq!(coalesce(&mut all), 800 * PAGE);
            // It reports the pages it took.
            assert_eq!(report.rounds[i].dirty_bytes, 200 * PAGE);
        }
        // The expected final send is the final round's bytes at the rehearsals' time per byte
        // (each: 200 pages at 1 MiB/s plus the link's 51 ms), not at the live rounds'.
        let e = report.downtime_estimate.unwrap();
        assert_eq!(e.send_from, "rehearsals");
        let rehearsal = &report.rounds[5];
        let per_byte = rehearsal.duration.as_secs_f64() / (200 * PAGE) as f64;
        let bytes = (e.pending_bytes + e.meanwhile_bytes) as f64;
        let send = e.send.as_secs_f64();
        assert!(
            (send - bytes * per_byte).abs() < 1e-6,
            "{send} {}",
            bytes * per_byte
        );
        assert!((e.rehearsed_throughput - 1.0 / per_byte).abs() < 1.0);
        // The text says which rounds were rehearsals, counts the live ones as the round limit
        // does, and gives the bound's send at the slowest rehearsal's rate (it gave round 0's
        // rate beside a bound taken from the rehearsals).
        let text = report.to_string();
        assert!(
            text.contains("in 8 round(s): 4 with the workload running (what the round limit counts), 1 final, 3 rehearsal(s) inside the pause probes (rounds 1, 3, 5; not counted by the limit)"),
            "{text}"
        );
        let slowest = (report.rounds.iter())
            .filter(|r| r.kind == Rehearsal)
            .map(|r| (200 * PAGE) as f64 / r.duration.as_secs_f64())
            .fold(f64::INFINITY, f64::min);
        assert!((e.rehearsed_worst_throughput - slowest).abs() < 1.0);
        let at_most = format!(
            "at the slowest rehearsal's {}/s",
            crate::report::bytes(e.rehearsed_worst_throughput)
        );
        assert!(text.contains(&at_most), "{at_most}: {text}");
        let live = &report.rounds[6];
        assert!(
            (send - bytes * live.duration.as_secs_f64() / live.bytes as f64).abs() > 1e-3,
            "the live rounds would have given another figure"
        );
    }

    /// The final phase's threads (the driver's and the transport's) run at the real-time
    /// priority asked from the pause until the acknowledgement and in the rehearsals, at their
    /// own in the live rounds, and at their own again after the run. Without the permission
    /// (`EPERM`), the report says so and nothing changes.
    #[test]
    fn the_final_phase_runs_raised_and_is_restored() {
        let (report, link, before) = watched_run(FinalPriority::Realtime(3));
        let p = report.final_priority.clone().unwrap();
        assert_eq!((p.policy, p.priority), ("fifo", 3));
        assert_eq!(p.restore_error, None);
        let paused_sends = link.sends.iter().filter(|s| s.0).count();
        assert_eq!(paused_sends, 4, "three rehearsals and the final round");
        match &p.not_raised {
            None => {
                assert_eq!(p.threads, 2, "the driver's thread and the link's");
                for ((paused, driver, helper, _), watchdogs) in
                    link.sends.iter().zip(&link.watchdogs)
                {
                    if *paused {
                        for t in [driver, helper] {
                            assert_eq!((t.base(), t.priority), (sched::SCHED_FIFO, 3));
                        }
                        // Its watchdog one above (no other test asks for 3).
                        assert!(watchdogs.contains(&4), "watchdogs at {watchdogs:?}");
                    } else {
                        assert_eq!((*driver, *helper), before);
                    }
                }
            }
            Some(why) => {
                eprintln!("SKIP: the raise itself (not permitted here: {why})");
                assert_eq!(p.threads, 0);
                assert!(link.sends.iter().all(|s| (s.1, s.2) == before));
            }
        }
        // Asked not to, the driver leaves every thread as it is.
        let (report, link, before) = watched_run(FinalPriority::Normal);
        let p = report.final_priority.unwrap();
        assert_eq!((p.policy, p.threads), ("normal", 0));
        assert_eq!(
            p.not_raised.as_deref(),
            Some(NORMAL_ASKED),
            "not raised, and why"
        );
        assert_eq!(
            PriorityReport::describe(&p).as_deref(),
            Some("not raised: normal asked for (the threads kept their own priority)")
        );
        assert!(link.sends.iter().all(|s| (s.1, s.2) == before));
    }

    /// A link whose final round fails, as a final round cut at its bound does.
    struct FailsFinal {
        link: FakeLink,
        final_round: bool,
    }

    impl Transport for FailsFinal {
        type Error = io::Error;
        fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, io::Error> {
            if self.final_round {
                return Err(io::Error::other("the destination went away"));
            }
            self.link.send_round(ranges)
        }
        fn send_state(&mut self, state: &[u8]) -> Result<(), io::Error> {
            self.link.send_state(state)
        }
        fn finish(&mut self) -> Result<(u64, Duration), io::Error> {
            self.link.finish()
        }
        fn expect_final_round(&mut self) {
            self.final_round = true;
        }
    }

    /// A final phase that fails resumes the workload before its threads are put back: put
    /// back first, the driver waited for a CPU on a loaded machine before it could resume the
    /// workload, which stayed paused that much past the final round's bound. The driver's
    /// thread is as it was once the run returns.
    #[test]
    fn a_failed_final_phase_resumes_the_workload_still_raised() {
        let before = sched::thread_policy(sched::gettid()).unwrap();
        let resumed_at = Arc::new(Mutex::new(Vec::new()));
        let seen = resumed_at.clone();
        let workload = Callbacks::<std::convert::Infallible>::new(
            || Ok(()),
            move || {
                let me = sched::thread_policy(sched::gettid()).unwrap();
                seen.lock().unwrap().push(me);
                Ok(())
            },
        );
        let mut cfg = MigrationConfig::default();
        cfg.max_rounds = 2;
        cfg.throttle.enabled = false;
        cfg.final_priority = FinalPriority::Realtime(2);
        let link = FailsFinal {
            link: link(1024.0 * 1024.0 * 1024.0),
            final_round: false,
        };
        let mut m = Migration::new(ScriptLog::pages(vec![64]), link, workload, cfg);
        let err = m.run().unwrap_err();
        assert!(matches!(err, Error::Send { .. }), "{err}");
        let report = m.report().clone();
        let p = report.final_priority.unwrap();
        let last = *resumed_at
            .lock()
            .unwrap()
            .last()
            .expect("the workload resumed");
        match &p.not_raised {
            None => assert_eq!(
                (last.base(), last.priority),
                (sched::SCHED_FIFO, 2),
                "resumed after the final phase's threads were put back"
            ),
            Some(why) => {
                eprintln!("SKIP: the raise itself (not permitted here: {why})");
                assert_eq!(last, before);
            }
        }
        assert_eq!(p.restore_error, None);
        assert_eq!(sched::thread_policy(sched::gettid()).unwrap(), before);
    }

    #[test]
    fn a_rehearsal_takes_whole_short_runs_spread_over_the_pending_ones() {
        let mib = 1u64 << 20;
        // Too little pending: no rehearsal.
        assert!(rehearsal_sample(&[0..mib - PAGE], 4 * mib).is_empty());
        // Long runs (a region written through) are passed over: no run is split, so each
        // stays aligned to its region's page size (a 2 MiB hugetlb run stays whole).
        assert!(rehearsal_sample(&[0..64 * mib], 4 * mib).is_empty());
        let runs: Vec<Range<u64>> = (0..4096u64)
            .map(|k| k * 4 * mib..k * 4 * mib + 2 * mib)
            .collect();
        let sample = rehearsal_sample(&runs, 16 * mib);
        assert_eq!(sample.len(), 8);
        assert!(sample.iter().all(|r| runs.contains(r)));
        // Spread: the first and the last taken lie far apart.
        assert!(sample[7].start - sample[0].start > 4000 * mib, "{sample:?}");
    }

    #[test]
    fn spread_sample_takes_bounded_pieces_spread_over_all_ranges() {
        let mib = 1u64 << 20;
        // Fits: all of it.
        assert_eq!(
            spread_sample(&[0..mib], 2 * mib, 64 << 10, PAGE),
            vec![0..mib]
        );
        // Two ranges, 8 MiB in all, a hole between them.
        let ranges = [0..2 * mib, 10 * mib..16 * mib];
        let s = spread_sample(&ranges, 2 * mib, 64 << 10, PAGE);
        assert_eq!(s.len(), 32);
        let total: u64 = s.iter().map(|r| r.end - r.start).sum();
        assert!(total <= 2 * mib, "{total}");
        for (i, r) in s.iter().enumerate() {
            assert_eq!(r.start % PAGE, 0);
            assert!(
                ranges.iter().any(|q| q.start <= r.start && r.end <= q.end),
                "{r:?}"
            );
            if i > 0 {
                assert!(s[i - 1].end <= r.start, "sorted, not overlapping");
            }
        }
        // Spread: pieces in both ranges, the last one near the end of memory.
        assert!(s.iter().any(|r| r.end <= 2 * mib));
        assert!(s.last().unwrap().start >= 15 * mib);
    }

    /// A link whose [`Transport::changed`] takes `per_mib` per MiB asked (and finds nothing),
    /// and whose final check re-reads all memory when `full`.
    struct RereadLink {
        inner: FakeLink,
        per_mib: Duration,
        full: bool,
        asked: Vec<u64>,
    }

    impl Transport for RereadLink {
        type Error = io::Error;
        fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, io::Error> {
            self.inner.send_round(ranges)
        }
        fn changed(&mut self, ranges: &[Range<u64>]) -> Result<Vec<Range<u64>>, io::Error> {
            let bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            self.asked.push(bytes);
            std::thread::sleep(self.per_mib.mul_f64(bytes as f64 / (1 << 20) as f64));
            Ok(Vec::new())
        }
        fn finish_reread_bytes(&self) -> u64 {
            if self.full { MEM } else { 0 }
        }
        fn send_state(&mut self, state: &[u8]) -> Result<(), io::Error> {
            self.inner.send_state(state)
        }
        fn finish(&mut self) -> Result<(u64, Duration), io::Error> {
            self.inner.finish()
        }
    }

    #[test]
    fn memory_reread_while_paused_is_estimated_and_holds_the_switch_over_back() {
        // 4 MiB re-read at 25 ms per MiB takes about 100 ms, twice the limit: the verify pass
        // over unvouched memory, or a full final check (both ends), cannot fit.
        for full in [false, true] {
            let events = Arc::new(Mutex::new(Vec::new()));
            let log = Flagged {
                log: ScriptLog::pages(vec![10]),
                unvouched: !full,
                needs_pause: false,
            };
            let link = RereadLink {
                inner: link(1e9),
                per_mib: Duration::from_millis(25),
                full,
                asked: Vec::new(),
            };
            let mut cfg = MigrationConfig::default();
            cfg.max_downtime = Duration::from_millis(50);
            cfg.max_rounds = 4;
            let mut m = Migration::new(log, link, workload(&events), cfg);
            let report = m.run().unwrap();
            assert_eq!(
                report.switch_reason,
                Some(SwitchReason::MaxRounds),
                "full {full}"
            );
            let e = report.downtime_estimate.expect("an estimate");
            let note = report.downtime_note.expect("a note");
            if full {
                assert_eq!((e.verify_bytes, e.full_check_bytes), (0, MEM));
                assert!(e.full_check > Duration::ZERO);
                assert!(note.contains("full final check of 4.00 MiB"), "{note}");
            } else {
                // The 10 pending pages are sent anyway: not re-read.
                assert_eq!((e.verify_bytes, e.full_check_bytes), (MEM - 10 * PAGE, 0));
                assert!(e.verify > Duration::ZERO && e.verify_worst >= e.verify);
                assert!(note.contains("verify pass over"), "{note}");
                assert!(report.final_phase.unwrap().verify > Duration::ZERO);
            }
            assert_eq!(report.expected_downtime, Some(e.total()));
            assert!(e.total() >= e.pause + e.scan + e.send + e.finish + e.verify + e.full_check);
            // One sample in each pause probe, each bounded; then the final verify pass.
            let (_, link, _) = m.into_parts();
            let samples = &link.asked[..PAUSE_PROBES];
            assert!(
                samples.iter().all(|&b| b > 0 && b <= REREAD_SAMPLE),
                "{samples:?}"
            );
            let expected_calls = PAUSE_PROBES + usize::from(!full);
            assert_eq!(link.asked.len(), expected_calls);
        }
    }

    #[test]
    fn an_empty_scan_while_throttled_does_not_promise_an_empty_final_round() {
        // 200 pages per interval at a 1 MiB/s link: fast enough to throttle after two scans;
        // then the throttle has the writers stopped through a whole interval and the scan
        // finds nothing. Pausing lifts the throttle, so the final round gets what they write
        // at full speed until stopped: the estimate must not be built on the empty scan.
        let events = Arc::new(Mutex::new(Vec::new()));
        // Each scan takes 2 ms, during which (and until stopped) the writers keep writing.
        let log = ScriptLog {
            scan_time: Duration::from_millis(2),
            ..ScriptLog::pages(vec![200, 200, 200, 0])
        };
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(50);
        cfg.max_rounds = 6;
        cfg.probe_pause = false;
        let mut m = Migration::new(log, link(1024.0 * 1024.0), workload(&events), cfg);
        let report = m.run().unwrap();
        assert!(report.throttle > 0.0);
        assert!(events.lock().unwrap().iter().any(|e| e == "throttle 0.2"));
        // It did not switch over on the empty scans: the round limit ended it.
        assert_eq!(report.switch_reason, Some(SwitchReason::MaxRounds));
        let e = report.downtime_estimate.expect("an estimate");
        assert_eq!(e.pending_bytes, 0);
        // The rate behind "written until paused" is the last unthrottled scan's.
        let unthrottled = report
            .rounds
            .iter()
            .rfind(|r| r.kind == RoundKind::Iterative && r.throttle == 0.0)
            .unwrap()
            .dirty_rate;
        assert!(unthrottled > 0.0);
        assert_eq!(e.meanwhile_rate, unthrottled);
        assert!(e.meanwhile_bytes > 0 && e.send > Duration::ZERO);
    }

    #[test]
    fn a_migration_not_allowed_to_throttle_reports_the_throttle_off() {
        // The same fast writer as above, throttling disabled (`--throttle none`).
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![200]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(50);
        cfg.max_rounds = 5;
        cfg.throttle.enabled = false;
        let mut m = Migration::new(log, link(1024.0 * 1024.0), workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.throttle, 0.0);
        assert!(!report.throttle_allowed);
        assert!(
            !events
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.starts_with("throttle"))
        );
        let text = report.to_string();
        assert!(text.contains("throttle:      off"), "{text}");
    }

    #[test]
    fn the_measured_finish_cost_is_part_of_the_estimate() {
        // As in the test above, plus 30 ms to finish: 20 pages (78 ms to send) no longer fit
        // in 100 ms, 5 pages do.
        let log = ScriptLog::pages(vec![400, 100, 20, 5]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(100);
        cfg.throttle.enabled = false;
        cfg.probe_pause = false;
        let link = FakeLink {
            probe: Some(Duration::from_millis(30)),
            ..link(1024.0 * 1024.0)
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.switch_reason, Some(SwitchReason::Converged));
        assert_eq!(report.rounds.last().unwrap().pages, 5);
        let e = report.downtime_estimate.expect("an estimate");
        assert_eq!(e.finish, Duration::from_millis(30));
        assert_eq!(report.expected_downtime, Some(e.total()));
        assert_eq!(e.total(), e.pause + e.scan + e.send + e.check + e.finish);
        // A probe after round 0 and after each iterative round, none after the final one.
        let iterative = report
            .rounds
            .iter()
            .filter(|r| r.kind == RoundKind::Iterative)
            .count() as u32;
        let (_, link, _) = m.into_parts();
        assert_eq!(link.probes, 1 + iterative);

        // Finishing alone takes longer than the limit: it never converges, and the report
        // names the finish among the fixed costs.
        let link = FakeLink {
            probe: Some(Duration::from_millis(150)),
            ..self::link(1024.0 * 1024.0)
        };
        cfg.max_rounds = 3;
        let log = ScriptLog::pages(vec![400, 100, 20]);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.switch_reason, Some(SwitchReason::MaxRounds));
        let note = report.downtime_note.expect("a note");
        assert!(note.contains("finish 150.0"), "{note}");
    }

    #[test]
    fn nothing_written_and_a_finish_above_the_limit_switches_over_once_more_rounds_cannot_help() {
        // A stopped source (nothing written after round 0) into a destination whose finish
        // takes 150 ms against a 100 ms limit: no round can bring the bound under the limit.
        let link = FakeLink {
            probe: Some(Duration::from_millis(150)),
            ..link(1024.0 * 1024.0)
        };
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(100);
        cfg.max_rounds = 30;
        cfg.throttle.enabled = false;
        let events = Arc::new(Mutex::new(Vec::new()));
        // Scans that take no time: quiet scans in quick succession (a writer that got no CPU
        // for a few milliseconds looks the same) do not count, so the driver spaces them to
        // cover QUIET_TIME instead of sending empty rounds up to the round limit (a review:
        // 31 empty rounds in 0.13 s, then `max-rounds`).
        let mut m = Migration::new(ScriptLog::pages(vec![0]), link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(
            report.switch_reason,
            Some(SwitchReason::OutOfReach),
            "{report}"
        );
        let live = |r: &MigrationReport| {
            r.rounds
                .iter()
                .filter(|r| matches!(r.kind, RoundKind::Full | RoundKind::Iterative))
                .count() as u32
        };
        assert_eq!(live(&report), QUIET_ROUNDS, "{report}");
        // A few pages written at first (an attach touches the target's stack), then nothing:
        // the rate they leave behind ages out once the empty scans are spaced, and it gives
        // up long before the round limit.
        let link = FakeLink {
            probe: Some(Duration::from_millis(150)),
            ..self::link(1024.0 * 1024.0)
        };
        let log = ScriptLog::pages(vec![2, 1, 0]);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(
            report.switch_reason,
            Some(SwitchReason::OutOfReach),
            "{report}"
        );
        assert!(live(&report) < 12, "{report}");
        // A workload that writes a little at every scan is never quiet: no spacing, the
        // round limit ends it.
        let link = FakeLink {
            probe: Some(Duration::from_millis(150)),
            ..self::link(1024.0 * 1024.0)
        };
        let mut m = Migration::new(ScriptLog::pages(vec![1]), link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(
            report.switch_reason,
            Some(SwitchReason::MaxRounds),
            "{report}"
        );
        // Scans 300 ms apart: the QUIET_ROUNDS-th covers more than QUIET_TIME (a finish of
        // 2 s, so that it stays the largest fixed cost beside scans that slow).
        let link = FakeLink {
            probe: Some(Duration::from_millis(2000)),
            ..self::link(1024.0 * 1024.0)
        };
        let mut log = ScriptLog::pages(vec![0]);
        log.scan_time = Duration::from_millis(300);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.switch_reason, Some(SwitchReason::OutOfReach));
        // Round 0, then an empty round after each quiet scan until the QUIET_ROUNDS-th, which
        // switched over: far from the round limit of 30.
        assert_eq!(live(&report), QUIET_ROUNDS);
        let note = report.downtime_note.clone().expect("a note");
        assert!(note.contains("nothing was written"), "{note}");
        assert!(
            note.contains("the largest is the finish (digests and the acknowledgement")
                && note.contains("2000.0"),
            "{note}"
        );
        assert!(report.to_string().contains("OUT OF REACH"), "{report}");
        // A destination whose finish is more work (an image's index and fsync) says which.
        let link = FakeLink {
            probe: Some(Duration::from_millis(2000)),
            finish_work: Some("its index and the fsync"),
            ..self::link(1024.0 * 1024.0)
        };
        let mut log = ScriptLog::pages(vec![0]);
        log.scan_time = Duration::from_millis(300);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let note = m.run().unwrap().downtime_note.expect("a note");
        assert!(
            note.contains("the largest is the finish at the destination (its index and the fsync)"),
            "{note}"
        );

        // The same limit with a finish that fits converges as before.
        let link = FakeLink {
            probe: Some(Duration::from_millis(30)),
            ..self::link(1024.0 * 1024.0)
        };
        let mut m = Migration::new(ScriptLog::pages(vec![0]), link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.switch_reason, Some(SwitchReason::Converged));

        // A workload still writing keeps iterating to the round limit (rounds shrink what
        // the final round sends, even when the limit stays out of reach).
        let link = FakeLink {
            probe: Some(Duration::from_millis(150)),
            ..self::link(1024.0 * 1024.0)
        };
        cfg.max_rounds = 8;
        let mut m = Migration::new(ScriptLog::pages(vec![20]), link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.switch_reason, Some(SwitchReason::MaxRounds));
    }

    #[test]
    fn converging_workload_switches_over_when_pending_fits_the_downtime() {
        // 1 MiB/s link, 100 ms limit: 25 pages fit (102 KiB), 100 do not.
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![400, 100, 20]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(100);
        cfg.throttle.enabled = false;
        // Rounds sent with the workload running only (rehearsals: their own test).
        cfg.rehearse_send = false;
        let vcpus = workload(&events).with_state(|| Ok(b"vcpu registers".to_vec()));
        let mut m = Migration::new(log, link(1024.0 * 1024.0), vcpus, cfg);
        let report = m.run().unwrap();
        assert_eq!(report.status, Status::Completed);
        assert_eq!(report.switch_reason, Some(SwitchReason::Converged));
        assert_eq!(report.state_bytes, Some(14));
        // Round 0, two iterative rounds (400, 100 pages), then the final round.
        assert_eq!(report.rounds.len(), 4);
        assert_eq!(report.rounds[3].kind, RoundKind::Final);
        assert_eq!(report.checksum, Some(0xabcd));
        assert!(report.downtime.is_some());
        assert_eq!(
            *events.lock().unwrap(),
            vec![
                "pause", "resume", "pause", "resume", "pause", "resume", "pause"
            ],
            "pause probes after rounds 0, 1 and 2, then stays stopped by default"
        );
        let est = report.downtime_estimate.unwrap();
        assert_eq!(report.expected_downtime, Some(est.total()));
        // 20 pages at 1 MiB/s plus the 1 ms per round the link adds.
        let send = est.send.as_secs_f64() * 1e3;
        assert!((send - 79.1).abs() < 1.0, "{send}");
        assert!(report.downtime_note.is_none());
        let (_, t, _) = m.into_parts();
        assert!(t.finished);
        assert_eq!(t.state.as_deref(), Some(&b"vcpu registers"[..]));
    }

    /// A [`ScriptLog`] that cannot vouch for any of its memory (`unvouched`), or whose
    /// collection needs the writers paused (`needs_pause`, as soft-dirty's does).
    struct Flagged {
        log: ScriptLog,
        unvouched: bool,
        needs_pause: bool,
    }

    impl DirtyLog for Flagged {
        type Error = std::io::Error;
        fn memory(&self) -> Vec<Range<u64>> {
            self.log.memory()
        }
        fn page_size(&self) -> u64 {
            PAGE
        }
        fn start(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn stop(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn collect(&mut self, out: &mut Vec<Range<u64>>) -> std::io::Result<CollectStats> {
            self.log.collect(out)
        }
        fn unvouched(&self) -> Vec<Range<u64>> {
            if self.unvouched {
                vec![0..MEM]
            } else {
                Vec::new()
            }
        }
        fn needs_pause(&self) -> bool {
            self.needs_pause
        }
    }

    #[test]
    fn a_log_that_needs_a_pause_gets_one_around_each_collection_and_reports_it() {
        let events = Arc::new(Mutex::new(Vec::new()));
        // As in the convergence test: round 0, two iterative rounds, the final round.
        let log = Flagged {
            log: ScriptLog::pages(vec![400, 100, 20]),
            unvouched: false,
            needs_pause: true,
        };
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(100);
        cfg.throttle.enabled = false;
        cfg.probe_pause = false;
        cfg.after = AfterMigration::Resume;
        let mut m = Migration::new(log, link(1024.0 * 1024.0), workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.status, Status::Completed);
        let kinds: Vec<_> = report.rounds.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            vec![
                RoundKind::Full,
                RoundKind::Iterative,
                RoundKind::Iterative,
                RoundKind::Final
            ]
        );
        // Round 0 has no collection before it; each later round sends what a paused
        // collection found (the final round: the last iterative one's, its own ran paused).
        assert_eq!(report.rounds[0].collect_pause, None);
        assert!(report.rounds[1..].iter().all(|r| r.collect_pause.is_some()));
        assert_eq!(
            *events.lock().unwrap(),
            vec![
                "pause", "resume", "pause", "resume", "pause", "resume", "pause", "resume"
            ],
            "paused and resumed around each of three collections, then the final round"
        );
    }

    /// A link whose re-check finds page 100 changed; records what it was asked to re-check and
    /// what each round sent.
    struct CheckingLink {
        inner: FakeLink,
        asked: Vec<Range<u64>>,
        sent: Vec<Vec<Range<u64>>>,
    }

    impl Transport for CheckingLink {
        type Error = io::Error;
        fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, io::Error> {
            self.sent.push(ranges.to_vec());
            self.inner.send_round(ranges)
        }
        fn changed(&mut self, ranges: &[Range<u64>]) -> Result<Vec<Range<u64>>, io::Error> {
            self.asked = ranges.to_vec();
            Ok(vec![100 * PAGE..101 * PAGE])
        }
        fn send_state(&mut self, state: &[u8]) -> Result<(), io::Error> {
            self.inner.send_state(state)
        }
        fn finish(&mut self) -> Result<(u64, Duration), io::Error> {
            self.inner.finish()
        }
    }

    #[test]
    fn final_round_adds_what_the_recheck_of_unvouched_memory_found() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = Flagged {
            log: ScriptLog::pages(vec![10, 30]),
            unvouched: true,
            needs_pause: false,
        };
        let link = CheckingLink {
            inner: link(1e9),
            asked: Vec::new(),
            sent: Vec::new(),
        };
        let mut m = Migration::new(log, link, workload(&events), MigrationConfig::default());
        let report = m.run().unwrap();
        let v = report.verify.expect("re-check ran");
        assert_eq!(v.checked_bytes, MEM);
        // Pages 0..30 go in the final round anyway: not re-read.
        assert_eq!(v.reread_bytes, MEM - 30 * PAGE);
        assert_eq!(v.changed_bytes, PAGE);
        let (_, link, _) = m.into_parts();
        assert_eq!(link.asked, vec![30 * PAGE..MEM]);
        assert_eq!(
            link.sent.last().unwrap(),
            &vec![0..30 * PAGE, 100 * PAGE..101 * PAGE]
        );
    }

    #[test]
    fn final_round_resends_the_last_scan_together_with_new_writes() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![10, 30]);
        let mut cfg = MigrationConfig::default();
        cfg.after = AfterMigration::Resume;
        let mut m = Migration::new(log, link(1e9), workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.rounds.len(), 2);
        // The final scan found pages 0..30, which cover the pending 0..10: sent once.
        assert_eq!(report.rounds[1].pages, 30);
        assert_eq!(
            *events.lock().unwrap(),
            vec!["pause", "resume", "pause", "resume"]
        );
    }

    #[test]
    fn non_converging_workload_is_throttled_step_by_step_then_switched_over() {
        let events = Arc::new(Mutex::new(Vec::new()));
        // Every scan finds all memory dirty: the dirty rate always exceeds the link.
        let log = ScriptLog::pages(vec![1024]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(1);
        cfg.max_rounds = 8;
        cfg.rehearse_send = false;
        let mut m = Migration::new(log, link(1024.0 * 1024.0), workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.switch_reason, Some(SwitchReason::MaxRounds));
        assert_eq!(report.rounds.len(), 9);
        let ev = events.lock().unwrap().clone();
        // Pause probes after rounds 0, 1 and 2. Throttle raised every second scan before a round:
        // scans 2, 4, 6 -> 0.2, 0.3, 0.4 (scan 8 hits the round limit first), lifted at the end.
        assert_eq!(
            ev,
            vec![
                "pause",
                "resume",
                "pause",
                "resume",
                "throttle 0.2",
                "pause",
                "resume",
                "throttle 0.3",
                "throttle 0.4",
                "pause",
                "throttle 0.0"
            ]
        );
        assert!((report.throttle - 0.4).abs() < 1e-9);
        let note = report.downtime_note.unwrap();
        assert!(note.contains("round limit (8)"), "{note}");
    }

    #[test]
    fn a_fixed_cost_per_round_above_the_limit_is_named_in_the_report() {
        // Rounds shrink 256, 128, 64 pages and stay at 64; every round costs 30 ms on top of its
        // bytes. The limit of 20 ms can never be met, whatever is pending.
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![256, 128, 64]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(20);
        cfg.max_rounds = 5;
        cfg.throttle.enabled = false;
        let mut l = link(1024.0 * 1024.0 * 1024.0);
        l.fixed = Duration::from_millis(30);
        let mut m = Migration::new(log, l, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.switch_reason, Some(SwitchReason::MaxRounds));
        let est = report.downtime_estimate.unwrap();
        let fixed = est.fixed.as_secs_f64() * 1e3;
        assert!((fixed - 31.0).abs() < 0.5, "{fixed}");
        assert!(est.total() > Duration::from_millis(30));
        let note = report.downtime_note.unwrap();
        assert!(note.contains("fixed costs alone"), "{note}");
    }

    #[test]
    fn abort_policy_stops_cleanly_and_leaves_the_workload_running() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![1024]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(1);
        cfg.max_rounds = 4;
        cfg.max_rounds_policy = LimitPolicy::Abort;
        let mut m = Migration::new(log, link(1024.0 * 1024.0), workload(&events), cfg);
        let err = m.run().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Aborted {
                    reason: AbortReason::MaxRounds { rounds: 4 }
                }
            ),
            "{err}"
        );
        assert_eq!(m.report().status, Status::Aborted);
        assert!(m.report().checksum.is_none());
        let ev = events.lock().unwrap().clone();
        // Only the pause probes, each resumed at once: the workload keeps running.
        let count = |name: &str| ev.iter().filter(|e| *e == name).count();
        assert_eq!(count("pause"), 3, "{ev:?}");
        assert_eq!(count("resume"), 3, "{ev:?}");
        assert_eq!(
            ev.last().map(String::as_str),
            Some("throttle 0.0"),
            "{ev:?}"
        );
        let (_, t, _) = m.into_parts();
        assert!(
            !t.finished,
            "an aborted migration never finishes the transport"
        );
    }

    #[test]
    fn timeout_policy_abort() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![1024]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(1);
        cfg.timeout = Some(Duration::ZERO);
        let mut m = Migration::new(log, link(1e6), workload(&events), cfg);
        let err = m.run().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Aborted {
                    reason: AbortReason::Timeout { .. }
                }
            ),
            "{err}"
        );
    }

    /// Forced by the round limit with a send that does not fit: the note names what the final
    /// round would send and how long that takes, from the estimate's own figures (it used to
    /// quote the report's dirty rate, which can read 0 while rounds find pages).
    #[test]
    fn a_forced_switch_over_says_what_the_final_round_would_send() {
        let events = Arc::new(Mutex::new(Vec::new()));
        // 4 MiB written every round over 1 MB/s.
        let log = ScriptLog::pages(vec![1024; 8]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(50);
        cfg.max_rounds = 2;
        cfg.rehearse_send = false;
        let mut m = Migration::new(log, link(1e6), workload(&events), cfg);
        m.run().unwrap();
        let note = m.report().downtime_note.clone().unwrap_or_default();
        assert!(note.contains("the round limit (2) was reached"), "{note}");
        assert!(
            note.contains("the final round would send 4.00 MiB"),
            "{note}"
        );
        assert!(note.contains("4.00 MiB pending"), "{note}");
        assert!(note.contains("the pending set does not shrink"), "{note}");
        // The time given goes with the rate given; the bound is named as what it is.
        let e = m.report().downtime_estimate.unwrap();
        let total = (e.pending_bytes + e.meanwhile_bytes) as f64;
        let rate = crate::report::bytes(total / e.send.as_secs_f64());
        assert!(
            note.contains(&format!(
                "{:.1} ms expected at {rate}/s, at most {:.1} ms (",
                ms(e.send),
                ms(e.send_worst)
            )),
            "{note}"
        );
        // No verify pass and no full final check here: none is blamed.
        assert!(!note.contains("verify pass or full final check"), "{note}");
    }

    /// Under the abort policy, a final round expected to outlast the time left before the
    /// timeout is not started: the migration aborts with the workload running (only the
    /// pause probes paused it, each resumed), saying why; with time enough it completes.
    #[test]
    fn a_final_round_that_cannot_end_before_the_timeout_is_not_started() {
        for (timeout, completes) in [
            (Duration::from_secs(1), false),
            (Duration::from_secs(600), true),
        ] {
            let events = Arc::new(Mutex::new(Vec::new()));
            // 4 MiB written every round over 1 MB/s: a final round of about 4 s.
            let log = ScriptLog::pages(vec![1024; 8]);
            let mut cfg = MigrationConfig::default();
            cfg.max_downtime = Duration::from_millis(1);
            cfg.max_rounds = 3;
            cfg.timeout = Some(timeout);
            let mut m = Migration::new(log, link(1e6), workload(&events), cfg);
            let result = m.run();
            let ev = events.lock().unwrap().clone();
            let count = |name: &str| ev.iter().filter(|e| *e == name).count();
            if completes {
                assert!(result.is_ok(), "{result:?}");
                assert_eq!(m.report().status, Status::Completed);
                continue;
            }
            let err = result.unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Aborted {
                        reason: AbortReason::Timeout { .. }
                    }
                ),
                "{err}"
            );
            assert_eq!(m.report().status, Status::Aborted);
            assert_eq!(count("pause"), count("resume"), "left paused: {ev:?}");
            let note = m.report().downtime_note.clone().unwrap_or_default();
            assert!(note.contains("aborted before pausing"), "{note}");
        }
    }

    #[test]
    fn failure_in_the_final_round_resumes_the_workload() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![1]);
        let mut l = link(1e9);
        l.fail_at = Some(1);
        let mut m = Migration::new(log, l, workload(&events), MigrationConfig::default());
        let err = m.run().unwrap_err();
        assert!(matches!(err, Error::Send { round: 1, .. }), "{err}");
        assert_eq!(m.report().status, Status::Failed);
        assert!(
            m.report()
                .error
                .as_deref()
                .unwrap()
                .contains("peer went away")
        );
        assert_eq!(
            *events.lock().unwrap(),
            vec!["pause", "resume", "pause", "resume"]
        );
    }

    #[test]
    fn workload_counters_and_dirty_pages_are_reported_per_round() {
        // Every read of the counters finds 1000 more operations, each having taken 2 µs.
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut n = 0u64;
        let w = workload(&events).with_counters(move || {
            n += 1000;
            WorkloadCounters {
                operations: n,
                busy: Duration::from_micros(2 * n),
            }
        });
        let log = ScriptLog::pages(vec![40, 10, 3]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_millis(100);
        cfg.throttle.enabled = false;
        // One collection per round (the probes' scans are counted in their rounds too: see
        // `pause_probes_rehearse_the_final_scan_and_their_pages_go_in_the_round`).
        cfg.probe_pause = false;
        let mut m = Migration::new(log, link(1024.0 * 1024.0), w, cfg)
            .measure_workload_before(Duration::from_millis(5));
        let report = m.run().unwrap();
        // Scans found 40, 10, 3 (switch-over), then 3 in the final scan: the final round
        // sends the pages of the last two scans and reports both.
        let found: Vec<u64> = report.rounds.iter().map(|r| r.dirty_pages).collect();
        assert_eq!(found, vec![0, 40, 10, 6]);
        assert!(report.rounds[0].workload_rate.is_none());
        let (last, live) = report.rounds[1..].split_last().unwrap();
        for r in live {
            assert!(r.workload_rate.is_some_and(|v| v > 0.0), "{r:?}");
            assert_eq!(r.workload_ns_per_op, Some(2000.0));
        }
        // The final round runs paused: no rate, and the table says why.
        assert_eq!(last.kind, RoundKind::Final);
        assert!(last.workload_rate.is_none(), "{last:?}");
        let table = report.to_string();
        let final_row = table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("final"))
            .unwrap();
        assert!(final_row.ends_with(" paused"), "{final_row}");
        // Every page count says its unit.
        assert!(
            table.contains("56 pages of 4 KiB (224.00 KiB) found written over all scans"),
            "{table}"
        );
        assert!(
            table.contains("rounds (pages, zero and dirty pg count pages of 4 KiB):"),
            "{table}"
        );
        let cost = report.workload.unwrap();
        assert!(cost.before_rate.is_some_and(|v| v > 0.0));
        assert_eq!(cost.before_ns_per_op, Some(2000.0));
        assert!(cost.during_rate > 0.0);
        assert_eq!(cost.during_ns_per_op, Some(2000.0));
        // Every scan's pages, the last one's with the workload running included.
        assert_eq!(cost.dirty_pages, 56);
    }

    #[test]
    fn bad_config_is_refused() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut cfg = MigrationConfig::default();
        cfg.throttle.initial = 1.5;
        let log = ScriptLog::pages(vec![0]);
        let mut m = Migration::new(log, link(1e9), workload(&events), cfg);
        assert!(matches!(m.run(), Err(Error::Config { .. })));
    }

    /// A transport that records what each round carried, can fail chosen calls of
    /// `send_round`, can block in a chosen call (or in `finish`) until interrupted, and
    /// reconnects when allowed.
    #[derive(Default)]
    struct Scripted {
        calls: u64,
        fail_calls: Vec<u64>,
        block_call: Option<u64>,
        block_finish: bool,
        reconnectable: bool,
        /// Reconnect attempts that fail before one succeeds.
        failed_reconnects: u32,
        sent: Vec<Vec<Range<u64>>>,
        reconnects: u32,
        committed: bool,
        interrupted: Arc<(Mutex<bool>, std::sync::Condvar)>,
        blocked: Option<std::sync::mpsc::Sender<()>>,
        /// A failed call says it had handed over half of its pages (rounded up).
        handed: Option<RoundSent>,
        /// This call waits until its round is cut ([`Transport::round_cutter`]), then ends
        /// having sent the first half of its ranges' bytes and names the rest.
        cut_call: Option<u64>,
        cut: Arc<(Mutex<bool>, std::sync::Condvar)>,
        cut_rest: Option<Vec<Range<u64>>>,
        /// Calls of [`Transport::uncut`].
        uncuts: u32,
    }

    impl Scripted {
        fn block(&self) -> Result<(), io::Error> {
            if let Some(b) = &self.blocked {
                let _ = b.send(());
            }
            let (m, cv) = &*self.interrupted;
            let mut i = m.lock().unwrap();
            while !*i {
                i = cv.wait(i).unwrap();
            }
            Err(io::Error::other("interrupted"))
        }
    }

    impl Transport for Scripted {
        type Error = io::Error;
        fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, io::Error> {
            let call = self.calls;
            self.calls += 1;
            if self.block_call == Some(call) {
                self.block()?;
            }
            let mut bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            if self.cut_call == Some(call) {
                // A round nobody cuts ends whole after 30 s (as a paced one ran to its end).
                let (m, cv) = &*self.cut;
                let cut = m.lock().unwrap();
                let long = Duration::from_secs(30);
                let cut = cv.wait_timeout_while(cut, long, |cut| !*cut).unwrap().0;
                let was_cut = *cut;
                drop(cut);
                let mut half = if was_cut {
                    bytes / 2 / PAGE * PAGE
                } else {
                    bytes
                };
                let mut rest = Vec::new();
                for r in ranges {
                    let n = (r.end - r.start).min(half);
                    half -= n;
                    if r.start + n < r.end {
                        rest.push(r.start + n..r.end);
                    }
                }
                bytes -= rest.iter().map(|r| r.end - r.start).sum::<u64>();
                self.cut_rest = was_cut.then_some(rest);
            }
            if self.fail_calls.contains(&call) {
                self.handed = Some(RoundSent {
                    pages: (bytes / PAGE).div_ceil(2),
                    zero_pages: 0,
                    bytes: 0,
                    duration: Duration::from_millis(1),
                });
                return Err(io::Error::other("connection reset"));
            }
            self.sent.push(ranges.to_vec());
            Ok(RoundSent {
                pages: bytes / PAGE,
                zero_pages: 0,
                bytes,
                duration: Duration::from_millis(1),
            })
        }
        fn sent_before_failure(&self) -> Option<RoundSent> {
            self.handed
        }
        fn round_cutter(&self) -> Option<crate::control::Interrupt> {
            let c = self.cut.clone();
            Some(Arc::new(move || {
                *c.0.lock().unwrap() = true;
                c.1.notify_all();
            }))
        }
        fn take_cut(&mut self) -> Option<Vec<Range<u64>>> {
            self.cut_rest.take()
        }
        fn uncut(&mut self) {
            self.uncuts += 1;
            *self.cut.0.lock().unwrap() = false;
        }
        fn finish(&mut self) -> Result<(u64, Duration), io::Error> {
            if self.block_finish {
                self.block()?;
            }
            Ok((7, Duration::ZERO))
        }
        fn send_state(&mut self, _state: &[u8]) -> Result<(), io::Error> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), io::Error> {
            self.committed = true;
            Ok(())
        }
        fn interrupter(&self) -> Option<crate::control::Interrupt> {
            let i = self.interrupted.clone();
            Some(Arc::new(move || {
                *i.0.lock().unwrap() = true;
                i.1.notify_all();
            }))
        }
        fn can_reconnect(&self) -> bool {
            self.reconnectable
        }
        fn reconnect(&mut self) -> Option<Result<Vec<Range<u64>>, io::Error>> {
            if self.failed_reconnects > 0 {
                self.failed_reconnects -= 1;
                return Some(Err(io::Error::other("connection refused")));
            }
            self.reconnects += 1;
            Some(Ok(Vec::new()))
        }
        fn peer(&self) -> String {
            "test-peer".into()
        }
    }

    fn quick_config() -> MigrationConfig {
        let mut cfg = MigrationConfig::default();
        cfg.throttle.enabled = false;
        // The events below are the final round's pause and resume only.
        cfg.probe_pause = false;
        cfg.reconnect.backoff = Duration::from_millis(1);
        cfg.after = AfterMigration::Resume;
        cfg
    }

    /// What [`cut_by_the_timeout`] returns.
    type CutRun = (
        MigrationReport,
        Vec<(RoundKind, bool)>,
        Migration<ScriptLog, Scripted, Callbacks<std::convert::Infallible>>,
    );

    /// Migrates with `log` over a [`Scripted`] link whose second round (after round 0: round 1,
    /// or with `probe` the first pause probe's rehearsal) waits until the total timeout of 50
    /// ms, under the switch-over policy, cuts it short. The report, each round's kind and
    /// whether it was cut, and the migration.
    fn cut_by_the_timeout(log: ScriptLog, probe: bool) -> CutRun {
        let events = Arc::new(Mutex::new(Vec::new()));
        let link = Scripted {
            cut_call: Some(1),
            ..Scripted::default()
        };
        let mut cfg = quick_config();
        cfg.probe_pause = probe;
        cfg.rehearse_send = probe;
        cfg.max_downtime = Duration::from_nanos(1);
        cfg.timeout = Some(Duration::from_millis(50));
        cfg.timeout_policy = LimitPolicy::SwitchOver;
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let report = m.run().unwrap();
        let kinds = (report.rounds.iter())
            .map(|r| (r.kind, r.interrupted))
            .collect();
        (report, kinds, m)
    }

    /// The total timeout under the switch-over policy cuts the live round in progress short
    /// (it waited for the round to end: a round paced at 64 KiB/s ran 32 s past a 1 s limit)
    /// and the final round starts at once, no other round between: it sends what the cut
    /// round had not (pages the scan had reported and re-protected: lost otherwise) with what
    /// the final scan found. Abort interrupts at the timeout as before; this breaks nothing.
    #[test]
    fn the_timeout_under_switch_over_cuts_the_round_and_the_final_round_sends_the_rest() {
        // Round 1 gets pages 0..100, the scan after the cut nothing, the final scan 200..210.
        let log = ScriptLog::ranges(vec![
            vec![0..100 * PAGE],
            Vec::new(),
            vec![200 * PAGE..210 * PAGE],
        ]);
        let (report, kinds, m) = cut_by_the_timeout(log, false);
        assert_eq!(report.switch_reason, Some(SwitchReason::Timeout));
        use RoundKind::{Final, Full, Iterative};
        assert_eq!(
            kinds,
            vec![(Full, false), (Iterative, true), (Final, false)],
            "the cut round, then the final one at once"
        );
        assert_eq!(report.rounds[1].pages, 50, "what the cut round sent");
        assert!(
            report
                .downtime_note
                .as_deref()
                .unwrap()
                .contains("cut round 1 short"),
            "{:?}",
            report.downtime_note
        );
        let note = report.downtime_note.as_deref().unwrap();
        assert!(
            note.contains("the timeout forced the switch-over after 2 round(s)"),
            "{note}"
        );
        assert!(!note.contains("does not shrink"), "{note}");
        let text = report.to_string();
        assert!(text.contains("iter. cut"), "{text}");
        assert!(
            text.contains("1 cut short by the timeout (round 1:"),
            "{text}"
        );
        // Had the cut come after its last page, the round left nothing over.
        let mut all = report.clone();
        all.rounds[1].pages = 100;
        let text = all.to_string();
        assert!(
            text.contains("1 cut by the timeout after sending all its pages (round 1)"),
            "{text}"
        );
        assert!(!text.contains("what it had not sent went"), "{text}");
        assert!(m.unsent().is_empty());
        let (_, link, _) = m.into_parts();
        assert!(link.uncuts >= 1, "the final phase lifts the cut");
        assert_eq!(link.sent[1], vec![0..100 * PAGE]);
        let mut last = link.sent.last().unwrap().clone();
        coalesce(&mut last);
        assert_eq!(last, vec![50 * PAGE..100 * PAGE, 200 * PAGE..210 * PAGE]);
        assert!(link.committed);
    }

    /// A rehearsal round (inside a pause probe) that the timeout cuts short: the sample's
    /// pages it did not send stay pending and go in the final round with the rest; none is
    /// lost, none sent twice.
    #[test]
    fn a_rehearsal_cut_by_the_timeout_leaves_its_unsent_pages_to_the_final_round() {
        // The first scan finds pages 0..800, each a run of its own: the rehearsal samples
        // every fourth (200 pages) and is cut having sent the first 100 of them.
        let scan: Vec<Range<u64>> = (0..800).map(|p| p * PAGE..(p + 1) * PAGE).collect();
        let (report, kinds, m) = cut_by_the_timeout(ScriptLog::ranges(vec![scan]), true);
        use RoundKind::{Final, Full, Rehearsal};
        assert_eq!(
            kinds,
            vec![(Full, false), (Rehearsal, true), (Final, false)]
        );
        assert_eq!(report.rounds[1].pages, 100);
        assert_eq!(report.rounds[1].dirty_bytes, 200 * PAGE, "its sample");
        assert!(!report.rounds[1].sent_all(PAGE));
        let text = report.to_string();
        assert!(
            text.contains("1 cut short by the timeout (round 1: what it had not sent"),
            "{text}"
        );
        let (_, link, _) = m.into_parts();
        let sample = &link.sent[1];
        assert_eq!(sample.len(), 200);
        let sent_half: Vec<Range<u64>> = sample[..100].to_vec();
        let mut last = link.sent.last().unwrap().clone();
        assert_eq!(coalesce(&mut last), 700 * PAGE, "the rest, once");
        assert_eq!(outside(&last, &sent_half), last, "nothing sent twice");
        last.extend(sent_half);
        coalesce(&mut last);
        assert_eq!(last, vec![0..800 * PAGE], "nothing lost");
    }

    #[test]
    fn cancel_from_another_thread_interrupts_a_blocked_round_and_resumes() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let link = Scripted {
            block_call: Some(1),
            blocked: Some(tx),
            ..Scripted::default()
        };
        let log = ScriptLog::pages(vec![1024]);
        let mut cfg = quick_config();
        cfg.max_downtime = Duration::from_nanos(1);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let handle = m.cancel_handle();
        let canceller = std::thread::spawn(move || {
            rx.recv().unwrap();
            handle.cancel();
        });
        let err = m.run().unwrap_err();
        canceller.join().unwrap();
        assert!(
            matches!(
                err,
                Error::Cancelled {
                    step: Step::Round { round: 1 }
                }
            ),
            "{err}"
        );
        assert_eq!(m.report().status, Status::Cancelled);
        assert_eq!(m.unsent(), &[0..MEM], "the harvested round is kept");
        let (_, t, _) = m.into_parts();
        assert!(!t.committed);
    }

    #[test]
    fn final_round_past_its_bound_resumes_reports_failure_and_never_commits() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let link = Scripted {
            block_finish: true,
            ..Scripted::default()
        };
        let log = ScriptLog::pages(vec![1]);
        let mut cfg = quick_config();
        cfg.after = AfterMigration::Stop;
        cfg.final_round_timeout = Some(Duration::from_millis(50));
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let err = m.run().unwrap_err();
        match &err {
            Error::Timeout {
                step, peer, limit, ..
            } => {
                assert_eq!(*step, Step::Acknowledge);
                assert_eq!(peer, "test-peer");
                assert_eq!(*limit, Duration::from_millis(50));
            }
            e => panic!("expected a timeout, got {e}"),
        }
        let r = m.report();
        assert_eq!(r.status, Status::Failed);
        assert!(r.checksum.is_none());
        // Where permitted, the final phase ran at SCHED_FIFO 1 and the watchdog at 2: it still
        // fired (the timeout above).
        match r.final_priority.as_ref().and_then(|p| p.not_raised.clone()) {
            None => assert!(r.final_priority.as_ref().is_some_and(|p| p.threads > 0)),
            Some(why) => eprintln!("note: the final phase was not raised ({why})"),
        }
        let downtime = r.downtime.expect("the downtime suffered is reported");
        assert!(downtime >= Duration::from_millis(50), "{downtime:?}");
        assert_eq!(*events.lock().unwrap(), vec!["pause", "resume"]);
        let (_, t, _) = m.into_parts();
        assert!(!t.committed, "a late acknowledgement is never committed");
    }

    #[test]
    fn failed_round_ranges_show_up_again_in_the_next_round() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let a = 0..4 * PAGE;
        let b = 100 * PAGE..110 * PAGE;
        let c = 500 * PAGE..520 * PAGE;
        let log = ScriptLog::ranges(vec![vec![a.clone()], vec![b.clone()], vec![c.clone()]]);
        // Call 0 is round 0; call 1 (round 1, carrying `a`) fails; the next carries `a` + `b`.
        let link = Scripted {
            fail_calls: vec![1],
            reconnectable: true,
            ..Scripted::default()
        };
        let mut cfg = quick_config();
        // 1 ms per round here: switch over only when nothing is pending.
        cfg.max_downtime = Duration::from_nanos(1);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.reconnects, 1);
        // The failed round is in the report, with what it had handed over (2 of `a`'s 4 pages),
        // and the round that sent its ranges again has the same number.
        let r: Vec<(u64, bool, u64)> = report
            .rounds
            .iter()
            .map(|r| (r.round, r.failed, r.pages))
            .collect();
        assert_eq!(
            r[..4],
            [
                (0, false, 1024),
                (1, true, 2),
                (1, false, 14),
                (2, false, 20)
            ]
        );
        assert_eq!(
            report.pages,
            report.rounds.iter().map(|r| r.pages).sum::<u64>()
        );
        let (_, t, _) = m.into_parts();
        assert_eq!(t.reconnects, 1);
        assert_eq!(t.sent[0], vec![0..MEM]);
        assert_eq!(t.sent[1], vec![a, b], "the failed round's ranges come back");
        assert_eq!(t.sent[2], vec![c]);
        assert!(t.committed);
    }

    #[test]
    fn reconnect_attempts_are_bounded_and_the_failure_says_so() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::ranges(vec![vec![8 * PAGE..9 * PAGE]]);
        let link = Scripted {
            fail_calls: vec![1],
            reconnectable: true,
            failed_reconnects: u32::MAX,
            ..Scripted::default()
        };
        let mut cfg = quick_config();
        cfg.max_downtime = Duration::from_nanos(1);
        cfg.reconnect.attempts = 2;
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let err = m.run().unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Reconnect {
                    round: 1,
                    attempts: 2,
                    ..
                }
            ),
            "{err}"
        );
        let chain = precopy_sys::error_chain(&err);
        assert!(
            chain.contains("2 reconnect attempt(s)")
                && chain.contains("connection refused")
                && chain.contains("connection reset"),
            "{chain}"
        );
        assert_eq!(m.report().reconnects, 0);
        assert_eq!(m.unsent(), &[8 * PAGE..9 * PAGE]);
        assert!(
            events.lock().unwrap().iter().all(|e| *e != "pause"),
            "the workload was never paused"
        );
        let (_, t, _) = m.into_parts();
        assert_eq!(t.failed_reconnects, u32::MAX - 2, "exactly two attempts");
    }

    #[test]
    fn a_failed_migration_keeps_what_was_harvested_but_not_sent() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::ranges(vec![vec![8 * PAGE..9 * PAGE]]);
        let link = Scripted {
            fail_calls: vec![1],
            ..Scripted::default()
        };
        let mut cfg = quick_config();
        cfg.max_downtime = Duration::from_nanos(1);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        let err = m.run().unwrap_err();
        assert!(
            matches!(&err, Error::Send { round: 1, peer, .. } if peer == "test-peer"),
            "{err}"
        );
        assert_eq!(m.unsent(), &[8 * PAGE..9 * PAGE]);
    }

    #[test]
    fn pause_probes_rehearse_the_final_scan_and_their_pages_go_in_the_round() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (0..4 * PAGE, 10 * PAGE..12 * PAGE);
        let (c, d) = (20 * PAGE..21 * PAGE, 30 * PAGE..33 * PAGE);
        let e = 40 * PAGE..45 * PAGE;
        // Scan, probe scan, its pause check scan (e: the workload wrote while paused), scan,
        // probe scan, its pause check scan, final scan (nothing).
        let log = ScriptLog {
            written_while_paused: Some(e.clone()),
            ..ScriptLog::ranges(vec![
                vec![a.clone()],
                vec![b.clone()],
                vec![c.clone()],
                vec![d.clone()],
            ])
        };
        let mut cfg = quick_config();
        cfg.probe_pause = true;
        cfg.max_downtime = Duration::from_nanos(1);
        cfg.max_rounds = 2;
        let mut m = Migration::new(log, Scripted::default(), workload(&events), cfg);
        let report = m.run().unwrap();
        // Each probe pauses around its scans only (the check scan has no pause of its own);
        // then the final phase.
        assert_eq!(
            *events.lock().unwrap(),
            vec!["pause", "resume", "pause", "resume", "pause", "resume"]
        );
        // What the check scan found was written: counted and sent in the round.
        let found: Vec<u64> = report.rounds.iter().map(|r| r.dirty_pages).collect();
        assert_eq!(found, vec![0, 11, 4]);
        let probed = |r: &RoundReport| (r.probe_scan.is_some(), r.probe_check.is_some());
        assert_eq!(probed(&report.rounds[0]), (false, false));
        assert_eq!(probed(&report.rounds[1]), (true, true));
        assert_eq!(
            probed(&report.rounds[2]),
            (true, true),
            "the final round's live scan was probed too (d, sent in it): its report says so"
        );
        assert_eq!(report.workload, None, "this workload keeps no counters");
        let (_, t, _) = m.into_parts();
        assert_eq!(
            t.sent[1],
            vec![a, b, e],
            "the probe's pages go in the next round"
        );
        assert_eq!(t.sent[2], vec![c, d]);
    }

    #[test]
    fn a_failed_migration_reports_the_rounds_that_ran_and_what_the_failed_one_handed_over() {
        // Round 0 fails part-way (a reviewer's report said "0 rounds, 0 pages" after 47 MiB).
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::ranges(vec![vec![8 * PAGE..9 * PAGE]]);
        let link = Scripted {
            fail_calls: vec![0],
            ..Scripted::default()
        };
        let mut n = 0u64;
        let counted = workload(&events).with_counters(move || {
            n += 1000;
            WorkloadCounters {
                operations: n,
                busy: Duration::from_micros(n),
            }
        });
        let mut m = Migration::new(log, link, counted, quick_config());
        m.run().unwrap_err();
        let report = m.report();
        assert_eq!(report.status, Status::Failed);
        // No scan ran, yet the workload's rate while tracked is measured up to the failure.
        let cost = report.workload.expect("the workload counts");
        assert!(cost.during_rate > 0.0, "{cost:?}");
        assert_eq!(cost.dirty_pages, 0);
        assert_eq!(report.rounds.len(), 1);
        let r = &report.rounds[0];
        assert!(r.failed && r.kind == RoundKind::Full, "{r:?}");
        assert_eq!((r.pages, report.pages), (MEM / PAGE / 2, MEM / PAGE / 2));
        let text = report.to_string();
        assert!(
            text.contains("FAILED") && text.contains("1 round(s)"),
            "{text}"
        );
        assert!(text.contains("failed part-way"), "{text}");

        // A later round fails: the rounds before it and the failed one are reported.
        let log = ScriptLog::ranges(vec![vec![8 * PAGE..12 * PAGE]]);
        let link = Scripted {
            fail_calls: vec![1],
            ..Scripted::default()
        };
        let mut cfg = quick_config();
        cfg.max_downtime = Duration::from_nanos(1);
        let mut m = Migration::new(log, link, workload(&events), cfg);
        m.run().unwrap_err();
        let r: Vec<(RoundKind, bool, u64)> = m
            .report()
            .rounds
            .iter()
            .map(|r| (r.kind, r.failed, r.pages))
            .collect();
        assert_eq!(
            r,
            [
                (RoundKind::Full, false, MEM / PAGE),
                (RoundKind::Iterative, true, 2)
            ]
        );
        assert_eq!(m.report().rounds[1].dirty_pages, 4);
    }

    #[test]
    fn outside_subtracts_covered_parts() {
        assert_eq!(outside(&[0..10, 20..30], &[]), vec![0..10, 20..30]);
        assert_eq!(outside(&[0..10, 20..30], &[5..22]), vec![0..5, 22..30]);
        assert_eq!(outside(&[0..10], &[0..2, 4..6, 8..12]), vec![2..4, 6..8]);
        assert!(outside(&[3..4], &[0..10]).is_empty());
        assert_eq!(outside(&[0..4, 6..9], &[3..7]), vec![0..3, 7..9]);
    }

    #[test]
    fn the_dirty_rate_covers_at_least_its_window_and_reads_zero_only_when_nothing_was_found() {
        let ms = Duration::from_millis;
        let mut w = DirtyRate::default();
        // 400 KiB in 2 ms.
        assert_eq!(w.add(400 << 10, ms(2), 0.0), (400 << 10) as f64 / 0.002);
        // A scan 1 ms later that found nothing: the window still holds the first.
        assert_eq!(w.add(0, ms(1), 0.0), (400 << 10) as f64 / 0.003);
        // 200 ms in which nothing was found: that alone covers the window, honestly 0.
        assert_eq!(w.add(0, ms(200), 0.0), 0.0);
        // Scans are dropped from the front only while the rest still cover 100 ms.
        assert_eq!(w.add(100 << 10, ms(50), 0.0), (100 << 10) as f64 / 0.25);
        assert_eq!(w.add(100 << 10, ms(50), 0.0), (200 << 10) as f64 / 0.1);
        assert_eq!(w.add(300 << 10, ms(50), 0.0), (400 << 10) as f64 / 0.1);
        // A new throttle starts a new window.
        assert_eq!(w.add(0, ms(10), 0.2), 0.0);
    }

    #[test]
    fn time_the_workload_spent_paused_by_a_probe_does_not_dilute_the_dirty_rate() {
        // Every scan finds 800 KiB, written while the previous round was sent (the link's
        // 4 MiB/s makes that 196 ms); each pause takes 400 ms, during which nothing is
        // written. A scan after a pause probe covers the pause too: counted, it read the rate
        // as 2 MiB/s instead of 4 (under load a test workload's pause took 950 ms, and the
        // throttle never started).
        let events = Arc::new(Mutex::new(Vec::new()));
        let slow = Callbacks::new(
            move || {
                PAUSED.set(true);
                PAUSES.set(PAUSES.get() + 1);
                std::thread::sleep(Duration::from_millis(400));
                Ok::<_, std::convert::Infallible>(())
            },
            move || {
                PAUSED.set(false);
                events.lock().unwrap().push("resume".to_string());
                Ok(())
            },
        );
        let log = ScriptLog::pages(vec![200]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_nanos(1);
        cfg.max_rounds = 5;
        cfg.throttle.enabled = false;
        let mut m = Migration::new(log, link(4.0 * 1024.0 * 1024.0), slow, cfg);
        let report = m.run().unwrap();
        let probes = report.rounds.iter().filter(|r| r.probe_scan.is_some());
        assert!(probes.count() >= 2, "pause probes ran: {report}");
        let round_time = (200 * PAGE) as f64 / (4.0 * 1024.0 * 1024.0) + 1e-3;
        let rate = (200 * PAGE) as f64 / round_time;
        for r in report.rounds.iter().skip(2) {
            if r.kind == RoundKind::Iterative {
                assert!(r.dirty_rate >= 0.9 * rate, "round {}: {report}", r.round);
            }
        }
    }

    #[test]
    fn a_scan_that_finds_nothing_right_after_scans_that_found_pages_does_not_read_zero() {
        // Scans find 50, 50, then nothing, each a millisecond or so after the last (a fast
        // link, small rounds): the round limit switches over on the empty scan.
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = ScriptLog::pages(vec![50, 50, 0]);
        let mut cfg = MigrationConfig::default();
        cfg.max_downtime = Duration::from_nanos(1);
        cfg.max_rounds = 3;
        cfg.throttle.enabled = false;
        cfg.probe_pause = false;
        let mut m = Migration::new(log, link(1024.0 * 1024.0 * 1024.0), workload(&events), cfg);
        let report = m.run().unwrap();
        assert_eq!(report.switch_reason, Some(SwitchReason::MaxRounds));
        let found: Vec<u64> = report.rounds.iter().map(|r| r.dirty_pages).collect();
        assert_eq!(found, vec![0, 50, 50, 0], "{report:?}");
        let last = report.rounds.last().unwrap();
        assert!(last.dirty_rate > 0.0, "{last:?}");
        assert!(report.dirty_rate > 0.0, "{report:?}");
    }
}
