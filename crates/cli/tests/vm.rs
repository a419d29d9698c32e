//! `precopy demo --vm` and `precopy bench --kvm` end to end (need /dev/kvm; loud SKIP without).

use std::process::Command;

fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("\n*** SKIP {test}: /dev/kvm is absent or not read/writable ***\n");
    }
    ok
}

#[test]
fn demo_vm_migrates_a_guest_and_matches_the_unmigrated_checksum() {
    if !kvm_usable("demo_vm_migrates_a_guest_and_matches_the_unmigrated_checksum") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args([
            "demo",
            "--vm",
            "--size",
            "32M",
            "--working-set",
            "4M",
            "--dirty-rate",
            "16M",
        ])
        .args([
            "--guest-seconds",
            "3",
            "--warmup",
            "0.3",
            "--vcpus",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo --vm failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["checksums_match"], true, "{report}");
    assert_eq!(
        report["destination"]["checksum"],
        report["unmigrated"]["checksum"]
    );
    assert_eq!(report["source"]["finished_before_switch_over"], false);
    let rounds = report["source"]["cross_check"].as_array().unwrap();
    assert!(!rounds.is_empty());
}

#[test]
fn bench_kvm_reports_both_mechanisms() {
    if !kvm_usable("bench_kvm_reports_both_mechanisms") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args([
            "bench",
            "--kvm",
            "--sizes",
            "8M",
            "--fractions",
            "1%,1",
            "--rounds",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench --kvm failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["kvm_bench"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "{v}");
    for r in rows
        .iter()
        .filter(|r| r["fraction"] == 1.0 && r["mechanism"] != "none")
    {
        // Every page the guest wrote (plus its parameter page) is reported by both.
        assert!(
            r["pages_reported"].as_u64().unwrap() >= r["pages_written"].as_u64().unwrap(),
            "{r}"
        );
    }
}
