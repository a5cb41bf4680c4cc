//! The decode path (m <= `DECODE_MAX_M`): memory-bound, so W is streamed once in its own dtype
//! and converted in registers by the ISA's `gemv`, n split across threads.

use super::*;
/// k-block length for the decode kernels: x rows (m of them) stay in L1 across W rows.
fn decode_kc(m: usize) -> usize {
    ((65536 / (4 * m.max(1))) / 64 * 64).max(256)
}

/// `out (+)= x W^T` for m <= DECODE_MAX_M rows, blocked over k so x stays in L1.
///
/// # Safety
/// As `MicroKernel::gemv` with c0 = 0 and k = w.cols.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_blocked<K: MicroKernel>(
    x: *const f32,
    ldx: usize,
    m: usize,
    w: &MatRef<'_>,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let k = w.cols;
    if k == 0 {
        if !acc {
            for i in 0..m {
                for j in 0..w.rows {
                    *out.add(i * ldo + j) = 0.0;
                }
            }
        }
        return;
    }
    if w.dtype.is_quantized() {
        // Whole rows: blocks (up to 256 elements) must not be cut by k blocks, and the quant
        // kernels keep the m x rows in L1/L2 themselves (one W row at a time).
        return K::gemv_quant(x, ldx, m, w, out, ldo, acc);
    }
    let kcd = decode_kc(m);
    let mut kb = 0;
    while kb < k {
        let kc = kcd.min(k - kb);
        K::gemv(x.add(kb), ldx, m, w, kb, kc, out, ldo, acc || kb > 0);
        kb += kc;
    }
}

/// `out = x W^T` for panels `jp0..jp0 + npan` of a packed W (out: m rows of npan * NR at ldo),
/// blocked over k so x stays in L1 while the panels stream.
///
/// # Safety
/// x is m x pw.cols() at ldx; the panels exist; out as described.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_packed<K: MicroKernel>(
    x: *const f32,
    ldx: usize,
    m: usize,
    pw: &PackedW,
    jp0: usize,
    npan: usize,
    out: *mut f32,
    ldo: usize,
) {
    let (k, nr, layout) = (pw.cols(), K::NR, pw.layout());
    if k == 0 {
        for i in 0..m {
            std::slice::from_raw_parts_mut(out.add(i * ldo), npan * nr).fill(0.0);
        }
        return;
    }
    let direct = K::gemv_reads_panel(layout);
    // One row streams every panel once (no k blocks: the kernels keep several panels in
    // flight as separate sequential streams). More rows: 16 KiB blocks of each panel, which the
    // kernels' row passes reread from L1/L2; even, so every block starts on a k pair.
    let kcd = if m == 1 {
        k
    } else {
        ((16384 / (nr * layout.size())) & !1).max(64)
    };
    let pstride = pw.panel_bytes();
    let mut kb = 0;
    while kb < k {
        let kc = kcd.min(k - kb);
        let b = pw.panel(jp0, kb);
        if direct {
            K::gemv_panels(
                x.add(kb),
                ldx,
                m,
                b,
                pstride,
                npan,
                layout,
                kc,
                out,
                ldo,
                kb > 0,
            );
        } else {
            for p in 0..npan {
                let (bp, op) = (b.add(p * pstride), out.add(p * nr));
                gemv_panel_generic(x.add(kb), ldx, m, bp, layout, kc, nr, op, ldo, kb > 0);
            }
        }
        kb += kc;
    }
}

/// Decode path (m <= DECODE_MAX_M).
pub(super) fn decode<K: MicroKernel>(
    p: &LinearProblem<'_>,
    packed: Option<&PackedW>,
    y: &mut MatMut<'_>,
    ws: &mut CallWs,
    act: ActQuant,
) {
    let (m, n, k) = (p.m(), p.n(), p.k());
    let CallWs {
        xpack, t, toff, xq, ..
    } = ws;
    let xf = grow(xpack, m * k.max(1));
    for i in 0..m {
        p.x.row_f32(i, 0, &mut xf[i * k..(i + 1) * k]);
    }
    let xf: &[f32] = xf;
    // Q8 activations: x is quantized once per call, before the n split.
    // (Panel packs hold dense dtypes; a quantized pack is Q4_0 / Q8_0 interleaved.)
    let q8 = act == ActQuant::Q8 && p.w.dtype.is_quantized() && k > 0;
    if q8 {
        xq.quantize(xf, m, k, k);
    }
    let xq: &crate::quant::Q8Rows = xq;
    // Shrink: T (m x rsum, dense per slot), rows that do not use a slot are zero there.
    toff.clear();
    let mut rsum = 0;
    for (s, sl) in p.slots.iter().enumerate() {
        toff.push(rsum);
        if let Some(sl) = sl {
            if (0..m).any(|i| p.applies(s, i)) {
                rsum += sl.rank();
            }
        }
    }
    let tv = grow(t, m * rsum.max(1));
    for (s, sl) in p.slots.iter().enumerate() {
        let Some(sl) = sl else { continue };
        if !(0..m).any(|i| p.applies(s, i)) {
            continue;
        }
        let (o, r) = (toff[s], sl.rank());
        // SAFETY: x is m x k at ld k; A is r x k; T has m rows of rsum at columns o..o+r.
        unsafe {
            gemv_blocked::<K>(
                xf.as_ptr(),
                k,
                m,
                &sl.a,
                tv.as_mut_ptr().add(o),
                rsum,
                false,
            )
        };
        for i in 0..m {
            let applies = p.applies(s, i);
            for c in 0..r {
                let v = &mut tv[i * rsum + o + c];
                *v = if applies {
                    sl.scale * sl.gains.map_or(1.0, |g| g.get(0, c)) * *v
                } else {
                    0.0
                };
            }
        }
    }
    let tv: &[f32] = tv;
    let toff: &[usize] = toff;
    // A slot is used when some row applies it; its T columns are then the next block.
    let slot_used =
        |s: usize| -> bool { slot_at(p, s).is_some() && (0..m).any(|i| p.applies(s, i)) };
    let threads = rayon::current_num_threads().max(1);
    let mut cols = n.div_ceil(threads * 8).clamp(16, 512);
    // A quantized pack (8-row records) is read whole groups at a time; panel packs by panels.
    let qpack = packed.filter(|pw| !pw.layout().is_panels());
    let packed = packed.filter(|pw| pw.layout().is_panels());
    if let Some(pw) = qpack {
        cols = cols.next_multiple_of(super::super::quant_pack::GROUP);
        debug_assert!(pw.cols() == k);
    } else if packed.is_some() {
        // Chunks of whole panels.
        cols = cols.next_multiple_of(K::NR);
    }
    let chunks = n.div_ceil(cols);
    let yv = SharedPtr(y.as_mut_ptr());
    let (yld, ydt) = (y.ld, y.dtype);
    (0..chunks).into_par_iter().for_each(|c| {
        let (j0, j1) = (c * cols, ((c + 1) * cols).min(n));
        let nt = j1 - j0;
        WS.with(|tw| {
            let tw = &mut *tw.borrow_mut();
            // out: m rows at ld `ldo` (whole panels when W is packed).
            let ldo = match packed {
                Some(_) => nt.next_multiple_of(K::NR),
                None => nt,
            };
            let out = grow(&mut tw.ctile, m * ldo);
            match packed {
                // SAFETY: x is m x k; chunk columns j0.. are whole panels of the pack (j0 is a
                // multiple of NR); out is m x ldo.
                Some(pw) => unsafe {
                    gemv_packed::<K>(
                        xf.as_ptr(),
                        k,
                        m,
                        pw,
                        j0 / K::NR,
                        ldo / K::NR,
                        out.as_mut_ptr(),
                        ldo,
                    )
                },
                None if qpack.is_some() => {
                    let pw = qpack.expect("quant pack");
                    let xq = if q8 { Some(xq) } else { None };
                    // SAFETY: j0 is a multiple of 8 (cols is); rows j0..j1 are in the pack; x
                    // (or xq) holds m rows of k; out is m x nt at ld nt.
                    unsafe {
                        K::gemv_qpack(&super::super::quant_pack::QPackGemv {
                            base: pw.data_ptr(),
                            dt: pw.dtype(),
                            nb: k / crate::quant::QK,
                            j0,
                            rows: nt,
                            x: (xf.as_ptr(), k),
                            xq,
                            m,
                            out: out.as_mut_ptr(),
                            ldo,
                        })
                    };
                }
                None => {
                    let wv = p.w.row_range(j0, nt);
                    if q8 {
                        // SAFETY: xq holds m rows of k = wv.cols; out is m x nt at ld nt.
                        unsafe { K::gemv_quant_q8(xq, m, &wv, out.as_mut_ptr(), ldo, false) };
                    } else {
                        // SAFETY: x is m x k; out is m x nt at ld nt.
                        unsafe {
                            gemv_blocked::<K>(xf.as_ptr(), k, m, &wv, out.as_mut_ptr(), ldo, false)
                        };
                    }
                }
            }
            for (s, sl) in p.slots.iter().enumerate() {
                let Some(sl) = sl else { continue };
                if !slot_used(s) {
                    continue;
                }
                let bv = sl.b.row_range(j0, nt);
                // SAFETY: T columns toff[s].. hold r values per row at ld rsum; B rows j0..j1.
                unsafe {
                    gemv_blocked::<K>(
                        tv.as_ptr().add(toff[s]),
                        rsum,
                        m,
                        &bv,
                        out.as_mut_ptr(),
                        ldo,
                        true,
                    )
                };
            }
            if let Some(bm) = p.bias {
                let bv = grow(&mut tw.bias, nt);
                bm.row_f32(0, j0, bv);
                for i in 0..m {
                    for (o, b) in out[i * ldo..i * ldo + nt].iter_mut().zip(bv.iter()) {
                        *o += b;
                    }
                }
            }
            for i in 0..m {
                // SAFETY: chunks write disjoint columns of y; (i, j0..j1) is inside y.
                unsafe {
                    K::store_row(
                        &out[i * ldo..i * ldo + nt],
                        yv.get().add((i * yld + j0) * ydt.size()),
                        ydt,
                    )
                };
            }
        })
    });
}
