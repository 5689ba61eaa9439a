/* All routed experts of one MoE layer in one call: int4 weights x int8 activations (AVX-512 VNNI, AVX2).

   offload_moe/quant/moe_kernel.py builds this file (offload_moe.quant.native) and calls it
   through ctypes; see that module for the contract. Like llama.cpp's mul_mat_id, one call
   computes every expert of the layer for all the tokens routed to it: gate_up matmul, gate
   function, down matmul, routing weight and the combine, in ascending expert order, with the
   work spread by OpenMP over (expert, block of output rows) items, so that each expert's
   weights are read once per call whatever its token count.

   Weights are the prepared int4 CPU layout (offload_moe/quant/int4_layout.py): per block of
   BLOCK_N output rows (64: the AVX-512 variant, 32: AVX2) a [K, BLOCK_N / 2] byte array, byte
   (k, j) = row j's code | row j + BLOCK_N / 2's code << 4; bf16 (S, Z) [K / group, N, 2] with
   w = (q - 8) * S + Z. The arithmetic is int4_gemv.c's (read the comment at its top):
   activations rounded to int8 in blocks of 32 with one fp32 scale each, and per group
       y += S_g * sum_{b in g} dx_b * sum_{k in b} q_k * xq_k  +  (Z_g - 8 S_g) * sx_g
   with sx_g the sum of the *rounded* inputs of group g: the exact product of the dequantized
   weights with the int8-rounded inputs, up to fp32 summation order.

   Two loops per (expert, row block) item, chosen by the expert's token count against
   `tile_min` (measured on the running CPU by moe_kernel.py):
   - direct: per token, nibbles unpacked from the packed codes as they are read (the GEMV);
   - tiled (many tokens, the GEMM path): the block's nibbles are unpacked once into a per-thread
     buffer already in the dot-product order, then read back for each tile of tokens, each
     weight vector feeding the dot products of the whole tile held in registers.

   Expanded groups (hqq2, group 16): the prepared matrix has 2K input columns, each real group of
   16 followed by 16 zero codes; the activation quantizer writes that expanded int8 vector
   directly (16 codes, 16 zeros per block of 32). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define XBLOCK 32
#define AVX512 "avx512f,avx512bw,avx512vnni,avx512vbmi,fma"
#define AVX2 "avx2,fma"
#define TILE_512 8  /* tokens per register tile: 3 x 8 accumulators of 32 zmm registers */
#define TILE_256 4  /* 3 x 4 accumulators of 16 ymm registers */
#define PTRS_PER_EXPERT 6  /* gate_up qweight, gate_up sz, down qweight, down sz, gate_up bias, down bias */

enum gate_kind { SILU_MUL, GELU_TANH_MUL, GELU_MUL, RELU, GELU, GELU_TANH, SWIGLU_OAI };

/* Which variants this CPU runs: bit 0 the AVX-512 one (BLOCK_N 64), bit 1 the AVX2 one (BLOCK_N 32). */
int moe_supported(void) {
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return (avx512 ? 1 : 0) | (avx2 ? 2 : 0);
}

/* One matrix as the kernel reads it: K kernel input columns (2x the real ones when expanded),
   N output rows, the kernel group (32 when expanded). */
typedef struct { int64_t K, N, group; } mat_t;

/* One row of n real inputs -> int8 codes xq [K'], block scales dx [K' / 32], group sums sx [K' / group]
   of the kernel's input; `expanded`: 16 real inputs then 16 zero codes per block. */
static void quantize_row(const float *x, int64_t n, int expanded, int64_t group, int8_t *xq, float *dx, float *sx) {
    int per_block = expanded ? XBLOCK / 2 : XBLOCK;
    int64_t blocks = n / per_block;
    for (int64_t b = 0; b < blocks; b++) {
        const float *xb = x + b * per_block;
        int8_t *qb = xq + b * XBLOCK;
        float amax = 0.0f;
        for (int i = 0; i < per_block; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;  /* not fmaxf: a library call without -ffast-math */
        }
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t codes = 0;
        for (int i = 0; i < per_block; i++) {  /* cvtss2si rounds to nearest even, as lrintf (inlined) */
            qb[i] = (int8_t)_mm_cvtss_si32(_mm_set_ss(xb[i] * inv));
            codes += qb[i];
        }
        for (int i = per_block; i < XBLOCK; i++) qb[i] = 0;
        dx[b] = amax / 127.0f;
        sx[b] = dx[b] * (float)codes;  /* per block first, summed per group below */
    }
    int64_t per_group = group / XBLOCK;
    for (int64_t g = 0; g < blocks / per_group; g++) {  /* the sums of the int8-rounded inputs */
        float s = 0.0f;
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) s += sx[b];
        sx[g] = s;  /* g <= b: overwrites only block sums already added */
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512, 64-row blocks                                                                       */

/* Byte indices for vpermt2b: from A = codes of (k, k+1) and B = codes of (k+2, k+3) (32 rows each),
   lanes of rows j0..j0+15 each holding (k, k+1, k+2, k+3). */
__attribute__((target(AVX512))) static __m512i interleave_index(int j0) {
    uint8_t idx[64];
    for (int jj = 0; jj < 16; jj++) {
        idx[4 * jj + 0] = (uint8_t)(j0 + jj);
        idx[4 * jj + 1] = (uint8_t)(32 + j0 + jj);
        idx[4 * jj + 2] = (uint8_t)(64 + j0 + jj);
        idx[4 * jj + 3] = (uint8_t)(96 + j0 + jj);
    }
    return _mm512_loadu_si512(idx);
}

/* The 4 dot-product vectors of inputs k..k+3: v[r] = rows 16r..16r+15, one row's 4 codes per lane. */
__attribute__((target(AVX512), always_inline)) static inline void unpack_quad_64(const uint8_t *codes, int64_t k,
                                                                                __m512i idx_lo, __m512i idx_hi,
                                                                                __m512i v[4]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512i a = _mm512_loadu_si512(codes + k * 32), c = _mm512_loadu_si512(codes + (k + 2) * 32);
    __m512i a_lo = _mm512_and_si512(a, low), c_lo = _mm512_and_si512(c, low);
    __m512i a_hi = _mm512_and_si512(_mm512_srli_epi16(a, 4), low);
    __m512i c_hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
    v[0] = _mm512_permutex2var_epi8(a_lo, idx_lo, c_lo);
    v[1] = _mm512_permutex2var_epi8(a_lo, idx_hi, c_lo);
    v[2] = _mm512_permutex2var_epi8(a_hi, idx_lo, c_hi);
    v[3] = _mm512_permutex2var_epi8(a_hi, idx_hi, c_hi);
}

/* (S, Z) of rows 16r..16r+15 of group g -> S and Z - 8 S, one row per lane. */
__attribute__((target(AVX512), always_inline)) static inline void params_64(const uint16_t *sz, int64_t N, int64_t g,
                                                                           int r, __m512 *scale, __m512 *zc) {
    __m512i pairs = _mm512_loadu_si512(sz + 2 * (g * N + 16 * r));  /* 16 (S, Z) bf16 pairs */
    *scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xFFFF0000u)));
    *zc = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), *scale, zero);
}

/* The direct loop: y [64] = one block times one token, codes unpacked as read. Every loop here
   does the same fp32 operations in the same order, y += float(int dot of block b) * (S_g dx_b)
   then y += (Z_g - 8 S_g) sx_g per group, so the direct and tiled loops agree bit for bit. */
__attribute__((target(AVX512)))
static void direct_64(const uint8_t *codes, const uint16_t *sz, mat_t m, const int8_t *xq, const float *dx,
                      const float *sx, float *y) {
    const __m512i idx_lo = interleave_index(0), idx_hi = interleave_index(16);
    __m512 yv[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512 scale, zc;
    for (int64_t g = 0; g < m.K / m.group; g++) {
        for (int64_t b = g * (m.group / XBLOCK); b < (g + 1) * (m.group / XBLOCK); b++) {
            __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                              _mm512_setzero_si512()};
            for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 4) {
                __m512i v[4];
                unpack_quad_64(codes, k, idx_lo, idx_hi, v);
                int32_t x4;
                memcpy(&x4, xq + k, 4);
                __m512i xv = _mm512_set1_epi32(x4);
                for (int r = 0; r < 4; r++) acc[r] = _mm512_dpbusd_epi32(acc[r], v[r], xv);
            }
            __m512 d = _mm512_set1_ps(dx[b]);
            for (int r = 0; r < 4; r++) {
                params_64(sz, m.N, g, r, &scale, &zc);
                yv[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_mul_ps(scale, d), yv[r]);
            }
        }
        __m512 s = _mm512_set1_ps(sx[g]);
        for (int r = 0; r < 4; r++) {
            params_64(sz, m.N, g, r, &scale, &zc);
            yv[r] = _mm512_fmadd_ps(zc, s, yv[r]);
        }
    }
    for (int r = 0; r < 4; r++) _mm512_storeu_ps(y + 16 * r, yv[r]);
}

/* The block's codes unpacked once: buf [4][K / 4][64] bytes, quarter r holding rows 16r..16r+15. */
__attribute__((target(AVX512))) static void unpack_block_64(const uint8_t *codes, int64_t K, uint8_t *buf) {
    const __m512i idx_lo = interleave_index(0), idx_hi = interleave_index(16);
    for (int64_t k = 0; k < K; k += 4) {
        __m512i v[4];
        unpack_quad_64(codes, k, idx_lo, idx_hi, v);
        for (int r = 0; r < 4; r++) _mm512_storeu_si512(buf + (r * (K / 4) + k / 4) * 64, v[r]);
    }
}

/* A tile of nt <= 8 quantized tokens interleaved for the tiled loops: xt [K / 4][8] 32-bit words
   (token i's inputs 4k'..4k'+3 at word (k', i)), dxt [K / 32][8] block scales, sxt [K / 32][8]
   group sums, so that the loops broadcast every token's values from one base pointer. */
typedef struct { int32_t *xt; float *dxt, *sxt; } tile_in_t;

#define REP8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define REP4(X) X(0) X(1) X(2) X(3)

/* The tiled loop: y[i] [64] for nt <= TILE_512 tokens from the unpacked block; each weight vector
   is loaded once for the nt dot products. Inlined with a constant nt, the tile stays in named
   registers (arrays indexed in loops end up on the stack). */
__attribute__((target(AVX512), always_inline))
static inline void tile_64(const uint8_t *buf, const uint16_t *sz, mat_t m, const int nt, tile_in_t in,
                           float *const *y) {
    for (int r = 0; r < 4; r++) {
        const uint8_t *w = buf + r * (m.K / 4) * 64;
        __m512 scale, zc;
#define DECL(i) __m512 y##i = _mm512_setzero_ps();
        REP8(DECL)
#undef DECL
        for (int64_t g = 0; g < m.K / m.group; g++) {
            params_64(sz, m.N, g, r, &scale, &zc);
            for (int64_t b = g * (m.group / XBLOCK); b < (g + 1) * (m.group / XBLOCK); b++) {
#define DECL(i) __m512i a##i = _mm512_setzero_si512();
                REP8(DECL)
#undef DECL
                const uint8_t *wb = w + b * XBLOCK * 16;
                const int32_t *xb = in.xt + b * (XBLOCK / 4) * 8;
                #pragma GCC unroll 8
                for (int kk = 0; kk < XBLOCK / 4; kk++) {  /* a constant trip count: unrolled, no copies */
                    __m512i wv = _mm512_loadu_si512(wb + kk * 64);
                    const int32_t *xk = xb + kk * 8;
#define DOT(i) if (nt > i) a##i = _mm512_dpbusd_epi32(a##i, wv, _mm512_set1_epi32(xk[i]));
                    REP8(DOT)
#undef DOT
                }
                const float *d = in.dxt + b * 8;
#define FLUSH(i) if (nt > i) \
    y##i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##i), _mm512_mul_ps(scale, _mm512_set1_ps(d[i])), y##i);
                REP8(FLUSH)
#undef FLUSH
            }
            const float *s = in.sxt + g * 8;
#define GROUP(i) if (nt > i) y##i = _mm512_fmadd_ps(zc, _mm512_set1_ps(s[i]), y##i);
            REP8(GROUP)
#undef GROUP
        }
#define STORE(i) if (nt > i) _mm512_storeu_ps(y[i] + 16 * r, y##i);
        REP8(STORE)
#undef STORE
    }
}

__attribute__((target(AVX512)))
static void tile_64_n(const uint8_t *buf, const uint16_t *sz, mat_t m, int nt, tile_in_t in, float *const *y) {
    switch (nt) {  /* a constant tile size per case: the compiler keeps the tile in registers */
    case 8: tile_64(buf, sz, m, 8, in, y); break;
    case 7: tile_64(buf, sz, m, 7, in, y); break;
    case 6: tile_64(buf, sz, m, 6, in, y); break;
    case 5: tile_64(buf, sz, m, 5, in, y); break;
    case 4: tile_64(buf, sz, m, 4, in, y); break;
    case 3: tile_64(buf, sz, m, 3, in, y); break;
    case 2: tile_64(buf, sz, m, 2, in, y); break;
    default: tile_64(buf, sz, m, 1, in, y); break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX2, 32-row blocks                                                                          */

/* The 4 dot-product vectors of inputs k..k+3: v[q] holds rows 4q..4q+3 (lane 0) and
   16+4q..16+4q+3 (lane 1), one row's 4 codes per 32-bit lane (see int4_gemv.c's block_dot_32). */
__attribute__((target(AVX2), always_inline)) static inline void unpack_quad_32(const uint8_t *codes, int64_t k,
                                                                              __m256i v[4]) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i nibble = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    __m256i r[4];
    for (int i = 0; i < 4; i++) {
        __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(codes + (k + i) * 16)));
        r[i] = _mm256_and_si256(_mm256_srlv_epi32(both, nibble), low);
    }
    __m256i u01l = _mm256_unpacklo_epi8(r[0], r[1]), u01h = _mm256_unpackhi_epi8(r[0], r[1]);
    __m256i u23l = _mm256_unpacklo_epi8(r[2], r[3]), u23h = _mm256_unpackhi_epi8(r[2], r[3]);
    v[0] = _mm256_unpacklo_epi16(u01l, u23l);
    v[1] = _mm256_unpackhi_epi16(u01l, u23l);
    v[2] = _mm256_unpacklo_epi16(u01h, u23h);
    v[3] = _mm256_unpackhi_epi16(u01h, u23h);
}

/* (S, Z) of rows 4q..4q+3 and 16+4q..16+4q+3 of group g -> scale, Z - 8 S, in v[q]'s lane order. */
__attribute__((target(AVX2), always_inline)) static inline void params_32(const uint16_t *sz, int64_t N, int64_t g,
                                                                         int q, __m256 *scale, __m256 *zc) {
    const __m256i bf16_high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256i pairs = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(sz + 2 * (g * N + 16 + 4 * q))),
                                     _mm_loadu_si128((const __m128i *)(sz + 2 * (g * N + 4 * q))));
    *scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    *zc = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), *scale, _mm256_castsi256_ps(_mm256_and_si256(pairs, bf16_high)));
}

__attribute__((target(AVX2), always_inline)) static inline void store_32(float *y, int q, __m256 v) {
    _mm_storeu_ps(y + 4 * q, _mm256_castps256_ps128(v));
    _mm_storeu_ps(y + 16 + 4 * q, _mm256_extractf128_ps(v, 1));
}

/* The direct loop: y [32] = one block times one token. Products by vpmaddubsw (pairs, at most
   2 * 15 * 127: no saturation), summed in int16 over a block of 32 inputs (8 x 3810 < 32767),
   then widened by vpmaddwd once per block; the fp32 operations of direct_64. */
__attribute__((target(AVX2)))
static void direct_32(const uint8_t *codes, const uint16_t *sz, mat_t m, const int8_t *xq, const float *dx,
                      const float *sx, float *y) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 yv[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 scale, zc;
    for (int64_t g = 0; g < m.K / m.group; g++) {
        for (int64_t b = g * (m.group / XBLOCK); b < (g + 1) * (m.group / XBLOCK); b++) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 4) {
                __m256i v[4];
                unpack_quad_32(codes, k, v);
                int32_t x4;
                memcpy(&x4, xq + k, 4);
                __m256i xv = _mm256_set1_epi32(x4);
                for (int q = 0; q < 4; q++) acc[q] = _mm256_add_epi16(acc[q], _mm256_maddubs_epi16(v[q], xv));
            }
            __m256 d = _mm256_set1_ps(dx[b]);
            for (int q = 0; q < 4; q++) {
                params_32(sz, m.N, g, q, &scale, &zc);
                yv[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(acc[q], ones)), _mm256_mul_ps(scale, d),
                                        yv[q]);
            }
        }
        __m256 s = _mm256_set1_ps(sx[g]);
        for (int q = 0; q < 4; q++) {
            params_32(sz, m.N, g, q, &scale, &zc);
            yv[q] = _mm256_fmadd_ps(zc, s, yv[q]);
        }
    }
    for (int q = 0; q < 4; q++) store_32(y, q, yv[q]);
}

/* The block's codes unpacked once: buf [4][K / 4][32] bytes, quarter q as v[q] above. */
__attribute__((target(AVX2))) static void unpack_block_32(const uint8_t *codes, int64_t K, uint8_t *buf) {
    for (int64_t k = 0; k < K; k += 4) {
        __m256i v[4];
        unpack_quad_32(codes, k, v);
        for (int q = 0; q < 4; q++) _mm256_storeu_si256((__m256i *)(buf + (q * (K / 4) + k / 4) * 32), v[q]);
    }
}

__attribute__((target(AVX2), always_inline))
static inline void tile_32(const uint8_t *buf, const uint16_t *sz, mat_t m, const int nt, tile_in_t in,
                           float *const *y) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int q = 0; q < 4; q++) {
        const uint8_t *w = buf + q * (m.K / 4) * 32;
        __m256 scale, zc;
#define DECL(i) __m256 y##i = _mm256_setzero_ps();
        REP4(DECL)
#undef DECL
        for (int64_t g = 0; g < m.K / m.group; g++) {
            params_32(sz, m.N, g, q, &scale, &zc);
            for (int64_t b = g * (m.group / XBLOCK); b < (g + 1) * (m.group / XBLOCK); b++) {
#define DECL(i) __m256i a##i = _mm256_setzero_si256();
                REP4(DECL)
#undef DECL
                const uint8_t *wb = w + b * XBLOCK * 8;
                const int32_t *xb = in.xt + b * (XBLOCK / 4) * 8;
                #pragma GCC unroll 8
                for (int kk = 0; kk < XBLOCK / 4; kk++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + kk * 32));
                    const int32_t *xk = xb + kk * 8;
#define DOT(i) if (nt > i) a##i = _mm256_add_epi16(a##i, _mm256_maddubs_epi16(wv, _mm256_set1_epi32(xk[i])));
                    REP4(DOT)
#undef DOT
                }
                const float *d = in.dxt + b * 8;
#define FLUSH(i) if (nt > i) y##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a##i, ones)), \
                                                    _mm256_mul_ps(scale, _mm256_set1_ps(d[i])), y##i);
                REP4(FLUSH)
#undef FLUSH
            }
            const float *s = in.sxt + g * 8;
#define GROUP(i) if (nt > i) y##i = _mm256_fmadd_ps(zc, _mm256_set1_ps(s[i]), y##i);
            REP4(GROUP)
#undef GROUP
        }
#define STORE(i) if (nt > i) store_32(y[i], q, y##i);
        REP4(STORE)
#undef STORE
    }
}

__attribute__((target(AVX2)))
static void tile_32_n(const uint8_t *buf, const uint16_t *sz, mat_t m, int nt, tile_in_t in, float *const *y) {
    switch (nt) {
    case 4: tile_32(buf, sz, m, 4, in, y); break;
    case 3: tile_32(buf, sz, m, 3, in, y); break;
    case 2: tile_32(buf, sz, m, 2, in, y); break;
    default: tile_32(buf, sz, m, 1, in, y); break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* one (expert, row block) work item                                                            */

/* Quantized inputs of a matrix: row i's codes at xq + i * K, scales dx + i * (K / 32), group sums
   sx + i * (K / 32) (the row's first K / group entries: quantize_row needs room for its block sums). */
typedef struct { const int8_t *xq; const float *dx, *sx; } qin_t;

/* y[i] [block_n] (row block blk of rows r0..r1) = W's block times input row idx[i] (idx NULL: row i
   itself), for i in r0..r1, writing at out + i * ld + blk * block_n. */
static void block_rows(const uint8_t *qweight, const uint16_t *scales_and_zeros, mat_t m, int64_t block_n,
                       int64_t blk, qin_t in, const int32_t *idx, int64_t r0, int64_t r1, int64_t tile_min,
                       uint8_t *buf, tile_in_t scratch, float *out, int64_t ld) {
    const uint8_t *codes = qweight + blk * block_n * (m.K / 2);
    const uint16_t *sz = scales_and_zeros + 2 * blk * block_n;
    int64_t nx = m.K / XBLOCK, ng = nx;  /* sx's row stride, see qin_t */
    if (r1 - r0 < tile_min) {
        for (int64_t i = r0; i < r1; i++) {
            int64_t s = idx ? idx[i] : i;
            float *y = out + i * ld + blk * block_n;
            if (block_n == 64) direct_64(codes, sz, m, in.xq + s * m.K, in.dx + s * nx, in.sx + s * ng, y);
            else direct_32(codes, sz, m, in.xq + s * m.K, in.dx + s * nx, in.sx + s * ng, y);
        }
        return;
    }
    if (block_n == 64) unpack_block_64(codes, m.K, buf);
    else unpack_block_32(codes, m.K, buf);
    int tile = block_n == 64 ? TILE_512 : TILE_256;
    for (int64_t i0 = r0; i0 < r1; i0 += tile) {
        int nt = (int)(r1 - i0 < tile ? r1 - i0 : tile);
        float *y[TILE_512];
        for (int t = 0; t < nt; t++) {  /* interleave the tile's inputs (see tile_in_t) */
            int64_t s = idx ? idx[i0 + t] : i0 + t;
            const int32_t *xq4 = (const int32_t *)(in.xq + s * m.K);
            for (int64_t k4 = 0; k4 < m.K / 4; k4++) scratch.xt[k4 * 8 + t] = xq4[k4];
            for (int64_t b = 0; b < nx; b++) scratch.dxt[b * 8 + t] = in.dx[s * nx + b];
            for (int64_t g = 0; g < m.K / m.group; g++) scratch.sxt[g * 8 + t] = in.sx[s * ng + g];
            y[t] = out + (i0 + t) * ld + blk * block_n;
        }
        if (block_n == 64) tile_64_n(buf, sz, m, nt, scratch, y);
        else tile_32_n(buf, sz, m, nt, scratch, y);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* gates                                                                                        */

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

/* One row: h [n_in] gate_up output (biased) -> g [n_in / 2] (gated kinds) or [n_in] (relu, gelu...). */
static void gate_row(const float *h, int64_t n_in, int kind, float alpha, float limit, float *g) {
    int64_t f = (kind == RELU || kind == GELU || kind == GELU_TANH) ? n_in : n_in / 2;
    for (int64_t j = 0; j < f; j++) {
        switch (kind) {
        case SILU_MUL: g[j] = silu(h[j]) * h[f + j]; break;
        case GELU_TANH_MUL: g[j] = gelu_tanh(h[j]) * h[f + j]; break;
        case GELU_MUL: g[j] = gelu_erf(h[j]) * h[f + j]; break;
        case RELU: g[j] = h[j] > 0.0f ? h[j] : 0.0f; break;
        case GELU: g[j] = gelu_erf(h[j]); break;
        case GELU_TANH: g[j] = gelu_tanh(h[j]); break;
        default: {  /* SWIGLU_OAI: interleaved (gate, up) columns, clamped, (up + 1) * gate * sigmoid(alpha gate) */
            float gate = fminf(h[2 * j], limit);
            float up = fminf(fmaxf(h[2 * j + 1], -limit), limit);
            g[j] = (up + 1.0f) * (gate / (1.0f + expf(-gate * alpha)));
        }
        }
    }
}

/* The gate alone, for checking it against the model's own (moe_kernel.gate_matches). */
int moe_gate(const float *h, int64_t rows, int64_t n_in, int kind, float alpha, float limit, float *g) {
    if (kind < SILU_MUL || kind > SWIGLU_OAI) return -2;
    int64_t f = (kind == RELU || kind == GELU || kind == GELU_TANH) ? n_in : n_in / 2;
    for (int64_t r = 0; r < rows; r++) gate_row(h + r * n_in, n_in, kind, alpha, limit, g + r * f);
    return 0;
}

static inline float bias_at(const void *bias, int bf16, int64_t i) {
    if (!bf16) return ((const float *)bias)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)bias)[i] << 16;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

/* out[token_of_row[r]] += rows[r] for r in order (so ascending expert order), parallel over columns. */
static void combine(const float *rows, int64_t R, int64_t H, const int32_t *token_of_row, float *out) {
    #pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < H; c0 += 64) {
        int64_t c1 = c0 + 64 < H ? c0 + 64 : H;
        for (int64_t r = 0; r < R; r++) {
            const float *src = rows + r * H;
            float *dst = out + (int64_t)token_of_row[r] * H;
            for (int64_t c = c0; c < c1; c++) dst[c] += src[c];
        }
    }
}

void moe_combine(const float *rows, int64_t R, int64_t H, const int32_t *token_of_row, float *out) {
    #pragma omp parallel
    combine(rows, R, H, token_of_row, out);
}

/* ------------------------------------------------------------------------------------------ */
/* the layer                                                                                    */

typedef struct {
    int64_t T, H, F, N1, n_experts, group, block_n, tile_min;
    int expanded, gate, bias_bf16;
    float alpha, limit;
    const int64_t *offsets;     /* [n_experts + 1] */
    const int32_t *token_of_row; /* [R] */
    const float *weight_of_row; /* [R] */
    const int64_t *ptrs;        /* [n_experts][PTRS_PER_EXPERT] */
} layer_t;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Per-thread scratch of the matmuls for K kernel inputs: the unpacked block (K x block_n bytes),
   then a tile's interleaved inputs (tile_in_t: K / 4 x 8 words, K / 32 x 8 scales and sums). */
static size_t thread_bytes(int64_t K, int64_t block_n) {
    return align64((size_t)K * (size_t)block_n) + align64((size_t)K * 8) + 2 * align64((size_t)K);
}

/* The work items of one matrix: (expert, row block) pairs, expert-major; empty experts skipped. */
static void matrix_items(const layer_t *L, int which, mat_t m, qin_t in, const int32_t *idx, uint8_t *bufs,
                         size_t buf_bytes, float *out) {
    int64_t nblk = m.N / L->block_n;
    uint8_t *buf = bufs + (size_t)omp_get_thread_num() * buf_bytes;
    size_t unpacked = align64((size_t)m.K * (size_t)L->block_n);  /* per-thread: see thread_bytes */
    tile_in_t tile = {(int32_t *)(buf + unpacked), (float *)(buf + unpacked + align64((size_t)m.K * 8)),
                      (float *)(buf + unpacked + align64((size_t)m.K * 8) + align64((size_t)m.K))};
    #pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < L->n_experts * nblk; item++) {
        int64_t e = item / nblk, blk = item % nblk;
        int64_t r0 = L->offsets[e], r1 = L->offsets[e + 1];
        if (r0 == r1) continue;
        const int64_t *p = L->ptrs + e * PTRS_PER_EXPERT + 2 * which;
        block_rows((const uint8_t *)p[0], (const uint16_t *)p[1], m, L->block_n, blk, in, idx, r0, r1,
                   L->tile_min, buf, tile, out, m.N);
        if (which == 1) {  /* down: + bias, times the routing weight */
            const void *bias = (const void *)L->ptrs[e * PTRS_PER_EXPERT + 5];
            for (int64_t r = r0; r < r1; r++) {
                float *y = out + r * m.N + blk * L->block_n, w = L->weight_of_row[r];
                for (int64_t j = 0; j < L->block_n; j++)
                    y[j] = (bias ? y[j] + bias_at(bias, L->bias_bf16, blk * L->block_n + j) : y[j]) * w;
            }
        }
    }
}

/* The whole layer, see moe_kernel.py's moe_experts (gate_out: optional [R, F], the gate's outputs
   before their int8 rounding, for checking). Returns 0, -1 if scratch memory could not be
   allocated, -2 for an unknown block_n or gate. */
int moe_experts(const float *x, int64_t T, int64_t H, int64_t F, int64_t N1, int64_t n_experts,
                const int64_t *offsets, const int32_t *token_of_row, const float *weight_of_row,
                const int64_t *ptrs, int bias_bf16, int64_t group, int expanded, int64_t block_n, int gate,
                float alpha, float limit, int64_t tile_min, float *out, float *rows_out, float *gate_out) {
    if (block_n != 64 && block_n != 32) return -2;
    if (gate < SILU_MUL || gate > SWIGLU_OAI) return -2;
    int64_t R = offsets[n_experts];
    if (R == 0 || T == 0) return 0;
    layer_t L = {T, H, F, N1, n_experts, group, block_n, tile_min, expanded, gate, bias_bf16, alpha, limit,
                 offsets, token_of_row, weight_of_row, ptrs};
    int64_t kg = expanded ? XBLOCK : group;
    mat_t m1 = {expanded ? 2 * H : H, N1, kg}, m2 = {expanded ? 2 * F : F, H, kg};
    int threads = omp_get_max_threads();
    size_t buf_bytes = thread_bytes(m1.K > m2.K ? m1.K : m2.K, block_n);
    size_t sizes[10] = {
        (size_t)(T * m1.K), sizeof(float) * (size_t)(T * (m1.K / XBLOCK)), sizeof(float) * (size_t)(T * (m1.K / XBLOCK)),
        sizeof(float) * (size_t)(R * N1),
        (size_t)(R * m2.K), sizeof(float) * (size_t)(R * (m2.K / XBLOCK)), sizeof(float) * (size_t)(R * (m2.K / XBLOCK)),
        rows_out ? 0 : sizeof(float) * (size_t)(R * H),
        buf_bytes * (size_t)threads,
        sizeof(float) * (size_t)F * (size_t)threads,
    };
    size_t total = 0;
    for (int i = 0; i < 10; i++) total += align64(sizes[i]);
    uint8_t *arena = aligned_alloc(64, total);
    if (!arena) return -1;
    uint8_t *part[10];
    size_t at = 0;
    for (int i = 0; i < 10; i++) { part[i] = arena + at; at += align64(sizes[i]); }
    /* sx is sized per block (quantize_row sums blocks before groups) */
    qin_t in1 = {(int8_t *)part[0], (float *)part[1], (float *)part[2]};
    qin_t in2 = {(int8_t *)part[4], (float *)part[5], (float *)part[6]};
    float *y1 = (float *)part[3];
    float *rows = rows_out ? rows_out : (float *)part[7];
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++)
            quantize_row(x + t * H, H, expanded, kg, (int8_t *)in1.xq + t * m1.K, (float *)in1.dx + t * (m1.K / XBLOCK),
                         (float *)in1.sx + t * (m1.K / XBLOCK));
        matrix_items(&L, 0, m1, in1, token_of_row, part[8], buf_bytes, y1);
        float *g = (float *)part[9] + (size_t)omp_get_thread_num() * (size_t)F;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            int64_t lo = 0, hi = n_experts;  /* the expert of row r: offsets[lo] <= r < offsets[lo + 1] */
            while (hi - lo > 1) {
                int64_t mid = (lo + hi) / 2;
                if (offsets[mid] <= r) lo = mid; else hi = mid;
            }
            const void *bias = (const void *)ptrs[lo * PTRS_PER_EXPERT + 4];
            float *h = y1 + r * N1;
            if (bias) for (int64_t j = 0; j < N1; j++) h[j] += bias_at(bias, bias_bf16, j);
            gate_row(h, N1, gate, alpha, limit, g);
            if (gate_out) memcpy(gate_out + r * F, g, sizeof(float) * (size_t)F);
            quantize_row(g, F, expanded, kg, (int8_t *)in2.xq + r * m2.K, (float *)in2.dx + r * (m2.K / XBLOCK),
                         (float *)in2.sx + r * (m2.K / XBLOCK));
        }
        matrix_items(&L, 1, m2, in2, NULL, part[8], buf_bytes, rows);
        if (!rows_out) combine(rows, R, H, token_of_row, out);
    }
    free(arena);
    return 0;
}
