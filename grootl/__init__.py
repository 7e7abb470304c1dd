"""GrootL: tree-topology scans for fine-tuning Mamba language models (arXiv 2406.02395).

``import grootl`` registers the ``grootl_mamba`` model type with transformers' Auto classes, lazily: at
once if transformers' Auto classes are already imported, else the moment they are (so ``import grootl``
itself stays cheap and ``grootl.tree`` works without the model stack).
"""

from __future__ import annotations

import functools
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


def _register_auto_classes(wait_for_running_imports: bool = False) -> None:
    """Import grootl.model, whose import registers the classes. ``import peft`` or ``from transformers import
    MambaForCausalLM`` reach the Auto classes half-way through their own imports, whose modules grootl's
    classes need whole: with ``wait_for_running_imports`` such a failure retries as each running import ends."""
    try:
        importlib.import_module("grootl.model")
    except Exception as err:  # noqa: BLE001 - never break the user's transformers import
        if wait_for_running_imports and isinstance(err, ImportError) and _retry_when_loaded(_imports_running()):
            return
        warnings.warn(f"grootl: could not register the grootl_mamba Auto classes: {err}", RuntimeWarning, stacklevel=2)


def _imports_running() -> list:
    """The specs of the modules whose import is still running, other than the Auto classes' own."""
    return [module.__spec__ for name, module in list(sys.modules.items())
            if name != _AUTO and getattr(getattr(module, "__spec__", None), "_initializing", False)]


def _retry_when_loaded(specs: list) -> bool:
    """Have each of these running imports retry the registration when its module is loaded (Python clears its
    spec's ``_initializing`` then); False where there is none, or a spec's class cannot be swapped."""
    try:
        for spec in specs:
            if not isinstance(spec, _SettlingSpec):
                spec.__class__ = _settling(type(spec))
    except TypeError:
        return False
    return bool(specs)


class _SettlingSpec:
    """Mixed into a running import's spec class by :func:`_retry_when_loaded`."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "_initializing" and not value:
            self.__class__ = type(self).__mro__[2]  # the spec's own class again
            _register_auto_classes(wait_for_running_imports=True)


@functools.cache
def _settling(spec_class: type) -> type:
    return type("Settling" + spec_class.__name__, (_SettlingSpec, spec_class), {})


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
            _register_auto_classes(wait_for_running_imports=True)

        spec.loader.exec_module = exec_then_register
        return spec


if _AUTO in sys.modules:
    _register_auto_classes()
elif not any(isinstance(finder, _RegisterAfterAutoImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterAutoImport())
