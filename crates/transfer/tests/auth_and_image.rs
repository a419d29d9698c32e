//! Authentication of peers, and checkpoint images cut short.

mod common;

use common::*;
use precopy_transfer::digest::page_crc;
use precopy_transfer::*;

const BASE: u64 = 0x40_0000;

fn key(b: u8) -> Key {
    Key::from_bytes(vec![b; 32]).unwrap()
}

fn try_transfer(
    sender_key: Option<Key>,
    receiver_key: Option<Key>,
) -> (Result<(), TransferError>, TransferError) {
    let (listener, connect, _d) = listen(&Net::Tcp);
    let rx = spawn_receiver(
        listener,
        ReceiverConfig {
            key: receiver_key,
            ..ReceiverConfig::default()
        },
    );
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let config = SenderConfig {
        key: sender_key,
        ..SenderConfig::default()
    };
    let sent = Sender::connect(
        vec![connect()],
        layout,
        SliceSource::new(BASE, vec![3u8; 4 * PS as usize]),
        &config,
    )
    .map(|_| ());
    let rx_err = match rx.join().unwrap() {
        Ok(_) => panic!("receiver accepted an unauthenticated peer"),
        Err(e) => e,
    };
    (sent, rx_err)
}

#[test]
fn sender_without_key_is_refused() {
    let (sent, rx_err) = try_transfer(None, Some(key(1)));
    assert!(matches!(sent, Err(TransferError::AuthRequired)), "{sent:?}");
    assert!(
        matches!(rx_err, TransferError::AuthFailed { .. }),
        "{rx_err}"
    );
}

#[test]
fn sender_with_wrong_key_is_refused() {
    let (sent, rx_err) = try_transfer(Some(key(2)), Some(key(1)));
    let err = sent.unwrap_err();
    assert!(
        matches!(&err, TransferError::PeerRejected { code: 2, message } if message.contains("authentication")),
        "{err}"
    );
    assert!(
        matches!(rx_err, TransferError::AuthFailed { .. }),
        "{rx_err}"
    );
}

#[test]
fn right_key_works_and_receiver_proves_itself() {
    let (listener, connect, _d) = listen(&Net::Tcp);
    let rx = spawn_receiver(
        listener,
        ReceiverConfig {
            key: Some(key(7)),
            ..ReceiverConfig::default()
        },
    );
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let config = SenderConfig {
        key: Some(key(7)),
        streams: 2,
        ..SenderConfig::default()
    };
    let mut tx = Sender::connect(
        vec![connect(), connect()],
        layout,
        SliceSource::new(BASE, vec![3u8; 4 * PS as usize]),
        &config,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let (_, mem) = rx.join().unwrap().unwrap();
    assert!(mem.iter().all(|&b| b == 3));

    // A sender holding a key refuses a receiver that cannot prove it has it.
    let (listener, connect, _d) = listen(&Net::Tcp);
    let rx = spawn_receiver(listener, ReceiverConfig::default());
    let config = SenderConfig {
        key: Some(key(7)),
        ..SenderConfig::default()
    };
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let err = Sender::connect(
        vec![connect()],
        layout,
        SliceSource::new(BASE, vec![0u8; 4]),
        &config,
    )
    .unwrap_err();
    assert!(matches!(err, TransferError::AuthFailed { .. }), "{err}");
    assert!(rx.join().unwrap().is_err());
}

#[test]
fn non_loopback_listener_requires_a_key() {
    let l = Listener::bind_tcp("0.0.0.0:0").unwrap();
    let err = Receiver::accept(&l, &ReceiverConfig::default()).unwrap_err();
    assert!(matches!(err, TransferError::KeyRequired { .. }), "{err}");
}

#[test]
fn key_file_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("key");
    std::fs::write(&p, b"0123456789abcdef0123\n").unwrap();
    Key::from_file(&p).unwrap();
    std::fs::write(&p, b"short\n").unwrap();
    assert!(matches!(
        Key::from_file(&p),
        Err(TransferError::BadKey { .. })
    ));
    assert!(matches!(
        Key::from_file(&dir.path().join("missing")),
        Err(TransferError::KeyFile { .. })
    ));
}

fn write_image(path: &std::path::Path) -> Vec<u8> {
    let pages = 24;
    let layout = Layout::single(PS, BASE, pages as u64 * PS).unwrap();
    let mem = memory(pages, 11);
    let mut tx = Transfer::new(
        SliceSource::new(BASE, mem),
        ImageWriter::create(path, layout.clone()).unwrap(),
        layout,
        4,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + pages as u64 * PS]).unwrap();
    tx.source_mut().data_mut()[..PS as usize].fill(9);
    tx.send_round(&[BASE..BASE + PS]).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn image_cut_anywhere_never_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full");
    let bytes = write_image(&path);
    let full = Image::open(&path).unwrap();
    assert!(full.is_complete());
    full.verify().unwrap();

    let cut_path = dir.path().join("cut");
    // Every byte near the end (where the trailer and index live) and a stride
    // through the rest, including inside page payloads and headers.
    let mut cuts: Vec<usize> = (bytes.len().saturating_sub(300)..bytes.len()).collect();
    cuts.extend((0..bytes.len()).step_by(509));
    for cut in cuts {
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        match Image::open(&cut_path) {
            Ok(img) => {
                assert!(!img.is_complete(), "cut at {cut} looks complete");
                assert!(!img.info().complete);
                assert!(img.verify().is_err(), "cut at {cut} verifies");
            }
            Err(_) => assert!(
                cut < 200,
                "only a cut inside the header may fail to open ({cut})"
            ),
        }
    }
}

#[test]
fn damaged_image_fails_verify_and_incomplete_rounds_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut bytes = write_image(&path);
    // Flip a byte in the middle of some page data: open (which skips page
    // payloads) still finds it complete, verify finds the bad record.
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let img = Image::open(&path).unwrap();
    let err = img.verify().unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Corrupt { .. } | ImageError::ChecksumMismatch { .. }
        ),
        "{err}"
    );

    // An image whose writer stopped mid-round shows only ended rounds.
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let mut w = ImageWriter::create(&path, layout).unwrap();
    w.begin_round(0).unwrap();
    w.send_pages(0, page(5), &[page_crc(&page(5))]).unwrap();
    w.end_round(0).unwrap();
    w.begin_round(1).unwrap();
    w.send_pages(PS, page(6), &[page_crc(&page(6))]).unwrap();
    drop(w);
    let img = Image::open(&path).unwrap();
    let info = img.info();
    assert!(!info.complete);
    assert_eq!(info.rounds.len(), 1);
    assert_eq!(info.data_pages, 1);
    assert_eq!(img.read_span_to_vec(PS..PS + 4).unwrap(), vec![0; 4]);
    assert!(matches!(img.verify(), Err(ImageError::Incomplete { .. })));
}

#[test]
fn image_refuses_wrong_checksum_and_stays_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let layout = Layout::single(PS, BASE, 2 * PS).unwrap();
    let mut w = ImageWriter::create(&path, layout).unwrap();
    w.begin_round(0).unwrap();
    w.send_pages(0, page(5), &[page_crc(&page(5))]).unwrap();
    w.end_round(0).unwrap();
    assert!(matches!(
        w.finish(1, FinalCheck::Recorded),
        Err(TransferError::ChecksumMismatch { .. })
    ));
    drop(w);
    assert!(!Image::open(&path).unwrap().is_complete());
}

/// A page filled with `byte`.
fn page(byte: u8) -> PageBuf {
    PageBuf::from_vec(vec![byte; PS as usize])
}
