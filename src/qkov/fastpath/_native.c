/* qkov.fastpath._native: the per-example part of a one-layer attention-only step, in C.

   qkov/fastpath/attn_only.py builds small tables from the weights (torch ops on V + k rows):

     s2   [h, nk*V, V+P]  score table: s2[hh, j*V + t', t] is the scaled query-token part of the
                          score of key token t' at key position j, and s2[hh, j*V + t', V + p]
                          its query-position part (scored position p);
     ov   [nk*V, h*w]     row j*V + t': what key token t' at position j adds to the logits
                          through head hh (columns hh*w .. hh*w + w - 1), i.e. x W_V W_O W_U;
     skip [P*V, w]        row p*V + t: the direct path (x W_U + biases) of query token t at p.

   For each example b and scored position p (query token tq = tokens[b, pos[p]]), this file does
   what attn_only.py's torch kernels do with ~40 calls over the whole batch:

     score[hh, j] = s2[hh, key_j, tq] + s2[hh, key_j, V + p]      for causal keys j <= pos[p]
     pattern      = softmax_j(score)
     logits       = skip[p*V + tq] + sum_(hh, j) pattern[hh, j] * ov[key_j, hh]

   then the mean cross-entropy over the targets that are not IGNORE (-100) and its gradient
   back to the three tables (qkov_loss_and_grads), or the NLL and first argmax per query
   (qkov_nll_and_prediction). One pass per example keeps its rows in L1 instead of streaming
   batch-sized intermediates through memory, and there is no per-call dispatch.

   Every pointer is a raw address handed over by the Python wrapper (fastpath/native.py), which
   checks dtypes, shapes and contiguity; this file checks the indices it reads with. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define IGNORE_INDEX (-100)

/* A copy of each kernel per instruction set, chosen once at load time by the CPU's features
   (GCC's function multiversioning); elsewhere the compiler's baseline. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

typedef struct {
    const float *s2, *ov, *skip;
    const int64_t *tokens, *targets, *pos;
    int64_t tok_s0, tok_s1, tgt_s0, tgt_s1;   /* element strides of tokens [B, n] and targets [B, P] */
    int64_t B, nk, P, V, h, w;
} Problem;

/* exp(x) for x <= 0 (Cephes's expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2], about
   1 ulp), written without calls or branches so that loops over it vectorise. */
static inline float exp_nonpos(float x)
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

/* Row j*V + tokens[b, j] of the key tables, for every key position j < nk. 0 on a bad token. */
static inline int key_rows(const Problem *pr, int64_t b, int64_t *krow)
{
    const int64_t *tok = pr->tokens + b * pr->tok_s0;
    for (int64_t j = 0; j < pr->nk; j++) {
        int64_t t = tok[j * pr->tok_s1];
        if (t < 0 || t >= pr->V)
            return 0;
        krow[j] = j * pr->V + t;
    }
    return 1;
}

/* The attention pattern of query (b, p) over its nkeys causal keys (pat [h, nkeys]) and its
   logits [w]. */
static inline void attend(const Problem *pr, const int64_t *krow, int64_t nkeys, int64_t tq, int64_t p,
                          float *pat, float *logits)
{
    const int64_t h = pr->h, w = pr->w, V = pr->V, C = pr->V + pr->P, R = pr->nk * pr->V;
    for (int64_t hh = 0; hh < h; hh++) {
        const float *s = pr->s2 + hh * R * C;
        float *pa = pat + hh * nkeys, m = -INFINITY, z = 0.0f;
        for (int64_t j = 0; j < nkeys; j++) {
            const float *row = s + krow[j] * C;
            pa[j] = row[V + p] + row[tq];
            m = pa[j] > m ? pa[j] : m;
        }
        for (int64_t j = 0; j < nkeys; j++) {
            pa[j] = exp_nonpos(pa[j] - m);
            z += pa[j];
        }
        const float inv = 1.0f / z;
        for (int64_t j = 0; j < nkeys; j++)
            pa[j] *= inv;
    }
    memcpy(logits, pr->skip + (p * V + tq) * w, (size_t)w * sizeof(float));
    for (int64_t j = 0; j < nkeys; j++) {
        const float *row = pr->ov + krow[j] * h * w;
        for (int64_t hh = 0; hh < h; hh++) {
            const float a = pat[hh * nkeys + j];
            const float *r = row + hh * w;
#pragma omp simd
            for (int64_t c = 0; c < w; c++)
                logits[c] += a * r[c];
        }
    }
}

/* Reductions over a row keep LANES partial results (one vector register's worth, filled by
   loops the compiler vectorises without reassociating floats) and combine them in a fixed tree:
   GCC's `omp simd` reductions ended in 16 dependent scalar adds through the stack. */
#define LANES 16

static inline float tree_sum(float *acc)
{
    for (int s = LANES / 2; s > 0; s /= 2)
        for (int l = 0; l < s; l++)
            acc[l] += acc[l + s];
    return acc[0];
}

/* Returns a . b; adds alpha * b to y in the same pass. */
static inline float dot_axpy(const float *a, const float *b, float *y, float alpha, int64_t n)
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

/* ex[c] = exp(logits[c] - max) and the max; returns the sum of ex. */
static inline float softmax_terms(const float *logits, int64_t w, float *ex, float *top)
{
    float acc[LANES], m = logits[0];
    int64_t c = 0;
    for (int l = 0; l < LANES; l++)
        acc[l] = m;
    for (; c + LANES <= w; c += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] = logits[c + l] > acc[l] ? logits[c + l] : acc[l];
    for (; c < w; c++)
        acc[0] = logits[c] > acc[0] ? logits[c] : acc[0];
    for (int s = LANES / 2; s > 0; s /= 2)
        for (int l = 0; l < s; l++)
            acc[l] = acc[l + s] > acc[l] ? acc[l + s] : acc[l];
    m = acc[0];
    /* a plain loop for the exponentials: the loop vectoriser takes exp_nonpos's body whole,
       where a lanes loop around it was left scalar */
#pragma omp simd
    for (c = 0; c < w; c++)
        ex[c] = exp_nonpos(logits[c] - m);
    for (int l = 0; l < LANES; l++)
        acc[l] = 0.0f;
    for (c = 0; c + LANES <= w; c += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += ex[c + l];
    for (; c < w; c++)
        acc[0] += ex[c];
    *top = m;
    return tree_sum(acc);
}

/* The first c with x[c] == v (w if none): as torch's argmax breaks ties. A minimum over lanes,
   since loops that exit early are not vectorised. */
static inline int64_t first_index_of(const float *x, int64_t w, float v)
{
    int32_t acc[LANES];
    int64_t c = 0;
    const int32_t none = (int32_t)w;
    for (int l = 0; l < LANES; l++)
        acc[l] = none;
    for (; c + LANES <= w; c += LANES)
        for (int l = 0; l < LANES; l++) {
            const int32_t i = (int32_t)(c + l);
            acc[l] = x[c + l] == v && i < acc[l] ? i : acc[l];
        }
    for (; c < w; c++)
        acc[0] = x[c] == v && (int32_t)c < acc[0] ? (int32_t)c : acc[0];
    for (int s = LANES / 2; s > 0; s /= 2)
        for (int l = 0; l < s; l++)
            acc[l] = acc[l + s] < acc[l] ? acc[l + s] : acc[l];
    return acc[0];
}

/* Error codes for the wrapper. */
enum { OK = 0, BAD_TOKEN = 1, BAD_TARGET = 2 };

/* Mean cross-entropy and its gradients, added into the zeroed g_s2, g_ov, g_skip (shapes as
   s2, ov, skip). work: h*nk + h*nk + 2*w + nk floats' room. */
MULTIVERSION
static int loss_and_grads(const Problem *pr, float *g_s2, float *g_ov, float *g_skip, float *work,
                          int64_t *krow, double *loss)
{
    const int64_t h = pr->h, w = pr->w, V = pr->V, P = pr->P, nk = pr->nk, C = V + P, R = nk * V;
    int64_t n_valid = 0;
    for (int64_t b = 0; b < pr->B; b++)
        for (int64_t p = 0; p < P; p++) {
            int64_t t = pr->targets[b * pr->tgt_s0 + p * pr->tgt_s1];
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
    float *pat = work, *g_pat = pat + h * nk, *logits = g_pat + h * nk, *g = logits + w;
    double total = 0.0;
    for (int64_t b = 0; b < pr->B; b++) {
        if (!key_rows(pr, b, krow))
            return BAD_TOKEN;
        for (int64_t p = 0; p < P; p++) {
            const int64_t t = pr->targets[b * pr->tgt_s0 + p * pr->tgt_s1];
            if (t == IGNORE_INDEX)
                continue;
            const int64_t qp = pr->pos[p], nkeys = qp + 1;
            const int64_t tq = krow[qp] - qp * V;
            attend(pr, krow, nkeys, tq, p, pat, logits);
            float top, s = softmax_terms(logits, w, g, &top);
            total += (double)(logf(s) + top - logits[t]);
            /* d loss / d logits = (softmax - onehot) * wt */
            const float scale = wt / s;
            float *gs = g_skip + (p * V + tq) * w;
#pragma omp simd
            for (int64_t c = 0; c < w; c++) {
                g[c] *= scale;
            }
            g[t] -= wt;
#pragma omp simd
            for (int64_t c = 0; c < w; c++)
                gs[c] += g[c];
            /* back through the mixing: each value row's gradient and the pattern's */
            for (int64_t j = 0; j < nkeys; j++) {
                const float *row = pr->ov + krow[j] * h * w;
                float *g_row = g_ov + krow[j] * h * w;
                for (int64_t hh = 0; hh < h; hh++)
                    g_pat[hh * nkeys + j] = dot_axpy(row + hh * w, g, g_row + hh * w, pat[hh * nkeys + j], w);
            }
            /* softmax backward, then into both parts of each score */
            for (int64_t hh = 0; hh < h; hh++) {
                const float *pa = pat + hh * nkeys, *gp = g_pat + hh * nkeys;
                float *gs2 = g_s2 + hh * R * C, dot = 0.0f;
                for (int64_t j = 0; j < nkeys; j++)
                    dot += pa[j] * gp[j];
                for (int64_t j = 0; j < nkeys; j++) {
                    const float gsc = pa[j] * (gp[j] - dot);
                    float *row = gs2 + krow[j] * C;
                    row[tq] += gsc;
                    row[V + p] += gsc;
                }
            }
        }
    }
    *loss = total * (double)wt;
    return OK;
}

/* NLL of each target (class 0 where IGNORE) and the first argmax of the logits, [B, P] each. */
MULTIVERSION
static int nll_and_prediction(const Problem *pr, float *nll, int64_t *pred, float *work, int64_t *krow)
{
    const int64_t h = pr->h, w = pr->w, V = pr->V, P = pr->P, nk = pr->nk;
    float *pat = work, *logits = pat + h * nk, *ex = logits + w;
    for (int64_t b = 0; b < pr->B; b++) {
        if (!key_rows(pr, b, krow))
            return BAD_TOKEN;
        for (int64_t p = 0; p < P; p++) {
            int64_t t = pr->targets[b * pr->tgt_s0 + p * pr->tgt_s1];
            t = t == IGNORE_INDEX ? 0 : t;
            if (t < 0 || t >= w)
                return BAD_TARGET;
            const int64_t qp = pr->pos[p], tq = krow[qp] - qp * V;
            attend(pr, krow, qp + 1, tq, p, pat, logits);
            float top, s = softmax_terms(logits, w, ex, &top);
            const int64_t arg = first_index_of(logits, w, top);
            nll[b * P + p] = logf(s) + top - logits[t];
            pred[b * P + p] = arg;
        }
    }
    return OK;
}

/* ---------------------------------------------------------------- Python glue */

static int parse_problem(PyObject *args, Problem *pr, unsigned long long out[4])
{
    unsigned long long s2, ov, skip, tokens, targets, pos;
    if (!PyArg_ParseTuple(args, "KKKKLLKLLKLLLLLLKKKK", &s2, &ov, &skip, &tokens, &pr->tok_s0, &pr->tok_s1,
                          &targets, &pr->tgt_s0, &pr->tgt_s1, &pos, &pr->B, &pr->nk, &pr->P, &pr->V, &pr->h,
                          &pr->w, &out[0], &out[1], &out[2], &out[3]))
        return 0;
    pr->s2 = (const float *)(uintptr_t)s2;
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

static void *work_for(const Problem *pr, int64_t **krow)
{
    float *work = malloc(sizeof(float) * (size_t)(2 * pr->h * pr->nk + 2 * pr->w + 16));
    *krow = malloc(sizeof(int64_t) * (size_t)(pr->nk + 1));
    if (work == NULL || *krow == NULL) {
        free(work);
        free(*krow);
        PyErr_NoMemory();
        return NULL;
    }
    return work;
}

static PyObject *py_loss_and_grads(PyObject *self, PyObject *args)
{
    Problem pr;
    unsigned long long out[4];
    if (!parse_problem(args, &pr, out))
        return NULL;
    float *g_s2 = (float *)(uintptr_t)out[0], *g_ov = (float *)(uintptr_t)out[1];
    float *g_skip = (float *)(uintptr_t)out[2];
    int64_t *krow;
    float *work = work_for(&pr, &krow);
    if (work == NULL)
        return NULL;
    double loss = 0.0;
    int code;
    Py_BEGIN_ALLOW_THREADS
    memset(g_s2, 0, sizeof(float) * (size_t)(pr.h * pr.nk * pr.V * (pr.V + pr.P)));
    memset(g_ov, 0, sizeof(float) * (size_t)(pr.nk * pr.V * pr.h * pr.w));
    memset(g_skip, 0, sizeof(float) * (size_t)(pr.P * pr.V * pr.w));
    code = loss_and_grads(&pr, g_s2, g_ov, g_skip, work, krow, &loss);
    Py_END_ALLOW_THREADS
    free(work);
    free(krow);
    return code == OK ? PyFloat_FromDouble(loss) : raise_for(code, &pr);
}

static PyObject *py_nll_and_prediction(PyObject *self, PyObject *args)
{
    Problem pr;
    unsigned long long out[4];
    if (!parse_problem(args, &pr, out))
        return NULL;
    int64_t *krow;
    float *work = work_for(&pr, &krow);
    if (work == NULL)
        return NULL;
    int code;
    Py_BEGIN_ALLOW_THREADS
    code = nll_and_prediction(&pr, (float *)(uintptr_t)out[0], (int64_t *)(uintptr_t)out[1], work, krow);
    Py_END_ALLOW_THREADS
    free(work);
    free(krow);
    if (code != OK)
        return raise_for(code, &pr);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"loss_and_grads", py_loss_and_grads, METH_VARARGS,
     "loss_and_grads(s2, ov, skip, tokens, tok_s0, tok_s1, targets, tgt_s0, tgt_s1, pos, B, nk, P, V, h, w,"
     " g_s2, g_ov, g_skip, 0) -> float: mean cross-entropy; gradients written into the g_ buffers."},
    {"nll_and_prediction", py_nll_and_prediction, METH_VARARGS,
     "nll_and_prediction(s2, ov, skip, tokens, tok_s0, tok_s1, targets, tgt_s0, tgt_s1, pos, B, nk, P, V, h, w,"
     " nll, pred, 0, 0) -> None: NLL [B, P] (float32) and first argmax [B, P] (int64)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "C kernels of qkov's attention-only fast path (see fastpath/native.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
