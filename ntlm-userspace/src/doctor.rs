//! `ntlm-splice doctor`: placeholder until the eBPF engine lands.

/// Prints what this host supports.
pub fn run() -> anyhow::Result<()> {
    println!("eBPF engine: not built into this binary yet; --engine auto picks splice");
    Ok(())
}
