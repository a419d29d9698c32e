//! An image is published (renamed into place) or withdrawn, never both: an interrupted
//! command must not report failure over an image it already published, nor publish one after
//! it reported failure.

mod common;

use common::{PS, memory};
use precopy_transfer::*;
use std::sync::Arc;

const BASE: u64 = 0x40_0000;
const PAGES: usize = 16;

/// A finished, not yet published image of `PAGES` pages at `dir/x.img`, written through `gate`;
/// an earlier file "old" is at that path.
fn finished(
    dir: &tempfile::TempDir,
    gate: &Arc<PublishGate>,
) -> Transfer<SliceSource<Vec<u8>>, ImageWriter> {
    let path = dir.path().join("x.img");
    std::fs::write(&path, b"old").unwrap();
    let layout = Layout::single(PS, BASE, PAGES as u64 * PS).unwrap();
    let sink = ImageWriter::create(&path, layout.clone())
        .unwrap()
        .with_publish_gate(gate.clone());
    let mut tx = Transfer::new(SliceSource::new(BASE, memory(PAGES, 3)), sink, layout, 8).unwrap();
    tx.send_round(&[BASE..BASE + PAGES as u64 * PS]).unwrap();
    tx.finish_uncommitted(FinalCheck::Recorded).unwrap();
    tx
}

#[test]
fn a_withdrawn_image_is_never_published_and_the_old_file_stays() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(PublishGate::new());
    let mut tx = finished(&dir, &gate);
    assert!(gate.withdraw());
    let err = tx.commit().unwrap_err();
    assert!(
        matches!(err, TransferError::Image(ImageError::Withdrawn { .. })),
        "{err:?}"
    );
    let path = dir.path().join("x.img");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"old",
        "the earlier file was replaced"
    );
    // What was written stays at the partial path, complete but never published.
    image_verify(ImageWriter::partial_path(&path)).unwrap();
    assert!(!gate.published());
}

#[test]
fn a_published_image_cannot_be_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(PublishGate::new());
    let mut tx = finished(&dir, &gate);
    tx.commit().unwrap();
    assert!(gate.published());
    assert!(
        !gate.withdraw(),
        "a withdrawal after the rename must say it came too late"
    );
    let path = dir.path().join("x.img");
    // Complete and checked (verify fails on an incomplete image).
    let report = image_verify(&path).unwrap();
    assert_eq!(report.rounds, 1, "{report:?}");
}
