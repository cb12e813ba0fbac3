#ifndef ADAPTER_LINEAR_ALGEBRA_H
#define ADAPTER_LINEAR_ALGEBRA_H

#include <stddef.h>
#include <stdint.h>

/// Dense Float64 kernels for rank-sized matrices (mixers), row-major unless said otherwise.

/// C (m × n, row stride ldc) += α · A (m × k, stride lda) · B (k × n, stride ldb).
void la_gemm(double *c, size_t ldc, double alpha, const double *a, size_t lda, const double *b, size_t ldb,
             size_t m, size_t n, size_t k);

/// LU factorisation with partial pivoting of the n × n matrix a, in place: P·A = L·U with L unit lower
/// triangular (below the diagonal) and U upper (on and above it); at step i row i was swapped with row
/// piv[i]. Returns the number of exactly zero pivots (0 for a nonsingular matrix).
size_t la_lu(double *a, size_t n, int64_t *piv);

/// Solves A·X = B in place for B (n × nrhs) with the factors of la_lu (which found no zero pivot).
void la_lu_solve(const double *lu, size_t n, const int64_t *piv, double *b, size_t nrhs);

/// Solves A·x = b (transposed = 0) or Aᵀ·x = b (transposed = 1) in place for one vector.
void la_lu_solve_vector(const double *lu, size_t n, const int64_t *piv, double *x, int transposed);

/// Y = Aᵀ·(A·X) for A (m × n) and X, Y (n × count, row-major), in one pass over A.
void la_gram_apply(const double *a, size_t m, size_t n, const double *x, double *y, size_t count);

/// Householder bidiagonalisation of the column-major m × n matrix a (m ≥ n), which is overwritten:
/// U^T·A·V = B with diagonal d[0..n) and superdiagonal e[0..n-1). A and B have the same singular values.
void la_bidiagonalize(double *a, size_t m, size_t n, double *d, double *e);

/// One-sided (Hestenes) Jacobi on the columns of u (column-major m × n): pairs of columns are rotated
/// until every pair is orthogonal to 1e-15 or after max_sweeps sweeps; the rotations are applied to v
/// (column-major n × n) too unless it is NULL. Returns the sweeps made.
int la_jacobi_svd(double *u, size_t m, size_t n, double *v, int max_sweeps);

/// Orthonormalises the columns of the column-major m × n matrix a in place, in order (modified
/// Gram–Schmidt, two passes); a column that lies in the span of those before it (to rounding)
/// becomes zero. Returns the number of such columns.
size_t la_orthonormalize(double *a, size_t m, size_t n);

/// out[i] = tuned[i] − base[i] in Float64 for n values stored as `tuned_type` and `base_type`
/// (0 F32, 1 BF16, 2 F64; each converted exactly), and returns Σ out[i]².
double la_difference(const void *tuned, int tuned_type, const void *base, int base_type, double *out, size_t n);

/// Fixes glibc's mmap threshold at 128 KiB (it otherwise grows with the blocks freed, and the heap
/// fragments): memory flat over long per-module runs. No effect elsewhere.
void la_fix_allocation_threshold(void);

/// Whether the AVX2 + FMA path is used on this machine.
int la_is_vectorised(void);

#endif
