//! A VMM-shaped live migration through the `precopy` facade: guest RAM the VMM maps itself (a
//! memfd, as VMMs with vhost-user devices do), "vCPU" threads writing it, a "device" writing it
//! through its own mapping (as a vhost-user backend or a DMA engine would: no write-protect fault
//! sees it, so it reports each write through `ExternalDirty`, the way QEMU ORs a device's dirty
//! log into KVM's), and both ends of the migration in one file, vCPU state included. The
//! destination runs on a thread here; in a real VMM it is another process, usually on another
//! host, and maps its guest RAM at another address.
//!
//! The migration itself is the code between the two `----` markers; the rest plays the VMM.
//!
//! `cargo run --release --example vmm_migration`

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

use anyhow::Result;
use precopy::sys::mem::{Backing as MapBacking, Thp};
use precopy::{
    Backing, Callbacks, Connection, ExternalDirty, Key, Layout, Listener, Mapping, MemoryRegion,
    MigrationConfig, RegionMemory, Source,
};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const GUEST_RAM: u64 = 64 << 20;
const VCPUS: usize = 2;

/// The VMM's writers (vCPUs and the device): a pause request, how many have parked, and each
/// vCPU's "registers" (here: how many writes it made).
#[derive(Default)]
struct Vcpus {
    pause: AtomicBool,
    parked: AtomicUsize,
    regs: [AtomicU64; VCPUS],
}

impl Vcpus {
    /// Stops every writer (the vCPUs and the device): returns once all are parked, or fails
    /// after 5 s (a vCPU stuck in a long exit).
    fn pause_all(&self) -> std::io::Result<()> {
        self.pause.store(true, SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.parked.load(SeqCst) < VCPUS + 1 {
            if Instant::now() > deadline {
                self.pause.store(false, SeqCst);
                return Err(std::io::Error::other("the vCPUs did not park within 5 s"));
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Lets every writer run again.
    fn resume_all(&self) -> std::io::Result<()> {
        self.pause.store(false, SeqCst);
        Ok(())
    }

    /// Parks the calling writer while a pause is requested.
    fn park_if_paused(&self) {
        if self.pause.load(SeqCst) {
            self.parked.fetch_add(1, SeqCst);
            while self.pause.load(SeqCst) {
                std::thread::sleep(Duration::from_micros(100));
            }
            self.parked.fetch_sub(1, SeqCst);
        }
    }
}

fn vcpu(id: usize, ram: Arc<Mapping>, vcpus: Arc<Vcpus>) {
    let pages = ram.len() / 4096;
    loop {
        vcpus.park_if_paused();
        // "Guest code": touch a page, a few thousand times a second; the count is a register.
        let n = vcpus.regs[id].fetch_add(1, SeqCst) + 1;
        let page = (n * 7919 + id as u64 * 104_729) % pages;
        ram.write_u64(page * 4096 + (n % 512) * 8, n)
            .expect("guest RAM");
        if n.is_multiple_of(16) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A device model writing guest RAM through its own mapping of the memfd: the vCPUs' page
/// tables never see these writes, so the device marks each one once it has landed.
fn device(dma: Mapping, dirty: ExternalDirty, base: u64, vcpus: Arc<Vcpus>) {
    let pages = dma.len() / 4096;
    for n in 1u64.. {
        vcpus.park_if_paused();
        // "A received packet": one page of the guest's receive ring, after the write.
        let page = (n * 31) % (pages / 8);
        dma.write_u64(page * 4096 + 64, n).expect("device mapping");
        // Refused only once the migration is over (`MarkError::Closed`): nothing to report to.
        if dirty
            .mark(base + page * 4096..base + page * 4096 + 8)
            .is_err()
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Maps guest RAM the way the VMM does: a memfd, so a device can map it too.
fn guest_ram(size: u64) -> std::io::Result<Arc<Mapping>> {
    Ok(Arc::new(Mapping::new(
        MapBacking::Memfd,
        size,
        0,
        Thp::Default,
    )?))
}

fn main() -> Result<()> {
    let ram = guest_ram(GUEST_RAM)?;
    let vcpus = Arc::new(Vcpus::default());
    for id in 0..VCPUS {
        let (ram, vcpus) = (ram.clone(), vcpus.clone());
        std::thread::spawn(move || vcpu(id, ram, vcpus));
    }
    let listener = Listener::bind_tcp("127.0.0.1:0")?;
    let addr = listener.address();
    let source_done = Arc::new(Barrier::new(2));
    let dest_wait = source_done.clone();

    // ---- migration code. Both ends share a secret key, handed over privately (across
    // processes: `Key::write_new_file`, owner-only): the receiver challenges the sender with it.
    let key = Key::random();
    // Destination: map each announced region (here a memfd of its own), receive into it, and
    // get the vCPU state before the source is told it completed. Every call of the seam fails
    // with `precopy::Error<E>`, E the VMM's own error (here mmap's `io::Error`, a `Placement`).
    let dest_key = key.clone();
    let destination = std::thread::spawn(move || -> Result<_, precopy::Error<std::io::Error>> {
        let mut ram = None;
        let received = precopy::receive(&listener, &dest_key, |layout: &Layout| {
            let region = layout.regions()[0];
            let mine = guest_ram(region.size)?;
            ram = Some(mine.clone());
            Ok(vec![(region.id, Box::new(mine) as Box<dyn RegionMemory>)])
        })?;
        dest_wait.wait();
        Ok((ram, received.state))
    });

    // Source: guest memory described once; tracking, the wire and the placement come from it.
    let layout = Layout::new(vec![
        MemoryRegion::new(0, GUEST_RAM, 4096)
            .host(ram.addr())
            .guest(0)
            .backed_by(Backing::Memfd),
    ])?;
    let source = Source::track(&layout)?;
    let fd = ram.fd().expect("a memfd").try_clone_to_owned()?;
    let dma = Mapping::new(MapBacking::File(fd.into()), GUEST_RAM, 0, Thp::Default)?;
    let (dirty, dev, base) = (source.external_dirty(), vcpus.clone(), ram.addr());
    std::thread::spawn(move || device(dma, dirty, base, dev));
    // Pause and resume every writer; while paused, save the vCPUs' registers as the state.
    let (p, r, s) = (vcpus.clone(), vcpus.clone(), vcpus.clone());
    let workload =
        Callbacks::new(move || p.pause_all(), move || r.resume_all()).with_state(move || {
            Ok(s.regs
                .iter()
                .flat_map(|x| x.load(SeqCst).to_le_bytes())
                .collect())
        });
    let config = MigrationConfig {
        max_downtime: Duration::from_millis(50),
        ..MigrationConfig::default()
    };
    let conn = Connection::connect_tcp(addr.as_str())?;
    let report = source.migrate(conn, &key, workload, config)?;
    // ---- end of the migration code.

    source_done.wait();
    let (dest_ram, state) = destination.join().expect("destination thread")?;
    let dest_ram = dest_ram.expect("the destination mapped its guest RAM");
    println!("{report}");
    // The writers are still paused (the default: the destination takes over). Compare.
    let (mut a, mut b) = (vec![0u8; GUEST_RAM as usize], vec![0u8; GUEST_RAM as usize]);
    ram.read(0, &mut a)?;
    dest_ram.read(0, &mut b)?;
    assert_ne!(ram.addr(), dest_ram.addr());
    let regs: Vec<u64> = vcpus.regs.iter().map(|x| x.load(SeqCst)).collect();
    let sent: Vec<u8> = regs.iter().flat_map(|x| x.to_le_bytes()).collect();
    println!("destination memory equals the paused source: {}", a == b);
    println!(
        "vCPU registers arrived as state: {} ({regs:?})",
        state == sent
    );
    anyhow::ensure!(
        a == b && state == sent,
        "the destination differs from the source"
    );
    Ok(())
}
