//! Hostile and broken input: every fault gives its clear error, and nothing
//! after the fault is applied.

mod common;

use std::io::{Read, Write};

use common::*;
use precopy_transfer::protocol::{self, FrameKind, encode_header};
use precopy_transfer::*;

/// Offset of the first page in region 0: frames name pages by region and
/// offset, so tests write offsets as `BASE + n * PS`.
const BASE: u64 = 0;

fn layout() -> Layout {
    Layout::single(PS, 0x10000, 8 * PS).unwrap()
}

/// A frame with header fields `a`, `b`, `c`; an (uncompressed) PAGES frame
/// gets its pages' hash list after `payload`, as a sender writes it.
fn frame(kind: FrameKind, a: u64, b: u64, c: u32, payload: &[u8]) -> Vec<u8> {
    if kind == FrameKind::Pages {
        let hashes: Vec<u64> = payload.chunks(PS as usize).map(digest::page_hash).collect();
        let list = digest::hash_list(&hashes);
        let span = protocol::PageSpan {
            region: c,
            offset: a,
            len: b,
        };
        let mut v = protocol::Pages::listed_header(span, &list, false)
            .to_bytes()
            .to_vec();
        v.extend_from_slice(payload);
        v.extend_from_slice(&list);
        return v;
    }
    let mut v = encode_header(kind, 0, a, b, c, payload).to_vec();
    v.extend_from_slice(payload);
    v
}

/// A valid stream: round 0 with page 0 = 0x11.., page 1 = 0x22.., then the
/// frames `tail` in the same round.
fn stream_with(tail: &[Vec<u8>]) -> Vec<u8> {
    let mut s = frame(FrameKind::RoundBegin, 0, 0, 0, &[]);
    s.extend(frame(FrameKind::Pages, BASE, PS, 0, &[0x11; PS as usize]));
    s.extend(frame(
        FrameKind::Pages,
        BASE + PS,
        PS,
        0,
        &[0x22; PS as usize],
    ));
    for t in tail {
        s.extend_from_slice(t);
    }
    s
}

/// Feeds `bytes` to a receiver; returns its error and the memory it left.
fn receive(bytes: &[u8]) -> (TransferError, MemorySink) {
    let mut sink = MemorySink::new(layout()).unwrap();
    let err = receive_frames(bytes, &layout(), &mut sink).unwrap_err();
    (err, sink)
}

/// Pages 0 and 1 were applied, nothing else.
fn assert_only_prefix_applied(sink: &MemorySink) {
    let m = sink.memory().expect("owned memory");
    assert!(m[..PS as usize].iter().all(|&b| b == 0x11));
    assert!(m[PS as usize..2 * PS as usize].iter().all(|&b| b == 0x22));
    assert!(
        m[2 * PS as usize..].iter().all(|&b| b == 0),
        "something past the fault was applied"
    );
    assert_eq!(sink.stats().pages, 2);
}

#[test]
fn good_stream_is_accepted() {
    let mut s = stream_with(&[]);
    let mut zero = 0u64.to_le_bytes().to_vec();
    s.extend(frame(FrameKind::RoundEnd, 0, 2, 0, &zero));
    zero.clear();
    let mut expect_mem = vec![0u8; 8 * PS as usize];
    expect_mem[..PS as usize].fill(0x11);
    expect_mem[PS as usize..2 * PS as usize].fill(0x22);
    let mut digest = MemoryDigest::new();
    digest.push_pages(&expect_mem, PS as usize).unwrap();
    for check in [FinalCheck::Recorded, FinalCheck::Full] {
        let mut s = s.clone();
        s.extend(frame(
            FrameKind::Finish,
            1,
            digest.finish(),
            check.wire() as u32,
            &[],
        ));
        let mut sink = MemorySink::new(layout()).unwrap();
        let report = receive_frames(&s, &layout(), &mut sink).unwrap();
        assert_eq!((report.rounds, report.pages, report.check), (1, 2, check));
        assert_eq!(sink.memory(), Some(&expect_mem[..]));
    }
    // A FINISH asking for a check this receiver does not know is refused.
    s.extend(frame(FrameKind::Finish, 1, digest.finish(), 2, &[]));
    let mut sink = MemorySink::new(layout()).unwrap();
    let err = receive_frames(&s, &layout(), &mut sink).unwrap_err();
    assert!(err.to_string().contains("unknown final check"), "{err}");
}

#[test]
fn truncated_stream() {
    let full = stream_with(&[frame(
        FrameKind::Pages,
        BASE + 2 * PS,
        PS,
        0,
        &[0x33; PS as usize],
    )]);
    // Cut inside the third page frame: its header, then its payload.
    for cut in [full.len() - PS as usize - 10, full.len() - 1] {
        let (err, sink) = receive(&full[..cut]);
        assert!(
            matches!(
                err,
                TransferError::Protocol(ProtocolError::Truncated { .. })
            ),
            "{err}"
        );
        assert_only_prefix_applied(&sink);
    }
    // A stream that just stops between frames was ended by its sender, not cut inside a
    // frame: said so, apart from the cuts above.
    let whole = stream_with(&[]);
    let (err, sink) = receive(&whole);
    assert!(
        matches!(
            err,
            TransferError::Protocol(ProtocolError::SenderClosed { offset }) if offset == whole.len() as u64
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("the sender ended the transfer"),
        "{err}"
    );
    assert!(err.is_connection_break(), "resumable like any break");
    assert_only_prefix_applied(&sink);
}

#[test]
fn bad_checksum() {
    // A damaged page fails its listed hash; a damaged hash list (or header)
    // fails the frame CRC. Either way nothing of the frame is applied.
    let good = frame(FrameKind::Pages, BASE + 2 * PS, PS, 0, &[0x33; PS as usize]);
    let n = good.len();
    for (at, needle) in [(n - 100, "fails its hash"), (n - 1, "bad checksum")] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        let (err, sink) = receive(&stream_with(&[
            bad,
            frame(FrameKind::Pages, BASE + 3 * PS, PS, 0, &[0x44; PS as usize]),
        ]));
        assert!(
            matches!(
                err,
                TransferError::Protocol(
                    ProtocolError::BadChecksum { kind: 6, .. }
                        | ProtocolError::BadPageHash { page: 0, .. }
                )
            ),
            "{err}"
        );
        assert!(err.to_string().contains(needle), "{err}");
        assert_only_prefix_applied(&sink);
    }
}

/// A frame larger than one read of the receiver (`HASH_AS_READ`) with a damaged page in a later
/// read fails on that page, and the whole frame is taken back.
#[test]
fn a_damaged_page_deep_in_a_large_frame_fails_it() {
    let pages = 600u64;
    let layout = Layout::single(PS, 0x10000, (pages + 2) * PS).unwrap();
    let data: Vec<u8> = (0..pages * PS).map(|i| (i % 249) as u8 + 1).collect();
    let mut bad = frame(FrameKind::Pages, BASE + 2 * PS, pages * PS, 0, &data);
    let damaged = 555usize;
    bad[protocol::HEADER_LEN + damaged * PS as usize + 17] ^= 0x01;
    let mut sink = MemorySink::new(layout.clone()).unwrap();
    let err = receive_frames(&stream_with(&[bad]), &layout, &mut sink).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::Protocol(ProtocolError::BadPageHash { page, .. }) if page == damaged as u64
        ),
        "{err}"
    );
    let m = sink.memory().expect("owned memory");
    assert!(
        m[2 * PS as usize..].iter().all(|&b| b == 0),
        "the frame stayed applied"
    );
    assert_eq!(sink.stats().pages, 2);
}

#[test]
fn page_outside_layout() {
    for (offset, len, region) in [
        (BASE + 8 * PS, PS, 0),
        (BASE, PS, 1),
        (BASE + 7 * PS, 2 * PS, 0),
        (u64::MAX - PS + 1, PS, 0),
    ] {
        let (err, sink) = receive(&stream_with(&[
            frame(
                FrameKind::Pages,
                offset,
                len,
                region,
                &vec![0x55; len as usize],
            ),
            frame(FrameKind::Pages, BASE + 3 * PS, PS, 0, &[0x44; PS as usize]),
        ]));
        assert!(
            matches!(
                err,
                TransferError::Protocol(ProtocolError::PageOutsideLayout { .. })
            ),
            "{err}"
        );
        assert_only_prefix_applied(&sink);
    }
    // A zero range outside the layout is refused the same way.
    let (err, sink) = receive(&stream_with(&[frame(
        FrameKind::Zero,
        BASE + 6 * PS,
        4 * PS,
        0,
        &[],
    )]));
    assert!(matches!(
        err,
        TransferError::Protocol(ProtocolError::PageOutsideLayout { .. })
    ));
    assert_only_prefix_applied(&sink);
}

#[test]
fn other_malformed_frames() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            frame(FrameKind::Pages, BASE + 100, PS, 0, &[1; PS as usize]),
            "whole pages",
        ),
        (
            {
                // The pages' length and the payload (without a hash list) disagree.
                let mut f =
                    encode_header(FrameKind::Pages, 0, BASE + 2 * PS, PS, 0, &[1; 100]).to_vec();
                f.extend_from_slice(&[1; 100]);
                f
            },
            "one hash per page",
        ),
        (
            frame(FrameKind::Pages, BASE + 2 * PS, 0, 0, &[]),
            "whole pages",
        ),
        (
            frame(FrameKind::RoundBegin, 1, 0, 0, &[]),
            "unexpected ROUND_BEGIN",
        ),
        (frame(FrameKind::Finish, 0, 0, 0, &[]), "unexpected FINISH"),
        (frame(FrameKind::Hello, 0, 0, 0, &[]), "unexpected HELLO"),
        (
            frame(FrameKind::RoundEnd, 0, 5, 0, &0u64.to_le_bytes()),
            "announces 5 pages",
        ),
        (
            frame(FrameKind::RoundEnd, 3, 2, 0, &0u64.to_le_bytes()),
            "out of order",
        ),
        (
            {
                let mut f =
                    encode_header(FrameKind::Pages, 9, BASE + 2 * PS, PS, 0, &[1; 10]).to_vec();
                f.extend_from_slice(&[1; 10]);
                f
            },
            "unknown codec",
        ),
        (
            {
                let mut f =
                    encode_header(FrameKind::Pages, 1, BASE + 2 * PS, PS, 0, &[7; 64]).to_vec();
                f.extend_from_slice(&[7; 64]);
                f
            },
            "does not decompress",
        ),
        (
            {
                let mut f =
                    encode_header(FrameKind::Pages, 2, BASE + 2 * PS, PS, 0, &[7; 64]).to_vec();
                f.extend_from_slice(&[7; 64]);
                f
            },
            "does not decompress",
        ),
        (
            {
                let mut h = encode_header(FrameKind::Zero, 0, 0, 0, 0, &[]);
                h[0] = 99;
                let crc = crc32c::crc32c(&h[..28]);
                h[28..].copy_from_slice(&crc.to_le_bytes());
                h.to_vec()
            },
            "unknown frame kind 99",
        ),
        (
            frame(FrameKind::Error, 0, 0, 1, b"sender gave up"),
            "sender gave up",
        ),
    ];
    for (bad, needle) in cases {
        let (err, sink) = receive(&stream_with(&[
            bad,
            frame(FrameKind::Pages, BASE + 3 * PS, PS, 0, &[0x44; PS as usize]),
        ]));
        assert!(
            err.to_string().contains(needle),
            "wanted {needle:?}, got {err}"
        );
        assert_only_prefix_applied(&sink);
    }
}

#[test]
fn checksum_mismatch_is_not_success() {
    let mut s = stream_with(&[]);
    s.extend(frame(FrameKind::RoundEnd, 0, 2, 0, &0u64.to_le_bytes()));
    s.extend(frame(FrameKind::Finish, 1, 0xdead_beef_0000_0001, 0, &[]));
    let (err, _) = receive(&s);
    assert!(
        matches!(
            err,
            TransferError::ChecksumMismatch {
                expected: 0xdead_beef_0000_0001,
                ..
            }
        ),
        "{err}"
    );
}

/// Runs a receiver on loopback and lets `client` talk to it raw.
fn raw_client(
    config: ReceiverConfig,
    client: impl FnOnce(&mut std::net::TcpStream),
) -> TransferError {
    let l = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let Listener::Tcp(t) = &l else { unreachable!() };
    let addr = t.local_addr().unwrap();
    // One connection's handshake (`Receiver::accept` would refuse it and keep listening).
    let rx = std::thread::spawn(move || {
        let conn = l.accept().unwrap();
        Receiver::accept_connection(conn, &config).map(|_| ())
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    client(&mut s);
    rx.join().unwrap().unwrap_err()
}

/// A HELLO announcing one region (id 0) of `region_len` bytes in pages of
/// `page_size`.
fn hello_frame(page_size: u64, region_len: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0u32.to_le_bytes()); // stream index
    p.extend_from_slice(&1u32.to_le_bytes()); // stream count
    p.extend_from_slice(&[0; 16]); // nonce
    p.extend_from_slice(&1u32.to_le_bytes()); // regions
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes()); // id
    p.extend_from_slice(&[0, 0, 0, 0]); // backing, flags, reserved
    p.extend_from_slice(&region_len.to_le_bytes());
    p.extend_from_slice(&page_size.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes()); // guest address (absent)
    frame(FrameKind::Hello, 1, 0, 0, &p)
}

#[test]
fn old_and_unknown_versions() {
    // Versions 1 (whole-memory CRC in FINISH), 2 (pages named by host
    // address, no state), 3 (a CRC32C per page, 32-bit digests), 4 (no
    // REGION: a layout fixed at the start) and 6 (the final round not marked:
    // a version 6 sender's destination would never be raised, a version 6
    // receiver would ignore the mark) are no longer spoken; 8 never was.
    for (version, said) in [
        (1u32, "version 1 is no longer supported"),
        (2, "version 2 is no longer supported"),
        (3, "version 3 is no longer supported"),
        (4, "version 4 is no longer supported"),
        (6, "the final round marked"),
        (8, "unknown protocol version 8"),
    ] {
        let mut reply = Vec::new();
        let err = raw_client(receiver_config(), |s| {
            let mut pre = protocol::preamble();
            pre[8..12].copy_from_slice(&version.to_le_bytes());
            s.write_all(&pre).unwrap();
            s.read_to_end(&mut reply).unwrap();
        });
        let old = matches!(
            err,
            TransferError::Protocol(ProtocolError::OldVersion { version: v, .. }) if v == version
        );
        let unknown = matches!(
            err,
            TransferError::Protocol(ProtocolError::UnknownVersion { version: v, .. }) if v == version
        );
        assert!(
            if version < protocol::VERSION {
                old
            } else {
                unknown
            },
            "{err}"
        );
        // The receiver said why before closing.
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains(said), "{text}");
    }
}

#[test]
fn wrong_page_size() {
    let config = ReceiverConfig {
        page_size: Some(4096),
        ..receiver_config()
    };
    let err = raw_client(config, |s| {
        s.write_all(&protocol::preamble()).unwrap();
        s.write_all(&hello_frame(8192, 4 * 8192)).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    assert!(
        matches!(
            err,
            TransferError::Protocol(ProtocolError::WrongPageSize {
                ours: 4096,
                theirs: 8192
            })
        ),
        "{err}"
    );
    // A layout not aligned to the announced page size is refused too.
    let err = raw_client(receiver_config(), |s| {
        s.write_all(&protocol::preamble()).unwrap();
        s.write_all(&hello_frame(8192, 3 * 4096)).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    assert!(
        matches!(err, TransferError::Protocol(ProtocolError::BadLayout(_))),
        "{err}"
    );
}

#[test]
fn not_precopy_at_all() {
    let err = raw_client(receiver_config(), |s| {
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    assert!(
        matches!(err, TransferError::Protocol(ProtocolError::BadMagic { .. })),
        "{err}"
    );
}

#[test]
fn receiver_fault_mid_stream_reaches_the_sender() {
    // The sender announces a layout, then a frame damaged on the way (here:
    // written by hand after a proper handshake) makes the receiver stop and
    // report; the sender sees the receiver's reason.
    let (listener, connect, _d) = listen(&Net::Unix);
    let rx = spawn_receiver(listener, receiver_config());
    let layout = Layout::single(PS, BASE, 8 * PS).unwrap();
    let mut tx = Sender::connect(
        vec![connect()],
        layout.clone(),
        SliceSource::new(BASE, vec![1u8; 8 * PS as usize]),
        &sender_config(),
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 8 * PS]).unwrap();
    // Finish with a wrong checksum: the receiver refuses success.
    let err = tx
        .finish_with_checksum(0x1234_5678, FinalCheck::Recorded)
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::PeerRejected { code: 3, message } if message.contains("checksum mismatch")),
        "{err}"
    );
    let rx_err = rx.join().unwrap().unwrap_err();
    assert!(
        matches!(rx_err, TransferError::ChecksumMismatch { .. }),
        "{rx_err}"
    );
}

/// A [`MemorySink`] that counts the frames it took in place.
struct Counting {
    inner: MemorySink,
    lent: u64,
    reverted: u64,
}

impl Counting {
    fn new() -> Counting {
        Counting {
            inner: MemorySink::new(layout()).unwrap(),
            lent: 0,
            reverted: 0,
        }
    }
}

impl Sink for Counting {
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        self.inner.begin_round(round)
    }
    fn send_pages(&mut self, addr: u64, pages: PageBuf, crcs: &[u64]) -> Result<(), TransferError> {
        self.inner.send_pages(addr, pages, crcs)
    }
    fn send_zero_range(&mut self, range: std::ops::Range<u64>) -> Result<(), TransferError> {
        self.inner.send_zero_range(range)
    }
    fn end_round(&mut self, round: u64) -> Result<u64, TransferError> {
        self.inner.end_round(round)
    }
    fn finish(&mut self, checksum: u64, check: FinalCheck) -> Result<(), TransferError> {
        self.inner.finish(checksum, check)
    }
    fn lend_pages(&mut self, addr: u64, len: u64) -> Option<&mut [u8]> {
        let lent = self.inner.lend_pages(addr, len);
        self.lent += u64::from(lent.is_some());
        lent
    }
    fn commit_lent(&mut self, addr: u64, crcs: &[u64]) -> Result<(), TransferError> {
        self.inner.commit_lent(addr, crcs)
    }
    fn revert_lent(&mut self, addr: u64, len: u64) {
        self.reverted += 1;
        self.inner.revert_lent(addr, len)
    }
}

#[test]
fn fresh_pages_are_read_in_place_and_a_bad_one_is_put_back() {
    // Page 0 already holds data: a damaged copy of it is not lent, and the
    // old contents stay.
    let mut bad = frame(FrameKind::Pages, BASE, PS, 0, &[0x77; PS as usize]);
    let n = bad.len();
    bad[n - 1] ^= 1;
    let mut sink = Counting::new();
    let err = receive_frames(&stream_with(&[bad]), &layout(), &mut sink).unwrap_err();
    assert!(err.to_string().contains("bad checksum"), "{err}");
    assert_eq!(
        (sink.lent, sink.reverted),
        (2, 0),
        "pages 0 and 1 went in place"
    );
    assert_only_prefix_applied(&sink.inner);

    // A fresh page with a damaged payload is lent, then zeroed again.
    let mut bad = frame(FrameKind::Pages, BASE + 5 * PS, PS, 0, &[0x66; PS as usize]);
    bad[HEADER + 3] ^= 0x80;
    let mut sink = Counting::new();
    let err = receive_frames(&stream_with(&[bad]), &layout(), &mut sink).unwrap_err();
    assert!(err.to_string().contains("fails its hash"), "{err}");
    assert_eq!((sink.lent, sink.reverted), (3, 1));
    assert_only_prefix_applied(&sink.inner);
}

const HEADER: usize = protocol::HEADER_LEN;
