// CPU driver of W4A8MatMul: ISA choice, weight repacking and the split of the work into
// tasks (see w4a8_cpu.h). The arithmetic lives in the tile kernels (w4a8_cpu_tile.h).
#include "w4a8_cpu.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "w4a8_cpu_kernels.h"

namespace fptq {
namespace cpu {
namespace {

// Smallest amount of work worth a task of its own: below this, the thread pool's hand-off
// costs more than it saves (about 10-50 us of work per task).
constexpr int64_t kMinMacsPerTask = int64_t{1} << 19;
constexpr int64_t kMinFloatsPerQuantizeTask = int64_t{1} << 16;
// Rows of X per gemm task: the q rows of one task (64 x K bytes) stay in L2 while the task
// walks its tiles.
constexpr int64_t kRowsPerTask = 64;

// Which ISAs this CPU and this build can run.
bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::kGeneric:
      return true;
#if defined(FPTQ_X86_KERNELS)
    case Isa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2");
    case Isa::kAvx512Vnni:
      // libgcc also checks that the OS saves the zmm registers (XGETBV).
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni");
#endif
    default:
      return false;
  }
}

const TileKernels& kernels_for(Isa isa) {
  switch (isa) {
#if defined(FPTQ_X86_KERNELS)
    case Isa::kAvx512Vnni:
      return kAvx512Kernels;
    case Isa::kAvx2:
      return kAvx2Kernels;
#endif
    default:
      return kGenericKernels;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Start of part `i` of [0, total) cut into `parts` near-equal parts.
int64_t part_begin(int64_t total, int64_t parts, int64_t i) { return total * i / parts; }

// Upper bound on useful tasks: a few per hardware thread so that uneven tasks even out.
int64_t max_tasks() {
  static const int64_t count = 4 * std::max<int64_t>(1, std::thread::hardware_concurrency());
  return count;
}

// u[n, k]: nibble of weight (k, n) in B[N, K/2] (docs/ops.md: even k low, odd k high).
uint8_t nibble(const uint8_t* b, int64_t k_total, int64_t n, int64_t k) {
  const uint8_t byte = b[n * (k_total / 2) + k / 2];
  return (k & 1) ? byte >> 4 : byte & 0x0f;
}

// Owns an uninitialized array: the quantizer writes every element, so zero-filling it
// (std::vector) would be wasted work on the critical path.
template <class T>
std::unique_ptr<T[]> scratch(int64_t count) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(count, 1))]);
}

}  // namespace

Isa select_isa(const char* request) {
  if (request == nullptr || *request == '\0' || std::strcmp(request, "auto") == 0) {
    for (Isa isa : {Isa::kAvx512Vnni, Isa::kAvx2}) {
      if (cpu_supports(isa)) return isa;
    }
    return Isa::kGeneric;
  }
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512Vnni}) {
    if (std::strcmp(request, isa_name(isa)) != 0) continue;
    if (!cpu_supports(isa)) {
      throw std::invalid_argument(std::string("FPTQ_CPU_ISA=") + request +
                                  ": not supported by this CPU or this build");
    }
    return isa;
  }
  throw std::invalid_argument(std::string("FPTQ_CPU_ISA=") + request +
                              ": unknown, expected auto, generic, avx2 or avx512vnni");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512Vnni:
      return "avx512vnni";
    default:
      return "generic";
  }
}

PackedWeights pack_weights(const uint8_t* b, const float* scales, const uint8_t* zero_points, const W4A8Attrs& attrs) {
  PackedWeights w;
  w.n = attrs.N;
  w.k = attrs.K;
  w.group_size = attrs.group_size;
  w.groups = attrs.groups();
  w.group_padded = ceil_div(attrs.group_size, kChunkK) * kChunkK;
  w.tiles = ceil_div(attrs.N, kTileN);
  const int64_t chunks_per_group = w.group_padded / kChunkK;
  w.nibbles.assign(static_cast<size_t>(w.tiles * w.groups * chunks_per_group * kChunkBytes), 0);
  w.scales.assign(static_cast<size_t>(w.tiles * w.groups * kTileN), 0.0f);
  w.zero_points.assign(static_cast<size_t>(w.tiles * w.groups * kTileN), 0);

  for (int64_t tile = 0; tile < w.tiles; ++tile) {
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t tile_group = tile * w.groups + g;
      for (int j = 0; j < kTileN; ++j) {
        const int64_t n = tile * kTileN + j;
        if (n >= w.n) break;  // padded channels keep u = z = s = 0: they add nothing
        w.scales[tile_group * kTileN + j] = scales[n * w.groups + g];
        w.zero_points[tile_group * kTileN + j] = zero_points[n * w.groups + g];
        for (int64_t c = 0; c < chunks_per_group; ++c) {
          uint8_t* chunk = &w.nibbles[(tile_group * chunks_per_group + c) * kChunkBytes];
          for (int i = 0; i < 4; ++i) {
            // Positions p of the padded group; p >= group_size is padding (u = 0).
            const int64_t p_lo = c * kChunkK + i, p_hi = p_lo + 4;
            const uint8_t lo = p_lo < w.group_size ? nibble(b, w.k, n, g * w.group_size + p_lo) : 0;
            const uint8_t hi = p_hi < w.group_size ? nibble(b, w.k, n, g * w.group_size + p_hi) : 0;
            chunk[4 * j + i] = static_cast<uint8_t>(lo | (hi << 4));
          }
        }
      }
    }
  }
  return w;
}

void serial_for(size_t count, const std::function<void(size_t)>& task) {
  for (size_t i = 0; i < count; ++i) task(i);
}

void w4a8_matmul(const float* x, int64_t m, const PackedWeights& w, int64_t act_mode, float act_scale, float* y,
                 Isa isa, const ParallelFor& parallel_for) {
  if (m <= 0) return;
  const TileKernels& kernels = kernels_for(isa);
  const int64_t padded_k = w.groups * w.group_padded;
  std::unique_ptr<int8_t[]> q = scratch<int8_t>(m * padded_k);
  std::unique_ptr<int32_t[]> q_group_sums = scratch<int32_t>(m * w.groups);
  std::unique_ptr<float[]> row_scales = scratch<float>(m);

  // Stage 1: quantize X row by row (rows are independent).
  const QuantizeArgs qa{x, w.k, w.group_size, w.groups, w.group_padded, act_mode, act_scale,
                        q.get(), q_group_sums.get(), row_scales.get()};
  const int64_t quantize_tasks = std::clamp<int64_t>(m * w.k / kMinFloatsPerQuantizeTask, 1, std::min(m, max_tasks()));
  parallel_for(static_cast<size_t>(quantize_tasks), [&](size_t i) {
    const auto t = static_cast<int64_t>(i);
    kernels.quantize_rows(qa, part_begin(m, quantize_tasks, t), part_begin(m, quantize_tasks, t + 1));
  });

  // Stage 2: tiles x rows. Blocks of kRowsPerTask rows, each cut into tile ranges so that
  // there are enough tasks for the threads but each stays worth its hand-off.
  const GemmArgs ga{w.nibbles.data(), w.scales.data(), w.zero_points.data(), w.n, w.groups,
                    w.group_padded / kChunkK, q.get(), q_group_sums.get(), row_scales.get(), y};
  const int64_t row_blocks = ceil_div(m, kRowsPerTask);
  const double macs = static_cast<double>(m) * static_cast<double>(w.n) * static_cast<double>(w.k);
  const auto wanted_tasks = static_cast<int64_t>(std::clamp<double>(macs / kMinMacsPerTask, 1, max_tasks()));
  const int64_t tile_parts = std::clamp<int64_t>(wanted_tasks / row_blocks, 1, w.tiles);
  parallel_for(static_cast<size_t>(row_blocks * tile_parts), [&](size_t i) {
    const int64_t block = static_cast<int64_t>(i) / tile_parts, part = static_cast<int64_t>(i) % tile_parts;
    const int64_t row_begin = block * kRowsPerTask, row_end = std::min(m, row_begin + kRowsPerTask);
    kernels.gemm_tiles(ga, row_begin, row_end, part_begin(w.tiles, tile_parts, part),
                       part_begin(w.tiles, tile_parts, part + 1));
  });
}

}  // namespace cpu
}  // namespace fptq
