//! Live migrations of this process's own memory to a receiver thread over real sockets, the way
//! an embedder (a VMM) drives the library: tracker + scanner, a socket sender, pause/resume
//! callbacks. Small sizes; every test checks the destination byte for byte.

mod common;

use common::{Guest, PAGE, Pattern, receive, supported};
use precopy_migrate::{
    AfterMigration, Error, LimitPolicy, Migration, MigrationConfig, Status, SwitchReason,
    TrackingError, TransferTransport, UffdDirtyLog,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{
    Connection, Layout, Listener, OwnMemory, PageSource, ProcessMemory, Sender, SenderConfig,
    TransferError,
};
use std::time::Duration;

#[derive(Clone, Copy)]
enum Net {
    Tcp,
    Unix,
}

struct Setup {
    size: u64,
    pattern: Pattern,
    net: Net,
    pages_per_sec: f64,
    bandwidth: Option<u64>,
    streams: usize,
    config: MigrationConfig,
    die_after: Option<u64>,
    /// Send from the guest's memory without a copy (`OwnMemory`) instead of `process_vm_readv`.
    own_memory: bool,
}

impl Setup {
    /// Defaults: 8 MiB, 2 × 2000 pages/s. `PRECOPY_TEST_SIZE_MIB` and `PRECOPY_TEST_PPS` scale
    /// the pattern tests up by hand (e.g. 1024 and 8192 to reproduce the lost-writes bug).
    fn new(pattern: Pattern, net: Net) -> Setup {
        Setup {
            size: std::env::var("PRECOPY_TEST_SIZE_MIB")
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .map_or(8 << 20, |m| m << 20),
            pattern,
            net,
            pages_per_sec: std::env::var("PRECOPY_TEST_PPS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000.0),
            bandwidth: None,
            streams: 1,
            config: MigrationConfig {
                max_downtime: Duration::from_millis(50),
                after: AfterMigration::Stop,
                ..MigrationConfig::default()
            },
            die_after: None,
            own_memory: false,
        }
    }
}

struct Outcome {
    result: Result<
        precopy_migrate::MigrationReport,
        Error<TrackingError, TransferError, std::convert::Infallible>,
    >,
    report: precopy_migrate::MigrationReport,
    received: common::Received,
    guest: Guest,
    source_copy: Option<Vec<u8>>,
}

fn migrate(s: Setup) -> Outcome {
    let guest = Guest::start(s.size, 2, s.pattern, s.pages_per_sec);
    let (listener, conns): (Listener, Box<dyn Fn() -> Connection>) = match s.net {
        Net::Tcp => {
            let l = Listener::bind_tcp("127.0.0.1:0").unwrap();
            let addr = l.address();
            (
                l,
                Box::new(move || Connection::connect_tcp(addr.as_str()).unwrap()),
            )
        }
        Net::Unix => {
            // The socket in a directory of its own, removed with it once the last connection
            // was made (the closure owns it).
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("migrate.sock");
            let l = Listener::bind_unix(&path).unwrap();
            (
                l,
                Box::new(move || {
                    let _dir = &dir;
                    Connection::connect_unix(&path).unwrap()
                }),
            )
        }
    };
    let rx = receive(listener, s.die_after);

    let mut tracker = Tracker::new(Uffd::new().unwrap());
    tracker.register(guest.mem.range()).unwrap();
    let scanner = Scanner::new(ScanOptions::default()).unwrap();
    let layout = Layout::single(PAGE, guest.mem.addr(), guest.mem.len()).unwrap();
    let config = SenderConfig {
        streams: s.streams,
        bandwidth_limit: s.bandwidth,
        key: Some(common::test_key()),
        ..SenderConfig::default()
    };
    let source: Box<dyn PageSource + Send> = if s.own_memory {
        Box::new(OwnMemory::new([guest.mem.clone()]))
    } else {
        Box::new(ProcessMemory::current())
    };
    let sender = Sender::connect(
        (0..s.streams).map(|_| conns()).collect(),
        layout,
        source,
        &config,
    )
    .unwrap();
    let mut m = Migration::new(
        UffdDirtyLog::new(tracker, scanner),
        TransferTransport::new(sender),
        guest.callbacks(),
        s.config,
    );
    let result = m.run();
    let report = m.report().clone();
    // With AfterMigration::Stop the writers are still parked: this is the frozen memory.
    let source_copy = guest.is_paused().then(|| guest.snapshot());
    drop(m);
    let received = rx.join().unwrap();
    Outcome {
        result,
        report,
        received,
        guest,
        source_copy,
    }
}

fn assert_identical(o: &Outcome) {
    let report = o.result.as_ref().expect("migration failed");
    assert_eq!(report.status, Status::Completed);
    let (dest, rx) = o.received.as_ref().expect("receiver failed");
    let src = o
        .source_copy
        .as_ref()
        .expect("source not paused after success");
    assert_eq!(dest.len(), src.len());
    let bad = dest
        .chunks(PAGE as usize)
        .zip(src.chunks(PAGE as usize))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(bad, 0, "{bad} pages differ");
    assert_eq!(Some(rx.checksum), report.checksum);
    assert_eq!(rx.rounds, report.rounds.len() as u64);
    assert!(report.downtime.is_some());
    // The driver marked the final round, and the receiver raised its threads for it (or says
    // it was not permitted).
    let raised = rx
        .final_priority
        .expect("the final round was marked on the wire");
    assert!(raised.threads > 0 || raised.refused, "{raised:?}");
}

fn run_pattern(name: &str, pattern: Pattern, net: Net) {
    if !supported(name) {
        return;
    }
    let o = migrate(Setup::new(pattern, net));
    assert_identical(&o);
    assert!(
        o.guest.writes.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the source wrote during the migration"
    );
}

#[test]
fn uniform_over_tcp() {
    run_pattern("uniform_over_tcp", Pattern::Uniform, Net::Tcp);
}

#[test]
fn hot_set_over_tcp() {
    run_pattern("hot_set_over_tcp", Pattern::HotSet, Net::Tcp);
}

#[test]
fn sequential_over_tcp() {
    run_pattern("sequential_over_tcp", Pattern::Sequential, Net::Tcp);
}

#[test]
fn uniform_over_unix() {
    run_pattern("uniform_over_unix", Pattern::Uniform, Net::Unix);
}

#[test]
fn hot_set_over_unix() {
    run_pattern("hot_set_over_unix", Pattern::HotSet, Net::Unix);
}

#[test]
fn sequential_over_unix() {
    run_pattern("sequential_over_unix", Pattern::Sequential, Net::Unix);
}

/// The guest's own memory goes to the socket without a copy while its writers run; pages torn
/// in a live round are sent again (the tracker reports them), and the result is exact.
fn own_memory(name: &str, net: Net, streams: usize) {
    if !supported(name) {
        return;
    }
    let mut s = Setup::new(Pattern::HotSet, net);
    s.own_memory = true;
    s.streams = streams;
    s.pages_per_sec = 20_000.0;
    let o = migrate(s);
    assert_identical(&o);
    let (_, rx) = o.received.as_ref().expect("receiver failed");
    eprintln!(
        "{name}: {} page(s) arrived torn and were sent again",
        rx.changed_while_sent
    );
}

#[test]
fn own_memory_hot_set_over_tcp() {
    own_memory("own_memory_hot_set_over_tcp", Net::Tcp, 1);
}

#[test]
fn own_memory_two_streams_over_unix() {
    own_memory("own_memory_two_streams_over_unix", Net::Unix, 2);
}

#[test]
fn two_streams_resume_after_success() {
    if !supported("two_streams_resume_after_success") {
        return;
    }
    let mut s = Setup::new(Pattern::HotSet, Net::Tcp);
    s.streams = 2;
    s.config.after = AfterMigration::Resume;
    let o = migrate(s);
    let report = o.result.as_ref().unwrap();
    assert_eq!(report.status, Status::Completed);
    assert!(!o.guest.is_paused(), "resumed as asked");
    assert!(o.received.is_ok());
}

/// Writers far faster than a capped link: the driver throttles and, at the round limit,
/// switches over anyway; the copy is still exact.
#[test]
fn dirty_rate_above_bandwidth_throttles_and_completes() {
    if !supported("dirty_rate_above_bandwidth_throttles_and_completes") {
        return;
    }
    let mut s = Setup::new(Pattern::Uniform, Net::Tcp);
    s.size = 2 << 20;
    s.pages_per_sec = 20_000.0; // 2 × 80 MiB/s over 2 MiB: everything is dirty every round.
    s.bandwidth = Some(4 << 20);
    s.config.max_downtime = Duration::from_millis(5);
    s.config.max_rounds = 6;
    s.config.max_rounds_policy = LimitPolicy::SwitchOver;
    let o = migrate(s);
    assert_identical(&o);
    let r = &o.report;
    assert!(r.throttle >= 0.2, "throttle {}\n{r}", r.throttle);
    assert_eq!(r.switch_reason, Some(SwitchReason::MaxRounds), "{r}");
    assert_eq!(r.throttle_method, "callback");
}

/// Same workload under the abort policy: a clean error, the workload running, and a receiver
/// that never reports success.
#[test]
fn dirty_rate_above_bandwidth_aborts_cleanly_under_abort_policy() {
    if !supported("dirty_rate_above_bandwidth_aborts_cleanly_under_abort_policy") {
        return;
    }
    let mut s = Setup::new(Pattern::Uniform, Net::Tcp);
    s.size = 2 << 20;
    s.pages_per_sec = 20_000.0;
    s.bandwidth = Some(4 << 20);
    s.config.max_downtime = Duration::from_millis(5);
    s.config.max_rounds = 4;
    s.config.max_rounds_policy = LimitPolicy::Abort;
    let o = migrate(s);
    let err = o.result.as_ref().unwrap_err();
    assert!(matches!(err, Error::Aborted { .. }), "{err}");
    assert_eq!(o.report.status, Status::Aborted);
    assert!(o.report.downtime.is_none());
    assert!(!o.guest.is_paused(), "the workload keeps running");
    assert!(o.received.is_err(), "the receiver must not report success");
}

/// The destination fails mid-migration: the source gets a clear error, keeps running, and
/// nothing is marked complete on either side.
#[test]
fn receiver_dying_mid_migration_is_a_clear_error_and_the_source_keeps_running() {
    receiver_dying("receiver_dying_mid_migration", 1);
}

/// With several streams the receiver stops them all; the sender still reports the receiver's
/// reason, not what the stop did to the other streams.
#[test]
fn receiver_dying_with_two_streams_reports_the_receivers_reason() {
    receiver_dying("receiver_dying_with_two_streams", 2);
}

fn receiver_dying(name: &str, streams: usize) {
    if !supported(name) {
        return;
    }
    let mut s = Setup::new(Pattern::HotSet, Net::Tcp);
    s.die_after = Some(1000);
    s.streams = streams;
    let o = migrate(s);
    let err = o.result.as_ref().unwrap_err();
    assert!(
        matches!(err, Error::Send { .. } | Error::Finish { .. }),
        "{err}"
    );
    let msg = o.report.error.clone().unwrap();
    // The receiver's own reason, whichever step met its ERROR first (a round, or the PING
    // between rounds, whose failure the driver only logs).
    assert!(msg.contains("destination died"), "{msg}");
    assert_eq!(o.report.status, Status::Failed);
    assert!(o.report.checksum.is_none());
    assert!(!o.guest.is_paused(), "the workload was resumed");
    let before = o.guest.writes.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        o.guest.writes.load(std::sync::atomic::Ordering::SeqCst) > before,
        "writers still running"
    );
    assert!(o.received.is_err(), "the receiver must not report success");
}
