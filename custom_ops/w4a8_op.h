// ONNX Runtime glue of ai.fptq::W4A8MatMul and W8A8MatMul shared by every execution provider's kernel.
//
// A kernel for one execution provider (CPU: cpu_op.cc; CUDA: cuda_op.cc) is a class
//
//   struct MyKernel {
//     static constexpr const char* kExecutionProvider = "CPUExecutionProvider";
//     static constexpr ONNXTensorElementDataType kXType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // X and Y
//     static constexpr int kWeightBits = 4;   // 4: W4A8MatMul, 8: W8A8MatMul (same inputs, B one byte per weight)
//     static constexpr const char* kName = kOpType;          // the op type it serves
//     static constexpr int kSinceVersion = kOpSinceVersion;  // of the ai.fptq domain
//     static constexpr int kInputCount = kNumInputs;         // kNumRescoredInputs for W4A8RescoredMatMul
//     static OrtMemType InputMemoryType(size_t input);   // where ORT places each input
//     MyKernel(const OrtApi& api, const OrtKernelInfo* info);   // may throw
//     void Compute(OrtKernelContext* context);                   // may throw; called concurrently
//   };
//
// and W4A8CustomOp<MyKernel> turns it into the OrtCustomOp that register.cc adds to the
// ai.fptq domain (one op per X type: a float16 kernel is a second op with kXType FLOAT16). Exceptions never cross into ONNX Runtime: they become an OrtStatus, so a
// bad model or bad input fails the session creation or the run instead of the process.
//
// ORT's C++ headers: only .cc files include this header (nvcc cannot compile them).
#pragma once

#include <onnxruntime_cxx_api.h>

#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "w4a8_common.h"

namespace fptq {

// Throws the error that reaches the user: Ort::Exception(ORT_INVALID_ARGUMENT) whose message
// names the op and the node. op_type: kOpType or kW8OpType (op_type_for_bits); node: the node's
// name (may be empty); message: what is wrong.
[[noreturn]] void fail_invalid(const char* op_type, const std::string& node, const std::string& message);

// Reads and checks the attributes K, N, group_size and act_mode (docs/ops.md) of a node of the
// op for weight_bits-bit weights (4 or 8; stored in the result), and with `rescored`
// (W4A8RescoredMatMul) top_k too, in [1, N].
// info: the kernel info of the node. Throws (fail_invalid) on a missing or out-of-range one.
W4A8Attrs read_attributes(const Ort::ConstKernelInfo& info, int64_t weight_bits, bool rescored = false);

// The tensors of one call, checked against the attributes. Pointers are in the memory ORT
// gave the kernel for each input (host memory for the CPU kernel).
struct W4A8Tensors {
  W4A8Problem problem;          // M, K, N, group_size, act_mode
  ONNXTensorElementDataType x_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // of X and Y: FLOAT or FLOAT16
  const void* x = nullptr;            // x_type [M, K] (X flattened over its leading dims)
  const uint8_t* b = nullptr;         // uint8 [N, ceil(K/2)], two 4-bit weights per byte (8 bits: [N, K])
  const float* scales = nullptr;      // float32 [N, G], G = ceil(K/group_size)
  const uint8_t* zero_points = nullptr;  // uint8 [N, G]
  const float* act_scale = nullptr;   // float32, one element
  void* y = nullptr;                  // x_type [M, N], allocated here with shape [..., N]
};

// Checks the five inputs against attrs (X's type, ranks, dims, element counts; not values) and
// allocates the output Y[..., N] with X's type. context: the kernel context of the call; attrs: from
// read_attributes(); node: the node's name for messages. Throws (fail_invalid) on a mismatch.
W4A8Tensors bind_tensors(Ort::KernelContext& context, const W4A8Attrs& attrs, const std::string& node);

// W4A8RescoredMatMul's residual weight (inputs 5-7), checked like B, scales and zero_points.
struct ResidualTensors {
  const uint8_t* b = nullptr;            // uint8 [N, ceil(K/2)]
  const float* scales = nullptr;         // float32 [N, G]
  const uint8_t* zero_points = nullptr;  // uint8 [N, G]
};
ResidualTensors bind_residual(Ort::KernelContext& context, const W4A8Attrs& attrs, const std::string& node);

// True when every listed input is a constant initializer, whose buffer ORT keeps, unchanged,
// at one address for the session's lifetime: only then may packed weights be reused.
// info: the node's kernel info; inputs: input indices. "Cannot tell" counts as not constant,
// which is always correct (the kernel then packs per call).
bool inputs_constant(const Ort::ConstKernelInfo& info, std::initializer_list<int> inputs);

// One node's packed weights (Packed: host PackedWeights or a device buffer), kept for the
// session and keyed on the data pointers (and device) they were packed from: a changed key
// repacks. The mutex makes concurrent first calls pack once; later calls hold it only to copy
// the shared_ptr. Only for constant weights (inputs_constant): weights fed at run time may
// change between runs at the same address.
template <class Packed>
class PackedWeightCache {
 public:
  struct Key {
    const void* b = nullptr;
    const void* scales = nullptr;
    const void* zero_points = nullptr;
    int device = -1;  // -1 on the host
    bool operator==(const Key& o) const {
      return b == o.b && scales == o.scales && zero_points == o.zero_points && device == o.device;
    }
  };

  // The kept value for key, or pack()'s (a shared_ptr to the packed weights, stored for later
  // calls). pack runs under the lock: it must not wait for anything that takes it.
  template <class Pack>
  std::shared_ptr<const Packed> get(const Key& key, Pack&& pack) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!value_ || !(key_ == key)) {
      value_ = pack();
      key_ = key;
    }
    return value_;
  }

 private:
  std::mutex mutex_;
  Key key_;                              // guarded by mutex_
  std::shared_ptr<const Packed> value_;  // guarded by mutex_
};

// Runs body() and turns any exception into an OrtStatus (nullptr on success).
// api: the negotiated ORT API; body: a callable taking no argument.
template <class Body>
OrtStatusPtr run_guarded(const OrtApi& api, Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, "W4A8MatMul: out of memory");
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, "W4A8MatMul: unknown error");
  }
}

// Owns one Kernel and reports its exceptions as statuses (what CustomOpBase's V2 entry
// points expect).
template <class Kernel>
class GuardedKernel {
 public:
  GuardedKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api), kernel_(api, info) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return run_guarded(api_, [&] { kernel_.Compute(context); });
  }

 private:
  const OrtApi& api_;
  Kernel kernel_;
};

// The OrtCustomOp of Kernel::kName (W4A8MatMul since version 1; W8A8MatMul, Kernel::kWeightBits = 8,
// and W4A8RescoredMatMul since version 2) on Kernel's execution provider.
template <class Kernel>
struct W4A8CustomOp : Ort::CustomOpBase<W4A8CustomOp<Kernel>, GuardedKernel<Kernel>, /*WithStatus=*/true> {
  static_assert(Kernel::kWeightBits == 4 || Kernel::kWeightBits == 8, "4- or 8-bit weights");
  // api_version: the OrtApi version RegisterCustomOps negotiated; an older runtime rejects
  // an op struct that claims a newer version than its own.
  explicit W4A8CustomOp(uint32_t api_version) {
    this->version = api_version;
    this->start_ver_ = Kernel::kSinceVersion;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return run_guarded(api, [&] { *kernel = new GuardedKernel<Kernel>(api, info); });
  }
  const char* GetName() const { return Kernel::kName; }
  const char* GetExecutionProviderType() const { return Kernel::kExecutionProvider; }

  size_t GetInputTypeCount() const { return Kernel::kInputCount; }
  // X, then (B uint8, scales float, zero_points uint8, act_scale float) and the residual's
  // (B, scales, zero_points): the odd inputs are uint8, the even ones float.
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == kInX) return Kernel::kXType;
    return index % 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtMemType GetInputMemoryType(size_t index) const { return Kernel::InputMemoryType(index); }

  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return Kernel::kXType; }
};

// The op of Kernel<float> or Kernel<Ort::Float16_t> for X's type x_type (nullptr for another
// type), made on the first call. Never destroyed: sessions may outlive any scope here, and ORT
// holds only the pointer.
template <template <class> class Kernel>
const OrtCustomOp* w4a8_op_for(uint32_t api_version, ONNXTensorElementDataType x_type) {
  static const auto* op32 = new W4A8CustomOp<Kernel<float>>(api_version);
  static const auto* op16 = new W4A8CustomOp<Kernel<Ort::Float16_t>>(api_version);
  if (x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return op32;
  if (x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return op16;
  return nullptr;
}

}  // namespace fptq
