//! End-to-end test support: the proxy harness, loopback test servers, network namespaces
//! for the tests that need real addresses, HAProxy as a PROXY protocol peer, hand-written
//! PROXY headers, and the NTLM test backend (`ntlm-testd`).
pub mod haproxy;
pub mod harness;
pub mod netns;
pub mod ntlm;
pub mod proxy_header;
pub mod servers;
