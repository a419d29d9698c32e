//! Values the command line takes and the one shape of a refused value.
//!
//! Every flag is checked before anything starts. A refusal is one line that names the flag, the
//! value as typed, the limit and what to type instead ([`Invalid`]); `main` exits with status 2
//! for it, as for any other usage error.

use std::fmt;

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
    let b = binary.parse::<bytesize::ByteSize>().map_err(|_| {
        "not a size: use a number with K, M, G or T (binary: 2G = 2 GiB), e.g. 512K, 100M, 2G"
            .to_string()
    })?;
    Ok(Size {
        bytes: b.as_u64(),
        typed: t.to_string(),
    })
}

/// A whole number as typed; a minus sign gets its own message instead of clap's
/// "unexpected argument".
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err("cannot be negative".into());
    }
    t.parse()
        .map_err(|_| "not a whole number (e.g. 1, 2, 30)".to_string())
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
        write!(
            f,
            "{} {}: {}; {}",
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
        if let (Some(l), Some(u)) = (limit, usage) {
            if l < (1 << 60) {
                return Some(l.saturating_sub(u));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn invalid_is_one_line() {
        let e = invalid("--threads", 1000, "at most 8", "use --threads 8");
        assert_eq!(e.to_string(), "--threads 1000: at most 8; use --threads 8");
    }
}
