//! The server side of the NTLM handshake: issuing challenges and checking NTLMv2
//! AUTHENTICATE messages against the in-memory user table.

use std::fmt;

use super::User;
use super::crypto;
use super::message::{self, NtlmError, ServerNames};

/// NetBIOS name of the test server.
pub const COMPUTER_NAME: &str = "NTLMTESTD";
/// DNS suffix appended to the lower-cased domain to make the DNS names.
const DNS_SUFFIX: &str = "test";

/// Why an AUTHENTICATE message was refused. Never carries credential material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthFailure {
    /// The token is not a well-formed NTLM message.
    #[error("malformed NTLM message")]
    Malformed(#[from] NtlmError),
    /// An AUTHENTICATE arrived without a CHALLENGE issued on this connection.
    #[error("AUTHENTICATE without a preceding CHALLENGE on this connection")]
    NoChallenge,
    /// Anonymous authentication (empty user name).
    #[error("anonymous NTLM authentication is not allowed")]
    Anonymous,
    /// NTLMv1 or NTLM2-session responses (24 bytes); only NTLMv2 is accepted.
    #[error("NTLMv1 response refused; only NTLMv2 is accepted")]
    NtlmV1,
    /// The user is not in the table.
    #[error("unknown user")]
    UnknownUser,
    /// The domain is neither the configured one nor empty.
    #[error("wrong domain")]
    WrongDomain,
    /// The NTProofStr does not match (wrong password, or tampered message).
    #[error("NTLMv2 proof does not match (wrong password?)")]
    BadProof,
}

/// The accounts and names a server authenticates against. `Debug` hides passwords.
#[derive(Clone)]
pub struct Directory {
    names: ServerNames,
    users: Vec<User>,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("domain", &self.names.nb_domain)
            .field(
                "users",
                &self
                    .users
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A successful login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The configured domain, upper case.
    pub domain: String,
    /// The user name as written in the table.
    pub user: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\\{}", self.domain, self.user)
    }
}

/// The outcome of checking an AUTHENTICATE message: the user name the client claimed
/// (for logging) and the verdict.
#[derive(Debug)]
pub struct Verdict {
    /// UserName from the message, if it could be parsed.
    pub claimed_user: Option<String>,
    /// DomainName from the message, if it could be parsed.
    pub claimed_domain: Option<String>,
    /// Workstation from the message, if it could be parsed.
    pub workstation: Option<String>,
    /// The identity, or why not.
    pub result: Result<Identity, AuthFailure>,
}

impl Directory {
    /// A directory for `domain` (stored upper case) with `users`.
    pub fn new(domain: &str, users: Vec<User>) -> Directory {
        let nb_domain = domain.to_uppercase();
        let dns_domain = format!("{}.{DNS_SUFFIX}", domain.to_lowercase());
        let names = ServerNames {
            dns_computer: format!("{}.{dns_domain}", COMPUTER_NAME.to_lowercase()),
            nb_domain,
            nb_computer: COMPUTER_NAME.to_owned(),
            dns_domain,
        };
        Directory { names, users }
    }

    /// The configured domain, upper case.
    pub fn domain(&self) -> &str {
        &self.names.nb_domain
    }

    /// The user names, in table order.
    pub fn user_names(&self) -> impl Iterator<Item = &str> {
        self.users.iter().map(|u| u.name.as_str())
    }

    /// Answers a NEGOTIATE message: returns the CHALLENGE message to send and the
    /// server challenge to remember for this connection.
    pub fn challenge(
        &self,
        negotiate: &[u8],
        server_challenge: [u8; 8],
    ) -> Result<Vec<u8>, AuthFailure> {
        let negotiate = message::parse_negotiate(negotiate)?;
        let flags = message::challenge_flags(negotiate.flags);
        Ok(message::challenge_message(
            flags,
            &server_challenge,
            &self.names,
            crypto::filetime_now(),
        ))
    }

    /// Checks an AUTHENTICATE message answering `server_challenge`.
    pub fn verify(&self, server_challenge: &[u8; 8], authenticate: &[u8]) -> Verdict {
        let msg = match message::parse_authenticate(authenticate) {
            Ok(msg) => msg,
            Err(e) => {
                return Verdict {
                    claimed_user: None,
                    claimed_domain: None,
                    workstation: None,
                    result: Err(e.into()),
                };
            }
        };
        let result = self.check(server_challenge, &msg);
        Verdict {
            claimed_user: Some(msg.user),
            claimed_domain: Some(msg.domain),
            workstation: Some(msg.workstation),
            result,
        }
    }

    fn check(
        &self,
        server_challenge: &[u8; 8],
        msg: &message::Authenticate,
    ) -> Result<Identity, AuthFailure> {
        if msg.user.is_empty() {
            return Err(AuthFailure::Anonymous);
        }
        if msg.nt_response.len() <= message::NTLMV1_RESPONSE_LEN {
            return Err(AuthFailure::NtlmV1);
        }
        if !msg.domain.is_empty() && !msg.domain.eq_ignore_ascii_case(&self.names.nb_domain) {
            return Err(AuthFailure::WrongDomain);
        }
        // Windows account names are case-insensitive.
        let user = self
            .users
            .iter()
            .find(|u| u.name.to_lowercase() == msg.user.to_lowercase())
            .ok_or(AuthFailure::UnknownUser)?;
        // The client hashed the user and domain strings exactly as it sent them.
        if !crypto::verify_ntlmv2(
            &user.password,
            &msg.user,
            &msg.domain,
            server_challenge,
            &msg.nt_response,
        ) {
            return Err(AuthFailure::BadProof);
        }
        Ok(Identity {
            domain: self.names.nb_domain.clone(),
            user: user.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntlm::crypto::tests::SERVER_CHALLENGE;
    use crate::ntlm::message::{Credentials, flags};

    fn spec_directory(password: &str) -> Directory {
        Directory::new(
            "Domain",
            vec![User {
                name: "User".into(),
                password: password.into(),
            }],
        )
    }

    #[test]
    fn accepts_the_ms_nlmp_authenticate_message() {
        let msg = crate::ntlm::message::tests::ms_nlmp_authenticate();
        let verdict = spec_directory("Password").verify(&SERVER_CHALLENGE, &msg);
        assert_eq!(verdict.claimed_user.as_deref(), Some("User"));
        let identity = verdict.result.expect("spec message verifies");
        assert_eq!(identity.to_string(), "DOMAIN\\User");
    }

    #[test]
    fn rejects_wrong_password_challenge_and_user() {
        let msg = crate::ntlm::message::tests::ms_nlmp_authenticate();
        assert_eq!(
            spec_directory("password")
                .verify(&SERVER_CHALLENGE, &msg)
                .result,
            Err(AuthFailure::BadProof)
        );
        assert_eq!(
            spec_directory("Password").verify(&[0; 8], &msg).result,
            Err(AuthFailure::BadProof)
        );
        let other = Directory::new(
            "Domain",
            vec![User {
                name: "Someone".into(),
                password: "Password".into(),
            }],
        );
        assert_eq!(
            other.verify(&SERVER_CHALLENGE, &msg).result,
            Err(AuthFailure::UnknownUser)
        );
        let elsewhere = Directory::new(
            "OTHER",
            vec![User {
                name: "User".into(),
                password: "Password".into(),
            }],
        );
        assert_eq!(
            elsewhere.verify(&SERVER_CHALLENGE, &msg).result,
            Err(AuthFailure::WrongDomain)
        );
        assert!(matches!(
            spec_directory("Password")
                .verify(&SERVER_CHALLENGE, b"NTLMSSP\0\x03\0\0\0")
                .result,
            Err(AuthFailure::Malformed(_))
        ));
    }

    /// Runs a whole handshake with the in-crate client code.
    fn login(
        dir: &Directory,
        domain: &str,
        user: &str,
        password: &str,
    ) -> Result<Identity, AuthFailure> {
        let type1 = message::negotiate_message(
            flags::UNICODE | flags::NTLM | flags::EXTENDED_SESSIONSECURITY,
        );
        let type2 = dir.challenge(&type1, SERVER_CHALLENGE).expect("challenge");
        let challenge = message::parse_challenge(&type2).expect("parse challenge");
        let creds = Credentials {
            domain,
            user,
            password,
        };
        let type3 = message::authenticate_message(
            &challenge,
            &creds,
            "WS",
            &[7; 8],
            crypto::filetime_now(),
        );
        dir.verify(&SERVER_CHALLENGE, &type3).result
    }

    #[test]
    fn domain_is_checked_case_insensitively_and_may_be_empty() {
        let dir = Directory::new("example", crate::ntlm::demo_users());
        for domain in ["EXAMPLE", "example", "Example", ""] {
            let id = login(&dir, domain, "alice", "Alice-Pass-1")
                .unwrap_or_else(|e| panic!("domain {domain:?}: {e}"));
            assert_eq!(id.to_string(), "EXAMPLE\\alice");
        }
        // User names are case-insensitive; the identity uses the table's spelling.
        assert_eq!(
            login(&dir, "EXAMPLE", "ALICE", "Alice-Pass-1").map(|i| i.to_string()),
            Ok("EXAMPLE\\alice".into())
        );
        assert_eq!(
            login(&dir, "OTHER", "alice", "Alice-Pass-1"),
            Err(AuthFailure::WrongDomain)
        );
        assert_eq!(
            login(&dir, "EXAMPLE", "alice", "Bob-Pass-2"),
            Err(AuthFailure::BadProof)
        );
        assert_eq!(
            login(&dir, "EXAMPLE", "mallory", "x"),
            Err(AuthFailure::UnknownUser)
        );
    }

    #[test]
    fn refuses_ntlmv1_and_anonymous() {
        let dir = Directory::new("EXAMPLE", crate::ntlm::demo_users());
        let good = {
            let type1 = message::negotiate_message(flags::UNICODE);
            let type2 = dir.challenge(&type1, SERVER_CHALLENGE).expect("challenge");
            let challenge = message::parse_challenge(&type2).expect("parse");
            let creds = Credentials {
                domain: "EXAMPLE",
                user: "alice",
                password: "Alice-Pass-1",
            };
            message::authenticate_message(&challenge, &creds, "WS", &[7; 8], 0)
        };
        // Rewrite the NtChallengeResponse length to 24 bytes: an NTLMv1-shaped response.
        let mut v1 = good.clone();
        v1[20..22].copy_from_slice(&24u16.to_le_bytes());
        v1[22..24].copy_from_slice(&24u16.to_le_bytes());
        assert_eq!(
            dir.verify(&SERVER_CHALLENGE, &v1).result,
            Err(AuthFailure::NtlmV1)
        );
        // An empty user name is anonymous.
        let mut anon = good;
        anon[36..38].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(
            dir.verify(&SERVER_CHALLENGE, &anon).result,
            Err(AuthFailure::Anonymous)
        );
    }

    #[test]
    fn debug_output_hides_passwords() {
        let dir = Directory::new("EXAMPLE", crate::ntlm::demo_users());
        let debug = format!("{dir:?}");
        assert!(
            debug.contains("alice") && !debug.contains("Pass"),
            "{debug}"
        );
    }
}
