//! Least privilege: what the running proxy still needs once its listeners are bound, its
//! engines loaded and the sockmap self-test run, and the switch (`--user`, `[global] user`)
//! that keeps only that. `doctor` prints the same table ([`doctor_lines`]).
//!
//! Needed after start, and why (measured on Linux 6.18; the README's Privileges section has
//! the experiments):
//!
//! - CAP_NET_BIND_SERVICE: a reload may add a listen port below
//!   `net.ipv4.ip_unprivileged_port_start`; kept whenever the configuration came from a file.
//! - CAP_NET_ADMIN, for a route with a transparent `source` (`client`, `client-ip`): every
//!   backend socket is set IP_TRANSPARENT when it is made.
//! - CAP_NET_ADMIN, for the sockmap engine, when `sockmap_sndbuf` is above what SO_SNDBUF
//!   may set (`net.core.wmem_max`): only SO_SNDBUFFORCE sets more. The engine's map updates,
//!   lookups and deletes with the descriptors it already holds, its ring buffer and the
//!   programs already attached need no capability at all.
//!
//! Not kept: CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN (creating maps and loading programs, which
//! the sockmap engine does once at start: a reload that first asks for it is refused with
//! the fix, see [`crate::engine::Engines::privileges_dropped`]); CAP_SYS_RESOURCE (pipes past
//! `fs.pipe-user-pages-soft`: the splice engine's pipe budget is computed again for the new
//! user instead); CAP_SETUID, CAP_SETGID, CAP_SETPCAP (the switch itself); everything else.

use std::io;

use crate::{
    config::Config,
    identity::Source,
    sys::{
        caps::{self, Cap},
        privs::{self, Account, Step, ThreadCreds},
    },
};

/// `net.core.wmem_max`: the most SO_SNDBUF may set without CAP_NET_ADMIN.
const WMEM_MAX: &str = "/proc/sys/net/core/wmem_max";
/// `net.ipv4.ip_unprivileged_port_start`: ports below it need CAP_NET_BIND_SERVICE.
const UNPRIVILEGED_PORT_START: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";

/// One capability the running proxy needs, and what for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// The capability.
    pub cap: Cap,
    /// What uses it, for the log and `doctor`.
    pub why: String,
}

/// The facts of the host and the configuration that decide what is needed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Facts {
    /// The configuration came from a file, so a reload may bind new listen addresses.
    pub reloadable: bool,
    /// A route has a transparent `source`.
    pub transparent: bool,
    /// The sockmap engine is loaded.
    pub sockmap: bool,
    /// `sockmap_sndbuf` (0: autotuning).
    pub sockmap_sndbuf: u64,
    /// `net.core.wmem_max`, if readable.
    pub wmem_max: Option<u64>,
}

impl Facts {
    /// The facts of a server about to serve `config`.
    pub fn of(config: &Config, reloadable: bool, sockmap: bool) -> Facts {
        Facts {
            reloadable,
            transparent: config.routes.iter().any(|r| r.options.source.is_some_and(Source::is_transparent)),
            sockmap,
            sockmap_sndbuf: config.global.sockmap_sndbuf,
            wmem_max: read_u64(WMEM_MAX),
        }
    }

    /// Whether the sockmap engine's send buffers need SO_SNDBUFFORCE: SO_SNDBUF takes at most
    /// `wmem_max` (the engine asks for half of `sockmap_sndbuf`, the kernel doubles it).
    pub fn sndbuf_needs_force(&self) -> bool {
        self.sockmap_sndbuf != 0 && self.wmem_max.is_none_or(|max| self.sockmap_sndbuf / 2 > max)
    }
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What a server with `facts` needs once it serves, each with its reason (a capability may
/// appear more than once, for each of its uses).
pub fn needs(facts: &Facts) -> Vec<Need> {
    let mut out = Vec::new();
    if facts.reloadable {
        out.push(Need {
            cap: Cap::NetBindService,
            why: "a reload may add a listen port below net.ipv4.ip_unprivileged_port_start".into(),
        });
    }
    if facts.transparent {
        out.push(Need {
            cap: Cap::NetAdmin,
            why: "IP_TRANSPARENT on every backend socket of a route with source = client or client-ip".into(),
        });
    }
    if facts.sockmap && facts.sndbuf_needs_force() {
        out.push(Need {
            cap: Cap::NetAdmin,
            why: format!(
                "SO_SNDBUFFORCE: sockmap_sndbuf ({} bytes) is above what SO_SNDBUF may set (2 x net.core.wmem_max = {})",
                facts.sockmap_sndbuf,
                facts.wmem_max.map_or_else(|| "unknown".into(), |m| (2 * m).to_string())
            ),
        });
    }
    out
}

/// The set of `needs`.
pub fn set_of(needs: &[Need]) -> u64 {
    needs.iter().fold(0, |s, n| s | n.cap.bit())
}

/// Why the privileges could not be dropped: the process stops rather than serve with more
/// than it should.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// The user cannot be switched to from here.
    #[error(
        "cannot switch to user {user:?}: this process (uid {uid}) lacks {missing}; start it as root, or start it \
         as {user:?} itself with only the capabilities it needs (systemd AmbientCapabilities=, a container's \
         cap_add; `ntlm-splice doctor` lists them) and leave --user out"
    )]
    CannotSwitch {
        /// The user asked for.
        user: String,
        /// The process's effective uid.
        uid: u32,
        /// The capabilities it lacks, by name.
        missing: String,
    },
    /// A step failed in the kernel.
    #[error("dropping privileges failed at {step}: {source}")]
    Step {
        /// Which step.
        step: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A thread holds something else than it should after the steps.
    #[error("after dropping privileges, thread {tid} has {field} {got}, expected {want}")]
    Verify {
        /// The thread.
        tid: i32,
        /// Which field of /proc/self/task/TID/status.
        field: &'static str,
        /// What it holds.
        got: String,
        /// What it should hold.
        want: String,
    },
}

impl DropError {
    fn step(step: &'static str) -> impl FnOnce(io::Error) -> DropError {
        move |source| DropError::Step { step, source }
    }
}

/// What every thread holds after [`drop_to`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// The user switched to (`None`: the one it was started as).
    pub account: Option<Account>,
    /// Effective and permitted capabilities.
    pub caps: u64,
    /// The bounding set.
    pub bounding: u64,
    /// Whether the bounding set was cut to [`Dropped::caps`] (it needs CAP_SETPCAP).
    pub bounding_cut: bool,
    /// Threads checked.
    pub threads: usize,
}

impl Dropped {
    /// The start-up log line's fields.
    pub fn summary(&self) -> String {
        let who = match &self.account {
            Some(a) => format!(
                "user={} uid={} gid={} groups={}",
                a.name,
                a.uid,
                a.gid,
                a.groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            ),
            None => format!("uid={} (as started)", caps::euid()),
        };
        let bounding = if self.bounding_cut {
            caps::names(self.bounding)
        } else {
            "unchanged (cutting it needs cap_setpcap)".into()
        };
        format!(
            "{who} capabilities={} bounding={bounding} no_new_privs=1 threads={}",
            caps::names(self.caps),
            self.threads
        )
    }
}

/// Switches every thread to `account` (if given) and narrows every thread's capabilities to
/// `keep` (those of it the process holds): permitted and effective `keep`, inheritable and
/// ambient empty, the bounding set cut to `keep` (where CAP_SETPCAP is held), no_new_privs.
/// Then reads every thread's status back and fails on any difference.
pub fn drop_to(account: Option<&Account>, keep: u64) -> Result<Dropped, DropError> {
    let before = privs::current().map_err(DropError::step("reading /proc/thread-self/status"))?;
    let keep = keep & before.permitted;
    if let Some(a) = account {
        let same = before.uids == [a.uid; 4] && before.gids == [a.gid; 4] && before.groups == a.groups;
        if !same {
            let missing: Vec<&str> = [(privs::CAP_SETUID, "cap_setuid"), (privs::CAP_SETGID, "cap_setgid")]
                .into_iter()
                .filter(|&(c, _)| before.effective & privs::bit(c) == 0)
                .map(|(_, n)| n)
                .collect();
            if !missing.is_empty() {
                return Err(DropError::CannotSwitch {
                    user: a.name.clone(),
                    uid: caps::euid(),
                    missing: missing.join(" and "),
                });
            }
            privs::on_every_thread(Step::KeepCaps).map_err(DropError::step("PR_SET_KEEPCAPS on every thread"))?;
            privs::set_ids(a).map_err(DropError::step("switching user and groups"))?;
        }
    }
    privs::on_every_thread(Step::Narrow { keep }).map_err(DropError::step("narrowing capabilities on every thread"))?;
    let bounding_cut = before.permitted & privs::bit(privs::CAP_SETPCAP) != 0;
    let bounding = if bounding_cut { before.bounding & keep } else { before.bounding };
    let want = ThreadCreds {
        tid: 0,
        uids: account.map_or(before.uids, |a| [a.uid; 4]),
        gids: account.map_or(before.gids, |a| [a.gid; 4]),
        groups: account.map_or_else(|| before.groups.clone(), |a| a.groups.clone()),
        inheritable: 0,
        permitted: keep,
        effective: keep,
        bounding,
        ambient: 0,
        no_new_privs: true,
    };
    let threads = privs::threads(None).map_err(DropError::step("reading /proc/self/task"))?;
    for t in &threads {
        verify(t, &want)?;
    }
    Ok(Dropped { account: account.cloned(), caps: keep, bounding, bounding_cut, threads: threads.len() })
}

/// `got` holds what `want` says (its tid aside).
pub fn verify(got: &ThreadCreds, want: &ThreadCreds) -> Result<(), DropError> {
    let differs = |field: &'static str, g: String, w: String| {
        if g == w { Ok(()) } else { Err(DropError::Verify { tid: got.tid, field, got: g, want: w }) }
    };
    differs("Uid", format!("{:?}", got.uids), format!("{:?}", want.uids))?;
    differs("Gid", format!("{:?}", got.gids), format!("{:?}", want.gids))?;
    differs("Groups", format!("{:?}", got.groups), format!("{:?}", want.groups))?;
    for (field, g, w) in [
        ("CapEff", got.effective, want.effective),
        ("CapPrm", got.permitted, want.permitted),
        ("CapInh", got.inheritable, want.inheritable),
        ("CapBnd", got.bounding, want.bounding),
        ("CapAmb", got.ambient, want.ambient),
    ] {
        differs(field, caps::names(g), caps::names(w))?;
    }
    differs("NoNewPrivs", got.no_new_privs.to_string(), want.no_new_privs.to_string())
}

/// Why the sockmap engine cannot be loaded after the drop, with the fix (for
/// [`crate::engine::Engines::privileges_dropped`]).
pub const SEALED: &str = "the process gave up the privileges that loading eBPF programs needs (CAP_BPF, \
     CAP_NET_ADMIN, CAP_PERFMON) once it had started (--user, or a start without root), and the sockmap \
     engine is loaded only at start; restart the process with a route that uses engine = \"sockmap\"";

/// A set by name, or `all` when it holds every capability this kernel knows.
fn set_text(set: u64) -> String {
    let all = u64::MAX >> (63 - privs::last_cap());
    if set == all { format!("all ({} capabilities)", all.count_ones()) } else { caps::names(set) }
}

/// `doctor`'s lines: who the process is, what it holds, and what each engine and option needs.
pub fn doctor_lines() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut push = |k: &str, v: String| out.push((k.to_string(), v));
    match privs::current() {
        Ok(c) => {
            let name = privs::user_name(c.uids[1]).unwrap_or_else(|| "unknown".into());
            push("user", format!("{name} (uid {} gid {} groups {:?})", c.uids[1], c.gids[1], c.groups));
            push("cap_effective", set_text(c.effective));
            push("cap_permitted", set_text(c.permitted));
            push("cap_inheritable", set_text(c.inheritable));
            push("cap_ambient", set_text(c.ambient));
            push("cap_bounding", set_text(c.bounding));
            push("no_new_privs", u8::from(c.no_new_privs).to_string());
        }
        Err(e) => push("user", format!("unknown ({e})")),
    }
    let port_start = read_u64(UNPRIVILEGED_PORT_START).map_or_else(|| "unknown".into(), |p| p.to_string());
    let facts = Facts {
        sockmap: true,
        sockmap_sndbuf: crate::config::DEFAULT_SOCKMAP_SNDBUF,
        wmem_max: read_u64(WMEM_MAX),
        ..Facts::default()
    };
    push(
        "needs_listen_low_port",
        format!(
            "cap_net_bind_service to bind a port below {port_start} (net.ipv4.ip_unprivileged_port_start), at start \
             and, for a reload, kept after --user"
        ),
    );
    push("needs_splice", "nothing (cap_sys_resource only lifts fs.pipe-user-pages-soft for larger pipes)".into());
    push(
        "needs_sockmap_start",
        "cap_bpf and cap_net_admin to load the programs and create the sockhashes (plus cap_perfmon for the \
         retransmit overlap guard), at start only"
            .into(),
    );
    push(
        "needs_sockmap_running",
        if facts.sndbuf_needs_force() {
            format!(
                "cap_net_admin for SO_SNDBUFFORCE: sockmap_sndbuf {} (the default) is above 2 x net.core.wmem_max ({}); \
                 map updates with the descriptors held need none",
                facts.sockmap_sndbuf,
                facts.wmem_max.map_or_else(|| "unknown".into(), |m| (2 * m).to_string())
            )
        } else {
            "nothing: map updates with the descriptors held need no capability".into()
        },
    );
    push("needs_source_client", "cap_net_admin (IP_TRANSPARENT on each backend socket), for the whole run".into());
    push("needs_user_switch", "cap_setuid and cap_setgid at start (root), cap_setpcap to cut the bounding set".into());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts { wmem_max: Some(212_992), ..Facts::default() }
    }

    #[test]
    fn what_each_option_needs() {
        assert!(needs(&facts()).is_empty(), "flags only, splice: nothing");
        let caps = |f: Facts| set_of(&needs(&f));
        assert_eq!(caps(Facts { reloadable: true, ..facts() }), Cap::NetBindService.bit());
        assert_eq!(caps(Facts { transparent: true, ..facts() }), Cap::NetAdmin.bit());
        let sockmap = Facts { sockmap: true, sockmap_sndbuf: 8 << 20, ..facts() };
        assert_eq!(caps(sockmap), Cap::NetAdmin.bit(), "8 MiB is above 2 x wmem_max");
        assert_eq!(caps(Facts { sockmap_sndbuf: 0, ..sockmap }), 0, "autotuning sets no buffer");
        assert_eq!(caps(Facts { sockmap_sndbuf: 256 << 10, ..sockmap }), 0, "within wmem_max");
        assert_eq!(caps(Facts { wmem_max: Some(16 << 20), ..sockmap }), 0, "a raised wmem_max");
        assert_eq!(caps(Facts { sockmap: false, ..sockmap }), 0, "no sockmap engine, no send buffers");
    }

    #[test]
    fn verify_names_the_field() {
        let want = ThreadCreds {
            uids: [5; 4],
            gids: [6; 4],
            effective: 1 << 10,
            permitted: 1 << 10,
            no_new_privs: true,
            ..ThreadCreds::default()
        };
        assert!(verify(&want, &want).is_ok());
        let got = ThreadCreds { tid: 9, effective: (1 << 10) | (1 << 21), ..want.clone() };
        let e = verify(&got, &want).unwrap_err().to_string();
        assert!(e.contains("thread 9 has CapEff cap_net_bind_service,cap_sys_admin"), "{e}");
        let got = ThreadCreds { no_new_privs: false, ..want.clone() };
        assert!(verify(&got, &want).unwrap_err().to_string().contains("NoNewPrivs"));
    }
}
