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
pub fn create() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | abi::UFFD_USER_MODE_ONLY as libc::c_int;
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
