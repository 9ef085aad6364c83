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
#include <pybind11/pybind11.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
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

struct EmulatedLauncher {
  const Params& p;
  template <class Kernel>
  void operator()(Kernel kernel, int64_t blocks, int threads, unsigned grid_y, const char*) const {
    if (blocks <= 0) return;
    blockDim = {(unsigned)threads, 1, 1};
    gridDim = {(unsigned)blocks, grid_y, 1};
    for (unsigned y = 0; y < grid_y; ++y) {
      for (int64_t bx = 0; bx < blocks; ++bx) {
        emu::Barrier barrier(threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = {(unsigned)t, 0, 0};
            blockIdx = {(unsigned)bx, y, 0};
            emu_block_barrier = &barrier;
            kernel(p);
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
};
}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "Host emulation of fastmem's CUDA prefix attention kernels (testing without a GPU)";
  auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("forward", [](const Params& p) { fastmem::pa::cuda::plan<false>(p, EmulatedLauncher{p}); }, nogil);
  m.def("backward", [](const Params& p) { fastmem::pa::cuda::plan<true>(p, EmulatedLauncher{p}); }, nogil);
}
