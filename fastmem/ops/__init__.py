"""Ops: public functions that validate their inputs and dispatch to a backend."""
from fastmem.ops.prefix_attention import AttentionPlan, plan_prefix_attention, prefix_attention

__all__ = ["AttentionPlan", "plan_prefix_attention", "prefix_attention"]
