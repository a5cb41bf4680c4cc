// Tests of include/rankfuse.hpp against the PEFT fixture: parity of every module for the three
// adapters, a mixed batch, strided views, and errors as rankfuse::Error with status + message.
// Built and run by .ci/steps/50-install-and-examples.sh. Usage: ./test FIXTURE_DIR
#include <rankfuse.hpp>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

static int passed = 0, failed = 0;

static void test(const char *name, const std::function<void()> &body) {
  try {
    body();
    ++passed;
  } catch (const std::exception &e) {
    ++failed;
    std::printf("FAIL %s: %s\n", name, e.what());
  }
}

static void expect(bool ok, const std::string &what) {
  if (!ok) throw std::runtime_error(what);
}

// |y - ref| <= atol + rtol |ref| element-wise over an F32 reference view.
static void expect_close(const std::vector<float> &y, int64_t ld, const rankfuse::MatRef &ref,
                         double atol, double rtol, const std::string &what) {
  for (int64_t i = 0; i < ref.rows(); i++)
    for (int64_t j = 0; j < ref.cols(); j++) {
      const double r = ref.at_f32(i, j), d = std::fabs(double(y[i * ld + j]) - r);
      expect(d <= atol + rtol * std::fabs(r), what + ": (" + std::to_string(i) + ", " +
                                                  std::to_string(j) + ") off by " + std::to_string(d));
    }
}

template <class F>
static void expect_error(rf_status status, const std::string &needle, F &&f) {
  try {
    f();
  } catch (const rankfuse::Error &e) {
    expect(e.status() == status, "status " + std::to_string(e.status()) + ": " + e.what());
    expect(std::string(e.what()).find(needle) != std::string::npos,
           std::string("message lacks '") + needle + "': " + e.what());
    return;
  }
  throw std::runtime_error("no rankfuse::Error thrown");
}

int main(int argc, char **argv) {
  const std::string dir = argc > 1 ? argv[1] : "../../tests/fixtures/peft-tiny";
  std::vector<std::string> modules;
  for (int b = 0; b < 2; b++)
    for (const char *m : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
      modules.push_back("layers." + std::to_string(b) + "." + m);

  rankfuse::RuntimeOptions opts;
  opts.num_threads = 2;
  rankfuse::Runtime rt(opts);
  rankfuse::Weights base = rt.open_weights(dir + "/base.safetensors");
  rankfuse::Weights io = rt.open_weights(dir + "/io.safetensors");
  auto has_bias = [&](const std::string &m) {
    for (const auto &n : base.names())
      if (n == m + ".bias") return true;
    return false;
  };

  test("abi and info", [&] {
    rankfuse::check_abi();
    expect(rt.info().find("\"version\":\"" + rankfuse::version() + "\"") != std::string::npos, rt.info());
  });

  for (const char *name : {"lora-r8", "rslora-pattern", "lora-r64"})
    test(name, [&] {
      rankfuse::Adapter ad = rt.load_peft(dir + "/adapters/" + name);
      expect(ad.module_count() == modules.size(), "module count");
      for (const auto &m : modules) {
        rankfuse::MatRef x = io.get("x." + m), w = base.get(m + ".weight");
        rankfuse::MatRef bias = has_bias(m) ? base.get(m + ".bias") : rankfuse::MatRef();
        std::vector<float> y(size_t(x.rows() * w.rows()));
        rt.linear(x, w, has_bias(m) ? &bias : nullptr, {rankfuse::slot(ad.module(m))},
                  rankfuse::MatMut(y, x.rows(), w.rows()));
        expect_close(y, w.rows(), io.get("y." + std::string(name) + "." + m), 1e-4, 1e-4, m);
      }
    });

  test("mixed batch, strided x and y", [&] {
    const std::string m = "layers.1.mlp.up_proj";
    rankfuse::Adapter r8 = rt.load_peft(dir + "/adapters/lora-r8");
    rankfuse::Adapter rs = rt.load_peft(dir + "/adapters/rslora-pattern");
    rankfuse::MatRef x0 = io.get("x." + m), w = base.get(m + ".weight");
    const int64_t k = x0.cols(), n = w.rows(), xld = k + 5, yld = n + 3;
    std::vector<float> x(size_t(5 * xld), 0.f), y(size_t(5 * yld), -1.f);
    for (int64_t i = 0; i < 5; i++)
      for (int64_t j = 0; j < k; j++) x[i * xld + j] = x0.at_f32(i, j);
    std::vector<rf_lora_slot> slots{rankfuse::slot(r8.module(m)), rankfuse::slot(rs.module(m)),
                                    rankfuse::no_slot()};
    std::vector<int32_t> row_slot{1, -1, 0, 2, 0};
    rt.linear(rankfuse::MatRef(x, 5, k, xld), w, nullptr, slots, rankfuse::MatMut(y, 5, n, yld), row_slot);
    const std::string refs[] = {"y.lora-r8.", "y.rslora-pattern.", "y_base."};
    for (int64_t i = 0; i < 5; i++) {
      const int s = row_slot[size_t(i)] < 0 ? 2 : row_slot[size_t(i)];
      rankfuse::MatRef ref = io.get(refs[s] + m);
      for (int64_t j = 0; j < n; j++) {
        const double r = ref.at_f32(i, j);
        expect(std::fabs(y[size_t(i * yld + j)] - r) <= 1e-4 + 1e-4 * std::fabs(r), "row " + std::to_string(i));
      }
      for (int64_t j = n; j < yld; j++) expect(y[size_t(i * yld + j)] == -1.f, "wrote past cols");
    }
  });

  test("packed base weights", [&] {
    rankfuse::Adapter ad = rt.load_peft(dir + "/adapters/lora-r8");
    rankfuse::Weights b16 = rt.open_weights(dir + "/base-bf16.safetensors");
    for (const auto &m : modules) {
      rankfuse::MatRef x = io.get("x." + m), w = b16.get(m + ".weight");
      rankfuse::Packed pw = rt.pack(w);
      const rf_packed_info pi = pw.info();
      expect(pi.rows == w.rows() && pi.cols == w.cols() && pi.dtype == RF_DTYPE_BF16 &&
                 pi.bytes >= size_t(w.rows() * w.cols() * 2) && pi.kernels && *pi.kernels,
             "packed info " + m);
      rankfuse::MatRef bias = has_bias(m) ? b16.get(m + ".bias") : rankfuse::MatRef();
      std::vector<float> y(size_t(x.rows() * w.rows()));
      rt.linear(x, pw, has_bias(m) ? &bias : nullptr, {rankfuse::slot(ad.module(m))},
                rankfuse::MatMut(y, x.rows(), w.rows()));
      expect_close(y, w.rows(), io.get("y_bf16base.lora-r8." + m), 1e-4, 1e-4, "packed " + m);
    }
  });

  test("lora info and rank", [&] {
    rankfuse::Adapter ad = rt.load_peft(dir + "/adapters/lora-r64");
    rankfuse::Lora l = ad.module("layers.0.mlp.down_proj");
    expect(l.info().rank == 64 && l.info().capacity == 64, "rank 64");
    l.set_rank(8);
    const rf_lora_info i = l.info();
    expect(i.rank == 8 && i.scale == 8.0f && i.scaling == RF_SCALING_LORA, "rank 8, scale 64/8");
  });

  test("errors carry status and message", [&] {
    rankfuse::Adapter ad = rt.load_peft(dir + "/adapters/lora-r8");
    expect_error(RF_STATUS_NOT_FOUND, "layers.9.nope", [&] { ad.module("layers.9.nope"); });
    expect_error(RF_STATUS_INVALID_ARGUMENT, "", [&] { ad.module("layers.0.mlp.up_proj").set_rank(9); });
    expect_error(RF_STATUS_NOT_FOUND, "no_such_tensor", [&] { base.get("no_such_tensor"); });
    expect_error(RF_STATUS_SHAPE, "172", [&] {  // library-side check: k mismatch
      rankfuse::MatRef x = io.get("x.layers.0.mlp.down_proj");
      rankfuse::MatRef w = base.get("layers.0.self_attn.q_proj.weight");
      std::vector<float> y(5 * 64);
      rt.linear(x, w, nullptr, {}, rankfuse::MatMut(y, 5, 64));
    });
    std::vector<float> small(10);
    expect_error(RF_STATUS_SHAPE, "too small", [&] { rankfuse::MatRef(small, 3, 4); });
    expect_error(RF_STATUS_SHAPE, "row_slot", [&] {
      std::vector<float> x(5 * 256), y(5 * 172);
      std::vector<int32_t> rs{0};
      rt.linear(rankfuse::MatRef(x, 5, 256), base.get("layers.0.mlp.up_proj.weight"), nullptr, {},
                rankfuse::MatMut(y, 5, 172), rs);
    });
    expect_error(RF_STATUS_NOT_FOUND, "missing.safetensors", [&] { rt.open_weights(dir + "/missing.safetensors"); });
  });

  test("gguf adapter: save, load, architecture, outputs, errors", [&] {
    const char *tmp = std::getenv("TMPDIR");
    const std::string path = std::string(tmp ? tmp : "/tmp") + "/rankfuse-hpp-" +
                             std::to_string(static_cast<long>(getpid())) + ".gguf";
    rankfuse::Adapter ad = rt.load_peft(dir + "/adapters/rslora-pattern");
    expect(ad.architecture().empty(), "a PEFT adapter has no architecture");
    expect_error(RF_STATUS_INVALID_ARGUMENT, "n_head", [&] { ad.save_gguf(path, "llama"); });
    ad.save_gguf(path, "qwen2");
    rankfuse::Adapter g = rt.load_gguf(path);
    std::remove(path.c_str());
    expect(g.architecture() == "qwen2", "architecture " + g.architecture());
    const std::string m = "layers.1.mlp.up_proj";
    rankfuse::MatRef x = io.get("x." + m), w = base.get(m + ".weight");
    std::vector<float> y(size_t(x.rows() * w.rows()));
    rt.linear(x, w, nullptr, {rankfuse::slot(g.module("blk.1.ffn_up"))}, rankfuse::MatMut(y, x.rows(), w.rows()));
    expect_close(y, w.rows(), io.get("y.rslora-pattern." + m), 1e-4, 1e-4, m);
    expect_error(RF_STATUS_FORMAT, "general.type", [&] { rt.load_gguf(dir + "/../gguf-adapter/model.gguf"); });
  });

  test("module kinds: build basis, train, mixed batch, save, reload bit-identical", [&] {
    // Mirrors tests/c/kinds.c: a basis from three LoRA adapters with random factors, one adapter
    // per kind, a few AdamW steps each, a mixed batch, save + reload with identical outputs.
    const int64_t in = 48, out = 40, m = 12, mt = 8;
    const uint32_t cap = 4;
    const std::string mod = "layers.0.q_proj";
    uint64_t rng = 88172645463325252ull;
    auto rand_n = [&](std::size_t n, float s) {
      std::vector<float> v(n);
      for (float &f : v) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        f = s * (float((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f);
      }
      return v;
    };
    const std::vector<float> wd = rand_n(size_t(out * in), 0.2f), bd = rand_n(size_t(out), 0.1f),
                             xd = rand_n(size_t(m * in), 1.0f);
    const rankfuse::MatRef w(wd, out, in), b(bd, 1, out), x(xd, m, in);

    std::vector<rankfuse::Adapter> src;
    for (int i = 0; i < 3; i++) {
      src.push_back(rankfuse::Adapter::create("src" + std::to_string(i)));
      rankfuse::Lora l = src.back().add_lora(mod, in, out, cap, 8.0f, RF_SCALING_LORA, RF_DTYPE_F32, 10 + i);
      const std::vector<float> a = rand_n(cap * in, 0.3f), bb = rand_n(out * cap, 0.3f);
      l.set_weights(rankfuse::MatRef(a, cap, in), rankfuse::MatRef(bb, out, cap));
    }
    auto basis = std::make_unique<rankfuse::EigenBasis>(
        rankfuse::EigenBasis::build({&src[0], &src[1], &src[2]}, 6, 2, 7));
    rankfuse::EigenBasis other = rankfuse::EigenBasis::build({&src[0], &src[1]}, 6, 2, 8);

    auto al = std::make_unique<rankfuse::Adapter>(rankfuse::Adapter::create("lora"));
    auto ak = std::make_unique<rankfuse::Adapter>(rankfuse::Adapter::create("kr"));
    auto ae = std::make_unique<rankfuse::Adapter>(rankfuse::Adapter::create("eig"));
    rankfuse::Lora lora = al->add_lora(mod, in, out, cap, 8.0f, RF_SCALING_LORA, RF_DTYPE_F32, 1);
    rankfuse::Lora kr = ak->add_kradapter(mod, in, out, 2.0f, 2);
    rankfuse::Lora eig = ae->add_eigenlorax(*basis, mod, 3, 1.0f, 3);
    expect(lora.kind() == RF_MODULE_KIND_LORA && kr.kind() == RF_MODULE_KIND_KRADAPTER &&
               eig.kind() == RF_MODULE_KIND_EIGENLORAX, "kinds");
    expect(kr.info().in_features == in && kr.info().out_features == out, "KRAdapter shape");
    expect(eig.info().rank == 8 && eig.info().capacity == 3, "EigenLoRAx: rank 6 + 2 components, capacity 3");

    rankfuse::AdamWOptions opt;
    opt.lr = 0.05f;
    opt.weight_decay = 0.0f;
    for (rankfuse::Lora *l : {&lora, &kr, &eig}) {
      const std::vector<float> xt = rand_n(size_t(mt * in), 1.0f), target = rand_n(size_t(mt * out), 1.0f);
      std::vector<float> y(size_t(mt * out)), dy(size_t(mt * out));
      double first = 0, last = 0;
      for (int step = 0; step <= 6; step++) {
        rt.linear(rankfuse::MatRef(xt, mt, in), w, &b, {rankfuse::slot(*l)}, rankfuse::MatMut(y, mt, out));
        double loss = 0;
        for (std::size_t i = 0; i < y.size(); i++) {
          const float d = y[i] - target[i];
          loss += double(d) * d;
          dy[i] = 2.0f * d / float(y.size());
        }
        loss /= double(y.size());
        (step == 0 ? first : last) = loss;
        if (step == 6) break;
        l->zero_grad();
        rt.backward(*l, rankfuse::MatRef(xt, mt, in), w, rankfuse::MatRef(dy, mt, out));
        l->adamw_step(opt);
      }
      expect(last < first, "kind " + std::to_string(l->kind()) + ": loss " + std::to_string(first) +
                               " -> " + std::to_string(last));
    }
    eig.set_rank(7);

    std::vector<int32_t> row_slot;
    for (int64_t i = 0; i < m; i++) row_slot.push_back(int32_t(i % 4) - 1);  // base, LoRA, KR, Eigen
    auto serve = [&](const rankfuse::Lora &l0, const rankfuse::Lora &l1, const rankfuse::Lora &l2) {
      std::vector<float> y(size_t(m * out));
      std::vector<rf_lora_slot> slots{rankfuse::slot(l0), rankfuse::slot(l1, 0, 0.5f), rankfuse::slot(l2)};
      rt.linear(x, w, &b, slots, rankfuse::MatMut(y, m, out), row_slot);
      return y;
    };
    const std::vector<float> y0 = serve(lora, kr, eig);
    std::vector<float> yb(size_t(m * out));
    rt.linear(x, w, &b, {}, rankfuse::MatMut(yb, m, out));
    for (int64_t i = 0; i < m; i++) {
      bool same = true;
      for (int64_t j = 0; j < out; j++) same = same && y0[size_t(i * out + j)] == yb[size_t(i * out + j)];
      expect(same == (i % 4 == 0), "row " + std::to_string(i) + " vs the base");
    }

    const char *tmp = std::getenv("TMPDIR");
    const std::string d = std::string(tmp ? tmp : "/tmp") + "/rankfuse-hpp-kinds-" +
                          std::to_string(static_cast<long>(getpid()));
    struct RemoveDir {
      std::string dir;
      ~RemoveDir() {
        if (std::system(("rm -rf '" + dir + "'").c_str()) != 0) std::printf("could not remove %s\n", dir.c_str());
      }
    } cleanup{d};
    al->save_peft(d + "/lora");
    ak->save_peft(d + "/kr");
    ae->save_peft(d + "/eig");
    basis->save(d + "/basis");
    al.reset(), ak.reset(), ae.reset(), basis.reset();
    rankfuse::EigenBasis basis2 = rt.load_eigen_basis(d + "/basis");
    rankfuse::Adapter l2 = rt.load_peft(d + "/lora"), k2 = rt.load_peft(d + "/kr");
    rankfuse::Adapter e2 = rt.load_eigenlorax(basis2, d + "/eig");
    expect_error(RF_STATUS_INVALID_ARGUMENT, "basis", [&] { rt.load_eigenlorax(other, d + "/eig"); });
    expect_error(RF_STATUS_INVALID_ARGUMENT, "rf_adapter_load_eigenlorax", [&] { rt.load_peft(d + "/eig"); });
    expect(k2.module(mod).kind() == RF_MODULE_KIND_KRADAPTER && e2.module(mod).kind() == RF_MODULE_KIND_EIGENLORAX,
           "reloaded kinds");
    expect(serve(l2.module(mod), k2.module(mod), e2.module(mod)) == y0, "outputs differ after save and reload");
  });

  test("typed views", [&] {
    std::array<rankfuse::bf16, 6> b{};
    std::vector<rankfuse::f16> h(6);
    expect(rankfuse::MatRef(b, 2, 3).dtype() == RF_DTYPE_BF16, "bf16");
    expect(rankfuse::MatMut(h, 3, 2).dtype() == RF_DTYPE_F16, "f16");
    expect(rankfuse::MatRef(h, 2, 2, 3).ld() == 3, "ld");
  });

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
