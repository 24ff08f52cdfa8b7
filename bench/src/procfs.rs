//! Readers of /proc: host CPU time, a process's and the kernel threads' CPU time, resident
//! memory, kernel memory, and a process's descendants.

use std::{fs, io};

use crate::report::{HostCpu, KernMem};

/// Clock ticks per second of the /proc CPU counters.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// The aggregate `cpu` line of /proc/stat.
pub fn host_cpu() -> io::Result<HostCpu> {
    let text = fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("/proc/stat has no aggregate cpu line"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(HostCpu {
        user: at(0),
        nice: at(1),
        system: at(2),
        idle: at(3),
        iowait: at(4),
        irq: at(5),
        softirq: at(6),
        steal: at(7),
    })
}

/// utime + stime of one process (all its threads), in clock ticks.
pub fn process_ticks(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields restart after the last ')'.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the man page, so utime (14) and stime (15) are at 11, 12.
    let utime: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// Every kernel thread (kthreadd, PID 2, and its children: softirq threads, the work-queue
/// workers that run sockmap's psock work, ...) with its utime + stime in clock ticks.
pub fn kernel_threads() -> Vec<(u32, u64)> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After ')': ppid (field 4) is at 1, utime and stime at 11 and 12.
        let ppid: u32 = f.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if pid == 2 || ppid == 2 {
            let t = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            out.push((pid, t(11) + t(12)));
        }
    }
    out
}

/// CPU ticks kernel threads spent between two [`kernel_threads`] snapshots. A thread that
/// started in between counts from zero; one that ended in between is lost (its last
/// ticks cannot be read any more).
pub fn kernel_thread_ticks_since(before: &[(u32, u64)], after: &[(u32, u64)]) -> u64 {
    after
        .iter()
        .map(|(pid, t)| {
            let b = before.iter().find(|(p, _)| p == pid).map_or(0, |(_, b)| *b);
            t.saturating_sub(b)
        })
        .sum()
}

/// Resident memory of one process in bytes (VmRSS).
pub fn process_rss(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(kb * 1024)
}

/// Kernel memory that grows with sockets and threads: /proc/meminfo's Slab, KernelStack and
/// PageTables, and TCP socket buffer pages from /proc/net/sockstat.
pub fn kern_mem() -> io::Result<KernMem> {
    let text = fs::read_to_string("/proc/meminfo")?;
    let kb = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let sockstat = fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tcp_pages = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter()
                .position(|w| *w == "mem")
                .and_then(|i| f.get(i + 1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    Ok(KernMem {
        slab: kb("Slab"),
        kernel_stack: kb("KernelStack"),
        page_tables: kb("PageTables"),
        // SAFETY: sysconf has no preconditions.
        tcp_buffers: tcp_pages * (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64),
        socket_slabs: socket_slab_bytes(),
    })
}

/// Slab caches with one object (or one per epoll registration) per TCP socket: the socket,
/// its inode, and epoll's items. dentry and filp also grow per socket but are churned by
/// every process on the host, so they are left to the meminfo total.
pub const SOCKET_CACHES: &[&str] = &[
    "TCP",
    "TCPv6",
    "sock_inode_cache",
    "eventpoll_epi",
    "eventpoll_pwq",
    "request_sock_TCP",
];

/// Bytes in use (active objects x object size) in [`SOCKET_CACHES`]; `None` without
/// read access to /proc/slabinfo (root only).
pub fn socket_slab_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/slabinfo").ok()?;
    let mut sum = 0u64;
    for line in text.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 3 && SOCKET_CACHES.contains(&f[0]) {
            let active: u64 = f[1].parse().unwrap_or(0);
            let size: u64 = f[3].parse().unwrap_or(0);
            sum += active * size;
        }
    }
    Some(sum)
}

/// When a process started (clock ticks after boot, /proc/PID/stat field 22): with the PID,
/// it names one process for good, so a recycled PID is never mistaken for it.
pub fn start_time(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    // After ')': field 3 (state) is index 0, so field 22 is index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Every descendant of `pid` (children, grandchildren, ...), from /proc/PID/task/*/children.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    // Bounded: a process tree deeper or wider than this is not one we started.
    while let Some(p) = todo.pop() {
        if out.len() > 4096 {
            break;
        }
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(kids) = fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for k in kids
                .split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok())
            {
                if !out.contains(&k) {
                    out.push(k);
                    todo.push(k);
                }
            }
        }
    }
    out
}

/// Raises the soft open-files limit to the hard limit; returns the limit now in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
pub fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return 1024;
    }
    if l.rlim_cur < l.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: l.rlim_max,
            rlim_max: l.rlim_max,
        };
        // SAFETY: valid pointer to an initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return l.rlim_max as u64;
        }
    }
    l.rlim_cur as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_thread_time_counts_new_threads_whole_and_ended_ones_not_at_all() {
        let before = [(2, 5), (10, 100), (11, 40)];
        // 10 grew by 7, 11 ended, 12 started and ran 3.
        let after = [(2, 5), (10, 107), (12, 3)];
        assert_eq!(kernel_thread_ticks_since(&before, &after), 10);
    }

    #[test]
    fn kernel_threads_include_kthreadd_and_not_this_process() {
        let k = kernel_threads();
        assert!(k.iter().any(|(p, _)| *p == 2), "kthreadd (PID 2) not found among {} threads", k.len());
        assert!(!k.iter().any(|(p, _)| *p == std::process::id()));
    }
}
