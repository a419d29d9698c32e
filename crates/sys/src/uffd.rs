//! userfaultfd: create, handshake, register, unregister, write-protect.

use crate::abi::{self, UffdioApi, UffdioRange, UffdioRegister, UffdioWriteprotect};
use crate::cvt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Creates a userfaultfd for the calling process's address space.
///
/// Tries the `userfaultfd(2)` syscall with `UFFD_USER_MODE_ONLY` (allowed for unprivileged
/// processes even when `vm.unprivileged_userfaultfd` is 0), then `/dev/userfaultfd`. The fd is
/// close-on-exec and non-blocking: async write-protect never queues a message to read.
///
/// Such an fd handles only faults raised by user-space instructions: a fault the kernel takes
/// while copying into a range registered with it (`read(2)` into the memory) is not handed to
/// the fd's reader and the system call fails with `EFAULT` (`handle_userfault` in
/// `fs/userfaultfd.c`). Async write-protect never needs a reader, so this matters only for
/// synchronous modes: see [`create_with_kernel_faults`].
pub fn create() -> io::Result<OwnedFd> {
    create_with_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | abi::UFFD_USER_MODE_ONLY as libc::c_int)
}

/// As [`create`], without `UFFD_USER_MODE_ONLY`: the fd also handles faults the kernel takes
/// on the process's behalf (the copy of `read(2)`, `recv`, `pread` into registered memory),
/// so a synchronous fault reader resolves them like any other. Needs `CAP_SYS_PTRACE` (root)
/// or `vm.unprivileged_userfaultfd = 1` for the system call, or access to
/// `/dev/userfaultfd`; `EPERM` otherwise.
pub fn create_with_kernel_faults() -> io::Result<OwnedFd> {
    create_with_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
}

fn create_with_flags(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes one integer argument and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret >= 0 {
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) });
    }
    let syscall_err = io::Error::last_os_error();
    let dev = match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => dev,
        Err(_) => return Err(syscall_err),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the open flags as an integer and returns a new fd or -1.
    let ret = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            abi::USERFAULTFD_IOC_NEW as _,
            flags as libc::c_ulong,
        )
    };
    let fd = cvt(ret)?;
    // SAFETY: the ioctl returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Result of the `UFFDIO_API` handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiReply {
    /// Features the kernel enabled (those asked for that it supports).
    pub features: u64,
    /// Bit set of the ioctls this fd supports.
    pub ioctls: u64,
}

/// Runs the `UFFDIO_API` handshake asking for `features`. Succeeds once per fd.
pub fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<ApiReply> {
    let mut arg = UffdioApi {
        api: abi::UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `arg` is a valid, writable uffdio_api for the duration of the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), abi::UFFDIO_API as _, &mut arg) })?;
    Ok(ApiReply {
        features: arg.features,
        ioctls: arg.ioctls,
    })
}

/// Registers `[start, start + len)` with `mode`; returns the ioctls allowed on the range.
pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut arg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: `arg` is a valid, writable uffdio_register for the duration of the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), abi::UFFDIO_REGISTER as _, &mut arg) })?;
    Ok(arg.ioctls)
}

/// Unregisters `[start, start + len)`.
pub fn unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = UffdioRange { start, len };
    // SAFETY: `arg` is a valid uffdio_range for the duration of the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), abi::UFFDIO_UNREGISTER as _, &mut arg) })?;
    Ok(())
}

/// Sets (`protect`) or clears write protection on `[start, start + len)`.
pub fn writeprotect(fd: BorrowedFd<'_>, start: u64, len: u64, protect: bool) -> io::Result<()> {
    let mut arg = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect {
            abi::UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    // SAFETY: `arg` is a valid uffdio_writeprotect for the duration of the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), abi::UFFDIO_WRITEPROTECT as _, &mut arg) })?;
    Ok(())
}

/// The features a userfaultfd context really has, read from the `API:` line the kernel prints in
/// `/proc/self/fdinfo/FD` (`API:\t<api>:<features>:<ioctls>`, all hex; `fs/userfaultfd.c`,
/// `userfaultfd_show_fdinfo`). The `UFFDIO_API` reply cannot tell: it lists every feature the
/// kernel offers, not the ones the context enabled. Includes
/// [`abi::UFFD_FEATURE_INITIALIZED`] once a handshake was done on the context. `None` when the
/// line is absent (the fd is not a userfaultfd).
pub fn context_features(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(parse_fdinfo_features(&text))
}

fn parse_fdinfo_features(text: &str) -> Option<u64> {
    let api = text.lines().find_map(|l| l.strip_prefix("API:"))?;
    let features = api.trim().split(':').nth(1)?;
    u64::from_str_radix(features, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn fdinfo_api_line_parses() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t16\nino:\t1057\npending:\t0\ntotal:\t0\nAPI:\taa:8000a008:c000000000000000\n";
        assert_eq!(parse_fdinfo_features(text), Some(0x8000_a008));
        assert_eq!(parse_fdinfo_features("pos:\t0\n"), None);
    }

    #[test]
    fn context_features_are_what_was_asked_not_what_is_offered() {
        let Ok(fd) = create() else {
            eprintln!(
                "SKIP context_features_are_what_was_asked_not_what_is_offered: no userfaultfd"
            );
            return;
        };
        let before = context_features(fd.as_fd()).unwrap().unwrap();
        assert_eq!(before & abi::UFFD_FEATURE_INITIALIZED, 0);
        let reply = api(fd.as_fd(), 0).unwrap();
        let after = context_features(fd.as_fd()).unwrap().unwrap();
        assert_eq!(
            after & !abi::UFFD_FEATURE_INITIALIZED,
            0,
            "asked for nothing"
        );
        assert_ne!(after & abi::UFFD_FEATURE_INITIALIZED, 0);
        assert_ne!(reply.features, 0, "the reply lists what the kernel offers");
    }
}
