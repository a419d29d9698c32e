//! The switch-over estimate: what the final phase would cost if the driver paused now.
//!
//! The final phase is pause + final scan + send of the pending pages + checksum and
//! acknowledgement. Each part is estimated twice from what this migration measured: the
//! **expected** value (what the part typically costs; their sum is the report's expected
//! downtime) and a **bound** (what it cost at worst lately). The driver switches over only when
//! the bound's sum, times a margin, fits the limit ([`DowntimeEstimate::bound`]): a downtime
//! limit is a promise, an expected downtime a prediction.
//!
//! * **pause**: expected, the median of up to [`PAUSE_PROBES`] probes (the upper median of
//!   two), or zero if no probe was run; bound, the slowest probe. A probe rehearses the start
//!   of the final phase right after the scans before rounds 1, 2 and 3: it pauses the
//!   workload (timed), scans again (timed: the probe's scan), rehearses the finish, the send
//!   and one pause check scan (below) and resumes it. One probe is one
//!   sample of a scheduler: on a loaded machine it ranged 0.1–55 ms;
//! * **scan**: expected, the lower median of the probes' scans: like the final scan, each
//!   runs with the workload stopped right after a scan with it running, so it walks the same
//!   memory and finds about as few pages. Scans beside the running workload cost about twice
//!   as much, CPU time included (2 GiB on a 2-core machine with a competing process: 2.1–5.5
//!   ms of CPU and 1.9–20 ms of wall time, against 1.5–1.7 ms for the final scan, whose wall
//!   time is its CPU time unless it waits for a CPU), so neither the fastest of them nor their
//!   CPU time predicts it. The lower median (of two, the faster): the first probe follows the
//!   first scan after round 0, which re-protected what was written during all of round 0, and
//!   its scans cost more (0.9–1.5 ms against 0.5–0.9 for the later probes' and the final
//!   scan, 2 GiB, quiet). Without probes, the fastest of the last [`SCAN_WINDOW`] scans.
//!   Bound: the slowest of the last [`SCAN_WINDOW`] scans and of the probes' scans;
//! * **written meanwhile**: the workload keeps writing from the last scan until it is stopped;
//!   at the dirty rate (the latest scans' bytes over at least the last 100 ms they cover)
//!   that adds `rate × (scan + pause)` bytes to the final round (with the bound's scan and pause for the bound). A throttled writer that runs
//!   in bursts can leave a last scan nearly empty, or empty when the throttle had it stopped
//!   for the whole interval, and still write megabytes while it is being stopped if its
//!   throttle is lifted before the stop (`ProcessControl` no longer does that with a cgroup
//!   quota or its duty cycle; see
//!   [`Workload::pause`](crate::Workload::pause)): while a throttle is on, the driver passes at
//!   least the rate of the last scan before the throttle was raised;
//! * **send**: with rehearsal rounds ([`Estimator::add_rehearsal`]: samples of the pending
//!   pages sent inside the pause probes with the workload paused and the threads at the final
//!   phase's priority, as the final round is), the bytes at their time per byte: expected, the
//!   lower median (of two, the faster: one that waited for a CPU does not make it); bound, the
//!   slowest. Their fixed cost per round is spread over about 4 MiB,
//!   so a much smaller final round is expected a little fast and a much bigger one a little
//!   slow. Without rehearsals: expected, the pending bytes at the throughput of the last
//!   iterative round (the round most like the final one: small, of scattered pages, its fixed
//!   costs included). Bound: before two iterative rounds are measured, the duration of the smallest measured
//!   round at least as big as the pending bytes (round 0 at first: a migration does not
//!   switch over right after round 0 unless round 0 itself took no longer than the limit);
//!   then a line `duration = fixed + bytes / bandwidth` fitted by least squares to the last
//!   [`SEND_WINDOW`] iterative rounds, never below `bytes / throughput` for the slowest of
//!   those rounds (the low percentile of recent bandwidth). Rounds shrink as a migration
//!   converges and their fixed costs make a small round slower per byte than the big rounds
//!   before it, which a mean throughput hides;
//! * **paced send** (`--bandwidth`: the transport's token bucket, shared by its connections,
//!   [`Transport::pacing`](crate::Transport::pacing)): a rehearsal small enough to pass
//!   within the bucket measured the socket, not the pacing, so the send is never expected
//!   faster than the bytes past what the bucket holds (by the time the final round starts;
//!   for the bound, what it holds now) at the pacing's rate, in wire bytes as the last round
//!   wrote them, times how much slower than their pacing recent paced rounds went (the
//!   upper median; the bound, the most). Measured before (2026-11-30, `precopy demo --size
//!   512M --dirty-rate 20M --bandwidth 100M --max-downtime 200`): rehearsals at 105-114
//!   MiB/s against a 100 MiB/s cap, downtime above "at most" in 3 of 3 runs;
//! * **finish** (memory digests and the acknowledgement round trip): expected, the upper
//!   median of the finish probes the pause probes took with the workload paused, two in each
//!   (with one, a migration that switched over after two pause probes expected the slower of
//!   two samples: 6.5 ms for 1.6 measured when one had waited for a CPU). The final
//!   acknowledgement runs with the workload paused: measured beside the running workload and a
//!   competing process, the round trip was 2-21 ms against 2-3 ms paused. Without such probes, the
//!   upper median of the last [`FINISH_WINDOW`] probes the transport took after a round
//!   ([`Transport::probe_finish`](crate::Transport::probe_finish): a PING/PONG on every
//!   connection plus the digest of the page-hash table timed at the sender, twice; for a
//!   checkpoint image, which syncs every round so that the final round's own sync is part of
//!   its send time, the index built and timed plus one `fdatasync` of the last records and the
//!   directory sync of the rename, estimated from the image's measured per-round syncs), zero
//!   for a transport that cannot probe. The paused probes' upper median gives way to the
//!   recent probes' when those cost less: the paused ones are taken in the first rounds
//!   only, and a destination can get cheaper after them (an image's finish probed right after
//!   round 0 is that round's whole sync, 609 ms for 1 GiB, and 5-7 ms from the next round
//!   on). Bound: the slowest of the last [`FINISH_WINDOW`] probes of either kind, in the
//!   order taken (a probe follows every round): on a loaded machine the acknowledgement waits
//!   for the receiver to get a CPU, a tail that the typical round trip does not show
//!   (measured: 1.5-2 ms typical, 10-22 ms in 3 of 20 runs), and a slow probe bounds the
//!   finish for the next rounds, not for the rest of the migration (the slowest of all
//!   probes kept an image's round-0 sync, 570-650 ms, as the bound for 30 rounds of 1-20 ms
//!   against a 50 ms limit: forced by the round limit, downtime 7.3 ms);
//! * **re-reads** of memory while paused, which grow with memory size, not with the rounds:
//!   the verify pass over memory the dirty log cannot vouch for (shared memory, hugetlb:
//!   [`DirtyLog::unvouched`](crate::DirtyLog::unvouched), less what the final round sends
//!   anyway) and a full final check's pass over all memory on each end
//!   ([`Transport::finish_reread_bytes`](crate::Transport::finish_reread_bytes)). Each pause
//!   probe (or, without probes, one sample after the first scan) times
//!   [`Transport::changed`](crate::Transport::changed) on a sample of at most
//!   [`REREAD_SAMPLE`] bytes spread over that memory; the parts are those bytes at the
//!   sample's time per byte (upper median of the samples; bound: the slowest sample, stretched
//!   by the upper median of the last [`SCAN_WINDOW`] scans' wall time over CPU time: a sample
//!   is shorter than a time slice and measures the work, a pass of hundreds of milliseconds on
//!   a loaded machine gets the share of the CPU the scans got), the full
//!   check counted twice (the destination re-reads its copy after the source, before it
//!   answers), and what the sample found changed, as a share of it, is added to the final
//!   send. Without a sample while such memory exists there is no estimate (the driver does not
//!   switch over on a guess);
//! * **margin**: each iterative round checks the send bound made before it against what the
//!   round took; the bound's sum is multiplied by the largest recent ratio of actual to
//!   estimated (at least 1, at most [`MAX_MARGIN`]), so an estimator that was optimistic lately
//!   becomes cautious before the pause, not after.
//!
//! * **pause check** (see the crate docs, "The pause check"): [`PAUSE_CHECK_SCANS`] scans of
//!   memory nobody wrote, each expected at the lower median of the probes' rehearsed check
//!   scans ([`Estimator::add_probe_check_scan`]: after its send each pause probe, the workload
//!   still paused, scans once more as the pause check does, finding nothing unless the
//!   workload ran: a clean scan, 0.5-0.7 ms against 0.9-1.5 for the probe's own scan of 2 GiB,
//!   which finds and re-protects what was written since the scan before it); without them, at
//!   the final scan's expected cost. Bound: the slowest scan of all (the probes' and their
//!   check scans included; it bounds the final scan too) for each.
//!
//! Not estimated: the state blob (saved once, while paused; small for a process, a few
//! hundred KiB for a VMM's devices).

use crate::report::DowntimeEstimate;
use std::collections::VecDeque;
use std::time::Duration;

/// Scans of the pause check in a final phase whose workload stayed paused.
pub(crate) const PAUSE_CHECK_SCANS: u32 = 2;
/// Pause probes the driver takes, one after each of the first rounds.
pub(crate) const PAUSE_PROBES: usize = 3;
/// Scans whose slowest wall time bounds the final scan.
pub(crate) const SCAN_WINDOW: usize = 3;
/// Rounds remembered for the send fit and the margin.
pub(crate) const SEND_WINDOW: usize = 4;
/// Finish probes remembered for the finish estimate.
pub(crate) const FINISH_WINDOW: usize = 5;
/// The most a re-read sample reads (the workload is paused meanwhile: about 1 ms on this
/// machine's `process_vm_readv` and page hashing).
pub(crate) const REREAD_SAMPLE: u64 = 2 << 20;
/// The most a pass's wall time is taken to exceed its CPU time in the re-reads' bound.
const MAX_STRETCH: f64 = 8.0;
/// The most the margin grows: one freak round (a competing process took the CPU) must not
/// stop a migration from ever converging.
pub(crate) const MAX_MARGIN: f64 = 1.5;
/// A round smaller than this says little about bandwidth (latency-bound): it counts for the
/// fitted line's fixed cost but not for the low-percentile bandwidth.
const MIN_ROUND_BYTES: u64 = 256 << 10;

/// One sample of a sent round.
#[derive(Debug, Clone, Copy)]
struct Sample {
    bytes: f64,
    secs: f64,
}

impl DowntimeEstimate {
    /// The expected downtime: pause + scan + verify + send + check + finish + full check.
    pub fn total(&self) -> Duration {
        self.pause
            .saturating_add(self.scan)
            .saturating_add(self.verify)
            .saturating_add(self.send)
            .saturating_add(self.check)
            .saturating_add(self.finish)
            .saturating_add(self.full_check)
    }

    /// The pause check's part of [`DowntimeEstimate::bound`] (before the margin).
    pub fn check_bound(&self) -> Duration {
        self.check
            .max(self.scan_worst.saturating_mul(PAUSE_CHECK_SCANS))
    }

    /// What the decision compares with the limit: the bound of each part (the slowest
    /// recent scan and finish probe, the send bound), times the margin.
    pub fn bound(&self) -> Duration {
        let finish = self.finish.max(self.finish_worst);
        let worst = (self.pause.max(self.pause_worst))
            .saturating_add(self.scan.max(self.scan_worst))
            .saturating_add(self.verify.max(self.verify_worst))
            .saturating_add(self.send.max(self.send_worst))
            .saturating_add(self.check_bound())
            .saturating_add(self.full_check.max(self.full_check_worst));
        let worst = worst.saturating_add(finish);
        Duration::try_from_secs_f64(worst.as_secs_f64() * self.margin.max(1.0))
            .unwrap_or(Duration::MAX)
    }
}

impl DowntimeEstimate {
    /// The parts of [`DowntimeEstimate::bound`] that no round can shrink: pause, scan, the
    /// send's fixed cost per round, the pause check, the finish and the re-reads, times the
    /// margin. When this alone exceeds the limit, no final round fits it however little it
    /// sends.
    pub fn fixed_bound(&self) -> Duration {
        let fixed = (self.pause.max(self.pause_worst))
            .saturating_add(self.scan.max(self.scan_worst))
            .saturating_add(self.fixed)
            .saturating_add(self.finish.max(self.finish_worst))
            .saturating_add(self.verify.max(self.verify_worst))
            .saturating_add(self.full_check.max(self.full_check_worst))
            .saturating_add(self.check_bound());
        Duration::try_from_secs_f64(fixed.as_secs_f64() * self.margin.max(1.0))
            .unwrap_or(Duration::MAX)
    }
}

/// Learns the final phase's costs from the rounds and scans of one migration.
#[derive(Debug, Default)]
pub(crate) struct Estimator {
    pauses: Vec<Duration>,
    /// The last [`SCAN_WINDOW`] scans' wall times.
    scans: VecDeque<Duration>,
    /// The pause probes' scans, with the workload paused: wall time.
    probe_scans: Vec<Duration>,
    /// The pause probes' rehearsals of one pause check scan (after their send, the workload
    /// still paused): wall time.
    probe_check_scans: Vec<Duration>,
    rounds: VecDeque<Sample>,
    /// Rehearsal rounds: sent inside the pause probes under the final round's conditions.
    rehearsals: Vec<Sample>,
    /// Round 0 (or any round) when no iterative round is big enough yet.
    fallback: Option<Sample>,
    /// actual ÷ estimated send time of recent rounds.
    errors: VecDeque<f64>,
    /// Recent probes of the finish cost (digests + acknowledgement round trip).
    finishes: VecDeque<Duration>,
    /// Finish probes taken inside the pause probes, with the workload paused.
    paused_finishes: Vec<Duration>,
    /// The last [`FINISH_WINDOW`] finish probes of either kind, in the order taken: what the
    /// finish cost at worst lately (the bound).
    recent_finishes: VecDeque<Duration>,
    /// Re-read samples: seconds per byte, and the share of the sample found changed.
    rereads: Vec<(f64, f64)>,
    /// Wall time ÷ CPU time of the last [`SCAN_WINDOW`] scans: how much longer than its work
    /// a pass of several milliseconds took on this machine lately.
    stretches: VecDeque<f64>,
    /// What the final phase would re-read: the verify pass's bytes and the full final
    /// check's bytes per end ([`Estimator::set_rereads`]).
    verify_bytes: u64,
    full_check_bytes: u64,
    /// The transport's pacing when last asked ([`Estimator::set_pacing`]).
    pacing: Option<crate::Pacing>,
    /// Bytes on the wire per byte of memory in the last round that wrote any (compression,
    /// zero-page markers and framing); what a paced send of the final round writes.
    wire_ratio: Option<f64>,
    /// Each recent paced round's (iterative or rehearsal) time over the time its pacing
    /// allowed (at least 1): the round's own costs (reading, the first frame before any
    /// pacing, the end of the round) and, with several connections, pages split unevenly
    /// between their buckets.
    paced_slowdown: VecDeque<f64>,
}

/// The upper median of `v` (zero when empty): one slow sample of a busy scheduler does not
/// decide, a majority does.
fn upper_median(v: impl Iterator<Item = Duration>) -> Duration {
    middle(v, Duration::cmp, false)
}

/// The lower median of `v` (zero when empty): of two samples, the faster.
fn lower_median(v: impl Iterator<Item = Duration>) -> Duration {
    middle(v, Duration::cmp, true)
}

/// The lower median of `v` (zero when empty).
fn lower_median_f64(v: impl Iterator<Item = f64>) -> f64 {
    middle(v, f64::total_cmp, true)
}

/// The upper median of `v` (zero when empty).
fn upper_median_f64(v: impl Iterator<Item = f64>) -> f64 {
    middle(v, f64::total_cmp, false)
}

/// The middle of `v` sorted by `cmp` (the default value when empty); of an even count, the
/// lower of the two middle samples when `lower`, else the upper.
fn middle<T: Copy + Default>(
    v: impl Iterator<Item = T>,
    cmp: impl FnMut(&T, &T) -> std::cmp::Ordering,
    lower: bool,
) -> T {
    let mut v: Vec<T> = v.collect();
    v.sort_unstable_by(cmp);
    let at = if lower {
        v.len().saturating_sub(1) / 2
    } else {
        v.len() / 2
    };
    v.get(at).copied().unwrap_or_default()
}

fn push<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(v);
}

impl Estimator {
    pub fn add_pause(&mut self, pause: Duration) {
        self.pauses.push(pause);
    }

    /// The transport's pacing now ([`Transport::pacing`](crate::Transport::pacing)): the
    /// send is then expected no faster than its rate lets the bytes through.
    pub fn set_pacing(&mut self, pacing: Option<crate::Pacing>) {
        self.pacing = pacing.filter(|p| p.rate > 0);
    }

    /// The time the transport's pacing alone takes to let `bytes` through (what its bucket
    /// holds now goes at once), or `None` when it is not paced: a floor on their send when
    /// no round was measured whole (the only one was cut short by the timeout).
    pub fn paced_send(&self, bytes: u64) -> Option<Duration> {
        self.paced(bytes, Duration::ZERO)
    }

    /// Records how much slower than its pacing (`paced`) a round that took `took` went, if
    /// the pacing is what held it up (at least half of its time): a round its bucket let
    /// through at once measured the socket, which the send estimate has already.
    fn add_paced_slowdown(&mut self, paced: Option<Duration>, took: Duration) {
        if let Some(paced) = paced.filter(|p| !p.is_zero() && *p >= took / 2) {
            let slowdown = took.as_secs_f64() / paced.as_secs_f64();
            push(&mut self.paced_slowdown, slowdown.max(1.0), SEND_WINDOW);
        }
    }

    /// The least time the paced transport takes to write `bytes` of memory if the final round
    /// started `after` from now: the bytes past what its bucket holds by then, at its rate.
    /// The pacing counts wire bytes; memory goes out as the last round's did. `None`: not
    /// paced.
    fn paced(&self, bytes: u64, after: Duration) -> Option<Duration> {
        let p = self.pacing?;
        let wire = self.wire_ratio.unwrap_or(1.0);
        let rate = p.rate as f64 / wire;
        let ready = (p.ready as f64 + p.rate as f64 * after.as_secs_f64())
            .min(p.burst.max(p.ready) as f64)
            / wire;
        Some(
            Duration::try_from_secs_f64((bytes as f64 - ready).max(0.0) / rate)
                .unwrap_or(Duration::MAX),
        )
    }

    /// A round sent: `memory` bytes of memory as `wire` bytes on the wire.
    pub fn add_wire(&mut self, memory: u64, wire: u64) {
        if memory > 0 && wire > 0 {
            self.wire_ratio = Some(wire as f64 / memory as f64);
        }
    }

    /// Pause probes recorded so far.
    pub fn pause_probes(&self) -> usize {
        self.pauses.len()
    }

    /// The upper median of the pause probes.
    fn pause(&self) -> Duration {
        upper_median(self.pauses.iter().copied())
    }

    /// Records one probe of what finishing would cost (see [`Estimator::estimate`]).
    pub fn add_finish(&mut self, finish: Duration) {
        push(&mut self.finishes, finish, FINISH_WINDOW);
        push(&mut self.recent_finishes, finish, FINISH_WINDOW);
    }

    /// Records a finish probe taken inside a pause probe, with the workload paused as it is
    /// for the real acknowledgement: these decide the expected finish.
    pub fn add_paused_finish(&mut self, finish: Duration) {
        self.paused_finishes.push(finish);
        push(&mut self.recent_finishes, finish, FINISH_WINDOW);
    }

    /// Records a re-read sample: `bytes` re-read and compared in `took`, `changed` of them
    /// found different from what was sent.
    pub fn add_reread(&mut self, bytes: u64, took: Duration, changed: u64) {
        if bytes == 0 {
            return;
        }
        let b = bytes as f64;
        self.rereads
            .push((took.as_secs_f64() / b, changed.min(bytes) as f64 / b));
    }

    /// Records a scan's wall and CPU time (see [`Estimator::estimate`], re-reads).
    pub fn add_scan_share(&mut self, wall: Duration, cpu: Duration) {
        if cpu.is_zero() {
            return;
        }
        let stretch = (wall.as_secs_f64() / cpu.as_secs_f64()).clamp(1.0, MAX_STRETCH);
        push(&mut self.stretches, stretch, SCAN_WINDOW);
    }

    /// Re-read samples taken so far.
    pub fn reread_samples(&self) -> usize {
        self.rereads.len()
    }

    /// Whether the final phase would re-read memory (a verify pass or a full final check):
    /// then [`Estimator::estimate`] waits for a re-read sample.
    pub fn rereads_memory(&self) -> bool {
        self.verify_bytes.saturating_add(self.full_check_bytes) > 0
    }

    /// What the final phase would re-read if the driver paused now: `verify` bytes the dirty
    /// log cannot vouch for and the final round would not send anyway, and `full_check` bytes
    /// re-read on each end by the final check.
    pub fn set_rereads(&mut self, verify: u64, full_check: u64) {
        self.verify_bytes = verify;
        self.full_check_bytes = full_check;
    }

    /// (expected, slowest) seconds per byte and (expected, largest) changed share of the
    /// re-read samples, or `None` without one.
    fn reread_costs(&self) -> Option<((f64, f64), (f64, f64))> {
        if self.rereads.is_empty() {
            return None;
        }
        let upper = |v: Vec<f64>| {
            let max = v.iter().copied().fold(0.0, f64::max);
            (upper_median_f64(v.into_iter()), max)
        };
        Some((
            upper(self.rereads.iter().map(|r| r.0).collect()),
            upper(self.rereads.iter().map(|r| r.1).collect()),
        ))
    }

    pub fn add_scan(&mut self, scan: Duration) {
        push(&mut self.scans, scan, SCAN_WINDOW);
    }

    /// Records a pause probe's scan (with the workload paused, right after a scan with it
    /// running): `wall` time, and `cpu` time when measured (reported, not used: see
    /// [`Estimator::estimate`]).
    pub fn add_probe_scan(&mut self, wall: Duration, cpu: Option<Duration>) {
        let _ = cpu;
        self.probe_scans.push(wall);
    }

    /// Records a pause probe's rehearsal of one pause check scan: `wall` time of a scan taken
    /// after the probe's send with the workload still paused, so that it finds nothing (a
    /// clean scan), as the pause check's scans do after the final send.
    pub fn add_probe_check_scan(&mut self, wall: Duration) {
        self.probe_check_scans.push(wall);
    }

    /// The last [`SCAN_WINDOW`] scans' wall times.
    fn recent_walls(&self) -> impl Iterator<Item = Duration> + '_ {
        self.scans.iter().copied()
    }

    /// Records a sent round of `bytes` memory bytes that took `took`; `iterative` is false
    /// for round 0 (a sequential sweep, not like the scattered rounds that follow).
    pub fn add_round(&mut self, bytes: u64, took: Duration, iterative: bool) {
        if bytes == 0 || took.is_zero() {
            return;
        }
        if iterative && let Some(predicted) = self.send_bound(bytes) {
            // Against the bound the decision counts: a paced round no faster than its pacing
            // (as it stood right before the round), so a pacing slower than its rate shows.
            let paced = self.paced(bytes, Duration::ZERO);
            self.add_paced_slowdown(paced, took);
            let predicted = predicted.max(paced.unwrap_or_default());
            let p = predicted.as_secs_f64();
            if p > 0.0 {
                push(&mut self.errors, took.as_secs_f64() / p, SEND_WINDOW);
            }
        }
        let s = Sample {
            bytes: bytes as f64,
            secs: took.as_secs_f64(),
        };
        if !iterative || self.fallback.is_none() {
            self.fallback = Some(s);
        }
        if iterative {
            push(&mut self.rounds, s, SEND_WINDOW);
        }
    }

    /// Records a rehearsal round ([`RoundKind::Rehearsal`](crate::RoundKind)): `bytes` sent in
    /// `took` inside a pause probe, the workload paused and the threads at the final phase's
    /// priority. A rehearsal smaller than [`MIN_ROUND_BYTES`] says little about bandwidth
    /// and is not kept.
    pub fn add_rehearsal(&mut self, bytes: u64, took: Duration) {
        if bytes < MIN_ROUND_BYTES || took.is_zero() {
            return;
        }
        // Sent under the final round's conditions: what it took beyond its pacing is what the
        // final round's will take.
        self.add_paced_slowdown(self.paced(bytes, Duration::ZERO), took);
        self.rehearsals.push(Sample {
            bytes: bytes as f64,
            secs: took.as_secs_f64(),
        });
    }

    /// (lower median, slowest) seconds per byte of the rehearsal rounds, or `None` without one.
    /// The lower median: of the usual two or three rehearsals, one that waited for a CPU must
    /// not make the expected send; the bound keeps the slowest. With two, the upper median was
    /// the slower: a rehearsal at 760 MB/s against 1960 expected a final round of 15.8 MB in
    /// 21.3 ms that took 8.2 (2 GiB hot-set demo with a CPU hog, load 7.6).
    fn rehearsed(&self) -> Option<(f64, f64)> {
        if self.rehearsals.is_empty() {
            return None;
        }
        let per_byte = || self.rehearsals.iter().map(|s| s.secs / s.bytes);
        Some((lower_median_f64(per_byte()), per_byte().fold(0.0, f64::max)))
    }

    /// (fixed seconds, bytes per second) of the least-squares line through the recent rounds,
    /// or `None` with fewer than two distinct sizes or a line that does not rise.
    fn fit(&self) -> Option<(f64, f64)> {
        let n = self.rounds.len();
        if n < 2 {
            return None;
        }
        let nf = n as f64;
        let mx = self.rounds.iter().map(|s| s.bytes).sum::<f64>() / nf;
        let my = self.rounds.iter().map(|s| s.secs).sum::<f64>() / nf;
        let sxx: f64 = self.rounds.iter().map(|s| (s.bytes - mx).powi(2)).sum();
        let sxy: f64 = self
            .rounds
            .iter()
            .map(|s| (s.bytes - mx) * (s.secs - my))
            .sum();
        if sxx <= 0.0 || sxy <= 0.0 {
            return None;
        }
        let slope = sxy / sxx;
        let fixed = (my - slope * mx).max(0.0);
        Some((fixed, 1.0 / slope))
    }

    /// The slowest throughput among the recent rounds big enough to say something about
    /// bandwidth (or the fallback round's).
    fn low_throughput(&self) -> Option<f64> {
        let slowest = self
            .rounds
            .iter()
            .filter(|s| s.bytes >= MIN_ROUND_BYTES as f64)
            .map(|s| s.bytes / s.secs)
            .fold(f64::INFINITY, f64::min);
        if slowest.is_finite() && slowest > 0.0 {
            return Some(slowest);
        }
        self.fallback.map(|s| s.bytes / s.secs)
    }

    /// Estimated time to send `bytes`, or `None` before any round was measured.
    fn send_bound(&self, bytes: u64) -> Option<Duration> {
        if bytes == 0 {
            return Some(Duration::ZERO);
        }
        let b = bytes as f64;
        let low = b / self.low_throughput()?;
        let secs = match self.fit() {
            Some((fixed, bw)) => low.max(fixed + b / bw),
            // No line yet, so no fixed cost known: a round is taken to last as long as the
            // smallest measured round at least as big (round 0 at first), which bounds it.
            None => {
                let bigger = self
                    .rounds
                    .iter()
                    .chain(&self.fallback)
                    .filter(|s| s.bytes >= b)
                    .map(|s| s.secs)
                    .fold(f64::INFINITY, f64::min);
                if bigger.is_finite() {
                    bigger.max(low)
                } else {
                    low
                }
            }
        };
        Duration::try_from_secs_f64(secs).ok()
    }

    /// The final phase if the driver paused now with `pending` bytes to send, or `None`
    /// before any round was measured.
    /// The time to send `bytes` at the throughput of the last iterative round big enough to
    /// measure, else round 0's; the bound before any round.
    fn send_expected(&self, bytes: u64) -> Option<Duration> {
        // Before any iterative round big enough, round 0's throughput: its whole time (what
        // the bound takes, as it knows no fixed cost yet) is no typical figure for fewer bytes.
        let last = self
            .rounds
            .iter()
            .rev()
            .find(|s| s.bytes >= MIN_ROUND_BYTES as f64)
            .or(self
                .fallback
                .as_ref()
                .filter(|s| s.bytes > 0.0 && s.secs > 0.0));
        match last {
            Some(s) => Duration::try_from_secs_f64(bytes as f64 * s.secs / s.bytes).ok(),
            None => self.send_bound(bytes),
        }
    }

    /// The final phase if the driver paused now, with `pending` bytes left by the last scan
    /// and the workload finding new pages at `dirty_rate` bytes per second: it keeps writing
    /// until it is stopped, and what it writes meanwhile goes in the final round too.
    pub fn estimate(&self, pending: u64, dirty_rate: f64) -> Option<DowntimeEstimate> {
        // Memory re-read while paused: at the samples' cost per byte; no sample, no estimate.
        let rereads = self.verify_bytes.saturating_add(self.full_check_bytes);
        let ((per_byte, per_byte_worst), (changed, changed_worst)) = match self.reread_costs() {
            Some(c) => c,
            None if rereads > 0 => return None,
            None => ((0.0, 0.0), (0.0, 0.0)),
        };
        let secs = |bytes: u64, per_byte: f64| {
            Duration::try_from_secs_f64(bytes as f64 * per_byte).unwrap_or(Duration::MAX)
        };
        // A sample is shorter than a time slice: it measures the work. A pass of hundreds of
        // milliseconds on a loaded machine gets the CPU share the recent scans got (measured
        // under load 8-10: 2.8-3.2x the sample's time per byte), which the bound counts.
        let stretch = upper_median_f64(self.stretches.iter().copied()).max(1.0);
        let per_byte_worst = per_byte_worst * stretch;
        let verify = secs(self.verify_bytes, per_byte);
        let verify_worst = secs(self.verify_bytes, per_byte_worst);
        // Both ends read all memory, one after the other.
        let full_check = secs(self.full_check_bytes.saturating_mul(2), per_byte);
        let full_check_worst = secs(self.full_check_bytes.saturating_mul(2), per_byte_worst);
        // What the verify pass finds changed goes in the final round.
        let found = (self.verify_bytes as f64 * changed) as u64;
        let found_worst = (self.verify_bytes as f64 * changed_worst) as u64;
        let pending_worst = pending.saturating_add(found_worst);
        let pending = pending.saturating_add(found);
        let pause = self.pause();
        let pause_worst = self.pauses.iter().copied().max().unwrap_or_default();
        let scan_worst = self.recent_walls().max().unwrap_or_default();
        let rate = if dirty_rate.is_finite() {
            dirty_rate.max(0.0)
        } else {
            0.0
        };
        // The final scan runs with the workload stopped, right after a scan with it running:
        // it costs what the pause probes' scans, run the same way, cost. Scans beside the
        // running workload cost about twice as much, CPU time included (measured: 2.1-5.5 ms
        // of CPU against 1.5-1.7 for final scans of 2 GiB). The lower median (of two, the
        // faster): the first probe follows the first scan after round 0, which found and
        // re-protected what the workload wrote during all of round 0, and every scan in it
        // costs more (2 GiB hot-set demo with a CPU hog, quiet: 0.9-1.5 ms against 0.5-0.9
        // for the second probe's scan and the final scan; the upper median of the two was
        // the final scan's cost +0.4 ms in the median of 20 runs).
        let scan = if self.probe_scans.is_empty() {
            self.recent_walls().min().unwrap_or_default()
        } else {
            lower_median(self.probe_scans.iter().copied())
        };
        // The bound (of the final scan and of each pause check scan) is the slowest scan of
        // all, the probes' included.
        let scan_worst = (self.probe_scans.iter())
            .chain(&self.probe_check_scans)
            .copied()
            .fold(scan_worst, Duration::max);
        let meanwhile = (rate * (scan + pause).as_secs_f64()) as u64;
        let meanwhile_worst = (rate * (scan_worst + pause_worst).as_secs_f64()) as u64;
        let (send, send_worst) = match self.rehearsed() {
            // The final round's own conditions, rehearsed: its bytes at the rehearsals' time
            // per byte (upper median; bound: the slowest).
            Some((per_byte, per_byte_worst)) => {
                let at = |bytes: u64, per_byte: f64| {
                    Duration::try_from_secs_f64(bytes as f64 * per_byte).unwrap_or(Duration::MAX)
                };
                let worst = at(
                    pending_worst.saturating_add(meanwhile_worst),
                    per_byte_worst,
                );
                (
                    at(pending.saturating_add(meanwhile), per_byte).min(worst),
                    worst,
                )
            }
            None => {
                let worst = self.send_bound(pending_worst.saturating_add(meanwhile_worst))?;
                (
                    self.send_expected(pending.saturating_add(meanwhile))?
                        .min(worst),
                    worst,
                )
            }
        };
        // A paced transport lets the bytes through no faster than its rate once its bucket
        // is spent: what it holds now, plus what it gains until the final round starts (the
        // scan and the pause; none for the bound). A rehearsal short enough to pass within
        // the bucket measured the socket, not the pacing.
        let (send, send_worst) = match (
            self.paced(pending.saturating_add(meanwhile), scan + pause),
            self.paced(
                pending_worst.saturating_add(meanwhile_worst),
                Duration::ZERO,
            ),
        ) {
            (Some(paced), Some(paced_worst)) => {
                let slowdown = upper_median_f64(self.paced_slowdown.iter().copied()).max(1.0);
                let slowdown_worst = self.paced_slowdown.iter().copied().fold(1.0, f64::max);
                let paced = paced.mul_f64(slowdown);
                let worst = send_worst.max(paced_worst.mul_f64(slowdown_worst));
                (send.max(paced).min(worst), worst)
            }
            _ => (send, send_worst),
        };
        let (fixed, bandwidth) = self
            .fit()
            .map_or((0.0, self.low_throughput().unwrap_or(0.0)), |f| f);
        let margin = self
            .errors
            .iter()
            .copied()
            .fold(1.0, f64::max)
            .min(MAX_MARGIN);
        // The acknowledgement comes with the workload paused: the probes taken paused decide
        // the expected part, unless the recent probes cost less: the paused ones are only
        // taken in the first rounds, and what the destination costs can fall after them (an
        // image's finish is estimated from its per-round syncs: right after round 0 from that
        // one sync of all memory alone, 609 ms for 1 GiB, then 5-7 ms once a small round's
        // sync was measured; the final phase's finish took 4.6-5.2 ms). The bound keeps the
        // slowest of the last FINISH_WINDOW probes of either kind, the paused ones included
        // while they are among them: a slow probe bounds the finish for that many probes
        // (one after every round), not for the rest of the migration.
        let recent = upper_median(self.finishes.iter().copied());
        let finish = if self.paused_finishes.is_empty() {
            recent
        } else if self.finishes.is_empty() {
            upper_median(self.paused_finishes.iter().copied())
        } else {
            upper_median(self.paused_finishes.iter().copied()).min(recent)
        };
        let finish_worst = self
            .recent_finishes
            .iter()
            .copied()
            .max()
            .unwrap_or_default();
        // The pause check's scans find nothing (the workload stopped before the final scan)
        // and cost what the probes' rehearsed check scans cost, a clean scan: 0.5-0.7 ms
        // against 0.9-1.5 for the probes' scans, which find and re-protect what was written
        // since the scan before them (2 GiB hot-set demo with a CPU hog: expected 2.03 ms for
        // the two, measured 1.22). The lower median, as for the final scan: the first probe's
        // check scan was the slowest in 6 of 10 runs. Without such samples, each at the final
        // scan's cost.
        let check = if self.probe_check_scans.is_empty() {
            scan
        } else {
            lower_median(self.probe_check_scans.iter().copied())
        }
        .saturating_mul(PAUSE_CHECK_SCANS);
        let rehearsed = self.rehearsed();
        Some(DowntimeEstimate {
            send_from: if rehearsed.is_some() {
                "rehearsals"
            } else {
                "rounds"
            },
            rehearsed_throughput: rehearsed
                .map_or(0.0, |r| if r.0 > 0.0 { 1.0 / r.0 } else { 0.0 }),
            rehearsed_worst_throughput: rehearsed
                .map_or(0.0, |r| if r.1 > 0.0 { 1.0 / r.1 } else { 0.0 }),
            paced_rate: self.pacing.map_or(0.0, |p| p.rate as f64),
            pending_bytes: pending - found,
            meanwhile_bytes: meanwhile,
            meanwhile_rate: rate,
            verify_bytes: self.verify_bytes,
            verify_changed_bytes: found,
            verify,
            verify_worst,
            full_check_bytes: self.full_check_bytes,
            full_check,
            full_check_worst,
            pause,
            pause_worst,
            scan,
            scan_worst,
            send,
            send_worst,
            check,
            finish,
            finish_worst,
            margin,
            bandwidth,
            fixed: Duration::from_secs_f64(fixed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    #[test]
    fn nothing_measured_means_no_estimate() {
        assert!(Estimator::default().estimate(MIB, 0.0).is_none());
        assert_eq!(
            Estimator::default().estimate(0, 0.0).unwrap().total(),
            Duration::ZERO
        );
    }

    #[test]
    fn fixed_cost_per_round_is_learned_from_shrinking_rounds() {
        // 20 ms per round + 250 MiB/s: a mean throughput would promise a small round far too fast.
        let mut e = Estimator::default();
        e.add_round(2048 * MIB, ms(8192.0), false);
        for mib in [200u64, 50, 20, 10] {
            e.add_round(mib * MIB, ms(20.0 + mib as f64 * 4.0), true);
        }
        let est = e.estimate(5 * MIB, 0.0).unwrap();
        let bound = est.send_worst.as_secs_f64() * 1e3;
        assert!((bound - 40.0).abs() < 0.5, "{bound}");
        // Expected: at the last round's throughput (10 MiB in 60 ms), its fixed cost spread
        // over its bytes.
        let send = est.send.as_secs_f64() * 1e3;
        assert!((send - 30.0).abs() < 0.5, "{send}");
        assert!((est.fixed.as_secs_f64() * 1e3 - 20.0).abs() < 0.5);
        assert!((est.bandwidth / MIB as f64 - 250.0).abs() < 1.0);
        // The first two rounds took less than the bound estimated for them, the line predicted
        // the last two exactly: no margin.
        assert!((est.margin - 1.0).abs() < 1e-9, "{}", est.margin);
    }

    /// Switched over right after round 0 (the round limit, the timeout): the expected send is
    /// the pending bytes at round 0's throughput, not round 0's whole time (which the bound
    /// keeps, knowing no fixed cost yet). A review found 1985 ms expected for 506 measured.
    #[test]
    fn after_round_0_only_the_expected_send_scales_with_the_bytes() {
        let mut e = Estimator::default();
        e.add_round(64 * MIB, ms(2000.0), false);
        let est = e.estimate(16 * MIB, 0.0).unwrap();
        let send = est.send.as_secs_f64() * 1e3;
        assert!((send - 500.0).abs() < 1.0, "{send}");
        assert_eq!(est.send_worst, ms(2000.0));
    }

    #[test]
    fn estimate_includes_pause_and_the_slowest_recent_scan() {
        let mut e = Estimator::default();
        e.add_pause(ms(3.0));
        e.add_pause(ms(40.0));
        e.add_pause(ms(1.0));
        for s in [9.0, 2.0, 4.0, 1.0] {
            e.add_scan(ms(s));
        }
        e.add_round(100 * MIB, ms(1000.0), false);
        let est = e.estimate(MIB, 0.0).unwrap();
        // The median probe: one slow probe does not decide.
        assert_eq!(est.pause, ms(3.0));
        // No probe scan. The 9 ms scan fell out of the window of three: of 2, 4 and 1 ms, the
        // fastest is expected, the slowest is the bound.
        assert_eq!((est.scan, est.scan_worst), (ms(1.0), ms(4.0)));
        // No finish probe: that part is zero, not guessed.
        assert_eq!(est.finish, Duration::ZERO);
        // The pause check: two scans of unchanged memory, each at the final scan's cost.
        assert_eq!(est.check, est.scan * 2);
        assert_eq!(est.total(), est.pause + est.scan + est.send + est.check);
    }

    #[test]
    fn the_final_scan_is_expected_at_what_the_probes_scans_took() {
        // Recorded (2 GiB demo, CPU hog on one core, load 6.5): scans beside the running
        // workload took 7.79 and 5.43 ms, the probes' scans with it paused 3.66 and 3.79 ms;
        // the final scan then took 3.60 ms.
        let mut e = Estimator::default();
        e.add_round(2048 * MIB, ms(5000.0), false);
        for (live, probe) in [(7.79, 3.66), (5.43, 3.79)] {
            e.add_scan(ms(live));
            e.add_pause(ms(0.2));
            e.add_probe_scan(ms(probe), Some(ms(1.7)));
        }
        let est = e.estimate(MIB, 0.0).unwrap();
        // The lower median of the two probes (the faster), not the fastest scan beside the
        // workload.
        assert_eq!(est.scan, ms(3.66));
        // The bound keeps the slowest scan.
        assert_eq!(est.scan_worst, ms(7.79));
        // A probe slower than every live scan raises the bound.
        e.add_probe_scan(ms(9.0), None);
        let est = e.estimate(MIB, 0.0).unwrap();
        assert_eq!((est.scan, est.scan_worst), (ms(3.79), ms(9.0)));
        // The part is in the sum, twice more for the pause check.
        assert_eq!(est.check, ms(3.79) * 2);
        assert_eq!(
            est.total(),
            est.pause + est.scan + est.send + est.check + est.finish
        );
    }

    #[test]
    fn the_pause_check_is_expected_at_what_the_probes_rehearsed_check_scans_took() {
        // Recorded (2 GiB hot-set demo, CPU hog on one core, load 1.2): the probes' scans took
        // 1.02 and 0.70 ms, the final phase's two pause check scans, which find nothing,
        // 1.22 ms together; the old rule expected 2.03 (twice the slower probe scan).
        let mut e = Estimator::default();
        e.add_round(2048 * MIB, ms(5000.0), false);
        for (live, probe) in [(2.42, 1.02), (0.7, 0.70)] {
            e.add_scan(ms(live));
            e.add_pause(ms(0.3));
            e.add_probe_scan(ms(probe), None);
        }
        let before = e.estimate(MIB, 0.0).unwrap();
        assert_eq!(
            before.check,
            before.scan * 2,
            "no rehearsed check scan: each at the final scan's cost"
        );
        // Each probe rehearsed one check scan after its send, the workload still paused.
        for check in [0.61, 0.58] {
            e.add_probe_check_scan(ms(check));
        }
        let est = e.estimate(MIB, 0.0).unwrap();
        // The lower median of the rehearsals (of two, the faster), once per scan of the
        // pause check.
        assert_eq!(est.check, ms(0.58) * 2);
        assert_eq!(
            est.scan, before.scan,
            "the final scan is not what the check is"
        );
        assert_eq!(est.total(), before.total() - before.check + ms(0.58) * 2);
        // The bound keeps the slowest scan for each check scan.
        assert_eq!(est.check_bound(), ms(2.42) * 2);
        assert_eq!(est.bound(), before.bound());
        // A rehearsed check scan slower than every other scan (it waited for a CPU) raises
        // the bound, of the final scan too, without deciding the expected part alone.
        e.add_probe_check_scan(ms(5.0));
        let est = e.estimate(MIB, 0.0).unwrap();
        assert_eq!(est.check, ms(0.61) * 2);
        assert_eq!((est.scan_worst, est.check_bound()), (ms(5.0), ms(5.0) * 2));
    }

    #[test]
    fn finish_is_the_upper_median_of_the_recent_probes() {
        let mut e = Estimator::default();
        e.add_round(100 * MIB, ms(1000.0), false);
        let before = e.estimate(MIB, 0.0).unwrap();
        // An old slow probe falls out of the window of five; of the rest, one stall (40 ms)
        // does not decide, the typical round trip does.
        for f in [90.0, 2.0, 40.0, 3.0, 2.5, 2.0] {
            e.add_finish(ms(f));
        }
        let est = e.estimate(MIB, 0.0).unwrap();
        assert_eq!(est.finish, ms(2.5));
        assert_eq!(est.total(), before.total() + ms(2.5));
        assert_eq!(
            est.total(),
            est.pause + est.scan + est.send + est.check + est.finish,
            "total is the sum of the parts"
        );
        // Three stalls among the five recent probes do decide: the machine is that busy now.
        for f in [30.0, 35.0, 32.0] {
            e.add_finish(ms(f));
        }
        assert_eq!(e.estimate(MIB, 0.0).unwrap().finish, ms(30.0));
    }

    #[test]
    fn the_finish_is_expected_from_the_paused_probes_and_bounded_by_all() {
        let mut e = Estimator::default();
        e.add_round(100 * MIB, ms(1000.0), false);
        for f in [20.0, 9.0, 25.0] {
            e.add_finish(ms(f));
        }
        assert_eq!(e.estimate(MIB, 0.0).unwrap().finish, ms(20.0));
        // Probes inside the pause probes, with the workload paused, decide the expected part;
        // the slowest probe of all stays the bound.
        for f in [2.0, 2.5, 2.1] {
            e.add_paused_finish(ms(f));
        }
        let est = e.estimate(MIB, 0.0).unwrap();
        assert_eq!((est.finish, est.finish_worst), (ms(2.1), ms(25.0)));
        e.add_paused_finish(ms(40.0));
        assert_eq!(e.estimate(MIB, 0.0).unwrap().finish_worst, ms(40.0));
    }

    /// A review: an image's first finish probes (609 ms, the sync of round 0's 1 GiB, the
    /// only one measured yet) stayed the bound for good; every later probe took 5-7 ms and
    /// the 30 rounds of 1-20 ms ran out against a 50 ms limit (downtime 7.3 ms).
    #[test]
    fn a_slow_first_finish_probe_stops_bounding_the_finish_once_newer_ones_replace_it() {
        let mut e = Estimator::default();
        e.add_round(1024 * MIB, ms(970.0), false);
        e.add_finish(ms(609.0));
        for f in [609.0, 608.6, 7.2, 7.0] {
            e.add_paused_finish(ms(f));
        }
        let est = e.estimate(0, 0.0).unwrap();
        assert_eq!(est.finish_worst, ms(609.0));
        assert!(est.bound() >= ms(609.0));
        // Fast probes after each round: once they are the recent ones, the expected part
        // follows them and the slow ones have left the bound's window.
        for f in [5.0, 5.5, 4.8, 6.0] {
            e.add_finish(ms(f));
            assert!(e.estimate(0, 0.0).unwrap().finish_worst >= ms(7.0));
        }
        e.add_finish(ms(5.1));
        let est = e.estimate(0, 0.0).unwrap();
        assert_eq!((est.finish, est.finish_worst), (ms(5.1), ms(6.0)));
        assert!(est.bound() <= ms(6.0), "{:?}", est.bound());
        // A slow probe now bounds it again, for the next FINISH_WINDOW probes.
        e.add_finish(ms(80.0));
        assert_eq!(e.estimate(0, 0.0).unwrap().finish_worst, ms(80.0));
        for _ in 0..FINISH_WINDOW - 1 {
            e.add_finish(ms(5.0));
        }
        assert_eq!(e.estimate(0, 0.0).unwrap().finish_worst, ms(80.0));
        e.add_finish(ms(5.0));
        assert_eq!(e.estimate(0, 0.0).unwrap().finish_worst, ms(5.0));
    }

    #[test]
    fn memory_reread_while_paused_needs_a_sample_and_scales_with_its_bytes() {
        let mut e = Estimator::default();
        e.add_round(100 * MIB, ms(100.0), false);
        let plain = e.estimate(MIB, 0.0).unwrap();
        // 100 MiB the dirty log cannot vouch for, no sample yet: no estimate, no switch-over.
        e.set_rereads(100 * MIB, 0);
        assert!(e.estimate(MIB, 0.0).is_none());
        // Samples of 1, 3 and 2 ms per MiB: 2 ms expected (upper median), 3 at most.
        for t in [1.0, 3.0, 2.0] {
            e.add_reread(MIB, ms(t), 0);
        }
        let est = e.estimate(MIB, 0.0).unwrap();
        assert!((est.verify.as_secs_f64() * 1e3 - 200.0).abs() < 1e-6);
        assert!((est.verify_worst.as_secs_f64() * 1e3 - 300.0).abs() < 1e-6);
        assert_eq!((est.verify_bytes, est.verify_changed_bytes), (100 * MIB, 0));
        assert_eq!(est.total(), plain.total() + est.verify);
        assert!(est.bound() >= plain.bound() + ms(300.0));
        // Scans that took twice their CPU time stretch the bound, not the expected part.
        e.add_scan_share(ms(4.0), ms(2.0));
        let stretched = e.estimate(MIB, 0.0).unwrap();
        assert_eq!(stretched.verify, est.verify);
        assert!((stretched.verify_worst.as_secs_f64() * 1e3 - 600.0).abs() < 1e-6);
        e.add_scan_share(ms(1.0), ms(1.0));
        e.add_scan_share(ms(1.0), ms(1.0));
        let est = e.estimate(MIB, 0.0).unwrap();
        assert!((est.verify_worst.as_secs_f64() * 1e3 - 300.0).abs() < 1e-6);
        // A full final check of 10 MiB: read on both ends.
        e.set_rereads(0, 10 * MIB);
        let est = e.estimate(MIB, 0.0).unwrap();
        assert_eq!(est.verify, Duration::ZERO);
        assert!((est.full_check.as_secs_f64() * 1e3 - 40.0).abs() < 1e-6);
        assert!((est.full_check_worst.as_secs_f64() * 1e3 - 60.0).abs() < 1e-6);
        // What the samples found changed, as a share, is sent in the final round.
        let mut e = Estimator::default();
        e.add_round(100 * MIB, ms(100.0), true);
        e.add_round(10 * MIB, ms(10.0), true);
        e.set_rereads(8 * MIB, 0);
        e.add_reread(MIB, ms(1.0), MIB / 2);
        let est = e.estimate(MIB, 0.0).unwrap();
        assert_eq!(
            (est.pending_bytes, est.verify_changed_bytes),
            (MIB, 4 * MIB)
        );
        let send = est.send.as_secs_f64() * 1e3;
        assert!((send - 5.0).abs() < 0.01, "{send}");
    }

    #[test]
    fn the_margin_multiplies_the_whole_final_phase() {
        let mut e = Estimator::default();
        e.add_pause(ms(4.0));
        e.add_scan(ms(2.0));
        e.add_finish(ms(3.0));
        e.add_round(100 * MIB, ms(100.0), true);
        e.add_round(50 * MIB, ms(50.0), true);
        e.add_round(10 * MIB, ms(15.0), true);
        e.add_finish(ms(12.0));
        e.add_finish(ms(3.0));
        let est = e.estimate(MIB, 0.0).unwrap();
        assert_eq!((est.finish, est.finish_worst), (ms(3.0), ms(12.0)));
        assert!(est.margin > 1.0);
        // The decision counts the slowest recent finish and the send bound, the expected
        // downtime the typical ones.
        let worst = est.pause + est.scan_worst + est.send_worst + est.finish_worst;
        // The pause check's two scans at the slowest scan each.
        assert_eq!(est.check_bound(), est.scan_worst * 2);
        let worst = worst + est.check_bound();
        assert!(est.send_worst > est.send);
        assert!((est.bound().as_secs_f64() - worst.as_secs_f64() * est.margin).abs() < 1e-9);
        assert!(est.bound() > est.total());
    }

    #[test]
    fn a_round_slower_than_estimated_raises_the_margin() {
        let mut e = Estimator::default();
        e.add_round(100 * MIB, ms(100.0), true);
        e.add_round(50 * MIB, ms(50.0), true);
        // Estimated 10 ms for 10 MiB, took 15 ms.
        e.add_round(10 * MIB, ms(15.0), true);
        let est = e.estimate(MIB, 0.0).unwrap();
        assert!((est.margin - 1.5).abs() < 1e-6, "{}", est.margin);
        assert!(est.bound() > est.total());
    }

    #[test]
    fn what_the_workload_writes_until_it_stops_is_sent_too() {
        let mut e = Estimator::default();
        e.add_pause(ms(5.0));
        e.add_pause(ms(20.0));
        e.add_pause(ms(5.0));
        e.add_scan(ms(5.0));
        e.add_round(100 * MIB, ms(100.0), true);
        e.add_round(10 * MIB, ms(10.0), true);
        // The last scan found nothing, but the workload writes 100 MiB/s: 1 MiB in the
        // typical 10 ms of scan and pause, 2.5 MiB in the slowest 25 ms.
        let est = e.estimate(0, 100.0 * MIB as f64).unwrap();
        assert_eq!(est.meanwhile_bytes, MIB);
        let send = est.send.as_secs_f64() * 1e3;
        assert!((send - 1.0).abs() < 0.01, "{send}");
        assert!(est.send_worst.as_secs_f64() * 1e3 >= 2.5 - 1e-6);
        assert_eq!((est.pause, est.pause_worst), (ms(5.0), ms(20.0)));
        assert!(est.bound() >= ms(20.0) + ms(5.0) + est.send_worst);
        assert_eq!(e.estimate(0, 0.0).unwrap().send, Duration::ZERO);
    }

    #[test]
    fn rehearsals_decide_the_send_when_there_are_any() {
        let mut e = Estimator::default();
        e.add_round(2048 * MIB, ms(5000.0), false);
        e.add_round(100 * MIB, ms(400.0), true);
        e.add_round(20 * MIB, ms(100.0), true);
        let live = e.estimate(8 * MIB, 0.0).unwrap();
        assert_eq!(live.send_from, "rounds");
        assert_eq!(live.rehearsed_throughput, 0.0);
        // Too small to time a send: not kept.
        e.add_rehearsal(64 << 10, ms(1.0));
        assert_eq!(e.estimate(8 * MIB, 0.0).unwrap().send_from, "rounds");
        // 4 MiB in 4, 8 and 5 ms: 8 MiB expected at the upper median (10 ms), bounded by the
        // slowest (16 ms), whatever the live rounds (40 ms) said.
        for t in [4.0, 8.0, 5.0] {
            e.add_rehearsal(4 * MIB, ms(t));
        }
        let est = e.estimate(8 * MIB, 0.0).unwrap();
        assert_eq!(est.send_from, "rehearsals");
        assert!((est.send.as_secs_f64() * 1e3 - 10.0).abs() < 1e-6);
        assert!((est.send_worst.as_secs_f64() * 1e3 - 16.0).abs() < 1e-6);
        assert!((est.rehearsed_throughput - 4.0 * MIB as f64 / 5e-3).abs() < 1.0);
        assert!((est.rehearsed_worst_throughput - 4.0 * MIB as f64 / 8e-3).abs() < 1.0);
        assert!(live.send > est.send);
        // What the workload writes until it is stopped is sent at the same cost.
        let est = e.estimate(8 * MIB, 100.0 * MIB as f64).unwrap();
        let bytes = (est.pending_bytes + est.meanwhile_bytes) as f64;
        let want = bytes * 5e-3 / (4 * MIB) as f64;
        assert!((est.send.as_secs_f64() - want).abs() < 1e-9);
    }

    #[test]
    fn one_slow_rehearsal_of_two_bounds_the_send_but_does_not_make_it() {
        let mut e = Estimator::default();
        e.add_round(2048 * MIB, ms(5000.0), false);
        // 4 MiB in 4 ms, and in 10 ms by one that waited for a CPU: 8 MiB expected at the
        // faster (8 ms), bounded by the slower (20 ms).
        for t in [4.0, 10.0] {
            e.add_rehearsal(4 * MIB, ms(t));
        }
        let est = e.estimate(8 * MIB, 0.0).unwrap();
        assert_eq!(est.send_from, "rehearsals");
        assert!(
            (est.send.as_secs_f64() * 1e3 - 8.0).abs() < 1e-6,
            "{:?}",
            est.send
        );
        assert!((est.send_worst.as_secs_f64() * 1e3 - 20.0).abs() < 1e-6);
    }

    #[test]
    fn the_low_percentile_bounds_an_optimistic_fit() {
        // Two rounds where the bigger one was relatively faster than a line would imply: the
        // estimate for a size between them never beats the slowest round's throughput.
        let mut e = Estimator::default();
        e.add_round(10 * MIB, ms(100.0), true); // 100 MiB/s
        e.add_round(100 * MIB, ms(200.0), true); // 500 MiB/s
        let send = e.estimate(10 * MIB, 0.0).unwrap().send_worst.as_secs_f64() * 1e3;
        assert!(send >= 100.0 - 1e-6, "{send}");
    }

    fn pacing(rate: u64, ready: u64) -> Option<crate::Pacing> {
        Some(crate::Pacing {
            rate,
            ready,
            burst: 5 * MIB,
        })
    }

    #[test]
    fn a_paced_send_is_expected_no_faster_than_its_rate() {
        // Rehearsals at 400 MiB/s (small enough to pass within the bucket); paced at 100 MiB/s.
        let mut e = Estimator::default();
        e.add_round(512 * MIB, ms(5120.0), false);
        for _ in 0..3 {
            e.add_rehearsal(4 * MIB, ms(10.0));
        }
        let unpaced = e.estimate(10 * MIB, 0.0).unwrap();
        assert!((unpaced.send.as_secs_f64() * 1e3 - 25.0).abs() < 1e-6);
        assert_eq!(unpaced.paced_rate, 0.0);
        // Nothing in the bucket: 10 MiB at 100 MiB/s, expected and bound.
        e.set_pacing(pacing(100 * MIB, 0));
        let est = e.estimate(10 * MIB, 0.0).unwrap();
        assert!(
            (est.send.as_secs_f64() * 1e3 - 100.0).abs() < 1e-6,
            "{:?}",
            est.send
        );
        assert!(est.send_worst >= est.send);
        assert_eq!(est.paced_rate, (100 * MIB) as f64);
        // A full bucket lets the pending bytes through at once: the rehearsals decide again.
        e.set_pacing(pacing(100 * MIB, 10 * MIB));
        let est = e.estimate(10 * MIB, 0.0).unwrap();
        assert_eq!(est.send, unpaced.send);
        // Half of the bytes in the bucket by the time the final round starts: the rest at
        // the rate, expected; the bound counts only what it holds now.
        e.set_pacing(pacing(100 * MIB, 5 * MIB));
        let est = e.estimate(10 * MIB, 0.0).unwrap();
        assert!(
            (est.send.as_secs_f64() * 1e3 - 50.0).abs() < 1e-6,
            "{:?}",
            est.send
        );
        assert!((est.send_worst.as_secs_f64() * 1e3 - 50.0).abs() < 1e-6);
    }

    #[test]
    fn a_paced_round_slower_than_its_pacing_slows_the_estimate() {
        let mut e = Estimator::default();
        e.add_round(512 * MIB, ms(5120.0), false);
        e.set_pacing(pacing(100 * MIB, 0));
        // 20 MiB paced at 100 MiB/s took 220 ms, not 200: 1.1 times its pacing.
        e.add_round(20 * MIB, ms(220.0), true);
        // A rehearsal the bucket let through at once says nothing about the pacing.
        e.set_pacing(pacing(100 * MIB, 5 * MIB));
        e.add_rehearsal(4 * MIB, ms(5.0));
        e.set_pacing(pacing(100 * MIB, 0));
        let est = e.estimate(10 * MIB, 0.0).unwrap();
        assert!(
            (est.send.as_secs_f64() * 1e3 - 110.0).abs() < 1e-3,
            "{:?}",
            est.send
        );
        assert!((est.send_worst.as_secs_f64() * 1e3 - 110.0).abs() < 1e-3);
        // Bytes on the wire per byte of memory (compression) scale the paced time.
        e.add_wire(20 * MIB, 10 * MIB);
        let est = e.estimate(10 * MIB, 0.0).unwrap();
        assert!(
            (est.send.as_secs_f64() * 1e3 - 55.0).abs() < 1e-3,
            "{:?}",
            est.send
        );
    }
}
