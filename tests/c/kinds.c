/* KRAdapter and EigenLoRAx modules from C, next to LoRA: create each kind, train a few AdamW
 * steps, serve one mixed batch (LoRA, KRAdapter, EigenLoRAx and base-only rows), save, free,
 * reload and serve again: the outputs must be bit-identical. Also: a folder of a newer format
 * version and loadings on the wrong basis are refused. Built against the installed library by
 * .ci/steps/20-c-valgrind.sh (under valgrind) and against the cargo-built one by
 * tests/c_program.rs. Usage: kinds TMP_DIR */
#include "rankfuse.h"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

static uint64_t rng = 88172645463325252ull;
static float frand(void) { /* xorshift64, uniform in [-1, 1) */
  rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
  return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static float *frand_n(size_t n, float s) {
  float *v = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) v[i] = s * frand();
  return v;
}

enum { IN = 48, OUT = 40, M = 12, MT = 8, CAP = 4 };
static const char *MOD = "layers.0.q_proj";

static rf_matrix mat(float *d, int64_t r, int64_t c) { rf_matrix m = {d, RF_DTYPE_F32, r, c, c}; return m; }

/* A few AdamW steps of `l` alone on the layer (W, b) towards a random linear target. Returns
 * the loss before and after. */
static void train(rf_runtime *rt, rf_lora *l, rf_matrix *w, rf_matrix *b, double *before, double *after) {
  float *x = frand_n(MT * IN, 1.0f), *target = frand_n(MT * OUT, 1.0f);
  float *y = calloc(MT * OUT, sizeof(float)), *dy = calloc(MT * OUT, sizeof(float));
  rf_matrix xm = mat(x, MT, IN), ym = mat(y, MT, OUT), dym = mat(dy, MT, OUT);
  rf_adamw_options o = {sizeof(rf_adamw_options), 0.05f, 0.9f, 0.999f, 1e-8f, 0.0f};
  rf_lora_slot s = {l, 0, 1.0f};
  for (int step = 0; step <= 6; step++) {
    check(rf_linear(rt, &xm, w, b, &s, 1, NULL, &ym), "train forward");
    double loss = 0;
    for (int i = 0; i < MT * OUT; i++) {
      float d = y[i] - target[i];
      loss += (double)d * d;
      dy[i] = 2.0f * d / (MT * OUT);
    }
    loss /= MT * OUT;
    if (step == 0) *before = loss;
    *after = loss;
    if (step == 6) break;
    check(rf_lora_zero_grad(l), "zero_grad");
    check(rf_lora_backward(rt, l, &xm, w, &dym, 0, RF_BACKWARD_NESTED, NULL), "backward");
    check(rf_lora_adamw_step(l, &o), "adamw");
  }
  free(x); free(target); free(y); free(dy);
}

static rf_lora *module_of(rf_adapter *a) {
  rf_lora *l = NULL;
  check(rf_adapter_module(a, MOD, &l), "module");
  return l;
}

static void serve(rf_runtime *rt, rf_lora *lora, rf_lora *kr, rf_lora *eig, rf_matrix *x, rf_matrix *w,
                  rf_matrix *b, float *y) {
  rf_lora_slot slots[3] = {{lora, 0, 1.0f}, {kr, 0, 0.5f}, {eig, 0, 1.0f}};
  int32_t row_slot[M];
  for (int i = 0; i < M; i++) row_slot[i] = i % 4 - 1; /* base, LoRA, KRAdapter, EigenLoRAx, ... */
  rf_matrix ym = mat(y, M, OUT);
  check(rf_linear(rt, x, w, b, slots, 3, row_slot, &ym), "mixed batch");
}

static void replace_in_file(const char *path, const char *from, const char *to) {
  FILE *f = fopen(path, "rb");
  if (!f) { failures++; return; }
  char buf[1 << 16];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  char *p = strstr(buf, from);
  if (!p) { fprintf(stderr, "'%s' not in %s\n", from, path); failures++; return; }
  f = fopen(path, "wb");
  fwrite(buf, 1, (size_t)(p - buf), f);
  fputs(to, f);
  fputs(p + strlen(from), f);
  fclose(f);
}

int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: %s TMP_DIR\n", argv[0]); return 2; }
  char path[2048], p2[4096];
  rf_runtime_options opts = {sizeof(rf_runtime_options), RF_DEVICE_CPU, 0, 2, NULL, RF_ACT_QUANT_EXACT};
  rf_runtime *rt = NULL;
  if (!check(rf_runtime_create(&opts, &rt), "runtime")) return 1;
  float *wd = frand_n(OUT * IN, 0.2f), *bd = frand_n(OUT, 0.1f), *xd = frand_n(M * IN, 1.0f);
  rf_matrix w = mat(wd, OUT, IN), b = mat(bd, 1, OUT), x = mat(xd, M, IN);

  /* Three LoRA adapters to build a basis from (random factors). */
  rf_adapter *src[3];
  for (int i = 0; i < 3; i++) {
    char name[32];
    snprintf(name, sizeof name, "src%d", i);
    rf_lora *l = NULL;
    check(rf_adapter_new(name, &src[i]), "adapter_new");
    check(rf_adapter_add_lora(src[i], MOD, IN, OUT, CAP, 8.0f, RF_SCALING_LORA, RF_DTYPE_F32, 10 + i, &l), "add_lora");
    float *a = frand_n(CAP * IN, 0.3f), *bb = frand_n(OUT * CAP, 0.3f);
    rf_matrix am = mat(a, CAP, IN), bm = mat(bb, OUT, CAP);
    check(rf_lora_set_weights(l, &am, &bm), "set_weights");
    free(a); free(bb);
  }
  rf_eigen_basis *basis = NULL, *other = NULL;
  check(rf_eigen_basis_build((const rf_adapter *const *)src, 3, 6, 2, 7, &basis), "basis_build");
  check(rf_eigen_basis_build((const rf_adapter *const *)src, 2, 6, 2, 8, &other), "other basis");
  if (failures) return 1;

  /* One adapter per kind. */
  rf_adapter *al = NULL, *ak = NULL, *ae = NULL;
  rf_lora *lora = NULL, *kr = NULL, *eig = NULL;
  check(rf_adapter_new("lora", &al), "new");
  check(rf_adapter_add_lora(al, MOD, IN, OUT, CAP, 8.0f, RF_SCALING_LORA, RF_DTYPE_F32, 1, &lora), "add_lora");
  check(rf_adapter_new("kr", &ak), "new");
  check(rf_adapter_add_kradapter(ak, MOD, IN, OUT, 2.0f, 2, &kr), "add_kradapter");
  check(rf_adapter_new("eig", &ae), "new");
  check(rf_adapter_add_eigenlorax(ae, basis, MOD, 3, 1.0f, 3, &eig), "add_eigenlorax");
  if (failures) return 1;
  rf_module_kind kind;
  check(rf_lora_kind(kr, &kind), "kind");
  if (kind != RF_MODULE_KIND_KRADAPTER) { fprintf(stderr, "kind of kr %d\n", (int)kind); failures++; }
  check(rf_lora_kind(eig, &kind), "kind");
  if (kind != RF_MODULE_KIND_EIGENLORAX) { fprintf(stderr, "kind of eig %d\n", (int)kind); failures++; }
  rf_lora_info info;
  check(rf_lora_info_get(kr, &info), "info");
  if (info.in_features != IN || info.out_features != OUT) { fprintf(stderr, "kr info shape\n"); failures++; }
  check(rf_lora_info_get(eig, &info), "info");
  if (info.rank != 8 || info.capacity != 3) { fprintf(stderr, "eig info rank %u cap %u\n", info.rank, info.capacity); failures++; }

  /* Train each a few steps: the loss must go down. */
  rf_lora *mods[3] = {lora, kr, eig};
  const char *names[3] = {"LoRA", "KRAdapter", "EigenLoRAx"};
  for (int i = 0; i < 3; i++) {
    double l0 = 0, l1 = 0;
    train(rt, mods[i], &w, &b, &l0, &l1);
    printf("%s: loss %.5f -> %.5f after 6 AdamW steps\n", names[i], l0, l1);
    if (!(l1 < l0)) { fprintf(stderr, "%s: loss did not decrease\n", names[i]); failures++; }
  }
  check(rf_lora_set_rank(eig, 7), "eigen: first 7 of 8 basis components");

  float *y0 = calloc(M * OUT, sizeof(float)), *y1 = calloc(M * OUT, sizeof(float));
  serve(rt, lora, kr, eig, &x, &w, &b, y0);
  /* Adapter rows differ from the base: recompute the base alone. */
  float *yb = calloc(M * OUT, sizeof(float));
  rf_matrix ybm = mat(yb, M, OUT);
  check(rf_linear(rt, &x, &w, &b, NULL, 0, NULL, &ybm), "base");
  for (int i = 0; i < M; i++) {
    double d = 0;
    for (int j = 0; j < OUT; j++) d += fabs((double)y0[i * OUT + j] - yb[i * OUT + j]);
    if ((i % 4 == 0) != (d == 0)) { fprintf(stderr, "row %d: |y - base| = %g\n", i, d); failures++; }
  }

  /* Save every kind and the basis, free them all, reload and serve again. */
  const char *dirs[3] = {"lora", "kr", "eig"};
  rf_adapter *ads[3] = {al, ak, ae};
  for (int i = 0; i < 3; i++) {
    snprintf(path, sizeof path, "%s/%s", argv[1], dirs[i]);
    check(rf_adapter_save_peft(ads[i], path), "save");
    rf_adapter_free(ads[i]);
  }
  snprintf(path, sizeof path, "%s/basis", argv[1]);
  check(rf_eigen_basis_save(basis, path), "basis_save");
  rf_eigen_basis_free(basis);
  basis = NULL;
  check(rf_eigen_basis_load(rt, path, &basis), "basis_load");
  snprintf(path, sizeof path, "%s/lora", argv[1]);
  check(rf_adapter_load_peft(rt, path, &al), "load lora");
  snprintf(path, sizeof path, "%s/kr", argv[1]);
  check(rf_adapter_load_peft(rt, path, &ak), "load kradapter");
  snprintf(path, sizeof path, "%s/eig", argv[1]);
  check(rf_adapter_load_eigenlorax(rt, basis, path, &ae), "load eigenlorax");
  expect_error(rf_adapter_load_eigenlorax(rt, other, path, &ads[0]), RF_STATUS_INVALID_ARGUMENT, "basis",
               "loadings on another basis");
  expect_error(rf_adapter_load_peft(rt, path, &ads[0]), RF_STATUS_INVALID_ARGUMENT, "rf_adapter_load_eigenlorax",
               "eigen folder without its basis");
  if (failures) return 1;
  serve(rt, module_of(al), module_of(ak), module_of(ae), &x, &w, &b, y1);
  if (memcmp(y0, y1, M * OUT * sizeof(float)) != 0) {
    fprintf(stderr, "outputs differ after save and reload\n");
    failures++;
  }

  /* A folder from a newer format version is refused, not misread. */
  snprintf(path, sizeof path, "%s/kr", argv[1]);
  snprintf(p2, sizeof p2, "%s/adapter_config.json", path);
  replace_in_file(p2, "\"rankfuse_format_version\": 1", "\"rankfuse_format_version\": 2");
  expect_error(rf_adapter_load_peft(rt, path, &ads[0]), RF_STATUS_UNSUPPORTED, "format version 2", "newer format");

  for (int i = 0; i < 3; i++) rf_adapter_free(src[i]);
  rf_adapter_free(al);
  rf_adapter_free(ak);
  rf_adapter_free(ae);
  rf_eigen_basis_free(basis);
  rf_eigen_basis_free(other);
  rf_runtime_free(rt);
  free(wd); free(bd); free(xd); free(y0); free(y1); free(yb);
  if (failures) { fprintf(stderr, "%d failures\n", failures); return 1; }
  printf("kinds: ok\n");
  return 0;
}
