"""The `linear` section of bench/throughput.py: a decode step's linear layers at few rows, CPU fp32.

Every linear layer of SmolLM2-135M-Instruct once (30 layers x q, k, v, o, gate, up, down, then the
[49152, 576] head: 566 MB of fp32 weights, random, far larger than the caches, so every call reads its
weights from memory as a decode step does), at 1, 8, 32 and 64 rows: `fastmem.ops.linear.few_row_linear`
(what `fastmem.sample`'s decode steps run up to `MAX_ROWS` rows) against ``torch.nn.functional.linear``
(torch's sgemm, what the layers run otherwise), with each call's roofline: max(weight bytes / the copy
bandwidth, FLOPs / the matmul ceiling), both measured in the same run. --smoke: 2 small layers.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from bench.harness import FWD, Case, Target, Workload, comparison_cases
from fastmem.ops import native
from fastmem.ops.linear import MAX_ROWS, few_row_linear

if TYPE_CHECKING:
    from bench.throughput import Settings

HIDDEN, INTERMEDIATE, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30      # SmolLM2-135M
LAYER_SHAPES = ((HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN),
                (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE))              # (out, in) of q, k, v, o, gate, up, down
ROWS = (1, 8, 32, 64)
SMOKE_ROWS = (1, 3)
# Where `few_row_linears` uses the kernel it must not lose to sgemm.
TARGET = 1.0
BASELINE = "torch F.linear (sgemm)"
FASTMEM = "fastmem few_row_linear"


@lru_cache(maxsize=2)
def weights(smoke: bool) -> tuple[torch.Tensor, ...]:
    """The layers' weights (one set for every row count: built once per process)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 16), (24, 16)] if smoke else [*LAYER_SHAPES * LAYERS, (VOCAB, HIDDEN)]
    return tuple(torch.randn(*shape, generator=generator) * 0.05 for shape in shapes)


def torch_linears(inputs):
    return torch.cat([F.linear(inputs["x"][w.shape[1]], w)[:, :1] for w in inputs["weights"]], 1)


def fastmem_linears(inputs):
    return torch.cat([few_row_linear(inputs["x"][w.shape[1]], w)[:, :1] for w in inputs["weights"]], 1)


def linear_cases(settings: "Settings") -> list[Case]:
    if settings.device.type != "cpu" or settings.dtype != torch.float32 or not native.is_available():
        return []
    cases = []
    for rows in SMOKE_ROWS if settings.smoke else ROWS:
        def make_inputs(rows=rows):
            layers = weights(settings.smoke)
            generator = torch.Generator().manual_seed(rows)
            features = {w.shape[1] for w in layers}
            return dict(weights=layers, x={n: torch.randn(rows, n, generator=generator) for n in features})

        layers = weights(settings.smoke)
        parameters = sum(w.numel() for w in layers)
        workload = Workload("linear", f"{len(layers)} linears ({parameters * 4 / 1e6:.0f} MB fp32), {rows} rows",
                            dict(rows=rows, layers=len(layers), parameters=parameters), make_inputs,
                            forward_flops=2.0 * rows * parameters, bytes_read=4.0 * parameters, peak_memory=False)
        cases += comparison_cases(workload, (FWD,), (BASELINE, torch_linears), {FASTMEM: fastmem_linears},
                                  targeted=FASTMEM,
                                  targets=(Target("speedup", TARGET),) if rows <= MAX_ROWS else ())
    return cases


LINEAR_NOTE = (f"every SmolLM2-135M linear once, random fp32 weights read from memory; fastmem.sample's decode "
               f"steps use the kernel up to MAX_ROWS = {MAX_ROWS} rows (the 64-row case shows why not beyond); CPU "
               "fp32 only (the section is empty elsewhere)")
