//! `precopy probe`: what this kernel offers, and which dirty-tracking backend the engine would use.
//!
//! The kernel facts come from `precopy_scanner::kernel::probe`; the verdict on each backend and the
//! choice come from `precopy_backends` (each backend's self-test, then `choose_default`: the engine's
//! uffd async write-protect where it works, else soft-dirty where it provably works). The exit
//! status is 0 when a trustworthy default backend can run here, 1 otherwise; the reasons are
//! printed either way.

use crate::output;
use crate::output::outln;
use anyhow::Result;
use precopy_backends::{BackendKind, Error as BackendError};
use precopy_scanner::kernel::{self, Probe};
use serde::Serialize;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One backend's verdict on this kernel.
#[derive(Debug, Serialize)]
struct BackendVerdict {
    name: &'static str,
    mechanism: &'static str,
    /// Its prerequisites hold and its self-test passed.
    available: bool,
    /// The engine would use it ([`precopy_backends::choose_default`]).
    default: bool,
    /// Why it is unavailable.
    reason: Option<String>,
}

/// `probe --json`: the kernel facts (unchanged field names) plus the backend choice.
#[derive(Debug, Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    kernel: &'a Probe,
    /// The backend the engine would use here, or `null` when none is trustworthy.
    default_backend: Option<BackendKind>,
    /// True when that backend is a fallback (soft-dirty), not the engine's own uffd-async.
    default_backend_fallback: bool,
    /// One sentence: what was picked and why, or why nothing can be.
    default_backend_note: String,
    /// Why the backends preferred over the chosen one were refused (empty when uffd-async runs).
    default_backend_refused: Vec<String>,
    /// Whether dirty tracking can run here at all (the exit status is 0 exactly when it can).
    tracking_usable: bool,
    /// Every backend with its verdict, in report order.
    backends: Vec<BackendVerdict>,
}

/// What [`precopy_backends::choose_default`] decided, reduced to data.
struct Choice {
    kind: Option<BackendKind>,
    note: String,
    refused: Vec<String>,
}

fn choose() -> Choice {
    match precopy_backends::choose_default(&[]) {
        Ok(c) => Choice {
            kind: Some(c.kind),
            note: c.note,
            refused: c.refused.iter().map(ToString::to_string).collect(),
        },
        Err(BackendError::NoBackend { refused }) => Choice {
            kind: None,
            note: BackendError::NoBackend {
                refused: refused.clone(),
            }
            .to_string(),
            refused: refused.iter().map(ToString::to_string).collect(),
        },
        Err(e) => Choice {
            kind: None,
            note: format!(
                "no dirty-tracking backend can be opened: {}",
                precopy_sys::error_chain(&e)
            ),
            refused: Vec::new(),
        },
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let p = kernel::probe();
    let choice = choose();
    let backends: Vec<BackendVerdict> = precopy_backends::available()
        .into_iter()
        .map(|(kind, verdict)| BackendVerdict {
            name: kind.name(),
            mechanism: kind.mechanism(),
            available: verdict.is_ok(),
            default: choice.kind == Some(kind),
            reason: verdict.err().map(|u| u.reason),
        })
        .collect();
    let report = Report {
        kernel: &p,
        default_backend: choice.kind,
        default_backend_fallback: choice.kind.is_some_and(|k| k != BackendKind::UffdAsync),
        default_backend_note: choice.note,
        default_backend_refused: choice.refused,
        tracking_usable: choice.kind.is_some(),
        backends,
    };
    if !args.json {
        print_table(&report);
    }
    if !report.tracking_usable {
        let e = anyhow::anyhow!(
            "no dirty-tracking backend works on this kernel (see the table or the JSON fields)"
        );
        return Err(output::fail(args.json, serde_json::to_value(&report)?, e));
    }
    if args.json {
        output::print_json(serde_json::to_value(&report)?, None);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Report<'_>) {
    let p = r.kernel;
    let yes = |b: bool| if b { "yes" } else { "no" };
    outln!("{:<28} {}", "kernel", p.kernel_release);
    outln!("{:<28} {}", "page size", p.page_size);
    outln!("{:<28} {}", "userfaultfd", yes(p.userfaultfd));
    outln!("{:<28} {:#x}", "uffd features", p.uffd_features);
    outln!("{:<28} {}", "  WP_ASYNC (6.7+)", yes(p.wp_async));
    outln!(
        "{:<28} {}",
        "  WP_UNPOPULATED (6.4+)",
        yes(p.wp_unpopulated)
    );
    outln!(
        "{:<28} {}",
        "  WP_HUGETLBFS_SHMEM",
        yes(p.wp_hugetlbfs_shmem)
    );
    outln!("{:<28} {}", "PAGEMAP_SCAN (6.7+)", yes(p.pagemap_scan));
    for (name, ok) in &p.categories {
        outln!("{:<28} {}", format!("  PAGE_IS_{name}"), yes(*ok));
    }
    outln!("{:<28} {}", "PROCMAP_QUERY (6.11+)", yes(p.procmap_query));
    outln!(
        "{:<28} {} ({})",
        "soft-dirty works",
        yes(p.soft_dirty),
        p.soft_dirty_detail
    );
    outln!("{:<28} {}", "THP mode", p.thp_mode);
    match &p.hugetlb {
        Some(h) => outln!(
            "{:<28} {} pages of {} KiB, {} free",
            "hugetlb pool",
            h.total,
            h.page_size / 1024,
            h.free
        ),
        None => outln!("{:<28} unavailable", "hugetlb pool"),
    }
    outln!("self-test:");
    for c in &p.self_test {
        outln!(
            "  {:<24} {}  {}",
            c.name,
            if c.passed { "pass" } else { "FAIL" },
            c.detail
        );
    }
    outln!("backends:");
    for b in &r.backends {
        let verdict = match (&b.reason, b.default) {
            (Some(why), _) => format!("unavailable: {why}"),
            (None, true) => "available, DEFAULT".to_string(),
            (None, false) => "available".to_string(),
        };
        outln!("  {:<26} {verdict}", b.name);
    }
    match &p.reason {
        None => outln!("engine: usable (uffd async write-protect + PAGEMAP_SCAN)"),
        Some(r) => outln!("engine: NOT usable: {r}"),
    }
    match r.default_backend {
        Some(k) if r.default_backend_fallback => {
            outln!("tracking: FALLBACK to {k}: {}", r.default_backend_note)
        }
        Some(k) => outln!("tracking: {k} ({})", k.mechanism()),
        None => outln!("tracking: NOT possible: {}", r.default_backend_note),
    }
}
