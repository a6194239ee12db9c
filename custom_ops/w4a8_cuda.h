// W4A8MatMul (docs/ops.md) on NVIDIA GPUs (sm_80 and newer): plain C launchers.
//
// No ONNX Runtime headers: the ORT custom op (register.cc) calls these with raw device
// pointers and its compute stream. Every function returns cudaSuccess or the first CUDA error
// (cudaErrorInvalidValue for bad arguments); none of them synchronizes the stream.
//
// Use:
//   1. once per weight: fptq_w4a8_packed_size -> allocate `packed` (device) ->
//      fptq_w4a8_repack_cuda (B, scales, zero_points are then no longer needed);
//   2. per call: fptq_w4a8_workspace_size(M, ...) -> scratch of that size (device) ->
//      fptq_w4a8_matmul_cuda.
//
// Limits (cudaErrorInvalidValue otherwise): 1 <= N <= 8388480, 1 <= K <= 2^24, K % group_size == 0,
// group_size in {32, 64} or a multiple of 128, M >= 0 (M == 0 launches nothing),
// act_mode in {0, 1}, dtype in {FPTQ_DTYPE_FLOAT32, FPTQ_DTYPE_FLOAT16}.
// Alignment: `packed` and `workspace` 16 bytes (cudaMalloc gives 256); X and Y only their
// element size (16-byte aligned X and 8-byte aligned Y take the vectorized paths).
// Zero points must be in [0, 15] as the contract says (any uint8 still computes exactly).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#define FPTQ_DTYPE_FLOAT32 0
#define FPTQ_DTYPE_FLOAT16 1

// Kernel variants (fptq_w4a8_*_variant; the plain launchers use AUTO). AUTO picks per M bucket
// and device (the table kSm90AutoVariant in w4a8_cuda.cu; the environment variable
// FPTQ_CUDA_VARIANT=<id> overrides it where that variant supports the call). What each one
// launches is its row of the descriptor table kVariants in w4a8_cuda.cu:
//   mma16/32/128       sm_80+ mma.sync kernel with 16 / 32 / 128-row tiles (any group size)
//   *_pdl              the mma.sync kernel launched as a programmatic dependent (sm_90+): the
//                      GEMM starts, and loads its first weight tiles, while the quantize kernel runs
//   tma128/64/16       sm_90a bulk-copy (TMA) + register-A wgmma kernel (w4a8_cuda_sm90_tma.cu),
//                      128 weight rows x 128 / 64 / 16 tokens per block (group_size % 128 == 0)
//   tma16f             tma16 with the activation quantization fused into the GEMM: no quantize
//                      kernel (one launch per call unless K is split)
// Ids never change meaning (logs, benchmarks/results and FPTQ_CUDA_VARIANT name them), so the
// ids of deleted variants stay unused (docs/cuda_kernel.md, "Variants"): 3-8, 12, 13 (the first
// sm_90a wgmma kernel, operands in shared memory; 5 and 8 failed their probe, the others were
// correct but slower on the H200) and 14, 15 (mma16/32_pdl_fr, split-K reduction fused into the
// GEMM: slower than mma16/32_pdl over their M buckets).
#define FPTQ_W4A8_VARIANT_AUTO (-1)
#define FPTQ_W4A8_VARIANT_MMA16 0
#define FPTQ_W4A8_VARIANT_MMA32 1
#define FPTQ_W4A8_VARIANT_MMA128 2
#define FPTQ_W4A8_VARIANT_MMA16_PDL 9
#define FPTQ_W4A8_VARIANT_MMA32_PDL 10
#define FPTQ_W4A8_VARIANT_MMA128_PDL 11
#define FPTQ_W4A8_VARIANT_TMA128 16
#define FPTQ_W4A8_VARIANT_TMA64 17
#define FPTQ_W4A8_VARIANT_TMA16 18
#define FPTQ_W4A8_VARIANT_TMA16_FUSED 19

#ifdef __cplusplus
// Constants of the CUDA kernel shared by host and device code (the numpy emulation in
// fptq_onnx/testing reads them from this file). docs/cuda_kernel.md explains the layouts.
namespace fptq {
namespace w4a8cuda {

// K covered by one pipeline stage (one k-tile): 4 MMA k-steps of 32.
constexpr int kTileK = 128;
constexpr int kMmaK = 32;
constexpr int kKSteps = kTileK / kMmaK;

// Repacked weights, scales and zero points are padded along N to a multiple of this (the
// widest block tile), so weight loads need no bounds checks along N.
constexpr int kNPadAlign = 128;

// One "atom" of the repacked weights: 32 (k) x 32 (n) nibbles = 512 bytes, stored as
// [lane 0..31][word 0..3]. Word j of lane (g = lane / 4, t = lane % 4) holds column
// n = 32 * nb + 8 * j + g; its nibble 2i is k = 32 * kb + 4t + i and its nibble 2i + 1 is
// k = 32 * kb + 16 + 4t + i (i = 0..3), so that `w & 0x0F0F0F0F` and
// `(w >> 4) & 0x0F0F0F0F` are exactly the two .b32 B-fragment registers of
// mma.m16n8k32 (.s8) for n8-tile j.
constexpr int kAtomN = 32;
constexpr int kAtomK = 32;
constexpr int kAtomBytes = kAtomN * kAtomK / 2;

// Int32 accumulators start at the bit pattern of 1.5 * 2^23 (0x4B400000). Adding an exact
// integer d with |d| < 2^22 to that pattern gives the float32 bits of 1.5 * 2^23 + d, so
// `__int_as_float(acc) - 12582912.0f` is float(d) exactly: an int-to-float conversion with
// full-rate instructions (the add rides in the MMA's C operand) instead of a quarter-rate I2F.
// |sum over <= 128 k of q * (u - z)| <= 127 * 255 * 128 < 2^22 for any uint8 zero point.
constexpr int kMagicI = 0x4B400000;
constexpr float kMagicF = 12582912.0f;

// Largest split-K factor the planner picks.
constexpr int kMaxSplitK = 16;

// Alignment of every sub-buffer inside the packed-weight buffer and the workspace.
constexpr int kBufferAlign = 256;

}  // namespace w4a8cuda
}  // namespace fptq
#endif  // __cplusplus

#ifdef __cplusplus
extern "C" {
#endif

// Size in bytes of the packed-weight buffer for an [N, K] weight. Host only, no CUDA call.
//   N, K, group_size: the op's attributes.  bytes: out.
cudaError_t fptq_w4a8_packed_size(int N, int K, int group_size, size_t* bytes);

// Repacks the op's weight initializers into `packed` (fragment-friendly layout, N padded).
//   B           uint8   [N, K/2]  device; byte B[n, k/2]: even k low nibble, odd k high nibble
//   scales      float32 [N, K/group_size] device
//   zero_points uint8   [N, K/group_size] device
//   packed      device buffer of fptq_w4a8_packed_size bytes (written)
//   stream      CUDA stream (0 = legacy default stream)
cudaError_t fptq_w4a8_repack_cuda(const uint8_t* B, const float* scales,
                                  const uint8_t* zero_points, int N, int K, int group_size,
                                  void* packed, cudaStream_t stream);

// Size in bytes of the per-call scratch buffer for fptq_w4a8_matmul_cuda. Reads the current
// device's multiprocessor count and shared memory (the tile plan depends on them); call it
// with the device that will run the matmul current. 0 when M == 0.
cudaError_t fptq_w4a8_workspace_size(int64_t M, int N, int K, int group_size, size_t* bytes);

// Y[M, N] = W4A8MatMul(X[M, K]) as in docs/ops.md.
//   X          float32 or float16 [M, K] device, row-major (dtype says which)
//   dtype      FPTQ_DTYPE_FLOAT32 or FPTQ_DTYPE_FLOAT16; Y has the same dtype
//   M          rows of X (product of the leading dims), >= 0
//   N, K, group_size, act_mode: the op's attributes
//   act_scale  float32 [1] device: the static activation scale (read only when act_mode == 0)
//   packed     device buffer written by fptq_w4a8_repack_cuda for the same N, K, group_size
//   workspace  device scratch of workspace_bytes >= fptq_w4a8_workspace_size(M, N, K, gs)
//   Y          float32 or float16 [M, N] device, row-major (written)
//   stream     CUDA stream; all work is enqueued on it
cudaError_t fptq_w4a8_matmul_cuda(const void* X, int dtype, int64_t M, int N, int K,
                                  int group_size, int act_mode, const float* act_scale,
                                  const void* packed, void* workspace, size_t workspace_bytes,
                                  void* Y, cudaStream_t stream);

// Test hook (host only, no CUDA call): the tile plan for a device with `sm_count`
// multiprocessors and `smem_per_sm` bytes of shared memory per multiprocessor.
// out[0] config (0: 16x128 tiles, 1: 64x128, 2: 128x128), out[1] split-K factor,
// out[2] k-tiles per split, out[3] k-tiles (of 128), out[4] m-tiles, out[5] n-tiles,
// out[6] dynamic shared memory bytes per block, out[7] blocks per SM assumed.
// *workspace_bytes: the workspace size of that plan. Returns 0, or -1 for invalid arguments.
int fptq_w4a8_plan_info(int64_t M, int N, int K, int group_size, int sm_count,
                        int smem_per_sm, int64_t* out, size_t* workspace_bytes);

// ---- Variant hooks (tests, benchmarks). variant: FPTQ_W4A8_VARIANT_*; AUTO = the plain call;
// an id that names no variant (3-8, 12-15, 20 and up) is cudaErrorInvalidValue. A variant the device
// or shape cannot run returns cudaErrorNotSupported. The workspace size depends on the
// variant: ask with the same variant.
cudaError_t fptq_w4a8_workspace_size_variant(int64_t M, int N, int K, int group_size, int variant,
                                             size_t* bytes);
cudaError_t fptq_w4a8_matmul_cuda_variant(const void* X, int dtype, int64_t M, int N, int K,
                                          int group_size, int act_mode, const float* act_scale,
                                          const void* packed, void* workspace,
                                          size_t workspace_bytes, void* Y, int variant,
                                          cudaStream_t stream);
// fptq_w4a8_plan_info for a given variant (AUTO: the sm_80 default). out[0] is 0-2 for the
// mma.sync configs, 5 for the TMA kernel (out[4] m-tiles of 128 / 64 / 16 tokens, out[5]
// n-tiles of 128 weight rows; 3 and 4 were the deleted wgmma kernel's).
int fptq_w4a8_plan_info_variant(int64_t M, int N, int K, int group_size, int sm_count,
                                int smem_per_sm, int variant, int64_t* out,
                                size_t* workspace_bytes);
// 1 if `variant` runs group_size on a device of compute capability device_cc (major*10+minor),
// 0 if not, -1 for an id that names no variant. Host only.
int fptq_w4a8_variant_info(int variant, int device_cc, int group_size);
// 1 if the sm_90a TMA kernel (w4a8_cuda_sm90_tma.cu) is linked into this library. Host only.
int fptq_w4a8_sm90_linked(void);
// The variant AUTO picks for M rows on a device of compute capability device_cc. Host only.
int fptq_w4a8_resolve_variant(int64_t M, int group_size, int device_cc);

#ifdef __cplusplus
}  // extern "C"
#endif
