//! `precopy-vmm`: the VMM as a process of its own.
//!
//! * `precopy-vmm destination [--memfd]`: a migration's destination (see
//!   `precopy_vmm::destination_main`): prints the address it listens on, receives the VM
//!   (memory, then the vCPU state in the same stream), runs the guest to the end and prints a
//!   JSON report.
//! * `precopy-vmm run --ram 64MiB --vcpus 2 --working-set 8MiB --passes 20`: runs the guest
//!   without migration and prints its checksums as JSON (sizes as `bytesize` reads them: `MiB`
//!   and `GiB` are binary, `M` and `G` decimal).

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

use anyhow::Result;
use clap::{Parser, Subcommand};
use precopy_vmm::{GuestProgram, RamBacking, Vm, VmConfig};

#[derive(Parser)]
#[command(about = "A small KVM VMM that precopy live-migrates")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Receive a migrating VM and run it to the end.
    Destination {
        /// Back guest RAM with a memfd instead of anonymous memory.
        #[arg(long)]
        memfd: bool,
    },
    /// Run the guest without migration.
    Run {
        /// Guest RAM, whole 4 KiB pages (64MiB, 1GiB; `M`/`G` are decimal).
        #[arg(long, default_value = "64MiB")]
        ram: bytesize::ByteSize,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Bytes the vCPUs write per pass, together (8MiB; `M` is decimal).
        #[arg(long, default_value = "8MiB")]
        working_set: bytesize::ByteSize,
        /// Passes.
        #[arg(long, default_value_t = 10)]
        passes: u32,
        /// Back guest RAM with a memfd.
        #[arg(long)]
        memfd: bool,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("precopy-vmm: {}", precopy_sys::error_chain(e.as_ref()));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Cmd::Destination { memfd } => {
            precopy_vmm::destination_main(RamBacking::memfd_if(memfd), std::io::stdout().lock())?;
        }
        Cmd::Run {
            ram,
            vcpus,
            working_set,
            passes,
            memfd,
        } => {
            let program = GuestProgram::new(vcpus, ram.as_u64(), working_set.as_u64(), passes)?;
            let vm = Vm::new(VmConfig {
                program,
                backing: RamBacking::memfd_if(memfd),
                dirty_rate: None,
                kvm_dirty_log: false,
            })?;
            vm.load_program()?;
            let outcome = vm.start(None)?.wait()?;
            println!("{}", serde_json::to_string(&outcome)?);
        }
    }
    Ok(())
}
