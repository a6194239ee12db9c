// CPU implementation of ai.fptq::W4A8MatMul and W8A8MatMul (docs/ops.md): weight repacking and
// the matmul. The two ops differ only in B (two 4-bit weights per byte, or one 8-bit weight):
// pack_weights() reads either into the tile layout, and everything after it is shared.
//
// Free of ONNX Runtime types: the caller (cpu_op.cc) hands in host pointers and a
// parallel-for; this file's functions never throw except std::bad_alloc and, from
// select_isa(), std::invalid_argument.
//
// Usage:
//   PackedWeights w = pack_weights(b, scales, zero_points, attrs);   // once per weight
//   w4a8_matmul(x, M, w, act_mode, act_scale, y, select_isa(getenv("FPTQ_CPU_ISA")), parallel_for);
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "w4a8_common.h"

namespace fptq {
namespace cpu {

// Instruction sets with a tile kernel, slowest first.
enum class Isa : int {
  kGeneric = 0,     // portable C++, any CPU
  kAvx2 = 1,        // x86-64 AVX2 (vpmaddubsw)
  kAvx512Vnni = 2,  // x86-64 AVX-512 BW/VL + VNNI (vpdpbusd)
  kAmx = 3,         // x86-64 AMX-INT8 tiles (tdpbssd) for many rows, AVX-512 VNNI for the rest
};

// The ISA the kernels run with. request: nullptr or "" or "auto" for the best this CPU
// supports, else one of "generic", "avx2", "avx512vnni", "amx" (e.g. $FPTQ_CPU_ISA, to test
// the slower paths). AMX also needs Linux to grant the process the tile state (arch_prctl).
// Throws std::invalid_argument for an unknown name or one this CPU lacks.
Isa select_isa(const char* request);

// "generic", "avx2", "avx512vnni" or "amx".
const char* isa_name(Isa isa);

// The weights of one node in the tile kernels' layout (w4a8_cpu_kernels.h explains it):
// output channels in tiles of 16, each group padded to a multiple of 8 along k.
struct PackedWeights {
  int64_t n = 0;              // output channels N
  int64_t k = 0;              // reduction size K
  int64_t group_size = 0;     // weights per group along K
  int64_t groups = 0;         // G = ceil(K / group_size); the last group may be partial (padding)
  int64_t group_padded = 0;   // min(group_size, K) rounded up to a multiple of 8
  int64_t tiles = 0;          // ceil(N / 16)
  int64_t weight_bits = 4;    // 4 or 8: the chunk format (chunk_bytes(weight_bits) bytes per chunk)
  std::vector<uint8_t> weights;      // uint8 [tiles, G, group_padded / 8, chunk_bytes(weight_bits)]
  std::vector<float> scales;         // float32 [tiles, G, 16]; 0 for padded channels
  std::vector<uint8_t> zero_points;  // uint8 [tiles, G, 16]; 0 for padded channels
  uint8_t max_zero_point = 0;        // the largest zero point
};

// Runs task(i) for every i in [0, count), possibly concurrently, and returns when all are done.
// task must not throw.
using ParallelFor = std::function<void(size_t count, const std::function<void(size_t)>& task)>;

// Runs tasks one after another (for callers without a thread pool, e.g. tests).
void serial_for(size_t count, const std::function<void(size_t)>& task);

// Repacks one node's weights (docs/ops.md layout) for the tile kernels.
// b: uint8 [N, ceil(K/2)], even k in the low nibble (attrs.weight_bits 4), or uint8 [N, K] (8);
// scales: float32 [N, G]; zero_points: uint8 [N, G]; attrs: the node's checked attributes
// (K, N, group_size, weight_bits); parallel_for: splits the work.
PackedWeights pack_weights(const uint8_t* b, const float* scales, const uint8_t* zero_points, const W4A8Attrs& attrs,
                           const ParallelFor& parallel_for = serial_for);

// Y = W4A8MatMul(X) or W8A8MatMul(X) for one node (w says which).
// x: float32 [M, K]; m: rows M (>= 0); w: from pack_weights(); act_mode: kActPerTensorStatic or
// kActPerTokenDynamic; act_scale: the static scale (finite, > 0; unused in dynamic mode);
// y: float32 [M, N], fully written; isa: from select_isa(); parallel_for: splits the work.
void w4a8_matmul(const float* x, int64_t m, const PackedWeights& w, int64_t act_mode, float act_scale, float* y,
                 Isa isa, const ParallelFor& parallel_for);

// W4A8RescoredMatMul's residual weight as stored (docs/ops.md layout of B, scales, zero_points).
struct ResidualWeights {
  const uint8_t* b = nullptr;            // uint8 [N, ceil(K/2)], even k in the low nibble
  const float* scales = nullptr;         // float32 [N, G]
  const uint8_t* zero_points = nullptr;  // uint8 [N, G]
  int64_t k = 0, n = 0, group_size = 0;
};

// The rescoring of W4A8RescoredMatMul (w4a8_cpu_rescore.cc): y [M, N] holds W4A8MatMul's C;
// on each row's top_k channels by C (ties: the lower channel), adds R, the W4A8MatMul of the
// residual r for x [M, K] with the same act_mode and act_scale. top_k in [1, N].
void add_residual_on_top_k(const float* x, int64_t m, const ResidualWeights& r, int64_t act_mode, float act_scale,
                           int64_t top_k, float* y, const ParallelFor& parallel_for);

}  // namespace cpu
}  // namespace fptq
