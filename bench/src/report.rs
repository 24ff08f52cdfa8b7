//! What one client run prints: a single JSON line, read back by `cargo xtask bench`.

use serde::{Deserialize, Serialize};

/// The aggregate CPU counters of /proc/stat, in clock ticks (guest time is already part
/// of user and nice).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct HostCpu {
    /// user
    pub user: u64,
    /// nice
    pub nice: u64,
    /// system
    pub system: u64,
    /// idle
    pub idle: u64,
    /// iowait
    pub iowait: u64,
    /// irq
    pub irq: u64,
    /// softirq
    pub softirq: u64,
    /// steal: time the hypervisor gave to someone else; not our CPU.
    pub steal: u64,
}

impl HostCpu {
    /// The counters' growth from `before` to `self`.
    pub fn since(&self, before: &HostCpu) -> HostCpu {
        HostCpu {
            user: self.user.saturating_sub(before.user),
            nice: self.nice.saturating_sub(before.nice),
            system: self.system.saturating_sub(before.system),
            idle: self.idle.saturating_sub(before.idle),
            iowait: self.iowait.saturating_sub(before.iowait),
            irq: self.irq.saturating_sub(before.irq),
            softirq: self.softirq.saturating_sub(before.softirq),
            steal: self.steal.saturating_sub(before.steal),
        }
    }

    /// Busy time that was ours to spend: user + nice + system + irq + softirq (not steal,
    /// idle or iowait).
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }

    /// Every tick, steal included.
    pub fn total(&self) -> u64 {
        self.busy() + self.idle + self.iowait + self.steal
    }
}

/// CPU spent during a measured interval.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CpuDelta {
    /// Clock ticks per second.
    pub hz: u64,
    /// Whole host, over the interval.
    pub host: HostCpu,
    /// utime + stime of the proxy's processes (all threads), if there is a proxy.
    pub proxy_ticks: Option<u64>,
    /// utime + stime of the client process itself (all its threads).
    #[serde(default)]
    pub client_ticks: Option<u64>,
    /// utime + stime of the backend process, if its PID was given.
    #[serde(default)]
    pub backend_ticks: Option<u64>,
    /// utime + stime of every kernel thread (softirq threads, work-queue workers ...).
    #[serde(default)]
    pub kthread_ticks: Option<u64>,
}

impl CpuDelta {
    /// Host busy CPU-seconds (steal excluded).
    pub fn host_busy_secs(&self) -> f64 {
        self.host.busy() as f64 / self.hz as f64
    }

    /// Proxy CPU-seconds.
    pub fn proxy_secs(&self) -> Option<f64> {
        self.proxy_ticks.map(|t| t as f64 / self.hz as f64)
    }

    /// CPU-seconds of the benchmark's own stack: client, backend, proxy (none when there is
    /// none) and every kernel thread. Unlike the host figure, work other processes on the
    /// host do is left out, so it stays readable on a busy box; softirq work runs mostly in
    /// the context of the process that sent the packet, so it is counted with that process.
    pub fn stack_secs(&self) -> Option<f64> {
        let t = self.client_ticks? + self.backend_ticks? + self.kthread_ticks? + self.proxy_ticks.unwrap_or(0);
        Some(t as f64 / self.hz as f64)
    }

    /// Share of all CPU time the hypervisor stole, 0..1.
    pub fn steal_share(&self) -> f64 {
        let total = self.host.total();
        if total == 0 { 0.0 } else { self.host.steal as f64 / total as f64 }
    }
}

/// Round-trip times of a latency run.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Round trips measured.
    pub samples: u64,
    /// Median, ns.
    pub p50_ns: u64,
    /// 90th percentile, ns.
    pub p90_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// 99.9th percentile, ns.
    pub p999_ns: u64,
    /// Slowest, ns.
    pub max_ns: u64,
    /// Mean, ns.
    pub mean_ns: u64,
}

/// Kernel memory figures, bytes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct KernMem {
    /// /proc/meminfo Slab (socket, inode, dentry, epoll objects ...).
    pub slab: u64,
    /// /proc/meminfo KernelStack (threads).
    pub kernel_stack: u64,
    /// /proc/meminfo PageTables.
    pub page_tables: u64,
    /// /proc/net/sockstat TCP mem (socket buffers), in bytes.
    pub tcp_buffers: u64,
    /// Bytes in use in the slab caches that grow with every TCP socket (see
    /// `procfs::SOCKET_CACHES`), from /proc/slabinfo (root only). Part of `slab`, not
    /// added to the total; steadier than it when other work on the host churns the slabs.
    pub socket_slabs: Option<u64>,
}

impl KernMem {
    /// Sum of the parts.
    pub fn total(&self) -> u64 {
        self.slab + self.kernel_stack + self.page_tables + self.tcp_buffers
    }
}

/// Memory held by idle connections.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Idle {
    /// Connections held open (each did one 1-byte round trip through to the backend).
    pub conns: u64,
    /// Seconds taken to open them all.
    pub open_secs: f64,
    /// Proxy RSS (sum over its processes) before opening, bytes.
    pub proxy_rss_before: Option<u64>,
    /// Proxy RSS with every connection open, bytes.
    pub proxy_rss_after: Option<u64>,
    /// Host kernel memory before opening.
    pub kern_before: KernMem,
    /// Host kernel memory with every connection open (client, proxy and backend sockets).
    pub kern_after: KernMem,
}

impl Idle {
    /// Proxy RSS growth per connection, bytes.
    pub fn rss_per_conn(&self) -> Option<f64> {
        match (self.proxy_rss_before, self.proxy_rss_after) {
            (Some(b), Some(a)) if self.conns > 0 => Some((a as f64 - b as f64) / self.conns as f64),
            _ => None,
        }
    }

    /// Host kernel memory growth per connection, bytes.
    pub fn kern_per_conn(&self) -> Option<f64> {
        (self.conns > 0).then(|| (self.kern_after.total() as f64 - self.kern_before.total() as f64) / self.conns as f64)
    }

    /// Growth of the socket slab caches per connection, bytes.
    pub fn socket_slabs_per_conn(&self) -> Option<f64> {
        match (self.kern_before.socket_slabs, self.kern_after.socket_slabs) {
            (Some(b), Some(a)) if self.conns > 0 => Some((a as f64 - b as f64) / self.conns as f64),
            _ => None,
        }
    }
}

/// How well pacing held in a paced run: each connection's own rate (its bytes over its own
/// duration, from its first byte sent or asked for to its last byte acknowledged or received).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Paced {
    /// The rate each sender was held to, bits per second (`SO_MAX_PACING_RATE`).
    pub target_bps: u64,
    /// Connections measured.
    pub conns: u64,
    /// Slowest connection, bits per second.
    pub min_bps: f64,
    /// Median connection, bits per second.
    pub median_bps: f64,
    /// Fastest connection, bits per second.
    pub max_bps: f64,
}

/// One client run of one workload.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Workload name (`up`, `down`, `par`, `rate`, `lat`, `idle`, `probe`, `paced`, `rr`).
    pub workload: String,
    /// The run completed and every byte count matched.
    pub ok: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// Length of the measured interval, seconds.
    pub secs: f64,
    /// Payload bytes moved (both directions summed).
    pub bytes: u64,
    /// Payload bytes that should have moved.
    pub expected_bytes: u64,
    /// Connections completed.
    pub conns: u64,
    /// Connections that failed.
    pub conn_errors: u64,
    /// Payload was checked byte by byte against the pattern.
    pub verified: bool,
    /// CPU over the measured interval.
    pub cpu: Option<CpuDelta>,
    /// Round-trip times (`lat`).
    pub latency: Option<Latency>,
    /// Idle-connection memory (`idle`).
    pub idle: Option<Idle>,
    /// Requests answered (`rr`: request/response exchanges over kept-alive connections).
    #[serde(default)]
    pub requests: u64,
    /// Per-connection rates of a paced run (`paced`).
    #[serde(default)]
    pub paced: Option<Paced>,
}
