"""Loading and saving the causal LMs fastmem runs on: `load_model`, `save_model`, `resolve_model`.

A model spec is one of

* None: the shipped tiny default model (`fastmem.data.load_default_model`);
* a Hugging Face folder (``config.json`` and weights, its tokenizer beside them);
* a ``.gguf`` file, or a folder holding exactly one ``.gguf`` (and no ``config.json``): transformers
  reads it with the ``gguf`` package and unpacks every weight into a plain dense model;
* a hub id (``org/name``) already in the local Hugging Face cache. Nothing is ever downloaded.

A model that cannot be found or read is a `ModelLoadError` (a ValueError) with a one-line message.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelLoadError(ValueError):
    """A model spec that names nothing loadable; the message is one line."""


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points: ``kind`` is "default", "folder", "gguf" or "hub"; ``path`` the folder (the
    hub id for "hub"); ``gguf_file`` the file's name inside ``path`` for "gguf"."""
    kind: str
    path: str | None = None
    gguf_file: str | None = None


def resolve_model(spec: str | os.PathLike | None) -> ModelSource:
    """Where ``spec`` points, checked without loading anything (the file system and the hub cache only)."""
    if spec is None:
        return ModelSource("default")
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model {text!r} is a file but not a .gguf file; pass a Hugging Face model folder "
                                 "or a .gguf file")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path))
        ggufs = sorted(p.name for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path), ggufs[0])
        if ggufs:
            raise ModelLoadError(f"model folder {text!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); "
                                 "pass the one to load")
        raise ModelLoadError(f"model folder {text!r} holds neither a config.json nor a .gguf file")
    if path.exists():
        raise ModelLoadError(f"model {text!r} is neither a file nor a folder")
    if not _HUB_ID.match(text) or text.lower().endswith(".gguf"):
        raise ModelLoadError(f"model {text!r}: no such file or folder")
    if not _in_hub_cache(text):
        raise ModelLoadError(f"model {text!r} is not a local file or folder and not in the Hugging Face cache; "
                             "fastmem never downloads models: fetch it first (huggingface-cli download "
                             f"{text}) or pass a local folder or .gguf file")
    return ModelSource("hub", text)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:   # an id the hub library itself refuses
        return False
    return isinstance(found, str)


def resolve_dtype(dtype) -> torch.dtype | str:
    """``"auto"``, ``"float32"``, ``"float16"``, ``"bfloat16"`` or a torch floating dtype -> what
    ``from_pretrained(dtype=...)`` takes. ValueError for anything else."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or a torch floating dtype); got {dtype!r}")


def resolve_device(device) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), or a device torch knows and this machine has."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA devices")
    return resolved


def load_model(spec: str | os.PathLike | None = None, *, dtype="float32", device="auto"):
    """``(model, tokenizer)`` for ``spec`` (see the module docstring), in eval mode on ``device``.

    dtype: "float32" (default), "float16", "bfloat16", "auto" (the checkpoint's own) or a torch dtype.
    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ... The tokenizer pads on the left (for
    batched generation) and pads with its eos token when it has no pad token. A GGUF model comes back
    dequantized and without its GGUF quantizer state, so ``save_pretrained`` (or `save_model`) writes a
    normal folder. Raises `ModelLoadError` (one line) when nothing loadable is there.
    """
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    source = resolve_model(spec)
    if source.kind == "default":
        from fastmem.data import load_default_model

        model, tokenizer = load_default_model()
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
    else:
        model, tokenizer = _load_source(source, torch_dtype, os.fspath(spec))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(torch_device).eval(), tokenizer


def _load_source(source: ModelSource, dtype, spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict = {"local_files_only": True}
    if source.kind == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelLoadError(f"model {spec!r} is a GGUF file; reading it needs the gguf package "
                                 "(pip install gguf)") from None
        options["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **options)
    except Exception as error:  # noqa: BLE001 - whatever went wrong, one line naming the model
        raise ModelLoadError(f"cannot read the tokenizer of model {spec!r}: {_first_line(error)}") from None
    if source.kind == "gguf":
        options["quantization_config"] = _dequantizing_gguf_config()
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **options)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model {spec!r}: {_first_line(error)}") from None
    if source.kind == "gguf":
        forget_gguf(model)
    return model, tokenizer


def _dequantizing_gguf_config():
    """transformers >= 5.24 may keep GGUF weights packed (GGUF matmul kernels); fastmem needs plain weights."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older releases always dequantize
        return None
    return GgufConfig(dequantize=True)


def forget_gguf(model):
    """Drop a dequantized GGUF model's quantizer state, so ``save_pretrained`` writes a normal folder.

    transformers refuses to save a model loaded from a .gguf ("quantized with gguf and is not
    serializable") even once its weights are plain tensors; with ``model.hf_quantizer = None`` and no
    ``config.quantization_config`` it saves, and the folder reloads with identical logits. Refuses a model
    whose weights are still packed GGUF blocks. Returns the model.
    """
    packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
    if packed:
        raise ValueError(f"the model's weights are still packed GGUF blocks ({packed[0]}, ...); load it with "
                         "fastmem.load_model (which dequantizes) before saving")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    return model


def save_model(model, tokenizer, path) -> Path:
    """Write ``model`` and ``tokenizer`` as a normal Hugging Face folder at ``path`` (a GGUF-loaded model
    included: see `forget_gguf`); `load_model(path)` reads it back, on transformers 4.56+ as on 5.x (the
    tokenizer is saved under a class name both know: `save_tokenizer`). Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from fastmem.data.tokenizer import save_tokenizer

    forget_gguf(model).save_pretrained(path)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)
    return path


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"
