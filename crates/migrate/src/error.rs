//! Errors of a migration: which step failed, with the seam's own typed error as the cause.

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
                let s = if *rounds == 1 { "" } else { "s" };
                write!(f, "not converged after {rounds} round{s}")
            }
            AbortReason::Timeout { limit } => write!(f, "not converged within {limit:?}"),
        }
    }
}

/// A blocking step of a migration, for errors that say where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Sending a round with the workload running (round 0 sends all memory).
    Round {
        /// The round.
        round: u64,
    },
    /// Re-establishing the connection after a round failed.
    Reconnect {
        /// The round that failed.
        round: u64,
    },
    /// Re-checking the memory the dirty log cannot vouch for (workload paused).
    Verify,
    /// Sending the final round (workload paused).
    FinalRound,
    /// Scanning the dirty log again after the final round was sent, to prove the workload
    /// stayed paused (and sending what that scan found).
    PauseCheck,
    /// Saving and sending the workload's state blob (workload paused).
    State,
    /// Waiting for the destination's acknowledgement of the final checksum (workload paused).
    Acknowledge,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Round { round } => write!(f, "sending round {round}"),
            Step::Reconnect { round } => write!(f, "reconnecting after round {round} failed"),
            Step::Verify => f.write_str("re-checking unvouched memory"),
            Step::FinalRound => f.write_str("sending the final round"),
            Step::PauseCheck => f.write_str("checking that the workload stayed paused"),
            Step::State => f.write_str("sending the workload state"),
            Step::Acknowledge => f.write_str("waiting for the final acknowledgement"),
        }
    }
}

/// A migration that did not complete. In every case the workload was resumed and the throttle
/// lifted before the error was returned (a failure to do so is reported in the log and in
/// [`Error::Workload`] only when it is the first failure).
///
/// The cause is the seam's own typed error: `L` the dirty log's
/// ([`DirtyLog::Error`](crate::DirtyLog::Error)), `T` the transport's
/// ([`Transport::Error`](crate::Transport::Error)), `W` the workload's
/// ([`Workload::Error`](crate::Workload::Error)); [`MigrationError`](crate::MigrationError)
/// names it for a migration's three seams.
#[derive(Debug, thiserror::Error)]
pub enum Error<L, T: std::error::Error + 'static, W> {
    /// Starting or reading the dirty log failed.
    #[error("dirty tracking failed during round {round}")]
    Tracking {
        /// The round being prepared.
        round: u64,
        /// The dirty log's error.
        #[source]
        source: L,
    },
    /// Sending a round failed (the receiver went away, rejected a frame, stalled past the I/O
    /// timeout, ...) and reconnecting, if allowed, did not help.
    #[error("sending round {round} to {peer} failed")]
    Send {
        /// The round.
        round: u64,
        /// The destination.
        peer: String,
        /// The transport's error.
        #[source]
        source: T,
    },
    /// A round failed because the connection broke, and every reconnect attempt
    /// ([`ReconnectConfig`](crate::ReconnectConfig)) failed too; the workload keeps running.
    #[error(
        "sending round {round} to {peer} failed and {attempts} reconnect attempt(s) did not get through (last: {})",
        precopy_sys::error_chain(last_attempt)
    )]
    Reconnect {
        /// The round that failed.
        round: u64,
        /// The destination.
        peer: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last_attempt: T,
        /// Why the round failed: the broken connection.
        #[source]
        source: T,
    },
    /// Re-checking the memory the dirty log cannot vouch for failed (reading the paused source).
    #[error("re-checking memory the dirty log cannot vouch for failed")]
    Verify {
        /// The transport's error.
        #[source]
        source: T,
    },
    /// The workload's state blob could not be sent.
    #[error("sending the workload state failed")]
    State {
        /// The transport's error.
        #[source]
        source: T,
    },
    /// The receiver did not acknowledge the final checksum.
    #[error("{peer} did not acknowledge the final round")]
    Finish {
        /// The destination.
        peer: String,
        /// The transport's error.
        #[source]
        source: T,
    },
    /// A deadline passed during `step`: the transport was interrupted. In the final round this
    /// is the hard bound ([`MigrationConfig::final_round_timeout`](crate::MigrationConfig)):
    /// the workload was resumed, the destination was never told to commit its copy, and the
    /// report carries the downtime actually suffered.
    #[error("{step} ({peer}) did not finish within {limit:?}")]
    Timeout {
        /// The step that ran out of time.
        step: Step,
        /// The destination.
        peer: String,
        /// The limit that passed.
        limit: Duration,
        /// What the interrupted transport reported.
        #[source]
        source: Option<T>,
    },
    /// [`CancelHandle::cancel`](crate::CancelHandle::cancel) was called.
    #[error("migration cancelled while {step}")]
    Cancelled {
        /// The step that was running.
        step: Step,
    },
    /// The workload wrote while it should have been paused: the check scans after the final
    /// round's send kept finding written pages (a process resumed by someone else, e.g. a
    /// `SIGCONT` from outside, or a `pause` that does not stop every writer). The workload
    /// was resumed and the destination never told to commit, as when the final round passes
    /// its bound.
    #[error(
        "the workload kept writing while paused: {pages} page(s) written after the final scan, found by {scans} check scan(s){}",
        if *before_commit { " (the last right before the commit)" } else { "" }
    )]
    NotPaused {
        /// Pages the check scans found written, all of them.
        pages: u64,
        /// Check scans run.
        scans: u32,
        /// Whether the scan that failed it ran after the acknowledgement, right before the
        /// commit (where nothing more can be sent).
        before_commit: bool,
    },
    /// Pausing, resuming, throttling the workload or saving its state failed.
    #[error("could not {action} the workload")]
    Workload {
        /// "pause", "resume", "throttle" or "save the state of".
        action: &'static str,
        /// The workload's error.
        #[source]
        source: W,
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

impl<L, T: std::error::Error + 'static, W> Error<L, T, W> {
    /// The same error with the dirty log's cause converted by `f` (for an embedder that
    /// drives several logs and reports one error type).
    pub fn map_log<L2>(self, f: impl FnOnce(L) -> L2) -> Error<L2, T, W> {
        match self {
            Error::Tracking { round, source } => Error::Tracking {
                round,
                source: f(source),
            },
            Error::Send {
                round,
                peer,
                source,
            } => Error::Send {
                round,
                peer,
                source,
            },
            Error::Reconnect {
                round,
                peer,
                attempts,
                last_attempt,
                source,
            } => Error::Reconnect {
                round,
                peer,
                attempts,
                last_attempt,
                source,
            },
            Error::Verify { source } => Error::Verify { source },
            Error::State { source } => Error::State { source },
            Error::Finish { peer, source } => Error::Finish { peer, source },
            Error::Timeout {
                step,
                peer,
                limit,
                source,
            } => Error::Timeout {
                step,
                peer,
                limit,
                source,
            },
            Error::Cancelled { step } => Error::Cancelled { step },
            Error::NotPaused {
                pages,
                scans,
                before_commit,
            } => Error::NotPaused {
                pages,
                scans,
                before_commit,
            },
            Error::Workload { action, source } => Error::Workload { action, source },
            Error::Aborted { reason } => Error::Aborted { reason },
            Error::Config { reason } => Error::Config { reason },
        }
    }
}
