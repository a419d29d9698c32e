use std::io;
use std::path::PathBuf;

/// Errors from setting up tracking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Neither `userfaultfd(2)` nor `/dev/userfaultfd` gave an fd.
    #[error("cannot create a userfaultfd")]
    Create(#[source] io::Error),
    /// The running kernel does not offer a feature the engine needs.
    #[error("kernel lacks {feature} (needs {needs})")]
    KernelLacks {
        /// Feature name.
        feature: &'static str,
        /// What provides it.
        needs: &'static str,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed")]
    Api(#[source] io::Error),
    /// A `/proc/PID` file could not be opened.
    #[error("cannot open {path}")]
    OpenProc {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Listing the target's mappings failed.
    #[error("cannot list the mappings of the tracked process")]
    QueryMaps(#[source] io::Error),
    /// The range is empty or not aligned to the page size of its memory.
    #[error("range {start:#x}..{end:#x} is empty or not aligned to {align} bytes")]
    Unaligned {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// Required alignment.
        align: u64,
    },
    /// A range whose end lies before its start.
    #[error("range {start:#x}..{end:#x} ends before it starts")]
    InvertedRange {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// The range overlaps a range already tracked.
    #[error("range {start:#x}..{end:#x} overlaps tracked range {other_start:#x}..{other_end:#x}")]
    Overlap {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// Start of the tracked range it overlaps.
        other_start: u64,
        /// End of the tracked range it overlaps.
        other_end: u64,
    },
    /// Part of the range has no mapping.
    #[error(
        "range {start:#x}..{end:#x} is not fully mapped: nothing at {hole_start:#x}..{hole_end:#x}"
    )]
    NotMapped {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// First unmapped address.
        hole_start: u64,
        /// End of the unmapped part.
        hole_end: u64,
    },
    /// The range is already registered with another userfaultfd.
    #[error("range {start:#x}..{end:#x} is already registered with another userfaultfd")]
    Busy {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// The range is memory whose changes the write-protect bit cannot all see, and it was
    /// registered with `UnvouchedPolicy::Refuse`.
    #[error(
        "range {start:#x}..{end:#x} is {kind} memory{}: changes made outside this process's page tables (another mapping or process, write(2) to the backing file, hole punching, truncation, DMA) are invisible to write-protect tracking; register it with UnvouchedPolicy::Verify (re-checked at switch-over) or UnvouchedPolicy::AcceptRisk (you report such changes yourself)",
        if *external_writers { " written by devices" } else { "" }
    )]
    Unvouched {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// What backs it.
        kind: crate::MemoryKind,
        /// It was registered as written by devices.
        external_writers: bool,
    },
    /// The kernel refused to register the range.
    #[error("cannot register {start:#x}..{end:#x} for write-protect tracking")]
    Register {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The range is not (entirely) a tracked range.
    #[error("range {start:#x}..{end:#x} is not tracked")]
    NotTracked {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// The kernel refused to unregister the range.
    #[error("cannot unregister {start:#x}..{end:#x}")]
    Unregister {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Write-protecting the range failed.
    #[error("cannot write-protect {start:#x}..{end:#x}")]
    Arm {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An adopted userfaultfd was negotiated with a feature that would make the tracked process
    /// wait for a reader that does not exist.
    #[error(
        "the adopted userfaultfd has {feature}: {blocks} in the tracked process would block until someone reads its events, and nobody does; the owner must negotiate WP_ASYNC | WP_UNPOPULATED without event features, or hand over a fresh fd"
    )]
    BlockingFeature {
        /// The feature.
        feature: &'static str,
        /// What would block.
        blocks: &'static str,
    },
    /// An adopted userfaultfd was negotiated without a feature the engine needs.
    #[error("the adopted userfaultfd was negotiated without {feature}")]
    NegotiatedWithout {
        /// The feature.
        feature: &'static str,
    },
    /// The fd handed over is not a userfaultfd.
    #[error("the adopted fd is not a userfaultfd")]
    NotUffd,
    /// `/proc/self/fdinfo` of an adopted fd could not be read, so its negotiated features are
    /// unknown.
    #[error("cannot read the adopted userfaultfd's features from /proc/self/fdinfo")]
    Fdinfo(#[source] io::Error),
    /// Handing a userfaultfd over from another process failed.
    #[error("cannot obtain the userfaultfd from the tracked process")]
    Handoff(#[source] io::Error),
    /// A process id that names no process (zero or negative).
    #[error("{pid} is not a process id")]
    BadPid {
        /// The value given.
        pid: i32,
    },
    /// The operation is not possible for this target.
    #[error("{0}")]
    Unsupported(&'static str),
}
