//! A set of log offsets kept as disjoint ranges, so that millions of consecutive ready messages
//! cost one entry rather than one each.
//!
//! Invariant: ranges are half-open, non-empty, and neither overlap nor touch (touching ranges
//! are merged), so the representation of a set is unique.

use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (exclusive).
    ranges: BTreeMap<u64, u64>,
    len: u64,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Offsets in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ranges in the set: the memory it takes.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    pub fn first(&self) -> Option<u64> {
        self.ranges.first_key_value().map(|(start, _)| *start)
    }

    pub fn last(&self) -> Option<u64> {
        self.ranges.last_key_value().map(|(_, end)| end - 1)
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, end)| offset < *end)
    }

    pub fn insert(&mut self, offset: u64) {
        self.insert_range(offset..offset + 1);
    }

    /// Adds every offset of `range` (some may already be present).
    pub fn insert_range(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        // Fast path: appending at or after the end, the common case for a queue's tail.
        match self.ranges.last_key_value().map(|(_, end)| *end) {
            None => {
                self.ranges.insert(range.start, range.end);
                self.len = range.end - range.start;
                return;
            }
            Some(end) if range.start == end => {
                if let Some(mut last) = self.ranges.last_entry() {
                    *last.get_mut() = range.end;
                }
                self.len += range.end - range.start;
                return;
            }
            Some(end) if range.start > end => {
                self.ranges.insert(range.start, range.end);
                self.len += range.end - range.start;
                return;
            }
            Some(_) => {}
        }
        let mut start = range.start;
        let mut end = range.end;
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.ranges.remove(&s);
            self.len -= e - s;
        }
        // Absorb every range that starts inside or right after the new one.
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            end = end.max(e);
            self.ranges.remove(&s);
            self.len -= e - s;
        }
        self.ranges.insert(start, end);
        self.len += end - start;
    }

    /// Removes `offset`; true if it was present.
    pub fn remove(&mut self, offset: u64) -> bool {
        let Some((&start, &end)) = self.ranges.range(..=offset).next_back() else {
            return false;
        };
        if offset >= end {
            return false;
        }
        self.ranges.remove(&start);
        if start < offset {
            self.ranges.insert(start, offset);
        }
        if offset + 1 < end {
            self.ranges.insert(offset + 1, end);
        }
        self.len -= 1;
        true
    }

    /// Removes and returns the smallest offset.
    pub fn pop_first(&mut self) -> Option<u64> {
        let first = self.ranges.first_entry()?;
        let start = *first.key();
        let end = *first.get();
        first.remove();
        if start + 1 < end {
            self.ranges.insert(start + 1, end);
        }
        self.len -= 1;
        Some(start)
    }

    /// Removes every offset below `offset`; returns how many were removed.
    pub fn remove_below(&mut self, offset: u64) -> u64 {
        let mut removed = 0;
        while let Some(first) = self.ranges.first_entry() {
            let start = *first.key();
            let end = *first.get();
            if start >= offset {
                break;
            }
            first.remove();
            if end > offset {
                self.ranges.insert(offset, end);
                removed += offset - start;
                break;
            }
            removed += end - start;
        }
        self.len -= removed;
        removed
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.len = 0;
    }

    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(s, e)| *s..*e)
    }

    /// Every offset, in order. For small sets and tests.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges().flatten()
    }

    /// The offsets of `within` that are not in this set, as ranges.
    pub fn complement(&self, within: Range<u64>) -> RangeSet {
        let mut out = RangeSet::new();
        let mut at = within.start;
        for range in self.ranges() {
            if range.end <= at {
                continue;
            }
            if range.start >= within.end {
                break;
            }
            if range.start > at {
                out.insert_range(at..range.start.min(within.end));
            }
            at = at.max(range.end);
        }
        if at < within.end {
            out.insert_range(at..within.end);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn appends_merge_and_removal_splits() {
        let mut set = RangeSet::new();
        for offset in 0..100 {
            set.insert(offset);
        }
        assert_eq!(set.range_count(), 1);
        assert!(set.remove(50));
        assert!(!set.remove(50));
        assert_eq!(set.range_count(), 2);
        assert_eq!(set.len(), 99);
        set.insert(50);
        assert_eq!(set.range_count(), 1);
        assert_eq!(set.pop_first(), Some(0));
        assert_eq!(set.first(), Some(1));
        assert_eq!(set.remove_below(10), 9);
        assert_eq!(set.first(), Some(10));
        assert_eq!(set.last(), Some(99));
    }

    #[test]
    fn complement_within_bounds() {
        let mut set = RangeSet::new();
        set.insert_range(3..5);
        set.insert_range(8..9);
        let gaps: Vec<_> = set.complement(0..10).ranges().collect();
        assert_eq!(gaps, vec![0..3, 5..8, 9..10]);
        let gaps: Vec<_> = set.complement(4..8).ranges().collect();
        assert_eq!(gaps, vec![5..8]);
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(ops in proptest::collection::vec((0u8..4, 0u64..64, 1u64..6), 0..200)) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for (op, offset, len) in ops {
                match op {
                    0 => { set.insert_range(offset..offset + len); model.extend(offset..offset + len); }
                    1 => { prop_assert_eq!(set.remove(offset), model.remove(&offset)); }
                    2 => { prop_assert_eq!(set.pop_first(), model.pop_first()); }
                    _ => {
                        let removed = set.remove_below(offset);
                        let before = model.len();
                        model.retain(|o| *o >= offset);
                        prop_assert_eq!(removed as usize, before - model.len());
                    }
                }
                prop_assert_eq!(set.len() as usize, model.len());
                prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
                for window in set.ranges().collect::<Vec<_>>().windows(2) {
                    prop_assert!(window[0].end < window[1].start, "ranges must not touch");
                }
            }
        }
    }
}
