/* The activation dtypes offload_moe's C kernels read and write (fp32, fp16, bf16), one value at a
   time, converted as torch converts them: fp16 by F16C, bf16 by its top 16 bits, fp32 to 16 bits
   rounded to nearest even (a NaN stays a quiet NaN in bf16). Included by dense_kernel.c and
   moe_kernel.c (offload_moe.quant.native hashes this header into both builds). */

#ifndef OFFLOAD_MOE_CPU_DTYPES_H
#define OFFLOAD_MOE_CPU_DTYPES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

enum dtype { F32 = 0, F16 = 1, BF16 = 2 };

#define DTYPE_OK(dt) ((dt) >= F32 && (dt) <= BF16)

__attribute__((target("f16c"), always_inline)) static inline uint16_t to_f16(float v) {
    return (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((always_inline)) static inline uint16_t to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* p[i] of dtype dt, as fp32. */
__attribute__((target("f16c"), always_inline)) static inline float load_as_f32(const void *p, int64_t i, int dt) {
    if (dt == F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (dt == F16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* p[i] = v in dtype dt. */
__attribute__((target("f16c"), always_inline)) static inline void store_from_f32(void *p, int64_t i, int dt, float v) {
    if (dt == F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = dt == F16 ? to_f16(v) : to_bf16(v);
}

/* n values of dtype dt from p into fp32 dst. */
__attribute__((target("f16c"), unused)) static void widen_to_f32(const void *p, int dt, int64_t n, float *dst) {
    if (dt == F32) memcpy(dst, p, sizeof(float) * (size_t)n);
    else for (int64_t i = 0; i < n; i++) dst[i] = load_as_f32(p, i, dt);
}

/* n fp32 values from src into p[at..at + n) of dtype dt. */
__attribute__((target("f16c"), unused)) static void narrow_from_f32(const float *src, int64_t n, void *p, int64_t at, int dt) {
    for (int64_t i = 0; i < n; i++) store_from_f32(p, at + i, dt, src[i]);
}

#endif
