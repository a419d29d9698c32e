//! A part of tracked memory the sender cannot read is named for what it is: "not readable",
//! and why (no read permission, a guard region), not "not mapped".

mod common;

use common::*;
use precopy::sys::mem::{Advice, Protection};
use precopy::transfer::{
    Layout, MemorySink, ProcessMemory, SourceError, Transfer, TransferError, Unreadable,
};

#[test]
fn a_prot_none_page_in_a_tracked_range_is_reported_not_readable_with_the_reason() {
    let mem = anon(8);
    mem.fill(0, 8 * PAGE, 3).unwrap();
    let tracker = track(&mem);
    // The range stays tracked; one page of it loses read permission.
    mem.protect(5 * PAGE, PAGE, Protection::None).unwrap();
    assert_eq!(tracker.tracked_bytes(), 8 * PAGE);
    let base = mem.addr();
    let layout = Layout::single(PAGE, base, 8 * PAGE).unwrap();
    let sink = MemorySink::new(layout.clone()).unwrap();
    let mut tx = Transfer::new(ProcessMemory::current(), sink, layout, 64).unwrap();
    let err = tx.send_round(&[mem.range()]).unwrap_err();
    match &err {
        TransferError::Source(SourceError::NotReadable {
            addr,
            reason: Unreadable::NoReadPermission { start, end, perms },
            ..
        }) => {
            assert_eq!(*addr, base + 5 * PAGE);
            assert_eq!((*start, *end), (base + 5 * PAGE, base + 6 * PAGE));
            assert_eq!(perms, "---p");
        }
        other => panic!("expected NotReadable with NoReadPermission, got {other:?}"),
    }
    let chain = precopy::sys::error_chain(&err);
    assert!(
        chain.contains(&format!(
            "source address {:#x} is not readable",
            base + 5 * PAGE
        )) && chain.contains("mapped without read permission (PROT_NONE or a guard page"),
        "{chain}"
    );
}

#[test]
fn a_guard_region_in_a_tracked_range_is_reported_not_readable_with_the_reason() {
    let mem = anon(8);
    mem.fill(0, 8 * PAGE, 3).unwrap();
    let _tracker = track(&mem);
    if let Err(e) = mem.advise(2 * PAGE, PAGE, Advice::GuardInstall) {
        skip(
            "a_guard_region_in_a_tracked_range_is_reported_not_readable_with_the_reason",
            &format!("MADV_GUARD_INSTALL (Linux 6.15+) refused: {e}"),
        );
        return;
    }
    let base = mem.addr();
    let layout = Layout::single(PAGE, base, 8 * PAGE).unwrap();
    let sink = MemorySink::new(layout.clone()).unwrap();
    let mut tx = Transfer::new(ProcessMemory::current(), sink, layout, 64).unwrap();
    let err = tx.send_round(&[mem.range()]).unwrap_err();
    assert!(
        matches!(
            &err,
            TransferError::Source(SourceError::NotReadable {
                addr,
                reason: Unreadable::GuardRegion,
                ..
            }) if *addr == base + 2 * PAGE
        ),
        "{err:?}"
    );
}
