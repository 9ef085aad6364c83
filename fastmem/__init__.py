"""fastmem: fast test-time learning with latent memories (soft prompts and prefixes) for LMs."""
from fastmem.ops import prefix_attention

__version__ = "0.1.0"

__all__ = ["prefix_attention", "__version__"]
