//! One dirty-log trait drives the migration: each comparison backend (mprotect + SIGSEGV, uffd
//! sync write-protect, soft-dirty) through the same driver as the engine's own log, with a
//! thread writing the source until the driver pauses it, into a receiver on loopback; the copy
//! must equal the paused source byte for byte. A backend that does not work on this kernel is
//! skipped loudly (soft-dirty where the kernel is built without `CONFIG_MEM_SOFT_DIRTY`).

mod common;

use common::*;
use precopy::backends::{BackendKind, check, open};
use precopy::migrate::{Callbacks, Migration, MigrationConfig, TransferTransport};
use precopy::transfer::{
    Connection, Key, Layout, Listener, MemorySink, ProcessMemory, Receiver, ReceiverConfig, Sender,
    SenderConfig,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

/// Migrates 256 pages of this process's memory tracked by backend `kind`; returns whether
/// collections were paused (per round, after round 0).
fn migrate_with(kind: BackendKind) -> Vec<bool> {
    let pages = 256;
    let src = Arc::new(anon(pages));
    src.fill(0, pages * PAGE, 0x77).unwrap();
    let layout = Layout::single(PAGE, src.addr(), pages * PAGE).unwrap();
    let key = Key::random();
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let conn = Connection::connect_tcp(listener.address().as_str()).unwrap();
    let rx_key = key.clone();
    let dest = std::thread::spawn(move || {
        let config = ReceiverConfig {
            key: Some(rx_key),
            ..ReceiverConfig::default()
        };
        let rx = Receiver::accept(&listener, &config).unwrap();
        let mut sink = MemorySink::new(rx.layout().clone()).unwrap();
        rx.run(&mut sink).unwrap();
        sink.memory().unwrap().to_vec()
    });

    // A writer that parks while the driver pauses it.
    let (pause, parked, exit) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = {
        let (src, pause, parked, exit) = (src.clone(), pause.clone(), parked.clone(), exit.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !exit.load(SeqCst) {
                if pause.load(SeqCst) {
                    parked.store(true, SeqCst);
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                parked.store(false, SeqCst);
                n += 1;
                src.write_u64((n * 7919 % pages) * PAGE + (n % 512) * 8, n)
                    .unwrap();
                if n.is_multiple_of(32) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let (p, r) = (pause.clone(), pause.clone());
    let workload = Callbacks::<std::convert::Infallible>::new(
        move || {
            p.store(true, SeqCst);
            while !parked.load(SeqCst) {
                std::thread::yield_now();
            }
            Ok(())
        },
        move || {
            r.store(false, SeqCst);
            Ok(())
        },
    );
    let log = open(kind, &[src.range()]).expect("the backend opens");
    let sender = Sender::connect(
        vec![conn],
        layout,
        ProcessMemory::current(),
        &SenderConfig {
            key: Some(key),
            ..SenderConfig::default()
        },
    )
    .unwrap();
    let config = MigrationConfig {
        max_downtime: Duration::from_millis(50),
        ..MigrationConfig::default()
    };
    let mut migration = Migration::new(log, TransferTransport::new(sender), workload, config);
    let report = migration.run().unwrap_or_else(|e| {
        panic!(
            "{kind}: migration failed: {}",
            precopy::sys::error_chain(&e)
        )
    });
    let copy = dest.join().unwrap();
    // The writer is still parked (the default: stay stopped for the destination).
    assert!(pause.load(SeqCst), "{kind}: left paused");
    let mut now = vec![0u8; (pages * PAGE) as usize];
    src.read(0, &mut now).unwrap();
    exit.store(true, SeqCst);
    writer.join().unwrap();
    assert!(
        now == copy,
        "{kind}: the copy differs from the paused source"
    );
    assert!(report.rounds.len() >= 2, "{kind}: {report}");
    report.rounds[1..]
        .iter()
        .map(|r| r.collect_pause.is_some())
        .collect()
}

#[test]
fn every_comparison_backend_drives_a_migration() {
    let mut ran = 0;
    for kind in [
        BackendKind::Mprotect,
        BackendKind::UffdSync,
        BackendKind::SoftDirty,
        BackendKind::UffdAsync,
    ] {
        if let Err(u) = check(kind) {
            skip(
                &format!("every_comparison_backend_drives_a_migration[{kind}]"),
                &u.reason,
            );
            continue;
        }
        let paused = migrate_with(kind);
        // Soft-dirty reads and clears in two steps: every collection ran with the writer
        // paused. The others never pause for a collection.
        let want = kind == BackendKind::SoftDirty;
        assert!(paused.iter().all(|p| *p == want), "{kind}: {paused:?}");
        ran += 1;
    }
    assert!(
        ran >= 2,
        "mprotect and uffd-sync work on any Linux with userfaultfd WP"
    );
}
