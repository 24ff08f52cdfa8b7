//! Who the client is, and how the backend learns it (issue 15).
//!
//! Behind an L4 splicer a backend sees every connection come from the splicer. Three route
//! options carry the client's address through:
//!
//! - `accept_proxy_from` ([`AcceptProxy`]): connections from these sources (an outer load
//!   balancer) start with a PROXY v1 or v2 header, and its source address *is* the client,
//!   for balancing, the access log, PROXY out and the transparent source. Anyone else who
//!   sends a header is closed: a header is trusted from the listed sources only.
//! - `proxy_protocol` ([`ProxyVersion`]): a PROXY header goes out on the backend connection
//!   before any client byte (for HAProxy, nginx, appliances that read it).
//! - `source` ([`Source`]): the backend connection is made *from* the client's address
//!   (IP_TRANSPARENT), for backends that read no header (IIS, HTTP.sys); or from a fixed local
//!   address.
//!
//! Every step here runs before the engine pairs the sockets (both engines): the header in is
//! consumed from the client socket first, the header out is written to the backend socket
//! first, so neither engine ever sees them.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    str::FromStr,
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use tokio::net::TcpStream;

use crate::{
    proxy_proto::{self, Header, ProxyError, Trusted},
    sys::sock::{peek_more, setsockopt_int},
};

/// Default time a trusted balancer has to send its whole PROXY header.
pub const DEFAULT_ACCEPT_PROXY_TIMEOUT: &str = "5s";

/// Where a backend connection is made from (`source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's own address and port (IP_TRANSPARENT): the backend sees the client as if
    /// it had connected directly.
    Client,
    /// The client's address with a port the kernel picks (IP_TRANSPARENT): for when the
    /// client's port may already be in use towards the same backend (e.g. several splicers
    /// behind one NAT), at the cost of the port in the backend's logs.
    ClientIp,
    /// A fixed local address, any port.
    Addr(IpAddr),
}

impl Source {
    /// Whether this source binds to a foreign (client) address, which needs IP_TRANSPARENT.
    pub fn is_transparent(self) -> bool {
        matches!(self, Source::Client | Source::ClientIp)
    }
}

/// Why a `source` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a source: write \"client\" (the client's address and port), \"client-ip\" (the client's \
     address, any port) or a local IP address such as \"192.0.2.10\""
)]
pub struct SourceError(pub String);

impl FromStr for Source {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "client" => Ok(Source::Client),
            "client-ip" => Ok(Source::ClientIp),
            other => other.parse::<IpAddr>().map(Source::Addr).map_err(|_| SourceError(s.to_owned())),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Client => f.write_str("client"),
            Source::ClientIp => f.write_str("client-ip"),
            Source::Addr(ip) => write!(f, "{ip}"),
        }
    }
}

/// The PROXY protocol version sent to the backends (`proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header, with the TLS server name as its authority TLV.
    V2,
}

/// Why a `proxy_protocol` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a PROXY protocol version: write \"v1\", \"v2\" or \"off\"")]
pub struct ProxyVersionError(pub String);

/// `v1`, `v2`, or `off` (`None`).
pub fn parse_proxy_version(s: &str) -> Result<Option<ProxyVersion>, ProxyVersionError> {
    match s {
        "v1" => Ok(Some(ProxyVersion::V1)),
        "v2" => Ok(Some(ProxyVersion::V2)),
        "off" => Ok(None),
        other => Err(ProxyVersionError(other.to_owned())),
    }
}

impl ProxyVersion {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }

    /// The header of a client connection from `client` to `destination`; v2 with `authority`
    /// (the TLS server name) when known.
    pub fn header(self, client: SocketAddr, destination: SocketAddr, authority: Option<&str>) -> Vec<u8> {
        match self {
            ProxyVersion::V1 => proxy_proto::build_v1(client, destination),
            ProxyVersion::V2 => proxy_proto::build_v2(client, destination, authority),
        }
    }

    /// The header of a connection that carries no client: the health probes' (v2 `LOCAL`,
    /// v1 `PROXY UNKNOWN`), so that a backend requiring a header answers them.
    pub fn local_header(self) -> Vec<u8> {
        match self {
            ProxyVersion::V1 => proxy_proto::build_v1_unknown(),
            ProxyVersion::V2 => proxy_proto::build_v2_local(),
        }
    }
}

/// `accept_proxy_from` of a listen address: who may send a PROXY header, and how long they
/// have to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptProxy {
    /// The sources that must start with a header.
    pub trusted: Trusted,
    /// The time a trusted source has to send its whole header.
    pub timeout: Duration,
}

/// Who a client is, as stage 1 of a connection found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The client: the socket's peer, or the source of an accepted PROXY header.
    pub client: SocketAddr,
    /// The address the client connected to, as an accepted PROXY header gave it; `None`: the
    /// client socket's own local address (asked only when a PROXY header goes out).
    pub destination: Option<SocketAddr>,
    /// The balancer the header came from, when one was accepted (the access log's `peer=`).
    pub via: Option<SocketAddr>,
}

/// Why a connection was closed in the PROXY step, without a backend connection.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// A trusted source's header was missing, broken, too large, too slow, or cut short.
    #[error("from a trusted PROXY source: {0}")]
    Trusted(#[source] ProxyError),
    /// A trusted source's v2 `LOCAL` header: the balancer's own connection (a health check).
    #[error("PROXY v2 LOCAL from a trusted source (the balancer's health check): closed, as it carries no client")]
    Local,
    /// A source not in `accept_proxy_from` sent a PROXY header.
    #[error(
        "sent a PROXY protocol header but is not in accept_proxy_from: closed, a header is trusted from the \
         listed balancers only; add the balancer's address to accept_proxy_from if it is one"
    )]
    Untrusted,
    /// Peeking at an untrusted source's first bytes failed.
    #[error("reading the first bytes failed: {0}")]
    Io(#[source] io::Error),
}

/// Stage 1 on a listen address with `accept_proxy_from`: a trusted `peer` must send a PROXY
/// header, which is consumed and gives the client's identity; any other peer must not start
/// with one (it is looked at, never consumed, within the same timeout).
pub async fn accept(accept: &AcceptProxy, stream: &TcpStream, peer: SocketAddr) -> Result<Identity, Refused> {
    let direct = Identity { client: peer, destination: None, via: None };
    if !accept.trusted.contains(peer.ip()) {
        return match starts_with_header(stream, accept.timeout).await {
            Ok(false) => Ok(direct),
            Ok(true) => Err(Refused::Untrusted),
            Err(e) => Err(Refused::Io(e)),
        };
    }
    match proxy_proto::read_header(stream, accept.timeout).await {
        Ok(Header::Proxy { addresses, .. }) => {
            Ok(Identity { client: addresses.source, destination: Some(addresses.destination), via: Some(peer) })
        }
        Ok(Header::Local) => Err(Refused::Local),
        // The protocol says to use the connection's own addresses then.
        Ok(Header::Unknown) => Ok(Identity { via: Some(peer), ..direct }),
        Err(e) => Err(Refused::Trusted(e)),
    }
}

/// Whether an untrusted client's first bytes are a PROXY header (its signature), told within
/// `timeout` of the first byte or the end of the stream.
///
/// A client that sends nothing in that time (one that waits, a preconnected browser socket) is
/// not one: it is served, and a header it sends later is just bytes to the backend, never read
/// as one. A client whose bytes stop partway into a signature (`PROX`) counts as sending one,
/// and is closed like a trusted source's dribbled header: it is also the only way a peek cut
/// short could leave the socket's read readiness cleared with bytes queued.
async fn starts_with_header(stream: &TcpStream, timeout: Duration) -> io::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; proxy_proto::SIGNATURE_LEN];
    let mut seen = 0;
    loop {
        let Ok(peeked) = tokio::time::timeout_at(deadline, peek_more(stream, &mut buf, seen)).await else {
            return Ok(seen > 0);
        };
        let (n, closed) = peeked?;
        match proxy_proto::signature(&buf[..n]) {
            Some(is_header) => return Ok(is_header),
            // Every byte so far could start a header; an end of stream settles it (no header
            // will follow; the short stream goes to the backend as it is).
            None if closed || n == 0 => return Ok(false),
            None => seen = n,
        }
    }
}

/// Writes `header` to a just-connected backend socket, whole, before any client byte.
pub async fn send_header(stream: &TcpStream, header: &[u8]) -> io::Result<()> {
    let mut sent = 0;
    while sent < header.len() {
        stream.writable().await?;
        match stream.try_write(&header[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Binds a backend socket (not yet connected) for `source`, on behalf of `client`.
///
/// # Errors
///
/// A client (or fixed address) of the other family than the backend; the kernel's error when
/// IP_TRANSPARENT is not allowed (no CAP_NET_ADMIN) or the address is in use.
pub fn bind(socket: &Socket, source: Source, client: SocketAddr, backend: SocketAddr) -> io::Result<()> {
    let local = match source {
        Source::Client => client,
        Source::ClientIp => SocketAddr::new(client.ip(), 0),
        Source::Addr(ip) => SocketAddr::new(ip, 0),
    };
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    if local.is_ipv4() != backend.is_ipv4() {
        let fam = |a: &SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
        let whose = if source.is_transparent() { "the client's address" } else { "the source address" };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "source = \"{source}\": {whose} {} is {} and the backend is {}; a connection cannot mix them \
                 (give the route backends of the client's family)",
                local.ip(),
                fam(&local),
                fam(&backend)
            ),
        ));
    }
    if source.is_transparent() {
        set_transparent(socket, backend.is_ipv4()).map_err(explain)?;
    }
    if local.port() == 0 {
        // Take the port at connect, from the 4-tuple, not at bind: many connections from one
        // address to different backends can then share a port.
        setsockopt_int(socket.as_fd(), libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    } else {
        // The client's port: another connection of this process may hold it towards another
        // backend (each 4-tuple is still unique).
        socket.set_reuse_address(true)?;
    }
    socket.bind(&local.into())
}

/// IP_TRANSPARENT (IPv4) or IPV6_TRANSPARENT on `socket`.
fn set_transparent(socket: &Socket, v4: bool) -> io::Result<()> {
    if v4 { socket.set_ip_transparent_v4(true) } else { socket.set_ip_transparent_v6(true) }
}

/// The kernel's refusal of IP_TRANSPARENT, with the fix named.
fn explain(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::EPERM) {
        io::Error::new(
            e.kind(),
            format!(
                "{e}: source = \"client\" needs CAP_NET_ADMIN to set IP_TRANSPARENT: run as root or grant the \
                 capability (see the README, Client addresses), or remove `source`"
            ),
        )
    } else {
        e
    }
}

/// Sets IP_TRANSPARENT (`v4`) or IPV6_TRANSPARENT on a throwaway TCP socket: whether this
/// process may bind backend connections to clients' addresses (also `doctor`'s check).
pub fn probe_transparent(v4: bool) -> io::Result<()> {
    let s = Socket::new(if v4 { Domain::IPV4 } else { Domain::IPV6 }, Type::STREAM, None)?;
    set_transparent(&s, v4)
}

/// Checks at start and reload that this process may bind foreign addresses, for a route with
/// a transparent `source`: [`probe_transparent`] for each family (IPv4 only on a host
/// without IPv6).
pub fn check_transparent() -> io::Result<()> {
    probe_transparent(true).map_err(explain)?;
    match probe_transparent(false) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => Ok(()),
        r => r.map_err(explain),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[test]
    fn source_parses_and_prints() {
        for s in ["client", "client-ip", "192.0.2.10", "2001:db8::10"] {
            assert_eq!(s.parse::<Source>().unwrap().to_string(), s);
        }
        for bad in ["", "Client", "clientip", "192.0.2.10:80", "host.example"] {
            let e = bad.parse::<Source>().unwrap_err().to_string();
            assert!(e.contains("\"client-ip\""), "{e}");
        }
        assert_eq!(parse_proxy_version("off").unwrap(), None);
        assert_eq!(parse_proxy_version("v2").unwrap(), Some(ProxyVersion::V2));
        assert!(parse_proxy_version("2").unwrap_err().to_string().contains("\"v1\", \"v2\" or \"off\""));
    }

    #[test]
    fn a_source_of_the_other_family_is_refused_before_binding() {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let backend: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let client = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 4000);
        let e = bind(&s, Source::ClientIp, client, backend).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("is IPv6 and the backend is IPv4"), "{e}");
        assert!(s.local_addr().unwrap().as_socket().unwrap().ip().is_unspecified(), "nothing was bound");
    }

    #[tokio::test]
    async fn a_fixed_source_address_is_what_the_backend_sees() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = l.local_addr().unwrap();
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let src = Source::Addr(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)));
        bind(&s, src, "203.0.113.1:1234".parse().unwrap(), backend).unwrap();
        s.connect(&backend.into()).unwrap();
        let (_, seen) = l.accept().await.unwrap();
        assert_eq!(seen.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)));
    }

    /// A pair of connected sockets on loopback, the accepted end first.
    async fn pair(from: &str) -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
        s.connect(&addr.into()).unwrap();
        s.set_nonblocking(true).unwrap();
        let c = TcpStream::from_std(std::net::TcpStream::from(s)).unwrap();
        let (a, _) = l.accept().await.unwrap();
        (a, c)
    }

    fn accepting(trusted: &str) -> AcceptProxy {
        AcceptProxy { trusted: trusted.parse().unwrap(), timeout: Duration::from_millis(300) }
    }

    #[tokio::test]
    async fn a_trusted_header_names_the_client_and_leaves_the_stream() {
        let (a, mut c) = pair("127.0.0.5").await;
        let peer = a.peer_addr().unwrap();
        let client: SocketAddr = "198.51.100.7:5555".parse().unwrap();
        let dest: SocketAddr = "203.0.113.9:443".parse().unwrap();
        let mut bytes = proxy_proto::build_v2(client, dest, None);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        c.write_all(&bytes).await.unwrap();
        let id = accept(&accepting("127.0.0.5"), &a, peer).await.unwrap();
        assert_eq!(id, Identity { client, destination: Some(dest), via: Some(peer) });
        let mut rest = [0u8; 16];
        a.readable().await.unwrap();
        assert_eq!(a.try_read(&mut rest).unwrap(), 16);
        assert_eq!(&rest, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn trusted_sources_without_a_good_header_are_refused() {
        let (a, mut c) = pair("127.0.0.5").await;
        let peer = a.peer_addr().unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let e = accept(&accepting("127.0.0.0/8"), &a, peer).await.unwrap_err();
        assert!(matches!(e, Refused::Trusted(ProxyError::NoHeader { .. })), "{e}");

        let (a, mut c) = pair("127.0.0.5").await;
        c.write_all(&proxy_proto::build_v2_local()).await.unwrap();
        let e = accept(&accepting("127.0.0.5"), &a, peer).await.unwrap_err();
        assert!(matches!(e, Refused::Local), "{e}");

        // Silent: the timeout.
        let (a, _c) = pair("127.0.0.5").await;
        let e = accept(&accepting("127.0.0.5"), &a, peer).await.unwrap_err();
        assert!(matches!(e, Refused::Trusted(ProxyError::Timeout)), "{e}");
    }

    #[tokio::test]
    async fn untrusted_sources_are_served_unless_they_send_a_header() {
        let trusted = accepting("10.0.0.0/8");
        let (a, mut c) = pair("127.0.0.5").await;
        let peer = a.peer_addr().unwrap();
        c.write_all(&proxy_proto::build_v1("198.51.100.7:5555".parse().unwrap(), a.local_addr().unwrap()))
            .await
            .unwrap();
        let e = accept(&trusted, &a, peer).await.unwrap_err();
        assert!(matches!(e, Refused::Untrusted), "{e}");

        // "PROXY" is a prefix of the v1 start; "PROXZ" is not: the sixth byte decides.
        let (a, mut c) = pair("127.0.0.5").await;
        c.write_all(b"PROX").await.unwrap();
        let wait = tokio::spawn(async move {
            let id = accept(&trusted, &a, peer).await;
            (id.map(|i| i.client), a)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.write_all(b"Z /").await.unwrap();
        let (id, a) = wait.await.unwrap();
        assert_eq!(id.unwrap(), peer);
        // Nothing was consumed.
        let mut b = [0u8; 7];
        assert_eq!(a.try_read(&mut b).unwrap(), 7);
        assert_eq!(&b, b"PROXZ /");

        // Stopping partway into a signature counts as sending a header.
        let (a, mut c) = pair("127.0.0.5").await;
        c.write_all(b"\r\n\r\n").await.unwrap();
        let e = accept(&accepting("10.0.0.0/8"), &a, peer).await.unwrap_err();
        assert!(matches!(e, Refused::Untrusted), "{e}");

        // A silent untrusted client is served once the timeout passes.
        let (a, _c) = pair("127.0.0.5").await;
        let id = accept(&accepting("10.0.0.0/8"), &a, peer).await.unwrap();
        assert_eq!(id, Identity { client: peer, destination: None, via: None });
    }
}
