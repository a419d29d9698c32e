//! The fuzz targets' seed inputs (fuzz/README.md), made by this build's own encoders: the
//! typed frames of `protocol`, `FrameWriter`, and a real `Transfer` into an `ImageWriter`. A
//! format change therefore changes the seeds with it; `seeds_are_what_they_claim` checks
//! that the valid ones are still accepted, and an ignored test writes them out:
//!
//! ```sh
//! cargo test --release -p precopy-transfer --test fuzz_seeds -- --ignored
//! ```
//!
//! writes `fuzz/seeds/frame_decoder/` and `fuzz/seeds/image_open/` (or the directories under
//! `$PRECOPY_FUZZ_SEEDS`).

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};

use common::{PS, memory};
use precopy_transfer::protocol::{
    self, Auth, Challenge, Commit, Compacted, Done, ErrorFrame, Finish, Frame, FrameReader,
    FrameWriter, Hello, Index, IndexEntry, MAC_LEN, Mapped, NONCE_LEN, PREAMBLE_LEN, PageSpan,
    Ping, Pong, Region, Resume, RoundBegin, RoundEnd, State, Trailer, Welcome, Zero,
};
use precopy_transfer::*;

/// The layout `fuzz_targets/frame_decoder.rs` receives into: region 0 of 4 pages, region 1
/// of 2 pages.
fn decoder_layout() -> Layout {
    Layout::new(vec![
        MemoryRegion::new(0, 4 * PS, PS),
        MemoryRegion::new(1, 2 * PS, PS),
    ])
    .unwrap()
}

const STATE_BLOB: &[u8] = b"vcpu0 rip=0xfff0";

/// One frame's bytes, from its typed form.
fn encoded<'p, F: Frame<'p>>(frame: &F) -> Vec<u8> {
    let (h, payload) = protocol::encode(frame);
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(&payload);
    v
}

/// An uncompressed PAGES frame of `pages` at `region`/`offset`, with its hash list.
fn pages_frame(region: u32, offset: u64, pages: &[u8]) -> Vec<u8> {
    let hashes: Vec<PageHash> = pages.chunks(PS as usize).map(page_hash).collect();
    let span = PageSpan {
        region,
        offset,
        len: pages.len() as u64,
    };
    let mut w = FrameWriter::new(Vec::new());
    w.send_listed_pages(span, pages, &hashes).unwrap();
    w.get_ref().clone()
}

/// A well-formed frame of `kind`, fitting the decoder's layout where it names memory.
/// Exhaustive on purpose: a new frame kind does not compile until it has a seed.
fn frame_of(kind: FrameKind) -> Vec<u8> {
    match kind {
        FrameKind::Hello => encoded(&Hello {
            session: 7,
            stream_index: 0,
            stream_count: 1,
            nonce: [0; NONCE_LEN],
            layout: decoder_layout(),
            resume: false,
        }),
        FrameKind::Challenge => encoded(&Challenge {
            key_required: true,
            nonce: [0x5a; NONCE_LEN],
        }),
        FrameKind::Auth => encoded(&Auth {
            mac: Some([0xa5; MAC_LEN]),
        }),
        FrameKind::Welcome => encoded(&Welcome {
            mac: Some([0x3c; MAC_LEN]),
        }),
        FrameKind::RoundBegin => encoded(&RoundBegin {
            round: 1,
            pages: 0,
            final_round: true,
        }),
        FrameKind::Pages => pages_frame(0, PS, &[0x44; PS as usize]),
        FrameKind::Zero => encoded(&Zero {
            span: PageSpan {
                region: 1,
                offset: 0,
                len: PS,
            },
        }),
        FrameKind::RoundEnd => encoded(&RoundEnd::new(1, 0, 0)),
        FrameKind::Finish => encoded(&Finish {
            rounds: 1,
            check: FinalCheck::Recorded,
            digest: 0,
        }),
        FrameKind::Done => encoded(&Done {
            pages: 2,
            digest: 0,
        }),
        FrameKind::Error => encoded(&ErrorFrame {
            code: 1,
            message: "the peer refused".into(),
        }),
        FrameKind::Index => encoded(&Index {
            entries: vec![IndexEntry {
                region: 0,
                offset: 0,
                len: PS,
                file_offset: u64::MAX,
            }],
        }),
        FrameKind::Trailer => encoded(&Trailer {
            index_offset: 64,
            trailer_offset: 96,
            digest: 0,
        }),
        FrameKind::State => encoded(&State::new(STATE_BLOB)),
        FrameKind::Commit => encoded(&Commit { digest: 0 }),
        FrameKind::Ping => encoded(&Ping { token: 0x1234 }),
        FrameKind::Pong => encoded(&Pong { token: 0x1234 }),
        FrameKind::Resume => encoded(&Resume {
            next_round: 1,
            block_pages: 64,
            block_digests: vec![0],
        }),
        // The next id after the decoder's layout: a region added between rounds.
        FrameKind::Region => encoded(&Region {
            region: MemoryRegion::new(2, 4 * PS, PS).guest(0x10_0000),
        }),
        // An image record only: the round after it stands for rounds 0..3.
        FrameKind::Compacted => encoded(&Compacted {
            rounds: 3,
            bytes_dropped: 8192,
            compactions: 1,
            added_before: Vec::new(),
        }),
        // Between rounds: the memory that exists now (region 0's first 2 pages, region 1).
        FrameKind::Mapped => encoded(&Mapped {
            spans: vec![
                PageSpan {
                    region: 0,
                    offset: 0,
                    len: 2 * PS,
                },
                PageSpan {
                    region: 1,
                    offset: 0,
                    len: 2 * PS,
                },
            ],
        }),
    }
}

/// Every frame kind this build knows.
fn kinds() -> Vec<FrameKind> {
    (0..=u8::MAX).filter_map(FrameKind::from_u8).collect()
}

/// A stream for the decoder's layout as a sender writes it after the handshake: round 0
/// (region 0: a page of 0x11 and a zero page; region 1: a page of 0x22), then `extra`
/// between the rounds and the state (where a PING or a REGION belongs), the state blob and
/// FINISH with the memory's digest (`added` pages of regions `extra` adds included, never
/// sent: zeros).
fn stream(extra: &[u8], added: usize) -> Vec<u8> {
    let ps = PS as usize;
    let mut mem = vec![0u8; (6 + added) * ps];
    mem[..ps].fill(0x11);
    mem[4 * ps..5 * ps].fill(0x22);
    let mut s = encoded(&RoundBegin {
        round: 0,
        pages: 0,
        final_round: false,
    });
    s.extend(pages_frame(0, 0, &mem[..ps]));
    s.extend(encoded(&Zero {
        span: PageSpan {
            region: 0,
            offset: PS,
            len: PS,
        },
    }));
    s.extend(pages_frame(1, 0, &mem[4 * ps..5 * ps]));
    s.extend(encoded(&RoundEnd::new(0, 2, 1)));
    s.extend_from_slice(extra);
    s.extend(encoded(&State::new(STATE_BLOB)));
    let mut digest = MemoryDigest::new();
    digest.push_pages(&mem, ps).unwrap();
    s.extend(encoded(&Finish {
        rounds: 1,
        check: FinalCheck::Recorded,
        digest: digest.finish(),
    }));
    s
}

/// The frame decoder target's described form (odd first byte, see its module docs): a
/// ROUND_BEGIN, then one frame of `kind` with the payload of [`frame_of`]. Per frame: kind,
/// codec, flags, a, b, c (small forms: a and b count 4 KiB pages up to 7, c a region id up
/// to 2), two length bytes, the payload.
fn described(kind: FrameKind) -> Vec<u8> {
    fn one(kind: FrameKind, flags: u8, a: u8, b: u8, c: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut v = vec![
            kind as u8,
            0,
            flags,
            a,
            b,
            c,
            (n / 64) as u8,
            (n % 64) as u8,
        ];
        v.extend_from_slice(payload);
        v
    }
    let frame = frame_of(kind);
    let payload = &frame[protocol::HEADER_LEN..];
    let mut v = vec![1];
    v.extend(one(FrameKind::RoundBegin, 0, 0, 0, 0, &[]));
    v.extend(match kind {
        // Flag 4: the target makes `b` bytes of pages and lists their hashes.
        FrameKind::Pages => one(kind, 4, 1, 1, 0, &[0x44; 64]),
        FrameKind::Zero => one(kind, 0, 0, 1, 1, &[]),
        // Flag 16: the target sets the blob's length and CRC32C.
        FrameKind::State => one(kind, 16, 0, 0, 0, STATE_BLOB),
        _ => one(kind, 0, 0, 0, 0, payload),
    });
    v
}

const BASE: u64 = 0x40_0000;
/// Image source: 16 pages at `BASE`; the image's first layout covers 4, a region added
/// between rounds 2 more (pages 8..10).
const SOURCE_PAGES: usize = 16;

fn host_pages(first: u64, n: u64) -> Range<u64> {
    BASE + first * PS..BASE + (first + n) * PS
}

/// A complete image made by `Transfer` into `ImageWriter` at `path`: round 0 over the first
/// layout, a REGION record (pages 8..10 of the source, mapped "after the start"), round 1
/// with that region's pages and one page rewritten, the state blob, FINISH, INDEX, TRAILER.
fn image(path: &Path) -> Vec<u8> {
    let layout = Layout::new(vec![
        MemoryRegion::new(0, 4 * PS, PS).host(BASE).guest(0x10_0000),
    ])
    .unwrap();
    let source = SliceSource::new(BASE, memory(SOURCE_PAGES, 9));
    let sink = ImageWriter::create(path, layout.clone()).unwrap();
    let mut tx = Transfer::new(source, sink, layout, 4).unwrap();
    tx.send_round(&[host_pages(0, 4)]).unwrap();
    let added = tx.add_regions_for(&[host_pages(8, 2)], PS).unwrap();
    assert_eq!(added.len(), 1, "one region added");
    tx.send_round(&[host_pages(8, 2), host_pages(1, 1)])
        .unwrap();
    tx.send_state(STATE_BLOB).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    std::fs::read(path).unwrap()
}

/// A complete compacted image made like [`image`] at `path`, compacted after round 1 (its
/// first round stands for rounds 0 and 1), then round 2 rewriting a page again.
fn compacted_image(path: &Path) -> Vec<u8> {
    let layout = Layout::new(vec![
        MemoryRegion::new(0, 4 * PS, PS).host(BASE).guest(0x10_0000),
    ])
    .unwrap();
    let source = SliceSource::new(BASE, memory(SOURCE_PAGES, 9));
    let sink = ImageWriter::create(path, layout.clone())
        .unwrap()
        .with_compaction(Some(CompactionPolicy { ratio: 1, slack: 0 }));
    let mut tx = Transfer::new(source, sink, layout, 4).unwrap();
    tx.send_round(&[host_pages(0, 4)]).unwrap();
    tx.probe_finish().unwrap();
    tx.add_regions_for(&[host_pages(8, 2)], PS).unwrap();
    tx.send_round(&[host_pages(8, 2), host_pages(1, 1)])
        .unwrap();
    tx.probe_finish().unwrap();
    assert!(tx.sink().compaction().is_some(), "compacted after round 1");
    tx.send_round(&[host_pages(1, 1)]).unwrap();
    tx.send_state(STATE_BLOB).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    std::fs::read(path).unwrap()
}

/// The records of an image (after its preamble): (kind, file offset, record length).
fn records(image: &[u8]) -> Vec<(FrameKind, u64, u64)> {
    let mut r = FrameReader::at_offset(&image[PREAMBLE_LEN..], PREAMBLE_LEN as u64);
    let mut p = Vec::new();
    let mut out = Vec::new();
    while (r.offset() as usize) < image.len() {
        let h = r.read_frame(&mut p).expect("a record this build wrote");
        out.push((h.kind, h.offset, r.offset() - h.offset));
    }
    out
}

/// `image` with `frame` inserted before its STATE record (after the last round), the
/// TRAILER's offsets moved to match, so the index still finds every page.
fn image_with(image: &[u8], frame: &[u8]) -> Vec<u8> {
    let recs = records(image);
    let at = |kind| {
        recs.iter()
            .find(|r| r.0 == kind)
            .map(|r| (r.1 as usize, r.2 as usize))
            .unwrap()
    };
    let (state, _) = at(FrameKind::State);
    let (trailer, trailer_len) = at(FrameKind::Trailer);
    let mut p = Vec::new();
    let h = FrameReader::new(&image[trailer..])
        .read_frame(&mut p)
        .unwrap();
    let t: Trailer = h.decode(&p).unwrap();
    let moved = Trailer {
        index_offset: t.index_offset + frame.len() as u64,
        trailer_offset: t.trailer_offset + frame.len() as u64,
        digest: t.digest,
    };
    let mut v = image[..state].to_vec();
    v.extend_from_slice(frame);
    v.extend_from_slice(&image[state..trailer]);
    v.extend(encoded(&moved));
    assert_eq!(trailer + trailer_len, image.len(), "TRAILER ends the image");
    v
}

/// Every seed: (target directory, file name, contents).
fn seeds(scratch: &Path) -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut valid = vec![0];
    valid.extend(stream(&[], 0));
    out.push(("frame_decoder", "seed-valid-stream".to_string(), valid));
    let image = image(&scratch.join("seed.img"));
    out.push(("image_open", "seed-valid-image".to_string(), image.clone()));
    out.push((
        "image_open",
        "seed-compacted-image".to_string(),
        compacted_image(&scratch.join("compacted.img")),
    ));
    for kind in kinds() {
        let n = kind as u8;
        let frame = frame_of(kind);
        let mut raw = vec![0];
        // REGION's seed adds a region of 4 pages.
        let added = if kind == FrameKind::Region { 4 } else { 0 };
        raw.extend(stream(&frame, added));
        out.push(("frame_decoder", format!("seed-kind-{n:02}"), raw));
        out.push((
            "frame_decoder",
            format!("seed-described-{n:02}"),
            described(kind),
        ));
        out.push((
            "image_open",
            format!("seed-kind-{n:02}"),
            image_with(&image, &frame),
        ));
    }
    out
}

#[test]
fn seeds_are_what_they_claim() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds(dir.path());
    let find = |target: &str, name: &str| {
        &seeds
            .iter()
            .find(|s| s.0 == target && s.1 == name)
            .unwrap_or_else(|| panic!("no seed {target}/{name}"))
            .2
    };
    // The valid stream is received whole, into the memory its digest names.
    let layout = decoder_layout();
    let mut sink = MemorySink::new(layout.clone()).unwrap();
    let report = receive_frames(
        &find("frame_decoder", "seed-valid-stream")[1..],
        &layout,
        &mut sink,
    )
    .unwrap();
    assert_eq!((report.rounds, report.pages), (1, 2));
    assert_eq!(sink.checksum().unwrap(), report.checksum);
    assert_eq!(sink.state(), Some(STATE_BLOB));
    // A PING between rounds is accepted; the REGION seed is decoded and grows the layout,
    // into an image writer (the target's memory sink cannot grow and refuses it).
    let ping = &find(
        "frame_decoder",
        &format!("seed-kind-{:02}", FrameKind::Ping as u8),
    )[1..];
    let mut sink = MemorySink::new(layout.clone()).unwrap();
    receive_frames(ping, &layout, &mut sink).unwrap();
    let region = &find(
        "frame_decoder",
        &format!("seed-kind-{:02}", FrameKind::Region as u8),
    )[1..];
    let mut sink = ImageWriter::create(dir.path().join("grown.img"), layout.clone()).unwrap();
    let report = receive_frames(region, &layout, &mut sink).unwrap();
    assert_eq!(report.rounds, 1);
    let mut sink = MemorySink::new(layout.clone()).unwrap();
    let err = receive_frames(region, &layout, &mut sink).unwrap_err();
    assert!(
        matches!(err, TransferError::CannotGrow { region: 2 }),
        "{err:?}"
    );
    // Each kind's seed holds a frame of that kind that this build reads back.
    for kind in kinds() {
        let n = kind as u8;
        let raw = &find("frame_decoder", &format!("seed-kind-{n:02}"))[1..];
        let mut r = FrameReader::new(raw);
        let mut p = Vec::new();
        let mut kinds_read = Vec::new();
        while let Ok(h) = r.read_frame(&mut p) {
            kinds_read.push(h.kind);
        }
        assert_eq!(
            r.offset(),
            raw.len() as u64,
            "{kind}: every frame reads back"
        );
        assert!(kinds_read.contains(&kind), "{kind}: {kinds_read:?}");
        let described = find("frame_decoder", &format!("seed-described-{n:02}"));
        assert_eq!((described[0] % 2, described[9]), (1, n), "{kind}");
        let image = find("image_open", &format!("seed-kind-{n:02}"));
        assert!(
            records(image).iter().any(|r| r.0 == kind),
            "{kind}: image record"
        );
    }
    // The valid image is complete, verifies, and holds a region added mid-stream. A
    // per-kind copy keeps the index and TRAILER right, so what stops its walk is the
    // inserted record: a PING is no image record.
    let path = dir.path().join("check.img");
    std::fs::write(&path, find("image_open", "seed-valid-image")).unwrap();
    let img = Image::open(&path).unwrap();
    assert!(img.is_complete());
    img.verify().unwrap();
    let info = img.info();
    assert_eq!(info.version, precopy_transfer::image::IMAGE_VERSION);
    assert_eq!(info.added_regions.len(), 1);
    assert_eq!(img.state().unwrap().as_deref(), Some(STATE_BLOB));
    // The compacted image: complete, verified, its first round standing for rounds 0-1.
    std::fs::write(&path, find("image_open", "seed-compacted-image")).unwrap();
    let img = Image::open(&path).unwrap();
    img.verify().unwrap();
    let info = img.info();
    assert_eq!(info.compacted.map(|c| c.rounds), Some(2));
    assert_eq!((info.rounds_ended, info.rounds.len()), (3, 2));
    assert_eq!(info.added_regions[0].before_round, 1);
    assert!(
        records(find("image_open", "seed-compacted-image"))
            .iter()
            .any(|r| r.0 == FrameKind::Compacted)
    );
    let ping = find(
        "image_open",
        &format!("seed-kind-{:02}", FrameKind::Ping as u8),
    );
    std::fs::write(&path, ping).unwrap();
    let info = Image::open(&path).unwrap().info();
    assert!(!info.complete);
    let why = info.incomplete_reason.unwrap_or_default();
    assert!(why.contains("PING"), "{why}");
}

/// Writes the seeds to `fuzz/seeds/<target>/` (or `$PRECOPY_FUZZ_SEEDS/<target>/`).
#[test]
#[ignore = "writes the fuzz seeds into the source tree; run by hand (fuzz/README.md)"]
fn write_fuzz_seeds() {
    let root = std::env::var_os("PRECOPY_FUZZ_SEEDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds"));
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds(dir.path());
    for (target, name, bytes) in &seeds {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    }
    println!("{} seeds written under {}", seeds.len(), root.display());
}
