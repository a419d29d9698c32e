//! Images that stay bounded however many rounds run: `ImageWriter` compacts between rounds
//! (driver style: when pinged between rounds; receiver style: at the end of a round when
//! nobody pings), and the compacted image reads back, verifies and tells its story exactly.

mod common;

use common::{PS, memory, redirty};
use precopy_transfer::*;
use rand::{SeedableRng, rngs::StdRng};

const BASE: u64 = 0x40_0000;
/// Source pages; the image's first layout covers the first 96, a region added mid-stream
/// pages 100..110.
const SOURCE_PAGES: usize = 128;
const FIRST: u64 = 96;
const ADDED: std::ops::Range<u64> = 100..110;

/// An upper bound on a compacted copy of an image of `pages` pages: every page in a record
/// of its own, plus 4 KiB for the preamble, HELLO, REGION and COMPACTED records.
fn compacted_bound(pages: u64) -> u64 {
    pages * (PS + 8 + 32) + 4096
}

/// Runs `rounds` rounds after round 0, each rewriting `per_round` random pages of the
/// first layout (some become zeros) and, from round 50 on, one page of the added region;
/// with `ping`, pings between rounds as a migration driver does. Returns the image path's
/// directory, the largest file length seen after a round, and the source memory at the end.
fn run(rounds: u64, per_round: usize, ping: bool) -> (tempfile::TempDir, u64, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.img");
    let layout = Layout::new(vec![
        MemoryRegion::new(0, 64 * PS, PS)
            .host(BASE)
            .guest(0x1000_0000),
        MemoryRegion::new(1, (FIRST - 64) * PS, PS).host(BASE + 64 * PS),
    ])
    .unwrap();
    let policy = CompactionPolicy { ratio: 2, slack: 0 };
    let sink = ImageWriter::create(&path, layout.clone())
        .unwrap()
        .with_compaction(Some(policy));
    let mut tx = Transfer::new(
        SliceSource::new(BASE, memory(SOURCE_PAGES, 1)),
        sink,
        layout,
        8,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let mut largest = 0;
    tx.send_round(&[BASE..BASE + FIRST * PS]).unwrap();
    for r in 1..=rounds {
        if ping {
            tx.probe_finish().unwrap();
        }
        let first = (FIRST * PS) as usize;
        let mut dirty = redirty(
            &mut tx.source_mut().data_mut()[..first],
            BASE,
            per_round,
            &mut rng,
        );
        let added = BASE + ADDED.start * PS..BASE + ADDED.end * PS;
        if r == 50 {
            assert_eq!(
                tx.add_regions_for(std::slice::from_ref(&added), PS)
                    .unwrap()
                    .len(),
                1
            );
            dirty.push(added);
        } else if r > 50 {
            let page = BASE + (ADDED.start + r % 10) * PS;
            tx.source_mut().data_mut()[(page - BASE) as usize] = r as u8;
            dirty.push(page..page + PS);
        }
        tx.send_round(&dirty).unwrap();
        largest = largest.max(tx.sink().bytes_written());
    }
    tx.send_state(b"state").unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let (src, w) = tx.into_parts();
    assert!(
        w.compaction().is_some_and(|c| c.compactions > 1),
        "{:?}",
        w.compaction()
    );
    (dir, largest, src.data().to_vec())
}

/// What the image should hold: the first layout's pages, then the added region's.
fn expected(src: &[u8]) -> Vec<u8> {
    let mut v = src[..(FIRST * PS) as usize].to_vec();
    v.extend_from_slice(&src[(ADDED.start * PS) as usize..(ADDED.end * PS) as usize]);
    v
}

fn check(dir: &tempfile::TempDir, largest: u64, src: &[u8], rounds: u64) {
    let path = dir.path().join("many.img");
    let pages = FIRST + (ADDED.end - ADDED.start);
    // Without compaction the file would pass 200 × 30 pages (24 MiB); with it, it stays
    // under twice a compacted copy and one round.
    let bound = 2 * compacted_bound(pages) + 64 * (PS + 40);
    assert!(
        largest <= bound,
        "largest file {largest} bytes > bound {bound}"
    );
    let img = Image::open(&path).unwrap();
    assert!(img.is_complete());
    let report = img.verify().unwrap();
    assert_eq!(report.rounds, rounds + 1);
    let info = img.info();
    assert!(info.file_len <= bound, "{info:?}");
    assert_eq!(info.rounds_ended, rounds + 1);
    let c = info.compacted.expect("compacted");
    assert!(c.compactions > 1 && c.bytes_dropped > 0, "{c:?}");
    // The region added before round 50 is still said to be, through every compaction.
    assert_eq!(info.added_regions.len(), 1);
    assert_eq!(info.added_regions[0].before_round, 50);
    assert_eq!(img.state().unwrap().as_deref(), Some(&b"state"[..]));
    // `image cat` of all memory equals the source's.
    let got = img.read_span_to_vec(0..pages * PS).unwrap();
    assert!(got == expected(src), "the image differs from the memory");
    let text = info.to_string();
    assert!(text.contains("compacted:"), "{text}");
}

#[test]
fn two_hundred_rounds_over_the_same_pages_stay_bounded_and_read_back_exactly() {
    let (dir, largest, src) = run(200, 30, true);
    check(&dir, largest, &src, 200);
}

#[test]
fn an_image_nobody_pings_is_compacted_at_the_end_of_a_round() {
    let (dir, largest, src) = run(80, 30, false);
    check(&dir, largest, &src, 80);
}
