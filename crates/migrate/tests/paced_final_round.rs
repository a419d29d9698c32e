//! A paced final round past its bound: the final round's hard bound interrupts the transport
//! while its writer waits on the rate limiter (`SenderConfig::bandwidth_limit`, the CLI's
//! `--bandwidth`), which no socket shutdown ends. The migration fails at the bound, resumes the
//! workload and reports it, instead of keeping the workload paused until the wait is over.

mod common;

use common::{PAGE, receive, supported};
use precopy_migrate::{
    AfterMigration, Callbacks, Error, LimitPolicy, Migration, MigrationConfig, Status, Step,
    TransferTransport, UffdDirtyLog,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::mem::Mapping;
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{Layout, Listener, OwnMemory, Sender, SenderConfig};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the test waits for the migration: far past any scheduling delay, far below the
/// rate limiter's wait it must cut (minutes).
const LIVENESS: Duration = Duration::from_secs(30);

/// The final round's bound (`--final-round-timeout 100`).
const BOUND: Duration = Duration::from_millis(100);

/// 1 MiB of memory paced at 1 KiB/s, a sixteenth of it written before the migration: round 0
/// is 16 pages (64 KiB) and zero pages (a few bytes). The workload writes every page as it is
/// paused: the final round's first batch (64 pages, 256 KiB and their
/// hashes) overflows the rest of the bucket (256 KiB in all) by about 64 KiB, a minute's
/// worth, and its writer waits for them when the bound passes. Before the fix that wait ran
/// its course, the workload paused throughout. (Had the final round started with a full
/// bucket, a 256 KiB batch would overflow it by its few hundred bytes of hashes and headers, a
/// wait shorter than a second, and the write after it would have seen the interrupt.)
#[test]
fn a_paced_final_round_past_its_bound_fails_at_the_bound_and_resumes() {
    if !supported("a_paced_final_round_past_its_bound_fails_at_the_bound_and_resumes") {
        return;
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mem = Arc::new(Mapping::anonymous(1 << 20).unwrap());
        for page in 0..16 {
            mem.write_u64(page * PAGE, u64::MAX).unwrap();
        }
        let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
        let addr = listener.address();
        let receiver = receive(listener, None);
        let mut tracker = Tracker::new(Uffd::new().unwrap());
        tracker.register(mem.range()).unwrap();
        let layout = Layout::single(PAGE, mem.addr(), mem.len()).unwrap();
        let config = SenderConfig {
            bandwidth_limit: Some(1024),
            key: Some(common::test_key()),
            ..SenderConfig::default()
        };
        let conn = precopy_transfer::Connection::connect_tcp(addr.as_str()).unwrap();
        let source = OwnMemory::new([mem.clone()]);
        let sender = Sender::connect(vec![conn], layout, source, &config).unwrap();
        let writer = mem.clone();
        let (p, r) = (events.clone(), events.clone());
        let workload = Callbacks::<Infallible>::new(
            move || {
                // The workload's last writes before it stops.
                for page in 0..writer.len() / PAGE {
                    writer.write_u64(page * PAGE, page + 1).unwrap();
                }
                p.lock().unwrap().push("pause");
                Ok(())
            },
            move || {
                r.lock().unwrap().push("resume");
                Ok(())
            },
        );
        let mut cfg = MigrationConfig {
            max_rounds: 1,
            max_rounds_policy: LimitPolicy::SwitchOver,
            probe_pause: false,
            rehearse_send: false,
            final_round_timeout: Some(BOUND),
            after: AfterMigration::Resume,
            ..MigrationConfig::default()
        };
        cfg.throttle.enabled = false;
        let mut m = Migration::new(
            UffdDirtyLog::new(tracker, Scanner::new(ScanOptions::default()).unwrap()),
            TransferTransport::new(sender),
            workload,
            cfg,
        );
        let result = m.run().map(|_| ());
        let report = m.report().clone();
        drop(m);
        let received = receiver.join().unwrap();
        let _ = tx.send((result, report, received.is_ok()));
    });
    let (result, report, received) = rx
        .recv_timeout(LIVENESS)
        .expect("the migration kept going past its final round's bound");
    match &result {
        Err(Error::Timeout { step, limit, .. }) => {
            assert_eq!(*step, Step::FinalRound, "{result:?}");
            assert_eq!(*limit, BOUND);
        }
        other => panic!("expected the final round's bound to end it: {other:?}"),
    }
    assert_eq!(report.status, Status::Failed);
    assert!(report.checksum.is_none(), "never committed");
    assert_eq!(report.final_round_bound, Some(BOUND));
    assert!(report.downtime.is_some(), "the pause suffered is reported");
    assert_eq!(*seen.lock().unwrap(), vec!["pause", "resume"]);
    assert!(!received, "the destination got no complete copy");
}
