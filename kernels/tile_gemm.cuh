// rankfuse CUDA kernels: a 64 x 64 f32-accumulating FMA tile for the small GEMMs of the training
// and algebra kernels (lora_backward.cu, kron.cu, eigen.cu).
//
// C[row0 + i, col0 + j] += sum_{k in [k0, k1)} A(row0 + i, k) * B(k, col0 + j). Operands come
// through loader functors: `float operator()(int row, int col)` (only called in range) and
// `bool col_fast()` (consecutive columns are adjacent in memory). The tile loads pick their
// thread mapping from col_fast so global reads are coalesced whichever way an operand is stored
// (x, A_r^T, dy^T, ... are all views of row-major buffers).
//
// Block: 256 threads as 16 x 16; thread (ty, tx) owns rows ty + 16 ii and columns tx + 16 jj,
// ii, jj = 0..3. K advances in steps of 16 through static shared memory (2 x 16 x 65 floats).
#pragma once
#include "common.cuh"

#define TG_BM 64
#define TG_BN 64
#define TG_BK 16

// Element (r, c) of a row-major-ish view at p[r * rs + c * cs], dtype DT (RF_NONE: runtime dt).
template <int DT>
struct Strided {
  const void *p;
  i64 rs;
  i64 cs;
  int dt;
  __device__ __forceinline__ float operator()(int r, int c) const {
    return load_elem<DT>(p, (i64)r * rs + (i64)c * cs, dt);
  }
  __device__ __forceinline__ bool col_fast() const { return cs == 1; }
};

template <int DT>
__device__ __forceinline__ Strided<DT> strided(const void *p, i64 rs, i64 cs, int dt) {
  Strided<DT> s;
  s.p = p;
  s.rs = rs;
  s.cs = cs;
  s.dt = dt;
  return s;
}

struct TileShared {
  float a[TG_BK][TG_BM + 1];
  float b[TG_BK][TG_BN + 1];
};

__device__ __forceinline__ void tile_zero(float (&acc)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
}

// A has `a_rows` valid rows, B has `b_cols` valid columns; k in [k0, k1). Called by all threads
// of the block (it synchronizes); the caller's early exits must be uniform over the block.
template <class LA, class LB>
__device__ __forceinline__ void tile_gemm(const LA &la, int a_rows, const LB &lb, int b_cols, int row0,
                                          int col0, int k0, int k1, float (&acc)[4][4], TileShared &sh) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const bool a_kfast = la.col_fast();
  const bool b_nfast = lb.col_fast();
  for (int kb = k0; kb < k1; kb += TG_BK) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int i, q;
      if (a_kfast) {
        q = tid & 15;
        i = (tid >> 4) + 16 * e;
      } else {
        i = tid & 63;
        q = (tid >> 6) + 4 * e;
      }
      const int gi = row0 + i, gk = kb + q;
      sh.a[q][i] = (gi < a_rows && gk < k1) ? la(gi, gk) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int j, q;
      if (b_nfast) {
        j = tid & 63;
        q = (tid >> 6) + 4 * e;
      } else {
        q = tid & 15;
        j = (tid >> 4) + 16 * e;
      }
      const int gj = col0 + j, gk = kb + q;
      sh.b[q][j] = (gj < b_cols && gk < k1) ? lb(gk, gj) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < TG_BK; ++q) {
      float a[4], b[4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) a[ii] = sh.a[q][ty + 16 * ii];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) b[jj] = sh.b[q][tx + 16 * jj];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[ii][jj] += a[ii] * b[jj];
    }
    __syncthreads();
  }
}

// The output element of acc[ii][jj] for this thread.
__device__ __forceinline__ int tile_row(int row0, int ii) { return row0 + (threadIdx.x >> 4) + 16 * ii; }
__device__ __forceinline__ int tile_col(int col0, int jj) { return col0 + (threadIdx.x & 15) + 16 * jj; }
