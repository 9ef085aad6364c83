"""The `native` backend of prefix attention: C++ threads on CPU, CUDA kernels on GPU (`fastmem._native`).

Implements the backend contract of ``docs/backend_contract.md``. This module owns every tensor:
it allocates outputs and workspaces with torch, makes the last dimension contiguous where needed, and
passes raw pointers, sizes and element strides to the compiled module (csrc/), which links no torch.
CPU tensors run on up to ``torch.get_num_threads()`` threads of a persistent pool (csrc/cpu_threads.cpp);
CUDA tensors are launched on the current torch stream of their device, asynchronously. The module also
holds the few-row linear kernel (`few_row_linear`, used by `fastmem.ops.linear`).

Backward pool gradients: the kernels write fp32 per-use partials ``[B, M, P, Hkv, D]`` and reduce them
per slot in ascending (b, m) order: the same bits as `sum_into_slots` on those partials, then a cast.

Importing this module never fails: without a built `fastmem._native`, `is_available()` is False and
calling `forward` / `backward` raises a RuntimeError that says why.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from fastmem import _native
except Exception as _error:  # ImportError (not built), or a broken build
    _native = None
    UNAVAILABLE_REASON = (
        f"fastmem._native is not built or does not import ({type(_error).__name__}: {_error}); "
        "reinstall with `FASTMEM_REQUIRE_NATIVE=1 pip install -v .` (or `-e .`) to see why the native "
        "build failed")
else:
    UNAVAILABLE_REASON = None

# The compiled module's dtype codes (empty without it: `_lib()` raises before they are read).
_DTYPE_CODES = {} if _native is None else {
    torch.float32: _native.FLOAT32, torch.float16: _native.FLOAT16, torch.bfloat16: _native.BFLOAT16}


def is_available() -> bool:
    """True when the compiled module imports (its CPU path is always there)."""
    return _native is not None


def cuda_available() -> bool:
    """True when the compiled module has CUDA kernels and torch sees a GPU."""
    return _native is not None and bool(_native.has_cuda()) and torch.cuda.is_available()


def cpu_tiles() -> dict:
    """How the CPU kernels run on this machine: ``{"isa", "micro_rows", "l2_bytes"}``, the ISA build in use,
    its rows per register micro-tile (timed on first use) and the L2 size per core bounding its query tile."""
    lib = _lib()
    return dict(isa=lib.cpu_isa(), **lib.cpu_tiles())


def few_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T (+ bias)`` by the CPU few-row kernel (csrc/few_row_linear_cpu.cpp), on
    ``torch.get_num_threads()`` threads. x: fp32 ``[rows, in]``, weight: fp32 ``[out, in]``, bias: fp32
    ``[out]`` or None, all on the CPU with a unit-stride last dimension (`fastmem.ops.linear.few_row_linear`
    checks that before calling). Returns fp32 ``[rows, out]``."""
    lib = _lib()
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
    args = lib.LinearArgs()
    args.rows, args.in_features = x.shape
    args.out_features = weight.shape[0]
    args.x, args.x_stride = x.data_ptr(), x.stride(0)
    args.weight, args.weight_stride = weight.data_ptr(), weight.stride(0)
    args.bias = 0 if bias is None else bias.data_ptr()
    args.y, args.y_stride = y.data_ptr(), y.stride(0)
    args.num_threads = max(1, torch.get_num_threads())
    lib.few_row_linear_cpu(args)
    return y


def _lib():
    if _native is None:
        raise RuntimeError(f"the native prefix_attention backend is not available: {UNAVAILABLE_REASON}")
    return _native


def _rows(t: Tensor) -> Tensor:
    """The tensor with a unit-stride last dimension (the kernels' only layout requirement)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _arg(t: Tensor):
    return _native.TensorArg(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _int32(t: Tensor) -> Tensor:
    return t.to(torch.int32).contiguous()


def _params(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, index: Tensor,
            lens: Tensor, key_start: Tensor, causal: bool, softmax_scale: float):
    lib = _lib()
    if q.dtype not in _DTYPE_CODES:
        raise TypeError(f"native prefix_attention takes fp32, fp16 or bf16, not {q.dtype}")
    p = lib.Params()
    p.batch, p.q_len, p.q_heads, p.head_dim = q.shape
    p.k_len, p.kv_heads = k.shape[1], k.shape[2]
    p.num_slots, p.prefix_len = prefix_k.shape[0], prefix_k.shape[1]
    p.uses = index.shape[1]
    p.dtype = _DTYPE_CODES[q.dtype]
    p.causal = bool(causal)
    p.scale = float(softmax_scale)
    p.q, p.k, p.v = _arg(q), _arg(k), _arg(v)
    p.prefix_k, p.prefix_v = _arg(prefix_k), _arg(prefix_v)
    p.index, p.lens, p.key_start = index.data_ptr(), lens.data_ptr(), key_start.data_ptr()
    if q.is_cuda:
        p.device = q.device.index if q.device.index is not None else torch.cuda.current_device()
        p.stream = torch.cuda.current_stream(q.device).cuda_stream
    else:
        p.num_threads = max(1, torch.get_num_threads())
    return p


def _launch(name: str, p, device: torch.device) -> None:
    lib = _lib()
    if device.type == "cuda":
        if not lib.has_cuda():
            raise RuntimeError("fastmem._native was built without CUDA kernels: reinstall with FASTMEM_CUDA=1 "
                               "(nvcc on PATH) or use the triton/torch backend for CUDA tensors")
        with torch.cuda.device(device):
            getattr(lib, f"{name}_cuda")(p)
    elif device.type == "cpu":
        getattr(lib, f"{name}_cpu")(p)
    else:
        raise RuntimeError(f"native prefix_attention runs on CPU or CUDA tensors, not {device.type}")


def forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, index: Tensor,
            lens: Tensor, key_start: Tensor, causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """Returns out ``[B, Tq, Hq, D]`` (q's dtype) and lse ``[B, Hq, Tq]`` (fp32, natural log)."""
    _lib()
    q, k, v, prefix_k, prefix_v = map(_rows, (q, k, v, prefix_k, prefix_v))
    index, lens, key_start = map(_int32, (index, lens, key_start))
    batch, q_len, q_heads, head_dim = q.shape
    out = torch.empty((batch, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    p = _params(q, k, v, prefix_k, prefix_v, index, lens, key_start, causal, softmax_scale)
    p.out = _arg(out)
    p.lse = lse.data_ptr()
    _launch("forward", p, q.device)
    return out, lse


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
              index: Tensor, lens: Tensor, key_start: Tensor, out: Tensor, lse: Tensor, causal: bool,
              softmax_scale: float, slot_offsets: Tensor,
              slot_uses: Tensor) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """`backward` plus the fp32 per-use partials ``[B, M, P, Hkv, D]`` of dprefix_k and dprefix_v."""
    _lib()
    grad_out, q, k, v, prefix_k, prefix_v, out = map(_rows, (grad_out, q, k, v, prefix_k, prefix_v, out))
    index, lens, key_start = map(_int32, (index, lens, key_start))
    lse = lse.to(torch.float32).contiguous()
    batch, q_len, q_heads, head_dim = q.shape
    num_slots, prefix_len, kv_heads = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    uses = index.shape[1]
    device, dtype = q.device, q.dtype
    dq = torch.empty(q.shape, dtype=dtype, device=device)
    dk = torch.empty(k.shape, dtype=dtype, device=device)
    dv = torch.empty(v.shape, dtype=dtype, device=device)
    dprefix_k = torch.empty(prefix_k.shape, dtype=dtype, device=device)
    dprefix_v = torch.empty(prefix_v.shape, dtype=dtype, device=device)
    partial_k = torch.empty((batch, uses, prefix_len, kv_heads, head_dim), dtype=torch.float32, device=device)
    partial_v = torch.empty_like(partial_k)
    delta = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=device)

    p = _params(q, k, v, prefix_k, prefix_v, index, lens, key_start, causal, softmax_scale)
    p.out, p.grad_out = _arg(out), _arg(grad_out)
    p.dq, p.dk, p.dv = _arg(dq), _arg(dk), _arg(dv)
    p.lse, p.delta = lse.data_ptr(), delta.data_ptr()
    p.dprefix_k_partial, p.dprefix_v_partial = partial_k.data_ptr(), partial_v.data_ptr()
    p.dprefix_k, p.dprefix_v = dprefix_k.data_ptr(), dprefix_v.data_ptr()
    p.slot_offsets, p.slot_uses = slot_offsets.data_ptr(), slot_uses.data_ptr()
    _launch("backward", p, device)
    return (dq, dk, dv, dprefix_k, dprefix_v), partial_k, partial_v


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
             index: Tensor, lens: Tensor, key_start: Tensor, out: Tensor, lse: Tensor, causal: bool,
             softmax_scale: float, slot_offsets: Tensor, slot_uses: Tensor) -> tuple[Tensor, ...]:
    """Returns dq, dk, dv, dprefix_k, dprefix_v, shaped like their inputs, in the input dtype.

    slot_offsets int32 ``[S + 1]``, slot_uses int32 ``[B * M]``: `slot_use_lists` of index."""
    grads, _, _ = _backward(grad_out, q, k, v, prefix_k, prefix_v, index, lens, key_start, out, lse,
                            causal, softmax_scale, slot_offsets, slot_uses)
    return grads
