// Constants and plain structs of ai.fptq::W4A8MatMul and W8A8MatMul shared by host and device code.
//
// No ONNX Runtime header and no standard-library container here, so that CUDA (.cu) files can
// include it: nvcc cannot compile ORT's C++ headers. The op contract is docs/ops.md.
// (The CUDA kernel's own constants live in w4a8_cuda.h.)
#pragma once

#include <cstdint>

namespace fptq {

// Op identity, as written by passes/functions.py.
constexpr const char* kOpDomain = "ai.fptq";
constexpr const char* kOpType = "W4A8MatMul";
constexpr int kOpSinceVersion = 1;
// The 8-bit-weight op: W4A8MatMul's contract with one byte per weight. Version 2 of the domain:
// version 1 had another W8A8MatMul (int8 W[K, N], per-channel scales; no kernel), and a kernel
// registered from 1 would refuse those models' nodes instead of letting their function bodies run.
constexpr const char* kW8OpType = "W8A8MatMul";
constexpr int kW8OpSinceVersion = 2;

// The language-model head's op: W4A8MatMul over every channel, plus a second 4-bit weight (the
// residual of the first) on the top_k channels of each row (docs/ops.md). CPU only.
constexpr const char* kRescoredOpType = "W4A8RescoredMatMul";
constexpr int kRescoredOpSinceVersion = 2;

// The op type of the kernel for `weight_bits`-bit weights (4 or 8), for registration and messages.
constexpr const char* op_type_for_bits(int64_t weight_bits) { return weight_bits == 8 ? kW8OpType : kOpType; }

// Input indices of the node (docs/ops.md, "Inputs") and their count.
constexpr int kInX = 0;
constexpr int kInB = 1;
constexpr int kInScales = 2;
constexpr int kInZeroPoints = 3;
constexpr int kInActScale = 4;
constexpr int kNumInputs = 5;
// W4A8RescoredMatMul's residual weight, in the layout of B, scales and zero_points.
constexpr int kInResidualB = 5;
constexpr int kInResidualScales = 6;
constexpr int kInResidualZeroPoints = 7;
constexpr int kNumRescoredInputs = 8;

// act_mode attribute values.
constexpr int64_t kActPerTensorStatic = 0;  // a_m = act_scale for every row
constexpr int64_t kActPerTokenDynamic = 1;  // a_m = max_k |X[m, k]| / 127 (1 for an all-zero row)

// Symmetric int8 range [-127, 127]: -128 is never produced, so -q is always representable.
constexpr float kInt8Max = 127.0f;

// Largest group_size accepted: keeps sum_k q * (u - z) over a group exact in int32 even for
// weights and zero points up to 255 (127 * 255 * 2^16 < 2^31).
constexpr int64_t kMaxGroupSize = int64_t{1} << 16;

// The node's attributes (docs/ops.md, "Attributes"); checked by read_attributes() (w4a8_op.h).
// Both ops have them; weight_bits is not an attribute but the op's identity (4: W4A8MatMul,
// 8: W8A8MatMul), set by the kernel class.
struct W4A8Attrs {
  int64_t K = 0;           // reduction size; any K >= 1 (the last group may be partial)
  int64_t N = 0;           // output channels
  int64_t group_size = 0;  // weights per (n, group) along K; even
  int64_t act_mode = 0;    // kActPerTensorStatic or kActPerTokenDynamic
  int64_t weight_bits = 4; // 4 (B: two weights per byte) or 8 (B: one byte per weight)
  int64_t top_k = 0;       // W4A8RescoredMatMul: channels per row that get the residual; 0: another op
  // G = ceil(K / group_size): a K that is not a multiple of group_size ends in a partial group
  // (ONNX Runtime's MatMulNBits does the same).
  int64_t groups() const { return group_size > 0 ? (K + group_size - 1) / group_size : 0; }
  // The node's op type, for messages.
  const char* op_type() const { return top_k > 0 ? kRescoredOpType : op_type_for_bits(weight_bits); }
};

// Shapes of one call after checking: X viewed as [M, K], Y as [M, N].
struct W4A8Problem {
  W4A8Attrs attrs;
  int64_t M = 0;  // product of X's leading dims; may be 0
};

}  // namespace fptq
