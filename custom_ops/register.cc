// Entry point of libfptq_ops.so: RegisterCustomOps, called by ONNX Runtime when a session's
// options load the library (SessionOptions.register_custom_ops_library).
//
// The library is not linked against libonnxruntime; it receives the API table here. Built
// against the 1.21 headers, it asks for the newest API version those headers know and falls
// back to older ones down to kMinApiVersion, so it also loads in older runtimes.
#include <algorithm>
#include <cstdio>
#include <mutex>
#include <string>

#include "ops.h"
#include "w4a8_op.h"

namespace fptq {
namespace {

// Oldest OrtApi with everything the kernels call: KernelComputeV2 / CreateKernelV2 (1.16),
// KernelContext_ParallelFor (1.17), KernelInfoGetConstantInput_tensor (1.15).
constexpr uint32_t kMinApiVersion = 17;

// The domain with every op of this library, built on the first call and shared by all
// session options afterwards; never released, because ORT keeps only the pointer and sessions
// may live until process exit.
struct Library {
  const OrtApi* api = nullptr;     // negotiated API; nullptr if the runtime is too old
  uint32_t api_version = 0;
  OrtCustomOpDomain* domain = nullptr;
  OrtStatus* error = nullptr;      // why building the domain failed (kept for every caller)
};

// An op getter of ops.h: the op for (api_version, X element type), nullptr if unsupported.
using OpGetter = const OrtCustomOp* (*)(uint32_t api_version, ONNXTensorElementDataType x_type);

// Adds one op per X type the getter supports; ORT merges same-name ops into one schema whose
// X may be any of their types, and picks the kernel by type and execution provider.
void add_ops(const OrtApi& api, OrtCustomOpDomain* domain, uint32_t api_version, OpGetter get) {
  for (ONNXTensorElementDataType x_type : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16}) {
    if (const OrtCustomOp* op = get(api_version, x_type)) Ort::ThrowOnError(api.CustomOpDomain_Add(domain, op));
  }
}

// Adds the CUDA ops when the library was built with CUDA (FPTQ_WITH_CUDA, set by CMake when
// nvcc was found; cuda_op.cc). CPU-only builds register nothing more. Adding them calls no CUDA
// function, so this is safe in a CPU-only onnxruntime and on machines without a GPU driver:
// ORT only creates kernels for the execution providers a session uses.
void add_cuda_ops(const OrtApi& api, OrtCustomOpDomain* domain, uint32_t api_version) {
#if defined(FPTQ_WITH_CUDA)
  add_ops(api, domain, api_version, cuda_w4a8_op);
#else
  (void)api, (void)domain, (void)api_version;
#endif
}

// Newest API version worth asking for: ORT 1.x serves API versions 1..x, and asking for a
// newer one than it has makes it print an error line, so start from the runtime's minor
// version when its version string reads "1.<minor>...".
uint32_t first_api_version_to_try(const OrtApiBase* api_base) {
  const char* version = api_base->GetVersionString();
  unsigned major = 0, minor = 0;
  if (version != nullptr && std::sscanf(version, "%u.%u", &major, &minor) == 2 && major == 1) {
    return std::min<uint32_t>(ORT_API_VERSION, minor);
  }
  return ORT_API_VERSION;
}

Library build_library(const OrtApiBase* api_base) {
  Library lib;
  for (uint32_t version = first_api_version_to_try(api_base); version >= kMinApiVersion; --version) {
    lib.api = api_base->GetApi(version);
    if (lib.api != nullptr) {
      lib.api_version = version;
      break;
    }
  }
  if (lib.api == nullptr) {
    lib.error = api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, (std::string("libfptq_ops needs ONNX Runtime 1.") + std::to_string(kMinApiVersion) +
                   " or newer; this is " + api_base->GetVersionString())
                      .c_str());
    return lib;
  }
  Ort::InitApi(lib.api);
  lib.error = run_guarded(*lib.api, [&] {
    Ort::ThrowOnError(lib.api->CreateCustomOpDomain(kOpDomain, &lib.domain));
    add_ops(*lib.api, lib.domain, lib.api_version, cpu_w4a8_op);
    add_ops(*lib.api, lib.domain, lib.api_version, cpu_w8a8_op);
    add_ops(*lib.api, lib.domain, lib.api_version, cpu_rescored_op);
    add_cuda_ops(*lib.api, lib.domain, lib.api_version);
  });
  return lib;
}

}  // namespace
}  // namespace fptq

// 1 when this library holds the CUDA kernel (built with FPTQ_WITH_CUDA), else 0. Calls
// nothing; for fptq_onnx.session (ctypes) and the tests.
extern "C" __attribute__((visibility("default"))) int fptq_ops_has_cuda(void) {
#if defined(FPTQ_WITH_CUDA)
  return 1;
#else
  return 0;
#endif
}

// options: the session options to extend; api_base: ONNX Runtime's API entry.
// Returns nullptr, or a status the caller (ORT) releases.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  static std::once_flag once;
  static fptq::Library lib;
  std::call_once(once, [&] { lib = fptq::build_library(api_base); });
  const OrtApi* api = lib.api ? lib.api : api_base->GetApi(1);
  if (lib.error != nullptr) {
    // ORT releases the status we return, so hand out a copy of the stored one.
    return api->CreateStatus(api->GetErrorCode(lib.error), api->GetErrorMessage(lib.error));
  }
  return api->AddCustomOpDomain(options, lib.domain);
}
