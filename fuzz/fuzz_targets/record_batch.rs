//! Record batches as producers send them: header parsing, validation, record decoding and
//! bounded decompression must never panic on any input.
//!
//! Random bytes almost never carry a valid CRC, so the input's length field, magic and CRC are
//! repaired first; the fuzzer then explores what lies behind them (records, codecs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_storage::batch::{self, Batches, HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    let _ = batch::verify_for_append(data, 1 << 20);
    let mut repaired = data.to_vec();
    if repaired.len() >= HEADER_BYTES {
        let length = (repaired.len() - 12) as i32;
        repaired[8..12].copy_from_slice(&length.to_be_bytes());
        repaired[16] = 2;
        let crc = batch::compute_crc(&repaired);
        repaired[17..21].copy_from_slice(&crc.to_be_bytes());
    }
    for item in Batches::new(&repaired) {
        let Ok((header, raw)) = item else { break };
        let _ = sluice_storage::record::decode(raw);
        let _ = sluice_storage::record::decode_owned(raw, 1 << 20);
        let _ = header.last_sequence();
    }
});
