use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::*;

/// A rule as `ip rule add [fwmark MARK/MASK] lookup TABLE priority PRIORITY` makes it.
fn rule(priority: u32, fwmark: Option<(u32, u32)>, lookup: u32) -> Rule {
    Rule { priority, lookup: Some(lookup), fwmark, other_selectors: false, invert: false }
}

/// The three rules every namespace starts with.
fn default_rules() -> Vec<Rule> {
    vec![rule(0, None, LOCAL_TABLE), rule(32766, None, MAIN_TABLE), rule(32767, None, 253)]
}

fn with_rule(extra: Rule) -> Vec<Rule> {
    let mut rules = default_rules();
    rules.push(extra);
    rules.sort_by_key(|r| r.priority);
    rules
}

fn local_default(table: u32) -> Route {
    Route { table, local: true, dst_len: 0, oif: None }
}

#[test]
fn nothing_set_up_is_missing_with_both_commands() {
    let routes = [Route { table: MAIN_TABLE, local: false, dst_len: 0, oif: None }];
    let r = judge(&default_rules(), &routes);
    assert_eq!(r, Routing::Missing);
    assert_eq!(
        routing_text(Family::V4, &r),
        "missing: no rule sends marked packets to a table with a local default route; add: \
         ip rule add fwmark 0x1 lookup 100 && ip route add local 0.0.0.0/0 dev lo table 100"
    );
    assert!(
        routing_text(Family::V6, &r)
            .ends_with("ip -6 rule add fwmark 0x1 lookup 100 && ip -6 route add local ::/0 dev lo table 100"),
        "{}",
        routing_text(Family::V6, &r)
    );
}

#[test]
fn a_mark_rule_and_its_local_default_route_are_ready() {
    let fw = rule(32765, Some((0x1, u32::MAX)), 100);
    let r = judge(&with_rule(fw.clone()), &[local_default(100)]);
    assert_eq!(r, Routing::Ready { rule: fw, mark: 0x1, table: 100, dev: None });
    assert_eq!(r.mark(), (0x1, u32::MAX));
    assert_eq!(
        routing_text(Family::V6, &r),
        "ok: rule fwmark 0x1 lookup 100 (priority 32765), table 100: local ::/0 dev ?"
    );
}

#[test]
fn each_half_alone_names_the_other_half() {
    let fw = rule(32765, Some((0x10, 0xf0)), 7);
    let r = judge(&with_rule(fw.clone()), &[local_default(8)]);
    assert_eq!(r, Routing::NoLocalRoute { rule: fw, mark: 0x10, table: 7 });
    assert_eq!(
        routing_text(Family::V4, &r),
        "missing: rule fwmark 0x10/0xf0 lookup 7 (priority 32765) exists, but table 7 has no local default route; \
         add: ip route add local 0.0.0.0/0 dev lo table 7"
    );
    let r = judge(&default_rules(), &[local_default(8)]);
    assert_eq!(r, Routing::NoRule { table: 8 });
    assert!(
        routing_text(Family::V6, &r).ends_with("add: ip -6 rule add fwmark 0x1 lookup 8"),
        "{}",
        routing_text(Family::V6, &r)
    );
}

#[test]
fn the_rule_whose_table_has_the_route_wins_over_an_earlier_one() {
    let other = rule(100, Some((0x2, u32::MAX)), 50);
    let fw = rule(200, Some((0x1, u32::MAX)), 100);
    let rules = [default_rules(), vec![other, fw.clone()]].concat();
    let mut rules = rules;
    rules.sort_by_key(|r| r.priority);
    assert!(matches!(judge(&rules, &[local_default(100)]), Routing::Ready { rule, table: 100, .. } if rule == fw));
}

#[test]
fn a_rule_after_lookup_main_is_hidden() {
    let fw = rule(40000, Some((0x1, u32::MAX)), 100);
    let r = judge(&with_rule(fw.clone()), &[local_default(100)]);
    let main = rule(32766, None, MAIN_TABLE);
    assert_eq!(r, Routing::Hidden { rule: fw, mark: 0x1, table: 100, by: main });
    assert_eq!(
        routing_text(Family::V4, &r),
        "hidden: rule fwmark 0x1 lookup 100 (priority 40000) comes after rule priority 32766 lookup main, which \
         routes the replies away first; move it before: ip rule del fwmark 0x1 lookup 100 priority 40000 && \
         ip rule add fwmark 0x1 lookup 100 priority 32765"
    );
    // A lookup main that only some packets match (here: other marks) hides nothing.
    let mut rules = with_rule(rule(40000, Some((0x1, u32::MAX)), 100));
    rules[1] = rule(32766, Some((0x2, u32::MAX)), MAIN_TABLE);
    assert!(matches!(judge(&rules, &[local_default(100)]), Routing::Ready { .. }));
}

#[test]
fn inverted_and_unmasked_rules_do_not_count() {
    let mut not = rule(100, Some((0x1, u32::MAX)), 100);
    not.invert = true;
    assert_eq!(judge(&with_rule(not), &[local_default(100)]), Routing::NoRule { table: 100 });
    let zero_mask = rule(100, Some((0, 0)), 100);
    assert_eq!(judge(&with_rule(zero_mask), &[local_default(100)]), Routing::NoRule { table: 100 });
    // A unicast default route in the rule's table sends the replies away: not the one needed.
    let unicast = Route { table: 100, local: false, dst_len: 0, oif: Some(2) };
    let fw = rule(100, Some((0x1, u32::MAX)), 100);
    assert!(matches!(judge(&with_rule(fw), &[unicast]), Routing::NoLocalRoute { table: 100, .. }));
    // The local table's own routes are not a local default route.
    let local_host = Route { table: LOCAL_TABLE, local: true, dst_len: 32, oif: Some(1) };
    assert_eq!(judge(&default_rules(), &[local_host]), Routing::Missing);
}

#[test]
fn other_selectors_are_reported_with_a_ready_rule() {
    let mut fw = rule(100, Some((0x1, u32::MAX)), 100);
    fw.other_selectors = true;
    let text = routing_text(Family::V4, &judge(&with_rule(fw), &[local_default(100)]));
    assert!(text.starts_with("ok: ") && text.ends_with("only the replies they match are routed back)"), "{text}");
}

/// What `nft list ruleset` printed for the README's rules plus a table of another family.
const RULESET: &str = include_str!("ruleset.nft");

#[test]
fn nft_rules_that_set_a_constant_mark_on_transparent_sockets_are_read() {
    let marks = nft_marks(RULESET);
    let mark = |table_family: &str, table: &str, mark| NftMark {
        table_family: table_family.into(),
        table: table.into(),
        mark,
    };
    assert_eq!(marks, vec![mark("inet", "ntlm_splice", 0x1), mark("ip6", "six", 0x11)]);
    assert!(marks[0].covers(Family::V4) && marks[0].covers(Family::V6));
    assert!(!marks[1].covers(Family::V4) && marks[1].covers(Family::V6));
}

#[test]
fn the_mark_verdict_compares_with_the_routing_rules_mark() {
    let marks = Ok(nft_marks(RULESET));
    let (ok, text) = mark_text(Family::V4, &marks, (0x1, u32::MAX));
    assert_eq!(ok, Some(true));
    assert_eq!(text, "ok: nft table inet ntlm_splice marks socket-transparent packets 0x1");
    // The ip6 table's 0x11 is selected by `fwmark 0x10/0xf0`, for IPv6 only.
    let (ok, text) = mark_text(Family::V6, &marks, (0x10, 0xf0));
    assert_eq!(ok, Some(true));
    assert_eq!(text, "ok: nft table ip6 six marks socket-transparent packets 0x11");
    assert_eq!(mark_text(Family::V4, &marks, (0x10, 0xf0)).0, Some(false));
    let (ok, text) = mark_text(Family::V4, &marks, (0x2, u32::MAX));
    assert_eq!(ok, Some(false));
    assert!(text.starts_with("not found: no nftables rule marks socket-transparent packets with 0x2 (socket-transparent packets are marked 0x1 (table inet ntlm_splice)"), "{text}");
    assert!(text.ends_with("socket transparent 1 meta mark set 0x2 accept"), "{text}");
    let (ok, text) = mark_text(Family::V6, &Err("nft is not on PATH".into()), (0x1, u32::MAX));
    assert_eq!(ok, None);
    assert!(text.starts_with("not checked (nft is not on PATH; iptables rules are never read)"), "{text}");
}

#[test]
fn capability_and_socket_texts_name_the_fix() {
    let none = capability_text(Some(0));
    assert!(
        none.starts_with("missing: CAP_NET_ADMIN is not in the effective set; run as root, or grant CAP_NET_ADMIN"),
        "{none}"
    );
    assert!(none.contains("setcap cap_net_admin+ep /"), "{none}");
    assert_eq!(capability_text(Some(1 << Cap::NetAdmin as u32)), "ok: CAP_NET_ADMIN held");
    assert!(capability_text(Some(1 << Cap::NetRaw as u32)).starts_with("ok: CAP_NET_RAW held"));
    let eperm = socket_text(Family::V6, &Err(io::Error::from_raw_os_error(libc::EPERM)));
    assert!(eperm.starts_with("refused: setting IPV6_TRANSPARENT failed (Operation not permitted"), "{eperm}");
    assert!(eperm.contains("grant CAP_NET_ADMIN"), "{eperm}");
    assert_eq!(socket_text(Family::V4, &Ok(())), "ok: IP_TRANSPARENT set on a test socket");
}

// ---- In network namespaces the test creates (root only) ----

/// A network namespace made with `ip netns add` for one test, deleted on drop; the checks run
/// in a thread that has entered it (a namespace belongs to each thread, as capabilities do).
struct NetNs {
    name: String,
}

impl NetNs {
    /// `None` (and why, on stderr) when this process cannot make namespaces.
    fn new() -> Option<NetNs> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        if caps::euid() != 0 {
            eprintln!("SKIPPED: making a network namespace needs root (cargo xtask test runs as root in CI)");
            return None;
        }
        let name = format!("ntlm-doctor-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let ns = NetNs { name };
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Runs `ip ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) {
        run("ip", args);
    }

    /// Runs `cmd ARGS` in the namespace, which must succeed.
    fn exec(&self, cmd: &str, args: &[&str]) {
        run("ip", &[&["netns", "exec", &self.name, cmd], args].concat());
    }

    /// Runs `f` in a thread inside the namespace.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: a valid namespace fd; this thread alone moves into it.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        });
        thread.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The section's lines, gathered inside the namespace.
    fn lines(&self) -> HashMap<String, String> {
        self.within(|| lines(&gather()).into_iter().collect())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let status = Command::new("ip").args(["netns", "del", &self.name]).status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("could not delete network namespace {}: {status:?}", self.name);
        }
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn nft_available() -> bool {
    let found = Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED the nftables part: no nft here (cargo xtask test installs nftables)");
    }
    found
}

/// The routing and marking verdicts follow the namespace's set-up step by step, for IPv4 and
/// IPv6, as the README documents it.
#[test]
fn the_verdicts_follow_the_rules_added_in_a_namespace() {
    let Some(ns) = NetNs::new() else { return };
    let nft = nft_available();
    let l = ns.lines();
    for (fam, dst) in [("ipv4", "0.0.0.0/0"), ("ipv6", "::/0")] {
        let routing = &l[&format!("transparent_routing_{fam}")];
        assert!(routing.starts_with("missing: no rule sends marked packets"), "{routing}");
        assert!(routing.contains(&format!("route add local {dst} dev lo table 100")), "{routing}");
        assert!(l[&format!("transparent_socket_{fam}")].starts_with("ok: "), "{l:?}");
        if nft {
            assert!(l[&format!("transparent_mark_{fam}")].starts_with("not found: "), "{l:?}");
        }
    }
    assert_eq!(l["transparent_source"], "not ready: see the transparent_ lines");

    for ip in ["-4", "-6"] {
        ns.ip(&[ip, "-n", &ns.name, "rule", "add", "fwmark", "0x5", "lookup", "123", "priority", "1000"]);
    }
    let l = ns.lines();
    for fam in ["ipv4", "ipv6"] {
        let routing = &l[&format!("transparent_routing_{fam}")];
        assert!(
            routing.starts_with(
                "missing: rule fwmark 0x5 lookup 123 (priority 1000) exists, but table 123 has no local default route"
            ),
            "{routing}"
        );
    }

    ns.ip(&["-4", "-n", &ns.name, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "123"]);
    let l = ns.lines();
    assert_eq!(
        l["transparent_routing_ipv4"],
        "ok: rule fwmark 0x5 lookup 123 (priority 1000), table 123: local 0.0.0.0/0 dev lo"
    );
    assert!(l["transparent_routing_ipv6"].starts_with("missing: rule fwmark 0x5"), "{l:?}");
    if nft {
        assert_eq!(
            l["transparent_source"],
            "ready for ipv4, but no nftables rule marks the replies (see transparent_mark_; rules made with \
             iptables are not read)"
        );
        assert!(l["transparent_mark_ipv4"].contains("meta mark set 0x5 accept"), "{l:?}");
    } else {
        assert!(l["transparent_source"].starts_with("ready for ipv4 (the firewall rule"), "{l:?}");
    }

    ns.ip(&["-6", "-n", &ns.name, "route", "add", "local", "::/0", "dev", "lo", "table", "123"]);
    if nft {
        let table = "ntlm_doctor_test";
        ns.exec("nft", &["add", "table", "inet", table]);
        ns.exec(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                table,
                "divert",
                "{ type filter hook prerouting priority mangle; policy accept; }",
            ],
        );
        ns.exec(
            "nft",
            &[
                "add",
                "rule",
                "inet",
                table,
                "divert",
                "meta",
                "l4proto",
                "tcp",
                "socket",
                "transparent",
                "1",
                "meta",
                "mark",
                "set",
                "0x5",
                "accept",
            ],
        );
    }
    let l = ns.lines();
    assert_eq!(
        l["transparent_routing_ipv6"],
        "ok: rule fwmark 0x5 lookup 123 (priority 1000), table 123: local ::/0 dev lo"
    );
    if nft {
        for fam in ["ipv4", "ipv6"] {
            assert_eq!(
                l[&format!("transparent_mark_{fam}")],
                "ok: nft table inet ntlm_doctor_test marks socket-transparent packets 0x5"
            );
        }
        assert_eq!(l["transparent_source"], "ready for ipv4 and ipv6");
    } else {
        assert_eq!(
            l["transparent_source"],
            "ready for ipv4 and ipv6 (the firewall rule that marks replies was not checked)"
        );
    }
}

/// A mark rule placed after `lookup main` is reported as hidden, with the commands that move it.
#[test]
fn a_rule_after_main_is_seen_as_hidden_in_a_namespace() {
    let Some(ns) = NetNs::new() else { return };
    // A table above 255: its number is only in the RTA_TABLE / FRA_TABLE attributes.
    ns.ip(&["-n", &ns.name, "rule", "add", "fwmark", "0x7", "lookup", "4321", "priority", "40000"]);
    ns.ip(&["-n", &ns.name, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "4321"]);
    let l = ns.lines();
    let routing = &l["transparent_routing_ipv4"];
    assert!(
        routing.starts_with("hidden: rule fwmark 0x7 lookup 4321 (priority 40000) comes after rule priority"),
        "{routing}"
    );
    assert!(
        routing.contains("ip rule del fwmark 0x7 lookup 4321 priority 40000 && ip rule add fwmark 0x7 lookup 4321"),
        "{routing}"
    );
}

/// The thread's CAP_NET_ADMIN and CAP_NET_RAW are dropped from its effective set (capset(2)
/// changes the calling thread only).
fn drop_transparent_caps() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: a version-3 header and the two data structs it reads and writes.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
    for cap in [Cap::NetAdmin, Cap::NetRaw] {
        data[cap as usize / 32].effective &= !(1 << (cap as u32 % 32));
    }
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
}

/// Setting the transparent options succeeds with the capability and is refused without it,
/// and the capability line says so.
#[test]
fn the_socket_test_is_refused_without_the_capability() {
    let Some(ns) = NetNs::new() else { return };
    let l = ns.within(|| {
        let with = lines(&gather());
        drop_transparent_caps();
        let without = lines(&gather());
        (with, without)
    });
    let (with, without): (HashMap<_, _>, HashMap<_, _>) = (l.0.into_iter().collect(), l.1.into_iter().collect());
    assert_eq!(with["transparent_capability"], "ok: CAP_NET_ADMIN held");
    assert_eq!(with["transparent_socket_ipv4"], "ok: IP_TRANSPARENT set on a test socket");
    assert_eq!(with["transparent_socket_ipv6"], "ok: IPV6_TRANSPARENT set on a test socket");
    assert!(
        without["transparent_capability"].starts_with("missing: CAP_NET_ADMIN is not in the effective set"),
        "{without:?}"
    );
    for (fam, option) in [("ipv4", "IP_TRANSPARENT"), ("ipv6", "IPV6_TRANSPARENT")] {
        let v = &without[&format!("transparent_socket_{fam}")];
        assert!(v.starts_with(&format!("refused: setting {option} failed (Operation not permitted")), "{v}");
    }
}
