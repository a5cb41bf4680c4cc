//! The adapter store through the C ABI (`rf_store_*`): 8 threads acquire adapters by name, run
//! rf_linear with them and release them, under a budget that holds about one adapter, while
//! another thread pins, unpins and trims. Every output must equal, bit for bit, the serial result
//! with a privately loaded copy of the same adapter; every acquisition is released; the counters
//! add up. Bounded to a few seconds.

mod common;
use common::capi::{cs, expect, ok};
use common::fixture;
use rankfuse::ffi::adapter::*;
use rankfuse::ffi::handles::*;
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::store::*;
use rankfuse::ffi::types::*;
use rankfuse::ffi::weights::*;
use std::ffi::{c_void, CString};
use std::ptr::{null, null_mut};

const ADAPTERS: [&str; 3] = ["lora-r8", "rslora-pattern", "lora-r64"];
const MODULE: &str = "layers.1.mlp.down_proj";

/// y = x W^T + adapter(x) for module MODULE with a fixed x.
unsafe fn apply(rt: *mut rf_runtime, base: *const rf_weights, ad: *mut rf_adapter) -> Vec<f32> {
    let mut w = std::mem::zeroed::<rf_matrix>();
    ok(rf_weights_get(
        base,
        cs(&format!("{MODULE}.weight")).as_ptr(),
        &mut w,
    ));
    let mut l = null_mut();
    ok(rf_adapter_module(ad, cs(MODULE).as_ptr(), &mut l));
    let (m, k, n) = (7i64, w.cols, w.rows);
    let mut xb: Vec<f32> = (0..m * k)
        .map(|i| ((i * 29 % 97) as f32 - 48.0) / 64.0)
        .collect();
    let mut yb = vec![0f32; (m * n) as usize];
    let x = rf_matrix {
        data: xb.as_mut_ptr() as *mut c_void,
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
    let slot = rf_lora_slot {
        lora: l,
        rank: 0,
        scale_mult: 1.0,
    };
    ok(rf_linear(rt, &x, &w, null(), &slot, 1, null(), &mut y));
    yb
}

fn path(name: &str) -> CString {
    cs(fixture(&format!("adapters/{name}")).to_str().unwrap())
}

#[test]
fn store_under_load_serves_the_right_adapter_every_time() {
    unsafe {
        let mut rt = null_mut();
        ok(rf_runtime_create(null(), &mut rt));
        let mut base = null_mut();
        ok(rf_weights_open(
            rt,
            cs(fixture("base.safetensors").to_str().unwrap()).as_ptr(),
            &mut base,
        ));
        // Serial references from private copies; the budget: the largest adapter's bytes.
        let mut want = Vec::new();
        let mut budget = 0u64;
        for name in ADAPTERS {
            let mut ad = null_mut();
            ok(rf_adapter_load_peft(rt, path(name).as_ptr(), &mut ad));
            want.push(apply(rt, base, ad));
            let core = rankfuse::adapter::peft::load(&fixture(&format!("adapters/{name}")));
            budget = budget.max(core.unwrap().tensor_bytes() as u64);
            rf_adapter_free(ad);
        }
        let mut store = null_mut();
        ok(rf_store_create(rt, budget, &mut store));
        for name in ADAPTERS {
            ok(rf_store_register(
                store,
                cs(name).as_ptr(),
                path(name).as_ptr(),
            ));
        }
        expect(
            rf_store_register(store, cs("lora-r8").as_ptr(), path("lora-r8").as_ptr()),
            rf_status::RF_STATUS_INVALID_ARGUMENT,
            &[],
        );
        expect(
            rf_store_register(store, cs("x").as_ptr(), cs("/no/such/dir").as_ptr()),
            rf_status::RF_STATUS_IO,
            &[],
        );
        let mut ad = null_mut();
        expect(
            rf_store_acquire(store, cs("nope").as_ptr(), &mut ad),
            rf_status::RF_STATUS_NOT_FOUND,
            &[],
        );

        let (rt_u, base_u, store_u) = (rt as usize, base as usize, store as usize);
        let threads = 8;
        let iters = 40;
        std::thread::scope(|sc| {
            for t in 0..threads {
                let want = &want;
                sc.spawn(move || {
                    let (rt, base, store) = (
                        rt_u as *mut rf_runtime,
                        base_u as *const rf_weights,
                        store_u as *const rf_store,
                    );
                    for i in 0..iters {
                        let which = (t * 7 + i * 5) % ADAPTERS.len();
                        let mut ad = null_mut();
                        ok(rf_store_acquire(
                            store,
                            cs(ADAPTERS[which]).as_ptr(),
                            &mut ad,
                        ));
                        let y = apply(rt, base, ad);
                        rf_store_release(ad);
                        assert!(
                            y.iter()
                                .zip(&want[which])
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "thread {t} iteration {i}: {} differs from its serial result",
                            ADAPTERS[which]
                        );
                    }
                });
            }
            sc.spawn(move || {
                let store = store_u as *const rf_store;
                for i in 0..200 {
                    let name = cs(ADAPTERS[i % 3]);
                    ok(rf_store_pin(store, name.as_ptr(), i % 2 == 0));
                    let mut n = 0usize;
                    ok(rf_store_trim(store, &mut n));
                    std::thread::yield_now();
                }
                for name in ADAPTERS {
                    ok(rf_store_pin(store, cs(name).as_ptr(), false));
                }
            });
        });
        let mut st = rf_store_stats::default();
        ok(rf_store_stats_get(store, &mut st));
        assert_eq!(st.registered, 3);
        assert_eq!(st.in_use, 0, "every acquisition was released");
        assert_eq!(st.hits + st.loads, (threads * iters) as u64);
        assert_eq!(st.load_failures, 0);
        assert_eq!(st.budget_bytes, budget);
        assert!(st.loads >= 3 && st.resident <= 3);
        ok(rf_store_trim(store, null_mut()));
        ok(rf_store_stats_get(store, &mut st));
        assert!(st.bytes_resident <= budget, "{st:?}");
        eprintln!("store after {} calls: {st:?}", threads * iters);

        // An adapter held across rf_store_free stays usable until released.
        let mut held = null_mut();
        ok(rf_store_acquire(store, cs("lora-r64").as_ptr(), &mut held));
        rf_store_free(store);
        let y = apply(rt, base, held);
        assert!(y
            .iter()
            .zip(&want[2])
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        rf_store_release(held);
        rf_store_release(null_mut());
        rf_store_free(null_mut());
        rf_weights_free(base);
        rf_runtime_free(rt);
    }
}

#[test]
fn a_refused_publish_leaves_the_adapter_to_the_caller() {
    unsafe {
        let mut rt = null_mut();
        ok(rf_runtime_create(null(), &mut rt));
        let mut store = null_mut();
        ok(rf_store_create(rt, 0, &mut store));
        let mut ad = null_mut();
        ok(rf_adapter_load_peft(rt, path("lora-r8").as_ptr(), &mut ad));
        expect(
            rf_store_publish(store, cs("").as_ptr(), ad, null_mut()),
            rf_status::RF_STATUS_INVALID_ARGUMENT,
            &[],
        );
        let (mut id, mut g) = (1u64, 1u64);
        ok(rf_adapter_version(ad, &mut id, &mut g));
        assert_eq!((id, g), (0, 0), "a private adapter has no store version");
        let mut g = 9u64;
        ok(rf_store_publish(store, cs("x").as_ptr(), ad, &mut g));
        assert_eq!(g, 0, "the first version of a name published from memory");
        let mut got = null_mut();
        ok(rf_store_acquire(store, cs("x").as_ptr(), &mut got));
        let (mut id, mut g) = (0u64, 9u64);
        ok(rf_adapter_version(got, &mut id, &mut g));
        assert!(id != 0 && g == 0);
        rf_store_release(got);
        rf_store_free(store);
        rf_runtime_free(rt);
    }
}
