// Internal interface between w4a8_cuda.cu (planner, dispatch, sm_80 kernels) and
// w4a8_cuda_sm90_tma.cu (the Hopper TMA + wgmma GEMM, built only for sm_90a). Not part of the
// public API.
//
// w4a8_cuda.cu declares fptq_w4a8_sm90_tma_gemm as a weak symbol: when w4a8_cuda_sm90_tma.cu is
// not compiled in (no sm_90a toolchain, or a build that leaves it out) the pointer is null and
// the TMA variants report cudaErrorNotSupported; the sm_80 path is unaffected.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

// The functions have C linkage for the weak declarations in w4a8_cuda.cu.
extern "C" {

// The TMA (bulk copy) + register-A wgmma GEMM (variants 16-19) computes Y^T = W * Xq^T: the
// weights are wgmma's A operand (widened from nibbles to int8 in registers), the activations its
// B operand (bulk-copied into shared memory). It reads the sm_80 GEMM's buffers (not the
// rowsums: the zero points are subtracted while widening) with the plan's split, Xq in the tiled
// layout the quantize kernel writes for it (xq_tiled below); w4a8_cuda.cu fills this struct
// from the mma.sync kernel's arguments. Only group sizes that are multiples of 128.
struct FptqSm90TmaArgs {
  const float* act;        // [>= M] float32 a_m
  const uint8_t* bp;       // [Npad/32][K/32][512] weight atoms (w4a8_cuda.h)
  const float* sp;         // [G, Npad] scales
  const uint8_t* zp;       // [G, Npad] zero points
  void* y;                 // [M, N] float32/float16 (split == 1)
  float* partial;          // [split, M, N] float32 (split > 1)
  int64_t M;
  int N, Npad, K;
  int sub_per_group;       // group_size / 128
  int k_tiles, tiles_per_split, split;
  int m_tiles, n_tiles;
  int out_half;            // y is float16
  const int8_t* xq_tiled;  // [m_tiles][k_tiles][bt][128] int8, 16-byte chunks pre-swizzled
                           // (chunk c of row r at c ^ (r & 7)); rows >= M are zero
  int pdl;                 // launched as a programmatic dependent of the quantize kernel
  int bt;                  // tokens per block: 16, 64 or 128
  int overlap;             // 1: two accumulator sets, the fold of k-tile i overlaps the wgmmas of i+1
  // Fused activation quantization (bt == 16 only; variant 19): when x is not null the kernel
  // quantizes X itself (xq_tiled and act are not read) and no quantize kernel runs before it.
  const void* x;           // [M, K] float32 or float16
  int x_half, x_vec;       // X is float16; X allows 16-byte (float) / 8-byte (half) vector loads
  int act_mode;            // 0: a_m = *act_scale, 1: per-token max|x| / 127
  const float* act_scale;  // [1] float32 device (act_mode 0)
};

// Launches the TMA GEMM (grid m_tiles x n_tiles x split). cudaErrorNotSupported when the current
// device is not sm_90 or (bt, overlap) names no compiled kernel.
cudaError_t fptq_w4a8_sm90_tma_gemm(const FptqSm90TmaArgs* args, cudaStream_t stream);

// Dynamic shared memory of the TMA kernel for `bt` tokens per block (0 for an unsupported bt).
int fptq_w4a8_sm90_tma_smem_bytes(int bt);

}  // extern "C"
