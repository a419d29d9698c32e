//! `precopy demo`: live-migrate a writing process to another process and prove the copy exact.
//!
//! Three processes, all this binary: the driver (this command), a source (`__demo-source`, which
//! owns the memory and keeps writing it) and a destination (`__demo-dest`, which receives into
//! memory of its own). The driver copies the source's userfaultfd out with `pidfd_getfd`, tracks
//! and scans the source's memory from outside, reads pages with `process_vm_readv`, and drives
//! the migration with `precopy-migrate`. After the receiver acknowledged the final checksum the
//! source is still stopped: the driver then compares both processes' memory byte for byte.

mod dest;
mod source;
mod vm;
mod writer;

pub use dest::{DestArgs, run as run_dest};
pub use source::{MemoryBacking, SourceArgs, run as run_source};
pub use vm::{VmDestArgs, run_dest as run_vm_dest};

use crate::args::{
    HugetlbPool, MAX_DOWNTIME_MS, MAX_ROUNDS, PriorityKind, Size, available_memory,
    check_final_round_timeout, check_image_path, check_max_downtime, check_max_rounds, count_in,
    cpus, hugetlb_pool, human, invalid, parse_count, parse_size,
};
use crate::interrupt::Interrupts;
use crate::output;
use crate::progress::{self, Progress};
use anyhow::{Context, Result, bail};
use precopy_backends::BackendKind;
use precopy_migrate::{
    AfterMigration, DirtyLog, LimitPolicy, Migration, MigrationConfig, MigrationReport,
    PauseMethod, ProcessControl, ReconnectConfig, ThrottleMethod, TransferTransport, UffdDirtyLog,
    adopt_process_uffd,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::Tracker;
use precopy_transfer::{
    Compression, Connection, FinalCheck, ImageWriter, Key, Layout, PageSource, ProcessMemory,
    ReceiverConfig, Sender, SenderConfig, Sink, SourceError, Transfer,
};
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use writer::Pattern;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum TransportKind {
    Tcp,
    Unix,
}

impl TransportKind {
    fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "TCP",
            TransportKind::Unix => "a Unix socket",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum CompressKind {
    None,
    Lz4,
    Zstd,
}

impl CompressKind {
    fn name(self) -> &'static str {
        match self {
            CompressKind::None => "no compression",
            CompressKind::Lz4 => "lz4",
            CompressKind::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum CheckKind {
    /// Compare the page hashes both ends recorded while sending and applying.
    Recorded,
    /// Also re-read all source and destination memory while paused.
    Full,
}

/// Which dirty log tracks the source (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum LogKind {
    /// The engine's where it works (uffd async write-protect, 6.7+), else soft-dirty.
    Auto,
    /// userfaultfd async write-protect + PAGEMAP_SCAN.
    UffdAsync,
    /// Soft-dirty bits (`/proc/PID/clear_refs`): the source is paused around each collection.
    SoftDirty,
}

/// The source's dirty log: the engine's, or soft-dirty where the engine's mechanism is missing.
#[derive(Debug)]
enum DemoLog {
    Uffd(UffdDirtyLog),
    SoftDirty(precopy_backends::SoftDirty),
}

/// [`DemoLog`]'s error: the one of the log in use.
#[derive(Debug)]
enum DemoLogError {
    Uffd(precopy_migrate::TrackingError),
    SoftDirty(precopy_backends::Error),
}

impl std::fmt::Display for DemoLogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DemoLogError::Uffd(e) => e.fmt(f),
            DemoLogError::SoftDirty(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for DemoLogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DemoLogError::Uffd(e) => e.source(),
            DemoLogError::SoftDirty(e) => e.source(),
        }
    }
}

macro_rules! on_log {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            DemoLog::Uffd($l) => $e,
            DemoLog::SoftDirty($l) => $e,
        }
    };
}

macro_rules! on_log_err {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            DemoLog::Uffd($l) => $e.map_err(DemoLogError::Uffd),
            DemoLog::SoftDirty($l) => $e.map_err(DemoLogError::SoftDirty),
        }
    };
}

impl DirtyLog for DemoLog {
    type Error = DemoLogError;
    fn memory(&self) -> Vec<Range<u64>> {
        on_log!(self, l => l.memory())
    }
    fn page_size(&self) -> u64 {
        on_log!(self, l => l.page_size())
    }
    fn start(&mut self) -> Result<(), DemoLogError> {
        on_log_err!(self, l => l.start())
    }
    fn collect(
        &mut self,
        out: &mut Vec<Range<u64>>,
    ) -> Result<precopy_migrate::CollectStats, DemoLogError> {
        on_log_err!(self, l => l.collect(out))
    }
    fn stop(&mut self) -> Result<(), DemoLogError> {
        on_log_err!(self, l => l.stop())
    }
    fn unvouched(&self) -> Vec<Range<u64>> {
        on_log!(self, l => l.unvouched())
    }
    fn needs_pause(&self) -> bool {
        on_log!(self, l => l.needs_pause())
    }
    fn method(&self) -> String {
        on_log!(self, l => l.method())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Policy {
    SwitchOver,
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PauseKind {
    Signal,
    Freezer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ThrottleKind {
    Auto,
    Cgroup,
    Duty,
    None,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Memory of the source process, a multiple of 2 MiB (K/M/G are binary: 2G = 2 GiB;
    /// KB/MB/GB are decimal). The demo needs this much twice (source and destination), once
    /// with --to file:.
    #[arg(long, default_value = "1G", value_parser = parse_size, allow_hyphen_values = true)]
    size: Size,
    /// Bytes the source writes per second, all threads together (0: idle).
    #[arg(long, default_value = "64M", value_parser = parse_size, allow_hyphen_values = true)]
    dirty_rate: Size,
    /// What backs the source's memory: `private` anonymous, a shared `memfd` (re-read at
    /// switch-over: the write-protect bit cannot see writes through other mappings), or
    /// `hugetlb` (needs a pool of 2 MiB pages in /proc/sys/vm/nr_hugepages).
    #[arg(long, value_enum, default_value_t = MemoryBacking::Private)]
    memory: MemoryBacking,
    /// Which pages the source writes.
    #[arg(long, value_enum, default_value_t = Pattern::HotSet)]
    pattern: Pattern,
    /// Size of the hot set for `--pattern hot-set`, at most --size (default: 1/16 of memory).
    #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
    hot_set: Option<Size>,
    /// Writer threads in the source: 1 to 4 per CPU.
    #[arg(long, default_value = "2", value_parser = parse_count, allow_hyphen_values = true)]
    threads: u64,
    /// Switch over when the rest would take at most this many milliseconds (1 to 3600000).
    #[arg(long, default_value = "50", value_parser = count_in(1, MAX_DOWNTIME_MS), allow_hyphen_values = true)]
    max_downtime: u64,
    /// Cap on bytes per second sent over all streams, at least 64K (default: unlimited): a
    /// token bucket, so a send after an idle spell may go faster for up to a twentieth of a
    /// second's worth of bytes, and at least 256 KiB (at 64K that is 4 s's worth).
    #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
    bandwidth: Option<Size>,
    /// Where the pages go: a destination process (default), or `file:PATH` for a checkpoint
    /// image (inspect it with `precopy image info PATH`).
    #[arg(long, value_name = "file:PATH")]
    to: Option<String>,
    /// Socket between source and destination [default: tcp].
    #[arg(long, value_enum)]
    transport: Option<TransportKind>,
    /// Parallel connections, 1 up to the destination's limit (64) [default: 1].
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    streams: Option<u64>,
    /// Compression of page frames [default: none].
    #[arg(long, value_enum)]
    compress: Option<CompressKind>,
    /// Final checksum while the source is paused: `recorded` compares the
    /// page hashes both ends kept (no pass over memory); `full` also re-reads
    /// all memory on both ends (catches a missed write, costs downtime). The
    /// demo compares the memories byte for byte afterwards either way.
    #[arg(long, value_enum, default_value_t = CheckKind::Recorded)]
    final_check: CheckKind,
    /// The source's dirty log: `soft-dirty` pauses the source around each collection (its
    /// read and clear are two steps) and reports those pauses; `auto` takes the engine's
    /// (uffd-async) where it works, else soft-dirty.
    #[arg(long, value_enum, default_value_t = LogKind::Auto)]
    backend: LogKind,
    /// Most rounds sent while the source runs, round 0 (all memory) included: 1 to 1000000.
    /// Rehearsal rounds (sent inside the pause probes, source paused) and the final round
    /// are not counted.
    #[arg(long, default_value = "30", value_parser = count_in(1, MAX_ROUNDS), allow_hyphen_values = true)]
    max_rounds: u64,
    /// What to do when the round limit is reached.
    #[arg(long, value_enum, default_value_t = Policy::SwitchOver)]
    on_max_rounds: Policy,
    /// Limit on the migration, in seconds. With --on-timeout abort it bounds everything,
    /// the final round included: the migration fails and the source keeps running; with
    /// switch-over it cuts the round in progress short (a round paced by --bandwidth too)
    /// and starts the final round at once, which sends what that round had not (with
    /// --to file:, never paced, the round in progress ends first), bounded by
    /// --final-round-timeout.
    #[arg(long, value_parser = crate::args::parse_timeout, allow_hyphen_values = true)]
    timeout: Option<f64>,
    /// What to do when the timeout passes (needs --timeout) [default: abort].
    #[arg(long, value_enum)]
    on_timeout: Option<Policy>,
    /// Never throttle the source.
    #[arg(long)]
    no_throttle: bool,
    /// How to throttle the source [default: auto].
    #[arg(long, value_enum)]
    throttle: Option<ThrottleKind>,
    /// How to pause the source for the final round.
    #[arg(long, value_enum, default_value_t = PauseKind::Signal)]
    pause: PauseKind,
    /// TCP address the destination listens on, IP:PORT (port 0: any free port) [default:
    /// 127.0.0.1:0]. Only with --transport tcp.
    #[arg(long)]
    listen: Option<String>,
    /// Run the destination in this network namespace (see scripts/netns-demo.sh).
    #[arg(long)]
    dest_netns: Option<String>,
    /// Print the final report as one JSON object on stdout, and no progress.
    #[arg(long)]
    json: bool,
    /// How to show progress on stderr: a bar on a terminal, else one line per update.
    #[arg(long, value_enum, default_value_t = progress::Mode::Auto)]
    progress: progress::Mode,
    /// Seconds a connection may make no progress (a write, the wait for an acknowledgement, a
    /// silent sender at the destination: no byte on any of its --streams) before the migration
    /// fails.
    #[arg(long, default_value_t = 10.0, value_parser = crate::args::parse_timeout, allow_hyphen_values = true)]
    io_timeout: f64,
    /// Hard bound on the final round, in milliseconds, from the pause to the acknowledgement
    /// [default: 10 × max downtime, at least 5 s, or twice the expected downtime if more (with
    /// none estimated, twice the time --bandwidth takes for what is pending)].
    #[arg(long, value_parser = count_in(1, MAX_DOWNTIME_MS), allow_hyphen_values = true)]
    final_round_timeout: Option<u64>,
    /// Scheduling priority of the final phase's threads (the driver's, the sender's writers
    /// and, on this host, the destination process's), from the pause to the acknowledgement
    /// and in the pause probes that rehearse it; restored before the source resumes.
    #[arg(long, value_enum, default_value_t = PriorityKind::Realtime)]
    final_priority: PriorityKind,
    /// Reconnect attempts after the connection breaks (end of stream, reset) or goes silent
    /// past --io-timeout while iterating: the destination keeps what it received and only what differs is sent
    /// again. 0: a broken connection fails the migration.
    #[arg(long, default_value = "3", value_name = "N", value_parser = count_in(0, MAX_RECONNECT_ATTEMPTS), allow_hyphen_values = true)]
    reconnect_attempts: u64,
    /// Milliseconds before the first reconnect attempt, doubled after each, up to 2 s (or this,
    /// if longer).
    #[arg(long, default_value = "200", value_name = "MS", value_parser = count_in(1, MAX_RECONNECT_BACKOFF_MS), allow_hyphen_values = true)]
    reconnect_backoff: u64,
    /// Test hook: cut the source's connections (the sockets, not a process) when this round is
    /// about to be sent.
    #[arg(long, hide = true)]
    cut_at_round: Option<u64>,
    /// Test hook: cut the source's connections as the first final round is about to be sent
    /// (a switch-over that fails before the commit, and is tried again with reconnects).
    #[arg(long, hide = true)]
    cut_in_final_round: bool,
    /// Test hook: kill the destination when this round is about to be sent.
    #[arg(long, hide = true)]
    kill_dest_at_round: Option<u64>,
    /// Test hook: SIGSTOP the destination when this round is about to be sent.
    #[arg(long, hide = true)]
    stop_dest_at_round: Option<u64>,
    /// Test hook: SIGSTOP the destination as the final round starts.
    #[arg(long, hide = true)]
    stop_dest_in_final_round: bool,
    /// Test hook: SIGSTOP the destination once the migration completed, before its report.
    #[arg(long, hide = true)]
    stop_dest_before_report: bool,
    /// Test hook: SIGKILL the destination once the migration completed, before its report.
    #[arg(long, hide = true)]
    kill_dest_before_report: bool,
    /// Test hook: SIGCONT the source once the migration completed, before the comparison (as
    /// someone continuing it from outside would).
    #[arg(long, hide = true)]
    continue_source_after_commit: bool,
    #[command(flatten)]
    vm: vm::VmArgs,
}

const PAGE: u64 = 4096;
const TWO_MIB: u64 = 2 << 20;
/// Least `--bandwidth`: below it a round of any size takes hours.
const MIN_BANDWIDTH: u64 = 64 << 10;
/// How long a failed demo waits for the destination to say how it ended.
const DEST_REPORT_WAIT: Duration = Duration::from_secs(1);

/// What the flags resolve to, once checked.
#[derive(Debug)]
struct Plan {
    /// `--to file:PATH`.
    image: Option<PathBuf>,
    transport: TransportKind,
    streams: usize,
    compress: CompressKind,
    listen: String,
    hot_set: u64,
    throttle: ThrottleKind,
    on_timeout: Policy,
}

/// `n` bytes as the shortest size flag value, e.g. `64M`.
fn size_flag(n: u64) -> String {
    if n.is_multiple_of(1 << 30) {
        format!("{}G", n >> 30)
    } else {
        format!("{}M", n >> 20)
    }
}

/// The largest `--size` the demo suggests here ([`largest_size`]).
struct Largest {
    /// Bytes, whole 2 MiB (`u64::MAX` rounded down when nothing limits it).
    bytes: u64,
    /// What limits it, for a suggestion that cannot name a size.
    what: Limit,
    /// With an image: its directory and the bytes free on that file system.
    disk: Option<(PathBuf, u64)>,
}

/// What limits the largest `--size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Memory,
    Disk,
    /// `--memory hugetlb`: the free pages of the hugetlb pool.
    Pool,
}

/// The largest `--size` the demo suggests: seven eighths of what fits `copies` times in the
/// memory this process can use (none: memory does not limit it) and, with an `image`, in the
/// free space of its file system, and no more than the free pages of the hugetlb `pool` holds
/// for `--memory hugetlb`, in whole 2 MiB (the checks of `validate`, so a size it suggests is
/// one it takes).
fn largest_size(
    copies: u64,
    image: Option<&std::path::Path>,
    pool: Option<HugetlbPool>,
) -> Largest {
    let mut largest = Largest {
        bytes: u64::MAX,
        what: Limit::Memory,
        disk: None,
    };
    if copies > 0
        && let Some((avail, _)) = available_memory()
    {
        largest.bytes = avail / copies;
    }
    let dir = image.map(|p| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    });
    if let Some(dir) = dir
        && let Ok(fs) = nix::sys::statvfs::statvfs(&dir)
    {
        let free = fs.blocks_available().saturating_mul(fs.fragment_size());
        if free < largest.bytes {
            largest.bytes = free;
            largest.what = Limit::Disk;
        }
        largest.disk = Some((dir, free));
    }
    // An eighth left over: memory and disk space move while the machine runs, and a size at
    // the very edge may no longer fit when the suggestion is tried.
    largest.bytes -= largest.bytes / 8;
    // The pool's free pages are the pool's: all of them can be used.
    if let Some(pool) = pool {
        let room = pool.free.saturating_mul(pool.page_size);
        if room < largest.bytes {
            largest.bytes = room;
            largest.what = Limit::Pool;
        }
    }
    largest.bytes = largest.bytes / TWO_MIB * TWO_MIB;
    largest
}

/// What to do for `--memory hugetlb --size` of `bytes` with `pool`: the value to write to
/// `/proc/sys/vm/nr_hugepages` (as root) for the pool to hold it, if the memory this process
/// can use could hold the pages added.
fn grow_pool(pool: &HugetlbPool, bytes: u64) -> Option<String> {
    let more = bytes.div_ceil(pool.page_size).saturating_sub(pool.free);
    let fits = available_memory().is_none_or(|(avail, _)| more * pool.page_size <= avail);
    fits.then(|| {
        format!(
            "as root: echo {} > /proc/sys/vm/nr_hugepages",
            pool.total + more
        )
    })
}

/// Checks every flag against its real limit before anything starts.
fn validate(args: &Args) -> Result<Plan> {
    args.vm.check_unused()?;
    // A dirty log this machine lacks is refused here, like an address no interface has
    // (status 2: the value cannot work here, another can), not after the source started.
    let asked = match args.backend {
        LogKind::Auto => None,
        LogKind::UffdAsync => Some(BackendKind::UffdAsync),
        LogKind::SoftDirty => Some(BackendKind::SoftDirty),
    };
    if let Some(kind) = asked
        && let Err(u) = precopy_backends::check(kind)
    {
        return Err(invalid(
            "--backend",
            kind.name(),
            format!("this machine's kernel cannot track with it: {}", u.reason),
            "use --backend auto (the engine's uffd-async where it works, else soft-dirty; `precopy probe` says which)",
        ));
    }
    let size = &args.size;
    let image = match &args.to {
        None => None,
        Some(to) => Some(PathBuf::from(
            to.strip_prefix("file:")
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    invalid(
                        "--to",
                        to,
                        "is not file:PATH (a checkpoint image is the one other destination)",
                        "e.g. --to file:/tmp/demo.img, or leave --to out to migrate to a process",
                    )
                })?,
        )),
    };
    // hugetlb memory comes from the hugetlb pool, which MemAvailable does not count.
    let pool = match args.memory {
        MemoryBacking::Hugetlb => Some(hugetlb_pool().ok_or_else(|| {
            invalid(
                "--memory",
                "hugetlb",
                "this kernel has no hugetlb (/proc/meminfo lists no huge pages)",
                "use --memory private or --memory memfd",
            )
        })?),
        _ => None,
    };
    // Memory: the source (unless in the hugetlb pool), and the destination process's copy
    // unless writing an image.
    let copies = u64::from(pool.is_none()) + u64::from(image.is_none());
    let largest = largest_size(copies, image.as_deref(), pool);
    // What a refused size suggests instead: only values these checks take (at least 2 MiB,
    // whole 2 MiB, within `largest`); "free memory first" when none is.
    let suggest = |candidates: &[Option<u64>]| {
        let ok: Vec<String> = candidates
            .iter()
            .flatten()
            .filter(|&&c| c >= TWO_MIB && c % TWO_MIB == 0 && c <= largest.bytes)
            .map(|&c| format!("--size {}", size_flag(c)))
            .collect();
        match (ok.is_empty(), largest.bytes >= TWO_MIB) {
            (false, _) => format!("use {}", ok.join(" or ")),
            (true, true) => format!("use --size {} or less", size_flag(largest.bytes)),
            (true, false) => match largest.what {
                Limit::Memory => "free memory first".into(),
                Limit::Disk => "free space on the image's file system first".into(),
                Limit::Pool => {
                    "add huge pages to the hugetlb pool first (/proc/sys/vm/nr_hugepages)".into()
                }
            },
        }
    };
    if size.bytes == 0 {
        return Err(invalid(
            "--size",
            size,
            "is 0 bytes: the source needs memory",
            suggest(&[Some(1 << 30)]),
        ));
    }
    if !size.bytes.is_multiple_of(TWO_MIB) {
        let down = size.bytes / TWO_MIB * TWO_MIB;
        let up = down.checked_add(TWO_MIB);
        let decimal = if size.typed.to_ascii_uppercase().ends_with("B")
            && !size.typed.to_ascii_uppercase().ends_with("IB")
        {
            " (KB, MB and GB are decimal)"
        } else {
            ""
        };
        return Err(invalid(
            "--size",
            size,
            format!(
                "is {} bytes{decimal}, not a multiple of 2 MiB (the source maps 2 MiB-aligned memory)",
                size.bytes
            ),
            suggest(&[Some(down), up]),
        ));
    }
    if let (Some(path), Some(to)) = (&image, &args.to) {
        // The path here; whether the image fits, below as a limit of --size.
        check_image_path("--to", to, path, None, None)?;
    }
    if let Some((dir, free)) = &largest.disk
        && size.bytes > *free
    {
        return Err(invalid(
            "--size",
            size,
            format!(
                "the image of --to {} needs at least {}, and {} has {} free",
                args.to.as_deref().unwrap_or_default(),
                human(size.bytes),
                dir.display(),
                human(*free)
            ),
            format!("{}, or write the image elsewhere", suggest(&[])),
        ));
    }
    if let Some(pool) = &pool {
        let pages = size.bytes.div_ceil(pool.page_size);
        if pages > pool.free {
            let fix = match (largest.bytes >= TWO_MIB, grow_pool(pool, size.bytes)) {
                (true, Some(grow)) => format!("{}, or grow the pool ({grow})", suggest(&[])),
                (true, None) => suggest(&[]),
                (false, Some(grow)) => format!("fill the pool first ({grow})"),
                (false, None) => suggest(&[]),
            };
            return Err(invalid(
                "--size",
                size,
                format!(
                    "--memory hugetlb maps the source from the hugetlb pool: {pages} pages of {}, \
                     and the pool has {} free",
                    human(pool.page_size),
                    if pool.free == 0 {
                        "none".to_string()
                    } else {
                        format!("{} ({})", pool.free, human(pool.free * pool.page_size))
                    }
                ),
                fix,
            ));
        }
    }
    if let Some((avail, what)) = available_memory().filter(|_| copies > 0) {
        let need = size.bytes.saturating_mul(copies);
        if need > avail {
            let holds = match (copies, pool.is_some()) {
                (2, _) => "twice (source and destination)",
                (_, false) => "once (the source)",
                (_, true) => "once (the destination; the source is in the hugetlb pool)",
            };
            return Err(invalid(
                "--size",
                size,
                format!(
                    "the demo holds this memory {holds}: {} in all, more than the {} of {what}",
                    human(need),
                    human(avail)
                ),
                suggest(&[]),
            ));
        }
    }
    let max_threads = 4 * cpus();
    if args.threads == 0 {
        return Err(invalid(
            "--threads",
            args.threads,
            "the source needs at least 1 writer thread",
            "use --threads 1 or more (for an idle source: --dirty-rate 0)",
        ));
    }
    if args.threads > max_threads {
        return Err(invalid(
            "--threads",
            args.threads,
            format!(
                "at most {max_threads} writer threads here (4 per CPU, {} CPUs): more only compete with the migration for the CPUs",
                cpus()
            ),
            format!("use --threads {max_threads} or fewer"),
        ));
    }
    let hot_set = match &args.hot_set {
        None => args.size.bytes / 16,
        Some(h) => {
            if args.pattern != Pattern::HotSet {
                return Err(invalid(
                    "--hot-set",
                    h,
                    format!(
                        "applies only to --pattern hot-set (the pattern is {})",
                        pattern_name(args.pattern)
                    ),
                    "drop --hot-set or add --pattern hot-set",
                ));
            }
            if h.bytes < PAGE {
                return Err(invalid(
                    "--hot-set",
                    h,
                    "is smaller than one 4 KiB page",
                    "use at least --hot-set 4K",
                ));
            }
            if h.bytes > size.bytes {
                return Err(invalid(
                    "--hot-set",
                    h,
                    format!("is larger than --size {size} (the hot set is part of the memory)"),
                    format!("use --hot-set {size} or less"),
                ));
            }
            h.bytes
        }
    };
    check_max_downtime(args.max_downtime)?;
    check_max_rounds(args.max_rounds)?;
    if let Some(t) = args.timeout {
        crate::args::timeout_seconds("--timeout", t)?;
    }
    crate::args::timeout_seconds("--io-timeout", args.io_timeout)?;
    if args.reconnect_attempts > MAX_RECONNECT_ATTEMPTS {
        return Err(invalid(
            "--reconnect-attempts",
            args.reconnect_attempts,
            "is more than 100",
            "use e.g. --reconnect-attempts 3, or 0 to fail on a broken connection",
        ));
    }
    if !(1..=MAX_RECONNECT_BACKOFF_MS).contains(&args.reconnect_backoff) {
        return Err(invalid(
            "--reconnect-backoff",
            args.reconnect_backoff,
            "must be between 1 and 60000 milliseconds",
            "use e.g. --reconnect-backoff 200",
        ));
    }
    check_final_round_timeout(args.final_round_timeout)?;
    if let (None, Some(p)) = (args.timeout, args.on_timeout) {
        return Err(invalid(
            "--on-timeout",
            policy_name(p),
            "has no effect without --timeout",
            "add --timeout SECONDS or drop --on-timeout",
        ));
    }
    if let (true, Some(t)) = (args.no_throttle, args.throttle) {
        return Err(invalid(
            "--throttle",
            throttle_name(t),
            "conflicts with --no-throttle",
            "keep one of the two",
        ));
    }
    if let Some(b) = &args.bandwidth
        && b.bytes < MIN_BANDWIDTH
    {
        return Err(invalid(
            "--bandwidth",
            b,
            "is below 64 KiB/s, at which a round of any size takes hours",
            "use at least --bandwidth 64K, or leave it out for no cap",
        ));
    }
    // Flags that only mean something with a destination process.
    if let Some(to) = &args.to {
        let only_process: [(&'static str, Option<String>); 6] = [
            (
                "--transport",
                args.transport.map(|t| transport_flag(t).into()),
            ),
            ("--streams", args.streams.map(|n| n.to_string())),
            ("--compress", args.compress.map(|c| compress_flag(c).into())),
            ("--listen", args.listen.clone()),
            ("--dest-netns", args.dest_netns.clone()),
            (
                "--bandwidth",
                args.bandwidth.as_ref().map(|b| b.typed.clone()),
            ),
        ];
        if let Some((flag, Some(v))) = only_process.into_iter().find(|(_, v)| v.is_some()) {
            return Err(invalid(
                flag,
                v,
                format!("applies only to a migration to a destination process, not to --to {to}"),
                format!("drop {flag}, or drop --to"),
            ));
        }
    }
    let transport = args.transport.unwrap_or(TransportKind::Tcp);
    if let (TransportKind::Unix, Some(l)) = (transport, &args.listen) {
        return Err(invalid(
            "--listen",
            l,
            "applies only to --transport tcp (the Unix socket is a file the demo makes)",
            "drop --listen, or use --transport tcp",
        ));
    }
    let listen = args.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
    if transport == TransportKind::Tcp {
        let Ok(addr) = listen.parse::<std::net::SocketAddr>() else {
            // A port past 65535 is named as such (as `recv --listen` names it).
            let problem = match crate::args::port_of(&listen, "--listen") {
                Err(p) if p.contains("out of range") => p,
                _ => "is not an IP address and port".into(),
            };
            return Err(invalid(
                "--listen",
                &listen,
                problem,
                "e.g. --listen 127.0.0.1:0 (port 0: any free port) or --listen [::1]:7000",
            ));
        };
        // The destination binds it: an address it cannot bind is refused here as bad input,
        // as `recv --listen` refuses it, not as a destination that failed to start. In
        // another network namespace the address is that namespace's, which only the
        // destination sees.
        if args.dest_netns.is_none()
            && let Err(e) = std::net::TcpListener::bind(addr)
            && let Some(refusal) = crate::args::bind_refusal("--listen", &listen, &e)
        {
            return Err(refusal);
        }
    }
    if let Some(ns) = &args.dest_netns {
        // `ip netns exec NAME` finds a named namespace here.
        let path = std::path::Path::new("/run/netns").join(ns);
        if ns.contains('/') || !path.exists() {
            return Err(invalid(
                "--dest-netns",
                ns,
                format!(
                    "is no network namespace made with `ip netns add` ({} does not exist)",
                    path.display()
                ),
                "list them with `ip netns list`, or make one (see scripts/netns-demo.sh)",
            ));
        }
    }
    let max_streams = u64::from(ReceiverConfig::default().max_streams);
    let streams = args.streams.unwrap_or(1);
    if streams == 0 || streams > max_streams {
        return Err(invalid(
            "--streams",
            streams,
            format!(
                "must be 1 to {max_streams} (the destination accepts at most {max_streams} connections per transfer)"
            ),
            format!("use --streams 1 to {max_streams}"),
        ));
    }
    Ok(Plan {
        image,
        transport,
        streams: streams as usize,
        compress: args.compress.unwrap_or(CompressKind::None),
        listen,
        hot_set,
        throttle: args.throttle.unwrap_or(ThrottleKind::Auto),
        on_timeout: args.on_timeout.unwrap_or(Policy::Abort),
    })
}

fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::SwitchOver => "switch-over",
        Policy::Abort => "abort",
    }
}

/// Whether the driver may throttle the source: not with `--no-throttle`, nor with `--throttle
/// none`, which applies no throttle (the driver must neither count on one nor report one).
fn throttle_allowed(no_throttle: bool, kind: ThrottleKind) -> bool {
    !no_throttle && kind != ThrottleKind::None
}

fn throttle_name(t: ThrottleKind) -> &'static str {
    match t {
        ThrottleKind::Auto => "auto",
        ThrottleKind::Cgroup => "cgroup",
        ThrottleKind::Duty => "duty",
        ThrottleKind::None => "none",
    }
}

fn transport_flag(t: TransportKind) -> &'static str {
    match t {
        TransportKind::Tcp => "tcp",
        TransportKind::Unix => "unix",
    }
}

fn compress_flag(c: CompressKind) -> &'static str {
    match c {
        CompressKind::None => "none",
        CompressKind::Lz4 => "lz4",
        CompressKind::Zstd => "zstd",
    }
}

/// A child process with line-oriented stdout, killed on drop unless it was waited for.
struct Proc {
    name: &'static str,
    child: Child,
    /// Lines of its stdout, read on a thread of their own so a wait can be bounded.
    lines: std::sync::mpsc::Receiver<String>,
    /// Its stderr, held back until it has started ([`Proc::started`]) and passed on after.
    stderr: Arc<Mutex<ChildStderr>>,
    /// Closed when its stderr reached its end.
    stderr_done: std::sync::mpsc::Receiver<()>,
}

/// A child's stderr lines: until it has said it started, kept (a child that fails to start
/// says why there, and that becomes the cause of the demo's one error); then passed on.
#[derive(Default)]
struct ChildStderr {
    started: bool,
    held: Vec<String>,
}

/// Most held-back stderr lines of a child that has not started yet.
const HELD_STDERR_LINES: usize = 64;

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name} process"))?;
        let err = BufReader::new(child.stderr.take().context("child stderr")?);
        let stderr: Arc<Mutex<ChildStderr>> = Arc::default();
        let (done_tx, stderr_done) = std::sync::mpsc::channel::<()>();
        let held = stderr.clone();
        std::thread::Builder::new()
            .name(format!("{name}-stderr"))
            .spawn(move || {
                let _done = done_tx;
                for line in err.lines() {
                    let Ok(line) = line else { break };
                    let mut h = held
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if h.started {
                        crate::output::errln!("{line}");
                    } else if h.held.len() < HELD_STDERR_LINES {
                        h.held.push(line);
                    }
                }
            })
            .context("starting a reader thread")?;
        let out = BufReader::new(child.stdout.take().context("child stdout")?);
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in out.lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("starting a reader thread")?;
        Ok(Proc {
            name,
            child,
            lines,
            stderr,
            stderr_done,
        })
    }

    /// It said it started: what it wrote to stderr so far (warnings) is passed on, and the rest
    /// as it comes.
    fn started(&self) {
        let mut h = self
            .stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.started = true;
        for line in h.held.drain(..) {
            crate::output::errln!("{line}");
        }
    }

    /// The error of a child that ended before saying `tag`: its own error (the last line it
    /// wrote to stderr, waited for a moment) is the cause, so the demo reports one chain.
    fn ended_before(&self, tag: &str) -> anyhow::Error {
        let _ = self.stderr_done.recv_timeout(Duration::from_secs(1));
        let h = self
            .stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outer = format!("{} process exited before saying {tag}", self.name);
        match h.held.iter().rev().find(|l| !l.trim().is_empty()) {
            Some(last) => {
                let cause = last.trim();
                let cause = cause.strip_prefix("precopy: error: ").unwrap_or(cause);
                anyhow::anyhow!("{cause}").context(outer)
            }
            None => anyhow::anyhow!(outer),
        }
    }

    /// The next line, which must start with `tag`; its other words.
    fn expect(&mut self, tag: &str) -> Result<Vec<String>> {
        let line = self.lines.recv().unwrap_or_default();
        self.parse(tag, &line)
    }

    /// As [`Proc::expect`], waiting at most `limit`: a process that says nothing by then (stopped,
    /// or waiting for a peer that will not come) is an error.
    fn expect_within(&mut self, tag: &str, limit: Duration) -> Result<Vec<String>> {
        match self.lines.recv_timeout(limit) {
            Ok(line) => self.parse(tag, &line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!(
                "{} process said nothing within {limit:?} (stopped, or still waiting for a sender to resume)",
                self.name
            ),
            Err(_) => Err(self.ended_before(tag)),
        }
    }

    fn parse(&self, tag: &str, line: &str) -> Result<Vec<String>> {
        let mut words = line.split_whitespace().map(str::to_string);
        match words.next() {
            Some(t) if t == tag => Ok(words.collect()),
            Some(t) if t == "FAILED" => bail!(
                "{} process failed: {}",
                self.name,
                line.trim_start_matches("FAILED").trim()
            ),
            _ => Err(self.ended_before(tag)),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Closes its stdin (its signal to exit) and waits at most `limit` for it to exit; one
    /// still there by then (stopped, hung) is killed, and that is the error.
    fn finish_within(mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        drop(self.child.stdin.take());
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= until {
                // Dropping `self` kills it.
                bail!(
                    "the {} process did not exit within {limit:?} of being told to (stopped or hung); killed it",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Its last stderr lines, passed on before the demo's report (bounded: a grandchild
        // may still hold the pipe).
        let _ = self.stderr_done.recv_timeout(Duration::from_millis(500));
    }
}

fn num<T: std::str::FromStr>(words: &[String], i: usize) -> Result<T> {
    words
        .get(i)
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("bad announcement {words:?}"))
}

/// Resident memory of process `pid`, in bytes.
fn resident(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * precopy_sys::page_size())
}

/// Runs `work` while a second thread calls `tick` four times a second.
fn ticking<T>(tick: impl Fn() + Sync, work: impl FnOnce() -> T) -> T {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                tick();
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let r = work();
        done.store(true, Ordering::Relaxed);
        r
    })
}

/// A [`PageSource`] that counts the bytes it has read, for the progress display. The engine
/// hands what it reads to the sink at once, so this counts bytes queued for sending, not bytes
/// on the wire: the socket sink's queues hold up to `queue_depth` x `batch_pages` pages per
/// connection (1 MiB by default) ahead of the socket, the image sink none. The display says
/// "queued".
struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S: PageSource> PageSource for Counted<S> {
    fn read_ranges(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError> {
        self.inner.read_ranges(ranges, buf)?;
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// What the destination received, from its RECEIVED line.
#[derive(Debug, serde::Serialize)]
struct Received {
    #[serde(skip)]
    addr: u64,
    #[serde(skip)]
    len: u64,
    checksum: u64,
    rounds: u64,
    pages: u64,
    zero_pages: u64,
    bytes: u64,
}

/// The source writers' records that travelled as the state blob (the demo's "vCPU registers"),
/// and the destination's check of them against the memory it received.
#[derive(Debug, serde::Serialize)]
struct StateCheck {
    /// Bytes of the blob.
    bytes: u64,
    /// Per writer: writes completed and the offset of the last one.
    writers: Vec<writer::WriterState>,
    /// "ok", or why the records do not match the memory.
    check: String,
}

impl StateCheck {
    fn from_blob(
        blob: &[u8],
        check: impl FnOnce(&[writer::WriterState]) -> Result<(), String>,
    ) -> StateCheck {
        let writers = writer::decode_state(blob);
        let check = match &writers {
            Ok(w) => check(w).map_or_else(|why| why, |()| "ok".to_owned()),
            Err(why) => why.clone(),
        };
        StateCheck {
            bytes: blob.len() as u64,
            writers: writers.unwrap_or_default(),
            check,
        }
    }

    fn ok(&self) -> bool {
        self.check == "ok"
    }
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if s == "-" {
        return Ok(Vec::new());
    }
    (0..s.len() / 2 * 2)
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("the destination's state is not hex"))
        .collect()
}

#[derive(Debug, serde::Serialize)]
struct Verification {
    verified: bool,
    /// What the source was compared with: "destination process" or "image".
    against: &'static str,
    compared_bytes: u64,
    mismatched_pages: u64,
    first_mismatch: Option<u64>,
    /// Why the comparison is void: the source did not stay frozen while it ran (continued
    /// from outside after the commit). `None`: it stayed frozen.
    source_not_frozen: Option<String>,
}

/// The source as the commit left it, for [`verify`]: comparing its memory with the copy means
/// something only while it stays frozen.
#[derive(Clone)]
struct Frozen<'a> {
    pid: i32,
    /// Where the writers keep their records (each one's count of completed writes).
    records: Range<u64>,
    /// Those records as sent at the commit (the state blob).
    committed: &'a [u8],
}

impl Frozen<'_> {
    /// Why the source is not as the commit left it, if it is not.
    fn disturbed(&self) -> Option<String> {
        // Stopped by `SIGSTOP` either way once the control was released (`--pause freezer`
        // hands the frozen source over to `SIGSTOP`): every thread must still be stopped.
        if !precopy_migrate::all_stopped(self.pid) {
            return Some(
                "it is running again: a thread of it is not stopped (continued from outside?)"
                    .to_owned(),
            );
        }
        let mut now = vec![0u8; (self.records.end - self.records.start) as usize];
        match ProcessMemory::new(self.pid)
            .read_ranges(std::slice::from_ref(&self.records), &mut now)
        {
            Ok(()) if now == self.committed => None,
            Ok(()) => {
                Some("its writers' records changed since the commit: it ran and wrote".to_owned())
            }
            Err(e) => Some(format!("its writers' records could not be read again: {e}")),
        }
    }
}

/// Where the copy is, for [`verify`].
enum Copy<'a> {
    Process { pid: i32, addr: u64 },
    Image(&'a precopy_transfer::Image),
}

/// Compares source memory (stopped) with the copy, in chunks, showing progress. A source that
/// did not stay frozen before or during the comparison voids it (`source_not_frozen`).
fn verify(
    frozen: &Frozen<'_>,
    src: u64,
    copy: Copy<'_>,
    len: u64,
    progress: &Progress,
) -> Result<Verification> {
    let src_pid = frozen.pid;
    const CHUNK: u64 = 8 << 20;
    let mut a = ProcessMemory::new(src_pid);
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut v = Verification {
        verified: false,
        against: match copy {
            Copy::Process { .. } => "destination process",
            Copy::Image(_) => "image",
        },
        compared_bytes: 0,
        mismatched_pages: 0,
        first_mismatch: None,
        source_not_frozen: frozen.disturbed(),
    };
    let started = Instant::now();
    let show = |done: u64, differ: u64| {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "verifying: compared {} of {} ({:.0}%) at {}/s, {} page(s) differ",
            human(done),
            human(len),
            done as f64 * 100.0 / len as f64,
            human((done as f64 / secs) as u64),
            differ
        )
    };
    progress.phase(show(0, 0));
    let mut b = match copy {
        Copy::Process { pid, .. } => Some(ProcessMemory::new(pid)),
        Copy::Image(_) => None,
    };
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK);
        let (x, y) = (&mut ba[..n as usize], &mut bb[..n as usize]);
        a.read_ranges(&[src + off..src + off + n], x)
            .context("reading the source's memory")?;
        match (&copy, &mut b) {
            (Copy::Process { addr, .. }, Some(b)) => b
                .read_ranges(&[addr + off..addr + off + n], y)
                .context("reading the destination's memory")?,
            (Copy::Image(img), _) => {
                let mut w = &mut y[..];
                img.read_span(off..off + n, &mut w)
                    .context("reading the image back")?;
            }
            _ => bail!("no copy to compare with"),
        }
        for (i, (p, q)) in x
            .chunks(PAGE as usize)
            .zip(y.chunks(PAGE as usize))
            .enumerate()
        {
            if p != q {
                v.mismatched_pages += 1;
                v.first_mismatch.get_or_insert(off + i as u64 * PAGE);
            }
        }
        off += n;
        v.compared_bytes += n;
        progress.update(show(off, v.mismatched_pages));
    }
    progress.phase(show(off, v.mismatched_pages));
    if v.source_not_frozen.is_none() {
        v.source_not_frozen = frozen.disturbed();
    }
    v.verified =
        v.mismatched_pages == 0 && v.compared_bytes == len && v.source_not_frozen.is_none();
    Ok(v)
}

/// The latest driver snapshot, for the display thread.
#[derive(Default)]
struct Live {
    /// Round about to be (or being) sent, its size, and the source bytes read when it began.
    round: Option<(precopy_migrate::Progress, u64, Instant)>,
    /// What the source is doing now, as far as the display's round is concerned.
    source: SourceNow,
}

/// The source as the progress line describes it in the final phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum SourceNow {
    /// Running: not yet paused for the round shown.
    #[default]
    Running,
    /// Paused (the final round, a pause probe).
    Paused,
    /// Resumed during the final phase: the final round did not complete (it failed, or is
    /// retried after a reconnect).
    Resumed,
}

/// The demo's [`ProcessControl`], telling the progress display whether the source is paused,
/// so that the line never says "source paused" once the source was resumed.
struct Watched {
    inner: ProcessControl,
    live: Arc<Mutex<Live>>,
    progress: Progress,
}

impl Watched {
    /// Records what the source does now; returns the line that says the final round shown
    /// did not complete, once: that round is then over for the display, so that neither a
    /// tick nor a pause probe before the next round says anything more of it (it would say
    /// "did not complete" again, or "source paused" of a source that runs).
    fn set(&self, now: SourceNow) -> Option<String> {
        let mut l = self.live.lock().ok()?;
        l.source = now;
        let (p, _, _) = l.round.as_ref()?;
        let over = now == SourceNow::Resumed && p.phase == precopy_migrate::Phase::Final;
        let msg = over.then(|| round_message(p, 0, Duration::ZERO, now));
        if over {
            l.round = None;
        }
        msg
    }
}

impl precopy_migrate::Workload for Watched {
    type Error = precopy_migrate::ProcessError;
    fn pause(&mut self) -> Result<(), Self::Error> {
        self.inner.pause()?;
        self.set(SourceNow::Paused);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Self::Error> {
        self.inner.resume()?;
        let final_phase = self.live.lock().is_ok_and(|l| {
            l.round
                .as_ref()
                .is_some_and(|(p, _, _)| p.phase == precopy_migrate::Phase::Final)
        });
        let now = if final_phase {
            SourceNow::Resumed
        } else {
            SourceNow::Running
        };
        if let Some(msg) = self.set(now) {
            // A line of its own: the last one said "source paused".
            self.progress.phase(msg);
        }
        Ok(())
    }
    fn pause_priority(&self) -> Option<precopy_migrate::PriorityReport> {
        self.inner.pause_priority()
    }
    fn set_throttle(&mut self, fraction: f64) -> Result<(), Self::Error> {
        self.inner.set_throttle(fraction)
    }
    fn throttle_method(&self) -> &'static str {
        self.inner.throttle_method()
    }
    fn counters(&mut self) -> Option<precopy_migrate::WorkloadCounters> {
        self.inner.counters()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, Self::Error> {
        self.inner.save_state()
    }
}

fn round_message(
    p: &precopy_migrate::Progress,
    sent: u64,
    since: Duration,
    source: SourceNow,
) -> String {
    let rate = sent as f64 / since.as_secs_f64().max(1e-3);
    let of = p.pending_bytes.max(1);
    let head = match (p.phase, source) {
        (precopy_migrate::Phase::Full, _) => "round 0 (all memory)".to_string(),
        (precopy_migrate::Phase::Iterating, _) => format!("round {}", p.round),
        (precopy_migrate::Phase::Final, SourceNow::Paused) => {
            format!("final round {} (source paused)", p.round)
        }
        (precopy_migrate::Phase::Final, SourceNow::Running) => {
            format!("final round {} (pausing the source)", p.round)
        }
        (precopy_migrate::Phase::Final, SourceNow::Resumed) => {
            return format!(
                "final round {} did not complete: the source was resumed and runs",
                p.round
            );
        }
    };
    let mut msg = if sent == 0 {
        // Nothing handed to the transport yet: what the round will send, not "queued 0 B".
        format!("{head}: {} to send", human(p.pending_bytes))
    } else {
        format!(
            "{head}: queued {} of {} to send ({:.0}%) at {}/s",
            human(sent.min(p.pending_bytes)),
            human(p.pending_bytes),
            sent.min(of) as f64 * 100.0 / of as f64,
            human(rate as u64)
        )
    };
    if p.phase != precopy_migrate::Phase::Full {
        msg.push_str(&format!(", source writes {}/s", human(p.dirty_rate as u64)));
        if p.throttle > 0.0 {
            msg.push_str(&format!(", throttled {:.0}%", p.throttle * 100.0));
        }
        if let Some(d) = p.expected_downtime {
            msg.push_str(&format!(
                ", expected downtime {:.0} ms",
                d.as_secs_f64() * 1e3
            ));
        }
    }
    msg
}

fn policy(p: Policy) -> LimitPolicy {
    match p {
        Policy::SwitchOver => LimitPolicy::SwitchOver,
        Policy::Abort => LimitPolicy::Abort,
    }
}

/// A failed demo migration: the demo's log, the transfer's and the process control's errors as
/// causes (boxed where it is returned: it is large).
type DemoMigrationError = precopy_migrate::Error<
    DemoLogError,
    precopy_transfer::TransferError,
    precopy_migrate::ProcessError,
>;

/// Runs the migration into `transfer`, showing progress; the result and the report.
fn migrate<K: Sink>(
    args: &Args,
    plan: &Plan,
    mut transfer: Transfer<Counted<ProcessMemory>, K>,
    (log, control): (DemoLog, ProcessControl),
    progress: &Progress,
    dest_pid: Option<i32>,
    mut on_round: impl FnMut(&precopy_migrate::Progress) + Send + 'static,
) -> (
    Result<MigrationReport, Box<DemoMigrationError>>,
    MigrationReport,
) {
    let read = transfer.source_mut().read.clone();
    let mut config = MigrationConfig {
        max_downtime: Duration::from_millis(args.max_downtime),
        max_rounds: args.max_rounds,
        max_rounds_policy: policy(args.on_max_rounds),
        timeout: args.timeout.map(Duration::from_secs_f64),
        timeout_policy: policy(plan.on_timeout),
        after: AfterMigration::Stop,
        final_round_timeout: args.final_round_timeout.map(Duration::from_millis),
        reconnect: reconnect_config(args),
        final_priority: args.final_priority.config(),
        ..MigrationConfig::default()
    };
    config.throttle.enabled = throttle_allowed(args.no_throttle, plan.throttle);
    let live = Arc::new(Mutex::new(Live::default()));
    let live2 = live.clone();
    let read2 = read.clone();
    let progress2 = progress.clone();
    let control = Watched {
        inner: control,
        live: live.clone(),
        progress: progress.clone(),
    };
    let mut migration = Migration::new(
        log,
        TransferTransport::new(transfer).final_check(match args.final_check {
            CheckKind::Recorded => FinalCheck::Recorded,
            CheckKind::Full => FinalCheck::Full,
        }),
        control,
        config,
    )
    // The writers' own throughput for half a second before tracking: the report's baseline.
    .measure_workload_before(Duration::from_millis(500))
    // The destination runs on this host: its threads receive the final round.
    .raise_also(move || {
        dest_pid
            .and_then(|pid| precopy_sys::sched::process_threads(pid).ok())
            .unwrap_or_default()
    })
    .on_progress(move |p| {
        let at = read2.load(Ordering::Relaxed);
        let source = match live2.lock() {
            Ok(mut l) => {
                l.round = Some((*p, at, Instant::now()));
                // A new round: the source runs unless paused right now.
                if l.source == SourceNow::Resumed {
                    l.source = SourceNow::Running;
                }
                l.source
            }
            Err(_) => SourceNow::Running,
        };
        progress2.phase(round_message(p, 0, Duration::ZERO, source));
        on_round(p);
    });
    let tick = || {
        let Ok(l) = live.lock() else { return };
        if let Some((p, at, when)) = &l.round {
            let sent = read.load(Ordering::Relaxed).saturating_sub(*at);
            progress.update(round_message(p, sent, when.elapsed(), l.source));
        }
    };
    let result = ticking(tick, || migration.run().map_err(Box::new));
    let report = migration.report().clone();
    (result, report)
}

/// The prefix of the demo's private directories in the temporary directory.
const PRIVATE_PREFIX: &str = "precopy-demo-";

/// The demo's private directory, `$TMPDIR/precopy-demo-PID` (mode 0700: only this user can
/// reach what it holds), for the destination's Unix socket and the key file. Removed when
/// the demo ends (dropped) or is interrupted (the signal handler). A demo killed with
/// `SIGKILL` cannot remove it: every demo first removes those left by demos that are gone,
/// and a directory left at its own PID (an earlier process with the same PID) is replaced,
/// so a stale file never makes a run fail.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create() -> Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let tmp = std::env::temp_dir();
        remove_stale_private_dirs(&tmp);
        let path = tmp.join(format!("{PRIVATE_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating the demo's private directory {}", path.display()))?;
        Ok(PrivateDir { path })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes what demos killed with `SIGKILL` left in `tmp`: their private directories, and the
/// `.sock` and `.key` files older versions put there, whose process no longer exists.
fn remove_stale_private_dirs(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PRIVATE_PREFIX)) else {
            continue;
        };
        let pid = rest
            .strip_suffix(".sock")
            .or_else(|| rest.strip_suffix(".key"))
            .unwrap_or(rest);
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if std::path::Path::new("/proc").join(pid).exists() {
            continue;
        }
        let path = entry.path();
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.vm.enabled() {
        return vm::run(&args);
    }
    let plan = validate(&args)?;
    // Before any thread: Ctrl-C and SIGTERM still end in one report, children killed.
    let interrupts = Interrupts::install(None, args.json)?;
    let progress = Progress::new(args.progress, args.json);
    let shown = progress.clone();
    interrupts.state().set_partial(move || {
        let (phase, update) = shown.last();
        serde_json::json!({ "phase": phase, "progress": update })
    });
    let exe = std::env::current_exe().context("finding this executable")?;
    let private = PrivateDir::create()?;
    interrupts.state().add_file(private.path.clone());
    let sock_path = private.path.join("dest.sock");

    // Destination first: it must listen before anyone connects.
    let mut dest = None;
    // Every listener challenges its sender, loopback included: a fresh random key, handed to
    // the destination in a file only this user can read (deleted once the destination listens).
    let key = Key::random();
    if plan.image.is_none() {
        let listen = match plan.transport {
            TransportKind::Tcp => format!("tcp:{}", plan.listen),
            TransportKind::Unix => format!("unix:{}", sock_path.display()),
        };
        let key_path = private.path.join("key");
        key.write_new_file(&key_path)
            .context("writing the demo's key file")?;
        let mut cmd = match &args.dest_netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["__demo-dest", "--listen", &listen])
            .arg("--key-file")
            .arg(&key_path)
            .args(["--io-timeout", &args.io_timeout.to_string()])
            .args(["--resume-wait", &resume_wait(&args).to_string()])
            .args(["--parent", &std::process::id().to_string()]);
        progress.phase("starting the destination process");
        let listening = Proc::spawn("destination", cmd).and_then(|mut d| {
            let words = d.expect("LISTENING")?;
            d.started();
            Ok((d, words))
        });
        let _ = std::fs::remove_file(&key_path);
        let (d, words) = listening?;
        interrupts.state().add_child(d.pid());
        let addr = words.first().context("no listening address")?.clone();
        dest = Some((d, addr));
    }

    let mut cmd = Command::new(&exe);
    cmd.arg("__demo-source")
        .args(["--size", &args.size.bytes.to_string()])
        .args(["--dirty-rate", &args.dirty_rate.bytes.to_string()])
        .args(["--pattern", pattern_name(args.pattern)])
        .args(["--threads", &args.threads.to_string()])
        .args(["--hot-set", &plan.hot_set.to_string()])
        .args(["--memory", args.memory.name()])
        // Killed by the kernel if this process dies, even while stopped for the final round.
        .args(["--parent", &std::process::id().to_string()]);
    let mut source = Proc::spawn("source", cmd)?;
    let source_pid = source.pid();
    interrupts.state().add_child(source_pid);
    let size = args.size.bytes;
    progress.phase(format!("source: filling {} of memory", human(size)));
    let tick = || {
        let rss = resident(source_pid).unwrap_or(0).min(size);
        progress.update(format!(
            "source: filling memory, {} of {} resident ({:.0}%)",
            human(rss),
            human(size),
            rss as f64 * 100.0 / size as f64
        ));
    };
    let words = ticking(tick, || source.expect("READY"))?;
    source.started();
    let (pid, addr, len, fd, counters): (i32, u64, u64, i32, u64) = (
        num(&words, 0)?,
        num(&words, 1)?,
        num(&words, 2)?,
        num(&words, 3)?,
        num(&words, 4)?,
    );
    let (state_addr, state_len): (u64, u64) = (num(&words, 5)?, num(&words, 6)?);
    if pid != source_pid {
        bail!("source announced pid {pid}, started {source_pid}");
    }

    // Track the source's memory from here.
    let use_soft_dirty = match args.backend {
        LogKind::UffdAsync => false,
        LogKind::SoftDirty => true,
        LogKind::Auto => precopy_backends::check(BackendKind::UffdAsync).is_err(),
    };
    let log = if use_soft_dirty {
        progress.phase(format!(
            "soft-dirty tracking of the source's {}",
            human(len)
        ));
        let sd = precopy_backends::SoftDirty::for_process(pid, &[addr..addr + len])
            .context("tracking the source with soft-dirty bits")?;
        DemoLog::SoftDirty(sd)
    } else {
        progress.phase(format!("write-protecting the source's {}", human(len)));
        let uffd = adopt_process_uffd(pid, fd)?;
        let mut tracker = Tracker::new(uffd);
        tracker
            .register(addr..addr + len)
            .context("registering the source's memory")?;
        let scanner = Scanner::new(ScanOptions::default()).context("starting the scanner")?;
        DemoLog::Uffd(UffdDirtyLog::new(tracker, scanner))
    };
    let backend_used = match &log {
        DemoLog::Uffd(_) => BackendKind::UffdAsync,
        DemoLog::SoftDirty(_) => BackendKind::SoftDirty,
    };
    let control = ProcessControl::new(
        pid,
        match args.pause {
            PauseKind::Signal => PauseMethod::Signal,
            PauseKind::Freezer => PauseMethod::Freezer,
        },
        match plan.throttle {
            ThrottleKind::Auto => ThrottleMethod::Auto,
            ThrottleKind::Cgroup => ThrottleMethod::CgroupCpu,
            ThrottleKind::Duty => ThrottleMethod::DutyCycle,
            ThrottleKind::None => ThrottleMethod::None,
        },
    )?
    .with_counters(counters)
    .with_state(state_addr, state_len);
    let layout = Layout::single(PAGE, addr, len)?;
    let source_mem = Counted {
        inner: ProcessMemory::new(pid),
        read: Arc::new(AtomicU64::new(0)),
    };

    // What the comparison checks the source against: still as the commit left it.
    let frozen = Frozen {
        pid,
        records: state_addr..state_addr + state_len,
        committed: &[],
    };
    let continue_source = || {
        if args.continue_source_after_commit {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    };
    // The writers' records that arrived as state, checked against the copy's memory.
    let mut state: Option<StateCheck> = None;
    // Why a completed migration's copy could not be compared (the destination went away,
    // the image cannot be read): the run fails, with its report.
    let mut compare_error: Option<anyhow::Error> = None;
    let (result, report, received, verification, mut destination_outcome) =
        match (&plan.image, dest.as_mut()) {
            (Some(path), _) => {
                let writer = ImageWriter::create(path, layout.clone())
                    .with_context(|| format!("creating the image {}", path.display()))?;
                let transfer = Transfer::new(
                    source_mem,
                    writer,
                    layout,
                    SenderConfig::default().batch_pages,
                )?;
                let (result, report) = migrate(
                    &args,
                    &plan,
                    transfer,
                    (log, control),
                    &progress,
                    None,
                    |_| {},
                );
                let verification = match &result {
                    Ok(_) => (|| {
                        let img = precopy_transfer::Image::open(path)
                            .with_context(|| format!("opening the image {}", path.display()))?;
                        let blob = img.state()?.unwrap_or_default();
                        state = Some(StateCheck::from_blob(&blob, |w| {
                            writer::check_state(w, |off| {
                                let word = img.read_span_to_vec(off..off.checked_add(8)?).ok()?;
                                Some(u64::from_ne_bytes(word.try_into().ok()?))
                            })
                        }));
                        continue_source();
                        let frozen = Frozen {
                            committed: &blob,
                            ..frozen.clone()
                        };
                        verify(&frozen, addr, Copy::Image(&img), len, &progress)
                    })()
                    .map_err(|e| compare_error = Some(e))
                    .ok(),
                    Err(_) => None,
                };
                (result, report, None, verification, None)
            }
            (None, Some((dest, dest_addr))) => {
                // Every connection the sender opens (the first ones and those of a resume),
                // kept for the cut test hook.
                let opened: Arc<Mutex<Vec<Connection>>> = Arc::default();
                let keep = opened.clone();
                let (transport, to, path) = (plan.transport, dest_addr.clone(), sock_path.clone());
                let connect_timeout = Duration::from_secs_f64(args.io_timeout);
                let dial = move || {
                    let c = match transport {
                        TransportKind::Tcp => {
                            Connection::connect_tcp_timeout(to.as_str(), connect_timeout)
                        }
                        TransportKind::Unix => Connection::connect_unix(&path),
                    }?;
                    keep.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(c.try_clone()?);
                    Ok(c)
                };
                let sender_config = SenderConfig {
                    compression: match plan.compress {
                        CompressKind::None => Compression::None,
                        CompressKind::Lz4 => Compression::Lz4,
                        CompressKind::Zstd => Compression::Zstd(1),
                    },
                    streams: plan.streams,
                    bandwidth_limit: args.bandwidth.as_ref().map(|b| b.bytes),
                    key: Some(key),
                    handshake_timeout: Duration::from_secs_f64(args.io_timeout),
                    io_timeout: Some(Duration::from_secs_f64(args.io_timeout)),
                    ..SenderConfig::default()
                };
                let sender = Sender::dial(dial, layout, source_mem, &sender_config)
                    .with_context(|| format!("connecting the sender to {dest_addr}"))?;
                let dest_pid = nix::unistd::Pid::from_raw(dest.pid());
                let signal_dest = move |sig| {
                    let _ = nix::sys::signal::kill(dest_pid, sig);
                };
                let cut_at = args.cut_at_round;
                let cut_in_final = args.cut_in_final_round;
                let mut cut = false;
                let kill_at = args.kill_dest_at_round;
                let stop_at = args.stop_dest_at_round;
                let stop_in_final = args.stop_dest_in_final_round;
                let mut stopped = false;
                let receiver_pid = Some(dest.pid());
                let (result, report) = migrate(
                    &args,
                    &plan,
                    sender,
                    (log, control),
                    &progress,
                    receiver_pid,
                    move |p| {
                        let cut_now = cut_at.is_some_and(|r| p.round >= r)
                            || (cut_in_final && p.phase == precopy_migrate::Phase::Final);
                        if !cut && cut_now {
                            cut = true;
                            for c in opened
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .drain(..)
                            {
                                let _ = c.shutdown(std::net::Shutdown::Both);
                            }
                        }
                        if kill_at.is_some_and(|r| p.round >= r) {
                            signal_dest(nix::sys::signal::Signal::SIGKILL);
                        }
                        let stop = stop_at.is_some_and(|r| p.round >= r)
                            || (stop_in_final && p.phase == precopy_migrate::Phase::Final);
                        if stop && !stopped {
                            stopped = true;
                            signal_dest(nix::sys::signal::Signal::SIGSTOP);
                        }
                    },
                );
                if args.stop_dest_at_round.is_some() || args.stop_dest_in_final_round {
                    // Let a destination stopped by a test hook run again: it must not report success.
                    signal_dest(nix::sys::signal::Signal::SIGCONT);
                }
                // The source is still stopped after success: compare the two memories now.
                let (received, verification, destination_outcome) = match &result {
                    Ok(_) => match (|| {
                        progress.phase("waiting for the destination's report");
                        for (hook, sig) in [
                            (
                                args.stop_dest_before_report,
                                nix::sys::signal::Signal::SIGSTOP,
                            ),
                            (
                                args.kill_dest_before_report,
                                nix::sys::signal::Signal::SIGKILL,
                            ),
                        ] {
                            if hook {
                                nix::sys::signal::kill(dest_pid, sig)
                                    .context("signalling the destination (test hook)")?;
                            }
                        }
                        // It has everything once FINISH is acknowledged: a destination silent
                        // for --io-timeout (stopped, hung) fails the demo instead of holding it.
                        let report_wait = Duration::from_secs_f64(args.io_timeout);
                        let w = dest.expect_within("RECEIVED", report_wait)?;
                        let r = Received {
                            addr: num(&w, 0)?,
                            len: num(&w, 1)?,
                            checksum: num(&w, 2)?,
                            rounds: num(&w, 3)?,
                            pages: num(&w, 4)?,
                            zero_pages: num(&w, 5)?,
                            bytes: num(&w, 6)?,
                        };
                        if r.len != len {
                            bail!("destination holds {} bytes, source {len}", r.len);
                        }
                        let blob = unhex(w.get(7).map_or("-", String::as_str))?;
                        let check = dest.expect_within("STATE", report_wait)?.join(" ");
                        state = Some(StateCheck::from_blob(&blob, |_| match check.as_str() {
                            "ok" => Ok(()),
                            other => Err(format!("the destination says: {other}")),
                        }));
                        let copy = Copy::Process {
                            pid: dest.pid(),
                            addr: r.addr,
                        };
                        continue_source();
                        let frozen = Frozen {
                            committed: &blob,
                            ..frozen.clone()
                        };
                        let v = verify(&frozen, addr, copy, len, &progress)?;
                        anyhow::Ok((r, v))
                    })() {
                        Ok((r, v)) => (Some(r), Some(v), None),
                        Err(e) => {
                            compare_error = Some(e);
                            (None, None, None)
                        }
                    },
                    // The destination must fail too, never announce a copy it was not committed.
                    // Bounded: a stopped destination must not hold the demo.
                    Err(_) => (
                        None,
                        None,
                        Some(match dest.expect_within("RECEIVED", DEST_REPORT_WAIT) {
                            Ok(_) => "RECEIVED (a copy the source never committed!)".to_string(),
                            Err(e) => format!("{e:#}"),
                        }),
                    ),
                };
                (result, report, received, verification, destination_outcome)
            }
            (None, None) => bail!("no destination"),
        };
    progress.finish();
    drop(source);
    if let Some((d, _)) = dest
        && result.is_ok()
        && let Err(e) = d.finish_within(Duration::from_secs_f64(args.io_timeout))
    {
        // The copy was already compared: the run stands, the leftover is reported (in
        // the JSON too, as the destination's outcome).
        tracing::warn!("{e:#}");
        destination_outcome = Some(format!("{e:#}"));
    }
    // Else dropping it kills it: a failed destination (stopped, or waiting for a sender
    // that will not resume) must not hold the demo.
    drop(private);

    let error: Option<anyhow::Error> = match (&result, &verification) {
        (Err(e), _) => {
            // A limit the user set, with the flag that set it and what to change.
            let hint = match &**e {
                precopy_migrate::Error::Aborted {
                    reason: precopy_migrate::AbortReason::MaxRounds { .. },
                } => format!(
                    " (--max-rounds {} with --on-max-rounds abort: raise --max-rounds, or use --on-max-rounds switch-over)",
                    args.max_rounds
                ),
                precopy_migrate::Error::Aborted {
                    reason: precopy_migrate::AbortReason::Timeout { .. },
                } => format!(
                    " (--timeout {} with --on-timeout abort: raise --timeout, or use --on-timeout switch-over)",
                    args.timeout.unwrap_or_default()
                ),
                _ => String::new(),
            };
            Some(
                anyhow::anyhow!("{}{hint}", precopy_sys::error_chain(e.as_ref()))
                    .context("migration failed"),
            )
        }
        (Ok(_), Some(v)) if v.source_not_frozen.is_some() => Some(
            anyhow::anyhow!(
                "the source did not stay frozen after the commit ({}), so comparing its memory with the copy says nothing about the copy",
                v.source_not_frozen.as_deref().unwrap_or_default()
            )
            .context("the copy could not be verified"),
        ),
        (Ok(_), Some(v)) if !v.verified => Some(anyhow::anyhow!(
            "{} page(s) of the copy differ from the source's frozen memory, the first at offset {:#x}",
            v.mismatched_pages,
            v.first_mismatch.unwrap_or(0)
        ).context("verification failed")),
        (Ok(_), None) => Some(
            compare_error
                .take()
                .unwrap_or_else(|| anyhow::anyhow!("the copy was not compared"))
                .context("the migration completed, but its copy could not be compared"),
        ),
        _ => match &state {
            Some(st) if !st.ok() => Some(anyhow::anyhow!(
                "the writers' records sent as state do not match the memory that arrived: {}",
                st.check
            )),
            _ => None,
        },
    };
    let json = serde_json::json!({
        "verified": verification.as_ref().is_some_and(|v| v.verified),
        "settings": settings_json(&args, &plan),
        "dirty_log": backend_used.name(),
        "migration": report,
        "memory_rate": report.memory_rate(),
        "downtime_exceeded": report.downtime_exceeded(),
        "switch_over_forced": report
            .switch_reason
            .is_some_and(|r| r != precopy_migrate::SwitchReason::Converged),
        "destination": received,
        "destination_outcome": destination_outcome,
        "image": plan.image,
        "verification": verification,
        "state": state,
    });
    if args.json {
        if let Some(e) = error {
            return Err(output::fail(true, json, e));
        }
        output::print_json(json, None);
        return Ok(ExitCode::SUCCESS);
    }
    let printed = print_text(&args, &plan, &report, verification.as_ref(), state.as_ref())
        .and_then(|()| {
            if backend_used != BackendKind::UffdAsync {
                output::try_write(
                    format_args!(
                        "dirty log: {} ({}): the source was paused around each collection",
                        backend_used.name(),
                        backend_used.mechanism()
                    ),
                    true,
                )?;
            }
            Ok(())
        });
    match printed {
        // A reader that stopped early (`| head`, `| true`): the rest of the report is not
        // wanted; the outcome below is the command's own.
        Err(e) if output::is_broken_pipe(&e) => {}
        Err(e) => return Err(e.context("writing the report to stdout")),
        Ok(()) => {}
    }
    match error {
        Some(e) => Err(output::fail(false, serde_json::Value::Null, e)),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn settings_json(args: &Args, plan: &Plan) -> serde_json::Value {
    serde_json::json!({
        "size": args.size.bytes,
        "memory": args.memory,
        "dirty_rate": args.dirty_rate.bytes,
        "pattern": args.pattern,
        "hot_set": plan.hot_set,
        "threads": args.threads,
        "max_downtime_ms": args.max_downtime,
        "max_rounds": args.max_rounds,
        "bandwidth": args.bandwidth.as_ref().map(|b| b.bytes),
        "to": if plan.image.is_some() { "image" } else { "process" },
        "transport": plan.image.is_none().then_some(plan.transport),
        "streams": plan.image.is_none().then_some(plan.streams),
        "compress": plan.image.is_none().then_some(plan.compress),
        "final_check": args.final_check,
        "backend": args.backend,
        "dest_netns": args.dest_netns,
        "reconnect_attempts": args.reconnect_attempts,
        "reconnect_backoff_ms": args.reconnect_backoff,
        "on_max_rounds": flag_value(&args.on_max_rounds),
        "timeout_s": args.timeout,
        "on_timeout": args
            .timeout
            .and_then(|_| flag_value(&args.on_timeout.unwrap_or(Policy::Abort))),
        "no_throttle": args.no_throttle,
        "throttle": flag_value(&args.throttle.unwrap_or(ThrottleKind::Auto)),
        "pause": flag_value(&args.pause),
        "io_timeout_s": args.io_timeout,
        "final_round_timeout_ms": args.final_round_timeout,
        "final_priority": args.final_priority,
    })
}

/// A flag's value as the user types it (`switch-over`, `freezer`).
fn flag_value<T: clap::ValueEnum>(v: &T) -> Option<String> {
    v.to_possible_value().map(|p| p.get_name().to_owned())
}

/// Most `--reconnect-attempts`.
const MAX_RECONNECT_ATTEMPTS: u64 = 100;
/// Longest `--reconnect-backoff`, a minute in milliseconds.
const MAX_RECONNECT_BACKOFF_MS: u64 = 60_000;

/// `--reconnect-attempts` and `--reconnect-backoff` as the driver takes them.
fn reconnect_config(args: &Args) -> ReconnectConfig {
    let backoff = Duration::from_millis(args.reconnect_backoff);
    ReconnectConfig {
        attempts: u32::try_from(args.reconnect_attempts).unwrap_or(u32::MAX),
        backoff,
        max_backoff: backoff.max(Duration::from_secs(2)),
    }
}

/// Seconds the destination waits for the source to come back after a break: every attempt's
/// backoff and connect-and-handshake (each bounded by `--io-timeout`), and one more I/O timeout.
fn resume_wait(args: &Args) -> f64 {
    let r = reconnect_config(args);
    let mut backoff = r.backoff;
    let mut wait = Duration::from_secs_f64(args.io_timeout);
    for _ in 0..r.attempts {
        wait += backoff + Duration::from_secs_f64(args.io_timeout);
        backoff = (backoff * 2).min(r.max_backoff);
    }
    wait.as_secs_f64()
}

fn print_text(
    args: &Args,
    plan: &Plan,
    report: &MigrationReport,
    verification: Option<&Verification>,
    state: Option<&StateCheck>,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let target = match &plan.image {
        Some(p) => format!("into the image {}", p.display()),
        None => format!(
            "over {} ({} stream{}, {})",
            plan.transport.name(),
            plan.streams,
            if plan.streams == 1 { "" } else { "s" },
            plan.compress.name()
        ),
    };
    writeln!(
        out,
        "precopy demo: {} of {} {target}; {} writer thread{} writing {}/s ({} pattern); downtime limit {} ms; final check: {}",
        human(args.size.bytes),
        match args.memory {
            // The report counts base pages: say so where the memory's own pages are larger.
            MemoryBacking::Hugetlb => {
                "hugetlb memory (2 MiB pages; the report counts 4 KiB pages, 512 to a written 2 MiB page)".to_string()
            }
            m => format!("{} memory", m.name()),
        },
        args.threads,
        if args.threads == 1 { "" } else { "s" },
        human(args.dirty_rate.bytes),
        pattern_name(args.pattern),
        args.max_downtime,
        match args.final_check {
            CheckKind::Recorded => "recorded page checksums",
            CheckKind::Full => "full re-read of memory",
        }
    )?;
    writeln!(out)?;
    write!(out, "{report}")?;
    writeln!(out)?;
    match verification {
        Some(v) if v.verified => writeln!(
            out,
            "verified: the {} equals the source's frozen memory byte for byte ({})",
            v.against,
            human(v.compared_bytes)
        )?,
        Some(Verification {
            source_not_frozen: Some(why),
            ..
        }) => writeln!(
            out,
            "NOT verified: the source did not stay frozen after the commit ({why}); the comparison is void"
        )?,
        Some(v) => writeln!(
            out,
            "NOT verified: {} page(s) of the {} differ, the first at offset {:#x}",
            v.mismatched_pages,
            v.against,
            v.first_mismatch.unwrap_or(0)
        )?,
        None => writeln!(out, "not verified: the migration did not complete")?,
    }
    if let Some(st) = state {
        let writes: Vec<String> = st.writers.iter().map(|w| w.writes.to_string()).collect();
        writeln!(
            out,
            "state: {} bytes, {} writers' records (writes: {}); each writer's last write {}",
            st.bytes,
            st.writers.len(),
            writes.join(", "),
            if st.ok() {
                "found in the copy's memory".to_owned()
            } else {
                format!("NOT in the copy's memory: {}", st.check)
            }
        )?;
    }
    if let (Some(p), Some(v)) = (&plan.image, verification)
        && v.verified
    {
        writeln!(
            out,
            "image: {} (inspect: precopy image info {0})",
            p.display()
        )?;
    }
    Ok(())
}

fn pattern_name(p: Pattern) -> &'static str {
    match p {
        Pattern::Uniform => "uniform",
        Pattern::HotSet => "hot-set",
        Pattern::Sequential => "sequential",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `demo`'s flags as the command line gives them.
    fn demo_args(flags: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Demo {
            #[command(flatten)]
            args: Args,
        }
        let argv = std::iter::once("demo").chain(flags.iter().copied());
        <Demo as clap::Parser>::try_parse_from(argv)
            .expect("parsing the flags")
            .args
    }

    /// Every `--size` value a refusal of `--size` suggests is one `validate` takes: fed back
    /// (with the same other flags), it passes. The sizes cover each refusal: zero, not whole
    /// 2 MiB (below 2 MiB, mid-range, decimal, too large to fit, the largest u64), and more
    /// than the memory (or, with `--memory hugetlb`, the hugetlb pool as this machine has it)
    /// holds, with and without an image. A refusal that suggests no size says what to free or
    /// fill. (`tests/demo.rs` runs the demo with a hugetlb size suggested from a grown pool.)
    #[test]
    fn a_refused_size_suggests_only_sizes_the_demo_takes() {
        let dir = std::env::temp_dir();
        let image = format!("file:{}/precopy-size-suggestion.img", dir.display());
        let mut suggested = 0;
        let hugetlb = ["--memory", "hugetlb"];
        for extra in [
            vec![],
            vec!["--to", image.as_str()],
            hugetlb.to_vec(),
            [&hugetlb[..], &["--to", image.as_str()]].concat(),
        ] {
            for size in [
                "0", "1K", "2049M", "64MB", "1P", "15EiB", "3000T", "1000000G",
            ] {
                let mut flags = vec!["--size", size];
                flags.extend(&extra);
                let e = validate(&demo_args(&flags)).expect_err(size);
                let refusal = e
                    .downcast_ref::<crate::args::Invalid>()
                    .expect("a usage error");
                assert_eq!(refusal.flag, "--size", "{e}");
                let values: Vec<&str> = refusal
                    .fix
                    .split("--size ")
                    .skip(1)
                    .filter_map(|v| v.split_whitespace().next())
                    .collect();
                assert!(
                    !values.is_empty()
                        || refusal.fix.starts_with("free ")
                        || refusal.fix.contains("/proc/sys/vm/nr_hugepages"),
                    "no size suggested: {e}"
                );
                // Without an image, the pool is checked before memory: a size no pool here
                // holds is refused for the pool.
                if extra == hugetlb && size == "3000T" {
                    assert!(refusal.problem.contains("from the hugetlb pool"), "{e}");
                }
                for v in values {
                    let mut again = vec!["--size", v];
                    again.extend(&extra);
                    if let Err(e2) = validate(&demo_args(&again)) {
                        panic!("--size {size} suggested --size {v}, which is refused: {e2}");
                    }
                    suggested += 1;
                }
            }
        }
        assert!(suggested > 0, "no suggestion was fed back");
    }

    fn progress(phase: precopy_migrate::Phase, pending_bytes: u64) -> precopy_migrate::Progress {
        precopy_migrate::Progress {
            phase,
            round: 0,
            pending_bytes,
            throughput: 0.0,
            dirty_rate: 0.0,
            throttle: 0.0,
            expected_downtime: None,
            elapsed: Duration::ZERO,
            memory_bytes: 256 << 20,
        }
    }

    #[test]
    fn throttle_none_lets_the_driver_throttle_no_more_than_no_throttle_does() {
        assert!(!throttle_allowed(false, ThrottleKind::None));
        assert!(!throttle_allowed(true, ThrottleKind::Auto));
        for kind in [ThrottleKind::Auto, ThrottleKind::Cgroup, ThrottleKind::Duty] {
            assert!(throttle_allowed(false, kind));
        }
    }

    #[test]
    fn a_round_that_has_queued_nothing_yet_says_what_it_will_send() {
        let p = progress(precopy_migrate::Phase::Full, 256 << 20);
        let m = round_message(&p, 0, Duration::ZERO, SourceNow::Running);
        assert_eq!(m, "round 0 (all memory): 256.0 MiB to send");
        let m = round_message(&p, 64 << 20, Duration::from_secs(1), SourceNow::Running);
        assert_eq!(
            m,
            "round 0 (all memory): queued 64.0 MiB of 256.0 MiB to send (25%) at 64.0 MiB/s"
        );
    }

    #[test]
    fn the_final_round_says_paused_only_while_the_source_is_paused() {
        let mut p = progress(precopy_migrate::Phase::Final, 1 << 20);
        p.round = 7;
        let m = round_message(&p, 0, Duration::ZERO, SourceNow::Running);
        assert!(m.starts_with("final round 7 (pausing the source): "), "{m}");
        let m = round_message(&p, 0, Duration::ZERO, SourceNow::Paused);
        assert!(m.starts_with("final round 7 (source paused): "), "{m}");
        let m = round_message(&p, 1 << 19, Duration::from_secs(1), SourceNow::Resumed);
        assert_eq!(
            m,
            "final round 7 did not complete: the source was resumed and runs"
        );
    }
}
