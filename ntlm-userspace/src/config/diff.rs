//! The reload plan: what changes between the running config file and a newly read one.
//!
//! A pure function of the two validated files, as rathole's `calculate_events`, so the reload
//! logic is unit-tested here and the server only applies the [`Plan`]: it binds
//! [`Plan::bind`], closes [`Plan::close`] and keeps [`Plan::keep`] open (no refused connect
//! during a reload), swaps in the routes named in `added` and `changed` (resolving their
//! backends again) and drops those in `removed`. Live connections are not part of the plan:
//! a reload never touches them.

use std::net::SocketAddr;

use super::file::{FileConfig, Global, MetricsSpec, RouteSpec};

/// The difference between two config files, everything in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Listen addresses in the new file but not the old: to bind.
    pub bind: Vec<SocketAddr>,
    /// Listen addresses in the old file but not the new: to close.
    pub close: Vec<SocketAddr>,
    /// Listen addresses in both: to keep open as they are (the routes on them may change).
    pub keep: Vec<SocketAddr>,
    /// Names of routes only in the new file.
    pub added: Vec<String>,
    /// Names of routes only in the old file.
    pub removed: Vec<String>,
    /// Names of routes in both files that differ in anything (listen, backends, sni, options,
    /// health). Their backends are resolved again either way: see the module comment.
    pub changed: Vec<String>,
    /// Keys of `[global]` and `[metrics]` whose value differs, dotted (`global.threads`,
    /// `metrics.listen`): a reload cannot apply them, so they keep their old values until a
    /// restart (the server logs each).
    pub restart_needed: Vec<&'static str>,
}

impl Plan {
    /// True when the new file changes nothing: no address to bind or close, no route added,
    /// removed or changed, no `[global]` or `[metrics]` key changed. ([`Plan::keep`] lists what stays, so it
    /// is not part of the test.)
    pub fn is_empty(&self) -> bool {
        let Plan { bind, close, keep: _, added, removed, changed, restart_needed } = self;
        bind.is_empty()
            && close.is_empty()
            && added.is_empty()
            && removed.is_empty()
            && changed.is_empty()
            && restart_needed.is_empty()
    }
}

/// What a reload from `old` to `new` has to do. Routes are matched by name; their order in
/// the file does not matter.
pub fn plan(old: &FileConfig, new: &FileConfig) -> Plan {
    let old_addrs = listen_addrs(&old.routes);
    let new_addrs = listen_addrs(&new.routes);
    let find = |routes: &[RouteSpec], name: &str| routes.iter().position(|r| r.name == name);
    let mut plan = Plan {
        bind: new_addrs.iter().filter(|a| !old_addrs.contains(a)).copied().collect(),
        close: old_addrs.iter().filter(|a| !new_addrs.contains(a)).copied().collect(),
        keep: new_addrs.iter().filter(|a| old_addrs.contains(a)).copied().collect(),
        restart_needed: [global_changes(&old.global, &new.global), metrics_changes(&old.metrics, &new.metrics)]
            .concat(),
        ..Plan::default()
    };
    for r in &new.routes {
        match find(&old.routes, &r.name) {
            None => plan.added.push(r.name.clone()),
            Some(i) if old.routes[i] != *r => plan.changed.push(r.name.clone()),
            Some(_) => {}
        }
    }
    plan.removed = old.routes.iter().filter(|r| find(&new.routes, &r.name).is_none()).map(|r| r.name.clone()).collect();
    plan
}

/// Every listen address of `routes`, once each, in order of first appearance.
fn listen_addrs(routes: &[RouteSpec]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in routes.iter().flat_map(|r| &r.listen) {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

/// The `[global]` keys whose values differ.
fn global_changes(old: &Global, new: &Global) -> Vec<&'static str> {
    // Destructured so that a new `Global` field does not compile until it is compared here.
    let Global {
        drain_timeout,
        max_connections,
        threads,
        max_inflight,
        max_inflight_total,
        sockmap_sndbuf,
        pipe_size,
        user,
        group,
        sockmap_allow_affected_kernel,
    } = old;
    [
        ("global.drain_timeout", *drain_timeout != new.drain_timeout),
        ("global.max_connections", *max_connections != new.max_connections),
        ("global.threads", *threads != new.threads),
        ("global.max_inflight", *max_inflight != new.max_inflight),
        ("global.max_inflight_total", *max_inflight_total != new.max_inflight_total),
        ("global.sockmap_sndbuf", *sockmap_sndbuf != new.sockmap_sndbuf),
        ("global.pipe_size", *pipe_size != new.pipe_size),
        ("global.user", *user != new.user),
        ("global.group", *group != new.group),
        ("global.sockmap_allow_affected_kernel", *sockmap_allow_affected_kernel != new.sockmap_allow_affected_kernel),
    ]
    .into_iter()
    .filter_map(|(key, differs)| differs.then_some(key))
    .collect()
}

/// The `[metrics]` keys whose values differ.
fn metrics_changes(old: &MetricsSpec, new: &MetricsSpec) -> Vec<&'static str> {
    // Destructured, as in `global_changes`.
    let MetricsSpec { listen } = old;
    if *listen != new.listen { vec!["metrics.listen"] } else { vec![] }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::file::{BackendAddr, HealthSpec, RouteOptions, parse};

    /// One edit of a config part, for tests that try each.
    type Edit<T> = fn(&mut T);

    /// A route `name` on `listen` to backend `b:1`.
    fn route(name: &str, listen: &[&str]) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            listen: listen.iter().map(|a| a.parse().unwrap()).collect(),
            backends: vec![BackendAddr { host: "b".into(), port: 1 }],
            sni: vec![],
            options: RouteOptions::default(),
            health: None,
            guard: None,
        }
    }

    fn config(routes: Vec<RouteSpec>) -> FileConfig {
        FileConfig { global: Global::default(), routes, metrics: MetricsSpec::default() }
    }

    fn addrs(a: &[&str]) -> Vec<SocketAddr> {
        a.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn same_file_changes_nothing() {
        let c = config(vec![route("a", &["127.0.0.1:1", "[::1]:1"]), route("b", &["127.0.0.1:2"])]);
        let p = plan(&c, &c.clone());
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p, Plan { keep: addrs(&["127.0.0.1:1", "[::1]:1", "127.0.0.1:2"]), ..Plan::default() });
    }

    #[test]
    fn route_order_does_not_matter() {
        let a = route("a", &["127.0.0.1:1"]);
        let b = route("b", &["127.0.0.1:2"]);
        let p = plan(&config(vec![a.clone(), b.clone()]), &config(vec![b, a]));
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.keep, addrs(&["127.0.0.1:2", "127.0.0.1:1"]));
    }

    #[test]
    fn added_route_binds_its_new_addresses_only() {
        let old = config(vec![route("a", &["127.0.0.1:1"])]);
        let new = config(vec![route("a", &["127.0.0.1:1"]), route("b", &["127.0.0.1:1", "127.0.0.1:2"])]);
        let want = Plan {
            bind: addrs(&["127.0.0.1:2"]),
            keep: addrs(&["127.0.0.1:1"]),
            added: names(&["b"]),
            ..Plan::default()
        };
        let p = plan(&old, &new);
        assert_eq!(p, want);
        assert!(!p.is_empty());
    }

    #[test]
    fn removed_route_closes_the_addresses_no_other_route_uses() {
        let old = config(vec![route("a", &["127.0.0.1:1"]), route("b", &["127.0.0.1:1", "127.0.0.1:2"])]);
        let new = config(vec![route("a", &["127.0.0.1:1"])]);
        let want = Plan {
            close: addrs(&["127.0.0.1:2"]),
            keep: addrs(&["127.0.0.1:1"]),
            removed: names(&["b"]),
            ..Plan::default()
        };
        let p = plan(&old, &new);
        assert_eq!(p, want);
        assert!(!p.is_empty());
    }

    #[test]
    fn any_difference_in_a_route_changes_it() {
        let a = route("a", &["127.0.0.1:1"]);
        let old = config(vec![a.clone(), route("b", &["127.0.0.1:2"])]);
        let edits: [(&str, Edit<RouteSpec>); 5] = [
            ("backends", |r| r.backends.push(BackendAddr { host: "c".into(), port: 2 })),
            ("sni", |r| r.sni.push("a.example.net".into())),
            ("options", |r| r.options.idle_timeout = None),
            ("health", |r| {
                let health = HealthSpec {
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_secs(1),
                    rise: 1,
                    fall: 1,
                    http: None,
                };
                r.health = Some(health);
            }),
            ("listen", |r| r.listen.push("127.0.0.1:3".parse().unwrap())),
        ];
        for (what, edit) in edits {
            let mut b = a.clone();
            edit(&mut b);
            let p = plan(&old, &config(vec![b, route("b", &["127.0.0.1:2"])]));
            let bind = if what == "listen" { addrs(&["127.0.0.1:3"]) } else { vec![] };
            let want =
                Plan { bind, keep: addrs(&["127.0.0.1:1", "127.0.0.1:2"]), changed: names(&["a"]), ..Plan::default() };
            assert_eq!(p, want, "{what}");
        }
    }

    #[test]
    fn an_address_moving_between_routes_stays_open() {
        let old = config(vec![route("a", &["127.0.0.1:1", "127.0.0.1:2"]), route("b", &["127.0.0.1:3"])]);
        let new = config(vec![route("a", &["127.0.0.1:1"]), route("b", &["127.0.0.1:3", "127.0.0.1:2"])]);
        let want = Plan {
            keep: addrs(&["127.0.0.1:1", "127.0.0.1:3", "127.0.0.1:2"]),
            changed: names(&["a", "b"]),
            ..Plan::default()
        };
        assert_eq!(plan(&old, &new), want);
    }

    #[test]
    fn renamed_route_is_removed_and_added() {
        let old = config(vec![route("a", &["127.0.0.1:1"])]);
        let new = config(vec![route("z", &["127.0.0.1:1"])]);
        let want =
            Plan { keep: addrs(&["127.0.0.1:1"]), added: names(&["z"]), removed: names(&["a"]), ..Plan::default() };
        assert_eq!(plan(&old, &new), want);
    }

    #[test]
    fn replaced_addresses_bind_and_close() {
        let old = config(vec![route("a", &["127.0.0.1:1", "[::1]:1"])]);
        let new = config(vec![route("a", &["[::1]:1", "127.0.0.1:9"])]);
        let want = Plan {
            bind: addrs(&["127.0.0.1:9"]),
            close: addrs(&["127.0.0.1:1"]),
            keep: addrs(&["[::1]:1"]),
            changed: names(&["a"]),
            ..Plan::default()
        };
        assert_eq!(plan(&old, &new), want);
    }

    #[test]
    fn every_global_and_metrics_key_needs_a_restart() {
        let old = config(vec![route("a", &["127.0.0.1:1"])]);
        let edits: [(&str, Edit<FileConfig>); 11] = [
            ("global.drain_timeout", |c| c.global.drain_timeout += Duration::from_secs(1)),
            ("global.max_connections", |c| c.global.max_connections += 1),
            ("global.threads", |c| c.global.threads = Some(3)),
            ("global.max_inflight", |c| c.global.max_inflight += 1),
            ("global.max_inflight_total", |c| c.global.max_inflight_total += 1),
            ("global.sockmap_sndbuf", |c| c.global.sockmap_sndbuf = 0),
            ("global.pipe_size", |c| c.global.pipe_size = 0),
            ("global.user", |c| c.global.user = Some("nobody".into())),
            ("global.group", |c| c.global.group = Some("nogroup".into())),
            ("global.sockmap_allow_affected_kernel", |c| c.global.sockmap_allow_affected_kernel = true),
            ("metrics.listen", |c| c.metrics.listen = Some("127.0.0.1:9100".parse().unwrap())),
        ];
        let mut all = old.clone();
        for (key, edit) in edits {
            let mut new = old.clone();
            edit(&mut new);
            edit(&mut all);
            let p = plan(&old, &new);
            assert_eq!(p, Plan { keep: addrs(&["127.0.0.1:1"]), restart_needed: vec![key], ..Plan::default() });
            assert!(!p.is_empty(), "{key}");
        }
        let keys: Vec<&str> = edits.iter().map(|(k, _)| *k).collect();
        assert_eq!(plan(&old, &all).restart_needed, keys);
    }

    /// The plan of two files as the parser reads them: an option added to `[defaults]` changes
    /// the routes whose value it changes (a), not one that already had it (b).
    #[test]
    fn from_files() {
        let old = "[[route]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nbackends = [\"b:1\"]\n\
                   [[route]]\nname = \"b\"\nlisten = [\"127.0.0.1:2\"]\nbackends = [\"b:1\"]\nidle_timeout = \"5m\"\n";
        let new = format!("[defaults]\nidle_timeout = \"5m\"\n{old}");
        let p = plan(&parse(old, "old").unwrap(), &parse(&new, "new").unwrap());
        assert_eq!(p, Plan { keep: addrs(&["127.0.0.1:1", "127.0.0.1:2"]), changed: names(&["a"]), ..Plan::default() });
    }
}
