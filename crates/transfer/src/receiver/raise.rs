//! The receiver's threads at a real-time priority for the final phase.
//!
//! The sender marks the ROUND_BEGIN of the round it sends with its workload paused
//! ([`RoundBegin::final_round`](crate::protocol::RoundBegin)). From that frame until the
//! transfer's connections are done with (committed, failed or cut), every thread the receiver
//! runs the transfer on (each connection's frame thread, each socket reader, and the thread that
//! checks FINISH, sends DONE and waits for COMMIT) runs at `SCHED_FIFO`
//! ([`ReceiverConfig::final_priority`](crate::ReceiverConfig::final_priority)), where the
//! process may (`CAP_SYS_NICE` or an `RLIMIT_RTPRIO` at least the priority). Each thread is
//! put back to the policy it had before it exits, while its ID still names it (a thread ID
//! is reused once the thread is gone); raised threads carry `SCHED_RESET_ON_FORK`, so nothing
//! they start inherits the policy. Kernel facts: [`precopy_sys::sched`].

use std::sync::Mutex;

use precopy_sys::sched::{self, Raised, Tid};
use serde::Serialize;

use super::lock;

/// What the receiver did with its threads' priority for the final phase (in
/// [`ReceiveReport::final_priority`](crate::ReceiveReport::final_priority)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FinalRaiseReport {
    /// The `SCHED_FIFO` priority asked.
    pub priority: u8,
    /// Threads raised (none when not permitted).
    pub threads: u32,
    /// Raising was refused (without `CAP_SYS_NICE` or a high enough `RLIMIT_RTPRIO`); the
    /// threads kept their own priority, and a warning named the cause.
    pub refused: bool,
}

/// The threads of one set of connections and whether the final phase raised them.
pub(super) struct FinalRaise {
    /// `None`: never raise.
    priority: Option<u8>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Threads running the transfer now.
    enlisted: Vec<Tid>,
    raised: Raised,
    /// A final ROUND_BEGIN arrived: threads enlisting from now on are raised too.
    active: bool,
    /// Threads raised in all.
    count: u32,
    refused: bool,
}

impl FinalRaise {
    pub(super) fn new(priority: Option<u8>) -> FinalRaise {
        FinalRaise {
            priority,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Counts the calling thread in until the guard drops (then it is put back, if raised).
    pub(super) fn enlist(&self) -> Enlisted<'_> {
        let tid = sched::gettid();
        let mut inner = lock(&self.inner);
        inner.enlisted.push(tid);
        if inner.active {
            self.raise(&mut inner, &[tid]);
        }
        Enlisted { owner: self, tid }
    }

    /// A final ROUND_BEGIN arrived (on any connection): raises every enlisted thread not raised
    /// yet. Called once per connection; the first call does the work.
    pub(super) fn begin_final(&self) {
        let mut inner = lock(&self.inner);
        if inner.active {
            return;
        }
        inner.active = true;
        let tids = inner.enlisted.clone();
        self.raise(&mut inner, &tids);
    }

    fn raise(&self, inner: &mut Inner, tids: &[Tid]) {
        let Some(priority) = self.priority else {
            return;
        };
        if inner.refused {
            return;
        }
        match sched::raise_threads(tids, sched::SCHED_FIFO, priority.into()) {
            Ok(r) => {
                inner.count += r.len() as u32;
                inner.raised.merge(r);
            }
            Err(e) => {
                inner.refused = true;
                tracing::warn!(
                    error = %e,
                    priority,
                    "the final round began, but the receiver's threads could not be raised to SCHED_FIFO (needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least the priority); they keep their own"
                );
            }
        }
    }

    /// What was done, once a final round began (`None` before, or when never raising).
    pub(super) fn report(&self) -> Option<FinalRaiseReport> {
        let inner = lock(&self.inner);
        let priority = self.priority?;
        inner.active.then_some(FinalRaiseReport {
            priority,
            threads: inner.count,
            refused: inner.refused,
        })
    }
}

/// A thread counted in by [`FinalRaise::enlist`]; dropping it puts the thread back.
pub(super) struct Enlisted<'a> {
    owner: &'a FinalRaise,
    tid: Tid,
}

impl Drop for Enlisted<'_> {
    fn drop(&mut self) {
        let mut inner = lock(&self.owner.inner);
        inner.enlisted.retain(|&t| t != self.tid);
        if let Err(e) = inner.raised.restore_thread(self.tid) {
            tracing::warn!(error = %e, tid = self.tid, "putting a receiver thread back to its own priority failed");
        }
    }
}
