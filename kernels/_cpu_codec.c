/* The CPU fast path of the codec: one pass per section, quantize+pack and unpack+dequantize.
 *
 * Where it stands: kvpool.kernels.cpu calls these on CPU tensors; they must give the same codes
 * as kvpool.kernels.reference (the spec), bit for bit, and tests check that they do.
 *
 * A section is one layer's keys or values, x: [H, T, D] contiguous, float16/bfloat16/float32
 * (decoded into [H, T, D] whose heads may be further apart: a slice of a longer sequence).
 *   keys   (is_key=1): groups of G tokens of one channel, scales/mins [H, T/G, D]
 *   values (is_key=0): groups of G channels of one token, scales/mins [H, T, D/G]
 * Codes are packed row by row (a row = D codes of one head and token) in bit planes, planar:
 * byte j of a w-bit plane holds codes j, j + D/m, j + 2D/m ... (m = 8/w) at shifts 0, w, 2w ...
 *
 * The functions take raw addresses (tensor.data_ptr()) and release the GIL while they run, so
 * Python threads can work on different sections at once. Built with gcc function
 * multi-versioning: AVX-512 / AVX2+F16C clones where the CPU has them, portable code otherwise.
 * Compiled without -ffast-math: division and rounding are IEEE, as in the torch reference.
 */
#pragma GCC diagnostic ignored "-Wpsabi" /* vector helpers are always inlined: no ABI at stake */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define X86_F16C 1
#include <immintrin.h>
#else
#define MULTIVERSION
#define X86_F16C 0
#endif
/* helpers are inlined into the multi-versioned entry points, so they get each clone's ISA */
#define INLINE static inline __attribute__((always_inline))

enum { DT_F16 = 1, DT_BF16 = 2, DT_F32 = 3 };
#define SCALE_EPS 5.9604644775390625e-08f /* 2^-24, the smallest positive fp16 */

typedef _Float16 f16;

/* ---- element conversions ------------------------------------------------------------------ */

INLINE float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even; inputs are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* fp32 -> fp16 bits, round to nearest even, saturating at +-65504; plain integer code so the
 * compiler vectorizes it on every ISA (gcc does not vectorize the _Float16 conversion) */
INLINE uint16_t f32_to_f16(float f) {
    uint32_t x, t_bits;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    x = x < 0x477fe000u ? x : 0x477fe000u; /* 65504 */
    uint32_t normal = (x - 0x38000000u + 0xfffu + ((x >> 13) & 1u)) >> 13;
    float t;
    memcpy(&t, &x, 4);
    t += 0.5f; /* below 2^-14: the fp16 subnormal step is the ulp of 0.5f */
    memcpy(&t_bits, &t, 4);
    uint32_t sub = t_bits - 0x3f000000u;
    return (uint16_t)(sign | (x < 0x38800000u ? sub : normal));
}

/* fp16 bits -> fp32, exact for finite values (inf and NaN come out as magnitudes beyond
 * 65504, which the encoder rejects); integer code so that it vectorizes everywhere */
INLINE float f16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)(h & 0x7fffu) << 13, sign = (uint32_t)(h & 0x8000u) << 16;
    float f;
    memcpy(&f, &bits, 4);
    f *= 0x1p112f; /* rebias the exponent; exact, subnormals included */
    memcpy(&bits, &f, 4);
    bits |= sign;
    memcpy(&f, &bits, 4);
    return f;
}

/* fp16 <-> fp32 rows with the F16C instructions (gcc does not vectorize these conversions
 * itself); used where the CPU has AVX2 and F16C, checked once at import. Same results as the
 * integer code above: round to nearest even, saturating at +-65504. */
static int have_f16c = 0;
#if X86_F16C
__attribute__((target("avx2,f16c"))) static void f16_row_to_f32(const uint16_t *s, int64_t n,
                                                                 float *d) {
    const int64_t whole = n & ~(int64_t)7;
    for (int64_t i = 0; i < whole; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (int64_t i = whole; i < n; i++) d[i] = f16_to_f32(s[i]);
}

__attribute__((target("avx2,f16c"))) static void f32_row_to_f16(const float *s, int64_t n,
                                                                 uint16_t *d) {
    const __m256 hi = _mm256_set1_ps(65504.f), lo = _mm256_set1_ps(-65504.f);
    const int64_t whole = n & ~(int64_t)7;
    for (int64_t i = 0; i < whole; i += 8) {
        __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(s + i), lo), hi);
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
    for (int64_t i = whole; i < n; i++) d[i] = f32_to_f16(s[i]);
}
#endif

INLINE void load_row(const void *src, int dtype, int64_t n, float *dst) {
#if X86_F16C
    if (dtype == DT_F16 && have_f16c) return f16_row_to_f32((const uint16_t *)src, n, dst);
#endif
    if (dtype == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == DT_F16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    }
}

INLINE void store_row(const float *src, int dtype, int64_t n, void *dst) {
#if X86_F16C
    if (dtype == DT_F16 && have_f16c) return f32_row_to_f16(src, n, (uint16_t *)dst);
#endif
    if (dtype == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == DT_F16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_f16(src[i]);
    } else {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    }
}

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
                           int64_t G, int bits, uint8_t *codes, f16 *scales, f16 *mins) {
    const int64_t esize = dtype == DT_F32 ? 4 : 2, row_bytes = D * bits / 8;
    const float qmax = (float)((1 << bits) - 1);
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
                for (int64_t i = 0; i < D; i++) {
                    group_params(lo[i], hi[i], qmax, ps + i, pm + i);
                    s[i] = (float)ps[i];
                    m[i] = (float)pm[i];
                }
            } else { /* groups of G channels in this one row */
                f16 *ps = scales + r0 * (D / G), *pm = mins + r0 * (D / G);
                for (int64_t g = 0; g < D / G; g++) {
                    float l, u;
                    minmax_span(buf + g * G, G, &l, &u);
                    group_params(l, u, qmax, ps + g, pm + g);
                    float sf = (float)ps[g], mf = (float)pm[g];
                    for (int64_t i = 0; i < G; i++) {
                        s[g * G + i] = sf;
                        m[g * G + i] = mf;
                    }
                }
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

/* ---- dequantize --------------------------------------------------------------------------- */

INLINE void widen_params(const f16 *restrict ps, const f16 *restrict pm, int64_t n,
                         int64_t repeat, float *restrict s, float *restrict m) {
    for (int64_t g = 0; g < n; g++)
        for (int64_t i = 0; i < repeat; i++) {
            s[g * repeat + i] = (float)ps[g];
            m[g * repeat + i] = (float)pm[g];
        }
}

/* unpack and dequantize one row in a single pass: y[i] = code_i * s_i + m_i, where s and m are
 * per element (scalar = 0) or one value for the whole row (scalar = 1: values whose group is
 * the whole head_dim). Codes are read straight from the bit planes (see pack_row). */
INLINE void decode_row(const uint8_t *restrict p, int64_t n, int bits, const float *restrict s,
                       const float *restrict m, int scalar, float *restrict y) {
    const float s0 = s[0], m0 = m[0];
#define DQ(c, i) ((float)(c) * (scalar ? s0 : s[i]) + (scalar ? m0 : m[i]))
    if (bits == 8) {
        for (int64_t i = 0; i < n; i++) y[i] = DQ(p[i], i);
    } else if (bits == 4) {
        int64_t q = n / 2;
        for (int64_t j = 0; j < q; j++) y[j] = DQ(p[j] & 15, j);
        for (int64_t j = 0; j < q; j++) y[q + j] = DQ(p[j] >> 4, q + j);
    } else if (bits == 2) {
        int64_t q = n / 4;
        for (int k = 0; k < 4; k++)
            for (int64_t j = 0; j < q; j++) y[k * q + j] = DQ((p[j] >> (2 * k)) & 3, k * q + j);
    } else { /* 3: code idx = kk * e + jj takes its low bits from the 2-bit plane, its high bit
              * from bit kk of byte jj of the 1-bit plane */
        int64_t q = n / 4, e = n / 8;
        const uint8_t *h = p + q;
        for (int kk = 0; kk < 8; kk++) {
            const uint8_t *lo = p + (kk % 2) * e;
            int shift = 2 * (kk / 2);
            for (int64_t jj = 0; jj < e; jj++) {
                int c = ((lo[jj] >> shift) & 3) | (((h[jj] >> kk) & 1) << 2);
                y[kk * e + jj] = DQ(c, kk * e + jj);
            }
        }
    }
#undef DQ
}

/* ---- the codec's transforms, fused into the row loop ---------------------------------------- */

/* the 8-point Hadamard matrix, Sylvester order: H8[j][i] = (-1)^popcount(i & j) */
static const float H8[8][8] = {
    {1, 1, 1, 1, 1, 1, 1, 1},     {1, -1, 1, -1, 1, -1, 1, -1}, {1, 1, -1, -1, 1, 1, -1, -1},
    {1, -1, -1, 1, 1, -1, -1, 1}, {1, 1, 1, 1, -1, -1, -1, -1}, {1, -1, 1, -1, -1, 1, -1, 1},
    {1, 1, -1, -1, -1, -1, 1, 1}, {1, -1, -1, 1, -1, 1, 1, -1},
};

/* y <- H_D y / sqrt(D) (Sylvester order, orthonormal, its own inverse), D a power of two. The
 * butterflies over the low three index bits are an 8 x 8 product per 8 values (vectorizes);
 * the higher ones add and subtract whole runs of 8 or more. */
INLINE void hadamard_row(float *restrict y, int64_t D) {
    int64_t h = 1;
    if (D % 8 == 0) {
        for (int64_t g = 0; g < D; g += 8) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < 8; i++) acc[i] += H8[j][i] * y[g + j];
            for (int i = 0; i < 8; i++) y[g + i] = acc[i];
        }
        h = 8;
    }
    for (; h < D; h *= 2)
        for (int64_t i = 0; i < D; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float a = y[j], b = y[j + h];
                y[j] = a + b;
                y[j + h] = a - b;
            }
    const float norm = 1.0f / sqrtf((float)D);
    for (int64_t i = 0; i < D; i++) y[i] *= norm;
}

/* RoPE on the first `rotary` channels of one row: y * cos + rotate_half(y) * sin * sign, with
 * cos/sin the row's [rotary] angles (each half repeated, as transforms.py builds them) */
INLINE void rope_row(float *restrict y, const float *restrict cos, const float *restrict sin,
                     int64_t rotary, float sign) {
    const int64_t half = rotary / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = y[i], b = y[i + half];
        y[i] = a * cos[i] - b * sin[i] * sign;
        y[i + half] = b * cos[i + half] + a * sin[i + half] * sign;
    }
}

typedef struct {
    int hadamard;      /* undo (= apply) the Hadamard rotation of each row */
    const float *cos;  /* redo RoPE: [T, rotary] tables, or NULL */
    const float *sin;
    int64_t rotary;
} Transforms;

INLINE void decode_impl(const uint8_t *codes, const f16 *scales, const f16 *mins, int64_t H,
                           int64_t T, int64_t D, int is_key, int64_t G, int bits, char *out,
                           int64_t head_stride, int64_t row_stride, int dtype,
                           const Transforms *tf) {
    const int64_t esize = dtype == DT_F32 ? 4 : 2, row_bytes = D * bits / 8;
    const int whole_row = !is_key && G == D; /* one scale and minimum per row */
    float *buf = malloc(sizeof(float) * (size_t)(3 * D));
    float *s = buf, *m = s + D, *tmp = m + D;
    for (int64_t r = 0; r < H * T; r++) {
        if (is_key && r % G == 0)
            widen_params(scales + (r / G) * D, mins + (r / G) * D, D, 1, s, m);
        else if (whole_row) {
            s[0] = (float)scales[r];
            m[0] = (float)mins[r];
        } else if (!is_key)
            widen_params(scales + r * (D / G), mins + r * (D / G), D / G, G, s, m);
        /* row r is token r % T of head r / T; heads and rows are head_stride / row_stride
         * elements apart */
        char *row = out + ((r / T) * head_stride + (r % T) * row_stride) * esize;
        /* float32 output is written in place; 16-bit output goes through one row of floats */
        float *y = dtype == DT_F32 ? (float *)row : tmp;
        if (whole_row)
            decode_row(codes + r * row_bytes, D, bits, s, m, 1, y);
        else
            decode_row(codes + r * row_bytes, D, bits, s, m, 0, y);
        if (tf->hadamard) hadamard_row(y, D);
        if (tf->cos) {
            const int64_t t = r % T;
            rope_row(y, tf->cos + t * tf->rotary, tf->sin + t * tf->rotary, tf->rotary, 1.0f);
        }
        if (dtype != DT_F32) store_row(y, dtype, D, row);
    }
    free(buf);
}

/* Entry points: one clone per ISA, with the common head dims as compile-time constants. */
MULTIVERSION
static int encode_section(const char *x, int dtype, int64_t H, int64_t T, int64_t D, int is_key,
                          int64_t G, int bits, uint8_t *codes, f16 *scales, f16 *mins) {
    switch (D) {
    case 64: return encode_impl(x, dtype, H, T, 64, is_key, G, bits, codes, scales, mins);
    case 128: return encode_impl(x, dtype, H, T, 128, is_key, G, bits, codes, scales, mins);
    default: return encode_impl(x, dtype, H, T, D, is_key, G, bits, codes, scales, mins);
    }
}

MULTIVERSION
static void decode_section(const uint8_t *codes, const f16 *scales, const f16 *mins, int64_t H,
                           int64_t T, int64_t D, int is_key, int64_t G, int bits, char *out,
                           int64_t hs, int64_t rs, int dtype, const Transforms *tf) {
    switch (D) {
    case 64:
        decode_impl(codes, scales, mins, H, T, 64, is_key, G, bits, out, hs, rs, dtype, tf);
        break;
    case 128:
        decode_impl(codes, scales, mins, H, T, 128, is_key, G, bits, out, hs, rs, dtype, tf);
        break;
    default: decode_impl(codes, scales, mins, H, T, D, is_key, G, bits, out, hs, rs, dtype, tf);
    }
}

/* ---- attention over packed rows (kernels/attention.py) ------------------------------------ */

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
    int dtype, is_key, bits;
    long long H, T, D, G;
    if (!PyArg_ParseTuple(args, "KiLLLiLiKKK", &x, &dtype, &H, &T, &D, &is_key, &G, &bits, &codes,
                          &scales, &mins))
        return NULL;
    if (!check_args(dtype, H, T, D, is_key, G, bits)) return NULL;
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = encode_section((const char *)x, dtype, H, T, D, is_key, G, bits, (uint8_t *)codes,
                   (f16 *)scales, (f16 *)mins);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(!bad);
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long codes, scales, mins, out;
    int dtype, is_key, bits;
    long long H, T, D, G, head_stride, row_stride, rotary = 0;
    int hadamard = 0;
    unsigned long long cos = 0, sin = 0;
    if (!PyArg_ParseTuple(args, "KKKLLLiLiKLLi|iKKL", &codes, &scales, &mins, &H, &T, &D, &is_key,
                          &G, &bits, &out, &head_stride, &row_stride, &dtype, &hadamard, &cos,
                          &sin, &rotary))
        return NULL;
    if (!check_args(dtype, H, T, D, is_key, G, bits)) return NULL;
    if (hadamard && (D & (D - 1)))
        return PyErr_SetString(PyExc_ValueError, "the Hadamard rotation needs a power-of-two D"),
               NULL;
    if (cos && (!sin || rotary <= 0 || rotary > D || rotary % 2))
        return PyErr_SetString(PyExc_ValueError, "bad RoPE tables"), NULL;
    const Transforms tf = {hadamard, cos ? (const float *)cos : NULL, (const float *)sin, rotary};
    if ((T > 1 && row_stride < D) || (H > 1 && head_stride < T * row_stride))
        return PyErr_SetString(PyExc_ValueError, "rows or heads would overlap"), NULL;
    Py_BEGIN_ALLOW_THREADS
    decode_section((const uint8_t *)codes, (const f16 *)scales, (const f16 *)mins, H, T, D, is_key,
                   G, bits, (char *)out, head_stride, row_stride, dtype, &tf);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

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
    {"encode_section", py_encode, METH_VARARGS,
     "encode_section(x, dtype, H, T, D, is_key, G, bits, codes, scales, mins): quantize and pack; False if x holds NaN, inf or |x| > 65504"},
    {"decode_section", py_decode, METH_VARARGS,
     "decode_section(codes, scales, mins, H, T, D, is_key, G, bits, out, head_stride, row_stride, dtype[, hadamard, cos, sin, rotary]): unpack, dequantize into out's rows of D (rows row_stride, heads head_stride elements apart), then undo the Hadamard rotation and redo RoPE (float32 [T, rotary] cos/sin tables) per row"},
    {"attend", py_attend, METH_VARARGS,
     "attend(keys, values, q, RQ, Q, t0, t1, skip, hadamard, acc, max, sum, exact, cos, sin, rotary, positions[, cosT, sinT, span, finish]): float32 attention of RQ = R x Q query rows per kv head over packed tokens t0..t1 (from skip on) and exact row segments: unnormalized acc, max and sum of exp per query row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_codec",
                                    "kvpool's CPU codec loop", -1, methods};

PyMODINIT_FUNC PyInit__cpu_codec(void) {
#if X86_F16C
    __builtin_cpu_init();
    have_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    return PyModule_Create(&module);
}
