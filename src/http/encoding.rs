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
/// nothing waits for more input), `finish` appends the rest.
pub struct Compressor {
    inner: Inner,
}

/// Boxed: each encoder's state is large, and lives only while a response is compressed.
enum Inner {
    Gzip(Box<flate2::write::GzEncoder<Vec<u8>>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
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
            Encoding::Gzip => Inner::Gzip(Box::new(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.min(9)),
            ))),
            Encoding::Brotli => Inner::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                BROTLI_BUFFER,
                level.min(11),
                BROTLI_WINDOW_BITS,
            ))),
        };
        Compressor { inner }
    }

    /// Compresses `input` and appends the compressed bytes ready so far to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        // Writing to a Vec cannot fail; the encoders only pass its errors on.
        match &mut self.inner {
            Inner::Gzip(g) => {
                let _ = g.write_all(input);
                let _ = g.flush();
                out.append(g.get_mut());
            }
            Inner::Brotli(b) => {
                let _ = b.write_all(input);
                let _ = b.flush();
                out.append(b.get_mut());
            }
        }
    }

    /// Ends the stream: appends the remaining compressed bytes and the trailer.
    pub fn finish(self, out: &mut Vec<u8>) {
        match self.inner {
            Inner::Gzip(g) => {
                if let Ok(rest) = g.finish() {
                    out.extend_from_slice(&rest);
                }
            }
            Inner::Brotli(b) => out.extend_from_slice(&b.into_inner()),
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
            c.finish(&mut out);
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
}
