//! Fuzzes the frame decoder and the receiver state machine behind it.
//!
//! The first input byte picks a mode:
//! - even: the rest is a raw byte stream (preamble-less frames after a
//!   handshake), fed to the receiver as is; almost every input dies at a
//!   checksum, which exercises header parsing, length limits and truncation.
//! - odd: the rest describes frames (kind, codec, fields, payload) that this
//!   target encodes with valid CRC32C (and, for uncompressed page frames, a
//!   valid page-hash list, live or not), so the receiver's state machine,
//!   layout checks, decompression and counts see well-formed but hostile
//!   frames.
//!
//! Every frame the bare decoder reads is also decoded as its kind's type
//! (all of HELLO .. COMPACTED, including the receiver-to-sender and image
//! kinds the receiver itself refuses), so each kind's field and payload
//! checks run.
//!
//! The receiver must never panic, and must never report success for memory
//! that does not match the checksum it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_transfer::digest::{hash_list, page_hash};
use precopy_transfer::protocol::{
    Auth, Challenge, Commit, Compacted, Mapped, Done, ErrorFrame, Finish, FrameKind, FrameReader, Header, Hello,
    Index, PageSpan, Pages, Ping, Pong, Region, Resume, RoundBegin, RoundEnd, State, Trailer,
    Welcome, Zero, encode_header,
};
use precopy_transfer::{Layout, MemoryRegion, MemorySink, receive_frames};

fn layout() -> Layout {
    Layout::new(vec![
        MemoryRegion::new(0, 0x4000, 4096),
        MemoryRegion::new(1, 0x2000, 4096),
    ])
    .expect("valid layout")
}

/// Turns a description into frames with valid checksums.
fn encode(mut d: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let kinds = last_kind() + 3;
    while d.len() >= 8 {
        // Every kind byte up to two past the last kind: the unknown ones become ERROR frames
        // (raw mode covers unknown kind bytes), and a kind added later is reached at once.
        let kind = d[0] % kinds;
        let codec = if d[1] & 0x80 != 0 { d[1] } else { d[1] % 3 };
        // Small fields land near the layout (offsets in a region, region ids 0..3);
        // a flag byte widens them.
        let wide = d[2];
        let mut a = if wide & 1 != 0 { u64::from_le_bytes(pad(&d[3..])) } else { u64::from(d[3] % 8) * 0x1000 };
        let b = if wide & 2 != 0 { u64::from_le_bytes(pad(&d[4..])) } else { u64::from(d[4] % 8) * 0x1000 };
        let mut c = if wide & 32 != 0 { u32::from(d[5]) } else { u32::from(d[5] % 3) };
        let len = usize::from(d[6]) * 64 + usize::from(d[7] % 64);
        d = &d[8..];
        let take = len.min(d.len());
        let mut payload = d[..take].to_vec();
        d = &d[take..];
        // For raw page frames, make the payload match the claimed length and
        // list the pages' hashes after it (flag 64: as a live frame, whose
        // pages may then be torn: flag 128 damages one after hashing).
        if kind == FrameKind::Pages as u8 && codec == 0 && wide & 4 != 0 && b <= 0x8000 {
            payload.resize(b as usize, 0xa5);
            let hashes: Vec<u64> = payload.chunks(4096).map(page_hash).collect();
            let list = hash_list(&hashes);
            if wide & 128 != 0 && !payload.is_empty() {
                payload[0] ^= 1;
            }
            let span = PageSpan { region: c, offset: a, len: b };
            out.extend_from_slice(&Pages::listed_header(span, &list, wide & 64 != 0).to_bytes());
            out.extend_from_slice(&payload);
            out.extend_from_slice(&list);
            continue;
        }
        if kind == FrameKind::RoundEnd as u8 && wide & 8 != 0 {
            payload.resize(8, 0);
        }
        // A state blob whose own length and CRC32C are right.
        if kind == FrameKind::State as u8 && wide & 16 != 0 {
            a = payload.len() as u64;
            c = crc32c::crc32c(&payload);
        }
        out.extend_from_slice(&encode_header(
            FrameKind::from_u8(kind).unwrap_or(FrameKind::Error),
            codec,
            a,
            b,
            c,
            &payload,
        ));
        out.extend_from_slice(&payload);
    }
    out
}

/// The highest frame kind this build knows.
fn last_kind() -> u8 {
    (1..=u8::MAX).take_while(|&k| FrameKind::from_u8(k).is_some()).last().unwrap_or(1)
}

/// Decodes a verified frame as its kind's type; the result does not matter,
/// only that decoding a hostile frame returns instead of panicking.
fn decode_typed(h: &Header, p: &[u8]) {
    let _ = match h.kind {
        FrameKind::Hello => h.decode::<Hello>(p).map(drop),
        FrameKind::Challenge => h.decode::<Challenge>(p).map(drop),
        FrameKind::Auth => h.decode::<Auth>(p).map(drop),
        FrameKind::Welcome => h.decode::<Welcome>(p).map(drop),
        FrameKind::RoundBegin => h.decode::<RoundBegin>(p).map(drop),
        FrameKind::Pages => h.decode::<Pages>(p).map(drop),
        FrameKind::Zero => h.decode::<Zero>(p).map(drop),
        FrameKind::RoundEnd => h.decode::<RoundEnd>(p).map(drop),
        FrameKind::Finish => h.decode::<Finish>(p).map(drop),
        FrameKind::Done => h.decode::<Done>(p).map(drop),
        FrameKind::Error => h.decode::<ErrorFrame>(p).map(drop),
        FrameKind::Index => h.decode::<Index>(p).map(drop),
        FrameKind::Trailer => h.decode::<Trailer>(p).map(drop),
        FrameKind::State => h.decode::<State>(p).map(drop),
        FrameKind::Commit => h.decode::<Commit>(p).map(drop),
        FrameKind::Ping => h.decode::<Ping>(p).map(drop),
        FrameKind::Pong => h.decode::<Pong>(p).map(drop),
        FrameKind::Resume => h.decode::<Resume>(p).map(|r| {
            let _ = r.covers(6);
        }),
        FrameKind::Region => h.decode::<Region>(p).map(|r| {
            let _ = r.add_to(&layout());
        }),
        FrameKind::Compacted => h.decode::<Compacted>(p).map(drop),
        FrameKind::Mapped => h.decode::<Mapped>(p).map(drop),
    };
}

fn pad(b: &[u8]) -> [u8; 8] {
    let mut x = [0u8; 8];
    let n = b.len().min(8);
    x[..n].copy_from_slice(&b[..n]);
    x
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 { rest.to_vec() } else { encode(rest) };
    // The bare decoder: never panics, offsets only grow.
    let mut r = FrameReader::new(&bytes[..]);
    let mut p = Vec::new();
    let mut last = 0;
    while let Ok(h) = r.read_frame(&mut p) {
        assert!(r.offset() > last);
        last = r.offset();
        decode_typed(&h, &p);
    }
    // The receiver state machine.
    let layout = layout();
    let mut sink = MemorySink::new(layout.clone()).expect("mapping");
    if let Ok(report) = receive_frames(&bytes, &layout, &mut sink) {
        let memory = sink.checksum().expect("owned memory reads back");
        assert_eq!(report.checksum, memory, "success with the wrong memory");
        assert_eq!(report.state_bytes.is_some(), sink.state().is_some());
    }
});
