//! The seam a VMM embeds: memory described once, received into memory the destination mapped
//! itself (memfd, hugetlb) at another host address, and the state blob sent after the last round.
//!
//! Each test runs a real migration of this process's own memory: a "vCPU" thread keeps writing
//! the source until the driver pauses it, the driver tracks the memory through the layout's
//! regions (uffd async write-protect), and a receiver on loopback writes into the destination's
//! own mapping.

mod common;

use common::*;
use precopy::migrate::{Callbacks, Migration, MigrationConfig, TransferTransport, UffdDirtyLog};
use precopy::sys::mem::{Backing as MapBacking, Mapping, Thp};
use precopy::transfer::{
    Backing, Connection, Key, Layout, Listener, MemoryRegion, MemorySink, ProcessMemory, Receiver,
    ReceiverConfig, RegionMemory, Sender, SenderConfig,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Migrates `src` (described as one region of `page_size` pages backed by `backing`) into `dst`,
/// with a vCPU thread writing `src` until paused and a state blob holding its write count.
/// Returns the state blob the destination received.
fn migrate(src: Arc<Mapping>, dst: Arc<Mapping>, page_size: u64, backing: Backing) -> Vec<u8> {
    let layout = Layout::new(vec![
        MemoryRegion::new(7, src.len(), page_size)
            .host(src.addr())
            .guest(1 << 32)
            .backed_by(backing),
    ])
    .expect("layout");

    // Every TCP receiver requires a key, loopback included.
    let key = Key::random();
    let rx_config = ReceiverConfig {
        key: Some(key.clone()),
        ..ReceiverConfig::default()
    };
    let tx_config = SenderConfig {
        key: Some(key),
        ..SenderConfig::default()
    };

    // Destination: receives into the memory it mapped for region 7.
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let addr = listener.address();
    let dest = std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &rx_config).unwrap();
        let announced = rx.layout().region(7).copied().expect("region 7 announced");
        assert_eq!(
            (announced.guest_addr, announced.backing, announced.host_addr),
            (Some(1 << 32), Some(backing), None),
            "the wire carries guest address and backing, never the source's host address"
        );
        let memory: Vec<(u32, Box<dyn RegionMemory>)> = vec![(7, Box::new(dst))];
        let mut sink = MemorySink::with_memory(rx.layout().clone(), memory).unwrap();
        let report = rx.run(&mut sink).unwrap();
        assert!(report.state_bytes.is_some());
        sink.take_state()
            .expect("state delivered before the acknowledgement")
    });

    // Source: a vCPU writing until paused; its state is how many writes it made.
    let pause = Arc::new(AtomicBool::new(false));
    let parked = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let vcpu = {
        let (src, pause, parked, writes) =
            (src.clone(), pause.clone(), parked.clone(), writes.clone());
        std::thread::spawn(move || {
            let pages = src.len() / PAGE;
            let mut n = 0u64;
            while !pause.load(SeqCst) {
                n += 1;
                src.write_u64((n * 7919 % pages) * PAGE + (n % 512) * 8, n)
                    .unwrap();
                writes.store(n, SeqCst);
                if n % 64 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            parked.store(true, SeqCst);
        })
    };
    let log = UffdDirtyLog::for_layout(&layout, scanner()).expect("tracking the layout");
    let conn = Connection::connect_tcp(addr.as_str()).unwrap();
    let sender = Sender::connect(vec![conn], layout, ProcessMemory::current(), &tx_config).unwrap();
    let sent_state = Arc::new(Mutex::new(Vec::new()));
    let workload = {
        let (pause, parked, writes, sent) = (
            pause.clone(),
            parked.clone(),
            writes.clone(),
            sent_state.clone(),
        );
        Callbacks::new(
            move || {
                pause.store(true, SeqCst);
                while !parked.load(SeqCst) {
                    std::thread::yield_now();
                }
                Ok(())
            },
            || Ok(()),
        )
        .with_state(move || {
            let blob = writes.load(SeqCst).to_le_bytes().to_vec();
            *sent.lock().unwrap() = blob.clone();
            Ok(blob)
        })
    };
    let config = MigrationConfig {
        max_downtime: Duration::from_millis(50),
        ..MigrationConfig::default()
    };
    let report = Migration::new(log, TransferTransport::new(sender), workload, config)
        .run()
        .expect("migration");
    vcpu.join().unwrap();
    let received = dest.join().unwrap();
    assert_eq!(report.state_bytes, Some(8));
    assert_eq!(received, *sent_state.lock().unwrap());
    received
}

/// Both mappings hold the same bytes.
fn assert_same(src: &Mapping, dst: &Mapping) {
    let (mut a, mut b) = (vec![0u8; src.len() as usize], vec![0u8; dst.len() as usize]);
    src.read(0, &mut a).unwrap();
    dst.read(0, &mut b).unwrap();
    assert!(a == b, "destination memory differs from the paused source");
}

#[test]
fn migrates_into_caller_memfd_at_another_address() {
    let len = 256 * PAGE;
    let src = Arc::new(Mapping::new(MapBacking::Memfd, len, 0, Thp::Default).unwrap());
    src.fill(0, len, 0x3c).unwrap();
    // The destination's own memfd, holding stale bytes that must all be overwritten.
    let dst = Arc::new(Mapping::new(MapBacking::Memfd, len, 0, Thp::Default).unwrap());
    dst.fill(0, len, 0xee).unwrap();
    assert_ne!(src.addr(), dst.addr());
    let state = migrate(src.clone(), dst.clone(), PAGE, Backing::Memfd);
    assert_same(&src, &dst);
    let writes = u64::from_le_bytes(state.try_into().unwrap());
    assert!(writes > 0, "the vCPU wrote during the migration");
}

#[test]
fn migrates_into_caller_hugetlb_at_another_address() {
    let test = "migrates_into_caller_hugetlb_at_another_address";
    let Some(_pool) = reserve_pool(test, 4) else {
        return;
    };
    let map = |fill| {
        let m = Mapping::new(MapBacking::Hugetlb, 2 * HUGE, 0, Thp::Default)?;
        m.fill(0, 2 * HUGE, fill)?;
        Ok::<_, std::io::Error>(Arc::new(m))
    };
    let (src, dst) = match (map(0x5a), map(0)) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => {
            skip(test, &format!("MAP_HUGETLB failed: {e}"));
            return;
        }
    };
    assert_ne!(src.addr(), dst.addr());
    migrate(src.clone(), dst.clone(), HUGE, Backing::Hugetlb);
    assert_same(&src, &dst);
}

#[test]
fn a_layout_that_misstates_the_memory_is_refused() {
    let mem = anon(16);
    let wrong = |page_size, backing| {
        let layout = Layout::new(vec![
            MemoryRegion::new(0, mem.len(), page_size)
                .host(mem.addr())
                .backed_by(backing),
        ])
        .unwrap();
        UffdDirtyLog::for_layout(&layout, scanner()).map(|_| ())
    };
    for (page_size, backing) in [(PAGE, Backing::Memfd), (PAGE, Backing::Hugetlb)] {
        let err = wrong(page_size, backing).unwrap_err();
        assert!(err.to_string().contains("the memory mapped there"), "{err}");
    }
    wrong(PAGE, Backing::Anonymous).expect("the true description is accepted");
}
