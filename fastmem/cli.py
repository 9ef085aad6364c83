"""``python -m fastmem run``: the online learner on a stream of questions, then an honest comparison.

With no arguments it runs on the built-in default: the shipped tiny Llama and its tokenizer, and the
built-in stream of synthetic multi-step problems (``--seed`` picks the stream). Answers, when the
data has them, are used only to report accuracy, after learning, never during it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

SUMMARY_ROWS = ("zero-shot pass@1", "greedy", "maj@N", "raw-trace ICL pass@1",
                "fastmem pass@1 (stream)", "fastmem pass@1 (second half)", "fastmem maj@N (stream)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a local Hugging Face causal LM directory (default: the shipped tiny Llama)")
    parser.add_argument("--data", help='JSONL, one {"question", "answer"?} per line (default: the built-in stream)')
    parser.add_argument("--seed", type=int, default=0, help="built-in stream and sampling seed")
    parser.add_argument("--limit", type=int, default=200, help="problems to solve (default 200)")
    learner = _learner_defaults()
    parser.add_argument("--n", type=int, default=learner["n"], help="samples per problem")
    parser.add_argument("--steps", type=int, default=learner["steps"], help="Adam steps per batch")
    parser.add_argument("--kind", choices=("soft_prompt", "prefix"), default=learner["kind"], help="memory kind")
    parser.add_argument("--memory", choices=("problem", "cluster"), default=learner["memory"])
    parser.add_argument("--batch-size", type=int, default=learner["batch_size"])
    parser.add_argument("--lr", type=float, default=learner["lr"])
    parser.add_argument("--length", type=int, default=learner["length"], help="memory positions per slot")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gate", action=argparse.BooleanOptionalAction, default=learner["gate"],
                        help="use a retrieved memory only while its samples agree with the vote at least as "
                             "often as the control samples do")
    parser.add_argument("--control", type=int, default=learner["control"],
                        help="samples per problem drawn without memory")
    parser.add_argument("--gate-trials", type=int, default=learner["gate_trials"], help="uses before the gate may close")
    parser.add_argument("--cluster-similarity", type=float, default=learner["cluster_similarity"],
                        help="cosine similarity to join a cluster (memory=cluster)")
    parser.add_argument("--min-share", type=float, default=learner["min_share"],
                        help="train only on problems whose majority holds at least this share of the samples")
    parser.add_argument("--replay", type=int, default=learner["replay"],
                        help="past problems per cluster trained on again at every step (memory=cluster)")
    parser.add_argument("--consolidate-every", type=int, default=learner["consolidate_every"],
                        help="merge near-duplicate store entries every this many batches (0: never)")
    parser.add_argument("--consolidate-threshold", type=float, default=learner["consolidate_threshold"])
    parser.add_argument("--store", help="persist the memory store in this directory")
    parser.add_argument("--resume", action="store_true", help="continue a run from --store and --out")
    parser.add_argument("--out", help="results JSONL, one line per problem")
    parser.add_argument("--no-baselines", action="store_true", help="skip the comparison table")


def _learner_defaults() -> dict:
    """`OnlineLearner`'s keyword defaults: the command line's learner options default to the same values."""
    import inspect

    from fastmem.learner import OnlineLearner

    return {name: parameter.default for name, parameter in inspect.signature(OnlineLearner).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def read_questions(args) -> list[dict]:
    """The problems to solve; a malformed JSONL line is an error naming it, raised before any work."""
    if args.data is None:
        from fastmem.data import stream

        return [{"question": p["question"], "answer": p["answer"]} for p in stream(args.seed, args.limit)]
    problems = []
    with open(args.data) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{args.data}:{number}: not valid JSON ({error.msg})")
            if not isinstance(record, dict) or not isinstance(record.get("question"), str) or not record["question"]:
                raise SystemExit(f'{args.data}:{number}: expected an object with a non-empty "question" string')
            if "answer" in record and not isinstance(record["answer"], (str, int, float)):
                raise SystemExit(f'{args.data}:{number}: "answer" must be a string or a number')
            problems.append({"question": record["question"],
                             "answer": None if record.get("answer") is None else str(record["answer"])})
    return problems[:args.limit]


def load_model(path: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        from fastmem.data import load_default_model

        return load_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval(), tokenizer


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
    from fastmem.learner import OnlineLearner
    from fastmem.store import MemoryStore

    problems = read_questions(args)
    store = MemoryStore.load(args.store) if args.resume and args.store and (Path(args.store) / "store.json").exists() \
        else MemoryStore(args.store)
    out_path = Path(args.out) if args.out else None
    done = _read_done(out_path) if args.resume else []
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            out_path.write_text("")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    learner = OnlineLearner(model, tokenizer, store, n=args.n, steps=args.steps, kind=args.kind,
                            memory=args.memory, length=args.length, lr=args.lr, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, gate=args.gate,
                            control=args.control, gate_trials=args.gate_trials,
                            cluster_similarity=args.cluster_similarity, min_share=args.min_share,
                            replay=args.replay, consolidate_every=args.consolidate_every,
                            consolidate_threshold=args.consolidate_threshold, extract_answer=_extractor(args))
    learner.batches_done = len(done) // args.batch_size
    records = list(done)
    started = time.perf_counter()
    from tqdm import tqdm

    todo = problems[len(done):]
    try:
        with tqdm(total=len(problems), initial=len(done), unit="problem", file=sys.stderr) as bar:
            for start in range(0, len(todo), args.batch_size):
                chunk = todo[start:start + args.batch_size]
                for problem, result in zip(chunk, learner.solve([p["question"] for p in chunk])):
                    records.append(_record(problem, result, learner))
                    if out_path is not None:
                        with out_path.open("a") as handle:
                            handle.write(json.dumps(records[-1]) + "\n")
                bar.update(len(chunk))
                if args.store:
                    store.save()
    except KeyboardInterrupt:
        if args.store:
            store.save()
        print(f"\ninterrupted after {len(records)} problems; store saved"
              + (f" to {args.store}; continue with --resume" if args.store else ""), file=sys.stderr)
        raise SystemExit(130)
    elapsed = time.perf_counter() - started
    summary = {"problems": len(records), "problems_per_s": (len(records) - len(done)) / max(elapsed, 1e-9)}
    if not args.no_baselines and all(p["answer"] is not None for p in problems):
        summary.update(compare(learner, problems, records, args))
    print_summary(summary, args)
    return summary


def _extractor(args):
    """The built-in stream's ``=> N`` format for the built-in data, else the generic extractor."""
    if args.data is None:
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
            "reference": problem["answer"], "sample_correct": correct,
            "majority_correct": None if correct is None else (
                result.answer is not None and learner.equivalent(result.answer, problem["answer"]))}


def _accuracy(answers: list[list[str | None]], problems: list[dict], equivalent) -> list[float]:
    return [sum(a is not None and equivalent(a, p["answer"]) for a in row) / len(row)
            for row, p in zip(answers, problems)]


def compare(learner, problems: list[dict], records: list[dict], args) -> dict:
    """Per-problem accuracies: baselines on the same problems (same temperature and n, no memory) and
    fastmem's own (pass@1 over the samples drawn with the learner's memories, the control samples
    excluded; maj@N of the answers it returned)."""
    from fastmem.sampling import sample
    from fastmem.voting import majority_vote

    tokenizer, model, equivalent = learner.tokenizer, learner.model, learner.equivalent
    prompts = [tokenizer(p["question"])["input_ids"] for p in problems]

    def answers_of(samples):
        return [[learner.extract_answer(s.text) for s in row] for row in samples]

    def draw(prompt_ids, n, temperature, seed):
        return sample(model, prompt_ids, n=n, max_new_tokens=args.max_new_tokens, temperature=temperature,
                      seed=seed, tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id)

    zero_shot = answers_of(draw(prompts, args.n, 1.0, args.seed + 7))
    greedy = answers_of(draw(prompts, 1, 0.0, args.seed))
    majority = [[majority_vote(row, equivalent).answer] for row in zero_shot]
    icl = answers_of(draw(icl_prompts(learner, problems, records), args.n, 1.0, args.seed + 11))
    treated = [r["answers"][:r["memory_samples"]] for r in records]
    half = len(problems) // 2
    stream_pass = _accuracy(treated, problems, equivalent)
    zero_shot_pass = _accuracy(zero_shot, problems, equivalent)
    return {
        "zero-shot pass@1": zero_shot_pass,
        "greedy": _accuracy(greedy, problems, equivalent),
        "maj@N": _accuracy(majority, problems, equivalent),
        "raw-trace ICL pass@1": _accuracy(icl, problems, equivalent),
        "fastmem pass@1 (stream)": stream_pass,
        "zero-shot pass@1 (second half)": zero_shot_pass[half:],
        "fastmem pass@1 (second half)": stream_pass[half:],
        # per problem, so its interval is the paired one (narrower than comparing the two rows' intervals)
        "fastmem − zero-shot pass@1 (second half)": [f - z for f, z in zip(stream_pass[half:], zero_shot_pass[half:])],
        "fastmem maj@N (stream)": [float(r["majority_correct"]) for r in records],
    }


def icl_prompts(learner, problems: list[dict], records: list[dict]) -> list[list[int]]:
    """Each question preceded by the stored majority traces of its most similar earlier problems.

    Uses only what the learner had at that point (earlier problems, their majority-consistent sample
    texts); the prompt packs ``question trace <eos>`` blocks before the question, as in pretraining.
    """
    tokenizer = learner.tokenizer
    keys = torch.nn.functional.normalize(learner.embed_fn([p["question"] for p in problems]).float(), dim=-1)
    prompts = []
    for i, problem in enumerate(problems):
        blocks: list[int] = []
        if i:
            similarity = keys[:i] @ keys[i]
            for j in similarity.topk(min(learner.top_k, i)).indices.tolist():
                trace = _majority_trace(records[j], learner)
                if trace is not None:
                    blocks += tokenizer(records[j]["question"])["input_ids"] \
                        + tokenizer(trace, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompts.append(blocks + tokenizer(problem["question"])["input_ids"])
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
    table.add_row("problems/s", f"{summary['problems_per_s']:.2f}", "")
    Console().print(table)
