//! An NTLM test backend that behaves like IIS with Windows Authentication.
//!
//! NTLM authenticates the TCP connection, not the request: after a successful
//! NEGOTIATE / CHALLENGE / AUTHENTICATE handshake, IIS serves every later request on
//! that connection as the logged-in user without any `Authorization` header, and a new
//! connection starts anonymous. That is exactly the property a proxy can break (by
//! pooling or re-using backend connections), so this server reproduces it faithfully:
//!
//! - a request without credentials on an anonymous connection gets `401` with
//!   `WWW-Authenticate: Negotiate` and `WWW-Authenticate: NTLM`, a short body, and the
//!   connection stays open;
//! - a NEGOTIATE (type 1) token under `NTLM` or `Negotiate` gets `401` with the
//!   CHALLENGE (type 2) under the same scheme;
//! - an AUTHENTICATE (type 3) is checked as NTLMv2 against the in-memory user table
//!   (NTLMv1 is refused); success serves the request, failure gets a fresh `401`;
//! - `GET /whoami` and `GET /` answer `DOMAIN\user\n`; other paths 404 once
//!   authenticated, 401 before.
//!
//! Credentials, NTLM messages and passwords are never logged nor shown by `Debug`;
//! only `user=` appears, at debug level.

pub mod auth;
pub mod client;
pub mod crypto;
pub mod http;
pub mod message;
pub mod server;

use std::fmt;

pub use auth::Identity;
pub use client::HttpConn;
pub use message::Credentials;
pub use server::NtlmServer;

/// The domain served when none is configured.
pub const DEFAULT_DOMAIN: &str = "EXAMPLE";

/// An account of the test backend. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// Account name, matched case-insensitively and reported as written here.
    pub name: String,
    /// Clear-text password.
    pub password: String,
}

impl User {
    /// A user named `name` with `password`.
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> User {
        User {
            name: name.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// alice / bob / carol with passwords `Alice-Pass-1`, `Bob-Pass-2`, `Carol-Pass-3`.
pub fn demo_users() -> Vec<User> {
    vec![
        User::new("alice", "Alice-Pass-1"),
        User::new("bob", "Bob-Pass-2"),
        User::new("carol", "Carol-Pass-3"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_debug_hides_the_password() {
        let debug = format!("{:?}", demo_users());
        assert!(
            debug.contains("alice") && !debug.contains("Alice-Pass-1"),
            "{debug}"
        );
    }
}
