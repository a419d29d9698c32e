//! The thin layer that talks to the kernel.
//!
//! This crate owns every raw ABI detail the engine depends on: ioctl numbers, `#[repr(C)]` argument
//! structs, feature bits, and the `unsafe` calls that pass them to the kernel. Everything above it
//! (tracker, scanner, transfer) is safe Rust and never spells a magic number.
//!
//! What it must never do: interpret results. It returns what the kernel returned (or an
//! [`std::io::Error`] carrying the errno); giving an errno a meaning is the caller's job, because
//! the same errno means different things for different calls.

pub mod abi;
pub mod kvm;
pub mod live;
pub mod mem;
pub mod pagemap;
pub mod process;
#[cfg(target_arch = "x86_64")]
pub mod ptrace;
pub mod ranges;
pub mod sched;
pub mod splice;
pub mod stdio;
pub mod track;
pub mod uffd;
pub mod xxh3;
pub mod zerocopy;

/// The base page size of this machine, in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size <= 0 { 4096 } else { size as u64 }
}

/// An error and its causes on one line (`outer: cause: root cause`), for reports and JSON that
/// carry an error as text. Lives here because every crate of the workspace depends on this one.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Converts a `-1`-on-error libc return value into an [`std::io::Result`].
fn cvt(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
