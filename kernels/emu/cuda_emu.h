// A CPU emulation of the parts of the CUDA execution model the rankfuse kernels use, so the
// kernels' indexing, tiling, splits and masks can be executed without a GPU (kernels/emu/run.sh).
// Each block runs on 256 std::threads; __syncthreads waits for every thread of the block that has
// not returned yet; `__shared__` variables are function statics (blocks run one
// after another); atomics take a global mutex; the _rn intrinsics are plain IEEE operations
// (compiled with -ffp-contract=off); f16 conversions use the host's _Float16 (common.cuh under
// RF_CPU_EMULATION). Warp shuffles (__shfl_xor_sync) are emulated with a barrier per warp, so they
// are correct only when all 32 lanes of the warp call them (the kernels only use them so);
// dynamic shared memory is one buffer per launch (`emu_dynamic_shared`). Not emulated: the memory
// model, inline PTX. Nothing here says anything about performance or about what ptxas / the
// driver do.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <condition_variable>
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
// __syncthreads for one block: releases when every thread still running the kernel has arrived
// (threads that returned no longer count, as on the GPU).
struct EmuBlockSync {
  std::mutex mu;
  std::condition_variable cv;
  int active = 0, arrived = 0;
  unsigned long gen = 0;
  void release() {
    arrived = 0;
    ++gen;
    cv.notify_all();
  }
  void sync() {
    std::unique_lock<std::mutex> l(mu);
    const unsigned long g = gen;
    if (++arrived == active) {
      release();
    } else {
      cv.wait(l, [&] { return gen != g; });
    }
  }
  void exit() {
    std::unique_lock<std::mutex> l(mu);
    --active;
    if (arrived > 0 && arrived == active) release();
  }
};
inline EmuBlockSync *emu_sync = nullptr;
inline std::mutex emu_atomic_lock;

// One warp's shuffle exchange: each lane publishes its value, all 32 meet, each reads its
// partner's, all 32 meet again (so the slots can be reused by the next shuffle).
struct EmuWarp {
  std::barrier<> bar{32};
  float v[32];
};
inline EmuWarp *emu_warps = nullptr;
// The launch's dynamic shared memory (`extern __shared__` in CUDA), 16-byte aligned.
inline float *emu_dyn_shared = nullptr;
inline void *emu_dynamic_shared() { return emu_dyn_shared; }

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
// f16 conversions use _Float16 under RF_CPU_EMULATION (common.cuh); no other inline PTX runs here.
#define RF_CPU_EMULATION 1

inline void __syncthreads() { emu_sync->sync(); }
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
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  EmuWarp &w = emu_warps[threadIdx.x >> 5];
  const unsigned lane = threadIdx.x & 31;
  w.v[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.v[lane ^ (unsigned)lane_mask];
  w.bar.arrive_and_wait();
  return r;
}
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

// Runs kernel(p) over `grid` with 256-thread blocks: 256 worker threads run the blocks one after
// another (a std::barrier separates blocks). `shared_bytes` of dynamic shared memory, filled with
// NaN at launch (a kernel reading what it did not write shows up in the results).
template <class P>
void emu_launch(void (*kernel)(P), dim3 grid, const P &p, size_t shared_bytes = 0) {
  gridDim = grid;
  blockDim = dim3{256, 1, 1};
  EmuBlockSync bs;
  bs.active = 256;
  emu_sync = &bs;
  std::vector<EmuWarp> warps(8);
  emu_warps = warps.data();
  std::vector<float4> dyn((shared_bytes + 15) / 16, float4{NAN, NAN, NAN, NAN});
  emu_dyn_shared = (float *)dyn.data();
  std::barrier end(256, [&]() noexcept { bs.active = 256; });
  std::vector<std::thread> ts;
  ts.reserve(256);
  for (unsigned t = 0; t < 256; ++t) {
    ts.emplace_back([&, t] {
      threadIdx = dim3{t, 0, 0};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3{x, y, z};
            kernel(p);
            bs.exit();
            end.arrive_and_wait();
          }
    });
  }
  for (auto &th : ts) th.join();
}
