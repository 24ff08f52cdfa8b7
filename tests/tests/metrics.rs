//! Metrics, end to end through the real binary: the `/metrics`, `/healthz` and `/readyz`
//! endpoint (`[metrics] listen`, `--metrics-listen`), for every engine this host supports
//! (`harness::engines()`).
//!
//! The counters are checked against the access log, the proxy's other account of the same
//! connections: a scrape before and one after a run, and the deltas must equal the run's
//! access lines counted (accepted, ends by reason) and summed (bytes by engine and
//! direction). Then `/readyz` follows a route's only backend down and up again, the parked
//! gauge follows parking, and reloads are counted.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use ntlm_splice_tests::{
    harness::{self, AccessLine, Proxy},
    metrics::{delta, get, metrics_addr, scrape, value},
    servers::{self, Server},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Bound for anything that should be quick: a connect, a scrape, a log line, a reload.
const QUICK: Duration = Duration::from_secs(10);
/// Bound for one connection's transfer (a few MiB each way).
const TRANSFER: Duration = Duration::from_secs(60);
/// Bytes sent (and echoed back) by each connection of the counted run: nothing, a byte,
/// less than a segment, more than a pipe, and a few MiB.
const SIZES: [u64; 6] = [0, 1, 4099, 70_001, 1 << 20, (3 << 20) + 5];
/// Connections to a route whose only backend refuses.
const REFUSED: usize = 3;
/// Non-TLS connections to an address whose only route is chosen by server name.
const UNROUTED: usize = 2;
/// Health check timings of the readiness test (short, so that it runs quickly).
const HEALTH: &str = "[route.health]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2\n";
/// Health checks in a row that change a backend's state in the readiness test (both `rise`
/// and `fall` of [`HEALTH`]), times the interval, plus slack for a loaded machine.
const STATE_CHANGE: Duration = Duration::from_secs(10);
/// Idle time after which the parking test's connections park.
const PARK_AFTER: &str = "100ms";
/// Connections parked at once in the parking test.
const PARKED: usize = 4;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A fresh temporary directory holding one test's config file; removed on drop.
struct ConfDir {
    dir: PathBuf,
}

/// Tells apart the directories of one test process.
static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl ConfDir {
    fn new(test: &str, engine: &str) -> ConfDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ntlm-splice-metrics-{}-{n}-{test}-{engine}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing the stale {}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        ConfDir { dir }
    }

    /// Writes the config file whole (aside, then renamed over it) and returns its path.
    fn write(&self, text: &str) -> PathBuf {
        let (tmp, path) = (self.dir.join("ntlm-splice.toml.new"), self.dir.join("ntlm-splice.toml"));
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("renaming {}: {e}", tmp.display()));
        path
    }
}

impl Drop for ConfDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// The start of every test file: a short drain, metrics on a free loopback port, `engine`
/// for every route.
fn head(engine: &str) -> String {
    format!(
        "[global]\ndrain_timeout = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
         [defaults]\nengine = \"{engine}\"\nconnect_timeout = \"2s\"\n"
    )
}

/// One `[[route]]` table; `extra` is appended as is.
fn route(name: &str, listen: &str, backends: &[SocketAddr], extra: &str) -> String {
    let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!("\n[[route]]\nname = \"{name}\"\nlisten = [\"{listen}\"]\nbackends = [{}]\n{extra}", backends.join(", "))
}

/// Awaits `f` for at most `limit`, panicking with `what` otherwise.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// The metrics' `route` label of an access line: its route, or "" for `route=-` (closed
/// before a route was chosen).
fn route_label(l: &AccessLine) -> String {
    match l.get("route") {
        Some("-") | None => String::new(),
        Some(r) => r.to_string(),
    }
}

/// One client through the echo route: sends `len` bytes of pattern `seed`, half-closes, and
/// reads the echo to EOF, checking every byte.
async fn echo_once(addr: SocketAddr, seed: u64, len: u64) {
    let s = within(QUICK, "connect", TcpStream::connect(addr)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let send = async move {
        servers::send_pattern(&mut w, seed, len).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let (_, v) = within(TRANSFER, &format!("echo of {len} bytes"), async {
        tokio::join!(send, servers::recv_pattern(&mut r, seed))
    })
    .await;
    v.unwrap().assert_exact(len, &format!("echo of {len} bytes"));
}

/// One client that sends `bytes` and reads until the proxy closes (errors included: a refused
/// or unrouted client may be reset).
async fn turned_away(addr: SocketAddr, bytes: &[u8]) {
    let mut s = within(QUICK, "connect", TcpStream::connect(addr)).await.unwrap();
    let mut sink = Vec::new();
    let _closed = within(QUICK, "the proxy closes", async {
        // A write after the proxy closed may fail; the read says when it did.
        s.write_all(bytes).await.ok();
        s.read_to_end(&mut sink).await
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 1. The counters agree with the access log
// ---------------------------------------------------------------------------------------

/// A run of connections with known bytes through the echo route, connections to a route
/// whose backend refuses, and non-TLS connections to an address with SNI routes only: the
/// deltas of the counters equal the access log's counts (accepted and ends, by route and
/// reason) and byte sums (by route, engine and direction); every connection ended is no
/// longer active; connect attempts, failures and timings are per backend; and with the
/// sockmap engine, the connections its own counter says went through the kernel are those
/// the access log says it carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_the_access_log() {
    for engine in harness::engines() {
        let echo = Server::echo().await;
        let refused = servers::refused_addr().await;
        let dir = ConfDir::new("counters", &engine);
        let path = dir.write(&format!(
            "{}{}{}{}",
            head(&engine),
            route("echo", "127.0.0.1:0", &[echo.addr()], ""),
            route("dead", "127.0.0.2:0", &[refused], ""),
            route("tls", "127.0.0.3:0", &[echo.addr()], "sni = [\"a.example.net\"]\n"),
        ));
        let proxy = Proxy::start_config(&path).await;
        let m = metrics_addr(&proxy).await;
        let (echo_at, dead_at, tls_at) =
            (proxy.addr_of("echo", QUICK).await, proxy.addr_of("dead", QUICK).await, proxy.addr_of("tls", QUICK).await);
        let before = scrape(m).await;
        for (i, &len) in SIZES.iter().enumerate() {
            echo_once(echo_at, i as u64 + 1, len).await;
        }
        for _ in 0..REFUSED {
            turned_away(dead_at, b"hello").await;
        }
        for _ in 0..UNROUTED {
            turned_away(tls_at, b"GET / HTTP/1.1\r\n\r\n").await;
        }
        let lines = proxy.wait_access_lines(SIZES.len() + REFUSED + UNROUTED, QUICK).await;
        let after = scrape(m).await;
        let d = |series: &str| delta(&before, &after, series);

        // Accepted and ended, by route and reason.
        let mut accepted: HashMap<String, f64> = HashMap::new();
        let mut ends: HashMap<(String, String), f64> = HashMap::new();
        let mut bytes: HashMap<(String, String, &str), f64> = HashMap::new();
        for l in &lines {
            let r = route_label(l);
            *accepted.entry(r.clone()).or_default() += 1.0;
            *ends.entry((r.clone(), l.get("end").unwrap_or("-").to_string())).or_default() += 1.0;
            let engine = l.get("engine").unwrap_or("-").to_string();
            *bytes.entry((r.clone(), engine.clone(), "up")).or_default() += l.num("bytes_up") as f64;
            *bytes.entry((r, engine, "down")).or_default() += l.num("bytes_down") as f64;
        }
        let what = |s: &str| {
            format!(
                "[{engine}] {s}; access log:\n{}",
                lines.iter().map(|l| l.raw.as_str()).collect::<Vec<_>>().join("\n")
            )
        };
        for (r, n) in &accepted {
            let series = format!("ntlm_splice_connections_accepted_total{{route=\"{r}\"}}");
            assert_eq!(d(&series), *n, "{}", what(&series));
            let active = format!("ntlm_splice_connections_active{{route=\"{r}\"}}");
            if r.is_empty() {
                assert!(!after.contains_key(&active), "{}", what("no active gauge without a route"));
            } else {
                assert_eq!(value(&after, &active), 0.0, "{}", what(&active));
            }
        }
        for ((r, end), n) in &ends {
            let series = format!("ntlm_splice_connection_ends_total{{route=\"{r}\",end=\"{end}\"}}");
            assert_eq!(d(&series), *n, "{}", what(&series));
        }
        let all_ends: f64 =
            after.keys().filter(|k| k.starts_with("ntlm_splice_connection_ends_total{")).map(|k| d(k)).sum();
        assert_eq!(all_ends, lines.len() as f64, "{}", what("no end counted twice or elsewhere"));
        assert_eq!(ends.get(&(String::new(), "no_route".into())), Some(&(UNROUTED as f64)), "{}", what("the unrouted"));
        for ((r, engine_label, dir), sum) in &bytes {
            if r.is_empty() {
                continue; // carried by no engine, and no byte
            }
            let series =
                format!("ntlm_splice_bytes_total{{route=\"{r}\",engine=\"{engine_label}\",direction=\"{dir}\"}}");
            assert_eq!(d(&series), *sum, "{}", what(&series));
        }
        let all_bytes: f64 = after.keys().filter(|k| k.starts_with("ntlm_splice_bytes_total{")).map(|k| d(k)).sum();
        assert_eq!(all_bytes, 2.0 * SIZES.iter().sum::<u64>() as f64, "{}", what("bytes, both ways"));

        // Backend connects.
        let echo_b = format!("route=\"echo\",backend=\"{}\"", echo.addr());
        let dead_b = format!("route=\"dead\",backend=\"{refused}\"");
        let count = |name: &str, labels: &str| d(&format!("ntlm_splice_backend_connect_{name}_total{{{labels}}}"));
        assert_eq!(count("attempts", &echo_b), SIZES.len() as f64, "{}", what("echo attempts"));
        assert_eq!(count("failures", &echo_b), 0.0, "{}", what("echo failures"));
        assert_eq!(count("attempts", &dead_b), REFUSED as f64, "{}", what("dead attempts"));
        assert_eq!(count("failures", &dead_b), REFUSED as f64, "{}", what("dead failures"));
        let timed = d("ntlm_splice_backend_connect_seconds_count{route=\"echo\"}");
        assert_eq!(timed, SIZES.len() as f64, "{}", what("echo connects timed"));
        assert_eq!(d("ntlm_splice_backend_connect_seconds_count{route=\"dead\"}"), 0.0, "failures are not timed");

        // The sockmap engine's own account: connections that entered its maps are those the
        // access log shows carried by it (in the kernel, or copied after a FIN came first).
        if engine == "sockmap" {
            let echo_lines: Vec<&AccessLine> = lines.iter().filter(|l| l.get("route") == Some("echo")).collect();
            let by = |e: &str| echo_lines.iter().filter(|l| l.get("engine") == Some(e)).count() as f64;
            let kernel = d("ntlm_splice_sockmap_kernel_conns_total");
            assert_eq!(kernel, by("sockmap") + by("copy"), "{}", what("sockmap_kernel_conns"));
            let fallbacks = d("ntlm_splice_sockmap_splice_fallbacks_total");
            assert_eq!(fallbacks, by("splice"), "{}", what("sockmap_splice_fallbacks"));
            for e in ["no_stats", "no_ctl", "no_peer_untracked", "seq_gap"] {
                value(&after, &format!("ntlm_splice_sockmap_kernel_errors_total{{error=\"{e}\"}}"));
            }
        }
        let status = proxy.stop().await;
        assert!(status.success(), "[{engine}] ntlm-splice exited with {status}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Readiness follows the backends
// ---------------------------------------------------------------------------------------

/// A route whose only backend goes down makes `/readyz` answer 503 naming the route, and
/// 200 again once the backend is back; `backend_up` and the transitions say the same, and
/// `/healthz` answers 200 throughout. The state is read after the proxy logs the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_backends_of_every_route() {
    for engine in harness::engines() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = backend.local_addr().unwrap();
        let other = Server::echo().await;
        let dir = ConfDir::new("readyz", &engine);
        let path = dir.write(&format!(
            "{}{}{}",
            head(&engine),
            route("h", "127.0.0.1:0", &[b], HEALTH),
            route("other", "127.0.0.2:0", &[other.addr()], ""),
        ));
        let proxy = Proxy::start_config(&path).await;
        let m = metrics_addr(&proxy).await;
        proxy.addr_of("other", QUICK).await;
        proxy.addr_of("h", QUICK).await;
        assert_eq!(get(m, "/readyz").await, (200, "ready\n".into()), "[{engine}] both routes have a backend up");
        assert_eq!(get(m, "/healthz").await, (200, "ok\n".into()));
        let up = format!("ntlm_splice_backend_up{{route=\"h\",backend=\"{b}\"}}");
        let to =
            |s: &str| format!("ntlm_splice_backend_health_transitions_total{{route=\"h\",backend=\"{b}\",to=\"{s}\"}}");
        let s = scrape(m).await;
        assert_eq!((value(&s, &up), value(&s, &to("down"))), (1.0, 0.0), "[{engine}] before");

        drop(backend);
        proxy.wait_for_log(&format!("health route=h backend={b} state=down"), STATE_CHANGE).await;
        let (code, body) = get(m, "/readyz").await;
        assert_eq!(code, 503, "[{engine}] {body}");
        assert_eq!(body, format!("not ready: route \"h\" has no backend up (down: {b})\n"), "[{engine}]");
        assert_eq!(get(m, "/healthz").await, (200, "ok\n".into()), "[{engine}] the process is up all the same");
        let s = scrape(m).await;
        assert_eq!((value(&s, &up), value(&s, &to("down"))), (0.0, 1.0), "[{engine}] down");

        let back = TcpListener::bind(b).await.unwrap_or_else(|e| panic!("binding the backend again on {b}: {e}"));
        proxy.wait_for_log(&format!("health route=h backend={b} state=up"), STATE_CHANGE).await;
        assert_eq!(get(m, "/readyz").await, (200, "ready\n".into()), "[{engine}] back up");
        let s = scrape(m).await;
        assert_eq!((value(&s, &up), value(&s, &to("up"))), (1.0, 1.0), "[{engine}] up again");
        drop(back);
        let status = proxy.stop().await;
        assert!(status.success(), "[{engine}] ntlm-splice exited with {status}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Parking, reloads, fallbacks
// ---------------------------------------------------------------------------------------

/// Idle splice-engine connections park: the gauge counts them while they wait (flags: the
/// `--metrics-listen` form), and none once they closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parked_gauge_counts_parked_connections() {
    let echo = Server::echo().await;
    let extra = ["--metrics-listen", "127.0.0.1:0", "--park-after", PARK_AFTER];
    let proxy = Proxy::start_with_log("splice", &[echo.addr()], &extra, harness::PARK_LOG).await;
    let m = metrics_addr(&proxy).await;
    let mut clients = Vec::new();
    for _ in 0..PARKED {
        let mut c = within(QUICK, "connect", TcpStream::connect(proxy.addr())).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let mut echoed = [0u8; 1];
        within(QUICK, "echo", c.read_exact(&mut echoed)).await.unwrap();
        clients.push(c);
    }
    proxy.wait_log_ending(" parked", PARKED, QUICK).await;
    let s = scrape(m).await;
    assert_eq!(value(&s, "ntlm_splice_connections_parked"), PARKED as f64);
    assert_eq!(value(&s, "ntlm_splice_connections_active{route=\"default\"}"), PARKED as f64, "parked are active");
    for c in &mut clients {
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        within(QUICK, "EOF", c.read_to_end(&mut rest)).await.unwrap();
    }
    proxy.wait_access_lines(PARKED, QUICK).await;
    let s = scrape(m).await;
    assert_eq!(value(&s, "ntlm_splice_connections_parked"), 0.0);
    assert_eq!(value(&s, "ntlm_splice_connections_active{route=\"default\"}"), 0.0);
    let status = proxy.stop().await;
    assert!(status.success(), "ntlm-splice exited with {status}");
}

/// Reloads are counted by result; a route that asks for `auto` counts a fallback each time a
/// table is built with it (start, each applied reload); a route a reload removed leaves no
/// series behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_and_fallbacks_are_counted() {
    let echo = Server::echo().await;
    let dir = ConfDir::new("reloads", "auto");
    let routes = |second: bool| {
        let mut t = head("auto") + &route("a", "127.0.0.1:0", &[echo.addr()], "");
        if second {
            t += &route("b", "127.0.0.2:0", &[echo.addr()], "engine = \"splice\"\n");
        }
        t
    };
    let path = dir.write(&routes(true));
    let proxy = Proxy::start_config(&path).await;
    let m = metrics_addr(&proxy).await;
    let (ok, failed) =
        ("ntlm_splice_config_reloads_total{result=\"ok\"}", "ntlm_splice_config_reloads_total{result=\"failed\"}");
    let fallbacks = "ntlm_splice_engine_fallbacks_total{reason=\"auto_opt_in\"}";
    let s = scrape(m).await;
    assert_eq!((value(&s, ok), value(&s, failed), value(&s, fallbacks)), (0.0, 0.0, 1.0), "at start");
    assert!(s.contains_key("ntlm_splice_connections_accepted_total{route=\"b\"}"));

    dir.write("[[route]]\nname = \"a\"\n");
    proxy.reload(QUICK).await.expect_err("a file without listen and backends is rejected");
    let s = scrape(m).await;
    assert_eq!((value(&s, ok), value(&s, failed), value(&s, fallbacks)), (0.0, 1.0, 1.0), "after a rejected reload");

    dir.write(&routes(false));
    proxy.reload(QUICK).await.expect("the reload applies");
    let s = scrape(m).await;
    assert_eq!((value(&s, ok), value(&s, failed), value(&s, fallbacks)), (1.0, 1.0, 2.0), "after an applied reload");
    assert!(!s.keys().any(|k| k.contains("route=\"b\"")), "route b's series are gone");
    let status = proxy.stop().await;
    assert!(status.success(), "ntlm-splice exited with {status}");
}
