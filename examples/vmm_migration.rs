//! A VMM-shaped live migration: guest memory the VMM maps itself, "vCPU" threads writing it, and
//! a migration through `precopy-migrate` with pause/resume callbacks. The destination runs on a
//! thread here; in a real VMM it is another process, usually on another host.
//!
//! `cargo run --release --example vmm_migration`

use anyhow::Result;
use precopy_migrate::{Callbacks, Migration, MigrationConfig, TransferTransport, UffdDirtyLog};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::mem::Mapping;
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{
    Connection, Layout, Listener, MemorySink, ProcessMemory, Receiver, ReceiverConfig, Sender,
    SenderConfig,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const GUEST_RAM: u64 = 64 << 20;
const VCPUS: usize = 2;

/// The VMM's vCPU run state: a pause request and how many vCPUs have parked.
#[derive(Default)]
struct RunState {
    pause: AtomicBool,
    parked: AtomicUsize,
}

fn vcpu(id: u64, ram: Arc<Mapping>, state: Arc<RunState>) {
    let pages = ram.len() / 4096;
    let mut n = 0u64;
    loop {
        if state.pause.load(SeqCst) {
            state.parked.fetch_add(1, SeqCst);
            while state.pause.load(SeqCst) {
                std::thread::sleep(Duration::from_micros(100));
            }
            state.parked.fetch_sub(1, SeqCst);
        }
        // "Guest code": touch a page, a few thousand times a second.
        n += 1;
        let page = (n * 7919 + id * 104_729) % pages;
        ram.write_u64(page * 4096 + (n % 512) * 8, n)
            .expect("guest RAM");
        if n % 16 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn main() -> Result<()> {
    // Guest RAM, mapped by the VMM; vCPUs start running.
    let ram = Arc::new(Mapping::anonymous(GUEST_RAM)?);
    let state = Arc::new(RunState::default());
    for id in 0..VCPUS as u64 {
        let (ram, state) = (ram.clone(), state.clone());
        std::thread::spawn(move || vcpu(id, ram, state));
    }

    // The destination: receives into its own memory and checks the final checksum.
    let listener = Listener::bind_tcp("127.0.0.1:0")?;
    let addr = listener.address();
    let ready = Arc::new(Barrier::new(2));
    let dest_ready = ready.clone();
    let destination = std::thread::spawn(move || -> Result<MemorySink> {
        let receiver = Receiver::accept(&listener, &ReceiverConfig::default())?;
        let mut memory = MemorySink::new(receiver.layout().clone())?;
        receiver.run(&mut memory)?;
        dest_ready.wait();
        Ok(memory)
    });

    // Source side: track guest RAM, connect, migrate.
    let mut tracker = Tracker::new(Uffd::new()?);
    tracker.register(ram.range())?;
    let dirty_log = UffdDirtyLog::new(tracker, Scanner::new(ScanOptions::default())?);
    let layout = Layout::single(4096, ram.addr(), ram.len())?;
    let sender = Sender::connect(
        vec![Connection::connect_tcp(addr.as_str())?],
        layout,
        ProcessMemory::current(),
        &SenderConfig::default(),
    )?;
    let (pause, resume) = (state.clone(), state.clone());
    let vcpus = Callbacks::new(
        move || {
            pause.pause.store(true, SeqCst);
            while pause.parked.load(SeqCst) < VCPUS {
                std::thread::yield_now();
            }
            Ok(())
        },
        move || {
            resume.pause.store(false, SeqCst);
            Ok(())
        },
    );
    let config = MigrationConfig {
        max_downtime: Duration::from_millis(50),
        ..MigrationConfig::default()
    };
    let report = Migration::new(dirty_log, TransferTransport::new(sender), vcpus, config)
        .on_progress(|p| eprintln!("round {} pending {} KiB", p.round, p.pending_bytes >> 10))
        .run()?;
    ready.wait();
    let memory = destination.join().expect("destination thread")?;
    println!("{report}");

    // The vCPUs are still paused (the default is to stop: the destination takes over).
    let mut source = vec![0u8; GUEST_RAM as usize];
    ram.read(0, &mut source)?;
    println!(
        "destination equals the paused source: {}",
        memory.memory() == source.as_slice()
    );
    Ok(())
}
