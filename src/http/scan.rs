//! Finding where a head ends and refusing line endings that are not CRLF.
//!
//! httparse accepts a bare LF as a line ending; a backend that does not would frame the same bytes
//! differently, which is how request smuggling starts. This scan runs before httparse and makes
//! every CR and LF in a head part of a CRLF pair.

use super::HeadError;

/// Where the head ends, once it has fully arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadEnd {
    /// Leading empty lines (CRLF) before the start line, which RFC 9112 §2.2 lets us skip.
    pub skip: usize,
    /// Offset just past the CRLFCRLF that ends the head.
    pub end: usize,
}

/// Scans `buf` for a complete head. `Ok(None)`: not complete yet (and nothing wrong so far).
/// `max_start_line` is the limit on the first line (414), `max_head` on the whole head (431).
pub fn find_head_end(
    buf: &[u8],
    max_start_line: usize,
    max_head: usize,
) -> Result<Option<HeadEnd>, HeadError> {
    HeadScanner::default().scan(buf, max_start_line, max_head)
}

/// A resumable head scan: each call looks only at bytes it has not seen, so a client trickling
/// a head one byte at a time costs linear, not quadratic, work.
#[derive(Debug, Default, Clone)]
pub struct HeadScanner {
    /// Next offset to look at.
    pos: usize,
    /// Empty lines skipped before the start line.
    skip: usize,
    /// Whether the start line has begun (leading CRLFs are over).
    started: bool,
    line_start: usize,
    past_first_line: bool,
}

/// obs-fold (RFC 9112 §5.2): a field line starting with whitespace continues the previous one;
/// proxies that unfold it and backends that do not disagree about the fields.
const OBS_FOLD: HeadError = HeadError::BadRequest("obs-fold in header field");

impl HeadScanner {
    /// Continues scanning `buf`, which must extend the bytes given to earlier calls.
    pub fn scan(
        &mut self,
        buf: &[u8],
        max_start_line: usize,
        max_head: usize,
    ) -> Result<Option<HeadEnd>, HeadError> {
        while !self.started {
            if buf.len() < self.pos + 2 {
                if buf.len() == self.pos + 1 && buf[self.pos] != b'\r' {
                    self.started = true;
                    self.line_start = self.pos;
                    break;
                }
                return Ok(None);
            }
            if buf[self.pos] == b'\r' && buf[self.pos + 1] == b'\n' {
                self.pos += 2;
                self.skip = self.pos;
                if self.skip > 64 {
                    return Err(HeadError::BadRequest("too many empty lines before request"));
                }
            } else {
                self.started = true;
                self.line_start = self.pos;
            }
        }
        let mut i = self.pos;
        if self.past_first_line && i == self.line_start && i < buf.len() && is_ws(buf[i]) {
            return Err(OBS_FOLD);
        }
        while i < buf.len() {
            // Jump to the next CR or LF: everything between is field content, which httparse
            // checks. memchr2 searches with SIMD, so a head costs a few instructions per line.
            match memchr::memchr2(b'\r', b'\n', &buf[i..]) {
                Some(off) => i += off,
                None => {
                    i = buf.len();
                    break;
                }
            }
            match buf[i] {
                b'\n' => return Err(HeadError::BadRequest("bare LF line ending")),
                b'\r' => {
                    if i + 1 == buf.len() {
                        break; // CR at the end of what we have: wait for its LF.
                    }
                    if buf[i + 1] != b'\n' {
                        return Err(HeadError::BadRequest("bare CR in head"));
                    }
                    if !self.past_first_line && i - self.skip > max_start_line {
                        return Err(HeadError::UriTooLong);
                    }
                    if i == self.line_start && self.past_first_line {
                        let end = i + 2;
                        if end > max_head {
                            return Err(HeadError::FieldsTooLarge);
                        }
                        self.pos = end;
                        return Ok(Some(HeadEnd { skip: self.skip, end }));
                    }
                    self.past_first_line = true;
                    i += 2;
                    self.line_start = i;
                    if i < buf.len() && is_ws(buf[i]) {
                        return Err(OBS_FOLD);
                    }
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        self.pos = i;
        if !self.past_first_line && buf.len() - self.skip > max_start_line {
            return Err(HeadError::UriTooLong);
        }
        if buf.len() >= max_head {
            return Err(HeadError::FieldsTooLarge);
        }
        Ok(None)
    }
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(b: &[u8]) -> Result<Option<HeadEnd>, HeadError> {
        find_head_end(b, 8192, 65536)
    }

    #[test]
    fn complete_head_ends_after_blank_line() {
        let b = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest";
        assert_eq!(scan(b), Ok(Some(HeadEnd { skip: 0, end: b.len() - 4 })));
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let b = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(scan(b), Ok(Some(HeadEnd { skip: 4, end: b.len() })));
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert_eq!(scan(b"GET / HTTP/1.1\r\nHost: a\r"), Ok(None));
        assert_eq!(scan(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), Ok(None));
        assert_eq!(scan(b""), Ok(None));
    }

    #[test]
    fn obs_fold_is_refused_however_the_head_is_split() {
        let b = b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n";
        assert_eq!(scan(b), Err(OBS_FOLD));
        for n in 1..b.len() {
            let mut sc = HeadScanner::default();
            let first = sc.scan(&b[..n], 8192, 65536);
            let second = first.and_then(|_| sc.scan(b, 8192, 65536));
            assert_eq!(second, Err(OBS_FOLD), "split at {n}");
        }
    }

    #[test]
    fn bare_lf_and_bare_cr_are_refused() {
        assert!(scan(b"GET / HTTP/1.1\nHost: a\r\n\r\n").is_err());
        assert!(scan(b"GET / HTTP/1.1\r\nHost: a\n\n").is_err());
        assert!(scan(b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n").is_err());
    }

    #[test]
    fn resumed_scan_matches_a_whole_scan() {
        let b = b"\r\nGET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\nnext";
        let mut sc = HeadScanner::default();
        let mut found = None;
        for n in 1..=b.len() {
            if let Some(end) = sc.scan(&b[..n], 8192, 65536).unwrap() {
                found = Some(end);
                break;
            }
        }
        assert_eq!(found, scan(b).unwrap());
        let mut sc = HeadScanner::default();
        assert!(sc.scan(b"GET / HTTP/1.1\r", 8192, 65536).unwrap().is_none());
        assert!(sc.scan(b"GET / HTTP/1.1\r\nX: a\n", 8192, 65536).is_err());
    }

    #[test]
    fn limits_map_to_414_and_431() {
        let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
        assert_eq!(scan(long_line.as_bytes()), Err(HeadError::UriTooLong));
        assert_eq!(scan(&vec![b'a'; 9000]), Err(HeadError::UriTooLong));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(70000));
        assert_eq!(scan(big.as_bytes()), Err(HeadError::FieldsTooLarge));
    }
}
