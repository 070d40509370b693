//! Counts the HTTP/2 frames a client sends, by their 9-byte headers, against per-connection
//! limits on what the `h2` crate lets through unbounded: PING, SETTINGS, empty DATA, stream-0
//! WINDOW_UPDATE and RST_STREAM per second, and CONTINUATION frames per header block. Over a
//! limit, the connection is answered GOAWAY ENHANCE_YOUR_CALM. No I/O: fed the bytes as they
//! are read (after the connection preface), it keeps only the header bytes it is in the middle
//! of and how much payload to skip.

use std::time::{Duration, Instant};

/// What a client overdid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    Ping,
    Settings,
    EmptyData,
    WindowUpdate,
    Reset,
    Continuation,
    /// Header bytes decoded over the connection's life (HPACK expands a few bytes on the wire
    /// into many); counted by the connection as it accepts streams, not by the frame guard.
    DecodedHeaders,
    /// Streams the client reset before Apex accepted them (rapid reset, past
    /// `max_pending_resets`) or made Apex reset (MadeYouReset, past `max_resets_sent`): limits
    /// the `h2` crate keeps itself and answers with GOAWAY ENHANCE_YOUR_CALM; counted by the
    /// connection when `h2` ends it so.
    ResetLimits,
}

impl Flood {
    pub const ALL: [Flood; 8] = [
        Flood::Ping,
        Flood::Settings,
        Flood::EmptyData,
        Flood::WindowUpdate,
        Flood::Reset,
        Flood::Continuation,
        Flood::DecodedHeaders,
        Flood::ResetLimits,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Flood::Ping => "ping",
            Flood::Settings => "settings",
            Flood::EmptyData => "empty_data",
            Flood::WindowUpdate => "window_update",
            Flood::Reset => "rst_stream",
            Flood::Continuation => "continuation",
            Flood::DecodedHeaders => "decoded_headers",
            Flood::ResetLimits => "reset_limits",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Per-connection limits: frames per second of each kind, CONTINUATION frames per header
/// block, and header bytes decoded over the connection's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodLimits {
    pub pings: u32,
    pub settings: u32,
    pub empty_data: u32,
    pub window_updates: u32,
    pub resets: u32,
    pub continuations: u32,
    /// Bytes, counted as SETTINGS_MAX_HEADER_LIST_SIZE counts them (name + value + 32 each).
    pub decoded_header_bytes: u64,
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// The length of the window the per-second counts cover.
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct FrameGuard {
    limits: FloodLimits,
    /// A frame header being gathered.
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    /// CONTINUATION frames in the header block being received (`None`: not in one).
    block: Option<u32>,
    /// When the header block being received began (its HEADERS frame's header arrived); until
    /// the last byte of the frame that ends it.
    block_since: Option<Instant>,
    /// The frame whose payload is being skipped ends a header block.
    ends_block: bool,
    window_start: Option<Instant>,
    counts: [u32; 5],
}

impl FrameGuard {
    pub fn new(limits: FloodLimits) -> FrameGuard {
        FrameGuard {
            limits,
            header: [0; 9],
            have: 0,
            skip: 0,
            block: None,
            block_since: None,
            ends_block: false,
            window_start: None,
            counts: [0; 5],
        }
    }

    /// Looks at the next bytes the client sent (frames only, no preface); `Err` names the
    /// first limit a frame went over.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Flood> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64);
                self.skip -= n;
                bytes = &bytes[n as usize..];
                self.end_block_if_done();
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                let h = self.header;
                let len = u64::from(u32::from_be_bytes([0, h[0], h[1], h[2]]));
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.skip = len;
                self.frame(h[3], h[4], len, stream, now)?;
                self.end_block_if_done();
            }
        }
        Ok(())
    }

    /// When the header block being received began; `None` while not in one. A client that
    /// stalls inside a header block stalls the whole connection (no other frame may come
    /// between its frames), so the connection's owner cuts it after the header timeout.
    pub fn header_block_since(&self) -> Option<Instant> {
        self.block_since
    }

    fn end_block_if_done(&mut self) {
        if self.skip == 0 && self.ends_block {
            self.ends_block = false;
            self.block_since = None;
        }
    }

    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        len: u64,
        stream: u32,
        now: Instant,
    ) -> Result<(), Flood> {
        if matches!(kind, HEADERS | PUSH_PROMISE) {
            self.block_since.get_or_insert(now);
        }
        self.ends_block =
            matches!(kind, HEADERS | PUSH_PROMISE | CONTINUATION) && flags & END_HEADERS != 0;
        match kind {
            HEADERS | PUSH_PROMISE if flags & END_HEADERS == 0 => self.block = Some(0),
            HEADERS | PUSH_PROMISE => self.block = None,
            CONTINUATION => {
                let n = self.block.map_or(1, |n| n + 1);
                if n > self.limits.continuations {
                    return Err(Flood::Continuation);
                }
                self.block = (flags & END_HEADERS == 0).then_some(n);
            }
            PING if flags & ACK == 0 => self.count(0, Flood::Ping, now)?,
            SETTINGS if flags & ACK == 0 => self.count(1, Flood::Settings, now)?,
            DATA if len == 0 && flags & END_STREAM == 0 => self.count(2, Flood::EmptyData, now)?,
            WINDOW_UPDATE if stream == 0 => self.count(3, Flood::WindowUpdate, now)?,
            RST_STREAM => self.count(4, Flood::Reset, now)?,
            _ => {}
        }
        Ok(())
    }

    fn count(&mut self, i: usize, kind: Flood, now: Instant) -> Result<(), Flood> {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= WINDOW {
            self.window_start = Some(now);
            self.counts = [0; 5];
        }
        self.counts[i] += 1;
        let limit = match kind {
            Flood::Ping => self.limits.pings,
            Flood::Settings => self.limits.settings,
            Flood::EmptyData => self.limits.empty_data,
            Flood::WindowUpdate => self.limits.window_updates,
            _ => self.limits.resets,
        };
        if self.counts[i] > limit {
            return Err(kind);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FloodLimits = FloodLimits {
        pings: 3,
        settings: 2,
        empty_data: 2,
        window_updates: 2,
        resets: 2,
        continuations: 2,
        decoded_header_bytes: 1,
    };

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn feed_all(g: &mut FrameGuard, frames: &[Vec<u8>], now: Instant) -> Result<(), Flood> {
        frames.iter().try_for_each(|f| g.feed(f, now))
    }

    #[test]
    fn pings_over_the_limit_in_a_second_are_a_flood_and_acks_do_not_count() {
        let now = Instant::now();
        let mut g = FrameGuard::new(LIMITS);
        let ping = frame(PING, 0, 0, &[0; 8]);
        let ack = frame(PING, ACK, 0, &[0; 8]);
        assert_eq!(feed_all(&mut g, &[ping.clone(), ack.clone(), ack, ping.clone()], now), Ok(()));
        assert_eq!(g.feed(&ping, now), Ok(()));
        assert_eq!(g.feed(&ping, now), Err(Flood::Ping));
        // A new window starts the count again.
        let mut g = FrameGuard::new(LIMITS);
        let later = now + WINDOW;
        assert_eq!(feed_all(&mut g, &[ping.clone(), ping.clone(), ping.clone()], now), Ok(()));
        assert_eq!(g.feed(&ping, later), Ok(()));
    }

    #[test]
    fn frames_split_anywhere_are_counted_the_same() {
        let now = Instant::now();
        let mut bytes = Vec::new();
        for _ in 0..3 {
            bytes.extend(frame(DATA, 0, 1, b"hello"));
            bytes.extend(frame(DATA, 0, 1, b""));
        }
        let mut g = FrameGuard::new(LIMITS);
        let r = bytes.iter().try_for_each(|b| g.feed(std::slice::from_ref(b), now));
        assert_eq!(r, Err(Flood::EmptyData), "three empty DATA frames, one byte at a time");
        let mut g = FrameGuard::new(LIMITS);
        assert_eq!(g.feed(&bytes, now), Err(Flood::EmptyData), "all at once");
        // DATA with END_STREAM and an empty payload ends a body: not counted.
        let mut g = FrameGuard::new(LIMITS);
        let end = frame(DATA, END_STREAM, 1, b"");
        assert_eq!(feed_all(&mut g, &[end.clone(), end.clone(), end], now), Ok(()));
    }

    #[test]
    fn continuations_are_counted_per_header_block() {
        let now = Instant::now();
        let mut g = FrameGuard::new(LIMITS);
        let open = frame(HEADERS, 0, 1, b"x");
        let more = frame(CONTINUATION, 0, 1, b"x");
        let last = frame(CONTINUATION, END_HEADERS, 1, b"x");
        assert_eq!(feed_all(&mut g, &[open.clone(), more.clone(), last], now), Ok(()));
        assert_eq!(feed_all(&mut g, &[open, more.clone(), more.clone()], now), Ok(()));
        assert_eq!(g.feed(&more, now), Err(Flood::Continuation));
    }

    #[test]
    fn settings_window_updates_and_resets_have_their_own_counts() {
        let now = Instant::now();
        let mut g = FrameGuard::new(LIMITS);
        let wu0 = frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]);
        let wu1 = frame(WINDOW_UPDATE, 0, 1, &[0, 0, 1, 0]);
        let rst = frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]);
        let set = frame(SETTINGS, 0, 0, b"");
        let set_ack = frame(SETTINGS, ACK, 0, b"");
        let ok = [wu0.clone(), wu0.clone(), wu1.clone(), wu1, rst.clone(), rst.clone()];
        assert_eq!(feed_all(&mut g, &ok, now), Ok(()));
        assert_eq!(
            feed_all(&mut g, &[set.clone(), set_ack.clone(), set_ack, set.clone()], now),
            Ok(())
        );
        assert_eq!(g.feed(&set, now), Err(Flood::Settings));
        let mut g = FrameGuard::new(LIMITS);
        assert_eq!(
            feed_all(&mut g, &[wu0.clone(), wu0.clone(), wu0], now),
            Err(Flood::WindowUpdate)
        );
        let mut g = FrameGuard::new(LIMITS);
        assert_eq!(feed_all(&mut g, &[rst.clone(), rst.clone(), rst], now), Err(Flood::Reset));
    }

    #[test]
    fn a_header_block_is_open_until_the_last_byte_of_its_end() {
        let mut g = FrameGuard::new(LIMITS);
        let t0 = Instant::now();
        g.feed(&frame(HEADERS, 0, 1, b"ab"), t0).unwrap();
        assert_eq!(g.header_block_since(), Some(t0), "HEADERS without END_HEADERS");
        let end = frame(CONTINUATION, END_HEADERS, 1, b"xyz");
        let later = t0 + Duration::from_secs(1);
        g.feed(&end[..end.len() - 1], later).unwrap();
        assert_eq!(g.header_block_since(), Some(t0), "the ending frame is not whole yet");
        g.feed(&end[end.len() - 1..], later).unwrap();
        assert_eq!(g.header_block_since(), None);
        // A HEADERS frame that ends its block still counts until its payload is in.
        let whole = frame(HEADERS, END_HEADERS, 3, b"abc");
        g.feed(&whole[..10], later).unwrap();
        assert_eq!(g.header_block_since(), Some(later));
        g.feed(&whole[10..], later).unwrap();
        assert_eq!(g.header_block_since(), None);
        g.feed(&frame(PING, 0, 0, &[0; 8]), later).unwrap();
        assert_eq!(g.header_block_since(), None, "other frames open nothing");
    }
}
