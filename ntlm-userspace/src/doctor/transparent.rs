//! `doctor`'s section on transparent source mode (`source = "client"` / `"client-ip"`): the
//! backend connection is bound to the client's address with IP_TRANSPARENT, so the backend
//! answers the client's address and those replies must be routed back into this host.
//!
//! What is checked, for IPv4 and IPv6 each:
//! - the capability, and whether setting IP_TRANSPARENT / IPV6_TRANSPARENT on a fresh socket
//!   actually succeeds (the real test: user namespaces and security modules decide as well);
//! - the policy routing of the replies, read over rtnetlink: a rule `fwmark MARK lookup TABLE`
//!   whose table holds a `local` default route, and which no earlier `lookup main` rule hides;
//! - the firewall rule that puts MARK on those replies (`socket transparent 1 meta mark set
//!   MARK`), only where `nft` can list the ruleset; iptables rules are not read.
//!
//! Every finding is one `key=value` line, like the rest of `doctor`; none of them changes
//! doctor's exit status or its engine lines.

use std::{io, process::Command};


use crate::sys::{
    caps::{self, Cap},
    netlink::{self, Family, Route, Rule},
};

/// The firewall mark the README's set-up uses, suggested when no rule is found.
pub const SUGGESTED_MARK: u32 = 0x1;
/// The routing table the README's set-up uses, suggested when no rule is found.
pub const SUGGESTED_TABLE: u32 = 100;
/// The `main` routing table: a rule that looks it up before the mark's rule sends the
/// replies out again (the client's address is routed away from this host there).
const MAIN_TABLE: u32 = 254;
/// The `local` routing table, which holds this host's own addresses.
const LOCAL_TABLE: u32 = 255;

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// `ip` or `ip -6`.
fn ip_cmd(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip -6",
    }
}

/// The default destination in `ip` syntax.
fn default_dst(family: Family) -> &'static str {
    match family {
        Family::V4 => "0.0.0.0/0",
        Family::V6 => "::/0",
    }
}

/// `fwmark 0x1` or `fwmark 0x10/0xf0`, as `ip rule` shows it.
fn fwmark_text(mark: u32, mask: u32) -> String {
    if mask == u32::MAX { format!("fwmark {mark:#x}") } else { format!("fwmark {mark:#x}/{mask:#x}") }
}

fn rule_add(family: Family, mark: u32, table: u32) -> String {
    format!("{} rule add fwmark {mark:#x} lookup {table}", ip_cmd(family))
}

fn route_add(family: Family, table: u32) -> String {
    format!("{} route add local {} dev lo table {table}", ip_cmd(family), default_dst(family))
}

/// How the replies to a transparent connection of one family would be routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routing {
    /// A rule sends packets with `mark` to `table`, which holds a local default route.
    Ready {
        /// The rule.
        rule: Rule,
        /// The mark the firewall must set on the replies (the rule's, within its mask).
        mark: u32,
        /// The table it looks up.
        table: u32,
        /// The device of the local default route (`lo` as documented).
        dev: Option<String>,
    },
    /// As [`Routing::Ready`], but the earlier rule `by` sends marked packets to table main
    /// first, so they never reach the rule.
    Hidden {
        /// The mark's rule.
        rule: Rule,
        /// Its mark.
        mark: u32,
        /// Its table.
        table: u32,
        /// The earlier rule that looks up table main.
        by: Rule,
    },
    /// A rule sends marked packets to `table`, but that table has no local default route.
    NoLocalRoute {
        /// The rule.
        rule: Rule,
        /// Its mark.
        mark: u32,
        /// Its table.
        table: u32,
    },
    /// `table` holds a local default route, but no rule sends marked packets to it.
    NoRule {
        /// The table.
        table: u32,
    },
    /// Neither a mark rule nor a table with a local default route.
    Missing,
}

impl Routing {
    /// The mark the firewall must set on replies: the rule's, or the suggested one.
    fn mark(&self) -> (u32, u32) {
        match self {
            Routing::Ready { rule, .. } | Routing::Hidden { rule, .. } | Routing::NoLocalRoute { rule, .. } => {
                rule.fwmark.unwrap_or((SUGGESTED_MARK, u32::MAX))
            }
            Routing::NoRule { .. } | Routing::Missing => (SUGGESTED_MARK, u32::MAX),
        }
    }
}

/// Judges the rules (in the kernel's order) and routes of one family.
pub fn judge(rules: &[Rule], routes: &[Route]) -> Routing {
    let local_default = |table: u32| routes.iter().find(|r| r.table == table && r.local && r.dst_len == 0);
    // Rules that select by mark and look a table up, in the order the kernel tries them.
    let candidates = || {
        rules.iter().enumerate().filter_map(|(i, r)| match (r.invert, r.lookup, r.fwmark) {
            (false, Some(table), Some((mark, mask))) if mask != 0 => Some((i, r, mark, table)),
            _ => None,
        })
    };
    if let Some((i, rule, mark, table, route)) =
        candidates().find_map(|(i, r, mark, table)| local_default(table).map(|route| (i, r, mark, table, route)))
    {
        let by = rules[..i].iter().find(|e| e.lookup == Some(MAIN_TABLE) && e.matches_mark(mark));
        return match by {
            Some(by) => Routing::Hidden { rule: rule.clone(), mark, table, by: by.clone() },
            None => {
                Routing::Ready { rule: rule.clone(), mark, table, dev: route.oif.and_then(netlink::interface_name) }
            }
        };
    }
    if let Some((_, rule, mark, table)) = candidates().next() {
        return Routing::NoLocalRoute { rule: rule.clone(), mark, table };
    }
    match routes.iter().find(|r| r.local && r.dst_len == 0 && r.table != LOCAL_TABLE) {
        Some(r) => Routing::NoRule { table: r.table },
        None => Routing::Missing,
    }
}

/// The `transparent_routing_*` value for `routing`: what is there, or what is missing and the
/// exact commands that add it.
fn routing_text(family: Family, routing: &Routing) -> String {
    let selectors = |rule: &Rule| {
        if rule.other_selectors {
            " (the rule has other selectors too: only the replies they match are routed back)"
        } else {
            ""
        }
    };
    let rule_text = |rule: &Rule, table: u32| {
        let (mark, mask) = rule.fwmark.unwrap_or_default();
        format!("rule {} lookup {table} (priority {})", fwmark_text(mark, mask), rule.priority)
    };
    match routing {
        Routing::Ready { rule, table, dev, .. } => format!(
            "ok: {}, table {table}: local {} dev {}{}",
            rule_text(rule, *table),
            default_dst(family),
            dev.as_deref().unwrap_or("?"),
            selectors(rule)
        ),
        Routing::Hidden { rule, table, by, .. } => {
            let (mark, mask) = rule.fwmark.unwrap_or_default();
            let selector = fwmark_text(mark, mask);
            format!(
                "hidden: {} comes after rule priority {} lookup main, which routes the replies away first; move it \
                 before: {ip} rule del {selector} lookup {table} priority {} && {ip} rule add {selector} lookup {table} \
                 priority {}",
                rule_text(rule, *table),
                by.priority,
                rule.priority,
                by.priority.saturating_sub(1),
                ip = ip_cmd(family),
            )
        }
        Routing::NoLocalRoute { rule, table, .. } => format!(
            "missing: {} exists, but table {table} has no local default route; add: {}",
            rule_text(rule, *table),
            route_add(family, *table)
        ),
        Routing::NoRule { table } => format!(
            "missing: table {table} holds a local default route, but no rule sends marked packets to it; add: {}",
            rule_add(family, SUGGESTED_MARK, *table)
        ),
        Routing::Missing => format!(
            "missing: no rule sends marked packets to a table with a local default route; add: {} && {}",
            rule_add(family, SUGGESTED_MARK, SUGGESTED_TABLE),
            route_add(family, SUGGESTED_TABLE)
        ),
    }
}

/// Sets IP_TRANSPARENT (IPV6_TRANSPARENT) on a fresh TCP socket of `family`: what binding a
/// backend connection to the client's address needs first.
pub fn set_transparent(family: Family) -> io::Result<()> {
    crate::identity::probe_transparent(matches!(family, Family::V4))
}

/// How to give this binary CAP_NET_ADMIN.
fn grant_hint() -> String {
    let exe = std::env::current_exe().map_or_else(|_| "ntlm-splice".to_string(), |p| p.display().to_string());
    format!(
        "run as root, or grant CAP_NET_ADMIN: AmbientCapabilities=CAP_NET_ADMIN in the systemd unit, \
         or setcap cap_net_admin+ep {exe}"
    )
}

fn capability_text(effective: Option<u64>) -> String {
    match effective {
        None => "unknown (no CapEff in /proc/thread-self/status)".to_string(),
        Some(set) if caps::holds(set, Cap::NetAdmin) => "ok: CAP_NET_ADMIN held".to_string(),
        Some(set) if caps::holds(set, Cap::NetRaw) => {
            "ok: CAP_NET_RAW held (the kernel accepts it for IP_TRANSPARENT)".to_string()
        }
        Some(_) => format!("missing: CAP_NET_ADMIN is not in the effective set; {}", grant_hint()),
    }
}

fn socket_text(family: Family, result: &io::Result<()>) -> String {
    let option = match family {
        Family::V4 => "IP_TRANSPARENT",
        Family::V6 => "IPV6_TRANSPARENT",
    };
    match result {
        Ok(()) => format!("ok: {option} set on a test socket"),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            format!("refused: setting {option} failed ({e}); {}", grant_hint())
        }
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            format!("unavailable: this host has no {} sockets ({e})", suffix(family))
        }
        Err(e) => format!("failed: setting {option} on a test socket: {e}"),
    }
}

/// One firewall rule that marks packets of transparent sockets, from `nft list ruleset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftMark {
    /// The nftables family of its table: `inet` covers IPv4 and IPv6, `ip` and `ip6` one each.
    pub table_family: String,
    /// The table's name.
    pub table: String,
    /// The mark it sets.
    pub mark: u32,
}

impl NftMark {
    fn covers(&self, family: Family) -> bool {
        matches!((self.table_family.as_str(), family), ("inet", _) | ("ip", Family::V4) | ("ip6", Family::V6))
    }
}

/// The rules of a `nft list ruleset` text that match `socket transparent 1` and set a constant
/// mark (`meta mark set 0x00000001`); a mark computed from an expression is not read.
pub fn nft_marks(ruleset: &str) -> Vec<NftMark> {
    let mut table = None;
    let mut found = Vec::new();
    for l in ruleset.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("table ") {
            let mut words = rest.split_whitespace();
            table = match (words.next(), words.next()) {
                (Some(f), Some(n)) => Some((f.to_string(), n.to_string())),
                _ => None,
            };
            continue;
        }
        let Some((table_family, table)) = &table else { continue };
        if !l.split_whitespace().collect::<Vec<_>>().windows(3).any(|w| w == ["socket", "transparent", "1"]) {
            continue;
        }
        let Some((_, after)) = l.split_once("meta mark set ") else { continue };
        let mut words = after.split_whitespace();
        let value = words.next().unwrap_or("");
        // `meta mark set 0x1 | 0x2` is an expression, not the constant it starts with.
        if matches!(words.next(), Some("|" | "&" | "^" | "<<" | ">>" | "or" | "and" | "xor")) {
            continue;
        }
        let mark = match value.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        };
        if let Some(mark) = mark {
            found.push(NftMark { table_family: table_family.clone(), table: table.clone(), mark });
        }
    }
    found
}

/// `nft list ruleset`, or why it could not be read.
fn nft_ruleset() -> Result<String, String> {
    match Command::new("nft").args(["list", "ruleset"]).output() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err("nft is not on PATH".to_string()),
        Err(e) => Err(format!("running nft failed: {e}")),
        Ok(out) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(format!("`nft list ruleset` failed: {}", stderr.lines().next().unwrap_or("").trim()))
        }
        Ok(out) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
    }
}

/// The nftables lines that mark replies with `mark` (the README's set-up).
fn nft_fix(mark: u32) -> String {
    format!(
        "nft add table inet ntlm_splice && nft add chain inet ntlm_splice divert \
         '{{ type filter hook prerouting priority mangle; policy accept; }}' && nft add rule inet ntlm_splice divert \
         meta l4proto tcp socket transparent 1 meta mark set {mark:#x} accept"
    )
}

/// The `transparent_mark_*` value, and whether a marking rule was found (`None`: not checked).
/// Not finding one proves little (iptables rules are not read), so it is reported, not judged.
fn mark_text(
    family: Family,
    ruleset: &Result<Vec<NftMark>, String>,
    (mark, mask): (u32, u32),
) -> (Option<bool>, String) {
    let marks = match ruleset {
        Err(why) => {
            let text = format!(
                "not checked ({why}; iptables rules are never read): the firewall must mark replies to \
                 transparent sockets with {mark:#x}, e.g. {}",
                nft_fix(mark)
            );
            return (None, text);
        }
        Ok(marks) => marks,
    };
    let mine: Vec<&NftMark> = marks.iter().filter(|m| m.covers(family)).collect();
    if let Some(m) = mine.iter().find(|m| m.mark & mask == mark) {
        return (
            Some(true),
            format!("ok: nft table {} {} marks socket-transparent packets {:#x}", m.table_family, m.table, m.mark),
        );
    }
    let seen = if mine.is_empty() {
        String::new()
    } else {
        let list: Vec<String> =
            mine.iter().map(|m| format!("{:#x} (table {} {})", m.mark, m.table_family, m.table)).collect();
        format!(" (socket-transparent packets are marked {}, which the routing rule does not select)", list.join(", "))
    };
    let text = format!(
        "not found: no nftables rule marks socket-transparent packets with {}{seen} (rules made with iptables are \
         not read); add: {}",
        fwmark_text(mark, mask).trim_start_matches("fwmark "),
        nft_fix(mark)
    );
    (Some(false), text)
}

/// Everything the section reports, gathered in the calling thread's network namespace.
pub struct Findings {
    /// The effective capability set.
    effective: Option<u64>,
    /// Setting the transparent option, IPv4 then IPv6.
    socket: [io::Result<()>; 2],
    /// The reply routing, IPv4 then IPv6.
    routing: [io::Result<Routing>; 2],
    /// The marking rules from `nft list ruleset`, or why they were not read.
    marks: Result<Vec<NftMark>, String>,
}

/// Runs every check.
pub fn gather() -> Findings {
    let routing = |family| Ok(judge(&netlink::rules(family)?, &netlink::routes(family)?));
    Findings {
        effective: caps::effective(),
        socket: FAMILIES.map(set_transparent),
        routing: FAMILIES.map(routing),
        marks: nft_ruleset().map(|text| nft_marks(&text)),
    }
}

/// The section's `key=value` lines, in order.
pub fn lines(f: &Findings) -> Vec<(String, String)> {
    let mut out = vec![("transparent_capability".to_string(), capability_text(f.effective))];
    let mut ready = Vec::new();
    let (mut unchecked, mut unmarked) = (false, false);
    for (i, family) in FAMILIES.into_iter().enumerate() {
        let s = suffix(family);
        out.push((format!("transparent_socket_{s}"), socket_text(family, &f.socket[i])));
        let routing = match &f.routing[i] {
            Ok(r) => {
                out.push((format!("transparent_routing_{s}"), routing_text(family, r)));
                Some(r)
            }
            Err(e) => {
                out.push((
                    format!("transparent_routing_{s}"),
                    format!("unknown: reading the rules over rtnetlink failed: {e}"),
                ));
                None
            }
        };
        let mark = routing.map_or((SUGGESTED_MARK, u32::MAX), Routing::mark);
        let (marked, text) = mark_text(family, &f.marks, mark);
        out.push((format!("transparent_mark_{s}"), text));
        if f.socket[i].is_ok() && matches!(routing, Some(Routing::Ready { .. })) {
            ready.push(s);
            unchecked |= marked.is_none();
            unmarked |= marked == Some(false);
        }
    }
    let caveat = if unmarked {
        ", but no nftables rule marks the replies (see transparent_mark_; rules made with iptables are not read)"
    } else if unchecked {
        " (the firewall rule that marks replies was not checked)"
    } else {
        ""
    };
    let summary = match ready.as_slice() {
        [] => "not ready: see the transparent_ lines".to_string(),
        families => format!("ready for {}{caveat}", families.join(" and ")),
    };
    out.push(("transparent_source".to_string(), summary));
    out
}

#[cfg(test)]
mod tests;
