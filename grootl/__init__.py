"""GrootL: tree-topology scans for fine-tuning Mamba language models (arXiv 2406.02395)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["GrootLConfig", "load_model", "__version__"]


def __getattr__(name: str):
    # Lazy: `import grootl` stays cheap, and `grootl.tree` works without the model stack.
    if name in ("GrootLConfig", "load_model"):
        from grootl import model

        return getattr(model, name)
    raise AttributeError(f"module 'grootl' has no attribute {name!r}")
