//! NTLMv2 one-way functions and responses ([MS-NLMP] 3.3.2).
//!
//! Only the pieces a server needs to check an NTLMv2 response, and a client needs to
//! produce one, are here. NTLMv1 (DES based) is deliberately absent: the test backend
//! rejects it, as a hardened IIS does (LmCompatibilityLevel 5).

use hmac::{Hmac, KeyInit, Mac};
use md4::{Digest, Md4};
use md5::Md5;
use subtle::ConstantTimeEq;

type HmacMd5 = Hmac<Md5>;

/// Seconds between 1601-01-01 (the FILETIME epoch) and 1970-01-01.
const FILETIME_UNIX_OFFSET_SECS: u64 = 11_644_473_600;

/// Length of an NTProofStr (an HMAC-MD5 output).
pub const NT_PROOF_LEN: usize = 16;

/// Encodes `s` as UTF-16LE, the "UNICODE" of [MS-NLMP].
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = HmacMd5::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// NTOWFv1: `MD4(UNICODE(password))`, the "NT hash".
pub fn ntowf_v1(password: &str) -> [u8; 16] {
    Md4::digest(utf16le(password)).into()
}

/// NTOWFv2: `HMAC_MD5(MD4(UNICODE(password)), UNICODE(Uppercase(user) || domain))`.
///
/// The user name is upper-cased, the domain is used exactly as the client sent it.
pub fn ntowf_v2(password: &str, user: &str, domain: &str) -> [u8; 16] {
    let identity = utf16le(&format!("{}{}", user.to_uppercase(), domain));
    hmac_md5(&ntowf_v1(password), &[&identity])
}

/// NTProofStr: `HMAC_MD5(ResponseKeyNT, ServerChallenge || temp)`, where `temp` is the
/// client's blob (the NTLMv2 response without its first 16 bytes).
pub fn nt_proof_str(response_key: &[u8; 16], server_challenge: &[u8; 8], blob: &[u8]) -> [u8; 16] {
    hmac_md5(response_key, &[server_challenge, blob])
}

/// SessionBaseKey for NTLMv2: `HMAC_MD5(ResponseKeyNT, NTProofStr)`.
pub fn session_base_key(response_key: &[u8; 16], nt_proof: &[u8; 16]) -> [u8; 16] {
    hmac_md5(response_key, &[nt_proof])
}

/// LMv2 response: `HMAC_MD5(ResponseKeyLM, ServerChallenge || ClientChallenge) || ClientChallenge`.
pub fn lmv2_response(
    response_key: &[u8; 16],
    server_challenge: &[u8; 8],
    client_challenge: &[u8; 8],
) -> [u8; 24] {
    let mac = hmac_md5(response_key, &[server_challenge, client_challenge]);
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(&mac);
    out[16..].copy_from_slice(client_challenge);
    out
}

/// The NTLMv2 client blob (`temp` in [MS-NLMP] 3.3.2): header, timestamp, client
/// challenge, the server's target info, and the trailing 4 zero bytes.
pub fn ntlmv2_blob(timestamp: u64, client_challenge: &[u8; 8], target_info: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(28 + target_info.len() + 4);
    blob.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]); // Responserversion, HiResponserversion, Z(6)
    blob.extend_from_slice(&timestamp.to_le_bytes());
    blob.extend_from_slice(client_challenge);
    blob.extend_from_slice(&[0; 4]);
    blob.extend_from_slice(target_info);
    blob.extend_from_slice(&[0; 4]);
    blob
}

/// Checks an NTLMv2 `NtChallengeResponse` (NTProofStr || blob) in constant time.
///
/// `domain` is the domain exactly as the client put it in its AUTHENTICATE message,
/// since the client hashed that string.
pub fn verify_ntlmv2(
    password: &str,
    user: &str,
    domain: &str,
    server_challenge: &[u8; 8],
    nt_response: &[u8],
) -> bool {
    if nt_response.len() <= NT_PROOF_LEN {
        return false;
    }
    let (proof, blob) = nt_response.split_at(NT_PROOF_LEN);
    let key = ntowf_v2(password, user, domain);
    let expected = nt_proof_str(&key, server_challenge, blob);
    bool::from(expected.ct_eq(proof))
}

/// The current time as a Windows FILETIME (100 ns ticks since 1601-01-01 UTC).
pub fn filetime_now() -> u64 {
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (since_unix.as_secs() + FILETIME_UNIX_OFFSET_SECS) * 10_000_000
        + u64::from(since_unix.subsec_nanos() / 100)
}

#[cfg(test)]
pub(crate) mod tests {
    //! Known answers from [MS-NLMP] 4.2.4 (NTLMv2 authentication): user "User", domain
    //! "Domain", password "Password", server challenge 0123456789abcdef, client challenge
    //! aaaaaaaaaaaaaaaa, time 0, target info = NbDomainName "Domain" + NbComputerName
    //! "Server".
    use super::*;

    pub(crate) fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("valid hex"))
            .collect()
    }

    pub(crate) const SERVER_CHALLENGE: [u8; 8] = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
    const CLIENT_CHALLENGE: [u8; 8] = [0xaa; 8];
    /// [MS-NLMP] 4.2.4.1.3's AV pairs: MsvAvNbDomainName "Domain", MsvAvNbComputerName
    /// "Server", MsvAvEOL.
    const TARGET_INFO: &str =
        "02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000";

    #[test]
    fn ntowf_v1_matches_ms_nlmp() {
        assert_eq!(
            ntowf_v1("Password").to_vec(),
            unhex("a4f49c406510bdcab6824ee7c30fd852")
        );
    }

    #[test]
    fn ntowf_v2_matches_ms_nlmp_4_2_4_1_1() {
        let key = ntowf_v2("Password", "User", "Domain");
        assert_eq!(key.to_vec(), unhex("0c868a403bfd7a93a3001ef22ef02e3f"));
        // The user name is upper-cased, the domain is not.
        assert_eq!(ntowf_v2("Password", "user", "Domain"), key);
        assert_ne!(ntowf_v2("Password", "User", "DOMAIN"), key);
    }

    #[test]
    fn lmv2_response_matches_ms_nlmp_4_2_4_2_1() {
        let key = ntowf_v2("Password", "User", "Domain");
        let lm = lmv2_response(&key, &SERVER_CHALLENGE, &CLIENT_CHALLENGE);
        assert_eq!(
            lm.to_vec(),
            unhex("86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa")
        );
    }

    #[test]
    fn ntlmv2_response_matches_ms_nlmp_4_2_4_2_2() {
        let key = ntowf_v2("Password", "User", "Domain");
        let blob = ntlmv2_blob(0, &CLIENT_CHALLENGE, &unhex(TARGET_INFO));
        assert_eq!(
            blob,
            unhex(
                "01010000000000000000000000000000aaaaaaaaaaaaaaaa00000000
                 02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000
                 00000000"
            )
        );
        let proof = nt_proof_str(&key, &SERVER_CHALLENGE, &blob);
        assert_eq!(proof.to_vec(), unhex("68cd0ab851e51c96aabc927bebef6a1c"));
        // [MS-NLMP] 4.2.4.1.2 SessionBaseKey.
        assert_eq!(
            session_base_key(&key, &proof).to_vec(),
            unhex("8de40ccadbc14a82f15cb0ad0de95ca3")
        );

        let mut response = proof.to_vec();
        response.extend_from_slice(&blob);
        assert!(verify_ntlmv2(
            "Password",
            "User",
            "Domain",
            &SERVER_CHALLENGE,
            &response
        ));
        assert!(verify_ntlmv2(
            "Password",
            "USER",
            "Domain",
            &SERVER_CHALLENGE,
            &response
        ));
    }

    #[test]
    fn ntlmv2_verification_rejects_wrong_inputs() {
        let key = ntowf_v2("Password", "User", "Domain");
        let blob = ntlmv2_blob(0, &CLIENT_CHALLENGE, &unhex(TARGET_INFO));
        let mut response = nt_proof_str(&key, &SERVER_CHALLENGE, &blob).to_vec();
        response.extend_from_slice(&blob);

        assert!(!verify_ntlmv2(
            "password",
            "User",
            "Domain",
            &SERVER_CHALLENGE,
            &response
        ));
        assert!(!verify_ntlmv2(
            "Password",
            "Other",
            "Domain",
            &SERVER_CHALLENGE,
            &response
        ));
        assert!(!verify_ntlmv2(
            "Password",
            "User",
            "DOMAIN",
            &SERVER_CHALLENGE,
            &response
        ));
        assert!(!verify_ntlmv2(
            "Password", "User", "Domain", &[0; 8], &response
        ));
        let mut tampered = response.clone();
        *tampered.last_mut().expect("non-empty") ^= 1;
        assert!(!verify_ntlmv2(
            "Password",
            "User",
            "Domain",
            &SERVER_CHALLENGE,
            &tampered
        ));
        assert!(!verify_ntlmv2(
            "Password",
            "User",
            "Domain",
            &SERVER_CHALLENGE,
            &response[..16]
        ));
        assert!(!verify_ntlmv2(
            "Password",
            "User",
            "Domain",
            &SERVER_CHALLENGE,
            &[]
        ));
    }

    #[test]
    fn filetime_is_after_2020() {
        // 2020-01-01T00:00:00Z as FILETIME.
        assert!(filetime_now() > 132_223_104_000_000_000);
    }
}
