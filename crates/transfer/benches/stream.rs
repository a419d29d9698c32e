//! Streams 1 GiB of non-zero pages through the engine over loopback TCP and a
//! Unix socket, and copies the same bytes over a bare socket as the baseline,
//! in the same run; prints engine/raw throughput ratios at the end.
//!
//! `cargo bench -p precopy-transfer --bench stream`
//! (`PRECOPY_BENCH_MIB=256` for a quicker run, `PRECOPY_BENCH_FULL=1` to add
//! the batch-size and zstd-level sweeps used to choose the defaults).
//!
//! The engine side sends the bench's memory two ways: `engine*` reads it with
//! `process_vm_readv` (the path for another process's memory), `own*` lends
//! it to the socket without a copy ([`OwnMemory`], the path for an embedded
//! VMM's guest RAM: by default by `writev`, as `own_writev` always does;
//! `own_splice` by `vmsplice` + `splice`). The raw copy `writev`s the same mapping; `raw_splice` sends it
//! with `vmsplice` + `splice` (no copy at the sender, the kernel's best) and
//! `raw_zerocopy` with `MSG_ZEROCOPY`. The receiver
//! applies into a [`MemorySink`], cleared to
//! zeros before each transfer like a migration's fresh destination; both the
//! raw and the engine receivers write into a destination already faulted in,
//! so page-fault cost is not counted for either. Besides time, each transfer's
//! CPU time (user + system, all threads of both ends) is recorded: on a
//! machine with few cores it, not the socket, bounds the ratio. Each page is half random bytes,
//! half a repeated word, so compression has something (about 2:1) to find.
//!
//! The `ladder_*` configurations step from `raw_splice` towards the engine's
//! own-memory path, one piece of the engine's work at a time (see [`Step`]),
//! and print each thread's CPU time, its time waiting for a CPU, and the rest
//! (blocked), so the gap between `raw_splice` and `own` can be attributed.
//!
//! On a shared machine, `PRECOPY_BENCH_INTERLEAVE=N:raw/tcp,own/tcp,..` runs
//! the named configurations in turn instead of one after the other, N rounds
//! of one transfer each, and prints the median (and range) of the per-round
//! ratios against the first name: each ratio compares transfers seconds
//! apart, under the same load. It also prints, per engine configuration,
//! each engine thread's CPU time and time waiting for a CPU (s/GiB), and how
//! often it was switched out and moved to another CPU (medians per transfer):
//! the sending thread, its writer (`precopy-send-0`) and the receiver's
//! socket thread, read from `/proc/self/task` when the round is sent.
//!
//! In that mode `_q<N>` appended to an engine configuration's name sends
//! with `queue_depth: N` (batches queued ahead of the writer thread), and
//! raw copies print their two threads' times too (sending and receiving,
//! under "ladder and raw threads").
//!
//! `PRECOPY_BENCH_PIN=R,S[,W]` pins the receiving threads to CPU R and the
//! sending threads to CPU S (the engine's writer to W if given), to tell
//! apart what each placement of the two ends costs. `PRECOPY_BENCH_THP=1`
//! asks for transparent huge pages (`MADV_HUGEPAGE`) on the source, the
//! raw copy's destination and the `MemorySink`'s memory.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use nix::sys::socket::sockopt::TcpCongestion;
use precopy_sys::live::{Gather, write_all_gather};
use precopy_sys::mem::Mapping;
use precopy_sys::splice::{SplicePipe, Spliced};
use precopy_sys::zerocopy::ZeroCopySender;
use precopy_transfer::*;

const PS: u64 = 4096;

static TIMES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());
static CPU: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());
/// MSG_ZEROCOPY sends of the last zero-copy run, and how many the kernel copied anyway.
static ZEROCOPY: Mutex<Option<(u64, u64)>> = Mutex::new(None);
/// Bytes on the wire per byte of memory, per engine configuration.
static WIRE: Mutex<BTreeMap<String, f64>> = Mutex::new(BTreeMap::new());

/// CPU seconds (user + system) this process used so far, all threads.
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 * 1e-6;
    secs(u.user_time()) + secs(u.system_time())
}

fn record_cpu(name: &str, seconds: f64) {
    CPU.lock()
        .unwrap()
        .entry(name.to_owned())
        .or_default()
        .push(seconds);
}

fn record(name: &str, d: Duration) {
    TIMES
        .lock()
        .unwrap()
        .entry(name.to_owned())
        .or_default()
        .push(d.as_secs_f64());
}

/// Page-aligned source memory (an anonymous mapping, like a guest's RAM) and
/// a copy of its contents for checking what arrived.
fn source_memory(bytes: usize) -> (Arc<Mapping>, Vec<u8>) {
    let m = if thp() {
        use precopy_sys::mem::{Backing, Thp};
        Mapping::new(Backing::AnonPrivate, bytes as u64, 2 << 20, Thp::Huge).unwrap()
    } else {
        Mapping::anonymous(bytes as u64).unwrap()
    };
    let mut v = vec![0u8; bytes];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for (i, page) in v.chunks_mut(PS as usize).enumerate() {
        let (rnd, pat) = page.split_at_mut(PS as usize / 2);
        for w in rnd.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        for w in pat.chunks_mut(8) {
            w.copy_from_slice(&((i as u64) | 1).to_le_bytes()[..w.len()]);
        }
    }
    m.write(0, &v).unwrap();
    (Arc::new(m), v)
}

#[derive(Clone, Copy)]
enum Net {
    Tcp,
    Unix,
}

/// `PRECOPY_BENCH_NETNS=NAME:ADDR`: receivers listen on ADDR inside network
/// namespace NAME instead of on loopback (`scripts/bench-netns.sh` sets up a
/// rate-limited veth pair and runs this bench across it).
fn netns() -> Option<&'static (String, std::net::IpAddr)> {
    static NETNS: std::sync::OnceLock<Option<(String, std::net::IpAddr)>> =
        std::sync::OnceLock::new();
    NETNS
        .get_or_init(|| {
            let v = std::env::var("PRECOPY_BENCH_NETNS").ok()?;
            let (name, addr) = v.split_once(':').expect("PRECOPY_BENCH_NETNS=NAME:ADDR");
            Some((name.to_owned(), addr.parse().expect("an IP address")))
        })
        .as_ref()
}

/// The key both ends use off loopback (a receiver on another address requires one).
fn bench_key() -> Option<Key> {
    Some(Key::from_bytes(vec![7u8; 32]).unwrap())
}

/// A TCP listener on any free port: on loopback, or in the bench's namespace.
fn tcp_listener() -> Listener {
    let Some((name, addr)) = netns() else {
        return Listener::bind_tcp("127.0.0.1:0").unwrap();
    };
    // Network namespaces are per thread: enter it on a thread of its own; the
    // socket stays in it after the thread ends.
    let (name, addr) = (name.clone(), *addr);
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        Listener::bind_tcp((addr, 0)).unwrap()
    })
    .join()
    .unwrap()
}

/// The congestion control the sender's TCP connections are switched to after
/// `Connection::connect_tcp` chose its loopback one (`*_bbr` configurations:
/// what a system default of BBR gave before).
static SENDER_CC: Mutex<Option<&str>> = Mutex::new(None);

fn pair(net: Net, dir: &std::path::Path, streams: usize) -> (Listener, Vec<Connection>) {
    match net {
        Net::Tcp => {
            let l = tcp_listener();
            let Listener::Tcp(t) = &l else { unreachable!() };
            let addr = t.local_addr().unwrap();
            let conns = (0..streams)
                .map(|_| {
                    let c = Connection::connect_tcp(addr).unwrap();
                    if let Some(cc) = *SENDER_CC.lock().unwrap()
                        && let Connection::Tcp(s) = &c
                    {
                        let cc = std::ffi::OsString::from(cc);
                        nix::sys::socket::setsockopt(s, TcpCongestion, &cc)
                            .unwrap_or_else(|e| panic!("congestion control {cc:?}: {e}"));
                    }
                    c
                })
                .collect();
            (l, conns)
        }
        Net::Unix => {
            let path = dir.join(format!("s{}", rand::random::<u64>()));
            let l = Listener::bind_unix(&path).unwrap();
            let conns = (0..streams)
                .map(|_| Connection::connect_unix(&path).unwrap())
                .collect();
            (l, conns)
        }
    }
}

/// One raw copy of `src` over a fresh connection into `dest`: `writev` of
/// the mapping in 256 KiB pieces (the engine's batch), `read` into `dest`.
fn raw_copy(
    net: Net,
    dir: &std::path::Path,
    src: &Arc<Mapping>,
    dest: &mut [u8],
) -> (Duration, Sched, Sched) {
    use std::os::fd::AsFd;
    let (listener, mut conns) = pair(net, dir, 1);
    let conn = conns.pop().unwrap();
    let mut peer = listener.accept().unwrap();
    let all = LivePages::new(src.clone(), src.range()).unwrap();
    if let Some((r, _)) = pin() {
        pin_to(0, r);
    }
    let start = Instant::now();
    let (tx, rx) = std::thread::scope(|s| {
        let tx = s.spawn(move || {
            if let Some((_, w)) = pin() {
                pin_to(0, w);
            }
            let cpu = thread_times();
            let piece = 64 * PS;
            let mut at = 0;
            while at < all.len() {
                let end = all.len().min(at + piece);
                let part = all.slice(at..end).unwrap();
                write_all_gather(conn.as_fd(), &[Gather::Live(&part)]).unwrap();
                at = end;
            }
            thread_times() - cpu
        });
        let cpu = thread_times();
        peer.read_exact(dest).unwrap();
        let rx = thread_times() - cpu;
        (tx.join().unwrap(), rx)
    });
    (start.elapsed(), tx, rx)
}

/// One raw copy of `src` over a fresh connection into `dest` without the
/// sender's copy: `vmsplice` of the mapping in 256 KiB pieces into a pipe,
/// `splice` on to the socket (the socket references the pages, the receiver's
/// `read` copies from them), `read` into `dest`: the kernel's best.
fn raw_splice(net: Net, dir: &std::path::Path, src: &Arc<Mapping>, dest: &mut [u8]) -> Duration {
    use std::os::fd::AsFd;
    let (listener, mut conns) = pair(net, dir, 1);
    let conn = conns.pop().unwrap();
    let mut peer = listener.accept().unwrap();
    let all = LivePages::new(src.clone(), src.range()).unwrap();
    let mut pipe = SplicePipe::new().unwrap();
    if let Some((r, _)) = pin() {
        pin_to(0, r);
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some((_, w)) = pin() {
                pin_to(0, w);
            }
            let piece = 64 * PS;
            let mut at = 0;
            while at < all.len() {
                let end = all.len().min(at + piece);
                let part = all.slice(at..end).unwrap();
                let sent = pipe.write_all(conn.as_fd(), &[Gather::Live(&part)], None);
                assert!(matches!(sent, Ok(Spliced::Sent(_))), "{sent:?}");
                at = end;
            }
        });
        peer.read_exact(dest).unwrap();
    });
    start.elapsed()
}

/// A step of the ladder from `raw_splice` to the engine's own-memory path
/// (`ladder_*` configs): which of the engine's pieces a spliced copy adds.
#[derive(Clone, Copy, Debug)]
struct Step {
    /// The receiver's read size (`None`: without frames, one `read_exact`
    /// of everything; with frames, a frame's pages in one read as the
    /// engine asks for them, [`HASH_AS_READ`](precopy_transfer::protocol::stream::HASH_AS_READ)).
    read: Option<usize>,
    /// Without frames: the receiver hashes each read's pages right after it.
    hash: bool,
    /// Engine frames: the sender hashes each frame's pages in place and
    /// splices header, pages and hash list (as the engine's writer); the
    /// receiver reads them with the engine's `FrameReader` (8 KiB
    /// `BufReader`, pages hashed after each read of at most `read` bytes)
    /// and checks the frame (`verify_hashed_list`).
    frames: bool,
    /// Pages per splice call (and per frame).
    pages: usize,
    /// The sender hashes each piece's pages in place before splicing it
    /// (always with `frames`).
    tx_hash: bool,
}

/// The calling thread's time on a CPU and waiting for one (runnable, not
/// running) so far, seconds (`/proc/thread-self/schedstat`).
fn thread_times() -> Sched {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    let mut f = s
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap() * 1e-9);
    Sched {
        cpu: f.next().unwrap(),
        wait: f.next().unwrap(),
    }
}

/// A thread's time on a CPU and waiting for one, seconds.
#[derive(Clone, Copy, Default, Debug)]
struct Sched {
    cpu: f64,
    wait: f64,
}

impl std::ops::Sub for Sched {
    type Output = Sched;
    fn sub(self, o: Sched) -> Sched {
        Sched {
            cpu: self.cpu - o.cpu,
            wait: self.wait - o.wait,
        }
    }
}

/// A thread of this process: time on a CPU and waiting for one (seconds),
/// and how often it was switched out and moved to another CPU
/// (`/proc/self/task/TID/schedstat` and `sched`).
#[derive(Clone, Copy, Default, Debug)]
struct TaskTimes {
    sched: Sched,
    switches: f64,
    migrations: f64,
    /// The CPU it last ran on (`/proc/self/task/TID/stat`, field 39).
    cpu: Option<u32>,
}

fn task_times(tid: i32) -> Option<TaskTimes> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let mut f = s
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap() * 1e-9);
    let sched = Sched {
        cpu: f.next()?,
        wait: f.next()?,
    };
    let d = std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).ok()?;
    let field = |name: &str| {
        d.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the command name, which ends with the last ')'; field 39 is the 37th.
    let cpu = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(36))
        .and_then(|c| c.parse().ok());
    Some(TaskTimes {
        sched,
        switches: field("nr_switches"),
        migrations: field("se.nr_migrations"),
        cpu,
    })
}

/// This process's threads other than `skip`, with their names.
fn tasks(skip: &[i32]) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if skip.contains(&tid) {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        v.push((tid, comm.trim().to_owned()));
    }
    v
}

/// `PRECOPY_BENCH_PIN=R,S`: the receiving threads on CPU R, the sending
/// threads on CPU S (raw: the bench's reader and writer; engine: the
/// receiver's threads, and the sending thread with its writer).
fn pin() -> Option<(usize, usize)> {
    let v = std::env::var("PRECOPY_BENCH_PIN").ok()?;
    let mut it = v.split(',').map(|x| x.parse().unwrap());
    Some((it.next().unwrap(), it.next().unwrap()))
}

/// The engine's writer's CPU: the third of `PRECOPY_BENCH_PIN=R,S,W`.
fn pin_writer() -> Option<usize> {
    let v = std::env::var("PRECOPY_BENCH_PIN").ok()?;
    v.split(',').nth(2).map(|x| x.parse().unwrap())
}

fn pin_to(tid: i32, cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set).unwrap();
}

/// Per-thread times of the engine's transfers: the sending thread, its
/// writer, the receiver's socket thread.
static ENGINE_THREADS: Mutex<BTreeMap<String, Vec<[TaskTimes; 3]>>> = Mutex::new(BTreeMap::new());

/// Per-thread times of the ladder's and the raw copy's transfers (sender, receiver).
static THREADS: Mutex<BTreeMap<String, Vec<(Sched, Sched)>>> = Mutex::new(BTreeMap::new());

fn record_threads(name: &str, sender: Sched, receiver: Sched) {
    THREADS
        .lock()
        .unwrap()
        .entry(name.to_owned())
        .or_default()
        .push((sender, receiver));
}

/// One spliced copy of `src` into `dest` shaped by `step`: the time, and the
/// CPU seconds of the sending and the receiving thread.
fn ladder(
    net: Net,
    dir: &std::path::Path,
    src: &Arc<Mapping>,
    dest: &mut [u8],
    step: Step,
) -> (Duration, Sched, Sched) {
    use precopy_transfer::protocol::{FrameReader, PageSpan, Pages, verify_hashed_list};
    use std::io::BufReader;
    use std::os::fd::AsFd;
    use zerocopy::IntoBytes;
    let (listener, mut conns) = pair(net, dir, 1);
    let conn = conns.pop().unwrap();
    let peer = listener.accept().unwrap();
    let all = LivePages::new(src.clone(), src.range()).unwrap();
    let mut pipe = SplicePipe::new().unwrap();
    let ps = PS as usize;
    if let Some((r, _)) = pin() {
        pin_to(0, r);
    }
    let start = Instant::now();
    let (tx_cpu, rx_cpu) = std::thread::scope(|s| {
        let tx = s.spawn(move || {
            if let Some((_, w)) = pin() {
                pin_to(0, w);
            }
            let cpu = thread_times();
            let piece = step.pages as u64 * PS;
            let mut at = 0;
            let mut hashes = Vec::with_capacity(step.pages);
            while at < all.len() {
                let end = all.len().min(at + piece);
                let part = all.slice(at..end).unwrap();
                if step.tx_hash || step.frames {
                    hashes.clear();
                    part.for_each_page(PS, |p| hashes.push(page_hash(p)));
                    std::hint::black_box(&hashes);
                }
                let sent = if step.frames {
                    let list = precopy_transfer::digest::hash_list(&hashes);
                    let span = PageSpan {
                        region: 0,
                        offset: at,
                        len: end - at,
                    };
                    let header = Pages::listed_header(span, &list, true);
                    pipe.write_all(
                        conn.as_fd(),
                        &[
                            Gather::Bytes(header.as_bytes()),
                            Gather::Live(&part),
                            Gather::Bytes(&list),
                        ],
                        None,
                    )
                } else {
                    pipe.write_all(conn.as_fd(), &[Gather::Live(&part)], None)
                };
                assert!(matches!(sent, Ok(Spliced::Sent(_))), "{sent:?}");
                at = end;
            }
            thread_times() - cpu
        });
        let cpu = thread_times();
        let mut hashes = Vec::new();
        if step.frames {
            let read = step.read.unwrap_or(usize::MAX);
            let mut r = FrameReader::new(BufReader::with_capacity(8 << 10, &peer));
            let mut at = 0usize;
            while at < dest.len() {
                let (h, offset) = r.read_raw_header().unwrap();
                let len = h.pages_len() as usize;
                let pages = &mut dest[at..at + len];
                // As the engine's receiver: each read's pages hashed right after it.
                hashes.clear();
                let mut got = 0;
                while got < len {
                    let n = read.min(len - got);
                    let mut part = Vec::new();
                    r.read_pages_hashing(&mut pages[got..got + n], ps, &mut part)
                        .unwrap();
                    hashes.extend_from_slice(&part);
                    got += n;
                }
                let mut list = vec![0u8; len / ps * 8];
                r.read_payload_into(&mut list).unwrap();
                verify_hashed_list(&h, offset, len as u64, &list, PS, &hashes).unwrap();
                assert_eq!(precopy_transfer::digest::hash_list(&hashes), list);
                at += len;
            }
        } else {
            let mut peer = &peer;
            let read = step.read.unwrap_or(dest.len());
            for chunk in dest.chunks_mut(read) {
                peer.read_exact(chunk).unwrap();
                if step.hash {
                    hashes.extend(chunk.chunks(ps).map(page_hash));
                }
            }
            std::hint::black_box(&hashes);
        }
        let rx_cpu = thread_times() - cpu;
        (tx.join().unwrap(), rx_cpu)
    });
    (start.elapsed(), tx_cpu, rx_cpu)
}

/// One raw copy of `src` over fresh TCP with `MSG_ZEROCOPY` sends (256 KiB
/// each), waiting for every completion; returns the time and how many sends
/// the kernel reported it copied after all.
fn raw_zerocopy(
    dir: &std::path::Path,
    src: &Arc<Mapping>,
    dest: &mut [u8],
) -> (Duration, u64, u64) {
    use std::os::fd::AsFd;
    let (listener, mut conns) = pair(Net::Tcp, dir, 1);
    let conn = conns.pop().unwrap();
    let mut peer = listener.accept().unwrap();
    let all = LivePages::new(src.clone(), src.range()).unwrap();
    let start = Instant::now();
    let counts = std::thread::scope(|s| {
        let tx = s.spawn(move || {
            let mut zc = ZeroCopySender::new(conn.as_fd()).unwrap();
            let piece = 64 * PS;
            let mut at = 0;
            while at < all.len() {
                let end = all.len().min(at + piece);
                zc.send(&all.slice(at..end).unwrap()).unwrap();
                at = end;
            }
            zc.finish().unwrap()
        });
        peer.read_exact(dest).unwrap();
        tx.join().unwrap()
    });
    (start.elapsed(), counts.0, counts.1)
}

/// One engine transfer of `src`: (time to stream the round, time to DONE,
/// bytes on the wire).
fn engine_copy(
    net: Net,
    dir: &std::path::Path,
    src: &Arc<Mapping>,
    own: bool,
    dest: &mut MemorySink,
    config: &SenderConfig,
) -> (Duration, Duration, u64, [TaskTimes; 3]) {
    let (listener, conns) = pair(net, dir, config.streams);
    let base = src.addr();
    let layout = Layout::single(PS, base, src.len()).unwrap();
    let main_tid = nix::unistd::gettid().as_raw();
    let rx_tid = std::sync::atomic::AtomicI32::new(0);
    if let Some((_, w)) = pin() {
        pin_to(0, w);
    }
    std::thread::scope(|s| {
        let rx_tid = &rx_tid;
        let rx = s.spawn(move || {
            if let Some((r, _)) = pin() {
                pin_to(0, r);
            }
            rx_tid.store(
                nix::unistd::gettid().as_raw(),
                std::sync::atomic::Ordering::Relaxed,
            );
            let config = ReceiverConfig {
                key: bench_key(),
                ..ReceiverConfig::default()
            };
            let rx = Receiver::accept(&listener, &config).unwrap();
            rx.run(dest).unwrap()
        });
        let start = Instant::now();
        let main0 = task_times(main_tid).unwrap();
        let source: Box<dyn PageSource + Send> = if own {
            Box::new(OwnMemory::new([src.clone()]))
        } else {
            Box::new(ProcessMemory::current())
        };
        let mut tx = Sender::connect(conns, layout, source, config).unwrap();
        if let Some(w) = pin_writer() {
            for (tid, comm) in tasks(&[main_tid]) {
                if comm.starts_with("precopy-send") {
                    pin_to(tid, w);
                }
            }
        }
        let sent = tx.send_round(&[base..base + src.len()]).unwrap();
        let streamed = start.elapsed();
        // Every thread's times before the end of the transfer (the writer
        // and the receiver's socket thread end with it).
        let main1 = task_times(main_tid).unwrap();
        let skip = [main_tid, rx_tid.load(std::sync::atomic::Ordering::Relaxed)];
        let mut times = [TaskTimes::default(); 3];
        times[0] = TaskTimes {
            sched: main1.sched - main0.sched,
            switches: main1.switches - main0.switches,
            migrations: main1.migrations - main0.migrations,
            cpu: main1.cpu,
        };
        for (tid, comm) in tasks(&skip) {
            let Some(t) = task_times(tid) else { continue };
            let slot = if comm.starts_with("precopy-send") {
                1
            } else if comm.starts_with("precopy-") {
                continue;
            } else {
                2
            };
            times[slot].sched.cpu += t.sched.cpu;
            times[slot].sched.wait += t.sched.wait;
            times[slot].switches += t.switches;
            times[slot].migrations += t.migrations;
            times[slot].cpu = times[slot].cpu.or(t.cpu);
        }
        tx.finish(FinalCheck::Recorded).unwrap();
        let total = start.elapsed();
        rx.join().unwrap();
        (streamed, total, sent.bytes_on_wire, times)
    })
}

/// The ladder from `raw_splice` to the engine, one piece of the engine's
/// work added per step (see [`Step`]).
fn ladder_steps() -> Vec<(String, Step)> {
    let step = |read, hash, frames, pages| Step {
        read,
        hash,
        frames,
        pages,
        tx_hash: false,
    };
    let k64 = Some(64 << 10);
    vec![
        // raw_splice itself, with its threads' times.
        ("ladder_whole".into(), step(None, false, false, 64)),
        // raw_splice's receiver reading 64 KiB at a time.
        ("ladder_r64k".into(), step(k64, false, false, 64)),
        // ... and hashing each page as it arrives.
        ("ladder_r64k_hash".into(), step(k64, true, false, 64)),
        // ... and the sender hashing each piece before its splice (no frames).
        (
            "ladder_r64k_hash_txhash".into(),
            Step {
                tx_hash: true,
                ..step(k64, true, false, 64)
            },
        ),
        // Engine frames of 64 pages (header, pages, hash list), hashed at both
        // ends; the receiver reads a frame's pages 64 KiB at a time (the
        // engine's receiver before 2026-11-30 13:00 UTC).
        ("ladder_frames_r64k".into(), step(k64, true, true, 64)),
        // The same, each frame's pages asked for in one read (the engine's
        // receiver now: `HASH_AS_READ`).
        ("ladder_frames".into(), step(None, true, true, 64)),
        // Frames of 256 pages (1 MiB, a full pipe), read whole.
        ("ladder_frames256".into(), step(None, true, true, 256)),
    ]
}

/// What one transfer of any configuration needs.
struct Ctx<'a> {
    dir: &'a std::path::Path,
    map: &'a Arc<Mapping>,
    src: &'a [u8],
    raw_dest: &'a mut Vec<u8>,
    dest: &'a mut MemorySink,
}

/// The configurations (without the `/tcp` or `/unix` suffix) in the order
/// they run over `net`.
fn config_names(net: Net, full: bool) -> Vec<String> {
    let mut v: Vec<String> = vec!["raw".into(), "raw_splice".into()];
    v.extend(ladder_steps().into_iter().map(|(n, _)| n));
    if matches!(net, Net::Tcp) && netns().is_none() {
        v.push("raw_zerocopy".into());
    }
    v.extend(engine_configs(net, full).into_iter().map(|(n, _)| n));
    v
}

/// The engine's configurations over `net`: the sender's settings for each.
fn engine_configs(net: Net, full: bool) -> Vec<(String, SenderConfig)> {
    let base_config = SenderConfig {
        key: bench_key(),
        ..SenderConfig::default()
    };
    let with = |compression, streams| SenderConfig {
        compression,
        streams,
        ..base_config.clone()
    };
    let batch = |pages| SenderConfig {
        batch_pages: pages,
        ..base_config.clone()
    };
    let mut configs: Vec<(String, SenderConfig)> = vec![
        ("engine".into(), base_config.clone()),
        ("engine_2streams".into(), with(Compression::None, 2)),
        ("own".into(), base_config.clone()),
        (
            "own_splice".into(),
            SenderConfig {
                splice: true,
                ..base_config.clone()
            },
        ),
        ("own_2streams".into(), with(Compression::None, 2)),
        (
            "own_writev".into(),
            SenderConfig {
                splice: false,
                ..base_config.clone()
            },
        ),
    ];
    if full {
        for pages in [16usize, 256] {
            configs.push((format!("own_batch{pages}"), batch(pages)));
        }
    }
    if matches!(net, Net::Tcp) {
        // The sender's connection with BBR (a common system default) instead
        // of the loopback choice (`LOOPBACK_CONGESTION_CONTROL`); any
        // configuration's name with `_bbr` appended does the same.
        configs.push(("own_bbr".into(), base_config.clone()));
        configs.push(("engine_lz4".into(), with(Compression::Lz4, 1)));
        configs.push(("engine_zstd1".into(), with(Compression::Zstd(1), 1)));
        configs.push(("engine_2streams_lz4".into(), with(Compression::Lz4, 2)));
        if full {
            configs.push(("engine_zstd3".into(), with(Compression::Zstd(3), 1)));
            configs.push((
                "engine_2streams_zstd1".into(),
                with(Compression::Zstd(1), 2),
            ));
            for pages in [16usize, 256, 1024] {
                configs.push((format!("engine_batch{pages}"), batch(pages)));
            }
        }
    }
    configs
}

impl Ctx<'_> {
    /// One transfer of configuration `name` (`CONFIG/NET`), recorded; the
    /// time it took.
    fn run(&mut self, net: Net, name: &str) -> Duration {
        let (cname, _) = name.split_once('/').unwrap();
        *SENDER_CC.lock().unwrap() = cname.ends_with("_bbr").then_some("bbr");
        let cname = cname.trim_end_matches("_bbr");
        let (cname, queue) = match cname.rsplit_once("_q") {
            Some((c, n)) if n.parse::<usize>().is_ok() => (c, n.parse().ok()),
            _ => (cname, None),
        };
        let cpu = cpu_seconds();
        let d = match cname {
            "raw" => {
                let (d, tx, rx) = raw_copy(net, self.dir, self.map, self.raw_dest);
                record_threads(name, tx, rx);
                d
            }
            "raw_splice" => {
                self.raw_dest.fill(1);
                let cpu = cpu_seconds();
                let d = raw_splice(net, self.dir, self.map, self.raw_dest);
                record_cpu(name, cpu_seconds() - cpu);
                record(name, d);
                return d;
            }
            "raw_zerocopy" => {
                let (d, sends, copied) = raw_zerocopy(self.dir, self.map, self.raw_dest);
                ZEROCOPY.lock().unwrap().replace((sends, copied));
                d
            }
            _ if cname.starts_with("ladder_") => {
                let step = ladder_steps()
                    .into_iter()
                    .find(|(n, _)| n == cname)
                    .unwrap()
                    .1;
                self.raw_dest.fill(1);
                let cpu = cpu_seconds();
                let (d, tx, rx) = ladder(net, self.dir, self.map, self.raw_dest, step);
                record_cpu(name, cpu_seconds() - cpu);
                record(name, d);
                record_threads(name, tx, rx);
                return d;
            }
            _ => {
                let config = engine_configs(net, true)
                    .into_iter()
                    .find(|(n, _)| n == cname)
                    .unwrap_or_else(|| panic!("no configuration {cname}"))
                    .1;
                let config = SenderConfig {
                    queue_depth: queue.unwrap_or(config.queue_depth),
                    ..config
                };
                // A fresh destination, as a migration's is.
                self.dest.clear().expect("clearing destination memory");
                let cpu = cpu_seconds();
                let own = cname.starts_with("own");
                let (streamed, done, wire, times) =
                    engine_copy(net, self.dir, self.map, own, self.dest, &config);
                ENGINE_THREADS
                    .lock()
                    .unwrap()
                    .entry(name.to_owned())
                    .or_default()
                    .push(times);
                record_cpu(name, cpu_seconds() - cpu);
                record(name, streamed);
                record(&format!("{name} (to DONE)"), done);
                WIRE.lock()
                    .unwrap()
                    .insert(name.to_owned(), wire as f64 / self.src.len() as f64);
                return streamed;
            }
        };
        record_cpu(name, cpu_seconds() - cpu);
        record(name, d);
        d
    }

    /// Checks that the last transfer of `name` delivered the source.
    fn check(&self, name: &str) {
        if name.starts_with("raw") || name.starts_with("ladder_") {
            assert!(
                self.raw_dest[..] == self.src[..],
                "{name}: destination differs"
            );
        } else {
            assert!(
                self.dest.memory() == Some(self.src),
                "{name}: destination differs"
            );
        }
    }
}

/// `PRECOPY_BENCH_INTERLEAVE=N:NAME,NAME,..` (names as `own/tcp`): runs
/// the named configurations in turn, one transfer each, N times, so that
/// every configuration sees the same moments of a shared machine's load;
/// the first name is the baseline of the paired ratios printed at the end.
fn interleave(spec: &str, ctx: &mut Ctx<'_>) {
    let (n, names) = spec
        .split_once(':')
        .expect("PRECOPY_BENCH_INTERLEAVE=N:NAME,..");
    let n: usize = n.parse().expect("a count");
    let names: Vec<&str> = names.split(',').collect();
    let net = |name: &str| {
        if name.ends_with("/unix") {
            Net::Unix
        } else {
            Net::Tcp
        }
    };
    // One warm-up transfer each.
    for name in &names {
        ctx.run(net(name), name);
        ctx.check(name);
    }
    TIMES.lock().unwrap().clear();
    CPU.lock().unwrap().clear();
    THREADS.lock().unwrap().clear();
    ENGINE_THREADS.lock().unwrap().clear();
    for _ in 0..n {
        for name in &names {
            ctx.run(net(name), name);
            ctx.check(name);
        }
    }
    let times = TIMES.lock().unwrap();
    let cpu = CPU.lock().unwrap();
    let base = names[0];
    println!(
        "\ninterleaved, {n} rounds: per-round ratios against {base} (median, min-max); CPU s/GiB median"
    );
    for name in &names {
        let ratio: Vec<f64> = (0..n).map(|i| times[base][i] / times[*name][i]).collect();
        let cratio: Vec<f64> = (0..n).map(|i| cpu[*name][i] / cpu[base][i]).collect();
        let mn = ratio.iter().copied().fold(f64::MAX, f64::min);
        let mx = ratio.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<32} speed {:.2}x ({:.2}-{:.2})  CPU {:.2} s/GiB, {:.2}x",
            name,
            median(&ratio),
            mn,
            mx,
            median(&cpu[*name]) * (1 << 30) as f64 / ctx.src.len() as f64,
            median(&cratio)
        );
    }
    let threads = ENGINE_THREADS.lock().unwrap();
    if !threads.is_empty() {
        println!(
            "engine threads, medians per transfer: CPU / waiting for a CPU s/GiB, switches, migrations"
        );
    }
    let per_gib = (1 << 30) as f64 / ctx.src.len() as f64;
    for (name, v) in threads.iter() {
        let m = |f: &dyn Fn(&[TaskTimes; 3]) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        let mut line = format!("{name:<32}");
        for (i, role) in ["sending", "writer", "receiving"].iter().enumerate() {
            line += &format!(
                "  {role} {:.3} / {:.3}, {:.0} sw, {:.0} mig",
                m(&|x| x[i].sched.cpu) * per_gib,
                m(&|x| x[i].sched.wait) * per_gib,
                m(&|x| x[i].switches),
                m(&|x| x[i].migrations)
            );
        }
        println!("{line}");
        // Transfers grouped by where the three threads last ran when the
        // round was sent (sending, writer, receiving: CPU numbers).
        let cpu_per_gib = &cpu[name.as_str()];
        let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (t, c) in v.iter().zip(cpu_per_gib) {
            let at = |i: usize| t[i].cpu.map_or("?".into(), |c| c.to_string());
            by.entry(format!("{}{}{}", at(0), at(1), at(2)))
                .or_default()
                .push(c * per_gib);
        }
        let groups: Vec<String> = by
            .iter()
            .map(|(k, c)| format!("{k}: {} at {:.2}", c.len(), median(c)))
            .collect();
        println!(
            "{:<32}  by CPUs of sending/writer/receiving: transfers at median CPU s/GiB: {}",
            "",
            groups.join(", ")
        );
    }
}

/// Whether the bench `name` ran (a filter on the command line skips some).
fn ran(name: &str) -> bool {
    TIMES.lock().unwrap().contains_key(name)
}

fn thp() -> bool {
    std::env::var_os("PRECOPY_BENCH_THP").is_some()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mib: usize = std::env::var("PRECOPY_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let full = std::env::var_os("PRECOPY_BENCH_FULL").is_some();
    let bytes = mib << 20;
    let dir = tempfile::tempdir().unwrap();
    let (map, src) = source_memory(bytes);
    let base = map.addr();
    let layout = Layout::single(PS, base, bytes as u64).unwrap();
    let mut dest = MemorySink::new(layout).unwrap();
    if thp() {
        // Before the first `clear` faults the sink's memory in.
        let m = dest.memory().unwrap();
        precopy_sys::mem::set_thp(m.as_ptr() as u64, m.len() as u64, true).unwrap();
    }
    let mut raw_dest: Vec<u8> = Vec::with_capacity(bytes);
    if thp() {
        let a = raw_dest.as_ptr() as u64;
        let start = (a + (2 << 20) - 1) & !((2 << 20) - 1);
        let end = (a + bytes as u64) & !((2 << 20) - 1);
        precopy_sys::mem::set_thp(start, end - start, true).unwrap();
    }
    raw_dest.resize(bytes, 1);

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut g = c.benchmark_group(format!("stream_{mib}MiB"));
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(bytes as u64));

    let nets: &[(Net, &str)] = if netns().is_some() {
        &[(Net::Tcp, "tcp")]
    } else {
        &[(Net::Tcp, "tcp"), (Net::Unix, "unix")]
    };
    let mut ctx = Ctx {
        dir: dir.path(),
        map: &map,
        src: &src,
        raw_dest: &mut raw_dest,
        dest: &mut dest,
    };
    if let Ok(spec) = std::env::var("PRECOPY_BENCH_INTERLEAVE") {
        interleave(&spec, &mut ctx);
    } else {
        for &(net, nname) in nets {
            for cname in config_names(net, full) {
                let name = format!("{cname}/{nname}");
                g.bench_function(&name, |b| {
                    b.iter_custom(|iters| (0..iters).map(|_| ctx.run(net, &name)).sum())
                });
                if ran(&name) {
                    ctx.check(&name);
                }
            }
        }
    }
    g.finish();

    // Where an engine byte's CPU goes, for reading the ratios: the per-byte
    // steps the engine adds to a raw copy, each over the same memory.
    let step = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        mib as f64 / t.elapsed().as_secs_f64()
    };
    let mut digest = MemoryDigest::new();
    let crc_speed = step(&mut || digest.push_pages(&src, PS as usize).unwrap());
    let copy_speed = step(&mut || raw_dest.copy_from_slice(&src));
    let mut pm = ProcessMemory::current();
    let chunk = 64 * PS as usize;
    let readv_speed = step(&mut || {
        for (i, out) in raw_dest.chunks_mut(chunk).enumerate() {
            let a = base + (i * chunk) as u64;
            pm.read_ranges(&[a..a + out.len() as u64], out).unwrap();
        }
    });
    let engine_ran = TIMES.lock().unwrap().keys().any(|k| !k.starts_with("raw"));
    assert!(!engine_ran || digest.finish() == dest.checksum().unwrap());

    let times = TIMES.lock().unwrap();
    if let Some((sends, copied)) = *ZEROCOPY.lock().unwrap() {
        println!(
            "\nMSG_ZEROCOPY (raw_zerocopy/tcp): the kernel reported {copied} of {sends} sends copied anyway"
        );
    }
    println!(
        "\nper-byte steps (MiB/s, one core): page hash (XXH3-64) {crc_speed:.0}, memcpy {copy_speed:.0}, process_vm_readv (256 KiB) {readv_speed:.0}"
    );
    println!("\nprecopy-transfer stream bench: {mib} MiB per transfer, median of samples");
    let cpu = CPU.lock().unwrap();
    println!(
        "(CPU: user + system seconds per GiB, all threads of sender and receiver; this machine has {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<40} {:>9} {:>10} {:>8} {:>9} {:>10} {:>5}",
        "config", "seconds", "MiB/s", "vs raw", "CPU s/GiB", "CPU vs raw", "wire"
    );
    let wire = WIRE.lock().unwrap();
    if let Some((name, addr)) = netns() {
        println!("(TCP across namespace {name}, receivers on {addr}: see scripts/bench-netns.sh)");
    }
    for &(_, nname) in nets {
        // A filtered run (`-- 'own/tcp|raw/tcp'`) may lack a baseline.
        let (Some(raw), Some(raw_cpu)) = (
            times.get(&format!("raw/{nname}")).map(|t| median(t)),
            cpu.get(&format!("raw/{nname}")).map(|c| median(c)),
        ) else {
            continue;
        };
        for (name, samples) in times
            .iter()
            .filter(|(k, _)| k.contains(&format!("/{nname}")))
        {
            let t = median(samples);
            let c = cpu.get(name).map_or(String::from("-"), |c| {
                format!("{:.2}", median(c) * 1024.0 / mib as f64)
            });
            let cr = cpu.get(name).map_or(String::from("-"), |c| {
                format!("{:.2}x", median(c) / raw_cpu)
            });
            let w = wire
                .get(name)
                .map_or(String::from("-"), |w| format!("{w:.2}"));
            println!(
                "{:<40} {:>9.3} {:>10.0} {:>7.2}x {:>9} {:>10} {:>5}",
                name,
                t,
                mib as f64 / t,
                raw / t,
                c,
                cr,
                w
            );
        }
    }
    let threads = THREADS.lock().unwrap();
    if !threads.is_empty() {
        println!(
            "\nladder and raw threads, s/GiB (medians): wall, then per thread CPU / waiting for a CPU / blocked (wall - the two)"
        );
        for (name, v) in threads.iter() {
            let per_gib = 1024.0 / mib as f64;
            let t = median(&times[name]);
            let m = |f: &dyn Fn(&(Sched, Sched)) -> f64| {
                median(&v.iter().map(f).collect::<Vec<_>>()) * per_gib
            };
            let (tc, tw, rc, rw) = (
                m(&|x| x.0.cpu),
                m(&|x| x.0.wait),
                m(&|x| x.1.cpu),
                m(&|x| x.1.wait),
            );
            let w = t * per_gib;
            println!(
                "{:<32} wall {:.3}  send {:.3} / {:.3} / {:.3}  receive {:.3} / {:.3} / {:.3}",
                name,
                w,
                tc,
                tw,
                w - tc - tw,
                rc,
                rw,
                w - rc - rw
            );
        }
    }
}
