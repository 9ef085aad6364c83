"""The ``store`` section of bench/throughput.py: `MemoryStore` at 1,000 / 10,000 / 100,000 entries next to the
store fastmem had before (``fastmem/store.py`` at `OLD_STORE_REV`, loaded from git), in the same run.

Each scale fills a fresh store in a temporary directory with random keys and memories, saving every 100 adds,
and reports: adds/s (the fill, saves included), save ms per 100 new entries (the last saves of the fill),
load s, search p50 ms (one query, top 2), RSS growth (MB) of a fresh process that loads the store and searches,
against 2x its keys and index (the unit keys and their ids, all the store keeps per entry besides its ranking),
and for ``index="ivf"`` at 100,000 entries its recall@10 against exact search. The old store rewrites
everything at every add and save, so it is measured only where that ends within seconds.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
OLD_STORE_REV = "3376201"          # the last commit with the version-1 store
DEFAULT_MEMORY = (3 * 2 * 8 * 2 * 32,)    # the shipped model's prefix (3 layers, K and V, 8 positions, 2 x 32), flat
DEFAULT_KEY = 128                  # its hidden size
SMOLLM2_MEMORY = (30, 2, 8, 3, 64)  # SmolLM2-135M's prefix of 8 positions (368 KB in fp32)
SMOLLM2_KEY = 576
TARGETS = dict(adds_2000_s=10.0, search_ms=5.0, rss_ratio=2.0)
SAVE_EVERY = 100


def scales(quick: bool, smoke: bool) -> list[tuple[str, int, tuple, int]]:
    """(label, entries, memory shape, key dim) of each measured store."""
    if smoke:
        return [("default", 300, DEFAULT_MEMORY, DEFAULT_KEY)]
    smollm2 = [("SmolLM2", 1_000, SMOLLM2_MEMORY, SMOLLM2_KEY), ("SmolLM2", 2_000 if quick else 10_000,
                                                                SMOLLM2_MEMORY, SMOLLM2_KEY)]
    return [*smollm2, *([("default", 10_000, DEFAULT_MEMORY, DEFAULT_KEY)] if quick else []),
            ("default", 100_000, DEFAULT_MEMORY, DEFAULT_KEY)]


def old_store_class():
    """``MemoryStore`` as fastmem had it at `OLD_STORE_REV`."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_STORE_REV}:fastmem/store.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("old_store")
    exec(compile(source, "old_store.py", "exec"), module.__dict__)
    return module.MemoryStore


def fill(store, entries: int, shape: tuple, dim: int, marks: tuple[int, ...] = ()) -> dict:
    """Add ``entries`` random entries, saving every `SAVE_EVERY`: total seconds, seconds at each mark, the
    last saves' ms."""
    generator = torch.Generator().manual_seed(0)
    memory = torch.randn(shape, generator=generator)
    saves, at = [], {}
    started = time.perf_counter()
    for i in range(entries):
        memory.view(-1)[0] = i   # a distinct memory, made in place: the fill times the store, not torch
        store.add(torch.randn(dim, generator=generator), memory)   # no metadata: the old and new APIs differ
        if (i + 1) % SAVE_EVERY == 0:
            before = time.perf_counter()
            store.save()
            saves.append(time.perf_counter() - before)
        if i + 1 in marks:
            at[i + 1] = time.perf_counter() - started
    return dict(total_s=time.perf_counter() - started, at=at, saves_ms=[s * 1e3 for s in saves[-5:]])


def search_ms(store, dim: int, queries: int = 50) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    times = []
    for _ in range(queries):
        query = torch.randn(dim, generator=generator)
        started = time.perf_counter()
        store.search(query, 2)
        times.append((time.perf_counter() - started) * 1e3)
    return times


RSS_PROBE = """
import json, sys, torch
from fastmem.store import MemoryStore
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
store = MemoryStore.load(sys.argv[1], readonly=True)
store.search(torch.randn(4, store._state['key_dim']), 2)
print(json.dumps(dict(growth=rss() - before, held=store._index.units[:len(store)].nbytes + 8 * len(store))))
"""


def rss_growth(directory: str) -> dict:
    """RSS growth of a fresh process opening ``directory`` and searching, and the bytes of its keys index."""
    result = subprocess.run([sys.executable, "-c", RSS_PROBE, directory], capture_output=True, text=True, check=True,
                            cwd=REPO)
    return json.loads(result.stdout)


def row(case: str, provider: str, samples_ms: list[float], rate: tuple[float, str] | None = None,
        targets: list[dict] = (), baseline: str | None = None, peak_mb: float | None = None) -> dict:
    """A report row in bench/harness.py's format (`report_rows`)."""
    p20, median, p80 = (statistics.quantiles(samples_ms, n=10, method="inclusive")[i] for i in (1, 4, 7)) \
        if len(samples_ms) > 1 else (samples_ms[0],) * 3
    return dict(id=f"store:{case}:{provider}", section="store", case=case, provider=provider, mode="end-to-end",
                shape={}, baseline=baseline, median_ms=median, p20_ms=p20, p80_ms=p80, samples_ms=samples_ms,
                ratio_vs_baseline=None, flops=None, gflops_per_s=None,
                rate_per_s=rate and rate[0], rate_unit=rate and rate[1], ceiling_fraction=None, bytes_read=None,
                bound_ms=None, roofline_fraction=None, peak_mb=peak_mb, max_abs_diff_vs_baseline=None,
                targets=list(targets))


def limit(label: str, value: float, at_most: float, unit: str) -> dict:
    return dict(target=f"<={at_most:g} {unit}", metric="limit", at_least=None, at_most=at_most, unit=unit,
                against=None, value=value, met=value <= at_most, label=label)


def measure_store(provider: str, make_store, entries: int, shape: tuple, dim: int, label: str) -> list[dict]:
    from fastmem.store import MemoryStore

    case = f"{entries:,} {label} entries {list(shape)}"
    with tempfile.TemporaryDirectory(prefix="fastmem-store-bench-") as directory:
        store = make_store(directory)
        filled = fill(store, entries, shape, dim, marks=(2_000,))
        rows = []
        targets = [limit("2,000 SmolLM2 adds", filled["at"][2_000], TARGETS["adds_2000_s"], "s")] \
            if provider == "fastmem" and label == "SmolLM2" and 2_000 in filled["at"] else []
        rows.append(row(f"{case}: fill, save per {SAVE_EVERY}", provider, [filled["total_s"] * 1e3],
                        rate=(entries / filled["total_s"], "adds"), targets=targets))
        rows.append(row(f"{case}: save {SAVE_EVERY} new", provider, filled["saves_ms"]))
        searches = search_ms(store, dim)
        rows.append(row(f"{case}: search 1 query, top 2", provider, searches,
                        targets=[limit("search p50", statistics.median(searches), TARGETS["search_ms"], "ms")]
                        if provider == "fastmem" and entries >= 100_000 else []))
        if hasattr(store, "close"):
            store.close()
        started = time.perf_counter()
        loaded = (MemoryStore if provider == "fastmem" else type(store)).load(directory)
        rows.append(row(f"{case}: load", provider, [(time.perf_counter() - started) * 1e3]))
        del loaded
        if provider == "fastmem":
            memory = rss_growth(directory)
            ratio = memory["growth"] / memory["held"]
            rows.append(row(f"{case}: RSS growth / keys index ({memory['held'] / 2**20:.1f} MB)", provider, [0.0],
                            peak_mb=memory["growth"] / 2**20,
                            targets=[limit("RSS growth over keys + index", ratio, TARGETS["rss_ratio"], "x")]
                            if entries >= 100_000 else []))   # below, fixed costs (SQLite, torch's buffers) dominate
    return rows


def ivf_search(entries: int, dim: int, clusters: int | None, k: int = 10, queries: int = 200) -> tuple[float, list]:
    """Recall@k of ``index="ivf"`` against exact search on ``entries`` keys (Gaussian when ``clusters`` is None:
    the hardest case for IVF; else around ``clusters`` centres), queried near random keys; and its search times
    (ms) of one query, top 2."""
    from fastmem.store import MemoryStore

    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(entries, dim, generator=generator)
    if clusters:
        keys = torch.randn(clusters, dim, generator=generator)[torch.randint(clusters, (entries,), generator=generator)] \
            + 0.5 * keys
    asked = keys[torch.randint(entries, (queries,), generator=generator)] + 0.3 * torch.randn(queries, dim,
                                                                                               generator=generator)
    store = MemoryStore(capacity=entries, index="ivf")
    memory = torch.zeros(1)
    for key in keys:
        store.add(key, memory)
    found = store.search(asked, k)[1]
    truth = (torch.nn.functional.normalize(asked, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T).topk(k)[1]
    recall = sum(len(set(a.tolist()) & set(t.tolist())) for a, t in zip(found, truth)) / truth.numel()
    return recall, search_ms(store, dim)


def store_rows(quick: bool, smoke: bool) -> tuple[list[dict], str]:
    """Every row of the section, and its note."""
    from fastmem.store import IVF_NPROBE, MemoryStore

    rows = []
    for label, entries, shape, dim in scales(quick, smoke):
        rows += measure_store("fastmem", lambda d: MemoryStore(d, capacity=entries), entries, shape, dim, label)
    old = old_store_class()
    for label, entries, shape, dim in ([("default", 300, DEFAULT_MEMORY, DEFAULT_KEY)] if smoke else
                                       [("default", 1_000, DEFAULT_MEMORY, DEFAULT_KEY),
                                        ("SmolLM2", 200, SMOLLM2_MEMORY, SMOLLM2_KEY)]):
        rows += measure_store(f"old store ({OLD_STORE_REV})", lambda d: old(d, capacity=entries), entries, shape, dim,
                              label)
    note = (f"store: fresh stores in a temporary directory, random keys and memories, a save every {SAVE_EVERY} adds; "
            "'save 100 new' = the last 5 saves of the fill; search = 50 single queries; RSS growth = a fresh "
            "process loading the store read-only and searching, over the bytes of its unit keys and ids; the old "
            f"store (git {OLD_STORE_REV}) copies everything at each add and save, so it runs only at small sizes")
    try:
        import faiss  # noqa: F401
    except ImportError:
        return rows, note + "; ivf recall not measured (faiss not installed)"
    entries = 2_000 if smoke else 100_000
    random, times = ivf_search(entries, DEFAULT_KEY, None)
    clustered, _ = ivf_search(entries, DEFAULT_KEY, entries // 100)
    rows.append(row(f"{entries:,} keys [{DEFAULT_KEY}], index='ivf': search 1 query, top 2", "fastmem", times,
                    targets=[limit("search p50", statistics.median(times), TARGETS["search_ms"], "ms")]
                    if entries >= 100_000 else []))
    return rows, note + (f"; index='ivf' (nprobe {IVF_NPROBE}) recall@10 vs exact at {entries:,} {DEFAULT_KEY}-d keys: "
                         f"{random:.3f} on Gaussian keys, {clustered:.3f} on keys around {entries // 100:,} centres")
