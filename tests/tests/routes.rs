//! Routes, end to end through the real binary and its config file (`--config FILE`), for
//! every engine this host supports (`harness::engines()`): several routes on their own ports,
//! reload on SIGHUP (live connections keep their backend; a bad file changes nothing; a kept
//! listener refuses no connect; added listeners accept and removed ones close), active and
//! passive health checks (TCP and HTTP), `ntlm-splice check`, the half-close timeout and a
//! route listening on IPv4 and IPv6 at once.
//!
//! Every test writes its config files to a fresh temporary directory. Listen addresses are
//! port 0: two routes on `127.0.0.1:0` would be one shared address to the config checker, so
//! routes are told apart by their loopback address (`127.0.0.1:0`, `127.0.0.2:0`, ...: all of
//! 127/8 is loopback on Linux), and a route's bound port is read back from the proxy's
//! `listening` line (`Proxy::addr_of`).

use std::{
    collections::HashSet,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ntlm_splice_tests::{
    harness::{
        self, AccessLine, Proxy, access_line, config_head as head, config_route as route, connect, stop_ok, within,
    },
    servers::{self, Server},
};
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc, watch},
};
use tokio_util::task::AbortOnDropHandle;

/// Bound for anything that should be quick: a connect, a round trip, a log line, a reload.
const QUICK: Duration = Duration::from_secs(10);
/// Bound for the 256 MiB transfer.
const BULK: Duration = Duration::from_secs(150);
/// Scheduling slack allowed on top of a timer the proxy is configured with: the time for a
/// probe or a timer to run and its effect to reach a socket or the log, on a shared 2-core CI
/// machine running these tests in parallel (quiet, it is a few milliseconds).
const SLACK: Duration = Duration::from_millis(1000);

/// Health check interval of the health tests.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
/// Passed checks in a row that mark a backend up, in the health tests.
const RISE: u32 = 2;
/// Failed checks in a row that mark a backend down, in the health tests.
const FALL: u32 = 2;

// ---------------------------------------------------------------------------------------
// Helpers: config files
// ---------------------------------------------------------------------------------------

/// A fresh temporary directory holding one test's config file; removed on drop.
struct ConfDir {
    dir: PathBuf,
}

/// Tells apart the directories of one test process.
static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl ConfDir {
    /// A new empty directory for test `test` on `engine`.
    fn new(test: &str, engine: &str) -> ConfDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ntlm-splice-routes-{}-{n}-{test}-{engine}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing the stale {}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        ConfDir { dir }
    }

    /// The config file's path.
    fn path(&self) -> PathBuf {
        self.dir.join("ntlm-splice.toml")
    }

    /// Writes the config file (replacing it whole: written aside, then renamed over it, so
    /// that a reload never reads half a file) and returns its path.
    fn write(&self, text: &str) -> PathBuf {
        let tmp = self.dir.join("ntlm-splice.toml.new");
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        std::fs::rename(&tmp, self.path()).unwrap_or_else(|e| panic!("renaming {}: {e}", tmp.display()));
        self.path()
    }
}

impl Drop for ConfDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// A `[route.health]` table with the health tests' timings; `http` is an extra line or "".
fn health(http: &str) -> String {
    format!(
        "[route.health]\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {RISE}\nfall = {FALL}\n{http}\n",
        HEALTH_INTERVAL.as_millis(),
        HEALTH_INTERVAL.as_millis()
    )
}

/// The 1-based number of the first line of `text` that starts with `prefix`.
fn line_no(text: &str, prefix: &str) -> usize {
    text.lines().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix:?} in:\n{text}")) + 1
}

// ---------------------------------------------------------------------------------------
// Helpers: clients and backends
// ---------------------------------------------------------------------------------------

/// A listening socket on `addr` with SO_REUSEADDR, so that a backend can be started again on
/// the port of one that was stopped while its connections linger.
fn listen_on(addr: SocketAddr) -> TcpListener {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .expect("backend socket");
    s.set_reuseaddr(true).expect("SO_REUSEADDR");
    s.bind(addr).unwrap_or_else(|e| panic!("bind backend {addr}: {e}"));
    s.listen(1024).expect("listen backend")
}

/// A loopback backend that greets every connection with its one-byte tag, then echoes; counts
/// the connections it accepts (health probes included). Dropping it stops accepting.
struct Tagged {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: AbortOnDropHandle<()>,
}

impl Tagged {
    /// Starts one on 127.0.0.1:0.
    async fn start(tag: u8) -> Tagged {
        Self::start_on("127.0.0.1:0".parse().unwrap(), tag).await
    }

    /// Starts one on `addr`.
    async fn start_on(addr: SocketAddr, tag: u8) -> Tagged {
        let l = listen_on(addr);
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    if w.write_all(&[tag]).await.is_err() {
                        return;
                    }
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        }));
        Tagged { addr, accepted, task }
    }

    /// Connections accepted so far.
    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops accepting; when this returns the listening socket is closed (connects to it are
    /// refused). Connections already accepted go on.
    async fn kill(mut self) {
        self.task.abort();
        let r = (&mut self.task).await;
        assert!(r.as_ref().is_err_and(|e| e.is_cancelled()), "the backend's accept loop ended by itself: {r:?}");
    }
}

/// One client exchange through the proxy with a [`Tagged`] backend: reads the greeting tag,
/// sends a byte and reads its echo, half-closes and reads the EOF that follows. Returns the
/// tag and the client's own address (to find its access line). Bounded by [`QUICK`].
async fn ask(addr: SocketAddr) -> io::Result<(u8, SocketAddr)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let me = s.local_addr()?;
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await?;
        s.write_all(b"?").await?;
        let mut echo = [0u8; 1];
        s.read_exact(&mut echo).await?;
        if &echo != b"?" {
            return Err(io::Error::other(format!("echo {echo:?} instead of b\"?\"")));
        }
        s.shutdown().await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        if !rest.is_empty() {
            return Err(io::Error::other(format!("{} unexpected bytes before EOF", rest.len())));
        }
        Ok((tag[0], me))
    };
    match tokio::time::timeout(QUICK, exchange).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {QUICK:?}"))),
    }
}

/// [`ask`], panicking with `what` on failure.
async fn ask_ok(addr: SocketAddr, what: &str) -> (u8, SocketAddr) {
    ask(addr).await.unwrap_or_else(|e| panic!("{what}: client via {addr}: {e}"))
}

/// Asserts that the access line of `client` names `route` and `backend`.
async fn assert_routed(proxy: &Proxy, client: SocketAddr, route: &str, backend: SocketAddr, what: &str) -> AccessLine {
    let line = access_line(proxy, client).await;
    assert_eq!(line.get("route"), Some(route), "{what}: access line route: {}", line.raw);
    assert_eq!(line.get("backend"), Some(backend.to_string().as_str()), "{what}: access line backend: {}", line.raw);
    line
}

/// Sends bytes `from..to` of pattern `seed`.
async fn send_range<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, from: u64, to: u64) -> io::Result<()> {
    let mut buf = vec![0u8; servers::CHUNK];
    let mut off = from;
    while off < to {
        let n = (to - off).min(servers::CHUNK as u64) as usize;
        servers::pattern_fill(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 1. Two routes, two ports, two backends
// ---------------------------------------------------------------------------------------

/// Each route's clients reach that route's backend only, and their access lines say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routes_reach_their_own_backends() {
    const PER_ROUTE: u64 = 4;
    for engine in harness::engines() {
        let (a, b) = (Tagged::start(b'A').await, Tagged::start(b'B').await);
        let dir = ConfDir::new("two_routes", &engine);
        let path = dir.write(&format!(
            "{}{}{}",
            head(&engine),
            route("one", &["127.0.0.1:0"], &[a.addr], ""),
            route("two", &["127.0.0.2:0"], &[b.addr], "")
        ));
        let proxy = Proxy::start_config(&path).await;
        let one = proxy.addr_of("one", QUICK).await;
        let two = proxy.addr_of("two", QUICK).await;
        assert_ne!(one, two, "[{engine}] the two routes share a listener");
        for i in 0..PER_ROUTE {
            for (addr, name, tag, backend) in [(one, "one", b'A', a.addr), (two, "two", b'B', b.addr)] {
                let what = format!("[{engine}] route {name} client {i}");
                let (got, me) = ask_ok(addr, &what).await;
                assert_eq!(got, tag, "{what}: answered by backend {:?}", got as char);
                let line = assert_routed(&proxy, me, name, backend, &what).await;
                assert_eq!(line.get("engine"), Some(engine.as_str()), "{what}: {}", line.raw);
            }
        }
        assert_eq!(a.accepted(), PER_ROUTE, "[{engine}] connections on route one's backend");
        assert_eq!(b.accepted(), PER_ROUTE, "[{engine}] connections on route two's backend");
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. Reload during a 256 MiB transfer
// ---------------------------------------------------------------------------------------

/// A reload that moves route r1 to a new backend while a 256 MiB upload runs on r1: the
/// upload finishes byte-exact on the old backend (its access line names it), and every
/// connection made after the reload goes to the new backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_during_a_bulk_transfer_keeps_it_on_the_old_backend() {
    const SIZE: u64 = 256 << 20;
    /// The upload is at least this far when the reload starts...
    const BEFORE: u64 = SIZE / 2;
    /// ... and waits here until the new connections are checked, so it spans the reload.
    const PAUSE_AT: u64 = SIZE / 4 * 3;
    const NEW_CONNS: u64 = 4;
    const SEED: u64 = 0x2_0000;
    for engine in harness::engines() {
        let (old, mut results) = Server::sink(SEED).await;
        let new = Tagged::start(b'N').await;
        let dir = ConfDir::new("reload_bulk", &engine);
        let path = dir.write(&format!("{}{}", head(&engine), route("r1", &["127.0.0.1:0"], &[old.addr()], "")));
        let proxy = Proxy::start_config(&path).await;
        let addr = proxy.addr_of("r1", QUICK).await;

        let c = connect(addr).await;
        let me = c.local_addr().unwrap();
        let (mut r, mut w) = c.into_split();
        let half_sent = Arc::new(Notify::new());
        let go_on = Arc::new(Notify::new());
        let writer = tokio::spawn({
            let (half_sent, go_on) = (half_sent.clone(), go_on.clone());
            async move {
                send_range(&mut w, SEED, 0, BEFORE).await?;
                half_sent.notify_one();
                send_range(&mut w, SEED, BEFORE, PAUSE_AT).await?;
                go_on.notified().await;
                send_range(&mut w, SEED, PAUSE_AT, SIZE).await?;
                w.shutdown().await?;
                io::Result::Ok(w)
            }
        });
        // Half the upload is written: far more than the socket buffers hold, so the old
        // backend's connection exists and is receiving.
        within(BULK, "the first half of the upload", half_sent.notified()).await;
        assert_eq!(old.accepted(), 1, "[{engine}] the upload's backend connection");

        dir.write(&format!("{}{}", head(&engine), route("r1", &["127.0.0.1:0"], &[new.addr], "")));
        proxy.reload(QUICK).await.unwrap_or_else(|l| panic!("[{engine}] reload rejected: {l}"));
        assert_eq!(proxy.addr_of("r1", QUICK).await, addr, "[{engine}] r1's listener was replaced by the reload");
        for i in 0..NEW_CONNS {
            let what = format!("[{engine}] connection {i} after the reload");
            let (tag, c) = ask(addr).await.unwrap_or_else(|e| {
                panic!("{what}: {e} (connections on the old backend, which does not answer: {})", old.accepted())
            });
            assert_eq!(tag, b'N', "{what}: answered by another backend");
            assert_routed(&proxy, c, "r1", new.addr, &what).await;
        }
        go_on.notify_one();

        let mut answer = Vec::new();
        within(BULK, "the old backend's answer to the upload", r.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|e| panic!("[{engine}] reading the answer: {e}"));
        let _w = within(QUICK, "the writer", writer).await.expect("writer task").expect("writing 256 MiB");
        assert_eq!(
            String::from_utf8_lossy(&answer),
            format!("len={SIZE} mismatch=none\n"),
            "[{engine}] the sink's verdict"
        );
        let v = within(QUICK, "the sink's result", results.recv()).await.expect("sink result");
        v.assert_exact(SIZE, &format!("[{engine}] 256 MiB across a reload"));
        let line = assert_routed(&proxy, me, "r1", old.addr(), &format!("[{engine}] the upload")).await;
        assert_eq!(line.num("bytes_up"), SIZE, "[{engine}] {}", line.raw);
        assert_eq!(old.accepted(), 1, "[{engine}] connections on the old backend");
        assert_eq!(new.accepted(), NEW_CONNS, "[{engine}] connections on the new backend");
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 3. A bad file on reload changes nothing
// ---------------------------------------------------------------------------------------

/// Bad files (an unknown key; a backend name that does not resolve; a listen address the
/// test holds; no file at all), the first three also moving r1 to backend B: each reload is
/// rejected with a line naming the problem, and clients still reach backend A on the old
/// port. A good file at the end is applied (so the rejections were not a reload that never
/// works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_on_reload_changes_nothing() {
    for engine in harness::engines() {
        let (a, b) = (Tagged::start(b'A').await, Tagged::start(b'B').await);
        let dir = ConfDir::new("bad_reload", &engine);
        let path = dir.write(&format!("{}{}", head(&engine), route("r1", &["127.0.0.1:0"], &[a.addr], "")));
        let proxy = Proxy::start_config(&path).await;
        let addr = proxy.addr_of("r1", QUICK).await;
        let listeners = proxy.listeners();
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the held address");
        let held_addr = held.local_addr().unwrap();

        let unknown = format!("{}{}", head(&engine), route("r1", &["127.0.0.1:0"], &[b.addr], "colour = \"blue\"\n"));
        let unknown_line = format!("{}:{}:", path.display(), line_no(&unknown, "colour ="));
        let bad_files = [
            ("an unknown key", Some(unknown), vec![unknown_line, "unknown key `colour`".to_string()]),
            (
                "a backend name that does not resolve",
                Some(format!(
                    "{}{}",
                    head(&engine),
                    route("r1", &["127.0.0.1:0"], &[b.addr], "")
                        .replace(&format!("\"{}\"]", b.addr), &format!("\"{}\", \"nonexistent.invalid:80\"]", b.addr))
                )),
                vec!["nonexistent.invalid:80".to_string()],
            ),
            (
                "a listen address that cannot be bound",
                Some(format!(
                    "{}{}",
                    head(&engine),
                    route("r1", &["127.0.0.1:0", &held_addr.to_string()], &[b.addr], "")
                )),
                vec![format!("cannot listen on {held_addr}")],
            ),
            ("the file gone (moved away while being edited)", None, vec!["cannot read the config file".to_string()]),
        ];
        for (i, (what, text, names)) in bad_files.iter().enumerate() {
            let what = format!("[{engine}] reload with {what}");
            match text {
                Some(text) => drop(dir.write(text)),
                None => std::fs::remove_file(&path).expect("remove the config file"),
            }
            let line = proxy.reload(QUICK).await.expect_err(&format!("{what}: applied"));
            assert!(line.contains("running configuration is unchanged"), "{what}: {line}");
            for name in names {
                assert!(line.contains(name.as_str()), "{what}: the rejection does not name {name:?}: {line}");
            }
            for j in 0..2 {
                let (tag, c) = ask_ok(addr, &format!("{what}: client {j}")).await;
                assert_eq!(tag, b'A', "{what}: client {j} reached the new file's backend");
                assert_routed(&proxy, c, "r1", a.addr, &what).await;
            }
            assert_eq!(proxy.listeners(), listeners, "{what}: the listeners changed");
            assert_eq!(b.accepted(), 0, "{what}: the new file's backend got connections");
            assert_eq!(a.accepted(), 2 * (i as u64 + 1), "{what}: connections on the running backend");
        }
        // The held address still belongs to the test.
        drop(held);

        dir.write(&format!("{}{}", head(&engine), route("r1", &["127.0.0.1:0"], &[b.addr], "")));
        proxy.reload(QUICK).await.unwrap_or_else(|l| panic!("[{engine}] the good file was rejected: {l}"));
        let (tag, c) = ask_ok(addr, "after the good reload").await;
        assert_eq!(tag, b'B', "[{engine}] the good reload did not move r1");
        assert_routed(&proxy, c, "r1", b.addr, "after the good reload").await;
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 4. Reloads and listeners
// ---------------------------------------------------------------------------------------

/// Clients connecting (and exchanging a byte) back to back, on two tasks, during five
/// reloads that each change r1's backend: not one connect is refused or reset, and every
/// client is answered by a backend of the file in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_refuse_no_connect_on_a_kept_listener() {
    const RELOADS: usize = 5;
    const CLIENT_TASKS: usize = 2;
    /// Exchanges that must complete between two reloads, so that clients run throughout.
    const BETWEEN: u64 = 3;
    for engine in harness::engines() {
        let backends = [Tagged::start(b'A').await, Tagged::start(b'B').await];
        let dir = ConfDir::new("reload_kept", &engine);
        let file =
            |k: usize| format!("{}{}", head(&engine), route("r1", &["127.0.0.1:0"], &[backends[k % 2].addr], ""));
        let path = dir.write(&file(0));
        let proxy = Proxy::start_config(&path).await;
        let addr = proxy.addr_of("r1", QUICK).await;

        let stop = Arc::new(AtomicBool::new(false));
        let (served_tx, served) = watch::channel(0u64);
        let served_tx = Arc::new(served_tx);
        let (failures_tx, mut failures) = mpsc::unbounded_channel::<String>();
        let mut tasks = Vec::new();
        for _ in 0..CLIENT_TASKS {
            let (stop, served_tx, failures_tx) = (stop.clone(), served_tx.clone(), failures_tx.clone());
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < QUICK * 3 {
                    match ask(addr).await {
                        Ok((b'A' | b'B', _)) => served_tx.send_modify(|n| *n += 1),
                        Ok((tag, me)) => failures_tx.send(format!("client {me}: tag {tag}")).unwrap(),
                        Err(e) => failures_tx.send(format!("{e} ({:?})", e.kind())).unwrap(),
                    }
                }
            }));
        }
        drop(failures_tx);
        let wait_served = |n: u64| {
            let mut served = served.clone();
            async move {
                within(QUICK, &format!("{n} client exchanges"), served.wait_for(|&k| k >= n))
                    .await
                    .expect("the client tasks are alive");
            }
        };
        wait_served(BETWEEN).await;
        for k in 1..=RELOADS {
            dir.write(&file(k));
            proxy.reload(QUICK).await.unwrap_or_else(|l| panic!("[{engine}] reload {k} rejected: {l}"));
            let now = *served.borrow();
            wait_served(now + BETWEEN).await;
        }
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            within(QUICK * 4, "the client tasks", t).await.expect("client task");
        }
        let mut failed = Vec::new();
        while let Some(f) = failures.recv().await {
            failed.push(f);
        }
        let total = *served.borrow();
        eprintln!("[{engine}] {total} exchanges during {RELOADS} reloads");
        assert!(
            failed.is_empty(),
            "[{engine}] {} of {} client exchanges failed during reloads: {failed:?}",
            failed.len(),
            total + failed.len() as u64
        );
        assert!(total >= BETWEEN * (RELOADS as u64 + 1), "[{engine}] only {total} exchanges");
        assert_eq!(proxy.addr_of("r1", QUICK).await, addr, "[{engine}] r1's listener changed");
        assert!(backends[1].accepted() > 0, "[{engine}] the reloads never moved r1 to backend B");
        stop_ok(proxy).await;
    }
}

/// A reload that removes route r2 (127.0.0.2) and adds r3 (127.0.0.3): once `reload` has
/// returned, r3's new listener accepts and reaches its backend, r2's port refuses connects,
/// and r1's kept listener still serves on the same port. A connection open on r2 during the
/// reload goes on to its end on r2's backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_binds_added_listeners_and_closes_removed_ones() {
    for engine in harness::engines() {
        let (a, b, c) = (Tagged::start(b'A').await, Tagged::start(b'B').await, Tagged::start(b'C').await);
        let dir = ConfDir::new("reload_listeners", &engine);
        let r1 = route("r1", &["127.0.0.1:0"], &[a.addr], "");
        let path = dir.write(&format!("{}{r1}{}", head(&engine), route("r2", &["127.0.0.2:0"], &[b.addr], "")));
        let proxy = Proxy::start_config(&path).await;
        let one = proxy.addr_of("r1", QUICK).await;
        let two = proxy.addr_of("r2", QUICK).await;
        assert_eq!(ask_ok(two, "r2 before the reload").await.0, b'B');
        // A connection on r2 that stays open across the reload that removes r2.
        let mut live = connect(two).await;
        let live_me = live.local_addr().unwrap();
        let mut tag = [0u8; 1];
        within(QUICK, "the live connection's greeting", live.read_exact(&mut tag)).await.expect("greeting");
        assert_eq!(&tag, b"B", "[{engine}] the live connection on r2");

        dir.write(&format!("{}{r1}{}", head(&engine), route("r3", &["127.0.0.3:0"], &[c.addr], "")));
        let applied = proxy.reload(QUICK).await.unwrap_or_else(|l| panic!("[{engine}] reload rejected: {l}"));
        let three = proxy.addr_of("r3", QUICK).await;
        let (tag, me) = ask_ok(three, "r3's new listener").await;
        assert_eq!(tag, b'C', "[{engine}] r3's client reached another backend");
        assert_routed(&proxy, me, "r3", c.addr, "r3's new listener").await;
        match TcpStream::connect(two).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            other => panic!("[{engine}] r2's listener {two} is still open after the reload ({applied}): {other:?}"),
        }
        let (tag, me) = ask_ok(one, "r1 after the reload").await;
        assert_eq!(tag, b'A');
        assert_routed(&proxy, me, "r1", a.addr, "r1 after the reload").await;
        assert_eq!(proxy.addr_of("r1", QUICK).await, one, "[{engine}] r1's kept listener was replaced");
        assert_eq!(b.accepted(), 2, "[{engine}] connections on r2's backend");

        // The live connection on the removed route goes on, and ends on r2's backend.
        within(QUICK, "the live connection after the reload", live.write_all(b"still here")).await.expect("write");
        live.shutdown().await.expect("shutdown(Write)");
        let mut echoed = Vec::new();
        within(QUICK, "the live connection's echo", live.read_to_end(&mut echoed)).await.expect("read");
        assert_eq!(echoed, b"still here", "[{engine}] the live connection on the removed route");
        let line = assert_routed(&proxy, live_me, "r2", b.addr, "the live connection on the removed route").await;
        assert_eq!(line.num("bytes_up"), 10, "[{engine}] {}", line.raw);
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 5-6. Health checks
// ---------------------------------------------------------------------------------------

/// The log line of a backend's change of state.
fn state_line(route: &str, backend: SocketAddr, state: &str) -> String {
    format!("health route={route} backend={backend} state={state}")
}

/// Waits for the `state` line of `backend` and returns how long that took from `since`.
async fn wait_state(proxy: &Proxy, route: &str, backend: SocketAddr, state: &str, since: Instant) -> Duration {
    proxy.wait_for_log(&state_line(route, backend, state), QUICK).await;
    since.elapsed()
}

/// Waits until `n` log lines contain `needle` and returns them all; panics with `what` and
/// the log after `limit`.
async fn wait_lines(proxy: &Proxy, needle: &str, n: usize, limit: Duration, what: &str) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let logs = proxy.logs();
        let found: Vec<String> = logs.lines().filter(|l| l.contains(needle)).map(str::to_string).collect();
        if found.len() >= n {
            return found;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: not {n} lines with {needle:?} within {limit:?}:\n{logs}");
        // Until the log grows by one line, or the time is up.
        let grown = logs.lines().count() + 1;
        let _ = tokio::time::timeout(left, proxy.wait_log_ending("", grown, left + QUICK)).await;
    }
}

/// One client of the background loop in [`backend_killed_mid_run_stops_getting_connections`].
struct Attempt {
    /// When it started connecting.
    started: Instant,
    /// What it got.
    result: io::Result<(u8, SocketAddr)>,
}

/// A route with two backends and a TCP health check; clients connect back to back. Backend B
/// is killed: within `fall x interval` (+ [`SLACK`]) it is logged down, no client that
/// started after that line tries B (its log has no `connect failed` for B), and every client
/// is served by A. B started again on its port is logged up within `rise x interval` (+
/// [`SLACK`]) and gets clients again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_run_stops_getting_connections() {
    /// Clients that must complete after the down line.
    const AFTER_DOWN: usize = 10;
    for engine in harness::engines() {
        let a = Tagged::start(b'A').await;
        let b = Tagged::start(b'B').await;
        let b_addr = b.addr;
        let dir = ConfDir::new("health_kill", &engine);
        let text =
            route("h", &["127.0.0.1:0"], &[a.addr, b_addr], &format!("balance = \"round-robin\"\n{}", health("")));
        let path = dir.write(&format!("{}{text}", head(&engine)));
        let proxy = Proxy::start_config(&path).await;
        let addr = proxy.addr_of("h", QUICK).await;
        let tags: HashSet<u8> = {
            let mut t = HashSet::new();
            for i in 0..4 {
                t.insert(ask_ok(addr, &format!("[{engine}] client {i} with both backends up")).await.0);
            }
            t
        };
        assert_eq!(tags, HashSet::from([b'A', b'B']), "[{engine}] both backends serve while up");

        let stop = Arc::new(AtomicBool::new(false));
        let (tx, mut attempts) = mpsc::unbounded_channel::<Attempt>();
        let clients = tokio::spawn({
            let stop = stop.clone();
            async move {
                let began = Instant::now();
                while !stop.load(Ordering::SeqCst) && began.elapsed() < QUICK * 3 {
                    let started = Instant::now();
                    let result = ask(addr).await;
                    if tx.send(Attempt { started, result }).is_err() {
                        return;
                    }
                }
            }
        });
        b.kill().await;
        let killed = Instant::now();
        let took = wait_state(&proxy, "h", b_addr, "down", killed).await;
        let down_seen = Instant::now();
        let bound = HEALTH_INTERVAL * FALL + SLACK;
        assert!(took <= bound, "[{engine}] backend B went down {took:?} after it was killed; allowed {bound:?}");
        let mut seen = Vec::new();
        let deadline = Instant::now() + QUICK;
        while seen.iter().filter(|t: &&Attempt| t.started > down_seen).count() < AFTER_DOWN {
            let left = deadline.saturating_duration_since(Instant::now());
            seen.push(
                within(left, "clients after the down line", attempts.recv()).await.expect("client loop ended early"),
            );
        }
        stop.store(true, Ordering::SeqCst);
        within(QUICK, "the client loop", clients).await.expect("client loop");
        while let Ok(t) = attempts.try_recv() {
            seen.push(t);
        }

        let mut after_down = Vec::new();
        for (i, t) in seen.iter().enumerate() {
            let (tag, me) =
                t.result.as_ref().unwrap_or_else(|e| panic!("[{engine}] client {i} of the loop was not served: {e}"));
            if t.started > killed {
                assert_eq!(
                    *tag, b'A',
                    "[{engine}] client {i}, started after B was killed, got backend {:?}",
                    *tag as char
                );
            }
            if t.started > down_seen {
                after_down.push(*me);
            }
        }
        let failed_on_b = format!("route=h backend={b_addr} connect failed");
        let down_at = {
            let logs = proxy.logs();
            logs.lines().position(|l| l.contains(&state_line("h", b_addr, "down"))).expect("seen")
        };
        let late: Vec<String> =
            proxy.logs().lines().skip(down_at + 1).filter(|l| l.contains(&failed_on_b)).map(str::to_string).collect();
        eprintln!(
            "[{engine}] B down {took:?} after the kill; {} connect attempts on B logged after the down line",
            late.len()
        );
        for me in &after_down {
            let line = access_line(&proxy, *me).await;
            assert_eq!(line.get("backend"), Some(a.addr.to_string().as_str()), "[{engine}] {}", line.raw);
            let conn = line.get("conn").expect("conn=");
            let tried_b = format!("conn={conn} {failed_on_b}");
            assert!(
                !proxy.logs().contains(&tried_b),
                "[{engine}] client {me} started after B was logged down, and B was still tried:\n{}",
                late.join("\n")
            );
        }

        let b2 = Tagged::start_on(b_addr, b'B').await;
        let restarted = Instant::now();
        let took = wait_state(&proxy, "h", b_addr, "up", restarted).await;
        let bound = HEALTH_INTERVAL * RISE + SLACK;
        assert!(took <= bound, "[{engine}] backend B came back up {took:?} after its restart; allowed {bound:?}");
        let mut b_clients = 0;
        for i in 0..6 {
            let (tag, me) = ask_ok(addr, &format!("[{engine}] client {i} after B came back")).await;
            if tag == b'B' {
                b_clients += 1;
                assert_routed(&proxy, me, "h", b_addr, "a client of B after its restart").await;
            }
        }
        assert!(b_clients > 0, "[{engine}] backend B is up again but got none of 6 clients");

        // Killed again with no client about: the active probe alone marks it down.
        let downs = proxy.logs().matches(&state_line("h", b_addr, "down")).count();
        b2.kill().await;
        let killed = Instant::now();
        let bound = HEALTH_INTERVAL * FALL + SLACK;
        let lines = wait_lines(
            &proxy,
            &state_line("h", b_addr, "down"),
            downs + 1,
            bound,
            &format!("[{engine}] B killed again, no clients"),
        )
        .await;
        let line = &lines[downs];
        eprintln!("[{engine}] B down {:?} after the second kill (probes only)", killed.elapsed());
        assert!(line.contains("connect refused"), "[{engine}] the probe's down line gives no cause: {line}");
        assert!(!line.contains("client connect"), "[{engine}] no client connected, yet: {line}");
        stop_ok(proxy).await;
    }
}

/// The path the HTTP health check asks for.
const PROBE_PATH: &str = "/healthz";

/// A loopback HTTP backend: `GET /healthz` gets the status in `status` (changeable while it
/// runs), any other path `200` with the backend's one-byte tag as the body. Counts probes.
struct HttpBackend {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    probes: Arc<AtomicU64>,
    _task: AbortOnDropHandle<()>,
}

impl HttpBackend {
    /// The most bytes of a request head it reads.
    const MAX_HEAD: usize = 8192;

    async fn start(tag: u8) -> HttpBackend {
        let l = listen_on("127.0.0.1:0".parse().unwrap());
        let addr = l.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let probes = Arc::new(AtomicU64::new(0));
        let (st, pr) = (status.clone(), probes.clone());
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (st, pr) = (st.clone(), pr.clone());
                tokio::spawn(async move {
                    let mut s = s;
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < Self::MAX_HEAD {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or("");
                    let answer = if path == PROBE_PATH {
                        pr.fetch_add(1, Ordering::SeqCst);
                        let code = st.load(Ordering::SeqCst);
                        format!("HTTP/1.1 {code} Status {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    } else {
                        format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n{}", tag as char)
                    };
                    if s.write_all(answer.as_bytes()).await.is_ok() {
                        let _ = s.shutdown().await;
                        // Until the peer closes, so that it sees a normal close, not a reset.
                        let mut sink = Vec::new();
                        let _ = tokio::time::timeout(QUICK, s.read_to_end(&mut sink)).await;
                    }
                });
            }
        }));
        HttpBackend { addr, status, probes, _task: task }
    }

    fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    fn probes(&self) -> u64 {
        self.probes.load(Ordering::SeqCst)
    }
}

/// `GET /whoami` through the proxy: the answering backend's tag and the client's address.
async fn http_ask(addr: SocketAddr, what: &str) -> (u8, SocketAddr) {
    let mut s = connect(addr).await;
    let me = s.local_addr().unwrap();
    within(QUICK, what, s.write_all(b"GET /whoami HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"))
        .await
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut answer = Vec::new();
    within(QUICK, what, s.read_to_end(&mut answer)).await.unwrap_or_else(|e| panic!("{what}: read: {e}"));
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{what}: answer {text:?}");
    (*answer.last().expect("non-empty answer"), me)
}

/// An HTTP health check: backend H1's health page answering 500 marks H1 down (clients go
/// to H2 only); answering 200 again marks it up (and it gets clients again). With both
/// pages failing, both are down and clients are served by both all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probe_marks_a_backend_down_on_500_and_up_on_200() {
    const CLIENTS: usize = 6;
    for engine in harness::engines() {
        let (h1, h2) = (HttpBackend::start(b'1').await, HttpBackend::start(b'2').await);
        let dir = ConfDir::new("health_http", &engine);
        let http = format!("http = {{ path = \"{PROBE_PATH}\", expect = \"2xx\" }}");
        let text = route(
            "web",
            &["127.0.0.1:0"],
            &[h1.addr, h2.addr],
            &format!("balance = \"round-robin\"\n{}", health(&http)),
        );
        let path = dir.write(&format!("{}{text}", head(&engine)));
        let proxy = Proxy::start_config(&path).await;
        let addr = proxy.addr_of("web", QUICK).await;
        let mut tags = HashSet::new();
        for i in 0..CLIENTS {
            tags.insert(http_ask(addr, &format!("[{engine}] client {i}, both healthy")).await.0);
        }
        assert_eq!(tags, HashSet::from([b'1', b'2']), "[{engine}] both backends serve while healthy");

        h1.set_status(500);
        let probes = h1.probes();
        let since = Instant::now();
        let took = wait_state(&proxy, "web", h1.addr, "down", since).await;
        // The probe in flight when the status changed may still have passed.
        let bound = HEALTH_INTERVAL * (FALL + 1) + SLACK;
        assert!(took <= bound, "[{engine}] H1 went down {took:?} after its health page failed; allowed {bound:?}");
        assert!(h1.probes() >= probes + u64::from(FALL), "[{engine}] H1 was marked down without {FALL} probes");
        let down =
            proxy.logs().lines().find(|l| l.contains(&state_line("web", h1.addr, "down"))).expect("seen").to_string();
        assert!(down.contains("HTTP status 500"), "[{engine}] the down line does not give the cause: {down}");
        for i in 0..CLIENTS {
            let what = format!("[{engine}] client {i} while H1 is down");
            let (tag, me) = http_ask(addr, &what).await;
            assert_eq!(tag, b'2', "{what}: served by the backend that is down");
            assert_routed(&proxy, me, "web", h2.addr, &what).await;
        }

        h1.set_status(200);
        let since = Instant::now();
        let took = wait_state(&proxy, "web", h1.addr, "up", since).await;
        let bound = HEALTH_INTERVAL * (RISE + 1) + SLACK;
        assert!(took <= bound, "[{engine}] H1 came up {took:?} after its health page recovered; allowed {bound:?}");
        let mut tags = HashSet::new();
        for i in 0..CLIENTS {
            tags.insert(http_ask(addr, &format!("[{engine}] client {i}, H1 up again")).await.0);
        }
        assert!(tags.contains(&b'1'), "[{engine}] H1 is up again but got none of {CLIENTS} clients");

        // Both down: every backend is tried anyway, so clients are still served, by both.
        h1.set_status(500);
        h2.set_status(500);
        let bound = HEALTH_INTERVAL * (FALL + 1) + SLACK;
        wait_lines(&proxy, &state_line("web", h1.addr, "down"), 2, bound, &format!("[{engine}] H1 down again")).await;
        wait_lines(&proxy, &state_line("web", h2.addr, "down"), 1, bound, &format!("[{engine}] H2 down")).await;
        let mut tags = HashSet::new();
        for i in 0..CLIENTS {
            tags.insert(http_ask(addr, &format!("[{engine}] client {i}, both backends down")).await.0);
        }
        assert_eq!(tags, HashSet::from([b'1', b'2']), "[{engine}] with every backend down, all are to be tried");
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 7. ntlm-splice check
// ---------------------------------------------------------------------------------------

/// Runs `ntlm-splice check --config PATH` as an operator would (no `RUST_LOG`): exit status,
/// stdout, stderr.
async fn check(path: &Path) -> (std::process::ExitStatus, String, String) {
    let mut cmd = tokio::process::Command::new(harness::bin());
    cmd.arg("check")
        .arg("--config")
        .arg(path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = within(QUICK, "ntlm-splice check", cmd.output()).await.expect("run ntlm-splice check");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The shipped example file.
fn shipped_example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/ntlm-splice.toml")
}

/// `check` passes the shipped example (with its example.net backends replaced by 127.0.0.1,
/// since those names do not resolve) and a file listening on an address the test holds (so
/// it binds nothing); it fails, naming the file, line, key and fix, on an unknown key and on
/// a bad value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_validates_without_binding() {
    let dir = ConfDir::new("check", "any");
    let example = std::fs::read_to_string(shipped_example()).expect("read the shipped example");
    let (status, _, stderr) = check(&shipped_example()).await;
    if !status.success() {
        // Its only problem may be that the example.net names do not resolve.
        assert!(stderr.contains("cannot resolve"), "the shipped example fails for another reason: {stderr}");
    }
    let mut replaced = 0;
    let local: Vec<String> = example
        .lines()
        // The example's service account (`[global] user`) need not exist on this host; `check`
        // would rightly fail on it. ntlm-userspace's config tests cover those keys.
        .filter(|l| !l.starts_with("user = ") && !l.starts_with("group = "))
        .map(|l| {
            if !l.starts_with("backends = ") {
                return l.to_string();
            }
            let list: Vec<String> = l["backends = ".len()..]
                .trim_matches(['[', ']'])
                .split(',')
                .map(|b| {
                    let b = b.trim().trim_matches('"');
                    let (host, port) = b.rsplit_once(':').expect("host:port");
                    if host.ends_with(".example.net") {
                        // A loopback address of its own, so that no backend is listed twice.
                        replaced += 1;
                        format!("\"127.0.0.{replaced}:{port}\"")
                    } else {
                        format!("\"{b}\"")
                    }
                })
                .collect();
            format!("backends = [{}]", list.join(", "))
        })
        .collect();
    assert!(replaced > 0, "no example.net backend in the shipped example: the test needs updating");
    let path = dir.write(&local.join("\n"));
    let (status, stdout, stderr) = check(&path).await;
    assert!(
        status.success(),
        "check failed on the shipped example with local backends ({status}):\n{stderr}\n{}",
        local.join("\n")
    );
    assert!(stdout.contains(": ok: 5 route(s)"), "check's report: {stdout}");

    let backend = Tagged::start(b'A').await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the held address");
    let held_addr = held.local_addr().unwrap();
    let good = format!("{}{}", head("splice"), route("r", &[&held_addr.to_string()], &[backend.addr], ""));
    let path = dir.write(&good);
    let (status, stdout, stderr) = check(&path).await;
    assert!(status.success(), "check failed on a good file whose listen address is in use ({status}):\n{stderr}");
    assert!(stdout.contains(&format!("{}: ok: 1 route(s) (r)", path.display())), "check's report: {stdout}");
    assert!(held.local_addr().is_ok());
    assert_eq!(backend.accepted(), 0, "check connected to the backend");

    let unknown = good.replace("name = \"r\"\n", "name = \"r\"\nlistn = [\"127.0.0.1:1\"]\n");
    let path = dir.write(&unknown);
    let (status, _, stderr) = check(&path).await;
    assert!(!status.success(), "check passed a file with an unknown key");
    let want = format!("{}:{}: route.listn: unknown key `listn`", path.display(), line_no(&unknown, "listn"));
    assert!(stderr.contains(&want), "check's error does not say {want:?}: {stderr}");
    assert!(stderr.contains("remove it or correct its spelling"), "check's error gives no fix: {stderr}");

    let bad_value = good.replace("connect_timeout = \"2s\"", "connect_timeout = \"2 fortnights\"");
    let path = dir.write(&bad_value);
    let (status, _, stderr) = check(&path).await;
    assert!(!status.success(), "check passed a file with a bad duration");
    let want = format!("{}:{}: defaults.connect_timeout: ", path.display(), line_no(&bad_value, "connect_timeout"));
    assert!(stderr.contains(&want), "check's error does not say {want:?}: {stderr}");
    assert!(stderr.contains("write a duration such as"), "check's error gives no example of a good value: {stderr}");
    drop(held);
}

// ---------------------------------------------------------------------------------------
// 8. Half-close timeout
// ---------------------------------------------------------------------------------------

/// A backend that hands every accepted connection to the test.
async fn holder() -> (Server, mpsc::UnboundedReceiver<TcpStream>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = Server::start(move |s| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(s);
        }
    })
    .await;
    (server, rx)
}

/// Which side of a connection sends the first FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum First {
    Client,
    Backend,
}

/// One connection through `addr` to the holder: a byte each way, then `first` half-closes and
/// the other side sees that EOF. Returns (client, backend, the instant before the FIN).
async fn half_closed(
    addr: SocketAddr,
    held: &mut mpsc::UnboundedReceiver<TcpStream>,
    first: First,
    what: &str,
) -> (TcpStream, TcpStream, Instant) {
    let mut c = connect(addr).await;
    let mut b = within(QUICK, &format!("{what}: backend connection"), held.recv()).await.expect("holder");
    let mut byte = [0u8; 1];
    within(QUICK, what, c.write_all(b"u")).await.expect("client write");
    within(QUICK, what, b.read_exact(&mut byte)).await.expect("backend read");
    within(QUICK, what, b.write_all(b"d")).await.expect("backend write");
    within(QUICK, what, c.read_exact(&mut byte)).await.expect("client read");
    let fin = Instant::now();
    let (closer, other) = match first {
        First::Client => (&mut c, &mut b),
        First::Backend => (&mut b, &mut c),
    };
    closer.shutdown().await.expect("shutdown(Write)");
    let n = within(QUICK, &format!("{what}: the {first:?}'s FIN at the other side"), other.read(&mut byte))
        .await
        .expect("read the FIN");
    assert_eq!(n, 0, "{what}: got data instead of the {first:?}'s FIN");
    (c, b, fin)
}

/// `half_close_timeout = "300ms"`: after one side's FIN (the client's, then the backend's),
/// with the other side open and silent, the proxy closes the connection at 300 ms (not
/// before, and within [`SLACK`] after; the side that sent the FIN sees its read end), logging
/// `end=half_close_timeout`. A route without it keeps the same connections half-open past
/// three times that, and they still carry the other side's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_timeout_closes_a_half_open_connection() {
    const HALF_CLOSE: Duration = Duration::from_millis(300);
    for engine in harness::engines() {
        let (backend, mut held) = holder().await;
        let dir = ConfDir::new("half_close", &engine);
        let path = dir.write(&format!(
            "{}{}{}",
            head(&engine),
            route(
                "hc",
                &["127.0.0.1:0"],
                &[backend.addr()],
                &format!("half_close_timeout = \"{}ms\"\n", HALF_CLOSE.as_millis())
            ),
            route("plain", &["127.0.0.2:0"], &[backend.addr()], "")
        ));
        let proxy = Proxy::start_config(&path).await;
        let (hc, plain) = (proxy.addr_of("hc", QUICK).await, proxy.addr_of("plain", QUICK).await);

        for first in [First::Client, First::Backend] {
            let what = format!("[{engine}] half_close_timeout, {first:?} FIN first");
            let (mut c, mut b, fin) = half_closed(hc, &mut held, first, &what).await;
            let me = c.local_addr().unwrap();
            let closer = if first == First::Client { &mut c } else { &mut b };
            let mut buf = [0u8; 16];
            match within(QUICK, &format!("{what}: the proxy closing the connection"), closer.read(&mut buf)).await {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("{what}: expected the connection closed, got {other:?}"),
            }
            let took = fin.elapsed();
            assert!(took >= HALF_CLOSE, "{what}: closed {took:?} after the FIN, before the timeout");
            let bound = HALF_CLOSE + SLACK;
            assert!(took <= bound, "{what}: closed {took:?} after the FIN; allowed {bound:?}");
            let line = access_line(&proxy, me).await;
            assert_eq!(line.get("end"), Some("half_close_timeout"), "{what}: {}", line.raw);
            assert_eq!(line.get("route"), Some("hc"), "{what}: {}", line.raw);
            assert_eq!((line.num("bytes_up"), line.num("bytes_down")), (1, 1), "{what}: {}", line.raw);
        }

        for first in [First::Client, First::Backend] {
            let what = format!("[{engine}] no half_close_timeout, {first:?} FIN first");
            let (mut c, mut b, fin) = half_closed(plain, &mut held, first, &what).await;
            let me = c.local_addr().unwrap();
            let (closer, other) = if first == First::Client { (&mut c, &mut b) } else { (&mut b, &mut c) };
            let stay = HALF_CLOSE * 3;
            let mut buf = [0u8; 16];
            if let Ok(r) = tokio::time::timeout(stay.saturating_sub(fin.elapsed()), closer.read(&mut buf)).await {
                panic!("{what}: the half-open connection ended {:?} after the FIN: {r:?}", fin.elapsed());
            }
            within(QUICK, &what, other.write_all(b"late")).await.expect("write after the FIN");
            other.shutdown().await.expect("the second shutdown(Write)");
            let mut late = Vec::new();
            within(QUICK, &format!("{what}: the last bytes"), closer.read_to_end(&mut late))
                .await
                .expect("read after its own FIN");
            assert_eq!(late, b"late", "{what}: bytes after {stay:?} half-open");
            let line = access_line(&proxy, me).await;
            assert_eq!(line.get("route"), Some("plain"), "{what}: {}", line.raw);
            assert_ne!(line.get("end"), Some("half_close_timeout"), "{what}: {}", line.raw);
            let bytes = if first == First::Client { (1, 5) } else { (5, 1) };
            assert_eq!((line.num("bytes_up"), line.num("bytes_down")), bytes, "{what}: {}", line.raw);
        }
        stop_ok(proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// 9. One route on IPv4 and IPv6
// ---------------------------------------------------------------------------------------

/// `listen = ["127.0.0.1:0", "[::1]:0"]`: both addresses are bound and serve the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_route_listens_on_ipv4_and_ipv6() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("SKIP one_route_listens_on_ipv4_and_ipv6: cannot bind [::1]:0 on this host ({e})");
        return;
    }
    for engine in harness::engines() {
        let a = Tagged::start(b'A').await;
        let dir = ConfDir::new("dual_stack", &engine);
        let path =
            dir.write(&format!("{}{}", head(&engine), route("both", &["127.0.0.1:0", "[::1]:0"], &[a.addr], "")));
        let proxy = Proxy::start_config(&path).await;
        proxy.wait_for_log("listening addr=127.0.0.1:", QUICK).await;
        proxy.wait_for_log("listening addr=[::1]:", QUICK).await;
        let addrs: Vec<SocketAddr> = proxy
            .listeners()
            .into_iter()
            .filter(|(_, routes)| routes == &["both".to_string()])
            .map(|(a, _)| a)
            .collect();
        assert_eq!(addrs.len(), 2, "[{engine}] listeners: {:?}", proxy.listeners());
        assert!(addrs.iter().any(|a| a.is_ipv4()) && addrs.iter().any(|a| a.is_ipv6()), "[{engine}] {addrs:?}");
        for addr in addrs {
            let what = format!("[{engine}] client on {addr}");
            let (tag, me) = ask_ok(addr, &what).await;
            assert_eq!(tag, b'A', "{what}");
            assert_eq!(me.is_ipv6(), addr.is_ipv6());
            assert_routed(&proxy, me, "both", a.addr, &what).await;
        }
        assert_eq!(a.accepted(), 2, "[{engine}] connections on the backend");
        stop_ok(proxy).await;
    }
}
