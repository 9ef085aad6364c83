"""Test environment: Triton runs in its interpreter on CPU tensors; nothing is downloaded."""
import os

# Must be set before triton is first imported (see shared NOTES: the interpreter runs kernels on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run far faster on one thread than with intra-op threads competing for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
