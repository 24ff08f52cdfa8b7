//! Toolchain set-up for the eBPF build (placeholder; replaced by the eBPF pipeline work).

/// Installs what the eBPF build needs, if missing.
pub fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    Ok(())
}
