//! The chunked transfer coding (RFC 9112 §7.1): a strict streaming decoder and the encoder.
//!
//! The decoder consumes bytes as they arrive and never needs more than it was given, so the
//! caller's buffer stays bounded whatever the body's size. Extensions are accepted and dropped;
//! trailer fields are checked for line endings and dropped (Apex forwards no trailers).

/// Longest chunk-size line with extensions, in bytes; longer is refused (extensions are a
/// known way to make a proxy buffer without bound).
const MAX_LINE: usize = 4096;
/// Longest trailer section, in bytes.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    BadSize,
    SizeOverflow,
    BadLineEnding,
    LineTooLong,
    /// The chunk's data was not followed by CRLF: it was longer than its size said.
    DataOverrun,
    BadTrailer,
}

impl ChunkError {
    pub fn reason(self) -> &'static str {
        match self {
            ChunkError::BadSize => "invalid chunk size",
            ChunkError::SizeOverflow => "chunk size overflows",
            ChunkError::BadLineEnding => "chunk line not ended by CRLF",
            ChunkError::LineTooLong => "chunk extension too long",
            ChunkError::DataOverrun => "chunk data longer than its size",
            ChunkError::BadTrailer => "invalid trailer section",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// What one call to [`ChunkedDecoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes at this range of the input given.
    Data(std::ops::Range<usize>),
    /// Every byte given was consumed; call again with more.
    NeedMore,
    /// The body, with its trailers, ended.
    Done,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: u8,
    line: usize,
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder { state: State::Size, size: 0, digits: 0, line: 0, trailers: 0 }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from the start of `input`; returns how many bytes were consumed and what was
    /// found. Bytes after `Done` are not consumed: they belong to the next message.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Decoded), ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => {
                    if let Some(v) = hex(b) {
                        if self.digits == 16 {
                            return Err(ChunkError::SizeOverflow);
                        }
                        self.size = (self.size << 4) | u64::from(v);
                        // Leading zeros do not count towards the 16-digit limit.
                        if self.size > 0 {
                            self.digits += 1;
                        }
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(ChunkError::LineTooLong);
                        }
                    } else if self.line == 0 {
                        return Err(ChunkError::BadSize);
                    } else {
                        match b {
                            b';' => self.state = State::Ext,
                            b' ' | b'\t' => self.state = State::SizeWs,
                            b'\r' => self.state = State::SizeLf,
                            b'\n' => return Err(ChunkError::BadLineEnding),
                            _ => return Err(ChunkError::BadSize),
                        }
                    }
                }
                State::SizeWs => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = State::Ext,
                    _ => return Err(ChunkError::BadSize),
                },
                State::Ext => {
                    self.line += 1;
                    if self.line > MAX_LINE {
                        return Err(ChunkError::LineTooLong);
                    }
                    match b {
                        b'\r' => self.state = State::SizeLf,
                        b'\n' => return Err(ChunkError::BadLineEnding),
                        b'\t' => {}
                        0..=0x1f | 0x7f => return Err(ChunkError::BadSize),
                        _ => {}
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.line = 0;
                    self.digits = 0;
                    self.state = if self.size == 0 { State::TrailerStart } else { State::Data };
                }
                State::Data => {
                    let avail = (input.len() - i) as u64;
                    let n = avail.min(self.size) as usize;
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok((i + n, Decoded::Data(i..i + n)));
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::DataOverrun);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::DataOverrun);
                    }
                    self.state = State::Size;
                }
                State::TrailerStart => match b {
                    b'\r' => self.state = State::EndLf,
                    b' ' | b'\t' | b'\n' => return Err(ChunkError::BadTrailer),
                    _ => {
                        self.state = State::Trailer;
                        self.trailer_byte(b)?;
                    }
                },
                State::Trailer => match b {
                    b'\r' => self.state = State::TrailerLf,
                    _ => self.trailer_byte(b)?,
                },
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadTrailer);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = State::Done;
                    return Ok((i + 1, Decoded::Done));
                }
                State::Done => return Ok((i, Decoded::Done)),
            }
            i += 1;
        }
        if self.state == State::Done {
            return Ok((i, Decoded::Done));
        }
        Ok((i, Decoded::NeedMore))
    }

    fn trailer_byte(&mut self, b: u8) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS || b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
            return Err(ChunkError::BadTrailer);
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends a chunk-size line for `len` bytes of data (`len` > 0).
pub fn encode_chunk_start(out: &mut Vec<u8>, len: usize) {
    use std::io::Write;
    let _ = write!(out, "{len:x}\r\n");
}

/// Appends the CRLF after a chunk's data.
pub fn encode_chunk_end(out: &mut Vec<u8>) {
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk and the empty trailer section.
pub fn encode_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed `step` bytes at a time; returns the body and what followed it.
    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut body = Vec::new();
        let mut pos = 0;
        let mut avail = 0;
        loop {
            avail = (avail + step).min(input.len());
            loop {
                let (n, ev) = d.decode(&input[pos..avail])?;
                match ev {
                    Decoded::Data(r) => body.extend_from_slice(&input[pos + r.start..pos + r.end]),
                    Decoded::Done => return Ok((body, pos + n)),
                    Decoded::NeedMore => {
                        pos += n;
                        break;
                    }
                }
                pos += n;
            }
            if avail == input.len() {
                return Err(ChunkError::BadSize); // ran out: treat as truncated in tests
            }
        }
    }

    #[test]
    fn decodes_with_extensions_and_trailers_at_any_split() {
        let input = b"5;ext=1\r\nhello\r\n6 ; a=\"b\"\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..input.len() {
            let (body, end) = decode_all(input, step).unwrap();
            assert_eq!(body, b"hello world");
            assert_eq!(&input[end..], b"NEXT");
        }
    }

    #[test]
    fn refuses_bad_chunk_framing() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello world\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\nX: a\nY: b\r\n\r\n",
            b"0\r\n\n",
            b"\r\n",
        ] {
            assert!(decode_all(bad, 1).is_err(), "{:?}", String::from_utf8_lossy(bad));
            assert!(decode_all(bad, bad.len()).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn sixteen_hex_digits_fit_seventeen_do_not() {
        let mut d = ChunkedDecoder::new();
        assert!(d.decode(b"ffffffffffffffff\r\n").is_ok());
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.decode(b"1ffffffffffffffff\r\n"), Err(ChunkError::SizeOverflow));
        let mut d = ChunkedDecoder::new();
        assert!(d.decode(b"0000000000000000005\r\n").is_ok(), "leading zeros are not overflow");
    }

    #[test]
    fn encoder_round_trips() {
        let mut out = Vec::new();
        encode_chunk_start(&mut out, 300);
        out.extend_from_slice(&[b'a'; 300]);
        encode_chunk_end(&mut out);
        encode_last_chunk(&mut out);
        let (body, end) = decode_all(&out, out.len()).unwrap();
        assert_eq!(body.len(), 300);
        assert_eq!(end, out.len());
    }
}
