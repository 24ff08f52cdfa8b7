//! The HTTP exchanges captured from real NTLM clients (`fixtures/`, recorded by
//! `fixtures/capture.sh`), and what the observer must read in each.

use crate::lifecycle::Dir;

/// One captured connection.
pub(crate) struct Fixture {
    /// The file name, for failure messages.
    pub file: &'static str,
    /// The recording: records of a direction byte (`>` client to backend, `<` backend to
    /// client), a big-endian u32 length and the bytes (fixtures/record.py).
    pub bytes: &'static [u8],
    /// The login in it: domain, user, workstation, and the status of the response to the
    /// AUTHENTICATE; None for a client that does not log in.
    pub login: Option<(&'static str, &'static str, &'static str, u16)>,
}

/// Every capture, with its login as the client was told to make it (`capture.sh`), the
/// workstation as the client sent it (curl's fixed name, else the capturing host's name).
pub(crate) const FIXTURES: &[Fixture] = &[
    // curl 7.88.1 --ntlm -u 'EXAMPLE\alice:Alice-Pass-1' (OEM strings, not Unicode)
    Fixture {
        file: "curl_ok.bin",
        bytes: include_bytes!("../fixtures/curl_ok.bin"),
        login: Some(("EXAMPLE", "alice", "WORKSTATION", 200)),
    },
    // the same with a wrong password
    Fixture {
        file: "curl_denied.bin",
        bytes: include_bytes!("../fixtures/curl_denied.bin"),
        login: Some(("EXAMPLE", "alice", "WORKSTATION", 401)),
    },
    // curl without credentials: one request, a 401 offering NTLM, the client closes
    Fixture { file: "curl_anonymous.bin", bytes: include_bytes!("../fixtures/curl_anonymous.bin"), login: None },
    // requests-ntlm 1.3.0: an anonymous request, its 401, then NTLM (Unicode strings)
    Fixture {
        file: "requests_ntlm_ok.bin",
        bytes: include_bytes!("../fixtures/requests_ntlm_ok.bin"),
        login: Some(("EXAMPLE", "bob", "VM", 200)),
    },
    // pyspnego 0.12.4 Negotiate without Kerberos: NTLM inside SPNEGO, against
    // spnego_server.py (pyspnego's acceptor)
    Fixture {
        file: "spnego_ok.bin",
        bytes: include_bytes!("../fixtures/spnego_ok.bin"),
        login: Some(("EXAMPLE", "carol", "VM", 200)),
    },
];

impl Fixture {
    /// The turns of the exchange: what one side sent before the other answered, in order.
    pub fn turns(&self) -> Vec<(Dir, Vec<u8>)> {
        let mut turns: Vec<(Dir, Vec<u8>)> = Vec::new();
        let mut rest = self.bytes;
        while !rest.is_empty() {
            let (tag, len) = (rest[0], u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize);
            let dir = match tag {
                b'>' => Dir::Up,
                b'<' => Dir::Down,
                t => panic!("{}: bad record tag {t}", self.file),
            };
            let data = &rest[5..5 + len];
            rest = &rest[5 + len..];
            match turns.last_mut() {
                Some((d, bytes)) if *d == dir => bytes.extend_from_slice(data),
                _ => turns.push((dir, data.to_vec())),
            }
        }
        turns
    }

    /// Everything one direction carried.
    pub fn stream(&self, dir: Dir) -> Vec<u8> {
        self.turns().into_iter().filter(|(d, _)| *d == dir).flat_map(|(_, b)| b).collect()
    }

    /// The `Authorization` / `WWW-Authenticate` tokens of a direction, in order, found by a
    /// plain search of the text (not by the scanner under test): (scheme, token).
    pub fn tokens(&self, dir: Dir) -> Vec<(String, Vec<u8>)> {
        let field = match dir {
            Dir::Up => "\r\nAuthorization: ",
            Dir::Down => "\r\nWWW-Authenticate: ",
        };
        let text = String::from_utf8_lossy(&self.stream(dir)).into_owned();
        text.match_indices(field)
            .filter_map(|(at, _)| {
                let line = text[at + field.len()..].split("\r\n").next().unwrap();
                let (scheme, token) = line.split_once(' ')?;
                Some((scheme.to_string(), token.as_bytes().to_vec()))
            })
            .collect()
    }
}
