//! ntlm-splice: a TCP splicer that pairs every client connection with exactly one backend
//! connection of its own, for connection-authenticated services (NTLM, Negotiate).
//!
//! `main` parses the command line and calls [`server::run`]; tests call the same code.

pub mod balance;
pub mod config;
pub mod conn;
pub mod doctor;
pub mod engine;
pub mod guard;
pub mod health;
pub mod identity;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod ntlm;
pub mod park;
pub mod privilege;
pub mod proxy_proto;
pub mod route;
pub mod server;
pub mod sni;
pub mod sys;
pub mod upgrade;
