//! `ntlm-splice doctor` as a user runs it, inside a network namespace the test creates
//! (`ip netns exec`): its transparent-source lines follow the namespace's policy routing,
//! while its exit status and the engine lines that `cargo xtask test` reads do not.

use std::{
    collections::HashMap,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use ntlm_splice_tests::harness;

/// A network namespace for one test (`ip netns add`), deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    /// `None` (and why, on stderr) when this process cannot make namespaces.
    fn new() -> Option<NetNs> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: making a network namespace needs root (cargo xtask test runs as root in CI)");
            return None;
        }
        let name = format!("ntlm-doctor-e2e-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let ns = NetNs { name };
        run(&["ip", "netns", "add", &ns.name]);
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NS ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) {
        run(&[&["ip", "-n", &self.name], args].concat());
    }

    /// `ntlm-splice doctor` in the namespace: its exit status and its `key=value` lines.
    fn doctor(&self) -> (std::process::ExitStatus, HashMap<String, String>) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(harness::bin())
            .arg("doctor")
            .output()
            .expect("ip netns exec ntlm-splice doctor");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines = text
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not key=value: {l:?}\n{text}"));
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        (out.status, lines)
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

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn doctor_reports_the_reply_routing_without_changing_its_verdict_on_engines() {
    let Some(ns) = NetNs::new() else { return };
    let (status, before) = ns.doctor();
    assert!(status.success(), "{status}: {before:?}");
    assert!(before["transparent_routing_ipv4"].starts_with("missing: "), "{before:?}");
    assert!(before["transparent_routing_ipv6"].starts_with("missing: "), "{before:?}");
    assert_eq!(before["transparent_source"], "not ready: see the transparent_ lines");

    // The README's routing set-up, with a mark and a table of the test's own.
    for (ip, dst) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        ns.ip(&[ip, "rule", "add", "fwmark", "0x3", "lookup", "77"]);
        ns.ip(&[ip, "route", "add", "local", dst, "dev", "lo", "table", "77"]);
    }
    let (status, after) = ns.doctor();
    assert!(status.success(), "{status}: {after:?}");
    for (fam, dst) in [("ipv4", "0.0.0.0/0"), ("ipv6", "::/0")] {
        let routing = &after[&format!("transparent_routing_{fam}")];
        assert!(routing.starts_with("ok: rule fwmark 0x3 lookup 77 (priority "), "{routing}");
        assert!(routing.ends_with(&format!("table 77: local {dst} dev lo")), "{routing}");
    }
    assert!(after["transparent_source"].starts_with("ready for ipv4 and ipv6"), "{after:?}");

    // What xtask and the engine choice read is the same either way.
    for key in ["sockmap_engine", "auto_engine", "auto_reason"] {
        assert_eq!(before.get(key), after.get(key), "{key}");
        assert!(before.contains_key(key), "no {key} line: {before:?}");
    }
}

/// How long the proxy may take to refuse an engine at start (it loads nothing first).
const REFUSAL_TIMEOUT_SECS: u32 = 20;
/// timeout(1)'s exit status when it had to stop the command.
const TIMEOUT_EXIT: i32 = 124;

/// A kernel release injected with `NTLM_SPLICE_TEST_KERNEL_RELEASE` (6.8 ended without the
/// duplicate-transmission fix): the proxy refuses `--engine sockmap` at start, naming the
/// defect, where it is fixed and the switch; doctor says the same. Needs no privilege: the
/// refusal comes before anything is loaded.
#[test]
fn an_affected_kernel_is_refused_at_start_and_named_by_doctor() {
    let release = ["NTLM_SPLICE_TEST_KERNEL_RELEASE", "6.8.12"];
    // Under timeout(1): a binary that wrongly starts would otherwise serve for ever.
    let out = Command::new("timeout")
        .arg(REFUSAL_TIMEOUT_SECS.to_string())
        .arg(harness::bin())
        .env(release[0], release[1])
        .args(["--engine", "sockmap", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"])
        .output()
        .expect("run ntlm-splice under timeout(1)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(TIMEOUT_EXIT), "started and served on an affected kernel: {err}");
    assert!(!out.status.success(), "started on an affected kernel: {err}");
    for part in ["6.8.12", "dup_tx", "3b4f14b79428", "6.16+", "sockmap_allow_affected_kernel", "splice engine"] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    assert_eq!(err.matches("has the sockmap defect dup_tx").count(), 1, "said more than once: {err}");

    let out = Command::new(harness::bin()).env(release[0], release[1]).arg("doctor").output().expect("doctor");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .trim_matches('"')
            .to_string()
    };
    assert!(get("kernel_defect_dup_tx").starts_with("affected (this line ended without the fix)"), "{text}");
    assert!(get("sockmap_kernel").starts_with("refused unless forced: kernel 6.8.12"), "{text}");
    assert!(
        get("auto_reason").ends_with(
            "kernel 6.8.12: known sockmap defects: dup_tx affected, copied_seq affected, fionread not_affected"
        ),
        "{text}"
    );
}
