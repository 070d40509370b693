//! Response compression without I/O: choosing an encoding from `Accept-Encoding` (with
//! q-values), deciding whether a response may be compressed, and a streaming compressor the
//! relay feeds one read at a time (each read is flushed, so a slow stream reaches the client
//! as it is produced; memory per response stays bounded by the encoder's window).

use std::io::Write;

/// The encodings Apex produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Brotli,
}

impl Encoding {
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
        }
    }

    pub fn parse(token: &str) -> Option<Encoding> {
        match token {
            "gzip" => Some(Encoding::Gzip),
            "br" => Some(Encoding::Brotli),
            _ => None,
        }
    }
}

/// The q-value of one `Accept-Encoding` element (`gzip;q=0.5`): 0–1000 in thousandths.
fn q_value(params: &[u8]) -> Option<u16> {
    let mut q = 1000;
    for p in params.split(|&b| b == b';') {
        let p = super::fields::trim_ows(p);
        let Some(v) = p.strip_prefix(b"q=").or_else(|| p.strip_prefix(b"Q=")) else { continue };
        let v = std::str::from_utf8(v).ok()?;
        let f: f64 = v.parse().ok()?;
        if !(0.0..=1.0).contains(&f) {
            return None;
        }
        q = (f * 1000.0).round() as u16;
    }
    Some(q)
}

/// The encoding to use for a request whose `Accept-Encoding` values are `accept`, among
/// `offered` (in the server's order of preference): the highest q-value above zero, ties going
/// to the server's order. `*` stands for any encoding not named. `None`: send it unencoded.
pub fn negotiate<'a>(
    accept: impl Iterator<Item = &'a [u8]>,
    offered: &[Encoding],
) -> Option<Encoding> {
    let mut named: Vec<(Encoding, u16)> = Vec::new();
    let mut star: Option<u16> = None;
    for value in accept {
        for element in super::fields::list_elements(value) {
            let (token, params) = match element.iter().position(|&b| b == b';') {
                Some(i) => (&element[..i], &element[i + 1..]),
                None => (element, &[][..]),
            };
            let token = super::fields::trim_ows(token);
            let Some(q) = q_value(params) else { continue };
            if token == b"*" {
                star = Some(q);
            } else if let Some(e) = std::str::from_utf8(token)
                .ok()
                .and_then(|t| Encoding::parse(&t.to_ascii_lowercase()))
            {
                named.push((e, q));
            }
        }
    }
    let q_of = |e: Encoding| named.iter().find(|(n, _)| *n == e).map(|(_, q)| *q).or(star);
    let mut best: Option<(Encoding, u16)> = None;
    for &e in offered {
        if let Some(q) = q_of(e).filter(|&q| q > 0) {
            if best.is_none_or(|(_, b)| q > b) {
                best = Some((e, q));
            }
        }
    }
    best.map(|(e, _)| e)
}

/// A streaming compressor: `feed` takes body bytes and appends what is ready (flushed, so
/// nothing waits for more input), `finish` appends the rest and hands back a gzip compressor
/// ready for another response (its state, about 300 KiB, is worth keeping: allocating and
/// freeing it per response made glibc give the pages back and fault them in again each time).
pub struct Compressor {
    inner: Inner,
}

/// Boxed: each encoder's state is large, and lives only while a response is compressed (or
/// among the worker's spares).
enum Inner {
    Gzip(Box<Gzip>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

/// gzip (RFC 1952) written by hand around raw deflate, so that the deflate state can be reset
/// and reused: a 10-byte header, the deflate stream, CRC-32 and length of the input.
struct Gzip {
    deflate: flate2::Compress,
    crc: flate2::Crc,
    level: u32,
    /// The header is written before the first output.
    started: bool,
}

/// Brotli's window: 2^18 bytes (256 KiB), a bound on memory per compressed response (the
/// format's default, 4 MiB, would let a few thousand responses take gigabytes).
const BROTLI_WINDOW_BITS: u32 = 18;
/// Brotli's internal buffer, bytes.
const BROTLI_BUFFER: usize = 16 * 1024;

impl Compressor {
    /// `level`: gzip 1–9, brotli 0–11.
    pub fn new(encoding: Encoding, level: u32) -> Compressor {
        let inner = match encoding {
            Encoding::Gzip => {
                let level = level.clamp(1, 9);
                Inner::Gzip(Box::new(Gzip {
                    deflate: flate2::Compress::new(flate2::Compression::new(level), false),
                    crc: flate2::Crc::new(),
                    level,
                    started: false,
                }))
            }
            Encoding::Brotli => Inner::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                BROTLI_BUFFER,
                level.min(11),
                BROTLI_WINDOW_BITS,
            ))),
        };
        Compressor { inner }
    }

    /// Whether this is a fresh (or reset) compressor for `encoding` at `level`, as `new` makes.
    pub fn is(&self, encoding: Encoding, level: u32) -> bool {
        matches!(&self.inner, Inner::Gzip(g) if encoding == Encoding::Gzip && g.level == level.clamp(1, 9))
    }

    /// Compresses `input` and appends the compressed bytes ready so far to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        match &mut self.inner {
            Inner::Gzip(g) => {
                g.header(out);
                g.crc.update(input);
                g.deflate(input, out, flate2::FlushCompress::Sync);
            }
            Inner::Brotli(b) => {
                // Writing to a Vec cannot fail; the encoder only passes its errors on.
                let _ = b.write_all(input);
                let _ = b.flush();
                out.append(b.get_mut());
            }
        }
    }

    /// Ends the stream: appends the remaining compressed bytes and the trailer. Returns the
    /// compressor reset for another response where its state can be reused (gzip).
    pub fn finish(self, out: &mut Vec<u8>) -> Option<Compressor> {
        match self.inner {
            Inner::Gzip(mut g) => {
                g.header(out);
                g.deflate(&[], out, flate2::FlushCompress::Finish);
                out.extend_from_slice(&g.crc.sum().to_le_bytes());
                out.extend_from_slice(&g.crc.amount().to_le_bytes());
                g.deflate.reset();
                g.crc.reset();
                g.started = false;
                Some(Compressor { inner: Inner::Gzip(g) })
            }
            Inner::Brotli(b) => {
                out.extend_from_slice(&b.into_inner());
                None
            }
        }
    }
}

impl Gzip {
    fn header(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        // XFL: 2 for the slowest level, 4 for the fastest (RFC 1952 2.3.1); OS 255: unknown.
        let xfl = match self.level {
            9 => 2,
            1 => 4,
            _ => 0,
        };
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]);
    }

    /// Runs deflate over `input` with `flush` until all of it is taken and the flush is
    /// complete: zlib's rule is that a flush is done once a call leaves output room unused
    /// (`Finish`: once the stream has ended).
    fn deflate(&mut self, mut input: &[u8], out: &mut Vec<u8>, flush: flate2::FlushCompress) {
        loop {
            // Deflate writes only into spare capacity: room for the input and a block's framing.
            out.reserve(input.len() + 1024);
            let (taken, wrote) = (self.deflate.total_in(), self.deflate.total_out());
            let status = self.deflate.compress_vec(input, out, flush);
            input = &input[(self.deflate.total_in() - taken) as usize..];
            let progress = self.deflate.total_in() != taken || self.deflate.total_out() != wrote;
            match status {
                Ok(flate2::Status::StreamEnd) => return,
                // Raw deflate over memory never fails; no progress would loop for ever.
                Err(_) => return,
                Ok(_) if !progress => return,
                Ok(_)
                    if flush != flate2::FlushCompress::Finish
                        && input.is_empty()
                        && out.len() < out.capacity() =>
                {
                    return
                }
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pick(accept: &str) -> Option<Encoding> {
        negotiate(std::iter::once(accept.as_bytes()), &[Encoding::Brotli, Encoding::Gzip])
    }

    #[test]
    fn q_values_decide_and_the_server_breaks_ties() {
        assert_eq!(pick("gzip, br"), Some(Encoding::Brotli), "a tie goes to the server's order");
        assert_eq!(pick("gzip;q=1.0, br;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(pick("br;q=0, gzip"), Some(Encoding::Gzip));
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("*;q=0.1"), Some(Encoding::Brotli));
        assert_eq!(pick("gzip;q=0, *"), Some(Encoding::Brotli));
        assert_eq!(pick("gzip;q=0, br;q=0, *"), None);
        assert_eq!(pick("deflate, GZIP;Q=0.7"), Some(Encoding::Gzip));
        assert_eq!(pick("gzip;q=2"), None, "an invalid q-value is ignored");
    }

    #[test]
    fn streamed_output_decompresses_to_the_input() {
        let body: Vec<u8> =
            (0..200_000u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        for e in [Encoding::Gzip, Encoding::Brotli] {
            let mut c = Compressor::new(e, 5);
            let mut out = Vec::new();
            for piece in body.chunks(7_000) {
                let before = out.len();
                c.feed(piece, &mut out);
                assert!(out.len() > before, "{e:?}: each piece is flushed");
            }
            let _ = c.finish(&mut out);
            assert!(out.len() < body.len() / 3, "{e:?} compresses");
            let mut back = Vec::new();
            match e {
                Encoding::Gzip => {
                    flate2::read::GzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
                }
                Encoding::Brotli => {
                    brotli::Decompressor::new(&out[..], 4096).read_to_end(&mut back).unwrap();
                }
            }
            assert!(back == body, "{e:?} round trip");
        }
    }

    /// A gzip compressor handed back by `finish` starts a new, whole stream: the second
    /// response decodes (its CRC and length checked by the decoder) to its own bytes only,
    /// incompressible or not.
    #[test]
    fn a_reset_gzip_compressor_writes_a_whole_new_stream() {
        let mut x: u32 = 1;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        let text: Vec<u8> =
            (0..30_000u32).flat_map(|i| format!("row {i}\n").into_bytes()).collect();
        let mut c = Compressor::new(Encoding::Gzip, 1);
        for body in [&noise, &text, &noise] {
            let mut out = Vec::new();
            for piece in body.chunks(16 * 1024) {
                c.feed(piece, &mut out);
            }
            c = c.finish(&mut out).expect("gzip comes back for reuse");
            assert!(c.is(Encoding::Gzip, 1));
            let mut back = Vec::new();
            let mut d = flate2::read::GzDecoder::new(&out[..]);
            d.read_to_end(&mut back).expect("a valid gzip stream");
            assert!(back == *body, "{} bytes back of {}", back.len(), body.len());
            assert_eq!(d.header().map(|h| h.operating_system()), Some(255));
        }
    }
}
