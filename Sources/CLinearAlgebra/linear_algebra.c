// Dense Float64 kernels for mixer-sized matrices: a blocked GEMM update (the only O(n³) inner loop),
// LU with partial pivoting built on it, triangular solves, and Householder bidiagonalisation.
//
// In C for the same reason as the merge kernel: Swift cannot compile a function for AVX2/FMA and pick
// it at run time. The AVX2 path keeps a 4 × 8 tile of C in eight registers, fed from B packed in
// 8-column panels; the portable path is plain loops the compiler vectorises for any target.
#include "linear_algebra.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#endif

#define KC 256  // depth of a packed B block
#define NC 512  // width of a packed B block (a multiple of 8)
#define NB 64   // panel width of the blocked LU and solves

// MARK: - GEMM

static void gemm_portable(double *c, size_t ldc, double alpha, const double *a, size_t lda, const double *b, size_t ldb,
                          size_t m, size_t n, size_t k) {
    for (size_t i = 0; i < m; i++) {
        double *ci = c + i * ldc;
        const double *ai = a + i * lda;
        for (size_t p = 0; p < k; p++) {
            const double s = -alpha * ai[p];
            if (s == 0) continue;
            const double *bp = b + p * ldb;
            for (size_t j = 0; j < n; j++) ci[j] -= s * bp[j];
        }
    }
}

#if defined(__x86_64__)
static int avx2_state = -1;

int la_is_vectorised(void) {
    int state = __atomic_load_n(&avx2_state, __ATOMIC_RELAXED);
    if (state < 0) {
        __builtin_cpu_init();
        state = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        __atomic_store_n(&avx2_state, state, __ATOMIC_RELAXED);
    }
    return state;
}

/// C[mr × nr] += α · A[mr × kc] · panel (kc × 8, zero padded), mr ≤ 4, nr ≤ 8.
AVX2 static void micro_4x8(size_t kc, const double *a, size_t lda, const double *panel, double *c, size_t ldc,
                           size_t mr, size_t nr, double alpha) {
    __m256d acc[4][2];
    for (int r = 0; r < 4; r++) { acc[r][0] = _mm256_setzero_pd(); acc[r][1] = _mm256_setzero_pd(); }
    if (mr == 4) {
        const double *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
        for (size_t p = 0; p < kc; p++) {
            const __m256d b0 = _mm256_load_pd(panel + 8 * p), b1 = _mm256_load_pd(panel + 8 * p + 4);
            __m256d x;
            x = _mm256_broadcast_sd(a0 + p); acc[0][0] = _mm256_fmadd_pd(x, b0, acc[0][0]); acc[0][1] = _mm256_fmadd_pd(x, b1, acc[0][1]);
            x = _mm256_broadcast_sd(a1 + p); acc[1][0] = _mm256_fmadd_pd(x, b0, acc[1][0]); acc[1][1] = _mm256_fmadd_pd(x, b1, acc[1][1]);
            x = _mm256_broadcast_sd(a2 + p); acc[2][0] = _mm256_fmadd_pd(x, b0, acc[2][0]); acc[2][1] = _mm256_fmadd_pd(x, b1, acc[2][1]);
            x = _mm256_broadcast_sd(a3 + p); acc[3][0] = _mm256_fmadd_pd(x, b0, acc[3][0]); acc[3][1] = _mm256_fmadd_pd(x, b1, acc[3][1]);
        }
    } else {
        for (size_t p = 0; p < kc; p++) {
            const __m256d b0 = _mm256_load_pd(panel + 8 * p), b1 = _mm256_load_pd(panel + 8 * p + 4);
            for (size_t r = 0; r < mr; r++) {
                const __m256d x = _mm256_broadcast_sd(a + r * lda + p);
                acc[r][0] = _mm256_fmadd_pd(x, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_pd(x, b1, acc[r][1]);
            }
        }
    }
    const __m256d al = _mm256_set1_pd(alpha);
    for (size_t r = 0; r < mr; r++) {
        double *cr = c + r * ldc;
        if (nr == 8) {
            _mm256_storeu_pd(cr, _mm256_fmadd_pd(al, acc[r][0], _mm256_loadu_pd(cr)));
            _mm256_storeu_pd(cr + 4, _mm256_fmadd_pd(al, acc[r][1], _mm256_loadu_pd(cr + 4)));
        } else {
            double t[8];
            _mm256_storeu_pd(t, acc[r][0]);
            _mm256_storeu_pd(t + 4, acc[r][1]);
            for (size_t j = 0; j < nr; j++) cr[j] += alpha * t[j];
        }
    }
}

AVX2 static void gemm_avx2(double *c, size_t ldc, double alpha, const double *a, size_t lda, const double *b, size_t ldb,
                           size_t m, size_t n, size_t k, double *pack) {
    for (size_t jc = 0; jc < n; jc += NC) {
        const size_t nc = n - jc < NC ? n - jc : NC;
        const size_t panels = (nc + 7) / 8;
        for (size_t pc = 0; pc < k; pc += KC) {
            const size_t kc = k - pc < KC ? k - pc : KC;
            // B[pc .. pc+kc, jc .. jc+nc] as panels of kc × 8, the last one zero padded. The whole
            // panels are filled a row of B at a time, so B (which may be large and streamed from
            // memory, as D is in extract's Qᵀ·D) is read in order, two vector copies per panel.
            const size_t whole = nc / 8;
            for (size_t p = 0; p < kc; p++) {
                const double *src = b + (pc + p) * ldb + jc;
                for (size_t q = 0; q < whole; q++) {
                    double *dst = pack + q * kc * 8 + 8 * p;
                    _mm256_store_pd(dst, _mm256_loadu_pd(src + 8 * q));
                    _mm256_store_pd(dst + 4, _mm256_loadu_pd(src + 8 * q + 4));
                }
            }
            for (size_t q = whole; q < panels; q++) {
                double *dst = pack + q * kc * 8;
                const size_t cols = nc - 8 * q < 8 ? nc - 8 * q : 8;
                for (size_t p = 0; p < kc; p++) {
                    const double *src = b + (pc + p) * ldb + jc + 8 * q;
                    size_t j = 0;
                    for (; j < cols; j++) dst[8 * p + j] = src[j];
                    for (; j < 8; j++) dst[8 * p + j] = 0;
                }
            }
            for (size_t i = 0; i < m; i += 4) {
                const size_t mr = m - i < 4 ? m - i : 4;
                for (size_t q = 0; q < panels; q++) {
                    const size_t nr = nc - 8 * q < 8 ? nc - 8 * q : 8;
                    micro_4x8(kc, a + i * lda + pc, lda, pack + q * kc * 8, c + i * ldc + jc + 8 * q, ldc, mr, nr, alpha);
                }
            }
        }
    }
}
AVX2 static double dot_avx2(const double *a, const double *b, size_t n) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i), _mm256_loadu_pd(b + i), s0);
        s1 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i + 4), _mm256_loadu_pd(b + i + 4), s1);
        s2 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i + 8), _mm256_loadu_pd(b + i + 8), s2);
        s3 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i + 12), _mm256_loadu_pd(b + i + 12), s3);
    }
    for (; i + 4 <= n; i += 4) s0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i), _mm256_loadu_pd(b + i), s0);
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
    double s = (t[0] + t[1]) + (t[2] + t[3]);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

AVX2 static void axpy_avx2(double *y, double alpha, const double *x, size_t n) {
    const __m256d al = _mm256_set1_pd(alpha);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_pd(y + i, _mm256_fmadd_pd(al, _mm256_loadu_pd(x + i), _mm256_loadu_pd(y + i)));
        _mm256_storeu_pd(y + i + 4, _mm256_fmadd_pd(al, _mm256_loadu_pd(x + i + 4), _mm256_loadu_pd(y + i + 4)));
    }
    for (; i < n; i++) y[i] += alpha * x[i];
}
#else
int la_is_vectorised(void) { return 0; }
#endif

/// a · b, with independent partial sums (vectorised where the CPU allows).
static double dot(const double *a, const double *b, size_t n) {
#if defined(__x86_64__)
    if (la_is_vectorised()) return dot_avx2(a, b, n);
#endif
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) { s0 += a[i] * b[i]; s1 += a[i + 1] * b[i + 1]; s2 += a[i + 2] * b[i + 2]; s3 += a[i + 3] * b[i + 3]; }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/// y += α·x.
static void axpy(double *y, double alpha, const double *x, size_t n) {
#if defined(__x86_64__)
    if (la_is_vectorised()) { axpy_avx2(y, alpha, x, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

/// This thread's packing buffer for B blocks (KC × NC) followed by room for four rows of A (4 × KC),
/// allocated on first use and kept: GEMMs come by the thousand in extract, and a fresh 1 MiB
/// buffer each time is a fresh mapping to fault in.
static double *thread_pack(void) {
    static __thread double *pack = NULL;
    if (!pack) pack = aligned_alloc(32, (KC * NC + 4 * KC) * sizeof(double));
    return pack;
}

void la_gemm(double *c, size_t ldc, double alpha, const double *a, size_t lda, const double *b, size_t ldb,
             size_t m, size_t n, size_t k) {
    if (m == 0 || n == 0 || k == 0) return;
#if defined(__x86_64__)
    // Small products are not worth packing.
    if (la_is_vectorised() && m * n * k >= 32768) {
        double *pack = thread_pack();
        if (pack) {
            gemm_avx2(c, ldc, alpha, a, lda, b, ldb, m, n, k, pack);
            return;
        }
    }
#endif
    gemm_portable(c, ldc, alpha, a, lda, b, ldb, m, n, k);
}

// MARK: - LU

size_t la_lu(double *a, size_t n, int64_t *piv) {
    size_t zeros = 0;
    for (size_t j0 = 0; j0 < n; j0 += NB) {
        const size_t jb = n - j0 < NB ? n - j0 : NB, j1 = j0 + jb;
        // The panel, columns j0 .. j1, unblocked; rows are swapped whole.
        for (size_t j = j0; j < j1; j++) {
            size_t p = j;
            double best = fabs(a[j * n + j]);
            for (size_t i = j + 1; i < n; i++) {
                const double v = fabs(a[i * n + j]);
                if (v > best) { best = v; p = i; }
            }
            piv[j] = (int64_t)p;
            if (p != j) {
                double *rj = a + j * n, *rp = a + p * n;
                for (size_t t = 0; t < n; t++) { const double x = rj[t]; rj[t] = rp[t]; rp[t] = x; }
            }
            const double d = a[j * n + j];
            if (d == 0) { zeros++; continue; }
            const double inv = 1 / d;
            const double *uj = a + j * n;
            for (size_t i = j + 1; i < n; i++) {
                double *ri = a + i * n;
                const double l = ri[j] * inv;
                ri[j] = l;
                for (size_t t = j + 1; t < j1; t++) ri[t] -= l * uj[t];
            }
        }
        if (j1 == n) break;
        // U12 = L11⁻¹·A12: rows j0 .. j1 of the columns right of the panel.
        for (size_t i = j0 + 1; i < j1; i++) {
            double *ri = a + i * n;
            for (size_t t = j0; t < i; t++) {
                const double l = ri[t];
                if (l == 0) continue;
                const double *rt = a + t * n;
                for (size_t c = j1; c < n; c++) ri[c] -= l * rt[c];
            }
        }
        // A22 −= L21·U12.
        la_gemm(a + j1 * n + j1, n, -1, a + j1 * n + j0, n, a + j0 * n + j1, n, n - j1, n - j1, jb);
    }
    return zeros;
}

void la_lu_solve(const double *lu, size_t n, const int64_t *piv, double *b, size_t nrhs) {
    for (size_t i = 0; i < n; i++) {
        const size_t p = (size_t)piv[i];
        if (p != i) {
            double *ri = b + i * nrhs, *rp = b + p * nrhs;
            for (size_t t = 0; t < nrhs; t++) { const double x = ri[t]; ri[t] = rp[t]; rp[t] = x; }
        }
    }
    // L·Y = P·B, by blocks of rows: the part left of the block as one GEMM, the block itself by rows.
    for (size_t i0 = 0; i0 < n; i0 += NB) {
        const size_t i1 = n - i0 < NB ? n : i0 + NB;
        la_gemm(b + i0 * nrhs, nrhs, -1, lu + i0 * n, n, b, nrhs, i1 - i0, nrhs, i0);
        for (size_t i = i0 + 1; i < i1; i++) {
            double *bi = b + i * nrhs;
            for (size_t t = i0; t < i; t++) {
                const double l = lu[i * n + t];
                if (l == 0) continue;
                const double *bt = b + t * nrhs;
                for (size_t c = 0; c < nrhs; c++) bi[c] -= l * bt[c];
            }
        }
    }
    // U·X = Y, blocks from the bottom.
    size_t i1 = n;
    while (i1 > 0) {
        const size_t i0 = i1 > NB ? i1 - NB : 0;
        la_gemm(b + i0 * nrhs, nrhs, -1, lu + i0 * n + i1, n, b + i1 * nrhs, nrhs, i1 - i0, nrhs, n - i1);
        for (size_t i = i1; i-- > i0;) {
            double *bi = b + i * nrhs;
            for (size_t t = i + 1; t < i1; t++) {
                const double u = lu[i * n + t];
                if (u == 0) continue;
                const double *bt = b + t * nrhs;
                for (size_t c = 0; c < nrhs; c++) bi[c] -= u * bt[c];
            }
            const double inv = 1 / lu[i * n + i];
            for (size_t c = 0; c < nrhs; c++) bi[c] *= inv;
        }
        i1 = i0;
    }
}

void la_lu_solve_vector(const double *lu, size_t n, const int64_t *piv, double *x, int transposed) {
    if (!transposed) {
        for (size_t i = 0; i < n; i++) {
            const size_t p = (size_t)piv[i];
            if (p != i) { const double t = x[i]; x[i] = x[p]; x[p] = t; }
        }
        for (size_t i = 0; i < n; i++) x[i] -= dot(lu + i * n, x, i);
        for (size_t i = n; i-- > 0;) {
            const double *r = lu + i * n;
            x[i] = (x[i] - dot(r + i + 1, x + i + 1, n - i - 1)) / r[i];
        }
        return;
    }
    // Aᵀ = Uᵀ·Lᵀ·P: Uᵀ·z = x (rows of U used as columns), then Lᵀ·w = z, then x = Pᵀ·w.
    for (size_t i = 0; i < n; i++) {
        const double *r = lu + i * n;
        const double z = x[i] / r[i];
        x[i] = z;
        axpy(x + i + 1, -z, r + i + 1, n - i - 1);
    }
    for (size_t i = n; i-- > 0;) axpy(x, -x[i], lu + i * n, i);
    for (size_t i = n; i-- > 0;) {
        const size_t p = (size_t)piv[i];
        if (p != i) { const double t = x[i]; x[i] = x[p]; x[p] = t; }
    }
}

void la_gram_apply(const double *a, size_t m, size_t n, const double *x, double *y, size_t count) {
    memset(y, 0, n * count * sizeof(double));
    if (count == 1) {
        for (size_t i = 0; i < m; i++) {
            const double *r = a + i * n;
            axpy(y, dot(r, x, n), r, n);
        }
        return;
    }
    double *s = malloc((count ? count : 1) * sizeof(double));
    if (!s) return;
    for (size_t i = 0; i < m; i++) {
        const double *r = a + i * n;
        for (size_t v = 0; v < count; v++) s[v] = 0;
        // s = row · X, then Y += rowᵀ · s: the row is read from memory once, then from cache.
        for (size_t t = 0; t < n; t++) {
            const double rt = r[t];
            const double *xt = x + t * count;
            for (size_t v = 0; v < count; v++) s[v] += rt * xt[v];
        }
        for (size_t t = 0; t < n; t++) {
            const double rt = r[t];
            double *yt = y + t * count;
            for (size_t v = 0; v < count; v++) yt[v] += rt * s[v];
        }
    }
    free(s);
}

// MARK: - Bidiagonalisation

/// A Householder reflector H = I − τ·v·vᵀ (v[0] = 1) with H·x = β·e₁, as LAPACK's dlarfg makes it; x
/// (length len, stride inc) is overwritten with v. Returns τ and sets *beta.
static double reflector(double *x, size_t len, size_t inc, double *beta) {
    double alpha = x[0];
    double scale = 0;
    for (size_t i = 1; i < len; i++) scale = fmax(scale, fabs(x[i * inc]));
    if (scale == 0) {
        *beta = alpha;
        x[0] = 1;
        return 0;
    }
    // The norm with a scale, so that squares neither overflow nor underflow.
    scale = fmax(scale, fabs(alpha));
    double ss = 0;
    for (size_t i = 0; i < len; i++) { const double t = x[i * inc] / scale; ss += t * t; }
    const double norm = scale * sqrt(ss);
    const double b = alpha >= 0 ? -norm : norm;
    const double tau = (b - alpha) / b;
    const double f = 1 / (alpha - b);
    for (size_t i = 1; i < len; i++) x[i * inc] *= f;
    x[0] = 1;
    *beta = b;
    return tau;
}

void la_bidiagonalize(double *a, size_t m, size_t n, double *d, double *e) {
    double *u = malloc((n ? n : 1) * sizeof(double));
    double *w = malloc((m ? m : 1) * sizeof(double));
    if (!u || !w) { free(u); free(w); return; }
    for (size_t k = 0; k < n; k++) {
        // Left: zero column k below the diagonal; columns are contiguous.
        double *col = a + k * m + k;
        double beta;
        const double tau = reflector(col, m - k, 1, &beta);
        d[k] = beta;
        if (tau != 0) {
            for (size_t j = k + 1; j < n; j++) {
                double *cj = a + j * m + k;
                double s = 0;
                for (size_t i = 0; i < m - k; i++) s += col[i] * cj[i];
                s *= tau;
                for (size_t i = 0; i < m - k; i++) cj[i] -= s * col[i];
            }
        }
        if (k + 1 >= n) break;
        // Right: zero row k right of the superdiagonal; the row is gathered, and the trailing block is
        // updated column by column (w = A·u, then A −= τ·w·uᵀ).
        const size_t len = n - k - 1;
        for (size_t j = 0; j < len; j++) u[j] = a[(k + 1 + j) * m + k];
        const double tr = reflector(u, len, 1, &beta);
        e[k] = beta;
        if (tr == 0 || k + 1 >= m) continue;
        const size_t rows = m - k - 1;
        memset(w, 0, rows * sizeof(double));
        for (size_t j = 0; j < len; j++) {
            const double uj = u[j];
            const double *cj = a + (k + 1 + j) * m + k + 1;
            for (size_t i = 0; i < rows; i++) w[i] += uj * cj[i];
        }
        for (size_t j = 0; j < len; j++) {
            const double s = tr * u[j];
            double *cj = a + (k + 1 + j) * m + k + 1;
            for (size_t i = 0; i < rows; i++) cj[i] -= s * w[i];
        }
    }
    free(u);
    free(w);
}

// MARK: - One-sided Jacobi SVD

/// α = x·x, β = y·y, γ = x·y in one pass.
static void three_dots(const double *x, const double *y, size_t n, double *alpha, double *beta, double *gamma);
/// x ← c·x − s·y, y ← s·x + c·y.
static void rotate(double *x, double *y, size_t n, double c, double s);

#if defined(__x86_64__)
AVX2 static void three_dots_avx2(const double *x, const double *y, size_t n, double *alpha, double *beta, double *gamma) {
    __m256d a = _mm256_setzero_pd(), b = _mm256_setzero_pd(), g = _mm256_setzero_pd();
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const __m256d xv = _mm256_loadu_pd(x + i), yv = _mm256_loadu_pd(y + i);
        a = _mm256_fmadd_pd(xv, xv, a);
        b = _mm256_fmadd_pd(yv, yv, b);
        g = _mm256_fmadd_pd(xv, yv, g);
    }
    double ta[4], tb[4], tg[4];
    _mm256_storeu_pd(ta, a); _mm256_storeu_pd(tb, b); _mm256_storeu_pd(tg, g);
    double sa = (ta[0] + ta[1]) + (ta[2] + ta[3]), sb = (tb[0] + tb[1]) + (tb[2] + tb[3]), sg = (tg[0] + tg[1]) + (tg[2] + tg[3]);
    for (; i < n; i++) { sa += x[i] * x[i]; sb += y[i] * y[i]; sg += x[i] * y[i]; }
    *alpha = sa; *beta = sb; *gamma = sg;
}

AVX2 static void rotate_avx2(double *x, double *y, size_t n, double c, double s) {
    const __m256d cv = _mm256_set1_pd(c), sv = _mm256_set1_pd(s);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const __m256d xv = _mm256_loadu_pd(x + i), yv = _mm256_loadu_pd(y + i);
        _mm256_storeu_pd(x + i, _mm256_fnmadd_pd(sv, yv, _mm256_mul_pd(cv, xv)));
        _mm256_storeu_pd(y + i, _mm256_fmadd_pd(sv, xv, _mm256_mul_pd(cv, yv)));
    }
    for (; i < n; i++) { const double a = x[i], b = y[i]; x[i] = c * a - s * b; y[i] = s * a + c * b; }
}
#endif

static void three_dots(const double *x, const double *y, size_t n, double *alpha, double *beta, double *gamma) {
#if defined(__x86_64__)
    if (la_is_vectorised()) { three_dots_avx2(x, y, n, alpha, beta, gamma); return; }
#endif
    double a = 0, b = 0, g = 0;
    for (size_t i = 0; i < n; i++) { a += x[i] * x[i]; b += y[i] * y[i]; g += x[i] * y[i]; }
    *alpha = a; *beta = b; *gamma = g;
}

static void rotate(double *x, double *y, size_t n, double c, double s) {
#if defined(__x86_64__)
    if (la_is_vectorised()) { rotate_avx2(x, y, n, c, s); return; }
#endif
    for (size_t i = 0; i < n; i++) { const double a = x[i], b = y[i]; x[i] = c * a - s * b; y[i] = s * a + c * b; }
}

int la_jacobi_svd(double *u, size_t m, size_t n, double *v, int max_sweeps) {
    for (int sweep = 0; sweep < max_sweeps; sweep++) {
        int rotated = 0;
        for (size_t p = 0; p < n; p++) {
            for (size_t q = p + 1; q < n; q++) {
                double *up = u + p * m, *uq = u + q * m;
                double alpha, beta, gamma;
                three_dots(up, uq, m, &alpha, &beta, &gamma);
                if (gamma == 0 || fabs(gamma) <= 1e-15 * sqrt(alpha * beta)) continue;
                rotated = 1;
                const double zeta = (beta - alpha) / (2 * gamma);
                const double t = (zeta >= 0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1 + zeta * zeta));
                const double c = 1 / sqrt(1 + t * t), s = c * t;
                rotate(up, uq, m, c, s);
                if (v) rotate(v + p * n, v + q * n, n, c, s);
            }
        }
        if (!rotated) return sweep + 1;
    }
    return max_sweeps;
}

// MARK: - Orthonormal columns

size_t la_orthonormalize(double *a, size_t m, size_t n) {
    size_t vanished = 0;
    for (size_t j = 0; j < n; j++) {
        double *cj = a + j * m;
        const double before = sqrt(dot(cj, cj, m));
        // Two passes of modified Gram–Schmidt: the second removes what rounding left of the first.
        for (int pass = 0; pass < 2; pass++) {
            for (size_t k = 0; k < j; k++) {
                const double *ck = a + k * m;
                axpy(cj, -dot(ck, cj, m), ck, m);
            }
        }
        const double norm = sqrt(dot(cj, cj, m));
        // A column left with no more than rounding of what it was lies in the span of the others.
        if (!(norm > 1e-13 * before) || norm == 0) {
            memset(cj, 0, m * sizeof(double));
            vanished++;
            continue;
        }
        const double inv = 1 / norm;
        for (size_t i = 0; i < m; i++) cj[i] *= inv;
    }
    return vanished;
}

// MARK: - Differences of stored weights

/// The Float64 value of element i of a buffer of `dtype` (0 F32, 1 BF16, 2 F64).
static inline double stored_value(const void *p, int dtype, size_t i) {
    switch (dtype) {
    case 0: return (double)((const float *)p)[i];
    case 1: {
        const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return (double)f;
    }
    default: return ((const double *)p)[i];
    }
}

#if defined(__x86_64__)
/// 4 values of `dtype` at p + i as doubles.
AVX2 static inline __m256d load4(const void *p, int dtype, size_t i) {
    switch (dtype) {
    case 0: return _mm256_cvtps_pd(_mm_loadu_ps((const float *)p + i));
    case 1: {
        const __m128i h = _mm_loadl_epi64((const __m128i *)((const uint16_t *)p + i));
        const __m128i w = _mm_slli_epi32(_mm_cvtepu16_epi32(h), 16);
        return _mm256_cvtps_pd(_mm_castsi128_ps(w));
    }
    default: return _mm256_loadu_pd((const double *)p + i);
    }
}

AVX2 static double difference_avx2(const void *tuned, int tuned_type, const void *base, int base_type, double *out, size_t n) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256d d0 = _mm256_sub_pd(load4(tuned, tuned_type, i), load4(base, base_type, i));
        const __m256d d1 = _mm256_sub_pd(load4(tuned, tuned_type, i + 4), load4(base, base_type, i + 4));
        _mm256_storeu_pd(out + i, d0);
        _mm256_storeu_pd(out + i + 4, d1);
        s0 = _mm256_fmadd_pd(d0, d0, s0);
        s1 = _mm256_fmadd_pd(d1, d1, s1);
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(s0, s1));
    double s = (t[0] + t[1]) + (t[2] + t[3]);
    for (; i < n; i++) {
        const double d = stored_value(tuned, tuned_type, i) - stored_value(base, base_type, i);
        out[i] = d;
        s += d * d;
    }
    return s;
}
#endif

double la_difference(const void *tuned, int tuned_type, const void *base, int base_type, double *out, size_t n) {
#if defined(__x86_64__)
    if (la_is_vectorised()) return difference_avx2(tuned, tuned_type, base, base_type, out, n);
#endif
    double s0 = 0, s1 = 0;
    size_t i = 0;
    for (; i + 2 <= n; i += 2) {
        const double d0 = stored_value(tuned, tuned_type, i) - stored_value(base, base_type, i);
        const double d1 = stored_value(tuned, tuned_type, i + 1) - stored_value(base, base_type, i + 1);
        out[i] = d0;
        out[i + 1] = d1;
        s0 += d0 * d0;
        s1 += d1 * d1;
    }
    for (; i < n; i++) {
        const double d = stored_value(tuned, tuned_type, i) - stored_value(base, base_type, i);
        out[i] = d;
        s0 += d * d;
    }
    return s0 + s1;
}

// MARK: - Allocator

#if defined(__GLIBC__)
#include <malloc.h>
#endif

void la_fix_allocation_threshold(void) {
#if defined(__GLIBC__)
    // glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after
    // which blocks of a few MiB come from the heap and fragment it: a long run of per-module
    // work then grows the resident set with the module count. A fixed threshold keeps every
    // block above 128 KiB in its own mapping, returned to the system when freed.
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
#endif
}
