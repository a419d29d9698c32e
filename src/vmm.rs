//! The calls a VMM makes: [`migrate`] (or [`Source`]) on the source, [`receive`] on the
//! destination.
//!
//! Both sides speak of memory through one [`Layout`] that the source states once (regions with
//! an id, a size, a page size, and optionally the guest-physical address, the backing and where
//! the source mapped it). The source's dirty log is derived from it and checked against what is
//! mapped; the wire carries it (without host addresses) and names pages by region and offset;
//! the destination maps each region itself and the pages land there. After the last memory round
//! the source's [`Workload::save_state`] blob (vCPU registers, device state) travels with its own
//! checksum, and the destination has it before it acknowledges: memory, then state, then
//! complete, as in Cloud Hypervisor's protocol.

use precopy_migrate::{
    CancelHandle, ExternalDirty, Migration, MigrationConfig, MigrationReport, Progress,
    TrackingError, TransferTransport, UffdDirtyLog, Workload,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_transfer::{
    Connection, Key, Layout, LayoutError, Listener, MemorySink, ProcessMemory, ReceiveReport,
    Receiver, ReceiverConfig, RegionMemory, Sender, SenderConfig, TransferError,
};

/// What can go wrong in [`migrate`], [`Source::migrate`] or [`receive`]: the one error type of
/// the seam. `E` is the embedder's own error, which the seam carries as a cause without
/// boxing it: the [`Workload::Error`] of the source's workload (a failed pause, resume or
/// state hook), the placement callback's on the destination. [`Source::track`], which runs no
/// embedder code, returns a [`TrackError`], and [`Layout::new`] a [`LayoutError`]; `?` turns
/// either into this type ([`Error::Track`], [`Error::Layout`]), so a VMM's migration function
/// can return `Result<_, precopy::Error<MyError>>` throughout.
///
/// Where each variant comes from:
///
/// | variant | raised by | cause (`source()`) |
/// |---|---|---|
/// | [`Layout`](Error::Layout) | [`Layout::new`] (a description that contradicts itself) | [`LayoutError`] |
/// | [`Track`](Error::Track) | [`Source::track`] (also inside [`migrate`]) | [`TrackError`]: the kernel, or a layout that misstates what is mapped |
/// | [`Transfer`](Error::Transfer) | connecting and the handshake (source), accepting, receiving and checking (destination) | [`TransferError`] |
/// | [`Migration`](Error::Migration) | the pre-copy rounds, switch-over and acknowledgement (source) | [`precopy_migrate::Error`]: which step failed (round, peer, step), with the dirty log's ([`TrackingError`]), the transport's ([`TransferError`]) or your workload's `E` below it |
/// | [`Placement`](Error::Placement) | the destination's placement callback | your `E` |
/// | [`NoState`](Error::NoState) | [`receive`], when the source sent no state blob | — |
///
/// [`Error::embedder`] finds your own `E` wherever it sits. On the source a failed migration
/// has always resumed the workload (or never paused it); on the destination nothing was
/// acknowledged, so the source did not hand over.
#[derive(Debug, thiserror::Error)]
pub enum Error<E> {
    /// The memory description contradicts itself (overlapping regions, a size that is not a
    /// multiple of the page size, ...).
    #[error("the memory layout is invalid")]
    Layout(#[from] LayoutError),
    /// Tracking the layout's memory could not start ([`Source::track`]).
    #[error("tracking the layout's memory failed")]
    Track(#[from] TrackError),
    /// Connecting, the handshake, receiving, or the destination's checks (a damaged page or
    /// state blob, a memory digest that differs) failed.
    #[error("the transfer failed")]
    Transfer(#[from] TransferError),
    /// The migration did not complete; the source's workload was resumed. (Boxed: it is the
    /// largest cause.)
    #[error("the migration did not complete")]
    Migration(#[source] Box<precopy_migrate::Error<TrackingError, TransferError, E>>),
    /// The destination's callback could not provide memory for the announced layout.
    #[error("the destination could not map memory for the announced layout")]
    Placement(#[source] E),
    /// The transfer completed without a state blob (the source is not a [`migrate`]).
    #[error("the source sent no state blob")]
    NoState,
}

impl<E> Error<E> {
    /// The embedder's own error, if that is what failed: the workload's (pause, resume,
    /// throttle, state hook) on the source, the placement callback's on the destination.
    pub fn embedder(&self) -> Option<&E> {
        match self {
            Error::Placement(e) => Some(e),
            Error::Migration(m) => match m.as_ref() {
                precopy_migrate::Error::Workload { source, .. } => Some(source),
                _ => None,
            },
            _ => None,
        }
    }
}

impl<E> From<precopy_migrate::Error<TrackingError, TransferError, E>> for Error<E> {
    fn from(e: precopy_migrate::Error<TrackingError, TransferError, E>) -> Error<E> {
        Error::Migration(Box::new(e))
    }
}

/// Why [`Source::track`] could not start tracking a layout's memory; `?` turns it into
/// [`Error::Track`].
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The engine's scanner refused this kernel (it lacks `PAGEMAP_SCAN` or WP_ASYNC, Linux 6.7+,
    /// or failed its self-test).
    #[error("the dirty-page scanner cannot run on this kernel")]
    Scanner(#[from] precopy_scanner::Error),
    /// The layout does not describe what is mapped (a region without a host address, or whose
    /// stated backing or page size differs from the mapping there), or registering it with the
    /// userfaultfd failed.
    #[error("the layout's memory cannot be tracked")]
    Tracking(#[from] TrackingError),
}

/// The source side of a migration, for a VMM that needs a handle before it starts (to give its
/// device models an [`ExternalDirty`], to cancel it from a management thread, to report its
/// progress); [`migrate`] is `Source::track` then [`Source::migrate`].
pub struct Source {
    layout: Layout,
    log: UffdDirtyLog,
    cancel: CancelHandle,
    progress: Option<ProgressFn>,
}

/// What [`Source::on_progress`] keeps.
type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("layout", &self.layout)
            .field("log", &self.log)
            .field("cancel", &self.cancel)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl Source {
    /// Registers every region of `layout` at its host address with a new userfaultfd in async
    /// write-protect mode (Linux 6.7+), checking each region's stated backing and page size
    /// against what is mapped there. Nothing is write-protected yet: that happens when the
    /// migration starts.
    pub fn track(layout: &Layout) -> Result<Source, TrackError> {
        let log = UffdDirtyLog::for_layout(layout, Scanner::new(ScanOptions::default())?)?;
        Ok(Source {
            layout: layout.clone(),
            log,
            cancel: CancelHandle::default(),
            progress: None,
        })
    }

    /// A handle that cancels the migration from another thread (a management API's
    /// `migrate_cancel`): whatever step runs is interrupted, the workload resumed, the
    /// destination never told its copy is complete, and [`Source::migrate`] fails with
    /// [`Error::Migration`] whose cause is [`precopy_migrate::Error::Cancelled`]. A cancel
    /// after the destination committed does nothing.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Calls `f` before each round with where the migration stands (round, bytes pending,
    /// throughput, dirty rate, expected downtime: what a management API's `query-migrate`
    /// reports), on the migrating thread: keep it short.
    pub fn on_progress(mut self, f: impl FnMut(&Progress) + Send + 'static) -> Source {
        self.progress = Some(Box::new(f));
        self
    }

    /// Where a device model reports writes no page table shows (DMA, a vhost-user backend's
    /// own mapping): mark each range after the write landed, in source host addresses.
    /// [`ExternalDirty::mark`] refuses a range outside the layout's memory (a guest-physical
    /// address passed by mistake) and every mark once the migration ended, at the call.
    ///
    /// A device that writes private anonymous guest RAM through pinned pages (vhost, VFIO,
    /// io_uring fixed buffers) must mark here: no page table shows those writes, and for
    /// anonymous memory nothing else re-checks them, so an unmarked DMA write is lost. (Memfd,
    /// hugetlb and file-backed regions are also re-read at switch-over; ARCHITECTURE.md,
    /// "Changes the write-protect bit cannot see".)
    pub fn external_dirty(&self) -> ExternalDirty {
        self.log.external_dirty()
    }

    /// Live-migrates the layout's memory over `conn` to a [`receive`]r holding the same `key`
    /// (the receiver challenges the sender with it): rounds while `workload` runs, then, paused,
    /// the last round and the workload's state blob, until the destination acknowledged. On
    /// success the workload is left paused or resumed as [`MigrationConfig::after`] says
    /// (paused by default: the destination takes over).
    ///
    /// What to know before relying on it:
    /// - **Downtime is a target.** [`MigrationConfig::max_downtime`] is the pause the driver
    ///   aims for when it decides to switch over, not a limit: with the defaults, a workload
    ///   that writes faster than the link is switched over anyway after
    ///   [`max_rounds`](MigrationConfig::max_rounds) (30) rounds, and the pause may then last
    ///   up to the final round's bound (`max(10 × max_downtime, 2 × expected, 5 s)`; the report
    ///   says so). Set [`max_rounds_policy`](MigrationConfig::max_rounds_policy) to
    ///   [`LimitPolicy::Abort`](precopy_migrate::LimitPolicy::Abort) to give up instead, or
    ///   [`final_round_timeout`](MigrationConfig::final_round_timeout) to bound the pause.
    /// - **State blob: at most 16 MiB** ([`MAX_STATE_LEN`](precopy_transfer::MAX_STATE_LEN)),
    ///   sent after the last memory round. A larger blob is found only once the workload is
    ///   paused and memory is sent: the migration fails ([`Error::Migration`], its step
    ///   "sending the workload state", cause [`TransferError::StateTooLarge`]) and the
    ///   workload resumes.
    /// - **On error the workload runs**: it was resumed, or never paused. A failed
    ///   [`Workload::pause`] is not followed by a resume: a pause that fails half-way must
    ///   resume what it stopped before it returns its error.
    /// - **One connection, the defaults of [`SenderConfig`]**: no compression, 10 s
    ///   handshake and I/O timeouts. No reconnect: the facade holds a
    ///   connection, not a way to dial again, so [`MigrationConfig::reconnect`] is not used.
    ///   Progress and cancel: [`Source::on_progress`], [`Source::cancel_handle`]. For more
    ///   (several streams, compression, reconnecting), build the migration from
    ///   [`precopy_migrate::Migration`] over [`precopy_migrate::UffdDirtyLog::for_layout`] and
    ///   a [`TransferTransport`] of a [`Sender::dial`].
    pub fn migrate<W: Workload>(
        self,
        conn: Connection,
        key: &Key,
        workload: W,
        config: MigrationConfig,
    ) -> Result<MigrationReport, Error<W::Error>> {
        let sender_config = SenderConfig {
            key: Some(key.clone()),
            ..SenderConfig::default()
        };
        let sender = Sender::connect(
            vec![conn],
            self.layout,
            ProcessMemory::current(),
            &sender_config,
        )?;
        let mut migration =
            Migration::new(self.log, TransferTransport::new(sender), workload, config)
                .with_cancel_handle(self.cancel);
        if let Some(f) = self.progress {
            migration = migration.on_progress(f);
        }
        Ok(migration.run()?)
    }
}

/// Live-migrates this process's memory described by `layout` over `conn` to a [`receive`]r
/// ([`Source::track`], then [`Source::migrate`]).
pub fn migrate<W: Workload>(
    layout: &Layout,
    conn: Connection,
    key: &Key,
    workload: W,
    config: MigrationConfig,
) -> Result<MigrationReport, Error<W::Error>> {
    Source::track(layout)?.migrate(conn, key, workload, config)
}

/// What [`receive`] delivered.
#[derive(Debug)]
pub struct Received {
    /// The layout the source announced (no host addresses).
    pub layout: Layout,
    /// The source's state blob, checked against its own checksum.
    pub state: Vec<u8>,
    /// Rounds, pages, bytes and the memory digest that was checked.
    pub report: ReceiveReport,
}

/// Accepts one migration on `listener` from a sender that proves it holds `key` (a shared
/// secret both ends got privately, e.g. [`Key::random`] handed over an inherited pipe or an
/// owner-only file: [`Key::write_new_file`]) and receives it into memory the destination maps
/// itself: `map` gets the announced layout and returns each region's memory by id (a
/// [`Mapping`](precopy_sys::mem::Mapping) of anonymous, memfd or hugetlb memory, an `Arc` of
/// one, or any [`RegionMemory`]); its previous contents do not matter. Returns once every page
/// is in place, the memory digest matched and the state blob arrived intact; only then is the
/// source told the migration completed. A damaged state blob fails the transfer
/// ([`Error::Transfer`]) and the source is never acknowledged.
///
/// Limits ([`ReceiverConfig`]'s defaults): a layout of at most 1 TiB, 10 s for the handshake
/// per connection, 60 s of silence while receiving. A connection that fails the handshake
/// (not a precopy sender, a wrong key, silent past the handshake timeout) is refused and
/// logged, and it keeps listening ([`Receiver::accept`]). It waits for a sender without a
/// deadline and cannot be cancelled yet: a destination started for a migration that never
/// comes stays blocked here.
///
/// [`Error::NoState`] means the sender sent no STATE frame: a source that is not a
/// [`migrate`] or [`Source::migrate`] (those always send one, empty when the workload saves
/// none).
///
/// For more control (several streams, timeouts, the largest layout accepted) use [`Receiver`]
/// with a [`ReceiverConfig`].
pub fn receive<E>(
    listener: &Listener,
    key: &Key,
    map: impl FnOnce(&Layout) -> Result<Vec<(u32, Box<dyn RegionMemory>)>, E>,
) -> Result<Received, Error<E>>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let config = ReceiverConfig {
        key: Some(key.clone()),
        ..ReceiverConfig::default()
    };
    let receiver = Receiver::accept(listener, &config)?;
    let layout = receiver.layout().clone();
    let memory = map(&layout).map_err(Error::Placement)?;
    let mut sink = MemorySink::with_memory(layout.clone(), memory)?;
    let report = receiver.run(&mut sink)?;
    let state = sink.take_state().ok_or(Error::NoState)?;
    Ok(Received {
        layout,
        state,
        report,
    })
}
