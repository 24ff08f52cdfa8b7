//! `cargo xtask run|test|bench|setup`: the project's entry points. Each installs what it
//! needs first (rustup components, bpf-linker, Debian packages) or says exactly what is
//! missing, so that on a fresh machine one command is the whole set-up.

mod bench;
mod dist;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (release) and run. With no arguments: an NTLM demo backend on 127.0.0.1:18080
    /// and ntlm-splice on 127.0.0.1:8080 in front of it. Arguments after `--` go to
    /// ntlm-splice instead (then no demo backend is started).
    Run {
        /// Arguments for ntlm-splice.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install what the tests need, build, and run the whole test suite for every engine
    /// this host supports (in CI the sockmap engine is required).
    Test {
        /// Engines the general end-to-end suites (NTLM, transport) run against. Default: the
        /// splice engine (what `--engine auto` runs), and the sockmap engine wherever it is
        /// usable (always in CI).
        #[arg(long, value_delimiter = ',')]
        engines: Vec<String>,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmark the engines against direct connections, nginx stream and HAProxy.
    Bench(bench::BenchArgs),
    /// Install the eBPF toolchain and test dependencies only.
    Setup,
    /// The release: a static (musl) binary with the eBPF object embedded and a reproducible
    /// tarball dist/ntlm-splice-VERSION-x86_64.tar.gz (binary, deploy/ files); with --image,
    /// the container image too (podman).
    Dist(dist::DistArgs),
}

/// Where the demo backend listens.
const DEMO_BACKEND: &str = "127.0.0.1:18080";
/// Where the demo proxy listens.
const DEMO_LISTEN: &str = "127.0.0.1:8080";

fn main() -> anyhow::Result<()> {
    // `cargo xtask dist` runs xtask itself as the rustc wrapper of its build.
    dist::maybe_wrap_rustc();
    match Cli::parse().cmd {
        Cmd::Run { args } => run(args),
        Cmd::Test { engines, args } => test(engines, args),
        Cmd::Bench(args) => {
            setup::ensure_ebpf_toolchain()?;
            build_release()?;
            bench::run(&root(), args)
        }
        Cmd::Setup => {
            setup::ensure_ebpf_toolchain()?;
            ensure_test_tools()
        }
        Cmd::Dist(args) => dist::run(args).map(drop),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn check(status: std::io::Result<ExitStatus>, what: &str) -> anyhow::Result<()> {
    let status = status.with_context(|| format!("cannot start: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn build_release() -> anyhow::Result<()> {
    check(
        cargo().args(["build", "--release", "--workspace", "--exclude", "ntlm-ebpf"]).status(),
        "cargo build --release",
    )
}

fn bin(name: &str) -> PathBuf {
    root().join("target/release").join(name)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(args: Vec<String>) -> anyhow::Result<()> {
    setup::ensure_ebpf_toolchain()?;
    build_release()?;
    if !is_root() {
        println!("note: not root, so the sockmap engine cannot load; --engine auto will use splice");
    }
    if !args.is_empty() {
        let status = Command::new(bin("ntlm-splice")).args(&args).status();
        return check(status, "ntlm-splice");
    }
    let mut backend = Command::new(bin("ntlm-testd"))
        .args(["--listen", DEMO_BACKEND])
        .spawn()
        .context("cannot start the demo NTLM backend (target/release/ntlm-testd)")?;
    let _guard = KillOnDrop(&mut backend);
    println!();
    println!("Demo: NTLM backend (IIS-like) on {DEMO_BACKEND}, ntlm-splice on {DEMO_LISTEN}. Try:");
    println!("  curl --ntlm -u 'EXAMPLE\\alice:Alice-Pass-1' http://{DEMO_LISTEN}/whoami");
    println!("  curl -i http://{DEMO_LISTEN}/whoami        # no credentials: 401");
    println!("Ctrl-C stops both.");
    println!();
    let status = Command::new(bin("ntlm-splice")).args(["--listen", DEMO_LISTEN, "--backend", DEMO_BACKEND]).status();
    check(status, "ntlm-splice")
}

/// Kills a child we started, by its PID, when the guard goes.
struct KillOnDrop<'a>(&'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// curl with NTLM support and Python's requests-ntlm (the real clients the tests use),
/// strace, capsh, openssl, HAProxy, and iproute2 and nftables for the namespace tests.
fn ensure_test_tools() -> anyhow::Result<()> {
    let curl_ok = Command::new("curl")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("NTLM"))
        .unwrap_or(false);
    if !curl_ok {
        apt_install(&["curl"])?;
    }
    // The sockmap suite counts the proxy's read syscalls with strace.
    if Command::new("strace").arg("-V").output().is_err() {
        apt_install(&["strace"])?;
    }
    // ... and runs `doctor` with only some capabilities through capsh.
    if Command::new("capsh").arg("--help").output().is_err() {
        apt_install(&["libcap2-bin"])?;
    }
    // The PROXY-protocol unit tests use HAProxy as a real producer and consumer of headers.
    if Command::new("haproxy").arg("-v").output().is_err() {
        apt_install(&["haproxy"])?;
    }
    // The identity suite builds client, splicer and backend network namespaces with `ip`
    // and the transparent-proxy mark rule with `nft`; doctor's transparent-source tests
    // read the nftables ruleset of their namespaces.
    if Command::new("ip").arg("-V").output().is_err() {
        apt_install(&["iproute2"])?;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        apt_install(&["nftables"])?;
    }
    // The deployment suite checks the systemd unit with systemd-analyze, and builds and runs
    // the container image with podman (runc, uidmap).
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        apt_install(&["systemd"])?;
    }
    dist::ensure_podman()?;
    // The SNI suite makes its certificates with the openssl command line.
    if Command::new("openssl").arg("version").output().is_err() {
        apt_install(&["openssl"])?;
    }
    let py =
        |code: &str| Command::new("python3").args(["-c", code]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !py("import sys").map(|s| s.success()).unwrap_or(false) {
        apt_install(&["python3", "python3-pip"])?;
    }
    if !py("import requests_ntlm").map(|s| s.success()).unwrap_or(false) {
        println!("xtask: installing Python requests-ntlm (pip)");
        let mut pip = Command::new("python3");
        pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "requests-ntlm"]);
        if !pip.status().map(|s| s.success()).unwrap_or(false) {
            // Debian's system Python refuses pip without this flag (PEP 668).
            check(
                Command::new("python3")
                    .args(["-m", "pip", "install", "--quiet", "--break-system-packages", "requests-ntlm"])
                    .status(),
                "pip install requests-ntlm",
            )?;
        }
    }
    Ok(())
}

fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("missing {}: run `sudo apt-get install -y {}` and retry", pkgs.join(", "), pkgs.join(" "));
    }
    println!("xtask: apt-get install {}", pkgs.join(" "));
    check(Command::new("apt-get").args(["update", "-qq"]).status(), "apt-get update")?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status(),
        "apt-get install",
    )
}

/// Whether the sockmap engine's own suite runs here, from `ntlm-splice doctor`.
fn sockmap_available() -> anyhow::Result<bool> {
    let out = Command::new(bin("ntlm-splice")).arg("doctor").output().context("ntlm-splice doctor")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.lines().any(|l| l.trim() == "sockmap_engine=available") {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        bail!("CI=true but the sockmap engine is unavailable here, and in CI its tests must run:\n{text}");
    }
    println!(
        "xtask: SKIPPING the sockmap engine tests: it is unavailable on this host (run as root on a kernel with sockmap). `ntlm-splice doctor` says:\n{text}"
    );
    Ok(false)
}

/// The environment variable giving each fuzz target's budget in seconds (the `ntlm-fuzz` crate
/// reads it; 0 skips fuzzing).
const FUZZ_SECS_VAR: &str = "NTLM_SPLICE_FUZZ_SECS";

/// Runs every fuzz target (the ignored `fuzz_*` tests of the workspace's libraries: one per
/// parser of outside input) for its time budget, one after the other, in release mode. Each
/// prints its budget, seed and case counts, or the failing input in hex.
fn fuzz() -> anyhow::Result<()> {
    let secs = std::env::var(FUZZ_SECS_VAR).unwrap_or_default();
    if secs.trim() == "0" {
        println!("xtask: fuzzing SKIPPED ({FUZZ_SECS_VAR}=0)");
        return Ok(());
    }
    let budget = if secs.is_empty() { "its default time (printed below)".to_owned() } else { format!("{secs} s") };
    println!("xtask: fuzzing each parser for {budget} ({FUZZ_SECS_VAR} sets it, 0 skips)");
    let status = cargo()
        .args(["test", "--release", "--workspace", "--exclude", "ntlm-ebpf", "--lib", "fuzz_"])
        .args(["--", "--ignored", "--test-threads=1", "--nocapture"])
        .status();
    check(status, "fuzzing (the failing input is printed above, in hex)")
}

fn test(engines: Vec<String>, args: Vec<String>) -> anyhow::Result<()> {
    setup::ensure_ebpf_toolchain()?;
    ensure_test_tools()?;
    build_release()?;
    let sockmap = sockmap_available()?;
    // The deployment suite runs the container image built from the release directory: a
    // second, static build (minutes; cached after the first run).
    let dist_dir = dist::for_tests()?;
    let engines = if engines.is_empty() {
        let mut v = vec!["splice".to_string()];
        if sockmap {
            v.push("sockmap".to_string());
        }
        v
    } else {
        engines
    };
    if engines.iter().any(|e| e == "sockmap") && !sockmap {
        bail!("--engines names sockmap, but the sockmap engine is unavailable on this host");
    }
    println!(
        "xtask: general suites against: {}; sockmap engine suite: {}",
        engines.join(","),
        if sockmap { "yes" } else { "skipped" }
    );
    let status = cargo()
        .args(["test", "--release", "--workspace", "--exclude", "ntlm-ebpf"])
        .args(&args)
        .env("NTLM_SPLICE_BIN", bin("ntlm-splice"))
        .env("NTLM_SPLICE_TEST_ENGINES", engines.join(","))
        .env("NTLM_SPLICE_TEST_SOCKMAP", if sockmap { "1" } else { "0" })
        .env("NTLM_SPLICE_TEST_DIST", &dist_dir)
        .status();
    check(status, "cargo test")?;
    fuzz()?;
    // The benchmark's regression guard: every workload runs end to end and moves exactly the
    // bytes it should (timings are not checked: CI machines are noisy).
    println!("xtask: benchmark smoke run");
    let smoke = |edge: bool| bench::BenchArgs {
        edge,
        quick: false,
        smoke: true,
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
    bench::run(&root(), smoke(false))?;
    // The edge workload builds network namespaces, which needs root (as the identity suite).
    if !is_root() {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            bail!("CI=true but the edge benchmark smoke run cannot run: it needs root (network namespaces)");
        }
        println!("xtask: SKIPPING the edge benchmark smoke run: it needs root (network namespaces)");
        return Ok(());
    }
    println!("xtask: edge benchmark smoke run");
    bench::run(&root(), smoke(true))
}
