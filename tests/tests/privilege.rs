//! Least privilege end to end (issue 18 item 1), through the real binary: started as root with
//! `--user`, every thread of the proxy runs as the test user with only the capabilities it
//! still needs, no_new_privs set, and both engines still serve an NTLM login and 256 MiB
//! byte-exact; a reload binds a new port below 1024 after the switch; a reload that first asks
//! for the sockmap engine is refused with the fix. Started as that user with ambient
//! capabilities (as systemd's AmbientCapabilities= or a container's cap_add would), it serves
//! too, and a live upgrade passes what it kept to the new process (refused with the sockmap
//! engine, which could not be loaded again). An unknown user, or a switch the process may not
//! make, stops it with the fix.
//!
//! Needs root: it runs the proxy as another user, and creates that user
//! (`ntlm-splice-test`, a system account without a home or shell) with useradd when missing.
//! Skipped, saying why, when not root. What each thread holds is read from
//! /proc/PID/task/*/status here, not through the proxy's own parser.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use ntlm_splice_tests::{
    harness::{self, Proxy, TempDir, config_head, config_route, connect, round_trip, stop_ok, within},
    ntlm::{DEFAULT_DOMAIN, NtlmServer, demo_users},
    servers::{self, Server},
};
use tokio::{io::AsyncWriteExt as _, process::Command};

/// The account the proxy switches to.
const TEST_USER: &str = "ntlm-splice-test";
/// Bound for quick steps: a connect, a reload, a login.
const QUICK: Duration = Duration::from_secs(20);
/// Bound for the 256 MiB transfer.
const BULK: Duration = Duration::from_secs(120);
/// Bytes each way through the bulk route.
const BULK_BYTES: u64 = 256 << 20;
/// What the NTLM backend answers `/whoami` with for alice.
const ALICE: (&str, &str, &str) = ("EXAMPLE\\alice", "Alice-Pass-1", "EXAMPLE\\alice");

// Capability numbers (linux/capability.h).
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

const fn bit(cap: u32) -> u64 {
    1 << cap
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this test can run; says why not otherwise.
fn privileged(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root (it runs the proxy as user {TEST_USER} and creates that user)");
        return false;
    }
    true
}

/// The test user's ids and groups (created with useradd when missing).
#[derive(Debug)]
struct Account {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

fn id(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("id").args(args).arg(TEST_USER).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn test_user() -> Account {
    if id(&["-u"]).is_none() {
        eprintln!("creating the system user {TEST_USER} (useradd --system --no-create-home)");
        let status = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER])
            .status()
            .unwrap_or_else(|e| panic!("cannot run useradd: {e}"));
        // Another test of this binary may have created it meanwhile (exit 9: it exists).
        assert!(status.success() || id(&["-u"]).is_some(), "useradd {TEST_USER} failed: {status}");
    }
    let num = |args: &[&str]| -> Vec<u32> {
        let text = id(args).unwrap_or_else(|| panic!("id {args:?} {TEST_USER} failed"));
        text.split_whitespace().map(|v| v.parse().unwrap_or_else(|e| panic!("id printed {v:?}: {e}"))).collect()
    };
    let mut groups = num(&["-G"]);
    groups.sort_unstable();
    Account { uid: num(&["-u"])[0], gid: num(&["-g"])[0], groups }
}

/// One thread's credentials, read from its status file.
#[derive(Debug)]
struct Task {
    tid: String,
    name: String,
    uids: Vec<u32>,
    gids: Vec<u32>,
    groups: Vec<u32>,
    inh: u64,
    prm: u64,
    eff: u64,
    bnd: u64,
    amb: u64,
    no_new_privs: bool,
}

fn tasks(pid: u32) -> Vec<Task> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let e = e.unwrap();
        let Ok(text) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let field = |k: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
                .unwrap_or_else(|| panic!("no {k} in {}/status", e.path().display()))
                .trim()
                .to_string()
        };
        let nums = |k: &str| -> Vec<u32> { field(k).split_whitespace().map(|v| v.parse().unwrap()).collect() };
        let hex = |k: &str| u64::from_str_radix(&field(k), 16).unwrap();
        let mut groups = nums("Groups");
        groups.sort_unstable();
        out.push(Task {
            tid: e.file_name().to_string_lossy().into_owned(),
            name: field("Name"),
            uids: nums("Uid"),
            gids: nums("Gid"),
            groups,
            inh: hex("CapInh"),
            prm: hex("CapPrm"),
            eff: hex("CapEff"),
            bnd: hex("CapBnd"),
            amb: hex("CapAmb"),
            no_new_privs: field("NoNewPrivs") == "1",
        });
    }
    out
}

/// What every thread must hold.
struct Want<'a> {
    user: &'a Account,
    /// Effective and permitted set.
    caps: u64,
    /// The bounding set, if the proxy could cut it.
    bounding: Option<u64>,
}

/// Checks every thread of `pid`; returns how many there are. Panics naming the thread and field.
fn check_tasks(pid: u32, want: &Want<'_>, what: &str) -> usize {
    let tasks = tasks(pid);
    assert!(
        tasks.iter().any(|t| t.name.starts_with("tokio-rt-worker")),
        "{what}: no tokio worker thread among {tasks:?}: the threads this test is about"
    );
    for t in &tasks {
        let at = format!("{what}: thread {} ({})", t.tid, t.name);
        assert_eq!(t.uids, vec![want.user.uid; 4], "{at}: Uid");
        assert_eq!(t.gids, vec![want.user.gid; 4], "{at}: Gid");
        assert_eq!(t.groups, want.user.groups, "{at}: Groups");
        assert_eq!(t.eff, want.caps, "{at}: CapEff {:#x}, want {:#x}", t.eff, want.caps);
        assert_eq!(t.prm, want.caps, "{at}: CapPrm {:#x}, want {:#x}", t.prm, want.caps);
        assert_eq!((t.inh, t.amb), (0, 0), "{at}: CapInh / CapAmb");
        if let Some(b) = want.bounding {
            assert_eq!(t.bnd, b, "{at}: CapBnd {:#x}, want {:#x}", t.bnd, b);
        }
        assert!(t.no_new_privs, "{at}: NoNewPrivs");
    }
    tasks.len()
}

/// What the proxy keeps after start for `engine` with the default `sockmap_sndbuf` (8 MiB):
/// CAP_NET_BIND_SERVICE (a reload may add a low port), and for sockmap CAP_NET_ADMIN only when
/// SO_SNDBUF cannot reach the send buffer (half of it above net.core.wmem_max).
fn kept(engine: &str) -> u64 {
    let wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_max").unwrap().trim().parse().unwrap();
    let sndbuf_default = 8u64 << 20;
    let force = engine == "sockmap" && sndbuf_default / 2 > wmem_max;
    bit(CAP_NET_BIND_SERVICE) | if force { bit(CAP_NET_ADMIN) } else { 0 }
}

/// A loopback address of this test process's own and a port below 1024 free on it now (the
/// kernel has no "any free privileged port": tried from 1023 down).
fn low_port_addr(salt: u8) -> SocketAddr {
    let pid = std::process::id();
    let ip = Ipv4Addr::new(127, 77 + salt, (pid >> 8) as u8, (pid as u8) | 1);
    for port in (600..1024).rev() {
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return SocketAddr::from((ip, port));
        }
    }
    panic!("no free port below 1024 on {ip}");
}

/// `curl --ntlm` for alice against `url`: (status, body).
async fn curl_ntlm(url: &str) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "15", "--ntlm", "-u"])
        .arg(format!("{}:{}", ALICE.0, ALICE.1))
        .args(["--write-out", "\n%{http_code}", url])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = within(QUICK, &format!("curl {url}"), cmd.output()).await.unwrap_or_else(|e| panic!("curl: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "curl {url}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let (body, code) = stdout.rsplit_once('\n').unwrap_or_else(|| panic!("curl printed {stdout:?}"));
    (code.parse().unwrap_or_else(|_| panic!("curl status {code:?}")), body.trim_end_matches('\n').to_string())
}

async fn ntlm_login(addr: SocketAddr, what: &str) {
    let (status, body) = curl_ntlm(&format!("http://{addr}/whoami")).await;
    assert_eq!((status, body.as_str()), (200, ALICE.2), "{what}: NTLM login through {addr}");
}

/// 256 MiB each way through an echo backend, checked byte for byte.
async fn bulk(addr: SocketAddr, what: &str) {
    let c = connect(addr).await;
    let (mut r, mut w) = c.into_split();
    let writer = tokio::spawn(async move {
        servers::send_pattern(&mut w, 18, BULK_BYTES).await?;
        w.shutdown().await
    });
    let v = within(BULK, &format!("{what}: 256 MiB echo"), servers::recv_pattern(&mut r, 18))
        .await
        .unwrap_or_else(|e| panic!("{what}: reading the echo: {e}"));
    within(QUICK, "the writer", writer).await.unwrap().unwrap_or_else(|e| panic!("{what}: writing: {e}"));
    v.assert_exact(BULK_BYTES, &format!("{what}: 256 MiB echoed"));
}

async fn backends() -> (NtlmServer, Server) {
    let ntlm = NtlmServer::start("127.0.0.1:0".parse().unwrap(), DEFAULT_DOMAIN, demo_users())
        .await
        .unwrap_or_else(|e| panic!("cannot start the NTLM backend: {e}"));
    (ntlm, Server::echo().await)
}

/// Started as root with `--user`: every thread switched and narrowed, both routes served, a
/// reload binds a port below 1024 as the user, and (splice) a reload asking for the sockmap
/// engine is refused with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_switch_keeps_only_what_is_needed_and_still_serves() {
    if !privileged("user_switch_keeps_only_what_is_needed_and_still_serves") {
        return;
    }
    let user = test_user();
    for engine in harness::engines() {
        let what = format!("[{engine}]");
        let (ntlm, echo) = backends().await;
        let dir = TempDir::new("privilege");
        let routes = config_route("ntlm", &["127.0.0.1:0"], &[ntlm.local_addr()], "")
            + &config_route("bulk", &["127.0.0.2:0"], &[echo.addr()], "");
        let path = dir.write("proxy.toml", &(config_head(&engine) + &routes));
        let args: Vec<String> = ["--config", path.to_str().unwrap(), "--user", TEST_USER].map(String::from).to_vec();
        let proxy = Proxy::start_args(&args).await;
        let ntlm_addr = proxy.addr_of("ntlm", QUICK).await;
        let bulk_addr = proxy.addr_of("bulk", QUICK).await;
        let want = Want { user: &user, caps: kept(&engine), bounding: Some(kept(&engine)) };
        let n = check_tasks(proxy.pid(), &want, &format!("{what} after start"));
        eprintln!("{what} {n} threads run as uid {} with CapEff {:#x}", user.uid, want.caps);

        ntlm_login(ntlm_addr, &what).await;
        bulk(bulk_addr, &what).await;

        // A reload that adds a listener on a port below 1024: CAP_NET_BIND_SERVICE was kept.
        let low = low_port_addr(0);
        let more = config_route("low", &[&low.to_string()], &[echo.addr()], "");
        dir.write("proxy.toml", &(config_head(&engine) + &routes + &more));
        let line = proxy.reload(QUICK).await.unwrap_or_else(|l| panic!("{what} reload with {low}: {l}"));
        assert!(line.contains(&format!("bound=[{low}]")), "{what}: {line}");
        let mut c = connect(low).await;
        round_trip(&mut c, b"through a low port bound after the switch", &what).await;
        drop(c);

        if engine == "splice" {
            // The sockmap engine was never loaded, and can no longer be: refused, with the fix.
            let sockmap_route = config_route("late", &["127.0.0.3:0"], &[echo.addr()], "engine = \"sockmap\"\n");
            dir.write("proxy.toml", &(config_head(&engine) + &routes + &more + &sockmap_route));
            let line = proxy.reload(QUICK).await.expect_err("a reload asking for sockmap after the switch");
            assert!(
                line.contains("sockmap engine is loaded only at start") && line.contains("restart the process"),
                "{what}: the refusal names the fix: {line}"
            );
        }
        check_tasks(proxy.pid(), &want, &format!("{what} after the reloads"));
        stop_ok(proxy).await;
    }
}

/// Started as the user itself with exactly the capabilities it needs as ambient ones (systemd
/// AmbientCapabilities=, a container's cap_add): it loads the engine, binds a port below 1024
/// at start, narrows to what serving needs, and serves an NTLM login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_capabilities_start_without_root() {
    if !privileged("ambient_capabilities_start_without_root") {
        return;
    }
    let user = test_user();
    for engine in harness::engines() {
        let what = format!("[{engine}] ambient");
        let (ntlm, _echo) = backends().await;
        let dir = TempDir::new("privilege-ambient");
        // A copy the test user may run, wherever the build is.
        let binary = dir.path().join("ntlm-splice");
        copy_binary(&binary);
        let low = low_port_addr(1);
        let path = dir.write(
            "proxy.toml",
            &(config_head(&engine) + &config_route("ntlm", &[&low.to_string()], &[ntlm.local_addr()], "")),
        );
        let mut caps = vec!["net_bind_service"];
        if engine == "sockmap" {
            caps.extend(["bpf", "net_admin", "perfmon"]);
        }
        let caps: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
        let (reuid, regid) = (format!("--reuid={}", user.uid), format!("--regid={}", user.gid));
        let (inh, amb) = (format!("--inh-caps={}", caps.join(",")), format!("--ambient-caps={}", caps.join(",")));
        let wrapper = ["setpriv", &reuid, &regid, "--init-groups", &inh, &amb];
        let args: Vec<String> = ["--config", path.to_str().unwrap()].map(String::from).to_vec();
        let proxy = Proxy::start_wrapped(&wrapper, Some(&binary), &args).await;
        assert_eq!(proxy.addr(), low, "{what}: listening on the low port from the start");
        // No CAP_SETPCAP: the bounding set stays as it was; no CAP_BPF/CAP_PERFMON once loaded.
        let want = Want { user: &user, caps: kept(&engine), bounding: None };
        check_tasks(proxy.pid(), &want, &what);
        for t in tasks(proxy.pid()) {
            assert_eq!(t.eff & (bit(CAP_BPF) | bit(CAP_PERFMON)), 0, "{what}: thread {} kept BPF caps", t.tid);
        }
        if engine == "sockmap" {
            assert!(proxy.logs().contains("self-test passed"), "{what}: loaded as a user:\n{}", proxy.logs());
        }
        ntlm_login(low, &what).await;
        stop_ok(proxy).await;
    }
}

/// A process this test did not start itself (the proxy's successor after an upgrade): killed
/// by its PID when dropped, also on panic.
struct Successor(u32);

impl Drop for Successor {
    fn drop(&mut self) {
        // SAFETY: plain syscall on the PID the old proxy named as its successor.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

/// A live upgrade of a proxy started as the user with ambient capabilities (as the systemd
/// unit starts it): the new process gets what the old one kept (CAP_NET_BIND_SERVICE, passed
/// on as ambient) and nothing else, runs as the same user, serves the kept NTLM connection
/// as itself with no new handshake, and a reload in it binds another port below 1024 (what
/// the capability is kept for). With the sockmap engine the upgrade is refused with the
/// reason (loading it needs what the process gave up), and the same process serves on.
#[tokio::test]
async fn an_upgrade_started_with_ambient_capabilities_passes_them_on() {
    use ntlm_splice_tests::ntlm::{Credentials, HttpConn};
    if !privileged("an_upgrade_started_with_ambient_capabilities_passes_them_on") {
        return;
    }
    let user = test_user();
    let alice = Credentials { domain: "EXAMPLE", user: "alice", password: ALICE.1 };
    for engine in harness::engines() {
        let what = format!("[{engine}] upgrade, ambient");
        let (ntlm, _echo) = backends().await;
        let dir = TempDir::new("privilege-upgrade");
        let binary = dir.path().join("ntlm-splice");
        copy_binary(&binary);
        let low = low_port_addr(3);
        let route = |listen: &[&str]| config_head(&engine) + &config_route("ntlm", listen, &[ntlm.local_addr()], "");
        let path = dir.write("proxy.toml", &route(&[&low.to_string()]));
        let mut caps = vec!["net_bind_service"];
        if engine == "sockmap" {
            caps.extend(["bpf", "net_admin", "perfmon"]);
        }
        let caps: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
        let (reuid, regid) = (format!("--reuid={}", user.uid), format!("--regid={}", user.gid));
        let (inh, amb) = (format!("--inh-caps={}", caps.join(",")), format!("--ambient-caps={}", caps.join(",")));
        let wrapper = ["setpriv", &reuid, &regid, "--init-groups", &inh, &amb];
        let args: Vec<String> = ["--config", path.to_str().unwrap()].map(String::from).to_vec();
        let proxy = Proxy::start_wrapped(&wrapper, Some(&binary), &args).await;
        let mut conn = within(QUICK, "connect", HttpConn::connect(low)).await.expect("connect");
        let r = within(QUICK, "login", conn.login("/whoami", &alice)).await.expect("login");
        assert_eq!((r.status, r.text().trim()), (200, ALICE.2), "{what}: login on the kept connection");

        let out = Command::new(harness::bin())
            .args(["upgrade", "--pid", &proxy.pid().to_string()])
            .kill_on_drop(true)
            .output();
        let out = within(Duration::from_secs(60), "ntlm-splice upgrade", out).await.expect("run upgrade");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let logs = proxy.logs();
        let new = logs
            .lines()
            .find(|l| l.contains("upgrade: the new process pid=") && l.contains(" is ready"))
            .and_then(|l| l.split("pid=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .map(Successor);
        if engine == "sockmap" {
            assert!(!out.status.success(), "{what}: reported success: {text}");
            assert!(text.contains("sockmap engine is loaded") && text.contains("restart"), "{what}: {text}");
            assert!(new.is_none(), "{what}: a new process started:\n{logs}");
            let r = within(QUICK, "request", conn.get("/whoami")).await.expect("the kept connection");
            assert_eq!((r.status, r.text().trim()), (200, ALICE.2), "{what}: the kept connection after the refusal");
            drop(conn);
            stop_ok(proxy).await;
            continue;
        }
        assert!(out.status.success(), "{what}: {text}\n{logs}");
        let new = new.expect("the new process's pid in the old one's log");
        check_tasks(new.0, &Want { user: &user, caps: kept(&engine), bounding: None }, &format!("{what}: new"));
        let r = within(QUICK, "request", conn.get("/whoami")).await.expect("the kept connection after the upgrade");
        assert_eq!((r.status, r.text().trim()), (200, ALICE.2), "{what}: the kept connection, no new handshake");
        assert_eq!(ntlm.logins().len(), 1, "{what}: one handshake at the backend");

        // A reload in the new process binds another port below 1024.
        let low2 = low_port_addr(4);
        dir.write("proxy.toml", &route(&[&low.to_string(), &low2.to_string()]));
        // SAFETY: plain syscall on the new proxy's PID.
        unsafe { libc::kill(new.0 as i32, libc::SIGHUP) };
        let bound = tokio::time::timeout(QUICK, async {
            loop {
                if std::net::TcpStream::connect(low2).is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(bound.is_ok(), "{what}: the new process did not bind {low2} on reload:\n{}", proxy.logs());
        ntlm_login(low2, &what).await;
        // The old process exited after the hand-over; the new one is killed as `new` drops.
        drop((conn, new, proxy));
    }
}

/// Copies the binary under test to `to`, where the test user may run it wherever the build
/// is. With cp(1): a write descriptor open in this process would be inherited by a child
/// another test forks meanwhile, and exec(2) of the copy would then fail with ETXTBSY.
fn copy_binary(to: &Path) {
    let status = std::process::Command::new("cp").arg(harness::bin()).arg(to).status().unwrap();
    assert!(status.success(), "cp {} {}: {status}", harness::bin().display(), to.display());
}

/// Runs the binary to its exit; returns (success, everything it printed).
async fn run_to_exit(wrapper: &[&str], binary: &Path, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(wrapper.first().copied().unwrap_or(binary.to_str().unwrap()));
    if !wrapper.is_empty() {
        cmd.args(&wrapper[1..]).arg(binary);
    }
    cmd.args(args).env("RUST_LOG", "info").stdin(Stdio::null()).kill_on_drop(true);
    let out = within(QUICK, &format!("{args:?}"), cmd.output()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// An unknown user stops the start before anything is served, naming useradd; a switch the
/// process may not make (a plain user asking for root) stops it naming the capabilities it
/// lacks and the other way to start.
#[tokio::test]
async fn impossible_switches_fail_with_the_fix() {
    if !privileged("impossible_switches_fail_with_the_fix") {
        return;
    }
    let user = test_user();
    let dir = TempDir::new("privilege-fail");
    let binary = dir.path().join("ntlm-splice");
    copy_binary(&binary);
    let base = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--engine", "splice"];

    let (ok, text) = run_to_exit(&[], &binary, &[&base[..], &["--user", "ntlm-splice-no-such-user"]].concat()).await;
    assert!(!ok, "an unknown user must stop the start:\n{text}");
    assert!(text.contains("\"ntlm-splice-no-such-user\" does not exist") && text.contains("useradd"), "{text}");
    assert!(!text.contains("listening addr="), "nothing is served:\n{text}");

    let (reuid, regid) = (format!("--reuid={}", user.uid), format!("--regid={}", user.gid));
    let wrapper = ["setpriv", &reuid, &regid, "--init-groups"];
    let (ok, text) = run_to_exit(&wrapper, &binary, &[&base[..], &["--user", "root"]].concat()).await;
    assert!(!ok, "a plain user cannot switch to root:\n{text}");
    assert!(
        text.contains("cannot switch to user \"root\"")
            && text.contains("lacks cap_setuid and cap_setgid")
            && text.contains("leave --user out"),
        "{text}"
    );
    assert!(!text.contains("listening addr="), "nothing is served:\n{text}");
}
