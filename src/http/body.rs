//! Moving body bytes from one framing to another without I/O: the streaming re-framer.
//!
//! The proxy feeds whatever bytes arrived; `BodyRelay` appends them to the output re-framed and
//! says how much of the input it took. Bytes after the end of the body are left unconsumed (they
//! are the next pipelined message). Memory stays bounded by what the caller feeds at once.

use super::chunked::{self, ChunkError, ChunkedDecoder, Decoded};
use super::Framing;

#[derive(Debug, Clone)]
pub struct BodyRelay {
    input: Framing,
    output: Framing,
    /// Bytes still expected for `Framing::Length` input.
    remaining: u64,
    decoder: ChunkedDecoder,
    done: bool,
    /// Body bytes taken so far (decoded: chunk framing excluded).
    taken: u64,
}

impl BodyRelay {
    /// `output` must be able to carry `input`: the same framing, or `Chunked`/`UntilClose`
    /// for a body whose length is not known in advance.
    pub fn new(input: Framing, output: Framing) -> Self {
        let (remaining, done) = match input {
            Framing::None => (0, true),
            Framing::Length(n) => (n, n == 0),
            Framing::Chunked | Framing::UntilClose => (0, false),
        };
        BodyRelay { input, output, remaining, decoder: ChunkedDecoder::new(), done, taken: 0 }
    }

    /// Whether the whole body has been taken from the input.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Body bytes taken so far, without chunk framing.
    pub fn body_bytes(&self) -> u64 {
        self.taken
    }

    /// Body bytes still expected, for `Length` input; 0 otherwise.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Takes body bytes from the start of `input`, appends them to `out` in the output framing,
    /// and returns how many input bytes were consumed.
    pub fn relay(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        if self.done {
            return Ok(0);
        }
        match self.input {
            Framing::None => Ok(0),
            Framing::Length(_) => {
                let n = (input.len() as u64).min(self.remaining) as usize;
                self.emit(&input[..n], out);
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.finish(out);
                }
                Ok(n)
            }
            Framing::UntilClose => {
                self.emit(input, out);
                Ok(input.len())
            }
            Framing::Chunked => {
                let mut pos = 0;
                loop {
                    let (n, ev) = self.decoder.decode(&input[pos..])?;
                    match ev {
                        Decoded::Data(r) => {
                            self.emit(&input[pos + r.start..pos + r.end], out);
                            pos += n;
                        }
                        Decoded::NeedMore => return Ok(pos + n),
                        Decoded::Done => {
                            self.finish(out);
                            return Ok(pos + n);
                        }
                    }
                }
            }
        }
    }

    /// The bytes still to come of a body that passes through unchanged with a known length
    /// (`Content-Length` on both sides): the case where they may move without being looked
    /// at. `None` for any other framing, or once the body is done.
    pub fn unchanged_length_left(&self) -> Option<u64> {
        match (self.input, self.output) {
            (Framing::Length(_), Framing::Length(_)) if !self.done => Some(self.remaining),
            _ => None,
        }
    }

    /// When the body passes through unchanged (same framing in and out, not chunked): takes up
    /// to `available` bytes of it without copying and returns how many are body. `None` when
    /// the bytes must be re-framed through [`BodyRelay::relay`].
    pub fn pass_through(&mut self, available: usize) -> Option<usize> {
        if self.done || self.input != self.output {
            return None;
        }
        let n = match self.input {
            Framing::Length(_) => (available as u64).min(self.remaining) as usize,
            Framing::UntilClose => available,
            Framing::None | Framing::Chunked => return None,
        };
        self.taken += n as u64;
        if let Framing::Length(_) = self.input {
            self.remaining -= n as u64;
            if self.remaining == 0 {
                self.done = true;
            }
        }
        Some(n)
    }

    /// The input reached EOF. For a close-delimited body that is its end (`true`); for any
    /// other unfinished body it means the body was cut short (`false`).
    pub fn end_of_input(&mut self, out: &mut Vec<u8>) -> bool {
        if self.done {
            return true;
        }
        if self.input == Framing::UntilClose {
            self.finish(out);
            return true;
        }
        false
    }

    fn emit(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if data.is_empty() {
            return;
        }
        self.taken += data.len() as u64;
        if self.output == Framing::Chunked {
            chunked::encode_chunk_start(out, data.len());
            out.extend_from_slice(data);
            chunked::encode_chunk_end(out);
        } else {
            out.extend_from_slice(data);
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        self.done = true;
        if self.output == Framing::Chunked {
            chunked::encode_last_chunk(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_body_stops_at_its_end_and_leaves_the_next_message() {
        let mut r = BodyRelay::new(Framing::Length(5), Framing::Length(5));
        let mut out = Vec::new();
        assert_eq!(r.relay(b"hel", &mut out), Ok(3));
        assert!(!r.is_done());
        assert_eq!(r.relay(b"loGET /", &mut out), Ok(2));
        assert!(r.is_done());
        assert_eq!(out, b"hello");
    }

    #[test]
    fn chunked_in_is_rechunked_without_extensions() {
        let mut r = BodyRelay::new(Framing::Chunked, Framing::Chunked);
        let mut out = Vec::new();
        let input = b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nnext";
        assert_eq!(r.relay(input, &mut out), Ok(input.len() - 4));
        assert!(r.is_done());
        assert_eq!(out, b"3\r\nabc\r\n0\r\n\r\n");
    }

    #[test]
    fn chunked_to_close_delimited_for_http10_clients() {
        let mut r = BodyRelay::new(Framing::Chunked, Framing::UntilClose);
        let mut out = Vec::new();
        r.relay(b"3\r\nabc\r\n0\r\n\r\n", &mut out).unwrap();
        assert_eq!(out, b"abc");
    }

    #[test]
    fn close_delimited_is_chunked_and_ends_at_eof() {
        let mut r = BodyRelay::new(Framing::UntilClose, Framing::Chunked);
        let mut out = Vec::new();
        r.relay(b"abc", &mut out).unwrap();
        assert!(r.end_of_input(&mut out));
        assert_eq!(out, b"3\r\nabc\r\n0\r\n\r\n");
    }

    #[test]
    fn pass_through_counts_without_copying() {
        let mut r = BodyRelay::new(Framing::Length(10), Framing::Length(10));
        assert_eq!(r.pass_through(4), Some(4));
        assert_eq!(r.pass_through(100), Some(6), "stops at the end of the body");
        assert!(r.is_done());
        assert_eq!(r.body_bytes(), 10);
        let mut c = BodyRelay::new(Framing::Chunked, Framing::Chunked);
        assert_eq!(c.pass_through(10), None, "chunked input is always re-framed");
    }

    #[test]
    fn eof_inside_a_length_body_is_a_cut() {
        let mut r = BodyRelay::new(Framing::Length(10), Framing::Length(10));
        let mut out = Vec::new();
        r.relay(b"abc", &mut out).unwrap();
        assert!(!r.end_of_input(&mut out));
    }
}
