//! NTLM messages as HTTP carries them: the token of an `Authorization: NTLM <base64>` or
//! `Authorization: Negotiate <base64>` header, raw NTLMSSP or wrapped in SPNEGO
//! ([RFC 4178]), read strictly with bounds checks ([MS-NLMP] 2.2.1).
//!
//! Only what the access log and the guard need is kept: the message type, and from an
//! AUTHENTICATE message the domain, user and workstation names, escaped so that they are safe
//! inside a quoted log field ([`Names`]). The LM and NT responses, the session key, the MIC
//! and the challenge are bounds-checked where the format says they are, and never copied.
//!
//! [RFC 4178]: https://www.rfc-editor.org/rfc/rfc4178
//! [MS-NLMP]: https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-nlmp/

use std::fmt;

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};

/// `NTLMSSP\0`, the first 8 bytes of every NTLM message.
pub const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";
/// MessageType of a NEGOTIATE_MESSAGE (type 1).
const NEGOTIATE: u32 = 1;
/// MessageType of a CHALLENGE_MESSAGE (type 2).
const CHALLENGE: u32 = 2;
/// MessageType of an AUTHENTICATE_MESSAGE (type 3).
const AUTHENTICATE: u32 = 3;
/// Signature and MessageType: what every message has.
const COMMON_HEADER_LEN: usize = 12;
/// The fixed part of an AUTHENTICATE_MESSAGE up to and including NegotiateFlags; the
/// payload (the fields' bytes) comes after it.
const AUTHENTICATE_HEADER_LEN: usize = 64;
/// Offset of NegotiateFlags in an AUTHENTICATE_MESSAGE.
const AUTHENTICATE_FLAGS_AT: usize = 60;
/// NTLMSSP_NEGOTIATE_UNICODE: the message's strings are UTF-16LE, else OEM code page.
const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
/// Longest name kept, in characters after escaping; longer names are cut there. Windows
/// account names are at most 20 characters (sAMAccountName), NetBIOS names 15; a UPN
/// (`user@dns.domain`) can be longer but rarely this long.
pub const MAX_NAME_CHARS: usize = 256;

/// The AUTHENTICATE_MESSAGE's (Len, MaxLen, Offset) fields, in message order, with the
/// offset of each. The responses and the session key are only bounds-checked.
const FIELDS: [(&str, usize); 6] = [
    ("LmChallengeResponse", 12),
    ("NtChallengeResponse", 20),
    ("DomainName", 28),
    ("UserName", 36),
    ("Workstation", 44),
    ("EncryptedRandomSessionKey", 52),
];

/// Base64 as clients send tokens: the standard alphabet, padding optional (some clients
/// drop it), nothing else tolerated (no whitespace, no URL-safe alphabet).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The OID of SPNEGO, 1.3.6.1.5.5.2, as DER content bytes.
const SPNEGO_OID: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x02];
/// DER tag of the GSS-API InitialContextToken, `[APPLICATION 0]` constructed.
const TAG_GSS_INITIAL: u8 = 0x60;
/// DER tag of an OBJECT IDENTIFIER.
const TAG_OID: u8 = 0x06;
/// DER tag of an OCTET STRING.
const TAG_OCTET_STRING: u8 = 0x04;
/// DER tag of a SEQUENCE.
const TAG_SEQUENCE: u8 = 0x30;
/// NegotiationToken choice `negTokenInit [0]`, and the context tag of field 0.
const TAG_CONTEXT_0: u8 = 0xa0;
/// NegotiationToken choice `negTokenResp [1]`.
const TAG_CONTEXT_1: u8 = 0xa1;
/// NegTokenInit's `mechToken [2]` and NegTokenResp's `responseToken [2]`.
const TAG_CONTEXT_2: u8 = 0xa2;

/// The HTTP authentication scheme a token came under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `NTLM`: the token is an NTLM message.
    Ntlm,
    /// `Negotiate`: a GSS-API token, SPNEGO (which may carry NTLM or Kerberos), raw
    /// Kerberos, or (IIS accepts it) a raw NTLM message.
    Negotiate,
}

impl Scheme {
    /// The scheme named `name` (case-insensitive, as HTTP auth schemes are), if it is one of
    /// these two.
    pub fn parse(name: &str) -> Option<Scheme> {
        if name.eq_ignore_ascii_case("NTLM") {
            Some(Scheme::Ntlm)
        } else if name.eq_ignore_ascii_case("Negotiate") {
            Some(Scheme::Negotiate)
        } else {
            None
        }
    }
}

/// An NTLM message, as far as the observer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// NEGOTIATE_MESSAGE (type 1): a client starts a login.
    Negotiate,
    /// CHALLENGE_MESSAGE (type 2): the server's challenge.
    Challenge,
    /// AUTHENTICATE_MESSAGE (type 3): the client's answer, and who it claims to be.
    Authenticate(Names),
}

/// The names of an AUTHENTICATE message, escaped for a quoted log field: no `"`, `\`,
/// control, bidirectional-override or invisible characters (each is written `%XX` or
/// `%u{XXXX}`, and `%` itself `%25`), at most [`MAX_NAME_CHARS`] characters each. Bytes of
/// an OEM-encoded (non-Unicode) name above 0x7f are written `%XX`: the code page is not
/// known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// DomainName, as the client wrote it (may be empty, e.g. with a UPN user name).
    pub domain: String,
    /// UserName, as the client wrote it.
    pub user: String,
    /// Workstation, as the client wrote it (may be empty).
    pub workstation: String,
}

impl Names {
    /// `DOMAIN\user`, or `user` when the domain is empty. Unambiguous: neither name can
    /// contain a `\` (it is escaped).
    pub fn account(&self) -> String {
        if self.domain.is_empty() { self.user.clone() } else { format!("{}\\{}", self.domain, self.user) }
    }
}

/// Why a token is not a well-formed NTLM message. Carries no byte of the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    /// The token is not base64.
    #[error("the token is not base64")]
    Base64,
    /// The bytes under `NTLM` (or under `Negotiate`, outside SPNEGO) do not start with
    /// `NTLMSSP\0`.
    #[error("not an NTLM message ({len} bytes without the NTLMSSP signature)")]
    NotNtlm {
        /// Length of the bytes.
        len: usize,
    },
    /// A message shorter than its fixed header.
    #[error("NTLM message type {message_type} cut short at {len} bytes (its header needs {need})")]
    Truncated {
        /// MessageType.
        message_type: u32,
        /// Length of the message.
        len: usize,
        /// Length of its fixed header.
        need: usize,
    },
    /// A MessageType other than 1, 2 or 3.
    #[error("unknown NTLM message type {0}")]
    UnknownType(u32),
    /// A (length, offset) field points outside the message's payload.
    #[error("NTLM field {field} points outside the message")]
    OutOfBounds {
        /// The field's name in [MS-NLMP].
        field: &'static str,
    },
    /// A UTF-16LE name of odd length.
    #[error("NTLM field {field} has an odd length for UTF-16")]
    OddLength {
        /// The field's name in [MS-NLMP].
        field: &'static str,
    },
    /// A GSS-API/SPNEGO token that is not valid DER where it should carry NTLM.
    #[error("malformed SPNEGO token: {0}")]
    Der(&'static str),
}

/// Decodes and parses the token of an `Authorization` (or `WWW-Authenticate`) header under
/// `scheme`. `Ok(None)`: a well-formed GSS-API token that is not NTLM (Kerberos, or SPNEGO
/// carrying Kerberos or no token): not an error, just nothing the observer reads.
pub fn parse_token(scheme: Scheme, token: &[u8]) -> Result<Option<Message>, MessageError> {
    let bytes = BASE64.decode(token).map_err(|_| MessageError::Base64)?;
    let ntlm = match scheme {
        Scheme::Ntlm => Some(&bytes[..]),
        Scheme::Negotiate => ntlm_in_gss(&bytes)?,
    };
    ntlm.map(parse_message).transpose()
}

/// Finds the NTLM message in a `Negotiate` token: the token itself when it starts with the
/// NTLMSSP signature (raw NTLM, as IIS accepts), else the SPNEGO mechToken (NegTokenInit)
/// or responseToken (NegTokenResp), found by parsing the DER structure rather than by
/// scanning for the signature, so a signature inside another field (a Kerberos ticket's
/// bytes) is never taken for a message. `Ok(None)`: well-formed, but no NTLM in it.
pub fn ntlm_in_gss(token: &[u8]) -> Result<Option<&[u8]>, MessageError> {
    if token.starts_with(SIGNATURE) {
        return Ok(Some(token));
    }
    let (tag, body, rest) = der(token)?;
    if !rest.is_empty() {
        return Err(MessageError::Der("bytes after the token"));
    }
    let inner = match tag {
        // InitialContextToken: thisMech OID, then (for SPNEGO) the NegotiationToken.
        TAG_GSS_INITIAL => {
            let (tag, oid, rest) = der(body)?;
            if tag != TAG_OID {
                return Err(MessageError::Der("the initial token does not start with a mechanism OID"));
            }
            if oid != SPNEGO_OID {
                return Ok(None); // Kerberos (1.2.840.113554.1.2.2) or another mechanism
            }
            let (tag, init, rest) = der(rest)?;
            if tag != TAG_CONTEXT_0 || !rest.is_empty() {
                return Err(MessageError::Der("the SPNEGO initial token is not one negTokenInit"));
            }
            init
        }
        // A later token: NegTokenResp, without the GSS-API framing.
        TAG_CONTEXT_1 => body,
        _ => return Err(MessageError::Der("neither an initial token nor a negTokenResp")),
    };
    let (tag, mut fields, rest) = der(inner)?;
    if tag != TAG_SEQUENCE || !rest.is_empty() {
        return Err(MessageError::Der("the SPNEGO token is not one SEQUENCE"));
    }
    // NegTokenInit and NegTokenResp both carry their mechanism's token in field [2], an
    // OCTET STRING; the other fields (mechanism lists, flags, state, MIC) are skipped.
    while !fields.is_empty() {
        let (tag, field, rest) = der(fields)?;
        fields = rest;
        if tag == TAG_CONTEXT_2 {
            let (tag, mech, rest) = der(field)?;
            if tag != TAG_OCTET_STRING || !rest.is_empty() {
                return Err(MessageError::Der("the mechanism token is not one OCTET STRING"));
            }
            return Ok(mech.starts_with(SIGNATURE).then_some(mech));
        }
    }
    Ok(None)
}

/// One DER TLV at the start of `buf`: (tag, contents, what follows). Single-byte tags and
/// definite lengths of up to 4 bytes only (SPNEGO needs no more); every length is checked
/// against the bytes there are.
fn der(buf: &[u8]) -> Result<(u8, &[u8], &[u8]), MessageError> {
    let [tag, first, rest @ ..] = buf else { return Err(MessageError::Der("truncated tag or length")) };
    if tag & 0x1f == 0x1f {
        return Err(MessageError::Der("multi-byte tag"));
    }
    let (len, rest) = match *first {
        n @ 0..=0x7f => (usize::from(n), rest),
        0x80 => return Err(MessageError::Der("indefinite length")),
        n => {
            let count = usize::from(n & 0x7f);
            if count > 4 || rest.len() < count {
                return Err(MessageError::Der("length of length out of range"));
            }
            let (digits, rest) = rest.split_at(count);
            (digits.iter().fold(0usize, |acc, &d| (acc << 8) | usize::from(d)), rest)
        }
    };
    if len > rest.len() {
        return Err(MessageError::Der("length past the end of the token"));
    }
    let (contents, rest) = rest.split_at(len);
    Ok((*tag, contents, rest))
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Parses raw NTLM message bytes: the type of any message, and the names of an
/// AUTHENTICATE message.
pub fn parse_message(buf: &[u8]) -> Result<Message, MessageError> {
    if buf.len() < COMMON_HEADER_LEN || !buf.starts_with(SIGNATURE) {
        return Err(MessageError::NotNtlm { len: buf.len() });
    }
    match u32_at(buf, 8) {
        NEGOTIATE => Ok(Message::Negotiate),
        CHALLENGE => Ok(Message::Challenge),
        AUTHENTICATE => authenticate(buf).map(Message::Authenticate),
        t => Err(MessageError::UnknownType(t)),
    }
}

/// The names of an AUTHENTICATE_MESSAGE, after every field's bounds were checked.
fn authenticate(buf: &[u8]) -> Result<Names, MessageError> {
    if buf.len() < AUTHENTICATE_HEADER_LEN {
        return Err(MessageError::Truncated {
            message_type: AUTHENTICATE,
            len: buf.len(),
            need: AUTHENTICATE_HEADER_LEN,
        });
    }
    let mut payload: [&[u8]; 6] = [&[]; 6];
    for (slot, (name, at)) in payload.iter_mut().zip(FIELDS) {
        *slot = field(buf, at, name)?;
    }
    let unicode = u32_at(buf, AUTHENTICATE_FLAGS_AT) & NEGOTIATE_UNICODE != 0;
    let [_lm, _nt, domain, user, workstation, _key] = payload;
    Ok(Names {
        domain: name(domain, unicode, "DomainName")?,
        user: name(user, unicode, "UserName")?,
        workstation: name(workstation, unicode, "Workstation")?,
    })
}

/// The payload bytes a (Len u16, MaxLen u16, Offset u32) field at `at` points to: inside
/// the message and after its fixed header. An empty field may point anywhere.
fn field<'a>(buf: &'a [u8], at: usize, name: &'static str) -> Result<&'a [u8], MessageError> {
    let len = usize::from(u16_at(buf, at));
    if len == 0 {
        return Ok(&[]);
    }
    let offset = usize::try_from(u32_at(buf, at + 4)).map_err(|_| MessageError::OutOfBounds { field: name })?;
    match offset.checked_add(len) {
        Some(end) if offset >= AUTHENTICATE_HEADER_LEN && end <= buf.len() => Ok(&buf[offset..end]),
        _ => Err(MessageError::OutOfBounds { field: name }),
    }
}

/// A name field, decoded (UTF-16LE, or OEM bytes) and escaped ([`Names`]).
fn name(bytes: &[u8], unicode: bool, field: &'static str) -> Result<String, MessageError> {
    let mut out = Escaped::default();
    if unicode {
        if !bytes.len().is_multiple_of(2) {
            return Err(MessageError::OddLength { field });
        }
        let units = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        for c in char::decode_utf16(units) {
            // An unpaired surrogate is written as its code unit.
            let piece = c.map_or_else(|e| Piece::Unit(e.unpaired_surrogate()), Piece::Char);
            if !out.push(piece) {
                break;
            }
        }
    } else {
        for &b in bytes {
            let piece = if b.is_ascii() { Piece::Char(char::from(b)) } else { Piece::Byte(b) };
            if !out.push(piece) {
                break;
            }
        }
    }
    Ok(out.0)
}

/// One unit of a name on its way into [`Escaped`].
enum Piece {
    /// A decoded character.
    Char(char),
    /// A byte of an unknown OEM code page.
    Byte(u8),
    /// A UTF-16 code unit that is not a character (an unpaired surrogate).
    Unit(u16),
}

/// A name being escaped, at most [`MAX_NAME_CHARS`] characters: the text, its length in
/// characters.
#[derive(Default)]
struct Escaped(String, usize);

impl Escaped {
    /// Appends `piece`, escaped; false once the name is full (the piece did not fit).
    fn push(&mut self, piece: Piece) -> bool {
        let text = match piece {
            Piece::Char(c) if !needs_escape(c) => return self.append(c.encode_utf8(&mut [0; 4])),
            Piece::Char(c) if u32::from(c) <= 0xff => format!("%{:02X}", u32::from(c)),
            Piece::Char(c) => format!("%u{{{:04X}}}", u32::from(c)),
            Piece::Byte(b) => format!("%{b:02X}"),
            Piece::Unit(u) => format!("%u{{{u:04X}}}"),
        };
        self.append(&text)
    }

    fn append(&mut self, text: &str) -> bool {
        let chars = text.chars().count();
        if self.1 + chars > MAX_NAME_CHARS {
            return false;
        }
        self.0.push_str(text);
        self.1 += chars;
        true
    }
}

/// Whether `c` is written escaped in a name: the escape character itself, what could end or
/// confuse a quoted log field (`"`, `\`), control characters (C0, DEL, C1), and invisible or
/// direction-changing characters that could make a log line read differently than it is
/// (zero-width, bidirectional controls, line and paragraph separators, BOM, tag characters).
fn needs_escape(c: char) -> bool {
    matches!(c, '%' | '"' | '\\')
        || c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}'
                | '\u{feff}' | '\u{e0000}'..='\u{e007f}'
        )
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Ntlm => "NTLM",
            Scheme::Negotiate => "Negotiate",
        })
    }
}

#[cfg(test)]
#[path = "tests/message.rs"]
pub(crate) mod tests;
