//! NTLM message encoding: NEGOTIATE (type 1), CHALLENGE (type 2) and AUTHENTICATE
//! (type 3) from [MS-NLMP] 2.2.1.
//!
//! `Debug` output of the parsed messages never contains responses or keys.

use std::fmt;

use super::crypto;

/// `NTLMSSP\0`, the first 8 bytes of every NTLM message.
pub const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";
/// MessageType of a NEGOTIATE_MESSAGE.
pub const NEGOTIATE: u32 = 1;
/// MessageType of a CHALLENGE_MESSAGE.
pub const CHALLENGE: u32 = 2;
/// MessageType of an AUTHENTICATE_MESSAGE.
pub const AUTHENTICATE: u32 = 3;

/// Negotiate flags ([MS-NLMP] 2.2.2.5).
pub mod flags {
    /// NTLMSSP_NEGOTIATE_UNICODE: strings are UTF-16LE.
    pub const UNICODE: u32 = 0x0000_0001;
    /// NTLM_NEGOTIATE_OEM: strings are in the OEM code page.
    pub const OEM: u32 = 0x0000_0002;
    /// NTLMSSP_REQUEST_TARGET: the server must send TargetName.
    pub const REQUEST_TARGET: u32 = 0x0000_0004;
    /// NTLMSSP_NEGOTIATE_SIGN.
    pub const SIGN: u32 = 0x0000_0010;
    /// NTLMSSP_NEGOTIATE_SEAL.
    pub const SEAL: u32 = 0x0000_0020;
    /// NTLMSSP_NEGOTIATE_NTLM.
    pub const NTLM: u32 = 0x0000_0200;
    /// NTLMSSP_NEGOTIATE_ALWAYS_SIGN.
    pub const ALWAYS_SIGN: u32 = 0x0000_8000;
    /// NTLMSSP_TARGET_TYPE_DOMAIN: TargetName is a domain name.
    pub const TARGET_TYPE_DOMAIN: u32 = 0x0001_0000;
    /// NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY (the "NTLM2 key" flag).
    pub const EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
    /// NTLMSSP_NEGOTIATE_TARGET_INFO: the CHALLENGE carries AV pairs.
    pub const TARGET_INFO: u32 = 0x0080_0000;
    /// NTLMSSP_NEGOTIATE_VERSION.
    pub const VERSION: u32 = 0x0200_0000;
    /// NTLMSSP_NEGOTIATE_128.
    pub const NEGOTIATE_128: u32 = 0x2000_0000;
    /// NTLMSSP_NEGOTIATE_KEY_EXCH.
    pub const KEY_EXCH: u32 = 0x4000_0000;
    /// NTLMSSP_NEGOTIATE_56.
    pub const NEGOTIATE_56: u32 = 0x8000_0000;

    /// Flags the server grants when the client asks for them.
    pub const ECHOED: u32 = REQUEST_TARGET
        | SIGN
        | SEAL
        | ALWAYS_SIGN
        | EXTENDED_SESSIONSECURITY
        | VERSION
        | NEGOTIATE_128
        | KEY_EXCH
        | NEGOTIATE_56;
}

/// AV pair ids ([MS-NLMP] 2.2.2.1).
pub mod av {
    /// MsvAvEOL.
    pub const EOL: u16 = 0;
    /// MsvAvNbComputerName.
    pub const NB_COMPUTER_NAME: u16 = 1;
    /// MsvAvNbDomainName.
    pub const NB_DOMAIN_NAME: u16 = 2;
    /// MsvAvDnsComputerName.
    pub const DNS_COMPUTER_NAME: u16 = 3;
    /// MsvAvDnsDomainName.
    pub const DNS_DOMAIN_NAME: u16 = 4;
    /// MsvAvTimestamp.
    pub const TIMESTAMP: u16 = 7;
}

/// Version structure sent in CHALLENGE messages: Windows 10.0 build 20348 (Server 2022),
/// NTLMSSP_REVISION_W2K3.
const SERVER_VERSION: [u8; 8] = [10, 0, 0x7c, 0x4f, 0, 0, 0, 0x0f];
/// Size of the fixed part of a CHALLENGE_MESSAGE including Version.
const CHALLENGE_HEADER_LEN: usize = 56;
/// Size of the fixed part of an AUTHENTICATE_MESSAGE up to and including NegotiateFlags.
const AUTHENTICATE_HEADER_LEN: usize = 64;
/// Size of the fixed part of a NEGOTIATE_MESSAGE built by [`negotiate_message`].
const NEGOTIATE_HEADER_LEN: usize = 32;
/// Length of an NTLMv1 (or NTLM2 session) NT response; NTLMv2 responses are longer.
pub const NTLMV1_RESPONSE_LEN: usize = 24;

/// Why an NTLM message could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NtlmError {
    /// The buffer does not start with `NTLMSSP\0` or is shorter than a header.
    #[error("not an NTLM message (length {len})")]
    NotNtlm {
        /// length of the buffer
        len: usize,
    },
    /// MessageType is not the one expected here.
    #[error("expected NTLM message type {expected}, got {got}")]
    WrongType {
        /// expected MessageType
        expected: u32,
        /// MessageType in the buffer
        got: u32,
    },
    /// A fixed header is cut short.
    #[error("NTLM message type {message_type} is truncated: {len} bytes")]
    Truncated {
        /// MessageType
        message_type: u32,
        /// length of the buffer
        len: usize,
    },
    /// A (length, offset) field points outside the message.
    #[error("NTLM field {field} points outside the message")]
    FieldOutOfBounds {
        /// name of the field
        field: &'static str,
    },
    /// A UTF-16LE string field is not valid UTF-16.
    #[error("NTLM field {field} is not valid UTF-16LE")]
    BadString {
        /// name of the field
        field: &'static str,
    },
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Returns the MessageType of `buf` after checking the signature.
pub fn message_type(buf: &[u8]) -> Result<u32, NtlmError> {
    if buf.len() < 12 || &buf[..8] != SIGNATURE {
        return Err(NtlmError::NotNtlm { len: buf.len() });
    }
    Ok(u32_at(buf, 8))
}

fn expect_type(buf: &[u8], expected: u32, min_len: usize) -> Result<(), NtlmError> {
    let got = message_type(buf)?;
    if got != expected {
        return Err(NtlmError::WrongType { expected, got });
    }
    if buf.len() < min_len {
        return Err(NtlmError::Truncated {
            message_type: got,
            len: buf.len(),
        });
    }
    Ok(())
}

/// The payload slice a (Len u16, MaxLen u16, Offset u32) field at `at` refers to.
fn field<'a>(buf: &'a [u8], at: usize, name: &'static str) -> Result<&'a [u8], NtlmError> {
    let len = usize::from(u16_at(buf, at));
    let offset = u32_at(buf, at + 4) as usize;
    if len == 0 {
        return Ok(&[]);
    }
    offset
        .checked_add(len)
        .filter(|&end| end <= buf.len())
        .map(|end| &buf[offset..end])
        .ok_or(NtlmError::FieldOutOfBounds { field: name })
}

fn decode_string(bytes: &[u8], unicode: bool, name: &'static str) -> Result<String, NtlmError> {
    if unicode {
        if !bytes.len().is_multiple_of(2) {
            return Err(NtlmError::BadString { field: name });
        }
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).map_err(|_| NtlmError::BadString { field: name })
    } else {
        // OEM code page: treat as Latin-1, which is exact for the ASCII names used here.
        Ok(bytes.iter().map(|&b| char::from(b)).collect())
    }
}

fn encode_string(s: &str, unicode: bool) -> Vec<u8> {
    if unicode {
        crypto::utf16le(s)
    } else {
        s.chars().map(|c| u8::try_from(c).unwrap_or(b'?')).collect()
    }
}

/// Appends a (Len, MaxLen, Offset) field header.
fn put_field(out: &mut Vec<u8>, len: usize, offset: usize) {
    let len = u16::try_from(len).expect("NTLM field fits in u16");
    let offset = u32::try_from(offset).expect("NTLM offset fits in u32");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
}

/// A parsed NEGOTIATE_MESSAGE: only its flags matter to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiate {
    /// NegotiateFlags the client asked for.
    pub flags: u32,
}

/// Parses a NEGOTIATE_MESSAGE.
pub fn parse_negotiate(buf: &[u8]) -> Result<Negotiate, NtlmError> {
    expect_type(buf, NEGOTIATE, 16)?;
    Ok(Negotiate {
        flags: u32_at(buf, 12),
    })
}

/// Builds a NEGOTIATE_MESSAGE with no domain or workstation, as browsers send.
pub fn negotiate_message(flags: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(NEGOTIATE_HEADER_LEN + 8);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&NEGOTIATE.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    put_field(&mut out, 0, NEGOTIATE_HEADER_LEN + 8); // DomainNameFields
    put_field(&mut out, 0, NEGOTIATE_HEADER_LEN + 8); // WorkstationFields
    out.extend_from_slice(&SERVER_VERSION);
    out
}

/// The flags a server answers a NEGOTIATE with: NTLM + target info always, the client's
/// character set, and the client's session-security requests echoed back.
pub fn challenge_flags(client_flags: u32) -> u32 {
    let charset = if client_flags & flags::UNICODE != 0 {
        flags::UNICODE
    } else {
        flags::OEM
    };
    charset
        | flags::NTLM
        | flags::TARGET_INFO
        | flags::TARGET_TYPE_DOMAIN
        | (client_flags & flags::ECHOED)
}

/// Server identity advertised in a CHALLENGE_MESSAGE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerNames {
    /// NetBIOS domain name, upper case (`EXAMPLE`); also the TargetName.
    pub nb_domain: String,
    /// NetBIOS computer name, upper case.
    pub nb_computer: String,
    /// DNS domain name.
    pub dns_domain: String,
    /// DNS computer name.
    pub dns_computer: String,
}

fn put_av(out: &mut Vec<u8>, id: u16, value: &[u8]) {
    out.extend_from_slice(&id.to_le_bytes());
    let len = u16::try_from(value.len()).expect("AV pair fits in u16");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(value);
}

/// TargetInfo AV pairs as a Windows server sends them, ending in MsvAvEOL.
pub fn target_info(names: &ServerNames, timestamp: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_av(
        &mut out,
        av::NB_DOMAIN_NAME,
        &crypto::utf16le(&names.nb_domain),
    );
    put_av(
        &mut out,
        av::NB_COMPUTER_NAME,
        &crypto::utf16le(&names.nb_computer),
    );
    put_av(
        &mut out,
        av::DNS_DOMAIN_NAME,
        &crypto::utf16le(&names.dns_domain),
    );
    put_av(
        &mut out,
        av::DNS_COMPUTER_NAME,
        &crypto::utf16le(&names.dns_computer),
    );
    put_av(&mut out, av::TIMESTAMP, &timestamp.to_le_bytes());
    put_av(&mut out, av::EOL, &[]);
    out
}

/// Builds a CHALLENGE_MESSAGE.
pub fn challenge_message(
    flags: u32,
    server_challenge: &[u8; 8],
    names: &ServerNames,
    timestamp: u64,
) -> Vec<u8> {
    let unicode = flags & flags::UNICODE != 0;
    let target_name = encode_string(&names.nb_domain, unicode);
    let info = target_info(names, timestamp);

    let mut out = Vec::with_capacity(CHALLENGE_HEADER_LEN + target_name.len() + info.len());
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&CHALLENGE.to_le_bytes());
    put_field(&mut out, target_name.len(), CHALLENGE_HEADER_LEN);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(server_challenge);
    out.extend_from_slice(&[0; 8]); // Reserved
    put_field(
        &mut out,
        info.len(),
        CHALLENGE_HEADER_LEN + target_name.len(),
    );
    out.extend_from_slice(&SERVER_VERSION);
    debug_assert_eq!(out.len(), CHALLENGE_HEADER_LEN);
    out.extend_from_slice(&target_name);
    out.extend_from_slice(&info);
    out
}

/// A parsed CHALLENGE_MESSAGE (client side).
#[derive(Clone, PartialEq, Eq)]
pub struct Challenge {
    /// NegotiateFlags chosen by the server.
    pub flags: u32,
    /// The 8-byte server challenge.
    pub server_challenge: [u8; 8],
    /// TargetName (the domain for a domain member).
    pub target_name: String,
    /// Raw TargetInfo AV pairs.
    pub target_info: Vec<u8>,
}

impl fmt::Debug for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Challenge")
            .field("flags", &format_args!("{:#010x}", self.flags))
            .field("target_name", &self.target_name)
            .finish_non_exhaustive()
    }
}

impl Challenge {
    /// The value of AV pair `id` in TargetInfo, if present.
    pub fn av_pair(&self, id: u16) -> Option<&[u8]> {
        let mut rest = self.target_info.as_slice();
        while rest.len() >= 4 {
            let got = u16_at(rest, 0);
            let len = usize::from(u16_at(rest, 2));
            if got == av::EOL || rest.len() < 4 + len {
                return None;
            }
            if got == id {
                return Some(&rest[4..4 + len]);
            }
            rest = &rest[4 + len..];
        }
        None
    }
}

/// Parses a CHALLENGE_MESSAGE.
pub fn parse_challenge(buf: &[u8]) -> Result<Challenge, NtlmError> {
    expect_type(buf, CHALLENGE, 48)?;
    let flags = u32_at(buf, 20);
    let mut server_challenge = [0u8; 8];
    server_challenge.copy_from_slice(&buf[24..32]);
    let target_name = decode_string(
        field(buf, 12, "TargetName")?,
        flags & flags::UNICODE != 0,
        "TargetName",
    )?;
    let target_info = field(buf, 40, "TargetInfo")?.to_vec();
    Ok(Challenge {
        flags,
        server_challenge,
        target_name,
        target_info,
    })
}

/// A parsed AUTHENTICATE_MESSAGE.
#[derive(Clone, PartialEq, Eq)]
pub struct Authenticate {
    /// NegotiateFlags.
    pub flags: u32,
    /// LmChallengeResponse (24 bytes for LMv2, or zeros).
    pub lm_response: Vec<u8>,
    /// NtChallengeResponse: 24 bytes for NTLMv1, NTProofStr || blob for NTLMv2.
    pub nt_response: Vec<u8>,
    /// DomainName as the client sent it.
    pub domain: String,
    /// UserName as the client sent it.
    pub user: String,
    /// Workstation as the client sent it.
    pub workstation: String,
}

impl fmt::Debug for Authenticate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticate")
            .field("flags", &format_args!("{:#010x}", self.flags))
            .field("domain", &self.domain)
            .field("user", &self.user)
            .field("workstation", &self.workstation)
            .field("nt_response_len", &self.nt_response.len())
            .finish_non_exhaustive()
    }
}

/// Parses an AUTHENTICATE_MESSAGE.
pub fn parse_authenticate(buf: &[u8]) -> Result<Authenticate, NtlmError> {
    expect_type(buf, AUTHENTICATE, AUTHENTICATE_HEADER_LEN)?;
    let flags = u32_at(buf, 60);
    let unicode = flags & flags::UNICODE != 0;
    Ok(Authenticate {
        flags,
        lm_response: field(buf, 12, "LmChallengeResponse")?.to_vec(),
        nt_response: field(buf, 20, "NtChallengeResponse")?.to_vec(),
        domain: decode_string(field(buf, 28, "DomainName")?, unicode, "DomainName")?,
        user: decode_string(field(buf, 36, "UserName")?, unicode, "UserName")?,
        workstation: decode_string(field(buf, 44, "Workstation")?, unicode, "Workstation")?,
    })
}

/// Client credentials for [`authenticate_message`]. `Debug` hides the password.
#[derive(Clone)]
pub struct Credentials<'a> {
    /// Domain (may be empty).
    pub domain: &'a str,
    /// User name.
    pub user: &'a str,
    /// Password.
    pub password: &'a str,
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("domain", &self.domain)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Builds an NTLMv2 AUTHENTICATE_MESSAGE answering `challenge`.
///
/// Uses the server's MsvAvTimestamp when present (and then zeros the LM response, as
/// [MS-NLMP] 3.1.5.1.2 requires), else `now` and an LMv2 response.
pub fn authenticate_message(
    challenge: &Challenge,
    creds: &Credentials<'_>,
    workstation: &str,
    client_challenge: &[u8; 8],
    now: u64,
) -> Vec<u8> {
    let unicode = challenge.flags & flags::UNICODE != 0;
    let key = crypto::ntowf_v2(creds.password, creds.user, creds.domain);
    let server_time = challenge
        .av_pair(av::TIMESTAMP)
        .and_then(|v| <[u8; 8]>::try_from(v).ok())
        .map(u64::from_le_bytes);
    let blob = crypto::ntlmv2_blob(
        server_time.unwrap_or(now),
        client_challenge,
        &challenge.target_info,
    );
    let proof = crypto::nt_proof_str(&key, &challenge.server_challenge, &blob);
    let mut nt = proof.to_vec();
    nt.extend_from_slice(&blob);
    let lm = match server_time {
        Some(_) => [0u8; 24],
        None => crypto::lmv2_response(&key, &challenge.server_challenge, client_challenge),
    };

    let domain = encode_string(creds.domain, unicode);
    let user = encode_string(creds.user, unicode);
    let host = encode_string(workstation, unicode);
    let flags = challenge.flags & !(flags::KEY_EXCH | flags::SIGN | flags::SEAL);

    let mut out = Vec::with_capacity(
        AUTHENTICATE_HEADER_LEN + lm.len() + nt.len() + domain.len() + user.len() + host.len(),
    );
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&AUTHENTICATE.to_le_bytes());
    let mut offset = AUTHENTICATE_HEADER_LEN;
    for len in [lm.len(), nt.len(), domain.len(), user.len(), host.len(), 0] {
        put_field(&mut out, len, offset);
        offset += len;
    }
    out.extend_from_slice(&flags.to_le_bytes());
    debug_assert_eq!(out.len(), AUTHENTICATE_HEADER_LEN);
    for part in [&lm[..], &nt, &domain, &user, &host] {
        out.extend_from_slice(part);
    }
    out
}

#[cfg(test)]
mod properties;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ntlm::crypto::tests::{SERVER_CHALLENGE, unhex};

    /// [MS-NLMP] 4.2.4.3: the NTLMv2 AUTHENTICATE_MESSAGE of the 4.2.4 example
    /// (user "User", domain "Domain", workstation "COMPUTER", password "Password").
    pub(crate) fn ms_nlmp_authenticate() -> Vec<u8> {
        unhex(
            "4e544c4d535350000300000018001800 6c00000054005400840000000c000c00
             48000000080008005400000010001000 5c00000010001000d8000000358288e2
             0501280a0000000f44006f006d006100 69006e00550073006500720043004f00
             4d005000550054004500520086c35097 ac9cec102554764a57cccc19aaaaaaaa
             aaaaaaaa68cd0ab851e51c96aabc927b ebef6a1c010100000000000000000000
             00000000aaaaaaaaaaaaaaaa00000000 02000c0044006f006d00610069006e00
             01000c00530065007200760065007200 0000000000000000c5dad2544fc97990
             94ce1ce90bc9d03e",
        )
    }

    #[test]
    fn parses_ms_nlmp_authenticate_message() {
        let msg = parse_authenticate(&ms_nlmp_authenticate()).expect("spec message parses");
        assert_eq!(msg.user, "User");
        assert_eq!(msg.domain, "Domain");
        assert_eq!(msg.workstation, "COMPUTER");
        assert_eq!(msg.flags, 0xe288_8235);
        assert_eq!(
            msg.lm_response,
            unhex("86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa")
        );
        assert_eq!(msg.nt_response.len(), 0x54);
        assert_eq!(
            msg.nt_response[..16],
            unhex("68cd0ab851e51c96aabc927bebef6a1c")[..]
        );
        assert!(crypto::verify_ntlmv2(
            "Password",
            &msg.user,
            &msg.domain,
            &SERVER_CHALLENGE,
            &msg.nt_response
        ));
        assert!(!crypto::verify_ntlmv2(
            "Passw0rd",
            &msg.user,
            &msg.domain,
            &SERVER_CHALLENGE,
            &msg.nt_response
        ));
        let debug = format!("{msg:?}");
        assert!(
            !debug.contains("68cd") && !debug.contains("104, 205"),
            "Debug leaks the response: {debug}"
        );
    }

    #[test]
    fn parses_ms_nlmp_challenge_message() {
        // [MS-NLMP] 4.2.4.3 CHALLENGE_MESSAGE.
        let buf = unhex(
            "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef
             00000000000000002400240044000000060070170000000f5300650072007600
             6500720002000c0044006f006d00610069006e0001000c005300650072007600
             6500720000000000",
        );
        let ch = parse_challenge(&buf).expect("spec challenge parses");
        assert_eq!(ch.flags, 0xe28a_8233);
        assert_eq!(ch.server_challenge, SERVER_CHALLENGE);
        assert_eq!(ch.target_name, "Server");
        assert_eq!(
            ch.av_pair(av::NB_DOMAIN_NAME),
            Some(&crypto::utf16le("Domain")[..])
        );
        assert_eq!(ch.av_pair(av::TIMESTAMP), None);

        // Answering it with the spec's inputs reproduces the spec's responses.
        let creds = Credentials {
            domain: "Domain",
            user: "User",
            password: "Password",
        };
        let auth = authenticate_message(&ch, &creds, "COMPUTER", &[0xaa; 8], 0);
        let parsed = parse_authenticate(&auth).expect("own message parses");
        let spec = parse_authenticate(&ms_nlmp_authenticate()).expect("spec message parses");
        assert_eq!(parsed.nt_response, spec.nt_response);
        assert_eq!(parsed.lm_response, spec.lm_response);
        assert_eq!(
            (parsed.user.as_str(), parsed.domain.as_str()),
            ("User", "Domain")
        );
    }

    #[test]
    fn challenge_round_trips_and_echoes_client_flags() {
        let names = ServerNames {
            nb_domain: "EXAMPLE".into(),
            nb_computer: "NTLMTESTD".into(),
            dns_domain: "example.test".into(),
            dns_computer: "ntlmtestd.example.test".into(),
        };
        let client = flags::UNICODE
            | flags::OEM
            | flags::REQUEST_TARGET
            | flags::NTLM
            | flags::EXTENDED_SESSIONSECURITY
            | flags::NEGOTIATE_128
            | flags::KEY_EXCH;
        let granted = challenge_flags(client);
        assert_eq!(granted & (flags::UNICODE | flags::OEM), flags::UNICODE);
        assert_ne!(granted & flags::EXTENDED_SESSIONSECURITY, 0);
        assert_ne!(granted & flags::TARGET_INFO, 0);
        assert_eq!(granted & flags::SEAL, 0, "not asked for, not granted");
        assert_eq!(
            challenge_flags(flags::OEM | flags::NTLM) & (flags::UNICODE | flags::OEM),
            flags::OEM
        );

        let msg = challenge_message(granted, &SERVER_CHALLENGE, &names, 0x01d9_0000_0000_0000);
        let ch = parse_challenge(&msg).expect("round trip");
        assert_eq!(ch.flags, granted);
        assert_eq!(ch.server_challenge, SERVER_CHALLENGE);
        assert_eq!(ch.target_name, "EXAMPLE");
        assert_eq!(
            ch.av_pair(av::NB_COMPUTER_NAME),
            Some(&crypto::utf16le("NTLMTESTD")[..])
        );
        assert_eq!(
            ch.av_pair(av::TIMESTAMP),
            Some(&0x01d9_0000_0000_0000u64.to_le_bytes()[..])
        );

        let oem = parse_challenge(&challenge_message(flags::OEM, &SERVER_CHALLENGE, &names, 0))
            .expect("oem");
        assert_eq!(oem.target_name, "EXAMPLE");
    }

    #[test]
    fn rejects_malformed_messages() {
        assert_eq!(message_type(b"NTLMSSP"), Err(NtlmError::NotNtlm { len: 7 }));
        assert_eq!(
            message_type(b"HTTP/1.1 200 OK"),
            Err(NtlmError::NotNtlm { len: 15 })
        );
        let type1 = negotiate_message(flags::UNICODE);
        assert_eq!(
            parse_negotiate(&type1),
            Ok(Negotiate {
                flags: flags::UNICODE
            })
        );
        assert_eq!(
            parse_authenticate(&type1),
            Err(NtlmError::WrongType {
                expected: AUTHENTICATE,
                got: NEGOTIATE
            })
        );
        let mut spec = ms_nlmp_authenticate();
        assert!(matches!(
            parse_authenticate(&spec[..40]),
            Err(NtlmError::Truncated {
                message_type: AUTHENTICATE,
                len: 40
            })
        ));
        spec[24] = 0xff; // NtChallengeResponse offset far past the end
        assert_eq!(
            parse_authenticate(&spec),
            Err(NtlmError::FieldOutOfBounds {
                field: "NtChallengeResponse"
            })
        );
        let mut spec = ms_nlmp_authenticate();
        spec[36] = 7; // odd-length UTF-16 user name
        assert_eq!(
            parse_authenticate(&spec),
            Err(NtlmError::BadString { field: "UserName" })
        );
    }
}
