//! A live migration of a running VM to a VMM in another process, through the engine:
//!
//! ```text
//!  source VMM process                              destination VMM process
//!  ─────────────────                               ───────────────────────
//!  guest runs; RAM armed (uffd async WP)           Vm::incoming: its own guest RAM (another
//!  rounds: PAGEMAP_SCAN (+ KVM log check) ──TCP──► host address), pages written into it
//!  final round: vCPUs park, last pages ──────────► memory checksum acknowledged
//!  VmState (vCPU registers, device) ──state chan──► vCPUs restored, guest resumes, finishes
//! ```
//!
//! The state goes over its own channel after the memory rounds (here the destination process's
//! standard input). The seam for it in the library (a state hook after the last memory round)
//! will carry it on the migration's own connection.

use crate::error::Error;
use crate::kvm_log::{CrossCheckRound, KvmCheckedLog};
use crate::sink::GuestRamSink;
use crate::state::{VmState, monotonic_ns};
use crate::vm::{RamBacking, RunOutcome, RunningVm, Vm};
use precopy_migrate::{
    AfterMigration, DirtyLog, Migration, MigrationConfig, MigrationReport, Progress,
    TransferTransport, UffdDirtyLog,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::kvm::GuestRam;
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{
    Connection, FinalCheck, Key, Layout, Listener, OwnMemory, Receiver, ReceiverConfig, Sender,
    SenderConfig,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
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
    /// The driver's report (rounds, downtime, bytes).
    pub migration: MigrationReport,
    /// Per round: KVM's pages against ours (empty without the cross-check).
    pub cross_check: Vec<CrossCheckRound>,
    /// Size of the state blob.
    pub state_bytes: usize,
    /// Guest write rate while the migration ran (pages written per second × 4 KiB, from the
    /// progress reports), bytes/s.
    pub guest_write_rate: f64,
    /// Whether the guest had finished its program before the switch-over (then nothing was
    /// live about the migration).
    pub finished_before_switch_over: bool,
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
/// (checked against KVM's dirty log if asked) and, with the vCPUs parked, returns the state
/// blob for the destination. The vCPUs stay parked; [`RunningVm::stop`] them once the
/// destination has the state.
pub fn migrate(
    vm: &RunningVm,
    connection: Connection,
    opts: &MigrateOptions,
    on_progress: impl FnMut(&Progress) + Send + 'static,
) -> Result<(SourceReport, Vec<u8>), Error> {
    let ram = vm.ram().clone();
    let uffd_log = uffd_dirty_log(&ram)?;
    let layout = Layout::single(crate::guest::PAGE, ram.ram().addr(), ram.ram().len())
        .map_err(|e| Error::Transfer(e.into()))?;
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

    fn drive<D: DirtyLog>(
        log: D,
        transport: TransferTransport<OwnMemory, precopy_transfer::SocketSink>,
        control: crate::vm::VmControl,
        config: MigrationConfig,
        on_progress: impl FnMut(&Progress) + Send + 'static,
    ) -> (Result<MigrationReport, precopy_migrate::Error>, D) {
        let mut m = Migration::new(log, transport, control, config).on_progress(on_progress);
        let r = m.run();
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
    let report = report.map_err(Error::Migration)?;
    let running = t0
        .elapsed()
        .saturating_sub(report.downtime.unwrap_or_default());
    let written = (control.progress_reports() - reports0)
        * u64::from(vm.program().chunk)
        * crate::guest::PAGE;
    let state = vm.state()?;
    let blob = state.to_bytes();
    Ok((
        SourceReport {
            migration: report,
            cross_check,
            state_bytes: blob.len(),
            guest_write_rate: written as f64 / running.as_secs_f64().max(1e-9),
            finished_before_switch_over: state.vcpus.iter().all(|v| v.device.done.is_some()),
        },
        blob,
    ))
}

/// What the destination saw.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DestinationReport {
    /// Each vCPU's final checksum.
    pub checksums: Vec<u32>,
    /// Their combined checksum.
    pub checksum: u32,
    /// Pages received (a page sent twice counts twice).
    pub pages_received: u64,
    /// Guest-visible pause: the longest time a vCPU did not run, from its last exit at the
    /// source to its first `KVM_RUN` here (`CLOCK_MONOTONIC`, same host), in ns. 0 when every
    /// vCPU had finished before the migration.
    pub guest_pause_ns: u64,
    /// Time from the resume to the guest finishing, ns.
    pub run_after_resume_ns: u64,
    /// Guest RAM's host address here (differs from the source's).
    pub ram_addr: u64,
}

/// Receives a VM on `listener`: guest RAM of the announced size (backed as `backing`) filled
/// by the memory rounds, then the state blob from `read_state`; resumes the guest and waits for
/// it to finish.
pub fn receive(
    listener: &Listener,
    key: Option<Key>,
    backing: RamBacking,
    read_state: impl FnOnce() -> std::io::Result<Vec<u8>>,
) -> Result<DestinationReport, Error> {
    let config = ReceiverConfig {
        key,
        ..ReceiverConfig::default()
    };
    let receiver = Receiver::accept(listener, &config).map_err(Error::Transfer)?;
    let layout = receiver.layout().clone();
    let vm = Vm::incoming(layout.total_len(), backing, false)?;
    let ram_addr = vm.ram().ram().addr();
    let mut sink = GuestRamSink::new(vm.ram().clone(), layout).map_err(Error::Transfer)?;
    receiver.run(&mut sink).map_err(Error::Transfer)?;
    let blob = read_state().map_err(|source| Error::Channel {
        what: "reading the VM state",
        source,
    })?;
    let state = VmState::from_bytes(&blob)?;
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
        pages_received: sink.pages(),
        guest_pause_ns,
        run_after_resume_ns: monotonic_ns().saturating_sub(resumed_at),
        ram_addr,
    })
}

/// The destination VMM process's main: listens on loopback, prints `{"listening": ADDR}` as
/// one line to `output`, receives the VM, reads the state blob from `input` (a little-endian
/// `u64` length, then the bytes), runs the guest to the end and prints the
/// [`DestinationReport`] (or `{"error": ...}`) as one JSON line.
pub fn destination_main(
    backing: RamBacking,
    mut input: impl Read,
    mut output: impl Write,
) -> Result<(), Error> {
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
    let result = receive(&listener, Some(key), backing, || {
        let mut len = [0u8; 8];
        input.read_exact(&mut len)?;
        let mut blob = vec![0u8; u64::from_le_bytes(len).min(1 << 30) as usize];
        input.read_exact(&mut blob)?;
        Ok(blob)
    });
    let line = match &result {
        Ok(report) => serde_json::to_value(report).unwrap_or_default(),
        Err(e) => serde_json::json!({ "error": precopy_sys::error_chain(e) }),
    };
    writeln!(output, "{line}").map_err(chan("reporting"))?;
    output.flush().map_err(chan("reporting"))?;
    result.map(|_| ())
}

/// A destination VMM process started by the source (`cmd` must run [`destination_main`] on its
/// standard input and output).
#[derive(Debug)]
pub struct DestinationProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    address: String,
    key: Option<Key>,
}

impl DestinationProcess {
    /// Starts `cmd` and reads the address it listens on.
    pub fn spawn(mut cmd: Command) -> Result<DestinationProcess, Error> {
        let chan = |what| move |source| Error::Channel { what, source };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(chan("starting the destination VMM"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or_else(|| Error::Destination {
            message: "no standard output".into(),
        })?;
        let mut p = DestinationProcess {
            child,
            stdin,
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

    /// Sends the state blob.
    pub fn send_state(&mut self, blob: &[u8]) -> Result<(), Error> {
        let stdin = self.stdin.as_mut().ok_or(Error::Misuse {
            operation: "sending the state",
            state: "twice",
        })?;
        let chan = |source| Error::Channel {
            what: "sending the VM state",
            source,
        };
        stdin
            .write_all(&(blob.len() as u64).to_le_bytes())
            .map_err(chan)?;
        stdin.write_all(blob).map_err(chan)?;
        stdin.flush().map_err(chan)?;
        self.stdin = None;
        Ok(())
    }

    /// Waits for its report (after the guest finished there) and for it to exit.
    pub fn finish(mut self) -> Result<DestinationReport, Error> {
        self.stdin = None;
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
    /// The run without migration (unpaced: the pace does not change what the guest computes).
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
            dirty_rate: None,
            kvm_dirty_log: false,
            ..opts.config.clone()
        };
        let vm = Vm::new(config)?;
        vm.load_program()?;
        vm.start(None)?.wait()?
    };
    let mut dest = DestinationProcess::spawn(destination)?;
    let vm = Vm::new(opts.config.clone())?;
    vm.load_program()?;
    let source_ram_addr = vm.ram().ram().addr();
    let running = vm.start(None)?;
    std::thread::sleep(opts.warmup);
    let conn = Connection::connect_tcp(dest.address()).map_err(|source| Error::Channel {
        what: "connecting to the destination",
        source,
    })?;
    let migrate_opts = MigrateOptions {
        key: dest.key(),
        ..opts.migrate.clone()
    };
    let migrated = migrate(&running, conn, &migrate_opts, on_progress);
    let (source, blob) = match migrated {
        Ok(x) => x,
        Err(e) => {
            let _ = running.stop();
            return Err(e);
        }
    };
    dest.send_state(&blob)?;
    running.stop()?;
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
