// pybind11 module fastmem._native: the native prefix attention backend, driven by raw pointers.
// The Python wrapper (fastmem/ops/native.py) owns every tensor; nothing here links torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>

#include "few_row_linear.h"
#include "prefix_attention.h"
#include "prefix_attention_tile.h"

#ifndef FASTMEM_VERSION
#define FASTMEM_VERSION "0.0.0"
#endif

namespace py = pybind11;
using fastmem::pa::LinearArgs;
using fastmem::pa::Params;
using fastmem::pa::TensorArg;

namespace {

bool has_cuda() {
#ifdef FASTMEM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifndef FASTMEM_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "fastmem._native was built without CUDA (rebuild with FASTMEM_CUDA=1 and nvcc on PATH)");
}
#endif

void forward_cuda(const Params& p) {
#ifdef FASTMEM_WITH_CUDA
  fastmem::pa::cuda::forward(p);
#else
  (void)p;
  no_cuda();
#endif
}

void backward_cuda(const Params& p) {
#ifdef FASTMEM_WITH_CUDA
  fastmem::pa::cuda::backward(p);
#else
  (void)p;
  no_cuda();
#endif
}

// Test hooks for the fp16 / bf16 conversions of prefix_attention_tile.h (host versions).
void convert_to_f32(int dtype, uintptr_t src, uintptr_t dst, int64_t n) {
  using namespace fastmem::pa;
  float* out = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case kFloat16: out[i] = fastmem::pa::to_f32(reinterpret_cast<const half_t*>(src)[i]); break;
      case kBFloat16: out[i] = fastmem::pa::to_f32(reinterpret_cast<const bf16_t*>(src)[i]); break;
      default: out[i] = reinterpret_cast<const float*>(src)[i];
    }
  }
}

void convert_from_f32(int dtype, uintptr_t src, uintptr_t dst, int64_t n) {
  using namespace fastmem::pa;
  const float* in = reinterpret_cast<const float*>(src);
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case kFloat16: reinterpret_cast<half_t*>(dst)[i] = from_f32<half_t>(in[i]); break;
      case kBFloat16: reinterpret_cast<bf16_t*>(dst)[i] = from_f32<bf16_t>(in[i]); break;
      default: reinterpret_cast<float*>(dst)[i] = in[i];
    }
  }
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastmem native prefix attention backend (CPU threads; CUDA when built with it)";
  m.attr("version") = FASTMEM_VERSION;
  m.attr("__version__") = FASTMEM_VERSION;
  m.attr("FLOAT32") = (int)fastmem::pa::kFloat32;
  m.attr("FLOAT16") = (int)fastmem::pa::kFloat16;
  m.attr("BFLOAT16") = (int)fastmem::pa::kBFloat16;
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in");

  py::class_<TensorArg>(m, "TensorArg", "A [d0, d1, d2, D] tensor, last dim contiguous; strides in elements")
      .def(py::init<>())
      .def(py::init([](uintptr_t ptr, int64_t s0, int64_t s1, int64_t s2) {
             TensorArg t;
             t.ptr = ptr;
             t.stride0 = s0;
             t.stride1 = s1;
             t.stride2 = s2;
             return t;
           }),
           py::arg("ptr"), py::arg("stride0"), py::arg("stride1"), py::arg("stride2"))
      .def_readwrite("ptr", &TensorArg::ptr)
      .def_readwrite("stride0", &TensorArg::stride0)
      .def_readwrite("stride1", &TensorArg::stride1)
      .def_readwrite("stride2", &TensorArg::stride2);

  py::class_<Params>(m, "Params", "Every argument of forward/backward; see csrc/prefix_attention.h")
      .def(py::init<>())
      .def_readwrite("batch", &Params::batch)
      .def_readwrite("q_len", &Params::q_len)
      .def_readwrite("k_len", &Params::k_len)
      .def_readwrite("q_heads", &Params::q_heads)
      .def_readwrite("kv_heads", &Params::kv_heads)
      .def_readwrite("head_dim", &Params::head_dim)
      .def_readwrite("num_slots", &Params::num_slots)
      .def_readwrite("prefix_len", &Params::prefix_len)
      .def_readwrite("uses", &Params::uses)
      .def_readwrite("dtype", &Params::dtype)
      .def_readwrite("causal", &Params::causal)
      .def_readwrite("scale", &Params::scale)
      .def_readwrite("num_threads", &Params::num_threads)
      .def_readwrite("stream", &Params::stream)
      .def_readwrite("device", &Params::device)
      .def_readwrite("q", &Params::q)
      .def_readwrite("k", &Params::k)
      .def_readwrite("v", &Params::v)
      .def_readwrite("prefix_k", &Params::prefix_k)
      .def_readwrite("prefix_v", &Params::prefix_v)
      .def_readwrite("out", &Params::out)
      .def_readwrite("grad_out", &Params::grad_out)
      .def_readwrite("dq", &Params::dq)
      .def_readwrite("dk", &Params::dk)
      .def_readwrite("dv", &Params::dv)
      .def_readwrite("index", &Params::index)
      .def_readwrite("lens", &Params::lens)
      .def_readwrite("key_start", &Params::key_start)
      .def_readwrite("lse", &Params::lse)
      .def_readwrite("delta", &Params::delta)
      .def_readwrite("dprefix_k_partial", &Params::dprefix_k_partial)
      .def_readwrite("dprefix_v_partial", &Params::dprefix_v_partial)
      .def_readwrite("dprefix_k", &Params::dprefix_k)
      .def_readwrite("dprefix_v", &Params::dprefix_v)
      .def_readwrite("slot_offsets", &Params::slot_offsets)
      .def_readwrite("slot_uses", &Params::slot_uses);

  py::class_<LinearArgs>(m, "LinearArgs", "Arguments of few_row_linear_cpu; see csrc/few_row_linear.h")
      .def(py::init<>())
      .def_readwrite("rows", &LinearArgs::rows)
      .def_readwrite("in_features", &LinearArgs::in_features)
      .def_readwrite("out_features", &LinearArgs::out_features)
      .def_readwrite("x", &LinearArgs::x)
      .def_readwrite("x_stride", &LinearArgs::x_stride)
      .def_readwrite("weight", &LinearArgs::weight)
      .def_readwrite("weight_stride", &LinearArgs::weight_stride)
      .def_readwrite("bias", &LinearArgs::bias)
      .def_readwrite("y", &LinearArgs::y)
      .def_readwrite("y_stride", &LinearArgs::y_stride)
      .def_readwrite("num_threads", &LinearArgs::num_threads);

  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("forward_cpu", &fastmem::pa::cpu::forward, py::arg("params"), nogil,
        "Writes out and lse (CPU tensors).");
  m.def("backward_cpu", &fastmem::pa::cpu::backward, py::arg("params"), nogil,
        "Writes delta, dq, dk, dv, the per-use partials and dprefix_k / dprefix_v (CPU tensors).");
  m.def("few_row_linear_cpu", &fastmem::pa::cpu::few_row_linear, py::arg("args"), nogil,
        "Writes y = x W^T (+ bias), fp32 CPU tensors (the few-row kernel of the active CPU build).");
  m.def("cpu_isas", &fastmem::pa::cpu::isas, "CPU builds of the kernels this CPU runs, widest first.");
  m.def("cpu_isa", &fastmem::pa::cpu::isa, "The CPU build forward_cpu / backward_cpu use.");
  m.def("set_cpu_isa", &fastmem::pa::cpu::set_isa, py::arg("name"), "Choose the CPU build (tests).");
  m.def(
      "cpu_tiles",
      [] {
        const fastmem::pa::cpu::Tiles t = fastmem::pa::cpu::tiles();
        py::dict d;
        d["micro_rows"] = t.micro_rows;
        d["l2_bytes"] = t.l2_bytes;
        return d;
      },
      "The active CPU build's tiles on this machine: rows per register micro-tile (timed on first use) and "
      "the L2 size per core that bounds the query tile.");
  m.def("forward_cuda", &forward_cuda, py::arg("params"), nogil,
        "Launches the forward on params.stream (CUDA tensors); asynchronous.");
  m.def("backward_cuda", &backward_cuda, py::arg("params"), nogil,
        "Launches the backward on params.stream (CUDA tensors); asynchronous.");
  m.def("_to_f32", &convert_to_f32, "test hook: dtype-coded buffer -> fp32 (host conversion)");
  m.def("_from_f32", &convert_from_f32, "test hook: fp32 -> dtype-coded buffer (host conversion)");
}
