/* Element codes shared by the FP8 and FP4 kernels (private to this target). */
#ifndef ADAPTER_FP_CODES_H
#define ADAPTER_FP_CODES_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* The E4M3 (FN) code nearest x, ties to even, saturating at ±448, NaN 0x7F: the mantissa rounded
 * to three bits on the float's bits; below 2^-6 the subnormal step 2^-9, rounded by adding 2^23. */
static inline __attribute__((always_inline)) uint32_t e4m3(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    uint32_t sign = (bits >> 24) & 0x80u;
    uint32_t a = bits & 0x7FFFFFFFu;
    uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);
    uint32_t normal = (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u);
    float af;
    memcpy(&af, &a, 4);
    float t = af * 512.0f + 8388608.0f;
    uint32_t tb;
    memcpy(&tb, &t, 4);
    uint32_t code = a < 0x3C800000u ? tb - 0x4B000000u : normal;
    code = a >= 0x43E00000u ? 0x7Eu : code;
    uint32_t nan = a > 0x7F800000u;
    code = nan ? 0x7Fu : code;
    sign = nan ? 0u : sign;
    return code | sign;
}

/* The value of an E4M3 code (not 0x7F / 0xFF, NaN), from its bits: normal 2^(e − 7) · (1 + m/8),
 * subnormal m · 2^-9. */
static inline __attribute__((always_inline)) float e4m3_value(uint32_t c) {
    uint32_t mag = c & 0x7Fu, e = mag >> 3, m = mag & 7u;
    uint32_t bits = ((e + 120u) << 23) | (m << 20);
    float normal;
    memcpy(&normal, &bits, 4);
    float v = e ? normal : (float)m * 0x1p-9f;
    return (c & 0x80u) ? -v : v;
}

static const float e2m1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* 2^(b − 127) for b < 255 (2^-127 is a Float32 subnormal). */
static inline __attribute__((always_inline)) float exp2_e8m0(uint32_t b) {
    if (b == 0) return 0x1p-127f;
    uint32_t bits = b << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The E2M1 magnitude nearest x ≥ 0 (already divided by the block's scale), ties to the even
 * code, saturating at 6: below 2 the grid steps by ½, up to 4 by 1, then by 2, so it is one
 * rint (nearest, ties to even: the default rounding) at the step's scale. The even codes are
 * exactly the grid points that are even multiples of their step, so ties agree. */
static inline __attribute__((always_inline)) float e2m1_round(float x) {
    float fine = rintf(x * 2.0f) * 0.5f, mid = rintf(x), coarse = rintf(x * 0.5f) * 2.0f;
    float q = x < 2.0f ? fine : x < 4.0f ? mid : coarse;
    return q < 6.0f ? q : 6.0f;
}

/* The code (0 … 7) of a magnitude on the grid. */
static inline __attribute__((always_inline)) uint8_t e2m1_magnitude_code(float q) {
    float c = q < 2.0f ? q * 2.0f : q < 4.0f ? q + 2.0f : q * 0.5f + 4.0f;
    return (uint8_t)(int)c;
}


/* The largest |v| of n values (a multiple of 8), in eight fixed lanes (so it vectorises). */
static inline __attribute__((always_inline)) float max_abs_lanes(const float *v, int n) {
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < n; j += 8)
        for (int k = 0; k < 8; k++) {
            float a = fabsf(v[j + k]);
            lanes[k] = a > lanes[k] ? a : lanes[k];
        }
    float m = 0;
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    return m;
}

/* What requantization kept of one group's update, in eight lanes: Σ (q − w)(x − w), Σ (x − w)²,
 * Σ (q − w)², max |x − w| for merged x, base w and requantized q. */
typedef struct {
    float dot[8], update[8], applied[8], largest[8];
} group_sums;

static inline __attribute__((always_inline)) void group_sums_add(group_sums *s, int k, float x, float w, float q) {
    float d = x - w, e = q - w;
    s->dot[k] += e * d;
    s->update[k] += d * d;
    s->applied[k] += e * e;
    float ad = fabsf(d);
    s->largest[k] = ad > s->largest[k] ? ad : s->largest[k];
}

/* A group's lanes added into a run's sums (Float64 across groups, as adapter_fp8_e4m3_encode). */
static inline __attribute__((always_inline)) void group_sums_into(const group_sums *s, double run[4]) {
    float dot = 0, update = 0, applied = 0, largest = 0;
    for (int k = 0; k < 8; k++) {
        dot += s->dot[k];
        update += s->update[k];
        applied += s->applied[k];
        largest = s->largest[k] > largest ? s->largest[k] : largest;
    }
    run[0] += dot;
    run[1] += update;
    run[2] += applied;
    run[3] = largest > run[3] ? largest : run[3];
}

/* A decoded byte's two values (the low nibble's first) into the base and merged buffers. */
static inline __attribute__((always_inline)) void store_pair(float *base, float *merged, int j, float lo, float hi) {
    base[2 * j] = lo;
    base[2 * j + 1] = hi;
    merged[2 * j] = lo;
    merged[2 * j + 1] = hi;
}

/* Two E2M1 codes per byte, the low nibble the even element. */
static inline __attribute__((always_inline)) void pack_nibbles(const uint8_t *nibbles, uint8_t *codes, int n) {
    for (int j = 0; j < n / 2; j++) codes[j] = (uint8_t)(nibbles[2 * j] | (nibbles[2 * j + 1] << 4));
}

#endif
