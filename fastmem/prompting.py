"""`PromptFormat`: how a question becomes the token ids a model sees, in one place.

The learner's samples, its retrieval keys, its training prompts and the command line's baselines
(zero-shot, greedy, maj@N, raw-trace ICL) all encode questions with the same `PromptFormat.encode`.

With a chat template (``chat_template="auto"`` and a tokenizer that has one) the question, put into
``template``, is the user turn (after ``system``, when given; otherwise the template's own default system
turn, if it has one) and the assistant turn is opened. Without one the templated question is encoded as
plain text (with the tokenizer's special tokens, e.g. ``<bos>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

QUESTION = "{question}"
CHAT_PROMPT = "{question}\nPut your final answer within \\boxed{}."
PLAIN_PROMPT = QUESTION
CHAT_TEMPLATE_CHOICES = ("auto", "none")


@dataclass(frozen=True)
class PromptFormat:
    """template: text holding ``{question}`` (replaced by the question; other braces stay as written);
    None: `CHAT_PROMPT` (asks for the answer in ``\\boxed{}``) when the chat template is applied, else the
    bare question. system: the system message (None: the chat template's default). chat_template:
    "auto" (apply the tokenizer's chat template when it has one) or "none" (never)."""
    template: str | None = None
    system: str | None = None
    chat_template: str = "auto"

    def __post_init__(self):
        if self.chat_template not in CHAT_TEMPLATE_CHOICES:
            raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_CHOICES)}; "
                             f"got {self.chat_template!r}")
        if self.template is not None and (not isinstance(self.template, str) or QUESTION not in self.template):
            raise ValueError(f"the prompt template must hold {QUESTION}; got {self.template!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"system must be a string; got {self.system!r}")

    def uses_chat(self, tokenizer) -> bool:
        """Whether questions go through ``tokenizer``'s chat template."""
        return self.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))

    def user_text(self, tokenizer, question: str) -> str:
        """The question put into the template (the user turn's text)."""
        template = self.template or (CHAT_PROMPT if self.uses_chat(tokenizer) else PLAIN_PROMPT)
        return template.replace(QUESTION, question)

    def encode(self, tokenizer, question: str, examples: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of ``question``'s prompt, ready for the answer to follow.

        examples: earlier ``(question, answer text)`` pairs shown first (in-context learning): earlier
        user / assistant turns with a chat template; without one, ``prompt answer <eos>`` blocks.
        """
        if self.uses_chat(tokenizer):
            messages = [] if self.system is None else [{"role": "system", "content": self.system}]
            for shown, answer in examples:
                messages += [{"role": "user", "content": self.user_text(tokenizer, shown)},
                             {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": self.user_text(tokenizer, question)})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids: list[int] = []
        for shown, answer in examples:
            ids += self._plain(tokenizer, shown) + list(tokenizer(answer, add_special_tokens=False)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        return ids + self._plain(tokenizer, question)

    def _plain(self, tokenizer, question: str) -> list[int]:
        text = self.user_text(tokenizer, question)
        if self.system:
            text = self.system + "\n\n" + text
        return list(tokenizer(text)["input_ids"])
