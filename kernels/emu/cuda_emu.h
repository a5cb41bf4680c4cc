// A CPU emulation of the parts of the CUDA execution model the rankfuse kernels use, so the
// kernels' indexing, tiling, splits and masks can be executed without a GPU (kernels/emu/run.sh).
// Each block runs as blockDim.x std::threads sharing one std::barrier (__syncthreads); exited
// threads drop out of the barrier; `__shared__` variables are function statics (blocks run one
// after another); atomics take a global mutex; the _rn intrinsics are plain IEEE operations
// (compiled with -ffp-contract=off); f16 conversions use the host's _Float16 (common.cuh under
// RF_CPU_EMULATION). Not emulated: warps (shuffles), the memory model, inline PTX. Nothing here
// says anything about performance or about what ptxas / the driver do.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<> *emu_barrier = nullptr;
inline std::mutex emu_atomic_lock;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
// f16 conversions use _Float16 under RF_CPU_EMULATION (common.cuh); no other inline PTX runs here.
#define RF_CPU_EMULATION 1

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }  // unused by emulated kernels
template <class T>
inline T atomicAdd(T *p, T v) {
  std::lock_guard<std::mutex> g(emu_atomic_lock);
  T o = *p;
  *p = o + v;
  return o;
}
inline unsigned atomicMin(unsigned *p, unsigned v) {
  std::lock_guard<std::mutex> g(emu_atomic_lock);
  unsigned o = *p;
  *p = std::min(o, v);
  return o;
}
inline unsigned atomicOr(unsigned *p, unsigned v) {
  std::lock_guard<std::mutex> g(emu_atomic_lock);
  unsigned o = *p;
  *p = o | v;
  return o;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
using std::max;
using std::min;

// Runs kernel(p) over `grid` with 256-thread blocks.
template <class P>
void emu_launch(void (*kernel)(P), dim3 grid, const P &p) {
  gridDim = grid;
  blockDim = dim3{256, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(256);
        emu_barrier = &bar;
        std::vector<std::thread> ts;
        ts.reserve(256);
        for (unsigned t = 0; t < 256; ++t) {
          ts.emplace_back([&, t, x, y, z] {
            threadIdx = dim3{t, 0, 0};
            blockIdx = dim3{x, y, z};
            kernel(p);
            bar.arrive_and_drop();
          });
        }
        for (auto &th : ts) th.join();
      }
}
