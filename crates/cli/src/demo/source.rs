//! `precopy __demo-source`: the process being migrated. It creates a userfaultfd (the driver
//! copies it out with `pidfd_getfd` and tracks this process's memory with it), maps and fills the
//! region, announces `READY <pid> <addr> <len> <uffd fd> <counters addr> <state addr> <state len>`
//! on stdout and keeps writing until its stdin closes. The writers count their page writes and
//! the time spent in them at `<counters addr>` (two u64s), which the driver reads for the report,
//! and each keeps its last write at `<state addr>` ([`writer::LastWrite`], one per writer), which
//! the driver sends as the state blob.

use super::writer::{self, Pattern, WriterConfig};
use anyhow::{Context, Result};
use precopy_sys::mem::{Backing, Mapping, Thp};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct SourceArgs {
    /// Bytes of memory.
    #[arg(long)]
    size: u64,
    /// Bytes written per second, all threads together.
    #[arg(long)]
    dirty_rate: u64,
    #[arg(long, value_enum)]
    pattern: Pattern,
    #[arg(long)]
    threads: u64,
    /// Bytes in the hot set.
    #[arg(long)]
    hot_set: u64,
    /// What backs the memory.
    #[arg(long, value_enum, default_value_t = MemoryBacking::Private)]
    memory: MemoryBacking,
    /// The demo that started this source: when it dies (even by `SIGKILL`, while this source
    /// is stopped for the final round), the kernel kills this source too
    /// (`PR_SET_PDEATHSIG`), so no stopped source outlives it.
    #[arg(long)]
    parent: Option<i32>,
}

/// What backs the demo source's memory (`precopy demo --memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryBacking {
    /// Private anonymous memory: every change goes through the page tables.
    Private,
    /// A memfd mapped shared (what VMMs use for vhost-user): re-checked at switch-over.
    Memfd,
    /// hugetlb (`MAP_HUGETLB`, 2 MiB pages; needs a pool in /proc/sys/vm/nr_hugepages).
    Hugetlb,
}

impl MemoryBacking {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MemoryBacking::Private => "private",
            MemoryBacking::Memfd => "memfd",
            MemoryBacking::Hugetlb => "hugetlb",
        }
    }
}

const PAGE: u64 = 4096;

/// Asks the kernel to kill this process (the demo's `what`) when its parent dies
/// (`PR_SET_PDEATHSIG`), and fails if the demo `parent` is already gone: a demo killed with
/// `SIGKILL` leaves neither a stopped source nor a destination holding its memory.
pub fn die_with(parent: i32, what: &str) -> Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("asking to be killed with the demo (PR_SET_PDEATHSIG)")?;
    // The demo may have died before that: then nothing would kill this process. (Under `ip
    // netns exec` the parent may be `ip`; the demo must then still exist.)
    let alive = nix::unistd::getppid().as_raw() == parent
        || nix::sys::signal::kill(nix::unistd::Pid::from_raw(parent), None).is_ok();
    anyhow::ensure!(
        alive,
        "the demo (process {parent}) that started this {what} is gone"
    );
    Ok(())
}

pub fn run(args: SourceArgs) -> Result<ExitCode> {
    if let Some(parent) = args.parent {
        die_with(parent, "source")?;
    }
    let uffd = precopy_sys::uffd::create().context("creating a userfaultfd")?;
    let backing = match args.memory {
        MemoryBacking::Private => Backing::AnonPrivate,
        MemoryBacking::Memfd => Backing::Memfd,
        MemoryBacking::Hugetlb => Backing::Hugetlb,
    };
    let mem = Mapping::new(backing, args.size, 2 << 20, Thp::Default).with_context(|| {
        match args.memory {
            MemoryBacking::Hugetlb => format!(
                "mapping {} MiB of hugetlb memory (the pool needs {} free 2 MiB pages: see /proc/sys/vm/nr_hugepages)",
                args.size >> 20,
                args.size >> 21
            ),
            _ => "mapping the source region".to_string(),
        }
    })?;
    let pages = args.size / PAGE;
    // Every page gets distinct contents, except every 16th, left untouched (reads as zero).
    for p in (0..pages).filter(|p| p % 16 != 15) {
        mem.write_u64(p * PAGE, p ^ 0x5a5a_0000_0000_0000)?;
    }
    let mem = Arc::new(mem);
    let counters = Arc::new(writer::Counters::default());
    let threads = args.threads.max(1);
    anyhow::ensure!(
        threads <= writer::MAX_THREADS,
        "at most {} writer threads",
        writer::MAX_THREADS
    );
    let last: Arc<[writer::LastWrite]> = (0..threads).map(|_| Default::default()).collect();
    let pps = args.dirty_rate as f64 / PAGE as f64 / threads as f64;
    for index in 0..threads {
        let cfg = WriterConfig {
            pages,
            pages_per_sec: pps,
            pattern: args.pattern,
            hot_pages: (args.hot_set / PAGE).clamp(1, pages),
            index,
            threads,
        };
        let (mem, counters, last) = (mem.clone(), counters.clone(), last.clone());
        std::thread::Builder::new()
            .name(format!("writer-{index}"))
            .spawn(move || writer::run(mem, cfg, &counters, &last[index as usize]))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "READY {} {} {} {} {} {} {}",
        std::process::id(),
        mem.addr(),
        mem.len(),
        uffd.as_raw_fd(),
        Arc::as_ptr(&counters) as u64,
        last.as_ptr() as u64,
        last.len() * writer::LAST_WRITE_BYTES
    )?;
    out.flush()?;
    drop(out);
    // Run until the driver closes our stdin (or dies).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(uffd);
    Ok(ExitCode::SUCCESS)
}
