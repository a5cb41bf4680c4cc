// Helpers shared by the emulator test programs (emu_test.cpp, quant_test.cpp): a check counter,
// a SplitMix64 generator, dtype buffers with f32 mirrors of the stored values, tolerances.
#pragma once
#include "cuda_emu.h"
#include "../common.cuh"

#include <cstdio>
#include <string>

inline int failures = 0;
inline long checks = 0;
#define CHECK(cond, ...)                      \
  do {                                        \
    ++checks;                                 \
    if (!(cond)) {                            \
      if (failures < 20) {                    \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);             \
        std::printf("\n");                    \
      }                                       \
      ++failures;                             \
    }                                         \
  } while (0)

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uni(float lo, float hi) { return lo + (hi - lo) * (float)((next() >> 40) * (1.0 / (1ull << 24))); }
};

// A rows x ld buffer of dtype dt (f32, f16 or bf16) holding random values, with an f32 mirror of the
// stored (rounded) values.
struct Buf {
  int dt;
  int rows, cols;
  i64 ld;
  std::vector<uint8_t> bytes;
  std::vector<float> vals;  // rows x ld
  Buf(Rng &g, int dt_, int rows_, int cols_, int pad, float lo = -1.f, float hi = 1.f)
      : dt(dt_), rows(rows_), cols(cols_), ld(cols_ + pad) {
    size_t n = (size_t)rows * ld;
    bytes.resize(std::max<size_t>(n, 1) * (dt == RF_F32 ? 4 : 2));
    vals.resize(n);
    for (size_t i = 0; i < n; ++i) {
      float v = g.uni(lo, hi);
      if (dt != RF_F32) {
        u16 h = dt == RF_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
        std::memcpy(&bytes[2 * i], &h, 2);
        vals[i] = dt == RF_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
      } else {
        std::memcpy(&bytes[4 * i], &v, 4);
        vals[i] = v;
      }
    }
  }
  void *ptr() { return bytes.data(); }
  float at(int r, int c) const { return vals[(size_t)r * ld + c]; }
  float stored(size_t i) const { return load_as_f32(bytes.data(), (i64)i, dt); }
};

template <class K>
static K pick(int dt, K f32, K f16, K bf16) {
  return dt == RF_F32 ? f32 : dt == RF_F16 ? f16 : bf16;
}
static double rtol_of(int dt) { return dt == RF_F32 ? 1e-5 : dt == RF_F16 ? 2e-3 : 1.6e-2; }

static unsigned cdiv(long a, long b) { return (unsigned)((a + b - 1) / b); }
static int round16(long v) { return (int)std::max<long>(16, (v + 15) / 16 * 16); }

static bool close(double got, double want, double atol, double rtol) {
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

