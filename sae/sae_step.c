/* The sparse part of one SAE training step on the CPU: TopK selection, Matryoshka prefix
 * reconstructions, the loss, and the hand-written gradients of sae/step.py's TorchStep (same formulas,
 * same notation; its docstring derives them). The dense encoder matmul stays in PyTorch (BLAS); this
 * replaces the ~20 small PyTorch ops after it, each of which read or wrote a whole B×D or B×M tensor.
 *
 * The batch baselines β (of x_c) and β_aux (of e_{P-1}) are known only once every token is seen, but
 * they only scale the gradients: ∂loss/∂x̂_p = c·e_p with c = −2/(Pβ), and likewise for aux-K with
 * c_aux = −2·AUX_COEF/β_aux. So each token is visited once, with its decoder rows still in cache, and
 * the scales are applied when the entries are grouped:
 *   1. per token (threads split the tokens): the K largest pre-activations (when `select`); the
 *      residual of every prefix e_p = x_c − Σ_{chunks ≤ p} codes·W_dec and its sum of squares; with
 *      aux-K the residual of reconstructing e_{P-1} from the aux_k largest dead pre-activations; then
 *      Ẽ_c = Σ_{p ≥ c} e_p and the unscaled code gradients ⟨Ẽ_chunk, W_dec[f]⟩ (⟨e_aux, W_dec[f]⟩).
 *   2. one thread: the loss (all there is without `grads`, as in evaluation), the scales, and the
 *      entries with a nonzero code grouped by feature (a counting sort), each carrying its scaled code
 *      and its scaled pre-activation gradient.
 *   3. per feature (threads split the features): W_dec, W_enc and b_enc gradients from the entries;
 *      the W_dec row's gradient made orthogonal to the row (the unit-norm constraint, as
 *      SparseAutoencoder.remove_parallel_grad); the squared gradient norm. Then b_pre's gradient,
 *      c·Σ_b Ẽ_0 − W_encᵀ ∂b_enc.
 * adam_update, at the end, is the optimizer step that follows: torch.optim.Adam's formula on its state,
 * with the clipping scale folded in and the decoder rows renormalised while they are in cache.
 * Built by sae/c_step.py with the system C compiler, with OpenMP where the compiler has it (else one
 * thread); float32, row-major, contiguous arrays. */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP (Apple clang without libomp): one thread, the pragmas are ignored */
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif
#include <stdint.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

typedef struct {
    double aux;      /* normalized MSE of the aux-K reconstruction of e_{P-1}; 0 without dead features */
    double loss;     /* mean of the prefix normalized MSEs + aux_coef · aux */
    double grad_sq;  /* squared norm of all the gradients (with grads) */
    double beta;     /* β = ‖x_c − batch mean‖² */
} Totals;

typedef struct {
    int64_t B, D, M, J, A, P, threads, select, grads; /* grads 0: the loss only (evaluation) */
    const int64_t *prefix_ends;           /* P increasing ends, the last one M */
    const float *xc, *pre, *W_dec, *W_enc; /* B×D (x_s − b_pre), B×M, M×D, M×D */
    const uint8_t *dead;                  /* M flags, or NULL: no aux-K term */
    int64_t *idx;                         /* B×J selected features: written when select, else read */
    float *vals;                          /* B×J their codes (ReLU'd; 0 = not a real entry) */
    uint8_t *fired;                       /* M: written, whether the feature has a positive code */
    float *g_W_enc, *g_b_enc, *g_W_dec, *g_b_pre; /* gradients, all written (with grads) */
    double aux_coef;
    double *prefix_nmse;                  /* P: written, each prefix's normalized MSE */
    Totals *totals;                       /* written */
} Step;

/* Sizes of the two structs, checked by sae/c_step.py against its ctypes copies when it loads the library. */
int64_t step_struct_size(void) { return (int64_t)sizeof(Step); }
int64_t totals_struct_size(void) { return (int64_t)sizeof(Totals); }

enum { COL_X, COL_E, COL_G, COL_W, N_COL }; /* per-thread column sums: x_c, e_{P-1}, Ẽ_0, W_encᵀ∂b_enc */

typedef struct {
    const Step *s;
    int64_t T, n_dead, A;  /* threads, dead features, aux entries per token (≤ aux_k) */
    int64_t *dead_list, *fill;
    float *cand;     /* T×M scratch: block maxima for top_n, a token's dead pre-activations */
    float *E;        /* (P+1)×B×D: Ẽ_c for each chunk c, then the aux residual; without grads, T×P×D */
    float *gpre;     /* B×J unscaled code gradients */
    int64_t *aux_idx; float *aux_vals, *aux_g; /* B×A */
    double *ss;      /* B×(P+2): ‖x_c‖², ‖e_p‖² for each p, ‖e_aux‖² */
    float *col;      /* T×N_COL×D (float sums, as the PyTorch path's) */
    double *sq;      /* T squared gradient norms */
    float c_main, c_aux;
    int64_t *start, *ent_src, *ent_row, *fbounds; /* entries grouped by feature, features per thread */
    float *ent_val, *ent_g;
    int64_t *row_idx; float *row_w; /* T×(J+A): per thread, the rows rows_sum adds for one token */
} Ctx;

static inline int64_t chunk_of(const Step *s, int64_t f) {
    int64_t c = 0;
    while (f >= s->prefix_ends[c]) c++;
    return c;
}

/* Eight floats as one value (GCC's and clang's vector extension): an AVX register, or two SSE ones.
 * Written out because the compiler, left to vectorise the loops below itself, vectorised across rows with
 * gathers and kept the partial sums in memory. */
typedef float vec8 __attribute__((vector_size(32)));
enum { BLOCK = 64, LANES = 8, VECS = BLOCK / LANES };  /* floats a block of partial sums holds */

static inline vec8 load8(const float *p) { vec8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }
static inline vec8 splat8(float a) { return (vec8){a, a, a, a, a, a, a, a}; }

/* Σ a·b with BLOCK independent partial sums: one running sum is a chain of dependent adds, each waiting
 * on the last one's latency */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    vec8 acc[VECS];
    for (int u = 0; u < VECS; u++) acc[u] = splat8(0.f);
    int64_t i = 0;
    for (; i + BLOCK <= n; i += BLOCK)
        for (int u = 0; u < VECS; u++) acc[u] += load8(a + i + LANES * u) * load8(b + i + LANES * u);
    float sum = 0.f;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int u = 1; u < VECS; u++) acc[0] += acc[u];
    for (int l = 0; l < LANES; l++) sum += acc[0][l];
    return sum;
}

static inline void axpy(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* y = base + Σ_i w[i]·mat[rows[i]] over D columns (base NULL: 0). BLOCK columns of y at a time stay in
 * registers while the rows are added, so y is stored once instead of once per row (an axpy per row was
 * bound by those stores); each element still sums in the order of the rows, as the axpys did. */
static void rows_sum(float *restrict y, const float *restrict base, const float *restrict mat, const int64_t *rows,
                     const float *w, int64_t n, int64_t D) {
    int64_t d = 0;
    for (; d + BLOCK <= D; d += BLOCK) {
        vec8 acc[VECS];
        for (int u = 0; u < VECS; u++) acc[u] = base ? load8(base + d + LANES * u) : splat8(0.f);
        for (int64_t i = 0; i < n; i++) {
            const float *r = mat + rows[i] * D + d;
            vec8 wi = splat8(w[i]);
            for (int u = 0; u < VECS; u++) acc[u] += wi * load8(r + LANES * u);
        }
        for (int u = 0; u < VECS; u++) store8(y + d + LANES * u, acc[u]);
    }
    for (; d < D; d++) {
        float acc = base ? base[d] : 0.f;
        for (int64_t i = 0; i < n; i++) acc += w[i] * mat[rows[i] * D + d];
        y[d] = acc;
    }
}

static inline float *col(Ctx *c, int64_t t, int which) { return c->col + (t * N_COL + which) * c->s->D; }

/* Min-heap of the n largest seen so far (val[0] the smallest); ties keep the earlier one. */
static inline void heap_offer(float x, int64_t f, int64_t *size, int64_t n, int64_t *idx, float *val) {
    int64_t pos;
    if (*size < n) { /* sift up */
        pos = (*size)++;
        while (pos > 0 && val[(pos - 1) / 2] > x) {
            val[pos] = val[(pos - 1) / 2]; idx[pos] = idx[(pos - 1) / 2]; pos = (pos - 1) / 2;
        }
    } else if (x > val[0]) { /* replace the root, sift down */
        pos = 0;
        for (;;) {
            int64_t l = 2 * pos + 1, r = l + 1, m = pos;
            float mv = x;
            if (l < n && val[l] < mv) { m = l; mv = val[l]; }
            if (r < n && val[r] < mv) m = r;
            if (m == pos) break;
            val[pos] = val[m]; idx[pos] = idx[m]; pos = m;
        }
    } else {
        return;
    }
    val[pos] = x; idx[pos] = f;
}

/* Whether any of v[0..8) is at least thr, and their largest: one vector op each where the CPU has AVX */
static inline int any_at_least(const float *v, float thr) {
#if defined(__AVX__)
    return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v), _mm256_set1_ps(thr), _CMP_GE_OQ));
#else
    int any = 0;
    for (int u = 0; u < 8; u++) any |= v[u] >= thr;
    return any;
#endif
}

static inline float max8(const float *v) {
#if defined(__AVX__)
    __m256 m = _mm256_loadu_ps(v);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
#else
    float m = v[0];
    for (int u = 1; u < 8; u++) m = v[u] > m ? v[u] : m;
    return m;
#endif
}

static void heap_top_n(const float *v, int64_t len, int64_t n, int64_t *idx, float *val) {
    int64_t size = 0;
    for (int64_t i = 0; i < len; i++) heap_offer(v[i], i, &size, n, idx, val);
}

/* The n largest of v[0..len). The n-th largest of the maxima of blocks of 8 is a lower bound for the
 * n-th largest value (n blocks hold a value at least that large), so only the few values at or above it
 * go through the heap. `scratch` holds len/8 floats. */
static void top_n(const float *restrict v, int64_t len, int64_t n, int64_t *idx, float *val, float *scratch) {
    int64_t blocks = len / 8, size = 0, i;
    if (blocks < 2 * n) {
        heap_top_n(v, len, n, idx, val);
        return;
    }
    for (int64_t b = 0; b < blocks; b++) scratch[b] = max8(v + 8 * b);
    heap_top_n(scratch, blocks, n, idx, val);
    float bound = val[0];
    for (i = 0; i + 8 <= len; i += 8)
        if (any_at_least(v + i, bound))
            for (int u = 0; u < 8; u++)
                if (v[i + u] >= bound) heap_offer(v[i + u], i + u, &size, n, idx, val);
    for (; i < len; i++) heap_offer(v[i], i, &size, n, idx, val);
}

static void per_token(Ctx *c, int64_t t) {
    const Step *s = c->s;
    int64_t B = s->B, D = s->D, J = s->J, P = s->P, A = c->A;
    float *colx = col(c, t, COL_X), *cole = col(c, t, COL_E), *colg = col(c, t, COL_G);
    memset(colx, 0, 3 * D * sizeof(float));
    float *cand = c->cand + t * s->M, *w = c->row_w + t * (J + A);
    int64_t *rows = c->row_idx + t * (J + A);  /* a token's rows to sum and their weights */
    for (int64_t b = B * t / c->T; b < B * (t + 1) / c->T; b++) {
        const float *x = s->xc + b * D, *pre = s->pre + b * s->M;
        int64_t *ib = s->idx + b * J;
        float *vb = s->vals + b * J;
        double *ss = c->ss + b * (P + 2);
        if (s->select) {
            top_n(pre, s->M, J, ib, vb, cand);
            for (int64_t j = 0; j < J; j++) vb[j] = vb[j] > 0.f ? vb[j] : 0.f;
        }
        const float *prev = x;
        for (int64_t p = 0; p < P; p++) {
            float *e = c->E + (s->grads ? p * B + b : t * P + p) * D;  /* evaluation keeps no rows */
            int64_t n = 0;
            for (int64_t j = 0; j < J; j++)
                if (vb[j] > 0.f && chunk_of(s, ib[j]) == p) { rows[n] = ib[j]; w[n++] = -vb[j]; }
            rows_sum(e, prev, s->W_dec, rows, w, n, D);
            ss[1 + p] = dot(e, e, D);
            prev = e;
        }
        ss[0] = dot(x, x, D);
        for (int64_t d = 0; d < D; d++) colx[d] += x[d];
        if (!s->grads)
            continue;
        if (A) {
            int64_t *ia = c->aux_idx + b * A;
            float *va = c->aux_vals + b * A, *ea = c->E + (P * B + b) * D;
            for (int64_t i = 0; i < c->n_dead; i++) cand[i] = pre[c->dead_list[i]];
            heap_top_n(cand, c->n_dead, A, ia, va);
            int64_t n = 0;
            for (int64_t a = 0; a < A; a++) {
                ia[a] = c->dead_list[ia[a]];
                va[a] = va[a] > 0.f ? va[a] : 0.f;
                if (va[a] > 0.f) { rows[n] = ia[a]; w[n++] = -va[a]; }
            }
            rows_sum(ea, prev, s->W_dec, rows, w, n, D);
            ss[P + 1] = dot(ea, ea, D);
            for (int64_t d = 0; d < D; d++) cole[d] += prev[d];
            for (int64_t a = 0; a < A; a++)
                c->aux_g[b * A + a] = va[a] > 0.f ? dot(ea, s->W_dec + ia[a] * D, D) : 0.f;
        }
        for (int64_t p = P - 2; p >= 0; p--) /* Ẽ_p = e_p + Ẽ_{p+1} */
            axpy(c->E + (p * B + b) * D, 1.f, c->E + ((p + 1) * B + b) * D, D);
        const float *g0 = c->E + b * D;
        for (int64_t d = 0; d < D; d++) colg[d] += g0[d];
        for (int64_t j = 0; j < J; j++)
            c->gpre[b * J + j] = vb[j] > 0.f
                ? dot(c->E + (chunk_of(s, ib[j]) * B + b) * D, s->W_dec + ib[j] * D, D) : 0.f;
    }
}

/* ‖t − batch mean‖² from Σ‖t_b‖² (column ss_col of ss) and the per-thread column sums `which` */
static double spread(Ctx *c, int64_t ss_col, int which) {
    const Step *s = c->s;
    int64_t B = s->B, D = s->D, P = s->P;
    double total = 0., mean_sq = 0.;
    for (int64_t b = 0; b < B; b++) total += c->ss[b * (P + 2) + ss_col];
    for (int64_t d = 0; d < D; d++) {
        double m = 0.;
        for (int64_t t = 0; t < c->T; t++) m += col(c, t, which)[d];
        m /= (double)B;
        mean_sq += m * m;
    }
    double v = total - (double)B * mean_sq;
    return v > 1e-12 ? v : 1e-12;
}

static void reduce_loss(Ctx *c) {
    const Step *s = c->s;
    int64_t B = s->B, P = s->P;
    double beta = spread(c, 0, COL_X), loss = 0.;
    for (int64_t p = 0; p < P; p++) {
        double e = 0.;
        for (int64_t b = 0; b < B; b++) e += c->ss[b * (P + 2) + 1 + p];
        s->prefix_nmse[p] = e / beta;
        loss += s->prefix_nmse[p] / (double)P;
    }
    s->totals->aux = 0.;
    if (c->A) {
        double aux_beta = spread(c, P, COL_E), e = 0.;
        for (int64_t b = 0; b < B; b++) e += c->ss[b * (P + 2) + P + 1];
        s->totals->aux = e / aux_beta;
        loss += s->aux_coef * s->totals->aux;
        c->c_aux = (float)(-2. * s->aux_coef / aux_beta);
    }
    s->totals->loss = loss;
    s->totals->beta = beta;
    memset(s->fired, 0, s->M);
    for (int64_t i = 0; i < B * s->J; i++)
        if (s->vals[i] > 0.f) s->fired[s->idx[i]] = 1;
    c->c_main = (float)(-2. / ((double)P * beta));
}

/* Group the entries with a nonzero code by feature, scaled, and split the features between threads so
 * that each gets about the same number of entries. */
static void group_entries(Ctx *c) {
    const Step *s = c->s;
    int64_t B = s->B, J = s->J, M = s->M, A = c->A, P = s->P;
    int64_t *start = c->start;
    memset(start, 0, (M + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < B * J; i++) if (s->vals[i] > 0.f) start[s->idx[i] + 1]++;
    for (int64_t i = 0; i < B * A; i++) if (c->aux_vals[i] > 0.f) start[c->aux_idx[i] + 1]++;
    for (int64_t f = 0; f < M; f++) start[f + 1] += start[f];
    int64_t *fill = c->fill;
    memcpy(fill, start, M * sizeof(int64_t));
    for (int64_t i = 0; i < B * J; i++) {
        if (!(s->vals[i] > 0.f)) continue;
        int64_t f = s->idx[i], b = i / J, k = fill[f]++;
        c->ent_src[k] = chunk_of(s, f) * B + b; c->ent_row[k] = b;
        c->ent_val[k] = c->c_main * s->vals[i]; c->ent_g[k] = c->c_main * c->gpre[i];
    }
    for (int64_t i = 0; i < B * A; i++) {
        if (!(c->aux_vals[i] > 0.f)) continue;
        int64_t f = c->aux_idx[i], b = i / A, k = fill[f]++;
        c->ent_src[k] = P * B + b; c->ent_row[k] = b;
        c->ent_val[k] = c->c_aux * c->aux_vals[i]; c->ent_g[k] = c->c_aux * c->aux_g[i];
    }
    /* cost of a feature: its entries plus one (zeroing its rows) */
    int64_t total = start[M] + M, f = 0;
    c->fbounds[0] = 0;
    for (int64_t t = 1; t < c->T; t++) {
        while (f < M && start[f] + f < total * t / c->T) f++;
        c->fbounds[t] = f;
    }
    c->fbounds[c->T] = M;
}

static void per_feature(Ctx *c, int64_t t) {
    const Step *s = c->s;
    int64_t D = s->D;
    float *wb = col(c, t, COL_W);
    double sq = 0.;
    memset(wb, 0, D * sizeof(float));
    for (int64_t f = c->fbounds[t]; f < c->fbounds[t + 1]; f++) {
        float *wd = s->g_W_dec + f * D, *we = s->g_W_enc + f * D, gb = 0.f;
        int64_t k0 = c->start[f], n = c->start[f + 1] - k0;
        rows_sum(wd, NULL, c->E, c->ent_src + k0, c->ent_val + k0, n, D);
        rows_sum(we, NULL, s->xc, c->ent_row + k0, c->ent_g + k0, n, D);
        for (int64_t k = k0; k < k0 + n; k++) gb += c->ent_g[k];
        s->g_b_enc[f] = gb;
        if (n == 0)
            continue;
        const float *w = s->W_dec + f * D, *v = s->W_enc + f * D;
        axpy(wd, -dot(wd, w, D), w, D);
        sq += (double)dot(wd, wd, D) + (double)dot(we, we, D) + (double)gb * gb;
        axpy(wb, gb, v, D);
    }
    c->sq[t] = sq;
}

static void finish_b_pre(Ctx *c) {
    const Step *s = c->s;
    double sq = 0.;
    for (int64_t d = 0; d < s->D; d++) {
        double g = 0., w = 0.;
        for (int64_t t = 0; t < c->T; t++) {
            g += col(c, t, COL_G)[d];
            w += col(c, t, COL_W)[d];
        }
        s->g_b_pre[d] = (float)(c->c_main * g - w);
        sq += (double)s->g_b_pre[d] * s->g_b_pre[d];
    }
    for (int64_t t = 0; t < c->T; t++) sq += c->sq[t];
    s->totals->grad_sq = sq;
}

/* Returns 0, or -1 when memory could not be had (the caller falls back to PyTorch). */
int sae_step(const Step *s) {
    Ctx c = {0};
    int64_t B = s->B, D = s->D, M = s->M, P = s->P;
    if (B < 1 || D < 1 || s->J < 1 || P < 1) return -1;
    c.s = s;
    c.T = s->threads < 1 ? 1 : s->threads > B ? B : s->threads;
    if (s->dead && s->A > 0 && s->grads) {
        c.dead_list = malloc(M * sizeof(int64_t));
        if (!c.dead_list) return -1;
        for (int64_t f = 0; f < M; f++) if (s->dead[f]) c.dead_list[c.n_dead++] = f;
        c.A = c.n_dead < s->A ? c.n_dead : s->A;
    }
    int64_t A = c.A, n_ent = B * (s->J + A);
    c.E = malloc((s->grads ? (P + 1) * B : c.T * P) * D * sizeof(float));
    c.gpre = malloc(B * s->J * sizeof(float));
    c.aux_idx = malloc((B * A + 1) * sizeof(int64_t));
    c.aux_vals = malloc((B * A + 1) * sizeof(float));
    c.aux_g = malloc((B * A + 1) * sizeof(float));
    c.ss = malloc(B * (P + 2) * sizeof(double));
    c.col = malloc(c.T * N_COL * D * sizeof(float));
    c.sq = malloc(c.T * sizeof(double));
    c.start = malloc((M + 1) * sizeof(int64_t));
    c.fill = malloc(M * sizeof(int64_t));
    c.cand = malloc(c.T * M * sizeof(float));
    c.fbounds = malloc((c.T + 1) * sizeof(int64_t));
    c.ent_src = malloc((n_ent + 1) * sizeof(int64_t));
    c.ent_row = malloc((n_ent + 1) * sizeof(int64_t));
    c.ent_val = malloc((n_ent + 1) * sizeof(float));
    c.ent_g = malloc((n_ent + 1) * sizeof(float));
    c.row_idx = malloc(c.T * (s->J + A) * sizeof(int64_t));
    c.row_w = malloc(c.T * (s->J + A) * sizeof(float));
    int rc = -1;
    if (c.E && c.gpre && c.aux_idx && c.aux_vals && c.aux_g && c.ss && c.col && c.sq && c.start && c.fill && c.cand
        && c.fbounds && c.ent_src && c.ent_row && c.ent_val && c.ent_g && c.row_idx && c.row_w) {
        /* PyTorch's own OpenMP runtime and thread team (the library is linked against the libgomp that
         * torch has loaded): no second pool competing for the cores */
        #pragma omp parallel num_threads((int)c.T)
        {
            #pragma omp single
            c.T = omp_get_num_threads();
            int64_t t = omp_get_thread_num();
            per_token(&c, t);
            #pragma omp barrier
            #pragma omp single
            {
                reduce_loss(&c);
                if (s->grads) group_entries(&c);
            }
            if (s->grads) {
                per_feature(&c, t);
                #pragma omp barrier
                #pragma omp single
                finish_b_pre(&c);
            }
        }
        rc = 0;
    }
    free(c.dead_list); free(c.E); free(c.gpre); free(c.aux_idx); free(c.aux_vals); free(c.aux_g);
    free(c.ss); free(c.col); free(c.sq); free(c.start); free(c.fill); free(c.cand); free(c.fbounds);
    free(c.ent_src); free(c.ent_row); free(c.ent_val); free(c.ent_g); free(c.row_idx); free(c.row_w);
    return rc;
}

/* The bits of a positive float, which order positive floats as unsigned integers. */
static inline uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

enum { RADIX_BINS = 1 << 11, RADIX_LANES = 4 };  /* digits of at most 11 bits; lanes of counters */

/* One digit of a radix select over the positive values whose bits above `shift + width` equal `prefix`:
 * the digit (bits shift .. shift + width) holding the r-th largest of them (r >= 1), and in *above how
 * many of them have a larger digit. Four lanes of counters keep equal values from waiting on each other. */
static uint32_t radix_digit(const float *v, int64_t len, uint32_t prefix, int shift, int width, int64_t r,
                            int64_t *above) {
    uint32_t hist[RADIX_LANES][RADIX_BINS];
    memset(hist, 0, sizeof hist);
    uint32_t bins = 1u << width, top = shift + width;
    for (int64_t i = 0; i < len; i++) {
        uint32_t u = bits_of(v[i]);
        if (v[i] > 0.f && (top >= 32 || u >> top == prefix))
            hist[i & (RADIX_LANES - 1)][(u >> shift) & (bins - 1)]++;
    }
    int64_t cum = 0;
    uint32_t b = bins - 1;
    for (;; b--) {
        int64_t h = 0;
        for (int l = 0; l < RADIX_LANES; l++) h += hist[l][b];
        if (cum + h >= r || b == 0) break;
        cum += h;
    }
    *above = cum;
    return b;
}

/* The n-th largest of the positive values of v[0..len) (at least n of them), by a radix select on their
 * bits in three digits of 11, 11 and 10 bits; *ties receives how many of the values equal to it rank
 * within the n largest. */
static float nth_largest_positive(const float *v, int64_t len, int64_t n, int64_t *ties) {
    static const int widths[3] = {11, 11, 10};
    int64_t above, r = n;
    uint32_t prefix = 0;
    for (int d = 0, shift = 32; d < 3; d++) {
        shift -= widths[d];
        prefix = prefix << widths[d] | radix_digit(v, len, prefix, shift, widths[d], r, &above);
        r -= above;  /* the rank among the values that share the prefix so far */
    }
    float out;
    memcpy(&out, &prefix, sizeof out);
    *ties = r;
    return out;
}

/* BatchTopK's selection over a whole batch, as SparseAutoencoder.select: in training (n > 0) the n largest
 * positive values of pre (B×M), the n-th found among the candidates that block maxima leave (ties at the
 * n-th value: the first ones in row-major order), all of them when fewer than n are positive; at
 * inference (n == 0) the positive values above `threshold`. Each row's kept features go to idx/vals (room
 * for B×M entries) as rows of J, the most kept by any row (at least 1); the rest of a row is feature 0 with
 * code 0 (no entry). Returns J (-1: no memory); *kept_min receives the smallest kept value (NaN: none). */
int64_t batch_select(const float *pre, int64_t B, int64_t M, int64_t n, double threshold, int64_t *idx,
                     float *vals, float *kept_min) {
    int64_t len = B * M, ties = 0, J = 1, kept = 0;
    float cut = (float)threshold;  /* kept: positive values above cut, plus `ties` values equal to it */
    int exact = 0;                 /* whether cut is the n-th largest (ties then counted) */
    if (n > 0) {
        /* The n-th largest of the maxima of blocks of 8 bounds the n-th largest value from below (n blocks
         * hold a value at least that large): only the values at or above it are candidates. */
        int64_t blocks = len / 8, c = 0;
        float *cand = malloc((len + 1) * sizeof(float)), bound = 0.f;
        if (!cand) return -1;
        int64_t positive_blocks = 0, unused;
        for (int64_t b = 0; b < blocks; b++) {
            cand[b] = max8(pre + 8 * b);
            positive_blocks += cand[b] > 0.f;
        }
        if (positive_blocks >= n)
            bound = nth_largest_positive(cand, blocks, n, &unused);
        int64_t i;
        for (i = 0; i + 8 <= len; i += 8)
            if (any_at_least(pre + i, bound))
                for (int u = 0; u < 8; u++)
                    if (pre[i + u] > 0.f && pre[i + u] >= bound) cand[c++] = pre[i + u];
        for (; i < len; i++)
            if (pre[i] > 0.f && pre[i] >= bound) cand[c++] = pre[i];
        cut = 0.f;
        if (c >= n) {  /* else the bound was 0 and fewer than n values are positive: all of them are kept */
            cut = nth_largest_positive(cand, c, n, &ties);
            exact = 1;
        }
        free(cand);
    }
    int64_t *count = calloc(B, sizeof(int64_t)), *where = malloc((len + 1) * sizeof(int64_t));
    if (!count || !where) { free(count); free(where); return -1; }
    for (int64_t i = 0; i < len; i++) {  /* the kept positions, in row-major order */
        float v = pre[i];
        if (!(v > 0.f) || v < cut || (v == cut && !(exact && ties > 0))) continue;
        if (v == cut && exact) ties--;
        where[kept++] = i;
    }
    float lowest = NAN;
    for (int64_t e = 0; e < kept; e++) {
        int64_t b = where[e] / M;
        if (++count[b] > J) J = count[b];
        if (e == 0 || pre[where[e]] < lowest) lowest = pre[where[e]];
    }
    memset(count, 0, B * sizeof(int64_t));
    for (int64_t e = 0; e < kept; e++) {
        int64_t b = where[e] / M, j = count[b]++;
        idx[b * J + j] = where[e] - b * M;
        vals[b * J + j] = pre[where[e]];
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = count[b]; j < J; j++) { idx[b * J + j] = 0; vals[b * J + j] = 0.f; }
    *kept_min = lowest;
    free(count); free(where);
    return J;
}

/* One Adam step on a parameter of `rows` rows of `cols`, with PyTorch's formula and state (exp_avg,
 * exp_avg_sq, step already counted), the gradient multiplied by grad_scale (clipping); with unit_rows
 * each row is then renormalised to unit length (the decoder) while it is in cache. */
void adam_update(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, int64_t rows,
                 int64_t cols, double lr, double beta1, double beta2, double eps, double step, double grad_scale,
                 int64_t unit_rows, int64_t threads) {
    double bc1 = 1. - pow(beta1, step), bc2_sqrt = sqrt(1. - pow(beta2, step));
    float step_size = (float)(lr / bc1), inv_bc2 = (float)(1. / bc2_sqrt), fe = (float)eps;
    float b1 = (float)beta1, b2 = (float)beta2, scale = (float)grad_scale;
    #pragma omp parallel for num_threads((int)threads) schedule(static) if (rows * cols >= 1 << 15)
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * cols, *mr = m + r * cols, *vr = v + r * cols;
        const float *gr = g + r * cols;
        for (int64_t i = 0; i < cols; i++) {
            float gi = gr[i] * scale;
            mr[i] += (gi - mr[i]) * (1.f - b1);
            vr[i] = b2 * vr[i] + (1.f - b2) * gi * gi;
            pr[i] -= step_size * mr[i] / (sqrtf(vr[i]) * inv_bc2 + fe);
        }
        if (unit_rows) {
            float n = sqrtf(dot(pr, pr, cols));
            float inv = 1.f / (n > 1e-12f ? n : 1e-12f);
            for (int64_t i = 0; i < cols; i++) pr[i] *= inv;
        }
    }
}
