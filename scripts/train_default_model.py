"""Train the default model shipped in ``fastmem/assets/default_model`` from scratch on CPU, then measure it.

    python scripts/train_default_model.py                     # train (2 threads), save, measure
    python scripts/train_default_model.py --measure-only      # measure the saved model

Training sequences are *packed*: whole problems (``<bos> question solution <eos>``) back to back,
cut at a random point of the first one, so a question usually follows unrelated content. A model
trained only on sequences that start at its question breaks under any soft prompt.
The loss covers solutions and ``<eos>`` only, with *digit smoothing*: wherever the target is a
digit, a little target mass goes to every digit, so that a sampled trace slips on a digit now and
then, independently per step and per sample. Errors are then mostly random rather than systematic,
and the majority answer of several samples is right far more often than a single sample.

Measurement: pass@1 and maj@8 at temperature 1.0, greedy accuracy, and pass@1 under a random soft
prompt, on the first `--eval-problems` problems of ``stream(seed)`` for each of `--eval-seeds`.
"""
from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fastmem.data import (build_tokenizer, default_model_path, generate_solutions, random_soft_prompt,
                          sampled_accuracy, save_tokenizer, stream)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=default_model_path())
    parser.add_argument("--seed", type=int, default=1234, help="training data and initialization seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1750)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--digit-smoothing", type=float, default=0.04,
                        help="target mass spread over all digits wherever the target is a digit")
    parser.add_argument("--eval-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--soft-prompt-length", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=0,
                        help="also save the model every N steps into OUTPUT/step-N (to pick --steps)")
    parser.add_argument("--measure-only", action="store_true", help="skip training; measure --output")
    return parser.parse_args()


def encode(tokenizer, problem: dict[str, str]) -> tuple[list[int], list[int]]:
    """Token ids of ``<bos> question`` and of ``solution <eos>``."""
    question = tokenizer(problem["question"]).input_ids
    solution = tokenizer(problem["solution"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return question, solution


def packed_batches(tokenizer, seed: int, batch_size: int, seq_len: int):
    """Yield ``(input_ids, loss_mask)`` batches ``[batch_size, seq_len]`` of packed problems, forever.

    Each row starts inside a problem (cut at a random point, not trained on) and continues with
    whole problems, whose solution tokens are trained on.
    """
    problems = stream(seed)
    rng = random.Random(seed)
    while True:
        rows, masks = [], []
        for _ in range(batch_size):
            question, solution = encode(tokenizer, next(problems))
            ids = (question + solution)[rng.randrange(len(question) + len(solution)):]
            mask = [False] * len(ids)
            while len(ids) < seq_len:
                question, solution = encode(tokenizer, next(problems))
                ids += question + solution
                mask += [False] * len(question) + [True] * len(solution)
            rows.append(ids[:seq_len])
            masks.append(mask[:seq_len])
        yield torch.tensor(rows), torch.tensor(masks)


def solution_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, digit_ids: torch.Tensor,
                  digit_smoothing: float) -> torch.Tensor:
    """Cross-entropy on the masked positions; where the target is a digit, the target distribution
    gives `digit_smoothing` of its mass evenly to all ten digits.

    A model fitted to this slips on each digit it samples with probability ~0.9 * `digit_smoothing`,
    independently of everything else, while its most likely digit stays the right one.
    """
    log_probs = torch.log_softmax(logits[loss_mask], dim=-1)
    targets = targets[loss_mask]
    loss = -log_probs.gather(1, targets[:, None]).squeeze(1)
    is_digit = torch.isin(targets, digit_ids)
    smoothed = -log_probs[:, digit_ids].mean(1)
    loss = torch.where(is_digit, (1 - digit_smoothing) * loss + digit_smoothing * smoothed, loss)
    return loss.mean()


def build_model(args: argparse.Namespace, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def save(model: LlamaForCausalLM, tokenizer, directory: Path) -> None:
    """Model (safetensors) and tokenizer, loadable with ``from_pretrained(directory)``."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)  # a class name transformers 4.56+ loads too


def train(args: argparse.Namespace) -> float:
    """Train, save model and tokenizer to `--output`; return the training wall time in seconds."""
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(args, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    # Linear warmup, then a constant rate: the model after k steps does not depend on --steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / args.warmup_steps, 1.0))
    batches = packed_batches(tokenizer, args.seed, args.batch_size, args.seq_len)
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(string.digits)))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps "
          f"of {args.batch_size}x{args.seq_len} tokens, {torch.get_num_threads()} threads", flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, args.steps + 1):
        input_ids, loss_mask = next(batches)
        logits = model(input_ids=input_ids).logits[:, :-1]
        loss = solution_loss(logits, input_ids[:, 1:], loss_mask[:, 1:], digit_ids, args.digit_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.0f} s "
                  f"(CPU {time.process_time() - cpu_start:6.0f} s)", flush=True)
        if args.save_every and step % args.save_every == 0:
            save(model, tokenizer, args.output / f"step-{step}")
    wall_time = time.perf_counter() - start
    print(f"training wall time {wall_time:.0f} s, CPU time {time.process_time() - cpu_start:.0f} s "
          f"(all threads; the machine may be shared)", flush=True)
    save(model, tokenizer, args.output)
    return wall_time


def measure(args: argparse.Namespace) -> None:
    """Print metrics on the first `--eval-problems` problems of ``stream(seed)`` per evaluation seed."""
    tokenizer = AutoTokenizer.from_pretrained(args.output)
    model = AutoModelForCausalLM.from_pretrained(args.output).eval()
    for seed in args.eval_seeds:
        torch.manual_seed(seed)
        problems = list(stream(seed, args.eval_problems))
        questions = [problem["question"] for problem in problems]
        sampled = sampled_accuracy(problems, generate_solutions(model, tokenizer, questions, args.eval_samples))
        greedy = sampled_accuracy(problems, generate_solutions(model, tokenizer, questions, do_sample=False))
        soft_prompt = random_soft_prompt(model, args.soft_prompt_length, torch.Generator().manual_seed(seed))
        prefixed = sampled_accuracy(problems, generate_solutions(model, tokenizer, questions, args.eval_samples,
                                                                 soft_prompt=soft_prompt))
        metrics = {**sampled, "greedy": greedy["pass@1"], "pass@1 random prefix": prefixed["pass@1"]}
        print(f"eval seed {seed}: " + json.dumps({k: round(v, 3) for k, v in metrics.items()}), flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.measure_only:
        train(args)
    measure(args)


if __name__ == "__main__":
    main()
