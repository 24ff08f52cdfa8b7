//! SNI routing without terminating TLS: reading the server name from a client's TLS
//! ClientHello by peeking at its socket, and the table of server-name patterns that picks a
//! route by that name.
//!
//! Nothing here consumes a byte of the client's stream: [`peek_server_name`] only looks at
//! the socket's receive queue (`MSG_PEEK`), so the backend later receives the ClientHello
//! exactly as the client sent it, and TLS channel binding (Extended Protection for NTLM and
//! Negotiate) keeps working end to end.
//!
//! The ClientHello is parsed by tls-parser (rusticata). This module adds only what that
//! crate leaves to its caller: walking the record layer of a stream prefix, reassembling a
//! handshake message whose fragments span several records, and telling "not enough bytes
//! yet" apart from "not TLS" and "broken".

use std::{borrow::Cow, collections::HashMap, fmt, io, str::FromStr, time::Duration};

use tls_parser::{
    TlsExtension, TlsExtensionType, TlsHandshakeType, TlsRecordType, parse_tls_extension_sni_content,
    parse_tls_extension_unknown, parse_tls_handshake_client_hello, parse_tls_record_header,
};
use tokio::net::TcpStream;

use crate::sys::sock::peek_more;

#[cfg(test)]
mod tests;

/// The largest ClientHello handshake message accepted, in bytes, its 4-byte handshake header
/// included. Real ClientHellos are a few hundred bytes to a few KiB (post-quantum key shares
/// make them about 2 KiB); a longer one is refused as [`SniError::TooLarge`] as soon as its
/// declared length is seen, so a client cannot make the proxy buffer without bound.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// The most bytes of the client's stream [`peek_server_name`] looks at. This is more than
/// [`MAX_CLIENT_HELLO`] because every TLS record adds a 5-byte header: a hello cut into tiny
/// records is longer on the wire than its handshake data. A stream prefix this long that
/// still holds no complete ClientHello is refused as [`SniError::TooLarge`].
///
/// The kernel may stop the client sooner: bytes that are only peeked stay in the socket's
/// receive buffer (`net.ipv4.tcp_rmem`, 128 KiB by default), and once the advertised window
/// is used up the client cannot send more. Such a client ends in [`SniError::Timeout`].
pub const MAX_PEEK: usize = 256 * 1024;

/// The first size of the peek buffer, in bytes. It doubles, up to [`MAX_PEEK`], each time a
/// peek fills it; nearly every ClientHello fits the first one.
const INITIAL_PEEK: usize = 4 * 1024;

/// The largest fragment a TLS record may carry before encryption (RFC 8446 section 5.1,
/// RFC 5246 section 6.2.1: 2^14 bytes).
const MAX_RECORD_FRAGMENT: usize = 1 << 14;

/// Bytes in a TLS record header: content type (1), version (2), fragment length (2).
const RECORD_HEADER_LEN: usize = 5;

/// Bytes in a TLS handshake message header: message type (1), body length (3).
const HANDSHAKE_HEADER_LEN: usize = 4;

/// The major record-layer version byte of every SSL 3.0 to TLS 1.3 record.
const RECORD_VERSION_MAJOR: u8 = 3;

/// The highest minor record-layer version byte believed (TLS 1.3 would be 4, though it
/// freezes the field at 3 or 1); anything above is not TLS as anyone speaks it.
const RECORD_VERSION_MINOR_MAX: u8 = 4;

/// The longest DNS host name, in characters, without a trailing dot (RFC 1035 section 2.3.4).
const MAX_HOST_NAME: usize = 253;

/// The longest label of a DNS host name, in characters (RFC 1035 section 2.3.4).
const MAX_LABEL: usize = 63;

/// What a prefix of the client's stream says about its ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// The whole ClientHello has arrived.
    Complete {
        /// The server name the client asked for: lowercased, without a trailing dot. `None`
        /// when the hello has no `server_name` extension, no `host_name` entry in it, or a
        /// name that is not a valid DNS host name (see [`parse_client_hello`]).
        server_name: Option<String>,
    },
    /// Every byte so far fits a ClientHello, but it is not complete yet: wait for more.
    Incomplete,
}

/// Why no server name could be read from a client. Every message fits one log line and
/// carries no byte of what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum SniError {
    /// The stream does not start with a TLS handshake record (SSLv2-compatible hellos
    /// included).
    #[error(
        "the client did not start with a TLS handshake record, so there is no server name to route by \
         (a plain TCP, HTTP or SSLv2 client on a TLS port?); serve such clients on a listen address \
         without `sni` routes"
    )]
    NotTls,
    /// The stream starts as TLS, but its records or its ClientHello are broken.
    #[error("malformed TLS ClientHello from the client: {0}; the client's TLS stack is broken or this is not TLS")]
    Malformed(String),
    /// The ClientHello is longer than [`MAX_CLIENT_HELLO`] bytes of handshake data, or the
    /// first [`MAX_PEEK`] bytes of the stream do not hold a complete one.
    #[error(
        "the client's TLS ClientHello is longer than {} bytes of handshake data (or {} bytes of records), \
         the most this proxy reads to find a server name; such a client cannot be routed by name",
        MAX_CLIENT_HELLO,
        MAX_PEEK
    )]
    TooLarge,
    /// The client closed its side of the connection before its ClientHello was complete.
    #[error(
        "the client closed the connection after {got} bytes, before its TLS ClientHello was complete \
         (a port scanner or a client that gave up)"
    )]
    Eof {
        /// How many bytes the client sent before its end of stream.
        got: usize,
    },
    /// No complete ClientHello arrived within the timeout given to [`peek_server_name`].
    #[error(
        "no complete TLS ClientHello arrived within the SNI timeout (the client sent nothing, or too \
         slowly); raise `sni_timeout` if real clients are that slow"
    )]
    Timeout,
    /// Peeking at the client's socket failed (a reset, for instance).
    #[error("reading the client's TLS ClientHello from its socket failed")]
    Io(#[source] io::Error),
}

/// Reads the server name from the start of a client's stream.
///
/// `buf` is the client's stream from its first byte on, as far as it has arrived. A
/// ClientHello split over several TLS records is reassembled (the fragments of consecutive
/// handshake records, RFC 8446 section 5.1); bytes after the ClientHello are ignored.
///
/// Returns [`Hello::Incomplete`] for every prefix of a valid ClientHello, and
/// [`Hello::Complete`] once all of it is in `buf`. The server name is the first (and, as
/// RFC 6066 requires, only) `host_name` entry of the `server_name` extension, lowercased,
/// without a trailing dot. A name that is not a valid DNS host name is reported as no name
/// (`server_name: None`), so such a client goes to the default route: a valid name is 1 to
/// 253 characters of dot-separated labels, each 1 to 63 letters, digits, hyphens and
/// underscores, neither starting nor ending with a hyphen, the last label not all digits (so
/// an IP address literal, which RFC 6066 forbids here, is no name either). Underscores are
/// accepted although DNS host names have none, because Windows networks do have such hosts
/// and browsers send their names.
///
/// # Errors
///
/// [`SniError::NotTls`] when the first bytes are not a TLS handshake record header with a
/// plausible version (SSL 3.0 to TLS 1.3), which includes SSLv2-compatible hellos;
/// [`SniError::Malformed`] for broken records, a first handshake message that is not a
/// ClientHello, or a ClientHello that does not parse; [`SniError::TooLarge`] when the
/// ClientHello declares more than [`MAX_CLIENT_HELLO`] bytes.
pub fn parse_client_hello(buf: &[u8]) -> Result<Hello, SniError> {
    match client_hello_message(buf)? {
        None => Ok(Hello::Incomplete),
        Some(message) => Ok(Hello::Complete { server_name: server_name_of(&message[HANDSHAKE_HEADER_LEN..])? }),
    }
}

/// Peeks at a client's socket until its ClientHello is complete and returns the server
/// name in it (see [`parse_client_hello`] for what counts as a name). No byte is consumed:
/// whoever reads `stream` afterwards gets the client's stream from its first byte.
///
/// Between peeks it waits for new bytes to arrive, without spinning: a peek that sees no new
/// byte reports `WouldBlock` to tokio, which clears the socket's readiness, so the next
/// wake-up comes from new data (or the end of stream). A client that sends one byte at a
/// time costs one peek of the whole prefix per byte, bounded by [`MAX_PEEK`] and the timeout.
///
/// After `Ok` and after every error but [`SniError::Timeout`] and [`SniError::Io`], the
/// stream is ready to be read as usual. A peek that times out may have left tokio's read
/// readiness cleared while bytes are queued, so a reader would wait for new bytes first;
/// close such a connection (a timeout calls for it), or register the socket afresh
/// (`TcpStream::from_std(stream.into_std()?)`) to read it.
///
/// # Errors
///
/// Those of [`parse_client_hello`]; [`SniError::Eof`] when the client ends its stream
/// before the ClientHello is complete; [`SniError::Timeout`] when the ClientHello is not
/// complete within `timeout`; [`SniError::TooLarge`] also when the first [`MAX_PEEK`] bytes
/// hold no complete ClientHello; [`SniError::Io`] when the peek fails.
pub async fn peek_server_name(stream: &TcpStream, timeout: Duration) -> Result<Option<String>, SniError> {
    tokio::time::timeout(timeout, peek_hello(stream)).await.unwrap_or(Err(SniError::Timeout))
}

/// The loop of [`peek_server_name`], without its timeout.
async fn peek_hello(stream: &TcpStream) -> Result<Option<String>, SniError> {
    // How the wait for more bytes works (no spinning, nothing left set on the socket, the EOF
    // of a client that sent half a hello) is `peek_more`'s. SO_RCVLOWAT set to the missing
    // count was the alternative: that count is not known before the record and handshake
    // headers are in, and it would be state left on a socket an engine later uses.
    let mut buf = vec![0u8; INITIAL_PEEK];
    let mut seen = 0;
    loop {
        let (n, closed) = peek_more(stream, &mut buf, seen).await.map_err(SniError::Io)?;
        if n == 0 {
            return Err(SniError::Eof { got: 0 });
        }
        seen = n;
        match parse_client_hello(&buf[..n])? {
            Hello::Complete { server_name } => return Ok(server_name),
            Hello::Incomplete if n == buf.len() => {
                if buf.len() >= MAX_PEEK {
                    return Err(SniError::TooLarge);
                }
                buf.resize((buf.len() * 2).min(MAX_PEEK), 0);
            }
            Hello::Incomplete if closed => return Err(SniError::Eof { got: n }),
            Hello::Incomplete => {}
        }
    }
}

/// Walks the TLS records at the start of `buf` and returns the ClientHello handshake
/// message (its 4-byte header included) once it is complete, `None` while it is not.
/// Borrows from `buf` when one record holds the whole message.
fn client_hello_message(buf: &[u8]) -> Result<Option<Cow<'_, [u8]>>, SniError> {
    // Fail fast on the first bytes, before a whole header is in: an HTTP request or an
    // SSLv2 hello is refused on its first byte.
    if buf.first().is_some_and(|&t| t != TlsRecordType::Handshake.0)
        || buf.get(1).is_some_and(|&major| major != RECORD_VERSION_MAJOR)
        || buf.get(2).is_some_and(|&minor| minor > RECORD_VERSION_MINOR_MAX)
    {
        return Err(SniError::NotTls);
    }
    let mut rest = buf;
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    loop {
        if let Some(&[kind, l0, l1, l2]) = message.get(..HANDSHAKE_HEADER_LEN) {
            if kind != TlsHandshakeType::ClientHello.0 {
                return Err(SniError::Malformed(format!(
                    "the first handshake message is of type {kind}, not a ClientHello (1)"
                )));
            }
            let body_len = usize::try_from(u32::from_be_bytes([0, l0, l1, l2])).unwrap_or(usize::MAX);
            let len = HANDSHAKE_HEADER_LEN.saturating_add(body_len);
            if len > MAX_CLIENT_HELLO {
                return Err(SniError::TooLarge);
            }
            if message.len() >= len {
                return Ok(Some(match message {
                    Cow::Borrowed(m) => Cow::Borrowed(&m[..len]),
                    Cow::Owned(mut m) => {
                        m.truncate(len);
                        Cow::Owned(m)
                    }
                }));
            }
        }
        let Some(fragment) = next_record(&mut rest)? else {
            return Ok(None);
        };
        if message.is_empty() {
            message = Cow::Borrowed(fragment);
        } else {
            message.to_mut().extend_from_slice(fragment);
        }
    }
}

/// Takes the next complete handshake record off the front of `rest` and returns its
/// fragment; `None` when the record is not complete yet.
fn next_record<'a>(rest: &mut &'a [u8]) -> Result<Option<&'a [u8]>, SniError> {
    if rest.len() < RECORD_HEADER_LEN {
        return Ok(None);
    }
    let (body, header) = parse_tls_record_header(rest)
        .map_err(|_| SniError::Malformed("a TLS record header does not parse".to_owned()))?;
    if header.record_type != TlsRecordType::Handshake {
        return Err(SniError::Malformed(format!(
            "a record of content type {} came before the ClientHello was complete",
            header.record_type.0
        )));
    }
    let [major, minor] = header.version.0.to_be_bytes();
    if major != RECORD_VERSION_MAJOR || minor > RECORD_VERSION_MINOR_MAX {
        return Err(SniError::Malformed(format!("a record has version {:#06x}", header.version.0)));
    }
    let len = usize::from(header.len);
    if len == 0 || len > MAX_RECORD_FRAGMENT {
        return Err(SniError::Malformed(format!(
            "a handshake record is {len} bytes long (1 to {MAX_RECORD_FRAGMENT} allowed)"
        )));
    }
    let Some((fragment, after)) = body.split_at_checked(len) else {
        return Ok(None);
    };
    *rest = after;
    Ok(Some(fragment))
}

/// The server name in a complete ClientHello body (the message after its 4-byte header).
fn server_name_of(body: &[u8]) -> Result<Option<String>, SniError> {
    let (after, hello) = parse_tls_handshake_client_hello(body)
        .map_err(|e| SniError::Malformed(format!("the ClientHello does not parse ({})", nom_reason(&e))))?;
    if !after.is_empty() {
        return Err(SniError::Malformed(
            "the ClientHello's extensions block does not end where the message ends".to_owned(),
        ));
    }
    let mut extensions = hello.ext.unwrap_or_default();
    let mut server_name = None;
    while !extensions.is_empty() {
        // Every extension is taken as opaque bytes here, so an extension that tls-parser
        // would judge strictly cannot lose a client its route; only server_name is parsed.
        let (next, extension) = parse_tls_extension_unknown(extensions)
            .map_err(|_| SniError::Malformed("an extension runs past the end of the extensions block".to_owned()))?;
        extensions = next;
        if let TlsExtension::Unknown(TlsExtensionType::ServerName, data) = extension {
            // RFC 8446 section 4.2: no extension type twice. A router taking the first name
            // and a backend taking the last would disagree on where the client goes.
            if server_name.is_some() {
                return Err(SniError::Malformed("the server_name extension appears twice".to_owned()));
            }
            server_name = Some(host_name_entry(data)?);
        }
    }
    Ok(server_name.flatten().and_then(normalize_host_name))
}

/// The `host_name` entry of a `server_name` extension's data, if it has one.
fn host_name_entry(data: &[u8]) -> Result<Option<&[u8]>, SniError> {
    let malformed = || SniError::Malformed("the server_name extension does not parse".to_owned());
    let (_, parsed) = parse_tls_extension_sni_content(data).map_err(|_| malformed())?;
    let TlsExtension::SNI(entries) = parsed else {
        return Err(malformed());
    };
    // tls-parser stops at the first entry it cannot read and ignores what follows; the
    // entries it read must account for every byte of the list (2-byte list length, then
    // a 1-byte type and a 2-byte length before each name), or the list is broken.
    let listed: usize = entries.iter().map(|(_, name)| 3 + name.len()).sum();
    if entries.is_empty() || data.len() != 2 + listed {
        return Err(malformed());
    }
    let mut host_names = entries.iter().filter(|(kind, _)| *kind == tls_parser::SNIType::HostName);
    let first = host_names.next().map(|&(_, name)| name);
    if host_names.next().is_some() {
        return Err(SniError::Malformed("the server_name extension lists two host names".to_owned()));
    }
    Ok(first)
}

/// A short, payload-free description of a nom parse error.
fn nom_reason(e: &tls_parser::nom::Err<tls_parser::nom::error::Error<&[u8]>>) -> String {
    match e {
        tls_parser::nom::Err::Incomplete(_) => "a field runs past the end of the message".to_owned(),
        tls_parser::nom::Err::Error(e) | tls_parser::nom::Err::Failure(e) => e.code.description().to_owned(),
    }
}

/// `name` lowercased and without one trailing dot, if it is a valid host name (see
/// [`parse_client_hello`] for the rules); `None` otherwise.
fn normalize_host_name(name: &[u8]) -> Option<String> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let valid_label = |label: &[u8]| {
        (1..=MAX_LABEL).contains(&label.len())
            && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-')
    };
    let valid = (1..=MAX_HOST_NAME).contains(&name.len())
        && name.split(|&b| b == b'.').all(valid_label)
        && !name.rsplit(|&b| b == b'.').next().is_some_and(|last| last.iter().all(u8::is_ascii_digit));
    valid.then(|| name.iter().map(|&b| char::from(b.to_ascii_lowercase())).collect())
}

/// A server-name pattern of a route: an exact host name (`intranet.example.net`) or a
/// wildcard (`*.corp.example.net`) that matches names with one or more labels before the
/// suffix (`a.corp.example.net`, `a.b.corp.example.net`, not `corp.example.net`), as
/// nginx's `server_name *.example.org`. Matching ignores case and a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SniPattern {
    /// What the pattern matches.
    kind: PatternKind,
}

/// The two shapes of [`SniPattern`], names kept normalized (lowercase, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PatternKind {
    /// This name only.
    Exact(String),
    /// Any name ending in `.` and this suffix, with at least one label before it.
    Wildcard(String),
}

/// A string that is not a server-name pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{pattern}` is not a server name pattern: write a host name (intranet.example.net) or `*.` \
     followed by one (*.corp.example.net); labels are letters, digits, `-` and `_`"
)]
pub struct SniPatternError {
    /// The rejected text.
    pub pattern: String,
}

impl FromStr for SniPattern {
    type Err = SniPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || SniPatternError { pattern: s.to_owned() };
        let kind = match s.strip_prefix("*.") {
            Some(suffix) => PatternKind::Wildcard(normalize_host_name(suffix.as_bytes()).ok_or_else(err)?),
            None => PatternKind::Exact(normalize_host_name(s.as_bytes()).ok_or_else(err)?),
        };
        Ok(Self { kind })
    }
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            PatternKind::Exact(name) => f.write_str(name),
            PatternKind::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// A pattern given to [`SniTable::insert`] twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server name pattern `{pattern}` is listed twice on one listen address; keep it in one route only")]
pub struct Duplicate {
    /// The pattern already in the table.
    pub pattern: SniPattern,
}

/// Picks a value (a route) by server name: an exact pattern first, then the wildcard with
/// the longest matching suffix, then the default. Lookups cost one hash probe per label.
#[derive(Debug, Clone)]
pub struct SniTable<T> {
    /// Exact patterns by name.
    exact: HashMap<String, T>,
    /// Wildcard patterns by suffix (without the `*.`).
    wildcard: HashMap<String, T>,
    /// For clients with no (valid) name, or one no pattern matches.
    default: Option<T>,
}

impl<T> Default for SniTable<T> {
    fn default() -> Self {
        Self { exact: HashMap::new(), wildcard: HashMap::new(), default: None }
    }
}

impl<T> SniTable<T> {
    /// An empty table: no patterns, no default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pattern.
    ///
    /// # Errors
    ///
    /// [`Duplicate`] when the table has this pattern already; the table is left unchanged.
    pub fn insert(&mut self, pattern: SniPattern, value: T) -> Result<(), Duplicate> {
        let (map, key) = match &pattern.kind {
            PatternKind::Exact(name) => (&mut self.exact, name),
            PatternKind::Wildcard(suffix) => (&mut self.wildcard, suffix),
        };
        if map.contains_key(key) {
            return Err(Duplicate { pattern });
        }
        map.insert(key.clone(), value);
        Ok(())
    }

    /// Sets the value for names that no pattern matches and for clients without a name,
    /// replacing any earlier default.
    pub fn set_default(&mut self, value: T) {
        self.default = Some(value);
    }

    /// The value for a server name: the exact pattern for it, else the wildcard with the
    /// longest suffix that matches it, else the default. `None` (no name) and names that
    /// are not valid host names (see [`parse_client_hello`]) get the default. Case and a
    /// trailing dot do not matter. `None` when nothing matches and there is no default.
    pub fn lookup(&self, name: Option<&str>) -> Option<&T> {
        let Some(name) = name.and_then(|name| normalize_host_name(name.as_bytes())) else {
            return self.default.as_ref();
        };
        if let Some(value) = self.exact.get(&name) {
            return Some(value);
        }
        // The suffixes after each dot, longest first: the first one found is the longest
        // match, and every one leaves at least one label before it.
        name.match_indices('.').find_map(|(dot, _)| self.wildcard.get(&name[dot + 1..])).or(self.default.as_ref())
    }
}
