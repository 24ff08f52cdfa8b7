//! `cargo xtask bench`: ntlm-splice's engines against a direct connection (the ceiling),
//! nginx `stream` and HAProxy `mode tcp`, on loopback, interleaved round by round
//! (A B C ... then ... C B A), every figure the median of the rounds with its spread.
//!
//! Processes: one backend (`ntlm-bench serve`), one proxy at a time, and one client process
//! per measured run (`ntlm-bench run`), which samples /proc/stat and the proxy's
//! /proc/PID/stat itself at the edges of its measured interval and prints a JSON report.
//! Every child is stopped by PID on every exit path (see [`procs`]).
//!
//! `--edge` runs the edge workload instead (see [`edge`]): client, proxy and backend in
//! three network namespaces over veth, paced streams, kept-alive request/response, churn.

mod chart;
mod edge;
mod procs;
mod report;
mod subjects;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use ntlm_bench::{procfs, report::Report};
use serde::Serialize;

use procs::Proc;
use subjects::{Env, Kind, Subject};

/// Benchmark options.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct BenchArgs {
    /// The edge workload instead of the loopback one (root): client, proxy and backend in
    /// three network namespaces joined by veth; subjects routed (the floor), both engines,
    /// nginx, HAProxy splicing (64 KiB and 1 MiB pipes); workloads paced, rr, churn.
    #[arg(long)]
    pub edge: bool,
    /// A short run (under 3 minutes): 3 rounds, 256 MiB transfers, 0.5 s timed runs, the
    /// idle runs once.
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// A check of the harness itself, in seconds: one tiny verified run of every workload
    /// against direct and ntlm-splice's splice engine. Fails (exit status non-zero) if any
    /// workload did not run or moved the wrong bytes; timings mean nothing here.
    #[arg(long)]
    pub smoke: bool,
    /// Number of rounds (default 5, --quick 3, --smoke 1).
    #[arg(long, value_name = "N")]
    pub rounds: Option<u32>,
    /// Only these subjects, comma separated: direct, ntlm-sockmap, ntlm-splice,
    /// ntlm-splice-1t, nginx-1w, nginx-auto, haproxy-1t, haproxy-auto, haproxy-splice-1t,
    /// haproxy-splice-auto, haproxy-splice-auto-pipe1m (--edge: routed, ntlm-splice,
    /// ntlm-sockmap, nginx-auto, haproxy-splice-auto, haproxy-splice-auto-pipe1m).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub only: Vec<String>,
    /// Only these workloads, comma separated: up, down, par8, lat, idle-1k, idle-10k, rate
    /// (--edge: paced, rr, churn).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub workloads: Vec<String>,
    /// Bytes per bulk run, in MiB (default 1024, --quick 256, --smoke 4).
    #[arg(long, value_name = "MIB")]
    pub bulk_mib: Option<u64>,
    /// Compare every payload byte with the expected pattern (costs client CPU, which the
    /// host CPU figures include). Byte counts are always checked.
    #[arg(long)]
    pub verify: bool,
    /// Skip nginx/HAProxy when missing instead of installing them with apt-get.
    #[arg(long)]
    pub no_install: bool,
    /// Directory for the JSON, chart and table (default: bench-results/ in the workspace;
    /// --smoke: target/bench-smoke/).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also run an engine (`--baseline-engine`) from this other ntlm-splice binary, as
    /// subject `ntlm-<engine>-baseline`, interleaved with the rest: a before/after comparison
    /// of two builds within one run (copy the "before" binary out of target/release first).
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
    /// The engine the `--baseline` binary runs.
    #[arg(long, value_name = "ENGINE", default_value = "splice", value_parser = ["splice", "sockmap"])]
    pub baseline_engine: String,
}

/// Largest number of idle connections measured ("10k"), before the open-files limit.
const IDLE_HIGH: u64 = 10_000;
/// Wait after an idle run so its closing connections do not overlap the next workload.
const AFTER_IDLE: Duration = Duration::from_millis(300);
/// Time the backend gets to report its address.
const BACKEND_START: Duration = Duration::from_secs(10);
/// Extra time a client process gets beyond its own deadline before it is killed.
const CLIENT_GRACE: f64 = 15.0;

/// How a workload's numbers are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WKind {
    /// Bytes moved: throughput and CPU per GB.
    Bulk,
    /// Connections per second.
    Rate,
    /// Round-trip percentiles.
    Lat,
    /// Memory per idle connection.
    Idle,
    /// Paced streams (edge): throughput, each connection's achieved rate, CPU per GB.
    Paced,
    /// Kept-alive request/response (edge): requests per second, CPU per 1000 requests.
    Rr,
    /// Connection churn (edge): connections per second, CPU per 1000 connections.
    Churn,
}

/// One workload of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    /// Short name (`up`, `idle-10k` ...).
    pub label: String,
    /// What it measures, for the table.
    pub title: String,
    /// How to read it.
    pub kind: WKind,
    /// Arguments of `ntlm-bench run`.
    pub args: Vec<String>,
    /// Run in rounds `0..rounds` only (the 10k idle run is slow and steady).
    pub rounds: u32,
    /// The client's own deadline, seconds.
    pub deadline_secs: f64,
}

/// What a run will do.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// default, quick or smoke.
    pub mode: &'static str,
    /// The edge workload (`--edge`), not the loopback one.
    pub edge: bool,
    /// Rounds.
    pub rounds: u32,
    /// Workloads, in the order they run within a subject's turn.
    pub workloads: Vec<Workload>,
    /// Payload checked byte by byte.
    pub verify: bool,
    /// Stop starting rounds once this much time has passed (keeps the run bounded).
    pub budget_secs: u64,
    /// Open-files limit in force (hard limit).
    pub nofile: u64,
}

impl Plan {
    fn new(a: &BenchArgs, nofile: u64) -> anyhow::Result<Plan> {
        if a.edge {
            return edge::plan(a, nofile);
        }
        let (mode, rounds, bulk_mib, secs, idle_small, budget) = if a.smoke {
            ("smoke", 1, 4, 0.2, 100, 25)
        } else if a.quick {
            ("quick", 3, 256, 0.5, 1000, 155)
        } else {
            ("default", 5, 1024, 1.5, 1000, 13 * 60)
        };
        let rounds = a.rounds.unwrap_or(rounds).clamp(1, 50);
        let bulk = a.bulk_mib.unwrap_or(bulk_mib).clamp(1, 64 << 10) << 20;
        let verify = a.verify || a.smoke;
        let high = IDLE_HIGH.min(nofile.saturating_sub(subjects::FD_HEADROOM) / 2);
        // Generous (50 MB/s is 20 times slower than any subject here) but bounded.
        let bulk_deadline = (20.0 + bulk as f64 / 50e6).min(600.0);
        let v = |args: &[&str]| {
            let mut x: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            if verify {
                x.push("--verify".into());
            }
            x
        };
        let b = bulk.to_string();
        let s = format!("{secs}");
        let mut w = vec![
            Workload {
                label: "up".into(),
                title: format!("bulk upload, 1 connection, {} MiB per run", bulk >> 20),
                kind: WKind::Bulk,
                args: v(&["up", "--bytes", &b]),
                rounds,
                deadline_secs: bulk_deadline,
            },
            Workload {
                label: "down".into(),
                title: format!("bulk download, 1 connection, {} MiB per run", bulk >> 20),
                kind: WKind::Bulk,
                args: v(&["down", "--bytes", &b]),
                rounds,
                deadline_secs: bulk_deadline,
            },
            Workload {
                label: "par8".into(),
                title: format!("bulk over 8 parallel connections (4 up, 4 down), {} MiB in all per run", bulk >> 20),
                kind: WKind::Bulk,
                args: v(&["par", "--bytes", &b, "--conns", "8"]),
                rounds,
                deadline_secs: bulk_deadline,
            },
            Workload {
                label: "lat".into(),
                title: format!("round trip of 64-byte request/response on one kept-alive connection, {secs} s per run"),
                kind: WKind::Lat,
                args: v(&["lat", "--secs", &s, "--size", "64"]),
                rounds,
                deadline_secs: secs + 30.0,
            },
            Workload {
                label: idle_label(idle_small),
                title: format!(
                    "memory per idle connection, {idle_small} connections (each did one 1-byte round trip; {})",
                    idle_read()
                ),
                kind: WKind::Idle,
                args: v(&["idle", "--conns", &idle_small.to_string()]),
                // Steady (spreads of a few bytes per connection): one round in --quick.
                rounds: if a.quick { 1 } else { rounds },
                deadline_secs: 30.0 + idle_small as f64 / 200.0,
            },
        ];
        if !a.smoke && high > idle_small {
            let note = if high < IDLE_HIGH {
                format!(
                    " ({high}, not {IDLE_HIGH}: the open-files limit of {nofile} must hold 2 per connection in the proxy)"
                )
            } else {
                String::new()
            };
            w.push(Workload {
                label: "idle-10k".into(),
                title: format!("memory per idle connection, {high} connections{note} ({})", idle_read()),
                kind: WKind::Idle,
                args: v(&["idle", "--conns", &high.to_string()]),
                // Slow and steady: a few rounds are enough (one in --quick).
                rounds: if a.quick { 1 } else { rounds.min(3) },
                deadline_secs: 30.0 + high as f64 / 200.0,
            });
        }
        w.push(Workload {
            label: "rate".into(),
            title: format!(
                "new connections per second, one 64-byte request/response each, 4 at a time, {secs} s per run"
            ),
            kind: WKind::Rate,
            args: v(&["rate", "--secs", &s, "--threads", "4", "--size", "64"]),
            rounds,
            deadline_secs: secs + 30.0,
        });
        if !a.workloads.is_empty() {
            for name in &a.workloads {
                if !w.iter().any(|x| &x.label == name) {
                    bail!(
                        "--workloads: unknown workload `{name}`; known: {}",
                        w.iter().map(|x| x.label.as_str()).collect::<Vec<_>>().join(", ")
                    );
                }
            }
            w.retain(|x| a.workloads.contains(&x.label));
        }
        w.retain(|x| x.rounds > 0);
        Ok(Plan { mode, edge: false, rounds, workloads: w, verify, budget_secs: budget, nofile })
    }
}

/// When the idle runs read memory (see `Subject::idle_settle_ms`), for the table titles.
fn idle_read() -> String {
    let s = |ms: u64| ms as f64 / 1000.0;
    format!(
        "read {} s after the last one opened, {} s for ntlm-splice, which parks idle connections after 2 s",
        s(subjects::IDLE_SETTLE_MS),
        s(subjects::IDLE_SETTLE_PARKED_MS)
    )
}

fn idle_label(n: u64) -> String {
    if n.is_multiple_of(1000) { format!("idle-{}k", n / 1000) } else { format!("idle-{n}") }
}

/// One client run, as recorded in the JSON.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    /// Round number, from 0.
    pub round: u32,
    /// Subject name.
    pub subject: String,
    /// Workload label.
    pub workload: String,
    /// Ran and moved exactly the expected bytes.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Seconds from starting the client to its exit.
    pub wall_secs: f64,
    /// The client's report.
    pub report: Option<Report>,
}

/// HAProxy's splice counter after one turn of a HAProxy subject.
#[derive(Clone, Debug, Serialize)]
pub struct SpliceCheck {
    /// Round.
    pub round: u32,
    /// Subject.
    pub subject: String,
    /// `option splice-*` was set.
    pub splice_configured: bool,
    /// HAProxy's TotalSplicdedBytesOut after the turn.
    pub spliced_bytes: Option<u64>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// A subject and whether it runs.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectInfo {
    /// Name.
    pub name: String,
    /// Direct, ours or peer.
    pub kind: Kind,
    /// Its configuration.
    pub config: String,
    /// Why it does not run, if not.
    pub skipped: Option<String>,
    #[serde(skip)]
    subject: Option<Subject>,
}

/// Everything a run found: the JSON file's content.
#[derive(Debug, Serialize)]
pub struct Results {
    /// Host, versions, time.
    pub meta: report::Meta,
    /// The plan.
    pub plan: Plan,
    /// Command-line options.
    pub args: BenchArgs,
    /// Every subject, run or skipped.
    pub subjects: Vec<SubjectInfo>,
    /// Every client run.
    pub runs: Vec<RunRecord>,
    /// HAProxy splice counters.
    pub haproxy_splice: Vec<SpliceCheck>,
    /// Medians, spreads and ratios.
    pub summary: Vec<report::Summary>,
    /// Rounds actually run.
    pub rounds_run: u32,
    /// Notes (rounds cut by the time budget, splice checks ...).
    pub notes: Vec<String>,
}

/// Runs the benchmark.
pub fn run(root: &Path, args: BenchArgs) -> anyhow::Result<()> {
    procs::install_signal_handlers();
    let started = SystemTime::now();
    let nofile = procfs::raise_nofile();
    let plan = Plan::new(&args, nofile)?;
    let bench_bin = root.join("target/release/ntlm-bench");
    for b in [&bench_bin, &root.join("target/release/ntlm-splice")] {
        if !b.is_file() {
            bail!("{} is missing: run `cargo build --release` (cargo xtask bench does)", b.display());
        }
    }
    let mut tmp = procs::TempDir::new()?;
    // Declared before the run's processes, so dropped after they are stopped.
    let lab = if args.edge { Some(edge::Lab::new()?) } else { None };
    match run_in(root, &args, &plan, &bench_bin, &tmp.path, lab.as_ref(), started) {
        Ok(true) => Ok(()),
        Ok(false) => {
            // Keep the proxies' and clients' logs of a failed run.
            tmp.keep = true;
            bail!("some benchmark runs failed (see FAILED above and the JSON file)")
        }
        Err(e) => {
            tmp.keep = procs::check_interrupt().is_ok();
            Err(e)
        }
    }
}

/// Returns Ok(true) when every run succeeded.
fn run_in(
    root: &Path,
    args: &BenchArgs,
    plan: &Plan,
    bench_bin: &Path,
    dir: &Path,
    lab: Option<&edge::Lab>,
    started: SystemTime,
) -> anyhow::Result<bool> {
    // The time budget counts from here (the lab, if any, is built by then).
    let t0 = Instant::now();
    let all = if args.edge {
        edge::subjects(args.smoke)
    } else if args.smoke {
        vec![Subject::Direct, Subject::Ntlm { engine: "splice", threads: None }]
    } else {
        Subject::all()
    };
    let known: Vec<String> =
        if args.edge { edge::subjects(false) } else { Subject::all() }.iter().map(Subject::name).collect();
    for o in &args.only {
        if !known.contains(o) {
            bail!("--only: unknown subject `{o}`; known: {}", known.join(", "));
        }
    }
    let mut chosen: Vec<Subject> =
        all.into_iter().filter(|s| args.only.is_empty() || args.only.contains(&s.name())).collect();
    if let Some(bin) = &args.baseline {
        if !bin.is_file() {
            bail!("--baseline {}: no such file; give the path of another ntlm-splice binary", bin.display());
        }
        let at = chosen.iter().position(|s| s.kind() != Kind::Direct).unwrap_or(chosen.len());
        chosen.insert(at, Subject::Baseline { bin: bin.clone(), engine: args.baseline_engine.clone() });
    }
    println!(
        "bench: {} mode, {} round(s), subjects: {}",
        plan.mode,
        plan.rounds,
        chosen.iter().map(Subject::name).collect::<Vec<_>>().join(" ")
    );

    let needs_peers = chosen.iter().any(|s| s.kind() == Kind::Peer);
    let tools = if needs_peers { subjects::find_tools(!args.no_install) } else { subjects::Tools::default() };

    // The backend lives for the whole run.
    let backend_log = dir.join("backend.out");
    let backend_listen = if lab.is_some() { edge::BACKEND } else { Ipv4Addr::LOCALHOST.into() };
    let mut cmd = Command::new(bench_bin);
    if let Some(lab) = lab {
        lab.backend.enter_on_spawn(&mut cmd);
    }
    cmd.args([
        "serve",
        "--listen",
        &SocketAddr::new(backend_listen, 0).to_string(),
        "--max-secs",
        &(plan.budget_secs + 900).to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(fs::File::create(&backend_log)?)
    .stderr(fs::File::create(dir.join("backend.err"))?);
    let mut backend = Proc::spawn("backend", &mut cmd, libc::SIGKILL, libc::SIGTERM, Duration::from_secs(2))?;
    let line = procs::wait_log_line(&mut backend, &backend_log, "listening addr=", BACKEND_START)?;
    let backend_addr: SocketAddr =
        line.trim().trim_start_matches("listening addr=").parse().context("backend address")?;
    let max_conns = plan
        .workloads
        .iter()
        .filter(|w| w.kind == WKind::Idle)
        .filter_map(|w| w.args.iter().skip_while(|a| *a != "--conns").nth(1).and_then(|n| n.parse::<u64>().ok()))
        .max()
        .unwrap_or(1000);
    let env = Env {
        root,
        dir,
        backend: backend_addr,
        backend_pid: Some(backend.pid()),
        max_conns,
        nofile: plan.nofile,
        tools: &tools,
        listen_ip: if lab.is_some() { edge::SPLICER_FRONT } else { Ipv4Addr::LOCALHOST.into() },
        proxy_ns: lab.map(|l| &l.splicer),
        client_ns: lab.map(|l| &l.client),
    };
    let load_before = procfs_loadavg();

    // Which subjects run: each must start and pass a verified probe first.
    let mut infos = Vec::new();
    for s in &chosen {
        let mut skip = match s {
            Subject::Nginx { .. } => tools.nginx_skip.clone(),
            Subject::Haproxy { splice, .. } => tools.haproxy_skip.clone().or_else(|| {
                (*splice && !tools.haproxy_splice).then(|| "this HAProxy was built without LINUX_SPLICE".to_string())
            }),
            Subject::Ntlm { engine: "sockmap", .. } if !crate::is_root() => {
                Some("the sockmap engine needs root (eBPF); run as root to include it".to_string())
            }
            _ => None,
        };
        if skip.is_none()
            && let Err(e) = probe_subject(s, &env, bench_bin)
        {
            procs::check_interrupt()?;
            skip = Some(format!("it did not start or failed a verified 1 MiB probe: {e:#}"));
        }
        if let Some(why) = &skip {
            println!("bench: SKIPPING {}: {}", s.name(), report::one_line(why, 400));
        }
        infos.push(SubjectInfo {
            name: s.name(),
            kind: s.kind(),
            config: s.describe(),
            skipped: skip,
            subject: Some(s.clone()),
        });
    }
    let live: Vec<Subject> = infos.iter().filter(|i| i.skipped.is_none()).filter_map(|i| i.subject.clone()).collect();
    if live.is_empty() {
        bail!("no subject could run");
    }

    let mut runs = Vec::new();
    let mut splices = Vec::new();
    let mut notes = Vec::new();
    let mut rounds_run = 0;
    // What the next round should take: the last round's duration without the runs of
    // workloads that do not come back (the 10k idle run is in round 1 only with --quick,
    // and was most of it).
    let mut next_round_secs = 0.0;
    for r in 0..plan.rounds {
        let elapsed = t0.elapsed().as_secs_f64();
        if r > 0 && elapsed + next_round_secs > plan.budget_secs as f64 {
            let n = format!(
                "stopped after {r} of {} rounds: the time budget of {} s would be exceeded",
                plan.rounds, plan.budget_secs
            );
            println!("bench: {n}");
            notes.push(n);
            break;
        }
        let mut order = live.clone();
        if r % 2 == 1 {
            order.reverse();
        }
        println!(
            "bench: round {}/{}: {}",
            r + 1,
            plan.rounds,
            order.iter().map(Subject::name).collect::<Vec<_>>().join(" ")
        );
        let round_started = Instant::now();
        let runs_before = runs.len();
        for s in &order {
            let turn = Instant::now();
            let (mut rr, sp) = run_turn(s, r, &env, plan, bench_bin)?;
            println!(
                "bench:   {:<20} {} ({:.1} s)",
                s.name(),
                report::headline(plan, &rr),
                turn.elapsed().as_secs_f64()
            );
            for x in rr.iter().filter(|x| !x.ok) {
                println!(
                    "bench:   FAILED {} {} round {}: {}",
                    x.subject,
                    x.workload,
                    r + 1,
                    report::one_line(x.error.as_deref().unwrap_or("?"), 400)
                );
            }
            runs.append(&mut rr);
            splices.extend(sp);
            if let Some(st) = backend.exited() {
                bail!("the backend exited ({st}):\n{}", procs::file_tail(&dir.join("backend.err"), 10));
            }
        }
        rounds_run = r + 1;
        let once: f64 = runs[runs_before..]
            .iter()
            .filter(|x| plan.workloads.iter().any(|w| w.label == x.workload && w.rounds <= r + 1))
            .map(|x| x.wall_secs)
            .sum();
        next_round_secs = (round_started.elapsed().as_secs_f64() - once).max(0.0);
    }
    drop(backend);

    notes.extend(report::splice_notes(&splices));
    if let Some(lab) = lab {
        notes.push(lab.describe());
        notes
            .push(format!("load average (1, 5, 15 min) at the start: {load_before}; at the end: {}", procfs_loadavg()));
        notes.extend(report::pacing_notes(plan, &runs));
    }
    let summary = report::summarize(&infos, plan, &runs);
    let results = Results {
        meta: report::Meta::collect(root, started, &tools),
        plan: plan.clone(),
        args: args.clone(),
        subjects: infos,
        runs,
        haproxy_splice: splices,
        summary,
        rounds_run,
        notes,
    };
    let table = report::table(&results);
    println!("\n{table}");
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| if args.smoke { root.join("target/bench-smoke") } else { root.join("bench-results") });
    let paths = report::write(&out_dir, &results, &table)?;
    if args.smoke {
        report::check_written(&paths, &results)?;
    }
    println!("bench: results {}", paths.json.display());
    println!("bench: chart   {}", paths.svg.display());
    println!("bench: table   {}", paths.txt.display());
    let failed: Vec<&RunRecord> = results.runs.iter().filter(|r| !r.ok).collect();
    let expected = results.rounds_run as usize * live.len() * plan.workloads.len();
    let ran = results.runs.len();
    if args.smoke && ran < expected {
        println!("bench: smoke ran {ran} of {expected} workload runs");
        return Ok(false);
    }
    if args.smoke && live.len() < results.subjects.len() {
        println!("bench: smoke could not run every subject (see SKIPPING above)");
        return Ok(false);
    }
    if !failed.is_empty() {
        println!("bench: {} of {} runs FAILED", failed.len(), ran);
        return Ok(false);
    }
    Ok(true)
}

/// The first three fields of /proc/loadavg.
fn procfs_loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

/// Whether a client error means something stalled rather than failed fast.
fn is_hang(e: &str) -> bool {
    ["deadline passed", "did not finish within", "timed out", "Resource temporarily unavailable"]
        .iter()
        .any(|k| e.contains(k))
}

/// Starts `s`, runs the verified probe, stops it.
fn probe_subject(s: &Subject, env: &Env, bench_bin: &Path) -> anyhow::Result<()> {
    let running = subjects::start(s, env, &format!("{}-probe", s.name()))?;
    let rec = client(
        bench_bin,
        env,
        &format!("{}-probe", s.name()),
        &["probe".to_string()],
        60.0,
        &running.addr,
        &running.pids,
    )?;
    if let Some(e) = rec.1 {
        let log = running.log.as_deref().map(|l| procs::file_tail(l, 6)).unwrap_or_default();
        bail!("{e}{}{log}", if log.is_empty() { "" } else { "\n" });
    }
    drop(running);
    Ok(())
}

/// Runs one client; returns its report (if it printed one) and an error, if any.
/// It runs in the namespace clients connect from, and writes its output into `env.dir`.
fn client(
    bench_bin: &Path,
    env: &Env,
    name: &str,
    args: &[String],
    deadline: f64,
    target: &SocketAddr,
    pids: &[u32],
) -> anyhow::Result<(Option<Report>, Option<String>, f64)> {
    let mut cmd = Command::new(bench_bin);
    if let Some(ns) = env.client_ns {
        ns.enter_on_spawn(&mut cmd);
    }
    cmd.arg("run").args(args).args(["--target", &target.to_string(), "--deadline-secs", &format!("{deadline}")]);
    if let Some(p) = env.backend_pid {
        cmd.args(["--backend-pid", &p.to_string()]);
    }
    if !pids.is_empty() {
        cmd.arg("--pids").arg(pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","));
    }
    let t = Instant::now();
    let out = match procs::run_to_end(name, &mut cmd, env.dir, Duration::from_secs_f64(deadline + CLIENT_GRACE)) {
        Ok(o) => o,
        Err(e) => {
            procs::check_interrupt()?;
            return Ok((None, Some(format!("{e:#}")), t.elapsed().as_secs_f64()));
        }
    };
    procs::check_interrupt()?;
    let wall = t.elapsed().as_secs_f64();
    let report: Option<Report> = out.stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok());
    let err = match &report {
        Some(r) if r.ok => None,
        Some(r) => Some(r.error.clone().unwrap_or_else(|| format!("{} connection(s) failed", r.conn_errors))),
        None => Some(format!("the client printed no report ({}): {}", out.status, procs::tail(&out.stderr, 6))),
    };
    Ok((report, err, wall))
}

/// One subject's turn in one round: start it, probe, run every workload, stop it.
fn run_turn(
    s: &Subject,
    round: u32,
    env: &Env,
    plan: &Plan,
    bench_bin: &Path,
) -> anyhow::Result<(Vec<RunRecord>, Option<SpliceCheck>)> {
    let name = s.name();
    let tag = format!("{name}-r{round}");
    let todo: Vec<&Workload> = plan.workloads.iter().filter(|w| round < w.rounds).collect();
    let fail_all = |why: String| -> Vec<RunRecord> {
        todo.iter()
            .map(|w| RunRecord {
                round,
                subject: name.clone(),
                workload: w.label.clone(),
                ok: false,
                error: Some(why.clone()),
                wall_secs: 0.0,
                report: None,
            })
            .collect()
    };
    let mut running = match subjects::start(s, env, &tag) {
        Ok(x) => x,
        Err(e) => {
            procs::check_interrupt()?;
            return Ok((fail_all(format!("could not start: {e:#}")), None));
        }
    };
    // A verified warm-up: the first connections through a fresh proxy are not measured.
    let (_, err, _) =
        client(bench_bin, env, &format!("{tag}-probe"), &["probe".to_string()], 60.0, &running.addr, &running.pids)?;
    if let Some(e) = err {
        return Ok((fail_all(format!("warm-up probe failed: {e}")), None));
    }
    let mut out = Vec::new();
    for w in todo {
        let mut args = w.args.clone();
        if w.kind == WKind::Idle {
            args.extend(["--settle-ms".to_string(), s.idle_settle_ms().to_string()]);
        }
        let (report, mut error, wall) = client(
            bench_bin,
            env,
            &format!("{tag}-{}", w.label),
            &args,
            w.deadline_secs,
            &running.addr,
            &running.pids,
        )?;
        if let Some(p) = running.proc.as_mut()
            && let Some(st) = p.exited()
        {
            let log = running.log.as_deref().map(|l| procs::file_tail(l, 8)).unwrap_or_default();
            error =
                Some(format!("{}; the proxy exited ({st}):\n{log}", error.unwrap_or_else(|| "run finished".into())));
        }
        let dead = running.proc.as_mut().is_some_and(|p| p.exited().is_some());
        // A hang (deadline, socket timeout) would likely repeat in every later workload and
        // eat the time budget: the rest of this turn is recorded as not run.
        let hung = error.as_deref().is_some_and(is_hang);
        out.push(RunRecord {
            round,
            subject: name.clone(),
            workload: w.label.clone(),
            ok: error.is_none(),
            error,
            wall_secs: wall,
            report,
        });
        if w.kind == WKind::Idle {
            procs::sleep(AFTER_IDLE)?;
        }
        if dead || hung {
            let why =
                if dead { "not run: the proxy had exited" } else { "not run: an earlier workload of this turn hung" };
            for rest in plan.workloads.iter().filter(|x| round < x.rounds).skip_while(|x| x.label != w.label).skip(1) {
                out.push(RunRecord {
                    round,
                    subject: name.clone(),
                    workload: rest.label.clone(),
                    ok: false,
                    error: Some(why.into()),
                    wall_secs: 0.0,
                    report: None,
                });
            }
            break;
        }
    }
    let splice = match (s, &running.stats_socket) {
        (Subject::Haproxy { splice, .. }, Some(sock)) => {
            let r = subjects::haproxy_spliced_bytes(sock);
            Some(SpliceCheck {
                round,
                subject: name.clone(),
                splice_configured: *splice,
                spliced_bytes: r.as_ref().ok().copied(),
                error: r.err().map(|e| format!("{e:#}")),
            })
        }
        _ => None,
    };
    drop(running);
    Ok((out, splice))
}
