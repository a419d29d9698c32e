//! Fuzzes the checkpoint image reader: arbitrary file contents must open (or
//! fail) cleanly, and an image that opens as complete must verify, or fail
//! verification with an error — never panic, never read outside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precopy_transfer::Image;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("precopy-fuzz-image-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(img) = Image::open(&path) {
        let info = img.info();
        let verified = img.verify();
        if verified.is_ok() {
            assert!(info.complete, "an incomplete image verified");
        }
        // Spans are memory offsets: all of it (capped), and across the end.
        let end = info.total_len;
        let _ = img.read_span_to_vec(0..end.min(1 << 16));
        let _ = img.read_span_to_vec(end.saturating_sub(1)..end.saturating_add(1));
        let _ = img.state();
    }
    let _ = std::fs::remove_file(&path);
});
