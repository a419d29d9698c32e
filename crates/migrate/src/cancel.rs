//! Bounding the driver's blocking steps: a [`CancelHandle`] an embedder can use from any thread,
//! and the watchdog thread that enforces the driver's deadlines.
//!
//! Neither can stop a blocked system call by itself. Both call the transport's
//! [`Interrupt`](crate::Interrupt) ([`Transport::interrupter`](crate::Transport::interrupter)),
//! which for a socket transport shuts its connections down: every blocked read or write then
//! returns at once, the transport's call fails, and the driver turns that failure into
//! [`Error::Cancelled`](crate::Error::Cancelled) or [`Error::Timeout`](crate::Error::Timeout),
//! resumes the workload and returns.
//!
//! The watchdog also keeps a softer deadline, which breaks nothing: when it passes, it cuts
//! the round in progress short ([`Transport::round_cutter`](crate::Transport::round_cutter)),
//! for the total timeout under [`LimitPolicy::SwitchOver`](crate::LimitPolicy::SwitchOver).

use crate::control::Interrupt;
use crate::error::Step;
use precopy_sys::sched::Tid;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why the watchdog interrupted the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fired {
    /// [`CancelHandle::cancel`] was called.
    Cancelled,
    /// The deadline of this step passed; it was this long.
    Deadline(Step, Duration),
}

#[derive(Default)]
struct State {
    /// The armed deadline: when, for which step, and the limit it stands for.
    deadline: Option<(Instant, Step, Duration)>,
    fired: Option<Fired>,
    cancelled: bool,
    interrupt: Option<Interrupt>,
    /// The armed round cut ([`Watchdog::arm_cut`]), and whether it was made.
    cut_at: Option<Instant>,
    cut: bool,
    cutter: Option<Interrupt>,
    exit: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Cancels a running [`Migration`](crate::Migration) from another thread: get it with
/// [`Migration::cancel_handle`](crate::Migration::cancel_handle) before calling `run`.
///
/// A cancel interrupts whatever step is running (a blocked send or wait for the destination
/// returns at once with a socket transport) and the migration ends with
/// [`Error::Cancelled`](crate::Error::Cancelled): throttle lifted, workload resumed, destination
/// never told its copy is complete. A cancel after the destination committed has no effect.
#[derive(Clone, Default)]
pub struct CancelHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelHandle")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelHandle {
    /// Asks the migration to stop now. Returns at once; calling it again does nothing more.
    pub fn cancel(&self) {
        let mut st = self.shared.lock();
        st.cancelled = true;
        if st.fired.is_none() {
            st.fired = Some(Fired::Cancelled);
            if let Some(i) = &st.interrupt {
                i();
            }
        }
        self.shared.cv.notify_all();
    }

    /// Whether [`CancelHandle::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.shared.lock().cancelled
    }
}

/// The driver's side: arms deadlines, and runs a thread that interrupts the transport when one
/// passes.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The watchdog thread's ID, for its scheduling priority: the driver raises it above the
    /// final phase's threads (see [`FinalPriority`](crate::FinalPriority)).
    tid: Option<Tid>,
}

impl Watchdog {
    /// Starts the watchdog for `handle`'s migration; `interrupt` stops the transport,
    /// `cutter` cuts its round in progress short.
    pub(crate) fn start(
        handle: &CancelHandle,
        interrupt: Option<Interrupt>,
        cutter: Option<Interrupt>,
    ) -> Watchdog {
        let shared = handle.shared.clone();
        {
            let mut st = shared.lock();
            st.interrupt = interrupt;
            st.cutter = cutter;
            st.cut_at = None;
            st.cut = false;
            st.exit = false;
            if st.cancelled
                && let Some(i) = &st.interrupt
            {
                i();
            }
        }
        let s = shared.clone();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("precopy-watchdog".into())
            .spawn(move || {
                let _ = tid_tx.send(precopy_sys::sched::gettid());
                watch(&s)
            })
            .ok();
        let tid = thread.as_ref().and_then(|_| tid_rx.recv().ok());
        Watchdog {
            shared,
            thread,
            tid,
        }
    }

    /// The watchdog thread's ID (`None` if it could not be started).
    pub(crate) fn tid(&self) -> Option<Tid> {
        self.tid
    }

    /// Interrupts the transport at `at` unless disarmed first; the error will name `step` and
    /// `limit`. Replaces any armed deadline.
    pub(crate) fn arm(&self, at: Instant, step: Step, limit: Duration) {
        self.shared.lock().deadline = Some((at, step, limit));
        self.shared.cv.notify_all();
    }

    /// Cuts the transport's round in progress short at `at` (once) unless disarmed first;
    /// returns `false` if it has no way to (no cutter).
    pub(crate) fn arm_cut(&self, at: Instant) -> bool {
        let mut st = self.shared.lock();
        if st.cutter.is_none() {
            return false;
        }
        st.cut_at = Some(at);
        drop(st);
        self.shared.cv.notify_all();
        true
    }

    /// Disarms the round cut. Returns whether it was made before: from then on no cut comes.
    pub(crate) fn disarm_cut(&self) -> bool {
        let mut st = self.shared.lock();
        st.cut_at = None;
        st.cut
    }

    /// Renames the step of the armed deadline (same instant).
    pub(crate) fn step(&self, step: Step) {
        if let Some(d) = &mut self.shared.lock().deadline {
            d.1 = step;
        }
    }

    /// Disarms the deadline. Returns what fired before, if anything did: from then on the
    /// step's outcome stands (no interrupt can come after a `None`, except a cancel).
    pub(crate) fn disarm(&self) -> Option<Fired> {
        let mut st = self.shared.lock();
        st.deadline = None;
        st.fired
    }

    /// What fired so far.
    pub(crate) fn fired(&self) -> Option<Fired> {
        self.shared.lock().fired
    }

    /// Sleeps `d` unless something fires first; returns what fired.
    pub(crate) fn sleep(&self, d: Duration) -> Option<Fired> {
        let end = Instant::now() + d;
        let mut st = self.shared.lock();
        loop {
            let now = Instant::now();
            if st.fired.is_some() || now >= end {
                return st.fired;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.exit = true;
            st.deadline = None;
            st.interrupt = None;
            st.cut_at = None;
            st.cutter = None;
        }
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.exit {
            return;
        }
        let cut_wait = match st.cut_at {
            Some(at) if !st.cut => {
                let now = Instant::now();
                if now >= at {
                    st.cut = true;
                    st.cut_at = None;
                    tracing::info!("the timeout passed: cutting the round in progress short");
                    if let Some(c) = &st.cutter {
                        c();
                    }
                    None
                } else {
                    Some(at - now)
                }
            }
            _ => None,
        };
        let wait = match st.deadline {
            Some((at, step, limit)) if st.fired.is_none() => {
                let now = Instant::now();
                if now >= at {
                    st.fired = Some(Fired::Deadline(step, limit));
                    // Not a warning: the migration fails with this deadline as its error,
                    // which the caller reports (a warning would say it twice).
                    tracing::info!(%step, ?limit, "deadline passed: interrupting the transport");
                    if let Some(i) = &st.interrupt {
                        i();
                    }
                    shared.cv.notify_all();
                    None
                } else {
                    Some(at - now)
                }
            }
            _ => None,
        };
        let wait = match (wait, cut_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        st = match wait {
            Some(d) => {
                shared
                    .cv
                    .wait_timeout(st, d)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => shared.cv.wait(st).unwrap_or_else(PoisonError::into_inner),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    fn counter() -> (Arc<AtomicUsize>, Interrupt) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (
            n,
            Arc::new(move || {
                m.fetch_add(1, SeqCst);
            }),
        )
    }

    #[test]
    fn a_passed_deadline_interrupts_once_and_names_the_step() {
        let handle = CancelHandle::default();
        let (n, i) = counter();
        let w = Watchdog::start(&handle, Some(i), None);
        let step = Step::Round { round: 3 };
        w.arm(Instant::now(), step, Duration::from_secs(1));
        // The watchdog thread fires; sleep returns as soon as it has.
        let fired = w.sleep(Duration::from_secs(600));
        assert_eq!(fired, Some(Fired::Deadline(step, Duration::from_secs(1))));
        assert_eq!(w.disarm(), fired);
        assert_eq!(n.load(SeqCst), 1);
    }

    #[test]
    fn cancel_interrupts_and_wakes_a_sleeper() {
        let handle = CancelHandle::default();
        let (n, i) = counter();
        let w = Watchdog::start(&handle, Some(i), None);
        let h2 = handle.clone();
        let t = std::thread::spawn(move || h2.cancel());
        assert_eq!(w.sleep(Duration::from_secs(600)), Some(Fired::Cancelled));
        t.join().unwrap();
        handle.cancel();
        assert_eq!(n.load(SeqCst), 1, "interrupted once");
        assert!(handle.is_cancelled());
    }

    /// The round cut breaks nothing: it calls the cutter, never the interrupt, fires no
    /// deadline, and is made once.
    #[test]
    fn an_armed_cut_cuts_the_round_once_and_interrupts_nothing() {
        let handle = CancelHandle::default();
        let (interrupts, i) = counter();
        let (cuts, c) = counter();
        let w = Watchdog::start(&handle, Some(i), Some(c));
        assert!(w.arm_cut(Instant::now()));
        let until = Instant::now() + Duration::from_secs(30);
        while cuts.load(SeqCst) == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(w.disarm_cut(), "the cut was made");
        assert_eq!((cuts.load(SeqCst), interrupts.load(SeqCst)), (1, 0));
        assert_eq!(w.fired(), None);
        let none = Watchdog::start(&CancelHandle::default(), None, None);
        assert!(!none.arm_cut(Instant::now()), "nothing to cut with");
    }

    #[test]
    fn disarmed_deadline_never_fires() {
        let handle = CancelHandle::default();
        let (n, i) = counter();
        let w = Watchdog::start(&handle, Some(i), None);
        w.arm(
            Instant::now() + Duration::from_millis(20),
            Step::FinalRound,
            Duration::from_millis(20),
        );
        assert_eq!(w.disarm(), None);
        assert_eq!(w.sleep(Duration::from_millis(60)), None);
        assert_eq!(n.load(SeqCst), 0);
    }
}
