// Fused base + adapter linear on a block-quantized W (Q8_0, Q4_0, Q4_K, Q6_K; quant_block.cuh):
//   y = x W^T + bias + T B_cat^T      (T from lora_shrink, f32; zero off-slot)
// W is dequantized exactly (bit-identical to src/quant.rs) in registers and accumulated in f32;
// no dequantized copy of W is ever stored. Specialized on W's type (`<op>_q8_0|q4_0|q4_k|q6_k`);
// x, bias, B and y dtypes are runtime arguments (f32, f16, bf16). cols, ld of W are multiples of
// the block (so k is too), and W is 2-byte (Q8_0, Q4_0, Q6_K) or 4-byte (Q4_K) aligned: launch
// checks.
//
// quant_decode_* (m = 1..8): a GEMV streaming each row of W once. Warp w of a block owns output
// columns (blockIdx.x * 8 + w) * 2 + {0, 1}, walked together; its 32 lanes walk 8 groups of 32
// weights per step
// (lane = group (lane / 4) of the step, piece lane % 4), so one step reads 256 consecutive
// weights' blocks (a Q4_K / Q6_K super-block, 8 Q8_0 / Q4_0 blocks). K is split across grid.y when the
// columns alone give too few blocks (k_chunk elements per split, a multiple of 256); inside a
// split x is staged through shared memory as f32 in chunks of quant_stage(m) elements.
// With one split the same CTA finishes the outputs: the adapter expand (T_i B_s^T, lane-strided
// over the rank of row i's slot), the warp reduction, bias, y. With several splits each writes
// f32 partial sums and decode_epilogue_<y> (decode.cu) adds splits, bias and expand.
// Geometry (src/backend/cuda/quant.rs `decode_plan`): block 256, grid (ceil(n / 16), splits),
// dynamic shared memory m * min(k_chunk, quant_stage(m)) * 4 <= 32 KiB.
//
// quant_linear_* (m > 8): 64 x 64 FMA tiles as fused_linear.cu, K in steps of one group (32):
// each step dequantizes a 64-row x 32 W tile into shared memory (thread t: row t / 4, piece t % 4)
// next to the x tile; after the K-loop the same CTA runs the expand for the slots present in its
// rows (32 rank components per pass). Geometry (`tile_geometry`): block 256 = 16 x 16 threads,
// each 4 x 4 outputs strided by 16; grid (ceil(n / 64), ceil(m / 64)); 2 x 32 x 65 f32 static
// shared memory.
#include "quant_block.cuh"

#define QD_WARPS 8
#define QD_COLS_PER_WARP 2
#define QD_MAX_M 8
// f32 elements of x staged per block (32 KiB), shared by the m rows in whole 256-element units.
#define QD_STAGE_FLOATS 8192

__device__ __forceinline__ int quant_stage(int m) { return QD_STAGE_FLOATS / m / 256 * 256; }

__device__ __forceinline__ float dot4(const float *w, const float4 x) {
  return w[0] * x.x + w[1] * x.y + w[2] * x.z + w[3] * x.w;
}

template <typename QT>
__device__ __forceinline__ void quant_decode(const LinearParams &p) {
  RF_DYNAMIC_SHARED(float4, dyn_smem);
  float *xs = (float *)dyn_smem;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.y;
  const int ks = split * p.k_chunk;
  const int ke = min(p.k, ks + p.k_chunk);
  const int stage = min(p.k_chunk, quant_stage(p.m));
  const u8 *w = (const u8 *)p.w;
  const i64 row_bytes = quant_row_bytes<QT>(p.ldw);
  const int sub = lane >> 2, li = lane & 3;
  const int o0 = QT::o0(li), o1 = QT::o1(li);
  const int j0 = (blockIdx.x * QD_WARPS + warp) * QD_COLS_PER_WARP;

  float acc[QD_COLS_PER_WARP][QD_MAX_M];
#pragma unroll
  for (int q = 0; q < QD_COLS_PER_WARP; ++q)
#pragma unroll
    for (int mi = 0; mi < QD_MAX_M; ++mi) acc[q][mi] = 0.f;

#pragma unroll 1
  for (int s0 = ks; s0 < ke; s0 += stage) {
    const int len = min(stage, ke - s0);  // a multiple of 32: k is whole blocks
    if (s0 != ks) __syncthreads();        // the previous chunk is no longer read
    for (int idx = tid; idx < p.m * len; idx += blockDim.x) {
      const int mi = idx / len, kk = idx - mi * len;
      xs[mi * stage + kk] = load_as_f32(p.x, (i64)mi * p.ldx + s0 + kk, p.x_dtype);
    }
    __syncthreads();
    const int g0 = s0 >> 5, ngroups = len >> 5;
    if (j0 < p.n) {  // uniform over the warp
      // Both columns in one loop: twice the W loads in flight, one x read for both. A second
      // column past n re-reads the first (always valid) and is never stored.
      const u8 *wr[QD_COLS_PER_WARP];
#pragma unroll
      for (int q = 0; q < QD_COLS_PER_WARP; ++q) wr[q] = w + (i64)min(j0 + q, p.n - 1) * row_bytes;
      // Unrolled so each lane keeps several blocks' loads in flight (memory-bound).
#pragma unroll 2
      for (int gg = sub; gg < ngroups; gg += 8) {
        QPiece pc[QD_COLS_PER_WARP];
#pragma unroll
        for (int q = 0; q < QD_COLS_PER_WARP; ++q) QT::piece(wr[q], g0 + gg, li, pc[q]);
        const float *xg = xs + gg * 32;
#pragma unroll
        for (int mi = 0; mi < QD_MAX_M; ++mi) {
          if (mi < p.m) {
            const float4 xa = *(const float4 *)(xg + mi * stage + o0);
            const float4 xb = *(const float4 *)(xg + mi * stage + o1);
#pragma unroll
            for (int q = 0; q < QD_COLS_PER_WARP; ++q) acc[q][mi] += dot4(pc[q].w, xa) + dot4(pc[q].w + 4, xb);
          }
        }
      }
    }
  }

#pragma unroll
  for (int q = 0; q < QD_COLS_PER_WARP; ++q) {
    const int j = j0 + q;
    if (j >= p.n) continue;
#pragma unroll
    for (int mi = 0; mi < QD_MAX_M; ++mi) {
      if (mi >= p.m) continue;
      if (p.splits == 1) {
        // Expand in the same CTA: row mi's slot (every slot when stacked), rank over the lanes.
        const int only = p.row_slot ? p.row_slot[mi] : -2;
        for (int s = 0; s < p.n_slots; ++s) {
          if (only != -2 && only != s) continue;
          const SlotParams &sp = p.slots[s];
          const float *tr = p.t + (i64)mi * p.ldt + sp.off;
          for (int c = lane; c < sp.rank; c += 32)
            acc[q][mi] += tr[c] * load_as_f32(sp.b, (i64)j * sp.ldb + c, sp.b_dtype);
        }
      }
      const float v = warp_sum(acc[q][mi]);
      if (lane == 0) {
        if (p.splits == 1) {
          const float out = p.bias ? v + load_as_f32(p.bias, j, p.bias_dtype) : v;
          store_from_f32(p.y, (i64)mi * p.ldy + j, p.y_dtype, out);
        } else {
          p.partial[((i64)split * p.m + mi) * p.n + j] = v;
        }
      }
    }
  }
}

#define QL_BM 64
#define QL_BN 64
#define QL_BK 32

template <typename QT>
__device__ __forceinline__ void quant_linear_tile(const LinearParams &p) {
  __shared__ float sx[QL_BK][QL_BM + 1];
  __shared__ float sw[QL_BK][QL_BN + 1];
  __shared__ u32 slot_word;
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int m0 = blockIdx.y * QL_BM, n0 = blockIdx.x * QL_BN;
  // This thread's piece of the W tile: row wrow of the tile, piece li of the K step's group.
  const int wrow = tid >> 2, li = tid & 3;
  const int o0 = QT::o0(li), o1 = QT::o1(li);
  const bool w_in = n0 + wrow < p.n;
  const u8 *wr = (const u8 *)p.w + (w_in ? (i64)(n0 + wrow) * quant_row_bytes<QT>(p.ldw) : 0);
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < p.k; k0 += QL_BK) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int idx = tid + 256 * e;
      const int r = idx >> 5, kk = idx & 31;
      const int gm = m0 + r;
      sx[kk][r] = gm < p.m ? load_as_f32(p.x, (i64)gm * p.ldx + k0 + kk, p.x_dtype) : 0.f;
    }
    QPiece pc;
    if (w_in) {
      QT::piece(wr, k0 >> 5, li, pc);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) pc.w[e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sw[o0 + e][wrow] = pc.w[e];
      sw[o1 + e][wrow] = pc.w[4 + e];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < QL_BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sx[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sw[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

  // Expand: the adapter columns of the same tile, slot by slot, 32 rank components per pass.
  const u32 mask = tile_slot_mask(p, m0, QL_BM, &slot_word);
  for (int s = 0; s < p.n_slots; ++s) {
    if (!(mask & (1u << s))) continue;
    const SlotParams &sp = p.slots[s];
    for (int c0 = 0; c0 < sp.rank; c0 += QL_BK) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int idx = tid + 256 * e;
        const int r = idx >> 5, kk = idx & 31;
        const int c = c0 + kk;
        const int gm = m0 + r, gn = n0 + r;
        sx[kk][r] = (gm < p.m && c < sp.rank) ? p.t[(i64)gm * p.ldt + sp.off + c] : 0.f;
        sw[kk][r] = (gn < p.n && c < sp.rank) ? load_as_f32(sp.b, (i64)gn * sp.ldb + c, sp.b_dtype) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < QL_BK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = sx[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = sw[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int gm = m0 + ty + 16 * i;
    if (gm >= p.m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gn = n0 + tx + 16 * j;
      if (gn >= p.n) continue;
      float v = acc[i][j];
      if (p.bias) v += load_as_f32(p.bias, gn, p.bias_dtype);
      store_from_f32(p.y, (i64)gm * p.ldy + gn, p.y_dtype, v);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256, 2) quant_decode_q8_0(const LinearParams p) { quant_decode<QTagQ8_0>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) quant_decode_q4_0(const LinearParams p) { quant_decode<QTagQ4_0>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) quant_decode_q4_k(const LinearParams p) { quant_decode<QTagQ4_K>(p); }
extern "C" __global__ void __launch_bounds__(256) quant_linear_q8_0(const LinearParams p) { quant_linear_tile<QTagQ8_0>(p); }
extern "C" __global__ void __launch_bounds__(256) quant_linear_q4_0(const LinearParams p) { quant_linear_tile<QTagQ4_0>(p); }
extern "C" __global__ void __launch_bounds__(256) quant_linear_q4_k(const LinearParams p) { quant_linear_tile<QTagQ4_K>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) quant_decode_q6_k(const LinearParams p) { quant_decode<QTagQ6_K>(p); }
extern "C" __global__ void __launch_bounds__(256) quant_linear_q6_k(const LinearParams p) { quant_linear_tile<QTagQ6_K>(p); }
