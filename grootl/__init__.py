"""GrootL: tree-topology scans for fine-tuning Mamba language models (arXiv 2406.02395).

``import grootl`` registers the ``grootl_mamba`` model type with transformers' Auto classes, lazily: at
once if transformers' Auto classes are already imported, else the moment they are (so ``import grootl``
itself stays cheap and ``grootl.tree`` works without the model stack).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

__all__ = ["GrootLConfig", "load_model", "__version__"]

_AUTO = "transformers.models.auto"


def __getattr__(name: str):
    if name in ("GrootLConfig", "load_model"):
        from grootl import model

        return getattr(model, name)
    raise AttributeError(f"module 'grootl' has no attribute {name!r}")


def _register_auto_classes() -> None:
    try:
        importlib.import_module("grootl.model")  # its import registers the classes
    except Exception as err:  # noqa: BLE001 - never break the user's transformers import
        warnings.warn(f"grootl: could not register the grootl_mamba Auto classes: {err}", RuntimeWarning, stacklevel=2)


class _RegisterAfterAutoImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_auto_classes` right after ``transformers.models.auto`` is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_auto_classes()

        spec.loader.exec_module = exec_then_register
        return spec


if _AUTO in sys.modules:
    _register_auto_classes()
elif not any(isinstance(finder, _RegisterAfterAutoImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterAutoImport())
