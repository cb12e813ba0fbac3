#ifndef ADAPTER_MERGE_KERNEL_H
#define ADAPTER_MERGE_KERNEL_H

#include <stddef.h>
#include <stdint.h>

/// Element types of the fused kernel.
enum adapter_element { ADAPTER_F32 = 0, ADAPTER_BF16 = 1, ADAPTER_F16 = 2 };

/// W' = round(W + L·R) for `rows` rows of `cols` columns, Float32 accumulation, one rounding
/// (nearest, ties to even) into `dst_type`.
///
/// - src, dst: row-major, any alignment; dst may not alias src.
/// - l: rows × k Float32 (row i of L for row i of W).
/// - panels: R (k × cols) stored as ceil(cols / 8) panels of k × 8 floats (zero padded).
/// - limit: the largest magnitude that does not round to infinity in dst_type.
/// Returns 1 when every result is finite and within `limit`, 0 otherwise.
int adapter_merge_rows(int src_type, const void *src, int dst_type, void *dst,
                       size_t rows, size_t cols, const float *l, const float *panels, size_t k, float limit);

/// n elements converted between F32, BF16 and F16 (adapter_element), one rounding to nearest even
/// (the merge kernel's own scalar conversions).
void adapter_convert_elements(int src_type, const void *src, int dst_type, void *dst, size_t n);

/// n Float64 values to BF16 in one rounding (nearest, ties to even): rounded to Float32 by
/// truncation with a sticky bit (round to odd), then to BF16, which is exact for every double.
/// NaN stays NaN (quiet, sign kept). The scalar definition is ElementConversion.doubleToBF16.
void adapter_f64_to_bf16(const double *src, uint16_t *dst, size_t n);

/// n F32, BF16 or F16 values (adapter_element) widened to Float64, exactly.
void adapter_to_double(int src_type, const void *src, double *dst, size_t n);

/// Whether the AVX2 + FMA + F16C path is used on this machine.
int adapter_merge_kernel_is_vectorised(void);

/// FP8 requantization of `n` values sharing `scale` (> 0): codes[i] = E4M3(merged[i] / scale),
/// rounded to nearest even, saturating at ±448. Adds to
/// sums: [0] Σ (q − base)·(merged − base), [1] Σ (merged − base)², [2] Σ (q − base)², and keeps in
/// [3] the largest |merged − base| (q = E4M3(code) · scale, the requantized value; Float32 sums
/// within the run, Float64 across runs).
void adapter_fp8_e4m3_encode(const float *base, const float *merged, uint8_t *codes, size_t n, float scale, double sums[4]);

/// FP8 (E4M3) decoding of `n` codes sharing `scale`: base[i] = merged[i] = E4M3(codes[i]) · scale.
/// Returns 0 when a value is not finite (a NaN code), 1 otherwise.
int adapter_fp8_decode(const uint8_t *codes, size_t n, float scale, float *base, float *merged);

/// max |x[i]| over `n` finite values (0 for none).
float adapter_max_abs(const float *x, size_t n);

/// MXFP4 decoding of `blocks` blocks of 32 values (16 bytes each, low nibble the even element)
/// with one E8M0 exponent byte each: base = merged = E2M1[code] · 2^(scale − 127). Returns 0 when
/// a scale byte is 0xFF (NaN), 1 otherwise.
int adapter_mxfp4_decode(const uint8_t *codes, const uint8_t *scales, size_t blocks, float *base, float *merged);

/// MXFP4 requantization of `blocks` blocks of 32 merged values: per block the exponent
/// e0 = floor(log2 amax) − 2 or e0 + 1, whichever decodes nearer in squared error (ties: e0),
/// clamped to −127 … 127; codes nearest on the E2M1 grid, ties to the even code, saturating at
/// ±6. `scales` holds the old bytes (kept for blocks of zeros) and receives the new ones. Adds to
/// `sums` as adapter_fp8_e4m3_encode does.
void adapter_mxfp4_encode(const float *base, const float *merged, uint8_t *codes, uint8_t *scales, size_t blocks, double sums[4]);

/// NVFP4 decoding of `groups` groups of 16 values (8 bytes each, low nibble the even element)
/// with one E4M3 scale byte each and the tensor's `global`
/// scale: base = merged = bf16(E2M1[code] · (scale / global)), compressed-tensors'
/// decompression. Returns 0 when a scale is NaN, 1 otherwise.
int adapter_nvfp4_decode(const uint8_t *codes, const uint8_t *scales, size_t groups, float global, float *base, float *merged);

/// NVFP4 requantization of `groups` groups of 16 merged values under the kept `global` scale:
/// scale = E4M3(amax / 6 · global) (0 → 0.125; groups of zeros keep theirs), codes nearest to
/// x / (scale / global) with ties to the even code, saturating at ±6. `scales` holds the old
/// bytes and receives the new ones. Adds to `sums` as adapter_fp8_e4m3_encode does.
void adapter_nvfp4_encode(const float *base, const float *merged, uint8_t *codes, uint8_t *scales, size_t groups, float global,
                          double sums[4]);

/// GGML block types with a reference codec here (the ggml_type values).
enum adapter_ggml_type {
    ADAPTER_GGML_Q4_0 = 2, ADAPTER_GGML_Q4_1 = 3, ADAPTER_GGML_Q5_0 = 6, ADAPTER_GGML_Q5_1 = 7, ADAPTER_GGML_Q8_0 = 8,
    ADAPTER_GGML_Q2_K = 10, ADAPTER_GGML_Q3_K = 11, ADAPTER_GGML_Q4_K = 12, ADAPTER_GGML_Q5_K = 13, ADAPTER_GGML_Q6_K = 14
};

/// `n` values (a multiple of the block) as `type`: F32, F16, BF16 (ggml_type 0, 1, 30; one rounding
/// to nearest even) or blocks by ggml's reference quantizer of that type.
/// Returns 0 for a type without a codec or a partial block, 1 otherwise.
int adapter_ggml_encode(int type, const float *x, uint8_t *y, size_t n);

/// `n` values (a multiple of the block) of `type`, as ggml's dequantize_row_* gives them (F32, F16,
/// BF16, the 32-value types and the K-quants Q2_K … Q6_K).
int adapter_ggml_decode(int type, const uint8_t *x, float *y, size_t n);

/// dst (cols × rows) = the transpose of src (rows × cols), elements of `size` bytes (2 or 4).
void adapter_transpose(const void *src, void *dst, size_t rows, size_t cols, size_t size);

#endif
