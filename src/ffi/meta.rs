//! Metadata of opened weights: a GGUF file's typed key-value pairs (file order), or a
//! safetensors file's `__metadata__` strings (sorted by key). Keys and strings handed to C are
//! NUL-terminated copies made once at open, owned by the `rf_weights` and valid until
//! `rf_weights_free`; every getter is read-only and thread-safe.

use super::boundary::{arg_out, arg_ref, arg_str};
use super::error::rf_error;
use super::handles::{c_name, rf_weights};
use super::types::rf_meta_type;
use crate::error::{Error, Result};
use crate::weights::{MetaValue, Weights};
use std::collections::HashMap;
use std::ffi::{c_char, CString};

/// The C-side copies of a weights file's metadata.
pub struct CMeta {
    keys: Vec<CString>,
    index: HashMap<String, usize>,
    /// Per key: NUL-terminated copies of its string value, or of each element of an array of
    /// strings (a string may hold NUL bytes: C gets its length too).
    strs: Vec<Vec<Vec<u8>>>,
}

fn nul_terminated(b: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(b.len() + 1);
    v.extend_from_slice(b);
    v.push(0);
    v
}

impl CMeta {
    pub fn new(w: &Weights) -> Result<CMeta> {
        let mut keys = Vec::with_capacity(w.meta().len());
        let mut index = HashMap::with_capacity(w.meta().len());
        let mut strs = Vec::with_capacity(w.meta().len());
        for (i, (k, v)) in w.meta().iter().enumerate() {
            keys.push(c_name(k, "metadata key")?);
            index.insert(k.clone(), i);
            strs.push(match v {
                MetaValue::Str(s) => vec![nul_terminated(s)],
                MetaValue::Array { elem: 8, items } => items
                    .iter()
                    .map(|s| nul_terminated(s.as_bytes().unwrap_or_default()))
                    .collect(),
                _ => Vec::new(),
            });
        }
        Ok(CMeta { keys, index, strs })
    }
}

fn meta_type(id: u32) -> rf_meta_type {
    use rf_meta_type::*;
    match id {
        0 => RF_META_U8,
        1 => RF_META_I8,
        2 => RF_META_U16,
        3 => RF_META_I16,
        4 => RF_META_U32,
        5 => RF_META_I32,
        6 => RF_META_F32,
        7 => RF_META_BOOL,
        8 => RF_META_STRING,
        9 => RF_META_ARRAY,
        10 => RF_META_U64,
        11 => RF_META_I64,
        _ => RF_META_F64,
    }
}

/// The value of `key` and its position, or NOT_FOUND naming the file and key.
unsafe fn lookup(w: &rf_weights, key: *const c_char) -> Result<(usize, &MetaValue)> {
    let key = arg_str(key, "key")?;
    let i = w.meta.index.get(key).copied().ok_or_else(|| {
        Error::not_found(format!(
            "file '{}': no metadata key '{key}'",
            w.inner.path().display()
        ))
    })?;
    Ok((i, &w.inner.meta()[i].1))
}

/// Element `index` of the array at `key`.
unsafe fn element(w: &rf_weights, key: *const c_char, index: usize) -> Result<(usize, &MetaValue)> {
    let (i, v) = lookup(w, key)?;
    let MetaValue::Array { items, .. } = v else {
        return Err(wrong_type(w, i, v, "an array"));
    };
    let e = items.get(index).ok_or_else(|| {
        Error::invalid(format!(
            "file '{}': metadata '{}': index {index} is out of range (the array has {} elements)",
            w.inner.path().display(),
            w.inner.meta()[i].0,
            items.len()
        ))
    })?;
    Ok((i, e))
}

fn wrong_type(w: &rf_weights, i: usize, v: &MetaValue, want: &str) -> Error {
    Error::dtype(format!(
        "file '{}': metadata '{}' is {} ({}), not {want}",
        w.inner.path().display(),
        w.inner.meta()[i].0,
        v.type_name(),
        match v {
            MetaValue::Array { items, .. } => format!("{} elements", items.len()),
            MetaValue::Str(s) => format!("{} bytes", s.len()),
            other => format!("{other:?}"),
        }
    ))
}

fn as_u64(w: &rf_weights, i: usize, v: &MetaValue) -> Result<u64> {
    v.as_u64()
        .ok_or_else(|| wrong_type(w, i, v, "an unsigned integer (u8..u64, or a signed >= 0)"))
}
fn as_i64(w: &rf_weights, i: usize, v: &MetaValue) -> Result<i64> {
    v.as_i64()
        .ok_or_else(|| wrong_type(w, i, v, "an integer that fits int64"))
}
fn as_f64(w: &rf_weights, i: usize, v: &MetaValue) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| wrong_type(w, i, v, "a floating-point number (f32 or f64)"))
}

/// Number of metadata keys (0 for NULL): a GGUF file's key-value pairs, or a safetensors
/// file's `__metadata__` entries (strings).
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_count(w: *const rf_weights) -> usize {
    boundary_value!(0, { w.as_ref().map_or(0, |w| w.meta.keys.len()) })
}

/// Key `i` (GGUF: file order; safetensors: sorted), valid until `rf_weights_free`.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_key(
    w: *const rf_weights,
    i: usize,
    key_out: *mut *const c_char,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let out = arg_out(key_out, "key_out")?;
        let k = w.meta.keys.get(i).ok_or_else(|| {
            Error::invalid(format!(
                "index {i} is out of range: '{}' has {} metadata keys",
                w.inner.path().display(),
                w.meta.keys.len()
            ))
        })?;
        *out = k.as_ptr();
        Ok(())
    })
}

/// The type of the value at `key` (GGUF's value type numbers); RF_STATUS_NOT_FOUND when the key
/// is absent.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_type(
    w: *const rf_weights,
    key: *const c_char,
    type_out: *mut rf_meta_type,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (_, v) = lookup(w, key)?;
        *arg_out(type_out, "type_out")? = meta_type(v.type_id());
        Ok(())
    })
}

/// Length and element type of the array at `key` (`elem_type_out` may be NULL); a value that
/// is not an array is RF_STATUS_DTYPE.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_array_len(
    w: *const rf_weights,
    key: *const c_char,
    elem_type_out: *mut rf_meta_type,
    len_out: *mut usize,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = lookup(w, key)?;
        let MetaValue::Array { elem, items } = v else {
            return Err(wrong_type(w, i, v, "an array"));
        };
        let out = arg_out(len_out, "len_out")?;
        if let Some(t) = elem_type_out.as_mut() {
            *t = meta_type(*elem);
        }
        *out = items.len();
        Ok(())
    })
}

/// An integer value as uint64: any unsigned type, or a signed one that is >= 0; anything else
/// (negative, float, bool, string, array) is RF_STATUS_DTYPE naming the key and its type.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_get_u64(
    w: *const rf_weights,
    key: *const c_char,
    out: *mut u64,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = lookup(w, key)?;
        let x = as_u64(w, i, v)?;
        *arg_out(out, "out")? = x;
        Ok(())
    })
}

/// An integer value as int64 (a uint64 above INT64_MAX, or a non-integer: RF_STATUS_DTYPE).
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_get_i64(
    w: *const rf_weights,
    key: *const c_char,
    out: *mut i64,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = lookup(w, key)?;
        let x = as_i64(w, i, v)?;
        *arg_out(out, "out")? = x;
        Ok(())
    })
}

/// A floating-point value (f32 or f64) as double; integers are RF_STATUS_DTYPE (read them with
/// the integer getters, which never round).
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_get_f64(
    w: *const rf_weights,
    key: *const c_char,
    out: *mut f64,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = lookup(w, key)?;
        let x = as_f64(w, i, v)?;
        *arg_out(out, "out")? = x;
        Ok(())
    })
}

/// A bool value (0 or 1).
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_get_bool(
    w: *const rf_weights,
    key: *const c_char,
    out: *mut bool,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = lookup(w, key)?;
        let MetaValue::Bool(b) = v else {
            return Err(wrong_type(w, i, v, "a bool"));
        };
        *arg_out(out, "out")? = *b;
        Ok(())
    })
}

/// A string value: `*str_out` is NUL-terminated and owned by `w` (valid until
/// `rf_weights_free`); `*len_out` (when `len_out` is not NULL) is its length in bytes, which
/// counts any NUL bytes inside it (GGUF strings are length-prefixed and may hold them).
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_get_str(
    w: *const rf_weights,
    key: *const c_char,
    str_out: *mut *const c_char,
    len_out: *mut usize,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = lookup(w, key)?;
        if !matches!(v, MetaValue::Str(_)) {
            return Err(wrong_type(w, i, v, "a string"));
        }
        let s = &w.meta.strs[i][0];
        *arg_out(str_out, "str_out")? = s.as_ptr() as *const c_char;
        if let Some(l) = len_out.as_mut() {
            *l = s.len() - 1;
        }
        Ok(())
    })
}

/// Element `index` of an array of integers, as `rf_weights_meta_get_u64` converts.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_array_get_u64(
    w: *const rf_weights,
    key: *const c_char,
    index: usize,
    out: *mut u64,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = element(w, key, index)?;
        let x = as_u64(w, i, v).map_err(|e| e.context(format!("element {index}")))?;
        *arg_out(out, "out")? = x;
        Ok(())
    })
}

/// Element `index` of an array of integers, as `rf_weights_meta_get_i64` converts.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_array_get_i64(
    w: *const rf_weights,
    key: *const c_char,
    index: usize,
    out: *mut i64,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = element(w, key, index)?;
        let x = as_i64(w, i, v).map_err(|e| e.context(format!("element {index}")))?;
        *arg_out(out, "out")? = x;
        Ok(())
    })
}

/// Element `index` of an array of floats, as `rf_weights_meta_get_f64` converts.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_array_get_f64(
    w: *const rf_weights,
    key: *const c_char,
    index: usize,
    out: *mut f64,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = element(w, key, index)?;
        let x = as_f64(w, i, v).map_err(|e| e.context(format!("element {index}")))?;
        *arg_out(out, "out")? = x;
        Ok(())
    })
}

/// Element `index` of an array of strings, as `rf_weights_meta_get_str` gives it (owned by `w`).
#[no_mangle]
pub unsafe extern "C" fn rf_weights_meta_array_get_str(
    w: *const rf_weights,
    key: *const c_char,
    index: usize,
    str_out: *mut *const c_char,
    len_out: *mut usize,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let (i, v) = element(w, key, index)?;
        if !matches!(v, MetaValue::Str(_)) {
            return Err(wrong_type(w, i, v, "a string").context(format!("element {index}")));
        }
        let s = &w.meta.strs[i][index];
        *arg_out(str_out, "str_out")? = s.as_ptr() as *const c_char;
        if let Some(l) = len_out.as_mut() {
            *l = s.len() - 1;
        }
        Ok(())
    })
}
