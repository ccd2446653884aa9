/* The row helpers both C loops share (_cpu_codec.c, _cpu_attention.c): element conversions,
 * loading and storing rows of fp16/bf16/fp32, unpacking and dequantizing one packed row, and the
 * codec's transforms on one row (the Hadamard rotation, RoPE).
 *
 * Codes are packed row by row (a row = D codes of one head and token) in bit planes, planar:
 * byte j of a w-bit plane holds codes j, j + D/m, j + 2D/m ... (m = 8/w) at shifts 0, w, 2w ...
 *
 * Everything here is inlined into each file's multi-versioned entry points, so it gets each
 * clone's ISA. Compiled without -ffast-math: division and rounding are IEEE, as in the torch
 * reference. A file that includes this calls rows_init() once when its module loads.
 */
#ifndef KVPOOL_CPU_ROWS_H
#define KVPOOL_CPU_ROWS_H
#pragma GCC diagnostic ignored "-Wpsabi" /* vector helpers are always inlined: no ABI at stake */
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

/* ---- dequantize --------------------------------------------------------------------------- */

/* n groups' fp16 scales ps and minimums pm -> per-element s and m, each group `repeat`
 * elements wide; symmetric groups (pm NULL: no minimums) are offset by m = neg_half * s */
INLINE void widen_groups(const f16 *restrict ps, const f16 *restrict pm, int64_t n,
                         int64_t repeat, float neg_half, float *restrict s, float *restrict m) {
    for (int64_t g = 0; g < n; g++) {
        const float sg = (float)ps[g], mg = pm ? (float)pm[g] : sg * neg_half;
        for (int64_t i = 0; i < repeat; i++) {
            s[g * repeat + i] = sg;
            m[g * repeat + i] = mg;
        }
    }
}

/* widen_groups for groups with minimums */
INLINE void widen_params(const f16 *restrict ps, const f16 *restrict pm, int64_t n,
                         int64_t repeat, float *restrict s, float *restrict m) {
    widen_groups(ps, pm, n, repeat, 0.f, s, m);
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

/* 8 floats as one vector of gcc's vector extensions (each clone's widest fit: one AVX register,
 * two SSE ones), loaded and stored through memcpy: rows need no alignment */
typedef float f32x8 __attribute__((vector_size(32)));
INLINE f32x8 load8(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}
INLINE void store8(float *p, f32x8 v) { memcpy(p, &v, sizeof v); }

/* y <- H_D y / sqrt(D) (Sylvester order, orthonormal, its own inverse), D a power of two. The
 * butterflies over the low three index bits are an 8 x 8 product per 8 values, summed in the
 * order j = 0..7 as one vector of 8 sums; the higher ones add and subtract whole runs of 8 or
 * more, 8 at a time. The same sums in the same order as one element at a time: the same bits. */
INLINE void hadamard_row(float *restrict y, int64_t D) {
    const float norm = 1.0f / sqrtf((float)D);
    if (D % 8 == 0) {
        for (int64_t g = 0; g < D; g += 8) {
            f32x8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int j = 0; j < 8; j++) acc += load8(H8[j]) * y[g + j];
            store8(y + g, acc);
        }
        for (int64_t h = 8; h < D; h *= 2)
            for (int64_t i = 0; i < D; i += 2 * h)
                for (int64_t j = i; j < i + h; j += 8) {
                    f32x8 a = load8(y + j), b = load8(y + j + h);
                    store8(y + j, a + b);
                    store8(y + j + h, a - b);
                }
        for (int64_t i = 0; i < D; i += 8) store8(y + i, load8(y + i) * norm);
        return;
    }
    for (int64_t h = 1; h < D; h *= 2)
        for (int64_t i = 0; i < D; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float a = y[j], b = y[j + h];
                y[j] = a + b;
                y[j + h] = a - b;
            }
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

/* the CPU features the row helpers look for, once at import */
static void rows_init(void) {
#if X86_F16C
    __builtin_cpu_init();
    have_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
}

#endif /* KVPOOL_CPU_ROWS_H */
