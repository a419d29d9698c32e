//! `precopy image info|cat|verify` on images the library writes, whole and cut short.

mod common;

use common::{one_json, precopy, scratch_dir, stderr, stdout};
use precopy_transfer::{FrameKind, ImageWriter, Layout, SliceSource, Transfer};
use std::path::Path;

const PS: u64 = 4096;
const BASE: u64 = 0x7f00_0000_0000;
const PAGES: u64 = 16;
/// Pages `SENT..PAGES` are zero in the source and never sent.
const SENT: u64 = 12;

/// Source memory: distinct non-zero bytes per page, page 5 all zeros, pages
/// from `SENT` on zeros (never sent, so the image reads them as zeros and the
/// memory checksum still matches).
fn source_memory() -> Vec<u8> {
    let mut mem = vec![0u8; (PAGES * PS) as usize];
    for (i, page) in mem.chunks_mut(PS as usize).enumerate().take(SENT as usize) {
        if i == 5 {
            continue;
        }
        for (j, b) in page.iter_mut().enumerate() {
            *b = (i * 31 + j * 7 % 251) as u8 | 1;
        }
    }
    mem
}

/// Writes a complete two-round image of `source_memory()` (page 1 rewritten
/// before round 1); returns the memory it holds.
fn write_image(path: &Path) -> Vec<u8> {
    let layout = Layout::single(PS, BASE, PAGES * PS).unwrap();
    let mut tx = Transfer::new(
        SliceSource::new(BASE, source_memory()),
        ImageWriter::create(path, layout.clone()).unwrap(),
        layout,
        4,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + SENT * PS]).unwrap();
    tx.source_mut().data_mut()[PS as usize..2 * PS as usize].fill(0xa5);
    tx.send_round(&[BASE + PS..BASE + 2 * PS]).unwrap();
    tx.finish(precopy_transfer::FinalCheck::Full).unwrap();
    let (source, _sink) = tx.into_parts();
    source.data().to_vec()
}

fn path_arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn info_cat_and_verify_a_complete_image() {
    let dir = scratch_dir("complete");
    let img = dir.join("img");
    let mem = write_image(&img);

    let out = precopy(&["image", "info", "--json", path_arg(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["complete"], true);
    assert!(info["incomplete_reason"].is_null());
    assert_eq!(info["page_size"], PS);
    assert_eq!(info["total_len"], PAGES * PS);
    assert_eq!(info["rounds"].as_array().unwrap().len(), 2);
    assert_eq!(info["data_pages"], SENT - 1);
    assert_eq!(info["zero_pages"], 1);
    assert_eq!(info["never_sent_pages"], PAGES - SENT);
    assert!(info["memory_checksum"].is_u64());

    let text = precopy(&["image", "info", path_arg(&img)]);
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(String::from_utf8_lossy(&text.stdout).contains("complete"));

    // A span that starts mid-page in round-1 data, crosses the zero page and
    // ends mid-page among pages never sent.
    let (start, end) = (PS + 100, (SENT + 2) * PS + 10);
    // Spans are memory offsets (regions back to back by id), not source addresses.
    let range = format!("{start:#x}-{end:#x}");
    let out = precopy(&["image", "cat", path_arg(&img), "--range", &range]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len() as u64, end - start);
    assert!(out.stdout == mem[start as usize..end as usize]);
    assert!(out.stdout[..100].iter().all(|&b| b == 0xa5));
    let never_sent = (SENT * PS - start) as usize;
    assert!(out.stdout[never_sent..].iter().all(|&b| b == 0));
    assert!(out.stdout[..never_sent].iter().any(|&b| b != 0));

    let out = precopy(&["image", "verify", path_arg(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = precopy(&["image", "verify", "--json", path_arg(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["complete"], true);
    assert_eq!(report["rounds"], 2);
    assert_eq!(report["memory_checksum"], info["memory_checksum"]);

    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cut_image_is_reported_incomplete_and_fails_verify() {
    let dir = scratch_dir("cut");
    let img = dir.join("img");
    write_image(&img);
    let bytes = std::fs::read(&img).unwrap();
    let cut = dir.join("cut");
    // Lose the trailer and index at the end, and part of the last record.
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();

    let out = precopy(&["image", "verify", path_arg(&cut)]);
    assert!(!out.status.success(), "a cut image verified");
    let err = stderr(&out);
    assert!(err.contains("incomplete"), "{err}");
    assert_eq!(
        err.matches("error:").count(),
        1,
        "error printed once: {err}"
    );
    assert!(out.stdout.is_empty());
    let out = precopy(&["image", "verify", "--json", path_arg(&cut)]);
    assert!(!out.status.success(), "a cut image verified (--json)");

    let out = precopy(&["image", "info", "--json", path_arg(&cut)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["complete"], false);
    assert!(
        info["incomplete_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{info}"
    );
    let text = precopy(&["image", "info", path_arg(&cut)]);
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(String::from_utf8_lossy(&text.stdout).contains("INCOMPLETE"));

    let _ = std::fs::remove_dir_all(&dir);
}

/// `image info` and `image verify` word one cut alike, wherever it falls: in a record's
/// header or in its payload, page data included. `info` said "page data" or "a record
/// header" where `verify` said "a frame payload" or "a frame header".
#[test]
fn info_and_verify_word_a_cut_alike() {
    let dir = scratch_dir("cut-alike");
    let img = dir.join("img");
    write_image(&img);
    let bytes = std::fs::read(&img).unwrap();
    let cut = dir.join("cut");
    let mut compared = 0;
    // Every 197th length: cuts in headers and payloads of every kind of record.
    for len in (1..bytes.len()).step_by(197).chain([8, 12, 15, 16, 20, 63]) {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let info = precopy(&["image", "info", "--json", path_arg(&cut)]);
        let verify = precopy(&["image", "verify", "--json", path_arg(&cut)]);
        assert!(!verify.status.success(), "cut at {len} verified");
        // Cut before the layout ended too: incomplete, holding no record (it was "corrupt").
        assert!(info.status.success(), "cut at {len}: {}", stderr(&info));
        let reason = one_json(&info)["incomplete_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let message = one_json(&verify)["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!reason.is_empty(), "cut at {len}: info says complete");
        assert!(
            message.ends_with(&format!("is incomplete: {reason}")),
            "cut at {len}: info says {reason:?}, verify says {message:?}"
        );
        assert!(!message.contains("frame"), "{message}");
        compared += 1;
    }
    assert!(compared > 10, "only {compared} cuts compared");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_and_missing_files_fail() {
    let dir = scratch_dir("bad");
    let img = dir.join("img");
    write_image(&img);
    // Reversed range: refused by argument parsing.
    let out = precopy(&["image", "cat", path_arg(&img), "--range", "0x2000-0x1000"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("START-END"), "{}", stderr(&out));
    // Outside the layout: bad input (status 2), one line naming the flag, the value as typed
    // and the span the image has; nothing written. The end alone past the layout counts too.
    let end = PAGES * PS;
    for past in [
        format!("{end:#x}-{:#x}", end + 0x1000),
        format!("0-{}", end + 1),
    ] {
        let out = precopy(&["image", "cat", path_arg(&img), "--range", &past]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{past}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        for want in [
            format!("--range {past}: "),
            "beyond the image's memory".into(),
            format!("within 0-{end:#x}"),
        ] {
            assert!(err.contains(&want), "{want:?} missing: {err}");
        }
        assert!(out.stdout.is_empty(), "{past}: bytes written");
    }
    // Not an image at all.
    let missing = dir.join("missing");
    for cmd in ["info", "verify"] {
        let out = precopy(&["image", cmd, path_arg(&missing)]);
        assert!(!out.status.success(), "{cmd} on a missing file succeeded");
    }
    // A FIFO is refused as bad input before it is opened (opening it would wait for a writer).
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for cmd in [
        vec!["info", path_arg(&fifo)],
        vec!["verify", path_arg(&fifo)],
        vec!["cat", path_arg(&fifo), "--range", "0-4096"],
    ] {
        let args: Vec<&str> = std::iter::once("image").chain(cmd).collect();
        let out = precopy(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("IMAGE {}: is a FIFO", fifo.display())),
            "{args:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// File offset of the round-1 copy of page 1 (4096 bytes of 0xa5).
fn rewritten_page_offset(bytes: &[u8]) -> usize {
    bytes
        .windows(PS as usize)
        .position(|w| w.iter().all(|&b| b == 0xa5))
        .expect("the round-1 page is in the image")
}

#[test]
fn info_counts_the_pages_of_an_image_cut_in_round_0() {
    let dir = scratch_dir("cut0");
    let img = dir.join("img");
    write_image(&img);
    let bytes = std::fs::read(&img).unwrap();
    // Cut inside page 4's data: round 0's first record (pages 0-3) is whole, the rest is gone.
    let src = source_memory();
    let page4 = bytes
        .windows(PS as usize)
        .position(|w| w == &src[(4 * PS) as usize..(5 * PS) as usize])
        .expect("page 4 is in the image");
    std::fs::write(&img, &bytes[..page4 + 100]).unwrap();

    let v = one_json(&precopy(&["image", "info", "--json", path_arg(&img)]));
    assert_eq!(v["complete"], false, "{v}");
    assert_eq!(v["rounds"].as_array().map(Vec::len), Some(0), "{v}");
    // Pages 0-3 were sent (round 0, cut short): not "never sent", not usable either.
    assert_eq!(v["unfinished_round"]["round"], 0, "{v}");
    assert_eq!(v["unfinished_round"]["pages"], 4, "{v}");
    assert_eq!(v["unfinished_only_pages"], 4, "{v}");
    assert_eq!(v["data_pages"], 0, "{v}");
    assert_eq!(v["zero_pages"], 0, "{v}");
    assert_eq!(v["never_sent_pages"], PAGES - 4, "{v}");

    let out = precopy(&["image", "info", path_arg(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("UNFINISHED"), "{text}");
    assert!(
        text.contains("4 only in the unfinished round; 12 in no record before the cut"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn page_range(page: u64) -> String {
    // Spans are memory offsets.
    format!("{:#x}-{:#x}", page * PS, (page + 1) * PS)
}

#[test]
fn flipped_byte_fails_cat_and_verify_but_not_structure() {
    let dir = scratch_dir("flip");
    let img = dir.join("img");
    let mem = write_image(&img);
    let mut bytes = std::fs::read(&img).unwrap();
    let at = rewritten_page_offset(&bytes) + 1000;
    bytes[at] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();

    // The damaged page: refused, the error names the damage and the address.
    let out = precopy(&["image", "cat", path_arg(&img), "--range", &page_range(1)]);
    assert_eq!(out.status.code(), Some(1), "a damaged page was emitted");
    let err = stderr(&out);
    assert!(err.contains("damaged"), "{err}");
    assert!(err.contains(&format!("memory offset {PS:#x}")), "{err}");
    assert!(err.contains("fails its hash"), "{err}");
    assert_eq!(
        err.matches("error:").count(),
        1,
        "error printed once: {err}"
    );
    assert!(
        !out.stdout.contains(&(0xa5 ^ 0x40)),
        "the flipped byte reached stdout"
    );
    // A span whose first page is intact: nothing at all goes out before the failure.
    let span = format!("0-{:#x}", 2 * PS);
    let out = precopy(&["image", "cat", path_arg(&img), "--range", &span]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "{} bytes written before the damaged page failed the command",
        out.stdout.len()
    );
    // A page in another, intact record still reads.
    let out = precopy(&["image", "cat", path_arg(&img), "--range", &page_range(7)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == mem[(7 * PS) as usize..(8 * PS) as usize]);

    // `info` reads no page data: complete, but not verified.
    let out = precopy(&["image", "info", "--json", path_arg(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = one_json(&out);
    assert_eq!(v["complete"], true);
    assert_eq!(v["verified"], false);
    assert_eq!(v["ok"], true);
    let out = precopy(&["image", "info", path_arg(&img)]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("verified:   no"), "{text}");
    // `info --verify` and `verify` read everything and fail, in one shape.
    for args in [
        &["image", "info", "--verify", "--json"][..],
        &["image", "verify", "--json"][..],
    ] {
        let mut args = args.to_vec();
        args.push(path_arg(&img));
        let out = precopy(&args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} passed a damaged image"
        );
        let v = one_json(&out);
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["verified"], false, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("fails its hash"), "{v}");
        assert!(
            v["error"]["chain"].as_array().is_some_and(|c| c.len() >= 2),
            "{v}"
        );
        assert_eq!(
            stderr(&out).matches("error:").count(),
            1,
            "{}",
            stderr(&out)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_image_is_refused_by_cat_unless_asked() {
    let dir = scratch_dir("trunc");
    let img = dir.join("img");
    let mem = write_image(&img);
    let bytes = std::fs::read(&img).unwrap();
    // Cut inside round 1's page: round 1 never ended.
    let cut = rewritten_page_offset(&bytes) + 100;
    std::fs::write(&img, &bytes[..cut]).unwrap();

    let out = precopy(&["image", "cat", path_arg(&img), "--range", &page_range(0)]);
    assert_eq!(out.status.code(), Some(1), "an incomplete image was read");
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("incomplete") && err.contains("--incomplete"),
        "{err}"
    );

    // Asked for: round 0 only, with a warning; page 1 is its round-0 copy.
    let range = format!("{:#x}-{:#x}", 0, 2 * PS);
    let out = precopy(&[
        "image",
        "cat",
        path_arg(&img),
        "--range",
        &range,
        "--incomplete",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
    let src = source_memory();
    assert!(out.stdout == src[..(2 * PS) as usize]);
    assert!(out.stdout[..PS as usize] == mem[..PS as usize]);

    let v = one_json(&precopy(&["image", "info", "--json", path_arg(&img)]));
    assert_eq!(v["complete"], false);
    assert_eq!(v["verified"], false);
    assert_eq!(v["rounds"].as_array().map(Vec::len), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_that_is_no_image_shows_its_first_bytes_plainly() {
    let dir = scratch_dir("not-image");
    let f = dir.join("notes.txt");
    std::fs::write(&f, "hello world, not an image\n").unwrap();
    for sub in ["info", "verify"] {
        let out = precopy(&["image", sub, path_arg(&f)]);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(err.contains("68 65 6c 6c 6f 20 77 6f"), "{err}");
        assert!(err.contains("\"hello wo\""), "{err}");
        assert!(!err.contains('['), "Debug bytes: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The records of an image file: (kind, header offset, length with header). A record is a
/// 32-byte header (kind at byte 0, payload length at bytes 4-7, little-endian) and its
/// payload, after the 16-byte preamble.
fn records(image: &[u8]) -> Vec<(FrameKind, usize, usize)> {
    let mut at = 16;
    let mut out = Vec::new();
    while at < image.len() {
        let kind = FrameKind::from_u8(image[at]).expect("a record this build wrote");
        let payload = u32::from_le_bytes(image[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push((kind, at, 32 + payload));
        at += 32 + payload;
    }
    out
}

/// A complete image of `source_memory()` with a MAPPED record between its two rounds (the
/// source unmapped its last page).
fn write_image_with_mapped(path: &Path) {
    let layout = Layout::single(PS, BASE, PAGES * PS).unwrap();
    let mut tx = Transfer::new(
        SliceSource::new(BASE, source_memory()),
        ImageWriter::create(path, layout.clone()).unwrap(),
        layout,
        4,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + SENT * PS]).unwrap();
    assert!(tx.retain_memory(&[BASE..BASE + (PAGES - 1) * PS]).unwrap());
    tx.send_round(&[BASE + PS..BASE + 2 * PS]).unwrap();
    tx.finish(precopy_transfer::FinalCheck::Full).unwrap();
}

/// Damage is corruption wherever it is, and `info` says so as `verify` does (status 1, the same
/// message): a flipped reserved byte of the preamble (bytes 12-15, zeros in every image; it
/// verified), a bad checksum in a MAPPED, ROUND_END, INDEX or TRAILER record (`info` called
/// those "INCOMPLETE" with status 0).
/// Checks that `image info` calls `path` corrupt in both forms (JSON: status 1, `"corrupt":
/// true`; text: status 1, one error line saying "is corrupt", a CORRUPT status, never
/// INCOMPLETE) and returns the JSON.
fn info_says_corrupt(path: &Path, what: &str) -> serde_json::Value {
    let info = precopy(&["image", "info", "--json", path_arg(path)]);
    assert_eq!(info.status.code(), Some(1), "{what}: {}", stderr(&info));
    let v = one_json(&info);
    assert_eq!(v["corrupt"], true, "{what}: {v}");
    let text = precopy(&["image", "info", path_arg(path)]);
    let err = stderr(&text);
    assert_eq!(text.status.code(), Some(1), "{what}: {err}");
    assert_eq!(err.matches("error:").count(), 1, "{what}: {err}");
    assert!(err.contains("is corrupt: "), "{what}: {err}");
    let out = stdout(&text);
    assert!(!out.contains("INCOMPLETE"), "{what}: {out}");
    assert!(out.contains("status:     CORRUPT ("), "{what}: {out}");
    v
}

#[test]
fn damage_is_corrupt_alike_in_info_and_verify() {
    let dir = scratch_dir("damage");
    let img = dir.join("img");
    write_image_with_mapped(&img);
    let bytes = std::fs::read(&img).unwrap();
    let out = precopy(&["image", "verify", path_arg(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let recs = records(&bytes);
    let mut cases = Vec::new();
    for at in 12..16 {
        let mut b = bytes.clone();
        b[at] ^= 0x01;
        cases.push((format!("preamble byte {at}"), b));
    }
    for kind in [
        FrameKind::Mapped,
        FrameKind::RoundEnd,
        FrameKind::Index,
        FrameKind::Trailer,
    ] {
        let &(_, at, len) = recs
            .iter()
            .find(|r| r.0 == kind)
            .unwrap_or_else(|| panic!("no {kind:?} record"));
        let mut b = bytes.clone();
        b[at + len - 1] ^= 0x40;
        cases.push((format!("{kind:?} record"), b));
    }
    // The first record (the layout) and the preamble's magic and version: damaged before any
    // region is known (`info` printed nothing on stdout for these).
    let &(_, hello_at, hello_len) = &recs[0];
    let mut b = bytes.clone();
    b[hello_at + hello_len - 1] ^= 0x40;
    cases.push(("HELLO record".to_owned(), b));
    for at in [0, 9] {
        let mut b = bytes.clone();
        b[at] ^= 0x01;
        cases.push((format!("preamble byte {at}"), b));
    }
    let damaged = dir.join("damaged");
    for (what, b) in cases {
        std::fs::write(&damaged, b).unwrap();
        let verify = precopy(&["image", "verify", "--json", path_arg(&damaged)]);
        assert_eq!(verify.status.code(), Some(1), "{what}: {}", stderr(&verify));
        let verify_says = one_json(&verify)["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            verify_says.contains("is corrupt: "),
            "{what}: {verify_says}"
        );
        let info = info_says_corrupt(&damaged, &what);
        let info_says = info["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            !info_says.is_empty() && verify_says.ends_with(&info_says),
            "{what}: info says {info_says:?}, verify says {verify_says:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file cut before its first record (the layout) ended is a cut image like any other:
/// incomplete, holding no record, not corrupt (it was "corrupt" up to 100 bytes or so, and
/// "incomplete" after); a damaged preamble is still corrupt.
#[test]
fn a_cut_before_the_first_record_is_incomplete_not_corrupt() {
    let dir = scratch_dir("cut-first");
    let img = dir.join("img");
    write_image(&img);
    let bytes = std::fs::read(&img).unwrap();
    let first_end = records(&bytes)[0].1 + records(&bytes)[0].2;
    let cut = dir.join("cut");
    for len in [4, 12, 15, 16, 40, 100, first_end - 1] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let verify = precopy(&["image", "verify", path_arg(&cut)]);
        let err = stderr(&verify);
        assert_eq!(verify.status.code(), Some(1), "cut at {len}: {err}");
        assert!(err.contains("is incomplete: "), "cut at {len}: {err}");
        assert!(err.contains("it holds no record"), "cut at {len}: {err}");
        let info = precopy(&["image", "info", "--json", path_arg(&cut)]);
        assert!(info.status.success(), "cut at {len}: {}", stderr(&info));
        let v = one_json(&info);
        assert_eq!(v["complete"], false, "cut at {len}: {v}");
        assert_eq!(v["corrupt"], false, "cut at {len}: {v}");
        assert_eq!(v["rounds_ended"], 0, "cut at {len}: {v}");
        assert!(
            err.contains(v["incomplete_reason"].as_str().unwrap_or("?")),
            "cut at {len}: {v} / {err}"
        );
        let text = precopy(&["image", "info", path_arg(&cut)]);
        assert!(text.status.success(), "cut at {len}: {}", stderr(&text));
        assert!(
            stdout(&text).contains("status:     INCOMPLETE ("),
            "{}",
            stdout(&text)
        );
    }
    // The same lengths with the version damaged: corrupt.
    for len in [12, 15, 100] {
        let mut b = bytes[..len].to_vec();
        b[9] ^= 0x01;
        std::fs::write(&cut, &b).unwrap();
        let verify = precopy(&["image", "verify", path_arg(&cut)]);
        let err = stderr(&verify);
        assert_eq!(verify.status.code(), Some(1), "cut at {len}: {err}");
        assert!(err.contains("is corrupt"), "cut at {len}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A damaged length field in a complete image: the record it heads runs past the end of a
/// file that ends with its valid TRAILER, which no cut leaves behind. Corrupt in every
/// command, never "incomplete" (it was: `info` said INCOMPLETE with status 0, `verify` "is
/// incomplete", `cat --incomplete` read zeros). The same record cut short with no trailer
/// after it is still a cut.
#[test]
fn a_damaged_length_in_a_complete_image_is_corrupt_not_incomplete() {
    let dir = scratch_dir("bad-len");
    let img = dir.join("img");
    write_image(&img);
    let bytes = std::fs::read(&img).unwrap();
    let recs = records(&bytes);
    let &(_, pages_at, _) = recs
        .iter()
        .find(|r| r.0 == FrameKind::Pages)
        .expect("a PAGES record");
    let damaged = dir.join("damaged");
    // Byte 6 of a header: the third byte of its payload length (bytes 4-7), so the record
    // claims megabytes (within the largest payload a record may have) past the file's end.
    for (what, at) in [
        ("first PAGES record", pages_at),
        ("HELLO record", recs[0].1),
    ] {
        let mut b = bytes.clone();
        b[at + 6] = 0x7f;
        std::fs::write(&damaged, &b).unwrap();
        let verify = precopy(&["image", "verify", path_arg(&damaged)]);
        let err = stderr(&verify);
        assert_eq!(verify.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains("is corrupt: "), "{what}: {err}");
        assert!(
            err.contains("runs past the end of the file"),
            "{what}: {err}"
        );
        let v = info_says_corrupt(&damaged, what);
        assert_eq!(v["complete"], false, "{what}: {v}");
        for extra in [&[][..], &["--incomplete"][..]] {
            let mut args = vec!["image", "cat", path_arg(&damaged), "--range", "0-0x1000"];
            args.extend_from_slice(extra);
            let cat = precopy(&args);
            let err = stderr(&cat);
            assert!(err.contains("is corrupt"), "{what} {extra:?}: {err}");
            assert!(!err.contains("incomplete ("), "{what} {extra:?}: {err}");
        }
    }
    // Without the trailer (the file cut right after the damaged record's header), nothing
    // tells a damaged length from a cut: incomplete, as any cut.
    let mut b = bytes[..pages_at + 32].to_vec();
    b[pages_at + 6] = 0x7f;
    std::fs::write(&damaged, &b).unwrap();
    let info = precopy(&["image", "info", "--json", path_arg(&damaged)]);
    assert!(info.status.success(), "{}", stderr(&info));
    assert_eq!(one_json(&info)["corrupt"], false);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `info --verify` of a complete image whose page fails its hash: the status and `"corrupt"`
/// say corrupt, as the failure does (it printed "status: complete" and `"corrupt": false`
/// beside the error "is corrupt").
#[test]
fn info_verify_says_corrupt_when_a_page_fails_its_hash() {
    let dir = scratch_dir("verify-status");
    let img = dir.join("img");
    write_image(&img);
    let mut bytes = std::fs::read(&img).unwrap();
    let at = rewritten_page_offset(&bytes) + 1000;
    bytes[at] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();
    let out = precopy(&["image", "info", "--verify", "--json", path_arg(&img)]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = one_json(&out);
    assert_eq!(v["corrupt"], true, "{v}");
    assert_eq!(v["complete"], true, "{v}");
    assert!(
        v["incomplete_reason"]
            .as_str()
            .is_some_and(|r| r.contains("fails its hash")),
        "{v}"
    );
    let out = precopy(&["image", "info", "--verify", path_arg(&img)]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("status:     CORRUPT ("), "{text}");
    assert!(!text.contains("status:     complete"), "{text}");
    assert!(stderr(&out).contains("is corrupt"), "{}", stderr(&out));
    // Without --verify the page data is not read: complete, not corrupt.
    let v = one_json(&precopy(&["image", "info", "--json", path_arg(&img)]));
    assert_eq!(v["corrupt"], false, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
