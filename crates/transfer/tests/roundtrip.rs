//! Round trips through every sink: after the final frame, destination memory
//! equals source memory.

mod common;

use common::*;
use precopy_transfer::*;
use rand::{SeedableRng, rngs::StdRng};

const BASE: u64 = 0x7000_0000;

fn socket_roundtrip(
    net: Net,
    config: SenderConfig,
    pages: usize,
    rounds: usize,
) -> TransferSummary {
    let (listener, connect, _dir) = listen(&net);
    let rx = spawn_receiver(listener, receiver_config());
    let layout = Layout::single(PS, BASE, pages as u64 * PS).unwrap();
    let conns = (0..config.streams).map(|_| connect()).collect();
    let mut tx = Sender::connect(
        conns,
        layout.clone(),
        SliceSource::new(BASE, memory(pages, 1)),
        &config,
    )
    .unwrap();
    let all = BASE..BASE + pages as u64 * PS;
    let first = tx.send_round(std::slice::from_ref(&all)).unwrap();
    assert_eq!(first.pages + first.zero_pages, pages as u64);
    assert!(
        first.zero_pages >= (pages / 7) as u64,
        "zero pages travel as markers"
    );
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 1..rounds {
        let dirty = redirty(tx.source_mut().data_mut(), BASE, pages / 4, &mut rng);
        let sent = tx.send_round(&dirty).unwrap();
        assert!(sent.pages + sent.zero_pages <= (pages / 4) as u64);
    }
    let summary = tx.finish(FinalCheck::Full).unwrap();
    let (report, dest) = rx.join().unwrap().unwrap();
    let (source, _) = tx.into_parts();
    assert!(dest == source.data(), "destination differs from source");
    assert_eq!(report.rounds, rounds as u64);
    assert_eq!(report.checksum, summary.checksum);
    assert_eq!(report.pages, summary.pages);
    assert_eq!(report.zero_pages, summary.zero_pages);
    assert_eq!(report.streams as usize, config.streams);
    summary
}

/// A compressed transfer put fewer bytes on the wire than the pages it sent
/// (a fifth of the test memory is compressible).
fn assert_compressed(summary: &TransferSummary) {
    let raw = summary.pages * PS;
    assert!(
        summary.bytes_on_wire < raw * 9 / 10,
        "{} bytes on the wire for {raw} bytes of pages: compression did nothing",
        summary.bytes_on_wire
    );
}

#[test]
fn tcp_roundtrip_uncompressed() {
    socket_roundtrip(Net::Tcp, sender_config(), 300, 3);
}

#[test]
fn unix_roundtrip_uncompressed() {
    socket_roundtrip(Net::Unix, sender_config(), 300, 3);
}

#[test]
fn tcp_roundtrip_lz4() {
    let config = SenderConfig {
        compression: Compression::Lz4,
        ..sender_config()
    };
    assert_compressed(&socket_roundtrip(Net::Tcp, config, 300, 3));
}

#[test]
fn unix_roundtrip_zstd() {
    let config = SenderConfig {
        compression: Compression::Zstd(3),
        ..sender_config()
    };
    assert_compressed(&socket_roundtrip(Net::Unix, config, 300, 3));
}

#[test]
fn several_streams_newest_copy_wins() {
    // Small batches spread every round over all streams; pages are rewritten
    // between rounds, so any reordering across rounds would leave an old copy.
    for (net, compression) in [(Net::Tcp, Compression::None), (Net::Unix, Compression::Lz4)] {
        let config = SenderConfig {
            streams: 3,
            batch_pages: 2,
            compression,
            ..sender_config()
        };
        socket_roundtrip(net, config, 200, 6);
    }
}

#[test]
fn bandwidth_limited_transfer_still_arrives() {
    let config = SenderConfig {
        bandwidth_limit: Some(64 << 20),
        streams: 2,
        ..sender_config()
    };
    socket_roundtrip(Net::Tcp, config, 100, 2);
}

/// A round cut short from another thread (the driver's total timeout, under the
/// switch-over policy) ends with what its writers had written, names every page it did not
/// send, and breaks nothing: the receiver accepts its end (each connection's ROUND_END counts
/// what that connection wrote), and once the rest is sent in the next round, uncut, both
/// ends' memory and digests agree. Paced at 1 MiB/s, 4 MiB take about 3 s; the cut comes
/// 100 ms in (wherever it lands, even before the first frame, the accounting must hold).
#[test]
fn a_cut_round_ends_with_what_was_written_and_names_the_rest() {
    for streams in [1, 2] {
        let config = SenderConfig {
            bandwidth_limit: Some(1 << 20),
            streams,
            batch_pages: 8,
            ..sender_config()
        };
        let (listener, connect, _dir) = listen(&Net::Unix);
        let rx = spawn_receiver(listener, receiver_config());
        let pages = 1024u64;
        let layout = Layout::single(PS, BASE, pages * PS).unwrap();
        let conns = (0..streams).map(|_| connect()).collect();
        let source = SliceSource::new(BASE, memory(pages as usize, 3));
        let mut tx = Sender::connect(conns, layout, source, &config).unwrap();
        let cut = tx.round_cutter().expect("a socket sender cuts rounds");
        let cutter = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            cut();
        });
        let first = tx.send_round(&[BASE..BASE + pages * PS]).unwrap();
        cutter.join().unwrap();
        let unsent = tx.take_cut().expect("the round was cut");
        let unsent_pages: u64 = unsent.iter().map(|r| (r.end - r.start) / PS).sum();
        assert_eq!(
            first.pages + first.zero_pages + unsent_pages,
            pages,
            "every page sent or named: {first:?}, unsent {unsent:?}"
        );
        // Cut until told otherwise: a round now sends no page with data.
        let again = tx.send_round(&unsent).unwrap();
        assert_eq!(again.pages, 0, "{again:?}");
        assert_eq!(tx.take_cut().unwrap(), unsent);
        tx.uncut();
        let rest = tx.send_round(&unsent).unwrap();
        assert_eq!(tx.take_cut(), None);
        assert_eq!(rest.pages + rest.zero_pages, unsent_pages, "{rest:?}");
        let summary = tx.finish(FinalCheck::Full).unwrap();
        let (report, dest) = rx.join().unwrap().unwrap();
        let (source, _) = tx.into_parts();
        assert!(dest == source.data(), "destination differs from source");
        assert_eq!(report.rounds, 3);
        assert_eq!(report.checksum, summary.checksum);
        assert_eq!(report.pages, summary.pages);
        assert_eq!(report.zero_pages, summary.zero_pages);
    }
}

/// The round cut at random points (before a round, inside it while a writer waits on the
/// bucket or between frames, as it ends, or after it) over two streams, with pages copied and
/// lent, compressed and not: pages rewritten between rounds (some among those a cut left, some
/// turned to zeros and back), what each cut round names carried into the next round as the
/// driver carries it, some rounds started still cut (they send nothing with data and name the
/// rest). Every round sends or names each of its pages, and names only its own; the last round,
/// uncut, leaves the destination's memory equal to the source's, page for page, and both ends'
/// digests agreeing (the recorded hashes, or a full re-read). No timing is asserted: wherever
/// a cut lands, this must hold.
#[test]
fn cuts_at_random_points_lose_no_page() {
    let cases = [
        (Compression::None, false),
        (Compression::Lz4, false),
        (Compression::None, true),
        (Compression::Zstd(1), true),
    ];
    for (case, (compression, lend)) in cases.into_iter().enumerate() {
        for seed in 0..4 {
            cut_at_random_points(compression, lend, case as u64 * 100 + seed);
        }
    }
}

/// One run of [`cuts_at_random_points_lose_no_page`]: `lend` sends the pages lent (live
/// frames, or a compressed copy of them), else by copy.
fn cut_at_random_points(compression: Compression, lend: bool, seed: u64) {
    use precopy_sys::mem::Mapping;
    use precopy_sys::ranges::coalesce;
    use rand::Rng;
    use std::sync::Arc;
    let what = format!("{compression:?}, lent {lend}, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let pages = 256u64;
    let m = Arc::new(Mapping::anonymous(pages * PS).unwrap());
    m.write(0, &memory(pages as usize, seed)).unwrap();
    let (listener, connect, _dir) = listen(&Net::Unix);
    let rx = spawn_receiver(listener, receiver_config());
    let layout = Layout::single(PS, m.addr(), m.len()).unwrap();
    let config = SenderConfig {
        streams: 2,
        batch_pages: [1, 4, 16][rng.random_range(0..3)],
        compression,
        // 1 MiB in about a quarter of a second: a cut lands inside a round as often as not.
        bandwidth_limit: Some(4 << 20),
        ..sender_config()
    };
    let source: Box<dyn PageSource> = if lend {
        Box::new(OwnMemory::new([m.clone()]))
    } else {
        Box::new(ProcessMemory::current())
    };
    let conns = (0..2).map(|_| connect()).collect();
    let mut tx = Sender::connect(conns, layout, source, &config).unwrap();
    let cut = tx.round_cutter().expect("a socket sender cuts rounds");
    let mut pending = vec![m.addr()..m.addr() + m.len()];
    let rounds = 5;
    for round in 0..rounds {
        let want_pages = coalesce(&mut pending) / PS;
        // Up to a little past the round's paced time (the bucket lets its first 256 KiB
        // through at once, so a small round's cut mostly lands at its end or after it).
        let paced = want_pages * PS * 1_300_000 / (4 << 20);
        let delay = std::time::Duration::from_micros(rng.random_range(0..=paced.max(2_000)));
        let cutter = {
            let cut = cut.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                cut();
            })
        };
        let sent = tx.send_round(&pending).unwrap();
        cutter.join().unwrap();
        let mut unsent = tx.take_cut().unwrap_or_default();
        let unsent_pages = coalesce(&mut unsent) / PS;
        assert_eq!(
            sent.pages + sent.zero_pages + unsent_pages,
            want_pages,
            "round {round} ({what}): every page sent or named: {sent:?}, unsent {unsent:?}"
        );
        let mut both = pending.clone();
        both.extend(unsent.iter().cloned());
        assert_eq!(
            coalesce(&mut both) / PS,
            want_pages,
            "round {round} ({what}): a page named that the round did not have: {unsent:?}"
        );
        // Rewritten since: some of the pages the cut left, some others; a few become zeros.
        let mut next = unsent.clone();
        for r in &unsent {
            if rng.random_bool(0.5) {
                m.fill(r.start - m.addr(), PS, rng.random()).unwrap();
            }
        }
        for _ in 0..rng.random_range(0..48) {
            let page = rng.random_range(0..pages);
            if rng.random_bool(0.3) {
                m.fill(page * PS, PS, 0).unwrap();
            } else {
                m.fill(page * PS, PS, rng.random()).unwrap();
                m.write_u64(page * PS + 8 * rng.random_range(0..512), rng.random())
                    .unwrap();
            }
            let at = m.addr() + page * PS;
            next.push(at..at + PS);
        }
        pending = next;
        // Some rounds start still cut: they name all of their pages.
        if round + 1 == rounds || rng.random_bool(0.7) {
            tx.uncut();
        }
    }
    let last = tx.send_round(&pending).unwrap();
    assert_eq!(tx.take_cut(), None, "{what}: the last round was not cut");
    assert_eq!(last.pages + last.zero_pages, coalesce(&mut pending) / PS);
    let check = [FinalCheck::Recorded, FinalCheck::Full][seed as usize % 2];
    let summary = tx
        .finish(check)
        .unwrap_or_else(|e| panic!("{what}: the final digests differ: {e}"));
    let (report, dest) = rx.join().unwrap().unwrap();
    let mut src = vec![0u8; m.len() as usize];
    m.read(0, &mut src).unwrap();
    let differ: Vec<usize> = (dest.chunks(PS as usize).zip(src.chunks(PS as usize)))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert!(differ.is_empty(), "{what}: pages lost: {differ:?}");
    assert_eq!(report.rounds, rounds + 1, "{what}");
    assert_eq!(report.checksum, summary.checksum, "{what}");
    assert_eq!(report.pages, summary.pages, "{what}");
    assert_eq!(report.zero_pages, summary.zero_pages, "{what}");
}

#[test]
fn pages_sent_twice_keep_the_last_copy() {
    let layout = Layout::single(PS, BASE, 8 * PS).unwrap();
    let mut mem = memory(8, 2);
    mem[..PS as usize].fill(1);
    let mut tx = Transfer::new(
        SliceSource::new(BASE, mem),
        MemorySink::new(layout.clone()).unwrap(),
        layout,
        4,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 8 * PS]).unwrap();
    tx.source_mut().data_mut()[..PS as usize].fill(2);
    // The same page twice in one round (overlapping ranges merge), then again.
    let sent = tx.send_round(&[BASE..BASE + PS, BASE..BASE + PS]).unwrap();
    assert_eq!(sent.pages, 1);
    tx.source_mut().data_mut()[..PS as usize].fill(3);
    tx.begin_round().unwrap();
    tx.send_dirty(&[BASE..BASE + PS]).unwrap();
    tx.send_dirty(&[BASE..BASE + PS]).unwrap();
    let sent = tx.end_round().unwrap();
    assert_eq!(
        sent.pages, 2,
        "a page given in two batches of a round is sent twice"
    );
    tx.finish(FinalCheck::Full).unwrap();
    let (src, sink) = tx.into_parts();
    assert_eq!(sink.memory(), Some(src.data()));
    let mut first = [0u8; 4];
    sink.read(0, &mut first).unwrap();
    assert_eq!(first, [3, 3, 3, 3]);
    assert_eq!(sink.stats().rounds, 3);
}

#[test]
fn full_final_check_catches_a_write_that_was_never_sent() {
    let layout = Layout::single(PS, BASE, 8 * PS).unwrap();
    let run = |check| {
        let mut tx = Transfer::new(
            SliceSource::new(BASE, memory(8, 4)),
            MemorySink::new(layout.clone()).unwrap(),
            layout.clone(),
            4,
        )
        .unwrap();
        tx.send_round(&[BASE..BASE + 8 * PS]).unwrap();
        // A write no round reported (as if the tracker had missed it).
        tx.source_mut().data_mut()[5 * PS as usize + 9] ^= 0xff;
        let result = tx.finish(check);
        let (_, sink) = tx.into_parts();
        (result, sink)
    };
    let (result, sink) = run(FinalCheck::Full);
    assert!(
        matches!(result, Err(TransferError::SourceChanged { .. })),
        "{result:?}"
    );
    assert_eq!(
        sink.stats().finished,
        None,
        "nothing was acknowledged as complete"
    );
    // The recorded check proves delivery of what was read, not tracking: it
    // cannot see this write, and says so in the docs.
    let (result, sink) = run(FinalCheck::Recorded);
    let summary = result.unwrap();
    assert_eq!(sink.stats().finished, Some(summary.checksum));
    assert_eq!(sink.checksum().unwrap(), summary.checksum);
}

#[test]
fn memory_sink_roundtrip_multi_region() {
    let mem = memory(64, 3);
    let layout = Layout::new(vec![
        MemoryRegion::new(0, 16 * PS, PS).host(BASE),
        MemoryRegion::new(1, 32 * PS, PS).host(BASE + 32 * PS),
        MemoryRegion::new(2, 8 * PS, PS).host(BASE + 16 * PS),
    ])
    .unwrap();
    let mut tx = Transfer::new(
        SliceSource::new(BASE, mem.clone()),
        MemorySink::new(layout.clone()).unwrap(),
        layout.clone(),
        5,
    )
    .unwrap();
    // Two adjacent regions in one range; the gap (pages 24..32) not sent.
    tx.send_round(&[BASE..BASE + 24 * PS, BASE + 32 * PS..BASE + 64 * PS])
        .unwrap();
    // A range that touches the gap is refused before anything is read.
    let before = tx.sink().stats();
    tx.begin_round().unwrap();
    assert!(matches!(
        tx.send_dirty(&[BASE..BASE + PS, BASE + 20 * PS..BASE + 33 * PS]),
        Err(TransferError::Layout(LayoutError::OutsideLayout { .. }))
    ));
    assert_eq!(tx.sink().stats(), before);
    tx.end_round().unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let (_, sink) = tx.into_parts();
    // Destination memory is laid out by region id: 0, 1, then 2.
    let mut expected = mem[..16 * PS as usize].to_vec();
    expected.extend_from_slice(&mem[32 * PS as usize..]);
    expected.extend_from_slice(&mem[16 * PS as usize..24 * PS as usize]);
    assert_eq!(sink.memory(), Some(&expected[..]));
}

#[test]
fn image_roundtrip_and_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let pages = 40;
    let layout = Layout::new(vec![
        MemoryRegion::new(0, 30 * PS, PS).host(BASE),
        MemoryRegion::new(1, 8 * PS, PS).host(BASE + 32 * PS),
    ])
    .unwrap();
    let mem = memory(pages, 4);
    let mut tx = Transfer::new(
        SliceSource::new(BASE, mem),
        ImageWriter::create(&path, layout.clone()).unwrap(),
        layout.clone(),
        8,
    )
    .unwrap();
    // Round 0 leaves page 29 unsent; round 1 rewrites a few pages.
    tx.send_round(&[BASE..BASE + 29 * PS, BASE + 32 * PS..BASE + 40 * PS])
        .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let dirty = redirty(
        &mut tx.source_mut().data_mut()[..29 * PS as usize],
        BASE,
        10,
        &mut rng,
    );
    tx.send_round(&dirty).unwrap();
    // The unsent page must read as zeros in the destination, so make the
    // source agree before the checksum.
    tx.source_mut().data_mut()[29 * PS as usize..30 * PS as usize].fill(0);
    tx.finish(FinalCheck::Full).unwrap();
    let (src, _) = tx.into_parts();

    let img = Image::open(&path).unwrap();
    let info = img.info();
    assert!(info.complete, "{info:?}");
    assert_eq!(info.rounds.len(), 2);
    assert_eq!(info.never_sent_pages, 1);
    assert_eq!(
        info.data_pages + info.zero_pages + info.never_sent_pages,
        38
    );
    let report = img.verify().unwrap();
    assert_eq!(report.rounds, 2);
    let data = src.data();
    // Spans are memory offsets: region 0 at 0, region 1 right after it.
    let got = img.read_span_to_vec(100..30 * PS).unwrap();
    assert_eq!(got, &data[100..30 * PS as usize]);
    let got = img.read_span_to_vec(31 * PS + 5..31 * PS + 9).unwrap();
    assert_eq!(got, &data[(33 * PS + 5) as usize..(33 * PS + 9) as usize]);
    assert!(matches!(
        img.read_span_to_vec(37 * PS..39 * PS),
        Err(ImageError::SpanOutsideLayout { .. })
    ));
    let json = serde_json::to_string(&info).unwrap();
    assert!(json.contains("\"complete\":true"));
}

#[test]
fn receiver_into_image_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let (listener, connect, _d) = listen(&Net::Unix);
    let path2 = path.clone();
    let rx = std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &receiver_config())?;
        let mut img = ImageWriter::create(&path2, rx.layout().clone())?;
        rx.run(&mut img)
    });
    let pages = 50;
    let layout = Layout::single(PS, BASE, pages as u64 * PS).unwrap();
    let config = SenderConfig {
        compression: Compression::Lz4,
        streams: 2,
        ..sender_config()
    };
    let mut tx = Sender::connect(
        vec![connect(), connect()],
        layout,
        SliceSource::new(BASE, memory(pages, 6)),
        &config,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + pages as u64 * PS]).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let dirty = redirty(tx.source_mut().data_mut(), BASE, 20, &mut rng);
    tx.send_round(&dirty).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    rx.join().unwrap().unwrap();
    let img = Image::open(&path).unwrap();
    img.verify().unwrap();
    let (src, _) = tx.into_parts();
    assert_eq!(
        img.read_span_to_vec(0..pages as u64 * PS).unwrap(),
        src.data()
    );
}

#[test]
fn process_memory_source_with_dropped_pages() {
    // Real process memory read with process_vm_readv; pages dropped with
    // MADV_DONTNEED read as zero and must arrive as zero.
    let pages = 32usize;
    let len = pages as u64 * PS;
    let map = precopy_sys::mem::Mapping::anonymous(len).unwrap();
    let contents: Vec<u8> = (0..len as usize).map(|i| (i % 253) as u8 + 1).collect();
    map.write(0, &contents).unwrap();
    let base = map.addr();
    let layout = Layout::single(PS, base, len).unwrap();
    let mut tx = Transfer::new(
        ProcessMemory::current(),
        MemorySink::new(layout.clone()).unwrap(),
        layout,
        8,
    )
    .unwrap();
    tx.send_round(&[base..base + len]).unwrap();
    map.advise(4 * PS, 8 * PS, precopy_sys::mem::Advice::DontNeed)
        .unwrap();
    let mut now = vec![0u8; len as usize];
    map.read(0, &mut now).unwrap();
    assert!(
        now[4 * PS as usize..12 * PS as usize]
            .iter()
            .all(|&b| b == 0)
    );
    let sent = tx.send_round(&[base + 4 * PS..base + 12 * PS]).unwrap();
    assert_eq!((sent.pages, sent.zero_pages), (0, 8));
    tx.finish(FinalCheck::Full).unwrap();
    let (_, sink) = tx.into_parts();
    assert_eq!(sink.memory(), Some(&now[..]));
}

#[test]
fn unmapped_source_page_is_an_error_not_zeros() {
    let layout = Layout::single(PS, 0, 4 * PS).unwrap();
    let mut tx = Transfer::new(
        ProcessMemory::current(),
        MemorySink::new(layout.clone()).unwrap(),
        layout,
        4,
    )
    .unwrap();
    let err = tx.send_round(&[0..4 * PS]).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Source(SourceError::Unmapped { addr: 0, .. })
        ),
        "{err:?}"
    );
    assert_eq!(tx.sink().stats().pages + tx.sink().stats().zero_pages, 0);
}

/// PING/PONG between rounds on every connection: the sender learns what acknowledging FINISH
/// would cost, the transfer goes on undisturbed, and probing is refused inside a round and
/// after the end.
fn probe_between_rounds(net: Net, streams: usize) {
    let pages = 64;
    let (listener, connect, _dir) = listen(&net);
    let rx = spawn_receiver(listener, receiver_config());
    let layout = Layout::single(PS, BASE, pages as u64 * PS).unwrap();
    let config = SenderConfig {
        streams,
        ..sender_config()
    };
    let conns = (0..streams).map(|_| connect()).collect();
    let mut tx = Sender::connect(
        conns,
        layout,
        SliceSource::new(BASE, memory(pages, 3)),
        &config,
    )
    .unwrap();
    let all = BASE..BASE + pages as u64 * PS;
    tx.send_round(std::slice::from_ref(&all)).unwrap();
    for _ in 0..3 {
        let took = tx
            .probe_finish()
            .unwrap()
            .expect("a socket has a peer to ask");
        assert!(took > std::time::Duration::ZERO);
    }
    tx.begin_round().unwrap();
    assert!(
        matches!(tx.probe_finish(), Err(TransferError::Misuse { .. })),
        "no PING inside a round"
    );
    tx.end_round().unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let dirty = redirty(tx.source_mut().data_mut(), BASE, pages / 4, &mut rng);
    tx.send_round(&dirty).unwrap();
    assert!(tx.probe_finish().unwrap().is_some());
    tx.finish(FinalCheck::Recorded).unwrap();
    assert!(matches!(
        tx.probe_finish(),
        Err(TransferError::Misuse { .. })
    ));
    let (report, dest) = rx.join().unwrap().unwrap();
    let (source, _) = tx.into_parts();
    assert!(dest == source.data(), "destination differs from source");
    assert_eq!(report.rounds, 3);
}

#[test]
fn probe_finish_between_rounds_tcp_two_streams() {
    probe_between_rounds(Net::Tcp, 2);
}

#[test]
fn probe_finish_between_rounds_unix_one_stream() {
    probe_between_rounds(Net::Unix, 1);
}

#[test]
fn a_memory_sink_has_no_peer_to_probe() {
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let sink = MemorySink::new(layout.clone()).unwrap();
    let mut tx = Transfer::new(SliceSource::new(BASE, memory(4, 5)), sink, layout, 64).unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    assert_eq!(tx.probe_finish().unwrap(), None);
}
