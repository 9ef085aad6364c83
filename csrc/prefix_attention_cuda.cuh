// CUDA kernels of prefix attention: the per-row math of prefix_attention_tile.h, one thread per query
// row (forward, dq) or per key row (dk/dv), key/query tiles staged in shared memory as fp32.
//
// This header holds only kernels (no launches, no runtime calls), so a host emulation can compile it
// too; prefix_attention_cuda.cu launches them. Layout: blockDim.x == kRows; the block index x enumerates
// (batch row or pool use, head, row block) with the row block fastest. A grid beyond the hardware limits
// runs as several launches (launch_grid.h): every kernel takes its launch's BlockOffset and indexes
// blocks as offset + blockIdx, so a cut grid computes the bits of an uncut one.
//
// Determinism: no atomics; every output element is written by one thread whose loop order is fixed.
// Pool gradients: per-use fp32 partials, then `reduce_slots_kernel` sums each slot's uses in
// ascending (b, m) order (the order of kernels/prefix_attention_ref.py::sum_into_slots).
#pragma once

#include <cstdint>
#include <stdexcept>

#include "launch_grid.h"
#include "prefix_attention.h"
#include "prefix_attention_tile.h"

namespace fastmem {
namespace pa {
namespace cuda {

constexpr int kRows = 64;  // threads per block = query (or key) rows per block

// Per head-dim bucket: fp32 rows are padded to DMAX floats; a shared tile holds kTile rows so that
// two tiles take 32 KiB of shared memory.
template <int DMAX>
struct TileConfig {
  static constexpr int kTile = 4096 / DMAX;
};

FM_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
__device__ __forceinline__ const T* tensor_row(const TensorArg& t, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<const T*>(t.ptr) + a * t.stride0 + b * t.stride1 + c * t.stride2;
}
template <class T>
__device__ __forceinline__ T* tensor_row_mut(const TensorArg& t, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<T*>(t.ptr) + a * t.stride0 + b * t.stride1 + c * t.stride2;
}

// All threads of the block: rows [r0, r0 + n) of dimension 1 of t (dim0 = a, dim2 = h) -> smem
// rows of DMAX floats. Callers __syncthreads() before (buffer reuse) and after (visibility).
template <class T, int DMAX>
__device__ __forceinline__ void load_tile(const TensorArg& t, int64_t a, int64_t r0, int64_t n, int64_t h,
                                          int64_t d, float* smem) {
  for (int64_t e = threadIdx.x; e < n * d; e += blockDim.x) {
    const int64_t r = e / d, c = e - r * d;
    smem[r * DMAX + c] = to_f32(tensor_row<T>(t, a, r0 + r, h)[c]);
  }
}

// Shared part of the forward and dq kernels: visits each key tile row b's query block may see, in
// the fixed order (pool entries m = 0..M-1, then own keys from the tile holding key_start), staging
// k and v in shared memory; calls visit(n, j0, own) after the tile is visible to every thread.
template <class T, int DMAX, class Visit>
__device__ __forceinline__ void for_each_key_tile(const Params& p, int64_t b, int64_t hk, int64_t i_last,
                                                  float* ks, float* vs, const Visit& visit) {
  constexpr int kTile = TileConfig<DMAX>::kTile;
  const int32_t* index = reinterpret_cast<const int32_t*>(p.index);
  const int32_t* lens = reinterpret_cast<const int32_t*>(p.lens);
  const int64_t d = p.head_dim;
  for (int64_t m = 0; m < p.uses; ++m) {
    const int32_t slot = index[b * p.uses + m];
    const int64_t len = slot_visible_len(slot, lens);
    for (int64_t p0 = 0; p0 < len; p0 += kTile) {
      const int64_t n = min64(kTile, len - p0);
      __syncthreads();
      load_tile<T, DMAX>(p.prefix_k, slot, p0, n, hk, d, ks);
      load_tile<T, DMAX>(p.prefix_v, slot, p0, n, hk, d, vs);
      __syncthreads();
      visit(n, p0, false);
    }
  }
  const int64_t key_start = reinterpret_cast<const int32_t*>(p.key_start)[b];
  const int64_t j_end = own_key_end(i_last, p.q_len, p.k_len, p.causal);
  for (int64_t j0 = (key_start / kTile) * kTile; j0 < j_end; j0 += kTile) {
    const int64_t n = min64(kTile, j_end - j0);
    __syncthreads();
    load_tile<T, DMAX>(p.k, b, j0, n, hk, d, ks);
    load_tile<T, DMAX>(p.v, b, j0, n, hk, d, vs);
    __syncthreads();
    visit(n, j0, true);
  }
}

// The query row of this thread in the forward and dq kernels: block = (b, query head, block of kRows
// queries), thread = one query row (inactive past q_len, but it still takes part in the tile loads).
struct QueryRow {
  int64_t b, h, hk, i, i_last, key_start;
  bool active;
  __device__ QueryRow(const Params& p, const BlockOffset& at) {
    const int64_t nqb = ceil_div(p.q_len, kRows);
    const int64_t bid = at.x + blockIdx.x, qb = bid % nqb;
    h = (bid / nqb) % p.q_heads;
    b = bid / (nqb * p.q_heads);
    hk = h / (p.q_heads / p.kv_heads);
    i = qb * kRows + threadIdx.x;
    i_last = min64(p.q_len, (qb + 1) * kRows) - 1;
    active = i < p.q_len;
    key_start = reinterpret_cast<const int32_t*>(p.key_start)[b];
  }
  // Visible rows [lo, hi) of a key tile of n keys from j0: all of a pool tile, the masked range of an
  // own-key tile.
  __device__ void key_range(const Params& p, int64_t n, int64_t j0, bool own, int64_t* lo, int64_t* hi) const {
    *lo = 0;
    *hi = n;
    if (own) own_tile_key_range(i, j0, n, p.q_len, p.k_len, key_start, p.causal, lo, hi);
  }
};

// Forward: block = (b, query head, block of kRows queries), thread = one query row.
template <class T, int DMAX>
__global__ void __launch_bounds__(kRows) forward_kernel(const Params p, const BlockOffset at) {
  constexpr int kTile = TileConfig<DMAX>::kTile;
  __shared__ float ks[kTile * DMAX];
  __shared__ float vs[kTile * DMAX];
  const QueryRow row(p, at);
  const int64_t b = row.b, h = row.h, i = row.i, d = p.head_dim;
  const bool active = row.active;

  float q[DMAX], acc[DMAX], scratch[kTile];
  SoftmaxRow st;
  softmax_row_init(&st);
  zero_row(acc, d);
  if (active) load_row<T>(tensor_row<T>(p.q, b, i, h), d, q);

  for_each_key_tile<T, DMAX>(p, b, row.hk, row.i_last, ks, vs, [&](int64_t n, int64_t j0, bool own) {
    if (!active) return;
    int64_t lo, hi;
    row.key_range(p, n, j0, own, &lo, &hi);
    fwd_row_tile(q, ks, vs, DMAX, lo, hi, d, p.scale, scratch, &st, acc);
  });
  if (active)
    fwd_row_finish<T>(st, acc, d, tensor_row_mut<T>(p.out, b, i, h),
                      reinterpret_cast<float*>(p.lse) + (b * p.q_heads + h) * p.q_len + i);
}

// delta[b, h, i] = rowsum(dO * O): one thread per (b, h, i).
template <class T>
__global__ void delta_kernel(const Params p, const BlockOffset at) {
  const int64_t idx = (at.x + blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.q_heads * p.q_len) return;
  const int64_t i = idx % p.q_len, h = (idx / p.q_len) % p.q_heads, b = idx / (p.q_len * p.q_heads);
  reinterpret_cast<float*>(p.delta)[idx] =
      dot_rows<T>(tensor_row<T>(p.grad_out, b, i, h), tensor_row<T>(p.out, b, i, h), p.head_dim);
}

// dq: same blocks and key tiles as the forward.
template <class T, int DMAX>
__global__ void __launch_bounds__(kRows) dq_kernel(const Params p, const BlockOffset at) {
  constexpr int kTile = TileConfig<DMAX>::kTile;
  __shared__ float ks[kTile * DMAX];
  __shared__ float vs[kTile * DMAX];
  const QueryRow row(p, at);
  const int64_t b = row.b, h = row.h, i = row.i, d = p.head_dim;
  const bool active = row.active;

  float q[DMAX], dout[DMAX], acc[DMAX], scratch[kTile];
  float lse = 0.0f, delta = 0.0f;
  zero_row(acc, d);
  if (active) {
    load_row<T>(tensor_row<T>(p.q, b, i, h), d, q);
    load_row<T>(tensor_row<T>(p.grad_out, b, i, h), d, dout);
    const int64_t at = (b * p.q_heads + h) * p.q_len + i;
    lse = reinterpret_cast<const float*>(p.lse)[at];
    delta = reinterpret_cast<const float*>(p.delta)[at];
  }
  for_each_key_tile<T, DMAX>(p, b, row.hk, row.i_last, ks, vs, [&](int64_t n, int64_t j0, bool own) {
    if (!active) return;
    int64_t lo, hi;
    row.key_range(p, n, j0, own, &lo, &hi);
    bwd_dq_row_tile(q, dout, lse, delta, ks, vs, DMAX, lo, hi, d, p.scale, scratch, acc);
  });
  if (active) bwd_dq_row_finish<T>(acc, d, p.scale, tensor_row_mut<T>(p.dq, b, i, h));
}

// Shared part of the dk/dv kernels: for the thread's key row (k, v in registers / local memory),
// loops over every head of the GQA group and over query tiles from `first_query` on (tile grid
// aligned at 0), staging q, dO, lse and delta in shared memory. query_range(i0, n, &lo, &hi) gives the
// visible rows of a query tile for this thread's key (lo >= hi: none; threads without a key return
// lo = hi = 0 but still take part in the loads and barriers).
template <class T, int DMAX, class QueryRange>
__device__ __forceinline__ void dkdv_loop(const Params& p, int64_t b, int64_t hk, int64_t first_query,
                                          const float* k, const float* v, float* dk, float* dv,
                                          float* qs, float* dos, float* lse_s, float* delta_s,
                                          const QueryRange& query_range) {
  constexpr int kTile = TileConfig<DMAX>::kTile;
  const int64_t d = p.head_dim;
  const int64_t group = p.q_heads / p.kv_heads;
  float sp[kTile], sds[kTile];
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    const float* lse = reinterpret_cast<const float*>(p.lse) + (b * p.q_heads + h) * p.q_len;
    const float* delta = reinterpret_cast<const float*>(p.delta) + (b * p.q_heads + h) * p.q_len;
    for (int64_t i0 = (first_query / kTile) * kTile; i0 < p.q_len; i0 += kTile) {
      const int64_t n = min64(kTile, p.q_len - i0);
      __syncthreads();
      load_tile<T, DMAX>(p.q, b, i0, n, h, d, qs);
      load_tile<T, DMAX>(p.grad_out, b, i0, n, h, d, dos);
      for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
        lse_s[r] = lse[i0 + r];
        delta_s[r] = delta[i0 + r];
      }
      __syncthreads();
      int64_t lo, hi;
      query_range(i0, n, &lo, &hi);
      bwd_dkdv_row_tile(k, v, qs, dos, DMAX, lse_s, delta_s, lo, hi, d, p.scale, sp, sds, dk, dv);
    }
  }
}

// dk/dv of own keys: block = (b, kv head, block of kRows keys), thread = one key row.
template <class T, int DMAX>
__global__ void __launch_bounds__(kRows) dkdv_own_kernel(const Params p, const BlockOffset at) {
  constexpr int kTile = TileConfig<DMAX>::kTile;
  __shared__ float qs[kTile * DMAX];
  __shared__ float dos[kTile * DMAX];
  __shared__ float lse_s[kTile];
  __shared__ float delta_s[kTile];
  const int64_t nkb = ceil_div(p.k_len, kRows);
  const int64_t bid = at.x + blockIdx.x;
  const int64_t kb = bid % nkb, hk = (bid / nkb) % p.kv_heads, b = bid / (nkb * p.kv_heads);
  const int64_t j = kb * kRows + threadIdx.x;
  const int64_t j_block_end = min64(p.k_len, (kb + 1) * kRows);
  const int64_t key_start = reinterpret_cast<const int32_t*>(p.key_start)[b];
  const bool has_row = j < p.k_len;
  const bool visible = has_row && j >= key_start;
  const int64_t d = p.head_dim;

  float k[DMAX], v[DMAX], dk[DMAX], dv[DMAX];
  zero_row(dk, d);
  zero_row(dv, d);
  if (visible) {
    load_row<T>(tensor_row<T>(p.k, b, j, hk), d, k);
    load_row<T>(tensor_row<T>(p.v, b, j, hk), d, v);
  }
  const int64_t first_key = max64(kb * kRows, key_start);  // block-uniform
  if (first_key < j_block_end) {
    dkdv_loop<T, DMAX>(p, b, hk, own_key_first_query(first_key, p.q_len, p.k_len, p.causal), k, v, dk, dv,
                       qs, dos, lse_s, delta_s, [&](int64_t i0, int64_t n, int64_t* lo, int64_t* hi) {
                         *lo = 0;
                         *hi = 0;
                         if (visible) own_tile_query_range(j, i0, n, p.q_len, p.k_len, key_start, p.causal, lo, hi);
                       });
  }
  if (has_row) {
    store_row<T>(dk, d, p.scale, tensor_row_mut<T>(p.dk, b, j, hk));
    store_row<T>(dv, d, 1.0f, tensor_row_mut<T>(p.dv, b, j, hk));
  }
}

// fp32 per-use pool partials: block = (use b * M + m, kv head, block of kRows positions).
template <class T, int DMAX>
__global__ void __launch_bounds__(kRows) dkdv_pool_kernel(const Params p, const BlockOffset at) {
  constexpr int kTile = TileConfig<DMAX>::kTile;
  __shared__ float qs[kTile * DMAX];
  __shared__ float dos[kTile * DMAX];
  __shared__ float lse_s[kTile];
  __shared__ float delta_s[kTile];
  const int64_t npb = ceil_div(p.prefix_len, kRows);
  const int64_t bid = at.x + blockIdx.x;
  const int64_t pb = bid % npb, hk = (bid / npb) % p.kv_heads, use = bid / (npb * p.kv_heads);
  const int64_t b = use / p.uses;
  const int32_t slot = reinterpret_cast<const int32_t*>(p.index)[use];
  const int64_t len = slot_visible_len(slot, reinterpret_cast<const int32_t*>(p.lens));
  const int64_t pos = pb * kRows + threadIdx.x;
  const bool has_row = pos < p.prefix_len;
  const bool visible = pos < len;  // implies slot >= 0 and has_row
  const int64_t d = p.head_dim;

  float k[DMAX], v[DMAX], dk[DMAX], dv[DMAX];
  zero_row(dk, d);
  zero_row(dv, d);
  if (visible) {
    load_row<T>(tensor_row<T>(p.prefix_k, slot, pos, hk), d, k);
    load_row<T>(tensor_row<T>(p.prefix_v, slot, pos, hk), d, v);
  }
  if (pb * kRows < len) {  // block-uniform
    dkdv_loop<T, DMAX>(p, b, hk, 0, k, v, dk, dv, qs, dos, lse_s, delta_s,
                       [&](int64_t, int64_t n, int64_t* lo, int64_t* hi) {
                         *lo = 0;
                         *hi = visible ? n : 0;
                       });
  }
  if (has_row) {
    const int64_t off = ((use * p.prefix_len + pos) * p.kv_heads + hk) * d;
    store_row<float>(dk, d, p.scale, reinterpret_cast<float*>(p.dprefix_k_partial) + off);
    store_row<float>(dv, d, 1.0f, reinterpret_cast<float*>(p.dprefix_v_partial) + off);
  }
}

// dprefix[s, pos, hk, c] = 0 + partial[u1] + partial[u2] + ... over the slot's uses in (b, m) order.
// One thread per output element of one of the two pools (block index y: 0 = k, 1 = v).
template <class T>
__global__ void reduce_slots_kernel(const Params p, const BlockOffset at) {
  const int64_t row = p.kv_heads * p.head_dim;
  const int64_t idx = (at.x + blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.num_slots * p.prefix_len * row) return;
  const int64_t c = idx % row, pos = (idx / row) % p.prefix_len, slot = idx / (row * p.prefix_len);
  const bool is_k = (at.y + blockIdx.y) == 0;
  const float* part = reinterpret_cast<const float*>(is_k ? p.dprefix_k_partial : p.dprefix_v_partial);
  T* out = reinterpret_cast<T*>(is_k ? p.dprefix_k : p.dprefix_v);
  const int32_t* offsets = reinterpret_cast<const int32_t*>(p.slot_offsets);
  const int32_t* uses = reinterpret_cast<const int32_t*>(p.slot_uses);
  float acc = 0.0f;
  for (int32_t e = offsets[slot]; e < offsets[slot + 1]; ++e)
    acc += part[((int64_t)uses[e] * p.prefix_len + pos) * row + c];
  out[idx] = from_f32<T>(acc);
}

// ---------------------------------------------------------------------------------------------
// Launch plans: which kernels, how many blocks, in which order. Shared by the CUDA launcher in
// prefix_attention_cuda.cu and any host emulation, so both run the same grids. The plans call
// launch(kernel, blocks, threads_per_block, grid_y, name) for a grid of blocks x grid_y blocks
// (blocks == 0: nothing to run); `GridSplitter` cuts it by for_each_grid_chunk and hands each piece to
// the caller's launch_chunk(kernel, BlockOffset, blocks_x, blocks_y, threads_per_block, name), which
// must run kernels in call order (one stream).
// ---------------------------------------------------------------------------------------------
constexpr int kFlatThreads = 256;  // threads per block of the elementwise kernels

template <class LaunchChunk>
struct GridSplitter {
  const LaunchChunk& launch_chunk;
  GridLimits limits;
  template <class Kernel>
  void operator()(Kernel kernel, int64_t blocks, int threads, int64_t grid_y, const char* name) const {
    for_each_grid_chunk(blocks, grid_y, limits, [&](const BlockOffset& at, int64_t blocks_x, int64_t blocks_y) {
      launch_chunk(kernel, at, blocks_x, blocks_y, threads, name);
    });
  }
};

template <class T, int DMAX, class Launch>
void plan_forward(const Params& p, const Launch& launch) {
  launch(forward_kernel<T, DMAX>, p.batch * p.q_heads * ceil_div(p.q_len, kRows), kRows, 1, "forward_kernel");
}

template <class T, int DMAX, class Launch>
void plan_backward(const Params& p, const Launch& launch) {
  launch(delta_kernel<T>, ceil_div(p.batch * p.q_heads * p.q_len, kFlatThreads), kFlatThreads, 1, "delta_kernel");
  launch(dq_kernel<T, DMAX>, p.batch * p.q_heads * ceil_div(p.q_len, kRows), kRows, 1, "dq_kernel");
  launch(dkdv_own_kernel<T, DMAX>, p.batch * p.kv_heads * ceil_div(p.k_len, kRows), kRows, 1,
         "dkdv_own_kernel");
  launch(dkdv_pool_kernel<T, DMAX>, p.batch * p.uses * p.kv_heads * ceil_div(p.prefix_len, kRows), kRows, 1,
         "dkdv_pool_kernel");
  launch(reduce_slots_kernel<T>, ceil_div(p.num_slots * p.prefix_len * p.kv_heads * p.head_dim, kFlatThreads),
         kFlatThreads, 2, "reduce_slots_kernel");
}

// Picks the storage type from params.dtype and the head-dim bucket DMAX in {64, 128, 256}.
template <bool kBackward, class T, class Launch>
void plan_dim(const Params& p, const Launch& launch) {
  if (p.head_dim <= 64) return kBackward ? plan_backward<T, 64>(p, launch) : plan_forward<T, 64>(p, launch);
  if (p.head_dim <= 128) return kBackward ? plan_backward<T, 128>(p, launch) : plan_forward<T, 128>(p, launch);
  return kBackward ? plan_backward<T, 256>(p, launch) : plan_forward<T, 256>(p, launch);
}

// Runs the forward or backward plan of p through launch_chunk (see GridSplitter), every grid cut to `limits`.
template <bool kBackward, class LaunchChunk>
void plan(const Params& p, const LaunchChunk& launch_chunk, const GridLimits& limits = GridLimits{}) {
  const GridSplitter<LaunchChunk> launch{launch_chunk, limits};
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0) throw std::invalid_argument("q_heads % kv_heads != 0");
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % kLanes != 0)
    throw std::invalid_argument("head_dim must be a multiple of 8 in 8..256");
  if (p.q_len > p.k_len) throw std::invalid_argument("q_len must be <= k_len");
  switch (p.dtype) {
    case kFloat32: return plan_dim<kBackward, float>(p, launch);
    case kFloat16: return plan_dim<kBackward, half_t>(p, launch);
    case kBFloat16: return plan_dim<kBackward, bf16_t>(p, launch);
  }
  throw std::invalid_argument("unsupported dtype code");
}

}  // namespace cuda
}  // namespace pa
}  // namespace fastmem
