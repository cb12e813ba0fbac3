/* Scalar Float32 <-> F16 / BF16 conversions, round to nearest even (private to this target):
 * the merge kernel's portable path and tails, and the GGML block codecs (ggml's
 * GGML_FP32_TO_FP16 rounds the same way). */
#ifndef ADAPTER_HALF_H
#define ADAPTER_HALF_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    uint32_t u;
    if (exponent == 0x1F) {
        u = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent == 0) {
        float m = (float)mantissa * 0x1p-24f;
        return sign ? -m : m;
    } else {
        u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint32_t out;
    if (u >= 0x47800000u) {
        out = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
    } else if (u < 0x38800000u) {
        float g;
        memcpy(&g, &u, 4);
        g += 0.5f;
        uint32_t gu;
        memcpy(&gu, &g, 4);
        out = gu - 0x3F000000u;
    } else {
        uint32_t odd = (u >> 13) & 1u;
        u += 0xC8000FFFu + odd;
        out = u >> 13;
    }
    return (uint16_t)(out | (sign >> 16));
}

#endif
