//! Medians, spreads and ratios; the terminal table; the JSON, SVG and text files.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{Context as _, bail};
use ntlm_bench::report::Report;
use serde::Serialize;

use super::{
    Plan, Results, RunRecord, SpliceCheck, SubjectInfo, WKind,
    subjects::{Kind, Tools},
};

/// Host and versions, for the JSON and the table's heading.
#[derive(Debug, Serialize)]
pub struct Meta {
    /// When the run started, UTC, RFC 3339.
    pub started: String,
    /// File-name stamp, UTC.
    pub stamp: String,
    /// Wall time of the whole run, seconds.
    pub duration_secs: f64,
    /// uname -r.
    pub kernel: String,
    /// /proc/cpuinfo model name.
    pub cpu: String,
    /// CPUs available.
    pub cpus: usize,
    /// /proc/meminfo MemTotal, bytes.
    pub mem_total: u64,
    /// net.ipv4.tcp_tw_reuse.
    pub tcp_tw_reuse: String,
    /// `git describe --always --dirty` of the workspace.
    pub git: String,
    /// `nginx -v`.
    pub nginx: Option<String>,
    /// `haproxy -v`.
    pub haproxy: Option<String>,
}

impl Meta {
    /// Reads the host's facts.
    pub fn collect(root: &Path, started: SystemTime, tools: &Tools) -> Meta {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_string();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        let secs = started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let git = Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Meta {
            started: utc(secs, true),
            stamp: utc(secs, false),
            duration_secs: started.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0),
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu: cpuinfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024,
            tcp_tw_reuse: read("/proc/sys/net/ipv4/tcp_tw_reuse"),
            git,
            nginx: tools.nginx_version.clone(),
            haproxy: tools.haproxy_version.clone(),
        }
    }
}

/// `secs` since the epoch as UTC: `2026-11-02T12:34:56Z`, or `20261102-123456` for files.
fn utc(secs: u64, rfc3339: bool) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    if rfc3339 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
    }
}

/// One figure of one subject in one workload, over the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Subject.
    pub subject: String,
    /// Direct, ours or peer.
    pub kind: Kind,
    /// Workload label.
    pub workload: String,
    /// Figure (`throughput`, `host_cpu`, `proxy_cpu`, `steal`, `rate`, `p50`, `p99`,
    /// `proxy_rss`, `kernel`).
    pub metric: String,
    /// Unit.
    pub unit: String,
    /// Whether more is better.
    pub higher_is_better: bool,
    /// Runs that succeeded.
    pub runs_ok: usize,
    /// Runs that failed.
    pub runs_failed: usize,
    /// Median of the successful runs.
    pub median: Option<f64>,
    /// Smallest.
    pub min: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
    /// The peer with the best median for this figure.
    pub best_peer: Option<String>,
    /// median ÷ best peer's median.
    pub vs_best_peer: Option<f64>,
    /// median ÷ direct's median.
    pub vs_direct: Option<f64>,
}

struct MetricDef {
    key: &'static str,
    unit: &'static str,
    higher: bool,
    /// Ratios make sense (not for steal).
    ratios: bool,
    get: fn(&Report) -> Option<f64>,
}

fn gb(r: &Report) -> f64 {
    r.bytes as f64 / 1e9
}

fn metrics(kind: WKind) -> Vec<MetricDef> {
    let steal = MetricDef {
        key: "steal",
        unit: "%",
        higher: false,
        ratios: false,
        get: |r| r.cpu.map(|c| c.steal_share() * 100.0),
    };
    match kind {
        WKind::Bulk => vec![
            MetricDef {
                key: "throughput",
                unit: "MB/s",
                higher: true,
                ratios: true,
                get: |r| (r.secs > 0.0).then(|| r.bytes as f64 / r.secs / 1e6),
            },
            MetricDef {
                key: "host_cpu",
                unit: "s/GB",
                higher: false,
                ratios: true,
                get: |r| r.cpu.map(|c| c.host_busy_secs() / gb(r)),
            },
            MetricDef {
                key: "proxy_cpu",
                unit: "s/GB",
                higher: false,
                ratios: true,
                get: |r| r.cpu.and_then(|c| c.proxy_secs()).map(|s| s / gb(r)),
            },
            steal,
        ],
        WKind::Rate => vec![
            MetricDef {
                key: "rate",
                unit: "conn/s",
                higher: true,
                ratios: true,
                get: |r| (r.secs > 0.0).then(|| r.conns as f64 / r.secs),
            },
            MetricDef {
                key: "host_cpu",
                unit: "µs/conn",
                higher: false,
                ratios: true,
                get: |r| r.cpu.map(|c| c.host_busy_secs() * 1e6 / r.conns.max(1) as f64),
            },
            MetricDef {
                key: "proxy_cpu",
                unit: "µs/conn",
                higher: false,
                ratios: true,
                get: |r| r.cpu.and_then(|c| c.proxy_secs()).map(|s| s * 1e6 / r.conns.max(1) as f64),
            },
            steal,
        ],
        WKind::Lat => vec![
            MetricDef {
                key: "p50",
                unit: "µs",
                higher: false,
                ratios: true,
                get: |r| r.latency.map(|l| l.p50_ns as f64 / 1e3),
            },
            MetricDef {
                key: "p99",
                unit: "µs",
                higher: false,
                ratios: true,
                get: |r| r.latency.map(|l| l.p99_ns as f64 / 1e3),
            },
            steal,
        ],
        WKind::Paced => vec![
            MetricDef {
                key: "throughput",
                unit: "MB/s",
                higher: true,
                ratios: true,
                get: |r| (r.secs > 0.0).then(|| r.bytes as f64 / r.secs / 1e6),
            },
            MetricDef {
                key: "pace",
                unit: "Mbit/s",
                higher: true,
                ratios: false,
                get: |r| r.paced.map(|p| p.median_bps / 1e6),
            },
            MetricDef {
                key: "pace_min",
                unit: "Mbit/s",
                higher: true,
                ratios: false,
                get: |r| r.paced.map(|p| p.min_bps / 1e6),
            },
            MetricDef {
                key: "host_cpu",
                unit: "s/GB",
                higher: false,
                ratios: true,
                get: |r| r.cpu.map(|c| c.host_busy_secs() / gb(r)),
            },
            MetricDef {
                key: "proxy_cpu",
                unit: "s/GB",
                higher: false,
                ratios: true,
                get: |r| r.cpu.and_then(|c| c.proxy_secs()).map(|s| s / gb(r)),
            },
            MetricDef {
                key: "stack_cpu",
                unit: "s/GB",
                higher: false,
                ratios: true,
                get: |r| r.cpu.and_then(|c| c.stack_secs()).map(|s| s / gb(r)),
            },
            steal,
        ],
        WKind::Rr => vec![
            MetricDef {
                key: "rate",
                unit: "req/s",
                higher: true,
                ratios: true,
                get: |r| (r.secs > 0.0).then(|| r.requests as f64 / r.secs),
            },
            MetricDef {
                key: "host_cpu",
                unit: "ms/1000 req",
                higher: false,
                ratios: true,
                // CPU-seconds per request × 1e6 = CPU-milliseconds per 1000 requests.
                get: |r| r.cpu.map(|c| c.host_busy_secs() * 1e6 / r.requests.max(1) as f64),
            },
            MetricDef {
                key: "proxy_cpu",
                unit: "ms/1000 req",
                higher: false,
                ratios: true,
                get: |r| r.cpu.and_then(|c| c.proxy_secs()).map(|s| s * 1e6 / r.requests.max(1) as f64),
            },
            MetricDef {
                key: "stack_cpu",
                unit: "ms/1000 req",
                higher: false,
                ratios: true,
                get: |r| r.cpu.and_then(|c| c.stack_secs()).map(|s| s * 1e6 / r.requests.max(1) as f64),
            },
            MetricDef {
                key: "p50",
                unit: "µs",
                higher: false,
                ratios: true,
                get: |r| r.latency.map(|l| l.p50_ns as f64 / 1e3),
            },
            MetricDef {
                key: "p99",
                unit: "µs",
                higher: false,
                ratios: true,
                get: |r| r.latency.map(|l| l.p99_ns as f64 / 1e3),
            },
            steal,
        ],
        WKind::Churn => vec![
            MetricDef {
                key: "rate",
                unit: "conn/s",
                higher: true,
                ratios: true,
                get: |r| (r.secs > 0.0).then(|| r.conns as f64 / r.secs),
            },
            MetricDef {
                key: "host_cpu",
                unit: "ms/1000 conn",
                higher: false,
                ratios: true,
                get: |r| r.cpu.map(|c| c.host_busy_secs() * 1e6 / r.conns.max(1) as f64),
            },
            MetricDef {
                key: "proxy_cpu",
                unit: "ms/1000 conn",
                higher: false,
                ratios: true,
                get: |r| r.cpu.and_then(|c| c.proxy_secs()).map(|s| s * 1e6 / r.conns.max(1) as f64),
            },
            MetricDef {
                key: "stack_cpu",
                unit: "ms/1000 conn",
                higher: false,
                ratios: true,
                get: |r| r.cpu.and_then(|c| c.stack_secs()).map(|s| s * 1e6 / r.conns.max(1) as f64),
            },
            steal,
        ],
        WKind::Idle => vec![
            MetricDef {
                key: "proxy_rss",
                unit: "B/conn",
                higher: false,
                ratios: true,
                get: |r| r.idle.and_then(|i| i.rss_per_conn()),
            },
            MetricDef {
                key: "kernel",
                unit: "B/conn",
                higher: false,
                ratios: true,
                get: |r| r.idle.and_then(|i| i.kern_per_conn()),
            },
            MetricDef {
                key: "socket_slabs",
                unit: "B/conn",
                higher: false,
                ratios: true,
                get: |r| r.idle.and_then(|i| i.socket_slabs_per_conn()),
            },
        ],
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Medians, spreads and ratios of every figure.
pub fn summarize(subjects: &[SubjectInfo], plan: &Plan, runs: &[RunRecord]) -> Vec<Summary> {
    let mut out = Vec::new();
    for w in &plan.workloads {
        for m in metrics(w.kind) {
            let mut rows: Vec<Summary> = Vec::new();
            for s in subjects.iter().filter(|s| s.skipped.is_none()) {
                let mine: Vec<&RunRecord> =
                    runs.iter().filter(|r| r.subject == s.name && r.workload == w.label).collect();
                let mut vals: Vec<f64> = mine
                    .iter()
                    .filter(|r| r.ok)
                    .filter_map(|r| r.report.as_ref().and_then(m.get))
                    .filter(|v| v.is_finite())
                    .collect();
                let (min, max) = (vals.iter().copied().reduce(f64::min), vals.iter().copied().reduce(f64::max));
                rows.push(Summary {
                    subject: s.name.clone(),
                    kind: s.kind,
                    workload: w.label.clone(),
                    metric: m.key.to_string(),
                    unit: m.unit.to_string(),
                    higher_is_better: m.higher,
                    runs_ok: mine.iter().filter(|r| r.ok).count(),
                    runs_failed: mine.iter().filter(|r| !r.ok).count(),
                    median: median(&mut vals),
                    min,
                    max,
                    best_peer: None,
                    vs_best_peer: None,
                    vs_direct: None,
                });
            }
            if m.ratios {
                let best = rows
                    .iter()
                    .filter(|r| r.kind == Kind::Peer)
                    .filter_map(|r| r.median.map(|v| (r.subject.clone(), v)))
                    .reduce(|a, b| if (b.1 > a.1) == m.higher { b } else { a });
                let direct = rows.iter().find(|r| r.kind == Kind::Direct).and_then(|r| r.median);
                let ratio = |v: f64, d: f64| (d != 0.0).then(|| v / d);
                for r in &mut rows {
                    if let Some(v) = r.median {
                        if let Some((name, b)) = &best {
                            r.best_peer = Some(name.clone());
                            r.vs_best_peer = ratio(v, *b);
                        }
                        r.vs_direct = direct.and_then(|d| ratio(v, d));
                    }
                }
            }
            out.extend(rows);
        }
    }
    out
}

/// What HAProxy's own counters say about splicing.
pub fn splice_notes(checks: &[SpliceCheck]) -> Vec<String> {
    let mut names: Vec<&str> = checks.iter().map(|c| c.subject.as_str()).collect();
    names.dedup();
    names.sort_unstable();
    names.dedup();
    let mut notes = Vec::new();
    for name in names {
        let mine: Vec<&SpliceCheck> = checks.iter().filter(|c| c.subject == name).collect();
        let configured = mine.iter().any(|c| c.splice_configured);
        let bytes: Vec<u64> = mine.iter().filter_map(|c| c.spliced_bytes).collect();
        if let Some(e) = mine.iter().find_map(|c| c.error.as_ref()) {
            notes.push(format!("{name}: could not read HAProxy's splice counter: {e}"));
        } else if configured && bytes.iter().all(|&b| b > 0) {
            let lo = bytes.iter().min().copied().unwrap_or(0) as f64 / 1e9;
            let hi = bytes.iter().max().copied().unwrap_or(0) as f64 / 1e9;
            notes.push(format!("{name}: HAProxy's own counter (show info TotalSplicdedBytesOut) says it spliced {lo:.2}-{hi:.2} GB per turn: splicing was real"));
        } else if configured {
            notes.push(format!("WARNING {name}: option splice-request/-response were set but HAProxy spliced 0 bytes in some turns: those figures are of a plain copy"));
        } else if bytes.iter().any(|&b| b > 0) {
            notes.push(format!("{name}: spliced bytes without splice options ({bytes:?})"));
        }
    }
    notes
}

/// `text` on one line (log lines joined with " | ", timestamps dropped), at most `max` chars.
pub fn one_line(text: &str, max: usize) -> String {
    let joined = text
        .lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| match l.strip_prefix("ts=") {
            Some(rest) => rest.split_once(' ').map_or(rest, |(_, r)| r),
            None => l,
        })
        .collect::<Vec<_>>()
        .join(" | ");
    if joined.chars().count() <= max { joined } else { format!("{}…", joined.chars().take(max).collect::<String>()) }
}

/// One line per turn for the progress log: the headline figure of each workload.
pub fn headline(plan: &Plan, runs: &[RunRecord]) -> String {
    runs.iter()
        .map(|r| {
            let kind = plan.workloads.iter().find(|w| w.label == r.workload).map(|w| w.kind);
            let fig = match (&r.report, kind) {
                (Some(rep), _) if !r.ok => format!("FAILED ({} bytes)", rep.bytes),
                (None, _) => "FAILED".to_string(),
                (Some(rep), Some(WKind::Bulk)) => {
                    format!("{:.0} MB/s", rep.bytes as f64 / rep.secs.max(1e-9) / 1e6)
                }
                (Some(rep), Some(WKind::Rate)) => {
                    format!("{:.0}/s", rep.conns as f64 / rep.secs.max(1e-9))
                }
                (Some(rep), Some(WKind::Lat)) => rep.latency.map_or("-".into(), |l| {
                    format!("p50 {:.0} p99 {:.0} µs", l.p50_ns as f64 / 1e3, l.p99_ns as f64 / 1e3)
                }),
                (Some(rep), Some(WKind::Idle)) => rep.idle.map_or("-".into(), |i| {
                    let rss = i.rss_per_conn().map_or(String::new(), |v| format!("rss {v:.0} "));
                    format!("{rss}kern {:.0} B/conn", i.kern_per_conn().unwrap_or(0.0))
                }),
                (Some(rep), Some(WKind::Paced)) => format!(
                    "{:.0} MB/s, per conn {}",
                    rep.bytes as f64 / rep.secs.max(1e-9) / 1e6,
                    rep.paced.map_or("-".into(), |p| format!("{:.1}-{:.1} Mbit/s", p.min_bps / 1e6, p.max_bps / 1e6))
                ),
                (Some(rep), Some(WKind::Rr)) => {
                    format!("{:.0} req/s", rep.requests as f64 / rep.secs.max(1e-9))
                }
                (Some(rep), Some(WKind::Churn)) => {
                    format!("{:.0} conn/s", rep.conns as f64 / rep.secs.max(1e-9))
                }
                (Some(_), None) => "?".to_string(),
            };
            format!("{} {fig}", r.workload)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A number with about three significant digits.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn find<'a>(res: &'a Results, subject: &str, workload: &str, metric: &str) -> Option<&'a Summary> {
    res.summary.iter().find(|s| s.subject == subject && s.workload == workload && s.metric == metric)
}

fn spread(s: Option<&Summary>) -> String {
    match s {
        Some(Summary { median: Some(m), min: Some(lo), max: Some(hi), .. }) => {
            format!("{} ({}–{})", num(*m), num(*lo), num(*hi))
        }
        Some(s) if s.runs_ok == 0 && s.runs_failed > 0 => "FAILED".into(),
        _ => "-".into(),
    }
}

fn ratio(v: Option<f64>) -> String {
    v.map_or("-".into(), |r| format!("{r:.2}"))
}

fn render(headers: &[String], rows: &[Vec<String>]) -> String {
    let n = headers.len();
    let mut w = vec![0usize; n];
    for row in std::iter::once(headers).chain(rows.iter().map(|r| r.as_slice())) {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(headers).chain(rows.iter().map(|r| r.as_slice())) {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i == 0 {
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The terminal table (also written next to the JSON).
pub fn table(res: &Results) -> String {
    let mut t = String::new();
    let m = &res.meta;
    let _ = writeln!(
        t,
        "ntlm-splice benchmark, {} UTC, {}; kernel {}, {} x {}, {:.1} GiB RAM; {} mode, {} round(s), {:.0} s",
        m.started.trim_end_matches('Z').replace('T', " "),
        if m.git.is_empty() { "no git" } else { &m.git },
        m.kernel,
        m.cpus,
        m.cpu,
        m.mem_total as f64 / (1u64 << 30) as f64,
        res.plan.mode,
        res.rounds_run,
        m.duration_secs
    );
    let _ = writeln!(
        t,
        "Each cell: median of the rounds (min–max). ×peer: this median ÷ the best peer's (best nginx/HAProxy variant for that"
    );
    let _ = writeln!(
        t,
        "figure); ×direct: ÷ direct's; both from this run, so above 1 is better for rates, below 1 for costs. Host CPU:"
    );
    let _ = writeln!(
        t,
        "/proc/stat user+nice+system+irq+softirq over the run (client and backend included; steal excluded and shown apart)."
    );
    let _ = writeln!(
        t,
        "Proxy CPU: the proxy's own processes (utime+stime). Interleaved: each round runs every subject in turn, reversed"
    );
    let _ = writeln!(t, "on odd rounds. ok: successful runs / runs.");
    if res.plan.edge {
        let _ = writeln!(
            t,
            "Edge: client, proxy and backend in three network namespaces over veth; ×routed: ÷ the routed floor (no proxy,"
        );
        let _ = writeln!(
            t,
            "the proxy's namespace only forwards). Paced: per conn = each connection's own rate (bytes ÷ its own time)."
        );
        let _ = writeln!(
            t,
            "Stack CPU: client + backend + proxy processes + every kernel thread (softirq, work queues), in host CPU's unit:"
        );
        let _ = writeln!(t, "what the run itself cost, without other work on the host (which host CPU includes).");
    }
    for s in &res.subjects {
        let _ = match &s.skipped {
            Some(why) => writeln!(t, "  {:<20} SKIPPED: {}", s.name, one_line(why, 300)),
            None => writeln!(t, "  {:<20} {}", s.name, s.config),
        };
    }
    if let Some(v) = &m.nginx {
        let _ = writeln!(t, "  {v}; {}", m.haproxy.as_deref().unwrap_or(""));
    }
    for n in &res.notes {
        let _ = writeln!(t, "  note: {n}");
    }
    let live: Vec<&SubjectInfo> = res.subjects.iter().filter(|s| s.skipped.is_none()).collect();
    for w in &res.plan.workloads {
        let _ = writeln!(t, "\n{} [{}]", w.title, w.label);
        let ok = |s: &str| {
            let runs: Vec<&RunRecord> = res.runs.iter().filter(|r| r.subject == s && r.workload == w.label).collect();
            format!("{}/{}", runs.iter().filter(|r| r.ok).count(), runs.len())
        };
        let g = |s: &str, metric: &str| find(res, s, &w.label, metric);
        let (headers, rows): (Vec<&str>, Vec<Vec<String>>) = match w.kind {
            WKind::Bulk | WKind::Rate => {
                // Bulk and rate tables differ only in their main metric and units.
                let (metric, main, cpu) = if w.kind == WKind::Bulk {
                    ("throughput", "MB/s", ["host CPU s/GB", "proxy CPU s/GB"])
                } else {
                    ("rate", "conn/s", ["host CPU µs/conn", "proxy CPU µs/conn"])
                };
                (
                    vec![
                        "subject", "ok", main, "×peer", "×direct", cpu[0], "×peer", "×direct", cpu[1], "×peer",
                        "steal %",
                    ],
                    live.iter()
                        .map(|s| {
                            let (m, hc, pc) = (g(&s.name, metric), g(&s.name, "host_cpu"), g(&s.name, "proxy_cpu"));
                            vec![
                                s.name.clone(),
                                ok(&s.name),
                                spread(m),
                                ratio(m.and_then(|x| x.vs_best_peer)),
                                ratio(m.and_then(|x| x.vs_direct)),
                                spread(hc),
                                ratio(hc.and_then(|x| x.vs_best_peer)),
                                ratio(hc.and_then(|x| x.vs_direct)),
                                spread(pc),
                                ratio(pc.and_then(|x| x.vs_best_peer)),
                                g(&s.name, "steal").and_then(|x| x.median).map_or("-".into(), |v| format!("{v:.0}")),
                            ]
                        })
                        .collect(),
                )
            }
            WKind::Paced | WKind::Rr | WKind::Churn => edge_rows(w.kind, &live, &g, &ok),
            WKind::Lat => (
                vec!["subject", "ok", "p50 µs", "×peer", "×direct", "p99 µs", "×peer", "×direct", "steal %"],
                live.iter()
                    .map(|s| {
                        let (a, b) = (g(&s.name, "p50"), g(&s.name, "p99"));
                        vec![
                            s.name.clone(),
                            ok(&s.name),
                            spread(a),
                            ratio(a.and_then(|x| x.vs_best_peer)),
                            ratio(a.and_then(|x| x.vs_direct)),
                            spread(b),
                            ratio(b.and_then(|x| x.vs_best_peer)),
                            ratio(b.and_then(|x| x.vs_direct)),
                            g(&s.name, "steal").and_then(|x| x.median).map_or("-".into(), |v| format!("{v:.0}")),
                        ]
                    })
                    .collect(),
            ),
            WKind::Idle => {
                let direct = |metric: &str| {
                    live.iter().find(|s| s.kind == Kind::Direct).and_then(|s| g(&s.name, metric)).and_then(|x| x.median)
                };
                let over = |s: &SubjectInfo, x: Option<&Summary>, d: Option<f64>| match (x.and_then(|x| x.median), d) {
                    (Some(v), Some(d)) if s.kind != Kind::Direct => format!("{:.0}", v - d),
                    _ => "-".into(),
                };
                let (dk, ds) = (direct("kernel"), direct("socket_slabs"));
                (
                    vec![
                        "subject",
                        "ok",
                        "proxy RSS B/conn",
                        "×peer",
                        "kernel B/conn (meminfo)",
                        "×direct",
                        "over direct",
                        "socket slabs B/conn",
                        "×direct",
                        "over direct",
                    ],
                    live.iter()
                        .map(|s| {
                            let (r, k, sl) =
                                (g(&s.name, "proxy_rss"), g(&s.name, "kernel"), g(&s.name, "socket_slabs"));
                            vec![
                                s.name.clone(),
                                ok(&s.name),
                                spread(r),
                                ratio(r.and_then(|x| x.vs_best_peer)),
                                spread(k),
                                ratio(k.and_then(|x| x.vs_direct)),
                                over(s, k, dk),
                                spread(sl),
                                ratio(sl.and_then(|x| x.vs_direct)),
                                over(s, sl, ds),
                            ]
                        })
                        .collect(),
                )
            }
        };
        let floor = if res.plan.edge { "×routed" } else { "×direct" };
        let headers: Vec<String> =
            headers.iter().map(|h| if *h == "×direct" { floor.to_string() } else { h.to_string() }).collect();
        t.push_str(&render(&headers, &rows));
    }
    let failed: Vec<&RunRecord> = res.runs.iter().filter(|r| !r.ok).collect();
    if !failed.is_empty() {
        let _ = writeln!(t, "\nFAILED runs ({}):", failed.len());
        for r in failed.iter().take(20) {
            let _ = writeln!(
                t,
                "  {} {} round {}: {}",
                r.subject,
                r.workload,
                r.round + 1,
                one_line(r.error.as_deref().unwrap_or("?"), 300)
            );
        }
    }
    t
}

/// The edge workloads' table: the main figure, how pacing held or the latency, then host and
/// proxy CPU per unit of work.
fn edge_rows<'a>(
    kind: WKind,
    live: &[&SubjectInfo],
    g: &dyn Fn(&str, &str) -> Option<&'a Summary>,
    ok: &dyn Fn(&str) -> String,
) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let (main, extra, cpu): (&str, [(&str, &str); 2], [&str; 2]) = match kind {
        WKind::Paced => (
            "MB/s",
            [("per conn Mbit/s", "pace"), ("slowest conn Mbit/s", "pace_min")],
            ["host CPU s/GB", "proxy CPU s/GB"],
        ),
        WKind::Rr => {
            ("req/s", [("p50 µs", "p50"), ("p99 µs", "p99")], ["host CPU ms/1000 req", "proxy CPU ms/1000 req"])
        }
        _ => ("conn/s", [("", ""), ("", "")], ["host CPU ms/1000 conn", "proxy CPU ms/1000 conn"]),
    };
    let mut headers = vec!["subject", "ok", main, "×peer", "×direct"];
    headers.extend(extra.iter().filter(|(h, _)| !h.is_empty()).map(|(h, _)| *h));
    headers.extend([cpu[0], "×peer", "×direct", cpu[1], "×peer", "stack CPU", "×peer", "×direct", "steal %"]);
    let metric = "rate";
    let rows = live
        .iter()
        .map(|s| {
            let m = g(&s.name, if kind == WKind::Paced { "throughput" } else { metric });
            let (hc, pc, sc) = (g(&s.name, "host_cpu"), g(&s.name, "proxy_cpu"), g(&s.name, "stack_cpu"));
            let mut row = vec![
                s.name.clone(),
                ok(&s.name),
                spread(m),
                ratio(m.and_then(|x| x.vs_best_peer)),
                ratio(m.and_then(|x| x.vs_direct)),
            ];
            row.extend(extra.iter().filter(|(h, _)| !h.is_empty()).map(|(_, k)| spread(g(&s.name, k))));
            row.extend([
                spread(hc),
                ratio(hc.and_then(|x| x.vs_best_peer)),
                ratio(hc.and_then(|x| x.vs_direct)),
                spread(pc),
                ratio(pc.and_then(|x| x.vs_best_peer)),
                spread(sc),
                ratio(sc.and_then(|x| x.vs_best_peer)),
                ratio(sc.and_then(|x| x.vs_direct)),
                g(&s.name, "steal").and_then(|x| x.median).map_or("-".into(), |v| format!("{v:.0}")),
            ]);
            row
        })
        .collect();
    (headers, rows)
}

/// Whether pacing held in the paced runs: each connection's rate against the target.
pub fn pacing_notes(plan: &Plan, runs: &[RunRecord]) -> Vec<String> {
    let Some(w) = plan.workloads.iter().find(|w| w.kind == WKind::Paced) else { return Vec::new() };
    let paced: Vec<_> =
        runs.iter().filter(|r| r.ok && r.workload == w.label).filter_map(|r| r.report.as_ref()?.paced).collect();
    let Some(target) = paced.first().map(|p| p.target_bps as f64) else { return Vec::new() };
    let lo = paced.iter().map(|p| p.min_bps).fold(f64::INFINITY, f64::min);
    let hi = paced.iter().map(|p| p.max_bps).fold(0.0, f64::max);
    let mut v = vec![format!(
        "pacing: each connection's own rate ran {:.1}-{:.1} Mbit/s over every paced run, against {:.0} Mbit/s set (SO_MAX_PACING_RATE)",
        lo / 1e6,
        hi / 1e6,
        target / 1e6
    )];
    if hi > PACE_HELD_ABOVE * target {
        v.push(format!("WARNING pacing did not hold: a connection ran at {:.1}× its rate", hi / target));
    }
    if lo < PACE_HELD_BELOW * target {
        v.push(format!(
            "WARNING a paced connection fell below {:.0}% of its rate ({:.1} Mbit/s): the path, not the pacing, set its speed",
            PACE_HELD_BELOW * 100.0,
            lo / 1e6
        ));
    }
    v
}

/// A paced connection faster than this times its rate means pacing did not hold (the first
/// round trips go out before pacing has a rate estimate, hence not 1.0).
const PACE_HELD_ABOVE: f64 = 1.25;
/// A paced connection slower than this times its rate was held back by the path.
const PACE_HELD_BELOW: f64 = 0.9;

/// Where the files went.
pub struct Paths {
    /// Every raw run.
    pub json: PathBuf,
    /// The chart.
    pub svg: PathBuf,
    /// The table.
    pub txt: PathBuf,
}

/// Writes `<stamp>.json`, `<stamp>.svg` and `<stamp>.txt` into `dir`.
pub fn write(dir: &Path, res: &Results, table: &str) -> anyhow::Result<Paths> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let base = dir.join(if res.plan.edge { format!("edge-{}", res.meta.stamp) } else { res.meta.stamp.clone() });
    let p =
        Paths { json: base.with_extension("json"), svg: base.with_extension("svg"), txt: base.with_extension("txt") };
    fs::write(&p.json, serde_json::to_string_pretty(res)?)
        .with_context(|| format!("cannot write {}", p.json.display()))?;
    let svg = if res.plan.edge { super::chart::edge_svg(res) } else { super::chart::svg(res) };
    fs::write(&p.svg, svg).with_context(|| format!("cannot write {}", p.svg.display()))?;
    fs::write(&p.txt, table).with_context(|| format!("cannot write {}", p.txt.display()))?;
    Ok(p)
}

/// Reads the files back (smoke mode): the JSON parses and holds every run, the SVG is whole.
pub fn check_written(p: &Paths, res: &Results) -> anyhow::Result<()> {
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&p.json)?).context("the JSON written does not parse")?;
    let runs = v.get("runs").and_then(|r| r.as_array()).map_or(0, |a| a.len());
    if runs != res.runs.len() {
        bail!("the JSON holds {runs} runs, expected {}", res.runs.len());
    }
    let svg = fs::read_to_string(&p.svg)?;
    if !svg.starts_with("<?xml") || !svg.trim_end().ends_with("</svg>") {
        bail!("the SVG written is incomplete");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats() {
        assert_eq!(utc(0, true), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_709_251_199, true), "2024-02-29T23:59:59Z");
        assert_eq!(utc(1_709_251_199, false), "20240229-235959");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    fn cpu(busy_ticks: u64, proxy_ticks: u64) -> Option<ntlm_bench::report::CpuDelta> {
        Some(ntlm_bench::report::CpuDelta {
            hz: 100,
            host: ntlm_bench::report::HostCpu {
                user: busy_ticks / 2,
                system: busy_ticks / 2,
                steal: 1000,
                ..Default::default()
            },
            proxy_ticks: Some(proxy_ticks),
            ..Default::default()
        })
    }

    fn value(kind: WKind, key: &str, r: &Report) -> Option<f64> {
        (metrics(kind).into_iter().find(|m| m.key == key).expect("metric").get)(r)
    }

    #[test]
    fn edge_costs_are_per_gb_per_1000_requests_and_per_1000_connections() {
        // 0.5 host CPU-seconds (steal not counted), 0.1 in the proxy.
        let paced = Report { bytes: 2_000_000_000, secs: 8.0, cpu: cpu(50, 10), ..Default::default() };
        assert_eq!(value(WKind::Paced, "host_cpu", &paced), Some(0.25));
        assert_eq!(value(WKind::Paced, "proxy_cpu", &paced), Some(0.05));
        assert_eq!(value(WKind::Paced, "throughput", &paced), Some(250.0));
        let rr = Report { requests: 100_000, conns: 64, secs: 2.0, cpu: cpu(50, 10), ..Default::default() };
        assert_eq!(value(WKind::Rr, "host_cpu", &rr), Some(5.0));
        assert_eq!(value(WKind::Rr, "proxy_cpu", &rr), Some(1.0));
        assert_eq!(value(WKind::Rr, "rate", &rr), Some(50_000.0));
        let churn = Report { conns: 10_000, secs: 2.0, cpu: cpu(50, 10), ..Default::default() };
        assert_eq!(value(WKind::Churn, "host_cpu", &churn), Some(50.0));
        assert_eq!(value(WKind::Churn, "proxy_cpu", &churn), Some(10.0));
        assert_eq!(value(WKind::Churn, "rate", &churn), Some(5000.0));
        // Stack: client 0.2 + backend 0.1 + kernel threads 0.1 + proxy 0.1 CPU-seconds.
        let mut c = cpu(50, 10).unwrap();
        (c.client_ticks, c.backend_ticks, c.kthread_ticks) = (Some(20), Some(10), Some(10));
        let rr = Report { requests: 100_000, cpu: Some(c), ..Default::default() };
        assert_eq!(value(WKind::Rr, "stack_cpu", &rr), Some(5.0));
        // Without a proxy (routed) the rest still counts; without the backend's PID nothing does.
        c.proxy_ticks = None;
        let churn = Report { conns: 10_000, cpu: Some(c), ..Default::default() };
        assert_eq!(value(WKind::Churn, "stack_cpu", &churn), Some(40.0));
        c.backend_ticks = None;
        let churn = Report { conns: 10_000, cpu: Some(c), ..Default::default() };
        assert_eq!(value(WKind::Churn, "stack_cpu", &churn), None);
    }

    fn paced_run(min_mbit: f64, max_mbit: f64) -> RunRecord {
        RunRecord {
            round: 0,
            subject: "ntlm-splice".into(),
            workload: "paced".into(),
            ok: true,
            error: None,
            wall_secs: 1.0,
            report: Some(Report {
                paced: Some(ntlm_bench::report::Paced {
                    target_bps: 40_000_000,
                    conns: 64,
                    min_bps: min_mbit * 1e6,
                    median_bps: (min_mbit + max_mbit) / 2.0 * 1e6,
                    max_bps: max_mbit * 1e6,
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn pacing_notes_warn_when_pacing_did_not_hold() {
        let a = super::super::BenchArgs {
            edge: true,
            quick: true,
            smoke: false,
            rounds: None,
            only: Vec::new(),
            workloads: Vec::new(),
            bulk_mib: None,
            verify: false,
            no_install: true,
            out: None,
            baseline: None,
            baseline_engine: "splice".into(),
        };
        let plan = super::super::edge::plan(&a, 1 << 16).unwrap();
        let held = pacing_notes(&plan, &[paced_run(39.8, 41.0), paced_run(40.0, 42.0)]);
        assert_eq!(held.len(), 1, "{held:?}");
        assert!(held[0].contains("39.8-42.0 Mbit/s") && held[0].contains("against 40 Mbit/s"), "{held:?}");
        let fast = pacing_notes(&plan, &[paced_run(39.8, 41.0), paced_run(40.0, 60.0)]);
        assert!(fast.iter().any(|n| n.starts_with("WARNING pacing did not hold")), "{fast:?}");
        let slow = pacing_notes(&plan, &[paced_run(20.0, 41.0)]);
        assert!(slow.iter().any(|n| n.contains("fell below 90%")), "{slow:?}");
        assert!(pacing_notes(&plan, &[]).is_empty());
    }
}
