/* NVFP4 (compressed-tensors `nvfp4-pack-quantized`): groups of 16 E2M1 values (8 bytes, the low
 * nibble the even element) sharing one E4M3 scale, and one Float32 global scale per tensor. The
 * value is compressed-tensors' decompression: bf16(E2M1[code] · (scale / global)), each step
 * in Float32. An AVX2 copy of each loop is chosen at run time, as for the merge kernel. */
#include "merge_kernel.h"
#include "fp_codes.h"
#include "fp4_avx2.h"

/* No fused multiply-adds: the AVX2 copies round every product as the portable ones do (and as
 * the Float64 references of the tests do), so both choose the same codes and scales. */
#pragma clang fp contract(off)

/* Round to nearest even into BF16, kept as a Float32 (finite values). */
static inline __attribute__((always_inline)) float bf16_round(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    float r;
    memcpy(&r, &b, 4);
    return r;
}

#define DECODE_BODY                                                                                \
    int ok = 1;                                                                                    \
    for (size_t g = 0; g < groups; g++) {                                                          \
        float s = (scales[g] & 0x7Fu) == 0x7Fu ? NAN : e4m3_value(scales[g]);                                                                \
        ok &= isfinite(s) ? 1 : 0;                                                                 \
        float eff = s / global;                                                                    \
        const uint8_t *c = codes + g * 8;                                                          \
        float *o = base + g * 16, *m = merged + g * 16;                                            \
        for (int j = 0; j < 8; j++) {                                                              \
            float lo = bf16_round(e2m1[c[j] & 15] * eff), hi = bf16_round(e2m1[c[j] >> 4] * eff);  \
            store_pair(o, m, j, lo, hi);                                                           \
        }                                                                                          \
    }                                                                                              \
    return ok;

/* One group: a fresh scale (amax / 6 · global, rounded once into E4M3, saturating at 448; one
 * that underflows to 0 becomes 0.125 as compressed-tensors makes it; a group of zeros keeps its
 * scale), the codes of x / (scale / global) nearest on the grid, and the group's share of the sums. */
static inline __attribute__((always_inline)) void encode_group(const float *v, const float *w, uint8_t *codes, uint8_t *scale, float global,
                                                               double run[4]) {
    float amax = max_abs_lanes(v, 16);
    if (amax > 0) {
        uint32_t code = e4m3((amax / 6.0f) * global);
        if ((code & 0x7Fu) == 0) code = e4m3(0.125f);
        *scale = (uint8_t)code;
    }
    float eff = e4m3_value(*scale) / global;
    uint8_t nibbles[16];
    group_sums sums = {{0}, {0}, {0}, {0}};
    for (int j = 0; j < 16; j += 8) {
        for (int k = 0; k < 8; k++) {
            float x = v[j + k];
            float m = e2m1_round(fabsf(x / eff));
            uint8_t sign = x < 0.0f ? 8u : 0u;
            nibbles[j + k] = (uint8_t)(e2m1_magnitude_code(m) | sign);
            group_sums_add(&sums, k, x, w[j + k], bf16_round((sign ? -m : m) * eff));
        }
    }
    group_sums_into(&sums, run);
    pack_nibbles(nibbles, codes, 16);
}

#define ENCODE_BODY                                                                                \
    for (size_t g = 0; g < groups; g++) encode_group(merged + g * 16, base + g * 16, codes + g * 8, scales + g, global, sums);

static int decode_portable(const uint8_t *codes, const uint8_t *scales, size_t groups, float global, float *base,
                           float *merged) { DECODE_BODY }
static void encode_portable(const float *base, const float *merged, uint8_t *codes, uint8_t *scales, size_t groups, float global,
                            double sums[4]) {
    ENCODE_BODY
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static int decode_avx2(const uint8_t *codes, const uint8_t *scales, size_t groups, float global,
                                                            float *base, float *merged) { DECODE_BODY }
/* encode_group on eight lanes at a time. */
FP4_AVX2 void encode_group_x8(const float *v, const float *w, uint8_t *codes, uint8_t *scale, float global, double run[4]) {
    __m256 m8 = _mm256_setzero_ps();
    for (int j = 0; j < 16; j += 8) {
        __m256 a = abs_x8(_mm256_loadu_ps(v + j));
        m8 = _mm256_blendv_ps(m8, a, _mm256_cmp_ps(a, m8, _CMP_GT_OQ));
    }
    float amax = max_lanes_x8(m8);
    if (amax > 0) {
        uint32_t code = e4m3((amax / 6.0f) * global);
        if ((code & 0x7Fu) == 0) code = e4m3(0.125f);
        *scale = (uint8_t)code;
    }
    __m256 eff = _mm256_set1_ps(e4m3_value(*scale) / global);
    __m256 signs = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    group_sums_x8 sums = group_sums_zero_x8();
    for (int j = 0; j < 16; j += 8) {
        __m256 x = _mm256_loadu_ps(v + j);
        __m256 m = e2m1_round_x8(abs_x8(_mm256_div_ps(x, eff)));
        __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
        __m256i sign = _mm256_and_si256(_mm256_castps_si256(negative), _mm256_set1_epi32(8));
        pack_nibbles_x8(_mm256_or_si256(e2m1_code_x8(m), sign), codes + j / 2);
        __m256 q = bf16_round_x8(_mm256_mul_ps(_mm256_or_ps(m, _mm256_and_ps(negative, signs)), eff));
        group_sums_add_x8(&sums, x, _mm256_loadu_ps(w + j), q);
    }
    group_sums_into_x8(&sums, run);
}

__attribute__((target("avx2,fma"))) static void encode_avx2(const float *base, const float *merged, uint8_t *codes, uint8_t *scales,
                                                             size_t groups, float global, double sums[4]) {
    for (size_t g = 0; g < groups; g++) encode_group_x8(merged + g * 16, base + g * 16, codes + g * 8, scales + g, global, sums);
}
#endif

int adapter_nvfp4_decode(const uint8_t *codes, const uint8_t *scales, size_t groups, float global, float *base,
                         float *merged) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) return decode_avx2(codes, scales, groups, global, base, merged);
#endif
    return decode_portable(codes, scales, groups, global, base, merged);
}

void adapter_nvfp4_encode(const float *base, const float *merged, uint8_t *codes, uint8_t *scales, size_t groups, float global,
                          double sums[4]) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) {
        encode_avx2(base, merged, codes, scales, groups, global, sums);
        return;
    }
#endif
    encode_portable(base, merged, codes, scales, groups, global, sums);
}
