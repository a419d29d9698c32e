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
