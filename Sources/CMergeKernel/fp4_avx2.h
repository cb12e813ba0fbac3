/* AVX2 forms of the E2M1 steps in fp_codes.h, eight values at a time, for the FP4 kernels'
 * AVX2 copies (private to this target). Every lane computes exactly what the portable loop's
 * lane k computes (same operations, same order, no contraction), so both copies give the same
 * codes, scales and sums. */
#ifndef ADAPTER_FP4_AVX2_H
#define ADAPTER_FP4_AVX2_H

#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#define FP4_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))

/* e2m1_round on eight magnitudes. */
FP4_AVX2 __m256 e2m1_round_x8(__m256 x) {
    __m256 fine = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(2.0f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), _mm256_set1_ps(0.5f));
    __m256 mid = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 coarse = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), _mm256_set1_ps(2.0f));
    __m256 q = _mm256_blendv_ps(coarse, mid, _mm256_cmp_ps(x, _mm256_set1_ps(4.0f), _CMP_LT_OQ));
    q = _mm256_blendv_ps(q, fine, _mm256_cmp_ps(x, _mm256_set1_ps(2.0f), _CMP_LT_OQ));
    /* q < 6 ? q : 6, as the portable ternary (a NaN q gives 6 there too). */
    return _mm256_blendv_ps(_mm256_set1_ps(6.0f), q, _mm256_cmp_ps(q, _mm256_set1_ps(6.0f), _CMP_LT_OQ));
}

/* e2m1_magnitude_code on eight grid magnitudes, as 32-bit lanes. */
FP4_AVX2 __m256i e2m1_code_x8(__m256 q) {
    __m256 low = _mm256_mul_ps(q, _mm256_set1_ps(2.0f)), mid = _mm256_add_ps(q, _mm256_set1_ps(2.0f));
    __m256 high = _mm256_add_ps(_mm256_mul_ps(q, _mm256_set1_ps(0.5f)), _mm256_set1_ps(4.0f));
    __m256 c = _mm256_blendv_ps(high, mid, _mm256_cmp_ps(q, _mm256_set1_ps(4.0f), _CMP_LT_OQ));
    c = _mm256_blendv_ps(c, low, _mm256_cmp_ps(q, _mm256_set1_ps(2.0f), _CMP_LT_OQ));
    return _mm256_cvttps_epi32(c);
}

FP4_AVX2 __m256 abs_x8(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }

/* The largest of eight lanes, combined in lane order as the portable loop does. */
FP4_AVX2 float max_lanes_x8(__m256 m) {
    float l[8];
    _mm256_storeu_ps(l, m);
    float r = 0;
    for (int k = 0; k < 8; k++) r = l[k] > r ? l[k] : r;
    return r;
}

/* Eight nibbles (32-bit lanes, each < 16) into four bytes, the even element low. */
FP4_AVX2 void pack_nibbles_x8(__m256i n, uint8_t *out) {
    __m256i pairs = _mm256_or_si256(n, _mm256_srli_epi64(n, 28));
    uint64_t l[4];
    _mm256_storeu_si256((__m256i *)l, pairs);
    for (int k = 0; k < 4; k++) out[k] = (uint8_t)l[k];
}

/* group_sums on eight lanes. */
typedef struct {
    __m256 dot, update, applied, largest;
} group_sums_x8;

FP4_AVX2 void group_sums_add_x8(group_sums_x8 *s, __m256 x, __m256 w, __m256 q) {
    __m256 d = _mm256_sub_ps(x, w), e = _mm256_sub_ps(q, w);
    s->dot = _mm256_add_ps(s->dot, _mm256_mul_ps(e, d));
    s->update = _mm256_add_ps(s->update, _mm256_mul_ps(d, d));
    s->applied = _mm256_add_ps(s->applied, _mm256_mul_ps(e, e));
    __m256 ad = abs_x8(d);
    /* ad > largest ? ad : largest */
    s->largest = _mm256_blendv_ps(s->largest, ad, _mm256_cmp_ps(ad, s->largest, _CMP_GT_OQ));
}

FP4_AVX2 void group_sums_into_x8(const group_sums_x8 *s, double run[4]) {
    group_sums g;
    _mm256_storeu_ps(g.dot, s->dot);
    _mm256_storeu_ps(g.update, s->update);
    _mm256_storeu_ps(g.applied, s->applied);
    _mm256_storeu_ps(g.largest, s->largest);
    group_sums_into(&g, run);
}

FP4_AVX2 group_sums_x8 group_sums_zero_x8(void) {
    group_sums_x8 s = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    return s;
}

/* bf16_round on eight finite lanes. */
FP4_AVX2 __m256 bf16_round_x8(__m256 x) {
    __m256i b = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb);
    return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32((int)0xFFFF0000u)));
}

#endif
#endif
