//! A minimal reader of raw kernel BTF (`/sys/kernel/btf/vmlinux`) that finds the byte offset and
//! size of struct fields, so userspace can tell the eBPF program where to read them: aya-ebpf has
//! no CO-RE field relocations, and aya keeps its parsed BTF members private.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading BTF from {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("BTF has no struct named `{0}`")]
    NoStruct(String),
    #[error("struct `{struct_name}` has no member `{member}` in BTF")]
    NoMember { struct_name: String, member: String },
    #[error(
        "member `{member}` of struct `{struct_name}` is a bitfield or not byte-aligned \
         (bit offset {bit_offset}), so it cannot be read with a plain load"
    )]
    NotByteAligned {
        struct_name: String,
        member: String,
        bit_offset: u64,
    },
}

/// A field's place in its struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Bytes from the struct start (through any anonymous struct/union members).
    pub offset: u32,
    /// Bytes.
    pub size: u32,
}

const MAGIC: u16 = 0xeb9f;
/// magic(2) version(1) flags(1) hdr_len(4) type_off type_len str_off str_len (4 each).
const HEADER_LEN: usize = 24;
/// Bounds type chains (typedef/const/.., arrays of arrays) and anonymous-member nesting, so a
/// malformed or cyclic table ends in an error instead of a hang or a stack overflow.
const MAX_DEPTH: u32 = 32;

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

/// What we keep of a kind's trailing data; everything else is skipped.
#[derive(Clone, Copy)]
enum Extra {
    None,
    /// INT encoding word: bits 0-7 nr_bits, bits 16-23 bit offset (old-style bitfields).
    Int(u32),
    /// Index of the first of `vlen` members in `Btf::members`.
    Members(usize),
    Array {
        elem: u32,
        nelems: u32,
    },
}

#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    extra: Extra,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 != 0
    }
}

#[derive(Clone, Copy)]
struct Member {
    name_off: u32,
    ty: u32,
    offset: u32,
}

/// Parsed BTF: the type table (id N is `types[N - 1]`; id 0 is void) and the string section.
pub struct Btf {
    types: Vec<Type>,
    members: Vec<Member>,
    strings: Vec<u8>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .field("members", &self.members.len())
            .field("string_bytes", &self.strings.len())
            .finish()
    }
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

fn u32_at(data: &[u8], pos: usize) -> Option<u32> {
    let bytes = data.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// Bytes of kind-specific data after a `btf_type`; None for a kind we do not know, whose
/// length, and so where the next type starts, we cannot tell.
fn trailing_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        _ => return None,
    })
}

/// `data[start..start + len]` where start is relative to `base`, or an error naming `what`.
fn section<'a>(
    data: &'a [u8],
    base: usize,
    start: u32,
    len: u32,
    what: &str,
) -> Result<&'a [u8], BtfError> {
    base.checked_add(start as usize)
        .and_then(|s| data.get(s..s.checked_add(len as usize)?))
        .ok_or_else(|| {
            malformed(format!(
                "{what} section lies outside the {} bytes",
                data.len()
            ))
        })
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_owned(),
            source,
        })?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let header = data
            .get(..HEADER_LEN)
            .ok_or_else(|| malformed("shorter than the header"))?;
        let magic = u16::from_ne_bytes([header[0], header[1]]);
        if magic == MAGIC.swap_bytes() {
            return Err(malformed("BTF of the other byte order"));
        }
        if magic != MAGIC {
            return Err(malformed(format!("bad magic {magic:#06x}")));
        }
        let word = |i: usize| u32_at(header, 4 + 4 * i).unwrap_or(0);
        let hdr_len = word(0) as usize;
        // A newer, longer header is fine: its extra fields come before the sections we use.
        if hdr_len < HEADER_LEN || hdr_len > data.len() {
            return Err(malformed(format!("header length {hdr_len}")));
        }
        let types_data = section(data, hdr_len, word(1), word(2), "type")?;
        let strings = section(data, hdr_len, word(3), word(4), "string")?.to_vec();

        let mut types = Vec::with_capacity(types_data.len() / 16);
        let mut members = Vec::new();
        let mut pos = 0;
        while pos < types_data.len() {
            let at = |i: usize| u32_at(types_data, pos + 4 * i);
            let (Some(name_off), Some(info), Some(size_or_type)) = (at(0), at(1), at(2)) else {
                return Err(malformed(format!("type {} truncated", types.len() + 1)));
            };
            let mut t = Type {
                name_off,
                info,
                size_or_type,
                extra: Extra::None,
            };
            pos += 12;
            let trailing = trailing_len(t.kind(), t.vlen()).ok_or_else(|| {
                malformed(format!(
                    "type {} has unknown kind {}",
                    types.len() + 1,
                    t.kind()
                ))
            })?;
            let body = types_data
                .get(pos..pos + trailing)
                .ok_or_else(|| malformed(format!("type {} truncated", types.len() + 1)))?;
            let word = |i: usize| u32_at(body, 4 * i).unwrap_or(0);
            t.extra = match t.kind() {
                KIND_INT => Extra::Int(word(0)),
                KIND_ARRAY => Extra::Array {
                    elem: word(0),
                    nelems: word(2),
                },
                KIND_STRUCT | KIND_UNION => {
                    let first = members.len();
                    members.extend((0..t.vlen()).map(|i| Member {
                        name_off: word(3 * i),
                        ty: word(3 * i + 1),
                        offset: word(3 * i + 2),
                    }));
                    Extra::Members(first)
                }
                _ => Extra::None,
            };
            pos += trailing;
            types.push(t);
        }
        Ok(Btf {
            types,
            members,
            strings,
        })
    }

    /// Offset and size of `member` in `struct name` (kind STRUCT, first with that name),
    /// looking through anonymous struct/union members (name_off == 0) recursively and adding
    /// their offsets.
    pub fn field(&self, struct_name: &str, member: &str) -> Result<Field, BtfError> {
        let id = self.find_struct(struct_name)?;
        let (bit_offset, bitfield, ty) =
            self.find_member(id, member.as_bytes(), 0)?
                .ok_or_else(|| BtfError::NoMember {
                    struct_name: struct_name.into(),
                    member: member.into(),
                })?;
        let not_aligned = || BtfError::NotByteAligned {
            struct_name: struct_name.into(),
            member: member.into(),
            bit_offset,
        };
        if bitfield || bit_offset % 8 != 0 {
            return Err(not_aligned());
        }
        // Without kind_flag, a bitfield shows as an INT whose encoding covers fewer bits
        // than its size, or starts past bit 0.
        let (_, resolved) = self.resolve(ty)?;
        if let Extra::Int(enc) = resolved.extra
            && (enc & 0xff != resolved.size_or_type.wrapping_mul(8) || (enc >> 16) & 0xff != 0)
        {
            return Err(not_aligned());
        }
        Ok(Field {
            offset: u32::try_from(bit_offset / 8)
                .map_err(|_| malformed("member offset overflows"))?,
            size: self.size_of(ty, 0)?,
        })
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| self.types.get(i))
            .ok_or_else(|| {
                malformed(format!(
                    "reference to type id {id}, outside 1..={}",
                    self.types.len()
                ))
            })
    }

    fn name(&self, off: u32) -> Result<&[u8], BtfError> {
        let rest = self
            .strings
            .get(off as usize..)
            .ok_or_else(|| malformed(format!("string offset {off} outside the string section")))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed(format!("string at {off} has no terminating NUL")))?;
        Ok(&rest[..end])
    }

    fn find_struct(&self, name: &str) -> Result<u32, BtfError> {
        for (i, t) in self.types.iter().enumerate() {
            // An unreadable name cannot be the one asked for; skip it rather than fail the lookup.
            if t.kind() == KIND_STRUCT && self.name(t.name_off).is_ok_and(|n| n == name.as_bytes())
            {
                return Ok(i as u32 + 1);
            }
        }
        Err(BtfError::NoStruct(name.into()))
    }

    /// Bit offset, whether it is a (kind_flag) bitfield, and type id of `member` in the
    /// struct/union `id`, searching anonymous members too.
    fn find_member(
        &self,
        id: u32,
        member: &[u8],
        depth: u32,
    ) -> Result<Option<(u64, bool, u32)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("anonymous members nested too deeply"));
        }
        let t = self.ty(id)?;
        let Extra::Members(first) = t.extra else {
            return Err(malformed(format!("type {id} is not a struct or union")));
        };
        let members = self
            .members
            .get(first..first + t.vlen())
            .ok_or_else(|| malformed(format!("members of type {id}")))?;
        for m in members {
            // With kind_flag, the offset word packs the bitfield size in its top byte.
            let (bits, bitfield) = if t.kind_flag() {
                (m.offset & 0xff_ffff, m.offset >> 24 != 0)
            } else {
                (m.offset, false)
            };
            if m.name_off == 0 {
                let (inner, inner_t) = self.resolve(m.ty)?;
                if matches!(inner_t.kind(), KIND_STRUCT | KIND_UNION)
                    && let Some((b, bf, ty)) = self.find_member(inner, member, depth + 1)?
                {
                    return Ok(Some((u64::from(bits) + b, bf, ty)));
                }
            } else if self.name(m.name_off)? == member {
                return Ok(Some((u64::from(bits), bitfield, m.ty)));
            }
        }
        Ok(None)
    }

    /// Follows typedef/qualifier chains to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<(u32, &Type), BtfError> {
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok((id, t)),
            }
        }
        Err(malformed(format!(
            "type chain from id {id} too long or cyclic"
        )))
    }

    fn size_of(&self, id: u32, depth: u32) -> Result<u32, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("array types nested too deeply"));
        }
        let (id, t) = self.resolve(id)?;
        match (t.kind(), t.extra) {
            (KIND_PTR, _) => Ok(8),
            (KIND_ARRAY, Extra::Array { elem, nelems }) => self
                .size_of(elem, depth + 1)?
                .checked_mul(nelems)
                .ok_or_else(|| malformed(format!("size of array type {id} overflows"))),
            (KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION | KIND_FLOAT, _) => {
                Ok(t.size_or_type)
            }
            (kind, _) => Err(malformed(format!("type {id} of kind {kind} has no size"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds raw BTF blobs laid out as header, types, strings, so the blob ends exactly
    /// where the string section does.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        count: u32,
    }

    /// `btf_type.info`: kind, kind_flag and vlen.
    fn info(kind: u32, kflag: bool, vlen: usize) -> u32 {
        (kflag as u32) << 31 | kind << 24 | vlen as u32
    }

    impl Builder {
        fn new() -> Self {
            let (types, strings, count) = (Vec::new(), vec![0], 0);
            Builder {
                types,
                strings,
                count,
            }
        }
        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend(s.bytes().chain([0]));
            off
        }
        /// Adds a type and returns its id; `extra` is the kind's trailing data.
        fn ty(&mut self, name: &str, info: u32, size_or_type: u32, extra: &[u32]) -> u32 {
            let name_off = self.str(name);
            for w in [name_off, info, size_or_type].iter().chain(extra) {
                self.types.extend(w.to_ne_bytes());
            }
            self.count += 1;
            self.count
        }
        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.ty(name, info(KIND_INT, false, 0), size, &[size * 8])
        }
        /// A struct/union of (name, type, offset word) members.
        fn aggregate(
            &mut self,
            name: &str,
            info: u32,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(n, ty, off) in members {
                extra.extend([self.str(n), ty, off]);
            }
            self.ty(name, info, size, &extra)
        }
        fn build(&self) -> Vec<u8> {
            let mut out = MAGIC.to_ne_bytes().to_vec();
            out.extend([1, 0]); // version, flags
            let (tl, sl) = (self.types.len() as u32, self.strings.len() as u32);
            for w in [HEADER_LEN as u32, 0, tl, tl, sl] {
                out.extend(w.to_ne_bytes());
            }
            out.extend(&self.types);
            out.extend(&self.strings);
            out
        }
    }

    fn check(btf: &Btf, s: &str, want: &[(&str, u32, u32)]) {
        for &(m, offset, size) in want {
            assert_eq!(btf.field(s, m).unwrap(), Field { offset, size }, "{s}.{m}");
        }
    }

    /// struct outer { int x; union { int a; long b; }; };
    fn nested() -> Vec<u8> {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let long = b.int("long", 8);
        let anon = b.aggregate(
            "",
            info(KIND_UNION, false, 2),
            8,
            &[("a", int, 0), ("b", long, 0)],
        );
        b.aggregate(
            "outer",
            info(KIND_STRUCT, false, 2),
            16,
            &[("x", int, 0), ("", anon, 64)],
        );
        b.build()
    }

    #[test]
    fn nested_anonymous_union() {
        let btf = Btf::parse(&nested()).unwrap();
        check(&btf, "outer", &[("x", 0, 4), ("a", 8, 4), ("b", 8, 8)]);
    }

    #[test]
    fn bitfields_and_unaligned_members_are_refused() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        // struct flags { int bf:3; int whole; } with kind_flag: offset word = size << 24 | bits.
        let flags = [("bf", int, 3 << 24), ("whole", int, 32)];
        b.aggregate("flags", info(KIND_STRUCT, true, 2), 8, &flags);
        // Without kind_flag: a member at bit 4, and an old-style INT bitfield (2 bits of 4 bytes).
        let small = b.ty("small", info(KIND_INT, false, 0), 4, &[2]);
        let odd = [("at4", int, 4), ("old", small, 32)];
        b.aggregate("odd", info(KIND_STRUCT, false, 2), 8, &odd);
        let btf = Btf::parse(&b.build()).unwrap();
        check(&btf, "flags", &[("whole", 4, 4)]);
        for (s, m) in [("flags", "bf"), ("odd", "at4"), ("odd", "old")] {
            let err = btf.field(s, m).unwrap_err();
            assert!(
                matches!(err, BtfError::NotByteAligned { .. }),
                "{s}.{m}: {err}"
            );
            assert!(err.to_string().contains(m), "{err}");
        }
    }

    #[test]
    fn typedef_chains_arrays_and_cycles() {
        let mut b = Builder::new();
        let int = b.int("unsigned int", 4);
        let konst = b.ty("", info(KIND_CONST, false, 0), int, &[]);
        let u32t = b.ty("u32", info(KIND_TYPEDEF, false, 0), konst, &[]);
        let arr = b.ty("", info(KIND_ARRAY, false, 0), 0, &[u32t, int, 6]);
        let ptr = b.ty("", info(KIND_PTR, false, 0), int, &[]);
        // typedef loop_a -> loop_b -> loop_a
        let loop_b = b.count + 2;
        let loop_a = b.ty("loop_a", info(KIND_TYPEDEF, false, 0), loop_b, &[]);
        assert_eq!(
            b.ty("loop_b", info(KIND_TYPEDEF, false, 0), loop_a, &[]),
            loop_b
        );
        let members = [
            ("v", u32t, 0),
            ("arr", arr, 32),
            ("p", ptr, 256),
            ("cyclic", loop_a, 320),
            ("dangling", 99, 384),
        ];
        b.aggregate("s", info(KIND_STRUCT, false, members.len()), 64, &members);
        let btf = Btf::parse(&b.build()).unwrap();
        check(&btf, "s", &[("v", 0, 4), ("arr", 4, 24), ("p", 32, 8)]);
        for m in ["cyclic", "dangling"] {
            assert!(
                matches!(btf.field("s", m), Err(BtfError::Malformed(_))),
                "{m}"
            );
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let blob = nested();
        assert!(Btf::parse(&blob).is_ok());
        for len in 0..blob.len() {
            assert!(
                Btf::parse(&blob[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let blob = nested();
        for i in 0..blob.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = blob.clone();
                bad[i] ^= flip;
                if let Ok(btf) = Btf::parse(&bad) {
                    for m in ["x", "a", "b", "zz"] {
                        let _ = btf.field("outer", m);
                    }
                }
            }
        }
    }

    #[test]
    fn bad_magic_and_unknown_kind() {
        let mut blob = nested();
        blob[..2].copy_from_slice(&MAGIC.swap_bytes().to_ne_bytes());
        assert!(
            Btf::parse(&blob)
                .unwrap_err()
                .to_string()
                .contains("byte order")
        );
        blob[..2].copy_from_slice(&0x1234u16.to_ne_bytes());
        assert!(Btf::parse(&blob).unwrap_err().to_string().contains("magic"));

        let mut b = Builder::new();
        b.ty("x", info(20, false, 0), 0, &[]);
        let err = Btf::parse(&b.build()).unwrap_err();
        assert!(err.to_string().contains("unknown kind 20"), "{err}");
    }

    #[test]
    fn missing_struct_and_member_are_named() {
        let btf = Btf::parse(&nested()).unwrap();
        let err = btf.field("nope", "x").unwrap_err();
        assert!(
            matches!(&err, BtfError::NoStruct(s) if s == "nope"),
            "{err}"
        );
        assert!(err.to_string().contains("`nope`"), "{err}");
        let err = btf.field("outer", "missing").unwrap_err();
        assert!(matches!(&err, BtfError::NoMember { member, .. } if member == "missing"));
        assert!(
            err.to_string().contains("`outer` has no member `missing`"),
            "{err}"
        );
        let err = Btf::from_file(Path::new("/nonexistent/btf")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/btf"), "{err}");
    }

    /// The running kernel's BTF, or None (the test is skipped) where it has none.
    fn kernel() -> Option<Btf> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("skipping: {} does not exist", path.display());
            return None;
        }
        let data = std::fs::read(path).unwrap();
        let start = std::time::Instant::now();
        let btf = Btf::parse(&data).unwrap();
        let took = start.elapsed();
        eprintln!(
            "parsed {} bytes, {} types in {took:?}",
            data.len(),
            btf.types.len()
        );
        Some(btf)
    }

    #[test]
    fn kernel_tcp_sock() {
        let Some(btf) = kernel() else { return };
        let size = btf
            .ty(btf.find_struct("tcp_sock").unwrap())
            .unwrap()
            .size_or_type;
        let wanted = [
            ("bytes_acked", 8),
            ("bytes_received", 8),
            ("srtt_us", 4),
            ("total_retrans", 4),
            ("segs_in", 4),
            ("segs_out", 4),
        ];
        let mut offsets = Vec::new();
        for (name, want) in wanted {
            let f = btf.field("tcp_sock", name).unwrap();
            eprintln!("tcp_sock.{name}: {f:?} (struct size {size})");
            assert_eq!(f.size, want, "{name}");
            assert!(
                f.offset + f.size <= size,
                "{name} at {} beyond {size}",
                f.offset
            );
            assert_eq!(f.offset % f.size, 0, "{name} misaligned");
            offsets.push(f.offset);
        }
        offsets.sort();
        offsets.dedup();
        assert_eq!(offsets.len(), wanted.len(), "offsets not distinct");
    }

    #[test]
    fn kernel_sock_common_anonymous_members() {
        let Some(btf) = kernel() else { return };
        // Checked with bpftool (6.18): skc_rcv_saddr is in union { ..; struct { skc_daddr;
        // skc_rcv_saddr; } } at byte 0, skc_num in union { ..; struct { skc_dport; skc_num; } }
        // at byte 12; skc_family is a direct member. This layout has held since Linux 3.x.
        let want = [
            ("skc_rcv_saddr", 4, 4),
            ("skc_num", 14, 2),
            ("skc_family", 16, 2),
        ];
        check(&btf, "sock_common", &want);
        // skc_reuse:4 is a bitfield of this kind_flag struct.
        let reuse = btf.field("sock_common", "skc_reuse");
        assert!(
            matches!(reuse, Err(BtfError::NotByteAligned { .. })),
            "{reuse:?}"
        );
    }
}
