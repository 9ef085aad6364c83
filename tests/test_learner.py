"""OnlineLearner and `python -m fastmem run` on a tiny random model: plumbing, labels, resume, bad input."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastmem import training
from fastmem.__main__ import main
from fastmem.data import build_tokenizer, stream
from fastmem.learner import LearnerConfig, OnlineLearner
from fastmem.store import MemoryStore

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
SMALL_RUN = ["--n", "3", "--steps", "1", "--batch-size", "4", "--max-new-tokens", "6", "--no-baselines"]




def save_tiny_model(path, tokenizer, max_position_embeddings: int = 256):
    """A tiny random Llama for ``tokenizer``, saved with it in ``path`` like a user's local model."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with the built-in tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("model"), build_tokenizer())


def write_jsonl(path, problems):
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


@pytest.mark.parametrize("memory", ["cluster", "problem"])
def test_learner_stores_memories_and_reports_every_question(model_dir, memory):
    from fastmem.models import load_model

    model, tokenizer = load_model(str(model_dir))
    store = MemoryStore()
    learner = OnlineLearner(model, tokenizer, store, n=3, steps=1, control=1, memory=memory, batch_size=3,
                            max_new_tokens=6, cluster_similarity=0.0, min_similarity=0.0)
    questions = [p["question"] for p in stream(0, 6)]
    results = learner.solve(questions)
    assert [r.question for r in results] == questions
    assert all(len(r.samples) == 3 and r.memory_id in store.ids for r in results)
    if memory == "problem":
        assert len(store) == 6 and results[-1].retrieved   # later questions start from stored memories
    else:
        assert len(store) == 1 and store.meta(store.ids[0]).members == 6   # everything joined one cluster


def test_resample_draws_each_problem_with_its_own_trained_memory(model_dir, monkeypatch):
    """resample=True: n more samples per question after training, row b drawn with bank slot b (the memory
    trained on question b's own majority traces); the answer returned is their majority."""
    from fastmem.models import load_model
    from fastmem.voting import majority_vote

    model, tokenizer = load_model(str(model_dir))
    learner = OnlineLearner(model, tokenizer, MemoryStore(), n=3, steps=1, control=1, batch_size=3,
                            max_new_tokens=6, resample=True)
    drawn = []
    original = OnlineLearner.sample

    def recording_sample(self, prompts, n, seed, temperature=None, **memory):
        drawn.append(memory.get("index"))
        return original(self, prompts, n, seed, temperature, **memory)

    monkeypatch.setattr(OnlineLearner, "sample", recording_sample)
    results = learner.solve([p["question"] for p in stream(0, 3)])
    assert torch.equal(drawn[-1], torch.arange(3))   # the last draw: every question with its own slot
    for result in results:
        assert len(result.resampled) == 3
        assert result.answer == majority_vote(result.resampled, learner.equivalent).answer


def test_gap_closed_is_the_paired_share_of_the_pass1_to_majority_gap():
    from fastmem.cli import DISTILLED, gap_closed

    zero_shot, majority = [0.25, 0.5, 0.0, 0.75] * 10, [1.0, 1.0, 0.0, 1.0] * 10
    assert gap_closed({"zero-shot pass@1": zero_shot, "maj@N": majority}) is None
    for distilled, share in (([0.25, 0.5, 0.0, 0.75] * 10, 0.0), ([1.0, 1.0, 0.0, 1.0] * 10, 1.0),
                             ([0.5, 1.0, 0.0, 0.75] * 10, 0.75 / 1.5)):
        closed = gap_closed({"zero-shot pass@1": zero_shot, "maj@N": majority, DISTILLED: distilled})
        assert closed[0] == pytest.approx(share) and closed[1] <= closed[0] <= closed[2]
    wide = gap_closed({"zero-shot pass@1": [0.0, 0.5, 0.5, 0.0], "maj@N": [1.0, 1.0, 0.0, 0.0],
                       DISTILLED: [1.0, 0.0, 0.5, 0.5]})
    assert wide[2] - wide[1] > 0.5      # four problems: a wide interval


def test_run_reports_transfer_against_icl_and_distillation(model_dir):
    import argparse

    from fastmem.cli import DISTILLED, add_run_arguments, run

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    summary = run(parser.parse_args(["--model", str(model_dir), "--limit", "4", "--resample",
                                     *[a for a in SMALL_RUN if a != "--no-baselines"]]))
    half = [summary["fastmem pass@1 (second half)"], summary["raw-trace ICL pass@1 (second half)"]]
    assert summary["fastmem − ICL pass@1 (second half)"] == [f - i for f, i in zip(*half)]
    assert len(summary[DISTILLED]) == 4


@pytest.mark.parametrize("init", ["tokens", "normal"])
def test_fresh_prefixes_start_as_asked(model_dir, monkeypatch, init):
    from fastmem import learner
    from fastmem.memory import MemoryBank

    asked = []

    def recording(*args, **kwargs):
        asked.append(kwargs.get("init"))
        return MemoryBank.prefixes(*args, **kwargs)

    monkeypatch.setitem(learner.KINDS, "prefix", recording)
    main(["run", "--model", str(model_dir), "--limit", "2", "--prefix-init", init, *SMALL_RUN])
    assert asked and set(asked) == {init}
    with pytest.raises(ValueError, match="prefix_init must be one of normal, tokens"):
        OnlineLearner(None, None, MemoryStore(), prefix_init="zeros")


def test_settings_come_from_a_config_and_keywords_replace_its_fields(model_dir):
    from fastmem.models import load_model

    model, tokenizer = load_model(str(model_dir))
    config = LearnerConfig(n=6, control=1, steps=2)
    learner = OnlineLearner(model, tokenizer, MemoryStore(), config, steps=3, stop="###")
    assert learner.config == LearnerConfig(n=6, control=1, steps=3, stop=("###",)) and config.steps == 2
    assert OnlineLearner(model, tokenizer, MemoryStore(), n=5).config == LearnerConfig(n=5)
    with pytest.raises(TypeError, match="top_k"):
        OnlineLearner(model, tokenizer, MemoryStore(), top_k=2)
    with pytest.raises(TypeError, match="config must be a LearnerConfig"):
        OnlineLearner(model, tokenizer, MemoryStore(), 8)
    for bad, message in [(dict(n=0), "n must be > 0"), (dict(n=2, control=2), r"control must lie in \[0, n=2\)"),
                         (dict(lr=float("inf")), "lr must be a finite number"), (dict(steps=1.5), "steps must be an int"),
                         (dict(gate="yes"), "gate must be a bool"), (dict(stop=["ok", ""]), "stop must be non-empty"),
                         (dict(kind="lora"), "kind must be one of soft_prompt, prefix"),
                         (dict(cluster_similarity=1.5), r"cluster_similarity must be in \[-1, 1\]")]:
        with pytest.raises(ValueError, match=message):
            LearnerConfig(**bad)


def test_no_label_reaches_training(model_dir, tmp_path, monkeypatch):
    """Two runs whose data differ only in the answers train on identical inputs."""
    calls: list[list] = []
    original_step = training.MemoryTrainer.step

    def recording_step(self, prompts, traces, rewards, slots):
        calls[-1].append((prompts, traces, rewards, slots))
        return original_step(self, prompts, traces, rewards, slots)

    monkeypatch.setattr(training.MemoryTrainer, "step", recording_step)
    problems = [{"question": p["question"], "answer": p["answer"]} for p in stream(1, 4)]
    for answer_of in (lambda p: p["answer"], lambda p: "123456"):
        calls.append([])
        data = write_jsonl(tmp_path / "data.jsonl", [{**p, "answer": answer_of(p)} for p in problems])
        main(["run", "--model", str(model_dir), "--data", str(data), *SMALL_RUN])
    assert calls[0] and calls[0] == calls[1]


def test_interrupt_saves_store_and_resume_continues(model_dir, tmp_path, monkeypatch):
    store_dir, out = tmp_path / "store", tmp_path / "results.jsonl"
    args = ["run", "--model", str(model_dir), "--limit", "8", "--store", str(store_dir), "--out", str(out), *SMALL_RUN]
    original_solve = OnlineLearner.solve
    batches = []

    def interrupting_solve(self, questions, progress=None):
        if batches:
            raise KeyboardInterrupt
        batches.append(questions)
        return original_solve(self, questions, progress)

    monkeypatch.setattr(OnlineLearner, "solve", interrupting_solve)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 130
    assert len(out.read_text().splitlines()) == 4 and len(MemoryStore.load(store_dir)) >= 1
    monkeypatch.setattr(OnlineLearner, "solve", original_solve)
    main([*args, "--resume"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in lines] == [p["question"] for p in stream(0, 8)]


def test_malformed_jsonl_names_the_line_before_any_work(model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?"}\n{"question": 5}\n')
    with pytest.raises(SystemExit, match="--data: .*bad.jsonl: row 2: 'question' must be a non-empty string"):
        main(["run", "--model", str(model_dir), "--data", str(data), *SMALL_RUN])


def test_unwritable_store_fails_before_work(model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        main(["run", "--model", str(model_dir), "--store", str(blocker / "store"), *SMALL_RUN])


def scripted_answers(pattern):
    """An answer extractor that ignores the text and cycles through ``pattern`` (sample by sample)."""
    answers = iter(pattern * 1000)
    return lambda text: next(answers)


def small_learner(model_dir, store=None, **options):
    from fastmem.models import load_model

    model, tokenizer = load_model(str(model_dir))
    settings = dict(n=4, steps=1, control=1, batch_size=2, max_new_tokens=4, cluster_similarity=0.0)
    return OnlineLearner(model, tokenizer, store if store is not None else MemoryStore(), **{**settings, **options})


def recorded_steps(monkeypatch):
    calls = []
    original_step = training.MemoryTrainer.step

    def recording_step(self, prompts, traces, rewards, slots):
        calls.append((prompts, traces, rewards, slots))
        return original_step(self, prompts, traces, rewards, slots)

    monkeypatch.setattr(training.MemoryTrainer, "step", recording_step)
    return calls


@pytest.mark.parametrize("gate", [True, False])
def test_gate_closes_a_memory_that_lowered_agreement_unless_turned_off(model_dir, gate):
    learner = small_learner(model_dir, gate=gate, gate_trials=2)
    questions = [p["question"] for p in stream(2, 4)]
    first = learner.solve(questions[:2])
    assert not any(r.used_memory for r in first)           # nothing stored yet: a fresh cluster
    cluster = first[0].memory_id
    assert learner.solve(questions[2:3])[0].used_memory      # open until gate_trials uses are measured
    # its samples agreed less than control's
    learner.store.update(cluster, meta=replace(learner.store.meta(cluster), gate_trials=2, gate_gain=-0.5))
    assert learner.solve(questions[3:4])[0].used_memory is (not gate)


def test_confidence_filter_trains_only_on_confident_votes(model_dir, monkeypatch):
    calls = recorded_steps(monkeypatch)
    # problem 0: four equal answers (share 1); problem 1: two against two (share 0.5)
    learner = small_learner(model_dir, memory="problem", min_share=0.75,
                            extract_answer=scripted_answers(["7", "7", "7", "7", "1", "2", "1", "2"]))
    learner.solve([p["question"] for p in stream(3, 2)])
    (_, _, rewards, _), = calls
    assert rewards == [[1.0] * 4, [0.0] * 4]


def test_replay_trains_each_cluster_on_its_remembered_problems(model_dir, monkeypatch):
    calls = recorded_steps(monkeypatch)
    learner = small_learner(model_dir, replay=3, extract_answer=scripted_answers(["7"]))
    questions = [p["question"] for p in stream(4, 6)]
    for start in range(0, 6, 2):
        learner.solve(questions[start:start + 2])
    prompts = [learner.tokenizer(q)["input_ids"] for q in questions]
    (cluster,) = learner.store.ids
    remembered = learner.store.meta(cluster).replay
    assert [item["prompt"] for item in remembered] == prompts[3:]          # the newest three, in order
    assert all(len(item["traces"]) == 4 for item in remembered)            # every sample agreed
    assert calls[0][0] == prompts[:2]                                      # batch 1: nothing remembered yet
    assert calls[1][0] == prompts[2:4] + prompts[:2]                       # batch 2: its own, then the replay
    assert calls[2][0] == prompts[4:6] + prompts[1:4]


@pytest.mark.parametrize("every", [0, 1])
def test_learner_consolidates_the_store_every_k_batches(model_dir, every):
    learner = small_learner(model_dir, memory="problem", consolidate_every=every, consolidate_threshold=0.99)
    question = next(stream(5, 1))["question"]
    learner.solve([question] * 4)                  # identical keys: near duplicates
    if every:
        assert len(learner.store) == 1 and len(learner.store.meta(learner.store.ids[0]).merged) == 3
    else:
        assert len(learner.store) == 4


@pytest.mark.parametrize("memory", ["cluster", "problem"])
def test_a_full_store_evicts_only_entries_the_batch_has_finished_with(model_dir, memory):
    """A batch that retrieves the only entry of a full store (capacity 1) and also opens a new entry: the
    retrieved entry is updated (cluster mode) and its hit counted before the add evicts it (this was a
    KeyError in the cluster update); the new entry is stored. A question that joins a cluster opened in its
    own batch is folded in before a later add can evict that cluster."""
    directions = {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}

    def embed(questions):
        return torch.tensor([directions[q[0]] for q in questions])

    store = MemoryStore(capacity=1)
    learner = small_learner(model_dir, store, memory=memory, cluster_similarity=0.9, min_similarity=0.5,
                            batch_size=4, embed_fn=embed)
    first = learner.solve(["a1"])[0].memory_id
    results = learner.solve(["a2", "b1", "b2", "c1"])
    assert [r.retrieved for r in results][:1] == [[first]] and store.ids == [results[-1].memory_id]
    if memory == "cluster":
        assert results[0].memory_id == first and results[1].memory_id == results[2].memory_id
        assert store.meta(store.ids[0]).question == "c1" and store.meta(store.ids[0]).members == 1
    assert store.meta(store.ids[0]).hits == 0
