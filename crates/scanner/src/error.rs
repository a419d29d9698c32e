use std::io;

/// Errors from scanning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Setting up or querying tracking failed.
    #[error(transparent)]
    Tracker(#[from] precopy_tracker::Error),
    /// A `PAGEMAP_SCAN` call failed.
    #[error("PAGEMAP_SCAN over {start:#x}..{end:#x} failed")]
    Scan {
        /// Where the call started.
        start: u64,
        /// Where it was to end.
        end: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel returned no pages and did not move `walk_end`; resuming would loop forever.
    #[error("PAGEMAP_SCAN made no progress at {addr:#x} (page budget below the huge page size?)")]
    NoProgress {
        /// The stuck address.
        addr: u64,
    },
    /// The kernel failed the engine's self-test: it cannot be trusted to report every write.
    #[error("this kernel failed the dirty-tracking self-test: {check}: {detail}")]
    Untrusted {
        /// The check that failed.
        check: &'static str,
        /// What was seen.
        detail: String,
    },
    /// A page size that is zero or not a power of two.
    #[error("page size {page_size} is not a power of two")]
    BadPageSize {
        /// The rejected size.
        page_size: u64,
    },
    /// A range whose end lies before its start.
    #[error("range {start:#x}..{end:#x} ends before it starts")]
    InvertedRange {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// A layout range that is empty or not aligned to the page size.
    #[error("layout range {start:#x}..{end:#x} is empty or not aligned to {page_size}-byte pages")]
    UnalignedRange {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// The page size it must be aligned to.
        page_size: u64,
    },
    /// Layout ranges that are out of order or overlap.
    #[error(
        "layout range {start:#x}..{end:#x} does not lie above the range before it, {prev_start:#x}..{prev_end:#x}"
    )]
    UnsortedRanges {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// Start of the range before it.
        prev_start: u64,
        /// End of the range before it.
        prev_end: u64,
    },
    /// A layout with more pages than memory for its bitmap.
    #[error("a layout of {pages} pages is too large for a pending-page bitmap")]
    LayoutTooLarge {
        /// Pages in the layout (saturated at `u64::MAX`).
        pages: u64,
    },
    /// Options out of range.
    #[error("invalid scan options: {0}")]
    InvalidOptions(&'static str),
    /// Setting up the self-test's memory failed.
    #[error("self-test setup failed: {what}")]
    SelfTestSetup {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}
