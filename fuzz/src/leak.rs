//! Whether a text meant for people (an error message, a `Debug` form) shows bytes of a secret
//! input, such as an `Authorization` token or the NTLM message decoded from it, in any of the
//! forms a careless `Display` or derived `Debug` would print them.

use std::{collections::HashSet, fmt::Write as _};

/// The shortest run of characters that counts as showing the secret: 16 characters are 8 bytes
/// in hex, 12 bytes of base64, 4 or more numbers of a `Debug` list. An error message's own words
/// match a run that long only when the secret holds those words.
pub const SHOWN: usize = 16;

/// A way to print bytes: its name, whether a character can be in it, and the printing.
type Form = (&'static str, fn(u8) -> bool, fn(&[u8]) -> String);

/// The ways a careless `Display` or `Debug` prints bytes.
const FORMS: [Form; 4] = [
    ("as text", |c| c.is_ascii_graphic() || c == b' ', |s| s.escape_ascii().to_string()),
    (
        "in hex",
        |c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        |s| {
            s.iter().fold(String::new(), |mut out, b| {
                write!(out, "{b:02x}").expect("writing to a String");
                out
            })
        },
    ),
    (
        "in hex",
        |c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c),
        |s| {
            s.iter().fold(String::new(), |mut out, b| {
                write!(out, "{b:02X}").expect("writing to a String");
                out
            })
        },
    ),
    ("as a list", |c| c.is_ascii_digit() || c == b',' || c == b' ', |s| format!("{s:?}")),
];

/// The first run of [`SHOWN`] characters of `text` that is also in `secret` printed one of
/// these ways: as `escape_ascii` prints it (printable ASCII as is), in lowercase or uppercase
/// hex, or as the numbers of a `Debug` list (`78, 84, 76`); `None` if there is none. The answer
/// names the form and quotes the run.
pub fn shown(text: &str, secret: &[u8]) -> Option<String> {
    if secret.is_empty() {
        return None;
    }
    FORMS.iter().find_map(|(how, allowed, print)| {
        // Only runs of characters the form has can be in it: most forms are not printed at all.
        let mut runs = text.as_bytes().windows(SHOWN).filter(|run| run.iter().all(|&c| allowed(c))).peekable();
        runs.peek()?;
        let form = print(secret);
        let windows: HashSet<&[u8]> = form.as_bytes().windows(SHOWN).collect();
        let run = runs.find(|run| windows.contains(run))?;
        Some(format!("shows {:?} of the input {how}", String::from_utf8_lossy(run)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"TlRMTVNTUAABAAAAB4IIAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn each_form_of_the_secret_is_seen() {
        let bytes = [0x4eu8, 0x54, 0x4c, 0x4d, 0x53, 0x53, 0x50, 0x00, 0xde, 0xad];
        let error = |shown: &str| format!("bad token {shown} here");
        for text in [
            error(&String::from_utf8_lossy(TOKEN)),
            error(&format!("{:?}", String::from_utf8_lossy(TOKEN))),
            error(&format!("{:?}", &bytes[..])),
            error(&bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            error(&bytes.iter().map(|b| format!("{b:02X}")).collect::<String>()),
            error(&bytes.escape_ascii().to_string()),
        ] {
            let seen = shown(&text, TOKEN).or_else(|| shown(&text, &bytes));
            assert!(seen.is_some(), "not seen in {text:?}");
        }
    }

    #[test]
    fn words_numbers_and_short_runs_are_not_the_secret() {
        let bytes = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        for text in [
            "not an NTLM message (44 bytes without the NTLMSSP signature)",
            "Truncated { message_type: 3, len: 12, need: 64 }",
            "AuthToken { scheme: Ntlm, token_len: 44 }",
            // 15 characters of the token, and 3 numbers of the bytes.
            "token TlRMTVNTUAABAAA, bytes [1, 2, 3]",
        ] {
            assert_eq!(shown(text, TOKEN), None, "{text}");
            assert_eq!(shown(text, &bytes), None, "{text}");
        }
    }
}
