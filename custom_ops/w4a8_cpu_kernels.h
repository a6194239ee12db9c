// Interface between the CPU driver (w4a8_cpu.cc) and the per-ISA tile kernels
// (w4a8_cpu_<isa>.cc, bodies in w4a8_cpu_tile.h).
//
// Packed weight layout, per tile of kTileN = 16 output channels n0 .. n0 + 15 and per group g,
// in chunks of kChunkK = 8 positions p of the group padded to group_padded (p >= group_size is
// padding with u = 0). Chunk c is 64 bytes; byte 4 * j + i (channel j, i in 0..3) holds
//   low nibble:  u[n0 + j, g * group_size + 8c + i]
//   high nibble: u[n0 + j, g * group_size + 8c + 4 + i]
// so masking the low nibbles of a chunk gives, per channel, 4 consecutive k as 4 bytes: the
// operand shape of vpdpbusd / vpmaddubsw, which multiply unsigned bytes (u in 0..15) by
// signed bytes (q in -127..127) and add groups of 4 (resp. 2) products into int32 (int16).
// Quantized activations q use the same padded positions (padding q = 0), so a group is
// always a whole number of chunks.
#pragma once

#include <cstdint>

namespace fptq {
namespace cpu {

constexpr int kTileN = 16;      // output channels per tile: one AVX-512 int32 register
constexpr int kChunkK = 8;      // k positions per chunk: 4 in the low nibbles, 4 in the high
constexpr int kChunkBytes = 64; // kTileN * kChunkK / 2
constexpr int kRowBlock = 4;    // rows of X per register block (weights loaded once for these)

// Inputs of the activation quantizer for rows [row_begin, row_end) of X.
struct QuantizeArgs {
  const float* x;          // float32 [M, K]
  int64_t k;               // K
  int64_t group_size;      // weights per group
  int64_t groups;          // G
  int64_t group_padded;    // group_size rounded up to kChunkK
  int64_t act_mode;        // kActPerTensorStatic / kActPerTokenDynamic
  float act_scale;         // static scale (act_mode 0)
  int64_t q_stride;        // bytes between rows of q (>= G * group_padded)
  int8_t* q;               // out int8 [M, q_stride]: G * group_padded values, padding positions 0
  int32_t* q_group_sums;   // out int32 [M, G]: sum of q over each group (zero-point term)
  float* row_scales;       // out float32 [M]: a_m
};

// Inputs of the tile kernel for tiles [tile_begin, tile_end) x rows [row_begin, row_end).
struct GemmArgs {
  const uint8_t* nibbles;      // uint8 [tiles, G, group_padded / 8, 64] (layout above)
  const float* scales;         // float32 [tiles, G, 16]
  const uint8_t* zero_points;  // uint8 [tiles, G, 16]
  int32_t max_zero_point;      // largest of zero_points (15 or less in every model we write)
  int64_t n;                   // N (tile channels >= N are not stored)
  int64_t groups;              // G
  int64_t chunks_per_group;    // group_padded / kChunkK
  int64_t q_stride;            // bytes between rows of q
  const int8_t* q;             // int8 [M, q_stride] from the quantizer
  const int32_t* q_group_sums; // int32 [M, G]
  const float* row_scales;     // float32 [M]
  float* y;                    // out float32 [M, N]
};

// One ISA's kernels. Both are thread-safe for disjoint row / tile ranges.
struct TileKernels {
  // Rows of X per gemm task that the driver aims for: enough rows to amortize what a task does
  // once per tile and group (unpacking), few enough that their q rows stay in L2.
  int64_t rows_per_task;
  // Quantizes rows [row_begin, row_end) of args.x.
  void (*quantize_rows)(const QuantizeArgs& args, int64_t row_begin, int64_t row_end);
  // Writes Y for rows [row_begin, row_end) and the channels of tiles [tile_begin, tile_end).
  void (*gemm_tiles)(const GemmArgs& args, int64_t row_begin, int64_t row_end, int64_t tile_begin,
                     int64_t tile_end);
};

extern const TileKernels kGenericKernels;   // w4a8_cpu_generic.cc
#if defined(FPTQ_X86_KERNELS)
extern const TileKernels kAvx2Kernels;      // w4a8_cpu_avx2.cc, needs AVX2
extern const TileKernels kAvx512Kernels;    // w4a8_cpu_avx512.cc, needs AVX-512 F/BW/VL + VNNI
#endif
#if defined(FPTQ_AMX_KERNELS)
extern const TileKernels kAmxKernels;       // w4a8_cpu_amx.cc, needs AVX-512 VNNI + AMX-INT8 + OS permission
#endif

}  // namespace cpu
}  // namespace fptq
