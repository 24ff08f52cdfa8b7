//! The calling thread's capabilities, read from `/proc/thread-self/status`.
//!
//! Capabilities belong to each thread (capset(2) changes only the caller's), and the kernel
//! checks those of the thread making the system call; all of this process's threads normally
//! hold the same set, but a test may drop some in one thread only.

/// Capability numbers (linux/capability.h), the bit positions in `CapEff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Cap {
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

/// The calling thread's effective capabilities, as a bit set (`None` if unreadable).
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Whether `set` (from [`effective`]) holds `cap`.
pub fn holds(set: u64, cap: Cap) -> bool {
    set & (1 << cap as u32) != 0
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
