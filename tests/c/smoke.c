/* C smoke test: the fixture base + a PEFT adapter through the C ABI, checked against PEFT's
 * reference outputs. Built and run by tests/c_program.rs (against the .so and the .a) and under
 * valgrind by .ci/steps/20-c-valgrind.sh. Usage: smoke FIXTURE_DIR */
#include "rankfuse.h"
#include "rankfuse.h" /* twice on purpose: the header has an include guard */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: %s FIXTURE_DIR\n", argv[0]); return 2; }
  char path[4096];
  if (rf_abi_version() != RF_ABI_VERSION || strcmp(rf_version(), RF_VERSION_STRING) != 0) {
    fprintf(stderr, "version mismatch\n");
    return 1;
  }
  rf_runtime_options opts = {sizeof(rf_runtime_options), RF_DEVICE_CPU, 0, 2, NULL, RF_ACT_QUANT_EXACT};
  rf_runtime *rt = NULL;
  if (!check(rf_runtime_create(&opts, &rt), "runtime")) return 1;
  char info[2048];
  size_t len = 0;
  check(rf_runtime_info(rt, info, sizeof info, &len), "info");

  rf_weights *base = NULL, *io = NULL;
  snprintf(path, sizeof path, "%s/base.safetensors", argv[1]);
  check(rf_weights_open(rt, path, &base), "open base");
  snprintf(path, sizeof path, "%s/io.safetensors", argv[1]);
  check(rf_weights_open(rt, path, &io), "open io");
  rf_adapter *ad = NULL;
  snprintf(path, sizeof path, "%s/adapters/rslora-pattern", argv[1]);
  check(rf_adapter_load_peft(rt, path, &ad), "load adapter");
  if (failures) return 1;

  size_t n_mod = rf_adapter_module_count(ad);
  double worst = 0;
  for (size_t i = 0; i < n_mod; i++) {
    const char *name = NULL;
    rf_lora *lora = NULL;
    check(rf_adapter_module_name(ad, i, &name), "module name");
    check(rf_adapter_module(ad, name, &lora), "module");
    char key[512];
    rf_matrix x, w, b, want;
    snprintf(key, sizeof key, "x.%s", name);
    check(rf_weights_get(io, key, &x), key);
    snprintf(key, sizeof key, "%s.weight", name);
    check(rf_weights_get(base, key, &w), key);
    snprintf(key, sizeof key, "%s.bias", name);
    rf_error *be = rf_weights_get(base, key, &b);
    int has_bias = be == NULL;
    rf_error_free(be);
    snprintf(key, sizeof key, "y.rslora-pattern.%s", name);
    check(rf_weights_get(io, key, &want), key);
    float *out = calloc((size_t)(x.rows * w.rows), sizeof(float));
    rf_matrix y = {out, RF_DTYPE_F32, x.rows, w.rows, w.rows};
    rf_lora_slot slot = {lora, 0, 1.0f};
    check(rf_linear(rt, &x, &w, has_bias ? &b : NULL, &slot, 1, NULL, &y), "rf_linear");
    const float *ref = (const float *)want.data;
    for (int64_t j = 0; j < x.rows * w.rows; j++) {
      double d = fabs((double)out[j] - ref[j]);
      if (d > worst) worst = d;
      if (d > 1e-4 + 1e-4 * fabs(ref[j])) { failures++; break; }
    }
    free(out);
  }
  printf("%zu modules, max |rankfuse - PEFT| = %.3g\n", n_mod, worst);

  /* A few misuses: clear errors, no crash, no leak. */
  rf_weights *none = NULL;
  expect_error(rf_weights_open(rt, "/nonexistent/model.safetensors", &none), RF_STATUS_NOT_FOUND,
               "/nonexistent/model.safetensors", "missing file");
  rf_matrix bad;
  expect_error(rf_weights_get(base, "no.such.tensor", &bad), RF_STATUS_NOT_FOUND, "no.such.tensor", "missing tensor");
  rf_lora *lora = NULL;
  check(rf_adapter_module(ad, "layers.0.self_attn.q_proj", &lora), "q_proj");
  expect_error(rf_lora_set_rank(lora, 99), RF_STATUS_INVALID_ARGUMENT, "rank 99", "set_rank");
  expect_error(rf_linear(NULL, NULL, NULL, NULL, NULL, 0, NULL, NULL), RF_STATUS_INVALID_ARGUMENT, "'rt'", "null rt");

  rf_adapter_free(ad);
  rf_weights_free(io);
  rf_weights_free(base);
  rf_runtime_free(rt);
  rf_adapter_free(NULL);
  rf_weights_free(NULL);
  rf_runtime_free(NULL);
  rf_error_free(NULL);
  if (failures) { fprintf(stderr, "%d failures\n", failures); return 1; }
  printf("ok\n");
  return 0;
}
