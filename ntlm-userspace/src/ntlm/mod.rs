//! The NTLM observer's building blocks (issue 16): on a plain-HTTP route, the first requests
//! and responses of a connection are relayed in userspace and read until the NTLM (or
//! Negotiate-wrapped NTLM) login on it is decided, then the route's engine carries the rest.
//!
//! - [`message`]: the NTLM message in an `Authorization` token (raw, or inside SPNEGO),
//!   strictly parsed; only the AUTHENTICATE message's names are kept, escaped for the log.
//! - [`http`]: incremental HTTP/1.x head scanners, one per direction.
//! - [`observe()`]: the relay that feeds them and says when to stop, with the byte counts
//!   the engine starts from and the login seen.
//!
//! [`observe()`] returns names, a result and byte counts only: the tokens the scanner finds
//! are decoded and dropped inside it. No error or `Debug` output carries a token, challenge,
//! response or key, and nothing here logs.

pub mod http;
pub mod message;
pub mod observe;

pub use message::Names;
pub use observe::{Judge, Login, LoginResult, ObserveLimits, Observed, Stop, observe};

#[cfg(test)]
#[path = "tests/fixtures.rs"]
mod fixtures;
