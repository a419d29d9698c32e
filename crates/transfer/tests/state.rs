//! The state blob: sent after the last round with its own checksum, handed to the destination
//! before it acknowledges, written to images; a damaged blob is refused, never applied.

mod common;

use common::*;
use precopy_transfer::protocol::{FrameKind, encode_header};
use precopy_transfer::*;

const BASE: u64 = 0x40_0000;

fn frame(kind: FrameKind, a: u64, b: u64, c: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = encode_header(kind, 0, a, b, c, payload).to_vec();
    v.extend_from_slice(payload);
    v
}

/// One round of four zero pages, then `tail`, then FINISH with the matching digest.
fn stream(tail: &[u8]) -> Vec<u8> {
    let mut s = frame(FrameKind::RoundBegin, 0, 0, 0, &[]);
    s.extend(frame(FrameKind::Zero, 0, 4 * PS, 0, &[]));
    s.extend(frame(FrameKind::RoundEnd, 0, 0, 0, &4u64.to_le_bytes()));
    s.extend_from_slice(tail);
    let mut digest = MemoryDigest::new();
    digest
        .push_pages(&vec![0u8; 4 * PS as usize], PS as usize)
        .unwrap();
    s.extend(frame(FrameKind::Finish, 1, digest.finish(), 0, &[]));
    s
}

fn layout() -> Layout {
    Layout::single(PS, BASE, 4 * PS).unwrap()
}

#[test]
fn state_round_trip_over_a_socket() {
    let (listener, connect, _dir) = listen(&Net::Tcp);
    let rx = std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &receiver_config())?;
        let mut sink = MemorySink::new(rx.layout().clone())?;
        let report = rx.run(&mut sink)?;
        Ok::<_, TransferError>((report, sink.take_state()))
    });
    let config = SenderConfig {
        streams: 2,
        ..sender_config()
    };
    let mut tx = Sender::connect(
        vec![connect(), connect()],
        layout(),
        SliceSource::new(BASE, memory(4, 9)),
        &config,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    // Too large: refused before anything is sent, and the transfer stays usable.
    let max = MAX_STATE_LEN;
    assert!(
        matches!(
            tx.send_state(&vec![7u8; max as usize + 1]),
            Err(TransferError::StateTooLarge { len, max: m }) if len == max + 1 && m == max
        ),
        "a state blob over {max} bytes"
    );
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    tx.send_state(&blob).unwrap();
    assert!(
        matches!(tx.send_state(&blob), Err(TransferError::Misuse { .. })),
        "one state per transfer"
    );
    tx.finish(FinalCheck::Recorded).unwrap();
    let (report, state) = rx.join().unwrap().unwrap();
    assert_eq!(report.state_bytes, Some(blob.len() as u64));
    assert_eq!(state.as_deref(), Some(&blob[..]));
}

#[test]
fn damaged_state_is_refused_before_the_acknowledgement() {
    let blob = b"vcpu0: rip=0xfff0 rsp=0x7000";
    let good = frame(
        FrameKind::State,
        blob.len() as u64,
        0,
        crc32c::crc32c(blob),
        blob,
    );
    let mut sink = MemorySink::new(layout()).unwrap();
    let report = receive_frames(&stream(&good), &layout(), &mut sink).unwrap();
    assert_eq!(report.state_bytes, Some(blob.len() as u64));
    assert_eq!(sink.state(), Some(&blob[..]));

    // A flipped bit in transit: the frame's CRC catches it.
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 4;
    // A blob damaged before it was framed (the frame CRC is right, the blob's own is not).
    let mut damaged = blob.to_vec();
    damaged[3] ^= 0x40;
    let forged = frame(
        FrameKind::State,
        blob.len() as u64,
        0,
        crc32c::crc32c(blob),
        &damaged,
    );
    // A second state blob.
    let twice = [good.clone(), good.clone()].concat();
    for (name, tail) in [("flipped", flipped), ("forged", forged), ("twice", twice)] {
        let mut sink = MemorySink::new(layout()).unwrap();
        let err = receive_frames(&stream(&tail), &layout(), &mut sink).unwrap_err();
        assert_eq!(sink.stats().finished, None, "{name}: acknowledged anyway");
        match name {
            "flipped" => assert!(
                matches!(
                    err,
                    TransferError::Protocol(ProtocolError::BadChecksum { .. })
                ),
                "{err}"
            ),
            "forged" => {
                assert!(
                    matches!(
                        err,
                        TransferError::Protocol(ProtocolError::StateChecksum { .. })
                    ),
                    "{err}"
                );
                assert_eq!(sink.state(), None, "a damaged blob never reaches the sink");
            }
            _ => assert!(err.to_string().contains("state"), "{err}"),
        }
    }
    // State inside a round is a protocol fault.
    let mut s = frame(FrameKind::RoundBegin, 0, 0, 0, &[]);
    s.extend_from_slice(&good);
    let mut sink = MemorySink::new(layout()).unwrap();
    let err = receive_frames(&s, &layout(), &mut sink).unwrap_err();
    assert!(err.to_string().contains("inside a round"), "{err}");
}

#[test]
fn images_keep_the_state_and_refuse_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut tx = Transfer::new(
        SliceSource::new(BASE, memory(4, 3)),
        ImageWriter::create(&path, layout()).unwrap(),
        layout(),
        4,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.send_state(b"device state").unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let img = Image::open(&path).unwrap();
    assert_eq!(img.info().state_bytes, Some(12));
    assert_eq!(img.state().unwrap().as_deref(), Some(&b"device state"[..]));
    img.verify().unwrap();

    // Damage one byte of the blob on disk: the image is corrupt and the blob refused.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(12)
        .position(|w| w == b"device state")
        .expect("blob in the file");
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let img = Image::open(&path).unwrap();
    assert!(!img.is_complete());
    assert!(matches!(img.verify(), Err(ImageError::Corrupt { .. })));
    assert!(
        !matches!(img.state(), Ok(Some(_))),
        "the damaged blob is not handed out"
    );
}

#[test]
fn ping_is_answered_between_rounds_and_refused_inside_one() {
    let ping = frame(FrameKind::Ping, 7, 0, 0, &[]);
    let mut sink = MemorySink::new(layout()).unwrap();
    let report = receive_frames(
        &stream(&[ping.clone(), ping.clone()].concat()),
        &layout(),
        &mut sink,
    )
    .unwrap();
    assert_eq!(report.rounds, 1);
    assert!(sink.stats().finished.is_some());

    let mut s = frame(FrameKind::RoundBegin, 0, 0, 0, &[]);
    s.extend_from_slice(&ping);
    let mut sink = MemorySink::new(layout()).unwrap();
    let err = receive_frames(&s, &layout(), &mut sink).unwrap_err();
    assert!(err.to_string().contains("inside a round"), "{err}");

    // A PING with a payload is malformed.
    let bad = frame(FrameKind::Ping, 7, 0, 0, b"x");
    let mut sink = MemorySink::new(layout()).unwrap();
    let err = receive_frames(&stream(&bad), &layout(), &mut sink).unwrap_err();
    assert!(matches!(err, TransferError::Protocol(_)), "{err}");
    assert_eq!(sink.stats().finished, None);
}

/// An image of `layout` (memory at `BASE`) whose state record is `state`, complete.
fn image_with_state(path: &std::path::Path, layout: Layout, state: &[u8]) -> Image {
    let len = layout.total_len();
    let mut tx = Transfer::new(
        SliceSource::new(BASE, memory(len.div_ceil(PS) as usize, 5)),
        ImageWriter::create(path, layout.clone()).unwrap(),
        layout,
        4,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + len]).unwrap();
    tx.send_state(state).unwrap();
    tx.finish(FinalCheck::Recorded).unwrap();
    Image::open(path).unwrap()
}

/// `image info` says what the regions' addresses are from the state record alone: a VM's
/// memory (guest-physical, whatever its state holds) or a process's (virtual addresses, when
/// the record is a `ProcessDescription`); not knowing (a damaged record) is said, not guessed.
#[test]
fn image_info_names_the_kind_of_its_region_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let addressed = || {
        Layout::new(vec![
            MemoryRegion::new(0, 4 * PS, PS)
                .host(BASE)
                .guest(0x7f00_0000_0000),
        ])
        .unwrap()
    };

    // A VMM's image: its state is the VM's (here any bytes).
    let vm = image_with_state(&dir.path().join("vm"), addressed(), b"vcpu registers").info();
    assert_eq!(vm.address_kind, Some(AddressKind::GuestPhysical));
    assert_eq!(vm.process, None);
    let text = vm.to_string();
    assert!(text.contains("guest-physical 0x7f0000000000"), "{text}");
    assert!(!text.contains("process"), "{text}");
    let v = serde_json::to_value(&vm).unwrap();
    assert_eq!(v["address_kind"], "guest-physical address", "{v}");

    // A process's image: the state record describes the process.
    let who = ProcessDescription {
        pid: 4242,
        comm: Some("writer".into()),
        exe: Some("/usr/bin/writer".into()),
    };
    let path = dir.path().join("process");
    let proc = image_with_state(&path, addressed(), &who.to_state()).info();
    assert_eq!(proc.address_kind, Some(AddressKind::ProcessVirtual));
    assert_eq!(proc.process.as_ref(), Some(&who));
    let text = proc.to_string();
    assert!(text.contains("process addresses 0x7f0000000000-"), "{text}");
    assert!(text.contains("memory of process 4242 (writer)"), "{text}");
    assert!(!text.contains("guest-physical"), "{text}");
    let v = serde_json::to_value(&proc).unwrap();
    assert_eq!(v["address_kind"], "process virtual address", "{v}");
    assert_eq!(v["process"]["pid"], 4242, "{v}");

    // The same image with its state record damaged (the record sequence ends there, as in an
    // image cut before its state): the kind is unknown, and said so.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(6)
        .position(|w| w == b"writer")
        .expect("the description in the file");
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let damaged = Image::open(&path).unwrap().info();
    assert_eq!(damaged.address_kind, None);
    let text = damaged.to_string();
    assert!(
        text.contains("addresses 0x7f0000000000-") && text.contains("(of unknown kind)"),
        "{text}"
    );

    // No region has an address: nothing to name.
    let plain = image_with_state(&dir.path().join("plain"), layout(), b"x").info();
    assert_eq!(plain.address_kind, None);
    assert!(!plain.to_string().contains("address 0x"));
}

#[test]
fn only_a_process_description_reads_as_one() {
    let who = ProcessDescription {
        pid: 7,
        comm: None,
        exe: None,
    };
    assert_eq!(
        ProcessDescription::from_state(&who.to_state()),
        Some(who.clone())
    );
    for other in [
        &b"vcpu registers"[..],
        br#"{"pid": 7}"#,
        br#"{"precopy_image_of": "vm", "pid": 7}"#,
        br#"{"precopy_image_of": "process"}"#,
    ] {
        assert_eq!(ProcessDescription::from_state(other), None);
    }
}
