// The CPUExecutionProvider kernels of ai.fptq::W4A8MatMul, W8A8MatMul and W4A8RescoredMatMul
// (one class, the weight width and the rescoring template parameters): checks the inputs, repacks
// the weights once and caches them, and runs w4a8_cpu.h on ONNX Runtime's intra-op thread pool.
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "w4a8_cpu.h"
#include "w4a8_op.h"

namespace fptq {
namespace {

// XT: the element type of X and Y, float or Ort::Float16_t. The math is float32 either way;
// float16 X is widened and Y narrowed (round to nearest even, like the function body's
// CastLike), which costs two passes over X and Y, small next to the matmul.
// kBits: 4 (W4A8MatMul) or 8 (W8A8MatMul); everything but the repacking of B is shared.
// kRescored: W4A8RescoredMatMul, W4A8MatMul followed by the top-k residual (kBits 4).
template <class XT, int kBits, bool kRescored = false>
class CpuKernel {
 public:
  static_assert(std::is_same_v<XT, float> || std::is_same_v<XT, Ort::Float16_t>, "float32 or float16 X");
  static constexpr const char* kExecutionProvider = "CPUExecutionProvider";
  static constexpr int kWeightBits = kBits;
  static_assert(!kRescored || kBits == 4, "the rescored head has 4-bit weights");
  static constexpr const char* kName = kRescored ? kRescoredOpType : op_type_for_bits(kBits);
  static constexpr int kSinceVersion =
      kRescored ? kRescoredOpSinceVersion : kBits == 8 ? kW8OpSinceVersion : kOpSinceVersion;
  static constexpr int kInputCount = kRescored ? kNumRescoredInputs : kNumInputs;
  static constexpr ONNXTensorElementDataType kXType =
      std::is_same_v<XT, float> ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  static OrtMemType InputMemoryType(size_t /*input*/) { return OrtMemTypeDefault; }

  // Reads the attributes and the ISA ($FPTQ_CPU_ISA, default: the best the CPU has), and asks
  // ORT whether the weights are constant initializers. api: unused (the C++ API's global
  // table is set); info: the node. Throws on a bad attribute or ISA request.
  CpuKernel(const OrtApi& /*api*/, const OrtKernelInfo* info)
      : node_(Ort::ConstKernelInfo(info).GetNodeName()),
        attrs_(read_attributes(Ort::ConstKernelInfo(info), kBits, kRescored)),
        isa_(isa_from_environment(node_)),
        weights_constant_(inputs_constant(Ort::ConstKernelInfo(info), {kInB, kInScales, kInZeroPoints})) {}

  // One run of the node; called concurrently when a session is run from several threads.
  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const W4A8Tensors t = bind_tensors(context, attrs_, node_);  // allocates Y, even with M = 0
    if (t.x_type != kXType) fail_invalid(kName, node_, "X's element type does not match the kernel's");
    if (t.problem.M == 0) return;
    const float act_scale = *t.act_scale;
    // A subnormal scale would overflow 1 / act_scale (docs/ops.md step 3): refused like 0.
    if (attrs_.act_mode == kActPerTensorStatic &&
        !(std::isfinite(act_scale) && act_scale >= std::numeric_limits<float>::min())) {
      fail_invalid(kName, node_, "act_scale=" + std::to_string(act_scale) +
                              " must be finite and > 0, at least 2^-126 (a normal float32), with act_mode=0");
    }
    const cpu::ParallelFor parallel_for = [&context](size_t count, const std::function<void(size_t)>& task) {
      run_on_ort_threads(context, count, task);
    };
    const std::shared_ptr<const cpu::PackedWeights> weights = packed_weights(t, parallel_for);
    const int64_t m = t.problem.M;
    cpu::ResidualWeights residual;
    if constexpr (kRescored) {
      const ResidualTensors r = bind_residual(context, attrs_, node_);
      residual = {r.b, r.scales, r.zero_points, attrs_.K, attrs_.N, attrs_.group_size};
    }
    auto run = [&](const float* x, float* y) {
      cpu::w4a8_matmul(x, m, *weights, attrs_.act_mode, act_scale, y, isa_, parallel_for);
      if constexpr (kRescored) {
        cpu::add_residual_on_top_k(x, m, residual, attrs_.act_mode, act_scale, attrs_.top_k, y, parallel_for);
      }
    };
    if constexpr (std::is_same_v<XT, float>) {
      run(static_cast<const float*>(t.x), static_cast<float*>(t.y));
    } else {
      const auto* x16 = static_cast<const XT*>(t.x);
      auto* y16 = static_cast<XT*>(t.y);
      std::vector<float> x(static_cast<size_t>(m * attrs_.K)), y(static_cast<size_t>(m * attrs_.N));
      for (size_t i = 0; i < x.size(); ++i) x[i] = x16[i].ToFloat();
      run(x.data(), y.data());
      for (size_t i = 0; i < y.size(); ++i) y16[i] = XT(y[i]);
    }
  }

 private:
  static cpu::Isa isa_from_environment(const std::string& node) {
    try {
      return cpu::select_isa(std::getenv("FPTQ_CPU_ISA"));
    } catch (const std::invalid_argument& e) {
      fail_invalid(kName, node, e.what());
    }
  }

  // The packed weights for this call's B, scales and zero_points: kept across calls when they
  // are constant (PackedWeightCache), packed per call when fed as graph inputs.
  // parallel_for: splits the packing (the pool's tasks never take the cache's mutex, so
  // waiting for them while holding it cannot deadlock).
  std::shared_ptr<const cpu::PackedWeights> packed_weights(const W4A8Tensors& t, const cpu::ParallelFor& parallel_for) {
    auto pack = [&] {
      return std::make_shared<const cpu::PackedWeights>(
          cpu::pack_weights(t.b, t.scales, t.zero_points, attrs_, parallel_for));
    };
    if (!weights_constant_) return pack();
    return cache_.get({t.b, t.scales, t.zero_points}, pack);
  }

  // cpu::ParallelFor on the session's intra-op pool: it honours intra_op_num_threads and is
  // shared with ORT's own kernels, so concurrent runs do not oversubscribe the machine.
  static void run_on_ort_threads(const Ort::KernelContext& context, size_t count,
                                 const std::function<void(size_t)>& task) {
    if (count <= 1) return cpu::serial_for(count, task);
    auto trampoline = [](void* data, size_t i) { (*static_cast<const std::function<void(size_t)>*>(data))(i); };
    context.ParallelFor(trampoline, count, 0, const_cast<std::function<void(size_t)>*>(&task));
  }

  const std::string node_;
  const W4A8Attrs attrs_;
  const cpu::Isa isa_;
  const bool weights_constant_;
  PackedWeightCache<cpu::PackedWeights> cache_;
};

}  // namespace

template <class XT>
using CpuW4A8Kernel = CpuKernel<XT, 4>;
template <class XT>
using CpuW8A8Kernel = CpuKernel<XT, 8>;
template <class XT>
using CpuRescoredKernel = CpuKernel<XT, 4, /*kRescored=*/true>;

const OrtCustomOp* cpu_w4a8_op(uint32_t api_version, ONNXTensorElementDataType x_type) {
  return w4a8_op_for<CpuW4A8Kernel>(api_version, x_type);
}

const OrtCustomOp* cpu_w8a8_op(uint32_t api_version, ONNXTensorElementDataType x_type) {
  return w4a8_op_for<CpuW8A8Kernel>(api_version, x_type);
}

const OrtCustomOp* cpu_rescored_op(uint32_t api_version, ONNXTensorElementDataType x_type) {
  return w4a8_op_for<CpuRescoredKernel>(api_version, x_type);
}

}  // namespace fptq
