//! `cargo xtask bench --edge`: the workload an edge box sees, across three network
//! namespaces joined by veth pairs instead of loopback:
//!
//! ```text
//!  client                  splicer                            backend
//!  192.0.2.2/24    ---     192.0.2.1/24 | 198.51.100.1/24  --- 198.51.100.2/24
//!  (default via splicer)   ip_forward=1, proxies listen on    (default via splicer)
//!                          192.0.2.1                          ntlm-bench serve
//! ```
//!
//! Subjects run in the splicer namespace; `routed` runs nothing there and the client
//! connects to the backend's own address, so the splicer namespace only forwards: the
//! floor every proxy is compared with. Workloads: many paced streams each way (each sender
//! held to its rate by `SO_MAX_PACING_RATE`, which TCP's internal pacing honours without
//! the `fq` qdisc), many kept-alive request/response connections, and connection churn.
//!
//! The namespaces are named `nsbench-<pid>-<role>` and deleted when the [`Lab`] drops: on
//! a normal end, an error, a panic (unwinding) and Ctrl-C (the signal handlers turn it into
//! an error). A run killed outright leaves them behind; the next run deletes those whose
//! PID is gone.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{BenchArgs, Plan, WKind, Workload, procs::NetnsFd, subjects::Subject};

/// Prefix of every namespace this bench makes (then the PID of the run, then the role).
const PREFIX: &str = "nsbench";
/// The client's address.
pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
/// The splicer on the client's link: where the proxies listen.
pub const SPLICER_FRONT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
/// The splicer on the backend's link.
pub const SPLICER_BACK: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
/// The backend.
pub const BACKEND: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2));
/// Prefix length of both links.
const PREFIX_LEN: u8 = 24;
/// Sysctls set in every namespace: connection churn opens thousands of connections a
/// second from one address to one address (client to proxy, proxy to backend), and on a
/// non-loopback link TIME_WAIT ports are not reused by default (`tcp_tw_reuse=2` is
/// loopback only), so the ports would run out within seconds.
const EVERY_NS_SYSCTLS: &[&str] = &["net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535"];

/// Paced streams: connections, each sender's rate (Mbit/s).
const PACED_CONNS: u32 = 64;
const PACE_MBIT: u32 = 40;
/// Kept-alive request/response: connections and the size of a request and of a response.
const RR_CONNS: u32 = 64;
const RR_SIZE: u32 = 1024;
/// Connection churn: workers, each opening one connection per request/response.
const CHURN_WORKERS: u32 = 8;

/// The subjects of the edge run, in table order (`--smoke`: the floor and the splice engine).
pub fn subjects(smoke: bool) -> Vec<Subject> {
    if smoke {
        return vec![Subject::Routed, Subject::Ntlm { engine: "splice", threads: None }];
    }
    vec![
        Subject::Routed,
        Subject::Ntlm { engine: "splice", threads: None },
        Subject::Ntlm { engine: "sockmap", threads: None },
        Subject::Nginx { workers: None },
        Subject::Haproxy { threads: None, splice: true, big_pipes: false },
        Subject::Haproxy { threads: None, splice: true, big_pipes: true },
    ]
}

/// The edge plan: paced streams, kept-alive request/response, churn.
pub fn plan(a: &BenchArgs, nofile: u64) -> anyhow::Result<Plan> {
    // (mode, rounds, paced conns, paced secs, rr conns, rr secs, churn workers, churn secs, budget)
    let (mode, rounds, pconns, psecs, rconns, rsecs, workers, csecs, budget) = if a.smoke {
        ("smoke", 1, 8, 0.5, 8, 0.3, 2, 0.3, 40)
    } else if a.quick {
        ("quick", 3, PACED_CONNS, 3.0, RR_CONNS, 2.0, CHURN_WORKERS, 2.0, 300)
    } else {
        ("default", 5, PACED_CONNS, 8.0, RR_CONNS, 4.0, CHURN_WORKERS, 3.0, 16 * 60)
    };
    let rounds = a.rounds.unwrap_or(rounds).clamp(1, 50);
    let verify = a.verify || a.smoke;
    let v = |args: Vec<String>| {
        let mut x = args;
        if verify {
            x.push("--verify".into());
        }
        x
    };
    let s = |x: &[&str]| x.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let mut w = vec![
        Workload {
            label: "paced".into(),
            title: format!(
                "paced streams: {pconns} connections, half upload, half download, each sender paced at {PACE_MBIT} Mbit/s (SO_MAX_PACING_RATE), {psecs} s worth each"
            ),
            kind: WKind::Paced,
            args: v(s(&[
                "paced",
                "--conns",
                &pconns.to_string(),
                "--pace-mbit",
                &PACE_MBIT.to_string(),
                "--secs",
                &psecs.to_string(),
            ])),
            rounds,
            // At a quarter of the pace it would still finish; past that it is a failure.
            deadline_secs: 30.0 + 4.0 * psecs,
        },
        Workload {
            label: "rr".into(),
            title: format!(
                "kept-alive request/response: {rconns} connections, {RR_SIZE}-byte requests and responses in a loop, {rsecs} s"
            ),
            kind: WKind::Rr,
            args: v(s(&[
                "rr",
                "--conns",
                &rconns.to_string(),
                "--secs",
                &rsecs.to_string(),
                "--size",
                &RR_SIZE.to_string(),
            ])),
            rounds,
            deadline_secs: rsecs + 30.0,
        },
        Workload {
            label: "churn".into(),
            title: format!(
                "connection churn: a new connection per {RR_SIZE}-byte request/response, {workers} workers as fast as they can, {csecs} s"
            ),
            kind: WKind::Churn,
            args: v(s(&[
                "rate",
                "--secs",
                &csecs.to_string(),
                "--threads",
                &workers.to_string(),
                "--size",
                &RR_SIZE.to_string(),
            ])),
            rounds,
            deadline_secs: csecs + 30.0,
        },
    ];
    if !a.workloads.is_empty() {
        for name in &a.workloads {
            if !w.iter().any(|x| &x.label == name) {
                bail!(
                    "--workloads: unknown edge workload `{name}`; known with --edge: {}",
                    w.iter().map(|x| x.label.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
        }
        w.retain(|x| a.workloads.contains(&x.label));
    }
    Ok(Plan { mode, edge: true, rounds, workloads: w, verify, budget_secs: budget, nofile })
}

/// The three namespaces, wired as the module documentation draws them. Dropping it deletes
/// them (stop the processes inside first: a namespace lives on while a process is in it).
pub struct Lab {
    /// Where the load generator runs.
    pub client: NetnsFd,
    /// Where the subjects run.
    pub splicer: NetnsFd,
    /// Where `ntlm-bench serve` runs.
    pub backend: NetnsFd,
    /// Namespaces made so far, deleted on drop.
    made: Vec<String>,
}

impl Lab {
    /// Builds the lab, or says what is missing.
    pub fn new() -> anyhow::Result<Lab> {
        if !crate::is_root() {
            bail!("cargo xtask bench --edge needs root: it creates network namespaces (run it with sudo)");
        }
        if Command::new("ip").arg("-V").output().is_err() {
            bail!("`ip` is missing: install iproute2 (`cargo xtask setup` does)");
        }
        remove_stale();
        let pid = std::process::id();
        let name = |role: &str| format!("{PREFIX}-{pid}-{role}");
        // Made one by one into a guard, so that a failure part-way deletes what exists.
        let mut guard = Partial(Vec::new());
        for role in ["client", "splicer", "backend"] {
            let n = name(role);
            ip(&["netns", "add", &n]).with_context(|| {
                format!("cannot create network namespace {n} (needs CAP_SYS_ADMIN, not an unprivileged container)")
            })?;
            guard.0.push(n);
        }
        let (c, s, b) = (name("client"), name("splicer"), name("backend"));
        for ns in [&c, &s, &b] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &s, "link", "add", "to-client", "type", "veth", "peer", "name", "to-splicer", "netns", &c])?;
        ip(&["-n", &s, "link", "add", "to-backend", "type", "veth", "peer", "name", "to-splicer", "netns", &b])?;
        for (ns, dev, addr) in [
            (&c, "to-splicer", CLIENT),
            (&s, "to-client", SPLICER_FRONT),
            (&s, "to-backend", SPLICER_BACK),
            (&b, "to-splicer", BACKEND),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &c, "route", "add", "default", "via", &SPLICER_FRONT.to_string()])?;
        ip(&["-n", &b, "route", "add", "default", "via", &SPLICER_BACK.to_string()])?;
        sysctl(&s, "net.ipv4.ip_forward=1")?;
        for ns in [&c, &s, &b] {
            for kv in EVERY_NS_SYSCTLS {
                sysctl(ns, kv)?;
            }
        }
        let (client, splicer, backend) = (NetnsFd::open(&c)?, NetnsFd::open(&s)?, NetnsFd::open(&b)?);
        Ok(Lab { client, splicer, backend, made: std::mem::take(&mut guard.0) })
    }

    /// One line for the results: names, addresses, link type.
    pub fn describe(&self) -> String {
        format!(
            "namespaces {} ({CLIENT}), {} ({SPLICER_FRONT} | {SPLICER_BACK}, ip_forward=1), {} ({BACKEND}), joined by veth pairs (MTU 1500); tcp_tw_reuse=1 and ports 1024-65535 in each; congestion control {}",
            self.client.name,
            self.splicer.name,
            self.backend.name,
            congestion_control(&self.client.name)
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        delete(&self.made);
    }
}

/// Deletes the namespaces made so far if [`Lab::new`] fails part-way.
struct Partial(Vec<String>);

impl Drop for Partial {
    fn drop(&mut self) {
        delete(&self.0);
    }
}

fn delete(names: &[String]) {
    for n in names {
        if let Err(e) = ip(&["netns", "del", n]) {
            eprintln!("bench: cannot delete network namespace {n}: {e:#} (delete it with `ip netns del {n}`)");
        }
    }
}

/// Deletes namespaces of earlier runs that were killed outright (their PID is gone).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        if let Some(pid) = owner(name)
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            println!("bench: deleting network namespace {name} left by an earlier run (PID {pid} is gone)");
            delete(&[name.to_string()]);
        }
    }
}

/// The PID of the run that made namespace `name`, if this bench made it.
fn owner(name: &str) -> Option<u32> {
    let (pid, role) = name.strip_prefix(PREFIX)?.strip_prefix('-')?.split_once('-')?;
    ["client", "splicer", "backend"].contains(&role).then_some(())?;
    pid.parse().ok()
}

/// `net.ipv4.tcp_congestion_control` inside namespace `ns` (pacing depends on it only in
/// that BBR paces by itself; `SO_MAX_PACING_RATE` caps any of them).
fn congestion_control(ns: &str) -> String {
    Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-n", "net.ipv4.tcp_congestion_control"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Runs `ip ARGS...`; fails with its output.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `ip {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!("`ip {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Sets one sysctl (`key=value`) inside namespace `ns`.
fn sysctl(ns: &str, kv: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw", kv])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run sysctl in {ns}"))?;
    if !out.status.success() {
        bail!("`sysctl -w {kv}` in {ns} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_benchs_namespaces_are_owned() {
        assert_eq!(owner("nsbench-4242-client"), Some(4242));
        assert_eq!(owner("nsbench-7-backend"), Some(7));
        // The tests' labs, other prefixes, other roles and malformed names are not ours.
        assert_eq!(owner("nsplice-4242-0-client"), None);
        assert_eq!(owner("nsbench-4242-router"), None);
        assert_eq!(owner("nsbenchx-4242-client"), None);
        assert_eq!(owner("nsbench-abc-client"), None);
        assert_eq!(owner("nsbench"), None);
    }

    fn args(smoke: bool, quick: bool, workloads: &[&str]) -> BenchArgs {
        BenchArgs {
            edge: true,
            quick,
            smoke,
            rounds: None,
            only: Vec::new(),
            workloads: workloads.iter().map(|w| w.to_string()).collect(),
            bulk_mib: None,
            verify: false,
            no_install: true,
            out: None,
            baseline: None,
            baseline_engine: "splice".into(),
        }
    }

    #[test]
    fn the_plan_has_the_three_workloads_and_bounds_them() {
        for (smoke, quick) in [(false, false), (false, true), (true, false)] {
            let p = plan(&args(smoke, quick, &[]), 1 << 16).unwrap();
            assert!(p.edge);
            let labels: Vec<&str> = p.workloads.iter().map(|w| w.label.as_str()).collect();
            assert_eq!(labels, ["paced", "rr", "churn"]);
            for w in &p.workloads {
                assert!(w.deadline_secs > 0.0 && w.deadline_secs < 120.0, "{} unbounded", w.label);
                // Every run is bounded in time by the client (--secs), and paced says its rate.
                assert!(w.args.iter().any(|a| a == "--secs"), "{}: {:?}", w.label, w.args);
            }
            let paced = &p.workloads[0].args;
            assert_eq!(paced[0], "paced");
            assert!(paced.windows(2).any(|x| x[0] == "--pace-mbit" && x[1] == PACE_MBIT.to_string()));
            // The smoke run checks bytes one by one.
            assert_eq!(p.verify, smoke);
        }
        let p = plan(&args(false, false, &["rr"]), 1 << 16).unwrap();
        assert_eq!(p.workloads.len(), 1);
        let e = plan(&args(false, false, &["up"]), 1 << 16).err().unwrap();
        assert!(format!("{e}").contains("known with --edge: paced, rr, churn"), "{e}");
    }

    #[test]
    fn subjects_are_the_floor_both_engines_and_the_peers() {
        let names: Vec<String> = subjects(false).iter().map(Subject::name).collect();
        assert_eq!(
            names,
            [
                "routed",
                "ntlm-splice",
                "ntlm-sockmap",
                "nginx-auto",
                "haproxy-splice-auto",
                "haproxy-splice-auto-pipe1m"
            ]
        );
        assert_eq!(subjects(true).iter().map(Subject::name).collect::<Vec<_>>(), ["routed", "ntlm-splice"]);
    }
}
