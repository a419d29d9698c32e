//! The README's library section, compiled and run: the code between the two `----` markers in
//! `mod readme` is the README's first `rust` block, byte for byte (the first test checks), and
//! the second test migrates a memfd through it over loopback.

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

/// The VMM the README's code talks to: vCPUs that pause and resume, and their state.
#[derive(Debug, Default)]
struct Vm {
    paused: AtomicBool,
}

impl Vm {
    fn pause(&self) -> io::Result<()> {
        self.paused.store(true, SeqCst);
        Ok(())
    }

    fn resume(&self) -> io::Result<()> {
        self.paused.store(false, SeqCst);
        Ok(())
    }

    fn save_state(&self) -> io::Result<Vec<u8>> {
        Ok(b"vcpu0 rip=0xfff0".to_vec())
    }
}

#[rustfmt::skip]
mod readme {
use super::Vm;
// ---- README
use precopy::{Backing, Callbacks, Connection, Key, Layout, Listener, Mapping, MemoryRegion};
use precopy::{MigrationReport, RegionMemory};
use std::{io, sync::Arc};

// Both sides fail with one type: `precopy::Error<E>`, E your VMM's own error (below).
type Result<T> = std::result::Result<T, precopy::Error<io::Error>>;

// Source: guest memory described once (id, size, page size, guest-physical address, backing,
// and where it is mapped here). Tracking, the wire and the destination's placement come from it.
fn send_vm(ram: &Mapping, vm: Arc<Vm>, to: Connection, key: &Key) -> Result<MigrationReport> {
    let layout = Layout::new(vec![
        MemoryRegion::new(0, ram.len(), 4096).host(ram.addr()).guest(0).backed_by(Backing::Memfd),
    ])?;
    // Rounds while the vCPUs run; paused, the last round, then their state (registers, devices).
    let (p, r, s) = (vm.clone(), vm.clone(), vm);
    let vcpus = Callbacks::new(move || p.pause(), move || r.resume()).with_state(move || s.save_state());
    // `to`: your connection (`Connection::connect_tcp(addr)`, or `Connection::Tcp(stream)` of your
    // own socket); `key`: a secret both ends got privately (`Key::random()`, handed over a pipe
    // or an owner-only file).
    precopy::migrate(&layout, to, key, vcpus, Default::default())
}

// Destination: map each announced region yourself (anonymous, memfd, hugetlb); pages land there,
// and the state blob arrives, checked, before the source is told the migration completed.
fn receive_vm(listener: &Listener, key: &Key) -> Result<(Vec<Arc<Mapping>>, Vec<u8>)> {
    let mut ram = Vec::new();
    let received = precopy::receive(listener, key, |layout: &Layout| {
        let mut memory: Vec<(u32, Box<dyn RegionMemory>)> = Vec::new();
        for region in layout.regions() {
            let mapping = Arc::new(Mapping::anonymous(region.size)?);
            memory.push((region.id, Box::new(mapping.clone())));
            ram.push(mapping);
        }
        Ok(memory)
    })?;
    Ok((ram, received.state))
}
// ---- end of the README

/// The README's second block (the engine's rounds directly), as a function body.
#[allow(unused_variables, clippy::never_loop, unreachable_code)]
fn engine_rounds(guest_ram: std::ops::Range<u64>) -> anyhow::Result<()> {
// ---- README rounds
use precopy::scanner::{Scanner, ScanOptions};
use precopy::tracker::{Tracker, Uffd};

let mut tracker = Tracker::new(Uffd::new()?);        // fails clearly on a kernel without WP_ASYNC
tracker.register(guest_ram.start..guest_ram.end)?;   // page-aligned, mapped, not owned by another uffd
// Not private anonymous memory (memfd, hugetlb, files)? Changes made outside the page tables are
// invisible to rounds: the range is marked `verify` and precopy-migrate re-checks it at switch-over.
tracker.arm()?;                                      // write-protect everything: a clean start reports nothing
let mut scanner = Scanner::new(ScanOptions::default())?;  // self-tests the kernel once per process
loop {
    let round = scanner.round(&tracker)?;            // written since the last round, now re-protected
    for r in round.dirty() { /* read r AFTER round() returned, send it */ }
    for u in round.untracked() { /* no longer tracked (munmap, MAP_FIXED, mremap): send it whole */ }
}
// ---- end of the README rounds
}

/// The text of `file` between the first `open` and the `close` after it.
fn between<'a>(file: &'a str, open: &str, close: &str) -> Option<&'a str> {
    file.split_once(open)?.1.split_once(close).map(|(inside, _)| inside)
}

#[test]
fn the_readme_shows_this_code() {
    let block = between(include_str!("../README.md"), "```rust\n", "```\n");
    let code = between(include_str!("readme.rs"), "// ---- README\n", "// ---- end of the README\n");
    assert!(block.is_some() && code.is_some(), "a ```rust block in README.md, markers here");
    assert_eq!(block, code, "README.md's first rust block differs from tests/readme.rs");
    let readme = include_str!("../README.md").split_once("```rust\n").map(|(_, rest)| rest);
    let block = readme.and_then(|r| between(r, "```rust\n", "```\n"));
    let code = between(include_str!("readme.rs"), "// ---- README rounds\n", "// ---- end of the README rounds\n");
    assert!(block.is_some() && code.is_some(), "a second ```rust block in README.md, markers here");
    assert_eq!(block, code, "README.md's second rust block differs from tests/readme.rs");
    let _ = engine_rounds; // compiled, not run: it loops forever
}

#[test]
fn the_readme_migrates_a_vm() {
    use precopy::sys::mem::{Backing as MapBacking, Thp};
    let ram = Mapping::new(MapBacking::Memfd, 64 * 4096, 0, Thp::Default).unwrap();
    for page in 0..64 {
        ram.write_u64(page * 4096 + 8 * page, page + 1).unwrap();
    }
    let key = Key::random();
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let dest = listener.address();
    let destination = {
        let key = key.clone();
        std::thread::spawn(move || receive_vm(&listener, &key))
    };
    let vm = Arc::new(Vm::default());
    let to = Connection::connect_tcp(dest.as_str()).unwrap();
    let report = send_vm(&ram, vm.clone(), to, &key).expect("migration");
    let (dst, state) = destination.join().unwrap().expect("destination");
    assert_eq!(report.state_bytes, Some(state.len() as u64));
    assert_eq!(state, b"vcpu0 rip=0xfff0");
    assert!(vm.paused.load(super::SeqCst), "left paused: the destination takes over");
    let (mut a, mut b) = (vec![0u8; 64 * 4096], vec![0u8; 64 * 4096]);
    ram.read(0, &mut a).unwrap();
    dst[0].read(0, &mut b).unwrap();
    assert!(a == b, "the destination's memory differs from the source's");
}
}
