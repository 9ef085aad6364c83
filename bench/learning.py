"""The end-to-end sections of bench/throughput.py: train, sample and the online loop, each against HF + PEFT
run one problem at a time (bench/baselines.py).

- train: `fastmem.MemoryTrainer` steps on many problems at once (soft prompts and prefixes) against PEFT
  prompt and prefix tuning with `torch.optim.Adam`, problem after problem. Both start from the same
  memories and train on the same traces; their per-problem losses of every step are compared.
- sample: `fastmem.sample` against ``generate(num_return_sequences=n, do_sample=True)`` under a PEFT soft
  prompt, prompt after prompt (random samples: not compared here; tests/test_bench.py checks greedy).
- loop: `fastmem.OnlineLearner` on the built-in problem stream against `peft_online_loop`.

Every case runs in mode `END_TO_END`: one call is the whole job, timed as it is.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bench.baselines import peft_online_loop, peft_sample_one_at_a_time, peft_train_one_at_a_time
from bench.harness import END_TO_END, Case, Target, Workload, comparison_cases

if TYPE_CHECKING:
    from bench.throughput import Settings

LR = 1e-2                     # train section (the loop uses the learner's default rate)
SEED = 0


# ------------------------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelSpec:
    """A model the sections run: the shipped default model (``config`` None), or a Llama with random
    weights built from ``config`` (LlamaConfig keywords; nothing is downloaded)."""
    name: str
    config: dict | None = None

    def build(self, settings: "Settings"):
        """The model in eval mode, frozen, on the settings' device and dtype; and its tokenizer (or None)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        if self.config is None:
            from fastmem.data import load_default_model

            model, tokenizer = load_default_model()
        else:
            torch.manual_seed(SEED)
            model, tokenizer = LlamaForCausalLM(LlamaConfig(**self.config)), None
        model = model.to(settings.device, settings.dtype).eval().requires_grad_(False)
        return model, tokenizer

    def describe(self) -> dict:
        return dict(name=self.name, **(self.config or {"path": "fastmem/assets/default_model"}))


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                vocab_size=vocab, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=None)


DEFAULT_MODEL = ModelSpec("default model (Llama 128x3, 0.45M)")
SMOKE_LLAMA = ModelSpec("random Llama 64x2", _llama(64, 2, 4, 2, 128))
CUDA_LLAMA = ModelSpec("random Llama 1024x8, 16/4 heads", _llama(1024, 8, 16, 4, 32000))


def model_for(settings: "Settings") -> ModelSpec:
    """train and sample: the default model on CPU (the model the loop runs, and what 2 cores time in the
    --quick budget), a ~150M-parameter random Llama on CUDA, a tiny one in --smoke."""
    if settings.smoke:
        return SMOKE_LLAMA
    return CUDA_LLAMA if settings.device.type == "cuda" else DEFAULT_MODEL


def peft_model_of(model, kind: str, memory_len: int):
    """PEFT prompt tuning (``soft_prompt``) or prefix tuning (``prefix``) on a copy of ``model``."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = {"soft_prompt": PromptTuningConfig, "prefix": PrefixTuningConfig}[kind]
    return get_peft_model(copy.deepcopy(model), config(task_type="CAUSAL_LM", num_virtual_tokens=memory_len)).eval()


def initial_memories(model, kind: str, count: int, memory_len: int, generator: torch.Generator) -> Tensor:
    """``count`` starting memories in PEFT's layout (`bench.baselines.prompt_weight`), as fastmem and PEFT
    start them: soft prompts the embeddings of random tokens, prefixes N(0, 1)."""
    from fastmem.hf.architectures import model_shape

    if kind == "soft_prompt":
        tokens = torch.randint(model.config.vocab_size, (count, memory_len), generator=generator)
        return model.get_input_embeddings()(tokens.to(model.device)).detach()
    shape = model_shape(model)
    width = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim
    return torch.randn(count, memory_len, width, generator=generator).to(model.device, model.dtype)


def bank_of(model, kind: str, memories: Tensor):
    """A `fastmem.MemoryBank` whose slot i holds ``memories[i]`` (PEFT's layout, ``[S, P, width]``)."""
    import fastmem

    count, memory_len = memories.shape[:2]
    make = fastmem.MemoryBank.soft_prompts if kind == "soft_prompt" else fastmem.MemoryBank.prefixes
    bank = make(model, slots=count, length=memory_len)
    with torch.no_grad():
        if kind == "soft_prompt":
            bank.embeddings.copy_(memories)
        else:
            shape = bank.model_shape
            per_layer = memories.view(count, memory_len, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim)
            bank.keys.copy_(per_layer[:, :, :, 0].permute(2, 0, 1, 3, 4))
            bank.values.copy_(per_layer[:, :, :, 1].permute(2, 0, 1, 3, 4))
    return bank


def random_tokens(model, count: int, length: int, generator: torch.Generator) -> list[list[int]]:
    """``count`` rows of ``length`` token ids, none of them special (ids from 3 up)."""
    return torch.randint(3, model.config.vocab_size, (count, length), generator=generator).tolist()


KIND_NAMES = {"soft_prompt": ("soft prompt", "PEFT prompt tuning"), "prefix": ("prefix", "PEFT prefix tuning")}


# -------------------------------------------------------------------------------------------------- train

@dataclass(frozen=True)
class TrainShape:
    """B problems of N traces each (all rewarded 1), prompts and traces of fixed lengths, P memory
    positions, ``steps`` Adam steps per problem."""
    problems: int
    traces: int
    trace_len: int
    prompt_len: int
    memory_len: int
    steps: int


TRAIN_SHAPE = TrainShape(problems=16, traces=4, trace_len=96, prompt_len=48, memory_len=16, steps=2)
SMOKE_TRAIN_SHAPE = TrainShape(problems=3, traces=2, trace_len=5, prompt_len=4, memory_len=3, steps=2)


def train_workload(settings: "Settings", shape: TrainShape, kind: str, spec: ModelSpec) -> Workload:
    def make_inputs():
        model, _ = spec.build(settings)
        generator = torch.Generator().manual_seed(SEED)
        inputs = dict(prompts=random_tokens(model, shape.problems, shape.prompt_len, generator),
                      traces=[random_tokens(model, shape.traces, shape.trace_len, generator)
                              for _ in range(shape.problems)],
                      memories=initial_memories(model, kind, shape.problems, shape.memory_len, generator),
                      peft_model=peft_model_of(model, kind, shape.memory_len))
        import fastmem

        inputs["model"] = fastmem.patch(model)
        return inputs

    memory, _ = KIND_NAMES[kind]
    return Workload("train", f"{shape.problems} problems, {memory}; {spec.name}",
                    dict(asdict(shape), kind=kind, model=spec.describe()), make_inputs,
                    work=(shape.problems, "problems"))


def fastmem_train(shape: TrainShape, kind: str):
    """B fresh memories (the workload's), then ``steps`` `MemoryTrainer.step`s over all problems at once."""
    def compute(inputs):
        from fastmem import MemoryTrainer

        bank = bank_of(inputs["model"], kind, inputs["memories"])
        trainer = MemoryTrainer(inputs["model"], bank, lr=LR)
        rewards, slots = [[1.0] * shape.traces] * shape.problems, list(range(shape.problems))
        losses = [trainer.step(inputs["prompts"], inputs["traces"], rewards, slots).losses
                  for _ in range(shape.steps)]
        return torch.tensor(losses).T
    return compute


def peft_train(shape: TrainShape):
    def compute(inputs):
        return peft_train_one_at_a_time(inputs["peft_model"], inputs["prompts"], inputs["traces"],
                                        inputs["memories"], shape.steps, LR).cpu()
    return compute


def train_cases(settings: "Settings") -> list[Case]:
    """MemoryTrainer on B problems at once against PEFT prompt / prefix tuning problem after problem."""
    shape, spec = (SMOKE_TRAIN_SHAPE if settings.smoke else TRAIN_SHAPE), model_for(settings)
    cases = []
    for kind in ("soft_prompt", "prefix"):
        _, baseline = KIND_NAMES[kind]
        cases += comparison_cases(train_workload(settings, shape, kind, spec), (END_TO_END,),
                                  (f"{baseline} (one problem at a time)", peft_train(shape)),
                                  {"fastmem MemoryTrainer": fastmem_train(shape, kind)},
                                  targeted="fastmem MemoryTrainer", targets=(Target("speedup", 5.0),))
    return cases


TRAIN_NOTE = ("train: outputs are every problem's loss at every step; fastmem and PEFT start from the same "
              "memories and train on the same traces (sft, every trace rewarded 1; Adam lr {lr:g})")


# ------------------------------------------------------------------------------------------------- sample

@dataclass(frozen=True)
class SampleShape:
    """B prompts of fixed length, each with its own soft prompt of P positions, n samples of exactly
    ``new_tokens`` tokens each (no eos stop), temperature 1."""
    problems: int
    samples: int
    prompt_len: int
    new_tokens: int
    memory_len: int


SAMPLE_SHAPE = SampleShape(problems=4, samples=8, prompt_len=48, new_tokens=32, memory_len=16)
SMOKE_SAMPLE_SHAPE = SampleShape(problems=2, samples=2, prompt_len=4, new_tokens=3, memory_len=3)


def sample_workload(settings: "Settings", shape: SampleShape, spec: ModelSpec) -> Workload:
    def make_inputs():
        import fastmem

        model, _ = spec.build(settings)
        generator = torch.Generator().manual_seed(SEED)
        memories = initial_memories(model, "soft_prompt", shape.problems, shape.memory_len, generator)
        inputs = dict(prompts=random_tokens(model, shape.problems, shape.prompt_len, generator), memories=memories,
                      peft_model=peft_model_of(model, "soft_prompt", shape.memory_len))
        inputs["model"] = fastmem.patch(model)
        inputs["bank"] = bank_of(model, "soft_prompt", memories)
        return inputs

    tokens = shape.problems * shape.samples * shape.new_tokens
    return Workload("sample", f"{shape.problems} prompts x {shape.samples} samples, soft prompt; {spec.name}",
                    dict(asdict(shape), kind="soft_prompt", model=spec.describe()), make_inputs,
                    work=(tokens, "tokens"), compared=False)


def fastmem_sample(shape: SampleShape, temperature: float = 1.0):
    def compute(inputs):
        from fastmem import sample

        index = torch.arange(shape.problems, device=inputs["bank"].lengths.device)
        samples = sample(inputs["model"], inputs["prompts"], bank=inputs["bank"], index=index, n=shape.samples,
                         max_new_tokens=shape.new_tokens, temperature=temperature, eos_token_id=(), seed=SEED)
        return torch.tensor([[s.token_ids for s in row] for row in samples])
    return compute


def peft_sample(shape: SampleShape):
    def compute(inputs):
        return peft_sample_one_at_a_time(inputs["peft_model"], inputs["prompts"], inputs["memories"],
                                         shape.samples, shape.new_tokens, seed=SEED).cpu()
    return compute


def sample_cases(settings: "Settings") -> list[Case]:
    """fastmem.sample on B prompts at once against HF generate under PEFT prompt tuning, prompt after prompt."""
    shape, spec = (SMOKE_SAMPLE_SHAPE if settings.smoke else SAMPLE_SHAPE), model_for(settings)
    target = 5.0 if settings.device.type == "cuda" else 3.0
    return comparison_cases(sample_workload(settings, shape, spec), (END_TO_END,),
                            ("HF generate + PEFT prompt tuning (one prompt at a time)", peft_sample(shape)),
                            {"fastmem.sample": fastmem_sample(shape)}, targeted="fastmem.sample",
                            targets=(Target("speedup", target),))


SAMPLE_NOTE = ("sample: random samples from different generators, not compared here (tests/test_bench.py "
               "checks that greedy fastmem.sample equals greedy generate under PEFT, token for token)")


# --------------------------------------------------------------------------------------------------- loop

@dataclass(frozen=True)
class LoopShape:
    """One batch of B problems from the built-in stream, a store already holding ``stored`` entries
    (keys of earlier problems, N(0, 1) prefix memories as fresh ones start), n samples of at most
    ``max_new_tokens`` tokens, ``steps`` Adam steps, prefix memories of P positions."""
    problems: int
    samples: int
    steps: int
    memory_len: int
    max_new_tokens: int
    stored: int
    top_k: int = 2
    min_similarity: float = 0.5
    temperature: float = 1.0
    lr: float = 1e-3


LOOP_SHAPE = LoopShape(problems=16, samples=8, steps=4, memory_len=8, max_new_tokens=96, stored=16)
SMOKE_LOOP_SHAPE = LoopShape(problems=2, samples=2, steps=1, memory_len=2, max_new_tokens=6, stored=2)


def loop_workload(settings: "Settings", shape: LoopShape) -> Workload:
    def make_inputs():
        from bench.baselines import mean_hidden_state
        from fastmem.data import stream
        from fastmem.store import EntryMeta, MemoryStore

        model, tokenizer = DEFAULT_MODEL.build(settings)
        earlier = [p["question"] for p in stream(SEED + 1, shape.stored)]
        keys = torch.zeros(0, model.config.hidden_size, device=model.device)
        if earlier:
            keys = torch.stack([mean_hidden_state(model, tokenizer(q, return_tensors="pt").input_ids.to(model.device))
                                for q in earlier])
        generator = torch.Generator().manual_seed(SEED)
        memories = initial_memories(model, "prefix", shape.stored, shape.memory_len, generator)
        store = MemoryStore()
        if earlier:
            bank = bank_of(model, "prefix", memories)
            vectors = torch.cat([t.movedim(1, 0).flatten(1) for t in (bank.keys, bank.values)], dim=1).float()
            for question, key, vector in zip(earlier, keys, vectors):
                store.add(key, vector, EntryMeta(question=question, vote_share=1.0, members=1))
        return dict(model=model, tokenizer=tokenizer, store=store, keys=keys, memories=memories,
                    questions=[p["question"] for p in stream(SEED, shape.problems)],
                    peft_model=peft_model_of(model, "prefix", shape.memory_len))

    return Workload("loop", f"{shape.problems} problems, prefix, n={shape.samples}, {shape.steps} steps, "
                    f"{shape.stored} stored; {DEFAULT_MODEL.name}",
                    dict(asdict(shape), kind="prefix", model=DEFAULT_MODEL.describe()), make_inputs,
                    work=(shape.problems, "problems"), compared=False)


def fastmem_loop(shape: LoopShape):
    """`OnlineLearner.solve` on the batch, from a copy of the seeded store: one memory per problem, no
    control samples (every sample uses the retrieved memory, as the baseline's do); on the ranks of
    ``inputs["process_group"]`` when there is one (bench/ranks.py)."""
    def compute(inputs):
        from fastmem.data import extract_answer
        from fastmem.learner import OnlineLearner

        learner = OnlineLearner(inputs["model"], inputs["tokenizer"], copy.deepcopy(inputs["store"]),
                                n=shape.samples, steps=shape.steps, retrieve=shape.top_k, kind="prefix",
                                memory="problem", length=shape.memory_len, lr=shape.lr,
                                temperature=shape.temperature, max_new_tokens=shape.max_new_tokens, control=0,
                                min_similarity=shape.min_similarity, batch_size=shape.problems,
                                extract_answer=extract_answer, seed=SEED,
                                process_group=inputs.get("process_group"))
        return torch.tensor([result.vote_share for result in learner.solve(inputs["questions"])])
    return compute


def peft_loop(shape: LoopShape):
    def compute(inputs):
        from fastmem.data import extract_answer
        from fastmem.voting import majority_vote

        peft_model = inputs["peft_model"]
        weight_shape = inputs["memories"].shape[1:]
        device, dtype = inputs["memories"].device, inputs["memories"].dtype
        answers, _, _ = peft_online_loop(
            peft_model, inputs["tokenizer"], inputs["questions"], inputs["keys"], inputs["memories"],
            fresh_memory=lambda: torch.randn(weight_shape, device=device, dtype=dtype), n=shape.samples,
            steps=shape.steps, lr=shape.lr, top_k=shape.top_k, min_similarity=shape.min_similarity,
            max_new_tokens=shape.max_new_tokens, temperature=shape.temperature, extract_answer=extract_answer,
            vote=majority_vote, seed=SEED)
        return torch.tensor([answer is not None for answer in answers], dtype=torch.float32)
    return compute


def loop_cases(settings: "Settings") -> list[Case]:
    """OnlineLearner against the same loop written with HF generate and PEFT prefix tuning."""
    shape = SMOKE_LOOP_SHAPE if settings.smoke else LOOP_SHAPE
    return comparison_cases(loop_workload(settings, shape), (END_TO_END,),
                            ("HF + PEFT prefix tuning loop (one problem at a time)", peft_loop(shape)),
                            {"fastmem OnlineLearner": fastmem_loop(shape)}, targeted="fastmem OnlineLearner",
                            targets=(Target("speedup", 4.0),))


LOOP_NOTE = ("loop: both sides sample at temperature 1 with their own generators, so their samples, votes and "
             "sample lengths differ (not compared); both stop samples at eos. The baseline retrieves per "
             "question (it also sees earlier questions of the batch); the learner retrieves per batch")
