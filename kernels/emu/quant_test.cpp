// Executes the block-quantized linear kernels (quant_linear.cu: quant_decode_*, quant_linear_*),
// with lora_shrink.cu computing T and decode.cu's epilogue adding K splits, on the CPU emulator
// (cuda_emu.h) against a double-precision reference on W dequantized exactly as ggml-quants.c
// (`d * q`, `d * (q - 8)`, `(d * sc) * q - dmin * m`, `(d * sc) * (q - 32)`, f32 operations, no
// FMA).
//
// Layouts are tied to src/quant.rs by quant_vectors.txt (blocks and their dequantized f32 bits,
// written and checked by the Rust test `backend::cuda::quant::tests::emulator_vectors_are_src_quant`):
// both this file's reference and the kernels' block decoder must reproduce them bit for bit.
// Then: one-hot x rows read single weights through both kernels (bit-exact), and random problems
// over Q8_0 / Q4_0 / Q4_K / Q6_K, odd n, ld > cols, m = 1..8 (one split, K splits, staged x) and m > 8,
// stacked and mixed slots with ranks above 32, gains, bias, every x / y / B dtype.
#include "cuda_emu.h"

#include "../quant_linear.cu"
#include "../lora_shrink.cu"
#include "../decode.cu"

#include "emu_util.h"

#include <fstream>
#include <sstream>

static int elems_of(int qt) { return qt == RF_Q4_K || qt == RF_Q6_K ? 256 : 32; }
static int bytes_of(int qt) { return qt == RF_Q8_0 ? 34 : qt == RF_Q4_0 ? 18 : qt == RF_Q4_K ? 144 : 210; }
static const char *name_of(int qt) {
  return qt == RF_Q8_0 ? "Q8_0" : qt == RF_Q4_0 ? "Q4_0" : qt == RF_Q4_K ? "Q4_K" : "Q6_K";
}
// Byte offset of the f16 scale d in a block.
static int d_at(int qt) { return qt == RF_Q6_K ? 208 : 0; }

static float h2f(const uint8_t *p) { return f16_to_f32((u16)(p[0] | (p[1] << 8))); }

// ggml-quants.c dequantize_row_q8_0 / q4_0 / q4_K / q6_K for one block, written from the C source.
static void ref_block(int qt, const uint8_t *b, float *y) {
  if (qt == RF_Q6_K) {
    const float d = h2f(b + 208);
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    for (int n = 0; n < 256; n += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int8_t q1 = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int8_t q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int8_t q3 = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int8_t q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * sc[is + 0] * q1;
        y[l + 32] = d * sc[is + 2] * q2;
        y[l + 64] = d * sc[is + 4] * q3;
        y[l + 96] = d * sc[is + 6] * q4;
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
    return;
  }
  if (qt == RF_Q8_0) {
    const float d = h2f(b);
    for (int j = 0; j < 32; ++j) y[j] = (float)(int8_t)b[2 + j] * d;
  } else if (qt == RF_Q4_0) {
    const float d = h2f(b);
    for (int j = 0; j < 16; ++j) {
      const int x0 = (b[2 + j] & 0x0F) - 8, x1 = (b[2 + j] >> 4) - 8;
      y[j] = (float)x0 * d;
      y[j + 16] = (float)x1 * d;
    }
  } else {
    const float d = h2f(b), min = h2f(b + 2);
    const uint8_t *sc_bytes = b + 4, *q = b + 16;
    auto get_scale_min_k4 = [&](int j, uint8_t &sc, uint8_t &m) {
      if (j < 4) {
        sc = sc_bytes[j] & 63;
        m = sc_bytes[j + 4] & 63;
      } else {
        sc = (sc_bytes[j + 4] & 0xF) | ((sc_bytes[j - 4] >> 6) << 4);
        m = (sc_bytes[j + 4] >> 4) | ((sc_bytes[j - 0] >> 6) << 4);
      }
    };
    int is = 0;
    for (int j = 0; j < 256; j += 64) {
      uint8_t sc, m;
      get_scale_min_k4(is + 0, sc, m);
      const float d1 = d * sc, m1 = min * m;
      get_scale_min_k4(is + 1, sc, m);
      const float d2 = d * sc, m2 = min * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
      q += 32;
      is += 2;
    }
  }
}

// Every weight of group g of a row through the kernels' decoder (all 4 pieces).
static void kernel_group(int qt, const uint8_t *row, int g, float *out32) {
  for (int li = 0; li < 4; ++li) {
    QPiece pc;
    int o0, o1;
    if (qt == RF_Q8_0) {
      QTagQ8_0::piece(row, g, li, pc);
      o0 = QTagQ8_0::o0(li), o1 = QTagQ8_0::o1(li);
    } else if (qt == RF_Q4_0) {
      QTagQ4_0::piece(row, g, li, pc);
      o0 = QTagQ4_0::o0(li), o1 = QTagQ4_0::o1(li);
    } else if (qt == RF_Q4_K) {
      QTagQ4_K::piece(row, g, li, pc);
      o0 = QTagQ4_K::o0(li), o1 = QTagQ4_K::o1(li);
    } else {
      QTagQ6_K::piece(row, g, li, pc);
      o0 = QTagQ6_K::o0(li), o1 = QTagQ6_K::o1(li);
    }
    for (int e = 0; e < 4; ++e) {
      out32[o0 + e] = pc.w[e];
      out32[o1 + e] = pc.w[4 + e];
    }
  }
}

static uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// quant_vectors.txt: "<type> <block bytes, hex> <f32 bits of each weight, hex>..." per line.
static void vectors_case() {
  std::ifstream in("quant_vectors.txt");
  CHECK(in.good(), "quant_vectors.txt not found (run from kernels/emu)");
  std::string line;
  int blocks = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string type, hex;
    ls >> type >> hex;
    const int qt = type == "Q8_0"   ? RF_Q8_0
                   : type == "Q4_0" ? RF_Q4_0
                   : type == "Q4_K" ? RF_Q4_K
                   : type == "Q6_K" ? RF_Q6_K
                                    : -1;
    CHECK(qt >= 0, "unknown type %s", type.c_str());
    if (qt < 0) continue;
    CHECK((int)hex.size() == 2 * bytes_of(qt), "%s block of %zu hex digits", type.c_str(), hex.size());
    // 4-byte aligned copy, as a block is on the device (the kernels load 16 / 32-bit words).
    std::vector<uint32_t> store(64);
    uint8_t *b = (uint8_t *)store.data();
    for (int i = 0; i < bytes_of(qt); ++i) b[i] = (uint8_t)std::stoul(hex.substr(2 * i, 2), nullptr, 16);
    std::vector<float> want(elems_of(qt)), ref(elems_of(qt)), ker(elems_of(qt));
    for (auto &w : want) {
      std::string v;
      ls >> v;
      const uint32_t u = (uint32_t)std::stoul(v, nullptr, 16);
      std::memcpy(&w, &u, 4);
    }
    ref_block(qt, b, ref.data());
    for (int g = 0; g < elems_of(qt) / 32; ++g) kernel_group(qt, b, g, ker.data() + 32 * g);
    for (int i = 0; i < elems_of(qt); ++i) {
      CHECK(bits(ref[i]) == bits(want[i]), "%s block %d [%d]: reference %08x, src/quant.rs %08x", type.c_str(), blocks, i,
            bits(ref[i]), bits(want[i]));
      CHECK(bits(ker[i]) == bits(want[i]), "%s block %d [%d]: kernel %08x, src/quant.rs %08x", type.c_str(), blocks, i,
            bits(ker[i]), bits(want[i]));
    }
    ++blocks;
  }
  CHECK(blocks >= 9, "only %d vectors", blocks);
}

// rows x ld elements of random blocks (4-byte aligned storage), f16 scales small and finite (as
// tests/quant_linear.rs): random scale bytes could be NaN / inf.
struct QBuf {
  int qt, rows, cols, ld;
  std::vector<uint32_t> store;
  uint8_t *bytes() { return (uint8_t *)store.data(); }
  size_t row_bytes() const { return (size_t)ld / elems_of(qt) * bytes_of(qt); }
  QBuf(Rng &g, int qt_, int rows_, int cols_, int ld_) : qt(qt_), rows(rows_), cols(cols_), ld(ld_) {
    store.assign((rows * row_bytes() + 3) / 4 + 1, 0);
    uint8_t *p = bytes();
    const int nb = rows * (ld / elems_of(qt));
    for (int blk = 0; blk < nb; ++blk) {
      uint8_t *b = p + (size_t)blk * bytes_of(qt);
      for (int i = 0; i < bytes_of(qt); ++i) b[i] = (uint8_t)g.next();
      // Q6_K: d 32x smaller keeps |w| <= 4 (i8 scales times q - 32), as Q8_0's.
      u16 d = f32_to_f16(g.uni(0.002f, 0.03f) * (qt == RF_Q6_K ? 1.f / 32 : 1.f));
      std::memcpy(b + d_at(qt), &d, 2);
      if (qt == RF_Q4_K) {
        u16 dm = f32_to_f16(g.uni(0.f, 0.02f));
        std::memcpy(b + 2, &dm, 2);
      }
    }
  }
  // Row r dequantized by the reference (cols elements).
  std::vector<float> deq(int r) {
    std::vector<float> out(ld);
    for (int blk = 0; blk < ld / elems_of(qt); ++blk)
      ref_block(qt, bytes() + r * row_bytes() + (size_t)blk * bytes_of(qt), out.data() + blk * elems_of(qt));
    out.resize(cols);
    return out;
  }
};

static int stage_of(int m) { return 8192 / m / 256 * 256; }

struct QCase {
  int qt, m, n, k;
  int x_dt, y_dt, b_dt;
  std::vector<int> ranks;
  bool mixed, bias, gains;
  int k_chunk;      // decode: elements per split (a multiple of 256); 0 = one split
  bool one_hot;     // x rows are unit vectors, no adapters or bias: y must equal W bit for bit
};

static void quant_case(const QCase &c, uint64_t seed) {
  Rng g(seed);
  const int m = c.m, n = c.n, k = c.k, be = elems_of(c.qt);
  const int ld = k + be;  // rows addressed by whole blocks of ld, not of cols
  QBuf w(g, c.qt, n, k, ld);
  Buf x(g, c.x_dt, m, k, 3);
  std::vector<int> hot(m);
  if (c.one_hot) {
    for (int i = 0; i < m; ++i) {
      hot[i] = (int)(g.next() % k);
      for (int kk = 0; kk < k; ++kk) {
        const float v = kk == hot[i] ? 1.f : 0.f;
        store_from_f32(x.ptr(), (i64)i * x.ld + kk, c.x_dt, v);
        x.vals[(size_t)i * x.ld + kk] = v;
      }
    }
  }
  Buf bias(g, c.y_dt, 1, n, 0);
  const int ns = (int)c.ranks.size();
  std::vector<Buf> a, b, gains;
  std::vector<float> scale(ns);
  for (int s = 0; s < ns; ++s) {
    a.emplace_back(g, c.b_dt, c.ranks[s], k, 1);
    b.emplace_back(g, c.b_dt, n, c.ranks[s], 2);
    gains.emplace_back(g, RF_F32, 1, c.ranks[s], 0, 0.5f, 1.5f);
    scale[s] = 2.f / c.ranks[s];
  }
  std::vector<int> rs(m);
  for (int i = 0; i < m; ++i) rs[i] = c.mixed ? (int)(g.next() % (ns + 1)) - 1 : -2;

  // Reference (f64 over the exactly dequantized W).
  std::vector<double> want((size_t)m * n);
  std::vector<std::vector<float>> wd(n);
  for (int j = 0; j < n; ++j) wd[j] = w.deq(j);
  for (int i = 0; i < m; ++i) {
    std::vector<std::vector<double>> t(ns);
    for (int s = 0; s < ns; ++s) {
      t[s].assign(c.ranks[s], 0.0);
      if (c.mixed && rs[i] != s) continue;
      for (int cc = 0; cc < c.ranks[s]; ++cc) {
        double acc = 0;
        for (int kk = 0; kk < k; ++kk) acc += (double)x.at(i, kk) * a[s].at(cc, kk);
        t[s][cc] = acc * scale[s] * (c.gains ? gains[s].at(0, cc) : 1.0);
      }
    }
    for (int j = 0; j < n; ++j) {
      double acc = 0;
      for (int kk = 0; kk < k; ++kk) acc += (double)x.at(i, kk) * wd[j][kk];
      if (c.bias) acc += bias.at(0, j);
      for (int s = 0; s < ns; ++s)
        for (int cc = 0; cc < c.ranks[s]; ++cc) acc += t[s][cc] * b[s].at(j, cc);
      want[(size_t)i * n + j] = acc;
    }
  }

  // The host's grouping (launch::group_rows): compact slots with rows, perm lists rows per slot.
  std::vector<int> active;
  for (int s = 0; s < ns; ++s) {
    bool used = !c.mixed;
    for (int i = 0; i < m; ++i) used |= rs[i] == s;
    if (used) active.push_back(s);
  }
  std::vector<int> compact(ns, -1), mapped(m, -1), perm;
  for (size_t q = 0; q < active.size(); ++q) compact[active[q]] = (int)q;
  std::vector<std::pair<int, int>> seg(active.size());
  for (size_t q = 0; q < active.size(); ++q) {
    seg[q].first = (int)perm.size();
    for (int i = 0; i < m; ++i)
      if (!c.mixed || rs[i] == active[q]) {
        if (c.mixed) perm.push_back(i);
        ++seg[q].second;
      }
    if (!c.mixed) seg[q] = {0, m};
  }
  for (int i = 0; i < m; ++i) mapped[i] = rs[i] >= 0 ? compact[rs[i]] : -1;
  int total = 0, max_rank = 0, max_seg = 0;
  LinearParams p{};
  for (size_t q = 0; q < active.size(); ++q) {
    const int s = active[q];
    SlotParams &sp = p.slots[q];
    sp.a = a[s].ptr();
    sp.b = b[s].ptr();
    sp.gains = c.gains ? gains[s].ptr() : nullptr;
    sp.lda = a[s].ld;
    sp.ldb = b[s].ld;
    sp.rank = c.ranks[s];
    sp.off = total;
    sp.a_dtype = c.b_dt;
    sp.b_dtype = c.b_dt;
    sp.gains_dtype = c.gains ? RF_F32 : RF_NONE;
    sp.seg_start = seg[q].first;
    sp.seg_len = seg[q].second;
    sp.scale = scale[s];
    total += c.ranks[s];
    max_rank = std::max(max_rank, c.ranks[s]);
    max_seg = std::max(max_seg, seg[q].second);
  }
  std::vector<float> t((size_t)m * std::max(total, 1), 0.f);
  const int ldy = n + 2;
  std::vector<uint8_t> y((size_t)m * ldy * 4 + 4);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < ldy; ++j) store_from_f32(y.data(), (i64)i * ldy + j, c.y_dt, 7.f);
  p.x = x.ptr();
  p.w = w.bytes();
  p.bias = c.bias ? bias.ptr() : nullptr;
  p.y = y.data();
  p.t = total ? t.data() : nullptr;
  p.row_slot = c.mixed ? mapped.data() : nullptr;
  p.perm = c.mixed ? perm.data() : nullptr;
  p.ldx = x.ld;
  p.ldw = ld;
  p.ldy = ldy;
  p.ldt = total;
  p.m = m;
  p.n = n;
  p.k = k;
  p.x_dtype = c.x_dt;
  p.w_dtype = c.qt;
  p.bias_dtype = c.bias ? c.y_dt : RF_NONE;
  p.y_dtype = c.y_dt;
  p.n_slots = (int)active.size();
  p.total_rank = total;

  if (total > 0 && max_seg > 0 && k > 0) {
    const int kc = 64, ksplits = (k + kc - 1) / kc;
    p.shrink_k_chunk = kc;
    p.shrink_c_chunks = (max_rank + 31) / 32;
    auto shrink = pick(c.x_dt, lora_shrink_f32, lora_shrink_f16, lora_shrink_bf16);
    emu_launch(shrink, dim3{cdiv(max_seg, 64), (unsigned)active.size(), (unsigned)(p.shrink_c_chunks * ksplits)}, p);
  }
  std::vector<float> partial;
  if (m <= 8) {
    p.k_chunk = c.k_chunk ? c.k_chunk : std::max(256, (k + 255) / 256 * 256);
    p.splits = k ? (k + p.k_chunk - 1) / p.k_chunk : 1;
    partial.assign((size_t)p.splits * m * n, NAN);
    p.partial = partial.data();
    const size_t smem = (size_t)m * std::min(p.k_chunk, stage_of(m)) * 4;
    auto dec = c.qt == RF_Q8_0   ? quant_decode_q8_0
               : c.qt == RF_Q4_0 ? quant_decode_q4_0
               : c.qt == RF_Q4_K ? quant_decode_q4_k
                                 : quant_decode_q6_k;
    emu_launch(dec, dim3{cdiv(n, 16), (unsigned)p.splits, 1}, p, smem);
    if (p.splits > 1) {
      auto epi = pick(c.y_dt, decode_epilogue_f32, decode_epilogue_f16, decode_epilogue_bf16);
      emu_launch(epi, dim3{cdiv(n, 256), (unsigned)m, 1}, p);
    }
  } else {
    auto gemm = c.qt == RF_Q8_0   ? quant_linear_q8_0
                : c.qt == RF_Q4_0 ? quant_linear_q4_0
                : c.qt == RF_Q4_K ? quant_linear_q4_k
                                  : quant_linear_q6_k;
    emu_launch(gemm, dim3{cdiv(n, 64), cdiv(m, 64), 1}, p);
  }

  double maxref = 1.0;
  for (double v : want) maxref = std::max(maxref, std::fabs(v));
  const double rt = std::max(rtol_of(c.y_dt), 1e-5);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < ldy; ++j) {
      const float got = load_as_f32(y.data(), (i64)i * ldy + j, c.y_dt);
      if (j >= n) {
        CHECK(got == 7.f, "%s m=%d n=%d k=%d: padding y[%d][%d] overwritten", name_of(c.qt), m, n, k, i, j);
        continue;
      }
      if (c.one_hot) {
        // Bit for bit, except that a weight of -0 (Q6_K: (q - 32) = 0 times a negative d * sc)
        // reads back as +0: the accumulation starts at +0 and +0 + -0 = +0.
        const float wv = wd[j][hot[i]];
        CHECK(bits(got) == bits(wv) || (got == 0.f && wv == 0.f), "%s m=%d one-hot y[%d][%d] = %08x, W[%d][%d] = %08x", name_of(c.qt), m, i,
              j, bits(got), j, hot[i], bits(wd[j][hot[i]]));
        continue;
      }
      const double r = want[(size_t)i * n + j];
      CHECK(close(got, r, 4 * rt * maxref, rt), "%s m=%d n=%d k=%d x%d y%d b%d mixed=%d chunk=%d: y[%d][%d] = %g, reference %g",
            name_of(c.qt), m, n, k, c.x_dt, c.y_dt, c.b_dt, (int)c.mixed, c.k_chunk, i, j, got, r);
    }
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  const int F = RF_F32, H = RF_F16, B = RF_BF16;
  vectors_case();
  std::printf("quant vectors: %ld checks, %d failures\n", checks, failures);
  uint64_t seed = 1;
  for (int qt : {RF_Q8_0, RF_Q4_0, RF_Q4_K, RF_Q6_K}) {
    const bool kq = qt == RF_Q4_K || qt == RF_Q6_K;
    const int k1 = kq ? 512 : 96;     // Q8_0 / Q4_0: fewer groups than a warp step
    const int k2 = kq ? 1280 : 800;   // m = 8 stages x in 1024-element chunks
    // Exactness: unit x rows pick single weights through decode and GEMM.
    quant_case({qt, 8, 19, k2, F, F, F, {}, false, false, false, 0, true}, seed++);
    quant_case({qt, 70, 67, k1, F, F, F, {}, false, false, false, 0, true}, seed++);
    // Decode: one split (expand in the CTA), K splits (epilogue), staged x, every dtype.
    quant_case({qt, 1, 37, k1, F, F, F, {8}, false, true, false, 0, false}, seed++);
    quant_case({qt, 3, 37, k2, H, B, F, {3, 40}, true, true, true, 0, false}, seed++);
    quant_case({qt, 8, 21, k2, B, H, B, {5, 33, 1}, true, false, false, 0, false}, seed++);
    quant_case({qt, 5, 37, k2, F, F, H, {16, 2}, false, true, true, 256, false}, seed++);
    quant_case({qt, 2, 17, k2, H, F, F, {4, 7}, true, true, false, 512, false}, seed++);
    // GEMM: two column tiles, two row tiles, mixed and stacked slots.
    quant_case({qt, 9, 67, k1, F, F, F, {8}, false, true, true, 0, false}, seed++);
    quant_case({qt, 70, 130, k1, B, H, B, {3, 40, 1}, true, true, false, 0, false}, seed++);
    quant_case({qt, 33, 65, k2, H, B, F, {33, 2}, false, false, true, 0, false}, seed++);
    std::printf("+ %s: %ld checks, %d failures\n", name_of(qt), checks, failures);
  }
  return failures == 0 ? 0 : 1;
}
