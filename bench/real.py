"""The `real` section of bench/throughput.py: speed on a real pretrained model (issue 12, item 1).

SmolLM2-135M-Instruct (converted once by scripts/real_model.py into ``~/.cache/fastmem/SmolLM2-135M-Instruct``;
``FASTMEM_REAL_MODEL`` overrides the place), fp32, with chat-template prompts of the word-problem stream
(`fastmem.data.words`, `fastmem.prompting.PromptFormat`). Four parts, each against what users run today:

- sample: B problems x n samples, each problem with its own prefix memory, ``new_tokens`` tokens (no eos
  stop), `fastmem.sample` against HF ``generate`` + PEFT prefix tuning one problem at a time and against HF
  ``generate`` of the same B * n rows without memory in one batch.
- decode step: one step of `fastmem.sample`'s decoder (the model step, then sampling over the vocabulary and
  the tokens' copy to the host) at 8 and at 128 rows, against its roofline bound: max(bytes it must read /
  the copy bandwidth, its FLOPs / the matmul ceiling), both measured in the same run.
- train: `MemoryTrainer` steps on B problems x N traces against PEFT prefix tuning one problem at a time,
  with the model FLOP utilization of fastmem's steps.
- loop: `OnlineLearner` against the same loop with HF + PEFT (`bench.baselines.peft_online_loop`).

--smoke runs every path on the shipped tiny default model (no real model is loaded).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench import learning
from bench.baselines import hf_generate_batch, mean_hidden_state, peft_online_loop
from bench.harness import END_TO_END, Case, Target, Timing, Workload, comparison_cases
from bench.learning import SampleShape, TrainShape, bank_of, initial_memories, peft_model_of, random_tokens

if TYPE_CHECKING:
    from bench.throughput import Settings

SEED = 0
REAL_MODEL_DIR = Path.home() / ".cache" / "fastmem" / "SmolLM2-135M-Instruct"
SAMPLE_TARGETS = dict(peft=3.0, batch=1.5)
DECODE_ROOFLINE_TARGET = 0.5
TRAIN_TARGETS = dict(speedup=4.0, utilization=0.3)
LOOP_TARGET = 4.0
TRAIN_LR = learning.LR


def real_model_path() -> Path:
    return Path(os.environ.get("FASTMEM_REAL_MODEL", REAL_MODEL_DIR))


@dataclass(frozen=True)
class RealModel:
    """The model the section runs: SmolLM2-135M-Instruct from its converted folder, or (``smoke``) the shipped
    tiny default model, which has a tokenizer too."""
    smoke: bool = False

    @property
    def name(self) -> str:
        return "default model (Llama 128x3, 0.45M)" if self.smoke else "SmolLM2-135M-Instruct"

    def build(self, settings: "Settings"):
        """(model, tokenizer): frozen, eval mode, fp32 on CPU (the settings' dtype)."""
        if self.smoke:
            from fastmem.data import load_default_model

            model, tokenizer = load_default_model()
        else:
            path = real_model_path()
            if not (path / "config.json").exists():
                raise SystemExit(f"bench/throughput.py --only real: no converted model in {path}; run "
                                 "`python scripts/real_model.py` once (or set FASTMEM_REAL_MODEL)")
            import fastmem

            model, tokenizer = fastmem.load_model(path, dtype="float32", device=str(settings.device))
        return model.to(settings.device, settings.dtype).eval().requires_grad_(False), tokenizer

    def describe(self) -> dict:
        return dict(name=self.name, path="fastmem/assets/default_model" if self.smoke else str(real_model_path()))


def word_prompts(tokenizer, count: int, seed: int = SEED) -> tuple[list[str], list[list[int]]]:
    """``count`` questions of the word-problem stream and their prompt ids (`PromptFormat`: the chat template
    and its default system turn when the tokenizer has one)."""
    from fastmem.data.words import word_problems
    from fastmem.prompting import PromptFormat

    questions = [problem["question"] for problem in word_problems(seed, count)]
    return questions, [PromptFormat().encode(tokenizer, question) for question in questions]


# ------------------------------------------------------------------------------------------ FLOP counting

@dataclass(frozen=True)
class ModelCounts:
    """What a token costs: ``linear`` weights of the decoder layers, the output head (``vocab x hidden``),
    every parameter's bytes (a decode step reads each once; tied embeddings are one tensor), the attention
    geometry."""
    linear: int
    head: int
    weight_bytes: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    element_bytes: int

    @classmethod
    def of(cls, model) -> "ModelCounts":
        from fastmem.hf.architectures import model_shape

        shape = model_shape(model)
        layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
        linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
        head = model.get_output_embeddings().weight.numel()
        unique = {p.data_ptr(): p for p in model.parameters()}.values()
        element = next(iter(unique)).element_size()
        return cls(linear, head, sum(p.numel() * p.element_size() for p in unique), shape.num_layers,
                   model.config.num_attention_heads, shape.num_kv_heads, shape.head_dim, element)

    def token_flops(self, visible_keys: float, head: bool = True) -> float:
        """Forward FLOPs of one token: its matmuls (2 per weight; the head when it predicts) and its attention
        over ``visible_keys`` keys (QK^T and PV, 4 * Hq * D per key, every layer)."""
        return 2.0 * (self.linear + (self.head if head else 0)) + 4.0 * self.q_heads * self.head_dim * visible_keys * self.layers

    def kv_bytes(self, positions: float) -> float:
        """Bytes of the keys and values of ``positions`` positions at every layer."""
        return 2.0 * positions * self.layers * self.kv_heads * self.head_dim * self.element_bytes


# ---------------------------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class RealShape:
    problems: int
    samples: int
    new_tokens: int
    memory_len: int
    decode_rows: tuple[int, ...]
    decode_filled: int           # own positions already in each row's cache when the timed steps run
    decode_steps: int            # steps per timed call
    train_problems: int
    train_traces: int
    trace_len: int
    train_steps: int
    loop_problems: int
    loop_samples: int
    loop_steps: int
    loop_new_tokens: int
    loop_stored: int
    loop_memory_len: int = 8


FULL = RealShape(problems=16, samples=8, new_tokens=128, memory_len=16, decode_rows=(8, 128), decode_filled=64,
                 decode_steps=4, train_problems=16, train_traces=4, trace_len=64, train_steps=2, loop_problems=16,
                 loop_samples=8, loop_steps=4, loop_new_tokens=96, loop_stored=16)
# --quick (5 minutes on 2 cores): the rows of the full run, fewer tokens; fewer problems for train and loop
QUICK = replace(FULL, new_tokens=16, train_problems=4, trace_len=32, loop_problems=4, loop_samples=4, loop_steps=1,
                loop_new_tokens=16, loop_stored=4)
SMOKE = RealShape(problems=2, samples=2, new_tokens=3, memory_len=3, decode_rows=(2, 4), decode_filled=3,
                  decode_steps=2, train_problems=2, train_traces=2, trace_len=4, train_steps=2, loop_problems=2,
                  loop_samples=2, loop_steps=1, loop_new_tokens=4, loop_stored=2, loop_memory_len=2)


def shape_for(settings: "Settings") -> RealShape:
    return SMOKE if settings.smoke else QUICK if settings.quick else FULL


def real_timing(quick: bool, smoke: bool) -> Timing:
    """One call per sample; its first (checked) call is timed too: a full sample job runs minutes."""
    if smoke:
        return Timing(warmup=0, reps=1, min_sample_s=0.0)
    return Timing(warmup=0, reps=1 if quick else 2, min_sample_s=0.0, time_first_call=True)


# ----------------------------------------------------------------------------------------------- sample

def sample_workload(settings: "Settings", shape: RealShape, spec: RealModel) -> Workload:
    def make_inputs():
        import fastmem

        model, tokenizer = spec.build(settings)
        _, prompts = word_prompts(tokenizer, shape.problems)
        generator = torch.Generator().manual_seed(SEED)
        memories = initial_memories(model, "prefix", shape.problems, shape.memory_len, generator)
        peft_model = peft_model_of(model, "prefix", shape.memory_len)
        plain = copy.deepcopy(model)
        model = fastmem.patch(model)
        return dict(model=model, plain_model=plain, prompts=prompts, memories=memories, peft_model=peft_model,
                    bank=bank_of(model, "prefix", memories))

    tokens = shape.problems * shape.samples * shape.new_tokens
    return Workload("real", f"sample {shape.problems} problems x {shape.samples}, own prefix memory (P="
                    f"{shape.memory_len}), {shape.new_tokens} new tokens",
                    dict(problems=shape.problems, samples=shape.samples, new_tokens=shape.new_tokens,
                         memory_len=shape.memory_len, kind="prefix", model=spec.describe()),
                    make_inputs, work=(tokens, "tokens"), compared=False)


def learning_sample_shape(shape: RealShape) -> SampleShape:
    """The sample section's shape for the same job (its fastmem and PEFT computes are reused as they are)."""
    return SampleShape(problems=shape.problems, samples=shape.samples, prompt_len=0, new_tokens=shape.new_tokens,
                       memory_len=shape.memory_len)


def batch_sample(shape: RealShape):
    def compute(inputs):
        return hf_generate_batch(inputs["plain_model"], inputs["prompts"], shape.samples, shape.new_tokens,
                                 seed=SEED).cpu()
    return compute


PEFT_SAMPLE = "HF generate + PEFT prefix tuning (one problem at a time)"
BATCH_SAMPLE = "HF generate, no memory (one batch)"
FASTMEM_SAMPLE = "fastmem.sample"


def sample_cases(settings: "Settings", shape: RealShape, spec: RealModel) -> list[Case]:
    jobs = learning_sample_shape(shape)
    return comparison_cases(sample_workload(settings, shape, spec), (END_TO_END,),
                            (PEFT_SAMPLE, learning.peft_sample(jobs)),
                            {BATCH_SAMPLE: batch_sample(shape), FASTMEM_SAMPLE: learning.fastmem_sample(jobs)},
                            targeted=FASTMEM_SAMPLE,
                            targets=(Target("speedup", SAMPLE_TARGETS["peft"]),
                                     Target("speedup", SAMPLE_TARGETS["batch"], against=BATCH_SAMPLE)))


# ------------------------------------------------------------------------------------------ decode step

def decode_workload(settings: "Settings", shape: RealShape, spec: RealModel, rows: int,
                    counts: ModelCounts, prompt_lens: list[int]) -> Workload:
    """``rows`` sample rows (``rows / samples`` problems x ``samples``), each with ``decode_filled`` own positions
    cached (random keys and values: a step's cost does not depend on them), timed for ``decode_steps`` steps
    per call (each step rewrites the same cache position). Bytes: every weight once, the problems' pool slots
    (memory + prompt) once, every row's own keys and values. FLOPs: the rows' tokens through every matmul and
    the head, attending to memory + prompt + own keys."""
    problems = max(1, rows // shape.samples)
    per_problem = rows // problems
    lens = prompt_lens[:problems]
    pool_positions = sum(shape.memory_len + n for n in lens)
    own = shape.decode_filled + 1
    visible = sum(per_problem * (shape.memory_len + n + own) for n in lens)
    flops = shape.decode_steps * (rows * counts.token_flops(0) + 4.0 * counts.q_heads * counts.head_dim
                                  * visible * counts.layers)
    bytes_read = shape.decode_steps * (counts.weight_bytes + counts.kv_bytes(pool_positions + rows * own))

    def make_inputs():
        import fastmem
        from fastmem.hf.shared_prefix import output_logits, shared_prefix
        from fastmem.sampling import _LockstepDecoder

        model, tokenizer = spec.build(settings)
        _, prompts = word_prompts(tokenizer, problems)
        generator = torch.Generator().manual_seed(SEED)
        memories = initial_memories(model, "prefix", problems, shape.memory_len, generator)
        model = fastmem.patch(model)
        bank = bank_of(model, "prefix", memories)
        with torch.inference_mode():
            index = torch.arange(problems, device=model.device)
            prefix = shared_prefix(model, bank.memory_for(model, index[:, None]),
                                   [torch.tensor(p) for p in prompts])
            owner = index.repeat_interleave(per_problem)
            decoder = _LockstepDecoder(model, prefix.pool, owner, shape.decode_filled + 1)
            for keys, values in decoder.buffers:
                keys.normal_(generator=generator)
                values.normal_(generator=generator)
            logits = output_logits(model, prefix.last_hidden)[owner]
        inputs = dict(decoder=decoder, logits=logits, generator=torch.Generator(device=model.device).manual_seed(SEED))
        PROFILES[rows] = decode_profile(inputs, shape.decode_filled)
        return inputs

    return Workload("real", f"decode step, {rows} rows ({problems} problem{'s' * (problems > 1)} x {per_problem}), "
                    f"{own} own positions", dict(rows=rows, problems=problems, memory_len=shape.memory_len,
                                                  prompt_lens=lens, own_positions=own, steps=shape.decode_steps,
                                                  model=spec.describe()),
                    make_inputs, forward_flops=flops, work=(shape.decode_steps * rows, "tokens"), compared=False,
                    bytes_read=bytes_read)


def fastmem_decode_steps(shape: RealShape):
    """``decode_steps`` iterations of `fastmem.sample`'s decode loop body: sample the next tokens from the
    logits (temperature 1, over the whole vocabulary), copy tokens and log-probabilities to the host, run the
    decoder step (every layer, the head; its linears in `few_row_linears`, as `fastmem.sample` runs them)."""
    def compute(inputs):
        from fastmem.sampling import _next_tokens

        from fastmem.ops.linear import few_row_linears

        decoder, logits = inputs["decoder"], inputs["logits"]
        with torch.inference_mode(), few_row_linears(decoder.model):
            for _ in range(shape.decode_steps):
                decoder.filled = shape.decode_filled
                draws = torch.rand(len(logits), generator=inputs["generator"], device=logits.device)
                tokens, logprobs = _next_tokens(logits, 1.0, 1.0, draws)
                tokens.tolist(), logprobs.tolist()
                logits = decoder.step(tokens)
        return logits[:, :1].clone()
    return compute


FASTMEM_DECODE = "fastmem decode step (model + sampling)"

FEW_ROW_OP = "fastmem::few_row_linear"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", FEW_ROW_OP}
ATTENTION_OPS = {"fastmem::prefix_attention_forward"}
COPY_OPS = {"aten::copy_", "aten::index_put_", "aten::cat", "aten::index", "aten::index_select", "aten::clone",
            "aten::contiguous", "aten::stack", "aten::fill_", "aten::zero_"}
VIEW_OPS = {"aten::view", "aten::t", "aten::transpose", "aten::slice", "aten::as_strided", "aten::reshape",
            "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::narrow", "aten::linear",
            "aten::matmul", "aten::_unsafe_view", "aten::to", "aten::_to_copy", "aten::empty", "aten::empty_like",
            "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::detach", "aten::alias",
            "aten::lift_fresh"}
# rows -> {part: seconds} of one profiled decode step (filled by the decode workloads' make_inputs)
PROFILES: dict[int, dict[str, float]] = {}
# the train job's token ratio, PEFT's tokens over fastmem's (filled by real_cases)
TRAIN_TOKEN_RATIO: dict[str, float] = {}


def decode_profile(inputs: dict, filled: int) -> dict[str, float]:
    """Where one decode step's time goes, under torch.profiler (not the timed calls): sampling (the whole
    `_next_tokens` over the vocabulary and the copy of tokens and log-probabilities to the host), then the
    decoder step split by op self time into matmuls, prefix attention, cache writes / copies / gathers, other
    kernels (norms, rotary, activations, residual adds) and host (Python, dispatch, view ops: the step's
    wall time not spent in those kernels)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from fastmem.sampling import _next_tokens

    from fastmem.ops import native
    from fastmem.ops.linear import few_row_linears

    kernel = native.few_row_linear

    def recorded(*args):   # the few-row kernel is a pybind call, not an op: name it for the profiler
        with torch.profiler.record_function(FEW_ROW_OP):
            return kernel(*args)

    decoder, logits = inputs["decoder"], inputs["logits"]
    with torch.inference_mode(), few_row_linears(decoder.model):
        decoder.filled = filled
        draws = torch.rand(len(logits), generator=inputs["generator"], device=logits.device)
        tokens, _ = _next_tokens(logits, 1.0, 1.0, draws)
        decoder.step(tokens)                                  # warm
        decoder.filled = filled
        start = time.perf_counter()
        tokens, logprobs = _next_tokens(logits, 1.0, 1.0, draws)
        tokens.tolist(), logprobs.tolist()
        sampling = time.perf_counter() - start
        native.few_row_linear = recorded
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                decoder.step(tokens)
                step = time.perf_counter() - start
        finally:
            native.few_row_linear = kernel
    parts = dict(matmuls=0.0, attention=0.0, copies=0.0, other_kernels=0.0)
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key in MATMUL_OPS:
            parts["matmuls"] += seconds
        elif event.key in ATTENTION_OPS:
            parts["attention"] += seconds
        elif event.key in COPY_OPS:
            parts["copies"] += seconds
        elif event.key.startswith(("aten::", "fastmem::")) and event.key not in VIEW_OPS:
            parts["other_kernels"] += seconds
    parts["host"] = max(0.0, step - sum(parts.values()))
    parts["sampling"] = sampling
    return parts


def profile_line(rows: int, parts: dict[str, float]) -> str:
    total = sum(parts.values())
    order = ("matmuls", "attention", "sampling", "copies", "other_kernels", "host")
    return (f"{rows} rows {total * 1e3:.0f} ms: " + ", ".join(f"{name.replace('_', ' ')} {parts[name] / total:.0%}"
                                                              for name in order))


def decode_cases(settings: "Settings", shape: RealShape, spec: RealModel, counts: ModelCounts,
                 prompt_lens: list[int]) -> list[Case]:
    return [Case(decode_workload(settings, shape, spec, rows, counts, prompt_lens), FASTMEM_DECODE, END_TO_END,
                 fastmem_decode_steps(shape), targets=(Target("roofline", DECODE_ROOFLINE_TARGET),))
            for rows in shape.decode_rows]


# ------------------------------------------------------------------------------------------------ train

def train_flops(counts: ModelCounts, shape: RealShape, prompt_lens: list[int]) -> float:
    """Useful FLOPs of the train job: per step and problem, its memory + prompt forward once (what a shared
    prefix needs) and its traces' forward (every trace token through the head), doubled for the backward to
    the memory (weights frozen: input gradients only, the forward's FLOPs again)."""
    memory, length = shape.memory_len, shape.trace_len
    per_step = 0.0
    for n in prompt_lens[:shape.train_problems]:
        prompt = sum(counts.token_flops(memory + i + 1, head=False) for i in range(n))
        trace = sum(counts.token_flops(memory + n + t + 1) for t in range(length))
        per_step += prompt + shape.train_traces * trace
    return 2.0 * shape.train_steps * per_step


def train_workload(settings: "Settings", shape: RealShape, spec: RealModel, flops: float) -> Workload:
    def make_inputs():
        import fastmem

        model, tokenizer = spec.build(settings)
        _, prompts = word_prompts(tokenizer, shape.train_problems)
        generator = torch.Generator().manual_seed(SEED)
        return dict(prompts=prompts, traces=[random_tokens(model, shape.train_traces, shape.trace_len, generator)
                                             for _ in prompts],
                    memories=initial_memories(model, "prefix", len(prompts), shape.memory_len, generator),
                    peft_model=peft_model_of(model, "prefix", shape.memory_len), model=fastmem.patch(model))

    return Workload("real", f"train {shape.train_problems} problems x {shape.train_traces} traces of "
                    f"{shape.trace_len} tokens, prefix (P={shape.memory_len}), {shape.train_steps} steps",
                    dict(problems=shape.train_problems, traces=shape.train_traces, trace_len=shape.trace_len,
                         memory_len=shape.memory_len, steps=shape.train_steps, lr=TRAIN_LR, model=spec.describe()),
                    make_inputs, forward_flops=flops, work=(shape.train_problems, "problems"))


def learning_train_shape(shape: RealShape) -> TrainShape:
    """The train section's shape for the same job (its fastmem and PEFT computes are reused as they are)."""
    return TrainShape(problems=shape.train_problems, traces=shape.train_traces, trace_len=shape.trace_len,
                      prompt_len=0, memory_len=shape.memory_len, steps=shape.train_steps)


def train_cases(settings: "Settings", shape: RealShape, spec: RealModel, counts: ModelCounts,
                prompt_lens: list[int]) -> list[Case]:
    return comparison_cases(train_workload(settings, shape, spec, train_flops(counts, shape, prompt_lens)),
                            (END_TO_END,), ("PEFT prefix tuning (one problem at a time)",
                                            learning.peft_train(learning_train_shape(shape))),
                            {"fastmem MemoryTrainer": learning.fastmem_train(learning_train_shape(shape), "prefix")},
                            targeted="fastmem MemoryTrainer",
                            targets=(Target("speedup", TRAIN_TARGETS["speedup"]),
                                     Target("ceiling", TRAIN_TARGETS["utilization"])))


# ------------------------------------------------------------------------------------------------- loop

def loop_workload(settings: "Settings", shape: RealShape, spec: RealModel) -> Workload:
    """A batch of word problems, a store already holding ``loop_stored`` earlier problems (keys of their
    prompts, N(0, 1) prefix memories), both loops encoding questions with the same `PromptFormat`."""
    def make_inputs():
        from fastmem.prompting import PromptFormat
        from fastmem.store import EntryMeta, MemoryStore

        model, tokenizer = spec.build(settings)
        earlier, earlier_ids = word_prompts(tokenizer, shape.loop_stored, seed=SEED + 1)
        keys = torch.stack([mean_hidden_state(model, torch.tensor([ids], device=model.device))
                            for ids in earlier_ids])
        generator = torch.Generator().manual_seed(SEED)
        memories = initial_memories(model, "prefix", shape.loop_stored, shape.loop_memory_len, generator)
        bank = bank_of(model, "prefix", memories)
        vectors = torch.cat([t.movedim(1, 0).flatten(1) for t in (bank.keys, bank.values)], dim=1).float()
        store = MemoryStore()
        for question, key, vector in zip(earlier, keys, vectors):
            store.add(key, vector, EntryMeta(question=question, vote_share=1.0, members=1))
        questions, _ = word_prompts(tokenizer, shape.loop_problems)
        return dict(model=model, tokenizer=tokenizer, store=store, keys=keys, memories=memories, questions=questions,
                    peft_model=peft_model_of(model, "prefix", shape.loop_memory_len),
                    encode=lambda question: PromptFormat().encode(tokenizer, question))

    return Workload("real", f"loop {shape.loop_problems} problems, n={shape.loop_samples}, {shape.loop_steps} steps, "
                    f"<= {shape.loop_new_tokens} new tokens, {shape.loop_stored} stored",
                    dict(problems=shape.loop_problems, samples=shape.loop_samples, steps=shape.loop_steps,
                         max_new_tokens=shape.loop_new_tokens, stored=shape.loop_stored,
                         memory_len=shape.loop_memory_len, kind="prefix", model=spec.describe()),
                    make_inputs, work=(shape.loop_problems, "problems"), compared=False)


LOOP_LR, LOOP_TOP_K, LOOP_MIN_SIMILARITY = 3e-2, 2, 0.5


def fastmem_loop(shape: RealShape):
    def compute(inputs):
        from fastmem.learner import OnlineLearner

        learner = OnlineLearner(inputs["model"], inputs["tokenizer"], copy.deepcopy(inputs["store"]),
                                n=shape.loop_samples, steps=shape.loop_steps, retrieve=LOOP_TOP_K, kind="prefix",
                                memory="problem", length=shape.loop_memory_len, lr=LOOP_LR, temperature=1.0,
                                max_new_tokens=shape.loop_new_tokens, control=0, min_similarity=LOOP_MIN_SIMILARITY,
                                batch_size=shape.loop_problems, seed=SEED)
        return torch.tensor([result.vote_share for result in learner.solve(inputs["questions"])])
    return compute


def peft_loop(shape: RealShape):
    def compute(inputs):
        from fastmem.voting import extract_answer, majority_vote

        weight_shape = inputs["memories"].shape[1:]
        device, dtype = inputs["memories"].device, inputs["memories"].dtype
        answers, _, _ = peft_online_loop(
            inputs["peft_model"], inputs["tokenizer"], inputs["questions"], inputs["keys"], inputs["memories"],
            fresh_memory=lambda: torch.randn(weight_shape, device=device, dtype=dtype), n=shape.loop_samples,
            steps=shape.loop_steps, lr=LOOP_LR, top_k=LOOP_TOP_K, min_similarity=LOOP_MIN_SIMILARITY,
            max_new_tokens=shape.loop_new_tokens, temperature=1.0, extract_answer=extract_answer,
            vote=majority_vote, seed=SEED, encode=inputs["encode"])
        return torch.tensor([answer is not None for answer in answers], dtype=torch.float32)
    return compute


def loop_cases(settings: "Settings", shape: RealShape, spec: RealModel) -> list[Case]:
    return comparison_cases(loop_workload(settings, shape, spec), (END_TO_END,),
                            ("HF + PEFT prefix tuning loop (one problem at a time)", peft_loop(shape)),
                            {"fastmem OnlineLearner": fastmem_loop(shape)}, targeted="fastmem OnlineLearner",
                            targets=(Target("speedup", LOOP_TARGET),))


# ---------------------------------------------------------------------------------------------- section

def real_cases(settings: "Settings") -> list[Case]:
    """Every case of the section; the model is read once here for its sizes and prompt lengths."""
    shape, spec = shape_for(settings), RealModel(smoke=settings.smoke)
    model, tokenizer = spec.build(settings)
    counts = ModelCounts.of(model)
    _, prompts = word_prompts(tokenizer, max(shape.problems, shape.train_problems))
    prompt_lens = [len(p) for p in prompts]
    TRAIN_TOKEN_RATIO["ratio"] = train_token_ratio(shape, prompt_lens[:shape.train_problems])
    del model
    return (decode_cases(settings, shape, spec, counts, prompt_lens) + sample_cases(settings, shape, spec)
            + train_cases(settings, shape, spec, counts, prompt_lens) + loop_cases(settings, shape, spec))


def train_token_ratio(shape: RealShape, prompt_lens: list[int]) -> float:
    """Tokens PEFT runs for the train job (every trace with its problem's prompt) over the tokens fastmem runs
    (each prompt once, then the traces): the speedup a trainer that shares prompts gets when both run at
    the same FLOP rate, the case on a CPU, where both are matmul-bound."""
    peft = sum(shape.train_traces * (length + shape.trace_len) for length in prompt_lens)
    shared = sum(length + shape.train_traces * shape.trace_len for length in prompt_lens)
    return peft / shared


def real_note(quick: bool) -> str:
    cut = (f"--quick cuts the job sizes: sample {QUICK.new_tokens} new tokens instead of {FULL.new_tokens} (same "
           f"{QUICK.problems} x {QUICK.samples} rows; fastmem's shared prefill weighs more at few tokens), train "
           f"{QUICK.train_problems} problems x {QUICK.train_traces} traces of {QUICK.trace_len} tokens instead of "
           f"{FULL.train_problems} x {FULL.train_traces} of {FULL.trace_len}, loop {QUICK.loop_problems} problems, "
           f"n={QUICK.loop_samples}, {QUICK.loop_steps} step, <= {QUICK.loop_new_tokens} tokens instead of "
           f"{FULL.loop_problems}, n={FULL.loop_samples}, {FULL.loop_steps} steps, <= {FULL.loop_new_tokens}; "
           if quick else "")
    return (f"real: {cut}every job timed whole (its first call counts as a sample), in the section's threads; "
            "samples are random (not compared). The PEFT sample baseline is a speed baseline only: on "
            "transformers 5.24 PEFT's cached generate with prefix tuning returns the plain model's tokens (its "
            "forward, loss and gradients are right). Decode step = sampling over the 49,152-token vocabulary, "
            "tokens to the host, one decoder step; its bound = max(weights + pool + own keys/values bytes / copy "
            "bandwidth, FLOPs / matmul ceiling). Train utilization counts useful FLOPs: each problem's memory + "
            "prompt forward once, its traces' forward, x2 for the input-gradient backward (frozen weights)"
            + ("" if not TRAIN_TOKEN_RATIO else f"; the train job holds {TRAIN_TOKEN_RATIO['ratio']:.2f}x fewer tokens "
               "for fastmem than for PEFT (each prompt once), the speedup expected when both run matmul-bound at "
               "one FLOP rate: the train and loop targets of 4x need more than sharing prompts on a CPU")
            + ("" if not PROFILES else "; where a decode step's time goes (one step under torch.profiler, in this "
               "run; sampling = `_next_tokens`' exponential, running sum and search over the vocabulary and the host "
               "copy; host = "
               "Python, dispatch and view ops): " + "; ".join(profile_line(rows, PROFILES[rows])
                                                            for rows in sorted(PROFILES))))
