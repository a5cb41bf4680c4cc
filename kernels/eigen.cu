// EigenLoRAx shared-projection serving (src/algebra/eigen.rs `eigen_linear`): for a basis C_A
// (in x K), C_B (out x K) and per-adapter K x K cores (alpha_A alpha_B^T):
//
//   z = x C_A (once for all rows and adapters)      u[i] = z[i] core_{slot(i)}
//   y = round(base + u C_B^T)                        base = x W^T + bias in f32 (fused linear)
//
// Stacked (row_slot NULL): every row uses core 0, which the host fills with the sum of the
// adapters' cores (summed in slot order, as the CPU does). Mixed: row_slot[i] indexes the cores;
// -1 = base only (u = 0). Absent slots are zero cores.
//
// eigen_project_<x>: z, 64 x 64 FMA tiles, grid (ceil(K / 64), ceil(m / 64)), block 256.
// eigen_core_f32: u, one thread per (row, j): grid (ceil(K / 256), min(m, 65535)), rows by
// grid-stride.
// eigen_expand_<y>: y, 64 x 64 tiles, grid (ceil(n / 64), ceil(m / 64)), block 256. With to_base
// the sum stays in the f32 base (a call mixing several bases or KRAdapter slots adds every
// update there and compose.cu rounds y once).
#include "tile_gemm.cuh"

struct EigenParams {
  const void *x;        // m x in (ldx)
  const float *c_a;     // in x K: C_A[kk, c] at c_a[kk * ca_rs + c * ca_cs]
  const float *c_b;     // out x K (ldcb)
  const float *cores;   // n_cores x K x K, row-major, contiguous
  const int *row_slot;  // NULL (stacked: core 0) or m entries
  float *z;             // m x K (ld K)
  float *u;             // m x K (ld K)
  float *base;          // m x n (ldbase)
  void *y;              // m x n (ldy)
  i64 ldx;
  i64 ca_rs;
  i64 ca_cs;
  i64 ldcb;
  i64 ldbase;
  i64 ldy;
  int m;
  int n;
  int in;
  int kc;       // K
  int n_cores;
  int x_dtype;
  int y_dtype;
  int to_base;  // eigen_expand: base += u C_B^T (f32, y untouched) instead of storing y
};

static_assert(sizeof(EigenParams) == 152, "EigenParams layout is mirrored in src/backend/cuda/algebra_ops.rs");

template <int XT>
__device__ __forceinline__ void eigen_project(const EigenParams &p) {
  __shared__ TileShared sh;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  float acc[4][4];
  tile_zero(acc);
  tile_gemm(strided<XT>(p.x, p.ldx, 1, p.x_dtype), p.m, strided<RF_F32>(p.c_a, p.ca_rs, p.ca_cs, RF_F32), p.kc, row0, col0,
            0, p.in, acc, sh);
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int i = tile_row(row0, ii);
    if (i >= p.m) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int c = tile_col(col0, jj);
      if (c < p.kc) p.z[(i64)i * p.kc + c] = acc[ii][jj];
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) eigen_project_f32(const EigenParams p) { eigen_project<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) eigen_project_f16(const EigenParams p) { eigen_project<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) eigen_project_bf16(const EigenParams p) { eigen_project<RF_BF16>(p); }

extern "C" __global__ void __launch_bounds__(256) eigen_core_f32(const EigenParams p) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= p.kc) return;
  for (int i = blockIdx.y; i < p.m; i += gridDim.y) {
    const int s = p.row_slot ? p.row_slot[i] : 0;
    float acc = 0.f;
    if (s >= 0 && s < p.n_cores) {
      const float *core = p.cores + (i64)s * p.kc * p.kc;
      const float *zr = p.z + (i64)i * p.kc;
      for (int c = 0; c < p.kc; ++c) acc += zr[c] * core[(i64)c * p.kc + j];
    }
    p.u[(i64)i * p.kc + j] = acc;
  }
}

template <int YT>
__device__ __forceinline__ void eigen_expand(const EigenParams &p) {
  __shared__ TileShared sh;
  const int row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
  float acc[4][4];
  tile_zero(acc);
  // A(i, c) = u[i, c], B(c, j) = C_B[j, c].
  tile_gemm(strided<RF_F32>(p.u, p.kc, 1, RF_F32), p.m, strided<RF_F32>(p.c_b, 1, p.ldcb, RF_F32), p.n, row0, col0,
            0, p.kc, acc, sh);
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int i = tile_row(row0, ii);
    if (i >= p.m) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = tile_col(col0, jj);
      if (j >= p.n) continue;
      float *bp = p.base + (i64)i * p.ldbase + j;
      if (p.to_base) {
        *bp += acc[ii][jj];
      } else {
        store_from_f32(p.y, (i64)i * p.ldy + j, YT, *bp + acc[ii][jj]);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) eigen_expand_f32(const EigenParams p) { eigen_expand<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) eigen_expand_f16(const EigenParams p) { eigen_expand<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) eigen_expand_bf16(const EigenParams p) { eigen_expand<RF_BF16>(p); }
