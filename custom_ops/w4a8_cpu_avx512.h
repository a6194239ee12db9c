// AVX-512 helpers shared by the AVX-512 VNNI and the AMX kernel files (both compiled with the
// AVX-512 flags; include only from such files). Like w4a8_cpu_tile.h, everything here is in an
// anonymous namespace and free of std:: inline functions (the multi-ISA ODR trap).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "w4a8_cpu_tile.h"

namespace fptq {
namespace cpu {
namespace {

// 4 consecutive int8 q as one int32, broadcast to all 16 lanes: the signed operand of vpdpbusd.
inline __m512i broadcast_q4(const int8_t* q4) {
  int32_t v;
  __builtin_memcpy(&v, q4, sizeof v);
  return _mm512_set1_epi32(v);
}

// acc += vpdpbusd(u, q): per int32 lane, the sum of 4 products of unsigned bytes of u and signed
// bytes of q. Inline asm instead of _mm512_dpbusd_epi32: GCC 12 gives the intrinsic a separate
// destination and copies every accumulator around each call (two extra moves per vpdpbusd,
// plus stack spills of accumulator arrays); "+v" keeps each accumulator in one register.
inline void dpbusd(__m512i& acc, __m512i u, __m512i q) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(q));
}

// int32 -> float32 per lane. The zero-masked intrinsic compiles to the plain vcvtdq2ps; the
// plain one starts from _mm512_undefined_ps, about which GCC 12 warns (-Wuninitialized) once inlined.
inline __m512 to_float(__m512i v) { return _mm512_maskz_cvtepi32_ps(0xffff, v); }

// The 16 zero points of a tile and group (uint8 in memory, a quarter of the bytes of int32) as
// int32 (zero-masked for the same reason as to_float).
inline __m512i load_zero_points(const uint8_t* z16) {
  return _mm512_maskz_cvtepu8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(z16)));
}

// Zero-point correction and group scale of one row and tile: y + s * float(acc - z * q_sum).
// acc: int32 sum_k q * u over the group; z, s: the tile's zero points and scales of the group.
inline __m512 fold_group(__m512 y, __m512i acc, __m512i z, __m512 s, int32_t q_sum) {
  const __m512i corrected = _mm512_sub_epi32(acc, _mm512_mullo_epi32(z, _mm512_set1_epi32(q_sum)));
  return _mm512_fmadd_ps(s, to_float(corrected), y);
}

// Writes a_m * y to the first `valid` channels at out (the last tile of an N that is not a
// multiple of 16 must not write past the row).
inline void store_row(float* out, __m512 y, float row_scale, int valid) {
  const __mmask16 mask = static_cast<__mmask16>(valid >= kTileN ? 0xffffu : (1u << valid) - 1u);
  _mm512_mask_storeu_ps(out, mask, _mm512_mul_ps(_mm512_set1_ps(row_scale), y));
}

// Output channels of `tile` that exist (16, or fewer in the last tile).
inline int valid_channels(const GemmArgs& a, int64_t tile) {
  const int64_t left = a.n - tile * kTileN;
  return static_cast<int>(left < kTileN ? left : kTileN);
}

}  // namespace
}  // namespace cpu
}  // namespace fptq
