//! SNI routing of `ntlm-splice`, end to end through the real binary with real TLS, for every
//! engine this host supports (`harness::engines()`): routes sharing one listen address are
//! chosen by the server name of the client's ClientHello, which the proxy only peeks at.
//!
//! The clients are curl (`--resolve NAME:PORT:127.0.0.1 --cacert CA`) and `openssl s_client`;
//! the backends are `tests/python/tls_backend.py` (Python's ssl module), one per name, each
//! with its own certificate from a small CA made with the `openssl` CLI in a fresh temporary
//! directory, and answering with its own name and the server name it saw. A client that
//! completes its handshake and verifies the certificate of the backend its name belongs to
//! shows both that the right route was chosen and that the proxy consumed no byte: a TLS
//! handshake fails on any byte lost, added or changed (the transcript is hashed into
//! Finished).
//!
//! Covered: exact names, a `*.` wildcard, the default route for unknown names and for
//! clients without SNI; no default route (closed, `end=no_route`, no backend connection); a
//! ClientHello dribbled one byte per TCP segment, and one cut into many TLS records; a silent
//! or stalled client closed after `sni_timeout` without a backend connection; a plain-text
//! client on the default route; and a reload that moves a name to another route.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use ntlm_splice_tests::{
    harness::{self, AccessLine, Proxy, TempDir, stop_ok, wait_closed, within},
    servers::Server,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
    sync::mpsc,
    task::JoinHandle,
};

/// Bound for anything that should be quick: a connect, a log line, a close, a backend start.
const QUICK: Duration = Duration::from_secs(10);
/// Bound for one client subprocess (curl, openssl) from start to exit.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// curl's own `--max-time`, below [`CLIENT_TIMEOUT`] so curl reports what it was doing.
const CURL_MAX_TIME_SECS: &str = "20";
/// `sni_timeout` of the scenarios that test it: short, so the suite stays quick.
const SNI_TIMEOUT: Duration = Duration::from_millis(500);
/// The same, as the config file writes it.
const SNI_TIMEOUT_TEXT: &str = "500ms";
/// Most time past `sni_timeout` the proxy may take to close a silent client (timer slack,
/// a loaded CI machine).
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// Pause after each one-byte write of the dribbling relay: long enough that every byte
/// leaves as its own TCP segment and the proxy peeks many times.
const DRIBBLE_PAUSE: Duration = Duration::from_millis(1);
/// Handshake bytes per TLS record when the relay cuts the ClientHello into records.
const RECORD_PIECE: usize = 37;
/// TLS record header: content type, version (2), length (2).
const TLS_RECORD_HEADER: usize = 5;
/// TLS content type of handshake records.
const TLS_HANDSHAKE: u8 = 0x16;

/// The names of the test PKI's leaf certificates: (file stem, subject CN, subjectAltName).
const LEAVES: &[(&str, &str, &str)] = &[
    ("a", "a.example.net", "DNS:a.example.net"),
    ("b", "b.example.net", "DNS:b.example.net"),
    ("corp", "*.corp.example.net", "DNS:*.corp.example.net"),
    // The default backend also answers for the unknown name the tests use, and for
    // 127.0.0.1 (curl sends no SNI for an IP address).
    ("default", "default.example.net", "DNS:default.example.net,DNS:unknown.example.org,IP:127.0.0.1"),
];

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A small CA and the leaf certificates of [`LEAVES`], made with the `openssl` CLI.
struct Pki {
    dir: TempDir,
}

impl Pki {
    async fn new(tag: &str) -> Pki {
        let dir = TempDir::new(&format!("sni-{tag}"));
        let pki = Pki { dir };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        pki.openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ntlm-splice SNI test CA"],
            ]
            .concat(),
        )
        .await;
        for (stem, cn, san) in LEAVES {
            let (key, csr, pem) = (format!("{stem}.key"), format!("{stem}.csr"), format!("{stem}.pem"));
            let subj = format!("/CN={cn}");
            let ext = format!("subjectAltName={san}");
            pki.openssl(
                &[&["req", "-new"][..], &ec, &["-keyout", &key, "-subj", &subj, "-addext", &ext, "-out", &csr]]
                    .concat(),
            )
            .await;
            pki.openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-copy_extensions",
                "copy",
                "-out",
                &pem,
            ])
            .await;
        }
        pki
    }

    async fn openssl(&self, args: &[&str]) {
        let mut cmd = Command::new("openssl");
        cmd.args(args).current_dir(self.dir.path()).stdin(Stdio::null()).kill_on_drop(true);
        let out = within(CLIENT_TIMEOUT, &format!("openssl {args:?}"), cmd.output())
            .await
            .unwrap_or_else(|e| panic!("cannot run openssl (is it installed?): {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// Writes a file into the PKI's directory (the config file lives there too).
    fn write(&self, file: &str, text: &str) -> PathBuf {
        let p = self.path(file);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

/// A running `tests/python/tls_backend.py`; dropping it kills it (by its own PID).
struct TlsBackend {
    _child: Child,
    /// `/count` questions asked so far (each is an accepted connection too).
    asked: std::sync::atomic::AtomicU64,
    addr: SocketAddr,
    /// A name its certificate is valid for (to ask it for its accept count directly).
    host: String,
}

impl TlsBackend {
    /// Starts a backend with the certificate `stem` of `pki`, answering `backend=NAME`.
    async fn start(pki: &Pki, stem: &str, name: &str) -> TlsBackend {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tls_backend.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .args(["--name", name])
            .arg("--cert")
            .arg(pki.path(&format!("{stem}.pem")))
            .arg("--key")
            .arg(pki.path(&format!("{stem}.key")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = within(QUICK, &format!("{} {name} printing its port", script.display()), lines.next_line())
            .await
            .expect("reading the backend's stdout")
            .unwrap_or_else(|| panic!("{} {name} exited before printing its port", script.display()));
        let port: u16 = line
            .strip_prefix("port=")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{} printed {line:?}, not port=N", script.display()));
        let host = LEAVES.iter().find(|l| l.0 == stem).expect("a known leaf").1.replace('*', "probe");
        TlsBackend { _child: child, asked: Default::default(), addr: SocketAddr::from(([127, 0, 0, 1], port)), host }
    }

    /// TCP connections it accepted so far, not counting those of these questions.
    async fn accepted(&self, pki: &Pki) -> u64 {
        let asked = self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let r = curl(pki, &self.host, self.addr.port(), "/count").await;
        assert!(r.ok, "asking backend {} for its count: {}", self.addr, r.stderr);
        let n: u64 = r
            .body
            .trim()
            .strip_prefix("accepted=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("backend {} answered {:?} to /count", self.addr, r.body));
        n.checked_sub(asked)
            .unwrap_or_else(|| panic!("backend {} counted {n} connections, fewer than {asked} questions", self.addr))
    }
}

/// What one curl run got.
#[derive(Debug)]
struct Fetched {
    /// curl exited 0.
    ok: bool,
    /// The response body.
    body: String,
    /// The subject of the server certificate curl verified (from `-v`).
    subject: Option<String>,
    /// curl's stderr (`-v`).
    stderr: String,
}

/// `curl -v https://HOST:PORT/PATH` with HOST resolved to 127.0.0.1 (unless it is the IP
/// itself, for which curl sends no SNI), verifying against the test CA.
async fn curl(pki: &Pki, host: &str, port: u16, path: &str) -> Fetched {
    let url = format!("https://{host}:{port}{path}");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-v", "--noproxy", "*", "--max-time", CURL_MAX_TIME_SECS, "--http1.1"])
        .arg("--cacert")
        .arg(pki.ca());
    if host.parse::<std::net::IpAddr>().is_err() {
        cmd.args(["--resolve", &format!("{host}:{port}:127.0.0.1")]);
    }
    cmd.arg(&url).stdin(Stdio::null()).kill_on_drop(true);
    let out = within(CLIENT_TIMEOUT, &format!("curl {url}"), cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run curl (is it installed?): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let subject =
        stderr.lines().find_map(|l| l.trim_start_matches('*').trim().strip_prefix("subject: ").map(str::to_string));
    Fetched { ok: out.status.success(), body: String::from_utf8_lossy(&out.stdout).into_owned(), subject, stderr }
}

/// `curl` that must succeed, with the certificate of `cn`, from backend `name`, which saw
/// the server name `sni` (`-` for none).
async fn fetch_ok(pki: &Pki, host: &str, port: u16, cn: &str, name: &str, sni: &str, what: &str) {
    let r = curl(pki, host, port, "/").await;
    assert!(r.ok, "{what}: curl https://{host}:{port}/ failed:\n{}", r.stderr);
    assert_eq!(
        r.subject.as_deref(),
        Some(format!("CN={cn}").as_str()),
        "{what}: certificate curl verified:\n{}",
        r.stderr
    );
    assert_eq!(r.body, format!("backend={name} sni={sni}\n"), "{what}: answer");
}

/// `openssl s_client -noservername` to `addr`, verifying against the test CA, sending one
/// HTTP request; returns (exit success, stdout).
async fn s_client_no_sni(pki: &Pki, addr: SocketAddr) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-noservername",
        "-verify_return_error",
        "-ign_eof",
        "-CAfile",
    ])
    .arg(pki.ca())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run openssl s_client: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    // s_client may have gone already (a refused handshake): a failed write is its answer.
    if let Err(e) = stdin.write_all(b"GET / HTTP/1.0\r\n\r\n").await {
        eprintln!("writing to openssl s_client: {e}");
    }
    drop(stdin);
    let out = within(CLIENT_TIMEOUT, &format!("openssl s_client -noservername {addr}"), child.wait_with_output())
        .await
        .expect("waiting for openssl s_client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// The config file of one scenario: `[defaults]` with the engine (and `extra` lines), then
/// the routes, each `(name, backends, sni)` on listen address 127.0.0.1:0.
fn config(engine: &str, extra: &str, routes: &[(&str, &[SocketAddr], &[&str])]) -> String {
    let mut t = format!("[defaults]\nengine = \"{engine}\"\n{extra}\n");
    for (name, backends, sni) in routes {
        let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        t += &format!(
            "\n[[route]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:0\"]\nbackends = [{}]\n",
            backends.join(", ")
        );
        if !sni.is_empty() {
            let sni: Vec<String> = sni.iter().map(|s| format!("\"{s}\"")).collect();
            t += &format!("sni = [{}]\n", sni.join(", "));
        }
    }
    t
}

/// Waits for the `n`-th access line (1-based) and returns it.
async fn nth_access(proxy: &Proxy, n: usize) -> AccessLine {
    proxy.wait_access_lines(n, QUICK).await.swap_remove(n - 1)
}

/// Asserts the route and backend of an access line.
fn assert_routed(line: &AccessLine, route: &str, backend: SocketAddr, what: &str) {
    assert_eq!(line.get("route"), Some(route), "{what}: route in {}", line.raw);
    assert_eq!(line.get("backend"), Some(backend.to_string().as_str()), "{what}: backend in {}", line.raw);
}

/// Asserts an access line of a client closed because no route took it.
fn assert_no_route(line: &AccessLine, what: &str) {
    assert_eq!(line.get("end"), Some("no_route"), "{what}: end in {}", line.raw);
    assert_eq!(line.get("backend"), Some("-"), "{what}: backend in {}", line.raw);
    assert!(line.get("error").is_some_and(|e| !e.is_empty()), "{what}: no error= in {}", line.raw);
}

/// A plain-text backend: reads a request head (to its blank line), reports it on the
/// channel, answers `plain backend` and closes.
async fn plain_backend() -> (Server, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = Server::start(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if tx.send(head).is_err() {
                return;
            }
            if s.write_all(b"HTTP/1.0 200 OK\r\n\r\nplain backend\n").await.is_ok() {
                let _ = s.shutdown().await;
            }
        }
    })
    .await;
    (server, rx)
}

// ---------------------------------------------------------------------------------------
// The dribbling relay
// ---------------------------------------------------------------------------------------

/// Bytes one relayed connection moved: (client -> proxy, proxy -> client).
type Moved = (u64, u64);

/// `record` (one whole TLS record, header included) cut into records of at most `piece`
/// bytes of its fragment each, with its content type and version.
fn cut_record(record: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in record[TLS_RECORD_HEADER..].chunks(piece) {
        out.extend_from_slice(&record[..3]);
        out.extend_from_slice(&u16::try_from(chunk.len()).expect("a piece fits a record").to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// A relay for one client connection between a TLS client and the proxy at `target`:
/// client -> proxy goes one byte per write (TCP_NODELAY, [`DRIBBLE_PAUSE`] after each), the
/// other way as fast as it comes. With `record_piece`, the client's first TLS record (its
/// ClientHello) is first cut into records of at most that many bytes, which TLS allows and
/// the backend must reassemble. Returns its address and the task that ends with the bytes
/// it wrote each way.
async fn dribble_relay(target: SocketAddr, record_piece: Option<usize>) -> (SocketAddr, JoinHandle<Moved>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (client, _) = within(CLIENT_TIMEOUT, "the relay's client", l.accept()).await.expect("relay accept");
        let proxy = TcpStream::connect(target).await.expect("relay connect to the proxy");
        proxy.set_nodelay(true).expect("TCP_NODELAY");
        let (mut cr, mut cw) = client.into_split();
        let (mut pr, mut pw) = proxy.into_split();
        let down = tokio::spawn(async move {
            let n = tokio::io::copy(&mut pr, &mut cw).await.unwrap_or(0);
            let _ = cw.shutdown().await;
            n
        });
        let mut up = 0u64;
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        let mut reframe = record_piece;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            if let Some(piece) = reframe {
                // Wait for the whole first record, then send it cut into smaller ones.
                if pending.len() < TLS_RECORD_HEADER {
                    continue;
                }
                assert_eq!(pending[0], TLS_HANDSHAKE, "the client's first record is not a handshake record");
                let len = usize::from(u16::from_be_bytes([pending[3], pending[4]]));
                if pending.len() < TLS_RECORD_HEADER + len {
                    continue;
                }
                let rest = pending.split_off(TLS_RECORD_HEADER + len);
                pending = cut_record(&pending, piece);
                pending.extend_from_slice(&rest);
                reframe = None;
            }
            for b in pending.drain(..) {
                if pw.write_all(&[b]).await.is_err() {
                    break;
                }
                up += 1;
                tokio::time::sleep(DRIBBLE_PAUSE).await;
            }
        }
        let _ = pw.shutdown().await;
        let down = down.await.expect("relay down task");
        (up, down)
    });
    (addr, task)
}

// ---------------------------------------------------------------------------------------
// 1. Names, wildcard, default, no SNI
// ---------------------------------------------------------------------------------------

/// Two TLS backends with their own names, a wildcard route and a default route, all on one
/// listen address: each name reaches its backend (curl verifies that backend's certificate,
/// and the backend saw the same server name), an unknown name and a client without SNI
/// reach the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_pick_their_routes_and_the_rest_go_to_the_default() {
    let pki = Pki::new("names").await;
    let a = TlsBackend::start(&pki, "a", "a").await;
    let b = TlsBackend::start(&pki, "b", "b").await;
    let corp = TlsBackend::start(&pki, "corp", "corp").await;
    let dflt = TlsBackend::start(&pki, "default", "default").await;
    for engine in harness::engines() {
        let file = pki.write(
            &format!("names-{engine}.toml"),
            &config(
                &engine,
                "",
                &[
                    ("route-a", &[a.addr], &["a.example.net"]),
                    ("route-b", &[b.addr], &["B.Example.Net"]),
                    ("route-corp", &[corp.addr], &["*.corp.example.net"]),
                    ("fallback", &[dflt.addr], &[]),
                ],
            ),
        );
        let proxy = Proxy::start_config(&file).await;
        let port = proxy.addr_of("route-a", QUICK).await.port();
        for r in ["route-b", "route-corp", "fallback"] {
            assert_eq!(proxy.addr_of(r, QUICK).await.port(), port, "[{engine}] route {r} shares the listener");
        }
        let w = |s: &str| format!("[{engine}] {s}");

        fetch_ok(&pki, "a.example.net", port, "a.example.net", "a", "a.example.net", &w("a.example.net")).await;
        assert_routed(&nth_access(&proxy, 1).await, "route-a", a.addr, &w("a.example.net"));

        fetch_ok(&pki, "b.example.net", port, "b.example.net", "b", "b.example.net", &w("b.example.net")).await;
        assert_routed(&nth_access(&proxy, 2).await, "route-b", b.addr, &w("b.example.net"));

        fetch_ok(&pki, "x.corp.example.net", port, "*.corp.example.net", "corp", "x.corp.example.net", &w("wildcard"))
            .await;
        assert_routed(&nth_access(&proxy, 3).await, "route-corp", corp.addr, &w("x.corp.example.net"));

        fetch_ok(
            &pki,
            "unknown.example.org",
            port,
            "default.example.net",
            "default",
            "unknown.example.org",
            &w("unknown name"),
        )
        .await;
        assert_routed(&nth_access(&proxy, 4).await, "fallback", dflt.addr, &w("unknown.example.org"));

        // The wildcard needs a label before its suffix: the bare suffix is not a match. It
        // takes deeper names too (as nginx's `*.` does): the route is chosen, though that
        // backend's certificate (valid for one label only) then fails curl's check.
        let r = curl(&pki, "corp.example.net", port, "/").await;
        assert!(
            !r.ok,
            "[{engine}] corp.example.net must not verify (it reached a backend without that name): {}",
            r.body
        );
        assert_routed(&nth_access(&proxy, 5).await, "fallback", dflt.addr, &w("corp.example.net"));
        let r = curl(&pki, "y.x.corp.example.net", port, "/").await;
        assert!(!r.ok, "[{engine}] y.x.corp.example.net must not verify: {}", r.body);
        assert_routed(&nth_access(&proxy, 6).await, "route-corp", corp.addr, &w("y.x.corp.example.net"));

        // No SNI: curl to an IP address sends none, nor does s_client -noservername.
        fetch_ok(&pki, "127.0.0.1", port, "default.example.net", "default", "-", &w("curl to an IP")).await;
        assert_routed(&nth_access(&proxy, 7).await, "fallback", dflt.addr, &w("curl to an IP"));
        let (ok, out) = s_client_no_sni(&pki, SocketAddr::from(([127, 0, 0, 1], port))).await;
        assert!(ok, "[{engine}] openssl s_client -noservername failed:\n{out}");
        assert!(
            out.contains("subject=CN = default.example.net"),
            "[{engine}] s_client saw another certificate:\n{out}"
        );
        assert!(out.contains("Verify return code: 0 (ok)"), "[{engine}] s_client did not verify:\n{out}");
        assert!(out.contains("backend=default sni=-\n"), "[{engine}] s_client's answer:\n{out}");
        assert_routed(&nth_access(&proxy, 8).await, "fallback", dflt.addr, &w("s_client -noservername"));

        // Server names are matched without regard to case.
        let r = curl(&pki, "A.Example.NET", port, "/").await;
        assert!(r.ok, "[{engine}] A.Example.NET: curl failed:\n{}", r.stderr);
        assert!(
            r.body.strip_prefix("backend=a sni=").is_some_and(|n| n.trim().eq_ignore_ascii_case("a.example.net")),
            "[{engine}] A.Example.NET reached {:?}",
            r.body
        );
        assert_routed(&nth_access(&proxy, 9).await, "route-a", a.addr, &w("A.Example.NET"));

        for line in proxy.access_lines() {
            assert_ne!(line.get("end"), Some("no_route"), "[{engine}] {}", line.raw);
        }
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. No default route
// ---------------------------------------------------------------------------------------

/// Without a default route, a name no route has, a client without SNI and a plain-text
/// client are closed: curl fails, the access line says `end=no_route` and names the server
/// name, and no backend saw a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_unknown_names_are_closed() {
    let pki = Pki::new("nodefault").await;
    let a = TlsBackend::start(&pki, "a", "a").await;
    let b = TlsBackend::start(&pki, "b", "b").await;
    for engine in harness::engines() {
        let file = pki.write(
            &format!("nodefault-{engine}.toml"),
            &config(
                &engine,
                "",
                &[("route-a", &[a.addr], &["a.example.net"]), ("route-b", &[b.addr], &["b.example.net"])],
            ),
        );
        let proxy = Proxy::start_config(&file).await;
        let addr = proxy.addr_of("route-a", QUICK).await;
        let (a0, b0) = (a.accepted(&pki).await, b.accepted(&pki).await);

        let r = curl(&pki, "unknown.example.org", addr.port(), "/").await;
        assert!(!r.ok, "[{engine}] an unknown name with no default route got an answer: {}", r.body);
        let line = nth_access(&proxy, 1).await;
        assert_no_route(&line, &format!("[{engine}] unknown name"));
        assert!(
            line.get("error").unwrap().contains("unknown.example.org"),
            "[{engine}] the error names the server name: {}",
            line.raw
        );

        let (ok, out) = s_client_no_sni(&pki, addr).await;
        assert!(!ok && !out.contains("backend="), "[{engine}] a client without SNI was served:\n{out}");
        assert_no_route(&nth_access(&proxy, 2).await, &format!("[{engine}] no SNI"));

        // Not TLS at all: closed at once (no need to wait for sni_timeout, the default 5 s).
        let mut c = within(QUICK, "connect", TcpStream::connect(addr)).await.expect("connect");
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
        wait_closed(&mut c, QUICK, &format!("[{engine}] plain text")).await;
        assert_no_route(&nth_access(&proxy, 3).await, &format!("[{engine}] plain text"));

        // The named routes still work, and only those clients reached a backend.
        fetch_ok(&pki, "a.example.net", addr.port(), "a.example.net", "a", "a.example.net", &format!("[{engine}] a"))
            .await;
        assert_routed(&nth_access(&proxy, 4).await, "route-a", a.addr, &format!("[{engine}] a"));
        assert_eq!(a.accepted(&pki).await, a0 + 1, "[{engine}] backend a: connections beyond the one routed to it");
        assert_eq!(b.accepted(&pki).await, b0, "[{engine}] backend b saw a connection");
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 3. A ClientHello dribbled one byte at a time, or cut into many records
// ---------------------------------------------------------------------------------------

/// curl through a relay that sends the proxy one byte per TCP segment: the proxy waits for
/// the whole ClientHello, routes by its name, and the handshake completes; the proxy moved
/// exactly the bytes the relay sent each way. Then the same with the ClientHello cut into
/// records of a few dozen bytes (still one byte per segment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_dribbled_or_cut_into_records_is_routed() {
    let pki = Pki::new("dribble").await;
    let a = TlsBackend::start(&pki, "a", "a").await;
    let b = TlsBackend::start(&pki, "b", "b").await;
    let dflt = TlsBackend::start(&pki, "default", "default").await;
    for engine in harness::engines() {
        let file = pki.write(
            &format!("dribble-{engine}.toml"),
            &config(
                &engine,
                "",
                &[
                    ("route-a", &[a.addr], &["a.example.net"]),
                    ("route-b", &[b.addr], &["b.example.net"]),
                    ("fallback", &[dflt.addr], &[]),
                ],
            ),
        );
        let proxy = Proxy::start_config(&file).await;
        let addr = proxy.addr_of("route-b", QUICK).await;
        for (n, piece) in [(1, None), (2, Some(RECORD_PIECE))] {
            let what = format!("[{engine}] b.example.net, records cut to {piece:?}");
            let (relay, moved) = dribble_relay(addr, piece).await;
            fetch_ok(&pki, "b.example.net", relay.port(), "b.example.net", "b", "b.example.net", &what).await;
            let (up, down) = within(QUICK, "the relay's end", moved).await.expect("relay task");
            let line = nth_access(&proxy, n).await;
            assert_routed(&line, "route-b", b.addr, &what);
            assert_eq!((line.num("bytes_up"), line.num("bytes_down")), (up, down), "{what}: bytes moved: {}", line.raw);
        }
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 4. Silent, stalled and plain-text clients
// ---------------------------------------------------------------------------------------

/// A client that sends nothing, and one that stops in the middle of its ClientHello, are
/// closed after `sni_timeout` (not before, not much after), without a backend connection,
/// even though a default route exists; one that half-closes in its ClientHello is closed at
/// once, without a backend; a plain-text client is closed at once, without a backend, even
/// though a default route exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_time_out_and_plain_text_is_closed() {
    let pki = Pki::new("silent").await;
    let a = TlsBackend::start(&pki, "a", "a").await;
    let (plain, _heads) = plain_backend().await;
    for engine in harness::engines() {
        let file = pki.write(
            &format!("silent-{engine}.toml"),
            &config(
                &engine,
                &format!("sni_timeout = \"{SNI_TIMEOUT_TEXT}\""),
                &[("route-a", &[a.addr], &["a.example.net"]), ("plain", &[plain.addr()], &[])],
            ),
        );
        let proxy = Proxy::start_config(&file).await;
        let addr = proxy.addr_of("plain", QUICK).await;
        let (a0, plain0) = (a.accepted(&pki).await, plain.accepted());

        // The start of a ClientHello (a handshake record of 512 bytes, type client_hello),
        // then nothing.
        let stalled: &[u8] = &[TLS_HANDSHAKE, 0x03, 0x01, 0x02, 0x00, 0x01];
        for (n, sent) in [(1, &b""[..]), (2, stalled)] {
            let what = format!("[{engine}] a client that sent {sent:?} and stopped");
            // From before the connect: the proxy's clock starts at its accept, which may come
            // before this task runs again after its connect.
            let t0 = Instant::now();
            let mut c = within(QUICK, "connect", TcpStream::connect(addr)).await.expect("connect");
            c.write_all(sent).await.expect("write");
            let how = wait_closed(&mut c, SNI_TIMEOUT + CLOSE_SLACK, &what).await;
            let took = t0.elapsed();
            assert!(took >= SNI_TIMEOUT, "{what}: closed ({how:?}) after {took:?}, before sni_timeout {SNI_TIMEOUT:?}");
            let line = nth_access(&proxy, n).await;
            assert_no_route(&line, &what);
            assert!(
                line.get("error").unwrap().to_lowercase().contains("timeout"),
                "{what}: the error says why: {}",
                line.raw
            );
        }
        // The same start of a ClientHello, then the client's FIN: closed at once, not after
        // the timeout, and no backend either.
        let what = format!("[{engine}] a client that half-closed in its ClientHello");
        let mut c = within(QUICK, "connect", TcpStream::connect(addr)).await.expect("connect");
        c.write_all(stalled).await.expect("write");
        c.shutdown().await.expect("shutdown(Write)");
        wait_closed(&mut c, QUICK, &what).await;
        let line = nth_access(&proxy, 3).await;
        assert_no_route(&line, &what);
        assert!(!line.get("error").unwrap().to_lowercase().contains("timeout"), "{what}: not a timeout: {}", line.raw);

        assert_eq!(a.accepted(&pki).await, a0, "[{engine}] backend a saw a connection from a silent client");
        assert_eq!(plain.accepted(), plain0, "[{engine}] the default backend saw a connection from a silent client");

        // Plain text on the SNI address (not a ClientHello): closed at once, without a
        // backend, although a default route exists: only TLS clients are routed here.
        let what = format!("[{engine}] a plain-text client");
        let t0 = Instant::now();
        let mut c = within(QUICK, "connect", TcpStream::connect(addr)).await.expect("connect");
        c.write_all(b"GET / HTTP/1.0\r\nHost: plain\r\n\r\n").await.expect("write");
        wait_closed(&mut c, QUICK, &what).await;
        assert!(t0.elapsed() < SNI_TIMEOUT, "{what}: closed only after {:?}, not at once", t0.elapsed());
        let line = nth_access(&proxy, 4).await;
        assert_no_route(&line, &what);
        assert!(line.get("error").unwrap().contains("did not start with a TLS handshake record"), "{what}: the error says why: {}", line.raw);
        assert_eq!(plain.accepted(), plain0, "{what}: the default backend saw a connection");
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 5. Reload
// ---------------------------------------------------------------------------------------

/// A reload that moves a server name from one route to another: once `reload()` says
/// applied, the name reaches the other route's backend, on the same listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_a_name_to_another_route() {
    let pki = Pki::new("reload").await;
    // Two backends with a.example.net's certificate, told apart by the name they answer.
    let first = TlsBackend::start(&pki, "a", "first").await;
    let second = TlsBackend::start(&pki, "a", "second").await;
    for engine in harness::engines() {
        let file = format!("reload-{engine}.toml");
        let before = config(
            &engine,
            "",
            &[("one", &[first.addr], &["a.example.net"]), ("two", &[second.addr], &["b.example.net"])],
        );
        let path = pki.write(&file, &before);
        let proxy = Proxy::start_config(&path).await;
        let addr = proxy.addr_of("one", QUICK).await;
        let w = |s: &str| format!("[{engine}] {s}");
        fetch_ok(&pki, "a.example.net", addr.port(), "a.example.net", "first", "a.example.net", &w("before")).await;
        assert_routed(&nth_access(&proxy, 1).await, "one", first.addr, &w("before the reload"));

        let after = config(
            &engine,
            "",
            &[("one", &[first.addr], &["b.example.net"]), ("two", &[second.addr], &["a.example.net"])],
        );
        pki.write(&file, &after);
        let applied = proxy.reload(QUICK).await;
        assert!(applied.is_ok(), "[{engine}] reload: {applied:?}\n{}", proxy.logs());
        assert_eq!(proxy.addr_of("two", QUICK).await, addr, "[{engine}] the shared listener was kept");
        fetch_ok(&pki, "a.example.net", addr.port(), "a.example.net", "second", "a.example.net", &w("after")).await;
        assert_routed(&nth_access(&proxy, 2).await, "two", second.addr, &w("after the reload"));
        stop_ok(proxy).await;
    }
}

/// The relay's record cutting: valid TLS framing (same type and version, lengths that
/// add up) carrying exactly the original fragment, in records of at most the piece size.
#[test]
fn cut_record_keeps_the_fragment_in_valid_records() {
    let body: Vec<u8> = (0..100u8).collect();
    let mut rec = vec![TLS_HANDSHAKE, 3, 1, 0, body.len() as u8];
    rec.extend_from_slice(&body);
    let out = cut_record(&rec, RECORD_PIECE);
    let mut back = Vec::new();
    let mut rest = &out[..];
    let mut records = 0;
    while !rest.is_empty() {
        assert_eq!(rest[..3], rec[..3], "record type and version kept");
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        assert!((1..=RECORD_PIECE).contains(&len), "record length {len}");
        back.extend_from_slice(&rest[TLS_RECORD_HEADER..TLS_RECORD_HEADER + len]);
        rest = &rest[TLS_RECORD_HEADER + len..];
        records += 1;
    }
    assert_eq!(back, body);
    assert_eq!(records, body.len().div_ceil(RECORD_PIECE));
}
