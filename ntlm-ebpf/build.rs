//! Building this crate for the BPF target has an undeclared dependency on the `bpf-linker`
//! binary (rustc's `bpfel-unknown-none` target links with it). As in aya-template, ask cargo
//! to rebuild when that binary changes, but unlike the template never fail when it is
//! missing: this crate is also compiled for the host (as a build-dependency of
//! `ntlm-userspace`, so that edits here rebuild the embedded object), and a host without
//! bpf-linker must still build. `ntlm-userspace/build.rs` decides whether the eBPF object
//! can be built and says what to install when not.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    let found = env::var_os("PATH")
        .and_then(|paths| env::split_paths(&paths).map(|dir| dir.join("bpf-linker")).find(|p: &PathBuf| p.is_file()));
    if let Some(linker) = found {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
