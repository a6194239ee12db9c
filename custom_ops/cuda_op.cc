// The CUDAExecutionProvider kernel of ai.fptq::W4A8MatMul: checks the inputs, repacks the
// weights once into a device buffer it keeps, and runs the launchers of w4a8_cuda.h on ONNX
// Runtime's compute stream. Built only with CUDA (FPTQ_WITH_CUDA, CMakeLists.txt).
//
// Memory:
//   * inputs and Y live on the device (OrtMemTypeDefault for every input); act_scale stays on
//     the device too, the launcher reads it from there;
//   * packed weights: one cudaMalloc'ed buffer per node, filled on the first Compute (under a
//     mutex, keyed on the weights' device pointers and the device), freed by the destructor.
//     Weights fed as graph inputs (not initializers) are repacked per call into a
//     stream-ordered buffer instead;
//   * workspace: per call, stream-ordered (cudaMallocFromPoolAsync / cudaFreeAsync on the
//     compute stream) from a memory pool of this library per device that keeps its memory
//     (release threshold: unlimited), so after the first runs an allocation costs a few
//     microseconds. Stream ordering makes it safe when several threads run one session at once,
//     each on its own compute stream: a buffer freed on one stream is reused by another only
//     once the freeing stream has passed that point. (ORT's allocator from
//     KernelContext::GetAllocator frees at once, while the kernel may still be running.)
// Nothing here synchronizes the stream except the one-time repack (so that other threads'
// streams may read the packed weights as soon as they see them) and, with act_mode 0, the
// one-time check of an act_scale initializer.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>

#include "ops.h"
#include "w4a8_cuda.h"
#include "w4a8_op.h"

namespace fptq {
namespace {

// Limits of the launchers (w4a8_cuda.h, "Limits").
constexpr int64_t kCudaMaxK = int64_t{1} << 24;
constexpr int64_t kCudaMaxN = 8388480;

// Throws the ORT error for a failed CUDA call: names the node, the call and CUDA's message.
[[noreturn]] void fail_cuda(const std::string& node, const char* call, cudaError_t error) {
  throw Ort::Exception(std::string(kOpType) + " node '" + node + "' (CUDA): " + call + " failed: " +
                           cudaGetErrorName(error) + ": " + cudaGetErrorString(error),
                       ORT_EP_FAIL);
}

void check_cuda(cudaError_t error, const std::string& node, const char* call) {
  if (error != cudaSuccess) fail_cuda(node, call, error);
}

// Makes `device` current for the scope and restores the previous device afterwards (ORT's
// threads normally have the EP's device current already; then this costs one cudaGetDevice).
class DeviceScope {
 public:
  DeviceScope(int device, const std::string& node) {
    check_cuda(cudaGetDevice(&previous_), node, "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), node, "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// A cudaMalloc'ed buffer, freed (on its device) when the last owner lets go.
class DeviceBuffer {
 public:
  DeviceBuffer(int device, size_t bytes, const std::string& node) : device_(device) {
    check_cuda(cudaMalloc(&ptr_, bytes), node, "cudaMalloc (packed weights)");
  }
  ~DeviceBuffer() {
    // Errors are ignored: at process exit the CUDA runtime may already be unloaded.
    int previous = 0;
    const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device_;
    if (restore) cudaSetDevice(device_);
    cudaFree(ptr_);
    if (restore) cudaSetDevice(previous);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }

 private:
  int device_;
  void* ptr_ = nullptr;
};

// The workspace memory pool of `device`, created on first use and kept for the process (like
// ORT's own arena). nullptr when the device has no stream-ordered allocator (then
// StreamBuffer falls back to cudaMalloc / synchronize / cudaFree).
cudaMemPool_t workspace_pool(int device, const std::string& node) {
  static std::mutex mutex;
  static std::map<int, cudaMemPool_t> pools;  // never destroyed: see above
  std::lock_guard<std::mutex> lock(mutex);
  auto found = pools.find(device);
  if (found != pools.end()) return found->second;
  int supported = 0;
  check_cuda(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device), node,
             "cudaDeviceGetAttribute(MemoryPoolsSupported)");
  cudaMemPool_t pool = nullptr;
  if (supported) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    check_cuda(cudaMemPoolCreate(&pool, &props), node, "cudaMemPoolCreate");
    uint64_t keep_all = std::numeric_limits<uint64_t>::max();
    check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all), node,
               "cudaMemPoolSetAttribute(ReleaseThreshold)");
  }
  pools.emplace(device, pool);
  return pool;
}

// Per-call scratch memory, allocated and freed in the order of `stream`.
class StreamBuffer {
 public:
  StreamBuffer(cudaMemPool_t pool, size_t bytes, cudaStream_t stream, const std::string& node)
      : pool_(pool), stream_(stream) {
    if (bytes == 0) return;
    if (pool_ != nullptr) {
      check_cuda(cudaMallocFromPoolAsync(&ptr_, bytes, pool_, stream_), node, "cudaMallocFromPoolAsync (workspace)");
    } else {
      check_cuda(cudaMalloc(&ptr_, bytes), node, "cudaMalloc (workspace)");
    }
  }
  ~StreamBuffer() {
    if (ptr_ == nullptr) return;
    if (pool_ != nullptr) {
      cudaFreeAsync(ptr_, stream_);
    } else {
      cudaStreamSynchronize(stream_);  // the fallback: the kernels must be done before cudaFree
      cudaFree(ptr_);
    }
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  void* get() const { return ptr_; }

 private:
  cudaMemPool_t pool_;
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

// Fails unless the launchers handle these attributes; the message names what is refused.
void check_cuda_limits(const W4A8Attrs& attrs, const std::string& node) {
  const int64_t gs = attrs.group_size;
  if (gs != 32 && gs != 64 && gs % 128 != 0) {
    fail_invalid(kOpType, node, "group_size=" + std::to_string(gs) +
                           " is not supported by the CUDA kernel (it supports 32, 64 and multiples of 128); "
                           "run this model with CPUExecutionProvider or re-quantize it with a supported group size");
  }
  if (attrs.K % gs != 0) {  // the launchers have no partial groups; padding X and B here is untested (no GPU)
    fail_invalid(kOpType, node, "K=" + std::to_string(attrs.K) + " is not a multiple of group_size=" +
                           std::to_string(gs) + ", which the CUDA kernel does not support yet; run this model with "
                           "CPUExecutionProvider or re-quantize it with a group size that divides K");
  }
  if (attrs.K > kCudaMaxK) {
    fail_invalid(kOpType, node, "K=" + std::to_string(attrs.K) + " exceeds the CUDA kernel's limit of " +
                           std::to_string(kCudaMaxK));
  }
  if (attrs.N > kCudaMaxN) {
    fail_invalid(kOpType, node, "N=" + std::to_string(attrs.N) + " exceeds the CUDA kernel's limit of " +
                           std::to_string(kCudaMaxN));
  }
  size_t bytes = 0;  // host-only check of the launcher itself: catches any limit missed above
  if (fptq_w4a8_packed_size(static_cast<int>(attrs.N), static_cast<int>(attrs.K), static_cast<int>(gs), &bytes) !=
      cudaSuccess) {
    fail_invalid(kOpType, node, "K=" + std::to_string(attrs.K) + ", N=" + std::to_string(attrs.N) + ", group_size=" +
                           std::to_string(gs) + " are not supported by the CUDA kernel");
  }
}

// XT: the element type of X and Y, float or Ort::Float16_t; the launchers take both directly.
template <class XT>
class CudaW4A8Kernel {
 public:
  static_assert(std::is_same_v<XT, float> || std::is_same_v<XT, Ort::Float16_t>, "float32 or float16 X");
  static constexpr const char* kExecutionProvider = "CUDAExecutionProvider";
  static constexpr ONNXTensorElementDataType kXType =
      std::is_same_v<XT, float> ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  static constexpr int kDtype = std::is_same_v<XT, float> ? FPTQ_DTYPE_FLOAT32 : FPTQ_DTYPE_FLOAT16;
  // W4A8MatMul only: W8A8MatMul has no CUDA kernel (docs/ops.md), its nodes run on the CPU kernel.
  static constexpr int kWeightBits = 4;
  static constexpr const char* kName = kOpType;
  static constexpr int kSinceVersion = kOpSinceVersion;
  static constexpr int kInputCount = kNumInputs;
  // Every input on the device, act_scale included (the launcher reads it there).
  static OrtMemType InputMemoryType(size_t /*input*/) { return OrtMemTypeDefault; }

  // Reads and checks the attributes, against the CUDA kernel's limits too (an unsupported
  // group size fails the session creation with a message naming it), and asks ORT which
  // inputs are constant initializers. No CUDA call: creating a session does not touch the GPU
  // here. api: unused (the C++ API's global table is set); info: the node.
  CudaW4A8Kernel(const OrtApi& /*api*/, const OrtKernelInfo* info)
      : node_(Ort::ConstKernelInfo(info).GetNodeName()),
        attrs_(read_attributes(Ort::ConstKernelInfo(info), kWeightBits)),
        weights_constant_(inputs_constant(Ort::ConstKernelInfo(info), {kInB, kInScales, kInZeroPoints})),
        act_scale_constant_(inputs_constant(Ort::ConstKernelInfo(info), {kInActScale})) {
    check_cuda_limits(attrs_, node_);
  }

  // One run of the node; called concurrently when a session is run from several threads.
  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const W4A8Tensors t = bind_tensors(context, attrs_, node_);  // allocates Y, even with M = 0
    if (t.x_type != kXType) fail_invalid(kOpType, node_, "X's element type does not match the kernel's");
    if (t.problem.M == 0) return;

    const int device = context.GetInput(kInX).GetTensorMemoryInfo().GetDeviceId();
    DeviceScope scope(device, node_);
    auto stream = static_cast<cudaStream_t>(context.GetGPUComputeStream());
    const int n = static_cast<int>(attrs_.N), k = static_cast<int>(attrs_.K), gs = static_cast<int>(attrs_.group_size);
    const cudaMemPool_t pool = workspace_pool(device, node_);

    // Packed weights: the kept buffer, or (weights fed at run time) one for this call only.
    std::shared_ptr<const DeviceBuffer> kept;
    std::unique_ptr<StreamBuffer> per_call;
    const void* packed = nullptr;
    if (weights_constant_) {
      kept = packed_weights(t, device, stream);
      packed = kept->get();
    } else {
      size_t bytes = 0;
      check_cuda(fptq_w4a8_packed_size(n, k, gs, &bytes), node_, "fptq_w4a8_packed_size");
      per_call = std::make_unique<StreamBuffer>(pool, bytes, stream, node_);
      check_cuda(fptq_w4a8_repack_cuda(t.b, t.scales, t.zero_points, n, k, gs, per_call->get(), stream), node_,
                 "fptq_w4a8_repack_cuda");
      packed = per_call->get();
    }
    if (attrs_.act_mode == kActPerTensorStatic && !(act_scale_constant_ && weights_constant_)) {
      check_act_scale(t.act_scale, stream);  // not checked once with the kept weights: per call (one sync)
    }

    size_t workspace_bytes = 0;
    check_cuda(fptq_w4a8_workspace_size(t.problem.M, n, k, gs, &workspace_bytes), node_, "fptq_w4a8_workspace_size");
    StreamBuffer workspace(pool, workspace_bytes, stream, node_);
    check_cuda(fptq_w4a8_matmul_cuda(t.x, kDtype, t.problem.M, n, k, gs, static_cast<int>(attrs_.act_mode),
                                     t.act_scale, packed, workspace.get(), workspace_bytes, t.y, stream),
               node_, "fptq_w4a8_matmul_cuda");
  }

 private:
  // Copies the static activation scale to the host (synchronizing `stream`) and fails unless
  // it is finite and > 0, as the CPU kernel does.
  void check_act_scale(const float* act_scale, cudaStream_t stream) {
    float value = 0.0f;
    check_cuda(cudaMemcpyAsync(&value, act_scale, sizeof(float), cudaMemcpyDeviceToHost, stream), node_,
               "cudaMemcpyAsync (act_scale)");
    check_cuda(cudaStreamSynchronize(stream), node_, "cudaStreamSynchronize (act_scale)");
    if (!(std::isfinite(value) && value > 0.0f)) {
      fail_invalid(kOpType, node_, "act_scale=" + std::to_string(value) + " must be finite and > 0 with act_mode=0");
    }
  }

  // The kept packed weights for this call's B, scales and zero_points (PackedWeightCache),
  // packed on the first call (and again only if ORT ever hands other pointers). The repack
  // runs on this call's stream and is waited for before the buffer is published: concurrent
  // runs use other streams and must see finished weights. The act_scale initializer is
  // checked here too.
  std::shared_ptr<const DeviceBuffer> packed_weights(const W4A8Tensors& t, int device, cudaStream_t stream) {
    return cache_.get({t.b, t.scales, t.zero_points, device}, [&] {
      const int n = static_cast<int>(attrs_.N), k = static_cast<int>(attrs_.K), gs = static_cast<int>(attrs_.group_size);
      size_t bytes = 0;
      check_cuda(fptq_w4a8_packed_size(n, k, gs, &bytes), node_, "fptq_w4a8_packed_size");
      auto buffer = std::make_shared<const DeviceBuffer>(device, bytes, node_);
      check_cuda(fptq_w4a8_repack_cuda(t.b, t.scales, t.zero_points, n, k, gs, buffer->get(), stream), node_,
                 "fptq_w4a8_repack_cuda");
      if (attrs_.act_mode == kActPerTensorStatic && act_scale_constant_) {
        check_act_scale(t.act_scale, stream);  // synchronizes the stream
      } else {
        check_cuda(cudaStreamSynchronize(stream), node_, "cudaStreamSynchronize (repack)");
      }
      return buffer;
    });
  }

  const std::string node_;
  const W4A8Attrs attrs_;
  const bool weights_constant_;
  const bool act_scale_constant_;
  PackedWeightCache<DeviceBuffer> cache_;
};

}  // namespace

const OrtCustomOp* cuda_w4a8_op(uint32_t api_version, ONNXTensorElementDataType x_type) {
  return w4a8_op_for<CudaW4A8Kernel>(api_version, x_type);
}

}  // namespace fptq
