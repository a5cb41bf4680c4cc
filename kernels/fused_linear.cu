// Fused base + adapter linear with FMA tiles (every SM, every dtype, any alignment):
//   y = x W^T + bias + T B_cat^T
// where T (m x total_rank, f32) comes from lora_shrink and B_cat = [B_0 | B_1 | ...] over the
// active slots. After the K-loop over x W^T, the same CTA runs the expand step: one extra pass of
// the tile loop per 16 rank components of each slot present in the tile's rows (grouped by slot
// through a per-tile slot mask; slots absent from the tile cost nothing). T entries of rows a slot
// does not apply to are zero, so the expand never mixes adapters.
//
// Specialized on W's dtype (`fused_linear_<wdtype>`); x, bias, B and y dtypes are runtime
// arguments and converted on load / store. The f32 path of the library and the sm_70/72/75 path
// for f16/bf16 (no bf16 tensor cores there).
//
// Geometry (launch.rs `tile_geometry`): block 256 = 16 x 16 threads, each 4 x 4 outputs strided
// by 16; grid = (ceil(n / 64), ceil(m / 64)); 2 x 16 x 65 f32 of static shared memory.
#include "common.cuh"

#define FT_BM 64
#define FT_BN 64
#define FT_BK 16

template <typename WT>
__device__ __forceinline__ void fused_linear_tile(const LinearParams &p) {
  typedef typename WT::storage ws;
  __shared__ float sx[FT_BK][FT_BM + 1];
  __shared__ float sw[FT_BK][FT_BN + 1];
  __shared__ u32 slot_word;
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int m0 = blockIdx.y * FT_BM, n0 = blockIdx.x * FT_BN;
  const ws *w = (const ws *)p.w;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < p.k; k0 += FT_BK) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int idx = tid + 256 * e;
      const int r = idx >> 4, kk = idx & 15;
      const int gk = k0 + kk;
      const int gm = m0 + r, gn = n0 + r;
      sx[kk][r] = (gm < p.m && gk < p.k) ? load_as_f32(p.x, (i64)gm * p.ldx + gk, p.x_dtype) : 0.f;
      sw[kk][r] = (gn < p.n && gk < p.k) ? WT::to_f32(w[(i64)gn * p.ldw + gk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < FT_BK; ++kk) {
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

  // Expand: the adapter columns of the same tile, slot by slot, rank chunk by rank chunk.
  const u32 mask = tile_slot_mask(p, m0, FT_BM, &slot_word);
  for (int s = 0; s < p.n_slots; ++s) {
    if (!(mask & (1u << s))) continue;
    const SlotParams &sp = p.slots[s];
    for (int c0 = 0; c0 < sp.rank; c0 += FT_BK) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int idx = tid + 256 * e;
        const int r = idx >> 4, kk = idx & 15;
        const int c = c0 + kk;
        const int gm = m0 + r, gn = n0 + r;
        sx[kk][r] = (gm < p.m && c < sp.rank) ? p.t[(i64)gm * p.ldt + sp.off + c] : 0.f;
        sw[kk][r] = (gn < p.n && c < sp.rank) ? load_as_f32(sp.b, (i64)gn * sp.ldb + c, sp.b_dtype) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < FT_BK; ++kk) {
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

extern "C" __global__ void __launch_bounds__(256) fused_linear_f32(const LinearParams p) { fused_linear_tile<TagF32>(p); }
extern "C" __global__ void __launch_bounds__(256) fused_linear_f16(const LinearParams p) { fused_linear_tile<TagF16>(p); }
extern "C" __global__ void __launch_bounds__(256) fused_linear_bf16(const LinearParams p) { fused_linear_tile<TagBF16>(p); }
