"""`python -m fastmem run` options: one-line errors before any model loads, every default in --help, data files
in four formats through `datasets`, the prompt format (chat template, system, template) used everywhere."""
from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest
import torch
from test_learner import save_tiny_model

import fastmem.models
from fastmem import training
from fastmem.__main__ import main
from fastmem.data import build_tokenizer
from fastmem.data.files import read_problems, reference_answer
from fastmem.data.words import write_jsonl
from fastmem.learner import LearnerConfig, OnlineLearner
from fastmem.models import load_model
from fastmem.prompting import CHAT_PROMPT, PromptFormat
from fastmem.store import MemoryStore

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
SMALL_RUN = ["--n", "3", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--no-baselines"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama whose (character) tokenizer has a chat template."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return save_tiny_model(tmp_path_factory.mktemp("chat_model"), tokenizer, max_position_embeddings=1024)


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was reported")

    monkeypatch.setattr(fastmem.models, "load_model", refuse)


BAD_OPTIONS = [
    (["--limit", "0"], "--limit"),
    (["--rank-timeout", "0"], "--rank-timeout"),
    (["--n", "1"], "--control"),
    (["--n", "4", "--control", "4"], "--control"),
    (["--n", "0"], "--n"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--steps", "-1"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--length", "0"], "--length"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-k", "2.5"], "--top-k"),
    (["--min-p", "1"], "--min-p"),
    (["--stop", ""], "--stop"),
    (["--min-share", "2"], "--min-share"),
    (["--cluster-similarity", "1.5"], "--cluster-similarity"),
    (["--replay", "-1"], "--replay"),
    (["--consolidate-every", "-2"], "--consolidate-every"),
    (["--retrieve", "0"], "--retrieve"),
    (["--objective", "dpo"], "--objective"),
    (["--min-similarity", "-1.5"], "--min-similarity"),
    (["--gate-trials", "-1"], "--gate-trials"),
    (["--consolidate-threshold", "0"], "--consolidate-threshold"),
    (["--seed", "x"], "--seed"),
    (["--limit", "many"], "--limit"),
    (["--prompt", "no placeholder"], "--prompt"),
    (["--chat-template", "always"], "--chat-template"),
    (["--dtype", "int4"], "--dtype"),
    (["--device", "tpu9"], "--device"),
    (["--model", "/no/such/model"], "--model"),
    (["--model", "nobody/uncached-model"], "--model"),
    (["--data", "/no/such/file.jsonl"], "--data"),
    (["--data", "problems.txt"], "--data"),
    (["--resume"], "--resume"),
]


@pytest.mark.parametrize("options, named", BAD_OPTIONS)
def test_bad_option_is_one_line_naming_it_before_the_model_loads(options, named, no_model_load, capsys,
                                                                 tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "problems.txt" in options:
        (tmp_path / "problems.txt").write_text("1+1?\n")
    with pytest.raises(SystemExit) as stopped:
        main(["run", *options])
    message = str(stopped.value.code) if isinstance(stopped.value.code, str) else capsys.readouterr().err
    assert stopped.value.code != 0
    lines = message.strip().splitlines()
    assert len(lines) == 1, message
    assert named in lines[0] and lines[0].startswith("fastmem run: error:"), message


def test_data_errors_name_the_file_and_row_before_the_model_loads(tmp_path, no_model_load):
    data = tmp_path / "q.jsonl"
    data.write_text('{"problem": "1+1?", "solution": "#### 2"}\n')
    with pytest.raises(SystemExit, match=r"^fastmem run: error: --data: .*q.jsonl: no column 'question' .*"
                                         r"--question-field.*columns: problem, solution$"):
        main(["run", "--data", str(data)])
    data.write_text('{"question": "1+1?"}\n{"question": \n')
    with pytest.raises(SystemExit, match="--data: .*q.jsonl: cannot read it as json"):
        main(["run", "--data", str(data)])


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    import argparse

    from fastmem.cli import add_run_arguments

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    options = [action for action in parser._actions if action.dest != "help"]
    assert len(options) > 30 and all(action.help for action in options)
    assert text.count("(default: ") == len(options)
    assert "--max-new-tokens MAX_NEW_TOKENS tokens per sample at most (default: 96)" in text


def run_parser():
    import argparse

    from fastmem.cli import add_run_arguments

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser


def test_every_learner_setting_is_an_option_with_the_configs_default():
    from fastmem.cli import learner_config

    parser = run_parser()
    by_dest = {action.dest: action for action in parser._actions}
    for item in fields(LearnerConfig):
        assert item.name in by_dest, f"LearnerConfig.{item.name} has no command-line option"
        default = parser.get_default(item.name)
        assert (default if item.default != () else tuple(default or ())) == item.default, item.name
        assert by_dest[item.name].help == item.metadata["help"], item.name
    assert parser.get_default("max_new_tokens") == LearnerConfig().max_new_tokens == 96
    assert learner_config(parser.parse_args([])) == LearnerConfig()


def test_options_reach_their_config_fields():
    from fastmem.cli import learner_config

    config = learner_config(run_parser().parse_args(
        ["--samples", "5", "--top-k", "7", "--retrieve", "3", "--objective", "reinforce", "--min-similarity", "0.25",
         "--stop", "a", "--stop", "b", "--gate", "--no-resample", "--seed", "4", "--lr", "0.5"]))
    assert config == LearnerConfig(n=5, sample_top_k=7, retrieve=3, objective="reinforce", min_similarity=0.25,
                                   stop=("a", "b"), gate=True, resample=False, seed=4, lr=0.5)


def test_the_command_line_and_the_config_accept_the_same_numbers():
    """At and just beyond each end of every bounded number setting, the parser and `LearnerConfig` agree."""
    from fastmem.options import Range, flags_of

    parser = run_parser()
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    checked = 0
    for item in fields(LearnerConfig):
        allowed, kind = item.metadata["allowed"], type(item.default)
        if not isinstance(allowed, Range):
            continue
        ends = [end for end in (allowed.low, allowed.high) if end is not None]
        step = 1 if kind is int else 1e-3
        for value in {kind(end + delta) for end in ends for delta in (-step, 0, step)}:
            others = {"control": 0} if item.name == "n" else {}
            try:
                LearnerConfig(**{item.name: value}, **others)
                config_ok = True
            except ValueError:
                config_ok = False
            try:
                parser.parse_args([flags_of(item)[0], str(value)])
                cli_ok = True
            except ValueError:
                cli_ok = False
            assert cli_ok == config_ok == (value in allowed), (item.name, value)
            checked += 1
    assert checked > 40


# ---- data files ---------------------------------------------------------------------------------

ROWS = [{"problem": "Tom has 3 apples and buys 4. How many?", "solution": "3 + 4 = 7\n#### 7"},
        {"problem": "What is 1/2 of 1?", "solution": "Half of one: $\\boxed{\\frac{1}{2}}$."},
        {"problem": "How many sides has a square?", "solution": "4"},
        {"problem": "A thousand and one?", "solution": "1000 + 1 = 1001\n#### 1,001"}]
EXPECTED = [("Tom has 3 apples and buys 4. How many?", "7"), ("What is 1/2 of 1?", "\\frac{1}{2}"),
            ("How many sides has a square?", "4"), ("A thousand and one?", "1001")]


def write_rows(path, rows):
    import pandas

    frame = pandas.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_data_files_of_every_format_with_chosen_fields(tmp_path, suffix):
    path = write_rows(tmp_path / f"problems{suffix}", ROWS)
    problems = read_problems(str(path), question_field="problem", answer_field="solution")
    assert [(p["question"], p["answer"]) for p in problems] == EXPECTED
    assert len(read_problems(str(path), question_field="problem", answer_field="solution", limit=2)) == 2
    unlabelled = read_problems(str(path), question_field="problem", answer_field="label")
    assert all(p["answer"] is None for p in unlabelled)


def test_reference_answers_gsm8k_math_and_bare():
    assert reference_answer("Natalia sold 24 clips.\n#### 72") == "72"
    assert reference_answer("so the answer is $\\boxed{9}$ and then $\\boxed{10}$") == "10"
    assert reference_answer(" 42 ") == "42" and reference_answer(7) == "7"
    assert reference_answer(None) is None and reference_answer("") is None


# ---- the prompt format ---------------------------------------------------------------------------

def test_prompt_format_with_and_without_a_chat_template(chat_model_dir):
    _, tokenizer = load_model(chat_model_dir, device="cpu")

    def ids(text):   # the character tokenizer has no capitals, braces or backslash: compare ids, not text
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    question = "2+3?"
    assert PromptFormat().encode(tokenizer, question) == ids(
        "<user>" + CHAT_PROMPT.replace("{question}", question) + "</s><assistant>")
    custom = PromptFormat(template="q: {question} {a}", system="be brief")
    assert custom.encode(tokenizer, question) == ids("<system>be brief</s><user>q: 2+3? {a}</s><assistant>")
    assert PromptFormat(template="{question}").encode(tokenizer, question, [("1+1?", "2")]) == ids(
        "<user>1+1?</s><assistant>2</s><user>2+3?</s><assistant>")
    plain = PromptFormat(chat_template="none")
    assert plain.encode(tokenizer, question) == tokenizer(question)["input_ids"]
    assert plain.encode(tokenizer, question, [("1+1?", " 2")]) == (
        tokenizer("1+1?")["input_ids"] + tokenizer(" 2", add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id] + tokenizer(question)["input_ids"])
    with pytest.raises(ValueError, match="must hold"):
        PromptFormat(template="no question")
    with pytest.raises(ValueError, match="chat_template"):
        PromptFormat(chat_template="yes")


def test_sampling_training_and_retrieval_keys_use_the_formatted_prompt(chat_model_dir, monkeypatch):
    import fastmem.learner as learner_module

    model, tokenizer = load_model(chat_model_dir, device="cpu")
    sampled, trained = [], []
    original_sample, original_step = learner_module.sample, training.MemoryTrainer.step
    monkeypatch.setattr(learner_module, "sample",
                        lambda model, prompts, **kw: sampled.append(prompts) or original_sample(model, prompts, **kw))
    monkeypatch.setattr(training.MemoryTrainer, "step",
                        lambda self, prompts, *a: trained.append(prompts) or original_step(self, prompts, *a))
    learner = OnlineLearner(model, tokenizer, MemoryStore(), n=3, steps=1, control=1, batch_size=2,
                            max_new_tokens=4, extract_answer=lambda text: "1",
                            prompt=PromptFormat(system="sys", template="q: {question}"))
    questions = ["1+1?", "2+2?"]
    learner.solve(questions)
    expected = [learner.prompt.encode(tokenizer, q) for q in questions]
    assert tokenizer.decode(expected[0]) == "<system>sys</s><user>q: 1+1?</s><assistant>"
    assert sampled and all(prompts == expected for prompts in sampled)
    assert trained and trained[0][:2] == expected
    with torch.no_grad():
        hidden = learner.model(input_ids=torch.tensor([expected[1]]), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(learner.embed(questions)[1], hidden[0].mean(0).float())


def test_run_applies_the_template_and_sampling_options(chat_model_dir, tmp_path, monkeypatch):
    import fastmem.learner as learner_module

    calls = []
    original_sample = learner_module.sample
    monkeypatch.setattr(learner_module, "sample",
                        lambda model, prompts, **kw: calls.append((prompts, kw)) or original_sample(model, prompts, **kw))
    data = write_jsonl(tmp_path / "words.jsonl", seed=3, n=2)
    out = tmp_path / "out.jsonl"
    main(["run", "--model", str(chat_model_dir), "--data", str(data), "--system", "s", "--temperature", "0.7",
          "--top-p", "0.9", "--top-k", "5", "--min-p", "0.05", "--stop", "</s>", "--stop", "\n\n", "--out", str(out),
          *SMALL_RUN])
    _, tokenizer = load_model(chat_model_dir, device="cpu")
    prompts, options = calls[0]
    assert tokenizer.decode(prompts[0]).startswith("<system>s</s><user>")
    suffix = tokenizer("\nPut your final answer within \\boxed{}.</s><assistant>", add_special_tokens=False)["input_ids"]
    assert prompts[0][-len(suffix):] == suffix
    assert options["temperature"] == 0.7 and options["top_p"] == 0.9 and options["top_k"] == 5
    assert options["min_p"] == 0.05 and options["stop"] == ("</s>", "\n\n") and options["max_new_tokens"] == 4
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["reference"].isdigit() for r in records)
    calls.clear()
    main(["run", "--model", str(chat_model_dir), "--data", str(data), "--chat-template", "none", *SMALL_RUN])
    assert "<user>" not in tokenizer.decode(calls[0][0][0])


def test_builtin_word_problems_run_by_name(chat_model_dir, monkeypatch):
    import fastmem.cli as cli

    seen = []
    original = cli._record
    monkeypatch.setattr(cli, "_record", lambda problem, *rest: seen.append(problem) or original(problem, *rest))
    main(["run", "--model", str(chat_model_dir), "--data", "words", "--limit", "2", "--seed", "4", *SMALL_RUN])
    from fastmem.data.words import word_problems

    assert [p["question"] for p in seen] == [p["question"] for p in word_problems(4, 2)]
    assert all(p["answer"] == p_["answer"].rsplit("#### ", 1)[1] for p, p_ in zip(seen, word_problems(4, 2)))


# ---- python -m fastmem info ----------------------------------------------------------------------

def info_report(capsys) -> tuple[dict[str, str], dict[tuple[str, str, int], str], str]:
    """``python -m fastmem info``'s backend lines: name -> status, (device, dtype, head dim) -> auto's pick."""
    main(["info"])
    text = capsys.readouterr().out
    status = dict(re.findall(r"^  (\w+) +(available|unavailable: .*)$", text, re.MULTILINE))
    picks = {(device, dtype, int(head_dim)): picked for device, dtype, head_dim, picked
             in re.findall(r"^  auto on (\w+) +(\w+) +head dim (\d+) +-> (\w+)$", text, re.MULTILINE)}
    return status, picks, text


@pytest.mark.parametrize("native_off", [False, True], ids=["as installed", "native switched off"])
def test_info_reports_each_backends_availability_and_autos_pick(capsys, monkeypatch, native_off):
    """Every backend is listed with its real availability (and reason), and each auto line names what
    `auto` runs: on the CPU the native kernel when it is available, else the torch reference. With the
    native backend made unavailable, info says so and auto falls back to torch."""
    from fastmem.ops import backends

    if native_off:
        real = backends.unavailable_reason
        monkeypatch.setattr(backends, "unavailable_reason",
                            lambda name: "switched off by the test" if name == "native" else real(name))
    backends.resolve.cache_clear()
    try:
        status, picks, text = info_report(capsys)
    finally:
        backends.resolve.cache_clear()
    native = backends.unavailable_reason("native")
    if native_off:
        assert native == "switched off by the test"
    assert status == {name: "available" if backends.unavailable_reason(name) is None
                      else f"unavailable: {backends.unavailable_reason(name)}" for name in backends.BACKENDS}
    assert ("native CPU kernels" in text) == (native is None)
    from fastmem.ops import native as native_module
    few_row = [line for line in text.splitlines() if line.startswith("few-row linear")]
    assert len(few_row) == 1 and few_row[0].endswith("native kernel") == native_module.is_available()
    cpu = {key: picked for key, picked in picks.items() if key[0] == "cpu"}
    assert sorted(cpu) == sorted(("cpu", dtype, head_dim) for dtype in ("float32", "float16", "bfloat16")
                                 for head_dim in (64, 128))
    assert set(cpu.values()) == {"torch" if native is not None else "native"}
    assert len(picks) == 6 * (1 + torch.cuda.is_available())

