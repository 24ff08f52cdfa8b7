//! End-to-end test support: the proxy harness, loopback test servers, network namespaces
//! for the tests that need real addresses, and the NTLM test backend (`ntlm-testd`).
pub mod harness;
pub mod netns;
pub mod ntlm;
pub mod servers;
