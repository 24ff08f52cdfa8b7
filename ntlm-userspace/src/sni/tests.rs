//! Tests of the SNI peek and table: ClientHellos captured from real clients on loopback
//! (`fixtures/`, recorded by `fixtures/capture.sh`), the same hellos re-framed into many
//! records, a real loopback socket pair for the peek, and property tests against synthetic
//! hellos and a linear-scan reference table.

use std::time::Instant;

use proptest::prelude::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

/// A ClientHello captured from a real client, and the server name the parser must find in it.
struct Fixture {
    /// The file name, for failure messages.
    file: &'static str,
    /// The client's first bytes, as captured.
    bytes: &'static [u8],
    /// The name the client was given (`-servername`, the URL's host), normalized.
    server_name: Option<&'static str>,
}

/// Every captured hello. Each is one TLS record, as the clients sent them.
const FIXTURES: &[Fixture] = &[
    // openssl s_client (OpenSSL 3.0, TLS 1.3 with 1.2 fallback) -servername a.example.net
    Fixture {
        file: "openssl_tls13.bin",
        bytes: include_bytes!("fixtures/openssl_tls13.bin"),
        server_name: Some("a.example.net"),
    },
    // curl 7.88 (OpenSSL 3.0) --resolve a.example.net:PORT:127.0.0.1 https://a.example.net:PORT/
    Fixture { file: "curl.bin", bytes: include_bytes!("fixtures/curl.bin"), server_name: Some("a.example.net") },
    // openssl s_client -tls1_2 -servername b12.example.net: no supported_versions extension
    Fixture {
        file: "openssl_tls12.bin",
        bytes: include_bytes!("fixtures/openssl_tls12.bin"),
        server_name: Some("b12.example.net"),
    },
    // openssl s_client -noservername: no server_name extension at all
    Fixture {
        file: "openssl_noservername.bin",
        bytes: include_bytes!("fixtures/openssl_noservername.bin"),
        server_name: None,
    },
    // openssl s_client -servername A.Example.NET. (sent as typed: capitals and the root dot)
    Fixture {
        file: "openssl_upper_dot.bin",
        bytes: include_bytes!("fixtures/openssl_upper_dot.bin"),
        server_name: Some("a.example.net"),
    },
];

/// Proptest cases per property: enough to reach the corners, bounded so the whole module
/// runs in seconds.
const CASES: u32 = 2000;

/// The pause between two bytes of a dribbled hello, on the writer's side only.
const DRIBBLE_PAUSE: Duration = Duration::from_millis(1);

/// A timeout the peek must never reach in tests that expect an answer.
const LONG_TIMEOUT: Duration = Duration::from_secs(30);

/// A short timeout for the tests that expect the peek to time out.
const SHORT_TIMEOUT: Duration = Duration::from_millis(200);

/// How much later than its timeout a timed-out peek may return on a busy machine before
/// the test calls it hung.
const HANG_MARGIN: Duration = Duration::from_secs(3);

/// How soon an answer that needs no waiting (not TLS, too large) must come: a small part of
/// [`LONG_TIMEOUT`], so an answer that waited for the timeout fails.
const QUICK: Duration = Duration::from_secs(5);

/// The most CPU time a peek waiting [`SHORT_TIMEOUT`] for bytes that never come may use: a
/// twentieth of the wait. Measured: about 0.15 ms when it waits as it should, over 50 ms
/// when it spins (peeking again on a readiness it never clears) on a loaded 2-core machine.
const WAIT_CPU_BUDGET: Duration = Duration::from_millis(10);

/// The record-layer version of the records the tests build (TLS 1.0, as most clients send).
const RECORD_VERSION: [u8; 2] = [0x03, 0x01];

/// The handshake message inside a fixture (its only record's fragment).
fn message_of(fixture: &Fixture) -> &'static [u8] {
    let bytes = fixture.bytes;
    let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    assert_eq!(bytes.len(), RECORD_HEADER_LEN + len, "{} is not exactly one record", fixture.file);
    &bytes[RECORD_HEADER_LEN..]
}

/// `message` framed as consecutive handshake records, their fragment sizes taken from
/// `sizes` in turn (cycled; a size past the end takes what is left).
fn reframe(message: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = message;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (fragment, after) = rest.split_at(size.clamp(1, MAX_RECORD_FRAGMENT).min(rest.len()));
        out.push(TlsRecordType::Handshake.0);
        out.extend_from_slice(&RECORD_VERSION);
        out.extend_from_slice(&u16::try_from(fragment.len()).expect("fragment fits u16").to_be_bytes());
        out.extend_from_slice(fragment);
        rest = after;
    }
    out
}

/// One extension: type, 2-byte length, data.
fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut out = kind.to_be_bytes().to_vec();
    out.extend_from_slice(&u16::try_from(data.len()).expect("extension fits u16").to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A server_name extension listing `names` as host_name entries.
fn sni_extension(names: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for name in names {
        list.push(tls_parser::SNIType::HostName.0);
        list.extend_from_slice(&u16::try_from(name.len()).expect("name fits u16").to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = u16::try_from(list.len()).expect("list fits u16").to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    extension(TlsExtensionType::ServerName.0, &data)
}

/// A synthetic ClientHello handshake message (header included) with these extensions, built
/// byte by byte from RFC 8446 section 4.1.2.
fn client_hello(extensions: &[Vec<u8>]) -> Vec<u8> {
    let extensions = extensions.concat();
    let mut body = vec![0x03, 0x03]; // legacy_version TLS 1.2
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // legacy_session_id: empty
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // cipher_suites: TLS_AES_128_GCM_SHA256
    body.extend_from_slice(&[0x01, 0x00]); // legacy_compression_methods: null
    body.extend_from_slice(&u16::try_from(extensions.len()).expect("extensions fit u16").to_be_bytes());
    body.extend_from_slice(&extensions);
    let len = u32::try_from(body.len()).expect("body fits u32").to_be_bytes();
    let mut message = vec![TlsHandshakeType::ClientHello.0, len[1], len[2], len[3]];
    message.extend_from_slice(&body);
    message
}

/// A synthetic hello naming `name`, in one record.
fn hello_naming(name: &[u8]) -> Vec<u8> {
    reframe(&client_hello(&[sni_extension(&[name])]), &[MAX_RECORD_FRAGMENT])
}

/// The server name `buf` parses to; panics unless it is a complete hello.
fn name_in(buf: &[u8]) -> Option<String> {
    match parse_client_hello(buf) {
        Ok(Hello::Complete { server_name }) => server_name,
        other => panic!("expected a complete hello, got {other:?}"),
    }
}

/// The error `buf` parses to; panics unless it is one.
fn error_of(buf: &[u8]) -> SniError {
    match parse_client_hello(buf) {
        Err(e) => e,
        Ok(hello) => panic!("expected an error, got {hello:?}"),
    }
}

#[test]
fn fixtures_parse_to_their_server_names() {
    for fixture in FIXTURES {
        assert_eq!(name_in(fixture.bytes).as_deref(), fixture.server_name, "{}", fixture.file);
        // What follows the hello (TLS 1.3's compatibility ChangeCipherSpec, early data) is
        // not the hello's business.
        let followed = [fixture.bytes, &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]].concat();
        assert_eq!(name_in(&followed).as_deref(), fixture.server_name, "{} followed by a record", fixture.file);
    }
}

/// The extension types of a fixture's hello, in order.
fn extension_types(fixture: &Fixture) -> Vec<u16> {
    let message = message_of(fixture);
    let (_, hello) = parse_tls_handshake_client_hello(&message[HANDSHAKE_HEADER_LEN..]).expect("fixture parses");
    let mut extensions = hello.ext.expect("fixture has extensions");
    let mut types = Vec::new();
    while !extensions.is_empty() {
        let (next, extension) = parse_tls_extension_unknown(extensions).expect("extension parses");
        let TlsExtension::Unknown(kind, _) = extension else { panic!("parsed as opaque") };
        types.push(kind.0);
        extensions = next;
    }
    types
}

#[test]
fn the_fixtures_are_what_they_claim() {
    // TLS 1.3 clients send supported_versions; the TLS 1.2-only hello has none, so the TLS
    // 1.2 path of a real client is covered. Only the -noservername hello lacks server_name.
    let versions = TlsExtensionType::SupportedVersions.0;
    let server_name = TlsExtensionType::ServerName.0;
    for fixture in FIXTURES {
        let types = extension_types(fixture);
        assert_eq!(types.contains(&versions), fixture.file != "openssl_tls12.bin", "{}", fixture.file);
        assert_eq!(types.contains(&server_name), fixture.server_name.is_some(), "{}", fixture.file);
    }
}

#[test]
fn every_prefix_of_a_fixture_is_incomplete() {
    for fixture in FIXTURES {
        for end in 0..fixture.bytes.len() {
            assert_eq!(
                parse_client_hello(&fixture.bytes[..end]).ok(),
                Some(Hello::Incomplete),
                "{} cut at {end}",
                fixture.file
            );
        }
    }
}

#[test]
fn one_byte_records_parse_and_their_prefixes_are_incomplete() {
    for fixture in FIXTURES {
        let stream = reframe(message_of(fixture), &[1]);
        assert_eq!(stream.len(), message_of(fixture).len() * (RECORD_HEADER_LEN + 1));
        assert_eq!(name_in(&stream).as_deref(), fixture.server_name, "{} in 1-byte records", fixture.file);
        for end in 0..stream.len() {
            assert_eq!(
                parse_client_hello(&stream[..end]).ok(),
                Some(Hello::Incomplete),
                "{} cut at {end}",
                fixture.file
            );
        }
    }
}

#[test]
fn non_tls_starts_are_refused_on_their_first_bytes() {
    let sslv2_hello = [0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15];
    for start in
        [&b"GET / HTTP/1.1\r\n"[..], b"G", b"\x00", &sslv2_hello, b"\x16\x02", b"\x16\x03\x05", b"\x17\x03\x03"]
    {
        assert!(matches!(error_of(start), SniError::NotTls), "{start:?}");
    }
    // The plausible versions pass: SSL 3.0 to TLS 1.3 at the record layer.
    for minor in 0..=RECORD_VERSION_MINOR_MAX {
        assert_eq!(parse_client_hello(&[0x16, 0x03, minor]).ok(), Some(Hello::Incomplete), "3.{minor}");
    }
}

#[test]
fn broken_records_and_hellos_are_malformed() {
    let message = client_hello(&[sni_extension(&[b"a.example.net"])]);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty record", vec![0x16, 0x03, 0x01, 0x00, 0x00]),
        ("record over 2^14", [&[0x16, 0x03, 0x01, 0x40, 0x01][..], &[0; 10]].concat()),
        ("not a ClientHello", reframe(&[&[2][..], &message[1..]].concat(), &[MAX_RECORD_FRAGMENT])),
        (
            "an alert inside the hello",
            [&reframe(&message[..10], &[10])[..], &[0x15, 0x03, 0x01, 0x00, 0x02, 2, 40]].concat(),
        ),
        (
            "bad version in a later record",
            [&reframe(&message[..10], &[10])[..], &[0x16, 0x04, 0x01, 0x00, 0x01, 0]].concat(),
        ),
        (
            "two server_name extensions",
            hello_with(&[sni_extension(&[b"a.example.net"]), sni_extension(&[b"b.example.net"])]),
        ),
        ("two host names", hello_with(&[sni_extension(&[b"a.example.net", b"b.example.net"])])),
        ("empty server_name", hello_with(&[extension(0, &[])])),
        ("server_name list too long", hello_with(&[extension(0, &[0x00, 0x09, 0x00, 0x00, 0x01, b'a'])])),
        ("truncated extension", hello_with(&[vec![0x00, 0x10, 0x00, 0x05, 0x00]])),
    ];
    // The message says it ends one byte before its extensions do.
    let mut short = message.clone();
    short.pop();
    short[3] -= 1;
    cases.push(("extensions past the end", reframe(&short, &[MAX_RECORD_FRAGMENT])));
    for (what, bytes) in cases {
        assert!(matches!(error_of(&bytes), SniError::Malformed(_)), "{what}: {:?}", parse_client_hello(&bytes));
    }
}

/// A hello with these extensions, in one record.
fn hello_with(extensions: &[Vec<u8>]) -> Vec<u8> {
    reframe(&client_hello(extensions), &[MAX_RECORD_FRAGMENT])
}

#[test]
fn an_oversized_hello_is_refused_from_its_header() {
    let declaring = |body_len: usize| {
        let len = u32::try_from(body_len).expect("fits").to_be_bytes();
        vec![0x16, 0x03, 0x01, 0x00, 0x04, TlsHandshakeType::ClientHello.0, len[1], len[2], len[3]]
    };
    assert_eq!(parse_client_hello(&declaring(MAX_CLIENT_HELLO - HANDSHAKE_HEADER_LEN)).ok(), Some(Hello::Incomplete));
    assert!(matches!(error_of(&declaring(MAX_CLIENT_HELLO - HANDSHAKE_HEADER_LEN + 1)), SniError::TooLarge));
    // The header split over records is seen as soon as it is whole.
    let split = reframe(&declaring(MAX_CLIENT_HELLO)[RECORD_HEADER_LEN..], &[1]);
    assert!(matches!(error_of(&split), SniError::TooLarge));
}

#[test]
fn names_that_are_not_host_names_are_no_name() {
    let long_label = "a".repeat(MAX_LABEL + 1);
    let long_name = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62));
    assert_eq!(long_name.len(), MAX_HOST_NAME + 1);
    for bad in [
        &b"bad name.example"[..],
        b"-a.example.net",
        b"a-.example.net",
        b"a..example.net",
        b".a.example.net",
        b"127.0.0.1",
        b"a.example.net..",
        b"\xc3\xa9.example.net",
        b"a.example.net\0",
        long_label.as_bytes(),
        long_name.as_bytes(),
    ] {
        assert_eq!(name_in(&hello_naming(bad)), None, "{}", String::from_utf8_lossy(bad));
    }
    let longest_label = "a".repeat(MAX_LABEL);
    let longest_name = &long_name[1..];
    for (good, want) in [
        (&b"LOCALHOST"[..], "localhost"),
        (b"a_b.example.net.", "a_b.example.net"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"1.2.3.a4", "1.2.3.a4"),
        (longest_label.as_bytes(), &longest_label),
        (longest_name.as_bytes(), longest_name),
    ] {
        assert_eq!(name_in(&hello_naming(good)).as_deref(), Some(want));
    }
}

#[test]
fn entries_of_other_name_types_are_ignored() {
    // A list with a name of an unknown type (1) before the host_name.
    let data = [&[0x00, 0x12][..], &[0x01, 0x00, 0x02, b'x', b'y'], &[0x00, 0x00, 0x0a], b"a.example."].concat();
    assert_eq!(name_in(&hello_with(&[extension(0, &data)])).as_deref(), Some("a.example"));
    let only_other = [&[0x00, 0x05][..], &[0x01, 0x00, 0x02, b'x', b'y']].concat();
    assert_eq!(name_in(&hello_with(&[extension(0, &only_other)])), None);
}

#[test]
fn errors_name_no_payload_bytes() {
    // The hello names this host; no error message may quote it (nor any other byte sent).
    let secret = b"secret-host.example.net";
    let message = client_hello(&[sni_extension(&[secret]), sni_extension(&[secret])]);
    for bytes in [reframe(&message, &[MAX_RECORD_FRAGMENT]), reframe(&message, &[3])] {
        let text = error_of(&bytes).to_string();
        assert!(!text.contains("secret"), "{text}");
    }
}

// --- SniPattern and SniTable ---

/// A pattern from a literal the test knows is valid.
fn pattern(s: &str) -> SniPattern {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn patterns_parse_normalized_and_bad_ones_are_refused() {
    assert_eq!(pattern("Intranet.Example.NET.").to_string(), "intranet.example.net");
    assert_eq!(pattern("*.Corp.Example.net").to_string(), "*.corp.example.net");
    assert_eq!(pattern("*.corp.example.net"), pattern("*.CORP.example.net."));
    for bad in [
        "",
        "*",
        "*.",
        "**.example.net",
        "a.*.example.net",
        "*example.net",
        "example.*",
        ".example.net",
        "a b.net",
        "1.2.3.4",
        "*.-a.net",
    ] {
        let e = bad.parse::<SniPattern>().expect_err(bad);
        assert_eq!(e.pattern, bad);
        assert!(e.to_string().contains("*.corp.example.net"), "the message shows the fix: {e}");
    }
}

#[test]
fn lookup_prefers_exact_then_the_longest_wildcard_then_the_default() {
    let mut table = SniTable::new();
    assert_eq!(table.lookup(Some("a.example.net")), None, "empty table, no default");
    table.insert(pattern("*.example.net"), "wide").expect("new");
    table.insert(pattern("*.corp.example.net"), "corp").expect("new");
    table.insert(pattern("exact.corp.example.net"), "exact").expect("new");
    assert_eq!(table.lookup(None), None, "no default yet");
    table.set_default("default");
    for (name, want) in [
        (Some("exact.corp.example.net"), "exact"),
        (Some("EXACT.corp.example.net."), "exact"),
        (Some("other.corp.example.net"), "corp"),
        (Some("a.b.corp.example.net"), "corp"),
        (Some("corp.example.net"), "wide"),
        (Some("x.example.net"), "wide"),
        (Some("example.net"), "default"),
        (Some("example.org"), "default"),
        (Some("not a name.example.net"), "default"),
        (None, "default"),
    ] {
        assert_eq!(table.lookup(name), Some(&want), "{name:?}");
    }
    let dup = table.insert(pattern("*.CORP.example.net"), "again").expect_err("listed twice");
    assert_eq!(dup.pattern, pattern("*.corp.example.net"));
    assert_eq!(table.lookup(Some("other.corp.example.net")), Some(&"corp"), "a duplicate changes nothing");
    table.set_default("new default");
    assert_eq!(table.lookup(None), Some(&"new default"));
}

// --- The peek, over real loopback sockets ---

/// A connected loopback pair: (the client's end, the proxy's accepted end).
async fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("listener address");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.expect("connect");
    client.set_nodelay(true).expect("TCP_NODELAY: one segment per write");
    (client, accepted.expect("accept").0)
}

/// Asserts that the next `want.len()` bytes readable from `server` are `want`: the peek
/// consumed nothing.
async fn assert_unconsumed(server: &mut TcpStream, want: &[u8]) {
    let mut got = vec![0; want.len()];
    server.read_exact(&mut got).await.expect("the peeked bytes are still readable");
    assert_eq!(got, want, "the stream after the peek is the stream the client sent");
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
async fn peek_reads_a_hello_dribbled_one_byte_at_a_time_and_consumes_nothing() {
    for fixture in [&FIXTURES[0], &FIXTURES[2]] {
        let (mut client, mut server) = connected_pair().await;
        let hello = fixture.bytes;
        let writer = tokio::spawn(async move {
            for byte in hello {
                client.write_all(std::slice::from_ref(byte)).await.expect("write one byte");
                tokio::time::sleep(DRIBBLE_PAUSE).await;
            }
            client
        });
        let name = peek_server_name(&server, LONG_TIMEOUT).await.expect("the dribbled hello is read");
        assert_eq!(name.as_deref(), fixture.server_name, "{}", fixture.file);
        let _client = writer.await.expect("writer task");
        assert_unconsumed(&mut server, hello).await;
    }
}

#[tokio::test]
async fn peek_reads_a_hello_larger_than_its_first_buffer_in_many_records() {
    // 10 000 bytes of padding (extension 21) before the name: more than the first buffer.
    let padding = extension(TlsExtensionType::Padding.0, &[0; 10_000]);
    let stream = reframe(&client_hello(&[padding, sni_extension(&[b"big.example.net"])]), &[1, 700, 3000]);
    assert!(stream.len() > INITIAL_PEEK);
    let (mut client, mut server) = connected_pair().await;
    client.write_all(&stream).await.expect("write");
    let name = peek_server_name(&server, LONG_TIMEOUT).await.expect("the hello is read");
    assert_eq!(name.as_deref(), Some("big.example.net"));
    assert_unconsumed(&mut server, &stream).await;
}

#[tokio::test]
async fn peek_times_out_on_a_silent_client() {
    let (_client, server) = connected_pair().await;
    let start = Instant::now();
    let r = tokio::time::timeout(SHORT_TIMEOUT + HANG_MARGIN, peek_server_name(&server, SHORT_TIMEOUT))
        .await
        .expect("the peek returns after its timeout, it does not hang");
    let took = start.elapsed();
    assert!(matches!(r, Err(SniError::Timeout)), "{r:?}");
    assert!(took >= SHORT_TIMEOUT, "timed out early, after {took:?}");
}

#[tokio::test]
async fn peek_waits_for_more_bytes_without_spinning() {
    // Half a hello is queued: the socket stays readable, so a peek loop that does not clear
    // the readiness would peek again and again for the whole timeout.
    let hello = FIXTURES[0].bytes;
    let (mut client, server) = connected_pair().await;
    client.write_all(&hello[..hello.len() / 2]).await.expect("write");
    let cpu = thread_cpu_time();
    let r = peek_server_name(&server, SHORT_TIMEOUT).await;
    let used = thread_cpu_time() - cpu;
    assert!(matches!(r, Err(SniError::Timeout)), "{r:?}");
    assert!(used < WAIT_CPU_BUDGET, "waiting {SHORT_TIMEOUT:?} for bytes used {used:?} of CPU: the peek spins");
    // A timed-out peek may leave the read readiness cleared (see peek_server_name): register
    // the socket afresh, as its doc says, before reading what is queued.
    let mut server = TcpStream::from_std(server.into_std().expect("deregister")).expect("register afresh");
    assert_unconsumed(&mut server, &hello[..hello.len() / 2]).await;
}

#[tokio::test]
async fn peek_refuses_http_quickly_and_consumes_nothing() {
    let request = b"GET / HTTP/1.1\r\nHost: a.example.net\r\n\r\n";
    let (mut client, mut server) = connected_pair().await;
    client.write_all(request).await.expect("write");
    let start = Instant::now();
    let r = peek_server_name(&server, LONG_TIMEOUT).await;
    assert!(matches!(r, Err(SniError::NotTls)), "{r:?}");
    assert!(start.elapsed() < QUICK, "took {:?}", start.elapsed());
    assert_unconsumed(&mut server, request).await;
}

#[tokio::test]
async fn peek_refuses_an_oversized_hello_quickly() {
    let (mut client, server) = connected_pair().await;
    client.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x00]).await.expect("write");
    let start = Instant::now();
    let r = peek_server_name(&server, LONG_TIMEOUT).await;
    assert!(matches!(r, Err(SniError::TooLarge)), "{r:?}");
    assert!(start.elapsed() < QUICK, "took {:?}", start.elapsed());
}

#[tokio::test]
async fn peek_reports_the_end_of_stream_mid_hello() {
    let hello = FIXTURES[1].bytes;
    let half = hello.len() / 2;
    // The FIN already queued when the peek starts.
    let (mut client, server) = connected_pair().await;
    client.write_all(&hello[..half]).await.expect("write");
    client.shutdown().await.expect("shutdown(SHUT_WR)");
    let r = peek_server_name(&server, LONG_TIMEOUT).await;
    assert!(matches!(r, Err(SniError::Eof { got }) if got == half), "{r:?}");
    // The FIN arriving while the peek waits for the rest.
    let (mut client, server) = connected_pair().await;
    let writer = tokio::spawn(async move {
        client.write_all(&hello[..half]).await.expect("write");
        tokio::time::sleep(SHORT_TIMEOUT).await;
        client.shutdown().await.expect("shutdown(SHUT_WR)");
        client
    });
    let r = peek_server_name(&server, LONG_TIMEOUT).await;
    assert!(matches!(r, Err(SniError::Eof { got }) if got == half), "{r:?}");
    let _client = writer.await.expect("writer task");
    // Nothing at all before the FIN.
    let (client, server) = connected_pair().await;
    drop(client);
    let r = peek_server_name(&server, LONG_TIMEOUT).await;
    assert!(matches!(r, Err(SniError::Eof { got: 0 })), "{r:?}");
}

// --- Properties ---

/// A DNS label as clients may send it: letters of either case, digits, `-` and `_`.
fn label() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?"
}

/// A valid host name in any case, maybe with a trailing dot, and its normalized form.
fn host_name() -> impl Strategy<Value = (String, String)> {
    (prop::collection::vec(label(), 0..4), "[a-zA-Z][a-zA-Z0-9-]{0,8}[a-zA-Z0-9]", any::<bool>()).prop_map(
        |(mut labels, last, dot)| {
            labels.push(last);
            let name = labels.join(".");
            let sent = if dot { format!("{name}.") } else { name.clone() };
            (sent, name.to_ascii_lowercase())
        },
    )
}

/// An extension that is not server_name (type 0), with arbitrary data.
fn other_extension() -> impl Strategy<Value = Vec<u8>> {
    (1u16.., prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(kind, data)| extension(kind, &data))
}

/// A start that looks like TLS to some depth and arbitrary bytes, with a place to cut them.
fn arbitrary_bytes() -> impl Strategy<Value = (Vec<u8>, usize)> {
    let starts = vec![vec![], vec![0x16], vec![0x16, 0x03, 0x01], vec![0x16, 0x03, 0x03, 0x00]];
    let bytes = (prop::sample::select(starts), prop::collection::vec(any::<u8>(), 0..600));
    ntlm_fuzz::with_cut(bytes.prop_map(|(start, bytes)| [start, bytes].concat()))
}

/// A captured hello re-framed into records of the sizes given (cycled), and the index of its
/// fixture.
fn reframed_fixture(sizes: impl Strategy<Value = Vec<usize>>) -> impl Strategy<Value = (Vec<u8>, usize)> {
    (0..FIXTURES.len(), sizes).prop_map(|(which, sizes)| (reframe(message_of(&FIXTURES[which]), &sizes), which))
}

/// A captured hello in records of random sizes, with bytes overwritten.
fn mutated_fixture() -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8);
    (reframed_fixture(prop::collection::vec(1usize..400, 1..6)), edits).prop_map(|((mut stream, _), edits)| {
        for (at, byte) in edits {
            let at = at.index(stream.len());
            stream[at] = byte;
        }
        stream
    })
}

/// A synthetic hello naming a valid host name among other extensions, in records of random
/// sizes, with the name it must parse to and a place to cut it.
#[derive(Debug, Clone)]
struct Synthetic {
    stream: Vec<u8>,
    want: String,
    cut: prop::sample::Index,
}

fn synthetic() -> impl Strategy<Value = Synthetic> {
    (
        host_name(),
        prop::collection::vec(other_extension(), 0..3),
        prop::collection::vec(other_extension(), 0..3),
        prop::collection::vec(1usize..=300, 1..8),
        any::<prop::sample::Index>(),
    )
        .prop_map(|((sent, want), before, after, sizes, cut)| {
            let extensions = [before, vec![sni_extension(&[sent.as_bytes()])], after].concat();
            Synthetic { stream: reframe(&client_hello(&extensions), &sizes), want, cut }
        })
}

/// Valid hellos, captured or synthetic, in records of random sizes, with a few random edits
/// (see [`ntlm_fuzz::havoc`]), and a place to cut them.
fn havoc_on_valid_hellos() -> impl Strategy<Value = (Vec<u8>, usize)> {
    let valid = prop_oneof![
        reframed_fixture(prop::collection::vec(1usize..=700, 1..12)).prop_map(|(stream, _)| stream),
        synthetic().prop_map(|s| s.stream),
    ];
    ntlm_fuzz::with_cut(ntlm_fuzz::havoc(valid))
}

/// Longer than every error message with its numbers; they quote no byte of the input, so
/// one that did would grow past it with the inputs here, of hundreds of bytes.
const LONGEST_MESSAGE: usize = 512;

/// No input panics the parser; a name it finds is a normalized host name; an error is one
/// short line; and its answer never changes once it is not Incomplete: more bytes cannot turn
/// an error or a name into something else (the peek relies on it). `buf` cut at `cut` against
/// the whole of it.
fn answers_are_final(buf: &[u8], cut: usize) -> Result<(), TestCaseError> {
    let (prefix, whole) = (parse_client_hello(&buf[..cut]), parse_client_hello(buf));
    for answer in [&prefix, &whole] {
        match answer {
            Ok(Hello::Complete { server_name: Some(name) }) => {
                prop_assert!(name.len() <= MAX_HOST_NAME, "{} characters", name.len());
                let normalized = normalize_host_name(name.as_bytes());
                prop_assert_eq!(normalized.as_ref(), Some(name), "not normalized");
            }
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.contains('\n') && text.len() <= LONGEST_MESSAGE, "{}", text);
            }
        }
    }
    match (prefix, whole) {
        (Ok(Hello::Incomplete), _) => {}
        (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
        (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
        (a, b) => prop_assert!(false, "{a:?} at {cut} bytes became {b:?}"),
    }
    Ok(())
}

/// A captured hello, re-framed, parses to the name it was captured with.
fn keeps_its_name(stream: &[u8], which: usize) -> Result<(), TestCaseError> {
    let fixture = &FIXTURES[which];
    let name = name_in(stream);
    prop_assert_eq!(name.as_deref(), fixture.server_name, "{}", fixture.file);
    Ok(())
}

/// A synthetic hello gives back its name, normalized; a prefix of it is Incomplete.
fn round_trips(case: Synthetic) -> Result<(), TestCaseError> {
    prop_assert_eq!(name_in(&case.stream), Some(case.want));
    prop_assert_eq!(
        parse_client_hello(&case.stream[..case.cut.index(case.stream.len())]).ok(),
        Some(Hello::Incomplete)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// See [`answers_are_final`].
    #[test]
    fn arbitrary_bytes_never_panic_and_answers_are_final((buf, cut) in arbitrary_bytes()) {
        answers_are_final(&buf, cut)?;
    }

    /// Real hellos with bytes overwritten never panic the parser.
    #[test]
    fn mutated_fixtures_never_panic(stream in mutated_fixture()) {
        answers_are_final(&stream, stream.len())?;
    }

    /// Valid hellos with random edits: see [`answers_are_final`].
    #[test]
    fn havoc_on_valid_hellos_never_panics_and_answers_are_final((buf, cut) in havoc_on_valid_hellos()) {
        answers_are_final(&buf, cut)?;
    }

    /// Real hellos re-framed into records of random sizes parse to the same name.
    #[test]
    fn fixtures_in_random_records_keep_their_names(
        (stream, which) in reframed_fixture(prop::collection::vec(1usize..=700, 1..12)),
    ) {
        keeps_its_name(&stream, which)?;
    }

    /// Any valid name, among other extensions, split at any record boundaries, comes back
    /// normalized; a random prefix of it is Incomplete.
    #[test]
    fn synthetic_hellos_round_trip(case in synthetic()) {
        round_trips(case)?;
    }

    /// The table agrees with a linear scan over its patterns.
    #[test]
    fn table_lookup_agrees_with_a_linear_scan(
        patterns in prop::collection::vec((any::<bool>(), prop::collection::vec(small_label(), 1..4)), 0..12),
        default in any::<bool>(),
        names in prop::collection::vec((prop::collection::vec(small_label(), 1..5), any::<bool>()), 1..12),
    ) {
        let mut table = SniTable::new();
        let mut reference: Vec<(bool, String, usize)> = Vec::new();
        for (value, (wildcard, labels)) in patterns.into_iter().enumerate() {
            let text = labels.join(".");
            let fresh = !reference.iter().any(|(w, s, _)| *w == wildcard && s.eq_ignore_ascii_case(&text));
            let written = if wildcard { format!("*.{text}") } else { text.clone() };
            prop_assert_eq!(table.insert(pattern(&written), value).is_ok(), fresh, "{}", written);
            if fresh {
                reference.push((wildcard, text.to_ascii_lowercase(), value));
            }
        }
        let default = default.then(|| {
            table.set_default(usize::MAX);
            usize::MAX
        });
        prop_assert_eq!(table.lookup(None).copied(), default);
        for (labels, dot) in names {
            let name = labels.join(".");
            let asked = if dot { format!("{name}.") } else { name.clone() };
            prop_assert_eq!(table.lookup(Some(&asked)).copied(), scan(&reference, default, &name), "{}", asked);
        }
    }
}

/// Labels from a small set (mixed case), so that names and patterns often overlap.
fn small_label() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "B", "c", "xn--d", "E-f", "a_1"]).prop_map(str::to_owned)
}

/// The reference lookup: exact names first, then the longest wildcard suffix with at least
/// one label before it, then the default.
fn scan(reference: &[(bool, String, usize)], default: Option<usize>, name: &str) -> Option<usize> {
    let name = name.to_ascii_lowercase();
    if let Some((_, _, value)) = reference.iter().find(|(wildcard, text, _)| !wildcard && *text == name) {
        return Some(*value);
    }
    reference
        .iter()
        .filter(|(wildcard, suffix, _)| {
            *wildcard && name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}"))
        })
        .max_by_key(|(_, suffix, _)| suffix.len())
        .map(|(_, _, value)| *value)
        .or(default)
}

/// The ClientHello properties above, on fresh cases for a time budget instead of [`CASES`]
/// cases (see the `ntlm_fuzz` crate).
#[test]
#[ignore = "fuzz target: `cargo xtask test` runs it for NTLM_SPLICE_FUZZ_SECS"]
fn fuzz_client_hello() {
    let stream = |(buf, _): &(Vec<u8>, usize)| buf.clone();
    ntlm_fuzz::Target::new("client_hello")
        .property("arbitrary bytes", arbitrary_bytes(), stream, |(buf, cut)| answers_are_final(&buf, cut))
        .property("mutated fixtures", mutated_fixture(), Clone::clone, |s| answers_are_final(&s, s.len()))
        .property("havoc on valid hellos", havoc_on_valid_hellos(), stream, |(buf, cut)| answers_are_final(&buf, cut))
        .property(
            "fixtures in random records",
            reframed_fixture(prop::collection::vec(1usize..=700, 1..12)),
            stream,
            |(stream, which)| keeps_its_name(&stream, which),
        )
        .property("synthetic hellos round trip", synthetic(), |s| s.stream.clone(), round_trips)
        .run();
}
