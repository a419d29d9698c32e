//! Errors of a migration: which step failed, with the seam's own error as the cause.

use crate::control::BoxError;
use std::time::Duration;

/// Why a migration stopped iterating without switching over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// [`MigrationConfig::max_rounds`](crate::MigrationConfig::max_rounds) iterative rounds were
    /// sent without converging, under [`LimitPolicy::Abort`](crate::LimitPolicy::Abort).
    MaxRounds {
        /// Rounds sent.
        rounds: u64,
    },
    /// [`MigrationConfig::timeout`](crate::MigrationConfig::timeout) passed, under
    /// [`LimitPolicy::Abort`](crate::LimitPolicy::Abort).
    Timeout {
        /// The limit.
        limit: Duration,
    },
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbortReason::MaxRounds { rounds } => {
                write!(f, "not converged after {rounds} rounds")
            }
            AbortReason::Timeout { limit } => write!(f, "not converged within {limit:?}"),
        }
    }
}

/// A migration that did not complete. In every case the workload was resumed and the throttle
/// lifted before the error was returned (a failure to do so is reported in the log and in
/// [`Error::Workload`] only when it is the first failure).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Starting or reading the dirty log failed.
    #[error("dirty tracking failed during round {round}")]
    Tracking {
        /// The round being prepared.
        round: u64,
        /// The dirty log's error.
        #[source]
        source: BoxError,
    },
    /// Sending a round failed (the receiver went away, rejected a frame, ...).
    #[error("sending round {round} failed")]
    Send {
        /// The round.
        round: u64,
        /// The transport's error.
        #[source]
        source: BoxError,
    },
    /// Re-checking the memory the dirty log cannot vouch for failed (reading the paused source).
    #[error("re-checking memory the dirty log cannot vouch for failed")]
    Verify {
        /// The transport's error.
        #[source]
        source: BoxError,
    },
    /// The workload could not produce its state blob, or the blob could not be sent.
    #[error("saving or sending the workload state failed")]
    State {
        /// The workload's or transport's error.
        #[source]
        source: BoxError,
    },
    /// The receiver did not acknowledge the final checksum.
    #[error("the destination did not acknowledge the final round")]
    Finish {
        /// The transport's error.
        #[source]
        source: BoxError,
    },
    /// Pausing, resuming or throttling the workload failed.
    #[error("could not {action} the workload")]
    Workload {
        /// "pause", "resume" or "throttle".
        action: &'static str,
        /// The workload's error.
        #[source]
        source: BoxError,
    },
    /// The iteration hit a limit whose policy is to abort.
    #[error("migration aborted: {reason}")]
    Aborted {
        /// Which limit.
        reason: AbortReason,
    },
    /// A configuration value is out of range.
    #[error("invalid migration configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: &'static str,
    },
}
