//! The adapter store at scale, through the C ABI: N rank-r adapters (one k x n module each, bf16)
//! written as PEFT folders, registered in one store, then
//!
//! 1. first-use latency (acquire of a cold adapter: map + parse + checks), median and p99;
//! 2. resident bytes after touching every adapter under the budget, evictions;
//! 3. steady state: one mixed batch of 64 rows over 16 adapters acquired from the store vs the
//!    same rows on one adapter (rf_linear, median);
//! 4. rf_linear throughput (m = 1, `--callers` threads doing acquire + linear + release, 2 by
//!    default) with and without a publisher thread publishing a new version of one of the
//!    adapters every ms. `--callers 1 --pool-threads 1` leaves the second core of a 2-core
//!    machine to the publisher, so the ratio shows what publishing costs the callers (the
//!    version swap, retiring old versions, cache and memory traffic) rather than the CPU time
//!    the publisher's own work takes from them.
//!
//! Reports, asserts nothing.
//!
//!   cargo run --release --example store_bench -- [--adapters 1000] [--k 4096] [--n 4096]
//!       [--r 16] [--budget-mib 256] [--seconds 3] [--rounds 3] [--callers 2]
//!       [--pool-threads 0 (all cores)]

use rankfuse::adapter::{peft, Adapter, Lora, Scaling, TensorData};
use rankfuse::ffi::handles::*;
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::store::*;
use rankfuse::ffi::types::*;
use rankfuse::matrix::Matrix;
use rankfuse::rng::SplitMix64;
use rankfuse::DType;
use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

fn ok(e: *mut rankfuse::ffi::error::rf_error) {
    if !e.is_null() {
        let m = unsafe { CStr::from_ptr(rankfuse::ffi::error::rf_error_message(e)) };
        panic!("{}", m.to_string_lossy());
    }
}

fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// CPU time of clock `clock` (ns).
fn cpu_ns(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on every Linux.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mat(m: &Matrix) -> rf_matrix {
    rf_matrix {
        data: m.bytes().as_ptr() as *mut c_void,
        dtype: m.dtype.into(),
        rows: m.rows as i64,
        cols: m.cols as i64,
        ld: m.cols as i64,
    }
}

const MODULE: &str = "proj";

/// rf_linear of x on W with one slot per adapter in `ads` (row i uses adapter i % len).
unsafe fn linear(
    rt: *mut rf_runtime,
    x: &Matrix,
    w: &Matrix,
    ads: &[*mut rf_adapter],
    y: &mut Matrix,
) {
    let slots: Vec<rf_lora_slot> = ads
        .iter()
        .map(|&a| {
            let mut l = null_mut();
            ok(rankfuse::ffi::adapter::rf_adapter_module(
                a,
                cs(MODULE).as_ptr(),
                &mut l,
            ));
            rf_lora_slot {
                lora: l,
                rank: 0,
                scale_mult: 1.0,
            }
        })
        .collect();
    let rows: Vec<i32> = (0..x.rows).map(|i| (i % ads.len()) as i32).collect();
    let mut ym = mat(y);
    let rs = if ads.len() > 1 { rows.as_ptr() } else { null() };
    ok(rf_linear(
        rt,
        &mat(x),
        &mat(w),
        null(),
        slots.as_ptr(),
        slots.len(),
        rs,
        &mut ym,
    ));
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let get = |f: &str, d: &str| -> String {
        a.iter()
            .position(|x| x == f)
            .and_then(|i| a.get(i + 1).cloned())
            .unwrap_or_else(|| d.to_string())
    };
    let num = |f: &str, d: &str| get(f, d).parse::<usize>().unwrap();
    let (count, k, n, r) = (
        num("--adapters", "1000"),
        num("--k", "4096"),
        num("--n", "4096"),
        num("--r", "16"),
    );
    let budget = num("--budget-mib", "256") as u64 * 1024 * 1024;
    let secs: f64 = get("--seconds", "3").parse().unwrap();
    let rounds = num("--rounds", "3");
    let callers = num("--callers", "2");
    let pool_threads = num("--pool-threads", "0");
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::new(7);
    let t0 = Instant::now();
    for i in 0..count {
        let a = Matrix::from_f32(DType::BF16, r, k, &rng.fill_uniform(r * k, -0.02, 0.02)).unwrap();
        let b = Matrix::from_f32(DType::BF16, n, r, &rng.fill_uniform(n * r, -0.02, 0.02)).unwrap();
        let lora = Lora::new(
            MODULE,
            TensorData::Owned(a),
            TensorData::Owned(b),
            2.0 * r as f32,
            Scaling::Lora,
            0.0,
        )
        .unwrap();
        let mut ad = Adapter::new(&format!("a{i}"));
        ad.add(lora).unwrap();
        peft::save(&ad, &dir.path().join(format!("a{i}"))).unwrap();
    }
    let per = 2 * r * (k + n);
    println!(
        "{count} adapters, rank {r}, {k} -> {n}, bf16: {per} bytes each, {:.1} MiB in all (written in {:.1} s); budget {} MiB",
        (count * per) as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64(),
        budget >> 20
    );
    unsafe {
        let mut rt = null_mut();
        let opts = rf_runtime_options {
            struct_size: std::mem::size_of::<rf_runtime_options>() as u32,
            device: rf_device::RF_DEVICE_CPU,
            device_index: 0,
            num_threads: pool_threads as u32,
            cuda_stream: null_mut(),
            act_quant: rf_act_quant::RF_ACT_QUANT_EXACT,
        };
        ok(rf_runtime_create(&opts, &mut rt));
        let mut store = null_mut();
        ok(rf_store_create(rt, budget, &mut store));
        for i in 0..count {
            let p = dir.path().join(format!("a{i}"));
            ok(rf_store_register(
                store,
                cs(&format!("a{i}")).as_ptr(),
                cs(p.to_str().unwrap()).as_ptr(),
            ));
        }
        // 1 + 2: first use of every adapter (released at once, so the budget evicts).
        let mut lat = Vec::new();
        for i in 0..count {
            let t = Instant::now();
            let mut ad = null_mut();
            ok(rf_store_acquire(
                store,
                cs(&format!("a{i}")).as_ptr(),
                &mut ad,
            ));
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            rf_store_release(ad);
        }
        let mut st = rf_store_stats::default();
        ok(rf_store_stats_get(store, &mut st));
        let med = median(lat.clone());
        lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "first use: median {med:.3} ms, p99 {:.3} ms; after touching all: {} resident, {:.1} MiB, {} evictions, {} loads",
            lat[lat.len() * 99 / 100],
            st.resident,
            st.bytes_resident as f64 / (1 << 20) as f64,
            st.evictions,
            st.loads
        );
        // 3: mixed batch over 16 store adapters vs one adapter.
        let x = Matrix::from_f32(DType::BF16, 64, k, &rng.fill_uniform(64 * k, -1.0, 1.0)).unwrap();
        let w = Matrix::from_f32(DType::BF16, n, k, &rng.fill_uniform(n * k, -0.02, 0.02)).unwrap();
        let mut y = Matrix::zeros(DType::F32, 64, n).unwrap();
        let mut held: Vec<*mut rf_adapter> = Vec::new();
        for i in 0..16 {
            let mut ad = null_mut();
            ok(rf_store_acquire(
                store,
                cs(&format!("a{}", i * (count / 16).max(1) % count)).as_ptr(),
                &mut ad,
            ));
            held.push(ad);
        }
        let (mut t16, mut t1) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            let t = Instant::now();
            linear(rt, &x, &w, &held, &mut y);
            t16.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            linear(rt, &x, &w, &held[..1], &mut y);
            t1.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (m16, m1) = (median(t16), median(t1));
        println!("mixed batch 64 rows over 16 store adapters: {m16:.3} ms vs one adapter {m1:.3} ms (x{:.3})", m16 / m1);
        for ad in held {
            rf_store_release(ad);
        }
        // 4: throughput with and without a publisher.
        let x1 = Matrix::from_f32(DType::BF16, 1, k, &rng.fill_uniform(k, -1.0, 1.0)).unwrap();
        let paths: Vec<CString> = (0..2)
            .map(|i| cs(dir.path().join(format!("a{i}")).to_str().unwrap()))
            .collect();
        // publish: 0 = none, 1 = rf_store_publish_peft (the callers load each new version once),
        // 2 = rf_store_publish of an adapter the publisher thread loads itself.
        // Returns calls/s, versions published, and the CPU time per call (µs) of the whole
        // process (callers, the runtime's pool and the publisher): CPU time does not count time
        // spent descheduled, so it holds on a busy shared machine where calls/s does not.
        let run = |publish: u32| -> (f64, u64, f64) {
            let proc0 = cpu_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
            let stop = std::sync::atomic::AtomicBool::new(false);
            let calls = std::sync::atomic::AtomicU64::new(0);
            let (rt_u, st_u) = (rt as usize, store as usize);
            let mut pubs = 0u64;
            std::thread::scope(|sc| {
                for _ in 0..callers {
                    let (stop, calls, x1, w) = (&stop, &calls, &x1, &w);
                    sc.spawn(move || {
                        let mut y = Matrix::zeros(DType::F32, 1, n).unwrap();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let mut ad = null_mut();
                            ok(rf_store_acquire(
                                st_u as *const rf_store,
                                cs("live").as_ptr(),
                                &mut ad,
                            ));
                            linear(rt_u as *mut rf_runtime, x1, w, &[ad], &mut y);
                            rf_store_release(ad);
                            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    });
                }
                let t = Instant::now();
                while t.elapsed().as_secs_f64() < secs {
                    let p = &paths[(pubs % 2) as usize];
                    if publish == 1 {
                        ok(rf_store_publish_peft(
                            st_u as *const rf_store,
                            cs("live").as_ptr(),
                            p.as_ptr(),
                            null_mut(),
                        ));
                        pubs += 1;
                    } else if publish == 2 {
                        let mut ad = null_mut();
                        ok(rankfuse::ffi::adapter::rf_adapter_load_peft(
                            rt_u as *mut rf_runtime,
                            p.as_ptr(),
                            &mut ad,
                        ));
                        ok(rf_store_publish(
                            st_u as *const rf_store,
                            cs("live").as_ptr(),
                            ad,
                            null_mut(),
                        ));
                        pubs += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let c = calls.into_inner().max(1) as f64;
            let proc = cpu_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - proc0;
            (c / secs, pubs, proc as f64 / 1e3 / c)
        };
        ok(rf_store_register(
            store,
            cs("live").as_ptr(),
            paths[0].as_ptr(),
        ));
        // Quiet and busy runs alternate, `rounds` times: on a shared machine the load drifts, so
        // each busy run is compared with the mean of the quiet runs either side of it.
        let first = run(0);
        let (mut quiet, mut quiet_cpu) = (vec![first.0], vec![first.2]);
        let (mut mem, mut peft, mut mem_cpu, mut peft_cpu) = (vec![], vec![], vec![], vec![]);
        let mut pubs = (0u64, 0u64);
        for _ in 0..rounds {
            let b = run(2);
            let c = run(1);
            let z = run(0);
            pubs.0 += b.1;
            pubs.1 += c.1;
            quiet.push(z.0);
            quiet_cpu.push(z.2);
            let l = quiet.len();
            let q = 0.5 * (quiet[l - 2] + quiet[l - 1]);
            let qc = 0.5 * (quiet_cpu[l - 2] + quiet_cpu[l - 1]);
            mem.push(b.0 / q);
            peft.push(c.0 / q);
            mem_cpu.push(b.2 / qc);
            peft_cpu.push(c.2 / qc);
        }
        println!(
            "rf_linear m=1 {k} -> {n} bf16, {callers} caller thread(s), pool threads {pool_threads} (0 = all), {rounds} rounds of {secs} s: {:.0} calls/s without a publisher \
             (median of {quiet:.0?}), {:.0} CPU-µs per call (process)",
            median(quiet.clone()),
            median(quiet_cpu.clone())
        );
        println!(
            "  publishing a version every ms from memory ({} versions): throughput x{:.3} (rounds {mem:.3?}), \
             CPU per call x{:.3} (rounds {mem_cpu:.3?})",
            pubs.0,
            median(mem.clone()),
            median(mem_cpu.clone())
        );
        println!(
            "  from a folder, callers load each version ({} versions): throughput x{:.3} (rounds {peft:.3?}), \
             CPU per call x{:.3} (rounds {peft_cpu:.3?})",
            pubs.1,
            median(peft.clone()),
            median(peft_cpu.clone())
        );
        rf_store_free(store);
        rf_runtime_free(rt);
    }
}
