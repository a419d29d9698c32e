//! Whether this process's standard streams were open when it started.
//!
//! Rust's runtime, before `main`, opens `/dev/null` on any of descriptors 0-2 it finds closed
//! (so that a file opened later never lands on them), so from `main` on a closed stdout (`>&-`)
//! looks exactly like `>/dev/null`, and a report written there is lost without an error. A
//! constructor that the loader runs before the runtime's start (`.init_array`) looks first
//! and keeps what it saw.

use std::sync::atomic::{AtomicU8, Ordering};

/// Bit `fd` set: descriptor `fd` (0, 1 or 2) was closed when the process started.
static CLOSED_AT_START: AtomicU8 = AtomicU8::new(0);

/// Records which of descriptors 0-2 are closed; run by the loader before `main`.
extern "C" fn look_at_standard_streams() {
    let mut closed = 0u8;
    for fd in 0..3 {
        // SAFETY: F_GETFD only reads the descriptor's flags and touches no memory of ours; a
        // descriptor that is not open fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            closed |= 1 << fd;
        }
    }
    CLOSED_AT_START.store(closed, Ordering::Relaxed);
}

// SAFETY: an `.init_array` entry is a function pointer the loader calls once, before `main`,
// with no arguments it must use; `look_at_standard_streams` takes none, allocates nothing and
// only stores to an atomic, which is valid before Rust's runtime has started.
#[used]
#[unsafe(link_section = ".init_array")]
static LOOK_AT_START: extern "C" fn() = look_at_standard_streams;

/// Whether stdout (descriptor 1) was closed when this process started (`>&-`), though it is
/// `/dev/null` now.
pub fn stdout_closed_at_start() -> bool {
    CLOSED_AT_START.load(Ordering::Relaxed) & (1 << 1) != 0
}
