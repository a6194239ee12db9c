// Interface between the CPU driver (w4a8_cpu.cc) and the per-ISA tile kernels
// (w4a8_cpu_<isa>.cc, bodies in w4a8_cpu_tile.h).
//
// Packed weight layout, per tile of kTileN = 16 output channels n0 .. n0 + 15 and per group g,
// in chunks of kChunkK = 8 positions p of the group padded to group_padded (p >= group_size is
// padding with u = 0, and so is p >= K - g * group_size in a last partial group: a K that
// group_size does not divide needs no code path of its own). The unit of the kernels is a "quad": 64 bytes, byte 4 * j + i (channel
// j, i in 0..3) holding the weight of 4 consecutive k per channel, the operand shape of
// vpdpbusd / vpmaddubsw, which multiply unsigned bytes (u) by signed bytes (q in -127..127)
// and add groups of 4 (resp. 2) products into int32 (int16). A chunk holds two quads, lo
// (k = 8c + i) and hi (k = 8c + 4 + i):
//   4-bit weights (W4A8MatMul), a chunk is 64 bytes, the quads in the nibbles of one:
//     byte 4 * j + i: low nibble u[n0 + j, g * group_size + 8c + i], high nibble ... + 4 + i
//     (masking the low nibbles gives quad lo, the high nibbles quad hi);
//   8-bit weights (W8A8MatMul), a chunk is 128 bytes, the two quads one after the other:
//     byte 4 * j + i: u[n0 + j, g * group_size + 8c + i];  byte 64 + 4 * j + i: ... + 4 + i
//     (no unpacking at all: what a 4-bit chunk unpacks to, stored).
// Quantized activations q use the same padded positions (padding q = 0), so a group is
// always a whole number of chunks, whatever the weight width.
#pragma once

#include <cstdint>

namespace fptq {
namespace cpu {

constexpr int kTileN = 16;      // output channels per tile: one AVX-512 int32 register
constexpr int kChunkK = 8;      // k positions per chunk: quads lo and hi
constexpr int kQuadBytes = 64;  // kTileN channels x 4 k, one byte each: one AVX-512 register

// Bytes of one packed chunk for weight_bits-bit weights: 64 (4 bits) or 128 (8 bits).
constexpr int64_t chunk_bytes(int64_t weight_bits) { return kTileN * kChunkK * weight_bits / 8; }
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
  const uint8_t* weights;      // uint8 [tiles, G, group_padded / 8, chunk_bytes(weight_bits)] (layout above)
  int64_t weight_bits;         // 4 or 8: the chunk format
  const float* scales;         // float32 [tiles, G, 16]
  const uint8_t* zero_points;  // uint8 [tiles, G, 16]
  int32_t max_zero_point;      // largest of zero_points (15 or less in every 4-bit model we write)
  int64_t n;                   // N (tile channels >= N are not stored)
  int64_t groups;              // G
  int64_t chunks_per_group;    // group_padded / kChunkK
  int64_t last_group_chunks;   // chunks of the last group that hold weights: ceil(its length / 8), fewer than
                               // chunks_per_group in a partial last group; kernels may skip the rest (u = q = 0)
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
  // Writes Y for rows [row_begin, row_end) and the channels of tiles [tile_begin, tile_end),
  // for either weight format (args.weight_bits).
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
