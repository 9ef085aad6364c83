"""Supported Hugging Face architectures: one row per `model_type`, no copied forward code.

fastmem works through transformers' own extension points, so an architecture needs no code of its
own: the row records that it was checked (tests build a tiny random model of each) and what differs.
Shapes are read from the config the same way for every row (`model_shape`).

| model_type | family         | quirks that matter to fastmem                                                  |
|------------|----------------|--------------------------------------------------------------------------------|
| llama      | Llama 2/3      | none                                                                           |
| mistral    | Mistral        | sliding window on every layer (`config.sliding_window`)                        |
| qwen2      | Qwen2 / 2.5    | sliding window on the layers `config.layer_types` marks `sliding_attention`    |
| qwen3      | Qwen3 (dense)  | explicit `head_dim`; q/k RMSNorm before RoPE; sliding layers as in qwen2        |
| gemma      | Gemma 1        | embeddings scaled by sqrt(hidden): in the model forward on 4.x (soft prompts    |
|            |                | scaled too), inside the embedding module on 5.x (soft prompts unscaled); soft   |
|            |                | prompts enter as `inputs_embeds` exactly like PEFT's, so both versions match it |
| phi3       | Phi-3          | fused qkv projection; sliding window (`config.sliding_window`)                 |
| gemma3_text| Gemma 3 (text) | local (sliding) and global layers by `config.layer_types`, one RoPE base per   |
|            |                | layer type; q/k RMSNorm; scaling from `query_pre_attn_scalar`; embeddings      |
|            |                | scaled inside the embedding module (soft prompts unscaled, as PEFT's)          |
|            |                | optional `final_logit_softcapping`: fastmem's decoder-only passes cap their    |
|            |                | logits as the model does (`fastmem.hf.shared_prefix.output_logits`)            |

transformers >= 4.56 (`MIN_TRANSFORMERS`; tested with `TESTED_TRANSFORMERS`, PEFT 0.21.2, by
`scripts/compat.sh`). Caches and rotary embeddings a forward may hand fastmem: `fastmem.hf.support`.

Sliding windows: memory positions count towards the window, as they would for PEFT's cache-based
prefix; fastmem raises when a row's memory plus keys would exceed a layer's window (the fused op has
none). Rows without memory run the model's own attention, so windows (and everything else) apply to
them exactly as without fastmem.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import transformers
from packaging.version import Version

MIN_TRANSFORMERS = "4.56.0"
TESTED_TRANSFORMERS = ("4.56.2", "4.57.6", "5.23.0", "5.24.0")


@dataclass(frozen=True)
class Architecture:
    """One supported `model_type`: its family name and the quirks fastmem accounts for."""
    family: str
    quirks: str


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("Llama", "none"),
    "mistral": Architecture("Mistral", "sliding window on every layer"),
    "qwen2": Architecture("Qwen2", "sliding window on layers marked sliding_attention"),
    "qwen3": Architecture("Qwen3", "explicit head_dim; q/k norms before RoPE"),
    "gemma": Architecture("Gemma", "sqrt(hidden) embedding scale; soft prompts get it exactly when PEFT's do"),
    "phi3": Architecture("Phi-3", "fused qkv projection; sliding window"),
    "gemma3_text": Architecture("Gemma 3", "local/global layers by layer_types, RoPE per layer type; "
                                           "query_pre_attn_scalar scaling"),
}


@dataclass(frozen=True)
class ModelShape:
    """What a memory must agree on with its model: sizes of the hidden state and of every layer's KV."""
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def mismatches(self, other: "ModelShape") -> list[str]:
        """``"field: self vs other"`` for every field that differs."""
        mine, theirs = self.as_dict(), other.as_dict()
        return [f"{name}: {mine[name]} vs {theirs[name]}" for name in mine if mine[name] != theirs[name]]


def architecture_of(model) -> Architecture:
    """The table row of ``model``; TypeError naming the supported model types otherwise."""
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise TypeError(f"fastmem needs transformers >= {MIN_TRANSFORMERS} (tested with "
                        f"{', '.join(TESTED_TRANSFORMERS)}); found {transformers.__version__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(f"{name} ({row.family})" for name, row in ARCHITECTURES.items())
        raise TypeError(f"fastmem does not support model_type {model_type!r} ({type(model).__name__}); "
                        f"supported: {supported}")
    return ARCHITECTURES[model_type]


def model_shape(model) -> ModelShape:
    """Hidden size, layer count, KV heads and head dim of a supported model, read from its config."""
    architecture_of(model)
    config = model.config
    return ModelShape(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    )
