//! C-ABI test helpers: take, expect and unwrap `rf_error` objects; C strings.

use rankfuse::ffi::error::*;
use rankfuse::ffi::types::rf_status;
use std::ffi::{CStr, CString};

/// Takes an error object: (status, message), freeing it.
pub fn take(e: *mut rf_error) -> (rf_status, String) {
    unsafe {
        let st = rf_error_code(e);
        let msg = CStr::from_ptr(rf_error_message(e))
            .to_string_lossy()
            .into_owned();
        rf_error_free(e);
        (st, msg)
    }
}

/// The call failed with `st` and a message naming every needle.
pub fn expect(e: *mut rf_error, st: rf_status, needles: &[&str]) {
    assert!(!e.is_null(), "expected {st:?}, got success");
    let (got, msg) = take(e);
    assert_eq!(got, st, "status for message: {msg}");
    for n in needles {
        assert!(msg.contains(n), "message '{msg}' should name '{n}'");
    }
}

/// The call succeeded (else panics with its status and message).
pub fn ok(e: *mut rf_error) {
    if !e.is_null() {
        let (st, msg) = take(e);
        panic!("unexpected error {st:?}: {msg}");
    }
}

pub fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}
