// CUDA grid limits, and how a launch grid that exceeds them is cut into launches that fit. No CUDA
// here: the CUDA launcher (prefix_attention_cuda.cu, through the plans of prefix_attention_cuda.cuh)
// and the host emulator (tools/cuda_emulator.cpp) run this same arithmetic, and
// tests/test_cuda_emulation.py runs it with lowered limits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace fastmem {
namespace pa {
namespace cuda {

// Blocks per launch along grid x and y (every GPU of compute capability >= 3.0).
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;

// The limits a launch is cut to: the hardware's, or lower ones in tests.
struct GridLimits {
  int64_t x = kMaxGridX;
  int64_t y = kMaxGridY;
};

// Where one launch of a cut grid starts: its block (blockIdx.x, blockIdx.y) is block
// (x + blockIdx.x, y + blockIdx.y) of the whole grid. Kernels take it as an argument.
struct BlockOffset {
  int64_t x = 0;
  int64_t y = 0;
};

// Calls launch_chunk(offset, blocks_x, blocks_y) for the launches that cover a grid_x x grid_y grid,
// each at most limits.x x limits.y blocks: every block of the grid in exactly one launch, y outer, x
// inner. Nothing for an empty grid.
template <class LaunchChunk>
void for_each_grid_chunk(int64_t grid_x, int64_t grid_y, const GridLimits& limits, const LaunchChunk& launch_chunk) {
  if (limits.x <= 0 || limits.y <= 0 || limits.x > kMaxGridX || limits.y > kMaxGridY)
    throw std::invalid_argument("grid limits must lie in [1, kMaxGridX] x [1, kMaxGridY]");
  for (int64_t y0 = 0; y0 < grid_y; y0 += limits.y)
    for (int64_t x0 = 0; x0 < grid_x; x0 += limits.x)
      launch_chunk(BlockOffset{x0, y0}, std::min(limits.x, grid_x - x0), std::min(limits.y, grid_y - y0));
}

}  // namespace cuda
}  // namespace pa
}  // namespace fastmem
