//! Pages of this process's own memory lent to the kernel without a copy: [`LivePages`], a range
//! of a [`Mapping`] that other threads (a vCPU, the workload) may be writing, and
//! [`write_all_gather`], which hands such ranges to `writev(2)` so the kernel reads them straight
//! into the socket.
//!
//! As in [`crate::mem`], the memory is not handed out as a Rust slice that outlives a call: the
//! kernel reads it (a `writev` that meets an unreadable page fails with `EFAULT`), user-space
//! copies go through raw pointers ([`LivePages::copy_to`]), and the one exception,
//! [`LivePages::for_each_page`], lends one page at a time, read-only, to a closure (the sender's
//! page hash and zero test, which then need no copy). A concurrent writer can make any read see a
//! mix of old and new bytes; callers must treat every read as a snapshot that may be torn.

use crate::mem::Mapping;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

/// A range of a [`Mapping`] this process owns, kept mapped for as long as the view lives (it
/// holds the mapping). The bytes may change at any time.
#[derive(Clone)]
pub struct LivePages {
    owner: Arc<Mapping>,
    addr: u64,
    len: u64,
}

impl std::fmt::Debug for LivePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivePages")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .finish()
    }
}

impl LivePages {
    /// The bytes at absolute addresses `range` of `owner`; an error if any part lies outside it
    /// or was unmapped or moved away.
    pub fn new(owner: Arc<Mapping>, range: Range<u64>) -> io::Result<LivePages> {
        let len = range.end.saturating_sub(range.start);
        let offset = range.start.checked_sub(owner.addr()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "range starts before the mapping",
            )
        })?;
        let addr = owner.check(offset, len)?;
        Ok(LivePages { owner, addr, len })
    }

    /// First address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The part `range` (offsets relative to this view).
    pub fn slice(&self, range: Range<u64>) -> io::Result<LivePages> {
        if range.start > range.end || range.end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "part outside the lent pages",
            ));
        }
        Ok(LivePages {
            owner: self.owner.clone(),
            addr: self.addr + range.start,
            len: range.end - range.start,
        })
    }

    /// Calls `f` with each whole `page_size` piece of these pages in turn, in place: no copy,
    /// so a page is read from memory once by `f` (a checksum, a zero test) and again by the
    /// kernel when it is sent. A concurrent writer can change a page while `f` reads it: `f`
    /// must treat what it sees as a snapshot that may be torn, and must not rely on reading
    /// the same byte twice and getting the same value (a hash reads each byte once). Bytes
    /// past the last whole page are not passed. An unreadable page (the embedder made it
    /// `PROT_NONE`) stops the process with `SIGSEGV`, as it would stop a vCPU touching it.
    pub fn for_each_page(&self, page_size: u64, mut f: impl FnMut(&[u8])) {
        if page_size == 0 {
            return;
        }
        let mut at = self.addr;
        while at + page_size <= self.addr + self.len {
            // SAFETY: `at..at + page_size` lies inside the mapping this view holds (checked when
            // the view was made), which stays mapped while `self.owner` lives, so the pointer is
            // valid, aligned (u8) and not null for the whole call. The slice lives only inside
            // this call and is never handed back. Other threads may write the bytes meanwhile
            // (the mapping is shared memory by design, as in `Mapping::read`, which copies
            // through a raw pointer under the same race): the slice is read-only and its readers
            // are told above that any value they see may be torn. This is the one place the
            // crate lends mapped memory as a slice, so that the page hash can run over it
            // without the copy that `copy_to` makes.
            let page = unsafe { std::slice::from_raw_parts(at as *const u8, page_size as usize) };
            f(page);
            at += page_size;
        }
    }

    /// Copies the bytes at `offset` (relative to this view) into `buf`: a snapshot that a
    /// concurrent writer may tear.
    pub fn copy_to(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "read outside the lent pages",
                ));
            }
        }
        self.owner.read(self.addr - self.owner.addr() + offset, buf)
    }
}

/// One piece of a gathered write: bytes of ours, or lent pages the kernel reads itself.
#[derive(Debug, Clone, Copy)]
pub enum Gather<'a> {
    /// Ordinary bytes (a header, a trailer).
    Bytes(&'a [u8]),
    /// Pages of our own memory, read by the kernel during the call.
    Live(&'a LivePages),
}

impl Gather<'_> {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Gather::Bytes(b) => b.len() as u64,
            Gather::Live(p) => p.len,
        }
    }

    pub(crate) fn base(&self) -> u64 {
        match self {
            Gather::Bytes(b) => b.as_ptr() as u64,
            Gather::Live(p) => p.addr,
        }
    }
}

/// Most pieces per `writev` call (Linux's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// Writes every piece of `parts`, in order, to `fd` with `writev(2)`, retrying after a short
/// write or `EINTR`. Returns the bytes written (the sum of the parts' lengths). The kernel reads
/// lent pages during the call; a page a writer changes meanwhile goes out torn. `fd` must be in
/// blocking mode (a `WouldBlock` is returned as an error).
pub fn write_all_gather(fd: BorrowedFd<'_>, parts: &[Gather<'_>]) -> io::Result<u64> {
    write_all_gather_within(fd, parts, None)
}

/// As [`write_all_gather`] on a socket whose send timeout (`SO_SNDTIMEO`) is a short slice of
/// `stall`: a `writev` that times out (`WouldBlock`) is tried again as long as the last byte
/// moved less than `stall` ago, so the call fails only after `stall` without progress (late by
/// at most one slice), however many partial writes it took. `None`: no retry.
pub fn write_all_gather_within(
    fd: BorrowedFd<'_>,
    parts: &[Gather<'_>],
    stall: Option<std::time::Duration>,
) -> io::Result<u64> {
    let mut progress = std::time::Instant::now();
    let total: u64 = parts.iter().map(Gather::len).sum();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len().min(MAX_IOV));
    // (part index, bytes of it already written)
    let (mut i, mut skip) = (0usize, 0u64);
    while i < parts.len() {
        iov.clear();
        for (k, p) in parts[i..].iter().take(MAX_IOV).enumerate() {
            let done = if k == 0 { skip } else { 0 };
            let len = p.len() - done;
            if len > 0 {
                iov.push(libc::iovec {
                    iov_base: (p.base() + done) as *mut libc::c_void,
                    iov_len: len as usize,
                });
            }
        }
        if iov.is_empty() {
            break;
        }
        // SAFETY: every iovec points at memory that stays mapped for the call: `Bytes` borrow it,
        // `Live` views hold the `Arc<Mapping>` that owns it (and its range was checked against
        // that mapping). writev only reads it; a page another thread writes meanwhile is read in
        // whatever state it is in, which the callers accept.
        let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if e.kind() == io::ErrorKind::WouldBlock
                && stall.is_some_and(|s| progress.elapsed() < s)
            {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        progress = std::time::Instant::now();
        let mut left = n as u64;
        while left > 0 && i < parts.len() {
            let avail = parts[i].len() - skip;
            if left >= avail {
                left -= avail;
                i += 1;
                skip = 0;
            } else {
                skip += left;
                left = 0;
            }
        }
        while i < parts.len() && parts[i].len() == skip {
            i += 1;
            skip = 0;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{Backing, Thp};
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn gathered_write_sends_lent_pages_in_order() {
        let m = Arc::new(Mapping::new(Backing::AnonPrivate, 4 * 4096, 0, Thp::Default).unwrap());
        for i in 0..4u64 {
            m.fill(i * 4096, 4096, i as u8 + 1).unwrap();
        }
        let all = LivePages::new(m.clone(), m.range()).unwrap();
        let second = all.slice(4096..8192).unwrap();
        let fourth = all.slice(3 * 4096..4 * 4096).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            b.read_to_end(&mut v).unwrap();
            v
        });
        let n = write_all_gather(
            a.as_fd(),
            &[
                Gather::Bytes(b"head"),
                Gather::Live(&second),
                Gather::Live(&fourth),
                Gather::Bytes(b"tail"),
            ],
        )
        .unwrap();
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(n, 8 + 8192);
        assert_eq!(&got[..4], b"head");
        assert!(got[4..4 + 4096].iter().all(|&x| x == 2));
        assert!(got[4 + 4096..4 + 8192].iter().all(|&x| x == 4));
        assert_eq!(&got[4 + 8192..], b"tail");
        let mut page = [0u8; 16];
        fourth.copy_to(100, &mut page).unwrap();
        assert_eq!(page, [4u8; 16]);
    }

    #[test]
    fn each_page_is_seen_in_place_in_order() {
        let m = Arc::new(Mapping::new(Backing::AnonPrivate, 3 * 4096, 0, Thp::Default).unwrap());
        for i in 0..3u64 {
            m.fill(i * 4096, 4096, i as u8 + 1).unwrap();
        }
        let v = LivePages::new(m.clone(), m.range()).unwrap();
        let mut seen = Vec::new();
        v.slice(4096..3 * 4096).unwrap().for_each_page(4096, |p| {
            assert_eq!(p.len(), 4096);
            assert!(p.iter().all(|&b| b == p[0]));
            seen.push((p[0], p.as_ptr() as u64));
        });
        assert_eq!(seen, [(2, m.addr() + 4096), (3, m.addr() + 2 * 4096)]);
        let mut n = 0;
        v.for_each_page(2 * 4096, |_| n += 1);
        assert_eq!(n, 1, "only whole pages");
        v.for_each_page(0, |_| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn views_stay_inside_their_mapping() {
        let m = Arc::new(Mapping::new(Backing::AnonPrivate, 2 * 4096, 0, Thp::Default).unwrap());
        let r = m.range();
        assert!(LivePages::new(m.clone(), r.start..r.end + 4096).is_err());
        assert!(LivePages::new(m.clone(), r.start - 4096..r.end).is_err());
        let v = LivePages::new(m.clone(), r.clone()).unwrap();
        assert!(v.slice(4096..3 * 4096).is_err());
        let mut buf = [0u8; 8];
        assert!(v.copy_to(2 * 4096 - 4, &mut buf).is_err());
    }
}
