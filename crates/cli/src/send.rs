//! `precopy send --pid PID --to URL` and `precopy recv --listen URL --to file:PATH`: live
//! pre-copy of a running process the engine did not start, into a checkpoint image or to a
//! receiver that writes one.
//!
//! `send` checks the kernel, connects the destination, attaches to the target
//! (`Uffd::attach`: ptrace injection of `userfaultfd`, the target left as it was), tracks its
//! writable memory (`TargetLog`: see `precopy_tracker::target` for what is and is not tracked)
//! and runs the pre-copy driver over it, with the final round sent while the target is stopped
//! (`SIGSTOP`). `--then` says what becomes of the target afterwards. On any failure, and on
//! Ctrl-C or `SIGTERM` (see `interrupt`), the target is left running (or stopped, when someone
//! else had stopped it: see [`TargetWorkload`]).

use crate::args::{
    Dest, MAX_DOWNTIME_MS, MAX_ROUNDS, PriorityKind, check_final_round_timeout, check_image_path,
    check_max_downtime, check_max_rounds, check_socket_destination, check_target, count_in,
    invalid, parse_dest, parse_pid, read_key,
};
use crate::interrupt::{Interrupts, TargetState};
use crate::output;
use crate::output::outln;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use precopy_migrate::{
    AfterMigration, LimitPolicy, Migration, MigrationConfig, MigrationReport, PauseMethod,
    ProcessControl, ProcessError, Progress, TargetLog, TargetMemory, ThrottleMethod,
    TransferTransport, Workload,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::{AttachTimes, Uffd};
use precopy_transfer::{
    Connection, FinalCheck, ImageWriter, Key, Layout, Listener, MemoryRegion, ProcessDescription,
    PublishGate, Receiver, ReceiverConfig, SenderConfig, Sink, Transfer,
};
use serde_json::{Value, json};
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// What becomes of the target after a successful send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Then {
    /// Leave it stopped (SIGSTOP): the image is its memory as it is now.
    Stop,
    /// Let it run on (unless someone else had it stopped when the final round stopped it:
    /// then it stays stopped).
    Resume,
    /// Kill it (SIGKILL): the destination takes over.
    Kill,
}

/// How `send` slows a target whose writes outpace the transfer (auto-converge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SendThrottle {
    /// Stop the target (SIGSTOP) for a growing fraction of every 100 ms and continue it
    /// (SIGCONT) for the rest.
    Duty,
    /// Never throttle: a target that writes faster than the transfer runs until
    /// --max-rounds forces the switch-over.
    None,
}

/// `send --io-timeout`'s default, in seconds.
const DEFAULT_IO_TIMEOUT_S: f64 = 10.0;

/// `precopy send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The process to copy: a process ID (thread-group ID), not a thread's ID.
    #[arg(long, value_parser = parse_pid, allow_hyphen_values = true)]
    pid: i32,
    /// tcp:HOST:PORT or unix:PATH (a `precopy recv`), or file:PATH (a checkpoint image).
    #[arg(long, value_name = "URL")]
    to: String,
    /// Switch over once the rest would take at most this long, in milliseconds (1 to
    /// 3600000).
    #[arg(long, default_value = "300", value_name = "MS", value_parser = count_in(1, MAX_DOWNTIME_MS), allow_hyphen_values = true)]
    max_downtime: u64,
    /// Most rounds with the target running, round 0 included (1 to 1000000); then the final
    /// round runs whatever it costs.
    #[arg(long, default_value = "30", value_name = "N", value_parser = count_in(1, MAX_ROUNDS), allow_hyphen_values = true)]
    max_rounds: u64,
    /// How to slow a target that writes faster than the transfer sends: `duty` stops it with
    /// SIGSTOP for a growing share of every 100 ms and continues it with SIGCONT (a program
    /// that waits on SIGCHLD or ptrace-stops notices), `none` never does.
    #[arg(long, value_enum, default_value_t = SendThrottle::Duty)]
    throttle: SendThrottle,
    /// What becomes of the target after success.
    #[arg(long, value_enum, default_value_t = Then::Resume)]
    then: Then,
    /// Shared key for a receiver that requires one (the file's bytes).
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Limit on the migration, in seconds, from the first round to the final one included:
    /// past it the send fails and the target runs on. Attaching before it and detaching
    /// after it are not counted (each bounded on its own; at load 30 a 0.1 s limit ended
    /// about 1 s after the start).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    timeout: Option<f64>,
    /// Seconds a connection to a receiver (tcp: or unix:) may make no progress (connecting,
    /// a write, the wait for the acknowledgement) [default: 10]. Not with --to file:.
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    io_timeout: Option<f64>,
    /// Hard bound on the final round, in milliseconds (1 to 3600000), from stopping the target
    /// to the destination's acknowledgement (for an image, its last sync): past it the send
    /// fails, the target runs on and the image (or the receiver's copy) is never published
    /// [default: 10 × --max-downtime, at least 5 s, or twice the expected downtime if more].
    #[arg(long, value_name = "MS", value_parser = count_in(1, MAX_DOWNTIME_MS), allow_hyphen_values = true)]
    final_round_timeout: Option<u64>,
    /// Scheduling priority of the final phase's threads (this process's driver, writers and
    /// watchers), from stopping the target to the acknowledgement and in the pause probes
    /// that rehearse it; restored before the target runs again.
    #[arg(long, value_enum, default_value_t = PriorityKind::Realtime)]
    final_priority: PriorityKind,
    /// Replace a file at the image's path (file:PATH) that is not a precopy image; without
    /// it such a file is refused (an image, or an empty file, is replaced either way). Only
    /// with --to file: (a receiver's image is its `recv --force`'s business).
    #[arg(long)]
    force: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `precopy recv`.
#[derive(Debug, clap::Args)]
pub struct RecvArgs {
    /// tcp:HOST:PORT or unix:PATH. The socket file appears at PATH only once it listens
    /// (except for a PATH within ~20 bytes of the 108-byte limit, or on a file system
    /// without hard links: bound in place there). A
    /// socket file at PATH that no socket is bound to (left by a receiver that was killed) is
    /// removed first; a path in use, or a file that is not a socket, is refused.
    #[arg(long, value_name = "URL")]
    listen: String,
    /// file:PATH: the checkpoint image to write.
    #[arg(long, value_name = "URL")]
    to: String,
    /// Require senders to prove they hold this key (the file's bytes). Required with
    /// `--listen tcp:`; optional with `unix:`.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Seconds the sender's connections may make no progress once the transfer runs (no byte
    /// on any of them; a stopped or vanished sender) and the longest the sender may take to
    /// commit after its last round, 0.001 to 2592000 [default: 60]; past it recv fails
    /// ("no progress for ...") and the image is not published. A sender's `--final-check
    /// full` re-reads its memory in silence before it finishes (about 0.5 s per GiB): allow
    /// for it.
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    io_timeout: Option<f64>,
    /// Replace a file at the image's path that is not a precopy image; without it such a
    /// file is refused (an image, or an empty file, is replaced either way).
    #[arg(long)]
    force: bool,
    /// Scheduling priority of this receiver's own threads (each connection's, and the one
    /// that checks the final digest, syncs the image and acknowledges) in the final round:
    /// from the round the sender marks final (its target stopped) until the transfer ends,
    /// committed, failed or cut. `realtime`: recv raises them to SCHED_FIFO 1 where permitted
    /// (root or CAP_SYS_NICE; a warning and `received.final_priority.refused` say when not)
    /// and puts each back to its own priority before it exits; `normal`: they keep their own.
    /// The sender's priority is the sender's `--final-priority`.
    #[arg(long, value_enum, default_value_t = PriorityKind::Realtime, hide_possible_values = true)]
    final_priority: PriorityKind,
    /// Print one JSON object instead of text: `received` (rounds, pages, zero pages, wire
    /// bytes, streams, checksum, ...), `image_bytes` and, as `send --json` has it,
    /// `image_compacted` (`null`, or `{"rounds", "compactions", "bytes_dropped"}`: the rounds
    /// the compacted image's first round stands for, the compactions run and the bytes of
    /// older page copies they dropped).
    #[arg(long)]
    json: bool,
}

/// Who has stopped a target that `send` leaves stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoppedBy {
    /// Someone else, before the send began, and nobody continued it since.
    OthersBeforeSend,
    /// Someone else, during the send, after the send had seen it running.
    OthersDuringSend,
}

/// [`Workload`] for the target: SIGSTOP/SIGCONT pause, duty-cycle throttle (nothing to clean
/// up if this process dies), and a note for the signal thread and the guard of whether the
/// target may be stopped by us.
///
/// Whether the send continues the target at the end is decided by what the target was just
/// before the send last took hold of it: before each pause of a target it does not hold paused
/// (the pause probes, the final pause) and before a throttle starts, the send looks whether
/// every thread is stopped ([`TargetWorkload::take_hold`]). Stopped, it was stopped by someone
/// else (a `kill -STOP`, a shell's job control, a debugger), before the send or during it, and
/// it is left stopped; running, it is the send's to continue, also when it was stopped when
/// the send began and someone continued it since (the user who continued it expects it to
/// run). With the throttle's duty cycle running, its stops cannot be told from someone else's,
/// and the target is continued as usual. Nor can a stop of our own: the pause check pauses a
/// target it already paused again (it may have been continued from outside), and that target
/// is ours to continue.
struct TargetWorkload {
    control: ProcessControl,
    pid: i32,
    state: Arc<TargetState>,
    /// The duty cycle may have the target stopped.
    throttled: bool,
    /// Paused by us and not resumed since.
    paused: bool,
    /// Who had the target stopped when the send last took hold of it; `None`: it was running.
    stopped_by: Option<StoppedBy>,
    /// Stopped by someone else when the send began, seen running later.
    continued_by_others: bool,
    /// Tells the guard whether to continue the target should the send die.
    guard: Option<crate::guard::Journal>,
    /// The state blob: what the image holds ([`process_image_state`]).
    described: Vec<u8>,
}

impl TargetWorkload {
    /// Looks again whether someone else has the target stopped, as the send is about to take
    /// hold of it (see the type's docs); the control, the signal thread and the guard are told
    /// before the send stops it. Holding it already (paused, or the duty cycle running), a stop
    /// seen may be the send's own, and nothing changes.
    fn take_hold(&mut self) {
        if self.paused || self.throttled {
            return;
        }
        let stopped = precopy_migrate::all_stopped(self.pid);
        let by = stopped.then(|| self.stopped_by.unwrap_or(StoppedBy::OthersDuringSend));
        if by == self.stopped_by {
            return;
        }
        self.continued_by_others |= self.stopped_by == Some(StoppedBy::OthersBeforeSend);
        self.stopped_by = by;
        self.control.set_stopped_by_others(stopped);
        self.state.set_stopped_by_others(stopped);
        if let Some(g) = &self.guard
            && !g.stopped_by_others(stopped)
        {
            tracing::warn!(
                stopped,
                "the watchdog could not be told whether the target is stopped by someone else"
            );
        }
    }
}

impl Workload for TargetWorkload {
    type Error = ProcessError;
    fn pause(&mut self) -> Result<(), ProcessError> {
        self.take_hold();
        self.state.set_stopped_by_us(true);
        self.control.pause()?;
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), ProcessError> {
        self.paused = false;
        let r = self.control.resume();
        self.state.set_stopped_by_us(self.throttled);
        r
    }
    fn set_throttle(&mut self, fraction: f64) -> Result<(), ProcessError> {
        if fraction > 0.0 {
            self.take_hold();
        }
        // A target someone else has stopped is not throttled (`ProcessControl` leaves it).
        self.throttled = fraction > 0.0 && self.stopped_by.is_none();
        if self.throttled {
            self.state.set_stopped_by_us(true);
        }
        self.control.set_throttle(fraction)
    }
    fn throttle_method(&self) -> &'static str {
        self.control.throttle_method()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, ProcessError> {
        Ok(self.described.clone())
    }
    fn pause_priority(&self) -> Option<precopy_migrate::PriorityReport> {
        self.control.pause_priority()
    }
}

/// The state blob `send` gives its image: a [`ProcessDescription`] of the target, so that
/// `precopy image info` labels the regions' addresses as the process's virtual addresses,
/// not guest-physical ones. A process's registers and files are not copied: the blob is a
/// description, not a state to resume from.
fn process_image_state(pid: i32) -> Vec<u8> {
    ProcessDescription {
        pid,
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_string())
            .ok(),
        exe: std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string()),
    }
    .to_state()
}

/// What `/proc` says of process `pid` now: `"exited"` (gone, or every thread a zombie),
/// `"stopped"` (every live thread stopped, state `T` or `t`) or `"running"`.
pub fn target_state(pid: i32) -> &'static str {
    if process_gone(pid) {
        "exited"
    } else if precopy_migrate::all_stopped(pid) {
        "stopped"
    } else {
        "running"
    }
}

/// How the summary describes the target after a successful send: what `--then` asked, who
/// had it stopped when the send last took hold of it (`stopped_by`; `continued`: stopped by
/// someone else when the send began, seen running since), and what `/proc` says it is now
/// (`state`, from [`target_state`]).
fn target_words(
    pid: i32,
    then: Then,
    state: &str,
    stopped_by: Option<StoppedBy>,
    continued: bool,
) -> String {
    let cont = format!("`kill -CONT {pid}` resumes it");
    match (then, state, stopped_by) {
        (Then::Kill, _, _) => "killed (--then kill)".into(),
        (_, "exited", _) => "EXITED (it is gone since the send)".into(),
        (_, "stopped", Some(StoppedBy::OthersBeforeSend)) => {
            format!("left stopped, as it was before the send ({cont})")
        }
        (_, "stopped", Some(StoppedBy::OthersDuringSend)) => format!(
            "STOPPED: someone else stopped it during the send (SIGSTOP), so precopy did not continue it ({cont})"
        ),
        (Then::Stop, "stopped", None) => format!("left stopped (--then stop; {cont})"),
        (Then::Resume, "stopped", None) => format!(
            "STOPPED, not by precopy (--then resume continued it; something stopped it since: {cont})"
        ),
        (_, _, Some(_)) => {
            "RUNNING: it was stopped by someone else, and something continued it since (SIGCONT)"
                .into()
        }
        (Then::Stop, _, None) => {
            "RUNNING: --then stop left it stopped, but something continued it since (SIGCONT)"
                .into()
        }
        (Then::Resume, _, None) if continued => {
            "running (it was stopped when the send began; someone continued it during the send)"
                .into()
        }
        (Then::Resume, _, None) => "running".into(),
    }
}

fn ranges_json(v: &[Range<u64>]) -> Value {
    Value::Array(v.iter().map(|r| json!([r.start, r.end])).collect())
}

fn attach_json(t: &AttachTimes) -> Value {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    json!({
        "thread": t.tid,
        "stop_us": us(t.stop),
        "inject_us": us(t.inject),
        "detach_us": us(t.detach),
        "stopped_us": us(t.stopped),
        "total_us": us(t.total),
    })
}

fn progress_bar(json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn phase_name(p: &Progress) -> &'static str {
    match p.phase {
        precopy_migrate::Phase::Full => "round 0 (all memory)",
        precopy_migrate::Phase::Iterating => "iterating",
        precopy_migrate::Phase::Final => "final round (target stopped)",
    }
}

fn progress_message(p: &Progress) -> String {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    format!(
        "{}: round {:>3}  pending {:>8.1} MiB  throughput {:>6.0} MiB/s  dirty {:>6.0} MiB/s",
        phase_name(p),
        p.round,
        mib(p.pending_bytes as f64),
        mib(p.throughput),
        mib(p.dirty_rate),
    )
}

/// The last progress, for the report of an interrupted send.
fn progress_json(p: &Progress) -> Value {
    json!({
        "phase": phase_name(p),
        "round": p.round,
        "pending_bytes": p.pending_bytes,
        "memory_bytes": p.memory_bytes,
        "throughput_bytes_per_sec": p.throughput,
        "dirty_bytes_per_sec": p.dirty_rate,
        "throttle": p.throttle,
        "elapsed_ms": p.elapsed.as_secs_f64() * 1e3,
    })
}

/// Alignment of the regions a send adds for memory the target maps outside the layout it
/// started with: a mapping that grows by small steps adds a region per 2 MiB at most.
const ADDED_REGION_ALIGN: u64 = 2 << 20;

/// What [`drive`] gives back besides the result.
struct Driven {
    report: MigrationReport,
    log: TargetLog,
    vanished: u64,
    /// Regions added mid-stream: memory mapped outside the first layout.
    added: Vec<MemoryRegion>,
    /// Who had the target stopped when the send last took hold of it ([`TargetWorkload`]).
    stopped_by: Option<StoppedBy>,
    /// Stopped by someone else when the send began, seen running since.
    continued_by_others: bool,
}

/// Runs the driver over `transfer`; returns its result, the report and the parts back.
/// `ack_meaning` explains a final acknowledgement that timed out (for an image, its fdatasync).
fn drive<K: Sink>(
    log: TargetLog,
    transfer: Transfer<TargetMemory, K>,
    workload: TargetWorkload,
    config: MigrationConfig,
    json: bool,
    ack_meaning: Option<String>,
) -> (Result<MigrationReport>, Driven) {
    let bar = progress_bar(json);
    let bar2 = bar.clone();
    let state = workload.state.clone();
    // Memory the target maps anywhere after the start is added to the layout and sent.
    let transport = TransferTransport::new(transfer).grow_layout(ADDED_REGION_ALIGN);
    let mut m = Migration::new(log, transport, workload, config).on_progress(move |p| {
        bar2.set_message(progress_message(p));
        state.update_report(|r| r["progress"] = progress_json(p));
    });
    let result = m.run().map_err(|e| {
        let ack = matches!(
            e,
            precopy_migrate::Error::Timeout {
                step: precopy_migrate::Step::Acknowledge,
                ..
            }
        );
        match (ack, ack_meaning) {
            (true, Some(meaning)) => anyhow::Error::new(e).context(meaning),
            _ => anyhow::Error::new(e),
        }
    });
    bar.finish_and_clear();
    let report = m.report().clone();
    let (log, transport, workload) = m.into_parts();
    let added = transport.added_regions().to_vec();
    let (source, _sink) = transport.into_inner().into_parts();
    let driven = Driven {
        report,
        log,
        vanished: source.vanished_pages(),
        added,
        stopped_by: workload.stopped_by,
        continued_by_others: workload.continued_by_others,
    };
    (result, driven)
}

/// What [`check_send`] found good.
struct Checked {
    dest: Dest,
    key: Option<Key>,
    timeout: Option<Duration>,
    io_timeout: Duration,
}

/// Checks `send`'s flags against their limits, the destination and the key file before
/// anything starts (nothing is attached, connected or created yet).
fn check_send(args: &SendArgs) -> Result<Checked> {
    check_target(args.pid)?;
    check_max_downtime(args.max_downtime)?;
    check_max_rounds(args.max_rounds)?;
    check_final_round_timeout(args.final_round_timeout)?;
    let limit = crate::args::timeout_seconds;
    let timeout = args.timeout.map(|t| limit("--timeout", t)).transpose()?;
    let io_timeout = limit(
        "--io-timeout",
        args.io_timeout.unwrap_or(DEFAULT_IO_TIMEOUT_S),
    )?;
    let dest = parse_dest("--to", &args.to, true, true)?;
    if let (Dest::File(_), Some(k)) = (&dest, &args.key_file) {
        return Err(invalid(
            "--key-file",
            k.display(),
            format!(
                "applies only to a receiver (tcp: or unix:), not to --to {}",
                args.to
            ),
            "drop --key-file, or send to a `precopy recv`",
        ));
    }
    if args.force && !matches!(dest, Dest::File(_)) {
        return Err(invalid(
            "--force",
            "",
            format!(
                "applies only to --to file:PATH (it lets the image replace a file there that is \
                 not a precopy image), not to --to {}: the receiver's own --force says what its \
                 image may replace",
                args.to
            ),
            "drop --force, or pass it to the `precopy recv` that writes the image",
        ));
    }
    if let (Dest::File(_), Some(t)) = (&dest, args.io_timeout) {
        return Err(invalid(
            "--io-timeout",
            t,
            format!(
                "applies only to a connection to a receiver (tcp: or unix:), not to --to {}: an \
                 image's last write-out is bounded by --final-round-timeout",
                args.to
            ),
            "drop --io-timeout, or send to a `precopy recv`",
        ));
    }
    match &dest {
        Dest::File(path) => check_image_path("--to", &args.to, path, None, Some(args.force))?,
        Dest::Unix(path) => check_socket_destination("--to", &args.to, path)?,
        Dest::Tcp(_) => {}
    }
    let key = read_key(args.key_file.as_deref())?;
    Ok(Checked {
        dest,
        key,
        timeout,
        io_timeout,
    })
}

/// A handshake error, with the fix where it is the key: a receiver that requires one gets it
/// from `--key-file`, and the file must hold the receiver's key.
fn key_fix(e: precopy_transfer::TransferError) -> anyhow::Error {
    use precopy_transfer::TransferError as E;
    let fix = match &e {
        E::AuthRequired { .. } => {
            "pass --key-file KEYFILE, the key file the receiver was started with"
        }
        E::KeyRefused { .. } => "pass --key-file with the receiver's key file",
        _ => return e.into(),
    };
    // These errors have no cause of their own: the message is the whole chain.
    anyhow::anyhow!("{e}: {fix}")
}

/// `precopy send`.
pub fn run_send(args: SendArgs) -> Result<ExitCode> {
    let mut report = json!({ "pid": args.pid, "to": args.to, "then": args.then });
    let fail = |report: &Value, e: anyhow::Error| output::fail(args.json, report.clone(), e);
    // Every flag, the destination and the key, before anything starts.
    let Checked {
        dest,
        key,
        timeout,
        io_timeout,
    } = check_send(&args).map_err(|e| fail(&report, e))?;
    let interrupts =
        Interrupts::install(Some(args.pid), args.json).map_err(|e| fail(&report, e))?;
    let state = interrupts.state().clone();
    state.set_report(&report);

    // Everything that can fail without touching the target, first.
    let scanner = Scanner::new(ScanOptions::default())
        .context("this kernel cannot track dirty pages (see `precopy probe`)")
        .map_err(|e| fail(&report, e))?;
    let conns = match &dest {
        Dest::Tcp(a) => vec![
            Connection::connect_tcp_timeout(a.as_str(), io_timeout)
                .with_context(|| format!("destination {} unreachable", args.to))
                .map_err(|e| fail(&report, e))?,
        ],
        Dest::Unix(p) => vec![
            Connection::connect_unix(p)
                .with_context(|| format!("destination {} unreachable", args.to))
                .map_err(|e| fail(&report, e))?,
        ],
        Dest::File(_) => Vec::new(),
    };

    // Before attaching: ptrace may take the target out of its stop.
    let stopped_on_entry = precopy_migrate::all_stopped(args.pid);
    // Reported once the lock is free: a signal meanwhile takes it to report instead.
    let attached = {
        let _attaching = state.attaching();
        Uffd::attach_cancellable(args.pid, state.attach_cancel())
    };
    let (uffd, times) = attached
        .with_context(|| format!("attaching to process {}", args.pid))
        .map_err(|e| fail(&report, e))?;
    report["attach"] = attach_json(&times);
    // Memory mapped outside the first layout is added mid-stream (see `drive`).
    let log = TargetLog::new(uffd, scanner)
        .context("tracking the target's memory")
        .map_err(|e| fail(&report, e))?
        .allow_anywhere();
    report["skipped"] = Value::Array(
        log.skipped()
            .iter()
            .filter_map(|m| {
                let reason = m.class.err()?.name();
                Some(json!({"start": m.range.start, "end": m.range.end, "name": m.name, "reason": reason}))
            })
            .collect(),
    );
    let page = log.tracker().page_size();
    // One region per range of the target's address space, ids in address order; the address a
    // range has in the target is what a guest-physical address is to a VM (images keep it, and
    // the state blob says which it is: `process_image_state`).
    let regions = log
        .layout()
        .iter()
        .enumerate()
        .map(|(id, r)| {
            MemoryRegion::new(id as u32, r.end - r.start, page)
                .host(r.start)
                .guest(r.start)
        })
        .collect();
    let layout = Layout::new(regions)
        .context("describing the target's memory")
        .map_err(|e| fail(&report, e))?;
    // Read through the PID, or the thread the attach used when the main thread has exited
    // (`pthread_exit`): the same memory.
    let source = TargetMemory::new(times.target, page).map_err(|e| fail(&report, e.into()))?;
    let throttle = match args.throttle {
        SendThrottle::Duty => ThrottleMethod::DutyCycle,
        SendThrottle::None => ThrottleMethod::None,
    };
    let control = ProcessControl::new(args.pid, PauseMethod::Signal, throttle)
        .context("controlling the target")
        .map_err(|e| fail(&report, e))?
        .stopped_on_entry_if(stopped_on_entry);
    // Stopped by someone else before the send: it stays stopped unless someone continues it
    // before the send takes hold of it (`TargetWorkload::take_hold`).
    let stopped_by = control
        .stopped_by_others()
        .then_some(StoppedBy::OthersBeforeSend);
    state.set_stopped_by_others(stopped_by.is_some());
    // From here on the send may stop the target: if it dies without cleaning up, the guard
    // continues it, unless the send last found it stopped by someone else (theirs to continue).
    let guard = crate::guard::Guard::start(args.pid).map_err(|e| fail(&report, e))?;
    let told = guard.journal().map_err(|e| fail(&report, e))?;
    if stopped_by.is_some() && !told.stopped_by_others(true) {
        let e = anyhow::anyhow!("telling the watchdog that the target is stopped failed");
        return Err(fail(&report, e));
    }
    // A pause raises the target's threads only where the guard keeps a journal of them, so
    // that a send killed meanwhile never leaves one real-time; the signal handler continues
    // the target only once none is raised.
    let control = control.with_raise_journal(guard.journal().map_err(|e| fail(&report, e))?);
    state.set_raise_lock(control.raise_lock());
    report["target_stopped_on_entry"] = json!(stopped_by.is_some());
    state.set_report(&report);
    let workload = TargetWorkload {
        control,
        pid: args.pid,
        state: state.clone(),
        throttled: false,
        paused: false,
        stopped_by,
        continued_by_others: false,
        guard: Some(told),
        described: process_image_state(args.pid),
    };
    let mut config = MigrationConfig {
        max_downtime: Duration::from_millis(args.max_downtime),
        max_rounds: args.max_rounds,
        after: match args.then {
            Then::Resume => AfterMigration::Resume,
            Then::Stop | Then::Kill => AfterMigration::Stop,
        },
        timeout,
        timeout_policy: LimitPolicy::Abort,
        final_round_timeout: args.final_round_timeout.map(Duration::from_millis),
        final_priority: args.final_priority.config(),
        ..MigrationConfig::default()
    };
    config.throttle.enabled = args.throttle != SendThrottle::None;
    let (result, driven) = match &dest {
        Dest::File(path) => {
            let gate = Arc::new(PublishGate::new());
            state.set_publish_gate(gate.clone());
            let sink = ImageWriter::create(path, layout.clone())
                .with_context(|| format!("creating the image {}", path.display()))
                .map_err(|e| fail(&report, e))?
                .with_publish_gate(gate);
            // Ours while the writer holds the partial file's lock: an interrupt mid-compaction
            // must not leave it behind.
            state.add_file(ImageWriter::compacting_path(path));
            let transfer = Transfer::new(source, sink, layout, 64)
                .context("starting the transfer")
                .map_err(|e| fail(&report, e))?;
            // An image's "acknowledgement" is its write-out: say so if it times out.
            let ack = format!(
                "for {} the final acknowledgement is the image's fdatasync (its pages, index and \
                 trailer written out to disk): the disk did not finish it in time",
                args.to
            );
            drive(log, transfer, workload, config, args.json, Some(ack))
        }
        Dest::Tcp(_) | Dest::Unix(_) => {
            let cfg = SenderConfig {
                key,
                handshake_timeout: io_timeout,
                io_timeout: Some(io_timeout),
                ..SenderConfig::default()
            };
            let sender = precopy_transfer::Sender::connect(conns, layout, source, &cfg)
                .map_err(key_fix)
                .context("handshake with the destination")
                .map_err(|e| fail(&report, e))?;
            drive(log, sender, workload, config, args.json, None)
        }
    };
    let Driven {
        report: mreport,
        log,
        vanished,
        added,
        stopped_by,
        continued_by_others,
    } = driven;
    report["target_stopped_during_send"] = json!(stopped_by == Some(StoppedBy::OthersDuringSend));
    report["target_stopped_by_others"] = json!(stopped_by.is_some());
    report["target_continued_during_send"] = json!(continued_by_others);
    if result.is_ok() {
        match args.then {
            Then::Stop => state.keep_stopped(),
            Then::Kill => {
                state.keep_stopped();
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(args.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Then::Resume => {}
        }
        // The target is now as the user asked: dismiss the guard before anything is printed,
        // since a report that finds stdout gone (`| head -c0`) ends this process without
        // running destructors, and a guard not told would continue a `--then stop` target.
        drop(guard);
    }
    let tracked: Vec<Range<u64>> = log.tracker().ranges().iter().map(|r| r.range()).collect();
    report["tracked"] = ranges_json(&tracked);
    report["tracked_bytes"] = json!(log.tracker().tracked_bytes());
    report["layout"] = ranges_json(log.layout());
    report["vanished_pages"] = json!(vanished);
    let (added_bytes, dropped_bytes) = log.change_totals();
    report["mapping_changes"] = json!({"added_bytes": added_bytes, "dropped_bytes": dropped_bytes});
    report["added_regions"] = Value::Array(
        added
            .iter()
            .map(|r| json!({"id": r.id, "start": r.host_addr, "size": r.size}))
            .collect(),
    );
    report["migration"] = serde_json::to_value(&mreport).unwrap_or(Value::Null);
    if let Dest::File(path) = &dest {
        report["image_bytes"] = json!(image_bytes(path));
        report["image_compacted"] = json!(image_compaction(path));
    }
    if let Err(e) = result {
        let e = explain_send_failure(e, &dest, &args.to);
        // Its memory is released early in its exit, before /proc shows it exited: when reads
        // found the process gone, give the exit a moment to complete.
        use precopy_transfer::{SourceError, TransferError};
        let vanished = e.chain().any(|c| {
            matches!(
                c.downcast_ref::<SourceError>(),
                Some(SourceError::ProcessGone { .. })
            ) || matches!(
                c.downcast_ref::<TransferError>(),
                Some(TransferError::Source(SourceError::ProcessGone { .. }))
            )
        });
        let mut gone = process_gone(args.pid);
        let since = std::time::Instant::now();
        while vanished && !gone && since.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
            gone = process_gone(args.pid);
        }
        let e = e.context(if gone {
            format!("process {} exited during the send", args.pid)
        } else if stopped_by.is_some() {
            format!(
                "sending process {0} failed; it was left stopped, as someone else had stopped it \
                 (`kill -CONT {0}` resumes it)",
                args.pid
            )
        } else {
            format!("sending process {} failed; it was left running", args.pid)
        });
        return Err(fail(&report, e));
    }
    // The target as it is now, from /proc: what the user gets back, whatever was asked.
    let now = target_state(args.pid);
    report["target_state"] = json!(if args.then == Then::Kill {
        "killed"
    } else {
        now
    });
    report["downtime_exceeded"] = json!(mreport.downtime_exceeded());
    report["switch_over_forced"] = json!(
        mreport
            .switch_reason
            .is_some_and(|r| r != precopy_migrate::SwitchReason::Converged)
    );
    if args.json {
        output::print_json(report, None);
    } else {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        outln!(
            "precopy send: process {} to {}: {:.1} MiB tracked in {} ranges, {}, downtime {:.1} ms, target {}",
            args.pid,
            args.to,
            mib(log.tracker().tracked_bytes()),
            tracked.len(),
            mreport
                .rounds_in_words()
                .replace("the round limit", "--max-rounds"),
            ms(mreport.downtime.unwrap_or_default()),
            target_words(args.pid, args.then, now, stopped_by, continued_by_others)
        );
        for line in limit_lines(&mreport, args.max_rounds) {
            outln!("  {line}");
        }
        // As the demo's report says it (its JSON: `migration.final_priority`).
        if let Some(p) = mreport
            .final_priority
            .as_ref()
            .and_then(precopy_migrate::PriorityReport::describe)
        {
            outln!("  final priority: {p}");
        }
        if let Some(p) = &mreport.pause_priority {
            outln!("  pause priority: {}", p.describe_pause());
        }
        outln!(
            "  attach: target thread stopped {:.0} µs (stop {:.0}, inject {:.0}, detach {:.0})",
            times.stopped.as_secs_f64() * 1e6,
            times.stop.as_secs_f64() * 1e6,
            times.inject.as_secs_f64() * 1e6,
            times.detach.as_secs_f64() * 1e6
        );
        outln!("  not tracked: {} mappings", log.skipped().len());
        if let Dest::File(path) = &dest {
            let compacted = match image_compaction(path) {
                Some(c) => format!(
                    ", compacted {} time(s): {:.1} MiB of older page copies dropped",
                    c.compactions,
                    mib(c.bytes_dropped)
                ),
                None => String::new(),
            };
            outln!(
                "  image: {} ({:.1} MiB{compacted})",
                path.display(),
                mib(image_bytes(path).unwrap_or(0))
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The summary's lines for a limit the send did not keep: the downtime limit exceeded, or
/// the round limit forcing the switch-over before the rest fit in it.
fn limit_lines(r: &MigrationReport, max_rounds: u64) -> Vec<String> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut lines = Vec::new();
    if r.switch_reason == Some(precopy_migrate::SwitchReason::MaxRounds) {
        lines.push(format!(
            "switch-over FORCED by the round limit (--max-rounds {max_rounds}) before the rest fit in --max-downtime {} ms",
            r.max_downtime.as_millis()
        ));
    }
    if r.switch_reason == Some(precopy_migrate::SwitchReason::OutOfReach) {
        lines.push(format!(
            "switch-over without converging: --max-downtime {} ms is out of reach ({})",
            r.max_downtime.as_millis(),
            r.downtime_note
                .as_deref()
                .unwrap_or("the fixed costs alone exceed it")
        ));
    }
    if let Some(d) = r.downtime.filter(|_| r.downtime_exceeded()) {
        let line = format!(
            "downtime limit EXCEEDED: {:.1} ms > {} ms (--max-downtime)",
            ms(d),
            r.max_downtime.as_millis()
        );
        lines.push(line);
        if let Some(why) = &r.downtime_note {
            lines.push(format!("  why: {why}"));
        }
    }
    lines
}

/// Adds what a user needs to a failed send's error: a destination that closed the
/// connection is said so, with what to do. The same close reaches the send in one of several
/// forms, whichever thread of the sink notices first: a write's `EPIPE` or `ECONNRESET`, or
/// the connection's watcher reading its end of file
/// ([`precopy_transfer::TransferError::is_connection_break`] names them all).
fn explain_send_failure(e: anyhow::Error, dest: &Dest, to: &str) -> anyhow::Error {
    let closed = e.chain().any(|c| {
        c.downcast_ref::<precopy_transfer::TransferError>()
            .is_some_and(|t| t.is_connection_break())
            || c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                )
            })
    });
    if closed && !matches!(dest, Dest::File(_)) {
        return e.context(format!(
            "the destination {to} closed the connection: its `precopy recv` stopped or failed \
             (its own output says why); start it again, then run this send again"
        ));
    }
    e
}

/// Bytes of the image at `path` (published), else of its partial file (a send or receive
/// that failed); `None` if neither exists.
fn image_bytes(path: &std::path::Path) -> Option<u64> {
    std::fs::metadata(path)
        .or_else(|_| std::fs::metadata(ImageWriter::partial_path(path)))
        .ok()
        .map(|m| m.len())
}

/// What compacting the image at `path` (published, else its partial file) dropped, if it
/// was compacted.
fn image_compaction(path: &std::path::Path) -> Option<precopy_transfer::CompactionInfo> {
    precopy_transfer::image_info(path)
        .or_else(|_| precopy_transfer::image_info(ImageWriter::partial_path(path)))
        .ok()?
        .compacted
}

/// Whether process `pid` has exited: gone from `/proc`, or no thread of it left alive (a
/// zombie waiting to be reaped; a main thread that called `pthread_exit` is a zombie too, so
/// every thread counts).
pub fn process_gone(pid: i32) -> bool {
    use procfs::process::{ProcState, Process};
    let Ok(p) = Process::new(pid) else {
        return true;
    };
    let Ok(tasks) = p.tasks() else {
        return true;
    };
    !tasks.flatten().any(|t| {
        t.stat()
            .ok()
            .and_then(|s| s.state().ok())
            .is_some_and(|s| !matches!(s, ProcState::Zombie | ProcState::Dead))
    })
}

/// Before `recv` binds `unix:PATH` (`typed`): a socket file left at `path` by a receiver that
/// ended without removing it (killed with SIGKILL, a crash) is removed, and `true` returned,
/// when no socket in this network namespace is bound to that path (`/proc/net/unix`, under
/// the path or the staging name a receiver binds before it listens:
/// `Listener::unix_path_in_use`). A path a live socket holds, or a file that is not a
/// socket, is refused: nothing else is removed.
fn clear_stale_socket(typed: &str, path: &std::path::Path) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        // Nothing there (or unreadable: binding says why).
        Err(_) => return Ok(false),
    };
    if !meta.file_type().is_socket() {
        return Err(invalid(
            "--listen",
            typed,
            format!("{} exists and is not a socket", path.display()),
            "listen on a path that does not exist yet (recv creates the socket file)",
        ));
    }
    if Listener::unix_path_in_use(path).context("reading /proc/net/unix")? {
        return Err(invalid(
            "--listen",
            typed,
            format!(
                "{} is in use: a running program (another `precopy recv`?) is bound to it",
                path.display()
            ),
            "stop that program, or listen on another path",
        ));
    }
    std::fs::remove_file(path)
        .with_context(|| format!("removing the stale socket file {}", path.display()))?;
    Ok(true)
}

/// `recv`'s `received.final_priority`, in the shape of `send`'s `migration.final_priority`:
/// the policy asked for (`"normal"` or `"fifo"`), the priority (0 for normal), the threads
/// raised, whether raising was refused, and why none was raised (`null` when some were).
fn receiver_priority(
    raised: Option<&precopy_transfer::FinalRaiseReport>,
    asked: PriorityKind,
) -> Value {
    let (policy, priority) = match asked.receiver() {
        None => ("normal", 0),
        Some(p) => ("fifo", p),
    };
    let (threads, refused) = raised.map_or((0, false), |r| (r.threads, r.refused));
    let not_raised = match (asked.receiver(), raised) {
        (None, _) => Some("normal asked for (the threads kept their own priority)".to_string()),
        (Some(p), Some(r)) if r.refused => Some(format!(
            "SCHED_FIFO {p} not permitted (needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least {p}): the threads kept their own priority"
        )),
        (Some(_), Some(_)) => None,
        (Some(_), None) => Some("no round was marked final".to_string()),
    };
    json!({
        "policy": policy,
        "priority": priority,
        "threads": threads,
        "refused": refused,
        "not_raised": not_raised,
    })
}

/// Removes a Unix socket's file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `precopy recv`.
pub fn run_recv(args: RecvArgs) -> Result<ExitCode> {
    let report = json!({ "listen": args.listen, "to": args.to });
    let fail = |e: anyhow::Error| output::fail(args.json, report.clone(), e);
    let interrupts = Interrupts::install(None, args.json).map_err(fail)?;
    interrupts.state().set_report(&report);
    // The image, the key and the address, before listening: nothing waits for a sender only
    // to fail afterwards.
    let Dest::File(path) = parse_dest("--to", &args.to, true, false).map_err(fail)? else {
        unreachable!("parse_dest accepts only file: here")
    };
    check_image_path("--to", &args.to, &path, None, Some(args.force)).map_err(fail)?;
    let io_timeout = match args.io_timeout {
        Some(t) => crate::args::timeout_seconds("--io-timeout", t).map_err(fail)?,
        None => precopy_transfer::DEFAULT_RECEIVE_TIMEOUT,
    };
    let config = ReceiverConfig {
        key: read_key(args.key_file.as_deref()).map_err(fail)?,
        final_priority: args.final_priority.receiver(),
        io_timeout: Some(io_timeout),
        ..ReceiverConfig::default()
    };
    let listen = parse_dest("--listen", &args.listen, false, true).map_err(fail)?;
    let removed_stale = match &listen {
        Dest::Unix(p) => clear_stale_socket(&args.listen, p).map_err(fail)?,
        _ => false,
    };
    let listener = match &listen {
        Dest::Tcp(a) => Listener::bind_tcp(a.as_str()),
        Dest::Unix(p) => Listener::bind_unix(p),
        Dest::File(_) => unreachable!("refused by parse_dest"),
    }
    .map_err(|e| {
        crate::args::bind_refusal("--listen", &args.listen, &e).unwrap_or_else(|| {
            anyhow::Error::new(e).context(format!("listening on {}", args.listen))
        })
    })
    .map_err(fail)?;
    if config.key.is_none() && matches!(listener, Listener::Tcp(_)) {
        // Refused before anyone can connect (another local user can connect to any TCP
        // port); after the bind, so that an unusable address is named first.
        return Err(fail(crate::args::invalid(
            "--listen",
            &args.listen,
            "is a TCP address, and a TCP receiver requires a shared key",
            "add --key-file KEYFILE (e.g. made with `(umask 077; head -c 32 /dev/urandom > KEYFILE)`; the sender passes the same file), or listen on unix:PATH",
        )));
    }
    // The socket file is ours from here on: removed however this command ends.
    let _socket = match &listen {
        Dest::Unix(p) => {
            interrupts.state().add_file(p.clone());
            Some(RemoveOnDrop(p.clone()))
        }
        _ => None,
    };
    // The image is ours from here on (after every check of the input, so that bad input
    // never touches it): a second `send` or `recv` to the same path is refused while this
    // one waits for its sender, not only once the image is started.
    let reservation = ImageWriter::reserve(&path)
        .with_context(|| format!("receiving into {}", path.display()))
        .map_err(fail)?;
    interrupts
        .state()
        .add_file_if_empty(ImageWriter::partial_path(&path));
    crate::output::errln!("precopy recv: listening on {}", listener.address());
    if removed_stale {
        crate::output::errln!(
            "precopy recv: removed the stale socket file {} first (no socket was bound to it)",
            args.listen.trim_start_matches("unix:")
        );
    }
    let received = Receiver::accept(&listener, &config)
        .and_then(|rx| {
            let gate = Arc::new(PublishGate::new());
            interrupts.state().set_publish_gate(gate.clone());
            let mut sink = reservation
                .create(rx.layout().clone())?
                .with_publish_gate(gate);
            // Ours while the writer holds the partial file's lock (see `send`).
            interrupts
                .state()
                .add_file(ImageWriter::compacting_path(&path));
            // One transfer at a time: another sender meanwhile is told this one is busy.
            rx.run_refusing_others(&listener, &mut sink)
        })
        .with_context(|| format!("receiving into {}", path.display()))
        .map_err(fail)?;
    let mut report = report;
    report["removed_stale_socket"] = json!(removed_stale);
    report["received"] = json!({
        "rounds": received.rounds,
        "pages": received.pages,
        "zero_pages": received.zero_pages,
        "wire_bytes": received.bytes,
        "streams": received.streams,
        "memory_checksum": received.checksum,
        "final_check": match received.check {
            FinalCheck::Recorded => "recorded",
            FinalCheck::Full => "full",
        },
        "changed_while_sent_pages": received.changed_while_sent,
        "state_bytes": received.state_bytes,
        "duration_ms": received.duration.as_secs_f64() * 1e3,
        "refused_connections": received.refused,
        "final_priority": receiver_priority(received.final_priority.as_ref(), args.final_priority),
    });
    report["image_bytes"] = json!(image_bytes(&path));
    report["image_compacted"] = json!(image_compaction(&path));
    if args.json {
        output::print_json(report, None);
    } else {
        outln!(
            "precopy recv: {} rounds, {} pages, {} zero pages into {}{}",
            received.rounds,
            received.pages,
            received.zero_pages,
            path.display(),
            match received.refused {
                0 => String::new(),
                n => format!(
                    " ({n} other connection(s) refused: a failed handshake, or a sender while busy)"
                ),
            }
        );
        let p = receiver_priority(received.final_priority.as_ref(), args.final_priority);
        outln!(
            "precopy recv: final priority: {}",
            match p["not_raised"].as_str() {
                Some(why) => format!("not raised: {why}"),
                None => format!(
                    "SCHED_FIFO {} for {} thread(s) from the final round to the end, put back after",
                    p["priority"], p["threads"]
                ),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use precopy_migrate::{PauseMethod, ThrottleMethod};

    /// A `sleep 60` child, killed when dropped.
    struct Sleeper(std::process::Child);

    impl Sleeper {
        fn start() -> Sleeper {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("running sleep");
            Sleeper(child)
        }
        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
        fn signal(&self, signal: nix::sys::signal::Signal) {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
            // Bounded against a hang only.
            let since = std::time::Instant::now();
            let stop = signal == nix::sys::signal::Signal::SIGSTOP;
            while precopy_migrate::all_stopped(self.pid()) != stop {
                assert!(
                    since.elapsed() < Duration::from_secs(30),
                    "{signal} not seen"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        /// What `send` makes of it: control as `run_send` sets it up, without a guard.
        fn workload(&self) -> TargetWorkload {
            let pid = self.pid();
            let control = ProcessControl::new(pid, PauseMethod::Signal, ThrottleMethod::DutyCycle)
                .unwrap()
                .raise_to_stop(false);
            TargetWorkload {
                stopped_by: control
                    .stopped_by_others()
                    .then_some(StoppedBy::OthersBeforeSend),
                control,
                pid,
                state: Arc::new(TargetState::default()),
                throttled: false,
                paused: false,
                continued_by_others: false,
                guard: None,
                described: Vec::new(),
            }
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Whether `SIGSTOP` is pending on process `pid` or any of its threads.
    fn sigstop_pending(pid: i32) -> bool {
        let bit = 1u64 << (nix::sys::signal::Signal::SIGSTOP as i32 - 1);
        let pending = |path: String, field: &str| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .is_some_and(|mask| mask & bit != 0)
        };
        pending(format!("/proc/{pid}/status"), "ShdPnd:")
            || pending(format!("/proc/{pid}/status"), "SigPnd:")
    }

    /// The pause check pauses a target it paused already (one continued from outside must
    /// stop again): finding it stopped then is no sign of someone else's stop, and the
    /// target is continued as usual.
    #[test]
    fn a_target_paused_twice_by_the_send_is_ours_to_continue() {
        let child = Sleeper::start();
        let mut w = child.workload();
        w.pause().unwrap();
        w.pause().unwrap();
        w.resume().unwrap();
        assert!(
            !precopy_migrate::all_stopped(child.pid()),
            "the target was left stopped"
        );
        assert_eq!(w.stopped_by, None);
    }

    /// A target stopped before the send and continued by someone else before the send's pause
    /// (a `SIGCONT` during the live rounds) is the send's to continue: the user who continued
    /// it expects it to run. It used to be taken as stopped on entry to the end, so the final
    /// pause stopped it again and the send left it stopped, its `SIGSTOP` pending (the fresh
    /// review of 2026-12-01: 11 of 12 runs).
    #[test]
    fn a_target_stopped_before_the_send_and_continued_during_it_runs_after_it() {
        let child = Sleeper::start();
        child.signal(nix::sys::signal::Signal::SIGSTOP);
        let mut w = child.workload();
        assert_eq!(w.stopped_by, Some(StoppedBy::OthersBeforeSend));
        // A pause probe while it is still stopped: not ours to continue.
        w.pause().unwrap();
        w.resume().unwrap();
        assert!(precopy_migrate::all_stopped(child.pid()));
        // Someone continues it; then the final pause, and the resume after it.
        child.signal(nix::sys::signal::Signal::SIGCONT);
        w.pause().unwrap();
        assert!(
            precopy_migrate::all_stopped(child.pid()),
            "the pause stopped it"
        );
        w.resume().unwrap();
        assert!(
            !precopy_migrate::all_stopped(child.pid()),
            "the send left stopped a target someone continued during it"
        );
        assert!(
            !sigstop_pending(child.pid()),
            "a SIGSTOP of ours is pending"
        );
        assert_eq!(w.stopped_by, None);
        assert!(w.continued_by_others);
        assert!(!w.control.stopped_by_others());
    }

    /// The reverse: a target running when the send began and stopped by someone else before
    /// the send's pause stays stopped, as that someone wanted; one stopped before the send and
    /// never continued stays stopped too.
    #[test]
    fn a_target_stopped_by_someone_else_before_the_pause_stays_stopped() {
        let child = Sleeper::start();
        let mut w = child.workload();
        assert_eq!(w.stopped_by, None);
        w.pause().unwrap();
        w.resume().unwrap();
        assert!(!precopy_migrate::all_stopped(child.pid()));
        child.signal(nix::sys::signal::Signal::SIGSTOP);
        w.pause().unwrap();
        w.resume().unwrap();
        assert!(
            precopy_migrate::all_stopped(child.pid()),
            "the send continued a target someone else stopped during it"
        );
        assert_eq!(w.stopped_by, Some(StoppedBy::OthersDuringSend));
        // Continued again by them before the next pause: ours again.
        child.signal(nix::sys::signal::Signal::SIGCONT);
        w.pause().unwrap();
        w.resume().unwrap();
        assert!(!precopy_migrate::all_stopped(child.pid()));
        assert_eq!(w.stopped_by, None);
        assert!(!w.continued_by_others, "it was running when the send began");

        let stopped = Sleeper::start();
        stopped.signal(nix::sys::signal::Signal::SIGSTOP);
        let mut w = stopped.workload();
        w.pause().unwrap();
        w.resume().unwrap();
        assert!(precopy_migrate::all_stopped(stopped.pid()));
        assert_eq!(w.stopped_by, Some(StoppedBy::OthersBeforeSend));
    }

    /// A throttle asked for a target stopped before the send and continued since takes hold
    /// of it as a pause does: the duty cycle runs, and the target is continued at the end.
    #[test]
    fn a_throttle_takes_hold_of_a_target_continued_during_the_send() {
        let child = Sleeper::start();
        child.signal(nix::sys::signal::Signal::SIGSTOP);
        let mut w = child.workload();
        // Still stopped: no throttle of a target someone else holds stopped.
        w.set_throttle(0.5).unwrap();
        assert!(!w.throttled);
        child.signal(nix::sys::signal::Signal::SIGCONT);
        w.set_throttle(0.5).unwrap();
        assert!(w.throttled, "the throttle did not take hold");
        assert_eq!(w.stopped_by, None);
        w.pause().unwrap();
        w.set_throttle(0.0).unwrap();
        w.resume().unwrap();
        assert!(!precopy_migrate::all_stopped(child.pid()), "left stopped");
    }

    /// The summary's words for the target follow who had it stopped when the send last took
    /// hold of it, and what `/proc` says now: a `SIGCONT` after the final pause of a target
    /// someone else had stopped is said, as is a target continued during the send.
    #[test]
    fn the_summary_says_who_left_the_target_stopped() {
        use StoppedBy::{OthersBeforeSend, OthersDuringSend};
        let words = |then, state, by, continued| target_words(7, then, state, by, continued);
        let cases = [
            (
                Then::Resume,
                "stopped",
                Some(OthersBeforeSend),
                false,
                "left stopped, as it was before the send",
            ),
            (
                Then::Resume,
                "stopped",
                Some(OthersDuringSend),
                false,
                "STOPPED: someone else stopped it during the send",
            ),
            (
                Then::Resume,
                "running",
                Some(OthersBeforeSend),
                false,
                "RUNNING: it was stopped by someone else, and something continued it since",
            ),
            (
                Then::Stop,
                "running",
                Some(OthersDuringSend),
                false,
                "RUNNING: it was stopped by someone else, and something continued it since",
            ),
            (
                Then::Resume,
                "running",
                None,
                true,
                "running (it was stopped when the send began; someone continued it during the send)",
            ),
            (
                Then::Stop,
                "stopped",
                None,
                true,
                "left stopped (--then stop",
            ),
            (
                Then::Resume,
                "stopped",
                None,
                true,
                "STOPPED, not by precopy",
            ),
            (Then::Resume, "running", None, false, "running"),
        ];
        for (then, state, by, continued, want) in cases {
            let got = words(then, state, by, continued);
            assert!(
                got.starts_with(want),
                "{then:?} {state} {by:?} {continued}: {got}"
            );
        }
    }

    /// A receiver that went away is named with the fix whichever way the sink noticed it: the
    /// connection's watcher reading end of file (`UnexpectedEof`) or a write's `EPIPE`. Only
    /// the `EPIPE` form used to be; the other reached the user as a bare "connection closed"
    /// (`a_receiver_that_went_away_is_named_with_the_fix` in tests/messages.rs failed so in 3 of 20
    /// runs beside two CPU hogs).
    #[test]
    fn a_closed_connection_is_explained_however_the_sink_noticed_it() {
        use precopy_transfer::TransferError;
        let dest = Dest::Unix(PathBuf::from("/run/dest.sock"));
        let kinds = [
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::ConnectionReset,
        ];
        for kind in kinds {
            let e = anyhow::Error::new(TransferError::Io {
                what: "sending frames",
                source: std::io::Error::new(kind, "the receiver's end of the connection closed"),
            })
            .context("sending round 0 to unix peer failed");
            let msg = explain_send_failure(e, &dest, "unix:/run/dest.sock").to_string();
            assert!(msg.contains("closed the connection"), "{kind:?}: {msg}");
            assert!(msg.contains("start it again"), "{kind:?}: {msg}");
        }
        // A file destination has no peer to start again; other errors are left as they are.
        let e = anyhow::Error::new(TransferError::Io {
            what: "sending frames",
            source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
        });
        let file = Dest::File(PathBuf::from("/tmp/x.img"));
        let msg = explain_send_failure(e, &file, "file:/tmp/x.img").to_string();
        assert!(!msg.contains("start it again"), "{msg}");
        let e = anyhow::Error::new(TransferError::Io {
            what: "sending frames",
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        let msg = explain_send_failure(e, &dest, "unix:/run/dest.sock").to_string();
        assert!(!msg.contains("start it again"), "{msg}");
    }
}
