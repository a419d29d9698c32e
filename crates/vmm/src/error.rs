//! Errors of the VMM.

use std::io;

/// What went wrong in the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` cannot be opened (absent, or no permission).
    #[error("/dev/kvm is not usable (needs KVM and read/write access to /dev/kvm)")]
    NoKvm {
        /// The open's error.
        #[source]
        source: io::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Mapping guest RAM failed.
    #[error("mapping {len} bytes of guest RAM failed")]
    Ram {
        /// Bytes.
        len: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The guest program's parameters do not fit together.
    #[error("invalid guest program: {reason}")]
    Program {
        /// What is wrong.
        reason: &'static str,
    },
    /// The assembler refused the guest program (a bug in this crate).
    #[error("assembling the guest program failed: {reason}")]
    Assemble {
        /// The assembler's message.
        reason: String,
    },
    /// A vCPU left `KVM_RUN` for a reason the VMM does not handle.
    #[error("vCPU {cpu} stopped unexpectedly: {exit}")]
    UnexpectedExit {
        /// The vCPU.
        cpu: u32,
        /// The exit, as KVM reported it.
        exit: String,
    },
    /// The vCPU thread panicked (a bug).
    #[error("vCPU {cpu} thread panicked")]
    VcpuPanicked {
        /// The vCPU.
        cpu: u32,
    },
    /// The saved VM state does not match this VM.
    #[error("VM state does not fit this VM: {reason}")]
    State {
        /// What does not fit.
        reason: String,
    },
    /// The VM was used out of order.
    #[error("{operation} is not allowed {state}")]
    Misuse {
        /// What was attempted.
        operation: &'static str,
        /// The state that forbids it.
        state: &'static str,
    },
    /// KVM's dirty log saw a guest write that the userfaultfd rounds did not report.
    #[error(
        "round {round}: KVM's dirty log has {missed} page(s) that ours did not report (first at guest-physical {first_gpa:#x})"
    )]
    MissedByUffd {
        /// The round (1 = the first scan after arming).
        round: u64,
        /// Pages KVM saw and we did not.
        missed: u64,
        /// The lowest such page's guest-physical address.
        first_gpa: u64,
    },
    /// Tracking guest RAM failed.
    #[error("tracking guest RAM failed")]
    Tracker(#[source] precopy_tracker::Error),
    /// The dirty log the KVM cross-check wraps failed.
    #[error("the engine's dirty log failed")]
    DirtyLog(#[source] precopy_migrate::TrackingError),
    /// The scanner could not start.
    #[error("starting the scanner failed")]
    Scanner(#[source] precopy_scanner::Error),
    /// The transfer (connecting, receiving) failed.
    #[error("transfer failed")]
    Transfer(#[source] precopy_transfer::TransferError),
    /// The migration failed (its dirty log and workload are this VMM's, hence this type inside;
    /// boxed because it contains itself).
    #[error("migration failed")]
    Migration(#[source] Box<precopy_migrate::Error<Error, precopy_transfer::TransferError, Error>>),
    /// The channel to the other VMM process failed.
    #[error("{what} failed")]
    Channel {
        /// The operation.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The destination VMM process reported an error or broke the exchange.
    #[error("destination VMM: {message}")]
    Destination {
        /// What it said, or what went wrong with it.
        message: String,
    },
}

impl From<precopy_migrate::TrackingError> for Error {
    fn from(e: precopy_migrate::TrackingError) -> Error {
        Error::DirtyLog(e)
    }
}
