// CPU backend of prefix attention: tiles of keys / queries converted to fp32 scratch buffers, the math
// from prefix_attention_tile.h, work items spread over std::thread workers.
//
// Determinism: every output element is written by exactly one work item, and an item's arithmetic
// depends only on fixed tile grids (keys in tiles of kKeyTile aligned at 0 in each segment, queries
// in tiles of kQueryTile aligned at 0), never on the thread that runs it or on the thread count.
// Pool gradients go through fp32 per-use partials reduced per slot in (b, m) order, which gives the
// same bits as kernels/prefix_attention_ref.py::sum_into_slots followed by a cast.
#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "prefix_attention.h"
#include "prefix_attention_tile.h"

namespace fastmem {
namespace pa {
namespace cpu {
namespace {

constexpr int64_t kKeyTile = 64;    // keys per tile (fp32 scratch: 2 * 64 * D floats)
constexpr int64_t kQueryTile = 32;  // queries per work item (per head of the GQA group)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs f(item) for item in [0, n) on up to `threads` threads (the caller's thread included).
// Items are handed out dynamically; results must not depend on which thread runs an item.
template <class F>
void parallel_for(int64_t n, int threads, const F& f) {
  if (n <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (workers == 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    try {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(n);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

template <class T>
const T* at(const TensorArg& t, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<const T*>(t.ptr) + a * t.stride0 + b * t.stride1 + c * t.stride2;
}
template <class T>
T* at_mut(const TensorArg& t, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<T*>(t.ptr) + a * t.stride0 + b * t.stride1 + c * t.stride2;
}

// Converts rows [r0, r0 + n) of dimension 1 of `t` (fixed dim0 = a, dim2 = h) into dst (ld = d).
template <class T>
void load_tile(const TensorArg& t, int64_t a, int64_t r0, int64_t n, int64_t h, int64_t d, float* dst) {
  for (int64_t r = 0; r < n; ++r) load_row<T>(at<T>(t, a, r0 + r, h), d, dst + r * d);
}

struct Dims {
  int64_t B, Tq, Tk, Hq, Hkv, D, S, P, M, group;
  explicit Dims(const Params& p)
      : B(p.batch), Tq(p.q_len), Tk(p.k_len), Hq(p.q_heads), Hkv(p.kv_heads), D(p.head_dim),
        S(p.num_slots), P(p.prefix_len), M(p.uses), group(p.q_heads / p.kv_heads) {}
};

// Visits every key tile row b's queries [i0, i0 + nq) may see, in the fixed order
// (pool entries m = 0..M-1, then own keys). visit(keys TensorArg, dim0, first row, n, own) with
// own = false for pool tiles (all rows visible), true for own-key tiles starting at key j0.
template <class Visit>
void for_each_key_tile(const Params& p, const Dims& s, int64_t b, int64_t i_last, const Visit& visit) {
  const int32_t* index = reinterpret_cast<const int32_t*>(p.index);
  const int32_t* lens = reinterpret_cast<const int32_t*>(p.lens);
  for (int64_t m = 0; m < s.M; ++m) {
    const int32_t slot = index[b * s.M + m];
    const int64_t len = slot_visible_len(slot, lens);
    for (int64_t p0 = 0; p0 < len; p0 += kKeyTile)
      visit(p.prefix_k, p.prefix_v, (int64_t)slot, p0, std::min(kKeyTile, len - p0), false);
  }
  const int64_t key_start = reinterpret_cast<const int32_t*>(p.key_start)[b];
  const int64_t j_end = own_key_end(i_last, s.Tq, s.Tk, p.causal);
  for (int64_t j0 = (key_start / kKeyTile) * kKeyTile; j0 < j_end; j0 += kKeyTile)
    visit(p.k, p.v, b, j0, std::min(kKeyTile, j_end - j0), true);
}

// ---------------------------------------------------------------------------------------------
// Forward: item = (b, kv head, query tile); rows = the GQA group's heads x the tile's queries.
// ---------------------------------------------------------------------------------------------
template <class T>
void forward_impl(const Params& p) {
  const Dims s(p);
  const int64_t D = s.D;
  const int64_t nqb = ceil_div(s.Tq, kQueryTile);
  float* lse = reinterpret_cast<float*>(p.lse);
  const int32_t* key_start = reinterpret_cast<const int32_t*>(p.key_start);

  parallel_for(s.B * s.Hkv * nqb, p.num_threads, [&](int64_t item) {
    const int64_t qb = item % nqb, hk = (item / nqb) % s.Hkv, b = item / (nqb * s.Hkv);
    const int64_t i0 = qb * kQueryTile, nq = std::min(kQueryTile, s.Tq - i0), rows = s.group * nq;
    std::vector<float> buf((size_t)(2 * rows * D + 2 * kKeyTile * D + kKeyTile));
    float* qf = buf.data();
    float* acc = qf + rows * D;
    float* kt = acc + rows * D;
    float* vt = kt + kKeyTile * D;
    float* scratch = vt + kKeyTile * D;
    std::vector<SoftmaxRow> st((size_t)rows);
    for (int64_t g = 0; g < s.group; ++g)
      load_tile<T>(p.q, b, i0, nq, hk * s.group + g, D, qf + g * nq * D);
    for (int64_t r = 0; r < rows; ++r) {
      zero_row(acc + r * D, D);
      softmax_row_init(&st[r]);
    }
    const int64_t ks = key_start[b];
    for_each_key_tile(p, s, b, i0 + nq - 1,
                      [&](const TensorArg& kk, const TensorArg& vv, int64_t a, int64_t j0, int64_t n,
                          bool own) {
                        load_tile<T>(kk, a, j0, n, hk, D, kt);
                        load_tile<T>(vv, a, j0, n, hk, D, vt);
                        for (int64_t r = 0; r < rows; ++r) {
                          int64_t lo = 0, hi = n;
                          if (own)
                            own_tile_key_range(i0 + r % nq, j0, n, s.Tq, s.Tk, ks, p.causal, &lo, &hi);
                          fwd_row_tile(qf + r * D, kt, vt, D, lo, hi, D, p.scale, scratch, &st[r],
                                       acc + r * D);
                        }
                      });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = hk * s.group + r / nq, i = i0 + r % nq;
      fwd_row_finish<T>(st[r], acc + r * D, D, at_mut<T>(p.out, b, i, h), lse + (b * s.Hq + h) * s.Tq + i);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------

// dq for item = (b, kv head, query tile), same tiling as the forward.
template <class T>
void dq_item(const Params& p, const Dims& s, int64_t item) {
  const int64_t D = s.D;
  const int64_t nqb = ceil_div(s.Tq, kQueryTile);
  const int64_t qb = item % nqb, hk = (item / nqb) % s.Hkv, b = item / (nqb * s.Hkv);
  const int64_t i0 = qb * kQueryTile, nq = std::min(kQueryTile, s.Tq - i0), rows = s.group * nq;
  const float* lse = reinterpret_cast<const float*>(p.lse);
  const float* delta = reinterpret_cast<const float*>(p.delta);
  std::vector<float> buf((size_t)(3 * rows * D + 2 * kKeyTile * D + kKeyTile + 2 * rows));
  float* qf = buf.data();
  float* dof = qf + rows * D;
  float* acc = dof + rows * D;
  float* kt = acc + rows * D;
  float* vt = kt + kKeyTile * D;
  float* scratch = vt + kKeyTile * D;
  float* row_lse = scratch + kKeyTile;
  float* row_delta = row_lse + rows;
  for (int64_t g = 0; g < s.group; ++g) {
    const int64_t h = hk * s.group + g;
    load_tile<T>(p.q, b, i0, nq, h, D, qf + g * nq * D);
    load_tile<T>(p.grad_out, b, i0, nq, h, D, dof + g * nq * D);
    for (int64_t ii = 0; ii < nq; ++ii) {
      row_lse[g * nq + ii] = lse[(b * s.Hq + h) * s.Tq + i0 + ii];
      row_delta[g * nq + ii] = delta[(b * s.Hq + h) * s.Tq + i0 + ii];
    }
  }
  for (int64_t r = 0; r < rows; ++r) zero_row(acc + r * D, D);
  const int64_t ks = reinterpret_cast<const int32_t*>(p.key_start)[b];
  for_each_key_tile(p, s, b, i0 + nq - 1,
                    [&](const TensorArg& kk, const TensorArg& vv, int64_t a, int64_t j0, int64_t n,
                        bool own) {
                      load_tile<T>(kk, a, j0, n, hk, D, kt);
                      load_tile<T>(vv, a, j0, n, hk, D, vt);
                      for (int64_t r = 0; r < rows; ++r) {
                        int64_t lo = 0, hi = n;
                        if (own) own_tile_key_range(i0 + r % nq, j0, n, s.Tq, s.Tk, ks, p.causal, &lo, &hi);
                        bwd_dq_row_tile(qf + r * D, dof + r * D, row_lse[r], row_delta[r], kt, vt, D, lo,
                                        hi, D, p.scale, scratch, acc + r * D);
                      }
                    });
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = hk * s.group + r / nq, i = i0 + r % nq;
    bwd_dq_row_finish<T>(acc + r * D, D, p.scale, at_mut<T>(p.dq, b, i, h));
  }
}

// dk/dv of one block of nk keys (fp32 rows kf/vf) of row b against the queries of every head of the
// GQA group, starting at query tile `first_tile`. query_range(j_row, i0, nq, &lo, &hi) gives the
// visible query rows of a tile for key row j_row (lo >= hi: the key is invisible).
template <class T, class QueryRange>
void dkdv_block(const Params& p, const Dims& s, int64_t b, int64_t hk, int64_t first_tile, int64_t nk,
                const float* kf, const float* vf, float* dk_acc, float* dv_acc,
                const QueryRange& query_range) {
  const int64_t D = s.D;
  const float* lse = reinterpret_cast<const float*>(p.lse);
  const float* delta = reinterpret_cast<const float*>(p.delta);
  std::vector<float> buf((size_t)(2 * kQueryTile * D + 4 * kQueryTile));
  float* qt = buf.data();
  float* dot_ = qt + kQueryTile * D;
  float* lse_t = dot_ + kQueryTile * D;
  float* delta_t = lse_t + kQueryTile;
  float* sp = delta_t + kQueryTile;
  float* sds = sp + kQueryTile;
  for (int64_t r = 0; r < nk; ++r) {
    zero_row(dk_acc + r * D, D);
    zero_row(dv_acc + r * D, D);
  }
  for (int64_t g = 0; g < s.group; ++g) {
    const int64_t h = hk * s.group + g;
    for (int64_t i0 = first_tile * kQueryTile; i0 < s.Tq; i0 += kQueryTile) {
      const int64_t nq = std::min(kQueryTile, s.Tq - i0);
      load_tile<T>(p.q, b, i0, nq, h, D, qt);
      load_tile<T>(p.grad_out, b, i0, nq, h, D, dot_);
      for (int64_t ii = 0; ii < nq; ++ii) {
        lse_t[ii] = lse[(b * s.Hq + h) * s.Tq + i0 + ii];
        delta_t[ii] = delta[(b * s.Hq + h) * s.Tq + i0 + ii];
      }
      for (int64_t r = 0; r < nk; ++r) {
        int64_t lo, hi;
        query_range(r, i0, nq, &lo, &hi);
        bwd_dkdv_row_tile(kf + r * D, vf + r * D, qt, dot_, D, lse_t, delta_t, lo, hi, D, p.scale, sp,
                          sds, dk_acc + r * D, dv_acc + r * D);
      }
    }
  }
}

// dk/dv of row b's own keys: item = (b, kv head, key tile).
template <class T>
void dkdv_own_item(const Params& p, const Dims& s, int64_t item) {
  const int64_t D = s.D;
  const int64_t nkb = ceil_div(s.Tk, kKeyTile);
  const int64_t kb = item % nkb, hk = (item / nkb) % s.Hkv, b = item / (nkb * s.Hkv);
  const int64_t j0 = kb * kKeyTile, nk = std::min(kKeyTile, s.Tk - j0);
  const int64_t ks = reinterpret_cast<const int32_t*>(p.key_start)[b];
  std::vector<float> buf((size_t)(4 * nk * D));
  float* kf = buf.data();
  float* vf = kf + nk * D;
  float* dk_acc = vf + nk * D;
  float* dv_acc = dk_acc + nk * D;
  if (j0 + nk > ks) {
    load_tile<T>(p.k, b, j0, nk, hk, D, kf);
    load_tile<T>(p.v, b, j0, nk, hk, D, vf);
    const int64_t first_tile = own_key_first_query(std::max(j0, ks), s.Tq, s.Tk, p.causal) / kQueryTile;
    dkdv_block<T>(p, s, b, hk, first_tile, nk, kf, vf, dk_acc, dv_acc,
                  [&](int64_t r, int64_t i0, int64_t nq, int64_t* lo, int64_t* hi) {
                    own_tile_query_range(j0 + r, i0, nq, s.Tq, s.Tk, ks, p.causal, lo, hi);
                  });
  } else {
    std::fill(buf.begin(), buf.end(), 0.0f);  // keys before key_start: no query sees them
  }
  for (int64_t r = 0; r < nk; ++r) {
    store_row<T>(dk_acc + r * D, D, p.scale, at_mut<T>(p.dk, b, j0 + r, hk));
    store_row<T>(dv_acc + r * D, D, 1.0f, at_mut<T>(p.dv, b, j0 + r, hk));
  }
}

// fp32 partial pool gradients of use (b, m): item = ((b, m), kv head, key tile over P).
template <class T>
void dkdv_pool_item(const Params& p, const Dims& s, int64_t item) {
  const int64_t D = s.D;
  const int64_t npb = ceil_div(s.P, kKeyTile);
  const int64_t pb = item % npb, hk = (item / npb) % s.Hkv, use = item / (npb * s.Hkv);
  const int64_t b = use / s.M;
  const int64_t p0 = pb * kKeyTile, nk = std::min(kKeyTile, s.P - p0);
  const int32_t slot = reinterpret_cast<const int32_t*>(p.index)[use];
  const int64_t len = slot_visible_len(slot, reinterpret_cast<const int32_t*>(p.lens));
  const int64_t nvis = std::max<int64_t>(0, std::min(nk, len - p0));  // visible rows [0, nvis)
  std::vector<float> buf((size_t)(4 * nk * D), 0.0f);
  float* kf = buf.data();
  float* vf = kf + nk * D;
  float* dk_acc = vf + nk * D;
  float* dv_acc = dk_acc + nk * D;
  if (nvis > 0) {
    load_tile<T>(p.prefix_k, slot, p0, nvis, hk, D, kf);
    load_tile<T>(p.prefix_v, slot, p0, nvis, hk, D, vf);
    dkdv_block<T>(p, s, b, hk, 0, nvis, kf, vf, dk_acc, dv_acc,
                  [&](int64_t, int64_t, int64_t nq, int64_t* lo, int64_t* hi) {
                    *lo = 0;
                    *hi = nq;
                  });
  }
  float* pk = reinterpret_cast<float*>(p.dprefix_k_partial);
  float* pv = reinterpret_cast<float*>(p.dprefix_v_partial);
  for (int64_t r = 0; r < nk; ++r) {
    const int64_t off = ((use * s.P + p0 + r) * s.Hkv + hk) * D;
    store_row<float>(dk_acc + r * D, D, p.scale, pk + off);
    store_row<float>(dv_acc + r * D, D, 1.0f, pv + off);
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
void backward_impl(const Params& p) {
  const Dims s(p);
  // 1. delta[b, h, i] = rowsum(dO * O), fp32.
  float* delta = reinterpret_cast<float*>(p.delta);
  parallel_for(s.B * s.Hq, p.num_threads, [&](int64_t item) {
    const int64_t b = item / s.Hq, h = item % s.Hq;
    for (int64_t i = 0; i < s.Tq; ++i)
      delta[item * s.Tq + i] = dot_rows<T>(at<T>(p.grad_out, b, i, h), at<T>(p.out, b, i, h), s.D);
  });
  // 2. dq, own dk/dv and per-use pool partials: independent outputs, one pass.
  const int64_t n_dq = s.B * s.Hkv * ceil_div(s.Tq, kQueryTile);
  const int64_t n_own = s.B * s.Hkv * ceil_div(s.Tk, kKeyTile);
  const int64_t n_pool = s.B * s.M * s.Hkv * ceil_div(s.P, kKeyTile);
  // Heavy items first: pool and own-key items cost about a query tile's dq each or more.
  parallel_for(n_pool + n_own + n_dq, p.num_threads, [&](int64_t item) {
    if (item < n_pool) return dkdv_pool_item<T>(p, s, item);
    item -= n_pool;
    if (item < n_own) return dkdv_own_item<T>(p, s, item);
    dq_item<T>(p, s, item - n_own);
  });
  // 3. Deterministic per-slot reduction of the partials.
  parallel_for(s.S * s.P, p.num_threads, [&](int64_t item) { reduce_slot_item<T>(p, s, item); });
}

void check(const Params& p) {
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0) throw std::invalid_argument("q_heads % kv_heads != 0");
  if (p.head_dim % kLanes != 0) throw std::invalid_argument("head_dim must be a multiple of 8");
  if (p.q_len > p.k_len) throw std::invalid_argument("q_len must be <= k_len");
}

}  // namespace

void forward(const Params& p) {
  check(p);
  switch (p.dtype) {
    case kFloat32: return forward_impl<float>(p);
    case kFloat16: return forward_impl<half_t>(p);
    case kBFloat16: return forward_impl<bf16_t>(p);
  }
  throw std::invalid_argument("unsupported dtype code");
}

void backward(const Params& p) {
  check(p);
  switch (p.dtype) {
    case kFloat32: return backward_impl<float>(p);
    case kFloat16: return backward_impl<half_t>(p);
    case kBFloat16: return backward_impl<bf16_t>(p);
  }
  throw std::invalid_argument("unsupported dtype code");
}

}  // namespace cpu
}  // namespace pa
}  // namespace fastmem
