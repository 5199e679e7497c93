//! The payload every benchmark message carries: its send time and sequence number in the
//! first [`HEADER_BYTES`] bytes, then filler up to the requested size.
//!
//! Layout (big-endian): `sent_ns: u64` (nanoseconds since this process's clock anchor),
//! `sequence: u64`, then filler bytes. Producers and consumers run in one process and read
//! the same monotonic clock, so a latency is `now - sent_ns` with no clock skew and no wall
//! clock jumps.
//!
//! The filler is a repeating non-zero pattern rather than zeros, so compression (when a
//! workload asks for it) does not turn the payload into nothing.

use std::sync::OnceLock;
use std::time::Instant;

use crate::error::BenchError;

/// Bytes at the start of every payload that carry the send time and sequence number.
pub const HEADER_BYTES: usize = 16;

/// Largest payload a workload may ask for; larger bodies are not what this tool measures.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024 * 1024;

static ANCHOR: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process's clock anchor (fixed at the first call).
pub fn now_ns() -> u64 {
    let anchor = ANCHOR.get_or_init(Instant::now);
    // u64 nanoseconds last 584 years; a benchmark process will not get there.
    anchor.elapsed().as_nanos() as u64
}

/// A payload of `size_bytes`, with filler and a zeroed header.
pub fn template(size_bytes: usize) -> Result<Vec<u8>, BenchError> {
    if !(HEADER_BYTES..=PAYLOAD_BYTES_MAX).contains(&size_bytes) {
        return Err(BenchError::Config(format!(
            "a payload must be between {HEADER_BYTES} bytes (it carries a timestamp and a \
             sequence number) and {PAYLOAD_BYTES_MAX} bytes, got {size_bytes}"
        )));
    }
    let mut payload = vec![0u8; size_bytes];
    for (index, byte) in payload.iter_mut().enumerate().skip(HEADER_BYTES) {
        *byte = b'a' + (index % 26) as u8;
    }
    Ok(payload)
}

/// Writes the current time and `sequence` into the header of `payload`.
pub fn stamp(payload: &mut [u8], sequence: u64) {
    debug_assert!(
        payload.len() >= HEADER_BYTES,
        "payloads come from template()"
    );
    if payload.len() >= HEADER_BYTES {
        payload[..8].copy_from_slice(&now_ns().to_be_bytes());
        payload[8..16].copy_from_slice(&sequence.to_be_bytes());
    }
}

/// The send time and sequence number of a payload, or `None` if it is too short to be one.
pub fn read(payload: &[u8]) -> Option<(u64, u64)> {
    let sent: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    let sequence: [u8; 8] = payload.get(8..16)?.try_into().ok()?;
    Some((u64::from_be_bytes(sent), u64::from_be_bytes(sequence)))
}

/// Microseconds from the send time in `payload` to now, or `None` if the payload is not one of
/// ours (too short, or stamped in the future, which only a foreign message can be).
pub fn latency_us(payload: &[u8], now_ns: u64) -> Option<u64> {
    let (sent_ns, _) = read(payload)?;
    now_ns.checked_sub(sent_ns).map(|ns| ns / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_then_read_round_trips() {
        let mut payload = template(100).unwrap();
        stamp(&mut payload, 42);
        let (sent_ns, sequence) = read(&payload).unwrap();
        assert_eq!(sequence, 42);
        assert!(sent_ns <= now_ns());
        assert_eq!(payload.len(), 100);
        assert!(
            payload[HEADER_BYTES..]
                .iter()
                .all(|b| b.is_ascii_lowercase())
        );
    }

    #[test]
    fn sizes_outside_the_bounds_are_refused() {
        assert!(template(15).is_err());
        assert!(template(16).is_ok());
        assert!(template(PAYLOAD_BYTES_MAX + 1).is_err());
    }

    #[test]
    fn foreign_payloads_have_no_latency() {
        assert_eq!(latency_us(b"short", now_ns()), None);
        let mut future = template(16).unwrap();
        future[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(latency_us(&future, now_ns()), None);
    }

    #[test]
    fn latency_is_measured_in_microseconds() {
        let mut payload = template(16).unwrap();
        payload[..8].copy_from_slice(&1_000_000u64.to_be_bytes());
        assert_eq!(latency_us(&payload, 3_500_000), Some(2_500));
    }
}
