//! Other processes: a forked child's writes are not the parent's, and a uffd created inside
//! another process and adopted here tracks that process's memory.
//!
//! Children are forked from a multi-threaded test process, so they only touch memory, read and
//! write pipes, and `_exit`: no panics, no printing, no returning into the test harness.

mod common;

use common::*;
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::{Pid, pipe};
use precopy::sys::mem::{Backing, Mapping, Thp};
use precopy::tracker::Error as TrackerError;
use precopy::{MemoryKind, RegisterOptions, Target, ThpPolicy, Tracker, Uffd};
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

#[test]
fn fork_child_writes_are_not_the_parents() {
    let mem = anon(64);
    mem.fill(0, 32 * PAGE, 0x10).unwrap();
    let base = mem.addr();
    let tracker = track(&mem);
    let mut scanner = scanner();
    // Written before the fork: still the parent's to report.
    touch(&mem, 1, 0x1111);

    let (go_r, go_w) = pipe().unwrap();
    let (done_r, done_w) = pipe().unwrap();
    let child = spawn(|| {
        // Private (copy-on-write) writes everywhere: populated pages and never-touched ones.
        for p in (0..64).step_by(2) {
            if mem.write_u64(p * PAGE + 8, 0xdead_0000 + p).is_err() {
                return false;
            }
        }
        if !write_all(done_w.as_fd(), b"w") {
            return false;
        }
        // Stay alive while the parent runs rounds, until told to go.
        let mut b = [0u8; 1];
        read_exact(go_r.as_fd(), &mut b)
    });
    let mut b = [0u8; 1];
    assert!(
        read_exact(done_r.as_fd(), &mut b),
        "child died before writing"
    );

    // The child's writes (while it lives) are not in the parent's rounds.
    let round = scanner.round(&tracker).unwrap();
    assert_eq!(dirty_pages(round, base), vec![1]);
    assert!(round.untracked().is_empty());
    assert_eq!(mem.read_u64(2 * PAGE + 8).unwrap(), 0x1010_1010_1010_1010);
    assert_eq!(mem.read_u64(40 * PAGE + 8).unwrap(), 0);

    // The parent's own writes after the fork still are: to copy-on-write shared pages, to pages
    // the child also wrote, and to never-populated ones.
    for p in [2, 3, 30, 40, 63] {
        touch(&mem, p, 0x2222);
    }
    let round = scanner.round(&tracker).unwrap();
    assert_eq!(dirty_pages(round, base), vec![2, 3, 30, 40, 63]);

    assert!(write_all(go_w.as_fd(), b"g"));
    wait_ok(child);
    assert!(scanner.round(&tracker).unwrap().is_clean());
    touch(&mem, 5, 1);
    assert_eq!(dirty_pages(scanner.round(&tracker).unwrap(), base), vec![5]);
}

const CHILD_PAGES: u64 = 32;
const EXIT: u64 = u64::MAX;
/// Command: `MADV_DONTNEED` all of the target's memory, then acknowledge.
const DONTNEED: u64 = u64::MAX - 1;

/// The cooperating target: creates a uffd (no handshake) and memory, announces them, then writes
/// the pages it is told to, acknowledging each batch. `send_fd` hands the uffd over a socket
/// instead of announcing its number. With `features` non-zero the target does the `UFFDIO_API`
/// handshake itself, asking for them.
fn target_process(
    cmd: BorrowedFd<'_>,
    reply: BorrowedFd<'_>,
    socket: Option<&UnixStream>,
    features: u64,
) -> bool {
    let Ok(uffd) = precopy::sys::uffd::create() else {
        return false;
    };
    if features != 0 && precopy::sys::uffd::api(uffd.as_fd(), features).is_err() {
        return false;
    }
    let Ok(mem) = Mapping::new(Backing::AnonPrivate, CHILD_PAGES * PAGE, 0, Thp::NoHuge) else {
        return false;
    };
    // Half populated before the monitor arms it.
    if mem.fill(0, CHILD_PAGES / 2 * PAGE, 0xee).is_err() {
        return false;
    }
    if let Some(sock) = socket
        && precopy::tracker::handoff::send_uffd(sock, uffd.as_fd()).is_err()
    {
        return false;
    }
    let mut hello = [0u8; 16];
    hello[..8].copy_from_slice(&(uffd.as_raw_fd() as u64).to_ne_bytes());
    hello[8..].copy_from_slice(&mem.addr().to_ne_bytes());
    if !write_all(reply, &hello) {
        return false;
    }
    loop {
        let mut c = [0u8; 8];
        if !read_exact(cmd, &mut c) {
            return false;
        }
        let page = u64::from_ne_bytes(c);
        if page == EXIT {
            return true;
        }
        if page == DONTNEED {
            if mem
                .advise(0, CHILD_PAGES * PAGE, precopy::sys::mem::Advice::DontNeed)
                .is_err()
                || !write_all(reply, b"k")
            {
                return false;
            }
            continue;
        }
        if page >= CHILD_PAGES
            || mem.write_u64(page * PAGE + 8, 0xc0de_0000 + page).is_err()
            || !write_all(reply, b"k")
        {
            return false;
        }
    }
}

/// The monitor's handle on a running target process.
struct Child {
    pid: Pid,
    cmd: OwnedFd,
    reply: OwnedFd,
    uffd_no: i32,
    addr: u64,
}

impl Child {
    fn start(with_socket: bool) -> (Child, Option<UnixStream>) {
        Child::start_with(with_socket, 0)
    }

    fn start_with(with_socket: bool, features: u64) -> (Child, Option<UnixStream>) {
        let (cmd_r, cmd_w) = pipe().unwrap();
        let (rep_r, rep_w) = pipe().unwrap();
        let (mine, theirs) = if with_socket {
            let (a, b) = UnixStream::pair().unwrap();
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        let pid = spawn(|| target_process(cmd_r.as_fd(), rep_w.as_fd(), theirs.as_ref(), features));
        let mut hello = [0u8; 16];
        assert!(
            read_exact(rep_r.as_fd(), &mut hello),
            "target died at start"
        );
        let t = Child {
            pid,
            cmd: cmd_w,
            reply: rep_r,
            uffd_no: u64::from_ne_bytes(hello[..8].try_into().unwrap()) as i32,
            addr: u64::from_ne_bytes(hello[8..].try_into().unwrap()),
        };
        (t, mine)
    }

    fn write_pages(&self, pages: &[u64]) {
        for &p in pages {
            assert!(write_all(self.cmd.as_fd(), &p.to_ne_bytes()));
            let mut k = [0u8; 1];
            assert!(read_exact(self.reply.as_fd(), &mut k), "target died");
        }
    }

    /// Asks the target to `MADV_DONTNEED` its memory; true if it answered within 30 s (a target
    /// stuck in `madvise` waiting for an event reader never answers).
    fn dontneed_answers(&self) -> bool {
        assert!(write_all(self.cmd.as_fd(), &DONTNEED.to_ne_bytes()));
        let reply = self.reply.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut k = [0u8; 1];
            let _ = tx.send(read_exact(reply.as_fd(), &mut k));
        });
        // A blocked target leaves the reader thread waiting; the test fails instead of hanging.
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or(false)
    }

    fn read_page(&self, page: u64) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE as usize];
        let n = process_vm_readv(
            self.pid,
            &mut [IoSliceMut::new(&mut buf)],
            &[RemoteIoVec {
                base: (self.addr + page * PAGE) as usize,
                len: PAGE as usize,
            }],
        )
        .expect("process_vm_readv");
        assert_eq!(n, PAGE as usize);
        buf
    }

    fn stop(self) {
        assert!(write_all(self.cmd.as_fd(), &EXIT.to_ne_bytes()));
        wait_ok(self.pid);
    }
}

fn track_other_process(t: &Child, uffd: Uffd) {
    assert_eq!(uffd.target(), Target::Process(t.pid.as_raw()));
    assert_eq!(uffd.pid(), t.pid.as_raw());
    let mut tracker = Tracker::new(uffd);
    let range = t.addr..t.addr + CHILD_PAGES * PAGE;
    // THP policy can only be changed in one's own address space.
    match tracker.register_with(
        range.clone(),
        RegisterOptions {
            thp: ThpPolicy::Disable,
            ..RegisterOptions::default()
        },
    ) {
        Err(TrackerError::Unsupported(_)) => {}
        other => {
            panic!("expected Unsupported for ThpPolicy::Disable on another process: {other:?}")
        }
    }
    assert_eq!(
        tracker.register(range.clone()).unwrap().kind,
        MemoryKind::PrivateAnonymous
    );
    tracker.arm().unwrap();
    let mut scanner = scanner();
    assert!(scanner.round(&tracker).unwrap().is_clean(), "clean start");

    let written = [0, 3, 4, 17, 31];
    t.write_pages(&written);
    let round = scanner.round(&tracker).unwrap();
    assert_shape(round);
    assert_eq!(dirty_pages(round, t.addr), written.to_vec());
    assert!(round.untracked().is_empty());
    // The pages hold what the target wrote (read after the round returned).
    for p in written {
        let page = t.read_page(p);
        let word = u64::from_ne_bytes(page[8..16].try_into().unwrap());
        assert_eq!(word, 0xc0de_0000 + p, "page {p}");
        let filler = if p < CHILD_PAGES / 2 { 0xee } else { 0 };
        assert_eq!(page[0], filler, "page {p}");
    }
    assert!(scanner.round(&tracker).unwrap().is_clean());
    // This process's own writes to its own memory are not the target's.
    let own = anon(4);
    own.fill(0, 4 * PAGE, 1).unwrap();
    t.write_pages(&[17]);
    assert_eq!(
        dirty_pages(scanner.round(&tracker).unwrap(), t.addr),
        vec![17]
    );
}

#[test]
fn other_process_through_pidfd_getfd() {
    let (t, _) = Child::start(false);
    let pidfd = precopy::sys::process::pidfd_open(t.pid.as_raw()).unwrap();
    let fd = precopy::sys::process::pidfd_getfd(pidfd.as_fd(), t.uffd_no).unwrap();
    let uffd = Uffd::adopt(fd, t.pid.as_raw()).unwrap();
    track_other_process(&t, uffd);
    t.stop();
}

#[test]
fn other_process_through_scm_rights() {
    let (t, sock) = Child::start(true);
    let uffd = precopy::tracker::handoff::receive_uffd(&sock.unwrap()).unwrap();
    track_other_process(&t, uffd);
    t.stop();
}

#[test]
fn round_after_target_exit_is_never_clean() {
    let (t, _) = Child::start(false);
    let uffd = Uffd::from_process(t.pid.as_raw(), t.uffd_no).unwrap();
    let mut tracker = Tracker::new(uffd);
    tracker
        .register(t.addr..t.addr + CHILD_PAGES * PAGE)
        .unwrap();
    tracker.arm().unwrap();
    let mut scanner = scanner();
    assert!(scanner.round(&tracker).unwrap().is_clean());
    t.write_pages(&[2]);
    t.stop();
    match scanner.round(&tracker) {
        Err(e) => eprintln!("round after the target exited: error (fine): {e}"),
        Ok(round) => assert!(
            !round.is_clean(),
            "the target exited and its memory is gone, yet the round reported clean"
        ),
    }
}

/// Case 3 of issue 14: a uffd whose owner negotiated event features (or synchronous
/// write-protect) is refused by name, nothing gets registered, and the owner keeps running: its
/// `madvise(MADV_DONTNEED)` returns. Accepted fds report exactly the negotiated features.
#[test]
fn adopt_refuses_features_that_would_block_the_target() {
    use precopy::sys::abi::*;
    let wp = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    let refused = [
        (wp | UFFD_FEATURE_EVENT_REMOVE, "UFFD_FEATURE_EVENT_REMOVE"),
        (wp | UFFD_FEATURE_EVENT_UNMAP, "UFFD_FEATURE_EVENT_UNMAP"),
        (wp | UFFD_FEATURE_EVENT_FORK, "UFFD_FEATURE_EVENT_FORK"),
        (wp | UFFD_FEATURE_EVENT_REMAP, "UFFD_FEATURE_EVENT_REMAP"),
        (UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_ASYNC"),
    ];
    for (features, name) in refused {
        let (t, _) = Child::start_with(false, features);
        let err = Uffd::from_process(t.pid.as_raw(), t.uffd_no).unwrap_err();
        assert!(
            matches!(err, TrackerError::BlockingFeature { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name), "{name} not named in: {err}");
        assert!(t.dontneed_answers(), "{name}: the target is blocked");
        t.write_pages(&[3]);
        t.stop();
    }
    // Negotiated by the owner without blocking features: adopted, and features() says what
    // the context has, not what the kernel offers.
    let (t, _) = Child::start_with(false, wp);
    let uffd = Uffd::from_process(t.pid.as_raw(), t.uffd_no).unwrap();
    assert_eq!(uffd.features().bits(), wp);
    track_other_process(&t, uffd);
    assert!(t.dontneed_answers());
    t.stop();
    // A fresh fd gets the engine's handshake: exactly the features asked for.
    let (t, _) = Child::start(false);
    let uffd = Uffd::from_process(t.pid.as_raw(), t.uffd_no).unwrap();
    let offered = precopy::tracker::uffd_kernel_features().unwrap().bits();
    let expected = wp | (offered & UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
    assert_eq!(uffd.features().bits(), expected);
    assert_ne!(
        offered, expected,
        "the kernel offers more than the engine asks for"
    );
    t.stop();
}
