"""Where the shipped default model lives, and loading it offline."""
from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    """Directory of the shipped tiny Llama and its tokenizer (``fastmem/assets/default_model``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "default_model"


def load_default_model():
    """``(model, tokenizer)`` for the shipped default model, in eval mode, read from disk only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer
