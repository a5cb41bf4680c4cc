//! `rankfuse soak`: adapters swapped under load, through the C ABI. `--threads` callers acquire
//! one stored adapter name, run rf_linear (a mixed batch: rows on the stored adapter, on a
//! private one, on the base) and release, while a publisher publishes a new version of the name
//! every `--publish-us` (alternately from a folder and from an adapter loaded in memory), cycling
//! through the three fixture adapters, and pins / trims. Generation g is fixture g % 3, so every
//! call checks its output, bit for bit, against the serial result of the version it reports
//! (rf_adapter_version), and that the generations it sees never go back. Fails on the first
//! mismatch; prints calls, publishes and the store's counters.

use rankfuse::ffi::adapter::*;
use rankfuse::ffi::error::*;
use rankfuse::ffi::handles::*;
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::store::*;
use rankfuse::ffi::types::*;
use rankfuse::ffi::weights::*;
use rankfuse::{Error, Result};
use std::ffi::{c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// The peft-tiny fixture folder (base.safetensors + adapters/lora-r8, rslora-pattern, lora-r64).
    #[arg(long, default_value = "tests/fixtures/peft-tiny")]
    fixture: PathBuf,
    /// Caller threads.
    #[arg(long, default_value_t = 8)]
    callers: usize,
    /// How long to run.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Microseconds between publishes.
    #[arg(long, default_value_t = 1000)]
    publish_us: u64,
}

const ADAPTERS: [&str; 3] = ["lora-r8", "rslora-pattern", "lora-r64"];
const MODULE: &str = "layers.1.mlp.down_proj";

fn check(e: *mut rf_error) -> Result<()> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-NULL error from the library, freed once here.
    let msg = unsafe {
        let m = CStr::from_ptr(rf_error_message(e))
            .to_string_lossy()
            .into_owned();
        rf_error_free(e);
        m
    };
    Err(Error::internal(format!("soak: {msg}")))
}

fn cs(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// Raw handles shared by the threads (the C ABI allows these calls from many threads).
#[derive(Clone, Copy)]
struct Handles {
    rt: usize,
    base: usize,
    private: usize,
    store: usize,
}

/// A 9-row batch of MODULE: rows 0, 3, .. on `ad`, 1, 4, .. on the private adapter, the rest on
/// the base only.
unsafe fn apply(h: Handles, ad: *mut rf_adapter) -> Result<Vec<f32>> {
    let mut w = std::mem::zeroed::<rf_matrix>();
    check(rf_weights_get(
        h.base as *const rf_weights,
        cs(&format!("{MODULE}.weight")).as_ptr(),
        &mut w,
    ))?;
    let mut l = [null_mut(); 2];
    check(rf_adapter_module(ad, cs(MODULE).as_ptr(), &mut l[0]))?;
    check(rf_adapter_module(
        h.private as *mut rf_adapter,
        cs(MODULE).as_ptr(),
        &mut l[1],
    ))?;
    let (m, k, n) = (9i64, w.cols, w.rows);
    let xb: Vec<f32> = (0..m * k)
        .map(|i| ((i * 29 % 97) as f32 - 48.0) / 64.0)
        .collect();
    let mut yb = vec![0f32; (m * n) as usize];
    let x = rf_matrix {
        data: xb.as_ptr() as *mut c_void,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: m,
        cols: k,
        ld: k,
    };
    let mut y = rf_matrix {
        data: yb.as_mut_ptr() as *mut c_void,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: m,
        cols: n,
        ld: n,
    };
    let slots = l.map(|lora| rf_lora_slot {
        lora,
        rank: 0,
        scale_mult: 1.0,
    });
    let rows: Vec<i32> = (0..m as i32).map(|i| [0, 1, -1][i as usize % 3]).collect();
    check(rf_linear(
        h.rt as *mut rf_runtime,
        &x,
        &w,
        null(),
        slots.as_ptr(),
        2,
        rows.as_ptr(),
        &mut y,
    ))?;
    Ok(yb)
}

pub fn run(threads: usize, a: &Args) -> Result<()> {
    let path = |name: &str| cs(a.fixture.join("adapters").join(name).to_str().unwrap_or(""));
    // SAFETY: every handle is created here, shared only while the scoped threads run, and freed
    // after they have joined.
    unsafe {
        let opts = rf_runtime_options {
            struct_size: std::mem::size_of::<rf_runtime_options>() as u32,
            device: rf_device::RF_DEVICE_CPU,
            device_index: 0,
            num_threads: threads as u32,
            cuda_stream: null_mut(),
            act_quant: rf_act_quant::RF_ACT_QUANT_EXACT,
        };
        let mut rt = null_mut();
        check(rf_runtime_create(&opts, &mut rt))?;
        let mut base = null_mut();
        let bp = cs(a.fixture.join("base.safetensors").to_str().unwrap_or(""));
        check(rf_weights_open(rt, bp.as_ptr(), &mut base))?;
        let mut private = null_mut();
        check(rf_adapter_load_peft(
            rt,
            path(ADAPTERS[1]).as_ptr(),
            &mut private,
        ))?;
        let mut store = null_mut();
        check(rf_store_create(rt, 1, &mut store))?;
        let h = Handles {
            rt: rt as usize,
            base: base as usize,
            private: private as usize,
            store: store as usize,
        };
        let mut want = Vec::new();
        for name in ADAPTERS {
            let mut ad = null_mut();
            check(rf_adapter_load_peft(rt, path(name).as_ptr(), &mut ad))?;
            want.push(apply(h, ad)?);
            rf_adapter_free(ad);
        }
        check(rf_store_register(
            store,
            cs("live").as_ptr(),
            path(ADAPTERS[0]).as_ptr(),
        ))?;
        let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
        let calls = AtomicU64::new(0);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let failed = || failure.lock().map_or(true, |f| f.is_some());
        let fail = |e: Error| {
            if let Ok(mut f) = failure.lock() {
                f.get_or_insert(e);
            }
        };
        let publishes = std::thread::scope(|sc| {
            for t in 0..a.callers {
                let (want, calls, failed, fail) = (&want, &calls, &failed, &fail);
                sc.spawn(move || {
                    let (mut last, mut id0) = (0u64, None);
                    let one = |last: &mut u64, id0: &mut Option<u64>| -> Result<()> {
                        let mut ad = null_mut();
                        check(rf_store_acquire(
                            h.store as *const rf_store,
                            cs("live").as_ptr(),
                            &mut ad,
                        ))?;
                        let (mut id, mut g) = (0u64, 0u64);
                        let r = check(rf_adapter_version(ad, &mut id, &mut g))
                            .and_then(|_| apply(h, ad));
                        rf_store_release(ad);
                        let y = r?;
                        if g < *last || *id0.get_or_insert(id) != id {
                            return Err(Error::internal(format!(
                                "soak: caller {t} saw version ({id}, {g}) after generation {last}"
                            )));
                        }
                        *last = g;
                        let w = &want[(g % 3) as usize];
                        if y.iter().zip(w).any(|(a, b)| a.to_bits() != b.to_bits()) {
                            return Err(Error::internal(format!(
                                "soak: caller {t}: generation {g} is not {} bit for bit",
                                ADAPTERS[(g % 3) as usize]
                            )));
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    };
                    while Instant::now() < deadline && !failed() {
                        if let Err(e) = one(&mut last, &mut id0) {
                            fail(e);
                        }
                    }
                });
            }
            let mut g = 0u64;
            let publish = |g: u64| -> Result<u64> {
                let (name, next) = (cs("live"), path(ADAPTERS[((g + 1) % 3) as usize]));
                let store = h.store as *const rf_store;
                let mut got = 0u64;
                if g.is_multiple_of(2) {
                    check(rf_store_publish_peft(
                        store,
                        name.as_ptr(),
                        next.as_ptr(),
                        &mut got,
                    ))?;
                } else {
                    let mut ad = null_mut();
                    check(rf_adapter_load_peft(rt, next.as_ptr(), &mut ad))?;
                    if let Err(e) = check(rf_store_publish(store, name.as_ptr(), ad, &mut got)) {
                        rf_adapter_free(ad);
                        return Err(e);
                    }
                }
                check(rf_store_pin(store, name.as_ptr(), got.is_multiple_of(5)))?;
                check(rf_store_trim(store, null_mut()))?;
                Ok(got)
            };
            while Instant::now() < deadline && !failed() {
                match publish(g) {
                    Ok(got) if got == g + 1 => g = got,
                    Ok(got) => fail(Error::internal(format!(
                        "soak: publish {} got generation {got}",
                        g + 1
                    ))),
                    Err(e) => fail(e),
                }
                std::thread::sleep(Duration::from_micros(a.publish_us));
            }
            g
        });
        let mut st = rf_store_stats::default();
        let r = check(rf_store_stats_get(store, &mut st));
        rf_store_free(store);
        rf_adapter_free(private);
        rf_weights_free(base);
        rf_runtime_free(rt);
        r?;
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
        let n = calls.into_inner();
        if st.publishes != publishes || st.in_use != 0 || st.hits + st.loads != n {
            return Err(Error::internal(format!(
                "soak: counters do not add up after {n} calls and {publishes} publishes: {st:?}"
            )));
        }
        println!(
            "soak: {n} calls by {} threads, {publishes} versions published in {:.1} s; every output equal to its version's serial result; store: {} hits, {} loads, {} evictions",
            a.callers, a.seconds, st.hits, st.loads, st.evictions
        );
    }
    Ok(())
}
