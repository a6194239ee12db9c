// The OrtCustomOp of each execution provider; register.cc adds them to the ai.fptq domain.
// ORT's C headers only: included by .cc files.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>

namespace fptq {

// ai.fptq::W4A8MatMul on CPUExecutionProvider (cpu_op.cc) for X of type x_type
// (ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT or _FLOAT16; nullptr for others). api_version: the
// OrtApi version RegisterCustomOps negotiated. The ops live for the whole process.
const OrtCustomOp* cpu_w4a8_op(uint32_t api_version, ONNXTensorElementDataType x_type);

// ai.fptq::W8A8MatMul (since version 2) on CPUExecutionProvider: W4A8MatMul's contract with
// 8-bit weights, B uint8 [N, K] (cpu_op.cc, the same kernel class). It has no CUDA kernel: in
// a CUDA session ORT places its nodes on CPUExecutionProvider.
const OrtCustomOp* cpu_w8a8_op(uint32_t api_version, ONNXTensorElementDataType x_type);

// ai.fptq::W4A8RescoredMatMul (since version 2) on CPUExecutionProvider: the language-model
// head, W4A8MatMul plus its 4-bit residual on each row's top_k channels (cpu_op.cc). CPU only.
const OrtCustomOp* cpu_rescored_op(uint32_t api_version, ONNXTensorElementDataType x_type);

#if defined(FPTQ_WITH_CUDA)
// ai.fptq::W4A8MatMul on CUDAExecutionProvider (cuda_op.cc: W4A8CustomOp<CudaW4A8Kernel<...>>
// from w4a8_op.h, calling the launchers of w4a8_cuda.h); same contract as cpu_w4a8_op.
// Registered next to the CPU op, never instead of it: sessions that use only
// CPUExecutionProvider (also in a CPU-only onnxruntime) pick the CPU kernel.
const OrtCustomOp* cuda_w4a8_op(uint32_t api_version, ONNXTensorElementDataType x_type);
#endif

}  // namespace fptq
