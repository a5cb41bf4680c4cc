/* rankfuse from C: load the PEFT fixture (base + LoRA adapter), run one fused linear and compare
 * it with PEFT's own output stored in io.safetensors. Usage: ./example [FIXTURE_DIR] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <rankfuse.h>

/* Every fallible call returns an owned rf_error (NULL = success). */
#define CHECK(call)                                                              \
  do {                                                                           \
    rf_error *e_ = (call);                                                       \
    if (e_) {                                                                    \
      fprintf(stderr, "%s failed (status %d): %s\n", #call, (int)rf_error_code(e_), \
              rf_error_message(e_));                                             \
      rf_error_free(e_);                                                         \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)

int main(int argc, char **argv) {
  const char *dir = argc > 1 ? argv[1] : "../../tests/fixtures/peft-tiny";
  const char *module = "layers.0.self_attn.q_proj";
  char path[4096];
  rf_runtime *rt;
  rf_weights *base, *io;
  rf_adapter *adapter;
  rf_lora *lora;
  rf_matrix x, w, bias, ref;
  CHECK(rf_runtime_create(NULL, &rt)); /* NULL options = CPU, all cores */

  snprintf(path, sizeof path, "%s/base.safetensors", dir);
  CHECK(rf_weights_open(rt, path, &base));
  snprintf(path, sizeof path, "%s/io.safetensors", dir);
  CHECK(rf_weights_open(rt, path, &io));
  snprintf(path, sizeof path, "%s/adapters/lora-r8", dir);
  CHECK(rf_adapter_load_peft(rt, path, &adapter));
  CHECK(rf_adapter_module(adapter, module, &lora)); /* borrowed from the adapter */

  /* Zero-copy views into the memory-mapped files. */
  CHECK(rf_weights_get(base, "layers.0.self_attn.q_proj.weight", &w));
  CHECK(rf_weights_get(base, "layers.0.self_attn.q_proj.bias", &bias));
  CHECK(rf_weights_get(io, "x.layers.0.self_attn.q_proj", &x));
  CHECK(rf_weights_get(io, "y.lora-r8.layers.0.self_attn.q_proj", &ref));

  /* y = x W^T + bias + scale * (x A^T) B^T, into our own buffer. */
  float *out = malloc(sizeof(float) * (size_t)(x.rows * w.rows));
  rf_matrix y = {out, RF_DTYPE_F32, x.rows, w.rows, w.rows};
  rf_lora_slot slot = {lora, 0, 1.0f}; /* rank 0 = the lora's own rank */
  CHECK(rf_linear(rt, &x, &w, &bias, &slot, 1, NULL, &y));

  double max_diff = 0.0;
  const float *r = ref.data;
  for (int64_t i = 0; i < y.rows; i++)
    for (int64_t j = 0; j < y.cols; j++) {
      double d = fabs((double)out[i * y.ld + j] - (double)r[i * ref.ld + j]);
      if (d > max_diff) max_diff = d;
    }
  printf("rankfuse %s: %s %lld x %lld, max |y - y_peft| = %.3g\n", rf_version(), module,
         (long long)y.rows, (long long)y.cols, max_diff);

  free(out);
  rf_adapter_free(adapter); /* frees the borrowed lora too */
  rf_weights_free(io);
  rf_weights_free(base);
  rf_runtime_free(rt); /* last: after every object made with it */
  return max_diff <= 1e-4 ? 0 : 2;
}
