// AVX2 tile kernel (compiled with -mavx2 -mfma; used only when the CPU has AVX2).
// A 16-channel tile is two 8-lane halves. vpmaddubsw multiplies u (unsigned, 0..15) by q
// (signed, -127..127) and adds adjacent pairs into int16 (|2 * 15 * 127| = 3810); the pair sums
// of 4 chunks stay below int16 saturation (dot_narrow), and vpmaddwd with ones then adds pairs
// of int16 into the int32 lane of each channel.
//
// 8-bit weights (u in 0..255) would overflow that: 2 * 255 * 127 = 64770 > 32767, and
// vpmaddubsw saturates. So the 8-bit dot works on w = u - 128 (signed, -128..127; one xor) with
// vpmaddubsw(|w|, sign(q, w)) = w * q per byte pair (vpsignb moves w's sign onto q; llama.cpp's
// trick): |w| <= 128 and |q| <= 127 keep a pair within 2 * 128 * 127 = 32512. It then sums
// q * (u - 128), and load_group<8> hands out z - 128 for the zero point, so that the shared
// correction acc - z * q_sum is again sum q * (u - z).
#include <immintrin.h>

#include "w4a8_cpu_tile.h"

namespace fptq {
namespace cpu {
namespace {

struct Avx2Isa {
  struct IntAcc { __m256i half[2]; };   // int32 channels 0-7, 8-15
  struct FloatAcc { __m256 half[2]; };
  struct Weights4 { __m256i lo[2]; __m256i hi[2]; };  // u8: 8 channels x 4 k per register
  // w = u - 128 (int8) of quads lo and hi: |w| as u8 and w itself (its sign, for vpsignb).
  struct Weights8 { __m256i abs_lo[2]; __m256i abs_hi[2]; __m256i lo[2]; __m256i hi[2]; };
  struct Group { __m256i z[2]; __m256 s[2]; };

  static IntAcc int_zero() { return {{_mm256_setzero_si256(), _mm256_setzero_si256()}}; }
  static FloatAcc float_zero() { return {{_mm256_setzero_ps(), _mm256_setzero_ps()}}; }

  template <int kBits>
  static auto load_weights(const uint8_t* chunk) {
    if constexpr (kBits == 4) {
      const __m256i mask = _mm256_set1_epi8(0x0f);
      Weights4 w;
      for (int h = 0; h < 2; ++h) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * h));
        w.lo[h] = _mm256_and_si256(bytes, mask);
        w.hi[h] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
      }
      return w;
    } else {
      const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
      Weights8 w;
      for (int h = 0; h < 2; ++h) {
        // vpabsb(-128) = 0x80, which vpmaddubsw reads as the unsigned 128 it should be.
        w.lo[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * h)), bias);
        w.hi[h] = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + kQuadBytes + 32 * h)), bias);
        w.abs_lo[h] = _mm256_abs_epi8(w.lo[h]);
        w.abs_hi[h] = _mm256_abs_epi8(w.hi[h]);
      }
      return w;
    }
  }

  // q8[0..3] and q8[4..7], each 4 int8 as one int32 broadcast to every channel.
  static void broadcast_q(const int8_t* q8, __m256i& b_lo, __m256i& b_hi) {
    int32_t q_lo, q_hi;
    __builtin_memcpy(&q_lo, q8, 4);
    __builtin_memcpy(&q_hi, q8 + 4, 4);
    b_lo = _mm256_set1_epi32(q_lo);
    b_hi = _mm256_set1_epi32(q_hi);
  }

  // 4-bit products are summed in int16 for runs of 4 chunks before one vpmaddwd widens them:
  // a lane of one vpmaddubsw is at most 2 * 15 * 127 = 3810, a chunk adds two (quads lo and
  // hi) and 4 chunks eight, 30480 < 32767. 8-bit pairs (up to 32512) have no such room.
  struct NarrowAcc { __m256i half[2]; };  // int16 pair sums, channel j's in lanes 2j, 2j + 1
  static constexpr int narrow_chunks(int bits) { return bits == 4 ? 4 : 1; }
  static NarrowAcc narrow_zero() { return {{_mm256_setzero_si256(), _mm256_setzero_si256()}}; }

  static void dot_narrow(NarrowAcc& acc, const Weights4& w, const int8_t* q8) {
    __m256i b_lo, b_hi;
    broadcast_q(q8, b_lo, b_hi);
    for (int h = 0; h < 2; ++h) {
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w.lo[h], b_lo), _mm256_maddubs_epi16(w.hi[h], b_hi));
      acc.half[h] = _mm256_add_epi16(acc.half[h], pairs);
    }
  }

  static void widen(IntAcc& acc, const NarrowAcc& narrow) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; ++h) acc.half[h] = _mm256_add_epi32(acc.half[h], _mm256_madd_epi16(narrow.half[h], ones));
  }

  // acc += sum q * (u - 128); the lo and hi pair sums (up to 32512 each) go to int32 apart.
  static void dot(IntAcc& acc, const Weights8& w, const int8_t* q8) {
    __m256i b_lo, b_hi;
    broadcast_q(q8, b_lo, b_hi);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; ++h) {
      const __m256i lo = _mm256_maddubs_epi16(w.abs_lo[h], _mm256_sign_epi8(b_lo, w.lo[h]));
      const __m256i hi = _mm256_maddubs_epi16(w.abs_hi[h], _mm256_sign_epi8(b_hi, w.hi[h]));
      acc.half[h] = _mm256_add_epi32(acc.half[h],
                                     _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones)));
    }
  }

  // z as int32; minus 128 for 8-bit weights, whose dot sums q * (u - 128).
  template <int kBits>
  static Group load_group(const uint8_t* z16, const float* s16) {
    const __m256i offset = _mm256_set1_epi32(kBits == 8 ? 128 : 0);
    Group g;
    for (int h = 0; h < 2; ++h) {
      g.z[h] = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z16 + 8 * h))),
                                offset);
      g.s[h] = _mm256_loadu_ps(s16 + 8 * h);
    }
    return g;
  }

  static void accumulate(FloatAcc& y, const IntAcc& acc, const Group& g, int32_t q_sum) {
    const __m256i sums = _mm256_set1_epi32(q_sum);
    for (int h = 0; h < 2; ++h) {
      const __m256i corrected = _mm256_sub_epi32(acc.half[h], _mm256_mullo_epi32(g.z[h], sums));
      y.half[h] = _mm256_fmadd_ps(g.s[h], _mm256_cvtepi32_ps(corrected), y.half[h]);
    }
  }

  static void store(float* y, const FloatAcc& acc, float row_scale, int valid) {
    const __m256 a = _mm256_set1_ps(row_scale);
    if (valid == kTileN) {
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + 8 * h, _mm256_mul_ps(a, acc.half[h]));
      return;
    }
    alignas(32) float tmp[kTileN];  // last tile of an N that is not a multiple of 16
    for (int h = 0; h < 2; ++h) _mm256_store_ps(tmp + 8 * h, _mm256_mul_ps(a, acc.half[h]));
    for (int j = 0; j < valid; ++j) y[j] = tmp[j];
  }
};

}  // namespace

const TileKernels kAvx2Kernels = {64, quantize_rows, gemm_tiles<Avx2Isa>};

}  // namespace cpu
}  // namespace fptq
