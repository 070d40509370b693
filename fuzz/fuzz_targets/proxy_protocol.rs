//! The PROXY protocol parser on arbitrary bytes: never a panic; a complete header never claims
//! more bytes than it was given; and the same verdict however the bytes are split.
#![no_main]

use apex::proxy_protocol::{parse, Accept, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let accept = Accept { v1: true, v2: true };
    let whole = parse(data, accept);
    if let Ok(Parsed::Complete { len, .. }) = whole {
        assert!(len <= data.len());
        // Any prefix shorter than the header is undecided, never a different header.
        for cut in [len / 2, len.saturating_sub(1)] {
            match parse(&data[..cut], accept) {
                Ok(Parsed::Partial) | Err(_) => {}
                Ok(Parsed::Absent) => assert_eq!(cut, 0),
                other => panic!("a prefix of {cut} bytes parsed as {other:?}"),
            }
        }
    }
});
