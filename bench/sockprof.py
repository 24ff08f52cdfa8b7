#!/usr/bin/env python3
"""Where the sockmap engine's CPU goes on paced streams (issue 17, item 2).

Builds three network namespaces (client, splicer, backend) joined by veth, runs
`ntlm-bench serve` (sink) in the backend, `ntlm-splice` in the splicer and N upload
streams in the client, each paced by the kernel with SO_MAX_PACING_RATE. The engines
run interleaved (splice, sockmap, splice, sockmap, ...) on the same topology. For each
run it prints one JSON line with, per GB moved: host CPU (user/system/softirq from
/proc/stat, steal shown apart and never counted), the proxy's CPU by thread kind, kworker
CPU, psock work items (tracepoint workqueue_execute_start on sk_psock_backlog, via
`perf stat`), the BPF programs' run time (kernel.bpf_stats_enabled, restored after),
context switches and the engine's own counters (metrics `sockmap_*`).

Run as root from the repository root after
`cargo build --release -p ntlm-userspace -p ntlm-bench`:

    python3 bench/sockprof.py --rounds 3 --secs 15 --streams 64 --mbit 40 > runs.jsonl
    python3 bench/sockprof.py summary runs.jsonl

Only namespaces named `sockprof-*` are made and deleted; only processes it started
are stopped (by PID).
"""

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

NS = {"c": "sockprof-c", "p": "sockprof-p", "b": "sockprof-b"}
CLIENT_IP, PROXY_C_IP = "10.77.1.1", "10.77.1.2"
PROXY_B_IP, BACKEND_IP = "10.77.2.1", "10.77.2.2"
# Fixed ports are fine here: each lives in a namespace this script owns.
PROXY_PORT, BACKEND_PORT, METRICS_PORT = 9000, 9001, 9100
SO_MAX_PACING_RATE = 47
CHUNK = 64 << 10
# ntlm-bench header (bench/src/proto.rs): magic, mode 1 = sink, flags 0, arg 0.
SINK_HEADER = b"NTB1" + bytes([1, 0, 0, 0]) + bytes(8)
TICK = os.sysconf("SC_CLK_TCK")
PERF_DATA = "/dev/shm/sockprof.perf.data"


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def nsx(ns, *cmd):
    return ["ip", "netns", "exec", NS[ns], *cmd]


# ---------------------------------------------------------------- topology


def topology_up():
    have = sh("ip", "netns", "list").stdout.split()
    if any(n in have for n in NS.values()):
        # Another run uses them (a second run would tear its topology down mid-measurement).
        sys.exit(
            f"the namespaces {', '.join(NS.values())} exist: another sockprof run is going on; "
            "if it is not (a killed run left them), delete them with `ip netns del NAME`"
        )
    for n in NS.values():
        sh("ip", "netns", "add", n)
        sh("ip", "-n", n, "link", "set", "lo", "up")
    sh("ip", "link", "add", "spc0", "netns", NS["c"], "type", "veth", "peer", "spp0", "netns", NS["p"])
    sh("ip", "link", "add", "spp1", "netns", NS["p"], "type", "veth", "peer", "spb0", "netns", NS["b"])
    for ns, dev, ip in [
        ("c", "spc0", CLIENT_IP),
        ("p", "spp0", PROXY_C_IP),
        ("p", "spp1", PROXY_B_IP),
        ("b", "spb0", BACKEND_IP),
    ]:
        sh("ip", "-n", NS[ns], "addr", "add", ip + "/24", "dev", dev)
        sh("ip", "-n", NS[ns], "link", "set", dev, "up")


def topology_down():
    have = sh("ip", "netns", "list").stdout.split()
    for n in NS.values():
        if n in have:
            sh("ip", "netns", "del", n, check=False)


# ---------------------------------------------------------------- the client (runs in sockprof-c)


def client_main(a):
    """N paced upload streams for `secs`; prints {"bytes":..., "errors":[...]} on stdout."""
    rate = int(a.mbit * 1e6 / 8)
    buf = bytes(CHUNK)
    results = []
    lock = threading.Lock()
    start = threading.Barrier(a.streams + 1)

    def stream():
        sent, err = 0, None
        try:
            s = socket.create_connection((a.target, PROXY_PORT), timeout=10)
            if rate:
                s.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, min(rate, 0xFFFFFFFE))
            start.wait()
            end = time.monotonic() + a.secs
            s.sendall(SINK_HEADER)
            while time.monotonic() < end:
                s.sendall(buf)
                sent += len(buf)
            s.shutdown(socket.SHUT_WR)
            ack = b""
            while len(ack) < 16:
                got = s.recv(16 - len(ack))
                if not got:
                    break
                ack += got
            if len(ack) != 16:
                err = f"short acknowledgement ({len(ack)} bytes)"
            else:
                recv, _bad = struct.unpack("<QQ", ack)
                if recv != sent:
                    err = f"sink got {recv} bytes, sent {sent}"
            s.close()
        except Exception as e:  # reported, the run is then not ok
            err = f"{type(e).__name__}: {e}"
            try:
                start.abort()
            except Exception:
                pass
        with lock:
            results.append((sent, err))

    ts = [threading.Thread(target=stream) for _ in range(a.streams)]
    for t in ts:
        t.start()
    try:
        start.wait(timeout=30)
    except threading.BrokenBarrierError:
        pass
    t0 = time.monotonic()
    print("started", flush=True)
    for t in ts:
        t.join()
    print(
        json.dumps(
            {
                "bytes": sum(r[0] for r in results),
                "secs": time.monotonic() - t0,
                "errors": [r[1] for r in results if r[1]],
            }
        ),
        flush=True,
    )


# ---------------------------------------------------------------- samplers


def host_cpu():
    f = open("/proc/stat").readline().split()[1:]
    v = [int(x) for x in f]
    # user nice system idle iowait irq softirq steal guest guest_nice
    return {
        "user": v[0] + v[1],
        "system": v[2],
        "irq": v[5],
        "softirq": v[6],
        "steal": v[7],
        "idle": v[3] + v[4],
    }


def proc_stat(path):
    """(comm, utime+stime ticks, utime, stime) of /proc/.../stat."""
    s = open(path).read()
    comm = s[s.index("(") + 1 : s.rindex(")")]
    f = s[s.rindex(")") + 2 :].split()
    return comm, int(f[11]), int(f[12])


def kthreads():
    """CPU ticks of kworker and ksoftirqd threads by kind, summed over live threads."""
    out = {"kworker": 0, "ksoftirqd": 0}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            comm, u, s = proc_stat(f"/proc/{pid}/stat")
        except (OSError, ValueError):
            continue
        for k in out:
            if comm.startswith(k):
                out[k] += u + s
    return out


def threads_of(pid):
    """Per thread kind (its name without trailing digits): user, sys ticks and context switches."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, u, s = proc_stat(f"/proc/{pid}/task/{tid}/stat")
            st = open(f"/proc/{pid}/task/{tid}/status").read().split("\n")
        except (OSError, ValueError):
            continue
        kind = comm.rstrip("0123456789-")
        vol = int(next(x for x in st if x.startswith("voluntary_ctxt")).split()[1])
        inv = int(next(x for x in st if x.startswith("nonvoluntary_ctxt")).split()[1])
        d = out.setdefault(kind, {"user": 0, "sys": 0, "vcsw": 0, "ivcsw": 0})
        d["user"] += u
        d["sys"] += s
        d["vcsw"] += vol
        d["ivcsw"] += inv
    return out


def bpf_progs(pid):
    """run_time_ns and run_cnt of every BPF program the process holds, by name."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = dict(
                line.split(":", 1) for line in open(f"/proc/{pid}/fdinfo/{fd}").read().splitlines() if ":" in line
            )
        except OSError:
            continue
        pid_id = info.get("prog_id", fd).strip()
        out[pid_id] = {
            "run_time_ns": int(info.get("run_time_ns", "0")),
            "run_cnt": int(info.get("run_cnt", "0")),
        }
    return out


def metrics():
    try:
        txt = sh(*nsx("p", "curl", "-s", "--max-time", "2", f"http://127.0.0.1:{METRICS_PORT}/metrics")).stdout
    except subprocess.CalledProcessError:
        return {}
    out = {}
    for line in txt.splitlines():
        if "_sockmap_" in line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k.removeprefix("ntlm_splice_sockmap_").removesuffix("_total")] = float(v)
    return out


def net(ns):
    """TCP segment counters of namespace `ns` and packets/bytes of its veth ends (GSO
    packets count once): how finely each leg's bytes are cut."""
    snmp = sh(*nsx(ns, "cat", "/proc/net/snmp")).stdout.splitlines()
    tcp = [line.split()[1:] for line in snmp if line.startswith("Tcp:")]
    out = {k: int(v) for k, v in zip(*tcp) if k in ("InSegs", "OutSegs", "RetransSegs")}
    for link in json.loads(sh("ip", "-n", NS[ns], "-s", "-j", "link", "show").stdout):
        if link["ifname"] == "lo":
            continue
        st = link["stats64"]
        for d in ("rx", "tx"):
            out[f"{link['ifname']}_{d}_packets"] = st[d]["packets"]
            out[f"{link['ifname']}_{d}_bytes"] = st[d]["bytes"]
            out[f"{link['ifname']}_{d}_dropped"] = st[d]["dropped"]
    return out


def softnet_drops():
    """Packets dropped because a CPU's input backlog was full (host-wide: veth delivers
    through it)."""
    return sum(int(line.split()[1], 16) for line in open("/proc/net/softnet_stat"))


def diff(a, b):
    if isinstance(a, dict):
        return {k: diff(a[k], b[k]) for k in b if k in a}
    return b - a


# ---------------------------------------------------------------- one run


def psock_backlog_addr():
    for line in open("/proc/kallsyms"):
        f = line.split()
        if len(f) >= 3 and f[2] == "sk_psock_backlog":
            return f[0]
    return None


def baseline(secs):
    """Share of the host's (non-steal) CPU busy with nothing of ours running: other sessions."""
    h0 = host_cpu()
    time.sleep(secs)
    h = diff(h0, host_cpu())
    return round((h["user"] + h["system"] + h["irq"] + h["softirq"]) / max(1, sum(h.values())), 3)


def sk_skb_holders(exclude):
    """PIDs other than `exclude` holding an sk_skb program (another sockmap user would
    add its own psock work items to the count)."""
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == exclude:
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-prog":
                    if "prog_type:\t14" in open(f"/proc/{pid}/fdinfo/{fd}").read():
                        out.add(int(pid))
                        break
        except OSError:
            continue
    return out


def psock_items():
    """(count, seconds) of sk_psock_backlog work items in the recording, start to end per kworker."""
    txt = sh("perf", "script", "-i", PERF_DATA, "-F", "pid,time,event", check=False).stdout
    open_at, n, total = {}, 0, 0.0
    for line in txt.splitlines():
        f = line.split()
        if len(f) < 3:
            continue
        pid, t = f[0], float(f[1].rstrip(":"))
        if "execute_start" in f[2]:
            open_at[pid] = t
        elif pid in open_at:
            total += t - open_at.pop(pid)
            n += 1
    os.unlink(PERF_DATA)
    return n, total


def wait_port(ns, ip, port, timeout=10.0):
    end = time.monotonic() + timeout
    probe = f"import socket,sys; socket.create_connection(('{ip}',{port}),timeout=1).close()"
    while time.monotonic() < end:
        if subprocess.run(nsx(ns, sys.executable, "-c", probe), capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{ip}:{port} in {NS[ns]} did not accept within {timeout}s")


def nagle_toward_backend(pid):
    """Experiment, no code change: turns TCP_NODELAY off on the proxy's sockets to the
    backend (copies of its descriptors through pidfd_getfd), so the kernel's egress of
    redirected bytes may coalesce them. Returns how many sockets it changed."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            mine = libc.syscall(438, pidfd, int(fd), 0)  # pidfd_getfd
            if mine < 0:
                continue
            s = socket.socket(fileno=mine)
            try:
                if s.family == socket.AF_INET and s.getpeername()[1] == BACKEND_PORT:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
                    n += 1
            except OSError:
                pass
            finally:
                s.close()
    finally:
        os.close(pidfd)
    return n


def one_run(a, engine, backlog_addr, tag=""):
    started = []
    nagled = None
    base = baseline(a.baseline_secs)
    try:
        backend = subprocess.Popen(
            nsx("b", a.bench, "serve", "--listen", f"{BACKEND_IP}:{BACKEND_PORT}", "--max-secs", "600"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(backend)
        proxy_cmd = [
            a.bins.get(tag, a.splice),
            "--listen",
            f"{PROXY_C_IP}:{PROXY_PORT}",
            "--backend",
            f"{BACKEND_IP}:{BACKEND_PORT}",
            "--engine",
            engine,
            "--metrics-listen",
            f"127.0.0.1:{METRICS_PORT}",
            *a.proxy_arg,
        ]
        proxy = subprocess.Popen(nsx("p", *proxy_cmd), stdout=subprocess.DEVNULL, stderr=open(a.log, "a"))
        started.append(proxy)
        wait_port("b", BACKEND_IP, BACKEND_PORT)
        wait_port("c", PROXY_C_IP, PROXY_PORT)
        # `ip netns exec` execs the command, so the PID is the proxy's own.
        ppid = proxy.pid
        client = subprocess.Popen(
            nsx("c", sys.executable, __file__, "client", "--target", PROXY_C_IP, "--streams", str(a.streams),
                "--mbit", str(a.mbit), "--secs", str(a.secs)),
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(client)
        assert client.stdout.readline().strip() == "started"
        if tag == "nagle":
            time.sleep(0.5)
            nagled = nagle_toward_backend(proxy.pid)
        perf = None
        if backlog_addr and a.perf:
            flt = f"function == 0x{backlog_addr}"
            perf = subprocess.Popen(
                ["perf", "record", "-q", "-a", "-o", PERF_DATA,
                 "-e", "workqueue:workqueue_execute_start", "--filter", flt,
                 "-e", "workqueue:workqueue_execute_end", "--filter", flt,
                 "--", "sleep", str(a.secs)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started.append(perf)
        others0 = sk_skb_holders(exclude=ppid)
        t0 = time.monotonic()
        h0, k0, p0, b0, m0 = host_cpu(), kthreads(), threads_of(ppid), bpf_progs(ppid), metrics()
        e0 = {"client": threads_of(client.pid), "backend": threads_of(backend.pid)}
        n0 = {ns: net(ns) for ns in ("p", "b")}
        sd0 = softnet_drops()
        time.sleep(a.secs * 0.999)
        h1, k1, p1, b1, m1 = host_cpu(), kthreads(), threads_of(ppid), bpf_progs(ppid), metrics()
        e1 = {"client": threads_of(client.pid), "backend": threads_of(backend.pid)}
        n1 = {ns: net(ns) for ns in ("p", "b")}
        sd1 = softnet_drops()
        wall = time.monotonic() - t0
        out, _ = client.communicate(timeout=a.secs + 60)
        res = json.loads(out.strip().splitlines()[-1])
        others = sorted(others0 | sk_skb_holders(exclude=ppid))
        psock = None
        if perf:
            perf.wait(timeout=60)
            psock = psock_items()
        m_end = metrics()
    finally:
        for p in reversed(started):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    gb = res["bytes"] / 1e9
    h = diff(h0, h1)
    busy = h["user"] + h["system"] + h["irq"] + h["softirq"]
    sec = lambda ticks: ticks / TICK  # noqa: E731
    per_gb = lambda ticks: round(sec(ticks) / gb, 3) if gb else None  # noqa: E731
    pt = diff(p0, p1)
    prog = diff(b0, b1)
    return {
        "engine": engine,
        "ok": not res["errors"],
        "errors": res["errors"][:3],
        "gb": round(gb, 3),
        "mbit_per_stream": round(res["bytes"] * 8 / 1e6 / res["secs"] / a.streams, 1),
        "wall": round(wall, 2),
        "loadavg": open("/proc/loadavg").read().split()[0],
        "steal_share": round(h["steal"] / max(1, sum(h.values())), 3),
        "host_s_per_gb": {
            "busy": per_gb(h["user"] + h["system"] + h["irq"] + h["softirq"]),
            "user": per_gb(h["user"]),
            "system": per_gb(h["system"]),
            "softirq": per_gb(h["softirq"] + h["irq"]),
        },
        "proxy_s_per_gb": {k: {"user": per_gb(v["user"]), "sys": per_gb(v["sys"])} for k, v in pt.items()},
        "proxy_cs_per_gb": {k: round((v["vcsw"] + v["ivcsw"]) / gb) for k, v in pt.items()},
        "kthreads_s_per_gb": {k: per_gb(v) for k, v in diff(k0, k1).items()},
        "baseline_busy_share": base,
        "run_busy_share": round(busy / max(1, sum(h.values())), 3),
        "host_s_per_gb_minus_baseline": per_gb(busy - base * sum(h.values())),
        "ends_s_per_gb": {
            k: per_gb(sum(t["user"] + t["sys"] for t in diff(e0[k], e1[k]).values())) for k in e0
        },
        "psock_backlog": {
            "items_per_gb": round(psock[0] / gb),
            "s_per_gb": round(psock[1] / gb, 3),
            "us_per_item": round(psock[1] / max(1, psock[0]) * 1e6, 1),
        }
        if psock
        else None,
        "other_sk_skb_holders": others,
        "net": legs(diff(n0, n1), gb),
        "softnet_drops_host": sd1 - sd0,
        "nagle_sockets": nagled,
        "bpf": {
            k: {"runs_per_gb": round(v["run_cnt"] / gb), "ns_per_run": round(v["run_time_ns"] / max(1, v["run_cnt"])),
                "s_per_gb": round(v["run_time_ns"] / 1e9 / gb, 4)}
            for k, v in prog.items()
            if v["run_cnt"]
        },
        "sockmap_window": {k: v for k, v in diff(m0, m1).items() if v},
        "sockmap_end": {k: v for k, v in m_end.items() if v},
    }


def legs(n, gb):
    """Per GB: segments the proxy received and sent, retransmissions, and the mean size of
    a packet on each veth leg (client to proxy, proxy to backend)."""
    p, b = n["p"], n["b"]
    size = lambda by, pk: round(by / pk) if pk else None  # noqa: E731
    return {
        "proxy_in_segs_per_gb": round(p["InSegs"] / gb),
        "proxy_out_segs_per_gb": round(p["OutSegs"] / gb),
        "proxy_retrans_per_gb": round(p["RetransSegs"] / gb),
        "backend_in_segs_per_gb": round(b["InSegs"] / gb),
        "bytes_per_pkt_client_to_proxy": size(p["spp0_rx_bytes"], p["spp0_rx_packets"]),
        "bytes_per_pkt_proxy_to_backend": size(p["spp1_tx_bytes"], p["spp1_tx_packets"]),
        "veth_drops": sum(v for k, v in {**p, **{"b_" + k: v for k, v in b.items()}}.items() if k.endswith("_dropped")),
    }


def summary(path):
    """Median and range per engine (and tag) of the figures docs/sockmap.md quotes, from the
    JSON lines of earlier runs."""
    rows = {}
    for line in open(path):
        r = json.loads(line)
        if not r["ok"]:
            print(f"skipped a failed run: {r['engine']} {r.get('tag', '')} {r['errors']}")
            continue
        proxy = sum(v["user"] + v["sys"] for v in r["proxy_s_per_gb"].values())
        psock = r["psock_backlog"] or {}
        bpf = list(r["bpf"].values())
        win = r["sockmap_window"]
        fig = {
            "Mbit/s per stream": r["mbit_per_stream"],
            "host busy s/GB": r["host_s_per_gb"]["busy"],
            "host user s/GB": r["host_s_per_gb"]["user"],
            "host system s/GB": r["host_s_per_gb"]["system"],
            "host softirq s/GB": r["host_s_per_gb"]["softirq"],
            "host minus others s/GB": r["host_s_per_gb_minus_baseline"],
            "proxy s/GB": proxy,
            "proxy cs/GB": sum(r["proxy_cs_per_gb"].values()),
            "psock items/GB": psock.get("items_per_gb", 0),
            "psock s/GB": psock.get("s_per_gb", 0),
            "us/psock item": psock.get("us_per_item", 0),
            "kworker s/GB": r["kthreads_s_per_gb"]["kworker"],
            "ksoftirqd s/GB": r["kthreads_s_per_gb"]["ksoftirqd"],
            "backend s/GB": r["ends_s_per_gb"]["backend"],
            "verdict runs/GB": sum(b["runs_per_gb"] for b in bpf),
            "ns/verdict run": bpf[0]["ns_per_run"] if bpf else 0,
            "verdict s/GB": sum(b["s_per_gb"] for b in bpf),
            "bytes/packet to backend": r["net"]["bytes_per_pkt_proxy_to_backend"],
            "backend in-segs/GB": r["net"]["backend_in_segs_per_gb"],
            "lane MB/GB": win.get("copied_bytes", 0) / 1e6 / r["gb"],
            "pauses": win.get("pauses", 0),
            "other sk_skb users": len(r["other_sk_skb_holders"]),
            "box busy before run": r["baseline_busy_share"],
            "steal": r["steal_share"],
        }
        rows.setdefault((r["engine"], r.get("tag", "")), []).append(fig)
    for (engine, tag), runs in rows.items():
        print(f"== {engine} {tag} ({len(runs)} runs)")
        for k in runs[0]:
            v = sorted(x[k] for x in runs)
            med = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
            print(f"  {k:26} median {med:>10.3f}   range {v[0]:.3f} .. {v[-1]:.3f}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        return summary(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    for p in (ap, c):
        p.add_argument("--streams", type=int, default=64)
        p.add_argument("--mbit", type=float, default=40.0, help="pace of each stream, Mbit/s (0: unpaced)")
        p.add_argument("--secs", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-secs", type=float, default=3.0, help="idle window before each run")
    ap.add_argument("--engines", default="splice,sockmap")
    ap.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", "target"))
    ap.add_argument("--proxy-arg", action="append", default=[], help="extra ntlm-splice argument (repeat)")
    ap.add_argument(
        "--bin",
        action="append",
        default=[],
        metavar="TAG=PATH",
        help="ntlm-splice binary for engines tagged TAG (`--engines sockmap:TAG`): before/after a change",
    )
    ap.add_argument("--no-perf", dest="perf", action="store_false", help="skip the perf tracepoint count")
    ap.add_argument("--log", default="/dev/null", help="where the proxies' stderr goes")
    a = ap.parse_args()
    if a.cmd == "client":
        return client_main(a)
    a.splice = os.path.join(a.target_dir, "release", "ntlm-splice")
    a.bench = os.path.join(a.target_dir, "release", "ntlm-bench")
    a.bins = dict(b.split("=", 1) for b in a.bin)
    stats = "/proc/sys/kernel/bpf_stats_enabled"
    old_stats = open(stats).read().strip()
    addr = psock_backlog_addr()
    if not addr:
        print("sk_psock_backlog not in /proc/kallsyms: psock work items not counted", file=sys.stderr)
    try:
        open(stats, "w").write("1")
        topology_up()
        for r in range(a.rounds):
            for engine in a.engines.split(","):
                engine, _, tag = engine.partition(":")
                res = one_run(a, engine, addr, tag)
                res["round"] = r
                if tag:
                    res["tag"] = tag
                print(json.dumps(res), flush=True)
    finally:
        open(stats, "w").write(old_stats)
        topology_down()


if __name__ == "__main__":
    sys.exit(main())
