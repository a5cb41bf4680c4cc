// Fused base + adapter linear on tensor cores (sm_80+): mma.sync.m16n8k16, f16 or bf16 inputs,
// f32 accumulation.
//   y = x W^T + bias + T B_cat^T   (T from lora_shrink, f32, rounded to the input type here)
// The expand step runs inside the same CTA after the base K-loop: for each slot present in the
// tile's rows, its rank is walked in chunks of 32 through the same shared-memory tiles and the
// same mma loop, so the adapter costs r/k of the base work and no extra pass over y.
//
// Preconditions (checked by launch.rs `mma_eligible`): x and W have this kernel's dtype, their
// data pointers are 16-byte aligned and ldx, ldw are multiples of 8 (cp.async moves 16 bytes).
// k, m, n are arbitrary (zero-filled tails). B, bias and y may be any dtype.
//
// Geometry (launch.rs `mma_geometry`): CTA tile 128 x 128 x 32, block 256 = 8 warps as 2 (m) x 4
// (n), each warp 64 x 32; grid = (ceil(n / 128), ceil(m / 128)); two cp.async stages of
// 2 x 128 x 40 halves = 40960 bytes static shared memory (rows padded by 8 halves: ldmatrix reads
// are bank-conflict free).
//
// Only compiled for compute_80 and newer: the compute_70 PTX has no such entry, and the host uses
// fused_linear_<dtype> there.
#include "common.cuh"

#if __CUDA_ARCH__ >= 800

#define MM_BM 128
#define MM_BN 128
#define MM_BK 32
#define MM_LDS (MM_BK + 8)

__device__ __forceinline__ u32 smem_addr(const void *p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32 &r0, u32 &r1, u32 &r2, u32 &r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

template <int DT>
__device__ __forceinline__ void mma16816(float *c, const u32 *a, const u32 *b) {
  if (DT == RF_F16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// One BK = 32 slice of the warp's 64 x 32 output from the tiles in shared memory.
template <int DT>
__device__ __forceinline__ void mma_tile_step(const u16 *sa, const u16 *sb, int wm, int wn, int lane,
                                              float (&acc)[4][4][4]) {
#pragma unroll
  for (int kk = 0; kk < MM_BK; kk += 16) {
    u32 af[4][4], bf[4][2];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      const int r = wm * 64 + mi * 16 + (lane & 15);
      const int c = kk + (lane >> 4) * 8;
      ldmatrix_x4(smem_addr(sa + r * MM_LDS + c), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
    }
#pragma unroll
    for (int pr = 0; pr < 2; ++pr) {
      const int r = wn * 32 + pr * 16 + (lane & 7) + ((lane >> 4) << 3);
      const int c = kk + ((lane >> 3) & 1) * 8;
      ldmatrix_x4(smem_addr(sb + r * MM_LDS + c), bf[2 * pr][0], bf[2 * pr][1], bf[2 * pr + 1][0],
                  bf[2 * pr + 1][1]);
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) mma16816<DT>(acc[mi][nj], af[mi], bf[nj]);
  }
}

// Issues the cp.async copies of one BK slice of x (rows m0..) and W (rows n0..) into a stage.
__device__ __forceinline__ void mma_load_stage(const LinearParams &p, u16 *sa, u16 *sb, int m0, int n0, int k0,
                                               int tid) {
  const u16 *x = (const u16 *)p.x;
  const u16 *w = (const u16 *)p.w;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int c = tid + 256 * e;  // 512 chunks of 8 halves per operand
    const int r = c >> 2, ch = (c & 3) * 8;
    const int gk = k0 + ch;
    const int kleft = p.k - gk;
    const int kbytes = kleft >= 8 ? 16 : (kleft > 0 ? kleft * 2 : 0);
    const int gm = m0 + r, gn = n0 + r;
    const u16 *srcx = x + (i64)(gm < p.m ? gm : 0) * p.ldx + (kleft > 0 ? gk : 0);
    const u16 *srcw = w + (i64)(gn < p.n ? gn : 0) * p.ldw + (kleft > 0 ? gk : 0);
    cp_async16(smem_addr(sa + r * MM_LDS + ch), srcx, gm < p.m ? kbytes : 0);
    cp_async16(smem_addr(sb + r * MM_LDS + ch), srcw, gn < p.n ? kbytes : 0);
  }
}

template <int DT>
__device__ __forceinline__ void fused_linear_mma(const LinearParams &p) {
  __shared__ __align__(16) u16 sa[2][MM_BM * MM_LDS];
  __shared__ __align__(16) u16 sb[2][MM_BN * MM_LDS];
  __shared__ u32 slot_word;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int m0 = blockIdx.y * MM_BM, n0 = blockIdx.x * MM_BN;
  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  const int ktiles = (p.k + MM_BK - 1) / MM_BK;
  if (ktiles > 0) {
    mma_load_stage(p, sa[0], sb[0], m0, n0, 0, tid);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    if (kt + 1 < ktiles) {
      mma_load_stage(p, sa[(kt + 1) & 1], sb[(kt + 1) & 1], m0, n0, (kt + 1) * MM_BK, tid);
      cp_async_commit();
      cp_async_wait_one();
    } else {
      cp_async_wait_all();
    }
    __syncthreads();
    mma_tile_step<DT>(sa[kt & 1], sb[kt & 1], wm, wn, lane, acc);
    __syncthreads();
  }

  // Expand step, same tiles and mma loop: A-side = T rows (f32 -> DT), B-side = B_s rows.
  const u32 mask = tile_slot_mask(p, m0, MM_BM, &slot_word);
  for (int s = 0; s < p.n_slots; ++s) {
    if (!(mask & (1u << s))) continue;
    const SlotParams &sp = p.slots[s];
    for (int c0 = 0; c0 < sp.rank; c0 += MM_BK) {
#pragma unroll 4
      for (int e = 0; e < 16; ++e) {
        const int idx = tid + 256 * e;  // 128 rows x 32 columns
        const int r = idx >> 5, cc = idx & 31;
        const int c = c0 + cc;
        const int gm = m0 + r, gn = n0 + r;
        sa[0][r * MM_LDS + cc] =
            (gm < p.m && c < sp.rank) ? f32_to_16<DT>(p.t[(i64)gm * p.ldt + sp.off + c]) : (u16)0;
        sb[0][r * MM_LDS + cc] =
            (gn < p.n && c < sp.rank) ? load_as_16<DT>(sp.b, (i64)gn * sp.ldb + c, sp.b_dtype) : (u16)0;
      }
      __syncthreads();
      mma_tile_step<DT>(sa[0], sb[0], wm, wn, lane, acc);
      __syncthreads();
    }
  }

  // Epilogue: c0, c1 = (row g, cols 2t, 2t+1); c2, c3 = (row g + 8, same cols).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int nj = 0; nj < 4; ++nj) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int gm = m0 + wm * 64 + mi * 16 + g + (q >> 1) * 8;
        const int gn = n0 + wn * 32 + nj * 8 + 2 * t + (q & 1);
        if (gm < p.m && gn < p.n) {
          float v = acc[mi][nj][q];
          if (p.bias) v += load_as_f32(p.bias, gn, p.bias_dtype);
          store_from_f32(p.y, (i64)gm * p.ldy + gn, p.y_dtype, v);
        }
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) fused_linear_mma_f16(const LinearParams p) {
  fused_linear_mma<RF_F16>(p);
}
extern "C" __global__ void __launch_bounds__(256) fused_linear_mma_bf16(const LinearParams p) {
  fused_linear_mma<RF_BF16>(p);
}

#endif  // __CUDA_ARCH__ >= 800
