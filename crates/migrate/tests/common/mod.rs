//! A tiny in-process "guest" for migration tests: memory, writer threads that can be paused and
//! throttled, and a receiver thread.

#![allow(dead_code)]

use precopy_migrate::Callbacks;
use precopy_sys::mem::Mapping;
use precopy_transfer::{Listener, MemorySink, ReceiveReport, Receiver, ReceiverConfig, Sink};
use rand::Rng;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const PAGE: u64 = 4096;

/// The key both ends of a test share (every TCP receiver requires one).
pub fn test_key() -> precopy_transfer::Key {
    precopy_transfer::Key::from_bytes(b"precopy test key, not a secret".to_vec()).unwrap()
}

/// Returns false (after a loud SKIP message) when the kernel lacks what tracking needs.
/// The indexes of the pages in which `a` and `b` differ.
pub fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    (a.chunks(PAGE as usize).zip(b.chunks(PAGE as usize)))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect()
}

pub fn supported(test: &str) -> bool {
    let p = precopy_scanner::kernel::probe();
    if !p.engine_usable {
        eprintln!(
            "SKIP {test}: this kernel cannot run the engine: {}",
            p.reason.unwrap_or_default()
        );
        return false;
    }
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Uniform,
    HotSet,
    Sequential,
}

/// Memory plus writer threads.
pub struct Guest {
    pub mem: Arc<Mapping>,
    paused: Arc<AtomicBool>,
    parked: Arc<AtomicUsize>,
    throttle: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    pub writes: Arc<AtomicU64>,
    threads: usize,
    handles: Vec<JoinHandle<()>>,
}

impl Guest {
    /// `size` bytes, filled, then `threads` writers at `pages_per_sec` each.
    pub fn start(size: u64, threads: usize, pattern: Pattern, pages_per_sec: f64) -> Guest {
        let mem = Arc::new(Mapping::anonymous(size).unwrap());
        for p in 0..size / PAGE {
            if p % 8 != 7 {
                mem.write_u64(p * PAGE, p + 1).unwrap();
            }
        }
        let mut g = Guest {
            mem,
            paused: Arc::new(AtomicBool::new(false)),
            parked: Arc::new(AtomicUsize::new(0)),
            throttle: Arc::new(AtomicU64::new(0f64.to_bits())),
            stop: Arc::new(AtomicBool::new(false)),
            writes: Arc::new(AtomicU64::new(0)),
            threads,
            handles: Vec::new(),
        };
        for i in 0..threads {
            let (mem, paused, parked, throttle, stop, writes) = (
                g.mem.clone(),
                g.paused.clone(),
                g.parked.clone(),
                g.throttle.clone(),
                g.stop.clone(),
                g.writes.clone(),
            );
            g.handles.push(std::thread::spawn(move || {
                let pages = mem.len() / PAGE;
                let mut rng = rand::rng();
                let mut cursor = i as u64 * pages / threads as u64;
                let mut seq = 0u64;
                let start = Instant::now();
                let mut done = 0.0f64;
                while !stop.load(SeqCst) {
                    if paused.load(SeqCst) {
                        parked.fetch_add(1, SeqCst);
                        while paused.load(SeqCst) && !stop.load(SeqCst) {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        parked.fetch_sub(1, SeqCst);
                        continue;
                    }
                    let due = start.elapsed().as_secs_f64() * pages_per_sec;
                    done = done.max(due - 0.01 * pages_per_sec);
                    let mut batch = 0;
                    while done < due && batch < 64 && !paused.load(SeqCst) {
                        let page = match pattern {
                            Pattern::Uniform => rng.random_range(0..pages),
                            Pattern::HotSet if rng.random_ratio(9, 10) => {
                                rng.random_range(0..(pages / 16).max(1))
                            }
                            Pattern::HotSet => rng.random_range(0..pages),
                            Pattern::Sequential => {
                                cursor = (cursor + 1) % pages;
                                cursor
                            }
                        };
                        seq += 1;
                        let off = page * PAGE + (seq % 512) * 8;
                        mem.write_u64(off, ((i as u64) << 48) | seq).unwrap();
                        writes.fetch_add(1, SeqCst);
                        done += 1.0;
                        batch += 1;
                    }
                    // Throttled: sleep a share of the time proportional to the throttle.
                    let t = f64::from_bits(throttle.load(SeqCst));
                    let tick = Duration::from_millis(1);
                    std::thread::sleep(tick + tick.mul_f64(t / (1.0 - t).max(0.01)));
                    if t > 0.0 {
                        // Time lost to the throttle is not made up.
                        done = done.max(start.elapsed().as_secs_f64() * pages_per_sec);
                    }
                }
            }));
        }
        g
    }

    /// Pause/resume/throttle callbacks for the driver.
    pub fn callbacks(&self) -> Callbacks<Infallible> {
        let (p1, parked, n) = (self.paused.clone(), self.parked.clone(), self.threads);
        let p2 = self.paused.clone();
        let t = self.throttle.clone();
        Callbacks::new(
            move || {
                p1.store(true, SeqCst);
                // Block, not spin: the driver calls this from a real-time thread (a pause
                // probe, the final phase), and a spin there keeps the time-sharing writers
                // off its CPU (with two such tests at once, off both CPUs until the kernel's
                // real-time throttling lets them run, 950 ms later).
                while parked.load(SeqCst) < n {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Ok(())
            },
            move || {
                p2.store(false, SeqCst);
                Ok(())
            },
        )
        .with_throttle(move |f| {
            t.store(f.to_bits(), SeqCst);
            Ok(())
        })
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(SeqCst)
    }

    /// A copy of all memory.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.mem.len() as usize];
        self.mem.read(0, &mut v).unwrap();
        v
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A sink that fails after `pages` pages, like a destination that dies.
pub struct DyingSink {
    pub inner: MemorySink,
    pub pages_left: u64,
}

impl Sink for DyingSink {
    fn begin_round(&mut self, round: u64) -> Result<(), precopy_transfer::TransferError> {
        self.inner.begin_round(round)
    }
    fn send_pages(
        &mut self,
        addr: u64,
        pages: precopy_transfer::PageBuf,
        crcs: &[u64],
    ) -> Result<(), precopy_transfer::TransferError> {
        let n = pages.len() as u64 / PAGE;
        if n > self.pages_left {
            return Err(precopy_transfer::TransferError::Io {
                what: "writing destination memory",
                source: std::io::Error::other("destination died"),
            });
        }
        self.pages_left -= n;
        self.inner.send_pages(addr, pages, crcs)
    }
    fn send_zero_range(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> Result<(), precopy_transfer::TransferError> {
        self.inner.send_zero_range(range)
    }
    fn retain(
        &mut self,
        memory: &[std::ops::Range<u64>],
    ) -> Result<bool, precopy_transfer::TransferError> {
        self.inner.retain(memory)
    }
    fn end_round(&mut self, round: u64) -> Result<u64, precopy_transfer::TransferError> {
        self.inner.end_round(round)
    }
    fn finish(
        &mut self,
        checksum: u64,
        check: precopy_transfer::FinalCheck,
    ) -> Result<(), precopy_transfer::TransferError> {
        self.inner.finish(checksum, check)
    }
}

pub type Received = Result<(Vec<u8>, ReceiveReport), precopy_transfer::TransferError>;

/// Accepts one transfer on `listener` in a thread; `die_after` pages makes the sink fail.
pub fn receive(listener: Listener, die_after: Option<u64>) -> JoinHandle<Received> {
    std::thread::spawn(move || {
        let config = ReceiverConfig {
            key: Some(test_key()),
            ..ReceiverConfig::default()
        };
        let receiver = Receiver::accept(&listener, &config)?;
        let layout = receiver.layout().clone();
        match die_after {
            None => {
                let mut sink = MemorySink::new(layout)?;
                let report = receiver.run(&mut sink)?;
                Ok((sink.memory().expect("owned memory").to_vec(), report))
            }
            Some(n) => {
                let mut sink = DyingSink {
                    inner: MemorySink::new(layout)?,
                    pages_left: n,
                };
                let report = receiver.run(&mut sink)?;
                Ok((sink.inner.memory().expect("owned memory").to_vec(), report))
            }
        }
    })
}

/// A child process killed (and reaped) when dropped, so that a failing test leaves none behind.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` with its stdout piped (killed when dropped) and reads the first line it
/// prints: the C fixtures say where their records are, or that they are ready.
pub fn spawn_announced(mut command: std::process::Command) -> (Killed, String) {
    use std::io::BufRead;
    let mut target = Killed(
        command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(target.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (target, line)
}

/// Why the cgroup v1 freezer (what `PauseMethod::Freezer` uses) cannot be used here, if it
/// cannot.
pub fn freezer_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (a freezer cgroup is created)".into());
    }
    let dir = std::path::Path::new("/sys/fs/cgroup/freezer");
    if !dir.join("cgroup.procs").exists() {
        return Some(format!(
            "no cgroup v1 freezer hierarchy at {} (PauseMethod::Freezer uses it)",
            dir.display()
        ));
    }
    None
}

/// Waits (bounded only against a hang, not as a timing assertion) until `done`.
pub fn wait_until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

// Used by some of the test binaries that share this module, not all.
#[allow(unused_imports)]
pub use precopy_testnet::VforkWait;

/// The C fixture `tests/fixtures/NAME.c`, compiled once into the target's temporary directory.
pub fn fixture(name: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    precopy_testnet::compile_c(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.c")),
        &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("precopy-{name}")),
        &["-pthread"],
    )
}

/// Whether `SIGSTOP` is pending for `pid`'s main thread or its whole process (`SigPnd`,
/// `ShdPnd` in `/proc/PID/status`).
pub fn sigstop_pending(pid: i32) -> bool {
    let bit = 1u64 << (nix::sys::signal::Signal::SIGSTOP as i32 - 1);
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .filter_map(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .any(|mask| mask & bit != 0)
}

/// The state letter of the process's main thread (`/proc/PID/stat`), `?` if unreadable.
pub fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .unwrap_or('?')
}
