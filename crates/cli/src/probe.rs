//! `precopy probe`.

use anyhow::Result;
use precopy_scanner::kernel;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let p = kernel::probe();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        let yes = |b: bool| if b { "yes" } else { "no" };
        println!("{:<28} {}", "kernel", p.kernel_release);
        println!("{:<28} {}", "page size", p.page_size);
        println!("{:<28} {}", "userfaultfd", yes(p.userfaultfd));
        println!("{:<28} {:#x}", "uffd features", p.uffd_features);
        println!("{:<28} {}", "  WP_ASYNC (6.7+)", yes(p.wp_async));
        println!(
            "{:<28} {}",
            "  WP_UNPOPULATED (6.4+)",
            yes(p.wp_unpopulated)
        );
        println!(
            "{:<28} {}",
            "  WP_HUGETLBFS_SHMEM",
            yes(p.wp_hugetlbfs_shmem)
        );
        println!("{:<28} {}", "PAGEMAP_SCAN (6.7+)", yes(p.pagemap_scan));
        for (name, ok) in &p.categories {
            println!("{:<28} {}", format!("  PAGE_IS_{name}"), yes(*ok));
        }
        println!("{:<28} {}", "PROCMAP_QUERY (6.11+)", yes(p.procmap_query));
        println!(
            "{:<28} {} ({})",
            "soft-dirty works",
            yes(p.soft_dirty),
            p.soft_dirty_detail
        );
        println!("{:<28} {}", "THP mode", p.thp_mode);
        match &p.hugetlb {
            Some(h) => println!(
                "{:<28} {} pages of {} KiB, {} free",
                "hugetlb pool",
                h.total,
                h.page_size / 1024,
                h.free
            ),
            None => println!("{:<28} unavailable", "hugetlb pool"),
        }
        println!("self-test:");
        for c in &p.self_test {
            println!(
                "  {:<24} {}  {}",
                c.name,
                if c.passed { "pass" } else { "FAIL" },
                c.detail
            );
        }
        match &p.reason {
            None => println!("engine: usable (uffd async write-protect + PAGEMAP_SCAN)"),
            Some(r) => println!("engine: NOT usable: {r}"),
        }
    }
    Ok(if p.engine_usable {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
