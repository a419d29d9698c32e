//! A connection cut in the middle of a live migration (the socket, not a process): the source
//! keeps tracking, reconnects, the receiver keeps what it applied and continues the same
//! session, and only what it lacks plus what was written meanwhile is sent again. Cut more
//! often than the reconnect attempts allow, the migration fails clearly and the source runs on.

mod common;

use common::{Guest, PAGE, Pattern, supported, test_key};
use precopy_migrate::{
    AfterMigration, Error, LimitPolicy, Migration, MigrationConfig, Phase, ReconnectConfig, Status,
    TransferTransport, UffdDirtyLog,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_testnet::{Net, Proxy, bind, resumable_receiver};
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{
    Layout, ProcessMemory, ReceiverConfig, Sender, SenderConfig, TransferError,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

type Received = Result<precopy_testnet::Received, TransferError>;

struct Run {
    result: Result<
        precopy_migrate::MigrationReport,
        Error<precopy_migrate::TrackingError, TransferError, std::convert::Infallible>,
    >,
    report: precopy_migrate::MigrationReport,
    guest: Guest,
    received: Received,
    proxy: Arc<Proxy>,
    /// Bytes the proxy had forwarded to the receiver when it cut.
    at_cut: u64,
}

/// What the proxy does to the connections when round 2 is about to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Cuts them (both directions shut down: the ends see a reset or an end of stream).
    Cut,
    /// Stops forwarding without closing anything (a silent drop): only the sender's I/O
    /// timeout (1 s here) notices.
    Silence,
    /// Cuts them in the final phase instead, once: as the paused workload's state is saved
    /// (the final round sent, the state and the final checksum not yet).
    CutInFinalPhase,
}

/// Migrates 32 MiB of a hot-set writer through a proxy that cuts every connection when round
/// 2 is about to be sent; with `keep_cut`, it also drops every later connection.
fn migrate_with_a_cut(net: Net, attempts: u32, keep_cut: bool, resume_wait: Duration) -> Run {
    migrate_with_a_fault(net, Fault::Cut, attempts, keep_cut, resume_wait)
}

fn migrate_with_a_fault(
    net: Net,
    fault: Fault,
    attempts: u32,
    keep_cut: bool,
    resume_wait: Duration,
) -> Run {
    let size: u64 = 32 << 20;
    // A hot set: little is written between rounds, so a resume that sent the whole memory
    // again would stand out.
    let guest = Guest::start(size, 2, Pattern::HotSet, 500.0);
    let dir = tempfile::tempdir().unwrap();
    let (listener, rx_target) = bind(net, &dir, "rx");
    let proxy = Arc::new(Proxy::start(net, &dir, rx_target));
    let rx = resumable_receiver(
        listener,
        ReceiverConfig {
            key: Some(test_key()),
            resume_wait,
            ..ReceiverConfig::default()
        },
    );

    let mut tracker = Tracker::new(Uffd::new().unwrap());
    tracker.register(guest.mem.range()).unwrap();
    let scanner = Scanner::new(ScanOptions::default()).unwrap();
    let layout = Layout::single(PAGE, guest.mem.addr(), guest.mem.len()).unwrap();
    let config = SenderConfig {
        key: Some(test_key()),
        io_timeout: match fault {
            Fault::Cut | Fault::CutInFinalPhase => SenderConfig::default().io_timeout,
            Fault::Silence => Some(Duration::from_secs(1)),
        },
        ..SenderConfig::default()
    };
    let to = proxy.target.clone();
    let sender = Sender::dial(
        move || to.connect(),
        layout,
        ProcessMemory::current(),
        &config,
    )
    .unwrap();
    // Never converges (no downtime fits 1 ns): six rounds, then the final one.
    let mconfig = MigrationConfig {
        max_downtime: Duration::from_nanos(1),
        max_rounds: 6,
        max_rounds_policy: LimitPolicy::SwitchOver,
        after: AfterMigration::Stop,
        probe_pause: false,
        reconnect: ReconnectConfig {
            attempts,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        },
        ..MigrationConfig::default()
    };
    let at_cut = Arc::new(AtomicU64::new(u64::MAX));
    let (cut_proxy, at) = (proxy.clone(), at_cut.clone());
    let (final_cut, at_final) = (proxy.clone(), at_cut.clone());
    let callbacks = guest.callbacks().with_state(move || {
        if fault == Fault::CutInFinalPhase && at_final.load(SeqCst) == u64::MAX {
            at_final.store(final_cut.forwarded(), SeqCst);
            final_cut.cut();
            // Let the sender's watcher see the end of its stream.
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(b"vcpu state".to_vec())
    });
    let mut m = Migration::new(
        UffdDirtyLog::new(tracker, scanner),
        TransferTransport::new(sender),
        callbacks,
        mconfig,
    )
    .on_progress(move |p| {
        if fault != Fault::CutInFinalPhase
            && p.phase == Phase::Iterating
            && p.round == 2
            && at.load(SeqCst) == u64::MAX
        {
            at.store(cut_proxy.forwarded(), SeqCst);
            cut_proxy.refuse(keep_cut);
            match fault {
                Fault::Cut | Fault::CutInFinalPhase => cut_proxy.cut(),
                Fault::Silence => cut_proxy.blackhole(),
            }
            // Let the sender's watcher see the end of its stream before the round starts
            // (without it the break shows up a round later, which works too).
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let result = m.run();
    let report = m.report().clone();
    drop(m);
    let received = rx.join().unwrap();
    let at_cut = at_cut.load(SeqCst);
    assert_ne!(at_cut, u64::MAX, "the connection was never cut");
    Run {
        result,
        report,
        guest,
        received,
        proxy,
        at_cut,
    }
}

fn cut_mid_migration_resumes_and_resends_far_less_than_memory(net: Net) {
    fault_mid_migration_resumes_and_resends_far_less_than_memory(net, Fault::Cut);
}

fn fault_mid_migration_resumes_and_resends_far_less_than_memory(net: Net, fault: Fault) {
    let name = format!(
        "fault_mid_migration_resumes_and_resends_far_less_than_memory ({net:?}, {fault:?})"
    );
    if !supported(&name) {
        return;
    }
    let run = migrate_with_a_fault(net, fault, 5, false, Duration::from_secs(30));
    let source = run.guest.snapshot();
    let report = run
        .result
        .unwrap_or_else(|e| panic!("migration failed: {}", precopy_sys::error_chain(&e)));
    assert_eq!(report.status, Status::Completed);
    assert_eq!(report.reconnects, 1, "one reconnect");
    let precopy_testnet::Received {
        memory: dest,
        report: rx_report,
        ..
    } = run.received.expect("receiver failed");
    assert_eq!(
        rx_report.resumes, 1,
        "the receiver continued the same session"
    );
    assert_eq!(Some(rx_report.checksum), run.report.checksum, "final check");
    let bad = dest
        .chunks(PAGE as usize)
        .zip(source.chunks(PAGE as usize))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(bad, 0, "{bad} pages differ after the resumed migration");
    // Before the cut the wire carried all memory (round 0); after it, far less than that.
    let size = source.len() as u64;
    let before = run.at_cut;
    let after = run.proxy.forwarded() - before;
    assert!(before >= size * 7 / 8, "round 0 carried {before} bytes");
    assert!(
        after < size / 4,
        "{after} bytes sent after the cut for {size} bytes of memory"
    );
    eprintln!(
        "resume over {net:?} after a {fault:?}: {before} bytes before it, {after} after it \
         (rounds, final included), memory {size}, rounds {}",
        run.report.rounds.len()
    );
}

#[test]
fn tcp_cut_mid_migration_resumes_and_resends_far_less_than_memory() {
    cut_mid_migration_resumes_and_resends_far_less_than_memory(Net::Tcp);
}

#[test]
fn unix_cut_mid_migration_resumes_and_resends_far_less_than_memory() {
    cut_mid_migration_resumes_and_resends_far_less_than_memory(Net::Unix);
}

/// A silent drop (no reset, no end of stream: the proxy stops forwarding and holds both
/// sockets open) is noticed by the sender's I/O timeout (the PING between rounds gets no
/// PONG, or a write stalls), treated like a broken connection: the sender dials again and the
/// receiver, which saw nothing, takes the same session back on the new connection.
#[test]
fn tcp_silent_drop_mid_migration_resumes_and_resends_far_less_than_memory() {
    fault_mid_migration_resumes_and_resends_far_less_than_memory(Net::Tcp, Fault::Silence);
}

#[test]
fn unix_silent_drop_mid_migration_resumes_and_resends_far_less_than_memory() {
    fault_mid_migration_resumes_and_resends_far_less_than_memory(Net::Unix, Fault::Silence);
}

/// A cut in the final phase (the workload paused, the final round sent, the state not yet):
/// the source resumes its workload, reconnects, goes back to the rounds and switches over
/// again, and the migration completes and verifies; the report counts two switch-overs.
#[test]
fn a_cut_in_the_final_phase_resumes_the_source_and_switches_over_again() {
    if !supported("a_cut_in_the_final_phase_resumes_the_source_and_switches_over_again") {
        return;
    }
    let run = migrate_with_a_fault(
        Net::Tcp,
        Fault::CutInFinalPhase,
        3,
        false,
        Duration::from_secs(30),
    );
    let source = run.guest.snapshot();
    let report = run
        .result
        .unwrap_or_else(|e| panic!("migration failed: {}", precopy_sys::error_chain(&e)));
    assert_eq!(report.status, Status::Completed);
    assert_eq!(
        report.switchover_attempts, 2,
        "one failed switch-over, then one that held"
    );
    assert_eq!(report.reconnects, 1);
    let precopy_testnet::Received {
        memory: dest,
        report: rx_report,
        ..
    } = run.received.expect("receiver failed");
    assert_eq!(rx_report.resumes, 1);
    assert_eq!(
        rx_report.state_bytes,
        Some(10),
        "the state of the second switch-over"
    );
    assert_eq!(Some(rx_report.checksum), run.report.checksum, "final check");
    let bad = dest
        .chunks(PAGE as usize)
        .zip(source.chunks(PAGE as usize))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(bad, 0, "{bad} pages differ after the second switch-over");
    // The report gives every switch-over's pause, not only the last one's, and what the
    // failed final round sent.
    assert_eq!(
        report.switchover_pauses.len(),
        2,
        "{:?}",
        report.switchover_pauses
    );
    let (first, last) = (report.switchover_pauses[0], report.switchover_pauses[1]);
    assert_eq!(
        report.downtime,
        Some(last),
        "downtime is the last attempt's"
    );
    assert_eq!(report.paused_total, first + last);
    // The cut's state callback slept 20 ms with the workload paused.
    assert!(first >= Duration::from_millis(20), "{first:?}");
    let failed: Vec<_> = report
        .rounds
        .iter()
        .filter(|r| r.failed && r.kind == precopy_migrate::RoundKind::Final)
        .collect();
    assert_eq!(failed.len(), 1, "one failed final round");
    let f = report.failed_final;
    assert_eq!(f.rounds, 1);
    assert_eq!(
        (f.pages, f.zero_pages, f.bytes),
        (failed[0].pages, failed[0].zero_pages, failed[0].bytes)
    );
    assert!(report.pages >= f.pages && report.zero_pages >= f.zero_pages);
    let text = report.to_string();
    assert!(
        text.contains("switch-overs:  2 attempt(s); the workload was paused ")
            && text.contains(&format!(
                "{} failed final round(s) sent {} pages",
                f.rounds, f.pages
            )),
        "{text}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(
        json["switchover_pauses_ms"].as_array().map(Vec::len),
        Some(2),
        "{json}"
    );
    assert!(
        json["paused_total_ms"].as_f64() > json["downtime_ms"].as_f64(),
        "{json}"
    );
    assert_eq!(json["failed_final"]["rounds"], 1, "{json}");
    let after = run.proxy.forwarded() - run.at_cut;
    eprintln!(
        "final phase cut: {} switch-over attempts, {after} bytes after the cut, rounds {}",
        report.switchover_attempts,
        run.report.rounds.len()
    );
}

#[test]
fn more_cuts_than_reconnect_attempts_fail_clearly_and_the_source_runs_on() {
    if !supported("more_cuts_than_reconnect_attempts_fail_clearly_and_the_source_runs_on") {
        return;
    }
    let run = migrate_with_a_cut(Net::Tcp, 2, true, Duration::from_secs(2));
    let err = run.result.unwrap_err();
    assert!(
        matches!(err, Error::Reconnect { attempts: 2, .. }),
        "{}",
        precopy_sys::error_chain(&err)
    );
    let chain = precopy_sys::error_chain(&err);
    assert!(chain.contains("2 reconnect attempt(s)"), "{chain}");
    assert_eq!(run.proxy.refused(), 2, "two attempts, each cut");
    assert_eq!(run.report.status, Status::Failed);
    assert_eq!(run.report.reconnects, 0);
    // The source was never paused and runs on.
    assert!(!run.guest.is_paused());
    let writes = run.guest.writes.load(SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert!(run.guest.writes.load(SeqCst) > writes, "the source stopped");
    // The destination waited its bounded time for a resume that never came.
    let err = run.received.unwrap_err();
    assert!(
        matches!(err, TransferError::ResumeTimedOut { .. }),
        "{}",
        precopy_sys::error_chain(&err)
    );
}
