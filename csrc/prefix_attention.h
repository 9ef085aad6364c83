// Host-side interface of the native prefix attention backend: one parameter block for every entry
// point, filled by the Python wrapper (fastmem/ops/native.py) from torch tensors. No torch here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmem {
namespace pa {

// A 4-d tensor [dim0, dim1, dim2, D] whose last dimension is contiguous; strides in elements.
struct TensorArg {
  uintptr_t ptr = 0;
  int64_t stride0 = 0;
  int64_t stride1 = 0;
  int64_t stride2 = 0;
};

struct Params {
  // Sizes: q [batch, q_len, q_heads, head_dim], k/v [batch, k_len, kv_heads, head_dim],
  // pool [num_slots, prefix_len, kv_heads, head_dim], index [batch, uses].
  int64_t batch = 0, q_len = 0, k_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t num_slots = 0, prefix_len = 0, uses = 0;
  int dtype = 0;  // DType code shared by every float tensor but lse / delta / partials (fp32)
  bool causal = true;
  float scale = 1.0f;
  int num_threads = 1;    // CPU worker threads
  uintptr_t stream = 0;   // cudaStream_t for the CUDA entry points
  int device = -1;        // CUDA device ordinal of the tensors (-1: leave the current one)

  TensorArg q, k, v, prefix_k, prefix_v;  // inputs
  TensorArg out, grad_out;                // forward output / backward input
  TensorArg dq, dk, dv;                   // backward outputs (input dtype)

  uintptr_t index = 0;      // int32 [batch, uses], -1 = unused entry
  uintptr_t lens = 0;       // int32 [num_slots]
  uintptr_t key_start = 0;  // int32 [batch]
  uintptr_t lse = 0;        // fp32 [batch, q_heads, q_len], contiguous
  uintptr_t delta = 0;      // fp32 [batch, q_heads, q_len] workspace (backward), contiguous

  // Backward, pool gradients: fp32 per-use partials [batch, uses, prefix_len, kv_heads, head_dim]
  // (contiguous, fully written), reduced into dprefix_k / dprefix_v [num_slots, prefix_len, kv_heads,
  // head_dim] (contiguous, input dtype) in (b, m) order per slot. slot_offsets int32 [num_slots + 1]
  // and slot_uses int32 [batch * uses] list, for each slot, its uses b * uses + m in ascending order.
  uintptr_t dprefix_k_partial = 0, dprefix_v_partial = 0;
  uintptr_t dprefix_k = 0, dprefix_v = 0;
  uintptr_t slot_offsets = 0, slot_uses = 0;
};

namespace cpu {
// What the CPU kernels tile by on this machine, chosen once per process (prefix_attention_cpu_dispatch.cpp):
// rows per register micro-tile, timed per build; the L2 size per core, which bounds the query tile.
struct Tiles {
  int micro_rows = 0;
  int64_t l2_bytes = 0;
};
Tiles tiles();                          // the active build's
void forward(const Params& p);
void backward(const Params& p);
std::vector<std::string> isas();        // builds this CPU runs, widest first
std::string isa();                      // the build forward / backward use
void set_isa(const std::string& name);  // choose a build (tests); std::invalid_argument if it cannot run
}  // namespace cpu

#ifdef FASTMEM_WITH_CUDA
namespace cuda {
void forward(const Params& p);
void backward(const Params& p);
}  // namespace cuda
#endif

}  // namespace pa
}  // namespace fastmem
