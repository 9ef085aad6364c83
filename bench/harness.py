"""Measurement machinery of bench/throughput.py: cases, interleaved timing, peak memory, the report.

A `Workload` is one set of inputs (built once from a fixed seed); a `Case` is one provider computing it
in one mode. Cases of the same workload and mode form a comparison: one of them is the baseline, and
every other is reported as baseline time / its time.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

FWD, FWD_BWD = "fwd", "fwd+bwd"
# A whole job (training steps, sampling, the online loop): the compute runs as it is, in its own grad mode.
END_TO_END = "end-to-end"
# FLOPs of a mode as a multiple of the forward's: backward = 2.5x forward (FlashAttention-2's convention).
FLOPS_FACTOR = {FWD: 1.0, FWD_BWD: 3.5, END_TO_END: 1.0}
GRAD_OUT = "grad_out"  # the inputs entry holding the output gradient of fwd+bwd cases


@dataclass(frozen=True)
class Workload:
    """Inputs one comparison runs on. ``make_inputs`` builds them on the device from a fixed seed, with
    a ``GRAD_OUT`` entry when the workload is differentiated; ``grad_inputs`` names the leaves fwd+bwd
    differentiates (their gradients are returned in that order). End-to-end workloads may hold any
    object among their inputs (a model, token lists). ``work``: what one call does, as ``(amount, unit)``
    (e.g. ``(16, "problems")``), reported as a rate per second. ``compared``: whether the providers'
    outputs can be compared (not for random samples drawn from different generators). ``baseline_flops``:
    the forward FLOPs the baseline executes, where it does more than the useful ``forward_flops`` (SDPA
    over concatenated keys computes the masked ones too), for the ``efficiency`` target. ``bytes_read``: the
    bytes one call must at least read from memory (weights, keys, values), for the roofline: a call's lower
    bound is max(bytes_read / copy bandwidth, FLOPs / matmul ceiling), both measured in the same run.
    ``peak_memory``: whether its cases' peak memory is measured (not when they compute in other processes)."""
    section: str
    name: str
    shape: dict
    make_inputs: Callable[[], dict]
    forward_flops: float | None = None
    grad_inputs: tuple[str, ...] = ()
    work: tuple[float, str] | None = None
    compared: bool = True
    bytes_read: float | None = None
    peak_memory: bool = True
    baseline_flops: float | None = None


@dataclass(frozen=True)
class Target:
    """A threshold: ``speedup`` over the baseline (or over the provider named ``against``, in the same
    comparison), ``ceiling`` fraction of the matmul FLOP/s, ``roofline``: the call's lower bound
    (see `Workload`) over its time, or ``efficiency``: its useful FLOP/s over the FLOP/s the baseline
    executes (``Workload.baseline_flops``), i.e. its fraction of the ceiling over the baseline's."""
    metric: str
    at_least: float
    against: str | None = None

    def label(self) -> str:
        if self.metric == "speedup":
            return f">={self.at_least:g}x" + (f" vs {self.against}" if self.against else "")
        if self.metric == "efficiency":
            return f">={self.at_least:g}x the baseline's FLOP efficiency"
        return f">={self.at_least:.0%} of {self.metric}"


@dataclass(frozen=True)
class Case:
    """One provider computing one workload in one mode; ``compute(inputs)`` returns the output."""
    workload: Workload
    provider: str
    mode: str
    compute: Callable[[dict[str, Tensor]], Tensor]
    is_baseline: bool = False
    targets: tuple[Target, ...] = ()

    @property
    def id(self) -> str:
        return ":".join((self.workload.section, self.workload.name, self.provider, self.mode))

    @property
    def comparison(self) -> tuple[str, str, str]:
        return self.workload.section, self.workload.name, self.mode

    @property
    def signature(self) -> str:
        """Equal for cases that measure the same thing, whatever their workload is called."""
        return json.dumps([self.workload.section, self.workload.shape, self.provider, self.mode], sort_keys=True)

    @property
    def flops(self) -> float | None:
        flops = self.workload.forward_flops
        return None if flops is None else flops * FLOPS_FACTOR[self.mode]


@dataclass(frozen=True)
class Sweep:
    """A scaling curve for --plot: the same comparison at several values ``x`` of one knob."""
    title: str
    x_label: str
    points: list[tuple[int, list[Case]]]


@dataclass(frozen=True)
class Timing:
    """Warm-up calls per case, samples per case, and the least time one sample spends in calls.
    ``time_first_call``: the first (checked) call is also the first sample (for jobs too long to run twice)."""
    warmup: int
    reps: int
    min_sample_s: float
    time_first_call: bool = False


@dataclass
class Measurement:
    """What one case gave: its timing samples, its agreement with the baseline, its peak memory."""
    case: Case
    samples_s: list[float]
    max_abs_diff: float | None  # largest difference from the baseline's outputs; None for the baseline
    peak_bytes: int | None = None


def comparison_cases(workload: Workload, modes: tuple[str, ...], baseline: tuple[str, Callable],
                     contenders: dict[str, Callable], targeted: str | None = None,
                     targets: tuple[Target, ...] = ()) -> list[Case]:
    """The baseline ``(provider, compute)`` and every contender in every mode; ``targets`` apply to the
    ``targeted`` contender."""
    cases = []
    for mode in modes:
        cases.append(Case(workload, baseline[0], mode, baseline[1], is_baseline=True))
        cases += [Case(workload, name, mode, compute, targets=targets if name == targeted else ())
                  for name, compute in contenders.items()]
    return cases


def build_inputs(workload: Workload) -> dict:
    inputs = workload.make_inputs()
    for name in workload.grad_inputs:
        inputs[name].requires_grad_()
    return inputs


def bind(case: Case, inputs: dict) -> Callable[[], tuple[Tensor, ...]]:
    """The timed call: the forward under no_grad, the forward and the gradients of the grad inputs, or
    (end-to-end) the compute as it is."""
    if case.mode == END_TO_END:
        return lambda: (case.compute(inputs),)
    if case.mode == FWD:
        def run():
            with torch.no_grad():
                return (case.compute(inputs),)
        return run
    leaves = [inputs[name] for name in case.workload.grad_inputs]

    def run():
        out = case.compute(inputs)
        return (out, *torch.autograd.grad(out, leaves, inputs[GRAD_OUT]))
    return run


def seconds_per_call(run: Callable, calls: int, device: torch.device) -> float:
    """Mean seconds of ``calls`` back-to-back calls (CUDA events around them on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start_s = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start_s) / calls


def max_abs_diff(outputs: tuple[Tensor, ...], reference: tuple[Tensor, ...]) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(outputs, reference, strict=True))


def measure(cases: list[Case], timing: Timing, device: torch.device) -> list[Measurement]:
    """Times every case, interleaved: each round takes one sample of every case, so load from other
    processes falls on all providers alike. The first call of each case is checked against its baseline."""
    inputs = {}
    for case in cases:
        if id(case.workload) not in inputs:
            inputs[id(case.workload)] = build_inputs(case.workload)
    runs = [bind(case, inputs[id(case.workload)]) for case in cases]
    first_outputs, first_s = [], []
    for run in runs:
        start_s = time.perf_counter()
        first_outputs.append(run())
        first_s.append(time.perf_counter() - start_s)
    baseline_outputs = {case.comparison: out for case, out in zip(cases, first_outputs) if case.is_baseline}
    measurements = [Measurement(case, [], None if case.is_baseline or case.comparison not in baseline_outputs
                                or not case.workload.compared
                                else max_abs_diff(out, baseline_outputs[case.comparison]))
                    for case, out in zip(cases, first_outputs)]
    del first_outputs, baseline_outputs
    if timing.time_first_call:
        for measurement, seconds in zip(measurements, first_s):
            measurement.samples_s.append(seconds)
    calls = []  # per sample, sized from the last warm-up call
    for run in runs:
        warmup_s = [seconds_per_call(run, 1, device) for _ in range(timing.warmup)]
        calls.append(max(1, round(timing.min_sample_s / warmup_s[-1])) if warmup_s else 1)
    for _ in range(timing.reps - timing.time_first_call):
        for measurement, run, count in zip(measurements, runs, calls):
            measurement.samples_s.append(seconds_per_call(run, count, device))
    return measurements


def measure_sweeps(sweeps: list[Sweep], timing: Timing,
                   device: torch.device) -> list[tuple[Sweep, list[list[Measurement]]]]:
    """Every point of every sweep, measured together (interleaved, so that the load of other processes
    cannot bend one curve against another); cases that measure the same thing are measured once."""
    unique = {case.signature: case for sweep in sweeps for _, cases in sweep.points for case in cases}
    measured = {m.case.signature: m for m in measure(list(unique.values()), timing, device)}
    return [(sweep, [[measured[case.signature] for case in cases] for _, cases in sweep.points])
            for sweep in sweeps]


def _proc_status_kb(field_name: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


# Peak RSS is read on Linux, whose high-water mark a process can reset (clear_refs "5").
CPU_PEAK_SUPPORTED = Path("/proc/self/clear_refs").exists()
# The processes measuring peak RSS serve big buffers with mmap, so freed ones leave the RSS.
PEAK_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
PEAK_MEMORY_DEFINITION = (
    "peak MB: memory one call adds at its peak over what its inputs and one warm-up call left: on CUDA "
    "torch.cuda.max_memory_allocated minus the allocated bytes before the call; on CPU the peak RSS "
    "(VmHWM, reset via /proc/self/clear_refs) minus the RSS before the call, in a fresh process per case "
    "(to within the kernel's lag in RSS counting, a few hundred KB)")


def case_peak_bytes(case: Case, device: torch.device) -> int:
    """Bytes one call of ``case`` adds at its peak, after its inputs are built and one warm-up call ran
    (see `PEAK_MEMORY_DEFINITION`; on CPU, through `peak_bytes_in_fresh_processes`)."""
    run = bind(case, build_inputs(case.workload))
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    Path("/proc/self/clear_refs").write_text("5")
    start_kb = _proc_status_kb("VmRSS")
    run()
    return (_proc_status_kb("VmHWM") - start_kb) * 1024


def peak_bytes_in_fresh_processes(cases: list[Case], threads: int) -> list[int]:
    """CPU `case_peak_bytes` of each case, one after another, each in a process forked for it from this
    one. Call it in a process started with `PEAK_RSS_ENV` that has run no torch op (so a fork inherits no
    thread pool): it pays the imports once, and no measurement sees another's leftovers."""
    import torch._dynamo  # noqa: F401  (the first call of a torch.library op imports it: seconds, paid here once)

    peaks = []
    for case in cases:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                torch.set_num_threads(threads)
                os.write(write_end, str(case_peak_bytes(case, torch.device("cpu"))).encode())
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            answer = pipe.read()
        if os.waitpid(pid, 0)[1] != 0:
            raise RuntimeError(f"peak memory of {case.id} failed (traceback above)")
        peaks.append(int(answer))
    return peaks


def measure_peak_memory(measurements: list[Measurement], device: torch.device,
                        command_for: Callable[[list[str]], list[str]]) -> None:
    """Fills ``peak_bytes``: in this process on CUDA; on CPU through two processes running
    ``command_for(case ids)`` side by side, which must print one peak per case id, in order
    (`peak_bytes_in_fresh_processes`)."""
    if device.type == "cuda":
        for measurement in measurements:
            measurement.peak_bytes = case_peak_bytes(measurement.case, device)
        return
    if not CPU_PEAK_SUPPORTED:
        return

    def peaks_of(part: list[Measurement]) -> None:
        done = subprocess.run(command_for([m.case.id for m in part]), env={**os.environ, **PEAK_RSS_ENV},
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"peak memory measurement failed:\n{done.stderr[-3000:]}")
        for measurement, peak in zip(part, done.stdout.split(), strict=True):
            measurement.peak_bytes = int(peak)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(peaks_of, [part for part in (measurements[0::2], measurements[1::2]) if part]))


def quantiles_ms(samples_s: list[float]) -> tuple[float, float, float]:
    """p20, median, p80 in milliseconds."""
    levels = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    p20, p50, p80 = torch.tensor(samples_s, dtype=torch.float64).quantile(levels).mul(1e3).tolist()
    return p20, p50, p80


def report_rows(measurements: list[Measurement], ceiling_flops_per_s: float,
                bandwidth_bytes_per_s: float | None = None) -> list[dict]:
    """Every figure of every measurement, ratios against the baseline of its comparison, targets judged.
    ``bandwidth_bytes_per_s``: the copy bandwidth measured in the same run (roofline rows need it)."""
    baselines = {m.case.comparison: m for m in measurements if m.case.is_baseline}
    medians = {(m.case.comparison, m.case.provider): quantiles_ms(m.samples_s)[1] for m in measurements}
    rows = []
    for m in measurements:
        case = m.case
        p20, median, p80 = quantiles_ms(m.samples_s)
        baseline = baselines.get(case.comparison)
        ratio = quantiles_ms(baseline.samples_s)[1] / median if baseline and not case.is_baseline else None
        flops_per_s = case.flops / (median / 1e3) if case.flops else None
        amount, unit = case.workload.work or (None, None)
        ceiling_fraction = flops_per_s / ceiling_flops_per_s if flops_per_s else None
        bound_s = None
        if case.workload.bytes_read is not None and bandwidth_bytes_per_s:
            bound_s = max(case.workload.bytes_read / bandwidth_bytes_per_s, (case.flops or 0) / ceiling_flops_per_s)
        roofline = bound_s / (median / 1e3) if bound_s else None
        efficiency = None
        if baseline and not case.is_baseline and ratio and case.flops and case.workload.baseline_flops:
            efficiency = ratio * case.workload.forward_flops / case.workload.baseline_flops

        def value(target: Target) -> float | None:
            if target.metric == "speedup" and target.against:
                other = medians.get((case.comparison, target.against))
                return other / median if other else None
            return {"speedup": ratio, "ceiling": ceiling_fraction, "roofline": roofline,
                    "efficiency": efficiency}[target.metric]
        rows.append(dict(
            id=case.id, section=case.workload.section, case=case.workload.name, provider=case.provider,
            mode=case.mode, shape=case.workload.shape, baseline=baseline.case.provider if baseline else None,
            median_ms=median, p20_ms=p20, p80_ms=p80, samples_ms=[s * 1e3 for s in m.samples_s],
            ratio_vs_baseline=ratio, flops=case.flops, gflops_per_s=flops_per_s and flops_per_s / 1e9,
            rate_per_s=amount and amount / (median / 1e3), rate_unit=unit,
            ceiling_fraction=ceiling_fraction, bytes_read=case.workload.bytes_read,
            bound_ms=bound_s and bound_s * 1e3, roofline_fraction=roofline,
            peak_mb=None if m.peak_bytes is None else m.peak_bytes / 2**20,
            max_abs_diff_vs_baseline=m.max_abs_diff,
            targets=[dict(target=t.label(), metric=t.metric, at_least=t.at_least, against=t.against,
                          value=value(t), met=value(t) is not None and value(t) >= t.at_least)
                     for t in case.targets]))
    return rows


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


COLUMNS = ("section", "case", "provider", "mode", "median ms", "p20–p80 ms", "ratio vs baseline", "rate", "GFLOP/s",
           "% of ceiling", "% of roofline", "peak MB", "target", "met?")


def _rate(row: dict) -> str:
    return "—" if row["rate_per_s"] is None else f"{_number(row['rate_per_s'])} {row['rate_unit']}/s"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        if row["ratio_vs_baseline"] is not None:
            ratio = f"{row['ratio_vs_baseline']:.2f}x"
        else:
            ratio = "baseline" if row["baseline"] == row["provider"] else "—"
        fraction = row["ceiling_fraction"]
        cells = (row["section"], row["case"], row["provider"], row["mode"], _number(row["median_ms"]),
                 f"{_number(row['p20_ms'])}–{_number(row['p80_ms'])}", ratio, _rate(row),
                 _number(row["gflops_per_s"]),
                 "—" if fraction is None else f"{fraction:.1%}",
                 "—" if row.get("roofline_fraction") is None else f"{row['roofline_fraction']:.1%}",
                 _number(row["peak_mb"]),
                 "; ".join(t["target"] for t in row["targets"]) or "—",
                 ", ".join("yes" if t["met"] else "NO" for t in row["targets"]) or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    """One line per target: what was reached, and met or missed by how much."""
    lines = []
    for row in rows:
        for target in row["targets"]:
            value, goal = target["value"], target["at_least"]
            if value is None:
                lines.append(f"- {row['section']} / {row['case']} / {row['mode']}, {row['provider']}: target "
                             f"{target['target']}: NOT MEASURED")
                continue
            if target["metric"] == "speedup":
                against = target.get("against") or row["baseline"]
                reached, short = f"{value:.2f}x the {against}", f"{goal - value:.2f}x"
                if row["rate_per_s"] is not None:
                    reached += (f" ({_number(row['rate_per_s'])} vs {_number(row['rate_per_s'] / value)} "
                                f"{row['rate_unit']}/s)")
            elif target["metric"] == "limit":   # an absolute bound (bench/store.py): at most at_most
                reached = f"{target['label']} {value:.3g} {target['unit']}"
                short = f"{value - target['at_most']:.3g} {target['unit']}"
            elif target["metric"] == "efficiency":
                baseline_fraction = row["ceiling_fraction"] / value
                reached = (f"{row['ceiling_fraction']:.1%} of the matmul ceiling, {value:.2f}x the "
                           f"{row['baseline']}'s {baseline_fraction:.1%} on the FLOPs it executes")
                short = f"{goal - value:.2f}x"
            elif target["metric"] == "roofline":
                reached = (f"{value:.1%} of its roofline bound ({_number(row['bound_ms'])} ms: max(bytes / copy "
                           f"bandwidth, FLOPs / matmul ceiling))")
                short = f"{(goal - value) * 100:.1f} points"
            else:
                reached, short = f"{value:.1%} of the matmul ceiling", f"{(goal - value) * 100:.1f} points"
            verdict = "met" if target["met"] else f"MISSED by {short}" + (
                f" (reached {value / goal:.0%} of the target)" if goal else "")
            lines.append(f"- {row['section']} / {row['case']} / {row['mode']}, {row['provider']}: {reached}; "
                         f"target {target['target']}: {verdict}")
    return lines


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where and when the figures were taken."""
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        cpu_model=_cpu_model(), cpu_cores=available_cores(), threads=torch.get_num_threads(),
        dtype=str(dtype).removeprefix("torch."), python=platform.python_version(), platform=platform.platform(),
        torch=torch.__version__, torch_cuda=torch.version.cuda,
        # other processes' load when the report was made (1-, 5-, 15-minute averages): on a shared machine
        # intra-op threads that share busy cores slow down many times over
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **{package: _version(package) for package in ("fastmem", "triton", "transformers", "flash-attn", "peft")})


def plot_sweeps(sweeps: list[dict], path: str, title: str) -> None:
    """One panel per sweep of the report: median time against the knob, a line per provider and mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 4.8), squeeze=False)
    providers = sorted({row["provider"] for sweep in sweeps for point in sweep["points"] for row in point["rows"]})
    for axis, sweep in zip(axes[0], sweeps):
        series: dict[tuple[str, str], tuple[list, list]] = {}
        for point in sweep["points"]:
            for row in point["rows"]:
                xs, ys = series.setdefault((row["provider"], row["mode"]), ([], []))
                xs.append(point["x"])
                ys.append(row["median_ms"])
        for (provider, mode), (xs, ys) in series.items():
            axis.plot(xs, ys, marker="o", color=f"C{providers.index(provider)}",
                      linestyle="-" if mode == FWD_BWD else "--", label=f"{provider} {mode}")
        ticks = [point["x"] for point in sweep["points"]]
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(ticks, [str(x) for x in ticks])
        axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_xlabel(sweep["x_label"])
        axis.set_ylabel("median ms per call")
        axis.set_title(sweep["title"])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
