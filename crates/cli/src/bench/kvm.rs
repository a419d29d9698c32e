//! `precopy bench --kvm`: KVM's dirty log and the engine on the same guest RAM in the same run
//! (see `precopy_vmm::bench`).

use super::{Args, MIB};
use anyhow::Result;
use precopy_vmm::bench::BenchRow;
use std::process::ExitCode;

/// Runs the comparison and prints a table (stdout, or stderr with `--json`) and JSON.
pub fn run(args: &Args) -> Result<ExitCode> {
    let sizes = if args.sizes.is_empty() {
        vec![256 * MIB]
    } else {
        args.sizes.iter().map(|s| s.bytes).collect()
    };
    let fractions = if args.fractions.is_empty() {
        vec![0.0, 0.01, 1.0]
    } else {
        args.fractions.clone()
    };
    let rounds = args.rounds.map_or(7, |r| r as usize);
    let mut rows: Vec<BenchRow> = Vec::new();
    for &size in &sizes {
        eprintln!(
            "precopy bench --kvm: {} MiB of guest RAM, 1 vCPU, {rounds} rounds per mechanism and fraction",
            size / MIB
        );
        rows.extend(precopy_vmm::bench::run(size, &fractions, rounds)?);
    }
    let mut table = String::from(
        "guest RAM  written  mechanism      round (µs)  pages/round  vCPU µs/page  first-write overhead µs\n",
    );
    for r in &rows {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        table.push_str(&format!(
            "{:>7}M  {:>6.1}%  {:<13}  {:>10.1}  {:>11}  {:>12}  {:>23}\n",
            r.ram / MIB,
            r.fraction * 100.0,
            r.mechanism.name(),
            r.round_us,
            r.pages_reported,
            opt(r.write_us),
            opt(r.first_write_overhead_us),
        ));
    }
    for &size in &sizes {
        for &f in &fractions {
            let find = |m: &str| {
                rows.iter()
                    .find(|r| r.ram == size && r.fraction == f && r.mechanism.name() == m)
            };
            if let (Some(k), Some(u)) = (find("kvm-dirty-log"), find("uffd-async-wp")) {
                table.push_str(&format!(
                    "{:>7}M  {:>6.1}%: uffd round / KVM round = {:.2}x{}\n",
                    size / MIB,
                    f * 100.0,
                    u.round_us / k.round_us.max(1e-9),
                    match (u.first_write_overhead_us, k.first_write_overhead_us) {
                        (Some(a), Some(b)) if b > 0.0 =>
                            format!("; first-write overhead uffd / KVM = {:.2}x", a / b),
                        _ => String::new(),
                    }
                ));
            }
        }
    }
    table.push_str(
        "(nested KVM on this machine: every guest page fault and exit goes through the outer hypervisor too)\n",
    );
    if args.json {
        eprint!("{table}");
        println!("{}", serde_json::json!({ "kvm_bench": rows }));
    } else {
        print!("{table}");
    }
    Ok(ExitCode::SUCCESS)
}
