/* int4 x int8 matrix-vector products on torch's prepared int4 CPU layouts (AVX-512 VNNI, AVX2).

   offload_moe/int4_gemv.py compiles this file once per machine and calls it through ctypes;
   see that module for when it is used and how it is checked. Each SIMD function carries its own
   target attribute, so the file compiles with any x86-64 gcc or clang and `int4_gemv_supported`
   says at run time which variants the CPU can run.

   Weights: torch's `_convert_weight_to_int4pack_for_cpu` layout (offload_moe/int4layout.py):
   for every block of BLOCK_N output rows (64 where torch runs AVX-512, 32 with AVX2), a
   [K, BLOCK_N / 2] byte array whose byte (k, j) holds row j's code in its low nibble and row
   j + BLOCK_N / 2's in its high nibble; bf16 scales_and_zeros [K / group, N, 2] = (S, Z) with
   w = (q - 8) * S + Z.

   Activations are quantized to int8 in blocks of 32 (one fp32 scale each), as llama.cpp's
   Q8_0 does, so the inner loop is an integer dot product of 4 codes with 4 int8 inputs per 32-bit
   lane (vpdpbusd with AVX-512 VNNI; vpmaddubsw then vpmaddwd with AVX2).
   Per row, with dx_b the scale of activation block b, xq_k the int8 codes and
   sx_g = sum_{b in g} dx_b * sum_{k in b} xq_k the sum of group g's rounded inputs:

       y = sum_g [ S_g * sum_{b in g} dx_b * sum_{k in b} q_k * xq_k  +  (Z_g - 8 S_g) * sx_g ]
         = sum_k w_k * (dx_b(k) * xq_k)

   i.e. the exact product of the weights with the int8-rounded inputs (up to fp32 summation order).
   sx_g must be the sum of the *rounded* inputs: with the exact sum, the rounding error of x would
   be multiplied by the uncentred codes q (0..15) instead of by the weights. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define XBLOCK 32    /* activations per int8 scale */
#define AVX512 "avx512f,avx512bw,avx512vnni,avx512vbmi,fma"
#define AVX2 "avx2,fma"

/* Which variants this CPU runs: bit 0 the AVX-512 one (BLOCK_N 64), bit 1 the AVX2 one (BLOCK_N 32). */
int int4_gemv_supported(void) {
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return (avx512 ? 1 : 0) | (avx2 ? 2 : 0);
}

/* One token's activations: int8 codes xq [K], block scales dx [K / 32], group sums sx [K / group]. */
static void quantize_activations(const float *x, int64_t K, int64_t group, int8_t *xq, float *dx, float *sx) {
    for (int64_t b = 0; b < K / XBLOCK; b++) {
        const float *xb = x + b * XBLOCK;
        float amax = 0.0f;
        for (int i = 0; i < XBLOCK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f;
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < XBLOCK; i++) xq[b * XBLOCK + i] = (int8_t)lrintf(xb[i] * inv);
        dx[b] = d;
    }
    for (int64_t g = 0; g < K / group; g++) {  /* the sums of the int8-rounded inputs, see the top */
        float s = 0.0f;
        for (int64_t b = g * (group / XBLOCK); b < (g + 1) * (group / XBLOCK); b++) {
            int32_t codes = 0;
            for (int i = 0; i < XBLOCK; i++) codes += xq[b * XBLOCK + i];
            s += dx[b] * (float)codes;
        }
        sx[g] = s;
    }
}

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

/* AVX-512: y [64] = one block of 64 rows times one quantized token. Every 4 inputs k, 128 bytes
   of codes are split into nibbles and permuted so that each 32-bit lane holds one row's codes of
   k..k+3, then multiplied with the token's 4 int8 inputs (vpdpbusd). */
__attribute__((target(AVX512)))
static void block_dot_64(const uint8_t *codes, const uint16_t *sz, int64_t N, int64_t K, int64_t group,
                      const int8_t *xq, const float *dx, const float *sx, float *y) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i idx_lo = interleave_index(0), idx_hi = interleave_index(16);
    const __m512i bf16_high = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512 eight = _mm512_set1_ps(8.0f);
    __m512 yv[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < K / group; g++) {
        __m512 acc_g[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t b = g * (group / XBLOCK); b < (g + 1) * (group / XBLOCK); b++) {
            __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
            for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 4) {
                __m512i a = _mm512_loadu_si512(codes + k * 32);        /* k, k+1 */
                __m512i c = _mm512_loadu_si512(codes + (k + 2) * 32);  /* k+2, k+3 */
                __m512i a_lo = _mm512_and_si512(a, low), c_lo = _mm512_and_si512(c, low);
                __m512i a_hi = _mm512_and_si512(_mm512_srli_epi16(a, 4), low);
                __m512i c_hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
                int32_t x4;
                memcpy(&x4, xq + k, 4);
                __m512i xv = _mm512_set1_epi32(x4);
                acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_permutex2var_epi8(a_lo, idx_lo, c_lo), xv);
                acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_permutex2var_epi8(a_lo, idx_hi, c_lo), xv);
                acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_permutex2var_epi8(a_hi, idx_lo, c_hi), xv);
                acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_permutex2var_epi8(a_hi, idx_hi, c_hi), xv);
            }
            __m512 d = _mm512_set1_ps(dx[b]);
            for (int r = 0; r < 4; r++) acc_g[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), d, acc_g[r]);
        }
        __m512 s = _mm512_set1_ps(sx[g]);
        for (int r = 0; r < 4; r++) {
            /* rows 16r..16r+15 of this block: 16 (S, Z) bf16 pairs, one per 32-bit lane */
            __m512i pairs = _mm512_loadu_si512(sz + 2 * (g * N + 16 * r));
            __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, bf16_high));
            yv[r] = _mm512_fmadd_ps(scale, acc_g[r], yv[r]);
            yv[r] = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, scale, zero), s, yv[r]);
        }
    }
    for (int r = 0; r < 4; r++) _mm512_storeu_ps(y + 16 * r, yv[r]);
}

/* AVX2: y [32] = one block of 32 rows times one quantized token. Each k's 16 bytes of codes go
   to both 128-bit lanes, low nibbles (rows 0..15) in lane 0 and high ones (rows 16..31) in lane 1;
   two rounds of in-lane unpacking give 32-bit lanes of one row's codes of k..k+3: v[r] holds rows
   4r..4r+3 (lane 0) and 16+4r..16+4r+3 (lane 1). Products by vpmaddubsw (pairs, at most
   2 * 15 * 127: no saturation) then vpmaddwd. */
__attribute__((target(AVX2)))
static void block_dot_32(const uint8_t *codes, const uint16_t *sz, int64_t N, int64_t K, int64_t group,
                         const int8_t *xq, const float *dx, const float *sx, float *y) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i nibble = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i bf16_high = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256 eight = _mm256_set1_ps(8.0f);
    __m256 yv[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < K / group; g++) {
        __m256 acc_g[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = g * (group / XBLOCK); b < (g + 1) * (group / XBLOCK); b++) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int64_t k = b * XBLOCK; k < (b + 1) * XBLOCK; k += 4) {
                __m256i r[4];
                for (int i = 0; i < 4; i++) {
                    __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(codes + (k + i) * 16)));
                    r[i] = _mm256_and_si256(_mm256_srlv_epi32(both, nibble), low);
                }
                __m256i u01l = _mm256_unpacklo_epi8(r[0], r[1]), u01h = _mm256_unpackhi_epi8(r[0], r[1]);
                __m256i u23l = _mm256_unpacklo_epi8(r[2], r[3]), u23h = _mm256_unpackhi_epi8(r[2], r[3]);
                __m256i v[4] = {_mm256_unpacklo_epi16(u01l, u23l), _mm256_unpackhi_epi16(u01l, u23l),
                                _mm256_unpacklo_epi16(u01h, u23h), _mm256_unpackhi_epi16(u01h, u23h)};
                int32_t x4;
                memcpy(&x4, xq + k, 4);
                __m256i xv = _mm256_set1_epi32(x4);
                for (int q = 0; q < 4; q++)
                    acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(_mm256_maddubs_epi16(v[q], xv), ones));
            }
            __m256 d = _mm256_set1_ps(dx[b]);
            for (int q = 0; q < 4; q++) acc_g[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[q]), d, acc_g[q]);
        }
        __m256 s = _mm256_set1_ps(sx[g]);
        for (int q = 0; q < 4; q++) {
            __m256i pairs = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(sz + 2 * (g * N + 16 + 4 * q))),
                                             _mm_loadu_si128((const __m128i *)(sz + 2 * (g * N + 4 * q))));
            __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
            __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, bf16_high));
            yv[q] = _mm256_fmadd_ps(scale, acc_g[q], yv[q]);
            yv[q] = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, scale, zero), s, yv[q]);
        }
    }
    for (int q = 0; q < 4; q++) {
        _mm_storeu_ps(y + 4 * q, _mm256_castps256_ps128(yv[q]));
        _mm_storeu_ps(y + 16 + 4 * q, _mm256_extractf128_ps(yv[q], 1));
    }
}

/* y [T, N] = x [T, K] @ W^T for prepared int4 weights of block_n 64 (the AVX-512 variant) or 32
   (AVX2); the caller checks `int4_gemv_supported`. K must be a multiple of group, group a multiple
   of 32 and N a multiple of block_n. Returns 0, -1 if scratch memory could not be allocated, -2
   for another block_n. */
int int4_gemv(const float *x, int64_t T, int64_t K, int64_t N, int64_t group, int64_t block_n,
              const uint8_t *qweight, const uint16_t *scales_and_zeros, float *y) {
    if (block_n != 64 && block_n != 32) return -2;
    int8_t *xq = malloc((size_t)(T * K));
    float *dx = malloc(sizeof(float) * (size_t)(T * (K / XBLOCK)));
    float *sx = malloc(sizeof(float) * (size_t)(T * (K / group)));
    if (!xq || !dx || !sx) {
        free(xq); free(dx); free(sx);
        return -1;
    }
    for (int64_t t = 0; t < T; t++)
        quantize_activations(x + t * K, K, group, xq + t * K, dx + t * (K / XBLOCK), sx + t * (K / group));
    #pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < N / block_n; blk++) {
        const uint8_t *codes = qweight + blk * block_n * (K / 2);
        const uint16_t *sz = scales_and_zeros + 2 * blk * block_n;
        for (int64_t t = 0; t < T; t++) {
            const int8_t *xq_t = xq + t * K;
            const float *dx_t = dx + t * (K / XBLOCK), *sx_t = sx + t * (K / group);
            float *y_t = y + t * N + blk * block_n;
            if (block_n == 64) block_dot_64(codes, sz, N, K, group, xq_t, dx_t, sx_t, y_t);
            else block_dot_32(codes, sz, N, K, group, xq_t, dx_t, sx_t, y_t);
        }
    }
    free(xq); free(dx); free(sx);
    return 0;
}
