// CPU few-row linear: y[i, n] = sum_k x[i, k] W[n, k] (+ bias[n]) for a handful of rows i.
//
// At a few rows a matmul reads every weight once and does rows FMAs per weight, so its time is the
// weight's bytes over the memory bandwidth; BLAS sgemm packs W into panels first (a read and a write of
// every weight per call), which measured 5.7 GB/s on Zen 4 at 8 rows against 31.8 GB/s for a plain read
// of the same bytes. Here W is streamed once, in its own row-major layout: a block of kWeightRows rows
// of W against kXRows rows of x at a time (x stays in L1, the block is reread from L1 for the next x
// rows), the next block prefetched while this one computes (the hardware prefetcher alone follows the
// block's interleaved row streams poorly). Over SmolLM2's linears on 2 Zen 4 cores it reaches 57% of the
// roofline at 1 row and 46% at 8 (8 FMAs per weight, against one 512-bit FMA per cycle per core), 1.7x
// torch at both (bench/linear.py).
//
// Built once per ISA (like prefix_attention_cpu.cpp); work items are ranges of W rows spread over the
// worker pool of cpu_threads.h. Determinism: y[i, n] sums k in kVecFloats lanes (lane l: k = l,
// l + kVecFloats, ... in order), the lanes in a fixed tree, then the k tail in order, then the bias: the
// same bits on every thread count and for every row of x (a row's result never depends on the others).
#include <algorithm>
#include <cstring>

#include "few_row_linear.h"
#include "prefix_attention_tile.h"
#include "cpu_tile_math.h"
#include "cpu_threads.h"

#ifndef FASTMEM_CPU_ISA
#define FASTMEM_CPU_ISA base
#endif

namespace fastmem {
namespace pa {
namespace cpu {
namespace FASTMEM_CPU_ISA {
namespace {

using cpu_math::kVecFloats;

// kXRows x kWeightRows accumulators, plus kWeightRows W registers and one of x: 21 of AVX-512's 32
// registers (AVX2's 16 take 4 x 2). Measured on Zen 4 at 8 rows (226 MB of W, one core), 4 x 4 with the
// prefetch read 14.0 GB/s; without it 8.9; 8 x 3, 6 x 4, 8 x 2, 2 x 8: 11.9-13.8; one W row at a time
// against 8 rows of x 8.3 (torch's sgemm: 5.7).
constexpr int kXRows = 4;             // weight_block's passes dispatch 1..4 rows
constexpr int kWeightRows = kVecFloats == 16 ? 4 : 2;
constexpr int64_t kItemRows = 64;    // W rows per work item (a multiple of kWeightRows)

#if defined(__GNUC__)
using cpu_math::load_vec;
using cpu_math::Vec;

// Sum of a register's lanes in a fixed tree (lane l + lane l + width, width halving), through half-width
// vectors: a few shuffles and adds, where a scalar loop over the lanes cost as much as a short row.
typedef float Floats8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Floats4 __attribute__((vector_size(4 * sizeof(float))));
template <class Half, class Whole>
inline Half half_sum(const Whole& v) {  // lanes l + lanes l + width / 2
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return lo + hi;
}
inline float lane_sum(Vec v) {
  Floats4 quarter;
  if constexpr (kVecFloats == 16)
    quarter = half_sum<Floats4>(half_sum<Floats8>(v));
  else if constexpr (kVecFloats == 8)
    quarter = half_sum<Floats4>(v);
  else
    std::memcpy(&quarter, &v, sizeof(quarter));
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}
#endif

// y[i0 .. i0 + kR, n0 .. n0 + kW): kR rows of x against kW rows of W, kR x kW register accumulators;
// pass `phase` of `passes` over this block of W (see the prefetch below).
template <int kR, int kW>
void block(const LinearArgs& a, int64_t i0, int64_t n0, int64_t phase, int64_t passes) {
  const int64_t depth = a.in_features, ldw = a.weight_stride;
  const float* x = reinterpret_cast<const float*>(a.x) + i0 * a.x_stride;
  const float* w = reinterpret_cast<const float*>(a.weight) + n0 * ldw;
  float total[kR][kW] = {};
  int64_t k = 0;
#if defined(__GNUC__)
  Vec acc[kR][kW] = {};
  // The next block's rows go into L2 spread evenly over this block's passes, at the k steps whose index
  // is `phase` mod `passes` (phase < 0: none): the memory stays busy while later passes compute from L1.
  int64_t step_phase = 0;
  for (; k + kVecFloats <= depth; k += kVecFloats) {
    const bool prefetch = step_phase == phase;
    step_phase = step_phase + 1 == passes ? 0 : step_phase + 1;
    Vec wv[kW];
    for (int j = 0; j < kW; ++j) {
      wv[j] = load_vec(w + j * ldw + k);
      if (prefetch) __builtin_prefetch(w + (kWeightRows + j) * ldw + k, 0, 1);
    }
    for (int r = 0; r < kR; ++r) {
      const Vec xv = load_vec(x + r * a.x_stride + k);
      for (int j = 0; j < kW; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int j = 0; j < kW; ++j) total[r][j] = lane_sum(acc[r][j]);
#else
  (void)phase;
  (void)passes;
#endif
  const float* bias = reinterpret_cast<const float*>(a.bias);
  float* y = reinterpret_cast<float*>(a.y) + i0 * a.y_stride + n0;
  for (int r = 0; r < kR; ++r)
    for (int j = 0; j < kW; ++j) {
      float t = total[r][j];
      for (int64_t kk = k; kk < depth; ++kk) t += x[r * a.x_stride + kk] * w[j * ldw + kk];
      if (bias) t += bias[n0 + j];
      y[r * a.y_stride + j] = t;
    }
}

// Rows [n0, n0 + kW) of W against every row of x, kXRows at a time (the block rereads from L1), the last
// pass with the rows left; each pass prefetches its share of the next block, which exists when `more`
// (the item goes on).
template <int kW>
void weight_block(const LinearArgs& a, int64_t n0, bool more) {
  const int64_t passes = (a.rows + kXRows - 1) / kXRows;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t i0 = pass * kXRows, phase = more ? pass : -1;
    switch (std::min<int64_t>(kXRows, a.rows - i0)) {
      case 4: block<4, kW>(a, i0, n0, phase, passes); break;
      case 3: block<3, kW>(a, i0, n0, phase, passes); break;
      case 2: block<2, kW>(a, i0, n0, phase, passes); break;
      case 1: block<1, kW>(a, i0, n0, phase, passes); break;
    }
  }
}

}  // namespace

void few_row_linear(const LinearArgs& a) {
  const int64_t items = (a.out_features + kItemRows - 1) / kItemRows;
  cpu_threads::parallel_for(items, a.num_threads, [&](int64_t item) {
    const int64_t end = std::min(a.out_features, (item + 1) * kItemRows);
    int64_t n0 = item * kItemRows;
    for (; n0 + kWeightRows <= end; n0 += kWeightRows) weight_block<kWeightRows>(a, n0, n0 + 2 * kWeightRows <= end);
    for (; n0 < end; ++n0) weight_block<1>(a, n0, false);
  });
}

}  // namespace FASTMEM_CPU_ISA
}  // namespace cpu
}  // namespace pa
}  // namespace fastmem
