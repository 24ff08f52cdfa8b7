//! Damage to valid inputs, as the "havoc" stage of coverage-guided fuzzers makes it: a few
//! random edits of a valid message reach the checks deep inside a parser, which random bytes
//! almost never get past the first length field to see.

use proptest::{collection::vec, prelude::*};

/// The most edits made to one input.
pub const MAX_EDITS: usize = 8;

/// The longest run of bytes one edit inserts, deletes or repeats.
const MAX_RUN: usize = 64;

/// Byte values at the edges of ranges and the separators of text formats.
const BYTES: &[u8] =
    &[0x00, 0x01, 0x7f, 0x80, 0xff, b'\r', b'\n', b' ', b'\t', b'"', b'0', b'9', b':', b'.', b'[', b'='];

/// Integers at the edges of 8-, 14-, 15-, 16-, 31- and 32-bit ranges (14: a TLS record's
/// largest fragment), and small ones, for length and offset fields.
const INTS: &[u32] = &[
    0,
    1,
    2,
    3,
    4,
    8,
    16,
    32,
    64,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x3fff,
    0x4000,
    0x4001,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
];

/// One edit of a byte string. Positions are [`At`]s, taken in the input as it is when the
/// edit comes; an edit that needs a byte where there is none does nothing.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Flips one bit.
    Flip {
        /// Which byte.
        at: At,
        /// Which bit, 0 to 7.
        bit: u8,
    },
    /// Overwrites one byte.
    Byte {
        /// Which byte.
        at: At,
        /// Its new value.
        value: u8,
    },
    /// Overwrites 2 or 4 bytes with an integer, in either byte order (the length fields of
    /// TLS and PROXY v2 are big-endian, NTLM's little-endian).
    Int {
        /// Where the integer starts (moved back so that it fits).
        at: At,
        /// The value.
        value: Value,
        /// 2 or 4 bytes.
        width: usize,
        /// Big-endian rather than little-endian.
        big_endian: bool,
    },
    /// Inserts bytes.
    Insert {
        /// Where, from 0 to the length.
        at: At,
        /// What.
        bytes: Vec<u8>,
    },
    /// Deletes a run of bytes.
    Delete {
        /// Where the run starts.
        at: At,
        /// Its length (shorter at the end of the input).
        len: usize,
    },
    /// Inserts a copy of a run of the input elsewhere in it.
    Repeat {
        /// Where the run starts.
        from: At,
        /// Its length (shorter at the end of the input).
        len: usize,
        /// Where the copy goes, from 0 to the length.
        to: At,
    },
    /// Cuts the input short.
    Truncate {
        /// The new length, from 0 to the length.
        at: At,
    },
}

/// A position in an input, as a fraction of its length (`usize::MAX` is the end), so that it
/// means something whatever the length is when the edit comes. Shrinks towards the start.
#[derive(Debug, Clone, Copy)]
pub struct At(pub usize);

impl At {
    /// The position in `0..size`.
    ///
    /// # Panics
    ///
    /// When `size` is 0.
    pub fn index(self, size: usize) -> usize {
        assert!(size > 0, "no position in an empty range");
        usize::try_from((size as u128 * self.0 as u128) >> usize::BITS).expect("below size")
    }
}

fn at() -> impl Strategy<Value = At> {
    any::<usize>().prop_map(At)
}

/// The integer an [`Edit::Int`] writes.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// This value.
    Fixed(u32),
    /// The input's length then, plus this (wrapping): a length field that is off by a little.
    Length(i8),
}

/// Valid inputs from `inputs`, each with 1 to [`MAX_EDITS`] random edits. Failing cases shrink
/// towards fewer edits and simpler inputs.
pub fn havoc(inputs: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (inputs, vec(edit(), 1..=MAX_EDITS)).prop_map(|(mut bytes, edits)| {
        for edit in &edits {
            apply(&mut bytes, edit);
        }
        bytes
    })
}

/// `bytes` with a place to cut them, from 0 to their length: for properties comparing the
/// parse of a prefix with that of the whole.
pub fn with_cut(bytes: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = (Vec<u8>, usize)> {
    (bytes, any::<prop::sample::Index>()).prop_map(|(bytes, cut)| {
        let cut = cut.index(bytes.len() + 1);
        (bytes, cut)
    })
}

/// One random edit.
pub fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![prop::sample::select(BYTES), any::<u8>()];
    let value = prop_oneof![
        3 => prop::sample::select(INTS).prop_map(Value::Fixed),
        1 => (-8i8..=8).prop_map(Value::Length),
    ];
    prop_oneof![
        2 => (at(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        3 => (at(), byte.clone()).prop_map(|(at, value)| Edit::Byte { at, value }),
        3 => (at(), value, prop::sample::select(&[2usize, 4][..]), any::<bool>())
            .prop_map(|(at, value, width, big_endian)| Edit::Int { at, value, width, big_endian }),
        2 => (at(), vec(byte, 1..=16)).prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        2 => (at(), 1..=MAX_RUN).prop_map(|(at, len)| Edit::Delete { at, len }),
        1 => (at(), 1..=MAX_RUN, at()).prop_map(|(from, len, to)| Edit::Repeat { from, len, to }),
        1 => at().prop_map(|at| Edit::Truncate { at }),
    ]
}

/// Applies `edit` to `bytes`.
pub fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    let len = bytes.len();
    match *edit {
        Edit::Insert { at, bytes: ref inserted } => {
            let at = at.index(len + 1);
            bytes.splice(at..at, inserted.iter().copied());
        }
        Edit::Truncate { at } => bytes.truncate(at.index(len + 1)),
        _ if len == 0 => {}
        Edit::Flip { at, bit } => bytes[at.index(len)] ^= 1 << (bit % 8),
        Edit::Byte { at, value } => bytes[at.index(len)] = value,
        Edit::Int { at, value, width, big_endian } => {
            let value = match value {
                Value::Fixed(v) => v,
                Value::Length(delta) => (len as u32).wrapping_add_signed(i32::from(delta)),
            };
            let width = width.min(len);
            let at = at.index(len).min(len - width);
            let all = if big_endian { value.to_be_bytes() } else { value.to_le_bytes() };
            let field = if big_endian { &all[4 - width..] } else { &all[..width] };
            bytes[at..at + width].copy_from_slice(field);
        }
        Edit::Delete { at, len: run } => {
            let at = at.index(len);
            bytes.drain(at..(at + run).min(len));
        }
        Edit::Repeat { from, len: run, to } => {
            let from = from.index(len);
            let copy = bytes[from..(from + run).min(len)].to_vec();
            let to = to.index(len + 1);
            bytes.splice(to..to, copy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        /// Edits never panic, on any input, the empty one included, and grow it by at most
        /// one run each.
        #[test]
        fn edits_stay_in_bounds(
            mut bytes in vec(any::<u8>(), 0..40),
            edits in vec(edit(), 1..=MAX_EDITS),
        ) {
            for edit in &edits {
                let before = bytes.len();
                apply(&mut bytes, edit);
                prop_assert!(bytes.len() <= before + MAX_RUN, "{edit:?} grew {before} bytes to {}", bytes.len());
            }
        }
    }

    #[test]
    fn integers_land_in_the_byte_order_asked_and_fit_at_the_end() {
        let mut bytes = vec![0u8; 6];
        let first = At(0);
        let last = At(usize::MAX);
        apply(&mut bytes, &Edit::Int { at: first, value: Value::Fixed(0x0102_0304), width: 4, big_endian: true });
        assert_eq!(bytes, [1, 2, 3, 4, 0, 0]);
        apply(&mut bytes, &Edit::Int { at: last, value: Value::Length(-1), width: 2, big_endian: false });
        assert_eq!(bytes, [1, 2, 3, 4, 5, 0], "length 6 minus 1, little-endian, in the last two bytes");
        let mut short = vec![9u8];
        apply(&mut short, &Edit::Int { at: last, value: Value::Fixed(0xabcd), width: 4, big_endian: true });
        assert_eq!(short, [0xcd], "cut to the one byte there is, the low byte of a big-endian value");
    }
}
