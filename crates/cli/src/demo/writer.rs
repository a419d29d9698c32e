//! The demo source's writers: threads that dirty pages of a region at a set rate and pattern.
//!
//! Pacing is by wall clock without catching up: a writer that was stopped or throttled skips the
//! writes it missed (beyond a 10 ms burst), so throttling really lowers the dirty rate.

use precopy_sys::mem::Mapping;
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, Release},
};
use std::time::{Duration, Instant};

/// Which pages the writers hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Any page, uniformly at random.
    Uniform,
    /// 90% of writes into a hot set at the start of memory (`--hot-set`), 10% anywhere.
    HotSet,
    /// Each thread sweeps its own slice of memory page after page, wrapping around.
    Sequential,
}

/// One writer's settings.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Pages in the region.
    pub pages: u64,
    /// Pages written per second by this thread (0: none).
    pub pages_per_sec: f64,
    /// Pattern.
    pub pattern: Pattern,
    /// Pages in the hot set.
    pub hot_pages: u64,
    /// This thread's index and the number of threads.
    pub index: u64,
    /// Number of threads.
    pub threads: u64,
}

/// What the writers did, read by the driver from outside with `process_vm_readv` (the layout
/// `ProcessControl::with_counters` expects: operations, then busy nanoseconds).
#[derive(Debug, Default)]
#[repr(C)]
pub struct Counters {
    /// Page writes done.
    pub operations: AtomicU64,
    /// Nanoseconds spent doing them (write-protect faults included), all threads.
    pub busy_ns: AtomicU64,
}

/// One writer's "registers": its last completed write. The source's writers keep these side by
/// side; the migration reads them while the source is stopped and sends them as the state blob,
/// and the destination checks them against the memory it received ([`check_state`]).
#[derive(Debug, Default)]
#[repr(C)]
pub struct LastWrite {
    /// Writes this writer completed (the sequence number of its last one; 0: none yet).
    pub seq: AtomicU64,
    /// Offset in the region of the word that write stored [`value`]`(index, seq)` in.
    pub offset: AtomicU64,
}

/// Bytes of one [`LastWrite`] in the state blob (`seq`, then `offset`, native-endian u64s).
pub const LAST_WRITE_BYTES: usize = 16;
const _: () = assert!(std::mem::size_of::<LastWrite>() == LAST_WRITE_BYTES);

/// Most writer threads: each writer owns every `threads`-th 8-byte word of a page, so no
/// writer overwrites another's last write.
pub const MAX_THREADS: u64 = PAGE / 8;

/// What writer `index` stores in its write number `seq`.
pub fn value(index: u64, seq: u64) -> u64 {
    (index << 48) | seq
}

/// One writer's record, decoded from the state blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WriterState {
    /// Writes completed.
    pub writes: u64,
    /// Offset of the last one.
    pub last_offset: u64,
}

/// Decodes the state blob: one [`LastWrite`] per writer, in writer order.
pub fn decode_state(blob: &[u8]) -> Result<Vec<WriterState>, String> {
    if blob.is_empty() || !blob.len().is_multiple_of(LAST_WRITE_BYTES) {
        return Err(format!(
            "{} bytes is not a whole number of {LAST_WRITE_BYTES}-byte writer records",
            blob.len()
        ));
    }
    Ok(blob
        .chunks_exact(LAST_WRITE_BYTES)
        .map(|r| {
            let (seq, offset) = r.split_at(8);
            WriterState {
                writes: u64::from_ne_bytes(seq.try_into().expect("8 bytes")),
                last_offset: u64::from_ne_bytes(offset.try_into().expect("8 bytes")),
            }
        })
        .collect())
}

/// Checks the writers' state against the memory that arrived with it: each writer's last
/// completed write must be in memory (`read_word(offset)`). A writer stopped between its write
/// and the update of its record has one more write in memory than its record says, so that
/// word may also hold the writer's next value when the next write hit the same word.
pub fn check_state(
    writers: &[WriterState],
    mut read_word: impl FnMut(u64) -> Option<u64>,
) -> Result<(), String> {
    for (index, w) in writers.iter().enumerate() {
        if w.writes == 0 {
            continue;
        }
        let index = index as u64;
        let found = read_word(w.last_offset).ok_or_else(|| {
            format!(
                "writer {index}: offset {:#x} is outside memory",
                w.last_offset
            )
        })?;
        if found != value(index, w.writes) && found != value(index, w.writes + 1) {
            return Err(format!(
                "writer {index}: its last write ({} at offset {:#x}) is not in memory, which holds {found:#x}",
                value(index, w.writes),
                w.last_offset
            ));
        }
    }
    Ok(())
}

const PAGE: u64 = 4096;
const BURST: f64 = 0.010;

/// Writes forever; `last` is this writer's record of its last write.
pub fn run(mem: Arc<Mapping>, cfg: WriterConfig, counters: &Counters, last: &LastWrite) {
    if cfg.pages_per_sec <= 0.0 || cfg.pages == 0 {
        return;
    }
    let mut rng = rand::rng();
    let slice = (cfg.pages / cfg.threads).max(1);
    let mut cursor = (cfg.index * slice) % cfg.pages;
    let mut seq: u64 = 0;
    let start = Instant::now();
    let mut done = 0.0f64;
    loop {
        let due = start.elapsed().as_secs_f64() * cfg.pages_per_sec;
        done = done.max(due - BURST * cfg.pages_per_sec);
        let burst = Instant::now();
        let mut ops = 0;
        while done < due {
            let page = match cfg.pattern {
                Pattern::Uniform => rng.random_range(0..cfg.pages),
                Pattern::HotSet if rng.random_ratio(9, 10) => rng.random_range(0..cfg.hot_pages),
                Pattern::HotSet => rng.random_range(0..cfg.pages),
                Pattern::Sequential => {
                    cursor = (cursor + 1) % cfg.pages;
                    cursor
                }
            };
            seq += 1;
            // A fresh value in a different word of the page each time, among this writer's
            // own words (every `threads`-th).
            let words = (PAGE / 8 / cfg.threads).max(1);
            let offset = page * PAGE + ((seq % words) * cfg.threads + cfg.index) * 8;
            if mem.write_u64(offset, value(cfg.index, seq)).is_err() {
                return;
            }
            // Offset first: a record read between the two stores names the new word with the
            // old count, which `check_state` accepts (one write ahead), never the reverse.
            last.offset.store(offset, Release);
            last.seq.store(seq, Release);
            done += 1.0;
            ops += 1;
        }
        if ops > 0 {
            counters.operations.fetch_add(ops, Relaxed);
            counters
                .busy_ns
                .fetch_add(burst.elapsed().as_nanos() as u64, Relaxed);
        }
        // Wake when the next write is due, not every millisecond whatever the rate: many
        // slow writers must not load the CPUs the migration needs.
        let next = (1.0 / cfg.pages_per_sec).clamp(0.001, 0.1);
        std::thread::sleep(Duration::from_secs_f64(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(records: &[(u64, u64)]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|&(seq, off)| [seq.to_ne_bytes(), off.to_ne_bytes()].concat())
            .collect()
    }

    #[test]
    fn state_is_checked_against_memory() {
        let writers = decode_state(&blob(&[(5, 8), (0, 0), (9, 24)])).unwrap();
        assert_eq!(
            writers[0],
            WriterState {
                writes: 5,
                last_offset: 8
            }
        );
        let mut mem = [0u64; 4];
        mem[1] = value(0, 5);
        mem[3] = value(2, 10); // writer 2 was stopped between its write 10 and its record
        let read = |mem: [u64; 4]| move |off: u64| mem.get(off as usize / 8).copied();
        check_state(&writers, read(mem)).unwrap();
        // Another writer's value, an older value, or an offset outside memory: refused.
        for (word, v) in [(1, value(1, 5)), (1, value(0, 4)), (3, value(2, 11))] {
            let mut bad = mem;
            bad[word] = v;
            assert!(check_state(&writers, read(bad)).is_err(), "{word} {v:#x}");
        }
        let far = decode_state(&blob(&[(1, 4096)])).unwrap();
        assert!(
            check_state(&far, read(mem))
                .unwrap_err()
                .contains("outside")
        );
        assert!(decode_state(&[0u8; 17]).is_err());
        assert!(decode_state(&[]).is_err());
    }
}
