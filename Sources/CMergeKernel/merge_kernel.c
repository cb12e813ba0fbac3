// The fused merge kernel: W' = round(W + L·R), Float32 accumulation, one rounding.
//
// Written in C for one reason: Swift cannot compile a function for AVX2/FMA and pick it at run
// time. The AVX2 path keeps a 4-row × 16-column tile of the update in eight registers, so each
// panel load feeds four FMAs; the portable path is the same loop for any x86-64 or ARM CPU.
#include "merge_kernel.h"
#include "half.h"

#include <stdlib.h>

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// MARK: - Scalar conversions (the portable path and tails): half.h

static inline float load_elem(int type, const void *p, size_t i) {
    switch (type) {
    case ADAPTER_BF16: { uint16_t h; memcpy(&h, (const char *)p + 2 * i, 2); return bf16_to_f32(h); }
    case ADAPTER_F16: { uint16_t h; memcpy(&h, (const char *)p + 2 * i, 2); return f16_to_f32(h); }
    default: { float f; memcpy(&f, (const char *)p + 4 * i, 4); return f; }
    }
}

static inline void store_elem(int type, void *p, size_t i, float v) {
    switch (type) {
    case ADAPTER_BF16: { uint16_t h = f32_to_bf16(v); memcpy((char *)p + 2 * i, &h, 2); break; }
    case ADAPTER_F16: { uint16_t h = f32_to_f16(v); memcpy((char *)p + 2 * i, &h, 2); break; }
    default: memcpy((char *)p + 4 * i, &v, 4); break;
    }
}

static inline size_t elem_size(int type) { return type == ADAPTER_F32 ? 4 : 2; }

/// Columns [c0, cols) of one row, one element at a time: tails and the portable path.
static int merge_row_portable(int st, const void *src, int dt, void *dst, size_t c0, size_t cols,
                              const float *lrow, const float *panels, size_t k, float limit) {
    int ok = 1;
    for (size_t j = c0; j < cols; j++) {
        const float *panel = panels + (j / 8) * k * 8 + (j % 8);
        float u = 0;
        for (size_t t = 0; t < k; t++) u += lrow[t] * panel[t * 8];
        float v = load_elem(st, src, j) + u;
        if (!(fabsf(v) <= limit)) ok = 0;
        store_elem(dt, dst, j, v);
    }
    return ok;
}

#if defined(__x86_64__)

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline __m256 load8(int type, const void *p, size_t i) {
    switch (type) {
    case ADAPTER_BF16: {
        __m128i h = _mm_loadu_si128((const __m128i *)((const char *)p + 2 * i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    case ADAPTER_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const char *)p + 2 * i)));
    default:
        return _mm256_loadu_ps((const float *)((const char *)p + 4 * i));
    }
}

/// Rounds eight floats to bf16 (nearest even, NaN kept quiet), as 16-bit lanes in 128 bits.
AVX2 static inline __m128i to_bf16x8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    __m256 isnan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    __m256i r = _mm256_blendv_epi8(rounded, nan, _mm256_castps_si256(isnan));
    __m256i packed = _mm256_packus_epi32(r, r);  // lanes: r0-3 r0-3 | r4-7 r4-7
    packed = _mm256_permute4x64_epi64(packed, 0x08);  // r0-3 r4-7 in the low 128 bits
    return _mm256_castsi256_si128(packed);
}

AVX2 static inline void store8(int type, void *p, size_t i, __m256 v) {
    switch (type) {
    case ADAPTER_BF16:
        _mm_storeu_si128((__m128i *)((char *)p + 2 * i), to_bf16x8(v));
        break;
    case ADAPTER_F16:
        _mm_storeu_si128((__m128i *)((char *)p + 2 * i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        break;
    default:
        _mm256_storeu_ps((float *)((char *)p + 4 * i), v);
        break;
    }
}

/// All lanes finite and |v| ≤ limit.
AVX2 static inline int within(__m256 v, __m256 limit) {
    __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    return _mm256_movemask_ps(_mm256_cmp_ps(a, limit, _CMP_LE_OQ)) == 0xFF;
}

/// Rows [r0, r0 + R) with R ≤ 4, columns in 16-wide tiles (two panels) then one 8-wide panel.
AVX2 static int merge_tile_rows_avx2(int st, const char *src, int dt, char *dst, size_t r0, size_t nr, size_t cols,
                                     const float *l, const float *panels, size_t k, float limit) {
    const size_t ss = elem_size(st), ds = elem_size(dt);
    const __m256 lim = _mm256_set1_ps(limit);
    int ok = 1;
    size_t j = 0;
    for (; j + 16 <= cols; j += 16) {
        const float *p0 = panels + (j / 8) * k * 8;
        const float *p1 = p0 + k * 8;
        __m256 a[4][2];
        for (size_t r = 0; r < 4; r++) { a[r][0] = _mm256_setzero_ps(); a[r][1] = _mm256_setzero_ps(); }
        if (nr == 4) {
            const float *l0 = l + (r0 + 0) * k, *l1 = l + (r0 + 1) * k, *l2 = l + (r0 + 2) * k, *l3 = l + (r0 + 3) * k;
            for (size_t t = 0; t < k; t++) {
                __m256 x0 = _mm256_loadu_ps(p0 + t * 8), x1 = _mm256_loadu_ps(p1 + t * 8);
                __m256 b0 = _mm256_broadcast_ss(l0 + t), b1 = _mm256_broadcast_ss(l1 + t);
                __m256 b2 = _mm256_broadcast_ss(l2 + t), b3 = _mm256_broadcast_ss(l3 + t);
                a[0][0] = _mm256_fmadd_ps(b0, x0, a[0][0]); a[0][1] = _mm256_fmadd_ps(b0, x1, a[0][1]);
                a[1][0] = _mm256_fmadd_ps(b1, x0, a[1][0]); a[1][1] = _mm256_fmadd_ps(b1, x1, a[1][1]);
                a[2][0] = _mm256_fmadd_ps(b2, x0, a[2][0]); a[2][1] = _mm256_fmadd_ps(b2, x1, a[2][1]);
                a[3][0] = _mm256_fmadd_ps(b3, x0, a[3][0]); a[3][1] = _mm256_fmadd_ps(b3, x1, a[3][1]);
            }
        } else {
            for (size_t t = 0; t < k; t++) {
                __m256 x0 = _mm256_loadu_ps(p0 + t * 8), x1 = _mm256_loadu_ps(p1 + t * 8);
                for (size_t r = 0; r < nr; r++) {
                    __m256 b = _mm256_broadcast_ss(l + (r0 + r) * k + t);
                    a[r][0] = _mm256_fmadd_ps(b, x0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(b, x1, a[r][1]);
                }
            }
        }
        for (size_t r = 0; r < nr; r++) {
            const char *s = src + (r0 + r) * cols * ss;
            char *d = dst + (r0 + r) * cols * ds;
            __m256 v0 = _mm256_add_ps(load8(st, s, j), a[r][0]);
            __m256 v1 = _mm256_add_ps(load8(st, s, j + 8), a[r][1]);
            ok &= within(v0, lim) & within(v1, lim);
            store8(dt, d, j, v0);
            store8(dt, d, j + 8, v1);
        }
    }
    for (; j + 8 <= cols; j += 8) {
        const float *p0 = panels + (j / 8) * k * 8;
        for (size_t r = 0; r < nr; r++) {
            const float *lr = l + (r0 + r) * k;
            __m256 a = _mm256_setzero_ps();
            for (size_t t = 0; t < k; t++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(lr + t), _mm256_loadu_ps(p0 + t * 8), a);
            const char *s = src + (r0 + r) * cols * ss;
            __m256 v = _mm256_add_ps(load8(st, s, j), a);
            ok &= within(v, lim);
            store8(dt, dst + (r0 + r) * cols * ds, j, v);
        }
    }
    if (j < cols) {
        for (size_t r = 0; r < nr; r++) {
            ok &= merge_row_portable(st, src + (r0 + r) * cols * ss, dt, dst + (r0 + r) * cols * ds, j, cols,
                                     l + (r0 + r) * k, panels, k, limit);
        }
    }
    return ok;
}

/* -1 until the first call. The kernel's worker threads all call this at once on the first tensor,
   so the cached answer is read and written atomically (relaxed: every writer stores the same value). */
static int avx2_state = -1;

int adapter_merge_kernel_is_vectorised(void) {
    int state = __atomic_load_n(&avx2_state, __ATOMIC_RELAXED);
    if (state < 0) {
        __builtin_cpu_init();
        state = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        /* ADAPTER_PORTABLE_KERNELS=1 takes the portable loops everywhere: the tests compare both. */
        const char *portable = getenv("ADAPTER_PORTABLE_KERNELS");
        if (portable && portable[0] == '1') state = 0;
        __atomic_store_n(&avx2_state, state, __ATOMIC_RELAXED);
    }
    return state;
}

#else

int adapter_merge_kernel_is_vectorised(void) { return 0; }

#endif

void adapter_convert_elements(int src_type, const void *src, int dst_type, void *dst, size_t n) {
    for (size_t i = 0; i < n; i++) store_elem(dst_type, dst, i, load_elem(src_type, src, i));
}

int adapter_merge_rows(int st, const void *src, int dt, void *dst, size_t rows, size_t cols,
                       const float *l, const float *panels, size_t k, float limit) {
    int ok = 1;
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) {
        for (size_t r = 0; r < rows; r += 4) {
            size_t nr = rows - r < 4 ? rows - r : 4;
            ok &= merge_tile_rows_avx2(st, (const char *)src, dt, (char *)dst, r, nr, cols, l, panels, k, limit);
        }
        return ok;
    }
#endif
    const size_t ss = elem_size(st), ds = elem_size(dt);
    for (size_t r = 0; r < rows; r++) {
        ok &= merge_row_portable(st, (const char *)src + r * cols * ss, dt, (char *)dst + r * cols * ds, 0, cols,
                                 l + r * k, panels, k, limit);
    }
    return ok;
}

/* Float64 → BF16, one rounding: round to odd into Float32 (truncate toward zero, set the lowest
 * bit when inexact), then round to nearest even at bit 16. Written branch-light so the compiler
 * vectorises it. */
void adapter_f64_to_bf16(const double *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double d = src[i];
        float f = (float)d;
        uint32_t u;
        memcpy(&u, &f, 4);
        if (d != d) {
            /* The canonical quiet NaN with the sign, as ElementConversion.doubleToBF16 gives. */
            dst[i] = (uint16_t)(0x7FC0u | ((u >> 16) & 0x8000u));
            continue;
        }
        double back = (double)f;
        int inexact = back != d && (u & 0x7F800000u) != 0x7F800000u;
        /* |f| > |d|: the nearest rounding went up in magnitude; step back one unit toward zero. */
        int over = inexact && fabs(back) > fabs(d);
        u = (u - (uint32_t)over) | (uint32_t)inexact;
        dst[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

#if defined(__x86_64__)
AVX2 static void to_double_avx2(int type, const void *src, double *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = load8(type, src, i);
        _mm256_storeu_pd(dst + i, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        _mm256_storeu_pd(dst + i + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    for (; i < n; i++) dst[i] = (double)load_elem(type, src, i);
}
#endif

void adapter_to_double(int src_type, const void *src, double *dst, size_t n) {
#if defined(__x86_64__)
    if (adapter_merge_kernel_is_vectorised()) {
        to_double_avx2(src_type, src, dst, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++) dst[i] = (double)load_elem(src_type, src, i);
}
