// AVX-512 VNNI tile kernels (compiled with -mavx512f/bw/vl/dq/vnni; used only when the CPU has
// them). One 16-channel tile is one zmm register; vpdpbusd multiplies 4 unsigned u by 4 signed
// q (-127..127) per channel and adds them into the channel's int32 lane in one instruction,
// without the int16 intermediate of AVX2. Unsigned bytes times signed bytes is exactly what
// 8-bit weights (u in 0..255) need too: for them a chunk is its two quads as stored
// (w4a8_cpu_kernels.h), so each kernel below is a template on the weight width whose only
// 8-bit difference is that nothing is masked or shifted.
//
// Two paths, one result: both compute the same exact int32 group sums and then the same float
// operations in the same order (y = fma(s, float(acc - z * q_sum), y) over the groups, then
// a_m * y), so a row's output does not depend on which path ran it, i.e. on the batch size.
//
// * streaming (1-4 rows, e.g. one decoding token): each weight byte is read once and used for
//   a few multiply-adds, so the limit is memory bandwidth, provided that the vpdpbusd chains
//   (5 cycles latency each) do not bound it first: each row spreads a group over 4 (one row)
//   or 2 sets of accumulators, low and high nibbles apart. The high nibbles are not shifted
//   down: vpdpbusd on (byte & 0xf0) gives 16 x their sum, shifted back once per group. The
//   weights of a task are one contiguous stream, and every chunk's cache line is prefetched
//   kStreamPrefetchBytes ahead into L2: the hardware prefetchers alone kept too few lines in
//   flight when the weights come from DRAM, as in decoding. 8-bit chunks are two plain loads,
//   hi not scaled.
// * blocked (5 rows or more): compute-bound. The weights of kBlockTiles tiles and one group are
//   unpacked once into a small thread-local buffer (one byte per weight, in the order the inner
//   loop reads them; for 8 bits a copy of the quads, reordered) and reused by every block of
//   kBlockRows rows, whose kBlockRows x
//   kBlockTiles accumulators stay in registers: the inner loop is one load per tile and one
//   broadcast per row around kBlockRows x kBlockTiles vpdpbusd (about 90% of the issue slots of
//   the two vector ports go to vpdpbusd at M = 64).
#include <immintrin.h>

#include <utility>

#include "w4a8_cpu_avx512.h"

namespace fptq {
namespace cpu {
namespace {

// --- streaming path: kRows (1-4) rows x one tile, weights unpacked in registers -------------

// How far ahead of the chunk being read its cache line is prefetched (prefetcht1: into L2, not
// L1, which the stream would only flush). On the Sapphire Rapids-class Xeon (2 threads,
// SmolLM2-135M decoding through onnxruntime-genai, 96 MB of weights per token) 8, 16 and 32 KB
// ahead gave 116-118 tok/s against 87 without (1 thread; 194-212 against 161 with 2); the same
// layers with weights from DRAM (cold): 1536x576 45 -> 22 us. A prefetch past the end of the
// weights is harmless (it never faults).
constexpr int64_t kStreamPrefetchBytes = 16 << 10;

// kRows rows x one tile of kBits-bit weights. The int32 sums of a group are spread over
// kSets x 2 accumulators per row (set e takes chunks c with c % kSets == e; quads lo and hi
// apart) so that enough vpdpbusd are independent to hide their latency: 4 sets for one row, 2
// for more.
template <int kBits, int kRows>
void stream_block(const GemmArgs& a, int64_t tile, int64_t row) {
  constexpr int kSets = kRows == 1 ? 4 : 2;
  constexpr int64_t kBytes = chunk_bytes(kBits);
  const int64_t cpg = a.chunks_per_group;
  const uint8_t* w = a.weights + tile * a.groups * cpg * kBytes;
  const float* s_tile = a.scales + tile * a.groups * kTileN;
  const uint8_t* z_tile = a.zero_points + tile * a.groups * kTileN;
  const int8_t* q = a.q + row * a.q_stride;
  const __m512i low_mask = _mm512_set1_epi8(0x0f), high_mask = _mm512_set1_epi8(static_cast<char>(0xf0));

  // Chunk c of the current group into accumulator set e: quad lo times q[8c .. 8c + 3], quad
  // hi times q[8c + 4 .. 8c + 7]. 4 bits: the quads are the low nibbles and the high nibbles
  // left in place (so 16 x their value).
  auto chunk = [&](__m512i* acc_lo, __m512i* acc_hi, const uint8_t* w_chunk, const int8_t* q_chunk) {
    __m512i lo, hi;
    const char* ahead = reinterpret_cast<const char*>(w_chunk) + kStreamPrefetchBytes;
    _mm_prefetch(ahead, _MM_HINT_T1);
    if constexpr (kBits == 8) _mm_prefetch(ahead + 64, _MM_HINT_T1);  // a chunk is two lines
    if constexpr (kBits == 8) {
      lo = _mm512_loadu_si512(w_chunk);
      hi = _mm512_loadu_si512(w_chunk + kQuadBytes);
    } else {
      const __m512i bytes = _mm512_loadu_si512(w_chunk);
      lo = _mm512_and_si512(bytes, low_mask);
      hi = _mm512_and_si512(bytes, high_mask);
    }
    for (int r = 0; r < kRows; ++r) {
      dpbusd(acc_lo[r], lo, broadcast_q4(q_chunk + r * a.q_stride));
      dpbusd(acc_hi[r], hi, broadcast_q4(q_chunk + r * a.q_stride + 4));
    }
  };

  __m512 y[kRows];
  for (int r = 0; r < kRows; ++r) y[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g, w += cpg * kBytes) {
    __m512i acc_lo[kSets][kRows], acc_hi[kSets][kRows];
    for (int e = 0; e < kSets; ++e) {
      for (int r = 0; r < kRows; ++r) acc_lo[e][r] = acc_hi[e][r] = _mm512_setzero_si512();
    }
    const int8_t* q_group = q + g * cpg * kChunkK;
    int64_t c = 0;
    for (; c + kSets <= cpg; c += kSets) {
      for (int e = 0; e < kSets; ++e) {
        chunk(acc_lo[e], acc_hi[e], w + (c + e) * kBytes, q_group + (c + e) * kChunkK);
      }
    }
    for (; c < cpg; ++c) chunk(acc_lo[0], acc_hi[0], w + c * kBytes, q_group + c * kChunkK);
    const __m512i z = load_zero_points(z_tile + g * kTileN);
    const __m512 s = _mm512_loadu_ps(s_tile + g * kTileN);
    for (int r = 0; r < kRows; ++r) {
      __m512i lo = acc_lo[0][r], hi = acc_hi[0][r];
      for (int e = 1; e < kSets; ++e) {
        lo = _mm512_add_epi32(lo, acc_lo[e][r]);
        hi = _mm512_add_epi32(hi, acc_hi[e][r]);
      }
      // 4 bits: the high sums are multiples of 16, the arithmetic shift is exact.
      const __m512i acc = _mm512_add_epi32(lo, kBits == 8 ? hi : _mm512_srai_epi32(hi, 4));
      y[r] = fold_group(y[r], acc, z, s, a.q_group_sums[(row + r) * a.groups + g]);
    }
  }
  const int valid = valid_channels(a, tile);
  for (int r = 0; r < kRows; ++r) store_row(a.y + (row + r) * a.n + tile * kTileN, y[r], a.row_scales[row + r], valid);
}

template <int kBits>
void stream_tiles(const GemmArgs& a, int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end) {
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    int64_t row = row_begin;
    for (; row + 4 <= row_end; row += 4) stream_block<kBits, 4>(a, tile, row);
    switch (row_end - row) {
      case 3: stream_block<kBits, 3>(a, tile, row); break;
      case 2: stream_block<kBits, 2>(a, tile, row); break;
      case 1: stream_block<kBits, 1>(a, tile, row); break;
      default: break;
    }
  }
}

// --- blocked path: kBlockRows x kBlockTiles register blocks over unpacked weights ----------

constexpr int kBlockRows = 6;   // (6 x 4 measured faster than 8 x 3, 4 x 4 and 8 x 2)
constexpr int kBlockTiles = 4;
// Row counts from which the blocked path pays for its unpacking (the unpacked weights of a
// group are reused by ceil(rows / kBlockRows) register blocks), and the largest padded group
// it takes (its thread-local buffers grow with the group; larger groups stream).
constexpr int64_t kBlockedMinRows = 5;
constexpr int64_t kBlockedMaxGroup = 1024;

// Unpacks group g of tiles [tile, tile + tiles) of kBits-bit weights into out: uint8
// [steps, tiles, 64] with steps = 2 * chunks_per_group, where step 2c holds quad lo of chunk c
// and step 2c + 1 quad hi: 16 channels x 4 consecutive k (positions 4 * step .. 4 * step + 3 of
// the padded group) per tile, the operand layout of vpdpbusd. 4 bits: the low and the high
// nibbles; 8 bits: the stored quads, only reordered (tiles interleaved per step).
template <int kBits>
void unpack_group(const GemmArgs& a, int64_t tile, int tiles, int64_t g, uint8_t* out) {
  constexpr int64_t kBytes = chunk_bytes(kBits);
  const __m512i low_mask = _mm512_set1_epi8(0x0f);
  const int64_t cpg = a.chunks_per_group;
  for (int t = 0; t < tiles; ++t) {
    const uint8_t* w = a.weights + ((tile + t) * a.groups + g) * cpg * kBytes;
    for (int64_t c = 0; c < cpg; ++c) {
      __m512i lo, hi;
      if constexpr (kBits == 8) {
        lo = _mm512_loadu_si512(w + c * kBytes);
        hi = _mm512_loadu_si512(w + c * kBytes + kQuadBytes);
      } else {
        const __m512i bytes = _mm512_loadu_si512(w + c * kBytes);
        lo = _mm512_and_si512(bytes, low_mask);
        hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_mask);
      }
      _mm512_storeu_si512(out + ((2 * c) * tiles + t) * kQuadBytes, lo);
      _mm512_storeu_si512(out + ((2 * c + 1) * tiles + t) * kQuadBytes, hi);
    }
  }
}

// One group for kRows rows x kTiles tiles: int32 dot products in registers, then
// y += s * float(acc - z * q_sum) into the float32 scratch rows.
// w: from unpack_group (tiles = kTiles); steps: 2 * chunks_per_group; q: row 0's q at the
// group's first position; q_stride: bytes between q rows; q_sums: row 0's q_group_sums at g
// (stride G); z, s: tile 0's zero points / scales of the group (stride G * 16 between tiles);
// y: row 0's scratch (kBlockTiles * 16 floats per row).
template <int kRows, int kTiles>
void block_group(const uint8_t* w, int64_t steps, const int8_t* q, int64_t q_stride, const int32_t* q_sums,
                 int64_t groups, const uint8_t* z, const float* s, float* y) {
  static_assert(kRows >= 1 && kRows <= 6 && kTiles >= 1 && kTiles <= 4, "the macros below spell out 6 x 4");
  // Accumulator c<r><t> of row r, tile t: separate variables, because GCC keeps an array of
  // 24 vectors in memory (it is past its scalarization limit). Those beyond kRows x kTiles are
  // never touched and vanish.
  const __m512i zero = _mm512_setzero_si512();
#define FPTQ_ACC_ROW(r) [[maybe_unused]] __m512i c##r##0 = zero, c##r##1 = zero, c##r##2 = zero, c##r##3 = zero;
  FPTQ_ACC_ROW(0) FPTQ_ACC_ROW(1) FPTQ_ACC_ROW(2) FPTQ_ACC_ROW(3) FPTQ_ACC_ROW(4) FPTQ_ACC_ROW(5)
#undef FPTQ_ACC_ROW
  for (int64_t step = 0; step < steps; ++step, w += kTiles * kQuadBytes) {
    [[maybe_unused]] __m512i w0, w1, w2, w3;
    w0 = _mm512_loadu_si512(w);
    if constexpr (kTiles > 1) w1 = _mm512_loadu_si512(w + kQuadBytes);
    if constexpr (kTiles > 2) w2 = _mm512_loadu_si512(w + 2 * kQuadBytes);
    if constexpr (kTiles > 3) w3 = _mm512_loadu_si512(w + 3 * kQuadBytes);
#define FPTQ_DOT_ROW(r)                                             \
  if constexpr (r < kRows) {                                        \
    const __m512i b = broadcast_q4(q + r * q_stride + 4 * step);    \
    dpbusd(c##r##0, w0, b);                                         \
    if constexpr (kTiles > 1) dpbusd(c##r##1, w1, b);               \
    if constexpr (kTiles > 2) dpbusd(c##r##2, w2, b);               \
    if constexpr (kTiles > 3) dpbusd(c##r##3, w3, b);               \
  }
    FPTQ_DOT_ROW(0) FPTQ_DOT_ROW(1) FPTQ_DOT_ROW(2) FPTQ_DOT_ROW(3) FPTQ_DOT_ROW(4) FPTQ_DOT_ROW(5)
#undef FPTQ_DOT_ROW
  }
  // y[r, t] += s_t * float(c<r><t> - z_t * q_sum[r]).
  auto fold = [&](int r, int t, __m512i acc) {
    float* yt = y + r * (kBlockTiles * kTileN) + t * kTileN;
    const __m512i zt = load_zero_points(z + t * groups * kTileN);
    const __m512 st = _mm512_loadu_ps(s + t * groups * kTileN);
    _mm512_storeu_ps(yt, fold_group(_mm512_loadu_ps(yt), acc, zt, st, q_sums[r * groups]));
  };
#define FPTQ_FOLD_ROW(r)                               \
  if constexpr (r < kRows) {                           \
    fold(r, 0, c##r##0);                               \
    if constexpr (kTiles > 1) fold(r, 1, c##r##1);     \
    if constexpr (kTiles > 2) fold(r, 2, c##r##2);     \
    if constexpr (kTiles > 3) fold(r, 3, c##r##3);     \
  }
  FPTQ_FOLD_ROW(0) FPTQ_FOLD_ROW(1) FPTQ_FOLD_ROW(2) FPTQ_FOLD_ROW(3) FPTQ_FOLD_ROW(4) FPTQ_FOLD_ROW(5)
#undef FPTQ_FOLD_ROW
}

using BlockGroupFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const int32_t*, int64_t,
                              const uint8_t*, const float*, float*);

template <int kTiles, int... kRows>
constexpr void fill_row(BlockGroupFn* out, std::integer_sequence<int, kRows...>) {
  ((out[kRows] = block_group<kRows + 1, kTiles>), ...);
}

// kBlockGroup[t - 1][r - 1]: block_group<r, t> for r <= kBlockRows, t <= kBlockTiles.
struct BlockGroupTable {
  BlockGroupFn fn[kBlockTiles][kBlockRows];
  constexpr BlockGroupTable() : fn{} {
    fill_row<1>(fn[0], std::make_integer_sequence<int, kBlockRows>{});
    if constexpr (kBlockTiles > 1) fill_row<2>(fn[1], std::make_integer_sequence<int, kBlockRows>{});
    if constexpr (kBlockTiles > 2) fill_row<3>(fn[2], std::make_integer_sequence<int, kBlockRows>{});
    if constexpr (kBlockTiles > 3) fill_row<4>(fn[3], std::make_integer_sequence<int, kBlockRows>{});
  }
};
static_assert(kBlockTiles <= 4, "BlockGroupTable lists the tile counts 1..4");
constexpr BlockGroupTable kBlockGroup;

template <int kBits>
void blocked_tiles(const GemmArgs& a, int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end) {
  const int64_t rows = row_end - row_begin;
  const int64_t steps = 2 * a.chunks_per_group;
  // Unpacked weights (uint8 [steps, kBlockTiles, 64]) then y (float32 [rows, kBlockTiles * 16]).
  const size_t weight_bytes = static_cast<size_t>(steps * kBlockTiles * kQuadBytes);
  const size_t y_bytes = static_cast<size_t>(rows * kBlockTiles * kTileN) * sizeof(float);
  thread_local TaskScratch scratch;  // this worker thread's: grown on demand, kept
  uint8_t* const buffer = scratch.get(weight_bytes + y_bytes);
  if (buffer == nullptr) return stream_tiles<kBits>(a, row_begin, row_end, tile_begin, tile_end);
  uint8_t* const weights = buffer;
  float* const y = reinterpret_cast<float*>(buffer + weight_bytes);

  for (int64_t tile = tile_begin; tile < tile_end; tile += kBlockTiles) {
    const int tiles = static_cast<int>(tile_end - tile < kBlockTiles ? tile_end - tile : kBlockTiles);
    __builtin_memset(y, 0, y_bytes);
    for (int64_t g = 0; g < a.groups; ++g) {
      unpack_group<kBits>(a, tile, tiles, g, weights);
      const uint8_t* z = a.zero_points + (tile * a.groups + g) * kTileN;
      const float* s = a.scales + (tile * a.groups + g) * kTileN;
      for (int64_t r = 0; r < rows; r += kBlockRows) {
        const int block = static_cast<int>(rows - r < kBlockRows ? rows - r : kBlockRows);
        const int64_t row = row_begin + r;
        kBlockGroup.fn[tiles - 1][block - 1](
            weights, steps, a.q + row * a.q_stride + g * a.chunks_per_group * kChunkK, a.q_stride,
            a.q_group_sums + row * a.groups + g, a.groups, z, s, y + r * kBlockTiles * kTileN);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int t = 0; t < tiles; ++t) {
        store_row(a.y + (row_begin + r) * a.n + (tile + t) * kTileN,
                  _mm512_loadu_ps(y + (r * kBlockTiles + t) * kTileN), a.row_scales[row_begin + r],
                  valid_channels(a, tile + t));
      }
    }
  }
}

template <int kBits>
void gemm_tiles_of(const GemmArgs& a, int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end) {
  if (row_end - row_begin >= kBlockedMinRows && a.chunks_per_group * kChunkK <= kBlockedMaxGroup) {
    blocked_tiles<kBits>(a, row_begin, row_end, tile_begin, tile_end);
  } else {
    stream_tiles<kBits>(a, row_begin, row_end, tile_begin, tile_end);
  }
}

// TileKernels::gemm_tiles: the weight format is chosen once per task.
void gemm_tiles_avx512(const GemmArgs& a, int64_t row_begin, int64_t row_end, int64_t tile_begin, int64_t tile_end) {
  if (a.weight_bits == 8) {
    gemm_tiles_of<8>(a, row_begin, row_end, tile_begin, tile_end);
  } else {
    gemm_tiles_of<4>(a, row_begin, row_end, tile_begin, tile_end);
  }
}

}  // namespace

const TileKernels kAvx512Kernels = {64, quantize_rows, gemm_tiles_avx512};

}  // namespace cpu
}  // namespace fptq
