"""``python -m fastmem run``: the online learner on a stream of questions, then an honest comparison.

With no arguments it runs on the built-in default: the shipped tiny Llama and its tokenizer, and the
built-in stream of synthetic multi-step problems (``--seed`` picks the stream). Answers, when the
data has them, are used only to report accuracy, after learning, never during it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The run command's options. Each value is checked as it is parsed, or by `check_run_args` (options
    that depend on each other, files, the model spec), all before any model loads; a bad one is a one-line
    error naming its option. ``--help`` shows every default."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    _one_line_errors(parser)
    from fastmem.data.files import BUILTIN
    from fastmem.distributed import DEFAULT_TIMEOUT_S
    from fastmem.models import DTYPES
    from fastmem.options import POSITIVE
    from fastmem.prompting import CHAT_PROMPT, CHAT_TEMPLATE_CHOICES

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="a Hugging Face model folder, a .gguf file, a folder holding one .gguf, or a "
                                       "hub id already in the local cache (never downloaded); none: the shipped "
                                       "tiny Llama")
    model.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights' dtype (auto: the "
                                                                                 "checkpoint's own)")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="a .jsonl, .json, .csv or .parquet file, or a built-in stream: "
                                     + "; ".join(f"{name}: {what}" for name, what in BUILTIN.items())
                                     + " (none: synthetic)")
    data.add_argument("--question-field", default="question", help="the data's question column")
    data.add_argument("--answer-field", default="answer",
                      help="the data's reference column (a bare answer, a GSM8K '#### N' solution or a MATH "
                           "\\boxed{} solution), used only to report accuracy; absent: no accuracy")
    data.add_argument("--limit", type=_typed(int, POSITIVE), default=200, help="problems to solve")
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--chat-template", choices=CHAT_TEMPLATE_CHOICES, default="auto",
                        help="apply the tokenizer's chat template (auto: when it has one)")
    prompt.add_argument("--system", help="system message (none: the chat template's default)")
    prompt.add_argument("--prompt", type=_prompt_template,
                        help="the user turn, holding {question} (none: %r with a chat template, the bare "
                             "question without)" % CHAT_PROMPT)
    groups = {"data": data, "sampling": parser.add_argument_group("sampling"),
              "learning": parser.add_argument_group("learning")}
    add_learner_arguments(groups)
    output = parser.add_argument_group("output")
    output.add_argument("--store", help="persist the memory store in this directory")
    output.add_argument("--resume", action="store_true", help="continue a run from --store and --out")
    output.add_argument("--out", help="results JSONL, one line per problem")
    output.add_argument("--no-baselines", action="store_true", help="skip the comparison table")
    ranks = parser.add_argument_group("several processes (torchrun --nproc-per-node N -m fastmem run ...)")
    ranks.add_argument("--rank-timeout", type=_typed(float, POSITIVE), default=DEFAULT_TIMEOUT_S,
                       help="seconds a rank waits for the others at a batch's exchange before failing")


def add_learner_arguments(groups: dict) -> None:
    """One option per `LearnerConfig` field, in the argparse group its field names (``groups``: group name ->
    group), with the field's default, help text and allowed values; `learner_config` reads them back. A
    number's allowed range is checked as it is parsed (a one-line error naming the option)."""
    from dataclasses import fields

    from fastmem.learner import LearnerConfig
    from fastmem.options import flags_of

    for item in fields(LearnerConfig):
        kind, allowed = type(item.default), item.metadata["allowed"]
        spec = dict(dest=item.name, default=item.default, help=item.metadata["help"])
        if kind is bool:
            spec["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:     # repeated; argparse appends to a list, so no default list to append to
            spec.update(action="append", type=_non_empty, default=None)
        elif isinstance(allowed, tuple):
            spec["choices"] = allowed
        else:
            spec["type"] = _typed(kind, allowed)
        groups[item.metadata["group"]].add_argument(*flags_of(item), **spec)


def learner_config(args):
    """The `LearnerConfig` of parsed ``args`` (`add_learner_arguments`' options)."""
    from dataclasses import fields

    from fastmem.learner import LearnerConfig

    return LearnerConfig(**{item.name: getattr(args, item.name) for item in fields(LearnerConfig)})


ERROR_PREFIX = "fastmem run: error: "   # every one-line error of the run command starts so


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's errors without the usage block: ``fastmem run: error: argument --n: ...``."""
    def error(message: str):
        parser.exit(2, f"{ERROR_PREFIX}{message}\n")

    parser.error = error


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}; got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def _typed(kind, allowed=None):
    """An argparse type: ``kind`` (int or float, finite) within ``allowed`` (a `fastmem.options.Range`; None: any)."""
    def parse(text: str):
        value = _number(kind, text)
        if allowed is not None and value not in allowed:
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text}")
        return value

    parse.__name__ = kind.__name__   # argparse names the type in its own messages
    return parse


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _prompt_template(text: str) -> str:
    from fastmem.prompting import QUESTION

    if QUESTION not in text:
        raise argparse.ArgumentTypeError(f"must hold {QUESTION}, where the question goes; got {text!r}")
    return text


def check_run_args(args) -> None:
    """SystemExit (one line naming the option) for what the parser alone cannot check: options that depend on
    each other, the data file, the model spec, dtype and device. Loads nothing."""
    from fastmem.data.files import DataError, check_data_spec
    from fastmem.models import ModelLoadError, resolve_device, resolve_model

    if not 0 <= args.control < args.n:
        _fail(f"--control must be less than --n (samples drawn without memory, out of n); got --control "
              f"{args.control} with --n {args.n}")
    checks = (("--data", lambda: check_data_spec(args.data), DataError),
              ("--model", lambda: resolve_model(args.model), ModelLoadError),
              ("--device", lambda: resolve_device(getattr(args, "device", "auto")), ValueError))
    for option, check, error_type in checks:
        try:
            check()
        except error_type as error:
            _fail(f"{option}: {error}")
    if args.resume and not (args.store or args.out):
        _fail("--resume needs --store or --out (what to continue from)")


def _fail(message: str):
    raise SystemExit(f"{ERROR_PREFIX}{message}")


def read_questions(args) -> list[dict]:
    """The problems to solve (`fastmem.data.files.read_problems`); a bad file is a one-line error naming it,
    raised before any work."""
    from fastmem.data.files import DataError, read_problems

    try:
        return read_problems(args.data, question_field=args.question_field, answer_field=args.answer_field,
                             limit=args.limit, seed=args.seed)
    except DataError as error:
        _fail(f"--data: {error}")


def prompt_format(args):
    """The `PromptFormat` of ``--chat-template``, ``--system`` and ``--prompt``."""
    from fastmem.prompting import PromptFormat

    return PromptFormat(template=args.prompt, system=args.system, chat_template=args.chat_template)


def mean_and_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal-approximation confidence interval."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, 1.96 * math.sqrt(variance / len(values))


def run(args) -> dict:
    """The ``run`` command: the online loop over the problems, then (without --no-baselines, when the data
    has answers) the comparison; returns the summary. Launched by torchrun with several ranks, each batch is
    split across them (`fastmem.distributed`) and rank 0 alone reads and writes --store and --out (every
    rank reads --data and --model). A batch is committed when its records are appended to --out and then
    --store is saved with the problems done (`MemoryStore.save(progress=)`); a dead rank (the others exit
    with a one-line error), an interrupt or a crash leaves the last committed batch on disk, and --resume
    continues after it (a batch whose records reached --out but whose store was not saved is solved again)."""
    from fastmem.distributed import RankFailure

    try:
        return _run(args)
    except RankFailure as error:
        # A rank whose peer vanished leaves without running C++ destructors: at the interpreter's exit gloo's
        # threads can still be joinable, and std::terminate aborts the process (SIGABRT, 1 exit in 30 on a
        # loaded machine) instead of exiting 1. Nothing is lost: the last committed batch is on disk, SQLite
        # rolls back the writer's open transaction, and the store's lock goes with the process.
        print(f"{ERROR_PREFIX}{error}. On disk: the last committed batch; continue with --resume",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def _run(args) -> dict:
    from fastmem.distributed import broadcast, join_torchrun_group, torchrun_world_size
    from fastmem.learner import OnlineLearner
    from fastmem.models import ModelLoadError, load_model
    from fastmem.store import MemoryStore, StoreLockedError

    check_run_args(args)
    device, group = args.device, None
    if torchrun_world_size() > 1:
        try:
            device, group = join_torchrun_group(args.device, args.rank_timeout)
        except ValueError as error:
            _fail(f"--device: {error}")
    leader = group is None or group.rank() == 0
    problems = read_questions(args)
    out_path = Path(args.out) if args.out else None
    store, done = None, []
    if leader:
        try:
            store = MemoryStore.load(args.store) if args.resume and args.store and MemoryStore.exists(args.store) \
                else MemoryStore(args.store)
        except StoreLockedError as error:
            _fail(f"--store: {error}")
        done = _read_done(out_path) if args.resume else []
        if args.resume and out_path is not None and store.progress is not None and len(done) != store.progress:
            done = _match_store(out_path, done, store.progress)
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            if not args.resume:
                out_path.write_text("")
    store, done = broadcast((store, done), group, "the store and the finished records")
    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    except ModelLoadError as error:
        _fail(f"--model: {error}")
    learner = OnlineLearner(model, tokenizer, store, learner_config(args), prompt=prompt_format(args),
                            extract_answer=_extractor(args), process_group=group)
    learner.batches_done, learner.problems_done = len(done) // args.batch_size, len(done)
    records = list(done)
    started = time.perf_counter()
    from tqdm import tqdm

    todo = problems[len(done):]
    unsaved = False          # the records of a solved batch are in --out, its store not yet saved
    try:
        with tqdm(total=len(problems), initial=len(done), unit="problem", file=sys.stderr,
                  disable=not leader) as bar:
            for start in range(0, len(todo), args.batch_size):
                chunk = todo[start:start + args.batch_size]
                solved = [_record(problem, result, learner)
                          for problem, result in zip(chunk, learner.solve([p["question"] for p in chunk]))]
                records += solved
                if leader:
                    unsaved = True
                    _append_records(out_path, solved)
                    if args.store:
                        store.save(progress=len(records))
                    unsaved = False
                bar.update(len(chunk))
    except KeyboardInterrupt:
        if unsaved and args.store:
            store.save(progress=len(records))
        store.close()   # releases the store's lock now, not when the traceback goes
        if leader:
            print(f"\ninterrupted after {len(records)} problems"
                  + (f"; the store in {args.store} holds them: continue with --resume" if args.store else ""),
                  file=sys.stderr)
        raise SystemExit(130)
    elapsed = time.perf_counter() - started
    summary = {"problems": len(records), "problems_per_s": (len(records) - len(done)) / max(elapsed, 1e-9)}
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    if not leader:
        return summary
    if not args.no_baselines and all(p["answer"] is not None for p in problems):
        summary.update(compare(learner, problems, records, args))
    store.close()
    print_summary(summary, args)
    return summary


def _match_store(out_path: Path, done: list[dict], progress: int) -> list[dict]:
    """--out's records cut back to the ``progress`` problems the store committed: a crash (a ``kill -9``, a
    power cut) between appending a batch's records and saving the store leaves --out one batch ahead, and that
    batch is solved again. --out is rewritten atomically (a temporary file, fsynced, renamed). A store ahead of
    --out (another run's --out): the run stops with an error, changing nothing."""
    if len(done) < progress:
        _fail(f"--resume: --store committed {progress} problems but --out holds {len(done)} records: they are not "
              "from the same run (give the --out this store was saved with)")
    print(f"--resume: --out holds {len(done) - progress} records of a batch whose store was never saved (the "
          "run stopped between the two writes); that batch is solved again", file=sys.stderr)
    lines = [line for line in out_path.read_text().splitlines() if line.strip()][:progress]
    partial = out_path.with_name(out_path.name + ".partial")
    with partial.open("w") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, out_path)
    return done[:progress]


def _append_records(out_path: Path | None, records: list[dict]) -> None:
    """One batch's records appended to --out in one write, flushed to disk."""
    if out_path is None:
        return
    with out_path.open("a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def _extractor(args):
    """The built-in synthetic stream's ``=> N`` format for it, else the generic extractor."""
    if args.data is None or args.data == "synthetic" and not Path(args.data).exists():
        from fastmem.data import extract_answer

        return extract_answer
    from fastmem.voting import extract_answer

    return extract_answer


def _read_done(out_path: Path | None) -> list[dict]:
    if out_path is None or not out_path.exists():
        return []
    return [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()]


def _record(problem: dict, result, learner) -> dict:
    correct = None if problem["answer"] is None else [
        a is not None and learner.equivalent(a, problem["answer"]) for a in result.answers]
    return {"question": result.question, "answer": result.answer, "vote_share": result.vote_share,
            "memory_id": result.memory_id, "retrieved": result.retrieved, "used_memory": result.used_memory,
            "samples": result.samples, "answers": result.answers, "memory_samples": result.memory_samples,
            "resampled_answers": result.resampled, "reference": problem["answer"], "sample_correct": correct,
            "majority_correct": None if correct is None else (
                result.answer is not None and learner.equivalent(result.answer, problem["answer"]))}


def _accuracy(answers: list[list[str | None]], problems: list[dict], equivalent) -> list[float]:
    return [sum(a is not None and equivalent(a, p["answer"]) for a in row) / len(row)
            for row, p in zip(answers, problems)]


def compare(learner, problems: list[dict], records: list[dict], args) -> dict:
    """Per-problem accuracies: baselines on the same problems (the learner's prompts, sampling settings and n,
    no memory; greedy at temperature 0) and fastmem's own (pass@1 over the samples drawn with the learner's
    memories, the control samples excluded; maj@N of the answers it returned). Transfer: the second half of
    the stream, fastmem against zero-shot and against raw-trace ICL, paired per problem. Distillation (when
    the records hold resampled answers, ``--resample``): pass@1 of the samples drawn with each problem's own
    trained memory; `gap_closed` turns it into the share of the pass@1 -> maj@N gap it closes."""
    from fastmem.voting import majority_vote

    equivalent = learner.equivalent
    prompts = [learner.encode(p["question"]) for p in problems]

    def answers_of(samples):
        return [[learner.extract_answer(s.text) for s in row] for row in samples]

    zero_shot = answers_of(learner.sample(prompts, args.n, args.seed + 7))
    greedy = answers_of(learner.sample(prompts, 1, args.seed, temperature=0.0))
    majority = [[majority_vote(row, equivalent).answer] for row in zero_shot]
    icl = answers_of(learner.sample(icl_prompts(learner, problems, records), args.n, args.seed + 11))
    treated = [r["answers"][:r["memory_samples"]] for r in records]
    half = len(problems) // 2
    stream_pass = _accuracy(treated, problems, equivalent)
    zero_shot_pass = _accuracy(zero_shot, problems, equivalent)
    icl_pass = _accuracy(icl, problems, equivalent)
    rows = {
        "zero-shot pass@1": zero_shot_pass,
        "greedy": _accuracy(greedy, problems, equivalent),
        "maj@N": _accuracy(majority, problems, equivalent),
        "raw-trace ICL pass@1": icl_pass,
        "fastmem pass@1 (stream)": stream_pass,
        "zero-shot pass@1 (second half)": zero_shot_pass[half:],
        "raw-trace ICL pass@1 (second half)": icl_pass[half:],
        "fastmem pass@1 (second half)": stream_pass[half:],
        # per problem, so their intervals are the paired ones (narrower than comparing two rows' intervals)
        "fastmem − zero-shot pass@1 (second half)": [f - z for f, z in zip(stream_pass[half:], zero_shot_pass[half:])],
        "fastmem − ICL pass@1 (second half)": [f - i for f, i in zip(stream_pass[half:], icl_pass[half:])],
        "fastmem maj@N (stream)": [float(r["majority_correct"]) for r in records],
    }
    if all(r.get("resampled_answers") for r in records):
        rows[DISTILLED] = _accuracy([r["resampled_answers"] for r in records], problems, equivalent)
    return rows


DISTILLED = "distilled pass@1 (own trained memory)"


def gap_closed(rows: dict, draws: int = 2000, seed: int = 0) -> tuple[float, float, float] | None:
    """The share of the gap between zero-shot pass@1 and maj@N that distillation closes,
    ``mean(distilled - pass@1) / mean(maj@N - pass@1)`` over the problems of ``rows`` (`compare`'s per-problem
    lists, possibly pooled over seeds), with a 95% percentile interval from ``draws`` paired bootstrap
    resamples of the problems (a resample without a gap, whose share is undefined, is left out; NaN where
    there is no gap at all). None when ``rows`` has no distillation row."""
    if DISTILLED not in rows:
        return None
    values = torch.tensor([rows[DISTILLED], rows["zero-shot pass@1"], rows["maj@N"]], dtype=torch.float64)
    gain, gap = values[0] - values[1], values[2] - values[1]

    def share(rows_taken):
        return gain[rows_taken].mean(-1) / gap[rows_taken].mean(-1)

    picks = torch.randint(values.shape[1], (draws, values.shape[1]), generator=torch.Generator().manual_seed(seed))
    shares = share(picks)
    shares = shares[shares.isfinite()]
    low, high = (torch.quantile(shares, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                 if len(shares) else (float("nan"), float("nan")))
    return share(torch.arange(values.shape[1])).item(), low, high


def icl_prompts(learner, problems: list[dict], records: list[dict]) -> list[list[int]]:
    """Each question preceded by the stored majority traces of its most similar earlier problems.

    Uses only what the learner had at that point (earlier problems, their majority-consistent sample
    texts); the examples are encoded by the learner's `PromptFormat` (earlier chat turns with a chat
    template, ``question trace <eos>`` blocks without one), the question last.
    """
    keys = torch.nn.functional.normalize(learner.embed_fn([p["question"] for p in problems]).float(), dim=-1)
    prompts = []
    for i, problem in enumerate(problems):
        examples = []
        if i:
            similarity = keys[:i] @ keys[i]
            for j in similarity.topk(min(learner.config.retrieve, i)).indices.tolist():
                trace = _majority_trace(records[j], learner)
                if trace is not None:
                    examples.append((records[j]["question"], trace))
        prompts.append(learner.prompt.encode(learner.tokenizer, problem["question"], examples))
    return prompts


def _majority_trace(record: dict, learner) -> str | None:
    if record["answer"] is None:
        return None
    for text, answer in zip(record["samples"], record["answers"]):
        if answer is not None and learner.equivalent(answer, record["answer"]):
            return text
    return None


def print_summary(summary: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fastmem run: {summary['problems']} problems, n={args.n}, steps={args.steps}, "
                        f"lr={args.lr:g}, {args.kind}, memory={args.memory}, gate {'on' if args.gate else 'off'}")
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    table.add_column("95% CI", justify="right")
    for name, values in summary.items():
        if isinstance(values, list):
            mean, half_width = mean_and_interval(values)
            table.add_row(name, f"{mean:.3f}", f"±{half_width:.3f}")
    closed = gap_closed(summary)
    if closed is not None:
        table.add_row("distillation: share of the pass@1 → maj@N gap closed", f"{closed[0]:.2f}",
                      f"[{closed[1]:.2f}, {closed[2]:.2f}]")
    table.add_row("problems/s", f"{summary['problems_per_s']:.2f}", "")
    Console().print(table)
