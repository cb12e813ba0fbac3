/* MXFP4 (OCP Microscaling, E2M1 elements with one E8M0 exponent per 32) decoding and
 * requantization, as gpt-oss stores its experts: 16 bytes per block, the low nibble the even
 * element; value = E2M1[code] · 2^(scale − 127). An AVX2 copy of each loop is chosen at run time,
 * as for the merge kernel. */
#include "merge_kernel.h"

#include <math.h>
#include <string.h>

static const float e2m1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* 2^(b − 127) for b < 255 (2^-127 is a Float32 subnormal). */
static inline float exp2_e8m0(uint32_t b) {
    if (b == 0) return 0x1p-127f;
    uint32_t bits = b << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The E2M1 magnitude code of x ≥ 0 (already divided by the block's scale), nearest with ties to
 * the even code, saturating at 6: the grid 0, ½, 1, 1½, 2, 3, 4, 6 and its midpoints. */
static inline uint32_t e2m1_code(float x) {
    return (uint32_t)(x > 0.25f) + (uint32_t)(x >= 0.75f) + (uint32_t)(x > 1.25f) + (uint32_t)(x >= 1.75f) + (uint32_t)(x > 2.5f) +
           (uint32_t)(x >= 3.5f) + (uint32_t)(x > 5.0f);
}

#define DECODE_BODY                                                                                \
    int ok = 1;                                                                                    \
    for (size_t b = 0; b < blocks; b++) {                                                          \
        uint32_t s = scales[b];                                                                    \
        ok &= s != 255u;                                                                           \
        float p = exp2_e8m0(s);                                                                    \
        const uint8_t *c = codes + b * 16;                                                         \
        float *o = base + b * 32, *m = merged + b * 32;                                            \
        for (int j = 0; j < 16; j++) {                                                             \
            float lo = e2m1[c[j] & 15] * p, hi = e2m1[c[j] >> 4] * p;                               \
            o[2 * j] = lo;                                                                         \
            o[2 * j + 1] = hi;                                                                     \
            m[2 * j] = lo;                                                                         \
            m[2 * j + 1] = hi;                                                                     \
        }                                                                                          \
    }                                                                                              \
    return ok;

static int decode_portable(const uint8_t *codes, const uint8_t *scales, size_t blocks, float *base, float *merged) { DECODE_BODY }

/* One block of 32 merged values: both exponents tried, the codes and the squared error of each. */
static inline double block_error(const float *v, float inverse, float step, uint8_t *nibbles) {
    double error = 0;
    for (int j = 0; j < 32; j++) {
        float x = v[j] * inverse;
        uint32_t sign = signbit(x) ? 8u : 0u;
        uint32_t code = e2m1_code(fabsf(x));
        nibbles[j] = (uint8_t)(code | sign);
        double d = (double)(e2m1[code] * step) - (double)fabsf(v[j]);
        error += d * d;
    }
    return error;
}

#define ENCODE_BODY                                                                                \
    double dot = 0, update = 0, applied = 0, largest = sums[3];                                    \
    for (size_t b = 0; b < blocks; b++) {                                                          \
        const float *v = merged + b * 32, *w = base + b * 32;                                      \
        float amax = 0;                                                                            \
        for (int j = 0; j < 32; j++) {                                                             \
            float a = fabsf(v[j]);                                                                 \
            amax = a > amax ? a : amax;                                                            \
        }                                                                                          \
        int chosen = (int)scales[b] - 127;                                                         \
        uint8_t nibbles[32], other[32];                                                            \
        if (amax > 0) {                                                                            \
            int ex;                                                                                \
            frexpf(amax, &ex);                                                                     \
            int e0 = ex - 1 - 2, e1 = e0 + 1;                                                      \
            e0 = e0 < -127 ? -127 : e0 > 127 ? 127 : e0;                                           \
            e1 = e1 < -127 ? -127 : e1 > 127 ? 127 : e1;                                           \
            float s0 = exp2_e8m0((uint32_t)(e0 + 127)), s1 = exp2_e8m0((uint32_t)(e1 + 127));      \
            double err0 = block_error(v, 1.0f / s0, s0, nibbles);                                  \
            chosen = e0;                                                                           \
            if (e1 != e0) {                                                                        \
                double err1 = block_error(v, 1.0f / s1, s1, other);                                \
                if (err1 < err0) {                                                                 \
                    chosen = e1;                                                                   \
                    memcpy(nibbles, other, 32);                                                    \
                }                                                                                  \
            }                                                                                      \
        } else {                                                                                   \
            /* A block of zeros keeps its exponent; its codes are (signed) zeros. */              \
            for (int j = 0; j < 32; j++) nibbles[j] = signbit(v[j]) ? 8u : 0u;                     \
        }                                                                                          \
        scales[b] = (uint8_t)(chosen + 127);                                                       \
        float step = exp2_e8m0((uint32_t)(chosen + 127));                                          \
        float bd = 0, bu = 0, ba = 0;                                                              \
        for (int j = 0; j < 32; j++) {                                                             \
            float q = e2m1[nibbles[j]] * step;                                                     \
            float d = v[j] - w[j], e = q - w[j];                                                   \
            bd += e * d;                                                                           \
            bu += d * d;                                                                           \
            ba += e * e;                                                                           \
            float m = fabsf(d);                                                                    \
            largest = m > largest ? m : largest;                                                   \
        }                                                                                          \
        dot += bd;                                                                                 \
        update += bu;                                                                              \
        applied += ba;                                                                             \
        for (int j = 0; j < 16; j++) codes[b * 16 + j] = (uint8_t)(nibbles[2 * j] | (nibbles[2 * j + 1] << 4)); \
    }                                                                                              \
    sums[0] += dot;                                                                                \
    sums[1] += update;                                                                             \
    sums[2] += applied;                                                                            \
    sums[3] = largest;

static void encode_portable(const float *base, const float *merged, uint8_t *codes, uint8_t *scales, size_t blocks, double sums[4]) {
    ENCODE_BODY
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static int decode_avx2(const uint8_t *codes, const uint8_t *scales, size_t blocks, float *base,
                                                            float *merged) { DECODE_BODY }
__attribute__((target("avx2,fma"))) static void encode_avx2(const float *base, const float *merged, uint8_t *codes, uint8_t *scales,
                                                             size_t blocks, double sums[4]) {
    ENCODE_BODY
}
#endif

int adapter_mxfp4_decode(const uint8_t *codes, const uint8_t *scales, size_t blocks, float *base, float *merged) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) return decode_avx2(codes, scales, blocks, base, merged);
#endif
    return decode_portable(codes, scales, blocks, base, merged);
}

void adapter_mxfp4_encode(const float *base, const float *merged, uint8_t *codes, uint8_t *scales, size_t blocks, double sums[4]) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) {
        encode_avx2(base, merged, codes, scales, blocks, sums);
        return;
    }
#endif
    encode_portable(base, merged, codes, scales, blocks, sums);
}

/* dst[c][r] = src[r][c] for elements of `size` bytes (2 or 4), in tiles that stay in cache. */
void adapter_transpose(const void *src, void *dst, size_t rows, size_t cols, size_t size) {
    const size_t tile = 32;
    for (size_t r0 = 0; r0 < rows; r0 += tile) {
        size_t r1 = r0 + tile < rows ? r0 + tile : rows;
        for (size_t c0 = 0; c0 < cols; c0 += tile) {
            size_t c1 = c0 + tile < cols ? c0 + tile : cols;
            if (size == 2) {
                const uint16_t *s = src;
                uint16_t *d = dst;
                for (size_t r = r0; r < r1; r++)
                    for (size_t c = c0; c < c1; c++) d[c * rows + r] = s[r * cols + c];
            } else {
                const uint32_t *s = src;
                uint32_t *d = dst;
                for (size_t r = r0; r < r1; r++)
                    for (size_t c = c0; c < c1; c++) d[c * rows + r] = s[r * cols + c];
            }
        }
    }
}
