//! The seam a VMM embeds: memory described once, received into memory the destination mapped
//! itself (memfd, hugetlb) at another host address, and the state blob sent after the last round.
//!
//! Each test runs a real migration of this process's own memory: a "vCPU" thread keeps writing
//! the source until the driver pauses it, the driver tracks the memory through the layout's
//! regions (uffd async write-protect), and a receiver on loopback writes into the destination's
//! own mapping.

mod common;

use common::*;
use precopy::migrate::{MarkError, TrackingError};
use precopy::sys::mem::{Backing as MapBacking, Mapping, Thp};
use precopy::transfer::{ProtocolError, TransferError};
use precopy::{
    Backing, Callbacks, Connection, Key, Layout, Listener, MemoryRegion, MigrationConfig, Received,
    RegionMemory,
};
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The source end of one test migration: a vCPU thread writing `src` while not paused, and a
/// workload whose state blob is `state(write count)`.
struct Vcpu {
    thread: std::thread::JoinHandle<()>,
    run: Arc<RunState>,
    /// The blob the workload handed to the driver.
    sent: Arc<Mutex<Vec<u8>>>,
}

/// A pause request, whether the vCPU parked, and a request to exit.
#[derive(Default)]
struct RunState {
    pause: AtomicBool,
    parked: AtomicBool,
    exit: AtomicBool,
}

impl Vcpu {
    /// Ends the vCPU thread; returns whether the workload was left paused.
    fn exit(self) -> bool {
        let paused = self.run.pause.load(SeqCst);
        self.run.exit.store(true, SeqCst);
        self.thread.join().unwrap();
        paused
    }
}

fn vcpu(src: Arc<Mapping>, state: fn(u64) -> Vec<u8>) -> (Vcpu, Callbacks<Infallible>) {
    let run = Arc::new(RunState::default());
    let writes = Arc::new(AtomicU64::new(0));
    let thread = {
        let (run, writes) = (run.clone(), writes.clone());
        std::thread::spawn(move || {
            let pages = src.len() / PAGE;
            let mut n = 0u64;
            while !run.exit.load(SeqCst) {
                if run.pause.load(SeqCst) {
                    run.parked.store(true, SeqCst);
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                run.parked.store(false, SeqCst);
                n += 1;
                src.write_u64((n * 7919 % pages) * PAGE + (n % 512) * 8, n)
                    .unwrap();
                writes.store(n, SeqCst);
                if n.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let sent = Arc::new(Mutex::new(Vec::new()));
    let workload = {
        let (pause, resume, sent) = (run.clone(), run.clone(), sent.clone());
        Callbacks::new(
            move || {
                pause.pause.store(true, SeqCst);
                while !pause.parked.load(SeqCst) {
                    std::thread::yield_now();
                }
                Ok(())
            },
            move || {
                resume.parked.store(false, SeqCst);
                resume.pause.store(false, SeqCst);
                Ok(())
            },
        )
        .with_state(move || {
            let blob = state(writes.load(SeqCst));
            *sent.lock().unwrap() = blob.clone();
            Ok(blob)
        })
    };
    (Vcpu { thread, run, sent }, workload)
}

/// Region 7 of `src`'s size, at guest address 4 GiB.
fn layout_of(src: &Mapping, page_size: u64, backing: Backing) -> Layout {
    Layout::new(vec![
        MemoryRegion::new(7, src.len(), page_size)
            .host(src.addr())
            .guest(1 << 32)
            .backed_by(backing),
    ])
    .expect("layout")
}

/// The destination: `precopy::receive` into `dst`, checking what the wire announced.
fn destination(
    listener: Listener,
    key: Key,
    dst: Arc<Mapping>,
    backing: Backing,
) -> std::thread::JoinHandle<Result<Received, precopy::Error<std::io::Error>>> {
    std::thread::spawn(move || {
        precopy::receive(&listener, &key, |announced: &Layout| {
            let region = announced.region(7).copied().expect("region 7 announced");
            assert_eq!(
                (region.guest_addr, region.backing, region.host_addr),
                (Some(1 << 32), Some(backing), None),
                "the wire carries guest address and backing, never the source's host address"
            );
            Ok::<_, std::io::Error>(vec![(7, Box::new(dst) as Box<dyn RegionMemory>)])
        })
    })
}

fn config() -> MigrationConfig {
    MigrationConfig {
        max_downtime: Duration::from_millis(50),
        ..MigrationConfig::default()
    }
}

/// Migrates `src` (described as one region of `page_size` pages backed by `backing`) into `dst`
/// through the facade (`precopy::migrate`, `precopy::receive`), with a vCPU thread writing `src`
/// until paused and a state blob holding its write count. Returns that state blob as the
/// destination received it.
fn migrate(src: Arc<Mapping>, dst: Arc<Mapping>, page_size: u64, backing: Backing) -> Vec<u8> {
    let layout = layout_of(&src, page_size, backing);
    let key = Key::random();
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let conn = Connection::connect_tcp(listener.address().as_str()).unwrap();
    let dest = destination(listener, key.clone(), dst, backing);
    let (vcpu, workload) = vcpu(src, |n| n.to_le_bytes().to_vec());
    let report = precopy::migrate(&layout, conn, &key, workload, config()).expect("migration");
    let received = dest.join().unwrap().expect("destination");
    assert_eq!(report.state_bytes, Some(8));
    assert_eq!(received.report.state_bytes, Some(8));
    assert_eq!(received.state, *vcpu.sent.lock().unwrap());
    assert!(vcpu.exit(), "left paused for the destination");
    received.state
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
        precopy::Source::track(&layout).map(|_| ())
    };
    for (page_size, backing) in [(PAGE, Backing::Memfd), (PAGE, Backing::Hugetlb)] {
        let err = wrong(page_size, backing).unwrap_err();
        assert!(
            matches!(
                &err,
                precopy::TrackError::Tracking(TrackingError::Mismatch { region: 0, .. })
            ),
            "{err:?}"
        );
    }
    wrong(PAGE, Backing::Anonymous).expect("the true description is accepted");
}

/// A state blob of `n` bytes no page of the test memory holds (so a proxy can find it on the
/// wire), derived from the vCPU's write count.
fn vcpu_state(writes: u64) -> Vec<u8> {
    let mut blob = b"vcpu-state:".to_vec();
    blob.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1));
    blob.extend_from_slice(&writes.to_le_bytes());
    blob
}

/// Forwards one TCP connection from `front` to `back`, flipping one bit inside the first
/// occurrence of `needle` in the source-to-destination direction. Returns whether it flipped.
fn corrupting_proxy(
    front: TcpListener,
    back: String,
    needle: Vec<u8>,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let (mut from_src, _) = front.accept().unwrap();
        let mut to_dst = TcpStream::connect(back).unwrap();
        let (mut from_dst, mut to_src) =
            (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        let back_channel = std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_dst, &mut to_src);
            let _ = to_src.shutdown(Shutdown::Both);
        });
        // Forward each read at once (the handshake waits for replies); match against the
        // last bytes forwarded plus this read, and flip the needle's last byte, which is in
        // this read.
        let (mut seen, mut buf, mut flipped) = (Vec::new(), vec![0u8; 1 << 16], false);
        loop {
            let n = from_src.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            if !flipped {
                seen.extend_from_slice(&buf[..n]);
                if let Some(at) = seen.windows(needle.len()).position(|w| w == needle) {
                    let last = at + needle.len() - 1 - (seen.len() - n);
                    buf[last] ^= 0x10;
                    flipped = true;
                }
                seen.drain(..seen.len().saturating_sub(needle.len() - 1));
            }
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_dst.shutdown(Shutdown::Both);
        let _ = from_src.shutdown(Shutdown::Both);
        back_channel.join().unwrap();
        flipped
    })
}

#[test]
fn the_state_blob_round_trips_and_a_corrupted_one_is_refused() {
    // Intact: the destination gets exactly the blob the workload saved.
    let len = 64 * PAGE;
    let src = Arc::new(anon(64));
    src.fill(0, len, 0x11).unwrap();
    let dst = Arc::new(anon(64));
    let layout = layout_of(&src, PAGE, Backing::Anonymous);
    let key = Key::random();
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let conn = Connection::connect_tcp(listener.address().as_str()).unwrap();
    let dest = destination(listener, key.clone(), dst.clone(), Backing::Anonymous);
    let (vcpu_a, workload) = vcpu(src.clone(), vcpu_state);
    precopy::migrate(&layout, conn, &key, workload, config()).expect("migration");
    let received = dest.join().unwrap().expect("destination");
    assert_eq!(received.state, *vcpu_a.sent.lock().unwrap());
    assert!(received.state.starts_with(b"vcpu-state:"));
    assert!(vcpu_a.exit());
    assert_same(&src, &dst);

    // One bit flipped in the blob on its way: the destination refuses it and never
    // acknowledges, the source's migration fails and its workload runs again.
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let back = listener.address();
    let dest = destination(listener, key.clone(), dst, Backing::Anonymous);
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let conn = Connection::connect_tcp(front.local_addr().unwrap()).unwrap();
    let proxy = corrupting_proxy(front, back, vcpu_state(0)[..64].to_vec());
    let (vcpu_b, workload) = vcpu(src, vcpu_state);
    let err = precopy::migrate(&layout, conn, &key, workload, config()).unwrap_err();
    assert!(matches!(err, precopy::Error::Migration(_)), "{err:?}");
    let refused = dest.join().unwrap().unwrap_err();
    assert!(
        proxy.join().unwrap(),
        "the proxy found the state blob on the wire"
    );
    assert!(
        matches!(
            refused,
            precopy::Error::Transfer(TransferError::Protocol(
                ProtocolError::BadChecksum { .. } | ProtocolError::StateChecksum { .. }
            ))
        ),
        "{refused:?}"
    );
    assert!(!vcpu_b.exit(), "a failed migration resumes the source");
}

/// A VMM's migration function in the seam's one error type: the layout, tracking and the
/// migration all convert with `?`.
fn migrate_as_a_vmm(
    src: &Mapping,
    to: Connection,
    key: &Key,
    workload: Callbacks<std::io::Error>,
) -> Result<precopy::MigrationReport, precopy::Error<std::io::Error>> {
    let layout = Layout::new(vec![
        MemoryRegion::new(7, src.len(), PAGE)
            .host(src.addr())
            .guest(1 << 32)
            .backed_by(Backing::Anonymous),
    ])?;
    let source = precopy::Source::track(&layout)?;
    source.migrate(to, key, workload, config())
}

fn connect(addr: &str) -> Connection {
    Connection::connect_tcp(addr).unwrap()
}

/// A workload that never fails.
fn idle() -> Callbacks<std::io::Error> {
    Callbacks::new(|| Ok(()), || Ok(()))
}

#[test]
fn the_embedders_own_error_comes_back_as_the_cause() {
    // The source's workload cannot pause: the migration fails with that very error, the
    // destination is never acknowledged.
    let src = anon(16);
    let key = Key::random();
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let addr = listener.address();
    let dest = destination(
        listener,
        key.clone(),
        Arc::new(anon(16)),
        Backing::Anonymous,
    );
    let stuck = Callbacks::new(
        || Err(std::io::Error::other("vCPU 1 did not exit")),
        || Ok(()),
    );
    let err = migrate_as_a_vmm(&src, connect(&addr), &key, stuck).unwrap_err();
    assert_eq!(
        err.embedder().map(ToString::to_string).as_deref(),
        Some("vCPU 1 did not exit"),
        "{err:?}"
    );
    assert!(matches!(err, precopy::Error::Migration(_)), "{err:?}");
    assert!(
        dest.join().unwrap().is_err(),
        "the destination acknowledged"
    );

    // A layout that contradicts itself is `Error::Layout`, before anything starts.
    let bad = Layout::new(vec![MemoryRegion::new(0, PAGE, 3000)])
        .map_err(precopy::Error::<std::io::Error>::from)
        .unwrap_err();
    assert!(matches!(bad, precopy::Error::Layout(_)), "{bad:?}");
    assert!(bad.embedder().is_none());

    // The destination cannot map the announced memory: `Error::Placement` with its error,
    // and the source's migration fails without an acknowledgement.
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let addr = listener.address();
    let dest_key = key.clone();
    let dest = std::thread::spawn(move || {
        precopy::receive(&listener, &dest_key, |_: &Layout| {
            Err::<Vec<(u32, Box<dyn RegionMemory>)>, _>(std::io::Error::other("no hugetlb pool"))
        })
    });
    let source = migrate_as_a_vmm(&src, connect(&addr), &key, idle());
    let refused = dest.join().unwrap().unwrap_err();
    assert!(
        matches!(refused, precopy::Error::Placement(_)),
        "{refused:?}"
    );
    assert_eq!(
        refused.embedder().map(ToString::to_string).as_deref(),
        Some("no hugetlb pool")
    );
    let source = source.unwrap_err();
    assert!(
        matches!(
            source,
            precopy::Error::Migration(_) | precopy::Error::Transfer(_)
        ),
        "the source completed without a destination: {source:?}"
    );
    assert!(source.embedder().is_none());
}

#[test]
fn a_region_reaching_into_another_mapping_is_refused() {
    // A memfd whose second half was replaced by anonymous memory, as a region stated too large
    // reaches into whatever is mapped next: two objects, refused with or without a backing.
    let mem = Mapping::new(MapBacking::Memfd, 4 * PAGE, 0, Thp::Default).unwrap();
    mem.replace_anonymous(2 * PAGE, 2 * PAGE).unwrap();
    for backing in [Some(Backing::Memfd), None] {
        let mut region = MemoryRegion::new(0, mem.len(), PAGE).host(mem.addr());
        if let Some(b) = backing {
            region = region.backed_by(b);
        }
        let err = precopy::Source::track(&Layout::new(vec![region]).unwrap()).unwrap_err();
        assert!(
            matches!(
                &err,
                precopy::TrackError::Tracking(TrackingError::Spans { region: 0, at, .. })
                    if *at == mem.addr() + 2 * PAGE
            ),
            "{err:?}"
        );
    }
    // The memfd half alone is one object.
    let half = MemoryRegion::new(0, 2 * PAGE, PAGE)
        .host(mem.addr())
        .backed_by(Backing::Memfd);
    precopy::Source::track(&Layout::new(vec![half]).unwrap()).expect("one memfd");
}

#[test]
fn external_dirty_refuses_ranges_outside_the_layout_and_marks_after_the_source_is_gone() {
    let mem = anon(16);
    let source = precopy::Source::track(&layout_of(&mem, PAGE, Backing::Anonymous)).unwrap();
    let dirty = source.external_dirty();
    dirty
        .mark(mem.addr() + PAGE..mem.addr() + PAGE + 8)
        .unwrap();
    // The region's guest-physical address (4 GiB), and a range running past its end.
    let end = mem.addr() + mem.len();
    for (start, end) in [(1 << 32, (1 << 32) + 8), (end - 8, end + 8)] {
        assert_eq!(
            dirty.mark(start..end),
            Err(MarkError::OutsideMemory { start, end })
        );
    }
    drop(source);
    assert_eq!(
        dirty.mark(mem.addr()..mem.addr() + 8),
        Err(MarkError::Closed)
    );
}

#[test]
fn a_source_reports_progress_and_a_cancel_resumes_the_workload() {
    let len = 64 * PAGE;
    let src = Arc::new(anon(64));
    src.fill(0, len, 0x42).unwrap();
    let layout = layout_of(&src, PAGE, Backing::Anonymous);
    let key = Key::random();
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let conn = Connection::connect_tcp(listener.address().as_str()).unwrap();
    let dest = destination(
        listener,
        key.clone(),
        Arc::new(anon(64)),
        Backing::Anonymous,
    );
    let source = precopy::Source::track(&layout).unwrap();
    // The management thread's cancel, here from the first progress report.
    let cancel = source.cancel_handle();
    let rounds = Arc::new(Mutex::new(Vec::new()));
    let seen = rounds.clone();
    let source = source.on_progress(move |p| {
        seen.lock().unwrap().push(p.round);
        cancel.cancel();
    });
    let (vcpu, workload) = vcpu(src, |n| n.to_le_bytes().to_vec());
    let err = source.migrate(conn, &key, workload, config()).unwrap_err();
    assert!(
        matches!(
            &err,
            precopy::Error::Migration(m) if matches!(**m, precopy::migrate::Error::Cancelled { .. })
        ),
        "{err:?}"
    );
    assert_eq!(
        rounds.lock().unwrap().first(),
        Some(&0),
        "reported before round 0"
    );
    assert!(
        dest.join().unwrap().is_err(),
        "a cancelled copy was acknowledged"
    );
    assert!(!vcpu.exit(), "a cancelled migration resumes the source");
}
