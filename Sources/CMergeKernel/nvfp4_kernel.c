/* NVFP4 (compressed-tensors `nvfp4-pack-quantized`): groups of 16 E2M1 values (8 bytes, the low
 * nibble the even element) sharing one E4M3 scale, and one Float32 global scale per tensor. The
 * value is compressed-tensors' decompression: bf16(E2M1[code] · (scale / global)), each step
 * in Float32. An AVX2 copy of each loop is chosen at run time, as for the merge kernel. */
#include "merge_kernel.h"
#include "fp_codes.h"

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
            o[2 * j] = lo;                                                                         \
            o[2 * j + 1] = hi;                                                                     \
            m[2 * j] = lo;                                                                         \
            m[2 * j + 1] = hi;                                                                     \
        }                                                                                          \
    }                                                                                              \
    return ok;

/* One group: a fresh scale (amax / 6 · global, rounded once into E4M3, saturating at 448; one
 * that underflows to 0 becomes 0.125 as compressed-tensors makes it; a group of zeros keeps its
 * scale), the codes of x / (scale / global) nearest on the grid, and the group's sums. */
static inline __attribute__((always_inline)) void encode_group(const float *v, const float *w, uint8_t *codes, uint8_t *scale, float global,
                                                               float out[4]) {
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < 16; j += 8)
        for (int k = 0; k < 8; k++) {
            float a = fabsf(v[j + k]);
            lanes[k] = a > lanes[k] ? a : lanes[k];
        }
    float amax = 0;
    for (int k = 0; k < 8; k++) amax = lanes[k] > amax ? lanes[k] : amax;
    if (amax > 0) {
        uint32_t code = e4m3((amax / 6.0f) * global);
        if ((code & 0x7Fu) == 0) code = e4m3(0.125f);
        *scale = (uint8_t)code;
    }
    float eff = e4m3_value(*scale) / global;
    uint8_t nibbles[16];
    float bd[8] = {0}, bu[8] = {0}, ba[8] = {0}, bl[8] = {0};
    for (int j = 0; j < 16; j += 8) {
        for (int k = 0; k < 8; k++) {
            float x = v[j + k];
            float m = e2m1_round(fabsf(x / eff));
            uint8_t sign = x < 0.0f ? 8u : 0u;
            nibbles[j + k] = (uint8_t)(e2m1_magnitude_code(m) | sign);
            float q = bf16_round((sign ? -m : m) * eff);
            float d = x - w[j + k], e = q - w[j + k];
            bd[k] += e * d;
            bu[k] += d * d;
            ba[k] += e * e;
            float ad = fabsf(d);
            bl[k] = ad > bl[k] ? ad : bl[k];
        }
    }
    out[0] = out[1] = out[2] = out[3] = 0;
    for (int k = 0; k < 8; k++) {
        out[0] += bd[k];
        out[1] += bu[k];
        out[2] += ba[k];
        out[3] = bl[k] > out[3] ? bl[k] : out[3];
    }
    for (int j = 0; j < 8; j++) codes[j] = (uint8_t)(nibbles[2 * j] | (nibbles[2 * j + 1] << 4));
}

#define ENCODE_BODY                                                                                \
    double dot = 0, update = 0, applied = 0, largest = sums[3];                                    \
    for (size_t g = 0; g < groups; g++) {                                                          \
        float s[4];                                                                                \
        encode_group(merged + g * 16, base + g * 16, codes + g * 8, scales + g, global, s); \
        dot += s[0];                                                                               \
        update += s[1];                                                                            \
        applied += s[2];                                                                           \
        largest = s[3] > largest ? s[3] : largest;                                                 \
    }                                                                                              \
    sums[0] += dot;                                                                                \
    sums[1] += update;                                                                             \
    sums[2] += applied;                                                                            \
    sums[3] = largest;

static int decode_portable(const uint8_t *codes, const uint8_t *scales, size_t groups, float global, float *base,
                           float *merged) { DECODE_BODY }
static void encode_portable(const float *base, const float *merged, uint8_t *codes, uint8_t *scales, size_t groups, float global,
                            double sums[4]) {
    ENCODE_BODY
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static int decode_avx2(const uint8_t *codes, const uint8_t *scales, size_t groups, float global,
                                                            float *base, float *merged) { DECODE_BODY }
__attribute__((target("avx2,fma"))) static void encode_avx2(const float *base, const float *merged, uint8_t *codes, uint8_t *scales,
                                                             size_t groups, float global, double sums[4]) {
    ENCODE_BODY
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
