// CPU backend of prefix attention: FlashAttention-2 over fp32 tiles, every tile product a
// register-blocked micro-kernel (cpu_tile_math.h), work items spread over the
// persistent worker pool of cpu_threads.h.
//
// Built once per ISA (FASTMEM_CPU_ISA = base, avx2 or avx512; see CMakeLists.txt) into
// namespace cpu::<isa>; prefix_attention_cpu_dispatch.cpp picks the best one the CPU runs.
//
// Forward: item = (b, kv head, query tile); its rows are the GQA group's heads x the tile's queries,
// so each key tile is converted once and shared by the whole group. Per key tile: S = Q K^T (K^T
// packed), masking by row ranges, online softmax with a vectorized exp, acc += P V.
// Backward: item = (b, kv head): query tiles in order, their visible key tiles in order; S and P are
// recomputed, dP = dO V^T, dS = P (dP - delta); dq of the query tile, and dk / dv of the row's own keys
// and of each pool use, accumulate in the item's fp32 buffers. Pool gradients leave as fp32 per-use
// partials, reduced per slot in (b, m) order (the bits of sum_into_slots on them, then a cast).
// Tiles (prefix_attention.h, Tiles): the register micro-tile height is timed once per machine and never
// changes a bit; the query tile follows the L2 size (choose_query_tile).
// Determinism: every output element is written by one item, whose arithmetic depends only on the
// tile grids, fixed by the machine and the shape (never on the thread that runs it or on the thread count).
#include <algorithm>
#include <stdexcept>
#include <time.h>
#include <type_traits>
#include <vector>

#include "prefix_attention.h"
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

using cpu_math::exp_nonpositive;
using cpu_math::exp_shifted_row;
using cpu_math::tile_product;
using cpu_threads::parallel_for;

constexpr int64_t kKeyTile = 64;    // keys per tile; S / P tiles are kKeyTile wide

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
const T* at(const TensorArg& t, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<const T*>(t.ptr) + a * t.stride0 + b * t.stride1 + c * t.stride2;
}
template <class T>
T* at_mut(const TensorArg& t, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<T*>(t.ptr) + a * t.stride0 + b * t.stride1 + c * t.stride2;
}

// Rows [r0, r0 + n) of dimension 1 of `t` (dim0 = a, dim2 = h) as fp32 rows of d floats.
template <class T>
void load_tile(const TensorArg& t, int64_t a, int64_t r0, int64_t n, int64_t h, int64_t d, float* dst) {
  for (int64_t r = 0; r < n; ++r) load_row<T>(at<T>(t, a, r0 + r, h), d, dst + r * d);
}

#if defined(__GNUC__)
typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t Lanes8 __attribute__((vector_size(8 * sizeof(int32_t))));

// 8 x 8 block transpose in registers (unpack, shuffle, 128-bit permute: the AVX sequence, written
// with generic shuffles so every ISA build compiles it): in[i] = row i, out[j] = column j.
inline void transpose8(const Vec8 in[8], Vec8 out[8]) {
  const Lanes8 lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const Lanes8 even = {0, 1, 8, 9, 4, 5, 12, 13}, odd = {2, 3, 10, 11, 6, 7, 14, 15};
  const Lanes8 low_halves = {0, 1, 2, 3, 8, 9, 10, 11}, high_halves = {4, 5, 6, 7, 12, 13, 14, 15};
  Vec8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(in[i], in[i + 1], lo);
    t[i + 1] = __builtin_shuffle(in[i], in[i + 1], hi);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], even);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], odd);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], even);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], odd);
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = __builtin_shuffle(u[j], u[j + 4], low_halves);
    out[j + 4] = __builtin_shuffle(u[j], u[j + 4], high_halves);
  }
}
#endif

// fp32 rows [n, d] (row r at rows + r * ld) -> columns [d, kKeyTile] (columns n.. zero), the B operand of
// Q K^T and dO V^T. Whole 8 x 8 blocks go through registers (d is a multiple of 8).
void pack_transposed(const float* rows, int64_t ld, int64_t n, int64_t d, float* cols) {
  int64_t r0 = 0;
#if defined(__GNUC__)
  for (; r0 + 8 <= n; r0 += 8)
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
      Vec8 in[8], out[8];
      for (int i = 0; i < 8; ++i) std::memcpy(&in[i], rows + (r0 + i) * ld + c0, sizeof(Vec8));
      transpose8(in, out);
      for (int j = 0; j < 8; ++j) std::memcpy(cols + (c0 + j) * kKeyTile + r0, &out[j], sizeof(Vec8));
    }
#endif
  for (int64_t c = 0; c < d; ++c) {
    float* col = cols + c * kKeyTile;
    for (int64_t r = r0; r < n; ++r) col[r] = rows[r * ld + c];
    for (int64_t r = n; r < kKeyTile; ++r) col[r] = 0.0f;
  }
}

// n key (or value) rows of one head as fp32 rows `ld` floats apart: fp32 inputs are read in place,
// 16-bit ones are converted into `scratch` (ld = d).
struct Rows {
  const float* ptr;
  int64_t ld;
};
template <class T>
Rows tile_rows(const TensorArg& t, int64_t a, int64_t r0, int64_t n, int64_t h, int64_t d, float* scratch) {
  if (std::is_same<T, float>::value) return Rows{reinterpret_cast<const float*>(at<T>(t, a, r0, h)), t.stride1};
  load_tile<T>(t, a, r0, n, h, d, scratch);
  return Rows{scratch, d};
}

// Queries per tile (per head of the GQA group): 32, halved while the query tile's fp32 rows (Q, dO or
// the output accumulator, S, dP: rows x (2 D + 2 kKeyTile) floats), which every key tile reads again,
// would take more than half this core's L2 (the rest holds K / V tiles and outputs). 32 measured
// best on Zen 4 (64: 6% slower forward, 13% fwd+bwd: more of the causal diagonal is masked work).
// Depends on the machine and the shape only, never on the thread count: results stay bit-stable.
int64_t choose_query_tile(int64_t group, int64_t d, int64_t l2_bytes) {
  int64_t tile = 32;
  while (tile > 8 && group * tile * (2 * d + 2 * kKeyTile) * (int64_t)sizeof(float) > l2_bytes / 2) tile /= 2;
  return tile;
}

struct Dims {
  int64_t B, Tq, Tk, Hq, Hkv, D, S, P, M, group, query_tile;
  int micro_rows;
  Dims(const Params& p, const Tiles& t)
      : B(p.batch), Tq(p.q_len), Tk(p.k_len), Hq(p.q_heads), Hkv(p.kv_heads), D(p.head_dim),
        S(p.num_slots), P(p.prefix_len), M(p.uses), group(p.q_heads / p.kv_heads),
        query_tile(choose_query_tile(group, D, t.l2_bytes)), micro_rows(t.micro_rows) {}
};

// One key tile a query tile may see: n keys of `keys`/`values` starting at row `first` of dim 1,
// dim0 = `owner` (the slot, or the batch row for own keys). use = m for the pool, -1 for own keys.
struct KeyTile {
  const TensorArg* keys;
  const TensorArg* values;
  int64_t owner, first, n, use;
};

// Calls visit(KeyTile) for every key tile that queries [i0, i_last] of row b may see, in the fixed
// order: pool entries m = 0..M-1, then own keys from the tile holding key_start.
template <class Visit>
void for_each_key_tile(const Params& p, const Dims& s, int64_t b, int64_t i_last, const Visit& visit) {
  const int32_t* index = reinterpret_cast<const int32_t*>(p.index);
  const int32_t* lens = reinterpret_cast<const int32_t*>(p.lens);
  for (int64_t m = 0; m < s.M; ++m) {
    const int32_t slot = index[b * s.M + m];
    const int64_t len = slot_visible_len(slot, lens);
    for (int64_t p0 = 0; p0 < len; p0 += kKeyTile)
      visit(KeyTile{&p.prefix_k, &p.prefix_v, (int64_t)slot, p0, std::min(kKeyTile, len - p0), m});
  }
  const int64_t key_start = reinterpret_cast<const int32_t*>(p.key_start)[b];
  const int64_t j_end = own_key_end(i_last, s.Tq, s.Tk, p.causal);
  for (int64_t j0 = (key_start / kKeyTile) * kKeyTile; j0 < j_end; j0 += kKeyTile)
    visit(KeyTile{&p.k, &p.v, b, j0, std::min(kKeyTile, j_end - j0), -1});
}

// The query tile's rows (group heads x nq queries, row r = query i0 + r % nq) and their visible
// columns [lo, hi) of a key tile.
void visible_columns(const Params& p, const Dims& s, const KeyTile& tile, int64_t b, int64_t i0, int64_t nq,
                     int64_t rows, int64_t* lo, int64_t* hi) {
  const int64_t ks = reinterpret_cast<const int32_t*>(p.key_start)[b];
  for (int64_t r = 0; r < rows; ++r) {
    lo[r] = 0;
    hi[r] = tile.n;
    if (tile.use < 0) own_tile_key_range(i0 + r % nq, tile.first, tile.n, s.Tq, s.Tk, ks, p.causal, &lo[r], &hi[r]);
    hi[r] = std::max(hi[r], lo[r]);
  }
}

// Columns a key tile of n keys computes: n rounded up to whole SIMD registers (at least 8 columns; the
// packed K^T / V^T are zero there), so short tiles (pool slots, the causal diagonal) cost what they
// hold, not kKeyTile, and never fall to the scalar column tail.
constexpr int64_t kWidthStep = cpu_math::kVecFloats > 8 ? cpu_math::kVecFloats : 8;
int64_t tile_width(int64_t n) { return std::min(kKeyTile, (n + kWidthStep - 1) / kWidthStep * kWidthStep); }

// max and sum over a score row of `width` (a multiple of 8) entries in kLanes independent lanes, combined
// in a fixed tree: vectorizable, where one running scalar would be a chain of dependent adds.
float row_max(const float* row, int64_t width) {
  float lane[kLanes];
  std::fill(lane, lane + kLanes, -INFINITY);
  for (int64_t j = 0; j < width; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = std::max(lane[l], row[j + l]);
  return std::max(std::max(std::max(lane[0], lane[1]), std::max(lane[2], lane[3])),
                  std::max(std::max(lane[4], lane[5]), std::max(lane[6], lane[7])));
}
float row_sum(const float* row, int64_t width) {
  float lane[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t j = 0; j < width; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += row[j + l];
  return combine_lanes(lane);
}

// Sets the scores of a tile row of `width` columns outside its visible columns [lo, hi) to -inf
// (probability 0); lo >= hi hides the whole row.
void mask_outside(float* row, int64_t width, int64_t lo, int64_t hi) {
  lo = std::min(lo, width);
  std::fill(row, row + lo, -INFINITY);
  std::fill(row + std::max(lo, hi), row + width, -INFINITY);
}

// fp32 scratch of one query tile (rows = group * query_tile at most); contents are never assumed.
struct QueryTileScratch {
  std::vector<float> q, dout, acc, kt, vt, k_rows, v_rows, s, dp;
  std::vector<int64_t> lo, hi;
  void reserve(int64_t rows, int64_t d) {
    for (auto* buf : {&q, &dout, &acc}) buf->resize(std::max<size_t>(buf->size(), rows * d));
    for (auto* buf : {&kt, &vt, &k_rows, &v_rows}) buf->resize(std::max<size_t>(buf->size(), kKeyTile * d));
    for (auto* buf : {&s, &dp}) buf->resize(std::max<size_t>(buf->size(), rows * kKeyTile));
    for (auto* buf : {&lo, &hi}) buf->resize(std::max<size_t>(buf->size(), rows));
  }
};

// The calling thread's scratch, grown to fit: work items reuse it instead of allocating their own.
QueryTileScratch& thread_scratch(int64_t rows, int64_t d) {
  thread_local QueryTileScratch scratch;
  scratch.reserve(rows, d);
  return scratch;
}

// Loads query tile rows: heads hk * group + g, queries [i0, i0 + nq), row g * nq + ii.
template <class T>
void load_query_rows(const TensorArg& t, const Dims& s, int64_t b, int64_t hk, int64_t i0, int64_t nq, float* dst) {
  for (int64_t g = 0; g < s.group; ++g) load_tile<T>(t, b, i0, nq, hk * s.group + g, s.D, dst + g * nq * s.D);
}

// ---------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------
template <class T>
void forward_impl(const Params& p, const Tiles& tiles) {
  const Dims s(p, tiles);
  const int64_t D = s.D, nqb = ceil_div(s.Tq, s.query_tile);
  float* lse = reinterpret_cast<float*>(p.lse);

  parallel_for(s.B * s.Hkv * nqb, p.num_threads, [&](int64_t item) {
    const int64_t qb = item % nqb, hk = (item / nqb) % s.Hkv, b = item / (nqb * s.Hkv);
    const int64_t i0 = qb * s.query_tile, nq = std::min(s.query_tile, s.Tq - i0), rows = s.group * nq;
    QueryTileScratch& w = thread_scratch(rows, D);
    std::vector<SoftmaxRow> st((size_t)rows);
    load_query_rows<T>(p.q, s, b, hk, i0, nq, w.q.data());
    std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.0f);
    for (auto& row : st) softmax_row_init(&row);
    for (int64_t x = 0; x < rows * D; ++x) w.q[x] *= p.scale;  // S comes out scaled

    for_each_key_tile(p, s, b, i0 + nq - 1, [&](const KeyTile& tile) {
      const Rows keys = tile_rows<T>(*tile.keys, tile.owner, tile.first, tile.n, hk, D, w.k_rows.data());
      const Rows values = tile_rows<T>(*tile.values, tile.owner, tile.first, tile.n, hk, D, w.v_rows.data());
      const int64_t width = tile_width(tile.n);
      pack_transposed(keys.ptr, keys.ld, tile.n, D, w.kt.data());
      tile_product<false>(s.micro_rows, rows, width, D, w.q.data(), D, 1, w.kt.data(), kKeyTile, w.s.data(), kKeyTile);
      visible_columns(p, s, tile, b, i0, nq, rows, w.lo.data(), w.hi.data());
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = w.s.data() + r * kKeyTile;
        mask_outside(srow, width, w.lo[r], w.hi[r]);
        const float new_max = std::max(st[r].max, row_max(srow, width));
        if (new_max == -INFINITY) {  // nothing visible yet: the row contributes nothing
          std::fill(srow, srow + width, 0.0f);
          continue;
        }
        const float alpha = exp_nonpositive(st[r].max - new_max);  // 0 on the first visible tile
        exp_shifted_row(srow, width, new_max);
        st[r].sum = st[r].sum * alpha + row_sum(srow, width);
        st[r].max = new_max;
        if (alpha != 1.0f) {
          float* acc = w.acc.data() + r * D;
          for (int64_t c = 0; c < D; ++c) acc[c] *= alpha;
        }
      }
      tile_product<true>(s.micro_rows, rows, D, tile.n, w.s.data(), kKeyTile, 1, values.ptr, values.ld, w.acc.data(), D);
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = hk * s.group + r / nq, i = i0 + r % nq;
      fwd_row_finish<T>(st[r], w.acc.data() + r * D, D, at_mut<T>(p.out, b, i, h), lse + (b * s.Hq + h) * s.Tq + i);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------
template <class T>
void backward_item(const Params& p, const Dims& s, int64_t b, int64_t hk) {
  const int64_t D = s.D, rows_max = s.group * s.query_tile;
  const float* lse = reinterpret_cast<const float*>(p.lse);
  float* delta = reinterpret_cast<float*>(p.delta);
  QueryTileScratch& w = thread_scratch(rows_max, D);
  std::vector<float> row_lse(rows_max), row_delta(rows_max);
  // fp32 dk / dv of the own keys [Tk, D] and of each pool use [M, P, D]; scale applied on store.
  std::vector<float> dk_own(s.Tk * D, 0.0f), dv_own(s.Tk * D, 0.0f);
  std::vector<float> dk_pool(s.M * s.P * D, 0.0f), dv_pool(s.M * s.P * D, 0.0f);

  for (int64_t i0 = 0; i0 < s.Tq; i0 += s.query_tile) {
    const int64_t nq = std::min(s.query_tile, s.Tq - i0), rows = s.group * nq;
    load_query_rows<T>(p.q, s, b, hk, i0, nq, w.q.data());
    load_query_rows<T>(p.grad_out, s, b, hk, i0, nq, w.dout.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = hk * s.group + r / nq, i = i0 + r % nq, at_row = (b * s.Hq + h) * s.Tq + i;
      delta[at_row] = dot_rows<T>(at<T>(p.grad_out, b, i, h), at<T>(p.out, b, i, h), D);
      row_delta[r] = delta[at_row];
      row_lse[r] = lse[at_row];
    }
    std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.0f);  // dq, unscaled

    for_each_key_tile(p, s, b, i0 + nq - 1, [&](const KeyTile& tile) {
      const int64_t n = tile.n;
      const Rows keys = tile_rows<T>(*tile.keys, tile.owner, tile.first, n, hk, D, w.k_rows.data());
      const Rows values = tile_rows<T>(*tile.values, tile.owner, tile.first, n, hk, D, w.v_rows.data());
      const int64_t width = tile_width(n);
      pack_transposed(keys.ptr, keys.ld, n, D, w.kt.data());
      pack_transposed(values.ptr, values.ld, n, D, w.vt.data());
      tile_product<false>(s.micro_rows, rows, width, D, w.q.data(), D, 1, w.kt.data(), kKeyTile, w.s.data(), kKeyTile);
      tile_product<false>(s.micro_rows, rows, width, D, w.dout.data(), D, 1, w.vt.data(), kKeyTile, w.dp.data(), kKeyTile);
      visible_columns(p, s, tile, b, i0, nq, rows, w.lo.data(), w.hi.data());
      for (int64_t r = 0; r < rows; ++r) {  // s <- p, dp <- ds = p (dp - delta)
        float* prow = w.s.data() + r * kKeyTile;
        float* dsrow = w.dp.data() + r * kKeyTile;
        const bool sees_keys = row_lse[r] != -INFINITY;
        const float lse_r = sees_keys ? row_lse[r] : 0.0f, delta_r = row_delta[r];
        for (int64_t j = 0; j < width; ++j) prow[j] *= p.scale;
        mask_outside(prow, width, sees_keys ? w.lo[r] : width, w.hi[r]);
        exp_shifted_row(prow, width, lse_r);
        for (int64_t j = 0; j < width; ++j) dsrow[j] = prow[j] * (dsrow[j] - delta_r);
      }
      float* dk = tile.use < 0 ? dk_own.data() + tile.first * D : dk_pool.data() + (tile.use * s.P + tile.first) * D;
      float* dv = tile.use < 0 ? dv_own.data() + tile.first * D : dv_pool.data() + (tile.use * s.P + tile.first) * D;
      tile_product<true>(s.micro_rows, n, D, rows, w.s.data(), 1, kKeyTile, w.dout.data(), D, dv, D);     // dv += P^T dO
      tile_product<true>(s.micro_rows, n, D, rows, w.dp.data(), 1, kKeyTile, w.q.data(), D, dk, D);       // dk += dS^T Q
      tile_product<true>(s.micro_rows, rows, D, n, w.dp.data(), kKeyTile, 1, keys.ptr, keys.ld, w.acc.data(), D);  // dq += dS K
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = hk * s.group + r / nq, i = i0 + r % nq;
      store_row<T>(w.acc.data() + r * D, D, p.scale, at_mut<T>(p.dq, b, i, h));
    }
  }
  for (int64_t j = 0; j < s.Tk; ++j) {
    store_row<T>(dk_own.data() + j * D, D, p.scale, at_mut<T>(p.dk, b, j, hk));
    store_row<T>(dv_own.data() + j * D, D, 1.0f, at_mut<T>(p.dv, b, j, hk));
  }
  float* pk = reinterpret_cast<float*>(p.dprefix_k_partial);
  float* pv = reinterpret_cast<float*>(p.dprefix_v_partial);
  for (int64_t m = 0; m < s.M; ++m) {
    for (int64_t pos = 0; pos < s.P; ++pos) {
      const int64_t off = (((b * s.M + m) * s.P + pos) * s.Hkv + hk) * D;
      store_row<float>(dk_pool.data() + (m * s.P + pos) * D, D, p.scale, pk + off);
      store_row<float>(dv_pool.data() + (m * s.P + pos) * D, D, 1.0f, pv + off);
    }
  }
}

// dprefix[s] = sum of partial[u] over the slot's uses u in ascending (b, m) order (0 + x1 + x2 ...).
template <class T>
void reduce_slot_item(const Params& p, const Dims& s, int64_t item) {
  const int64_t slot = item / s.P, pos = item % s.P;
  const int64_t row = s.Hkv * s.D;  // one (slot, position): all kv heads
  const int32_t* offsets = reinterpret_cast<const int32_t*>(p.slot_offsets);
  const int32_t* uses = reinterpret_cast<const int32_t*>(p.slot_uses);
  const float* parts[2] = {reinterpret_cast<const float*>(p.dprefix_k_partial),
                           reinterpret_cast<const float*>(p.dprefix_v_partial)};
  T* outs[2] = {reinterpret_cast<T*>(p.dprefix_k), reinterpret_cast<T*>(p.dprefix_v)};
  std::vector<float> acc((size_t)row);
  for (int t = 0; t < 2; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int32_t e = offsets[slot]; e < offsets[slot + 1]; ++e) {
      const float* src = parts[t] + ((int64_t)uses[e] * s.P + pos) * row;
      for (int64_t c = 0; c < row; ++c) acc[c] += src[c];
    }
    store_row<T>(acc.data(), row, 1.0f, outs[t] + (slot * s.P + pos) * row);
  }
}

template <class T>
void backward_impl(const Params& p, const Tiles& tiles) {
  const Dims s(p, tiles);
  parallel_for(s.B * s.Hkv, p.num_threads,
               [&](int64_t item) { backward_item<T>(p, s, item / s.Hkv, item % s.Hkv); });
  parallel_for(s.S * s.P, p.num_threads, [&](int64_t item) { reduce_slot_item<T>(p, s, item); });
}

template <template <class> class Impl>
void by_dtype(const Params& p, const Tiles& tiles) {
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0) throw std::invalid_argument("q_heads % kv_heads != 0");
  if (p.head_dim % kLanes != 0) throw std::invalid_argument("head_dim must be a multiple of 8");
  if (p.q_len > p.k_len) throw std::invalid_argument("q_len must be <= k_len");
  switch (p.dtype) {
    case kFloat32: return Impl<float>::run(p, tiles);
    case kFloat16: return Impl<half_t>::run(p, tiles);
    case kBFloat16: return Impl<bf16_t>::run(p, tiles);
  }
  throw std::invalid_argument("unsupported dtype code");
}

template <class T>
struct Forward {
  static void run(const Params& p, const Tiles& tiles) { forward_impl<T>(p, tiles); }
};
template <class T>
struct Backward {
  static void run(const Params& p, const Tiles& tiles) { backward_impl<T>(p, tiles); }
};

}  // namespace

void forward(const Params& p, const Tiles& tiles) { by_dtype<Forward>(p, tiles); }
void backward(const Params& p, const Tiles& tiles) { by_dtype<Backward>(p, tiles); }

std::vector<int> micro_row_choices() { return {cpu_math::kRowsFew, cpu_math::kRowsMany}; }

// Thread CPU seconds of `reps` forward S = Q K^T products of one query tile (GQA 4 x 32 rows, a key
// tile, D = 64: the shape of the benchmark and of most models) with micro_rows rows per micro-tile.
// CPU time, not wall time, so that another process sharing the core does not decide the choice.
double time_micro_rows(int micro_rows, int reps) {
  constexpr int64_t rows = 128, d = 64;
  std::vector<float> q(rows * d), kt(d * kKeyTile), s(rows * kKeyTile);
  for (size_t i = 0; i < q.size(); ++i) q[i] = (float)(i % 7) * 0.125f;
  for (size_t i = 0; i < kt.size(); ++i) kt[i] = (float)(i % 5) * 0.25f;
  timespec start, end;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &start);
  for (int r = 0; r < reps; ++r)
    tile_product<false>(micro_rows, rows, kKeyTile, d, q.data(), d, 1, kt.data(), kKeyTile, s.data(), kKeyTile);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &end);
  return (double)(end.tv_sec - start.tv_sec) + 1e-9 * (double)(end.tv_nsec - start.tv_nsec);
}

}  // namespace FASTMEM_CPU_ISA
}  // namespace cpu
}  // namespace pa
}  // namespace fastmem
