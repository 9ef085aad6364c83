"""How fast fastmem is next to what users run today, measured in the same run.

    python bench/throughput.py [--only attention,decode,linear,train,sample,loop,real,store] [--quick] [--json FILE]
                               [--plot FILE.png] [--device cpu|cuda] [--reps N] [--threads N]

Prints a Markdown table (every figure next to its baseline, as baseline time / fastmem time), then one
line per target, met or missed by how much. Kernel sections (attention, decode; linear: bench/linear.py)
time one op; end-to-end sections (train, sample, loop; bench/learning.py) time a whole job against HF + PEFT;
`real` (bench/real.py)
does so on SmolLM2-135M-Instruct, with all threads, and judges a decode step against its roofline; `store`
(bench/store.py) fills, saves, loads and searches `MemoryStore` at 1,000 to 100,000 entries next to the old store,
writing gigabytes to a temporary directory. To add a section:
write ``<name>_cases(settings)`` returning `Case`s (build them with `comparison_cases`) and add a row to
`SECTIONS`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastmem  # noqa: E402
from bench.baselines import (concat_cache_decode, flash_attn_func, flash_attn_prefix_attention,  # noqa: E402
                             peft_prefix_attention, sdpa_flash_prefix_attention)
from bench.harness import (END_TO_END, FWD, FWD_BWD, GRAD_OUT, PEAK_MEMORY_DEFINITION, Case, Sweep, Target,  # noqa: E402
                           Timing, Workload, available_cores, comparison_cases, environment,
                           markdown_table, measure, measure_peak_memory, measure_sweeps,
                           peak_bytes_in_fresh_processes, plot_sweeps, quantiles_ms, report_rows,
                           target_lines)
from bench.learning import (LOOP_NOTE, SAMPLE_NOTE, TRAIN_NOTE, LR, loop_cases, sample_cases,  # noqa: E402
                            train_cases)
from bench.linear import LINEAR_NOTE, linear_cases  # noqa: E402
from bench.ranks import RANKS_NOTE, ranks_cases  # noqa: E402
from bench.real import real_cases, real_note, real_timing  # noqa: E402
from bench.store import store_rows  # noqa: E402
from fastmem.ops import backends, native  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """What every section builds its cases for. ``smoke``: tiny shapes that run every code path in
    seconds (their times mean nothing); ``quick``: fewer sweep points."""
    device: torch.device
    dtype: torch.dtype
    smoke: bool = False
    quick: bool = False


@dataclass(frozen=True)
class Section:
    """A part of the report: its cases and, for --plot, its scaling curves. ``end_to_end``: its calls are
    whole jobs (one call per sample, see `timing_for`); ``note``: a line for the report (or a function of
    --quick giving it). ``timing``: its own `Timing` as a function of (--quick, --smoke), instead of
    `timing_for`'s; ``all_threads``: an end-to-end section that runs with --threads, not --e2e-threads;
    ``peak_memory``: whether its cases' peak memory is measured (each in a fresh process: a second run);
    ``roofline``: its rows need the copy bandwidth (measured with the ceiling). ``rows``: a section measured
    its own way, as a function of (--quick, --smoke) giving its report rows and note (no cases)."""
    cases: Callable[[Settings], list[Case]]
    sweeps: Callable[[Settings], list[Sweep]] | None = None
    end_to_end: bool = False
    note: str | Callable[[bool], str] | None = None
    timing: Callable[[bool, bool], Timing] | None = None
    all_threads: bool = False
    peak_memory: bool = True
    roofline: bool = False
    rows: Callable[[bool, bool], tuple[list[dict], str]] | None = None

    def note_for(self, quick: bool) -> str | None:
        return self.note(quick) if callable(self.note) else self.note


def call_with(function: Callable, arg_names: tuple[str, ...], **options) -> Callable:
    """A case's compute: ``function`` applied to the named inputs, in order."""
    return lambda inputs: function(*(inputs[name] for name in arg_names), **options)


def seeded_randn(settings: Settings, seed: int = 0) -> Callable[..., torch.Tensor]:
    """``randn(*size)`` drawing from one CPU generator, then moved to the device and dtype."""
    generator = torch.Generator().manual_seed(seed)
    return lambda *size: torch.randn(*size, generator=generator).to(settings.device, settings.dtype)


def timed_backends(settings: Settings, head_dim: int) -> list[str]:
    """fastmem backends that run here (Triton only on CUDA: its CPU interpreter checks, it is not fast)."""
    return [name for name in backends.BACKENDS
            if backends.unavailable_reason(name) is None
            and backends.supports(name, settings.device, settings.dtype, head_dim)
            and (name != "triton" or settings.device.type == "cuda")]


def auto_backend(settings: Settings, head_dim: int) -> str:
    """What ``backend="auto"`` picks here: targets are judged on it."""
    return backends.resolve("auto", settings.device, settings.dtype, head_dim)


def fastmem_provider(backend: str) -> str:
    return f"fastmem[{backend}]"


def fastmem_contenders(backend_names: list[str], arg_names: tuple[str, ...]) -> dict[str, Callable]:
    return {fastmem_provider(name): call_with(fastmem.prefix_attention, arg_names, backend=name)
            for name in backend_names}


# ---------------------------------------------------------------------------------------------- ceiling

def ceiling_cases(settings: Settings) -> list[Case]:
    """The machine's ceiling: a large matmul in the benchmark's dtype (2 n^3 FLOPs)."""
    size = 256 if settings.smoke else 8192 if settings.device.type == "cuda" else 2048

    def make_inputs():
        randn = seeded_randn(settings)
        return dict(a=randn(size, size), b=randn(size, size))

    workload = Workload("ceiling", f"matmul {size}x{size} {str(settings.dtype).removeprefix('torch.')}",
                        dict(n=size), make_inputs, 2.0 * size**3)
    return [Case(workload, "torch", FWD, lambda inputs: inputs["a"] @ inputs["b"])]


def bandwidth_cases(settings: Settings) -> list[Case]:
    """The machine's copy bandwidth: ``dst.copy_(src)`` of a buffer far larger than the caches, counted as
    the bytes it reads and writes (2 x the buffer)."""
    elements = 2**16 if settings.smoke else 2**26   # 256 MiB of fp32

    def make_inputs():
        src = torch.ones(elements, device=settings.device, dtype=torch.float32)
        return dict(src=src, dst=torch.empty_like(src))

    size = elements * 4
    workload = Workload("bandwidth", f"copy {size / 2**20:.0f} MiB", dict(bytes=size), make_inputs,
                        bytes_read=2.0 * size)
    return [Case(workload, "torch", FWD, lambda inputs: inputs["dst"].copy_(inputs["src"]))]

# -------------------------------------------------------------------------------------------- attention

@dataclass(frozen=True)
class AttentionShape:
    """B rows of T queries and T own keys each; a pool of S slots of P positions; GQA heads."""
    batch: int
    seq_len: int
    prefix_len: int
    slots: int
    q_heads: int
    kv_heads: int
    head_dim: int

    def forward_flops(self) -> float:
        """Useful forward FLOPs, causal halving counted: QK^T and PV (2 * D each) over the keys each
        query sees, 4 * B * Hq * D * (T * P + T * (T + 1) / 2)."""
        visible_keys = self.seq_len * self.prefix_len + self.seq_len * (self.seq_len + 1) / 2
        return 4.0 * self.batch * self.q_heads * self.head_dim * visible_keys

    def concat_flops(self) -> float:
        """Forward FLOPs SDPA executes over the concatenated keys (the PEFT way): every query against
        every key, masked or not, 4 * B * Hq * D * T * (P + T)."""
        return 4.0 * self.batch * self.q_heads * self.head_dim * self.seq_len * (self.prefix_len + self.seq_len)


ATTENTION_SHAPE = AttentionShape(batch=32, seq_len=128, prefix_len=32, slots=64, q_heads=8, kv_heads=2, head_dim=64)
# On CUDA the shape above is launch-bound (well under a millisecond): FLOP/s are compared on this one.
GPU_ATTENTION_SHAPE = AttentionShape(batch=16, seq_len=1024, prefix_len=64, slots=64, q_heads=32, kv_heads=8,
                                     head_dim=128)
SMOKE_ATTENTION_SHAPE = AttentionShape(batch=4, seq_len=8, prefix_len=4, slots=6, q_heads=4, kv_heads=2, head_dim=16)
ATTENTION_ARGS = ("q", "k", "v", "prefix_k", "prefix_v", "prefix_index")
PEFT_WAY = ("PEFT way", call_with(peft_prefix_attention, ATTENTION_ARGS))


def attention_workload(settings: Settings, shape: AttentionShape, rows_per_slot: int, name: str) -> Workload:
    """Random inputs; consecutive groups of ``rows_per_slot`` rows share one (randomly chosen) slot."""
    def make_inputs():
        randn = seeded_randn(settings)
        rows = (shape.batch, shape.seq_len)
        pool = (shape.slots, shape.prefix_len, shape.kv_heads, shape.head_dim)
        slot_order = torch.randperm(shape.slots, generator=torch.Generator().manual_seed(1))
        inputs = dict(q=randn(*rows, shape.q_heads, shape.head_dim), k=randn(*rows, shape.kv_heads, shape.head_dim),
                      v=randn(*rows, shape.kv_heads, shape.head_dim), prefix_k=randn(*pool), prefix_v=randn(*pool),
                      prefix_index=slot_order[torch.arange(shape.batch) // rows_per_slot].to(settings.device))
        inputs[GRAD_OUT] = randn(*rows, shape.q_heads, shape.head_dim)
        return inputs

    return Workload("attention", name, dict(asdict(shape), rows_per_slot=rows_per_slot), make_inputs,
                    shape.forward_flops(), grad_inputs=("q", "k", "v", "prefix_k", "prefix_v"),
                    baseline_flops=shape.concat_flops())


def attention_cases(settings: Settings) -> list[Case]:
    """fastmem (every backend) and flash-attn (CUDA, when importable) against the PEFT way, forward and
    forward+backward, with distinct slots per row and with groups of rows sharing a slot. Targets: the
    speedup, half the matmul ceiling, and on CPU at least the FLOP efficiency of SDPA's kernel in the
    PEFT way (its fraction of the ceiling on the masked work it executes; issue 15)."""
    shape, shared_rows = (SMOKE_ATTENTION_SHAPE, 2) if settings.smoke else (ATTENTION_SHAPE, 8)
    contenders = fastmem_contenders(timed_backends(settings, shape.head_dim), ATTENTION_ARGS)
    if settings.device.type == "cuda" and flash_attn_func is not None:
        contenders["flash-attn (concat)"] = call_with(flash_attn_prefix_attention, ATTENTION_ARGS)
    auto = fastmem_provider(auto_backend(settings, shape.head_dim))
    cases = []
    for rows_per_slot, speedup in ((1, 1.5), (shared_rows, 3.0)):
        name = "distinct slots" if rows_per_slot == 1 else f"{rows_per_slot} rows/slot"
        cases += comparison_cases(attention_workload(settings, shape, rows_per_slot, name), (FWD, FWD_BWD),
                                  PEFT_WAY, contenders, targeted=auto,
                                  targets=(Target("speedup", speedup), Target("ceiling", 0.5),
                                           *((Target("efficiency", 1.0),) if settings.device.type == "cpu" else ())))
    if settings.device.type == "cuda" and not settings.smoke:
        cases += flash_comparison_cases(settings)
    return cases + layer_call_cases(settings)


# One layer's call in a decode step of `fastmem.sample` on SmolLM2-135M (9 query / 3 KV heads, D = 64): 16 sample
# rows, each continuing its prompt's slot of a 16-slot pool (memory + prompt, up to 64 positions), 32 own keys.
LAYER_CALL_SHAPE = AttentionShape(batch=16, seq_len=1, prefix_len=64, slots=16, q_heads=9, kv_heads=3, head_dim=64)
LAYER_CALL_OWN_KEYS = 32
LAYER_CALL_CASE = "layer call at decode size"
ONE_OFF, PLANNED = "one-off call (checks)", "plan reused"


def layer_call_cases(settings: Settings) -> list[Case]:
    """Host time of one layer's `prefix_attention` call at decode size (auto backend, forward): a one-off call,
    which checks and converts the index every call (one host sync), against a call handed the forward's
    `AttentionPlan`, built once outside the timed calls."""
    shape = LAYER_CALL_SHAPE

    def make_inputs():
        randn = seeded_randn(settings)
        own = (shape.batch, LAYER_CALL_OWN_KEYS, shape.kv_heads, shape.head_dim)
        pool = (shape.slots, shape.prefix_len, shape.kv_heads, shape.head_dim)
        index = torch.arange(shape.batch, device=settings.device) % shape.slots
        lens = torch.randint(1, shape.prefix_len + 1, (shape.slots,), generator=torch.Generator().manual_seed(2))
        lens = lens.to(settings.device)
        return dict(q=randn(shape.batch, 1, shape.q_heads, shape.head_dim), k=randn(*own), v=randn(*own),
                    prefix_k=randn(*pool), prefix_v=randn(*pool), prefix_index=index, prefix_lens=lens,
                    plan=fastmem.plan_prefix_attention(index, lens, num_slots=shape.slots,
                                                       prefix_len=shape.prefix_len, dtype=settings.dtype,
                                                       head_dim=shape.head_dim, backward=False))

    flops = 4.0 * shape.batch * shape.q_heads * shape.head_dim * (shape.prefix_len + LAYER_CALL_OWN_KEYS)
    workload = Workload("attention", LAYER_CALL_CASE, dict(asdict(shape), own_keys=LAYER_CALL_OWN_KEYS), make_inputs,
                        flops)
    tensors = ("q", "k", "v", "prefix_k", "prefix_v")
    return comparison_cases(workload, (FWD,), (ONE_OFF, call_with(fastmem.prefix_attention, (*tensors, "prefix_index",
                                                                                              "prefix_lens"))),
                            {PLANNED: lambda inputs: fastmem.prefix_attention(*(inputs[n] for n in tensors),
                                                                              plan=inputs["plan"])})


def layer_call_line(report: dict) -> str | None:
    """The note giving host µs per layer call, one-off and planned, on the device run (and why not the other)."""
    medians = {row["provider"]: row["median_ms"] * 1e3 for row in report["rows"] if row["case"] == LAYER_CALL_CASE}
    if not medians:
        return None
    device = report["environment"]["device"]
    other = ("CPU: run with --device cpu" if device == "cuda" else
             "CUDA: run with --device cuda" if torch.cuda.is_available() else "CUDA: not timed: no GPU")
    kernel = "; a CPU call runs its kernel on the host too: the difference is the host work the plan saves"
    return (f"attention: host time per prefix_attention layer call at decode size ({device}, auto backend"
            f"{kernel if device == 'cpu' else ''}): {medians[ONE_OFF]:.1f} µs one-off (checks the index every call), "
            f"{medians[PLANNED]:.1f} µs with the forward's plan reused ({medians[ONE_OFF] / medians[PLANNED]:.2f}x); "
            f"{other}")


def flash_comparison_cases(settings: Settings) -> list[Case]:
    """GPU size: fastmem against FlashAttention-2 on the concatenated K/V (flash-attn when importable, else
    SDPA's flash kernel), target >= 0.8x its FLOP/s; the PEFT way alongside."""
    shape = GPU_ATTENTION_SHAPE
    flash = (("flash-attn (concat)", call_with(flash_attn_prefix_attention, ATTENTION_ARGS))
             if flash_attn_func is not None else
             ("SDPA flash (concat)", call_with(sdpa_flash_prefix_attention, ATTENTION_ARGS)))
    contenders = {**fastmem_contenders([auto_backend(settings, shape.head_dim)], ATTENTION_ARGS),
                  PEFT_WAY[0]: PEFT_WAY[1]}
    return comparison_cases(attention_workload(settings, shape, 1, "GPU size, distinct slots"), (FWD, FWD_BWD),
                            flash, contenders, targeted=fastmem_provider(auto_backend(settings, shape.head_dim)),
                            targets=(Target("speedup", 0.8),))


def attention_sweeps(settings: Settings) -> list[Sweep]:
    """Time against prefix length P (distinct slots) and against rows sharing one slot: `auto` vs PEFT
    (fwd+bwd only, and fewer points, in --quick)."""
    base = SMOKE_ATTENTION_SHAPE if settings.smoke else ATTENTION_SHAPE
    if settings.smoke:
        prefix_lens, sharing = (2, 4), (1, 4)
    elif settings.quick:
        prefix_lens, sharing = (8, 32, 128), (1, 8, 32)
    else:
        prefix_lens, sharing = (8, 16, 32, 64, 128, 256), (1, 2, 4, 8, 16, 32)
    modes = (FWD_BWD,) if settings.quick else (FWD, FWD_BWD)
    contenders = fastmem_contenders([auto_backend(settings, base.head_dim)], ATTENTION_ARGS)

    def point(shape: AttentionShape, rows_per_slot: int, name: str) -> list[Case]:
        return comparison_cases(attention_workload(settings, shape, rows_per_slot, name), modes, PEFT_WAY,
                                contenders)

    return [Sweep("prefix length (distinct slots)", "prefix length P",
                  [(p, point(replace(base, prefix_len=p), 1, f"P={p}")) for p in prefix_lens]),
            Sweep(f"rows sharing one slot (P={base.prefix_len})", "rows per slot",
                  [(r, point(base, r, f"rows/slot={r}")) for r in sharing])]


# ----------------------------------------------------------------------------------------------- decode

@dataclass(frozen=True)
class DecodeShape:
    """One decode step (one query per row) of B rows over a memory, a shared prompt and an own cache."""
    batch: int
    memory_len: int
    prompt_len: int
    cache_len: int
    q_heads: int
    kv_heads: int
    head_dim: int

    def forward_flops(self) -> float:
        """4 * B * Hq * D * (memory + prompt + cache positions): every key is visible to the one query."""
        return 4.0 * self.batch * self.q_heads * self.head_dim * (self.memory_len + self.prompt_len + self.cache_len)


DECODE_SHAPE = DecodeShape(batch=64, memory_len=16, prompt_len=256, cache_len=256, q_heads=8, kv_heads=2, head_dim=64)
SMOKE_DECODE_SHAPE = DecodeShape(batch=4, memory_len=3, prompt_len=8, cache_len=6, q_heads=4, kv_heads=2, head_dim=16)
DECODE_FASTMEM_ARGS = ("q", "cache_k", "cache_v", "pool_k", "pool_v", "pool_index", "pool_lens")
DECODE_BASELINE_ARGS = ("q", "memory_k", "memory_v", "prompt_k", "prompt_v", "cache_k", "cache_v")


def decode_workload(settings: Settings, shape: DecodeShape) -> Workload:
    """Per-row memories, one prompt cache, per-row own caches; and fastmem's pool holding the memories
    (slot b: row b's, first ``memory_len`` positions valid) and the prompt (slot B), indexed ``[B, 2]``."""
    def make_inputs():
        randn = seeded_randn(settings)
        heads = (shape.kv_heads, shape.head_dim)
        batch, memory_len, prompt_len = shape.batch, shape.memory_len, shape.prompt_len
        inputs = dict(q=randn(batch, 1, shape.q_heads, shape.head_dim),
                      memory_k=randn(batch, memory_len, *heads), memory_v=randn(batch, memory_len, *heads),
                      prompt_k=randn(prompt_len, *heads), prompt_v=randn(prompt_len, *heads),
                      cache_k=randn(batch, shape.cache_len, *heads), cache_v=randn(batch, shape.cache_len, *heads))
        for part in "kv":
            pool = inputs[f"memory_{part}"].new_zeros(batch + 1, max(memory_len, prompt_len), *heads)
            pool[:batch, :memory_len] = inputs[f"memory_{part}"]
            pool[batch, :prompt_len] = inputs[f"prompt_{part}"]
            inputs[f"pool_{part}"] = pool
        slots = torch.stack([torch.arange(batch), torch.full((batch,), batch)], dim=1)
        inputs["pool_index"] = slots.to(settings.device)
        inputs["pool_lens"] = torch.tensor([memory_len] * batch + [prompt_len], device=settings.device)
        return inputs

    return Workload("decode", f"{shape.batch} rows, memory + shared prompt", asdict(shape), make_inputs,
                    shape.forward_flops())


def decode_cases(settings: Settings) -> list[Case]:
    """One decode step: fastmem reading memory and prompt from the pool by ``[B, 2]`` index, against
    concatenating memory + prompt + own cache per row every step."""
    shape = SMOKE_DECODE_SHAPE if settings.smoke else DECODE_SHAPE
    contenders = fastmem_contenders(timed_backends(settings, shape.head_dim), DECODE_FASTMEM_ARGS)
    return comparison_cases(decode_workload(settings, shape), (FWD,),
                            ("concat cache", call_with(concat_cache_decode, DECODE_BASELINE_ARGS)), contenders,
                            targeted=fastmem_provider(auto_backend(settings, shape.head_dim)),
                            targets=(Target("speedup", 3.0),))


# ------------------------------------------------------------------------------------------ the command

CEILING = Section(ceiling_cases)
BANDWIDTH = Section(bandwidth_cases)
SECTIONS = {
    "attention": Section(attention_cases, attention_sweeps),
    "decode": Section(decode_cases),
    "linear": Section(linear_cases, note=LINEAR_NOTE, peak_memory=False, roofline=True),
    "train": Section(train_cases, end_to_end=True, note=TRAIN_NOTE.format(lr=LR)),
    "sample": Section(sample_cases, end_to_end=True, note=SAMPLE_NOTE),
    "loop": Section(lambda settings: loop_cases(settings) + ranks_cases(settings), end_to_end=True,
                    note=f"{LOOP_NOTE}; {RANKS_NOTE}"),
    "real": Section(real_cases, end_to_end=True, note=real_note, timing=real_timing, all_threads=True,
                    peak_memory=False, roofline=True),
    "store": Section(lambda settings: [], rows=store_rows, peak_memory=False),
}
DEFAULT_SECTIONS = [name for name in SECTIONS if name not in ("real", "store")]
FLOP_CONVENTION = ("GFLOP/s counts useful work only, the same for every provider: attention fwd = "
                   "4·B·Hq·D·(T·P + T(T+1)/2) (causal halving counted: each query's visible keys; SDPA in the PEFT way "
                   "executes 4·B·Hq·D·T·(P + T), masked keys included, which the FLOP-efficiency target credits it "
                   "with), decode step fwd = 4·B·Hq·D·(memory + prompt + cache) (the attention section's layer call "
                   "likewise: slot + own keys), fwd+bwd = 3.5 × fwd; ceiling = 2n³ per matmul; "
                   "real: 2 FLOPs per weight per token (decoder matmuls, and the head where a token predicts) + "
                   "4·Hq·D per visible key per layer")


def section_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section {', '.join(map(repr, unknown)) or '(none given)'}; "
                                         f"sections: {', '.join(SECTIONS)}")
    return names


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=section_names, default=DEFAULT_SECTIONS, metavar="SECTIONS",
                        help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all but "
                             f"{', '.join(sorted(set(SECTIONS) - set(DEFAULT_SECTIONS)))}, which needs the real "
                             "model of scripts/real_model.py and runs minutes, and store, which writes GBs to disk)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer warm-ups, samples and sweep points (about 2 minutes on 2 CPU cores)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one sample, no memory runs: checks every code path (times mean nothing)")
    parser.add_argument("--json", metavar="FILE", help="write every figure and the environment as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot scaling curves of the sections that have them")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when a GPU is visible); fp32 on cpu, bf16 on cuda")
    parser.add_argument("--reps", type=positive_int, help="samples per case (default: 15, --quick: 5)")
    parser.add_argument("--threads", type=positive_int, default=available_cores(),
                        help="torch threads (default: the cores this process may use)")
    parser.add_argument("--e2e-threads", type=positive_int, default=1,
                        help="torch threads of the end-to-end sections (train, sample, loop) on CPU (default 1: "
                             "their models are tiny, and the PEFT baselines' many small ops slow down 10-15x "
                             "when intra-op threads share busy cores)")
    parser.add_argument("--measure-memory", nargs="+", metavar="CASE_ID", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def timing_for(args: argparse.Namespace, end_to_end: bool = False) -> Timing:
    """Kernel sections: warm-ups, then samples of back-to-back calls. End-to-end sections: one call per
    sample (a call is a whole job); in --quick the checked first call is their only warm-up."""
    if args.smoke:
        timing = Timing(warmup=0, reps=1, min_sample_s=0.0)
    elif end_to_end:
        timing = Timing(warmup=0, reps=5, min_sample_s=0.0) if args.quick else Timing(warmup=1, reps=10,
                                                                                        min_sample_s=0.0)
    elif args.quick:
        timing = Timing(warmup=1, reps=5, min_sample_s=0.02)
    else:
        timing = Timing(warmup=3, reps=15, min_sample_s=0.1)
    return replace(timing, reps=args.reps) if args.reps else timing


def find_case(settings: Settings, case_id: str) -> Case:
    section = {"ceiling": CEILING, "bandwidth": BANDWIDTH, **SECTIONS}.get(case_id.split(":")[0])
    for case in section.cases(settings) if section else ():
        if case.id == case_id:
            return case
    raise SystemExit(f"bench/throughput.py: no case {case_id!r}")


def memory_command(args: argparse.Namespace, case_ids: list[str]) -> list[str]:
    """This script in a new process, printing the peak memory of each case (see `--measure-memory`). Two
    run side by side (`measure_peak_memory`), each with half the threads."""
    threads = args.threads if args.device == "cuda" else max(1, args.threads // 2)
    return [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--threads", str(threads),
            *(["--smoke"] if args.smoke else []), "--measure-memory", *case_ids]


STARTED_S = time.perf_counter()


def progress(message: str) -> None:
    print(f"[throughput {time.perf_counter() - STARTED_S:4.0f} s] {message}", file=sys.stderr, flush=True)


def end_to_end_threads(args: argparse.Namespace) -> int:
    return args.e2e_threads if args.device == "cpu" else args.threads


def section_threads(args: argparse.Namespace, section: Section) -> int:
    return end_to_end_threads(args) if section.end_to_end and not section.all_threads else args.threads


def section_timing(args: argparse.Namespace, section: Section) -> Timing:
    if section.timing is not None:
        timing = section.timing(args.quick, args.smoke)
        return replace(timing, reps=args.reps) if args.reps else timing
    return timing_for(args, end_to_end=section.end_to_end)


def run(args: argparse.Namespace, settings: Settings) -> dict:
    """Measures the ceiling and the requested sections (and their sweeps with --plot): the report."""
    timing, end_to_end_timing = timing_for(args), timing_for(args, end_to_end=True)
    roofline = any(SECTIONS[name].roofline for name in args.only)
    sections = {"ceiling": CEILING, **({"bandwidth": BANDWIDTH} if roofline else {}),
                **{name: SECTIONS[name] for name in args.only}}
    measurements, timings, own_rows, notes = [], {}, [], {}
    for name, section in sections.items():
        if section.rows is not None:
            progress(f"{name}: measuring")
            section_rows, notes[name] = section.rows(settings.quick, settings.smoke)
            own_rows += section_rows
            continue
        cases = section.cases(settings)
        timings[name] = section_timing(args, section)
        progress(f"{name}: timing {len(cases)} cases, {timings[name].reps} samples each")
        torch.set_num_threads(section_threads(args, section))
        measurements += measure(cases, timings[name], settings.device)
    torch.set_num_threads(args.threads)
    if not args.smoke:
        measured = [m for m in measurements if sections[m.case.workload.section].peak_memory
                    and m.case.workload.peak_memory]
        progress(f"peak memory of {len(measured)} cases")
        measure_peak_memory(measured, settings.device, lambda case_ids: memory_command(args, case_ids))
    ceiling = measurements[0]
    ceiling_flops_per_s = ceiling.case.flops / (quantiles_ms(ceiling.samples_s)[1] / 1e3)
    bandwidth_bytes_per_s = None
    if roofline:
        copy = measurements[1]
        bandwidth_bytes_per_s = copy.case.workload.bytes_read / (quantiles_ms(copy.samples_s)[1] / 1e3)
    sweeps = [sweep for section in sections.values() if args.plot and section.sweeps
              for sweep in section.sweeps(settings)]
    if sweeps:
        progress(f"sweeps: {', '.join(sweep.title for sweep in sweeps)}")
    env = environment(settings.device, settings.dtype)
    env["fastmem_backends"] = {name: backends.unavailable_reason(name) or "available"
                               for name in backends.BACKENDS}
    env["auto_backend"] = auto_backend(settings, ATTENTION_SHAPE.head_dim)
    if settings.device.type == "cpu" and native.is_available():
        env["native_cpu_tiles"] = native.cpu_tiles()
    return dict(
        environment=env, sections=args.only, timing=asdict(timing),
        end_to_end_timing=dict(asdict(end_to_end_timing), threads=end_to_end_threads(args)),
        section_timing={name: dict(asdict(timings[name]), threads=section_threads(args, SECTIONS[name]))
                        for name in args.only if SECTIONS[name].timing or SECTIONS[name].all_threads},
        notes={**{name: SECTIONS[name].note_for(args.quick) for name in args.only if SECTIONS[name].note}, **notes},
        smoke=args.smoke, quick=args.quick,
        conventions=dict(flops=FLOP_CONVENTION, peak_memory=PEAK_MEMORY_DEFINITION if not args.smoke else None),
        ceiling_gflops_per_s=ceiling_flops_per_s / 1e9,
        copy_bandwidth_gb_per_s=bandwidth_bytes_per_s and bandwidth_bytes_per_s / 1e9,
        rows=report_rows(measurements, ceiling_flops_per_s, bandwidth_bytes_per_s) + own_rows,
        sweeps=[dict(title=sweep.title, x_label=sweep.x_label,
                     points=[dict(x=x, rows=report_rows(point, ceiling_flops_per_s))
                             for (x, _), point in zip(sweep.points, points)])
                for sweep, points in measure_sweeps(sweeps, timing, settings.device)],
        wall_s=time.perf_counter() - STARTED_S)


def render(report: dict) -> str:
    """The Markdown report: a header, the table, one line per target, notes."""
    env, timing, rows = report["environment"], report["timing"], report["rows"]
    end_to_end = [name for name in report["sections"] if SECTIONS[name].end_to_end
                  and name not in report.get("section_timing", {})]
    lines = [f"fastmem throughput: {env['device_name']} ({env['device']}), {env['dtype']}, {env['threads']} "
             f"threads, torch {env['torch']}, {env['date']}; auto backend: {env['auto_backend']}"
             + ("; native CPU kernels: {isa} build, {micro_rows}-row micro-tiles, L2 {l2_kib} KiB".format(
                 **env["native_cpu_tiles"], l2_kib=env["native_cpu_tiles"]["l2_bytes"] // 1024)
                if env.get("native_cpu_tiles") else ""),
             f"timing: median and p20–p80 of {timing['reps']} samples per case after one checked call and "
             f"{timing['warmup']} warm-up call(s); a sample is ≥{timing['min_sample_s'] * 1e3:.0f} ms of "
             "back-to-back calls; the cases of a section interleaved round by round",
             *([f"end-to-end sections ({', '.join(end_to_end)}): {report['end_to_end_timing']['threads']} "
                f"thread(s), {report['end_to_end_timing']['reps']} samples of one call each, after one checked "
                f"call and {report['end_to_end_timing']['warmup']} warm-up call(s); rate = work per call / "
                "median time"] if end_to_end else []),
             *[f"{name} section: {t['threads']} thread(s), {t['reps']} sample(s) of one call each"
               f"{' (the checked first call counts as one)' if t['time_first_call'] else ''}; rate = work per "
               "call / median time" for name, t in report.get("section_timing", {}).items()],
             *([f"matmul ceiling {report['ceiling_gflops_per_s']:.1f} GFLOP/s, copy bandwidth "
                f"{report['copy_bandwidth_gb_per_s']:.1f} GB/s (read + write), measured in this run; load "
                f"average {', '.join(f'{x:.1f}' for x in env.get('load_average') or [])}"]
               if report.get("copy_bandwidth_gb_per_s") else []),
             *(["SMOKE RUN: tiny shapes, to check the code paths; its times mean nothing"]
               if report["smoke"] else []), "",
             markdown_table(rows), "", "Targets (judged on the backend auto picks):",
             *(target_lines(rows) or ["- none in the sections run"]), "", "Notes:",
             f"- ratio vs baseline = baseline median / this median (> 1: faster than the baseline). "
             f"{report['conventions']['flops']}.",
             f"- {report['conventions']['peak_memory'] or 'peak memory: not measured in --smoke runs'}."]
    if layer_call_line(report):
        lines.append(f"- {layer_call_line(report)}.")
    for name in report["sections"]:
        diffs = [row["max_abs_diff_vs_baseline"] for row in rows
                 if row["section"] == name and row["max_abs_diff_vs_baseline"] is not None]
        if name in report["notes"]:
            lines.append(f"- {report['notes'][name]}.")
        if diffs:
            lines.append(f"- {name}: outputs{'' if name in report['notes'] else ' (and gradients, fwd+bwd)'} "
                         f"match the baseline to max |diff| {max(diffs):.2g}")
    lines.append(f"- wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench/throughput.py: --device cuda needs a CUDA GPU, and torch {torch.__version__} sees none")
    device = torch.device(args.device)
    settings = Settings(device, torch.float32 if device.type == "cpu" else torch.bfloat16, args.smoke, args.quick)
    if args.measure_memory:  # CPU peak memory, for `measure_peak_memory` of the parent process
        cases = [find_case(settings, case_id) for case_id in args.measure_memory]
        if any(case.mode == END_TO_END for case in cases):
            import peft  # noqa: F401  (imported once here, before the forks, not seconds in every child)

            import fastmem.hf  # noqa: F401
        print("\n".join(map(str, peak_bytes_in_fresh_processes(cases, args.threads))))
        return
    torch.set_num_threads(args.threads)
    report = run(args, settings)
    if args.plot:
        env = report["environment"]
        plot_sweeps(report["sweeps"], args.plot, f"fastmem vs PEFT way: {env['device_name']}, {env['dtype']}, "
                                                 f"{env['threads']} threads, auto backend = {env['auto_backend']}")
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
