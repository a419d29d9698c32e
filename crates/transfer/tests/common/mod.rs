//! Helpers shared by the behaviour tests.
#![allow(dead_code)]

use std::ops::Range;
use std::thread::JoinHandle;

use precopy_transfer::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

pub const PS: u64 = 4096;

/// Memory of `pages` pages: mostly random bytes, every 7th page all zeros,
/// every 5th page highly compressible.
pub fn memory(pages: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; pages * PS as usize];
    for (i, page) in v.chunks_mut(PS as usize).enumerate() {
        if i % 7 == 3 {
            continue;
        }
        if i % 5 == 0 {
            page.fill((i % 251) as u8 + 1);
            page[..8].copy_from_slice(&(i as u64).to_le_bytes());
        } else {
            rng.fill(page);
        }
    }
    v
}

/// Rewrites `count` random pages (some become zero), returning their ranges.
pub fn redirty(mem: &mut [u8], base: u64, count: usize, rng: &mut StdRng) -> Vec<Range<u64>> {
    let pages = mem.len() / PS as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        let p = rng.random_range(0..pages);
        let page = &mut mem[p * PS as usize..(p + 1) * PS as usize];
        if rng.random_bool(0.2) {
            page.fill(0);
        } else {
            rng.fill(page);
        }
        let a = base + p as u64 * PS;
        out.push(a..a + PS);
    }
    out
}

pub enum Net {
    Tcp,
    Unix,
}

/// A listener on loopback TCP or a fresh Unix socket, and how to connect.
pub fn listen(
    net: &Net,
) -> (
    Listener,
    Box<dyn Fn() -> Connection + Send>,
    Option<tempfile::TempDir>,
) {
    match net {
        Net::Tcp => {
            let l = Listener::bind_tcp("127.0.0.1:0").unwrap();
            let Listener::Tcp(t) = &l else { unreachable!() };
            let addr = t.local_addr().unwrap();
            (
                l,
                Box::new(move || Connection::connect_tcp(addr).unwrap()),
                None,
            )
        }
        Net::Unix => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("sock");
            let l = Listener::bind_unix(&path).unwrap();
            (
                l,
                Box::new(move || Connection::connect_unix(&path).unwrap()),
                Some(dir),
            )
        }
    }
}

/// Starts a receiver into a [`MemorySink`]; joins to its report and memory.
pub fn spawn_receiver(
    listener: Listener,
    config: ReceiverConfig,
) -> JoinHandle<Result<(ReceiveReport, Vec<u8>), TransferError>> {
    std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &config)?;
        let mut dest = MemorySink::new(rx.layout().clone())?;
        let report = rx.run(&mut dest)?;
        Ok((report, dest.memory().expect("owned memory").to_vec()))
    })
}

/// The key both ends of a test share (every TCP receiver requires one).
pub fn test_key() -> Key {
    Key::from_bytes(b"precopy test key, not a secret".to_vec()).unwrap()
}

/// Sender settings of the tests: the defaults plus [`test_key`].
pub fn sender_config() -> SenderConfig {
    SenderConfig {
        key: Some(test_key()),
        ..SenderConfig::default()
    }
}

/// Receiver settings of the tests: the defaults plus [`test_key`].
pub fn receiver_config() -> ReceiverConfig {
    ReceiverConfig {
        key: Some(test_key()),
        ..ReceiverConfig::default()
    }
}
