//! `precopy demo --vm`: live-migrate a KVM guest between two VMM processes.
//!
//! This process is the source VMM (`precopy-vmm`: guest RAM it maps itself, the guest program,
//! vCPU threads); it starts the destination VMM as `precopy __vm-dest`, a process with guest RAM
//! of its own at another host address. The guest runs once without migration for the reference
//! checksum, then again with a live migration in the middle: memory rounds, then the vCPU state
//! through the migration's state hook, on one connection. The destination receives the pages
//! straight into its guest RAM, resumes the guest from the state and runs it to the end; the two
//! checksums must be equal. Every round is checked against KVM's own dirty log.
//!
//! Every `--vm` flag is checked before anything starts (`FLAG VALUE: PROBLEM; FIX`), and the
//! flags of the process demo that mean nothing for a guest are refused with `--vm`. With
//! `--json`, stdout holds exactly one JSON object (`ok`, `error`, durations in milliseconds).

use super::{Args, CheckKind, policy};
use crate::args::{
    MAX_GUEST_RAM, MIN_GUEST_RAM, Size, check_fits_memory, check_guest_ram, check_max_downtime,
    check_max_rounds, cpus, human, invalid, kvm_host_json, parse_size,
};
use crate::output;
use crate::output::outln;
use anyhow::{Result, anyhow};
use precopy_migrate::{MigrationConfig, ThrottleConfig};
use precopy_transfer::FinalCheck;
use precopy_vmm::guest::{DATA_GPA, IDLE_TICK, MAX_VCPUS, PAGE};
use precopy_vmm::{GuestProgram, KvmHost, MigrateOptions, RamBacking, VmConfig, VmDemoOptions};
use serde_json::{Value, json};
use std::process::{Command, ExitCode};
use std::time::Duration;

/// The options only `--vm` uses.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Migrate a KVM guest (this process is its VMM) instead of a process; `--size` is its RAM
    /// (2M to 4G, whole 4 KiB pages) and `--dirty-rate` the rate its vCPUs write at (0: the
    /// guest idles, writing nothing, for --guest-seconds). The process-only flags (--threads, --pattern, --hot-set, --memory,
    /// --bandwidth, --to, --transport, --streams, --compress, --timeout, --on-timeout,
    /// --throttle, --pause, --listen, --dest-netns, --progress) are refused with it.
    #[arg(
        long,
        conflicts_with_all = [
            "threads", "pattern", "hot_set", "memory", "bandwidth", "to", "transport",
            "streams", "compress", "timeout", "on_timeout", "throttle", "pause", "listen",
            "dest_netns", "progress", "kill_dest_at_round",
        ]
    )]
    vm: bool,
    /// vCPUs of the guest, 1 to 64 [default: 2].
    #[arg(long, allow_hyphen_values = true)]
    vcpus: Option<i64>,
    /// Guest RAM the vCPUs write per pass, together: whole 4 KiB pages, the same number for
    /// every vCPU (a multiple of 4K x --vcpus), at most --size minus the first 1 MiB (default:
    /// a quarter of --size, rounded down to such a multiple).
    #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
    working_set: Option<Size>,
    /// Length of the guest's program, in seconds of writing at --dirty-rate, or of idling with
    /// --dirty-rate 0 (more than 0, at most 3600) [default: 10].
    #[arg(long, allow_hyphen_values = true)]
    guest_seconds: Option<f64>,
    /// Seconds the guest runs before the migration starts (0 up to less than --guest-seconds)
    /// [default: 1].
    #[arg(long, allow_hyphen_values = true)]
    warmup: Option<f64>,
    /// Back guest RAM with a memfd (shared mapping) at both ends instead of anonymous memory.
    #[arg(long)]
    memfd: bool,
    /// Do not cross-check the rounds against KVM's dirty log.
    #[arg(long)]
    no_kvm_check: bool,
    /// Pause the vCPUs around both dirty-log reads of every round: the cross-check is then
    /// strict per round (else a page may show in KVM's next round; see `precopy_vmm::kvm_log`).
    #[arg(long, conflicts_with = "no_kvm_check")]
    lockstep: bool,
}

impl VmArgs {
    /// Whether `--vm` was given.
    pub fn enabled(&self) -> bool {
        self.vm
    }

    /// Refuses a flag only `--vm` uses, given without it (the process demo would ignore it).
    pub fn check_unused(&self) -> Result<()> {
        let given: [(&'static str, Option<String>); 7] = [
            ("--vcpus", self.vcpus.map(|n| n.to_string())),
            (
                "--working-set",
                self.working_set.as_ref().map(Size::to_string),
            ),
            ("--guest-seconds", self.guest_seconds.map(|s| s.to_string())),
            ("--warmup", self.warmup.map(|s| s.to_string())),
            ("--memfd", self.memfd.then(String::new)),
            ("--no-kvm-check", self.no_kvm_check.then(String::new)),
            ("--lockstep", self.lockstep.then(String::new)),
        ];
        match given.into_iter().find(|(_, v)| v.is_some()) {
            Some((flag, Some(value))) if !self.vm => Err(invalid(
                flag,
                value,
                "applies only to a KVM guest's migration (demo --vm)",
                format!("add --vm, or drop {flag}"),
            )),
            _ => Ok(()),
        }
    }
}

/// The destination VMM process.
#[derive(Debug, clap::Args)]
pub struct VmDestArgs {
    /// Back guest RAM with a memfd.
    #[arg(long)]
    memfd: bool,
}

/// `precopy __vm-dest`. Its outcome, error included, is the JSON line it prints for the source
/// VMM, which reports it: nothing more on stderr, so a failure is told once. Only a failure to
/// talk to the source at all (listening, printing) goes to stderr.
pub fn run_dest(args: VmDestArgs) -> Result<ExitCode> {
    match precopy_vmm::destination_main(RamBacking::memfd_if(args.memfd), std::io::stdout().lock())
    {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e @ precopy_vmm::Error::Channel { .. }) => Err(e.into()),
        Err(_) => Err(anyhow::Error::new(output::Reported)),
    }
}

const MIB: f64 = (1u64 << 20) as f64;

/// What backs guest RAM, in words.
fn backing_name(b: RamBacking) -> &'static str {
    match b {
        RamBacking::Anonymous => "anonymous",
        RamBacking::Memfd => "memfd",
    }
}
/// `--vcpus`, `--guest-seconds` and `--warmup` when not given.
const DEFAULT_VCPUS: i64 = 2;
const DEFAULT_GUEST_SECONDS: f64 = 10.0;
const DEFAULT_WARMUP: f64 = 1.0;
/// Longest guest program and warm-up, seconds.
const MAX_SECONDS: f64 = 3600.0;
/// Most page writes a guest program makes in all: the demo computes the expected checksum in
/// Rust, one step per page write (about a second per 2^30 on this class of machine).
const MAX_WRITES: u64 = 1 << 32;

/// Memory one VMM of the demo holds for `ram` bytes of guest RAM, a bound: the RAM itself (all
/// of it at the destination, which writes every page it receives, and at a memfd source,
/// whose round 0 reads it whole), its page hashes (8 bytes per 4 KiB page), its page tables
/// and KVM's records of each page (as much again each: `ram / 128` holds all three), and the
/// process itself. Measured on 2026-11-30 (VmRSS): a 2 GiB guest's destination held 11.6 MiB
/// over its RAM besides 4.1 MiB of page tables, a 64 MiB guest's 7.6 MiB.
fn vmm_holds(ram: u64) -> u64 {
    ram + ram / 128 + VMM_OWN
}

/// What a VMM process holds whatever its guest's size (code, threads, buffers), with room.
const VMM_OWN: u64 = 16 << 20;

/// The largest guest RAM the demo suggests when `avail` bytes of memory are left: whole MiB,
/// at most 4 GiB, with both VMMs ([`vmm_holds`]) in seven eighths of `avail` (memory moves
/// while the machine runs, and a suggestion at the very edge may no longer fit when it is
/// tried); `None` when not even the smallest guest fits.
fn largest_guest_ram(avail: u64) -> Option<u64> {
    let per_vmm = (avail - avail / 8) / 2;
    // vmm_holds(ram) <= ram * 129 / 128 + VMM_OWN <= per_vmm.
    let ram = per_vmm.saturating_sub(VMM_OWN) / 129 * 128;
    let ram = ram.min(MAX_GUEST_RAM) / (1 << 20) * (1 << 20);
    (ram >= MIN_GUEST_RAM).then_some(ram)
}

/// The guest and migration the flags describe, once checked.
#[derive(Debug)]
struct VmPlan {
    program: GuestProgram,
    backing: RamBacking,
    dirty_rate: Option<u64>,
    warmup: Duration,
}

/// Checks every flag `--vm` uses against its limit before anything starts.
fn validate(args: &Args) -> Result<VmPlan> {
    let vm = &args.vm;
    let size = &args.size;
    let vcpus = vm.vcpus.unwrap_or(DEFAULT_VCPUS);
    if vcpus < 1 || vcpus > i64::from(MAX_VCPUS) {
        return Err(invalid(
            "--vcpus",
            vcpus,
            format!("a guest has 1 to {MAX_VCPUS} vCPUs (one parameter page holds them)"),
            format!(
                "use --vcpus {} (this host has {} CPUs)",
                cpus().clamp(1, u64::from(MAX_VCPUS)),
                cpus()
            ),
        ));
    }
    let vcpus = vcpus as u32;
    check_guest_ram("--size", size)?;
    check_fits_memory(
        "--size",
        size,
        vmm_holds(size.bytes).saturating_mul(2),
        Some(
            "the demo runs two VMMs (source and destination), each holding guest RAM, its page \
             hashes, page tables and KVM's records of it",
        ),
        |avail| match largest_guest_ram(avail) {
            Some(ram) => format!("use --size {}M or less", ram >> 20),
            None => format!(
                "free memory first (the smallest guest, --size 2M, needs {})",
                human(2 * vmm_holds(MIN_GUEST_RAM))
            ),
        },
    )?;
    let data = size.bytes - DATA_GPA;
    // The vCPUs write equal shares of whole pages.
    let share = u64::from(vcpus) * PAGE;
    let working_set = match &vm.working_set {
        None => (size.bytes / 4).clamp(share, data) / share * share,
        Some(w) => {
            if w.bytes < u64::from(vcpus) * PAGE {
                return Err(invalid(
                    "--working-set",
                    w,
                    format!(
                        "is less than one 4 KiB page for each of the {vcpus} vCPUs ({})",
                        human(u64::from(vcpus) * PAGE)
                    ),
                    format!("use at least --working-set {}K", u64::from(vcpus) * 4),
                ));
            }
            if w.bytes > data {
                return Err(invalid(
                    "--working-set",
                    w,
                    format!(
                        "is more than the {} of guest RAM above the first 1 MiB (code and parameters) of --size {size}",
                        human(data)
                    ),
                    format!(
                        "use --working-set {}K or less, or a larger --size",
                        data / share * share / 1024
                    ),
                ));
            }
            if w.bytes % share != 0 {
                let below = w.bytes / share * share;
                let above = below + share;
                let fix = if above <= data {
                    format!("use --working-set {}K or {}K", below / 1024, above / 1024)
                } else {
                    format!("use --working-set {}K", below / 1024)
                };
                return Err(invalid(
                    "--working-set",
                    w,
                    format!(
                        "is {} bytes, not a whole number of 4 KiB pages for each of the {vcpus} vCPUs (a multiple of {}): the guest would write less than asked",
                        w.bytes,
                        human(share)
                    ),
                    fix,
                ));
            }
            w.bytes
        }
    };
    let secs = vm.guest_seconds.unwrap_or(DEFAULT_GUEST_SECONDS);
    let warmup = vm.warmup.unwrap_or(DEFAULT_WARMUP);
    if !(secs.is_finite() && secs > 0.0 && secs <= MAX_SECONDS) {
        return Err(invalid(
            "--guest-seconds",
            secs,
            "the guest's program must last more than 0 and at most 3600 seconds",
            "use e.g. --guest-seconds 10",
        ));
    }
    if !(warmup.is_finite() && warmup >= 0.0 && warmup < secs) {
        return Err(invalid(
            "--warmup",
            warmup,
            format!(
                "must be at least 0 and less than --guest-seconds {secs}: the migration has to start while the guest still writes"
            ),
            format!("use e.g. --warmup {}", (secs / 4.0).min(1.0)),
        ));
    }
    let rate = args.dirty_rate.bytes;
    // Rate 0: an idle guest, no page writes.
    let writes = (rate as f64 * secs / PAGE as f64) as u64;
    if writes > MAX_WRITES {
        return Err(invalid(
            "--dirty-rate",
            &args.dirty_rate,
            format!(
                "over --guest-seconds {secs} the guest would write {writes} pages, more than the {MAX_WRITES} the demo checks its checksum against"
            ),
            "use a lower --dirty-rate or fewer --guest-seconds",
        ));
    }
    check_max_downtime(args.max_downtime)?;
    check_max_rounds(args.max_rounds)?;
    let program = if rate == 0 {
        // Idle for --guest-seconds: no pass, only idle ticks (at most 3600 s / 10 ms).
        let ticks = (secs / IDLE_TICK.as_secs_f64()).ceil() as u32;
        GuestProgram::new(vcpus, size.bytes, working_set, 0)?.with_idle_ticks(ticks)
    } else {
        let passes = ((rate as f64 * secs) / working_set as f64).ceil().max(1.0) as u32;
        GuestProgram::new(vcpus, size.bytes, working_set, passes)?
    };
    Ok(VmPlan {
        program,
        backing: RamBacking::memfd_if(vm.memfd),
        dirty_rate: (rate > 0).then_some(rate),
        warmup: Duration::from_secs_f64(warmup),
    })
}

/// `precopy demo --vm`.
pub fn run(args: &Args) -> Result<ExitCode> {
    let plan = validate(args)?;
    let vm = &args.vm;
    let host = KvmHost::detect();
    let opts = VmDemoOptions {
        config: VmConfig {
            program: plan.program.clone(),
            backing: plan.backing,
            dirty_rate: plan.dirty_rate,
            kvm_dirty_log: !vm.no_kvm_check,
        },
        destination_backing: plan.backing,
        warmup: plan.warmup,
        migrate: MigrateOptions {
            migration: MigrationConfig {
                max_downtime: Duration::from_millis(args.max_downtime),
                max_rounds: args.max_rounds,
                max_rounds_policy: policy(args.on_max_rounds),
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
    let program = &plan.program;
    let guest = json!({
        "vcpus": program.vcpus,
        "ram_bytes": program.ram_size,
        "backing": backing_name(plan.backing),
        "working_set_bytes": program.working_set(),
        "passes": program.passes,
        "idle_seconds": f64::from(program.idle_ticks) * IDLE_TICK.as_secs_f64(),
        "dirty_rate_bytes_per_s": plan.dirty_rate,
        // The run without migration that gives the reference checksum.
        "reference_run": "unpaced (as fast as the vCPUs go, no idle ticks)",
    });
    let kvm = kvm_host_json(&host);
    let json = args.json;
    if !json {
        let writes = match plan.dirty_rate {
            Some(r) => format!(
                "writes {} per pass x {} pass{}, paced to {:.0} MiB/s",
                human(program.working_set()),
                program.passes,
                if program.passes == 1 { "" } else { "es" },
                r as f64 / MIB
            ),
            None => format!(
                "idles for {:.1} s, writing nothing (--dirty-rate 0)",
                f64::from(program.idle_ticks) * IDLE_TICK.as_secs_f64()
            ),
        };
        crate::output::errln!(
            "guest: {} vCPU(s), {} of RAM ({}), {writes}",
            program.vcpus,
            human(program.ram_size),
            backing_name(plan.backing),
        );
        crate::output::errln!("note: {}", host.note());
        crate::output::errln!(
            "running it once without migration (the reference checksum; unpaced: as fast as the vCPUs go), then migrating it live ..."
        );
    }
    let mut dest = Command::new(std::env::current_exe()?);
    dest.arg("__vm-dest");
    if vm.memfd {
        dest.arg("--memfd");
    }
    let report = match precopy_vmm::demo(&opts, dest, move |p| {
        if !json {
            crate::output::errln!("  round {}: {} KiB pending", p.round, p.pending_bytes >> 10);
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            let e = anyhow::Error::new(e).context("migrating the guest failed");
            return Err(output::fail(json, json!({ "guest": guest, "kvm": kvm }), e));
        }
    };
    let error = if !report.checksums_match {
        Some(anyhow!(
            "the migrated guest ended with checksum {:#010x}, the unmigrated run with {:#010x} (the program computes {:#010x})",
            report.destination.checksum,
            report.unmigrated.checksum,
            report.expected
        ))
    } else if report.source.finished_before_switch_over {
        Some(anyhow!(
            "the guest finished before the switch-over: nothing was migrated live (raise --guest-seconds or lower --warmup)"
        ))
    } else {
        None
    };
    let mut value = serde_json::to_value(&report)?;
    if let Value::Object(m) = &mut value {
        m.insert("guest".into(), guest);
        m.insert("kvm".into(), kvm);
    }
    if json {
        return match error {
            Some(e) => Err(output::fail(true, value, e)),
            None => {
                output::print_json(value, None);
                Ok(ExitCode::SUCCESS)
            }
        };
    }
    print_report(&report, &host);
    match error {
        Some(e) => Err(output::fail(false, Value::Null, e)),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn print_report(r: &precopy_vmm::VmDemoReport, host: &KvmHost) {
    let m = &r.source.migration;
    outln!("{m}");
    if !r.source.cross_check.is_empty() {
        // One row per dirty-log scan: each round after round 0 takes one scan, a round with a
        // pause probe one more with the guest paused (a rehearsal of the final scan, its pages
        // in that round), and the final round one more with the guest paused, on top of the one
        // that decided the switch-over.
        let last_round = m.rounds.len().saturating_sub(1) as u64;
        // The last scan is the final one; a round's report may not name its probe scan (the
        // final round's does not), so rows past the labels known are probes.
        let mut labels = Vec::new();
        for (i, round) in m.rounds.iter().enumerate().skip(1) {
            labels.push(i.to_string());
            if round.probe_scan.is_some() {
                labels.push(format!("{i} probe"));
            }
        }
        let scans = r.source.cross_check.len();
        outln!(
            "KVM dirty log cross-check, one row per scan (KVM's pages must be among ours; a pause probe (probe) and the final round {last_round} (final) add a scan with the guest paused):"
        );
        outln!("   scan  for round  KVM pages  our pages  KVM-only this scan  ours-only");
        for (i, c) in r.source.cross_check.iter().enumerate() {
            let round = if i + 1 == scans {
                format!("{last_round} final")
            } else {
                labels
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| "probe".to_string())
            };
            outln!(
                "  {:>5}  {:>9}  {:>9}  {:>9}  {:>18}  {:>9}",
                c.round,
                round,
                c.kvm_pages,
                c.our_pages,
                c.kvm_only_this_round,
                c.ours_only
            );
        }
        outln!("  every page KVM saw was reported by our rounds");
    }
    outln!(
        "guest write rate during the migration: {:.1} MiB/s{}",
        r.source.guest_write_rate / MIB,
        if host.emulated() {
            " (emulated guest on kvm-pvm: see the note below)"
        } else {
            ""
        }
    );
    outln!(
        "downtime (pause to the receiver's ack): {:.1} ms; guest-visible pause (last vCPU exit at the source to first KVM_RUN at the destination): {:.1} ms",
        m.downtime.unwrap_or_default().as_secs_f64() * 1e3,
        r.destination.guest_pause.as_secs_f64() * 1e3
    );
    outln!(
        "VM state through the state hook: {} bytes sent, {} received; guest RAM at {:#x} (source), {:#x} (destination)",
        m.state_bytes.unwrap_or(0),
        r.destination.state_bytes,
        r.source_ram_addr,
        r.destination.ram_addr
    );
    outln!(
        "checksum: unmigrated {:#010x} (reference run, unpaced: the same program as fast as the vCPUs go), migrated {:#010x}, program {:#010x}: {}",
        r.unmigrated.checksum,
        r.destination.checksum,
        r.expected,
        if r.checksums_match {
            "MATCH"
        } else {
            "MISMATCH"
        }
    );
    outln!("note: {}", host.note());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A suggested guest RAM fits both VMMs in the memory it was suggested for and is one
    /// `--size` takes; below the smallest guest's need there is no suggestion.
    #[test]
    fn a_suggested_guest_ram_leaves_the_vmms_their_headroom() {
        for avail in [
            0,
            1 << 20,
            40 << 20,
            60 << 20,
            100 << 20,
            1 << 30,
            3 << 30,
            (8 << 30) + 12345,
            20 << 30,
            1 << 40,
        ] {
            match largest_guest_ram(avail) {
                Some(ram) => {
                    assert!(2 * vmm_holds(ram) <= avail, "{avail}: {ram}");
                    assert!(2 * vmm_holds(ram) <= avail - avail / 8, "{avail}: {ram}");
                    let size = parse_size(&format!("{}M", ram >> 20)).unwrap();
                    check_guest_ram("--size", &size).unwrap();
                }
                None => assert!(2 * vmm_holds(MIN_GUEST_RAM) > avail - avail / 8, "{avail}"),
            }
        }
        // A guest as large as the memory left is refused, not suggested: the VMMs need more.
        assert!(largest_guest_ram(2 << 30).is_some_and(|r| r < 1 << 30));
    }
}
