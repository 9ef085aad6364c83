"""Built-in data for fastmem: a seeded stream of synthetic multi-step problems, their tokenizer,
and the tiny default model trained on them (``scripts/train_default_model.py``)."""
from fastmem.data.default_model import default_model_path, load_default_model
from fastmem.data.evaluation import generate_solutions, majority_answer, random_soft_prompt, sampled_accuracy
from fastmem.data.problems import ANSWER_MARKER, FAMILIES, extract_answer, make_problem, stream
from fastmem.data.tokenizer import build_tokenizer, save_tokenizer

__all__ = [
    "ANSWER_MARKER", "FAMILIES", "build_tokenizer", "default_model_path", "extract_answer",
    "generate_solutions", "load_default_model", "make_problem", "majority_answer", "random_soft_prompt",
    "sampled_accuracy", "save_tokenizer", "stream",
]
