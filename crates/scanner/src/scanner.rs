//! The round driver: walks every tracked range, optionally on several threads or under a page
//! budget, and assembles one [`Round`].

use crate::round::Round;
use crate::worker::{SpanEnd, Worker};
use crate::{Error, Result};
use precopy_sys::ranges::push_merged;
use precopy_tracker::Tracker;
use std::ops::Range;
use std::time::Instant;

/// Scanner settings.
#[derive(Debug, Clone, Copy)]
pub struct ScanOptions {
    /// At most this many pages per round (rounded up to one huge page on hugetlb); the next
    /// round resumes where this one stopped. `None`: no limit.
    pub max_pages: Option<u64>,
    /// Output regions per `PAGEMAP_SCAN` call. The kernel copies out in chunks of 512 anyway;
    /// 4096 keeps the call count low when writes are scattered.
    pub vec_len: usize,
    /// Threads a round is split across (by address). Needs `max_pages == None` when above 1.
    pub threads: usize,
    /// Run the kernel self-test before the first round and refuse an untrustworthy kernel.
    pub verify_kernel: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            max_pages: None,
            vec_len: 4096,
            threads: 1,
            verify_kernel: true,
        }
    }
}

/// Largest [`ScanOptions::vec_len`]: 24 MiB of output buffer per thread.
const MAX_VEC_LEN: usize = 1 << 20;
/// Most [`ScanOptions::threads`].
const MAX_THREADS: usize = 256;

/// Runs rounds over a [`Tracker`]'s ranges, reusing its buffers from round to round.
#[derive(Debug)]
pub struct Scanner {
    opts: ScanOptions,
    workers: Vec<Worker>,
    round: Round,
    /// Where a budget-limited round stopped; the next one starts here.
    cursor: u64,
    spans: Vec<Vec<(Range<u64>, u64)>>,
}

impl Scanner {
    /// A scanner with `opts`. With `opts.verify_kernel` (the default) this runs the kernel
    /// self-test once per process and fails if the kernel cannot be trusted.
    pub fn new(opts: ScanOptions) -> Result<Scanner> {
        if opts.vec_len == 0 {
            return Err(Error::InvalidOptions("vec_len must be at least 1"));
        }
        if opts.vec_len > MAX_VEC_LEN {
            return Err(Error::InvalidOptions(
                "vec_len must be at most 1 << 20 (the kernel copies out 512 regions at a time)",
            ));
        }
        if opts.threads == 0 {
            return Err(Error::InvalidOptions("threads must be at least 1"));
        }
        if opts.threads > MAX_THREADS {
            return Err(Error::InvalidOptions("threads must be at most 256"));
        }
        if opts.threads > 1 && opts.max_pages.is_some() {
            return Err(Error::InvalidOptions(
                "a page budget (max_pages) needs threads = 1",
            ));
        }
        if opts.max_pages == Some(0) {
            return Err(Error::InvalidOptions("max_pages must be at least 1"));
        }
        if opts.verify_kernel {
            crate::kernel::verify()?;
        }
        let page = precopy_sys::page_size();
        Ok(Scanner {
            opts,
            workers: (0..opts.threads)
                .map(|_| Worker::new(opts.vec_len, page))
                .collect(),
            round: Round::default(),
            cursor: 0,
            spans: vec![Vec::new(); opts.threads],
        })
    }

    /// The options.
    pub fn options(&self) -> &ScanOptions {
        &self.opts
    }

    /// The last round's result.
    pub fn last(&self) -> &Round {
        &self.round
    }

    /// Returns every page written since the previous round (or since arming) and write-protects
    /// it again, plus the parts of tracked ranges that are no longer tracked.
    ///
    /// Read the reported pages' contents only after this returns.
    pub fn round(&mut self, tracker: &Tracker) -> Result<&Round> {
        let started = Instant::now();
        self.round.reset(tracker.page_size());
        for w in &mut self.workers {
            w.reset();
        }
        if self.workers.len() == 1 {
            self.round_single(tracker)?;
        } else {
            self.round_parallel(tracker)?;
        }
        for w in &mut self.workers {
            w.finish();
        }
        let round = &mut self.round;
        if let [w] = self.workers.as_mut_slice() {
            // One worker: its output is already sorted and coalesced. Hand its vectors over
            // (the round's cleared ones go back to it) instead of copying every region.
            std::mem::swap(&mut round.dirty, &mut w.dirty);
            std::mem::swap(&mut round.untracked, &mut w.untracked);
            round.stats.pages = w.pages;
            round.stats.ioctls = w.ioctls;
        } else {
            for w in &self.workers {
                for r in &w.dirty {
                    push_merged(&mut round.dirty, 0, r.clone());
                }
                round.untracked.extend(w.untracked.iter().cloned());
                round.stats.pages += w.pages;
                round.stats.ioctls += w.ioctls;
            }
        }
        round.untracked.sort_by_key(|u| u.range.start);
        round.stats.regions = round.dirty.len() as u64;
        round.stats.untracked_bytes = round
            .untracked
            .iter()
            .map(|u| u.range.end - u.range.start)
            .sum();
        round.stats.duration = started.elapsed();
        Ok(&self.round)
    }

    fn round_single(&mut self, tracker: &Tracker) -> Result<()> {
        let mut budget = self.opts.max_pages;
        let worker = &mut self.workers[0];
        let start_at = self.cursor;
        for r in tracker.ranges() {
            if r.end <= start_at {
                continue;
            }
            let span = r.start.max(start_at)..r.end;
            if let SpanEnd::BudgetAt(at) =
                worker.scan_span(tracker, span, r.granule, &mut budget)?
            {
                self.cursor = at;
                return Ok(());
            }
        }
        self.cursor = 0;
        self.round.complete = true;
        Ok(())
    }

    fn round_parallel(&mut self, tracker: &Tracker) -> Result<()> {
        // Split the tracked bytes into equal shares, cutting ranges at granule boundaries.
        let n = self.workers.len() as u64;
        let total = tracker.tracked_bytes();
        let share = total.div_ceil(n);
        for s in &mut self.spans {
            s.clear();
        }
        let mut idx = 0usize;
        let mut filled = 0u64;
        for r in tracker.ranges() {
            let mut start = r.start;
            while start < r.end {
                let room = share.saturating_sub(filled).max(r.granule);
                let mut end = (start + room).min(r.end);
                end = end.next_multiple_of(r.granule).min(r.end);
                self.spans[idx].push((start..end, r.granule));
                filled += end - start;
                start = end;
                if filled >= share && idx + 1 < self.spans.len() {
                    idx += 1;
                    filled = 0;
                }
            }
        }
        let scan = |w: &mut Worker, spans: &[(Range<u64>, u64)]| -> Result<()> {
            let mut budget = None;
            for (span, granule) in spans {
                w.scan_span(tracker, span.clone(), *granule, &mut budget)?;
            }
            Ok(())
        };
        let Some((first, rest)) = self.workers.split_first_mut() else {
            return Err(Error::InvalidOptions("threads must be at least 1"));
        };
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            // The calling thread takes the first share: one thread fewer to start per round.
            let handles: Vec<_> = rest
                .iter_mut()
                .zip(&self.spans[1..])
                .map(|(w, spans)| scope.spawn(move || scan(w, spans)))
                .collect();
            let mut results = vec![scan(first, &self.spans[0])];
            results.extend(handles.into_iter().map(|h| {
                h.join()
                    .unwrap_or(Err(Error::InvalidOptions("scan thread panicked")))
            }));
            results
        });
        results.into_iter().collect::<Result<()>>()?;
        self.round.complete = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(opts: ScanOptions) -> Error {
        let opts = ScanOptions {
            // The self-test is not what these cases are about.
            verify_kernel: false,
            ..opts
        };
        Scanner::new(opts).expect_err("options must be refused")
    }

    #[test]
    fn new_refuses_zero_or_huge_vec_len() {
        for vec_len in [0, MAX_VEC_LEN + 1, usize::MAX] {
            let err = refused(ScanOptions {
                vec_len,
                ..ScanOptions::default()
            });
            assert!(
                matches!(err, Error::InvalidOptions(m) if m.contains("vec_len")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn new_refuses_zero_or_huge_thread_counts() {
        for threads in [0, MAX_THREADS + 1, usize::MAX] {
            let err = refused(ScanOptions {
                threads,
                ..ScanOptions::default()
            });
            assert!(
                matches!(err, Error::InvalidOptions(m) if m.contains("threads")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn new_refuses_a_zero_page_budget() {
        let err = refused(ScanOptions {
            max_pages: Some(0),
            ..ScanOptions::default()
        });
        assert!(
            matches!(err, Error::InvalidOptions(m) if m.contains("max_pages")),
            "{err:?}"
        );
    }
}
