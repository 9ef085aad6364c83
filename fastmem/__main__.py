"""Command line: ``python -m fastmem info``."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

import fastmem
from fastmem.cli import add_run_arguments, run
from fastmem.ops import backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tested_transformers() -> tuple[str, tuple[str, ...]]:
    """(MIN_TRANSFORMERS, TESTED_TRANSFORMERS) of fastmem/hf/architectures.py, the one place they are kept.

    Read from its source, not imported: importing fastmem.hf imports transformers, which takes seconds.
    """
    import ast
    from pathlib import Path

    source = Path(fastmem.__file__).resolve().parent / "hf" / "architectures.py"
    found = {}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("MIN_TRANSFORMERS", "TESTED_TRANSFORMERS"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found["MIN_TRANSFORMERS"], tuple(found["TESTED_TRANSFORMERS"])


def transformers_support(installed: str) -> tuple[str, str | None]:
    """The tested-range line for `info`, and a one-line warning when ``installed`` is outside it."""
    from packaging.version import InvalidVersion, Version

    minimum, tested = tested_transformers()
    newest = max(tested, key=Version)
    line = f"transformers supported: >= {minimum}; tested with {', '.join(sorted(tested, key=Version))}"
    try:
        version = Version(installed)
    except InvalidVersion:
        return line, None
    if version > Version(newest):
        return line, (f"WARNING: transformers {installed} is newer than the newest tested ({newest}); fastmem "
                      f"may misbehave with it: pip install \"transformers=={newest}\" for a tested one")
    if version < Version(minimum):
        return line, f"WARNING: transformers {installed} is older than the minimum fastmem supports ({minimum})"
    return line, None


def info() -> None:
    """Print versions, backend availability and what `auto` picks per device."""
    cuda = torch.version.cuda or "none"
    print(f"fastmem {fastmem.__version__} | python {platform.python_version()} | torch {torch.__version__} "
          f"(CUDA {cuda}, GPU {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'})")
    for package in ("triton", "transformers", "peft", "safetensors", "math-verify", "flash-attn"):
        print(f"  {package:<13} {_version(package)}")
    tested_line, warning = transformers_support(_version("transformers"))
    print(tested_line)
    if warning:
        print(warning)
    print("prefix_attention backends:")
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name)
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    if backends.unavailable_reason("native") is None:
        from fastmem import _native
        print(f"  native CPU kernels: {_native.cpu_isa()} build (this CPU runs: {', '.join(_native.cpu_isas())})")
    from fastmem.ops import linear, native
    kernel = "native kernel" if native.is_available() else f"torch F.linear ({native.UNAVAILABLE_REASON})"
    print(f"few-row linear (fastmem.sample's decode steps, fp32 CPU, <= {linear.MAX_ROWS} rows): {kernel}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for head_dim in (64, 128):
                picked = backends.resolve("auto", torch.device(device), dtype, head_dim)
                print(f"  auto on {device:<4} {str(dtype).removeprefix('torch.'):<8} head dim {head_dim:<3} -> {picked}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastmem", description=fastmem.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, available backends and what auto picks")
    run_parser = commands.add_parser("run", help="the online learner on a question stream (default: built-in)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # its options read the learner's defaults: importing it takes seconds
        add_run_arguments(run_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    elif args.command == "run":
        run(args)


if __name__ == "__main__":
    main()
