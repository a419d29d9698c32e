//! The receiver raises its threads to `SCHED_FIFO` when the sender marks the final round
//! (ROUND_BEGIN's final-round flag), for that round and the acknowledgement only, and puts them
//! back when the transfer ends: completed, failed on a cut final round, or cut and waiting for
//! a resume. Needs `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` of at least 1) to raise; without it
//! the tests check that nothing was raised and that the report says it was refused, and print
//! a loud SKIP for the rest.

mod common;

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use precopy_sys::sched::{self, Tid};
use precopy_transfer::*;

const BASE: u64 = 0x7000_0000;
const PAGES: usize = 64;

/// One call into the receiving sink: what it was, the round it fell in, the thread that made
/// it and whether that thread ran at a real-time policy then.
#[derive(Debug, Clone)]
struct Call {
    what: &'static str,
    round: Option<u64>,
    tid: Tid,
    realtime: bool,
}

type Calls = Arc<Mutex<Vec<Call>>>;

/// A [`MemorySink`] that notes the calling thread's policy at every call.
struct Watched {
    inner: MemorySink,
    calls: Calls,
    round: Option<u64>,
}

impl Watched {
    fn note(&self, what: &'static str) {
        let tid = sched::gettid();
        let realtime = sched::thread_policy(tid).unwrap().is_realtime();
        self.calls.lock().unwrap().push(Call {
            what,
            round: self.round,
            tid,
            realtime,
        });
    }
}

impl Sink for Watched {
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        self.round = Some(round);
        self.note("begin_round");
        self.inner.begin_round(round)
    }
    fn expect_round(&mut self, pages: u64) -> Result<(), TransferError> {
        self.inner.expect_round(pages)
    }
    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        hashes: &[PageHash],
    ) -> Result<(), TransferError> {
        self.note("pages");
        self.inner.send_pages(offset, pages, hashes)
    }
    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        self.note("pages");
        self.inner.send_zero_range(range)
    }
    fn end_round(&mut self, round: u64) -> Result<u64, TransferError> {
        self.note("end_round");
        self.round = None;
        self.inner.end_round(round)
    }
    fn finish(&mut self, checksum: u64, check: FinalCheck) -> Result<(), TransferError> {
        self.note("finish");
        self.inner.finish(checksum, check)
    }
    fn finish_uncommitted(
        &mut self,
        checksum: u64,
        check: FinalCheck,
    ) -> Result<(), TransferError> {
        self.note("finish");
        self.inner.finish_uncommitted(checksum, check)
    }
    fn commit(&mut self) -> Result<(), TransferError> {
        self.note("commit");
        self.inner.commit()
    }
    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        self.inner.send_state(state)
    }
    fn retain(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
        self.inner.retain(memory)
    }
    fn resume_digests(&self, block_pages: u64) -> Option<Vec<u64>> {
        // Asked on the receiver's own thread once the cut set of connections is done with.
        self.note("resume_digests");
        self.inner.resume_digests(block_pages)
    }
    fn reopen(&mut self) {
        self.inner.reopen()
    }
}

/// Whether this process may raise a thread to `SCHED_FIFO` 1 (tried on a throwaway thread).
fn may_raise() -> bool {
    std::thread::spawn(|| match sched::raise_threads(&[sched::gettid()], sched::SCHED_FIFO, 1) {
        Ok(r) => {
            r.restore().unwrap();
            true
        }
        Err(e) => {
            eprintln!("SKIP (in part): raising a thread to SCHED_FIFO is not permitted here ({e}); checking only that nothing was raised");
            false
        }
    })
    .join()
    .unwrap()
}

/// Runs a receiver (on its own thread) into a [`Watched`] sink; returns the run's result, the
/// calls and whether the receiver's thread was real-time right after the run returned.
fn spawn_watched(
    listener: Listener,
    config: ReceiverConfig,
    resumable: bool,
) -> std::thread::JoinHandle<(Result<ReceiveReport, TransferError>, Vec<Call>, bool)> {
    std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &config).unwrap();
        let calls = Calls::default();
        let mut sink = Watched {
            inner: MemorySink::new(rx.layout().clone()).unwrap(),
            calls: calls.clone(),
            round: None,
        };
        let result = if resumable {
            rx.run_resumable(&listener, &mut sink)
        } else {
            rx.run(&mut sink)
        };
        let after = sched::thread_policy(sched::gettid()).unwrap().is_realtime();
        let calls = calls.lock().unwrap().clone();
        (result, calls, after)
    })
}

fn sender(connect: &dyn Fn() -> Connection, streams: usize) -> Sender<SliceSource<Vec<u8>>> {
    let config = SenderConfig {
        streams,
        batch_pages: 4,
        ..sender_config()
    };
    let layout = Layout::single(PS, BASE, PAGES as u64 * PS).unwrap();
    let conns = (0..streams).map(|_| connect()).collect();
    Sender::connect(
        conns,
        layout,
        SliceSource::new(BASE, memory(PAGES, 3)),
        &config,
    )
    .unwrap()
}

/// Every call made in a round before `final_round` ran at the thread's own policy, and every
/// call from the final round's start on ran real-time when raising is permitted (else none).
fn check_calls(calls: &[Call], final_round: u64, permitted: bool) {
    assert!(
        calls.iter().any(|c| c.round == Some(final_round)),
        "the final round reached the sink: {calls:?}"
    );
    let mut in_final = false;
    for c in calls {
        if c.round == Some(final_round) {
            in_final = true;
        }
        if c.what == "resume_digests" {
            assert!(!c.realtime, "still real-time after the cut: {c:?}");
            continue;
        }
        let expected = in_final && permitted;
        assert_eq!(
            c.realtime, expected,
            "{c:?}: real-time exactly from the final round's start (permitted: {permitted})"
        );
    }
}

/// Threads the sink saw still alive after the run are not real-time (exited ones have no
/// policy left; each put itself back before it exited).
fn check_restored(calls: &[Call]) {
    for c in calls {
        if let Ok(p) = sched::thread_policy(c.tid) {
            assert!(!p.is_realtime(), "thread {} left real-time: {p:?}", c.tid);
        }
    }
}

#[test]
fn receiver_threads_are_real_time_exactly_for_the_final_round_and_the_acknowledgement() {
    let permitted = may_raise();
    for streams in [1, 2] {
        let (listener, connect, _dir) = listen(&Net::Unix);
        let rx = spawn_watched(listener, receiver_config(), false);
        let mut tx = sender(&*connect, streams);
        let all = BASE..BASE + PAGES as u64 * PS;
        tx.send_round(std::slice::from_ref(&all)).unwrap();
        tx.send_round(&[BASE..BASE + 8 * PS]).unwrap();
        tx.expect_final_round();
        tx.send_round(&[BASE + 8 * PS..BASE + 24 * PS]).unwrap();
        // A round after the final one (a pause check's resend) is still the final phase.
        tx.send_round(&[BASE..BASE + 2 * PS]).unwrap();
        tx.finish(FinalCheck::Recorded).unwrap();
        let (result, calls, after) = rx.join().unwrap();
        let report = result.unwrap();
        check_calls(&calls, 2, permitted);
        assert!(calls.iter().any(|c| c.what == "commit"), "{calls:?}");
        assert!(!after, "the receiver's own thread is put back after COMMIT");
        check_restored(&calls);
        let raised = report.final_priority.expect("a final round was marked");
        assert_eq!(raised.priority, 1);
        assert_eq!(raised.refused, !permitted);
        if permitted {
            // The receiver's own thread and each connection's (and, with two, each reader).
            assert!(raised.threads as usize > streams, "{raised:?}");
        } else {
            assert_eq!(raised.threads, 0);
        }
    }
}

#[test]
fn a_transfer_without_a_final_round_mark_raises_nothing() {
    let (listener, connect, _dir) = listen(&Net::Unix);
    let rx = spawn_watched(listener, receiver_config(), false);
    let mut tx = sender(&*connect, 1);
    tx.send_round(&[BASE..BASE + PAGES as u64 * PS]).unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.finish(FinalCheck::Recorded).unwrap();
    let (result, calls, _) = rx.join().unwrap();
    assert_eq!(result.unwrap().final_priority, None);
    assert!(calls.iter().all(|c| !c.realtime), "{calls:?}");
}

#[test]
fn a_receiver_told_not_to_raise_keeps_its_threads_priority() {
    let (listener, connect, _dir) = listen(&Net::Unix);
    let config = ReceiverConfig {
        final_priority: None,
        ..receiver_config()
    };
    let rx = spawn_watched(listener, config, false);
    let mut tx = sender(&*connect, 1);
    tx.send_round(&[BASE..BASE + PAGES as u64 * PS]).unwrap();
    tx.expect_final_round();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.finish(FinalCheck::Recorded).unwrap();
    let (result, calls, _) = rx.join().unwrap();
    assert_eq!(result.unwrap().final_priority, None);
    assert!(calls.iter().all(|c| !c.realtime), "{calls:?}");
}

/// The sender marks the final round, sends part of it and vanishes.
fn cut_final_round(connect: &dyn Fn() -> Connection, streams: usize) {
    let mut tx = sender(connect, streams);
    tx.send_round(&[BASE..BASE + PAGES as u64 * PS]).unwrap();
    tx.expect_final_round();
    tx.begin_round().unwrap();
    tx.send_dirty(&[BASE..BASE + 16 * PS]).unwrap();
    // Let the pages arrive before the connections close (not needed for the check: a cut
    // before any page still raised at ROUND_BEGIN).
    std::thread::sleep(Duration::from_millis(50));
    drop(tx);
}

#[test]
fn a_cut_final_round_puts_the_receiver_threads_back() {
    let permitted = may_raise();
    for streams in [1, 2] {
        let (listener, connect, _dir) = listen(&Net::Unix);
        let rx = spawn_watched(listener, receiver_config(), false);
        cut_final_round(&*connect, streams);
        let (result, calls, after) = rx.join().unwrap();
        assert!(result.is_err(), "a cut transfer fails");
        check_calls(&calls, 1, permitted);
        assert!(
            !after,
            "the receiver's own thread is put back after the cut"
        );
        check_restored(&calls);
    }
}

#[test]
fn a_cut_final_round_waiting_for_a_resume_runs_at_the_threads_own_priority() {
    let permitted = may_raise();
    let (listener, connect, _dir) = listen(&Net::Unix);
    let config = ReceiverConfig {
        resume_wait: Duration::from_millis(300),
        ..receiver_config()
    };
    let rx = spawn_watched(listener, config, true);
    cut_final_round(&*connect, 1);
    let (result, calls, after) = rx.join().unwrap();
    assert!(
        matches!(result, Err(TransferError::ResumeTimedOut { .. })),
        "{result:?}"
    );
    assert!(
        calls.iter().any(|c| c.what == "resume_digests"),
        "the receiver waited for a resume: {calls:?}"
    );
    check_calls(&calls, 1, permitted);
    assert!(!after);
    check_restored(&calls);
}
