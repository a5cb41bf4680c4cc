// LoRA backward (training path). For y = x W^T + s ((x A_r^T) ⊙ e) B_r^T and dy (same math as
// src/train/backward.rs):
//
//   U = x A_r^T (m x r)   G = dy B_r (m x r)    T = U ⊙ e    P = s (G ⊙ e)
//   dB[:, c] += s dy^T T[:, c]   dA[c, :] += P[:, c]^T x   dE[c] += s sum_i G[i, c] U[i, c]
//   dx = dy W + P A_r   (written, every component: the true input gradient)
//
// dA / dB / dE are touched only for components with grad[c] != 0 (nested: active components below
// the rank; frozen: component r - 1); others are never written, so they stay exactly as they were
// (zero after zero_grad). e = E ⊙ mask (gains and the `active` mask, either may be NULL), so
// masked components also contribute nothing to dx.
// Everything accumulates in f32 (dE in f64 per component, as the CPU does); gradients are f32.
//
// Launch order on one stream (src/backend/cuda/train.rs):
//   1. lora_backward_ug_<x>:  U and G. grid (ceil(r/64), ceil(m/64), 2 * ug_splits), block 256;
//      z = 2 * split + (0: U over k in [split * ug_chunk_k, +ug_chunk_k), 1: G over n in
//      [split * ug_chunk_n, ...)). With ug_splits > 1 the host zeroes U and G first and blocks
//      atomicAdd into them.
//   2. lora_backward_de_f32 (only with trainable gains): grid (r), block 256.
//   3. lora_backward_tp_f32: U -> T, G -> P in place. grid (ceil(r/256), min(m, 65535)), rows by
//      grid-stride.
//   4. lora_backward_db_<dy>: dB. grid (ceil(r/64), ceil(n/64), ab_splits), m split in chunks of
//      ab_chunk_m rows (atomicAdd when ab_splits > 1).
//   5. lora_backward_da_<x>: dA. grid (ceil(k/64), ceil(r/64), ab_splits), same m split.
//   6. lora_backward_dx_<w> (when dx is wanted): grid (ceil(k/64), ceil(m/64)).
#include "tile_gemm.cuh"

struct BackwardParams {
  const void *x;               // m x k (ldx)
  const void *w;               // n x k (ldw)
  const void *dy;              // m x n (lddy)
  const void *a;               // A_r: r x k (lda)
  const void *b;               // B_r: n x r (ldb)
  const float *gains;          // NULL (all 1) or r entries: E ⊙ mask
  const unsigned char *grad;   // r entries: component gets dA / dB / dE
  const unsigned char *active; // NULL (all on) or r entries: the component mask (e = 0 when off)
  float *u;                    // m x r (ld r): U, then T
  float *g;                    // m x r (ld r): G, then P
  float *da;                   // r x k (ldda)
  float *db;                   // n x r (lddb)
  float *de;                   // r entries, or NULL (no trainable gains)
  void *dx;                    // m x k (lddx), or NULL
  i64 ldx;
  i64 ldw;
  i64 lddy;
  i64 lda;
  i64 ldb;
  i64 ldda;
  i64 lddb;
  i64 lddx;
  int m;
  int n;
  int k;
  int r;
  int x_dtype;
  int w_dtype;
  int dy_dtype;
  int a_dtype;
  int b_dtype;
  int dx_dtype;
  int ug_splits;
  int ug_chunk_k;   // multiple of 16
  int ug_chunk_n;   // multiple of 16
  int ab_splits;
  int ab_chunk_m;   // multiple of 16
  float scale;
};

static_assert(sizeof(BackwardParams) == 240, "BackwardParams layout is mirrored in src/backend/cuda/train.rs");

// Adds v to an f32 gradient element: plain read-modify-write when one block owns it, atomic when
// K is split across blocks.
__device__ __forceinline__ void grad_add(float *p, float v, bool atomic) {
  if (atomic) {
    atomicAdd(p, v);
  } else {
    *p += v;
  }
}

template <int XT>
__device__ __forceinline__ void backward_ug(const BackwardParams &p) {
  __shared__ TileShared sh;
  const int which = blockIdx.z & 1;
  const int split = blockIdx.z >> 1;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  const int kl = which == 0 ? p.k : p.n;
  const int chunk = which == 0 ? p.ug_chunk_k : p.ug_chunk_n;
  const int k0 = split * chunk;
  const int k1 = min(kl, k0 + chunk);
  // Uniform over the block. Split 0 always runs so an empty K still stores zeros.
  if (split > 0 && k0 >= k1) return;
  float acc[4][4];
  tile_zero(acc);
  float *out;
  if (which == 0) {
    // U = x A_r^T: A(i, kk) = x[i, kk], B(kk, c) = A_r[c, kk].
    tile_gemm(strided<XT>(p.x, p.ldx, 1, p.x_dtype), p.m, strided<RF_NONE>(p.a, 1, p.lda, p.a_dtype), p.r,
              row0, col0, k0, k1, acc, sh);
    out = p.u;
  } else {
    // G = dy B_r: A(i, j) = dy[i, j], B(j, c) = B_r[j, c].
    tile_gemm(strided<RF_NONE>(p.dy, p.lddy, 1, p.dy_dtype), p.m, strided<RF_NONE>(p.b, p.ldb, 1, p.b_dtype),
              p.r, row0, col0, k0, k1, acc, sh);
    out = p.g;
  }
  const bool atomic = p.ug_splits > 1;
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int i = tile_row(row0, ii);
    if (i >= p.m) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int c = tile_col(col0, jj);
      if (c >= p.r) continue;
      float *o = out + (i64)i * p.r + c;
      if (atomic) {
        atomicAdd(o, acc[ii][jj]);
      } else {
        *o = acc[ii][jj];
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) lora_backward_ug_f32(const BackwardParams p) { backward_ug<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_backward_ug_f16(const BackwardParams p) { backward_ug<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_backward_ug_bf16(const BackwardParams p) { backward_ug<RF_BF16>(p); }

// dE[c] += (float)(s * sum_i (double)G[i, c] * (double)U[i, c]) for components that get gradients
// (before step 3 turns U, G into T, P). One block per component.
extern "C" __global__ void __launch_bounds__(256) lora_backward_de_f32(const BackwardParams p) {
  __shared__ double red[256];
  const int c = blockIdx.x;
  if (c >= p.r || p.de == 0 || !p.grad[c]) return;  // uniform over the block
  double acc = 0.0;
  for (int i = threadIdx.x; i < p.m; i += blockDim.x) {
    acc += (double)p.g[(i64)i * p.r + c] * (double)p.u[(i64)i * p.r + c];
  }
  const double sum = block_sum_f64(acc, red);
  if (threadIdx.x == 0) p.de[c] += (float)((double)p.scale * sum);
}

// T = U ⊙ e and P = (s G) ⊙ e in place, in the CPU's order of operations; e[c] = 0 for a masked
// component, else gains[c] (1 without gains), as TrainState::gain.
extern "C" __global__ void __launch_bounds__(256) lora_backward_tp_f32(const BackwardParams p) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.r) return;
  const float e = (p.active && !p.active[c]) ? 0.f : (p.gains ? p.gains[c] : 1.f);
  for (int i = blockIdx.y; i < p.m; i += gridDim.y) {
    const i64 o = (i64)i * p.r + c;
    p.u[o] = p.u[o] * e;
    p.g[o] = (p.scale * p.g[o]) * e;
  }
}

// dB[j, c] += s * sum_i dy[i, j] T[i, c] (grad components only). Output rows j, columns c.
template <int DYT>
__device__ __forceinline__ void backward_db(const BackwardParams &p) {
  __shared__ TileShared sh;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  const int k0 = blockIdx.z * p.ab_chunk_m;
  const int k1 = min(p.m, k0 + p.ab_chunk_m);
  if (k0 >= k1) return;  // uniform; an empty m adds nothing
  float acc[4][4];
  tile_zero(acc);
  // A(j, i) = dy[i, j], B(i, c) = T[i, c].
  tile_gemm(strided<DYT>(p.dy, 1, p.lddy, p.dy_dtype), p.n, strided<RF_F32>(p.u, p.r, 1, RF_F32), p.r, row0, col0,
            k0, k1, acc, sh);
  const bool atomic = p.ab_splits > 1;
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int j = tile_row(row0, ii);
    if (j >= p.n) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int c = tile_col(col0, jj);
      if (c >= p.r || !p.grad[c]) continue;
      grad_add(p.db + (i64)j * p.lddb + c, p.scale * acc[ii][jj], atomic);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) lora_backward_db_f32(const BackwardParams p) { backward_db<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_backward_db_f16(const BackwardParams p) { backward_db<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_backward_db_bf16(const BackwardParams p) { backward_db<RF_BF16>(p); }

// dA[c, kk] += sum_i P[i, c] x[i, kk] (grad components only). Output rows c, columns kk.
template <int XT>
__device__ __forceinline__ void backward_da(const BackwardParams &p) {
  __shared__ TileShared sh;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  const int k0 = blockIdx.z * p.ab_chunk_m;
  const int k1 = min(p.m, k0 + p.ab_chunk_m);
  if (k0 >= k1) return;
  float acc[4][4];
  tile_zero(acc);
  // A(c, i) = P[i, c], B(i, kk) = x[i, kk].
  tile_gemm(strided<RF_F32>(p.g, 1, p.r, RF_F32), p.r, strided<XT>(p.x, p.ldx, 1, p.x_dtype), p.k, row0, col0, k0,
            k1, acc, sh);
  const bool atomic = p.ab_splits > 1;
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int c = tile_row(row0, ii);
    if (c >= p.r || !p.grad[c]) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int kk = tile_col(col0, jj);
      if (kk >= p.k) continue;
      grad_add(p.da + (i64)c * p.ldda + kk, acc[ii][jj], atomic);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) lora_backward_da_f32(const BackwardParams p) { backward_da<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_backward_da_f16(const BackwardParams p) { backward_da<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_backward_da_bf16(const BackwardParams p) { backward_da<RF_BF16>(p); }

// dx = dy W + P A_r, one NN GEMM over [dy | P] . [W ; A_r], stored in dx's dtype.
template <int WT>
__device__ __forceinline__ void backward_dx(const BackwardParams &p) {
  __shared__ TileShared sh;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  float acc[4][4];
  tile_zero(acc);
  // A(i, j) = dy[i, j], B(j, kk) = W[j, kk].
  tile_gemm(strided<RF_NONE>(p.dy, p.lddy, 1, p.dy_dtype), p.m, strided<WT>(p.w, p.ldw, 1, p.w_dtype), p.k, row0,
            col0, 0, p.n, acc, sh);
  // A(i, c) = P[i, c], B(c, kk) = A_r[c, kk].
  tile_gemm(strided<RF_F32>(p.g, p.r, 1, RF_F32), p.m, strided<RF_NONE>(p.a, p.lda, 1, p.a_dtype), p.k, row0, col0,
            0, p.r, acc, sh);
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int i = tile_row(row0, ii);
    if (i >= p.m) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int kk = tile_col(col0, jj);
      if (kk >= p.k) continue;
      store_from_f32(p.dx, (i64)i * p.lddx + kk, p.dx_dtype, acc[ii][jj]);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) lora_backward_dx_f32(const BackwardParams p) { backward_dx<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_backward_dx_f16(const BackwardParams p) { backward_dx<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) lora_backward_dx_bf16(const BackwardParams p) { backward_dx<RF_BF16>(p); }
