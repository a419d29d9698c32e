//! Address ranges as every layer hands them around: half-open `start..end` byte ranges, sorted
//! and merged where they overlap or touch. The one place that merges them (the scanner's rounds,
//! a dirty log's collection, the migration driver's pending list, an attached process's layout,
//! a transfer round's pieces all call these), so "coalesced" means the same everywhere.
//!
//! Plain arithmetic, no system call: it lives here, the lowest crate, because every layer above
//! needs it.

use std::ops::Range;

/// Sorts `ranges` by start and merges the ones that overlap or touch, in place; returns the
/// bytes they cover. Empty ranges merge into a neighbour or stay as they are.
pub fn coalesce(ranges: &mut Vec<Range<u64>>) -> u64 {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut kept = 0;
    for i in 0..ranges.len() {
        let r = ranges[i].clone();
        if kept > 0 && r.start <= ranges[kept - 1].end {
            ranges[kept - 1].end = ranges[kept - 1].end.max(r.end);
        } else {
            ranges[kept] = r;
            kept += 1;
        }
    }
    ranges.truncate(kept);
    ranges.iter().map(|r| r.end - r.start).sum()
}

/// Appends `r` to `ranges` (sorted, `r` starting at or after the last start), merging it into the
/// last range when they overlap or touch, but never into one before index `from` (a caller that
/// appends to a list it does not own the front of).
pub fn push_merged(ranges: &mut Vec<Range<u64>>, from: usize, r: Range<u64>) {
    if ranges.len() > from
        && let Some(last) = ranges.last_mut()
        && last.start <= r.start
        && r.start <= last.end
    {
        last.end = last.end.max(r.end);
        return;
    }
    ranges.push(r);
}

/// `a` minus every range of `b` (sorted by start; overlaps allowed): the parts of `a` that no
/// range of `b` covers, in order.
pub fn subtract(a: Range<u64>, b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut cur = a.start;
    for r in b {
        if r.end <= cur || r.start >= a.end {
            continue;
        }
        if r.start > cur {
            out.push(cur..r.start);
        }
        cur = cur.max(r.end);
    }
    if cur < a.end {
        out.push(cur..a.end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_leaves_the_parts_outside() {
        assert_eq!(
            subtract(0..100, &[10..20, 30..40]),
            vec![0..10, 20..30, 40..100]
        );
        assert!(subtract(15..18, &[10..20]).is_empty());
        assert_eq!(subtract(15..25, &[0..5, 10..20]), vec![20..25]);
    }

    #[test]
    fn coalesce_sorts_merges_overlaps_touches_and_duplicates() {
        let mut v = vec![
            0x8000..0x9000,
            0x1000..0x3000,
            0x2000..0x4000,
            0x8000..0x9000,
            0x4000..0x5000,
            0x10000..0x11000,
        ];
        assert_eq!(coalesce(&mut v), 0x4000 + 0x1000 + 0x1000);
        assert_eq!(v, vec![0x1000..0x5000, 0x8000..0x9000, 0x10000..0x11000]);
        let mut empty: Vec<Range<u64>> = Vec::new();
        assert_eq!(coalesce(&mut empty), 0);
        assert!(empty.is_empty());
    }

    #[test]
    fn push_merged_merges_touching_runs_but_not_before_from() {
        let mut v = vec![0x1000..0x2000];
        push_merged(&mut v, 0, 0x2000..0x3000);
        assert_eq!(v, vec![0x1000..0x3000]);
        push_merged(&mut v, 1, 0x3000..0x4000);
        assert_eq!(v, vec![0x1000..0x3000, 0x3000..0x4000]);
        push_merged(&mut v, 1, 0x3800..0x5000);
        assert_eq!(v, vec![0x1000..0x3000, 0x3000..0x5000]);
        push_merged(&mut v, 0, 0x6000..0x7000);
        assert_eq!(v, vec![0x1000..0x3000, 0x3000..0x5000, 0x6000..0x7000]);
    }
}
