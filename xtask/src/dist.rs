//! `cargo xtask dist [--image]`: the release build.
//!
//! 1. A static binary (`x86_64-unknown-linux-musl`, the target installed by rustup when
//!    missing) with the sockmap engine's eBPF object embedded; its `doctor` must report the
//!    object embedded (and, as root, the engine available).
//! 2. A reproducible tarball `dist/ntlm-splice-VERSION-x86_64.tar.gz`: the binary, `deploy/`
//!    (Containerfile, systemd unit and drop-ins, Kubernetes manifests, the config) and the
//!    README's deployment section. Reproducible: the same commit gives the same bytes in any
//!    checkout directory. Every path rustc could embed (the checkout, `$CARGO_HOME`,
//!    `$RUSTUP_HOME`) is remapped, in the userspace build and in the eBPF object's debug
//!    information (BTF) alike, through a rustc wrapper: aya-build sets the nested eBPF build's
//!    `CARGO_ENCODED_RUSTFLAGS` itself, but keeps `RUSTC_WRAPPER`. tar gets a sorted file list,
//!    the last commit's time for every mtime (`SOURCE_DATE_EPOCH`), owner 0 and fixed modes;
//!    gzip no name or time.
//! 3. With `--image`, the container image `localhost/ntlm-splice:VERSION` (podman, FROM
//!    scratch, no registry pulls) built from the unpacked tarball's directory.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{apt_install, cargo, check, is_root, root};

/// The static target.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Set (to the remapping arguments, one per line) when xtask runs as the rustc wrapper.
const WRAPPER_VAR: &str = "NTLM_SPLICE_DIST_REMAP";
/// Where the dist build keeps its artifacts: apart from `target/release`, whose host
/// artifacts a different `RUSTC_WRAPPER` would otherwise rebuild every time.
const TARGET_DIR: &str = "target/dist";
/// The prefixes the remapped paths get.
const REMAP_ROOT: &str = "/build/ntlm-splice";

#[derive(clap::Args)]
pub struct DistArgs {
    /// Also build the container image (podman; installed by apt-get when missing).
    #[arg(long)]
    image: bool,
}

/// When xtask is started as the rustc wrapper (`RUSTC_WRAPPER`), runs rustc with the
/// remapping arguments added and exits; otherwise returns.
pub fn maybe_wrap_rustc() {
    let Some(remap) = env::var_os(WRAPPER_VAR) else { return };
    let mut args = env::args_os().skip(1);
    let Some(rustc) = args.next() else { return };
    let mut cmd = Command::new(rustc);
    cmd.args(args);
    // Not for `rustc -vV` and the like: cargo asks those for the compiler's version.
    if env::args_os().any(|a| a == "--crate-name") {
        for line in remap.to_string_lossy().lines().filter(|l| !l.is_empty()) {
            cmd.arg(format!("--remap-path-prefix={line}"));
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        eprintln!("xtask (rustc wrapper): cannot start rustc: {e}");
        std::process::exit(101)
    });
    std::process::exit(status.code().unwrap_or(101));
}

/// Makes the release; returns the unpacked release directory (what the image is built from).
pub fn run(args: DistArgs) -> anyhow::Result<PathBuf> {
    crate::setup::ensure_ebpf_toolchain()?;
    ensure_musl_target()?;
    let root = root();
    let version = package_version(&root)?;
    let epoch = source_date_epoch(&root)?;
    let binary = build_static(&root)?;
    check_binary(&binary)?;

    let name = format!("ntlm-splice-{version}-x86_64");
    let dist = root.join("dist");
    let stage = dist.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    stage_files(&root, &binary, &stage)?;
    let tarball = dist.join(format!("{name}.tar.gz"));
    make_tarball(&dist, &name, &tarball, epoch)?;
    let sha = sha256(&tarball)?;
    println!("dist: {} (sha256 {sha})", tarball.display());
    println!("dist: unpacked in {}", stage.display());
    if args.image {
        let tag = format!("localhost/ntlm-splice:{version}");
        build_image(&stage, &tag, epoch)?;
        println!("dist: image {tag}");
    }
    Ok(stage)
}

/// For `cargo xtask test`: the release without the image (the deployment suite builds its
/// own from the returned directory).
pub fn for_tests() -> anyhow::Result<PathBuf> {
    run(DistArgs { image: false })
}

/// rustup's musl target, installed when missing (rustup's auto-install is off here).
fn ensure_musl_target() -> anyhow::Result<()> {
    let out = Command::new("rustup").args(["target", "list", "--installed"]).output().context("rustup")?;
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == MUSL_TARGET) {
        println!("dist: rust target {MUSL_TARGET}: present");
        return Ok(());
    }
    println!("dist: installing rust target {MUSL_TARGET}");
    check(Command::new("rustup").args(["target", "add", MUSL_TARGET]).status(), "rustup target add")
}

/// The userspace crate's version, from its manifest.
fn package_version(root: &Path) -> anyhow::Result<String> {
    let manifest = fs::read_to_string(root.join("ntlm-userspace/Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = ").map(|v| v.trim_matches('"').to_owned()))
        .context("ntlm-userspace/Cargo.toml has no version line")
}

/// `SOURCE_DATE_EPOCH` when set, else the last commit's time.
fn source_date_epoch(root: &Path) -> anyhow::Result<u64> {
    if let Ok(v) = env::var("SOURCE_DATE_EPOCH") {
        return v.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"));
    }
    let out = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output()
        .context("git log (for SOURCE_DATE_EPOCH)")?;
    if !out.status.success() {
        bail!("git log failed: not a git checkout? Set SOURCE_DATE_EPOCH to the release time in seconds instead");
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().context("git log printed no commit time")
}

fn home(var: &str, under_home: &str) -> PathBuf {
    env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(under_home))
}

/// The remapping lines `FROM=TO` for the wrapper.
fn remaps(root: &Path) -> String {
    [
        (root.to_path_buf(), REMAP_ROOT),
        (home("CARGO_HOME", ".cargo"), "/cargo"),
        (home("RUSTUP_HOME", ".rustup"), "/rustup"),
    ]
    .iter()
    .map(|(from, to)| format!("{}={to}\n", from.display()))
    .collect()
}

/// Builds the static binary and returns its path.
fn build_static(root: &Path) -> anyhow::Result<PathBuf> {
    let me = env::current_exe().context("the path of xtask itself (the rustc wrapper)")?;
    let target_dir = root.join(TARGET_DIR);
    println!("dist: building the static binary ({MUSL_TARGET}, in {TARGET_DIR}; a full build: minutes)");
    let mut rustflags = OsString::from("-Ctarget-feature=+crt-static\x1f-Cstrip=symbols");
    if let Some(extra) = env::var_os("NTLM_SPLICE_DIST_RUSTFLAGS") {
        rustflags.push("\x1f");
        rustflags.push(extra);
    }
    let status = cargo()
        .args(["build", "--release", "--locked", "-p", "ntlm-userspace", "--bin", "ntlm-splice"])
        .args(["--target", MUSL_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_WRAPPER", &me)
        .env(WRAPPER_VAR, remaps(root))
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        .status();
    check(status, "cargo build (static musl binary)")?;
    Ok(target_dir.join(MUSL_TARGET).join("release/ntlm-splice"))
}

/// The binary is static, and `doctor` says the eBPF object is in it (and, as root, that the
/// sockmap engine loads here).
fn check_binary(binary: &Path) -> anyhow::Result<()> {
    let out = Command::new("file").arg(binary).output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("statically linked") && !text.contains("static-pie linked") {
            bail!("{} is not statically linked: {text}", binary.display());
        }
    }
    let out = Command::new(binary).arg("doctor").output().with_context(|| format!("{} doctor", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned);
    match value("ebpf_object") {
        Some(v) if v.starts_with("\"embedded") => println!("dist: doctor: ebpf_object={v}"),
        other => bail!(
            "the static binary has no eBPF object (doctor: ebpf_object={}); run `cargo xtask setup` and retry",
            other.unwrap_or_default()
        ),
    }
    if is_root() {
        match value("sockmap_engine").as_deref() {
            Some("available") => println!("dist: doctor: sockmap_engine=available"),
            other => bail!(
                "the static binary's sockmap engine does not load here (doctor: sockmap_engine={other:?}):\n{text}"
            ),
        }
    }
    Ok(())
}

/// The tarball's directory: `bin/ntlm-splice`, `deploy/`, `README-deployment.md`, each file
/// 0644 (the binary 0755), each directory 0755, whatever the checkout's umask was.
fn stage_files(root: &Path, binary: &Path, stage: &Path) -> anyhow::Result<()> {
    let copy = |from: &Path, to: &Path, mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    copy(binary, &stage.join("bin/ntlm-splice"), 0o755)?;
    let mut files = Vec::new();
    walk(&root.join("deploy"), &mut files)?;
    for f in &files {
        let rel = f.strip_prefix(root)?;
        copy(f, &stage.join(rel), 0o644)?;
    }
    copy(&root.join("docs/examples/ntlm-splice.toml"), &stage.join("deploy/ntlm-splice.example.toml"), 0o644)?;
    let readme = fs::read_to_string(root.join("README.md"))?;
    let excerpt = readme_section(&readme, "## Deployment")
        .context("README.md has no `## Deployment` section for the tarball's README-deployment.md")?;
    fs::write(stage.join("README-deployment.md"), excerpt)?;
    set_dir_modes(stage)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn set_dir_modes(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            set_dir_modes(&p)?;
        }
    }
    Ok(())
}

/// The section that starts at the heading line `heading`, up to the next heading of the
/// same level.
pub fn readme_section(readme: &str, heading: &str) -> Option<String> {
    let start = readme.find(&format!("\n{heading}\n"))? + 1;
    let rest = &readme[start + heading.len()..];
    let end = rest.find("\n## ").map_or(readme.len(), |i| start + heading.len() + i + 1);
    Some(readme[start..end].to_owned())
}

fn make_tarball(dist: &Path, name: &str, tarball: &Path, epoch: u64) -> anyhow::Result<()> {
    let tar = dist.join(format!("{name}.tar"));
    let status = Command::new("tar")
        .args(["--sort=name", "--format=gnu", "--owner=0", "--group=0", "--numeric-owner"])
        .arg(format!("--mtime=@{epoch}"))
        .arg("-cf")
        .arg(&tar)
        .arg(name)
        .current_dir(dist)
        .env("LC_ALL", "C")
        .status();
    check(status, "tar")?;
    let gz = fs::File::create(tarball)?;
    let status = Command::new("gzip").args(["-n", "-9", "-c"]).arg(&tar).stdout(gz).status();
    check(status, "gzip")?;
    fs::remove_file(&tar)?;
    Ok(())
}

fn sha256(file: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(file).output().context("sha256sum")?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned())
}

/// podman (with runc: crun refuses on hosts with hybrid cgroups), installed when missing.
pub fn ensure_podman() -> anyhow::Result<()> {
    let have = |p: &str| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    let mut missing = Vec::new();
    if !have("podman") {
        missing.push("podman");
    }
    if !have("runc") {
        missing.push("runc");
    }
    if !Path::new("/usr/bin/newuidmap").exists() {
        missing.push("uidmap");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(())
}

fn build_image(stage: &Path, tag: &str, epoch: u64) -> anyhow::Result<()> {
    ensure_podman()?;
    println!("dist: podman build {tag} (FROM scratch: no registry pulls)");
    let status = Command::new("podman")
        .args(["build", "--pull=never", "--network=none", "--timestamp"])
        .arg(epoch.to_string())
        .args(["-f", "deploy/Containerfile", "-t", tag, "."])
        .current_dir(stage)
        .status();
    check(status, "podman build")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_section_stops_at_the_next_heading_of_its_level() {
        let text = "# T\n\n## A\na\n### A.1\nb\n## Deployment\nx\n### Sub\ny\n## Next\nz\n";
        assert_eq!(readme_section(text, "## Deployment").unwrap(), "## Deployment\nx\n### Sub\ny\n");
        let last = "# T\n## Deployment\nx\n";
        assert_eq!(readme_section(last, "## Deployment").unwrap(), "## Deployment\nx\n");
        assert!(readme_section(text, "## Missing").is_none());
    }
}
