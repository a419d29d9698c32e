//! `precopy demo` end to end at small sizes: three real processes, verified byte for byte.

use std::process::Command;

fn engine_usable() -> bool {
    let out = Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(["probe", "--json"])
        .output()
        .expect("running precopy probe");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ok = v["engine_usable"] == true;
    if !ok {
        eprintln!("SKIP: this kernel cannot run the engine (see `precopy probe`)");
    }
    ok
}

fn demo(args: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(["demo", "--size", "32M", "--dirty-rate", "8M", "--json"])
        .args(args)
        .output()
        .expect("running precopy demo");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

#[test]
fn each_pattern_and_transport_verifies() {
    if !engine_usable() {
        return;
    }
    for (pattern, transport) in [
        ("uniform", "tcp"),
        ("hot-set", "unix"),
        ("sequential", "tcp"),
    ] {
        let (ok, v) = demo(&["--pattern", pattern, "--transport", transport]);
        assert!(ok, "{pattern}/{transport}: {v}");
        assert_eq!(v["verified"], true);
        assert_eq!(v["migration"]["status"], "completed");
    }
}

#[test]
fn destination_killed_mid_migration_fails_clearly() {
    if !engine_usable() {
        return;
    }
    let (ok, v) = demo(&["--kill-dest-at-round", "1", "--bandwidth", "16M"]);
    assert!(!ok, "must exit non-zero: {v}");
    assert_eq!(v["verified"], false);
    assert_eq!(v["migration"]["status"], "failed");
    assert!(v["migration"]["checksum"].is_null());
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|e| e.contains("migration failed")),
        "{v}"
    );
}
