//! The pause check (crate docs, "The pause check"): a workload that writes after the final scan,
//! although it was paused, is caught by a scan of the real dirty log (uffd async
//! write-protect over private anonymous memory) before the commit. Its pages are sent and the
//! copy is exact, or the migration fails, the workload is resumed and the destination is never
//! told to commit. Never a completed migration with a copy that differs.
//!
//! The "workload resumed from outside" is simulated deterministically: the writers are parked
//! by the pause as usual, and a write to the guest's memory is made right after a scan with
//! the workload paused (or while the state is saved), as a process sent `SIGCONT` at that
//! moment would.

mod common;

use common::{Guest, PAGE, Pattern, receive, supported};
use precopy_migrate::{
    AfterMigration, Callbacks, CollectStats, DirtyLog, Error, Migration, MigrationConfig,
    PAUSE_CHECK_SENDS, Status, TrackingError, TransferTransport, UffdDirtyLog, Workload,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::mem::Mapping;
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{
    Connection, Layout, Listener, ProcessMemory, Sender, SenderConfig, TransferError,
};
use std::convert::Infallible;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

/// When the sneaky writer writes, while the workload is paused.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sneak {
    /// Once, right after the first scan with the workload paused (the final scan).
    OnceAfterTheFinalScan,
    /// After every scan with the workload paused: a writer that never stops.
    AfterEveryScan,
    /// Once, while the state is saved (after the first check scan, before the commit).
    DuringTheState,
}

/// The engine's dirty log, plus a write to the tracked memory right after a collection made
/// with the workload paused, as a writer that was not really stopped makes.
struct SneakyLog {
    inner: UffdDirtyLog,
    mem: Arc<Mapping>,
    paused: Arc<AtomicBool>,
    sneak: Sneak,
    writes: Arc<AtomicU64>,
}

/// Writes the `n`-th sneaky write: a distinct value in a distinct page near the end of
/// memory (the guest's writers use all of it, but they are parked by now).
fn sneaky_write(mem: &Mapping, n: u64) {
    let pages = mem.len() / PAGE;
    let page = pages - 1 - (n % (pages / 2));
    mem.write_u64(page * PAGE + 8 * (n % 64), 0x5ea_0000_0000 | n)
        .unwrap();
}

impl DirtyLog for SneakyLog {
    type Error = TrackingError;
    fn memory(&self) -> Vec<Range<u64>> {
        self.inner.memory()
    }
    fn page_size(&self) -> u64 {
        self.inner.page_size()
    }
    fn start(&mut self) -> Result<(), TrackingError> {
        self.inner.start()
    }
    fn stop(&mut self) -> Result<(), TrackingError> {
        self.inner.stop()
    }
    fn unvouched(&self) -> Vec<Range<u64>> {
        self.inner.unvouched()
    }
    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats, TrackingError> {
        let stats = self.inner.collect(out)?;
        let n = self.writes.load(SeqCst);
        let write = self.paused.load(SeqCst)
            && match self.sneak {
                Sneak::OnceAfterTheFinalScan => n == 0,
                Sneak::AfterEveryScan => true,
                Sneak::DuringTheState => false,
            };
        if write {
            sneaky_write(&self.mem, n);
            self.writes.fetch_add(1, SeqCst);
        }
        Ok(stats)
    }
}

/// The guest's own pause and resume, remembering whether it is paused; with
/// [`Sneak::DuringTheState`] the state hook writes to memory once.
struct Watched {
    inner: Callbacks<Infallible>,
    paused: Arc<AtomicBool>,
    resumes: Arc<AtomicU64>,
}

impl Workload for Watched {
    type Error = Infallible;
    fn pause(&mut self) -> Result<(), Infallible> {
        self.inner.pause()?;
        self.paused.store(true, SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Infallible> {
        self.paused.store(false, SeqCst);
        self.resumes.fetch_add(1, SeqCst);
        self.inner.resume()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, Infallible> {
        self.inner.save_state()
    }
}

struct Outcome {
    result:
        Result<precopy_migrate::MigrationReport, Error<TrackingError, TransferError, Infallible>>,
    report: precopy_migrate::MigrationReport,
    received: common::Received,
    source: Vec<u8>,
    sneaky_writes: u64,
    resumes: u64,
    guest_paused: bool,
}

fn migrate(sneak: Sneak) -> Outcome {
    let guest = Guest::start(4 << 20, 2, Pattern::HotSet, 2000.0);
    // Removed with its directory however the test ends.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pause-check.sock");
    let listener = Listener::bind_unix(&path).unwrap();
    let rx = receive(listener, None);

    let mut tracker = Tracker::new(Uffd::new().unwrap());
    tracker.register(guest.mem.range()).unwrap();
    let scanner = Scanner::new(ScanOptions::default()).unwrap();
    let layout = Layout::single(PAGE, guest.mem.addr(), guest.mem.len()).unwrap();
    let config = SenderConfig {
        key: Some(common::test_key()),
        ..SenderConfig::default()
    };
    let sender = Sender::connect(
        vec![Connection::connect_unix(&path).unwrap()],
        layout,
        Box::new(ProcessMemory::current()),
        &config,
    )
    .unwrap();
    let paused = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let resumes = Arc::new(AtomicU64::new(0));
    let mut inner = guest.callbacks();
    if sneak == Sneak::DuringTheState {
        let (mem, writes) = (guest.mem.clone(), writes.clone());
        inner = inner.with_state(move || {
            sneaky_write(&mem, writes.fetch_add(1, SeqCst));
            Ok(b"state".to_vec())
        });
    }
    let log = SneakyLog {
        inner: UffdDirtyLog::new(tracker, scanner),
        mem: guest.mem.clone(),
        paused: paused.clone(),
        sneak,
        writes: writes.clone(),
    };
    let workload = Watched {
        inner,
        paused: paused.clone(),
        resumes: resumes.clone(),
    };
    let config = MigrationConfig {
        max_downtime: Duration::from_millis(50),
        // Only the final round pauses the workload.
        probe_pause: false,
        after: AfterMigration::Stop,
        ..MigrationConfig::default()
    };
    let mut m = Migration::new(log, TransferTransport::new(sender), workload, config);
    let result = m.run();
    let report = m.report().clone();
    let guest_paused = guest.is_paused();
    // Paused or not, the sneaky writer is done: this is the source's memory now (the guest's
    // writers may run again after a failure, so compare only after a success).
    let source = guest.snapshot();
    drop(m);
    let received = rx.join().unwrap();
    Outcome {
        result,
        report,
        received,
        source,
        sneaky_writes: writes.load(SeqCst),
        resumes: resumes.load(SeqCst),
        guest_paused,
    }
}

fn differing_pages(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    a.chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .filter(|(x, y)| x != y)
        .count()
}

#[test]
fn a_write_after_the_final_scan_is_found_by_the_check_and_sent() {
    if !supported("a_write_after_the_final_scan_is_found_by_the_check_and_sent") {
        return;
    }
    let o = migrate(Sneak::OnceAfterTheFinalScan);
    let report = o.result.as_ref().expect("the migration completes");
    assert_eq!(report.status, Status::Completed);
    assert_eq!(o.sneaky_writes, 1, "one write after the final scan");
    assert!(o.guest_paused, "left paused (AfterMigration::Stop)");
    let (dest, rx) = o.received.as_ref().expect("the receiver completes");
    assert_eq!(Some(rx.checksum), report.checksum);
    assert_eq!(
        differing_pages(dest, &o.source),
        0,
        "the copy equals the source"
    );
    let check = report.pause_check.expect("the pause check ran");
    // The first check scan found the page and it was sent; the next scan and the one before
    // the commit found nothing.
    assert_eq!((check.pages, check.sent_pages, check.scans), (1, 1, 3));
    let phase = report.final_phase.expect("a final phase");
    assert_eq!(phase.check, check.duration);
    assert!(
        report
            .to_string()
            .contains("the source RAN during the final round")
    );
    // The check's send is one more round on the wire.
    assert_eq!(rx.rounds, report.rounds.len() as u64 + 1);
}

#[test]
fn a_writer_that_never_stops_fails_the_migration_which_never_commits() {
    if !supported("a_writer_that_never_stops_fails_the_migration_which_never_commits") {
        return;
    }
    let o = migrate(Sneak::AfterEveryScan);
    match &o.result {
        Err(Error::NotPaused {
            scans,
            before_commit: false,
            ..
        }) => assert_eq!(*scans, PAUSE_CHECK_SENDS + 1),
        other => panic!("expected NotPaused before the state, got {other:?}"),
    }
    assert_eq!(o.report.status, Status::Failed);
    let check = o.report.pause_check.expect("the pause check ran");
    assert_eq!(check.scans, PAUSE_CHECK_SENDS + 1);
    assert_eq!(check.sent_pages, u64::from(PAUSE_CHECK_SENDS));
    assert!(check.pages > check.sent_pages);
    assert!(!o.guest_paused, "the workload was resumed");
    assert!(o.resumes >= 1);
    assert!(
        o.report.downtime.is_some(),
        "the downtime suffered is reported"
    );
    // It failed before the state: the receiver sees the stream end before FINISH.
    assert!(
        o.received.is_err(),
        "the receiver completed a copy the source never committed"
    );
}

#[test]
fn a_write_while_the_state_is_saved_fails_the_migration_before_the_commit() {
    if !supported("a_write_while_the_state_is_saved_fails_the_migration_before_the_commit") {
        return;
    }
    let o = migrate(Sneak::DuringTheState);
    match &o.result {
        Err(Error::NotPaused {
            pages: 1,
            before_commit: true,
            ..
        }) => {}
        other => panic!("expected NotPaused before the commit, got {other:?}"),
    }
    assert_eq!(o.sneaky_writes, 1);
    assert_eq!(o.report.status, Status::Failed);
    let check = o.report.pause_check.expect("the pause check ran");
    assert_eq!((check.scans, check.pages, check.sent_pages), (2, 1, 0));
    assert!(!o.guest_paused, "the workload was resumed");
    assert!(!o.report.to_string().contains("completed"), "{}", o.report);
    match &o.received {
        Err(TransferError::NotCommitted { .. }) => {}
        Err(e) => panic!("the receiver failed otherwise: {e:?}"),
        Ok(_) => panic!("the receiver completed a copy the source never committed"),
    }
}
