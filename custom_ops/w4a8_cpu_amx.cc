// AMX-INT8 tile kernel (compiled with -mamx-tile -mamx-int8 and the AVX-512 flags; used only
// when the CPU has AMX and Linux granted this process the tile state, see w4a8_cpu.cc).
//
// One tdpbssd multiplies a 16 x 64 int8 tile of activations q by a 64 x 16 int8 tile of weights
// (16 x 16 x 64 multiply-adds in 16 cycles: 8 times two vpdpbusd per cycle), adding
// into a 16 x 16 int32 tile. A task takes its rows in blocks of 32 (2 A tiles) and its output
// channels in pairs of 16-channel tiles (2 B tiles): 4 C accumulator tiles, the 8 tile
// registers in all. Per group:
//   1. unpack the group's weights of the tile pair once into a thread-local buffer as int8
//      u - z (in [-15, 15]), 4 consecutive k per channel: the B tile layout;
//   2. for every 32-row block: C = sum over the group's 64-k steps of q tile x (u - z) tile,
//      which is exactly sum_k q * (u - z): the zero-point correction is in the weights;
//   3. store the C tiles and fold them into float y: y = fma(s, float(C), y).
// After the last group, Y = a_m * y. The int32 sums and the float operations are those of the
// AVX-512 kernels (acc - z * q_sum is the same integer), so results are bit for bit theirs.
// Rows past the last whole block of 16, and groups that are not a multiple of 64 or whose zero
// points do not fit the int8 weights (docs/ops.md has z <= 15), go to the AVX-512 kernels; so
// do all 8-bit weights (W8A8MatMul): their u - z (-255..255) fits no int8 B tile, and tdpbusd
// would need the activations re-laid out as the B tile (not done: no AMX machine to measure it).
#include "w4a8_cpu_avx512.h"

namespace fptq {
namespace cpu {
namespace {

constexpr int kTileRows = 16;   // rows of an A or C tile (activation rows)
constexpr int kTileK = 64;      // int8 k per A-tile row; B tiles have kTileK / 4 rows of 64 bytes
constexpr int kPairRows = 32;   // rows per register block: A tiles 0, 1
constexpr int kPairTiles = 2;   // output tiles per register block: B tiles 2, 3
constexpr int64_t kMaxGroup = 1024;  // largest padded group (bounds the unpack buffer)

// Tile registers (literal numbers below: the intrinsics paste them into the instruction):
//   tmm0, tmm1: A, q of rows 0-15 and 16-31 of the block;  tmm2, tmm3: B, weights of tile 0, 1;
//   tmm4 .. tmm7: C[a][b] for A tile a and B tile b (tmm4 + 2a + b).

// tileloadd with a "memory" clobber: GCC 12's _tile_loadd does not tell the compiler that it
// reads memory, which would let it move the unpacking stores past the load.
#define FPTQ_TILE_LOAD(tmm, base, stride)                                                   \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #tmm ::"r"(static_cast<const void*>(base)), \
                   "r"(static_cast<long>(stride))                                           \
                   : "memory")

// The 64-byte tile configuration of ldtilecfg (Intel SDM, "AMX"): palette 1, all 8 tiles
// 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = kTileK;
      rows[t] = kTileRows;
    }
  }
};

// Unpacks group g of tiles [tile, tile + tiles) as int8 u - z into out: [steps][tiles][64] with
// steps = group_padded / 4; row `step` of tile t holds k = 4 * step .. 4 * step + 3 for its 16
// channels (4 bytes each): the layout of a B tile with a row stride of tiles * 64 bytes.
void unpack_group_signed(const GemmArgs& a, int64_t tile, int tiles, int64_t g, int8_t* out) {
  const __m512i low_mask = _mm512_set1_epi8(0x0f);
  const int64_t cpg = a.chunks_per_group;
  for (int t = 0; t < tiles; ++t) {
    const int64_t tile_group = (tile + t) * a.groups + g;
    // z of each channel in the 4 bytes of its int32 lane.
    const __m512i z = _mm512_mullo_epi32(load_zero_points(a.zero_points + tile_group * kTileN),
                                         _mm512_set1_epi32(0x01010101));
    const uint8_t* w = a.weights + tile_group * cpg * chunk_bytes(4);
    for (int64_t c = 0; c < cpg; ++c) {
      const __m512i bytes = _mm512_loadu_si512(w + c * chunk_bytes(4));
      const __m512i lo = _mm512_and_si512(bytes, low_mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_mask);
      _mm512_storeu_si512(out + ((2 * c) * tiles + t) * kQuadBytes, _mm512_sub_epi8(lo, z));
      _mm512_storeu_si512(out + ((2 * c + 1) * tiles + t) * kQuadBytes, _mm512_sub_epi8(hi, z));
    }
  }
}

// y[r, t] += s_t * float(C[r, t]) for rows [0, rows) of an int32 block c (row stride 32 int32:
// tile t in columns 16t .. 16t + 15) into the float32 scratch y (same layout).
// s: tile 0's scales of the group (stride groups * 16 between tiles).
void fold_block(const int32_t* c, int rows, int tiles, const float* s, int64_t groups, float* y) {
  for (int t = 0; t < tiles; ++t) {
    const __m512 st = _mm512_loadu_ps(s + t * groups * kTileN);
    for (int r = 0; r < rows; ++r) {
      float* yr = y + r * (kPairTiles * kTileN) + t * kTileN;
      const __m512 acc = to_float(_mm512_loadu_si512(c + r * (kPairTiles * kTileN) + t * kTileN));
      _mm512_storeu_ps(yr, _mm512_fmadd_ps(st, acc, _mm512_loadu_ps(yr)));
    }
  }
}

// One group for rows [0, rows) (a multiple of 16) of the task and `tiles` (1 or 2) tiles.
// w: from unpack_group_signed; steps: group_padded / 4; q: row 0's q at the group's first
// position; q_stride: bytes between q rows; c: int32 [2][32, 32] buffer; s: tile 0's scales of
// the group; y: float32 [rows, 32] scratch.
// Software-pipelined: the float fold of a block's C (vector units) is issued after the next
// block's tile instructions, so that it runs while the AMX unit works on them; hence two C
// buffers in memory, the one being folded and the one being stored.
void amx_group(const int8_t* w, int64_t steps, int tiles, const int8_t* q, int64_t q_stride, int64_t rows,
               int32_t* c, const float* s, int64_t groups, float* y) {
  const int64_t b_stride = tiles * kQuadBytes;
  constexpr int64_t c_stride = kPairTiles * kTileN * sizeof(int32_t);
  constexpr int64_t c_size = kPairRows * kPairTiles * kTileN;
  int pending_rows = 0;  // rows of the block stored in c_pending, not yet folded
  const int32_t* c_pending = nullptr;
  float* y_pending = nullptr;
  for (int64_t row = 0, block = 0; row < rows; row += kPairRows, ++block) {
    const bool two_a = rows - row >= kPairRows;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t step = 0; step < steps; step += kTileK / 4) {
      const int8_t* qk = q + row * q_stride + 4 * step;
      const int8_t* wk = w + step * b_stride;
      FPTQ_TILE_LOAD(0, qk, q_stride);
      FPTQ_TILE_LOAD(2, wk, b_stride);
      _tile_dpbssd(4, 0, 2);
      if (tiles > 1) {
        FPTQ_TILE_LOAD(3, wk + kQuadBytes, b_stride);
        _tile_dpbssd(5, 0, 3);
      }
      if (two_a) {
        FPTQ_TILE_LOAD(1, qk + kTileRows * q_stride, q_stride);
        _tile_dpbssd(6, 1, 2);
        if (tiles > 1) _tile_dpbssd(7, 1, 3);
      }
    }
    if (pending_rows > 0) fold_block(c_pending, pending_rows, tiles, s, groups, y_pending);
    int32_t* c_block = c + (block % 2) * c_size;
    _tile_stored(4, c_block, c_stride);  // (has a "memory" clobber: the fold reads c after it)
    if (tiles > 1) _tile_stored(5, c_block + kTileN, c_stride);
    if (two_a) {
      _tile_stored(6, c_block + kTileRows * kPairTiles * kTileN, c_stride);
      if (tiles > 1) _tile_stored(7, c_block + kTileRows * kPairTiles * kTileN + kTileN, c_stride);
    }
    pending_rows = two_a ? kPairRows : kTileRows;
    c_pending = c_block;
    y_pending = y + row * kPairTiles * kTileN;
  }
  if (pending_rows > 0) fold_block(c_pending, pending_rows, tiles, s, groups, y_pending);
}

// Rows [row_begin, row_begin + rows) (rows a multiple of 16) x tiles [tile_begin, tile_end).
// Returns false, having done nothing, when its scratch cannot be allocated.
bool amx_tiles(const GemmArgs& a, int64_t row_begin, int64_t rows, int64_t tile_begin, int64_t tile_end) {
  const int64_t group_padded = a.chunks_per_group * kChunkK;
  const int64_t steps = group_padded / 4;
  // Unpacked weights int8 [steps, 2, 64], C int32 [2][32, 32], y float32 [rows, 32].
  const size_t weight_bytes = static_cast<size_t>(steps * kPairTiles * kQuadBytes);
  const size_t c_bytes = 2 * kPairRows * kPairTiles * kTileN * sizeof(int32_t);
  const size_t y_bytes = static_cast<size_t>(rows * kPairTiles * kTileN) * sizeof(float);
  thread_local TaskScratch scratch;  // this worker thread's: grown on demand, kept
  uint8_t* const buffer = scratch.get(weight_bytes + c_bytes + y_bytes);
  if (buffer == nullptr) return false;
  auto* const weights = reinterpret_cast<int8_t*>(buffer);
  auto* const c = reinterpret_cast<int32_t*>(buffer + weight_bytes);
  auto* const y = reinterpret_cast<float*>(buffer + weight_bytes + c_bytes);

  static const TileConfig config;
  _tile_loadconfig(&config);  // per task: the tile state is per thread
  for (int64_t tile = tile_begin; tile < tile_end; tile += kPairTiles) {
    const int tiles = tile_end - tile < kPairTiles ? 1 : kPairTiles;
    __builtin_memset(y, 0, y_bytes);
    for (int64_t g = 0; g < a.groups; ++g) {
      unpack_group_signed(a, tile, tiles, g, weights);
      amx_group(weights, steps, tiles, a.q + row_begin * a.q_stride + g * group_padded, a.q_stride, rows, c,
                a.scales + (tile * a.groups + g) * kTileN, a.groups, y);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = row_begin + r;
      for (int t = 0; t < tiles; ++t) {
        store_row(a.y + row * a.n + (tile + t) * kTileN, _mm512_loadu_ps(y + (r * kPairTiles + t) * kTileN),
                  a.row_scales[row], valid_channels(a, tile + t));
      }
    }
  }
  _tile_release();  // back to the init state: cheaper context switches
  return true;
}

// TileKernels::gemm_tiles: whole blocks of 16 rows on AMX, the rest on the AVX-512 kernels.
void gemm_tiles_amx(const GemmArgs& a, int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end) {
  const int64_t group_padded = a.chunks_per_group * kChunkK;
  const bool amx_group_ok = a.weight_bits == 4 && group_padded % kTileK == 0 && group_padded <= kMaxGroup &&
                            a.max_zero_point <= 15;
  const int64_t amx_rows = amx_group_ok ? (row_end - row_begin) / kTileRows * kTileRows : 0;
  if (amx_rows > 0 && amx_tiles(a, row_begin, amx_rows, tile_begin, tile_end)) row_begin += amx_rows;
  if (row_begin < row_end) kAvx512Kernels.gemm_tiles(a, row_begin, row_end, tile_begin, tile_end);
}

#undef FPTQ_TILE_LOAD

}  // namespace

// 256 rows per task: the weights a task unpacks per tile pair and group serve 8 register blocks.
const TileKernels kAmxKernels = {256, quantize_rows, gemm_tiles_amx};

}  // namespace cpu
}  // namespace fptq
