"""The loop section's scaling row: one batch solved by `OnlineLearner` on one CPU process and on two (gloo), one
thread each, every process a worker that stays up between calls (`RankPool`), so a call times the batch alone.

Both pools solve the loop row's batch (bench/learning.py `LOOP_SHAPE`) from a copy of the same seeded store; with
per-problem random streams their vote shares are equal, which the harness checks (the rows' max |diff|).
"""
from __future__ import annotations

import multiprocessing
import socket
import weakref
from dataclasses import asdict
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from bench.harness import END_TO_END, Case, Target, Workload, comparison_cases
from bench.learning import DEFAULT_MODEL, LOOP_SHAPE, SMOKE_LOOP_SHAPE, LoopShape, fastmem_loop, loop_workload

if TYPE_CHECKING:
    from bench.throughput import Settings

ONE_PROCESS = "fastmem OnlineLearner, 1 process"
RANKS_NOTE = ("the 1 vs 2 process rows time the learner's batch in worker processes that stay up between calls "
              "(one thread each; the exchanges through gloo on this machine), and compare their vote shares")
TWO_PROCESSES = "fastmem OnlineLearner, 2 processes (gloo)"


def _serve(rank: int, world: int, port: int, shape: LoopShape, smoke: bool, connection) -> None:
    """A worker: joins the group (world > 1), builds the loop row's inputs, then solves the batch on each request
    (True), answering with rank 0's vote shares; stops on False."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        group = dist.group.WORLD
    settings = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, smoke=smoke)
    inputs = dict(loop_workload(settings, shape).make_inputs(), process_group=group)
    solve = fastmem_loop(shape)
    connection.send("ready")
    while connection.recv():
        connection.send(solve(inputs))


class RankPool:
    """``world`` worker processes (spawned, one thread each) holding the loop row's inputs; `solve` times them."""

    def __init__(self, world: int, shape: LoopShape, smoke: bool):
        context = multiprocessing.get_context("spawn")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.connections = []
        for rank in range(world):
            ours, theirs = context.Pipe()
            context.Process(target=_serve, args=(rank, world, port, shape, smoke, theirs), daemon=True).start()
            theirs.close()                      # so that a worker's death reads as EOFError here
            self.connections.append(ours)
        for connection in self.connections:
            connection.recv()
        weakref.finalize(self, _stop, self.connections)

    def solve(self) -> torch.Tensor:
        """One batch on every worker; rank 0's vote shares ``[B]``."""
        for connection in self.connections:
            connection.send(True)
        return [connection.recv() for connection in self.connections][0]


def _stop(connections) -> None:
    for connection in connections:
        connection.send(False)


def ranks_cases(settings: "Settings") -> list[Case]:
    """The loop row's batch on 1 and on 2 CPU processes (target: 1.8x the problems/s); none on CUDA."""
    if settings.device.type != "cpu":
        return []
    shape = SMOKE_LOOP_SHAPE if settings.smoke else LOOP_SHAPE

    def make_inputs():
        return {world: RankPool(world, shape, settings.smoke) for world in (1, 2)}

    workload = Workload("loop", f"{shape.problems} problems as the row above, on 1 vs 2 CPU processes of 1 thread",
                        dict(asdict(shape), kind="prefix", model=DEFAULT_MODEL.describe(), processes=[1, 2]), make_inputs,
                        work=(shape.problems, "problems"), peak_memory=False)
    return comparison_cases(workload, (END_TO_END,), (ONE_PROCESS, lambda pools: pools[1].solve()),
                            {TWO_PROCESSES: lambda pools: pools[2].solve()}, targeted=TWO_PROCESSES,
                            targets=(Target("speedup", 1.8),))
