//! The calling thread's capabilities, read from `/proc/thread-self/status`.
//!
//! Capabilities belong to each thread (capset(2) changes only the caller's), and the kernel
//! checks those of the thread making the system call; all of this process's threads normally
//! hold the same set, but a test may drop some in one thread only.

/// Capability numbers (linux/capability.h), the bit positions in `CapEff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Cap {
    /// CAP_NET_BIND_SERVICE: binding TCP ports below net.ipv4.ip_unprivileged_port_start.
    NetBindService = 10,
    /// CAP_NET_ADMIN: sockhash updates, SO_SNDBUFFORCE, IP_TRANSPARENT.
    NetAdmin = 12,
    /// CAP_NET_RAW: the kernel also accepts it for IP_TRANSPARENT.
    NetRaw = 13,
    /// CAP_SYS_ADMIN: everything BPF before CAP_BPF; no pipe-user-pages limit.
    SysAdmin = 21,
    /// CAP_SYS_RESOURCE: pipes past fs.pipe-user-pages-soft.
    SysResource = 24,
    /// CAP_PERFMON: BPF programs reading kernel memory.
    Perfmon = 38,
    /// CAP_BPF: loading programs and creating maps.
    Bpf = 39,
}

/// Every capability's name by number (linux/capability.h), for logs and `doctor`.
pub const NAMES: [&str; 41] = [
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
];

impl Cap {
    /// Its bit in a set.
    pub const fn bit(self) -> u64 {
        1 << self as u32
    }

    /// Its name, as `setpriv` and systemd write it (`cap_net_admin`).
    pub fn name(self) -> &'static str {
        NAMES[self as usize]
    }
}

/// A set's capabilities by name, comma separated (`none` for the empty set; `cap_N` for a
/// number this list does not know).
pub fn names(set: u64) -> String {
    let v: Vec<String> = (0..64)
        .filter(|&c| set & (1u64 << c) != 0)
        .map(|c| NAMES.get(c).map_or_else(|| format!("cap_{c}"), |n| (*n).to_string()))
        .collect();
    if v.is_empty() { "none".into() } else { v.join(",") }
}

/// The calling thread's effective capabilities, as a bit set (`None` if unreadable).
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Whether `set` (from [`effective`]) holds `cap`.
pub fn holds(set: u64, cap: Cap) -> bool {
    set & cap.bit() != 0
}

/// Whether the calling thread holds any of `caps` now (`false` if that cannot be read).
pub fn any(caps: &[Cap]) -> bool {
    effective().is_some_and(|set| caps.iter().any(|&c| holds(set, c)))
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_numbers() {
        for c in
            [Cap::NetBindService, Cap::NetAdmin, Cap::NetRaw, Cap::SysAdmin, Cap::SysResource, Cap::Perfmon, Cap::Bpf]
        {
            assert_eq!(
                NAMES[c as usize].replace("cap_", "").replace('_', ""),
                format!("{c:?}").to_lowercase(),
                "{c:?}"
            );
        }
        assert_eq!(names(0), "none");
        assert_eq!(names(Cap::NetBindService.bit() | Cap::NetAdmin.bit()), "cap_net_bind_service,cap_net_admin");
        assert_eq!(names(1 << 50), "cap_50");
    }
}
