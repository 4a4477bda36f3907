//! Fuzz target: the record codec (`meta::codec`) on arbitrary batch payloads.
//!
//! Asserts no panic in `decode_record`/`decode_all`, and that whatever decodes survives an
//! encode/decode round trip unchanged (the encoder may canonicalise bytes, e.g. varint
//! lengths, but never the records they mean).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pershome::meta::codec::{decode_all, decode_record, encode_all};

fuzz_target!(|data: &[u8]| {
    if let Ok((_, used)) = decode_record(data) {
        assert!(
            used > 0 && used <= data.len(),
            "decode_record used {used} bytes of {}",
            data.len()
        );
    }
    let Ok(records) = decode_all(data) else {
        return;
    };
    let mut encoded = Vec::new();
    encode_all(&records, &mut encoded);
    match decode_all(&encoded) {
        Ok(again) => assert_eq!(
            again, records,
            "records changed across encode/decode: expected {records:?}, got {again:?}"
        ),
        Err(e) => panic!("re-encoded records do not decode: {e}; records {records:?}"),
    }
});
