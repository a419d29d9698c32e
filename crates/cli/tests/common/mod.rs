//! What the CLI's test files share: running `precopy` and reading what it printed (one JSON
//! object with `--json`), scratch paths, and (`target`) the fixtures an attach works on.

#![allow(dead_code)]

pub mod target;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Output, Stdio};

/// The binary under test.
pub const PRECOPY: &str = env!("CARGO_BIN_EXE_precopy");

/// Runs `precopy ARGS` to its end.
pub fn precopy(args: &[&str]) -> Output {
    Command::new(PRECOPY)
        .args(args)
        .output()
        .expect("running precopy")
}

/// Runs `precopy ARGS` to its end, which must come within `limit`: past it the process is
/// killed and the test fails (a hang must fail a test, not hold the run).
pub fn precopy_within(args: &[&str], limit: std::time::Duration) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(PRECOPY)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running precopy");
    // Read both pipes as they fill, so a chatty child never blocks on them.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for precopy") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "precopy {args:?} still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// What it printed on stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What it printed on stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exactly one JSON object on stdout, with `ok` matching the exit status and the common
/// `error` shape (`null`, or a non-empty `message` and a `chain` of strings).
pub fn one_json(o: &Output) -> serde_json::Value {
    let text = stdout(o);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "not one JSON line on stdout: {text:?}\n{}",
        stderr(o)
    );
    let v: serde_json::Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert!(v.is_object(), "{v}");
    assert_eq!(
        v["ok"],
        o.status.success(),
        "ok disagrees with the exit status: {v}"
    );
    if o.status.success() {
        assert!(v["error"].is_null(), "{v}");
    } else {
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(!msg.is_empty(), "no error message: {v}");
        let chain = v["error"]["chain"].as_array().expect("error.chain");
        assert!(
            !chain.is_empty() && chain.iter().all(|c| c.is_string()),
            "{v}"
        );
    }
    v
}

/// This test binary's scratch directory (under cargo's temporary directory for tests).
fn scratch_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A path for a file (or socket) `name` of this test process, nothing there yet.
pub fn scratch(name: &str) -> PathBuf {
    let p = scratch_root().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// An empty directory `name` of this test process.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = scratch(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `precopy recv` started by [`listening_recv`], its stderr read on a thread.
pub struct ListeningRecv {
    /// `None` once [`ListeningRecv::output`] took it.
    child: Option<Child>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl ListeningRecv {
    /// Waits for it to end: its output, stderr whole (from the "listening on" line on).
    pub fn output(mut self) -> Output {
        let child = self.child.take().expect("a receiver waited for once");
        let mut out = child.wait_with_output().unwrap();
        if let Some(stderr) = self.stderr.take() {
            out.stderr = stderr.join().unwrap().into_bytes();
        }
        out
    }
}

impl Drop for ListeningRecv {
    /// A test that failed before [`ListeningRecv::output`] leaves no receiver listening.
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `precopy recv ARGS` (stdout and stderr piped) and reads its first line on stderr,
/// which a receiver that listens prints once it does: it, the rest of its stderr, and that line.
pub fn recv_started(args: &[&str]) -> (Child, BufReader<ChildStderr>, String) {
    let mut child = Command::new(PRECOPY)
        .arg("recv")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    (child, err, line)
}

/// Starts `precopy recv ARGS --listen unix:SOCK --to file:IMG`; returns it once it listens.
/// Listening is its "listening on" line, which also says the image is reserved (the socket
/// file alone appears once the socket listens: `Listener::bind_unix`).
pub fn listening_recv(sock: &Path, img: &Path, args: &[&str]) -> ListeningRecv {
    let (listen, to) = (
        format!("unix:{}", sock.display()),
        format!("file:{}", img.display()),
    );
    let args = [args, &["--listen", &listen, "--to", &to]].concat();
    let (child, mut err, mut line) = recv_started(&args);
    assert!(line.contains("listening on"), "recv said {line:?}");
    let stderr = std::thread::spawn(move || {
        let _ = err.read_to_string(&mut line);
        line
    });
    ListeningRecv {
        child: Some(child),
        stderr: Some(stderr),
    }
}
