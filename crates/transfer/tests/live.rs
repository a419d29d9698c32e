//! Sending this process's own memory without a copy (`OwnMemory`, live frames): pages written
//! while they are sent arrive torn, are tolerated only until a later copy replaces them, and a
//! torn page never sent again fails the transfer.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{Net, PS, listen, receiver_config, sender_config, spawn_receiver};
use precopy_sys::mem::Mapping;
use precopy_transfer::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn filled(pages: u64) -> Arc<Mapping> {
    let m = Arc::new(Mapping::anonymous(pages * PS).unwrap());
    for p in 0..pages {
        if p % 9 != 4 {
            m.fill(p * PS, PS, (p % 251) as u8 + 1).unwrap();
        }
    }
    m
}

fn snapshot(m: &Mapping) -> Vec<u8> {
    let mut v = vec![0u8; m.len() as usize];
    m.read(0, &mut v).unwrap();
    v
}

/// Writers change random pages while three live rounds send all memory; then they stop and a
/// final round sends all of it again. The destination must equal the source byte for byte.
fn concurrent_writers(net: Net, streams: usize) {
    concurrent_writers_with(net, streams, true);
}

/// As [`concurrent_writers`], lent pages sent with `splice` or `writev`.
fn concurrent_writers_with(net: Net, streams: usize, splice: bool) {
    let pages = 2048u64;
    let m = filled(pages);
    let (listener, connect, _dir) = listen(&net);
    let rx = spawn_receiver(listener, receiver_config());
    let layout = Layout::single(PS, m.addr(), m.len()).unwrap();
    let config = SenderConfig {
        streams,
        splice,
        ..sender_config()
    };
    let mut tx = Sender::connect(
        (0..streams).map(|_| connect()).collect(),
        layout,
        OwnMemory::new([m.clone()]),
        &config,
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (m, stop, started) = (m.clone(), stop.clone(), started.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(w);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let p = rng.random_range(0..pages);
                    // Whole-page writes make tears likely: the kernel reads the page mid-fill.
                    m.fill(p * PS, PS, rng.random()).unwrap();
                    if n == 0 {
                        started.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Both writers are writing before the first live round (on a loaded machine a thread can
    // wait for a CPU until the rounds are over, and the test would check nothing concurrent).
    let waiting = std::time::Instant::now();
    while started.load(Ordering::Relaxed) < 2 {
        assert!(
            waiting.elapsed() < std::time::Duration::from_secs(60),
            "writers never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let all = [m.addr()..m.addr() + m.len()];
    for _ in 0..3 {
        let sent = tx.send_round(&all).unwrap();
        // Live frames carry one 4-byte CRC per page: the lent path was taken.
        assert!(sent.bytes_on_wire >= sent.pages * (PS + 4), "{sent:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(writes > 0);
    // Source stopped: the final round.
    tx.send_round(&all).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let (report, dest) = rx.join().unwrap().unwrap();
    let src = snapshot(&m);
    let bad = dest
        .chunks(PS as usize)
        .zip(src.chunks(PS as usize))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(bad, 0, "{bad} pages differ");
    eprintln!(
        "{writes} page writes during the live rounds; {} page(s) arrived torn and were sent again",
        report.changed_while_sent
    );
}

#[test]
fn own_memory_with_concurrent_writers_over_tcp() {
    concurrent_writers(Net::Tcp, 1);
}

#[test]
fn own_memory_with_concurrent_writers_over_unix_two_streams() {
    concurrent_writers(Net::Unix, 2);
}

/// Sends pages 0..4 lent, claiming a wrong CRC for page 2 (as if it changed after its snapshot);
/// `resend` then sends page 2 again in a later round, lent with its right CRC.
/// What the sender's finish, the receiver and the source memory came to.
type Torn = (
    Result<(), TransferError>,
    Result<(ReceiveReport, Vec<u8>), TransferError>,
    Vec<u8>,
);

fn torn_page(streams: usize, resend: bool) -> Torn {
    torn_page_of(streams, resend, 4, 2)
}

/// As [`torn_page`], with pages `0..lent` lent in one send (one frame) and page `torn` claimed
/// wrong; then the rest of 8 more pages sent as copies.
fn torn_page_of(streams: usize, resend: bool, lent_pages: u64, torn: usize) -> Torn {
    let m = filled(lent_pages + 8);
    let (listener, connect, _dir) = listen(&Net::Tcp);
    let rx = spawn_receiver(listener, receiver_config());
    let layout = Layout::single(PS, m.addr(), m.len()).unwrap();
    let config = SenderConfig {
        streams,
        ..sender_config()
    };
    let mut sink =
        SocketSink::connect((0..streams).map(|_| connect()).collect(), &layout, &config).unwrap();
    let src = snapshot(&m);
    let crcs: Vec<u64> = src.chunks(PS as usize).map(digest::page_hash).collect();
    let lent = |first: u64, n: u64| {
        LivePages::new(
            m.clone(),
            m.addr() + first * PS..m.addr() + (first + n) * PS,
        )
        .unwrap()
    };
    let split = lent_pages as usize;
    sink.begin_round(0).unwrap();
    let mut claimed = crcs[..split].to_vec();
    claimed[torn] ^= 0x5a5a;
    sink.send_live_pages(0, lent(0, lent_pages), &claimed)
        .unwrap();
    sink.send_pages(
        lent_pages * PS,
        PageBuf::from_vec(src[split * PS as usize..].to_vec()),
        &crcs[split..],
    )
    .unwrap();
    sink.end_round(0).unwrap();
    if resend {
        sink.begin_round(1).unwrap();
        sink.send_live_pages(
            torn as u64 * PS,
            lent(torn as u64, 1),
            &crcs[torn..torn + 1],
        )
        .unwrap();
        sink.end_round(1).unwrap();
    }
    let digest = memory_checksum(&mut ProcessMemory::current(), &layout).unwrap();
    let finished = sink.finish(digest, FinalCheck::Recorded);
    (finished, rx.join().unwrap(), src)
}

#[test]
fn a_torn_page_never_sent_again_fails_the_transfer() {
    for streams in [1, 2] {
        let (sent, received, _) = torn_page(streams, false);
        let err = received.unwrap_err();
        assert!(
            matches!(err, TransferError::ChangedWhileSent { pages: 1, first } if first == 2 * PS),
            "{err:?}"
        );
        assert!(
            matches!(&sent, Err(TransferError::PeerRejected { message, .. }) if message.contains("changed while")),
            "{sent:?}"
        );
    }
}

/// A frame of 600 lent pages (2.3 MiB) is read in several reads of at most `HASH_AS_READ`;
/// a page torn in a later read still lands in the changed set, and fails the transfer unless
/// it is sent again.
#[test]
fn a_torn_page_deep_in_a_large_frame_is_caught() {
    let torn = 555;
    let (sent, received, _) = torn_page_of(1, false, 600, torn);
    let err = received.unwrap_err();
    assert!(
        matches!(err, TransferError::ChangedWhileSent { pages: 1, first } if first == torn as u64 * PS),
        "{err:?}"
    );
    assert!(sent.is_err(), "{sent:?}");
    let (sent, received, src) = torn_page_of(1, true, 600, torn);
    sent.unwrap();
    let (report, dest) = received.unwrap();
    assert_eq!(report.changed_while_sent, 1);
    assert_eq!(dest, src);
}

#[test]
fn a_torn_page_sent_again_intact_is_accepted() {
    for streams in [1, 2] {
        let (sent, received, src) = torn_page(streams, true);
        sent.unwrap();
        let (report, dest) = received.unwrap();
        assert_eq!(report.changed_while_sent, 1);
        assert_eq!(dest, src);
    }
}

#[test]
fn other_sinks_get_a_checked_copy_of_lent_pages() {
    // A memory sink is not a socket: lent pages reach it as a copy whose CRCs it takes itself.
    let m = filled(16);
    let layout = Layout::single(PS, m.addr(), m.len()).unwrap();
    let mut tx = Transfer::new(
        OwnMemory::new([m.clone()]),
        MemorySink::new(layout.clone()).unwrap(),
        layout,
        4,
    )
    .unwrap();
    tx.send_round(&[m.addr()..m.addr() + m.len()]).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let (_, sink) = tx.into_parts();
    assert_eq!(sink.memory(), Some(&snapshot(&m)[..]));
}

#[test]
fn a_socket_sink_hashes_lent_pages_itself_and_reports_each_hash() {
    // The engine's path for its own memory: the writer takes the hashes right before its write.
    for streams in [1, 2] {
        let m = filled(40);
        let (listener, connect, _dir) = listen(&Net::Tcp);
        let rx = spawn_receiver(listener, receiver_config());
        let layout = Layout::single(PS, m.addr(), m.len()).unwrap();
        let config = SenderConfig {
            streams,
            ..sender_config()
        };
        let mut sink =
            SocketSink::connect((0..streams).map(|_| connect()).collect(), &layout, &config)
                .unwrap();
        assert!(sink.hashes_live_pages());
        let src = snapshot(&m);
        let want: Vec<u64> = src.chunks(PS as usize).map(digest::page_hash).collect();
        let mut got = vec![None; want.len()];
        sink.begin_round(0).unwrap();
        for (first, n) in [(0u64, 8u64), (8, 1), (9, 31)] {
            let pages = LivePages::new(
                m.clone(),
                m.addr() + first * PS..m.addr() + (first + n) * PS,
            )
            .unwrap();
            sink.send_unhashed_live_pages(first * PS, pages).unwrap();
        }
        sink.end_round(0).unwrap();
        sink.take_live_hashes(&mut |offset, hashes| {
            for (i, &h) in hashes.iter().enumerate() {
                let page = (offset / PS) as usize + i;
                assert!(got[page].replace(h).is_none(), "page {page} reported twice");
            }
        });
        let got: Vec<u64> = got
            .into_iter()
            .map(|h| h.expect("every page reported"))
            .collect();
        assert_eq!(got, want);
        // Nothing is reported twice.
        sink.take_live_hashes(&mut |offset, _| panic!("{offset} reported again"));
        let digest = memory_checksum(&mut ProcessMemory::current(), &layout).unwrap();
        sink.finish(digest, FinalCheck::Recorded).unwrap();
        let (report, dest) = rx.join().unwrap().unwrap();
        assert_eq!(report.changed_while_sent, 0);
        assert_eq!(dest, src);
    }
}

/// Sends 4 lent pages in round 0 to a receiver that has done its handshake but reads nothing
/// yet, writes page 1 after round 0 went out, lets the receiver read, and sends page 1 again in
/// round 1 (as the tracker would report it). Returns how many pages the receiver found torn.
fn written_after_its_send(net: Net, splice: bool) -> u64 {
    let m = filled(4);
    let (listener, connect, _dir) = listen(&net);
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let rx = std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &receiver_config())?;
        let mut dest = MemorySink::new(rx.layout().clone())?;
        wait.recv().expect("the test's go");
        let report = rx.run(&mut dest)?;
        Ok::<_, TransferError>((report, dest.memory().expect("owned memory").to_vec()))
    });
    let layout = Layout::single(PS, m.addr(), m.len()).unwrap();
    let config = SenderConfig {
        splice,
        ..sender_config()
    };
    let mut tx = Sender::connect(
        vec![connect()],
        layout,
        OwnMemory::new([m.clone()]),
        &config,
    )
    .unwrap();
    let all = m.addr()..m.addr() + m.len();
    let sent = tx.send_round(std::slice::from_ref(&all)).unwrap();
    assert_eq!(sent.pages, 4);
    // Round 0 is in the socket, not yet read: the workload writes page 1.
    m.fill(PS, PS, 0xEE).unwrap();
    go.send(()).unwrap();
    tx.send_round(&[m.addr() + PS..m.addr() + 2 * PS]).unwrap();
    tx.finish(FinalCheck::Recorded).unwrap();
    let (report, dest) = rx.join().unwrap().unwrap();
    assert_eq!(dest, snapshot(&m), "destination differs from the source");
    report.changed_while_sent
}

/// With splice (`SenderConfig::splice`) the kernel reads a lent page when the receiver copies
/// it, not when the writer sends it: a page written in between reaches the receiver unlike its
/// listed hash, is held in the changed set, and the next round's copy verifies. The transfer proves the end
/// result as for a page torn during a `writev`.
#[test]
fn a_page_written_after_its_splice_arrives_changed_and_is_sent_again() {
    for net in [Net::Tcp, Net::Unix] {
        assert_eq!(written_after_its_send(net, true), 1);
    }
}

/// With `writev` the page is copied during the send: the same write reaches the receiver only
/// with the next round.
#[test]
fn a_page_written_after_its_writev_arrives_as_sent() {
    for net in [Net::Tcp, Net::Unix] {
        assert_eq!(written_after_its_send(net, false), 0);
    }
}

#[test]
fn own_memory_with_concurrent_writers_over_tcp_by_writev() {
    concurrent_writers_with(Net::Tcp, 1, false);
}

/// A paced transfer over two streams feeds them in turns: one stream's lent pages are written
/// at the rate limit before the other gets any, so one connection stays silent for most of the
/// round (here about 3 s of 1 MiB at 256 KiB/s) while the other makes progress. The receiver's
/// silence bound (300 ms) is the sender's, not one connection's: the transfer completes. It
/// failed with "receiving frames from ...: no progress for 300ms" when each connection had
/// its own.
#[test]
fn a_paced_two_stream_transfer_outlasts_a_short_io_timeout() {
    let pages = 256u64;
    let m = filled(pages);
    let (listener, connect, _dir) = listen(&Net::Tcp);
    let rx = spawn_receiver(
        listener,
        ReceiverConfig {
            io_timeout: Some(std::time::Duration::from_millis(300)),
            ..receiver_config()
        },
    );
    let config = SenderConfig {
        streams: 2,
        bandwidth_limit: Some(256 << 10),
        ..sender_config()
    };
    let mut tx = Sender::connect(
        (0..2).map(|_| connect()).collect(),
        Layout::single(PS, m.addr(), m.len()).unwrap(),
        OwnMemory::new([m.clone()]),
        &config,
    )
    .unwrap();
    let all = [m.addr()..m.addr() + m.len()];
    let sent = tx.send_round(&all);
    let finished = sent.and_then(|_| tx.finish(FinalCheck::Full));
    let received = rx.join().unwrap();
    finished.unwrap();
    let (_, dest) = received.unwrap();
    assert!(dest == snapshot(&m), "destination differs from the source");
}
