//! `ntlm-splice doctor`: who the process is and what it holds, what each engine and option
//! needs ([`crate::privilege`]); what this host supports for the sockmap engine, step by step, and
//! which engine `--engine auto` would pick; then what transparent source mode
//! (`source = "client"`) needs and what of it is missing ([`transparent`], the `transparent_`
//! lines). Each line is `key=value` (values with spaces quoted) so scripts can read it;
//! `cargo xtask test` looks for `sockmap_engine=available`. Exits 0 whatever it finds: a host
//! without eBPF still runs the splice engine, and one without transparent routing still runs
//! every route that does not ask for it.

use std::time::Instant;

use aya::maps::MapType;

use crate::{
    config::Config,
    engine::sockmap::{self, SockmapEngine, kernels},
    sys::caps::{self, Cap},
};

pub mod transparent;

fn line(key: &str, value: impl std::fmt::Display) {
    println!("{}", format_line(key, value));
}

/// `key=value`, the value quoted if it has spaces or is empty, and always on one line (an
/// error text may have several: they are joined with "; ").
fn format_line(key: &str, value: impl std::fmt::Display) -> String {
    let v = value.to_string().lines().collect::<Vec<_>>().join("; ");
    if v.contains(char::is_whitespace) || v.is_empty() {
        format!("{key}=\"{}\"", v.replace('"', "'"))
    } else {
        format!("{key}={v}")
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|e| format!("unknown ({e})"), |s| s.trim().to_string())
}

/// The kernel's lines: its upstream base, one `kernel_defect_<id>` per known sockmap defect
/// (verdict, fix, and whether the engine meets it), and `sockmap_kernel`, what start-up
/// does with `engine = "sockmap"` on this kernel.
fn kernel_lines(k: &kernels::Assessment, parser: bool) -> Vec<(String, String)> {
    let mut out = vec![("kernel_base".to_string(), k.base.to_string())];
    for (d, v) in &k.verdicts {
        let meets = match d.engine_use {
            kernels::Use::Always => "the engine meets it",
            kernels::Use::WithParser => "the engine meets it only with NTLM_SPLICE_SOCKMAP_PARSER=1",
            kernels::Use::Never => "the engine does not meet it",
        };
        out.push((
            format!("kernel_defect_{}", d.id),
            format!("{v}; fix {} \"{}\" in {}; {meets}", d.fix.id, d.fix.title, d.fixed_releases()),
        ));
    }
    let verdict = match k.refusal(parser) {
        Some(r) => format!("refused unless forced: {r}"),
        None => match k.unknowns(parser).as_slice() {
            [] => "allowed".to_string(),
            w => format!("allowed with warnings: {}", w.join("; ")),
        },
    };
    out.push(("sockmap_kernel".to_string(), verdict));
    out
}

/// Prints the report.
pub fn run() -> anyhow::Result<()> {
    let uid = caps::euid();
    line("uid", uid);
    match caps::effective() {
        Some(set) => {
            let has = |cap| if caps::holds(set, cap) { "yes" } else { "no" };
            line("cap_bpf", has(Cap::Bpf));
            line("cap_net_admin", has(Cap::NetAdmin));
            line("cap_perfmon", has(Cap::Perfmon));
            line("cap_sys_admin", has(Cap::SysAdmin));
        }
        None => line("capabilities", "unknown (no CapEff in /proc/self/status)"),
    }
    // Who the process is, every capability set, and what each engine and option needs (the
    // README's Privileges section; `--user` keeps only those).
    for (key, value) in crate::privilege::doctor_lines() {
        line(&key, value);
    }
    line("kernel", kernel_release());
    let kernel = kernels::assess(&kernels::Host::read());
    for (key, value) in kernel_lines(&kernel, sockmap::parser_requested()) {
        line(&key, value);
    }
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
        match SockmapEngine::load(&Config::default().global) {
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
                // The engine's counters after the self-test's one connection, by the names
                // they are declared with once (engine/sockmap/counters.rs).
                let counters: Vec<String> = s.counters().map(|(name, _, v)| format!("{name}={v}")).collect();
                line("counters_after_self_test", counters.join(" "));
                line(
                    "overlap_guard",
                    match &s.guard_off {
                        None => "on (struct offsets from the kernel's BTF)".to_string(),
                        Some(why) => {
                            format!("off: {why}; a retransmit overlap resets the connection")
                        }
                    },
                );
                line(
                    "kernel_probe_fionread",
                    match e.fionread_probe() {
                        Ok(p) => p.to_string(),
                        Err(why) => format!("not run: {why}"),
                    },
                );
                line("sockmap_engine", "available");
                ("splice", crate::engine::auto_reason(&kernel))
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

    for (key, value) in transparent::lines(&transparent::gather()) {
        line(&key, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::kernels;

    fn kernel_lines(release: &str) -> std::collections::HashMap<String, String> {
        let host = kernels::Host { release: release.into(), ..kernels::Host::default() };
        super::kernel_lines(&kernels::assess(&host), false).into_iter().collect()
    }

    #[test]
    fn the_kernel_lines_give_a_verdict_per_defect() {
        let l = kernel_lines("6.1.100");
        assert_eq!(l["kernel_base"], "6.1.100 from the release string");
        assert!(l["kernel_defect_dup_tx"].starts_with("affected (fixed in 6.1.142); fix 3b4f14b79428"), "{l:?}");
        assert!(l["kernel_defect_dup_tx"].ends_with("the engine meets it"), "{l:?}");
        assert!(l["kernel_defect_copied_seq"].starts_with("affected (fixed in 6.1.130)"), "{l:?}");
        assert!(l["kernel_defect_fionread"].starts_with("not_affected"), "{l:?}");
        assert!(l["sockmap_kernel"].starts_with("refused unless forced: kernel 6.1.100"), "{l:?}");
        let l = kernel_lines("6.18.44-fc-v1252");
        assert!(l["kernel_defect_dup_tx"].starts_with("fixed; "), "{l:?}");
        assert!(l["kernel_defect_fionread"].starts_with("unknown: "), "{l:?}");
        assert_eq!(l["sockmap_kernel"], "allowed");
        let l = kernel_lines("5.14.0-427.el9.x86_64");
        assert!(l["kernel_base"].starts_with("unknown: "), "{l:?}");
        assert!(l["sockmap_kernel"].starts_with("allowed with warnings: sockmap defect dup_tx"), "{l:?}");
        assert_eq!(l.len(), 2 + kernels::DEFECTS.len());
    }

    #[test]
    fn a_line_is_one_line_and_quoted_when_it_has_spaces() {
        assert_eq!(super::format_line("k", "v"), "k=v");
        assert_eq!(super::format_line("k", ""), "k=\"\"");
        assert_eq!(super::format_line("k", "a \"b\""), "k=\"a 'b'\"");
        assert_eq!(super::format_line("k", "failed: first\nsecond\n"), "k=\"failed: first; second\"");
    }
}
