//! One measured client run. Blocking sockets and plain threads: the client should cost
//! the same CPU whatever sits between it and the backend, and be easy to reason about.
//!
//! Every run checks byte counts exactly (a sink acknowledges what it received; a source's
//! stream must end at exactly `n` bytes); with `--verify` every byte is also compared with
//! the pattern, on whichever side receives it.

use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Barrier, Mutex},
    thread,
    time::{Duration, Instant},
};

use ntlm_bench::{
    procfs,
    proto::{self, ACK_LEN, CHUNK, FLAG_VERIFY, Header, Mode, NO_MISMATCH},
    report::{CpuDelta, HostCpu, Idle, Latency, Paced, Report},
};

/// Time allowed for one TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one read or write may block before the run fails.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Round trips before the latency run starts measuring.
const LAT_WARMUP: u32 = 200;
/// Upper bound on connections one rate thread opens, whatever `--secs` says.
const RATE_MAX_PER_THREAD: u64 = 5_000_000;
/// Pause after a failed connection in the rate run, so errors cannot spin.
const RATE_ERROR_PAUSE: Duration = Duration::from_millis(1);
/// Bytes moved each way by the probe.
const PROBE_BYTES: u64 = 1 << 20;
/// Most connections of a paced or request/response run.
const MAX_CONNS: usize = 1024;
/// Round-trip samples one request/response connection keeps (the count goes on past it).
const RR_MAX_SAMPLES: usize = 200_000;

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Bulk upload over one connection (client to backend sink).
    Up,
    /// Bulk download over one connection (backend source to client).
    Down,
    /// Bulk over `--conns` parallel connections, alternately up and down.
    Par,
    /// New connections per second: one small request and response each, `--threads` at once.
    Rate,
    /// Round-trip latency of small requests on one kept-alive connection.
    Lat,
    /// Open `--conns` connections, one 1-byte round trip each, and measure memory while idle.
    Idle,
    /// A small verified upload, download and a few round trips: is the path working?
    Probe,
    /// `--conns` connections, half uploading, half downloading, each sender held to
    /// `--pace-mbit` by `SO_MAX_PACING_RATE`, each moving what that rate moves in `--secs`.
    Paced,
    /// `--conns` kept-alive connections, each sending `--size`-byte requests and reading
    /// `--size`-byte responses in a loop for `--secs` (like wrk with that many connections).
    Rr,
}

/// Arguments of `ntlm-bench run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Workload.
    #[arg(value_enum)]
    pub workload: Workload,
    /// Address to connect to (the proxy, or the backend for a direct run).
    #[arg(long)]
    pub target: SocketAddr,
    /// Payload bytes for up, down and par (par: in total).
    #[arg(long, default_value_t = 64 << 20)]
    pub bytes: u64,
    /// Connections for par, idle, paced and rr.
    #[arg(long, default_value_t = 8)]
    pub conns: usize,
    /// Pacing rate of each paced sender, Mbit/s.
    #[arg(long, default_value_t = 40)]
    pub pace_mbit: u16,
    /// Concurrent connecting threads for rate.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Duration of rate, lat and rr, seconds; paced: what each connection moves, in
    /// seconds at its pacing rate.
    #[arg(long, default_value_t = 1.0)]
    pub secs: f64,
    /// Most round trips measured by lat.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_iters: u64,
    /// Request and response size of rate, lat and rr, bytes.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// The backend's process ID, whose CPU time counts in the stack's CPU.
    #[arg(long)]
    pub backend_pid: Option<u32>,
    /// Proxy process IDs whose CPU time and memory to measure (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Compare every payload byte with the pattern.
    #[arg(long)]
    pub verify: bool,
    /// Idle: wait this long after the last connection opened before measuring memory.
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,
    /// The whole run fails past this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub deadline_secs: f64,
}

/// Runs the workload; failures are reported in the [`Report`], never panics.
pub fn run(a: &RunArgs) -> Report {
    procfs::raise_nofile();
    let deadline = Instant::now() + Duration::from_secs_f64(a.deadline_secs.max(1.0));
    let pat = proto::pattern_buf();
    let mut r =
        Report { workload: format!("{:?}", a.workload).to_lowercase(), verified: a.verify, ..Report::default() };
    let res = match a.workload {
        Workload::Up | Workload::Down => single(a, &pat, deadline, &mut r),
        Workload::Par => par(a, &pat, deadline, &mut r),
        Workload::Rate => rate(a, &pat, deadline, &mut r),
        Workload::Lat => lat(a, &pat, deadline, &mut r),
        Workload::Idle => idle(a, &pat, deadline, &mut r),
        Workload::Probe => probe(a, &pat, deadline, &mut r),
        Workload::Paced => paced(a, &pat, deadline, &mut r),
        Workload::Rr => rr(a, &pat, deadline, &mut r),
    };
    if let Err(e) = res {
        r.error = Some(e);
    }
    if r.error.is_none() && r.bytes != r.expected_bytes {
        r.error = Some(format!("moved {} bytes, expected {}", r.bytes, r.expected_bytes));
    }
    r.ok = r.error.is_none() && r.conn_errors == 0;
    r
}

/// CPU counters at the start of a measured interval.
struct Sampler {
    host: HostCpu,
    proxy: Option<u64>,
    pids: Vec<u32>,
    client: Option<u64>,
    backend_pid: Option<u32>,
    backend: Option<u64>,
    kthreads: Vec<(u32, u64)>,
}

impl Sampler {
    /// Reads every counter, /proc/stat last, so the scan of the kernel threads falls before
    /// the host's measured interval.
    fn start(a: &RunArgs) -> Result<Sampler, String> {
        let kthreads = procfs::kernel_threads();
        let client = procfs::process_ticks(std::process::id()).ok();
        let backend = a.backend_pid.and_then(|p| procfs::process_ticks(p).ok());
        let proxy = proxy_ticks(&a.pids);
        let host = procfs::host_cpu().map_err(|e| format!("/proc/stat: {e}"))?;
        Ok(Sampler { host, proxy, pids: a.pids.clone(), client, backend_pid: a.backend_pid, backend, kthreads })
    }

    /// The growth of every counter; /proc/stat first, for the same reason.
    fn finish(&self) -> Result<CpuDelta, String> {
        let host = procfs::host_cpu().map_err(|e| format!("/proc/stat: {e}"))?.since(&self.host);
        let since = |before: Option<u64>, after: Option<u64>| Some(after?.saturating_sub(before?));
        let proxy = since(self.proxy, proxy_ticks(&self.pids));
        let client = since(self.client, procfs::process_ticks(std::process::id()).ok());
        let backend = since(self.backend, self.backend_pid.and_then(|p| procfs::process_ticks(p).ok()));
        let kthreads = procfs::kernel_thread_ticks_since(&self.kthreads, &procfs::kernel_threads());
        Ok(CpuDelta {
            hz: procfs::clock_ticks(),
            host,
            proxy_ticks: proxy,
            client_ticks: client,
            backend_ticks: backend,
            kthread_ticks: (!self.kthreads.is_empty()).then_some(kthreads),
        })
    }
}

fn proxy_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| procfs::process_ticks(p).ok()).sum()
}

fn proxy_rss(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| procfs::process_rss(p).ok()).sum()
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    Ok(s)
}

fn io_err(what: &str, e: io::Error) -> String {
    format!("{what}: {e}")
}

fn flags(verify: bool) -> u8 {
    if verify { FLAG_VERIFY } else { 0 }
}

fn check_deadline(deadline: Instant, what: &str) -> Result<(), String> {
    if Instant::now() > deadline { Err(format!("{what}: deadline passed")) } else { Ok(()) }
}

/// Sends `n` pattern bytes to a sink on `s` and checks its acknowledgement.
fn upload(s: &mut TcpStream, n: u64, verify: bool, pat: &[u8], deadline: Instant) -> Result<u64, String> {
    s.write_all(&Header { mode: Mode::Sink, flags: flags(verify), n: 0, pace_mbit: 0 }.encode())
        .map_err(|e| io_err("header", e))?;
    let mut sent = 0u64;
    while sent < n {
        let len = (n - sent).min(CHUNK as u64) as usize;
        s.write_all(proto::pattern_at(pat, sent, len)).map_err(|e| io_err(&format!("upload at byte {sent}"), e))?;
        sent += len as u64;
        check_deadline(deadline, "upload")?;
    }
    s.shutdown(Shutdown::Write).map_err(|e| io_err("shutdown(write)", e))?;
    let mut ack = [0u8; ACK_LEN];
    s.read_exact(&mut ack).map_err(|e| io_err("reading the sink's acknowledgement (did EOF reach the backend?)", e))?;
    let got = u64::from_le_bytes(ack[..8].try_into().expect("8 bytes"));
    let bad = u64::from_le_bytes(ack[8..].try_into().expect("8 bytes"));
    if got != n {
        return Err(format!("the backend received {got} bytes of {n} sent"));
    }
    if bad != NO_MISMATCH {
        return Err(format!("the backend received wrong data at byte {bad}"));
    }
    Ok(got)
}

/// Reads `n` pattern bytes from a source on `s`, up to its EOF; the source paces its sends
/// at `pace_mbit` Mbit/s (0: not paced).
fn download(
    s: &mut TcpStream,
    n: u64,
    pace_mbit: u16,
    verify: bool,
    pat: &[u8],
    deadline: Instant,
) -> Result<u64, String> {
    s.write_all(&Header { mode: Mode::Source, flags: flags(verify), n, pace_mbit }.encode())
        .map_err(|e| io_err("header", e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let r = s.read(&mut buf).map_err(|e| io_err(&format!("download at byte {got}"), e))?;
        if r == 0 {
            break;
        }
        if verify && let Some(at) = proto::first_mismatch(pat, got, &buf[..r]) {
            return Err(format!("received wrong data at byte {at}"));
        }
        got += r as u64;
        check_deadline(deadline, "download")?;
    }
    if got != n {
        return Err(format!("received {got} bytes of {n} before EOF"));
    }
    Ok(got)
}

fn single(a: &RunArgs, pat: &[u8], deadline: Instant, r: &mut Report) -> Result<(), String> {
    r.expected_bytes = a.bytes;
    let mut s = connect(a.target)?;
    let sampler = Sampler::start(a)?;
    let t0 = Instant::now();
    let moved = if a.workload == Workload::Up {
        upload(&mut s, a.bytes, a.verify, pat, deadline)
    } else {
        download(&mut s, a.bytes, 0, a.verify, pat, deadline)
    };
    r.secs = t0.elapsed().as_secs_f64();
    r.cpu = Some(sampler.finish()?);
    r.bytes = moved?;
    r.conns = 1;
    Ok(())
}

fn par(a: &RunArgs, pat: &[u8], deadline: Instant, r: &mut Report) -> Result<(), String> {
    let conns = a.conns.clamp(1, 256);
    r.expected_bytes = a.bytes;
    // Connect first, outside the measured interval.
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(connect(a.target)?);
    }
    let barrier = Arc::new(Barrier::new(conns + 1));
    let pat = Arc::new(pat.to_vec());
    let per = a.bytes / conns as u64;
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let (barrier, pat, verify) = (barrier.clone(), pat.clone(), a.verify);
            let n = if i == 0 { per + a.bytes % conns as u64 } else { per };
            thread::spawn(move || {
                barrier.wait();
                if i % 2 == 0 {
                    upload(&mut s, n, verify, &pat, deadline)
                } else {
                    download(&mut s, n, 0, verify, &pat, deadline)
                }
            })
        })
        .collect();
    let sampler = Sampler::start(a)?;
    let t0 = Instant::now();
    barrier.wait();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(n)) => {
                r.bytes += n;
                r.conns += 1;
            }
            Ok(Err(e)) => {
                r.conn_errors += 1;
                first_err.get_or_insert(e);
            }
            Err(_) => {
                r.conn_errors += 1;
                first_err.get_or_insert_with(|| "a transfer thread panicked".to_string());
            }
        }
    }
    r.secs = t0.elapsed().as_secs_f64();
    r.cpu = Some(sampler.finish()?);
    first_err.map_or(Ok(()), Err)
}

/// One connection: header and request in one write, the whole response, close.
fn one_exchange(addr: SocketAddr, req: &[u8], want: &[u8], resp: &mut [u8]) -> Result<(), String> {
    let mut s = connect(addr)?;
    s.write_all(req).map_err(|e| io_err("request", e))?;
    s.read_exact(resp).map_err(|e| io_err("response", e))?;
    if resp != want {
        return Err("wrong response bytes".to_string());
    }
    Ok(())
}

/// The header of one echo exchange of `size` bytes each way.
fn echo_header(size: u32) -> [u8; proto::HEADER_LEN] {
    Header { mode: Mode::Echo { req: size, resp: size }, flags: 0, n: 0, pace_mbit: 0 }.encode()
}

fn echo_request(size: u32, pat: &[u8], with_header: bool) -> Vec<u8> {
    let mut req = Vec::new();
    if with_header {
        req.extend_from_slice(&echo_header(size));
    }
    req.extend_from_slice(&pat[..size as usize]);
    req
}

fn rate(a: &RunArgs, pat: &[u8], deadline: Instant, r: &mut Report) -> Result<(), String> {
    let size = a.size.clamp(1, CHUNK as u32);
    let req = Arc::new(echo_request(size, pat, true));
    let want = Arc::new(pat[..size as usize].to_vec());
    let threads = a.threads.clamp(1, 64);
    let first_err: Arc<Mutex<Option<String>>> = Arc::default();
    let sampler = Sampler::start(a)?;
    let t0 = Instant::now();
    let stop_at = (t0 + Duration::from_secs_f64(a.secs.max(0.01))).min(deadline);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (req, want, first_err, addr) = (req.clone(), want.clone(), first_err.clone(), a.target);
            thread::spawn(move || {
                let (mut ok, mut bad) = (0u64, 0u64);
                let mut resp = vec![0u8; want.len()];
                while Instant::now() < stop_at && ok + bad < RATE_MAX_PER_THREAD {
                    match one_exchange(addr, &req, &want, &mut resp) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            bad += 1;
                            first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            thread::sleep(RATE_ERROR_PAUSE);
                        }
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    for h in handles {
        let (ok, bad) = h.join().unwrap_or((0, 1));
        r.conns += ok;
        r.conn_errors += bad;
    }
    r.secs = t0.elapsed().as_secs_f64();
    r.cpu = Some(sampler.finish()?);
    // Payload: request and response of every completed connection.
    r.bytes = r.conns * 2 * u64::from(size);
    r.expected_bytes = r.bytes;
    let err = first_err.lock().unwrap_or_else(|p| p.into_inner()).take();
    if r.conns == 0 {
        return Err(err.unwrap_or_else(|| "no connection completed".to_string()));
    }
    match err {
        Some(e) => Err(format!("{} of {} connections failed; first: {e}", r.conn_errors, r.conn_errors + r.conns)),
        None => Ok(()),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn lat(a: &RunArgs, pat: &[u8], deadline: Instant, r: &mut Report) -> Result<(), String> {
    let size = a.size.clamp(1, CHUNK as u32);
    let mut s = connect(a.target)?;
    s.write_all(&echo_header(size)).map_err(|e| io_err("header", e))?;
    let req = echo_request(size, pat, false);
    let want = &pat[..size as usize];
    let mut resp = vec![0u8; size as usize];
    let mut round_trip = |s: &mut TcpStream| -> Result<(), String> {
        s.write_all(&req).map_err(|e| io_err("request", e))?;
        s.read_exact(&mut resp).map_err(|e| io_err("response", e))?;
        if resp != want {
            return Err("wrong response bytes".to_string());
        }
        Ok(())
    };
    for _ in 0..LAT_WARMUP {
        round_trip(&mut s)?;
    }
    let max = a.max_iters.clamp(1, 10_000_000);
    let mut samples: Vec<u64> = Vec::with_capacity(max.min(1 << 20) as usize);
    let sampler = Sampler::start(a)?;
    let t0 = Instant::now();
    let stop_at = (t0 + Duration::from_secs_f64(a.secs.max(0.01))).min(deadline);
    while (samples.len() as u64) < max {
        let t = Instant::now();
        if t >= stop_at {
            break;
        }
        round_trip(&mut s)?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    r.secs = t0.elapsed().as_secs_f64();
    r.cpu = Some(sampler.finish()?);
    r.conns = 1;
    r.bytes = samples.len() as u64 * 2 * u64::from(size);
    r.expected_bytes = r.bytes;
    samples.sort_unstable();
    let n = samples.len() as u64;
    r.latency = Some(Latency {
        samples: n,
        p50_ns: percentile(&samples, 0.50),
        p90_ns: percentile(&samples, 0.90),
        p99_ns: percentile(&samples, 0.99),
        p999_ns: percentile(&samples, 0.999),
        max_ns: samples.last().copied().unwrap_or(0),
        mean_ns: samples.iter().sum::<u64>().checked_div(n).unwrap_or(0),
    });
    if n == 0 { Err("no round trip measured".to_string()) } else { Ok(()) }
}

fn idle(a: &RunArgs, pat: &[u8], deadline: Instant, r: &mut Report) -> Result<(), String> {
    let n = a.conns.clamp(1, 1_000_000);
    let mut req = Header { mode: Mode::Echo { req: 1, resp: 1 }, flags: 0, n: 0, pace_mbit: 0 }.encode().to_vec();
    req.push(pat[0]);
    let kern_before = procfs::kern_mem().map_err(|e| format!("/proc/meminfo: {e}"))?;
    let rss_before = proxy_rss(&a.pids);
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(n);
    let mut one = [0u8; 1];
    for i in 0..n {
        check_deadline(deadline, &format!("idle: opening connection {i} of {n}"))?;
        let mut s = connect(a.target).map_err(|e| format!("connection {i} of {n}: {e}"))?;
        s.write_all(&req).map_err(|e| io_err(&format!("connection {i} of {n}: request"), e))?;
        s.read_exact(&mut one).map_err(|e| io_err(&format!("connection {i} of {n}: response"), e))?;
        if one[0] != pat[0] {
            return Err(format!("connection {i} of {n}: wrong response byte"));
        }
        held.push(s);
    }
    let open_secs = t0.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(a.settle_ms.min(10_000)));
    let kern_after = procfs::kern_mem().map_err(|e| format!("/proc/meminfo: {e}"))?;
    let rss_after = proxy_rss(&a.pids);
    r.secs = open_secs;
    r.conns = held.len() as u64;
    r.bytes = r.conns * 2;
    r.expected_bytes = n as u64 * 2;
    r.idle = Some(Idle {
        conns: r.conns,
        open_secs,
        proxy_rss_before: rss_before,
        proxy_rss_after: rss_after,
        kern_before,
        kern_after,
    });
    drop(held);
    Ok(())
}

fn probe(a: &RunArgs, pat: &[u8], deadline: Instant, r: &mut Report) -> Result<(), String> {
    let t0 = Instant::now();
    r.expected_bytes = 2 * PROBE_BYTES + 2 * 10 * 64;
    r.bytes += upload(&mut connect(a.target)?, PROBE_BYTES, true, pat, deadline)?;
    r.bytes += download(&mut connect(a.target)?, PROBE_BYTES, 0, true, pat, deadline)?;
    let mut s = connect(a.target)?;
    s.write_all(&Header { mode: Mode::Echo { req: 64, resp: 64 }, flags: 0, n: 0, pace_mbit: 0 }.encode())
        .map_err(|e| io_err("header", e))?;
    let mut resp = [0u8; 64];
    for _ in 0..10 {
        s.write_all(&pat[..64]).map_err(|e| io_err("request", e))?;
        s.read_exact(&mut resp).map_err(|e| io_err("response", e))?;
        if resp[..] != pat[..64] {
            return Err("wrong response bytes".to_string());
        }
        r.bytes += 128;
    }
    r.conns = 3;
    r.secs = t0.elapsed().as_secs_f64();
    r.verified = true;
    Ok(())
}

/// Collects the threads of a paced or request/response run: the first error, the counts.
fn join_all<T>(handles: Vec<thread::JoinHandle<Result<T, String>>>, r: &mut Report) -> (Vec<T>, Option<String>) {
    let mut first_err = None;
    let mut done = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => {
                done.push(v);
                r.conns += 1;
            }
            Ok(Err(e)) => {
                r.conn_errors += 1;
                first_err.get_or_insert(e);
            }
            Err(_) => {
                r.conn_errors += 1;
                first_err.get_or_insert_with(|| "a connection thread panicked".to_string());
            }
        }
    }
    (done, first_err)
}

/// Many paced streams each way: even connections upload (the client's socket paced), odd
/// ones download (the backend's socket paced, asked for in the header). Every connection
/// moves `pace × secs` bytes, so the run lasts about `--secs` if pacing holds and the path
/// keeps up; each connection's own rate is reported to show whether it did.
fn paced(a: &RunArgs, pat: &[u8], deadline: Instant, r: &mut Report) -> Result<(), String> {
    let conns = a.conns.clamp(1, MAX_CONNS);
    let mbit = a.pace_mbit.max(1);
    let per = (ntlm_bench::pace::bytes_per_sec(mbit) as f64 * a.secs.max(0.01)) as u64;
    r.expected_bytes = per * conns as u64;
    let mut streams = Vec::with_capacity(conns);
    for i in 0..conns {
        let s = connect(a.target).map_err(|e| format!("connection {i} of {conns}: {e}"))?;
        if i % 2 == 0 {
            use std::os::fd::AsRawFd as _;
            ntlm_bench::pace::set_max_pacing_rate(s.as_raw_fd(), mbit)
                .map_err(|e| io_err("SO_MAX_PACING_RATE on the client's socket", e))?;
        }
        streams.push(s);
    }
    let barrier = Arc::new(Barrier::new(conns + 1));
    let pat = Arc::new(pat.to_vec());
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let (barrier, pat, verify) = (barrier.clone(), pat.clone(), a.verify);
            thread::spawn(move || {
                barrier.wait();
                let t = Instant::now();
                let n = if i % 2 == 0 {
                    upload(&mut s, per, verify, &pat, deadline)?
                } else {
                    download(&mut s, per, mbit, verify, &pat, deadline)?
                };
                Ok((n, t.elapsed().as_secs_f64()))
            })
        })
        .collect();
    let sampler = Sampler::start(a)?;
    let t0 = Instant::now();
    barrier.wait();
    let (done, first_err) = join_all(handles, r);
    r.secs = t0.elapsed().as_secs_f64();
    r.cpu = Some(sampler.finish()?);
    r.bytes = done.iter().map(|(n, _)| n).sum();
    let mut rates: Vec<f64> = done.iter().map(|(n, secs)| *n as f64 * 8.0 / secs.max(1e-9)).collect();
    rates.sort_by(|x, y| x.total_cmp(y));
    if !rates.is_empty() {
        r.paced = Some(Paced {
            target_bps: ntlm_bench::pace::bytes_per_sec(mbit) * 8,
            conns: rates.len() as u64,
            min_bps: rates[0],
            median_bps: rates[rates.len() / 2],
            max_bps: rates[rates.len() - 1],
        });
    }
    first_err.map_or(Ok(()), Err)
}

/// Many kept-alive request/response connections, each in its own thread: `--size` bytes
/// each way per request, as fast as the answers come, for `--secs`.
fn rr(a: &RunArgs, pat: &[u8], deadline: Instant, r: &mut Report) -> Result<(), String> {
    let conns = a.conns.clamp(1, MAX_CONNS);
    let size = a.size.clamp(1, CHUNK as u32);
    let mut streams = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut s = connect(a.target).map_err(|e| format!("connection {i} of {conns}: {e}"))?;
        s.write_all(&echo_header(size)).map_err(|e| io_err("header", e))?;
        streams.push(s);
    }
    let barrier = Arc::new(Barrier::new(conns + 1));
    let req = Arc::new(echo_request(size, pat, false));
    let want = Arc::new(pat[..size as usize].to_vec());
    let secs = a.secs.max(0.01);
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let (barrier, req, want) = (barrier.clone(), req.clone(), want.clone());
            thread::spawn(move || {
                let mut resp = vec![0u8; want.len()];
                let mut samples = Vec::with_capacity(RR_MAX_SAMPLES.min(1 << 14));
                let mut count = 0u64;
                barrier.wait();
                let stop_at = (Instant::now() + Duration::from_secs_f64(secs)).min(deadline);
                loop {
                    let t = Instant::now();
                    if t >= stop_at {
                        break;
                    }
                    s.write_all(&req).map_err(|e| io_err(&format!("request {count}"), e))?;
                    s.read_exact(&mut resp).map_err(|e| io_err(&format!("response {count}"), e))?;
                    if resp != *want {
                        return Err(format!("wrong response bytes in response {count}"));
                    }
                    count += 1;
                    if samples.len() < RR_MAX_SAMPLES {
                        samples.push(t.elapsed().as_nanos() as u64);
                    }
                }
                Ok((count, samples))
            })
        })
        .collect();
    let sampler = Sampler::start(a)?;
    let t0 = Instant::now();
    barrier.wait();
    let (done, first_err) = join_all(handles, r);
    r.secs = t0.elapsed().as_secs_f64();
    r.cpu = Some(sampler.finish()?);
    r.requests = done.iter().map(|(c, _)| c).sum();
    r.bytes = r.requests * 2 * u64::from(size);
    r.expected_bytes = r.bytes;
    let mut samples: Vec<u64> = done.into_iter().flat_map(|(_, s)| s).collect();
    samples.sort_unstable();
    let n = samples.len() as u64;
    r.latency = Some(Latency {
        samples: n,
        p50_ns: percentile(&samples, 0.50),
        p90_ns: percentile(&samples, 0.90),
        p99_ns: percentile(&samples, 0.99),
        p999_ns: percentile(&samples, 0.999),
        max_ns: samples.last().copied().unwrap_or(0),
        mean_ns: samples.iter().sum::<u64>().checked_div(n).unwrap_or(0),
    });
    if let Some(e) = first_err {
        return Err(e);
    }
    if r.requests == 0 {
        return Err("no request was answered".to_string());
    }
    Ok(())
}
