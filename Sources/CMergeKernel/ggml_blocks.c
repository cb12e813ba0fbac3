/* GGML block types (docs/formats.md §11). The 32-value types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0:
 * decoding as ggml's dequantize_row_*, and encoding by the rules of its reference quantizers
 * (quantize_row_*_ref in ggml-quants.c, what ggml_quantize_chunk does without an importance
 * matrix), so that the bytes are llama.cpp's own. Block layouts: d (F16) [, m (F16)] [, qh (32
 * bits, the fifth bit of value j at bit j)], then 16 bytes whose low nibble is value j and high
 * nibble value j + 16 (Q8_0: d then 32 signed bytes). */
#include "merge_kernel.h"
#include "half.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* Products and sums rounded one by one, as the reference is written. */
#pragma clang fp contract(off)

static inline float load_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

static inline void store_half(uint8_t *p, float v) {
    uint16_t h = f32_to_f16(v);
    memcpy(p, &h, 2);
}

/* The value of largest magnitude (the first of equal magnitudes), as q4_0/q5_0 pick it. */
static inline float signed_max(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

static inline void min_max(const float *x, float *min, float *max) {
    *min = FLT_MAX;
    *max = -FLT_MAX;
    for (int j = 0; j < 32; j++) {
        if (x[j] < *min) *min = x[j];
        if (x[j] > *max) *max = x[j];
    }
}

static void encode_block(int type, const float *x, uint8_t *y) {
    switch (type) {
    case ADAPTER_GGML_Q8_0: {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
        const float d = amax / 127, id = d ? 1.0f / d : 0.0f;
        store_half(y, d);
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
        break;
    }
    case ADAPTER_GGML_Q4_0:
    case ADAPTER_GGML_Q5_0: {
        const int five = type == ADAPTER_GGML_Q5_0;
        const float d = signed_max(x) / (five ? -16 : -8), id = d ? 1.0f / d : 0.0f;
        const float offset = five ? 16.5f : 8.5f;
        const int top = five ? 31 : 15;
        store_half(y, d);
        uint8_t *qs = y + (five ? 6 : 2);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            int a = (int8_t)(x[j] * id + offset), b = (int8_t)(x[16 + j] * id + offset);
            uint8_t q0 = (uint8_t)(a < top ? a : top), q1 = (uint8_t)(b < top ? b : top);
            qs[j] = (uint8_t)((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= ((q0 & 0x10u) >> 4) << j;
            qh |= ((q1 & 0x10u) >> 4) << (j + 16);
        }
        if (five) memcpy(y + 2, &qh, 4);
        break;
    }
    case ADAPTER_GGML_Q4_1:
    case ADAPTER_GGML_Q5_1: {
        const int five = type == ADAPTER_GGML_Q5_1;
        float min, max;
        min_max(x, &min, &max);
        const float d = (max - min) / (five ? 31 : 15), id = d ? 1.0f / d : 0.0f;
        store_half(y, d);
        store_half(y + 2, min);
        uint8_t *qs = y + (five ? 8 : 4);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            const float x0 = (x[j] - min) * id, x1 = (x[16 + j] - min) * id;
            uint8_t q0, q1;
            if (five) {
                q0 = (uint8_t)(x0 + 0.5f);
                q1 = (uint8_t)(x1 + 0.5f);
            } else {
                int a = (int8_t)(x0 + 0.5f), b = (int8_t)(x1 + 0.5f);
                q0 = (uint8_t)(a < 15 ? a : 15);
                q1 = (uint8_t)(b < 15 ? b : 15);
            }
            qs[j] = (uint8_t)((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= ((q0 & 0x10u) >> 4) << j;
            qh |= ((q1 & 0x10u) >> 4) << (j + 16);
        }
        if (five) memcpy(y + 4, &qh, 4);
        break;
    }
    }
}

static void decode_block(int type, const uint8_t *x, float *y) {
    const float d = load_half(x);
    switch (type) {
    case ADAPTER_GGML_Q8_0:
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)x[2 + j] * d;
        break;
    case ADAPTER_GGML_Q4_0:
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((x[2 + j] & 0x0F) - 8) * d;
            y[16 + j] = (float)((x[2 + j] >> 4) - 8) * d;
        }
        break;
    case ADAPTER_GGML_Q4_1: {
        const float m = load_half(x + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(x[4 + j] & 0x0F) * d + m;
            y[16 + j] = (float)(x[4 + j] >> 4) * d + m;
        }
        break;
    }
    case ADAPTER_GGML_Q5_0:
    case ADAPTER_GGML_Q5_1: {
        const int one = type == ADAPTER_GGML_Q5_1;
        const float m = one ? load_half(x + 2) : 0.0f;
        uint32_t qh;
        memcpy(&qh, x + (one ? 4 : 2), 4);
        const uint8_t *qs = x + (one ? 8 : 6);
        for (int j = 0; j < 16; j++) {
            const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
            const int v0 = (qs[j] & 0x0F) | h0, v1 = (qs[j] >> 4) | h1;
            if (one) {
                y[j] = (float)v0 * d + m;
                y[16 + j] = (float)v1 * d + m;
            } else {
                y[j] = (float)(v0 - 16) * d;
                y[16 + j] = (float)(v1 - 16) * d;
            }
        }
        break;
    }
    }
}

/* The K-quants, 256 values per super-block, decoded as ggml's dequantize_row_q*_K (every product and
 * difference in the same order, Float32). Layouts (ggml-common.h): Q2_K scales[16] qs[64] d dmin;
 * Q3_K hmask[32] qs[64] scales[12] d; Q4_K d dmin scales[12] qs[128]; Q5_K d dmin scales[12] qh[32]
 * qs[128]; Q6_K ql[128] qh[64] scales[16] (int8) d. */
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void decode_k_block(int type, const uint8_t *x, float *y) {
    switch (type) {
    case ADAPTER_GGML_Q2_K: {
        const float d = load_half(x + 80), min = load_half(x + 82);
        const uint8_t *q = x + 16;
        int is = 0;
        for (int n = 0; n < 256; n += 128) {
            int shift = 0;
            for (int j = 0; j < 4; ++j) {
                for (int half = 0; half < 2; half++) {
                    const uint8_t sc = x[is++];
                    const float dl = d * (float)(sc & 0xF), ml = min * (float)(sc >> 4);
                    for (int l = 0; l < 16; ++l) *y++ = dl * (float)(int8_t)((q[l + 16 * half] >> shift) & 3) - ml;
                }
                shift += 2;
            }
            q += 32;
        }
        break;
    }
    case ADAPTER_GGML_Q3_K: {
        const float d_all = load_half(x + 108);
        const uint8_t *q = x + 32, *hm = x;
        uint32_t aux[4];
        memcpy(aux, x + 96, 12);
        const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f, tmp = aux[2];
        aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
        aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
        aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
        aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
        int8_t scales[16];
        memcpy(scales, aux, 16);
        uint8_t m = 1;
        int is = 0;
        for (int n = 0; n < 256; n += 128) {
            int shift = 0;
            for (int j = 0; j < 4; ++j) {
                for (int half = 0; half < 2; half++) {
                    const float dl = d_all * (float)(scales[is++] - 32);
                    for (int l = 16 * half; l < 16 * half + 16; ++l) *y++ = dl * (float)((int8_t)((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                }
                shift += 2;
                m <<= 1;
            }
            q += 32;
        }
        break;
    }
    case ADAPTER_GGML_Q4_K:
    case ADAPTER_GGML_Q5_K: {
        const int five = type == ADAPTER_GGML_Q5_K;
        const float d = load_half(x), min = load_half(x + 2);
        const uint8_t *scales = x + 4, *qh = x + 16, *q = x + (five ? 48 : 16);
        uint8_t u1 = 1, u2 = 2;
        int is = 0;
        for (int j = 0; j < 256; j += 64) {
            uint8_t sc, m;
            scale_min_k4(is + 0, scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = min * (float)m;
            scale_min_k4(is + 1, scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = min * (float)m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * (float)((q[l] & 0xF) + (five && (qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * (float)((q[l] >> 4) + (five && (qh[l] & u2) ? 16 : 0)) - m2;
            q += 32;
            is += 2;
            u1 <<= 2;
            u2 <<= 2;
        }
        break;
    }
    case ADAPTER_GGML_Q6_K: {
        const float d = load_half(x + 208);
        const uint8_t *ql = x, *qh = x + 128;
        const int8_t *sc = (const int8_t *)(x + 192);
        for (int n = 0; n < 256; n += 128) {
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int8_t q1 = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int8_t q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int8_t q3 = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int8_t q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * (float)sc[is + 0] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
        break;
    }
    }
}

static size_t k_block_bytes(int type) {
    switch (type) {
    case ADAPTER_GGML_Q2_K: return 84;
    case ADAPTER_GGML_Q3_K: return 110;
    case ADAPTER_GGML_Q4_K: return 144;
    case ADAPTER_GGML_Q5_K: return 176;
    case ADAPTER_GGML_Q6_K: return 210;
    default: return 0;
    }
}

static size_t block_bytes(int type) {
    switch (type) {
    case ADAPTER_GGML_Q4_0: return 18;
    case ADAPTER_GGML_Q4_1: return 20;
    case ADAPTER_GGML_Q5_0: return 22;
    case ADAPTER_GGML_Q5_1: return 24;
    case ADAPTER_GGML_Q8_0: return 34;
    default: return 0;
    }
}

int adapter_ggml_encode(int type, const float *x, uint8_t *y, size_t n) {
    const size_t size = block_bytes(type);
    if (!size || n % 32) return 0;
    for (size_t b = 0; b < n / 32; b++) encode_block(type, x + 32 * b, y + size * b);
    return 1;
}

int adapter_ggml_decode(int type, const uint8_t *x, float *y, size_t n) {
    const size_t k = k_block_bytes(type);
    if (k) {
        if (n % 256) return 0;
        for (size_t b = 0; b < n / 256; b++) decode_k_block(type, x + k * b, y + 256 * b);
        return 1;
    }
    const size_t size = block_bytes(type);
    if (!size || n % 32) return 0;
    for (size_t b = 0; b < n / 32; b++) decode_block(type, x + size * b, y + 32 * b);
    return 1;
}
