/* MXFP4 (OCP Microscaling, E2M1 elements with one E8M0 exponent per 32) decoding and
 * requantization, as gpt-oss stores its experts: 16 bytes per block, the low nibble the even
 * element; value = E2M1[code] · 2^(scale − 127). An AVX2 copy of each loop is chosen at run time,
 * as for the merge kernel. */
#include "merge_kernel.h"
#include "fp_codes.h"
#include "fp4_avx2.h"

/* No fused multiply-adds: the AVX2 copies round every product as the portable ones do (and as
 * the Float64 references of the tests do), so both choose the same codes and scales. */
#pragma clang fp contract(off)

#include <math.h>
#include <string.h>

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
            store_pair(o, m, j, lo, hi);                                                           \
        }                                                                                          \
    }                                                                                              \
    return ok;

static int decode_portable(const uint8_t *codes, const uint8_t *scales, size_t blocks, float *base, float *merged) { DECODE_BODY }

/* Σ (q·step − |v|)² over a block in Float64 (the difference is exact there), for one exponent;
 * summed in eight fixed lanes so the loop vectorises without reassociating anything. */
static inline __attribute__((always_inline)) double block_error(const float *v, float inverse, float step) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < 32; j += 8) {
        for (int k = 0; k < 8; k++) {
            float a = fabsf(v[j + k]);
            double d = (double)(e2m1_round(a * inverse) * step) - (double)a;
            acc[k] += d * d;
        }
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* ⌊log₂ x⌋ for a normal x > 0 from its exponent bits; −127 for subnormals (every exponent below
 * clamps to −127 anyway). */
static inline __attribute__((always_inline)) int floor_log2(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    int biased = (int)((bits >> 23) & 0xFFu);
    return biased == 0 ? -127 : biased - 127;
}

/* The two exponents tried for a block of largest magnitude amax > 0: the OCP rule's
 * e0 = floor(log2 amax) - 2 and e0 + 1, each clamped to E8M0's -127 ... 127. */
static inline __attribute__((always_inline)) void candidate_exponents(float amax, int *e0, int *e1) {
    const int e = floor_log2(amax) - 2;
    *e0 = e < -127 ? -127 : e > 127 ? 127 : e;
    *e1 = e + 1 < -127 ? -127 : e + 1 > 127 ? 127 : e + 1;
}

/* One block: the exponent, the codes, and the block's share of the run's sums. */
static inline __attribute__((always_inline)) void encode_block(const float *v, const float *w, uint8_t *codes, uint8_t *scale, double run[4]) {
    float amax = max_abs_lanes(v, 32);
    int chosen = (int)*scale - 127;
    int e0, e1;
    if (amax > 0) {
        candidate_exponents(amax, &e0, &e1);
        const float s0 = exp2_e8m0((uint32_t)(e0 + 127)), s1 = exp2_e8m0((uint32_t)(e1 + 127));
        chosen = e0;
        if (e1 != e0 && block_error(v, 1.0f / s1, s1) < block_error(v, 1.0f / s0, s0)) chosen = e1;
    }
    /* A block of zeros keeps its exponent; its codes are (signed) zeros. */
    *scale = (uint8_t)(chosen + 127);
    float step = exp2_e8m0((uint32_t)(chosen + 127)), inverse = 1.0f / step;
    uint8_t nibbles[32];
    group_sums sums = {{0}, {0}, {0}, {0}};
    for (int j = 0; j < 32; j += 8) {
        for (int k = 0; k < 8; k++) {
            float x = v[j + k];
            float m = e2m1_round(fabsf(x) * inverse);
            nibbles[j + k] = (uint8_t)(e2m1_magnitude_code(m) | (signbit(x) ? 8u : 0u));
            group_sums_add(&sums, k, x, w[j + k], copysignf(m, x) * step);
        }
    }
    group_sums_into(&sums, run);
    pack_nibbles(nibbles, codes, 32);
}

#define ENCODE_BODY                                                                                \
    for (size_t b = 0; b < blocks; b++) encode_block(merged + b * 32, base + b * 32, codes + b * 16, scales + b, sums);

static void encode_portable(const float *base, const float *merged, uint8_t *codes, uint8_t *scales, size_t blocks, double sums[4]) {
    ENCODE_BODY
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static int decode_avx2(const uint8_t *codes, const uint8_t *scales, size_t blocks, float *base,
                                                            float *merged) { DECODE_BODY }
/* block_error on eight lanes: each lane's Float64 sum as the portable acc[k], combined alike. */
FP4_AVX2 double block_error_x8(const float *v, __m256 inverse, __m256 step) {
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (int j = 0; j < 32; j += 8) {
        __m256 a = abs_x8(_mm256_loadu_ps(v + j));
        __m256 q = _mm256_mul_ps(e2m1_round_x8(_mm256_mul_ps(a, inverse)), step);
        __m256d dlo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(q)), _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
        __m256d dhi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(q, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
        lo = _mm256_add_pd(lo, _mm256_mul_pd(dlo, dlo));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(dhi, dhi));
    }
    double acc[8];
    _mm256_storeu_pd(acc, lo);
    _mm256_storeu_pd(acc + 4, hi);
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* encode_block on eight lanes at a time. */
FP4_AVX2 void encode_block_x8(const float *v, const float *w, uint8_t *codes, uint8_t *scale, double run[4]) {
    __m256 m8 = _mm256_setzero_ps();
    for (int j = 0; j < 32; j += 8) {
        __m256 a = abs_x8(_mm256_loadu_ps(v + j));
        m8 = _mm256_blendv_ps(m8, a, _mm256_cmp_ps(a, m8, _CMP_GT_OQ));
    }
    float amax = max_lanes_x8(m8);
    int chosen = (int)*scale - 127;
    int e0, e1;
    if (amax > 0) {
        candidate_exponents(amax, &e0, &e1);
        const float s0 = exp2_e8m0((uint32_t)(e0 + 127)), s1 = exp2_e8m0((uint32_t)(e1 + 127));
        chosen = e0;
        if (e1 != e0 && block_error_x8(v, _mm256_set1_ps(1.0f / s1), _mm256_set1_ps(s1)) < block_error_x8(v, _mm256_set1_ps(1.0f / s0), _mm256_set1_ps(s0)))
            chosen = e1;
    }
    *scale = (uint8_t)(chosen + 127);
    float step1 = exp2_e8m0((uint32_t)(chosen + 127));
    __m256 step = _mm256_set1_ps(step1), inverse = _mm256_set1_ps(1.0f / step1);
    __m256 signs = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    group_sums_x8 sums = group_sums_zero_x8();
    for (int j = 0; j < 32; j += 8) {
        __m256 x = _mm256_loadu_ps(v + j);
        __m256 m = e2m1_round_x8(_mm256_mul_ps(abs_x8(x), inverse));
        __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(_mm256_castps_si256(x), 31), 3);
        pack_nibbles_x8(_mm256_or_si256(e2m1_code_x8(m), sign), codes + j / 2);
        __m256 q = _mm256_mul_ps(_mm256_or_ps(m, _mm256_and_ps(x, signs)), step);
        group_sums_add_x8(&sums, x, _mm256_loadu_ps(w + j), q);
    }
    group_sums_into_x8(&sums, run);
}

__attribute__((target("avx2,fma"))) static void encode_avx2(const float *base, const float *merged, uint8_t *codes, uint8_t *scales,
                                                             size_t blocks, double sums[4]) {
    for (size_t b = 0; b < blocks; b++) encode_block_x8(merged + b * 32, base + b * 32, codes + b * 16, scales + b, sums);
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
