//! A live migration of a running VM to a VMM in another process, through the engine:
//!
//! ```text
//!  source VMM process                              destination VMM process
//!  ─────────────────                               ───────────────────────
//!  guest runs; RAM armed (uffd async WP)           Vm::incoming: its own guest RAM (another
//!  rounds: PAGEMAP_SCAN (+ KVM log check) ──TCP──► host address), pages received into it
//!                                                  (MemorySink::with_memory over guest RAM)
//!  final round: vCPUs park, last pages ──────────► (same connection)
//!  state hook: VmControl::save_state ──STATE────► blob checked (own CRC32C, then against
//!    (vCPU registers, progress device)             this VM) before the acknowledgement
//!  memory checksum ──────────────────────────────► acknowledged; vCPUs restored, guest resumes
//! ```
//!
//! Memory and state travel on the migration's one connection: the driver calls the workload's
//! state hook ([`precopy_migrate::Workload::save_state`], here [`VmControl`]'s) with the vCPUs
//! paused after the last memory round, and the transport sends the blob in a STATE frame with
//! its own checksum before the final acknowledgement. The destination receives the pages
//! straight into its guest RAM ([`MemorySink::with_memory`] over the RAM's mapping) and refuses
//! a state it cannot resume from before it acknowledges, so a refused state fails the
//! migration while the source can still resume its guest.

use crate::error::Error;
use crate::kvm_log::{CrossCheckRound, KvmCheckedLog};
use crate::state::{VmState, monotonic_ns};
use crate::vm::{RamBacking, RunOutcome, RunningVm, Vm, VmControl};
use precopy_migrate::{
    AfterMigration, DirtyLog, Migration, MigrationConfig, MigrationReport, Progress,
    TransferTransport, UffdDirtyLog,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::kvm::GuestRam;
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{
    Connection, FinalCheck, Key, Layout, Listener, MemoryRegion, MemorySink, OwnMemory, PageBuf,
    Receiver, ReceiverConfig, RegionMemory, Sender, SenderConfig, Sink, TransferError,
};
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// How the source migrates.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The driver's settings (`after` is forced to [`AfterMigration::Stop`]: the destination
    /// takes over).
    pub migration: MigrationConfig,
    /// The final memory check.
    pub final_check: FinalCheck,
    /// Check every round against KVM's dirty log (the slot must log dirty pages).
    pub kvm_cross_check: bool,
    /// Pause the vCPUs around both reads of every round, for the strict per-round check.
    pub lockstep: bool,
    /// The key the destination requires (every TCP receiver does).
    pub key: Option<Key>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            migration: MigrationConfig::default(),
            final_check: FinalCheck::default(),
            kvm_cross_check: true,
            lockstep: false,
            key: None,
        }
    }
}

/// What the source saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceReport {
    /// The driver's report (rounds, downtime, bytes, `state_bytes`: the size of the state blob
    /// the state hook returned).
    pub migration: MigrationReport,
    /// Per round: KVM's pages against ours (empty without the cross-check).
    pub cross_check: Vec<CrossCheckRound>,
    /// Guest write rate while the migration ran, throttle included: pages the guest wrote per
    /// second (from its progress reports) × 4 KiB, in bytes/s. Every page the guest visits is
    /// written once per visit, so this is the rate it dirtied pages at.
    pub guest_write_rate: f64,
    /// Whether the guest had finished its program before the switch-over (then nothing was
    /// live about the migration).
    pub finished_before_switch_over: bool,
}

/// Guest RAM as the one region of a transfer: id 0, at its guest-physical address, with its
/// backing, mapped in this process at its host address (which never goes on the wire).
pub fn guest_ram_layout(ram: &GuestRam, backing: RamBacking) -> Result<Layout, Error> {
    let region = MemoryRegion::new(0, ram.ram().len(), crate::guest::PAGE)
        .host(ram.ram().addr())
        .guest(ram.gpa())
        .backed_by(match backing {
            RamBacking::Anonymous => precopy_transfer::Backing::Anonymous,
            RamBacking::Memfd => precopy_transfer::Backing::Memfd,
        });
    Layout::new(vec![region]).map_err(|e| Error::Transfer(e.into()))
}

/// The engine's dirty log over guest RAM: a userfaultfd tracker with the mapping registered
/// (armed by [`DirtyLog::start`]) and a `PAGEMAP_SCAN` scanner.
pub fn uffd_dirty_log(ram: &GuestRam) -> Result<UffdDirtyLog, Error> {
    let mut tracker = Tracker::new(Uffd::new().map_err(Error::Tracker)?);
    tracker
        .register(ram.ram().range())
        .map_err(Error::Tracker)?;
    Ok(UffdDirtyLog::new(
        tracker,
        Scanner::new(ScanOptions::default()).map_err(Error::Scanner)?,
    ))
}

/// Migrates `vm` over `connection`: arms tracking of its guest RAM, runs the pre-copy rounds
/// (checked against KVM's dirty log if asked), and with the vCPUs parked sends the last pages
/// and the VM state (the state hook, [`VmControl`]'s `save_state`) on the same connection. On
/// success the vCPUs stay parked and the destination owns the guest: [`RunningVm::stop`] them.
/// On failure the driver has resumed them (unless the destination had already acknowledged).
pub fn migrate(
    vm: &RunningVm,
    connection: Connection,
    opts: &MigrateOptions,
    on_progress: impl FnMut(&Progress) + Send + 'static,
) -> Result<SourceReport, Error> {
    let ram = vm.ram().clone();
    let uffd_log = uffd_dirty_log(&ram)?;
    let layout = guest_ram_layout(&ram, vm.backing())?;
    let sender = Sender::connect(
        vec![connection],
        layout,
        // Guest RAM is this process's own mapping: pages go to the socket without a copy.
        OwnMemory::new([ram.ram().clone()]),
        &SenderConfig {
            key: opts.key.clone(),
            ..SenderConfig::default()
        },
    )
    .map_err(Error::Transfer)?;
    let transport = TransferTransport::new(sender).final_check(opts.final_check);
    let control = vm.control();
    let config = MigrationConfig {
        after: AfterMigration::Stop,
        ..opts.migration
    };
    let (reports0, t0) = (control.progress_reports(), Instant::now());

    /// Runs the migration over `log`; its errors become this crate's.
    fn drive<D: DirtyLog>(
        log: D,
        transport: TransferTransport<OwnMemory, precopy_transfer::SocketSink>,
        control: VmControl,
        config: MigrationConfig,
        on_progress: impl FnMut(&Progress) + Send + 'static,
    ) -> (Result<MigrationReport, Error>, D)
    where
        D::Error: Into<Error>,
    {
        let mut m = Migration::new(log, transport, control, config).on_progress(on_progress);
        let r = m
            .run()
            .map_err(|e| Error::Migration(Box::new(e.map_log(Into::into))));
        (r, m.into_parts().0)
    }

    let (report, cross_check) = if opts.kvm_cross_check {
        let mut log = KvmCheckedLog::new(uffd_log, ram.clone())?;
        if opts.lockstep {
            log = log.lockstep(control.clone());
        }
        let (r, log) = drive(log, transport, control.clone(), config, on_progress);
        (r, log.rounds().to_vec())
    } else {
        let (r, _) = drive(uffd_log, transport, control.clone(), config, on_progress);
        (r, Vec::new())
    };
    let report = report?;
    let running = t0
        .elapsed()
        .saturating_sub(report.downtime.unwrap_or_default());
    let written = (control.progress_reports() - reports0)
        * u64::from(vm.program().chunk)
        * crate::guest::PAGE;
    let state = vm.state()?;
    Ok(SourceReport {
        migration: report,
        cross_check,
        guest_write_rate: written as f64 / running.as_secs_f64().max(1e-9),
        finished_before_switch_over: state.vcpus.iter().all(|v| v.device.done.is_some()),
    })
}

/// Serializes a [`Duration`] as milliseconds (a JSON number), and reads it back.
mod ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v / 1e3).map_err(serde::de::Error::custom)
    }
}

pub(crate) use ms::serialize as serialize_ms;

/// What the destination saw. Durations serialize as milliseconds (`*_ms`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DestinationReport {
    /// Each vCPU's final checksum.
    pub checksums: Vec<u32>,
    /// Their combined checksum.
    pub checksum: u32,
    /// Pages received with contents (a page sent twice counts twice).
    pub pages_received: u64,
    /// Bytes of the VM state received in the STATE frame.
    pub state_bytes: u64,
    /// Guest-visible pause: the longest time a vCPU did not run, from its last exit at the
    /// source to its first `KVM_RUN` here (`CLOCK_MONOTONIC`, same host). Zero when every vCPU
    /// had finished before the migration.
    #[serde(with = "ms", rename = "guest_pause_ms")]
    pub guest_pause: Duration,
    /// Time from the resume to the guest finishing.
    #[serde(with = "ms", rename = "run_after_resume_ms")]
    pub run_after_resume: Duration,
    /// Guest RAM's host address here (differs from the source's).
    pub ram_addr: u64,
}

/// The receiving sink: pages go straight into guest RAM through a [`MemorySink`] over the
/// RAM's mapping; the state blob is decoded and checked against this VM when it arrives, before
/// the receiver acknowledges, and a migration that brings none is refused at its end.
struct IncomingVm {
    memory: MemorySink,
    ram_len: u64,
    state: Option<VmState>,
}

impl IncomingVm {
    fn refuse(e: Error) -> TransferError {
        TransferError::Io {
            what: "checking the received VM state",
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }
    }
}

impl Sink for IncomingVm {
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        self.memory.begin_round(round)
    }
    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        hashes: &[u64],
    ) -> Result<(), TransferError> {
        self.memory.send_pages(offset, pages, hashes)
    }
    fn send_live_pages(
        &mut self,
        offset: u64,
        pages: precopy_transfer::LivePages,
        hashes: &[u64],
    ) -> Result<(), TransferError> {
        self.memory.send_live_pages(offset, pages, hashes)
    }
    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        self.memory.send_zero_range(range)
    }
    fn retain(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
        self.memory.retain(memory)
    }
    fn end_round(&mut self, round: u64) -> Result<u64, TransferError> {
        self.memory.end_round(round)
    }
    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        let vm = VmState::from_bytes(state).map_err(Self::refuse)?;
        vm.check_fits(self.ram_len).map_err(Self::refuse)?;
        self.memory.send_state(state)?;
        self.state = Some(vm);
        Ok(())
    }
    fn finish(&mut self, checksum: u64, check: FinalCheck) -> Result<(), TransferError> {
        if self.state.is_none() {
            return Err(Self::refuse(Error::State {
                reason: "the source sent no VM state (vCPU registers): nothing to resume".into(),
            }));
        }
        self.memory.finish(checksum, check)
    }
    fn lend_pages(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        self.memory.lend_pages(offset, len)
    }
    fn commit_lent(&mut self, offset: u64, hashes: &[u64]) -> Result<(), TransferError> {
        self.memory.commit_lent(offset, hashes)
    }
    fn revert_lent(&mut self, offset: u64, len: u64) {
        self.memory.revert_lent(offset, len)
    }
}

/// Receives a VM on `listener`: guest RAM of the announced size (backed as `backing`, at
/// guest-physical 0) receives the memory rounds, the STATE frame brings the vCPU registers and
/// device state; then the vCPUs are restored from it and the guest runs to its end here.
/// The receiver requires `key` when given (a TCP receiver must: any local user can connect to
/// a loopback port).
pub fn receive(
    listener: &Listener,
    key: Option<Key>,
    backing: RamBacking,
) -> Result<DestinationReport, Error> {
    let config = ReceiverConfig {
        key,
        ..ReceiverConfig::default()
    };
    let receiver = Receiver::accept(listener, &config).map_err(Error::Transfer)?;
    let layout = receiver.layout().clone();
    let region = match layout.regions() {
        [r] if r.guest_addr.unwrap_or(0) == 0 => *r,
        _ => {
            return Err(Error::State {
                reason: "the source's memory is not one guest RAM region at guest-physical 0"
                    .into(),
            });
        }
    };
    // The guest program's own limits (see `GuestProgram::validate`): refused before this VMM
    // maps anything for it.
    if region.size <= crate::guest::DATA_GPA || region.size > 1 << 32 {
        return Err(Error::State {
            reason: format!(
                "the source's guest RAM is {} bytes; this VMM runs guests of more than 1 MiB and at most 4 GiB",
                region.size
            ),
        });
    }
    let vm = Vm::incoming(region.size, backing, false)?;
    let ram_addr = vm.ram().ram().addr();
    let guest_ram: Box<dyn RegionMemory> = Box::new(vm.ram().ram().clone());
    let memory =
        MemorySink::with_memory(layout, vec![(region.id, guest_ram)]).map_err(Error::Transfer)?;
    let mut sink = IncomingVm {
        memory,
        ram_len: region.size,
        state: None,
    };
    let received = receiver.run(&mut sink).map_err(Error::Transfer)?;
    let state = sink.state.take().ok_or(Error::Misuse {
        operation: "resuming the guest",
        state: "without a received state",
    })?;
    let stopped: Vec<(u64, bool)> = state
        .vcpus
        .iter()
        .map(|v| (v.stopped_at_ns, v.device.done.is_some()))
        .collect();
    let resumed_at = monotonic_ns();
    let running = vm.start(Some(state))?;
    let outcome = running.wait()?;
    let guest_pause_ns = stopped
        .iter()
        .zip(&outcome.first_run_ns)
        .filter(|((_, done), _)| !done)
        .filter_map(|((stop, _), first)| first.map(|f| f.saturating_sub(*stop)))
        .max()
        .unwrap_or(0);
    Ok(DestinationReport {
        checksums: outcome.checksums,
        checksum: outcome.checksum,
        pages_received: received.pages,
        state_bytes: received.state_bytes.unwrap_or(0),
        guest_pause: Duration::from_nanos(guest_pause_ns),
        run_after_resume: Duration::from_nanos(monotonic_ns().saturating_sub(resumed_at)),
        ram_addr,
    })
}

/// The destination VMM process's main: listens on loopback, prints `{"listening": ADDR}` as
/// one line to `output`, receives the VM (memory and state, on the one connection), runs the
/// guest to the end and prints the [`DestinationReport`] (or `{"error": ...}`) as one JSON
/// line.
pub fn destination_main(backing: RamBacking, mut output: impl Write) -> Result<(), Error> {
    let chan = |what| move |source| Error::Channel { what, source };
    let listener = Listener::bind_tcp("127.0.0.1:0").map_err(chan("listening"))?;
    // Any local user can connect to a loopback port: the receiver requires a fresh key, which
    // goes to the source over this process's standard output, a pipe only the source holds.
    let key = Key::random();
    let line = serde_json::json!({
        "listening": listener.address(),
        "key": String::from_utf8_lossy(key.as_bytes()),
    });
    writeln!(output, "{line}").map_err(chan("announcing the address"))?;
    output.flush().map_err(chan("announcing the address"))?;
    let result = receive(&listener, Some(key), backing);
    let line = match &result {
        Ok(report) => serde_json::to_value(report).map_err(|e| Error::Channel {
            what: "encoding the report",
            source: e.into(),
        })?,
        Err(e) => serde_json::json!({ "error": precopy_sys::error_chain(e) }),
    };
    writeln!(output, "{line}").map_err(chan("reporting"))?;
    output.flush().map_err(chan("reporting"))?;
    result.map(|_| ())
}

/// A destination VMM process started by the source (`cmd` must run [`destination_main`] with
/// its standard output).
#[derive(Debug)]
pub struct DestinationProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    address: String,
    key: Option<Key>,
}

impl DestinationProcess {
    /// Starts `cmd` and reads the address it listens on.
    pub fn spawn(mut cmd: Command) -> Result<DestinationProcess, Error> {
        let chan = |what| move |source| Error::Channel { what, source };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(chan("starting the destination VMM"))?;
        let stdout = child.stdout.take().ok_or_else(|| Error::Destination {
            message: "no standard output".into(),
        })?;
        let mut p = DestinationProcess {
            child,
            stdout: BufReader::new(stdout),
            address: String::new(),
            key: None,
        };
        let line = p.read_line()?;
        p.address = line
            .get("listening")
            .and_then(|a| a.as_str())
            .ok_or_else(|| Error::Destination {
                message: format!("expected its address, got {line}"),
            })?
            .to_string();
        p.key = line
            .get("key")
            .and_then(|k| k.as_str())
            .map(|k| Key::from_bytes(k.as_bytes().to_vec()))
            .transpose()
            .map_err(Error::Transfer)?;
        Ok(p)
    }

    /// The address its receiver listens on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The key it requires, as it announced it.
    pub fn key(&self) -> Option<Key> {
        self.key.clone()
    }

    fn read_line(&mut self) -> Result<serde_json::Value, Error> {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|source| Error::Channel {
                what: "reading from the destination VMM",
                source,
            })?;
        if n == 0 {
            return Err(Error::Destination {
                message: "exited without a report".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| Error::Destination {
            message: format!("unreadable line {line:?}: {e}"),
        })
    }

    /// Waits for its report (after the guest finished there) and for it to exit.
    pub fn finish(mut self) -> Result<DestinationReport, Error> {
        let line = self.read_line();
        let _ = self.child.wait();
        let line = line?;
        if let Some(e) = line.get("error") {
            return Err(Error::Destination {
                message: e.as_str().unwrap_or_default().to_string(),
            });
        }
        serde_json::from_value(line).map_err(|e| Error::Destination {
            message: format!("unreadable report: {e}"),
        })
    }
}

impl Drop for DestinationProcess {
    fn drop(&mut self) {
        // A destination left behind by an error: never let it outlive the source.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A whole demonstration: the guest run once without migration, then again with a live
/// migration to a destination VMM process in the middle.
#[derive(Debug, Clone)]
pub struct VmDemoOptions {
    /// The VM (program, RAM backing, dirty rate, KVM dirty log).
    pub config: crate::vm::VmConfig,
    /// Guest RAM backing at the destination.
    pub destination_backing: RamBacking,
    /// How long the guest runs at the source before the migration starts.
    pub warmup: Duration,
    /// The migration.
    pub migrate: MigrateOptions,
}

/// What a demonstration found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmDemoReport {
    /// The checksum the program must end with, computed in Rust.
    pub expected: u32,
    /// The run without migration, unpaced: the same program as fast as the vCPUs run it, without
    /// its idle ticks (neither the pace nor the idle ticks change what the guest computes).
    pub unmigrated: RunOutcome,
    /// The source side of the migrated run.
    pub source: SourceReport,
    /// The destination side of the migrated run.
    pub destination: DestinationReport,
    /// Source guest RAM's host address.
    pub source_ram_addr: u64,
    /// Whether the migrated guest ended with the unmigrated run's checksum (and both with the
    /// expected one).
    pub checksums_match: bool,
}

/// Runs the guest without migration, then with a live migration to the process `destination`
/// starts (see [`DestinationProcess::spawn`]).
pub fn demo(
    opts: &VmDemoOptions,
    destination: Command,
    on_progress: impl FnMut(&Progress) + Send + 'static,
) -> Result<VmDemoReport, Error> {
    let expected = crate::guest::combined_checksum(&opts.config.program.expected());
    let unmigrated = {
        let config = crate::vm::VmConfig {
            program: opts.config.program.clone().with_idle_ticks(0),
            dirty_rate: None,
            kvm_dirty_log: false,
            ..opts.config.clone()
        };
        let vm = Vm::new(config)?;
        vm.load_program()?;
        vm.start(None)?.wait()?
    };
    let dest = DestinationProcess::spawn(destination)?;
    let vm = Vm::new(opts.config.clone())?;
    vm.load_program()?;
    let source_ram_addr = vm.ram().ram().addr();
    let running = vm.start(None)?;
    std::thread::sleep(opts.warmup);
    let migrated = Connection::connect_tcp(dest.address())
        .map_err(|source| Error::Channel {
            what: "connecting to the destination",
            source,
        })
        .and_then(|conn| {
            let opts = MigrateOptions {
                key: dest.key(),
                ..opts.migrate.clone()
            };
            migrate(&running, conn, &opts, on_progress)
        });
    // Migrated: the destination owns the guest. Failed: this demo ends here too.
    let stopped = running.stop();
    let source = migrated?;
    stopped?;
    let destination = dest.finish()?;
    let checksums_match =
        destination.checksum == unmigrated.checksum && unmigrated.checksum == expected;
    Ok(VmDemoReport {
        expected,
        unmigrated,
        source,
        destination,
        source_ram_addr,
        checksums_match,
    })
}
