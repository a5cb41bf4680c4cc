// The last step of an rf_linear call whose slots include KRAdapter or EigenLoRAx modules
// (src/methods/cuda.rs): the fused linear wrote x W^T + bias + the LoRA slots' updates in f32,
// kron_forward / eigen_expand added the other kinds' updates there, and compose_store_<y>
// rounds the sum once into y (y's dtype, ldy). Grid (ceil(n / 256), min(m, 65535)), block 256,
// rows by grid-stride.
#include "common.cuh"

struct ComposeParams {
  const float *src;  // m x n f32 (lds)
  void *y;           // m x n (ldy)
  i64 lds;
  i64 ldy;
  int m;
  int n;
  int y_dtype;
  int pad;
};

static_assert(sizeof(ComposeParams) == 48, "ComposeParams layout is mirrored in src/backend/cuda/kinds.rs");

template <int YT>
__device__ __forceinline__ void compose_store(const ComposeParams &p) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= p.n) return;
  for (int i = blockIdx.y; i < p.m; i += gridDim.y) store_from_f32(p.y, (i64)i * p.ldy + j, YT, p.src[(i64)i * p.lds + j]);
}

extern "C" __global__ void __launch_bounds__(256) compose_store_f32(const ComposeParams p) { compose_store<RF_F32>(p); }
extern "C" __global__ void __launch_bounds__(256) compose_store_f16(const ComposeParams p) { compose_store<RF_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) compose_store_bf16(const ComposeParams p) { compose_store<RF_BF16>(p); }
