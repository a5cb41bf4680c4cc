//! The one panic/NULL boundary. Every exported function's body runs inside `boundary!`, which
//! turns an `Err` into an owned `rf_error` and a panic into RF_STATUS_INTERNAL, so no unwind ever
//! crosses into C. Argument helpers turn NULL and out-of-range inputs into errors naming the
//! argument.

use crate::error::{Error, Result};
use std::ffi::{c_char, CStr};

/// Runs `$body` (a block evaluating to `Result<()>`) and returns `*mut rf_error`.
macro_rules! boundary {
    ($body:block) => {{
        let r = ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(
            || -> $crate::error::Result<()> { $body },
        ));
        $crate::ffi::error::to_raw($crate::ffi::boundary::flatten(r))
    }};
}

/// Runs `$body` (evaluating to a value) for functions that cannot return an error; a panic
/// gives `$default`.
macro_rules! boundary_value {
    ($default:expr, $body:block) => {{
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(_) => $default,
        }
    }};
}

pub fn flatten(r: std::thread::Result<Result<()>>) -> Result<()> {
    match r {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::internal(format!(
                "internal error (panic caught at the C boundary): {what}"
            )))
        }
    }
}

/// `&T` from a pointer argument, or INVALID_ARGUMENT naming it.
///
/// # Safety
/// A non-NULL `p` must point to a live `T`.
pub unsafe fn arg_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    p.as_ref()
        .ok_or_else(|| Error::invalid(format!("argument '{name}' is NULL")))
}

/// `&mut T` from an out-pointer argument, or INVALID_ARGUMENT naming it.
///
/// # Safety
/// A non-NULL `p` must point to writable memory for a `T`.
pub unsafe fn arg_out<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T> {
    p.as_mut()
        .ok_or_else(|| Error::invalid(format!("argument '{name}' is NULL")))
}

/// A UTF-8 string argument.
///
/// # Safety
/// A non-NULL `p` must point to a NUL-terminated string.
pub unsafe fn arg_str<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("argument '{name}' is NULL")));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| Error::invalid(format!("argument '{name}' is not valid UTF-8")))
}

/// An array argument of `n` elements: NULL is allowed only when `n == 0`, and `n` is capped so a
/// wild count is an error rather than a huge read.
///
/// # Safety
/// A non-NULL `p` must point to `n` readable `T`s that outlive 'a.
pub unsafe fn arg_slice<'a, T>(p: *const T, n: usize, name: &str, count: &str) -> Result<&'a [T]> {
    if n > (1 << 20) {
        return Err(Error::invalid(format!("{count} = {n} is out of range")));
    }
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::invalid(format!(
            "argument '{name}' is NULL with {count} = {n}"
        )));
    }
    Ok(std::slice::from_raw_parts(p, n))
}
