//! The kernel's policy routing read over rtnetlink: the rules (`ip rule`) and the routes of
//! every table (`ip route show table all`) of this thread's network namespace, one dump each,
//! reduced to the few fields `doctor` judges.
//!
//! netlink-packet-route builds the requests and parses the answers (the kernel's `fib_rule_hdr`,
//! `rtmsg` and their attributes), netlink-sys is the socket; this file only runs the dump
//! (sequence number, multipart answer, `NLMSG_DONE`, errors, interrupted dumps) and keeps what
//! it needs. Reading rules and routes needs no privilege.

use std::io;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteType},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How many times a dump that the kernel marks as interrupted (`NLM_F_DUMP_INTR`: the rules or
/// routes changed while it ran) is started again before giving up.
const DUMP_TRIES: usize = 3;

/// An IP family of the routing tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (`ip -4`).
    V4,
    /// IPv6 (`ip -6`).
    V6,
}

impl Family {
    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

/// One routing rule, as far as `doctor` needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its priority (`pref`): rules are tried from the lowest up.
    pub priority: u32,
    /// `Some(table)` for a rule whose action is `lookup TABLE`, `None` for any other action
    /// (goto, nop, blackhole, unreachable, prohibit).
    pub lookup: Option<u32>,
    /// The firewall-mark selector `fwmark MARK/MASK`, if the rule has one: it matches a packet
    /// whose mark ANDed with MASK equals MARK.
    pub fwmark: Option<(u32, u32)>,
    /// Whether the rule has a selector besides the mark (`from`, `to`, `iif`, `oif`, `tos`,
    /// `ipproto`, ports, `uidrange`, `l3mdev`, `tun_id`): then it matches only some packets.
    pub other_selectors: bool,
    /// `not`: the rule matches the packets its selectors do not.
    pub invert: bool,
}

impl Rule {
    /// Whether a packet carrying firewall mark `mark` and nothing else in particular is sure
    /// to match this rule's selectors.
    pub fn matches_mark(&self, mark: u32) -> bool {
        if self.invert || self.other_selectors {
            return false;
        }
        self.fwmark.is_none_or(|(m, mask)| mark & mask == m)
    }

    /// Whether this rule matches every packet (no selector at all, not inverted), as the
    /// default `from all lookup main` does.
    pub fn matches_all(&self) -> bool {
        !self.invert && !self.other_selectors && self.fwmark.is_none_or(|(_, mask)| mask == 0)
    }

    fn from_message(m: &RuleMessage) -> Rule {
        let h = &m.header;
        let mut rule = Rule {
            priority: 0,
            lookup: None,
            fwmark: None,
            other_selectors: h.dst_len != 0 || h.src_len != 0 || h.tos != 0,
            invert: h.flags.contains(RuleFlags::Invert),
        };
        let mut table = u32::from(h.table);
        let (mut mark, mut mask) = (None, None);
        for a in &m.attributes {
            match a {
                RuleAttribute::Priority(p) => rule.priority = *p,
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::FwMark(v) => mark = Some(*v),
                RuleAttribute::FwMask(v) => mask = Some(*v),
                RuleAttribute::Destination(_)
                | RuleAttribute::Source(_)
                | RuleAttribute::Iifname(_)
                | RuleAttribute::Oifname(_)
                | RuleAttribute::TunId(_)
                | RuleAttribute::L3MDev(true)
                | RuleAttribute::UidRange(_)
                | RuleAttribute::IpProtocol(_)
                | RuleAttribute::SourcePortRange(_)
                | RuleAttribute::DestinationPortRange(_) => rule.other_selectors = true,
                _ => {}
            }
        }
        if h.action == RuleAction::ToTable {
            rule.lookup = Some(table);
        }
        // The kernel reports FRA_FWMASK whenever the rule has a mark selector; a mark alone
        // (from an older kernel) means the full mask, as `ip rule` shows it.
        if mark.is_some() || mask.is_some() {
            rule.fwmark = Some((mark.unwrap_or(0), mask.unwrap_or(u32::MAX)));
        }
        rule
    }
}

/// One route, as far as `doctor` needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The table it is in.
    pub table: u32,
    /// Whether it is a `local` route (packets to it are delivered to this host).
    pub local: bool,
    /// The prefix length of its destination (0: the default route, `0.0.0.0/0` or `::/0`).
    pub dst_len: u8,
    /// The interface index of its device (`dev`), if it has one.
    pub oif: Option<u32>,
}

impl Route {
    fn from_message(m: &RouteMessage) -> Route {
        let h: &RouteHeader = &m.header;
        let mut route = Route {
            table: u32::from(h.table),
            local: h.kind == RouteType::Local,
            dst_len: h.destination_prefix_length,
            oif: None,
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Table(t) => route.table = *t,
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                _ => {}
            }
        }
        route
    }
}

/// The routing rules of `family`, in the kernel's order (by priority).
pub fn rules(family: Family) -> io::Result<Vec<Rule>> {
    let mut req = RuleMessage::default();
    req.header.family = family.address_family();
    let answers = dump(RouteNetlinkMessage::GetRule(req))?;
    Ok(answers
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRule(r) if r.header.family == family.address_family() => {
                Some(Rule::from_message(r))
            }
            _ => None,
        })
        .collect())
}

/// The routes of `family` in every table.
pub fn routes(family: Family) -> io::Result<Vec<Route>> {
    let mut req = RouteMessage::default();
    req.header.address_family = family.address_family();
    let answers = dump(RouteNetlinkMessage::GetRoute(req))?;
    Ok(answers
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) if r.header.address_family == family.address_family() => {
                Some(Route::from_message(r))
            }
            _ => None,
        })
        .collect())
}

/// The name of the interface with index `index` (`None` if there is none now).
pub fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Sends the dump request `req` and returns every message of the answer, starting again when
/// the kernel says the dump was interrupted by a change.
fn dump(req: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    for _ in 0..DUMP_TRIES {
        if let Some(answer) = dump_once(req.clone())? {
            return Ok(answer);
        }
    }
    Err(io::Error::other(format!(
        "the routing configuration kept changing during {DUMP_TRIES} netlink dumps: run the command again"
    )))
}

/// One dump: `None` if the kernel flagged it as interrupted.
fn dump_once(req: RouteNetlinkMessage) -> io::Result<Option<Vec<RouteNetlinkMessage>>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    // Connected to the kernel (port 0): the socket then takes no message from another process.
    socket.connect(&SocketAddr::new(0, 0))?;

    const SEQ: u32 = 1;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = SEQ;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(req));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut answer = Vec::new();
    let mut interrupted = false;
    loop {
        // One datagram holds one or more messages; recv_from_full sizes the buffer to it.
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = &datagram[..];
        while !rest.is_empty() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("unreadable rtnetlink answer: {e}")))?;
            let len = msg.header.length as usize;
            if len == 0 || len > rest.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "rtnetlink answer with a bad message length"));
            }
            // Messages are 4-byte aligned within a datagram.
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
            if msg.header.sequence_number != SEQ {
                continue;
            }
            interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok((!interrupted).then_some(answer)),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(m) => answer.push(m),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn rule(attributes: Vec<RuleAttribute>) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = RuleAction::ToTable;
        m.attributes = attributes;
        m
    }

    #[test]
    fn a_mark_rule_reads_as_mark_mask_and_table() {
        let r = Rule::from_message(&rule(vec![
            RuleAttribute::Priority(32765),
            RuleAttribute::FwMark(1),
            RuleAttribute::FwMask(u32::MAX),
            RuleAttribute::Table(100),
        ]));
        assert_eq!(
            r,
            Rule {
                priority: 32765,
                lookup: Some(100),
                fwmark: Some((1, u32::MAX)),
                other_selectors: false,
                invert: false
            }
        );
        assert!(r.matches_mark(1));
        assert!(!r.matches_mark(2));
        assert!(!r.matches_all());
    }

    #[test]
    fn a_masked_mark_matches_any_mark_with_those_bits() {
        let r = Rule::from_message(&rule(vec![RuleAttribute::FwMark(0x10), RuleAttribute::FwMask(0xf0)]));
        assert!(r.matches_mark(0x10));
        assert!(r.matches_mark(0x1f));
        assert!(!r.matches_mark(0x20));
        // A mark without a mask attribute is the full mask.
        let r = Rule::from_message(&rule(vec![RuleAttribute::FwMark(0x10)]));
        assert_eq!(r.fwmark, Some((0x10, u32::MAX)));
        assert!(!r.matches_mark(0x1f));
    }

    #[test]
    fn a_table_above_255_is_read_from_the_attribute() {
        let mut m = rule(vec![RuleAttribute::Table(1000)]);
        m.header.table = 252; // RT_TABLE_COMPAT, what the header holds for a large table
        assert_eq!(Rule::from_message(&m).lookup, Some(1000));
        let mut m = rule(vec![]);
        m.header.table = 254;
        assert_eq!(Rule::from_message(&m).lookup, Some(254));
    }

    #[test]
    fn other_selectors_inversion_and_actions_are_seen() {
        let from = Rule::from_message(&rule(vec![RuleAttribute::Source(IpAddr::V4(Ipv4Addr::LOCALHOST))]));
        assert!(from.other_selectors && !from.matches_mark(0) && !from.matches_all());
        let iif = Rule::from_message(&rule(vec![RuleAttribute::FwMark(1), RuleAttribute::Iifname("eth0".into())]));
        assert!(iif.other_selectors && !iif.matches_mark(1));
        let mut m = rule(vec![RuleAttribute::FwMark(1)]);
        m.header.flags = RuleFlags::Invert;
        let not = Rule::from_message(&m);
        assert!(not.invert && !not.matches_mark(1) && !not.matches_mark(0));
        let mut m = rule(vec![]);
        m.header.dst_len = 8;
        assert!(Rule::from_message(&m).other_selectors);
        let mut m = rule(vec![]);
        m.header.action = RuleAction::Blackhole;
        let r = Rule::from_message(&m);
        assert_eq!(r.lookup, None);
        assert!(r.matches_all() && r.matches_mark(7));
    }

    #[test]
    fn a_local_default_route_reads_with_its_table_and_device() {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.kind = RouteType::Local;
        m.header.table = 100;
        m.attributes = vec![RouteAttribute::Table(100), RouteAttribute::Oif(1)];
        assert_eq!(Route::from_message(&m), Route { table: 100, local: true, dst_len: 0, oif: Some(1) });
        m.header.kind = RouteType::Unicast;
        m.header.destination_prefix_length = 24;
        m.attributes = vec![RouteAttribute::Table(5000)];
        assert_eq!(Route::from_message(&m), Route { table: 5000, local: false, dst_len: 24, oif: None });
    }

    /// A real dump of this host's namespace: every namespace has the rule `from all lookup
    /// main` and, in table local (255), a local route for 127.0.0.1 on `lo`.
    #[test]
    fn a_real_dump_has_the_default_rules_and_routes() {
        let rules = rules(Family::V4).expect("RTM_GETRULE dump");
        assert!(rules.iter().any(|r| r.lookup == Some(254) && r.matches_all()), "{rules:?}");
        assert!(rules.windows(2).all(|w| w[0].priority <= w[1].priority), "{rules:?}");
        let routes = routes(Family::V4).expect("RTM_GETROUTE dump");
        let lo = routes.iter().find(|r| {
            r.table == 255 && r.local && r.dst_len == 32 && r.oif.and_then(interface_name).as_deref() == Some("lo")
        });
        assert!(lo.is_some(), "{routes:?}");
    }
}
