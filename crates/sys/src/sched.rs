//! Threads' scheduling policy: read it, raise a set of threads to a real-time policy for a
//! short window, and put every one back as it was.
//!
//! Kernel facts (sched(7), sched_setscheduler(2)): the policy is per thread; `pid` in
//! `sched_setscheduler`/`sched_getscheduler`/`sched_getparam` names a thread ID. Setting a
//! real-time policy (`SCHED_FIFO`, `SCHED_RR`) needs `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` at
//! least the priority asked, else `EPERM`; a thread that exited gives `ESRCH`. A runnable
//! real-time thread always runs before every `SCHED_OTHER` thread of its CPU, and on waking it
//! is placed on a CPU whose current task has a lower priority (a CPU running only normal
//! tasks), where plain `SCHED_OTHER` wake-up placement keeps it near its waker. Normal tasks
//! keep a small share meanwhile (the kernel's real-time throttling or its fair server: 5 % by
//! default). `SCHED_RESET_ON_FORK` makes children of the thread start as `SCHED_OTHER`. Setting
//! `SCHED_OTHER` back with `sched_setscheduler` keeps the thread's nice value.

use crate::cvt;
use std::io;

/// A thread ID (the kernel's `pid_t` of one thread).
pub type Tid = i32;

/// `SCHED_OTHER`: the normal time-sharing policy.
pub const SCHED_OTHER: i32 = libc::SCHED_OTHER;
/// `SCHED_FIFO`: real time, first in first out at one priority.
pub const SCHED_FIFO: i32 = libc::SCHED_FIFO;
/// `SCHED_RR`: real time, round robin at one priority.
pub const SCHED_RR: i32 = libc::SCHED_RR;
/// `SCHED_BATCH`: time sharing for CPU-bound work.
pub const SCHED_BATCH: i32 = libc::SCHED_BATCH;
/// `SCHED_IDLE`: time sharing below every nice value.
pub const SCHED_IDLE: i32 = libc::SCHED_IDLE;
/// `SCHED_RESET_ON_FORK`, or-ed into a policy.
pub const SCHED_RESET_ON_FORK: i32 = 0x4000_0000;

/// One thread's scheduling policy as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPolicy {
    /// The policy, `SCHED_RESET_ON_FORK` or-ed in when set.
    pub policy: i32,
    /// The static priority (1-99 for real-time policies, 0 otherwise).
    pub priority: i32,
}

impl ThreadPolicy {
    /// The policy without the reset-on-fork flag.
    pub fn base(&self) -> i32 {
        self.policy & !SCHED_RESET_ON_FORK
    }

    /// Whether the policy is a real-time one (`SCHED_FIFO` or `SCHED_RR`).
    pub fn is_realtime(&self) -> bool {
        matches!(self.base(), SCHED_FIFO | SCHED_RR)
    }

    /// Whether the policy is a time-sharing one (`SCHED_OTHER`, `SCHED_BATCH`, `SCHED_IDLE`):
    /// the only ones [`raise_threads`] changes, because `sched_setscheduler` can put them
    /// back exactly (`SCHED_DEADLINE` needs `sched_setattr` and its parameters).
    pub fn is_time_sharing(&self) -> bool {
        matches!(self.base(), SCHED_OTHER | SCHED_BATCH | SCHED_IDLE)
    }

    /// Real-time `policy` (`SCHED_FIFO` or `SCHED_RR`) at `priority`, with
    /// `SCHED_RESET_ON_FORK`: what [`raise_threads`] sets.
    pub fn raised(policy: i32, priority: i32) -> ThreadPolicy {
        ThreadPolicy {
            policy: policy | SCHED_RESET_ON_FORK,
            priority,
        }
    }
}

/// The calling thread's ID (`gettid`).
pub fn gettid() -> Tid {
    nix::unistd::gettid().as_raw()
}

/// Thread `tid`'s policy and priority (`sched_getscheduler` + `sched_getparam`).
pub fn thread_policy(tid: Tid) -> io::Result<ThreadPolicy> {
    // SAFETY: sched_getscheduler takes a thread ID and returns the policy or -1.
    let policy = cvt(unsafe { libc::sched_getscheduler(tid) })?;
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, writable sched_param for the call's duration.
    cvt(unsafe { libc::sched_getparam(tid, &mut param) })?;
    Ok(ThreadPolicy {
        policy,
        priority: param.sched_priority,
    })
}

/// Sets thread `tid`'s policy (flags such as `SCHED_RESET_ON_FORK` may be or-ed in) and
/// static priority (`sched_setscheduler`).
pub fn set_thread_policy(tid: Tid, policy: ThreadPolicy) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: policy.priority,
    };
    // SAFETY: `param` is a valid sched_param that the kernel only reads during the call.
    cvt(unsafe { libc::sched_setscheduler(tid, policy.policy, &param) })?;
    Ok(())
}

/// Threads raised by [`raise_threads`]; dropping it (or [`Raised::restore`]) puts each back to
/// the policy it had.
#[derive(Debug, Default)]
pub struct Raised {
    /// Each raised thread and the policy it had before.
    threads: Vec<(Tid, ThreadPolicy)>,
}

impl Raised {
    /// The raised threads' IDs.
    pub fn threads(&self) -> impl Iterator<Item = Tid> + '_ {
        self.threads.iter().map(|t| t.0)
    }

    /// How many threads are raised.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether no thread is raised.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Takes over the threads `other` raised (a later raise of more threads), so that one
    /// guard restores them all.
    pub fn merge(&mut self, mut other: Raised) {
        self.threads.append(&mut other.threads);
    }

    /// Puts thread `tid` back to the policy it had, if this guard raised it, and forgets it
    /// (for a thread that is about to exit, while its ID still names it). `ESRCH` counts as
    /// done.
    pub fn restore_thread(&mut self, tid: Tid) -> io::Result<()> {
        let Some(i) = self.threads.iter().position(|t| t.0 == tid) else {
            return Ok(());
        };
        let (tid, before) = self.threads.remove(i);
        match set_thread_policy(tid, before) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => Err(e),
            _ => Ok(()),
        }
    }

    /// Puts every raised thread back to the policy it had; returns the first error other
    /// than `ESRCH` (a thread that exited meanwhile has nothing to restore). Every thread is
    /// tried whatever an earlier one gave.
    pub fn restore(mut self) -> io::Result<()> {
        self.restore_all()
    }

    fn restore_all(&mut self) -> io::Result<()> {
        let mut first = Ok(());
        for (tid, before) in self.threads.drain(..).rev() {
            match set_thread_policy(tid, before) {
                Err(e) if e.raw_os_error() != Some(libc::ESRCH) && first.is_ok() => first = Err(e),
                _ => {}
            }
        }
        first
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        let _ = self.restore_all();
    }
}

/// Raises each thread of `tids` whose policy is a time-sharing one
/// ([`ThreadPolicy::is_time_sharing`]: real-time and deadline threads are left as they are) to
/// `policy` (`SCHED_FIFO` or `SCHED_RR`) at `priority`, with `SCHED_RESET_ON_FORK`, and returns
/// the guard that restores them. Threads that exited (`ESRCH`) and duplicates are skipped. On
/// any other error (`EPERM` without `CAP_SYS_NICE`, `EINVAL` for a bad priority) the threads
/// raised so far are put back and the error is returned.
pub fn raise_threads(tids: &[Tid], policy: i32, priority: i32) -> io::Result<Raised> {
    raise_threads_noted(tids, policy, priority, |_| true)
}

/// [`raise_threads`], telling `note` first: once the policies are read and before any thread
/// is changed, `note` gets each thread to raise with the policy it has now (a journal kept
/// where someone can put them back should this process die before it does, e.g. a watchdog
/// process). If `note` returns `false`, nothing is raised (an empty guard is returned).
pub fn raise_threads_noted(
    tids: &[Tid],
    policy: i32,
    priority: i32,
    note: impl FnOnce(&[(Tid, ThreadPolicy)]) -> bool,
) -> io::Result<Raised> {
    let mut plan: Vec<(Tid, ThreadPolicy)> = Vec::with_capacity(tids.len());
    for &tid in tids {
        if plan.iter().any(|t| t.0 == tid) {
            continue;
        }
        match thread_policy(tid) {
            Ok(before) if before.is_time_sharing() => plan.push((tid, before)),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    let mut raised = Raised::default();
    if plan.is_empty() || !note(&plan) {
        return Ok(raised);
    }
    let to = ThreadPolicy::raised(policy, priority);
    for (tid, before) in plan {
        match set_thread_policy(tid, to) {
            Ok(()) => raised.threads.push((tid, before)),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(raised)
}

/// Puts thread `tid` back to `before` if its policy is still `raised` (what a raise set it
/// to): for a watchdog undoing the raise of a process that died, which must not undo a change
/// made since by someone else (the thread itself). Returns whether it put it back; a thread
/// that exited (`ESRCH`) was not.
pub fn put_back_if_raised(
    tid: Tid,
    before: ThreadPolicy,
    raised: ThreadPolicy,
) -> io::Result<bool> {
    let now = match thread_policy(tid) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
        Err(e) => return Err(e),
    };
    if now != raised {
        return Ok(false);
    }
    match set_thread_policy(tid, before) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The thread IDs of process `pid` (`/proc/PID/task`), sorted.
///
/// The kernel lists `/proc/PID/task` by position, so a thread that exits while the directory
/// is read can make a live thread after it be skipped (seen here: the calling thread missing
/// from its own process's list while other threads exited). So the directory is read until a
/// reading adds no thread to the ones already seen (at most [`LISTINGS`] readings), and the
/// union is returned: it may name a thread that has exited since (callers meet `ESRCH`), and a
/// live thread is missed only if every reading skipped it.
pub fn process_threads(pid: i32) -> io::Result<Vec<Tid>> {
    let mut tids: Vec<Tid> = Vec::new();
    for _ in 0..LISTINGS {
        let before = tids.len();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
                tids.push(tid);
            }
        }
        tids.sort_unstable();
        tids.dedup();
        if before > 0 && tids.len() == before {
            break;
        }
    }
    Ok(tids)
}

/// How many times [`process_threads`] reads `/proc/PID/task` at most.
pub const LISTINGS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread that waits until the returned sender sends (or is dropped), and its ID.
    fn waiting_thread() -> (
        Tid,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
            let _ = done_rx.recv();
        });
        (rx.recv().unwrap(), done_tx, worker)
    }

    /// Needs CAP_SYS_NICE: without it, the raise must fail with EPERM and leave the thread as
    /// it was.
    #[test]
    fn a_raised_thread_is_real_time_until_restored() {
        let (tid, done_tx, worker) = waiting_thread();
        let before = thread_policy(tid).unwrap();
        assert_eq!(before.base(), SCHED_OTHER);
        match raise_threads(&[tid, tid, i32::MAX], SCHED_FIFO, 1) {
            Ok(raised) => {
                // The duplicate and the thread that does not exist are skipped.
                assert_eq!(raised.threads().collect::<Vec<_>>(), vec![tid]);
                let during = thread_policy(tid).unwrap();
                assert_eq!(during.base(), SCHED_FIFO);
                assert_eq!(during.priority, 1);
                assert_ne!(during.policy & SCHED_RESET_ON_FORK, 0);
                raised.restore().unwrap();
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("SKIP: raising a thread needs CAP_SYS_NICE ({e})");
            }
            Err(e) => panic!("raising the thread: {e}"),
        }
        assert_eq!(thread_policy(tid).unwrap(), before);
        // Dropping the guard restores too.
        if let Ok(raised) = raise_threads(&[tid], SCHED_RR, 2) {
            assert_eq!(thread_policy(tid).unwrap().base(), SCHED_RR);
            drop(raised);
            assert_eq!(thread_policy(tid).unwrap(), before);
        }
        // Two raises merged into one guard; one thread put back on its own.
        if let (Ok(mut first), Ok(second)) = (
            raise_threads(&[tid], SCHED_FIFO, 1),
            raise_threads(&[gettid()], SCHED_FIFO, 1),
        ) {
            first.merge(second);
            assert_eq!(first.len(), 2);
            first.restore_thread(tid).unwrap();
            assert_eq!(thread_policy(tid).unwrap(), before);
            assert_eq!(thread_policy(gettid()).unwrap().base(), SCHED_FIFO);
            first.restore().unwrap();
            assert_eq!(thread_policy(gettid()).unwrap().base(), SCHED_OTHER);
        }
        done_tx.send(()).unwrap();
        worker.join().unwrap();
    }

    #[test]
    fn a_refused_note_raises_nothing_and_a_put_back_undoes_only_a_raise() {
        let (tid, done_tx, worker) = waiting_thread();
        let before = thread_policy(tid).unwrap();
        let mut noted = Vec::new();
        let raised = raise_threads_noted(&[tid, tid], SCHED_FIFO, 1, |plan| {
            noted = plan.to_vec();
            false
        })
        .unwrap();
        assert!(raised.is_empty());
        assert_eq!(noted, vec![(tid, before)]);
        assert_eq!(thread_policy(tid).unwrap(), before);
        // Not at the raised policy: left alone, whatever the journal says it was.
        let to = ThreadPolicy::raised(SCHED_FIFO, 1);
        let batch = ThreadPolicy {
            policy: SCHED_BATCH,
            priority: 0,
        };
        assert!(!put_back_if_raised(tid, batch, to).unwrap());
        assert_eq!(thread_policy(tid).unwrap(), before);
        match set_thread_policy(tid, to) {
            Ok(()) => {
                assert!(put_back_if_raised(tid, before, to).unwrap());
                assert_eq!(thread_policy(tid).unwrap(), before);
            }
            Err(e) => eprintln!("SKIP: raising a thread needs CAP_SYS_NICE ({e})"),
        }
        done_tx.send(()).unwrap();
        worker.join().unwrap();
        // A thread that is gone: nothing to put back.
        assert!(!put_back_if_raised(i32::MAX, before, to).unwrap());
    }

    #[test]
    fn a_bad_priority_raises_nothing() {
        let tid = gettid();
        let before = thread_policy(tid).unwrap();
        let e = raise_threads(&[tid], SCHED_FIFO, 1000).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM)),
            "{e}"
        );
        assert_eq!(thread_policy(tid).unwrap(), before);
    }

    #[test]
    fn this_process_lists_its_own_thread() {
        let tids = process_threads(std::process::id() as i32).unwrap();
        assert!(tids.contains(&gettid()));
    }
}
