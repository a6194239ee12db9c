// AVX-512 VNNI tile kernel (compiled with -mavx512f/bw/vl/dq/vnni; used only when the CPU has
// them). One 16-channel tile is one zmm register; vpdpbusd multiplies 4 unsigned u (0..15) by
// 4 signed q (-127..127) per channel and adds them into the channel's int32 lane in one
// instruction, without the int16 intermediate of AVX2.
#include <immintrin.h>

#include "w4a8_cpu_tile.h"

namespace fptq {
namespace cpu {
namespace {

struct Avx512Isa {
  using IntAcc = __m512i;
  using FloatAcc = __m512;
  struct Weights { __m512i lo; __m512i hi; };  // u8: 16 channels x 4 k per register
  struct Group { __m512i z; __m512 s; };

  static IntAcc int_zero() { return _mm512_setzero_si512(); }
  static FloatAcc float_zero() { return _mm512_setzero_ps(); }

  static Weights load_weights(const uint8_t* chunk) {
    const __m512i mask = _mm512_set1_epi8(0x0f);
    const __m512i bytes = _mm512_loadu_si512(chunk);
    return {_mm512_and_si512(bytes, mask), _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask)};
  }

  static void dot(IntAcc& acc, const Weights& w, const int8_t* q8) {
    int32_t q_lo, q_hi;  // 4 int8 each, broadcast to every channel
    __builtin_memcpy(&q_lo, q8, 4);
    __builtin_memcpy(&q_hi, q8 + 4, 4);
    acc = _mm512_dpbusd_epi32(acc, w.lo, _mm512_set1_epi32(q_lo));
    acc = _mm512_dpbusd_epi32(acc, w.hi, _mm512_set1_epi32(q_hi));
  }

  static Group load_group(const int32_t* z16, const float* s16) {
    return {_mm512_loadu_si512(z16), _mm512_loadu_ps(s16)};
  }

  static void accumulate(FloatAcc& y, const IntAcc& acc, const Group& g, int32_t q_sum) {
    const __m512i corrected = _mm512_sub_epi32(acc, _mm512_mullo_epi32(g.z, _mm512_set1_epi32(q_sum)));
    y = _mm512_fmadd_ps(g.s, _mm512_cvtepi32_ps(corrected), y);
  }

  static void store(float* y, const FloatAcc& acc, float row_scale, int valid) {
    // Masked store: the last tile of an N that is not a multiple of 16 writes only its channels.
    const __mmask16 mask = static_cast<__mmask16>(valid >= kTileN ? 0xffffu : (1u << valid) - 1u);
    _mm512_mask_storeu_ps(y, mask, _mm512_mul_ps(_mm512_set1_ps(row_scale), acc));
  }
};

}  // namespace

const TileKernels kAvx512Kernels = {quantize_rows, gemm_tiles<Avx512Isa>};

}  // namespace cpu
}  // namespace fptq
