//! End-to-end test support: the proxy harness, loopback test servers, and the NTLM test
//! backend (`ntlm-testd`).
pub mod harness;
pub mod ntlm;
pub mod servers;
