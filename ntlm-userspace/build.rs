//! Builds the sockmap engine's kernel programs (`ntlm-ebpf`) and leaves the object at
//! `$OUT_DIR/ntlm-ebpf`, where `src/engine/sockmap` embeds it.
//!
//! The eBPF build needs three things besides the default toolchain: the pinned nightly named
//! in `ntlm-ebpf/TOOLCHAIN` (its LLVM must match bpf-linker's), that nightly's `rust-src`
//! (for `-Z build-std=core`), and `bpf-linker` on PATH. `cargo xtask setup` installs all
//! three. When one is missing this script does NOT fail the build: it prints a
//! `cargo:warning=` naming what is missing and the command that fixes it, writes an empty
//! object, and sets `NTLM_EBPF_UNAVAILABLE=<reason>` so that the engine reports itself
//! unavailable at run time and `--engine auto` picks splice. When all three are present and
//! the eBPF build fails, the build fails: that is a bug in `ntlm-ebpf`.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The pinned nightly for the eBPF build. The same file is read by
/// `xtask/src/setup.rs` (`EBPF_TOOLCHAIN`), so the toolchain the build uses and the one the
/// setup installs cannot drift apart.
const EBPF_TOOLCHAIN: &str = include_str!("../ntlm-ebpf/TOOLCHAIN").trim_ascii();

/// The command that installs everything the eBPF build needs.
const SETUP_HINT: &str = "run `cargo xtask setup` (as root on Debian 12) to install it";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let ebpf_dir =
        manifest_dir.parent().ok_or_else(|| anyhow!("{} has no parent", manifest_dir.display()))?.join("ntlm-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("TOOLCHAIN").display());
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=RUSTUP_HOME");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");

    match missing_tools() {
        Some(reason) => unavailable(&out_dir, &reason),
        None => {
            let root_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
            let package = aya_build::Package { name: "ntlm-ebpf", root_dir, ..Default::default() };
            aya_build::build_ebpf([package], Toolchain::Custom(EBPF_TOOLCHAIN))
                .context("building the eBPF programs (ntlm-ebpf) failed although its toolchain is installed")
        }
    }
}

/// Why the eBPF object cannot be built here, or `None` when everything is in place.
/// Cheap: a PATH scan and one `rustup run ... rustc --print sysroot`.
fn missing_tools() -> Option<String> {
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Some("AYA_BUILD_SKIP is set, so the eBPF object was not built".into());
    }
    let Some(rustup) = find_in_path("rustup") else {
        return Some(format!(
            "rustup is not on PATH; the eBPF build needs the pinned toolchain {EBPF_TOOLCHAIN} through rustup \
             (install rustup from https://rustup.rs, then {SETUP_HINT})"
        ));
    };
    watch_rustup_toolchains();
    let sysroot = Command::new(&rustup)
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        // Never let a build script download a toolchain behind the user's back.
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output();
    let sysroot = match sysroot {
        Ok(out) if out.status.success() => PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        _ => {
            return Some(format!(
                "the pinned eBPF toolchain {EBPF_TOOLCHAIN} is not installed; {SETUP_HINT}, or run \
                 `rustup toolchain install {EBPF_TOOLCHAIN} --profile minimal -c rust-src`"
            ));
        }
    };
    let components = sysroot.join("lib/rustlib/components");
    println!("cargo:rerun-if-changed={}", components.display());
    if !sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").is_file() {
        return Some(format!(
            "the toolchain {EBPF_TOOLCHAIN} lacks rust-src (needed for -Z build-std=core); {SETUP_HINT}, or run \
             `rustup component add rust-src --toolchain {EBPF_TOOLCHAIN}`"
        ));
    }
    match find_in_path("bpf-linker") {
        Some(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        None => {
            watch_cargo_bin();
            return Some(format!(
                "bpf-linker is not on PATH; {SETUP_HINT}, or run `apt-get install -y llvm-22-dev && \
                 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker \
                 --version 0.13.0 --locked --no-default-features --features llvm-22`"
            ));
        }
    }
    None
}

/// Leaves an empty object and the reason for the engine, and tells the user.
fn unavailable(out_dir: &Path, reason: &str) -> anyhow::Result<()> {
    println!("cargo:warning=ntlm-splice is built WITHOUT the sockmap (eBPF) engine: {reason}");
    let object = out_dir.join("ntlm-ebpf");
    fs::write(&object, b"").with_context(|| format!("writing {}", object.display()))?;
    // A single line: cargo takes the value up to the end of the line.
    println!("cargo:rustc-env=NTLM_EBPF_UNAVAILABLE={}", reason.replace('\n', " "));
    Ok(())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let paths = env::var_os("PATH")?;
    env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// Rebuild once a toolchain is installed: rustup records each installed toolchain in
/// `$RUSTUP_HOME/update-hash/` (a small directory, cheap for cargo to scan).
fn watch_rustup_toolchains() {
    let home = env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")));
    if let Some(dir) = home.map(|h| h.join("update-hash"))
        && dir.is_dir()
    {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
}

/// Rebuild once bpf-linker is installed by `cargo install` (into `$CARGO_HOME/bin`).
fn watch_cargo_bin() {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(dir) = home.map(|h| h.join("bin"))
        && dir.is_dir()
    {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
}
