//! Fuzz target: the chunked decoder, fed whole and in pieces, and re-encoding what it accepts.
#![no_main]

use apex::http::body::BodyRelay;
use apex::http::Framing;
use libfuzzer_sys::fuzz_target;

/// Relays `input` in pieces of `step` bytes; returns the re-framed output and whether the body
/// ended, or `None` on a framing error.
fn relay(input: &[u8], step: usize, output: Framing) -> Option<(Vec<u8>, bool, usize)> {
    let mut r = BodyRelay::new(Framing::Chunked, output);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut avail = 0;
    while !r.is_done() && avail < input.len() {
        avail = (avail + step).min(input.len());
        let n = r.relay(&input[pos..avail], &mut out).ok()?;
        assert!(pos + n <= avail);
        pos += n;
    }
    Some((out, r.is_done(), pos))
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let whole = relay(input, input.len().max(1), Framing::UntilClose);
    let pieces = relay(input, step, Framing::UntilClose);
    // Splitting the input must not change the verdict or the body.
    assert_eq!(whole.is_some(), pieces.is_some());
    if let (Some(w), Some(p)) = (&whole, &pieces) {
        if w.1 && p.1 {
            assert_eq!(w.0, p.0);
            assert_eq!(w.2, p.2, "the body ends at the same byte");
        }
    }
    // A body that decoded whole re-encodes to chunks that decode to the same bytes.
    if let Some((body, true, _)) = whole {
        let mut rechunked = Vec::new();
        let (mut r, mut out) = (BodyRelay::new(Framing::Chunked, Framing::Chunked), Vec::new());
        let n = r.relay(input, &mut rechunked).expect("decoded once");
        assert!(r.is_done() && n <= input.len());
        let mut back = BodyRelay::new(Framing::Chunked, Framing::UntilClose);
        let m = back.relay(&rechunked, &mut out).expect("our own encoding decodes");
        assert!(back.is_done() && m == rechunked.len());
        assert_eq!(out, body);
    }
});
