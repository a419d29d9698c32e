//! Live migration of a real KVM guest between two VMM processes, the way a VMM embeds precopy.
//!
//! The source VMM (this process) maps guest RAM itself, registers it as a KVM memory slot and
//! runs vCPUs (`precopy_vmm::Vm`). To migrate it hands the library three things: the guest RAM
//! mapping to track (userfaultfd async write-protect + `PAGEMAP_SCAN` rounds), a connection to
//! the destination, and its vCPUs as the migration's workload (`precopy_vmm::VmControl`: pause,
//! resume, throttle, and the state hook `save_state`). After the last memory round, with the
//! vCPUs parked, the driver calls the state hook and sends the vCPU registers and device state
//! as one blob in the same stream (its own checksum). The destination VMM (this same program,
//! run with `--destination`) has guest RAM of its own at another host address, receives the
//! pages straight into it (`MemorySink::with_memory` over its guest RAM), checks the state
//! before it acknowledges, restores the vCPUs from it and runs the guest to the end.
//!
//! `cargo run --release --example kvm_migration` (needs read/write access to /dev/kvm)

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

use anyhow::Result;
use precopy_migrate::MigrationConfig;
use precopy_transfer::Connection;
use precopy_vmm::{
    DestinationProcess, GuestProgram, MigrateOptions, RamBacking, Vm, VmConfig, destination_main,
};
use std::time::Duration;

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--destination") {
        // The destination VMM: listens, receives memory and state, resumes, reports.
        destination_main(RamBacking::Anonymous, std::io::stdout().lock())?;
        return Ok(());
    }

    // The guest: 2 vCPUs, 256 MiB of RAM, writing 64 MiB per pass, paced to 32 MiB/s. Its
    // program is assembled by precopy-vmm; the same program run without migration ends with
    // `program.expected()`.
    let program = GuestProgram::new(2, 256 << 20, 64 << 20, 4)?;
    let expected = precopy_vmm::guest::combined_checksum(&program.expected());
    let vm = Vm::new(VmConfig {
        program,
        backing: RamBacking::Anonymous,
        dirty_rate: Some(32 << 20),
        // Also let KVM keep its own dirty log, to cross-check every round against it.
        kvm_dirty_log: true,
    })?;
    vm.load_program()?;
    let running = vm.start(None)?;
    std::thread::sleep(Duration::from_secs(2));

    // The destination VMM process, and a connection to it.
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--destination");
    let destination = DestinationProcess::spawn(cmd)?;
    let connection = Connection::connect_tcp(destination.address())?;

    // Migrate: rounds while the guest runs, then the vCPUs park for the final round and their
    // state goes after the last pages.
    let opts = MigrateOptions {
        // The destination requires the key it announced on its standard output.
        key: destination.key(),
        migration: MigrationConfig {
            max_downtime: Duration::from_millis(50),
            ..MigrationConfig::default()
        },
        ..MigrateOptions::default()
    };
    let report = precopy_vmm::migrate(&running, connection, &opts, |p| {
        eprintln!("round {}: {} KiB pending", p.round, p.pending_bytes >> 10)
    })?;
    println!("{}", report.migration);
    println!(
        "VM state (vCPU registers, device) sent through the state hook: {} bytes",
        report.migration.state_bytes.unwrap_or(0)
    );
    for c in &report.cross_check {
        println!(
            "round {}: KVM's dirty log {} pages, ours {} (every KVM page among ours)",
            c.round, c.kvm_pages, c.our_pages
        );
    }

    // The destination acknowledged memory and state: stop the source's vCPUs; the destination
    // runs the guest on.
    running.stop()?;
    let done = destination.finish()?;
    println!(
        "guest-visible pause {:.1} ms; final checksum {:#010x}, unmigrated program {:#010x}: {}",
        done.guest_pause.as_secs_f64() * 1e3,
        done.checksum,
        expected,
        if done.checksum == expected {
            "equal"
        } else {
            "DIFFERENT"
        }
    );
    anyhow::ensure!(
        done.checksum == expected,
        "the migrated guest computed something else"
    );
    Ok(())
}
