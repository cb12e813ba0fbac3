/* FP8 (E4M3) requantization of one run of values that share a scale, with the sums that say how
 * much of the update survived. Written branch-free so the compiler vectorises it; an AVX2 copy is
 * chosen at run time, as for the merge kernel. */
#include "merge_kernel.h"
#include "fp_codes.h"

/* No fused multiply-adds: the AVX2 copies round every product as the portable ones do (and as
 * the Float64 references of the tests do), so both choose the same codes and scales. */
#pragma clang fp contract(off)

#include <math.h>
#include <string.h>

#define FP8_BODY                                                                                   \
    float dot = 0, update = 0, applied = 0, largest = 0;                                           \
    for (size_t i = 0; i < n; i++) {                                                               \
        uint32_t c = e4m3(merged[i] / scale);                                                      \
        codes[i] = (uint8_t)c;                                                                     \
        float d = merged[i] - base[i], e = e4m3_value(c) * scale - base[i];                         \
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

static void encode_portable(const float *base, const float *merged, uint8_t *codes, size_t n, float scale, double sums[4]) {
    FP8_BODY
}

#if defined(__x86_64__)
#include <immintrin.h>

/* e4m3() on eight lanes: the same integer steps (see fp_codes.h), NaN lanes 0x7F. */
__attribute__((target("avx2,fma"))) static inline __m256i e4m3_x8(__m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
    __m256i a = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7FFFF)), _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1)));
    __m256i normal = _mm256_or_si256(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_srli_epi32(r, 23), _mm256_set1_epi32(120)), 3),
                                     _mm256_and_si256(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(7)));
    __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(512.0f)), _mm256_set1_ps(8388608.0f));
    __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B000000));
    /* Signed compares are right for these magnitudes (all below 2^31). */
    __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), a);
    __m256i code = _mm256_blendv_epi8(normal, sub, small);
    __m256i big = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x43E00000 - 1));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7E), big);
    __m256i nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F800000));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), nan);
    sign = _mm256_andnot_si256(nan, sign);
    return _mm256_or_si256(code, sign);
}

/* e4m3_value() on eight lanes of codes that are not NaN. */
__attribute__((target("avx2,fma"))) static inline __m256 e4m3_value_x8(__m256i c) {
    __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7F));
    __m256i e = _mm256_srli_epi32(mag, 3), m = _mm256_and_si256(mag, _mm256_set1_epi32(7));
    __m256 normal = _mm256_castsi256_ps(_mm256_or_si256(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(120)), 23), _mm256_slli_epi32(m, 20)));
    __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(0x1p-9f));
    __m256 v = _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_setzero_si256())));
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24));
    return _mm256_or_ps(v, s);
}

__attribute__((target("avx2,fma"))) static void encode_avx2(const float *base, const float *merged, uint8_t *codes, size_t n, float scale,
                                                             double sums[4]) {
    __m256 vs = _mm256_set1_ps(scale), dot = _mm256_setzero_ps(), update = _mm256_setzero_ps(), applied = _mm256_setzero_ps();
    __m256 largest = _mm256_setzero_ps(), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(merged + i), w = _mm256_loadu_ps(base + i);
        __m256i c = e4m3_x8(_mm256_div_ps(v, vs));
        uint32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, c);
        for (int k = 0; k < 8; k++) codes[i + k] = (uint8_t)lanes[k];
        __m256 d = _mm256_sub_ps(v, w), e = _mm256_sub_ps(_mm256_mul_ps(e4m3_value_x8(c), vs), w);
        /* Separate multiply and add (no FMA), as the portable loop rounds. */
        dot = _mm256_add_ps(dot, _mm256_mul_ps(e, d));
        update = _mm256_add_ps(update, _mm256_mul_ps(d, d));
        applied = _mm256_add_ps(applied, _mm256_mul_ps(e, e));
        largest = _mm256_max_ps(largest, _mm256_and_ps(d, absmask));
    }
    float l[4][8];
    _mm256_storeu_ps(l[0], dot);
    _mm256_storeu_ps(l[1], update);
    _mm256_storeu_ps(l[2], applied);
    _mm256_storeu_ps(l[3], largest);
    float top = 0;
    for (int k = 0; k < 8; k++) {
        sums[0] += l[0][k];
        sums[1] += l[1][k];
        sums[2] += l[2][k];
        top = l[3][k] > top ? l[3][k] : top;
    }
    if (top > sums[3]) sums[3] = top;
    encode_portable(base + i, merged + i, codes + i, n - i, scale, sums);
}
#endif

void adapter_fp8_e4m3_encode(const float *base, const float *merged, uint8_t *codes, size_t n, float scale, double sums[4]) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) {
        encode_avx2(base, merged, codes, n, scale, sums);
        return;
    }
#endif
    encode_portable(base, merged, codes, n, scale, sums);
}

/* Decoding: value = E4M3(code) · scale into both buffers (the base values and the ones the
 * update is added to); returns 0 when a value is not finite (a NaN code). */
#define DECODE_BODY                                                                                \
    uint32_t nan = 0;                                                                              \
    for (size_t i = 0; i < n; i++) {                                                               \
        uint32_t c = codes[i];                                                                     \
        nan |= (c & 0x7Fu) == 0x7Fu;                                                               \
        float v = e4m3_value(c) * scale;                                                           \
        base[i] = v;                                                                               \
        merged[i] = v;                                                                             \
    }                                                                                              \
    return nan ? 0 : isfinite(scale) ? 1 : 0;

static int decode_portable(const uint8_t *codes, size_t n, float scale, float *base, float *merged) { DECODE_BODY }

/* The largest |x| of n finite values. */
#define MAXABS_BODY                                                                                \
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                     \
    size_t full = n & ~(size_t)7;                                                                  \
    for (size_t i = 0; i < full; i += 8)                                                           \
        for (int k = 0; k < 8; k++) {                                                              \
            float a = fabsf(x[i + k]);                                                             \
            lanes[k] = a > lanes[k] ? a : lanes[k];                                                \
        }                                                                                          \
    float m = 0;                                                                                   \
    for (size_t i = full; i < n; i++) {                                                            \
        float a = fabsf(x[i]);                                                                     \
        m = a > m ? a : m;                                                                         \
    }                                                                                              \
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;                                   \
    return m;

static float maxabs_portable(const float *x, size_t n) { MAXABS_BODY }

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static int decode_avx2(const uint8_t *codes, size_t n, float scale, float *base,
                                                            float *merged) { DECODE_BODY }
__attribute__((target("avx2,fma"))) static float maxabs_avx2(const float *x, size_t n) { MAXABS_BODY }
#endif

int adapter_fp8_decode(const uint8_t *codes, size_t n, float scale, float *base, float *merged) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) return decode_avx2(codes, n, scale, base, merged);
#endif
    return decode_portable(codes, n, scale, base, merged);
}

float adapter_max_abs(const float *x, size_t n) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) return maxabs_avx2(x, n);
#endif
    return maxabs_portable(x, n);
}
