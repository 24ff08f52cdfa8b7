//! End-to-end test support: the proxy harness, loopback test servers, network namespaces
//! for the tests that need real addresses, HAProxy as a PROXY protocol peer, hand-written
//! PROXY headers, the metrics endpoint as scraped, the NTLM test backend (`ntlm-testd`), and real HTTP clients (curl,
//! requests-ntlm) to run against it.
pub mod clients;
pub mod haproxy;
pub mod harness;
pub mod metrics;
pub mod netns;
pub mod ntlm;
pub mod proxy_header;
pub mod servers;
