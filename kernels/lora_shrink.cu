// SGMV-style shrink: T[i, off_s + c] = scale_s * gains_s[c] * sum_k x[i, k] * A_s[c, k]
// for every row i that slot s applies to. Rows are grouped by slot on the host (perm + segments),
// so one block works on rows of one slot only and streams that slot's A through L1; each slot
// uses exactly its own rank (no padding to the largest). T entries of rows a slot does not apply
// to are zeroed by the host (memset) before this runs.
//
// Geometry (launch.rs `shrink_geometry`): grid = (ceil(max_seg_len / 8), n_slots), block = 256
// (8 warps, one row each). Each warp computes 4 components at a time: one x load feeds 4 FMAs.
#include "common.cuh"

#define SHRINK_WARPS 8
#define SHRINK_COMP 4

template <typename XT>
__device__ __forceinline__ void lora_shrink(const LinearParams &p) {
  typedef typename XT::storage xs;
  const int s = blockIdx.y;
  const SlotParams &sp = p.slots[s];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int local = blockIdx.x * SHRINK_WARPS + warp;
  if (local >= sp.seg_len) return;
  const int row = p.perm ? p.perm[sp.seg_start + local] : local;
  const xs *xr = (const xs *)p.x + (i64)row * p.ldx;
  float *tr = p.t + (i64)row * p.ldt + sp.off;
  for (int c0 = 0; c0 < sp.rank; c0 += SHRINK_COMP) {
    float acc[SHRINK_COMP];
#pragma unroll
    for (int j = 0; j < SHRINK_COMP; ++j) acc[j] = 0.f;
    for (int kk = lane; kk < p.k; kk += 32) {
      float xv = XT::to_f32(xr[kk]);
#pragma unroll
      for (int j = 0; j < SHRINK_COMP; ++j) {
        if (c0 + j < sp.rank) acc[j] += xv * load_as_f32(sp.a, (i64)(c0 + j) * sp.lda + kk, sp.a_dtype);
      }
    }
#pragma unroll
    for (int j = 0; j < SHRINK_COMP; ++j) {
      float v = warp_sum(acc[j]);
      if (lane == 0 && c0 + j < sp.rank) {
        float g = sp.gains ? load_as_f32(sp.gains, c0 + j, sp.gains_dtype) : 1.f;
        tr[c0 + j] = v * sp.scale * g;
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) lora_shrink_f32(const LinearParams p) { lora_shrink<TagF32>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_shrink_f16(const LinearParams p) { lora_shrink<TagF16>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_shrink_bf16(const LinearParams p) { lora_shrink<TagBF16>(p); }
