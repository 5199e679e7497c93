//! Looking inside stored batches, which the log treats as opaque: decompression with a hard
//! output limit, and finding records by timestamp.
//!
//! Batches are stored as producers sent them. Decompressing one is only needed to answer
//! ListOffsets by timestamp exactly; a producer could have sent a "bomb" that expands a
//! thousandfold, so every codec's output is capped at [`DECOMPRESSED_MAX_BYTES`]. Past the cap
//! the lookup falls back to the batch's first offset, which is at or before the exact answer.

use std::io::Read;

use sluice_storage::batch::{BatchHeader, Compression, HEADER_BYTES};
use sluice_storage::record::{self, RecordView};

/// Largest decompressed batch body this module will produce.
pub const DECOMPRESSED_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The xerial framing that Kafka's Java clients put around snappy data.
const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_BYTES: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordsError {
    #[error("decompressed batch would exceed {limit} bytes")]
    TooLarge { limit: usize },
    #[error("cannot decompress {codec:?} batch: {reason}")]
    Codec { codec: Compression, reason: String },
    #[error("{0}")]
    Records(String),
}

fn read_limited(
    mut reader: impl Read,
    codec: Compression,
    limit: usize,
) -> Result<Vec<u8>, RecordsError> {
    let mut out = Vec::new();
    reader
        .by_ref()
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| RecordsError::Codec {
            codec,
            reason: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(RecordsError::TooLarge { limit });
    }
    Ok(out)
}

fn snappy_block(block: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), RecordsError> {
    let codec = Compression::Snappy;
    let length = snap::raw::decompress_len(block).map_err(|e| RecordsError::Codec {
        codec,
        reason: e.to_string(),
    })?;
    if out.len() + length > limit {
        return Err(RecordsError::TooLarge { limit });
    }
    let start = out.len();
    out.resize(start + length, 0);
    snap::raw::Decoder::new()
        .decompress(block, &mut out[start..])
        .map_err(|e| RecordsError::Codec {
            codec,
            reason: e.to_string(),
        })?;
    Ok(())
}

/// Decompresses a batch body (the bytes after the 61-byte header) with an output limit.
pub fn decompress(codec: Compression, body: &[u8], limit: usize) -> Result<Vec<u8>, RecordsError> {
    match codec {
        Compression::None => Ok(body.to_vec()),
        Compression::Gzip => read_limited(flate2::read::GzDecoder::new(body), codec, limit),
        Compression::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::new(body).map_err(|e| RecordsError::Codec {
                    codec,
                    reason: e.to_string(),
                })?;
            read_limited(decoder, codec, limit)
        }
        Compression::Lz4 => {
            let decoder = lz4::Decoder::new(body).map_err(|e| RecordsError::Codec {
                codec,
                reason: e.to_string(),
            })?;
            read_limited(decoder, codec, limit)
        }
        Compression::Snappy => {
            let mut out = Vec::new();
            if body.len() >= XERIAL_HEADER_BYTES && body[..8] == XERIAL_MAGIC[..] {
                let mut rest = &body[XERIAL_HEADER_BYTES..];
                while !rest.is_empty() {
                    if rest.len() < 4 {
                        return Err(RecordsError::Codec {
                            codec,
                            reason: "truncated block length".into(),
                        });
                    }
                    let length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    let block = rest.get(4..4 + length).ok_or_else(|| RecordsError::Codec {
                        codec,
                        reason: "truncated block".into(),
                    })?;
                    snappy_block(block, &mut out, limit)?;
                    rest = &rest[4 + length..];
                }
            } else {
                snappy_block(body, &mut out, limit)?;
            }
            Ok(out)
        }
        Compression::Unknown(id) => Err(RecordsError::Codec {
            codec,
            reason: format!("codec id {id} is not defined"),
        }),
    }
}

/// Decodes every record of a stored batch, decompressing it within the limit.
pub fn records_of(batch: &[u8]) -> Result<(BatchHeader, Vec<(i64, i64)>), RecordsError> {
    let header = BatchHeader::parse(batch).map_err(|e| RecordsError::Records(e.to_string()))?;
    let end = header.total_bytes().min(batch.len());
    let body = decompress(
        header.compression(),
        &batch[HEADER_BYTES.min(end)..end],
        DECOMPRESSED_MAX_BYTES,
    )?;
    let records: Vec<RecordView<'_>> =
        record::decode_records(&header, &body).map_err(|e| RecordsError::Records(e.to_string()))?;
    let pairs = records.iter().map(|r| (r.offset, r.timestamp_ms)).collect();
    Ok((header, pairs))
}

/// The offset and timestamp of the first record in `batch` whose timestamp is at or after
/// `timestamp_ms`; falls back to the batch's first offset if the records cannot be read.
pub fn first_at_or_after(batch: &[u8], timestamp_ms: i64) -> Option<(i64, i64)> {
    match records_of(batch) {
        Ok((_, records)) => records.into_iter().find(|(_, ts)| *ts >= timestamp_ms),
        Err(error) => {
            tracing::warn!(%error, "cannot read a batch's records; answering with its first offset");
            let header = BatchHeader::parse(batch).ok()?;
            Some((header.base_offset, header.max_timestamp))
        }
    }
}

/// The offset of the record holding the batch's max timestamp.
pub fn offset_of_max_timestamp(batch: &[u8]) -> Option<(i64, i64)> {
    let header = BatchHeader::parse(batch).ok()?;
    match records_of(batch) {
        Ok((_, records)) => records
            .into_iter()
            .find(|(_, ts)| *ts == header.max_timestamp)
            .or(Some((header.last_offset(), header.max_timestamp))),
        Err(_) => Some((header.last_offset(), header.max_timestamp)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn bombs_are_refused() {
        let zeros = vec![0u8; 4 * 1024 * 1024];
        let compressed = zstd::encode_all(&zeros[..], 3).unwrap();
        assert!(compressed.len() < 10_000);
        assert_eq!(
            decompress(Compression::Zstd, &compressed, 1024 * 1024),
            Err(RecordsError::TooLarge { limit: 1024 * 1024 })
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&zeros).unwrap();
        let compressed = gz.finish().unwrap();
        assert!(matches!(
            decompress(Compression::Gzip, &compressed, 1024),
            Err(RecordsError::TooLarge { .. })
        ));
        assert_eq!(
            decompress(Compression::Gzip, &compressed, 8 << 20)
                .unwrap()
                .len(),
            zeros.len()
        );
    }

    #[test]
    fn garbage_is_an_error() {
        for codec in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            assert!(
                decompress(codec, b"not compressed at all", 1024).is_err(),
                "{codec:?}"
            );
        }
    }
}
