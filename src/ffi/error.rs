//! `rf_error` objects: an owned status + message, freed by `rf_error_free`. No thread-local
//! "last error": a goroutine can change OS thread between two cgo calls.

use super::types::rf_status;
use crate::error::{Error, Result};
use std::ffi::{c_char, CString};

/// An error object. Owned by the caller after a function returns it; free with `rf_error_free`.
/// Not thread-safe to free twice; safe to read from several threads.
pub struct rf_error {
    status: rf_status,
    message: CString,
}

/// Converts a result to what C sees: NULL on success, else a new error object.
pub fn to_raw(r: Result<()>) -> *mut rf_error {
    match r {
        Ok(()) => std::ptr::null_mut(),
        Err(e) => new_raw(e),
    }
}

pub fn new_raw(e: Error) -> *mut rf_error {
    let msg = e.message.replace('\0', "\\0");
    let message = CString::new(msg).unwrap_or_default();
    Box::into_raw(Box::new(rf_error {
        status: e.status.into(),
        message,
    }))
}

/// The status of an error; RF_STATUS_OK for NULL (NULL means success).
#[no_mangle]
pub unsafe extern "C" fn rf_error_code(e: *const rf_error) -> rf_status {
    boundary_value!(rf_status::RF_STATUS_INTERNAL, {
        match e.as_ref() {
            None => rf_status::RF_STATUS_OK,
            Some(e) => e.status,
        }
    })
}

/// The UTF-8 message of an error, valid until `rf_error_free`; "" for NULL.
#[no_mangle]
pub unsafe extern "C" fn rf_error_message(e: *const rf_error) -> *const c_char {
    boundary_value!(c"".as_ptr(), {
        match e.as_ref() {
            None => c"".as_ptr(),
            Some(e) => e.message.as_ptr(),
        }
    })
}

/// Frees an error object; NULL is accepted.
#[no_mangle]
pub unsafe extern "C" fn rf_error_free(e: *mut rf_error) {
    boundary_value!((), {
        if !e.is_null() {
            drop(Box::from_raw(e));
        }
    })
}
