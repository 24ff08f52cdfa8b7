//! Installs what the eBPF build needs, each piece only if it is missing:
//!
//! 1. the pinned nightly toolchain with `rust-src` (for `-Z build-std=core`);
//! 2. Debian's `llvm-22-dev` (bpf-linker links the system libLLVM 22, the LLVM of that nightly);
//! 3. `bpf-linker`, built against it.
//!
//! The checks are file lookups (microseconds), so every `cargo xtask` command can call
//! [`ensure_ebpf_toolchain`] first. rustup's auto-install is off on the machines this
//! project targets, so nothing else installs the toolchain.
//!
//! Without these the userspace still builds (see `ntlm-userspace/build.rs`); only the
//! sockmap engine is then missing.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The nightly that builds `ntlm-ebpf`. Read from `ntlm-ebpf/TOOLCHAIN`, the file
/// `ntlm-userspace/build.rs` also includes, so the toolchain installed here is always the one
/// the build asks for. Its LLVM (22) must match the system LLVM bpf-linker links against.
pub const EBPF_TOOLCHAIN: &str = include_str!("../../ntlm-ebpf/TOOLCHAIN").trim_ascii();
/// Debian package providing libLLVM 22 and its headers.
pub const LLVM_PACKAGE: &str = "llvm-22-dev";
/// Where Debian installs LLVM 22.
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// bpf-linker release known to build against LLVM 22 with the `llvm-22` feature; pinned so
/// that a newer release moving to another LLVM cannot break a fresh set-up.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs the eBPF toolchain pieces that are missing and prints one line per step.
pub fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    let rustup = find_program("rustup").context(
        "rustup is not installed: install it from https://rustup.rs (the eBPF build needs a pinned nightly)",
    )?;
    if toolchain_ready() {
        println!("setup: toolchain {EBPF_TOOLCHAIN} with rust-src: present");
    } else {
        println!("setup: installing toolchain {EBPF_TOOLCHAIN} with rust-src");
        run(Command::new(&rustup).args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "-c",
            "rust-src",
        ]))?;
        if !toolchain_ready() {
            bail!(
                "rustup installed {EBPF_TOOLCHAIN} but its rust-src is not where expected ({}); run \
                 `rustup component add rust-src --toolchain {EBPF_TOOLCHAIN}`",
                rust_src_marker().display()
            );
        }
    }

    if llvm_ready() {
        println!("setup: {LLVM_PACKAGE}: present");
    } else {
        if !is_root() {
            bail!(
                "{LLVM_PACKAGE} is missing and installing it needs root. Run:\n  \
                 sudo apt-get install -y {LLVM_PACKAGE}   # after `sudo apt-get update` if it is not found\n\
                 then `cargo xtask setup` again (it then runs: {})",
                bpf_linker_command_line()
            );
        }
        println!("setup: installing {LLVM_PACKAGE} (apt-get)");
        if run(&mut apt_install()).is_err() {
            println!("setup: {LLVM_PACKAGE} not installable yet; running apt-get update first");
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(&mut apt_install()).with_context(|| {
                format!("apt-get cannot install {LLVM_PACKAGE}: Debian 12 needs a source that has it (bookworm-backports or apt.llvm.org)")
            })?;
        }
        if !llvm_ready() {
            bail!("{LLVM_PACKAGE} installed but {} is missing", llvm_lib().display());
        }
    }

    if let Some(linker) = find_program("bpf-linker") {
        println!("setup: bpf-linker: present ({})", linker.display());
    } else {
        println!("setup: installing bpf-linker {BPF_LINKER_VERSION} against {LLVM_PREFIX} (takes ~3 minutes)");
        let cargo = env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
        run(Command::new(cargo)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            // llvm-sys reads the first; bpf-linker's own build script the second (without
            // it, it follows `llvm-config` on PATH, which on Debian is LLVM 14 in /usr).
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
        if find_program("bpf-linker").is_none() {
            bail!("bpf-linker was installed but is not on PATH: add {} to PATH", cargo_bin().display());
        }
    }
    Ok(())
}

fn bpf_linker_command_line() -> String {
    format!(
        "LLVM_SYS_221_PREFIX={LLVM_PREFIX} LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version \
         {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-22"
    )
}

fn apt_install() -> Command {
    let mut c = Command::new("apt-get");
    c.args(["install", "-y", "-qq", LLVM_PACKAGE]).env("DEBIAN_FRONTEND", "noninteractive");
    c
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn home_dir(var: &str, default_under_home: &str) -> PathBuf {
    env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(default_under_home))
}

fn cargo_bin() -> PathBuf {
    home_dir("CARGO_HOME", ".cargo").join("bin")
}

/// `name` on PATH, or in `$CARGO_HOME/bin` (where rustup and cargo install put binaries).
fn find_program(name: &str) -> Option<PathBuf> {
    let on_path =
        env::var_os("PATH").and_then(|paths| env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()));
    on_path.or_else(|| Some(cargo_bin().join(name)).filter(|p| p.is_file()))
}

/// The file whose presence says the pinned toolchain has rust-src.
fn rust_src_marker() -> PathBuf {
    let host = format!("{}-unknown-linux-gnu", env::consts::ARCH);
    home_dir("RUSTUP_HOME", ".rustup")
        .join("toolchains")
        .join(format!("{EBPF_TOOLCHAIN}-{host}"))
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
}

fn toolchain_ready() -> bool {
    rust_src_marker().is_file()
}

fn llvm_lib() -> PathBuf {
    Path::new(LLVM_PREFIX).join("lib/libLLVM.so")
}

fn llvm_ready() -> bool {
    llvm_lib().exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_is_a_dated_nightly() {
        // LLVM must match bpf-linker's: a floating `nightly` would drift to a new LLVM.
        assert!(EBPF_TOOLCHAIN.starts_with("nightly-20"), "{EBPF_TOOLCHAIN}");
        assert!(!EBPF_TOOLCHAIN.contains(char::is_whitespace));
    }
}
