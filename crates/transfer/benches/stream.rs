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
//! VMM's guest RAM: by default `vmsplice` + `splice`, `own_writev` by
//! `writev`). The raw copy `writev`s the same mapping; `raw_splice` sends it
//! with `vmsplice` + `splice` (no copy at the sender, the kernel's best) and
//! `raw_zerocopy` with `MSG_ZEROCOPY`. The receiver
//! applies into a [`MemorySink`], cleared to
//! zeros before each transfer like a migration's fresh destination; both the
//! raw and the engine receivers write into a destination already faulted in,
//! so page-fault cost is not counted for either. Besides time, each transfer's
//! CPU time (user + system, all threads of both ends) is recorded: on a
//! machine with few cores it, not the socket, bounds the ratio. Each page is half random bytes,
//! half a repeated word, so compression has something (about 2:1) to find.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
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
    let m = Mapping::anonymous(bytes as u64).unwrap();
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

fn pair(net: Net, dir: &std::path::Path, streams: usize) -> (Listener, Vec<Connection>) {
    match net {
        Net::Tcp => {
            let l = tcp_listener();
            let Listener::Tcp(t) = &l else { unreachable!() };
            let addr = t.local_addr().unwrap();
            let conns = (0..streams)
                .map(|_| Connection::connect_tcp(addr).unwrap())
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
fn raw_copy(net: Net, dir: &std::path::Path, src: &Arc<Mapping>, dest: &mut [u8]) -> Duration {
    use std::os::fd::AsFd;
    let (listener, mut conns) = pair(net, dir, 1);
    let conn = conns.pop().unwrap();
    let mut peer = listener.accept().unwrap();
    let all = LivePages::new(src.clone(), src.range()).unwrap();
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let piece = 64 * PS;
            let mut at = 0;
            while at < all.len() {
                let end = all.len().min(at + piece);
                let part = all.slice(at..end).unwrap();
                write_all_gather(conn.as_fd(), &[Gather::Live(&part)]).unwrap();
                at = end;
            }
        });
        peer.read_exact(dest).unwrap();
    });
    start.elapsed()
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
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
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
) -> (Duration, Duration, u64) {
    let (listener, conns) = pair(net, dir, config.streams);
    let base = src.addr();
    let layout = Layout::single(PS, base, src.len()).unwrap();
    std::thread::scope(|s| {
        let rx = s.spawn(move || {
            let config = ReceiverConfig {
                key: bench_key(),
                ..ReceiverConfig::default()
            };
            let rx = Receiver::accept(&listener, &config).unwrap();
            rx.run(dest).unwrap()
        });
        let start = Instant::now();
        let source: Box<dyn PageSource + Send> = if own {
            Box::new(OwnMemory::new([src.clone()]))
        } else {
            Box::new(ProcessMemory::current())
        };
        let mut tx = Sender::connect(conns, layout, source, config).unwrap();
        let sent = tx.send_round(&[base..base + src.len()]).unwrap();
        let streamed = start.elapsed();
        tx.finish(FinalCheck::Recorded).unwrap();
        let total = start.elapsed();
        rx.join().unwrap();
        (streamed, total, sent.bytes_on_wire)
    })
}

/// Whether the bench `name` ran (a filter on the command line skips some).
fn ran(name: &str) -> bool {
    TIMES.lock().unwrap().contains_key(name)
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
    let mut raw_dest = vec![1u8; bytes];

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
    for &(net, nname) in nets {
        let name = format!("raw/{nname}");
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let cpu = cpu_seconds();
                    let d = raw_copy(net, dir.path(), &map, &mut raw_dest);
                    record_cpu(&name, cpu_seconds() - cpu);
                    record(&name, d);
                    total += d;
                }
                total
            })
        });
        assert!(!ran(&name) || raw_dest[..] == src[..]);
        let name = format!("raw_splice/{nname}");
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    raw_dest.fill(1);
                    let cpu = cpu_seconds();
                    let d = raw_splice(net, dir.path(), &map, &mut raw_dest);
                    record_cpu(&name, cpu_seconds() - cpu);
                    record(&name, d);
                    total += d;
                }
                total
            })
        });
        assert!(!ran(&name) || raw_dest[..] == src[..]);
        if matches!(net, Net::Tcp) && netns().is_none() {
            let name = "raw_zerocopy/tcp".to_string();
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let cpu = cpu_seconds();
                        let (d, sends, copied) = raw_zerocopy(dir.path(), &map, &mut raw_dest);
                        record_cpu(&name, cpu_seconds() - cpu);
                        record(&name, d);
                        ZEROCOPY.lock().unwrap().replace((sends, copied));
                        total += d;
                    }
                    total
                })
            });
            assert!(!ran(&name) || raw_dest[..] == src[..]);
        }
        let base_config = SenderConfig {
            key: bench_key(),
            ..SenderConfig::default()
        };
        let with = |compression, streams| SenderConfig {
            compression,
            streams,
            ..base_config.clone()
        };
        let mut configs: Vec<(String, SenderConfig)> = vec![
            ("engine".into(), base_config.clone()),
            ("engine_2streams".into(), with(Compression::None, 2)),
            ("own".into(), base_config.clone()),
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
            for batch in [16usize, 256] {
                configs.push((
                    format!("own_batch{batch}"),
                    SenderConfig {
                        batch_pages: batch,
                        ..base_config.clone()
                    },
                ));
            }
        }
        if matches!(net, Net::Tcp) {
            configs.push(("engine_lz4".into(), with(Compression::Lz4, 1)));
            configs.push(("engine_zstd1".into(), with(Compression::Zstd(1), 1)));
            configs.push(("engine_2streams_lz4".into(), with(Compression::Lz4, 2)));
            if full {
                configs.push(("engine_zstd3".into(), with(Compression::Zstd(3), 1)));
                configs.push((
                    "engine_2streams_zstd1".into(),
                    with(Compression::Zstd(1), 2),
                ));
                for batch in [16usize, 256, 1024] {
                    configs.push((
                        format!("engine_batch{batch}"),
                        SenderConfig {
                            batch_pages: batch,
                            ..base_config.clone()
                        },
                    ));
                }
            }
        }
        for (cname, config) in configs {
            let name = format!("{cname}/{nname}");
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // A fresh destination, as a migration's is.
                        dest.clear().expect("clearing destination memory");
                        let cpu = cpu_seconds();
                        let own = cname.starts_with("own");
                        let (streamed, done, wire) =
                            engine_copy(net, dir.path(), &map, own, &mut dest, &config);
                        record_cpu(&name, cpu_seconds() - cpu);
                        record(&name, streamed);
                        record(&format!("{name} (to DONE)"), done);
                        WIRE.lock()
                            .unwrap()
                            .insert(name.clone(), wire as f64 / bytes as f64);
                        total += streamed;
                    }
                    total
                })
            });
            assert!(
                !ran(&name) || dest.memory() == Some(&src[..]),
                "{name}: destination differs"
            );
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
}
