// Per-tile math of prefix attention: the CUDA kernels' algorithm, and the masks, conversions and
// softmax bookkeeping the CPU backend shares with them.
//
// `prefix_attention_cuda.cu` runs the row-tile functions below on every thread; on a machine without a
// GPU, tests/test_cuda_emulation.py runs those kernels through a host emulator against the fp64
// reference, so the arithmetic the GPU runs is tested on the CPU. The CPU backend
// (`prefix_attention_cpu.cpp`) uses the same masks and conversions around its own register-blocked
// tile products (cpu_tile_math.h). No torch, no CUDA runtime: plain `float` arrays in and out.
//
// Shapes (see docs/backend_contract.md): q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D], pool [S, P, Hkv, D].
// Row b attends to the first lens[s] positions of every slot s = index[b, m] >= 0 (in m order, no
// mask), then to its own keys j with j >= key_start[b] and, when causal, j <= i + Tk - Tq.
//
// Conventions used by every function here:
// - A "tile" is `n` consecutive keys (or queries) converted to fp32 and stored as rows of `ld` floats
//   (`ld >= d`; shared memory on the GPU, a scratch buffer on the CPU).
// - Visibility inside a tile is always a contiguous range [lo, hi) of tile rows (see the mask helpers),
//   so no per-element mask is needed and masked keys are never touched.
// - Dot products and row updates walk D in chunks of kLanes = 8 with 8 independent fp32 accumulators
//   combined in a fixed tree: D is a multiple of 8 by contract, the compiler can vectorize the chunk,
//   and the summation order is the same on every device and every thread count.
// - Softmax is base e on scaled scores s = (q . k) * scale; lse = max + log(sum) (natural log).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FM_HOST_DEVICE __host__ __device__
#define FM_INLINE __host__ __device__ __forceinline__
#else
#define FM_HOST_DEVICE
#define FM_INLINE inline
#endif

// Unroll the 8-lane chunks: nvcc's pragma in device code, the host compiler's in the CPU build
// (nothing in the host pass of a .cu, where these functions are not hot).
#if defined(__CUDA_ARCH__)
#define FM_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define FM_UNROLL
#elif defined(__clang__)
#define FM_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define FM_UNROLL _Pragma("GCC unroll 8")
#else
#define FM_UNROLL
#endif

// Each CPU ISA build compiles these inline functions with its own flags; FASTMEM_TILE_ABI (an inline
// namespace, set per build in CMakeLists.txt) gives every build its own symbols, so the linker never
// merges an AVX-512 copy into another build (or the reverse).
#ifndef FASTMEM_TILE_ABI
#define FASTMEM_TILE_ABI tile_default
#endif

namespace fastmem {
namespace pa {
inline namespace FASTMEM_TILE_ABI {

// dtype codes shared with the Python wrapper (fastmem/ops/native.py).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kLanes = 8;  // D is a multiple of 8 (contract), chunks never need a tail.

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 <-> fp32. Storage types are plain 16-bit words so the host build needs no CUDA header;
// conversions round to nearest even, like torch's `.to()`.
// ---------------------------------------------------------------------------------------------
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

FM_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
FM_INLINE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

FM_INLINE float half_bits_to_float(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t shifted_exp = 0x7c00u << 13;  // exponent mask after shift
  uint32_t o = (uint32_t)(h & 0x7fffu) << 13;  // exponent/mantissa bits
  const uint32_t exp = shifted_exp & o;
  o += (uint32_t)(127 - 15) << 23;  // exponent adjust
  if (exp == shifted_exp) {
    o += (uint32_t)(128 - 16) << 23;  // Inf/NaN: extra exponent adjust
  } else if (exp == 0) {
    o += 1u << 23;  // zero/subnormal: renormalize
    o = float_bits(bits_float(o) - bits_float(113u << 23));
  }
  o |= (uint32_t)(h & 0x8000u) << 16;
  return bits_float(o);
#endif
}

FM_INLINE uint16_t float_to_half_bits(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t f32_infty = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;                   // 2^16: first value past half range
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= f16_max) {
    o = (u > f32_infty) ? 0x7e00 : 0x7c00;  // NaN -> qNaN, overflow -> Inf
  } else if (u < (113u << 23)) {
    // Result is subnormal or zero: let the FPU round by adding a magic number.
    o = (uint16_t)(float_bits(bits_float(u) + bits_float(denorm_magic)) - denorm_magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += ((uint32_t)(15 - 127) << 23) + 0xfffu;  // rebias exponent, round bias
    u += mant_odd;                                 // ties to even
    o = (uint16_t)(u >> 13);
  }
  return (uint16_t)(o | (sign >> 16));
#endif
}

FM_INLINE float bf16_bits_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

FM_INLINE uint16_t float_to_bf16_bits(float f) {
#ifdef __CUDA_ARCH__
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                             // ties to even
  return (uint16_t)(u >> 16);
#endif
}

FM_INLINE float to_f32(float x) { return x; }
FM_INLINE float to_f32(half_t x) { return half_bits_to_float(x.bits); }
FM_INLINE float to_f32(bf16_t x) { return bf16_bits_to_float(x.bits); }

template <class T>
struct FromF32;
template <>
struct FromF32<float> {
  static FM_INLINE float apply(float x) { return x; }
};
template <>
struct FromF32<half_t> {
  static FM_INLINE half_t apply(float x) { return half_t{float_to_half_bits(x)}; }
};
template <>
struct FromF32<bf16_t> {
  static FM_INLINE bf16_t apply(float x) { return bf16_t{float_to_bf16_bits(x)}; }
};
template <class T>
FM_INLINE T from_f32(float x) {
  return FromF32<T>::apply(x);
}

// Converts one row of `d` elements to fp32.
template <class T>
FM_INLINE void load_row(const T* __restrict__ src, int64_t d, float* __restrict__ dst) {
  for (int64_t c = 0; c < d; ++c) dst[c] = to_f32(src[c]);
}

// Writes one fp32 row times `mul` to storage type T.
template <class T>
FM_INLINE void store_row(const float* __restrict__ src, int64_t d, float mul, T* __restrict__ dst) {
  for (int64_t c = 0; c < d; ++c) dst[c] = from_f32<T>(src[c] * mul);
}

FM_INLINE void zero_row(float* __restrict__ dst, int64_t d) {
  for (int64_t c = 0; c < d; ++c) dst[c] = 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Fixed-order reductions over D.
// ---------------------------------------------------------------------------------------------
FM_INLINE float combine_lanes(const float* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sum_c a[c] * b[c], d % 8 == 0, 8 lane accumulators then a fixed tree.
FM_INLINE float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t d) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t c = 0; c < d; c += kLanes) {
FM_UNROLL
    for (int l = 0; l < kLanes; ++l) acc[l] += a[c + l] * b[c + l];
  }
  return combine_lanes(acc);
}

// Same as `dot` on two rows still in storage type T (used for delta = rowsum(dO * O)).
template <class T>
FM_INLINE float dot_rows(const T* __restrict__ a, const T* __restrict__ b, int64_t d) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t c = 0; c < d; c += kLanes) {
FM_UNROLL
    for (int l = 0; l < kLanes; ++l) acc[l] += to_f32(a[c + l]) * to_f32(b[c + l]);
  }
  return combine_lanes(acc);
}

// acc[c] = acc[c] * alpha + sum_{r in [lo, hi)} w[r] * rows[r * ld + c], summed in r order.
// Walking D in register-sized chunks keeps the partial sums out of memory on the CPU.
FM_INLINE void accumulate_rows(float* __restrict__ acc, float alpha, const float* __restrict__ w,
                               const float* __restrict__ rows, int64_t ld, int64_t lo, int64_t hi,
                               int64_t d) {
  for (int64_t c = 0; c < d; c += kLanes) {
    float a[kLanes];
FM_UNROLL
    for (int l = 0; l < kLanes; ++l) a[l] = acc[c + l] * alpha;
    for (int64_t r = lo; r < hi; ++r) {
      const float wr = w[r];
      const float* __restrict__ row = rows + r * ld + c;
FM_UNROLL
      for (int l = 0; l < kLanes; ++l) a[l] += wr * row[l];
    }
FM_UNROLL
    for (int l = 0; l < kLanes; ++l) acc[c + l] = a[l];
  }
}

// ---------------------------------------------------------------------------------------------
// Masks. Own keys: visible to query i iff key_start <= j < own_key_end(i). Pool keys: the first
// lens[s] positions of slot s, visible to every query of the row.
// ---------------------------------------------------------------------------------------------
FM_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FM_INLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Exclusive end of the own keys query i may see: causal bottom-right alignment j <= i + Tk - Tq.
FM_INLINE int64_t own_key_end(int64_t i, int64_t q_len, int64_t k_len, bool causal) {
  return causal ? min64(k_len, i + (k_len - q_len) + 1) : k_len;
}

FM_INLINE bool own_key_visible(int64_t j, int64_t i, int64_t q_len, int64_t k_len, int64_t key_start,
                               bool causal) {
  return j >= key_start && j < own_key_end(i, q_len, k_len, causal);
}

// First query that sees own key j (all later queries see it too), ignoring key_start.
FM_INLINE int64_t own_key_first_query(int64_t j, int64_t q_len, int64_t k_len, bool causal) {
  return causal ? max64(0, j - (k_len - q_len)) : 0;
}

// Visible rows [lo, hi) of the own-key tile [j0, j0 + n) for query i (lo >= hi: none).
FM_INLINE void own_tile_key_range(int64_t i, int64_t j0, int64_t n, int64_t q_len, int64_t k_len,
                                  int64_t key_start, bool causal, int64_t* lo, int64_t* hi) {
  *lo = max64(0, key_start - j0);
  *hi = min64(n, own_key_end(i, q_len, k_len, causal) - j0);
}

// Rows [lo, hi) of the query tile [i0, i0 + n) that see own key j.
FM_INLINE void own_tile_query_range(int64_t j, int64_t i0, int64_t n, int64_t q_len, int64_t k_len,
                                    int64_t key_start, bool causal, int64_t* lo, int64_t* hi) {
  *lo = max64(0, own_key_first_query(j, q_len, k_len, causal) - i0);
  *hi = j >= key_start ? n : 0;
}

// Number of visible positions of the m-th pool entry of a row (0 for an unused entry).
FM_INLINE int64_t slot_visible_len(int32_t slot, const int32_t* lens) {
  return slot < 0 ? 0 : (int64_t)lens[slot];
}

// ---------------------------------------------------------------------------------------------
// Forward: online softmax over key tiles, one query row at a time.
// ---------------------------------------------------------------------------------------------
struct SoftmaxRow {
  float max;  // running max of the scaled scores seen so far (-inf: none yet)
  float sum;  // running sum of exp(score - max)
};

FM_INLINE void softmax_row_init(SoftmaxRow* st) {
  st->max = -INFINITY;
  st->sum = 0.0f;
}

// Folds tile rows [lo, hi) into one query row's state.
// q: [d] fp32 (unscaled); k_tile, v_tile: rows of ld floats; acc: [d] unnormalized output;
// scratch: >= hi floats.
FM_INLINE void fwd_row_tile(const float* __restrict__ q, const float* __restrict__ k_tile,
                            const float* __restrict__ v_tile, int64_t ld, int64_t lo, int64_t hi,
                            int64_t d, float scale, float* __restrict__ scratch, SoftmaxRow* st,
                            float* __restrict__ acc) {
  if (lo >= hi) return;
  float tile_max = -INFINITY;
  for (int64_t r = lo; r < hi; ++r) {
    const float s = dot(q, k_tile + r * ld, d) * scale;
    scratch[r] = s;
    tile_max = fmaxf(tile_max, s);
  }
  const float new_max = fmaxf(st->max, tile_max);
  const float alpha = expf(st->max - new_max);  // 0 on the first visible tile (max = -inf)
  float tile_sum = 0.0f;
  for (int64_t r = lo; r < hi; ++r) {
    const float p = expf(scratch[r] - new_max);
    scratch[r] = p;
    tile_sum += p;
  }
  st->sum = st->sum * alpha + tile_sum;
  st->max = new_max;
  accumulate_rows(acc, alpha, scratch, v_tile, ld, lo, hi, d);
}

// Writes out = acc / sum and lse = max + log(sum); a row that saw no key gets out = 0, lse = -inf.
template <class T>
FM_INLINE void fwd_row_finish(const SoftmaxRow& st, const float* __restrict__ acc, int64_t d,
                              T* __restrict__ out, float* __restrict__ lse) {
  if (!(st.sum > 0.0f)) {
    for (int64_t c = 0; c < d; ++c) out[c] = from_f32<T>(0.0f);
    *lse = -INFINITY;
    return;
  }
  const float sum = st.sum;
  for (int64_t c = 0; c < d; ++c) out[c] = from_f32<T>(acc[c] / sum);
  *lse = st.max + logf(sum);
}

// ---------------------------------------------------------------------------------------------
// Backward. p = exp(s - lse), dp = dO . v, ds = p * (dp - delta), delta = rowsum(dO * O).
// dq = scale * sum_j ds_ij k_j; dk_j = scale * sum_i ds_ij q_i; dv_j = sum_i p_ij dO_i.
// ---------------------------------------------------------------------------------------------
FM_INLINE float prob_from_lse(float s, float lse) { return lse == -INFINITY ? 0.0f : expf(s - lse); }

// dq_acc += sum_{r in [lo, hi)} ds_r * k_r for one query row (scale applied in bwd_dq_row_finish).
FM_INLINE void bwd_dq_row_tile(const float* __restrict__ q, const float* __restrict__ dout, float lse,
                               float delta, const float* __restrict__ k_tile,
                               const float* __restrict__ v_tile, int64_t ld, int64_t lo, int64_t hi,
                               int64_t d, float scale, float* __restrict__ scratch,
                               float* __restrict__ dq_acc) {
  if (lo >= hi) return;
  for (int64_t r = lo; r < hi; ++r) {
    const float p = prob_from_lse(dot(q, k_tile + r * ld, d) * scale, lse);
    const float dp = dot(dout, v_tile + r * ld, d);
    scratch[r] = p * (dp - delta);
  }
  accumulate_rows(dq_acc, 1.0f, scratch, k_tile, ld, lo, hi, d);
}

template <class T>
FM_INLINE void bwd_dq_row_finish(const float* __restrict__ dq_acc, int64_t d, float scale,
                                 T* __restrict__ dq) {
  store_row<T>(dq_acc, d, scale, dq);
}

// For one key row (k, v): dk_acc += sum_r ds_r q_r, dv_acc += sum_r p_r dO_r over query tile rows
// [lo, hi). q_tile, do_tile: rows of ld floats; lse_tile, delta_tile: [n]; scratch_p, scratch_ds: >= hi.
FM_INLINE void bwd_dkdv_row_tile(const float* __restrict__ k, const float* __restrict__ v,
                                 const float* __restrict__ q_tile, const float* __restrict__ do_tile,
                                 int64_t ld, const float* __restrict__ lse_tile,
                                 const float* __restrict__ delta_tile, int64_t lo, int64_t hi,
                                 int64_t d, float scale, float* __restrict__ scratch_p,
                                 float* __restrict__ scratch_ds, float* __restrict__ dk_acc,
                                 float* __restrict__ dv_acc) {
  if (lo >= hi) return;
  for (int64_t r = lo; r < hi; ++r) {
    const float p = prob_from_lse(dot(q_tile + r * ld, k, d) * scale, lse_tile[r]);
    const float dp = dot(do_tile + r * ld, v, d);
    scratch_p[r] = p;
    scratch_ds[r] = p * (dp - delta_tile[r]);
  }
  accumulate_rows(dv_acc, 1.0f, scratch_p, do_tile, ld, lo, hi, d);
  accumulate_rows(dk_acc, 1.0f, scratch_ds, q_tile, ld, lo, hi, d);
}

}  // namespace FASTMEM_TILE_ABI
}  // namespace pa
}  // namespace fastmem
