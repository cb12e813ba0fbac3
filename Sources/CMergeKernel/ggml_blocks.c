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

/* The value of largest magnitude among n (the first of equal magnitudes), as the reference
 * quantizers pick it; its magnitude in *amax when asked. */
static inline float signed_max(const float *x, int n, float *amax_out) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    if (amax_out) *amax_out = amax;
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
        const float d = signed_max(x, 32, NULL) / (five ? -16 : -8), id = d ? 1.0f / d : 0.0f;
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

/* The reference K-quantizers of Q4_K, Q5_K and Q6_K (ggml-quants.c quantize_row_q*_K_ref with
 * their helpers nearest_int, make_qx_quants and make_qkx2_quants), step for step: the scale
 * searches, the 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) scales against an F16 super-block scale, then
 * the codes against the stored scales. */
#define GROUP_MAX_EPS 1e-15f

static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

static float make_qx_quants_rmse1(int n, int nmax, const float *x, int8_t *L) {
    float amax;
    const float max = signed_max(x, n, &amax);
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + (l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static float make_qkx2_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *the_min, uint8_t *Laux,
                              float rmin, float rdelta, int nstep, int use_mad) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = l < 0 ? 0 : l > nmax ? nmax : l;
            Laux[i] = (uint8_t)l;
            const float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* Q4_K (nmax 15: rmin −1, 20 steps) and Q5_K (nmax 31: rmin −0.5, 15 steps). */
static void encode_q45_k(int five, const float *x, uint8_t *y) {
    uint8_t L[256], Laux[32];
    float weights[32], mins[8], scales[8];
    const int nmax = five ? 31 : 15;
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, five ? -0.5f : -1.f, 0.1f, five ? 15 : 20, 0);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint8_t *sc = y + 4;
    memset(sc, 0, 12);
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = ls < 63 ? ls : 63;
        lm = lm < 63 ? lm : 63;
        if (j < 4) {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
            sc[j - 0] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    store_half(y, max_scale / 63.f);
    store_half(y + 2, max_min / 63.f);
    const float dd = load_half(y), dmin = load_half(y + 2);
    for (int j = 0; j < 8; ++j) {
        uint8_t s, m;
        scale_min_k4(j, sc, &s, &m);
        const float d = dd * s;
        if (!d) continue;
        const float dm = dmin * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        }
    }
    if (!five) {
        uint8_t *q = y + 16;
        for (int j = 0; j < 256; j += 64) {
            for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
            q += 32;
        }
        return;
    }
    uint8_t *qh = y + 16, *ql = y + 48;
    memset(qh, 0, 32);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < 256; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j], l2 = L[n + j + 32];
            if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
            if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
            ql[j] = (uint8_t)(l1 | (l2 << 4));
        }
        m1 <<= 2;
        m2 <<= 2;
        ql += 32;
    }
}

static void encode_q6_k(const float *x, uint8_t *y) {
    int8_t L[256];
    float scales[16];
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float scale = make_qx_quants_rmse1(16, 32, x + 16 * ib, L + 16 * ib);
        scales[ib] = scale;
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
        memset(y, 0, 210);
        store_half(y + 208, 0.f);
        return;
    }
    int8_t *sc = (int8_t *)(y + 192);
    const float iscale = -128.f / max_scale;
    store_half(y + 208, 1 / iscale);
    for (int ib = 0; ib < 16; ++ib) {
        const int v = nearest_int(iscale * scales[ib]);
        sc[ib] = (int8_t)(v < 127 ? v : 127);
    }
    const float dd = load_half(y + 208);
    for (int j = 0; j < 16; ++j) {
        const float d = dd * sc[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            l = l < -32 ? -32 : l > 31 ? 31 : l;
            L[16 * j + ii] = (int8_t)(l + 32);
        }
    }
    uint8_t *ql = y, *qh = y + 128;
    for (int j = 0; j < 256; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l + 0] & 0xF, q2 = L[j + l + 32] & 0xF, q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
            ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

static float make_q3_quants_rmse(int n, int nmax, const float *x, int8_t *L) {
    float amax;
    const float max = signed_max(x, n, &amax);
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    const float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = new_l < -nmax ? -nmax : new_l > nmax - 1 ? nmax - 1 : new_l;
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Four 2-bit codes per byte: value j + 32·s at bits 2s of byte j (per 128 values). */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < 256; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

static void encode_q2_k(const float *x, uint8_t *y) {
    uint8_t L[256], Laux[16];
    float weights[16], mins[16], scales[16];
    const float q4scale = 15.f;
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
        for (int l = 0; l < 16; ++l) weights[l] = fabsf(x[16 * j + l]);
        scales[j] = make_qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 1);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint8_t *sc = y;
    if (max_scale > 0) {
        const float iscale = q4scale / max_scale;
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
        store_half(y + 80, max_scale / q4scale);
    } else {
        for (int j = 0; j < 16; ++j) sc[j] = 0;
        store_half(y + 80, 0.f);
    }
    if (max_min > 0) {
        const float iscale = q4scale / max_min;
        for (int j = 0; j < 16; ++j) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
        store_half(y + 82, max_min / q4scale);
    } else {
        store_half(y + 82, 0.f);
    }
    const float dd = load_half(y + 80), dmin = load_half(y + 82);
    for (int j = 0; j < 16; ++j) {
        const float d = dd * (sc[j] & 0xF);
        if (!d) continue;
        const float dm = dmin * (sc[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            const int l = nearest_int((x[16 * j + ii] + dm) / d);
            L[16 * j + ii] = (uint8_t)(l < 0 ? 0 : l > 3 ? 3 : l);
        }
    }
    pack_2bit(L, y + 16);
}

static void encode_q3_k(const float *x, uint8_t *y) {
    int8_t L[256];
    float scales[16];
    float max_scale = 0, amax = 0;
    for (int j = 0; j < 16; ++j) {
        scales[j] = make_q3_quants_rmse(16, 4, x + 16 * j, L + 16 * j);
        const float scale = fabsf(scales[j]);
        if (scale > amax) {
            amax = scale;
            max_scale = scales[j];
        }
    }
    uint8_t *sc = y + 96;
    memset(sc, 0, 12);
    if (max_scale) {
        const float iscale = -32.f / max_scale;
        for (int j = 0; j < 16; ++j) {
            int8_t l = (int8_t)nearest_int(iscale * scales[j]);
            l = (int8_t)((l < -32 ? -32 : l > 31 ? 31 : l) + 32);
            if (j < 8) sc[j] = (uint8_t)(l & 0xF);
            else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
            l >>= 4;
            sc[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
        }
        store_half(y + 108, 1 / iscale);
    } else {
        store_half(y + 108, 0.f);
    }
    const float dd = load_half(y + 108);
    for (int j = 0; j < 16; ++j) {
        int8_t s = (int8_t)(j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4);
        s = (int8_t)((s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        const float d = dd * s;
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            l = l < -4 ? -4 : l > 3 ? 3 : l;
            L[16 * j + ii] = (int8_t)(l + 4);
        }
    }
    uint8_t *hmask = y;
    memset(hmask, 0, 32);
    int m = 0;
    uint8_t hm = 1;
    uint8_t U[256];
    for (int j = 0; j < 256; ++j) {
        int v = L[j];
        if (v > 3) {
            hmask[m] |= hm;
            v -= 4;
        }
        U[j] = (uint8_t)v;
        if (++m == 32) {
            m = 0;
            hm <<= 1;
        }
    }
    pack_2bit(U, y + 32);
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

/* The one-value-per-element GGML float types, as the merge kernel's element types (-1: a block type). */
static int float_element(int type) {
    switch (type) {
    case 0: return ADAPTER_F32;
    case 1: return ADAPTER_F16;
    case 30: return ADAPTER_BF16;
    default: return -1;
    }
}

int adapter_ggml_encode(int type, const float *x, uint8_t *y, size_t n) {
    const int element = float_element(type);
    if (element >= 0) {
        adapter_convert_elements(ADAPTER_F32, x, element, y, n);
        return 1;
    }
    const size_t k = k_block_bytes(type);
    if (k) {
        if (n % 256) return 0;
        for (size_t b = 0; b < n / 256; b++) {
            const float *xb = x + 256 * b;
            uint8_t *yb = y + k * b;
            switch (type) {
            case ADAPTER_GGML_Q2_K: encode_q2_k(xb, yb); break;
            case ADAPTER_GGML_Q3_K: encode_q3_k(xb, yb); break;
            case ADAPTER_GGML_Q6_K: encode_q6_k(xb, yb); break;
            default: encode_q45_k(type == ADAPTER_GGML_Q5_K, xb, yb); break;
            }
        }
        return 1;
    }
    const size_t size = block_bytes(type);
    if (!size || n % 32) return 0;
    for (size_t b = 0; b < n / 32; b++) encode_block(type, x + 32 * b, y + size * b);
    return 1;
}

int adapter_ggml_decode(int type, const uint8_t *x, float *y, size_t n) {
    const int element = float_element(type);
    if (element >= 0) {
        adapter_convert_elements(element, x, ADAPTER_F32, y, n);
        return 1;
    }
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
