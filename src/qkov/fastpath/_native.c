/* qkov.fastpath._native: the per-example part of a one-layer attention-only step, in C.

   qkov/fastpath/factored.py builds small tables from the weights (torch ops on V + k rows):

     scores [h, nk*V, V+P]  score table: scores[hh, j*V + t', t] is the scaled query-token part of
                            the score of key token t' at key position j, and scores[hh, j*V + t', V + p]
                            its query-position part (scored position p);
     ov     [nk*V, h*w]     row j*V + t': what key token t' at position j adds to the logits
                            through head hh (columns hh*w .. hh*w + w - 1), i.e. x W_V W_O W_U;
     skip   [P*V, w]        row p*V + t: the direct path (x W_U + biases) of query token t at p.

   For each example b and scored position p (query token tq = tokens[b, pos[p]]), this file does
   what the table path (tables.py) does with ~40 torch calls over the whole batch:

     score[hh, j] = scores[hh, key_j, tq] + scores[hh, key_j, V + p]      for causal keys j <= pos[p]
     pattern      = softmax_j(score)
     logits       = skip[p*V + tq] + sum_(hh, j) pattern[hh, j] * ov[key_j, hh]

   then the mean cross-entropy over the targets that are not IGNORE (-100) and its gradient
   back to the three tables (loss_and_grads), or the NLL and first argmax per query
   (nll_and_prediction). Examples are taken in blocks of 32 (BLOCK), whose rows stay in L1
   instead of batch-sized intermediates streaming through memory, with no per-call dispatch.

   Every pointer is a raw address handed over by the Python wrapper (fastpath/native.py), which
   checks device, dtypes, shapes, contiguity and every index range before taking an address;
   this file checks the indices again as it reads them. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define IGNORE_INDEX (-100)

/* Subnormal floats flushed to zero while a kernel runs (the CPU's FTZ and DAZ modes, restored
   after): once the model is confident most softmax terms are far below 1e-38, and each
   arithmetic step on a subnormal costs ~100 cycles: the trained max model's step took 1.5x as
   long. Values below 1.2e-38 become 0, far inside the tests' tolerances. */
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define FLUSH_SUBNORMALS(saved) const unsigned int saved = _mm_getcsr(); _mm_setcsr(saved | 0x8040)
#define RESTORE_FP_MODE(saved) _mm_setcsr(saved)
#else
#define FLUSH_SUBNORMALS(saved) (void)0
#define RESTORE_FP_MODE(saved) (void)0
#endif

/* A copy of each kernel per instruction set, chosen once at load time by the CPU's features
   (GCC's function multiversioning); elsewhere the compiler's baseline. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* Helpers are inlined into each of those copies (a helper left out of line is compiled for the
   baseline instruction set only). */
#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

typedef struct {
    const float *scores, *ov, *skip;
    const int64_t *tokens, *targets, *pos;
    int64_t tok_s0, tok_s1, tgt_s0, tgt_s1;   /* element strides of tokens [B, n] and targets [B, P] */
    int64_t B, nk, P, V, h, w;
} Problem;

/* exp(x) for x <= 0 (Cephes's expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2], about
   1 ulp), written without calls or branches so that loops over it vectorise. */
INLINE float exp_nonpos(float x)
{
    x = x < -87.0f ? -87.0f : x;
    float n = x * 1.44269504088896341f;
    n = (n + 12582912.0f) - 12582912.0f;          /* round to nearest: 1.5 * 2^23 */
    x = x - n * 0.693359375f - n * -2.12194440e-4f;
    float z = x * x;
    float y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x
                + 4.1665795894e-2f) * x + 1.6666665459e-1f) * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;       /* 2^n, n in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* Reductions over a row keep LANES partial results (one vector register's worth, filled by
   loops the compiler vectorises without reassociating floats) and combine them in a fixed tree:
   GCC's `omp simd` reductions ended in 16 dependent scalar adds through the stack. */
#define LANES 16

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

/* The lanes' sum as a fixed tree (lane l + half into lane l, halving), the halves added as
   vectors: written as a loop over the lanes it stayed scalar, through the stack. */
INLINE float tree_sum(float *acc)
{
    v8f lo, hi;
    v4f a, b;
    memcpy(&lo, acc, sizeof lo);
    memcpy(&hi, acc + 8, sizeof hi);
    lo += hi;
    memcpy(&a, &lo, sizeof a);
    memcpy(&b, (float *)&lo + 4, sizeof b);
    a += b;
    return (a[0] + a[2]) + (a[1] + a[3]);
}

typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v4i __attribute__((vector_size(16)));

/* The max of the 16 lanes, halves compared as vectors. */
INLINE float tree_max(float *acc)
{
    v8f lo, hi;
    v4f a, b;
    memcpy(&lo, acc, sizeof lo);
    memcpy(&hi, acc + 8, sizeof hi);
    v8i up = hi > lo, r8 = ((v8i)hi & up) | ((v8i)lo & ~up);
    memcpy(&a, &r8, sizeof a);
    memcpy(&b, (int32_t *)&r8 + 4, sizeof b);
    v4i up4 = b > a, r4 = ((v4i)b & up4) | ((v4i)a & ~up4);
    float x[4];
    memcpy(x, &r4, sizeof x);
    const float m0 = x[2] > x[0] ? x[2] : x[0], m1 = x[3] > x[1] ? x[3] : x[1];
    return m1 > m0 ? m1 : m0;
}

INLINE float row_sum(const float *x, int64_t n)
{
    float acc[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= n; c += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += x[c + l];
    for (; c < n; c++)
        acc[0] += x[c];
    return tree_sum(acc);
}

INLINE float row_max(const float *x, int64_t n)
{
    float acc[LANES];
    int64_t c = 0;
    for (int l = 0; l < LANES; l++)
        acc[l] = x[0];
    for (; c + LANES <= n; c += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] = x[c + l] > acc[l] ? x[c + l] : acc[l];
    for (; c < n; c++)
        acc[0] = x[c] > acc[0] ? x[c] : acc[0];
    return tree_max(acc);
}

/* The first c with x[c] == v (n if none), as torch's argmax breaks ties: an integer minimum
   over the whole row, which vectorises (a loop that exits at the first hit does not). */
INLINE int64_t first_index_of(const float *x, int64_t n, float v)
{
    int32_t first = (int32_t)n;
    for (int32_t c = 0; c < (int32_t)n; c++) {
        const int32_t cand = x[c] == v ? c : (int32_t)n;
        first = cand < first ? cand : first;
    }
    return first;
}

/* Returns a . b; adds alpha * b to y in the same pass. */
INLINE float dot_axpy(const float *a, const float *b, float *y, float alpha, int64_t n)
{
    float acc[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= n; c += LANES)
        for (int l = 0; l < LANES; l++) {
            acc[l] += a[c + l] * b[c + l];
            y[c + l] += alpha * b[c + l];
        }
    for (; c < n; c++) {
        acc[0] += a[c] * b[c];
        y[c] += alpha * b[c];
    }
    return tree_sum(acc);
}

/* Examples are taken BLOCK at a time, one scored position after another: the exponentials of
   a block (its patterns, then its logits) run as one long loop, where per query they were
   loops of 2 to 6 keys that vectorised badly; a block's logits (BLOCK * w floats) stay in L1. */
#define BLOCK 32

typedef struct {
    int64_t *krow;        /* [BLOCK, nk]: row j*V + tokens[b, j] of the key tables */
    float *pat, *g_pat;   /* [BLOCK, h, nk] */
    float *ex;            /* [BLOCK, w]: logits, then exp(logits - top), then their gradient */
    float *top, *sum;     /* [BLOCK]: each row's max logit and sum of ex */
} Work;

/* The key rows of examples b0 .. b0+nb-1; 0 on a token outside 0..V-1. */
INLINE int block_rows(const Problem *pr, int64_t b0, int64_t nb, int64_t *krow)
{
    for (int64_t i = 0; i < nb; i++) {
        const int64_t *tok = pr->tokens + (b0 + i) * pr->tok_s0;
        for (int64_t j = 0; j < pr->nk; j++) {
            const int64_t t = tok[j * pr->tok_s1];
            if (t < 0 || t >= pr->V)
                return 0;
            krow[i * pr->nk + j] = j * pr->V + t;
        }
    }
    return 1;
}

/* Query token of example i (of the block) at scored position p. */
INLINE int64_t query_token(const Problem *pr, const int64_t *krow, int64_t i, int64_t p)
{
    const int64_t qp = pr->pos[p];
    return krow[i * pr->nk + qp] - qp * pr->V;
}

/* Forward of nb examples at scored position p: patterns pat [nb, h, nkeys], and in ex the
   terms exp(logits - top) of each row, with top and their sum. */
INLINE void block_forward(const Problem *pr, const int64_t *krow, int64_t nb, int64_t p, Work *wk)
{
    const int64_t h = pr->h, w = pr->w, V = pr->V, nk = pr->nk, C = V + pr->P, R = nk * V;
    const int64_t nkeys = pr->pos[p] + 1, n_pat = nb * h * nkeys;
    float *pat = wk->pat, *ex = wk->ex;
    /* scores, each row shifted by its max */
    for (int64_t i = 0; i < nb; i++) {
        const int64_t tq = query_token(pr, krow, i, p);
        for (int64_t hh = 0; hh < h; hh++) {
            const float *s = pr->scores + hh * R * C;
            float *pa = pat + (i * h + hh) * nkeys, m = -INFINITY;
            for (int64_t j = 0; j < nkeys; j++) {
                const float *row = s + krow[i * nk + j] * C;
                pa[j] = row[V + p] + row[tq];
                m = pa[j] > m ? pa[j] : m;
            }
            for (int64_t j = 0; j < nkeys; j++)
                pa[j] -= m;
        }
    }
#pragma omp simd
    for (int64_t k = 0; k < n_pat; k++)
        pat[k] = exp_nonpos(pat[k]);
    for (int64_t r = 0; r < nb * h; r++) {
        float *pa = pat + r * nkeys, z = 0.0f;
        for (int64_t j = 0; j < nkeys; j++)
            z += pa[j];
        const float inv = 1.0f / z;
        for (int64_t j = 0; j < nkeys; j++)
            pa[j] *= inv;
    }
    /* logits, each row shifted by its max */
    for (int64_t i = 0; i < nb; i++) {
        float *lg = ex + i * w;
        memcpy(lg, pr->skip + (p * V + query_token(pr, krow, i, p)) * w, (size_t)w * sizeof(float));
        for (int64_t j = 0; j < nkeys; j++) {
            const float *row = pr->ov + krow[i * nk + j] * h * w;
            for (int64_t hh = 0; hh < h; hh++) {
                const float a = pat[(i * h + hh) * nkeys + j], *r = row + hh * w;
#pragma omp simd
                for (int64_t c = 0; c < w; c++)
                    lg[c] += a * r[c];
            }
        }
        wk->top[i] = row_max(lg, w);
    }
}

/* exp of the shifted logits of nb rows (in place) and each row's sum; the shifted logit of a
   target is read before. */
INLINE void block_exp(int64_t nb, int64_t w, Work *wk)
{
    float *ex = wk->ex;
    for (int64_t i = 0; i < nb; i++) {
        const float m = wk->top[i];
        float *row = ex + i * w;
#pragma omp simd
        for (int64_t c = 0; c < w; c++)
            row[c] -= m;
    }
#pragma omp simd
    for (int64_t k = 0; k < nb * w; k++)
        ex[k] = exp_nonpos(ex[k]);
    for (int64_t i = 0; i < nb; i++)
        wk->sum[i] = row_sum(ex + i * w, w);
}

/* Error codes for the wrapper. */
enum { OK = 0, BAD_TOKEN = 1, BAD_TARGET = 2 };

INLINE int64_t target_at(const Problem *pr, int64_t b, int64_t p)
{
    return pr->targets[b * pr->tgt_s0 + p * pr->tgt_s1];
}

/* Mean cross-entropy and its gradients, added into the zeroed g_scores, g_ov, g_skip (shapes as
   scores, ov, skip). */
MULTIVERSION
static int loss_and_grads(const Problem *pr, float *g_scores, float *g_ov, float *g_skip, Work *wk, double *loss)
{
    const int64_t h = pr->h, w = pr->w, V = pr->V, P = pr->P, nk = pr->nk, C = V + P, R = nk * V;
    int64_t n_valid = 0;
    for (int64_t b = 0; b < pr->B; b++)
        for (int64_t p = 0; p < P; p++) {
            const int64_t t = target_at(pr, b, p);
            if (t == IGNORE_INDEX)
                continue;
            if (t < 0 || t >= w)
                return BAD_TARGET;
            n_valid++;
        }
    if (n_valid == 0) {                          /* as F.cross_entropy: 0 / 0 */
        *loss = NAN;
        return OK;
    }
    const float wt = 1.0f / (float)n_valid;      /* each query's share of the mean */
    double total = 0.0;
    for (int64_t b0 = 0; b0 < pr->B; b0 += BLOCK) {
        const int64_t nb = pr->B - b0 < BLOCK ? pr->B - b0 : BLOCK;
        if (!block_rows(pr, b0, nb, wk->krow))
            return BAD_TOKEN;
        for (int64_t p = 0; p < P; p++) {
            const int64_t nkeys = pr->pos[p] + 1;
            block_forward(pr, wk->krow, nb, p, wk);
            for (int64_t i = 0; i < nb; i++) {    /* NLL = log sum - (logit[t] - top) */
                const int64_t t = target_at(pr, b0 + i, p);
                if (t != IGNORE_INDEX)
                    total += (double)(-(wk->ex[i * w + t] - wk->top[i]));
            }
            block_exp(nb, w, wk);
            for (int64_t i = 0; i < nb; i++) {
                const int64_t t = target_at(pr, b0 + i, p);
                if (t == IGNORE_INDEX)
                    continue;
                total += (double)logf(wk->sum[i]);
                const int64_t *kr = wk->krow + i * nk, tq = query_token(pr, wk->krow, i, p);
                const float *pat = wk->pat + i * h * nkeys;
                float *g_pat = wk->g_pat, *g = wk->ex + i * w, *gs = g_skip + (p * V + tq) * w;
                /* d loss / d logits = (softmax - onehot) * wt, into the skip row's gradient */
                const float scale = wt / wk->sum[i];
#pragma omp simd
                for (int64_t c = 0; c < w; c++)
                    g[c] *= scale;
                g[t] -= wt;
#pragma omp simd
                for (int64_t c = 0; c < w; c++)
                    gs[c] += g[c];
                /* back through the mixing: each value row's gradient and the pattern's */
                for (int64_t j = 0; j < nkeys; j++) {
                    const float *row = pr->ov + kr[j] * h * w;
                    float *g_row = g_ov + kr[j] * h * w;
                    for (int64_t hh = 0; hh < h; hh++)
                        g_pat[hh * nkeys + j] = dot_axpy(row + hh * w, g, g_row + hh * w, pat[hh * nkeys + j], w);
                }
                /* softmax backward, then into both parts of each score */
                for (int64_t hh = 0; hh < h; hh++) {
                    const float *pa = pat + hh * nkeys, *gp = g_pat + hh * nkeys;
                    float *g_head = g_scores + hh * R * C, dot = 0.0f;
                    for (int64_t j = 0; j < nkeys; j++)
                        dot += pa[j] * gp[j];
                    for (int64_t j = 0; j < nkeys; j++) {
                        const float gsc = pa[j] * (gp[j] - dot);
                        float *row = g_head + kr[j] * C;
                        row[tq] += gsc;
                        row[V + p] += gsc;
                    }
                }
            }
        }
    }
    *loss = total * (double)wt;
    return OK;
}

/* NLL of each target (class 0 where IGNORE) and the first argmax of the logits, [B, P] each. */
MULTIVERSION
static int nll_and_prediction(const Problem *pr, float *nll, int64_t *pred, Work *wk)
{
    const int64_t w = pr->w, P = pr->P;
    for (int64_t b0 = 0; b0 < pr->B; b0 += BLOCK) {
        const int64_t nb = pr->B - b0 < BLOCK ? pr->B - b0 : BLOCK;
        if (!block_rows(pr, b0, nb, wk->krow))
            return BAD_TOKEN;
        for (int64_t p = 0; p < P; p++) {
            block_forward(pr, wk->krow, nb, p, wk);
            for (int64_t i = 0; i < nb; i++) {
                int64_t t = target_at(pr, b0 + i, p);
                t = t == IGNORE_INDEX ? 0 : t;
                if (t < 0 || t >= w)
                    return BAD_TARGET;
                nll[(b0 + i) * P + p] = -(wk->ex[i * w + t] - wk->top[i]);
                pred[(b0 + i) * P + p] = first_index_of(wk->ex + i * w, w, wk->top[i]);
            }
            block_exp(nb, w, wk);
            for (int64_t i = 0; i < nb; i++)
                nll[(b0 + i) * P + p] += logf(wk->sum[i]);
        }
    }
    return OK;
}

/* ---------------------------------------------------------------- Python glue */

static int parse_problem(PyObject *args, Problem *pr, unsigned long long out[4])
{
    unsigned long long scores, ov, skip, tokens, targets, pos;
    if (!PyArg_ParseTuple(args, "KKKKLLKLLKLLLLLLKKKK", &scores, &ov, &skip, &tokens, &pr->tok_s0, &pr->tok_s1,
                          &targets, &pr->tgt_s0, &pr->tgt_s1, &pos, &pr->B, &pr->nk, &pr->P, &pr->V, &pr->h,
                          &pr->w, &out[0], &out[1], &out[2], &out[3]))
        return 0;
    pr->scores = (const float *)(uintptr_t)scores;
    pr->ov = (const float *)(uintptr_t)ov;
    pr->skip = (const float *)(uintptr_t)skip;
    pr->tokens = (const int64_t *)(uintptr_t)tokens;
    pr->targets = (const int64_t *)(uintptr_t)targets;
    pr->pos = (const int64_t *)(uintptr_t)pos;
    for (int64_t p = 0; p < pr->P; p++)
        if (pr->pos[p] < 0 || pr->pos[p] >= pr->nk) {
            PyErr_Format(PyExc_ValueError, "scored position %lld is outside the %lld key positions",
                         (long long)pr->pos[p], (long long)pr->nk);
            return 0;
        }
    return 1;
}

static PyObject *raise_for(int code, const Problem *pr)
{
    if (code == BAD_TOKEN)
        PyErr_Format(PyExc_ValueError, "a token is outside 0..%lld", (long long)pr->V - 1);
    else
        PyErr_Format(PyExc_IndexError, "a target is outside 0..%lld (or %d: ignored)", (long long)pr->w - 1,
                     IGNORE_INDEX);
    return NULL;
}

/* A Work for pr in one allocation (freed by free(wk->krow)); 0 and MemoryError if none. */
static int work_for(const Problem *pr, Work *wk)
{
    const size_t n_pat = (size_t)(BLOCK * pr->h * pr->nk), n_ex = (size_t)(BLOCK * pr->w);
    char *mem = malloc(sizeof(int64_t) * (size_t)(BLOCK * pr->nk) + sizeof(float) * (2 * n_pat + n_ex + 2 * BLOCK));
    if (mem == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    wk->krow = (int64_t *)mem;
    wk->pat = (float *)(wk->krow + BLOCK * pr->nk);
    wk->g_pat = wk->pat + n_pat;
    wk->ex = wk->g_pat + n_pat;
    wk->top = wk->ex + n_ex;
    wk->sum = wk->top + BLOCK;
    return 1;
}

static PyObject *py_loss_and_grads(PyObject *self, PyObject *args)
{
    Problem pr;
    Work wk;
    unsigned long long out[4];
    if (!parse_problem(args, &pr, out) || !work_for(&pr, &wk))
        return NULL;
    float *g_scores = (float *)(uintptr_t)out[0], *g_ov = (float *)(uintptr_t)out[1];
    float *g_skip = (float *)(uintptr_t)out[2];
    double loss = 0.0;
    int code;
    Py_BEGIN_ALLOW_THREADS
    FLUSH_SUBNORMALS(csr);
    memset(g_scores, 0, sizeof(float) * (size_t)(pr.h * pr.nk * pr.V * (pr.V + pr.P)));
    memset(g_ov, 0, sizeof(float) * (size_t)(pr.nk * pr.V * pr.h * pr.w));
    memset(g_skip, 0, sizeof(float) * (size_t)(pr.P * pr.V * pr.w));
    code = loss_and_grads(&pr, g_scores, g_ov, g_skip, &wk, &loss);
    RESTORE_FP_MODE(csr);
    Py_END_ALLOW_THREADS
    free(wk.krow);
    return code == OK ? PyFloat_FromDouble(loss) : raise_for(code, &pr);
}

static PyObject *py_nll_and_prediction(PyObject *self, PyObject *args)
{
    Problem pr;
    Work wk;
    unsigned long long out[4];
    if (!parse_problem(args, &pr, out) || !work_for(&pr, &wk))
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    FLUSH_SUBNORMALS(csr);
    code = nll_and_prediction(&pr, (float *)(uintptr_t)out[0], (int64_t *)(uintptr_t)out[1], &wk);
    RESTORE_FP_MODE(csr);
    Py_END_ALLOW_THREADS
    free(wk.krow);
    if (code != OK)
        return raise_for(code, &pr);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"loss_and_grads", py_loss_and_grads, METH_VARARGS,
     "loss_and_grads(scores, ov, skip, tokens, tok_s0, tok_s1, targets, tgt_s0, tgt_s1, pos, B, nk, P, V, h, w,"
     " g_scores, g_ov, g_skip, 0) -> float: mean cross-entropy; gradients written into the g_ buffers."},
    {"nll_and_prediction", py_nll_and_prediction, METH_VARARGS,
     "nll_and_prediction(scores, ov, skip, tokens, tok_s0, tok_s1, targets, tgt_s0, tgt_s1, pos, B, nk, P, V, h, w,"
     " nll, pred, 0, 0) -> None: NLL [B, P] (float32) and first argmax [B, P] (int64)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "C kernels of qkov's attention-only fast path (see fastpath/native.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
