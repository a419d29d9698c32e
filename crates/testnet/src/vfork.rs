//! A process held in `vfork` (its thread in state `D`) for as long as a test needs: the
//! `vfork_wait` C fixture (`fixtures/vfork_wait.c`), for the pause and attach tests of
//! `precopy-migrate` and `precopy-cli`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `vfork_wait` fixture: its main thread waits in `vfork(2)` for its child (an
/// uninterruptible sleep, state `D`) until [`VforkWait::release`]; with `spin`, a second thread
/// spins meanwhile. With `shared` the child shares the parent's memory (`vfork`); without, it
/// is made with `clone(CLONE_VFORK)` without `CLONE_VM` (the parent waits the same way, and
/// no other process shares its memory). Killed when dropped, its child released first.
#[derive(Debug)]
pub struct VforkWait {
    process: Child,
    fifo: PathBuf,
    _dir: tempfile::TempDir,
}

impl VforkWait {
    /// Starts it and waits until the main thread waits in `vfork` and the child for its byte
    /// (and, with `spin`, the spinner runs).
    pub fn start(spin: bool, shared: bool) -> VforkWait {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("go");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo {}", fifo.display());
        let exe = crate::compile_c(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/vfork_wait.c"),
            // One executable per version of the source, shared by every test process (the
            // compile renames a finished file into place), not one left behind per process.
            &std::env::temp_dir().join(format!("precopy-vfork_wait-{:016x}", source_hash())),
            &["-pthread"],
        );
        let mut command = Command::new(exe);
        command.arg(&fifo);
        if spin {
            command.arg("spin");
        }
        if !shared {
            command.arg("copy");
        }
        let mut process = command.stdout(Stdio::piped()).spawn().unwrap();
        let out = process.stdout.take().unwrap();
        let v = VforkWait {
            process,
            fifo,
            _dir: dir,
        };
        if spin {
            let mut line = String::new();
            std::io::BufReader::new(out).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready");
        }
        let pid = v.pid();
        let started = Instant::now();
        // `D` with a child: in vfork (not a moment of `D` while starting); the child asleep
        // in its read of the FIFO.
        while !(state(pid) == 'D' && v.vfork_child().is_some_and(|c| state(c) == 'S')) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the fixture never waited in vfork"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        v
    }

    /// The process.
    pub fn pid(&self) -> i32 {
        self.process.id() as i32
    }

    /// The child its main thread waits for.
    pub fn child(&self) -> i32 {
        self.vfork_child().expect("the vfork child")
    }

    /// Whether its main thread has reaped its child (the child no longer on its list; also
    /// when the process is gone). After [`VforkWait::release`], the main thread is then past
    /// its `waitpid` and spins: its state stays `R` (or `T`, should something stop it). Until
    /// then it may show `R` and go back to sleep: the child ends its `vfork` as it starts to
    /// exit, and the parent's `waitpid` may then wait (`S`) for the rest of that exit.
    pub fn child_waited(&self) -> bool {
        self.vfork_child().is_none()
    }

    fn vfork_child(&self) -> Option<i32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The spinning thread of one started with `spin`.
    pub fn spinner(&self) -> i32 {
        let pid = self.pid();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok())
            .find(|&t| t != pid)
            .expect("the fixture's spinning thread")
    }

    /// Writes the byte the vfork child waits for: it exits, and the main thread goes on.
    pub fn release(&self) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        /// `O_NONBLOCK` on Linux: opening never waits for a reader (the fixture holds the
        /// FIFO open for reading as long as it lives).
        const O_NONBLOCK: i32 = 0o4000;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(&self.fifo)
        {
            let _ = f.write_all(b"x");
        }
    }
}

impl Drop for VforkWait {
    fn drop(&mut self) {
        self.release();
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The state letter of thread `pid` (`/proc/PID/stat`), `?` if unreadable.
pub fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .unwrap_or('?')
}

/// A hash of the `vfork_wait` fixture's source, naming its compiled executable.
fn source_hash() -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    include_str!("../fixtures/vfork_wait.c").hash(&mut h);
    h.finish()
}
