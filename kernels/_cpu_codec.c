/* The CPU fast path of the codec: one pass per section, quantize+pack and unpack+dequantize.
 *
 * Where it stands: kvpool.kernels.cpu_codec calls these on CPU tensors; they must give the same
 * codes as kvpool.kernels.reference (the spec), bit for bit, and tests check that they do.
 *
 * A section is one layer's keys or values, x: [H, T, D] contiguous, float16/bfloat16/float32
 * (decoded into [H, T, D] whose heads may be further apart: a slice of a longer sequence).
 *   keys   (is_key=1): groups of G tokens of one channel, scales/mins [H, T/G, D]
 *   values (is_key=0): groups of G channels of one token, scales/mins [H, T, D/G]
 *   symmetric values (sym=1, per-token groups only): scales [H, T, D/G] and no minimums; a
 *   group's codes are offset by -h * s (h = (2^b - 1) / 2, fp32, exact), as reference.py says
 * Rows are packed as _cpu_rows.h says.
 *
 * The functions take raw addresses (tensor.data_ptr()) and release the GIL while they run, so
 * Python threads can work on different sections at once. Built with gcc function
 * multi-versioning: AVX-512 / AVX2+F16C clones where the CPU has them, portable code otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_cpu_rows.h"

/* ---- packing ------------------------------------------------------------------------------ */

INLINE void pack_row(const uint8_t *restrict c, int64_t n, int bits, uint8_t *restrict p) {
    if (bits == 8) {
        memcpy(p, c, (size_t)n);
    } else if (bits == 4) {
        int64_t q = n / 2;
        for (int64_t j = 0; j < q; j++) p[j] = (uint8_t)(c[j] | (c[q + j] << 4));
    } else { /* 2 or 3: a 2-bit plane of the low bits, then (3) a 1-bit plane of the high bit */
        int64_t q = n / 4;
        for (int64_t j = 0; j < q; j++)
            p[j] = (uint8_t)((c[j] & 3) | ((c[q + j] & 3) << 2) | ((c[2 * q + j] & 3) << 4) |
                             ((c[3 * q + j] & 3) << 6));
        if (bits == 3) {
            int64_t e = n / 8;
            uint8_t *h = p + q;
            for (int64_t j = 0; j < e; j++) {
                uint8_t v = 0;
                for (int k = 0; k < 8; k++) v |= (uint8_t)(((c[k * e + j] >> 2) & 1) << k);
                h[j] = v;
            }
        }
    }
}

/* ---- quantize ----------------------------------------------------------------------------- */

/* scale and minimum of a group, rounded through fp16 exactly as the reference does */
INLINE void group_params(float lo, float hi, float qmax, f16 *s16, f16 *m16) {
    float s = (hi - lo) / qmax;
    if (!(s >= SCALE_EPS)) s = SCALE_EPS;
    *s16 = (f16)s;
    *m16 = (f16)lo;
}

/* a symmetric group's scale (fp16); its offset is -h * s (widen_groups) */
INLINE void symmetric_scale(float lo, float hi, float half, f16 *s16) {
    float a = -lo > hi ? -lo : hi;
    float s = a / half;
    if (!(s >= SCALE_EPS)) s = SCALE_EPS;
    *s16 = (f16)s;
}

INLINE void codes_row(const float *restrict x, const float *restrict s, const float *restrict m,
                      int64_t n, float qmax, uint8_t *restrict c) {
    for (int64_t i = 0; i < n; i++) {
        float q = floorf((x[i] - m[i]) / s[i] + 0.5f);
        q = q > 0.f ? q : 0.f;
        q = q < qmax ? q : qmax;
        c[i] = (uint8_t)(int32_t)q;
    }
}

INLINE void minmax_cols(const float *restrict rows, int64_t r, int64_t n, float *restrict lo,
                        float *restrict hi) {
    for (int64_t i = 0; i < n; i++) lo[i] = hi[i] = rows[i];
    for (int64_t k = 1; k < r; k++) {
        const float *row = rows + k * n;
        for (int64_t i = 0; i < n; i++) {
            lo[i] = row[i] < lo[i] ? row[i] : lo[i];
            hi[i] = row[i] > hi[i] ? row[i] : hi[i];
        }
    }
}

/* min and max of n values (n a multiple of 16): 16 lanes of vertical min/max, then a
 * reduction; written so that it vectorizes without -ffast-math */
INLINE void minmax_span(const float *restrict x, int64_t n, float *lo, float *hi) {
    float l[16], u[16];
    for (int j = 0; j < 16; j++) l[j] = u[j] = x[j];
    for (int64_t i = 16; i < n; i += 16)
        for (int j = 0; j < 16; j++) {
            l[j] = x[i + j] < l[j] ? x[i + j] : l[j];
            u[j] = x[i + j] > u[j] ? x[i + j] : u[j];
        }
    for (int j = 1; j < 16; j++) {
        l[0] = l[j] < l[0] ? l[j] : l[0];
        u[0] = u[j] > u[0] ? u[j] : u[0];
    }
    *lo = l[0];
    *hi = u[0];
}

INLINE int out_of_range(const float *restrict x, int64_t n) { /* NaN, inf or beyond fp16 */
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= !(fabsf(x[i]) <= 65504.f);
    return bad;
}

/* returns 0, or 1 when the section holds NaN, inf or a magnitude beyond fp16 (nothing valid
 * is written then) */
INLINE int encode_impl(const char *x, int dtype, int64_t H, int64_t T, int64_t D, int is_key,
                           int64_t G, int bits, uint8_t *codes, f16 *scales, f16 *mins,
                           int sym) {
    const int64_t esize = dtype == DT_F32 ? 4 : 2, row_bytes = D * bits / 8;
    const float qmax = (float)((1 << bits) - 1), half = qmax * 0.5f;
    const int64_t rows = is_key ? G : 1;
    float *buf = malloc(sizeof(float) * (size_t)(rows * D + 4 * D));
    uint8_t *c = malloc((size_t)D);
    float *s = buf + rows * D, *m = s + D, *lo = m + D, *hi = lo + D;
    for (int64_t h = 0; h < H; h++) {
        for (int64_t t0 = 0; t0 < T; t0 += rows) {
            int64_t r0 = h * T + t0;
            load_row(x + r0 * D * esize, dtype, rows * D, buf);
            if (out_of_range(buf, rows * D)) {
                free(c);
                free(buf);
                return 1;
            }
            if (is_key) { /* one group per channel over these G rows */
                minmax_cols(buf, G, D, lo, hi);
                f16 *ps = scales + (r0 / G) * D, *pm = mins + (r0 / G) * D;
                for (int64_t i = 0; i < D; i++) group_params(lo[i], hi[i], qmax, ps + i, pm + i);
                widen_params(ps, pm, D, 1, s, m);
            } else { /* groups of G channels in this one row */
                f16 *ps = scales + r0 * (D / G), *pm = mins + r0 * (D / G);
                for (int64_t g = 0; g < D / G; g++) {
                    float l, u;
                    minmax_span(buf + g * G, G, &l, &u);
                    if (sym)
                        symmetric_scale(l, u, half, ps + g);
                    else
                        group_params(l, u, qmax, ps + g, pm + g);
                }
                widen_groups(ps, sym ? NULL : pm, D / G, G, -half, s, m);
            }
            for (int64_t k = 0; k < rows; k++) {
                codes_row(buf + k * D, s, m, D, qmax, c);
                pack_row(c, D, bits, codes + (r0 + k) * row_bytes);
            }
        }
    }
    free(c);
    free(buf);
    return 0;
}

typedef struct {
    int hadamard;      /* undo (= apply) the Hadamard rotation of each row */
    const float *cos;  /* redo RoPE: [T, rotary] tables, or NULL */
    const float *sin;
    int64_t rotary;
} Transforms;

/* decodes tokens [t0, t0 + T) of each head of a section of src_T tokens per head (t0 = 0 and
 * src_T = T: all of it); RoPE's tables and the output start at token t0 */
INLINE void decode_impl(const uint8_t *codes, const f16 *scales, const f16 *mins, int64_t H,
                           int64_t T, int64_t D, int is_key, int64_t G, int bits, char *out,
                           int64_t head_stride, int64_t row_stride, int dtype,
                           const Transforms *tf, int sym, int64_t t0, int64_t src_T) {
    const int64_t esize = dtype == DT_F32 ? 4 : 2, row_bytes = D * bits / 8;
    const float neg_half = -0.5f * (float)((1 << bits) - 1); /* symmetric groups' offset / s */
    const int whole_row = !is_key && G == D; /* one scale and minimum per row */
    float *buf = malloc(sizeof(float) * (size_t)(3 * D));
    float *s = buf, *m = s + D, *tmp = m + D;
    for (int64_t i = 0; i < H * T; i++) {
        const int64_t r = (i / T) * src_T + t0 + i % T; /* the section's row */
        if (is_key && (i % T == 0 || r % G == 0))
            widen_params(scales + (r / G) * D, mins + (r / G) * D, D, 1, s, m);
        else if (whole_row) {
            s[0] = (float)scales[r];
            m[0] = sym ? s[0] * neg_half : (float)mins[r];
        } else if (!is_key && sym) /* no minimums */
            widen_groups(scales + r * (D / G), NULL, D / G, G, neg_half, s, m);
        else if (!is_key)
            widen_params(scales + r * (D / G), mins + r * (D / G), D / G, G, s, m);
        /* output row i is token i % T of head i / T; heads and rows are head_stride /
         * row_stride elements apart */
        char *row = out + ((i / T) * head_stride + (i % T) * row_stride) * esize;
        /* float32 output is written in place; 16-bit output goes through one row of floats */
        float *y = dtype == DT_F32 ? (float *)row : tmp;
        if (whole_row)
            decode_row(codes + r * row_bytes, D, bits, s, m, 1, y);
        else
            decode_row(codes + r * row_bytes, D, bits, s, m, 0, y);
        if (tf->hadamard) hadamard_row(y, D);
        if (tf->cos) {
            const int64_t t = i % T;
            rope_row(y, tf->cos + t * tf->rotary, tf->sin + t * tf->rotary, tf->rotary, 1.0f);
        }
        if (dtype != DT_F32) store_row(y, dtype, D, row);
    }
    free(buf);
}

/* Entry points: one clone per ISA, with the common head dims as compile-time constants. */
MULTIVERSION
static int encode_section(const char *x, int dtype, int64_t H, int64_t T, int64_t D, int is_key,
                          int64_t G, int bits, uint8_t *codes, f16 *scales, f16 *mins,
                          int sym) {
    switch (D) {
    case 64: return encode_impl(x, dtype, H, T, 64, is_key, G, bits, codes, scales, mins, sym);
    case 128: return encode_impl(x, dtype, H, T, 128, is_key, G, bits, codes, scales, mins, sym);
    default: return encode_impl(x, dtype, H, T, D, is_key, G, bits, codes, scales, mins, sym);
    }
}

MULTIVERSION
static void decode_section(const uint8_t *codes, const f16 *scales, const f16 *mins, int64_t H,
                           int64_t T, int64_t D, int is_key, int64_t G, int bits, char *out,
                           int64_t hs, int64_t rs, int dtype, const Transforms *tf, int sym,
                           int64_t t0, int64_t src_T) {
#define DECODE(d)                                                                                \
    decode_impl(codes, scales, mins, H, T, d, is_key, G, bits, out, hs, rs, dtype, tf, sym, t0,  \
                src_T)
    switch (D) { /* head dims, and the runs of key components under a key basis (powers of 2) */
    case 8: DECODE(8); break;
    case 16: DECODE(16); break;
    case 32: DECODE(32); break;
    case 64: DECODE(64); break;
    case 128: DECODE(128); break;
    default: DECODE(D);
    }
#undef DECODE
}

/* float32 rows -> rows of `dtype`, RoPE redone on each when cos is not NULL: how predicted
 * blocks' rebuilt layers reach the caller's tensors (one pass: read, rotate, round, write) */
MULTIVERSION
static void store_rows(const float *src, int64_t H, int64_t T, int64_t D, int64_t src_hs,
                       int64_t src_rs, char *out, int64_t hs, int64_t rs, int dtype,
                       const Transforms *tf) {
    const int64_t esize = dtype == DT_F32 ? 4 : 2;
    float *y = malloc(sizeof(float) * (size_t)D);
    for (int64_t h = 0; h < H; h++)
        for (int64_t t = 0; t < T; t++) {
            memcpy(y, src + h * src_hs + t * src_rs, sizeof(float) * (size_t)D);
            if (tf->cos)
                rope_row(y, tf->cos + t * tf->rotary, tf->sin + t * tf->rotary, tf->rotary, 1.0f);
            store_row(y, dtype, D, out + (h * hs + t * rs) * esize);
        }
    free(y);
}

/* ---- Python bindings ---------------------------------------------------------------------- */

static int check_args(int dtype, long long H, long long T, long long D, int is_key, long long G,
                      int bits) {
    if (dtype < DT_F16 || dtype > DT_F32) return PyErr_SetString(PyExc_ValueError, "dtype"), 0;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return PyErr_SetString(PyExc_ValueError, "bits must be 2, 3, 4 or 8"), 0;
    if (H <= 0 || T <= 0 || D <= 0 || G <= 0 || D % 8 || (is_key ? T % G : D % G))
        return PyErr_SetString(PyExc_ValueError, "bad section shape"), 0;
    return 1;
}

static PyObject *py_encode(PyObject *self, PyObject *args) {
    unsigned long long x, codes, scales, mins;
    int dtype, is_key, bits, sym = 0;
    long long H, T, D, G;
    if (!PyArg_ParseTuple(args, "KiLLLiLiKKK|i", &x, &dtype, &H, &T, &D, &is_key, &G, &bits,
                          &codes, &scales, &mins, &sym))
        return NULL;
    if (!check_args(dtype, H, T, D, is_key, G, bits)) return NULL;
    if (sym && is_key)
        return PyErr_SetString(PyExc_ValueError, "symmetric groups are per token"), NULL;
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = encode_section((const char *)x, dtype, H, T, D, is_key, G, bits, (uint8_t *)codes,
                   (f16 *)scales, (f16 *)mins, sym);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(!bad);
}

/* rows of D elements, H heads of T rows, heads and rows hs and rs elements apart: either
 * each head's rows in a run (rs >= D, heads past a whole run) or the heads of a row side by
 * side (hs >= D, rows past all heads); no two rows share an element */
static int rows_apart(long long H, long long T, long long D, long long hs, long long rs) {
    if (H == 1) return T == 1 || rs >= D;
    if (T == 1) return hs >= D;
    return (rs >= D && hs >= T * rs) || (hs >= D && rs >= H * hs);
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long codes, scales, mins, out;
    int dtype, is_key, bits;
    long long H, T, D, G, head_stride, row_stride, rotary = 0, t0 = 0, src_T = -1;
    int hadamard = 0, sym = 0;
    unsigned long long cos = 0, sin = 0;
    if (!PyArg_ParseTuple(args, "KKKLLLiLiKLLi|iKKLiLL", &codes, &scales, &mins, &H, &T, &D,
                          &is_key, &G, &bits, &out, &head_stride, &row_stride, &dtype, &hadamard,
                          &cos, &sin, &rotary, &sym, &t0, &src_T))
        return NULL;
    if (src_T < 0) src_T = T; /* the whole section */
    if (t0 < 0 || T <= 0 || t0 + T > src_T)
        return PyErr_SetString(PyExc_ValueError, "tokens beyond the section"), NULL;
    if (!check_args(dtype, H, src_T, D, is_key, G, bits)) return NULL;
    if (sym && is_key)
        return PyErr_SetString(PyExc_ValueError, "symmetric groups are per token"), NULL;
    if (hadamard && (D & (D - 1)))
        return PyErr_SetString(PyExc_ValueError, "the Hadamard rotation needs a power-of-two D"),
               NULL;
    if (cos && (!sin || rotary <= 0 || rotary > D || rotary % 2))
        return PyErr_SetString(PyExc_ValueError, "bad RoPE tables"), NULL;
    const Transforms tf = {hadamard, cos ? (const float *)cos : NULL, (const float *)sin, rotary};
    if (!rows_apart(H, T, D, head_stride, row_stride))
        return PyErr_SetString(PyExc_ValueError, "rows or heads would overlap"), NULL;
    Py_BEGIN_ALLOW_THREADS
    decode_section((const uint8_t *)codes, (const f16 *)scales, (const f16 *)mins, H, T, D, is_key,
                   G, bits, (char *)out, head_stride, row_stride, dtype, &tf, sym, t0, src_T);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_store(PyObject *self, PyObject *args) {
    unsigned long long src, out, cos = 0, sin = 0;
    long long H, T, D, src_hs, src_rs, hs, rs, rotary = 0;
    int dtype;
    if (!PyArg_ParseTuple(args, "KLLLLLKLLi|KKL", &src, &H, &T, &D, &src_hs, &src_rs, &out, &hs,
                          &rs, &dtype, &cos, &sin, &rotary))
        return NULL;
    if (dtype < DT_F16 || dtype > DT_F32 || H <= 0 || T <= 0 || D <= 0)
        return PyErr_SetString(PyExc_ValueError, "bad rows"), NULL;
    if (cos && (!sin || rotary <= 0 || rotary > D || rotary % 2))
        return PyErr_SetString(PyExc_ValueError, "bad RoPE tables"), NULL;
    if ((T > 1 && rs < D) || (H > 1 && hs < T * rs))
        return PyErr_SetString(PyExc_ValueError, "rows or heads would overlap"), NULL;
    const Transforms tf = {0, cos ? (const float *)cos : NULL, (const float *)sin, rotary};
    Py_BEGIN_ALLOW_THREADS
    store_rows((const float *)src, H, T, D, src_hs, src_rs, (char *)out, hs, rs, dtype, &tf);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"encode_section", py_encode, METH_VARARGS,
     "encode_section(x, dtype, H, T, D, is_key, G, bits, codes, scales, mins[, sym]): quantize and pack (sym: symmetric per-token groups, no minimums written); False if x holds NaN, inf or |x| > 65504"},
    {"decode_section", py_decode, METH_VARARGS,
     "decode_section(codes, scales, mins, H, T, D, is_key, G, bits, out, head_stride, row_stride, dtype[, hadamard, cos, sin, rotary, sym, t0, src_T]): unpack, dequantize into out's rows of D (rows row_stride, heads head_stride elements apart: each head's rows in a run, or the heads of a row side by side), then undo the Hadamard rotation and redo RoPE (float32 [T, rotary] cos/sin tables) per row; sym: symmetric per-token groups (no minimums read); t0, src_T: only tokens [t0, t0 + T) of a section of src_T tokens per head"},
    {"store_rows", py_store, METH_VARARGS,
     "store_rows(src, H, T, D, src_head_stride, src_row_stride, out, head_stride, row_stride, dtype[, cos, sin, rotary]): float32 rows of D (strides in elements) -> out's rows in dtype, RoPE redone per row with float32 [T, rotary] cos/sin tables"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_codec",
                                    "kvpool's CPU codec loop", -1, methods};

PyMODINIT_FUNC PyInit__cpu_codec(void) {
    rows_init();
    return PyModule_Create(&module);
}
