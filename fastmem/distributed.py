"""The online loop on several processes with `torch.distributed`: joining the group torchrun describes,
each rank's share of a batch, and the exchanges between ranks, which fail with a clear error when a rank is gone.

`OnlineLearner` with a ``process_group`` runs a batch of B questions on N ranks like this (with no group the
same code runs, the exchanges handing back this process's own values):

1. Each rank embeds its `share` of the questions (contiguous, in stream order). Exchange 1: the keys
   (``4 * hidden`` bytes per question), so that every rank holds all B.
2. Every rank searches its store and plans all B questions: the ranks' stores are equal, so the plans are.
3. Each rank samples, votes and trains the memories of its share (and of the replayed problems of each
   cluster whose first retriever in the batch is in its share). Every random draw of a problem (its
   samples, the initial value of a fresh memory) comes from streams named by the run's seed and the
   problem's position in the stream (`fastmem.sampling.stream_seed`), never by the rank, and a slot's
   training (loss, gradient, Adam state) involves no other slot: what a problem gets does not depend on
   which problems share its forward, or on N (up to the rounding of batched kernels, whose bits can
   depend on a batch's shape, e.g. its widest prompt: the stored keys agree to about 1e-5, the
   memories to about 1e-4, Adam's normalized steps carrying the difference).
4. Exchange 2: per question its trained memory (fp32: ``2 * layers * P * kv_heads * head_dim`` values for
   a prefix, ``P * hidden`` for a soft prompt), its samples (text and token ids), answers and vote; per
   replayed problem its trained memory. Every rank then applies the same store updates in stream order
   (the one-process code on the same values, merges averaged in a fixed order), so the stores stay equal,
   bit for bit, before the next batch.

Rank 0 alone writes files (`fastmem.cli`). A rank that dies makes the others' next exchange fail, at once
when its connection closes, else after the group's timeout: `RankFailure`.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """An exchange between ranks failed: another rank died, or did not reach it within the group's timeout."""


def torchrun_world_size() -> int:
    """The number of ranks torchrun started (``WORLD_SIZE``); 1 when not launched by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_torchrun_group(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[torch.device, dist.ProcessGroup]:
    """Join the process group torchrun describes in the environment (`TORCHRUN_VARIABLES`); returns this
    rank's device and the group.

    device: "auto" (CUDA when available, else CPU), "cuda" (each rank takes ``cuda:LOCAL_RANK``: one GPU per
    rank) or "cpu". The backend follows the device: NCCL on CUDA, gloo on CPU. timeout_s: how long a rank
    waits at an exchange for the others (seconds). ValueError for a device naming one GPU (``cuda:N``: the
    ranks would share it), for fewer visible GPUs than local ranks, or a missing torchrun variable.
    """
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(f"not launched by torchrun: {', '.join(missing)} missing from the environment")
    if not timeout_s > 0:
        raise ValueError(f"the timeout must be a positive number of seconds; got {timeout_s!r}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"with several ranks, --device must be auto, cuda or cpu (each rank takes "
                         f"cuda:LOCAL_RANK); got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        chosen, backend = torch.device("cpu"), "gloo"
    else:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} needs cuda:{local_rank}, but torch sees "
                             f"{torch.cuda.device_count()} CUDA devices: start at most that many ranks per node")
        chosen, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(chosen)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": chosen} if backend == "nccl" else {}))
    return chosen, dist.group.WORLD


def share(count: int, rank: int, world: int) -> range:
    """Rank ``rank``'s part of ``count`` items split over ``world`` ranks: contiguous, in order, the first
    ``count % world`` ranks taking one more."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def all_gather(value: dict, group: dist.ProcessGroup | None, what: str) -> list[dict]:
    """Every rank's ``value`` (a dict of picklable values; its tensor values travel through the host, moved to
    the CPU), in rank order; ``[value]`` itself without a group. RankFailure naming ``what`` when another
    rank is gone or does not arrive within the group's timeout."""
    if group is None:
        return [value]
    sent = {name: item.cpu() if isinstance(item, torch.Tensor) else item for name, item in value.items()}
    received: list = [None] * group.size()
    try:
        dist.all_gather_object(received, sent, group=group)
    except RuntimeError as error:        # gloo and NCCL: a closed connection, an abort, or the timeout
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RankFailure(f"rank {group.rank()} of {group.size()}: exchanging {what} failed: another rank died "
                          f"or did not arrive within the timeout ({reason})") from error
    return received


def broadcast(value, group: dist.ProcessGroup | None, what: str):
    """Rank 0's ``value`` (picklable) on every rank: rank 0 keeps its own object (a store on disk stays the
    one it writes), the others get unpickled copies (a store: an in-memory snapshot); ``value`` itself
    without a group. RankFailure as `all_gather`."""
    if group is None or group.rank() == 0:
        all_gather({"value": value}, group, what)
        return value
    return all_gather({"value": None}, group, what)[0]["value"]
