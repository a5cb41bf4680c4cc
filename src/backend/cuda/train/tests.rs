//! Launch-planning tests of the training kernels (no GPU needed).

use super::*;
use crate::train::AdamW;
use std::mem::offset_of;

#[test]
fn params_layout_matches_the_cu_files() {
    assert_eq!(offset_of!(BackwardParams, ldx), 112);
    assert_eq!(offset_of!(BackwardParams, m), 176);
    assert_eq!(offset_of!(BackwardParams, dx_dtype), 212);
    assert_eq!(offset_of!(BackwardParams, scale), 236);
    let src = include_str!("../../../../kernels/lora_backward.cu");
    assert!(src.contains("sizeof(BackwardParams) == 240"));
    assert_eq!(offset_of!(AdamwParams, ld), 72);
    assert_eq!(offset_of!(AdamwParams, rows), 88);
    assert_eq!(offset_of!(AdamwParams, lr), 104);
    assert_eq!(offset_of!(AdamwParams, clip), 124);
    let src = include_str!("../../../../kernels/adamw.cu");
    assert!(src.contains("sizeof(AdamwParams) == 128"));
}

const SHAPES: [usize; 14] = [1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 129, 1000, 4097, 11008];

fn covers(grid: u32, per: usize, n: usize) -> bool {
    grid as usize * per >= n && (grid as usize - 1) * per < n
}

/// Chunks of a split cover [0, k) exactly, none empty, each a multiple of 16 long.
fn split_covers(s: KSplit, k: usize) -> bool {
    if !s.chunk.is_multiple_of(TILE_K) || s.splits == 0 {
        return false;
    }
    if k == 0 {
        return s.splits == 1;
    }
    (s.splits - 1) * s.chunk < k && s.splits * s.chunk >= k
}

#[test]
fn k_splits_cover_the_reduction() {
    for tiles in [1usize, 2, 7, 64, 1000] {
        for k in [
            0usize,
            1,
            15,
            16,
            17,
            255,
            256,
            257,
            4096,
            4097,
            11008,
            1 << 20,
        ] {
            for sms in [1usize, 8, 16, 132] {
                let s = k_split(tiles, k, sms, GRID_YZ_MAX);
                assert!(split_covers(s, k), "{tiles} tiles, k {k}, {sms} SMs: {s:?}");
                if s.splits > 1 {
                    assert!(s.chunk >= MIN_SPLIT_K, "{s:?}");
                }
                assert!(s.splits * tiles <= (2 * sms).max(tiles) * 2 || s.splits == 1);
            }
        }
    }
    assert_eq!(k_split(1, 100_000, 1000, 3).splits, 3);
}

#[test]
fn backward_grids_cover_every_output() {
    for m in SHAPES {
        for r in [1usize, 2, 3, 8, 16, 31, 64, 65, 128] {
            for (k, n) in [
                (1usize, 1usize),
                (17, 33),
                (4096, 4096),
                (4097, 11008),
                (0, 5),
            ] {
                let (g, s) = ug_geometry(m, r, k, n, 132).unwrap();
                assert!(covers(g.grid.0, TILE, r) && covers(g.grid.1, TILE, m));
                assert_eq!(g.grid.2 as usize, 2 * s.splits);
                for (len, chunk) in [(k, s.chunk_k), (n, s.chunk_n)] {
                    assert_eq!(chunk % TILE_K, 0);
                    assert!(s.splits * chunk >= len, "{len} {s:?}");
                }
                assert_eq!(g.block, (256, 1, 1));
                let g = tp_geometry(m, r).unwrap();
                assert!(covers(g.grid.0, ROW_BLOCK, r));
                assert_eq!(g.grid.1 as usize, m.min(GRID_YZ_MAX));
                assert_eq!(de_geometry(r).unwrap().grid, (r as u32, 1, 1));
                if n > 0 {
                    let (g, s) = db_geometry(n, r, m, 132).unwrap();
                    assert!(covers(g.grid.0, TILE, r) && covers(g.grid.1, TILE, n));
                    assert!(split_covers(s, m) && g.grid.2 as usize == s.splits);
                }
                if k > 0 {
                    let (g, s) = da_geometry(r, k, m, 132).unwrap();
                    assert!(covers(g.grid.0, TILE, k) && covers(g.grid.1, TILE, r));
                    assert!(split_covers(s, m) && g.grid.2 as usize == s.splits);
                    let g = dx_geometry(m, k).unwrap();
                    assert!(covers(g.grid.0, TILE, k) && covers(g.grid.1, TILE, m));
                }
            }
        }
    }
}

#[test]
fn preconditions_are_errors_with_messages() {
    let e = dx_geometry(0, 5).unwrap_err();
    assert!(e.message.contains("empty output"), "{}", e.message);
    let e = tile_grid(64 * 65536, 5, 1, "t").unwrap_err();
    assert!(e.message.contains("grid dimension"), "{}", e.message);
    let e = ug_geometry(1 << 31, 4, 4, 4, 1).unwrap_err();
    assert!(e.message.contains("m = 2147483648"), "{}", e.message);
    let e = adamw_geometry(4, 1 << 31).unwrap_err();
    assert!(e.message.contains("cols"), "{}", e.message);
    assert!(de_geometry(0).is_err());
    assert!(backward_scratch(usize::MAX / 2, 3).is_err());
}

#[test]
fn adamw_grid_covers_columns_and_strides_rows() {
    for rows in SHAPES.iter().copied().chain([65535, 65536, 1 << 24]) {
        for cols in [1usize, 3, 255, 256, 257, 4096, 65536] {
            let g = adamw_geometry(rows, cols).unwrap();
            assert!(covers(g.grid.0, ROW_BLOCK, cols));
            assert_eq!(g.grid.1 as usize, rows.min(GRID_YZ_MAX));
            assert_eq!(g.grid.2, 1);
        }
    }
}

#[test]
fn scratch_regions_are_aligned_and_disjoint() {
    for m in [1usize, 7, 512] {
        for r in [1usize, 3, 64] {
            let s = backward_scratch(m, r).unwrap();
            let regions = [
                (s.u, m * r * 4),
                (s.g, m * r * 4),
                (s.gains, r * 4),
                (s.grad, r),
                (s.active, r),
            ];
            let mut end = 0;
            for (off, len) in regions {
                assert_eq!(off % 256, 0);
                assert!(off >= end);
                end = off + len;
            }
            assert!(end <= s.total);
            // U and G are cleared together, up to (not into) the gains region.
            assert!(s.gains >= s.g + m * r * 4 && s.g >= s.u + m * r * 4);
        }
    }
}

#[test]
fn bias_corrections_match_the_cpu_formula() {
    let o = AdamW::default();
    for step in [1u32, 2, 10, 1000] {
        let (b1, b2) = bias_corrections(&o, step);
        assert_eq!(b1, 1.0 - o.beta1.powi(step as i32));
        assert_eq!(b2, (1.0 - o.beta2.powi(step as i32)).sqrt());
    }
}

#[test]
fn kernel_names_follow_the_convention() {
    for k in kernels_for_sm(70) {
        assert!(
            k.ends_with("_f32") || k.ends_with("_f16") || k.ends_with("_bf16"),
            "{k}"
        );
    }
    assert_eq!(ug_kernel(DType::BF16), "lora_backward_ug_bf16");
    assert_eq!(adamw_kernel(DType::F16), "adamw_f16");
}
