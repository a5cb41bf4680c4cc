// rankfuse from C++17: the same job as examples/c with RAII handles and exceptions.
// Usage: ./example [FIXTURE_DIR]
#include <rankfuse.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

int main(int argc, char **argv) try {
  const std::string dir = argc > 1 ? argv[1] : "../../tests/fixtures/peft-tiny";
  const std::string module = "layers.0.self_attn.q_proj";
  rankfuse::check_abi();

  rankfuse::Runtime rt;  // declared first: destroyed after everything made with it
  rankfuse::Weights base = rt.open_weights(dir + "/base.safetensors");
  rankfuse::Weights io = rt.open_weights(dir + "/io.safetensors");
  rankfuse::Adapter adapter = rt.load_peft(dir + "/adapters/lora-r8");
  rankfuse::Lora lora = adapter.module(module);

  rankfuse::MatRef x = io.get("x." + module);  // zero-copy views into the mappings
  rankfuse::MatRef w = base.get(module + ".weight");
  rankfuse::MatRef bias = base.get(module + ".bias");
  rankfuse::MatRef ref = io.get("y.lora-r8." + module);

  std::vector<float> y(static_cast<size_t>(x.rows() * w.rows()));
  rt.linear(x, w, &bias, {rankfuse::slot(lora)}, rankfuse::MatMut(y, x.rows(), w.rows()));

  double max_diff = 0.0;
  for (int64_t i = 0; i < x.rows(); i++)
    for (int64_t j = 0; j < w.rows(); j++)
      max_diff = std::max(max_diff, std::fabs(double(y[i * w.rows() + j]) - ref.at_f32(i, j)));
  const rf_lora_info info = lora.info();
  std::printf("rankfuse %s: %s rank %u scale %g, max |y - y_peft| = %.3g\n",
              rankfuse::version().c_str(), module.c_str(), info.rank, info.scale, max_diff);

  try {  // errors are exceptions carrying the status and the library's message
    adapter.module("layers.9.nope");
  } catch (const rankfuse::Error &e) {
    std::printf("expected error: status %d: %s\n", int(e.status()), e.what());
  }
  return max_diff <= 1e-4 ? 0 : 2;
} catch (const rankfuse::Error &e) {
  std::fprintf(stderr, "rankfuse error (status %d): %s\n", int(e.status()), e.what());
  return 1;
}
