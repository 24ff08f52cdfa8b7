//! `ntlm-splice doctor`: what this host supports for the sockmap engine, step by step, and
//! which engine `--engine auto` would pick. Each line is `key=value` (values with spaces
//! quoted) so scripts can read it; `cargo xtask test` looks for `sockmap_engine=available`.
//! Exits 0 whatever it finds: a host without eBPF still runs the splice engine.

use std::time::Instant;

use aya::maps::MapType;

use crate::{
    config::{
        Balance, Config, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT_TOTAL, DEFAULT_SOCKMAP_SNDBUF, EngineChoice,
    },
    engine::sockmap::{self, SockmapEngine},
};

/// Capability bits in `/proc/self/status` `CapEff`.
const CAP_NET_ADMIN: u32 = 12;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
pub(crate) const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn line(key: &str, value: impl std::fmt::Display) {
    let v = value.to_string();
    if v.contains(char::is_whitespace) || v.is_empty() {
        println!("{key}=\"{}\"", v.replace('"', "'"));
    } else {
        println!("{key}={v}");
    }
}

/// This process's effective capabilities, as a bit set (`None` if unreadable).
pub(crate) fn cap_eff() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|e| format!("unknown ({e})"), |s| s.trim().to_string())
}

/// Prints the report.
pub fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    line("uid", uid);
    match cap_eff() {
        Some(caps) => {
            let has = |bit: u32| if caps & (1 << bit) != 0 { "yes" } else { "no" };
            line("cap_bpf", has(CAP_BPF));
            line("cap_net_admin", has(CAP_NET_ADMIN));
            line("cap_perfmon", has(CAP_PERFMON));
            line("cap_sys_admin", has(CAP_SYS_ADMIN));
        }
        None => line("capabilities", "unknown (no CapEff in /proc/self/status)"),
    }
    line("kernel", kernel_release());
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled") {
        line("unprivileged_bpf_disabled", v.trim());
    }

    line("splice_pipes", crate::engine::splice::pipe_check(crate::config::DEFAULT_PIPE_SIZE));

    let object = sockmap::embedded_object();
    match object {
        Ok(len) => line("ebpf_object", format!("embedded ({len} bytes)")),
        Err(reason) => line("ebpf_object", format!("missing: {reason}")),
    }
    let bpf = aya::sys::is_map_supported(MapType::Array);
    match &bpf {
        Ok(true) => line("bpf_syscall", "ok"),
        Ok(false) => line("bpf_syscall", "refused (no CAP_BPF / unprivileged BPF disabled?)"),
        Err(e) => line("bpf_syscall", format!("error: {e}")),
    }
    match aya::sys::is_map_supported(MapType::SockHash) {
        Ok(true) => line("sockhash_map", "ok"),
        Ok(false) => line("sockhash_map", "refused (needs CAP_NET_ADMIN and CONFIG_BPF_STREAM_PARSER)"),
        Err(e) => line("sockhash_map", format!("error: {e}")),
    }

    let (engine, why) = if object.is_err() {
        line("programs", "skipped (no eBPF object in this binary)");
        line("self_test", "skipped");
        line("sockmap_engine", "unavailable");
        (
            "splice",
            "this binary has no eBPF object: install the eBPF toolchain with `cargo xtask setup` and rebuild"
                .to_string(),
        )
    } else {
        let started = Instant::now();
        match SockmapEngine::load(&default_config()) {
            Ok(e) => {
                line("programs", "loaded and attached");
                line("self_test", format!("passed ({} ms including load)", started.elapsed().as_millis()));
                let s = e.snapshot();
                line(
                    "maps_after_self_test",
                    format!(
                        "fwd={} peer={} stats={} ctl={}",
                        s.fwd, s.peer, s.stats, s.ctl
                    ),
                );
                line(
                    "overlap_guard",
                    match &s.guard_off {
                        None => "on (struct offsets from the kernel's BTF)".to_string(),
                        Some(why) => {
                            format!("off: {why}; a retransmit overlap resets the connection")
                        }
                    },
                );
                line("sockmap_engine", "available");
                ("splice", crate::engine::AUTO_REASON.to_string())
            }
            Err(e) => {
                line("programs_or_self_test", format!("failed: {e:#}"));
                line("sockmap_engine", "unavailable");
                let hint = if uid != 0 { "; run as root (or with CAP_BPF and CAP_NET_ADMIN)" } else { "" };
                ("splice", format!("sockmap unavailable: {e:#}{hint}"))
            }
        }
    };
    line("auto_engine", engine);
    line("auto_reason", why);
    Ok(())
}

/// The configuration a proxy with default flags would run with (only the engine's limits
/// matter here).
fn default_config() -> Config {
    Config {
        listen: Vec::new(),
        backends: Vec::new(),
        engine: EngineChoice::Auto,
        balance: Balance::RoundRobin,
        connect_timeout: std::time::Duration::from_secs(5),
        idle_timeout: None,
        drain_timeout: std::time::Duration::from_secs(30),
        max_connections: DEFAULT_MAX_CONNECTIONS,
        max_inflight: DEFAULT_MAX_INFLIGHT,
        max_inflight_total: DEFAULT_MAX_INFLIGHT_TOTAL,
        sockmap_sndbuf: DEFAULT_SOCKMAP_SNDBUF,
        pipe_size: crate::config::DEFAULT_PIPE_SIZE,
        park_after: None,
    }
}
