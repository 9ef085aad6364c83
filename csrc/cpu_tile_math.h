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

// Floats per SIMD register of the ISA being compiled; a micro-tile is kRows x kVecs registers.
#if defined(__AVX512F__)
constexpr int kVecFloats = 16;
#elif defined(__AVX__)
constexpr int kVecFloats = 8;
#else
constexpr int kVecFloats = 4;
#endif
// Registers: kRows * kVecs * 2 accumulators (chunk and total) + kVecs for B, within 32 (AVX-512) / 16.
constexpr int kRows = kVecFloats == 16 ? 4 : 2;
constexpr int kVecs = 2;
constexpr int64_t kChunk = 8;

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

// kR rows x kV registers of outputs, held in registers over the whole depth loop. Each output sums
// its depth in chunks of kChunk terms (one chain per chunk, then chunk totals in order): rounding error
// grows with kChunk + depth / kChunk instead of depth, as accurate as torch's blocked fp32 matmuls.
template <int kR, int kV, bool kAccumulate>
inline void micro_tile(int64_t depth, const float* __restrict__ a, int64_t a_row, int64_t a_col,
                       const float* __restrict__ b, int64_t ldb, float* __restrict__ c, int64_t ldc) {
  Vec total[kR][kV];
  for (int r = 0; r < kR; ++r)
    for (int v = 0; v < kV; ++v) total[r][v] = kAccumulate ? load_vec(c + r * ldc + v * kVecFloats) : Vec{};
  for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
    const int64_t k_end = k0 + kChunk < depth ? k0 + kChunk : depth;
    Vec chunk[kR][kV] = {};
    for (int64_t k = k0; k < k_end; ++k) {
      Vec bk[kV];
      for (int v = 0; v < kV; ++v) bk[v] = load_vec(b + k * ldb + v * kVecFloats);
      for (int r = 0; r < kR; ++r) {
        const Vec av = Vec{} + a[r * a_row + k * a_col];
        for (int v = 0; v < kV; ++v) chunk[r][v] += av * bk[v];
      }
    }
    for (int r = 0; r < kR; ++r)
      for (int v = 0; v < kV; ++v) total[r][v] += chunk[r][v];
  }
  for (int r = 0; r < kR; ++r)
    for (int v = 0; v < kV; ++v) store_vec(c + r * ldc + v * kVecFloats, total[r][v]);
}

// Columns [0, kV * kVecFloats) of every row, kRows rows at a time, then one at a time.
template <int kV, bool kAccumulate>
inline void column_panel(int64_t m, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
                         const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows)
    micro_tile<kRows, kV, kAccumulate>(depth, a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc);
  for (; r < m; ++r) micro_tile<1, kV, kAccumulate>(depth, a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc);
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
// A(r, k) = a[r * a_row + k * a_col]. Each output sums k in increasing order, in chunks of kChunk.
template <bool kAccumulate>
inline void tile_product(int64_t m, int64_t n, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
                         const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
#if defined(__GNUC__)
  for (; j + kVecs * kVecFloats <= n; j += kVecs * kVecFloats)
    column_panel<kVecs, kAccumulate>(m, depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
  for (; j + kVecFloats <= n; j += kVecFloats)
    column_panel<1, kAccumulate>(m, depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
#endif
  scalar_columns<kAccumulate>(m, j, n, depth, a, a_row, a_col, b, ldb, c, ldc);
}

// exp(x) for x <= 0 (scores minus their max or their lse), within 2 ulp of expf for x >= -87;
// 0 below about -87.3 and for -inf. Branch-free so that loops over it vectorize.
inline float exp_nonpositive(float x) {
  x = std::max(x, -88.0f);                                   // -inf -> -88 -> 0 below
  const float shifter = 12582912.0f;                         // 1.5 * 2^23: rounds to nearest integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // Cody-Waite ln 2
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t biased = (static_cast<int32_t>(n) + 127) << 23;  // 2^n; n = -127 gives 0
  float scale;
  std::memcpy(&scale, &biased, sizeof(scale));
  return p * scale;
}

}  // namespace cpu_math
}  // namespace FASTMEM_TILE_ABI
}  // namespace pa
}  // namespace fastmem
