// Bodies of the CPU tile kernels, compiled once per ISA.
//
// Each w4a8_cpu_<isa>.cc defines a struct of vector primitives (the "Isa" below), includes
// this header and exports TileKernels{rows_per_task, quantize_rows, gemm_tiles<Isa>}; the
// AVX-512 and AMX files have gemm kernels of their own and take only quantize_rows and
// TaskScratch from here (w4a8_cpu_avx512.cc explains why). Every ISA file is
// compiled with its own -m flags, so everything here lives in an anonymous namespace and uses
// compiler builtins instead of std:: inline functions: an out-of-line copy with external
// linkage could otherwise be shared by the linker across files and run AVX-512 code on a CPU
// without it (the classic multi-ISA ODR trap).
//
// An Isa provides, for one tile of kTileN = 16 output channels and kBits-bit weights (4 or 8):
//   IntAcc, FloatAcc, Group                   register types (int32 x16, float x16, ...)
//   IntAcc int_zero();  FloatAcc float_zero();
//   auto load_weights<kBits>(const uint8_t* chunk)   one packed chunk, ready for dot (the
//        4-bit one unpacked from its nibbles; the type may differ per kBits)
//   void dot(IntAcc& acc, const <weights>& w, const int8_t* q8)
//        acc[j] += sum_{i<4} u[j, i] * q8[i] + u[j, 4 + i] * q8[4 + i]   (q8: 8 int8),
//        or that sum minus a constant c * sum_i q8[i] that load_group folds into z
//   static constexpr int narrow_chunks(int bits)
//        chunks of bits-bit weights whose dot products fit the Isa's narrow accumulators; 1
//        (none) or more, with then also:
//   NarrowAcc narrow_zero();  void dot_narrow(NarrowAcc&, const <weights>&, const int8_t* q8)
//        (as dot, into the narrow lanes);  void widen(IntAcc& acc, const NarrowAcc& narrow)
//   Group load_group<kBits>(const uint8_t* z16, const float* s16)
//   void accumulate(FloatAcc& y, const IntAcc& acc, const Group& g, int32_t q_sum)
//        y[j] += s[j] * float(acc[j] - z[j] * q_sum)     (the zero-point correction)
//   void store(float* y, const FloatAcc& acc, float row_scale, int valid)
//        y[j] = row_scale * acc[j] for j < valid
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>

#include "w4a8_common.h"
#include "w4a8_cpu_kernels.h"

namespace fptq {
namespace cpu {
namespace {

// Scratch memory of a kernel task, meant to be thread_local: grown on demand and kept, so that
// a thread allocates nothing once it has seen its largest task; only the owning thread touches
// it. Plain new[] rather than std::vector, for the ODR reason above.
class TaskScratch {
 public:
  TaskScratch() = default;
  TaskScratch(const TaskScratch&) = delete;
  TaskScratch& operator=(const TaskScratch&) = delete;
  ~TaskScratch() { delete[] data_; }
  // At least `bytes` bytes (64-byte aligned), or nullptr when memory is short (tasks must not
  // throw: callers fall back to a path without scratch).
  uint8_t* get(size_t bytes) {
    if (bytes > size_) {
      delete[] data_;
      data_ = new (std::nothrow) uint8_t[bytes + 63];
      size_ = data_ != nullptr ? bytes : 0;
    }
    if (data_ == nullptr) return nullptr;
    const auto address = reinterpret_cast<uintptr_t>(data_);
    return data_ + ((64 - address % 64) % 64);
  }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Bits of |x| for +Inf: larger patterns (sign cleared) are NaNs.
constexpr uint32_t kInfBits = 0x7f800000u;
// Smallest dynamic a_m kept (2^-126, the smallest normal float32): below it 1 / a_m would
// overflow or lose precision, so the row gets a_m = 1 like an all-zero row (docs/ops.md step 2).
constexpr float kMinTokenScale = 1.17549435e-38f;

// max_k of the bits of |x[k]| (sign cleared), x: float32 [k]. For non-negative floats the
// integer order is the float order, and an integer max reduction vectorizes without
// -ffast-math (a float one does not); NaNs compare above +Inf (kInfBits).
inline uint32_t abs_max_bits(const float* x, int64_t k) {
  uint32_t amax_bits = 0;
  for (int64_t i = 0; i < k; ++i) {
    uint32_t bits;
    __builtin_memcpy(&bits, x + i, sizeof bits);
    bits &= 0x7fffffffu;
    amax_bits = bits > amax_bits ? bits : amax_bits;
  }
  return amax_bits;
}

// a_m = max_k |x[k]| / 127 for the row's abs_max_bits, or 1 when that is below
// kMinTokenScale (an all-zero row, or one so small that 1 / a_m overflows); NaN or Inf stay.
inline float token_scale(uint32_t amax_bits) {
  float amax;
  __builtin_memcpy(&amax, &amax_bits, sizeof amax);
  const float scale = amax / kInt8Max;
  return scale < kMinTokenScale ? 1.0f : scale;
}

// q[i] = clip(rint(x[i] * inv), -127, 127) for i < count; returns sum_i q[i].
// x: float32 [count]; inv: 1 / a_m; q: out int8 [count].
// Clipping first and rounding second gives the same q (the bounds are integers) and makes
// the float -> int conversion always defined: the comparisons send NaN to 127.
inline int32_t quantize_span(const float* x, int64_t count, float inv, int8_t* q) {
  int32_t sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    float v = x[i] * inv;
    v = v <= kInt8Max ? v : kInt8Max;
    v = v >= -kInt8Max ? v : -kInt8Max;
    // nearbyint rounds half to even in the default rounding mode, like numpy's rint.
    const int32_t qi = static_cast<int32_t>(__builtin_nearbyintf(v));
    q[i] = static_cast<int8_t>(qi);
    sum += qi;
  }
  return sum;
}

// TileKernels::quantize_rows: docs/ops.md steps 2-3 for rows [row_begin, row_end).
void quantize_rows(const QuantizeArgs& a, int64_t row_begin, int64_t row_end) {
  for (int64_t m = row_begin; m < row_end; ++m) {
    const float* x = a.x + m * a.k;
    const uint32_t amax_bits = abs_max_bits(x, a.k);
    const float scale = a.act_mode == kActPerTokenDynamic ? token_scale(amax_bits) : a.act_scale;
    const float inv = 1.0f / scale;
    int8_t* q = a.q + m * a.q_stride;
    for (int64_t g = 0; g < a.groups; ++g) {
      // A last partial group (K % group_size != 0) has fewer values; the rest is padding.
      const int64_t len = a.k - g * a.group_size < a.group_size ? a.k - g * a.group_size : a.group_size;
      int8_t* q_group = q + g * a.group_padded;
      a.q_group_sums[m * a.groups + g] = quantize_span(x + g * a.group_size, len, inv, q_group);
      for (int64_t p = len; p < a.group_padded; ++p) q_group[p] = 0;
    }
    // docs/ops.md "NaN and Inf", as in the function body: a NaN in the row (either mode) or an
    // infinite a_m (dynamic mode, an Inf in the row) makes the whole Y row NaN; the NaN row
    // scale multiplies every output channel of the row. (Static mode saturates an Inf to +-127.)
    const bool poisoned = amax_bits > kInfBits || !(scale <= __FLT_MAX__);
    a.row_scales[m] = poisoned ? __builtin_nanf("") : scale;
  }
}

// Y for kRows rows starting at `row` and one tile of kBits-bit weights: the weights of each
// chunk are loaded (unpacked) once and used for all kRows rows, whose accumulators stay in
// registers. a: the kernel arguments; tile: tile index; row: first row (row + kRows <= M).
//
// Where the Isa has narrow accumulators for kBits-bit products (Isa::narrow_chunks(kBits) > 1:
// AVX2's int16 lanes for 4-bit weights), runs of that many chunks are summed in them and
// widened once per run, which saves most of the widening multiplies (vpmaddwd) on the
// multiply ports that the products themselves (vpmaddubsw) need.
template <class Isa, int kBits, int kRows>
void gemm_block(const GemmArgs& a, int64_t tile, int64_t row) {
  constexpr int64_t kBytes = chunk_bytes(kBits);
  constexpr int64_t kNarrowRun = Isa::narrow_chunks(kBits);
  const int64_t chunks_per_tile = a.groups * a.chunks_per_group;
  const uint8_t* w_tile = a.weights + tile * chunks_per_tile * kBytes;
  const float* s_tile = a.scales + tile * a.groups * kTileN;
  const uint8_t* z_tile = a.zero_points + tile * a.groups * kTileN;
  const int8_t* q = a.q + row * a.q_stride;

  typename Isa::FloatAcc y[kRows];
  for (int r = 0; r < kRows; ++r) y[r] = Isa::float_zero();
  for (int64_t g = 0; g < a.groups; ++g) {
    // Stage 1: exact int32 dot products over the group. A partial last group's padding chunks
    // (u = q = 0) add nothing and are skipped in full row blocks, where the weights come from
    // the caches (11% of the work of K = 576 at group 128). Fewer rows stream the weights from
    // memory, and there the gap that skipping leaves after every tile costs more than reading
    // it: the hardware prefetcher loses the stream (SmolLM2 decode on Zen 3: 161-175 tok/s
    // skipping, 188 reading).
    typename Isa::IntAcc acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = Isa::int_zero();
    const int64_t c_begin = g * a.chunks_per_group;
    const bool skip_padding = kRows == kRowBlock && g + 1 == a.groups;
    const int64_t c_end = c_begin + (skip_padding ? a.last_group_chunks : a.chunks_per_group);
    if constexpr (kNarrowRun > 1) {
      for (int64_t run = c_begin; run < c_end; run += kNarrowRun) {
        typename Isa::NarrowAcc narrow[kRows];
        for (int r = 0; r < kRows; ++r) narrow[r] = Isa::narrow_zero();
        const int64_t run_end = run + kNarrowRun < c_end ? run + kNarrowRun : c_end;
        for (int64_t c = run; c < run_end; ++c) {
          const auto w = Isa::template load_weights<kBits>(w_tile + c * kBytes);
          for (int r = 0; r < kRows; ++r) Isa::dot_narrow(narrow[r], w, q + r * a.q_stride + c * kChunkK);
        }
        for (int r = 0; r < kRows; ++r) Isa::widen(acc[r], narrow[r]);
      }
    } else {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const auto w = Isa::template load_weights<kBits>(w_tile + c * kBytes);
        for (int r = 0; r < kRows; ++r) Isa::dot(acc[r], w, q + r * a.q_stride + c * kChunkK);
      }
    }
    // Stage 2: zero-point correction and group scale, in float.
    const typename Isa::Group group = Isa::template load_group<kBits>(z_tile + g * kTileN, s_tile + g * kTileN);
    for (int r = 0; r < kRows; ++r) Isa::accumulate(y[r], acc[r], group, a.q_group_sums[(row + r) * a.groups + g]);
  }
  // Stage 3: row scale a_m, and only the channels that exist.
  const int64_t n0 = tile * kTileN;
  const int valid = static_cast<int>(a.n - n0 < kTileN ? a.n - n0 : kTileN);
  for (int r = 0; r < kRows; ++r) Isa::store(a.y + (row + r) * a.n + n0, y[r], a.row_scales[row + r], valid);
}

// Rows in blocks of kRowBlock, then a 1-3 row remainder, for kBits-bit weights. (Blocks of 2
// or 3 rows, whose accumulators all fit AVX2's 16 registers, measured slower on Zen 3: the
// spilled accumulators cost less than loading and unpacking the weights for fewer rows.)
template <class Isa, int kBits>
void gemm_tiles_of(const GemmArgs& a, int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end) {
  static_assert(kRowBlock == 4, "the remainder switch below assumes blocks of 4 rows");
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    int64_t row = row_begin;
    for (; row + kRowBlock <= row_end; row += kRowBlock) gemm_block<Isa, kBits, kRowBlock>(a, tile, row);
    switch (row_end - row) {
      case 3: gemm_block<Isa, kBits, 3>(a, tile, row); break;
      case 2: gemm_block<Isa, kBits, 2>(a, tile, row); break;
      case 1: gemm_block<Isa, kBits, 1>(a, tile, row); break;
      default: break;
    }
  }
}

// TileKernels::gemm_tiles: the weight format is chosen once per task, not per chunk.
template <class Isa>
void gemm_tiles(const GemmArgs& a, int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end) {
  if (a.weight_bits == 8) {
    gemm_tiles_of<Isa, 8>(a, row_begin, row_end, tile_begin, tile_end);
  } else {
    gemm_tiles_of<Isa, 4>(a, row_begin, row_end, tile_begin, tile_end);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fptq
