// Portable tile kernel: plain C++ loops over fixed-size arrays, which g++ -O3 vectorizes for
// the baseline ISA of any target (SSE2 on x86-64, NEON on aarch64). The reference for the
// SIMD files: same layout, same order of integer operations.
#include "w4a8_cpu_tile.h"

namespace fptq {
namespace cpu {
namespace {

struct GenericIsa {
  struct IntAcc { int32_t v[kTileN]; };
  struct FloatAcc { float v[kTileN]; };
  // Unpacked chunk, the two quads: lo[4 * j + i] = u[j, i], hi[4 * j + i] = u[j, 4 + i].
  struct Weights { uint8_t lo[kQuadBytes]; uint8_t hi[kQuadBytes]; };
  struct Group { const uint8_t* z; const float* s; };

  static constexpr int narrow_chunks(int) { return 1; }  // int32 throughout
  static IntAcc int_zero() { return IntAcc{}; }
  static FloatAcc float_zero() { return FloatAcc{}; }

  // 4 bits: the quads are the low and high nibbles of the 64 bytes; 8 bits: the 128 bytes are
  // the quads already.
  template <int kBits>
  static Weights load_weights(const uint8_t* chunk) {
    Weights w;
    for (int b = 0; b < kQuadBytes; ++b) {
      w.lo[b] = kBits == 8 ? chunk[b] : chunk[b] & 0x0f;
      w.hi[b] = kBits == 8 ? chunk[kQuadBytes + b] : chunk[b] >> 4;
    }
    return w;
  }

  static void dot(IntAcc& acc, const Weights& w, const int8_t* q8) {
    for (int j = 0; j < kTileN; ++j) {
      int32_t sum = 0;
      for (int i = 0; i < 4; ++i) sum += w.lo[4 * j + i] * q8[i] + w.hi[4 * j + i] * q8[4 + i];
      acc.v[j] += sum;
    }
  }

  template <int kBits>
  static Group load_group(const uint8_t* z16, const float* s16) { return Group{z16, s16}; }

  static void accumulate(FloatAcc& y, const IntAcc& acc, const Group& g, int32_t q_sum) {
    for (int j = 0; j < kTileN; ++j) y.v[j] += g.s[j] * static_cast<float>(acc.v[j] - g.z[j] * q_sum);
  }

  static void store(float* y, const FloatAcc& acc, float row_scale, int valid) {
    for (int j = 0; j < valid; ++j) y[j] = row_scale * acc.v[j];
  }
};

}  // namespace

const TileKernels kGenericKernels = {64, quantize_rows, gemm_tiles<GenericIsa>};

}  // namespace cpu
}  // namespace fptq
