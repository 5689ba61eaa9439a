/* offload_moe's int4 x int8 CPU kernel (AVX-512 VNNI, AVX2): one prepared matrix (`int4_gemv`), or
   all routed experts of one MoE layer in one call (`moe_experts`).

   offload_moe/quant/moe_kernel.py builds this file (offload_moe.quant.native) and calls it
   through ctypes; see that module for the contract of `moe_experts` and offload_moe/quant/int4_gemv.py
   for `int4_gemv`'s. Each SIMD function carries its own target attribute, so the file compiles
   with any x86-64 gcc or clang and `moe_supported` says at run time which variants the CPU runs.

   Like llama.cpp's mul_mat_id, one `moe_experts` call computes every expert of the layer for all
   the tokens routed to it: gate_up matmul, gate function, down matmul, routing weight and the
   combine in ascending expert order. Each expert's weights are read once per call whatever its
   token count:

   1. the tokens are rounded to int8 once (all of them);
   2. per chunk of rows (consecutive experts, an expert with more rows split; the chunk's buffers
      fit in `chunk_bytes`): OpenMP items (expert, block of gate_up rows) write the fp32 gate_up
      outputs; then per row the bias, the gate and the int8 rounding of its output; then items
      (block of down rows = block of H columns) run the chunk's experts in ascending order and
      add (y + bias) * weight into out[token] (or write the rows), so each token's sum is in
      ascending expert order whatever the schedule, with no rows buffer and no combine pass.

   Weights are the prepared int4 CPU layout (offload_moe/quant/int4_layout.py): per block of
   BLOCK_N output rows (64: the AVX-512 variant, 32: AVX2) a [K, BLOCK_N / 2] byte array, byte
   (k, j) = row j's code | row j + BLOCK_N / 2's code << 4; bf16 (S, Z) [K / group, N, 2] with
   w = (q - 8) * S + Z.

   Activations are rounded to int8 in blocks of 32 (one fp32 scale each), as llama.cpp's Q8_0 does,
   so the inner loop is an integer dot product of 4 codes with 4 int8 inputs per 32-bit lane
   (vpdpbusd with AVX-512 VNNI; vpmaddubsw then vpmaddwd with AVX2). Per row, with dx_b the scale
   of activation block b, xq_k the int8 codes and sx_g = sum_{b in g} dx_b * sum_{k in b} xq_k the
   sum of group g's rounded inputs:

       y = sum_g [ sum_{b in g} S_g dx_b * sum_{k in b} q_k * xq_k  +  (Z_g - 8 S_g) * sx_g ]
         = sum_k w_k * (dx_b(k) * xq_k)

   i.e. the exact product of the dequantized weights with the int8-rounded inputs, up to fp32
   summation order. sx_g must be the sum of the *rounded* inputs: with the exact sum, the rounding
   error of x would be multiplied by the uncentred codes q (0..15) instead of by the weights.

   Two loops per (matrix, row block), chosen by its token count against `tile_min` (measured on
   the running CPU by moe_kernel.py), with the same fp32 operations in the same order (so
   bit-identical results):
   - direct: per token, nibbles unpacked from the packed codes as they are read (the GEMV);
   - tiled (many tokens, the GEMM path): the block's nibbles are unpacked once into a per-thread
     buffer already in the dot-product order, then read back for each tile of tokens (inputs
     interleaved once per call), each weight vector feeding the whole tile's dot products, held
     in registers.

   Expanded groups (hqq2, group 16): the prepared matrix has 2K input columns, each real group of
   16 followed by 16 zero codes; the activation quantizer writes that expanded int8 vector
   directly (16 codes, 16 zeros per block of 32). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_dtypes.h"

#define XBLOCK 32
#define AVX512 "avx512f,avx512bw,avx512vnni,avx512vbmi,fma"
#define AVX2 "avx2,fma"
#define TILE_512 8  /* tokens per register tile: 3 x 8 accumulators of 32 zmm registers */
#define TILE_256 4  /* 3 x 4 accumulators of 16 ymm registers */
/* Software prefetch in the direct (decode) loops: the packed codes PF_CODES bytes ahead, into L2
   (the hardware prefetcher stops at every 4 KB page and restarts slowly), and the strided (S, Z)
   of the group PF_GROUPS ahead (one 256-byte run every N * 4 bytes, which it does not follow).
   Prefetches past a matrix's end are harmless (they never fault). */
#define PF_CODES 4096
#define PF_GROUPS 2
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
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
        for (int i = 0; i < 4; i++) PREFETCH(sz + 2 * ((g + PF_GROUPS) * m.N) + 32 * i);  /* 4 lines: 64 rows */
        for (int64_t b = g * (m.group / XBLOCK); b < (g + 1) * (m.group / XBLOCK); b++) {
            __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                              _mm512_setzero_si512()};
            for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 4) {
                PREFETCH(codes + k * 32 + PF_CODES);
                PREFETCH(codes + k * 32 + PF_CODES + 64);
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

/* A tile of nt <= W quantized rows interleaved for the tiled loops (W = TILE_512 or TILE_256, the
   variant's tile): xt [K / 4][W] 32-bit words (row i's inputs 4k'..4k'+3 at word (k', i)),
   dxt [K / 32][W] block scales, sxt [K / 32][W] group sums (the first K / group), so that the
   loops broadcast every row's values from one base pointer. Built once per call and matrix. */
typedef struct { int32_t *xt; float *dxt, *sxt; } tile_in_t;

#define REP8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define REP4(X) X(0) X(1) X(2) X(3)
/* An empty asm that takes and gives v: gcc cannot reassociate sums across it (it would turn the
   int16 accumulation into a tree of all of a block's products, spilling them). */
#define KEEP(v) __asm__("" : "+x"(v))

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
                const int32_t *xb = in.xt + b * (XBLOCK / 4) * TILE_512;
                #pragma GCC unroll 8
                for (int kk = 0; kk < XBLOCK / 4; kk++) {  /* a constant trip count: unrolled, no copies */
                    __m512i wv = _mm512_loadu_si512(wb + kk * 64);
                    const int32_t *xk = xb + kk * TILE_512;
#define DOT(i) if (nt > i) a##i = _mm512_dpbusd_epi32(a##i, wv, _mm512_set1_epi32(xk[i]));
                    REP8(DOT)
#undef DOT
                }
                const float *d = in.dxt + b * TILE_512;
#define FLUSH(i) if (nt > i) \
    y##i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##i), _mm512_mul_ps(scale, _mm512_set1_ps(d[i])), y##i);
                REP8(FLUSH)
#undef FLUSH
            }
            const float *s = in.sxt + g * TILE_512;
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
   16+4q..16+4q+3 (lane 1), one row's 4 codes per 32-bit lane. */
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
   then widened by vpmaddwd once per block (KEEP: in order); the fp32 operations of direct_64. */
__attribute__((target(AVX2)))
static void direct_32(const uint8_t *codes, const uint16_t *sz, mat_t m, const int8_t *xq, const float *dx,
                      const float *sx, float *y) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 yv[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 scale, zc;
    for (int64_t g = 0; g < m.K / m.group; g++) {
        for (int i = 0; i < 2; i++) PREFETCH(sz + 2 * ((g + PF_GROUPS) * m.N) + 32 * i);  /* 2 lines: 32 rows */
        for (int64_t b = g * (m.group / XBLOCK); b < (g + 1) * (m.group / XBLOCK); b++) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 4) {
                PREFETCH(codes + k * 16 + PF_CODES);
                __m256i v[4];
                unpack_quad_32(codes, k, v);
                int32_t x4;
                memcpy(&x4, xq + k, 4);
                __m256i xv = _mm256_set1_epi32(x4);
                for (int q = 0; q < 4; q++) { acc[q] = _mm256_add_epi16(acc[q], _mm256_maddubs_epi16(v[q], xv)); KEEP(acc[q]); }
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
                const int32_t *xb = in.xt + b * (XBLOCK / 4) * TILE_256;
                #pragma GCC unroll 8
                for (int kk = 0; kk < XBLOCK / 4; kk++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + kk * 32));
                    const int32_t *xk = xb + kk * TILE_256;
#define DOT(i) if (nt > i) { a##i = _mm256_add_epi16(a##i, _mm256_maddubs_epi16(wv, _mm256_set1_epi32(xk[i]))); KEEP(a##i); }
                    REP4(DOT)
#undef DOT
                }
                const float *d = in.dxt + b * TILE_256;
#define FLUSH(i) if (nt > i) y##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a##i, ones)), \
                                                    _mm256_mul_ps(scale, _mm256_set1_ps(d[i])), y##i);
                REP4(FLUSH)
#undef FLUSH
            }
            const float *s = in.sxt + g * TILE_256;
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
/* one matrix block times one segment's rows                                                    */

/* Quantized inputs of a matrix: row i's codes at xq + i * K, scales dx + i * (K / 32), group sums
   sx + i * (K / 32) (the row's first K / group entries: quantize_row needs room for its block sums). */
typedef struct { const int8_t *xq; const float *dx, *sx; } qin_t;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Bytes of one interleaved tile of W rows for K kernel inputs (tile_in_t). */
static size_t tile_bytes(int64_t K, int W) {
    return align64((size_t)(K / 4) * (size_t)W * 4) + 2 * align64((size_t)(K / XBLOCK) * (size_t)W * 4);
}

static tile_in_t tile_at(uint8_t *tiles, int64_t i, int64_t K, int W) {
    uint8_t *p = tiles + (size_t)i * tile_bytes(K, W);
    size_t words = align64((size_t)(K / 4) * (size_t)W * 4), scales = align64((size_t)(K / XBLOCK) * (size_t)W * 4);
    return (tile_in_t){(int32_t *)p, (float *)(p + words), (float *)(p + words + scales)};
}

/* Row `s` of `in` into lane t of tile `dst`. */
static void interleave_row(qin_t in, int64_t K, int64_t s, int t, int W, tile_in_t dst) {
    int64_t nx = K / XBLOCK;
    const int32_t *xq4 = (const int32_t *)(in.xq + s * K);
    for (int64_t k4 = 0; k4 < K / 4; k4++) dst.xt[k4 * W + t] = xq4[k4];
    for (int64_t b = 0; b < nx; b++) {
        dst.dxt[b * W + t] = in.dx[s * nx + b];
        dst.sxt[b * W + t] = in.sx[s * nx + b];
    }
}

/* y[i] [block_n] = W's row block blk times rows r0..r1 of a segment, at out + (i - r0) * ld:
   `tiles` (the segment's interleaved tiles, or NULL) selects the tiled loop, else the direct one
   on input row idx[i] (idx NULL: row i). */
static void block_rows(const uint8_t *qweight, const uint16_t *scales_and_zeros, mat_t m, int64_t block_n,
                       int64_t blk, qin_t in, const int64_t *idx, int64_t r0, int64_t r1, uint8_t *tiles,
                       uint8_t *buf, float *out, int64_t ld) {
    const uint8_t *codes = qweight + blk * block_n * (m.K / 2);
    const uint16_t *sz = scales_and_zeros + 2 * blk * block_n;
    int64_t nx = m.K / XBLOCK;
    if (!tiles) {
        for (int64_t i = r0; i < r1; i++) {
            int64_t s = idx ? idx[i] : i;
            float *y = out + (i - r0) * ld;
            if (block_n == 64) direct_64(codes, sz, m, in.xq + s * m.K, in.dx + s * nx, in.sx + s * nx, y);
            else direct_32(codes, sz, m, in.xq + s * m.K, in.dx + s * nx, in.sx + s * nx, y);
        }
        return;
    }
    if (block_n == 64) unpack_block_64(codes, m.K, buf);
    else unpack_block_32(codes, m.K, buf);
    int W = block_n == 64 ? TILE_512 : TILE_256;
    for (int64_t i0 = r0; i0 < r1; i0 += W) {
        int nt = (int)(r1 - i0 < W ? r1 - i0 : W);
        float *y[TILE_512];
        for (int t = 0; t < nt; t++) y[t] = out + (i0 + t - r0) * ld;
        tile_in_t in_t = tile_at(tiles, (i0 - r0) / W, m.K, W);
        if (block_n == 64) tile_64_n(buf, sz, m, nt, in_t, y);
        else tile_32_n(buf, sz, m, nt, in_t, y);
    }
}

/* y [T, N] = x [T, K] @ W^T for one prepared matrix (block_n 64: the AVX-512 variant, 32: AVX2; the
   caller checks `moe_supported`), the tiled loop from tile_min tokens. K must be a multiple of
   group, group of 32 and N of block_n. Returns 0, -1 if scratch memory could not be allocated, -2
   for another block_n. */
int int4_gemv(const float *x, int64_t T, int64_t K, int64_t N, int64_t group, int64_t block_n,
              const uint8_t *qweight, const uint16_t *scales_and_zeros, int64_t tile_min, float *y) {
    if (block_n != 64 && block_n != 32) return -2;
    if (T == 0) return 0;
    mat_t m = {K, N, group};
    int W = block_n == 64 ? TILE_512 : TILE_256;
    int64_t nx = K / XBLOCK, n_tiles = T >= tile_min ? (T + W - 1) / W : 0;
    size_t buf_bytes = align64((size_t)K * (size_t)block_n);  /* one unpacked block per thread */
    size_t sizes[5] = {(size_t)(T * K), sizeof(float) * (size_t)(T * nx), sizeof(float) * (size_t)(T * nx),
                       (size_t)n_tiles * tile_bytes(K, W), n_tiles ? buf_bytes * (size_t)omp_get_max_threads() : 0};
    size_t total = 0;
    for (int i = 0; i < 5; i++) total += align64(sizes[i]);
    uint8_t *arena = aligned_alloc(64, total), *part[5];
    if (!arena) return -1;
    size_t at = 0;
    for (int i = 0; i < 5; i++) { part[i] = arena + at; at += align64(sizes[i]); }
    qin_t in = {(int8_t *)part[0], (float *)part[1], (float *)part[2]};
    uint8_t *tiles = n_tiles ? part[3] : NULL;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            quantize_row(x + t * K, K, 0, group, (int8_t *)in.xq + t * K, (float *)in.dx + t * nx, (float *)in.sx + t * nx);
            if (tiles) interleave_row(in, K, t, (int)(t % W), W, tile_at(tiles, t / W, K, W));
        }
        uint8_t *buf = part[4] + buf_bytes * (size_t)omp_get_thread_num();
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < N / block_n; blk++)
            block_rows(qweight, scales_and_zeros, m, block_n, blk, in, NULL, 0, T, tiles, buf, y + blk * block_n, N);
    }
    free(arena);
    return 0;
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

static inline float bias_at(const void *bias, int bf16, int64_t i) {  /* fp32 or bf16 biases */
    if (!bf16) return ((const float *)bias)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)bias)[i] << 16;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

/* out[token_of_row[r]] += rows[r] for r in order (a layer computed in several calls), parallel over columns. */
void moe_combine(const float *rows, int64_t R, int64_t H, const int64_t *token_of_row, float *out) {
    #pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < H; c0 += 64) {
        int64_t c1 = c0 + 64 < H ? c0 + 64 : H;
        for (int64_t r = 0; r < R; r++) {
            const float *src = rows + r * H;
            float *dst = out + token_of_row[r] * H;
            for (int64_t c = c0; c < c1; c++) dst[c] += src[c];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the layer                                                                                    */

/* A run of one expert's rows, computed together (an expert with more rows than a chunk holds is
   split); `tile` its first tile in the chunk's tile buffers, or -1 when it takes the direct loop. */
typedef struct { int64_t e, r0, r1, tile, next; } seg_t;  /* next: set on a chunk's first segment */

typedef struct {
    int64_t T, H, F, N1, group, block_n, tile_min;
    int expanded, gate, bias_bf16, W;
    float alpha, limit;
    const int64_t *token_of_row; /* [R] */
    const float *weight_of_row; /* [R] */
    const int64_t *ptrs;        /* [table entries][PTRS_PER_EXPERT] */
    const int32_t *ids;         /* [n_experts]: each expert's entry in ptrs (NULL: the i-th) */
    mat_t m1, m2;
} layer_t;

/* The PTRS_PER_EXPERT pointers of the call's e-th expert. */
static inline const int64_t *expert_ptrs(const layer_t *L, int64_t e) {
    return L->ptrs + (L->ids ? (int64_t)L->ids[e] : e) * PTRS_PER_EXPERT;
}

/* The chunk's buffers, for at most max_rows rows: y1 [rows][N1] gate_up outputs, q2 the quantized
   gate outputs, tiles1 / tiles2 the interleaved tiles of gate_up / down inputs, then per thread
   the unpacked block, the gate's row and a [max_rows][block_n] down output. */
typedef struct {
    float *y1;
    qin_t q2;
    uint8_t *tiles1, *tiles2, *per_thread;
    size_t thread_bytes;
} chunk_t;

/* Bytes per row of a chunk (y1, q2, one row's share of both tile buffers). */
static size_t row_bytes(const layer_t *L) {
    return sizeof(float) * (size_t)L->N1 + (size_t)L->m2.K + 2 * sizeof(float) * (size_t)(L->m2.K / XBLOCK)
        + (tile_bytes(L->m1.K, L->W) + tile_bytes(L->m2.K, L->W)) / (size_t)L->W;
}

static size_t thread_bytes(const layer_t *L, int64_t max_rows) {
    int64_t K = L->m1.K > L->m2.K ? L->m1.K : L->m2.K;
    return align64((size_t)K * (size_t)L->block_n) + align64(sizeof(float) * (size_t)L->F)
        + align64(sizeof(float) * (size_t)max_rows * (size_t)L->block_n);
}

/* The tiled segments' gate_up inputs (their tokens' rows of in1), interleaved into their tiles. */
static void interleave_inputs(const layer_t *L, const seg_t *seg, int64_t n_seg, qin_t in1, uint8_t *tiles1) {
    #pragma omp for schedule(static)
    for (int64_t r = seg[0].r0; r < seg[n_seg - 1].r1; r++) {
        int64_t s = 0;
        while (seg[s].r1 <= r) s++;
        if (seg[s].tile < 0) continue;
        int64_t i = r - seg[s].r0;
        interleave_row(in1, L->m1.K, L->token_of_row[r], (int)(i % L->W), L->W,
                       tile_at(tiles1, seg[s].tile + i / L->W, L->m1.K, L->W));
    }
}

/* gate_up of (segment, row block) item `item` of a chunk (segments seg[0..]). */
static void gate_up_item(const layer_t *L, const seg_t *seg, qin_t in1, chunk_t c, uint8_t *mine, int64_t item) {
    int64_t nblk = L->N1 / L->block_n;
    const seg_t *sg = seg + item / nblk;
    int64_t blk = item % nblk;
    const int64_t *p = expert_ptrs(L, sg->e);
    block_rows((const uint8_t *)p[0], (const uint16_t *)p[1], L->m1, L->block_n, blk, in1, L->token_of_row,
               sg->r0, sg->r1, sg->tile < 0 ? NULL : (uint8_t *)tile_at(c.tiles1, sg->tile, L->m1.K, L->W).xt,
               mine, c.y1 + (sg->r0 - seg[0].r0) * L->N1 + blk * L->block_n, L->N1);
}

/* gate_up of a chunk: (segment, row block) items, then bias, gate and int8 rounding per row. */
static void chunk_gate_up(const layer_t *L, const seg_t *seg, int64_t n_seg, qin_t in1, chunk_t c, float *gate_out) {
    int64_t c0 = seg[0].r0;
    uint8_t *mine = c.per_thread + (size_t)omp_get_thread_num() * c.thread_bytes;
    int any_tiled = 0;  /* the same answer in every thread: the loop is skipped by all or none */
    for (int64_t s = 0; s < n_seg; s++) any_tiled |= seg[s].tile >= 0;
    if (any_tiled) interleave_inputs(L, seg, n_seg, in1, c.tiles1);
    /* Direct loops only (decode): static, so each thread streams one contiguous run of blocks (an
       expert's gate_up rows are contiguous) its prefetches run along; tiled items vary more. */
    int64_t items = n_seg * (L->N1 / L->block_n);
    if (any_tiled) {
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) gate_up_item(L, seg, in1, c, mine, item);
    } else {
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) gate_up_item(L, seg, in1, c, mine, item);
    }
    float *g = (float *)(mine + align64((size_t)(L->m1.K > L->m2.K ? L->m1.K : L->m2.K) * (size_t)L->block_n));
    int64_t nx = L->m2.K / XBLOCK;
    #pragma omp for schedule(static)
    for (int64_t r = c0; r < seg[n_seg - 1].r1; r++) {
        int64_t s = 0;
        while (seg[s].r1 <= r) s++;
        const void *bias = (const void *)expert_ptrs(L, seg[s].e)[4];
        float *h = c.y1 + (r - c0) * L->N1;
        if (bias) for (int64_t j = 0; j < L->N1; j++) h[j] += bias_at(bias, L->bias_bf16, j);
        gate_row(h, L->N1, L->gate, L->alpha, L->limit, g);
        if (gate_out) memcpy(gate_out + r * L->F, g, sizeof(float) * (size_t)L->F);
        int64_t i = r - c0;
        quantize_row(g, L->F, L->expanded, L->m2.group, (int8_t *)c.q2.xq + i * L->m2.K, (float *)c.q2.dx + i * nx,
                     (float *)c.q2.sx + i * nx);
        if (seg[s].tile >= 0) {
            int64_t k = r - seg[s].r0;
            interleave_row(c.q2, L->m2.K, i, (int)(k % L->W), L->W,
                           tile_at(c.tiles2, seg[s].tile + k / L->W, L->m2.K, L->W));
        }
    }
}

/* Row block blk of H of a chunk's down: the segments in ascending order, (y + b) * w added into
   out[token] (or written to rows_out). */
static void down_item(const layer_t *L, const seg_t *seg, int64_t n_seg, chunk_t c, uint8_t *mine, float *y,
                      float *out, float *rows_out, int64_t blk) {
    int64_t c0 = seg[0].r0, bn = L->block_n;
    for (int64_t s = 0; s < n_seg; s++) {
        const int64_t *p = expert_ptrs(L, seg[s].e);
        uint8_t *tiles = seg[s].tile < 0 ? NULL : (uint8_t *)tile_at(c.tiles2, seg[s].tile, L->m2.K, L->W).xt;
        block_rows((const uint8_t *)p[2], (const uint16_t *)p[3], L->m2, bn, blk, c.q2, NULL, seg[s].r0 - c0,
                   seg[s].r1 - c0, tiles, mine, y, bn);  /* q2's rows are the chunk's */
        const void *bias = (const void *)p[5];
        for (int64_t r = seg[s].r0; r < seg[s].r1; r++) {
            const float *yr = y + (r - seg[s].r0) * bn;
            float w = L->weight_of_row[r];
            float *dst = rows_out ? rows_out + r * L->H + blk * bn : out + L->token_of_row[r] * L->H + blk * bn;
            for (int64_t j = 0; j < bn; j++) {
                float v = (bias ? yr[j] + bias_at(bias, L->bias_bf16, blk * bn + j) : yr[j]) * w;
                dst[j] = rows_out ? v : dst[j] + v;
            }
        }
    }
}

/* down of a chunk: items are row blocks of H, each running the segments in ascending order and
   adding (y + b) * w into out[token] (or writing rows_out), so each token's rows are added in
   ascending expert order whatever the schedule. */
static void chunk_down(const layer_t *L, const seg_t *seg, int64_t n_seg, chunk_t c, float *out, float *rows_out) {
    int64_t bn = L->block_n;
    uint8_t *mine = c.per_thread + (size_t)omp_get_thread_num() * c.thread_bytes;
    int64_t K = L->m1.K > L->m2.K ? L->m1.K : L->m2.K;
    float *y = (float *)(mine + align64((size_t)K * (size_t)bn) + align64(sizeof(float) * (size_t)L->F));
    int any_tiled = 0;  /* as in chunk_gate_up: direct loops only, a static schedule */
    for (int64_t s = 0; s < n_seg; s++) any_tiled |= seg[s].tile >= 0;
    if (any_tiled) {
        #pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < L->H / bn; blk++) down_item(L, seg, n_seg, c, mine, y, out, rows_out, blk);
    } else {
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < L->H / bn; blk++) down_item(L, seg, n_seg, c, mine, y, out, rows_out, blk);
    }
}

/* Segments of at most max_rows rows, in ascending expert order; returns their count. */
static int64_t make_segments(const int64_t *offsets, int64_t n_experts, int64_t max_rows, seg_t *seg) {
    int64_t n = 0;
    for (int64_t e = 0; e < n_experts; e++)
        for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += max_rows)
            seg[n++] = (seg_t){e, r0, r0 + max_rows < offsets[e + 1] ? r0 + max_rows : offsets[e + 1], -1, 0};
    return n;
}

/* Chunks: runs of consecutive segments of at most max_rows rows (seg[first].next = the segment
   after the chunk); each segment of at least tile_min rows gets its tiles in the chunk's buffers. */
static void plan_chunks(seg_t *seg, int64_t n_seg, int64_t max_rows, int64_t tile_min, int W) {
    for (int64_t s0 = 0; s0 < n_seg;) {
        int64_t s1 = s0, tiles = 0;
        while (s1 < n_seg && seg[s1].r1 - seg[s0].r0 <= max_rows) {
            int64_t rows = seg[s1].r1 - seg[s1].r0;
            seg[s1].tile = rows >= tile_min ? tiles : -1;
            if (rows >= tile_min) tiles += (rows + W - 1) / W;
            s1++;
        }
        seg[s0].next = s1;
        s0 = s1;
    }
}

/* Offsets rising from 0, table entries within 0..n_table-1, tokens within 0..T-1: what the
   caller's routing promises, checked here (a few comparisons per row) rather than by tensor ops. */
static int rows_valid(const int64_t *offsets, int64_t n_experts, const int32_t *ids, int64_t n_table,
                      const int64_t *token_of_row, int64_t T) {
    if (offsets[0] != 0) return 0;
    for (int64_t e = 0; e < n_experts; e++) {
        if (offsets[e + 1] < offsets[e]) return 0;
        if (ids ? ids[e] < 0 || ids[e] >= n_table : e >= n_table) return 0;
    }
    for (int64_t r = 0; r < offsets[n_experts]; r++)
        if (token_of_row[r] < 0 || token_of_row[r] >= T) return 0;
    return 1;
}

/* The whole layer, see moe_kernel.py's moe_experts. x [T, H] of dtype xdt; ids [n_experts]: each
   expert's entry in the pointer table ptrs (NULL: entry i). Results go to exactly one of: out
   (fp32 [T, H], the weighted rows added into it), combined ([T, H] of dtype combined_dt, written:
   the rows summed in fp32 from zero, rounded once) or rows_out (fp32 [R, H], one weighted row
   each). gate_out: optional [R, F], the gate's outputs before their int8 rounding, for checking;
   chunk_bytes: the budget of a chunk's buffers, which sets how many rows are computed between
   barriers. Returns 0, -1 if scratch memory could not be allocated, -2 for an unknown block_n,
   gate or dtype, -3 for rows that are not valid (rows_valid). */
int moe_experts(const void *x, int xdt, int64_t T, int64_t H, int64_t F, int64_t N1, int64_t n_experts,
                const int64_t *offsets, const int32_t *ids, int64_t n_table, const int64_t *token_of_row,
                const float *weight_of_row, const int64_t *ptrs, int bias_bf16, int64_t group, int expanded,
                int64_t block_n, int gate, float alpha, float limit, int64_t tile_min, int64_t chunk_bytes,
                float *out, void *combined, int combined_dt, float *rows_out, float *gate_out) {
    if (block_n != 64 && block_n != 32) return -2;
    if (gate < SILU_MUL || gate > SWIGLU_OAI || !DTYPE_OK(xdt) || !DTYPE_OK(combined_dt)) return -2;
    if (!rows_valid(offsets, n_experts, ids, n_table, token_of_row, T)) return -3;
    int64_t R = offsets[n_experts];
    if (R == 0 || T == 0) {
        float zero = 0.0f;
        if (combined) for (int64_t i = 0; i < T * H; i++) narrow_from_f32(&zero, 1, combined, i, combined_dt);
        return 0;
    }
    int64_t kg = expanded ? XBLOCK : group;
    layer_t L = {T, H, F, N1, group, block_n, tile_min, expanded, gate, bias_bf16,
                 block_n == 64 ? TILE_512 : TILE_256, alpha, limit, token_of_row, weight_of_row, ptrs, ids,
                 {expanded ? 2 * H : H, N1, kg}, {expanded ? 2 * F : F, H, kg}};
    int64_t max_rows = (int64_t)((size_t)chunk_bytes / row_bytes(&L));
    max_rows = max_rows < L.W ? L.W : max_rows - max_rows % L.W;
    if (max_rows > R) max_rows = R;
    int64_t max_seg = n_experts + R / max_rows + 1;
    int threads = omp_get_max_threads();
    size_t nx1 = (size_t)(L.m1.K / XBLOCK), nx2 = (size_t)(L.m2.K / XBLOCK);
    int64_t max_tiles = max_rows / L.W + max_seg;  /* each segment rounds its tiles up */
    int accumulate = combined && combined_dt != F32;  /* 16-bit results: summed in an fp32 buffer first */
    size_t sizes[12] = {
        (size_t)T * (size_t)L.m1.K, sizeof(float) * (size_t)T * nx1, sizeof(float) * (size_t)T * nx1,
        sizeof(seg_t) * (size_t)max_seg, sizeof(float) * (size_t)(max_rows * N1),
        (size_t)(max_rows * L.m2.K), sizeof(float) * (size_t)max_rows * nx2, sizeof(float) * (size_t)max_rows * nx2,
        (size_t)max_tiles * (tile_bytes(L.m1.K, L.W) + tile_bytes(L.m2.K, L.W)),
        thread_bytes(&L, max_rows) * (size_t)threads,
        xdt == F32 ? 0 : sizeof(float) * (size_t)H * (size_t)threads,  /* a widened row per thread */
        accumulate ? sizeof(float) * (size_t)(T * H) : 0,
    };
    size_t total = 0;
    for (int i = 0; i < 12; i++) total += align64(sizes[i]);
    uint8_t *arena = aligned_alloc(64, total);
    if (!arena) return -1;
    uint8_t *part[12];
    size_t at = 0;
    for (int i = 0; i < 12; i++) { part[i] = arena + at; at += align64(sizes[i]); }
    qin_t in1 = {(int8_t *)part[0], (float *)part[1], (float *)part[2]};
    seg_t *seg = (seg_t *)part[3];
    chunk_t c = {(float *)part[4], {(int8_t *)part[5], (float *)part[6], (float *)part[7]}, part[8],
                 part[8] + (size_t)max_tiles * tile_bytes(L.m1.K, L.W), part[9], thread_bytes(&L, max_rows)};
    float *sums = out ? out : accumulate ? (float *)part[11] : (float *)combined;  /* NULL with rows_out */
    int64_t n_seg = make_segments(offsets, n_experts, max_rows, seg);
    plan_chunks(seg, n_seg, max_rows, tile_min, L.W);
    size_t xsize = xdt == F32 ? 4 : 2;
    /* few tokens: rounded here, saving the parallel loop's barrier */
    #pragma omp parallel for schedule(static) if (T * H > (1 << 16))
    for (int64_t t = 0; t < T; t++) {
        const float *row = (const float *)((const char *)x + (size_t)(t * H) * xsize);
        if (xdt != F32) {
            float *wide = (float *)part[10] + (size_t)omp_get_thread_num() * (size_t)H;
            widen_to_f32(row, xdt, H, wide);
            row = wide;
        }
        quantize_row(row, H, expanded, kg, (int8_t *)in1.xq + t * L.m1.K, (float *)in1.dx + t * nx1,
                     (float *)in1.sx + t * nx1);
        if (combined) memset(sums + t * H, 0, sizeof(float) * (size_t)H);
    }
    #pragma omp parallel
    {
        for (int64_t s0 = 0; s0 < n_seg; s0 = seg[s0].next) {
            chunk_gate_up(&L, seg + s0, seg[s0].next - s0, in1, c, gate_out);
            chunk_down(&L, seg + s0, seg[s0].next - s0, c, sums, rows_out);
        }
        if (accumulate) {
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) narrow_from_f32(sums + t * H, H, combined, t * H, combined_dt);
        }
    }
    free(arena);
    return 0;
}

/* moe_experts from a router's top-k as the router gives it, combined: topk_ids [T, K] (int64; the
   id E means "no expert", as runtime.routing's) and topk_w [T, K] (dtype wdt); the experts that
   have table entries are listed by experts[i] -> entries[i] (n_given pairs). The rows are built
   here as runtime.routing builds them: grouped by expert ascending, within one expert in (k, t)
   order (the eager reference's torch.where order), weights widened to fp32; so the result is
   moe_experts' on route_rows' rows, bit for bit. The combined [T, H] of dtype combined_dt.
   Returns moe_experts' statuses; -3 also for an id outside 0..E, a routed expert without an
   entry, or a listed expert outside 0..E-1. */
__attribute__((target("f16c"))) int moe_experts_topk(
        const void *x, int xdt, int64_t T, int64_t H, int64_t F, int64_t N1, int64_t K, const int64_t *topk_ids,
        const void *topk_w, int wdt, int64_t E, int64_t n_given, const int32_t *experts, const int32_t *entries,
        int64_t n_table, const int64_t *ptrs, int bias_bf16, int64_t group, int expanded, int64_t block_n, int gate,
        float alpha, float limit, int64_t tile_min, int64_t chunk_bytes, void *combined, int combined_dt) {
    if (!DTYPE_OK(wdt) || E < 1 || K < 1 || T < 0) return -2;
    int64_t P = T * K;
    int64_t *offsets = malloc(sizeof(int64_t) * (size_t)(2 * (E + 1) + 2 * P + 1) + sizeof(int32_t) * (size_t)(2 * E));
    if (!offsets) return -1;
    int64_t *next = offsets + E + 1, *token = next + E + 1;
    float *weight = (float *)(token + P);
    int32_t *entry = (int32_t *)(weight + P + 1), *ids = entry + E;
    int status = 0, n = 0;
    for (int64_t e = 0; e < E; e++) entry[e] = -1, next[e] = 0;
    for (int64_t i = 0; i < n_given; i++)
        if (experts[i] < 0 || experts[i] >= E) status = -3;
        else entry[experts[i]] = entries[i];
    for (int64_t p = 0; p < P && !status; p++)
        if (topk_ids[p] < 0 || topk_ids[p] > E) status = -3;
        else if (topk_ids[p] < E) next[topk_ids[p]]++;  /* counts first */
    offsets[0] = 0;
    for (int64_t e = 0; e < E && !status; e++) {
        if (!next[e]) continue;
        if (entry[e] < 0) { status = -3; break; }
        ids[n] = entry[e];
        offsets[n + 1] = offsets[n] + next[e];
        next[e] = offsets[n];  /* then each expert's next free row */
        n++;
    }
    for (int64_t k = 0; k < K && !status; k++)
        for (int64_t t = 0; t < T; t++) {
            int64_t id = topk_ids[t * K + k];
            if (id == E) continue;
            int64_t r = next[id]++;
            token[r] = t;
            weight[r] = load_as_f32(topk_w, t * K + k, wdt);
        }
    if (!status)
        status = moe_experts(x, xdt, T, H, F, N1, n, offsets, ids, n_table, token, weight, ptrs, bias_bf16, group,
                             expanded, block_n, gate, alpha, limit, tile_min, chunk_bytes, NULL, combined,
                             combined_dt, NULL, NULL);
    free(offsets);
    return status;
}
