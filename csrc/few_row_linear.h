// Host-side interface of the few-row linear kernel: y = x W^T (+ bias) for a handful of rows, the shape
// of a decode step's matmuls, where reading W once bounds the time. No torch here: the Python wrapper
// (fastmem/ops/native.py) validates the tensors and fills LinearArgs.
#pragma once

#include <cstdint>

namespace fastmem {
namespace pa {

// fp32 everywhere; every row has unit stride along its last dimension.
struct LinearArgs {
  int64_t rows = 0, in_features = 0, out_features = 0;
  uintptr_t x = 0;        // [rows, in_features], row i at x + i * x_stride
  int64_t x_stride = 0;
  uintptr_t weight = 0;   // [out_features, in_features], row n at weight + n * weight_stride
  int64_t weight_stride = 0;
  uintptr_t bias = 0;     // [out_features] contiguous, or 0 for none
  uintptr_t y = 0;        // [rows, out_features], row i at y + i * y_stride (written, never read)
  int64_t y_stride = 0;
  int num_threads = 1;
};

namespace cpu {
void few_row_linear(const LinearArgs& a);  // the active ISA build's (prefix_attention_cpu_dispatch.cpp)
}  // namespace cpu

}  // namespace pa
}  // namespace fastmem
