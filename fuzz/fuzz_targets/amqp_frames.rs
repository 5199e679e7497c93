//! AMQP 0-9-1 frame splitting and decoding (methods, content headers, bodies): any input must
//! give frames or a frame error, never a panic, an abort or an allocation beyond the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small frame_max and the default one: size checks and decoding are both exercised.
    let _ = sluice_amqp::codec::decode_all(data, 4096);
    let _ = sluice_amqp::codec::decode_all(data, 131_072);
    // The same bytes as the payload of each frame type.
    if let Some((&kind, payload)) = data.split_first() {
        let _ = sluice_amqp::codec::decode_payload(
            kind % 9,
            1,
            bytes::Bytes::copy_from_slice(payload),
        );
    }
});
