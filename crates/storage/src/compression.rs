//! Decompression of record batch bodies, with a hard output limit.
//!
//! Batches are stored as producers sent them, compressed or not; the log never looks inside.
//! Decompressing one is needed only to find records inside it (a timestamp lookup, a peek at
//! messages). A producer may have sent a "bomb" that expands a thousandfold, so every codec's
//! output is capped: past the cap, the caller gets [`DecompressError::TooLarge`] and nothing
//! larger is ever allocated.
//!
//! Codecs: gzip, snappy (raw, or in the xerial framing Kafka's Java clients use), lz4 (frame
//! format), zstd.

use std::io::Read;

use crate::batch::Compression;

/// Largest decompressed batch body this module will produce.
pub const DECOMPRESSED_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The xerial framing that Kafka's Java clients put around snappy data.
const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_BYTES: usize = 16;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecompressError {
    #[error("decompressed batch would exceed {limit} bytes")]
    TooLarge { limit: usize },
    #[error("cannot decompress {codec:?} batch: {reason}")]
    Codec { codec: Compression, reason: String },
}

fn read_limited(
    mut reader: impl Read,
    codec: Compression,
    limit: usize,
) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::new();
    reader
        .by_ref()
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecompressError::Codec {
            codec,
            reason: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge { limit });
    }
    Ok(out)
}

fn snappy_block(block: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), DecompressError> {
    let codec = Compression::Snappy;
    let length = snap::raw::decompress_len(block).map_err(|e| DecompressError::Codec {
        codec,
        reason: e.to_string(),
    })?;
    if out.len() + length > limit {
        return Err(DecompressError::TooLarge { limit });
    }
    let start = out.len();
    out.resize(start + length, 0);
    snap::raw::Decoder::new()
        .decompress(block, &mut out[start..])
        .map_err(|e| DecompressError::Codec {
            codec,
            reason: e.to_string(),
        })?;
    Ok(())
}

/// Decompresses a batch body (the bytes after the 61-byte header) with an output limit.
pub fn decompress(
    codec: Compression,
    body: &[u8],
    limit: usize,
) -> Result<Vec<u8>, DecompressError> {
    match codec {
        Compression::None => Ok(body.to_vec()),
        Compression::Gzip => read_limited(flate2::read::GzDecoder::new(body), codec, limit),
        Compression::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::new(body).map_err(|e| DecompressError::Codec {
                    codec,
                    reason: e.to_string(),
                })?;
            read_limited(decoder, codec, limit)
        }
        Compression::Lz4 => {
            let decoder = lz4::Decoder::new(body).map_err(|e| DecompressError::Codec {
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
                        return Err(DecompressError::Codec {
                            codec,
                            reason: "truncated block length".into(),
                        });
                    }
                    let length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    let block = rest
                        .get(4..4 + length)
                        .ok_or_else(|| DecompressError::Codec {
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
        Compression::Unknown(id) => Err(DecompressError::Codec {
            codec,
            reason: format!("codec id {id} is not defined"),
        }),
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
            Err(DecompressError::TooLarge { limit: 1024 * 1024 })
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&zeros).unwrap();
        let compressed = gz.finish().unwrap();
        assert!(matches!(
            decompress(Compression::Gzip, &compressed, 1024),
            Err(DecompressError::TooLarge { .. })
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
