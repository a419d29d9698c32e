//! Lent pages sent to a socket without the kernel's copy into socket buffers: `vmsplice(2)` puts
//! references to the pages into a pipe, `splice(2)` moves those references on to the socket.
//!
//! Since Linux 6.5 `splice` to a socket hands the pipe's pages to the protocol's `sendmsg` with
//! `MSG_SPLICE_PAGES` (before that, `sendpage`): TCP and Unix stream sockets attach them to their
//! socket buffers as page fragments instead of copying them. Over loopback the receiver's `recv`
//! then copies straight from our pages, so one copy of each byte remains instead of two. (This
//! differs from `MSG_ZEROCOPY`, which the kernel turns back into a copy for a local receiver;
//! see [`crate::zerocopy`].)
//!
//! # When the bytes are read
//!
//! With `writev` the kernel reads a lent page during the call. Here it reads it when the
//! receiver copies it, which can be much later: after the call returned, after the caller moved
//! on to the next round. A write to the page in between shows up in what the receiver gets
//! (pages are referenced, not copied; a write to private anonymous memory the process owns alone
//! reuses the page in place). Callers must treat the bytes sent as a snapshot taken at some
//! moment between the call and the receiver's copy, which may be torn like any other read of
//! memory that is being written.
//!
//! # Memory lifetime
//!
//! `vmsplice` takes a reference on each page (`get_user_pages`), and the pipe buffer and then the
//! socket buffer hold that reference until the receiver consumed the bytes (on TCP, until they
//! were acknowledged). The kernel frees a referenced page only when the last reference goes, so
//! the pages stay valid memory even if the mapping is unmapped right after the call: the address
//! range only has to be mapped during the call itself, which the [`LivePages`](crate::live)
//! view guarantees by holding its mapping. Bytes we own ([`Gather::Bytes`]: frame headers, hash
//! lists) are not referenced but copied into the pipe with `write(2)`, so the caller may reuse
//! them at once.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::live::Gather;

/// Bytes of pipe asked for with `F_SETPIPE_SZ` (at most `/proc/sys/fs/pipe-max-size`, 1 MiB by
/// default): 256 page slots, so a pipe holds a whole 64-page frame with its header and list and
/// a `splice` moves up to 1 MiB per call.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// A pipe that stages lent pages and our own bytes for `splice(2)` to a socket.
///
/// Between calls the pipe is empty: every call moves all it staged on to the socket or, when it
/// fails, throws the rest away, so a failed call never leaves bytes that a later call would send.
#[derive(Debug)]
pub struct SplicePipe {
    /// The read end, blocking (so that `splice` waits on the socket, not on `O_NONBLOCK`).
    read: OwnedFd,
    /// The write end, `O_NONBLOCK`: a full pipe answers `EAGAIN` and the caller drains it.
    write: OwnedFd,
    /// Bytes in the pipe.
    held: u64,
    /// The pipe's size in bytes (`F_GETPIPE_SZ`).
    capacity: u64,
}

/// What [`SplicePipe::write_all`] did.
#[derive(Debug)]
pub enum Spliced {
    /// Every byte went to the socket; the total.
    Sent(u64),
    /// The socket (or a seccomp filter) refused `splice` before any byte reached it: the caller
    /// should send the same parts another way. The kernel's answer.
    Unsupported(io::Error),
}

impl SplicePipe {
    /// A new pipe, enlarged to 1 MiB where the limits allow (a smaller pipe works, with more
    /// system calls).
    pub fn new() -> io::Result<SplicePipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into the live two-element array.
        crate::cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded: fds[0] is a new fd, ours alone.
        let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above, for fds[1].
        let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        // SAFETY: fcntl on an fd we own, with integer arguments only.
        crate::cvt(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) })?;
        // SAFETY: as above. Refused (EPERM past pipe-max-size or the user's pipe quota): the
        // default size stays.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
        // SAFETY: as above.
        let capacity = crate::cvt(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) })?;
        Ok(SplicePipe {
            read,
            write,
            held: 0,
            capacity: capacity as u64,
        })
    }

    /// The pipe's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Sends every piece of `parts`, in order, to the socket `sock`: lent pages by reference
    /// (`vmsplice`, read by the kernel when the receiver copies them: see the module docs), our
    /// own bytes copied into the pipe (`write`), everything moved on with `splice`. `sock` must
    /// be a blocking stream socket; with `stall`, a send that times out (`SO_SNDTIMEO`) is
    /// retried as long as the last byte moved less than `stall` ago (as
    /// [`write_all_gather_within`](crate::live::write_all_gather_within)).
    ///
    /// Returns [`Spliced::Unsupported`] when the first `splice` fails with `EINVAL`,
    /// `EOPNOTSUPP`, `ENOSYS` or `EPERM` before anything reached the socket; any other failure
    /// is an error, after which an unknown part of `parts` was sent.
    pub fn write_all(
        &mut self,
        sock: BorrowedFd<'_>,
        parts: &[Gather<'_>],
        stall: Option<Duration>,
    ) -> io::Result<Spliced> {
        let mut sent = Sent {
            bytes: 0,
            progress: Instant::now(),
        };
        let result = self.stage_and_send(sock, parts, stall, &mut sent);
        if self.held > 0 {
            self.discard();
        }
        match result {
            Ok(()) => Ok(Spliced::Sent(sent.bytes)),
            Err(e) if sent.bytes == 0 && refused(&e) => Ok(Spliced::Unsupported(e)),
            Err(e) => Err(e),
        }
    }

    fn stage_and_send(
        &mut self,
        sock: BorrowedFd<'_>,
        parts: &[Gather<'_>],
        stall: Option<Duration>,
        sent: &mut Sent,
    ) -> io::Result<()> {
        for part in parts {
            let mut done = 0u64;
            while done < part.len() {
                match self.stage(part, done) {
                    Ok(n) => {
                        done += n;
                        self.held += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The pipe is full: move what it holds on to the socket.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.held > 0 => {
                        self.send_held(sock, true, stall, sent)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.send_held(sock, false, stall, sent)
    }

    /// Puts bytes of `part` from `from` on into the pipe without waiting; returns how many.
    fn stage(&self, part: &Gather<'_>, from: u64) -> io::Result<u64> {
        let iov = libc::iovec {
            iov_base: (part.base() + from) as *mut libc::c_void,
            iov_len: (part.len() - from) as usize,
        };
        let n = match part {
            // SAFETY: the iovec lies inside the bytes the slice borrows for this call; write
            // copies them into the pipe and keeps no reference.
            Gather::Bytes(_) => unsafe { libc::writev(self.write.as_raw_fd(), &iov, 1) },
            // SAFETY: the iovec lies inside the mapping the `LivePages` view holds for this
            // call (its range was checked against the mapping when the view was made).
            // vmsplice only reads through it: it takes a reference on each page, which keeps
            // the page allocated (not merely mapped) until the receiver consumed its bytes, so
            // nothing the pipe or the socket holds can point at freed memory whatever happens to
            // the mapping afterwards. That the bytes are read later, and may have changed by
            // then, is the documented contract of `write_all`.
            Gather::Live(_) => unsafe {
                libc::vmsplice(self.write.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK)
            },
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(n as u64)
    }

    /// Splices everything the pipe holds to `sock`; `more`: further bytes follow at once
    /// (`SPLICE_F_MORE`, so the protocol may hold back a partial segment).
    fn send_held(
        &mut self,
        sock: BorrowedFd<'_>,
        more: bool,
        stall: Option<Duration>,
        sent: &mut Sent,
    ) -> io::Result<()> {
        let flags = libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
        while self.held > 0 {
            // SAFETY: both fds are open for the call; no user memory is passed (null offsets).
            let n = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    self.held as usize,
                    flags,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() == io::ErrorKind::WouldBlock
                    && stall.is_some_and(|s| sent.progress.elapsed() < s)
                {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.held -= n as u64;
            sent.bytes += n as u64;
            sent.progress = Instant::now();
        }
        Ok(())
    }

    /// Throws away what the pipe holds (after a failed send), dropping its page references.
    fn discard(&mut self) {
        let mut sink = [0u8; 16 << 10];
        while self.held > 0 {
            let want = sink.len().min(self.held as usize);
            // SAFETY: read writes at most `want` bytes into the live local buffer. The pipe
            // holds at least `held` bytes, so the blocking read end does not wait.
            let n = unsafe { libc::read(self.read.as_raw_fd(), sink.as_mut_ptr().cast(), want) };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                break;
            }
            self.held -= n as u64;
        }
        if self.held > 0 {
            // Unreachable in practice; a fresh pipe is the safe state.
            if let Ok(fresh) = SplicePipe::new() {
                *self = fresh;
            }
        }
    }
}

/// Bytes moved to the socket so far and when the last ones moved.
struct Sent {
    bytes: u64,
    progress: Instant,
}

/// Whether `e` says this socket (or the process's seccomp filter) does not do `splice`.
fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | libc::EPERM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::LivePages;
    use crate::mem::{Backing, Mapping, Thp};
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    fn pattern(i: u64) -> u8 {
        (i % 251) as u8 + 1
    }

    /// Pages and our own bytes arrive in order, across many pipe refills; the pipe is empty and
    /// reusable afterwards.
    #[test]
    fn spliced_parts_arrive_in_order() {
        let pages = 600u64; // more than a 1 MiB pipe holds
        let m =
            Arc::new(Mapping::new(Backing::AnonPrivate, pages * 4096, 0, Thp::Default).unwrap());
        for i in 0..pages {
            m.fill(i * 4096, 4096, pattern(i)).unwrap();
        }
        let all = LivePages::new(m.clone(), m.range()).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            b.read_to_end(&mut v).unwrap();
            v
        });
        let mut pipe = SplicePipe::new().unwrap();
        assert!(pipe.capacity() >= 4096);
        let middle = all.slice(4096..(pages - 1) * 4096).unwrap();
        let head = vec![0xAAu8; 5000];
        for _ in 0..2 {
            let sent = pipe
                .write_all(
                    a.as_fd(),
                    &[
                        Gather::Bytes(&head),
                        Gather::Live(&middle),
                        Gather::Bytes(b"tail"),
                    ],
                    None,
                )
                .unwrap();
            assert!(matches!(sent, Spliced::Sent(n) if n == 5004 + (pages - 2) * 4096));
        }
        drop(a);
        let got = reader.join().unwrap();
        let one = 5004 + (pages - 2) as usize * 4096;
        assert_eq!(got.len(), 2 * one);
        for copy in got.chunks(one) {
            assert!(copy[..5000].iter().all(|&x| x == 0xAA));
            for (k, page) in copy[5000..one - 4].chunks(4096).enumerate() {
                let want = pattern(k as u64 + 1);
                assert!(page.iter().all(|&x| x == want), "page {k}");
            }
            assert_eq!(&copy[one - 4..], b"tail");
        }
    }

    /// Guest RAM may be shared memory (memfd, shmem) or huge pages: `vmsplice` references
    /// page-cache and huge pages as it does private anonymous ones.
    #[test]
    fn every_backing_splices() {
        let mut backings = vec![
            ("private anonymous", Backing::AnonPrivate),
            ("memfd", Backing::Memfd),
            ("shared anonymous", Backing::AnonShared),
            ("hugetlb", Backing::Hugetlb),
        ];
        let len = 4u64 << 20;
        for (name, backing) in backings.drain(..) {
            let m = match Mapping::new(backing, len, 0, Thp::Default) {
                Ok(m) => Arc::new(m),
                Err(e) if name == "hugetlb" => {
                    eprintln!("SKIP every_backing_splices (hugetlb): no huge page pool: {e}");
                    continue;
                }
                Err(e) => panic!("{name}: {e}"),
            };
            for i in 0..len / 4096 {
                m.fill(i * 4096, 4096, pattern(i)).unwrap();
            }
            let all = LivePages::new(m.clone(), m.range()).unwrap();
            let (a, mut b) = UnixStream::pair().unwrap();
            let reader = std::thread::spawn(move || {
                let mut v = Vec::new();
                b.read_to_end(&mut v).unwrap();
                v
            });
            let sent = SplicePipe::new()
                .unwrap()
                .write_all(a.as_fd(), &[Gather::Live(&all)], None)
                .unwrap();
            assert!(
                matches!(sent, Spliced::Sent(n) if n == len),
                "{name}: {sent:?}"
            );
            drop(a);
            let got = reader.join().unwrap();
            assert_eq!(got.len() as u64, len, "{name}");
            for (k, page) in got.chunks(4096).enumerate() {
                assert!(
                    page.iter().all(|&x| x == pattern(k as u64)),
                    "{name}: page {k}"
                );
            }
        }
    }

    /// The pages are referenced, not copied: a write after the call but before the receiver
    /// reads shows up in what it gets. This is the contract callers must live with.
    #[test]
    fn a_write_after_the_call_can_reach_the_receiver() {
        let m = Arc::new(Mapping::new(Backing::AnonPrivate, 4096, 0, Thp::Default).unwrap());
        m.fill(0, 4096, 1).unwrap();
        let page = LivePages::new(m.clone(), m.range()).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut pipe = SplicePipe::new().unwrap();
        let sent = pipe
            .write_all(a.as_fd(), &[Gather::Live(&page)], None)
            .unwrap();
        assert!(matches!(sent, Spliced::Sent(4096)));
        m.fill(0, 4096, 2).unwrap();
        drop(page);
        drop(m); // unmapped once the view is gone: the pipe's references keep the page
        let mut got = vec![0u8; 4096];
        b.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&x| x == 2), "got {}", got[0]);
    }

    /// A file that is not a socket nor splice-capable for writing: a read-only end refuses,
    /// and the pipe is left empty for the next call.
    #[test]
    fn a_refusing_target_leaves_the_pipe_empty() {
        let m = Arc::new(Mapping::new(Backing::AnonPrivate, 2 * 4096, 0, Thp::Default).unwrap());
        m.fill(0, 2 * 4096, 3).unwrap();
        let pages = LivePages::new(m.clone(), m.range()).unwrap();
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open("/dev/null")
            .unwrap();
        let mut pipe = SplicePipe::new().unwrap();
        let r = pipe
            .write_all(
                f.as_fd(),
                &[Gather::Bytes(b"x"), Gather::Live(&pages)],
                None,
            )
            .unwrap();
        assert!(matches!(r, Spliced::Unsupported(_)), "{r:?}");
        let (a, mut b) = UnixStream::pair().unwrap();
        let sent = pipe
            .write_all(a.as_fd(), &[Gather::Bytes(b"ok")], None)
            .unwrap();
        assert!(matches!(sent, Spliced::Sent(2)));
        drop(a);
        let mut v = Vec::new();
        b.read_to_end(&mut v).unwrap();
        assert_eq!(v, b"ok");
    }
}
