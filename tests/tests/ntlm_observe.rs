//! The NTLM observer, the failed-login guard and their metrics, end to end through the real
//! binary with real clients (`curl --ntlm`, Python `requests-ntlm`, the in-crate raw client)
//! against the project's NTLM backend (`ntlm::NtlmServer`), for every engine this host
//! supports (`harness::engines()`).
//!
//! The backend tells what each client really put in its AUTHENTICATE (domain, user,
//! workstation) and whether a login reached it at all, so the access log's `ntlm_user=`,
//! `ntlm_workstation=` and `ntlm_result=` are checked against what crossed the wire, and a
//! login the guard stops is seen never to reach the backend. The counters are checked
//! against the access log (a scrape before and one after each run).
//!
//! `/readyz` turning 503 when every backend of a route is down is tested in metrics.rs
//! (`readyz_follows_the_backends_of_every_route`), not again here.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use ntlm_splice_tests::{
    clients::{CurlOptions, CurlRun, curl, curl_run, requests_ntlm},
    harness::{self, AccessLine, Proxy, TempDir, config_head, config_route, within},
    metrics::{Samples, delta, metrics_addr, scrape},
    ntlm::{
        Credentials, DEFAULT_DOMAIN, HttpConn, NtlmServer, User, client::WORKSTATION, demo_users, server::LoginRecord,
    },
};

/// Bound for quick steps: a connect, a login, an access line, a scrape, a reload.
const QUICK: Duration = Duration::from_secs(10);
/// Bound for one bulk transfer through the proxy (256 MiB one way).
const BULK_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes moved each way after the login in the bulk test.
const BULK: u64 = 256 << 20;
/// The guard's `max_failures` in the guard test.
const MAX_FAILURES: usize = 3;
/// The guard test's route.
const ROUTE: &str = "obs";
/// The name of the route a proxy started with flags (`--listen`, `--backend`) has.
const FLAGS_ROUTE: &str = "default";
/// The login results of `ntlm_result=` and `ntlm_logins_total{result}`.
const RESULTS: [&str; 5] = ["ok", "denied", "error", "blocked", "unanswered"];
/// What the guard closes a connection for (`guard_blocks_total{reason}`).
const BLOCK_REASONS: [&str; 2] = ["address", "user"];
/// What the access log's `error=` for a blocked client address says: who closed it, and why.
const ADDRESS_BLOCKED: [&str; 2] = ["the failed-login guard", "blocks this client's address"];

const ALICE: Credentials<'static> = Credentials { domain: "EXAMPLE", user: "alice", password: "Alice-Pass-1" };
/// A user of the guard test only.
const DAVE: Credentials<'static> = Credentials { domain: "EXAMPLE", user: "dave", password: "Dave-Pass-4" };

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// alice, bob, carol and dave.
fn users() -> Vec<User> {
    let mut users = demo_users();
    users.push(User::new(DAVE.user, DAVE.password));
    users
}

async fn backend() -> NtlmServer {
    NtlmServer::start("127.0.0.1:0".parse().expect("literal address"), DEFAULT_DOMAIN, users())
        .await
        .unwrap_or_else(|e| panic!("cannot start the NTLM backend: {e}"))
}

/// A backend, and a proxy in front of it started with flags (`ntlm_observe` is on by
/// default) and a metrics endpoint.
async fn setup(engine: &str, rust_log: Option<&str>) -> (NtlmServer, Proxy, SocketAddr) {
    let backend = backend().await;
    let flags = ["--metrics-listen", "127.0.0.1:0"];
    let proxy = match rust_log {
        Some(log) => Proxy::start_with_log(engine, &[backend.local_addr()], &flags, log).await,
        None => Proxy::start(engine, &[backend.local_addr()], &flags).await,
    };
    let metrics = metrics_addr(&proxy).await;
    (backend, proxy, metrics)
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// `127.0.0.N`: a client address of its own on loopback.
fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// `DOMAIN\user`, or `user` alone when the domain is empty: `ntlm_user=` of a login.
fn account(domain: &str, user: &str) -> String {
    if domain.is_empty() { user.to_string() } else { format!("{domain}\\{user}") }
}

/// A name as the access log writes it: `"`, `\` and control characters as `\xNN`.
fn escaped(name: &str) -> String {
    name.chars()
        .map(
            |c| {
                if c == '%' || c == '"' || c == '\\' || c.is_control() {
                    format!("%{:02X}", c as u32)
                } else {
                    c.into()
                }
            },
        )
        .collect()
}

/// The access line of the proxy's connection `id` (they are numbered 1, 2, ... in accept
/// order), waiting for it.
async fn conn_line(proxy: &Proxy, id: usize) -> AccessLine {
    proxy.wait_for_log(&format!(" access: conn={id} "), QUICK).await;
    let want = id.to_string();
    proxy.access_lines().into_iter().find(|l| l.get("conn") == Some(want.as_str())).expect("just seen")
}

/// Waits for the access lines of connections 1..=n, then checks there are exactly `n`.
async fn all_lines(engine: &str, proxy: &Proxy, n: usize) -> Vec<AccessLine> {
    for id in 1..=n {
        conn_line(proxy, id).await;
    }
    let lines = proxy.access_lines();
    assert_eq!(lines.len(), n, "[{engine}] exactly {n} access lines (one per client connection):\n{}", proxy.logs());
    lines
}

/// Checks an access line's login fields: present as `want` (user, workstation, result), at
/// the end of the line after `end=` (and `error=`), or absent when `want` is `None`.
fn assert_login(engine: &str, line: &AccessLine, want: Option<(&str, &str, &str)>) {
    let got = (line.get("ntlm_user"), line.get("ntlm_workstation"), line.get("ntlm_result"));
    match want {
        None => assert_eq!(got, (None, None, None), "[{engine}] a connection without a login: {}", line.raw),
        Some((user, workstation, result)) => {
            assert_eq!(got, (Some(user), Some(workstation), Some(result)), "[{engine}] {}", line.raw);
            let tail = format!(" ntlm_user=\"{user}\" ntlm_workstation=\"{workstation}\" ntlm_result={result}");
            assert!(line.raw.ends_with(&tail), "[{engine}] the login fields end the line ({tail:?}): {}", line.raw);
            let (end, user_at) =
                (line.raw.find(" end=").expect("end="), line.raw.find(" ntlm_user=").expect("ntlm_user"));
            assert!(end < user_at, "[{engine}] the login fields come after end=: {}", line.raw);
            if let Some(error) = line.raw.find(" error=") {
                assert!(error < user_at, "[{engine}] the login fields come after error=: {}", line.raw);
            }
        }
    }
}

/// The `ntlm_user=` and `ntlm_workstation=` the access log must show for a login the backend
/// received.
fn logged_names(r: &LoginRecord) -> (String, String) {
    (account(&escaped(&r.domain), &escaped(&r.user)), escaped(&r.workstation))
}

/// The counters' deltas from `before` to `after` equal what the access log `lines` says of
/// the same connections: connections accepted and ended by reason, bytes by engine and
/// direction, NTLM logins by result (each connection here logs in at most once, so the
/// log's first login is its only one), and guard blocks by reason (an address block has no
/// login fields: it is closed before any byte is read; a user block is `ntlm_result=blocked`).
fn assert_counters_match(engine: &str, route: &str, before: &Samples, after: &Samples, lines: &[AccessLine]) {
    let d = |series: &str| delta(before, after, series);
    let what = |s: &str| {
        format!("[{engine}] {s}; access log:\n{}", lines.iter().map(|l| l.raw.as_str()).collect::<Vec<_>>().join("\n"))
    };
    let count = |f: &dyn Fn(&AccessLine) -> bool| lines.iter().filter(|l| f(l)).count() as f64;
    assert!(lines.iter().all(|l| l.get("route") == Some(route)), "{}", what("every connection on the route"));
    let accepted = format!("ntlm_splice_connections_accepted_total{{route=\"{route}\"}}");
    assert_eq!(d(&accepted), lines.len() as f64, "{}", what(&accepted));

    let mut ends: HashMap<&str, f64> = HashMap::new();
    let mut bytes: HashMap<(&str, &str), f64> = HashMap::new();
    for l in lines {
        *ends.entry(l.get("end").unwrap_or("-")).or_default() += 1.0;
        let e = l.get("engine").unwrap_or("-");
        *bytes.entry((e, "up")).or_default() += l.num("bytes_up") as f64;
        *bytes.entry((e, "down")).or_default() += l.num("bytes_down") as f64;
    }
    for (end, n) in &ends {
        let series = format!("ntlm_splice_connection_ends_total{{route=\"{route}\",end=\"{end}\"}}");
        assert_eq!(d(&series), *n, "{}", what(&series));
    }
    let all_ends: f64 =
        after.keys().filter(|k| k.starts_with("ntlm_splice_connection_ends_total{")).map(|k| d(k)).sum();
    assert_eq!(all_ends, lines.len() as f64, "{}", what("no end counted twice or elsewhere"));
    for ((e, dir), sum) in &bytes {
        let series = format!("ntlm_splice_bytes_total{{route=\"{route}\",engine=\"{e}\",direction=\"{dir}\"}}");
        assert_eq!(d(&series), *sum, "{}", what(&series));
    }
    let all_bytes: f64 = after.keys().filter(|k| k.starts_with("ntlm_splice_bytes_total{")).map(|k| d(k)).sum();
    assert_eq!(all_bytes, bytes.values().sum::<f64>(), "{}", what("bytes counted on no other series"));

    for result in RESULTS {
        let series = format!("ntlm_splice_ntlm_logins_total{{route=\"{route}\",result=\"{result}\"}}");
        assert_eq!(d(&series), count(&|l| l.get("ntlm_result") == Some(result)), "{}", what(&series));
    }
    let blocked = |l: &AccessLine| l.get("end") == Some("guard_blocked");
    let by_reason = [
        ("address", count(&|l| blocked(l) && l.get("ntlm_result").is_none())),
        ("user", count(&|l| blocked(l) && l.get("ntlm_result") == Some("blocked"))),
    ];
    for (reason, n) in by_reason {
        let series = format!("ntlm_splice_guard_blocks_total{{route=\"{route}\",reason=\"{reason}\"}}");
        assert_eq!(d(&series), n, "{}", what(&series));
    }
    let all_blocks: f64 = after.keys().filter(|k| k.starts_with("ntlm_splice_guard_blocks_total{")).map(|k| d(k)).sum();
    assert_eq!(
        all_blocks,
        count(&blocked),
        "{}",
        what("every guard_blocked end is a block, and none is counted elsewhere")
    );
    assert_eq!(BLOCK_REASONS.len(), by_reason.len());
}

/// Stops the proxy (SIGTERM) and checks it exited cleanly.
async fn stop(engine: &str, proxy: Proxy) {
    let logs = proxy.logs();
    let status = proxy.stop().await;
    assert!(status.success(), "[{engine}] ntlm-splice exited with {status}:\n{logs}");
}

// ---------------------------------------------------------------------------------------
// 1. Who logged in, from which workstation, with what result
// ---------------------------------------------------------------------------------------

/// The workstation curl puts in its AUTHENTICATE: curl 7.x and 8.x send the fixed name
/// `WORKSTATION` (lib/vauth/ntlm.c), not the host's name.
const CURL_WORKSTATION: &str = "WORKSTATION";

/// Logins that succeed and fail, by curl, requests-ntlm and the raw client (whose
/// workstation name has characters the log must escape), and a client that never logs
/// in: each access line names the user and workstation the backend received and the result;
/// the one without a login has no such fields; the counters agree with the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_logged_with_user_workstation_and_result() {
    let odd_workstation = "WS\"1\\x";
    for engine in harness::engines() {
        let (backend, proxy, m) = setup(&engine, None).await;
        let whoami = url(proxy.addr(), "/whoami");
        let before = scrape(m).await;
        // (connection's result, whether it carries a login)
        let mut expected: Vec<Option<&str>> = Vec::new();

        let t = curl(Some(("EXAMPLE\\alice", ALICE.password)), std::slice::from_ref(&whoami)).await;
        assert_eq!((t[0].status, t[0].body.as_str()), (200, "EXAMPLE\\alice"), "[{engine}] curl as alice");
        expected.push(Some("ok"));
        let t = curl(Some(("EXAMPLE\\bob", "not-bobs-password")), std::slice::from_ref(&whoami)).await;
        assert_eq!(t[0].status, 401, "[{engine}] curl as bob, wrong password");
        expected.push(Some("denied"));
        for r in requests_ntlm(&whoami, "EXAMPLE\\carol", "Carol-Pass-3", 2).await {
            assert_eq!((r.status, r.body.as_str()), (200, "EXAMPLE\\carol"), "[{engine}] requests-ntlm as carol");
        }
        expected.push(Some("ok"));
        // No domain: the log names the user alone.
        let r = requests_ntlm(&whoami, "bob", "not-bobs-password", 1).await;
        assert_eq!(r[0].status, 401, "[{engine}] requests-ntlm as bob, wrong password");
        expected.push(Some("denied"));
        let mut raw = within(QUICK, "connect", HttpConn::connect(proxy.addr())).await.expect("connect");
        let r = within(QUICK, "raw login", raw.login_from("NTLM", "/whoami", &ALICE, odd_workstation))
            .await
            .expect("login");
        assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"), "[{engine}] raw login");
        within(QUICK, "close", raw.finish()).await.expect("close");
        expected.push(Some("ok"));
        let t = curl(None, std::slice::from_ref(&whoami)).await;
        assert_eq!(t[0].status, 401, "[{engine}] anonymous curl");
        expected.push(None);

        let lines = all_lines(&engine, &proxy, expected.len()).await;
        let logins = backend.logins();
        assert_eq!(
            logins.len(),
            expected.iter().flatten().count(),
            "[{engine}] one AUTHENTICATE per login: {logins:?}"
        );
        assert_eq!(
            (logins[0].workstation.as_str(), logins[1].workstation.as_str()),
            (CURL_WORKSTATION, CURL_WORKSTATION),
            "[{engine}] what curl sends"
        );
        assert_eq!(logins[4].workstation, odd_workstation, "[{engine}] the raw client's workstation");
        assert_eq!(
            (logins[3].domain.as_str(), logins[3].user.as_str()),
            ("", "bob"),
            "[{engine}] requests-ntlm, no domain"
        );
        let mut sent = logins.iter();
        for (line, result) in lines.iter().zip(&expected) {
            // (No engine check here: a short connection whose client closed while the observer
            // still had it goes on in the splice engine from a sockmap route; the bulk test
            // checks the engine of a connection that lives.)
            match result {
                Some(result) => {
                    let record = sent.next().expect("counted above");
                    assert_eq!(record.ok, *result == "ok", "[{engine}] the backend's verdict: {record:?}");
                    let (user, workstation) = logged_names(record);
                    assert_login(&engine, line, Some((&user, &workstation, result)));
                }
                None => assert_login(&engine, line, None),
            }
        }
        assert_eq!(lines[4].get("ntlm_workstation"), Some("WS%221%5Cx"), "[{engine}] escaped: {}", lines[4].raw);
        assert_eq!(lines[3].get("ntlm_user"), Some("bob"), "[{engine}] no domain: {}", lines[3].raw);
        let after = scrape(m).await;
        assert_counters_match(&engine, FLAGS_ROUTE, &before, &after, &lines);
        stop(&engine, proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. Every byte after the handshake
// ---------------------------------------------------------------------------------------

/// A login, then 256 MiB down and 256 MiB up on the same kept-alive connection, then one
/// more request: every byte arrives in order (checked against the positional pattern), the
/// connection is still alice's, the access line's byte counts equal what the client sent
/// and received, and it names the login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_after_the_login_is_byte_exact() {
    for engine in harness::engines() {
        let (backend, proxy, m) = setup(&engine, None).await;
        let before = scrape(m).await;
        let mut c = within(QUICK, "connect", HttpConn::connect(proxy.addr())).await.expect("connect");
        let r = within(QUICK, "login", c.login("/whoami", &ALICE)).await.expect("login");
        assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"), "[{engine}] login");
        let started = std::time::Instant::now();
        let path = format!("/pattern?seed=11&len={BULK}");
        let (status, v) = within(BULK_TIMEOUT, "256 MiB down", c.get_pattern(&path, 11)).await.expect("GET");
        assert_eq!(status, 200, "[{engine}] GET {path}");
        v.assert_exact(BULK, &format!("[{engine}] 256 MiB down after the login"));
        let r = within(BULK_TIMEOUT, "256 MiB up", c.put_pattern("/pattern?seed=12", 12, BULK)).await.expect("PUT");
        assert_eq!((r.status, r.text()), (200, format!("len={BULK} mismatch=none\n")), "[{engine}] 256 MiB up");
        eprintln!("[{engine}] 256 MiB each way after the login in {:?}", started.elapsed());
        let r = within(QUICK, "whoami", c.get("/whoami")).await.expect("whoami");
        assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"), "[{engine}] still alice's");
        let rest = within(QUICK, "close", c.finish()).await.expect("close");
        assert!(rest.is_empty(), "[{engine}] nothing after the last response: {rest:?}");

        let line = conn_line(&proxy, 1).await;
        assert_eq!(line.get("engine"), Some(engine.as_str()), "[{engine}] {}", line.raw);
        assert_eq!(line.get("end"), Some("client_fin"), "[{engine}] {}", line.raw);
        assert_eq!(
            (line.num("bytes_up"), line.num("bytes_down")),
            (c.bytes_sent(), c.bytes_received()),
            "[{engine}] the log's bytes are what crossed: {}",
            line.raw
        );
        let (user, workstation) = logged_names(&backend.logins()[0]);
        assert_login(&engine, &line, Some((&user, &workstation, "ok")));
        assert_eq!(backend.connections_accepted(), 1, "[{engine}] one backend connection");
        let after = scrape(m).await;
        assert_counters_match(&engine, FLAGS_ROUTE, &before, &after, &[line]);
        stop(&engine, proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 3. The failed-login guard
// ---------------------------------------------------------------------------------------

/// The guard test's config: one route with a guard of [`MAX_FAILURES`] within `window`.
fn guard_config(engine: &str, backend: SocketAddr, window: &str) -> String {
    format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n{}",
        config_head(engine),
        config_route(
            ROUTE,
            &["127.0.0.1:0"],
            &[backend],
            &format!("[route.guard]\nmax_failures = {MAX_FAILURES}\nwindow = \"{window}\"\nblock_for = \"10m\"\n"),
        )
    )
}

/// The guard scenario's clients, each one curl run on a connection of its own, its access
/// line awaited before the next starts (so that the guard has judged it).
struct Clients<'a> {
    engine: &'a str,
    proxy: &'a Proxy,
    /// Connections made so far (the proxy numbers them in this order).
    conns: usize,
}

impl Clients<'_> {
    /// curl from `from` logging in as `creds` with `password`; returns its run and access line.
    async fn login(&mut self, from: IpAddr, creds: &Credentials<'_>, password: &str) -> (CurlRun, AccessLine) {
        let user = format!("{}\\{}", creds.domain, creds.user);
        let addr = self.proxy.addr_of(ROUTE, QUICK).await;
        let opts = CurlOptions { auth: Some((&user, password)), interface: Some(from), verbose: false };
        let run = curl_run(&opts, &[url(addr, "/whoami")]).await;
        self.conns += 1;
        let line = conn_line(self.proxy, self.conns).await;
        assert_eq!(
            line.get("client").and_then(|c| c.parse::<SocketAddr>().ok()).map(|c| c.ip()),
            Some(from),
            "{}",
            line.raw
        );
        (run, line)
    }

    /// A login that the backend accepts.
    async fn ok(&mut self, from: IpAddr, creds: &Credentials<'_>) {
        let (run, line) = self.login(from, creds, creds.password).await;
        let want = format!("{}\\{}", creds.domain, creds.user);
        let got = run.transfers.first().map(|t| (t.status, t.body.as_str()));
        assert_eq!(got, Some((200, want.as_str())), "[{}] {want} from {from}: {run:?}\n{}", self.engine, line.raw);
        assert_eq!(line.get("ntlm_result"), Some("ok"), "[{}] {}", self.engine, line.raw);
    }

    /// A login with a wrong password: 401, `ntlm_result=denied`.
    async fn denied(&mut self, from: IpAddr, creds: &Credentials<'_>) {
        let (run, line) = self.login(from, creds, "a-wrong-password").await;
        let got = run.transfers.first().map(|t| t.status);
        assert_eq!(got, Some(401), "[{}] wrong password from {from}: {run:?}\n{}", self.engine, line.raw);
        assert_eq!(line.get("ntlm_result"), Some("denied"), "[{}] {}", self.engine, line.raw);
    }

    /// A connection the guard closes, seen by the raw client (which tells a 403 from a
    /// closed connection); the line ends `end=guard_blocked`.
    /// `answered`: a user block, whose AUTHENTICATE gets the proxy's 403; else an address
    /// block, closed before any response.
    async fn blocked(&mut self, from: IpAddr, creds: &Credentials<'_>, answered: bool) -> AccessLine {
        let addr = self.proxy.addr_of(ROUTE, QUICK).await;
        let mut c = within(QUICK, "connect", HttpConn::connect_from(from, addr)).await.expect("connect");
        let r = within(QUICK, "a blocked login", c.login("/whoami", creds)).await;
        let who = format!("[{}] {}\\{} from {from}", self.engine, creds.domain, creds.user);
        if answered {
            let r = r.unwrap_or_else(|e| panic!("{who} must get the guard's 403: {e:?}"));
            assert_eq!(r.status, 403, "{who}: {:?}", r.text());
            let rest = within(QUICK, "closed", c.wait_closed()).await;
            assert!(rest.as_ref().is_ok_and(|b| b.is_empty()), "{who}: closed after the 403: {rest:?}");
        } else {
            assert!(r.is_err(), "{who} must get no response: {r:?}");
        }
        self.conns += 1;
        let line = conn_line(self.proxy, self.conns).await;
        assert_eq!(
            line.get("client").and_then(|c| c.parse::<SocketAddr>().ok()).map(|c| c.ip()),
            Some(from),
            "{}",
            line.raw
        );
        assert_eq!(line.get("end"), Some("guard_blocked"), "[{}] {}", self.engine, line.raw);
        line
    }
}

/// After [`MAX_FAILURES`] denied logins from one address, its next connection is closed
/// before any backend connection, while another address and other users log in; after that
/// many denied logins for one user from several addresses, a login as that user from a
/// fresh address is closed before its AUTHENTICATE reaches the backend, while another user
/// logs in from that address. A reload (SIGHUP) that keeps the route keeps both blocks; the
/// counters agree with the access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_blocks_an_address_and_a_user_and_keeps_them_over_a_reload() {
    const BOB: Credentials<'static> = Credentials { domain: "EXAMPLE", user: "bob", password: "Bob-Pass-2" };
    const CAROL: Credentials<'static> = Credentials { domain: "EXAMPLE", user: "carol", password: "Carol-Pass-3" };
    let (a, b, fresh, later) = (loopback(2), loopback(3), loopback(20), loopback(21));
    // Dave's wrong passwords come from these, one each: no address reaches the limit.
    let sprayers: Vec<IpAddr> = (0..MAX_FAILURES as u8).map(|i| loopback(10 + i)).collect();
    for engine in harness::engines() {
        let backend = backend().await;
        let dir = TempDir::new("observe-guard");
        let path = dir.write("ntlm-splice.toml", &guard_config(&engine, backend.local_addr(), "5m"));
        let proxy = Proxy::start_config(&path).await;
        let m = metrics_addr(&proxy).await;
        let before = scrape(m).await;
        let mut clients = Clients { engine: &engine, proxy: &proxy, conns: 0 };

        // Client A fails once for each of three users: its address is blocked, no user is.
        for creds in [&ALICE, &BOB, &CAROL].into_iter().cycle().take(MAX_FAILURES) {
            clients.denied(a, creds).await;
        }
        let accepted = backend.connections_accepted();
        let line = clients.blocked(a, &DAVE, false).await;
        assert_eq!(line.get("backend"), Some("-"), "[{engine}] no backend for a blocked address: {}", line.raw);
        assert!(
            line.get("error").is_some_and(|e| ADDRESS_BLOCKED.iter().all(|s| e.contains(s))),
            "[{engine}] {}",
            line.raw
        );
        assert_login(&engine, &line, None);
        assert_eq!(backend.connections_accepted(), accepted, "[{engine}] the blocked address reached no backend");
        // Client B, and the users A tried, still log in.
        clients.ok(b, &ALICE).await;
        clients.ok(b, &BOB).await;

        // Dave fails from several addresses: dave is blocked, none of the addresses is.
        for &from in &sprayers {
            clients.denied(from, &DAVE).await;
        }
        let dave_authenticates = |b: &NtlmServer| b.logins().iter().filter(|l| l.user == DAVE.user).count();
        let seen = dave_authenticates(&backend);
        assert_eq!(seen, MAX_FAILURES, "[{engine}] dave's denied logins reached the backend");
        let line = clients.blocked(fresh, &DAVE, true).await;
        assert_login(&engine, &line, Some(("EXAMPLE\\dave", WORKSTATION, "blocked")));
        assert!(
            line.get("error").is_some_and(|e| e.contains("user")),
            "[{engine}] the error names the user block: {}",
            line.raw
        );
        assert_eq!(dave_authenticates(&backend), seen, "[{engine}] the blocked AUTHENTICATE never reached the backend");
        // curl as dave gets the 403 and stops there: one connection, no retry (when the
        // guard only closed the connection, curl retried on five new ones).
        let (run, line) = clients.login(fresh, &DAVE, DAVE.password).await;
        assert_eq!(run.transfers.first().map(|t| t.status), Some(403), "[{engine}] curl as dave: {run:?}");
        assert_eq!(line.get("ntlm_result"), Some("blocked"), "[{engine}] {}", line.raw);
        // Another user from that same fresh address, and a sprayer address, log in.
        clients.ok(fresh, &CAROL).await;
        clients.ok(sprayers[0], &ALICE).await;

        // A reload that keeps the route (with another window) keeps both blocks.
        dir.write("ntlm-splice.toml", &guard_config(&engine, backend.local_addr(), "6m"));
        proxy.reload(QUICK).await.unwrap_or_else(|l| panic!("[{engine}] the reload was rejected: {l}"));
        let line = clients.blocked(a, &CAROL, false).await;
        assert_eq!(line.get("backend"), Some("-"), "[{engine}] after the reload: {}", line.raw);
        let line = clients.blocked(later, &DAVE, true).await;
        assert_eq!(line.get("ntlm_result"), Some("blocked"), "[{engine}] after the reload: {}", line.raw);
        assert_eq!(dave_authenticates(&backend), seen, "[{engine}] after the reload");
        clients.ok(b, &CAROL).await;

        let lines = all_lines(&engine, &proxy, clients.conns).await;
        let after = scrape(m).await;
        assert_counters_match(&engine, ROUTE, &before, &after, &lines);
        stop(&engine, proxy).await;
    }
}

/// With a guard, a denied login does not hand the connection to the engine: the client may
/// try again on it, and that login is judged (and counted) too; a connection whose last
/// login was denied is closed, not handed over unwatched, when the observer has to stop
/// (here: bytes that are not HTTP), so that a client cannot keep one connection and try
/// passwords through the engine unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_connection_is_watched_on_and_never_handed_over_unwatched() {
    let wrong = Credentials { password: "a-wrong-password", ..ALICE };
    for engine in harness::engines() {
        let backend = backend().await;
        let dir = TempDir::new("observe-unwatched");
        let path = dir.write("ntlm-splice.toml", &guard_config(&engine, backend.local_addr(), "5m"));
        let proxy = Proxy::start_config(&path).await;
        let m = metrics_addr(&proxy).await;
        let before = scrape(m).await;
        let addr = proxy.addr_of(ROUTE, QUICK).await;

        // A wrong password, then the right one, on one connection: both reach the backend.
        let mut c = within(QUICK, "connect", HttpConn::connect_from(loopback(30), addr)).await.expect("connect");
        let r = within(QUICK, "wrong password", c.login("/whoami", &wrong)).await.expect("login");
        assert_eq!(r.status, 401, "[{engine}] wrong password");
        let r = within(QUICK, "right password", c.login("/whoami", &ALICE)).await.expect("login");
        assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"), "[{engine}] second try");
        let rest = within(QUICK, "close", c.finish()).await.expect("close");
        assert!(rest.is_empty(), "[{engine}] {rest:?}");
        let line = conn_line(&proxy, 1).await;
        assert_login(&engine, &line, Some(("EXAMPLE\\alice", WORKSTATION, "ok")));
        let tries: Vec<bool> = backend.logins().iter().map(|l| l.ok).collect();
        assert_eq!(tries, [false, true], "[{engine}] the backend saw both tries");

        // A wrong password, then bytes the observer cannot follow: closed by the guard.
        let mut c = within(QUICK, "connect", HttpConn::connect_from(loopback(31), addr)).await.expect("connect");
        let r = within(QUICK, "wrong password", c.login("/whoami", &wrong)).await.expect("login");
        assert_eq!(r.status, 401, "[{engine}] wrong password");
        let closed = within(QUICK, "closed", c.raw_exchange(b"\x16\x03\x01 not HTTP\r\n\r\n")).await;
        assert!(closed.is_ok(), "[{engine}] the proxy closes the connection: {closed:?}");
        let line = conn_line(&proxy, 2).await;
        assert_eq!(line.get("end"), Some("guard_blocked"), "[{engine}] {}", line.raw);
        assert!(line.get("error").is_some_and(|e| e.contains("last login was denied")), "[{engine}] {}", line.raw);
        assert_login(&engine, &line, Some(("EXAMPLE\\alice", WORKSTATION, "denied")));

        let after = scrape(m).await;
        let d = |series: String| delta(&before, &after, &series);
        let logins = |r: &str| d(format!("ntlm_splice_ntlm_logins_total{{route=\"{ROUTE}\",result=\"{r}\"}}"));
        assert_eq!((logins("ok"), logins("denied")), (1.0, 2.0), "[{engine}] every try counted");
        let blocks = |r: &str| d(format!("ntlm_splice_guard_blocks_total{{route=\"{ROUTE}\",reason=\"{r}\"}}"));
        assert_eq!((blocks("unwatched"), blocks("address"), blocks("user")), (1.0, 0.0, 0.0), "[{engine}]");
        stop(&engine, proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 4. No secret in any log line
// ---------------------------------------------------------------------------------------

/// The NTLM tokens of curl's `-v` output: the value after the scheme of each
/// `Authorization:` it sent and `WWW-Authenticate:` it received.
fn curl_tokens(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("> ").or_else(|| l.strip_prefix("< "))?;
            let (name, value) = l.split_once(':')?;
            let header = name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("www-authenticate");
            let (_scheme, token) = value.trim().split_once(' ')?;
            (header && !token.trim().is_empty()).then(|| token.trim().to_string())
        })
        .collect()
}

/// With every module at trace level, logins that succeed and fail leave no password, no
/// token of an `Authorization` or `WWW-Authenticate` header, and no NTLM message (raw,
/// base64, hex or as a byte list) in any line the proxy writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log() {
    let wrong = "Wrong-Pass-9";
    for engine in harness::engines() {
        let (_backend, mut proxy, _m) = setup(&engine, Some("trace")).await;
        let whoami = url(proxy.addr(), "/whoami");
        let mut tokens = Vec::new();
        for (password, status) in [(ALICE.password, 200), (wrong, 401)] {
            let opts = CurlOptions { auth: Some(("EXAMPLE\\alice", password)), interface: None, verbose: true };
            let run = curl_run(&opts, std::slice::from_ref(&whoami)).await;
            assert_eq!(run.transfers.first().map(|t| t.status), Some(status), "[{engine}] {run:?}");
            let seen = curl_tokens(&run.stderr);
            // NEGOTIATE, CHALLENGE and AUTHENTICATE, at least.
            assert!(seen.len() >= 3, "[{engine}] curl -v shows the handshake's tokens: {}", run.stderr);
            tokens.extend(seen);
        }
        let r = requests_ntlm(&whoami, "EXAMPLE\\bob", "Bob-Pass-2", 1).await;
        assert_eq!(r[0].status, 200, "[{engine}] requests-ntlm as bob");
        all_lines(&engine, &proxy, 3).await;
        // Stopped, and its output read to the end: the log is whole.
        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit().await;
        assert!(status.success(), "[{engine}] ntlm-splice exited with {status}");
        let mut secrets: Vec<String> = vec![
            ALICE.password.into(),
            "Bob-Pass-2".into(),
            wrong.into(),
            "NTLMSSP".into(),
            "TlRMTVNT".into(),
            "4e544c4d53535000".into(),
            "4E544C4D53535000".into(),
            "78, 84, 76, 77, 83, 83, 80".into(),
        ];
        secrets.extend(tokens);
        check_no_secret(&engine, &proxy.logs(), &secrets);
    }
}

/// Panics naming the first log line that holds one of `secrets`; checks first that the log
/// is at trace or debug level (so that there was something to leak from).
fn check_no_secret(engine: &str, log: &str, secrets: &[String]) {
    assert!(
        log.lines().any(|l| l.contains("level=debug") || l.contains("level=trace")),
        "[{engine}] the proxy logged at debug/trace level:\n{log}"
    );
    for line in log.lines() {
        for s in secrets {
            assert!(!line.contains(s.as_str()), "[{engine}] a secret ({s:.12}...) in the log line: {line}");
        }
    }
}

#[test]
fn curl_tokens_and_escaping() {
    let stderr = "> GET / HTTP/1.1\n> Authorization: NTLM TlRMTVNTUAABAAAA\n< HTTP/1.1 401\n< WWW-Authenticate: NTLM\n< WWW-Authenticate: NTLM TlRMTVNTUAACAAAA\n* done\n";
    assert_eq!(curl_tokens(stderr), ["TlRMTVNTUAABAAAA", "TlRMTVNTUAACAAAA"]);
    assert_eq!(escaped("WS\"1\\x\n%"), "WS%221%5Cx%0A%25");
    assert_eq!(account("", "bob"), "bob");
}
