"""Test environment: Triton runs in its interpreter on CPU tensors; nothing is downloaded."""
import os

# Must be set before triton is first imported (see shared NOTES: the interpreter runs kernels on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The Hugging Face-facing test modules: the ones that build or drive transformers / PEFT models, so a
# new transformers or PEFT release can break them. Their tests carry the `hf` marker (added below);
# `.ci/run` (after upgrading transformers and peft) and `scripts/compat.sh` select them with `-m hf`.
# tests/test_install.py checks that every test module importing transformers or peft, or importing
# from one of these, is listed here.
HF_FACING_MODULES = frozenset({
    "test_patch.py",     # patch / inject on every architecture, against PEFT and unpatched models
    "test_caches.py",    # every cache class and cache keyword generate hands a layer, RoPE scalings
    "test_sampling.py",  # shared-prefix sampling on patched models (uses test_patch's models)
    "test_training.py",  # per-memory training on patched models (uses test_patch's models)
    "test_learner.py",   # the online learner and `python -m fastmem run` on a tiny Llama
    "test_builtin.py",   # the shipped model and tokenizer, loaded through transformers
    "test_bench.py",     # the HF + PEFT baselines the benchmarks compare against
    "test_models.py",    # fastmem.load_model / save_model: HF folders, GGUF files, the hub cache
    "test_cli.py",       # `python -m fastmem run` options, data files and prompts on a tiny Llama
    "test_distributed.py",  # `fastmem run` on two gloo processes (the shipped model) against one process
    "test_real_model.py",  # SmolLM2-135M-Instruct (scripts/real_model.py) against PEFT, fp64, uncached
})


def pytest_configure(config):
    config.addinivalue_line("markers", "hf: Hugging Face-facing test (tests/conftest.py HF_FACING_MODULES)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in HF_FACING_MODULES:
            item.add_marker(pytest.mark.hf)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run far faster on one thread than with intra-op threads competing for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
