// Host emulation of the CUDA kernels in csrc/prefix_attention_cuda.cuh, for machines without a GPU.
//
// Each block runs as blockDim.x std::threads (a barrier stands in for __syncthreads, function-static
// arrays for __shared__), blocks one after another, through the same launch plans (grids, kernel
// order, dtype / head-dim dispatch) as prefix_attention_cuda.cu. The device math is the host build of
// prefix_attention_tile.h, so this checks the kernels' indexing, tiling, masking and barriers, not
// nvcc's code generation. Slow (one thread per GPU thread): keep shapes small.
//
// Build (next to an installed fastmem._native, which registers the Params type):
//   g++ -std=c++17 -O2 -shared -fPIC -Icsrc $(python -m pybind11 --includes) csrc/tools/cuda_emulator.cpp
//       -o _cuda_emu$(python3-config --extension-suffix) -lpthread
// Use: _cuda_emu.forward(params) / _cuda_emu.backward(params) with a fastmem._native.Params filled
// for CPU tensors, e.g. by swapping fastmem.ops.native's forward_cpu/backward_cpu for these two.
// Optional max_grid_x / max_grid_y lower the grid limits of launch_grid.h (tests of the grid split);
// both return the launches they ran.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace emu {
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Reusable barrier for one block's threads.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t phase = phase_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++phase_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  uint64_t phase_ = 0;
};
}  // namespace emu

thread_local emu::Dim3 threadIdx, blockIdx;
emu::Dim3 blockDim, gridDim;
thread_local emu::Barrier* emu_block_barrier = nullptr;
inline void __syncthreads() { emu_block_barrier->wait(); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

#include "../prefix_attention_cuda.cuh"

namespace {
using fastmem::pa::Params;

// One emulated launch of a (possibly cut) grid: name, offset x, offset y, blocks x, blocks y.
using LaunchRecord = std::tuple<std::string, int64_t, int64_t, int64_t, int64_t>;

struct EmulatedLauncher {
  const Params& p;
  std::vector<LaunchRecord>* launches;
  template <class Kernel>
  void operator()(Kernel kernel, const fastmem::pa::cuda::BlockOffset& at, int64_t blocks_x, int64_t blocks_y,
                  int threads, const char* name) const {
    launches->emplace_back(name, at.x, at.y, blocks_x, blocks_y);
    blockDim = {(unsigned)threads, 1, 1};
    gridDim = {(unsigned)blocks_x, (unsigned)blocks_y, 1};
    for (int64_t y = 0; y < blocks_y; ++y) {
      for (int64_t x = 0; x < blocks_x; ++x) {
        emu::Barrier barrier(threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = {(unsigned)t, 0, 0};
            blockIdx = {(unsigned)x, (unsigned)y, 0};
            emu_block_barrier = &barrier;
            kernel(p, at);
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
};

// Runs the forward or backward plan with grids cut to (max_grid_x, max_grid_y); returns the launches.
template <bool kBackward>
std::vector<LaunchRecord> run_plan(const Params& p, int64_t max_grid_x, int64_t max_grid_y) {
  std::vector<LaunchRecord> launches;
  fastmem::pa::cuda::plan<kBackward>(p, EmulatedLauncher{p, &launches},
                                     fastmem::pa::cuda::GridLimits{max_grid_x, max_grid_y});
  return launches;
}

// The pieces for_each_grid_chunk cuts a grid into: (offset x, offset y, blocks x, blocks y).
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> grid_chunks(int64_t grid_x, int64_t grid_y,
                                                                        int64_t max_grid_x, int64_t max_grid_y) {
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> chunks;
  fastmem::pa::cuda::for_each_grid_chunk(
      grid_x, grid_y, fastmem::pa::cuda::GridLimits{max_grid_x, max_grid_y},
      [&](const fastmem::pa::cuda::BlockOffset& at, int64_t bx, int64_t by) {
        chunks.emplace_back(at.x, at.y, bx, by);
      });
  return chunks;
}
}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  namespace py = pybind11;
  using fastmem::pa::cuda::kMaxGridX;
  using fastmem::pa::cuda::kMaxGridY;
  m.doc() = "Host emulation of fastmem's CUDA prefix attention kernels (testing without a GPU)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("MAX_GRID_X") = kMaxGridX;
  m.attr("MAX_GRID_Y") = kMaxGridY;
  m.def("forward", &run_plan<false>, py::arg("params"), py::arg("max_grid_x") = kMaxGridX,
        py::arg("max_grid_y") = kMaxGridY, nogil,
        "Emulated forward with grids cut to the given limits; returns the launches (name, x0, y0, nx, ny)");
  m.def("backward", &run_plan<true>, py::arg("params"), py::arg("max_grid_x") = kMaxGridX,
        py::arg("max_grid_y") = kMaxGridY, nogil,
        "Emulated backward with grids cut to the given limits; returns the launches (name, x0, y0, nx, ny)");
  m.def("grid_chunks", &grid_chunks, py::arg("grid_x"), py::arg("grid_y"), py::arg("max_grid_x"),
        py::arg("max_grid_y"), "The launches for_each_grid_chunk cuts a grid into: (x0, y0, nx, ny)");
}
