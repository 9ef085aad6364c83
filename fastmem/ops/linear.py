"""Linear layers at few rows: ``y = x W^T + b`` when x has at most `MAX_ROWS` rows (a decode step's matmuls).

At a few rows a linear layer reads every weight once and does a few FMAs per weight. torch's CPU sgemm
packs the weight into panels on every call, which measured 5.7 GB/s of weight read on Zen 4 at 8 rows
against 32 GB/s for a plain read; the native kernel (csrc/few_row_linear_cpu.cpp) streams the weight in
place: 1.69x torch at 1 row, 1.73x at 8, 1.20x at 32 and parity at 64 over SmolLM2-135M's 211 linears on
2 Zen 4 cores (`bench/throughput.py --only linear`; the `real` section's decode rows show it in a model
step). fp32 CPU only: on a GPU, cuBLAS already streams the weight.

`few_row_linears(model)` is a context in which the model's ``nn.Linear`` layers run the kernel when
called with few rows; fastmem's sampler runs its decode steps in it. The reference is
``torch.nn.functional.linear`` itself (the tests compare both against it in fp64).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmem.ops import native

# Rows up to which the kernel beats torch's sgemm (1.2x at 32 rows, parity at 64; see the module docstring).
MAX_ROWS = 32


def _fp32_cpu(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def _records_gradient(*tensors: Tensor | None) -> bool:
    """Whether a linear call on these tensors would record a gradient (autograd on, one of them requires it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _as_rows(x: Tensor) -> Tensor:
    """x ``[..., in]`` as ``[rows, in]`` with unit stride along ``in`` (a view when it already has one)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def few_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` by the native few-row kernel.

    x: fp32 ``[..., in]`` on the CPU; weight: fp32 ``[out, in]``; bias: fp32 ``[out]`` or None. Any number
    of rows works (the kernel is meant for at most `MAX_ROWS`). Not differentiable: for inference.
    Returns fp32 ``[..., out]``. Raises RuntimeError when `fastmem._native` is not built, TypeError /
    ValueError for other dtypes, devices or mismatched shapes (before the kernel runs).
    """
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"few_row_linear: {name} must be a tensor, got {type(t).__name__}")
        if not _fp32_cpu(t):
            raise TypeError(f"few_row_linear takes fp32 CPU tensors; {name} is {t.dtype} on {t.device}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"few_row_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match "
                         "(x [..., in], weight [out, in])")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"few_row_linear: bias {tuple(bias.shape)} must be [{weight.shape[0]}] for weight "
                         f"{tuple(weight.shape)}")
    if _records_gradient(x, weight, bias):
        raise ValueError("few_row_linear is not differentiable: call it under torch.no_grad() or use F.linear")
    rows = _as_rows(x)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if rows.shape[0] == 0 or weight.shape[0] == 0:
        return x.new_zeros((*x.shape[:-1], weight.shape[0]))
    return native.few_row_linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])


def _weights_eligible(module: torch.nn.Linear) -> bool:
    """Whether a linear layer's weight and bias are what the kernel takes: fp32 on the CPU, the weight 2-D with
    unit stride, the bias contiguous ``[out]``. Trainable weights qualify: a call that would record a
    gradient is left to ``F.linear`` (`_rows`)."""
    weight, bias = module.weight, module.bias
    return (_fp32_cpu(weight) and weight.dim() == 2 and weight.stride(-1) == 1 and (
        bias is None or (_fp32_cpu(bias) and bias.is_contiguous() and tuple(bias.shape) == (weight.shape[0],))))


def _rows(x: Tensor, module: torch.nn.Linear) -> Tensor | None:
    """x as fp32 CPU ``[rows, in]`` with unit stride when the kernel should take this call (at most `MAX_ROWS`
    rows, the layer's weights still as `_weights_eligible` found them, no gradient to record: autograd off,
    or nothing in the call requires one), else None. Checked at every call, so a layer changed inside the
    context (another dtype, device or shape) falls back to ``F.linear`` instead of misreading memory."""
    weight = module.weight
    if (not _fp32_cpu(x) or x.dim() < 1 or x.shape[-1] != weight.shape[-1]
            or not 0 < x.numel() <= MAX_ROWS * weight.shape[-1] or not _weights_eligible(module)
            or _records_gradient(x, weight, module.bias)):
        return None
    return _as_rows(x)


def _few_row_forward(module: torch.nn.Linear, x: Tensor) -> Tensor:
    """``module(x)``: the kernel when `_rows` lets it take the call, ``F.linear`` otherwise."""
    rows = _rows(x, module)
    if rows is None:
        return F.linear(x, module.weight, module.bias)
    return native.few_row_linear(rows, module.weight, module.bias).view(*x.shape[:-1], module.weight.shape[0])


@contextmanager
def few_row_linears(model: torch.nn.Module):
    """Within the context, the ``nn.Linear`` layers of ``model`` whose weights are fp32 on the CPU run the
    native few-row kernel when called with at most `MAX_ROWS` rows and no gradient to record (under
    ``no_grad`` / ``inference_mode``, or with nothing requiring one), and ``F.linear`` otherwise; on exit
    they are as before. A layer with a forward of its own (a hook library's wrapper) and subclasses of
    ``nn.Linear`` (quantized layers) are left alone. Without `fastmem._native`, nothing changes.

    Installs an instance ``forward`` per layer on entry and removes it on exit (about 0.1 ms for SmolLM2's
    211 layers): meant around a decode loop."""
    installed = []
    if native.is_available():
        for module in model.modules():
            if type(module) is torch.nn.Linear and "forward" not in module.__dict__ and _weights_eligible(module):
                module.__dict__["forward"] = partial(_few_row_forward, module)
                installed.append(module)
    try:
        yield
    finally:
        for module in installed:
            module.__dict__.pop("forward", None)
