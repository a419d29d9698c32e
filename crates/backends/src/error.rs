use crate::BackendKind;
use std::io;

/// Why a backend cannot be used on this kernel or in this process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} is unavailable: {reason}")]
pub struct Unavailable {
    /// The backend refused.
    pub kind: BackendKind,
    /// What its check saw.
    pub reason: String,
}

fn list(refused: &[Unavailable]) -> String {
    refused
        .iter()
        .map(|u| u.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Errors from the tracking backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend does not work here.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// No default backend works on this kernel.
    #[error("no dirty-tracking backend works on this kernel: {}", list(.refused))]
    NoBackend {
        /// Each backend tried, with why it was refused.
        refused: Vec<Unavailable>,
    },
    /// The engine's scanner failed.
    #[error(transparent)]
    Scanner(#[from] precopy_scanner::Error),
    /// The engine's tracker failed.
    #[error(transparent)]
    Tracker(#[from] precopy_tracker::Error),
    /// A system call failed.
    #[error("{backend}: {what} failed")]
    Io {
        /// The backend.
        backend: BackendKind,
        /// What it was doing.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A system call on a range failed.
    #[error("{backend}: {what} {start:#x}..{end:#x} failed")]
    Range {
        /// The backend.
        backend: BackendKind,
        /// What it was doing.
        what: &'static str,
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `collect` before `start`.
    #[error("{backend}: not started")]
    NotStarted {
        /// The backend.
        backend: BackendKind,
    },
    /// A range that is empty, inverted or (where pages are asked for) not page-aligned.
    #[error(
        "{backend}: range {start:#x}..{end:#x} is empty, ends before it starts or is not page-aligned"
    )]
    InvalidRange {
        /// The backend.
        backend: BackendKind,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// A range not inside any tracked range.
    #[error("{backend}: range {start:#x}..{end:#x} is not inside a tracked range")]
    OutsideTracked {
        /// The backend.
        backend: BackendKind,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// A request this backend cannot serve.
    #[error("{backend}: {what}")]
    Unsupported {
        /// The backend.
        backend: BackendKind,
        /// What is not supported.
        what: &'static str,
    },
}
