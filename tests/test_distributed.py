"""`fastmem run` on two CPU processes (gloo): the records and the store of one process, a dead rank's clear error,
and --resume after it; shares of a batch and bad launches."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmem.__main__ import main
from fastmem.distributed import join_torchrun_group, share
from fastmem.store import MemoryStore

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parent.parent
# Batches of 3 split 2 + 1 over two ranks; the last batch (one problem) leaves rank 1 without work. Three clusters
# form and grow across batches, with and without votes to train on, and replay their problems (trained by the
# rank of their first retriever in a batch).
RUN = ["--limit", "10", "--samples", "3", "--control", "1", "--steps", "2", "--batch-size", "3",
       "--max-new-tokens", "32", "--cluster-similarity", "0.9", "--replay", "2", "--no-baselines"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def run_files(where: Path) -> tuple[Path, Path]:
    return where / "store", where / "results.jsonl"


def output_args(where: Path) -> list[str]:
    store, out = run_files(where)
    return ["--store", str(store), "--out", str(out)]


def assert_same_run(where: Path, reference: Path) -> None:
    """Identical records (answers, samples, memory ids, retrieval), identical store metadata, and keys and memories
    equal to within rounding (their bits may depend on the shape of the batched forward that made them)."""
    (store, out), (reference_store, reference_out) = run_files(where), run_files(reference)
    assert out.read_text() == reference_out.read_text()
    with MemoryStore.load(store, readonly=True) as got, MemoryStore.load(reference_store, readonly=True) as expected:
        assert got.ids == expected.ids
        for entry_id in got.ids:
            (memory, meta), (expected_memory, expected_meta) = got.get(entry_id), expected.get(entry_id)
            assert meta == expected_meta
            torch.testing.assert_close(got.key(entry_id), expected.key(entry_id), atol=1e-5, rtol=0)
            # Adam's normalized steps carry a 1e-7 difference of a small gradient into the weights: 1.2e-4 seen
            torch.testing.assert_close(memory, expected_memory, atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The run in this process, without torch.distributed."""
    where = tmp_path_factory.mktemp("one_process")
    main(["run", *RUN, *output_args(where)])
    return where


def test_two_ranks_write_what_one_process_writes(one_process, tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "fastmem", "run", *RUN, *output_args(tmp_path)],
                          env=environment(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(run_files(tmp_path)[1].read_text().splitlines()) == 10
    assert_same_run(tmp_path, one_process)


def test_a_killed_rank_stops_the_other_and_resume_continues(one_process, tmp_path):
    _, out = run_files(tmp_path)
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-m", "fastmem", "run", *RUN, *output_args(tmp_path),
                               "--rank-timeout", "60"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for rank in range(2)]
    try:
        deadline = time.monotonic() + 90
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline and ranks[0].poll() is None:
            time.sleep(0.02)
        assert out.exists() and out.read_text(), "rank 0 committed no batch"
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=30)       # no hang: gloo sees the closed connection at once
        assert time.monotonic() - killed < 30
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 1, stderr[-3000:]     # not SIGABRT from gloo's threads at exit
    assert "fastmem run: error: rank 0 of 2: exchanging" in stderr and "another rank died" in stderr
    assert "continue with --resume" in stderr
    committed = out.read_text().splitlines()
    assert 0 < len(committed) < 10 and len(committed) % 3 == 0      # whole batches only
    with MemoryStore.load(run_files(tmp_path)[0], readonly=True) as store:
        assert len(store) >= 1
    main(["run", *RUN, *output_args(tmp_path), "--resume"])           # continued by one process
    assert_same_run(tmp_path, one_process)


def test_resume_solves_again_a_batch_whose_store_was_not_saved(one_process, tmp_path, capsys):
    """A crash between appending a batch's records to --out and saving --store (rank 0 or one process)."""
    store, out = run_files(tmp_path)
    main(["run", *RUN, *output_args(tmp_path), "--limit", "3"])      # batch 1 committed: records and store
    with MemoryStore.load(store, readonly=True) as saved:
        assert saved.progress == 3
    batch_2 = run_files(one_process)[1].read_text().splitlines()[3:6]
    with out.open("a") as handle:                                       # batch 2's records, its store never saved
        handle.write("".join(line + "\n" for line in batch_2))
    main(["run", *RUN, *output_args(tmp_path), "--resume"])
    assert "3 records of a batch whose store was never saved" in capsys.readouterr().err
    assert_same_run(tmp_path, one_process)
    foreign = tmp_path / "foreign.jsonl"                                # a store ahead of --out: refused, no change
    foreign.write_text("")
    with pytest.raises(SystemExit, match="--store committed 10 problems but --out holds 0 records"):
        main(["run", *RUN, "--store", str(store), "--out", str(foreign), "--resume"])
    assert foreign.read_text() == ""


def test_shares_split_a_batch_in_order():
    for count in range(7):
        for world in (1, 2, 3, 4):
            parts = [share(count, rank, world) for rank in range(world)]
            assert [i for part in parts for i in part] == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_bad_launches_are_one_line_errors(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="not launched by torchrun: RANK, WORLD_SIZE"):
        join_torchrun_group("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="--device must be auto, cuda or cpu"):
        join_torchrun_group("cuda:1")
    with pytest.raises(ValueError, match="positive number of seconds"):
        join_torchrun_group("cpu", timeout_s=0)
