//! Values the command line takes and the one shape of a refused value.
//!
//! Every flag is checked before anything starts. A refusal is one line that names the flag, the
//! value as typed, the limit and what to type instead ([`Invalid`]); `main` exits with status 2
//! for it, as for any other usage error.

use std::fmt;
use std::path::{Path, PathBuf};

/// A size or rate as typed: a number with an optional unit. `K`/`M`/`G`/`T` and
/// `KiB`/`MiB`/`GiB`/`TiB` are binary (`2G` = 2 GiB); `KB`/`MB`/`GB`/`TB` are decimal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Size {
    /// Bytes.
    pub bytes: u64,
    /// What the user typed.
    pub typed: String,
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.typed)
    }
}

/// Parses a [`Size`]. Negative and fractional byte counts are refused with the reason.
pub fn parse_size(s: &str) -> Result<Size, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err("a size cannot be negative (e.g. 512K, 100M, 2G)".into());
    }
    // A bare one-letter suffix means the binary unit: "2G" is read as "2Gi".
    let binary = match t.chars().last() {
        Some(c) if "kKmMgGtT".contains(c) => format!("{t}i"),
        _ => t.to_string(),
    };
    let too_large = || "too large: a size is at most 16 EiB (e.g. 512K, 100M, 2G)".to_string();
    let b = binary.parse::<bytesize::ByteSize>().map_err(|_| {
        // A whole number of bytes past what 64 bits hold fails to parse where a number with a
        // unit saturates (below): both are too large, not malformed.
        let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == ' ');
        if digits
            .parse::<u64>()
            .is_err_and(|e| *e.kind() == std::num::IntErrorKind::PosOverflow)
        {
            return too_large();
        }
        "not a size: use a number with K, M, G or T (binary: 2G = 2 GiB), e.g. 512K, 100M, 2G"
            .to_string()
    })?;
    // The parser saturates: a number past what 64 bits hold reads as u64::MAX.
    if b.as_u64() == u64::MAX {
        return Err(too_large());
    }
    Ok(Size {
        bytes: b.as_u64(),
        typed: t.to_string(),
    })
}

/// A whole number as typed; a minus sign gets its own message instead of clap's
/// "unexpected argument". A flag with a range of its own takes [`count_in`], which states it.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err("cannot be negative: use a whole number (e.g. 1, 2, 30)".into());
    }
    t.parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            std::num::IntErrorKind::PosOverflow => format!("too large: at most {}", u64::MAX),
            _ => "not a whole number (e.g. 1, 2, 30)".to_string(),
        })
}

/// A whole number for a flag whose values run from `min` to `max`: a clap value parser whose
/// refusal of a negative or malformed value states that range. Values outside it are left to
/// the flag's own check, which says why the limit is there.
pub fn count_in(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s| {
        let t = s.trim();
        if t.starts_with('-') {
            return Err(format!(
                "cannot be negative: use a whole number from {min} to {max}"
            ));
        }
        t.parse()
            .map_err(|e: std::num::ParseIntError| match e.kind() {
                std::num::IntErrorKind::PosOverflow => {
                    format!("too large: use a whole number from {min} to {max}")
                }
                _ => format!("not a whole number: use one from {min} to {max}"),
            })
    }
}

/// A whole number of at most `max`, as typed: a clap value parser (`--flag N`).
pub fn count_at_most(max: u64) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s| {
        let n = parse_count(s)?;
        if n > max {
            return Err(format!("at most {max}: use a whole number from 0 to {max}"));
        }
        Ok(n)
    }
}

/// A process ID as typed: a positive whole number no larger than the kernel's `pid_max`.
pub fn parse_pid(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(
            "a process ID is positive (a negative number names a process group, which is not \
             accepted here); e.g. --pid $(pidof NAME)"
                .into(),
        );
    }
    let n: u64 = t
        .parse()
        .map_err(|_| "not a process ID (a whole number, e.g. --pid 1234)".to_string())?;
    let max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1 << 22);
    if n == 0 || n >= max {
        return Err(format!(
            "process IDs run from 1 to {} on this machine (kernel.pid_max)",
            max - 1
        ));
    }
    Ok(n as i32)
}

/// Refuses a `--pid` known bad before anything starts: this `precopy` process itself (a
/// process cannot attach to itself, and its memory is not what the user means to copy), and
/// what attaching would refuse at once (`precopy_tracker::check_attachable`): an ID no process
/// has, a thread's ID, a kernel thread, a process that has exited (a zombie), a process whose
/// memory another process shares (its pause could not stop that one's writes). A target that
/// exits after this check fails the command when it is found gone (status 1).
pub fn check_target(pid: i32) -> anyhow::Result<()> {
    use precopy_tracker::AttachError;
    let me = std::process::id() as i32;
    let tgid = procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .map_or(pid, |s| s.tgid);
    if pid == me || tgid == me {
        return Err(invalid(
            "--pid",
            pid,
            "is this precopy process itself, which cannot attach to itself",
            "give the ID of the program to copy, e.g. --pid $(pidof NAME)",
        ));
    }
    let running = "give the ID of a running program's process, e.g. --pid $(pidof NAME)";
    match precopy_tracker::check_attachable(pid) {
        Err(AttachError::NotProcessId { tgid, .. }) => Err(invalid(
            "--pid",
            pid,
            format!("is a thread of process {tgid}, not a process ID"),
            format!("use --pid {tgid} (a process is copied with all its threads)"),
        )),
        Err(
            e @ (AttachError::NoSuchProcess { .. }
            | AttachError::KernelThread { .. }
            | AttachError::Zombie { .. }),
        ) => Err(invalid("--pid", pid, e.to_string(), running)),
        Err(e @ AttachError::SharedMemory { .. }) => Err(invalid(
            "--pid",
            pid,
            e.to_string(),
            "give the ID of a process whose memory is its own (a vfork child's is its own once it has called exec)",
        )),
        // Anything else (a process this user may not read) is for attaching to report.
        _ => Ok(()),
    }
}

/// Longest `--max-downtime`, one hour in milliseconds.
pub const MAX_DOWNTIME_MS: u64 = 3_600_000;
/// Most `--max-rounds`.
pub const MAX_ROUNDS: u64 = 1_000_000;

/// `--max-downtime MS`, as `demo` and `send` take it: 1 ms to one hour.
pub fn check_max_downtime(ms: u64) -> anyhow::Result<()> {
    if ms == 0 {
        return Err(invalid(
            "--max-downtime",
            ms,
            "no final round takes 0 ms, so the migration could never switch over on its own",
            "use at least 1 (milliseconds; QEMU's default is 300)",
        ));
    }
    if ms > MAX_DOWNTIME_MS {
        return Err(invalid(
            "--max-downtime",
            ms,
            format!("is more than an hour ({MAX_DOWNTIME_MS} ms): the value is in milliseconds"),
            format!("use at most --max-downtime {MAX_DOWNTIME_MS}"),
        ));
    }
    Ok(())
}

/// `--final-priority`, as `demo` and `send` take it: the scheduling priority of the final
/// phase's threads (see `precopy_migrate::FinalPriority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PriorityKind {
    /// `SCHED_FIFO` 1 where permitted (root or `CAP_SYS_NICE`; the report says when it was
    /// not), restored before the source runs again.
    Realtime,
    /// The threads' own.
    Normal,
}

impl PriorityKind {
    /// The driver's setting.
    pub fn config(self) -> precopy_migrate::FinalPriority {
        match self {
            PriorityKind::Realtime => precopy_migrate::FinalPriority::Realtime(1),
            PriorityKind::Normal => precopy_migrate::FinalPriority::Normal,
        }
    }

    /// The receiver's setting (`recv`): the priority of its threads once the sender marks the
    /// final round.
    pub fn receiver(self) -> Option<u8> {
        match self {
            PriorityKind::Realtime => Some(1),
            PriorityKind::Normal => None,
        }
    }
}

/// `--final-round-timeout MS`, as `demo` and `send` take it: absent (the driver's default
/// bound), or 1 ms to one hour.
pub fn check_final_round_timeout(ms: Option<u64>) -> anyhow::Result<()> {
    match ms {
        Some(0) => Err(invalid(
            "--final-round-timeout",
            0,
            "no final round finishes in 0 ms: it bounds the final round, from the pause to the \
             acknowledgement",
            "use at least 1 (milliseconds), or leave it out for the default bound",
        )),
        Some(ms) if ms > MAX_DOWNTIME_MS => Err(invalid(
            "--final-round-timeout",
            ms,
            format!("is more than an hour ({MAX_DOWNTIME_MS} ms): the value is in milliseconds"),
            format!("use at most --final-round-timeout {MAX_DOWNTIME_MS}"),
        )),
        _ => Ok(()),
    }
}

/// `--max-rounds N`, as `demo` and `send` take it: 1 to [`MAX_ROUNDS`].
pub fn check_max_rounds(n: u64) -> anyhow::Result<()> {
    if n == 0 {
        return Err(invalid(
            "--max-rounds",
            n,
            "round 0, which sends all memory while the source runs, counts: at least 1",
            "use --max-rounds 1 to switch over right after round 0",
        ));
    }
    if n > MAX_ROUNDS {
        return Err(invalid(
            "--max-rounds",
            n,
            format!(
                "is more than {MAX_ROUNDS}: a migration that has not converged by then will not"
            ),
            format!("use at most --max-rounds {MAX_ROUNDS}"),
        ));
    }
    Ok(())
}

/// Smallest KVM guest RAM (`demo --vm --size`, `bench --kvm --sizes`): the first 1 MiB holds
/// the guest's code and parameters.
pub const MIN_GUEST_RAM: u64 = 2 << 20;
/// Largest KVM guest RAM: the guest is 32-bit without paging.
pub const MAX_GUEST_RAM: u64 = 4 << 30;

/// `flag`'s value `size` as a KVM guest's RAM: 2 MiB to 4 GiB in whole 4 KiB pages.
pub fn check_guest_ram(flag: &'static str, size: &Size) -> anyhow::Result<()> {
    let page = 4096;
    if (MIN_GUEST_RAM..=MAX_GUEST_RAM).contains(&size.bytes) && size.bytes.is_multiple_of(page) {
        return Ok(());
    }
    let fix = if size.bytes > MAX_GUEST_RAM {
        format!("use {flag} 4G or less")
    } else if size.bytes < MIN_GUEST_RAM {
        format!("use {flag} 2M or more")
    } else {
        format!("use {flag} {}K (whole pages)", size.bytes / page * 4)
    };
    Err(invalid(
        flag,
        size,
        format!(
            "guest RAM is {} bytes: it must be 2 MiB to 4 GiB (a 32-bit guest without paging) in whole 4 KiB pages",
            size.bytes
        ),
        fix,
    ))
}

/// Refuses `flag`'s value `size` when the `need` bytes it takes (`why`: what holds them, or
/// `None` when it is `size` itself) do not fit the memory this process can still use
/// ([`available_memory`]); `fix` gets the bytes available.
pub fn check_fits_memory(
    flag: &'static str,
    size: &Size,
    need: u64,
    why: Option<&str>,
    fix: impl FnOnce(u64) -> String,
) -> anyhow::Result<()> {
    let Some((avail, what)) = available_memory() else {
        return Ok(());
    };
    if need <= avail {
        return Ok(());
    }
    let problem = match why {
        None => format!("is more than the {} of {what}", human(avail)),
        Some(why) => format!(
            "{why}: {} in all, more than the {} of {what}",
            human(need),
            human(avail)
        ),
    };
    Err(invalid(flag, size, problem, fix(avail)))
}

/// What KVM this host offers, for a report's `kvm` object.
pub fn kvm_host_json(host: &precopy_vmm::KvmHost) -> serde_json::Value {
    serde_json::json!({
        "module": host.module,
        "second_level_paging": host.second_level_paging,
        "nested": host.nested,
        "emulated": host.emulated(),
        "note": host.note(),
    })
}

/// Where `send` and `recv` write or listen, as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `file:PATH`, a checkpoint image.
    File(PathBuf),
}

/// Parses `flag`'s value `s` as a [`Dest`]; `file:` only if `allow_file`, sockets only if
/// `allow_net`.
pub fn parse_dest(
    flag: &'static str,
    s: &str,
    allow_file: bool,
    allow_net: bool,
) -> anyhow::Result<Dest> {
    let d = match s.split_once(':') {
        Some(("tcp", a)) if !a.is_empty() => Dest::Tcp(a.to_string()),
        Some(("unix", p)) if !p.is_empty() => Dest::Unix(PathBuf::from(p)),
        Some(("file", p)) if !p.is_empty() => Dest::File(PathBuf::from(p)),
        _ => {
            let forms = match (allow_file, allow_net) {
                (true, true) => "tcp:HOST:PORT, unix:PATH or file:PATH",
                (true, false) => "file:PATH",
                _ => "tcp:HOST:PORT or unix:PATH",
            };
            return Err(invalid(
                flag,
                s,
                format!("is not {forms}"),
                format!(
                    "e.g. {flag} {}",
                    if allow_net {
                        "tcp:127.0.0.1:7000"
                    } else {
                        "file:/tmp/target.img"
                    }
                ),
            ));
        }
    };
    match d {
        Dest::File(_) if !allow_file => Err(invalid(
            flag,
            s,
            "takes a socket, not a file",
            format!("e.g. {flag} tcp:127.0.0.1:7000 or {flag} unix:/tmp/precopy.sock"),
        )),
        Dest::Tcp(_) | Dest::Unix(_) if !allow_net => Err(invalid(
            flag,
            s,
            "takes file:PATH (the image to write)",
            format!("e.g. {flag} file:/tmp/target.img"),
        )),
        Dest::Tcp(a) if port_of(&a, "tcp:").is_err() => Err(invalid(
            flag,
            s,
            port_of(&a, "tcp:").unwrap_err(),
            format!("e.g. {flag} tcp:127.0.0.1:7000 or {flag} tcp:[::1]:7000"),
        )),
        // Port 0 means "any free port" to a listener only: nothing can be reached there.
        Dest::Tcp(a) if flag != "--listen" && port_of(&a, "tcp:") == Ok(0) => Err(invalid(
            flag,
            s,
            "port 0 is not a destination: it means \"any free port\" only to a listener, and no \
             receiver can be reached there",
            format!(
                "give the port the receiver listens on (`precopy recv` says it), e.g. {flag} \
                 tcp:127.0.0.1:7000"
            ),
        )),
        // The kernel's socket address holds the path and its final NUL in 108 bytes: a longer
        // path could never be bound or reached, whatever the directory.
        Dest::Unix(p) if p.as_os_str().len() > MAX_UNIX_PATH => Err(invalid(
            flag,
            s,
            format!(
                "the socket path is {} bytes, more than the {MAX_UNIX_PATH} a Unix socket \
                 address holds (sun_path: 108 bytes with the final NUL)",
                p.as_os_str().len()
            ),
            format!("use a shorter path, e.g. {flag} unix:/tmp/precopy.sock"),
        )),
        // A host that names no address is the value's fault, like a malformed one: refused
        // here, before anything starts, not as a failure to connect or listen later.
        Dest::Tcp(a) => match std::net::ToSocketAddrs::to_socket_addrs(a.as_str()) {
            Ok(addrs) if addrs.len() > 0 => Ok(Dest::Tcp(a)),
            Ok(_) => Err(unresolved(flag, s, "it names no address".into())),
            Err(e) => Err(unresolved(flag, s, e.to_string())),
        },
        d => Ok(d),
    }
}

/// Longest path of a Unix socket (`sun_path` is 108 bytes, the final NUL included).
const MAX_UNIX_PATH: usize = 107;

/// Checks `send --to unix:PATH` (`flag`'s value `typed`) before anything starts: a directory
/// that does not exist, or a file at `path` that is not a socket (a FIFO, a regular file), can
/// never reach a receiver. A socket file that nobody listens on is left to connecting (a
/// receiver not started yet, like a TCP port that refuses).
pub fn check_socket_destination(
    flag: &'static str,
    typed: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(invalid(
            flag,
            typed,
            format!("{} is not an existing directory", dir.display()),
            format!(
                "give the path a `precopy recv --listen unix:PATH` listens on, e.g. {flag} unix:/tmp/precopy.sock"
            ),
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => Err(invalid(
            flag,
            typed,
            format!(
                "{} is {}, not a socket: no receiver listens there",
                path.display(),
                precopy_transfer::not_regular(&m).unwrap_or("a regular file")
            ),
            "give the path a `precopy recv --listen unix:PATH` listens on",
        )),
        _ => Ok(()),
    }
}

/// The refusal of `flag`'s `tcp:HOST:PORT` value `typed` whose host does not resolve.
fn unresolved(flag: &'static str, typed: &str, why: String) -> anyhow::Error {
    invalid(
        flag,
        typed,
        format!("the host is neither an IP address nor a name this machine resolves ({why})"),
        format!("give an IP address or a known host name, e.g. {flag} tcp:127.0.0.1:7000"),
    )
}

/// The refusal of `flag`'s value `typed` when binding a socket to it failed with `e` for a
/// reason the value causes (an address of no interface here, a port or path in use, a port
/// or directory this user may not bind, a directory that does not exist), so that it is
/// refused as bad input (exit 2) like a malformed value; `None` for any other failure.
pub fn bind_refusal(flag: &'static str, typed: &str, e: &std::io::Error) -> Option<anyhow::Error> {
    use std::io::ErrorKind;
    let (problem, fix) = match e.kind() {
        ErrorKind::AddrNotAvailable => (
            "is not an address of this machine (no interface has it)",
            "listen on one of its addresses, e.g. 127.0.0.1, or 0.0.0.0 for all of them",
        ),
        ErrorKind::AddrInUse => (
            "is in use: another socket is bound to it",
            "stop that program, or use another port (port 0: any free port)",
        ),
        ErrorKind::PermissionDenied => (
            "may not be bound by this user (ports below 1024 need CAP_NET_BIND_SERVICE; a socket file needs a writable directory)",
            "use a port from 1024 up, or a directory you can write",
        ),
        ErrorKind::NotFound => (
            "names a directory that does not exist",
            "create the directory first, or listen on a path in an existing one",
        ),
        _ => return None,
    };
    Some(invalid(flag, typed, format!("{problem} ({e})"), fix))
}

/// The port of `a`, `HOST:PORT` (what follows `prefix` in the value as typed, e.g. `tcp:`),
/// or what is wrong with it: not that form, or a port number past 65535.
pub fn port_of(a: &str, prefix: &str) -> Result<u16, String> {
    let form = || format!("is not HOST:PORT after {prefix} (a host and a port number 0 to 65535)");
    let (host, port) = a.rsplit_once(':').ok_or_else(form)?;
    if host.is_empty() {
        return Err(form());
    }
    match port.parse::<u64>() {
        Ok(p) => u16::try_from(p)
            .map_err(|_| format!("the port {p} is out of range: ports run from 0 to 65535")),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Err(format!(
            "the port {port} is out of range: ports run from 0 to 65535"
        )),
        Err(_) => Err(form()),
    }
}

/// Checks that an image can be created at `path` (`flag`'s value `typed`) before anything
/// starts: the image writer's own check (`ImageWriter::check_destination`: the directory
/// exists and is writable, on a file system that takes files (not read-only, not `/proc` or
/// `/sys`), the file name fits `NAME_MAX` with the writer's suffixes, the path is not a
/// directory, FIFO or device), reported as a usage
/// error, and, when `need` is known, that the file system has that many bytes free. A file
/// at the path (or its `.partial`) that is neither empty nor a precopy image is refused
/// (`ImageWriter::check_replaceable`) unless `force` is `Some(true)`; `force` is `None` for
/// a command that has no `--force`.
pub fn check_image_path(
    flag: &'static str,
    typed: &str,
    path: &Path,
    need: Option<u64>,
    force: Option<bool>,
) -> anyhow::Result<()> {
    use precopy_transfer::{ImageError, ImageWriter};
    if force != Some(true)
        && let Err(e) = ImageWriter::check_replaceable(path)
    {
        let fix = match force {
            Some(_) => "pass --force to replace it, or write the image elsewhere",
            None => "remove it first, or write the image elsewhere",
        };
        return Err(invalid(flag, typed, e.to_string(), fix));
    }
    if let Err(e) = ImageWriter::check_destination(path) {
        let fix = match &e {
            ImageError::NotAFile {
                kind: "a directory",
                ..
            } => format!(
                "name a file in it, e.g. {flag} file:{}/target.img",
                path.display()
            ),
            ImageError::NoDirectory { .. } => "create it or write the image elsewhere".into(),
            ImageError::NameTooLong { fits, .. } => {
                format!("use a file name of at most {fits} bytes")
            }
            ImageError::FileSystemNotWritable { .. } => format!(
                "write the image on a writable disk file system, e.g. {flag} file:/var/tmp/target.img"
            ),
            _ => "write the image elsewhere".into(),
        };
        return Err(invalid(flag, typed, e.to_string(), fix));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let (Some(need), Ok(fs)) = (need, nix::sys::statvfs::statvfs(&dir)) {
        let free = fs.blocks_available() * fs.fragment_size();
        if free < need {
            return Err(invalid(
                flag,
                typed,
                format!(
                    "the image needs at least {}, and {} has {} free",
                    human(need),
                    dir.display(),
                    human(free)
                ),
                "write it elsewhere or copy less memory",
            ));
        }
    }
    Ok(())
}

/// Reads `--key-file PATH` before anything starts.
pub fn read_key(path: Option<&Path>) -> anyhow::Result<Option<precopy_transfer::Key>> {
    let Some(p) = path else { return Ok(None) };
    precopy_transfer::Key::from_file(p).map(Some).map_err(|e| {
        let e = anyhow::Error::from(e);
        invalid(
            "--key-file",
            p.display(),
            format!("cannot be used as a key: {e:#}"),
            "name a readable file holding the shared key",
        )
    })
}

/// Bytes in binary units, e.g. `1.5 GiB`.
pub fn human(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// A value refused before anything started: `FLAG VALUE: PROBLEM; FIX`.
#[derive(Debug)]
pub struct Invalid {
    /// The flag, e.g. `--threads`.
    pub flag: &'static str,
    /// The value as typed.
    pub value: String,
    /// What is wrong, with the limit.
    pub problem: String,
    /// What to do instead.
    pub fix: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A flag that takes no value (a switch) is named alone.
        let sep = if self.value.is_empty() { "" } else { " " };
        write!(
            f,
            "{}{sep}{}: {}; {}",
            self.flag, self.value, self.problem, self.fix
        )
    }
}

impl std::error::Error for Invalid {}

/// Builds an [`Invalid`] as an `anyhow::Error`.
pub fn invalid(
    flag: &'static str,
    value: impl fmt::Display,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> anyhow::Error {
    Invalid {
        flag,
        value: value.to_string(),
        problem: problem.into(),
        fix: fix.into(),
    }
    .into()
}

/// Logical CPUs this process may run on.
pub fn cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// Memory this process could still use: `MemAvailable`, lowered to the room left under the
/// memory cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) when there is one.
/// Returns the bytes and where the figure comes from.
pub fn available_memory() -> Option<(u64, &'static str)> {
    use procfs::Current;
    let meminfo = procfs::Meminfo::current().ok()?;
    let available = (meminfo.mem_available?, "available memory (MemAvailable)");
    match cgroup_room() {
        Some(room) if room < available.0 => Some((room, "room under this memory cgroup's limit")),
        _ => Some(available),
    }
}

/// The room in the kernel's hugetlb pool of default-size huge pages (`/proc/meminfo`), which
/// `MAP_HUGETLB` memory comes from and `MemAvailable` does not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugetlbPool {
    /// Bytes per huge page (`Hugepagesize`).
    pub page_size: u64,
    /// Pages free and not reserved for a mapping already made (`HugePages_Free` minus
    /// `HugePages_Rsvd`): what a new mapping can have.
    pub free: u64,
    /// Pages in the pool (`HugePages_Total`, what `/proc/sys/vm/nr_hugepages` sets).
    pub total: u64,
}

/// The hugetlb pool, or `None` if this kernel has no hugetlb.
pub fn hugetlb_pool() -> Option<HugetlbPool> {
    use procfs::Current;
    let m = procfs::Meminfo::current().ok()?;
    Some(HugetlbPool {
        page_size: m.hugepagesize?,
        free: m
            .hugepages_free?
            .saturating_sub(m.hugepages_rsvd.unwrap_or(0)),
        total: m.hugepages_total?,
    })
}

/// Limit minus usage of the memory cgroup this process is in, if it has a limit.
fn cgroup_room() -> Option<u64> {
    let read = |p: String| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let num = |s: Option<String>| s.and_then(|s| s.parse::<u64>().ok());
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (limit, usage) = if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            (
                num(read(format!("{dir}/memory.max"))),
                num(read(format!("{dir}/memory.current"))),
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            (
                num(read(format!("{dir}/memory.limit_in_bytes"))),
                num(read(format!("{dir}/memory.usage_in_bytes"))),
            )
        } else {
            continue;
        };
        // v1 reports "no limit" as a huge number.
        if let (Some(l), Some(u)) = (limit, usage)
            && l < (1 << 60)
        {
            return Some(l.saturating_sub(u));
        }
    }
    None
}

/// The shortest timeout taken (`--timeout`, `--io-timeout`), in seconds: below a millisecond
/// a deadline is gone before the first system call (1e-300 reached the socket layer as a
/// zero timeout).
pub const MIN_TIMEOUT: f64 = 0.001;

/// Longest timeout taken (`--timeout`, `--io-timeout`), in seconds: 30 days.
pub const MAX_TIMEOUT: f64 = 30.0 * 86400.0;

/// What to type for a timeout, said by every refusal of one.
const TIMEOUT_FIX: &str = "give seconds from 0.001 (1 ms) to 2592000 (30 days)";

/// Why `v` seconds is no timeout, if it is not: not a number, negative, zero, under
/// [`MIN_TIMEOUT`] or past [`MAX_TIMEOUT`], in the same words for every timeout flag.
fn timeout_problem(v: f64) -> Option<&'static str> {
    if v.is_nan() {
        Some("is not a number of seconds")
    } else if v < 0.0 {
        Some("is negative")
    } else if v == 0.0 {
        Some("is zero")
    } else if v < MIN_TIMEOUT {
        Some("is shorter than a millisecond")
    } else if v > MAX_TIMEOUT {
        Some("is longer than 30 days")
    } else {
        None
    }
}

/// A timeout in seconds as typed (`--timeout`, `--io-timeout`): a clap value parser, so that
/// a refusal echoes the value as typed (`1e9`, not `1000000000`) and a malformed one is "not
/// a number of seconds", not Rust's "invalid float literal".
pub fn parse_timeout(s: &str) -> Result<f64, String> {
    let v = s
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("is not a number of seconds: {TIMEOUT_FIX}"))?;
    match timeout_problem(v) {
        Some(problem) => Err(format!("{problem}: {TIMEOUT_FIX}")),
        None => Ok(v),
    }
}

/// `flag`'s value `v` in seconds as a timeout: [`MIN_TIMEOUT`] to [`MAX_TIMEOUT`] (`--timeout`
/// and `--io-timeout` of `send`, `recv` and `demo`); 0, a negative number, NaN or one past 30
/// days is refused, in the same words everywhere ([`parse_timeout`]'s).
pub fn timeout_seconds(flag: &'static str, v: f64) -> anyhow::Result<std::time::Duration> {
    match timeout_problem(v) {
        Some(problem) => Err(invalid(flag, seconds(v), problem, TIMEOUT_FIX)),
        None => Ok(std::time::Duration::from_secs_f64(v)),
    }
}

/// Seconds as a message shows them: plainly where that stays short, else in exponent form
/// (`--timeout 1e-300` was echoed with 300 digits).
pub fn seconds(v: f64) -> String {
    if v == 0.0 || (1e-4..1e12).contains(&v.abs()) {
        v.to_string()
    } else {
        format!("{v:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every timeout refusal names its reason in the same words: not a number, negative,
    /// zero, under a millisecond, past 30 days; each with what to type.
    #[test]
    fn timeouts_are_refused_with_the_reason() {
        for (typed, reason) in [
            ("abc", "is not a number of seconds"),
            ("nan", "is not a number of seconds"),
            ("-1", "is negative"),
            ("0", "is zero"),
            ("0.0", "is zero"),
            ("0.0001", "is shorter than a millisecond"),
            ("1e9", "is longer than 30 days"),
            ("inf", "is longer than 30 days"),
        ] {
            let e = parse_timeout(typed).unwrap_err();
            assert!(e.starts_with(reason), "{typed}: {e}");
            assert!(e.ends_with(TIMEOUT_FIX), "{typed}: {e}");
        }
        for ok in ["0.001", "2.5", "60", "2592000"] {
            assert!(parse_timeout(ok).is_ok(), "{ok}");
        }
        let e = timeout_seconds("--io-timeout", 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is zero"), "{e}");
    }

    #[test]
    fn tcp_destinations_need_a_host_and_a_port() {
        for ok in ["tcp:127.0.0.1:7000", "tcp:localhost:1", "tcp:[::1]:7000"] {
            assert!(parse_dest("--to", ok, true, true).is_ok(), "{ok}");
        }
        for bad in ["tcp:host", "tcp:127.0.0.1", "tcp::7000", "tcp:h:x"] {
            let e = parse_dest("--to", bad, true, true).unwrap_err();
            assert!(e.downcast_ref::<Invalid>().is_some(), "{bad}: {e:#}");
            assert!(format!("{e}").contains("HOST:PORT"), "{bad}: {e}");
        }
        // A port past 16 bits is named as such, not as a malformed address.
        for bad in [
            "tcp:127.0.0.1:99999",
            "tcp:127.0.0.1:99999999999999999999999",
        ] {
            for flag in ["--to", "--listen"] {
                let e = parse_dest(flag, bad, flag == "--to", true).unwrap_err();
                assert!(format!("{e}").contains("ports run from 0 to 65535"), "{e}");
            }
        }
    }

    /// Port 0 is "any free port" to a listener and nowhere to connect to.
    #[test]
    fn port_0_is_for_listening_only() {
        assert!(parse_dest("--listen", "tcp:127.0.0.1:0", false, true).is_ok());
        let e = parse_dest("--to", "tcp:127.0.0.1:0", true, true).unwrap_err();
        assert!(e.downcast_ref::<Invalid>().is_some(), "{e:#}");
        assert!(
            format!("{e}").contains("port 0 is not a destination"),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        let b = |s| parse_size(s).map(|s| s.bytes);
        assert_eq!(b("2G"), Ok(2 << 30));
        assert_eq!(b("100M"), Ok(100 << 20));
        assert_eq!(b("4k"), Ok(4096));
        assert_eq!(b("1GiB"), Ok(1 << 30));
        assert_eq!(b("1GB"), Ok(1_000_000_000));
        assert_eq!(b("123"), Ok(123));
        assert!(b("fast").is_err());
        assert!(parse_size("-1G").unwrap_err().contains("negative"));
        assert_eq!(parse_size(" 64MB").unwrap().typed, "64MB");
        // Past what 64 bits hold: too large, not some other reason.
        for huge in [
            "99999999999G",
            "999999999999T",
            "20000000000000000000KB",
            "99999999999999999999",
            "99999999999999999999 B",
        ] {
            assert!(
                parse_size(huge).unwrap_err().contains("too large"),
                "{huge}"
            );
        }
    }

    #[test]
    fn counts_state_their_real_range() {
        let e = count_in(1, 3_600_000)("-1").unwrap_err();
        assert!(
            e.contains("negative") && e.contains("from 1 to 3600000"),
            "{e}"
        );
        assert!(!e.contains("0 or more"), "{e}");
        assert!(count_in(1, 10)("x").unwrap_err().contains("from 1 to 10"));
        assert_eq!(count_in(1, 10)("0"), Ok(0), "left to the flag's own check");
        assert!(!parse_count("-1").unwrap_err().contains("0 or more"));
        let huge = "99999999999999999999";
        assert!(parse_count(huge).unwrap_err().contains("too large"));
        assert!(count_in(1, 10)(huge).unwrap_err().contains("too large"));
    }

    #[test]
    fn invalid_is_one_line() {
        let e = invalid("--threads", 1000, "at most 8", "use --threads 8");
        assert_eq!(e.to_string(), "--threads 1000: at most 8; use --threads 8");
    }
}
