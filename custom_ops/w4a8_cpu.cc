// CPU driver of W4A8MatMul and W8A8MatMul: ISA choice, weight repacking and the split of the
// work into tasks (see w4a8_cpu.h). The arithmetic lives in the tile kernels (w4a8_cpu_tile.h).
#include "w4a8_cpu.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#if defined(FPTQ_AMX_KERNELS) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "w4a8_cpu_kernels.h"

namespace fptq {
namespace cpu {
namespace {

// Smallest amount of work worth a task of its own: below this, the thread pool's hand-off
// costs more than it saves. Compute-bound work (many rows) is counted in multiply-adds (about
// 2-5 us per task); memory-bound work (a few rows) in bytes of packed weights streamed, since a
// 300 KB layer takes ~15 us on one core, and two cores stream faster than one.
constexpr int64_t kMinMacsPerTask = int64_t{1} << 19;
constexpr int64_t kMinWeightBytesPerTask = int64_t{32} << 10;
constexpr int64_t kMinFloatsPerQuantizeTask = int64_t{1} << 16;
// Largest q block of one gemm task (rows x q row stride): a task re-reads its q rows for every
// tile (block) it walks, so they should stay in L2; 1 MB is half of a 2 MB L2 (Sapphire Rapids).
// At K = 11008 this cuts AMX tasks from 256 rows (2.8 MB of q) to 80, which halved the time of
// M = 512.
constexpr int64_t kMaxQBytesPerTask = int64_t{1} << 20;

#if defined(FPTQ_AMX_KERNELS)
// AMX-INT8: the CPU has the instructions (CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8)
// and Linux lets this process use the 8 KB tile data state, which it must request once
// (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+; see the kernel's Documentation/arch/x86/xstate.rst).
bool amx_usable() {
#if !defined(__linux__)
  return false;  // the permission request below is Linux's; other systems keep the AVX-512 kernels
#else
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!((edx >> 24) & 1) || !((edx >> 25) & 1)) return false;
    constexpr long kArchReqXcompPerm = 0x1023;  // from asm/prctl.h
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#endif
}
#endif

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
#if defined(FPTQ_AMX_KERNELS)
    case Isa::kAmx:
      return cpu_supports(Isa::kAvx512Vnni) && amx_usable();
#endif
    default:
      return false;
  }
}

const TileKernels& kernels_for(Isa isa) {
  switch (isa) {
#if defined(FPTQ_AMX_KERNELS)
    case Isa::kAmx:
      return kAmxKernels;
#endif
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

// Bytes of one row of B: ceil(K / 2) for 4-bit weights (two per byte; an odd K's last high
// nibble is unused), K for 8-bit ones.
int64_t b_row_bytes(int64_t weight_bits, int64_t k_total) { return weight_bits == 8 ? k_total : (k_total + 1) / 2; }

// u[n, k] of weight (k, n) in B (docs/ops.md): 4 bits, the nibble of B[n, k / 2] (even k low,
// odd k high); 8 bits, the byte B[n, k].
uint8_t weight_at(const uint8_t* b, int64_t weight_bits, int64_t k_total, int64_t n, int64_t k) {
  const uint8_t* row = b + n * b_row_bytes(weight_bits, k_total);
  if (weight_bits == 8) return row[k];
  return (k & 1) ? row[k / 2] >> 4 : row[k / 2] & 0x0f;
}

// Nibbles u0..u7 of 8 consecutive k as stored in B (byte i = u[2i] | u[2i + 1] << 4, byte 0 in
// the low bits) -> the chunk layout (byte i = u[i] | u[4 + i] << 4): the "outer perfect
// shuffle" of the 8 nibbles of a word, Hacker's Delight 7-2.
uint32_t interleave_nibbles(uint32_t x) {
  x = (x & 0xff0000ffu) | ((x << 8) & 0x00ff0000u) | ((x >> 8) & 0x0000ff00u);
  x = (x & 0xf00ff00fu) | ((x << 4) & 0x0f000f00u) | ((x >> 4) & 0x00f000f0u);
  return x;
}

// Per-thread scratch of the driver (quantized activations), grown on demand and kept between
// calls so that a steady stream of runs allocates nothing; uninitialized, because the quantizer
// writes every element and zero-filling would be wasted work on the critical path. Buffers
// larger than kMaxKeptScratchBytes are released after the call that needed them.
constexpr size_t kMaxKeptScratchBytes = size_t{64} << 20;

class Scratch {
 public:
  // At least `bytes` bytes, aligned for any scalar type.
  void* get(size_t bytes) {
    if (bytes > size_) {
      data_.reset(new std::max_align_t[bytes / sizeof(std::max_align_t) + 1]);
      size_ = bytes;
    }
    return data_.get();
  }
  // Drops an oversized buffer (see kMaxKeptScratchBytes).
  void trim() {
    if (size_ > kMaxKeptScratchBytes) {
      data_.reset();
      size_ = 0;
    }
  }

 private:
  std::unique_ptr<std::max_align_t[]> data_;
  size_t size_ = 0;
};

// Bytes between rows of the quantized activations for padded_k values per row: a multiple of
// 64 (cache lines), but not of 512, so that the rows of a block (16 or 32 read together by an
// AMX tile load, 6 by the AVX-512 blocks) fall into different L1 sets; with a stride of 4096
// bytes they would all compete for one set.
int64_t q_row_stride(int64_t padded_k) {
  const int64_t stride = (padded_k + 63) / 64 * 64;
  return stride % 512 == 0 ? stride + 64 : stride;
}

// Bytes of an array of `count` T, rounded up to a multiple of 64 (the next array's alignment).
template <class T>
size_t array_bytes(int64_t count) {
  return (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
}

}  // namespace

Isa select_isa(const char* request) {
  if (request == nullptr || *request == '\0' || std::strcmp(request, "auto") == 0) {
    for (Isa isa : {Isa::kAmx, Isa::kAvx512Vnni, Isa::kAvx2}) {
      if (cpu_supports(isa)) return isa;
    }
    return Isa::kGeneric;
  }
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512Vnni, Isa::kAmx}) {
    if (std::strcmp(request, isa_name(isa)) != 0) continue;
    if (!cpu_supports(isa)) {
      throw std::invalid_argument(std::string("FPTQ_CPU_ISA=") + request +
                                  ": not supported by this CPU or this build");
    }
    return isa;
  }
  throw std::invalid_argument(std::string("FPTQ_CPU_ISA=") + request +
                              ": unknown, expected auto, generic, avx2, avx512vnni or amx");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512Vnni:
      return "avx512vnni";
    case Isa::kAmx:
      return "amx";
    default:
      return "generic";
  }
}

PackedWeights pack_weights(const uint8_t* b, const float* scales, const uint8_t* zero_points, const W4A8Attrs& attrs,
                           const ParallelFor& parallel_for) {
  PackedWeights w;
  w.n = attrs.N;
  w.k = attrs.K;
  w.group_size = attrs.group_size;
  w.groups = attrs.groups();
  // A group larger than K (one group of all K, e.g. per-channel weights with group_size =
  // K + 1 or more) is padded only to K: positions past K are padding in either case, and
  // padding to group_size would store and stream that many zero chunks.
  w.group_padded = ceil_div(std::min(attrs.group_size, attrs.K), kChunkK) * kChunkK;
  w.tiles = ceil_div(attrs.N, kTileN);
  w.weight_bits = attrs.weight_bits;
  const int64_t chunks_per_group = w.group_padded / kChunkK;
  const int64_t bytes_per_chunk = chunk_bytes(w.weight_bits);
  const int64_t row_bytes = b_row_bytes(w.weight_bits, w.k);
  w.weights.assign(static_cast<size_t>(w.tiles * w.groups * chunks_per_group * bytes_per_chunk), 0);
  w.scales.assign(static_cast<size_t>(w.tiles * w.groups * kTileN), 0.0f);
  w.zero_points.assign(static_cast<size_t>(w.tiles * w.groups * kTileN), 0);

  // Tiles [tile_begin, tile_end): disjoint parts of the three arrays.
  auto pack_tiles = [&](int64_t tile_begin, int64_t tile_end) {
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int channels = static_cast<int>(std::min<int64_t>(kTileN, w.n - tile * kTileN));
      // Padded channels (j >= channels) keep u = z = s = 0: they add nothing.
      for (int64_t g = 0; g < w.groups; ++g) {
        const int64_t tile_group = tile * w.groups + g;
        // Weights of the group that exist: group_size, less in a last partial group, whose
        // missing positions are padding exactly like those past group_size (u = 0, q = 0).
        const int64_t group_len = std::min(w.group_size, w.k - g * w.group_size);
        for (int j = 0; j < channels; ++j) {
          const int64_t n = tile * kTileN + j;
          w.scales[tile_group * kTileN + j] = scales[n * w.groups + g];
          w.zero_points[tile_group * kTileN + j] = zero_points[n * w.groups + g];
        }
        for (int64_t c = 0; c < chunks_per_group; ++c) {
          uint8_t* chunk = &w.weights[(tile_group * chunks_per_group + c) * bytes_per_chunk];
          const bool whole = c * kChunkK + kChunkK <= group_len;
          const int64_t k0 = g * w.group_size + c * kChunkK;  // the chunk's first k
          for (int j = 0; j < channels; ++j) {
            const int64_t n = tile * kTileN + j;
            if (whole && w.weight_bits == 8) {  // quads lo and hi are 4 source bytes each
              std::memcpy(chunk + 4 * j, b + n * row_bytes + k0, 4);
              std::memcpy(chunk + kQuadBytes + 4 * j, b + n * row_bytes + k0 + 4, 4);
              continue;
            }
            if (whole) {  // 4 source bytes (the chunk starts at an even k)
              const uint8_t* src = b + n * row_bytes + k0 / 2;
              const uint32_t packed = interleave_nibbles(
                  static_cast<uint32_t>(src[0]) | static_cast<uint32_t>(src[1]) << 8 |
                  static_cast<uint32_t>(src[2]) << 16 | static_cast<uint32_t>(src[3]) << 24);
              for (int i = 0; i < 4; ++i) chunk[4 * j + i] = static_cast<uint8_t>(packed >> (8 * i));
              continue;
            }
            for (int i = 0; i < 4; ++i) {
              // Positions p of the padded group; p >= group_len is padding (u = 0).
              const int64_t p_lo = c * kChunkK + i, p_hi = p_lo + 4;
              const uint8_t lo = p_lo < group_len ? weight_at(b, w.weight_bits, w.k, n, k0 + i) : 0;
              const uint8_t hi = p_hi < group_len ? weight_at(b, w.weight_bits, w.k, n, k0 + 4 + i) : 0;
              if (w.weight_bits == 8) {
                chunk[4 * j + i] = lo;
                chunk[kQuadBytes + 4 * j + i] = hi;
              } else {
                chunk[4 * j + i] = static_cast<uint8_t>(lo | (hi << 4));
              }
            }
          }
        }
      }
    }
  };
  w.max_zero_point = *std::max_element(zero_points, zero_points + w.n * w.groups);
  const auto packed_bytes = static_cast<int64_t>(w.weights.size());
  const int64_t parts = std::clamp<int64_t>(packed_bytes / kMinWeightBytesPerTask, 1, std::min(w.tiles, max_tasks()));
  parallel_for(static_cast<size_t>(parts), [&](size_t i) {
    const auto part = static_cast<int64_t>(i);
    pack_tiles(part_begin(w.tiles, parts, part), part_begin(w.tiles, parts, part + 1));
  });
  return w;
}

void serial_for(size_t count, const std::function<void(size_t)>& task) {
  for (size_t i = 0; i < count; ++i) task(i);
}

void w4a8_matmul(const float* x, int64_t m, const PackedWeights& w, int64_t act_mode, float act_scale, float* y,
                 Isa isa, const ParallelFor& parallel_for) {
  if (m <= 0) return;
  const TileKernels& kernels = kernels_for(isa);
  const int64_t q_stride = q_row_stride(w.groups * w.group_padded);
  // q, q_group_sums and row_scales in one buffer of this thread (the one that called us).
  thread_local Scratch scratch;
  const size_t q_bytes = array_bytes<int8_t>(m * q_stride), sums_bytes = array_bytes<int32_t>(m * w.groups);
  auto* buffer = static_cast<uint8_t*>(scratch.get(q_bytes + sums_bytes + array_bytes<float>(m)));
  auto* q = reinterpret_cast<int8_t*>(buffer);
  auto* q_group_sums = reinterpret_cast<int32_t*>(buffer + q_bytes);
  auto* row_scales = reinterpret_cast<float*>(buffer + q_bytes + sums_bytes);

  // Stage 1: quantize X row by row (rows are independent).
  const QuantizeArgs qa{x, w.k, w.group_size, w.groups, w.group_padded, act_mode, act_scale, q_stride,
                        q, q_group_sums, row_scales};
  const int64_t quantize_tasks = std::clamp<int64_t>(m * w.k / kMinFloatsPerQuantizeTask, 1, std::min(m, max_tasks()));
  parallel_for(static_cast<size_t>(quantize_tasks), [&](size_t i) {
    const auto t = static_cast<int64_t>(i);
    kernels.quantize_rows(qa, part_begin(m, quantize_tasks, t), part_begin(m, quantize_tasks, t + 1));
  });

  // Stage 2: tiles x rows. Blocks of the kernels' rows_per_task rows, each cut into tile ranges
  // so that there are enough tasks for the threads but each stays worth its hand-off.
  const int64_t last_group_length = w.k - (w.groups - 1) * w.group_size;
  const GemmArgs ga{w.weights.data(), w.weight_bits, w.scales.data(), w.zero_points.data(), w.max_zero_point, w.n,
                    w.groups, w.group_padded / kChunkK, ceil_div(last_group_length, kChunkK), q_stride, q,
                    q_group_sums, row_scales, y};
  // The kernels' rows per task, fewer when their q would not fit kMaxQBytesPerTask (multiples of
  // 16: the AMX kernel's row blocks).
  const int64_t rows_fitting = std::max<int64_t>(16, kMaxQBytesPerTask / q_stride / 16 * 16);
  const int64_t rows_per_task = std::min(kernels.rows_per_task, rows_fitting);
  const int64_t row_blocks = ceil_div(m, rows_per_task);
  const double macs = static_cast<double>(m) * static_cast<double>(w.n) * static_cast<double>(w.k);
  const double weight_bytes = static_cast<double>(w.weights.size() + w.scales.size() * sizeof(float) +
                                                  w.zero_points.size());
  const auto wanted_tasks = static_cast<int64_t>(std::clamp<double>(
      std::max(macs / kMinMacsPerTask, weight_bytes / kMinWeightBytesPerTask), 1, max_tasks()));
  const int64_t tile_parts = std::clamp<int64_t>(wanted_tasks / row_blocks, 1, w.tiles);
  parallel_for(static_cast<size_t>(row_blocks * tile_parts), [&](size_t i) {
    const int64_t block = static_cast<int64_t>(i) / tile_parts, part = static_cast<int64_t>(i) % tile_parts;
    const int64_t row_begin = block * rows_per_task, row_end = std::min(m, row_begin + rows_per_task);
    kernels.gemm_tiles(ga, row_begin, row_end, part_begin(w.tiles, tile_parts, part),
                       part_begin(w.tiles, tile_parts, part + 1));
  });
  scratch.trim();
}

}  // namespace cpu
}  // namespace fptq
