//! Deployment (issue 18 items 2-6): the files in `deploy/` say what the README's Deployment
//! section promises, and work.
//!
//! - The Kubernetes manifests are parsed (YAML) and every promised field checked; their
//!   configuration, and the image's, pass `ntlm-splice check`.
//! - The systemd unit and its drop-ins pass `systemd-analyze verify` with no complaint, and
//!   carry the promised settings; `LimitNOFILE` fits the shipped `max_connections`.
//! - `--watch-config` reloads when a Kubernetes-style symlink swap changes the file, keeps the
//!   running configuration on a bad file, and picks up the fixed one.
//! - The unit for real: systemd as PID 1 in a podman container serves a login per engine.
//! - The container image (built by podman from `cargo xtask dist`'s directory, given by
//!   `NTLM_SPLICE_TEST_DIST`, which `cargo xtask test` sets) runs with host networking and the
//!   documented capabilities, switches to uid 65532, and serves a `curl --ntlm` login, on each
//!   engine the host supports. Skipped, saying why, without podman, root or that directory;
//!   in CI (CI=true) those skips fail instead.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use ntlm_splice_tests::{
    harness::{self, Proxy, TempDir, config_head, config_route, stop_ok, within},
    ntlm::{Credentials, DEFAULT_DOMAIN, HttpConn, NtlmServer, demo_users},
};
use tokio::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

/// Bound for quick steps: a command, a reload, a login.
const QUICK: Duration = Duration::from_secs(30);
/// How often the watch test's proxy reads its file.
const WATCH_EVERY: &str = "200ms";
/// alice's login, and what the NTLM backend's `/whoami` answers for it.
const ALICE: (&str, &str, &str) = ("EXAMPLE\\alice", "Alice-Pass-1", "EXAMPLE\\alice");
/// Where every deployment form reads its configuration (README, Deployment).
const CONFIG_PATH: &str = "/etc/ntlm-splice/ntlm-splice.toml";
/// The image's non-root user.
const IMAGE_UID: u32 = 65532;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn yaml(rel: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"));
    assert_eq!(docs.len(), 1, "{rel}: one document");
    docs.remove(0)
}

fn s<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str().unwrap_or_else(|| panic!("{what}: not a string: {y:?}"))
}

fn strings(y: &Yaml, what: &str) -> Vec<String> {
    y.as_vec().unwrap_or_else(|| panic!("{what}: not a list: {y:?}")).iter().map(|v| s(v, what).to_owned()).collect()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says why a test cannot run here; fails in CI, where it must.
fn skip(test: &str, why: &str) {
    assert!(!in_ci(), "{test} cannot run in CI: {why}");
    eprintln!("SKIPPED {test}: {why}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `[metrics] listen` of a configuration text.
fn metrics_listen(toml: &str) -> SocketAddr {
    let line = toml
        .lines()
        .skip_while(|l| l.trim() != "[metrics]")
        .find_map(|l| l.trim().strip_prefix("listen = "))
        .unwrap_or_else(|| panic!("no [metrics] listen in:\n{toml}"));
    line.trim_matches('"').parse().unwrap_or_else(|e| panic!("[metrics] listen {line}: {e}"))
}

/// `[global] max_connections` of a configuration text.
fn max_connections(toml: &str) -> u64 {
    let v = toml.lines().find_map(|l| l.trim().strip_prefix("max_connections = ")).expect("max_connections");
    v.trim().parse().unwrap()
}

/// `text` with every `backends = [...]` line replaced by a loopback backend, so that
/// `ntlm-splice check` (which resolves names) can check the rest of a shipped example.
fn with_loopback_backends(text: &str) -> String {
    text.lines()
        .map(|l| if l.trim_start().starts_with("backends = ") { "backends = [\"127.0.0.1:1\"]" } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `ntlm-splice check --config` on `text`.
async fn check_config(text: &str, what: &str) {
    let dir = TempDir::new("deploy-check");
    let path = dir.write("ntlm-splice.toml", &with_loopback_backends(text));
    let out = within(
        QUICK,
        "ntlm-splice check",
        Command::new(harness::bin()).arg("check").arg("--config").arg(&path).output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{what} fails `ntlm-splice check`:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn daemonset_and_configmap_have_what_the_readme_promises() {
    let ds = yaml("deploy/kubernetes/daemonset.yaml");
    let cm = yaml("deploy/kubernetes/configmap.yaml");
    assert_eq!(s(&ds["kind"], "kind"), "DaemonSet");
    assert_eq!(s(&cm["kind"], "kind"), "ConfigMap");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "hostNetwork");
    assert_eq!(s(&pod["dnsPolicy"], "dnsPolicy"), "ClusterFirstWithHostNet");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in ds["spec"]["selector"]["matchLabels"].as_hash().expect("selector.matchLabels") {
        assert_eq!(&labels[s(k, "label")], v, "the selector matches the pod's labels");
    }
    let containers = pod["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 1, "one container, no sidecar");
    let c = &containers[0];

    // Capabilities: all dropped, then exactly those of the README's first two rows.
    let sc = &c["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["drop"], "drop"), ["ALL"]);
    let mut add = strings(&sc["capabilities"]["add"], "add");
    add.sort();
    assert_eq!(add, ["NET_BIND_SERVICE", "SETGID", "SETPCAP", "SETUID"]);
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "allowPrivilegeEscalation");
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "readOnlyRootFilesystem");
    assert_eq!(s(&sc["seccompProfile"]["type"], "seccompProfile"), "RuntimeDefault");
    assert!(sc["privileged"].is_badvalue() || sc["privileged"].as_bool() == Some(false), "not privileged");
    for r in ["cpu", "memory"] {
        assert!(!c["resources"]["requests"][r].is_badvalue(), "resources.requests.{r}");
    }

    // The config: the ConfigMap mounted at the documented directory, named on the command
    // line, reloaded by --watch-config; the switch to the image's user.
    let args = strings(&c["args"], "args");
    let after = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(String::as_str);
    assert_eq!(after("--config"), Some(CONFIG_PATH));
    assert_eq!(after("--user"), Some("ntlm-splice"));
    assert!(after("--watch-config").is_some(), "--watch-config (reload on a ConfigMap update): {args:?}");
    let mounts = c["volumeMounts"].as_vec().expect("volumeMounts");
    let config_dir = Path::new(CONFIG_PATH).parent().unwrap().to_str().unwrap();
    let mount = mounts.iter().find(|m| m["mountPath"].as_str() == Some(config_dir)).expect("a mount at the config dir");
    let volume = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"], "the volume is the ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], ds["metadata"]["namespace"], "same namespace");
    let file = Path::new(CONFIG_PATH).file_name().unwrap().to_str().unwrap();
    let toml = s(&cm["data"][file], "the ConfigMap's file");
    check_config(toml, "the ConfigMap's configuration").await;
    // Nothing else from the host: the sockmap engine pins nothing (no /sys/fs/bpf).
    assert_eq!(pod["volumes"].as_vec().unwrap().len(), 1, "only the ConfigMap volume");
    assert!(!read("deploy/kubernetes/daemonset.yaml").contains("hostPath"), "no hostPath volume");

    // Probes on the metrics listener the ConfigMap configures.
    let metrics = metrics_listen(toml);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(s(&get["path"], probe), path, "{probe}");
        assert_eq!(get["port"].as_i64(), Some(i64::from(metrics.port())), "{probe} port");
        assert_eq!(s(&get["host"], probe), metrics.ip().to_string(), "{probe} host");
    }
}

#[tokio::test]
async fn the_images_configuration_passes_check() {
    let text = read("deploy/ntlm-splice.toml");
    check_config(&text, "deploy/ntlm-splice.toml").await;
    let containerfile = read("deploy/Containerfile");
    assert!(containerfile.lines().any(|l| l.trim() == "FROM scratch"), "FROM scratch: no registry pull");
    let cmd = format!("CMD [\"--config\", \"{CONFIG_PATH}\", \"--user\", \"ntlm-splice\"]");
    assert!(containerfile.lines().any(|l| l == cmd), "the image's command: {cmd}");
    let passwd = read("deploy/container/passwd");
    assert!(passwd.lines().any(|l| l.starts_with(&format!("ntlm-splice:x:{IMAGE_UID}:{IMAGE_UID}:"))), "{passwd}");
}

/// `KEY=VALUE` lines of a unit file (every occurrence).
fn unit_values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines().filter_map(|l| l.strip_prefix(key)?.strip_prefix('=')).collect()
}

#[tokio::test]
async fn systemd_unit_verifies_and_has_what_the_readme_promises() {
    let unit = read("deploy/systemd/ntlm-splice.service");
    let one = |key: &str| -> String {
        let v = unit_values(&unit, key);
        assert_eq!(v.len(), 1, "{key}= once in the unit: {v:?}");
        v[0].to_owned()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "all");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert!(one("ExecStart").ends_with(&format!("ntlm-splice --config {CONFIG_PATH}")));
    // LimitNOFILE >= 6 x max_connections + 1024 (README): for the shipped configuration.
    let limit: u64 = one("LimitNOFILE").parse().unwrap();
    let max = max_connections(&read("deploy/ntlm-splice.toml"));
    assert!(limit >= 6 * max + 1024, "LimitNOFILE={limit} < 6 x {max} + 1024");
    let dropin = |name: &str| read(&format!("deploy/systemd/ntlm-splice.service.d/{name}"));
    let sockmap = dropin("sockmap.conf");
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        assert_eq!(unit_values(&sockmap, key), ["CAP_BPF CAP_NET_ADMIN CAP_PERFMON"], "sockmap.conf {key}");
        assert_eq!(unit_values(&dropin("transparent.conf"), key), ["CAP_NET_ADMIN"], "transparent.conf {key}");
    }

    // systemd-analyze verify: the unit with the drop-ins next to it (found through
    // SYSTEMD_UNIT_PATH), the binary path pointing at the one under test (verify checks that
    // it is executable). Any complaint fails: verify exits 0 on unknown keys.
    let dir = TempDir::new("deploy-unit");
    let bin = harness::bin();
    dir.write("ntlm-splice.service", &unit.replace("/usr/local/bin/ntlm-splice", bin.to_str().unwrap()));
    let drop = dir.path().join("ntlm-splice.service.d");
    std::fs::create_dir(&drop).unwrap();
    for name in ["sockmap.conf", "transparent.conf"] {
        std::fs::write(drop.join(name), dropin(name)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("ntlm-splice.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output();
    let out = match within(QUICK, "systemd-analyze verify", out).await {
        Ok(out) => out,
        Err(e) => return skip("systemd_unit_verifies", &format!("systemd-analyze: {e} (apt-get install systemd)")),
    };
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && complaints.trim().is_empty(), "systemd-analyze verify:\n{complaints}");
}

/// Writes `text` as the ConfigMap volume would: `..data` is a symlink to a timestamped
/// directory, the file a symlink into `..data`; an update writes a new directory and renames a
/// new `..data` link over the old one (atomic).
fn configmap_write(dir: &Path, generation: u32, text: &str) {
    use std::os::unix::fs::symlink;
    let real = format!("..gen_{generation}");
    std::fs::create_dir(dir.join(&real)).unwrap();
    std::fs::write(dir.join(&real).join("ntlm-splice.toml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(&real, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let file = dir.join("ntlm-splice.toml");
    if std::fs::symlink_metadata(&file).is_err() {
        symlink("..data/ntlm-splice.toml", &file).unwrap();
    }
}

async fn curl_ntlm(addr: SocketAddr) -> (u16, String) {
    let url = format!("http://{addr}/whoami");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "15", "--ntlm", "-u"])
        .arg(format!("{}:{}", ALICE.0, ALICE.1))
        .args(["--write-out", "\n%{http_code}", &url])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = within(QUICK, &format!("curl {url}"), cmd.output()).await.unwrap_or_else(|e| panic!("curl: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "curl {url}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let (body, code) = stdout.rsplit_once('\n').unwrap_or_else(|| panic!("curl printed {stdout:?}"));
    (code.parse().unwrap_or_else(|_| panic!("curl status {code:?}")), body.trim_end_matches('\n').to_string())
}

async fn ntlm_login(addr: SocketAddr, what: &str) {
    let (status, body) = curl_ntlm(addr).await;
    assert_eq!((status, body.as_str()), (200, ALICE.2), "{what}: NTLM login through {addr}");
}

async fn ntlm_backend() -> NtlmServer {
    NtlmServer::start("127.0.0.1:0".parse().unwrap(), DEFAULT_DOMAIN, demo_users())
        .await
        .unwrap_or_else(|e| panic!("cannot start the NTLM backend: {e}"))
}

/// Counts lines of `proxy`'s log that contain `needle`.
fn count(proxy: &Proxy, needle: &str) -> usize {
    proxy.logs().lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn watch_config_follows_a_configmap_update() {
    let ntlm = ntlm_backend().await;
    let backend = ntlm.local_addr();
    let dir = TempDir::new("deploy-watch");
    let first = format!("{}{}", config_head("splice"), config_route("a", &["127.0.0.1:0"], &[backend], ""));
    configmap_write(dir.path(), 1, &first);
    let args: Vec<String> = ["--config", &dir.path().join("ntlm-splice.toml").display().to_string()]
        .into_iter()
        .chain(["--watch-config", WATCH_EVERY])
        .map(str::to_owned)
        .collect();
    let proxy = Proxy::start_args(&args).await;
    let a = proxy.addr_of("a", QUICK).await;
    ntlm_login(a, "before the update").await;

    // A bad file: rejected, the running configuration stays, and it is asked for once.
    configmap_write(dir.path(), 2, &format!("{first}\n[[route]]\nname = \"b\"\n"));
    let rejected = |p: &Proxy| p.logs().lines().filter(|l| l.contains("reload: ") && l.contains(" rejected")).count();
    within(QUICK, "the bad file's reload is rejected", async {
        while rejected(&proxy) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    ntlm_login(a, "after a rejected update").await;

    // The fixed file: a second route on a new listener, served.
    // Another address: routes on one address without sni would clash.
    let second = format!("{first}{}", config_route("b", &["127.0.0.2:0"], &[backend], ""));
    configmap_write(dir.path(), 3, &second);
    let b = proxy.addr_of("b", QUICK).await;
    ntlm_login(b, "the route the update added").await;
    ntlm_login(a, "the route that stayed").await;
    assert_eq!(count(&proxy, "reload: applied"), 1, "one reload per change:\n{}", proxy.logs());
    assert_eq!(rejected(&proxy), 1, "the bad file was not asked for again:\n{}", proxy.logs());
    stop_ok(proxy).await;
}

/// A loopback address of this test's own and a port below 1024 free on it now (the image's
/// documented capabilities include binding one).
fn low_port_addr(salt: u8) -> SocketAddr {
    let pid = std::process::id();
    let ip = Ipv4Addr::new(127, 90 + salt, (pid >> 8) as u8, (pid as u8) | 1);
    for port in (600..1024).rev() {
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return SocketAddr::from((ip, port));
        }
    }
    panic!("no free port below 1024 on {ip}");
}

async fn podman(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("podman");
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    within(Duration::from_secs(120), &format!("podman {}", args.join(" ")), cmd.output())
        .await
        .unwrap_or_else(|e| panic!("podman: {e}"))
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes a container this test started, by name, when the test ends (passed or not).
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman").args(["rm", "-f", "-t", "5", &self.0]).output();
    }
}

/// Uid line of /proc/PID/status: (real, effective).
fn uids(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    let v: Vec<u32> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0], v[1])
}

#[tokio::test]
async fn container_image_serves_ntlm_with_the_documented_capabilities() {
    const TEST: &str = "container_image_serves_ntlm";
    if !is_root() {
        return skip(TEST, "needs root (podman with host networking and added capabilities)");
    }
    let Some(dist) = std::env::var_os("NTLM_SPLICE_TEST_DIST").map(PathBuf::from) else {
        return skip(TEST, "NTLM_SPLICE_TEST_DIST is unset: `cargo xtask test` sets it after `cargo xtask dist`");
    };
    if std::process::Command::new("podman").arg("--version").output().is_err() {
        return skip(TEST, "podman is not installed (cargo xtask setup installs it)");
    }
    // Built here from the release directory, as the README says (FROM scratch: offline).
    let tag = format!("localhost/ntlm-splice-test:{}", std::process::id());
    let dist_dir = dist.display().to_string();
    ok(
        &podman(&[
            "build",
            "--pull=never",
            "--network=none",
            "-q",
            "-f",
            "deploy/Containerfile",
            "-t",
            &tag,
            &dist_dir,
        ])
        .await,
        "podman build",
    );
    let _image = scopeguard(tag.clone());
    let ntlm = ntlm_backend().await;
    let backend = ntlm.local_addr();
    for (i, engine) in harness::engines().iter().enumerate() {
        let listen = low_port_addr(i as u8);
        let metrics = SocketAddr::from((listen.ip(), 0));
        let dir = TempDir::new("deploy-image");
        let toml = format!(
            "[global]\ndrain_timeout = \"2s\"\n\n[metrics]\nlisten = \"{metrics}\"\n{}",
            config_route("t", &[&listen.to_string()], &[backend], &format!("engine = \"{engine}\"\n"))
        );
        let config = dir.write("ntlm-splice.toml", &toml);
        let mut caps = "net_bind_service,setuid,setgid,setpcap".to_owned();
        let mut extra: Vec<String> = Vec::new();
        if engine == "sockmap" {
            caps.push_str(",bpf,net_admin,perfmon");
            let profile = repo().join("deploy/container/seccomp-bpf.json");
            extra.extend(["--security-opt".into(), format!("seccomp={}", profile.display())]);
        }
        let name = format!("ntlm-splice-test-{}-{engine}", std::process::id());
        let container = Container(name.clone());
        let volume = format!("{}:{CONFIG_PATH}:ro", config.display());
        let mut args: Vec<&str> = vec!["run", "-d", "--runtime", "runc", "--name", &name, "--network", "host"];
        // podman sets these rlimits itself and, without CAP_SYS_RESOURCE, may not raise them:
        // values below the host's (README, Deployment).
        args.extend(["--ulimit", "nofile=8192:8192", "--ulimit", "nproc=4096:4096"]);
        args.extend(["--cap-drop", "all", "--cap-add", &caps]);
        args.extend(extra.iter().map(String::as_str));
        args.extend(["-v", &volume, &tag]);
        ok(&podman(&args).await, &format!("podman run ({engine})"));
        // Serving once the listener answers a login.
        within(QUICK, &format!("{engine}: the container's listener"), async {
            loop {
                if tokio::net::TcpStream::connect(listen).await.is_ok() {
                    return;
                }
                let state = podman(&["inspect", "-f", "{{.State.Running}}", &name]).await;
                if ok(&state, "podman inspect") != "true" {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let logs = podman(&["logs", &name]).await;
        let logs = format!("{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
        assert!(logs.contains(&format!("engine={engine}")), "{engine}: the container's log:\n{logs}");
        ntlm_login(listen, &format!("{engine} in the container")).await;
        // The process, seen from the host: the image's user after start-up.
        let pid: u32 = ok(&podman(&["inspect", "-f", "{{.State.Pid}}", &name]).await, "inspect").parse().unwrap();
        assert_eq!(uids(pid), (IMAGE_UID, IMAGE_UID), "{engine}: the container's process switched to uid {IMAGE_UID}");
        // Reload by SIGHUP, as documented.
        ok(&podman(&["kill", "--signal", "HUP", &name]).await, "podman kill --signal HUP");
        within(QUICK, "the reload", async {
            loop {
                let l = podman(&["logs", &name]).await;
                if [&l.stdout, &l.stderr].iter().any(|o| String::from_utf8_lossy(o).contains("reload: applied")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        ntlm_login(listen, &format!("{engine} in the container, after a reload")).await;
        drop(container);
    }
}

/// Removes the test's image when the test ends.
fn scopeguard(tag: String) -> impl Drop {
    struct Image(String);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::process::Command::new("podman").args(["rmi", "-f", &self.0]).output();
        }
    }
    Image(tag)
}

/// `podman exec NAME ARGS...`: (success, stdout + stderr).
async fn exec(name: &str, args: &[&str]) -> (bool, String) {
    let mut full = vec!["exec", name];
    full.extend_from_slice(args);
    let out = podman(&full).await;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `podman cp FROM NAME:TO`.
async fn cp(name: &str, from: &Path, to: &str) {
    let from = from.display().to_string();
    ok(&podman(&["cp", &from, &format!("{name}:{to}")]).await, &format!("podman cp {from}"));
}

/// Retries `f` until it returns `Some`, within `QUICK`.
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    within(QUICK, what, async {
        loop {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// `systemctl show -p PROPERTY --value ntlm-splice` in the container.
async fn unit_property(name: &str, property: &str) -> String {
    let (_, v) = exec(name, &["systemctl", "show", "-p", property, "--value", "ntlm-splice"]).await;
    v.trim().to_owned()
}

/// The unit's main process: not root, no_new_privs, only CAP_NET_BIND_SERVICE.
async fn main_process_is_unprivileged(name: &str, what: &str) {
    let pid = unit_property(name, "MainPID").await;
    let (_, status) = exec(name, &["cat", &format!("/proc/{pid}/status")]).await;
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or_default().to_owned();
    let uid = field("Uid:");
    assert!(!uid.is_empty() && uid.split_whitespace().take(2).all(|u| u != "0"), "{what}: runs as root: {uid}");
    assert_eq!(field("NoNewPrivs:"), "1", "{what}: no_new_privs");
    let cap_eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_eq!(cap_eff, 1 << 10, "{what}: CapEff is CAP_NET_BIND_SERVICE only:\n{status}");
}

/// A client connection to `addr` in the network namespace of host process `pid` (the
/// container's), made by a thread that joins it; then served by tokio here.
fn connect_in_netns_of(pid: u32, addr: SocketAddr) -> HttpConn {
    use std::os::fd::AsRawFd as _;
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    let stream = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor held open; it moves only this thread, which ends
            // right after the connect.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            std::net::TcpStream::connect_timeout(&addr, QUICK)
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
    .unwrap_or_else(|e| panic!("connect to {addr} in the container: {e}"));
    HttpConn::from_std(stream).expect("the connection, for tokio")
}

/// `N` after `key` in `text` (`pid=N`, `moved=N`).
fn number_after(text: &str, key: &str) -> Option<u32> {
    text.split(key).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A live upgrade under the unit (docs/upgrade.md, systemd): a client logged in with NTLM
/// on a kept-alive connection; `ntlm-splice upgrade --pid MainPID` as the unit's comment says.
/// Splice engine: systemd's MainPID becomes the new process (sent by the proxy: without
/// MAINPID systemd takes the old process's exit for the service's end and stops the new one),
/// the service stays active in the same invocation, never restarted; the old process exits;
/// the new one holds only what the old kept (CAP_NET_BIND_SERVICE, passed on); the kept
/// connection is served as itself with no new handshake (a new backend connection would
/// answer 401); a new login works. Sockmap engine (its drop-in): refused with the reason,
/// the same process serving on.
async fn live_upgrade_under_the_unit(name: &str, engine: &str, container_pid: u32, listen: SocketAddr, url: &str) {
    let alice = Credentials { domain: "EXAMPLE", user: "alice", password: ALICE.1 };
    let old = unit_property(name, "MainPID").await;
    let invocation = unit_property(name, "InvocationID").await;
    let mut kept = connect_in_netns_of(container_pid, listen);
    let r = within(QUICK, "login", kept.login("/whoami", &alice)).await.expect("login on the kept connection");
    assert_eq!((r.status, r.text().trim()), (200, ALICE.2), "{engine}: login on the kept connection");

    let journal = || async {
        let (_, j) = exec(name, &["journalctl", "-u", "ntlm-splice", "--no-pager", "-n", "60"]).await;
        j
    };
    if engine == "sockmap" {
        let (upgraded, text) = exec(name, &["/usr/local/bin/ntlm-splice", "upgrade", "--pid", &old]).await;
        assert!(!upgraded, "{engine}: the upgrade under the unit reported success: {text}");
        assert!(text.contains("sockmap engine is loaded") && text.contains("restart"), "{engine}: {text}");
        assert_eq!(unit_property(name, "MainPID").await, old, "{engine}: MainPID after a refused upgrade");
    } else {
        // The command, then (the new process upgrading in turn) the signal, both as the unit's
        // comment says.
        let mut main = old.clone();
        for how in ["ntlm-splice upgrade --pid", "systemctl kill -s USR2"] {
            let what = format!("{engine}, {how}");
            let before = main.clone();
            let new = if how.starts_with("ntlm-splice") {
                let (upgraded, text) = exec(name, &["/usr/local/bin/ntlm-splice", "upgrade", "--pid", &before]).await;
                assert!(upgraded, "{what}: under the unit: {text}\n{}", journal().await);
                number_after(&text, "pid=").unwrap_or_else(|| panic!("{what}: no pid in {text:?}")).to_string()
            } else {
                let (sent, text) =
                    exec(name, &["systemctl", "kill", "-s", "USR2", "--kill-whom=main", "ntlm-splice"]).await;
                assert!(sent, "{what}: {text}");
                let line = eventually(&format!("{what}: the upgrade is done"), || async {
                    journal()
                        .await
                        .lines()
                        .find(|l| l.contains(&format!("ntlm-splice[{before}]")) && l.contains(" serves; moved="))
                        .map(str::to_owned)
                })
                .await;
                number_after(&line, "pid=").unwrap_or_else(|| panic!("{what}: no pid in {line:?}")).to_string()
            };
            let moved = journal().await.lines().find_map(|l| {
                l.contains(&format!("pid={new} serves; moved=")).then(|| number_after(l, "moved=")).flatten()
            });
            assert!(moved.is_some_and(|m| m >= 1), "{what}: the kept connection moved\n{}", journal().await);
            assert_ne!(new, before, "{what}");
            eventually(&format!("{what}: the old process exits"), || async {
                (!exec(name, &["test", "-d", &format!("/proc/{before}")]).await.0).then_some(())
            })
            .await;
            main = unit_property(name, "MainPID").await;
            assert_eq!(main, new, "{what}: systemd's MainPID is the new process\n{}", journal().await);
            main_process_is_unprivileged(name, &format!("{what}: the new process")).await;
            let r = within(QUICK, "request", kept.get("/whoami")).await.expect("the kept connection after the upgrade");
            assert_eq!((r.status, r.text().trim()), (200, ALICE.2), "{what}: the kept connection, no new handshake");
        }
    }
    let state = [unit_property(name, "ActiveState").await, unit_property(name, "SubState").await];
    assert_eq!(state, ["active", "running"], "{engine}: the service after the upgrade\n{}", journal().await);
    assert_eq!(unit_property(name, "InvocationID").await, invocation, "{engine}: the service was restarted");
    assert_eq!(unit_property(name, "NRestarts").await, "0", "{engine}: NRestarts");
    assert_eq!(unit_property(name, "Result").await, "success", "{engine}: Result");

    let r = within(QUICK, "request", kept.get("/whoami")).await.expect("the kept connection after the upgrade");
    assert_eq!((r.status, r.text().trim()), (200, ALICE.2), "{engine}: the kept connection, with no new handshake");
    let user = format!("{}:{}", ALICE.0, ALICE.1);
    let (done, body) = exec(name, &["curl", "-sS", "--max-time", "10", "--ntlm", "-u", &user, url]).await;
    assert!(done && body.trim() == ALICE.2, "{engine}: a new login after the upgrade: {body}");
}

/// The unit for real: systemd as PID 1 in a podman container (the host's own root file
/// system as an overlay, so systemd, curl and ntlm-testd are the host's; its own network
/// namespace), the release binary installed as the unit says, the splice engine with the
/// unit alone and the sockmap engine with its drop-in: each serves a `curl --ntlm` login,
/// its main process runs unprivileged with no_new_privs and only CAP_NET_BIND_SERVICE left,
/// and `systemctl reload` applies. The container gets CAP_SYS_ADMIN (systemd sets up the
/// unit's namespaces: ProtectSystem and the rest) and the sockmap engine's capabilities;
/// the unit itself gets only what its files say.
#[tokio::test]
async fn systemd_unit_serves_ntlm_under_systemd() {
    const TEST: &str = "systemd_unit_serves_ntlm_under_systemd";
    if !is_root() {
        return skip(TEST, "needs root (podman running systemd)");
    }
    let Some(dist) = std::env::var_os("NTLM_SPLICE_TEST_DIST").map(PathBuf::from) else {
        return skip(TEST, "NTLM_SPLICE_TEST_DIST is unset: `cargo xtask test` sets it after `cargo xtask dist`");
    };
    if std::process::Command::new("podman").arg("--version").output().is_err() {
        return skip(TEST, "podman is not installed (cargo xtask setup installs it)");
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        return skip(TEST, "/lib/systemd/systemd is missing (apt-get install systemd)");
    }
    let name = format!("ntlm-splice-test-systemd-{}", std::process::id());
    let container = Container(name.clone());
    let mut args = vec!["run", "-d", "--runtime", "runc", "--name", &name, "--systemd=always"];
    args.extend(["--cap-add", "sys_admin,net_admin,bpf,perfmon"]);
    args.extend(["--ulimit", "nofile=8192:8192", "--ulimit", "nproc=4096:4096"]);
    // Fresh, empty /tmp and /run: systemd mode copies the host's into its tmpfs otherwise,
    // sockets included, which fails.
    for dir in ["/tmp:rw,notmpcopyup", "/run:rw,notmpcopyup", "/var/tmp:rw,notmpcopyup"] {
        args.extend(["--tmpfs", dir]);
    }
    args.extend(["--rootfs", "/:O", "/lib/systemd/systemd"]);
    ok(&podman(&args).await, "podman run (systemd)");
    eventually("systemd in the container is up", || async {
        let (_, state) = exec(&name, &["systemctl", "is-system-running"]).await;
        ["running", "degraded"].contains(&state.trim()).then_some(())
    })
    .await;

    // The backend, in the container's network namespace. Copied in: the build's own path can
    // be hidden inside (a checkout under /tmp is, by the container's fresh /tmp).
    let testd = "/usr/local/bin/ntlm-testd";
    cp(&name, Path::new(env!("CARGO_BIN_EXE_ntlm-testd")), testd).await;
    let backend = "127.0.0.1:18080";
    let (started, text) = exec(&name, &["systemd-run", "--unit", "ntlm-testd", testd, "--listen", backend]).await;
    assert!(started, "systemd-run ntlm-testd: {text}");

    // Installed as the unit's header says.
    cp(&name, &dist.join("bin/ntlm-splice"), "/usr/local/bin/ntlm-splice").await;
    cp(&name, &dist.join("deploy/systemd/ntlm-splice.service"), "/etc/systemd/system/ntlm-splice.service").await;
    for dir in ["/etc/ntlm-splice", "/etc/systemd/system/ntlm-splice.service.d"] {
        assert!(exec(&name, &["mkdir", "-p", dir]).await.0);
    }
    let listen = "127.0.0.1:443";
    let container_pid: u32 = ok(&podman(&["inspect", "-f", "{{.State.Pid}}", &name]).await, "inspect").parse().unwrap();
    for engine in harness::engines() {
        let dir = TempDir::new("deploy-systemd");
        let toml = format!(
            "[metrics]\nlisten = \"127.0.0.1:9100\"\n{}",
            config_route("t", &[listen], &[backend.parse().unwrap()], &format!("engine = \"{engine}\"\n"))
        );
        cp(&name, &dir.write("ntlm-splice.toml", &toml), CONFIG_PATH).await;
        assert!(exec(&name, &["chmod", "0644", CONFIG_PATH]).await.0);
        if engine == "sockmap" {
            cp(
                &name,
                &dist.join("deploy/systemd/ntlm-splice.service.d/sockmap.conf"),
                "/etc/systemd/system/ntlm-splice.service.d/",
            )
            .await;
        }
        assert!(exec(&name, &["systemctl", "daemon-reload"]).await.0);
        let (restarted, text) = exec(&name, &["systemctl", "restart", "ntlm-splice"]).await;
        let (_, journal) = exec(&name, &["journalctl", "-u", "ntlm-splice", "--no-pager", "-n", "40"]).await;
        assert!(restarted, "{engine}: systemctl restart: {text}\n{journal}");
        let url = format!("http://{listen}/whoami");
        let user = format!("{}:{}", ALICE.0, ALICE.1);
        let body = eventually(&format!("{engine}: a login through the unit"), || async {
            let (done, out) = exec(&name, &["curl", "-sS", "--max-time", "10", "--ntlm", "-u", &user, &url]).await;
            done.then_some(out)
        })
        .await;
        assert_eq!(body.trim(), ALICE.2, "{engine}: curl --ntlm through the unit");
        let (_, journal) = exec(&name, &["journalctl", "-u", "ntlm-splice", "--no-pager", "-n", "40"]).await;
        assert!(journal.contains(&format!("engine={engine}")), "{engine}: the journal:\n{journal}");

        main_process_is_unprivileged(&name, &engine).await;
        live_upgrade_under_the_unit(&name, &engine, container_pid, listen.parse().unwrap(), &url).await;

        // systemctl reload: ExecReload's SIGHUP.
        let (reloaded, text) = exec(&name, &["systemctl", "reload", "ntlm-splice"]).await;
        assert!(reloaded, "{engine}: systemctl reload: {text}");
        eventually(&format!("{engine}: the reload is applied"), || async {
            let (_, journal) = exec(&name, &["journalctl", "-u", "ntlm-splice", "--no-pager", "-n", "20"]).await;
            journal.contains("reload: applied").then_some(())
        })
        .await;
    }
    drop(container);
}
