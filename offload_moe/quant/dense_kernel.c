/* Few-token matrix products for dense 16-bit and 8-bit ("q8") weights (AVX-512, AVX2 + F16C).

   offload_moe/quant/dense_kernel.py compiles this file once per machine and calls it through
   ctypes; see that module for when it is used and how it is checked. Each SIMD function carries
   its own target attribute, so the file compiles with any x86-64 gcc or clang and
   `dense_supported` says at run time which variants the CPU can run.

   dense16_gemv: y [T, N] = x [T, K] @ W^T (+ b) with W fp16 or bf16 [N, K] row-major
   (nn.Linear's weight as it is, rows `ldw` elements apart); x, b and y each fp32, fp16 or bf16
   (an nn.Linear's activations as they come, so the caller casts nothing). The 16-bit values are
   widened to fp32 as they are loaded (vcvtph2ps for fp16, a 16-bit shift for bf16) and
   multiplied with fp32 FMAs, so the weights are read once, at memory speed, and the sums are
   fp32; the bias is added in fp32 and the sum rounded once to y's dtype (round to nearest even,
   as torch's casts). Output rows are split over OpenMP threads in tiles of 4; each tile's rows
   are read from memory once and dotted with every token (in groups of up to 4, from cache).

   q8_gemv: the same product for W int8 [N, K] with one fp32 scale per row and block of 32
   columns (w = q * s), the tokens rounded to int8 per block of 32 as llama.cpp's Q8_0 x Q8_0:
       y[t, n] = sum_b (s[n, b] * dx[t, b]) * sum_{k in b} q[n, k] * xq[t, k]
   with integer block dots (vpdpbusd with AVX-512 VNNI, vpmaddubsw + vpmaddwd with AVX2; both
   with the sign trick: |q| times x with q's sign, codes in [-127, 127] so nothing saturates). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_dtypes.h"

#define AVX512 "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
#define AVX2 "avx2,fma,f16c"
#define ROWS 4     /* output rows per tile */
#define TOKENS 4   /* tokens per pass over a tile (16-bit) */
#define QTOKENS 2  /* tokens per pass over a tile (q8) */
#define QBLOCK 32  /* columns per q8 scale, weights and activations alike */
#define MAX_MATRICES 8  /* dense16_gemv_many's */
#define INLINE static inline __attribute__((always_inline))
/* Software prefetch of the weight stream, the same column of the next tile's rows (ROWS rows
   ahead, 16 KB at K = 2048): the hardware prefetcher stops at every 4 KB page, which at decode is
   every row, so without it each row starts with a memory round trip. Into L2 (T1): far enough
   ahead that L1 would evict it first. Off past the thread's last tile (pf = 0). */
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)

/* One tile's fp32 sums tmp [nt][ROWS] (+ the bias of its rows) stored into y at rows n.. and
   tokens t0.. in y's dtype. */
__attribute__((target("f16c"))) INLINE void store_tile(const float *tmp, int nr, int nt, const void *b, int bdt, int64_t n, void *y, int ydt,
                       int64_t N, int64_t t0) {
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) {
            float v = tmp[t * ROWS + r] + (b ? load_as_f32(b, n + r, bdt) : 0.0f);
            store_from_f32(y, (t0 + t) * N + n + r, ydt, v);
        }
}

/* bit 0: the AVX-512 variant (F, BW, VL, VNNI) runs here; bit 1: the AVX2 + F16C + FMA one. */
int dense_supported(void) {
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return (avx512 ? 1 : 0) | (avx2 ? 2 : 0);  /* every AVX2 CPU has F16C */
}

/* Where a 16-bit product's sums go: y [T, N] in dtype ydt, after adding b [N] (dtype bdt; NULL: none). */
struct out {
    void *y;
    int ydt;
    const void *b;
    int bdt;
    int64_t N;
};

/* ---- 16-bit weights, AVX-512: 16 columns per step, the K tail by masked loads ---- */

__attribute__((target(AVX512))) INLINE __m512 widen16(__m256i h, int bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

/* y[t * N + r] for rows r < nr of the tile starting at w and tokens t < nt, nu vectors of
   columns per step (2 for one token, so that 8 FMA chains hide the FMA latency); all three are
   constants where inlined, so the accumulators stay in registers. */
__attribute__((target(AVX512))) INLINE void tile16_512(const uint16_t *w, int64_t ldw, int nr, const float *x,
                                                       int nt, int nu, int64_t K, int bf16, float *y, int pf) {
    __m512 acc[ROWS][TOKENS][2];
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            for (int u = 0; u < nu; u++) acc[r][t][u] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 16 * nu) {
        for (int u = 0; u < nu; u++) {
            int64_t k = k0 + 16 * u, rem = K - k;
            __mmask16 m = rem >= 16 ? (__mmask16)0xFFFF : rem > 0 ? (__mmask16)((1u << rem) - 1) : 0;
            __m512 wv[ROWS];
            if (pf && (k & 31) == 0)
                for (int r = 0; r < nr; r++) PREFETCH(w + (2 * ROWS + r) * ldw + k);
            for (int r = 0; r < nr; r++) wv[r] = widen16(_mm256_maskz_loadu_epi16(m, w + r * ldw + k), bf16);
            for (int t = 0; t < nt; t++) {
                __m512 xv = _mm512_maskz_loadu_ps(m, x + t * K + k);
                for (int r = 0; r < nr; r++) acc[r][t][u] = _mm512_fmadd_ps(wv[r], xv, acc[r][t][u]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            y[t * ROWS + r] = _mm512_reduce_add_ps(nu == 2 ? _mm512_add_ps(acc[r][t][0], acc[r][t][1]) : acc[r][t][0]);
}

/* Rows n..n+nr of y [T, N] (see dense16_gemv for out). */
__attribute__((target(AVX512))) static void rows16_512(const uint16_t *w, int64_t ldw, int nr, const float *x,
                                                       int64_t T, int64_t K, int bf16, const struct out *o,
                                                       int64_t n, int pf) {
    float tmp[TOKENS * ROWS];
    for (int64_t t0 = 0; t0 < T; t0 += TOKENS) {
        int nt = T - t0 >= TOKENS ? TOKENS : (int)(T - t0);
        const float *xt = x + t0 * K;
        if (nr == ROWS) {
            switch (nt) {
                case 4: tile16_512(w, ldw, ROWS, xt, 4, 1, K, bf16, tmp, pf && t0 == 0); break;
                case 3: tile16_512(w, ldw, ROWS, xt, 3, 1, K, bf16, tmp, pf && t0 == 0); break;
                case 2: tile16_512(w, ldw, ROWS, xt, 2, 1, K, bf16, tmp, pf && t0 == 0); break;
                default: tile16_512(w, ldw, ROWS, xt, 1, 2, K, bf16, tmp, pf && t0 == 0); break;
            }
        } else {
            for (int r = 0; r < nr; r++)
                for (int t = 0; t < nt; t++)
                    tile16_512(w + r * ldw, ldw, 1, xt + t * K, 1, 2, K, bf16, tmp + t * ROWS + r, 0);
        }
        store_tile(tmp, nr, nt, o->b, o->bdt, n, o->y, o->ydt, o->N, t0);
    }
}

/* ---- 16-bit weights, AVX2 + F16C: 8 columns per step, the K tail through zeroed copies ---- */

__attribute__((target(AVX2))) INLINE __m256 widen8(__m128i h, int bf16) {
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

__attribute__((target(AVX2))) INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 weights from p widened, of which only the first `rem` exist (the rest read as 0). */
__attribute__((target(AVX2))) INLINE __m256 load_w8(const uint16_t *p, int64_t rem, int bf16) {
    if (rem >= 8) return widen8(_mm_loadu_si128((const __m128i *)p), bf16);
    uint16_t tail[8] = {0};
    if (rem > 0) memcpy(tail, p, (size_t)rem * 2);
    return widen8(_mm_loadu_si128((const __m128i *)tail), bf16);
}

__attribute__((target(AVX2))) INLINE __m256 load_x8(const float *p, int64_t rem) {
    if (rem >= 8) return _mm256_loadu_ps(p);
    float tail[8] = {0};
    if (rem > 0) memcpy(tail, p, (size_t)rem * 4);
    return _mm256_loadu_ps(tail);
}

/* As tile16_512 with at most 2 tokens a pass (AVX2 has 16 vector registers). */
__attribute__((target(AVX2))) INLINE void tile16_256(const uint16_t *w, int64_t ldw, int nr, const float *x,
                                                     int nt, int nu, int64_t K, int bf16, float *y, int pf) {
    __m256 acc[ROWS][2][2];
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            for (int u = 0; u < nu; u++) acc[r][t][u] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 8 * nu) {
        for (int u = 0; u < nu; u++) {
            int64_t k = k0 + 8 * u;
            __m256 wv[ROWS];
            if (pf && (k & 31) == 0)
                for (int r = 0; r < nr; r++) PREFETCH(w + (2 * ROWS + r) * ldw + k);
            for (int r = 0; r < nr; r++) wv[r] = load_w8(w + r * ldw + k, K - k, bf16);
            for (int t = 0; t < nt; t++) {
                __m256 xv = load_x8(x + t * K + k, K - k);
                for (int r = 0; r < nr; r++) acc[r][t][u] = _mm256_fmadd_ps(wv[r], xv, acc[r][t][u]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            y[t * ROWS + r] = hsum8(nu == 2 ? _mm256_add_ps(acc[r][t][0], acc[r][t][1]) : acc[r][t][0]);
}

/* tile16_256 for one token and a full tile: a cache line of each row per step (4 loads of 8
   columns, the sums in tile16_256's two accumulators per row by column parity, so the same bits),
   which keeps more of each row's line in flight than 16 columns a step. */
__attribute__((target(AVX2))) INLINE void tile16_256_one(const uint16_t *w, int64_t ldw, const float *x, int64_t K,
                                                         int bf16, float *y, int pf) {
    __m256 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if (pf)
            for (int r = 0; r < ROWS; r++) PREFETCH(w + (2 * ROWS + r) * ldw + k);
        for (int j = 0; j < 4; j++) {
            __m256 xv = _mm256_loadu_ps(x + k + 8 * j);
            for (int r = 0; r < ROWS; r++)
                acc[r][j & 1] = _mm256_fmadd_ps(widen8(_mm_loadu_si128((const __m128i *)(w + r * ldw + k + 8 * j)), bf16),
                                                xv, acc[r][j & 1]);
        }
    }
    for (; k < K; k += 8) {
        __m256 xv = load_x8(x + k, K - k);
        for (int r = 0; r < ROWS; r++)
            acc[r][(k >> 3) & 1] = _mm256_fmadd_ps(load_w8(w + r * ldw + k, K - k, bf16), xv, acc[r][(k >> 3) & 1]);
    }
    for (int r = 0; r < ROWS; r++) y[r] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));
}

__attribute__((target(AVX2))) static void rows16_256(const uint16_t *w, int64_t ldw, int nr, const float *x,
                                                     int64_t T, int64_t K, int bf16, const struct out *o,
                                                     int64_t n, int pf) {
    float tmp[2 * ROWS];
    for (int64_t t0 = 0; t0 < T; t0 += 2) {
        int nt = T - t0 >= 2 ? 2 : 1;
        const float *xt = x + t0 * K;
        if (nr == ROWS && nt == 2) tile16_256(w, ldw, ROWS, xt, 2, 1, K, bf16, tmp, pf && t0 == 0);
        else if (nr == ROWS) tile16_256_one(w, ldw, xt, K, bf16, tmp, pf && t0 == 0);
        else
            for (int r = 0; r < nr; r++)
                for (int t = 0; t < nt; t++)
                    tile16_256(w + r * ldw, ldw, 1, xt + t * K, 1, 2, K, bf16, tmp + t * ROWS + r, 0);
        store_tile(tmp, nr, nt, o->b, o->bdt, n, o->y, o->ydt, o->N, t0);
    }
}

/* x [T, K] (dtype xdt, rows ldx elements apart) widened into a new contiguous fp32 buffer. */
static float *widen_tokens(const void *x, int xdt, int64_t ldx, int64_t T, int64_t K) {
    float *xf = malloc(sizeof(float) * (size_t)(T * K) + 1);
    size_t size = xdt == F32 ? 4 : 2;
    if (xf)
        for (int64_t t = 0; t < T; t++) widen_to_f32((const char *)x + (size_t)(t * ldx) * size, xdt, K, xf + t * K);
    return xf;
}

/* ---- the rotary embedding (also applied by dense16_gemv_many to the q and k it computes) ---- */

#define MAX_HEAD_DIM 512

/* v rounded to dtype dt (F16 or BF16) and widened back: what a torch op in that dtype stores. */
__attribute__((target("f16c"))) INLINE float round_to(float v, int dt) {
    uint16_t bits = dt == F16 ? to_f16(v) : to_bf16(v);
    return load_as_f32(&bits, 0, dt);
}

/* x [R, H, D] (16-bit dtype dt, rows ldx elements apart) rotated in place as transformers'
   apply_rotary_pos_emb computes it in that dtype: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]),
   each product and the sum rounded to dt as torch's 16-bit ops round them (a product of two 16-bit
   values is exact in fp32, so one rounding each); cos and sin [R, D] of dtype dt, row r for all
   heads of row r. Returns 0, or -2 for another dtype or an odd D above MAX_HEAD_DIM. */
__attribute__((target(AVX2))) int rope16(void *x, int64_t R, int64_t H, int64_t D, int64_t ldx, const void *cos,
                                         const void *sin, int dt) {
    if ((dt != F16 && dt != BF16) || D % 2 || D < 2 || D > MAX_HEAD_DIM) return -2;
    int64_t half = D / 2;
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < H; h++) {
            uint16_t *row = (uint16_t *)x + r * ldx + h * D;
            float out[MAX_HEAD_DIM];
            for (int64_t i = 0; i < D; i++) {
                float other = i < half ? -load_as_f32(row, i + half, dt) : load_as_f32(row, i - half, dt);
                float a = round_to(load_as_f32(row, i, dt) * load_as_f32(cos, r * D + i, dt), dt);
                float b = round_to(other * load_as_f32(sin, r * D + i, dt), dt);
                out[i] = a + b;
            }
            for (int64_t i = 0; i < D; i++) store_from_f32(row, i, dt, out[i]);
        }
    return 0;
}

/* dense16_gemv for M matrices on the same tokens in one parallel pass: matrix m (N[m] rows at
   w[m], ldw[m] apart, fp16 or bf16 by bf16[m], bias b[m] of dtype bdt[m] or 0) writes columns
   sum(N[:m]).. of y [T, sum(N)] (contiguous, dtype ydt); the tiles of all of them are split among
   the threads as one range (an attention layer's q, k and v projections: one call, one stream).
   rope_heads > 0: then the first rope_heads heads of rope_dim columns of every row of y (q and k)
   are rotated in place by rope16 with cos and sin [T, rope_dim] (y 16-bit). */
int dense16_gemv_many(const void *x, int xdt, int64_t ldx, int64_t T, int64_t K, int64_t M, const int64_t *N,
                      const int64_t *w, const int64_t *ldw, const int *bf16, const int64_t *b, const int *bdt,
                      void *y, int ydt, int variant, int64_t rope_heads, int64_t rope_dim, const void *cos,
                      const void *sin) {
    if ((variant != 1 && variant != 2) || !DTYPE_OK(xdt) || !DTYPE_OK(ydt) || M < 1 || M > MAX_MATRICES) return -2;
    if (rope_heads > 0 && (ydt == F32 || rope_dim % 2 || rope_dim < 2 || rope_dim > MAX_HEAD_DIM)) return -2;
    int64_t first_tile[MAX_MATRICES + 1], first_col[MAX_MATRICES + 1];
    first_tile[0] = first_col[0] = 0;
    for (int64_t m = 0; m < M; m++) {
        if (!DTYPE_OK(bdt[m])) return -2;
        first_tile[m + 1] = first_tile[m] + (N[m] + ROWS - 1) / ROWS;
        first_col[m + 1] = first_col[m] + N[m];
    }
    if (rope_heads > 0 && rope_heads * rope_dim > first_col[M]) return -2;  /* before any work */
    float *widened = xdt == F32 && ldx == K ? NULL : widen_tokens(x, xdt, ldx, T, K);
    if (!widened && !(xdt == F32 && ldx == K)) return -1;
    const float *xf = widened ? widened : (const float *)x;
    size_t ysize = ydt == F32 ? 4 : 2;
    int64_t tiles = first_tile[M];
    #pragma omp parallel
    {  /* each thread one contiguous range of tiles (one stream), prefetching up to its end */
        int nth = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t t0 = tiles * id / nth, t1 = tiles * (id + 1) / nth, m = 0;
        for (int64_t tile = t0; tile < t1; tile++) {
            while (tile >= first_tile[m + 1]) m++;
            struct out o = {(char *)y + (size_t)first_col[m] * ysize, ydt, (const void *)(intptr_t)b[m], bdt[m],
                            first_col[M]};
            const uint16_t *wm = (const uint16_t *)(intptr_t)w[m];
            int64_t n = (tile - first_tile[m]) * ROWS;
            int nr = N[m] - n >= ROWS ? ROWS : (int)(N[m] - n);
            int pf = tile + 2 < t1 && tile + 2 < first_tile[m + 1];
            if (variant == 1) rows16_512(wm + n * ldw[m], ldw[m], nr, xf, T, K, bf16[m], &o, n, pf);
            else rows16_256(wm + n * ldw[m], ldw[m], nr, xf, T, K, bf16[m], &o, n, pf);
        }
    }
    free(widened);
    return rope_heads > 0 ? rope16(y, T, rope_heads, rope_dim, first_col[M], cos, sin, ydt) : 0;
}

/* y [T, N] = x [T, K] @ W^T + b, W fp16 (bf16 = 0) or bf16 (bf16 = 1) with rows ldw elements
   apart; x (rows ldx apart), b [N] (NULL: none) and y (contiguous) of dtypes xdt, bdt, ydt (enum
   dtype). variant 1: AVX-512, 2: AVX2 (the caller checks dense_supported). Returns 0, -1 if
   scratch memory could not be allocated, -2 for another variant or dtype. */
int dense16_gemv(const void *x, int xdt, int64_t ldx, int64_t T, int64_t K, int64_t N, const uint16_t *w,
                 int64_t ldw, int bf16, const void *b, int bdt, void *y, int ydt, int variant) {
    const int64_t ptr = (int64_t)(intptr_t)w, bias = (int64_t)(intptr_t)b;
    return dense16_gemv_many(x, xdt, ldx, T, K, 1, &N, &ptr, &ldw, &bf16, &bias, &bdt, y, ydt, variant, 0, 0, NULL, NULL);
}

/* ---- q8 ---- */

/* One token's int8 codes xq [K] and block scales dx [K / 32]: xq = round(x * 127 / amax),
   dx = amax / 127 (fp32, round half to even), as offload_moe.quant.q8.round_activations. */
void q8_quantize_activations(const float *x, int64_t K, int8_t *xq, float *dx) {
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        const float *xb = x + b * QBLOCK;
        float amax = 0.0f;
        for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < QBLOCK; i++) xq[b * QBLOCK + i] = (int8_t)lrintf(xb[i] * inv);
        dx[b] = amax / 127.0f;
    }
}

/* 8 int32 partial sums of the 32 products q . x of one block (sign trick, see the top). */
__attribute__((target(AVX512))) INLINE __m256i block_dot_vnni(__m256i q, __m256i x) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
}

__attribute__((target(AVX2))) INLINE __m256i block_dot_avx2(__m256i q, __m256i x) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* One q8 tile: rows r < nr, tokens t < nt (constants where inlined); vnni picks the block dot. */
#define Q8_TILE(NAME, TARGET, DOT)                                                                         \
    __attribute__((target(TARGET))) INLINE void NAME(const int8_t *q, const float *s, int64_t K, int nr,   \
                                                     const int8_t *xq, const float *dx, int nt, float *y,  \
                                                     int64_t N) {                                          \
        __m256 acc[ROWS][QTOKENS];                                                                         \
        int64_t nb = K / QBLOCK;                                                                           \
        for (int r = 0; r < nr; r++)                                                                       \
            for (int t = 0; t < nt; t++) acc[r][t] = _mm256_setzero_ps();                                  \
        for (int64_t b = 0; b < nb; b++) {                                                                 \
            __m256i qv[ROWS];                                                                              \
            for (int r = 0; r < nr; r++) qv[r] = _mm256_loadu_si256((const __m256i *)(q + r * K + b * QBLOCK)); \
            for (int t = 0; t < nt; t++) {                                                                 \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + t * K + b * QBLOCK));               \
                for (int r = 0; r < nr; r++) {                                                             \
                    __m256 d = _mm256_set1_ps(s[r * nb + b] * dx[t * nb + b]);                             \
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qv[r], xv)), d, acc[r][t]);         \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < nr; r++)                                                                       \
            for (int t = 0; t < nt; t++) y[t * N + r] = hsum8(acc[r][t]);                                  \
    }

Q8_TILE(q8_tile_vnni, AVX512, block_dot_vnni)
Q8_TILE(q8_tile_avx2, AVX2, block_dot_avx2)

#define Q8_ROWS(NAME, TARGET, TILE)                                                                        \
    __attribute__((target(TARGET))) static void NAME(const int8_t *q, const float *s, int64_t K, int nr,   \
                                                     const int8_t *xq, const float *dx, int64_t T, float *y, \
                                                     int64_t N) {                                          \
        int64_t nb = K / QBLOCK;                                                                           \
        for (int64_t t0 = 0; t0 < T; t0 += QTOKENS) {                                                      \
            int nt = T - t0 >= QTOKENS ? QTOKENS : 1;                                                      \
            const int8_t *xt = xq + t0 * K;                                                                \
            const float *dt = dx + t0 * nb;                                                                \
            if (nr == ROWS && nt == 2) TILE(q, s, K, ROWS, xt, dt, 2, y + t0 * N, N);                      \
            else if (nr == ROWS) TILE(q, s, K, ROWS, xt, dt, 1, y + t0 * N, N);                            \
            else                                                                                           \
                for (int r = 0; r < nr; r++)                                                               \
                    for (int t = 0; t < nt; t++)                                                           \
                        TILE(q + r * K, s + r * nb, K, 1, xt + t * K, dt + t * nb, 1, y + (t0 + t) * N + r, N); \
        }                                                                                                  \
    }

Q8_ROWS(q8_rows_vnni, AVX512, q8_tile_vnni)
Q8_ROWS(q8_rows_avx2, AVX2, q8_tile_avx2)

/* y [T, N] = x [T, K] @ W^T for W = q * s: q int8 [N, K], s fp32 [N, K / 32] (both contiguous),
   the tokens rounded to int8 per block of 32. K must be a multiple of 32. variant 1: AVX-512 VNNI,
   2: AVX2. Returns 0, -1 if scratch memory could not be allocated, -2 for another variant. */
int q8_gemv(const float *x, int64_t T, int64_t K, int64_t N, const int8_t *q, const float *s, int variant, float *y) {
    if (variant != 1 && variant != 2) return -2;
    int64_t nb = K / QBLOCK;
    int8_t *xq = malloc((size_t)(T * K) + 1);
    float *dx = malloc(sizeof(float) * (size_t)(T * nb) + 1);
    if (!xq || !dx) {
        free(xq); free(dx);
        return -1;
    }
    for (int64_t t = 0; t < T; t++) q8_quantize_activations(x + t * K, K, xq + t * K, dx + t * nb);
    int64_t tiles = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static)
    for (int64_t tile = 0; tile < tiles; tile++) {
        int64_t n = tile * ROWS;
        int nr = N - n >= ROWS ? ROWS : (int)(N - n);
        if (variant == 1) q8_rows_vnni(q + n * K, s + n * nb, K, nr, xq, dx, T, y + n, N);
        else q8_rows_avx2(q + n * K, s + n * nb, K, nr, xq, dx, T, y + n, N);
    }
    free(xq); free(dx);
    return 0;
}

/* ---- RMSNorm ---- */

/* y [T, H] = RMSNorm(x) as transformers computes it for 16-bit activations: per row the mean of
   x^2 in fp32, h = x * (1 / sqrt(mean + eps)) in fp32, then
     mode 0: h rounded to x's dtype, times w, rounded to y's dtype (Llama, Mixtral, Qwen3, ...);
     mode 1: h times w in fp32, rounded once to y's dtype (gpt-oss).
   x, w [H] and y of dtypes xdt, wdt, ydt (enum dtype), x and y contiguous. Parallel over rows when
   there are many. Returns 0, or -2 for an unknown dtype or mode. */
__attribute__((target(AVX2))) int rms_norm16(const void *x, int xdt, int64_t T, int64_t H, const void *w, int wdt,
                                             float eps, int mode, void *y, int ydt) {
    if (!DTYPE_OK(xdt) || !DTYPE_OK(wdt) || !DTYPE_OK(ydt) || (mode != 0 && mode != 1)) return -2;
    #pragma omp parallel for schedule(static) if (T * H > (1 << 16))
    for (int64_t t = 0; t < T; t++) {
        float sum = 0.0f;
        for (int64_t i = 0; i < H; i++) {
            float v = load_as_f32(x, t * H + i, xdt);
            sum += v * v;
        }
        float inv = 1.0f / sqrtf(sum / (float)H + eps);
        for (int64_t i = 0; i < H; i++) {
            float h = load_as_f32(x, t * H + i, xdt) * inv;
            if (mode == 0 && xdt != F32) {  /* the round trip through x's dtype */
                float rounded;
                uint16_t bits = xdt == F16 ? to_f16(h) : to_bf16(h);
                rounded = load_as_f32(&bits, 0, xdt);
                h = rounded;
            }
            store_from_f32(y, t * H + i, ydt, load_as_f32(w, i, wdt) * h);
        }
    }
    return 0;
}

/* ---- a router's top-k ---- */

/* Per row of logits [T, E] (dtype ldt): the k experts and their routing weights as transformers'
   top-k routers compute them, into indices [T, k] (descending, ties to the lower expert) and
   scores [T, k] (dtype sdt):
     order 0: p = softmax(logits) in fp32, the top k of p, divided by their sum when renorm
              (Mixtral, Qwen3-MoE, OLMoE);
     order 1: the top k logits, their softmax in fp32 (gpt-oss).
   E at most 4096 (dense_kernel.py's MAX_EXPERTS). Returns 0, or -2 for unknown dtypes, order, or k outside 1..E. */
__attribute__((target(AVX2))) int route_topk(const void *logits, int ldt, int64_t T, int64_t E, int64_t k, int order,
                                             int renorm, int64_t *indices, void *scores, int sdt) {
    if (!DTYPE_OK(ldt) || !DTYPE_OK(sdt) || (order != 0 && order != 1) || k < 1 || k > E || E > 4096) return -2;
    #pragma omp parallel for schedule(static) if (T > 16)  /* prefill: rows are independent */
    for (int64_t t = 0; t < T; t++) {
        float v[4096], top[4096];
        float high = -INFINITY;
        for (int64_t e = 0; e < E; e++) {
            v[e] = load_as_f32(logits, t * E + e, ldt);
            high = v[e] > high ? v[e] : high;
        }
        if (order == 0) {  /* softmax over all experts first */
            float sum = 0.0f;
            for (int64_t e = 0; e < E; e++) sum += (v[e] = expf(v[e] - high));
            for (int64_t e = 0; e < E; e++) v[e] /= sum;
        }
        int64_t *idx = indices + t * k;
        for (int64_t j = 0; j < k; j++) {  /* selection: k is small */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j && !taken; i++) taken = idx[i] == e;
                if (!taken && (best < 0 || v[e] > v[best])) best = e;
            }
            idx[j] = best;
            top[j] = v[best];
        }
        float sum = 0.0f;
        if (order == 1) {
            float first = top[0];  /* the largest */
            for (int64_t j = 0; j < k; j++) sum += (top[j] = expf(top[j] - first));
        } else if (renorm) {
            for (int64_t j = 0; j < k; j++) sum += top[j];
        }
        for (int64_t j = 0; j < k; j++) store_from_f32(scores, t * k + j, sdt, sum > 0.0f ? top[j] / sum : top[j]);
    }
    return 0;
}

/* ---- decode attention: one query row per head against a KV cache ---- */

#define POSITIONS 64  /* cache positions per online-softmax block */

/* 8 cache values at p (fp16, or bf16 when bf16) as fp32. */
__attribute__((target(AVX2))) INLINE __m256 load_kv8(const uint16_t *p, int bf16) {
    return widen8(_mm_loadu_si128((const __m128i *)p), bf16);
}

/* One query head: acc [D] = sum_j p_j v_j and the softmax's max and sum, p_j = exp(s_j - max),
   s_j = scale * q . k_j over L positions, in blocks of POSITIONS (the online softmax: a new
   block's larger max rescales what is summed so far). */
__attribute__((target(AVX2))) static void attend_head(const float *q, int64_t D, const uint16_t *k, int64_t kpos,
                                                      const uint16_t *v, int64_t vpos, int64_t L, int bf16,
                                                      float scale, float *acc, float *sum_out) {
    float high = -INFINITY, sum = 0.0f, s[POSITIONS];
    for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
    for (int64_t p0 = 0; p0 < L; p0 += POSITIONS) {
        int64_t n = L - p0 < POSITIONS ? L - p0 : POSITIONS;
        float block_high = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            const uint16_t *kj = k + (p0 + j) * kpos;
            __m256 dot = _mm256_setzero_ps();
            for (int64_t i = 0; i < D; i += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_kv8(kj + i, bf16), dot);
            s[j] = scale * hsum8(dot);
            block_high = s[j] > block_high ? s[j] : block_high;
        }
        if (block_high > high) {  /* rescale what is summed so far (nothing yet in the first block) */
            float c = high == -INFINITY ? 0.0f : expf(high - block_high);
            for (int64_t i = 0; i < D; i++) acc[i] *= c;
            sum *= c;
            high = block_high;
        }
        for (int64_t j = 0; j < n; j++) {
            float p = expf(s[j] - high);
            const uint16_t *vj = v + (p0 + j) * vpos;
            __m256 pv = _mm256_set1_ps(p);
            sum += p;
            for (int64_t i = 0; i < D; i += 8)
                _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, load_kv8(vj + i, bf16), _mm256_loadu_ps(acc + i)));
        }
    }
    *sum_out = sum;
}

/* out [Hq, D] (dtype odt) = softmax(scale * q k^T) v for one query row per head, query head h
   reading KV head h / (Hq / Hkv) (grouped-query attention): SDPA's math on fp32-widened inputs
   without a mask, every product and sum in fp32, rounded once. q [Hq, D] contiguous of dtype qdt;
   k and v of Hkv heads and L positions, 16-bit dtype kvdt, unit stride along D, head and position
   strides (elements) khead, kpos, vhead, vpos, read where they lie. Parallel over heads once the
   cache is big enough to pay for it. M > 0: then y = dense16_gemv_many(out as one token, the M
   matrices given as there), the output projection in the same call. Returns 0 (or
   dense16_gemv_many's status), or -2 for unknown dtypes, D not a multiple of 8
   up to MAX_HEAD_DIM, Hq not a multiple of Hkv, or L < 1. */
__attribute__((target(AVX2))) int decode_attention(const void *q, int qdt, int64_t Hq, int64_t D, const uint16_t *k,
                                                   const uint16_t *v, int kvdt, int64_t Hkv, int64_t L, int64_t khead,
                                                   int64_t kpos, int64_t vhead, int64_t vpos, float scale, void *out,
                                                   int odt, int64_t M, const int64_t *N, const int64_t *w,
                                                   const int64_t *ldw, const int *bf16, const int64_t *b,
                                                   const int *bdt, void *y, int ydt, int variant) {
    if (!DTYPE_OK(qdt) || !DTYPE_OK(odt) || (kvdt != F16 && kvdt != BF16) || D % 8 || D < 8 || D > MAX_HEAD_DIM
        || Hkv < 1 || Hq % Hkv || L < 1)
        return -2;
    int64_t group = Hq / Hkv;
    #pragma omp parallel for schedule(static) if (Hq * L * D > (1 << 15))
    for (int64_t h = 0; h < Hq; h++) {
        float qf[MAX_HEAD_DIM], acc[MAX_HEAD_DIM], sum;
        for (int64_t i = 0; i < D; i++) qf[i] = load_as_f32(q, h * D + i, qdt);
        int64_t g = h / group;
        attend_head(qf, D, k + g * khead, kpos, v + g * vhead, vpos, L, kvdt == BF16, scale, acc, &sum);
        for (int64_t i = 0; i < D; i++) store_from_f32(out, h * D + i, odt, acc[i] / sum);
    }
    if (M == 0) return 0;  /* the output projection: out as one token of Hq * D features */
    return dense16_gemv_many(out, odt, Hq * D, 1, Hq * D, M, N, w, ldw, bf16, b, bdt, y, ydt, variant, 0, 0, NULL, NULL);
}
