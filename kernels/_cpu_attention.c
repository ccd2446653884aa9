/* Attention over packed rows on the CPU (kernels/attention.py's spec, kernels/cpu_attention.py
 * calls it): scores of the queries against each packed key row (dequantized in scratch, RoPE
 * redone at its position), a softmax's pieces, p . V over the packed value rows, and exact rows
 * (the sinks, the recent window) in the same pass.
 *
 * The function takes raw addresses (tensor.data_ptr()) and releases the GIL while it runs.
 * Built with gcc function multi-versioning like _cpu_codec.c; rows as _cpu_rows.h says.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_cpu_rows.h"

/* ---- attention over packed rows ------------------------------------------------------------ */

/* Both loops walk tokens t0..t1 of every head (`heads` of them: batch x kv heads), token by
 * token so that a token's RoPE angles are read once for all heads; a head's rows are `hs` rows
 * apart in the code and parameter buffers (their capacity may exceed the T tokens in use). Each
 * row is dequantized into a scratch row, never stored. */
typedef struct {
    const uint8_t *codes;
    const f16 *scales, *mins;
    int64_t heads, hs, T, D, G, bits; /* G: the group size */
} Packed;

/* out[j * stride] = q[j] . y (j < nq, each of n values, n a multiple of 16) in 16 lanes per
 * query row: short chains of dependent additions, and it vectorizes without -ffast-math */
INLINE void dots(const float *restrict q, int64_t nq, const float *restrict y, int64_t n,
                 float *restrict out, int64_t stride) {
    for (int64_t j = 0; j < nq; j++) {
        const float *a = q + j * n;
        float acc[16];
        for (int l = 0; l < 16; l++) acc[l] = a[l] * y[l];
        for (int64_t i = 16; i < n; i += 16)
            for (int l = 0; l < 16; l++) acc[l] += a[i + l] * y[i + l];
        for (int l = 0; l < 8; l++) acc[l] += acc[l + 8];
        for (int l = 0; l < 4; l++) acc[l] += acc[l + 4];
        out[j * stride] = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    }
}

/* Sixteen tokens at once, one per vector lane: the packed rows of a tile are turned into byte
 * columns (byte b of each of the 16 rows), a channel's codes are a shift and a mask of one
 * column, and scores accumulate lane-wise, with no sum across lanes. RoPE is redone per channel
 * pair (a, b = a + D/2) on 16 positions at once, their angles read from transposed tables
 * cosT/sinT [D/2][span]. */
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint8_t vu8x16 __attribute__((vector_size(16)));
#define TILE 16
#define TILE_RQ 16 /* query rows per kv head the tile path keeps in registers */

INLINE vf16 tile_channel(const vi16 *col, const int64_t D, const int bits, int64_t i) {
    const int w0 = bits == 3 ? 2 : bits;
    const int64_t P0 = D * w0 / 8; /* bytes of the low plane */
    vi16 c = (col[i % P0] >> (int)((i / P0) * w0)) & ((1 << w0) - 1);
    if (bits == 3) { /* the high bit from the 1-bit plane after it */
        const int64_t P1 = D / 8;
        c |= ((col[P0 + i % P1] >> (int)(i / P1)) & 1) << 2;
    }
    return __builtin_convertvector(c, vf16);
}

INLINE void scores_tile(const uint8_t *rows, const int64_t D, const int bits, const float *s,
                        const float *m, const float *q, int64_t RQ, const float *cosT,
                        const float *sinT, int64_t span, int64_t t, float *out, int64_t stride) {
    const int64_t row_bytes = D * bits / 8;
    uint8_t bytes[128][TILE];
    vi16 col[128]; /* byte b of the 16 rows, widened once */
    for (int64_t l = 0; l < TILE; l++)
        for (int64_t b = 0; b < row_bytes; b++) bytes[b][l] = rows[l * row_bytes + b];
    for (int64_t b = 0; b < row_bytes; b++) {
        vu8x16 x;
        memcpy(&x, bytes[b], TILE);
        col[b] = __builtin_convertvector(x, vi16);
    }
    vf16 acc[TILE_RQ];
    for (int64_t j = 0; j < RQ; j++) acc[j] = (vf16){0};
    if (cosT) {
        const int64_t half = D / 2;
        for (int64_t a = 0; a < half; a++) {
            const vf16 ka = tile_channel(col, D, bits, a) * s[a] + m[a];
            const vf16 kb = tile_channel(col, D, bits, a + half) * s[a + half] + m[a + half];
            vf16 c, sn;
            memcpy(&c, cosT + a * span + t, sizeof c);
            memcpy(&sn, sinT + a * span + t, sizeof sn);
            const vf16 ra = ka * c - kb * sn, rb = kb * c + ka * sn; /* the keys, rotated */
            for (int64_t j = 0; j < RQ; j++) acc[j] += ra * q[j * D + a] + rb * q[j * D + a + half];
        }
    } else {
        for (int64_t i = 0; i < D; i++) {
            const vf16 k = tile_channel(col, D, bits, i) * s[i] + m[i];
            for (int64_t j = 0; j < RQ; j++) acc[j] += k * q[j * D + i];
        }
    }
    for (int64_t j = 0; j < RQ; j++) memcpy(out + j * stride, &acc[j], sizeof acc[j]);
}

/* out[(h * RQ + j) * stride + t - t0] = q[h * RQ + j] . key(h, t) for the RQ query rows of kv head h:
 * keys per channel (groups of G tokens), RoPE redone at each row's position (pos: int32 per
 * row, laid out like the codes; NULL: the token index) */
INLINE void scores_impl(const Packed *k, const int64_t D, const int bits, const float *q,
                        int64_t RQ, int64_t t0, int64_t t1, const float *cos, const float *sin,
                        int64_t rotary, const int32_t *pos, const float *cosT, const float *sinT,
                        int64_t span, float *out, int64_t stride) {
    const int64_t G = k->G, row_bytes = D * bits / 8, heads = k->heads;
    /* the tile path: positions are the token indices, RoPE (if any) on all of head_dim */
    const int tiles = !pos && RQ <= TILE_RQ && row_bytes <= 128 && D % 16 == 0 &&
                      (!cos || (cosT && rotary == D));
    float *buf = malloc(sizeof(float) * (size_t)(2 * heads * D + D));
    float *s = buf, *m = s + heads * D, *y = m + heads * D; /* each head's group parameters */
    for (int64_t t = t0, next = t0; t < t1;) {
        if (t >= next) { /* a new group of G tokens (or the first token) */
            for (int64_t h = 0; h < heads; h++) {
                const int64_t g = (h * k->hs + t) / G;
                widen_params(k->scales + g * D, k->mins + g * D, D, 1, s + h * D, m + h * D);
            }
            next = (t / G + 1) * G;
        }
        if (tiles && t + TILE <= t1 && t + TILE <= next) {
            for (int64_t h = 0; h < heads; h++)
                scores_tile(k->codes + (h * k->hs + t) * row_bytes, D, bits, s + h * D,
                            m + h * D, q + h * RQ * D, RQ, cos ? cosT : NULL, sinT, span, t,
                            out + h * RQ * stride + (t - t0), stride);
            t += TILE;
            continue;
        }
        for (int64_t h = 0; h < heads; h++) {
            const int64_t row = h * k->hs + t;
            decode_row(k->codes + row * row_bytes, D, bits, s + h * D, m + h * D, 0, y);
            if (cos) {
                const int64_t p = pos ? pos[row] : t;
                rope_row(y, cos + p * rotary, sin + p * rotary, rotary, 1.0f);
            }
            dots(q + h * RQ * D, RQ, y, D, out + h * RQ * stride + (t - t0), stride);
        }
        t++;
    }
    free(buf);
}

/* acc[(h * RQ + j) * D + :] += p[(h * RQ + j) * stride + t - t0] * value(h, t), tokens t0..t1:
 * values per token (groups of G channels) */
INLINE void values_impl(const Packed *v, const int64_t D, const int bits, const float *p,
                        int64_t stride, int64_t RQ, int64_t t0, int64_t t1, float *acc) {
    /* a head's rows in tiles of 16: dequantized once into C, then each query row's accumulator
     * (D floats, in registers) takes the tile's rows in turn */
    const int64_t G = v->G, row_bytes = D * bits / 8;
    const int whole = G == D;
    float *buf = malloc(sizeof(float) * (size_t)(TILE * D + 2 * D + TILE * RQ));
    float *C = buf, *s = C + TILE * D, *m = s + D, *w = m + D;
    for (int64_t h = 0; h < v->heads; h++) {
        const float *ph = p + h * RQ * stride;
        float *a = acc + h * RQ * D;
        for (int64_t t = t0; t < t1; t += TILE) {
            const int64_t n = t1 - t < TILE ? t1 - t : TILE;
            for (int64_t l = 0; l < n; l++) {
                const int64_t row = h * v->hs + t + l;
                const uint8_t *codes = v->codes + row * row_bytes;
                if (whole) {
                    const float sc = (float)v->scales[row], mn = (float)v->mins[row];
                    decode_row(codes, D, bits, &sc, &mn, 1, C + l * D);
                } else {
                    widen_params(v->scales + row * (D / G), v->mins + row * (D / G), D / G, G, s,
                                 m);
                    decode_row(codes, D, bits, s, m, 0, C + l * D);
                }
                for (int64_t j = 0; j < RQ; j++) w[j * TILE + l] = ph[j * stride + (t + l - t0)];
            }
            for (int64_t j = 0; j < RQ; j++) {
                float aj[256];
                for (int64_t i = 0; i < D; i++) aj[i] = a[j * D + i];
                for (int64_t l = 0; l < n; l++) {
                    const float wl = w[j * TILE + l];
                    for (int64_t i = 0; i < D; i++) aj[i] += wl * C[l * D + i];
                }
                for (int64_t i = 0; i < D; i++) a[j * D + i] = aj[i];
            }
        }
    }
    free(buf);
}

/* the common head dims and every bit width as compile-time constants, so rows vectorize */
#define BY_SHAPE(impl, x, ...)                                                                  \
    switch ((x)->D * 16 + (x)->bits) {                                                          \
    case 64 * 16 + 2: impl(x, 64, 2, __VA_ARGS__); break;                                       \
    case 64 * 16 + 3: impl(x, 64, 3, __VA_ARGS__); break;                                       \
    case 64 * 16 + 4: impl(x, 64, 4, __VA_ARGS__); break;                                       \
    case 64 * 16 + 8: impl(x, 64, 8, __VA_ARGS__); break;                                       \
    case 128 * 16 + 2: impl(x, 128, 2, __VA_ARGS__); break;                                     \
    case 128 * 16 + 3: impl(x, 128, 3, __VA_ARGS__); break;                                     \
    case 128 * 16 + 4: impl(x, 128, 4, __VA_ARGS__); break;                                     \
    case 128 * 16 + 8: impl(x, 128, 8, __VA_ARGS__); break;                                     \
    default: impl(x, (x)->D, (int)(x)->bits, __VA_ARGS__);                                      \
    }

/* exp(x) for x <= 0, 0 below -87: Cody-Waite reduction to r in [-ln2/2, ln2/2] and Cephes'
 * degree-6 polynomial for e^r (within 2 ulp); plain arithmetic, so the loops vectorize */
INLINE float exp_nonpositive(float x) {
    const int tiny = x < -87.0f;
    x = tiny ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t e = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return tiny ? 0.0f : p * scale;
}

/* Attention of RQ query rows per kv head over packed tokens t0..t1 (rows before `skip` left
 * out): the scores, their maximum m and the sum l of exp(score - m) per query row, and
 * acc = sum_t exp(score_t - m) * value_t (unnormalized; Hadamard-rotated back when asked).
 * A caller merges ranges (and exact rows) by log-sum-exp: lse = m + log(l), o = acc / l. */
/* Exact rows beside the packed ones (the sinks, the recent window): keys and values of one
 * dtype, rows of D, a head's n rows `hs` elements apart; the last `causal` rows are the query
 * tokens' own, and query q (of Q) sees those up to its own. */
typedef struct {
    const char *k, *v;
    int dtype;
    int64_t n, hs, causal;
} Exact;

/* softmax pieces of scores sc[0..m) in place: sc <- exp(sc - max), returns the sum; the max in
 * *hi. Entries at -INFINITY (masked) come out 0. */
INLINE float softmax_pieces(float *restrict sc, int64_t m, float *hi) {
    float top = -INFINITY;
    for (int64_t i = 0; i < m; i++) top = sc[i] > top ? sc[i] : top;
    for (int64_t i = 0; i < m; i++) sc[i] = exp_nonpositive(sc[i] - top);
    float lanes[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= m; i += 16)
        for (int l = 0; l < 16; l++) lanes[l] += sc[i + l];
    for (; i < m; i++) lanes[0] += sc[i];
    float total = 0.0f;
    for (int l = 0; l < 16; l++) total += lanes[l];
    *hi = top;
    return total;
}

/* the (acc, max, sum) of the exact rows of segments ex[0..nex), for every query row */
INLINE void exact_impl(const Exact *ex, int nex, int64_t heads, int64_t D, const float *q,
                       int64_t RQ, int64_t Q, float *acc, float *mx, float *sum) {
    int64_t n = 0;
    for (int e = 0; e < nex; e++) n += ex[e].n;
    float *sc = malloc(sizeof(float) * (size_t)(RQ * n + D));
    float *y = sc + RQ * n;
    memset(acc, 0, sizeof(float) * (size_t)(heads * RQ * D));
    for (int64_t h = 0; h < heads; h++) {
        const float *qh = q + h * RQ * D;
        int64_t at = 0;
        for (int e = 0; e < nex; e++) { /* scores of this head's exact rows, masked */
            const int64_t esize = ex[e].dtype == DT_F32 ? 4 : 2;
            for (int64_t r = 0; r < ex[e].n; r++) {
                load_row(ex[e].k + (h * ex[e].hs + r * D) * esize, ex[e].dtype, D, y);
                dots(qh, RQ, y, D, sc + at + r, n);
                for (int64_t j = 0; j < RQ; j++) {
                    const int64_t own = ex[e].n - ex[e].causal + j % Q; /* last row it sees */
                    if (ex[e].causal && r > own) sc[j * n + at + r] = -INFINITY;
                }
            }
            at += ex[e].n;
        }
        for (int64_t j = 0; j < RQ; j++)
            sum[h * RQ + j] = softmax_pieces(sc + j * n, n, mx + h * RQ + j);
        at = 0;
        for (int e = 0; e < nex; e++) {
            const int64_t esize = ex[e].dtype == DT_F32 ? 4 : 2;
            for (int64_t r = 0; r < ex[e].n; r++) {
                load_row(ex[e].v + (h * ex[e].hs + r * D) * esize, ex[e].dtype, D, y);
                for (int64_t j = 0; j < RQ; j++) {
                    const float w = sc[j * n + at + r];
                    float *a = acc + (h * RQ + j) * D;
                    for (int64_t i = 0; i < D; i++) a[i] += w * y[i];
                }
            }
            at += ex[e].n;
        }
    }
    free(sc);
}

/* Attention of RQ query rows per kv head (RQ = R x Q: R query heads, Q tokens) over packed
 * tokens t0..t1 (rows before `skip` left out) and the exact rows of ex[0..nex): the maximum m
 * of the scores and the sum l of exp(score - m) per query row, and acc = sum exp(score - m) *
 * value (unnormalized; the packed values' Hadamard rotation undone). A caller merges ranges by
 * log-sum-exp: lse = m + log(l), o = acc / l. */
INLINE void attend_impl(const Packed *k, const Packed *v, const float *q, int64_t RQ, int64_t Q,
                        int64_t t0, int64_t t1, int64_t skip, const float *cos, const float *sin,
                        int64_t rotary, const int32_t *pos, const float *cosT, const float *sinT,
                        int64_t span, int hadamard, const Exact *ex, int nex, float *acc,
                        float *mx, float *sum) {
    const int64_t rows = k->heads * RQ, n = t1 - t0, D = k->D;
    memset(acc, 0, sizeof(float) * (size_t)(rows * D));
    const int64_t first = skip > t0 ? (skip < t1 ? skip : t1) : t0; /* first counted token */
    for (int64_t j = 0; j < rows; j++) mx[j] = -INFINITY, sum[j] = 0.0f;
    if (first < t1) {
        float *sc = malloc(sizeof(float) * (size_t)(rows * n));
        BY_SHAPE(scores_impl, k, q, RQ, first, t1, cos, sin, rotary, pos, cosT, sinT, span, sc, n)
        for (int64_t j = 0; j < rows; j++) sum[j] = softmax_pieces(sc + j * n, t1 - first, mx + j);
        BY_SHAPE(values_impl, v, sc, n, RQ, first, t1, acc)
        if (hadamard)
            for (int64_t j = 0; j < rows; j++) hadamard_row(acc + j * D, D);
        free(sc);
    }
    if (nex == 0) return;
    float *acc2 = malloc(sizeof(float) * (size_t)(rows * (D + 2)));
    float *mx2 = acc2 + rows * D, *sum2 = mx2 + rows;
    exact_impl(ex, nex, k->heads, D, q, RQ, Q, acc2, mx2, sum2);
    for (int64_t j = 0; j < rows; j++) { /* merge the two by their maxima */
        const float top = mx[j] > mx2[j] ? mx[j] : mx2[j];
        if (top == -INFINITY) continue;
        const float a = mx[j] == -INFINITY ? 0.0f : expf(mx[j] - top);
        const float b = mx2[j] == -INFINITY ? 0.0f : expf(mx2[j] - top);
        for (int64_t i = 0; i < D; i++) acc[j * D + i] = a * acc[j * D + i] + b * acc2[j * D + i];
        sum[j] = a * sum[j] + b * sum2[j];
        mx[j] = top;
    }
    free(acc2);
}

MULTIVERSION
static void attend(const Packed *k, const Packed *v, const float *q, int64_t RQ, int64_t Q,
                   int64_t t0, int64_t t1, int64_t skip, const float *cos, const float *sin,
                   int64_t rotary, const int32_t *pos, const float *cosT, const float *sinT,
                   int64_t span, int hadamard, const Exact *ex, int nex, float *acc, float *mx,
                   float *sum) {
    attend_impl(k, v, q, RQ, Q, t0, t1, skip, cos, sin, rotary, pos, cosT, sinT, span, hadamard,
                ex, nex, acc, mx, sum);
}

/* ---- Python bindings ---------------------------------------------------------------------- */

static int packed_arg(PyObject *t, Packed *x) {
    unsigned long long codes, scales, mins;
    long long heads, hs, T, D, G, bits;
    if (!PyArg_ParseTuple(t, "KKKLLLLLL", &codes, &scales, &mins, &heads, &hs, &T, &D, &G, &bits))
        return 0;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return PyErr_SetString(PyExc_ValueError, "bits must be 2, 3, 4 or 8"), 0;
    if (heads <= 0 || T <= 0 || hs < T || D <= 0 || D % 16 || D > 256 || G <= 0)
        return PyErr_SetString(PyExc_ValueError, "bad packed shape"), 0;
    *x = (Packed){(const uint8_t *)codes, (const f16 *)scales, (const f16 *)mins, heads, hs, T, D,
                  G, bits};
    return 1;
}

/* attend((codes, scales, mins, heads, hs, T, D, G, bits) of keys, the same of values, q, RQ, Q,
 * t0, t1, skip, hadamard, acc, max, sum, exact, cos, sin, rotary, positions[, cosT, sinT,
 * span, finish]); exact: a tuple of (keys, values, dtype, n, head_stride, causal) segments;
 * cos = 0: no RoPE; cosT/sinT: the tables' first halves transposed, [D/2][span], for the
 * 16-token tiles; finish: turn the partial into o (in acc) and lse (in max) */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    PyObject *kt, *vt, *et;
    Packed k, v;
    unsigned long long q, acc, mx, sum, cos, sin, pos, cosT = 0, sinT = 0;
    long long RQ, Q, t0, t1, skip, rotary, span = 0;
    int hadamard, finish = 0;
    if (!PyArg_ParseTuple(args, "O!O!KLLLLLiKKKO!KKLK|KKLp", &PyTuple_Type, &kt, &PyTuple_Type,
                          &vt, &q, &RQ, &Q, &t0, &t1, &skip, &hadamard, &acc, &mx, &sum,
                          &PyTuple_Type, &et, &cos, &sin, &rotary, &pos, &cosT, &sinT, &span,
                          &finish))
        return NULL;
    if (!packed_arg(kt, &k) || !packed_arg(vt, &v)) return NULL;
    if (k.heads != v.heads || k.hs != v.hs || k.T != v.T || k.D != v.D || RQ <= 0 || Q <= 0 ||
        RQ % Q)
        return PyErr_SetString(PyExc_ValueError, "keys, values and queries do not match"), NULL;
    if (k.hs % k.G || k.T % k.G || k.D % v.G)
        return PyErr_SetString(PyExc_ValueError, "keys group tokens by G, values channels"), NULL;
    if (t0 < 0 || t1 < t0 || t1 > k.T || skip < 0)
        return PyErr_SetString(PyExc_ValueError, "bad token range"), NULL;
    if (cos && (!sin || rotary <= 0 || rotary > k.D || rotary % 2))
        return PyErr_SetString(PyExc_ValueError, "bad RoPE tables"), NULL;
    if (cosT && (!cos || !sinT || rotary != k.D || span < t1 || pos))
        return PyErr_SetString(PyExc_ValueError, "bad transposed RoPE tables"), NULL;
    if (hadamard && (k.D & (k.D - 1)))
        return PyErr_SetString(PyExc_ValueError, "the Hadamard rotation needs a power-of-two D"),
               NULL;
    Exact ex[2];
    const Py_ssize_t nex = PyTuple_GET_SIZE(et);
    if (nex > 2) return PyErr_SetString(PyExc_ValueError, "at most 2 exact segments"), NULL;
    for (Py_ssize_t e = 0; e < nex; e++) {
        unsigned long long ek, ev;
        long long n, hs, causal;
        int dtype;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(et, e), "KKiLLL", &ek, &ev, &dtype, &n, &hs,
                              &causal))
            return NULL;
        if (dtype < DT_F16 || dtype > DT_F32 || n <= 0 || hs < n * k.D || causal < 0 ||
            causal > n || causal > Q)
            return PyErr_SetString(PyExc_ValueError, "bad exact segment"), NULL;
        ex[e] = (Exact){(const char *)ek, (const char *)ev, dtype, n, hs, causal};
    }
    Py_BEGIN_ALLOW_THREADS
    attend(&k, &v, (const float *)q, RQ, Q, t0, t1, skip, cos ? (const float *)cos : NULL,
           (const float *)sin, rotary, pos ? (const int32_t *)pos : NULL,
           cosT ? (const float *)cosT : NULL, (const float *)sinT, span, hadamard, ex, (int)nex,
           (float *)acc, (float *)mx, (float *)sum);
    if (finish) { /* the whole attention: acc <- o = acc / sum, max <- lse = max + log(sum) */
        float *a = (float *)acc, *m = (float *)mx, *l = (float *)sum;
        for (int64_t j = 0; j < k.heads * RQ; j++) {
            const float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;
            for (int64_t i = 0; i < k.D; i++) a[j * k.D + i] *= inv;
            m[j] = l[j] > 0.0f ? m[j] + logf(l[j]) : -INFINITY;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}


static PyMethodDef methods[] = {
    {"attend", py_attend, METH_VARARGS,
     "attend(keys, values, q, RQ, Q, t0, t1, skip, hadamard, acc, max, sum, exact, cos, sin, rotary, positions[, cosT, sinT, span, finish]): float32 attention of RQ = R x Q query rows per kv head over packed tokens t0..t1 (from skip on) and exact row segments: unnormalized acc, max and sum of exp per query row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_attention",
                                    "kvpool's CPU attention over packed rows", -1, methods};

PyMODINIT_FUNC PyInit__cpu_attention(void) {
    rows_init();
    return PyModule_Create(&module);
}
