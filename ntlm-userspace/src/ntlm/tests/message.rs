//! Tests of the NTLM message parser: the tokens real clients sent (`fixtures/`), the
//! [MS-NLMP] example, hostile messages built field by field, SPNEGO wrappings, and property
//! tests on arbitrary and mutated input.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use proptest::{prelude::*, test_runner::TestCaseResult};

use super::*;
use crate::{lifecycle::Dir, ntlm::fixtures::FIXTURES};

/// [MS-NLMP] 4.2.4.3: the NTLMv2 AUTHENTICATE_MESSAGE of the spec's example (user "User",
/// domain "Domain", workstation "COMPUTER", Unicode).
const MS_NLMP_AUTHENTICATE: &str = "
    4e544c4d535350000300000018001800 6c00000054005400840000000c000c00
    48000000080008005400000010001000 5c00000010001000d8000000358288e2
    0501280a0000000f44006f006d006100 69006e00550073006500720043004f00
    4d005000550054004500520086c35097 ac9cec102554764a57cccc19aaaaaaaa
    aaaaaaaa68cd0ab851e51c96aabc927b ebef6a1c010100000000000000000000
    00000000aaaaaaaaaaaaaaaa00000000 02000c0044006f006d00610069006e00
    01000c00530065007200760065007200 0000000000000000c5dad2544fc97990
    94ce1ce90bc9d03e";

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits.chunks(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap()).collect()
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// An AUTHENTICATE_MESSAGE with these flags and name bytes, laid out as Windows does: the
/// fixed header, then the LM and NT responses, the names and the session key.
fn authenticate_message(flags: u32, domain: &[u8], user: &[u8], workstation: &[u8]) -> Vec<u8> {
    let lm = [0x11u8; 24];
    let nt = [0x22u8; 48];
    let key = [0x33u8; 16];
    let parts: [&[u8]; 6] = [&lm, &nt, domain, user, workstation, &key];
    let mut out = Vec::from(&SIGNATURE[..]);
    out.extend_from_slice(&AUTHENTICATE.to_le_bytes());
    let mut offset = AUTHENTICATE_HEADER_LEN;
    for p in parts {
        let len = u16::try_from(p.len()).unwrap();
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&u32::try_from(offset).unwrap().to_le_bytes());
        offset += p.len();
    }
    out.extend_from_slice(&flags.to_le_bytes());
    assert_eq!(out.len(), AUTHENTICATE_HEADER_LEN);
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

fn unicode_message(domain: &str, user: &str, workstation: &str) -> Vec<u8> {
    authenticate_message(NEGOTIATE_UNICODE, &utf16(domain), &utf16(user), &utf16(workstation))
}

fn names(domain: &str, user: &str, workstation: &str) -> Names {
    Names { domain: domain.into(), user: user.into(), workstation: workstation.into() }
}

/// A DER TLV, with a long-form length when it needs one.
fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match contents.len() {
        n @ 0..=0x7f => out.push(n as u8),
        n @ 0x80..=0xff => out.extend_from_slice(&[0x81, n as u8]),
        n => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(contents);
    out
}

/// OID 1.3.6.1.4.1.311.2.2.10 (NTLMSSP) and 1.2.840.113554.1.2.2 (Kerberos 5), DER.
const NTLM_OID: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x02, 0x0a];
const KRB5_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02];

/// A SPNEGO initial token (RFC 4178 4.2.1) offering `mech` with `mech_token`, and extra
/// NegTokenInit fields after it.
fn spnego_init(mech: &[u8], mech_token: Option<&[u8]>, extra: &[u8]) -> Vec<u8> {
    let mut fields = tlv(0xa0, &tlv(0x30, &tlv(0x06, mech)));
    if let Some(t) = mech_token {
        fields.extend(tlv(0xa2, &tlv(0x04, t)));
    }
    fields.extend_from_slice(extra);
    let mut inner = tlv(0x06, SPNEGO_OID);
    inner.extend(tlv(0xa0, &tlv(0x30, &fields)));
    tlv(0x60, &inner)
}

/// A SPNEGO NegTokenResp (RFC 4178 4.2.2) with responseToken `token`.
fn spnego_resp(token: &[u8]) -> Vec<u8> {
    let mut fields = tlv(0xa0, &tlv(0x0a, &[1])); // negState accept-incomplete
    fields.extend(tlv(0xa2, &tlv(0x04, token)));
    tlv(0xa1, &tlv(0x30, &fields))
}

#[test]
fn the_tokens_real_clients_sent_parse_to_their_messages() {
    for f in FIXTURES {
        let up: Vec<_> = f
            .tokens(Dir::Up)
            .into_iter()
            .map(|(scheme, token)| {
                let scheme = Scheme::parse(&scheme).unwrap_or_else(|| panic!("{}: scheme {scheme}", f.file));
                parse_token(scheme, &token).unwrap_or_else(|e| panic!("{}: {e}", f.file))
            })
            .collect();
        let Some((domain, user, workstation, _)) = f.login else {
            assert!(up.is_empty(), "{}: no client token expected", f.file);
            continue;
        };
        assert_eq!(
            up,
            [Some(Message::Negotiate), Some(Message::Authenticate(names(domain, user, workstation)))],
            "{}",
            f.file
        );
        let down: Vec<_> = f
            .tokens(Dir::Down)
            .into_iter()
            .map(|(scheme, token)| parse_token(Scheme::parse(&scheme).unwrap(), &token).unwrap())
            .collect();
        // pyspnego's last token is a NegTokenResp with only a mechListMIC: no NTLM in it.
        let want: &[_] =
            if f.file == "spnego_ok.bin" { &[Some(Message::Challenge), None] } else { &[Some(Message::Challenge)] };
        assert_eq!(down, want, "{}", f.file);
    }
}

#[test]
fn the_spnego_tokens_are_really_wrapped() {
    let f = FIXTURES.iter().find(|f| f.file == "spnego_ok.bin").unwrap();
    let tokens: Vec<Vec<u8>> = f.tokens(Dir::Up).into_iter().map(|(_, t)| STANDARD.decode(t).unwrap()).collect();
    // NegTokenInit in GSS framing, then a NegTokenResp: the NTLM message is inside, not first.
    assert_eq!((tokens[0][0], tokens[1][0]), (TAG_GSS_INITIAL, TAG_CONTEXT_1));
    for t in &tokens {
        let inner = ntlm_in_gss(t).unwrap().expect("NTLM inside");
        assert!(inner.starts_with(SIGNATURE) && inner.len() < t.len());
    }
}

#[test]
fn the_ms_nlmp_example_message_parses() {
    let msg = unhex(MS_NLMP_AUTHENTICATE);
    assert_eq!(parse_message(&msg), Ok(Message::Authenticate(names("Domain", "User", "COMPUTER"))));
    // The same under both schemes, raw.
    let token = STANDARD.encode(&msg);
    for scheme in [Scheme::Ntlm, Scheme::Negotiate] {
        assert_eq!(
            parse_token(scheme, token.as_bytes()),
            Ok(Some(Message::Authenticate(names("Domain", "User", "COMPUTER"))))
        );
    }
    // Without padding too (some clients drop it).
    let unpadded = token.trim_end_matches('=');
    assert_ne!(unpadded.len(), token.len(), "the example needs padding");
    assert!(parse_token(Scheme::Ntlm, unpadded.as_bytes()).is_ok());
}

#[test]
fn oem_names_are_read_as_ascii_and_other_bytes_escaped() {
    let msg = authenticate_message(0, b"CORP", b"j\xe9r\xf4me", b"PC-1");
    assert_eq!(parse_message(&msg), Ok(Message::Authenticate(names("CORP", "j%E9r%F4me", "PC-1"))));
}

#[test]
fn types_1_and_2_are_recognised_by_type() {
    for (t, want) in [(NEGOTIATE, Message::Negotiate), (CHALLENGE, Message::Challenge)] {
        let mut msg = Vec::from(&SIGNATURE[..]);
        msg.extend_from_slice(&t.to_le_bytes());
        assert_eq!(parse_message(&msg), Ok(want));
    }
}

#[test]
fn names_are_escaped_for_a_quoted_log_field() {
    let cases = [
        ("a\"b", "a%22b"),
        ("line\nbreak\r", "line%0Abreak%0D"),
        ("back\\slash", "back%5Cslash"),
        ("100%", "100%25"),
        ("tab\tesc\u{1b}del\u{7f}c1\u{85}", "tab%09esc%1Bdel%7Fc1%85"),
        ("rtl\u{202e}lsep\u{2028}zw\u{200b}bom\u{feff}", "rtl%u{202E}lsep%u{2028}zw%u{200B}bom%u{FEFF}"),
        ("tag\u{e0041}", "tag%u{E0041}"),
        ("José 名前 émoji😀", "José 名前 émoji😀"),
        ("", ""),
    ];
    for (raw, want) in cases {
        let msg = unicode_message("D", raw, "W");
        assert_eq!(parse_message(&msg), Ok(Message::Authenticate(names("D", want, "W"))), "{raw:?}");
    }
    // An unpaired surrogate is written as its code unit.
    let mut user = utf16("a");
    user.extend_from_slice(&0xd800u16.to_le_bytes());
    user.extend(utf16("b"));
    let msg = authenticate_message(NEGOTIATE_UNICODE, &utf16("D"), &user, &[]);
    assert_eq!(parse_message(&msg), Ok(Message::Authenticate(names("D", "a%u{D800}b", ""))));
}

#[test]
fn names_are_cut_at_the_cap_without_splitting_an_escape() {
    let long = "x".repeat(MAX_NAME_CHARS + 44);
    let quotes = "\"".repeat(MAX_NAME_CHARS);
    let msg = unicode_message(&long, &quotes, "W");
    let Ok(Message::Authenticate(n)) = parse_message(&msg) else { panic!("parses") };
    assert_eq!(n.domain, "x".repeat(MAX_NAME_CHARS));
    // Each quote takes 3 characters: as many whole escapes as fit.
    assert_eq!(n.user, "%22".repeat(MAX_NAME_CHARS / 3));
    assert_eq!(n.workstation, "W");
}

#[test]
fn the_account_joins_domain_and_user() {
    assert_eq!(names("EXAMPLE", "alice", "").account(), "EXAMPLE\\alice");
    assert_eq!(names("", "alice@example.test", "").account(), "alice@example.test");
}

/// Overwrites the (Len, MaxLen, Offset) field at `at`.
fn set_field(msg: &mut [u8], at: usize, len: u16, offset: u32) {
    msg[at..at + 2].copy_from_slice(&len.to_le_bytes());
    msg[at + 2..at + 4].copy_from_slice(&len.to_le_bytes());
    msg[at + 4..at + 8].copy_from_slice(&offset.to_le_bytes());
}

#[test]
fn every_field_pointing_outside_is_refused_by_name() {
    let good = unicode_message("DOMAIN", "user", "WS");
    let len = good.len() as u32;
    for (name, at) in FIELDS {
        for (flen, offset, why) in [
            (1, len, "starts at the end"),
            (8, len - 4, "runs past the end"),
            (0xffff, u32::MAX, "offset + length overflows"),
            (4, 8, "points into the fixed header"),
            (4, 0, "points at the signature"),
        ] {
            let mut msg = good.clone();
            set_field(&mut msg, at, flen, offset);
            assert_eq!(parse_message(&msg), Err(MessageError::OutOfBounds { field: name }), "{name} {why}");
        }
        // An empty field may point anywhere.
        let mut msg = good.clone();
        set_field(&mut msg, at, 0, u32::MAX);
        assert!(parse_message(&msg).is_ok(), "{name} empty");
    }
}

#[test]
fn malformed_messages_are_refused() {
    let good = unicode_message("DOMAIN", "user", "WS");
    for cut in [0, 7, 11] {
        assert_eq!(parse_message(&good[..cut]), Err(MessageError::NotNtlm { len: cut }));
    }
    for cut in [12, 40, 63] {
        assert_eq!(parse_message(&good[..cut]), Err(MessageError::Truncated { message_type: 3, len: cut, need: 64 }));
    }
    let mut bad = good.clone();
    bad[8] = 4;
    assert_eq!(parse_message(&bad), Err(MessageError::UnknownType(4)));
    let mut bad = good.clone();
    bad[0] = b'X';
    assert_eq!(parse_message(&bad), Err(MessageError::NotNtlm { len: good.len() }));
    // A Unicode name of odd length.
    let odd = authenticate_message(NEGOTIATE_UNICODE, b"DOM", &utf16("u"), &[]);
    assert_eq!(parse_message(&odd), Err(MessageError::OddLength { field: "DomainName" }));
    // Not base64, or base64 of something else.
    assert_eq!(parse_token(Scheme::Ntlm, b"TlRMTVNTUAAB*AAA"), Err(MessageError::Base64));
    assert_eq!(parse_token(Scheme::Ntlm, b"TlRM TVNT"), Err(MessageError::Base64));
    assert_eq!(parse_token(Scheme::Ntlm, b"aGVsbG8="), Err(MessageError::NotNtlm { len: 5 }));
    // Under NTLM a SPNEGO wrapping is not looked into.
    let wrapped = STANDARD.encode(spnego_resp(&good));
    assert!(matches!(parse_token(Scheme::Ntlm, wrapped.as_bytes()), Err(MessageError::NotNtlm { .. })));
}

#[test]
fn spnego_wrapped_ntlm_is_found_where_the_structure_says() {
    let msg = unicode_message("D", "u", "W");
    let want = Ok(Some(Message::Authenticate(names("D", "u", "W"))));
    let init = spnego_init(NTLM_OID, Some(&msg), &[]);
    assert_eq!(parse_token(Scheme::Negotiate, STANDARD.encode(&init).as_bytes()), want);
    let resp = spnego_resp(&msg);
    assert_eq!(parse_token(Scheme::Negotiate, STANDARD.encode(&resp).as_bytes()), want);
    // A message long enough for 2-byte DER lengths.
    let long = unicode_message(&"d".repeat(200), "u", "W");
    assert!(matches!(ntlm_in_gss(&spnego_resp(&long)), Ok(Some(m)) if m == long));
}

#[test]
fn kerberos_and_other_gss_tokens_are_not_ntlm() {
    let msg = unicode_message("D", "u", "W");
    // A raw Kerberos GSS token, with NTLMSSP bytes inside for good measure.
    let mut krb = tlv(0x06, KRB5_OID);
    krb.extend_from_slice(&[0x01, 0x00]);
    krb.extend_from_slice(&msg);
    assert_eq!(ntlm_in_gss(&tlv(0x60, &krb)), Ok(None));
    // SPNEGO offering Kerberos, with an AP-REQ-like mechToken.
    let ap_req = tlv(0x60, &tlv(0x06, KRB5_OID));
    assert_eq!(ntlm_in_gss(&spnego_init(KRB5_OID, Some(&ap_req), &[])), Ok(None));
    // SPNEGO with no mechToken, the NTLM message in the mechListMIC [3]: not taken.
    let mic = tlv(0xa3, &tlv(0x04, &msg));
    assert_eq!(ntlm_in_gss(&spnego_init(NTLM_OID, None, &mic)), Ok(None));
    // Nor in the mechanism list, as bytes of an OID.
    let mut odd_mech = NTLM_OID.to_vec();
    odd_mech.extend_from_slice(&msg);
    assert_eq!(ntlm_in_gss(&spnego_init(&odd_mech, None, &[])), Ok(None));
}

#[test]
fn malformed_der_is_refused() {
    let msg = unicode_message("D", "u", "W");
    let good = spnego_resp(&msg);
    let mut trailing = good.clone();
    trailing.push(0);
    let mut too_long = good.clone();
    too_long[1] += 1; // outer length one past the end
    let mut indefinite = good.clone();
    indefinite[1] = 0x80;
    let cases: [(&str, Vec<u8>); 8] = [
        ("empty", vec![]),
        ("trailing bytes", trailing),
        ("length past the end", too_long),
        ("indefinite length", indefinite),
        ("multi-byte tag", vec![0x7f, 0x01, 0x00]),
        ("5-byte length", vec![0xa1, 0x85, 0, 0, 0, 0, 1, 0]),
        ("not SPNEGO or a GSS token", tlv(0x30, &[])),
        ("mechToken not an OCTET STRING", tlv(0xa1, &tlv(0x30, &tlv(0xa2, &tlv(0x03, &msg))))),
    ];
    for (why, token) in cases {
        assert!(matches!(ntlm_in_gss(&token), Err(MessageError::Der(_))), "{why}: {:?}", ntlm_in_gss(&token));
    }
    // Truncated anywhere: an error, never a panic or a wrong message.
    for cut in 0..good.len() {
        assert!(ntlm_in_gss(&good[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn errors_name_the_problem_and_carry_no_token_bytes() {
    let e = MessageError::OutOfBounds { field: "NtChallengeResponse" };
    assert_eq!(e.to_string(), "NTLM field NtChallengeResponse points outside the message");
    assert_eq!(Scheme::parse("nTlM"), Some(Scheme::Ntlm));
    assert_eq!(Scheme::parse("NEGOTIATE"), Some(Scheme::Negotiate));
    assert_eq!(Scheme::parse("Basic"), None);
}

// The properties below are strategies and checks apart, the shape a time-bounded fuzz
// target takes them in (the fuzz branch's `ntlm_fuzz::Target::property`).

/// What no escaped name may contain, whatever the input (written out here, not taken from
/// the code under test): a quote or backslash, a control character, a line or paragraph
/// separator, a bidirectional control or a zero-width character; nor more than
/// [`MAX_NAME_CHARS`] characters.
fn log_safe(n: &Names) -> TestCaseResult {
    let unsafe_char = |c: char| {
        matches!(c, '"' | '\\' | '\u{2028}' | '\u{2029}' | '\u{feff}')
            || c.is_control()
            || ('\u{200b}'..='\u{200f}').contains(&c)
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    for name in [&n.domain, &n.user, &n.workstation] {
        prop_assert!(name.chars().count() <= MAX_NAME_CHARS, "{:?} too long", name);
        prop_assert!(!name.chars().any(unsafe_char), "{:?} has a character a log field must not", name);
    }
    // The account's one `\` is the separator (none without a domain).
    let account = n.account();
    prop_assert_eq!(account.matches('\\').count(), usize::from(!n.domain.is_empty()), "{:?}", account);
    Ok(())
}

/// Arbitrary bytes.
fn arbitrary_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..600)
}

/// `bytes` as a raw message, a GSS token, and a token's text (as sent, and base64 encoded)
/// under either scheme: no panic, any names found are log-safe, and no error (`Display` or
/// `Debug`) nor parsed message (`Debug`, but for the names) shows bytes of the token or of
/// what it decodes to ([`ntlm_fuzz::leak::shown`]).
fn parses_safely(bytes: &[u8]) -> TestCaseResult {
    let b64 = STANDARD.encode(bytes);
    let mut parsed =
        vec![parse_message(bytes).map(Some), ntlm_in_gss(bytes).and_then(|m| m.map(parse_message).transpose())];
    for scheme in [Scheme::Ntlm, Scheme::Negotiate] {
        parsed.push(parse_token(scheme, bytes));
        parsed.push(parse_token(scheme, b64.as_bytes()));
    }
    let mut texts = Vec::new();
    for p in &parsed {
        if let Ok(Some(Message::Authenticate(n))) = p {
            log_safe(n)?;
        }
        texts.push(shown_text(p));
    }
    texts.sort_unstable();
    texts.dedup();
    let texts = texts.join("\n");
    let decoded = BASE64.decode(bytes).ok();
    for secret in [Some(bytes), Some(b64.as_bytes()), decoded.as_deref()].into_iter().flatten() {
        if let Some(how) = ntlm_fuzz::leak::shown(&texts, secret) {
            return Err(TestCaseError::fail(format!("{how}: {texts}")));
        }
    }
    Ok(())
}

/// What a parse result shows in a log or a failure message: an error's `Display` and `Debug`,
/// a message's `Debug` without the names (token bytes by design, escaped).
fn shown_text(parsed: &Result<Option<Message>, MessageError>) -> String {
    match parsed {
        Ok(Some(Message::Authenticate(n))) => {
            let mut debug = format!("{parsed:?}");
            for name in [&n.domain, &n.user, &n.workstation] {
                debug = debug.replacen(&format!("{name:?}"), "", 1);
            }
            debug
        }
        Ok(_) => format!("{parsed:?}"),
        Err(e) => format!("{e}\n{e:?}"),
    }
}

/// A valid AUTHENTICATE message, raw, in a SPNEGO NegTokenInit or in a NegTokenResp, with
/// bytes overwritten and cut short.
fn mutated_message() -> impl Strategy<Value = Vec<u8>> {
    let edits = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12);
    (0usize..3, edits, any::<prop::sample::Index>()).prop_map(|(which, edits, cut)| {
        let msg = unicode_message("DOMAIN", "user", "WORKSTATION");
        let mut m = [msg.clone(), spnego_init(NTLM_OID, Some(&msg), &[]), spnego_resp(&msg)][which].clone();
        for (at, b) in edits {
            let i = at.index(m.len());
            m[i] = b;
        }
        m.truncate(cut.index(m.len() + 1));
        m
    })
}

/// The tokens real clients and servers sent (`fixtures/`: NEGOTIATE, CHALLENGE and
/// AUTHENTICATE messages, under `NTLM` and in SPNEGO under `Negotiate`), the [MS-NLMP]
/// example, and built Unicode and OEM AUTHENTICATE messages, each raw and wrapped in a SPNEGO
/// NegTokenInit and NegTokenResp, decoded: the seeds random edits start from.
fn valid_tokens() -> Vec<Vec<u8>> {
    let captured = FIXTURES.iter().flat_map(|f| [f.tokens(Dir::Up), f.tokens(Dir::Down)]).flatten();
    let decoded: Vec<Vec<u8>> =
        captured.map(|(_, token)| BASE64.decode(token).expect("a captured token is base64")).collect();
    let raw = decoded
        .iter()
        .filter_map(|t| ntlm_in_gss(t).expect("a captured token is well-formed").map(<[u8]>::to_vec))
        .chain([
            unhex(MS_NLMP_AUTHENTICATE),
            unicode_message("EXAMPLE", "alice", "WORKSTATION"),
            authenticate_message(0, b"EXAMPLE", b"alice", b"PC-1"),
        ])
        .collect::<Vec<_>>();
    let wrapped = raw.iter().flat_map(|m| [spnego_init(NTLM_OID, Some(m), &[]), spnego_resp(m)]);
    let mut all: Vec<Vec<u8>> = decoded.iter().cloned().chain(raw.iter().cloned()).chain(wrapped).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Valid tokens ([`valid_tokens`]) with a few random edits (see [`ntlm_fuzz::havoc`]).
fn havoc_on_valid_tokens() -> impl Strategy<Value = Vec<u8>> {
    ntlm_fuzz::havoc(prop::sample::select(valid_tokens()))
}

/// Any UTF-16 code units as a name, and a name of characters that need no escape.
fn any_names() -> impl Strategy<Value = (Vec<u16>, String)> {
    (proptest::collection::vec(any::<u16>(), 0..300), "[A-Za-z0-9._@-]{0,40}")
}

/// The Unicode and the OEM message of [`escapes_any_keeps_plain`]: the code units as the
/// domain (and the workstation of the Unicode one), the plain name as the user.
fn names_messages((units, plain): &(Vec<u16>, String)) -> [Vec<u8>; 2] {
    let bytes: Vec<u8> = units.iter().flat_map(|u| u.to_le_bytes()).collect();
    let unicode = authenticate_message(NEGOTIATE_UNICODE, &bytes, &utf16(plain), &bytes);
    let oem = authenticate_message(0, &bytes, plain.as_bytes(), &[]);
    [unicode, oem]
}

/// Any name comes out log-safe, in Unicode and OEM messages; a plain name comes out as is.
fn escapes_any_keeps_plain(names: (Vec<u16>, String)) -> TestCaseResult {
    let plain = &names.1;
    for msg in names_messages(&names) {
        let parsed = parse_message(&msg);
        let Ok(Message::Authenticate(n)) = parsed else { return Err(TestCaseError::fail(format!("{parsed:?}"))) };
        log_safe(&n)?;
        prop_assert_eq!(&n.user, plain);
    }
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_names_are_log_safe(bytes in arbitrary_bytes()) {
        parses_safely(&bytes)?;
    }

    #[test]
    fn mutated_messages_never_panic_and_names_are_log_safe(m in mutated_message()) {
        parses_safely(&m)?;
    }

    #[test]
    fn valid_tokens_with_random_edits_never_panic_and_names_are_log_safe(m in havoc_on_valid_tokens()) {
        parses_safely(&m)?;
    }

    #[test]
    fn any_name_is_escaped_and_plain_names_kept(n in any_names()) {
        escapes_any_keeps_plain(n)?;
    }
}

/// The properties above on fresh cases for a time budget instead of proptest's 256 (see the
/// `ntlm_fuzz` crate): the product's parser of `Authorization` tokens.
#[test]
#[ignore = "fuzz target: `cargo xtask test` runs it for NTLM_SPLICE_FUZZ_SECS"]
fn fuzz_ntlm_message() {
    ntlm_fuzz::Target::new("ntlm_message")
        .property("arbitrary bytes", arbitrary_bytes(), Clone::clone, |b| parses_safely(&b))
        .property("mutated messages", mutated_message(), Clone::clone, |b| parses_safely(&b))
        .property("havoc on valid tokens", havoc_on_valid_tokens(), Clone::clone, |b| parses_safely(&b))
        .property("any names", any_names(), |n| names_messages(n)[0].clone(), escapes_any_keeps_plain)
        .run();
}

#[test]
fn the_seeds_of_random_edits_are_every_kind_of_message_in_both_wrappings() {
    let seeds = valid_tokens();
    let mut kinds: Vec<_> = seeds
        .iter()
        .filter_map(|t| {
            // pyspnego's last token carries no NTLM message: a seed all the same.
            let inner = ntlm_in_gss(t).unwrap()?;
            let kind = match parse_message(inner).unwrap() {
                Message::Authenticate(_) => 3,
                Message::Challenge => 2,
                Message::Negotiate => 1,
            };
            Some((kind, t.starts_with(SIGNATURE)))
        })
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds, [(1, false), (1, true), (2, false), (2, true), (3, false), (3, true)]);
}
