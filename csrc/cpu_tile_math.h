// Register-blocked fp32 tile products and a vectorizable exp for the CPU backend.
//
// Every product here has the form C[r][j] (+)= sum_k A(r, k) * B[k][j] with B row-major and the
// output vectorized along j (broadcast-FMA): QK^T and dO V^T run against K^T / V^T packed per key
// tile, PV and dS K against row-major V / K, P^T dO and dS^T Q read A transposed (A(r, k) at
// a[r * a_row + k * a_col] covers both). Each output element sums k in a fixed order (chunks of
// kChunk terms), so results are the same on every thread count. The compiler vectorizes the unrolled j loops for the
// ISA this file is compiled for (prefix_attention_cpu.cpp is built once per ISA, see CMakeLists.txt).
#pragma once
// Include after prefix_attention_tile.h, which defines FASTMEM_TILE_ABI (this ISA build's symbols).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastmem {
namespace pa {
inline namespace FASTMEM_TILE_ABI {
namespace cpu_math {

// Floats per SIMD register of the ISA being compiled.
#if defined(__AVX512F__)
constexpr int kVecFloats = 16;
#elif defined(__AVX__)
constexpr int kVecFloats = 8;
#else
constexpr int kVecFloats = 4;
#endif
// Micro-tile shape: kVecs registers wide, kRowsFew or kRowsMany rows high, whichever runs faster on
// this machine (timed once per process: prefix_attention_cpu_dispatch.cpp). Every output register is
// one dependent FMA chain per k step, and a core needs (FMA pipes x FMA latency) chains in flight:
// 2 x 4 = 8 on Intel's AVX-512 server cores (two 512-bit FMA ports), 1 x 4 on AMD Zen 4 (512 bits as
// two 256-bit halves), 2 x 4-5 = 8-10 on AVX2 cores. Registers hold the rows * kVecs chunk chains,
// kVecs B vectors and a broadcast (AVX-512 folds it into the FMA):
//   AVX-512, 32 zmm: 4 x 2 (8 chains) or 8 x 2 (16 chains, 19 registers);
//   AVX2 / SSE, 16 registers: 3 x 2 (6 chains) or 6 x 2 (12 chains, 15 registers).
// On Zen 4 the fewer rows win (8 x 2: 7% slower forward, more rows left over to smaller tiles); on a
// two-FMA-port core 8 chains leave no slack for a load's latency: the machine decides, not a guess.
constexpr int kRowsFew = kVecFloats == 16 ? 4 : 3;
constexpr int kRowsMany = kVecFloats == 16 ? 8 : 6;
constexpr int kVecs = 2;
// Terms per chunk sum: adding a chunk into C costs one add per output register, which shares the FMA
// pipes; 16 terms make that 6% of a chunk's work (8 made it 12%: 4-9% slower attention on Zen 4),
// and the error bound kChunk + depth / kChunk is the same at the depths here (20 vs 16 at D = 64,
// 24 vs 24 at 128).
constexpr int64_t kChunk = 16;

#if defined(__GNUC__)
// One SIMD register of floats (GCC / Clang vector extension; loads and stores go through memcpy, so
// no alignment is assumed). Explicit vectors keep the accumulators in registers: left to the
// auto-vectorizer, the unrolled scalar form turned into shuffles.
typedef float Vec __attribute__((vector_size(kVecFloats * sizeof(float))));
inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
// x in every lane. `x - 0` is x for every x, so this folds into a broadcast (an FMA's embedded
// broadcast on AVX-512); `0 + x` is not (-0 + 0 = +0) and costs an add and a shuffle per use.
inline Vec splat(float x) { return x - Vec{}; }

// kR rows x kV registers of outputs. Each output sums its depth in chunks of kChunk terms (one
// register chain per chunk), and each chunk's sum is added to the output in C, in order: rounding error
// grows with kChunk + depth / kChunk instead of depth, as accurate as torch's blocked fp32 matmuls.
// Running totals live in C (L1), not in registers: that leaves the registers to kR * kV chunk chains,
// and GCC spilled the B vectors of a 6 x 2 tile whose totals were registers too.
template <int kR, int kV, bool kAccumulate>
inline void micro_tile(int64_t depth, const float* __restrict__ a, int64_t a_row, int64_t a_col,
                       const float* __restrict__ b, int64_t ldb, float* __restrict__ c, int64_t ldc) {
  for (int64_t k0 = 0; k0 < depth || (!kAccumulate && k0 == 0); k0 += kChunk) {
    const int64_t k_end = k0 + kChunk < depth ? k0 + kChunk : depth;
    Vec chunk[kR][kV] = {};
    for (int64_t k = k0; k < k_end; ++k) {
      Vec bk[kV];
      for (int v = 0; v < kV; ++v) bk[v] = load_vec(b + k * ldb + v * kVecFloats);
      for (int r = 0; r < kR; ++r) {
        const Vec av = splat(a[r * a_row + k * a_col]);
        for (int v = 0; v < kV; ++v) chunk[r][v] += av * bk[v];
      }
    }
    const bool first = !kAccumulate && k0 == 0;  // C = 0 + chunk
    for (int r = 0; r < kR; ++r)
      for (int v = 0; v < kV; ++v) {
        float* out = c + r * ldc + v * kVecFloats;
        store_vec(out, (first ? Vec{} : load_vec(out)) + chunk[r][v]);
      }
  }
}

// Columns [0, kV * kVecFloats) of every row: kR rows at a time, then the m % kR rows left in one
// micro-tile of their own height.
template <int kV, bool kAccumulate, int kR>
inline void column_panel(int64_t m, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
                         const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + kR <= m; r += kR)
    micro_tile<kR, kV, kAccumulate>(depth, a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc);
  if constexpr (kR > 1) {
    if (r < m) column_panel<kV, kAccumulate, kR - 1>(m - r, depth, a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc);
  }
}
#endif

// Columns [j0, n) one output at a time (tails narrower than a register, or no vector extension).
template <bool kAccumulate>
inline void scalar_columns(int64_t m, int64_t j0, int64_t n, int64_t depth, const float* a, int64_t a_row,
                           int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = j0; j < n; ++j) {
      float total = kAccumulate ? c[r * ldc + j] : 0.0f;
      for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
        float chunk = 0.0f;
        for (int64_t k = k0; k < depth && k < k0 + kChunk; ++k) chunk += a[r * a_row + k * a_col] * b[k * ldb + j];
        total += chunk;
      }
      c[r * ldc + j] = total;
    }
}

// C [m, n] (ldc) = (or +=, kAccumulate) A [m, depth] times B [depth, n] (row-major, ldb), where
// A(r, k) = a[r * a_row + k * a_col]. Each output sums k in increasing order, in chunks of kChunk;
// micro_rows (kRowsFew or kRowsMany) only groups rows, so it never changes a bit of C.
template <bool kAccumulate>
inline void tile_product(int micro_rows, int64_t m, int64_t n, int64_t depth, const float* a, int64_t a_row,
                         int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
#if defined(__GNUC__)
  for (; j + kVecs * kVecFloats <= n; j += kVecs * kVecFloats) {
    if (micro_rows == kRowsMany)
      column_panel<kVecs, kAccumulate, kRowsMany>(m, depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
    else
      column_panel<kVecs, kAccumulate, kRowsFew>(m, depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
  }
  for (; j + kVecFloats <= n; j += kVecFloats)
    column_panel<1, kAccumulate, kRowsFew>(m, depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
#else
  (void)micro_rows;
#endif
  scalar_columns<kAccumulate>(m, j, n, depth, a, a_row, a_col, b, ldb, c, ldc);
}

// exp(x) for x <= 0 (scores minus their max or their lse), within 2 ulp of expf for x >= -87;
// 0 below about -87.3 and for -inf. V is float or Vec (one body: every lane computes what the scalar
// form does); its three lane-type specific steps come first.
inline float clamp_below(float x, float lo) { return std::max(x, lo); }
inline float pow2_of_integral(float n) {  // 2^n for integral n in [-127, 0]; n = -127 gives 0
  const int32_t biased = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &biased, sizeof(scale));
  return scale;
}
#if defined(__GNUC__)
typedef int32_t IntVec __attribute__((vector_size(kVecFloats * sizeof(int32_t))));
inline Vec clamp_below(Vec x, float lo) { return x < lo ? splat(lo) : x; }
inline Vec pow2_of_integral(Vec n) {
  const IntVec biased = (__builtin_convertvector(n, IntVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &biased, sizeof(scale));
  return scale;
}
#endif

template <class V>
inline V exp_nonpositive(V x) {
  x = clamp_below(x, -88.0f);                                // -inf -> -88 -> 0 below
  const float shifter = 12582912.0f;                         // 1.5 * 2^23: rounds to nearest integer
  const V n = (x * 1.44269504088896341f + shifter) - shifter;
  const V r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // Cody-Waite ln 2
  V p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * pow2_of_integral(n);
}

// row[j] = exp(row[j] - shift) for j < width, shift >= every row[j]: whole registers through the Vec
// form (the scalar loop did not vectorize: GCC kept it scalar around the float -> int conversion).
inline void exp_shifted_row(float* row, int64_t width, float shift) {
  int64_t j = 0;
#if defined(__GNUC__)
  for (; j + kVecFloats <= width; j += kVecFloats) store_vec(row + j, exp_nonpositive(load_vec(row + j) - shift));
#endif
  for (; j < width; ++j) row[j] = exp_nonpositive(row[j] - shift);
}

}  // namespace cpu_math
}  // namespace FASTMEM_TILE_ABI
}  // namespace pa
}  // namespace fastmem
