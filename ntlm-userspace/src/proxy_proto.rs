//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): reading the header
//! an outer load balancer puts before a client's stream, building the header this proxy puts
//! before the stream it opens to a backend, and the list of sources trusted to send one.
//!
//! [`read_header`] consumes exactly the header's bytes and not one more: it peeks at the
//! socket (`MSG_PEEK`) until the header is complete, then reads that many bytes, so what
//! follows the header (the client's TLS ClientHello, say) stays queued for the backend.
//!
//! Headers are parsed and built by the `ppp` crate. This module adds what that crate leaves to
//! its caller: telling "not a header" from "not enough bytes yet" for v1 (ppp's partial-input
//! verdict on a v1 prefix is not final, so v1 is parsed only once its CRLF is in), a cap on the
//! v2 length, the validation of v2 TLVs (their bounds, the authority, the CRC32C checksum), and
//! the mapping of IPv4-mapped IPv6 addresses.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use ppp::v2::{Command, Protocol, Type};
use tokio::net::TcpStream;

use crate::sys::sock::peek_more;

#[cfg(test)]
mod tests;

/// The longest v1 header, in bytes, its CRLF included (`proxy-protocol.txt` section 2.1: the
/// worst case, `PROXY UNKNOWN` with two full IPv6 addresses and ports). A v1 header whose
/// first this many bytes hold no CRLF is refused as [`ProxyError::TooLarge`].
pub const MAX_V1_HEADER: usize = 107;

/// The longest v2 header accepted, in bytes: its 16-byte fixed part, the addresses and every
/// TLV. The protocol allows 16 + 65535; real balancers send at most a few hundred bytes (AWS
/// NLB's VPC endpoint TLV, HAProxy's SSL TLVs with a certificate's common name). A header that
/// declares more is refused as [`ProxyError::TooLarge`] as soon as its length field is in, so
/// a client cannot make the proxy buffer without bound.
pub const MAX_V2_HEADER: usize = 4096;

/// The longest authority (TLS server name) [`build_v2`] sends: a DNS name is at most 253
/// characters (RFC 1035 section 2.3.4), so 255 leaves room for a trailing dot. A received
/// authority longer than this is refused as malformed.
pub const MAX_AUTHORITY: usize = 255;

/// What starts a v1 header.
const V1_PREFIX: &[u8] = b"PROXY ";

/// Bytes in the fixed part of a v2 header: signature (12), version and command (1), family
/// and protocol (1), length of the rest (2).
const V2_FIXED: usize = 16;

/// The v2 TLV type of the authority: the host name the client asked for (its TLS SNI).
const PP2_TYPE_AUTHORITY: u8 = 0x02;

/// The v2 TLV type of the CRC32C checksum of the whole header.
const PP2_TYPE_CRC32C: u8 = 0x03;

/// How many of a client's first bytes a [`ProxyError::NoHeader`] quotes (escaped): enough to
/// tell TLS (`\x16\x03\x01`) or HTTP (`GET /`) from a broken balancer, too few to carry a
/// credential.
const QUOTED_PREFIX: usize = 8;

/// The client's addresses a PROXY header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Addresses {
    /// The client's address and port, as the balancer saw it. IPv4-mapped IPv6 addresses
    /// (`::ffff:192.0.2.7`) are given as IPv4, as the same client reaching this proxy directly
    /// over IPv4 would be.
    pub source: SocketAddr,
    /// The address and port the client connected to on the balancer (mapped the same way).
    pub destination: SocketAddr,
}

/// A complete PROXY header, v1 or v2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// A proxied TCP connection over IPv4 or IPv6: v1 `TCP4`/`TCP6`, or v2 `PROXY` with the
    /// `INET`/`INET6` family and the `STREAM` protocol.
    Proxy {
        /// The client's addresses.
        addresses: Addresses,
        /// The v2 `PP2_TYPE_AUTHORITY` TLV: the host name the client asked the balancer for
        /// (its TLS server name), when the balancer sent one. Always `None` for v1.
        authority: Option<String>,
    },
    /// A v2 `LOCAL` command: the balancer's own connection (a health check), not a client's.
    /// HAProxy 2.6 also sends `LOCAL` for clients that reached it over a Unix socket.
    Local,
    /// A connection whose addresses the header does not give: v1 `UNKNOWN`, or a v2 `PROXY`
    /// with the `UNSPEC` or `UNIX` family or the `UNSPEC` protocol. The protocol says to use
    /// the socket's own addresses then.
    Unknown,
}

/// What a prefix of a client's stream says about its PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The whole header has arrived.
    Complete {
        /// The header.
        header: Header,
        /// Its length in bytes: where the client's own stream starts. Never more than the
        /// bytes given to [`parse_header`].
        len: usize,
    },
    /// Every byte so far fits a PROXY header, but it is not complete yet: wait for more.
    Incomplete,
}

/// Why no PROXY header could be read from a connection. Every message fits one log line and
/// quotes at most [`QUOTED_PREFIX`] bytes of what the peer sent, escaped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The stream does not start with a PROXY v1 or v2 header.
    #[error(
        "the connection did not start with a PROXY protocol header (it began with \"{start}\"); the balancer \
         in front must send one (HAProxy `send-proxy` or `send-proxy-v2`), or remove its address from \
         `accept_proxy_from`"
    )]
    NoHeader {
        /// The first bytes of the stream, at most [`QUOTED_PREFIX`], escaped as in a Rust
        /// byte string.
        start: String,
    },
    /// The stream starts as a PROXY header, but the header is broken.
    #[error("malformed PROXY protocol header: {0}; the balancer in front is broken or is not a PROXY sender")]
    Malformed(String),
    /// A v1 header without its CRLF in the first [`MAX_V1_HEADER`] bytes, or a v2 header
    /// longer than [`MAX_V2_HEADER`] bytes.
    #[error(
        "the PROXY protocol header is longer than this proxy accepts ({} bytes for v1, {} for v2 with its \
         TLVs); turn off the balancer's extra TLVs or send v1",
        MAX_V1_HEADER,
        MAX_V2_HEADER
    )]
    TooLarge,
    /// No complete header arrived within the timeout given to [`read_header`].
    #[error(
        "no complete PROXY protocol header arrived within the timeout (the peer sent nothing, or too slowly); \
         raise the PROXY header timeout if the balancer is that slow"
    )]
    Timeout,
    /// The peer closed its side of the connection before the header was complete.
    #[error(
        "the peer closed the connection after {got} bytes, before its PROXY protocol header was complete \
         (a port scanner or a balancer that gave up)"
    )]
    Eof {
        /// How many bytes the peer sent before its end of stream.
        got: usize,
    },
    /// Peeking at or reading from the socket failed (a reset, for instance).
    #[error("reading the PROXY protocol header from the socket failed")]
    Io(#[source] io::Error),
}

/// Reads the PROXY header at the start of `buf`, the stream from its first byte on, as far as
/// it has arrived. Bytes after the header are not looked at.
///
/// The version is told by the first bytes: `PROXY ` starts a v1 header, the 12-byte signature
/// `\r\n\r\n\0\r\nQUIT\n` a v2 header. A v1 header is complete at its CRLF, a v2 header when
/// the length its fixed part declares has arrived. Returns [`Parsed::Incomplete`] for every
/// prefix of a valid header (a v1 header is only checked once its CRLF is in). Once it returns
/// anything else, more bytes do not change the answer.
///
/// v2 TLVs must lie within the header; an authority TLV must be UTF-8 of at most
/// [`MAX_AUTHORITY`] bytes, and appear once; a CRC32C TLV must match the header. Other TLVs
/// are skipped. A v2 `PROXY` with the `DGRAM` protocol (UDP) is refused: this is a TCP
/// connection.
///
/// # Errors
///
/// [`ProxyError::NoHeader`] as soon as the first bytes differ from both starts;
/// [`ProxyError::Malformed`] for a header that does not parse; [`ProxyError::TooLarge`] for a
/// v1 header without a CRLF in its first [`MAX_V1_HEADER`] bytes or a v2 header declaring more
/// than [`MAX_V2_HEADER`] bytes.
pub fn parse_header(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let v2_signature = ppp::v2::PROTOCOL_PREFIX;
    if v2_signature.starts_with(&buf[..buf.len().min(v2_signature.len())]) {
        parse_v2(buf)
    } else if V1_PREFIX.starts_with(&buf[..buf.len().min(V1_PREFIX.len())]) {
        parse_v1(buf)
    } else {
        Err(ProxyError::NoHeader { start: buf[..buf.len().min(QUOTED_PREFIX)].escape_ascii().to_string() })
    }
}

/// ppp's error message with its line breaks escaped: one of them is "Header must end in
/// '\r\n'." with a real CR LF, which would split a log line.
fn one_line(e: &impl fmt::Display) -> String {
    e.to_string().replace('\r', "\\r").replace('\n', "\\n")
}

/// [`parse_header`] for a stream that starts as a v1 header (or a prefix of `PROXY `).
fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // ppp judges a v1 prefix by splitting it at spaces, so some prefixes of a valid header
    // (one that ends in the space after the source port) read as broken: parse only the
    // complete line, found here by its CR.
    let window = &buf[..buf.len().min(MAX_V1_HEADER)];
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= MAX_V1_HEADER { Err(ProxyError::TooLarge) } else { Ok(Parsed::Incomplete) };
    };
    if window[cr] == b'\n' {
        return Err(ProxyError::Malformed("a v1 header has a LF without a CR before it".to_owned()));
    }
    let len = cr + 2;
    if len > MAX_V1_HEADER {
        return Err(ProxyError::TooLarge);
    }
    match buf.get(cr + 1) {
        None => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::Malformed("a v1 header has a CR not followed by a LF".to_owned())),
    }
    let parsed = ppp::v1::Header::try_from(&buf[..len])
        .map_err(|e| ProxyError::Malformed(format!("the v1 header does not parse ({})", one_line(&e))))?;
    let header = match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => proxied(
            SocketAddrV4::new(a.source_address, a.source_port).into(),
            SocketAddrV4::new(a.destination_address, a.destination_port).into(),
            None,
        ),
        ppp::v1::Addresses::Tcp6(a) => proxied(
            SocketAddrV6::new(a.source_address, a.source_port, 0, 0).into(),
            SocketAddrV6::new(a.destination_address, a.destination_port, 0, 0).into(),
            None,
        ),
        ppp::v1::Addresses::Unknown => Header::Unknown,
    };
    Ok(Parsed::Complete { header, len })
}

/// [`parse_header`] for a stream that starts as a v2 header (or a prefix of its signature).
fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    use ppp::v2::ParseError;
    let parsed = match ppp::v2::Header::try_from(buf) {
        Ok(parsed) => parsed,
        Err(ParseError::Incomplete(_)) => return Ok(Parsed::Incomplete),
        Err(ParseError::Partial(_, length)) if V2_FIXED + length > MAX_V2_HEADER => {
            return Err(ProxyError::TooLarge);
        }
        Err(ParseError::Partial(..)) => return Ok(Parsed::Incomplete),
        Err(e) => return Err(ProxyError::Malformed(format!("the v2 header does not parse ({})", one_line(&e)))),
    };
    let len = parsed.len();
    // The same answer whether the bytes came all at once or the length field alone first.
    if len > MAX_V2_HEADER {
        return Err(ProxyError::TooLarge);
    }
    // LOCAL: "the receiver must ... discard the protocol block including the family".
    if parsed.command == Command::Local {
        return Ok(Parsed::Complete { header: Header::Local, len });
    }
    let authority = v2_authority(&parsed)?;
    let header = match (parsed.protocol, parsed.addresses) {
        (Protocol::Datagram, _) => {
            return Err(ProxyError::Malformed("a v2 header for a UDP flow arrived on a TCP connection".to_owned()));
        }
        (Protocol::Stream, ppp::v2::Addresses::IPv4(a)) => proxied(
            SocketAddrV4::new(a.source_address, a.source_port).into(),
            SocketAddrV4::new(a.destination_address, a.destination_port).into(),
            authority,
        ),
        (Protocol::Stream, ppp::v2::Addresses::IPv6(a)) => proxied(
            SocketAddrV6::new(a.source_address, a.source_port, 0, 0).into(),
            SocketAddrV6::new(a.destination_address, a.destination_port, 0, 0).into(),
            authority,
        ),
        _ => Header::Unknown,
    };
    Ok(Parsed::Complete { header, len })
}

/// A [`Header::Proxy`], IPv4-mapped IPv6 addresses given as IPv4.
fn proxied(source: SocketAddr, destination: SocketAddr, authority: Option<String>) -> Header {
    Header::Proxy { addresses: Addresses { source: canonical(source), destination: canonical(destination) }, authority }
}

/// `addr` with an IPv4-mapped IPv6 address turned into IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Checks the TLVs of a complete v2 `PROXY` header and returns its authority, if any.
fn v2_authority(parsed: &ppp::v2::Header<'_>) -> Result<Option<String>, ProxyError> {
    let mut authority = None;
    // Where the next TLV starts in the header: the TLVs end the header.
    let mut at = parsed.len() - parsed.tlv_bytes().len();
    for tlv in parsed.tlvs() {
        let tlv = tlv.map_err(|e| ProxyError::Malformed(format!("a v2 TLV is broken ({})", one_line(&e))))?;
        // Its value starts after its type (1) and length (2).
        let value_at = at + 3;
        at = value_at + tlv.value.len();
        match tlv.kind {
            PP2_TYPE_AUTHORITY => {
                if authority.is_some() {
                    return Err(ProxyError::Malformed("the v2 header has two authority TLVs".to_owned()));
                }
                if tlv.value.len() > MAX_AUTHORITY {
                    return Err(ProxyError::Malformed(format!(
                        "the v2 authority TLV is {} bytes long (at most {MAX_AUTHORITY})",
                        tlv.value.len()
                    )));
                }
                let name = std::str::from_utf8(&tlv.value)
                    .map_err(|_| ProxyError::Malformed("the v2 authority TLV is not UTF-8".to_owned()))?;
                authority = Some(name.to_owned());
            }
            PP2_TYPE_CRC32C => check_crc32c(parsed.as_bytes(), value_at, &tlv.value)?,
            _ => {}
        }
    }
    Ok(authority)
}

/// Checks a v2 header's CRC32C TLV (`proxy-protocol.txt` section 2.2.5): the CRC32C of the
/// whole header with the checksum's own 4 bytes (`value`, at offset `at`) zeroed, big-endian.
fn check_crc32c(header: &[u8], at: usize, value: &[u8]) -> Result<(), ProxyError> {
    let Ok(&want) = <&[u8; 4]>::try_from(value) else {
        return Err(ProxyError::Malformed(format!("the v2 CRC32C TLV is {} bytes long, not 4", value.len())));
    };
    let mut zeroed = header.to_vec();
    zeroed[at..at + 4].fill(0);
    if crc32c(&zeroed) != u32::from_be_bytes(want) {
        return Err(ProxyError::Malformed("the v2 header's CRC32C checksum does not match".to_owned()));
    }
    Ok(())
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: at most
/// [`MAX_V2_HEADER`] bytes, once per connection whose balancer sends the checksum.
fn crc32c(bytes: &[u8]) -> u32 {
    /// The reflected Castagnoli polynomial.
    const POLY: u32 = 0x82F6_3B78;
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
        }
    }
    !crc
}

/// Reads the PROXY header at the start of a connection (see [`parse_header`] for what counts
/// as one) and consumes exactly its bytes: whoever reads `stream` afterwards gets the client's
/// stream from the first byte after the header.
///
/// It peeks until the header is complete, then reads that many bytes. Between peeks it waits
/// for new bytes without spinning, as [`crate::sni::peek_server_name`] does: a peek that sees
/// no new byte reports `WouldBlock` to tokio, which clears the socket's readiness. A peer that
/// sends one byte at a time costs one peek per byte, bounded by [`MAX_V2_HEADER`] and the
/// timeout. Nothing is consumed unless the result is `Ok`.
///
/// After `Ok` and after every error but [`ProxyError::Timeout`] and [`ProxyError::Io`], the
/// stream is ready to be read as usual. A read that times out may have left tokio's read
/// readiness cleared while bytes are queued; close such a connection (a timeout calls for it),
/// or register the socket afresh (`TcpStream::from_std(stream.into_std()?)`) to read it.
///
/// # Errors
///
/// Those of [`parse_header`]; [`ProxyError::Eof`] when the peer ends its stream before the
/// header is complete; [`ProxyError::Timeout`] when it is not complete within `timeout`;
/// [`ProxyError::Io`] when the peek or the read fails.
pub async fn read_header(stream: &TcpStream, timeout: Duration) -> Result<Header, ProxyError> {
    tokio::time::timeout(timeout, read(stream)).await.unwrap_or(Err(ProxyError::Timeout))
}

/// The loop of [`read_header`], without its timeout.
async fn read(stream: &TcpStream) -> Result<Header, ProxyError> {
    // The wait for more bytes and the end of stream are `peek_more`'s, as for the SNI peek.
    let mut buf = vec![0u8; MAX_V2_HEADER];
    let mut seen = 0;
    loop {
        let (n, closed) = peek_more(stream, &mut buf, seen).await.map_err(ProxyError::Io)?;
        if n == 0 {
            return Err(ProxyError::Eof { got: 0 });
        }
        seen = n;
        match parse_header(&buf[..n])? {
            Parsed::Complete { header, len } => {
                consume(stream, &mut buf[..len]).await?;
                return Ok(header);
            }
            // Cannot happen: a full buffer holds a whole v1 line or a v2 header within the
            // cap, or parse_header refused it; never wait on a full buffer all the same.
            Parsed::Incomplete if n == buf.len() => return Err(ProxyError::TooLarge),
            Parsed::Incomplete if closed => return Err(ProxyError::Eof { got: n }),
            Parsed::Incomplete => {}
        }
    }
}

/// Reads exactly `buf.len()` bytes, already seen queued by a peek, off the socket.
async fn consume(stream: &TcpStream, buf: &mut [u8]) -> Result<(), ProxyError> {
    let mut got = 0;
    while got < buf.len() {
        stream.readable().await.map_err(ProxyError::Io)?;
        match stream.try_read(&mut buf[got..]) {
            // The bytes were peeked, so they are queued; an end of stream here means the
            // socket was shut down under us.
            Ok(0) => return Err(ProxyError::Eof { got }),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(ProxyError::Io(e)),
        }
    }
    Ok(())
}

/// The two addresses of a header in one family: both IPv4 when both are IPv4 or IPv4-mapped
/// IPv6, else both IPv6, an IPv4 address written IPv4-mapped (`::ffff:192.0.2.7`).
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (source, destination) = (canonical(source), canonical(destination));
    let v6 = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0)),
        SocketAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0)),
    };
    match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => (source, destination),
        _ => (v6(source), v6(destination)),
    }
}

/// A PROXY v1 header (`PROXY TCP4 ...\r\n` or `PROXY TCP6 ...\r\n`) for a client connected
/// from `source` to `destination` (the listener's address).
///
/// Mixed families (an IPv4 client on an IPv6 listener, or the reverse) are written in one:
/// `TCP4` when both addresses are IPv4 or IPv4-mapped IPv6, else `TCP6` with an IPv4 address
/// written IPv4-mapped (`::ffff:192.0.2.7`). IPv6 scope ids are not carried.
pub fn build_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    ppp::v1::Addresses::from(same_family(source, destination)).to_string().into_bytes()
}

/// A PROXY v2 header (`PROXY` command, `STREAM` protocol, `INET` or `INET6` family) for a
/// client connected from `source` to `destination` (the listener's address), mapped to one
/// family as [`build_v1`] does.
///
/// `authority`, the TLS server name the client asked for, goes in a `PP2_TYPE_AUTHORITY` TLV.
/// An empty one, or one longer than [`MAX_AUTHORITY`] bytes (which cannot be a host name), is
/// left out.
pub fn build_v2(source: SocketAddr, destination: SocketAddr, authority: Option<&str>) -> Vec<u8> {
    let addresses = ppp::v2::Addresses::from(same_family(source, destination));
    let builder = ppp::v2::Builder::with_addresses(ppp::v2::Version::Two | Command::Proxy, Protocol::Stream, addresses);
    let builder = match authority.filter(|a| !a.is_empty() && a.len() <= MAX_AUTHORITY) {
        Some(name) => builder.write_tlv(Type::Authority, name.as_bytes()),
        None => Ok(builder),
    };
    // ppp's builder fails only on a header longer than 65 551 bytes; this one is at most
    // 16 + 36 + 3 + MAX_AUTHORITY.
    builder.and_then(ppp::v2::Builder::build).expect("a v2 header of at most 310 bytes always builds")
}

/// The bytes that tell whether a stream starts with a PROXY header: the v2 signature's
/// length (the v1 start, `PROXY `, is shorter).
pub const SIGNATURE_LEN: usize = 12;

/// Whether a stream whose first bytes are `buf` starts with a PROXY header, by its signature
/// alone (`PROXY ` or the v2 signature), not by parsing it: `None` while every byte of `buf`
/// could still start one (an empty `buf` too), then `Some`. More bytes do not change a `Some`.
pub fn signature(buf: &[u8]) -> Option<bool> {
    let v2 = ppp::v2::PROTOCOL_PREFIX;
    let mut undecided = false;
    for start in [V1_PREFIX, v2] {
        let n = buf.len().min(start.len());
        if buf[..n] == start[..n] {
            if n == start.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

/// The v1 header of a connection that carries no client (`PROXY UNKNOWN\r\n`): what a health
/// probe sends to a backend that requires a header.
pub fn build_v1_unknown() -> Vec<u8> {
    b"PROXY UNKNOWN\r\n".to_vec()
}

/// The v2 `LOCAL` header (no addresses, no TLVs): what a health probe sends to a backend that
/// requires a header, as HAProxy's `check-send-proxy` does.
pub fn build_v2_local() -> Vec<u8> {
    let builder = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | Command::Local,
        Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    );
    builder.build().expect("an empty v2 header always builds")
}

/// The sources allowed to send a PROXY header (`accept_proxy_from`): a list of networks.
///
/// Written as `10.0.0.0/8`, `2001:db8::/32`, or a bare address (`192.0.2.7`, a /32; `::1`, a
/// /128). An IPv4-mapped IPv6 peer (`::ffff:10.1.2.3`, a client of a dual-stack listener)
/// matches IPv4 entries, and an IPv4 peer matches IPv4-mapped IPv6 entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted {
    /// The networks, in the order given.
    nets: Vec<IpNet>,
}

/// An entry of [`Trusted`] that is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustedError {
    /// Neither an address nor `address/prefix`.
    #[error(
        "`{entry}` is not an address or a network: write a network as 10.0.0.0/8 or 2001:db8::/32, or a single \
         address as 192.0.2.7"
    )]
    NotANetwork {
        /// The rejected text.
        entry: String,
    },
    /// A network with bits set past its prefix (`10.1.0.0/8`): a typo for a host or for
    /// another network.
    #[error("`{entry}` has address bits set past its prefix; write the network as {network}, or drop the prefix")]
    HostBits {
        /// The rejected text.
        entry: String,
        /// The network it would be with those bits cleared.
        network: String,
    },
}

impl Trusted {
    /// The trusted sources from a list of entries, as in the config file.
    ///
    /// # Errors
    ///
    /// [`TrustedError`] for the first entry that is not a network.
    pub fn parse<I, S>(entries: I) -> Result<Self, TrustedError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nets = entries.into_iter().map(|entry| parse_net(entry.as_ref())).collect::<Result<_, _>>()?;
        Ok(Self { nets })
    }

    /// Whether `ip` is in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        let mapped = match canonical {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(_) => canonical,
        };
        self.nets.iter().any(|net| net.contains(&canonical) || net.contains(&mapped))
    }

    /// Whether the list is empty (no source trusted).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// One entry of a [`Trusted`] list.
fn parse_net(entry: &str) -> Result<IpNet, TrustedError> {
    let text = entry.trim();
    let not_a_network = || TrustedError::NotANetwork { entry: text.to_owned() };
    if !text.contains('/') {
        return text.parse::<IpAddr>().map(IpNet::from).map_err(|_| not_a_network());
    }
    let net = text.parse::<IpNet>().map_err(|_| not_a_network())?;
    if net.trunc() != net {
        return Err(TrustedError::HostBits { entry: text.to_owned(), network: net.trunc().to_string() });
    }
    Ok(net)
}

impl FromStr for Trusted {
    type Err = TrustedError;

    /// A comma-separated list, as a command-line flag gives it: `10.0.0.0/8, 2001:db8::/32`.
    /// An empty string is an empty list.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.split(',').filter(|entry| !entry.trim().is_empty()))
    }
}

impl fmt::Display for Trusted {
    /// The list as [`FromStr`] reads it, comma-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}
