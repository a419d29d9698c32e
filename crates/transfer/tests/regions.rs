//! Regions added to a layout mid-stream (the protocol's REGION): memory the source mapped
//! after the transfer started reaches an image and a receiver, is laid out after the regions
//! before it, and a destination that cannot grow or a region that does not fit fails clearly.

mod common;

use common::*;
use precopy_transfer::protocol::{FrameKind, encode_header};
use precopy_transfer::*;

const BASE: u64 = 0x40_0000;
/// Source memory: 16 pages at `BASE`; the first layout covers the first 4.
const PAGES: usize = 16;

fn source() -> SliceSource<Vec<u8>> {
    SliceSource::new(BASE, memory(PAGES, 21))
}

fn first_layout() -> Layout {
    Layout::single(PS, BASE, 4 * PS).unwrap()
}

fn page_range(first: u64, n: u64) -> std::ops::Range<u64> {
    BASE + first * PS..BASE + (first + n) * PS
}

/// Round 0 sends the first layout; then pages 8..10 are mapped (a region is added for them,
/// widened to `align`), and round 1 sends them; then the final checksum.
fn send_with_a_region<K: Sink>(tx: &mut Transfer<SliceSource<Vec<u8>>, K>, align: u64) {
    tx.send_round(&[page_range(0, 4)]).unwrap();
    let added = tx.add_regions_for(&[page_range(8, 2)], align).unwrap();
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].id, 1, "the next id");
    assert_eq!(added[0].host_addr, Some(BASE + 8 * PS - (8 * PS) % align));
    // Already covered: nothing more is added.
    assert!(
        tx.add_regions_for(&[page_range(8, 2)], align)
            .unwrap()
            .is_empty()
    );
    tx.send_round(&[page_range(8, 2), page_range(1, 1)])
        .unwrap();
}

/// The image at `path` holds the first 4 pages, then the added region (memory offsets after
/// them) with pages 8..10 of the source.
fn assert_image_holds_the_region(path: &std::path::Path, region_pages: u64) {
    let mem = memory(PAGES, 21);
    let image = Image::open(path).unwrap();
    assert!(image.is_complete());
    image.verify().unwrap();
    let layout = image.layout();
    assert_eq!(layout.regions().len(), 2);
    assert_eq!(layout.total_len(), (4 + region_pages) * PS);
    let info = image.info();
    assert_eq!(
        info.added_regions,
        vec![AddedRegion {
            id: 1,
            before_round: 1
        }]
    );
    let ps = PS as usize;
    assert_eq!(image.read_span_to_vec(0..4 * PS).unwrap(), mem[..4 * ps]);
    let region = &layout.regions()[1];
    let start = region.guest_addr.unwrap() - BASE;
    let at = |page: u64| 4 * PS + (BASE + page * PS - region.guest_addr.unwrap());
    assert_eq!(
        image.read_span_to_vec(at(8)..at(10)).unwrap(),
        mem[8 * ps..10 * ps],
        "the added region's pages"
    );
    if region_pages > 2 {
        // Widened: the rest of the region was never sent and reads as zeros.
        let rest = image
            .read_span_to_vec(4 * PS..4 * PS + region_pages * PS)
            .unwrap();
        let sent = (8 * PS - start) as usize;
        assert!(rest[..sent].iter().all(|&b| b == 0));
        assert!(rest[sent + 2 * ps..].iter().all(|&b| b == 0));
    }
}

#[test]
fn a_region_added_between_rounds_lands_in_the_image_after_the_others() {
    let dir = tempfile::tempdir().unwrap();
    for (align, region_pages) in [(PS, 2), (8 * PS, 8)] {
        let path = dir.path().join(format!("img-{align}"));
        let mut tx = Transfer::new(
            source(),
            ImageWriter::create(&path, first_layout()).unwrap(),
            first_layout(),
            4,
        )
        .unwrap();
        send_with_a_region(&mut tx, align);
        // Widened, the region also covers source pages never sent (here they hold data, so
        // a full re-read would differ; in a process they are unmapped).
        let check = if region_pages == 2 {
            FinalCheck::Full
        } else {
            FinalCheck::Recorded
        };
        tx.finish(check).unwrap();
        assert_image_holds_the_region(&path, region_pages);
    }
}

#[test]
fn a_region_reaches_a_receiver_on_every_connection() {
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
        first_layout(),
        source(),
        &config,
    )
    .unwrap();
    send_with_a_region(&mut tx, PS);
    tx.finish(FinalCheck::Full).unwrap();
    rx.join().unwrap().unwrap();
    assert_image_holds_the_region(&path, 2);
}

#[test]
fn a_destination_that_cannot_grow_fails_the_transfer_clearly() {
    let (listener, connect, _d) = listen(&Net::Unix);
    let rx = spawn_receiver(listener, receiver_config());
    let mut tx =
        Sender::connect(vec![connect()], first_layout(), source(), &sender_config()).unwrap();
    tx.send_round(&[page_range(0, 4)]).unwrap();
    tx.add_regions_for(&[page_range(8, 2)], PS).unwrap();
    let err = rx.join().unwrap().unwrap_err();
    assert!(
        matches!(err, TransferError::CannotGrow { region: 1 }),
        "{err:?}"
    );
    // The sender hears why.
    let sent = tx
        .send_round(&[page_range(8, 2)])
        .and_then(|_| tx.finish(FinalCheck::Recorded).map(|_| ()));
    let e = sent.unwrap_err();
    let chain = precopy_sys::error_chain(&e);
    assert!(chain.contains("cannot take memory region 1"), "{chain}");
}

/// A REGION record: region `id` of `pages` pages, no guest address.
fn region_frame(id: u32, pages: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&id.to_le_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]); // backing, flags, reserved
    p.extend_from_slice(&(pages * PS).to_le_bytes());
    p.extend_from_slice(&PS.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    let mut v = encode_header(FrameKind::Region, 0, 0, 0, 0, &p).to_vec();
    v.extend_from_slice(&p);
    v
}

#[test]
fn a_region_that_does_not_fit_after_the_layout_is_refused() {
    // Region 0 is already there: an added region takes a larger id.
    let dir = tempfile::tempdir().unwrap();
    let mut sink = ImageWriter::create(dir.path().join("img"), first_layout()).unwrap();
    let err = receive_frames(&region_frame(0, 2), &first_layout(), &mut sink).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Protocol(ProtocolError::BadLayout(LayoutError::CannotAdd {
                region: 0,
                ..
            }))
        ),
        "{err:?}"
    );
    // Inside a round it is not expected at all.
    let mut s = encode_header(FrameKind::RoundBegin, 0, 0, 0, 0, &[]).to_vec();
    s.extend(region_frame(1, 2));
    let mut sink = ImageWriter::create(dir.path().join("img2"), first_layout()).unwrap();
    let err = receive_frames(&s, &first_layout(), &mut sink).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Protocol(ProtocolError::Unexpected {
                kind: FrameKind::Region,
                ..
            })
        ),
        "{err:?}"
    );
}
