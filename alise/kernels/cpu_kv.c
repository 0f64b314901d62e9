/* int8 / int4 KV pages on the CPU, natively: decode attention on the codes, and the quantizing writer.

   The torch backend's decode step on quantized pages (reference.py, ``_attention_on_codes``) is ~20 tensor ops
   per layer and its quantizer ~12 (int8) to ~25 (int4) more, each a pass of its own; here each is one pass.
   ``native.py`` compiles this file with the system's C compiler on first use (-O3 -march=native -fopenmp) and
   calls it through ctypes; torch's own OpenMP runtime (libgomp.so.1, already loaded) runs the threads.

   Decode attention: one task per (sequence b, kv head h), spread over the threads. A task reads its sequence's
   pages through the block table, token by token:
     1. scores: for each of the G query heads of kv head h,
          int8:  s_n = sm_scale * k_scale_n * sum_d q_d k_nd
          int4:  s_n = sm_scale * sum_groups (k_scale_ng * sum_{d in g} q_d u_nd + k_offset_ng * sum_{d in g} q_d)
        into ``scores`` (a caller's workspace, G x max_len floats per task);
     2. softmax over the n < seq_len visible tokens (max, exp, sum);
     3. values: out_d = sum_n p_n (v_scale_n v_nd) [+ sum_n p_n v_offset_n for int4].
   Everything is float32. int4 pages hold Hadamard-rotated vectors: the caller rotates q in and the output back.
   A token's codes are converted to floats once and serve all G query heads; each dot product ends in one
   horizontal sum (hence -fassociative-math: without it the compiler sums the vector's lanes one by one).

   Memory layout (kernels/__init__.py): pages [num_blocks, block_size, Hkv, D] int8, or [.., D / 2] uint8 for
   int4 (byte j: channel 2j in the low nibble, 2j + 1 in the high one); scales fp16 [num_blocks, block_size,
   Hkv, entries]: int8 one scale; int4 keys (scale, offset) per group of 32 channels, values one pair. q and out
   are float32 [B, Hkv, G, D], contiguous. fp16 is C's _Float16 (gcc >= 12, clang >= 15): a compiler without it
   fails the build, and the torch ops run instead. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16        /* query heads per kv head */
#define MAX_KEY_GROUPS 8    /* int4 (scale, offset) pairs per key */
/* int4 loops run over bytes, which would make the vectorizer pick 64 lanes (more than head_dim / 2 = 32 bytes,
   so the whole loop would fall to its scalar remainder): ask for float-wide vectors instead */
#define SIMD_FLOATS 16
/* reference.py's constants */
#define SCALE_MIN 6.103515625e-05f       /* 2 ** -14 */
#define SCALE_MAX 65504.f
#define OFFSET_MARGIN 9.765625e-04f      /* 2 ** -10 */

static inline float half_to_float(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}

/* exp(x) for x <= 0, vectorizable (libm's expf is a call per element): x = n ln2 + r with |r| <= ln2 / 2,
   exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7 there), times 2^n built in the exponent
   bits. Below -87 the result would be subnormal: it flushes to 0, which a softmax weight can be. */
static inline float exp_nonpositive(float x) {
    const float log2e = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-6f;
    x = x < -87.f ? -87.f : x;
    const float n = floorf(x * log2e + 0.5f), r = x - n * ln2_hi - n * ln2_lo;
    float p = 1.f / 720;
    p = p * r + 1.f / 120; p = p * r + 1.f / 24; p = p * r + 1.f / 6; p = p * r + 0.5f; p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return x <= -87.f ? 0.f : p * two_n;
}

/* softmax of G rows of ``len`` scores in place (each row ``stride`` floats apart) */
static void softmax_rows(float *scores, int group, int len, int stride) {
    for (int g = 0; g < group; g++) {
        float *row = scores + (int64_t)g * stride, max = -INFINITY, sum = 0.f;
        #pragma omp simd reduction(max:max)
        for (int n = 0; n < len; n++) max = row[n] > max ? row[n] : max;
        #pragma omp simd reduction(+:sum)
        for (int n = 0; n < len; n++) { row[n] = exp_nonpositive(row[n] - max); sum += row[n]; }
        const float inv = 1.f / sum;
        #pragma omp simd
        for (int n = 0; n < len; n++) row[n] *= inv;
    }
}

/* the cache slot of a sequence's token n, through its row of the block table */
static inline int64_t slot_of(const int32_t *table_row, int n, int block_size) {
    return (int64_t)table_row[n / block_size] * block_size + n % block_size;
}

/* -2 unless every sequence's length fits its table row and every block it reads is in the pool: a bad block
   table fails the step instead of reading past the pages */
static int check_tables(const int32_t *block_tables, const int32_t *seq_lens, int batch, int table_width,
                        int block_size, int num_blocks) {
    for (int b = 0; b < batch; b++) {
        if (seq_lens[b] < 0 || seq_lens[b] > table_width * block_size) return -2;
        for (int c = 0; c < (seq_lens[b] + block_size - 1) / block_size; c++) {
            const int32_t block = block_tables[b * table_width + c];
            if (block < 0 || block >= num_blocks) return -2;
        }
    }
    return 0;
}

int decode_attention_int8(const float *q, const int8_t *k_pages, const int8_t *v_pages,
                          const uint16_t *k_scales, const uint16_t *v_scales,
                          const int32_t *block_tables, const int32_t *seq_lens, float *out, float *scores,
                          int batch, int num_kv_heads, int group, int head_dim, int block_size, int table_width,
                          int num_blocks, float sm_scale) {
    if (head_dim > MAX_HEAD_DIM || group > MAX_GROUP) return -1;
    if (check_tables(block_tables, seq_lens, batch, table_width, block_size, num_blocks)) return -2;
    const int max_len = table_width * block_size;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;         /* page bytes per token */
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < batch; b++) {
        for (int h = 0; h < num_kv_heads; h++) {
            const int len = seq_lens[b];
            const float *qh = q + ((int64_t)b * num_kv_heads + h) * group * head_dim;     /* (G, D) */
            float *sc = scores + ((int64_t)b * num_kv_heads + h) * group * max_len;       /* (G, max_len) */
            float *o = out + ((int64_t)b * num_kv_heads + h) * group * head_dim;          /* (G, D) */
            for (int n = 0; n < len; n++) {
                const int64_t slot = slot_of(block_tables + (int64_t)b * table_width, n, block_size);
                const int8_t *k = k_pages + slot * token_stride + (int64_t)h * head_dim;
                const float scale = half_to_float(k_scales[slot * num_kv_heads + h]) * sm_scale;
                for (int g = 0; g < group; g++) {
                    const float *qg = qh + g * head_dim;
                    float dot = 0.f;
                    #pragma omp simd reduction(+:dot)
                    for (int d = 0; d < head_dim; d++) dot += qg[d] * (float)k[d];
                    sc[(int64_t)g * max_len + n] = dot * scale;
                }
            }
            softmax_rows(sc, group, len, max_len);
            memset(o, 0, sizeof(float) * group * head_dim);
            for (int n = 0; n < len; n++) {
                const int64_t slot = slot_of(block_tables + (int64_t)b * table_width, n, block_size);
                const int8_t *v = v_pages + slot * token_stride + (int64_t)h * head_dim;
                const float scale = half_to_float(v_scales[slot * num_kv_heads + h]);
                for (int g = 0; g < group; g++) {
                    const float weight = sc[(int64_t)g * max_len + n] * scale;
                    float *og = o + g * head_dim;
                    #pragma omp simd
                    for (int d = 0; d < head_dim; d++) og[d] += weight * (float)v[d];
                }
            }
        }
    }
    return 0;
}

int decode_attention_int4(const float *q, const uint8_t *k_pages, const uint8_t *v_pages,
                          const uint16_t *k_params, const uint16_t *v_params,
                          const int32_t *block_tables, const int32_t *seq_lens, float *out, float *scores,
                          int batch, int num_kv_heads, int group, int head_dim, int block_size, int table_width,
                          int num_blocks, int key_groups, float sm_scale) {
    if (head_dim > MAX_HEAD_DIM || group > MAX_GROUP || key_groups > MAX_KEY_GROUPS
        || head_dim % (2 * key_groups)) return -1;
    if (check_tables(block_tables, seq_lens, batch, table_width, block_size, num_blocks)) return -2;
    const int max_len = table_width * block_size, half = head_dim / 2, group_bytes = half / key_groups;
    const int64_t token_stride = (int64_t)num_kv_heads * half;             /* page bytes per token */
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < batch; b++) {
        for (int h = 0; h < num_kv_heads; h++) {
            const int len = seq_lens[b];
            const float *qh = q + ((int64_t)b * num_kv_heads + h) * group * head_dim;
            float *sc = scores + ((int64_t)b * num_kv_heads + h) * group * max_len;
            float *o = out + ((int64_t)b * num_kv_heads + h) * group * head_dim;
            /* the query split by nibble: q_even[j] meets byte j's low nibble, q_odd[j] its high one; and each
               key group's channel sum, which its offset multiplies */
            float q_even[MAX_GROUP][MAX_HEAD_DIM / 2], q_odd[MAX_GROUP][MAX_HEAD_DIM / 2];
            float q_sum[MAX_GROUP][MAX_KEY_GROUPS];
            for (int g = 0; g < group; g++) {
                for (int j = 0; j < half; j++) {
                    q_even[g][j] = qh[g * head_dim + 2 * j];
                    q_odd[g][j] = qh[g * head_dim + 2 * j + 1];
                }
                for (int kg = 0; kg < key_groups; kg++) {
                    float sum = 0.f;
                    for (int j = kg * group_bytes; j < (kg + 1) * group_bytes; j++) sum += q_even[g][j] + q_odd[g][j];
                    q_sum[g][kg] = sum;
                }
            }
            for (int n = 0; n < len; n++) {
                const int64_t slot = slot_of(block_tables + (int64_t)b * table_width, n, block_size);
                const uint8_t *k = k_pages + slot * token_stride + (int64_t)h * half;
                const uint16_t *params = k_params + (slot * num_kv_heads + h) * 2 * key_groups;
                /* the token's codes as floats, each times its group's scale, unpacked once for the G rows */
                float k_lo[MAX_HEAD_DIM / 2], k_hi[MAX_HEAD_DIM / 2], offset_term[MAX_GROUP] = {0};
                for (int kg = 0; kg < key_groups; kg++) {
                    const float scale = half_to_float(params[2 * kg]), offset = half_to_float(params[2 * kg + 1]);
                    #pragma omp simd simdlen(SIMD_FLOATS)
                    for (int j = kg * group_bytes; j < (kg + 1) * group_bytes; j++) {
                        k_lo[j] = scale * (float)(k[j] & 15);
                        k_hi[j] = scale * (float)(k[j] >> 4);
                    }
                    for (int g = 0; g < group; g++) offset_term[g] += offset * q_sum[g][kg];
                }
                for (int g = 0; g < group; g++) {
                    const float *qe = q_even[g], *qo = q_odd[g];
                    float dot = 0.f;
                    #pragma omp simd reduction(+:dot)
                    for (int j = 0; j < half; j++) dot += qe[j] * k_lo[j] + qo[j] * k_hi[j];
                    sc[(int64_t)g * max_len + n] = (dot + offset_term[g]) * sm_scale;
                }
            }
            softmax_rows(sc, group, len, max_len);
            float o_even[MAX_GROUP][MAX_HEAD_DIM / 2], o_odd[MAX_GROUP][MAX_HEAD_DIM / 2], o_offset[MAX_GROUP];
            memset(o_even, 0, sizeof o_even);
            memset(o_odd, 0, sizeof o_odd);
            memset(o_offset, 0, sizeof o_offset);
            for (int n = 0; n < len; n++) {
                const int64_t slot = slot_of(block_tables + (int64_t)b * table_width, n, block_size);
                const uint8_t *v = v_pages + slot * token_stride + (int64_t)h * half;
                const uint16_t *params = v_params + (slot * num_kv_heads + h) * 2;
                const float scale = half_to_float(params[0]), offset = half_to_float(params[1]);
                float v_lo[MAX_HEAD_DIM / 2], v_hi[MAX_HEAD_DIM / 2];     /* unpacked once for the G rows */
                #pragma omp simd simdlen(SIMD_FLOATS)
                for (int j = 0; j < half; j++) {
                    v_lo[j] = (float)(v[j] & 15);
                    v_hi[j] = (float)(v[j] >> 4);
                }
                for (int g = 0; g < group; g++) {
                    const float p = sc[(int64_t)g * max_len + n], weight = p * scale;
                    o_offset[g] += p * offset;
                    #pragma omp simd
                    for (int j = 0; j < half; j++) {
                        o_even[g][j] += weight * v_lo[j];
                        o_odd[g][j] += weight * v_hi[j];
                    }
                }
            }
            for (int g = 0; g < group; g++)
                for (int j = 0; j < half; j++) {
                    o[g * head_dim + 2 * j] = o_even[g][j] + o_offset[g];
                    o[g * head_dim + 2 * j + 1] = o_odd[g][j] + o_offset[g];
                }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
   The writer: a step's new K and V: quantize each (token, kv head) vector and store it at its slot (-1: skip), the
   formats of reference.py. int8 reproduces the reference code for code (the same IEEE operations in the same
   order); int4 rotates with a fast Walsh-Hadamard transform, whose sums run in another order than torch's
   matmul, so a code can differ by one where a value lands on a rounding boundary (tests/test_kernels_native.py).
   Inputs are float32 or bf16 [T, Hkv, D] with contiguous rows; one task per token.
   ------------------------------------------------------------------------------------------------------------ */

static inline float input_at(const void *x, int is_bf16, int64_t i) {
    if (!is_bf16) return ((const float *)x)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;     /* bf16 is float32's top half */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* float32 -> fp16 -> float32, rounding to nearest even as torch's .to(float16) does */
static inline uint16_t to_half(float x, float *rounded) {
    const _Float16 h = (_Float16)x;
    uint16_t bits;
    memcpy(&bits, &h, sizeof bits);
    *rounded = (float)h;
    return bits;
}

static void quantize_int8_row(const float *x, int head_dim, int8_t *codes, uint16_t *scale_out) {
    float absmax = 0.f;
    for (int d = 0; d < head_dim; d++) absmax = fabsf(x[d]) > absmax ? fabsf(x[d]) : absmax;
    float scale;
    *scale_out = to_half(clampf(absmax / 127.f, SCALE_MIN, SCALE_MAX), &scale);
    for (int d = 0; d < head_dim; d++) codes[d] = (int8_t)clampf(floorf(x[d] / scale + 0.5f), -127.f, 127.f);
}

/* x (already rotated) -> packed nibbles and (scale, offset) per group of head_dim / groups channels */
static void quantize_int4_row(const float *x, int head_dim, int groups, uint8_t *packed, uint16_t *params) {
    const int width = head_dim / groups;
    for (int g = 0; g < groups; g++) {
        const float *xg = x + g * width;
        float lo = xg[0], hi = xg[0];
        for (int d = 1; d < width; d++) { lo = xg[d] < lo ? xg[d] : lo; hi = xg[d] > hi ? xg[d] : hi; }
        float offset, scale;
        params[2 * g + 1] = to_half(clampf(lo - fabsf(lo) * OFFSET_MARGIN, -SCALE_MAX, SCALE_MAX), &offset);
        params[2 * g] = to_half(clampf((hi - offset) / 15.f, SCALE_MIN, SCALE_MAX), &scale);
        for (int d = 0; d < width; d += 2) {
            const uint8_t even = (uint8_t)clampf(floorf((xg[d] - offset) / scale + 0.5f), 0.f, 15.f);
            const uint8_t odd = (uint8_t)clampf(floorf((xg[d + 1] - offset) / scale + 0.5f), 0.f, 15.f);
            packed[(g * width + d) / 2] = even | (uint8_t)(odd << 4);
        }
    }
}

/* x @ H / sqrt(D) in place for Sylvester's H (a fast Walsh-Hadamard transform: log2(D) butterfly passes) */
static void rotate_row(float *x, int head_dim) {
    for (int span = 1; span < head_dim; span *= 2)
        for (int i = 0; i < head_dim; i += 2 * span)
            for (int j = i; j < i + span; j++) {
                const float a = x[j], b = x[j + span];
                x[j] = a + b;
                x[j + span] = a - b;
            }
    const float norm = 1.f / sqrtf((float)head_dim);
    for (int d = 0; d < head_dim; d++) x[d] *= norm;
}

int write_kv_quantized(const void *key, const void *value, int is_bf16, void *k_pages, void *v_pages,
                       uint16_t *k_scales, uint16_t *v_scales, const int64_t *slots, int num_tokens,
                       int64_t num_slots, int num_kv_heads, int head_dim, int is_int4, int key_groups) {
    if (head_dim > MAX_HEAD_DIM || key_groups > MAX_KEY_GROUPS || (is_int4 && head_dim % (2 * key_groups)))
        return -1;
    for (int t = 0; t < num_tokens; t++)             /* a slot past the pool fails the write, before any store */
        if (slots[t] >= num_slots) return -2;
    const int row_bytes = is_int4 ? head_dim / 2 : head_dim;
    const int k_entries = is_int4 ? 2 * key_groups : 1, v_entries = is_int4 ? 2 : 1;
    #pragma omp parallel for schedule(static) if (num_tokens > 16)
    for (int t = 0; t < num_tokens; t++) {
        if (slots[t] < 0) continue;
        for (int h = 0; h < num_kv_heads; h++) {
            const int64_t row = ((int64_t)t * num_kv_heads + h) * head_dim, out = slots[t] * num_kv_heads + h;
            for (int side = 0; side < 2; side++) {                      /* K, then V */
                const void *src = side ? value : key;
                uint8_t *pages = (uint8_t *)(side ? v_pages : k_pages) + out * row_bytes;
                float x[MAX_HEAD_DIM];
                for (int d = 0; d < head_dim; d++) x[d] = input_at(src, is_bf16, row + d);
                if (!is_int4) {
                    quantize_int8_row(x, head_dim, (int8_t *)pages, (side ? v_scales : k_scales) + out);
                } else {
                    rotate_row(x, head_dim);
                    quantize_int4_row(x, head_dim, side ? 1 : key_groups, pages,
                                      (side ? v_scales + out * v_entries : k_scales + out * k_entries));
                }
            }
        }
    }
    return 0;
}
