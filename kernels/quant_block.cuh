// rankfuse CUDA kernels: llama.cpp block-quantized weights (ggml-common.h layouts), decoded as
// ggml-quants.c `dequantize_row_*` and src/quant.rs do: the same f32 operations in the same order
// with no FMA contraction (__fmul_rn / __fsub_rn), so each weight is bit-identical to the CPU's.
//
//   Q8_0: 34 bytes / 32 weights: f16 d, 32 x i8.                     w = d * q
//   Q4_0: 18 bytes / 32 weights: f16 d, 16 bytes; byte j holds element j (low nibble) and
//         j + 16 (high nibble).                                      w = d * (q - 8)
//   Q4_K: 144 bytes / 256 weights: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins
//         (get_scale_min_k4), 128 bytes of nibbles: 32-byte run c holds sub-block 2c in its low
//         nibbles and 2c + 1 in its high ones.                       w = (d * sc) * q - dmin * m
//   Q6_K: 210 bytes / 256 weights: 128 bytes ql (low nibbles), 64 bytes qh (2-bit high parts),
//         16 x i8 scales (one per 16 weights), f16 d at byte 208; 32-weight group g = 4 h + j of
//         a super-block takes ql[64 h + 32 (j & 1) + l] >> 4 (j >> 1), qh[32 h + l] >> 2 j and
//         scales 8 h + 2 j (+ 1 for l >= 16).                         w = (d * sc) * (q - 32)
//
// The kernels see a row of W as groups of 32 weights (a Q8_0 / Q4_0 block, a Q4_K sub-block),
// each split into 4 pieces of 8 weights; piece `li` of a group yields weights at group offsets
// o0 .. o0 + 3 and o1 .. o1 + 3 (runs of 4, so x can be read as float4):
//   Q8_0: o0 = 8 li, o1 = 8 li + 4      Q4_0: o0 = 4 li, o1 = 16 + 4 li
//   Q4_K, Q6_K: o0 = 8 li, o1 = 8 li + 4 (of the sub-block / group)
// Loads are 16-bit for Q8_0 / Q4_0 (blocks of 34 / 18 bytes are 2-byte aligned when W is) and
// 32-bit for Q4_K (144-byte blocks are 4-byte aligned when W is), 16-bit for Q6_K (210 bytes);
// launch checks W's alignment
// (src/backend/cuda/quant.rs `w_aligned`).
#pragma once
#include "common.cuh"

#define RF_Q8_0 3
#define RF_Q4_0 4
#define RF_Q4_K 5
#define RF_Q6_K 6

typedef unsigned char u8;

// 8 dequantized weights of one piece: w[0..4] at group offsets o0.., w[4..8] at o1...
struct QPiece {
  float w[8];
};

__device__ __forceinline__ u32 ld16(const u8 *p) { return *(const u16 *)p; }
__device__ __forceinline__ u32 ld32(const u8 *p) { return *(const u32 *)p; }

struct QTagQ8_0 {
  enum { code = RF_Q8_0, elems = 32, bytes = 34 };
  static __device__ __forceinline__ int o0(int li) { return 8 * li; }
  static __device__ __forceinline__ int o1(int li) { return 8 * li + 4; }
  // Group g of a row is block g.
  static __device__ __forceinline__ void piece(const u8 *row, int g, int li, QPiece &out) {
    const u8 *b = row + (i64)g * 34;
    const float d = f16_to_f32((u16)ld16(b));
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const u32 v = ld16(b + 2 + 8 * li + 2 * h);
      out.w[2 * h] = __fmul_rn((float)(signed char)(v & 0xffu), d);
      out.w[2 * h + 1] = __fmul_rn((float)(signed char)(v >> 8), d);
    }
  }
};

struct QTagQ4_0 {
  enum { code = RF_Q4_0, elems = 32, bytes = 18 };
  static __device__ __forceinline__ int o0(int li) { return 4 * li; }
  static __device__ __forceinline__ int o1(int li) { return 16 + 4 * li; }
  static __device__ __forceinline__ void piece(const u8 *row, int g, int li, QPiece &out) {
    const u8 *b = row + (i64)g * 18;
    const float d = f16_to_f32((u16)ld16(b));
    const u32 q = ld16(b + 2 + 4 * li) | (ld16(b + 4 + 4 * li) << 16);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const u32 byte = (q >> (8 * e)) & 0xffu;
      out.w[e] = __fmul_rn((float)((int)(byte & 0x0fu) - 8), d);
      out.w[4 + e] = __fmul_rn((float)((int)(byte >> 4) - 8), d);
    }
  }
};

struct QTagQ4_K {
  enum { code = RF_Q4_K, elems = 256, bytes = 144 };
  static __device__ __forceinline__ int o0(int li) { return 8 * li; }
  static __device__ __forceinline__ int o1(int li) { return 8 * li + 4; }
  // Group g is sub-block g % 8 of super-block g / 8.
  static __device__ __forceinline__ void piece(const u8 *row, int g, int li, QPiece &out) {
    const u8 *b = row + (i64)(g >> 3) * 144;
    const int j = g & 7;
    const u32 dd = ld32(b);
    const float d = f16_to_f32((u16)(dd & 0xffffu));
    const float dmin = f16_to_f32((u16)(dd >> 16));
    // The 12 scale bytes as three words; byte i = (s[i / 4] >> 8 (i % 4)) & 0xff.
    const u32 s0 = ld32(b + 4), s1 = ld32(b + 8), s2 = ld32(b + 12);
    u32 sc, m;
    if (j < 4) {
      sc = (s0 >> (8 * j)) & 63u;
      m = (s1 >> (8 * j)) & 63u;
    } else {
      const int jj = j - 4;
      const u32 q8 = (s2 >> (8 * jj)) & 0xffu;  // byte j + 4
      const u32 lo = (s0 >> (8 * jj)) & 0xffu;  // byte j - 4
      const u32 hi = (s1 >> (8 * jj)) & 0xffu;  // byte j
      sc = (q8 & 0x0fu) | ((lo >> 6) << 4);
      m = (q8 >> 4) | ((hi >> 6) << 4);
    }
    const float d1 = __fmul_rn(d, (float)sc);
    const float m1 = __fmul_rn(dmin, (float)m);
    const u8 *q = b + 16 + 32 * (j >> 1) + 8 * li;
    const int shift = (j & 1) * 4;
    const u32 qa = ld32(q), qb = ld32(q + 4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      out.w[e] = __fsub_rn(__fmul_rn(d1, (float)((qa >> (8 * e + shift)) & 0x0fu)), m1);
      out.w[4 + e] = __fsub_rn(__fmul_rn(d1, (float)((qb >> (8 * e + shift)) & 0x0fu)), m1);
    }
  }
};

struct QTagQ6_K {
  enum { code = RF_Q6_K, elems = 256, bytes = 210 };
  static __device__ __forceinline__ int o0(int li) { return 8 * li; }
  static __device__ __forceinline__ int o1(int li) { return 8 * li + 4; }
  // Group g is group g % 8 of super-block g / 8; piece li = its weights 8 li .. 8 li + 7.
  static __device__ __forceinline__ void piece(const u8 *row, int g, int li, QPiece &out) {
    const u8 *b = row + (i64)(g >> 3) * 210;
    const int h = (g & 7) >> 2, j = g & 3;
    const float d = f16_to_f32((u16)ld16(b + 208));
    const int si = 8 * h + 2 * j + (li >> 1);
    const u32 sw = ld16(b + 192 + (si & ~1));
    const float dsc = __fmul_rn(d, (float)(int)(signed char)((sw >> (8 * (si & 1))) & 0xffu));
    const u8 *ql = b + 64 * h + 32 * (j & 1) + 8 * li;
    const u8 *qh = b + 128 + 32 * h + 8 * li;
    const int ls = 4 * (j >> 1), hs = 2 * j;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const u32 l2 = ld16(ql + 2 * e), h2 = ld16(qh + 2 * e);
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const u32 lb = (l2 >> (8 * t)) & 0xffu, hb = (h2 >> (8 * t)) & 0xffu;
        const int q = (int)(((lb >> ls) & 0x0fu) | (((hb >> hs) & 3u) << 4)) - 32;
        out.w[2 * e + t] = __fmul_rn(dsc, (float)q);
      }
    }
  }
};

// Bytes of one row of W with leading dimension ldw (elements, a multiple of the block).
template <typename QT>
__device__ __forceinline__ i64 quant_row_bytes(i64 ldw) {
  return ldw / QT::elems * QT::bytes;
}
