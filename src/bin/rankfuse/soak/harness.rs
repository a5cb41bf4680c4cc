//! The soak harness behind `rankfuse soak` and tests/soak.rs: adapters swapped under load,
//! through the C ABI only. `callers` threads acquire one stored adapter name, run rf_linear (a
//! mixed batch: rows on the stored adapter, on a private one, on the base) and release, while
//!  - a publisher publishes a new version of the name every `publish_us`, cycling through four
//!    versions (three fixture adapters, then the rank-64 one truncated to rank 16 with
//!    rf_lora_set_rank: a rank change), from a folder or from an adapter loaded in memory, and
//!    pins / trims (the budget is 1 byte: every unheld folder version is evicted at once);
//!  - a retirer creates short-lived stores, acquires from them, publishes over what it holds,
//!    frees the store while its adapters are held and still computes with them, and frees
//!    acquisitions with rf_adapter_free (a release), and loads, uses and evicts a second name
//!    every round - all while the callers run.
//!
//! Generation g of the name is version g % 4, so every call checks its output, bit for bit,
//! against the serial result of the version it reports (rf_adapter_version), and that the
//! generations it sees never go back. At the end: the last publish is what the next acquisition
//! gets and the store counted every publish (none lost), every acquisition was released, the
//! counters add up, and every adapter created was freed (the process-wide count of live
//! adapters is back where it started; so nothing else in the process may make adapters
//! meanwhile). Fails on the first mismatch.

use rankfuse::ffi::adapter::*;
use rankfuse::ffi::error::*;
use rankfuse::ffi::handles::*;
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::store::*;
use rankfuse::ffi::types::*;
use rankfuse::ffi::weights::*;
use rankfuse::{Error, Result};
use std::collections::BTreeSet;
use std::ffi::{c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to run.
pub struct Config {
    /// The peft-tiny fixture folder (base.safetensors + adapters/lora-r8, rslora-pattern,
    /// lora-r64).
    pub fixture: PathBuf,
    /// Caller threads.
    pub callers: usize,
    pub seconds: f64,
    /// Microseconds between publishes.
    pub publish_us: u64,
    /// The runtime's pool threads (0 = all cores).
    pub runtime_threads: usize,
}

/// What happened.
#[derive(Debug)]
pub struct Report {
    pub calls: u64,
    /// Versions published under the soaked name (its last generation).
    pub publishes: u64,
    /// Distinct generations the callers computed with.
    pub generations_seen: u64,
    /// Retirer rounds (each: a store freed with two versions held, two deferred frees, an
    /// eviction).
    pub retire_rounds: u64,
    pub stats: rf_store_stats,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} calls, {} versions published ({} of them seen by callers), {} retire rounds; \
             every output equal to its version's serial result; no publish lost, every adapter \
             freed; store: {} hits, {} loads, {} evictions",
            self.calls,
            self.publishes,
            self.generations_seen,
            self.retire_rounds,
            self.stats.hits,
            self.stats.loads,
            self.stats.evictions
        )
    }
}

/// The versions published in turn: (fixture adapter, rank of MODULE; 0 keeps its own).
const VERSIONS: [(&str, u32); 4] = [
    ("lora-r8", 0),
    ("rslora-pattern", 0),
    ("lora-r64", 0),
    ("lora-r64", 16),
];
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

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Raw handles shared by the threads (the C ABI allows these calls from many threads).
#[derive(Clone, Copy)]
struct Handles {
    rt: usize,
    base: usize,
    private: usize,
    store: usize,
}

impl Handles {
    fn rt(self) -> *mut rf_runtime {
        self.rt as *mut rf_runtime
    }
    fn store(self) -> *const rf_store {
        self.store as *const rf_store
    }
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
        h.rt(),
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

/// Version `v` as a private adapter (the caller frees or publishes it).
unsafe fn load(
    rt: *mut rf_runtime,
    fixture: &std::path::Path,
    v: usize,
) -> Result<*mut rf_adapter> {
    let (dir, rank) = VERSIONS[v];
    let path = cs(fixture.join("adapters").join(dir).to_str().unwrap_or(""));
    let mut ad = null_mut();
    check(rf_adapter_load_peft(rt, path.as_ptr(), &mut ad))?;
    if rank > 0 {
        let mut l = null_mut();
        let r = check(rf_adapter_module(ad, cs(MODULE).as_ptr(), &mut l))
            .and_then(|_| check(rf_lora_set_rank(l, rank)));
        if let Err(e) = r {
            rf_adapter_free(ad);
            return Err(e);
        }
    }
    Ok(ad)
}

/// Publishes version `v` under `name`: from its folder when `from_folder` and the version is a
/// folder as it is, else from an adapter loaded (and truncated) in memory. Returns the
/// generation.
unsafe fn publish(
    h: Handles,
    store: *const rf_store,
    fixture: &std::path::Path,
    name: &str,
    v: usize,
    from_folder: bool,
) -> Result<u64> {
    let (dir, rank) = VERSIONS[v];
    let name = cs(name);
    let mut got = 0u64;
    if from_folder && rank == 0 {
        let path = cs(fixture.join("adapters").join(dir).to_str().unwrap_or(""));
        check(rf_store_publish_peft(
            store,
            name.as_ptr(),
            path.as_ptr(),
            &mut got,
        ))?;
    } else {
        let ad = load(h.rt(), fixture, v)?;
        if let Err(e) = check(rf_store_publish(store, name.as_ptr(), ad, &mut got)) {
            rf_adapter_free(ad);
            return Err(e);
        }
    }
    Ok(got)
}

/// The version (generation) of an acquired adapter, checking its id stays `id`.
unsafe fn generation(ad: *const rf_adapter, id: &mut Option<u64>) -> Result<u64> {
    let (mut i, mut g) = (0u64, 0u64);
    check(rf_adapter_version(ad, &mut i, &mut g))?;
    if *id.get_or_insert(i) != i || i == 0 {
        return Err(Error::internal(format!(
            "soak: the id of a name changed ({id:?} then {i})"
        )));
    }
    Ok(g)
}

/// One retirer round with short-lived store `k`: publish, acquire, publish over it, free the
/// store while two versions are held, compute with both, free both acquisitions (one by
/// rf_adapter_free, which releases). Also acquires and frees one version of the soaked name,
/// and loads, uses and evicts a second name.
unsafe fn retire_round(
    h: Handles,
    fixture: &std::path::Path,
    want: &[Vec<f32>],
    k: usize,
) -> Result<()> {
    let mut ts = null_mut();
    check(rf_store_create(h.rt(), 1, &mut ts))?;
    let (v0, v1) = (k % 4, (k + 1) % 4);
    let (mut a0, mut a1) = (null_mut(), null_mut());
    let r = (|| {
        publish(h, ts, fixture, "t", v0, k.is_multiple_of(2))?;
        check(rf_store_acquire(ts, cs("t").as_ptr(), &mut a0))?;
        publish(h, ts, fixture, "t", v1, k % 2 == 1)?;
        check(rf_store_acquire(ts, cs("t").as_ptr(), &mut a1))?;
        Ok::<_, Error>(())
    })();
    rf_store_free(ts);
    let r = r.and_then(|_| {
        let mut id = None;
        for (ad, v, g) in [(a0, v0, 0), (a1, v1, 1)] {
            if generation(ad, &mut id)? != g || !bits_equal(&apply(h, ad)?, &want[v]) {
                return Err(Error::internal(format!(
                    "soak: retirer round {k}: generation {g} held across rf_store_free is not version {v}"
                )));
            }
        }
        Ok(())
    });
    rf_adapter_free(a0);
    rf_store_release(a1);
    r?;
    let mut live = null_mut();
    check(rf_store_acquire(h.store(), cs("live").as_ptr(), &mut live))?;
    rf_adapter_free(live);
    // Eviction under load: "side" (version 2's folder) is loaded, used, released and, unheld
    // under the 1-byte budget, evicted by this trim (or by a load elsewhere) every round.
    let mut side = null_mut();
    check(rf_store_acquire(h.store(), cs("side").as_ptr(), &mut side))?;
    let r = apply(h, side);
    rf_store_release(side);
    if !bits_equal(&r?, &want[2]) {
        return Err(Error::internal(format!(
            "soak: retirer round {k}: the reloaded side adapter differs"
        )));
    }
    check(rf_store_trim(h.store(), null_mut()))
}

pub fn run(c: &Config) -> Result<Report> {
    let live0 = live_adapters();
    // SAFETY: every handle is created here, shared only while the scoped threads run, and freed
    // after they have joined.
    let report = unsafe { soak(c)? };
    let live = live_adapters();
    if live != live0 {
        return Err(Error::internal(format!(
            "soak: {} adapters were never freed ({live0} alive before, {live} after)",
            live as i64 - live0 as i64
        )));
    }
    Ok(report)
}

unsafe fn soak(c: &Config) -> Result<Report> {
    let fx = c.fixture.as_path();
    let opts = rf_runtime_options {
        struct_size: std::mem::size_of::<rf_runtime_options>() as u32,
        device: rf_device::RF_DEVICE_CPU,
        device_index: 0,
        num_threads: c.runtime_threads as u32,
        cuda_stream: null_mut(),
        act_quant: rf_act_quant::RF_ACT_QUANT_EXACT,
    };
    let mut rt = null_mut();
    check(rf_runtime_create(&opts, &mut rt))?;
    let mut base = null_mut();
    let bp = cs(fx.join("base.safetensors").to_str().unwrap_or(""));
    let mut private = null_mut();
    let mut store = null_mut();
    let r = check(rf_weights_open(rt, bp.as_ptr(), &mut base))
        .and_then(|_| load(rt, fx, 1).map(|p| private = p))
        .and_then(|_| check(rf_store_create(rt, 1, &mut store)));
    let h = Handles {
        rt: rt as usize,
        base: base as usize,
        private: private as usize,
        store: store as usize,
    };
    let r = r.and_then(|_| soak_with(c, h));
    rf_store_free(store);
    rf_adapter_free(private);
    rf_weights_free(base);
    rf_runtime_free(rt);
    r
}

unsafe fn soak_with(c: &Config, h: Handles) -> Result<Report> {
    let fx = c.fixture.as_path();
    let mut want = Vec::new();
    for v in 0..VERSIONS.len() {
        let ad = load(h.rt(), fx, v)?;
        let y = apply(h, ad);
        rf_adapter_free(ad);
        want.push(y?);
    }
    let first = cs(fx
        .join("adapters")
        .join(VERSIONS[0].0)
        .to_str()
        .unwrap_or(""));
    check(rf_store_register(
        h.store(),
        cs("live").as_ptr(),
        first.as_ptr(),
    ))?;
    let side = cs(fx
        .join("adapters")
        .join(VERSIONS[2].0)
        .to_str()
        .unwrap_or(""));
    check(rf_store_register(
        h.store(),
        cs("side").as_ptr(),
        side.as_ptr(),
    ))?;
    let deadline = Instant::now() + Duration::from_secs_f64(c.seconds);
    let calls = AtomicU64::new(0);
    let seen: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let failed = || failure.lock().map_or(true, |f| f.is_some());
    let fail = |e: Error| {
        if let Ok(mut f) = failure.lock() {
            f.get_or_insert(e);
        }
    };
    let running = || Instant::now() < deadline && !failed();
    let (publishes, retire_rounds) = std::thread::scope(|sc| {
        for t in 0..c.callers {
            let (want, calls, seen, running, fail) = (&want, &calls, &seen, &running, &fail);
            sc.spawn(move || {
                let (mut last, mut id, mut mine) = (0u64, None, BTreeSet::new());
                let mut one = || -> Result<()> {
                    let mut ad = null_mut();
                    check(rf_store_acquire(h.store(), cs("live").as_ptr(), &mut ad))?;
                    let r = generation(ad, &mut id).and_then(|g| Ok((g, apply(h, ad)?)));
                    rf_store_release(ad);
                    let (g, y) = r?;
                    if g < last {
                        return Err(Error::internal(format!(
                            "soak: caller {t} saw generation {g} after generation {last}"
                        )));
                    }
                    last = g;
                    mine.insert(g);
                    let v = (g % VERSIONS.len() as u64) as usize;
                    if !bits_equal(&y, &want[v]) {
                        return Err(Error::internal(format!(
                            "soak: caller {t}: generation {g} is not version {v} ({:?}) bit for bit",
                            VERSIONS[v]
                        )));
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                };
                while running() {
                    if let Err(e) = one() {
                        fail(e);
                    }
                }
                if let Ok(mut s) = seen.lock() {
                    s.extend(mine);
                }
            });
        }
        let retirer = sc.spawn(|| {
            let mut k = 0usize;
            while running() {
                match retire_round(h, fx, &want, k) {
                    Ok(()) => k += 1,
                    Err(e) => fail(e),
                }
            }
            k as u64
        });
        let mut g = 0u64;
        while running() {
            let n = g + 1;
            let v = (n % VERSIONS.len() as u64) as usize;
            let from_folder = (n / VERSIONS.len() as u64).is_multiple_of(2);
            let r = publish(h, h.store(), fx, "live", v, from_folder).and_then(|got| {
                check(rf_store_pin(
                    h.store(),
                    cs("live").as_ptr(),
                    got.is_multiple_of(5),
                ))?;
                check(rf_store_trim(h.store(), null_mut()))?;
                Ok(got)
            });
            match r {
                Ok(got) if got == n => g = got,
                Ok(got) => fail(Error::internal(format!(
                    "soak: publish {n} got generation {got}"
                ))),
                Err(e) => fail(e),
            }
            std::thread::sleep(Duration::from_micros(c.publish_us));
        }
        (g, retirer.join().unwrap_or(0))
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    let mut st = rf_store_stats::default();
    check(rf_store_stats_get(h.store(), &mut st))?;
    let n = calls.into_inner();
    let seen = seen.into_inner().unwrap_or_default();
    if st.publishes != publishes
        || st.in_use != 0
        || st.hits + st.loads != n + 2 * retire_rounds
        || st.evictions < retire_rounds
        || seen.last().is_some_and(|&g| g > publishes)
    {
        return Err(Error::internal(format!(
            "soak: counters do not add up after {n} calls, {retire_rounds} retire rounds and \
             {publishes} publishes (latest generation seen {:?}): {st:?}",
            seen.last()
        )));
    }
    // No publish lost: the next acquisition gets the last one, whole.
    let mut ad = null_mut();
    check(rf_store_acquire(h.store(), cs("live").as_ptr(), &mut ad))?;
    let r = generation(ad, &mut None).and_then(|g| Ok((g, apply(h, ad)?)));
    rf_store_release(ad);
    let (g, y) = r?;
    let v = (publishes % VERSIONS.len() as u64) as usize;
    if g != publishes || !bits_equal(&y, &want[v]) {
        return Err(Error::internal(format!(
            "soak: after {publishes} publishes the next acquisition got generation {g}"
        )));
    }
    Ok(Report {
        calls: n,
        publishes,
        generations_seen: seen.len() as u64,
        retire_rounds,
        stats: st,
    })
}
