// The second step of ai.fptq::W4A8RescoredMatMul (docs/ops.md), the language-model head:
// Y = C + R on the top_k channels of each row by C, Y = C elsewhere, where C is the W4A8MatMul
// of the head's 4-bit weight (already in Y) and R the W4A8MatMul of its 4-bit residual.
//
// Why: decode reads the whole head for every token, and the head is most of a small LLM's
// weights (Gemma-3-270m: 168M of 268M). At 8 bits it doubles what a token reads; at 4 bits it
// costs accuracy. But only the channels the softmax can see need it: the residual of those few
// (top_k rows of 4 bits) gives them 8 bits' worth, and the token reads 4 bits per weight.
//
// Tricks:
// * Selection: a threshold from a strided sample of the row (the value about 2 top_k of the
//   row's values pass), one pass collecting the values above it, and nth_element over those
//   few (select_top_k). Blocks of 16 values are compared with the threshold at once (SSE2,
//   x86-64's baseline), and only a block holding a larger value is walked, so the pass runs at
//   the speed of reading the row. A heap of the best so far (top_k ln(N / top_k) updates on a
//   random row: 2x slower at top_k 256, measured) is the fallback when too few values pass.
// * Ties go to the lower channel, as in ONNX TopK (the function body): the order ranks_before
//   puts an equal value of a lower channel first, and every value equal to the last one chosen
//   passed the threshold.
// * R is computed only for the chosen channels, straight from the residual's stored nibbles
//   (top_k * K / 2 bytes per row), as sum_k q u - z sum_k q per group (docs/ops.md step 4): the
//   group sums of q are made once per row. q is kept as int16, so 8 bytes of nibbles (16
//   weights) widen to two int16 vectors and two pmaddwd give their products summed in int32
//   (|q u| <= 127 * 15: no overflow).
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "w4a8_cpu.h"

namespace fptq {
namespace cpu {
namespace {

constexpr int64_t kBlock = 16;
// Chosen channels whose residual rows are requested before their turn (prefetch_residual_row).
constexpr size_t kPrefetchAhead = 4;
// Rows per task: each row is a pass over N values plus top_k residual rows.
constexpr int64_t kMinValuesPerTask = int64_t{1} << 18;

// The activation scale a_m of row x[0, k) and its int8 values q, as int16 (docs/ops.md steps 2-3).
float quantize_row(const float* x, int64_t k, int64_t act_mode, float act_scale, int16_t* q) {
  float a = act_scale;
  if (act_mode == kActPerTokenDynamic) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
    a = amax / kInt8Max;
    if (!(a >= std::numeric_limits<float>::min())) a = 1.0f;
  }
  const float inv = 1.0f / a;
  for (int64_t i = 0; i < k; ++i) {
    const float v = std::nearbyint(x[i] * inv);  // round half to even (the default rounding mode)
    q[i] = static_cast<int16_t>(v > kInt8Max ? kInt8Max : v < -kInt8Max ? -kInt8Max : v == v ? v : 0.0f);
  }
  return a;
}

// True when some value of y[0, kBlock) is larger than `worst` (NaN never is).
bool block_has_larger(const float* y, float worst) {
#if defined(__SSE2__)
  const __m128 w = _mm_set1_ps(worst);
  __m128 larger = _mm_cmpgt_ps(_mm_loadu_ps(y), w);
  larger = _mm_or_ps(larger, _mm_cmpgt_ps(_mm_loadu_ps(y + 4), w));
  larger = _mm_or_ps(larger, _mm_cmpgt_ps(_mm_loadu_ps(y + 8), w));
  larger = _mm_or_ps(larger, _mm_cmpgt_ps(_mm_loadu_ps(y + 12), w));
  return _mm_movemask_ps(larger) != 0;
#else
  bool larger = false;
  for (int64_t j = 0; j < kBlock; ++j) larger |= y[j] > worst;
  return larger;
#endif
}

// (value, channel) pairs: `a` ranks before `b` when larger, or equal and an earlier channel.
using Candidate = std::pair<float, int64_t>;
bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// The top_k channels of y[0, n) by value (ties: the lower channel), in `heap` (any order), by
// one pass with a heap of the best so far (worst on top): exact for any row, but each of the
// about top_k ln(n / top_k) entries of a random row costs a heap update.
void select_top_k_by_heap(const float* y, int64_t n, int64_t top_k, std::vector<Candidate>& heap) {
  heap.clear();
  for (int64_t i = 0; i < top_k; ++i) heap.emplace_back(y[i], i);
  std::make_heap(heap.begin(), heap.end(), ranks_before);  // the worst on top
  float worst = heap.front().first;
  auto consider = [&](int64_t i) {
    if (!(y[i] > worst)) return;
    std::pop_heap(heap.begin(), heap.end(), ranks_before);
    heap.back() = {y[i], i};
    std::push_heap(heap.begin(), heap.end(), ranks_before);
    worst = heap.front().first;
  };
  int64_t i = top_k;
  for (; i + kBlock <= n; i += kBlock) {
    if (!block_has_larger(y + i, worst)) continue;
    for (int64_t j = 0; j < kBlock; ++j) consider(i + j);
  }
  for (; i < n; ++i) consider(i);
}

// The same channels as select_top_k_by_heap, usually without its heap updates: a threshold t
// from every kSampleStride-th value (the one that about 2 top_k values of the row pass), the
// values above t collected in one pass, and the top_k of those. When at least top_k values
// pass, they hold the row's top_k (and every value equal to the last of them), so the result
// is exact; otherwise (t too high) the heap pass runs. sample: scratch.
void select_top_k(const float* y, int64_t n, int64_t top_k, std::vector<Candidate>& chosen,
                  std::vector<float>& sample) {
  constexpr int64_t kSampleStride = 32;
  const int64_t samples = n / kSampleStride, rank = 2 * top_k / kSampleStride + 2;
  chosen.clear();
  if (samples > rank) {
    sample.resize(static_cast<size_t>(samples));
    for (int64_t j = 0; j < samples; ++j) {
      const float v = y[j * kSampleStride];
      sample[j] = v == v ? v : -std::numeric_limits<float>::infinity();  // no NaN in nth_element
    }
    std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
    const float threshold = sample[rank];
    int64_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
      if (!block_has_larger(y + i, threshold)) continue;
      for (int64_t j = i; j < i + kBlock; ++j) {
        if (y[j] > threshold) chosen.emplace_back(y[j], j);
      }
    }
    for (; i < n; ++i) {
      if (y[i] > threshold) chosen.emplace_back(y[i], i);
    }
    if (static_cast<int64_t>(chosen.size()) >= top_k) {
      std::nth_element(chosen.begin(), chosen.begin() + (top_k - 1), chosen.end(), ranks_before);
      chosen.resize(static_cast<size_t>(top_k));
      return;
    }
  }
  select_top_k_by_heap(y, n, top_k, chosen);
}

// sum_{j < len} q[j] * u[j], u the nibbles of bytes[0, ceil(len/2)) (even j: low nibble).
int32_t nibble_dot(const uint8_t* bytes, const int16_t* q, int64_t len) {
  int64_t j = 0;
  int32_t sum = 0;
#if defined(__SSE2__)
  const __m128i nibble = _mm_set1_epi8(15), zero = _mm_setzero_si128();
  __m128i acc = zero;
  for (; j + 16 <= len; j += 16) {
    const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j / 2));
    const __m128i low = _mm_and_si128(packed, nibble);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);  // per byte: its high nibble
    const __m128i u = _mm_unpacklo_epi8(low, high);                       // u[j .. j + 16) in order
    acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_unpacklo_epi8(u, zero),
                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j))));
    acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_unpackhi_epi8(u, zero),
                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j + 8))));
  }
  acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0x4E));
  acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0xB1));
  sum = _mm_cvtsi128_si32(acc);
#endif
  for (; j < len; ++j) sum += q[j] * ((bytes[j / 2] >> (4 * (j % 2))) & 15);
  return sum;
}

// sum_g scales[c, g] * (sum_{k in g} q[k] u[c, k] - zero_points[c, g] * q_sums[g]) of residual
// channel c. Groups start at even k (group_size is even): each at a byte of the row.
float residual_dot(const int16_t* q, const int32_t* q_sums, const ResidualWeights& r, int64_t c) {
  const int64_t groups = (r.k + r.group_size - 1) / r.group_size;
  const uint8_t* row = r.b + c * ((r.k + 1) / 2);
  float sum = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * r.group_size, len = std::min(r.k - k0, r.group_size);
    const int32_t dot = nibble_dot(row + k0 / 2, q + k0, len) - r.zero_points[c * groups + g] * q_sums[g];
    sum += r.scales[c * groups + g] * static_cast<float>(dot);
  }
  return sum;
}

// Asks for residual channel c's row of nibbles (K / 2 bytes, a few cache lines) ahead of its
// dot: the chosen channels are scattered over the weight, so each row is a DRAM latency
// otherwise.
void prefetch_residual_row(const ResidualWeights& r, int64_t c) {
  const int64_t row_bytes = (r.k + 1) / 2;
  const uint8_t* row = r.b + c * row_bytes;
  for (int64_t offset = 0; offset < row_bytes; offset += 64) __builtin_prefetch(row + offset);
}

}  // namespace

void add_residual_on_top_k(const float* x, int64_t m, const ResidualWeights& r, int64_t act_mode, float act_scale,
                           int64_t top_k, float* y, const ParallelFor& parallel_for) {
  if (m <= 0) return;
  const int64_t rows_per_task = std::max<int64_t>(1, kMinValuesPerTask / r.n);
  const int64_t tasks = (m + rows_per_task - 1) / rows_per_task;
  parallel_for(static_cast<size_t>(tasks), [&](size_t task) {
    const int64_t groups = (r.k + r.group_size - 1) / r.group_size;
    std::vector<int16_t> q(static_cast<size_t>(r.k));
    std::vector<int32_t> q_sums(static_cast<size_t>(groups));
    std::vector<Candidate> heap;
    std::vector<float> sample;
    const int64_t begin = static_cast<int64_t>(task) * rows_per_task, end = std::min(m, begin + rows_per_task);
    for (int64_t row = begin; row < end; ++row) {
      float* y_row = y + row * r.n;
      const float a = quantize_row(x + row * r.k, r.k, act_mode, act_scale, q.data());
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * r.group_size, k1 = std::min(r.k, k0 + r.group_size);
        q_sums[g] = std::accumulate(q.begin() + k0, q.begin() + k1, int32_t{0});
      }
      select_top_k(y_row, r.n, top_k, heap, sample);
      for (size_t i = 0; i < heap.size(); ++i) {
        if (i + kPrefetchAhead < heap.size()) prefetch_residual_row(r, heap[i + kPrefetchAhead].second);
        y_row[heap[i].second] += a * residual_dot(q.data(), q_sums.data(), r, heap[i].second);
      }
    }
  });
}

}  // namespace cpu
}  // namespace fptq
