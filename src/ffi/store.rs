//! The adapter store: `rf_store_*`. Many adapters registered by name (PEFT folders), loaded on
//! first use and shared by every caller, evicted least-recently-used under a byte budget when no
//! caller holds them; new versions published under a name while calls run on the old one.

use super::boundary::{arg_out, arg_ref, arg_str};
use super::error::rf_error;
use super::handles::{rf_adapter, rf_runtime, rf_store, DeviceOf};
use crate::error::Error;
use crate::store::{Store, StoreStats};
use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;

/// What `rf_store_stats_get` reports (a consistent snapshot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct rf_store_stats {
    /// Adapters registered.
    pub registered: u64,
    /// Adapters loaded now, and the bytes they keep (A and B of every module; on a CUDA
    /// runtime the device copy counts too).
    pub resident: u64,
    pub bytes_resident: u64,
    /// Resident adapters acquired and not yet released (never evicted), and pinned ones.
    pub in_use: u64,
    pub pinned: u64,
    /// Acquisitions served by a resident adapter; loads (first use, or use after eviction);
    /// loads that failed; adapters evicted to stay under the budget.
    pub hits: u64,
    pub loads: u64,
    pub load_failures: u64,
    pub evictions: u64,
    /// New versions published (`rf_store_publish`, `rf_store_publish_peft`).
    pub publishes: u64,
    /// The budget the store was created with (0 = none).
    pub budget_bytes: u64,
}

impl From<StoreStats> for rf_store_stats {
    fn from(s: StoreStats) -> rf_store_stats {
        rf_store_stats {
            registered: s.registered,
            resident: s.resident,
            bytes_resident: s.bytes_resident,
            in_use: s.in_use,
            pinned: s.pinned,
            hits: s.hits,
            loads: s.loads,
            load_failures: s.load_failures,
            evictions: s.evictions,
            publishes: s.publishes,
            budget_bytes: 0,
        }
    }
}

/// Creates an adapter store for runtime `rt`'s device: adapters load as `rf_adapter_load_peft`
/// would on `rt` (on a CUDA runtime A and B are uploaded, and count twice in the budget). After
/// each load the store evicts least recently used adapters that are neither acquired nor pinned
/// until the resident bytes fit `budget_bytes` (0 = no limit); adapters in use may keep it over
/// budget (`rf_store_stats`). The store does not use `rt` after this call returns (it may be
/// freed first, on a CPU runtime; on CUDA the device context stays alive while adapters on it
/// do). The caller owns `*out` (free with `rf_store_free`). Thread-safe: every `rf_store_*`
/// call may run from many threads at once.
#[no_mangle]
pub unsafe extern "C" fn rf_store_create(
    rt: *mut rf_runtime,
    budget_bytes: u64,
    out: *mut *mut rf_store,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let out = arg_out(out, "out")?;
        let dev = DeviceOf::of(&rt.inner);
        let store = Store::new(
            budget_bytes,
            Box::new(move |name: &str, path: &Path| {
                let mut a = crate::methods::files::load_any(path)?;
                a.name = name.to_string();
                let h = rf_adapter::on_device(a, &dev)?;
                let bytes = h.resident_bytes();
                Ok((h, bytes))
            }),
        );
        *out = Box::into_raw(Box::new(rf_store { inner: store }));
        Ok(())
    })
}

/// Frees the store; NULL is accepted. Adapters acquired from it and not yet released stay valid
/// until their `rf_store_release` (which needs no store); every other adapter is freed now.
/// No other `rf_store_*` call on `s` may be running or follow.
#[no_mangle]
pub unsafe extern "C" fn rf_store_free(s: *mut rf_store) {
    boundary_value!((), {
        if !s.is_null() {
            drop(Box::from_raw(s));
        }
    })
}

/// Registers the PEFT folder `path` as adapter `name` (copied). Nothing is loaded yet; the path
/// must exist (else RF_STATUS_IO) and the name be new (else RF_STATUS_INVALID_ARGUMENT).
#[no_mangle]
pub unsafe extern "C" fn rf_store_register(
    s: *const rf_store,
    name: *const c_char,
    path: *const c_char,
) -> *mut rf_error {
    boundary!({
        let s = arg_ref(s, "s")?;
        let name = arg_str(name, "name")?;
        let path = arg_str(path, "path")?;
        s.inner.register(name, Path::new(path))
    })
}

/// The adapter registered as `name`, loaded now on its first use (or after an eviction; many
/// threads asking at once share one load; a failed load is the error, naming the adapter, and a
/// later call tries again). RF_STATUS_NOT_FOUND for an unknown name.
/// `*out` is shared and read-only: use it with `rf_adapter_module`, `rf_lora_info_get` and
/// `rf_linear` from any thread; do not pass it to a call that changes an adapter (training,
/// `rf_lora_set_rank`: load a private copy with `rf_adapter_load_peft` for that). It is never
/// evicted while acquired; release it once per acquisition with `rf_store_release` (or
/// `rf_adapter_free`, which releases it), after the calls using this acquisition have returned.
/// Publishing, evicting or freeing the store meanwhile never frees it under a running call.
#[no_mangle]
pub unsafe extern "C" fn rf_store_acquire(
    s: *const rf_store,
    name: *const c_char,
    out: *mut *mut rf_adapter,
) -> *mut rf_error {
    boundary!({
        let s = arg_ref(s, "s")?;
        let name = arg_str(name, "name")?;
        let out = arg_out(out, "out")?;
        let a = s.inner.acquire(name)?;
        *out = Arc::into_raw(a) as *mut rf_adapter;
        Ok(())
    })
}

/// Releases one acquisition of `a` (from `rf_store_acquire`); NULL is accepted. The adapter
/// becomes evictable when no acquisition remains, and is freed here if its store was freed or
/// evicted it meanwhile (`rf_adapter_free` on an acquired adapter does the same). Thread-safe;
/// needs no store.
#[no_mangle]
pub unsafe extern "C" fn rf_store_release(a: *mut rf_adapter) {
    boundary_value!((), {
        if !a.is_null() {
            drop(Arc::from_raw(a as *const rf_adapter));
        }
    })
}

/// Pins `name` (never evicted; pinning does not load it) or unpins it. RF_STATUS_NOT_FOUND for
/// an unknown name.
#[no_mangle]
pub unsafe extern "C" fn rf_store_pin(
    s: *const rf_store,
    name: *const c_char,
    pinned: bool,
) -> *mut rf_error {
    boundary!({
        let s = arg_ref(s, "s")?;
        let name = arg_str(name, "name")?;
        s.inner.pin(name, pinned)
    })
}

/// Evicts what the budget asks for now (adapters released since the last load may have become
/// evictable); `*evicted_out` (may be NULL) gets how many went.
#[no_mangle]
pub unsafe extern "C" fn rf_store_trim(
    s: *const rf_store,
    evicted_out: *mut usize,
) -> *mut rf_error {
    boundary!({
        let s = arg_ref(s, "s")?;
        let n = s.inner.trim();
        if !evicted_out.is_null() {
            *evicted_out = n;
        }
        Ok(())
    })
}

/// The store's counters (a consistent snapshot). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_store_stats_get(
    s: *const rf_store,
    out: *mut rf_store_stats,
) -> *mut rf_error {
    boundary!({
        let s = arg_ref(s, "s")?;
        let out = arg_out(out, "out")?;
        *out = rf_store_stats {
            budget_bytes: s.inner.budget(),
            ..s.inner.stats().into()
        };
        Ok(())
    })
}

/// Publishes the PEFT folder `path` as the new version of `name` (registering the name if it
/// is new): acquisitions from now on get it (loaded on first use, evictable and reloadable like
/// a registered folder); adapters acquired before keep the version they got, unchanged, until
/// released. Never waits for calls using the old version (only for a load of it in flight).
/// `*generation_out` (may be NULL) gets the new version's generation. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_store_publish_peft(
    s: *const rf_store,
    name: *const c_char,
    path: *const c_char,
    generation_out: *mut u64,
) -> *mut rf_error {
    boundary!({
        let s = arg_ref(s, "s")?;
        let name = arg_str(name, "name")?;
        let path = arg_str(path, "path")?;
        let v = s.inner.publish_path(name, Path::new(path))?;
        if !generation_out.is_null() {
            *generation_out = v.generation;
        }
        Ok(())
    })
}

/// Publishes the adapter `a` (from `rf_adapter_load_peft` or `rf_adapter_new`, e.g. after
/// training steps) as the new version of `name` (registering the name if it is new). On success
/// the store owns `a` (do not use or free it again; acquire the name to use it): it is shared,
/// read-only and resident until a later publish replaces it and its last holder releases it (it
/// is never evicted: it has no folder to reload from). Adapters acquired before keep the version
/// they got. On error `a` stays the caller's. `*generation_out` (may be NULL) gets the new
/// version's generation. Thread-safe; `a` must not be in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn rf_store_publish(
    s: *const rf_store,
    name: *const c_char,
    a: *mut rf_adapter,
    generation_out: *mut u64,
) -> *mut rf_error {
    boundary!({
        let s = arg_ref(s, "s")?;
        let name = arg_str(name, "name")?;
        if a.is_null() {
            return Err(Error::invalid("argument 'a' is NULL"));
        }
        if name.is_empty() {
            return Err(Error::invalid("store: an adapter name is empty"));
        }
        let bytes = (*a).resident_bytes();
        // Moved out only once every check has passed, so an error leaves `a` to the caller.
        let v = s.inner.publish(name, *Box::from_raw(a), bytes)?;
        if !generation_out.is_null() {
            *generation_out = v.generation;
        }
        Ok(())
    })
}

/// The version of an adapter: `*id_out` the stable id of its name in the store (0 for an
/// adapter that did not come from a store) and `*generation_out` the number of versions
/// published under that name before it. Two acquisitions with equal (id, generation) are the
/// same adapter, bit for bit: key caches computed with an adapter on this pair. Either out
/// pointer may be NULL. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_version(
    a: *const rf_adapter,
    id_out: *mut u64,
    generation_out: *mut u64,
) -> *mut rf_error {
    boundary!({
        let a = arg_ref(a, "a")?;
        if !id_out.is_null() {
            *id_out = a.version.id;
        }
        if !generation_out.is_null() {
            *generation_out = a.version.generation;
        }
        Ok(())
    })
}
