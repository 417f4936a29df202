// Writes llama.cpp's next-token logits at every position of a text, for `qwen-run fidelity`.
//
// Build (benches/compare.py does this): cc -O2 benches/llama_logits.c -I$LLAMA/include
//   -L$LLAMA/bin -lllama -Wl,-rpath,$LLAMA/bin -o llama_logits
// Usage: llama_logits MODEL.gguf TEXT_FILE OUT_FILE [THREADS] [KV_TYPE]
// KV_TYPE: f16 (llama.cpp's default) or f32 (the exact computation, for an F32 reference).
// Output, little-endian: "QRLOGIT1", u32 n_tokens, u32 n_vocab, n_tokens u32 ids,
// n_tokens x n_vocab f32 logits. The text is tokenized without special tokens and run as one
// batch with flash attention off (the attention numerics qwen-run's f32 KV cache follows).
// Rope scaling comes from llama.cpp's own environment variables, as its tools read them:
// LLAMA_ARG_ROPE_SCALING_TYPE (none|linear|yarn), LLAMA_ARG_ROPE_SCALE, LLAMA_ARG_ROPE_FREQ_BASE,
// LLAMA_ARG_ROPE_FREQ_SCALE, LLAMA_ARG_YARN_ORIG_CTX, LLAMA_ARG_YARN_EXT_FACTOR,
// LLAMA_ARG_YARN_ATTN_FACTOR, LLAMA_ARG_YARN_BETA_SLOW, LLAMA_ARG_YARN_BETA_FAST.
#include "llama.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int env_float(const char *name, float *out) {
    const char *v = getenv(name);
    if (!v || !*v) return 0;
    *out = strtof(v, NULL);
    return 1;
}

static int fail(const char *what) {
    fprintf(stderr, "llama_logits: %s\n", what);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) return fail("usage: llama_logits MODEL.gguf TEXT_FILE OUT_FILE [THREADS] [f16|f32]");
    int threads = argc > 4 ? atoi(argv[4]) : 2;
    const char *kv = argc > 5 ? argv[5] : "f16";
    if (strcmp(kv, "f16") != 0 && strcmp(kv, "f32") != 0) return fail("KV_TYPE must be f16 or f32");

    FILE *tf = fopen(argv[2], "rb");
    if (!tf) return fail("cannot open the text file");
    fseek(tf, 0, SEEK_END);
    long text_len = ftell(tf);
    fseek(tf, 0, SEEK_SET);
    char *text = malloc(text_len + 1);
    if (fread(text, 1, text_len, tf) != (size_t)text_len) return fail("cannot read the text file");
    text[text_len] = 0;
    fclose(tf);

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return fail("cannot load the model");
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);

    int cap = (int)text_len + 16;
    llama_token *tokens = malloc(sizeof(llama_token) * cap);
    int n = llama_tokenize(vocab, text, (int)text_len, tokens, cap, false, false);
    if (n <= 0) return fail("tokenization failed");

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + 8;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (strcmp(kv, "f32") == 0) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
    }
    const char *scaling = getenv("LLAMA_ARG_ROPE_SCALING_TYPE");
    if (scaling && strcmp(scaling, "none") == 0) cp.rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_NONE;
    else if (scaling && strcmp(scaling, "linear") == 0) cp.rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_LINEAR;
    else if (scaling && strcmp(scaling, "yarn") == 0) cp.rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_YARN;
    else if (scaling && *scaling) return fail("LLAMA_ARG_ROPE_SCALING_TYPE must be none, linear or yarn");
    float f;
    if (env_float("LLAMA_ARG_ROPE_SCALE", &f)) cp.rope_freq_scale = 1.0f / f;
    if (env_float("LLAMA_ARG_ROPE_FREQ_SCALE", &f)) cp.rope_freq_scale = f;
    if (env_float("LLAMA_ARG_ROPE_FREQ_BASE", &f)) cp.rope_freq_base = f;
    if (env_float("LLAMA_ARG_YARN_ORIG_CTX", &f)) cp.yarn_orig_ctx = (uint32_t)f;
    if (env_float("LLAMA_ARG_YARN_EXT_FACTOR", &f)) cp.yarn_ext_factor = f;
    if (env_float("LLAMA_ARG_YARN_ATTN_FACTOR", &f)) cp.yarn_attn_factor = f;
    if (env_float("LLAMA_ARG_YARN_BETA_SLOW", &f)) cp.yarn_beta_slow = f;
    if (env_float("LLAMA_ARG_YARN_BETA_FAST", &f)) cp.yarn_beta_fast = f;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) return fail("cannot create the context");

    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) return fail("llama_decode failed");

    FILE *out = fopen(argv[3], "wb");
    if (!out) return fail("cannot create the output file");
    uint32_t header[2] = {(uint32_t)n, (uint32_t)n_vocab};
    fwrite("QRLOGIT1", 1, 8, out);
    fwrite(header, 4, 2, out);
    fwrite(tokens, 4, n, out);
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), 4, n_vocab, out);
    if (fclose(out) != 0) return fail("cannot write the output file");
    fprintf(stderr, "llama_logits: %d tokens x %d logits -> %s\n", n, n_vocab, argv[3]);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
