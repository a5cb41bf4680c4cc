//! A GGUF v3 writer, in the layout llama.cpp's loader requires (its reader is stricter than the
//! format's text): `general.alignment` written, tensor infos in declaration order, each
//! tensor's data at the next multiple of the alignment after the previous one (contiguous, in
//! the same order, zero padding), and the data section starting aligned after the tensor
//! infos. Files written here are read back by `gguf.rs`, the `gguf` Python package and
//! llama.cpp alike.

use super::gguf::{MetaValue, MAX_DIMS, MAX_NAME};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// The alignment written (llama.cpp's and gguf-py's default).
pub(crate) const ALIGNMENT: u64 = 32;

/// One tensor to write: `shape` row-major (outermost first, as safetensors and [`super::Weights`]
/// give it; GGUF stores it reversed), `data` the dense bytes of that shape in `dtype`.
pub struct GgufTensor<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// The ggml type id of a dtype rankfuse writes.
pub fn ggml_type_id(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q8_0 => 8,
        DType::Q4_K => 12,
        DType::Q6_K => 14,
        DType::BF16 => 30,
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) -> Result<()> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::Array { elem, items } => {
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                if it.type_id() != *elem {
                    return Err(Error::invalid(format!(
                        "GGUF array of type {elem} holds a {} value",
                        it.type_name()
                    )));
                }
                put_value(out, it)?;
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
    Ok(())
}

/// The whole file in memory. `meta` must not contain `general.alignment` (written first, as
/// gguf-py does, so any reader finds it before the tensor infos).
pub fn encode(meta: &[(String, MetaValue)], tensors: &[GgufTensor<'_>]) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    for (k, _) in meta {
        if k == "general.alignment" || !seen.insert(k.as_str()) {
            return Err(Error::invalid(format!(
                "GGUF metadata key '{k}' given twice (general.alignment is written by rankfuse)"
            )));
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64 + 1).to_le_bytes());
    put_str(&mut out, b"general.alignment");
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&(ALIGNMENT as u32).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k.as_bytes());
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        // ggml keeps names in a 64-byte buffer with its NUL.
        if t.name.len() >= MAX_NAME || t.name.contains('\0') || t.name.is_empty() {
            return Err(Error::invalid(format!(
                "tensor '{}': GGUF names are 1..{} bytes without NUL",
                t.name.escape_debug(),
                MAX_NAME - 1
            )));
        }
        if t.shape.is_empty() || t.shape.len() > MAX_DIMS {
            return Err(Error::invalid(format!(
                "tensor '{}': {} dims (GGUF holds 1..={MAX_DIMS})",
                t.name,
                t.shape.len()
            )));
        }
        let elems: usize = t.shape.iter().product();
        let inner = *t.shape.last().expect("non-empty");
        let want = (inner % t.dtype.block_elems() == 0)
            .then(|| t.dtype.bytes(elems))
            .flatten();
        if want != Some(t.data.len()) {
            return Err(Error::internal(format!(
                "tensor '{}': {} bytes of {} for shape {:?}",
                t.name,
                t.data.len(),
                t.dtype.name(),
                t.shape
            )));
        }
        put_str(&mut out, t.name.as_bytes());
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).next_multiple_of(ALIGNMENT);
    }
    out.resize((out.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize((out.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    }
    Ok(out)
}

/// Writes the file (see [`encode`]) through a temporary file beside it, renamed into place, so a
/// reader never sees half a file.
pub fn write(path: &Path, meta: &[(String, MetaValue)], tensors: &[GgufTensor<'_>]) -> Result<()> {
    let bytes = encode(meta, tensors)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::from_io(path, &e)
    })
}
