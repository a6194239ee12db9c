// W4A8MatMul (docs/ops.md) on NVIDIA GPUs, sm_80 and newer: int8 tensor cores
// (mma.sync m16n8k32 .s8) on int8 activations and 4-bit weights widened in registers.
//
// Stages of one call (fptq_w4a8_matmul_cuda), all on the caller's stream:
//   1. quantize_rows_kernel  X[M, K] float -> Xq[M, K] int8, a[M] float, and per 32..128-wide
//                            sub-group the row sums of Xq (rowsum, for the zero points).
//   2. w4a8_gemm_kernel      per block a BM x 128 tile of Y: cp.async multistage pipeline of
//                            k-tiles of 128 (Xq, repacked weights, scales, zero points,
//                            rowsums), int32 MMA per sub-group, then
//                            y += s * (acc - z * rowsum) in float, finally y *= a_m.
//   3. splitk_reduce_kernel  only when the plan splits K: sums the per-split partials.
// The weights are repacked once (fptq_w4a8_repack_cuda). docs/cuda_kernel.md has the layouts,
// tile plans and limits; tests/test_cuda_gpu.py checks this file against the float64
// reference on a GPU, tests/test_cuda_emulation.py a numpy emulation of its index math.
//
// Index names used throughout: m/n/k global row/column/reduction indices, m0/n0 a block's
// first row/column, kt a k-tile (128 k), kk an MMA k-step (32 k) inside it, j a sub-group
// inside a k-tile, g = lane / 4 and t = lane % 4 the MMA fragment coordinates.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

#include "w4a8_cuda.h"
#include "w4a8_cuda_device.cuh"
#include "w4a8_cuda_sm90.h"

// The Hopper TMA (bulk copy) wgmma GEMM lives in w4a8_cuda_sm90_tma.cu (built for sm_90a only).
// Weak: a build without that file links, and the TMA variants then report cudaErrorNotSupported.
extern "C" cudaError_t fptq_w4a8_sm90_tma_gemm(const FptqSm90TmaArgs* args, cudaStream_t stream)
    __attribute__((weak));
extern "C" int fptq_w4a8_sm90_tma_smem_bytes(int bt) __attribute__((weak));

namespace fptq {
namespace w4a8cuda {
namespace {

// ------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Sub-group: the k span over which int32 partial sums are kept before they are scaled. It is
// the group itself for group_size 32 and 64, and 128-wide slices of larger groups (so that a
// k-tile never holds part of a sub-group); the prologue's rowsums use the same spans.
inline int sub_group_size(int group_size) { return group_size < kTileK ? group_size : kTileK; }

// Shapes this kernel handles (docs/cuda_kernel.md, "Limits").
inline bool valid_shape(int N, int K, int group_size) {
  if (N < 1 || K < 1 || K > (1 << 24)) return false;
  if (group_size != 32 && group_size != 64 && (group_size < kTileK || group_size % kTileK)) {
    return false;
  }
  return K % group_size == 0;
}

// Four 8x8 b16 matrices = one 16x32 int8 A fragment of mma.m16n8k32 (rows g / g+8,
// bytes 0-15 / 16-31 of the k-step, in the register order the MMA expects).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// c += A (16x32 s8, row) * B (32x8 s8, col) in int32.
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One repacked weight word -> the two B-fragment registers: nibbles 0,2,4,6 become bytes
// 0..3 of b[0] (k = 4t..4t+3) and nibbles 1,3,5,7 bytes 0..3 of b[1] (k = 16+4t..). The
// values stay u in [0, 15] (non-negative int8); the zero point is applied in `fold`.
__device__ __forceinline__ void unpack_nibbles(uint32_t w, uint32_t (&b)[2]) {
  b[0] = w & 0x0F0F0F0Fu;
  b[1] = (w >> 4) & 0x0F0F0F0Fu;
}

// Scales one sub-group's int32 sum into the float accumulator and restarts it:
// out += s * (sum_k q*u - z * sum_k q). acc carries the kMagicI bias (w4a8_cuda.h), so the
// integer IMAD result reinterpreted as float minus kMagicF is the exact integer.
__device__ __forceinline__ void fold(int32_t& acc, int32_t rowsum, int z, float s, float& out) {
  const float d = __int_as_float(acc - z * rowsum) - kMagicF;
  out = fmaf(d, s, out);
  acc = kMagicI;
}

// ------------------------------------------------------------------------------------------
// Buffers
// ------------------------------------------------------------------------------------------

// The packed-weight buffer (written once by fptq_w4a8_repack_cuda):
//   bp  uint8   [Npad/32][K/32][512]  weight atoms (w4a8_cuda.h)
//   sp  float32 [G][Npad]             scales, transposed; 0 in padding columns
//   zp  uint8   [G][Npad]             zero points, transposed; 0 in padding columns
struct PackedLayout {
  int Npad = 0, G = 0;
  size_t off_b = 0, off_s = 0, off_z = 0, total = 0;
};

PackedLayout packed_layout(int N, int K, int group_size) {
  PackedLayout l;
  l.Npad = ceil_div(N, kNPadAlign) * kNPadAlign;
  l.G = K / group_size;
  l.off_b = 0;
  l.off_s = align_up(static_cast<size_t>(l.Npad) * K / 2, kBufferAlign);
  l.off_z = align_up(l.off_s + static_cast<size_t>(l.G) * l.Npad * sizeof(float), kBufferAlign);
  l.total = align_up(l.off_z + static_cast<size_t>(l.G) * l.Npad, kBufferAlign);
  return l;
}

// ------------------------------------------------------------------------------------------
// Tile configurations
// ------------------------------------------------------------------------------------------

// A block computes BM x BN of Y with WARPS_M x WARPS_N warps (each WM x WN), streaming
// k-tiles of 128 through STAGES shared-memory slots; MIN_BLOCKS blocks must fit an SM's
// registers. SG: sub-group size (32, 64 or 128).
// One slot holds, for its k-tile:
//   A  int8    [BM][128]       Xq rows, 16-byte chunks XOR-swizzled by (row & 7)
//   B  uint8   [BN/32][4][512] weight atoms (n-atom, k-step)
//   S  float32 [NSG][BN]       scales of the k-tile's NSG sub-groups
//   Z  uint8   [NSG][BN]       zero points
//   R  int32   [NSG][BM]       rowsums of Xq over each sub-group
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_, int SG_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, SG = SG_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;  // __launch_bounds__: caps registers
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / 16;    // m16 tiles per warp
  static constexpr int NT = WN / 8;     // n8 tiles per warp
  static constexpr int NA = WN / kAtomN;  // weight atoms per warp and k-step
  static constexpr int NSG = kTileK / SG;
  static constexpr int KK_PER_SG = SG / kMmaK;
  static constexpr int A_BYTES = BM * kTileK;
  static constexpr int B_BYTES = BN * kTileK / 2;
  static constexpr int S_BYTES = NSG * BN * 4;
  static constexpr int Z_BYTES = NSG * BN;
  static constexpr int R_BYTES = NSG * BM * 4;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + S_BYTES + Z_BYTES + R_BYTES;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;

  static_assert(WM % 16 == 0 && WN % kAtomN == 0, "warp tile must be m16 x n32 multiples");
  static_assert(BN <= kNPadAlign && kNPadAlign % BN == 0, "N padding must cover the tile");
  static_assert(kTileK % SG == 0 && SG % kMmaK == 0, "sub-group must divide the k-tile");
  static_assert(A_BYTES % 16 == 0 && B_BYTES % 16 == 0 && S_BYTES % 16 == 0 &&
                    Z_BYTES % 16 == 0 && R_BYTES % 16 == 0,
                "shared-memory regions must stay 16-byte aligned");
  static_assert(BM % 4 == 0 && BN % 16 == 0, "16-byte copies of rowsums and zero points");
};

// The three plans by M bucket (docs/cuda_kernel.md): decode-sized M, medium M, large M.
constexpr int kNumConfigs = 3;
constexpr int kConfigBM[kNumConfigs] = {16, 32, 128};
constexpr int kConfigBN = 128;
// Blocks per SM the register file allows (the MIN_BLOCKS of each config's __launch_bounds__);
// shared memory may allow fewer, see blocks_per_sm().
constexpr int kConfigRegBlocks[kNumConfigs] = {4, 3, 1};

template <int CFG, int SG>
struct ConfigTile;
template <int SG>
struct ConfigTile<0, SG> {
  using T = Tile<16, 128, 1, 4, 4, 4, SG>;
};
template <int SG>
struct ConfigTile<1, SG> {
  using T = Tile<32, 128, 1, 4, 4, 3, SG>;
};
template <int SG>
struct ConfigTile<2, SG> {
  using T = Tile<128, 128, 2, 4, 3, 1, SG>;
};

template <int CFG>
int config_smem_for_sg(int sg) {
  switch (sg) {
    case 32: return ConfigTile<CFG, 32>::T::SMEM_BYTES;
    case 64: return ConfigTile<CFG, 64>::T::SMEM_BYTES;
    default: return ConfigTile<CFG, 128>::T::SMEM_BYTES;
  }
}

int config_smem(int cfg, int sg) {
  switch (cfg) {
    case 0: return config_smem_for_sg<0>(sg);
    case 1: return config_smem_for_sg<1>(sg);
    default: return config_smem_for_sg<2>(sg);
  }
}

int blocks_per_sm(int cfg, int smem_bytes, int smem_per_sm) {
  // ~1 KB of each SM's shared memory is reserved per resident block.
  const int by_smem = smem_per_sm / (smem_bytes + 1024);
  const int b = by_smem < kConfigRegBlocks[cfg] ? by_smem : kConfigRegBlocks[cfg];
  return b > 0 ? b : 1;
}

// ------------------------------------------------------------------------------------------
// Kernel variants: one row of kVariants per FPTQ_W4A8_VARIANT_* id (w4a8_cuda.h)
// ------------------------------------------------------------------------------------------

// Which GEMM a variant launches.
enum class Kernel {
  kMma,    // w4a8_gemm_kernel: mma.sync, sm_80+ (this file)
  kTma,    // w4a8_tma_kernel: bulk copies + register-A wgmma, sm_90a (w4a8_cuda_sm90_tma.cu)
};

// How it launches it (bits of Variant::flags).
enum VariantFlag : unsigned {
  kPdl = 1u << 0,         // programmatic dependent launch (sm_90+): the GEMM behind the quantize
                          // kernel (not with kFusedQuant: there is none), the split-K reduction
                          // behind the GEMM
  kOverlap = 1u << 1,     // kTma: two accumulator sets, the fold of k-tile i overlaps i+1's wgmmas
  kFusedQuant = 1u << 2,  // kTma: the GEMM quantizes X itself (no quantize kernel, no Xq)
};

struct Variant {
  int id;            // FPTQ_W4A8_VARIANT_*
  const char* name;  // as benchmarks and logs print it
  Kernel kernel;
  int rows;          // rows of X (tokens) per block: kMma the tile config's BM (kConfigBM),
                     // kTma its BT
  unsigned flags;    // VariantFlag bits
  bool has(VariantFlag f) const { return (flags & f) != 0; }
};

// docs/cuda_kernel.md, "Variants", has the measurements behind each row.
constexpr Variant kVariants[] = {
    // id                            name          kernel         rows flags
    {FPTQ_W4A8_VARIANT_MMA16,        "mma16",      Kernel::kMma,   16,  0},
    {FPTQ_W4A8_VARIANT_MMA32,        "mma32",      Kernel::kMma,   32,  0},
    {FPTQ_W4A8_VARIANT_MMA128,       "mma128",     Kernel::kMma,  128,  0},
    {FPTQ_W4A8_VARIANT_MMA16_PDL,    "mma16_pdl",  Kernel::kMma,   16,  kPdl},
    {FPTQ_W4A8_VARIANT_MMA32_PDL,    "mma32_pdl",  Kernel::kMma,   32,  kPdl},
    {FPTQ_W4A8_VARIANT_MMA128_PDL,   "mma128_pdl", Kernel::kMma,  128,  kPdl},
    {FPTQ_W4A8_VARIANT_TMA128,       "tma128",     Kernel::kTma,  128,  kPdl},
    {FPTQ_W4A8_VARIANT_TMA64,        "tma64",      Kernel::kTma,   64,  kPdl | kOverlap},
    {FPTQ_W4A8_VARIANT_TMA16,        "tma16",      Kernel::kTma,   16,  kPdl | kOverlap},
    {FPTQ_W4A8_VARIANT_TMA16_FUSED,  "tma16f",     Kernel::kTma,   16,  kPdl | kOverlap | kFusedQuant},
};

// The row of `id`, or null for an id that names no variant (AUTO included).
const Variant* find_variant(int id) {
  for (const Variant& v : kVariants) {
    if (v.id == id) return &v;
  }
  return nullptr;
}

// The mma.sync tile config (0-2) whose BM is `rows`, -1 for none.
int mma_config_for_rows(int rows) {
  for (int cfg = 0; cfg < kNumConfigs; ++cfg) {
    if (kConfigBM[cfg] == rows) return cfg;
  }
  return -1;
}

// The variant the mma.sync kernel runs M rows with when nothing else is chosen.
const Variant& default_sm80_variant(int64_t M) {
  return *find_variant(M <= 16 ? FPTQ_W4A8_VARIANT_MMA16
                               : (M <= 64 ? FPTQ_W4A8_VARIANT_MMA32 : FPTQ_W4A8_VARIANT_MMA128));
}

// Whether `v` can run this group size on a device of compute capability `cc` (major * 10 +
// minor): PDL needs sm_90+; the Hopper kernel needs sm_90 exactly (sm_90a code), group sizes
// that are multiples of 128 and its object linked in.
bool variant_supported(const Variant& v, int group_size, int cc) {
  switch (v.kernel) {
    case Kernel::kMma:
      return !v.has(kPdl) || cc >= 90;
    case Kernel::kTma:
      return cc == 90 && group_size % kTileK == 0 && fptq_w4a8_sm90_tma_gemm != nullptr;
  }
  return false;
}

// The default variant per M bucket on sm_90 (M <= 16, <= 64, <= 256, > 256), used when it is
// supported for the call (else the sm_80 default for M). -1 = the sm_80 default. Update from
// the tables of benchmarks/gpu_gemm.py (it prints the line to paste).
constexpr int kSm90AutoVariant[4] = {9, 10, 11, 11};  // measured on an H200, 2026-11-27 (docs/device-log.md)

// AUTO (-1) -> a concrete variant: FPTQ_CUDA_VARIANT from the environment when set and
// supported, else the table above, else the sm_80 default. Any other id: its row (null for an
// id that names no variant; unsupported ones are rejected by the caller).
const Variant* resolve_variant(int variant, int64_t M, int group_size, int cc) {
  if (variant != FPTQ_W4A8_VARIANT_AUTO) return find_variant(variant);
  if (const char* env = getenv("FPTQ_CUDA_VARIANT")) {
    char* end = nullptr;
    const long id = strtol(env, &end, 10);
    const Variant* v = end != env && id >= 0 && id <= 0x7fffffff ? find_variant(static_cast<int>(id)) : nullptr;
    if (v != nullptr && variant_supported(*v, group_size, cc)) return v;
  }
  if (cc == 90) {
    const int bucket = M <= 16 ? 0 : (M <= 64 ? 1 : (M <= 256 ? 2 : 3));
    const Variant* v = find_variant(kSm90AutoVariant[bucket]);
    if (v != nullptr && variant_supported(*v, group_size, cc)) return v;
  }
  return &default_sm80_variant(M);
}

// ------------------------------------------------------------------------------------------
// Plan: tile config, split-K and workspace layout of one call
// ------------------------------------------------------------------------------------------

// Workspace (per call):
//   xq       int8    [M][K]
//   act      float32 [Mp]              a_m
//   rowsum   int32   [K/SG][Mp]        sum of Xq over each sub-group (0 in rows >= M)
//   partial  float32 [split][M][N]     only when split > 1
// Mp = M rounded up to 4, so that the GEMM can copy rowsums 4 rows (16 bytes) at a time.
struct Plan {
  const Variant* variant = nullptr;  // the resolved kernel variant, never AUTO
  int cfg = 0, sg = 0, split = 1, tiles_per_split = 0, k_tiles = 0, n_tiles = 0;
  int smem = 0, occupancy = 1;
  int64_t m_tiles = 0, Mp = 0;
  size_t off_xq = 0, off_act = 0, off_rowsum = 0, off_partial = 0, total = 0;
  int xq_tile_rows = 0;  // TMA kernel: Xq in the tiled layout with tiles of this many rows
};

bool make_plan(int64_t M, int N, int K, int group_size, int sm_count, int smem_per_sm,
               const Variant& variant, Plan* p) {
  if (M < 0 || !valid_shape(N, K, group_size) || sm_count < 1) return false;
  p->variant = &variant;
  p->sg = sub_group_size(group_size);
  const int bm = variant.rows;
  switch (variant.kernel) {
    case Kernel::kTma:
      if (group_size % kTileK != 0) return false;
      p->cfg = 5;
      p->smem = fptq_w4a8_sm90_tma_smem_bytes != nullptr ? fptq_w4a8_sm90_tma_smem_bytes(bm) : 0;
      p->occupancy = 1;
      break;
    case Kernel::kMma:
      p->cfg = mma_config_for_rows(bm);
      if (p->cfg < 0) return false;
      p->smem = config_smem(p->cfg, p->sg);
      p->occupancy = blocks_per_sm(p->cfg, p->smem, smem_per_sm);
      break;
  }
  p->k_tiles = ceil_div(K, kTileK);
  p->m_tiles = ceil_div<int64_t>(M, bm);
  p->n_tiles = ceil_div(N, kConfigBN);
  if (p->n_tiles > 65535 || p->m_tiles > 0x7fffffff) return false;
  p->Mp = ceil_div<int64_t>(M, 4) * 4;

  // Split K when the output tiles cannot fill the GPU: cost ~ waves * (k-tiles per block +
  // 1 for the pipeline fill), plus 1 for the reduction; a split never gets an empty range.
  const int64_t tiles = p->m_tiles * p->n_tiles;
  const int64_t slots = static_cast<int64_t>(sm_count) * p->occupancy;
  double best_cost = 0.0;
  p->split = 1;
  p->tiles_per_split = p->k_tiles;
  for (int s = 1; s <= kMaxSplitK && s <= p->k_tiles && tiles > 0; ++s) {
    const int tps = ceil_div(p->k_tiles, s);
    if (ceil_div(p->k_tiles, tps) != s) continue;
    const int64_t waves = ceil_div<int64_t>(tiles * s, slots);
    const double cost = static_cast<double>(waves) * (tps + 1) + (s > 1 ? 1.0 : 0.0);
    if (s == 1 || cost < best_cost) {
      best_cost = cost;
      p->split = s;
      p->tiles_per_split = tps;
    }
  }

  const size_t Mz = static_cast<size_t>(M);
  // The TMA kernel reads Xq in whole tiles of bm rows (xq_tiled, w4a8_cuda_sm90.h): the
  // quantize kernel writes m_tiles * bm rows, zeros past M.
  p->xq_tile_rows = variant.kernel == Kernel::kTma ? bm : 0;
  const size_t xq_rows = variant.has(kFusedQuant) ? 0 : (p->xq_tile_rows ? static_cast<size_t>(p->m_tiles) * bm : Mz);
  p->off_xq = 0;
  p->off_act = align_up(xq_rows * K, kBufferAlign);
  p->off_rowsum = align_up(p->off_act + static_cast<size_t>(p->Mp) * sizeof(float), kBufferAlign);
  p->off_partial = align_up(
      p->off_rowsum + static_cast<size_t>(K / p->sg) * p->Mp * sizeof(int32_t), kBufferAlign);
  const size_t partial_bytes =
      p->split > 1 ? static_cast<size_t>(p->split) * Mz * N * sizeof(float) : 0;
  p->total = M == 0 ? 0 : align_up(p->off_partial + partial_bytes, kBufferAlign);
  return true;
}

// The current device's plan inputs; cc (optional): compute capability as major * 10 + minor.
cudaError_t device_resources(int* sm_count, int* smem_per_sm, int* cc = nullptr) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  if (cc != nullptr) {
    int major = 0, minor = 0;
    e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (e != cudaSuccess) return e;
    e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (e != cudaSuccess) return e;
    *cc = major * 10 + minor;
  }
  return cudaDeviceGetAttribute(smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
}

// ------------------------------------------------------------------------------------------
// Stage 0: weight repacking (once per weight)
// ------------------------------------------------------------------------------------------

// bp word idx = ((nb * KB + kb) * 32 + lane) * 4 + j (see kAtom* in w4a8_cuda.h).
//   b   uint8 [N, K/2] (contract layout)     bp  uint32 [Npad * K / 8] (written)
__global__ void repack_weights_kernel(const uint8_t* __restrict__ b, int N, int K, int64_t words,
                                      uint32_t* __restrict__ bp) {
  const int KB = K / kAtomK;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < words;
       idx += stride) {
    const int j = static_cast<int>(idx & 3);
    const int lane = static_cast<int>((idx >> 2) & 31);
    const int64_t atom = idx >> 7;
    const int kb = static_cast<int>(atom % KB);
    const int64_t nb = atom / KB;
    const int g = lane >> 2, t = lane & 3;
    const int64_t n = nb * kAtomN + j * 8 + g;
    uint32_t w = 0;
    if (n < N) {
      const uint8_t* row = b + n * (K / 2);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k_lo = kb * kAtomK + 4 * t + i;
        const int k_hi = k_lo + 16;
        const uint32_t u_lo = (row[k_lo >> 1] >> ((k_lo & 1) * 4)) & 0xFu;
        const uint32_t u_hi = (row[k_hi >> 1] >> ((k_hi & 1) * 4)) & 0xFu;
        w |= (u_lo << (8 * i)) | (u_hi << (8 * i + 4));
      }
    }
    bp[idx] = w;
  }
}

//   scales float32 [N, G], zero_points uint8 [N, G] -> sp float32 [G, Npad], zp uint8 [G, Npad]
__global__ void repack_scales_kernel(const float* __restrict__ scales,
                                     const uint8_t* __restrict__ zero_points, int N, int G,
                                     int Npad, float* __restrict__ sp, uint8_t* __restrict__ zp) {
  const int64_t total = static_cast<int64_t>(G) * Npad;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t g = idx / Npad;
    const int n = static_cast<int>(idx % Npad);
    const bool in = n < N;
    sp[idx] = in ? scales[static_cast<int64_t>(n) * G + g] : 0.0f;
    zp[idx] = in ? zero_points[static_cast<int64_t>(n) * G + g] : 0;
  }
}

// ------------------------------------------------------------------------------------------
// Stage 1: activation quantization (one block per row)
// ------------------------------------------------------------------------------------------

// 512 threads per row; each keeps up to kQuantCache float4 of its row in registers, so rows
// of up to 16384 elements are read from memory once and all loads of a thread are in flight
// together (a row is latency-bound when M is small).
constexpr int kQuantThreads = 512;
constexpr int kQuantCache = 8;

template <typename T>
struct QuantArgs {
  const T* x;                // [M, K] float32 / float16
  int64_t M, Mp;             // rows, rows rounded up to 4
  int K, sg, act_mode;       // reduction size, sub-group size, 0 static / 1 per-token
  const float* act_scale;    // [1] device, read when act_mode == 0
  int vec;                   // x rows allow 16-byte (float) / 8-byte (half) loads
  int8_t* xq;                // [M, K] out
  float* act;                // [Mp] out: a_m
  int32_t* rowsum;           // [K/sg, Mp] out: sum of xq over each sub-group, 0 for m >= M
  int tile_rows;             // 0: xq row-major [M, K]; else the TMA kernel's tiled layout with
                             // tiles of tile_rows rows (xq_offset), rows M .. grid-1 zeroed
};

// Byte offset of Xq[m, k] (k % 4 == 0: a 4-byte group stays in one 16-byte chunk). Tiled
// (tile_rows = T > 0): [m / T][k / 128][m % T][128] with 16-byte chunk c of row r stored at
// chunk c ^ (r & 7), the 128B swizzle the TMA kernel's wgmma descriptor reads, so that one
// bulk copy of T * 128 contiguous bytes lands in shared memory ready to use.
__device__ __forceinline__ int64_t xq_offset(int64_t m, int k, int K, int tile_rows) {
  if (tile_rows == 0) return m * K + k;
  const int64_t mt = m / tile_rows;
  const int r = static_cast<int>(m - mt * tile_rows);
  const int kt = k / kTileK, c = (k / 16) & 7;
  return ((mt * (K / kTileK) + kt) * tile_rows + r) * kTileK + ((c ^ (r & 7)) << 4) + (k & 15);
}

// grid (Mp), block kQuantThreads. Thread tid handles the 4-element chunks
// k = 4 * (tid + step * kQuantThreads); a warp's 32 chunks are 128 aligned elements, so a
// sub-group (32, 64 or 128 elements) is sg / 4 consecutive lanes of one warp.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(const QuantArgs<T> p) {
  __shared__ uint32_t s_red[kQuantThreads / 32];
  grid_dependents_launch();  // a PDL-launched GEMM may start its weight loads now
  const int64_t m = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_sub = p.K / p.sg;
  if (m >= p.M) {  // padding rows: the GEMM copies rowsums 4 rows at a time
    if (m < p.Mp) {
      for (int j = tid; j < n_sub; j += kQuantThreads) p.rowsum[static_cast<int64_t>(j) * p.Mp + m] = 0;
    }
    if (p.tile_rows) {  // the TMA kernel multiplies whole tiles: rows past M must be zero
      for (int k = 16 * tid; k < p.K; k += 16 * kQuantThreads) {
        *reinterpret_cast<uint4*>(p.xq + xq_offset(m, k, p.K, p.tile_rows)) = make_uint4(0, 0, 0, 0);
      }
    }
    return;
  }
  const T* xr = p.x + m * p.K;
  const bool vec = p.vec != 0;
  constexpr int kStep = 4 * kQuantThreads;  // elements per step of the whole block

  float4 v[kQuantCache];
#pragma unroll
  for (int it = 0; it < kQuantCache; ++it) {
    const int k = 4 * tid + it * kStep;
    v[it] = k < p.K ? load4(xr + k, vec) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }

  // a_m (docs/ops.md step 2, "NaN and Inf"; row_scale). The row max is taken in both modes:
  // static mode needs it too, to find a NaN in the row.
  uint32_t amax = 0;
#pragma unroll
  for (int it = 0; it < kQuantCache; ++it) amax = max(amax, abs_max_bits4(v[it]));
  for (int k = 4 * tid + kQuantCache * kStep; k < p.K; k += kStep) {  // rows beyond the cache
    amax = max(amax, abs_max_bits4(load4(xr + k, vec)));
  }
  amax = warp_max(amax);
  if (lane == 0) s_red[warp] = amax;
  __syncthreads();
  amax = s_red[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; ++w) amax = max(amax, s_red[w]);
  const RowScale scale = row_scale(amax, p.act_mode, p.act_mode == 1 ? 1.0f : __ldg(p.act_scale));
  const float inv = scale.inv;
  if (tid == 0) p.act[m] = scale.a;

  // q (step 3) and the rowsums. Called with a block-uniform step, so that every lane reaches
  // the shuffles; lanes past K contribute 0.
  const int lanes_per_sub = p.sg / 4;
  auto quantize_chunk = [&](int k, const float4& x4) {
    int qsum = 0;
    if (k < p.K) {
      const int q0 = quantize_one(x4.x, inv), q1 = quantize_one(x4.y, inv);
      const int q2 = quantize_one(x4.z, inv), q3 = quantize_one(x4.w, inv);
      qsum = q0 + q1 + q2 + q3;
      const uint32_t packed = (static_cast<uint32_t>(q0) & 0xFFu) |
                              ((static_cast<uint32_t>(q1) & 0xFFu) << 8) |
                              ((static_cast<uint32_t>(q2) & 0xFFu) << 16) |
                              ((static_cast<uint32_t>(q3) & 0xFFu) << 24);
      *reinterpret_cast<uint32_t*>(p.xq + xq_offset(m, k, p.K, p.tile_rows)) = packed;
    }
    for (int off = 1; off < lanes_per_sub; off <<= 1) qsum += __shfl_xor_sync(0xffffffffu, qsum, off);
    if (k < p.K && (lane & (lanes_per_sub - 1)) == 0) {
      p.rowsum[static_cast<int64_t>(k / p.sg) * p.Mp + m] = qsum;
    }
  };
#pragma unroll
  for (int it = 0; it < kQuantCache; ++it) {
    if (it * kStep < p.K) quantize_chunk(4 * tid + it * kStep, v[it]);
  }
  for (int base = kQuantCache * kStep; base < p.K; base += kStep) {
    const int k = base + 4 * tid;
    quantize_chunk(k, k < p.K ? load4(xr + k, vec) : make_float4(0.0f, 0.0f, 0.0f, 0.0f));
  }
}

// ------------------------------------------------------------------------------------------
// Stage 2: the GEMM
// ------------------------------------------------------------------------------------------

struct GemmArgs {
  const int8_t* xq;        // [M, K] int8 (stage 1)
  const float* act;        // [Mp] float32 a_m
  const int32_t* rowsum;   // [K/SG, Mp] int32
  const uint8_t* bp;       // [Npad/32][K/32][512] weight atoms
  const float* sp;         // [G, Npad] float32 scales
  const uint8_t* zp;       // [G, Npad] uint8 zero points
  void* y;                 // [M, N] float32/float16 output (split == 1)
  float* partial;          // [split, M, N] float32 (split > 1)
  int64_t M, Mp;
  int N, Npad, K, group_size;
  int sub_per_group;       // group_size / SG (1 for group_size <= 128)
  int k_tiles, tiles_per_split;
  int out_half;            // y is float16
  int vec_out;             // y allows paired stores (N even, 8/4-byte aligned)
  int pdl;                 // launched as a programmatic dependent of the quantize kernel
};

// A block's views of the global inputs: 64-bit bases set once, so that the per-copy offsets
// inside load_stage stay 32-bit (K <= 2^24 keeps them in range) and cost fewer registers.
struct BlockInputs {
  const int8_t* xq;      // row m0 of Xq
  const uint8_t* bp;     // first weight atom of column n0
  const float* sp;       // column n0 of the scales
  const uint8_t* zp;     // column n0 of the zero points
  const int32_t* rowsum; // row m0 of the rowsums
  int rows;              // rows of Xq left from m0 (clamped to the tile)
  int rows_padded;       // rows of the rowsums left from m0 (clamped to the tile)
};

// Runs copy(j, ch, group, sub, in_k) for the CHUNKS 16-byte chunks of each of the NSG
// sub-groups of k-tile kt, spread over the block's threads. sub = kt * NSG + j is the
// sub-group's index along K, group = sub / sub_per_group its weight group, in_k whether it
// exists (K need not be a multiple of the k-tile).
template <class C, int CHUNKS, class Copy>
__device__ __forceinline__ void copy_sub_groups(int tid, int kt, int K, Copy copy,
                                                int sub_per_group) {
  constexpr int TOTAL = C::NSG * CHUNKS;
#pragma unroll
  for (int i = 0; i < ceil_div(TOTAL, C::THREADS); ++i) {
    const int c = tid + i * C::THREADS;
    if (TOTAL % C::THREADS == 0 || c < TOTAL) {
      const int j = c / CHUNKS, ch = c % CHUNKS;
      const int sub = kt * C::NSG + j;
      const bool in_k = sub * C::SG < K;
      const int64_t grp = sub_per_group == 1 ? sub : sub / sub_per_group;
      copy(j, ch, grp, sub, in_k);
    }
  }
}

// Issues the cp.async copies of k-tile kt into one shared-memory slot (layout: Tile).
// PART: kAll, or kWeights (B, S, Z: inputs of the op, ready before the call) / kActs (A, R:
// written by the quantize kernel) for the programmatic-dependent-launch prologue.
constexpr int kAll = 0, kWeights = 1, kActs = 2;
template <class C, int PART = kAll>
__device__ __forceinline__ void load_stage(const GemmArgs& p, const BlockInputs& in, uint8_t* slot,
                                           int kt, int tid) {
  uint8_t* sA = slot;
  uint8_t* sB = sA + C::A_BYTES;
  uint8_t* sS = sB + C::B_BYTES;
  uint8_t* sZ = sS + C::S_BYTES;
  uint8_t* sR = sZ + C::Z_BYTES;
  const int k0 = kt * kTileK;

  // A: BM rows x 8 chunks of 16 bytes; chunk ch of row r lands at chunk ch ^ (r & 7).
  constexpr int A_CHUNKS = C::BM * (kTileK / 16);
  if constexpr (PART != kWeights) {
#pragma unroll
    for (int i = 0; i < ceil_div(A_CHUNKS, C::THREADS); ++i) {
      const int c = tid + i * C::THREADS;
      if (A_CHUNKS % C::THREADS == 0 || c < A_CHUNKS) {
        const int r = c >> 3, ch = c & 7;
        const int k = k0 + ch * 16;
        const bool ok = r < in.rows && k < p.K;
        cp_async16(sA + r * kTileK + ((ch ^ (r & 7)) << 4), ok ? in.xq + (r * p.K + k) : p.xq, ok);
      }
    }
  }

  // B: BN/32 atom columns x 4 k-steps x 32 chunks; each atom column is 2 KB contiguous.
  constexpr int B_CHUNKS = C::B_BYTES / 16;
  const int KB = p.K / kAtomK;
  if constexpr (PART != kActs) {
#pragma unroll
    for (int i = 0; i < ceil_div(B_CHUNKS, C::THREADS); ++i) {
      const int c = tid + i * C::THREADS;
      if (B_CHUNKS % C::THREADS == 0 || c < B_CHUNKS) {
        const int nbl = c / (kKSteps * 32), kbl = (c / 32) % kKSteps, ch = c % 32;
        const int kb = kt * kKSteps + kbl;
        const bool ok = kb < KB;
        cp_async16(sB + (nbl * kKSteps + kbl) * kAtomBytes + ch * 16,
                   ok ? in.bp + ((nbl * KB + kb) * kAtomBytes + ch * 16) : p.bp, ok);
      }
    }

    // S, Z (and below R) of the NSG sub-groups (BN/4, BN/16, BM/4 chunks each). Sub-group j of the
    // tile is the (kt * NSG + j)-th of the K axis; its group is that / sub_per_group.
    copy_sub_groups<C, C::BN / 4>(tid, kt, p.K, [&](int j, int ch, int64_t grp, int sub, bool ok) {
      (void)sub;
      cp_async16(sS + (j * C::BN + ch * 4) * 4, ok ? in.sp + (grp * p.Npad + ch * 4) : p.sp, ok);
    }, p.sub_per_group);
    copy_sub_groups<C, C::BN / 16>(tid, kt, p.K, [&](int j, int ch, int64_t grp, int sub, bool ok) {
      (void)sub;
      cp_async16(sZ + j * C::BN + ch * 16, ok ? in.zp + (grp * p.Npad + ch * 16) : p.zp, ok);
    }, p.sub_per_group);
  }
  if constexpr (PART != kWeights) {
    copy_sub_groups<C, C::BM / 4>(tid, kt, p.K, [&](int j, int ch, int64_t grp, int sub, bool ok) {
      (void)grp;
      ok = ok && ch * 4 < in.rows_padded;
      cp_async16(sR + (j * C::BM + ch * 4) * 4,
                 ok ? in.rowsum + (static_cast<int64_t>(sub) * p.Mp + ch * 4) : p.rowsum, ok);
    }, p.sub_per_group);
  }
}

// Folds sub-group j of the current slot into the float accumulators (see `fold`).
template <class C>
__device__ __forceinline__ void fold_sub_group(const uint8_t* slot, int j, int warp_m, int warp_n,
                                               int lane, int32_t (&acc)[C::MT][C::NT][4],
                                               float (&facc)[C::MT][C::NT][4]) {
  const float* sS = reinterpret_cast<const float*>(slot + C::A_BYTES + C::B_BYTES);
  const uint8_t* sZ = slot + C::A_BYTES + C::B_BYTES + C::S_BYTES;
  const int32_t* sR =
      reinterpret_cast<const int32_t*>(slot + C::A_BYTES + C::B_BYTES + C::S_BYTES + C::Z_BYTES);
  int32_t rs[C::MT][2];
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt) {
    const int r = warp_m * C::WM + mt * 16 + (lane >> 2);
    rs[mt][0] = sR[j * C::BM + r];
    rs[mt][1] = sR[j * C::BM + r + 8];
  }
#pragma unroll
  for (int nt = 0; nt < C::NT; ++nt) {
    const int c = warp_n * C::WN + nt * 8 + 2 * (lane & 3);
    const float2 s = *reinterpret_cast<const float2*>(sS + j * C::BN + c);
    const uint32_t zz = *reinterpret_cast<const uint16_t*>(sZ + j * C::BN + c);
    const int z0 = static_cast<int>(zz & 0xFFu), z1 = static_cast<int>(zz >> 8);
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
      // C fragment: [0] (g, 2t) [1] (g, 2t+1) [2] (g+8, 2t) [3] (g+8, 2t+1)
      fold(acc[mt][nt][0], rs[mt][0], z0, s.x, facc[mt][nt][0]);
      fold(acc[mt][nt][1], rs[mt][0], z1, s.y, facc[mt][nt][1]);
      fold(acc[mt][nt][2], rs[mt][1], z0, s.x, facc[mt][nt][2]);
      fold(acc[mt][nt][3], rs[mt][1], z1, s.y, facc[mt][nt][3]);
    }
  }
}

// The MMAs of one k-tile (4 k-steps), folding each sub-group when it is complete.
template <class C>
__device__ __forceinline__ void compute_stage(const uint8_t* slot, int warp_m, int warp_n,
                                              int lane, int32_t (&acc)[C::MT][C::NT][4],
                                              float (&facc)[C::MT][C::NT][4]) {
  const uint8_t* sA = slot;
  const uint8_t* sB = slot + C::A_BYTES;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    uint32_t af[C::MT][4];
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
      // ldmatrix lane l addresses row (l % 8) + 8 * ((l / 8) % 2), 16-byte chunk l / 16.
      const int r = warp_m * C::WM + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int ch = 2 * kk + (lane >> 4);
      ldmatrix_x4(af[mt], sA + r * kTileK + ((ch ^ (r & 7)) << 4));
    }
    uint32_t bf[C::NT][2];
#pragma unroll
    for (int na = 0; na < C::NA; ++na) {
      const uint4 w = *reinterpret_cast<const uint4*>(
          sB + ((warp_n * C::NA + na) * kKSteps + kk) * kAtomBytes + lane * 16);
      unpack_nibbles(w.x, bf[na * 4 + 0]);
      unpack_nibbles(w.y, bf[na * 4 + 1]);
      unpack_nibbles(w.z, bf[na * 4 + 2]);
      unpack_nibbles(w.w, bf[na * 4 + 3]);
    }
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) mma_s8(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
    }
    if ((kk + 1) % C::KK_PER_SG == 0) {
      fold_sub_group<C>(slot, kk / C::KK_PER_SG, warp_m, warp_n, lane, acc, facc);
    }
  }
}

// grid (m-tiles, n-tiles, split), block C::THREADS, dynamic shared memory C::SMEM_BYTES.
template <class C>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS) w4a8_gemm_kernel(const GemmArgs p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM;
  const int n0 = blockIdx.y * C::BN;
  const int kt_begin = blockIdx.z * p.tiles_per_split;
  const int kt_end = min(kt_begin + p.tiles_per_split, p.k_tiles);
  const int n_kt = kt_end - kt_begin;

  int32_t acc[C::MT][C::NT][4];
  float facc[C::MT][C::NT][4];
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[mt][nt][i] = kMagicI;
        facc[mt][nt][i] = 0.0f;
      }
    }
  }

  // Pipeline: STAGES - 1 k-tiles in flight while one is computed. Each iteration waits for
  // its tile, then (after the barrier that also retires the slot computed last iteration)
  // refills that slot with the tile STAGES - 1 ahead.
  BlockInputs in;
  in.xq = p.xq + m0 * p.K;
  in.bp = p.bp + static_cast<int64_t>(n0 / kAtomN) * (p.K / kAtomK) * kAtomBytes;
  in.sp = p.sp + n0;
  in.zp = p.zp + n0;
  in.rowsum = p.rowsum + m0;
  in.rows = static_cast<int>(p.M - m0 < C::BM ? p.M - m0 : C::BM);
  in.rows_padded = static_cast<int>(p.Mp - m0 < C::BM ? p.Mp - m0 : C::BM);

  if (p.pdl) {
    // Programmatic dependent launch: the weights of the first stages do not depend on the
    // quantize kernel still running before this one, so they are requested first; then wait
    // for that grid (its Xq, a_m, rowsums) and request the activations. Commit groups: W_0..,
    // then X_0..: at iteration i the STAGES - 2 newest groups are X_{i+1}.. and the main
    // loop's, so the wait below still covers exactly stage i.
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
      if (s < n_kt) load_stage<C, kWeights>(p, in, smem + s * C::STAGE_BYTES, kt_begin + s, tid);
      cp_async_commit();
    }
    grid_dependency_wait();
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
      if (s < n_kt) load_stage<C, kActs>(p, in, smem + s * C::STAGE_BYTES, kt_begin + s, tid);
      cp_async_commit();
    }
    grid_dependents_launch();  // the split-K reduction may launch (it waits for this grid)
  } else {
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
      if (s < n_kt) load_stage<C>(p, in, smem + s * C::STAGE_BYTES, kt_begin + s, tid);
      cp_async_commit();
    }
  }
  for (int i = 0; i < n_kt; ++i) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int next = i + C::STAGES - 1;
    if (next < n_kt) {
      load_stage<C>(p, in, smem + (next % C::STAGES) * C::STAGE_BYTES, kt_begin + next, tid);
    }
    cp_async_commit();
    compute_stage<C>(smem + (i % C::STAGES) * C::STAGE_BYTES, warp_m, warp_n, lane, acc, facc);
  }
  cp_async_wait<0>();

  // Epilogue: y = a_m * acc, straight from the C fragments (rows g, g+8; columns 2t, 2t+1).
  const bool split = gridDim.z > 1;
  const bool vec = p.vec_out != 0;
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + warp_m * C::WM + mt * 16 + (lane >> 2) + 8 * h;
      if (m >= p.M) continue;
      const float am = p.act[m];
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) {
        const int n = n0 + warp_n * C::WN + nt * 8 + 2 * (lane & 3);
        const float v0 = facc[mt][nt][2 * h] * am, v1 = facc[mt][nt][2 * h + 1] * am;
        if (split) {
          float* row = p.partial + (static_cast<int64_t>(blockIdx.z) * p.M + m) * p.N;
          store_pair(row, n, p.N, v0, v1, (p.N & 1) == 0);
        } else if (p.out_half) {
          store_pair(static_cast<__half*>(p.y) + m * p.N, n, p.N, v0, v1, vec);
        } else {
          store_pair(static_cast<float*>(p.y) + m * p.N, n, p.N, v0, v1, vec);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Stage 3: split-K reduction
// ------------------------------------------------------------------------------------------

//   partial float32 [split, M*N] -> y [M*N] float32/float16, summed in split order.
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, int split, int64_t mn,
                                     void* __restrict__ y, int out_half) {
  grid_dependency_wait();  // launched as a programmatic dependent of the GEMM (PDL variants)
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < mn;
       i += stride) {
    float s = partial[i];
    for (int z = 1; z < split; ++z) s += partial[z * mn + i];
    if (out_half) {
      static_cast<__half*>(y)[i] = __float2half_rn(s);
    } else {
      static_cast<float*>(y)[i] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host launchers
// ------------------------------------------------------------------------------------------

int grid_for(int64_t work, int threads, int sm_count) {
  const int64_t blocks = ceil_div<int64_t>(work, threads);
  const int64_t cap = static_cast<int64_t>(sm_count) * 16;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

template <int CFG, int SG>
cudaError_t launch_gemm(const Plan& plan, const GemmArgs& args, cudaStream_t stream) {
  using C = typename ConfigTile<CFG, SG>::T;
  cudaError_t e = cudaFuncSetAttribute(w4a8_gemm_kernel<C>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(plan.m_tiles), static_cast<unsigned>(plan.n_tiles),
                  static_cast<unsigned>(plan.split));
  if (args.pdl) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = grid;
    cfg.blockDim = dim3(C::THREADS);
    cfg.dynamicSmemBytes = C::SMEM_BYTES;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    e = cudaLaunchKernelEx(&cfg, w4a8_gemm_kernel<C>, args);
    if (e != cudaSuccess) return e;
    return cudaGetLastError();
  }
  w4a8_gemm_kernel<C><<<grid, C::THREADS, C::SMEM_BYTES, stream>>>(args);
  return cudaGetLastError();
}

template <int CFG>
cudaError_t launch_gemm_sg(const Plan& plan, const GemmArgs& args, cudaStream_t stream) {
  switch (plan.sg) {
    case 32: return launch_gemm<CFG, 32>(plan, args, stream);
    case 64: return launch_gemm<CFG, 64>(plan, args, stream);
    case 128: return launch_gemm<CFG, 128>(plan, args, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_gemm_any(const Plan& plan, const GemmArgs& args, cudaStream_t stream) {
  switch (plan.cfg) {
    case 0: return launch_gemm_sg<0>(plan, args, stream);
    case 1: return launch_gemm_sg<1>(plan, args, stream);
    case 2: return launch_gemm_sg<2>(plan, args, stream);
    default: return cudaErrorInvalidValue;
  }
}

// The TMA kernel's operands and split (w4a8_cuda_sm90.h), from the mma.sync kernel's arguments
// and the plan.
void fill_sm90_args(const GemmArgs& a, const Plan& plan, FptqSm90TmaArgs* h) {
  h->act = a.act;
  h->bp = a.bp;
  h->sp = a.sp;
  h->zp = a.zp;
  h->y = a.y;
  h->partial = a.partial;
  h->M = a.M;
  h->N = a.N;
  h->Npad = a.Npad;
  h->K = a.K;
  h->sub_per_group = a.sub_per_group;
  h->k_tiles = plan.k_tiles;
  h->tiles_per_split = plan.tiles_per_split;
  h->split = plan.split;
  h->m_tiles = static_cast<int>(plan.m_tiles);
  h->n_tiles = plan.n_tiles;
  h->out_half = a.out_half;
}

template <typename T>
cudaError_t launch_quantize(const Plan& plan, const T* x, int64_t M, int K, int act_mode,
                            const float* act_scale, uint8_t* ws, cudaStream_t stream) {
  QuantArgs<T> q;
  q.x = x;
  q.M = M;
  q.Mp = plan.Mp;
  q.K = K;
  q.sg = plan.sg;
  q.act_mode = act_mode;
  q.act_scale = act_scale;
  q.vec = reinterpret_cast<uintptr_t>(x) % (4 * sizeof(T)) == 0;  // rows keep it: K % 32 == 0
  q.xq = reinterpret_cast<int8_t*>(ws + plan.off_xq);
  q.act = reinterpret_cast<float*>(ws + plan.off_act);
  q.rowsum = reinterpret_cast<int32_t*>(ws + plan.off_rowsum);
  q.tile_rows = plan.xq_tile_rows;
  const int64_t rows = plan.xq_tile_rows ? plan.m_tiles * plan.xq_tile_rows : plan.Mp;
  const int64_t grid = rows > plan.Mp ? rows : plan.Mp;
  quantize_rows_kernel<T><<<static_cast<unsigned>(grid), kQuantThreads, 0, stream>>>(q);
  return cudaGetLastError();
}

}  // namespace
}  // namespace w4a8cuda
}  // namespace fptq

using namespace fptq::w4a8cuda;

extern "C" cudaError_t fptq_w4a8_packed_size(int N, int K, int group_size, size_t* bytes) {
  if (bytes == nullptr || !valid_shape(N, K, group_size)) return cudaErrorInvalidValue;
  *bytes = packed_layout(N, K, group_size).total;
  return cudaSuccess;
}

extern "C" cudaError_t fptq_w4a8_repack_cuda(const uint8_t* B, const float* scales,
                                             const uint8_t* zero_points, int N, int K,
                                             int group_size, void* packed, cudaStream_t stream) {
  if (!valid_shape(N, K, group_size) || B == nullptr || scales == nullptr ||
      zero_points == nullptr || packed == nullptr ||
      reinterpret_cast<uintptr_t>(packed) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  int sm_count = 0, smem_per_sm = 0;
  cudaError_t e = device_resources(&sm_count, &smem_per_sm);
  if (e != cudaSuccess) return e;
  const PackedLayout l = packed_layout(N, K, group_size);
  uint8_t* base = static_cast<uint8_t*>(packed);
  const int64_t words = static_cast<int64_t>(l.Npad) * K / 8;
  repack_weights_kernel<<<grid_for(words, 256, sm_count), 256, 0, stream>>>(
      B, N, K, words, reinterpret_cast<uint32_t*>(base + l.off_b));
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  repack_scales_kernel<<<grid_for(static_cast<int64_t>(l.G) * l.Npad, 256, sm_count), 256, 0,
                         stream>>>(scales, zero_points, N, l.G, l.Npad,
                                   reinterpret_cast<float*>(base + l.off_s), base + l.off_z);
  return cudaGetLastError();
}

extern "C" cudaError_t fptq_w4a8_workspace_size_variant(int64_t M, int N, int K, int group_size,
                                                        int variant, size_t* bytes) {
  if (bytes == nullptr || M < 0 || !valid_shape(N, K, group_size) ||
      (variant != FPTQ_W4A8_VARIANT_AUTO && find_variant(variant) == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (M == 0) {
    *bytes = 0;
    return cudaSuccess;
  }
  int sm_count = 0, smem_per_sm = 0, cc = 0;
  const cudaError_t e = device_resources(&sm_count, &smem_per_sm, &cc);
  if (e != cudaSuccess) return e;
  const Variant& v = *resolve_variant(variant, M, group_size, cc);
  if (!variant_supported(v, group_size, cc)) return cudaErrorNotSupported;
  Plan plan;
  if (!make_plan(M, N, K, group_size, sm_count, smem_per_sm, v, &plan)) return cudaErrorInvalidValue;
  *bytes = plan.total;
  return cudaSuccess;
}

extern "C" cudaError_t fptq_w4a8_workspace_size(int64_t M, int N, int K, int group_size,
                                                size_t* bytes) {
  return fptq_w4a8_workspace_size_variant(M, N, K, group_size, FPTQ_W4A8_VARIANT_AUTO, bytes);
}

extern "C" cudaError_t fptq_w4a8_matmul_cuda_variant(const void* X, int dtype, int64_t M, int N,
                                                     int K, int group_size, int act_mode,
                                                     const float* act_scale, const void* packed,
                                                     void* workspace, size_t workspace_bytes,
                                                     void* Y, int variant, cudaStream_t stream) {
  if (M < 0 || !valid_shape(N, K, group_size) || (act_mode != 0 && act_mode != 1) ||
      (dtype != FPTQ_DTYPE_FLOAT32 && dtype != FPTQ_DTYPE_FLOAT16) ||
      (variant != FPTQ_W4A8_VARIANT_AUTO && find_variant(variant) == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (M == 0) return cudaSuccess;
  const size_t elem = dtype == FPTQ_DTYPE_FLOAT16 ? 2 : 4;
  if (X == nullptr || Y == nullptr || packed == nullptr || workspace == nullptr ||
      (act_mode == 0 && act_scale == nullptr) || reinterpret_cast<uintptr_t>(X) % elem != 0 ||
      reinterpret_cast<uintptr_t>(Y) % elem != 0 ||
      reinterpret_cast<uintptr_t>(packed) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  int sm_count = 0, smem_per_sm = 0, cc = 0;
  cudaError_t e = device_resources(&sm_count, &smem_per_sm, &cc);
  if (e != cudaSuccess) return e;
  const Variant& v = *resolve_variant(variant, M, group_size, cc);
  if (!variant_supported(v, group_size, cc)) return cudaErrorNotSupported;
  Plan plan;
  if (!make_plan(M, N, K, group_size, sm_count, smem_per_sm, v, &plan) ||
      workspace_bytes < plan.total) {
    return cudaErrorInvalidValue;
  }
  uint8_t* ws = static_cast<uint8_t*>(workspace);

  // Stage 1: quantize X (the fused variant does it inside the GEMM).
  if (!v.has(kFusedQuant)) {
    e = dtype == FPTQ_DTYPE_FLOAT16
            ? launch_quantize(plan, static_cast<const __half*>(X), M, K, act_mode, act_scale, ws, stream)
            : launch_quantize(plan, static_cast<const float*>(X), M, K, act_mode, act_scale, ws, stream);
    if (e != cudaSuccess) return e;
  }

  // Stage 2: GEMM.
  const PackedLayout l = packed_layout(N, K, group_size);
  const uint8_t* pk = static_cast<const uint8_t*>(packed);
  GemmArgs a;
  a.xq = reinterpret_cast<const int8_t*>(ws + plan.off_xq);
  a.act = reinterpret_cast<const float*>(ws + plan.off_act);
  a.rowsum = reinterpret_cast<const int32_t*>(ws + plan.off_rowsum);
  a.bp = pk + l.off_b;
  a.sp = reinterpret_cast<const float*>(pk + l.off_s);
  a.zp = pk + l.off_z;
  a.y = Y;
  a.partial = reinterpret_cast<float*>(ws + plan.off_partial);
  a.M = M;
  a.Mp = plan.Mp;
  a.N = N;
  a.Npad = l.Npad;
  a.K = K;
  a.group_size = group_size;
  a.sub_per_group = group_size / plan.sg;
  a.k_tiles = plan.k_tiles;
  a.tiles_per_split = plan.tiles_per_split;
  a.out_half = dtype == FPTQ_DTYPE_FLOAT16;
  a.vec_out = (N % 2 == 0) && reinterpret_cast<uintptr_t>(Y) % (2 * elem) == 0;
  a.pdl = v.has(kPdl) ? 1 : 0;
  if (v.kernel == Kernel::kTma) {
    FptqSm90TmaArgs h;
    fill_sm90_args(a, plan, &h);
    h.xq_tiled = a.xq;
    const bool fused = v.has(kFusedQuant);
    // PDL behind the quantize kernel (it calls launch_dependents first thing). The fused variant
    // follows whatever the stream ran last, possibly the repack of these very weights, which
    // the producer requests before griddepcontrol.wait: launched plainly.
    h.pdl = fused ? 0 : a.pdl;
    h.bt = v.rows;
    h.overlap = v.has(kOverlap) ? 1 : 0;
    h.x = fused ? X : nullptr;
    h.x_half = dtype == FPTQ_DTYPE_FLOAT16;
    h.x_vec = reinterpret_cast<uintptr_t>(X) % (4 * elem) == 0;  // rows keep it: K % 128 == 0
    h.act_mode = act_mode;
    h.act_scale = act_scale;
    e = fptq_w4a8_sm90_tma_gemm(&h, stream);
  } else {
    e = launch_gemm_any(plan, a, stream);
  }
  if (e != cudaSuccess || plan.split == 1) return e;

  // Stage 3: reduce the split-K partials.
  const int64_t mn = M * static_cast<int64_t>(N);
  if (a.pdl) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = dim3(grid_for(mn, 256, sm_count));
    cfg.blockDim = dim3(256);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    e = cudaLaunchKernelEx(&cfg, splitk_reduce_kernel, static_cast<const float*>(a.partial),
                           plan.split, mn, Y, a.out_half);
    if (e != cudaSuccess) return e;
    return cudaGetLastError();
  }
  splitk_reduce_kernel<<<grid_for(mn, 256, sm_count), 256, 0, stream>>>(
      a.partial, plan.split, mn, Y, a.out_half);
  return cudaGetLastError();
}

extern "C" cudaError_t fptq_w4a8_matmul_cuda(const void* X, int dtype, int64_t M, int N, int K,
                                             int group_size, int act_mode, const float* act_scale,
                                             const void* packed, void* workspace,
                                             size_t workspace_bytes, void* Y,
                                             cudaStream_t stream) {
  return fptq_w4a8_matmul_cuda_variant(X, dtype, M, N, K, group_size, act_mode, act_scale, packed,
                                       workspace, workspace_bytes, Y, FPTQ_W4A8_VARIANT_AUTO,
                                       stream);
}

extern "C" int fptq_w4a8_plan_info_variant(int64_t M, int N, int K, int group_size, int sm_count,
                                           int smem_per_sm, int variant, int64_t* out,
                                           size_t* workspace_bytes) {
  Plan plan;
  // AUTO here: the sm_80 default (no device to ask; the sm_90 table needs the device).
  const Variant* v = variant == FPTQ_W4A8_VARIANT_AUTO ? &default_sm80_variant(M) : find_variant(variant);
  if (out == nullptr || v == nullptr || !make_plan(M, N, K, group_size, sm_count, smem_per_sm, *v, &plan)) {
    return -1;
  }
  out[0] = plan.cfg;
  out[1] = plan.split;
  out[2] = plan.tiles_per_split;
  out[3] = plan.k_tiles;
  out[4] = plan.m_tiles;
  out[5] = plan.n_tiles;
  out[6] = plan.smem;
  out[7] = plan.occupancy;
  if (workspace_bytes != nullptr) *workspace_bytes = plan.total;
  return 0;
}

extern "C" int fptq_w4a8_plan_info(int64_t M, int N, int K, int group_size, int sm_count,
                                   int smem_per_sm, int64_t* out, size_t* workspace_bytes) {
  return fptq_w4a8_plan_info_variant(M, N, K, group_size, sm_count, smem_per_sm,
                                     FPTQ_W4A8_VARIANT_AUTO, out, workspace_bytes);
}

extern "C" int fptq_w4a8_variant_info(int variant, int device_cc, int group_size) {
  const Variant* v = find_variant(variant);
  if (v == nullptr) return -1;
  return variant_supported(*v, group_size, device_cc) ? 1 : 0;
}

extern "C" int fptq_w4a8_sm90_linked(void) { return fptq_w4a8_sm90_tma_gemm != nullptr ? 1 : 0; }

extern "C" int fptq_w4a8_resolve_variant(int64_t M, int group_size, int device_cc) {
  return resolve_variant(FPTQ_W4A8_VARIANT_AUTO, M, group_size, device_cc)->id;
}
