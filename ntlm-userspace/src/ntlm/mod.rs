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
//! No credential, challenge, response, session key or token leaves this module, in a value,
//! an error or a `Debug` output; nothing here logs.

pub mod http;
pub mod message;

pub use message::Names;

#[cfg(test)]
#[path = "tests/fixtures.rs"]
mod fixtures;
