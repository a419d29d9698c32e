//! Which memory of another process can be tracked, from its `/proc/PID/maps` (parsed with
//! `procfs`).
//!
//! # Tracked
//! Every **writable** mapping whose contents live only in memory or whose written pages are
//! private copies:
//! - private anonymous memory: the heap, the main stack, thread stacks, `malloc` arenas, `mmap`
//!   buffers ([`MappingKind::Heap`], [`MappingKind::Stack`], [`MappingKind::Anonymous`]);
//! - writable private file mappings (a program's `.data`, copy-on-write file maps): written
//!   pages are private anonymous copies ([`MappingKind::PrivateFile`]);
//! - writable shared anonymous memory, memfd and System V shared memory
//!   ([`MappingKind::Shared`]). Writes made through *another* mapping of the same memory (another
//!   process, a second `mmap` of the memfd) do not pass through the tracked page tables and are
//!   not seen: see the project's notes on shared memory.
//!
//! # Not tracked, and why
//! - **read-only and inaccessible mappings** (program text, `PROT_NONE` guard pages and
//!   reservations): the target cannot write them through this mapping. If it later makes one
//!   writable, it shows up as a new mapping.
//! - **shared file mappings** (`MAP_SHARED` of a regular file): the file is the truth, and it
//!   changes through `write(2)` and other processes' mappings, which no page table of this
//!   process sees; copy the file instead.
//! - **device mappings** (`/dev/...`: GPU memory, DMA buffers, `/dev/mem`): device memory is not
//!   write-protectable and may change without any CPU write.
//! - **kernel-provided mappings** (`[vdso]`, `[vvar]`, `[vsyscall]`, `[uprobes]`): the kernel's,
//!   recreated on restore.

use std::ops::Range;

use procfs::process::{MMPermissions, MMapPath};

/// What backs a tracked mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingKind {
    /// `[heap]` (the `brk` area).
    Heap,
    /// The main thread's stack.
    Stack,
    /// Other private anonymous memory (thread stacks, arenas, `mmap` buffers).
    Anonymous,
    /// A writable private file mapping (a program's `.data`).
    PrivateFile,
    /// Shared anonymous memory, memfd or System V shared memory.
    Shared,
}

impl MappingKind {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            MappingKind::Heap => "heap",
            MappingKind::Stack => "stack",
            MappingKind::Anonymous => "anonymous",
            MappingKind::PrivateFile => "private-file",
            MappingKind::Shared => "shared",
        }
    }
}

/// Why a mapping is not tracked (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not writable.
    NotWritable,
    /// A shared mapping of a regular file.
    SharedFile,
    /// A device mapping.
    Device,
    /// A kernel-provided mapping.
    Kernel,
}

impl SkipReason {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::NotWritable => "not-writable",
            SkipReason::SharedFile => "shared-file",
            SkipReason::Device => "device",
            SkipReason::Kernel => "kernel",
        }
    }
}

/// One mapping of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetMapping {
    /// Its addresses.
    pub range: Range<u64>,
    /// The path or pseudo-path in `/proc/PID/maps` (empty for anonymous memory).
    pub name: String,
    /// Whether and why it is (not) tracked.
    pub class: Result<MappingKind, SkipReason>,
}

fn name_of(p: &MMapPath) -> String {
    match p {
        MMapPath::Path(p) => p.display().to_string(),
        MMapPath::Heap => "[heap]".into(),
        MMapPath::Stack => "[stack]".into(),
        MMapPath::TStack(t) => format!("[stack:{t}]"),
        MMapPath::Vdso => "[vdso]".into(),
        MMapPath::Vvar => "[vvar]".into(),
        MMapPath::Vsyscall => "[vsyscall]".into(),
        MMapPath::Rollup => "[rollup]".into(),
        MMapPath::Anonymous => String::new(),
        MMapPath::Vsys(key) => format!("/SYSV{key:08x}"),
        MMapPath::Other(o) => format!("[{o}]"),
    }
}

fn classify(m: &procfs::process::MemoryMap) -> Result<MappingKind, SkipReason> {
    let shared = m.perms.contains(MMPermissions::SHARED);
    let anon_or_shared = if shared {
        MappingKind::Shared
    } else {
        MappingKind::Anonymous
    };
    // Named anonymous memory (`prctl(PR_SET_VMA_ANON_NAME)`) reads `[anon:NAME]`.
    let named_anon = matches!(&m.pathname, MMapPath::Other(o)
        if o.starts_with("anon:") || o.starts_with("anon_shmem:"));
    match &m.pathname {
        MMapPath::Vdso | MMapPath::Vvar | MMapPath::Vsyscall | MMapPath::Rollup => {
            return Err(SkipReason::Kernel);
        }
        MMapPath::Other(_) if !named_anon => return Err(SkipReason::Kernel),
        _ => {}
    }
    if !m.perms.contains(MMPermissions::WRITE) {
        return Err(SkipReason::NotWritable);
    }
    match &m.pathname {
        MMapPath::Heap => Ok(MappingKind::Heap),
        MMapPath::Stack => Ok(MappingKind::Stack),
        MMapPath::TStack(_) | MMapPath::Anonymous | MMapPath::Other(_) | MMapPath::Vsys(_) => {
            Ok(anon_or_shared)
        }
        MMapPath::Path(p) => {
            let s = p.to_string_lossy();
            // Memory that only looks like a file: memfd, a shared mapping of /dev/zero, System
            // V segments, MAP_HUGETLB memory.
            if ["/memfd:", "/dev/zero", "/SYSV", "/anon_hugepage"]
                .iter()
                .any(|p| s.starts_with(p))
            {
                Ok(anon_or_shared)
            } else if s.starts_with("/dev/") {
                Err(SkipReason::Device)
            } else if shared {
                Err(SkipReason::SharedFile)
            } else {
                Ok(MappingKind::PrivateFile)
            }
        }
        _ => Err(SkipReason::Kernel),
    }
}

/// Every mapping of process `pid`, sorted by address, each classified as tracked or not.
pub fn target_mappings(pid: i32) -> std::io::Result<Vec<TargetMapping>> {
    let to_io = |e: procfs::ProcError| match e {
        procfs::ProcError::NotFound(_) => std::io::Error::from_raw_os_error(libc::ESRCH),
        procfs::ProcError::Io(e, _) => e,
        e => std::io::Error::other(e.to_string()),
    };
    let maps = procfs::process::Process::new(pid)
        .and_then(|p| p.maps())
        .map_err(to_io)?;
    let mut out: Vec<TargetMapping> = maps
        .iter()
        .map(|m| TargetMapping {
            range: m.address.0..m.address.1,
            name: name_of(&m.pathname),
            class: classify(m),
        })
        .collect();
    out.sort_by_key(|m| m.range.start);
    Ok(out)
}

/// The tracked mappings of `maps` as sorted, coalesced address ranges (adjacent tracked
/// mappings merged: how the address space is split into VMAs does not matter to tracking).
pub fn tracked_coverage(maps: &[TargetMapping]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for m in maps.iter().filter(|m| m.class.is_ok()) {
        match out.last_mut() {
            Some(last) if last.end == m.range.start => last.end = m.range.end,
            _ => out.push(m.range.clone()),
        }
    }
    out
}
