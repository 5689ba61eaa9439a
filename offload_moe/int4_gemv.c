/* int4 x int8 matrix-vector products on torch's prepared int4 CPU layout (AVX-512 VNNI).

   offload_moe/int4_gemv.py compiles this file once per machine and calls it through ctypes;
   see that module for when it is used and how it is checked.

   Weights: torch's `_convert_weight_to_int4pack_for_cpu` layout with BLOCK_N = 64
   (offload_moe/int4layout.py): for every block of 64 output rows, a [K, 32] byte array whose
   byte (k, j) holds row j's code in its low nibble and row j + 32's in its high nibble;
   bf16 scales_and_zeros [K / group, N, 2] = (S, Z) with w = (q - 8) * S + Z.

   Activations are quantized to int8 in blocks of 32 (one fp32 scale each), as llama.cpp's
   Q8_0 does, so the inner loop is an integer dot product (vpdpbusd: 4 codes x 4 int8 per lane).
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

#define BLOCK_N 64   /* output rows per block of the layout */
#define XBLOCK 32    /* activations per int8 scale */

int int4_gemv_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
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
static __m512i interleave_index(int j0) {
    uint8_t idx[64];
    for (int jj = 0; jj < 16; jj++) {
        idx[4 * jj + 0] = (uint8_t)(j0 + jj);
        idx[4 * jj + 1] = (uint8_t)(32 + j0 + jj);
        idx[4 * jj + 2] = (uint8_t)(64 + j0 + jj);
        idx[4 * jj + 3] = (uint8_t)(96 + j0 + jj);
    }
    return _mm512_loadu_si512(idx);
}

/* y [64] = one block of 64 rows times one quantized token. */
static void block_dot(const uint8_t *codes, const uint16_t *sz, int64_t N, int64_t K, int64_t group,
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
                __m512i a = _mm512_loadu_si512(codes + k * (BLOCK_N / 2));        /* k, k+1 */
                __m512i c = _mm512_loadu_si512(codes + (k + 2) * (BLOCK_N / 2));  /* k+2, k+3 */
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

/* y [T, N] = x [T, K] @ W^T for prepared int4 weights (see the top of this file).
   K must be a multiple of group, group a multiple of 32 and N a multiple of 64.
   Returns 0, or -1 if scratch memory could not be allocated. */
int int4_gemv(const float *x, int64_t T, int64_t K, int64_t N, int64_t group,
              const uint8_t *qweight, const uint16_t *scales_and_zeros, float *y) {
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
    for (int64_t blk = 0; blk < N / BLOCK_N; blk++) {
        const uint8_t *codes = qweight + blk * BLOCK_N * (K / 2);
        const uint16_t *sz = scales_and_zeros + 2 * blk * BLOCK_N;
        for (int64_t t = 0; t < T; t++)
            block_dot(codes, sz, N, K, group, xq + t * K, dx + t * (K / XBLOCK), sx + t * (K / group),
                      y + t * N + blk * BLOCK_N);
    }
    free(xq); free(dx); free(sx);
    return 0;
}
