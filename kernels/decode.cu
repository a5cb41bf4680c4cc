// Decode (m = 1..8): memory-bound split-K GEMV. W is streamed once in its own dtype with 128-bit
// loads (when its rows are 16-byte aligned), converted in registers and multiplied against all m
// rows of x held in shared memory as f32. Each split writes f32 partial sums; decode_epilogue
// adds the splits, bias and the adapter expand (T B^T, r FMAs per output) and stores y.
//
// Geometry (launch.rs `decode_geometry`): decode_linear: block 256 = 8 warps x 2 output columns
// (16 columns per block), grid = (ceil(n / 16), splits), dynamic shared memory m * k_chunk * 4
// bytes (k_chunk a multiple of 256). decode_epilogue: block 256, grid = (ceil(n / 256), m).
#include "common.cuh"

#define DEC_WARPS 8
#define DEC_COLS_PER_WARP 2
#define DEC_MAX_M 8

// Unpacks one 16-byte vector of W into f32 values.
__device__ __forceinline__ void unpack16(const uint4 v, float *out, TagF32) {
  out[0] = __uint_as_float(v.x);
  out[1] = __uint_as_float(v.y);
  out[2] = __uint_as_float(v.z);
  out[3] = __uint_as_float(v.w);
}
template <typename T16>
__device__ __forceinline__ void unpack_pair(u32 word, float &lo, float &hi) {
  lo = T16::to_f32((u16)(word & 0xffffu));
  hi = T16::to_f32((u16)(word >> 16));
}
template <typename T16>
__device__ __forceinline__ void unpack16(const uint4 v, float *out, T16) {
  unpack_pair<T16>(v.x, out[0], out[1]);
  unpack_pair<T16>(v.y, out[2], out[3]);
  unpack_pair<T16>(v.z, out[4], out[5]);
  unpack_pair<T16>(v.w, out[6], out[7]);
}

template <typename WT>
__device__ __forceinline__ void decode_linear(const LinearParams &p) {
  typedef typename WT::storage ws;
  const int VE = 16 / (int)sizeof(ws);  // elements per 128-bit load
  RF_DYNAMIC_SHARED(float4, dyn_smem);
  float *xs = (float *)dyn_smem;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.y;
  const int ks = split * p.k_chunk;
  const int ke = min(p.k, ks + p.k_chunk);
  const int len = ke - ks;
  const int kc = p.k_chunk;
  for (int idx = tid; idx < p.m * len; idx += blockDim.x) {
    const int mi = idx / len, kk = idx - mi * len;
    xs[mi * kc + kk] = load_as_f32(p.x, (i64)mi * p.ldx + ks + kk, p.x_dtype);
  }
  __syncthreads();
  const ws *w = (const ws *)p.w;
#pragma unroll 1
  for (int q = 0; q < DEC_COLS_PER_WARP; ++q) {
    const int j = (blockIdx.x * DEC_WARPS + warp) * DEC_COLS_PER_WARP + q;
    if (j >= p.n) continue;
    const ws *wr = w + (i64)j * p.ldw + ks;
    float acc[DEC_MAX_M];
#pragma unroll
    for (int mi = 0; mi < DEC_MAX_M; ++mi) acc[mi] = 0.f;
    int done = 0;
    if (p.vec_ok) {
      const int nvec = len / VE;
      const uint4 *wv = (const uint4 *)wr;
      // Unrolled so each lane keeps several 128-bit loads in flight (memory-bound).
#pragma unroll 4
      for (int v = lane; v < nvec; v += 32) {
        float wf[16 / sizeof(ws)];
        unpack16(wv[v], wf, WT());
#pragma unroll
        for (int e4 = 0; e4 < VE; e4 += 4) {
          const int kk = v * VE + e4;
#pragma unroll
          for (int mi = 0; mi < DEC_MAX_M; ++mi) {
            if (mi < p.m) {
              const float4 xv = *(const float4 *)(xs + mi * kc + kk);
              acc[mi] += wf[e4] * xv.x + wf[e4 + 1] * xv.y + wf[e4 + 2] * xv.z + wf[e4 + 3] * xv.w;
            }
          }
        }
      }
      done = nvec * VE;
    }
    for (int kk = done + lane; kk < len; kk += 32) {
      const float wf = WT::to_f32(wr[kk]);
#pragma unroll
      for (int mi = 0; mi < DEC_MAX_M; ++mi)
        if (mi < p.m) acc[mi] += wf * xs[mi * kc + kk];
    }
#pragma unroll
    for (int mi = 0; mi < DEC_MAX_M; ++mi) {
      if (mi < p.m) {
        const float v = warp_sum(acc[mi]);
        if (lane == 0) p.partial[((i64)split * p.m + mi) * p.n + j] = v;
      }
    }
  }
}

template <typename YT>
__device__ __forceinline__ void decode_epilogue(const LinearParams &p) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y;
  if (j >= p.n || i >= p.m) return;
  float v = 0.f;
  for (int s = 0; s < p.splits; ++s) v += p.partial[((i64)s * p.m + i) * p.n + j];
  if (p.bias) v += load_as_f32(p.bias, j, p.bias_dtype);
  const int only = p.row_slot ? p.row_slot[i] : -2;
  for (int s = 0; s < p.n_slots; ++s) {
    if (only != -2 && only != s) continue;
    const SlotParams &sp = p.slots[s];
    const float *tr = p.t + (i64)i * p.ldt + sp.off;
    for (int c = 0; c < sp.rank; ++c) v += tr[c] * load_as_f32(sp.b, (i64)j * sp.ldb + c, sp.b_dtype);
  }
  store_from_f32(p.y, (i64)i * p.ldy + j, YT::code, v);
}

extern "C" __global__ void __launch_bounds__(256, 2) decode_linear_f32(const LinearParams p) { decode_linear<TagF32>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) decode_linear_f16(const LinearParams p) { decode_linear<TagF16>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) decode_linear_bf16(const LinearParams p) { decode_linear<TagBF16>(p); }
extern "C" __global__ void __launch_bounds__(256) decode_epilogue_f32(const LinearParams p) { decode_epilogue<TagF32>(p); }
extern "C" __global__ void __launch_bounds__(256) decode_epilogue_f16(const LinearParams p) { decode_epilogue<TagF16>(p); }
extern "C" __global__ void __launch_bounds__(256) decode_epilogue_bf16(const LinearParams p) { decode_epilogue<TagBF16>(p); }
