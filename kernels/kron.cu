// KRAdapter (src/adapter/kron.rs). For W of out x in, m = min(out, in), M = max(out, in),
// r = floor(sqrt(m)), w = r + d: slice i along the smaller dimension is kron(V_i, U_i)[..M], i.e.
// element j = a r + b of slice i is V[i, a] U[i, b]; dW = scale * slices (row i when out <= in,
// column i otherwise). U is m x r, row-major, contiguous; V[i, a] is v[i * v_si + a * v_sa]
// (m x w row-major: v_si = w, v_sa = 1; the rf_lora layout keeps V^T: v_si = 1, v_sa = m). f32.
//
// kron_forward_<x>: y[row(b)] = (accumulate ? y[row(b)] : 0) + scale * x[row(b)] dW^T, with the
// dW tiles generated in shared memory from U and V (dW is never stored). row(b) = rows[b] (a
// mixed batch's rows of one slot) or b. 64 x 64 FMA tiles (tile_gemm.cuh), grid
// (ceil(out / 64), ceil(batch / 64)), block 256. Same flops as the CPU `Kron::forward`
// (batch x out x in), f32 accumulation, one rounding to y's dtype.
// kron_merge_<w>: W = round(W + sign * (scale * (V[i, a] * U[i, b]))) elementwise, the CPU
// `merge_into` in the same order of operations (bit-identical for f32 W). Grid (ceil(in / 256),
// min(out, 65535)), rows by grid-stride.
//
// Training (src/methods/backward.rs), G = dy^T x (out x in, the gradient of dW / scale) is formed
// a 64 x 64 tile at a time and never stored:
// kron_backward_uv_<x>: dU[i, b] += scale sum_a G_i[a r + b] V[i, a] and
// dV[i, a] += scale sum_b G_i[a r + b] U[i, b] (G_i = slice i of G). Each CTA computes one G tile
// (K = batch), keeps it in shared memory, reduces it to the (slice, component) pairs the tile
// touches and adds each with one atomicAdd (du, dv zeroed by the host; dv is m x w row-major).
// Grid (ceil(in / 64), ceil(out / 64)), block 256.
// kron_backward_dx_<w>: dx = dy (W + scale dW) (W NULL: dy scale dW), one NN GEMM whose B tiles
// are W's plus the generated dW's, stored in dx's dtype. Grid (ceil(in / 64), ceil(batch / 64)).
#include "tile_gemm.cuh"

struct KronParams {
  const void *x;     // batch x in (ldx)
  const float *u;    // m x r
  const float *v;    // V[i, a] at v[i * v_si + a * v_sa]
  void *y;           // batch x out (ldy)
  void *w;           // out x in (ldw)
  const int *rows;   // forward: NULL or batch entries (x / y row of each tile row)
  const void *dy;    // batch x out (lddy)
  float *du;         // m x r
  float *dv;         // m x w
  void *dx;          // batch x in (lddx)
  i64 ldx;
  i64 ldy;
  i64 ldw;
  i64 lddy;
  i64 lddx;
  i64 v_si;
  i64 v_sa;
  int batch;
  int out;
  int in;
  int r;
  int wv;              // r + d
  int rows_are_slices; // out <= in
  int x_dtype;
  int y_dtype;
  int w_dtype;
  int dy_dtype;
  int dx_dtype;
  int accumulate;
  float scale;
  float sign;          // merge: +1 (merge) or -1 (unmerge)
};

static_assert(sizeof(KronParams) == 192, "KronParams layout is mirrored in src/backend/cuda/algebra_ops.rs");

// dW / scale at (o, n), as an operand B(n, o) of the tile GEMM.
struct KronDelta {
  const float *u;
  const float *v;
  i64 v_si;
  i64 v_sa;
  int r;
  int rows;
  __device__ __forceinline__ float at(int o, int n) const {
    const int i = rows ? o : n;
    const int j = rows ? n : o;
    return v[(i64)i * v_si + (i64)(j / r) * v_sa] * u[(i64)i * r + j % r];
  }
  __device__ __forceinline__ float operator()(int n, int o) const { return at(o, n); }
  // Consecutive outputs o read consecutive U entries when columns are slices.
  __device__ __forceinline__ bool col_fast() const { return !rows; }
};

__device__ __forceinline__ KronDelta kron_delta(const KronParams &p) {
  KronDelta d;
  d.u = p.u;
  d.v = p.v;
  d.v_si = p.v_si;
  d.v_sa = p.v_sa;
  d.r = p.r;
  d.rows = p.rows_are_slices;
  return d;
}

// Row b of x (or y) in memory: rows[b] for a gathered slot, else b.
__device__ __forceinline__ i64 kron_row(const int *rows, int b) { return rows ? (i64)rows[b] : (i64)b; }

// x[row(b), n] as A(b, n). (Fields by value: taking a kernel parameter's address would copy the
// block to local memory.)
template <int XT>
struct GatheredX {
  const void *x;
  const int *rows;
  i64 ldx;
  int dt;
  __device__ __forceinline__ float operator()(int b, int n) const {
    return load_elem<XT>(x, kron_row(rows, b) * ldx + n, dt);
  }
  __device__ __forceinline__ bool col_fast() const { return true; }
};

template <int XT>
__device__ __forceinline__ void kron_forward(const KronParams &p) {
  __shared__ TileShared sh;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  float acc[4][4];
  tile_zero(acc);
  GatheredX<XT> xa;
  xa.x = p.x;
  xa.rows = p.rows;
  xa.ldx = p.ldx;
  xa.dt = p.x_dtype;
  tile_gemm(xa, p.batch, kron_delta(p), p.out, row0, col0, 0, p.in, acc, sh);
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int b = tile_row(row0, ii);
    if (b >= p.batch) continue;
    const i64 yrow = kron_row(p.rows, b) * p.ldy;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int o = tile_col(col0, jj);
      if (o >= p.out) continue;
      const i64 i = yrow + o;
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

template <int XT>
__device__ __forceinline__ void kron_backward_uv(const KronParams &p) {
  __shared__ TileShared sh;
  __shared__ float gt[TG_BM][TG_BN + 1];
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;  // o, n of the G tile
  float acc[4][4];
  tile_zero(acc);
  // A(o, b) = dy[b, o], B(b, n) = x[b, n].
  tile_gemm(strided<RF_NONE>(p.dy, 1, p.lddy, p.dy_dtype), p.out, strided<XT>(p.x, p.ldx, 1, p.x_dtype), p.in, row0,
            col0, 0, p.batch, acc, sh);
#pragma unroll
  for (int ii = 0; ii < 4; ++ii)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) gt[(threadIdx.x >> 4) + 16 * ii][(threadIdx.x & 15) + 16 * jj] = acc[ii][jj];
  __syncthreads();
  const bool rows = p.rows_are_slices;
  const int m = rows ? p.out : p.in, big = rows ? p.in : p.out;
  const int i0 = rows ? row0 : col0, j0 = rows ? col0 : row0;
  const int ni = min(TG_BM, m - i0), nj = min(TG_BN, big - j0);
  if (ni <= 0 || nj <= 0) return;
  const int r = p.r;
  const int cnt_c = min(r, nj);
  const int a_lo = j0 / r, cnt_a = (j0 + nj - 1) / r - a_lo + 1;
  const int per = cnt_c + cnt_a;
  for (int t = threadIdx.x; t < ni * per; t += blockDim.x) {
    const int li = t / per, q = t % per;
    const i64 i = i0 + li;
    float sum = 0.f;
    if (q < cnt_c) {
      // Component c = (j0 + q) mod r: local j = q, q + r, ...
      for (int lj = q; lj < nj; lj += r) {
        const float g = rows ? gt[li][lj] : gt[lj][li];
        sum += g * p.v[i * p.v_si + (i64)((j0 + lj) / r) * p.v_sa];
      }
      atomicAdd(&p.du[i * r + (j0 + q) % r], p.scale * sum);
    } else {
      const int a = a_lo + (q - cnt_c);
      const int lo = max(0, a * r - j0), hi = min(nj, (a + 1) * r - j0);
      for (int lj = lo; lj < hi; ++lj) {
        const float g = rows ? gt[li][lj] : gt[lj][li];
        sum += g * p.u[i * r + (j0 + lj) % r];
      }
      atomicAdd(&p.dv[i * p.wv + a], p.scale * sum);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) kron_backward_uv_f32(const KronParams p) { kron_backward_uv<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) kron_backward_uv_f16(const KronParams p) { kron_backward_uv<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) kron_backward_uv_bf16(const KronParams p) { kron_backward_uv<RF_BF16>(p); }

// B(o, n) = W[o, n] + scale dW(o, n) (W NULL: scale dW).
template <int WT>
struct WPlusDelta {
  const void *w;
  i64 ldw;
  int dt;
  float scale;
  KronDelta d;
  __device__ __forceinline__ float operator()(int o, int n) const {
    const float dw = scale * d.at(o, n);
    return w ? load_elem<WT>(w, (i64)o * ldw + n, dt) + dw : dw;
  }
  __device__ __forceinline__ bool col_fast() const { return true; }
};

template <int WT>
__device__ __forceinline__ void kron_backward_dx(const KronParams &p) {
  __shared__ TileShared sh;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  float acc[4][4];
  tile_zero(acc);
  WPlusDelta<WT> wb;
  wb.w = p.w;
  wb.ldw = p.ldw;
  wb.dt = p.w_dtype;
  wb.scale = p.scale;
  wb.d = kron_delta(p);
  tile_gemm(strided<RF_NONE>(p.dy, p.lddy, 1, p.dy_dtype), p.batch, wb, p.in, row0, col0, 0, p.out, acc, sh);
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int b = tile_row(row0, ii);
    if (b >= p.batch) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int n = tile_col(col0, jj);
      if (n < p.in) store_from_f32(p.dx, (i64)b * p.lddx + n, p.dx_dtype, acc[ii][jj]);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) kron_backward_dx_f32(const KronParams p) { kron_backward_dx<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) kron_backward_dx_f16(const KronParams p) { kron_backward_dx<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) kron_backward_dx_bf16(const KronParams p) { kron_backward_dx<RF_BF16>(p); }
