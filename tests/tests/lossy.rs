//! Both engines across real links that lose and duplicate packets (issue 17, item 5): a
//! client, ntlm-splice and a backend in three network namespaces joined by veth
//! (`netns::Lab`), and on every link, each way, nftables dropping and duplicating a share of
//! the TCP packets (this kernel has no netem): `numgen random ... drop`, and `dup to` the
//! link's peer, in the output hook of each namespace, so that every packet the client, the
//! splicer or the backend sends can be lost or arrive twice.
//!
//! Several connections at once each send a byte pattern and the backend echoes it: every
//! byte must come back in order, each direction having crossed both lossy links, and the
//! access log must count exactly the bytes sent each way, on the engine under test. The
//! rules' own counters must show drops and duplicates on every link, so the test cannot pass
//! on links that were not lossy.
//!
//! Needs root (network namespaces, nft): skips with the reason without it, fails under CI.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::Arc,
    time::Duration,
};

use ntlm_splice_tests::{
    harness::{self, Proxy, within},
    netns::{Family, Lab, Netns},
    servers,
};
use tokio::{io::AsyncWriteExt, task::JoinSet};

/// Connections at once, per engine and family.
const CONNECTIONS: u64 = 4;
/// Bytes each connection sends (and gets back).
const BYTES: u64 = 64 << 20;
/// Packets dropped, per thousand sent on each link each way.
const DROP_PER_MILLE: u32 = 20;
/// Packets duplicated, per thousand of those not dropped.
const DUP_PER_MILLE: u32 = 10;
/// Bound of one connection's echo (a failure bound: on this box it takes seconds).
const ECHO_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound for a connect or a log line.
const QUICK: Duration = Duration::from_secs(10);

/// The nft family keyword of `family`.
fn nft_family(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// Makes `ns`'s TCP packets of `family` leaving by `dev` lossy: some dropped, some of the rest
/// sent twice (the copy to `peer`, the link's other end).
fn lossy(ns: &Netns, family: Family, dev: &str, peer: IpAddr) {
    let f = nft_family(family);
    ns.sh(&format!("nft add table {f} lossy"));
    // Priority before anything else on the output path.
    ns.sh(&format!("nft add chain {f} lossy out '{{ type filter hook output priority -300; policy accept; }}'"));
    ns.sh(&format!(
        "nft add rule {f} lossy out oifname {dev} meta l4proto tcp numgen random mod 1000 < {DROP_PER_MILLE} counter drop"
    ));
    ns.sh(&format!(
        "nft add rule {f} lossy out oifname {dev} meta l4proto tcp numgen random mod 1000 < {DUP_PER_MILLE} counter dup to {peer} device {dev}"
    ));
}

/// The packet counts of the lossy rules in `ns` (drops, duplicates), per rule in order.
fn counters(ns: &Netns, family: Family) -> Vec<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft", "list", "chain", nft_family(family), "lossy", "out"])
        .output()
        .expect("nft list chain");
    assert!(out.status.success(), "nft list chain: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("counter packets ")
        .skip(1)
        .map(|rest| rest.split_whitespace().next().and_then(|n| n.parse().ok()).expect("a packet count"))
        .collect()
}

/// The kernel's TCP counters `names` in `ns` (`nstat -az`, absolute), summed.
fn tcp_counters(ns: &Netns, names: &[&str]) -> u64 {
    let out =
        Command::new("ip").args(["netns", "exec", ns.name(), "nstat", "-az"]).args(names).output().expect("nstat");
    assert!(out.status.success(), "nstat: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| names.iter().any(|n| l.starts_with(n)))
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()))
        .sum()
}

/// Every link of the lab made lossy both ways, for `family`.
fn make_lossy(lab: &Lab, family: Family) {
    let a = lab.addrs(family);
    lossy(&lab.client, family, "to-splicer", a.splicer_front);
    lossy(&lab.splicer, family, "to-client", a.client);
    lossy(&lab.splicer, family, "to-backend", a.backend);
    lossy(&lab.backend, family, "to-splicer", a.splicer_back);
}

/// An echo server on `ip` port 0 in the lab's backend namespace.
fn echo_backend(lab: &Lab, ip: IpAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = lab.backend.listen(ip);
    let addr = l.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// From the client namespace: sends [`BYTES`] of pattern `seed` to `to` and half-closes,
/// while reading the echo to EOF and checking every byte.
async fn echo(lab: Arc<Lab>, family: Family, to: SocketAddr, seed: u64, what: String) {
    let socket = lab.client.tcp_socket(family);
    let stream = within(QUICK, &format!("{what}: connect"), socket.connect(to))
        .await
        .unwrap_or_else(|e| panic!("{what}: connect to {to}: {e}"));
    let (mut r, mut w) = stream.into_split();
    let send = async move {
        servers::send_pattern(&mut w, seed, BYTES).await?;
        w.shutdown().await
    };
    let (sent, got) = within(ECHO_TIMEOUT, &format!("{what}: echo"), async {
        tokio::join!(send, servers::recv_pattern(&mut r, seed))
    })
    .await;
    sent.unwrap_or_else(|e| panic!("{what}: sending: {e}"));
    let v = got.unwrap_or_else(|e| panic!("{what}: receiving: {e}"));
    v.assert_exact(BYTES, &what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_are_byte_exact_across_links_that_lose_and_duplicate() {
    for engine in harness::engines() {
        for family in Family::ALL {
            let Some(lab) = Lab::new("lossy").map(Arc::new) else { return };
            make_lossy(&lab, family);
            let a = lab.addrs(family);
            let (backend, server) = echo_backend(&lab, a.backend);
            let listen = SocketAddr::new(a.splicer_front, 0);
            let args: Vec<String> =
                ["--engine", &engine, "--listen", &listen.to_string(), "--backend", &backend.to_string()]
                    .map(String::from)
                    .to_vec();
            let proxy = Proxy::start_args_in(lab.splicer.name(), &args).await;
            let to = proxy.addr();
            let tag = format!("[{engine} {family:?}]");
            let started = std::time::Instant::now();
            let mut set = JoinSet::new();
            for i in 0..CONNECTIONS {
                set.spawn(echo(lab.clone(), family, to, 170 + i, format!("{tag} connection {}", i + 1)));
            }
            while let Some(r) = set.join_next().await {
                r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            }
            eprintln!("{tag} {CONNECTIONS} × {} MiB echoed byte-exact in {:?}", BYTES >> 20, started.elapsed());

            // The log counts exactly what crossed, on the engine under test.
            for id in 1..=CONNECTIONS {
                proxy.wait_for_log(&format!(" access: conn={id} "), QUICK).await;
            }
            let lines = proxy.access_lines();
            assert_eq!(lines.len() as u64, CONNECTIONS, "{tag} one line per connection:\n{}", proxy.logs());
            for l in &lines {
                assert_eq!(l.get("engine"), Some(engine.as_str()), "{tag} {}", l.raw);
                assert_eq!((l.num("bytes_up"), l.num("bytes_down")), (BYTES, BYTES), "{tag} {}", l.raw);
                assert_eq!(l.get("end"), Some("client_fin"), "{tag} {}", l.raw);
            }

            // Every link, each way, lost and duplicated packets during the run.
            let mut seen = BTreeMap::new();
            seen.insert("client", counters(&lab.client, family));
            seen.insert("splicer", counters(&lab.splicer, family));
            seen.insert("backend", counters(&lab.backend, family));
            eprintln!("{tag} lossy rules' packet counts (drop, dup per link): {seen:?}");
            for (ns, counts) in &seen {
                assert!(counts.len() >= 2 && counts.iter().all(|&n| n > 0), "{tag} {ns}: {counts:?}");
            }
            // And TCP saw it: retransmissions, and duplicates received (answered with a D-SACK).
            let namespaces = [&lab.client, &lab.splicer, &lab.backend];
            let retrans: u64 = namespaces.iter().map(|ns| tcp_counters(ns, &["TcpRetransSegs"])).sum();
            let dsacks: u64 =
                namespaces.iter().map(|ns| tcp_counters(ns, &["TcpExtTCPDSACKOldSent", "TcpExtTCPDSACKOfoSent"])).sum();
            eprintln!("{tag} TCP retransmitted {retrans} segments; {dsacks} duplicates answered with a D-SACK");
            assert!(retrans > 0 && dsacks > 0, "{tag} retransmissions {retrans}, D-SACKs {dsacks}");
            let status = proxy.stop().await;
            assert!(status.success(), "{tag} ntlm-splice exited with {status}");
            server.abort();
        }
    }
}
