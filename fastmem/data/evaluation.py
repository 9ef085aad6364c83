"""Sample solutions from a causal LM and score them: pass@1, majority vote, greedy accuracy."""
from __future__ import annotations

from typing import Callable

import torch

from fastmem.data.problems import extract_answer
from fastmem.voting import answers_equivalent, majority_vote


def random_soft_prompt(model, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`length` random vectors whose entries have the spread of the model's input embedding table."""
    embeddings = model.get_input_embeddings().weight
    noise = torch.randn(length, embeddings.shape[1], generator=generator, dtype=embeddings.dtype)
    return noise.to(embeddings.device) * embeddings.std()


@torch.no_grad()
def generate_solutions(model, tokenizer, questions: list[str], num_samples: int = 1, do_sample: bool = True,
                       soft_prompt: torch.Tensor | None = None, batch_size: int = 512,
                       max_new_tokens: int = 96) -> list[list[str]]:
    """`num_samples` completions per question (temperature 1.0, or greedy when `do_sample` is False).

    `soft_prompt` (``[P, hidden]``) is placed before each prompt's ``<bos>`` via ``inputs_embeds``.
    Returns, per question, the decoded completions without special tokens.
    """
    prompts = [question for question in questions for _ in range(num_samples)]
    embed = model.get_input_embeddings()
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
        inputs_embeds, attention_mask = embed(batch.input_ids), batch.attention_mask
        if soft_prompt is not None:
            rows = inputs_embeds.shape[0]
            inputs_embeds = torch.cat([soft_prompt.expand(rows, -1, -1).to(inputs_embeds.dtype), inputs_embeds], 1)
            attention_mask = torch.cat([attention_mask.new_ones(rows, soft_prompt.shape[0]), attention_mask], 1)
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
        new_tokens = model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, **sampling)
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [completions[index:index + num_samples] for index in range(0, len(completions), num_samples)]


def majority_answer(completions: list[str],
                    equivalent: Callable[[str, str], bool] = answers_equivalent) -> str | None:
    """The majority of the extracted answers, grouped by ``equivalent`` (`fastmem.voting.majority_vote`, as the
    learner votes: ``07`` and ``7`` are one answer; the first seen wins ties); None when no completion has one."""
    return majority_vote([extract_answer(text) for text in completions], equivalent).answer


def sampled_accuracy(problems: list[dict[str, str]], samples: list[list[str]],
                     equivalent: Callable[[str, str], bool] = answers_equivalent) -> dict[str, float]:
    """pass@1 (mean over samples) and maj@k (majority answer correct) for `k` samples per problem; an answer is
    correct when ``equivalent`` to the problem's ``answer`` (default: `fastmem.voting.answers_equivalent`, what
    ``python -m fastmem run`` scores with)."""
    def correct(answer: str | None, reference: str) -> bool:
        return answer is not None and equivalent(answer, reference)

    pass_at_1 = sum(
        sum(correct(extract_answer(text), problem["answer"]) for text in texts) / len(texts)
        for problem, texts in zip(problems, samples))
    majority = sum(correct(majority_answer(texts, equivalent), problem["answer"])
                   for problem, texts in zip(problems, samples))
    return {"pass@1": pass_at_1 / len(problems), f"maj@{len(samples[0])}": majority / len(problems)}
