/* LutFormat materialization on CPU: codes -> table -> per-group scale (and offset).
 *
 * The arithmetic is exactly lqmod.kernels.reference.materialize_lut's, so that the result is
 * bit for bit the torch reference's: one float32 multiply table[code] * scale, then (with
 * offsets) one float32 add, then a round-to-nearest-even cast to the output type. The file
 * must be compiled with -ffp-contract=off: a fused multiply-add would round once instead of
 * twice and change the last bit.
 *
 * No torch headers: the library is plain C called through ctypes with data pointers, so it
 * compiles in about a second with any C compiler and needs neither ninja nor pybind11.
 * Rows are shared between threads with OpenMP; loaded into a process that already holds
 * torch's libgomp.so.1, it uses torch's OpenMP runtime and thread count.
 *
 * Codes are a most-significant-bit-first stream (lqmod.packing): code i occupies bits
 * [i*bits, (i+1)*bits) counted from the top bit of byte 0. Eight consecutive codes starting
 * at a multiple of 8 always start on a byte and fill exactly `bits` bytes: the vector path
 * decodes such runs of eight, the scalar path any code anywhere.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

static inline uint32_t f32_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

/* torch's float -> bfloat16 (c10::round_to_nearest_even): NaN becomes 0x7FC0. */
static inline uint16_t to_bf16(float v) {
    if (v != v) return 0x7FC0;
    uint32_t u = f32_bits(v);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* IEEE binary16 round-to-nearest-even, subnormals included (as c10::Half and F16C). */
static inline uint16_t to_f16(float v) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    _Float16 h = (_Float16)v;
    uint16_t r;
    memcpy(&r, &h, 2);
    return r;
#endif
}

static inline void store_one(void *out, int64_t i, int kind, float v) {
    if (kind == OUT_F32) ((float *)out)[i] = v;
    else if (kind == OUT_BF16) ((uint16_t *)out)[i] = to_bf16(v);
    else ((uint16_t *)out)[i] = to_f16(v);
}

static inline uint32_t code_at(const uint8_t *codes, int64_t nbytes, int64_t i, int bits) {
    int64_t pos = i * bits;
    int64_t byte = pos >> 3;
    int off = (int)(pos & 7);
    uint32_t w = (uint32_t)codes[byte] << 8;
    if (off + bits > 8 && byte + 1 < nbytes) w |= codes[byte + 1];
    return (w >> (16 - off - bits)) & ((1u << bits) - 1u);
}

/* One row, any layout: the oracle-shaped loop the vector path must agree with. */
static void row_scalar(const uint8_t *codes, int64_t nbytes, int bits, int64_t r, int64_t in_f,
                       const float *table, const float *srow, const float *zrow,
                       const int32_t *g_idx, int64_t group, void *out, int64_t obase, int kind) {
    int64_t start = r * in_f;
    for (int64_t i = 0; i < in_f; ++i) {
        int64_t g = g_idx ? (int64_t)g_idx[i] : i / group;
        float v = table[code_at(codes, nbytes, start + i, bits)] * srow[g];
        if (zrow) v = v + zrow[g];
        store_one(out, obase + i, kind, v);
    }
}

/* Act-order rows through a per-row table of every (group, code) value: entry
 * (g << bits) | c is table[c] * srow[g] (+ zrow[g]), the very float32 operations the
 * per-weight path does, so the weights are the same bits; each weight is then one lookup
 * instead of a table lookup and two scattered group loads. */
static void fill_group_table(float *gt, int bits, const float *table, const float *srow, const float *zrow,
                             int64_t n_groups) {
    const int64_t n = (int64_t)1 << bits;
    for (int64_t g = 0; g < n_groups; ++g)
        for (int64_t c = 0; c < n; ++c) {
            float v = table[c] * srow[g];
            if (zrow) v = v + zrow[g];
            gt[(g << bits) | c] = v;
        }
}

static void row_scalar_gt(const uint8_t *codes, int64_t nbytes, int bits, int64_t r, int64_t in_f,
                          const float *gt, const int32_t *g_idx, void *out, int64_t obase, int kind) {
    int64_t start = r * in_f;
    for (int64_t i = 0; i < in_f; ++i)
        store_one(out, obase + i, kind, gt[((int64_t)g_idx[i] << bits) | code_at(codes, nbytes, start + i, bits)]);
}

#ifdef __AVX2__
static inline __attribute__((always_inline)) void store8(void *out, int64_t i, int kind, __m256 v) {
    if (kind == OUT_F32) {
        _mm256_storeu_ps((float *)out + i, v);
    } else if (kind == OUT_F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
        __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_castsi256_si128(packed));
    }
}

/* The eight codes of a byte-aligned run, as int32 lanes in stream order. */
static inline __attribute__((always_inline)) __m256i codes8(const uint8_t *p, int bits) {
    if (bits == 8) {
        int64_t q;
        memcpy(&q, p, 8);
        return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(q));
    }
    /* bits <= 4: the run is `bits` bytes; as a big-endian word its code j sits at bit
     * 32 - (j + 1) * bits. */
    uint32_t w = 0;
    if (bits == 4) {
        memcpy(&w, p, 4);
        w = __builtin_bswap32(w);
    } else {
        for (int k = 0; k < bits; ++k) w |= (uint32_t)p[k] << (24 - 8 * k);
    }
    const __m256i shifts = _mm256_setr_epi32(32 - bits, 32 - 2 * bits, 32 - 3 * bits, 32 - 4 * bits,
                                             32 - 5 * bits, 32 - 6 * bits, 32 - 7 * bits, 32 - 8 * bits);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), shifts),
                            _mm256_set1_epi32((1 << bits) - 1));
}

static inline __attribute__((always_inline)) __m256 lookup8(__m256i idx, int bits, const float *table,
                                                             __m256 tlo, __m256 thi) {
    if (bits <= 3) return _mm256_permutevar8x32_ps(tlo, idx);
    if (bits == 4) {
        /* Two 8-entry permutes; bit 3 of the code (moved to the sign bit) picks one. */
        __m256 lo = _mm256_permutevar8x32_ps(tlo, idx), hi = _mm256_permutevar8x32_ps(thi, idx);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
    return _mm256_i32gather_ps(table, idx, 4);
}

/* One row whose start is a multiple of 8 codes and whose length is a multiple of 8.
 * Inlined into one copy per bit width (see row_avx2), so shifts and branches on `bits`
 * and `kind` are constants; the group's scale is loaded once per group, not per run. */
static inline __attribute__((always_inline)) void row_avx2_t(
    const uint8_t *codes, int bits, int64_t r, int64_t in_f, const float *table, const float *srow,
    const float *zrow, const int32_t *g_idx, int64_t n_groups, int64_t group, void *out, int64_t obase, int kind) {
    const uint8_t *p = codes + (r * in_f / 8) * bits;
    float t16[16] = {0};
    if (bits <= 4) memcpy(t16, table, (sizeof(float)) << bits);
    const __m256 tlo = _mm256_loadu_ps(t16), thi = _mm256_loadu_ps(t16 + 8);
    if (g_idx && n_groups > 16) {
        for (int64_t i = 0; i < in_f; i += 8, p += bits) {
            __m256i g = _mm256_loadu_si256((const __m256i *)(g_idx + i));
            __m256 v = _mm256_mul_ps(lookup8(codes8(p, bits), bits, table, tlo, thi), _mm256_i32gather_ps(srow, g, 4));
            if (zrow) v = _mm256_add_ps(v, _mm256_i32gather_ps(zrow, g, 4));
            store8(out, obase + i, kind, v);
        }
        return;
    }
    if (g_idx) {
        /* At most 16 groups: a row's scales and offsets fit two registers each, and a
         * column's group picks its lane by permutes instead of gathers. */
        float s16[16] = {0}, z16[16] = {0};
        memcpy(s16, srow, sizeof(float) * (size_t)n_groups);
        if (zrow) memcpy(z16, zrow, sizeof(float) * (size_t)n_groups);
        const __m256 slo = _mm256_loadu_ps(s16), shi = _mm256_loadu_ps(s16 + 8);
        const __m256 zlo = _mm256_loadu_ps(z16), zhi = _mm256_loadu_ps(z16 + 8);
        for (int64_t i = 0; i < in_f; i += 8, p += bits) {
            __m256i g = _mm256_loadu_si256((const __m256i *)(g_idx + i));
            __m256 v = _mm256_mul_ps(lookup8(codes8(p, bits), bits, table, tlo, thi), lookup8(g, 4, srow, slo, shi));
            if (zrow) v = _mm256_add_ps(v, lookup8(g, 4, zrow, zlo, zhi));
            store8(out, obase + i, kind, v);
        }
        return;
    }
    for (int64_t g0 = 0, g = 0; g0 < in_f; g0 += group, ++g) {
        int64_t end = g0 + group < in_f ? g0 + group : in_f;
        const __m256 s = _mm256_set1_ps(srow[g]);
        const __m256 z = zrow ? _mm256_set1_ps(zrow[g]) : _mm256_setzero_ps();
        for (int64_t i = g0; i < end; i += 8, p += bits) {
            __m256 v = _mm256_mul_ps(lookup8(codes8(p, bits), bits, table, tlo, thi), s);
            if (zrow) v = _mm256_add_ps(v, z);
            store8(out, obase + i, kind, v);
        }
    }
}

/* An act-order row (start and length multiples of 8 codes) through the group table. */
static inline __attribute__((always_inline)) void row_avx2_gt_t(
    const uint8_t *codes, int bits, int64_t r, int64_t in_f, const float *gt, const int32_t *g_idx,
    void *out, int64_t obase, int kind) {
    const uint8_t *p = codes + (r * in_f / 8) * bits;
    for (int64_t i = 0; i < in_f; i += 8, p += bits) {
        __m256i g = _mm256_loadu_si256((const __m256i *)(g_idx + i));
        __m256i idx = _mm256_or_si256(_mm256_slli_epi32(g, bits), codes8(p, bits));
        store8(out, obase + i, kind, _mm256_i32gather_ps(gt, idx, 4));
    }
}

#define GT_KIND(B, K) row_avx2_gt_t(codes, B, r, in_f, gt, g_idx, out, obase, K)
#define GT_BITS(B)                                          \
    do {                                                    \
        if (kind == OUT_F32) GT_KIND(B, OUT_F32);           \
        else if (kind == OUT_BF16) GT_KIND(B, OUT_BF16);    \
        else GT_KIND(B, OUT_F16);                           \
    } while (0)

static void row_avx2_gt(const uint8_t *codes, int bits, int64_t r, int64_t in_f, const float *gt,
                        const int32_t *g_idx, void *out, int64_t obase, int kind) {
    switch (bits) {
        case 1: GT_BITS(1); break;
        case 2: GT_BITS(2); break;
        case 3: GT_BITS(3); break;
        case 4: GT_BITS(4); break;
        default: GT_BITS(8); break;
    }
}

#define ROW_KIND(B, K) row_avx2_t(codes, B, r, in_f, table, srow, zrow, g_idx, n_groups, group, out, obase, K)
#define ROW_BITS(B)                                           \
    do {                                                      \
        if (kind == OUT_F32) ROW_KIND(B, OUT_F32);            \
        else if (kind == OUT_BF16) ROW_KIND(B, OUT_BF16);     \
        else ROW_KIND(B, OUT_F16);                            \
    } while (0)

static void row_avx2(const uint8_t *codes, int bits, int64_t r, int64_t in_f, const float *table,
                     const float *srow, const float *zrow, const int32_t *g_idx, int64_t n_groups, int64_t group,
                     void *out, int64_t obase, int kind) {
    switch (bits) {
        case 1: ROW_BITS(1); break;
        case 2: ROW_BITS(2); break;
        case 3: ROW_BITS(3); break;
        case 4: ROW_BITS(4); break;
        default: ROW_BITS(8); break;
    }
}
#endif

int lqmod_lut_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

/* Rows [r0, r1) of the (out_f, in_f) weight into `out` (row-major, (r1 - r0) x in_f).
 * scales/zeros: float32 (out_f, n_groups) row-major; zeros and g_idx may be NULL.
 * Returns 0, or a negative number for arguments it refuses. */
int lqmod_lut_materialize(const uint8_t *codes, int64_t nbytes, int bits, int64_t in_f, int64_t r0,
                          int64_t r1, const float *table, const float *scales, const float *zeros,
                          int64_t n_groups, const int32_t *g_idx, int64_t group, void *out, int kind,
                          int threads) {
    if (bits < 1 || bits > 8 || in_f <= 0 || r0 < 0 || r1 < r0 || group <= 0 || kind < 0 || kind > 2)
        return -1;
    if (nbytes * 8 < r1 * in_f * bits) return -2;
    /* One pass over in_f entries: an act-order index out of range would read out of bounds. */
    if (g_idx)
        for (int64_t i = 0; i < in_f; ++i)
            if (g_idx[i] < 0 || g_idx[i] >= n_groups) return -3;
    int vector = 0;
#ifdef __AVX2__
    vector = in_f % 8 == 0 && (bits <= 4 || bits == 8) && (g_idx || group % 8 == 0);
#endif
    /* Act-order rows with few groups look their group up by permutes (row_avx2_t); with
     * more, through a per-row table of every (group, code) value when building it (2^bits
     * values per group) costs less than the row it serves; otherwise weight by weight. */
    const int permuted = vector && g_idx && n_groups <= 16;
    if (threads < 1) threads = 1;
    /* Small weights are not worth waking a second thread for. */
    if ((r1 - r0) * in_f < (1 << 15)) threads = 1;
    const int64_t gt_len = g_idx ? n_groups << bits : 0;
    const int use_gt = g_idx && !permuted && gt_len <= in_f;
#pragma omp parallel num_threads(threads)
    {
        /* Without memory for the table a thread keeps the per-weight path: same bits. */
        float *gt = use_gt ? (float *)malloc((size_t)gt_len * sizeof(float)) : 0;
#pragma omp for schedule(static)
        for (int64_t r = r0; r < r1; ++r) {
            const float *srow = scales + r * n_groups;
            const float *zrow = zeros ? zeros + r * n_groups : 0;
            int64_t obase = (r - r0) * in_f;
            if (gt) {
                fill_group_table(gt, bits, table, srow, zrow, n_groups);
#ifdef __AVX2__
                if (vector) {
                    row_avx2_gt(codes, bits, r, in_f, gt, g_idx, out, obase, kind);
                    continue;
                }
#endif
                row_scalar_gt(codes, nbytes, bits, r, in_f, gt, g_idx, out, obase, kind);
                continue;
            }
#ifdef __AVX2__
            if (vector) {
                row_avx2(codes, bits, r, in_f, table, srow, zrow, g_idx, n_groups, group, out, obase, kind);
                continue;
            }
#endif
            row_scalar(codes, nbytes, bits, r, in_f, table, srow, zrow, g_idx, group, out, obase, kind);
        }
        free(gt);
    }
    return 0;
}
