//! A VMM-shaped live migration: guest memory the VMM maps itself (a memfd, as VMMs with
//! vhost-user devices do), "vCPU" threads writing it, a "device" writing it through its own
//! mapping (as a vhost-user backend or a DMA engine would: no write-protect fault sees it), and a
//! migration through `precopy-migrate` with pause/resume callbacks. The device reports what it
//! wrote through [`ExternalDirty`], the way QEMU ORs a device's dirty log into KVM's. The
//! destination runs on a thread here; in a real VMM it is another process, usually on another
//! host.
//!
//! `cargo run --release --example vmm_migration`

use anyhow::Result;
use precopy_migrate::{
    Callbacks, ExternalDirty, Migration, MigrationConfig, TransferTransport, UffdDirtyLog,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::mem::{Backing, Mapping, Thp};
use precopy_tracker::{RegisterOptions, Tracker, Uffd, UnvouchedPolicy};
use precopy_transfer::{
    Connection, Key, Layout, Listener, MemorySink, ProcessMemory, Receiver, ReceiverConfig, Sender,
    SenderConfig,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const GUEST_RAM: u64 = 64 << 20;
const VCPUS: usize = 2;
/// vCPUs plus the device thread: all park on pause.
const WRITERS: usize = VCPUS + 1;

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

/// A device model writing guest RAM through its own mapping of the memfd (a vhost-user backend
/// would do this from another process): the vCPUs' page tables never see these writes, so the
/// device marks each one in `dirty` once it has landed.
fn device(dma: Mapping, dirty: ExternalDirty, base: u64, state: Arc<RunState>) {
    let pages = dma.len() / 4096;
    let mut n = 0u64;
    loop {
        if state.pause.load(SeqCst) {
            state.parked.fetch_add(1, SeqCst);
            while state.pause.load(SeqCst) {
                std::thread::sleep(Duration::from_micros(100));
            }
            state.parked.fetch_sub(1, SeqCst);
        }
        n += 1;
        // "A received packet": one page of the guest's receive ring, after the write.
        let page = (n * 31) % (pages / 8);
        dma.write_u64(page * 4096 + 64, n).expect("device mapping");
        dirty
            .mark(base + page * 4096..base + page * 4096 + 8)
            .expect("a range inside guest RAM");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() -> Result<()> {
    // Guest RAM: a memfd the VMM maps; vCPUs start running.
    let ram = Arc::new(Mapping::new(Backing::Memfd, GUEST_RAM, 0, Thp::Default)?);
    let state = Arc::new(RunState::default());
    for id in 0..VCPUS as u64 {
        let (ram, state) = (ram.clone(), state.clone());
        std::thread::spawn(move || vcpu(id, ram, state));
    }

    // The destination: receives into its own memory and checks the final checksum. Every TCP
    // receiver challenges its sender (any local user could connect to a loopback port): both
    // ends share a random key (across processes: `Key::write_new_file`, owner-only).
    let key = Key::random();
    let receiver_config = ReceiverConfig {
        key: Some(key.clone()),
        ..ReceiverConfig::default()
    };
    let listener = Listener::bind_tcp("127.0.0.1:0")?;
    let addr = listener.address();
    let ready = Arc::new(Barrier::new(2));
    let dest_ready = ready.clone();
    let destination = std::thread::spawn(move || -> Result<MemorySink> {
        let receiver = Receiver::accept(&listener, &receiver_config)?;
        let mut memory = MemorySink::new(receiver.layout().clone())?;
        receiver.run(&mut memory)?;
        dest_ready.wait();
        Ok(memory)
    });

    // Source side: track guest RAM. Shared memory can change without the write-protect bit
    // seeing it; by default the driver would re-read it at switch-over (costing downtime).
    // This VMM knows its only such writer is its device model, which reports every write
    // through ExternalDirty, so it accepts the risk and skips that pass.
    let mut tracker = Tracker::new(Uffd::new()?);
    tracker.register_with(
        ram.range(),
        RegisterOptions {
            unvouched: UnvouchedPolicy::AcceptRisk,
            ..RegisterOptions::default()
        },
    )?;
    let dirty_log = UffdDirtyLog::new(tracker, Scanner::new(ScanOptions::default())?);
    let fd = ram.fd().expect("a memfd").try_clone_to_owned()?;
    let dma = Mapping::new(Backing::File(fd.into()), GUEST_RAM, 0, Thp::Default)?;
    let (dirty, base, dev_state) = (dirty_log.external_dirty(), ram.addr(), state.clone());
    std::thread::spawn(move || device(dma, dirty, base, dev_state));
    let layout = Layout::single(4096, ram.addr(), ram.len())?;
    let sender = Sender::connect(
        vec![Connection::connect_tcp(addr.as_str())?],
        layout,
        ProcessMemory::current(),
        &SenderConfig {
            key: Some(key),
            ..SenderConfig::default()
        },
    )?;
    let (pause, resume) = (state.clone(), state.clone());
    let vcpus = Callbacks::new(
        move || {
            pause.pause.store(true, SeqCst);
            while pause.parked.load(SeqCst) < WRITERS {
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

    // The vCPUs and the device are still paused (the default is to stop: the destination takes
    // over).
    let mut source = vec![0u8; GUEST_RAM as usize];
    ram.read(0, &mut source)?;
    println!(
        "destination equals the paused source: {}",
        memory.memory() == Some(source.as_slice())
    );
    Ok(())
}
