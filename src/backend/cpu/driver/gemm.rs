//! The GEMM path (m > `DECODE_MAX_M`): x packed once per call, the shrink on the same
//! micro-kernel, then W column blocks shared out to threads with the expand and epilogue in the
//! same accumulator tile (see the module docs of `driver`).

use super::*;
/// One chunk of walk-order rows `m0..m1` on the GEMM path.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_chunk<K: MicroKernel>(
    p: &LinearProblem<'_>,
    packed: Option<&PackedW>,
    y: &mut MatMut<'_>,
    ws: &mut CallWs,
    m0: usize,
    m1: usize,
    mut native: Option<&mut (dyn NativeGemm + '_)>,
) {
    let (n, k) = (p.n(), p.k());
    let (mr, nr) = (K::MR, K::NR);
    let bl = blocking();
    // Even, so every KC block of a bf16 pair pack starts on a pair.
    let kcb = bl.kc.max(8).next_multiple_of(2);
    let mt = m1 - m0;
    let mpan = mt.div_ceil(mr);
    let mtp = mpan * mr;
    let mcp = (bl.mc / mr).max(1); // row panels per MC group
    let nkb = k.div_ceil(kcb);
    let CallWs {
        xpack,
        t,
        tpack,
        perm,
        ranges,
        cranges,
        toff,
        tpoff,
        shrink_tasks,
        ..
    } = ws;
    let perm = &perm[m0..m1];
    let native_rows = match native.as_deref_mut() {
        Some(nat) => nat.prepare(&p.x, perm),
        None => 0,
    };
    let native: Option<&dyn NativeGemm> = native.map(|n| &*n);

    // 1. Pack x: block b starts at b * mtp * kcb; panel ip of block b at + ip * kcb_b * mr.
    let xp = SharedPtr(grow(xpack, mtp * kcb * nkb).as_mut_ptr());
    (0..mpan).into_par_iter().for_each(|ip| {
        WS.with(|tw| {
            let tw = &mut *tw.borrow_mut();
            let row = grow(&mut tw.row, k);
            for i in 0..mr {
                let wi = ip * mr + i;
                if wi < mt {
                    p.x.row_f32(perm[wi], 0, row);
                } else {
                    row.fill(0.0);
                }
                for b in 0..nkb {
                    let kc = kcb.min(k - b * kcb);
                    let base = b * mtp * kcb + ip * kc * mr;
                    for q in 0..kc {
                        // SAFETY: panel ip owns elements [base, base + kc*mr) of block b.
                        unsafe { *xp.get().add(base + q * mr + i) = row[b * kcb + q] };
                    }
                }
            }
        })
    });
    let xpack: &[f32] = &xpack[..mtp * kcb * nkb];
    let xpanel = |b: usize, ip: usize| -> *const f32 {
        let kc = kcb.min(k - b * kcb);
        xpack[b * mtp * kcb + ip * kc * mr..].as_ptr()
    };

    // 2. Shrink into T (mtp x rpad), then packed T panels per slot.
    cranges.clear();
    toff.clear();
    tpoff.clear();
    let (mut rpad, mut tplen) = (0, 0);
    for (s, &(lo, hi)) in ranges.iter().enumerate() {
        let (lo, hi) = (lo.clamp(m0, m1) - m0, hi.clamp(m0, m1) - m0);
        let r = slot_at(p, s).map_or(0, |sl| sl.rank());
        let used = hi > lo && r > 0;
        cranges.push(if used { (lo, hi) } else { (0, 0) });
        toff.push(rpad);
        tpoff.push(tplen);
        if used {
            rpad += r.div_ceil(nr) * nr;
            tplen += (hi.div_ceil(mr) - lo / mr) * r * mr;
        }
    }
    let cranges: &[(usize, usize)] = cranges;
    let (toff, tpoff): (&[usize], &[usize]) = (toff, tpoff);
    if rpad > 0 {
        let tp = SharedPtr(grow(t, mtp * rpad).as_mut_ptr());
        let tpk = SharedPtr(grow(tpack, tplen).as_mut_ptr());
        // One task per (MC group, slot, NR-wide panel of the slot's rank): each packs only its
        // own rows of A, so a single adapter's shrink spreads over threads (rank/NR tasks) and a
        // mixed batch's over its slots, without packing any of A twice within a group.
        let groups = mpan.div_ceil(mcp);
        let tasks = shrink_tasks;
        tasks.clear();
        for g in 0..groups {
            let (g0, g1) = (g * mcp, ((g + 1) * mcp).min(mpan));
            for (s, &(lo, hi)) in cranges.iter().enumerate() {
                if hi <= lo {
                    continue;
                }
                let (a0, a1) = (g0.max(lo / mr), g1.min(hi.div_ceil(mr)));
                if a0 >= a1 {
                    continue;
                }
                let r = slot_at(p, s).map_or(0, |sl| sl.rank());
                tasks.extend((0..r.div_ceil(nr)).map(|jp| (s, a0, a1, jp)));
            }
        }
        tasks.par_iter().for_each(|&(s, a0, a1, jp)| {
            WS.with(|tw| {
                let tw = &mut *tw.borrow_mut();
                let (lo, hi) = cranges[s];
                let slot = slot_at(p, s).expect("used slot");
                let r = slot.rank();
                let ps0 = lo / mr;
                let (c0, c1) = (jp * nr, (jp * nr + nr).min(r));
                let bpack = grow(&mut tw.bpack, nr * kcb);
                for b in 0..nkb {
                    let kc = kcb.min(k - b * kcb);
                    // SAFETY: rows c0..c1 and columns b*kcb..+kc lie inside A; bpack holds
                    // nr*kcb floats.
                    unsafe { K::pack_b(&slot.a, c0, c1 - c0, b * kcb, kc, bpack.as_mut_ptr()) };
                    for ip in a0..a1 {
                        // SAFETY: this task owns T rows of panels a0..a1 in the columns
                        // toff[s] + c0 .. + nr (inside rpad: ranks are padded to NR).
                        unsafe {
                            K::micro(
                                kc,
                                xpanel(b, ip),
                                bpack.as_ptr(),
                                tp.get().add(ip * mr * rpad + toff[s] + c0),
                                rpad,
                                b > 0,
                            )
                        };
                    }
                }
                if nkb == 0 {
                    for row in a0 * mr..a1 * mr {
                        for c in c0..c1 {
                            // SAFETY: as above.
                            unsafe { *tp.get().add(row * rpad + toff[s] + c) = 0.0 };
                        }
                    }
                }
                // Pack T_s panels a0..a1, columns c0..c1, with scale * gains, zero outside the
                // slot's rows.
                for ip in a0..a1 {
                    let base = tpoff[s] + (ip - ps0) * r * mr;
                    for c in c0..c1 {
                        let g = slot.scale * slot.gains.map_or(1.0, |gm| gm.get(0, c));
                        for i in 0..mr {
                            let row = ip * mr + i;
                            // SAFETY: this task owns these packed elements; T row in range.
                            unsafe {
                                let v = if row >= lo && row < hi {
                                    g * *tp.get().add(row * rpad + toff[s] + c)
                                } else {
                                    0.0
                                };
                                *tpk.get().add(base + c * mr + i) = v;
                            }
                        }
                    }
                }
            })
        });
    }
    let tpack: &[f32] = &tpack[..tplen];

    // 3. Base GEMM + expand + epilogue over column blocks.
    let nc_max = (bl.nc / nr).max(1) * nr;
    let nc_tile = ((TILE_BYTES / 4 / mtp.max(1)) / nr).max(1) * nr;
    let threads = rayon::current_num_threads().max(1);
    // At least 2 blocks per thread so work stealing can balance a busy machine.
    let nc_bal = (n.div_ceil(threads * 2)).div_ceil(nr) * nr;
    let nc = nc_max.min(nc_tile).min(nc_bal.max(nr));
    let nblocks = n.div_ceil(nc);
    let maxr = cranges
        .iter()
        .enumerate()
        .filter(|(_, &(lo, hi))| hi > lo)
        .map(|(s, _)| slot_at(p, s).map_or(0, |sl| sl.rank()))
        .max()
        .unwrap_or(0);
    let yv = SharedPtr(y.as_mut_ptr());
    let (yld, ydt) = (y.ld, y.dtype);
    (0..nblocks).into_par_iter().for_each(|jb| {
        let (j0, j1) = (jb * nc, ((jb + 1) * nc).min(n));
        let nt = j1 - j0;
        let npan = nt.div_ceil(nr);
        let ntp = npan * nr;
        WS.with(|tw| {
            let tw = &mut *tw.borrow_mut();
            let ThreadWs {
                bpack, ctile, bias, ..
            } = tw;
            let bpack = grow(bpack, ntp * kcb.max(maxr));
            let ctile = grow(ctile, mtp.max(native_rows) * ntp);
            let cptr = ctile.as_mut_ptr();
            if let Some(nat) = native {
                // SAFETY: ctile holds native_rows x ntp floats; W rows j0..j1 exist.
                unsafe { nat.block(&p.w, packed, j0, nt, ntp, cptr, ntp) };
            }
            // Packed W read in place (the kernel converts in registers), or converted to f32
            // once per block, or (unpacked W) packed per call as before.
            let direct = packed.filter(|pw| K::reads_panel(pw.layout()));
            for b in (0..nkb).filter(|_| native.is_none()) {
                let kc = kcb.min(k - b * kcb);
                if direct.is_none() {
                    for jp in 0..npan {
                        let rows = nr.min(nt - jp * nr);
                        let dst = bpack.as_mut_ptr().wrapping_add(jp * nr * kc);
                        // SAFETY: W rows j0.., columns b*kcb.. lie inside W (or its pack, whose
                        // panel j0/nr + jp exists as j0 is a multiple of nr); bpack holds ntp*kc.
                        unsafe {
                            match packed {
                                Some(pw) => pw.panel_to_f32(j0 / nr + jp, b * kcb, kc, dst),
                                None => K::pack_b(&p.w, j0 + jp * nr, rows, b * kcb, kc, dst),
                            }
                        };
                    }
                }
                let mut ic = 0;
                while ic < mpan {
                    let ie = (ic + mcp).min(mpan);
                    for jp in 0..npan {
                        for ip in ic..ie {
                            let c = cptr.wrapping_add(ip * mr * ntp + jp * nr);
                            // SAFETY: panels hold kc*mr / kc*nr elements; ctile is mtp x ntp.
                            unsafe {
                                match direct {
                                    Some(pw) => K::micro_panel(
                                        kc,
                                        xpanel(b, ip),
                                        pw.panel(j0 / nr + jp, b * kcb),
                                        pw.layout(),
                                        c,
                                        ntp,
                                        b > 0,
                                    ),
                                    None => K::micro(
                                        kc,
                                        xpanel(b, ip),
                                        bpack[jp * nr * kc..].as_ptr(),
                                        c,
                                        ntp,
                                        b > 0,
                                    ),
                                }
                            };
                        }
                    }
                    ic = ie;
                }
            }
            if nkb == 0 && native.is_none() {
                ctile.fill(0.0);
            }
            // Expand: r_s more K-steps per slot, only over that slot's row panels.
            for (s, &(lo, hi)) in cranges.iter().enumerate() {
                if hi <= lo {
                    continue;
                }
                let slot = slot_at(p, s).expect("used slot");
                let r = slot.rank();
                for jp in 0..npan {
                    let rows = nr.min(nt - jp * nr);
                    // SAFETY: B rows j0.., columns 0..r lie inside B; bpack holds ntp*r.
                    unsafe {
                        K::pack_b(
                            &slot.b,
                            j0 + jp * nr,
                            rows,
                            0,
                            r,
                            bpack.as_mut_ptr().add(jp * nr * r),
                        )
                    };
                }
                let (ps0, ps1) = (lo / mr, hi.div_ceil(mr));
                for jp in 0..npan {
                    let bp = bpack[jp * nr * r..].as_ptr();
                    for ip in ps0..ps1 {
                        let ap = tpack[tpoff[s] + (ip - ps0) * r * mr..].as_ptr();
                        // SAFETY: the T panel holds r*mr floats, the B panel r*nr.
                        unsafe {
                            K::micro(r, ap, bp, cptr.add(ip * mr * ntp + jp * nr), ntp, true)
                        };
                    }
                }
            }
            // Epilogue: bias, convert, one write of y per element.
            let bias: Option<&[f32]> = match p.bias {
                Some(bm) => {
                    let bv = grow(bias, nt);
                    bm.row_f32(0, j0, bv);
                    Some(bv)
                }
                None => None,
            };
            for (wi, &src) in perm.iter().enumerate() {
                let crow = &mut ctile[wi * ntp..wi * ntp + nt];
                if let Some(bv) = bias {
                    for (o, b) in crow.iter_mut().zip(bv) {
                        *o += b;
                    }
                }
                // SAFETY: blocks write disjoint column ranges of y; (src, j0..j1) is inside y.
                unsafe { K::store_row(crow, yv.get().add((src * yld + j0) * ydt.size()), ydt) };
            }
        })
    });
}
