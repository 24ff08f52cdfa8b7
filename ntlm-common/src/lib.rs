#![no_std]
//! Types shared by the kernel programs (`ntlm-ebpf`) and userspace (`ntlm-userspace`).
