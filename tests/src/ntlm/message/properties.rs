//! Property tests and the fuzz target of the NTLM message parser: `ntlm-testd` parses what
//! real clients send, so the parser takes outside input. Built messages round trip, and no
//! input (arbitrary bytes, or valid messages with random edits) panics a parser, makes it
//! return more bytes than it was given, or shows a response in `Debug` output.

use proptest::prelude::*;

use super::tests::ms_nlmp_authenticate;
use super::*;

/// Proptest cases per property: enough to reach the corners, quick in a debug build.
const CASES: u32 = 2000;

/// Every AV pair id [MS-NLMP] 2.2.2.1 defines (0 to 10), and one past them.
const AV_IDS: std::ops::RangeInclusive<u16> = 0..=11;

/// The shortest response whose `Debug` form could not turn up in a parsed message's other
/// fields by chance: 8 bytes print as `[a, b, c, d, e, f, g, h]`.
const SHOWN_RESPONSE: usize = 8;

/// Negotiate flags: arbitrary, or the ones clients send, with either character set.
fn any_flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        any::<bool>().prop_map(|unicode| {
            let charset = if unicode { flags::UNICODE } else { flags::OEM };
            challenge_flags(charset | flags::ECHOED)
        }),
    ]
}

/// A string that survives the character set of `flags`: anything in UTF-16, Latin-1 only
/// in the OEM code page (which the parser reads as Latin-1).
fn text_for(flags: u32) -> BoxedStrategy<String> {
    if flags & flags::UNICODE != 0 {
        ".{0,24}".boxed()
    } else {
        "[\\x{20}-\\x{ff}]{0,24}".boxed()
    }
}

/// The names a server advertises.
fn server_names() -> impl Strategy<Value = ServerNames> {
    (
        "[A-Z0-9-]{1,15}",
        "[A-Z0-9-]{1,15}",
        "[a-z0-9.-]{1,30}",
        "[a-z0-9.-]{1,40}",
    )
        .prop_map(
            |(nb_domain, nb_computer, dns_domain, dns_computer)| ServerNames {
                nb_domain,
                nb_computer,
                dns_domain,
                dns_computer,
            },
        )
}

/// The inputs of [`challenge_message`].
#[derive(Debug, Clone)]
struct ChallengeCase {
    flags: u32,
    server_challenge: [u8; 8],
    names: ServerNames,
    timestamp: u64,
}

impl ChallengeCase {
    fn message(&self) -> Vec<u8> {
        challenge_message(
            self.flags,
            &self.server_challenge,
            &self.names,
            self.timestamp,
        )
    }
}

fn challenge_case() -> impl Strategy<Value = ChallengeCase> {
    (any_flags(), any::<[u8; 8]>(), server_names(), any::<u64>()).prop_map(
        |(flags, server_challenge, names, timestamp)| ChallengeCase {
            flags,
            server_challenge,
            names,
            timestamp,
        },
    )
}

/// The inputs of [`authenticate_message`]: the challenge it answers and the client's side.
#[derive(Debug, Clone)]
struct AuthenticateCase {
    challenge: ChallengeCase,
    domain: String,
    user: String,
    password: String,
    workstation: String,
    client_challenge: [u8; 8],
    now: u64,
}

impl AuthenticateCase {
    fn parsed_challenge(&self) -> Challenge {
        parse_challenge(&self.challenge.message()).expect("a built challenge parses")
    }

    fn message(&self) -> Vec<u8> {
        let creds = Credentials {
            domain: &self.domain,
            user: &self.user,
            password: &self.password,
        };
        authenticate_message(
            &self.parsed_challenge(),
            &creds,
            &self.workstation,
            &self.client_challenge,
            self.now,
        )
    }
}

fn authenticate_case() -> impl Strategy<Value = AuthenticateCase> {
    challenge_case().prop_flat_map(|challenge| {
        let text = || text_for(challenge.flags);
        (
            Just(challenge.clone()),
            (text(), text(), ".{0,16}", text()),
            any::<[u8; 8]>(),
            any::<u64>(),
        )
            .prop_map(
                |(challenge, (domain, user, password, workstation), client_challenge, now)| {
                    AuthenticateCase {
                        challenge,
                        domain,
                        user,
                        password,
                        workstation,
                        client_challenge,
                        now,
                    }
                },
            )
    })
}

/// The signature, a message type (mostly a real one) and arbitrary bytes.
fn arbitrary_message() -> impl Strategy<Value = Vec<u8>> {
    let message_type = prop_oneof![
        4 => 1u32..=3,
        1 => any::<u32>(),
    ];
    (
        message_type,
        prop::collection::vec(any::<u8>(), 0..160),
        any::<bool>(),
    )
        .prop_map(|(message_type, rest, signed)| {
            let start = if signed { &SIGNATURE[..] } else { &[][..] };
            [start, &message_type.to_le_bytes(), &rest].concat()
        })
}

/// Valid messages, built or from [MS-NLMP], with a few random edits (see
/// [`ntlm_fuzz::havoc`]).
fn havoc_on_valid_messages() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        any_flags().prop_map(negotiate_message),
        challenge_case().prop_map(|c| c.message()),
        authenticate_case().prop_map(|c| c.message()),
        Just(ms_nlmp_authenticate()),
    ];
    ntlm_fuzz::havoc(valid)
}

/// Length in bytes of `s` as the message carried it.
fn encoded_len(s: &str, unicode: bool) -> usize {
    if unicode {
        2 * s.encode_utf16().count()
    } else {
        s.chars().count()
    }
}

/// Every parser, on any bytes: no panic, nothing longer than the input comes out, and the
/// `Debug` output of a parsed message shows no response or challenge.
fn parsers_hold(buf: &[u8]) -> Result<(), TestCaseError> {
    let _type_does_not_matter = message_type(buf);
    let _flags_do_not_matter = parse_negotiate(buf);
    if let Ok(ch) = parse_challenge(buf) {
        let unicode = ch.flags & flags::UNICODE != 0;
        prop_assert!(encoded_len(&ch.target_name, unicode) <= buf.len());
        prop_assert!(ch.target_info.len() <= buf.len());
        for id in AV_IDS {
            if let Some(value) = ch.av_pair(id) {
                prop_assert!(value.len() + 4 <= ch.target_info.len(), "AV pair {id}");
            }
        }
        let debug = format!("{ch:?}");
        let challenge = format!("{:?}", ch.server_challenge);
        prop_assert!(
            !debug.contains(challenge.trim_matches(['[', ']'])),
            "{}",
            debug
        );
    }
    if let Ok(msg) = parse_authenticate(buf) {
        let unicode = msg.flags & flags::UNICODE != 0;
        // Fields may overlap, so each one is within the input, not their sum.
        prop_assert!(msg.lm_response.len() <= buf.len() && msg.nt_response.len() <= buf.len());
        for field in [&msg.domain, &msg.user, &msg.workstation] {
            prop_assert!(encoded_len(field, unicode) <= buf.len());
        }
        let debug = format!("{msg:?}");
        for response in [&msg.lm_response, &msg.nt_response] {
            if response.len() >= SHOWN_RESPONSE {
                let shown = format!("{:?}", &response[..SHOWN_RESPONSE]);
                prop_assert!(
                    !debug.contains(shown.trim_matches(['[', ']'])),
                    "a response in {}",
                    debug
                );
            }
        }
    }
    Ok(())
}

/// A built NEGOTIATE gives back its flags.
fn negotiate_round_trips(flags: u32) -> Result<(), TestCaseError> {
    let msg = negotiate_message(flags);
    prop_assert_eq!(message_type(&msg), Ok(NEGOTIATE));
    prop_assert_eq!(parse_negotiate(&msg), Ok(Negotiate { flags }));
    Ok(())
}

/// A built CHALLENGE gives back its flags, challenge, target name and AV pairs.
fn challenge_round_trips(case: ChallengeCase) -> Result<(), TestCaseError> {
    let ch = parse_challenge(&case.message()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(ch.flags, case.flags);
    prop_assert_eq!(ch.server_challenge, case.server_challenge);
    prop_assert_eq!(&ch.target_name, &case.names.nb_domain);
    let names = &case.names;
    for (id, name) in [
        (av::NB_DOMAIN_NAME, &names.nb_domain),
        (av::NB_COMPUTER_NAME, &names.nb_computer),
        (av::DNS_DOMAIN_NAME, &names.dns_domain),
        (av::DNS_COMPUTER_NAME, &names.dns_computer),
    ] {
        prop_assert_eq!(
            ch.av_pair(id),
            Some(&crypto::utf16le(name)[..]),
            "AV pair {}",
            id
        );
    }
    prop_assert_eq!(
        ch.av_pair(av::TIMESTAMP),
        Some(&case.timestamp.to_le_bytes()[..])
    );
    Ok(())
}

/// A built AUTHENTICATE gives back the client's names and a response that verifies with its
/// password, and not with another.
fn authenticate_round_trips(case: AuthenticateCase) -> Result<(), TestCaseError> {
    let msg =
        parse_authenticate(&case.message()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let challenge = case.parsed_challenge();
    prop_assert_eq!(
        (&msg.domain, &msg.user, &msg.workstation),
        (&case.domain, &case.user, &case.workstation)
    );
    prop_assert_eq!(
        msg.flags,
        challenge.flags & !(flags::KEY_EXCH | flags::SIGN | flags::SEAL)
    );
    let verify = |password: &str| {
        crypto::verify_ntlmv2(
            password,
            &msg.user,
            &msg.domain,
            &challenge.server_challenge,
            &msg.nt_response,
        )
    };
    prop_assert!(verify(&case.password));
    let other = format!("{}x", case.password);
    prop_assert!(!verify(&other), "another password verifies");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// See [`parsers_hold`].
    #[test]
    fn arbitrary_messages_never_panic_nor_leak(buf in arbitrary_message()) {
        parsers_hold(&buf)?;
    }

    /// See [`parsers_hold`].
    #[test]
    fn valid_messages_with_random_edits_never_panic_nor_leak(buf in havoc_on_valid_messages()) {
        parsers_hold(&buf)?;
    }

    /// See [`negotiate_round_trips`].
    #[test]
    fn negotiate_messages_round_trip(flags in any_flags()) {
        negotiate_round_trips(flags)?;
    }

    /// See [`challenge_round_trips`].
    #[test]
    fn challenge_messages_round_trip(case in challenge_case()) {
        challenge_round_trips(case)?;
    }

    /// See [`authenticate_round_trips`].
    #[test]
    fn authenticate_messages_round_trip(case in authenticate_case()) {
        authenticate_round_trips(case)?;
    }
}

/// The NTLM message properties above, on fresh cases for a time budget instead of [`CASES`]
/// cases (see the `ntlm_fuzz` crate). These are the parsers of the test server (`ntlm-testd`);
/// the product's are fuzzed by `ntlm_splice::ntlm::message`'s `fuzz_ntlm_message`.
#[test]
#[ignore = "fuzz target: `cargo xtask test` runs it for NTLM_SPLICE_FUZZ_SECS"]
fn fuzz_test_server_ntlm_message() {
    ntlm_fuzz::Target::new("test_server_ntlm_message")
        .property(
            "arbitrary messages",
            arbitrary_message(),
            Clone::clone,
            |b| parsers_hold(&b),
        )
        .property(
            "havoc on valid messages",
            havoc_on_valid_messages(),
            Clone::clone,
            |b| parsers_hold(&b),
        )
        .property(
            "negotiate round trip",
            any_flags(),
            |&f| negotiate_message(f),
            negotiate_round_trips,
        )
        .property(
            "challenge round trip",
            challenge_case(),
            ChallengeCase::message,
            challenge_round_trips,
        )
        .property(
            "authenticate round trip",
            authenticate_case(),
            AuthenticateCase::message,
            authenticate_round_trips,
        )
        .run();
}
