//! Live upgrade (issue 19, docs/upgrade.md): `ntlm-splice upgrade --pid PID` starts the binary
//! again and hands it the listening sockets and the live splice-engine connections.
//!
//! - 100 clients log in with NTLM and stay idle (some parked, some in their tasks); after
//!   the upgrade each sends another request on its connection and is served as itself with
//!   no new handshake at the backend and no reset; a client opening new connections
//!   throughout sees no refused or reset connect; a 256 MiB download running across the
//!   upgrade arrives byte-exact; the access log (both processes write to the same stderr)
//!   has exactly one line per connection. On the sockmap engine nothing moves: its
//!   connections are served to their end by the old process, which the same checks cover.
//! - A new binary that exits at start leaves the old process serving, and the command says
//!   why.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use ntlm_splice_tests::{
    harness::{self, Proxy, TempDir, within},
    ntlm::{Credentials, DEFAULT_DOMAIN, HttpConn, NtlmServer, demo_users},
};

/// Bound for quick steps.
const QUICK: Duration = Duration::from_secs(10);
/// Bound for the upgrade command (the old process waits up to 30 s for the new one, then
/// hands over for up to 10 s).
const UPGRADE: Duration = Duration::from_secs(60);
/// Clients that log in before the upgrade and come back after it.
const CLIENTS: usize = 100;
/// One download; they run back to back on one connection from before the upgrade to after
/// it, so that one is in flight when it happens.
const TRANSFER: u64 = 256 << 20;
/// Most downloads (they stop after the upgrade).
const TRANSFERS_MAX: u64 = 64;
/// Most connections the hammering client opens (it stops earlier, after the upgrade).
const HAMMER_MAX: u64 = 20_000;

const ALICE: Credentials<'static> = Credentials { domain: "EXAMPLE", user: "alice", password: "Alice-Pass-1" };

/// A process the test did not start itself (the new proxy, a child of the old one): killed
/// by its PID when dropped, also on panic.
struct Pid(u32);

impl Pid {
    fn alive(&self) -> bool {
        // A zombie (exited, not reaped by whoever inherited it) counts as gone.
        std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on the PID the old proxy named as its successor.
        unsafe { libc::kill(self.0 as i32, sig) };
    }

    /// SIGTERM, then waits (bounded) until it is gone.
    async fn stop(&self) {
        self.signal(libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while self.alive() {
            assert!(tokio::time::Instant::now() < deadline, "pid {} did not exit after SIGTERM", self.0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Pid {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(libc::SIGKILL);
        }
    }
}

/// Waits (bounded) for the old proxy to exit on its own after handing over.
async fn old_exits(proxy: &Proxy) {
    let old = Pid(proxy.pid());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while old.alive() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old proxy did not exit after the upgrade:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::mem::forget(old);
}

/// `ntlm-splice upgrade --pid PID [--binary PATH]`: (success, stdout and stderr).
async fn upgrade(pid: u32, binary: Option<&std::path::Path>) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(harness::bin());
    cmd.args(["upgrade", "--pid", &pid.to_string()]);
    if let Some(b) = binary {
        cmd.arg("--binary").arg(b);
    }
    let out = within(UPGRADE, "ntlm-splice upgrade", cmd.kill_on_drop(true).output()).await.expect("run upgrade");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The new process, by the pid the old one logged when it was ready (the log, not the
/// command's answer: a test that fails after the new process started must still kill it).
fn new_pid(proxy: &Proxy) -> Option<Pid> {
    let logs = proxy.logs();
    let line = logs.lines().find(|l| l.contains("upgrade: the new process pid=") && l.contains(" is ready"))?;
    let n = line.split("pid=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?;
    n.parse().ok().map(Pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_logins_survive_an_upgrade_without_a_new_handshake() {
    // 2s: half the clients park (idle longer than --park-after) before the upgrade, half are
    // in their tasks; 0: none parks by itself, so each moves only because the hand-over
    // asked its relay to stop at a quiet moment.
    for (engine, park_after) in harness::engines().into_iter().flat_map(|e| [(e.clone(), "2s"), (e, "0")]) {
        let engine = format!("{engine}, --park-after {park_after}");
        let engine_name = engine.split(',').next().unwrap().to_string();
        let backend = NtlmServer::start("127.0.0.1:0".parse().unwrap(), DEFAULT_DOMAIN, demo_users()).await.unwrap();
        let proxy = Proxy::start(&engine_name, &[backend.local_addr()], &["--park-after", park_after]).await;
        let addr = proxy.addr();

        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            let mut c = within(QUICK, "connect", HttpConn::connect(addr)).await.expect("connect");
            let r = within(QUICK, "login", c.login("/whoami", &ALICE)).await.expect("login");
            assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"), "[{engine}] login {i}");
            clients.push(c);
            if i == CLIENTS / 2 && park_after != "0" {
                // The first half parks meanwhile.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
        let handshakes = backend.logins().len();
        assert_eq!(handshakes, CLIENTS, "[{engine}] one login per client");

        // The download: logged in, then 256 MiB checked as it arrives.
        let mut big = within(QUICK, "connect", HttpConn::connect(addr)).await.expect("connect");
        within(QUICK, "login", big.login("/whoami", &ALICE)).await.expect("login");
        let upgraded = Arc::new(AtomicBool::new(false));
        let transfer = tokio::spawn({
            let upgraded = upgraded.clone();
            async move {
                let mut done = 0u64;
                let mut after = 0;
                while after < 2 && done < TRANSFERS_MAX {
                    let was_upgraded = upgraded.load(Ordering::Relaxed);
                    let path = format!("/pattern?seed={done}&len={TRANSFER}");
                    let (status, v) = big.get_pattern(&path, done).await.expect("a download failed");
                    assert_eq!(status, 200);
                    v.assert_exact(TRANSFER, "a download across the upgrade");
                    done += 1;
                    after += usize::from(was_upgraded);
                }
                done
            }
        });

        // New connections throughout: each connects and gets its 401.
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let hammer = tokio::spawn({
            let (stop, opened) = (stop.clone(), opened.clone());
            async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) && opened.load(Ordering::Relaxed) < HAMMER_MAX {
                    opened.fetch_add(1, Ordering::Relaxed);
                    match tokio::time::timeout(QUICK, async {
                        let mut c = HttpConn::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
                        c.get("/").await.map_err(|e| format!("GET: {e}"))
                    })
                    .await
                    {
                        Ok(Ok(r)) if r.status == 401 => {}
                        Ok(Ok(r)) => failures.push(format!("status {}", r.status)),
                        Ok(Err(e)) => failures.push(e),
                        Err(_) => failures.push("timed out".into()),
                    }
                }
                failures
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;

        let (ok, text) = upgrade(proxy.pid(), None).await;
        upgraded.store(true, Ordering::Relaxed);
        if ok {
            proxy.wait_for_log(" is ready; this one stops accepting", QUICK).await;
        }
        let new = new_pid(&proxy);
        assert!(ok, "[{engine}] upgrade failed: {text}\n{}", proxy.logs());
        let new = new.expect("the new process's pid in the log");
        if engine_name == "splice" {
            // Every idle client moved (the download may have moved, or drains).
            let moved: usize = text.split("moved=").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap();
            assert!(moved >= CLIENTS, "[{engine}] only {moved} connections moved: {text}");
        }

        // Every client again, on its own connection: served as itself, no new handshake.
        for (i, c) in clients.iter_mut().enumerate() {
            let r = within(QUICK, "request after the upgrade", c.get("/whoami"))
                .await
                .unwrap_or_else(|e| panic!("[{engine}] client {i} after the upgrade: {e}\n{}", proxy.logs()));
            assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"), "[{engine}] client {i}");
        }
        assert_eq!(backend.logins().len(), handshakes + 1, "[{engine}] new handshakes after the upgrade");

        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let failures = within(QUICK, "hammer", hammer).await.unwrap();
        assert!(failures.is_empty(), "[{engine}] new connections failed across the upgrade: {failures:?}");
        let downloads = within(Duration::from_secs(120), "the downloads", transfer).await.unwrap();
        eprintln!("[{engine}] {downloads} downloads of {TRANSFER} bytes, byte-exact; upgrade: {text}");

        // What each client moved, to find in its one access line (counted across both processes).
        let counts: Vec<(String, u64, u64)> =
            clients.iter().map(|c| (c.local_addr().unwrap().to_string(), c.bytes_sent(), c.bytes_received())).collect();
        drop(clients);
        old_exits(&proxy).await;
        new.stop().await;
        let lines = proxy.access_lines();
        let mut per_id: HashMap<u64, usize> = HashMap::new();
        for l in &lines {
            *per_id.entry(l.num("conn")).or_default() += 1;
        }
        let twice: Vec<_> = per_id.iter().filter(|&(_, &n)| n != 1).collect();
        assert!(twice.is_empty(), "[{engine}] connections logged more than once: {twice:?}");
        for (client, up, down) in &counts {
            let l = lines.iter().find(|l| l.get("client") == Some(client.as_str())).expect("the client's line");
            let logged = (l.num("bytes_up"), l.num("bytes_down"));
            assert_eq!(logged, (*up, *down), "[{engine}] bytes of {client} across the upgrade: {}", l.raw);
            // The login the observer saw before the upgrade, carried to the process that logs it.
            let login = (l.get("ntlm_user").is_some_and(|u| u.contains("alice")), l.get("ntlm_result"));
            assert_eq!(login, (true, Some("ok")), "[{engine}] the login of {client}: {}", l.raw);
        }
        let total = CLIENTS as u64 + 1 + opened.load(Ordering::Relaxed);
        assert_eq!(lines.len() as u64, total, "[{engine}] one access line per connection:\n{}", proxy.logs());
    }
}

#[tokio::test]
async fn a_new_binary_that_exits_at_start_leaves_the_old_one_serving() {
    let backend = NtlmServer::start("127.0.0.1:0".parse().unwrap(), DEFAULT_DOMAIN, demo_users()).await.unwrap();
    let proxy = Proxy::start("splice", &[backend.local_addr()], &[]).await;
    let mut before = within(QUICK, "connect", HttpConn::connect(proxy.addr())).await.expect("connect");
    within(QUICK, "login", before.login("/whoami", &ALICE)).await.expect("login");

    let dir = TempDir::new("upgrade");
    let script = dir.write("broken-ntlm-splice", "#!/bin/sh\necho 'cannot start' >&2\nexit 3\n");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ok, text) = upgrade(proxy.pid(), Some(&script)).await;
    assert!(!ok, "the upgrade to a binary that exits reported success: {text}");
    assert!(text.contains("exit status: 3") && text.contains("goes on serving"), "{text}");
    proxy.wait_for_log("upgrade: failed, this process goes on serving", QUICK).await;

    // The old connection and new ones are served.
    let r = within(QUICK, "request", before.get("/whoami")).await.expect("the old connection");
    assert_eq!(r.status, 200);
    let mut after = within(QUICK, "connect", HttpConn::connect(proxy.addr())).await.expect("connect after");
    assert_eq!(within(QUICK, "GET", after.get("/")).await.expect("GET").status, 401);
    drop((before, after));
    harness::stop_ok(proxy).await;
}

/// After `--user` the new binary would start without the privileges the old one gave up:
/// the upgrade is refused, saying so, and the proxy serves on.
#[tokio::test]
async fn an_upgrade_after_dropping_privileges_is_refused_with_the_reason() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED an_upgrade_after_dropping_privileges_is_refused_with_the_reason: needs root (--user)");
        return;
    }
    let backend = NtlmServer::start("127.0.0.1:0".parse().unwrap(), DEFAULT_DOMAIN, demo_users()).await.unwrap();
    let proxy = Proxy::start("splice", &[backend.local_addr()], &["--user", "nobody"]).await;
    let (ok, text) = upgrade(proxy.pid(), None).await;
    assert!(!ok, "an upgrade after --user reported success: {text}");
    assert!(text.contains("privileges were dropped") && text.contains("restart"), "{text}");
    let mut c = within(QUICK, "connect", HttpConn::connect(proxy.addr())).await.expect("connect after");
    assert_eq!(within(QUICK, "GET", c.get("/")).await.expect("GET").status, 401);
    drop(c);
    harness::stop_ok(proxy).await;
}

/// A restart through the hand-over: the configuration file now asks for another engine
/// (which a reload cannot apply); the upgrade to the same binary applies it, and the logged-in
/// connections go on, on the new process, without a new handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_another_engine_keeps_the_logins() {
    let engines = harness::engines();
    let Some(next) = engines.iter().find(|e| *e != "splice") else {
        eprintln!("SKIPPED a_restart_with_another_engine_keeps_the_logins: only the splice engine here");
        return;
    };
    let backend = NtlmServer::start("127.0.0.1:0".parse().unwrap(), DEFAULT_DOMAIN, demo_users()).await.unwrap();
    let dir = TempDir::new("upgrade-restart");
    let route = harness::config_route("web", &["127.0.0.1:0"], &[backend.local_addr()], "");
    let path = dir.write("proxy.toml", &(harness::config_head("splice") + &route));
    let proxy = Proxy::start_config(&path).await;
    let addr = proxy.addr();
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = within(QUICK, "connect", HttpConn::connect(addr)).await.expect("connect");
        assert_eq!(within(QUICK, "login", c.login("/whoami", &ALICE)).await.expect("login").status, 200);
        clients.push(c);
    }
    let handshakes = backend.logins().len();
    dir.write("proxy.toml", &(harness::config_head(next) + &route));
    let (ok, text) = upgrade(proxy.pid(), None).await;
    if ok {
        proxy.wait_for_log(" is ready; this one stops accepting", QUICK).await;
    }
    let new = new_pid(&proxy);
    assert!(ok, "upgrade failed: {text}\n{}", proxy.logs());
    let new = new.expect("the new process's pid in the log");
    proxy.wait_for_log(&format!("route=web engine={next}"), QUICK).await;
    for (i, c) in clients.iter_mut().enumerate() {
        let r = within(QUICK, "request after the restart", c.get("/whoami")).await.expect("request");
        assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"), "client {i}");
    }
    assert_eq!(backend.logins().len(), handshakes, "new handshakes after the restart");
    let mut fresh = within(QUICK, "connect", HttpConn::connect(addr)).await.expect("connect after");
    assert_eq!(within(QUICK, "login", fresh.login("/whoami", &ALICE)).await.expect("login").status, 200);
    drop((clients, fresh));
    old_exits(&proxy).await;
    new.stop().await;
    let lines = proxy.access_lines();
    assert_eq!(lines.len(), 11, "one line per connection:\n{}", proxy.logs());
    // The moved ones (ids 1-10) must end on the new engine. Not the fresh connection (id 11):
    // its client closes right after the login, and a sockmap route carries a connection whose
    // client half-closed before insertion on splice (by design, see README), so it may say
    // either.
    let fresh_id = 11.to_string();
    let moved: Vec<_> = lines.iter().filter(|l| l.get("conn") != Some(fresh_id.as_str())).collect();
    assert_eq!(moved.len(), 10, "the moved connections' lines:\n{}", proxy.logs());
    let moved_on = moved.iter().filter(|l| l.get("engine") == Some(next.as_str())).count();
    assert_eq!(moved_on, 10, "every moved connection ended on the new engine:\n{}", proxy.logs());
}

/// A new binary that starts but never says it is ready: the old process serves throughout
/// the wait, then kills it and serves on (this test waits for the 30 s ready timeout).
#[tokio::test]
async fn a_new_binary_that_never_gets_ready_is_killed_and_the_old_one_serves_on() {
    let backend = NtlmServer::start("127.0.0.1:0".parse().unwrap(), DEFAULT_DOMAIN, demo_users()).await.unwrap();
    let proxy = Proxy::start("splice", &[backend.local_addr()], &[]).await;
    let dir = TempDir::new("upgrade-hang");
    // `exec`: the process the old proxy started is the sleep, which it must kill.
    let script = dir.write("hanging-ntlm-splice", "#!/bin/sh\nexec sleep 300\n");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pid = proxy.pid();
    let asked = tokio::spawn(async move { upgrade(pid, Some(&script)).await });
    proxy.wait_for_log("upgrade: starting", QUICK).await;
    // Served while it waits.
    let mut c = within(QUICK, "connect", HttpConn::connect(proxy.addr())).await.expect("connect while waiting");
    assert_eq!(within(QUICK, "GET", c.get("/")).await.expect("GET").status, 401);
    let (ok, text) = within(UPGRADE, "the upgrade command", asked).await.unwrap();
    assert!(!ok && text.contains("no ready message within") && text.contains("killed"), "{text}");
    assert_eq!(within(QUICK, "GET", c.get("/")).await.expect("GET after").status, 401);
    drop(c);
    harness::stop_ok(proxy).await;
}
