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

/* Act-order weights, eight rows at a time, without gathers. A row's group of column i
 * is g_idx[i], the same for every row: so the eight rows' scales (offsets) of one column
 * are one contiguous vector of the block's transposed scales sT[g * 8 + lane]. The block is
 * computed column by column, lane = row: the eight rows' codes of eight columns are one
 * word per row (`bits` bytes), column k's codes a shift of every lane; then an 8x8
 * transpose turns the eight column vectors into the eight rows' runs. Same float32
 * multiply (and add) per weight as the row paths: the same bits. */
static inline __attribute__((always_inline)) __m256i row_words8(const uint8_t *p, int64_t row_bytes, int bits) {
    /* Scalar loads and an insert sequence: faster here than one vector gather. A run of
     * fewer than 4 bytes is read exactly (never past the end of the codes). */
    uint32_t q[8];
    for (int j = 0; j < 8; ++j) {
        const uint8_t *b = p + j * row_bytes;
        if (bits == 4) {
            memcpy(&q[j], b, 4);
            q[j] = __builtin_bswap32(q[j]);
        } else {
            uint32_t v = 0;
            for (int k = 0; k < bits; ++k) v |= (uint32_t)b[k] << (24 - 8 * k);
            q[j] = v;
        }
    }
    return _mm256_setr_epi32((int)q[0], (int)q[1], (int)q[2], (int)q[3], (int)q[4], (int)q[5], (int)q[6], (int)q[7]);
}

/* The 4x4 transposes within each 128-bit half: afterwards v[j] (j < 4) holds row j's
 * columns 0-3 in its low half and row j + 4's in its high half, v[j + 4] the same rows'
 * columns 4-7. */
static inline __attribute__((always_inline)) void transpose4x2(__m256 *v) {
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    v[0] = _mm256_shuffle_ps(t0, t2, 0x44);
    v[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    v[2] = _mm256_shuffle_ps(t1, t3, 0x44);
    v[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
    v[4] = _mm256_shuffle_ps(t4, t6, 0x44);
    v[5] = _mm256_shuffle_ps(t4, t6, 0xEE);
    v[6] = _mm256_shuffle_ps(t5, t7, 0x44);
    v[7] = _mm256_shuffle_ps(t5, t7, 0xEE);
}

/* The full 8x8 transpose: v[j] becomes row j's eight columns. */
static inline __attribute__((always_inline)) void transpose8(__m256 *v) {
    transpose4x2(v);
    const __m256 u0 = v[0], u1 = v[1], u2 = v[2], u3 = v[3], u4 = v[4], u5 = v[5], u6 = v[6], u7 = v[7];
    v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* Rows [r, r + 8) (bits <= 4, in_f % 8 == 0). sT/zT: (n_groups, 8) of this block. With
 * `int_table` (table[c] is the float of the integer t0 + c, bit for bit, as GPTQ's and
 * RTN's are) a code's value is one integer add and convert instead of permutes. */
static inline __attribute__((always_inline)) void block8_act_t(
    const uint8_t *codes, int bits, int64_t r, int64_t in_f, const float *table, const float *sT,
    const float *zT, const int32_t *g_idx, void *out, int64_t obase, int kind, int int_table) {
    const int64_t row_bytes = in_f / 8 * bits;
    const uint8_t *p = codes + (r * in_f / 8) * bits;
    float t16[16] = {0};
    memcpy(t16, table, (sizeof(float)) << bits);
    const __m256 tlo = _mm256_loadu_ps(t16), thi = _mm256_loadu_ps(t16 + 8);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const __m256i t0 = _mm256_set1_epi32(int_table ? (int)table[0] : 0);
    for (int64_t i = 0; i < in_f; i += 8, p += bits) {
        const __m256i w = row_words8(p, row_bytes, bits);
        __m256 v[8];
        for (int k = 0; k < 8; ++k) {
            const __m256i c = _mm256_and_si256(_mm256_srli_epi32(w, 32 - (k + 1) * bits), mask);
            const int64_t g = (int64_t)g_idx[i + k] * 8;
            const __m256 t = int_table ? _mm256_cvtepi32_ps(_mm256_add_epi32(c, t0)) : lookup8(c, bits, table, tlo, thi);
            v[k] = _mm256_mul_ps(t, _mm256_loadu_ps(sT + g));
            if (zT) v[k] = _mm256_add_ps(v[k], _mm256_loadu_ps(zT + g));
        }
        if (kind == OUT_F32) {
            /* float32: store the halves where they go instead of a third shuffle stage. */
            transpose4x2(v);
            float *o = (float *)out + obase + i;
            for (int j = 0; j < 4; ++j) {
                _mm_storeu_ps(o + j * in_f, _mm256_castps256_ps128(v[j]));
                _mm_storeu_ps(o + j * in_f + 4, _mm256_castps256_ps128(v[j + 4]));
                _mm_storeu_ps(o + (j + 4) * in_f, _mm256_extractf128_ps(v[j], 1));
                _mm_storeu_ps(o + (j + 4) * in_f + 4, _mm256_extractf128_ps(v[j + 4], 1));
            }
            continue;
        }
        transpose8(v);
        for (int j = 0; j < 8; ++j) store8(out, obase + j * in_f + i, kind, v[j]);
    }
}

#define BLK_KIND(B, K, I) block8_act_t(codes, B, r, in_f, table, sT, zT, g_idx, out, obase, K, I)
#define BLK_TAB(B, K)                               \
    do {                                            \
        if (int_table) BLK_KIND(B, K, 1);           \
        else BLK_KIND(B, K, 0);                     \
    } while (0)
#define BLK_BITS(B)                                         \
    do {                                                    \
        if (kind == OUT_F32) BLK_TAB(B, OUT_F32);           \
        else if (kind == OUT_BF16) BLK_TAB(B, OUT_BF16);    \
        else BLK_TAB(B, OUT_F16);                           \
    } while (0)

static void block8_act(const uint8_t *codes, int bits, int64_t r, int64_t in_f, const float *table,
                       const float *sT, const float *zT, const int32_t *g_idx, void *out, int64_t obase,
                       int kind, int int_table) {
    switch (bits) {
        case 1: BLK_BITS(1); break;
        case 2: BLK_BITS(2); break;
        case 3: BLK_BITS(3); break;
        default: BLK_BITS(4); break;
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
    /* Act-order, vector path, bits <= 4: blocks of eight rows without gathers (block8_act);
     * the rows after the last whole block go through the row paths below. */
    const int blocks = vector && g_idx && bits <= 4 ? (int)((r1 - r0) / 8) : 0;
    const int64_t r_rows = r0 + 8 * (int64_t)blocks;
    /* Whether table[c] is exactly the float of t0 + c for an integer t0 (bit patterns
     * compared: a -0.0 entry is not the integer 0's +0.0). */
    int int_table = blocks && table[0] == (float)(int)table[0] && table[0] >= -256.0f && table[0] <= 256.0f;
    for (int c = 0; int_table && c < (1 << bits); ++c)
        int_table = f32_bits(table[c]) == f32_bits((float)((int)table[0] + c));
#pragma omp parallel num_threads(threads)
    {
#ifdef __AVX2__
        if (blocks) {
            float *sT = (float *)malloc((size_t)n_groups * 8 * sizeof(float));
            float *zT = zeros && sT ? (float *)malloc((size_t)n_groups * 8 * sizeof(float)) : 0;
            const int ok = sT && (!zeros || zT);
#pragma omp for schedule(static)
            for (int b = 0; b < blocks; ++b) {
                const int64_t r = r0 + 8 * (int64_t)b, obase = (r - r0) * in_f;
                if (!ok) { /* no memory for the block's scales: its rows one by one, same bits */
                    for (int64_t rr = r; rr < r + 8; ++rr)
                        row_avx2(codes, bits, rr, in_f, table, scales + rr * n_groups,
                                 zeros ? zeros + rr * n_groups : 0, g_idx, n_groups, group, out,
                                 (rr - r0) * in_f, kind);
                    continue;
                }
                for (int64_t g = 0; g < n_groups; ++g)
                    for (int j = 0; j < 8; ++j) {
                        sT[g * 8 + j] = scales[(r + j) * n_groups + g];
                        if (zT) zT[g * 8 + j] = zeros[(r + j) * n_groups + g];
                    }
                block8_act(codes, bits, r, in_f, table, sT, zT, g_idx, out, obase, kind, int_table);
            }
            free(sT);
            free(zT);
        }
#endif
        /* Without memory for the table a thread keeps the per-weight path: same bits. */
        float *gt = use_gt && r_rows < r1 ? (float *)malloc((size_t)gt_len * sizeof(float)) : 0;
#pragma omp for schedule(static)
        for (int64_t r = r_rows; r < r1; ++r) {
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
