// CUDA entry points of prefix attention: launches the plans of prefix_attention_cuda.cuh (dtype and
// head-dim dispatch, grids cut to the limits of launch_grid.h, kernel order) on the caller's stream
// (params.stream, torch's current stream). Everything is asynchronous; launch errors surface as
// std::runtime_error.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "prefix_attention.h"
#include "prefix_attention_cuda.cuh"

namespace fastmem {
namespace pa {
namespace cuda {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fastmem native CUDA: ") + what + ": " + cudaGetErrorString(status));
}

// Makes params.device current for the duration of a call (the Python wrapper's torch device guard
// normally did already); restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    int current = -1;
    check_cuda(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Launches one piece of a plan's grid (GridSplitter keeps it within the grid limits): one stream,
// kernels in call order.
struct StreamLauncher {
  const Params& p;
  cudaStream_t stream;
  template <class Kernel>
  void operator()(Kernel kernel, const BlockOffset& at, int64_t blocks_x, int64_t blocks_y, int threads,
                  const char* name) const {
    kernel<<<dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y)), dim3(threads), 0, stream>>>(p, at);
    check_cuda(cudaGetLastError(), name);
  }
};

}  // namespace

void forward(const Params& p) {
  DeviceGuard guard(p.device);
  plan<false>(p, StreamLauncher{p, reinterpret_cast<cudaStream_t>(p.stream)});
}

void backward(const Params& p) {
  DeviceGuard guard(p.device);
  plan<true>(p, StreamLauncher{p, reinterpret_cast<cudaStream_t>(p.stream)});
}

}  // namespace cuda
}  // namespace pa
}  // namespace fastmem
