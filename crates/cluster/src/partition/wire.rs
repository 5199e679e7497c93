//! How a partition group's AppendEntries travel: a small JSON head (the vote, the previous log
//! id, the leader's commit) and then each entry as `[term u64][index u64][length u32][bytes]`
//! (big-endian), the bytes being the entry as the log stores it ([`super::encode_entry`]):
//! record batches go as raw bytes, never through serde, and a received entry's batches are
//! slices of the frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use openraft::EntryPayload;
use openraft::alias::VoteOf;
use openraft::raft::AppendEntriesRequest;
use sluice_storage::CheckedBatches;

use super::{LogId, PartitionTypes, decode_entry, encode_entry};
use crate::network::{WireTypes, from_json, to_json};

/// Bytes before each entry's own.
const ENTRY_HEAD_BYTES: usize = 8 + 8 + 4;

type Head = (VoteOf<PartitionTypes>, Option<LogId>, Option<LogId>);

impl WireTypes for PartitionTypes {
    fn encode_append(request: &AppendEntriesRequest<Self>) -> Result<Bytes, String> {
        let head = to_json(&(&request.vote, &request.prev_log_id, &request.leader_commit))?;
        let mut entries = Vec::with_capacity(request.entries.len());
        let mut total = 4 + head.len();
        for entry in &request.entries {
            let bytes = encode_entry(entry).map_err(|e| format!("encoding entry: {e}"))?;
            total += ENTRY_HEAD_BYTES + bytes.len();
            entries.push((entry.log_id, bytes));
        }
        let mut body = BytesMut::with_capacity(total);
        body.put_u32(head.len() as u32);
        body.put_slice(&head);
        for (log_id, bytes) in entries {
            body.put_u64(log_id.leader_id.term);
            body.put_u64(log_id.index);
            body.put_u32(bytes.len() as u32);
            body.put_slice(&bytes);
        }
        Ok(body.freeze())
    }

    fn decode_append(mut body: Bytes) -> Result<AppendEntriesRequest<Self>, String> {
        let cut = || "AppendEntries cut short".to_owned();
        if body.len() < 4 {
            return Err(cut());
        }
        let head_len = body.get_u32() as usize;
        if body.len() < head_len {
            return Err(cut());
        }
        let (vote, prev_log_id, leader_commit): Head = from_json(&body.split_to(head_len))?;
        let mut entries = Vec::new();
        while !body.is_empty() {
            if body.len() < ENTRY_HEAD_BYTES {
                return Err(cut());
            }
            let term = body.get_u64();
            let index = body.get_u64();
            let len = body.get_u32() as usize;
            if body.len() < len {
                return Err(cut());
            }
            let bytes = body.split_to(len);
            let entry = decode_entry(LogId::new_term_index(term, index), bytes)
                .map_err(|e| format!("decoding entry {index}: {e}"))?;
            if let EntryPayload::Normal(batches) = &entry.payload {
                // Damage on the way is refused here (the leader sends again), never handed to
                // the log, where a failed append would stop the group.
                CheckedBatches::check(batches.0.clone(), usize::MAX)
                    .map_err(|e| format!("entry {index}: {e}"))?;
            }
            entries.push(entry);
        }
        Ok(AppendEntriesRequest {
            vote,
            prev_log_id,
            entries,
            leader_commit,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{BasicNode, Membership};
    use sluice_storage::record::BatchBuilder;

    use super::*;
    use crate::partition::{Batches, Entry};

    fn request() -> AppendEntriesRequest<PartitionTypes> {
        let mut builder = BatchBuilder::new(7);
        builder.push(7, Some(b"k"), Some(b"v"), &[]);
        let voters: BTreeSet<u64> = [1, 2, 3].into();
        let nodes: BTreeMap<u64, BasicNode> = voters
            .iter()
            .map(|id| (*id, BasicNode::new(format!("127.0.0.1:{id}"))))
            .collect();
        AppendEntriesRequest {
            vote: VoteOf::<PartitionTypes>::new_committed(3, 1),
            prev_log_id: Some(LogId::new_term_index(2, 9)),
            entries: vec![
                Entry {
                    log_id: LogId::new_term_index(3, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: LogId::new_term_index(3, 11),
                    payload: EntryPayload::Normal(Batches(builder.finish())),
                },
                Entry {
                    log_id: LogId::new_term_index(3, 12),
                    payload: EntryPayload::Membership(
                        Membership::new(vec![voters], nodes).expect("membership"),
                    ),
                },
            ],
            leader_commit: Some(LogId::new_term_index(2, 9)),
        }
    }

    #[test]
    fn append_entries_round_trip_with_batches_as_raw_bytes() {
        let sent = request();
        let body = PartitionTypes::encode_append(&sent).expect("encodes");
        let EntryPayload::Normal(batches) = &sent.entries[1].payload else {
            unreachable!()
        };
        // The batch's bytes are in the frame as they are.
        assert!(body.windows(batches.0.len()).any(|w| w == &batches.0[..]));
        let received = PartitionTypes::decode_append(body).expect("decodes");
        assert_eq!(received.vote, sent.vote);
        assert_eq!(received.prev_log_id, sent.prev_log_id);
        assert_eq!(received.leader_commit, sent.leader_commit);
        assert_eq!(received.entries.len(), 3);
        for (a, b) in received.entries.iter().zip(&sent.entries) {
            assert_eq!(a.log_id, b.log_id);
            assert_eq!(format!("{:?}", a.payload), format!("{:?}", b.payload));
        }
        let heartbeat = AppendEntriesRequest::<PartitionTypes> {
            entries: Vec::new(),
            ..request()
        };
        let body = PartitionTypes::encode_append(&heartbeat).expect("encodes");
        assert!(
            PartitionTypes::decode_append(body)
                .expect("decodes")
                .entries
                .is_empty()
        );
    }

    #[test]
    fn a_damaged_append_is_an_error_never_a_panic() {
        let body = PartitionTypes::encode_append(&request()).expect("encodes");
        for len in 0..body.len() {
            // Every prefix but the whole either decodes to fewer entries or fails.
            let _ = PartitionTypes::decode_append(body.slice(..len));
        }
        let mut flipped = body.to_vec();
        let last = flipped.len() - 30;
        flipped[last] ^= 0xff;
        let _ = PartitionTypes::decode_append(Bytes::from(flipped));
        let mut huge = body.to_vec();
        huge[0] = 0xff;
        assert!(PartitionTypes::decode_append(Bytes::from(huge)).is_err());
    }
}
