//! `rf_linear` through the C ABI with random descriptors: shapes (negative, zero, mismatched),
//! dtypes (including numbers that are not an rf_dtype), ld (< cols, padded, overflowing),
//! NULL data, unaligned data, y overlapping x, slots with random LoRA shapes/dtypes/ranks/scale
//! multipliers, and row_slot entries in and out of range, on every kernel variant this CPU runs.
//!
//! Every buffer is allocated with exactly the bytes its own descriptor spans, so the kernels can
//! only read or write out of bounds (AddressSanitizer aborts) if validation accepted descriptors
//! that disagree with each other. Also checked: a descriptor that is invalid on its own is always
//! refused; errors are never INTERNAL (a caught panic) and have messages; y is untouched on error
//! and its ld padding is never written.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rankfuse::adapter::{Lora, Scaling, TensorData};
use rankfuse::ffi::error::{rf_error_code, rf_error_free, rf_error_message};
use rankfuse::ffi::handles::{lora_ptr, rf_runtime};
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::runtime::rf_runtime_create;
use rankfuse::ffi::types::{rf_dtype, rf_lora_slot, rf_matrix, rf_status};
use rankfuse::{DType, Matrix};
use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

#[derive(Arbitrary, Debug)]
struct MatSpec {
    dtype: u8,
    rows: u8,
    cols: u8,
    ld: u8,
    flags: u8,
}

#[derive(Arbitrary, Debug)]
struct LoraSpec {
    dtype_a: u8,
    dtype_b: u8,
    rank: u8,
    k_off: u8,
    n_off: u8,
    alpha: u8,
}

#[derive(Arbitrary, Debug)]
struct SlotSpec {
    lora: u8,
    rank: u8,
    scale: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    isa: u8,
    m: u8,
    n: u8,
    k: u8,
    x: MatSpec,
    w: MatSpec,
    bias: Option<MatSpec>,
    y: MatSpec,
    loras: Vec<LoraSpec>,
    slots: Vec<SlotSpec>,
    slots_null: u8,
    row_slot: Option<Vec<i8>>,
    seed: u64,
}

/// Runtimes (as addresses) for every kernel variant this CPU runs, made once.
fn runtimes() -> &'static [usize] {
    static RTS: OnceLock<Vec<usize>> = OnceLock::new();
    RTS.get_or_init(|| {
        let mut v = Vec::new();
        use rankfuse::ffi::types::rf_act_quant::{RF_ACT_QUANT_EXACT, RF_ACT_QUANT_Q8};
        // Every variant, exact and with Q8 activations (integer dots on quantized W).
        let variants = ["reference", "portable", "avx2", "avx512"]
            .into_iter()
            .flat_map(|isa| [(isa, RF_ACT_QUANT_EXACT), (isa, RF_ACT_QUANT_Q8)]);
        for (isa, act_quant) in variants {
            std::env::set_var("RANKFUSE_ISA", isa);
            let opts = rankfuse::ffi::types::rf_runtime_options {
                struct_size: std::mem::size_of::<rankfuse::ffi::types::rf_runtime_options>() as u32,
                device: rankfuse::ffi::types::rf_device::RF_DEVICE_CPU,
                device_index: 0,
                num_threads: 2,
                cuda_stream: std::ptr::null_mut(),
                act_quant,
            };
            let mut rt: *mut rf_runtime = std::ptr::null_mut();
            // SAFETY: valid options and out-pointer.
            let e = unsafe { rf_runtime_create(&opts, &mut rt) };
            if e.is_null() {
                v.push(rt as usize);
            } else {
                // SAFETY: e is an error object we own.
                unsafe { rf_error_free(e) };
            }
        }
        std::env::remove_var("RANKFUSE_ISA");
        assert!(!v.is_empty());
        v
    })
}

fn dim(canon: i64, b: u8) -> i64 {
    match b {
        0..=223 => canon,
        224..=239 => (b - 224) as i64,
        240..=247 => canon + (b - 239) as i64,
        248..=251 => -((b - 247) as i64),
        _ => 1 << 40,
    }
}

fn dtype_raw(b: u8) -> i32 {
    match b % 16 {
        0..=4 => 0,
        5..=9 => 1,
        10..=14 => 2,
        // Numbers that are not an rf_dtype (3..5 are the block-quantized types, valid as w).
        _ => [99, -1, 1 << 30, i32::MIN][(b / 16 % 4) as usize],
    }
}

struct Buf {
    mem: Vec<u8>,
    desc: rf_matrix,
    /// The descriptor is invalid on its own (negative, ld < cols, bad dtype, overflow, NULL).
    invalid: bool,
    /// Byte offset of data inside `mem`.
    off: usize,
    span: usize,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
}

fn make(spec: &MatSpec, rows: i64, cols: i64, rng: &mut Rng, fill: Option<u8>) -> Buf {
    let rows = dim(rows, spec.rows);
    let cols = dim(cols, spec.cols);
    let ld = match spec.ld {
        0..=199 => cols + (spec.ld % 4) as i64,
        200..=239 => cols - 1 - (spec.ld % 3) as i64,
        240..=247 => i64::MAX,
        _ => i64::MAX / 3,
    };
    let raw_dtype = dtype_raw(spec.dtype);
    let dt = DType::from_raw(raw_dtype as i64);
    let span = (|| {
        let dt = dt?;
        if rows < 0 || cols < 0 || ld < cols {
            return None;
        }
        let e = rankfuse::matrix::span_elems(rows as usize, cols as usize, ld as usize)?;
        e.checked_mul(dt.size())
            .filter(|&b| b <= isize::MAX as usize)
    })();
    let null = spec.flags % 32 == 31;
    let unaligned = spec.flags & 64 != 0;
    let (invalid, bytes) = match span {
        // Small enough to allocate: a real buffer of exactly the span.
        Some(b) if b <= 1 << 20 => (null && b > 0, b),
        // Describable but too large to back with memory: the harness cannot call with it.
        Some(_) => (false, usize::MAX),
        None => (true, 16),
    };
    let off = unaligned as usize;
    let alloc = if bytes == usize::MAX { 0 } else { bytes + off };
    let mut mem = vec![0u8; alloc];
    match fill {
        Some(v) => mem.iter_mut().for_each(|b| *b = v),
        None => mem.iter_mut().for_each(|b| *b = rng.next() as u8),
    }
    let data = if null {
        std::ptr::null_mut()
    } else {
        // SAFETY: off <= alloc (off is 0 or 1 and alloc >= off).
        unsafe { mem.as_mut_ptr().add(off.min(alloc)) as *mut c_void }
    };
    // rf_dtype is read by value (raw i32) by the library; build it through a raw write so an
    // invalid number is passed exactly as C would.
    let mut desc = rf_matrix {
        data,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows,
        cols,
        ld,
    };
    // SAFETY: rf_dtype is a 4-byte C enum; writing an i32 to its field is what C does.
    unsafe { (std::ptr::addr_of_mut!(desc.dtype) as *mut i32).write(raw_dtype) };
    Buf {
        mem,
        desc,
        invalid,
        off,
        span: if bytes == usize::MAX {
            usize::MAX
        } else {
            bytes
        },
    }
}

fn lora_dtype(b: u8) -> DType {
    DType::ALL[(b % 3) as usize]
}

fuzz_target!(|inp: Input| {
    let rts = runtimes();
    let rt = if inp.isa == 255 {
        std::ptr::null_mut()
    } else {
        rts[inp.isa as usize % rts.len()] as *mut rf_runtime
    };
    let (m, n, k) = (
        (inp.m % 10) as i64,
        (inp.n % 10) as i64,
        (inp.k % 10) as i64,
    );
    let mut rng = Rng(inp.seed);
    let x = make(&inp.x, m, k, &mut rng, None);
    let w = make(&inp.w, n, k, &mut rng, None);
    let bias = inp.bias.as_ref().map(|b| make(b, 1, n, &mut rng, None));
    let mut y = make(&inp.y, m, n, &mut rng, Some(0xA5));
    let all = [Some(&x), Some(&w), bias.as_ref(), Some(&y)];
    if all
        .iter()
        .flatten()
        .any(|b| b.span == usize::MAX && !b.invalid)
    {
        return; // a valid descriptor of memory we cannot provide
    }
    let any_invalid = all.iter().flatten().any(|b| b.invalid);
    // The scalar reference kernel (runtime 0) walks every row even when y has no columns: a
    // valid 2^40 x 0 output takes hours there (reported; the optimized kernels return at once).
    let reference = inp.isa != 255 && (inp.isa as usize).is_multiple_of(rts.len());
    if reference && x.desc.rows > 1 << 16 {
        return;
    }
    // y overlapping x (the library must refuse it rather than write over an input).
    // Only where x really has bytes: a y pointing at a 0-byte x is not an overlap, just a lie
    // about y's memory.
    let y_over_x = inp.y.flags & 128 != 0 && x.span > 0 && x.span != usize::MAX && !x.invalid;
    if y_over_x {
        y.desc.data = x.desc.data;
    }

    // LoRA modules, owned here; slots point at them.
    let mut loras: Vec<Box<Lora>> = Vec::new();
    for (i, ls) in inp.loras.iter().take(3).enumerate() {
        let r = (ls.rank % 5) as usize;
        let kk = (k.max(0) as usize + [0, 0, 0, 1][(ls.k_off % 4) as usize]).min(16);
        let nn = (n.max(0) as usize + [0, 0, 0, 2][(ls.n_off % 4) as usize]).min(16);
        let mut a = Matrix::zeros(lora_dtype(ls.dtype_a), r, kk).unwrap();
        let mut b = Matrix::zeros(lora_dtype(ls.dtype_b), nn, r).unwrap();
        a.bytes_mut().iter_mut().for_each(|v| *v = rng.next() as u8);
        b.bytes_mut().iter_mut().for_each(|v| *v = rng.next() as u8);
        let scaling = [Scaling::Lora, Scaling::RsLora, Scaling::Fixed][(ls.alpha % 3) as usize];
        if let Ok(l) = Lora::new(
            &format!("m{i}"),
            TensorData::Owned(a),
            TensorData::Owned(b),
            ls.alpha as f32,
            scaling,
            ls.alpha as f32 / 7.0,
        ) {
            loras.push(Box::new(l));
        }
    }
    let slots: Vec<rf_lora_slot> = inp
        .slots
        .iter()
        .take(4)
        .map(|s| rf_lora_slot {
            lora: if (s.lora as usize) < loras.len() {
                lora_ptr(&loras[s.lora as usize])
            } else {
                std::ptr::null()
            },
            rank: (s.rank % 7) as u32,
            scale_mult: [1.0, 0.5, -2.0, 0.0, f32::NAN, f32::INFINITY, 1e30, 1.0]
                [(s.scale % 8) as usize],
        })
        .collect();
    let slots_null = inp.slots_null == 255 && !slots.is_empty();
    // (An empty x may claim 2^40 rows; a row_slot that long cannot be provided: pass none.)
    let rows_for_rs = if x.invalid || x.desc.rows > 1 << 16 {
        0
    } else {
        x.desc.rows.max(0) as usize
    };
    let row_slot: Option<Vec<i32>> = inp
        .row_slot
        .as_ref()
        .filter(|_| x.desc.rows <= 1 << 16)
        .map(|v| {
            (0..rows_for_rs)
                .map(|i| v.get(i).map_or(-1, |&s| s as i32 % 6))
                .collect()
        });
    if row_slot.is_some() && x.invalid {
        // rf_linear reads x.rows entries of row_slot only after x is accepted; a 0-row x with
        // row_slot is fine, so nothing to do here.
    }

    let y_before = y.mem.clone();
    // SAFETY: every descriptor's memory is live and sized to its span; row_slot has x.rows
    // entries; slots point at live loras.
    let e = unsafe {
        rf_linear(
            rt,
            &x.desc,
            &w.desc,
            bias.as_ref().map_or(std::ptr::null(), |b| &b.desc),
            if slots_null {
                std::ptr::null()
            } else {
                slots.as_ptr()
            },
            slots.len(),
            row_slot.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
            &mut y.desc,
        )
    };
    let must_fail = rt.is_null() || any_invalid || slots_null;
    if e.is_null() {
        assert!(!must_fail, "rf_linear accepted an invalid call: {inp:?}");
        assert!(
            !y_over_x || y.span == 0 || x.span == 0,
            "y overlapping x was accepted"
        );
        // Padding between rows of y (ld > cols) is never written.
        let (rows, cols, ld) = (
            y.desc.rows as usize,
            y.desc.cols as usize,
            y.desc.ld as usize,
        );
        // (An empty y, rows or cols 0, may have any ld: there is no padding to check.)
        let padded_rows = if y.span == 0 { 0 } else { rows - 1 };
        let es = if y.span == 0 {
            0
        } else {
            y.span / (padded_rows * ld + cols)
        };
        for i in 0..padded_rows {
            for j in cols..ld {
                for b in 0..es {
                    let at = y.off + (i * ld + j) * es + b;
                    assert_eq!(y.mem[at], 0xA5, "y padding written at row {i} col {j}");
                }
            }
        }
    } else {
        // SAFETY: e is an error object we own; freed once.
        let (st, msg) = unsafe {
            let st = rf_error_code(e);
            let msg = CStr::from_ptr(rf_error_message(e))
                .to_string_lossy()
                .into_owned();
            rf_error_free(e);
            (st, msg)
        };
        assert_ne!(st, rf_status::RF_STATUS_INTERNAL, "internal error: {msg}");
        assert_ne!(st, rf_status::RF_STATUS_OK);
        assert!(!msg.is_empty());
        assert!(y.mem == y_before, "y written by a failing call: {msg}");
    }
    drop(loras);
});
