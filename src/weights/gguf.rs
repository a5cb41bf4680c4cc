//! GGUF files (llama.cpp's format), read in place: the header, metadata and tensor table are
//! parsed and validated completely before any view is handed out, and tensor data stays in the
//! map (zero-copy, like safetensors).
//!
//! Layout (little-endian): magic "GGUF", u32 version (3; 2 reads the same), u64 tensor count,
//! u64 metadata count, the metadata (key string, u32 type, value), the tensor infos (name,
//! u32 n_dims, n_dims x u64 dims innermost first, u32 ggml type, u64 offset relative to the data
//! section), then the data section at the next multiple of `general.alignment` (default 32).
//! Strings are a u64 byte length and the bytes (no NUL).
//!
//! The file is hostile until proven otherwise: every count is bounded by the bytes left to hold
//! it before anything is allocated, arrays nest at most `MAX_DEPTH` deep (no unbounded
//! recursion), and all offset and size arithmetic is checked. Each error names the file, the
//! tensor or key, and the field.

use super::{Backing, Shard, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Longest tensor name accepted (llama.cpp's GGML_MAX_NAME).
pub(crate) const MAX_NAME: usize = 64;
/// Most dimensions a tensor may have (GGML_MAX_DIMS).
pub(crate) const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (real files use 1; the format allows more).
pub(crate) const MAX_DEPTH: usize = 8;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value. Numbers are GGUF's value type ids.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    /// Raw bytes: GGUF says UTF-8 but tokenizer vocabularies hold arbitrary bytes; kept as is.
    Str(Vec<u8>),
    /// Elements all of type `elem` (a GGUF type id; arrays of arrays are allowed).
    Array {
        elem: u32,
        items: Vec<MetaValue>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF value type id (0 = u8 ... 12 = f64), also `rf_meta_type`.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array { .. } => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }
    pub fn type_name(&self) -> &'static str {
        type_name(self.type_id())
    }
    /// An integer value as u64 (negative or non-integer: None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// An integer value as i64 (a u64 above i64::MAX: None).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }
    /// A floating-point value (f32 widened exactly) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

fn type_name(id: u32) -> &'static str {
    match id {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => "unknown",
    }
}

/// Smallest encoding of one value of type `id` (bounds an array's count by the bytes left).
fn min_size(id: u32) -> usize {
    match id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,     // length prefix
        9 => 4 + 8, // element type + count
        _ => 1,
    }
}

/// A ggml tensor type: name, elements per block, bytes per block, and the dtype rankfuse
/// computes with (None: listed and sized, but not a matrix `get` returns). Sizes from ggml.c's
/// type_traits (the same table as gguf-py's GGML_QUANT_SIZES).
fn ggml_type(id: u32) -> Option<(&'static str, u64, u64, Option<DType>)> {
    Some(match id {
        0 => ("F32", 1, 4, Some(DType::F32)),
        1 => ("F16", 1, 2, Some(DType::F16)),
        2 => ("Q4_0", 32, 18, Some(DType::Q4_0)),
        3 => ("Q4_1", 32, 20, None),
        6 => ("Q5_0", 32, 22, None),
        7 => ("Q5_1", 32, 24, None),
        8 => ("Q8_0", 32, 34, Some(DType::Q8_0)),
        9 => ("Q8_1", 32, 40, None),
        10 => ("Q2_K", 256, 84, None),
        11 => ("Q3_K", 256, 110, None),
        12 => ("Q4_K", 256, 144, Some(DType::Q4_K)),
        13 => ("Q5_K", 256, 176, None),
        14 => ("Q6_K", 256, 210, Some(DType::Q6_K)),
        15 => ("Q8_K", 256, 292, None),
        16 => ("IQ2_XXS", 256, 66, None),
        17 => ("IQ2_XS", 256, 74, None),
        18 => ("IQ3_XXS", 256, 98, None),
        19 => ("IQ1_S", 256, 50, None),
        20 => ("IQ4_NL", 32, 18, None),
        21 => ("IQ3_S", 256, 110, None),
        22 => ("IQ2_S", 256, 82, None),
        23 => ("IQ4_XS", 256, 136, None),
        24 => ("I8", 1, 1, None),
        25 => ("I16", 1, 2, None),
        26 => ("I32", 1, 4, None),
        27 => ("I64", 1, 8, None),
        28 => ("F64", 1, 8, None),
        29 => ("IQ1_M", 256, 56, None),
        30 => ("BF16", 1, 2, Some(DType::BF16)),
        34 => ("TQ1_0", 256, 54, None),
        35 => ("TQ2_0", 256, 66, None),
        _ => return None,
    })
}

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GGUF")
}

/// A cursor over the file that turns every short read into an error naming the field.
struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
    file: String,
}

impl Cur<'_> {
    fn err(&self, what: &str, why: impl std::fmt::Display) -> Error {
        Error::format(format!(
            "file '{}': GGUF {what}: {why} (at byte {})",
            self.file, self.pos
        ))
    }
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        if n > self.left() {
            return Err(self.err(
                what,
                format!("needs {n} bytes, the file has {} left", self.left()),
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A count of items at least `min` bytes each: bounded by the bytes left, so a lying count
    /// fails here instead of driving a huge allocation or loop.
    fn count(&mut self, what: &str, min: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let cap = (self.left() / min.max(1)) as u64;
        if n > cap {
            return Err(self.err(
                what,
                format!("{n} items cannot fit in the {} bytes left", self.left()),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<Vec<u8>> {
        let n = self.u64(&format!("{what} length"))?;
        if n > self.left() as u64 {
            return Err(self.err(
                what,
                format!(
                    "string length {n} runs past the end ({} bytes left)",
                    self.left()
                ),
            ));
        }
        Ok(self.take(n as usize, what)?.to_vec())
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(what)?[0]),
            1 => MetaValue::I8(self.arr::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                v => return Err(self.err(what, format!("bool byte {v} is neither 0 nor 1"))),
            },
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(what, format!("arrays nested more than {MAX_DEPTH} deep")));
                }
                let elem = self.u32(&format!("{what} element type"))?;
                if elem > 12 {
                    return Err(self.err(what, format!("unknown array element type {elem}")));
                }
                let n = self.count(&format!("{what} count"), min_size(elem))?;
                // Up to 32 bytes of MetaValue per file byte: an allocation failure must be an
                // error, not an abort.
                let mut items = Vec::new();
                items.try_reserve_exact(n).map_err(|_| {
                    Error::oom(format!(
                        "file '{}': GGUF {what}: cannot allocate {n} array elements",
                        self.file
                    ))
                })?;
                for i in 0..n {
                    items.push(self.value(elem, &format!("{what}[{i}]"), depth + 1)?);
                }
                MetaValue::Array { elem, items }
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(what)?)),
            t => return Err(self.err(what, format!("unknown value type {t}"))),
        })
    }
}

/// The parsed file: its metadata in file order, and the tensors appended to `out`.
pub(super) fn parse(
    path: &Path,
    backing: Backing,
    out: &mut Vec<TensorEntry>,
) -> Result<(Shard, Vec<(String, MetaValue)>)> {
    let bytes = backing.bytes();
    let mut c = Cur {
        b: bytes,
        pos: 0,
        file: path.display().to_string(),
    };
    let magic = c.arr::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(c.err("magic", format!("{magic:?} is not \"GGUF\"")));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err(c.err("version", "version 1 (32-bit counts) is not supported")),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(c.err("version", "big-endian GGUF is not supported"))
        }
        v => return Err(c.err("version", format!("{v} is not 2 or 3"))),
    }
    // Minimum encodings: a tensor info is a name length, n_dims, type and offset (24 bytes);
    // a key-value pair a key length, a type and a 1-byte value (13 bytes).
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.count("metadata count", 13)?;
    if n_tensors > (c.left() / 24) as u64 {
        return Err(c.err(
            "tensor count",
            format!(
                "{n_tensors} tensors cannot fit in the {} bytes left",
                c.left()
            ),
        ));
    }
    let mut meta: Vec<(String, MetaValue)> = Vec::with_capacity(n_kv);
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key {i}"))?;
        let key =
            String::from_utf8(key).map_err(|_| c.err(&format!("metadata key {i}"), "not UTF-8"))?;
        if key.contains('\0') {
            return Err(c.err(
                &format!("metadata key '{}'", key.escape_debug()),
                "holds a NUL",
            ));
        }
        let what = format!("metadata '{key}'");
        let ty = c.u32(&format!("{what} type"))?;
        let v = c.value(ty, &what, 0)?;
        if seen.insert(key.clone(), i).is_some() {
            return Err(c.err(&what, "key appears twice"));
        }
        meta.push((key, v));
    }
    let alignment = match seen.get("general.alignment").map(|&i| &meta[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v.as_u64().filter(|_| !matches!(v, MetaValue::Bool(_)));
            match a {
                Some(a) if a > 0 && a % 8 == 0 => a,
                _ => {
                    return Err(c.err(
                        "metadata 'general.alignment'",
                        format!("{v:?} is not a positive multiple of 8"),
                    ))
                }
            }
        }
    };
    let mut infos = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor {i} name"))?;
        let name =
            String::from_utf8(name).map_err(|_| c.err(&format!("tensor {i} name"), "not UTF-8"))?;
        let what = format!("tensor '{}'", name.escape_debug());
        if name.len() > MAX_NAME {
            return Err(c.err(
                &what,
                format!("name is {} bytes (at most {MAX_NAME})", name.len()),
            ));
        }
        if name.contains('\0') {
            return Err(c.err(&what, "name holds a NUL"));
        }
        let nd = c.u32(&format!("{what} n_dims"))? as usize;
        if nd > MAX_DIMS {
            return Err(c.err(&what, format!("n_dims {nd} (at most {MAX_DIMS})")));
        }
        let mut ne = Vec::with_capacity(nd);
        for d in 0..nd {
            ne.push(c.u64(&format!("{what} dim {d}"))?);
        }
        let ty = c.u32(&format!("{what} type"))?;
        let Some((tname, be, bb, dtype)) = ggml_type(ty) else {
            return Err(c.err(&what, format!("unknown ggml type id {ty}")));
        };
        let offset = c.u64(&format!("{what} offset"))?;
        // Elements (checked, and inside i64 as ggml requires), then bytes = blocks x block size.
        let elems = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let Some(elems) = elems.filter(|&e| e <= i64::MAX as u64) else {
            return Err(c.err(&what, format!("dims {ne:?} overflow")));
        };
        let ne0 = ne.first().copied().unwrap_or(1);
        if ne0 % be != 0 {
            return Err(c.err(
                &what,
                format!("innermost dim {ne0} is not a multiple of the {be}-element {tname} block"),
            ));
        }
        let Some(nbytes) = (elems / be).checked_mul(bb) else {
            return Err(c.err(&what, format!("byte size of dims {ne:?} overflows")));
        };
        if offset % alignment != 0 {
            return Err(c.err(
                &what,
                format!("offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        let shape: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
        infos.push((name, tname, dtype, shape, offset, nbytes));
    }
    // The data section starts at the next multiple of the alignment.
    let data_start = (c.pos as u64)
        .checked_next_multiple_of(alignment)
        .filter(|&s| s <= bytes.len() as u64 || infos.is_empty());
    let Some(data_start) = data_start else {
        return Err(c.err(
            "data section",
            format!("starts past the end of the {}-byte file", bytes.len()),
        ));
    };
    let data_len = (bytes.len() as u64).saturating_sub(data_start);
    let mut ranges: Vec<(u64, u64, usize)> = Vec::with_capacity(infos.len());
    for (i, (name, _, _, _, off, nb)) in infos.iter().enumerate() {
        let end = off.checked_add(*nb).filter(|&e| e <= data_len);
        let Some(end) = end else {
            return Err(c.err(
                &format!("tensor '{}'", name.escape_debug()),
                format!("data [{off}, {off} + {nb}) outside the {data_len}-byte data section"),
            ));
        };
        ranges.push((*off, end, i));
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(c.err(
                &format!("tensor '{}'", infos[w[1].2].0.escape_debug()),
                format!("data overlaps tensor '{}'", infos[w[0].2].0.escape_debug()),
            ));
        }
    }
    for (name, tname, dtype, shape, off, nb) in infos {
        // In range: off + nb <= data_len and data_start + data_len = file length (usize).
        let start = (data_start + off) as usize;
        out.push(TensorEntry {
            name,
            dtype_name: tname.to_string(),
            dtype,
            shape,
            shard: 0,
            start,
            end: start + nb as usize,
        });
    }
    // The string-valued keys, for callers that read metadata as safetensors' string map.
    let metadata = meta
        .iter()
        .filter_map(|(k, v)| {
            let s = std::str::from_utf8(v.as_bytes()?).ok()?;
            Some((k.clone(), s.to_string()))
        })
        .collect();
    let shard = Shard {
        path: path.to_path_buf(),
        backing,
        metadata,
    };
    Ok((shard, meta))
}
