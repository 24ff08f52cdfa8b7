//! The few kernel struct offsets the verdict's overlap guard reads, from the running kernel's
//! BTF (`/sys/kernel/btf/vmlinux`, CONFIG_DEBUG_INFO_BTF).
//!
//! A minimal reader of the BTF format (Documentation/bpf/btf.rst): the header, the type
//! section and the string section; it looks up a struct by name and a member's byte offset,
//! descending into anonymous struct and union members. aya parses BTF too, but keeps its
//! type accessors private.

use std::{borrow::Cow, fmt};

use ntlm_common::SeqGuard;

/// Where the running kernel publishes its BTF.
pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
/// Deepest nesting of anonymous members followed (the kernel's structs use two or three).
const MAX_DEPTH: u32 = 8;

/// Why the offsets could not be found.
#[derive(Debug)]
pub(crate) struct BtfError(String);

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(msg: impl Into<String>) -> BtfError {
    BtfError(msg.into())
}

/// One parsed BTF blob: the position of every type record, by id (id 0 is `void`).
pub(crate) struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// `offsets[id - 1]`: where type `id`'s record starts in `types`.
    offsets: Vec<usize>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| err(format!("truncated BTF at byte {at}")))
}

/// Size in bytes of the data that follows a type's 12-byte record.
fn extra_len(kind: u32, vlen: usize) -> Result<usize, BtfError> {
    Ok(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        other => return Err(err(format!("unknown BTF kind {other}"))),
    })
}

impl<'a> Btf<'a> {
    /// Parses a little-endian BTF blob.
    pub(crate) fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let magic = data.get(..2).map(|m| u16::from_le_bytes([m[0], m[1]]));
        if magic != Some(MAGIC) {
            return Err(err("not a little-endian BTF blob (bad magic)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(|| err("BTF section outside the blob"))
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut offsets = Vec::new();
        let mut at = 0;
        while at < types.len() {
            offsets.push(at);
            let info = u32_at(types, at + 4)?;
            at += 12 + extra_len((info >> 24) & 0x1f, (info & 0xffff) as usize)?;
        }
        Ok(Btf {
            types,
            strings,
            offsets,
        })
    }

    fn name(&self, off: u32) -> Cow<'a, str> {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end])
    }

    /// (name offset, kind, vlen, kind_flag, size-or-type, record start) of type `id`.
    fn header(&self, id: u32) -> Result<(u32, u32, usize, bool, u32, usize), BtfError> {
        let at = *self
            .offsets
            .get((id as usize).wrapping_sub(1))
            .ok_or_else(|| err(format!("no BTF type {id}")))?;
        let info = u32_at(self.types, at + 4)?;
        Ok((
            u32_at(self.types, at)?,
            (info >> 24) & 0x1f,
            (info & 0xffff) as usize,
            info >> 31 != 0,
            u32_at(self.types, at + 8)?,
            at,
        ))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH * 4 {
            let (_, kind, _, _, next, _) = self.header(id)?;
            match kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = next
                }
                _ => return Ok(id),
            }
        }
        Err(err(format!("BTF type {id}: qualifier chain too long")))
    }

    /// The id of the struct called `name`.
    pub(crate) fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        (1..=self.offsets.len() as u32)
            .find(|&id| {
                matches!(self.header(id), Ok((n, KIND_STRUCT, vlen, ..)) if vlen > 0 && self.name(n) == name)
            })
            .ok_or_else(|| err(format!("the kernel's BTF has no struct {name}")))
    }

    /// Byte offset of member `field` in struct or union `id`, looking inside anonymous members.
    fn member_in(&self, id: u32, field: &str, depth: u32) -> Result<Option<u32>, BtfError> {
        let (_, kind, vlen, bitfields, _, at) = self.header(self.resolve(id)?)?;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return Ok(None);
        }
        for i in 0..vlen {
            let m = at + 12 + 12 * i;
            let (name, ty, raw) = (
                u32_at(self.types, m)?,
                u32_at(self.types, m + 4)?,
                u32_at(self.types, m + 8)?,
            );
            let bits = if bitfields { raw & 0x00ff_ffff } else { raw };
            if name != 0 && self.name(name) == field {
                if bits % 8 != 0 {
                    return Err(err(format!("member {field} is a bit-field")));
                }
                return Ok(Some(bits / 8));
            }
            if name == 0
                && depth < MAX_DEPTH
                && bits % 8 == 0
                && let Some(inner) = self.member_in(ty, field, depth + 1)?
            {
                return Ok(Some(bits / 8 + inner));
            }
        }
        Ok(None)
    }

    /// Byte offset of `field` in `struct name`.
    pub(crate) fn offset_of(&self, name: &str, field: &str) -> Result<u32, BtfError> {
        self.member_in(self.struct_id(name)?, field, 0)?
            .ok_or_else(|| {
                err(format!(
                    "struct {name} has no member {field} in the kernel's BTF"
                ))
            })
    }
}

/// The overlap guard's offsets from a BTF blob.
pub(crate) fn seq_guard(data: &[u8]) -> Result<SeqGuard, BtfError> {
    let btf = Btf::parse(data)?;
    let cb = btf.offset_of("sk_buff", "cb")?;
    let seq = btf.offset_of("tcp_skb_cb", "seq")?;
    Ok(SeqGuard {
        enabled: 1,
        skb_seq: cb + seq,
        skb_sk: btf.offset_of("sk_buff", "sk")?,
        tcp_copied_seq: btf.offset_of("tcp_sock", "copied_seq")?,
        test_cut_fail_step: 0,
    })
}

/// The overlap guard's offsets for the running kernel.
pub(crate) fn running_kernel() -> Result<SeqGuard, BtfError> {
    let data = std::fs::read(VMLINUX_BTF).map_err(|e| {
        err(format!(
            "cannot read {VMLINUX_BTF} ({e}); the kernel needs CONFIG_DEBUG_INFO_BTF"
        ))
    })?;
    seq_guard(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built blob: `struct outer { int a; union { int b; struct inner c; }; }` where
    /// `struct inner { int x; int y; }` sits at byte 8, so `y` is at 8 + 4 inside `outer`.
    fn blob() -> Vec<u8> {
        let mut strings = b"\0int\0outer\0a\0b\0inner\0x\0y\0c\0".to_vec();
        strings.push(0);
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            (strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap()
                + 1) as u32
        };
        let mut t = Vec::new();
        let mut rec = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                t.extend_from_slice(&v.to_le_bytes());
            }
        };
        rec(s("int"), KIND_INT, 0, 4, &[32]); // 1
        rec(
            s("inner"),
            KIND_STRUCT,
            2,
            8,
            &[s("x"), 1, 0, s("y"), 1, 32],
        ); // 2
        rec(0, KIND_UNION, 2, 8, &[s("b"), 1, 0, s("c"), 2, 0]); // 3
        rec(s("outer"), KIND_STRUCT, 2, 16, &[s("a"), 1, 0, 0, 3, 64]); // 4
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_directly_and_inside_anonymous_unions() {
        let data = blob();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.offset_of("outer", "a").unwrap(), 0);
        assert_eq!(btf.offset_of("outer", "b").unwrap(), 8);
        assert_eq!(btf.offset_of("outer", "c").unwrap(), 8);
        assert_eq!(btf.offset_of("inner", "y").unwrap(), 4);
        assert!(
            btf.offset_of("outer", "y").is_err(),
            "y is inside a named member, not an anonymous one"
        );
        assert!(
            btf.offset_of("missing", "a")
                .unwrap_err()
                .to_string()
                .contains("no struct missing")
        );
    }

    #[test]
    fn rejects_a_blob_that_is_not_btf() {
        assert!(Btf::parse(b"\x7fELF....").is_err());
    }

    #[test]
    fn running_kernel_offsets_are_found_where_the_kernel_has_btf() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: {VMLINUX_BTF} is missing (kernel without CONFIG_DEBUG_INFO_BTF)");
            return;
        }
        let g = running_kernel().unwrap();
        // struct sk_buff starts with two list pointers, a device pointer and the socket
        // union; cb[] (48 bytes) follows the timestamp. Exact offsets vary by kernel, these
        // bounds do not.
        assert!(g.skb_sk >= 16 && g.skb_sk < g.skb_seq, "{g:?}");
        assert!(g.skb_seq < 128 && g.tcp_copied_seq > 1000, "{g:?}");
    }
}
