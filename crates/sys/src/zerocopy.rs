//! `MSG_ZEROCOPY` sends on a TCP socket (Linux 4.14+; see the kernel's
//! `Documentation/networking/msg_zerocopy.rst`): the kernel pins the user pages and sends from
//! them instead of copying them into socket buffers, and reports on the socket's error queue when
//! it no longer needs them. Used by the stream bench to measure whether it pays for the engine's
//! lent pages; on loopback the kernel must copy anyway when the receiver is local, and reports so
//! (`SO_EE_CODE_ZEROCOPY_COPIED`).

use crate::live::LivePages;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `SO_EE_ORIGIN_ZEROCOPY` (`include/uapi/linux/errqueue.h`).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel fell back to copying for this range of sends.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Sends with `MSG_ZEROCOPY` on one socket and keeps count of the kernel's completions.
#[derive(Debug)]
pub struct ZeroCopySender<'fd> {
    fd: BorrowedFd<'fd>,
    /// Sends issued (each gets the next 32-bit id from the kernel, from 0).
    issued: u64,
    /// Sends the kernel reported complete.
    completed: u64,
    /// Of those, sends the kernel reported it copied after all.
    copied: u64,
}

impl<'fd> ZeroCopySender<'fd> {
    /// Turns on `SO_ZEROCOPY` for `fd` (a TCP socket).
    pub fn new(fd: BorrowedFd<'fd>) -> io::Result<ZeroCopySender<'fd>> {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local.
        crate::cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ZEROCOPY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
        Ok(ZeroCopySender {
            fd,
            issued: 0,
            completed: 0,
            copied: 0,
        })
    }

    /// Sends all of `pages`. The pages must not be released before [`ZeroCopySender::finish`]
    /// returns (they are pinned and read by the kernel until their send completes); `pages`
    /// holds its mapping, the caller keeps it alive until then.
    pub fn send(&mut self, pages: &LivePages) -> io::Result<()> {
        let mut at = 0u64;
        while at < pages.len() {
            let addr = pages.addr() + at;
            // SAFETY: `addr..addr + len` lies inside the mapping `pages` holds; the kernel only
            // reads it (pinning the pages until the completion we wait for in `finish`).
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    addr as *const libc::c_void,
                    (pages.len() - at) as usize,
                    libc::MSG_ZEROCOPY,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Too much pinned memory accounted to the socket: collect completions.
                    Some(libc::ENOBUFS) => {
                        self.reap(true)?;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            self.issued += 1;
            at += n as u64;
            self.reap(false)?;
        }
        Ok(())
    }

    /// Waits until the kernel completed every send; returns (sends, sends it copied anyway).
    pub fn finish(mut self) -> io::Result<(u64, u64)> {
        while self.completed < self.issued {
            self.reap(true)?;
        }
        Ok((self.issued, self.copied))
    }

    /// Reads completions from the error queue; with `wait`, waits up to a second for one.
    fn reap(&mut self, wait: bool) -> io::Result<()> {
        loop {
            let mut control = [0u64; 16];
            // SAFETY: zeroed msghdr is valid (no name, no data iovecs).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: `msg` points at a live control buffer of the stated length.
            let r = unsafe {
                libc::recvmsg(
                    self.fd.as_raw_fd(),
                    &mut msg,
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) if wait => {
                        let mut p = libc::pollfd {
                            fd: self.fd.as_raw_fd(),
                            events: 0,
                            revents: 0,
                        };
                        // SAFETY: one live pollfd; POLLERR is reported whatever `events` says.
                        crate::cvt(unsafe { libc::poll(&mut p, 1, 1000) })?;
                        if p.revents & libc::POLLERR == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "no MSG_ZEROCOPY completion within a second",
                            ));
                        }
                        continue;
                    }
                    Some(libc::EAGAIN) => return Ok(()),
                    _ => return Err(e),
                }
            }
            // SAFETY: `msg` came back from recvmsg with `msg_controllen` bytes of cmsgs in
            // `control`; CMSG_FIRSTHDR/NXTHDR stay inside it.
            let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !c.is_null() {
                // SAFETY: `c` is a cmsg header inside `control`.
                let data = unsafe { libc::CMSG_DATA(c) };
                // SAFETY: an error-queue message's data is a sock_extended_err (IP_RECVERR and
                // IPV6_RECVERR alike) inside `control`; read unaligned to be safe.
                let ee =
                    unsafe { std::ptr::read_unaligned(data.cast::<libc::sock_extended_err>()) };
                if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0 {
                    let n = u64::from(ee.ee_data.wrapping_sub(ee.ee_info)) + 1;
                    self.completed += n;
                    if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                        self.copied += n;
                    }
                }
                // SAFETY: as above.
                c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
            }
            if !wait || self.completed >= self.issued {
                return Ok(());
            }
        }
    }
}
