// SGMV-style shrink: T[i, off_s + c] += scale_s * gains_s[c] * sum_k x[i, k] * A_s[c, k]
// for every row i that slot s applies to. Rows are grouped by slot on the host (perm + segments),
// so a block works on rows of one slot only; each slot uses exactly its own rank (no padding to
// the largest: component chunks past a slot's rank exit at once). T is zeroed by the host first
// (rows a slot does not apply to stay zero) and K is split across blocks for parallelism when
// there are few rows (decode): partial sums are added with atomicAdd.
//
// Geometry (launch.rs `shrink_geometry`): block 256; grid = (ceil(longest segment / 64),
// active slots, c_chunks * k_splits) with z = k_split * c_chunks + c_chunk. Each block computes a
// 64-row x 32-component tile of T over K range [k_split * k_chunk, +k_chunk) in steps of 32
// through shared memory; each thread owns 2 rows x 4 components.
#include "common.cuh"

#define SH_BM 64
#define SH_BC 32
#define SH_BK 32

template <typename XT>
__device__ __forceinline__ void lora_shrink(const LinearParams &p) {
  typedef typename XT::storage xs_t;
  __shared__ float sx[SH_BK][SH_BM + 1];
  __shared__ float sa[SH_BK][SH_BC + 1];
  const int s = blockIdx.y;
  const SlotParams &sp = p.slots[s];
  const int r0 = blockIdx.x * SH_BM;
  const int cchunk = blockIdx.z % p.shrink_c_chunks;
  const int ksplit = blockIdx.z / p.shrink_c_chunks;
  const int c0 = cchunk * SH_BC;
  const int ks = ksplit * p.shrink_k_chunk;
  const int ke = min(p.k, ks + p.shrink_k_chunk);
  // Uniform over the block, before any barrier.
  if (r0 >= sp.seg_len || c0 >= sp.rank || ks >= ke) return;

  const int tid = threadIdx.x;
  const int tr = tid >> 3, tc = tid & 7;
  const xs_t *x = (const xs_t *)p.x;

  // The x rows this thread loads: tile rows (tid >> 5) + 8 e, e = 0..7 (-1 = past the segment).
  int load_row[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int local = r0 + (tid >> 5) + 8 * e;
    load_row[e] = local < sp.seg_len ? (p.perm ? p.perm[sp.seg_start + local] : local) : -1;
  }

  float acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = ks; k0 < ke; k0 += SH_BK) {
    const int kk = tid & 31;
    const int gk = k0 + kk;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int row = load_row[e];
      sx[kk][(tid >> 5) + 8 * e] = (row >= 0 && gk < ke) ? XT::to_f32(x[(i64)row * p.ldx + gk]) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int cc = (tid >> 5) + 8 * e;
      const int c = c0 + cc;
      sa[kk][cc] = (c < sp.rank && gk < ke) ? load_as_f32(sp.a, (i64)c * sp.lda + gk, sp.a_dtype) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int q = 0; q < SH_BK; ++q) {
      const float a0 = sx[q][tr], a1 = sx[q][tr + 32];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float b = sa[q][tc + 8 * j];
        acc[0][j] += a0 * b;
        acc[1][j] += a1 * b;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int local = r0 + tr + 32 * i;
    if (local >= sp.seg_len) continue;
    const int row = p.perm ? p.perm[sp.seg_start + local] : local;
    float *trow = p.t + (i64)row * p.ldt + sp.off;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c0 + tc + 8 * j;
      if (c >= sp.rank) continue;
      const float g = sp.gains ? load_as_f32(sp.gains, c, sp.gains_dtype) : 1.f;
      atomicAdd(trow + c, acc[i][j] * sp.scale * g);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) lora_shrink_f32(const LinearParams p) { lora_shrink<TagF32>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_shrink_f16(const LinearParams p) { lora_shrink<TagF16>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_shrink_bf16(const LinearParams p) { lora_shrink<TagBF16>(p); }
