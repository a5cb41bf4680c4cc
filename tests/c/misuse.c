/* C ABI misuse: every function given NULLs, wrong struct sizes, out-of-range indices, slots and
 * ranks, mismatched shapes and dtypes, hostile files; each must return the right status with a
 * message naming the culprit, write no out-param, and leak nothing. Every error object is freed
 * exactly once. Built with -fsanitize=address,undefined (LeakSanitizer on) and also run under
 * valgrind by .ci/steps/25-c-misuse.sh. Usage: misuse REPO_ROOT */
#include "rankfuse.h"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0, checks = 0;

static void expect(rf_error *e, rf_status status, const char *needle, const char *what) {
  checks++;
  if (!e) {
    fprintf(stderr, "FAIL %s: expected status %d, got success\n", what, (int)status);
    failures++;
    return;
  }
  const char *m = rf_error_message(e);
  if (rf_error_code(e) != status || !m || !*m || (needle && !strstr(m, needle))) {
    fprintf(stderr, "FAIL %s: expected status %d naming '%s', got %d '%s'\n", what, (int)status,
            needle ? needle : "", (int)rf_error_code(e), m ? m : "(null)");
    failures++;
  }
  rf_error_free(e);
}

static int ok(rf_error *e, const char *what) {
  checks++;
  if (e) {
    fprintf(stderr, "FAIL %s: %d %s\n", what, (int)rf_error_code(e), rf_error_message(e));
    rf_error_free(e);
    failures++;
    return 0;
  }
  return 1;
}

static void truth(int cond, const char *what) {
  checks++;
  if (!cond) {
    fprintf(stderr, "FAIL %s\n", what);
    failures++;
  }
}

static rf_matrix mat(void *data, rf_dtype dt, int64_t rows, int64_t cols) {
  rf_matrix m = {data, dt, rows, cols, cols};
  return m;
}

int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: %s REPO_ROOT\n", argv[0]); return 2; }
  char path[4096], fx[2048];
  snprintf(fx, sizeof fx, "%s/tests/fixtures/peft-tiny", argv[1]);

  /* Errors: NULL means success. */
  truth(rf_error_code(NULL) == RF_STATUS_OK, "rf_error_code(NULL)");
  truth(rf_error_message(NULL) != NULL && rf_error_message(NULL)[0] == 0, "rf_error_message(NULL)");
  rf_error_free(NULL);

  /* Runtime creation. */
  rf_runtime *rt = NULL, *sentinel = (rf_runtime *)&checks;
  expect(rf_runtime_create(NULL, NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "create out NULL");
  rf_runtime_options opts = {sizeof(rf_runtime_options), RF_DEVICE_CPU, 0, 2, NULL, RF_ACT_QUANT_EXACT};
  rf_runtime_options bad_opts = opts;
  bad_opts.struct_size = 4;
  rt = sentinel;
  expect(rf_runtime_create(&bad_opts, &rt), RF_STATUS_INVALID_ARGUMENT, "struct_size", "struct_size 4");
  truth(rt == sentinel, "out untouched on error");
  bad_opts = opts;
  bad_opts.struct_size = 0;
  expect(rf_runtime_create(&bad_opts, &rt), RF_STATUS_INVALID_ARGUMENT, "struct_size", "struct_size 0");
  bad_opts = opts;
  *(int32_t *)&bad_opts.device = 77;
  expect(rf_runtime_create(&bad_opts, &rt), RF_STATUS_INVALID_ARGUMENT, "device", "device 77");
  bad_opts = opts;
  *(int32_t *)&bad_opts.act_quant = 9;
  expect(rf_runtime_create(&bad_opts, &rt), RF_STATUS_INVALID_ARGUMENT, "act_quant", "act_quant 9");
  /* A host compiled against the 0.1 layout (no act_quant): accepted, the tail is not read. */
  bad_opts.struct_size = (uint32_t)offsetof(rf_runtime_options, act_quant);
  rt = NULL;
  if (ok(rf_runtime_create(&bad_opts, &rt), "0.1 options layout")) rf_runtime_free(rt);
  rt = sentinel;
  bad_opts = opts;
  bad_opts.num_threads = 100000;
  expect(rf_runtime_create(&bad_opts, &rt), RF_STATUS_INVALID_ARGUMENT, "num_threads", "num_threads 100000");
  rf_runtime_free(NULL);
  rt = NULL;
  if (!ok(rf_runtime_create(&opts, &rt), "runtime")) return 1;

  size_t len = 0;
  char small[4];
  expect(rf_runtime_info(NULL, NULL, 0, &len), RF_STATUS_INVALID_ARGUMENT, "'rt'", "info rt NULL");
  expect(rf_runtime_info(rt, NULL, 0, NULL), RF_STATUS_INVALID_ARGUMENT, "'len_out'", "info len NULL");
  expect(rf_runtime_info(rt, small, sizeof small, &len), RF_STATUS_INVALID_ARGUMENT, "cap", "info cap 4");
  ok(rf_runtime_info(rt, NULL, 0, &len), "info length query");
  truth(len > 10, "info length");

  /* Weights. */
  rf_weights *w = NULL, *wsent = (rf_weights *)&checks;
  snprintf(path, sizeof path, "%s/base.safetensors", fx);
  expect(rf_weights_open(NULL, path, &w), RF_STATUS_INVALID_ARGUMENT, "'rt'", "open rt NULL");
  expect(rf_weights_open(rt, NULL, &w), RF_STATUS_INVALID_ARGUMENT, "'path'", "open path NULL");
  expect(rf_weights_open(rt, path, NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "open out NULL");
  w = wsent;
  expect(rf_weights_open(rt, "/nonexistent/x.safetensors", &w), RF_STATUS_NOT_FOUND, "/nonexistent/x.safetensors", "open missing");
  expect(rf_weights_open(rt, "\xff\xfe.safetensors", &w), RF_STATUS_INVALID_ARGUMENT, "'path'", "path not UTF-8");
  snprintf(path, sizeof path, "%s/tests/corpus/weights/offsets-overlap.safetensors", argv[1]);
  expect(rf_weights_open(rt, path, &w), RF_STATUS_FORMAT, "overlap", "hostile file");
  snprintf(path, sizeof path, "%s/tests/corpus/weights/header-len-huge.safetensors", argv[1]);
  expect(rf_weights_open(rt, path, &w), RF_STATUS_FORMAT, "header-len-huge", "huge header length");
  snprintf(path, sizeof path, "%s/tests/corpus/index/path-traversal/model.safetensors.index.json", argv[1]);
  expect(rf_weights_open(rt, path, &w), RF_STATUS_FORMAT, "../weights", "index path traversal");
  expect(rf_weights_open(rt, fx, &w), RF_STATUS_IO, "peft-tiny", "a directory as weights");
  truth(w == wsent, "weights out untouched on error");
  rf_weights_open_options wo = {sizeof(rf_weights_open_options), 0};
  snprintf(path, sizeof path, "%s/base.safetensors", fx);
  wo.struct_size = 1;
  expect(rf_weights_open_ex(rt, path, &wo, &w), RF_STATUS_INVALID_ARGUMENT, "struct_size", "open_ex struct_size 1");
  wo.struct_size = sizeof wo;
  wo.flags = 0xF0;
  expect(rf_weights_open_ex(rt, path, &wo, &w), RF_STATUS_INVALID_ARGUMENT, "flags", "open_ex unknown flags");
  wo.flags = RF_WEIGHTS_READ;
  rf_weights *wread = NULL;
  ok(rf_weights_open_ex(rt, path, &wo, &wread), "open_ex read");
  w = NULL;
  if (!ok(rf_weights_open(rt, path, &w), "open base")) return 1;
  truth(rf_weights_count(w) == rf_weights_count(wread) && rf_weights_count(w) > 0, "same tensors read or mapped");
  truth(rf_weights_count(NULL) == 0, "count(NULL)");
  rf_weights_free(NULL);
  const char *name = NULL;
  expect(rf_weights_name(NULL, 0, &name), RF_STATUS_INVALID_ARGUMENT, "'w'", "name w NULL");
  expect(rf_weights_name(w, 0, NULL), RF_STATUS_INVALID_ARGUMENT, "'name_out'", "name out NULL");
  expect(rf_weights_name(w, (size_t)-1, &name), RF_STATUS_INVALID_ARGUMENT, "out of range", "name index SIZE_MAX");
  truth(name == NULL, "name out untouched on error");
  rf_matrix wm;
  memset(&wm, 0x5A, sizeof wm);
  expect(rf_weights_get(NULL, "x", &wm), RF_STATUS_INVALID_ARGUMENT, "'w'", "get w NULL");
  expect(rf_weights_get(w, NULL, &wm), RF_STATUS_INVALID_ARGUMENT, "'name'", "get name NULL");
  expect(rf_weights_get(w, "layers.0.self_attn.q_proj.weight", NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "get out NULL");
  expect(rf_weights_get(w, "no.such", &wm), RF_STATUS_NOT_FOUND, "no.such", "get missing");
  truth(wm.rows == (int64_t)0x5A5A5A5A5A5A5A5AULL, "matrix out untouched on error");
  ok(rf_weights_get(w, "layers.0.self_attn.q_proj.weight", &wm), "get q_proj"); /* 64 x 256 */
  rf_matrix bm;
  ok(rf_weights_get(w, "layers.0.self_attn.q_proj.bias", &bm), "get q_proj bias");

  /* Adapters. */
  rf_adapter *ad = NULL, *asent = (rf_adapter *)&checks;
  snprintf(path, sizeof path, "%s/adapters/lora-r8", fx);
  expect(rf_adapter_load_peft(NULL, path, &ad), RF_STATUS_INVALID_ARGUMENT, "'rt'", "load rt NULL");
  expect(rf_adapter_load_peft(rt, NULL, &ad), RF_STATUS_INVALID_ARGUMENT, "'dir'", "load dir NULL");
  expect(rf_adapter_load_peft(rt, path, NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "load out NULL");
  ad = asent;
  expect(rf_adapter_load_peft(rt, "/nonexistent/adapter", &ad), RF_STATUS_NOT_FOUND, "adapter_config.json", "load missing");
  snprintf(path, sizeof path, "%s/tests/corpus/adapters/regex-bomb-repeat", argv[1]);
  expect(rf_adapter_load_peft(rt, path, &ad), RF_STATUS_FORMAT, "rank_pattern", "regex bomb");
  snprintf(path, sizeof path, "%s/tests/corpus/adapters/a-b-dtype-mismatch", argv[1]);
  expect(rf_adapter_load_peft(rt, path, &ad), RF_STATUS_DTYPE, "layers.0.q", "A/B dtype mismatch");
  truth(ad == asent, "adapter out untouched on error");
  ad = NULL;
  snprintf(path, sizeof path, "%s/adapters/lora-r8", fx);
  if (!ok(rf_adapter_load_peft(rt, path, &ad), "load lora-r8")) return 1;
  rf_adapter_free(NULL);
  truth(rf_adapter_module_count(NULL) == 0, "module_count(NULL)");
  expect(rf_adapter_module_name(ad, 1000, &name), RF_STATUS_INVALID_ARGUMENT, "out of range", "module_name 1000");
  expect(rf_adapter_module_name(NULL, 0, &name), RF_STATUS_INVALID_ARGUMENT, "'a'", "module_name a NULL");
  expect(rf_adapter_module_name(ad, 0, NULL), RF_STATUS_INVALID_ARGUMENT, "'name_out'", "module_name out NULL");
  rf_lora *q = NULL, *o_proj = NULL;
  expect(rf_adapter_module(ad, "no.such.module", &q), RF_STATUS_NOT_FOUND, "no.such.module", "module missing");
  expect(rf_adapter_module(ad, NULL, &q), RF_STATUS_INVALID_ARGUMENT, "'module'", "module name NULL");
  expect(rf_adapter_module(NULL, "x", &q), RF_STATUS_INVALID_ARGUMENT, "'a'", "module a NULL");
  expect(rf_adapter_module(ad, "x", NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "module out NULL");
  truth(q == NULL, "lora out untouched on error");
  ok(rf_adapter_module(ad, "layers.0.self_attn.q_proj", &q), "q_proj");
  ok(rf_adapter_module(ad, "layers.0.self_attn.o_proj", &o_proj), "o_proj");
  rf_lora_info info;
  expect(rf_lora_info_get(NULL, &info), RF_STATUS_INVALID_ARGUMENT, "'l'", "info l NULL");
  expect(rf_lora_info_get(q, NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "info out NULL");
  ok(rf_lora_info_get(q, &info), "lora info");
  expect(rf_lora_set_rank(NULL, 1), RF_STATUS_INVALID_ARGUMENT, "'l'", "set_rank NULL");
  expect(rf_lora_set_rank(q, 0), RF_STATUS_INVALID_ARGUMENT, "rank 0", "set_rank 0");
  expect(rf_lora_set_rank(q, info.capacity + 1), RF_STATUS_INVALID_ARGUMENT, "q_proj", "set_rank capacity+1");
  expect(rf_lora_set_rank(q, UINT32_MAX), RF_STATUS_INVALID_ARGUMENT, "q_proj", "set_rank UINT32_MAX");
  expect(rf_adapter_save_peft(NULL, "/tmp/x"), RF_STATUS_INVALID_ARGUMENT, "'a'", "save a NULL");
  expect(rf_adapter_save_peft(ad, NULL), RF_STATUS_INVALID_ARGUMENT, "'dir'", "save dir NULL");
  snprintf(path, sizeof path, "%s/README.md/not-a-dir", argv[1]); /* a file as a parent folder */
  expect(rf_adapter_save_peft(ad, path), RF_STATUS_IO, "README.md", "save unwritable");

  /* rf_linear: x 3 x 256 -> y 3 x 64 with q_proj; every argument wrong in turn. */
  if (wm.rows <= 0 || wm.rows > 4096 || wm.cols <= 0 || wm.cols > 4096) {
    fprintf(stderr, "unexpected q_proj shape\n");
    return 1;
  }
  const int64_t M = 3, K = wm.cols, N = wm.rows;
  float *xb = calloc((size_t)(M * K), sizeof(float));
  float *yb = malloc((size_t)(M * N) * sizeof(float));
  for (int64_t i = 0; i < M * K; i++) xb[i] = (float)(i % 7) * 0.125f;
  for (int64_t i = 0; i < M * N; i++) yb[i] = -123.0f;
  rf_matrix x = mat(xb, RF_DTYPE_F32, M, K), y = mat(yb, RF_DTYPE_F32, M, N), t;
  rf_lora_slot slot = {q, 0, 1.0f}, slots2[2] = {{q, 0, 1.0f}, {NULL, 0, 1.0f}};
  int32_t rs[3] = {0, -1, 0};
  expect(rf_linear(NULL, &x, &wm, &bm, &slot, 1, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "'rt'", "linear rt NULL");
  expect(rf_linear(rt, NULL, &wm, &bm, &slot, 1, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "'x'", "linear x NULL");
  expect(rf_linear(rt, &x, NULL, &bm, &slot, 1, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "'w'", "linear w NULL");
  expect(rf_linear(rt, &x, &wm, &bm, &slot, 1, NULL, NULL), RF_STATUS_INVALID_ARGUMENT, "'y'", "linear y NULL");
  expect(rf_linear(rt, &x, &wm, &bm, NULL, 1, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "'slots'", "slots NULL, n 1");
  t = x; *(int32_t *)&t.dtype = 9;
  expect(rf_linear(rt, &t, &wm, &bm, &slot, 1, NULL, &y), RF_STATUS_DTYPE, "x", "x dtype 9");
  t = y; *(int32_t *)&t.dtype = -1;
  expect(rf_linear(rt, &x, &wm, &bm, &slot, 1, NULL, &t), RF_STATUS_DTYPE, "y", "y dtype -1");
  t = x; t.rows = -3;
  expect(rf_linear(rt, &t, &wm, &bm, &slot, 1, NULL, &y), RF_STATUS_SHAPE, "x", "x negative rows");
  t = x; t.ld = K - 1;
  expect(rf_linear(rt, &t, &wm, &bm, &slot, 1, NULL, &y), RF_STATUS_SHAPE, "ld", "x ld < cols");
  t = x; t.ld = INT64_MAX;
  expect(rf_linear(rt, &t, &wm, &bm, &slot, 1, NULL, &y), RF_STATUS_SHAPE, "overflows", "x ld INT64_MAX");
  t = x; t.data = NULL;
  expect(rf_linear(rt, &t, &wm, &bm, &slot, 1, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "NULL", "x data NULL");
  t = x; t.cols = K - 1; t.ld = K;
  expect(rf_linear(rt, &t, &wm, &bm, &slot, 1, NULL, &y), RF_STATUS_SHAPE, "columns", "x/w k mismatch");
  t = y; t.cols = N - 1;
  expect(rf_linear(rt, &x, &wm, &bm, &slot, 1, NULL, &t), RF_STATUS_SHAPE, "y is", "y shape");
  t = bm; t.cols = N + 1;
  expect(rf_linear(rt, &x, &wm, &t, &slot, 1, NULL, &y), RF_STATUS_SHAPE, "bias", "bias shape");
  t = y; t.data = xb; /* y over x */
  expect(rf_linear(rt, &x, &wm, &bm, &slot, 1, NULL, &t), RF_STATUS_INVALID_ARGUMENT, "overlaps", "y overlaps x");
  rf_lora_slot bad = slot;
  bad.rank = info.capacity + 1;
  expect(rf_linear(rt, &x, &wm, &bm, &bad, 1, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "capacity", "slot rank > capacity");
  bad = slot; bad.scale_mult = NAN;
  expect(rf_linear(rt, &x, &wm, &bm, &bad, 1, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "scale_mult", "scale_mult NaN");
  bad = slot; bad.scale_mult = INFINITY;
  expect(rf_linear(rt, &x, &wm, &bm, &bad, 1, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "scale_mult", "scale_mult Inf");
  bad = slot; bad.lora = o_proj; /* 64 -> 256 on a 256 -> 64 base */
  expect(rf_linear(rt, &x, &wm, &bm, &bad, 1, NULL, &y), RF_STATUS_SHAPE, "o_proj", "adapter shape vs base");
  rs[1] = 2;
  expect(rf_linear(rt, &x, &wm, &bm, slots2, 2, rs, &y), RF_STATUS_INVALID_ARGUMENT, "row_slot[1]", "row_slot 2 of 2 slots");
  rs[1] = -2;
  expect(rf_linear(rt, &x, &wm, &bm, slots2, 2, rs, &y), RF_STATUS_INVALID_ARGUMENT, "row_slot[1]", "row_slot -2");
  rs[1] = INT32_MIN;
  expect(rf_linear(rt, &x, &wm, &bm, slots2, 2, rs, &y), RF_STATUS_INVALID_ARGUMENT, "row_slot[1]", "row_slot INT32_MIN");
  expect(rf_linear(rt, &x, &wm, &bm, slots2, (size_t)1 << 40, NULL, &y), RF_STATUS_INVALID_ARGUMENT, "n_slots", "n_slots 2^40");
  int untouched = 1;
  for (int64_t i = 0; i < M * N; i++) untouched &= yb[i] == -123.0f;
  truth(untouched, "y untouched by every failing call");
  /* Mixed dtypes are allowed: f16 y. */
  uint16_t *yh = calloc((size_t)(M * N), sizeof(uint16_t));
  rf_matrix yh_m = mat(yh, RF_DTYPE_F16, M, N);
  rs[1] = -1;
  ok(rf_linear(rt, &x, &wm, &bm, slots2, 2, rs, &yh_m), "linear f16 y, mixed batch");
  ok(rf_linear(rt, &x, &wm, &bm, &slot, 1, NULL, &y), "linear");
  int finite = 1;
  for (int64_t i = 0; i < M * N; i++) finite &= isfinite(yb[i]) && yb[i] != -123.0f;
  truth(finite, "y written with finite values");
  /* The same call through weights read instead of mapped gives the same bits. */
  rf_matrix wr, br;
  ok(rf_weights_get(wread, "layers.0.self_attn.q_proj.weight", &wr), "get read q_proj");
  ok(rf_weights_get(wread, "layers.0.self_attn.q_proj.bias", &br), "get read q_proj bias");
  float *y2 = malloc((size_t)(M * N) * sizeof(float));
  rf_matrix y2m = mat(y2, RF_DTYPE_F32, M, N);
  ok(rf_linear(rt, &x, &wr, &br, &slot, 1, NULL, &y2m), "linear (read weights)");
  truth(memcmp(y2, yb, (size_t)(M * N) * sizeof(float)) == 0, "read == mapped, bit for bit");

  /* Adapter store: misuse, then free-while-in-use and publish-while-in-use (deferred frees). */
  rf_store *st = NULL;
  expect(rf_store_create(NULL, 0, &st), RF_STATUS_INVALID_ARGUMENT, "'rt'", "store rt NULL");
  expect(rf_store_create(rt, 0, NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "store out NULL");
  if (ok(rf_store_create(rt, 1, &st), "store")) {
    char p8[4096], p64[4096];
    snprintf(p8, sizeof p8, "%s/adapters/lora-r8", fx);
    snprintf(p64, sizeof p64, "%s/adapters/lora-r64", fx);
    rf_adapter *sa = NULL, *sb = NULL, *mem = NULL;
    expect(rf_store_register(st, NULL, p8), RF_STATUS_INVALID_ARGUMENT, "'name'", "register name NULL");
    expect(rf_store_register(st, "r8", "/nonexistent/adapter"), RF_STATUS_IO, "/nonexistent/adapter", "register missing");
    ok(rf_store_register(st, "r8", p8), "register r8");
    expect(rf_store_register(st, "r8", p8), RF_STATUS_INVALID_ARGUMENT, "r8", "register twice");
    expect(rf_store_acquire(st, "nope", &sa), RF_STATUS_NOT_FOUND, "nope", "acquire unknown");
    expect(rf_store_acquire(st, "r8", NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "acquire out NULL");
    expect(rf_store_pin(st, "nope", true), RF_STATUS_NOT_FOUND, "nope", "pin unknown");
    expect(rf_store_publish(st, "r8", NULL, NULL), RF_STATUS_INVALID_ARGUMENT, "'a'", "publish NULL");
    expect(rf_store_stats_get(st, NULL), RF_STATUS_INVALID_ARGUMENT, "'out'", "stats out NULL");
    ok(rf_store_acquire(st, "r8", &sa), "acquire r8");
    uint64_t id = 0, gen = 9;
    ok(rf_adapter_version(sa, &id, &gen), "version");
    truth(id != 0 && gen == 0, "a store adapter's first version");
    /* Publish while sa is in use: sa stays whole, the next acquisition gets the new version. */
    ok(rf_adapter_load_peft(rt, p64, &mem), "load r64");
    ok(rf_store_publish(st, "r8", mem, &gen), "publish from memory");
    truth(gen == 1, "generation 1");
    ok(rf_store_acquire(st, "r8", &sb), "acquire the new version");
    rf_lora *la = NULL, *lb = NULL;
    ok(rf_adapter_module(sa, "layers.0.self_attn.q_proj", &la), "module of the held version");
    ok(rf_adapter_module(sb, "layers.0.self_attn.q_proj", &lb), "module of the new version");
    rf_lora_info ia, ib;
    ok(rf_lora_info_get(la, &ia), "info held");
    ok(rf_lora_info_get(lb, &ib), "info new");
    truth(ia.rank == 8 && ib.rank == 64, "held r8, new r64");
    ok(rf_store_publish_peft(st, "r8", p8, &gen), "publish from a folder while both are held");
    truth(gen == 2, "generation 2");
    /* Free the store while both are held: they stay valid until released. */
    rf_store_free(st);
    rf_lora_slot hs = {la, 0, 1.0f};
    ok(rf_linear(rt, &x, &wm, &bm, &hs, 1, NULL, &y), "linear with an adapter held across rf_store_free");
    rf_store_release(sa);
    /* rf_adapter_free on an acquired adapter releases it (no double free, no leak). */
    rf_adapter_free(sb);
    rf_store_release(NULL);
  }
  rf_store_free(NULL);

  free(y2);
  free(yh);
  free(xb);
  free(yb);
  rf_adapter_free(ad);
  rf_weights_free(wread);
  rf_weights_free(w);
  rf_runtime_free(rt);
  if (failures) { fprintf(stderr, "%d of %d checks failed\n", failures, checks); return 1; }
  printf("misuse: %d checks ok\n", checks);
  return 0;
}
