//! Any bytes a client can send as one Kafka request frame: decoding must return a request or
//! an error, never panic, and never allocate past what the frame could describe.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_kafka::decode_request(bytes::Bytes::copy_from_slice(data));
});
