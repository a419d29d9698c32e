//! The command line as a user meets it: every kind of bad input refused up front with one line
//! naming the flag, the value and the limit; one JSON object on stdout with `--json`, success or
//! failure, in every subcommand; progress that moves; `demo --to file:` then `image`.

mod common;

use common::target::engine_usable;
use common::{PRECOPY, one_json, precopy, scratch_dir, stderr, stdout};
use std::process::{Command, Output};

/// (arguments, flag, value as typed, words of the limit) for each kind of bad input.
const BAD: &[(&[&str], &str, &str, &str)] = &[
    // Beyond what the machine can run.
    (
        &["demo", "--threads", "1000"],
        "--threads",
        "1000",
        "at most",
    ),
    (
        &["demo", "--size", "100000G"],
        "--size",
        "100000G",
        "available",
    ),
    (
        &["demo", "--streams", "1000"],
        "--streams",
        "1000",
        "at most 64",
    ),
    (&["bench", "--threads", "1000"], "--threads", "1000", "1 to"),
    (
        &["bench", "--sizes", "100000G"],
        "--sizes",
        "100000G",
        "more than",
    ),
    // Zero where at least one is needed.
    (&["demo", "--threads", "0"], "--threads", "0", "at least 1"),
    (
        &["demo", "--max-rounds", "0"],
        "--max-rounds",
        "0",
        "at least 1",
    ),
    (&["demo", "--streams", "0"], "--streams", "0", "1 to 64"),
    (
        &["demo", "--max-downtime", "0"],
        "--max-downtime",
        "0",
        "at least 1",
    ),
    (&["bench", "--rounds", "0"], "--rounds", "0", "at least 1"),
    // Negative, malformed or misaligned values.
    (&["demo", "--size", "-1G"], "--size", "-1G", "negative"),
    (
        &["demo", "--size", "64MB"],
        "--size",
        "64MB",
        "multiple of 2 MiB",
    ),
    (&["demo", "--threads", "-2"], "--threads", "-2", "negative"),
    (
        &["demo", "--timeout", "-3"],
        "--timeout",
        "-3",
        "is negative",
    ),
    (
        &["demo", "--bandwidth", "1K"],
        "--bandwidth",
        "1K",
        "64 KiB/s",
    ),
    (
        &["bench", "--sizes", "3M"],
        "--sizes",
        "3M",
        "multiple of 2 MiB",
    ),
    (
        &["bench", "--backends", "fast"],
        "--backends",
        "fast",
        "uffd-async",
    ),
    // One value beyond another.
    (
        &["demo", "--size", "64M", "--hot-set", "1G"],
        "--hot-set",
        "1G",
        "larger than --size",
    ),
    // Flags that would be silently ignored.
    (
        &["demo", "--transport", "unix", "--listen", "127.0.0.1:7000"],
        "--listen",
        "127.0.0.1:7000",
        "only to --transport tcp",
    ),
    (
        &["demo", "--pattern", "uniform", "--hot-set", "1M"],
        "--hot-set",
        "1M",
        "only to --pattern hot-set",
    ),
    (
        &["demo", "--on-timeout", "abort"],
        "--on-timeout",
        "abort",
        "without --timeout",
    ),
    (
        &["demo", "--to", "file:/tmp/x.img", "--streams", "2"],
        "--streams",
        "2",
        "only to a migration",
    ),
    (&["demo", "--to", "disk"], "--to", "disk", "file:PATH"),
    // Flags of one kind of destination given with another: refused, not ignored.
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "tcp:127.0.0.1:7000",
            "--force",
        ],
        "--force",
        "",
        "applies only to --to file:PATH",
    ),
    (
        &["send", "--pid", "1", "--to", "unix:/tmp/x.sock", "--force"],
        "--force",
        "",
        "applies only to --to file:PATH",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/tmp/x.img",
            "--io-timeout",
            "5",
        ],
        "--io-timeout",
        "5",
        "only to a connection to a receiver",
    ),
    // Image paths no image can be written at, refused before anything starts.
    (
        &["send", "--pid", "1", "--to", "file:/proc/version"],
        "--to",
        "file:/proc/version",
        "the proc file system (/proc), where no file can be created",
    ),
    (
        &[
            "recv",
            "--listen",
            "unix:/tmp/x.sock",
            "--to",
            "file:/proc/version",
        ],
        "--to",
        "file:/proc/version",
        "the proc file system (/proc), where no file can be created",
    ),
    (
        &["send", "--pid", "1", "--to", "file:/tmp/NAME300"],
        "--to",
        "file:/tmp/NAME300",
        "fit the file system's limit of 255 bytes per name (NAME_MAX)",
    ),
    (
        &["demo", "--to", "file:/tmp/NAME300"],
        "--to",
        "file:/tmp/NAME300",
        "NAME_MAX",
    ),
    // send / recv / rate take what demo takes, checked before attaching or listening.
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--max-rounds",
            "0",
        ],
        "--max-rounds",
        "0",
        "at least 1",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--max-downtime",
            "0",
        ],
        "--max-downtime",
        "0",
        "at least 1",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--max-downtime",
            "4000000",
        ],
        "--max-downtime",
        "4000000",
        "more than an hour",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--max-rounds",
            "2000000",
        ],
        "--max-rounds",
        "2000000",
        "more than 1000000",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--max-rounds",
            "-1",
        ],
        "--max-rounds",
        "-1",
        "negative",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--timeout",
            "0",
        ],
        "--timeout",
        "0",
        "from 0.001 (1 ms)",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--timeout",
            "0.0000001",
        ],
        "--timeout",
        "1e-7",
        "from 0.001 (1 ms)",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--io-timeout",
            "-1",
        ],
        "--io-timeout",
        "-1",
        "from 0.001 (1 ms)",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--final-round-timeout",
            "0",
        ],
        "--final-round-timeout",
        "0",
        "no final round finishes in 0 ms",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--final-round-timeout",
            "4000000",
        ],
        "--final-round-timeout",
        "4000000",
        "more than an hour",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--final-round-timeout",
            "-5",
        ],
        "--final-round-timeout",
        "-5",
        "negative",
    ),
    (
        &["demo", "--final-round-timeout", "0"],
        "--final-round-timeout",
        "0",
        "no final round finishes in 0 ms",
    ),
    (
        &["send", "--pid", "1", "--to", "tcp:127.0.0.1"],
        "--to",
        "tcp:127.0.0.1",
        "HOST:PORT",
    ),
    (
        &["send", "--pid", "-1", "--to", "file:/x.img"],
        "--pid",
        "-1",
        "positive",
    ),
    (
        &["send", "--pid", "0", "--to", "file:/x.img"],
        "--pid",
        "0",
        "run from 1",
    ),
    (
        &["send", "--pid", "1", "--to", "disk"],
        "--to",
        "disk",
        "tcp:HOST:PORT",
    ),
    // The destination before the target: PID 1 is never attached.
    (
        &["send", "--pid", "1", "--to", "file:/no-such-dir/x.img"],
        "--to",
        "file:/no-such-dir/x.img",
        "does not exist",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--key-file",
            "/etc/hostname",
        ],
        "--key-file",
        "/etc/hostname",
        "applies only to a receiver",
    ),
    // recv: the image and the key before listening (no sender ever connects here).
    (
        &[
            "recv",
            "--listen",
            "unix:/tmp/precopy-cli-test.sock",
            "--to",
            "file:/no-such-dir/x.img",
        ],
        "--to",
        "file:/no-such-dir/x.img",
        "does not exist",
    ),
    (
        &[
            "recv",
            "--listen",
            "unix:/tmp/precopy-cli-test.sock",
            "--to",
            "file:/tmp",
        ],
        "--to",
        "file:/tmp",
        "is not a regular file (a directory)",
    ),
    (
        &[
            "recv",
            "--listen",
            "unix:/tmp/precopy-cli-test.sock",
            "--to",
            "file:/tmp/x.img",
            "--key-file",
            "/no-such-key",
        ],
        "--key-file",
        "/no-such-key",
        "cannot be used as a key",
    ),
    (
        &["recv", "--listen", "file:/tmp/x", "--to", "file:/tmp/x.img"],
        "--listen",
        "file:/tmp/x",
        "takes a socket",
    ),
    (
        &[
            "recv",
            "--listen",
            "unix:/tmp/precopy-cli-test.sock",
            "--to",
            "tcp:1.2.3.4:5",
        ],
        "--to",
        "tcp:1.2.3.4:5",
        "takes file:PATH",
    ),
    (
        &["rate", "--pid", "1", "--interval", "-5"],
        "--interval",
        "-5",
        "negative",
    ),
    (
        &["rate", "--pid", "1", "--interval", "0"],
        "--interval",
        "0",
        "1 to 3600000",
    ),
    (
        &["rate", "--pid", "1", "--count", "0"],
        "--count",
        "0",
        "1 to 100000",
    ),
    (&["rate", "--pid", "-7"], "--pid", "-7", "positive"),
    // A negative value states the flag's real range (0 is refused too).
    (
        &["rate", "--pid", "1", "--count", "-1"],
        "--count",
        "-1",
        "from 1 to 100000",
    ),
    (
        &[
            "send",
            "--pid",
            "1",
            "--to",
            "file:/x.img",
            "--max-downtime",
            "-5",
        ],
        "--max-downtime",
        "-5",
        "from 1 to 3600000",
    ),
    (
        &["demo", "--max-rounds", "-1"],
        "--max-rounds",
        "-1",
        "from 1 to 1000000",
    ),
    (
        &["attach-bench", "--runs", "-1"],
        "--runs",
        "-1",
        "from 1 to 10000",
    ),
    (
        &["attach-bench", "--runs", "0"],
        "--runs",
        "0",
        "1 to 10000",
    ),
    // Negative numbers name the flag instead of "unexpected argument".
    (&["bench", "--warmup", "-1"], "--warmup", "-1", "negative"),
    (
        &["bench", "--warmup", "1000"],
        "--warmup",
        "1000",
        "at most 100",
    ),
    (
        &["bench", "--rounds", "5000"],
        "--rounds",
        "5000",
        "1 to 1000",
    ),
    (&["bench", "--seed", "-1"], "--seed", "-1", "negative"),
    (
        &["bench", "--fractions", "-1"],
        "--fractions",
        "-1",
        "more than 0",
    ),
    (
        &["image", "cat", "/x.img", "--range", "-1-5"],
        "--range",
        "-1-5",
        "negative",
    ),
    (
        &[
            "image",
            "cat",
            "/x.img",
            "--range",
            "0x0-0xffffffffffffffffff",
        ],
        "--range",
        "0x0-0xffffffffffffffffff",
        "too large",
    ),
    // Flags that contradict each other.
    (
        &["bench", "--out", "/tmp/precopy-bench", "--no-files"],
        "--out",
        "/tmp/precopy-bench",
        "--no-files",
    ),
    (
        &["demo", "--listen", "localhost"],
        "--listen",
        "localhost",
        "IP address and port",
    ),
    // Addresses and paths that cannot be used: refused as bad input in every subcommand
    // (status 2), never as a failure to listen or connect (192.0.2.1 is TEST-NET-1, no
    // machine's own address).
    (
        &[
            "recv",
            "--listen",
            "tcp:999.0.0.0:1",
            "--to",
            "file:/tmp/x.img",
        ],
        "--listen",
        "tcp:999.0.0.0:1",
        "neither an IP address nor a name",
    ),
    (
        &["send", "--pid", "1", "--to", "tcp:999.0.0.0:1"],
        "--to",
        "tcp:999.0.0.0:1",
        "neither an IP address nor a name",
    ),
    (
        &[
            "recv",
            "--listen",
            "tcp:192.0.2.1:7000",
            "--to",
            "file:/tmp/x.img",
        ],
        "--listen",
        "tcp:192.0.2.1:7000",
        "not an address of this machine",
    ),
    (
        &["demo", "--listen", "192.0.2.1:7000"],
        "--listen",
        "192.0.2.1:7000",
        "not an address of this machine",
    ),
    (
        &[
            "recv",
            "--listen",
            "unix:/no-such-dir/precopy.sock",
            "--to",
            "file:/tmp/x.img",
        ],
        "--listen",
        "unix:/no-such-dir/precopy.sock",
        "directory that does not exist",
    ),
    (
        &["demo", "--dest-netns", "precopy-no-such-ns"],
        "--dest-netns",
        "precopy-no-such-ns",
        "no network namespace",
    ),
    (
        &["image", "info", "/no-such-dir/x.img"],
        "IMAGE",
        "/no-such-dir/x.img",
        "does not exist",
    ),
    (
        &["image", "verify", "/tmp"],
        "IMAGE",
        "/tmp",
        "is a directory",
    ),
    (
        &["image", "cat", "/no-such-dir/x.img", "--range", "0-4096"],
        "IMAGE",
        "/no-such-dir/x.img",
        "does not exist",
    ),
    (
        &["image", "info", "/dev/null"],
        "IMAGE",
        "/dev/null",
        "is a character device, not an image file",
    ),
    // A Unix socket's destination that no receiver can listen on, and a path longer than a
    // socket address holds (sun_path: 108 bytes with the NUL): refused before connecting or
    // listening (they were failures to connect or bind, status 1).
    (
        &["send", "--pid", "1", "--to", "unix:/nonexistent/s"],
        "--to",
        "unix:/nonexistent/s",
        "/nonexistent is not an existing directory",
    ),
    (
        &["send", "--pid", "1", "--to", "unix:LONG"],
        "--to",
        "unix:LONG",
        "more than the 107 a Unix socket address holds",
    ),
    (
        &["recv", "--listen", "unix:LONG", "--to", "file:/tmp/x.img"],
        "--listen",
        "unix:LONG",
        "more than the 107 a Unix socket address holds",
    ),
    // Flags only `demo --vm` uses, given without it.
    (
        &["demo", "--vcpus", "0"],
        "--vcpus",
        "0",
        "applies only to a KVM guest's migration (demo --vm); add --vm, or drop --vcpus",
    ),
    (
        &["demo", "--guest-seconds", "5"],
        "--guest-seconds",
        "5",
        "add --vm, or drop --guest-seconds",
    ),
    (
        &["demo", "--memfd"],
        "--memfd",
        "--memfd: applies only",
        "add --vm, or drop --memfd",
    ),
    // Negative values of demo's numeric flags name the flag (they were "unexpected argument").
    (
        &["demo", "--reconnect-attempts", "-1"],
        "--reconnect-attempts",
        "-1",
        "from 0 to 100",
    ),
    (
        &["demo", "--reconnect-backoff", "-1"],
        "--reconnect-backoff",
        "-1",
        "from 1 to 60000",
    ),
    (
        &["demo", "--final-round-timeout", "-1"],
        "--final-round-timeout",
        "-1",
        "from 1 to 3600000",
    ),
    (
        &["demo", "--io-timeout", "-1"],
        "--io-timeout",
        "-1",
        "from 0.001 (1 ms)",
    ),
    (
        &["demo", "--io-timeout", "1e-300"],
        "--io-timeout",
        "1e-300",
        "from 0.001 (1 ms)",
    ),
    (
        &["demo", "--timeout", "1e300"],
        "--timeout",
        "1e300",
        "longer than 30 days",
    ),
    (
        &["demo", "--timeout", "0.0000001"],
        "--timeout",
        "0.0000001",
        "shorter than a millisecond",
    ),
    // A timeout's refusal echoes the value as typed and says why in the same words for
    // each reason: not a number, negative, zero, under 1 ms, past 30 days.
    (&["demo", "--timeout", "0"], "--timeout", "0", "is zero"),
    (
        &["demo", "--io-timeout", "abc"],
        "--io-timeout",
        "abc",
        "is not a number of seconds",
    ),
    (
        &["demo", "--io-timeout", "nan"],
        "--io-timeout",
        "nan",
        "is not a number of seconds",
    ),
    (
        &["demo", "--io-timeout", "1e9"],
        "--io-timeout",
        "1e9",
        "is longer than 30 days",
    ),
    (
        &["demo", "--io-timeout", "-1"],
        "--io-timeout",
        "-1",
        "is negative",
    ),
    // One size parser for sizes and rates: a number past 64 bits is too large, not "not a
    // size", whether or not it has a unit.
    (
        &["demo", "--dirty-rate", "99999999999999999999"],
        "--dirty-rate",
        "99999999999999999999",
        "too large",
    ),
    (
        &["demo", "--size", "99999999999999999999"],
        "--size",
        "99999999999999999999",
        "too large",
    ),
    // A port past 16 bits is named with the range, not as a malformed address.
    (
        &["demo", "--listen", "127.0.0.1:99999"],
        "--listen",
        "127.0.0.1:99999",
        "ports run from 0 to 65535",
    ),
    (
        &[
            "recv",
            "--listen",
            "tcp:127.0.0.1:99999",
            "--to",
            "file:/tmp/precopy-bad-port.img",
        ],
        "--listen",
        "tcp:127.0.0.1:99999",
        "ports run from 0 to 65535",
    ),
    // recv's --io-timeout takes what send's does.
    (
        &[
            "recv",
            "--listen",
            "unix:/tmp/precopy-bad-timeout.sock",
            "--to",
            "file:/tmp/precopy-bad-timeout.img",
            "--io-timeout",
            "0",
        ],
        "--io-timeout",
        "0",
        "from 0.001 (1 ms)",
    ),
    // clap's own messages, in one line that reads as one: a list after a colon, one pointer to
    // --help.
    (
        &["send", "--to", "file:/tmp/x.img"],
        "--pid",
        "<PID>",
        "not provided: --pid",
    ),
    (
        &["demo", "--vm", "--threads", "2"],
        "--threads",
        "--vm",
        "leave out --vm or --threads: they do not go together",
    ),
];

/// `BAD`'s argument or value `s` with `LONG` replaced by a path longer than a Unix socket
/// address holds, and `NAME300` by a file name longer than NAME_MAX (255 bytes).
fn with_long_path(s: &str) -> String {
    s.replace("LONG", &format!("/tmp/{}", "a".repeat(120)))
        .replace("NAME300", &"n".repeat(300))
}

/// The JSON objects of every subcommand that reports numbers, each run for real: `demo`,
/// `send` to a `recv` (both), `image info` and `image verify` of what `recv` wrote, `rate` and
/// `probe`. Named by the command that printed them.
fn every_subcommands_json() -> Vec<(&'static str, serde_json::Value)> {
    use std::io::BufRead;
    let ok = |what: &str, out: &Output| {
        assert!(out.status.success(), "{what}: {}", stderr(out));
        one_json(out)
    };
    let mut all = vec![(
        "demo",
        ok("demo", &precopy(&["demo", "--size", "64M", "--json"])),
    )];
    let t = common::target::Target::start(common::target::Lang::C, 2, 256, 100);
    let pid = t.pid.to_string();
    let dir = scratch_dir("json-units");
    let (sock, image) = (dir.join("recv.sock"), dir.join("recv.img"));
    let mut recv = Command::new(PRECOPY)
        .args(["recv", "--json", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--to")
        .arg(format!("file:{}", image.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(recv.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening on"), "recv said {line:?}");
    let to = format!("unix:{}", sock.display());
    all.push((
        "send",
        ok(
            "send",
            &precopy(&["send", "--json", "--pid", &pid, "--to", &to]),
        ),
    ));
    all.push(("recv", ok("recv", &recv.wait_with_output().unwrap())));
    let img = image.to_str().unwrap();
    for (name, args) in [
        ("image info", vec!["image", "info", "--json", img]),
        ("image verify", vec!["image", "verify", "--json", img]),
        ("rate", vec!["rate", "--json", "--pid", &pid, "--count=3"]),
        ("probe", vec!["probe", "--json"]),
    ] {
        all.push((name, ok(name, &precopy(&args))));
    }
    let _ = std::fs::remove_dir_all(&dir);
    all
}

/// Every number in every subcommand's `--json` whose field name carries no unit (`_ms`,
/// `_bytes`, `pages`, ...) is listed in the README's "JSON fields and their units" (as
/// `` `NAME` `` or `` `PATH.NAME` ``), so a script reading it knows the unit: a field added
/// without a unit in its name and without a line there fails this test.
#[test]
fn every_json_number_without_a_unit_in_its_name_is_in_the_readme() {
    if !engine_usable() {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("reading README.md");
    let section = readme
        .split("### JSON fields and their units")
        .nth(1)
        .and_then(|s| s.split("\n#").next())
        .expect("README has a section 'JSON fields and their units'");
    const UNITS: &[&str] = &[
        "_ms",
        "_us",
        "_s",
        "bytes",
        "_per_sec",
        "pages",
        "_ns_per_op",
    ];
    fn walk(v: &serde_json::Value, path: &str, found: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if x.is_number() && !UNITS.iter().any(|u| k.ends_with(u)) {
                        found.push((path.to_string(), k.clone()));
                    }
                    walk(x, &format!("{path}.{k}"), found);
                }
            }
            serde_json::Value::Array(a) => {
                for x in a {
                    walk(x, &format!("{path}[]"), found);
                }
            }
            _ => {}
        }
    }
    let mut missing = std::collections::BTreeSet::new();
    for (command, v) in every_subcommands_json() {
        let mut found = Vec::new();
        walk(&v, "", &mut found);
        // Each command has such numbers: the walk sees them.
        assert!(!found.is_empty(), "{command}: {v}");
        for (path, key) in &found {
            if !section.contains(&format!("`{key}`")) && !section.contains(&format!(".{key}`")) {
                missing.insert(format!("{command}: {path}.{key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "numbers whose names give no unit, missing from README's JSON units: {missing:#?}"
    );
}

/// A TCP port another socket holds is refused as bad input by `recv --listen` and `demo
/// --listen` alike (status 2, the flag and value named), not as a failure to listen.
#[test]
fn an_address_in_use_is_refused_alike_by_recv_and_demo() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let recv_addr = format!("tcp:127.0.0.1:{port}");
    let demo_addr = format!("127.0.0.1:{port}");
    for (args, value) in [
        (
            vec!["recv", "--listen", &recv_addr, "--to", "file:/tmp/x.img"],
            &recv_addr,
        ),
        (vec!["demo", "--listen", &demo_addr], &demo_addr),
    ] {
        let out = precopy(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.matches("error:").count(), 1, "{args:?}: {err}");
        for want in ["--listen", value.as_str(), "in use"] {
            assert!(err.contains(want), "{args:?}: {want:?} missing: {err}");
        }
    }
}

#[test]
fn each_kind_of_bad_input_is_refused_in_one_line() {
    for (args, flag, value, limit) in BAD {
        let owned: Vec<String> = args.iter().map(|a| with_long_path(a)).collect();
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        let value = &with_long_path(value);
        let out = precopy(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        let line = err
            .lines()
            .find(|l| l.contains("error:"))
            .unwrap_or_else(|| panic!("{args:?}: no error line: {err}"));
        assert_eq!(
            err.matches("error:").count(),
            1,
            "{args:?}: error printed once: {err}"
        );
        for want in [flag, value.as_str(), limit] {
            assert!(
                line.contains(want),
                "{args:?}: {want:?} missing from {line:?}"
            );
        }
        assert!(!line.contains("0 or more"), "{args:?}: {line}");
        assert!(line.matches("see --help").count() <= 1, "{args:?}: {line}");
        assert!(!line.contains(":;"), "{args:?}: {line}");
        assert!(out.stdout.is_empty(), "{args:?}: stdout without --json");

        // `image cat` writes raw bytes and has no JSON form.
        if args.starts_with(&["image", "cat"]) {
            continue;
        }
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let out = precopy(&with_json);
        assert_eq!(out.status.code(), Some(2), "{with_json:?}");
        let v = one_json(&out);
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(flag) && msg.contains(limit),
            "{with_json:?}: {v}"
        );
    }
}

#[test]
fn json_failures_have_one_shape_in_every_subcommand() {
    let dir = scratch_dir("json-fail");
    let missing = dir.join("missing.img");
    let missing = missing.to_str().unwrap();
    for args in [
        &["demo", "--threads", "0", "--json"][..],
        &["demo", "--no-such-flag", "--json"][..],
        &["bench", "--rounds", "0", "--json"][..],
        &["image", "info", missing, "--json"][..],
        &["image", "info", "--verify", missing, "--json"][..],
        &["image", "verify", missing, "--json"][..],
    ] {
        let out = precopy(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        one_json(&out);
        assert_eq!(
            stderr(&out).matches("error:").count(),
            1,
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_successes_have_one_shape_and_demo_writes_an_image() {
    // probe: success or, on a kernel without any backend, failure: one object either way.
    let v = one_json(&precopy(&["probe", "--json"]));
    assert!(v["tracking_usable"].is_boolean(), "{v}");
    if !engine_usable() {
        return;
    }
    let out = precopy(&[
        "bench",
        "--json",
        "--no-files",
        "--sizes",
        "2M",
        "--fractions",
        "10%",
        "--patterns",
        "random",
        "--thp",
        "off",
        "--threads",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--backends",
        "uffd-async",
    ]);
    let v = one_json(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        v["results"].as_array().is_some_and(|r| !r.is_empty()),
        "{v}"
    );

    // demo --to file: makes an image that image info/verify/cat accept.
    let dir = scratch_dir("demo-image");
    let img = dir.join("demo.img");
    let to = format!("file:{}", img.display());
    let out = precopy(&[
        "demo",
        "--size",
        "16M",
        "--dirty-rate",
        "4M",
        "--to",
        &to,
        "--json",
    ]);
    let v = one_json(&out);
    assert!(out.status.success(), "{v}\n{}", stderr(&out));
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["verification"]["against"], "image", "{v}");
    let img = img.to_str().unwrap();
    let info = one_json(&precopy(&["image", "info", "--verify", img, "--json"]));
    assert_eq!(info["complete"], true);
    assert_eq!(info["verified"], true);
    assert_eq!(info["total_len"], 16 << 20);
    assert_eq!(
        info["memory_checksum"], v["migration"]["checksum"],
        "the image holds what the migration acknowledged"
    );
    let verify = one_json(&precopy(&["image", "verify", img, "--json"]));
    assert_eq!(verify["verified"], true);
    // Spans are memory offsets: the first region starts at 0.
    assert_eq!(info["regions"][0]["size"], 16 << 20);
    let range = format!("{:#x}-{:#x}", 0, 8192);
    let out = precopy(&["image", "cat", img, "--range", &range]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 8192);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The numbers after `key` in each line containing `tag`.
fn counts(err: &str, tag: &str, key: &str) -> Vec<f64> {
    err.lines()
        .filter(|l| l.contains(tag))
        .filter_map(|l| {
            let rest = &l[l.find(key)? + key.len()..];
            let num: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let unit = rest.trim_start()[num.len()..].trim_start();
            let scale = match unit.split_whitespace().next() {
                Some("KiB") => 1024.0,
                Some("MiB") => 1024.0 * 1024.0,
                Some("GiB") => 1024.0 * 1024.0 * 1024.0,
                _ => 1.0,
            };
            num.parse::<f64>().ok().map(|n| n * scale)
        })
        .collect()
}

#[test]
fn progress_moves_during_round_0_and_verification_without_a_terminal() {
    if !engine_usable() {
        return;
    }
    // Round 0 of 48 MiB at 16 MiB/s takes about 3 s: several plain lines must show it moving.
    let out = precopy(&[
        "demo",
        "--size",
        "48M",
        "--dirty-rate",
        "1M",
        "--bandwidth",
        "16M",
        "--progress",
        "lines",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // The round's first line says what it will send; later lines count bytes queued for
    // sending (read and handed to the sender), and say so.
    assert!(
        err.contains("round 0 (all memory): 48.0 MiB to send\n"),
        "round 0's start not shown: {err}"
    );
    assert!(!err.contains("queued 0 B"), "{err}");
    let sent = counts(&err, "round 0 (all memory)", "queued");
    assert!(sent.len() >= 2, "round 0 shown fewer than 2 times: {err}");
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "{sent:?}");
    let moving: Vec<_> = sent
        .iter()
        .filter(|&&s| s > 0.0 && s < 48.0 * 1048576.0)
        .collect();
    assert!(
        moving.len() >= 2,
        "round 0 did not move while it ran: {err}"
    );
    let compared = counts(&err, "verifying", "compared");
    assert!(compared.len() >= 2, "{err}");
    assert_eq!(compared.first(), Some(&0.0), "{err}");
    assert_eq!(compared.last(), Some(&(48.0 * 1048576.0)), "{err}");
    assert!(err.contains("source: filling"), "setup not shown: {err}");
    // The report speaks plainly.
    let text = String::from_utf8_lossy(&out.stdout);
    for internal in ["Tcp", "HotSet", "MaxRounds", "Converged", "Completed"] {
        assert!(!text.contains(internal), "{internal} in the report: {text}");
    }
    assert!(
        text.contains("of memory") && text.contains("wire bytes per memory byte"),
        "{text}"
    );
}

#[test]
fn forced_switch_over_is_said_plainly() {
    if !engine_usable() {
        return;
    }
    let out = precopy(&[
        "demo",
        "--size",
        "32M",
        "--dirty-rate",
        "32M",
        "--max-rounds",
        "1",
        "--max-downtime",
        "1",
        "--progress",
        "none",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("FORCED by the round limit"), "{text}");
}

/// A results directory that cannot take files is refused before the bench runs (it used to
/// run the whole bench, then warn and exit 0).
#[test]
fn bench_refuses_an_unwritable_out_before_running() {
    let out = precopy(&[
        "bench",
        "--out",
        "/proc/precopy-no-such-dir",
        "--sizes",
        "2M",
    ]);
    let err = stderr(&out);
    // A directory that cannot take the files is bad input, refused like any other (status 2).
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--out /proc/precopy-no-such-dir"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(!err.contains("done in"), "the bench ran: {err}");
}

/// `bench --out` makes the directory it names, not the path to it: a missing parent is
/// refused before the bench runs (it used to create the whole tree), as other path flags are.
#[test]
fn bench_refuses_an_out_whose_parent_is_missing() {
    let dir = scratch_dir("bench-out");
    let out_dir = dir.join("missing/deep/dir");
    let typed = out_dir.to_str().unwrap();
    let out = precopy(&["bench", "--out", typed, "--sizes", "2M", "--rounds", "1"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let parent = dir.join("missing/deep");
    for want in [
        format!("--out {typed}: "),
        format!("{} is not an existing directory", parent.display()),
        format!("create {} first", parent.display()),
    ] {
        assert!(err.contains(&want), "{want:?} missing: {err}");
    }
    assert!(!dir.join("missing").exists(), "the tree was made");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `send --to unix:PATH` naming a FIFO (no receiver can listen on one) is bad input, refused
/// before anything starts: it was a failure to connect ("Connection refused", status 1).
#[test]
fn send_refuses_a_unix_destination_that_is_not_a_socket() {
    let dir = scratch_dir("send-fifo");
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    for (path, kind) in [(&fifo, "a FIFO"), (&file, "a regular file")] {
        let to = format!("unix:{}", path.display());
        let out = precopy(&["send", "--pid", "1", "--to", &to]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{to}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        let want = format!("--to {to}: {} is {kind}, not a socket", path.display());
        assert!(err.contains(&want), "{want:?} missing: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Help texts claim only what holds: the attach's stop of a thread is short on an idle
/// machine only, and `recv --final-priority` is about the receiver's own threads.
#[test]
fn help_texts_say_what_holds() {
    let send = stdout(&precopy(&["send", "--help"]));
    assert!(
        send.contains("well under a millisecond on an idle machine")
            && send.contains("tens of milliseconds under load"),
        "{send}"
    );
    let recv = stdout(&precopy(&["recv", "--help"]));
    let priority = recv
        .split("--final-priority")
        .nth(1)
        .and_then(|s| s.split("\n      --").next())
        .unwrap_or_default();
    assert!(
        priority.contains("recv raises them to SCHED_FIFO 1"),
        "{priority}"
    );
    assert!(!priority.contains("source runs"), "{priority}");
    // recv's silence bound is a flag, its default said.
    let timeout = recv
        .split("--io-timeout")
        .nth(1)
        .and_then(|s| s.split("\n      --").next())
        .unwrap_or_default();
    assert!(timeout.contains("[default: 60]"), "{recv}");
}

/// Runs `precopy args` with a stdout whose reader is already gone, so its first write fails
/// with `EPIPE`.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    Command::new(PRECOPY)
        .args(args)
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("running precopy")
}

#[test]
fn a_reader_that_went_away_is_a_quiet_exit() {
    let mut cmds: Vec<Vec<String>> = vec![
        vec!["probe".into()],
        vec!["probe".into(), "--json".into()],
        vec!["--help".into()],
    ];
    let dir = scratch_dir("epipe");
    if engine_usable() {
        let img = dir.join("demo.img");
        let out = precopy(&[
            "demo",
            "--size",
            "4M",
            "--progress",
            "none",
            "--to",
            &format!("file:{}", img.display()),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let img = img.to_str().unwrap().to_string();
        for a in [
            &["image", "info"][..],
            &["image", "info", "--verify"][..],
            &["image", "info", "--json"][..],
            &["image", "verify"][..],
            &["image", "verify", "--json"][..],
        ] {
            let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            v.push(img.clone());
            cmds.push(v);
        }
        cmds.push(vec![
            "image".into(),
            "cat".into(),
            img.clone(),
            "--range".into(),
            "0-8192".into(),
        ]);
        // The demo's text report (`demo | true`): it ended with "Broken pipe", status 1.
        cmds.push(
            ["demo", "--size", "4M", "--progress", "none"]
                .map(String::from)
                .to_vec(),
        );
    }
    for args in &cmds {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = with_closed_stdout(&args);
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("error"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `precopy args` with its stdout closed (`>&-`), through `sh`.
fn with_stdout_closed_at_start(args: &[&str]) -> Output {
    Command::new("sh")
        .args(["-c", r#"exec "$0" "$@" >&-"#, PRECOPY])
        .args(args)
        .output()
        .expect("running sh")
}

/// A stdout closed before the start (`>&-`) used to be `/dev/null` to the command (Rust's
/// runtime opens it there), so its report was lost without a word and the status was 0: it
/// is refused before anything starts, once, status 2, while `>/dev/null` is accepted.
#[test]
fn a_closed_stdout_is_refused_before_anything_starts() {
    let dir = scratch_dir("closed-stdout");
    let img = dir.join("demo.img");
    let to = format!("file:{}", img.display());
    for args in [
        &["probe"][..],
        &["probe", "--json"][..],
        &["demo", "--size", "4M", "--progress", "none", "--to", &to][..],
    ] {
        let out = with_stdout_closed_at_start(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.matches("error:").count(), 1, "{args:?}: {err}");
        assert!(err.contains("stdout is closed (>&-)"), "{args:?}: {err}");
        assert!(!img.exists(), "{args:?}: the demo ran");
    }
    let out = Command::new(PRECOPY)
        .arg("probe")
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `precopy` or `precopy image` without a subcommand shows the help as clap lays it out, on
/// stderr with status 2 (it was squashed into one `precopy: error: ...; ...` line).
#[test]
fn a_missing_subcommand_shows_the_help_not_an_error_line() {
    for (args, usage) in [
        (&[][..], "Usage: precopy <COMMAND>"),
        (&["image"][..], "Usage: precopy image <COMMAND>"),
    ] {
        let out = precopy(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!err.contains("error:"), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert!(lines.contains(&usage), "{args:?}: {err}");
        assert!(lines.contains(&"Commands:"), "{args:?}: {err}");
        assert!(
            lines
                .iter()
                .any(|l| l.trim_start().starts_with("verify ")
                    || l.trim_start().starts_with("send ")),
            "{args:?}: one subcommand a line: {err}"
        );
    }
}

/// A TCP destination on port 0 is bad input (status 2, before anything starts), not a
/// connection refused once running (status 1).
#[test]
fn send_refuses_port_0_as_a_destination() {
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let out = precopy(&["send", "--pid", &pid, "--to", "tcp:127.0.0.1:0"]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--to tcp:127.0.0.1:0: port 0 is not a destination"),
        "{err}"
    );
}

#[test]
fn usage_errors_are_one_line_holding_clap_whole_message() {
    let out = precopy(&["demo", "--no-such-flag", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v = one_json(&out);
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    for want in [
        "unexpected argument '--no-such-flag'",
        "usage: precopy demo",
        "see --help",
    ] {
        assert!(msg.contains(want), "{want:?} missing from {msg:?}");
    }
    assert!(!msg.contains("For more information"), "{msg:?}");
    // The same prefix as every other error, once, in one line: the message JSON holds.
    let err = stderr(&out);
    assert_eq!(err.trim_end(), format!("precopy: error: {msg}"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn an_aborted_migration_names_the_flag_and_the_fix() {
    if !engine_usable() {
        return;
    }
    let out = precopy(&[
        "demo",
        "--size",
        "32M",
        "--dirty-rate",
        "32M",
        "--max-rounds",
        "1",
        "--max-downtime",
        "1",
        "--on-max-rounds",
        "abort",
        "--progress",
        "none",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for want in ["--max-rounds 1", "--on-max-rounds switch-over"] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
}
