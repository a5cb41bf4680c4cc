/* Logits of a GGUF model through llama.cpp's own library, optionally with a GGUF LoRA adapter
 * applied (llama_adapter_lora_init + llama_set_adapter_lora): the tokens given on the command
 * line are decoded in one batch with logits for every position, written as raw f32
 * [n_tokens, n_vocab] to OUT. Exit codes: 2 model load failed, 3 adapter load failed, 4 other.
 *
 *   logits MODEL.gguf OUT.bin "t0,t1,..." [ADAPTER.gguf [SCALE]]
 */
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT.bin TOKENS [ADAPTER.gguf [SCALE]]\n", argv[0]);
        return 4;
    }
    llama_token toks[256];
    int n = 0;
    for (char *t = strtok(argv[3], ","); t && n < 256; t = strtok(NULL, ",")) toks[n++] = atoi(t);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *m = llama_model_load_from_file(argv[1], mp);
    if (!m) { fprintf(stderr, "model load failed: %s\n", argv[1]); return 2; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256; cp.n_batch = 256; cp.n_ubatch = 256;
    cp.n_threads = 2; cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; /* no f16 rounding of K/V */
    struct llama_context *c = llama_init_from_model(m, cp);
    if (!c) { fprintf(stderr, "context failed\n"); return 4; }
    if (argc > 4) {
        struct llama_adapter_lora *a = llama_adapter_lora_init(m, argv[4]);
        if (!a) { fprintf(stderr, "adapter load failed: %s\n", argv[4]); return 3; }
        float s = argc > 5 ? (float)atof(argv[5]) : 1.0f;
        if (llama_set_adapter_lora(c, a, s) != 0) { fprintf(stderr, "set adapter failed\n"); return 4; }
        printf("llama.cpp loaded adapter %s (scale %g)\n", argv[4], s);
    }
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(c, b) != 0) { fprintf(stderr, "decode failed\n"); return 4; }
    int nv = llama_vocab_n_tokens(llama_model_get_vocab(m));
    FILE *f = fopen(argv[2], "wb");
    if (!f) return 4;
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(c, i), sizeof(float), nv, f);
    fclose(f);
    llama_batch_free(b);
    llama_free(c);
    llama_model_free(m);
    llama_backend_free();
    return 0;
}
