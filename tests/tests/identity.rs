//! The client's identity at the backend (issue 15), end to end in network namespaces: a
//! client, ntlm-splice in a splicer namespace with the README's transparent-proxy routing,
//! and a backend whose default route goes via the splicer (`netns::Lab`). The backend
//! records the peer address of every connection it accepts and tells it to the client, so
//! a test compares what the backend saw with the client socket's own address:
//!
//! - the lab itself: each line of the README's routing is needed for a transparent
//!   connection (`netns::TRANSPARENT_ROUTING`, tried without each);
//! - no `source`: the backend sees the splicer (the control: the lab can tell them apart);
//! - `source = "client"`: the client's IP and port;
//! - `source = "client-ip"`: the client's IP;
//! - `source = "ADDR"`: that fixed splicer address;
//! - NTLM (curl --ntlm) logs in through a transparent connection, as the right user;
//! - the access log's `client=` and `peer=` are the real client;
//! - a backend of the other family than the client is skipped for the next one.
//!
//! Every scenario runs for each engine in `harness::engines()` and for IPv4 and IPv6. The
//! suite needs root (network namespaces, IP_TRANSPARENT): without it, it skips with the
//! reason, and fails under CI.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use ntlm_splice_tests::{
    harness::{self, AccessLine, Proxy, within},
    netns::{Family, Lab, Netns, TRANSPARENT_ROUTING},
    ntlm::{DEFAULT_DOMAIN, NtlmServer, demo_users},
    servers,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
    task::{JoinHandle, JoinSet},
};

/// Bound for anything that should be quick: a connect, an exchange, a log line.
const QUICK: Duration = Duration::from_secs(10);
/// Bound for one curl run, above curl's own `--max-time`.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// curl's `--max-time`, below [`CLIENT_TIMEOUT`] so curl reports what it was doing.
const CURL_MAX_TIME_SECS: &str = "45";
/// Bytes the client sends and the backend echoes after telling the peer it saw: enough to
/// fill the sockets' buffers, so that the backend's answers keep travelling the
/// transparent connection well past its handshake.
const ECHO_BYTES: u64 = 1 << 20;
/// Seed of the echoed byte pattern.
const SEED: u64 = 15;
/// Marker that starts curl's `--write-out` line.
const CURL_MARK: &str = "@@identity ";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The recording backend: for every connection it remembers the peer address, writes it as
/// one line (`ADDR\n`), then echoes every byte until the client's EOF and closes.
struct PeerBackend {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Drop for PeerBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PeerBackend {
    /// Listens on `ip` port 0 in the lab's backend namespace.
    fn start(lab: &Lab, ip: IpAddr) -> PeerBackend {
        let l = lab.backend.listen(ip);
        let addr = l.local_addr().expect("local_addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, peer)) = l.accept().await {
                seen.lock().unwrap().push(peer);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    if w.write_all(format!("{peer}\n").as_bytes()).await.is_ok()
                        && tokio::io::copy(&mut r, &mut w).await.is_ok()
                    {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        PeerBackend { addr, peers, task }
    }

    /// Peer addresses of the connections accepted so far, in order.
    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// `ntlm-splice --engine ENGINE --listen FRONT:0 --backend B... EXTRA...` in the splicer's
/// namespace.
async fn proxy(
    lab: &Lab,
    engine: &str,
    family: Family,
    backends: &[SocketAddr],
    extra: &[&str],
) -> Proxy {
    let listen = SocketAddr::new(lab.addrs(family).splicer_front, 0);
    let mut args = vec![
        "--engine".to_string(),
        engine.to_string(),
        "--listen".into(),
        listen.to_string(),
    ];
    for b in backends {
        args.extend(["--backend".into(), b.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Proxy::start_args_in(lab.splicer.name(), &args).await
}

/// Stops the proxy (SIGTERM) and checks it exited cleanly.
async fn stop(what: &str, proxy: Proxy) {
    let logs = proxy.logs();
    let status = proxy.stop().await;
    assert!(
        status.success(),
        "{what}: ntlm-splice exited with {status}:\n{logs}"
    );
}

/// What one connection through the proxy showed.
struct Exchange {
    /// The client socket's own address.
    client: SocketAddr,
    /// The peer address the backend told.
    seen: SocketAddr,
}

/// From the lab's client namespace: connects to `to`, sends [`ECHO_BYTES`] and half-closes,
/// reads the backend's peer line and the echo to EOF, and checks the echo byte for byte.
async fn exchange(lab: &Lab, family: Family, to: SocketAddr, what: &str) -> Exchange {
    let socket = lab.client.tcp_socket(family);
    let stream = within(
        QUICK,
        &format!("{what}: connect to {to}"),
        socket.connect(to),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: connect to {to}: {e}"));
    let client = stream.local_addr().expect("local_addr");
    let (mut r, mut w) = stream.into_split();
    let send = async move {
        servers::send_pattern(&mut w, SEED, ECHO_BYTES).await?;
        w.shutdown().await
    };
    let recv = async move {
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.map(|_| all)
    };
    let (sent, received) = within(QUICK, &format!("{what}: exchange through {to}"), async {
        tokio::join!(send, recv)
    })
    .await;
    sent.unwrap_or_else(|e| panic!("{what}: sending: {e}"));
    let received = received.unwrap_or_else(|e| panic!("{what}: receiving: {e}"));
    let nl = received
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or_else(|| {
            panic!(
                "{what}: no peer line from the backend ({} bytes received)",
                received.len()
            )
        });
    let line = String::from_utf8_lossy(&received[..nl]);
    let seen: SocketAddr = line
        .parse()
        .unwrap_or_else(|e| panic!("{what}: the backend's peer line {line:?}: {e}"));
    let mut echo = servers::Verifier::new(SEED);
    echo.update(&received[nl + 1..]);
    echo.assert_exact(ECHO_BYTES, &format!("{what}: the echo"));
    Exchange { client, seen }
}

/// Waits for access line `conn` (the proxy numbers its connections 1, 2, ...).
async fn access_line(proxy: &Proxy, conn: usize) -> AccessLine {
    proxy
        .wait_for_log(&format!(" access: conn={conn} "), QUICK)
        .await;
    let id = conn.to_string();
    proxy
        .access_lines()
        .into_iter()
        .find(|l| l.get("conn") == Some(id.as_str()))
        .unwrap_or_else(|| panic!("no access line for conn={conn}:\n{}", proxy.logs()))
}

/// Every (engine, family) pair to run.
fn cases() -> Vec<(String, Family)> {
    harness::engines()
        .into_iter()
        .flat_map(|e| Family::ALL.map(|f| (e.clone(), f)))
        .collect()
}

/// One connection through a proxy started with `extra`, against a fresh recording backend:
/// checks the backend's own record against what it told the client, and the access line's
/// `client=`, `peer=` and `backend=`. Returns the exchange.
async fn through_proxy(
    lab: &Lab,
    engine: &str,
    family: Family,
    extra: &[&str],
    what: &str,
) -> Exchange {
    let backend = PeerBackend::start(lab, lab.addrs(family).backend);
    let proxy = proxy(lab, engine, family, &[backend.addr], extra).await;
    let x = exchange(lab, family, proxy.addr(), what).await;
    assert_eq!(
        backend.peers(),
        vec![x.seen],
        "{what}: the backend's record and what it told the client"
    );
    let line = access_line(&proxy, 1).await;
    let client = x.client.to_string();
    assert_eq!(
        line.get("client"),
        Some(client.as_str()),
        "{what}: client= is the client: {}",
        line.raw
    );
    assert_eq!(
        line.get("peer"),
        Some(client.as_str()),
        "{what}: peer= is the client (no PROXY header): {}",
        line.raw
    );
    assert_eq!(
        line.get("backend"),
        Some(backend.addr.to_string().as_str()),
        "{what}: {}",
        line.raw
    );
    stop(what, proxy).await;
    x
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// How long a transparent connect in a lab may take before it counts as failed: it takes
/// milliseconds when the routing works, and never completes when it does not (the SYN-ACK
/// is dropped and retransmitted for minutes).
const TRANSPARENT_CONNECT: Duration = Duration::from_secs(3);

/// A transparent connect made by the test itself from the splicer's namespace, bound to the
/// client's address (IP_TRANSPARENT, as ntlm-splice's `source = "client-ip"` does) to the
/// backend: whether it connected within [`TRANSPARENT_CONNECT`], and the peer the backend
/// told.
async fn transparent_connect(lab: &Lab, family: Family, backend: SocketAddr) -> Option<SocketAddr> {
    let client = lab.addrs(family).client;
    let socket = lab
        .splicer
        .enter(|| {
            let (s, level, opt) = match family {
                Family::V4 => (TcpSocket::new_v4()?, libc::SOL_IP, libc::IP_TRANSPARENT),
                Family::V6 => (TcpSocket::new_v6()?, libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
            };
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own, with a c_int it reads and does not keep.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    level,
                    opt,
                    (&raw const one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            s.bind(SocketAddr::new(client, 0))?;
            Ok(s)
        })
        .unwrap_or_else(|e: std::io::Error| panic!("transparent socket bound to {client}: {e}"));
    let mut stream = match tokio::time::timeout(TRANSPARENT_CONNECT, socket.connect(backend)).await
    {
        Err(_) => return None,
        Ok(r) => r.unwrap_or_else(|e| panic!("transparent connect {client} -> {backend}: {e}")),
    };
    stream.shutdown().await.expect("shutdown");
    let mut line = String::new();
    within(
        QUICK,
        "the backend's peer line",
        stream.read_to_string(&mut line),
    )
    .await
    .expect("read the peer line");
    Some(
        line.trim_end()
            .parse()
            .unwrap_or_else(|e| panic!("the backend's peer line {line:?}: {e}")),
    )
}

/// The lab itself, without ntlm-splice: with the README's routing a transparent connection
/// from the splicer carries the client's address to the backend, and each of the routing
/// lines is needed for it (the nft rule for both families, `ip rule` and `ip route` for
/// theirs). A failure here is the host or the lab, not ntlm-splice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transparent_routing_line_is_needed() {
    /// The three nft lines stand or fall together (the rule needs the table and chain).
    const NFT: &[&str] = &[
        TRANSPARENT_ROUTING[0],
        TRANSPARENT_ROUTING[1],
        TRANSPARENT_ROUTING[2],
    ];
    let mut omissions: Vec<(Vec<&str>, Vec<Family>)> = vec![
        (Vec::new(), Vec::new()),
        (NFT.to_vec(), Family::ALL.to_vec()),
    ];
    for line in &TRANSPARENT_ROUTING[NFT.len()..] {
        let family = if line.starts_with("ip -6 ") {
            Family::V6
        } else {
            Family::V4
        };
        omissions.push((vec![line], vec![family]));
    }
    assert_eq!(
        omissions.iter().map(|(o, _)| o.len()).sum::<usize>(),
        TRANSPARENT_ROUTING.len(),
        "every line is omitted once"
    );
    let mut checks = JoinSet::new();
    for (omit, broken) in omissions {
        checks.spawn(async move {
            let Some(lab) = Lab::omitting("every_transparent_routing_line_is_needed", &omit) else {
                return;
            };
            for family in Family::ALL {
                let backend = PeerBackend::start(&lab, lab.addrs(family).backend);
                let seen = transparent_connect(&lab, family, backend.addr).await;
                if broken.contains(&family) {
                    assert_eq!(
                        seen, None,
                        "{family:?} connected without {omit:?}: that line is not needed"
                    );
                } else {
                    let seen = seen.unwrap_or_else(|| {
                        panic!("{family:?}: no transparent connection without {omit:?}")
                    });
                    assert_eq!(
                        seen.ip(),
                        lab.addrs(family).client,
                        "{family:?} without {omit:?}"
                    );
                }
            }
        });
    }
    while let Some(r) = checks.join_next().await {
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// The control: without `source` the backend sees the splicer's own address, not the
/// client's (so the lab tells the two apart, and the tests below can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_source_the_backend_sees_the_splicer() {
    let Some(lab) = Lab::new("without_source_the_backend_sees_the_splicer") else {
        return;
    };
    for (engine, family) in cases() {
        let what = format!("[{engine} {family:?} no source]");
        let backend = PeerBackend::start(&lab, lab.addrs(family).backend);
        let proxy = proxy(&lab, &engine, family, &[backend.addr], &[]).await;
        let x = exchange(&lab, family, proxy.addr(), &what).await;
        assert_eq!(
            x.seen.ip(),
            lab.addrs(family).splicer_back,
            "{what}: the kernel's source towards the backend"
        );
        assert_ne!(x.seen.ip(), x.client.ip(), "{what}");
        stop(&what, proxy).await;
    }
}

/// `--source client`: the backend sees the client's IP and port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_client_backend_sees_client_ip_and_port() {
    let Some(lab) = Lab::new("source_client_backend_sees_client_ip_and_port") else {
        return;
    };
    for (engine, family) in cases() {
        let what = format!("[{engine} {family:?} --source client]");
        let x = through_proxy(&lab, &engine, family, &["--source", "client"], &what).await;
        assert_eq!(
            x.seen, x.client,
            "{what}: the backend sees the client's address and port"
        );
    }
}

/// `--source client-ip`: the backend sees the client's IP (the port is any free one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_client_ip_backend_sees_client_ip() {
    let Some(lab) = Lab::new("source_client_ip_backend_sees_client_ip") else {
        return;
    };
    for (engine, family) in cases() {
        let what = format!("[{engine} {family:?} --source client-ip]");
        let x = through_proxy(&lab, &engine, family, &["--source", "client-ip"], &what).await;
        assert_eq!(
            x.seen.ip(),
            x.client.ip(),
            "{what}: the backend sees the client's address"
        );
    }
}

/// `--source ADDR`: the backend sees that fixed splicer address, not the kernel's choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_fixed_address_backend_sees_it() {
    let Some(lab) = Lab::new("source_fixed_address_backend_sees_it") else {
        return;
    };
    for (engine, family) in cases() {
        let fixed = lab.addrs(family).splicer_fixed;
        let what = format!("[{engine} {family:?} --source {fixed}]");
        let x = through_proxy(
            &lab,
            &engine,
            family,
            &["--source", &fixed.to_string()],
            &what,
        )
        .await;
        assert_eq!(
            x.seen.ip(),
            fixed,
            "{what}: the backend sees the fixed source"
        );
        assert_ne!(
            fixed,
            lab.addrs(family).splicer_back,
            "the fixed source must differ from the kernel's choice"
        );
    }
}

/// The config-file form (`source = "client"` in a `[[route]]`), and the access log: its
/// `client=` and `peer=` name the real client, its `backend=` the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_names_the_real_client_with_a_transparent_route() {
    let Some(lab) = Lab::new("access_log_names_the_real_client_with_a_transparent_route") else {
        return;
    };
    for (engine, family) in cases() {
        let what = format!("[{engine} {family:?} config source = \"client\"]");
        let backend = PeerBackend::start(&lab, lab.addrs(family).backend);
        let listen = SocketAddr::new(lab.addrs(family).splicer_front, 0);
        let dir = ConfDir::new(&format!("{engine}-{family:?}"));
        let path = dir.write(&format!(
            "[global]\ndrain_timeout = \"5s\"\n\n[defaults]\nengine = \"{engine}\"\nconnect_timeout = \"2s\"\n\n\
             [[route]]\nname = \"transparent\"\nlisten = [\"{listen}\"]\nbackends = [\"{}\"]\nsource = \"client\"\n",
            backend.addr
        ));
        let proxy = Proxy::start_args_in(
            lab.splicer.name(),
            &["--config".to_string(), path.display().to_string()],
        )
        .await;
        let x = exchange(&lab, family, proxy.addr(), &what).await;
        assert_eq!(
            x.seen, x.client,
            "{what}: the backend sees the client's address and port"
        );
        let line = access_line(&proxy, 1).await;
        let client = x.client.to_string();
        assert_eq!(
            line.get("client"),
            Some(client.as_str()),
            "{what}: client= is the real client: {}",
            line.raw
        );
        assert_eq!(
            line.get("peer"),
            Some(client.as_str()),
            "{what}: peer= is the socket's peer: {}",
            line.raw
        );
        assert_eq!(
            line.get("backend"),
            Some(backend.addr.to_string().as_str()),
            "{what}: {}",
            line.raw
        );
        assert_eq!(
            line.get("route"),
            Some("transparent"),
            "{what}: {}",
            line.raw
        );
        stop(&what, proxy).await;
    }
}

/// NTLM logs in through a transparent connection: curl --ntlm in the client namespace is
/// served as alice by the NTLM backend, which saw curl's own address and port on its one
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ntlm_logs_in_through_a_transparent_source() {
    let Some(lab) = Lab::new("ntlm_logs_in_through_a_transparent_source") else {
        return;
    };
    for (engine, family) in cases() {
        let what = format!("[{engine} {family:?} NTLM --source client]");
        let listener = lab.backend.listen(lab.addrs(family).backend);
        let backend = NtlmServer::from_listener(listener, DEFAULT_DOMAIN, demo_users())
            .unwrap_or_else(|e| panic!("cannot start the NTLM backend: {e}"));
        let proxy = proxy(
            &lab,
            &engine,
            family,
            &[backend.local_addr()],
            &["--source", "client"],
        )
        .await;
        let url = format!("http://{}/whoami", proxy.addr());
        let t = curl_ntlm(&lab.client, &url, "EXAMPLE\\alice", "Alice-Pass-1").await;
        assert_eq!(
            (t.status, t.body.as_str()),
            (200, "EXAMPLE\\alice"),
            "{what}: curl --ntlm as alice"
        );
        assert_eq!(
            backend.peers(),
            vec![t.local],
            "{what}: one backend connection, from curl's own address"
        );
        let line = access_line(&proxy, 1).await;
        assert_eq!(
            line.get("client"),
            Some(t.local.to_string().as_str()),
            "{what}: {}",
            line.raw
        );
        stop(&what, proxy).await;
    }
}

/// A backend of the other family than the client cannot be reached from the client's
/// address: its connect fails and the next backend serves the client, transparently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_client_skips_a_backend_of_the_other_family() {
    /// Connections per case: with round-robin, every backend is first in line at least once.
    const CONNECTIONS: usize = 2;
    let Some(lab) = Lab::new("source_client_skips_a_backend_of_the_other_family") else {
        return;
    };
    for (engine, family) in cases() {
        let what = format!("[{engine} {family:?} --source client, mixed-family backends]");
        let other = match family {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        };
        let wrong = PeerBackend::start(&lab, lab.addrs(other).backend);
        let right = PeerBackend::start(&lab, lab.addrs(family).backend);
        let proxy = proxy(
            &lab,
            &engine,
            family,
            &[wrong.addr, right.addr],
            &["--source", "client"],
        )
        .await;
        let mut clients = Vec::new();
        for n in 1..=CONNECTIONS {
            let x = exchange(&lab, family, proxy.addr(), &what).await;
            assert_eq!(
                x.seen, x.client,
                "{what}: connection {n} reached the right backend transparently"
            );
            let line = access_line(&proxy, n).await;
            assert_eq!(
                line.get("backend"),
                Some(right.addr.to_string().as_str()),
                "{what}: {}",
                line.raw
            );
            clients.push(x.client);
        }
        assert_eq!(
            wrong.peers(),
            Vec::<SocketAddr>::new(),
            "{what}: the other family's backend accepted nothing"
        );
        assert_eq!(right.peers(), clients, "{what}");
        stop(&what, proxy).await;
    }
}

// ---------------------------------------------------------------------------------------
// curl and config files
// ---------------------------------------------------------------------------------------

/// One curl transfer.
#[derive(Debug)]
struct Transfer {
    status: u16,
    body: String,
    /// curl's own address (`%{local_ip}`, `%{local_port}`).
    local: SocketAddr,
}

/// `curl --ntlm -u USER:PASSWORD URL` in `ns`.
async fn curl_ntlm(ns: &Netns, url: &str, user: &str, password: &str) -> Transfer {
    let mut cmd = ns.command("curl");
    cmd.args([
        "-sS",
        "--globoff",
        "--noproxy",
        "*",
        "--max-time",
        CURL_MAX_TIME_SECS,
    ])
    .args([
        "--write-out",
        &format!("\n{CURL_MARK}%{{http_code}} %{{local_ip}} %{{local_port}}\n"),
    ])
    .args(["--ntlm", "-u", &format!("{user}:{password}"), url])
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let out = within(CLIENT_TIMEOUT, &format!("curl {url}"), cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run curl in {} (is it installed?): {e}", ns.name()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "curl {url} failed with {}: {stderr}\n{stdout}",
        out.status
    );
    let (body, tail) = stdout
        .rsplit_once(&format!("\n{CURL_MARK}"))
        .unwrap_or_else(|| panic!("no --write-out line:\n{stdout}"));
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let [status, ip, port] = fields[..] else {
        panic!("curl --write-out line {tail:?}")
    };
    let ip: IpAddr = ip
        .parse()
        .unwrap_or_else(|e| panic!("curl's local_ip {ip:?}: {e}"));
    Transfer {
        status: status
            .parse()
            .unwrap_or_else(|e| panic!("curl's http_code {status:?}: {e}")),
        body: body.trim_end_matches('\n').to_string(),
        local: SocketAddr::new(
            ip,
            port.parse()
                .unwrap_or_else(|e| panic!("curl's local_port {port:?}: {e}")),
        ),
    }
}

/// A fresh temporary directory holding one config file; removed on drop.
struct ConfDir {
    dir: PathBuf,
}

impl ConfDir {
    fn new(test: &str) -> ConfDir {
        let dir = std::env::temp_dir().join(format!(
            "ntlm-splice-identity-{}-{test}",
            std::process::id()
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .unwrap_or_else(|e| panic!("removing the stale {}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        ConfDir { dir }
    }

    /// Writes the config file and returns its path.
    fn write(&self, text: &str) -> PathBuf {
        let path = self.dir.join("ntlm-splice.toml");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
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
