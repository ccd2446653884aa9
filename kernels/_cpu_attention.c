/* Attention over packed rows on the CPU (kernels/attention.py's spec, kernels/cpu_attention.py
 * calls it): scores of the queries against each packed key row (dequantized in scratch, RoPE
 * redone at its position), a softmax's pieces, p . V over the packed value rows, and exact rows
 * (the sinks, the recent window) in the same pass.
 *
 * Keys may also be codec v2's (KEY_BASIS without prediction maps): components c in a calibrated
 * basis (mean mu, columns R), pre-RoPE. The score is q . RoPE_p(mu + R c), and RoPE_p does not
 * commute with R (R mixes channels of different frequencies), so q cannot be projected into the
 * basis once: each row is rebuilt in scratch (mu + R c, a [n] x [n, D] product), turned and
 * scored (`scores_basis_impl`).
 *
 * The function takes raw addresses (tensor.data_ptr()) and releases the GIL while it runs.
 * Three builds of the loop (x86-64-v4: AVX-512; x86-64-v3: AVX2/FMA/F16C; baseline x86-64), the
 * best the CPU has chosen at import, capped by `use_isa` (kvpool.kernels.env: KVPOOL_CPU_ISA),
 * so an AVX2 machine's code runs, and is measured, on an AVX-512 one; rows as _cpu_rows.h says.
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

/* A tile of tokens at once, one per vector lane (16 with AVX-512, 8 below it: gcc handles a
 * 64-byte vector on AVX2 through memory and general registers, several times slower): the
 * packed rows of a tile are turned into byte columns (byte b of each row of the tile), a
 * channel's codes are a shift and a mask of one column, and scores accumulate lane-wise, with
 * no sum across lanes. RoPE is redone per channel pair (a, b = a + D/2) on a tile's positions
 * at once, their angles read from transposed tables cosT/sinT [D/2][span]. */
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef int32_t vi8 __attribute__((vector_size(32)));
#define TILE 16 /* value rows dequantized together */

#define DEFINE_TILE(LANES, VF, VI)                                                              \
    INLINE VF tile_channel##LANES(const VI *col, const int64_t D, const int bits, int64_t i) {  \
        const int w0 = bits == 3 ? 2 : bits;                                                    \
        const int64_t P0 = D * w0 / 8; /* bytes of the low plane */                             \
        VI c = (col[i % P0] >> (int)((i / P0) * w0)) & ((1 << w0) - 1);                         \
        if (bits == 3) { /* the high bit from the 1-bit plane after it */                       \
            const int64_t P1 = D / 8;                                                           \
            c |= ((col[P0 + i % P1] >> (int)(i / P1)) & 1) << 2;                                \
        }                                                                                       \
        return __builtin_convertvector(c, VF);                                                  \
    }                                                                                           \
                                                                                                \
    /* byte b of the tile's rows widened as it is gathered, column by column, so that a        \
     * column's stores have left the store buffer when it is read back as one vector; then    \
     * the tile's keys channel by channel, then each query row's scores in two accumulators    \
     * that stay in registers */                                                               \
    INLINE void scores_tile##LANES(const uint8_t *rows, const int64_t D, const int bits,        \
                                   const float *s, const float *m, const float *q, int64_t RQ,  \
                                   const float *cosT, const float *sinT, int64_t span,          \
                                   int64_t t, float *out, int64_t stride) {                     \
        const int64_t row_bytes = D * bits / 8;                                                 \
        int32_t wide[128][LANES];                                                               \
        for (int64_t b = 0; b < row_bytes; b++)                                                 \
            for (int64_t l = 0; l < LANES; l++) wide[b][l] = rows[l * row_bytes + b];           \
        VI col[128];                                                                            \
        for (int64_t b = 0; b < row_bytes; b++) memcpy(&col[b], wide[b], sizeof col[b]);        \
        VF keys[256];                                                                           \
        if (cosT) {                                                                             \
            const int64_t half = D / 2;                                                         \
            for (int64_t a = 0; a < half; a++) {                                                \
                const VF ka = tile_channel##LANES(col, D, bits, a) * s[a] + m[a];               \
                const VF kb =                                                                   \
                    tile_channel##LANES(col, D, bits, a + half) * s[a + half] + m[a + half];    \
                VF c, sn;                                                                       \
                memcpy(&c, cosT + a * span + t, sizeof c);                                      \
                memcpy(&sn, sinT + a * span + t, sizeof sn);                                    \
                keys[a] = ka * c - kb * sn, keys[a + half] = kb * c + ka * sn; /* rotated */    \
            }                                                                                   \
        } else {                                                                                \
            for (int64_t i = 0; i < D; i++)                                                     \
                keys[i] = tile_channel##LANES(col, D, bits, i) * s[i] + m[i];                   \
        }                                                                                       \
        for (int64_t j = 0; j < RQ; j++) {                                                      \
            const float *qj = q + j * D;                                                        \
            VF a0 = keys[0] * qj[0], a1 = keys[1] * qj[1];                                      \
            for (int64_t i = 2; i < D; i += 2)                                                  \
                a0 += keys[i] * qj[i], a1 += keys[i + 1] * qj[i + 1];                           \
            a0 += a1;                                                                           \
            memcpy(out + j * stride, &a0, sizeof a0);                                           \
        }                                                                                       \
    }

DEFINE_TILE(16, vf16, vi16)
DEFINE_TILE(8, vf8, vi8)

/* out[(h * RQ + j) * stride + t - t0] = q[h * RQ + j] . key(h, t) for the RQ query rows of kv head h:
 * keys per channel (groups of G tokens), RoPE redone at each row's position (pos: int32 per
 * row, laid out like the codes; NULL: the token index) */
INLINE void scores_impl(const Packed *k, const int64_t D, const int bits, const float *q,
                        int64_t RQ, int64_t t0, int64_t t1, const float *cos, const float *sin,
                        int64_t rotary, const int32_t *pos, const float *cosT, const float *sinT,
                        int64_t span, float *out, int64_t stride, const int lanes) {
    const int64_t G = k->G, row_bytes = D * bits / 8, heads = k->heads;
    /* the tile path: positions are the token indices, RoPE (if any) on all of head_dim */
    const int tiles = !pos && row_bytes <= 128 && D % 16 == 0 &&
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
        if (tiles && t + lanes <= t1 && t + lanes <= next) {
            for (int64_t h = 0; h < heads; h++) {
                const uint8_t *rows = k->codes + (h * k->hs + t) * row_bytes;
                float *o = out + h * RQ * stride + (t - t0);
                if (lanes == 16)
                    scores_tile16(rows, D, bits, s + h * D, m + h * D, q + h * RQ * D, RQ,
                                  cos ? cosT : NULL, sinT, span, t, o, stride);
                else
                    scores_tile8(rows, D, bits, s + h * D, m + h * D, q + h * RQ * D, RQ,
                                 cos ? cosT : NULL, sinT, span, t, o, stride);
            }
            t += lanes;
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

/* Keys in a key basis (codec v2 without prediction maps): a row holds `nruns` runs of components
 * side by side, run r its ch[r] components at bits[r] bits (planar, as any row) from byte off[r];
 * the groups' scales and minimums are [T / G][n] per head (n = the components stored, runs in
 * order), and the rotation's columns of those components rot [heads][n][D] (row j: component j's
 * column), the mean mu [heads][D]. */
#define MAX_RUNS 32
typedef struct {
    int nruns;
    int64_t ch[MAX_RUNS], bits[MAX_RUNS], off[MAX_RUNS], first[MAX_RUNS];
    int64_t n, row_bytes;
    const float *mean, *rot;
} Basis;

/* y = mu + sum_j c[j] R[j] (D a multiple of 16, at most 256): 64 channels at a time in eight
 * 8-lane accumulators, which stay in registers on AVX2 as on AVX-512 */
INLINE void basis_row(const float *restrict R, const float *restrict mu, const float *restrict c,
                      int64_t n, const int64_t D, float *restrict y) {
    for (int64_t v0 = 0; v0 < D; v0 += 64) {
        const int64_t nv = (D - v0 < 64 ? D - v0 : 64) / 8;
        vf8 acc[8];
        for (int64_t v = 0; v < nv; v++) memcpy(&acc[v], mu + v0 + 8 * v, sizeof(vf8));
        for (int64_t j = 0; j < n; j++) {
            const float cj = c[j];
            for (int64_t v = 0; v < nv; v++) {
                vf8 r;
                memcpy(&r, R + j * D + v0 + 8 * v, sizeof r);
                acc[v] += cj * r;
            }
        }
        for (int64_t v = 0; v < nv; v++) memcpy(y + v0 + 8 * v, &acc[v], sizeof(vf8));
    }
}

/* `scores_impl` for keys in a basis: head by head (its rotation stays in cache), a group's
 * parameters widened once, each row's components decoded run by run, the row rebuilt
 * (mu + R c), RoPE redone at its position and scored against the head's RQ query rows */
INLINE void scores_basis_impl(const Packed *k, const int64_t D, const Basis *bs, const float *q,
                              int64_t RQ, int64_t t0, int64_t t1, const float *cos,
                              const float *sin, int64_t rotary, const int32_t *pos, float *out,
                              int64_t stride) {
    const int64_t G = k->G, n = bs->n;
    float *buf = malloc(sizeof(float) * (size_t)(3 * n + D));
    float *s = buf, *m = s + n, *c = m + n, *y = c + n;
    for (int64_t h = 0; h < k->heads; h++) {
        const float *R = bs->rot + h * n * D, *mu = bs->mean + h * D;
        for (int64_t t = t0; t < t1;) {
            const int64_t g = (h * k->hs + t) / G, group_end = (t / G + 1) * G;
            const int64_t end = group_end < t1 ? group_end : t1;
            widen_params(k->scales + g * n, k->mins + g * n, n, 1, s, m);
            for (; t < end; t++) {
                const uint8_t *row = k->codes + (h * k->hs + t) * bs->row_bytes;
                for (int r = 0; r < bs->nruns; r++) {
                    const int64_t f = bs->first[r];
                    decode_row(row + bs->off[r], bs->ch[r], (int)bs->bits[r], s + f, m + f, 0,
                               c + f);
                }
                basis_row(R, mu, c, n, D, y);
                if (cos) {
                    const int64_t p = pos ? pos[h * k->hs + t] : t;
                    rope_row(y, cos + p * rotary, sin + p * rotary, rotary, 1.0f);
                }
                dots(q + h * RQ * D, RQ, y, D, out + h * RQ * stride + (t - t0), stride);
            }
        }
    }
    free(buf);
}

/* the common head dims as compile-time constants */
#define BY_DIM(impl, x, ...)                                                                    \
    switch ((x)->D) {                                                                           \
    case 64: impl(x, 64, __VA_ARGS__); break;                                                   \
    case 128: impl(x, 128, __VA_ARGS__); break;                                                 \
    default: impl(x, (x)->D, __VA_ARGS__);                                                      \
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
            for (int64_t j = 0; j < RQ; j++) /* D / 8 accumulators of 8 lanes: registers */
                for (int64_t v0 = 0; v0 < D; v0 += 64) {
                    const int64_t nv = (D - v0 < 64 ? D - v0 : 64) / 8;
                    vf8 aj[8];
                    for (int64_t v = 0; v < nv; v++) memcpy(&aj[v], a + j * D + v0 + 8 * v, 32);
                    for (int64_t l = 0; l < n; l++) {
                        const float wl = w[j * TILE + l];
                        for (int64_t v = 0; v < nv; v++) {
                            vf8 c;
                            memcpy(&c, C + l * D + v0 + 8 * v, sizeof c);
                            aj[v] += wl * c;
                        }
                    }
                    for (int64_t v = 0; v < nv; v++) memcpy(a + j * D + v0 + 8 * v, &aj[v], 32);
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
INLINE void attend_impl(const Packed *k, const Basis *bs, const Packed *v, const float *q,
                        int64_t RQ, int64_t Q, int64_t t0, int64_t t1, int64_t skip,
                        const float *cos, const float *sin, int64_t rotary, const int32_t *pos,
                        const float *cosT, const float *sinT, int64_t span, int hadamard,
                        const Exact *ex, int nex, float *acc, float *mx, float *sum,
                        const int lanes) {
    const int64_t rows = k->heads * RQ, n = t1 - t0, D = k->D;
    memset(acc, 0, sizeof(float) * (size_t)(rows * D));
    const int64_t first = skip > t0 ? (skip < t1 ? skip : t1) : t0; /* first counted token */
    for (int64_t j = 0; j < rows; j++) mx[j] = -INFINITY, sum[j] = 0.0f;
    if (first < t1) {
        float *sc = malloc(sizeof(float) * (size_t)(rows * n));
        if (bs)
            BY_DIM(scores_basis_impl, k, bs, q, RQ, first, t1, cos, sin, rotary, pos, sc, n)
        else
            BY_SHAPE(scores_impl, k, q, RQ, first, t1, cos, sin, rotary, pos, cosT, sinT, span,
                     sc, n, lanes)
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

/* The loop built for three x86-64 levels (elsewhere: once), the level chosen at import and
 * capped by use_isa(): 2 x86-64-v4 (AVX-512), 1 x86-64-v3 (AVX2, FMA, F16C), 0 the baseline */
#define ATTEND_ARGS                                                                             \
    const Packed *k, const Basis *bs, const Packed *v, const float *q, int64_t RQ, int64_t Q,  \
        int64_t t0, int64_t t1, int64_t skip, const float *cos, const float *sin,              \
        int64_t rotary, const int32_t *pos, const float *cosT, const float *sinT, int64_t span, \
        int hadamard, const Exact *ex, int nex, float *acc, float *mx, float *sum
#define ATTEND_CALL(lanes)                                                                      \
    attend_impl(k, bs, v, q, RQ, Q, t0, t1, skip, cos, sin, rotary, pos, cosT, sinT, span,     \
                hadamard, ex, nex, acc, mx, sum, lanes)
#if X86_F16C
static const char *const ISA_NAMES[] = {"x86-64", "x86-64-v3", "x86-64-v4"};
__attribute__((target("arch=x86-64-v4"))) static void attend_v4(ATTEND_ARGS) { ATTEND_CALL(16); }
__attribute__((target("arch=x86-64-v3"))) static void attend_v3(ATTEND_ARGS) { ATTEND_CALL(8); }
static void attend_v1(ATTEND_ARGS) { ATTEND_CALL(8); }
static int best_isa = 0, isa = 0;

static void isa_init(void) {
    __builtin_cpu_init();
    best_isa = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
    isa = best_isa;
}

static void attend(ATTEND_ARGS) {
    if (isa == 2) attend_v4(k, bs, v, q, RQ, Q, t0, t1, skip, cos, sin, rotary, pos, cosT, sinT,
                            span, hadamard, ex, nex, acc, mx, sum);
    else if (isa == 1) attend_v3(k, bs, v, q, RQ, Q, t0, t1, skip, cos, sin, rotary, pos, cosT,
                                 sinT, span, hadamard, ex, nex, acc, mx, sum);
    else attend_v1(k, bs, v, q, RQ, Q, t0, t1, skip, cos, sin, rotary, pos, cosT, sinT, span,
                   hadamard, ex, nex, acc, mx, sum);
}
#else
static const char *const ISA_NAMES[] = {"native"};
static int best_isa = 0, isa = 0;
static void isa_init(void) {}
static void attend(ATTEND_ARGS) { ATTEND_CALL(8); }
#endif

/* ---- Python bindings ---------------------------------------------------------------------- */

static int packed_arg(PyObject *t, Packed *x) {
    unsigned long long codes, scales, mins;
    long long heads, hs, T, D, G, bits;
    if (!PyArg_ParseTuple(t, "KKKLLLLLL", &codes, &scales, &mins, &heads, &hs, &T, &D, &G, &bits))
        return 0;
    if (bits != 0 && bits != 2 && bits != 3 && bits != 4 && bits != 8) /* 0: keys in a basis */
        return PyErr_SetString(PyExc_ValueError, "bits must be 2, 3, 4 or 8"), 0;
    if (heads <= 0 || T <= 0 || hs < T || D <= 0 || D % 16 || D > 256 || G <= 0)
        return PyErr_SetString(PyExc_ValueError, "bad packed shape"), 0;
    *x = (Packed){(const uint8_t *)codes, (const f16 *)scales, (const f16 *)mins, heads, hs, T, D,
                  G, bits};
    return 1;
}

/* basis: (mean, rotation, n, ((channels, bits), ...)) of keys in a key basis (see Basis) */
static int basis_arg(PyObject *t, const Packed *k, Basis *b) {
    unsigned long long mean, rot;
    long long n;
    PyObject *runs;
    if (!PyArg_ParseTuple(t, "KKLO!", &mean, &rot, &n, &PyTuple_Type, &runs)) return 0;
    const Py_ssize_t nruns = PyTuple_GET_SIZE(runs);
    if (!mean || !rot || n <= 0 || n > k->D || nruns <= 0 || nruns > MAX_RUNS)
        return PyErr_SetString(PyExc_ValueError, "bad key basis"), 0;
    *b = (Basis){.nruns = (int)nruns, .n = n, .mean = (const float *)mean,
                 .rot = (const float *)rot};
    int64_t at = 0, bytes = 0;
    for (Py_ssize_t r = 0; r < nruns; r++) {
        long long ch, bits;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(runs, r), "LL", &ch, &bits)) return 0;
        if (ch <= 0 || ch % 8 || (bits != 2 && bits != 3 && bits != 4 && bits != 8))
            return PyErr_SetString(PyExc_ValueError, "a run is 8k components of 2/3/4/8 bits"), 0;
        b->ch[r] = ch, b->bits[r] = bits, b->first[r] = at, b->off[r] = bytes;
        at += ch, bytes += ch * bits / 8;
    }
    if (at != n) return PyErr_SetString(PyExc_ValueError, "the runs do not add up to n"), 0;
    b->row_bytes = bytes;
    return 1;
}

/* attend((codes, scales, mins, heads, hs, T, D, G, bits) of keys, the same of values, q, RQ, Q,
 * t0, t1, skip, hadamard, acc, max, sum, exact, cos, sin, rotary, positions[, cosT, sinT,
 * span, finish, basis]); exact: a tuple of (keys, values, dtype, n, head_stride, causal)
 * segments; cos = 0: no RoPE; cosT/sinT: the tables' first halves transposed, [D/2][span], for
 * the 16-token tiles; finish: turn the partial into o (in acc) and lse (in max); basis: keys in
 * a key basis (`basis_arg`; the keys' bits then 0), or None */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    PyObject *kt, *vt, *et, *bt = Py_None;
    Packed k, v;
    Basis basis;
    unsigned long long q, acc, mx, sum, cos, sin, pos, cosT = 0, sinT = 0;
    long long RQ, Q, t0, t1, skip, rotary, span = 0;
    int hadamard, finish = 0;
    if (!PyArg_ParseTuple(args, "O!O!KLLLLLiKKKO!KKLK|KKLpO", &PyTuple_Type, &kt, &PyTuple_Type,
                          &vt, &q, &RQ, &Q, &t0, &t1, &skip, &hadamard, &acc, &mx, &sum,
                          &PyTuple_Type, &et, &cos, &sin, &rotary, &pos, &cosT, &sinT, &span,
                          &finish, &bt))
        return NULL;
    if (!packed_arg(kt, &k) || !packed_arg(vt, &v)) return NULL;
    if (v.bits == 0 || (k.bits == 0) != (bt != Py_None))
        return PyErr_SetString(PyExc_ValueError, "keys of 0 bits come with a basis, and only they"),
               NULL;
    if (bt != Py_None && (!PyTuple_Check(bt) || !basis_arg(bt, &k, &basis))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "basis must be a tuple");
        return NULL;
    }
    if (bt != Py_None && cosT)
        return PyErr_SetString(PyExc_ValueError, "keys in a basis take no transposed tables"), NULL;
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
    attend(&k, bt != Py_None ? &basis : NULL, &v, (const float *)q, RQ, Q, t0, t1, skip,
           cos ? (const float *)cos : NULL,
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


/* use_isa(name): run the loop built for `name` ("x86-64-v4", "x86-64-v3", "x86-64"), or the
 * best below it this CPU has; returns the one now in use. use_isa(None): the best there is. */
static PyObject *py_use_isa(PyObject *self, PyObject *arg) {
    if (arg != Py_None) {
        const char *name = PyUnicode_AsUTF8(arg);
        if (!name) return NULL;
        int want = -1;
        for (int i = 0; i < (int)(sizeof ISA_NAMES / sizeof *ISA_NAMES); i++)
            if (!strcmp(name, ISA_NAMES[i])) want = i;
        if (want < 0) return PyErr_Format(PyExc_ValueError, "unknown ISA %R", arg);
        isa = want < best_isa ? want : best_isa;
    } else {
        isa = best_isa;
    }
    return PyUnicode_FromString(ISA_NAMES[isa]);
}

static PyMethodDef methods[] = {
    {"use_isa", py_use_isa, METH_O,
     "use_isa(name or None): the instruction set the loop runs with (capped by the CPU's); returns it"},
    {"attend", py_attend, METH_VARARGS,
     "attend(keys, values, q, RQ, Q, t0, t1, skip, hadamard, acc, max, sum, exact, cos, sin, rotary, positions[, cosT, sinT, span, finish, basis]): float32 attention of RQ = R x Q query rows per kv head over packed tokens t0..t1 (from skip on) and exact row segments: unnormalized acc, max and sum of exp per query row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_attention",
                                    "kvpool's CPU attention over packed rows", -1, methods};

PyMODINIT_FUNC PyInit__cpu_attention(void) {
    rows_init();
    isa_init();
    return PyModule_Create(&module);
}
