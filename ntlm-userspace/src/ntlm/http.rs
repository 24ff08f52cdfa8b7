//! Incremental scanners of a connection's first HTTP/1.x messages, one per direction:
//! [`RequestScanner`] on the client's bytes, [`ResponseScanner`] on the backend's. Each is
//! fed the bytes as they are read, split anywhere, and reports every message head as it
//! completes: from a request its `Authorization` token when the scheme is `NTLM` or
//! `Negotiate` (never any other header value: a `Basic` password is not kept), from a
//! response its status. Bodies are skipped by their framing (RFC 9112 6): `Content-Length`,
//! or `chunked` with its trailer section.
//!
//! A scanner gives up for good ([`GiveUp`]) on anything it cannot frame with certainty: not
//! HTTP/1.x (TLS, the HTTP/2 preface), a head over [`MAX_HEAD`], CONNECT, a protocol upgrade,
//! a response whose body ends with the connection, conflicting or unknown framing. Interim
//! responses (1xx but 101) are skipped as RFC 9110 15.2 defines them: no body, the final
//! response follows.
//!
//! Heads are read by `httparse`; the scanners keep at most one head (or one chunk-size or
//! trailer line) buffered, never a body.

use std::{collections::VecDeque, fmt};

use httparse::Status;

use super::message::Scheme;

/// Longest request or response head (request or status line and fields), and longest
/// trailer section, in bytes: IIS's default MaxRequestBytes (http.sys), so nothing a Windows
/// backend accepts is given up on.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in one head (httparse needs a fixed array).
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line, chunk extensions included.
pub const MAX_CHUNK_LINE: usize = 1024;
/// The first bytes of a head judged as soon as they arrive, before its first line is complete
/// (a method or `HTTP/1.x` and more).
const SNIFF: usize = 64;
/// Most requests sent and not yet answered that a [`ResponseScanner`] keeps track of.
pub const MAX_PENDING: usize = 64;

/// The `Authorization` credentials of a request under `NTLM` or `Negotiate`. `Debug`
/// shows the scheme and the token's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken {
    /// The scheme.
    pub scheme: Scheme,
    /// The token, as sent (base64, not yet decoded).
    pub token: Vec<u8>,
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthToken").field("scheme", &self.scheme).field("token_len", &self.token.len()).finish()
    }
}

/// A request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Its `Authorization` token, when the scheme is `NTLM` or `Negotiate` (the first such
    /// field if there are several).
    pub auth: Option<AuthToken>,
    /// Whether the method is HEAD: its response has no body whatever its fields say.
    pub head_method: bool,
}

/// A final response head (interim responses are skipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Whether a `WWW-Authenticate` field offers the `NTLM` or `Negotiate` scheme.
    pub offers_ntlm: bool,
}

/// Why a scanner cannot follow the connection any further. Names the construct, never a
/// byte of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GiveUp {
    /// Not an HTTP/1.0 or 1.1 message (TLS, the HTTP/2 preface, garbage).
    #[error("not HTTP/1.x")]
    NotHttp1,
    /// A head (or trailer section) longer than [`MAX_HEAD`].
    #[error("a head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] header fields.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// Conflicting or unknown framing: Transfer-Encoding with Content-Length, a request
    /// Transfer-Encoding that does not end in chunked, a bad Content-Length or chunk.
    #[error("message framing that cannot be followed")]
    Framing,
    /// A CONNECT request: a tunnel follows.
    #[error("a CONNECT tunnel")]
    Connect,
    /// A request asking for a protocol upgrade, or a 101 response: another protocol follows.
    #[error("a protocol upgrade")]
    Upgrade,
    /// A response whose body ends when the connection closes.
    #[error("a response body delimited by the connection's close")]
    UntilClose,
    /// A response with no request waiting for it.
    #[error("a response to no request")]
    Unsolicited,
    /// More than [`MAX_PENDING`] requests waiting for their responses.
    #[error("more than {MAX_PENDING} requests waiting for responses")]
    Pipelined,
}

/// How the message whose head was just read goes on.
enum Framing {
    /// No body: the next message's head follows.
    None,
    /// A body of this many bytes.
    Length(u64),
    /// A chunked body.
    Chunked,
    /// The scanner stops here.
    Stop(GiveUp),
}

/// The messages a scanner reads.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Request,
    Response,
}

/// Where the scanner is in the byte stream.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Reading a head into the buffer.
    Head,
    /// In a body with this many bytes left.
    Body(u64),
    /// Reading a chunk-size line into the buffer.
    ChunkLine,
    /// In a chunk's data, this many bytes left.
    ChunkData(u64),
    /// After a chunk's data: expecting CR (false) or LF (true).
    ChunkEnd(bool),
    /// Reading the trailer section, line by line into the buffer; the bytes of its earlier
    /// lines.
    Trailer(usize),
    /// Given up for good.
    Done(GiveUp),
}

/// The framing machine both scanners share: heads are handed to the scanner's `on_head`,
/// bodies skipped.
struct Framer {
    /// Which kind of message heads it reads.
    kind: Kind,
    state: State,
    /// The head, or the chunk-size or trailer line, read so far.
    buf: Vec<u8>,
    /// How far `buf` was searched for the end of the head.
    searched: usize,
}

impl Framer {
    fn new(kind: Kind) -> Framer {
        Framer { kind, state: State::Head, buf: Vec::new(), searched: 0 }
    }

    /// Scans `bytes`; `on_head` reads each complete head and says how its message goes on.
    fn feed(&mut self, mut bytes: &[u8], mut on_head: impl FnMut(&[u8]) -> Framing) -> Result<(), GiveUp> {
        loop {
            if let State::Done(why) = self.state {
                return Err(why);
            }
            if bytes.is_empty() {
                return Ok(());
            }
            self.state = match self.state {
                State::Head => {
                    if self.buf.is_empty() {
                        // Empty lines before a message are ignored (RFC 9112 2.2).
                        let blank = bytes.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
                        bytes = &bytes[blank..];
                        if bytes.is_empty() {
                            continue;
                        }
                    }
                    let old = self.buf.len();
                    let take = bytes.len().min(MAX_HEAD - old);
                    self.buf.extend_from_slice(&bytes[..take]);
                    match head_end(&self.buf, self.searched) {
                        Some(end) => {
                            bytes = &bytes[end - old..];
                            let framing = on_head(&self.buf[..end]);
                            self.buf.clear();
                            self.searched = 0;
                            match framing {
                                Framing::None | Framing::Length(0) => State::Head,
                                Framing::Length(n) => State::Body(n),
                                Framing::Chunked => State::ChunkLine,
                                Framing::Stop(why) => State::Done(why),
                            }
                        }
                        None => {
                            bytes = &bytes[take..];
                            self.searched = self.buf.len();
                            match on_partial(self.kind, &self.buf, old) {
                                Some(why) => State::Done(why),
                                None if self.buf.len() == MAX_HEAD => State::Done(GiveUp::HeadTooLarge),
                                None => State::Head,
                            }
                        }
                    }
                }
                State::Body(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    if n == left { State::Head } else { State::Body(left - n) }
                }
                State::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    if n == left { State::ChunkEnd(false) } else { State::ChunkData(left - n) }
                }
                State::ChunkEnd(cr_seen) => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    match (cr_seen, b) {
                        (false, b'\r') => State::ChunkEnd(true),
                        (true, b'\n') => State::ChunkLine,
                        _ => State::Done(GiveUp::Framing),
                    }
                }
                State::ChunkLine => match self.line(&mut bytes, MAX_CHUNK_LINE) {
                    Err(()) => State::Done(GiveUp::Framing),
                    Ok(false) => State::ChunkLine,
                    Ok(true) => {
                        let size = chunk_size(&self.buf);
                        self.buf.clear();
                        match size {
                            Some(0) => State::Trailer(0),
                            Some(n) => State::ChunkData(n),
                            None => State::Done(GiveUp::Framing),
                        }
                    }
                },
                State::Trailer(before) => match self.line(&mut bytes, MAX_HEAD - before) {
                    Err(()) => State::Done(GiveUp::HeadTooLarge),
                    Ok(false) => State::Trailer(before),
                    Ok(true) => {
                        let line = std::mem::take(&mut self.buf);
                        match &line[..] {
                            b"\r\n" => State::Head,
                            [.., b'\r', b'\n'] => State::Trailer(before + line.len()),
                            _ => State::Done(GiveUp::Framing),
                        }
                    }
                },
                State::Done(_) => unreachable!("returned above"),
            };
        }
    }

    /// Moves bytes of a line (up to and including LF) from `bytes` into the buffer:
    /// `Ok(true)` when the line is complete, `Err` when it would exceed `max` bytes.
    fn line(&mut self, bytes: &mut &[u8], max: usize) -> Result<bool, ()> {
        let (part, done) = match bytes.iter().position(|&b| b == b'\n') {
            Some(i) => (&bytes[..=i], true),
            None => (*bytes, false),
        };
        if self.buf.len() + part.len() > max {
            return Err(());
        }
        self.buf.extend_from_slice(part);
        *bytes = &bytes[part.len()..];
        Ok(done)
    }
}

/// The length of the head at the start of `buf` when it ends there: after the first empty
/// line (`\n\n` or `\n\r\n`), searching from `from` on (what was searched before, less the
/// two bytes a terminator may reach back).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from.max(1)..buf.len())
        .find(|&i| buf[i] == b'\n' && (buf[i - 1] == b'\n' || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n')))
        .map(|i| i + 1)
}

/// A head still incomplete after bytes were added beyond `old`: its start, and its lines
/// once a new one is complete, are parsed so that what is not HTTP/1.x (a TLS record, the
/// HTTP/2 preface's first line) is given up on at once rather than at [`MAX_HEAD`]. Only
/// prefixes that do not depend on where reads split the stream are judged (the first
/// [`SNIFF`] bytes, and everything up to the last LF), and a prefix httparse rejects stays
/// rejected whatever follows, so the verdict is the same however the bytes arrive.
fn on_partial(kind: Kind, buf: &[u8], old: usize) -> Option<GiveUp> {
    let start = (old < SNIFF).then(|| &buf[..buf.len().min(SNIFF)]);
    let lines = buf.iter().rposition(|&b| b == b'\n').filter(|&lf| lf >= old).map(|lf| &buf[..=lf]);
    [start, lines].into_iter().flatten().find_map(|prefix| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = match kind {
            Kind::Request => httparse::Request::new(&mut headers).parse(prefix).map(drop),
            Kind::Response => httparse::Response::new(&mut headers).parse(prefix).map(drop),
        };
        match r {
            Ok(()) => None,
            Err(httparse::Error::TooManyHeaders) => Some(GiveUp::TooManyHeaders),
            Err(_) => Some(GiveUp::NotHttp1),
        }
    })
}

/// The size on a complete chunk-size line (`hex[;ext]\r\n`), or None when it is malformed.
fn chunk_size(line: &[u8]) -> Option<u64> {
    // httparse takes a line without digits for size 0; RFC 9112 7.1 wants at least one.
    if !line.first().is_some_and(u8::is_ascii_hexdigit) {
        return None;
    }
    match httparse::parse_chunk_size(line) {
        Ok(Status::Complete((n, size))) if n == line.len() => Some(size),
        _ => None,
    }
}

/// What the framing fields of a head say, and the fields the scanners report.
#[derive(Default)]
struct Fields {
    /// The Content-Length, if any; Err if malformed or conflicting.
    content_length: Option<Result<u64, ()>>,
    /// The transfer codings, in order, all Transfer-Encoding fields together.
    codings: Vec<Vec<u8>>,
    /// An Upgrade field is present.
    upgrade: bool,
    /// The first NTLM/Negotiate Authorization.
    auth: Option<AuthToken>,
    /// A WWW-Authenticate field offers NTLM or Negotiate.
    offers_ntlm: bool,
}

impl Fields {
    fn read(headers: &[httparse::Header<'_>]) -> Fields {
        let mut f = Fields::default();
        for h in headers {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                f.content_length = Some(content_length(h.value, f.content_length));
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                f.codings.extend(list(h.value).map(|c| c.to_ascii_lowercase()));
            } else if name.eq_ignore_ascii_case("upgrade") {
                f.upgrade = true;
            } else if name.eq_ignore_ascii_case("authorization") {
                if f.auth.is_none() {
                    f.auth = auth_token(h.value);
                }
            } else if name.eq_ignore_ascii_case("www-authenticate") {
                // Each list element starts with a scheme, or is an auth-param of the one
                // before (`Basic realm="x", charset="UTF-8"`): a scheme is the element's
                // first word. A quoted comma could make a false match; that only keeps the
                // observer watching one more exchange.
                f.offers_ntlm |= list(h.value).any(|c| Scheme::parse(first_word(c)).is_some());
            }
        }
        f
    }

    /// How a request's body is framed (RFC 9112 6.3 rules 3, 6, 7), strictly: both framings
    /// at once, or codings not ending in chunked, are given up on.
    fn request_framing(&self) -> Framing {
        match (&self.codings[..], self.content_length) {
            ([], None) => Framing::None,
            ([], Some(Ok(n))) => Framing::Length(n),
            ([.., last], None) if last == b"chunked" && chunked_once(&self.codings) => Framing::Chunked,
            _ => Framing::Stop(GiveUp::Framing),
        }
    }

    /// How a response's body is framed (RFC 9112 6.3 rules 3-5, 8), strictly.
    fn response_framing(&self) -> Framing {
        match (&self.codings[..], self.content_length) {
            ([], None) => Framing::Stop(GiveUp::UntilClose),
            ([], Some(Ok(n))) => Framing::Length(n),
            ([.., last], None) if last == b"chunked" && chunked_once(&self.codings) => Framing::Chunked,
            ([.., last], None) if last != b"chunked" && chunked_once(&self.codings) => {
                Framing::Stop(GiveUp::UntilClose)
            }
            _ => Framing::Stop(GiveUp::Framing),
        }
    }
}

/// At most one `chunked` coding (RFC 9112 7: never applied twice).
fn chunked_once(codings: &[Vec<u8>]) -> bool {
    codings.iter().filter(|c| c.as_slice() == b"chunked").count() <= 1
}

/// A Content-Length value combined with the one before: a list of equal decimal values is
/// that value (RFC 9110 8.6), anything else an error.
fn content_length(value: &[u8], before: Option<Result<u64, ()>>) -> Result<u64, ()> {
    let mut n = before.transpose()?;
    let mut any = false;
    for v in value.split(|&b| b == b',').map(trim) {
        if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let parsed = std::str::from_utf8(v).map_err(drop)?.parse::<u64>().map_err(drop)?;
        if n.is_some_and(|n| n != parsed) {
            return Err(());
        }
        n = Some(parsed);
        any = true;
    }
    if any { n.ok_or(()) } else { Err(()) }
}

/// The non-empty elements of a comma-separated field value, trimmed.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim).filter(|v| !v.is_empty())
}

/// `v` without leading and trailing spaces and tabs.
fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &v[start..end]
}

/// The first word of `v` (up to a space or tab), as text; empty if it is not UTF-8.
fn first_word(v: &[u8]) -> &str {
    let end = v.iter().position(|&b| b == b' ' || b == b'\t').unwrap_or(v.len());
    std::str::from_utf8(&v[..end]).unwrap_or("")
}

/// The token of an `Authorization` value when its scheme is NTLM or Negotiate; nothing of
/// any other scheme is kept.
fn auth_token(value: &[u8]) -> Option<AuthToken> {
    let value = trim(value);
    let scheme = Scheme::parse(first_word(value))?;
    let token = trim(&value[first_word(value).len()..]);
    (!token.is_empty()).then(|| AuthToken { scheme, token: token.to_vec() })
}

/// Scans the client's bytes for request heads.
pub struct RequestScanner {
    framer: Framer,
}

impl Default for RequestScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestScanner {
    /// A scanner at the start of a connection.
    pub fn new() -> RequestScanner {
        RequestScanner { framer: Framer::new(Kind::Request) }
    }

    /// Scans `bytes`, the next bytes from the client, appending each request head completed
    /// in them to `out`, in order. `Err`: the scanner gave up, now or before (the requests
    /// before that point are in `out`).
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Request>) -> Result<(), GiveUp> {
        self.framer.feed(bytes, |head| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(head) {
                Ok(Status::Complete(n)) if n == head.len() => {}
                Err(httparse::Error::TooManyHeaders) => return Framing::Stop(GiveUp::TooManyHeaders),
                _ => return Framing::Stop(GiveUp::NotHttp1),
            }
            let method = req.method.unwrap_or_default();
            if method == "CONNECT" {
                return Framing::Stop(GiveUp::Connect);
            }
            let fields = Fields::read(req.headers);
            let framing = fields.request_framing();
            if matches!(framing, Framing::Stop(_)) {
                return framing; // a backend refuses it: no request to report
            }
            out.push(Request { auth: fields.auth, head_method: method == "HEAD" });
            if fields.upgrade { Framing::Stop(GiveUp::Upgrade) } else { framing }
        })
    }
}

/// Scans the backend's bytes for response heads, matching them to the requests sent
/// ([`ResponseScanner::expect`]) in order, as HTTP/1.1 answers them.
pub struct ResponseScanner {
    framer: Framer,
    /// For each request sent and not yet answered, oldest first: whether it was a HEAD.
    pending: VecDeque<bool>,
}

impl Default for ResponseScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseScanner {
    /// A scanner at the start of a connection.
    pub fn new() -> ResponseScanner {
        ResponseScanner { framer: Framer::new(Kind::Response), pending: VecDeque::new() }
    }

    /// Whether every request it was told of has been answered in full: the backend's stream
    /// is between responses, where a response of the proxy's own could go instead.
    pub fn idle(&self) -> bool {
        self.pending.is_empty() && matches!(self.framer.state, State::Head) && self.framer.buf.is_empty()
    }

    /// `request` went to the backend: its response comes after those of the requests before.
    /// `Err` when too many are waiting; the scanner has then given up.
    pub fn expect(&mut self, request: &Request) -> Result<(), GiveUp> {
        if let State::Done(why) = self.framer.state {
            return Err(why);
        }
        if self.pending.len() == MAX_PENDING {
            self.framer.state = State::Done(GiveUp::Pipelined);
            return Err(GiveUp::Pipelined);
        }
        self.pending.push_back(request.head_method);
        Ok(())
    }

    /// Scans `bytes`, the next bytes from the backend, appending each final response head
    /// completed in them to `out`, in order. `Err`: the scanner gave up, now or before (the
    /// responses before that point, and the one that made it give up if its status could be
    /// read, are in `out`).
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Response>) -> Result<(), GiveUp> {
        let pending = &mut self.pending;
        self.framer.feed(bytes, |head| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(head) {
                Ok(Status::Complete(n)) if n == head.len() => {}
                Err(httparse::Error::TooManyHeaders) => return Framing::Stop(GiveUp::TooManyHeaders),
                _ => return Framing::Stop(GiveUp::NotHttp1),
            }
            let status = resp.code.unwrap_or_default();
            let fields = Fields::read(resp.headers);
            let response = Response { status, offers_ntlm: fields.offers_ntlm };
            match status {
                101 => {
                    out.push(response);
                    return Framing::Stop(GiveUp::Upgrade);
                }
                // Interim: no body, and the request's final response is still to come.
                100..=199 => return Framing::None,
                _ => {}
            }
            let Some(head_method) = pending.pop_front() else { return Framing::Stop(GiveUp::Unsolicited) };
            out.push(response);
            if head_method || status == 204 || status == 304 { Framing::None } else { fields.response_framing() }
        })
    }
}

#[cfg(test)]
#[path = "tests/http.rs"]
mod tests;
