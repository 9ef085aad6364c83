"""Ops: public functions that validate their inputs and dispatch to a backend."""
from fastmem.ops.prefix_attention import prefix_attention

__all__ = ["prefix_attention"]
