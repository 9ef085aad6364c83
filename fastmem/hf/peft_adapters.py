"""Read PEFT prompt-tuning and prefix-tuning adapters (a live `PeftModel` or a saved directory)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import Tensor

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_KEY = "prompt_embeddings"


@dataclass(frozen=True)
class PromptAdapter:
    """One prompt-learning adapter, in PEFT's layout.

    peft_type: "PROMPT_TUNING" or "PREFIX_TUNING". weights: ``[num_virtual_tokens, token_dim]`` for prompt
    tuning; ``[num_virtual_tokens, num_layers * 2 * token_dim]`` for prefix tuning, where each layer holds
    its keys then its values, each ``[num_attention_heads, token_dim // num_attention_heads]`` (PEFT
    counts KV heads as attention heads for grouped-query models). Prefix projections are applied.
    """
    peft_type: str
    weights: Tensor
    num_virtual_tokens: int
    token_dim: int
    num_layers: int
    num_attention_heads: int
    num_transformer_submodules: int


def _from_config(config: dict, weights: Tensor, origin: str) -> PromptAdapter:
    peft_type = config.get("peft_type")
    peft_type = str(getattr(peft_type, "value", peft_type))
    try:
        return PromptAdapter(peft_type, weights, int(config["num_virtual_tokens"]), int(config["token_dim"]),
                             int(config["num_layers"]), int(config["num_attention_heads"]),
                             int(config.get("num_transformer_submodules") or 1))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{origin} is not a complete prompt-learning adapter config: missing {error}") from None


def read_prompt_adapter(source, adapter_name: str | None = None) -> PromptAdapter:
    """A `PeftModel` (its active adapter, or ``adapter_name``) or a directory saved by ``save_pretrained``."""
    if isinstance(source, (str, os.PathLike)):
        config_path, weights_path = (os.path.join(source, name) for name in (CONFIG_FILE, WEIGHTS_FILE))
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise ValueError(f"{source} is not a PEFT adapter directory: need {CONFIG_FILE} and {WEIGHTS_FILE}")
        with open(config_path) as handle:
            config = json.load(handle)
        tensors = load_file(weights_path)
        if WEIGHTS_KEY not in tensors:
            raise ValueError(f"{weights_path} holds no {WEIGHTS_KEY!r} tensor (found {sorted(tensors)}); "
                             "is it a prompt or prefix tuning adapter?")
        return _from_config(config, tensors[WEIGHTS_KEY], str(source))
    if not hasattr(source, "get_prompt_embedding_to_save") or not hasattr(source, "peft_config"):
        raise TypeError(f"expected a PEFT model or an adapter directory; got {type(source).__name__}")
    name = adapter_name or source.active_adapter
    config = source.peft_config[name]
    if not config.is_prompt_learning:
        raise ValueError(f"adapter {name!r} is {config.peft_type}, not prompt or prefix tuning")
    with torch.no_grad():
        weights = source.get_prompt_embedding_to_save(name)
    return _from_config(config.to_dict(), weights, f"adapter {name!r}")
