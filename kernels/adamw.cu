// Fused AdamW over f32 masters, gradients and moments (torch.optim.AdamW, non-amsgrad: the same
// math and the same order of operations as `adam_one` in src/train/mod.rs, written with the _rn
// intrinsics so nothing is contracted into an FMA: the result is bit-identical to the CPU step).
//
//   g' = g * clip                       (clip = 1: no clipping; otherwise max_norm / (norm + 1e-6))
//   p  = p * (1 - lr * wd)
//   m  = b1 * m + (1 - b1) * g'
//   v  = b2 * v + (1 - b2) * g' * g'
//   p  = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
//
// One launch per tensor (A: cap x k with the component along rows; B: n x cap and E: 1 x cap with
// the component along columns). Only components with update[c] != 0 (touched since zero_grad and
// not masked) are stepped; others keep p, m, v exactly. Per-component bias corrections bc[2c] =
// 1 - b1^step_c, bc[2c + 1] = sqrt(1 - b2^step_c) are computed on the host exactly as the CPU does
// (each component has its own step count). When `copy` is not NULL every element of the compute
// copy is rewritten as round(p) in copy_dtype (Lora::sync_from_master).
//
// adamw_grad_stats_f32: sum of g^2 over every element (f64, for clip_grad_norm), and the count and
// first component of non-finite gradients among the components to update (the NaN/Inf guard).
//
// adamw_scale_f32: g = g * clip for every element (clip_grad_norm's in-place scaling, so the
// gradients afterwards are what the CPU holds; then step with clip = 1).
//
// Geometry (src/backend/cuda/train.rs `adamw_geometry`): block 256, grid (ceil(cols / 256),
// min(rows, 65535)); rows by grid-stride over y.
#include "common.cuh"

struct AdamwParams {
  float *p;                    // masters: rows x cols (ld)
  float *g;                    // gradients, same layout (written only by adamw_scale_f32)
  float *m;                    // first moments, same layout
  float *v;                    // second moments, same layout
  void *copy;                  // NULL or the compute copy: rows x cols (ld_copy, copy_dtype)
  const unsigned char *update; // per component: step it
  const float *bc;             // per component: 1 - b1^t, sqrt(1 - b2^t)
  double *sumsq;               // stats: += sum of g^2
  unsigned int *bad;           // stats: [0] += non-finite count, [1] = min(component)
  i64 ld;
  i64 ld_copy;
  int rows;
  int cols;
  int comp_axis;  // 0: the component is the row index; 1: the column index
  int copy_dtype;
  float lr;
  float beta1;
  float beta2;
  float eps;
  float weight_decay;
  float clip;
};

static_assert(sizeof(AdamwParams) == 128, "AdamwParams layout is mirrored in src/backend/cuda/train.rs");

template <int CT>
__device__ __forceinline__ void adamw(const AdamwParams &q) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= q.cols) return;
  for (int row = blockIdx.y; row < q.rows; row += gridDim.y) {
    const int c = q.comp_axis == 0 ? row : col;
    const i64 i = (i64)row * q.ld + col;
    float p = q.p[i];
    if (q.update[c]) {
      const float bc1 = q.bc[2 * c], bc2s = q.bc[2 * c + 1];
      const float g = __fmul_rn(q.g[i], q.clip);
      p = __fmul_rn(p, __fsub_rn(1.f, __fmul_rn(q.lr, q.weight_decay)));
      const float m = __fadd_rn(__fmul_rn(q.beta1, q.m[i]), __fmul_rn(__fsub_rn(1.f, q.beta1), g));
      const float v = __fadd_rn(__fmul_rn(q.beta2, q.v[i]), __fmul_rn(__fmul_rn(__fsub_rn(1.f, q.beta2), g), g));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2s), q.eps);
      p = __fsub_rn(p, __fdiv_rn(__fmul_rn(__fdiv_rn(q.lr, bc1), m), denom));
      q.m[i] = m;
      q.v[i] = v;
      q.p[i] = p;
    }
    if (q.copy) store_from_f32(q.copy, (i64)row * q.ld_copy + col, CT, p);
  }
}

extern "C" __global__ void __launch_bounds__(256) adamw_f32(const AdamwParams q) { adamw<RF_F32>(q); }
extern "C" __global__ void __launch_bounds__(256) adamw_f16(const AdamwParams q) { adamw<RF_F16>(q); }
extern "C" __global__ void __launch_bounds__(256) adamw_bf16(const AdamwParams q) { adamw<RF_BF16>(q); }

extern "C" __global__ void __launch_bounds__(256) adamw_grad_stats_f32(const AdamwParams q) {
  __shared__ double red[256];
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  double acc = 0.0;
  if (col < q.cols) {
    for (int row = blockIdx.y; row < q.rows; row += gridDim.y) {
      const float g = q.g[(i64)row * q.ld + col];
      acc += (double)g * (double)g;
      const int c = q.comp_axis == 0 ? row : col;
      if ((__float_as_uint(g) & 0x7f800000u) == 0x7f800000u && q.update[c]) {
        atomicAdd(q.bad, 1u);
        atomicMin(q.bad + 1, (unsigned int)c);
      }
    }
  }
  const double sum = block_sum_f64(acc, red);
  if (threadIdx.x == 0) atomicAdd(q.sumsq, sum);
}

extern "C" __global__ void __launch_bounds__(256) adamw_scale_f32(const AdamwParams q) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= q.cols) return;
  for (int row = blockIdx.y; row < q.rows; row += gridDim.y) {
    const i64 i = (i64)row * q.ld + col;
    q.g[i] = __fmul_rn(q.g[i], q.clip);
  }
}
