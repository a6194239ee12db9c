// W4A8 GEMM for Hopper (sm_90a): int8 wgmma.mma_async (m64nNk32 .s32.s8.s8) with both operands
// in shared memory, warp-specialized: one producer warpgroup streams the k-tiles and widens the
// 4-bit weights to int8, two consumer warpgroups issue the wgmmas and fold the int32 group sums
// into float accumulators. Compiled only for sm_90a (-gencode arch=compute_90a,code=sm_90a);
// for any other target the kernel body is empty and the launcher reports cudaErrorNotSupported.
//
// Block: BM (64 or 128) x 128 outputs, 384 threads.
//   WG0 (producer): per k-tile of 128, cp.async of Xq (BM x 128 int8) into the operand layout,
//       of the packed weights (128 x 64 bytes, the atoms of w4a8_cuda.h) into a staging area,
//       of the scales and zero points of the tile's group; LAG k-tiles later it widens the
//       staged nibbles to int8 (u - z) in the operand layout, fences the async proxy and
//       arrives on the stage's "full" mbarrier.
//   WG1, WG2 (consumers): BM = 128: rows 0-63 / 64-127 x all 128 columns (m64n128k32);
//       BM = 64: all 64 rows x columns 0-63 / 64-127 (m64n64k32). Per k-tile: wait "full",
//       4 wgmmas (k32 each), wait for them, fold y += s * acc (magic-number int->float, as in
//       w4a8_cuda.cu), arrive on the stage's "empty" mbarrier.
// The zero point is subtracted while widening (the sm_80 kernel corrects with rowsums instead),
// so the fold is 3 instructions per element and group. Group sizes: multiples of 128 only.
//
// Operand layouts in shared memory (row r = m or n of the tile, 16-byte chunk c of the k-tile's
// 128 bytes), each tile 1024-byte aligned:
//   layout 0 (128B swizzle, K-major): r * 128 + ((c ^ (r & 7)) << 4); descriptor: swizzle
//            mode 1, SBO = 1024 (8-row groups), LBO unused (16); k-step kk adds 32 bytes.
//   layout 1 (no swizzle, "interleave", K-major): (r / 8) * 1024 + c * 128 + (r % 8) * 16,
//            i.e. 8 x 16-byte core matrices of 128 contiguous bytes; k-step kk adds 256 bytes;
//            descriptor: LBO = 128 (next core matrix along K), SBO = 1024 (next 8 rows), the
//            reading of the PTX ISA the H200 confirmed (the swapped reading failed its probe).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "w4a8_cuda.h"
#include "w4a8_cuda_device.cuh"
#include "w4a8_cuda_sm90.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FPTQ_SM90A_DEVICE 1
#endif

namespace fptq {
namespace w4a8cuda {
namespace sm90 {
namespace {

constexpr int kThreads = 384;  // 3 warpgroups
constexpr int kBN = 128;
constexpr int kLag = 2;        // k-tiles between a stage's copies and its widening

template <int BM>
struct Cfg {
  static constexpr int STAGES = BM == 128 ? 4 : 6;
  static constexpr int A_BYTES = BM * kTileK;            // int8 Xq tile
  static constexpr int B_BYTES = kBN * kTileK;           // int8 widened weights
  static constexpr int P_BYTES = kBN * kTileK / 2;       // packed nibbles (staging)
  static constexpr int S_BYTES = kBN * 4;                // scales of the k-tile's group
  static constexpr int Z_BYTES = kBN;                    // zero points
  static constexpr int OFF_B = A_BYTES;
  static constexpr int OFF_P = OFF_B + B_BYTES;
  static constexpr int OFF_S = OFF_P + P_BYTES;
  static constexpr int OFF_Z = OFF_S + S_BYTES;
  static constexpr int STAGE_BYTES = (OFF_Z + Z_BYTES + 1023) / 1024 * 1024;
  static constexpr int BAR_OFF = STAGES * STAGE_BYTES;
  // + 1024: the dynamic shared memory base is only 16-byte aligned; the kernel rounds it up.
  static constexpr int SMEM_BYTES = 1024 + BAR_OFF + 2 * STAGES * 8;
  static constexpr int WN = BM == 128 ? 128 : 64;        // columns per consumer warpgroup
  static constexpr int NACC = WN / 2;                    // accumulators per thread (64 x WN / 128)
  static_assert(A_BYTES % 1024 == 0 && OFF_B % 1024 == 0, "operand tiles must be 1024-aligned");
};

#ifdef FPTQ_SM90A_DEVICE
__device__ __forceinline__ void producer_bar() {  // named barrier 1: the producer warpgroup
  asm volatile("bar.sync 1, 128;\n" ::: "memory");
}

// D[64 x 128] += A[64 x 32] * B[32 x 128], both from shared memory through descriptors.
__device__ __forceinline__ void wgmma_n128(int32_t (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]),
        "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]),
        "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]),
        "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]),
        "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]),
        "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]),
        "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]),
        "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]),
        "+r"(d[62]), "+r"(d[63])
      : "l"(da), "l"(db));
}

// D[64 x 64] += A[64 x 32] * B[32 x 64].
__device__ __forceinline__ void wgmma_n64(int32_t (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]),
        "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]),
        "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]),
        "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]),
        "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "l"(da), "l"(db));
}

template <int NACC>
__device__ __forceinline__ void wgmma_k32(int32_t (&d)[NACC], uint64_t da, uint64_t db);
template <>
__device__ __forceinline__ void wgmma_k32<64>(int32_t (&d)[64], uint64_t da, uint64_t db) {
  wgmma_n128(d, da, db);
}
template <>
__device__ __forceinline__ void wgmma_k32<32>(int32_t (&d)[32], uint64_t da, uint64_t db) {
  wgmma_n64(d, da, db);
}
#endif  // FPTQ_SM90A_DEVICE

// Byte offset of (row r, 16-byte chunk c) of an operand tile (header comment).
template <bool SW>
__host__ __device__ __forceinline__ uint32_t tile_off(int r, int c) {
  return SW ? static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4))
            : static_cast<uint32_t>((r >> 3) * 1024 + c * 128 + (r & 7) * 16);
}

// Matrix descriptor (PTX ISA "matrix descriptor format"): bits 0-13 start address >> 4,
// 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4, 49-51 base offset (0: tiles
// are 1024-aligned), 62-63 swizzle mode (0 none, 1 128B, 2 64B, 3 32B).
__host__ __device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo,
                                                       uint32_t mode) {
  return static_cast<uint64_t>((saddr & 0x3FFFFu) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFFu) << 32) | (static_cast<uint64_t>(mode) << 62);
}

struct KernelArgs {
  FptqSm90GemmArgs a;
  uint32_t lbo, sbo, mode, kstep_bytes;  // descriptor fields of the layout
};

// grid (m_tiles, n_tiles, split) -- or, PERSIST, min(tiles, SMs) blocks that walk the tiles
// (m fastest, then n, then split) with one pipeline running across tile boundaries, so that
// one tile's epilogue overlaps the next tile's loads. Block kThreads, dynamic shared memory
// Cfg<BM>::SMEM_BYTES.
template <int BM, bool SW, bool PERSIST>
__global__ void __launch_bounds__(kThreads, 1) w4a8_wgmma_kernel(const __grid_constant__ KernelArgs ka) {
#ifdef FPTQ_SM90A_DEVICE
  using C = Cfg<BM>;
  const FptqSm90GemmArgs& p = ka.a;
  extern __shared__ uint8_t smem_raw[];
  // Operand tiles must be 1024-byte aligned in the shared window (the 128B swizzle pattern
  // repeats every 1024 bytes and the descriptors' base offset is 0).
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t bar_full = sbase + C::BAR_OFF;            // STAGES x 8 bytes
  const uint32_t bar_empty = bar_full + C::STAGES * 8;     // STAGES x 8 bytes

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int64_t n_tiles_total =
      PERSIST ? static_cast<int64_t>(p.m_tiles) * p.n_tiles * p.split : 1;
  const int64_t t_first = PERSIST ? blockIdx.x : 0;
  const int64_t t_step = PERSIST ? gridDim.x : 1;

  // The block's tile t: first row, first column, first k-tile and k-tile count.
  struct TileInfo {
    int64_t m0;
    int n0, kt_begin, n_kt, bz;
  };
  auto tile_info = [&](int64_t t) {
    TileInfo ti;
    int64_t bx = blockIdx.x, by = blockIdx.y, bz = blockIdx.z;
    if (PERSIST) {
      bx = t % p.m_tiles;
      const int64_t r = t / p.m_tiles;
      by = r % p.n_tiles;
      bz = r / p.n_tiles;
    }
    ti.m0 = bx * BM;
    ti.n0 = static_cast<int>(by) * kBN;
    ti.bz = static_cast<int>(bz);
    ti.kt_begin = ti.bz * p.tiles_per_split;
    ti.n_kt = min(ti.kt_begin + p.tiles_per_split, p.k_tiles) - ti.kt_begin;
    return ti;
  };

  if (tid == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      mbar_init(bar_full + 8 * s, 128);   // every producer thread arrives
      mbar_init(bar_empty + 8 * s, 256);  // every consumer thread arrives
    }
    mbar_fence_init();
  }
  __syncthreads();

  // gi: the block's running k-tile count over all its tiles; stage gi % STAGES, and the
  // (gi / STAGES)-th use of that stage (its barrier phases).
  if (wg == 0) {
    // ---------------------------------------------------------------- producer warpgroup
    const int KB = p.K / kAtomK;
    auto widen = [&](int64_t gw) {  // staged nibbles of stage gw % STAGES -> int8 (u - z) operand tile
      const int s = static_cast<int>(gw % C::STAGES);
      const uint32_t st = sbase + s * C::STAGE_BYTES;
      const int lane = tid & 31, kbl = tid >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
      for (int nbl = 0; nbl < 4; ++nbl) {
        const uint4 w = lds128(st + C::OFF_P + (nbl * 4 + kbl) * kAtomBytes + lane * 16);
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n = nbl * 32 + 8 * j + g;
          const uint32_t z4 = lds_u8(st + C::OFF_Z + n) * 0x01010101u;
          const uint32_t lo = (((ws[j] & 0x0F0F0F0Fu) | 0x80808080u) - z4) ^ 0x80808080u;
          const uint32_t hi = ((((ws[j] >> 4) & 0x0F0F0F0Fu) | 0x80808080u) - z4) ^ 0x80808080u;
          sts32(st + C::OFF_B + tile_off<SW>(n, 2 * kbl) + 4 * t, lo);
          sts32(st + C::OFF_B + tile_off<SW>(n, 2 * kbl + 1) + 4 * t, hi);
        }
      }
      fence_proxy_async();
      mbar_arrive(bar_full + 8 * s);
    };

    int64_t gi = 0;
    for (int64_t tt = t_first; tt < n_tiles_total; tt += t_step) {
      const TileInfo ti = tile_info(tt);
      const int rows = static_cast<int>(p.M - ti.m0 < BM ? p.M - ti.m0 : BM);
      const int8_t* xq = p.xq + ti.m0 * p.K;
      const uint8_t* bp = p.bp + static_cast<int64_t>(ti.n0 / kAtomN) * KB * kAtomBytes;
      for (int i = 0; i < ti.n_kt; ++i, ++gi) {
        const int s = static_cast<int>(gi % C::STAGES);
        if (gi >= C::STAGES) mbar_wait(bar_empty + 8 * s, static_cast<uint32_t>((gi / C::STAGES) - 1) & 1u);
        // issue: the copies of k-tile kt into stage s
        const int kt = ti.kt_begin + i;
        const uint32_t st = sbase + s * C::STAGE_BYTES;
        const int k0 = kt * kTileK;
#pragma unroll
        for (int j = 0; j < BM * 8 / 128; ++j) {  // A: BM rows x 8 chunks
          const int c = tid + j * 128;
          const int r = c >> 3, ch = c & 7;
          const bool ok = r < rows;
          cp_async16(st + tile_off<SW>(r, ch), ok ? xq + (static_cast<int64_t>(r) * p.K + k0 + ch * 16) : p.xq, ok);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // packed weights: 4 atom columns x 4 k-steps x 32 chunks
          const int c = tid + j * 128;
          const int nbl = c >> 7, kbl = (c >> 5) & 3, ch = c & 31;
          cp_async16(st + C::OFF_P + (nbl * 4 + kbl) * kAtomBytes + ch * 16,
                     bp + ((static_cast<int64_t>(nbl) * KB + kt * 4 + kbl) * kAtomBytes + ch * 16), true);
        }
        const int64_t grp = kt / p.sub_per_group;
        if (tid < 32) {
          cp_async16(st + C::OFF_S + tid * 16, p.sp + (grp * p.Npad + ti.n0 + tid * 4), true);
        } else if (tid < 40) {
          cp_async16(st + C::OFF_Z + (tid - 32) * 16, p.zp + (grp * p.Npad + ti.n0 + (tid - 32) * 16), true);
        }
        cp_async_commit();
        if (gi >= kLag) {
          cp_async_wait<kLag>();
          producer_bar();  // every producer thread's copies of k-tile gi - kLag have landed
          widen(gi - kLag);
        }
      }
    }
    cp_async_wait<0>();
    producer_bar();
    for (int64_t gw = gi > kLag ? gi - kLag : 0; gw < gi; ++gw) widen(gw);
  } else {
    // ---------------------------------------------------------------- consumer warpgroups
    const int c = wg - 1;                       // 0 or 1
    const int row0 = BM == 128 ? 64 * c : 0;    // the warpgroup's first row in the tile
    const int col0 = BM == 128 ? 0 : 64 * c;    // and first column
    const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const bool split = p.split > 1;
    const bool vec = p.vec_out != 0;

    int64_t gi = 0;
    for (int64_t tt = t_first; tt < n_tiles_total; tt += t_step) {
      const TileInfo ti = tile_info(tt);
      int32_t acc[C::NACC];
      float facc[C::NACC];
#pragma unroll
      for (int r = 0; r < C::NACC; ++r) {
        acc[r] = kMagicI;
        facc[r] = 0.0f;
      }
      for (int i = 0; i < ti.n_kt; ++i, ++gi) {
        const int s = static_cast<int>(gi % C::STAGES);
        mbar_wait(bar_full + 8 * s, static_cast<uint32_t>(gi / C::STAGES) & 1u);
        const uint32_t st = sbase + s * C::STAGE_BYTES;
        const uint32_t a_addr = st + row0 * 128;           // row0 is a multiple of 64: same in both layouts
        const uint32_t b_addr = st + C::OFF_B + col0 * 128;
#pragma unroll
        for (int r = 0; r < C::NACC; ++r) reg_fence(acc[r]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          const uint64_t da = make_desc(a_addr + kk * ka.kstep_bytes, ka.lbo, ka.sbo, ka.mode);
          const uint64_t db = make_desc(b_addr + kk * ka.kstep_bytes, ka.lbo, ka.sbo, ka.mode);
          wgmma_k32<C::NACC>(acc, da, db);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int r = 0; r < C::NACC; ++r) reg_fence(acc[r]);
        // Fold: register 4 * q + 2 * h + e is row 16 * warp + g + 8 * h, column 8 * q + 2 * t + e.
        const uint32_t sS = st + C::OFF_S;
#pragma unroll
        for (int q = 0; q < C::NACC / 4; ++q) {
          const float2 sc = lds_f2(sS + 4 * (col0 + 8 * q + 2 * t));
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r0 = 4 * q + 2 * h;
            facc[r0] = fmaf(__int_as_float(acc[r0]) - kMagicF, sc.x, facc[r0]);
            facc[r0 + 1] = fmaf(__int_as_float(acc[r0 + 1]) - kMagicF, sc.y, facc[r0 + 1]);
            acc[r0] = kMagicI;
            acc[r0 + 1] = kMagicI;
          }
        }
        mbar_arrive(bar_empty + 8 * s);
      }

      // Epilogue: y = a_m * facc.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = ti.m0 + row0 + 16 * warp + g + 8 * h;
        if (m >= p.M) continue;
        const float am = p.act[m];
#pragma unroll
        for (int q = 0; q < C::NACC / 4; ++q) {
          const int n = ti.n0 + col0 + 8 * q + 2 * t;
          const float v0 = facc[4 * q + 2 * h] * am, v1 = facc[4 * q + 2 * h + 1] * am;
          if (split) {
            float* row = p.partial + (static_cast<int64_t>(ti.bz) * p.M + m) * p.N;
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
#else
  (void)ka;
#endif  // FPTQ_SM90A_DEVICE
}

template <int BM, bool SW, bool PERSIST>
cudaError_t launch(const KernelArgs& ka, cudaStream_t stream) {
  using C = Cfg<BM>;
  cudaError_t e = cudaFuncSetAttribute(w4a8_wgmma_kernel<BM, SW, PERSIST>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES);
  if (e != cudaSuccess) return e;
  dim3 grid(static_cast<unsigned>(ka.a.m_tiles), static_cast<unsigned>(ka.a.n_tiles),
            static_cast<unsigned>(ka.a.split));
  if (PERSIST) {
    int dev = 0, sms = 0;
    e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    const int64_t tiles = static_cast<int64_t>(ka.a.m_tiles) * ka.a.n_tiles * ka.a.split;
    grid = dim3(static_cast<unsigned>(tiles < sms ? tiles : sms));
  }
  w4a8_wgmma_kernel<BM, SW, PERSIST><<<grid, kThreads, C::SMEM_BYTES, stream>>>(ka);
  return cudaGetLastError();
}

}  // namespace
}  // namespace sm90
}  // namespace w4a8cuda
}  // namespace fptq

using namespace fptq::w4a8cuda;

extern "C" int fptq_w4a8_sm90_smem_bytes(int bm) {
  return bm == 128 ? sm90::Cfg<128>::SMEM_BYTES : (bm == 64 ? sm90::Cfg<64>::SMEM_BYTES : 0);
}

extern "C" cudaError_t fptq_w4a8_sm90_gemm(const FptqSm90GemmArgs* args, cudaStream_t stream) {
  if (args == nullptr || (args->bm != 64 && args->bm != 128) || args->layout < 0 ||
      args->layout > 1 || args->K % kTileK != 0 || args->sub_per_group < 1) {
    return cudaErrorInvalidValue;
  }
  cudaError_t e = require_sm90_device();  // sm_90a code runs on sm_90 only
  if (e != cudaSuccess) return e;
  sm90::KernelArgs ka;
  ka.a = *args;
  if (args->layout == 0) {
    ka.lbo = 16;
    ka.sbo = 1024;
    ka.mode = 1;
    ka.kstep_bytes = 32;
  } else {
    ka.lbo = 128;
    ka.sbo = 1024;
    ka.mode = 0;
    ka.kstep_bytes = 256;
  }
  const bool sw = args->layout == 0;
  if (args->persistent) {
    if (args->bm != 128) return cudaErrorNotSupported;
    return sw ? sm90::launch<128, true, true>(ka, stream) : sm90::launch<128, false, true>(ka, stream);
  }
  if (args->bm == 128) {
    return sw ? sm90::launch<128, true, false>(ka, stream) : sm90::launch<128, false, false>(ka, stream);
  }
  return sw ? sm90::launch<64, true, false>(ka, stream) : sm90::launch<64, false, false>(ka, stream);
}
