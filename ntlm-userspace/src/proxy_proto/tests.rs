//! Tests of the PROXY protocol module: headers captured from a real producer (HAProxy, in
//! `fixtures/`, recorded by `fixtures/capture.sh`, with what the client's own socket saw in
//! `fixtures/expected.txt`), built headers read by a real consumer (HAProxy `accept-proxy`,
//! which re-emits what it learnt with `send-proxy-v2`), real loopback sockets for
//! [`read_header`], and property tests of the parser, the builders and [`Trusted`].

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command as Process, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use proptest::prelude::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UnixStream},
};

use super::*;

/// What every capture's client sent after connecting (`PAYLOAD` in `capture.sh`).
const PAYLOAD: &[u8] = b"payload after the header\r\n";

/// Every captured stream: the header HAProxy wrote, then [`PAYLOAD`] (none after the health
/// check's header).
const FIXTURES: &[(&str, &[u8])] = &[
    ("v1_tcp4.bin", include_bytes!("fixtures/v1_tcp4.bin")),
    ("v1_tcp6.bin", include_bytes!("fixtures/v1_tcp6.bin")),
    ("v1_unix.bin", include_bytes!("fixtures/v1_unix.bin")),
    ("v2_tcp4.bin", include_bytes!("fixtures/v2_tcp4.bin")),
    ("v2_tcp6.bin", include_bytes!("fixtures/v2_tcp6.bin")),
    ("v2_mapped.bin", include_bytes!("fixtures/v2_mapped.bin")),
    ("v2_tcp4_crc32c_unique_id.bin", include_bytes!("fixtures/v2_tcp4_crc32c_unique_id.bin")),
    ("v2_authority.bin", include_bytes!("fixtures/v2_authority.bin")),
    ("v2_unix.bin", include_bytes!("fixtures/v2_unix.bin")),
    ("v2_local.bin", include_bytes!("fixtures/v2_local.bin")),
];

/// One line per fixture: `FILE source=ADDR destination=ADDR [authority=NAME]`, `FILE local`
/// (a health check) or `FILE unix` (a client on HAProxy's Unix socket).
const EXPECTED: &str = include_str!("fixtures/expected.txt");

/// Proptest cases per property: enough to reach the corners, bounded so the whole module
/// runs in seconds.
const CASES: u32 = 2000;

/// The pause between two bytes of a dribbled header, on the writer's side only.
const DRIBBLE_PAUSE: Duration = Duration::from_millis(1);

/// A timeout the read must never reach in tests that expect an answer.
const LONG_TIMEOUT: Duration = Duration::from_secs(30);

/// A short timeout for the tests that expect the read to time out.
const SHORT_TIMEOUT: Duration = Duration::from_millis(200);

/// How much later than its timeout a timed-out read may return on a busy machine before the
/// test calls it hung.
const HANG_MARGIN: Duration = Duration::from_secs(3);

/// How soon an answer that needs no waiting (no header, too large) must come: a small part of
/// [`LONG_TIMEOUT`], so an answer that waited for the timeout fails.
const QUICK: Duration = Duration::from_secs(5);

/// The most CPU time a read waiting [`SHORT_TIMEOUT`] for bytes that never come may use: a
/// twentieth of the wait (sni.rs measured about 0.15 ms for a waiting peek loop, over 50 ms
/// for a spinning one).
const WAIT_CPU_BUDGET: Duration = Duration::from_millis(10);

/// Where HAProxy is installed (Debian's package).
const HAPROXY: &str = "/usr/sbin/haproxy";

/// How long to wait for HAProxy to listen, polling its Unix socket.
const HAPROXY_START: Duration = Duration::from_secs(10);

/// The pause between two connection attempts while HAProxy starts.
const HAPROXY_POLL: Duration = Duration::from_millis(20);

/// What a fixture's header must parse to.
#[derive(Debug, PartialEq, Eq)]
enum Want {
    /// A proxied connection with these addresses and authority.
    Proxy(Header),
    /// A health check.
    Local,
    /// A client on a Unix socket.
    Unix,
}

/// The expectation for `file` in [`EXPECTED`].
fn want(file: &str) -> Want {
    let line = EXPECTED
        .lines()
        .find(|line| line.split(' ').next() == Some(file))
        .unwrap_or_else(|| panic!("{file} is not in expected.txt"));
    let fields: Vec<&str> = line.split(' ').skip(1).collect();
    match fields.as_slice() {
        ["local"] => Want::Local,
        ["unix"] => Want::Unix,
        _ => {
            let field = |key: &str| fields.iter().find_map(|f| f.strip_prefix(key).and_then(|f| f.strip_prefix('=')));
            let addr = |key: &str| -> SocketAddr {
                field(key).and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("{file}: no {key} in {line}"))
            };
            Want::Proxy(Header::Proxy {
                addresses: Addresses { source: addr("source"), destination: addr("destination") },
                authority: field("authority").map(str::to_owned),
            })
        }
    }
}

/// The header and its length, panicking unless `buf` holds a complete one.
fn complete(buf: &[u8]) -> (Header, usize) {
    match parse_header(buf) {
        Ok(Parsed::Complete { header, len }) => (header, len),
        other => panic!("expected a complete header, got {other:?}"),
    }
}

/// The error `buf` parses to; panics unless it is one.
fn error_of(buf: &[u8]) -> ProxyError {
    match parse_header(buf) {
        Err(e) => e,
        Ok(parsed) => panic!("expected an error, got {parsed:?}"),
    }
}

/// Asserts that `header` is what HAProxy's header in `file` must parse to.
fn assert_wanted(file: &str, header: &Header) {
    match want(file) {
        Want::Proxy(want) => assert_eq!(header, &want, "{file}"),
        Want::Local => assert_eq!(header, &Header::Local, "{file}"),
        // HAProxy 2.6 sends v1 UNKNOWN, and v2 LOCAL with the UNSPEC family, for a client that
        // has no IP address.
        Want::Unix if file.starts_with("v1") => assert_eq!(header, &Header::Unknown, "{file}"),
        Want::Unix => assert_eq!(header, &Header::Local, "{file}"),
    }
}

#[test]
fn fixtures_parse_to_what_the_client_saw_and_end_where_the_payload_starts() {
    assert_eq!(EXPECTED.lines().count(), FIXTURES.len(), "one line of expected.txt per fixture");
    for (file, bytes) in FIXTURES {
        let (header, len) = complete(bytes);
        assert_wanted(file, &header);
        let payload: &[u8] = if *file == "v2_local.bin" { b"" } else { PAYLOAD };
        assert_eq!(&bytes[len..], payload, "{file}: the header ends where the client's stream starts");
    }
}

#[test]
fn the_fixtures_are_what_they_claim() {
    // The v2 captures carry the TLVs their names say: the checksum and the (empty) unique id,
    // and the authority; so the TLV paths are tested on a real producer's bytes.
    let tlv_kinds = |bytes: &[u8]| -> Vec<u8> {
        let parsed = ppp::v2::Header::try_from(bytes).expect("a v2 fixture parses");
        parsed.tlvs().map(|tlv| tlv.expect("a TLV parses").kind).collect()
    };
    let find = |name: &str| FIXTURES.iter().find(|(file, _)| *file == name).expect("fixture").1;
    assert_eq!(tlv_kinds(find("v2_tcp4_crc32c_unique_id.bin")), [PP2_TYPE_CRC32C, 0x05]);
    assert_eq!(tlv_kinds(find("v2_authority.bin")), [PP2_TYPE_AUTHORITY]);
    assert_eq!(tlv_kinds(find("v2_tcp4.bin")), Vec::<u8>::new());
    // The mapped capture really is IPv6 on the wire (family byte 0x21: INET6, STREAM).
    assert_eq!(find("v2_mapped.bin")[13], 0x21);
}

#[test]
fn every_prefix_of_a_fixture_header_is_incomplete() {
    for (file, bytes) in FIXTURES {
        let (_, len) = complete(bytes);
        for end in 0..len {
            assert_eq!(parse_header(&bytes[..end]).ok(), Some(Parsed::Incomplete), "{file} cut at {end}");
        }
    }
}

#[test]
fn the_builders_write_what_haproxy_writes() {
    // For the same addresses, build_v1 and build_v2 produce HAProxy's own bytes.
    for (file, bytes) in FIXTURES {
        let Want::Proxy(Header::Proxy { addresses, authority }) = want(file) else { continue };
        let (_, len) = complete(bytes);
        let built = match &file[..2] {
            "v1" => build_v1(addresses.source, addresses.destination),
            // HAProxy writes a mapped pair as IPv6 and adds its checksum and unique id; the
            // builder writes the pair as IPv4 and adds neither.
            _ if file.contains("mapped") || file.contains("crc32c") => continue,
            _ => build_v2(addresses.source, addresses.destination, authority.as_deref()),
        };
        assert_eq!(built, &bytes[..len], "{file}");
    }
}

#[test]
fn build_v1_writes_the_documented_lines() {
    let v4 = |s: &str| -> SocketAddr { s.parse().expect("address") };
    for (source, destination, line) in [
        ("192.0.2.7:5555", "198.51.100.1:443", "PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n"),
        ("[2001:db8::7]:5555", "[2001:db8::1]:443", "PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n"),
        // An IPv4 client on a dual-stack IPv6 listener: both IPv4.
        ("[::ffff:192.0.2.7]:5555", "[::ffff:198.51.100.1]:443", "PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n"),
        ("[::ffff:192.0.2.7]:5555", "198.51.100.1:443", "PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n"),
        // Truly mixed: both IPv6, the IPv4 one mapped.
        ("192.0.2.7:5555", "[2001:db8::1]:443", "PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 5555 443\r\n"),
        ("[2001:db8::7]:5555", "198.51.100.1:443", "PROXY TCP6 2001:db8::7 ::ffff:198.51.100.1 5555 443\r\n"),
    ] {
        assert_eq!(String::from_utf8(build_v1(v4(source), v4(destination))).expect("ASCII"), line);
    }
}

#[test]
fn build_v2_leaves_out_empty_and_overlong_authorities() {
    let (source, destination) = ("192.0.2.7:5555".parse().expect("a"), "198.51.100.1:443".parse().expect("a"));
    let bare = build_v2(source, destination, None);
    assert_eq!(bare.len(), V2_FIXED + 12);
    assert_eq!(build_v2(source, destination, Some("")), bare);
    assert_eq!(build_v2(source, destination, Some(&"a".repeat(MAX_AUTHORITY + 1))), bare);
    let longest = "a".repeat(MAX_AUTHORITY);
    let (header, _) = complete(&build_v2(source, destination, Some(&longest)));
    assert_eq!(header, Header::Proxy { addresses: Addresses { source, destination }, authority: Some(longest) });
}

#[test]
fn the_crc32c_is_checked() {
    // The RFC 3720 (iSCSI) test vector: 32 zero bytes.
    assert_eq!(crc32c(&[0; 32]), 0x8A91_36AA);
    let bytes = FIXTURES.iter().find(|(file, _)| file.contains("crc32c")).expect("fixture").1;
    let (_, len) = complete(bytes);
    // Any changed byte of the header (here: the last byte of the source address) is caught.
    let mut changed = bytes[..len].to_vec();
    changed[V2_FIXED + 3] ^= 1;
    let e = error_of(&changed);
    assert!(matches!(&e, ProxyError::Malformed(m) if m.contains("CRC32C")), "{e}");
}

/// A v2 header from its parts: version/command byte, family/protocol byte, the rest.
fn v2(version_command: u8, family_protocol: u8, rest: &[u8]) -> Vec<u8> {
    let len = u16::try_from(rest.len()).expect("fits").to_be_bytes();
    [ppp::v2::PROTOCOL_PREFIX, &[version_command, family_protocol], &len, rest].concat()
}

/// The 12 address bytes of 192.0.2.7:5555 -> 198.51.100.1:443.
const V4_ADDRESSES: [u8; 12] = [192, 0, 2, 7, 198, 51, 100, 1, 0x15, 0xb3, 0x01, 0xbb];

#[test]
fn v2_commands_families_and_protocols() {
    let addresses =
        Addresses { source: "192.0.2.7:5555".parse().expect("a"), destination: "198.51.100.1:443".parse().expect("a") };
    let proxy = Header::Proxy { addresses, authority: None };
    for (what, bytes, want) in [
        ("PROXY INET STREAM", v2(0x21, 0x11, &V4_ADDRESSES), proxy),
        ("LOCAL with addresses", v2(0x20, 0x11, &V4_ADDRESSES), Header::Local),
        ("LOCAL UNSPEC", v2(0x20, 0x00, &[]), Header::Local),
        ("PROXY UNSPEC", v2(0x21, 0x00, &[1, 2, 3]), Header::Unknown),
        ("PROXY INET UNSPEC protocol", v2(0x21, 0x10, &V4_ADDRESSES), Header::Unknown),
        ("PROXY UNIX STREAM", v2(0x21, 0x31, &[0; 216]), Header::Unknown),
    ] {
        let (header, len) = complete(&[&bytes[..], b"after"].concat());
        assert_eq!((header, len), (want, bytes.len()), "{what}");
    }
}

#[test]
fn broken_headers_are_malformed() {
    let tlv = |kind: u8, value: &[u8]| {
        [&[kind][..], &u16::try_from(value.len()).expect("fits").to_be_bytes(), value].concat()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("v2 version 1", v2(0x11, 0x11, &V4_ADDRESSES)),
        ("v2 command 2", v2(0x22, 0x11, &V4_ADDRESSES)),
        ("v2 family 4", v2(0x21, 0x41, &V4_ADDRESSES)),
        ("v2 protocol 3", v2(0x21, 0x13, &V4_ADDRESSES)),
        ("v2 UDP", v2(0x21, 0x12, &V4_ADDRESSES)),
        ("v2 length below the addresses", v2(0x21, 0x11, &V4_ADDRESSES[..11])),
        ("v2 TLV past the end", v2(0x21, 0x11, &[&V4_ADDRESSES[..], &[0x02, 0x00, 0x05, b'a']].concat())),
        ("v2 TLV header cut", v2(0x21, 0x11, &[&V4_ADDRESSES[..], &[0x02, 0x00]].concat())),
        ("v2 two authorities", v2(0x21, 0x11, &[&V4_ADDRESSES[..], &tlv(2, b"a"), &tlv(2, b"b")].concat())),
        ("v2 authority not UTF-8", v2(0x21, 0x11, &[&V4_ADDRESSES[..], &tlv(2, b"\xff")].concat())),
        ("v2 authority too long", v2(0x21, 0x11, &[&V4_ADDRESSES[..], &tlv(2, &[b'a'; MAX_AUTHORITY + 1])].concat())),
        ("v2 CRC32C of 3 bytes", v2(0x21, 0x11, &[&V4_ADDRESSES[..], &tlv(3, &[0; 3])].concat())),
        ("v2 CRC32C wrong", v2(0x21, 0x11, &[&V4_ADDRESSES[..], &tlv(3, &[0; 4])].concat())),
        ("v1 no addresses", b"PROXY TCP4\r\n".to_vec()),
        ("v1 bad protocol", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec()),
        ("v1 IPv6 in TCP4", b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec()),
        ("v1 port too big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec()),
        ("v1 two spaces", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n".to_vec()),
        ("v1 LF only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec()),
        ("v1 CR without LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX".to_vec()),
        ("v1 not UTF-8", b"PROXY TCP4 \xff\r\n".to_vec()),
    ];
    for (what, bytes) in cases {
        assert!(matches!(parse_header(&bytes), Err(ProxyError::Malformed(_))), "{what}: {:?}", parse_header(&bytes));
    }
}

#[test]
fn other_starts_are_no_header_on_their_first_differing_byte() {
    for (start, quoted) in [
        (&b"GET / HTTP/1.1\r\n"[..], "GET / HT"),
        (b"\x16\x03\x01\x02\x00", "\\x16\\x03\\x01\\x02\\x00"),
        (b"POST", "POST"),
        (b"PROXY\t", "PROXY\\t"),
        (b"\r\n\r\n\0\r\nQUIT\r", "\\r\\n\\r\\n\\x00\\r\\nQ"),
        (b"proxy ", "proxy "),
    ] {
        match parse_header(start) {
            Err(ProxyError::NoHeader { start: got }) => assert_eq!(got, quoted),
            other => panic!("{start:?}: {other:?}"),
        }
    }
    for prefix in [&b"P"[..], b"PROXY", b"PROXY ", b"\r", b"\r\n\r\n\0\r\nQUIT"] {
        assert_eq!(parse_header(prefix).ok(), Some(Parsed::Incomplete), "{prefix:?}");
    }
}

#[test]
fn oversized_headers_are_too_large() {
    // v1: no CRLF within MAX_V1_HEADER bytes, or a CRLF that ends past it.
    let long = [&b"PROXY UNKNOWN "[..], &[b'x'; MAX_V1_HEADER]].concat();
    assert!(matches!(error_of(&long[..MAX_V1_HEADER]), ProxyError::TooLarge));
    assert_eq!(parse_header(&long[..MAX_V1_HEADER - 1]).ok(), Some(Parsed::Incomplete));
    let just = [&long[..MAX_V1_HEADER - 2], b"\r\n"].concat();
    assert_eq!(complete(&just), (Header::Unknown, MAX_V1_HEADER));
    let over = [&long[..MAX_V1_HEADER - 1], b"\r\n"].concat();
    assert!(matches!(error_of(&over), ProxyError::TooLarge));
    // v2: the declared length decides, as soon as the fixed part is in.
    let declaring = |total: usize| v2(0x21, 0x11, &vec![0; total - V2_FIXED])[..V2_FIXED].to_vec();
    assert_eq!(parse_header(&declaring(MAX_V2_HEADER)).ok(), Some(Parsed::Incomplete));
    assert!(matches!(error_of(&declaring(MAX_V2_HEADER + 1)), ProxyError::TooLarge));
    let whole = v2(0x21, 0x11, &[&V4_ADDRESSES[..], &[0x04, 0x10, 0x00], &[0; 0x1000]].concat());
    assert!(matches!(error_of(&whole), ProxyError::TooLarge), "the same answer with every byte in");
}

/// Found by the fuzz target: ppp's message for this one has a CR LF in it.
#[test]
fn errors_are_one_line_even_when_ppp_s_message_is_not() {
    let extra_port = b"PROXY TCP4 127.0.0.2 127.0.0.1 1 42401 43765\r\n";
    let text = error_of(extra_port).to_string();
    assert!(!text.contains(['\r', '\n']), "{text}");
}

#[test]
fn errors_quote_no_more_than_a_short_prefix() {
    let secret = b"GET /?password=hunter2 HTTP/1.1\r\n";
    let text = error_of(secret).to_string();
    assert!(!text.contains("password"), "{text}");
    let v1 = b"PROXY TCP4 secret 5.6.7.8 1 2\r\n";
    let text = error_of(v1).to_string();
    assert!(!text.contains("secret"), "{text}");
}

// --- Trusted ---

#[test]
fn trusted_parses_networks_and_addresses_and_refuses_the_rest() {
    let trusted = Trusted::parse(["10.0.0.0/8", " 2001:db8::/32 ", "192.0.2.7", "::1"]).expect("valid");
    assert_eq!(trusted.to_string(), "10.0.0.0/8, 2001:db8::/32, 192.0.2.7/32, ::1/128");
    assert_eq!(trusted.to_string().parse::<Trusted>().expect("round trip"), trusted);
    let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
    for (addr, want) in [
        ("10.1.2.3", true),
        ("11.0.0.0", false),
        ("::ffff:10.1.2.3", true),
        ("2001:db8:ffff::1", true),
        ("2001:db9::1", false),
        ("192.0.2.7", true),
        ("192.0.2.8", false),
        ("::1", true),
        ("127.0.0.1", false),
    ] {
        assert_eq!(trusted.contains(ip(addr)), want, "{addr}");
    }
    let mapped = Trusted::parse(["::ffff:10.0.0.0/104"]).expect("valid");
    assert!(mapped.contains(ip("10.9.9.9")) && !mapped.contains(ip("11.0.0.1")));
    assert!(!Trusted::default().contains(ip("10.0.0.1")));
    assert!("".parse::<Trusted>().expect("empty").is_empty());
    for bad in ["10.0.0.0/33", "10.0.0/8", "example.net", "10.0.0.0/", "/8", "1.2.3.4.5"] {
        let e = Trusted::parse([bad]).expect_err(bad);
        assert_eq!(e, TrustedError::NotANetwork { entry: bad.to_owned() });
        assert!(e.to_string().contains("10.0.0.0/8"), "the message shows the fix: {e}");
    }
    let e = "10.0.0.0/8, 10.1.0.0/8".parse::<Trusted>().expect_err("host bits");
    assert_eq!(e, TrustedError::HostBits { entry: "10.1.0.0/8".to_owned(), network: "10.0.0.0/8".to_owned() });
}

// --- read_header over real loopback sockets ---

/// A connected loopback pair: (the client's end, the proxy's accepted end).
async fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("listener address");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.expect("connect");
    client.set_nodelay(true).expect("TCP_NODELAY: one segment per write");
    (client, accepted.expect("accept").0)
}

/// Reads from `server` to the end of stream, the writer having half-closed.
async fn rest_of(server: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(LONG_TIMEOUT, server.read_to_end(&mut rest))
        .await
        .expect("the rest arrives")
        .expect("read the rest");
    rest
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write to.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID): {}", io::Error::last_os_error());
    Duration::new(u64::try_from(ts.tv_sec).expect("non-negative"), u32::try_from(ts.tv_nsec).expect("below 1e9"))
}

#[tokio::test]
async fn read_header_consumes_exactly_the_header_of_every_fixture() {
    for (file, bytes) in FIXTURES {
        let (mut client, mut server) = connected_pair().await;
        // Header and payload in one write: one segment, so the peek sees both.
        client.write_all(bytes).await.expect("write");
        client.shutdown().await.expect("shutdown(SHUT_WR)");
        let header = read_header(&server, LONG_TIMEOUT).await.unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_wanted(file, &header);
        let (_, len) = complete(bytes);
        assert_eq!(rest_of(&mut server).await, &bytes[len..], "{file}: the stream after the header, byte-exact");
    }
}

#[tokio::test]
async fn read_header_reads_a_header_dribbled_one_byte_at_a_time() {
    for name in ["v1_tcp6.bin", "v2_authority.bin"] {
        let bytes = FIXTURES.iter().find(|(file, _)| *file == name).expect("fixture").1;
        let (mut client, mut server) = connected_pair().await;
        let writer = tokio::spawn(async move {
            for byte in bytes {
                client.write_all(std::slice::from_ref(byte)).await.expect("write one byte");
                tokio::time::sleep(DRIBBLE_PAUSE).await;
            }
            client.shutdown().await.expect("shutdown(SHUT_WR)");
            client
        });
        let header = read_header(&server, LONG_TIMEOUT).await.expect("the dribbled header is read");
        assert_wanted(name, &header);
        assert_eq!(rest_of(&mut server).await, PAYLOAD, "{name}");
        let _client = writer.await.expect("writer task");
    }
}

#[tokio::test]
async fn read_header_times_out_on_a_slow_header_without_spinning() {
    // Half a header queued: the socket stays readable, so a loop that does not clear the
    // readiness would peek again and again for the whole timeout.
    let bytes = build_v2("192.0.2.7:5555".parse().expect("a"), "[2001:db8::1]:443".parse().expect("a"), None);
    let (mut client, server) = connected_pair().await;
    client.write_all(&bytes[..bytes.len() / 2]).await.expect("write");
    let (start, cpu) = (Instant::now(), thread_cpu_time());
    let r = tokio::time::timeout(SHORT_TIMEOUT + HANG_MARGIN, read_header(&server, SHORT_TIMEOUT))
        .await
        .expect("the read returns after its timeout, it does not hang");
    let (took, used) = (start.elapsed(), thread_cpu_time() - cpu);
    assert!(matches!(r, Err(ProxyError::Timeout)), "{r:?}");
    assert!(took >= SHORT_TIMEOUT, "timed out early, after {took:?}");
    assert!(used < WAIT_CPU_BUDGET, "waiting {SHORT_TIMEOUT:?} for bytes used {used:?} of CPU: the read spins");
    // Nothing was consumed: register afresh (see read_header) and read the half header back.
    let mut server = TcpStream::from_std(server.into_std().expect("deregister")).expect("register afresh");
    let mut got = vec![0; bytes.len() / 2];
    server.read_exact(&mut got).await.expect("the queued bytes are still there");
    assert_eq!(got, &bytes[..bytes.len() / 2]);
}

#[tokio::test]
async fn read_header_times_out_on_a_silent_peer() {
    let (_client, server) = connected_pair().await;
    let start = Instant::now();
    let r = read_header(&server, SHORT_TIMEOUT).await;
    assert!(matches!(r, Err(ProxyError::Timeout)), "{r:?}");
    assert!(start.elapsed() >= SHORT_TIMEOUT && start.elapsed() < SHORT_TIMEOUT + HANG_MARGIN);
}

#[tokio::test]
async fn read_header_refuses_other_protocols_quickly_and_consumes_nothing() {
    let tls = [&[0x16, 0x03, 0x01, 0x00, 0x05][..], &[0x01, 0x00, 0x00, 0x01, 0x00]].concat();
    for start in [&b"GET / HTTP/1.1\r\nHost: a.example.net\r\n\r\n"[..], &tls] {
        let (mut client, mut server) = connected_pair().await;
        client.write_all(start).await.expect("write");
        client.shutdown().await.expect("shutdown(SHUT_WR)");
        let begun = Instant::now();
        let r = read_header(&server, LONG_TIMEOUT).await;
        assert!(matches!(r, Err(ProxyError::NoHeader { .. })), "{r:?}");
        assert!(begun.elapsed() < QUICK, "took {:?}", begun.elapsed());
        assert_eq!(rest_of(&mut server).await, start, "nothing consumed");
    }
}

#[tokio::test]
async fn read_header_refuses_oversized_headers_quickly() {
    let v1 = [&b"PROXY UNKNOWN "[..], &[b'x'; MAX_V1_HEADER]].concat();
    let v2_declaring = v2(0x21, 0x11, &[0; 0x2000])[..V2_FIXED].to_vec();
    for bytes in [v1, v2_declaring] {
        let (mut client, server) = connected_pair().await;
        client.write_all(&bytes).await.expect("write");
        let begun = Instant::now();
        let r = read_header(&server, LONG_TIMEOUT).await;
        assert!(matches!(r, Err(ProxyError::TooLarge)), "{r:?}");
        assert!(begun.elapsed() < QUICK, "took {:?}", begun.elapsed());
    }
}

#[tokio::test]
async fn read_header_reports_the_end_of_stream_mid_header() {
    let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n";
    let cut = header.len() - 3;
    // The FIN already queued when the read starts.
    let (mut client, server) = connected_pair().await;
    client.write_all(&header[..cut]).await.expect("write");
    client.shutdown().await.expect("shutdown(SHUT_WR)");
    let r = read_header(&server, LONG_TIMEOUT).await;
    assert!(matches!(r, Err(ProxyError::Eof { got }) if got == cut), "{r:?}");
    // The FIN arriving while the read waits for the rest.
    let (mut client, server) = connected_pair().await;
    let writer = tokio::spawn(async move {
        client.write_all(&header[..cut]).await.expect("write");
        tokio::time::sleep(SHORT_TIMEOUT).await;
        client.shutdown().await.expect("shutdown(SHUT_WR)");
        client
    });
    let r = read_header(&server, LONG_TIMEOUT).await;
    assert!(matches!(r, Err(ProxyError::Eof { got }) if got == cut), "{r:?}");
    let _client = writer.await.expect("writer task");
    // Nothing at all before the FIN.
    let (client, server) = connected_pair().await;
    drop(client);
    let r = read_header(&server, LONG_TIMEOUT).await;
    assert!(matches!(r, Err(ProxyError::Eof { got: 0 })), "{r:?}");
}

// --- A real consumer: HAProxy `accept-proxy` reading the built headers ---

/// A HAProxy process of this test and its temporary directory; both go when it drops.
struct Haproxy {
    /// The process, ended by its PID on drop.
    child: Child,
    /// The directory of its config, log and Unix socket.
    dir: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy with `listen` sections (`{dir}` in them replaced by its directory);
    /// `None` when HAProxy is not installed.
    fn start(listen: &str) -> Option<Self> {
        /// Tells apart the directories of tests running at once in this process.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        if !Path::new(HAPROXY).exists() {
            eprintln!("SKIPPED: {HAPROXY} is not installed (apt-get install haproxy), so no real consumer test");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "ntlm-pp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let config = format!(
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n{}",
            listen.replace("{dir}", &dir.display().to_string())
        );
        std::fs::write(dir.join("haproxy.cfg"), config).expect("write the config");
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("log file");
        let child = Process::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(dir.join("haproxy.cfg"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        Some(Self { child, dir })
    }

    /// Connects to the Unix socket `name` in its directory, retrying while HAProxy starts.
    async fn connect(&mut self, name: &str) -> UnixStream {
        let path = self.dir.join(name);
        let deadline = Instant::now() + HAPROXY_START;
        loop {
            match UnixStream::connect(&path).await {
                Ok(stream) => return stream,
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("haproxy exited ({status}): {}", self.log());
                    }
                    tokio::time::sleep(HAPROXY_POLL).await;
                }
                Err(e) => panic!("haproxy does not listen on {}: {e}; {}", path.display(), self.log()),
            }
        }
    }

    /// Its log so far, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // Child::kill signals this child's own PID.
        if let Err(e) = self.child.kill() {
            eprintln!("could not stop haproxy (PID {}): {e}", self.child.id());
        }
        if let Err(e) = self.child.wait() {
            eprintln!("could not reap haproxy (PID {}): {e}", self.child.id());
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
    }
}

#[tokio::test]
async fn haproxy_accepts_the_built_headers_and_takes_their_addresses() {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let port = backend.local_addr().expect("address").port();
    // HAProxy reads our header (`accept-proxy`: v1 or v2) and re-emits the addresses it
    // learnt to our backend (`send-proxy-v2`), with the authority it received.
    let Some(mut haproxy) = Haproxy::start(&format!(
        "listen in\n  bind unix@{{dir}}/in.sock accept-proxy\n  \
         server s 127.0.0.1:{port} send-proxy-v2 proxy-v2-options authority\n"
    )) else {
        return;
    };
    let addr = |s: &str| -> SocketAddr { s.parse().expect("address") };
    // First a header HAProxy must refuse: it closes the client, and the backend sees nothing
    // of it (the next connection it gets carries the next case's payload).
    // (HAProxy 2.6 takes a port of 99999 as 34463, so the broken header lacks a port.)
    let mut client = haproxy.connect("in.sock").await;
    client.write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555\r\nrefused").await.expect("write");
    let (begun, mut sink) = (Instant::now(), Vec::new());
    let refused = tokio::time::timeout(LONG_TIMEOUT, client.read_to_end(&mut sink)).await.expect("HAProxy answers");
    assert!(refused.is_err() || sink.is_empty(), "HAProxy closes a client with a broken header: {refused:?}");
    // A forwarded connection would stay open until HAProxy's 10 s client timeout.
    assert!(begun.elapsed() < QUICK, "HAProxy closed the client only after {:?}", begun.elapsed());
    let cases = [
        ("v1", addr("192.0.2.7:5555"), addr("198.51.100.1:443"), None),
        ("v2", addr("192.0.2.7:5555"), addr("198.51.100.1:443"), Some("a.example.net")),
        ("v1", addr("[2001:db8::7]:65535"), addr("[2001:db8::1]:1"), None),
        ("v2", addr("[2001:db8::7]:1024"), addr("[2001:db8::1]:443"), Some("b.example.net")),
        ("v1", addr("192.0.2.7:5555"), addr("[2001:db8::1]:443"), None),
        ("v2", addr("[::ffff:192.0.2.7]:5555"), addr("198.51.100.1:443"), None),
        ("v2", addr("[2001:db8::7]:5555"), addr("198.51.100.1:443"), None),
    ];
    for (i, (version, source, destination, authority)) in cases.into_iter().enumerate() {
        let header = match version {
            "v1" => build_v1(source, destination),
            _ => build_v2(source, destination, authority),
        };
        let payload = format!("case {i}: the client's first bytes\r\n");
        let mut client = haproxy.connect("in.sock").await;
        client.write_all(&[&header[..], payload.as_bytes()].concat()).await.expect("write");
        client.shutdown().await.expect("shutdown(SHUT_WR)");
        let (mut conn, _) = tokio::time::timeout(LONG_TIMEOUT, backend.accept())
            .await
            .unwrap_or_else(|_| panic!("case {i}: HAProxy never connected to the backend: {}", haproxy.log()))
            .expect("accept");
        let mut got = Vec::new();
        tokio::time::timeout(LONG_TIMEOUT, conn.read_to_end(&mut got)).await.expect("HAProxy ends").expect("read");
        let (parsed, len) = complete(&got);
        let want = Header::Proxy {
            addresses: Addresses { source: canonical(source), destination: canonical(destination) },
            authority: authority.map(str::to_owned),
        };
        assert_eq!(parsed, want, "case {i} ({version}): HAProxy took the addresses sent");
        assert_eq!(&got[len..], payload.as_bytes(), "case {i}");
    }
}

// --- Properties ---

/// Arbitrary socket addresses: IPv4, IPv6, and IPv4-mapped IPv6.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
        (any::<u128>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
        (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).to_ipv6_mapped().into(), port)),
    ]
}

/// Starts that send the parser down each path, to be followed by arbitrary bytes.
fn starts() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        vec![],
        b"PROXY ".to_vec(),
        b"PROXY TCP4 ".to_vec(),
        b"PROXY UNKNOWN".to_vec(),
        ppp::v2::PROTOCOL_PREFIX.to_vec(),
        [ppp::v2::PROTOCOL_PREFIX, &[0x21, 0x11]].concat(),
        [ppp::v2::PROTOCOL_PREFIX, &[0x21, 0x21, 0x00]].concat(),
    ])
}

/// A start from [`starts`] and arbitrary bytes, with a place to cut them.
fn arbitrary_bytes() -> impl Strategy<Value = (Vec<u8>, usize)> {
    ntlm_fuzz::with_cut(
        (starts(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(start, bytes)| [start, bytes].concat()),
    )
}

/// A captured header and what followed it, with bytes overwritten.
fn mutated_fixture() -> impl Strategy<Value = Vec<u8>> {
    (0..FIXTURES.len(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)).prop_map(
        |(which, edits)| {
            let mut bytes = FIXTURES[which].1.to_vec();
            for (at, byte) in edits {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            bytes
        },
    )
}

/// A header [`build_v1`] or [`build_v2`] wrote, bytes after it, and a place to cut it.
#[derive(Debug, Clone)]
struct Built {
    source: SocketAddr,
    destination: SocketAddr,
    authority: Option<String>,
    v1: bool,
    after: Vec<u8>,
    cut: prop::sample::Index,
}

impl Built {
    fn header(&self) -> Vec<u8> {
        if self.v1 {
            build_v1(self.source, self.destination)
        } else {
            build_v2(self.source, self.destination, self.authority.as_deref())
        }
    }

    /// The header and the bytes after it: what the parser is given.
    fn stream(&self) -> Vec<u8> {
        [self.header(), self.after.clone()].concat()
    }
}

fn built() -> impl Strategy<Value = Built> {
    (
        socket_addr(),
        socket_addr(),
        prop::option::of(".{0,40}"),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..20),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(source, destination, authority, v1, after, cut)| Built {
            source,
            destination,
            authority,
            v1,
            after,
            cut,
        })
}

/// Valid headers, captured or built, with a few random edits (see [`ntlm_fuzz::havoc`]), and a
/// place to cut them.
fn havoc_on_valid_headers() -> impl Strategy<Value = (Vec<u8>, usize)> {
    let valid = prop_oneof![
        prop::sample::select(FIXTURES).prop_map(|(_, bytes)| bytes.to_vec()),
        built().prop_map(|b| b.stream())
    ];
    ntlm_fuzz::with_cut(ntlm_fuzz::havoc(valid))
}

/// Longer than every error message with its numbers and its quote of [`QUOTED_PREFIX`] escaped
/// bytes; the inputs here run to hundreds of bytes, so a message quoting more of them would
/// pass it.
const LONGEST_MESSAGE: usize = 512;

/// No input panics the parser, a complete header never claims more bytes than given nor more
/// than the limit of its version, an error is one short line quoting at most
/// [`QUOTED_PREFIX`] bytes, and an answer other than Incomplete does not change with more
/// bytes (read_header relies on it): the parse of `buf` cut at `cut` against that of `buf`.
fn answers_are_final(buf: &[u8], cut: usize) -> Result<(), TestCaseError> {
    let (prefix, whole) = (parse_header(&buf[..cut]), parse_header(buf));
    for (given, answer) in [(cut, &prefix), (buf.len(), &whole)] {
        match answer {
            Ok(Parsed::Complete { len, .. }) => {
                prop_assert!(*len <= given, "claims {len} of {given} bytes");
                prop_assert!(*len <= MAX_V1_HEADER.max(MAX_V2_HEADER));
            }
            Ok(Parsed::Incomplete) => {}
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.contains('\n') && text.len() <= LONGEST_MESSAGE, "{text}");
                if let ProxyError::NoHeader { start } = e {
                    let quoted = buf[..given.min(QUOTED_PREFIX)].escape_ascii().to_string();
                    prop_assert_eq!(start, &quoted);
                }
            }
        }
    }
    match (prefix, whole) {
        (Ok(Parsed::Incomplete), _) => {}
        (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
        // NoHeader quotes the bytes it saw, so a longer prefix quotes more of them.
        (Err(ProxyError::NoHeader { start: a }), Err(ProxyError::NoHeader { start: b })) => {
            prop_assert!(b.starts_with(&a), "{} then {}", a, b);
        }
        (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
        (a, b) => prop_assert!(false, "{a:?} at {cut} bytes became {b:?}"),
    }
    Ok(())
}

/// A complete header found in `bytes` claims no more than them.
fn claims_no_more_than_given(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(Parsed::Complete { len, .. }) = parse_header(bytes) {
        prop_assert!(len <= bytes.len());
    }
    Ok(())
}

/// A built header parses back to the addresses given (IPv4-mapped ones as IPv4) and the
/// authority, ends where it ends, fits its version's limit, and every prefix of it is
/// Incomplete.
fn round_trips(case: Built) -> Result<(), TestCaseError> {
    let header = case.header();
    let want = Header::Proxy {
        addresses: Addresses { source: canonical(case.source), destination: canonical(case.destination) },
        authority: if case.v1 { None } else { case.authority.clone().filter(|a| !a.is_empty()) },
    };
    prop_assert_eq!(parse_header(&case.stream()).ok(), Some(Parsed::Complete { header: want, len: header.len() }));
    prop_assert_eq!(parse_header(&header[..case.cut.index(header.len())]).ok(), Some(Parsed::Incomplete));
    let cap = if case.v1 { MAX_V1_HEADER } else { MAX_V2_HEADER };
    prop_assert!(header.len() <= cap);
    Ok(())
}

/// The reference for [`Trusted::contains`]: every address as a 128-bit number in the
/// IPv4-mapped IPv6 space, compared on the network's prefix bits.
fn reference_contains(nets: &[(IpAddr, u8)], ip: IpAddr) -> bool {
    let as_mapped = |ip: IpAddr| -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)) | 0xffff_0000_0000,
            IpAddr::V6(v6) => u128::from(v6),
        }
    };
    let ip = as_mapped(ip);
    nets.iter().any(|&(net, prefix)| {
        let prefix = if net.is_ipv4() { u32::from(prefix) + 96 } else { u32::from(prefix) };
        let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
        ip & mask == as_mapped(net) & mask
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// See [`answers_are_final`].
    #[test]
    fn arbitrary_bytes_never_panic_and_answers_are_final((buf, cut) in arbitrary_bytes()) {
        answers_are_final(&buf, cut)?;
    }

    /// Real headers with bytes overwritten never panic the parser nor claim more bytes than
    /// given.
    #[test]
    fn mutated_fixtures_never_panic(bytes in mutated_fixture()) {
        claims_no_more_than_given(&bytes)?;
    }

    /// Valid headers with random edits: see [`answers_are_final`].
    #[test]
    fn havoc_on_valid_headers_never_panics_and_answers_are_final((buf, cut) in havoc_on_valid_headers()) {
        answers_are_final(&buf, cut)?;
    }

    /// See [`round_trips`].
    #[test]
    fn built_headers_round_trip(case in built()) {
        round_trips(case)?;
    }

    /// Trusted::contains agrees with a reference on 128-bit numbers.
    #[test]
    fn trusted_contains_agrees_with_a_reference(
        nets in prop::collection::vec(
            prop_oneof![
                (any::<u32>(), 0u8..=32).prop_map(|(ip, p)| (IpAddr::V4(Ipv4Addr::from(ip)), p)),
                (any::<u128>(), 0u8..=128).prop_map(|(ip, p)| (IpAddr::V6(Ipv6Addr::from(ip)), p)),
                (any::<u32>(), 96u8..=128).prop_map(|(ip, p)| (IpAddr::V6(Ipv4Addr::from(ip).to_ipv6_mapped()), p)),
            ],
            0..6,
        ),
        probes in prop::collection::vec(
            prop_oneof![
                any::<u32>().prop_map(|ip| IpAddr::V4(Ipv4Addr::from(ip))),
                any::<u128>().prop_map(|ip| IpAddr::V6(Ipv6Addr::from(ip))),
                any::<u32>().prop_map(|ip| IpAddr::V6(Ipv4Addr::from(ip).to_ipv6_mapped())),
            ],
            1..8,
        ),
    ) {
        // The networks as an operator writes them: host bits cleared.
        let nets: Vec<(IpAddr, u8)> = nets
            .into_iter()
            .map(|(ip, prefix)| (IpNet::new(ip, prefix).expect("prefix in range").trunc().addr(), prefix))
            .collect();
        let entries: Vec<String> = nets.iter().map(|(ip, prefix)| format!("{ip}/{prefix}")).collect();
        let trusted = Trusted::parse(&entries).expect("valid networks");
        // Probes near the networks too, so that matches are common.
        let near = nets.iter().map(|(ip, _)| *ip);
        for ip in probes.into_iter().chain(near) {
            prop_assert_eq!(trusted.contains(ip), reference_contains(&nets, ip), "{} in {:?}", ip, entries);
        }
    }
}

/// The PROXY header properties above, on fresh cases for a time budget instead of [`CASES`]
/// cases (see the `ntlm_fuzz` crate).
#[test]
#[ignore = "fuzz target: `cargo xtask test` runs it for NTLM_SPLICE_FUZZ_SECS"]
fn fuzz_proxy_header() {
    let stream = |(buf, _): &(Vec<u8>, usize)| buf.clone();
    ntlm_fuzz::Target::new("proxy_header")
        .property("arbitrary bytes", arbitrary_bytes(), stream, |(buf, cut)| answers_are_final(&buf, cut))
        .property("mutated fixtures", mutated_fixture(), Clone::clone, |bytes| claims_no_more_than_given(&bytes))
        .property("havoc on valid headers", havoc_on_valid_headers(), stream, |(buf, cut)| answers_are_final(&buf, cut))
        .property("built headers round trip", built(), Built::stream, round_trips)
        .run();
}
