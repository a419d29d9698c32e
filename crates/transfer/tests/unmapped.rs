//! Memory the source unmaps mid-stream (the protocol's MAPPED, `Transfer::retain_memory`):
//! an image records the memory that exists and drops the pages outside it (its index, a
//! compaction and a cut image alike), a receiver's image and memory do the same, and the
//! digests of both ends still agree.

mod common;

use common::*;
use precopy_transfer::*;
use std::ops::Range;

const BASE: u64 = 0x40_0000;
const PAGES: usize = 16;

fn layout() -> Layout {
    Layout::single(PS, BASE, PAGES as u64 * PS).unwrap()
}

fn pages(first: u64, n: u64) -> Range<u64> {
    BASE + first * PS..BASE + (first + n) * PS
}

/// What stays mapped after the unmap: pages 0..4 and 8..12 (4..8 and 12..16 are gone).
fn kept() -> Vec<Range<u64>> {
    vec![pages(0, 4), pages(8, 4)]
}

/// The source memory with the unmapped pages reading as zeros, as a process's do.
fn after_unmap(mem: &mut [u8]) {
    let ps = PS as usize;
    mem[4 * ps..8 * ps].fill(0);
    mem[12 * ps..].fill(0);
}

/// Round 0 sends all 16 pages; then the memory shrinks to [`kept`], and round 1 sends pages
/// 0..2 again (rewritten).
fn send_and_unmap<K: Sink>(tx: &mut Transfer<SliceSource<Vec<u8>>, K>) -> Vec<u8> {
    tx.send_round(&[pages(0, PAGES as u64)]).unwrap();
    assert!(tx.retain_memory(&kept()).unwrap(), "the sink is told");
    assert!(
        !tx.retain_memory(&kept()).unwrap(),
        "unchanged: nothing more to tell"
    );
    let mem = tx.source_mut().data_mut();
    after_unmap(mem);
    mem[..2 * PS as usize].fill(0x77);
    tx.send_round(&[pages(0, 2)]).unwrap();
    tx.source_mut().data().to_vec()
}

/// The image at `path` is complete, verifies, holds `want` and records [`kept`] as its
/// mappings, with a page for each of their pages and none outside.
fn assert_image_holds_the_final_mappings(path: &std::path::Path, want: &[u8]) {
    let image = Image::open(path).unwrap();
    assert!(image.is_complete());
    image.verify().unwrap();
    assert_eq!(image.read_span_to_vec(0..PAGES as u64 * PS).unwrap(), want);
    let info = image.info();
    let mapped: Vec<(u64, u64, Option<u64>)> = info
        .mapped
        .as_ref()
        .expect("mapped ranges recorded")
        .iter()
        .map(|m| (m.memory_offset, m.len, m.address))
        .collect();
    assert_eq!(mapped, vec![(0, 4 * PS, None), (8 * PS, 4 * PS, None)]);
    assert_eq!(info.data_pages + info.zero_pages, 8, "{info}");
    assert_eq!(info.never_sent_pages, 8);
    assert!(
        info.to_string().contains("mapped:     2 range(s)"),
        "{info}"
    );
}

#[test]
fn memory_unmapped_between_rounds_is_dropped_from_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let partial = ImageWriter::partial_path(&path);
    let mut tx = Transfer::new(
        SliceSource::new(BASE, memory(PAGES, 5)),
        ImageWriter::create(&path, layout())
            .unwrap()
            .with_compaction(Some(CompactionPolicy { ratio: 1, slack: 0 })),
        layout(),
        4,
    )
    .unwrap();
    let want = send_and_unmap(&mut tx);
    // Cut here (the partial file as it stands): the unmapped pages are gone already.
    let cut = Image::open(&partial).unwrap();
    assert!(!cut.is_complete());
    assert_eq!(cut.read_span_to_vec(0..PAGES as u64 * PS).unwrap(), want);
    assert_eq!(cut.info().mapped.map(|m| m.len()), Some(2));
    // A compaction copies only what is mapped, and records the mappings again.
    tx.probe_finish().unwrap();
    assert!(tx.sink().compaction().is_some(), "compacted");
    let compacted = Image::open(&partial).unwrap();
    let info = compacted.info();
    assert_eq!(info.data_pages + info.zero_pages, 8, "{info}");
    assert_eq!(compacted.info().mapped.map(|m| m.len()), Some(2));
    // Full: the source is read again (its unmapped pages read as zeros, as a process's).
    tx.finish(FinalCheck::Full).unwrap();
    assert_image_holds_the_final_mappings(&path, &want);
}

#[test]
fn memory_unmapped_between_rounds_is_dropped_by_a_receiver() {
    // Into an image, over three connections (MAPPED travels on the first).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let (listener, connect, _d) = listen(&Net::Unix);
    let rx_path = path.clone();
    let rx = std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &receiver_config())?;
        let mut sink = ImageWriter::create(&rx_path, rx.layout().clone())?;
        rx.run(&mut sink)
    });
    let config = SenderConfig {
        streams: 3,
        ..sender_config()
    };
    let mut tx = Sender::connect(
        (0..3).map(|_| connect()).collect(),
        layout(),
        SliceSource::new(BASE, memory(PAGES, 6)),
        &config,
    )
    .unwrap();
    let want = send_and_unmap(&mut tx);
    tx.finish(FinalCheck::Full).unwrap();
    rx.join().unwrap().unwrap();
    assert_image_holds_the_final_mappings(&path, &want);

    // Into memory: the dropped pages are zeroed there, and the digests agree.
    let (listener, connect, _d) = listen(&Net::Unix);
    let rx = spawn_receiver(listener, receiver_config());
    let mut tx = Sender::connect(
        vec![connect()],
        layout(),
        SliceSource::new(BASE, memory(PAGES, 7)),
        &sender_config(),
    )
    .unwrap();
    let want = send_and_unmap(&mut tx);
    tx.finish(FinalCheck::Full).unwrap();
    let (_, got) = rx.join().unwrap().unwrap();
    assert_eq!(got, want);
}
