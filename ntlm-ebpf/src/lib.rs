#![no_std]
// This file exists to enable the library target, so that ntlm-userspace can name this
// crate as a build-dependency and cargo rebuilds the eBPF object when it changes.
