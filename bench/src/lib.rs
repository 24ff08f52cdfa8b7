//! Load generator and loopback backend for `cargo xtask bench`.
//!
//! The library part is what the xtask shares with the binary: the wire header that tells
//! the backend what to do with a connection ([`proto`]), the JSON report one client run
//! prints ([`report`]), the /proc readers both sides use ([`procfs`]) and the pacing both
//! senders of the edge workload set ([`pace`]).

pub mod pace;
pub mod procfs;
pub mod proto;
pub mod report;
