// AMX-INT8 tile kernel (compiled with -mamx-tile -mamx-int8 and the AVX-512 flags; used only
// when the CPU has AMX and Linux granted this process the tile state, see w4a8_cpu.cc).
//
// One tdpbssd multiplies a 16 x 64 int8 tile of activations q by a 64 x 16 int8 tile of weights
// (16 x 16 x 64 multiply-adds in 16 cycles: 8 times two vpdpbusd per cycle), adding
// into a 16 x 16 int32 tile. A task takes its rows in blocks of 32 (2 A tiles) and its output
// channels in pairs of 16-channel tiles (2 B tiles): 4 C accumulator tiles, the 8 tile
// registers in all. A B tile is 16 rows of one quad each (w4a8_cpu_kernels.h: 16 channels x 4
// consecutive k), so it is 16 quads of a tile in k order. Per group:
//   1. the B tiles of the group and tile pair:
//      4 bits: unpacked once into a thread-local buffer as int8 u - z (in [-15, 15]);
//      8 bits: the packed chunks themselves (quads lo, hi, lo, ... in k order, 64 bytes apart),
//      loaded straight from the weights, as unsigned u (0..255) for tdpbsud (signed A, unsigned B);
//   2. for every 32-row block: C = sum over the group's 64-k steps of q tile x B tile, which is
//      sum_k q * (u - z) for 4 bits and sum_k q * u for 8 bits;
//   3. store the C tiles and fold them into float y: y = fma(s, float(C - z * q_sum), y) with
//      z = 0 for 4 bits (their zero points are in the weights already).
// After the last group, Y = a_m * y. The int32 sums and the float operations are those of the
// AVX-512 kernels (acc - z * q_sum is the same integer), so results are bit for bit theirs.
// Rows past the last whole block of 16, groups that are not a multiple of 64, and 4-bit zero
// points that do not fit the int8 weights (docs/ops.md has z <= 15) go to the AVX-512 kernels.
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

// Where the fold finds a group's scales, zero points and q sums: tile 0's scales and zero
// points of the group (stride groups * 16 between tiles; zero_points null for 4 bits, whose
// C already holds u - z), and the q sum of the block's row 0 (stride groups between rows).
struct GroupFold {
  const float* scales;
  const uint8_t* zero_points;
  const int32_t* q_sums;
  int64_t groups;
};

// y[r, t] = fold_group(y[r, t], C[r, t], z_t, s_t, q_sum[r]) for rows [0, rows) of an int32
// block c (row stride 32 int32: tile t in columns 16t .. 16t + 15) into the float32 scratch y
// (same layout); `row` is the block's first row within the task.
void fold_block(const int32_t* c, int rows, int tiles, const GroupFold& f, int64_t row, float* y) {
  for (int t = 0; t < tiles; ++t) {
    const __m512 st = _mm512_loadu_ps(f.scales + t * f.groups * kTileN);
    const __m512i zt = f.zero_points ? load_zero_points(f.zero_points + t * f.groups * kTileN) : _mm512_setzero_si512();
    for (int r = 0; r < rows; ++r) {
      float* yr = y + r * (kPairTiles * kTileN) + t * kTileN;
      const __m512i acc = _mm512_loadu_si512(c + r * (kPairTiles * kTileN) + t * kTileN);
      const int32_t q_sum = f.zero_points ? f.q_sums[(row + r) * f.groups] : 0;
      _mm512_storeu_ps(yr, fold_group(_mm512_loadu_ps(yr), acc, zt, st, q_sum));
    }
  }
}

// One group for rows [0, rows) (a multiple of 16) of the task and `tiles` (1 or 2) tiles.
// b0, b1: the group's first B tile row of tile 0 and 1, b_stride bytes between B tile rows
// (4 bits: unpack_group_signed's buffer; 8 bits: the packed weights); steps: group_padded / 4;
// q: row 0's q at the group's first position; q_stride: bytes between q rows; c: int32
// [2][32, 32] buffer; f: the fold's operands; y: float32 [rows, 32] scratch.
// Software-pipelined: the float fold of a block's C (vector units) is issued after the next
// block's tile instructions, so that it runs while the AMX unit works on them; hence two C
// buffers in memory, the one being folded and the one being stored.
template <int kBits>
void amx_group(const void* b0, const void* b1, int64_t b_stride, int64_t steps, int tiles, const int8_t* q,
               int64_t q_stride, int64_t rows, int32_t* c, const GroupFold& f, float* y) {
// C += A x B: tdpbssd for the signed 4-bit u - z, tdpbsud (signed q, unsigned u) for 8-bit u
// (a macro: the tile numbers must be literals).
#define FPTQ_TILE_DOT(c, a, b)                         \
  do {                                                 \
    if constexpr (kBits == 8) _tile_dpbsud(c, a, b);   \
    else _tile_dpbssd(c, a, b);                        \
  } while (0)
  constexpr int64_t c_stride = kPairTiles * kTileN * sizeof(int32_t);
  constexpr int64_t c_size = kPairRows * kPairTiles * kTileN;
  int pending_rows = 0;  // rows of the block stored in c_pending, not yet folded
  int64_t pending_row = 0;  // its first row
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
      FPTQ_TILE_LOAD(0, qk, q_stride);
      FPTQ_TILE_LOAD(2, static_cast<const uint8_t*>(b0) + step * b_stride, b_stride);
      FPTQ_TILE_DOT(4, 0, 2);
      if (tiles > 1) {
        FPTQ_TILE_LOAD(3, static_cast<const uint8_t*>(b1) + step * b_stride, b_stride);
        FPTQ_TILE_DOT(5, 0, 3);
      }
      if (two_a) {
        FPTQ_TILE_LOAD(1, qk + kTileRows * q_stride, q_stride);
        FPTQ_TILE_DOT(6, 1, 2);
        if (tiles > 1) FPTQ_TILE_DOT(7, 1, 3);
      }
    }
    if (pending_rows > 0) fold_block(c_pending, pending_rows, tiles, f, pending_row, y_pending);
    int32_t* c_block = c + (block % 2) * c_size;
    _tile_stored(4, c_block, c_stride);  // (has a "memory" clobber: the fold reads c after it)
    if (tiles > 1) _tile_stored(5, c_block + kTileN, c_stride);
    if (two_a) {
      _tile_stored(6, c_block + kTileRows * kPairTiles * kTileN, c_stride);
      if (tiles > 1) _tile_stored(7, c_block + kTileRows * kPairTiles * kTileN + kTileN, c_stride);
    }
    pending_rows = two_a ? kPairRows : kTileRows;
    pending_row = row;
    c_pending = c_block;
    y_pending = y + row * kPairTiles * kTileN;
  }
  if (pending_rows > 0) fold_block(c_pending, pending_rows, tiles, f, pending_row, y_pending);
}
#undef FPTQ_TILE_DOT

// Rows [row_begin, row_begin + rows) (rows a multiple of 16) x tiles [tile_begin, tile_end).
// Returns false, having done nothing, when its scratch cannot be allocated.
template <int kBits>
bool amx_tiles(const GemmArgs& a, int64_t row_begin, int64_t rows, int64_t tile_begin, int64_t tile_end) {
  const int64_t group_padded = a.chunks_per_group * kChunkK;
  const int64_t steps = group_padded / 4;
  // Unpacked 4-bit weights int8 [steps, 2, 64] (none for 8 bits), C int32 [2][32, 32], y float32 [rows, 32].
  const size_t weight_bytes = kBits == 4 ? static_cast<size_t>(steps * kPairTiles * kQuadBytes) : 0;
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
      const int8_t* q = a.q + row_begin * a.q_stride + g * group_padded;
      const int64_t tile_group = tile * a.groups + g;
      if constexpr (kBits == 4) {
        unpack_group_signed(a, tile, tiles, g, weights);
        const GroupFold fold{a.scales + tile_group * kTileN, nullptr, nullptr, a.groups};
        amx_group<4>(weights, weights + kQuadBytes, tiles * kQuadBytes, steps, tiles, q, a.q_stride, rows, c, fold, y);
      } else {
        const int64_t tile_bytes = a.groups * a.chunks_per_group * chunk_bytes(8);  // one tile's weights
        const uint8_t* b0 = a.weights + tile_group * a.chunks_per_group * chunk_bytes(8);
        const GroupFold fold{a.scales + tile_group * kTileN, a.zero_points + tile_group * kTileN,
                             a.q_group_sums + row_begin * a.groups + g, a.groups};
        amx_group<8>(b0, b0 + tile_bytes, kQuadBytes, steps, tiles, q, a.q_stride, rows, c, fold, y);
      }
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
  const bool amx_group_ok = group_padded % kTileK == 0 &&
                            (a.weight_bits == 8 || (group_padded <= kMaxGroup && a.max_zero_point <= 15));
  const int64_t amx_rows = amx_group_ok ? (row_end - row_begin) / kTileRows * kTileRows : 0;
  const bool done = amx_rows > 0 && (a.weight_bits == 8 ? amx_tiles<8>(a, row_begin, amx_rows, tile_begin, tile_end)
                                                        : amx_tiles<4>(a, row_begin, amx_rows, tile_begin, tile_end));
  if (done) row_begin += amx_rows;
  if (row_begin < row_end) kAvx512Kernels.gemm_tiles(a, row_begin, row_end, tile_begin, tile_end);
}

#undef FPTQ_TILE_LOAD

}  // namespace

// 256 rows per task: the weights a task unpacks per tile pair and group serve 8 register blocks.
const TileKernels kAmxKernels = {256, quantize_rows, gemm_tiles_amx};

}  // namespace cpu
}  // namespace fptq
