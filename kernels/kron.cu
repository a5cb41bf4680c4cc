// KRAdapter (src/adapter/kron.rs). For W of out x in, m = min(out, in), M = max(out, in),
// r = floor(sqrt(m)), w = r + d: slice i along the smaller dimension is kron(V_i, U_i)[..M], i.e.
// element j = a r + b of slice i is V[i, a] U[i, b]; dW = scale * slices (row i when out <= in,
// column i otherwise). U is m x r and V is m x w, f32, row-major, contiguous.
//
// kron_forward_<x>: y = (accumulate ? y : 0) + scale * x dW^T, with the dW tiles generated in
// shared memory from U and V (dW is never stored). 64 x 64 FMA tiles (tile_gemm.cuh), grid
// (ceil(out / 64), ceil(batch / 64)), block 256. Same flops as the CPU `Kron::forward` (batch x
// out x in), f32 accumulation, one rounding to y's dtype.
// kron_merge_<w>: W = round(W + sign * (scale * (V[i, a] * U[i, b]))) elementwise, the CPU
// `merge_into` in the same order of operations (bit-identical for f32 W). Grid (ceil(in / 256),
// min(out, 65535)), rows by grid-stride.
#include "tile_gemm.cuh"

struct KronParams {
  const void *x;     // batch x in (ldx)
  const float *u;    // m x r
  const float *v;    // m x (r + d)
  void *y;           // batch x out (ldy)
  void *w;           // out x in (ldw)
  i64 ldx;
  i64 ldy;
  i64 ldw;
  int batch;
  int out;
  int in;
  int r;
  int wv;              // r + d
  int rows_are_slices; // out <= in
  int x_dtype;
  int y_dtype;
  int w_dtype;
  int accumulate;
  float scale;
  float sign;          // merge: +1 (merge) or -1 (unmerge)
};

static_assert(sizeof(KronParams) == 112, "KronParams layout is mirrored in src/backend/cuda/algebra_ops.rs");

// dW / scale at (o, n), as an operand B(n, o) of the tile GEMM.
struct KronDelta {
  const float *u;
  const float *v;
  int r;
  int wv;
  int rows;
  __device__ __forceinline__ float at(int o, int n) const {
    const int i = rows ? o : n;
    const int j = rows ? n : o;
    return v[(i64)i * wv + j / r] * u[(i64)i * r + j % r];
  }
  __device__ __forceinline__ float operator()(int n, int o) const { return at(o, n); }
  // Consecutive outputs o read consecutive U entries when columns are slices.
  __device__ __forceinline__ bool col_fast() const { return !rows; }
};

__device__ __forceinline__ KronDelta kron_delta(const KronParams &p) {
  KronDelta d;
  d.u = p.u;
  d.v = p.v;
  d.r = p.r;
  d.wv = p.wv;
  d.rows = p.rows_are_slices;
  return d;
}

template <int XT>
__device__ __forceinline__ void kron_forward(const KronParams &p) {
  __shared__ TileShared sh;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  float acc[4][4];
  tile_zero(acc);
  tile_gemm(strided<XT>(p.x, p.ldx, 1, p.x_dtype), p.batch, kron_delta(p), p.out, row0, col0, 0, p.in, acc, sh);
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int b = tile_row(row0, ii);
    if (b >= p.batch) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int o = tile_col(col0, jj);
      if (o >= p.out) continue;
      const i64 i = (i64)b * p.ldy + o;
      float val = p.scale * acc[ii][jj];
      if (p.accumulate) val = load_as_f32(p.y, i, p.y_dtype) + val;
      store_from_f32(p.y, i, p.y_dtype, val);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) kron_forward_f32(const KronParams p) { kron_forward<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) kron_forward_f16(const KronParams p) { kron_forward<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) kron_forward_bf16(const KronParams p) { kron_forward<RF_BF16>(p); }

template <int WT>
__device__ __forceinline__ void kron_merge(const KronParams &p) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= p.in) return;
  const KronDelta d = kron_delta(p);
  for (int o = blockIdx.y; o < p.out; o += gridDim.y) {
    const i64 i = (i64)o * p.ldw + n;
    const float dw = __fmul_rn(p.scale, d.at(o, n));
    const float val = __fadd_rn(load_elem<WT>(p.w, i, WT), __fmul_rn(p.sign, dw));
    store_from_f32(p.w, i, WT, val);
  }
}

extern "C" __global__ void __launch_bounds__(256) kron_merge_f32(const KronParams p) { kron_merge<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) kron_merge_f16(const KronParams p) { kron_merge<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) kron_merge_bf16(const KronParams p) { kron_merge<RF_BF16>(p); }
