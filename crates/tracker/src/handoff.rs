//! Moving a userfaultfd from the process it tracks to the process that scans it.
//!
//! A uffd always acts on the address space of the process that *created* it. To track another
//! process, the uffd is created inside it and handed over: by a cooperating target over a Unix
//! socket ([`send_uffd`] there, [`receive_uffd`] here), or copied out of it with `pidfd_getfd`
//! ([`Uffd::from_process`]).

use crate::{Error, Result, Uffd};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Sends `uffd` (an fd this process created, before any `UFFDIO_API`) over `socket` with
/// `SCM_RIGHTS`, together with this process's PID.
pub fn send_uffd(socket: &UnixStream, uffd: BorrowedFd<'_>) -> io::Result<()> {
    precopy_sys::process::send_fd(socket.as_fd(), uffd, &std::process::id().to_ne_bytes())
}

/// Receives a uffd sent with [`send_uffd`] and adopts it: the result tracks the sender's memory.
pub fn receive_uffd(socket: &UnixStream) -> Result<Uffd> {
    let mut pid = [0u8; 4];
    let (n, fd) =
        precopy_sys::process::recv_fd(socket.as_fd(), &mut pid).map_err(Error::Handoff)?;
    let fd = fd.ok_or_else(|| {
        Error::Handoff(io::Error::new(
            io::ErrorKind::InvalidData,
            "message carried no file descriptor",
        ))
    })?;
    if n != pid.len() {
        return Err(Error::Handoff(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed before sending its PID",
        )));
    }
    Uffd::adopt(fd, i32::from_ne_bytes(pid))
}

impl Uffd {
    /// Copies fd number `target_fd` out of process `pid` (which created it as a userfaultfd and
    /// did no handshake) with `pidfd_getfd`, and adopts it. Needs ptrace access to `pid`.
    /// A `pid` of zero or below is refused with [`Error::BadPid`], a negative `target_fd` with
    /// [`Error::Handoff`] (`EBADF`), before anything is asked of the kernel.
    pub fn from_process(pid: i32, target_fd: RawFd) -> Result<Uffd> {
        if pid <= 0 {
            return Err(Error::BadPid { pid });
        }
        if target_fd < 0 {
            return Err(Error::Handoff(io::Error::from_raw_os_error(libc::EBADF)));
        }
        let pidfd = precopy_sys::process::pidfd_open(pid).map_err(Error::Handoff)?;
        let fd =
            precopy_sys::process::pidfd_getfd(pidfd.as_fd(), target_fd).map_err(Error::Handoff)?;
        Uffd::adopt(fd, pid)
    }
}
