//! The PROXY protocol of `ntlm-splice` (issue 15), end to end through the real binary, its
//! config file and a real peer, HAProxy, for every engine this host supports
//! (`harness::engines()`), on loopback only:
//!
//! - out: a route with `proxy_protocol = "v1"` or `"v2"` in front of HAProxy `accept-proxy`,
//!   which logs the client it took and forwards to an echo backend. HAProxy sees the real
//!   client (bound to 127.0.0.7, or ::1 with its own port) and the address it connected to.
//!   With an SNI route, v2 carries the TLS server name (the authority TLV); there the TLS
//!   session ends at HAProxy, so the client's verified handshake and its echo show that the
//!   header went before the first client byte and that no byte was lost or added.
//! - in: HAProxy as the outer balancer (`send-proxy`, `send-proxy-v2`, from 127.0.0.9) in
//!   front of a route whose `accept_proxy_from` names it: `client=` is the client behind
//!   HAProxy, `peer=` is HAProxy, and bytes flow both ways.
//! - hostile: a header from an untrusted address; from the trusted one garbage, a truncated
//!   header then a close, oversized v1 and v2 headers, a header dribbled past
//!   `accept_proxy_timeout`, no header at all, a v2 LOCAL. Each is closed with
//!   `end=proxy_refused` and not one backend connection (counted at the backend), while good
//!   connections on the same listener, opened before and during them, keep working.
//! - chained: in and out on one route; the client address of the header in goes out in the
//!   header to the backend.
//!
//! Addresses: the client binds 127.0.0.7 (or ::1), HAProxy as the balancer binds 127.0.0.9,
//! an untrusted peer 127.0.0.8. All of 127/8 is loopback on Linux, so each is recognisable
//! in every log.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant},
};

use ntlm_splice_tests::{
    haproxy::{Frontend, Haproxy, Seen},
    harness::{
        self, AccessLine, Proxy, QUICK, TempDir, access_line, config_head, config_route, connect, connect_from,
        round_trip, stop_ok, wait_closed, within,
    },
    proxy_header,
    servers::Server,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::Command,
    task::JoinHandle,
};

/// The test client's own address: recognisable wherever a client address shows up.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
/// An address that is not in any `accept_proxy_from`.
const UNTRUSTED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 8));
/// The outer balancer's address (HAProxy's `source`, or a test playing the balancer): the
/// one `accept_proxy_from` trusts.
const BALANCER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
/// The IPv6 loopback address, for the IPv6 clients (there is only one).
const LOOPBACK6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// `accept_proxy_timeout` of the hostile scenario: short, so the suite stays quick, long
/// enough that the immediate refusals are told apart from the timed-out ones.
const ACCEPT_PROXY_TIMEOUT: Duration = Duration::from_secs(2);
/// Most time past `accept_proxy_timeout` the proxy may take to close a slow peer (timer
/// slack, a loaded CI machine).
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// How much longer than `accept_proxy_timeout` the dribbled header would take to arrive.
const DRIBBLE_STRETCH: u32 = 3;
/// The health-check interval of the probe scenario: short, so probes come quickly.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Probes HAProxy must have taken before the probe scenario is satisfied.
const PROBES: usize = 3;
/// Bound for one client subprocess (openssl, python) from start to exit.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The TLS server name of the SNI scenario.
const SERVER_NAME: &str = "a.example.net";

/// Bytes after the 8 that an access-log error may quote of a refused connection's start: they
/// must never reach the log.
const SECRET: &str = "SECRET-AFTER-THE-FIRST-8-BYTES";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Writes `config` to a fresh directory and starts the proxy with it; the directory lives as
/// long as the returned value.
async fn start(tag: &str, config: &str) -> (Proxy, TempDir) {
    let dir = TempDir::new(&format!("pp-{tag}"));
    let proxy = Proxy::start_config(&dir.write("ntlm-splice.toml", config)).await;
    (proxy, dir)
}

/// The `accept_proxy_from`/`accept_proxy_timeout` lines of a route trusting `trusted`.
fn accept_proxy(trusted: &[&str], timeout: Duration) -> String {
    let list: Vec<String> = trusted.iter().map(|t| format!("\"{t}\"")).collect();
    format!("accept_proxy_from = [{}]\naccept_proxy_timeout = \"{}ms\"\n", list.join(", "), timeout.as_millis())
}

/// Half-closes `s` and waits for the other end's EOF (the echo backend ends after ours).
async fn finish(mut s: TcpStream, what: &str) {
    within(QUICK, &format!("{what}: shutdown"), s.shutdown()).await.unwrap_or_else(|e| panic!("{what}: shutdown: {e}"));
    let mut rest = Vec::new();
    within(QUICK, &format!("{what}: waiting for EOF"), s.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|e| panic!("{what}: reading to EOF: {e}"));
    assert!(rest.is_empty(), "{what}: unexpected bytes before EOF: {rest:?}");
}

/// Asserts the access line of a connection that the proxy relayed: its client and peer, the
/// route, the backend and the engine, and that the client half-closed first.
fn assert_relayed(line: &AccessLine, client: SocketAddr, peer: IpAddr, backend: SocketAddr, engine: &str, what: &str) {
    assert_eq!(line.get("client"), Some(client.to_string().as_str()), "{what}: client= in {}", line.raw);
    let logged_peer: SocketAddr = line
        .get("peer")
        .unwrap_or_else(|| panic!("{what}: no peer= in {}", line.raw))
        .parse()
        .unwrap_or_else(|e| panic!("{what}: peer= is no address ({e}) in {}", line.raw));
    assert_eq!(logged_peer.ip(), peer, "{what}: peer= in {}", line.raw);
    assert_eq!(line.get("backend"), Some(backend.to_string().as_str()), "{what}: backend= in {}", line.raw);
    assert_eq!(line.get("engine"), Some(engine), "{what}: engine= in {}", line.raw);
    assert_eq!(line.get("end"), Some("client_fin"), "{what}: end= in {}", line.raw);
}

/// Asserts the access line of a connection refused by the PROXY-in checks.
fn assert_refused(line: &AccessLine, client: SocketAddr, what: &str) {
    let want = client.to_string();
    for (key, value) in [
        ("end", "proxy_refused"),
        ("client", want.as_str()),
        ("peer", want.as_str()),
        ("route", "-"),
        ("engine", "-"),
        ("backend", "-"),
    ] {
        assert_eq!(line.get(key), Some(value), "{what}: {key}= in {}", line.raw);
    }
    assert!(line.get("error").is_some_and(|e| !e.is_empty()), "{what}: no error= in {}", line.raw);
}

/// A self-signed certificate for [`SERVER_NAME`], made with the `openssl` CLI in `dir`:
/// `cert.pem` (what the client trusts) and `haproxy.pem` (certificate and key, for
/// HAProxy's `ssl crt`).
async fn self_signed(dir: &TempDir) {
    let subject = format!("/CN={SERVER_NAME}");
    let san = format!("subjectAltName=DNS:{SERVER_NAME}");
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &subject, "-addext", &san, "-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = within(CLIENT_TIMEOUT, "openssl req", cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run openssl (is it installed?): {e}"));
    assert!(out.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_else(|e| panic!("read {f}: {e}"));
    dir.write("haproxy.pem", &(read("cert.pem") + &read("key.pem")));
}

/// Runs `tests/python/tls_client.py` from `source` to `addr` with server name
/// [`SERVER_NAME`], trusting `dir/cert.pem`; returns its own address once it is done, after
/// checking that its handshake and echo succeeded.
async fn tls_round_trip(dir: &TempDir, source: IpAddr, addr: SocketAddr, what: &str) -> SocketAddr {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tls_client.py");
    let send = format!("{what}: through the proxy over TLS");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(["--bind", &source.to_string(), "--connect", &addr.to_string(), "--servername", SERVER_NAME])
        .arg("--cafile")
        .arg(dir.path().join("cert.pem"))
        .args(["--send", &send])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    let out = within(CLIENT_TIMEOUT, &format!("{what}: {}", script.display()), child.wait_with_output())
        .await
        .expect("waiting for the TLS client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: the TLS client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.lines().any(|l| l == format!("echo={send}")), "{what}: the TLS client's echo:\n{stdout}");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("local=")?.parse().ok())
        .unwrap_or_else(|| panic!("{what}: the TLS client printed no local=ADDR:\n{stdout}"))
}

/// Connects to the echo `backend` itself and makes one round trip: every connection the
/// proxy opened to it before has then been accepted (and counted), since the backend accepts
/// in order. Returns the backend's count without this one.
async fn backend_count(backend: &Server) -> u64 {
    let mut fence = connect(backend.addr()).await;
    round_trip(&mut fence, b"fence", "the fence connection to the backend").await;
    finish(fence, "the fence connection to the backend").await;
    backend.accepted() - 1
}

// ---------------------------------------------------------------------------------------
// PROXY out
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_reads_the_client_address_from_proxy_v1_and_v2() {
    if !Haproxy::available("haproxy_reads_the_client_address_from_proxy_v1_and_v2") {
        return;
    }
    let echo = Server::echo().await;
    let consumer = Frontend::bind("consumer", "127.0.0.1:0".parse().unwrap(), "accept-proxy", &echo.addr().to_string());
    let consumer_addr = consumer.addr();
    let mut haproxy = Haproxy::start("out", vec![consumer]).await;
    let mut relayed = 0;
    for engine in harness::engines() {
        for version in ["v1", "v2"] {
            let config = config_head(&engine)
                + &config_route(
                    "out",
                    &["127.0.0.1:0", "[::1]:0"],
                    &[consumer_addr],
                    &format!("proxy_protocol = \"{version}\"\n"),
                );
            let (proxy, _dir) = start(&format!("out-{engine}-{version}"), &config).await;
            for listener in proxy.addrs_of("out", 2, QUICK).await {
                let what = format!("{engine}, PROXY {version} out, client to {listener}");
                let source = if listener.is_ipv4() { CLIENT } else { LOOPBACK6 };
                let mut c = connect_from(source, listener).await;
                let client = c.local_addr().expect("client address");
                // Sent at once: the header must still go first.
                round_trip(&mut c, format!("{what}: first bytes").as_bytes(), &what).await;
                round_trip(&mut c, format!("{what}: more bytes").as_bytes(), &what).await;
                finish(c, &what).await;
                relayed += 1;
                let seen = haproxy.wait_seen("consumer", client, QUICK).await;
                assert_eq!(seen.destination, listener, "{what}: HAProxy's destination:\n{}", haproxy.logs());
                assert_eq!(seen.authority, None, "{what}: no server name, no authority");
                let line = access_line(&proxy, client).await;
                assert_relayed(&line, client, client.ip(), consumer_addr, &engine, &what);
            }
            stop_ok(proxy).await;
        }
    }
    // Every connection HAProxy relayed came from the proxy with a header it accepted.
    assert_eq!(echo.accepted(), relayed, "HAProxy's connections to the echo backend:\n{}", haproxy.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_out_carries_the_tls_server_name() {
    if !Haproxy::available("proxy_v2_out_carries_the_tls_server_name") {
        return;
    }
    let certs = TempDir::new("pp-tls");
    self_signed(&certs).await;
    let echo = Server::echo().await;
    // HAProxy reads the header, then ends the client's TLS session itself (so the client's
    // handshake checks every byte the proxy relayed) and forwards the plain text.
    let pem = certs.path().join("haproxy.pem");
    let consumer = Frontend::bind(
        "tls",
        "127.0.0.1:0".parse().unwrap(),
        &format!("accept-proxy ssl crt {}", pem.display()),
        &echo.addr().to_string(),
    );
    let consumer_addr = consumer.addr();
    let mut haproxy = Haproxy::start("tls", vec![consumer]).await;
    for engine in harness::engines() {
        let config = config_head(&engine)
            + &config_route(
                "named",
                &["127.0.0.1:0"],
                &[consumer_addr],
                &format!("sni = [\"{SERVER_NAME}\"]\nproxy_protocol = \"v2\"\n"),
            );
        let (proxy, _dir) = start(&format!("tls-{engine}"), &config).await;
        let what = format!("{engine}, PROXY v2 out on an SNI route");
        let client = tls_round_trip(&certs, CLIENT, proxy.addr(), &what).await;
        assert_eq!(client.ip(), CLIENT, "{what}: the TLS client's address");
        let seen = haproxy.wait_seen("tls", client, QUICK).await;
        assert_eq!(seen.authority.as_deref(), Some(SERVER_NAME), "{what}: the authority TLV:\n{}", haproxy.logs());
        assert_eq!(seen.destination, proxy.addr(), "{what}: HAProxy's destination");
        let line = access_line(&proxy, client).await;
        assert_eq!(line.get("route"), Some("named"), "{what}: route= in {}", line.raw);
        assert_eq!(line.get("peer"), Some(client.to_string().as_str()), "{what}: peer= in {}", line.raw);
        assert_eq!(line.get("backend"), Some(consumer_addr.to_string().as_str()), "{what}: backend= in {}", line.raw);
        stop_ok(proxy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_of_a_proxy_route_send_a_local_header() {
    if !Haproxy::available("health_probes_of_a_proxy_route_send_a_local_header") {
        return;
    }
    let echo = Server::echo().await;
    let consumer = Frontend::bind("consumer", "127.0.0.1:0".parse().unwrap(), "accept-proxy", &echo.addr().to_string());
    let consumer_addr = consumer.addr();
    let mut haproxy = Haproxy::start("probes", vec![consumer]).await;
    for engine in harness::engines() {
        for version in ["v1", "v2"] {
            let what = format!("{engine}, PROXY {version} out, health probes");
            let config = config_head(&engine)
                + &config_route(
                    "probed",
                    &["127.0.0.1:0"],
                    &[consumer_addr],
                    &format!(
                        "proxy_protocol = \"{version}\"\n[route.health]\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\n",
                        PROBE_INTERVAL.as_millis(),
                        PROBE_INTERVAL.as_millis()
                    ),
                );
            let before = haproxy.seen().len();
            let (proxy, _dir) = start(&format!("probes-{engine}-{version}"), &config).await;
            // HAProxy takes a probe's connection only after a complete header, and then, for
            // a LOCAL (v2) or UNKNOWN (v1) one, as coming from the proxy's own address.
            let probe = |s: &Seen| s.frontend == "consumer" && s.client.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST);
            haproxy
                .wait_seen_where(QUICK, &format!("{PROBES} probes of {what}"), |seen| {
                    seen[before..].iter().filter(|s| probe(s)).count() >= PROBES
                })
                .await;
            // The backend is up: a client goes through.
            let mut c = connect_from(CLIENT, proxy.addr()).await;
            let client = c.local_addr().expect("client address");
            round_trip(&mut c, format!("{what}: a client").as_bytes(), &what).await;
            finish(c, &what).await;
            haproxy.wait_seen("consumer", client, QUICK).await;
            stop_ok(proxy).await;
        }
    }
    // A probe without a header, or with a broken one, is an error line in HAProxy's log.
    let refused: Vec<String> =
        haproxy.logs().lines().filter(|l| l.contains("PROXY protocol header")).map(str::to_string).collect();
    assert!(refused.is_empty(), "HAProxy refused connections of the proxy:\n{}", refused.join("\n"));
}

// ---------------------------------------------------------------------------------------
// PROXY in
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_in_from_haproxy_becomes_the_client() {
    if !Haproxy::available("proxy_in_from_haproxy_becomes_the_client") {
        return;
    }
    for engine in harness::engines() {
        let echo = Server::echo().await;
        let config = config_head(&engine)
            + &config_route("in", &["127.0.0.1:0"], &[echo.addr()], &accept_proxy(&[&BALANCER.to_string()], QUICK));
        let (proxy, _dir) = start(&format!("in-{engine}"), &config).await;
        let splice = proxy.addr();
        // (frontend, its address, the server options: the header HAProxy sends)
        let outer = [
            ("outer_v1", "127.0.0.1:0", "send-proxy"),
            ("outer_v2", "127.0.0.1:0", "send-proxy-v2"),
            // A client on IPv6 behind a balancer that reaches the proxy over IPv4.
            ("outer_v2_ipv6", "[::1]:0", "send-proxy-v2"),
        ];
        let frontends: Vec<Frontend> = outer
            .iter()
            .map(|(name, addr, send)| {
                Frontend::bind(name, addr.parse().unwrap(), "", &format!("{splice} {send} source {BALANCER}"))
            })
            .collect();
        let addrs: Vec<SocketAddr> = frontends.iter().map(Frontend::addr).collect();
        let haproxy = Haproxy::start(&format!("in-{engine}"), frontends).await;
        for ((name, _, send), addr) in outer.iter().zip(addrs) {
            let what = format!("{engine}, client via HAProxy {name} ({send})");
            let source = if addr.is_ipv4() { CLIENT } else { LOOPBACK6 };
            let mut c = connect_from(source, addr).await;
            let client = c.local_addr().expect("client address");
            round_trip(&mut c, format!("{what}: up and back").as_bytes(), &what).await;
            finish(c, &what).await;
            let line = access_line(&proxy, client).await;
            assert_relayed(&line, client, BALANCER, echo.addr(), &engine, &what);
            assert_eq!(line.get("route"), Some("in"), "{what}: route= in {}", line.raw);
        }
        assert_eq!(backend_count(&echo).await, outer.len() as u64, "{engine}: backend connections");
        drop(haproxy);
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// Hostile and broken PROXY-in peers
// ---------------------------------------------------------------------------------------

/// A connection that must be refused: what it is, its client address, and a task that
/// waits (bounded by `limit`) until the proxy closes it without a byte and returns how long
/// after the connect that was.
struct Bad {
    what: String,
    client: SocketAddr,
    closed: JoinHandle<Duration>,
}

impl Bad {
    /// Watches `socket`, connected at `begun`, for its close.
    fn watch(what: &str, mut socket: TcpStream, begun: Instant, limit: Duration) -> Bad {
        let client = socket.local_addr().expect("client address");
        let label = what.to_string();
        let closed = tokio::spawn(async move {
            wait_closed(&mut socket, limit, &label).await;
            begun.elapsed()
        });
        Bad { what: what.to_string(), client, closed }
    }

    /// Connects from `source` to `addr` and sends `bytes` at once (nothing when empty);
    /// with `then_fin`, half-closes after them.
    async fn send(what: &str, source: IpAddr, addr: SocketAddr, bytes: &[u8], then_fin: bool) -> Bad {
        let begun = Instant::now();
        let mut socket = connect_from(source, addr).await;
        if !bytes.is_empty() {
            within(QUICK, &format!("{what}: write"), socket.write_all(bytes))
                .await
                .unwrap_or_else(|e| panic!("{what}: write: {e}"));
        }
        if then_fin {
            within(QUICK, &format!("{what}: shutdown"), socket.shutdown())
                .await
                .unwrap_or_else(|e| panic!("{what}: shutdown: {e}"));
        }
        Bad::watch(what, socket, begun, ACCEPT_PROXY_TIMEOUT + CLOSE_SLACK + QUICK)
    }

    /// How long after its connect the proxy closed it.
    async fn closed_after(&mut self) -> Duration {
        (&mut self.closed).await.unwrap_or_else(|e| panic!("{}: {e}", self.what))
    }
}

/// Connects from [`BALANCER`] and writes `header` one byte at a time, spread over
/// [`DRIBBLE_STRETCH`] times `timeout`, in a task of its own.
async fn dribble(addr: SocketAddr, header: Vec<u8>, timeout: Duration) -> Bad {
    let begun = Instant::now();
    let socket = connect_from(BALANCER, addr).await;
    socket.set_nodelay(true).expect("TCP_NODELAY");
    let pause = timeout * DRIBBLE_STRETCH / u32::try_from(header.len()).expect("a short header");
    let std = socket.into_std().expect("into std");
    let mut writer = TcpStream::from_std(std.try_clone().expect("dup the dribbling socket")).expect("to tokio");
    let socket = TcpStream::from_std(std).expect("back to tokio");
    tokio::spawn(async move {
        for b in header {
            // The proxy closes the connection halfway: the writes then fail, which ends this.
            if writer.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    });
    Bad::watch("a trusted peer dribbling its header", socket, begun, ACCEPT_PROXY_TIMEOUT + CLOSE_SLACK + QUICK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_broken_headers_are_refused_without_a_backend_connection() {
    for engine in harness::engines() {
        let echo = Server::echo().await;
        let config = config_head(&engine)
            + &config_route(
                "guarded",
                &["127.0.0.1:0"],
                &[echo.addr()],
                &accept_proxy(&[&BALANCER.to_string()], ACCEPT_PROXY_TIMEOUT),
            );
        let (proxy, _dir) = start(&format!("hostile-{engine}"), &config).await;
        let addr = proxy.addr();
        let named = |n: u16| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), n);
        let mut good = Vec::new();

        // A good connection before the bad ones, kept open through them.
        let mut first = connect_from(BALANCER, addr).await;
        let first_client = named(1001);
        first.write_all(&proxy_header::v2(first_client, addr)).await.expect("header");
        round_trip(&mut first, b"the first good connection", &format!("{engine}: first good")).await;
        good.push((first_client, BALANCER));

        // The slow ones first: they must not hold up anything that follows.
        let silent_begun = Instant::now();
        let mut silent = Bad::send("a trusted peer sending nothing", BALANCER, addr, b"", false).await;
        let header = proxy_header::v1(named(1002), addr);
        let mut dribbled = dribble(addr, header, ACCEPT_PROXY_TIMEOUT).await;

        // The quick ones, each sent at once.
        let truncated_v1 = proxy_header::v1(named(1003), addr);
        let truncated_v2 = proxy_header::v2(named(1004), addr);
        let oversized_v1 = [b"PROXY TCP4 ".as_slice(), &[b'7'; proxy_header::V1_MAX_LEN]].concat();
        let garbage = format!("GET / HTTP/1.1\r\nX-{SECRET}: 1\r\n\r\n");
        let mut quick = vec![
            Bad::send(
                "an untrusted peer sending a v1 header",
                UNTRUSTED,
                addr,
                &proxy_header::v1(named(1005), addr),
                false,
            )
            .await,
            Bad::send(
                "an untrusted peer sending a v2 header",
                UNTRUSTED,
                addr,
                &proxy_header::v2(named(1006), addr),
                false,
            )
            .await,
            Bad::send("a trusted peer sending garbage", BALANCER, addr, garbage.as_bytes(), false).await,
            Bad::send(
                "a trusted peer sending half a v1 header, then FIN",
                BALANCER,
                addr,
                &truncated_v1[..truncated_v1.len() / 2],
                true,
            )
            .await,
            Bad::send(
                "a trusted peer sending half a v2 header, then FIN",
                BALANCER,
                addr,
                &truncated_v2[..truncated_v2.len() / 2],
                true,
            )
            .await,
            Bad::send(
                "a trusted peer sending a v2 header declaring the protocol's maximum length",
                BALANCER,
                addr,
                &proxy_header::v2_fixed_part(u16::MAX),
                false,
            )
            .await,
            Bad::send("a trusted peer sending a v1 header without CRLF", BALANCER, addr, &oversized_v1, false).await,
            Bad::send(
                "a trusted peer sending a v2 LOCAL (health check)",
                BALANCER,
                addr,
                &proxy_header::v2_local(),
                false,
            )
            .await,
        ];

        // While the slow ones wait for their timeout: new good connections are served, and
        // the first one still moves bytes.
        let mut during = connect_from(BALANCER, addr).await;
        let during_client = named(1007);
        during.write_all(&proxy_header::v1(during_client, addr)).await.expect("header");
        round_trip(&mut during, b"a good connection among bad ones", &format!("{engine}: during")).await;
        good.push((during_client, BALANCER));
        let mut unknown = connect_from(BALANCER, addr).await;
        let unknown_client = unknown.local_addr().expect("client address");
        unknown.write_all(b"PROXY UNKNOWN\r\n").await.expect("header");
        round_trip(&mut unknown, b"v1 UNKNOWN: served as the socket's peer", &format!("{engine}: UNKNOWN")).await;
        good.push((unknown_client, BALANCER));
        let mut plain = connect_from(UNTRUSTED, addr).await;
        let plain_client = plain.local_addr().expect("client address");
        round_trip(&mut plain, b"an untrusted peer without a header is served", &format!("{engine}: plain")).await;
        good.push((plain_client, UNTRUSTED));
        round_trip(&mut first, b"the first good connection, still", &format!("{engine}: first good")).await;
        let served = silent_begun.elapsed();
        assert!(
            served < ACCEPT_PROXY_TIMEOUT,
            "{engine}: the good connections among the bad ones were served only {served:?} after the silent peer \
             came, past accept_proxy_timeout: a pending header holds up other connections (or this machine is far \
             too slow for this test)"
        );

        for bad in &mut quick {
            let after = bad.closed_after().await;
            // Refused for what it sent, not by the timer.
            assert!(after < ACCEPT_PROXY_TIMEOUT, "{engine}: {} was closed only after {after:?}", bad.what);
        }
        for bad in [&mut silent, &mut dribbled] {
            let after = bad.closed_after().await;
            assert!(
                after >= ACCEPT_PROXY_TIMEOUT && after <= ACCEPT_PROXY_TIMEOUT + CLOSE_SLACK,
                "{engine}: {} was closed after {after:?}, not at accept_proxy_timeout {ACCEPT_PROXY_TIMEOUT:?}",
                bad.what
            );
        }

        for (s, what) in [(first, "first"), (during, "during"), (unknown, "UNKNOWN"), (plain, "plain")] {
            finish(s, &format!("{engine}: {what}")).await;
        }
        for (client, peer) in &good {
            let line = access_line(&proxy, *client).await;
            assert_relayed(&line, *client, *peer, echo.addr(), &engine, &format!("{engine}: good {client}"));
        }
        for bad in quick.iter().chain([&silent, &dribbled]) {
            assert_refused(&access_line(&proxy, bad.client).await, bad.client, &format!("{engine}: {}", bad.what));
        }
        assert_eq!(
            backend_count(&echo).await,
            good.len() as u64,
            "{engine}: backend connections: one per good connection, none for a refused one"
        );
        assert!(!proxy.logs().contains(SECRET), "{engine}: the log quotes a refused client's bytes:\n{}", proxy.logs());
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// PROXY in and out on one route
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_in_then_out_carries_the_client_to_the_backend() {
    if !Haproxy::available("proxy_in_then_out_carries_the_client_to_the_backend") {
        return;
    }
    for engine in harness::engines() {
        let echo = Server::echo().await;
        // The inner HAProxy frontend reads the proxy's header; the outer ones play the
        // balancer in front of the proxy.
        let inner = Frontend::bind("inner", "127.0.0.1:0".parse().unwrap(), "accept-proxy", &echo.addr().to_string());
        let inner_addr = inner.addr();
        let trusted = format!("{BALANCER}/32");
        let config = config_head(&engine)
            + &config_route(
                "chain_v1",
                &["127.0.0.1:0"],
                &[inner_addr],
                &(accept_proxy(&[&trusted], QUICK) + "proxy_protocol = \"v1\"\n"),
            )
            + &config_route(
                "chain_v2",
                &["127.0.0.2:0"],
                &[inner_addr],
                &(accept_proxy(&[&trusted], QUICK) + "proxy_protocol = \"v2\"\n"),
            );
        let (proxy, _dir) = start(&format!("chain-{engine}"), &config).await;
        let (to_v1, to_v2) = (proxy.addr_of("chain_v1", QUICK).await, proxy.addr_of("chain_v2", QUICK).await);
        // (frontend, its address, the proxy's listener it forwards to, the header it sends)
        let outer = [
            ("outer_v2_to_v1", "127.0.0.1:0", to_v1, "send-proxy-v2"),
            ("outer_v1_to_v2", "127.0.0.1:0", to_v2, "send-proxy"),
            ("outer_v2_ipv6_to_v2", "[::1]:0", to_v2, "send-proxy-v2"),
        ];
        let mut frontends = vec![inner];
        frontends.extend(outer.iter().map(|(name, addr, to, send)| {
            Frontend::bind(name, addr.parse().unwrap(), "", &format!("{to} {send} source {BALANCER}"))
        }));
        let addrs: Vec<SocketAddr> = frontends[1..].iter().map(Frontend::addr).collect();
        let mut haproxy = Haproxy::start(&format!("chain-{engine}"), frontends).await;
        for ((name, _, _, send), addr) in outer.iter().zip(addrs) {
            let what = format!("{engine}, client via HAProxy {name} ({send}), the proxy, HAProxy inner");
            let source = if addr.is_ipv4() { CLIENT } else { LOOPBACK6 };
            let mut c = connect_from(source, addr).await;
            let client = c.local_addr().expect("client address");
            round_trip(&mut c, format!("{what}: up and back").as_bytes(), &what).await;
            finish(c, &what).await;
            let line = access_line(&proxy, client).await;
            assert_relayed(&line, client, BALANCER, inner_addr, &engine, &what);
            // The inner HAProxy saw the client itself, and the address it connected to (the
            // header in's destination), not the proxy's listener.
            let seen = haproxy.wait_seen("inner", client, QUICK).await;
            assert_eq!(seen.destination, addr, "{what}: the destination HAProxy inner took:\n{}", haproxy.logs());
        }
        assert_eq!(backend_count(&echo).await, outer.len() as u64, "{engine}: backend connections");
        drop(haproxy);
        stop_ok(proxy).await;
    }
}
