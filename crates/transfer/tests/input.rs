//! The input sweep of the transfer crate's public functions: layouts, ranges, page sizes, counts
//! and files that are wrong are typed errors (the exact variant is asserted), never panics or
//! hangs.
#![allow(clippy::reversed_empty_ranges)] // inverted ranges are the point

use precopy_transfer::*;
use std::ops::Range;

const PS: u64 = 4096;
const BASE: u64 = 0x40_0000;

fn sink_and_transfer(pages: u64) -> Transfer<SliceSource<Vec<u8>>, MemorySink> {
    let layout = Layout::single(PS, BASE, pages * PS).unwrap();
    let sink = MemorySink::new(layout.clone()).unwrap();
    let src = SliceSource::new(BASE, vec![5u8; (pages * PS) as usize]);
    Transfer::new(src, sink, layout, 16).unwrap()
}

#[test]
fn layout_refuses_page_sizes_that_are_not_powers_of_two_or_out_of_span() {
    for page_size in [0, 3, 4095, 256, 2 << 30, u64::MAX] {
        let err = Layout::new(vec![MemoryRegion::new(0, 8192, page_size)]).unwrap_err();
        assert!(
            matches!(err, LayoutError::BadPageSize { region: 0, page_size: p } if p == page_size),
            "{page_size}: {err:?}"
        );
    }
}

#[test]
fn layout_refuses_zero_sizes_unaligned_and_wrapping_regions() {
    let err = Layout::new(vec![MemoryRegion::new(1, 0, PS)]).unwrap_err();
    assert!(
        matches!(err, LayoutError::EmptyRegion { region: 1 }),
        "{err:?}"
    );
    let err = Layout::new(vec![]).unwrap_err();
    assert!(matches!(err, LayoutError::Empty), "{err:?}");
    for r in [
        MemoryRegion::new(2, PS + 1, PS),
        MemoryRegion::new(2, PS, PS).host(BASE + 1),
        MemoryRegion::new(2, PS, PS).guest(1),
    ] {
        let err = Layout::new(vec![r]).unwrap_err();
        assert!(
            matches!(err, LayoutError::Unaligned { region: 2, .. }),
            "{err:?}"
        );
    }
    let top = u64::MAX - PS + 1;
    for r in [
        MemoryRegion::new(3, 2 * PS, PS).host(top),
        MemoryRegion::new(3, 2 * PS, PS).guest(top),
    ] {
        let err = Layout::new(vec![r]).unwrap_err();
        assert!(matches!(err, LayoutError::Wraps { region: 3 }), "{err:?}");
    }
    // Sizes that sum past u64::MAX.
    let half = 1u64 << 63;
    let err = Layout::new(vec![
        MemoryRegion::new(0, half, PS),
        MemoryRegion::new(1, half, PS),
    ])
    .unwrap_err();
    assert!(matches!(err, LayoutError::Wraps { region: 1 }), "{err:?}");
    // The unvalidated region's host range saturates instead of wrapping.
    let r = MemoryRegion::new(3, 2 * PS, PS).host(top);
    assert_eq!(r.host_range(), Some(top..u64::MAX));
}

#[test]
fn layout_refuses_duplicate_ids_and_overlapping_host_ranges() {
    let err = Layout::new(vec![
        MemoryRegion::new(7, PS, PS),
        MemoryRegion::new(7, PS, PS),
    ])
    .unwrap_err();
    assert!(
        matches!(err, LayoutError::DuplicateId { region: 7 }),
        "{err:?}"
    );
    let err = Layout::new(vec![
        MemoryRegion::new(0, 2 * PS, PS).host(BASE),
        MemoryRegion::new(1, PS, PS).host(BASE + PS),
    ])
    .unwrap_err();
    assert!(
        matches!(
            err,
            LayoutError::Overlap {
                first: 0,
                second: 1
            }
        ),
        "{err:?}"
    );
}

#[test]
fn layout_refuses_overlapping_guest_ranges() {
    let err = Layout::new(vec![
        MemoryRegion::new(1, 2 * PS, PS)
            .host(BASE + 4 * PS)
            .guest(PS),
        MemoryRegion::new(0, 2 * PS, PS).host(BASE).guest(0),
    ])
    .unwrap_err();
    assert!(
        matches!(
            err,
            LayoutError::GuestOverlap {
                first: 0,
                second: 1
            }
        ),
        "{err:?}"
    );
    // Touching is not overlapping, and a region without a guest address overlaps nothing.
    Layout::new(vec![
        MemoryRegion::new(0, 2 * PS, PS).guest(0),
        MemoryRegion::new(1, 2 * PS, PS).guest(2 * PS),
        MemoryRegion::new(2, 2 * PS, PS),
    ])
    .unwrap();
}

#[test]
fn layout_lookups_refuse_inverted_unaligned_and_outside_ranges() {
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let inverted: Range<u64> = BASE + 2 * PS..BASE;
    for r in [inverted, BASE..BASE, BASE + 1..BASE + PS] {
        let err = layout.locate(r.clone()).unwrap_err();
        assert!(
            matches!(err, LayoutError::RangeUnaligned { .. }),
            "{r:x?}: {err:?}"
        );
        let err = layout.split(r.clone(), |_, _| Ok(())).unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::Layout(LayoutError::RangeUnaligned { .. })
            ),
            "{r:x?}: {err:?}"
        );
    }
    let top = u64::MAX - PS + 1;
    for r in [BASE + 3 * PS..BASE + 5 * PS, 0..PS, top - PS..top] {
        let err = layout.locate(r.clone()).unwrap_err();
        assert!(
            matches!(err, LayoutError::OutsideLayout { .. }),
            "{r:x?}: {err:?}"
        );
    }
    let err = layout.place(0, 0, 0).unwrap_err();
    assert!(matches!(err, LayoutError::OutsideRegion { .. }), "{err:?}");
    let err = layout.place(0, u64::MAX - PS + 1, PS).unwrap_err();
    assert!(matches!(err, LayoutError::OutsideRegion { .. }), "{err:?}");
    let err = layout.place(9, 0, PS).unwrap_err();
    assert!(
        matches!(err, LayoutError::UnknownRegion { region: 9 }),
        "{err:?}"
    );
    let err = layout.check_span(u64::MAX, PS).unwrap_err();
    assert!(matches!(err, LayoutError::OutsideLayout { .. }), "{err:?}");
    assert!(layout.region_at(u64::MAX).is_none());
}

#[test]
fn transfer_refuses_zero_batches_and_layouts_without_host_addresses() {
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let sink = MemorySink::new(layout.clone()).unwrap();
    let src = SliceSource::new(BASE, vec![0u8; 4 * PS as usize]);
    let err = Transfer::new(src, sink, layout.clone(), 0).unwrap_err();
    assert!(matches!(err, TransferError::Config { .. }), "{err:?}");
    let sink = MemorySink::new(layout.clone()).unwrap();
    let src = SliceSource::new(BASE, vec![0u8; 4 * PS as usize]);
    let err = Transfer::new(src, sink, layout.without_host(), 1).unwrap_err();
    assert!(matches!(err, TransferError::Config { .. }), "{err:?}");
}

#[test]
fn send_round_refuses_inverted_unaligned_and_outside_ranges() {
    for r in [
        BASE + 2 * PS..BASE,
        BASE + 1..BASE + PS,
        BASE + 3 * PS..BASE + 5 * PS,
        u64::MAX - PS + 1..u64::MAX,
    ] {
        let mut tx = sink_and_transfer(4);
        let err = tx.send_round(std::slice::from_ref(&r)).unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::Layout(
                    LayoutError::RangeUnaligned { .. } | LayoutError::OutsideLayout { .. }
                )
            ),
            "{r:x?}: {err:?}"
        );
    }
}

#[test]
fn changed_since_sent_refuses_bad_ranges() {
    let mut tx = sink_and_transfer(4);
    let err = tx.changed_since_sent(&[BASE + PS..BASE]).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Layout(LayoutError::RangeUnaligned { .. })
        ),
        "{err:?}"
    );
    let err = tx.changed_since_sent(&[0..PS]).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Layout(LayoutError::OutsideLayout { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn memory_sink_refuses_reads_and_pages_outside_its_layout() {
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let mut sink = MemorySink::new(layout).unwrap();
    let mut buf = vec![0u8; PS as usize];
    for offset in [4 * PS, u64::MAX - 1] {
        let err = sink.read(offset, &mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::Layout(LayoutError::OutsideLayout { .. })
            ),
            "{offset:#x}: {err:?}"
        );
    }
    let mut big = vec![0u8; 2 * PS as usize];
    let err = sink.read(3 * PS, &mut big).unwrap_err();
    assert!(matches!(err, TransferError::Layout(_)), "{err:?}");
    // Zero ranges: inverted, empty, unaligned, outside.
    for r in [2 * PS..PS, PS..PS, 1..PS, 4 * PS..5 * PS] {
        let err = sink.send_zero_range(r.clone()).unwrap_err();
        assert!(matches!(err, TransferError::Layout(_)), "{r:x?}: {err:?}");
    }
    // Pages whose CRC count differs from the page count.
    let err = sink
        .send_pages(0, PageBuf::from_vec(vec![0u8; PS as usize]), &[1, 2])
        .unwrap_err();
    assert!(matches!(err, TransferError::Misuse { .. }), "{err:?}");
    let err = sink
        .send_pages(0, PageBuf::from_vec(vec![0u8; 7]), &[])
        .unwrap_err();
    assert!(matches!(err, TransferError::Layout(_)), "{err:?}");
}

#[test]
fn memory_sink_with_memory_refuses_wrong_sizes_ids_and_duplicates() {
    let layout = Layout::new(vec![MemoryRegion::new(0, 2 * PS, PS)]).unwrap();
    let mem = |n: u64| -> Box<dyn RegionMemory> { Box::new(vec![0u8; n as usize]) };
    for regions in [
        vec![(0, mem(PS))],
        vec![(1, mem(2 * PS))],
        vec![(0, mem(2 * PS)), (0, mem(2 * PS))],
        vec![],
    ] {
        let err = MemorySink::with_memory(layout.clone(), regions).unwrap_err();
        assert!(
            matches!(err, TransferError::Layout(LayoutError::Placement { .. })),
            "{err:?}"
        );
    }
}

#[test]
fn digest_refuses_bad_page_sizes_and_partial_pages() {
    let mut d = MemoryDigest::new();
    for page_size in [0usize, 3, 100, 4095] {
        let err = d.push_pages(&[0u8; 4096], page_size).unwrap_err();
        assert!(
            matches!(err, LayoutError::InvalidPageSize { page_size: p } if p == page_size as u64),
            "{page_size}: {err:?}"
        );
    }
    let err = d.push_pages(&[0u8; 5000], 4096).unwrap_err();
    assert!(matches!(err, LayoutError::RangeUnaligned { .. }), "{err:?}");
    assert_eq!(d.finish(), MemoryDigest::new().finish(), "nothing appended");
    d.push_pages(&[], 4096).unwrap();
    // Tables refuse out-of-range pages without panicking.
    let mut t = PageHashes::new(4, PS);
    assert!(!t.set(usize::MAX, &[1]));
    assert!(!t.set(3, &[1, 2]));
    assert!(!t.set_zero(usize::MAX, 2));
    assert_eq!(t.get(usize::MAX), None);
}

#[test]
fn image_open_refuses_missing_and_wrong_type_files_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let err = Image::open(&missing).unwrap_err();
    assert!(
        matches!(&err, ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    let err = Image::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::NotAFile {
                kind: "a directory",
                ..
            }
        ),
        "{err:?}"
    );
    let err = Image::open("/dev/null").unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::NotAFile {
                kind: "a character device",
                ..
            }
        ),
        "{err:?}"
    );
    // A FIFO with no writer: a blocking open would wait forever.
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = Image::open(&fifo).unwrap_err();
    assert!(
        matches!(err, ImageError::NotAFile { kind: "a FIFO", .. }),
        "{err:?}"
    );
    // A regular file that is not an image.
    let text = dir.path().join("text");
    std::fs::write(&text, b"not an image at all, just some text").unwrap();
    let err = Image::open(&text).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let err = Image::open(&empty).unwrap_err();
    // Too short to be an image at all, said so (not "truncated at byte 0").
    assert!(
        matches!(err, ImageError::TooShort { len: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn image_create_refuses_directories_devices_and_fifos_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let err = ImageWriter::create(dir.path(), layout.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Image(ImageError::NotAFile {
                kind: "a directory",
                ..
            })
        ),
        "{err:?}"
    );
    let err = ImageWriter::create(dir.path().join("no/such/dir.img"), layout.clone()).unwrap_err();
    assert!(
        matches!(&err, TransferError::Image(ImageError::NoDirectory { dir: d }) if d.ends_with("no/such")),
        "{err:?}"
    );
    let err = ImageWriter::create("/dev/null", layout.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Image(ImageError::NotAFile {
                kind: "a character device",
                ..
            })
        ),
        "{err:?}"
    );
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // Opened read-write and non-blocking, a FIFO opens at once and is then refused.
    let err = ImageWriter::create(&fifo, layout).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Image(ImageError::NotAFile { kind: "a FIFO", .. })
        ),
        "{err:?}"
    );
}

#[test]
fn image_read_span_refuses_inverted_and_outside_spans() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.img");
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let sink = ImageWriter::create(&path, layout.clone()).unwrap();
    let src = SliceSource::new(BASE, vec![5u8; 4 * PS as usize]);
    let mut tx = Transfer::new(src, sink, layout, 16).unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.finish(FinalCheck::Recorded).unwrap();
    let img = Image::open(&path).unwrap();
    let mut out = Vec::new();
    let err = img.read_span(PS..0, &mut out).unwrap_err();
    assert!(matches!(err, ImageError::InvertedSpan { .. }), "{err:?}");
    for r in [0..5 * PS, u64::MAX - 1..u64::MAX] {
        let err = img.read_span(r.clone(), &mut out).unwrap_err();
        assert!(
            matches!(err, ImageError::SpanOutsideLayout { .. }),
            "{r:x?}: {err:?}"
        );
    }
    img.read_span(PS..PS, &mut out).unwrap();
    assert!(out.is_empty());
    for s in [
        "",
        "-",
        "1-",
        "0x-0x1",
        "5-4",
        "0x10000000000000000-0x1",
        "1-2-3",
    ] {
        assert_eq!(parse_span(s), None, "{s:?}");
    }
}
