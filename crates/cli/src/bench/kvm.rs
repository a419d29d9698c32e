//! `precopy bench --kvm`: KVM's dirty log and the engine on the same guest RAM in the same run
//! (see `precopy_vmm::bench`).
//!
//! Its flags are checked before anything runs; with `--json`, stdout holds exactly one JSON
//! object (`ok`, `error`, `kvm_bench`: the rows, `kvm`: what KVM this host offers).

use super::{Args, MIB};
use crate::args::{check_fits_memory, check_guest_ram, invalid, kvm_host_json};
use crate::output;
use crate::output::out;
use anyhow::Result;
use precopy_vmm::KvmHost;
use precopy_vmm::bench::BenchRow;
use serde_json::json;
use std::process::ExitCode;

/// Most measured rounds per mechanism and fraction.
const MAX_ROUNDS: u64 = 1000;

/// The sizes, fractions and rounds the flags ask for, once checked.
fn validate(args: &Args) -> Result<(Vec<u64>, Vec<f64>, usize)> {
    for size in &args.sizes {
        check_guest_ram("--sizes", size)?;
        check_fits_memory("--sizes", size, size.bytes, None, |avail| {
            format!("use sizes up to {}M", avail / MIB)
        })?;
    }
    let rounds = args.rounds.unwrap_or(7);
    if rounds == 0 || rounds > MAX_ROUNDS {
        return Err(invalid(
            "--rounds",
            rounds,
            format!("must be 1 to {MAX_ROUNDS} measured rounds"),
            "use e.g. --rounds 7",
        ));
    }
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
    Ok((sizes, fractions, rounds as usize))
}

/// Runs the comparison and prints a table (stdout, or stderr with `--json`) and JSON.
pub fn run(args: &Args) -> Result<ExitCode> {
    let (sizes, fractions, rounds) = validate(args)?;
    let host = KvmHost::detect();
    let kvm = kvm_host_json(&host);
    let mut rows: Vec<BenchRow> = Vec::new();
    for &size in &sizes {
        crate::output::errln!(
            "precopy bench --kvm: {} MiB of guest RAM, 1 vCPU, {rounds} round{} per mechanism and fraction",
            size / MIB,
            if rounds == 1 { "" } else { "s" }
        );
        match precopy_vmm::bench::run(size, &fractions, rounds) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                let e = anyhow::Error::new(e).context("the KVM bench failed");
                let partial = json!({ "kvm_bench": rows, "kvm": kvm });
                return Err(output::fail(args.json, partial, e));
            }
        }
    }
    let mut table = String::from(
        "guest RAM  written  mechanism      round (µs)  pages/round  vCPU µs/page  first-write overhead µs\n",
    );
    // A first write can measure cheaper than a rewrite (the difference is the cost minus
    // run-to-run noise): such a value is shown as "< noise", not as a negative cost.
    let mut below_noise = false;
    for r in &rows {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let overhead = match r.first_write_overhead_us {
            Some(v) if v < 0.0 => {
                below_noise = true;
                "< noise".to_string()
            }
            v => opt(v),
        };
        table.push_str(&format!(
            "{:>7}M  {:>6.1}%  {:<13}  {:>10.1}  {:>11}  {:>12}  {:>23}\n",
            r.ram / MIB,
            r.fraction * 100.0,
            r.mechanism.name(),
            r.round_us,
            r.pages_reported,
            opt(r.write_us),
            overhead,
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
                        (Some(a), Some(b)) if a > 0.0 && b > 0.0 =>
                            format!("; first-write overhead uffd / KVM = {:.2}x", a / b),
                        _ => String::new(),
                    }
                ));
            }
        }
    }
    if below_noise {
        table.push_str(
            "< noise: the first write measured no slower than a rewrite (overhead below zero, \
             smaller than this machine's run-to-run noise); --json keeps the measured value\n",
        );
    }
    table.push_str(&format!("note: {}\n", host.note()));
    if args.json {
        crate::output::err_write(format_args!("{table}"), false);
        output::print_json(json!({ "kvm_bench": rows, "kvm": kvm }), None);
    } else {
        out!("{table}");
    }
    Ok(ExitCode::SUCCESS)
}
