//! `precopy demo --vm`: live-migrate a KVM guest between two VMM processes.
//!
//! This process is the source VMM (`precopy-vmm`: guest RAM it maps itself, the guest program,
//! vCPU threads); it starts the destination VMM as `precopy __vm-dest`, a process with guest RAM
//! of its own at another host address. The guest runs once without migration for the reference
//! checksum, then again with a live migration in the middle; the destination runs it to the end
//! and the two checksums must be equal. Every round is checked against KVM's own dirty log.

use super::{Args, CheckKind};
use crate::args::{Size, parse_size};
use anyhow::{Result, bail};
use precopy_migrate::{LimitPolicy, MigrationConfig, ThrottleConfig};
use precopy_transfer::FinalCheck;
use precopy_vmm::{GuestProgram, MigrateOptions, RamBacking, VmConfig, VmDemoOptions};
use std::process::{Command, ExitCode};
use std::time::Duration;

/// The options only `--vm` uses.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Migrate a KVM guest (this process is its VMM) instead of a process; `--size` is its RAM.
    #[arg(long)]
    vm: bool,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2, requires = "vm")]
    vcpus: u32,
    /// Guest RAM the vCPUs write per pass, together (default: a quarter of `--size`).
    #[arg(long, value_parser = parse_size, requires = "vm")]
    working_set: Option<Size>,
    /// Length of the guest's program, in seconds of writing at `--dirty-rate`.
    #[arg(long, default_value_t = 10.0, requires = "vm")]
    guest_seconds: f64,
    /// Seconds the guest runs before the migration starts.
    #[arg(long, default_value_t = 1.0, requires = "vm")]
    warmup: f64,
    /// Back guest RAM with a memfd (shared mapping) at both ends instead of anonymous memory.
    #[arg(long, requires = "vm")]
    memfd: bool,
    /// Do not cross-check the rounds against KVM's dirty log.
    #[arg(long, requires = "vm")]
    no_kvm_check: bool,
    /// Pause the vCPUs around both dirty-log reads of every round: the cross-check is then
    /// strict per round (else a page may show in KVM's next round; see `precopy_vmm::kvm_log`).
    #[arg(long, requires = "vm")]
    lockstep: bool,
}

impl VmArgs {
    /// Whether `--vm` was given.
    pub fn enabled(&self) -> bool {
        self.vm
    }
}

/// The destination VMM process.
#[derive(Debug, clap::Args)]
pub struct VmDestArgs {
    /// Back guest RAM with a memfd.
    #[arg(long)]
    memfd: bool,
}

/// `precopy __vm-dest`.
pub fn run_dest(args: VmDestArgs) -> Result<ExitCode> {
    precopy_vmm::destination_main(
        RamBacking::memfd_if(args.memfd),
        std::io::stdin().lock(),
        std::io::stdout().lock(),
    )?;
    Ok(ExitCode::SUCCESS)
}

const MIB: f64 = (1u64 << 20) as f64;

/// `precopy demo --vm`.
pub fn run(args: &Args) -> Result<ExitCode> {
    let vm = &args.vm;
    let size = args.size.bytes;
    let rate = args.dirty_rate.bytes;
    let working_set = vm.working_set.as_ref().map_or(size / 4, |s| s.bytes);
    let passes = if rate == 0 {
        4
    } else {
        ((rate as f64 * vm.guest_seconds) / working_set.max(1) as f64).ceil() as u32
    }
    .max(1);
    let program = GuestProgram::new(vm.vcpus, size, working_set, passes)?;
    let opts = VmDemoOptions {
        config: VmConfig {
            program: program.clone(),
            backing: RamBacking::memfd_if(vm.memfd),
            dirty_rate: (rate > 0).then_some(rate),
            kvm_dirty_log: !vm.no_kvm_check,
        },
        destination_backing: RamBacking::memfd_if(vm.memfd),
        warmup: Duration::from_secs_f64(vm.warmup),
        migrate: MigrateOptions {
            migration: MigrationConfig {
                max_downtime: Duration::from_millis(args.max_downtime),
                max_rounds: args.max_rounds,
                max_rounds_policy: LimitPolicy::SwitchOver,
                throttle: ThrottleConfig {
                    enabled: !args.no_throttle,
                    ..ThrottleConfig::default()
                },
                ..MigrationConfig::default()
            },
            final_check: match args.final_check {
                CheckKind::Recorded => FinalCheck::Recorded,
                CheckKind::Full => FinalCheck::Full,
            },
            kvm_cross_check: !vm.no_kvm_check,
            lockstep: vm.lockstep,
            // The destination process makes the key and announces it (see precopy_vmm::demo).
            key: None,
        },
    };
    let mut dest = Command::new(std::env::current_exe()?);
    dest.arg("__vm-dest");
    if vm.memfd {
        dest.arg("--memfd");
    }
    let json = args.json;
    if !json {
        eprintln!(
            "guest: {} vCPU(s), {} MiB of RAM ({:?}), writes {} MiB per pass x {} passes{}",
            program.vcpus,
            program.ram_size >> 20,
            opts.config.backing,
            program.working_set() >> 20,
            program.passes,
            match opts.config.dirty_rate {
                Some(r) => format!(", paced to {:.0} MiB/s", r as f64 / MIB),
                None => ", unpaced".into(),
            }
        );
        eprintln!("running it once without migration, then migrating it live ...");
    }
    let report = precopy_vmm::demo(&opts, dest, move |p| {
        if !json {
            eprintln!("  round {}: {} KiB pending", p.round, p.pending_bytes >> 10);
        }
    })?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    if !report.checksums_match {
        bail!(
            "the migrated guest ended with checksum {:#010x}, the unmigrated run with {:#010x} (the program computes {:#010x})",
            report.destination.checksum,
            report.unmigrated.checksum,
            report.expected
        );
    }
    if report.source.finished_before_switch_over {
        bail!(
            "the guest finished before the switch-over: nothing was migrated live (raise --guest-seconds)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &precopy_vmm::VmDemoReport) {
    let m = &r.source.migration;
    println!("{m}");
    if !r.source.cross_check.is_empty() {
        println!("KVM dirty log cross-check (KVM's pages must be among ours):");
        println!("  round  KVM pages  our pages  KVM-only this round  ours-only");
        for c in &r.source.cross_check {
            println!(
                "  {:>5}  {:>9}  {:>9}  {:>19}  {:>9}",
                c.round, c.kvm_pages, c.our_pages, c.kvm_only_this_round, c.ours_only
            );
        }
        println!("  every page KVM saw was reported by our rounds");
    }
    println!(
        "guest write rate during the migration: {:.1} MiB/s",
        r.source.guest_write_rate / MIB
    );
    println!(
        "downtime (pause to the receiver's ack): {:.1} ms; guest-visible pause (last vCPU exit at the source to first KVM_RUN at the destination, incl. state hand-off): {:.1} ms",
        m.downtime.unwrap_or_default().as_secs_f64() * 1e3,
        r.destination.guest_pause_ns as f64 / 1e6
    );
    println!(
        "state blob: {} bytes; guest RAM at {:#x} (source), {:#x} (destination)",
        r.source.state_bytes, r.source_ram_addr, r.destination.ram_addr
    );
    println!(
        "checksum: unmigrated {:#010x}, migrated {:#010x}, program {:#010x}: {}",
        r.unmigrated.checksum,
        r.destination.checksum,
        r.expected,
        if r.checksums_match {
            "MATCH"
        } else {
            "MISMATCH"
        }
    );
}
