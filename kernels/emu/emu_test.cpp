// Executes the training / algebra kernels (lora_backward.cu, adamw.cu, kron.cu, eigen.cu) on the
// CPU emulator (cuda_emu.h) against double-precision references written here from the CPU code's
// formulas (src/train/backward.rs, src/train/mod.rs adam_one, src/adapter/kron.rs,
// src/algebra/eigen.rs). f32, f16 and bf16 data; odd shapes, ld > cols, K / m splits, masks, gains,
// nested and frozen modes. Run: kernels/emu/run.sh (exit status 0 = every check passed).
#include "cuda_emu.h"

#include "../lora_backward.cu"
#include "../adamw.cu"
#include "../kron.cu"
#include "../eigen.cu"
#include "../compose.cu"

#include "emu_util.h"

// ---- LoRA backward ------------------------------------------------------------------------------

struct BwCase {
  int m, n, k, cap, r;
  int x_dt, w_dt, dy_dt, ab_dt, dx_dt;  // dx_dt -1: no dx
  int pad;
  bool gains, use_mask, frozen;
  int ug_splits, ab_splits;
};

static void backward_case(const BwCase &c, uint64_t seed) {
  Rng g(seed);
  const int m = c.m, n = c.n, k = c.k, r = c.r, cap = c.cap;
  Buf x(g, c.x_dt, m, k, c.pad), w(g, c.w_dt, n, k, c.pad), dy(g, c.dy_dt, m, n, c.pad);
  Buf a(g, c.ab_dt, cap, k, 0), b(g, c.ab_dt, n, cap, 0);
  std::vector<float> e(cap);
  for (auto &v : e) v = g.uni(0.5f, 1.5f);
  std::vector<unsigned char> mask(cap), grad(r);
  for (int i = 0; i < cap; ++i) mask[i] = c.use_mask ? (i % 3 != 1) : 1;
  for (int i = 0; i < r; ++i) grad[i] = mask[i] && (!c.frozen || i == r - 1);
  std::vector<float> da(cap * (size_t)k), db((size_t)n * cap), de(cap);
  for (auto &v : da) v = g.uni(-1, 1);
  for (auto &v : db) v = g.uni(-1, 1);
  for (auto &v : de) v = g.uni(-1, 1);
  const auto da0 = da, db0 = db, de0 = de;
  // U and G: garbage when one block owns each element (the kernel must overwrite), zero when split.
  std::vector<float> u((size_t)m * r, c.ug_splits > 1 ? 0.f : NAN), gg((size_t)m * r, c.ug_splits > 1 ? 0.f : NAN);
  const float scale = 2.0f / (float)r;
  std::vector<uint8_t> dxb;
  if (c.dx_dt >= 0) dxb.assign(((size_t)m * (k + c.pad) + 1) * (c.dx_dt == RF_F32 ? 4 : 2), 0x7f);

  BackwardParams p{};
  p.x = x.ptr(); p.w = w.ptr(); p.dy = dy.ptr(); p.a = a.ptr(); p.b = b.ptr();
  p.gains = c.gains ? e.data() : nullptr;
  p.grad = grad.data();
  p.active = c.use_mask ? mask.data() : nullptr;
  p.u = u.data(); p.g = gg.data(); p.da = da.data(); p.db = db.data();
  p.de = c.gains ? de.data() : nullptr;
  p.dx = c.dx_dt >= 0 ? (void *)dxb.data() : nullptr;
  p.ldx = x.ld; p.ldw = w.ld; p.lddy = dy.ld; p.lda = k; p.ldb = cap; p.ldda = k; p.lddb = cap;
  p.lddx = k + c.pad;
  p.m = m; p.n = n; p.k = k; p.r = r;
  p.x_dtype = c.x_dt; p.w_dtype = c.w_dt; p.dy_dtype = c.dy_dt; p.a_dtype = c.ab_dt; p.b_dtype = c.ab_dt;
  p.dx_dtype = c.dx_dt >= 0 ? c.dx_dt : 0;
  p.ug_splits = c.ug_splits;
  p.ug_chunk_k = round16(cdiv(k, c.ug_splits));
  p.ug_chunk_n = round16(cdiv(n, c.ug_splits));
  p.scale = scale;
  auto ug = pick(c.x_dt, lora_backward_ug_f32, lora_backward_ug_f16, lora_backward_ug_bf16);
  emu_launch(ug, dim3{cdiv(r, 64), cdiv(m, 64), (unsigned)(2 * c.ug_splits)}, p);
  bool any = false;
  for (auto v : grad) any |= v != 0;
  if (any && c.gains) emu_launch(lora_backward_de_f32, dim3{(unsigned)r, 1, 1}, p);
  emu_launch(lora_backward_tp_f32, dim3{cdiv(r, 256), (unsigned)std::min(m, 65535), 1}, p);
  if (any) {
    p.ab_splits = c.ab_splits;
    p.ab_chunk_m = round16(cdiv(m, c.ab_splits));
    unsigned sp = cdiv(m, p.ab_chunk_m);
    p.ab_splits = (int)sp;
    auto dbk = pick(c.dy_dt, lora_backward_db_f32, lora_backward_db_f16, lora_backward_db_bf16);
    auto dak = pick(c.x_dt, lora_backward_da_f32, lora_backward_da_f16, lora_backward_da_bf16);
    if (n > 0) emu_launch(dbk, dim3{cdiv(r, 64), cdiv(n, 64), sp}, p);
    if (k > 0) emu_launch(dak, dim3{cdiv(k, 64), cdiv(r, 64), sp}, p);
  }
  if (c.dx_dt >= 0 && k > 0) {
    auto dxk = pick(c.w_dt, lora_backward_dx_f32, lora_backward_dx_f16, lora_backward_dx_bf16);
    emu_launch(dxk, dim3{cdiv(k, 64), cdiv(m, 64), 1}, p);
  }

  // Reference (double), the formulas of src/train/backward.rs `reference`.
  auto eff = [&](int cc) -> double { return !mask[cc] ? 0.0 : (c.gains ? e[cc] : 1.0); };
  std::vector<double> U((size_t)m * r), G((size_t)m * r);
  for (int i = 0; i < m; ++i)
    for (int cc = 0; cc < r; ++cc) {
      double s1 = 0, s2 = 0;
      for (int kk = 0; kk < k; ++kk) s1 += (double)x.at(i, kk) * a.at(cc, kk);
      for (int j = 0; j < n; ++j) s2 += (double)dy.at(i, j) * b.at(j, cc);
      U[(size_t)i * r + cc] = s1;
      G[(size_t)i * r + cc] = s2;
    }
  char tag[200];
  std::snprintf(tag, sizeof tag, "m%d n%d k%d cap%d r%d dt%d/%d/%d/%d/%d pad%d gains%d mask%d frozen%d splits%d/%d", m, n, k,
                cap, r, c.x_dt, c.w_dt, c.dy_dt, c.ab_dt, c.dx_dt, c.pad, c.gains, c.use_mask, c.frozen, c.ug_splits,
                c.ab_splits);
  for (int cc = 0; cc < cap; ++cc) {
    bool on = cc < r && grad[cc];
    for (int kk = 0; kk < k; ++kk) {
      size_t i = (size_t)cc * k + kk;
      if (!on) {
        CHECK(std::memcmp(&da[i], &da0[i], 4) == 0, "%s: dA[%d,%d] touched", tag, cc, kk);
        continue;
      }
      double want = 0;
      for (int ii = 0; ii < m; ++ii) want += scale * G[(size_t)ii * r + cc] * eff(cc) * x.at(ii, kk);
      CHECK(close(da[i], da0[i] + want, 1e-4, 1e-5), "%s: dA[%d,%d] %g vs %g", tag, cc, kk, da[i], da0[i] + want);
    }
    for (int j = 0; j < n; ++j) {
      size_t i = (size_t)j * cap + cc;
      if (!on) {
        CHECK(std::memcmp(&db[i], &db0[i], 4) == 0, "%s: dB[%d,%d] touched", tag, j, cc);
        continue;
      }
      double want = 0;
      for (int ii = 0; ii < m; ++ii) want += dy.at(ii, j) * U[(size_t)ii * r + cc] * eff(cc);
      want *= scale;
      CHECK(close(db[i], db0[i] + want, 1e-4, 1e-5), "%s: dB[%d,%d] %g vs %g", tag, j, cc, db[i], db0[i] + want);
    }
    if (on && c.gains) {
      double want = 0;
      for (int ii = 0; ii < m; ++ii) want += G[(size_t)ii * r + cc] * U[(size_t)ii * r + cc];
      want *= scale;
      CHECK(close(de[cc], de0[cc] + want, 1e-4, 1e-5), "%s: dE[%d] %g vs %g", tag, cc, de[cc], de0[cc] + want);
    } else {
      CHECK(std::memcmp(&de[cc], &de0[cc], 4) == 0, "%s: dE[%d] touched", tag, cc);
    }
  }
  if (c.dx_dt >= 0) {
    double maxabs = 0;
    std::vector<double> want((size_t)m * k);
    for (int i = 0; i < m; ++i)
      for (int kk = 0; kk < k; ++kk) {
        double s = 0;
        for (int j = 0; j < n; ++j) s += (double)dy.at(i, j) * w.at(j, kk);
        for (int cc = 0; cc < r; ++cc) s += scale * G[(size_t)i * r + cc] * eff(cc) * a.at(cc, kk);
        want[(size_t)i * k + kk] = s;
        maxabs = std::max(maxabs, std::fabs(s));
      }
    double rt = rtol_of(c.dx_dt);
    for (int i = 0; i < m; ++i)
      for (int kk = 0; kk < k + c.pad; ++kk) {
        i64 idx = (i64)i * (k + c.pad) + kk;
        if (kk >= k) {
          CHECK(dxb[idx * (c.dx_dt == RF_F32 ? 4 : 2)] == 0x7f, "%s: dx padding written", tag);
          continue;
        }
        float got = load_as_f32(dxb.data(), idx, c.dx_dt);
        double wv = want[(size_t)i * k + kk];
        CHECK(close(got, wv, 4 * rt * maxabs + 1e-6, rt), "%s: dx[%d,%d] %g vs %g", tag, i, kk, got, wv);
      }
  }
}

// ---- AdamW --------------------------------------------------------------------------------------

static void adam_one(float &p, float g, float &m, float &v, float lr, float b1, float b2, float eps, float wd, float bc1,
                     float bc2s) {
  p *= 1.0f - lr * wd;
  m = b1 * m + (1.0f - b1) * g;
  v = b2 * v + (1.0f - b2) * g * g;
  float denom = std::sqrt(v) / bc2s + eps;
  p -= (lr / bc1) * m / denom;
}

static void adamw_case(int rows, int cols, int axis, int copy_dt, float clip, uint64_t seed) {
  Rng g(seed);
  size_t nel = (size_t)rows * cols;
  int ncomp = axis == 0 ? rows : cols;
  std::vector<float> p(nel), gr(nel), m(nel), v(nel);
  for (size_t i = 0; i < nel; ++i) {
    p[i] = g.uni(-1, 1);
    gr[i] = g.uni(-1, 1);
    m[i] = g.uni(-0.1f, 0.1f);
    v[i] = g.uni(0, 0.01f);
  }
  std::vector<unsigned char> upd(ncomp);
  std::vector<float> bc(2 * ncomp);
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.05f;
  for (int c = 0; c < ncomp; ++c) {
    upd[c] = c % 4 != 2;
    int step = 1 + c % 5;
    bc[2 * c] = 1.0f - std::pow(b1, (float)step);
    bc[2 * c + 1] = std::sqrt(1.0f - std::pow(b2, (float)step));
  }
  std::vector<uint8_t> copy(nel * (copy_dt == RF_F32 ? 4 : 2) + 4, 0);
  auto p0 = p, m0 = m, v0 = v;
  AdamwParams q{};
  q.p = p.data(); q.g = gr.data(); q.m = m.data(); q.v = v.data(); q.copy = copy.data(); q.update = upd.data();
  q.bc = bc.data(); q.ld = cols; q.ld_copy = cols; q.rows = rows; q.cols = cols; q.comp_axis = axis;
  q.copy_dtype = copy_dt; q.lr = lr; q.beta1 = b1; q.beta2 = b2; q.eps = eps; q.weight_decay = wd; q.clip = clip;
  auto kern = pick(copy_dt, adamw_f32, adamw_f16, adamw_bf16);
  emu_launch(kern, dim3{cdiv(cols, 256), (unsigned)std::min(rows, 65535), 1}, q);
  for (int rr = 0; rr < rows; ++rr)
    for (int cc = 0; cc < cols; ++cc) {
      size_t i = (size_t)rr * cols + cc;
      int c = axis == 0 ? rr : cc;
      float pw = p0[i], mw = m0[i], vw = v0[i];
      if (upd[c]) adam_one(pw, gr[i] * clip, mw, vw, lr, b1, b2, eps, wd, bc[2 * c], bc[2 * c + 1]);
      CHECK(std::memcmp(&p[i], &pw, 4) == 0 && std::memcmp(&m[i], &mw, 4) == 0 && std::memcmp(&v[i], &vw, 4) == 0,
            "adamw %dx%d axis %d: element %zu differs (%g vs %g)", rows, cols, axis, i, p[i], pw);
      float cv = load_as_f32(copy.data(), (i64)i, copy_dt);
      float cw = copy_dt == RF_F32 ? pw : copy_dt == RF_F16 ? f16_to_f32(f32_to_f16(pw)) : bf16_to_f32(f32_to_bf16(pw));
      CHECK(std::memcmp(&cv, &cw, 4) == 0, "adamw copy %zu: %g vs %g", i, cv, cw);
    }
  // Stats: sum of squares over everything; non-finite among updated components only.
  size_t bad_upd = axis == 0 ? (size_t)std::min(1, rows - 1) * cols + 3 % cols : (size_t)(rows - 1) * cols + 1 % cols;
  int bad_comp = axis == 0 ? (int)(bad_upd / cols) : (int)(bad_upd % cols);
  if (!upd[bad_comp]) return;
  gr[bad_upd] = NAN;
  // An Inf in component 2, which is not updated: not counted.
  size_t skip = axis == 0 ? (size_t)2 * cols : 2;
  bool has_skip = axis == 0 ? rows > 2 : cols > 2;
  if (has_skip) gr[skip] = INFINITY;
  double sum = 0;
  for (size_t i = 0; i < nel; ++i) sum += (double)gr[i] * gr[i];
  double ssq = 0;
  unsigned bad[2] = {0, 0xffffffffu};
  q.sumsq = &ssq;
  q.bad = bad;
  emu_launch(adamw_grad_stats_f32, dim3{cdiv(cols, 256), (unsigned)std::min(rows, 65535), 1}, q);
  CHECK(std::isnan(ssq) && std::isnan(sum), "stats: NaN sum expected");
  std::fflush(stdout);
  CHECK(bad[0] == 1 && bad[1] == (unsigned)bad_comp, "stats: bad %u first %u, expected 1 / %d", bad[0], bad[1], bad_comp);
  gr[bad_upd] = 0.5f;
  if (has_skip) gr[skip] = 0.25f;
  sum = 0;
  for (size_t i = 0; i < nel; ++i) sum += (double)gr[i] * gr[i];
  ssq = 0;
  bad[0] = 0;
  bad[1] = 0xffffffffu;
  emu_launch(adamw_grad_stats_f32, dim3{cdiv(cols, 256), (unsigned)std::min(rows, 65535), 1}, q);
  CHECK(std::fabs(ssq - sum) <= 1e-12 * sum && bad[0] == 0, "stats: %g vs %g, bad %u", ssq, sum, bad[0]);
  auto g0 = gr;
  q.clip = 0.37f;
  emu_launch(adamw_scale_f32, dim3{cdiv(cols, 256), (unsigned)std::min(rows, 65535), 1}, q);
  for (size_t i = 0; i < nel; ++i) {
    float want = g0[i] * 0.37f;
    CHECK(std::memcmp(&gr[i], &want, 4) == 0, "scale %zu", i);
  }
}

// ---- KRAdapter -----------------------------------------------------------------------------------

static void kron_case(int out, int in, int batch, int x_dt, int pad, uint64_t seed) {
  Rng g(seed);
  int mm = std::min(out, in), big = std::max(out, in);
  int r = (int)std::floor(std::sqrt((double)mm));
  while ((r + 1) * (r + 1) <= mm) ++r;
  while (r * r > mm) --r;
  r = std::max(r, 1);
  int d = std::max(0, (big + r - 1) / r - r);
  int wv = r + d;
  // V as m x w (v_si = w) or, on odd seeds, as the rf_lora layout V^T (w x m: v_si = 1, v_sa = m).
  const bool vt = seed % 2 == 1;
  const i64 v_si = vt ? 1 : wv, v_sa = vt ? mm : 1;
  std::vector<float> u((size_t)mm * r), v((size_t)mm * wv);
  for (auto &t : u) t = g.uni(-1, 1);
  for (auto &t : v) t = g.uni(-1, 1);
  auto V = [&](int i, int a) { return v[(size_t)(i * v_si + a * v_sa)]; };
  const float s = 1.5f;
  bool rows = out <= in;
  auto dw0 = [&](int o, int n) -> float {
    int i = rows ? o : n, j = rows ? n : o;
    return V(i, j / r) * u[(size_t)i * r + j % r];
  };
  Buf x(g, x_dt, batch, in, pad);
  // Forward, plain and gathered (every other row, reversed: a mixed batch's slot).
  std::vector<int> gather;
  for (int b = batch - 1; b >= 0; b -= 2) gather.push_back(b);
  for (int mode = 0; mode < 3; ++mode) {
    const bool acc = mode == 1, gath = mode == 2;
    const int nb = gath ? (int)gather.size() : batch;
    std::vector<float> y((size_t)batch * out, 1.0f);
    KronParams p{};
    p.x = x.ptr(); p.u = u.data(); p.v = v.data(); p.y = y.data(); p.ldx = x.ld; p.ldy = out;
    p.v_si = v_si; p.v_sa = v_sa; p.rows = gath ? gather.data() : nullptr;
    p.batch = nb; p.out = out; p.in = in; p.r = r; p.wv = wv; p.rows_are_slices = rows; p.x_dtype = x_dt;
    p.y_dtype = RF_F32; p.accumulate = acc || gath; p.scale = s; p.sign = 1;
    emu_launch(pick(x_dt, kron_forward_f32, kron_forward_f16, kron_forward_bf16), dim3{cdiv(out, 64), cdiv(nb, 64), 1}, p);
    for (int bb = 0; bb < batch; ++bb) {
      const bool hit = !gath || (batch - 1 - bb) % 2 == 0;
      for (int o = 0; o < out; ++o) {
        double want = 0;
        if (hit)
          for (int n = 0; n < in; ++n) want += (double)x.at(bb, n) * dw0(o, n);
        want = s * want + ((acc || gath) ? 1.0 : 0.0);
        float got = y[(size_t)bb * out + o];
        CHECK(close(got, want, 1e-4, 1e-5), "kron fwd %dx%d b%d mode%d vt%d [%d,%d]: %g vs %g", out, in, batch, mode, vt, bb, o, got, want);
      }
    }
  }
  // Backward: dU, dV (accumulated onto nonzero values) and dx with and without W.
  {
    const int dy_dt = (x_dt + 1) % 3, w_dt = (x_dt + 2) % 3, dx_dt = (x_dt + (int)seed) % 3;
    Buf dy(g, dy_dt, batch, out, pad), w(g, w_dt, out, in, 1);
    std::vector<float> du((size_t)mm * r), dv((size_t)mm * wv);
    for (auto &t : du) t = g.uni(-1, 1);
    for (auto &t : dv) t = g.uni(-1, 1);
    const auto du0 = du, dv0 = dv;
    for (int with_w = 0; with_w < 2; ++with_w) {
      std::vector<uint8_t> dxb(((size_t)batch * (in + 1) + 1) * (dx_dt == RF_F32 ? 4 : 2), 0);
      KronParams p{};
      p.x = x.ptr(); p.u = u.data(); p.v = v.data(); p.w = with_w ? w.ptr() : nullptr; p.dy = dy.ptr();
      p.du = du.data(); p.dv = dv.data(); p.dx = dxb.data();
      p.ldx = x.ld; p.ldw = w.ld; p.lddy = dy.ld; p.lddx = in + 1; p.v_si = v_si; p.v_sa = v_sa;
      p.batch = batch; p.out = out; p.in = in; p.r = r; p.wv = wv; p.rows_are_slices = rows;
      p.x_dtype = x_dt; p.w_dtype = w_dt; p.dy_dtype = dy_dt; p.dx_dtype = dx_dt; p.scale = s;
      if (with_w == 0)
        emu_launch(pick(x_dt, kron_backward_uv_f32, kron_backward_uv_f16, kron_backward_uv_bf16), dim3{cdiv(in, 64), cdiv(out, 64), 1}, p);
      emu_launch(pick(with_w ? w_dt : RF_F32, kron_backward_dx_f32, kron_backward_dx_f16, kron_backward_dx_bf16),
                 dim3{cdiv(in, 64), cdiv(batch, 64), 1}, p);
      for (int bb = 0; bb < batch; ++bb)
        for (int n = 0; n < in; ++n) {
          double want = 0, mag = 0;
          for (int o = 0; o < out; ++o) {
            double b = (double)s * dw0(o, n) + (with_w ? (double)w.at(o, n) : 0.0);
            want += (double)dy.at(bb, o) * b;
            mag += std::fabs((double)dy.at(bb, o) * b);
          }
          float got = load_as_f32(dxb.data(), (i64)bb * (in + 1) + n, dx_dt);
          CHECK(close(got, want, 1e-5 * mag + 1e-6, rtol_of(dx_dt)), "kron dx %dx%d b%d w%d [%d,%d]: %g vs %g", out, in, batch, with_w, bb, n, got, want);
        }
    }
    for (int i = 0; i < mm; ++i) {
      // G_i[j] = sum_b dy[b, o] x[b, n] for slice element j.
      std::vector<double> gi(big, 0.0), gabs(big, 0.0);
      for (int j = 0; j < big; ++j) {
        const int o = rows ? i : j, n = rows ? j : i;
        for (int bb = 0; bb < batch; ++bb) {
          gi[j] += (double)dy.at(bb, o) * x.at(bb, n);
          gabs[j] += std::fabs((double)dy.at(bb, o) * x.at(bb, n));
        }
      }
      for (int c = 0; c < r; ++c) {
        double want = du0[(size_t)i * r + c], mag = std::fabs(want);
        for (int j = c; j < big; j += r) {
          want += (double)s * gi[j] * V(i, j / r);
          mag += s * gabs[j] * std::fabs(V(i, j / r));
        }
        float got = du[(size_t)i * r + c];
        CHECK(close(got, want, 1e-5 * mag + 1e-6, 0), "kron dU %dx%d [%d,%d]: %g vs %g", out, in, i, c, got, want);
      }
      for (int a = 0; a < wv; ++a) {
        double want = dv0[(size_t)i * wv + a], mag = std::fabs(want);
        for (int j = a * r; j < std::min(big, (a + 1) * r); ++j) {
          want += (double)s * gi[j] * u[(size_t)i * r + j % r];
          mag += s * gabs[j] * std::fabs(u[(size_t)i * r + j % r]);
        }
        float got = dv[(size_t)i * wv + a];
        CHECK(close(got, want, 1e-5 * mag + 1e-6, 0), "kron dV %dx%d [%d,%d]: %g vs %g", out, in, i, a, got, want);
      }
    }
  }
  for (int sign = -1; sign <= 1; sign += 2) {
    const int w_dt = (sign + 1 + out) % 3;  // f32, f16, bf16 across cases
    Buf w(g, w_dt, out, in, 2);
    KronParams p{};
    p.u = u.data(); p.v = v.data(); p.w = w.ptr(); p.ldw = w.ld; p.out = out; p.in = in; p.r = r; p.wv = wv;
    p.v_si = v_si; p.v_sa = v_sa;
    p.rows_are_slices = rows; p.w_dtype = w_dt; p.scale = s; p.sign = (float)sign;
    auto before = w.vals;
    emu_launch(pick(w_dt, kron_merge_f32, kron_merge_f16, kron_merge_bf16), dim3{cdiv(in, 256), (unsigned)std::min(out, 65535), 1}, p);
    for (int o = 0; o < out; ++o)
      for (int n = 0; n < in + 2; ++n) {
        size_t i = (size_t)o * w.ld + n;
        float got = w.stored(i);
        float want = before[i];
        if (n < in) {
          const float sum = before[i] + (float)sign * (s * dw0(o, n));
          want = w_dt == RF_F32 ? sum : w_dt == RF_F16 ? f16_to_f32(f32_to_f16(sum)) : bf16_to_f32(f32_to_bf16(sum));
        }
        CHECK(std::memcmp(&got, &want, 4) == 0, "kron merge %dx%d [%d,%d]: %g vs %g", out, in, o, n, got, want);
      }
  }
}

// ---- EigenLoRAx ---------------------------------------------------------------------------------

static void eigen_case(int m, int n, int in, int kc, int ncores, bool mixed, int x_dt, int y_dt, uint64_t seed) {
  Rng g(seed);
  Buf x(g, x_dt, m, in, 1);
  std::vector<float> ca((size_t)in * kc), cb((size_t)n * kc), cores((size_t)std::max(ncores, 1) * kc * kc),
      base((size_t)m * n), z((size_t)m * kc, NAN), uu((size_t)m * kc, NAN);
  for (auto &t : ca) t = g.uni(-0.5f, 0.5f);
  for (auto &t : cb) t = g.uni(-0.5f, 0.5f);
  for (auto &t : cores) t = g.uni(-0.5f, 0.5f);
  for (auto &t : base) t = g.uni(-1, 1);
  const auto base0 = base;
  std::vector<int> rs(m);
  for (int i = 0; i < m; ++i) rs[i] = (i % (ncores + 1)) - 1;
  std::vector<uint8_t> y((size_t)m * n * (y_dt == RF_F32 ? 4 : 2) + 4, 0);
  EigenParams p{};
  p.x = x.ptr(); p.c_a = ca.data(); p.c_b = cb.data(); p.cores = cores.data(); p.row_slot = mixed ? rs.data() : nullptr;
  p.z = z.data(); p.u = uu.data(); p.base = base.data(); p.y = y.data(); p.ldx = x.ld; p.ldcb = kc;
  // C_A row-major (in x K), or on odd seeds read as C_A^T (K x in row-major, the basis' ca_t).
  std::vector<float> ca_t((size_t)in * kc);
  for (int kk = 0; kk < in; ++kk)
    for (int c = 0; c < kc; ++c) ca_t[(size_t)c * in + kk] = ca[(size_t)kk * kc + c];
  if (seed % 2 == 1) { p.c_a = ca_t.data(); p.ca_rs = 1; p.ca_cs = in; } else { p.ca_rs = kc; p.ca_cs = 1; }
  p.ldbase = n; p.ldy = n; p.m = m; p.n = n; p.in = in; p.kc = kc; p.n_cores = ncores; p.x_dtype = x_dt; p.y_dtype = y_dt;
  emu_launch(pick(x_dt, eigen_project_f32, eigen_project_f16, eigen_project_bf16), dim3{cdiv(kc, 64), cdiv(m, 64), 1}, p);
  emu_launch(eigen_core_f32, dim3{cdiv(kc, 256), (unsigned)std::min(m, 65535), 1}, p);
  // Odd seeds: to_base (the base accumulates, y untouched), then compose_store rounds it into y.
  const bool to_base = seed % 2 == 1;
  p.to_base = to_base;
  emu_launch(pick(y_dt, eigen_expand_f32, eigen_expand_f16, eigen_expand_bf16), dim3{cdiv(n, 64), cdiv(m, 64), 1}, p);
  if (to_base) {
    for (size_t i = 0; i < y.size(); ++i) CHECK(y[i] == 0, "eigen to_base wrote y");
    ComposeParams cp{};
    cp.src = base.data(); cp.y = y.data(); cp.lds = n; cp.ldy = n; cp.m = m; cp.n = n; cp.y_dtype = y_dt;
    emu_launch(pick(y_dt, compose_store_f32, compose_store_f16, compose_store_bf16), dim3{cdiv(n, 256), (unsigned)std::min(m, 65535), 1}, cp);
  }
  double rt = rtol_of(y_dt);
  for (int i = 0; i < m; ++i) {
    int s = mixed ? rs[i] : 0;
    std::vector<double> zi(kc, 0), ui(kc, 0);
    for (int c = 0; c < kc; ++c)
      for (int kk = 0; kk < in; ++kk) zi[c] += (double)x.at(i, kk) * ca[(size_t)kk * kc + c];
    if (s >= 0)
      for (int j = 0; j < kc; ++j)
        for (int c = 0; c < kc; ++c) ui[j] += zi[c] * cores[(size_t)s * kc * kc + (size_t)c * kc + j];
    for (int j = 0; j < n; ++j) {
      double want = base0[(size_t)i * n + j];
      for (int c = 0; c < kc; ++c) want += ui[c] * cb[(size_t)j * kc + c];
      float got = load_as_f32(y.data(), (i64)i * n + j, y_dt);
      CHECK(close(got, want, 1e-4, rt), "eigen m%d n%d in%d K%d mixed%d [%d,%d]: %g vs %g", m, n, in, kc, mixed, i, j, got, want);
    }
  }
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  const int F = RF_F32, H = RF_F16, B = RF_BF16;
  const int dts[3] = {F, H, B};
  int seed = 1;
  // Backward: every rank of capacities 1, 5 and 17, both modes, masks, gains, dtype mixes, pads.
  for (int cap : {1, 5, 17})
    for (int r = 1; r <= cap; ++r)
      for (int frozen = 0; frozen < 2; ++frozen) {
        int i = seed;
        BwCase c{};
        c.m = (int[]){1, 7, 33, 70}[i % 4];
        c.n = (int[]){3, 17, 65}[i % 3];
        c.k = (int[]){5, 31, 129}[(i / 3) % 3];
        c.cap = cap; c.r = r;
        c.x_dt = dts[i % 3]; c.w_dt = dts[(i / 2) % 3]; c.dy_dt = dts[(i / 3) % 3]; c.ab_dt = dts[(i / 5) % 3];
        c.dx_dt = dts[(i / 7) % 3];
        c.pad = i % 3; c.gains = i % 4 < 2; c.use_mask = cap > 2 && i % 2 == 0; c.frozen = frozen;
        c.ug_splits = 1 + i % 3; c.ab_splits = 1 + (i / 2) % 3;
        backward_case(c, seed++);
      }
  // Larger: several tiles per dimension, splits, no dx, empty k.
  backward_case({130, 70, 200, 70, 66, F, F, F, F, F, 1, true, true, false, 4, 3}, seed++);
  backward_case({65, 129, 97, 20, 20, B, B, B, B, B, 0, false, false, false, 1, 1}, seed++);
  backward_case({9, 17, 33, 5, 4, F, B, F, B, -1, 2, true, false, true, 2, 2}, seed++);
  backward_case({66, 65, 70, 9, 8, H, H, H, H, H, 1, true, true, false, 3, 2}, seed++);
  backward_case({9, 17, 0, 5, 4, F, F, F, F, F, 1, true, true, false, 2, 2}, seed++);
  std::printf("backward: %ld checks, %d failures\n", checks, failures);
  for (int axis = 0; axis < 2; ++axis)
    for (auto [rows, cols] : {std::pair{6, 37}, std::pair{29, 6}, std::pair{1, 6}, std::pair{3, 300}, std::pair{70, 5}})
      for (int cdt : {F, H, B}) adamw_case(rows, cols, axis, cdt, cdt == F ? 1.0f : 0.5f, seed++);
  std::printf("+ adamw: %ld checks, %d failures\n", checks, failures);
  for (auto [o, in] : {std::pair{4, 6}, std::pair{6, 4}, std::pair{5, 7}, std::pair{7, 5}, std::pair{33, 100}, std::pair{100, 33},
                       std::pair{64, 64}, std::pair{130, 70}})
    for (int xdt : {F, H, B}) kron_case(o, in, xdt == F ? 3 : 67, xdt, xdt == F ? 0 : 3, seed++);
  std::printf("+ kron: %ld checks, %d failures\n", checks, failures);
  for (int mixed = 0; mixed < 2; ++mixed) {
    eigen_case(7, 40, 48, 6, 3, mixed, F, F, seed++);
    eigen_case(70, 129, 65, 17, 4, mixed, B, B, seed++);
    eigen_case(1, 33, 300, 64, 1, mixed, F, B, seed++);
    eigen_case(3, 5, 7, 0, 2, mixed, F, F, seed++);
    eigen_case(9, 20, 30, 8, 2, mixed, H, H, seed++);
  }
  std::printf("+ eigen: %ld checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
