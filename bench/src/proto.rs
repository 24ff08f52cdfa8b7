//! The 16-byte header a client sends first on every connection, and the payload pattern.
//!
//! Proxies forward bytes blindly, so the header travels through them to the backend and
//! tells it what this connection is for. Payload bytes follow a fixed pattern with a
//! prime period, so a lost, duplicated or reordered chunk of any usual size (a loopback
//! MSS of 65,483 bytes, a 64 KiB pipe) shows up as a mismatch at a known offset.

/// First four bytes of every header.
pub const MAGIC: [u8; 4] = *b"NTB1";
/// Size of the header.
pub const HEADER_LEN: usize = 16;
/// Size of the acknowledgement a sink sends after the client's EOF: bytes received (u64 LE),
/// then the stream offset of the first mismatch, or `u64::MAX` (u64 LE).
pub const ACK_LEN: usize = 16;
/// Largest chunk moved by one read or write of bulk data.
pub const CHUNK: usize = 256 << 10;
/// Period of the payload pattern: prime, so no power-of-two chunk size lines up with it.
pub const PERIOD: usize = 251;
/// Header flag: the backend checks every received byte against the pattern.
pub const FLAG_VERIFY: u8 = 1;
/// `first_bad` value meaning "every byte matched" (or nothing was checked).
pub const NO_MISMATCH: u64 = u64::MAX;

/// What the backend does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Read until EOF, then send an [`ACK_LEN`]-byte acknowledgement and close.
    Sink,
    /// Send `n` pattern bytes, then shut down writing and wait for the client's EOF.
    Source,
    /// Request/response: read `req` bytes, answer `resp` pattern bytes, until EOF.
    Echo {
        /// Request size in bytes.
        req: u32,
        /// Response size in bytes.
        resp: u32,
    },
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What to do.
    pub mode: Mode,
    /// [`FLAG_VERIFY`] or 0.
    pub flags: u8,
    /// Byte count for [`Mode::Source`]; 0 otherwise.
    pub n: u64,
    /// Pacing rate of a source's sends in Mbit/s (`SO_MAX_PACING_RATE` on the backend's
    /// socket), or 0 for none. Bytes 6-7 of the header, little-endian.
    pub pace_mbit: u16,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let (mode, arg) = match self.mode {
            Mode::Sink => (1u8, 0u64),
            Mode::Source => (2, self.n),
            Mode::Echo { req, resp } => (3, u64::from(req) | (u64::from(resp) << 32)),
        };
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4] = mode;
        h[5] = self.flags;
        h[6..8].copy_from_slice(&self.pace_mbit.to_le_bytes());
        h[8..].copy_from_slice(&arg.to_le_bytes());
        h
    }

    /// Decodes a header, or says why it is not one.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Header, String> {
        if h[..4] != MAGIC {
            return Err(format!("bad magic {:02x?}", &h[..4]));
        }
        let arg = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
        let mode = match h[4] {
            1 => Mode::Sink,
            2 => Mode::Source,
            3 => {
                let (req, resp) = (arg as u32, (arg >> 32) as u32);
                if req == 0 || req as usize > CHUNK || resp as usize > CHUNK {
                    return Err(format!("echo sizes out of range: req={req} resp={resp}"));
                }
                Mode::Echo { req, resp }
            }
            m => return Err(format!("unknown mode {m}")),
        };
        let n = if mode == Mode::Source { arg } else { 0 };
        let pace_mbit = u16::from_le_bytes([h[6], h[7]]);
        Ok(Header { mode, flags: h[5], n, pace_mbit })
    }
}

/// The pattern byte at stream offset `i`.
fn pattern_byte(i: usize) -> u8 {
    ((i % PERIOD) * 131 % PERIOD) as u8
}

/// A buffer of [`CHUNK`] + [`PERIOD`] pattern bytes: any window of up to [`CHUNK`] bytes
/// starting at any stream offset is one slice of it ([`pattern_at`]).
pub fn pattern_buf() -> Vec<u8> {
    (0..CHUNK + PERIOD).map(pattern_byte).collect()
}

/// The `len` (at most [`CHUNK`]) pattern bytes that start at stream offset `offset`.
pub fn pattern_at(buf: &[u8], offset: u64, len: usize) -> &[u8] {
    let start = (offset % PERIOD as u64) as usize;
    &buf[start..start + len]
}

/// The offset of the first byte of `got` (which starts at stream offset `offset`) that
/// differs from the pattern.
pub fn first_mismatch(buf: &[u8], offset: u64, got: &[u8]) -> Option<u64> {
    let want = pattern_at(buf, offset, got.len());
    if got == want {
        return None;
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    Some(offset + i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for h in [
            Header { mode: Mode::Sink, flags: FLAG_VERIFY, n: 0, pace_mbit: 0 },
            Header { mode: Mode::Source, flags: 0, n: 1 << 40, pace_mbit: 40 },
            Header { mode: Mode::Echo { req: 64, resp: 1 }, flags: 0, n: 0, pace_mbit: 0 },
        ] {
            assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
        let mut bad = Header { mode: Mode::Sink, flags: 0, n: 0, pace_mbit: 0 }.encode();
        bad[0] = b'X';
        assert!(Header::decode(&bad).is_err());
    }

    #[test]
    fn pattern_windows_agree_with_the_stream() {
        let buf = pattern_buf();
        let stream: Vec<u8> = (0..3 * CHUNK).map(pattern_byte).collect();
        for offset in [0usize, 1, 250, 251, 65_483, CHUNK, 2 * CHUNK - 7] {
            let len = CHUNK.min(stream.len() - offset);
            assert_eq!(pattern_at(&buf, offset as u64, len), &stream[offset..offset + len]);
        }
        // A duplicated loopback MSS is caught where it starts.
        let mut dup = stream[..65_483].to_vec();
        dup.extend_from_slice(&stream[..1000]);
        assert_eq!(first_mismatch(&buf, 0, &dup[..CHUNK.min(dup.len())]), Some(65_483));
        assert_eq!(first_mismatch(&buf, 7, &stream[7..1007]), None);
    }
}
