"""Test environment: Triton runs in its interpreter on CPU tensors; nothing is downloaded."""
import os

# Must be set before triton is first imported (see shared NOTES: the interpreter runs kernels on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
