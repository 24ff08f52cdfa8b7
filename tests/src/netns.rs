//! Network namespaces for the end-to-end tests that need real addresses instead of
//! loopback: a client, a splicer and a backend, each in its own namespace, joined by veth
//! pairs, with the splicer's transparent-proxy routing exactly as the README documents it.
//!
//! ```text
//!  client                 splicer                               backend
//!  192.0.2.2/24    ---    192.0.2.1/24 | 198.51.100.1/24   ---  198.51.100.2/24
//!  2001:db8:1::2/64       2001:db8:1::1 | 2001:db8:2::1/64      2001:db8:2::2/64
//!              (+ 203.0.113.10/32, 2001:db8:3::10/128 on the splicer's lo: a fixed source)
//! ```
//!
//! The backend's default routes go via the splicer, so its answers to a client address
//! reach the splicer; the splicer does not forward (a new namespace starts with forwarding
//! off), so they reach nobody unless [`TRANSPARENT_ROUTING`] delivers them to the
//! splicer's own transparent socket. The client has no route to the backend at all.
//!
//! Commands run as `ip netns exec NAME ...`; sockets of the test process itself are made in
//! a namespace by [`Netns::enter`] (a socket stays in the namespace it was created in). Every
//! [`Lab`] has its own names (PID and a counter), so tests run side by side; the namespaces
//! are deleted when the `Lab` drops, also when a test panics.

use std::{
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// The splicer's transparent-proxy set-up, as the README gives it: shell lines, run in the
/// splicer's namespace as they stand (`'...'` quotes one argument). Every line is needed:
/// without the nft rule neither family connects, without the IPv4 `rule` or `route` IPv4
/// does not, without the IPv6 ones IPv6 does not (the backend's SYN-ACK to the client's
/// address is not delivered to the splicer's socket, and the connect times out).
pub const TRANSPARENT_ROUTING: &[&str] = &[
    "nft add table inet ntlm_splice",
    "nft add chain inet ntlm_splice divert '{ type filter hook prerouting priority mangle; policy accept; }'",
    "nft add rule inet ntlm_splice divert meta l4proto tcp socket transparent 1 meta mark set 0x1 accept",
    "ip rule add fwmark 0x1 lookup 100",
    "ip route add local 0.0.0.0/0 dev lo table 100",
    "ip -6 rule add fwmark 0x1 lookup 100",
    "ip -6 route add local ::/0 dev lo table 100",
];

/// An address family of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];
}

/// The lab's addresses in one family.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    /// The client.
    pub client: IpAddr,
    /// The splicer on the client's link (where the proxy listens).
    pub splicer_front: IpAddr,
    /// The splicer on the backend's link (the source the kernel picks towards the backend).
    pub splicer_back: IpAddr,
    /// A further splicer address (on its `lo`, outside both links, so the kernel never
    /// picks it as a source by itself), for a fixed `source`.
    pub splicer_fixed: IpAddr,
    /// The backend.
    pub backend: IpAddr,
}

const V4: Addrs = Addrs {
    client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
    splicer_front: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    splicer_back: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
    splicer_fixed: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
    backend: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
};
const V6: Addrs = Addrs {
    client: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2)),
    splicer_front: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1)),
    splicer_back: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1)),
    splicer_fixed: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x10)),
    backend: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2)),
};
/// Prefix lengths of the two links.
const V4_PREFIX: u8 = 24;
const V6_PREFIX: u8 = 64;

/// Interface names, each inside its own namespace (so equal in every lab).
const SPLICER_TO_CLIENT: &str = "to-client";
const SPLICER_TO_BACKEND: &str = "to-backend";
const TO_SPLICER: &str = "to-splicer";

/// Tells apart the labs of one test process.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// One named network namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Its name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`, to add arguments to and run (tokio).
    pub fn command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `ip netns exec NAME ARGS...` to its end; panics with its output if it fails.
    pub fn run(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `ip netns exec {} {}`: {e}",
                    self.name,
                    args.join(" ")
                )
            });
        assert!(
            out.status.success(),
            "`ip netns exec {} {}` failed ({}): {}{}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs one shell-like `line` (words; `'...'` quotes one argument) as
    /// `ip netns exec NAME WORDS...`; panics with its output if it fails.
    pub fn sh(&self, line: &str) {
        let words = split_words(line);
        self.run(&words.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// Runs `f` on a thread that has joined this namespace, and returns what it returns.
    /// Sockets `f` creates stay in this namespace when used elsewhere (a listener to hand
    /// to tokio, a `TcpSocket` to connect from).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a descriptor we hold open; it moves only this thread, which
                // ends right after `f`.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// A listener on `ip` port 0 inside this namespace, served by tokio.
    pub fn listen(&self, ip: IpAddr) -> tokio::net::TcpListener {
        let l = self
            .enter(|| std::net::TcpListener::bind(std::net::SocketAddr::new(ip, 0)))
            .unwrap_or_else(|e| panic!("cannot listen on {ip} in {}: {e}", self.name));
        l.set_nonblocking(true).expect("O_NONBLOCK");
        tokio::net::TcpListener::from_std(l).expect("tokio listener")
    }

    /// A TCP socket of `family` made inside this namespace, to connect from.
    pub fn tcp_socket(&self, family: Family) -> tokio::net::TcpSocket {
        self.enter(|| match family {
            Family::V4 => tokio::net::TcpSocket::new_v4(),
            Family::V6 => tokio::net::TcpSocket::new_v6(),
        })
        .unwrap_or_else(|e| panic!("cannot make a socket in {}: {e}", self.name))
    }
}

/// Client, splicer and backend namespaces, wired as the module documentation draws them.
/// Dropping it deletes the namespaces.
#[derive(Debug)]
pub struct Lab {
    /// Where the client connects from.
    pub client: Netns,
    /// Where ntlm-splice runs, with [`TRANSPARENT_ROUTING`].
    pub splicer: Netns,
    /// Where the backend listens; its default routes go via the splicer.
    pub backend: Netns,
}

impl Lab {
    /// Builds a lab for test `test`. `None` when this host cannot (not root, no `ip netns`,
    /// no `nft`): the reason is printed; under CI (`CI=true`) that is a failure instead.
    pub fn new(test: &str) -> Option<Lab> {
        Self::omitting(test, &[])
    }

    /// As [`Lab::new`], but without the lines of [`TRANSPARENT_ROUTING`] in `omit` (for the
    /// test that shows each line is needed).
    pub fn omitting(test: &str, omit: &[&str]) -> Option<Lab> {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("nsplice-{}-{n}", std::process::id());
        let name = |role: &str| format!("{prefix}-{role}");
        if let Err(why) = probe(&name("client")) {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("CI=true but the network-namespace tests cannot run here: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        let lab = Lab {
            client: Netns {
                name: name("client"),
            },
            splicer: Netns {
                name: name("splicer"),
            },
            backend: Netns {
                name: name("backend"),
            },
        };
        // From here a panic drops `lab`, which deletes whatever was made.
        for ns in [&lab.splicer, &lab.backend] {
            ip(&["netns", "add", ns.name()]);
        }
        lab.wire(omit);
        Some(lab)
    }

    /// The lab's addresses in `family`.
    pub fn addrs(&self, family: Family) -> Addrs {
        match family {
            Family::V4 => V4,
            Family::V6 => V6,
        }
    }

    fn wire(&self, omit: &[&str]) {
        let (c, s, b) = (&self.client, &self.splicer, &self.backend);
        for ns in [c, s, b] {
            ns.sh("ip link set lo up");
        }
        let (cn, bn) = (c.name(), b.name());
        s.sh(&format!(
            "ip link add {SPLICER_TO_CLIENT} type veth peer name {TO_SPLICER} netns {cn}"
        ));
        s.sh(&format!(
            "ip link add {SPLICER_TO_BACKEND} type veth peer name {TO_SPLICER} netns {bn}"
        ));
        let addr = |ns: &Netns, dev: &str, a: IpAddr, len: u8| {
            // nodad: an IPv6 address is usable at once, no duplicate detection to wait for.
            let nodad = if a.is_ipv6() { " nodad" } else { "" };
            ns.sh(&format!("ip addr add {a}/{len} dev {dev}{nodad}"));
        };
        for (a, link, host) in [(V4, V4_PREFIX, 32), (V6, V6_PREFIX, 128)] {
            addr(c, TO_SPLICER, a.client, link);
            addr(s, SPLICER_TO_CLIENT, a.splicer_front, link);
            addr(s, SPLICER_TO_BACKEND, a.splicer_back, link);
            addr(s, "lo", a.splicer_fixed, host);
            addr(b, TO_SPLICER, a.backend, link);
        }
        for (ns, dev) in [
            (c, TO_SPLICER),
            (s, SPLICER_TO_CLIENT),
            (s, SPLICER_TO_BACKEND),
            (b, TO_SPLICER),
        ] {
            ns.sh(&format!("ip link set {dev} up"));
        }
        b.sh(&format!("ip route add default via {}", V4.splicer_back));
        b.sh(&format!("ip -6 route add default via {}", V6.splicer_back));
        for line in TRANSPARENT_ROUTING.iter().filter(|l| !omit.contains(l)) {
            s.sh(line);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.splicer, &self.backend] {
            match Command::new("ip")
                .args(["netns", "del", ns.name()])
                .output()
            {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "cannot delete network namespace {}: {}",
                    ns.name(),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("cannot run `ip netns del {}`: {e}", ns.name()),
            }
        }
    }
}

/// Runs `ip ARGS...` in the test's own namespace; panics with its output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why this host cannot build a lab, if it cannot; else it has created namespace `first`.
fn probe(first: &str) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "not root: creating network namespaces needs root (run `sudo cargo xtask test`)".into(),
        );
    }
    if Command::new("nft").arg("--version").output().is_err() {
        return Err("`nft` is missing: install nftables (`cargo xtask test` does)".into());
    }
    match Command::new("ip").args(["netns", "add", first]).output() {
        Err(e) => Err(format!(
            "cannot run `ip` ({e}): install iproute2 (`cargo xtask test` does)"
        )),
        Ok(out) if !out.status.success() => Err(format!(
            "`ip netns add {first}` failed: {} (network namespaces need root with CAP_SYS_ADMIN, \
             not an unprivileged container)",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => Ok(()),
    }
}

/// Splits `line` at spaces; `'...'` is one word without its quotes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(ch),
        }
    }
    assert!(!quoted, "unbalanced quote in {line:?}");
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_lines_split_like_the_shell() {
        assert_eq!(
            split_words("nft add chain inet t c '{ type filter; policy accept; }'  x"),
            [
                "nft",
                "add",
                "chain",
                "inet",
                "t",
                "c",
                "{ type filter; policy accept; }",
                "x"
            ]
        );
    }
}
