//! Random sequences of append (written at once or deferred) / read / roll / retention /
//! truncation / reopen, checked against a plain in-memory model of segments and batches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use proptest::prelude::*;
use sluice_storage::batch::{set_base_offset, set_partition_leader_epoch};
use sluice_storage::{CheckedBatches, Log, LogConfig, StorageError};

#[derive(Debug, Clone)]
enum Op {
    Append {
        batches: Vec<(usize, usize)>,
    },
    /// `Log::append_deferred`, then `Log::write_deferred` if `write`; otherwise the next
    /// operation finds the batches deferred.
    AppendDeferred {
        batches: Vec<(usize, usize)>,
        write: bool,
    },
    Read {
        offset_pick: u64,
        max_bytes: usize,
    },
    Roll,
    RetainBytes {
        limit: u64,
    },
    AdvanceStart {
        offset_pick: u64,
    },
    Truncate {
        offset_pick: u64,
    },
    Reopen {
        clean: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec((1usize..6, 0usize..400), 1..4)
            .prop_map(|batches| Op::Append { batches }),
        4 => (proptest::collection::vec((1usize..6, 0usize..400), 1..4), any::<bool>())
            .prop_map(|(batches, write)| Op::AppendDeferred { batches, write }),
        4 => (any::<u64>(), 0usize..3_000).prop_map(|(offset_pick, max_bytes)| Op::Read { offset_pick, max_bytes }),
        1 => Just(Op::Roll),
        1 => (0u64..6_000).prop_map(|limit| Op::RetainBytes { limit }),
        1 => any::<u64>().prop_map(|offset_pick| Op::AdvanceStart { offset_pick }),
        1 => any::<u64>().prop_map(|offset_pick| Op::Truncate { offset_pick }),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

#[derive(Debug, Clone, Default)]
struct ModelSegment {
    base: u64,
    /// (base offset, next offset, bytes as stored)
    batches: Vec<(u64, u64, Vec<u8>)>,
}

impl ModelSegment {
    fn size(&self) -> u64 {
        self.batches.iter().map(|b| b.2.len() as u64).sum()
    }
    fn next(&self) -> u64 {
        self.batches.last().map_or(self.base, |b| b.1)
    }
    /// Bytes of the batches that end at or below `end`.
    fn size_below(&self, end: u64) -> u64 {
        self.batches
            .iter()
            .filter(|b| b.1 <= end)
            .map(|b| b.2.len() as u64)
            .sum()
    }
}

#[derive(Debug)]
struct Model {
    segments: Vec<ModelSegment>,
    log_start: u64,
    config: LogConfig,
    /// The first offset appended by `append_deferred` and not written yet.
    deferred_from: Option<u64>,
}

impl Model {
    fn end(&self) -> u64 {
        self.segments.last().unwrap().next()
    }

    /// The end of what readers see: deferred batches are not written yet.
    fn visible_end(&self) -> u64 {
        self.deferred_from.unwrap_or_else(|| self.end())
    }

    /// Whether appending `total` bytes starts a new segment.
    fn needs_roll(&self, total: usize) -> bool {
        let active = self.segments.last().unwrap();
        !active.batches.is_empty() && active.size() + total as u64 > self.config.segment_bytes
    }

    fn append_deferred(&mut self, batches: &[Vec<u8>], records: &[usize]) -> (u64, u64) {
        let total: usize = batches.iter().map(Vec::len).sum();
        if self.needs_roll(total) {
            // The log writes what it deferred before it seals the segment.
            self.deferred_from = None;
        }
        let appended = self.append(batches, records);
        self.deferred_from.get_or_insert(appended.0);
        appended
    }

    fn roll(&mut self) {
        let active = self.segments.last().unwrap();
        if !active.batches.is_empty() {
            let base = active.next();
            self.segments.push(ModelSegment {
                base,
                batches: vec![],
            });
        }
    }

    fn append(&mut self, batches: &[Vec<u8>], records: &[usize]) -> (u64, u64) {
        let total: usize = batches.iter().map(Vec::len).sum();
        if self.needs_roll(total) {
            self.roll();
        }
        let first = self.end();
        let mut next = first;
        for (bytes, count) in batches.iter().zip(records) {
            let mut stored = bytes.clone();
            set_base_offset(&mut stored, next as i64);
            set_partition_leader_epoch(&mut stored, 0);
            let batch_next = next + *count as u64;
            self.segments
                .last_mut()
                .unwrap()
                .batches
                .push((next, batch_next, stored));
            next = batch_next;
        }
        (first, next - 1)
    }

    fn read(&self, offset: u64, max_bytes: usize) -> Result<Vec<u8>, ()> {
        let end = self.visible_end();
        if offset < self.log_start || offset > end {
            return Err(());
        }
        let after = self.segments.partition_point(|s| s.base <= offset);
        for segment in &self.segments[after.saturating_sub(1)..] {
            let Some(first) = segment.batches.iter().position(|b| b.1 > offset) else {
                continue;
            };
            let mut out = Vec::new();
            for (index, batch) in segment.batches[first..].iter().enumerate() {
                if batch.1 > end {
                    break;
                }
                if out.len() + batch.2.len() > max_bytes {
                    if index == 0 {
                        out.extend_from_slice(&batch.2);
                    }
                    break;
                }
                out.extend_from_slice(&batch.2);
            }
            return Ok(out);
        }
        Ok(Vec::new())
    }

    fn delete_front(&mut self, limit: Option<u64>) {
        let mut total: u64 = self.segments.iter().map(ModelSegment::size).sum();
        let mut doomed = 0;
        for segment in &self.segments[..self.segments.len() - 1] {
            let oversized = limit.is_some_and(|limit| total - segment.size() >= limit);
            if !(oversized || segment.next() <= self.log_start) {
                break;
            }
            total -= segment.size();
            doomed += 1;
        }
        if doomed > 0 {
            self.log_start = self.log_start.max(self.segments[doomed].base);
            self.segments.drain(..doomed);
        }
    }

    fn truncate(&mut self, offset: u64) {
        if offset >= self.end() {
            return;
        }
        if offset < self.segments[0].base || offset < self.log_start {
            self.segments = vec![ModelSegment {
                base: offset,
                batches: vec![],
            }];
            self.log_start = offset;
            return;
        }
        let keep = self.segments.partition_point(|s| s.base <= offset);
        self.segments.truncate(keep);
        let last = self.segments.last_mut().unwrap();
        last.batches.retain(|b| b.1 <= offset);
        let end = self.end();
        self.log_start = self.log_start.min(end);
    }
}

/// Batches of `(record count, value bytes)` each, and their record counts.
fn make_batches(batches: &[(usize, usize)], step: usize) -> (Vec<Vec<u8>>, Vec<usize>) {
    let raw = batches
        .iter()
        .enumerate()
        .map(|(i, (records, value))| {
            common::batch(*records, *value, step as i64, (step * 10 + i) as u64).to_vec()
        })
        .collect();
    (raw, batches.iter().map(|b| b.0).collect())
}

fn pick(offset_pick: u64, model: &Model) -> u64 {
    // Mostly inside the log, sometimes just outside it.
    let low = model.segments[0].base.saturating_sub(2);
    let span = model.end() + 3 - low;
    low + offset_pick % span
}

fn check_shape(log: &Log, model: &Model) {
    assert_eq!(log.log_start_offset(), model.log_start, "log start offset");
    assert_eq!(log.log_end_offset(), model.end(), "log end offset");
    assert_eq!(
        log.has_deferred(),
        model.deferred_from.is_some(),
        "deferred appends"
    );
    assert_eq!(
        log.reader().log_end_offset(),
        model.visible_end(),
        "log end offset readers see"
    );
    let actual: Vec<(u64, u64)> = log
        .reader()
        .segments()
        .iter()
        .map(|s| (s.base_offset, s.size_bytes))
        .collect();
    let expected: Vec<(u64, u64)> = model
        .segments
        .iter()
        .map(|s| (s.base, s.size_below(model.visible_end())))
        .collect();
    assert_eq!(actual, expected, "segments (base offset, size)");
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let config = common::small_config();
    let mut log = Some(Log::open(dir.path(), config.clone(), 0).unwrap());
    let mut model = Model {
        segments: vec![ModelSegment::default()],
        log_start: 0,
        config: config.clone(),
        deferred_from: None,
    };
    for (step, op) in ops.into_iter().enumerate() {
        let current = log.as_mut().unwrap();
        // Every operation but a read or another deferred append writes deferred batches first
        // (an unclean reopen loses them).
        let writes_deferred = match &op {
            Op::Read { .. } | Op::AppendDeferred { .. } => false,
            Op::Reopen { clean } => *clean,
            _ => true,
        };
        if writes_deferred {
            model.deferred_from = None;
        }
        match op {
            Op::Append { batches } => {
                let (raw, counts) = make_batches(&batches, step);
                let info = current.append(&raw.concat(), 0).unwrap();
                let (first, last) = model.append(&raw, &counts);
                assert_eq!((info.base_offset, info.last_offset), (first, last));
            }
            Op::AppendDeferred { batches, write } => {
                let (raw, counts) = make_batches(&batches, step);
                let checked = CheckedBatches::check(raw.concat().into(), 1 << 20).unwrap();
                let info = current.append_deferred(checked, 0).unwrap();
                let (first, last) = model.append_deferred(&raw, &counts);
                assert_eq!((info.base_offset, info.last_offset), (first, last));
                if write {
                    current.write_deferred().unwrap();
                    model.deferred_from = None;
                }
            }
            Op::Read {
                offset_pick,
                max_bytes,
            } => {
                let offset = pick(offset_pick, &model);
                let got = current.read(offset, max_bytes, true);
                match (got, model.read(offset, max_bytes)) {
                    (Ok(got), Ok(want)) => {
                        assert_eq!(got.bytes.as_ref(), want.as_slice(), "read at {offset}")
                    }
                    (Err(StorageError::OffsetOutOfRange { .. }), Err(())) => {}
                    (got, want) => panic!("read at {offset}: log {got:?}, model {want:?}"),
                }
            }
            Op::Roll => {
                current.roll(0).unwrap();
                model.roll();
            }
            Op::RetainBytes { limit } => {
                let mut limited = config.clone();
                limited.retention_bytes = Some(limit);
                current.set_config(limited).unwrap();
                current.apply_retention(0).unwrap();
                current.set_config(config.clone()).unwrap();
                model.delete_front(Some(limit));
            }
            Op::AdvanceStart { offset_pick } => {
                let offset = pick(offset_pick, &model);
                let result = current.advance_log_start(offset, 0);
                if offset > model.end() {
                    assert!(result.is_err());
                } else {
                    result.unwrap();
                    if offset > model.log_start {
                        model.log_start = offset;
                        model.delete_front(None);
                    }
                }
            }
            Op::Truncate { offset_pick } => {
                let offset = pick(offset_pick, &model);
                current.truncate_to(offset, 0).unwrap();
                model.truncate(offset);
            }
            Op::Reopen { clean } => {
                let closing = log.take().unwrap();
                if clean {
                    closing.close().unwrap();
                } else {
                    drop(closing);
                    if let Some(offset) = model.deferred_from.take() {
                        model.truncate(offset);
                    }
                }
                log = Some(Log::open(dir.path(), config.clone(), 0).unwrap());
            }
        }
        check_shape(log.as_ref().unwrap(), &model);
    }
    // Finally, everything visible reads back exactly.
    let mut log = log.unwrap();
    log.write_deferred().unwrap();
    model.deferred_from = None;
    let mut offset = model.log_start;
    while offset < model.end() {
        let got = log.read(offset, 1 << 20, true).unwrap();
        let want = model.read(offset, 1 << 20).unwrap();
        assert_eq!(got.bytes.as_ref(), want.as_slice());
        let batches = common::split(&got.bytes);
        let last = batches
            .last()
            .expect("a read inside the log returns a batch");
        let header = sluice_storage::BatchHeader::parse(&last.1).unwrap();
        offset = header.next_offset() as u64;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]
    #[test]
    fn log_agrees_with_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
