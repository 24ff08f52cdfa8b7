//! NTLM through `ntlm-splice`, end to end, with real clients: `curl --ntlm` and Python
//! `requests-ntlm` (pyspnego) as subprocesses, plus the in-crate raw client where a test
//! must hold a connection open. The backend is `ntlm::NtlmServer`, which binds the NTLM
//! identity to the TCP connection exactly as IIS does, so any pooling, re-use or
//! splitting of backend connections by the proxy shows up as a wrong `whoami`, a 200 for
//! an anonymous client, or an endless 401.
//!
//! Every scenario runs once per engine in `harness::engines()`, each with its own
//! backend and proxy on 127.0.0.1 port 0.

use std::time::Duration;

use ntlm_splice_tests::{
    clients::{curl, requests_ntlm},
    harness::{self, AccessLine, Proxy, within},
    ntlm::{Credentials, DEFAULT_DOMAIN, HttpConn, NtlmServer, User, demo_users},
};
use tokio::task::JoinSet;

/// Bound for quick steps: a raw request, an access-log line.
const QUICK: Duration = Duration::from_secs(10);

const ALICE: Credentials<'static> = Credentials {
    domain: "EXAMPLE",
    user: "alice",
    password: "Alice-Pass-1",
};
const ALICE_BODY: &str = "EXAMPLE\\alice";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async fn backend(users: Vec<User>) -> NtlmServer {
    NtlmServer::start(
        "127.0.0.1:0".parse().expect("literal address"),
        DEFAULT_DOMAIN,
        users,
    )
    .await
    .unwrap_or_else(|e| panic!("cannot start the NTLM backend: {e}"))
}

/// A fresh backend and a proxy in front of it.
async fn setup(engine: &str, users: Vec<User>) -> (NtlmServer, Proxy) {
    let backend = backend(users).await;
    let proxy = Proxy::start(engine, &[backend.local_addr()], &[]).await;
    (backend, proxy)
}

fn url(proxy: &Proxy, path: &str) -> String {
    format!("http://{}{path}", proxy.addr())
}

/// Stops the proxy (SIGTERM) and checks it exited cleanly.
async fn stop(engine: &str, proxy: Proxy) {
    let logs = proxy.logs();
    let status = proxy.stop().await;
    assert!(
        status.success(),
        "[{engine}] ntlm-splice exited with {status}:\n{logs}"
    );
}

/// Waits for the access lines of the proxy's connections 1..=n, then checks there are
/// exactly `n` lines in all.
async fn access_lines(engine: &str, proxy: &Proxy, n: usize) -> Vec<AccessLine> {
    // `Proxy::wait_access_lines` locks the log twice (its predicate calls
    // `access_lines()` under the lock) and deadlocks, so wait for each connection id's
    // line through `wait_for_log` instead: the proxy numbers connections 1, 2, ...
    for id in 1..=n {
        proxy
            .wait_for_log(&format!(" access: conn={id} "), QUICK)
            .await;
    }
    let lines = proxy.access_lines();
    assert_eq!(
        lines.len(),
        n,
        "[{engine}] expected exactly {n} access lines (one per client connection):\n{}",
        proxy.logs()
    );
    for line in &lines {
        // The sockmap engine hands a client that half-closed before the pair went into the
        // map to the splice engine; with the NTLM observer reading the first exchange, a
        // client that sends one request and closes has half-closed by then.
        let handed_on = engine == "sockmap" && line.get("end") == Some("client_fin");
        let want: &[&str] = if handed_on { &["sockmap", "splice"] } else { &[engine] };
        assert!(
            line.get("engine").is_some_and(|e| want.contains(&e)),
            "[{engine}] access line names the engine: {}",
            line.raw
        );
    }
    lines
}

/// Awaits every task, re-raising the first panic with its own message.
async fn join_all<T: 'static>(mut set: JoinSet<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(res) = set.join_next().await {
        match res {
            Ok(v) => out.push(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("task failed: {e}"),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// 1. `curl --ntlm` logs in through the proxy and is served as alice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_ntlm_login() {
    for engine in harness::engines() {
        let (backend, proxy) = setup(&engine, demo_users()).await;
        let t = curl(
            Some(("EXAMPLE\\alice", "Alice-Pass-1")),
            &[url(&proxy, "/whoami")],
        )
        .await;
        assert_eq!(
            (t[0].status, t[0].body.as_str()),
            (200, ALICE_BODY),
            "[{engine}] curl --ntlm as alice"
        );

        let lines = access_lines(&engine, &proxy, 1).await;
        assert_eq!(
            lines[0].get("backend"),
            Some(backend.local_addr().to_string().as_str()),
            "{}",
            lines[0].raw
        );
        assert_eq!(
            backend.connections_accepted(),
            1,
            "[{engine}] the handshake used one backend connection"
        );
        stop(&engine, proxy).await;
    }
}

/// 2. A wrong password ends in 401, not in a loop and not in a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_wrong_password_gets_401() {
    for engine in harness::engines() {
        let (_backend, proxy) = setup(&engine, demo_users()).await;
        let t = curl(
            Some(("EXAMPLE\\alice", "Bob-Pass-2")),
            &[url(&proxy, "/whoami")],
        )
        .await;
        assert_eq!(t[0].status, 401, "[{engine}] wrong password: {t:?}");
        assert_ne!(t[0].body, ALICE_BODY);
        let t = curl(
            Some(("EXAMPLE\\mallory", "Alice-Pass-1")),
            &[url(&proxy, "/whoami")],
        )
        .await;
        assert_eq!(t[0].status, 401, "[{engine}] unknown user: {t:?}");
        access_lines(&engine, &proxy, 2).await;
        stop(&engine, proxy).await;
    }
}

/// 3. Several requests on one kept-alive connection: one handshake, one backend
///    connection, one access line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keep_alive_reuses_one_paired_connection() {
    for engine in harness::engines() {
        let (backend, proxy) = setup(&engine, demo_users()).await;
        let urls = [
            url(&proxy, "/whoami"),
            url(&proxy, "/"),
            url(&proxy, "/whoami?n=3"),
            url(&proxy, "/whoami"),
        ];
        let transfers = curl(Some(("EXAMPLE\\alice", "Alice-Pass-1")), &urls).await;
        for (i, t) in transfers.iter().enumerate() {
            assert_eq!(
                (t.status, t.body.as_str()),
                (200, ALICE_BODY),
                "[{engine}] request {i}: {transfers:?}"
            );
            let expected_connects = u32::from(i == 0);
            assert_eq!(
                t.connects, expected_connects,
                "[{engine}] curl re-used its connection: {transfers:?}"
            );
        }
        assert_eq!(
            backend.connections_accepted(),
            1,
            "[{engine}] exactly one backend connection for one curl run"
        );
        access_lines(&engine, &proxy, 1).await;
        stop(&engine, proxy).await;
    }
}

/// 4. 20 users log in at once, half with curl and half with requests-ntlm, each doing
///    several requests; each is always served as itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_users_each_see_only_themselves() {
    const USERS: usize = 20;
    const REQUESTS: usize = 4;
    let users: Vec<User> = (0..USERS)
        .map(|i| User::new(format!("user{i}"), format!("User{i}-Pass-{}", i * 7 + 3)))
        .collect();
    for engine in harness::engines() {
        let (backend, proxy) = setup(&engine, users.clone()).await;
        let mut set = JoinSet::new();
        for (i, user) in users.iter().cloned().enumerate() {
            let target = url(&proxy, "/whoami");
            let engine = engine.clone();
            set.spawn(async move {
                let expected = format!("EXAMPLE\\{}", user.name);
                let login = format!("EXAMPLE\\{}", user.name);
                let results: Vec<(u16, String)> = if i % 2 == 0 {
                    let urls = vec![target; REQUESTS];
                    curl(Some((&login, &user.password)), &urls)
                        .await
                        .into_iter()
                        .map(|t| (t.status, t.body))
                        .collect()
                } else {
                    requests_ntlm(&target, &login, &user.password, REQUESTS)
                        .await
                        .into_iter()
                        .map(|r| (r.status, r.body))
                        .collect()
                };
                for (n, (status, body)) in results.iter().enumerate() {
                    assert_eq!(
                        (*status, body.as_str()),
                        (200, expected.as_str()),
                        "[{engine}] {} request {n} was served as someone else: {results:?}",
                        user.name
                    );
                }
            });
        }
        join_all(set).await;
        // Each client kept one connection for its whole session: 20 client connections,
        // 20 backend connections, 20 access lines.
        access_lines(&engine, &proxy, USERS).await;
        assert_eq!(
            backend.connections_accepted(),
            USERS as u64,
            "[{engine}] one backend connection per client"
        );
        stop(&engine, proxy).await;
    }
}

/// 5. The security property: while alice's authenticated connection sits idle, no other
///    client connection - new or kept-alive, curl or raw - is ever served as alice (or
///    at all); afterwards alice's connection is still alice without a new handshake.
///    Backend connections equal client connections: 1:1, never pooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_authenticated_connection_never_leaks_its_identity() {
    const CURL_CLIENTS: usize = 8;
    const RAW_CLIENTS: usize = 12;
    const KEPT_ALIVE_CLIENTS: usize = 6;
    const REQUESTS_PER_KEPT_ALIVE: usize = 5;
    for engine in harness::engines() {
        // Both engines park idle connections (--park-after): here alice's waits parked, out of
        // its task and the runtime (sockmap: still in the maps), while the others come and go.
        let parks = true;
        let backend = backend(demo_users()).await;
        let extra = ["--park-after", "100ms"];
        let proxy = Proxy::start_with_log(&engine, &[backend.local_addr()], &extra, harness::PARK_LOG).await;
        let addr = proxy.addr();

        let mut alice = within(QUICK, "connect alice", HttpConn::connect(addr))
            .await
            .expect("connect alice");
        let r = within(QUICK, "alice login", alice.login("/whoami", &ALICE))
            .await
            .expect("alice login");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "EXAMPLE\\alice\n"),
            "[{engine}] alice login"
        );
        let mut client_connections = 1u64;
        if parks {
            // Alice's is the proxy's first connection.
            proxy.wait_for_log("conn=1 parked", QUICK).await;
        }

        let mut set = JoinSet::new();
        // New connections with curl, no credentials: one request, and one kept-alive run
        // of several URLs.
        for i in 0..CURL_CLIENTS {
            let urls = if i == 0 {
                vec![url(&proxy, "/whoami"); 4]
            } else {
                vec![url(&proxy, "/whoami")]
            };
            let engine = engine.clone();
            set.spawn(async move {
                for t in curl(None, &urls).await {
                    assert_eq!(t.status, 401, "[{engine}] anonymous curl got {t:?}");
                }
            });
        }
        // Raw new connections: a plain GET /whoami each.
        for i in 0..RAW_CLIENTS {
            let engine = engine.clone();
            set.spawn(async move {
                let mut conn = within(QUICK, "connect", HttpConn::connect(addr))
                    .await
                    .expect("connect");
                let path = if i % 2 == 0 { "/whoami" } else { "/" };
                let r = within(QUICK, "anonymous GET", conn.get(path))
                    .await
                    .expect("anonymous GET");
                assert_eq!(
                    r.status,
                    401,
                    "[{engine}] anonymous raw GET {path} got {} {:?}",
                    r.status,
                    r.text()
                );
            });
        }
        // Kept-alive raw connections sending several requests; one also fails a login.
        for i in 0..KEPT_ALIVE_CLIENTS {
            let engine = engine.clone();
            set.spawn(async move {
                let mut conn = within(QUICK, "connect", HttpConn::connect(addr))
                    .await
                    .expect("connect");
                if i == 0 {
                    let wrong = Credentials {
                        password: "Carol-Pass-3",
                        ..ALICE
                    };
                    let r = within(QUICK, "wrong login", conn.login("/whoami", &wrong))
                        .await
                        .expect("login");
                    assert_eq!(
                        r.status,
                        401,
                        "[{engine}] wrong password got {} {:?}",
                        r.status,
                        r.text()
                    );
                }
                for n in 0..REQUESTS_PER_KEPT_ALIVE {
                    let r = within(QUICK, "kept-alive GET", conn.get("/whoami"))
                        .await
                        .expect("kept-alive GET");
                    assert_eq!(
                        r.status,
                        401,
                        "[{engine}] kept-alive client {i} request {n} got {} {:?}",
                        r.status,
                        r.text()
                    );
                }
            });
        }
        client_connections += (CURL_CLIENTS + RAW_CLIENTS + KEPT_ALIVE_CLIENTS) as u64;
        // Meanwhile bob logs in on his own connection and is only ever bob.
        let bob_url = url(&proxy, "/whoami");
        let bob_engine = engine.clone();
        set.spawn(async move {
            for r in requests_ntlm(&bob_url, "EXAMPLE\\bob", "Bob-Pass-2", 3).await {
                assert_eq!(
                    (r.status, r.body.as_str()),
                    (200, "EXAMPLE\\bob"),
                    "[{bob_engine}] bob: {r:?}"
                );
            }
        });
        client_connections += 1;
        join_all(set).await;

        // Alice's idle connection is still alice, with no Authorization header sent.
        for path in ["/whoami", "/"] {
            let r = within(QUICK, "alice again", alice.get(path))
                .await
                .expect("alice again");
            assert_eq!(
                (r.status, r.text().as_str()),
                (200, "EXAMPLE\\alice\n"),
                "[{engine}] alice's own connection"
            );
        }
        assert_eq!(
            backend.connections_accepted(),
            client_connections,
            "[{engine}] backend connections must equal client connections (1:1, never pooled)"
        );
        if parks {
            // The sockmap engine's kernel forwards alice's request before the wake event
            // brings her connection back: the line can trail the response.
            proxy.wait_for_log("conn=1 unparked", QUICK).await;
        }
        drop(alice);
        let lines = access_lines(&engine, &proxy, client_connections as usize).await;
        // Connection 1 (alice's, kept alive and idle) is carried by the route's engine itself.
        let first = lines.iter().find(|l| l.get("conn") == Some("1")).and_then(|l| l.get("engine"));
        assert_eq!(first, Some(engine.as_str()), "[{engine}] alice's connection");
        let backend_addr = backend.local_addr().to_string();
        assert!(
            lines
                .iter()
                .all(|l| l.get("backend") == Some(backend_addr.as_str())),
            "[{engine}] all paired"
        );
        stop(&engine, proxy).await;
    }
}

/// 6. Python requests-ntlm: one session, 5 requests, one handshake, all alice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_ntlm_session_through_the_proxy() {
    for engine in harness::engines() {
        let (backend, proxy) = setup(&engine, demo_users()).await;
        let responses =
            requests_ntlm(&url(&proxy, "/whoami"), "EXAMPLE\\alice", "Alice-Pass-1", 5).await;
        for (i, r) in responses.iter().enumerate() {
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, ALICE_BODY),
                "[{engine}] request {i}: {responses:?}"
            );
            assert_eq!(
                r.handshake,
                i == 0,
                "[{engine}] only the first request needs a handshake: {responses:?}"
            );
        }
        assert_eq!(
            backend.connections_accepted(),
            1,
            "[{engine}] the session kept one connection"
        );
        access_lines(&engine, &proxy, 1).await;
        stop(&engine, proxy).await;
    }
}
