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
mod writer;

pub use dest::{DestArgs, run as run_dest};
pub use source::{SourceArgs, run as run_source};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use precopy_migrate::{
    AfterMigration, LimitPolicy, Migration, MigrationConfig, MigrationReport, PauseMethod,
    ProcessControl, Progress, ThrottleMethod, TransferTransport, UffdDirtyLog, adopt_process_uffd,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::Tracker;
use precopy_transfer::{
    Compression, Connection, FinalCheck, Key, Layout, PageSource, ProcessMemory, Sender,
    SenderConfig,
};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::time::Duration;
use writer::Pattern;

/// A size or rate: a number with an optional K/M/G/T suffix, binary (`2G` = 2 GiB, like `2GiB`);
/// `KB`/`MB`/`GB` are decimal.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    // A bare one-letter suffix means the binary unit: "2G" is read as "2Gi".
    let binary = match s.chars().last() {
        Some(c) if "kKmMgGtT".contains(c) => format!("{s}i"),
        _ => s.to_string(),
    };
    binary
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 512K, 100M or 2G: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum TransportKind {
    Tcp,
    Unix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum CompressKind {
    None,
    Lz4,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum CheckKind {
    /// Compare the page CRCs both ends recorded while sending and applying.
    Recorded,
    /// Also re-read all source and destination memory while paused.
    Full,
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
    /// Memory of the source process (K/M/G suffixes are binary: 2G = 2 GiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Bytes the source writes per second, all threads together (0: idle).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    dirty_rate: u64,
    /// Which pages the source writes.
    #[arg(long, value_enum, default_value_t = Pattern::HotSet)]
    pattern: Pattern,
    /// Size of the hot set for `--pattern hot-set` (default: 1/16 of memory).
    #[arg(long, value_parser = parse_size)]
    hot_set: Option<u64>,
    /// Writer threads in the source.
    #[arg(long, default_value_t = 2)]
    threads: u64,
    /// Switch over when the rest would take at most this many milliseconds.
    #[arg(long, default_value_t = 50)]
    max_downtime: u64,
    /// Cap on bytes per second sent (default: unlimited).
    #[arg(long, value_parser = parse_size)]
    bandwidth: Option<u64>,
    /// Socket between source and destination.
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
    transport: TransportKind,
    /// Parallel connections.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Compression of page frames.
    #[arg(long, value_enum, default_value_t = CompressKind::None)]
    compress: CompressKind,
    /// Final checksum while the source is paused: `recorded` compares the
    /// page CRCs both ends kept (no pass over memory); `full` also re-reads
    /// all memory on both ends (catches a missed write, costs downtime). The
    /// demo compares the memories byte for byte afterwards either way.
    #[arg(long, value_enum, default_value_t = CheckKind::Recorded)]
    final_check: CheckKind,
    /// Most rounds sent while the source runs.
    #[arg(long, default_value_t = 30)]
    max_rounds: u64,
    /// What to do when the round limit is reached.
    #[arg(long, value_enum, default_value_t = Policy::SwitchOver)]
    on_max_rounds: Policy,
    /// Limit on the iteration, in seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// What to do when the timeout passes.
    #[arg(long, value_enum, default_value_t = Policy::Abort)]
    on_timeout: Policy,
    /// Never throttle the source.
    #[arg(long)]
    no_throttle: bool,
    /// How to throttle the source.
    #[arg(long, value_enum, default_value_t = ThrottleKind::Auto)]
    throttle: ThrottleKind,
    /// How to pause the source for the final round.
    #[arg(long, value_enum, default_value_t = PauseKind::Signal)]
    pause: PauseKind,
    /// TCP address the destination listens on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Run the destination in this network namespace (see scripts/netns-demo.sh).
    #[arg(long)]
    dest_netns: Option<String>,
    /// Print the final report as one JSON object on stdout, and no progress.
    #[arg(long)]
    json: bool,
    /// Test hook: kill the destination when this round is about to be sent.
    #[arg(long, hide = true)]
    kill_dest_at_round: Option<u64>,
}

const PAGE: u64 = 4096;

/// A child process with line-oriented stdout, killed on drop unless it was waited for.
struct Proc {
    name: &'static str,
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name} process"))?;
        let out = BufReader::new(child.stdout.take().context("child stdout")?);
        Ok(Proc { name, child, out })
    }

    /// The next line, which must start with `tag`; its other words.
    fn expect(&mut self, tag: &str) -> Result<Vec<String>> {
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let mut words = line.split_whitespace().map(str::to_string);
        match words.next() {
            Some(t) if t == tag => Ok(words.collect()),
            Some(t) if t == "FAILED" => bail!(
                "{} process failed: {}",
                self.name,
                line.trim_start_matches("FAILED").trim()
            ),
            _ => bail!("{} process exited before saying {tag}", self.name),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Closes its stdin (its signal to exit) and waits.
    fn finish(mut self) -> Result<std::process::ExitStatus> {
        drop(self.child.stdin.take());
        Ok(self.child.wait()?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn num<T: std::str::FromStr>(words: &[String], i: usize) -> Result<T> {
    words
        .get(i)
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("bad announcement {words:?}"))
}

/// What the destination received, from its RECEIVED line.
#[derive(Debug, serde::Serialize)]
struct Received {
    #[serde(skip)]
    addr: u64,
    #[serde(skip)]
    len: u64,
    checksum: u32,
    rounds: u64,
    pages: u64,
    zero_pages: u64,
    bytes: u64,
}

#[derive(Debug, serde::Serialize)]
struct Verification {
    verified: bool,
    compared_bytes: u64,
    mismatched_pages: u64,
    first_mismatch: Option<u64>,
}

/// Compares source memory (stopped) with the destination's, in chunks.
fn verify(src_pid: i32, src: u64, dst_pid: i32, dst: u64, len: u64) -> Result<Verification> {
    const CHUNK: u64 = 8 << 20;
    let mut a = ProcessMemory::new(src_pid);
    let mut b = ProcessMemory::new(dst_pid);
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut v = Verification {
        verified: false,
        compared_bytes: 0,
        mismatched_pages: 0,
        first_mismatch: None,
    };
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK);
        let (x, y) = (&mut ba[..n as usize], &mut bb[..n as usize]);
        a.read_ranges(&[src + off..src + off + n], x)
            .context("reading the source's memory")?;
        b.read_ranges(&[dst + off..dst + off + n], y)
            .context("reading the destination's memory")?;
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
    }
    v.verified = v.mismatched_pages == 0 && v.compared_bytes == len;
    Ok(v)
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

fn progress_message(p: &Progress) -> String {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    format!(
        "{:?} round {:>3}  pending {:>9.1} MiB  throughput {:>7.0} MiB/s  dirty {:>7.0} MiB/s  throttle {:>3.0}%",
        p.phase,
        p.round,
        mib(p.pending_bytes as f64),
        mib(p.throughput),
        mib(p.dirty_rate),
        p.throttle * 100.0
    )
}

fn policy(p: Policy) -> LimitPolicy {
    match p {
        Policy::SwitchOver => LimitPolicy::SwitchOver,
        Policy::Abort => LimitPolicy::Abort,
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.size == 0 || args.size % (2 << 20) != 0 {
        bail!("--size must be a positive multiple of 2 MiB");
    }
    if args.streams == 0 {
        bail!("--streams must be at least 1");
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let sock_path = PathBuf::from(format!("/tmp/precopy-demo-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock_path);
    let listen = match args.transport {
        TransportKind::Tcp => format!("tcp:{}", args.listen),
        TransportKind::Unix => format!("unix:{}", sock_path.display()),
    };
    // Anything but loopback needs a shared key; the destination gets it in its environment.
    let loopback = args.transport == TransportKind::Unix
        || args
            .listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
    let key = (!loopback).then(|| {
        (0..32)
            .map(|_| format!("{:x}", rand::random::<u8>() & 0xf))
            .collect::<String>()
    });

    // Destination first: it must listen before anyone connects.
    let mut cmd = match &args.dest_netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["__demo-dest", "--listen", &listen]);
    if let Some(k) = &key {
        cmd.env(dest::KEY_ENV, k);
    }
    let mut dest = Proc::spawn("destination", cmd)?;
    let words = dest.expect("LISTENING")?;
    let dest_addr = words.first().context("no listening address")?.clone();

    let hot_set = args.hot_set.unwrap_or(args.size / 16);
    let mut cmd = Command::new(&exe);
    cmd.arg("__demo-source")
        .args(["--size", &args.size.to_string()])
        .args(["--dirty-rate", &args.dirty_rate.to_string()])
        .args(["--pattern", pattern_name(args.pattern)])
        .args(["--threads", &args.threads.to_string()])
        .args(["--hot-set", &hot_set.to_string()]);
    let mut source = Proc::spawn("source", cmd)?;
    let words = source.expect("READY")?;
    let (pid, addr, len, fd): (i32, u64, u64, i32) = (
        num(&words, 0)?,
        num(&words, 1)?,
        num(&words, 2)?,
        num(&words, 3)?,
    );
    if pid != source.pid() {
        bail!("source announced pid {pid}, started {}", source.pid());
    }

    // Track the source's memory from here.
    let uffd = adopt_process_uffd(pid, fd)?;
    let mut tracker = Tracker::new(uffd);
    tracker
        .register(addr..addr + len)
        .context("registering the source's memory")?;
    let scanner = Scanner::new(ScanOptions::default()).context("starting the scanner")?;

    let mut conns = Vec::with_capacity(args.streams);
    for _ in 0..args.streams {
        conns.push(
            match args.transport {
                TransportKind::Tcp => Connection::connect_tcp(dest_addr.as_str()),
                TransportKind::Unix => Connection::connect_unix(&sock_path),
            }
            .with_context(|| format!("connecting to {dest_addr}"))?,
        );
    }
    let sender_config = SenderConfig {
        compression: match args.compress {
            CompressKind::None => Compression::None,
            CompressKind::Lz4 => Compression::Lz4,
            CompressKind::Zstd => Compression::Zstd(1),
        },
        streams: args.streams,
        bandwidth_limit: args.bandwidth,
        key: key.map(|k| Key::from_bytes(k.into_bytes())).transpose()?,
        ..SenderConfig::default()
    };
    let layout = Layout::single(PAGE, addr, len)?;
    let sender = Sender::connect(conns, layout, ProcessMemory::new(pid), &sender_config)
        .context("connecting the sender")?;

    let control = ProcessControl::new(
        pid,
        match args.pause {
            PauseKind::Signal => PauseMethod::Signal,
            PauseKind::Freezer => PauseMethod::Freezer,
        },
        match args.throttle {
            ThrottleKind::Auto => ThrottleMethod::Auto,
            ThrottleKind::Cgroup => ThrottleMethod::CgroupCpu,
            ThrottleKind::Duty => ThrottleMethod::DutyCycle,
            ThrottleKind::None => ThrottleMethod::None,
        },
    )?;
    let mut config = MigrationConfig {
        max_downtime: Duration::from_millis(args.max_downtime),
        max_rounds: args.max_rounds,
        max_rounds_policy: policy(args.on_max_rounds),
        timeout: args.timeout.map(Duration::from_secs_f64),
        timeout_policy: policy(args.on_timeout),
        after: AfterMigration::Stop,
        ..MigrationConfig::default()
    };
    config.throttle.enabled = !args.no_throttle;

    let bar = progress_bar(args.json);
    let bar2 = bar.clone();
    let dest_pid = dest.pid();
    let kill_at = args.kill_dest_at_round;
    let mut migration = Migration::new(
        UffdDirtyLog::new(tracker, scanner),
        TransferTransport::new(sender).final_check(match args.final_check {
            CheckKind::Recorded => FinalCheck::Recorded,
            CheckKind::Full => FinalCheck::Full,
        }),
        control,
        config,
    )
    .on_progress(move |p| {
        bar2.set_message(progress_message(p));
        if kill_at.is_some_and(|r| p.round >= r) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(dest_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let result = migration.run();
    bar.finish_and_clear();
    let report = migration.report().clone();

    // The source is still stopped after success: compare the two memories now.
    let (received, verification) = match &result {
        Ok(_) => {
            let w = dest.expect("RECEIVED")?;
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
            let v = verify(pid, addr, dest.pid(), r.addr, len)?;
            (Some(r), Some(v))
        }
        Err(_) => (None, None),
    };
    drop(migration);
    drop(source);
    let _ = dest.finish();
    let _ = std::fs::remove_file(&sock_path);

    let verified = verification.as_ref().is_some_and(|v| v.verified);
    print_outcome(
        &args,
        &report,
        result.as_ref().err(),
        received.as_ref(),
        verification.as_ref(),
    )?;
    Ok(if verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn pattern_name(p: Pattern) -> &'static str {
    match p {
        Pattern::Uniform => "uniform",
        Pattern::HotSet => "hot-set",
        Pattern::Sequential => "sequential",
    }
}

fn print_outcome(
    args: &Args,
    report: &MigrationReport,
    error: Option<&precopy_migrate::Error>,
    received: Option<&Received>,
    verification: Option<&Verification>,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "verified": verification.is_some_and(|v| v.verified),
            "settings": {
                "size": args.size,
                "dirty_rate": args.dirty_rate,
                "pattern": args.pattern,
                "threads": args.threads,
                "max_downtime_ms": args.max_downtime,
                "bandwidth": args.bandwidth,
                "transport": args.transport,
                "streams": args.streams,
                "compress": args.compress,
                "final_check": args.final_check,
                "dest_netns": args.dest_netns,
            },
            "migration": report,
            "destination": received,
            "verification": verification,
            "error": error.map(|e| precopy_sys::error_chain(e)),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "precopy demo: {} over {:?} ({} stream(s), {:?}), {} writer(s) {:?} at {}/s, max downtime {} ms, {:?} final check",
        human(args.size),
        args.transport,
        args.streams,
        args.compress,
        args.threads,
        args.pattern,
        human(args.dirty_rate),
        args.max_downtime,
        args.final_check
    )?;
    writeln!(out)?;
    write!(out, "{report}")?;
    writeln!(out)?;
    if let Some(e) = error {
        writeln!(out, "migration FAILED: {}", precopy_sys::error_chain(e))?;
        writeln!(
            out,
            "(the source was resumed; the destination never reported success)"
        )?;
    }
    match verification {
        Some(v) if v.verified => writeln!(
            out,
            "verified: destination memory equals the source's frozen memory byte for byte ({})",
            human(v.compared_bytes)
        )?,
        Some(v) => writeln!(
            out,
            "NOT verified: {} page(s) differ, first at offset {:#x?}",
            v.mismatched_pages, v.first_mismatch
        )?,
        None => writeln!(out, "not verified: the migration did not complete")?,
    }
    Ok(())
}

fn human(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn suffixes_are_binary() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("fast").is_err());
    }
}
