//! HAProxy as a real PROXY-protocol peer of the proxy under test: a consumer (`accept-proxy`
//! on its bind) in front of a test backend, or the outer balancer (`send-proxy`,
//! `send-proxy-v2`) in front of the proxy.
//!
//! Every frontend's socket is bound and listening in the test process (port 0, the address
//! read back) and handed to HAProxy as an inherited descriptor (`bind fd@N`, as
//! `ntlm-userspace/src/proxy_proto/fixtures/capture.sh` does), so no port is guessed and a
//! client may connect before HAProxy runs: its connection waits in the accept queue. HAProxy
//! logs one line per connection on its stderr, which is read like the proxy's log: the client
//! address and port HAProxy took (the PROXY header's source when the bind has
//! `accept-proxy`), the destination, and the authority TLV the header carried.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use tokio::process::{Child, Command};

use crate::harness::{Log, TempDir};

/// The HAProxy binary (Debian's package puts it in `/usr/sbin`; `cargo xtask test` installs it).
pub const HAPROXY: &str = "haproxy";

/// The first descriptor number the frontends' sockets get in HAProxy (after stdio).
const FIRST_FD: RawFd = 3;

/// Where the frontends' sockets are first copied in the child, between `fork` and `exec`
/// (above any descriptor a test process uses), before they are placed from [`FIRST_FD`] on.
const SCRATCH_FD: RawFd = 1000;

/// HAProxy's timeouts (connect, client, server): far longer than any test step, so that
/// HAProxy never ends a connection a test still uses.
const HAPROXY_TIMEOUT: &str = "60s";

/// The start of every connection line HAProxy logs.
const CONN_TAG: &str = "haproxy-conn";

/// One frontend (a `listen` section): its socket, its `bind` options and its one `server`.
pub struct Frontend {
    /// The section's name, also the `frontend=` of its log lines.
    pub name: String,
    listener: std::net::TcpListener,
    /// Options after `bind fd@N`, e.g. `accept-proxy` or `ssl crt PEM`.
    pub bind_options: String,
    /// The `server` line after `server s `: the address, then options such as `send-proxy-v2`
    /// or `source 127.0.0.9`.
    pub server: String,
}

impl Frontend {
    /// A frontend listening on `addr` (port 0: a free port), forwarding to `server`.
    pub fn bind(name: &str, addr: SocketAddr, bind_options: &str, server: &str) -> Frontend {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("bind HAProxy's frontend {name} on {addr}: {e}"));
        Frontend {
            name: name.to_string(),
            listener,
            bind_options: bind_options.to_string(),
            server: server.to_string(),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound frontend address")
    }
}

/// One connection as HAProxy logged it when it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The frontend that took it.
    pub frontend: String,
    /// The client's address and port (`%ci:%cp`): from the PROXY header with `accept-proxy`.
    pub client: SocketAddr,
    /// The address and port the client connected to (`%fi:%fp`): from the PROXY header with
    /// `accept-proxy`.
    pub destination: SocketAddr,
    /// The header's authority TLV (`%[fc_pp_authority]`), if any.
    pub authority: Option<String>,
}

impl Seen {
    /// Parses a line of [`CONN_TAG`]; `None` for HAProxy's other lines.
    fn parse(line: &str) -> Option<Seen> {
        let rest = line.strip_prefix(CONN_TAG)?;
        let field = |key: &str| -> &str {
            rest.split(' ')
                .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("HAProxy line without {key}=: {line}"))
        };
        let addr = |ip: &str, port: &str| -> SocketAddr {
            let ip = field(ip).parse().unwrap_or_else(|e| panic!("HAProxy line {line}: {e}"));
            let port = field(port).parse().unwrap_or_else(|e| panic!("HAProxy line {line}: {e}"));
            SocketAddr::new(ip, port)
        };
        Some(Seen {
            frontend: field("frontend").to_string(),
            client: addr("client_ip", "client_port"),
            destination: addr("destination_ip", "destination_port"),
            authority: Some(field("authority")).filter(|a| *a != "-").map(str::to_string),
        })
    }
}

/// A running HAProxy of one test; dropping it kills it (by its own PID) and removes its
/// directory.
pub struct Haproxy {
    child: Child,
    log: Arc<Log>,
    _dir: TempDir,
}

impl Haproxy {
    /// Whether HAProxy runs here. When it does not: panics in CI (`cargo xtask test`
    /// installs it, so it must), else says the test is skipped and returns false.
    pub fn available(test: &str) -> bool {
        let ok = std::process::Command::new(HAPROXY)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("{test}: `{HAPROXY} -v` failed; in CI HAProxy must be installed (`cargo xtask test` does it)");
            }
            eprintln!("SKIPPED {test}: `{HAPROXY} -v` failed; install HAProxy (`apt-get install haproxy`)");
        }
        ok
    }

    /// Writes the config (`frontends` as `listen` sections in TCP mode, with the connection
    /// log line), checks it with `haproxy -c`, and starts HAProxy in the foreground.
    /// Panics with HAProxy's own words when it refuses the config.
    pub async fn start(tag: &str, frontends: Vec<Frontend>) -> Haproxy {
        let dir = TempDir::new(&format!("haproxy-{tag}"));
        let mut config = format!(
            "global\n  log stderr format raw local0 info\n\
             defaults\n  mode tcp\n  log global\n  timeout connect {HAPROXY_TIMEOUT}\n  \
             timeout client {HAPROXY_TIMEOUT}\n  timeout server {HAPROXY_TIMEOUT}\n  \
             log-format \"{CONN_TAG} frontend=%f client_ip=%ci client_port=%cp destination_ip=%fi \
             destination_port=%fp authority=%[fc_pp_authority]\"\n"
        );
        for (i, f) in frontends.iter().enumerate() {
            let fd = FIRST_FD + RawFd::try_from(i).expect("a few frontends");
            config += &format!("listen {}\n  bind fd@{fd} {}\n  server s {}\n", f.name, f.bind_options, f.server);
        }
        let path = dir.write("haproxy.cfg", &config);
        // `haproxy -c` checks the inherited descriptors too, so it gets them as well.
        let sources: Vec<RawFd> = frontends.iter().map(|f| f.listener.as_raw_fd()).collect();
        let check = Self::command(&["-c", "-f"], &path, &sources).output().await;
        let check = check.unwrap_or_else(|e| panic!("cannot run {HAPROXY}: {e}"));
        assert!(
            check.status.success(),
            "haproxy refuses the test's config:\n{config}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut cmd = Self::command(&["-db", "-f"], &path, &sources);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {HAPROXY}: {e}"));
        // HAProxy holds its own copies now; the test's copies go with `frontends`.
        drop(frontends);
        let log = Arc::new(Log::default());
        log.follow(Box::new(child.stderr.take().expect("stderr")), "haproxy");
        log.follow(Box::new(child.stdout.take().expect("stdout")), "haproxy");
        Haproxy { child, log, _dir: dir }
    }

    /// `haproxy ARGS CONFIG` with the sockets `sources` as its descriptors 3, 4, ... (for
    /// `bind fd@N`), its stdin closed.
    fn command(args: &[&str], config: &std::path::Path, sources: &[RawFd]) -> Command {
        let sources = sources.to_vec();
        let mut scratch: Vec<RawFd> = vec![-1; sources.len()];
        let mut cmd = Command::new(HAPROXY);
        cmd.args(args).arg(config).stdin(Stdio::null());
        // SAFETY: between fork and exec the closure only calls fcntl and dup2 (both
        // async-signal-safe) on descriptors this process owns, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Moved up first, so that a source numbered like a target of the second loop
                // is not overwritten before it is placed.
                for (s, &fd) in scratch.iter_mut().zip(&sources) {
                    *s = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, SCRATCH_FD);
                    if *s < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (target, &s) in (FIRST_FD..).zip(&scratch) {
                    // dup2 leaves the target without FD_CLOEXEC: HAProxy inherits it.
                    if libc::dup2(s, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    /// Every connection HAProxy logged so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.log.lines().iter().filter_map(|l| Seen::parse(l)).collect()
    }

    /// Waits for the line of the connection of frontend `frontend` from `client` (as HAProxy
    /// took it) and returns it; panics with HAProxy's log on timeout or when it exited.
    pub async fn wait_seen(&mut self, frontend: &str, client: SocketAddr, timeout: Duration) -> Seen {
        let wanted = |s: &Seen| s.frontend == frontend && s.client == client;
        self.wait_seen_where(timeout, &format!("{frontend} from {client}"), |seen| seen.iter().any(wanted)).await;
        self.seen().into_iter().find(wanted).expect("just seen")
    }

    /// Waits until `done` holds for the connections HAProxy logged (`what` names them in the
    /// failure message); panics with HAProxy's log on timeout or when it exited.
    pub async fn wait_seen_where(&mut self, timeout: Duration, what: &str, done: impl Fn(&[Seen]) -> bool) {
        if let Some(status) = self.child.try_wait().ok().flatten() {
            panic!("haproxy exited with {status}:\n{}", self.log.text());
        }
        self.log
            .wait(timeout, &format!("haproxy (for {what})"), |lines| {
                done(&lines.iter().filter_map(|l| Seen::parse(l)).collect::<Vec<_>>())
            })
            .await;
    }

    /// HAProxy's output so far, for failure messages.
    pub fn logs(&self) -> String {
        self.log.text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_lines_parse() {
        let s = Seen::parse(
            "haproxy-conn frontend=in client_ip=::1 client_port=5 destination_ip=127.0.0.1 destination_port=6 authority=-",
        )
        .unwrap();
        assert_eq!(s.client, "[::1]:5".parse().unwrap());
        assert_eq!(s.destination, "127.0.0.1:6".parse().unwrap());
        assert_eq!((s.frontend.as_str(), s.authority), ("in", None));
        let s = Seen::parse(
            "haproxy-conn frontend=in client_ip=1.2.3.4 client_port=5 destination_ip=1.2.3.5 destination_port=6 authority=a.example.net",
        )
        .unwrap();
        assert_eq!(s.authority.as_deref(), Some("a.example.net"));
        assert!(Seen::parse("[NOTICE] something").is_none());
    }
}
