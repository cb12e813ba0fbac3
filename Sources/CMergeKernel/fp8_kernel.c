/* FP8 (E4M3) requantization of one run of values that share a scale, with the sums that say how
 * much of the update survived. Written branch-free so the compiler vectorises it; an AVX2 copy is
 * chosen at run time, as for the merge kernel. */
#include "merge_kernel.h"
#include "fp_codes.h"

#include <math.h>
#include <string.h>

#define FP8_BODY                                                                                   \
    float dot = 0, update = 0, applied = 0, largest = 0;                                           \
    for (size_t i = 0; i < n; i++) {                                                               \
        uint32_t c = e4m3(merged[i] / scale);                                                      \
        codes[i] = (uint8_t)c;                                                                     \
        float d = merged[i] - base[i], e = table[c & 0xFF] * scale - base[i];                       \
        dot += e * d;                                                                              \
        update += d * d;                                                                           \
        applied += e * e;                                                                          \
        float m = fabsf(d);                                                                        \
        largest = m > largest ? m : largest;                                                       \
    }                                                                                              \
    sums[0] += dot;                                                                                \
    sums[1] += update;                                                                             \
    sums[2] += applied;                                                                            \
    if (largest > sums[3]) sums[3] = largest;

static void encode_portable(const float *base, const float *merged, uint8_t *codes, size_t n, float scale, const float *table,
                            double sums[4]) {
    FP8_BODY
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static void encode_avx2(const float *base, const float *merged, uint8_t *codes, size_t n, float scale,
                                                             const float *table, double sums[4]) {
    FP8_BODY
}
#endif

void adapter_fp8_e4m3_encode(const float *base, const float *merged, uint8_t *codes, size_t n, float scale, const float *table,
                             double sums[4]) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) {
        encode_avx2(base, merged, codes, n, scale, table, sums);
        return;
    }
#endif
    encode_portable(base, merged, codes, n, scale, table, sums);
}

/* Decoding: value = table[code] · scale into both buffers (the base values and the ones the
 * update is added to); returns 0 when a value is not finite (a NaN code). */
#define DECODE_BODY                                                                                \
    int ok = 1;                                                                                    \
    for (size_t i = 0; i < n; i++) {                                                               \
        float v = table[codes[i]] * scale;                                                         \
        ok &= isfinite(v) ? 1 : 0;                                                                 \
        base[i] = v;                                                                               \
        merged[i] = v;                                                                             \
    }                                                                                              \
    return ok;

static int decode_portable(const uint8_t *codes, size_t n, float scale, const float *table, float *base, float *merged) { DECODE_BODY }

/* The largest |x| of n finite values. */
#define MAXABS_BODY                                                                                \
    float m = 0;                                                                                   \
    for (size_t i = 0; i < n; i++) {                                                               \
        float a = fabsf(x[i]);                                                                     \
        m = a > m ? a : m;                                                                         \
    }                                                                                              \
    return m;

static float maxabs_portable(const float *x, size_t n) { MAXABS_BODY }

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static int decode_avx2(const uint8_t *codes, size_t n, float scale, const float *table, float *base,
                                                            float *merged) { DECODE_BODY }
__attribute__((target("avx2,fma"))) static float maxabs_avx2(const float *x, size_t n) { MAXABS_BODY }
#endif

int adapter_fp8_decode(const uint8_t *codes, size_t n, float scale, const float *table, float *base, float *merged) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) return decode_avx2(codes, n, scale, table, base, merged);
#endif
    return decode_portable(codes, n, scale, table, base, merged);
}

float adapter_max_abs(const float *x, size_t n) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) return maxabs_avx2(x, n);
#endif
    return maxabs_portable(x, n);
}
