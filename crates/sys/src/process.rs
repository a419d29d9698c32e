//! pidfds: open a process by PID and copy an fd out of it.

use crate::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `pidfd_open(pid, 0)`: a stable handle on a process (Linux 5.3+).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = cvt(ret as libc::c_int)?;
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_open(tid, PIDFD_THREAD)`: a handle on thread `tid` (Linux 6.9+). Its process's
/// files are reachable through it (`pidfd_getfd`) also when the main thread has exited, which
/// a process pidfd's are not.
pub fn pidfd_open_thread(tid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, crate::abi::PIDFD_THREAD) };
    let fd = cvt(ret as libc::c_int)?;
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_getfd(pidfd, target_fd, 0)`: a duplicate of fd number `target_fd` of the process
/// behind `pidfd` (Linux 5.6+; needs ptrace access to it).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes three integers and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    let fd = cvt(ret as libc::c_int)?;
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `kcmp(pid1, pid2, KCMP_VM, 0, 0)`: whether processes `pid1` and `pid2` share one address
/// space (one `mm_struct`: threads of one process, a `vfork` child before its `exec` and its
/// parent, processes made with `clone(CLONE_VM)` without `CLONE_THREAD`).
///
/// Errors: `ESRCH` (no such process), `EPERM` (no `PTRACE_MODE_READ` access to one of them:
/// another user's process without `CAP_SYS_PTRACE`), `ENOSYS` (a kernel built without
/// `CONFIG_KCMP`).
pub fn shares_address_space(pid1: i32, pid2: i32) -> io::Result<bool> {
    // SAFETY: kcmp takes five integers and reads no memory of ours for KCMP_VM.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1,
            pid2,
            crate::abi::KCMP_VM,
            0usize,
            0usize,
        )
    };
    // 0: the same mm; 1, 2: an order between two different ones; 3: not comparable.
    Ok(cvt(ret as libc::c_int)? == 0)
}

/// Sends `fd` over a Unix stream socket with `SCM_RIGHTS`, with `payload` as the message bytes.
pub fn send_fd(socket: BorrowedFd<'_>, fd: BorrowedFd<'_>, payload: &[u8]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [fd.as_raw_fd()];
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[io::IoSlice::new(payload)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one message sent with [`send_fd`]: the bytes read into `payload` (their count is
/// returned) and the first fd it carried, if any. Extra fds are closed.
pub fn recv_fd(socket: BorrowedFd<'_>, payload: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(payload)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut first = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: SCM_RIGHTS installed `raw` as a new fd in this process; nothing else
                // owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                first.get_or_insert(owned);
            }
        }
    }
    Ok((msg.bytes, first))
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable), without waiting.
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, writable pollfd for the duration of the call; timeout 0.
    let n = cvt(unsafe { libc::poll(&mut pfd, 1, 0) })?;
    Ok(n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0)
}

/// Reads `len` bytes at `addr` of process `pid` through `/proc/PID/mem` (which, unlike
/// `process_vm_readv`, also reads pages the target cannot read itself, such as execute-only
/// text). Returns fewer bytes when the range runs into unmapped memory.
///
/// `InvalidInput` when `addr + len` passes `u64::MAX`; `OutOfMemory` when `len` bytes cannot be
/// allocated.
pub fn read_proc_mem(pid: i32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    if addr.checked_add(len as u64).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "address range passes the end of the address space",
        ));
    }
    let f = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    buf.resize(len, 0);
    let mut done = 0;
    while done < len {
        match f.read_at(&mut buf[done..], addr + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Sets signal `sig`'s disposition to `SIG_DFL` if it is `SIG_IGN` (one inherited across
/// `exec`, as a shell's background job inherits `SIGINT` ignored); a handled or default signal
/// is left as it is. Returns whether it was ignored.
pub fn unignore_signal(sig: libc::c_int) -> io::Result<bool> {
    // SAFETY: an all-zero sigaction is a valid value to be overwritten by the query below.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: querying (null new action) writes the current action into the live `old`.
    cvt(unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) })?;
    if old.sa_sigaction != libc::SIG_IGN {
        return Ok(false);
    }
    // SAFETY: an all-zero sigaction is valid (no flags, empty mask); SIG_DFL is set below.
    let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    dfl.sa_sigaction = libc::SIG_DFL;
    // SAFETY: `dfl` is a valid action; SIG_DFL installs no code of ours.
    cvt(unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) })?;
    Ok(true)
}

/// `tgkill(pid, tid, sig)`: signal `sig` to thread `tid` of process `pid` only. Unlike a
/// signal to the process (which the kernel flags as pending on one thread it picks), this one
/// is pending on `tid` itself, so `tid` handles it before it next returns to user space; `ESRCH`
/// when that thread has exited.
pub fn signal_thread(pid: i32, tid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: tgkill takes three integers; sending a signal has no memory-safety
    // preconditions.
    let ret = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    cvt(ret as libc::c_int).map(drop)
}
