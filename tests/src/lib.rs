//! End-to-end test support: the proxy harness, loopback test servers, HAProxy as a PROXY
//! protocol peer, hand-written PROXY headers, and the NTLM test backend (`ntlm-testd`).
pub mod haproxy;
pub mod harness;
pub mod ntlm;
pub mod proxy_header;
pub mod servers;
