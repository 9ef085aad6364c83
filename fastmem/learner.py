"""`OnlineLearner`: retrieve, sample, vote, distill, store — test-time learning without labels.

Per batch of questions:

1. Embed each question (default: the base model's mean-pooled last hidden states, no memory) and
   retrieve the ``retrieve`` most similar stored memories (cosine).
2. Start each question's new memory from what was retrieved: in ``memory="problem"`` mode the
   similarity-weighted mean of the retrieved memories at least ``min_similarity`` similar; in
   ``memory="cluster"`` mode the memory of the nearest cluster at least ``cluster_similarity``
   similar. Nothing similar enough: a fresh memory.
3. Sample ``n`` answers: ``n - control`` with the retrieved memory when its gate is open, and
   ``control`` without memory. The gate (label-free; ``gate=True``): a memory stays in use while,
   over the batches that used it, its samples agreed with the majority vote at least as often as the
   control samples did; after ``gate_trials`` uses with a lower agreement it closes and is no longer
   used (it may still train). ``gate=False``: a retrieved memory is always used (the control samples,
   if any, are still drawn and still vote). Extract each answer and take the majority vote
   (math-verify equivalence).
4. Train the new memories ``steps`` Adam steps, all questions in one batched step per step
   (`MemoryTrainer`): ``sft`` on the majority-consistent traces, or ``reinforce`` with the 0/1
   majority reward. Confidence filter: a question whose vote share is below ``min_share`` gives no
   training signal. Replay (``cluster`` mode, ``replay > 0``): each cluster keeps the prompts and
   majority-consistent traces of its last ``replay`` trained questions, and every step also trains
   on them (each in its own slot, starting from the cluster's memory), so one batch's update of a
   cluster is averaged over its new and its remembered problems.
5. Store: ``problem`` mode adds one entry per question; ``cluster`` mode writes the trained memory
   back into its cluster (the mean over the slots of that cluster that had a training signal; the
   cluster key is the running mean of its members' keys) or opens a new cluster. Metadata:
   question(s), majority answer, vote share, step, hits, gate statistics, replay buffer.
6. Every ``consolidate_every`` batches (0: never), `MemoryStore.consolidate` merges entries whose
   keys are more than ``consolidate_threshold`` similar (near-duplicate problems in ``problem`` mode;
   clusters whose running-mean keys drifted together in ``cluster`` mode).

With a process group, each batch's questions are split across the ranks for steps 1-4, and step 5 runs on
every rank on everything the ranks exchanged (`fastmem.distributed`). No label is ever seen: `solve` takes
question strings only. The returned answer is the majority
answer (``resample=True``: the majority of ``n`` new samples drawn with the trained memory).
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from fastmem.hf.shared_prefix import run_after_memory
from fastmem.memory import MemoryBank, PrefixBank
from fastmem.prompting import PromptFormat
from fastmem.distributed import all_gather, share
from fastmem.options import COSINE, NON_NEGATIVE, POSITIVE, UNIT, Range, check_options, option
from fastmem.sampling import sample, stream_seed
from fastmem.store import EntryMeta, MemoryStore
from fastmem.training import OBJECTIVES, MemoryTrainer, trains_on
from fastmem.voting import answers_equivalent, extract_answer, majority_vote

KINDS = {"soft_prompt": MemoryBank.soft_prompts, "prefix": MemoryBank.prefixes}
GRANULARITIES = ("problem", "cluster")
# a problem's random streams, ``stream_seed(seed, position in the stream, STREAM)``
TREATED_SAMPLES, CONTROL_SAMPLES, RESAMPLED, FRESH_MEMORY = range(4)


@dataclass(frozen=True)
class Result:
    """What the learner answered for one question, and how.

    answer: the majority answer (None when no sample had one); vote_share: its share of the samples.
    memory_id: the store entry this question trained (its own entry, or its cluster's; after a
    consolidation it may have been merged into another entry, which lists it under ``merged``).
    retrieved: store ids the new memory started from; used_memory: whether samples drew on it.
    samples / answers: every sample's text and extracted answer (memory samples first, then control).
    resampled: with ``resample=True``, the extracted answers of the ``n`` samples drawn after training with
    this question's own trained memory (what distillation achieved on it); else empty.
    """
    question: str
    answer: str | None
    vote_share: float
    memory_id: int
    retrieved: list[int]
    used_memory: bool
    samples: list[str]
    answers: list[str | None]
    memory_samples: int = field(default=0)
    resampled: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class LearnerConfig:
    """Every plain setting of `OnlineLearner`, with its default, allowed values and help text in one place:
    the constructor takes one, and ``python -m fastmem run`` builds its learner options from these fields
    (`fastmem.cli`). Built with a value of the wrong type or out of range: ValueError naming the field.

    The defaults (prefix memories, one per cluster at similarity 0.9, 2 Adam steps per batch at lr 1e-2, gate
    off with 2 control samples still voting, no confidence filter, no replay) are the best of the
    configurations measured: lr and steps on SmolLM2-135M-Instruct (README, "On a real model, measured":
    lr 3e-2 with 4 steps made the cluster memory drift), the rest on the built-in default model, which
    prefers the stronger lr 3e-2 with 4 steps (README, "Does it learn?"); each alternative was measured too.
    """
    n: int = option(8, "samples per problem (under torchrun write --samples: torchrun reads --n as its own --nnodes "
                       "or --nproc-per-node)", "sampling", allowed=POSITIVE, flags=("--n", "--samples"))
    temperature: float = option(1.0, "sampling temperature (0: greedy)", "sampling", allowed=NON_NEGATIVE)
    top_p: float = option(1.0, "nucleus sampling mass (1: off)", "sampling", allowed=Range(0, 1, low_open=True))
    sample_top_k: int = option(0, "sample among the k most likely tokens (0: off; `fastmem.sample`'s top_k)",
                               "sampling", allowed=NON_NEGATIVE, flags=("--top-k",))
    min_p: float = option(0.0, "drop tokens less likely than min-p times the most likely one (0: off)", "sampling",
                          allowed=Range(0, 1, high_open=True))
    stop: tuple[str, ...] = option((), "a string that ends a sample (repeat for several); none: eos and the length "
                                       "limit only", "sampling")
    max_new_tokens: int = option(96, "tokens per sample at most", "sampling", allowed=POSITIVE)
    steps: int = option(2, "Adam steps per batch", "learning", allowed=NON_NEGATIVE)
    retrieve: int = option(2, "stored memories retrieved per problem (the most similar keys)", "learning",
                           allowed=POSITIVE)
    kind: str = option("prefix", "memory kind: soft-prompt embeddings or per-layer prefix keys and values",
                       "learning", allowed=tuple(KINDS))
    memory: str = option("cluster", "one memory per problem, or per cluster of similar problems", "learning",
                         allowed=GRANULARITIES)
    batch_size: int = option(16, "problems per batch", "learning", allowed=POSITIVE)
    lr: float = option(1e-2, "Adam learning rate", "learning", allowed=POSITIVE)
    length: int = option(8, "memory positions per slot", "learning", allowed=POSITIVE)
    prefix_init: str = option("tokens", "a fresh prefix: the keys and values of random tokens, or N(0, 1) as PEFT",
                              "learning", allowed=PrefixBank.INITS)
    objective: str = option("sft", "sft: train on the majority-consistent traces; reinforce: on every trace with "
                                   "its 0/1 majority reward", "learning", allowed=OBJECTIVES)
    gate: bool = option(False, "use a retrieved memory only while its samples agree with the vote at least as often "
                               "as the control samples do", "learning")
    control: int = option(2, "samples per problem drawn without memory (less than --n)", "learning",
                          allowed=NON_NEGATIVE)
    gate_trials: int = option(2, "uses before the gate may close", "learning", allowed=NON_NEGATIVE)
    min_similarity: float = option(0.5, "cosine similarity for a stored memory to seed a new one (memory=problem)",
                                   "learning", allowed=COSINE)
    cluster_similarity: float = option(0.9, "cosine similarity to join a cluster (memory=cluster)", "learning",
                                       allowed=COSINE)
    min_share: float = option(0.0, "train only on problems whose majority holds at least this share of the samples",
                              "learning", allowed=UNIT)
    replay: int = option(0, "past problems per cluster trained on again at every step (memory=cluster)", "learning",
                         allowed=NON_NEGATIVE)
    consolidate_every: int = option(0, "merge near-duplicate store entries every this many batches (0: never)",
                                    "learning", allowed=NON_NEGATIVE)
    consolidate_threshold: float = option(0.95, "cosine similarity above which store entries are merged",
                                          "learning", allowed=Range(0, 1, low_open=True))   # MemoryStore.consolidate's
    resample: bool = option(False, "after training, draw n new samples of each problem with its own trained memory "
                                   "and answer their majority (the comparison then reports distillation)", "learning")
    seed: int = option(0, "names every random stream: the built-in data stream, each problem's samples and fresh "
                          "memory", "data")

    def __post_init__(self):
        check_options(self)
        if not self.control < self.n:
            raise ValueError(f"control must lie in [0, n={self.n}); got {self.control}")


class OnlineLearner:
    """Learns from a stream of questions by distilling majority-voted samples into stored memories.

    model: a Hugging Face causal LM (patched here with `fastmem.patch` and frozen); tokenizer: its
    tokenizer; store: a `MemoryStore`; config: a `LearnerConfig` (default: its defaults); ``options``:
    `LearnerConfig` fields that replace config's (``OnlineLearner(model, tokenizer, store, n=4)`` is
    ``config=LearnerConfig(n=4)``; an unknown name is a TypeError). The settings are documented in the module
    docstring and on `LearnerConfig`; the learner reads them from ``self.config``.

    The keywords that are not plain settings: ``prompt`` (a `PromptFormat`; default: the tokenizer's chat
    template when it has one) turns each question into the token ids that sampling, training and the
    retrieval keys all use (`encode`). ``extract_answer`` maps a sample's text to its final answer (None when
    absent; default `fastmem.voting.extract_answer`: boxed, marked or last number), ``equivalent`` compares
    two answers, ``embed_fn`` maps a list of questions to keys ``[B, d]``. ``config.seed`` names every random
    stream: the question at position p of the stream (counted over `solve` calls, ``problems_done``) draws its
    samples and its fresh memory from streams seeded ``stream_seed(seed, p, stream)``, whatever else shares its
    batch. process_group: a `torch.distributed` process group; every rank constructs the learner with the same
    config and an equal store (checked: ValueError), then calls `solve` with the same questions: each batch is
    split across the ranks, and every rank ends it with the same store and returns every result
    (`fastmem.distributed`).
    """

    def __init__(self, model, tokenizer, store: MemoryStore, config: LearnerConfig | None = None, *,
                 prompt: PromptFormat | None = None,
                 extract_answer: Callable[[str], str | None] = extract_answer,
                 equivalent: Callable[[str, str], bool] = answers_equivalent,
                 embed_fn: Callable[[list[str]], Tensor] | None = None, process_group=None, **options):
        import fastmem

        if config is not None and not isinstance(config, LearnerConfig):
            raise TypeError(f"config must be a LearnerConfig; got {type(config).__name__}")
        self.config = config = replace(config or LearnerConfig(), **options)
        self.model = fastmem.patch(model).requires_grad_(False)
        self.tokenizer, self.store = tokenizer, store
        # a fresh prefix: "tokens", the keys and values of random tokens (PEFT's N(0, 1) start, "normal",
        # wrecks a real model's predictions before any training; MemoryBank.prefixes)
        self.memory_options = {"init": config.prefix_init} if config.kind == "prefix" else {}
        self.prompt = prompt if prompt is not None else PromptFormat()
        self.extract_answer = extract_answer
        self.equivalent = equivalent
        self.embed_fn = embed_fn or self.embed
        self.batches_done, self.problems_done = 0, 0
        self.process_group = process_group
        self.rank, self.world = (0, 1) if process_group is None else (process_group.rank(), process_group.size())
        if process_group is not None:
            self._check_ranks_agree()

    def _check_ranks_agree(self) -> None:
        """ValueError unless every rank of the group has this rank's settings and an equal store (the same ids)."""
        mine = {**asdict(self.config), "store ids": self.store.ids}
        reference = all_gather(mine, self.process_group, "the learners' settings")[0]
        differing = sorted(name for name in mine if mine[name] != reference.get(name))
        if differing:
            raise ValueError(f"rank {self.rank}'s learner differs from rank 0's in {', '.join(differing)}: every "
                             "rank needs the same settings and an equal store")

    def encode(self, question: str) -> list[int]:
        """The prompt token ids of ``question`` (`PromptFormat.encode`): what is sampled, trained and keyed on."""
        return self.prompt.encode(self.tokenizer, question)

    @torch.no_grad()
    def embed(self, questions: list[str]) -> Tensor:
        """Mean-pooled last hidden states of the base model (no memory) over each question's encoded prompt
        (`encode`): ``[B, hidden]`` fp32. The decoder alone runs (`run_after_memory`): the output head's logits
        for every prompt position, which the model's own forward would also make, are never needed here."""
        prompts = [self.encode(q) for q in questions]
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):   # right-padded: the padding comes after every real position
            ids[row, :len(prompt)] = torch.tensor(prompt)
            mask[row, :len(prompt)] = 1
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        hidden = run_after_memory(self.model, None, ids).float()   # causal: padding after a row never reaches it
        weights = mask[..., None].float()
        return (hidden * weights).sum(1) / weights.sum(1)

    def solve(self, questions: Sequence[str], progress: Callable[[int], None] | None = None) -> list[Result]:
        """Answer ``questions`` in order, learning as it goes; ``progress(k)`` is called after each batch."""
        if isinstance(questions, str) or not all(isinstance(q, str) and q for q in questions):
            raise ValueError("questions must be a list of non-empty strings")
        results: list[Result] = []
        for start in range(0, len(questions), self.config.batch_size):
            batch = list(questions[start:start + self.config.batch_size])
            results += self._solve_batch(batch)
            if progress is not None:
                progress(len(batch))
        return results

    # -- one batch ------------------------------------------------------------------------------

    def _solve_batch(self, questions: list[str]) -> list[Result]:
        """One batch, on this rank's share, then the exchange and the store updates every rank applies alike
        (`fastmem.distributed`, steps 1-4)."""
        first, mine = self.problems_done, share(len(questions), self.rank, self.world)
        own_keys = self.embed_fn([questions[i] for i in mine]).float() if mine else None
        parts = self._exchange({"keys": own_keys, "batch": (first, zlib.crc32("\n".join(questions).encode()))},
                               "question keys")
        if len({part["batch"] for part in parts}) > 1:
            raise ValueError(f"the ranks were given different batches (first position, checksum per rank: "
                             f"{[part['batch'] for part in parts]}): every rank must solve the same questions")
        keys = torch.cat([part["keys"] for part in parts if part["keys"] is not None]).to(self.model.device)
        scores, ids = self.store.search(keys, self.config.retrieve)
        plans = [self._plan(score_row, id_row) for score_row, id_row in zip(scores.tolist(), ids.tolist())]
        replayed = self._replayed(plans)        # (cluster, prompt, traces) of remembered problems
        owners = [self._owner(next(i for i, plan in enumerate(plans) if plan.cluster == cluster), len(questions))
                  for cluster, _, _ in replayed]
        prompts = [self.encode(q) for q in questions]
        parts = self._exchange(self._work(prompts, plans, replayed, owners, mine, first),
                               "trained memories and samples")

        taken = [len(share(len(questions), rank, self.world)) for rank in range(self.world)]
        rows = [(rank, row) for rank in range(self.world) for row in range(taken[rank])]
        for owner in owners:                    # replayed problems after the questions, in `replayed` order
            rows.append((owner, taken[owner]))
            taken[owner] += 1
        vectors = torch.stack([parts[rank]["vectors"][row] for rank, row in rows]).to(self.model.device)
        signal = [parts[rank]["signal"][row] for rank, row in rows]
        samples, answers, votes, rewards, resampled = ([item for part in parts for item in part[name]] for name
                                                       in ("samples", "answers", "votes", "rewards", "resampled"))
        traces = [[list(s.token_ids) for s in row] for row in samples]
        batch = _Batch(questions, prompts, keys, traces, rewards, votes, signal, replayed)
        memory_ids = self._store(batch, vectors, plans)
        self.batches_done += 1
        self.problems_done += len(questions)
        if self.config.consolidate_every and self.batches_done % self.config.consolidate_every == 0:
            self.store.consolidate(self.config.consolidate_threshold)
        return [Result(question=q, answer=vote.answer, vote_share=vote.share, memory_id=memory_id,
                       retrieved=plan.retrieved, used_memory=plan.use, samples=[s.text for s in row],
                       answers=row_answers, memory_samples=self.config.n - self.config.control, resampled=row_resampled)
                for q, vote, memory_id, plan, row, row_answers, row_resampled
                in zip(questions, votes, memory_ids, plans, samples, answers, resampled)]

    def _owner(self, question: int, count: int) -> int:
        """The rank whose share of a batch of ``count`` questions holds question ``question``."""
        return next(rank for rank in range(self.world) if question in share(count, rank, self.world))

    def _exchange(self, value: dict, what: str) -> list[dict]:
        return all_gather(value, self.process_group, f"{what} of batch {self.batches_done}")

    def _work(self, prompts, plans, replayed, owners, mine: range, first: int) -> dict:
        """This rank's part of a batch: sample, vote and train the memories of questions ``mine`` (stream
        positions ``first + i``) and of the replayed problems it owns. Returns what exchange 2 carries:
        ``vectors [S, F]`` fp32 (its question slots, then its replayed ones), and per question ``samples``,
        ``answers``, ``votes``, ``rewards``, then per slot ``signal``."""
        if not mine:
            return dict(vectors=None, samples=[], answers=[], votes=[], rewards=[], resampled=[], signal=[])
        own_replayed = [item for item, owner in zip(replayed, owners) if owner == self.rank]
        # a fresh memory: drawn from its problem's own stream (the replayed slots are overwritten below)
        generators = [torch.Generator().manual_seed(stream_seed(self.config.seed, first + i, FRESH_MEMORY))
                      for i in mine]
        bank = KINDS[self.config.kind](self.model, slots=len(mine) + len(own_replayed), length=self.config.length,
                                       generator=generators + [torch.Generator() for _ in own_replayed],
                                       **self.memory_options)
        starts = {slot: plans[i].start for slot, i in enumerate(mine) if plans[i].start is not None}
        starts.update({len(mine) + offset: self.store.get(cluster)[0]
                       for offset, (cluster, _, _) in enumerate(own_replayed)})
        for slot, start in starts.items():      # stored memories: flat vectors, as `MemoryBank.read_vectors` made them
            bank.write_vectors(torch.tensor([slot], device=bank.lengths.device), start[None])
        own_prompts = [prompts[i] for i in mine]

        def seeds(stream: int) -> list[int]:
            return [stream_seed(self.config.seed, first + i, stream) for i in mine]

        uses = torch.tensor([slot if plans[i].use else -1 for slot, i in enumerate(mine)])
        treated = self._sample(own_prompts, bank, uses, self.config.n - self.config.control, seeds(TREATED_SAMPLES))
        control = (self._sample(own_prompts, None, None, self.config.control, seeds(CONTROL_SAMPLES)) if self.config.control
                   else [[] for _ in own_prompts])
        samples = [t + c for t, c in zip(treated, control)]
        answers = [[self.extract_answer(s.text) for s in row] for row in samples]
        votes = [majority_vote(row, self.equivalent) for row in answers]

        trainer = MemoryTrainer(self.model, bank, lr=self.config.lr, objective=self.config.objective)
        traces = [[list(s.token_ids) for s in row] for row in samples]
        rewards = [[float(agrees) if vote.share >= self.config.min_share else 0.0 for agrees in vote.agrees]
                   for vote in votes]
        all_prompts = own_prompts + [prompt for _, prompt, _ in own_replayed]
        all_traces = traces + [kept for _, _, kept in own_replayed]
        all_rewards = rewards + [[1.0] * len(kept) for _, _, kept in own_replayed]
        signal = [trains_on(row, self.config.objective) for row in all_rewards]
        for _ in range(self.config.steps if any(signal) else 0):
            trainer.step(all_prompts, all_traces, all_rewards, list(range(len(all_prompts))))
        resampled = [[] for _ in mine]
        if self.config.resample:
            fresh = self._sample(own_prompts, bank, torch.arange(len(mine)), self.config.n, seeds(RESAMPLED))
            resampled = [[self.extract_answer(s.text) for s in row] for row in fresh]
            votes = [majority_vote(row, self.equivalent) for row in resampled]
        return dict(vectors=bank.read_vectors(), samples=samples, answers=answers, votes=votes, rewards=rewards,
                    resampled=resampled, signal=signal)

    def _sample(self, prompts, bank, index, n, seeds):
        kwargs = dict(bank=bank, index=index) if bank is not None and bool((index >= 0).any()) else {}
        return self.sample(prompts, n, seeds, **kwargs)

    def sample(self, prompts: list[list[int]], n: int, seed: int | list[int], temperature: float | None = None,
               **memory):
        """`fastmem.sample` with this learner's sampling settings (``temperature`` overrides its own; greedy
        at 0); ``seed``: as `fastmem.sample`'s (one per prompt: draws independent of the batch); ``memory``:
        ``bank`` and ``index``, or nothing."""
        return sample(self.model, prompts, n=n, max_new_tokens=self.config.max_new_tokens,
                      temperature=self.config.temperature if temperature is None else temperature, top_p=self.config.top_p,
                      top_k=self.config.sample_top_k, min_p=self.config.min_p, stop=self.config.stop or None, seed=seed,
                      tokenizer=self.tokenizer, eos_token_id=self.tokenizer.eos_token_id, **memory)

    def _plan(self, scores: list[float], ids: list[int]) -> "_Plan":
        """Where one question's memory starts, and whether its samples use it."""
        found = [(s, i) for s, i in zip(scores, ids) if i >= 0]
        if self.config.memory == "cluster":
            if found and found[0][0] >= self.config.cluster_similarity:
                cluster = found[0][1]
                return _Plan(self.store.get(cluster)[0], [cluster], self._gate_open(cluster), cluster)
            return _Plan(None, [], False, None)
        similar = [(s, i) for s, i in found if s >= self.config.min_similarity]
        if not similar:
            return _Plan(None, [], False, None)
        memories = torch.stack([self.store.get(i)[0].float() for _, i in similar])
        weights = torch.tensor([s for s, _ in similar], device=memories.device)
        start = (memories * (weights / weights.sum()).view(-1, *[1] * (memories.dim() - 1))).sum(0)
        return _Plan(start, [i for _, i in similar], all(self._gate_open(i) for _, i in similar), None)

    def _replayed(self, plans: list["_Plan"]) -> list[tuple[int, list[int], list[list[int]]]]:
        """The remembered problems of every cluster this batch retrieved: ``(cluster, prompt, traces)``."""
        if self.config.memory != "cluster" or not self.config.replay:
            return []
        clusters = dict.fromkeys(plan.cluster for plan in plans if plan.cluster is not None)
        return [(cluster, item["prompt"], item["traces"]) for cluster in clusters
                for item in self.store.meta(cluster).replay]

    def _gate_open(self, entry_id: int) -> bool:
        if not self.config.gate:
            return True
        meta = self.store.meta(entry_id)
        return meta.gate_trials < self.config.gate_trials or meta.gate_gain >= 0

    def _store(self, batch: "_Batch", vectors: Tensor, plans) -> list[int]:
        """Write the batch into the store; ``vectors [S, F]``: every slot's trained memory (questions, then
        replayed problems). Returns each question's entry id.

        In this order: the batch's retrievals are counted (they came first); the clusters it retrieved are
        updated; then the new entries are added in stream order, a new cluster updated with the later questions
        of the batch that join it before the next add. So an add that finds the store full can evict only an
        entry the batch has finished writing, never one it still has to update (a returned id may name an
        entry evicted since)."""
        questions, keys, votes = batch.questions, batch.keys, batch.votes
        gains = [_agreement_gain(vote, self.config.n - self.config.control) if plan.use else None
                 for plan, vote in zip(plans, votes)]
        self.store.record_hits({i for plan in plans if plan.use for i in plan.retrieved})
        ids: list[int | None] = [plan.cluster for plan in plans]
        for cluster in dict.fromkeys(i for i in ids if i is not None):
            slots = [s for s, i in enumerate(ids) if i == cluster]
            extra = [len(questions) + r for r, (c, _, _) in enumerate(batch.replayed) if c == cluster]
            self._update_cluster(cluster, slots, extra, batch, vectors, gains)
        clusters = self.config.memory == "cluster"
        for slot, (question, vote) in enumerate(zip(questions, votes)):
            if ids[slot] is not None:
                continue
            ids[slot] = self.store.add(keys[slot], vectors[slot], EntryMeta(
                question=question, answer=vote.answer, vote_share=vote.share, step=self.batches_done, members=1,
                replay=self._remembered([], batch, [slot]) if clusters else []))
            joining = [later for later in range(slot + 1, len(plans)) if clusters and ids[later] is None
                       and torch.cosine_similarity(keys[slot], keys[later], dim=0) >= self.config.cluster_similarity]
            for later in joining:
                ids[later] = ids[slot]
            if joining:
                self._update_cluster(ids[slot], joining, [], batch, vectors, gains)
        return ids

    def _update_cluster(self, cluster, slots, extra, batch: "_Batch", vectors, gains) -> None:
        """Fold this batch's trained memories of ``cluster`` (its questions' slots, and ``extra``: its
        replayed problems' slots) into it, averaging the slots that trained; update key and statistics."""
        keys, votes = batch.keys, batch.votes
        meta = self.store.meta(cluster)
        members = meta.members or 1
        key = (self.store.key(cluster) * members + keys[slots].sum(0)) / (members + len(slots))
        measured = [gains[s] for s in slots if gains[s] is not None]
        trials = meta.gate_trials + len(measured)
        gain = (meta.gate_gain * meta.gate_trials + sum(measured)) / max(trials, 1)
        shares = [votes[s].share for s in slots]
        trained = [s for s in slots + extra if batch.signal[s]]
        self.store.update(cluster, memory=vectors[trained].mean(0) if trained else None, key=key, meta=replace(
            meta, members=members + len(slots),
            vote_share=(meta.vote_share * members + sum(shares)) / (members + len(slots)),
            step=self.batches_done, gate_trials=trials, gate_gain=gain, last_question=batch.questions[slots[-1]],
            replay=self._remembered(meta.replay, batch, slots)))

    def _remembered(self, buffer: list[dict], batch: "_Batch", slots: list[int]) -> list[dict]:
        """A cluster's replay buffer after this batch: its newest ``replay`` problems with majority traces."""
        if not self.config.replay:
            return []
        for s in slots:
            kept = [trace for trace, reward in zip(batch.traces[s], batch.rewards[s]) if reward == 1]
            if kept:
                buffer = buffer + [{"prompt": list(batch.prompts[s]), "traces": kept}]
        return buffer[-self.config.replay:]


@dataclass
class _Batch:
    """What one batch produced, for storing: per question, then ``replayed`` (slots after the questions')."""
    questions: list[str]
    prompts: list[list[int]]
    keys: Tensor
    traces: list[list[list[int]]]
    rewards: list[list[float]]
    votes: list
    signal: list[bool]           # per slot (questions, then replayed problems): it trained
    replayed: list[tuple[int, list[int], list[list[int]]]]


@dataclass
class _Plan:
    start: Tensor | None        # the vector the new memory starts from (None: fresh)
    retrieved: list[int]
    use: bool                   # sample with it
    cluster: int | None         # cluster mode: the cluster this question trains


def _agreement_gain(vote, memory_samples: int) -> float | None:
    """Agreement with the majority of the memory samples minus that of the control samples."""
    treated, control = vote.agrees[:memory_samples], vote.agrees[memory_samples:]
    if not treated or not control:
        return None
    return sum(treated) / len(treated) - sum(control) / len(control)
